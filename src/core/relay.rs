//! Messages between buddies and users through reach addresses and per-session JIDs.
//!
//! A buddy's message to `HANDLE@D` reaches the user's own clients from the buddy's per-session
//! JID; what the user sends to that JID reaches the buddy from `HANDLE@D`. Everything in the
//! message passes through unchanged (body, thread, id, chat states, XEP-0184 receipts, XEP-0333
//! markers), so receipts and markers refer to the same ids on both sides. Where a buddy's message
//! with a text goes besides is the user's routing decision (`rules::decide`, applied by the
//! `forward` module). While the user has no available resource and no terminal takes a message,
//! it is held durably (with an XEP-0203 delay stamp) and released when a resource comes online;
//! bare chat states are not held, they mean nothing later.

use minidom::Element;

use crate::xmpp::stanza::an;
use crate::xmpp::xml_text::to_xml;
use xmpp_parsers::ns;

use super::rules::{Decision, ItemKind};
use super::{commands, forward, Action, Addressing, Core, Failure, Handled, Out};
use crate::address::LocalTarget;
use crate::core::model::{HeldMessage, PendingItem, StoreError, User};
use crate::core::Transaction;
use crate::xmpp::stanza::{
    attr, child_text, readdress, ErrorType, StanzaFault, CHAT_MARKERS, STANZA_NS,
};

/// XEP-0172 user nickname.
const NICK: &str = "http://jabber.org/protocol/nick";

pub(super) fn on_message(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    stanza: &Element,
    who: &Addressing,
    out: &mut Out,
) -> Handled {
    let type_ = attr(stanza, "type");
    if type_ == "groupchat" {
        return Err(StanzaFault::not_acceptable("Reach does not take groupchat messages").into());
    }
    if type_ != "error" {
        if let Some(body) = child_text(stanza, "body") {
            super::limits::check_body(&core.settings.limits, &body)?;
        }
    }
    match &who.target {
        // A server host (no local part): its privileges, or a copy (integrated mode).
        LocalTarget::Service if who.from.node().is_none() => {
            super::integrated::on_host_message(core, store, now, stanza, who, out)
        }
        LocalTarget::Service => {
            commands::on_chat(core, store, now, stanza, who, out)?;
            Ok(())
        }
        LocalTarget::User(handle) => {
            let Some(user) = store.user_by_handle(handle)? else {
                return Err(StanzaFault::item_not_found("no such reach address").into());
            };
            route_to_user(core, store, now, &user, who, stanza, Via::Reach, out)
        }
        LocalTarget::Session(peer) => {
            let Some(user) = store.user(&who.from_bare)? else {
                return Err(super::registration::registration_required().into());
            };
            let peer = peer.to_string();
            if has_content(stanza) {
                store.touch_session(&user.jid, &peer, now)?;
            }
            // Reading or answering in XMPP means nothing of this conversation needs forwarding.
            let read = stanza
                .children()
                .any(|c| c.is("displayed", CHAT_MARKERS) || c.is("body", STANZA_NS));
            if read {
                forward::cancel_pending(store, &user, &peer)?;
            }
            out.send(readdress(stanza, &core.reach_address(&user.handle), &peer));
            Ok(())
        }
        LocalTarget::Invalid => {
            Err(StanzaFault::item_not_found("no such address at this service").into())
        }
    }
}

/// How a buddy's message reaches the user.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Via {
    /// Sent to her reach address: Reach relays it to her XMPP clients (or holds it for them).
    Reach,
    /// Sent to her own JID (integrated mode): her server delivered it to her clients, or keeps
    /// it for them, and Reach sees a copy; only her terminals are left to Reach.
    Server,
}

/// A copy of a buddy's message to a user who is reached at her own JID (see
/// `super::integrated`): routed to her terminals as a message to her reach address would be.
pub(super) fn on_copied_message(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    who: &Addressing,
    stanza: &Element,
    out: &mut Out,
) -> Handled {
    route_to_user(core, store, now, user, who, stanza, Via::Server, out)
}

#[allow(clippy::too_many_arguments)]
fn route_to_user(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    who: &Addressing,
    stanza: &Element,
    via: Via,
    out: &mut Out,
) -> Handled {
    let peer = who.from_bare.as_str();
    // Through her server she has it on XMPP already, as the server delivered it.
    let on_server = via == Via::Server;
    let relayed = match via {
        Via::Reach => readdress(stanza, &core.session_jid(peer), &user.jid),
        Via::Server => stanza.clone(),
    };
    let content = has_content(stanza);
    let xmpp = forward::xmpp_state(store, user)?;
    let body = child_text(stanza, "body")
        .filter(|b| !b.trim().is_empty() && attr(stanza, "type") != "error");
    // Only messages with a text are routed to terminals; the rest follows XMPP alone.
    let decision = match &body {
        Some(_) => forward::decide(core, store, now, user, ItemKind::Message, peer, xmpp)?,
        None => Decision {
            to_xmpp: xmpp.is_available(),
            forward: None,
            hold_for_xmpp: !xmpp.is_available(),
        },
    };
    // What would be stored for later must fit the user's storage caps, checked before anything
    // is written: a refused message changes nothing.
    let waits = if decision.to_xmpp || !content || attr(stanza, "type") == "error" {
        None
    } else if body.is_some() && decision.forward.is_some() {
        Some(Wait::Pending)
    } else if on_server {
        // Her server keeps it for her clients.
        None
    } else {
        Some(Wait::Held)
    };
    if let Some(wait) = waits {
        check_room(core, store, user, who, wait)?;
    }
    if content {
        remember_conversation(store, now, user, peer, stanza)?;
    }
    let item = |stanza: &Element, on_xmpp: bool, text: String| -> Result<_, StoreError> {
        Ok(PendingItem {
            at: now,
            id: stanza.attr("id").map(str::to_owned),
            text,
            stanza: to_xml(stanza)?,
            on_xmpp,
            receipt: stanza.has_child("request", ns::RECEIPTS),
            terminal: None,
            due_at: None,
            unconditional: false,
        })
    };
    let pending_full = |store: &mut dyn Transaction| -> Result<bool, StoreError> {
        Ok(store.pending_count(&user.jid, peer)?
            >= core.settings.limits.pending_per_conversation as usize)
    };
    // While held messages are still being delivered a page at a time, a new one joins the end
    // of what is held, so the user reads them in order (the next tick delivers it).
    let behind_held = !on_server
        && decision.to_xmpp
        && decision.forward.is_none()
        && content
        && attr(stanza, "type") != "error"
        && store.held_release_running(&user.jid)?;
    if decision.to_xmpp && !behind_held {
        if let (Some(text), Some(to)) = (&body, decision.forward) {
            // Also to a terminal: at once for `Always`, else if still unread after the grace
            // delay. The message reached XMPP already: with the conversation's pending forward
            // full it goes there only (refusing it would lie to the buddy).
            if pending_full(store)? {
                tracing::info!(
                    handle = user.handle.as_str(),
                    "pending forward full: a message relayed to XMPP gets no second chance by {:?}",
                    to.terminal
                );
                if !on_server {
                    out.send(relayed);
                }
                return Ok(());
            }
            forward::queue(
                core,
                store,
                now,
                user,
                peer,
                item(&relayed, true, text.clone())?,
                to,
                out,
            )?;
        }
        if !on_server {
            out.send(relayed);
        }
    } else if on_server {
        // No client online: her server keeps it for them; a terminal may take it meanwhile.
        if let (Some(text), Some(to), true) = (body, decision.forward, content) {
            if attr(stanza, "type") != "error" {
                forward::queue(
                    core,
                    store,
                    now,
                    user,
                    peer,
                    item(&relayed, true, text)?,
                    to,
                    out,
                )?;
            }
        }
    } else if content && attr(stanza, "type") != "error" {
        let mut held = relayed;
        held.append_child(
            Element::builder("delay", ns::DELAY)
                .attr(an("from"), core.settings.domain.as_str())
                .attr(an("stamp"), iso8601(now))
                .build(),
        );
        let has_text = body.is_some();
        match (body, decision.forward) {
            (Some(text), Some(to)) => forward::queue(
                core,
                store,
                now,
                user,
                peer,
                item(&held, false, text)?,
                to,
                out,
            )?,
            _ => {
                // Nothing is dropped: no client and no terminal may take it now.
                store.hold(
                    &user.jid,
                    &HeldMessage {
                        peer: peer.to_owned(),
                        stanza: to_xml(&held).map_err(StoreError::from)?,
                        held_at: now,
                    },
                )?;
                if has_text {
                    out.push(Action::Held);
                }
                tracing::debug!(
                    handle = user.handle.as_str(),
                    "message held until the user is online"
                );
            }
        }
    }
    Ok(())
}

/// Where a buddy's message would wait for the user.
#[derive(Debug, Clone, Copy)]
enum Wait {
    /// Held for the user's XMPP clients.
    Held,
    /// In the conversation's pending forward (email or SMS).
    Pending,
}

/// Whether the user's storage caps leave room for one more message from this sender to wait
/// (`[limits]` `waiting_per_user`, `held_per_sender`, `pending_per_conversation`); else the
/// `resource-constraint` the buddy gets. Reads counts only. The user's own messages (to her own
/// reach address) and those of servers and services (JIDs without a localpart) always fit.
fn check_room(
    core: &Core,
    store: &mut dyn Transaction,
    user: &User,
    who: &Addressing,
    wait: Wait,
) -> Result<(), Failure> {
    if who.from_bare == user.jid || who.from.node().is_none() {
        return Ok(());
    }
    let limits = &core.settings.limits;
    let handle = user.handle.as_str();
    if store.waiting_count(&user.jid)? >= limits.waiting_per_user as usize {
        tracing::debug!(
            handle,
            "message refused: the user's waiting messages are at their cap"
        );
        return Err(storage_full(format!(
            "{handle} cannot take more messages now: too many are waiting to be read; try again later"
        )));
    }
    let sender_full = match wait {
        Wait::Held => {
            store.held_from(&user.jid, &who.from_bare)? >= limits.held_per_sender as usize
        }
        Wait::Pending => {
            store.pending_count(&user.jid, &who.from_bare)?
                >= limits.pending_per_conversation as usize
        }
    };
    if sender_full {
        tracing::debug!(
            handle,
            ?wait,
            "message refused: the sender's waiting messages are at their cap"
        );
        return Err(storage_full(format!(
            "{handle} cannot take more messages from you until the ones waiting are read; try again later"
        )));
    }
    Ok(())
}

fn storage_full(text: String) -> Failure {
    StanzaFault::new(ErrorType::Wait, "resource-constraint")
        .with_text(text)
        .into()
}

/// Records what other terminals need to join the conversation: its activity, XMPP thread and the
/// buddy's nick (XEP-0172).
fn remember_conversation(
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    peer: &str,
    stanza: &Element,
) -> Result<(), StoreError> {
    let mut session = store.touch_session(&user.jid, peer, now)?;
    if let Some(thread) = child_text(stanza, "thread").filter(|t| !t.is_empty()) {
        session.thread = Some(thread);
    }
    if let Some(nick) = stanza
        .get_child("nick", NICK)
        .map(|n| n.text())
        .filter(|n| !n.trim().is_empty())
    {
        session.peer_name = Some(nick);
    }
    store.put_session(&user.jid, &session)
}

/// Held messages delivered per batch when the user comes online: the rest follow a page per
/// clock tick (each page committed with its batch before the next is read).
pub(crate) const HELD_PAGE: usize = 100;

/// Delivers the oldest page of what is held for the user, oldest first; if more is held, the
/// next pages follow on the next ticks ([`continue_releases`]).
pub(super) fn release_held(
    store: &mut dyn Transaction,
    user: &User,
    _now: u64,
    out: &mut Out,
) -> Result<(), StoreError> {
    let page = store.take_held_page(&user.jid, HELD_PAGE)?;
    let delivered = page.len();
    for held in page {
        match held.stanza.parse::<Element>() {
            Ok(stanza) => out.send(stanza),
            Err(e) => tracing::error!(
                handle = user.handle.as_str(),
                "unreadable held message dropped: {e}"
            ),
        }
    }
    let left = store.held_count(&user.jid)?;
    if delivered > 0 {
        tracing::debug!(
            handle = user.handle.as_str(),
            "delivered {delivered} held messages, {left} still held"
        );
    }
    if left > 0 {
        store.mark_held_release(&user.jid)?;
    } else {
        store.end_held_release(&user.jid)?;
    }
    Ok(())
}

/// On a clock tick: the next page for every user whose held messages are being delivered, while
/// one of their XMPP clients is still available (else the rest stays held for the next time).
pub(super) fn continue_releases(
    store: &mut dyn Transaction,
    now: u64,
    out: &mut Out,
) -> Result<(), StoreError> {
    for jid in store.held_releases()? {
        // Another instance busy with the user delivers the page, or the next tick does.
        if !store.claim_user(&jid)? || !store.held_release_running(&jid)? {
            continue;
        }
        match store.user(&jid)? {
            Some(user) if forward::xmpp_state(store, &user)?.is_available() => {
                release_held(store, &user, now, out)?
            }
            _ => store.end_held_release(&jid)?,
        }
    }
    Ok(())
}

/// Whether a message carries something worth keeping: a body, a receipt or a marker (not just a
/// chat state).
fn has_content(stanza: &Element) -> bool {
    stanza.children().any(|c| {
        c.is("body", STANZA_NS)
            || c.is("subject", STANZA_NS)
            || c.ns() == ns::RECEIPTS
            || (c.ns() == CHAT_MARKERS && c.name() != "markable")
            || c.is("error", STANZA_NS)
    })
}

/// `YYYY-MM-DDThh:mm:ssZ` for seconds since the Unix epoch (XEP-0082).
pub(crate) fn iso8601(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (H. Hinnant's algorithm).
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::*;
    #[allow(unused_imports)]
    use crate::core::Transaction;

    const BOB: &str = "bob@example.net";

    fn online(t: &Harness) {
        t.run(&format!(
            "<presence from='alice@example.org/laptop' to='{D}'/>"
        ));
    }

    #[test]
    fn iso8601_formats_known_instants() {
        assert_eq!(iso8601(0), "1970-01-01T00:00:00Z");
        assert_eq!(iso8601(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(iso8601(1_795_000_000), "2026-11-18T11:06:40Z");
    }

    #[test]
    fn a_buddys_message_reaches_the_online_user_from_the_per_session_jid() {
        let t = Harness::new();
        t.register("alice@example.org", "alice");
        online(&t);
        let out = t.run(&format!(
            "<message type='chat' id='m1' from='{BOB}/phone' to='alice@{D}'><body>hi</body><thread>t1</thread>\
             <request xmlns='urn:xmpp:receipts'/><active xmlns='http://jabber.org/protocol/chatstates'/></message>"
        ));
        assert_eq!(out.len(), 1);
        let m = &out[0];
        assert_eq!(m.attr("from"), Some(&*format!("bob\\40example.net@{D}")));
        assert_eq!(m.attr("to"), Some("alice@example.org"));
        assert_eq!(m.attr("id"), Some("m1"));
        assert_eq!(m.get_child("body", STANZA_NS).unwrap().text(), "hi");
        assert_eq!(m.get_child("thread", STANZA_NS).unwrap().text(), "t1");
        assert!(m.has_child("request", ns::RECEIPTS));
        assert!(m.has_child("active", ns::CHATSTATES));
        assert!(t
            .store
            .tx()
            .session("alice@example.org", BOB)
            .unwrap()
            .is_some());
    }

    #[test]
    fn the_users_reply_and_receipt_reach_the_buddy_from_the_reach_address() {
        let t = Harness::new();
        t.register("alice@example.org", "alice");
        let out = t.run(&format!(
            "<message type='chat' id='r1' from='alice@example.org/laptop' to='bob\\40example.net@{D}'><body>yo</body></message>"
        ));
        assert_eq!(out[0].attr("from"), Some(&*format!("alice@{D}")));
        assert_eq!(out[0].attr("to"), Some(BOB));
        let out = t.run(&format!(
            "<message id='x' from='alice@example.org/laptop' to='bob\\40example.net@{D}'><received xmlns='urn:xmpp:receipts' id='m1'/></message>"
        ));
        assert_eq!(out[0].attr("to"), Some(BOB));
        assert_eq!(
            out[0]
                .get_child("received", ns::RECEIPTS)
                .unwrap()
                .attr("id"),
            Some("m1")
        );
        let out = t.run(&format!(
            "<message from='alice@example.org/laptop' to='bob\\40example.net@{D}'><displayed xmlns='{CHAT_MARKERS}' id='m1'/></message>"
        ));
        assert_eq!(
            out[0]
                .get_child("displayed", CHAT_MARKERS)
                .unwrap()
                .attr("id"),
            Some("m1")
        );
    }

    #[test]
    fn messages_for_an_offline_user_are_held_then_released_in_order() {
        let t = Harness::new();
        t.register("alice@example.org", "alice");
        for i in 0..3 {
            let out = t.run(&format!("<message type='chat' id='h{i}' from='{BOB}/x' to='alice@{D}'><body>{i}</body></message>"));
            assert!(out.is_empty());
        }
        // A bare chat state is not worth holding.
        t.run(&format!(
            "<message type='chat' from='{BOB}/x' to='alice@{D}'><composing xmlns='{}'/></message>",
            ns::CHATSTATES
        ));
        assert_eq!(t.store.tx().held_count("alice@example.org").unwrap(), 3);
        let out = t.run(&format!(
            "<presence from='alice@example.org/laptop' to='{D}'/>"
        ));
        let ids: Vec<_> = out
            .iter()
            .filter(|s| s.name() == "message")
            .map(|m| m.attr("id").unwrap())
            .collect();
        assert_eq!(ids, vec!["h0", "h1", "h2"]);
        assert!(out
            .iter()
            .filter(|s| s.name() == "message")
            .all(|m| m.has_child("delay", ns::DELAY)));
        assert_eq!(t.store.tx().held_count("alice@example.org").unwrap(), 0);
    }

    #[test]
    fn unknown_handles_and_unregistered_senders_get_errors() {
        let t = Harness::new();
        let reply = t.one(&format!(
            "<message type='chat' id='u' from='{BOB}/x' to='ghost@{D}'><body>x</body></message>"
        ));
        assert_error(&reply, "item-not-found");
        let reply = t.one(&format!("<message type='chat' id='v' from='{BOB}/x' to='carol\\40example.org@{D}'><body>x</body></message>"));
        assert_error(&reply, "registration-required");
        let reply = t.one(&format!("<message type='groupchat' id='w' from='{BOB}/x' to='alice@{D}'><body>x</body></message>"));
        assert_error(&reply, "not-acceptable");
        // Errors are never answered with errors.
        assert!(t
            .run(&format!(
                "<message type='error' id='e' from='{BOB}/x' to='ghost@{D}'/>"
            ))
            .is_empty());
    }

    const MALLORY: &str = "mallory@example.com";

    fn chat_from(t: &Harness, who: &str, id: &str) -> Vec<Element> {
        t.run(&format!(
            "<message type='chat' id='{id}' from='{who}/x' to='alice@{D}'><body>{id}</body></message>"
        ))
    }

    /// Sends and expects the storage-cap refusal with this text, and no change to Alice's state.
    fn refused_for_room(t: &Harness, who: &str, id: &str, text: &str) {
        let before = t.snapshot("alice@example.org");
        let out = chat_from(t, who, id);
        assert_eq!(
            out.len(),
            1,
            "{:?}",
            out.iter().map(String::from).collect::<Vec<_>>()
        );
        assert_error(&out[0], "resource-constraint");
        assert_eq!(
            out[0].get_child("error", STANZA_NS).unwrap().attr("type"),
            Some("wait")
        );
        assert_eq!(out[0].attr("to"), Some(&*format!("{who}/x")));
        assert_eq!(error_text(&out[0]), text);
        assert_eq!(t.snapshot("alice@example.org"), before);
    }

    fn small_caps() -> crate::core::Limits {
        crate::core::Limits {
            waiting_per_user: 5,
            held_per_sender: 3,
            pending_per_conversation: 2,
            ..crate::core::Limits::default()
        }
    }

    #[test]
    fn a_stranger_can_fill_only_its_share_and_other_buddies_still_get_through() {
        let t = Harness::with_limits(small_caps());
        t.register("alice@example.org", "alice");
        for i in 0..3 {
            assert!(chat_from(&t, MALLORY, &format!("s{i}")).is_empty());
        }
        let per_sender =
            "alice cannot take more messages from you until the ones waiting are read; try again later";
        refused_for_room(&t, MALLORY, "s3", per_sender);
        refused_for_room(&t, MALLORY, "s4", per_sender);
        assert_eq!(
            t.store
                .tx()
                .held_from("alice@example.org", MALLORY)
                .unwrap(),
            3
        );
        // Another buddy still reaches Alice during the flood, up to the cap for all senders.
        assert!(chat_from(&t, BOB, "b0").is_empty());
        assert!(chat_from(&t, BOB, "b1").is_empty());
        let per_user =
            "alice cannot take more messages now: too many are waiting to be read; try again later";
        refused_for_room(&t, "carol@example.net", "c0", per_user);
        // Alice's own messages and those of services are never refused.
        assert!(chat_from(&t, "alice@example.org", "self").is_empty());
        assert!(chat_from(&t, "example.net", "motd").is_empty());
        assert_eq!(t.store.tx().held_count("alice@example.org").unwrap(), 7);
        // She gets exactly what was held, in order; then the stranger may write again.
        let out = t.run("<presence from='alice@example.org/laptop' to='reach.example.org'/>");
        let ids: Vec<_> = out
            .iter()
            .filter(|s| s.name() == "message")
            .map(|m| m.attr("id").unwrap())
            .collect();
        assert_eq!(ids, vec!["s0", "s1", "s2", "b0", "b1", "self", "motd"]);
        assert_eq!(chat_from(&t, MALLORY, "s5").len(), 1, "relayed at once");
    }

    #[test]
    fn the_pending_forward_of_one_conversation_is_bounded() {
        let t = Harness::with_limits(small_caps());
        t.run(&register_form(
            "alice@example.org",
            "alice",
            "alice@mail.example.org",
            "",
        ));
        let mut user = t.store.tx().user("alice@example.org").unwrap().unwrap();
        user.email.as_mut().unwrap().verified = true;
        t.store.tx().put_user(&user).unwrap();
        assert!(chat_from(&t, MALLORY, "p0").is_empty());
        assert!(chat_from(&t, MALLORY, "p1").is_empty());
        assert_eq!(
            t.store
                .tx()
                .pending_count("alice@example.org", MALLORY)
                .unwrap(),
            2
        );
        refused_for_room(
            &t,
            MALLORY,
            "p2",
            "alice cannot take more messages from you until the ones waiting are read; try again later",
        );
        // Another conversation has its own room.
        assert!(chat_from(&t, BOB, "b0").is_empty());
        assert_eq!(
            t.store
                .tx()
                .pending_count("alice@example.org", BOB)
                .unwrap(),
            1
        );
        // Once the digest goes out, the stranger's conversation has room again.
        t.advance(30);
        t.event(crate::core::Event::Tick);
        assert_eq!(
            t.store
                .tx()
                .pending_count("alice@example.org", MALLORY)
                .unwrap(),
            0
        );
        assert!(chat_from(&t, MALLORY, "p3").is_empty());
    }

    #[test]
    fn many_held_messages_are_delivered_a_page_per_batch_in_order() {
        let t = Harness::with_limits(crate::core::Limits {
            held_per_sender: 1_000,
            ..crate::core::Limits::default()
        });
        t.register("alice@example.org", "alice");
        for i in 0..250 {
            chat_from(&t, MALLORY, &format!("h{i:03}"));
        }
        let ids = |out: Vec<Element>| -> Vec<String> {
            out.iter()
                .filter(|s| s.name() == "message")
                .map(|m| m.attr("id").unwrap().to_owned())
                .collect()
        };
        let mut got =
            ids(t.run("<presence from='alice@example.org/laptop' to='reach.example.org'/>"));
        assert_eq!(got.len(), HELD_PAGE);
        assert_eq!(t.store.tx().held_count("alice@example.org").unwrap(), 150);
        // A new message while pages wait goes after them, not ahead.
        assert!(chat_from(&t, BOB, "new").is_empty());
        let next = ids(t.event(crate::core::Event::Tick));
        assert_eq!(next.len(), HELD_PAGE);
        got.extend(next);
        // Offline again: the rest stays held, and comes when she is back.
        t.run(
            "<presence type='unavailable' from='alice@example.org/laptop' to='reach.example.org'/>",
        );
        assert!(ids(t.event(crate::core::Event::Tick)).is_empty());
        assert_eq!(t.store.tx().held_count("alice@example.org").unwrap(), 51);
        got.extend(ids(t.run(
            "<presence from='alice@example.org/phone' to='reach.example.org'/>",
        )));
        assert!(ids(t.event(crate::core::Event::Tick)).is_empty());
        let mut expected: Vec<String> = (0..250).map(|i| format!("h{i:03}")).collect();
        expected.push("new".into());
        assert_eq!(got, expected);
        // Once all are delivered, messages go straight to the client again.
        assert_eq!(chat_from(&t, BOB, "direct").len(), 1);
        assert_eq!(t.store.tx().held_count("alice@example.org").unwrap(), 0);
        assert!(t.store.tx().held_releases().unwrap().is_empty());
    }
}
