//! Presence: the user's own resources, buddies' subscriptions to reach addresses, the presence
//! Reach publishes for each reach address, and the buddies' presence Reach receives.
//!
//! Two presences are computed for a user, and they must not be confused:
//! - the *XMPP presence* ([`xmpp_presence`]): the best of the user's own XMPP resources. Routing
//!   decides with it (is the user at an XMPP client?);
//! - the *global presence* ([`published_presence`]), what buddies see on `HANDLE@D` (DESIGN.md
//!   "Presence"), made of the XMPP presence and every terminal's local state: the XMPP presence
//!   while the user has an available resource; else the best local state among the terminals
//!   that can reach her ([`compose_presence`]: available "on SMS", away "reachable by email", dnd
//!   "messages wait"); else unavailable. It is published: the store keeps what buddies last saw.
//!
//! Every input of the published presence (resources, a terminal verified, removed, stopped or set
//! to another local state, the link coming up) ends in [`refresh_global`], which compares with what
//! was last published (kept in the store) and tells the buddies who receive the address's presence
//! only when it changed. Probes and new subscribers get the published presence.
//!
//! Subscriptions to a reach address follow the user's [`SubscriptionPolicy`]; under `Ask` the
//! request waits in the store until the user answers with `approve JID` / `deny JID` (chat with
//! `D`, or `/approve` `/deny` by SMS). Buddies' own presence is tracked per resource, so `online`
//! changes only when the first resource comes or the last one goes; changes go to the alerts.
//!
//! This module decides only: it sends nothing but stanzas and leaves SMS and email wording of
//! alerts to `alerts`.

use minidom::Element;
use serde::{Deserialize, Serialize};

use super::rules::{ForwardWhen, SubscriptionPolicy};
use super::{relay, Addressing, Core, Handled, Out};
use crate::address::LocalTarget;
use crate::core::model::{
    Buddy, LocalState, ResourcePresence, StoreError, SubscriptionRequest, Terminal, TerminalKind,
    User,
};
use crate::core::Transaction;
use crate::xmpp::stanza::{attr, chat, child_text, presence, StanzaFault, STANZA_NS};

/// A presence of a reach address: what the user's XMPP resources amount to, or what buddies see.
/// Stored (as the last published presence), so its serde shape is part of the store's format.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum GlobalPresence {
    Unavailable,
    /// Available with an optional `show` (away, chat, dnd, xa) and status text.
    Available {
        show: Option<String>,
        status: Option<String>,
    },
}

/// How reachable a `show` value is; the best resource is the most reachable one.
fn rank(show: Option<&str>) -> u8 {
    match show {
        Some("chat") => 5,
        None => 4,
        Some("away") => 3,
        Some("dnd") => 2,
        Some("xa") => 1,
        Some(_) => 0,
    }
}

/// The best presence among a user's resources: most reachable `show` first, then highest
/// priority, then resource name (so the choice is stable).
pub fn best_presence(resources: &[(String, ResourcePresence)]) -> GlobalPresence {
    resources
        .iter()
        .max_by(|(ra, a), (rb, b)| {
            (rank(a.show.as_deref()), a.priority, rb).cmp(&(
                rank(b.show.as_deref()),
                b.priority,
                ra,
            ))
        })
        .map_or(GlobalPresence::Unavailable, |(_, p)| {
            GlobalPresence::Available {
                show: p.show.clone(),
                status: p.status.clone(),
            }
        })
}

/// The local state a terminal contributes to the global presence: `Some` while the terminal can
/// reach the user (verified, not stopped by STOP, not failing with bounces, not set to never
/// forward), whatever state the user set there; `None` for a terminal that cannot reach her.
pub fn reach_state<A>(terminal: &Terminal<A>) -> Option<LocalState> {
    (terminal.verified
        && !terminal.stopped
        && !terminal.failing
        && terminal.prefs.when != ForwardWhen::Never)
        .then_some(terminal.state)
}

/// How good a local state is for a buddy who wants to reach the user: available, then away, then
/// do not disturb. The global presence follows the best state among the terminals that can reach
/// her.
fn state_rank(state: LocalState) -> u8 {
    match state {
        LocalState::Available => 3,
        LocalState::Away => 2,
        LocalState::Dnd => 1,
    }
}

/// The status text of a terminal-made global presence while its best state is available or
/// away: the terminals in that state, named the way a buddy reads them.
fn terminals_named(by_email: bool, by_sms: bool, available: bool) -> Option<&'static str> {
    Some(match (available, by_email, by_sms) {
        (true, true, true) => "by email and on SMS",
        (true, true, false) => "by email",
        (true, false, true) => "on SMS",
        (false, true, true) => "reachable by email and SMS",
        (false, true, false) => "reachable by email",
        (false, false, true) => "reachable by SMS",
        (_, false, false) => return None,
    })
}

/// The status of the global presence while every terminal that can reach the user is on do not
/// disturb: nothing is forwarded, messages wait for her.
pub const DND_STATUS: &str = "do not disturb: messages wait";

/// The global presence from its inputs: the XMPP presence if one of the user's clients is
/// available; else the best local state among the terminals that can reach her (`email`, `sms`:
/// [`reach_state`] of each, `None` when it cannot reach her), with available > away > dnd:
/// - available on a terminal → available, status naming the available terminals ("on SMS");
/// - else away on a terminal → `away`, status naming the away terminals ("reachable by email");
/// - else dnd on every terminal that can reach her → `dnd`, [`DND_STATUS`];
/// - no terminal can reach her → unavailable.
pub fn compose_presence(
    xmpp: GlobalPresence,
    email: Option<LocalState>,
    sms: Option<LocalState>,
) -> GlobalPresence {
    if xmpp.is_available() {
        return xmpp;
    }
    let Some(best) = email.into_iter().chain(sms).max_by_key(|s| state_rank(*s)) else {
        return GlobalPresence::Unavailable;
    };
    let (show, status) = match best {
        LocalState::Dnd => (Some("dnd"), Some(DND_STATUS)),
        LocalState::Available | LocalState::Away => {
            let named = terminals_named(
                email == Some(best),
                sms == Some(best),
                best == LocalState::Available,
            );
            ((best == LocalState::Away).then_some("away"), named)
        }
    };
    GlobalPresence::Available {
        show: show.map(str::to_owned),
        status: status.map(str::to_owned),
    }
}

impl GlobalPresence {
    /// The presence in words, as the user is told what buddies see: "available (on SMS)",
    /// "away (reachable by email)", "do not disturb (messages wait)", "unavailable".
    pub fn describe(&self) -> String {
        let GlobalPresence::Available { show, status } = self else {
            return "unavailable".to_owned();
        };
        let shown = match show.as_deref() {
            None => "available",
            Some("chat") => "free to chat",
            Some("away") => "away",
            Some("dnd") => "do not disturb",
            Some("xa") => "away for long",
            Some(_) => "available",
        };
        match status.as_deref().map(str::trim) {
            Some(status) if !status.is_empty() => {
                let status = status.strip_prefix("do not disturb: ").unwrap_or(status);
                format!("{shown} ({status})")
            }
            _ => shown.to_owned(),
        }
    }

    fn to_stanza(&self, from: &str, to: &str) -> Element {
        match self {
            GlobalPresence::Unavailable => presence(from, to, Some("unavailable")),
            GlobalPresence::Available { show, status } => {
                let mut p = presence(from, to, None);
                if let Some(show) = show {
                    p.append_child(
                        Element::builder("show", STANZA_NS)
                            .append(show.as_str())
                            .build(),
                    );
                }
                if let Some(status) = status {
                    p.append_child(
                        Element::builder("status", STANZA_NS)
                            .append(status.as_str())
                            .build(),
                    );
                }
                p
            }
        }
    }

    pub fn is_available(&self) -> bool {
        matches!(self, GlobalPresence::Available { .. })
    }

    /// Available and not away, xa or dnd: the user is at an XMPP client.
    pub fn is_attentive(&self) -> bool {
        matches!(self, GlobalPresence::Available { show: None, .. })
            || matches!(self, GlobalPresence::Available { show: Some(s), .. } if s == "chat")
    }
}

/// The user's XMPP presence: the best of their resources. Routing decides with this one.
pub(crate) fn xmpp_presence(
    store: &mut dyn Transaction,
    user: &User,
) -> Result<GlobalPresence, StoreError> {
    Ok(best_presence(&store.resources(&user.jid)?))
}

/// What the reach address shows buddies now (see the module documentation).
pub(crate) fn published_presence(
    core: &Core,
    store: &mut dyn Transaction,
    user: &User,
) -> Result<GlobalPresence, StoreError> {
    let email = user
        .email
        .as_ref()
        .filter(|_| core.settings.email.is_some())
        .and_then(reach_state);
    let sms = user
        .phone
        .as_ref()
        .filter(|phone| {
            core.settings
                .sms
                .as_ref()
                .is_some_and(|s| super::sms::number_allowed(s, phone.address.as_str()))
        })
        .and_then(reach_state);
    Ok(compose_presence(xmpp_presence(store, user)?, email, sms))
}

/// The presence last published for the user (what buddies see now); what it would be, if
/// nothing was published yet.
pub(crate) fn last_published(
    core: &Core,
    store: &mut dyn Transaction,
    user: &User,
) -> Result<GlobalPresence, StoreError> {
    match store.published_presence(&user.jid)? {
        Some(shown) => Ok(shown),
        None => published_presence(core, store, user),
    }
}

/// What buddies see of the reach address now, in words (for the answers to `state`, `/away`
/// `/back` `/dnd` and `status`).
pub(crate) fn seen_by_buddies(
    core: &Core,
    store: &mut dyn Transaction,
    user: &User,
) -> Result<String, StoreError> {
    Ok(last_published(core, store, user)?.describe())
}

/// Recomputes the reach address's published presence after one of its inputs changed (a
/// resource, a terminal's local state, a terminal verified, removed or stopped) and tells the
/// buddies if it differs from what they last saw. Reads the user afresh, so callers may pass a
/// record from before their change.
pub(crate) fn refresh_global(
    core: &Core,
    store: &mut dyn Transaction,
    _now: u64,
    user: &User,
    out: &mut Out,
) -> Result<(), StoreError> {
    let Some(user) = store.user(&user.jid)? else {
        return Ok(());
    };
    let shown = published_presence(core, store, &user)?;
    if store
        .published_presence(&user.jid)?
        .unwrap_or(GlobalPresence::Unavailable)
        != shown
    {
        store.put_published_presence(&user.jid, &shown)?;
        broadcast(core, store, &user, &shown, out)?;
    }
    Ok(())
}

/// Users walked per step after a reconnect: one step right away, the next on each clock tick.
/// A step is one batch (one commit, a bounded number of stanzas); 100,000 users take 20 ticks.
pub(super) const USERS_PER_WALK_STEP: usize = 5000;

/// After a (re)connect the presences Reach knew may be stale: forget the users' resources, then
/// walk all users (a step at a time, see [`continue_walk`]) to tell buddies what that leaves and
/// probe every user and every buddy Reach is subscribed to (a buddy keeps its `online` flag until
/// the answer says otherwise, so no false alert goes out).
pub(super) fn on_link_up(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    out: &mut Out,
) -> Result<(), StoreError> {
    store.clear_resources()?;
    store.set_presence_walk(Some(""))?;
    continue_walk(core, store, now, out)
}

/// The next step of the walk started by [`on_link_up`], if one is under way.
pub(super) fn continue_walk(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    out: &mut Out,
) -> Result<(), StoreError> {
    if store.presence_walk()?.is_none() || !store.claim_presence_walk()? {
        return Ok(());
    }
    // Read again now that this instance walks alone.
    let Some(after) = store.presence_walk()? else {
        return Ok(());
    };
    let after = (!after.is_empty()).then_some(after.as_str());
    let users = store.users_after(after, USERS_PER_WALK_STEP)?;
    // A user another instance is busy with is only probed: that instance's event and the
    // answers to the probes bring their presence up to date.
    let mut claimed = Vec::with_capacity(users.len());
    for user in &users {
        claimed.push(store.claim_user(&user.jid)?);
    }
    for (user, _) in users.iter().zip(&claimed).filter(|(_, c)| **c) {
        refresh_global(core, store, now, user, out)?;
    }
    for user in &users {
        out.send(presence(&core.settings.domain, &user.jid, Some("probe")));
    }
    for (user, claimed) in users.iter().zip(&claimed) {
        let address = core.reach_address(&user.handle);
        for (jid, mut buddy) in store.buddies(&user.handle)? {
            if *claimed && !buddy.resources.is_empty() {
                buddy.resources.clear();
                store.put_buddy(&user.handle, &jid, &buddy)?;
            }
            if buddy.we_subscribed {
                out.send(presence(&address, &jid, Some("probe")));
            }
        }
    }
    match users.last() {
        Some(last) if users.len() == USERS_PER_WALK_STEP => {
            store.set_presence_walk(Some(&last.jid))?
        }
        _ => store.set_presence_walk(None)?,
    }
    Ok(())
}

pub(super) fn on_presence(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    stanza: &Element,
    who: &Addressing,
    out: &mut Out,
) -> Handled {
    let type_ = attr(stanza, "type");
    match &who.target {
        LocalTarget::Service => on_service_presence(core, store, now, stanza, type_, who, out),
        LocalTarget::User(handle) => {
            let Some(user) = store.user_by_handle(handle)? else {
                return match type_ {
                    "subscribe" => Err(StanzaFault::item_not_found("no such reach address").into()),
                    "probe" => {
                        out.send(presence(
                            attr(stanza, "to"),
                            &who.from_bare,
                            Some("unsubscribed"),
                        ));
                        Ok(())
                    }
                    _ => Ok(()),
                };
            };
            on_address_presence(core, store, now, &user, type_, who, out)
        }
        LocalTarget::Session(peer) => {
            let Some(user) = store.user(&who.from_bare)? else {
                return match type_ {
                    "subscribe" | "probe" => {
                        Err(super::registration::registration_required().into())
                    }
                    _ => Ok(()),
                };
            };
            let session_jid = core.session_jid(&peer.to_string());
            match type_ {
                // The user may put a per-session JID in their roster.
                "subscribe" => out.send(presence(&session_jid, &user.jid, Some("subscribed"))),
                "probe" => {
                    let buddy = store
                        .buddy(&user.handle, &peer.to_string())?
                        .unwrap_or_default();
                    let shown = if buddy.online {
                        None
                    } else {
                        Some("unavailable")
                    };
                    out.send(presence(&session_jid, &user.jid, shown));
                }
                _ => {}
            }
            Ok(())
        }
        LocalTarget::Invalid => match type_ {
            "subscribe" => {
                Err(StanzaFault::item_not_found("no such address at this service").into())
            }
            _ => Ok(()),
        },
    }
}

/// How long after a resource went offline an "available" of the same resource is checked with
/// the server before it is believed (see `on_service_presence`).
const RESOURCE_GONE_SECS: u64 = 5;

/// Presence addressed to the service itself: the user's resources, and subscriptions to `D`.
fn on_service_presence(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    stanza: &Element,
    type_: &str,
    who: &Addressing,
    out: &mut Out,
) -> Handled {
    let service = core.settings.domain.as_str();
    match type_ {
        "probe" => out.send(presence(service, &who.from_bare, None)),
        "subscribe" => {
            out.send(presence(service, &who.from_bare, Some("subscribed")));
            out.send(presence(service, &who.from_bare, None));
        }
        "" | "unavailable" => {
            let Some(user) = store.user(&who.from_bare)? else {
                return Ok(());
            };
            let resource = who
                .from
                .resource()
                .map(|r| r.as_str().to_owned())
                .unwrap_or_default();
            let before = xmpp_presence(store, &user)?;
            if type_ == "unavailable" {
                store.remove_resource(&user.jid, &resource)?;
                store.put_resource_gone(&user.jid, &resource, now)?;
            } else {
                // Several instances may handle one client's presences in either order: an
                // "available" met just after the same resource's "unavailable" may be the older
                // of the two. The server is asked, and its answer (the resource's presence if it
                // is online, nothing if not) decides.
                let gone_at = store.take_resource_gone(&user.jid, &resource)?;
                let known = store
                    .resources(&user.jid)?
                    .iter()
                    .any(|(r, _)| *r == resource);
                if !known && gone_at.is_some_and(|at| now.saturating_sub(at) <= RESOURCE_GONE_SECS)
                {
                    out.send(presence(service, &user.jid, Some("probe")));
                    return Ok(());
                }
                let show = child_text(stanza, "show").filter(|s| rank(Some(s)) > 0);
                let priority = child_text(stanza, "priority")
                    .and_then(|p| p.trim().parse().ok())
                    .unwrap_or(0);
                let status = child_text(stanza, "status");
                store.set_resource(
                    &user.jid,
                    &resource,
                    &ResourcePresence {
                        show,
                        priority,
                        status,
                    },
                )?;
            }
            let after = xmpp_presence(store, &user)?;
            refresh_global(core, store, now, &user, out)?;
            if after.is_available() && !before.is_available() {
                relay::release_held(store, &user, now, out)?;
            }
            if after.is_available()
                && (!before.is_available() || (after.is_attentive() && !before.is_attentive()))
            {
                super::forward::on_user_back(store, &user, after.is_attentive(), out)?;
            }
        }
        _ => {}
    }
    Ok(())
}

/// Presence addressed to a reach address, from a buddy.
fn on_address_presence(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    type_: &str,
    who: &Addressing,
    out: &mut Out,
) -> Handled {
    let address = core.reach_address(&user.handle);
    let buddy_jid = who.from_bare.as_str();
    let known = store.buddy(&user.handle, buddy_jid)?;
    // Past `buddies_per_user`, a JID the address has no record of gets none: its subscription
    // request is refused and its presence is not tracked.
    let full = known.is_none()
        && buddy_jid != user.jid
        && store.buddy_count(&user.handle)? >= core.settings.limits.buddies_per_user as usize;
    let mut buddy = known.unwrap_or_default();
    let before = buddy.clone();
    if full {
        if type_ == "subscribe"
            && store
                .subscription_request(&user.handle, buddy_jid)?
                .is_none()
        {
            tracing::info!(
                handle = user.handle.as_str(),
                "subscription request refused: the reach address has its most buddies"
            );
            out.send(presence(&address, buddy_jid, Some("unsubscribed")));
            return Ok(());
        }
        if type_ != "subscribe" && type_ != "unsubscribe" {
            if type_ == "probe" {
                out.send(presence(&address, buddy_jid, Some("unsubscribed")));
            }
            return Ok(());
        }
    }
    let resource = who
        .from
        .resource()
        .map(|r| r.as_str().to_owned())
        .unwrap_or_default();
    match type_ {
        "subscribe" => {
            if buddy.receives_presence {
                // Asked again (e.g. the buddy's client lost the answer): answer the same way.
                accept(core, store, user, buddy_jid, &mut buddy, out)?;
            } else {
                match user.subscription_policy {
                    SubscriptionPolicy::Auto => {
                        accept(core, store, user, buddy_jid, &mut buddy, out)?
                    }
                    SubscriptionPolicy::BuddiesOnly => {
                        if store.session(&user.jid, buddy_jid)?.is_some() {
                            accept(core, store, user, buddy_jid, &mut buddy, out)?;
                        } else {
                            out.send(presence(&address, buddy_jid, Some("unsubscribed")));
                        }
                    }
                    SubscriptionPolicy::Ask => ask_user(core, store, now, user, buddy_jid, out)?,
                }
            }
        }
        "unsubscribe" => {
            buddy.receives_presence = false;
            store.take_subscription_request(&user.handle, buddy_jid)?;
            out.send(presence(&address, buddy_jid, Some("unsubscribed")));
        }
        "subscribed" => buddy.we_subscribed = true,
        "unsubscribed" => {
            buddy.we_subscribed = false;
            buddy.resources.clear();
        }
        "probe" => {
            if buddy.receives_presence {
                out.send(last_published(core, store, user)?.to_stanza(&address, buddy_jid));
            } else {
                out.send(presence(&address, buddy_jid, Some("unsubscribed")));
            }
        }
        "" if !buddy.resources.contains(&resource) => buddy.resources.push(resource),
        "unavailable" => {
            if resource.is_empty() {
                // From the bare JID: the buddy as a whole went offline.
                buddy.resources.clear();
            } else {
                buddy.resources.retain(|r| *r != resource);
            }
        }
        _ => {}
    }
    if matches!(type_, "" | "unavailable" | "unsubscribed") {
        buddy.online = !buddy.resources.is_empty();
    }
    if buddy != before {
        if buddy == Buddy::default() {
            store.remove_buddy(&user.handle, buddy_jid)?;
        } else {
            store.put_buddy(&user.handle, buddy_jid, &buddy)?;
        }
    }
    if buddy.online != before.online {
        super::alerts::buddy_changed(core, store, now, user, buddy_jid, buddy.online, out)?;
    }
    Ok(())
}

/// Lets the buddy see the reach address: approves the subscription, sends the published
/// presence, and subscribes back (so Reach sees the buddy's presence). The caller stores `buddy`.
fn accept(
    core: &Core,
    store: &mut dyn Transaction,
    user: &User,
    buddy_jid: &str,
    buddy: &mut Buddy,
    out: &mut Out,
) -> Result<(), StoreError> {
    let address = core.reach_address(&user.handle);
    buddy.receives_presence = true;
    out.send(presence(&address, buddy_jid, Some("subscribed")));
    out.send(last_published(core, store, user)?.to_stanza(&address, buddy_jid));
    if !buddy.we_subscribed {
        buddy.we_subscribed = true;
        out.send(presence(&address, buddy_jid, Some("subscribe")));
    }
    Ok(())
}

/// Under the `Ask` policy: keeps the request and asks the user, on their XMPP client (a chat from
/// `D`) and on every terminal whose preferences ask for subscription requests. Asked once per
/// request, however often the buddy repeats it.
fn ask_user(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    buddy_jid: &str,
    out: &mut Out,
) -> Result<(), StoreError> {
    if store
        .subscription_request(&user.handle, buddy_jid)?
        .is_some()
    {
        return Ok(());
    }
    store.put_subscription_request(
        &user.handle,
        buddy_jid,
        &SubscriptionRequest { requested_at: now },
    )?;
    tracing::info!(
        handle = user.handle.as_str(),
        "a subscription request waits for the user's answer"
    );
    out.send(chat(
        &core.settings.domain,
        &user.jid,
        &format!(
            "{buddy_jid} wants to see your presence. Send 'approve {buddy_jid}' or 'deny {buddy_jid}'."
        ),
    ));
    if user
        .phone
        .as_ref()
        .is_some_and(|t| t.prefs.forward_subscriptions)
    {
        super::sms::unsolicited(
            core,
            store,
            now,
            user,
            &format!(
                "Reach: {buddy_jid} wants to see your presence. Text /approve {buddy_jid} or /deny {buddy_jid}."
            ),
            out,
        )?;
    }
    if user
        .email
        .as_ref()
        .is_some_and(|t| t.prefs.forward_subscriptions && t.usable())
    {
        super::alerts::notice_mail(
            core,
            now,
            user,
            &format!("{buddy_jid} wants to see your presence"),
            vec![
                format!(
                    "{buddy_jid} asked to see the presence of your reach address {}.",
                    core.reach_address(&user.handle)
                ),
                format!(
                    "To answer, send 'approve {buddy_jid}' or 'deny {buddy_jid}' in a chat with {}, \
                     or text /approve {buddy_jid} or /deny {buddy_jid} from your phone.",
                    core.settings.domain
                ),
            ],
            out,
        );
    }
    Ok(())
}

/// The user's answer to a waiting subscription request, from any door. Returns what to tell the
/// user.
pub(super) fn answer_request(
    core: &Core,
    store: &mut dyn Transaction,
    user: &User,
    buddy_jid: &str,
    approve: bool,
    out: &mut Out,
) -> Result<String, StoreError> {
    let verb = if approve { "approve" } else { "deny" };
    let buddy_jid = match jid::Jid::new(buddy_jid.trim()) {
        Ok(jid) if jid.node().is_some() => jid.to_bare().to_string(),
        _ if buddy_jid.trim().is_empty() => {
            let waiting: Vec<String> = store
                .subscription_requests(&user.handle)?
                .into_iter()
                .map(|(jid, _)| jid)
                .collect();
            return Ok(if waiting.is_empty() {
                format!("Usage: {verb} JID. No request is waiting.")
            } else {
                format!("Usage: {verb} JID. Waiting: {}.", waiting.join(", "))
            });
        }
        _ => return Ok(format!("'{}' is not an XMPP address.", buddy_jid.trim())),
    };
    if store
        .take_subscription_request(&user.handle, &buddy_jid)?
        .is_none()
    {
        return Ok(format!("No request from {buddy_jid} is waiting."));
    }
    let address = core.reach_address(&user.handle);
    if approve {
        let mut buddy = store.buddy(&user.handle, &buddy_jid)?.unwrap_or_default();
        accept(core, store, user, &buddy_jid, &mut buddy, out)?;
        store.put_buddy(&user.handle, &buddy_jid, &buddy)?;
        Ok(format!("{buddy_jid} now sees your presence."))
    } else {
        out.send(presence(&address, &buddy_jid, Some("unsubscribed")));
        Ok(format!("{buddy_jid} may not see your presence."))
    }
}

/// A chat line `approve JID` / `deny JID` to `D`, from whoever sent it; `args` is the JID.
fn chat_answer(
    core: &Core,
    store: &mut dyn Transaction,
    who: &Addressing,
    args: &str,
    approve: bool,
    out: &mut Out,
) -> Result<String, StoreError> {
    let Some(user) = store.user(&who.from_bare)? else {
        return Ok("You are not registered.".to_owned());
    };
    answer_request(core, store, &user, args, approve, out)
}

/// The chat command `approve JID`; `args` is the text after the command.
pub(super) fn approve(
    core: &Core,
    store: &mut dyn Transaction,
    who: &Addressing,
    args: &str,
    out: &mut Out,
) -> Result<String, StoreError> {
    chat_answer(core, store, who, args, true, out)
}

/// The chat command `deny JID`; `args` is the text after the command.
pub(super) fn deny(
    core: &Core,
    store: &mut dyn Transaction,
    who: &Addressing,
    args: &str,
    out: &mut Out,
) -> Result<String, StoreError> {
    chat_answer(core, store, who, args, false, out)
}

/// Marks the terminal as prompted for its local state today; true if it had not been yet (the
/// caller then prompts). At most one prompt per terminal per (UTC) day.
pub(super) fn take_prompt(
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    kind: TerminalKind,
) -> Result<bool, StoreError> {
    let today = now / 86_400;
    let Some(mut fresh) = store.user(&user.jid)? else {
        return Ok(false);
    };
    let prompted_day = match kind {
        TerminalKind::Email => fresh.email.as_mut().map(|t| &mut t.prompted_day),
        TerminalKind::Phone => fresh.phone.as_mut().map(|t| &mut t.prompted_day),
    };
    match prompted_day {
        Some(day) if *day != Some(today) => {
            *day = Some(today);
            store.put_user(&fresh)?;
            Ok(true)
        }
        _ => Ok(false),
    }
}

/// The commands the email prompt offers: the three local states, as `state` sets them.
const EMAIL_STATE_AWAY: &str = "state email away";
const EMAIL_STATE_DND: &str = "state email dnd";
const EMAIL_STATE_AVAILABLE: &str = "state email available";

/// The footer line that prompts for the email terminal's local state, the first time a forward
/// goes to it on a day (else empty). Marks the terminal prompted.
pub(super) fn email_prompt(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
) -> Result<String, StoreError> {
    Ok(if take_prompt(store, now, user, TerminalKind::Email)? {
        format!(
            "\nReach now forwards your chats to this address while you are away from XMPP. \
             To change that and what your buddies see, send '{EMAIL_STATE_AWAY}', \
             '{EMAIL_STATE_DND}' (nothing comes here, messages wait) or '{EMAIL_STATE_AVAILABLE}' \
             in a chat with {}.",
            core.settings.domain
        )
    } else {
        String::new()
    })
}

/// Sends the reach address's presence to every buddy who receives it.
fn broadcast(
    core: &Core,
    store: &mut dyn Transaction,
    user: &User,
    global: &GlobalPresence,
    out: &mut Out,
) -> Result<(), StoreError> {
    let address = core.reach_address(&user.handle);
    for (buddy, record) in store.buddies(&user.handle)? {
        if record.receives_presence {
            out.send(global.to_stanza(&address, &buddy));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::testing::*;
    #[allow(unused_imports)]
    use crate::core::Transaction;

    fn res(name: &str, show: Option<&str>, priority: i8) -> (String, ResourcePresence) {
        (
            name.into(),
            ResourcePresence {
                show: show.map(Into::into),
                priority,
                status: Some(name.into()),
            },
        )
    }

    type Case<'a> = (&'a [(String, ResourcePresence)], Option<&'a str>, &'a str);

    #[test]
    fn best_presence_prefers_the_most_reachable_then_priority() {
        assert_eq!(best_presence(&[]), GlobalPresence::Unavailable);
        let cases: &[Case] = &[
            (&[res("a", Some("away"), 5), res("b", None, 0)], None, "b"),
            (
                &[res("a", Some("xa"), 0), res("b", Some("dnd"), 0)],
                Some("dnd"),
                "b",
            ),
            (&[res("a", None, 1), res("b", None, 2)], None, "b"),
            (
                &[res("a", Some("chat"), -1), res("b", None, 10)],
                Some("chat"),
                "a",
            ),
            (
                &[res("a", Some("away"), 0), res("b", Some("xa"), 9)],
                Some("away"),
                "a",
            ),
        ];
        for (resources, show, status) in cases {
            assert_eq!(
                best_presence(resources),
                GlobalPresence::Available {
                    show: show.map(Into::into),
                    status: Some((*status).into())
                },
                "{resources:?}"
            );
        }
    }

    /// Two instances may handle one client's "available" and "unavailable" in either order
    /// (ejabberd spreads stanzas at random): an "available" of a resource that just went
    /// offline is checked with the server, whose answer decides.
    #[test]
    fn an_available_just_after_the_same_resources_unavailable_is_checked_with_the_server() {
        let t = Harness::new();
        t.register("alice@example.org", "alice");
        let resources = |t: &Harness| t.store.tx().resources("alice@example.org").unwrap();
        // The unavailable was handled first, the older available after it.
        t.run(&format!(
            "<presence type='unavailable' from='alice@example.org/phone' to='{D}'/>"
        ));
        let out = t.run(&format!(
            "<presence from='alice@example.org/phone' to='{D}'/>"
        ));
        assert!(resources(&t).is_empty(), "not believed at once");
        let probe = out
            .iter()
            .find(|p| p.attr("type") == Some("probe"))
            .expect("the server is asked");
        assert_eq!(probe.attr("to"), Some("alice@example.org"));
        assert_eq!(probe.attr("from"), Some(D));
        // The server's answer: the client is online after all (a quick reconnect).
        t.run(&format!(
            "<presence from='alice@example.org/phone' to='{D}'/>"
        ));
        assert_eq!(resources(&t).len(), 1);
        // Later than the window, or a resource never seen offline: believed at once.
        t.run(&format!(
            "<presence type='unavailable' from='alice@example.org/phone' to='{D}'/>"
        ));
        t.advance(RESOURCE_GONE_SECS + 1);
        let out = t.run(&format!(
            "<presence from='alice@example.org/phone' to='{D}'/>"
        ));
        assert!(out.iter().all(|p| p.attr("type") != Some("probe")));
        assert_eq!(resources(&t).len(), 1);
        t.run(&format!(
            "<presence from='alice@example.org/laptop' to='{D}'/>"
        ));
        assert_eq!(resources(&t).len(), 2);
    }

    #[test]
    fn a_buddy_subscription_is_accepted_and_returned() {
        let t = Harness::new();
        t.register("alice@example.org", "alice");
        let out = t.run(&format!(
            "<presence type='subscribe' from='bob@example.net/x' to='alice@{D}'/>"
        ));
        let types: Vec<_> = out
            .iter()
            .map(|p| p.attr("type").unwrap_or("available"))
            .collect();
        assert_eq!(types, vec!["subscribed", "unavailable", "subscribe"]);
        assert!(out
            .iter()
            .all(|p| p.attr("from") == Some(&*format!("alice@{D}"))
                && p.attr("to") == Some("bob@example.net")));
        // Asking again does not ask back again.
        let again = t.run(&format!(
            "<presence type='subscribe' from='bob@example.net/x' to='alice@{D}'/>"
        ));
        assert_eq!(again.len(), 2);
    }

    #[test]
    fn past_the_most_buddies_a_new_subscription_is_refused_and_not_returned() {
        let t = Harness::with_limits(crate::core::Limits {
            buddies_per_user: 2,
            ..crate::core::Limits::default()
        });
        t.register("alice@example.org", "alice");
        let subscribe = |who: &str| -> Vec<String> {
            t.run(&format!(
                "<presence type='subscribe' from='{who}/x' to='alice@{D}'/>"
            ))
            .iter()
            .map(|p| p.attr("type").unwrap_or("available").to_owned())
            .collect()
        };
        assert_eq!(subscribe("bob@example.net").len(), 3);
        assert_eq!(subscribe("carol@example.net").len(), 3);
        let before = t.snapshot("alice@example.org");
        assert_eq!(subscribe("dave@example.com"), vec!["unsubscribed"]);
        // Nor is a stranger's presence tracked, nor a probe answered with presence.
        t.run(&format!(
            "<presence from='dave@example.com/x' to='alice@{D}'/>"
        ));
        let probe = t.run(&format!(
            "<presence type='probe' from='dave@example.com/x' to='alice@{D}'/>"
        ));
        assert_eq!(probe[0].attr("type"), Some("unsubscribed"));
        assert_eq!(t.snapshot("alice@example.org"), before);
        // Buddies already there are answered as before, and alone see presence changes.
        assert_eq!(
            subscribe("bob@example.net"),
            vec!["subscribed", "unavailable"]
        );
        let out = t.run(&format!(
            "<presence from='alice@example.org/laptop' to='{D}'/>"
        ));
        let told: Vec<_> = out.iter().filter_map(|p| p.attr("to")).collect();
        assert_eq!(told, vec!["bob@example.net", "carol@example.net"]);
    }

    #[test]
    fn the_reach_address_follows_the_users_resources() {
        let t = Harness::new();
        t.register("alice@example.org", "alice");
        t.run(&format!(
            "<presence type='subscribe' from='bob@example.net' to='alice@{D}'/>"
        ));
        let out = t.run(&format!("<presence from='alice@example.org/laptop' to='{D}'><show>away</show><status>lunch</status></presence>"));
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].attr("to"), Some("bob@example.net"));
        assert_eq!(child_text(&out[0], "show").as_deref(), Some("away"));
        assert_eq!(child_text(&out[0], "status").as_deref(), Some("lunch"));
        // A second, better resource changes the global presence.
        let out = t.run(&format!(
            "<presence from='alice@example.org/phone' to='{D}'/>"
        ));
        assert_eq!(child_text(&out[0], "show"), None);
        // The same presence again changes nothing.
        assert!(t
            .run(&format!(
                "<presence from='alice@example.org/phone' to='{D}'/>"
            ))
            .is_empty());
        t.run(&format!(
            "<presence type='unavailable' from='alice@example.org/phone' to='{D}'/>"
        ));
        let out = t.run(&format!(
            "<presence type='unavailable' from='alice@example.org/laptop' to='{D}'/>"
        ));
        assert_eq!(out[0].attr("type"), Some("unavailable"));
        // A probe is answered with the current state.
        let out = t.run(&format!(
            "<presence type='probe' from='bob@example.net' to='alice@{D}'/>"
        ));
        assert_eq!(out[0].attr("type"), Some("unavailable"));
        let out = t.run(&format!(
            "<presence type='probe' from='stranger@example.net' to='alice@{D}'/>"
        ));
        assert_eq!(out[0].attr("type"), Some("unsubscribed"));
    }

    #[test]
    fn many_users_are_probed_a_step_at_a_time_after_a_reconnect() {
        let t = Harness::new();
        let users = USERS_PER_WALK_STEP + 3;
        for i in 0..users {
            let user = crate::core::model::User {
                jid: format!("u{i:05}@example.org"),
                handle: crate::address::Handle::parse(&format!("u{i:05}")).unwrap(),
                email: None,
                phone: None,
                registered_at: 0,
                primary: None,
                subscription_policy: Default::default(),
                time_zone: None,
                integrated: false,
            };
            t.store.tx().put_user(&user).unwrap();
        }
        let probed = |out: &[Element]| -> Vec<String> {
            out.iter()
                .filter(|e| e.attr("type") == Some("probe"))
                .filter_map(|e| e.attr("to").map(str::to_owned))
                .collect()
        };
        let first = probed(&t.event(crate::core::Event::LinkUp));
        assert_eq!(first.len(), USERS_PER_WALK_STEP);
        assert_eq!(first[0], "u00000@example.org");
        let rest = probed(&t.event(crate::core::Event::Tick));
        assert_eq!(rest.len(), 3);
        assert_eq!(rest[2], format!("u{:05}@example.org", users - 1));
        assert!(probed(&t.event(crate::core::Event::Tick)).is_empty());
        // A new reconnect walks again from the start.
        assert_eq!(
            probed(&t.event(crate::core::Event::LinkUp)).len(),
            USERS_PER_WALK_STEP
        );
    }

    #[test]
    fn link_up_forgets_resources_and_probes_users() {
        let t = Harness::new();
        t.register("alice@example.org", "alice");
        t.run(&format!(
            "<presence type='subscribe' from='bob@example.net' to='alice@{D}'/>"
        ));
        t.run(&format!(
            "<presence from='alice@example.org/laptop' to='{D}'/>"
        ));
        let out = t.event(crate::core::Event::LinkUp);
        assert_eq!(out[0].attr("to"), Some("bob@example.net"));
        assert_eq!(out[0].attr("type"), Some("unavailable"));
        assert_eq!(out[1].attr("type"), Some("probe"));
        assert_eq!(out[1].attr("to"), Some("alice@example.org"));
        assert!(t
            .store
            .tx()
            .resources("alice@example.org")
            .unwrap()
            .is_empty());
    }

    #[test]
    fn subscribing_to_an_unknown_handle_is_an_error() {
        let t = Harness::new();
        let reply = t.one(&format!(
            "<presence type='subscribe' from='bob@example.net' to='ghost@{D}'/>"
        ));
        assert_error(&reply, "item-not-found");
    }

    fn available(show: Option<&str>, status: Option<&str>) -> GlobalPresence {
        GlobalPresence::Available {
            show: show.map(Into::into),
            status: status.map(Into::into),
        }
    }

    #[test]
    fn a_terminal_reaches_the_user_when_verified_not_stopped_not_failing_and_forwarding() {
        use crate::core::model::LocalState::*;
        // (verified, stopped, failing, never forwards, local state) → what it contributes
        let cases = [
            (true, false, false, false, Available, Some(Available)),
            (true, false, false, false, Away, Some(Away)),
            (true, false, false, false, Dnd, Some(Dnd)),
            (false, false, false, false, Available, None),
            (false, false, false, false, Dnd, None),
            (true, true, false, false, Available, None),
            (true, true, false, false, Away, None),
            (true, false, true, false, Available, None),
            (true, false, false, true, Available, None),
        ];
        for (verified, stopped, failing, never, state, expected) in cases {
            let mut t = Terminal::unverified(());
            t.verified = verified;
            t.stopped = stopped;
            t.failing = failing;
            t.state = state;
            if never {
                t.prefs.when = ForwardWhen::Never;
            }
            assert_eq!(
                reach_state(&t),
                expected,
                "{verified} {stopped} {failing} {never} {state:?}"
            );
        }
    }

    /// Every combination of the email and SMS terminals' contributions (cannot reach, available,
    /// away, dnd), with no XMPP client: the best state wins (available > away > dnd), and the
    /// status names the terminals in that state.
    #[test]
    fn the_global_presence_is_the_best_local_state_of_the_terminals() {
        use crate::core::model::LocalState::*;
        let on = |status: &str| available(None, Some(status));
        let away = |status: &str| available(Some("away"), Some(status));
        let dnd = available(Some("dnd"), Some(DND_STATUS));
        // (email, SMS) → what a buddy sees
        let table = [
            (None, None, GlobalPresence::Unavailable),
            (None, Some(Available), on("on SMS")),
            (None, Some(Away), away("reachable by SMS")),
            (None, Some(Dnd), dnd.clone()),
            (Some(Available), None, on("by email")),
            (Some(Available), Some(Available), on("by email and on SMS")),
            (Some(Available), Some(Away), on("by email")),
            (Some(Available), Some(Dnd), on("by email")),
            (Some(Away), None, away("reachable by email")),
            (Some(Away), Some(Available), on("on SMS")),
            (Some(Away), Some(Away), away("reachable by email and SMS")),
            (Some(Away), Some(Dnd), away("reachable by email")),
            (Some(Dnd), None, dnd.clone()),
            (Some(Dnd), Some(Available), on("on SMS")),
            (Some(Dnd), Some(Away), away("reachable by SMS")),
            (Some(Dnd), Some(Dnd), dnd.clone()),
        ];
        assert_eq!(table.len(), 16, "every combination of 4 × 4");
        for (email, sms, expected) in &table {
            assert_eq!(
                compose_presence(GlobalPresence::Unavailable, *email, *sms),
                *expected,
                "email {email:?}, SMS {sms:?}"
            );
        }
        // An available XMPP client wins over every combination, with its own show and status.
        let xmpp_states = [
            available(None, Some("at my desk")),
            available(Some("away"), None),
            available(Some("dnd"), Some("meeting")),
            available(Some("xa"), None),
        ];
        for xmpp in xmpp_states {
            for (email, sms, _) in &table {
                assert_eq!(
                    compose_presence(xmpp.clone(), *email, *sms),
                    xmpp,
                    "{xmpp:?} email {email:?}, SMS {sms:?}"
                );
            }
        }
    }

    #[test]
    fn the_user_is_told_the_presence_in_words() {
        let cases = [
            (GlobalPresence::Unavailable, "unavailable"),
            (available(None, Some("on SMS")), "available (on SMS)"),
            (available(None, None), "available"),
            (
                available(Some("away"), Some("reachable by email")),
                "away (reachable by email)",
            ),
            (
                available(Some("dnd"), Some(DND_STATUS)),
                "do not disturb (messages wait)",
            ),
            (available(Some("xa"), Some("  ")), "away for long"),
            (available(Some("chat"), Some("hi")), "free to chat (hi)"),
        ];
        for (presence, words) in cases {
            assert_eq!(presence.describe(), words, "{presence:?}");
        }
    }

    const ALICE: &str = "alice@example.org";
    const BOB: &str = "bob@example.net";
    const PHONE: &str = "+15551234567";

    fn sms_in(t: &Harness, text: &str) -> Vec<crate::core::Action> {
        t.actions(crate::core::Event::SmsReceived(crate::sms::IncomingSms {
            from: PHONE.into(),
            to: "+15550000000".into(),
            text: text.into(),
            provider_id: None,
        }))
    }

    fn stanzas(actions: &[crate::core::Action]) -> Vec<Element> {
        actions
            .iter()
            .filter_map(|a| match a {
                crate::core::Action::SendStanza(s) => Some(s.clone()),
                _ => None,
            })
            .collect()
    }

    fn sms_texts(actions: &[crate::core::Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                crate::core::Action::SendSms(job) => Some(job.text.clone()),
                _ => None,
            })
            .collect()
    }

    /// Alice registers with her phone and texts the code back.
    fn alice_with_verified_phone(t: &Harness) {
        t.run(&register_form(ALICE, "alice", "", PHONE));
        let code = t
            .store
            .tx()
            .verification(ALICE, TerminalKind::Phone)
            .unwrap()
            .unwrap()
            .code;
        sms_in(t, &code);
        assert!(
            t.store
                .tx()
                .user(ALICE)
                .unwrap()
                .unwrap()
                .phone
                .unwrap()
                .verified
        );
    }

    /// What Bob sees of alice@D in these stanzas: (show, status), `None` if unavailable.
    /// A presence as Bob sees it: `(show, status)`, `None` if unavailable.
    type Seen = Option<(Option<String>, Option<String>)>;

    fn seen_by_bob(out: &[Element]) -> Vec<Seen> {
        out.iter()
            .filter(|p| {
                p.name() == "presence"
                    && p.attr("to") == Some(BOB)
                    && matches!(p.attr("type"), None | Some("unavailable"))
            })
            .map(|p| {
                (p.attr("type") != Some("unavailable"))
                    .then(|| (child_text(p, "show"), child_text(p, "status")))
            })
            .collect()
    }

    fn away(status: &str) -> Seen {
        Some((Some("away".into()), Some(status.into())))
    }

    fn on(status: &str) -> Seen {
        Some((None, Some(status.into())))
    }

    fn dnd() -> Seen {
        Some((Some("dnd".into()), Some(DND_STATUS.into())))
    }

    #[test]
    fn buddies_see_the_phone_take_over_when_the_user_leaves_xmpp() {
        let t = Harness::new();
        alice_with_verified_phone(&t);
        let out = t.run(&format!(
            "<presence type='subscribe' from='{BOB}' to='alice@{D}'/>"
        ));
        assert_eq!(seen_by_bob(&out), vec![on("on SMS")]);
        let out = t.run(&format!("<presence from='{ALICE}/pc' to='{D}'/>"));
        assert_eq!(seen_by_bob(&out), vec![Some((None, None))]);
        // While a client is online, the phone's local state does not show.
        let out = stanzas(&sms_in(&t, "/dnd"));
        assert_eq!(seen_by_bob(&out), vec![]);
        let out = t.run(&format!(
            "<presence type='unavailable' from='{ALICE}/pc' to='{D}'/>"
        ));
        assert_eq!(seen_by_bob(&out), vec![dnd()]);
        // Each change of the phone's local state is published at once, and only real changes.
        let cases: &[(&str, Seen)] = &[
            ("/back", on("on SMS")),
            ("/back", on("on SMS")),
            ("/away", away("reachable by SMS")),
            ("/dnd", dnd()),
            ("/away", away("reachable by SMS")),
            ("STOP", None),
            ("/back", None),
            ("START", on("on SMS")),
        ];
        let mut shown = dnd();
        for (text, expected) in cases {
            let out = stanzas(&sms_in(&t, text));
            let want = if *expected == shown {
                vec![]
            } else {
                vec![expected.clone()]
            };
            assert_eq!(seen_by_bob(&out), want, "after {text}");
            shown = expected.clone();
        }
        // A probe is answered with what was published.
        let out = t.run(&format!(
            "<presence type='probe' from='{BOB}' to='alice@{D}'/>"
        ));
        assert_eq!(seen_by_bob(&out), vec![on("on SMS")]);
        // Removing the phone from the registration leaves nothing reachable.
        let out = t.run(&register_form(ALICE, "alice", "", ""));
        assert_eq!(seen_by_bob(&out), vec![None]);
    }

    /// Alice chats a command to the service; the answer's body.
    fn chat_command(t: &Harness, body: &str) -> (Vec<Element>, String) {
        let out = t.run(&format!(
            "<message type='chat' from='{ALICE}/pc' to='{D}'><body>{body}</body></message>"
        ));
        let said = out
            .iter()
            .filter(|s| {
                s.name() == "message" && s.attr("to").is_some_and(|to| to.starts_with(ALICE))
            })
            .filter_map(|s| child_text(s, "body"))
            .collect::<Vec<_>>()
            .join("\n");
        (out, said)
    }

    /// The commands the daily prompts offer (SMS and the email footer) set exactly the three
    /// local states, and buddies see each at once.
    #[test]
    fn the_prompts_commands_set_the_local_states_buddies_see() {
        use crate::core::model::LocalState::*;
        let t = Harness::new();
        alice_with_verified_phone(&t);
        t.run(&format!(
            "<presence type='subscribe' from='{BOB}' to='alice@{D}'/>"
        ));
        for (text, state, expected) in [
            ("/away", Away, away("reachable by SMS")),
            ("/dnd", Dnd, dnd()),
            ("/back", Available, on("on SMS")),
        ] {
            assert!(super::super::sms::PROMPT.contains(text), "{text}");
            let out = stanzas(&sms_in(&t, text));
            assert_eq!(seen_by_bob(&out), vec![expected], "{text}");
            let phone = t.store.tx().user(ALICE).unwrap().unwrap().phone.unwrap();
            assert_eq!(phone.state, state, "{text}");
        }
        // The email prompt's lines, sent as chat.
        let mut u = t.store.tx().user(ALICE).unwrap().unwrap();
        let mut mail =
            Terminal::unverified(crate::address::Email::parse("alice@mail.example.org").unwrap());
        mail.verified = true;
        mail.state = Away;
        u.email = Some(mail);
        u.phone.as_mut().unwrap().state = Dnd;
        t.store.tx().put_user(&u).unwrap();
        let footer = email_prompt(&t.core, &mut *t.store.tx(), 0, &u).unwrap();
        for (line, state, expected) in [
            (EMAIL_STATE_DND, Dnd, dnd()),
            (EMAIL_STATE_AVAILABLE, Available, on("by email")),
            (EMAIL_STATE_AWAY, Away, away("reachable by email")),
        ] {
            assert!(footer.contains(&format!("'{line}'")), "{footer}");
            let (out, _) = chat_command(&t, line);
            assert_eq!(seen_by_bob(&out), vec![expected], "{line}");
            let email = t.store.tx().user(ALICE).unwrap().unwrap().email.unwrap();
            assert_eq!(email.state, state, "{line}");
        }
    }

    #[test]
    fn with_email_and_phone_the_best_local_state_shows() {
        let t = Harness::new();
        t.run(&register_form(
            ALICE,
            "alice",
            "alice@mail.example.org",
            PHONE,
        ));
        t.run(&format!(
            "<presence type='subscribe' from='{BOB}' to='alice@{D}'/>"
        ));
        let code = t
            .store
            .tx()
            .verification(ALICE, TerminalKind::Email)
            .unwrap()
            .unwrap()
            .code;
        let (out, _) = chat_command(&t, &format!("verify {code}"));
        assert_eq!(seen_by_bob(&out), vec![on("by email")]);
        let code = t
            .store
            .tx()
            .verification(ALICE, TerminalKind::Phone)
            .unwrap()
            .unwrap()
            .code;
        let out = stanzas(&sms_in(&t, &code));
        assert_eq!(seen_by_bob(&out), vec![on("by email and on SMS")]);
        // dnd on one terminal, available on the other: the other one shows.
        let (out, said) = chat_command(&t, "state email dnd");
        assert_eq!(seen_by_bob(&out), vec![on("on SMS")]);
        assert!(
            said.contains("Buddies see you: available (on SMS)."),
            "{said}"
        );
        let out = stanzas(&sms_in(&t, "/away"));
        assert_eq!(seen_by_bob(&out), vec![away("reachable by SMS")]);
        // dnd on every terminal: dnd, messages wait.
        let actions = sms_in(&t, "/dnd");
        assert_eq!(seen_by_bob(&stanzas(&actions)), vec![dnd()]);
        assert_eq!(
            sms_texts(&actions),
            vec![
                "Reach: do not disturb. Nothing is forwarded to this phone until /back. \
                 Buddies see you: do not disturb (messages wait)."
                    .to_owned()
            ]
        );
        let (out, _) = chat_command(&t, "state email away");
        assert_eq!(seen_by_bob(&out), vec![away("reachable by email")]);
        let (out, _) = chat_command(&t, "state email available");
        assert_eq!(seen_by_bob(&out), vec![on("by email")]);
        // The status commands show what buddies see: chat, ad-hoc and SMS.
        let (_, status) = chat_command(&t, "status");
        assert!(
            status.contains("Buddies see: available (by email)"),
            "{status}"
        );
        let texts = sms_texts(&sms_in(&t, "/status"));
        assert_eq!(texts.len(), 1, "{texts:?}");
        assert!(
            texts[0].contains("buddies see: available (by email)"),
            "{texts:?}"
        );
        // A bounce marks the email failing: it cannot reach her, the phone's dnd is all that is left.
        let mut u = t.store.tx().user(ALICE).unwrap().unwrap();
        u.email.as_mut().unwrap().failing = true;
        t.store.tx().put_user(&u).unwrap();
        let mut out = Out::default();
        refresh_global(&t.core, &mut *t.store.tx(), 0, &u, &mut out).unwrap();
        assert_eq!(seen_by_bob(&stanzas(&out.actions)), vec![dnd()]);
    }

    #[test]
    fn link_up_publishes_what_is_left_and_probes_buddies_without_forgetting_them() {
        let t = Harness::new();
        alice_with_verified_phone(&t);
        t.run(&format!(
            "<presence type='subscribe' from='{BOB}' to='alice@{D}'/>"
        ));
        t.run(&format!(
            "<presence type='subscribed' from='{BOB}' to='alice@{D}'/>"
        ));
        t.run(&format!("<presence from='{BOB}/pc' to='alice@{D}'/>"));
        t.run(&format!("<presence from='{ALICE}/pc' to='{D}'/>"));
        let out = t.event(crate::core::Event::LinkUp);
        assert_eq!(seen_by_bob(&out), vec![on("on SMS")]);
        let probes: Vec<_> = out
            .iter()
            .filter(|p| p.attr("type") == Some("probe"))
            .map(|p| {
                (
                    p.attr("from").unwrap().to_owned(),
                    p.attr("to").unwrap().to_owned(),
                )
            })
            .collect();
        assert_eq!(
            probes,
            vec![
                (D.to_owned(), ALICE.to_owned()),
                (format!("alice@{D}"), BOB.to_owned())
            ]
        );
        let handle = crate::address::Handle::parse("alice").unwrap();
        let bob = t.store.tx().buddy(&handle, BOB).unwrap().unwrap();
        assert!(bob.online && bob.resources.is_empty());
        // The probe's answer: Bob went offline meanwhile.
        t.run(&format!(
            "<presence type='unavailable' from='{BOB}' to='alice@{D}'/>"
        ));
        assert!(!t.store.tx().buddy(&handle, BOB).unwrap().unwrap().online);
    }

    #[test]
    fn a_buddy_is_online_while_any_of_its_resources_is() {
        let t = Harness::new();
        t.register(ALICE, "alice");
        let handle = crate::address::Handle::parse("alice").unwrap();
        let online = || {
            t.store
                .tx()
                .buddy(&handle, BOB)
                .unwrap()
                .is_some_and(|b| b.online)
        };
        let steps = [
            ("<presence from='bob@example.net/pc' to='alice@reach.example.org'/>", true),
            ("<presence from='bob@example.net/phone' to='alice@reach.example.org'/>", true),
            ("<presence type='unavailable' from='bob@example.net/pc' to='alice@reach.example.org'/>", true),
            ("<presence type='unavailable' from='bob@example.net/phone' to='alice@reach.example.org'/>", false),
            ("<presence from='bob@example.net/pc' to='alice@reach.example.org'/>", true),
            ("<presence type='unavailable' from='bob@example.net' to='alice@reach.example.org'/>", false),
        ];
        for (stanza, expected) in steps {
            t.run(stanza);
            assert_eq!(online(), expected, "{stanza}");
        }
    }

    fn policy(t: &Harness, policy: SubscriptionPolicy) {
        let mut user = t.store.tx().user(ALICE).unwrap().unwrap();
        user.subscription_policy = policy;
        t.store.tx().put_user(&user).unwrap();
    }

    fn types_to(out: &[Element], to: &str) -> Vec<String> {
        out.iter()
            .filter(|s| s.name() == "presence" && s.attr("to") == Some(to))
            .map(|p| p.attr("type").unwrap_or("available").to_owned())
            .collect()
    }

    #[test]
    fn under_ask_waiting_requests_count_towards_the_most_buddies() {
        let t = Harness::with_limits(crate::core::Limits {
            buddies_per_user: 2,
            ..crate::core::Limits::default()
        });
        t.register(ALICE, "alice");
        policy(&t, SubscriptionPolicy::Ask);
        for who in ["s1@example.com", "s2@example.com"] {
            let out = t.run(&format!(
                "<presence type='subscribe' from='{who}/x' to='alice@{D}'/>"
            ));
            assert!(types_to(&out, who).is_empty(), "the request waits");
        }
        let before = t.snapshot(ALICE);
        let out = t.run(&format!(
            "<presence type='subscribe' from='s3@example.com/x' to='alice@{D}'/>"
        ));
        assert_eq!(types_to(&out, "s3@example.com"), vec!["unsubscribed"]);
        assert!(
            !out.iter().any(|s| s.attr("to") == Some(ALICE)),
            "Alice is not asked"
        );
        assert_eq!(t.snapshot(ALICE), before);
        let handle = crate::address::Handle::parse("alice").unwrap();
        assert_eq!(
            t.store.tx().subscription_requests(&handle).unwrap().len(),
            2
        );
    }

    #[test]
    fn buddies_only_accepts_the_people_alice_talks_with() {
        let t = Harness::new();
        t.register(ALICE, "alice");
        policy(&t, SubscriptionPolicy::BuddiesOnly);
        let out = t.run(&format!(
            "<presence type='subscribe' from='stranger@example.net' to='alice@{D}'/>"
        ));
        assert_eq!(types_to(&out, "stranger@example.net"), vec!["unsubscribed"]);
        t.run(&format!(
            "<message type='chat' from='{BOB}/pc' to='alice@{D}'><body>hi</body></message>"
        ));
        let out = t.run(&format!(
            "<presence type='subscribe' from='{BOB}' to='alice@{D}'/>"
        ));
        assert_eq!(
            types_to(&out, BOB),
            vec!["subscribed", "unavailable", "subscribe"]
        );
    }

    fn chat_to_service(t: &Harness, body: &str) -> String {
        let out = t.run(&format!(
            "<message type='chat' from='{ALICE}/pc' to='{D}'><body>{body}</body></message>"
        ));
        out.iter()
            .find(|m| m.name() == "message" && m.attr("to") == Some(&*format!("{ALICE}/pc")))
            .and_then(|m| child_text(m, "body"))
            .unwrap_or_default()
    }

    #[test]
    fn ask_waits_for_the_users_approve_or_deny() {
        let t = Harness::new();
        alice_with_verified_phone(&t);
        policy(&t, SubscriptionPolicy::Ask);
        let subscribe = |from: &str| {
            t.actions(crate::core::Event::Stanza(
                format!(
                    "<presence xmlns='{STANZA_NS}' type='subscribe' from='{from}' to='alice@{D}'/>"
                )
                .parse()
                .unwrap(),
            ))
        };
        let actions = subscribe(BOB);
        let out = stanzas(&actions);
        assert!(types_to(&out, BOB).is_empty(), "Bob waits");
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].attr("from"), Some(D));
        assert_eq!(out[0].attr("to"), Some(ALICE));
        assert_eq!(
            child_text(&out[0], "body").as_deref(),
            Some("bob@example.net wants to see your presence. Send 'approve bob@example.net' or 'deny bob@example.net'.")
        );
        assert!(
            sms_texts(&actions).is_empty(),
            "the phone did not ask for requests"
        );
        assert!(subscribe(BOB).is_empty(), "asked once per request");

        // A phone that asks for requests gets them, and answers them.
        let mut user = t.store.tx().user(ALICE).unwrap().unwrap();
        user.phone.as_mut().unwrap().prefs.forward_subscriptions = true;
        t.store.tx().put_user(&user).unwrap();
        let actions = subscribe("carol@example.net");
        assert_eq!(
            sms_texts(&actions),
            vec!["Reach: carol@example.net wants to see your presence. Text /approve carol@example.net or /deny carol@example.net."]
        );

        assert_eq!(
            chat_to_service(&t, "approve bob@example.net"),
            "bob@example.net now sees your presence."
        );
        let handle = crate::address::Handle::parse("alice").unwrap();
        assert!(
            t.store
                .tx()
                .buddy(&handle, BOB)
                .unwrap()
                .unwrap()
                .receives_presence
        );
        assert_eq!(
            chat_to_service(&t, "approve bob@example.net"),
            "No request from bob@example.net is waiting."
        );
        let actions = sms_in(&t, "/deny carol@example.net");
        assert_eq!(
            types_to(&stanzas(&actions), "carol@example.net"),
            vec!["unsubscribed"]
        );
        assert_eq!(
            sms_texts(&actions),
            vec!["Reach: carol@example.net may not see your presence."]
        );
        subscribe("dave@example.net");
        assert_eq!(
            chat_to_service(&t, "deny"),
            "Usage: deny JID. Waiting: dave@example.net."
        );
        assert_eq!(
            chat_to_service(&t, "approve not a jid"),
            "'not a jid' is not an XMPP address."
        );
        let actions = sms_in(&t, "/APPROVE dave@example.net");
        assert_eq!(
            types_to(&stanzas(&actions), "dave@example.net"),
            vec!["subscribed", "available", "subscribe"]
        );
    }

    #[test]
    fn an_approval_names_the_buddy_in_any_form() {
        let t = Harness::new();
        t.register(ALICE, "alice");
        policy(&t, SubscriptionPolicy::Ask);
        for from in [format!("{BOB}/pc"), "carol@example.net".to_owned()] {
            t.run(&format!(
                "<presence type='subscribe' from='{from}' to='alice@{D}'/>"
            ));
        }
        // A full JID or other letter case name the same buddy.
        assert_eq!(
            chat_to_service(&t, "Approve bob@example.net/pc"),
            "bob@example.net now sees your presence."
        );
        assert_eq!(
            chat_to_service(&t, "approve Carol@Example.NET"),
            "carol@example.net now sees your presence."
        );
    }

    #[test]
    fn the_first_forwarded_email_of_the_day_prompts_for_a_state_in_its_footer() {
        let t = Harness::new();
        t.run(&register_form(ALICE, "alice", "alice@mail.example.org", ""));
        let mut user = t.store.tx().user(ALICE).unwrap().unwrap();
        user.email.as_mut().unwrap().verified = true;
        t.store.tx().put_user(&user).unwrap();
        let footers = |t: &Harness| -> Vec<String> {
            t.run(&format!(
                "<message type='chat' from='{BOB}/pc' to='alice@{D}'><body>hi</body></message>"
            ));
            t.advance(60);
            t.actions(crate::core::Event::Tick)
                .into_iter()
                .filter_map(|a| match a {
                    crate::core::Action::SendEmail(job) => Some(job.email.footer),
                    _ => None,
                })
                .collect()
        };
        let prompted = |f: &str| f.contains("Reach now forwards your chats to this address");
        let first = footers(&t);
        assert_eq!(first.len(), 1);
        assert!(prompted(&first[0]), "{}", first[0]);
        assert!(first[0].starts_with("Reply to this email to answer bob"));
        assert!(!prompted(&footers(&t)[0]), "once a day");
        t.advance(86_400);
        assert!(prompted(&footers(&t)[0]), "the next day again");
    }
}
