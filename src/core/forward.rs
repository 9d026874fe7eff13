//! Forwarding to terminals other than XMPP: which terminal takes a user's messages, and the
//! pending forwards that wait out the digest window or the grace delay.
//!
//! A message for a user with no XMPP client waits in the conversation's pending forward (the
//! digest window for email, no wait for SMS); for a user whose clients are all away it goes to
//! XMPP at once and waits the grace delay, cancelled when the user reads, replies or becomes
//! available. When a forward falls due, the chosen terminal's module turns it into outbound jobs.

use minidom::Element;

use super::{email, sms, Core, Out};
use crate::store::{Pending, PendingItem, Store, StoreError, User};

/// Where forwarded messages go.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Email,
    Sms,
}

/// The terminal that takes the user's forwarded messages now, if any: the verified email address
/// first, else the verified phone (until per-terminal preferences choose otherwise).
pub(super) fn route(core: &Core, user: &User) -> Option<Route> {
    if email::can_forward(core, user) {
        Some(Route::Email)
    } else if sms::can_forward(core, user) {
        Some(Route::Sms)
    } else {
        None
    }
}

/// Queues a message for the user's forwarding terminal; it joins the conversation's pending
/// forward. Returns false (and queues nothing) if no terminal takes forwards now.
pub(super) fn add_pending(
    core: &Core,
    store: &Store,
    now: u64,
    user: &User,
    peer: &str,
    item: PendingItem,
) -> Result<bool, StoreError> {
    let Some(route) = route(core, user) else {
        return Ok(false);
    };
    let delay = match (item.on_xmpp, route) {
        (true, _) => core.settings.grace_delay_secs,
        (false, Route::Email) => core
            .settings
            .email
            .as_ref()
            .map_or(0, |e| e.digest_window_secs),
        (false, Route::Sms) => 0,
    };
    let mut pending = store.pending_of(&user.jid, peer)?.unwrap_or(Pending {
        peer: peer.to_owned(),
        due_at: now + delay,
        items: Vec::new(),
    });
    pending.items.push(item);
    store.put_pending(&user.jid, &pending)?;
    Ok(true)
}

/// The user read or answered the conversation in XMPP: nothing of it needs forwarding any more.
pub(super) fn cancel_pending(store: &Store, user: &User, peer: &str) -> Result<(), StoreError> {
    if let Some(pending) = store.pending_of(&user.jid, peer)? {
        if pending.items.iter().all(|i| i.on_xmpp) {
            store.remove_pending(&user.jid, peer)?;
        }
    }
    Ok(())
}

/// The user has an XMPP client again: what waited for a forward and never reached XMPP is
/// delivered there now; if the user is attentive (not away), nothing is forwarded any more.
pub(super) fn on_user_back(
    store: &Store,
    user: &User,
    attentive: bool,
    out: &mut Out,
) -> Result<(), StoreError> {
    for mut pending in store.pending_for(&user.jid)? {
        for item in pending.items.iter_mut().filter(|i| !i.on_xmpp) {
            match item.stanza.parse::<Element>() {
                Ok(stanza) => out.send(stanza),
                Err(e) => tracing::error!("unreadable pending message dropped: {e}"),
            }
            item.on_xmpp = true;
        }
        if attentive {
            store.remove_pending(&user.jid, &pending.peer)?;
        } else {
            store.put_pending(&user.jid, &pending)?;
        }
    }
    Ok(())
}

/// Forwards every conversation whose delay is over to the terminal that takes it now.
pub(super) fn on_tick(
    core: &Core,
    store: &Store,
    now: u64,
    out: &mut Out,
) -> Result<(), StoreError> {
    for (jid, pending) in store.due_pending(now)? {
        store.remove_pending(&jid, &pending.peer)?;
        let Some(user) = store.user(&jid)? else {
            continue;
        };
        match route(core, &user) {
            Some(Route::Email) => out.push(super::Action::SendEmail(Box::new(email::forward_job(
                core, store, now, &user, pending,
            )?))),
            Some(Route::Sms) => sms::forward(core, store, now, &user, pending, out)?,
            None => hold_for_xmpp(store, now, &jid, &pending.peer, &pending.items)?,
        }
    }
    Ok(())
}

/// Keeps for the user's XMPP client what never reached it.
pub(super) fn hold_for_xmpp(
    store: &Store,
    now: u64,
    jid: &str,
    peer: &str,
    items: &[PendingItem],
) -> Result<(), StoreError> {
    for item in items.iter().filter(|i| !i.on_xmpp) {
        store.hold_stanza(jid, peer, &item.stanza, now)?;
    }
    Ok(())
}

/// The user has a forwarding terminal now: what was held for XMPP goes there the usual way
/// (messages with a text; receipts and markers stay held for XMPP).
pub(super) fn forward_held(
    core: &Core,
    store: &Store,
    now: u64,
    user: &User,
) -> Result<(), StoreError> {
    for held in store.take_held(&user.jid)? {
        let parsed = held.stanza.parse::<Element>().ok();
        let text = parsed
            .as_ref()
            .and_then(|s| crate::xmpp::stanza::child_text(s, "body"));
        let forwarded = match text {
            Some(text) => {
                let item = PendingItem {
                    at: held.held_at,
                    id: parsed
                        .as_ref()
                        .and_then(|s| s.attr("id"))
                        .map(str::to_owned),
                    text,
                    stanza: held.stanza.clone(),
                    on_xmpp: false,
                    receipt: parsed
                        .as_ref()
                        .is_some_and(|s| s.has_child("request", xmpp_parsers::ns::RECEIPTS)),
                };
                add_pending(core, store, now, user, &held.peer, item)?
            }
            None => false,
        };
        if !forwarded {
            store.hold(&user.jid, &held)?;
        }
    }
    Ok(())
}
