//! The sans-IO core: given the store, the time and one event, decide what Reach does.
//!
//! It never touches sockets, clocks or files of its own: adapters turn wire input into [`Event`]s
//! and carry out the returned [`Action`]s through the durable outbox. State lives in the store,
//! which the core reads and writes through typed operations; the caller flushes once per batch.
//!
//! Vocabulary: a *user* registered with Reach and owns a *reach address* `HANDLE@D`; a *buddy*
//! (or *peer*) is anyone who talks to a user; a *per-session JID* stands for one user–peer
//! conversation; a user's *resources* are their own XMPP clients.

mod commands;
mod disco;
mod presence;
mod registration;
mod relay;

use minidom::Element;

use crate::address::{classify_local, LocalTarget};
use crate::store::{Store, StoreError};
use crate::xmpp::stanza::{attr, error_reply, StanzaFault};

pub use presence::{best_presence, GlobalPresence};

/// Something that happened, as the core sees it.
#[derive(Debug)]
pub enum Event {
    /// The component link (re)connected: stale presence must be re-learnt.
    LinkUp,
    /// A well-formed stanza arrived from the XMPP server.
    Stanza(Element),
}

/// Something the core decided to do.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this stanza over the component link (through the durable outbox).
    SendStanza(Element),
}

/// The fixed facts the core decides with.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The component domain `D`.
    pub domain: String,
    /// Domains whose users may register.
    pub allowed_domains: Vec<String>,
}

/// The decision maker. Holds only settings; all state is in the store.
#[derive(Debug, Clone)]
pub struct Core {
    settings: Settings,
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
    pub fn new(settings: Settings) -> Core {
        Core { settings }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Handles one event. `now` is seconds since the Unix epoch. On a store error nothing should
    /// be acknowledged; the caller logs it and carries on with the next event.
    pub fn handle(&self, store: &Store, now: u64, event: Event) -> Result<Vec<Action>, StoreError> {
        let mut out = Out::default();
        match event {
            Event::LinkUp => presence::on_link_up(self, store, &mut out)?,
            Event::Stanza(stanza) => self.on_stanza(store, now, &stanza, &mut out)?,
        }
        Ok(out.actions)
    }

    fn on_stanza(
        &self,
        store: &Store,
        now: u64,
        stanza: &Element,
        out: &mut Out,
    ) -> Result<(), StoreError> {
        let type_ = attr(stanza, "type");
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
