//! The sans-IO core: given the store, the time and one event, decide what Reach does.
//!
//! It never touches sockets, clocks or files of its own: adapters turn wire input into [`Event`]s
//! and carry out the returned [`Action`]s through the durable outbox. State lives in the store,
//! which the core reads and writes in the caller's [`Transaction`] (typed operations over the
//! records of [`model`]); the caller commits once per batch.
//!
//! Vocabulary: a *user* registered with Reach and owns a *reach address* `HANDLE@D`; a *buddy*
//! (or *peer*) is anyone who talks to a user; a *per-session JID* stands for one user–peer
//! conversation; a user's *resources* are their own XMPP clients.

mod adhoc;
mod alerts;
mod commands;
pub mod dead_letter;
mod disco;
pub mod email;
mod forward;
mod integrated;
pub mod limits;
pub mod model;
mod presence;
mod registration;
mod relay;
pub mod rules;
mod settings;
pub mod sms;
pub mod transaction;

use std::sync::{Mutex, MutexGuard};

use minidom::Element;
use rand::rngs::StdRng;
use rand::SeedableRng;

use crate::address::{classify_local, LocalTarget};
use crate::xmpp::stanza::{attr, error_reply, StanzaFault};
use model::StoreError;
pub use transaction::Transaction;

pub use limits::Limits;
pub use presence::{best_presence, GlobalPresence};

/// Something that happened, as the core sees it.
#[derive(Debug)]
pub enum Event {
    /// The component link (re)connected: stale presence must be re-learnt.
    LinkUp,
    /// A well-formed stanza arrived from the XMPP server.
    Stanza(Element),
    /// Time passed: forwards whose delay is over are due.
    Tick,
    /// A reply arrived at the SMTP listener and was read.
    EmailReply(email::InboundMail),
    /// A text arrived from a phone.
    SmsReceived(crate::sms::IncomingSms),
    /// The SMS provider reported on an SMS.
    SmsDelivery(crate::sms::DeliveryReport),
    /// The SMS provider refused the queued SMS `seq` for good.
    SmsFailed {
        seq: u64,
        job: Box<crate::core::model::SmsJob>,
        reason: String,
    },
    /// The relay refused the queued email `seq` for good.
    EmailFailed {
        seq: u64,
        job: Box<crate::core::model::EmailJob>,
        reason: String,
    },
}

/// Something the core decided to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this stanza over the component link (through the durable outbox).
    SendStanza(Element),
    /// Send this email through the relay (through the durable email queue).
    SendEmail(Box<crate::core::model::EmailJob>),
    /// Answer the SMTP client that submitted an [`Event::EmailReply`].
    AnswerMail(email::SmtpAnswer),
    /// Send this SMS through the provider (through the durable SMS queue).
    SendSms(Box<crate::core::model::SmsJob>),
    /// Answer the provider's webhook call that brought an SMS event.
    AnswerWebhook(sms::WebhookAnswer),
    /// A forward fell due at once: feed [`Event::Tick`] at the end of this batch (committed with
    /// it) rather than on the next second.
    TickSoon,
    /// A message with a text was held for the user's XMPP client (no client and no terminal
    /// could take it): for the metrics, nothing to carry out.
    Held,
}

/// The fixed facts the core decides with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The component domain `D`.
    pub domain: String,
    /// Domains whose users may register.
    pub allowed_domains: Vec<String>,
    /// Seconds an away user has to read a message before it is forwarded.
    pub grace_delay_secs: u64,
    /// The email terminal, when configured.
    pub email: Option<email::EmailSettings>,
    /// The SMS terminal, when configured.
    pub sms: Option<sms::SmsSettings>,
    /// Reach's own limits on input and abuse (`[limits]`).
    pub limits: Limits,
    /// The server hosts whose users may be reached at their own JID (`[integrated] hosts`):
    /// copies of their messages are taken from these hosts only. Empty: integrated mode off.
    pub integrated_hosts: Vec<String>,
}

/// How long the Message-IDs of taken replies and the provider ids of taken texts are kept to
/// recognise a resend: far longer than any SMTP client (about 5 days) or SMS gateway retries.
pub const SEEN_IDS_KEPT_SECS: u64 = 30 * 24 * 3600;

/// The decision maker. Holds settings and a random source; all state is in the store.
#[derive(Debug)]
pub struct Core {
    settings: Settings,
    rng: Mutex<StdRng>,
}

/// What a handler produces: stanzas to send, in order.
#[derive(Default)]
pub(crate) struct Out {
    actions: Vec<Action>,
}

impl Out {
    pub(crate) fn send(&mut self, stanza: Element) {
        self.actions.push(Action::SendStanza(stanza));
    }

    pub(crate) fn push(&mut self, action: Action) {
        self.actions.push(action);
    }

    /// Asks for a clock tick at the end of this batch (once per event).
    pub(crate) fn tick_soon(&mut self) {
        if !self.actions.iter().any(|a| matches!(a, Action::TickSoon)) {
            self.actions.push(Action::TickSoon);
        }
    }
}

/// A parsed, validated view of a stanza's addresses.
pub(crate) struct Addressing {
    /// The full `from` as received.
    pub from: jid::Jid,
    /// The sender's bare JID as a string.
    pub from_bare: String,
    /// What the `to` JID at `D` stands for.
    pub target: LocalTarget,
}

impl Core {
    /// A core whose tokens and codes come from the operating system's randomness.
    pub fn new(settings: Settings) -> Core {
        Core {
            settings,
            rng: Mutex::new(StdRng::from_entropy()),
        }
    }

    /// A core with a fixed random sequence, for tests.
    pub fn with_seed(settings: Settings, seed: u64) -> Core {
        Core {
            settings,
            rng: Mutex::new(StdRng::seed_from_u64(seed)),
        }
    }

    pub(crate) fn rng(&self) -> MutexGuard<'_, StdRng> {
        self.rng
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// RCPT TO at the SMTP listener: is the recipient a live reply alias this sender may use?
    pub fn check_mail_recipient(
        &self,
        store: &mut dyn Transaction,
        now: u64,
        envelope_from: &str,
        rcpt: &str,
    ) -> Result<email::SmtpAnswer, StoreError> {
        email::check_recipient(self, store, now, envelope_from, rcpt)
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Handles one event in the caller's transaction. `now` is seconds since the Unix epoch. On
    /// a store error nothing should be acknowledged and the transaction (or the event's part of
    /// it) is rolled back; the caller logs it and carries on with the next event.
    pub fn handle(
        &self,
        store: &mut dyn Transaction,
        now: u64,
        mut event: Event,
    ) -> Result<Vec<Action>, StoreError> {
        clean_event(&mut event);
        self.handle_cleaned(store, now, &event)
    }

    /// [`Core::handle`] for an event that went through [`clean_event`] already; the caller keeps
    /// the event (to set it aside if handling it fails for good).
    pub fn handle_cleaned(
        &self,
        store: &mut dyn Transaction,
        now: u64,
        event: &Event,
    ) -> Result<Vec<Action>, StoreError> {
        let mut out = Out::default();
        match event {
            Event::LinkUp => {
                integrated::on_link_up(self, store, now)?;
                presence::on_link_up(self, store, now, &mut out)?
            }
            Event::Stanza(stanza) => self.on_stanza(store, now, stanza, &mut out)?,
            Event::Tick => {
                store.prune_counters(now)?;
                store.forget_seen_before(now.saturating_sub(SEEN_IDS_KEPT_SECS))?;
                presence::continue_walk(self, store, now, &mut out)?;
                forward::on_tick(self, store, now, &mut out)?;
                relay::continue_releases(store, now, &mut out)?;
                alerts::on_tick(self, store, now, &mut out)?;
            }
            Event::EmailReply(mail) => {
                let answer = email::on_reply(self, store, now, mail, &mut out)?;
                out.push(Action::AnswerMail(answer));
            }
            Event::SmsReceived(sms) => {
                let answer = sms::on_incoming(self, store, now, sms, &mut out)?;
                out.push(Action::AnswerWebhook(answer));
            }
            Event::SmsDelivery(report) => {
                let answer = sms::on_delivery(self, store, now, report, &mut out)?;
                out.push(Action::AnswerWebhook(answer));
            }
            Event::SmsFailed { seq, job, reason } => {
                store.remove_sms_job(*seq)?;
                sms::on_failed(self, store, now, job, reason, &mut out)?
            }
            Event::EmailFailed { seq, job, reason } => {
                store.remove_email_job(*seq)?;
                email::on_failed(self, store, now, job, reason, &mut out)?
            }
        }
        Ok(out.actions)
    }

    fn on_stanza(
        &self,
        store: &mut dyn Transaction,
        now: u64,
        stanza: &Element,
        out: &mut Out,
    ) -> Result<(), StoreError> {
        let type_ = attr(stanza, "type");
        // Reach's own bounds on what it takes, before anything is read or stored.
        if let Err(fault) = limits::check_stanza(&self.settings.limits, stanza) {
            tracing::info!(
                kind = stanza.name(),
                "stanza refused: {}",
                fault.text.as_deref().unwrap_or("")
            );
            if type_ != "error" && type_ != "result" && stanza.attr("from").is_some() {
                out.send(error_reply(stanza, &fault));
            }
            return Ok(());
        }
        let addressing = match self.addressing(stanza) {
            Ok(a) => a,
            Err(fault) => {
                if type_ != "error" && stanza.attr("from").is_some() {
                    out.send(error_reply(stanza, &fault));
                }
                return Ok(());
            }
        };
        let outcome = match stanza.name() {
            "iq" => disco::on_iq(self, store, now, stanza, &addressing, out),
            "message" => relay::on_message(self, store, now, stanza, &addressing, out),
            "presence" => presence::on_presence(self, store, now, stanza, &addressing, out),
            _ => Ok(()),
        };
        match outcome {
            Ok(()) => Ok(()),
            Err(Failure::Store(e)) => Err(e),
            Err(Failure::Fault(fault)) => {
                // Never answer an error with an error, nor a presence probe/result with one.
                if type_ != "error" && type_ != "result" {
                    out.send(error_reply(stanza, &fault));
                }
                Ok(())
            }
        }
    }

    fn addressing(&self, stanza: &Element) -> Result<Addressing, StanzaFault> {
        let from: jid::Jid = attr(stanza, "from").parse().map_err(|_| {
            StanzaFault::new(crate::xmpp::stanza::ErrorType::Modify, "jid-malformed")
        })?;
        let to: jid::Jid = attr(stanza, "to").parse().map_err(|_| {
            StanzaFault::new(crate::xmpp::stanza::ErrorType::Modify, "jid-malformed")
        })?;
        if to.domain().as_str() != self.settings.domain {
            return Err(StanzaFault::item_not_found(
                "this component only serves its own domain",
            ));
        }
        if from.to_bare().as_str().len() > limits::MAX_JID_BYTES {
            return Err(StanzaFault::new(
                crate::xmpp::stanza::ErrorType::Modify,
                "policy-violation",
            )
            .with_text(format!(
                "addresses longer than {} bytes are not served",
                limits::MAX_JID_BYTES
            )));
        }
        let target = classify_local(to.node().map(|n| n.as_str()));
        Ok(Addressing {
            from_bare: from.to_bare().to_string(),
            from,
            target,
        })
    }

    /// `HANDLE@D` for a handle.
    pub(crate) fn reach_address(&self, handle: &crate::address::Handle) -> String {
        format!("{}@{}", handle.as_str(), self.settings.domain)
    }

    /// The per-session JID of a peer.
    pub(crate) fn session_jid(&self, peer: &str) -> String {
        format!(
            "{}@{}",
            crate::address::escape_node(peer),
            self.settings.domain
        )
    }
}

/// Cleans the text that comes from outside XMPP (email replies, SMS, the reasons relays and
/// providers give) of characters XML 1.0 forbids: the one place where such text enters the
/// core's vocabulary, so that whatever the core builds from it can be serialised
/// ([`crate::xmpp::xml_text`]). Stanzas need nothing: the XML parser accepted them.
pub fn clean_event(event: &mut Event) {
    use crate::xmpp::xml_text::clean_in_place as clean;
    match event {
        Event::LinkUp | Event::Tick | Event::Stanza(_) => {}
        Event::EmailReply(mail) => {
            clean(&mut mail.envelope_from);
            clean(&mut mail.rcpt);
            let reply = &mut mail.reply;
            for text in [&mut reply.message_id, &mut reply.from, &mut reply.subject]
                .into_iter()
                .flatten()
            {
                clean(text);
            }
            reply
                .in_reply_to
                .iter_mut()
                .chain(reply.references.iter_mut())
                .chain(reply.attachments.iter_mut())
                .for_each(clean);
            clean(&mut reply.text);
            match &mut reply.automatic {
                Some(
                    crate::email::extract::Automatic::AutoSubmitted(v)
                    | crate::email::extract::Automatic::Precedence(v)
                    | crate::email::extract::Automatic::AutoResponder(v)
                    | crate::email::extract::Automatic::Report(v),
                ) => clean(v),
                Some(
                    crate::email::extract::Automatic::Bounce
                    | crate::email::extract::Automatic::MailerDaemon,
                )
                | None => {}
            }
        }
        Event::SmsReceived(sms) => {
            clean(&mut sms.from);
            clean(&mut sms.to);
            clean(&mut sms.text);
            if let Some(id) = &mut sms.provider_id {
                clean(id);
            }
        }
        Event::SmsDelivery(report) => {
            clean(&mut report.reference);
            if let crate::sms::DeliveryStatus::Failed(why) = &mut report.status {
                clean(why);
            }
        }
        Event::SmsFailed { reason, .. } | Event::EmailFailed { reason, .. } => clean(reason),
    }
}

/// Why a handler did not complete: a fault the sender should see, or a store failure.
pub(crate) enum Failure {
    Fault(StanzaFault),
    Store(StoreError),
}

impl From<StoreError> for Failure {
    fn from(e: StoreError) -> Self {
        Failure::Store(e)
    }
}

impl From<StanzaFault> for Failure {
    fn from(f: StanzaFault) -> Self {
        Failure::Fault(f)
    }
}

pub(crate) type Handled = Result<(), Failure>;

#[cfg(test)]
pub(crate) mod testing;

#[cfg(test)]
mod hostile;

#[cfg(test)]
mod hostile_text;

#[cfg(test)]
mod code_abuse;
