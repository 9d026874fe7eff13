//! Forwarding to terminals other than XMPP: the routing decision applied to the store, and the
//! pending forwards that wait out the digest window, the grace delay or quiet hours.
//!
//! [`rules::decide`] says where an item goes; this module gathers what it decides with (the
//! user's XMPP presence, terminals, counters, buddies) and carries the decision out. A forward
//! waits in the conversation's pending record, each item remembering its terminal and when it
//! is due: the digest window for email, the grace delay while the user's clients are away
//! (cancelled when the user reads, replies or becomes available), or the end of quiet hours.
//! When it falls due, the terminal is asked again whether it may still take it (else the next
//! best one, else the message waits for XMPP), and that terminal's module turns it into
//! outbound jobs. Nothing here sends anything itself.

use minidom::Element;

use super::rules::{self, Decision, ItemKind, Situation, TerminalView, XmppState};
use super::{email, sms, Core, Out};
use crate::core::model::{Pending, PendingItem, StoreError, TerminalKind, User};
use crate::core::Transaction;

/// The UTC day counters are kept by.
fn day(now: u64) -> u64 {
    now / 86_400
}

/// The user's XMPP state: the best of their own resources (terminals play no part in it).
pub(super) fn xmpp_state(
    store: &mut dyn Transaction,
    user: &User,
) -> Result<XmppState, StoreError> {
    let best = super::best_presence(&store.resources(&user.jid)?);
    Ok(if best.is_attentive() {
        XmppState::Attentive
    } else if best.is_available() {
        XmppState::Away
    } else {
        XmppState::Offline
    })
}

/// The user's terminals as the decision sees them, with today's counters.
pub(super) fn terminal_views<'u>(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &'u User,
) -> Result<Vec<TerminalView<'u>>, StoreError> {
    let mut views = Vec::new();
    if let Some(t) = &user.email {
        views.push(TerminalView {
            kind: TerminalKind::Email,
            usable: email::can_forward(core, user),
            state: t.state,
            prefs: &t.prefs,
            sent_today: store.email_count(&user.jid, day(now))?,
            cap: t.prefs.daily_cap.unwrap_or(u32::MAX),
        });
    }
    if let Some(t) = &user.phone {
        // The service's cap is an abuse limit: a user's own cap may only be lower.
        let service_cap = core.settings.sms.as_ref().map_or(0, |s| s.daily_cap);
        views.push(TerminalView {
            kind: TerminalKind::Phone,
            usable: sms::can_forward(core, user),
            state: t.state,
            prefs: &t.prefs,
            sent_today: store.sms_count(&user.jid, day(now))?,
            cap: t
                .prefs
                .daily_cap
                .map_or(service_cap, |c| c.min(service_cap)),
        });
    }
    Ok(views)
}

/// Whether the sender receives the reach address's presence (a buddy in its roster).
pub(super) fn is_buddy(
    store: &mut dyn Transaction,
    user: &User,
    sender: &str,
) -> Result<bool, StoreError> {
    Ok(store
        .buddy(&user.handle, sender)?
        .is_some_and(|b| b.receives_presence))
}

/// Where an item from `sender` goes now, given the user's XMPP state.
pub(super) fn decide(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    item: ItemKind,
    sender: &str,
    xmpp: XmppState,
) -> Result<Decision, StoreError> {
    let terminals = terminal_views(core, store, now, user)?;
    let situation = Situation {
        item,
        sender,
        sender_is_buddy: is_buddy(store, user, sender)?,
        xmpp,
        terminals: &terminals,
        primary: user.primary,
        now,
        time_zone: user.time_zone.as_deref(),
        service_grace_secs: core.settings.grace_delay_secs,
    };
    Ok(rules::decide(&situation))
}

/// Queues a message for the terminal the decision chose: it joins the conversation's pending
/// forward. An email waits at least the digest window; items for the same terminal in one
/// conversation go together, at the earliest of their times. An item due at once (no digest
/// window, no grace delay, no quiet hours) asks for a clock tick at the end of its batch, so it
/// leaves within milliseconds instead of on the next second's tick (and the messages of one
/// batch still go together).
#[allow(clippy::too_many_arguments)]
pub(super) fn queue(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    peer: &str,
    mut item: PendingItem,
    forward: rules::Forward,
    out: &mut Out,
) -> Result<(), StoreError> {
    let digest = match forward.terminal {
        TerminalKind::Email => core
            .settings
            .email
            .as_ref()
            .map_or(0, |e| e.digest_window_secs),
        TerminalKind::Phone => 0,
    };
    item.terminal = Some(forward.terminal);
    let due_at = forward.not_before.max(now + digest);
    item.due_at = Some(due_at);
    item.unconditional = forward.unconditional;
    requeue(store, &user.jid, peer, vec![item])?;
    if due_at <= now {
        out.tick_soon();
    }
    Ok(())
}

/// Adds items (each with its terminal and due time) to the conversation's pending forward; each
/// joins the batch of its terminal, which goes at the earliest of their times. Costs the same
/// however many items already wait (the store keeps one key per item).
fn requeue(
    store: &mut dyn Transaction,
    jid: &str,
    peer: &str,
    items: Vec<PendingItem>,
) -> Result<(), StoreError> {
    for item in items {
        store.add_pending(jid, peer, &item)?;
    }
    Ok(())
}

/// Gives every item its own due time (records from before per-item times have only one).
fn normalised(mut pending: Pending) -> Pending {
    for item in &mut pending.items {
        item.due_at.get_or_insert(pending.due_at);
    }
    pending
}

/// Stores the pending forward, or removes it when nothing is left in it.
fn put_or_remove(
    store: &mut dyn Transaction,
    jid: &str,
    mut pending: Pending,
) -> Result<(), StoreError> {
    if pending.items.is_empty() {
        return store.remove_pending(jid, &pending.peer);
    }
    pending.due_at = pending
        .items
        .iter()
        .filter_map(|i| i.due_at)
        .min()
        .unwrap_or(pending.due_at);
    store.put_pending(jid, &pending)
}

/// The user read or answered the conversation in XMPP: what waited out the grace delay needs no
/// forward any more (forwards to `Always` terminals stay).
pub(super) fn cancel_pending(
    store: &mut dyn Transaction,
    user: &User,
    peer: &str,
) -> Result<(), StoreError> {
    if let Some(mut pending) = store.pending_of(&user.jid, peer)? {
        let before = pending.items.len();
        pending.items.retain(|i| !i.on_xmpp || i.unconditional);
        if pending.items.len() != before {
            put_or_remove(store, &user.jid, normalised(pending))?;
        }
    }
    Ok(())
}

/// The user has an XMPP client again: what waited for a forward and never reached XMPP is
/// delivered there now; if the user is attentive (not away), only forwards to `Always`
/// terminals remain.
pub(super) fn on_user_back(
    store: &mut dyn Transaction,
    user: &User,
    attentive: bool,
    out: &mut Out,
) -> Result<(), StoreError> {
    for pending in store.pending_for(&user.jid)? {
        let mut pending = normalised(pending);
        for item in pending.items.iter_mut().filter(|i| !i.on_xmpp) {
            match item.stanza.parse::<Element>() {
                Ok(stanza) => out.send(stanza),
                Err(e) => tracing::error!("unreadable pending message dropped: {e}"),
            }
            item.on_xmpp = true;
        }
        if attentive {
            pending.items.retain(|i| i.unconditional);
        }
        put_or_remove(store, &user.jid, pending)?;
    }
    Ok(())
}

/// Forwards every pending item whose time has come, to the terminal that may take it now.
pub(super) fn on_tick(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    out: &mut Out,
) -> Result<(), StoreError> {
    for (jid, pending) in store.due_pending(now)? {
        deliver_due(core, store, now, &jid, pending, out)?;
    }
    Ok(())
}

/// Sends what is due of one conversation's pending forward; the rest stays pending.
fn deliver_due(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    jid: &str,
    pending: Pending,
    out: &mut Out,
) -> Result<(), StoreError> {
    {
        let pending = normalised(pending);
        let peer = pending.peer.clone();
        let (due, later): (Vec<PendingItem>, Vec<PendingItem>) = pending
            .items
            .into_iter()
            .partition(|i| i.due_at.is_some_and(|d| d <= now));
        put_or_remove(
            store,
            jid,
            Pending {
                peer: peer.clone(),
                due_at: pending.due_at,
                items: later,
            },
        )?;
        let Some(user) = store.user(jid)? else {
            return store.remove_pending(jid, &peer);
        };
        // One batch per planned terminal, in the order the items arrived.
        let mut batches: Vec<(Option<TerminalKind>, Vec<PendingItem>)> = Vec::new();
        for item in due {
            match batches.iter_mut().find(|(t, _)| *t == item.terminal) {
                Some((_, items)) => items.push(item),
                None => batches.push((item.terminal, vec![item])),
            }
        }
        for (planned, items) in batches {
            deliver(core, store, now, &user, &peer, planned, items, out)?;
        }
    }
    Ok(())
}

/// Sends due items to the planned terminal if it may still take them, else to the next best
/// one; what no terminal may take waits for XMPP. Each terminal is tried once, so nothing goes
/// twice to the same terminal.
#[allow(clippy::too_many_arguments)]
fn deliver(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    peer: &str,
    mut planned: Option<TerminalKind>,
    mut items: Vec<PendingItem>,
    out: &mut Out,
) -> Result<(), StoreError> {
    let xmpp = xmpp_state(store, user)?;
    let sender_is_buddy = is_buddy(store, user, peer)?;
    let mut tried: Vec<TerminalKind> = Vec::new();
    while !items.is_empty() {
        let terminals: Vec<TerminalView> = terminal_views(core, store, now, user)?
            .into_iter()
            .filter(|t| !tried.contains(&t.kind))
            .collect();
        let situation = Situation {
            item: ItemKind::Message,
            sender: peer,
            sender_is_buddy,
            xmpp,
            terminals: &terminals,
            primary: user.primary,
            now,
            time_zone: user.time_zone.as_deref(),
            service_grace_secs: core.settings.grace_delay_secs,
        };
        let Some(forward) = rules::recheck(&situation, planned) else {
            return hold_for_xmpp(store, now, &user.jid, peer, &items);
        };
        if forward.not_before > now {
            // Quiet hours: the items wait for their end.
            for item in &mut items {
                item.terminal = Some(forward.terminal);
                item.due_at = Some(forward.not_before);
            }
            return requeue(store, &user.jid, peer, items);
        }
        if forward.terminal == TerminalKind::Email && email_limit_reached(core, store, now, user)? {
            // The hourly email limit: the items wait in their pending forward for the next hour
            // (and reach XMPP meanwhile if a client comes back). Nothing is dropped.
            let next = super::limits::next_window(now, super::limits::HOUR);
            for item in &mut items {
                item.terminal = Some(TerminalKind::Email);
                item.due_at = Some(next);
            }
            tracing::info!(
                handle = user.handle.as_str(),
                "hourly email limit reached; the forward waits for the next hour"
            );
            return requeue(store, &user.jid, peer, items);
        }
        tried.push(forward.terminal);
        if forward.terminal == TerminalKind::Email {
            return email_digests(core, store, now, user, peer, items, out);
        }
        // Each SMS counts towards the phone's daily cap.
        let room = terminals
            .iter()
            .find(|t| t.kind == forward.terminal)
            .map_or(0, |t| t.cap.saturating_sub(t.sent_today)) as usize;
        let rest = items.split_off(room.min(items.len()));
        let batch = Pending {
            peer: peer.to_owned(),
            due_at: now,
            items: std::mem::replace(&mut items, rest),
        };
        sms::forward(core, store, now, user, batch, out)?;
        planned = None;
    }
    Ok(())
}

/// Sends due items by email: as many emails of the conversation's thread as the digest size
/// needs (`[limits]` `digest_max_items`, `digest_max_chars`), each counted towards the hourly
/// email limit; what that limit stops waits for the next hour. Nothing is dropped.
fn email_digests(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    peer: &str,
    mut items: Vec<PendingItem>,
    out: &mut Out,
) -> Result<(), StoreError> {
    while !items.is_empty() {
        if email_limit_reached(core, store, now, user)? {
            let next = super::limits::next_window(now, super::limits::HOUR);
            for item in &mut items {
                item.terminal = Some(TerminalKind::Email);
                item.due_at = Some(next);
            }
            tracing::info!(
                handle = user.handle.as_str(),
                "hourly email limit reached; the rest of the forward waits for the next hour"
            );
            return requeue(store, &user.jid, peer, items);
        }
        let later = items.split_off(digest_len(&core.settings.limits, &items));
        let batch = Pending {
            peer: peer.to_owned(),
            due_at: now,
            items: std::mem::replace(&mut items, later),
        };
        store.count_email(&user.jid, day(now))?;
        store.bump_counter(
            super::limits::counter::EMAILS,
            &user.jid,
            super::limits::HOUR,
            now,
        )?;
        if let Some(job) = email::forward_job(core, store, now, user, batch)? {
            out.push(super::Action::SendEmail(Box::new(job)));
        }
    }
    Ok(())
}

/// How many of the first items one email carries: at most `digest_max_items`, and no more
/// text than `digest_max_chars` characters (but always at least one item).
fn digest_len(limits: &super::Limits, items: &[PendingItem]) -> usize {
    let mut chars = 0usize;
    let mut n = 0usize;
    for item in items.iter().take(limits.digest_max_items.max(1) as usize) {
        chars += item.text.chars().count();
        if n > 0 && chars > limits.digest_max_chars as usize {
            break;
        }
        n += 1;
    }
    n.max(1).min(items.len())
}

/// Whether the user got `emails_per_user_per_hour` forwarding emails this hour already.
fn email_limit_reached(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
) -> Result<bool, StoreError> {
    let sent = store.counter(
        super::limits::counter::EMAILS,
        &user.jid,
        super::limits::HOUR,
        now,
    )?;
    Ok(sent >= core.settings.limits.emails_per_user_per_hour)
}

/// Keeps for the user's XMPP client what never reached it.
pub(super) fn hold_for_xmpp(
    store: &mut dyn Transaction,
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

/// The user has a forwarding terminal now (one was just verified while the user has no XMPP
/// client): what was held for XMPP is decided again, and goes to a terminal if one may take it
/// (messages with a text; receipts and markers stay held for XMPP).
pub(super) fn forward_held(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    out: &mut Out,
) -> Result<(), StoreError> {
    let xmpp = xmpp_state(store, user)?;
    // A page at a time; what stays held goes back behind the rest, so exactly the messages held
    // now are looked at, once each, in order.
    let mut left = store.held_count(&user.jid)?;
    while left > 0 {
        let page = store.take_held_page(&user.jid, left.min(super::relay::HELD_PAGE))?;
        if page.is_empty() {
            break;
        }
        left -= page.len();
        for held in page {
            decide_held(core, store, now, user, xmpp, held, out)?;
        }
    }
    Ok(())
}

/// One message taken from what is held: to a terminal if one may take it now, else held again.
fn decide_held(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    xmpp: XmppState,
    held: crate::core::model::HeldMessage,
    out: &mut Out,
) -> Result<(), StoreError> {
    let parsed = held.stanza.parse::<Element>().ok();
    let text = parsed
        .as_ref()
        .and_then(|s| crate::xmpp::stanza::child_text(s, "body"));
    let forward = match text {
        Some(_) => decide(core, store, now, user, ItemKind::Message, &held.peer, xmpp)?.forward,
        None => None,
    };
    match (text, forward) {
        (Some(text), Some(forward)) => {
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
                terminal: None,
                due_at: None,
                unconditional: false,
            };
            queue(core, store, now, user, &held.peer, item, forward, out)?;
        }
        _ => store.hold(&user.jid, &held)?,
    }
    Ok(())
}

/// A terminal could not take these messages for good: they wait for the user's XMPP client, and
/// the buddy hears (as an error on each message that had an id) that they did not go out `by`.
#[allow(clippy::too_many_arguments)]
pub(super) fn undelivered(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    peer: &str,
    items: &[PendingItem],
    by: &str,
    out: &mut Out,
) -> Result<(), StoreError> {
    use crate::xmpp::stanza::{an, stanza, ErrorType, StanzaFault, NONE};
    hold_for_xmpp(store, now, &user.jid, peer, items)?;
    let address = core.reach_address(&user.handle);
    for id in items.iter().filter_map(|i| i.id.as_ref()) {
        let mut notice = stanza("message", &address, peer);
        notice.set_attr(NONE, an("id"), id.as_str());
        notice.set_attr(NONE, an("type"), "error");
        let fault = StanzaFault::new(ErrorType::Wait, "recipient-unavailable").with_text(format!(
            "This message could not be delivered by {by}; it waits for {} to come back to XMPP.",
            user.handle.as_str()
        ));
        notice.append_child(fault.to_element());
        super::integrated::send_as_user(core, store, user, notice, out)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::{EmailJob, LocalState, SmsJob};
    use crate::core::rules::{ForwardWhen, Preferences, QuietAction, QuietHours, SenderFilter};
    use crate::core::testing::*;
    #[allow(unused_imports)]
    use crate::core::Transaction;
    use crate::core::{Action, Event};

    const ALICE: &str = "alice@example.org";
    const BOB: &str = "bob@example.net";
    const CAROL: &str = "carol@example.net";

    /// Alice with a verified email address and a verified phone, each with these preferences.
    fn alice(t: &Harness, email: Preferences, phone: Preferences, primary: Option<TerminalKind>) {
        t.run(&register_form(
            ALICE,
            "alice",
            "alice@mail.example.org",
            "+15551234567",
        ));
        let mut user = t.store.tx().user(ALICE).unwrap().unwrap();
        let e = user.email.as_mut().unwrap();
        e.verified = true;
        e.prefs = email;
        let p = user.phone.as_mut().unwrap();
        p.verified = true;
        p.prefs = phone;
        user.primary = primary;
        t.store.tx().put_user(&user).unwrap();
    }

    fn change(t: &Harness, f: impl FnOnce(&mut User)) {
        let mut user = t.store.tx().user(ALICE).unwrap().unwrap();
        f(&mut user);
        t.store.tx().put_user(&user).unwrap();
    }

    fn from(t: &Harness, who: &str, id: &str) -> Vec<Element> {
        t.run(&format!(
            "<message type='chat' id='{id}' from='{who}/x' to='alice@{D}'><body>text {id}</body></message>"
        ))
    }

    fn online(t: &Harness) {
        t.run(&format!("<presence from='{ALICE}/laptop' to='{D}'/>"));
    }

    /// What a tick forwards: (emails, texts), leaving out notices such as the state prompt.
    fn tick(t: &Harness) -> (Vec<EmailJob>, Vec<SmsJob>) {
        let mut emails = Vec::new();
        let mut texts = Vec::new();
        for action in t.actions(Event::Tick) {
            match action {
                Action::SendEmail(job) => emails.push(*job),
                Action::SendSms(job) if job.peer.is_some() => texts.push(*job),
                _ => {}
            }
        }
        (emails, texts)
    }

    fn never() -> Preferences {
        Preferences {
            when: ForwardWhen::Never,
            ..Preferences::default()
        }
    }

    fn quiet_now(action: QuietAction) -> Preferences {
        // The harness's clock says 11:06:40 UTC: these end at 12:00, 3200 s later.
        Preferences {
            quiet_hours: Some(QuietHours {
                start_minute: 11 * 60,
                end_minute: 12 * 60,
                time_zone: "UTC".into(),
                action,
            }),
            ..Preferences::default()
        }
    }

    #[test]
    fn by_default_email_comes_first() {
        let t = Harness::new();
        alice(&t, Preferences::default(), Preferences::default(), None);
        from(&t, BOB, "m1");
        assert_eq!(tick(&t), (vec![], vec![]), "the digest window");
        t.advance(30);
        let (emails, texts) = tick(&t);
        assert_eq!((emails.len(), texts.len()), (1, 0));
        assert_eq!(tick(&t), (vec![], vec![]), "nothing is forwarded twice");
    }

    #[test]
    fn a_forward_due_at_once_asks_for_a_tick_right_away() {
        let asks = |t: &Harness, id: &str| {
            t.actions(Event::Stanza(
                format!(
                    "<message xmlns='jabber:component:accept' type='chat' id='{id}' from='{BOB}/x' to='alice@{D}'><body>b</body></message>"
                )
                .parse()
                .unwrap(),
            ))
            .iter()
            .filter(|a| matches!(a, Action::TickSoon))
            .count()
        };
        // The phone takes forwards at once: one request per event.
        let t = Harness::new();
        alice(&t, never(), Preferences::default(), None);
        assert_eq!(asks(&t, "p1"), 1);
        // An email waits for its digest window: no early tick.
        let t = Harness::new();
        alice(&t, Preferences::default(), Preferences::default(), None);
        assert_eq!(asks(&t, "e1"), 0);
    }

    #[test]
    fn an_email_set_to_never_leaves_the_messages_to_the_phone() {
        let t = Harness::new();
        alice(&t, never(), Preferences::default(), None);
        from(&t, BOB, "m1");
        let (emails, texts) = tick(&t);
        assert!(emails.is_empty());
        assert_eq!(texts.len(), 1);
        assert!(texts[0].text.contains("text m1"), "{}", texts[0].text);
    }

    #[test]
    fn the_primary_phone_goes_before_the_email() {
        let t = Harness::new();
        alice(
            &t,
            Preferences::default(),
            Preferences::default(),
            Some(TerminalKind::Phone),
        );
        from(&t, BOB, "m1");
        let (emails, texts) = tick(&t);
        assert!(emails.is_empty());
        assert_eq!(texts[0].peer.as_deref(), Some(BOB));
    }

    #[test]
    fn buddies_only_refuses_a_stranger_who_waits_for_xmpp() {
        let t = Harness::new();
        let buddies = Preferences {
            senders: SenderFilter::Buddies,
            ..Preferences::default()
        };
        alice(&t, never(), buddies, None);
        t.run(&format!(
            "<presence type='subscribe' from='{BOB}' to='alice@{D}'/>"
        ));
        from(&t, CAROL, "c1");
        from(&t, BOB, "b1");
        let (_, texts) = tick(&t);
        assert_eq!(texts.len(), 1);
        assert_eq!(texts[0].peer.as_deref(), Some(BOB));
        assert_eq!(t.store.tx().held_count(ALICE).unwrap(), 1);
        let back = t.run(&format!("<presence from='{ALICE}/laptop' to='{D}'/>"));
        assert!(back.iter().any(|s| s.attr("id") == Some("c1")));
    }

    #[test]
    fn always_forwards_while_the_user_is_at_xmpp_too_even_once_read() {
        let t = Harness::new();
        let always = Preferences {
            when: ForwardWhen::Always,
            ..Preferences::default()
        };
        alice(&t, always, Preferences::default(), None);
        online(&t);
        let out = from(&t, BOB, "m1");
        assert_eq!(out.len(), 1, "on XMPP at once");
        t.run(&format!(
            "<message from='{ALICE}/laptop' to='bob\\40example.net@{D}'><displayed xmlns='urn:xmpp:chat-markers:0' id='m1'/></message>"
        ));
        t.advance(30);
        let (emails, texts) = tick(&t);
        assert_eq!(emails.len(), 1);
        assert_eq!(emails[0].email.paragraphs, vec!["text m1"]);
        assert!(texts.is_empty());
        assert_eq!(tick(&t), (vec![], vec![]));
    }

    #[test]
    fn quiet_hours_hold_a_text_until_they_end() {
        let t = Harness::new();
        alice(&t, never(), quiet_now(QuietAction::Hold), None);
        from(&t, BOB, "m1");
        assert_eq!(tick(&t), (vec![], vec![]));
        t.advance(3_199);
        assert_eq!(tick(&t), (vec![], vec![]));
        t.advance(1);
        let (_, texts) = tick(&t);
        assert_eq!(texts.len(), 1);
        assert!(texts[0].text.contains("text m1"));
        assert_eq!(t.store.tx().held_count(ALICE).unwrap(), 0);
    }

    #[test]
    fn quiet_hours_end_early_for_a_user_back_at_xmpp() {
        let t = Harness::new();
        alice(&t, never(), quiet_now(QuietAction::Hold), None);
        from(&t, BOB, "m1");
        t.advance(600);
        let out = t.run(&format!("<presence from='{ALICE}/laptop' to='{D}'/>"));
        assert!(out.iter().any(|s| s.attr("id") == Some("m1")));
        t.advance(3_000);
        assert_eq!(tick(&t), (vec![], vec![]));
    }

    #[test]
    fn quiet_hours_with_the_email_action_send_an_email_instead() {
        let t = Harness::new();
        alice(
            &t,
            Preferences::default(),
            quiet_now(QuietAction::Email),
            Some(TerminalKind::Phone),
        );
        from(&t, BOB, "m1");
        t.advance(30);
        let (emails, texts) = tick(&t);
        assert!(texts.is_empty());
        assert_eq!(emails[0].email.paragraphs, vec!["text m1"]);
    }

    #[test]
    fn a_terminal_that_can_no_longer_take_a_due_forward_passes_it_on() {
        let t = Harness::new();
        alice(&t, Preferences::default(), Preferences::default(), None);
        from(&t, BOB, "m1");
        // Do not disturb on the email before the digest window closes: the phone takes it.
        change(&t, |u| u.email.as_mut().unwrap().state = LocalState::Dnd);
        t.advance(30);
        let (emails, texts) = tick(&t);
        assert!(emails.is_empty());
        assert_eq!(texts.len(), 1);
        // Queued for the phone, which says STOP before it goes: it waits for XMPP.
        from(&t, BOB, "m2");
        change(&t, |u| u.phone.as_mut().unwrap().stopped = true);
        assert_eq!(tick(&t), (vec![], vec![]));
        assert_eq!(t.store.tx().held_count(ALICE).unwrap(), 1);
        assert!(t.store.tx().pending_for(ALICE).unwrap().is_empty());
    }

    #[test]
    fn an_email_cap_passes_further_messages_to_the_phone() {
        let t = Harness::new();
        let one_a_day = Preferences {
            daily_cap: Some(1),
            ..Preferences::default()
        };
        alice(&t, one_a_day, Preferences::default(), None);
        from(&t, BOB, "b1");
        t.advance(30);
        assert_eq!(tick(&t).0.len(), 1);
        from(&t, CAROL, "c1");
        let (emails, texts) = tick(&t);
        assert!(emails.is_empty());
        assert_eq!(texts[0].peer.as_deref(), Some(CAROL));
        assert_eq!(
            t.store
                .tx()
                .email_count(ALICE, t.now.get() / 86_400)
                .unwrap(),
            1
        );
    }

    #[test]
    fn a_pending_forward_stored_before_per_item_terminals_still_goes_out() {
        let t = Harness::new();
        alice(&t, Preferences::default(), Preferences::default(), None);
        // The record as the previous version wrote it: no terminal, no per-item time.
        let legacy = serde_json::json!({
            "peer": BOB,
            "due_at": t.now.get(),
            "items": [{"at": t.now.get(), "id": "old", "text": "from before",
                       "stanza": "<message xmlns='jabber:client'/>", "on_xmpp": false}]
        });
        let pending: Pending = serde_json::from_value(legacy).unwrap();
        t.store.tx().put_pending(ALICE, &pending).unwrap();
        let (emails, _) = tick(&t);
        assert_eq!(emails[0].email.paragraphs, vec!["from before"]);
    }

    #[test]
    fn a_long_digest_is_split_over_emails_of_the_same_thread_and_nothing_is_dropped() {
        let t = Harness::with_limits(crate::core::Limits {
            digest_max_items: 3,
            emails_per_user_per_hour: 2,
            ..crate::core::Limits::default()
        });
        alice(&t, Preferences::default(), never(), None);
        for i in 0..7 {
            from(&t, BOB, &format!("m{i}"));
        }
        t.advance(30);
        let (emails, _) = tick(&t);
        let paragraphs: Vec<Vec<String>> =
            emails.iter().map(|e| e.email.paragraphs.clone()).collect();
        assert_eq!(
            paragraphs,
            vec![
                vec!["text m0", "text m1", "text m2"],
                vec!["text m3", "text m4", "text m5"]
            ]
        );
        assert_eq!(
            emails[1].email.in_reply_to.as_deref(),
            Some(emails[0].email.message_id.as_str()),
            "one thread"
        );
        // The hourly limit stopped the third email: it goes at the start of the next hour.
        assert_eq!(t.store.tx().pending_count(ALICE, BOB).unwrap(), 1);
        t.advance(3_600);
        let (emails, _) = tick(&t);
        assert_eq!(emails.len(), 1);
        assert_eq!(emails[0].email.paragraphs, vec!["text m6"]);
    }

    #[test]
    fn a_digest_carries_at_most_digest_max_chars_of_text_but_at_least_one_message() {
        let t = Harness::with_limits(crate::core::Limits {
            digest_max_chars: 10,
            ..crate::core::Limits::default()
        });
        alice(&t, Preferences::default(), never(), None);
        t.run(&format!(
            "<message type='chat' id='long' from='{BOB}/x' to='alice@{D}'><body>{}</body></message>",
            "y".repeat(25)
        ));
        from(&t, BOB, "a");
        from(&t, BOB, "b");
        t.advance(30);
        let (emails, _) = tick(&t);
        let sizes: Vec<usize> = emails.iter().map(|e| e.email.paragraphs.len()).collect();
        // 25 characters alone; then "text a" + "text b" are 12 > 10: one each.
        assert_eq!(sizes, vec![1, 1, 1]);
    }

    #[test]
    fn many_held_messages_go_by_email_a_page_at_a_time_once_the_address_is_verified() {
        let t = Harness::with_limits(crate::core::Limits {
            held_per_sender: 1_000,
            ..crate::core::Limits::default()
        });
        t.run(&register_form(ALICE, "alice", "alice@mail.example.org", ""));
        for i in 0..150 {
            from(&t, BOB, &format!("h{i:03}"));
        }
        assert_eq!(t.store.tx().held_count(ALICE).unwrap(), 150);
        let code = t
            .store
            .tx()
            .verification(ALICE, TerminalKind::Email)
            .unwrap()
            .unwrap()
            .code;
        t.run(&format!(
            "<message type='chat' from='{ALICE}/laptop' to='{D}'><body>verify {code}</body></message>"
        ));
        assert_eq!(t.store.tx().held_count(ALICE).unwrap(), 0);
        assert_eq!(t.store.tx().pending_count(ALICE, BOB).unwrap(), 150);
        t.advance(30);
        let (emails, _) = tick(&t);
        let texts: Vec<String> = emails
            .iter()
            .flat_map(|e| e.email.paragraphs.clone())
            .collect();
        let expected: Vec<String> = (0..150).map(|i| format!("text h{i:03}")).collect();
        assert_eq!(texts, expected);
        assert_eq!(emails.len(), 3, "50 per email");
    }
}
