//! Text from outside XMPP that XML cannot carry: C0 controls, U+FFFE/U+FFFF, an HTML `&#1;`
//! turned into text, a form feed in an SMS. Through every door (an email reply, an SMS reply, an
//! SMS command, a code texted back), each case asserts that every stanza the core answers with
//! can be written ([`crate::xmpp::xml_text::to_xml`]) and that the buddy reads the text with only
//! the forbidden characters gone. Without [`super::clean_event`] these stanzas could not be
//! written, which once stopped Reach for everyone.

use crate::core::Transaction;
use minidom::Element;

use super::email::InboundMail;
use super::testing::*;
use super::{Action, Event};
use crate::core::model::Terminal;
use crate::email::extract::Reply;
use crate::sms::IncomingSms;
use crate::xmpp::stanza::STANZA_NS;
use crate::xmpp::xml_text::to_xml;

const ALICE: &str = "alice@example.org";
const BOB: &str = "bob@example.net";
const ALICE_MAIL: &str = "alice@mail.example.org";
const PHONE: &str = "+15551234567";

/// Texts as strangers can write them, and what the buddy reads.
const CASES: &[(&str, &str)] = &[
    ("yes\u{1} I am", "yes I am"),
    ("page one\u{C}page two", "page one\npage two"),
    ("\u{FFFE}odd\u{FFFF} ends", "odd ends"),
    (
        "nul\0 and bell\u{7} and esc\u{1B}[31m",
        "nul and bell and esc[31m",
    ),
    ("tab\tstays", "tab\tstays"),
];

fn alice_with(t: &Harness, email: &str, phone: &str) {
    t.run(&register_form(ALICE, "alice", email, phone));
    let mut user = t.store.tx().user(ALICE).unwrap().unwrap();
    user.email = user.email.map(|e| Terminal {
        verified: true,
        ..Terminal::unverified(e.address)
    });
    user.phone = user.phone.map(|p| Terminal {
        verified: true,
        ..Terminal::unverified(p.address)
    });
    t.store.tx().put_user(&user).unwrap();
}

fn bob_writes(t: &Harness) {
    t.run(&format!(
        "<message type='chat' id='m1' from='{BOB}/pc' to='alice@{D}'><body>hi</body></message>"
    ));
    t.advance(60);
}

/// Every stanza in `actions` can be written; returns the bodies sent to Bob.
fn written_bodies_to_bob(actions: &[Action]) -> Vec<String> {
    let mut bodies = Vec::new();
    for action in actions {
        if let Action::SendStanza(stanza) = action {
            let xml = to_xml(stanza).unwrap_or_else(|e| panic!("unwritable stanza: {e}"));
            let back: Element = xml.parse().unwrap();
            if back.attr("to") == Some(BOB) {
                if let Some(body) = back.get_child("body", STANZA_NS) {
                    bodies.push(body.text());
                }
            }
        }
    }
    bodies
}

fn sms(text: &str) -> Event {
    Event::SmsReceived(IncomingSms {
        from: PHONE.into(),
        to: "+15550000000".into(),
        text: text.into(),
        provider_id: None,
    })
}

#[test]
fn an_sms_reply_with_forbidden_characters_reaches_the_buddy_cleaned() {
    for (sent, read) in CASES {
        let t = Harness::new();
        alice_with(&t, "", PHONE);
        bob_writes(&t);
        t.actions(Event::Tick);
        let actions = t.actions(sms(sent));
        assert_eq!(written_bodies_to_bob(&actions), vec![*read], "{sent:?}");
    }
}

#[test]
fn an_sms_command_with_forbidden_characters_is_written_cleaned() {
    for (sent, read) in CASES {
        let t = Harness::new();
        alice_with(&t, "", PHONE);
        bob_writes(&t);
        t.actions(Event::Tick);
        let actions = t.actions(sms(&format!("/msg bob {sent}")));
        assert_eq!(written_bodies_to_bob(&actions), vec![*read], "{sent:?}");
        // The command's own answers and any notice are writable too (checked above for all).
        let actions = t.actions(sms(&format!("/st\u{1}atus{sent}")));
        written_bodies_to_bob(&actions);
    }
}

#[test]
fn an_email_reply_with_forbidden_characters_reaches_the_buddy_cleaned() {
    for (sent, read) in CASES {
        let t = Harness::new();
        alice_with(&t, ALICE_MAIL, "");
        bob_writes(&t);
        let jobs: Vec<_> = t
            .actions(Event::Tick)
            .into_iter()
            .filter_map(|a| match a {
                Action::SendEmail(job) => Some(job),
                _ => None,
            })
            .collect();
        let alias = jobs[0].email.from_address.clone();
        let actions = t.actions(Event::EmailReply(InboundMail {
            envelope_from: ALICE_MAIL.into(),
            rcpt: alias,
            reply: Reply {
                message_id: Some(format!("id\u{1}{sent}@mail.example.org")),
                from: Some(ALICE_MAIL.into()),
                subject: Some(format!("Re: IM {sent}")),
                in_reply_to: vec![format!("x\u{FFFF}@y")],
                references: vec![],
                text: (*sent).to_owned(),
                attachments: vec![format!("file\u{1}.txt")],
                automatic: None,
            },
        }));
        let answer = actions.iter().find_map(|a| match a {
            Action::AnswerMail(answer) => Some(answer.code),
            _ => None,
        });
        assert_eq!(answer, Some(250), "{sent:?}");
        let bodies = written_bodies_to_bob(&actions);
        assert_eq!(bodies.len(), 1, "{sent:?}");
        assert_eq!(bodies[0], *read, "{sent:?}");
    }
}

#[test]
fn without_cleaning_the_same_sms_would_make_an_unwritable_stanza() {
    // What `clean_event` prevents: the core copies the text into the stanza as it is.
    let t = Harness::new();
    alice_with(&t, "", PHONE);
    bob_writes(&t);
    t.actions(Event::Tick);
    let actions = t
        .core
        .handle_cleaned(&mut *t.store.tx(), t.now.get(), &sms("yes\u{1} I am"))
        .unwrap();
    let unwritable = actions
        .iter()
        .filter(|a| matches!(a, Action::SendStanza(s) if to_xml(s).is_err()))
        .count();
    assert_eq!(unwritable, 1);
}
