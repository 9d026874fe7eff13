//! Dead letters: inputs whose handling failed for good, set aside instead of retried.
//!
//! A bug (a panic in the core, or a stanza that cannot be written as XML) must cost one item,
//! never the gateway. The runtime answers such an item with a permanent refusal (SMTP 554, HTTP
//! 422, an XMPP `internal-server-error`), logs it once, and stores it here as a
//! [`DeadLetter`]. Mail servers and SMS gateways resend what was not accepted; a resend of a
//! dead letter's input (same fingerprint) is refused at once without being handled again, so
//! the bug cannot turn into a loop. The admin lists dead letters with `reach dead-letters`,
//! and one marked with `reach dead-letters redrive ID` is handled again at the next start
//! (after an upgrade that fixed the bug, say).
//!
//! Only inputs that come from outside and can be resent are set aside: stanzas, email replies,
//! incoming SMS and delivery reports. Ticks and the senders' own failure reports are not inputs
//! anyone resends; a panic on them is logged (once per distinct message) and skipped.

use sha2::{Digest, Sha256};

use super::email::{InboundMail, SmtpAnswer};
use super::sms::WebhookAnswer;
use super::Event;
use crate::core::model::DeadLetter;
use crate::sms::{DeliveryReport, IncomingSms};
use crate::xmpp::stanza::{error_reply, ErrorType, StanzaFault};

/// What the SMTP client is told about a mail set aside.
pub const MAIL_REFUSAL: &str = "Reach could not take this message; it was set aside for the \
                                administrator";

/// The kinds of input that can be set aside, as written in [`DeadLetter::kind`].
const STANZA: &str = "stanza";
const EMAIL: &str = "email";
const SMS: &str = "sms";
const SMS_REPORT: &str = "sms-report";

/// The dead letter for `event`, or `None` for events that are not set aside (see the module
/// comment). `reason` must not hold message text.
pub fn set_aside(event: &Event, now: u64, reason: &str) -> Option<DeadLetter> {
    let (kind, payload) = encode(event)?;
    Some(DeadLetter {
        at: now,
        kind: kind.to_owned(),
        reason: reason.to_owned(),
        fingerprint: fingerprint_of(kind, &payload),
        payload,
        redrive: false,
    })
}

/// The fingerprint a resend of `event` would have, for inputs that are resent (email and SMS);
/// `None` for the rest (nobody resends a stanza, and hashing each one would cost every message).
pub fn resend_fingerprint(event: &Event) -> Option<Vec<u8>> {
    match event {
        Event::EmailReply(_) | Event::SmsReceived(_) | Event::SmsDelivery(_) => {
            let (kind, payload) = encode(event)?;
            Some(fingerprint_of(kind, &payload))
        }
        _ => None,
    }
}

/// The event a dead letter holds, to handle it again. `None` if the payload cannot be read.
pub fn revive(letter: &DeadLetter) -> Option<Event> {
    match letter.kind.as_str() {
        STANZA => letter.payload.parse().ok().map(Event::Stanza),
        EMAIL => serde_json::from_str::<InboundMail>(&letter.payload)
            .ok()
            .map(Event::EmailReply),
        SMS => serde_json::from_str::<IncomingSms>(&letter.payload)
            .ok()
            .map(Event::SmsReceived),
        SMS_REPORT => serde_json::from_str::<DeliveryReport>(&letter.payload)
            .ok()
            .map(Event::SmsDelivery),
        _ => None,
    }
}

/// What the sender of a set-aside stanza is told: `None` for stanzas that are never answered
/// (errors and results) or that cannot be answered (no sender).
pub fn stanza_refusal(event: &Event) -> Option<minidom::Element> {
    let Event::Stanza(stanza) = event else {
        return None;
    };
    let type_ = stanza.attr("type").unwrap_or("");
    if type_ == "error" || type_ == "result" || stanza.attr("from").is_none() {
        return None;
    }
    let fault = StanzaFault::new(ErrorType::Cancel, "internal-server-error")
        .with_text("Reach could not handle this; it was set aside for the administrator");
    Some(error_reply(stanza, &fault))
}

/// The permanent SMTP answer for a mail set aside.
pub fn mail_refusal() -> SmtpAnswer {
    SmtpAnswer {
        code: 554,
        enhanced: "5.3.0",
        text: MAIL_REFUSAL.to_owned(),
    }
}

/// The permanent webhook answer for an SMS or report set aside.
pub fn webhook_refusal() -> WebhookAnswer {
    WebhookAnswer::Rejected("set aside for the administrator".to_owned())
}

fn encode(event: &Event) -> Option<(&'static str, String)> {
    match event {
        Event::Stanza(stanza) => {
            // A stanza from the parser always serialises; should one not, keep what can be kept.
            let xml = crate::xmpp::xml_text::to_xml(stanza)
                .unwrap_or_else(|e| format!("<!-- unwritable: {e} -->"));
            Some((STANZA, xml))
        }
        Event::EmailReply(mail) => Some((EMAIL, serde_json::to_string(mail).ok()?)),
        Event::SmsReceived(sms) => Some((SMS, serde_json::to_string(sms).ok()?)),
        Event::SmsDelivery(report) => Some((SMS_REPORT, serde_json::to_string(report).ok()?)),
        Event::LinkUp | Event::Tick | Event::SmsFailed { .. } | Event::EmailFailed { .. } => None,
    }
}

fn fingerprint_of(kind: &str, payload: &str) -> Vec<u8> {
    let mut hash = Sha256::new();
    hash.update(kind.as_bytes());
    hash.update([0]);
    hash.update(payload.as_bytes());
    hash.finalize().to_vec()
}

#[cfg(test)]
mod tests {
    use super::*;
    #[allow(unused_imports)]
    use crate::core::Transaction;
    use crate::email::extract::Reply;

    fn mail(text: &str) -> Event {
        Event::EmailReply(InboundMail {
            envelope_from: "alice@mail.example".into(),
            rcpt: "r-token@reach.example".into(),
            reply: Reply {
                message_id: Some("m1@mail.example".into()),
                from: Some("alice@mail.example".into()),
                subject: Some("Re: IM from Bob".into()),
                in_reply_to: vec![],
                references: vec![],
                text: text.into(),
                attachments: vec![],
                automatic: None,
            },
        })
    }

    #[test]
    fn every_resendable_input_comes_back_as_it_was_set_aside() {
        let sms = Event::SmsReceived(IncomingSms {
            from: "+15551234567".into(),
            to: "+15550000000".into(),
            text: "hello".into(),
            provider_id: Some("k1".into()),
        });
        let stanza = Event::Stanza(
            "<message xmlns='jabber:component:accept' from='bob@b.example/x' \
             to='alice@reach.example' type='chat'><body>hi</body></message>"
                .parse()
                .unwrap(),
        );
        for event in [mail("yes I am"), sms, stanza] {
            let letter = set_aside(&event, 7, "the core panicked").unwrap();
            assert_eq!(letter.at, 7);
            assert!(!letter.redrive);
            let back = revive(&letter).unwrap();
            assert_eq!(format!("{back:?}"), format!("{event:?}"));
        }
    }

    #[test]
    fn a_resend_has_the_same_fingerprint_and_another_mail_does_not() {
        let letter = set_aside(&mail("one"), 1, "x").unwrap();
        assert_eq!(
            resend_fingerprint(&mail("one")),
            Some(letter.fingerprint.clone())
        );
        assert_ne!(resend_fingerprint(&mail("two")), Some(letter.fingerprint));
        assert_eq!(resend_fingerprint(&Event::Tick), None);
        assert!(set_aside(&Event::Tick, 1, "x").is_none());
    }

    #[test]
    fn a_stanza_set_aside_is_answered_unless_it_is_an_error_or_result() {
        let chat: minidom::Element = "<message xmlns='jabber:component:accept' \
             from='bob@b.example/x' to='alice@reach.example' id='m1'><body>hi</body></message>"
            .parse()
            .unwrap();
        let answer = stanza_refusal(&Event::Stanza(chat.clone())).unwrap();
        assert_eq!(answer.attr("type"), Some("error"));
        assert_eq!(answer.attr("to"), Some("bob@b.example/x"));
        assert_eq!(answer.attr("id"), Some("m1"));
        let mut error = chat;
        error.set_attr(
            crate::xmpp::stanza::NONE,
            crate::xmpp::stanza::an("type"),
            "error",
        );
        assert!(stanza_refusal(&Event::Stanza(error)).is_none());
    }
}
