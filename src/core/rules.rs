//! The user's rules: per-terminal preferences (when to forward, from whom, quiet hours, buddy
//! alerts, caps) and the routing decision they drive.
//!
//! Everything here is stored forever inside terminal records, so the serde shapes are part of the
//! store's format: add fields with defaults, never rename.

use serde::{Deserialize, Serialize};

use crate::core::model::{LocalState, TerminalKind};

/// When a terminal gets the user's messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ForwardWhen {
    /// Every message, whatever the user's XMPP presence.
    Always,
    /// Only while the user has no available XMPP resource.
    NoXmppResource,
    /// While the user's XMPP resources are all away, xa or dnd (after the grace delay), or offline.
    #[default]
    AwayOrOffline,
    /// Never.
    Never,
}

/// Whose messages a terminal gets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case", tag = "kind", content = "jids")]
pub enum SenderFilter {
    #[default]
    Everyone,
    /// Buddies in the reach address's roster (subscribed to it).
    Buddies,
    /// These bare JIDs only.
    List(Vec<String>),
}

/// What happens to a message during quiet hours.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum QuietAction {
    /// Keep it until the quiet hours end.
    #[default]
    Hold,
    /// Send it by email instead (if the user has a usable email terminal).
    Email,
}

/// Hours during which a terminal is not disturbed, in the user's time zone.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuietHours {
    /// Minutes after local midnight when the quiet hours start (e.g. 22:00 = 1320).
    pub start_minute: u16,
    /// Minutes after local midnight when they end (may be before the start: over midnight).
    pub end_minute: u16,
    /// IANA time zone name, e.g. "Europe/Berlin".
    pub time_zone: String,
    pub action: QuietAction,
}

/// A terminal's preferences. Defaults are DESIGN.md's: forward while away or offline, from
/// everyone, with the service's grace delay, no quiet hours, no alerts.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Preferences {
    pub when: ForwardWhen,
    /// Seconds an away user has to read a message before it is forwarded; `None`: the service's.
    pub grace_delay_secs: Option<u64>,
    pub senders: SenderFilter,
    pub quiet_hours: Option<QuietHours>,
    /// Forward subscription requests to this terminal (when the policy is to ask the user).
    pub forward_subscriptions: bool,
    /// Buddies (bare JIDs) whose online/offline changes are told on this terminal.
    pub alert_buddies: Vec<String>,
    /// Most forwards per day to this terminal; `None`: the service's cap.
    pub daily_cap: Option<u32>,
}

/// Who may subscribe to a user's reach address.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SubscriptionPolicy {
    /// Everyone is accepted (DESIGN.md's default).
    #[default]
    Auto,
    /// Only JIDs the user already talks with (existing conversations) are accepted; others are refused.
    BuddiesOnly,
    /// The user is asked (on their client or forwarding terminal) and approves with a command.
    Ask,
}

// ---- the routing decision (DESIGN.md, "Routing an incoming item") ----

/// What is being routed (step 1 of the decision, done by the caller).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ItemKind {
    /// A buddy's chat message with a text.
    Message,
    /// A buddy asks to see the reach address's presence (policy: ask the user).
    SubscriptionRequest,
    /// A buddy came online or went offline.
    BuddyPresence,
}

/// The user's XMPP presence: the best `show` among their own resources.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum XmppState {
    /// A resource is available with no `show` or `chat`: the user is at an XMPP client.
    Attentive,
    /// Resources are available, the best of them `away`, `xa` or `dnd`.
    Away,
    /// No available resource.
    Offline,
}

impl XmppState {
    /// Whether an XMPP client can be given the item now.
    pub fn is_available(self) -> bool {
        self != XmppState::Offline
    }
}

/// One terminal as the decision sees it.
#[derive(Debug, Clone)]
pub struct TerminalView<'a> {
    pub kind: TerminalKind,
    /// Verified, not STOPped, its service configured, its country allowed (preferences aside).
    pub usable: bool,
    /// The local state the user set from this terminal.
    pub state: LocalState,
    pub prefs: &'a Preferences,
    /// Forwards (for SMS: texts of any kind) sent to it today (UTC day).
    pub sent_today: u32,
    /// Most forwards today: the preference, never above the service's limit.
    pub cap: u32,
}

/// Everything the decision depends on.
#[derive(Debug, Clone)]
pub struct Situation<'a> {
    pub item: ItemKind,
    /// The buddy's bare JID.
    pub sender: &'a str,
    /// The sender receives the reach address's presence (an approved subscription).
    pub sender_is_buddy: bool,
    pub xmpp: XmppState,
    pub terminals: &'a [TerminalView<'a>],
    /// The terminal the user wants first among equals.
    pub primary: Option<TerminalKind>,
    /// Seconds since the Unix epoch.
    pub now: u64,
    /// The user's time zone, for quiet hours that name none.
    pub time_zone: Option<&'a str>,
    /// The service's grace delay, for terminals that set none.
    pub service_grace_secs: u64,
}

/// A forward to one terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Forward {
    pub terminal: TerminalKind,
    /// Not sent before this instant (seconds since the Unix epoch): now, after the grace delay,
    /// or at the end of the terminal's quiet hours. The email digest window is the caller's.
    pub not_before: u64,
    /// Sent whatever happens on XMPP (the terminal's preference is `Always`, or the item is no
    /// message): reading, answering or coming back to XMPP does not cancel it.
    pub unconditional: bool,
}

/// Where an item goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    /// Relay it to the user's XMPP clients now.
    pub to_xmpp: bool,
    /// Forward it to this terminal (at most one).
    pub forward: Option<Forward>,
    /// No client and no terminal may take it now: keep it until one may.
    pub hold_for_xmpp: bool,
}

/// The routing decision for one item: steps 2 to 4 of DESIGN.md's "Routing an incoming item".
///
/// - XMPP gets messages and subscription requests whenever the user has an available resource
///   (`Attentive` or `Away`); buddy presence never (the user's clients see their own roster).
/// - A terminal may take an item if it is usable, not in local state `Dnd`, under its daily cap,
///   and: for a message, its `when` allows the XMPP state and its `senders` the sender; for a
///   subscription request, `forward_subscriptions` is on; for buddy presence, the sender is in
///   its `alert_buddies`.
/// - Among those, ONE is picked: local state `Available` before `Away`, then the primary
///   terminal, then email before phone.
/// - When: now; after the grace delay for a message to an `AwayOrOffline` terminal while XMPP is
///   `Away`; during the terminal's quiet hours, at their end (action `Hold`) or by email instead
///   (action `Email`, if the email terminal may take the item; else held until the end). Buddy
///   presence alerts are never held: a terminal in quiet hours is passed over for them.
/// - Nothing is dropped: a message or subscription request that neither XMPP nor a terminal may
///   take is held for XMPP.
pub fn decide(s: &Situation) -> Decision {
    match s.item {
        ItemKind::Message | ItemKind::SubscriptionRequest => {
            let forward = choose(s, None, true);
            Decision {
                to_xmpp: s.xmpp.is_available(),
                forward,
                hold_for_xmpp: !s.xmpp.is_available() && forward.is_none(),
            }
        }
        ItemKind::BuddyPresence => Decision {
            to_xmpp: false,
            forward: choose(s, None, false),
            hold_for_xmpp: false,
        },
    }
}

/// The decision again when a pending forward falls due: the `planned` terminal if it may still
/// take the item, else the best other one; the grace delay is over, quiet hours still count.
/// `None`: no terminal may take it any more (the caller keeps it for XMPP).
pub fn recheck(s: &Situation, planned: Option<TerminalKind>) -> Option<Forward> {
    choose(s, planned, false)
}

/// The terminals that may take the item, best first (`first` ahead of the others if it may).
fn ranked<'s>(s: &'s Situation, first: Option<TerminalKind>) -> Vec<&'s TerminalView<'s>> {
    let mut candidates: Vec<&TerminalView> = s.terminals.iter().filter(|t| accepts(s, t)).collect();
    candidates.sort_by_key(|t| {
        (
            Some(t.kind) != first,
            t.state != LocalState::Available,
            Some(t.kind) != s.primary,
            kind_order(t.kind),
        )
    });
    candidates
}

fn kind_order(kind: TerminalKind) -> u8 {
    match kind {
        TerminalKind::Email => 0,
        TerminalKind::Phone => 1,
    }
}

/// Whether this terminal may take the item at all (quiet hours only change when).
fn accepts(s: &Situation, t: &TerminalView) -> bool {
    if !t.usable || t.state == LocalState::Dnd || t.sent_today >= t.cap {
        return false;
    }
    match s.item {
        ItemKind::Message => {
            when_allows(t.prefs.when, s.xmpp)
                && sender_allowed(&t.prefs.senders, s.sender, s.sender_is_buddy)
        }
        ItemKind::SubscriptionRequest => t.prefs.forward_subscriptions,
        ItemKind::BuddyPresence => t.prefs.alert_buddies.iter().any(|b| same_jid(b, s.sender)),
    }
}

fn when_allows(when: ForwardWhen, xmpp: XmppState) -> bool {
    match when {
        ForwardWhen::Always => true,
        ForwardWhen::NoXmppResource => xmpp == XmppState::Offline,
        ForwardWhen::AwayOrOffline => xmpp != XmppState::Attentive,
        ForwardWhen::Never => false,
    }
}

fn sender_allowed(filter: &SenderFilter, sender: &str, is_buddy: bool) -> bool {
    match filter {
        SenderFilter::Everyone => true,
        SenderFilter::Buddies => is_buddy,
        SenderFilter::List(jids) => jids.iter().any(|j| same_jid(j, sender)),
    }
}

fn same_jid(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}

/// Picks one terminal and when it gets the item.
fn choose(s: &Situation, first: Option<TerminalKind>, with_grace: bool) -> Option<Forward> {
    let alert = s.item == ItemKind::BuddyPresence;
    for t in ranked(s, first) {
        let earliest = if with_grace { after_grace(s, t) } else { s.now };
        let Some((end, action)) = quiet(s, t) else {
            return Some(forward_to(s, t, earliest));
        };
        if action == QuietAction::Email && t.kind != TerminalKind::Email {
            let email = s
                .terminals
                .iter()
                .find(|e| e.kind == TerminalKind::Email && accepts(s, e));
            if let Some(email) = email {
                let earliest = if with_grace {
                    after_grace(s, email)
                } else {
                    s.now
                };
                match quiet(s, email) {
                    None => return Some(forward_to(s, email, earliest)),
                    Some((email_end, _)) if !alert => {
                        return Some(forward_to(s, email, earliest.max(email_end)))
                    }
                    Some(_) => {}
                }
            }
        }
        if !alert {
            return Some(forward_to(s, t, earliest.max(end)));
        }
        // Alerts are not held: the next terminal, if any, may tell it now.
    }
    None
}

fn forward_to(s: &Situation, t: &TerminalView, not_before: u64) -> Forward {
    Forward {
        terminal: t.kind,
        not_before,
        unconditional: s.item != ItemKind::Message || t.prefs.when == ForwardWhen::Always,
    }
}

/// Now, or after the grace delay when the user's clients are away (messages to `AwayOrOffline`
/// terminals only: `Always` means at once).
fn after_grace(s: &Situation, t: &TerminalView) -> u64 {
    let graced = s.item == ItemKind::Message
        && s.xmpp == XmppState::Away
        && t.prefs.when == ForwardWhen::AwayOrOffline;
    if graced {
        s.now + t.prefs.grace_delay_secs.unwrap_or(s.service_grace_secs)
    } else {
        s.now
    }
}

/// The end of the terminal's current quiet period and what to do meanwhile, if it is in one.
fn quiet(s: &Situation, t: &TerminalView) -> Option<(u64, QuietAction)> {
    let q = t.prefs.quiet_hours.as_ref()?;
    let zone = if q.time_zone.trim().is_empty() {
        s.time_zone.unwrap_or("UTC")
    } else {
        q.time_zone.as_str()
    };
    quiet_end(q, zone, s.now).map(|end| (end, q.action))
}

/// The end of the current quiet period (seconds since the Unix epoch) if `now` is inside one, in
/// the quiet hours' own time zone (an unknown or empty zone counts as UTC). Equal start and end
/// mean no quiet hours. A local end time skipped by a daylight saving change ends them when the
/// clocks jump; one that occurs twice ends them at its first occurrence after `now`.
pub fn quiet_until(q: &QuietHours, now: u64) -> Option<u64> {
    quiet_end(q, &q.time_zone, now)
}

fn quiet_end(q: &QuietHours, zone: &str, now: u64) -> Option<u64> {
    use chrono::{Duration, LocalResult, TimeZone, Timelike};

    const DAY: u16 = 24 * 60;
    let (start, end) = (q.start_minute % DAY, q.end_minute % DAY);
    if start == end {
        return None;
    }
    let tz: chrono_tz::Tz = zone.trim().parse().unwrap_or(chrono_tz::UTC);
    let local = tz.timestamp_opt(i64::try_from(now).ok()?, 0).single()?;
    let minute = (local.hour() * 60 + local.minute()) as u16;
    let today = local.date_naive();
    let end_day = if start < end {
        (start..end).contains(&minute).then_some(today)?
    } else if minute >= start {
        today.succ_opt()?
    } else if minute < end {
        today
    } else {
        return None;
    };
    let end_local = end_day.and_hms_opt(u32::from(end / 60), u32::from(end % 60), 0)?;
    // Daylight saving gaps are at most a few hours: the first local minute that exists.
    (0..=24 * 60).find_map(|skip| {
        let instants = match tz.from_local_datetime(&(end_local + Duration::minutes(skip))) {
            LocalResult::Single(t) => vec![t],
            LocalResult::Ambiguous(a, b) => vec![a, b],
            LocalResult::None => return None,
        };
        instants
            .into_iter()
            .map(|t| t.timestamp())
            .find(|t| *t > now as i64)
            .map(|t| t as u64)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    #[allow(unused_imports)]
    use crate::core::Transaction;
    use chrono::TimeZone;

    const BOB: &str = "bob@example.net";
    /// 2026-11-18T11:06:40Z: quiet hours 11:00–12:00 UTC (`quiet`) end 3200 s later.
    const NOW: u64 = 1_795_000_000;

    fn utc(y: i32, mo: u32, d: u32, h: u32, mi: u32) -> u64 {
        chrono::Utc
            .with_ymd_and_hms(y, mo, d, h, mi, 0)
            .unwrap()
            .timestamp() as u64
    }

    fn quiet_hours(start: u16, end: u16, zone: &str, action: QuietAction) -> QuietHours {
        QuietHours {
            start_minute: start,
            end_minute: end,
            time_zone: zone.into(),
            action,
        }
    }

    /// One terminal written as `E` or `P` with `.`-separated modifiers: when (`always`,
    /// `noxmpp`, `never`), senders (`buddies`, `list`: Bob is on it, `other`: he is not), local
    /// state (`away`, `dnd`), `off` (unusable), `cap` (cap reached), `graceN`, `quiet` (hold until
    /// 12:00 UTC), `quietmail` (email instead), `subs`, `alert` (Bob's presence).
    struct Spec {
        kind: TerminalKind,
        usable: bool,
        state: LocalState,
        prefs: Preferences,
        sent_today: u32,
    }

    fn spec(text: &str) -> Spec {
        let mut parts = text.split('.');
        let kind = match parts.next() {
            Some("E") => TerminalKind::Email,
            Some("P") => TerminalKind::Phone,
            other => panic!("bad terminal {other:?}"),
        };
        let mut s = Spec {
            kind,
            usable: true,
            state: LocalState::Available,
            prefs: Preferences::default(),
            sent_today: 0,
        };
        for m in parts {
            match m {
                "always" => s.prefs.when = ForwardWhen::Always,
                "noxmpp" => s.prefs.when = ForwardWhen::NoXmppResource,
                "never" => s.prefs.when = ForwardWhen::Never,
                "buddies" => s.prefs.senders = SenderFilter::Buddies,
                "list" => s.prefs.senders = SenderFilter::List(vec!["Bob@Example.net".into()]),
                "other" => s.prefs.senders = SenderFilter::List(vec!["carol@example.net".into()]),
                "away" => s.state = LocalState::Away,
                "dnd" => s.state = LocalState::Dnd,
                "off" => s.usable = false,
                "cap" => s.sent_today = 10,
                "quiet" => {
                    s.prefs.quiet_hours = Some(quiet_hours(660, 720, "UTC", QuietAction::Hold))
                }
                "quietmail" => {
                    s.prefs.quiet_hours = Some(quiet_hours(660, 720, "UTC", QuietAction::Email))
                }
                "subs" => s.prefs.forward_subscriptions = true,
                "alert" => s.prefs.alert_buddies = vec![BOB.into()],
                grace if grace.starts_with("grace") => {
                    s.prefs.grace_delay_secs = Some(grace[5..].parse().unwrap())
                }
                other => panic!("bad modifier {other}"),
            }
        }
        s
    }

    /// `X` to XMPP, `H` held, `E+N`/`P+N` forwarded N seconds from now (`*`: unconditional),
    /// `-` nothing at all.
    fn render(d: &Decision) -> String {
        let mut parts = Vec::new();
        if d.to_xmpp {
            parts.push("X".to_owned());
        }
        if let Some(f) = d.forward {
            let kind = match f.terminal {
                TerminalKind::Email => "E",
                TerminalKind::Phone => "P",
            };
            let star = if f.unconditional { "*" } else { "" };
            parts.push(format!("{kind}+{}{star}", f.not_before - NOW));
        }
        if d.hold_for_xmpp {
            parts.push("H".to_owned());
        }
        if parts.is_empty() {
            "-".to_owned()
        } else {
            parts.join(" ")
        }
    }

    fn run(
        item: ItemKind,
        xmpp: XmppState,
        terminals: &str,
        primary: Option<TerminalKind>,
        buddy: bool,
    ) -> String {
        let specs: Vec<Spec> = terminals.split_whitespace().map(spec).collect();
        let views: Vec<TerminalView> = specs
            .iter()
            .map(|s| TerminalView {
                kind: s.kind,
                usable: s.usable,
                state: s.state,
                prefs: &s.prefs,
                sent_today: s.sent_today,
                cap: 10,
            })
            .collect();
        render(&decide(&Situation {
            item,
            sender: BOB,
            sender_is_buddy: buddy,
            xmpp,
            terminals: &views,
            primary,
            now: NOW,
            time_zone: None,
            service_grace_secs: 120,
        }))
    }

    /// item, XMPP state, terminals, primary, sender is a buddy, decision.
    type Row<'a> = (
        ItemKind,
        XmppState,
        &'a str,
        Option<TerminalKind>,
        bool,
        &'a str,
    );

    #[test]
    fn the_decision_table() {
        use ItemKind::{BuddyPresence as Pres, Message as Msg, SubscriptionRequest as Sub};
        use TerminalKind::{Email as E, Phone as P};
        use XmppState::{Attentive as Att, Away, Offline as Off};
        #[rustfmt::skip]
        let rows: &[Row] = &[
            // item  xmpp  terminals                   primary  buddy  decision
            // Defaults: XMPP while available; email first, else phone; grace while away.
            (Msg,  Att,  "E P",                       None,    false, "X"),
            (Msg,  Away, "E P",                       None,    false, "X E+120"),
            (Msg,  Off,  "E P",                       None,    false, "E+0"),
            (Msg,  Off,  "P",                         None,    false, "P+0"),
            (Msg,  Away, "P",                         None,    false, "X P+120"),
            (Msg,  Away, "P.grace30",                 None,    false, "X P+30"),
            (Msg,  Off,  "",                          None,    false, "H"),
            (Msg,  Away, "",                          None,    false, "X"),
            // When.
            (Msg,  Att,  "E.always P",                None,    false, "X E+0*"),
            (Msg,  Away, "E.always P",                None,    false, "X E+0*"),
            (Msg,  Off,  "E.always",                  None,    false, "E+0*"),
            (Msg,  Att,  "E P.always",                None,    false, "X P+0*"),
            (Msg,  Away, "E.noxmpp P",                None,    false, "X P+120"),
            (Msg,  Away, "E.noxmpp",                  None,    false, "X"),
            (Msg,  Off,  "E.noxmpp P",                None,    false, "E+0"),
            (Msg,  Off,  "E.never P",                 None,    false, "P+0"),
            (Msg,  Off,  "E.never P.never",           None,    false, "H"),
            (Msg,  Att,  "E.never P.never",           None,    false, "X"),
            // Senders.
            (Msg,  Off,  "E.buddies P",               None,    false, "P+0"),
            (Msg,  Off,  "E.buddies P.buddies",       None,    false, "H"),
            (Msg,  Off,  "E.buddies P.buddies",       None,    true,  "E+0"),
            (Msg,  Off,  "P.list",                    None,    false, "P+0"),
            (Msg,  Off,  "P.other",                   None,    true,  "H"),
            (Msg,  Away, "P.other",                   None,    false, "X"),
            // Local states: dnd never, available before away.
            (Msg,  Off,  "E.dnd P",                   None,    false, "P+0"),
            (Msg,  Off,  "E.dnd P.dnd",               None,    false, "H"),
            (Msg,  Off,  "E.away P",                  None,    false, "P+0"),
            (Msg,  Off,  "E.away P.away",             None,    false, "E+0"),
            (Msg,  Off,  "E.away",                    None,    false, "E+0"),
            // Primary first among equals.
            (Msg,  Off,  "E P",                       Some(P), false, "P+0"),
            (Msg,  Away, "E P",                       Some(P), false, "X P+120"),
            (Msg,  Off,  "E P.away",                  Some(P), false, "E+0"),
            (Msg,  Off,  "E.away P",                  Some(E), false, "P+0"),
            // Unusable terminals and caps.
            (Msg,  Off,  "E.off P",                   None,    false, "P+0"),
            (Msg,  Off,  "E.off P.off",               None,    false, "H"),
            (Msg,  Off,  "E P.cap",                   Some(P), false, "E+0"),
            (Msg,  Off,  "P.cap",                     None,    false, "H"),
            // Quiet hours: hold until they end, or email instead.
            (Msg,  Off,  "P.quiet",                   None,    false, "P+3200"),
            (Msg,  Away, "P.quiet",                   None,    false, "X P+3200"),
            (Msg,  Away, "P.quiet.grace3600",         None,    false, "X P+3600"),
            (Msg,  Att,  "P.quiet.always",            None,    false, "X P+3200*"),
            (Msg,  Off,  "E.quiet P",                 None,    false, "E+3200"),
            (Msg,  Off,  "E P.quietmail",             Some(P), false, "E+0"),
            (Msg,  Away, "E P.quietmail",             Some(P), false, "X E+120"),
            (Msg,  Off,  "P.quietmail",               None,    false, "P+3200"),
            (Msg,  Off,  "E.never P.quietmail",       None,    false, "P+3200"),
            (Msg,  Off,  "E.dnd P.quietmail",         None,    false, "P+3200"),
            (Msg,  Off,  "E.quiet P.quietmail",       Some(P), false, "E+3200"),
            (Msg,  Off,  "E.quietmail",               None,    false, "E+3200"),
            // Subscription requests: to opted-in terminals, XMPP while available, else held.
            (Sub,  Att,  "E P",                       None,    false, "X"),
            (Sub,  Off,  "E P",                       None,    false, "H"),
            (Sub,  Off,  "E P.subs",                  None,    false, "P+0*"),
            (Sub,  Att,  "E P.subs",                  None,    false, "X P+0*"),
            (Sub,  Away, "P.subs",                    None,    false, "X P+0*"),
            (Sub,  Off,  "E.never.subs",              None,    false, "E+0*"),
            (Sub,  Off,  "P.subs.dnd",                None,    false, "H"),
            (Sub,  Off,  "P.subs.quiet",              None,    false, "P+3200*"),
            (Sub,  Off,  "E.subs P.subs.quietmail",   Some(P), false, "E+0*"),
            // Buddy presence: only terminals alerting for the buddy; never XMPP, never held.
            (Pres, Att,  "E P",                       None,    true,  "-"),
            (Pres, Off,  "E P",                       None,    true,  "-"),
            (Pres, Off,  "E P.alert",                 None,    true,  "P+0*"),
            (Pres, Att,  "P.alert",                   None,    true,  "P+0*"),
            (Pres, Away, "P.alert.never",             None,    true,  "P+0*"),
            (Pres, Off,  "P.alert.dnd",               None,    true,  "-"),
            (Pres, Off,  "P.alert.cap",               None,    true,  "-"),
            (Pres, Off,  "P.alert.off",               None,    true,  "-"),
            (Pres, Off,  "P.alert.quiet",             None,    true,  "-"),
            (Pres, Off,  "E.alert P.alert.quiet",     Some(P), true,  "E+0*"),
            (Pres, Off,  "E P.alert.quietmail",       None,    true,  "-"),
            (Pres, Off,  "E.alert P.alert.quietmail", Some(P), true,  "E+0*"),
            (Pres, Off,  "E.alert.quiet P.alert",     None,    true,  "P+0*"),
        ];
        let mut wrong = Vec::new();
        for (i, (item, xmpp, terminals, primary, buddy, want)) in rows.iter().enumerate() {
            let got = run(*item, *xmpp, terminals, *primary, *buddy);
            if got != *want {
                wrong.push(format!(
                    "row {i}: {item:?} {xmpp:?} {terminals:?} {primary:?} buddy={buddy}: got {got:?}, want {want:?}"
                ));
            }
        }
        assert!(wrong.is_empty(), "\n{}", wrong.join("\n"));
    }

    #[test]
    fn recheck_keeps_the_planned_terminal_while_it_may_take_the_item() {
        let specs = [spec("E"), spec("P")];
        let views: Vec<TerminalView> = specs
            .iter()
            .map(|s| TerminalView {
                kind: s.kind,
                usable: s.usable,
                state: s.state,
                prefs: &s.prefs,
                sent_today: s.sent_today,
                cap: 10,
            })
            .collect();
        let s = Situation {
            item: ItemKind::Message,
            sender: BOB,
            sender_is_buddy: false,
            xmpp: XmppState::Away,
            terminals: &views,
            primary: None,
            now: NOW,
            time_zone: None,
            service_grace_secs: 120,
        };
        let planned = recheck(&s, Some(TerminalKind::Phone)).unwrap();
        assert_eq!(
            (planned.terminal, planned.not_before),
            (TerminalKind::Phone, NOW)
        );
        assert_eq!(recheck(&s, None).unwrap().terminal, TerminalKind::Email);
        let only_email = &views[..1];
        let s = Situation {
            terminals: only_email,
            ..s
        };
        assert_eq!(
            recheck(&s, Some(TerminalKind::Phone)).unwrap().terminal,
            TerminalKind::Email
        );
    }

    #[test]
    fn quiet_hours_over_midnight() {
        let q = quiet_hours(22 * 60, 7 * 60, "UTC", QuietAction::Hold);
        let day = |h, m| utc(2026, 1, 15, h, m);
        assert_eq!(quiet_until(&q, day(21, 59)), None);
        assert_eq!(quiet_until(&q, day(22, 0)), Some(utc(2026, 1, 16, 7, 0)));
        assert_eq!(quiet_until(&q, day(23, 59)), Some(utc(2026, 1, 16, 7, 0)));
        assert_eq!(quiet_until(&q, day(0, 0)), Some(day(7, 0)));
        assert_eq!(quiet_until(&q, day(6, 59)), Some(day(7, 0)));
        assert_eq!(quiet_until(&q, day(7, 0)), None);
        assert_eq!(quiet_until(&q, day(12, 0)), None);
        // Over the end of a month and a year.
        assert_eq!(
            quiet_until(&q, utc(2026, 12, 31, 23, 0)),
            Some(utc(2027, 1, 1, 7, 0))
        );
    }

    #[test]
    fn quiet_hours_within_a_day_and_degenerate_ones() {
        let q = quiet_hours(9 * 60, 17 * 60, "UTC", QuietAction::Hold);
        assert_eq!(quiet_until(&q, utc(2026, 5, 1, 8, 59)), None);
        assert_eq!(
            quiet_until(&q, utc(2026, 5, 1, 9, 0)),
            Some(utc(2026, 5, 1, 17, 0))
        );
        assert_eq!(quiet_until(&q, utc(2026, 5, 1, 17, 0)), None);
        let never = quiet_hours(600, 600, "UTC", QuietAction::Hold);
        assert_eq!(quiet_until(&never, utc(2026, 5, 1, 10, 0)), None);
        // An unknown zone counts as UTC.
        let bad = quiet_hours(9 * 60, 17 * 60, "Mars/Olympus", QuietAction::Hold);
        assert_eq!(
            quiet_until(&bad, utc(2026, 5, 1, 12, 0)),
            Some(utc(2026, 5, 1, 17, 0))
        );
    }

    #[test]
    fn quiet_hours_follow_the_zone_across_daylight_saving_changes() {
        let night = quiet_hours(22 * 60, 7 * 60, "Europe/Berlin", QuietAction::Hold);
        // Winter: 23:00 CET is 22:00 UTC; 07:00 CET is 06:00 UTC.
        assert_eq!(
            quiet_until(&night, utc(2026, 1, 10, 22, 0)),
            Some(utc(2026, 1, 11, 6, 0))
        );
        // Clocks go forward on 2026-03-29: 23:00 CET → 07:00 CEST is only 7 hours.
        assert_eq!(
            quiet_until(&night, utc(2026, 3, 28, 22, 0)),
            Some(utc(2026, 3, 29, 5, 0))
        );
        // 21:30 UTC on 03-28 is 22:30 CET: quiet; 20:59 UTC is 21:59 CET: not.
        assert!(quiet_until(&night, utc(2026, 3, 28, 21, 30)).is_some());
        assert_eq!(quiet_until(&night, utc(2026, 3, 28, 20, 59)), None);
        // Clocks go back on 2026-10-25: 23:00 CEST → 07:00 CET is 9 hours.
        assert_eq!(
            quiet_until(&night, utc(2026, 10, 24, 21, 0)),
            Some(utc(2026, 10, 25, 6, 0))
        );
        // Summer: 22:00 CEST is 20:00 UTC.
        assert_eq!(
            quiet_until(&night, utc(2026, 7, 1, 20, 0)),
            Some(utc(2026, 7, 2, 5, 0))
        );
        assert_eq!(quiet_until(&night, utc(2026, 7, 1, 19, 59)), None);

        // An end that the spring change skips (02:30 does not exist): the jump to 03:00 CEST.
        let early = quiet_hours(60, 150, "Europe/Berlin", QuietAction::Hold);
        assert_eq!(
            quiet_until(&early, utc(2026, 3, 29, 0, 30)),
            Some(utc(2026, 3, 29, 1, 0))
        );
        // An end that the autumn change repeats: the first 02:30 (CEST) if still ahead...
        assert_eq!(
            quiet_until(&early, utc(2026, 10, 24, 23, 30)),
            Some(utc(2026, 10, 25, 0, 30))
        );
        // ...else the second one (CET), for 02:10 CET after the change.
        assert_eq!(
            quiet_until(&early, utc(2026, 10, 25, 1, 10)),
            Some(utc(2026, 10, 25, 1, 30))
        );
    }

    #[test]
    fn quiet_hours_without_a_zone_use_the_users() {
        let mut prefs = Preferences {
            quiet_hours: Some(quiet_hours(22 * 60, 7 * 60, "", QuietAction::Hold)),
            ..Preferences::default()
        };
        let now = utc(2026, 1, 10, 21, 30); // 22:30 in Berlin, 21:30 in UTC.
        let decide_in = |prefs: &Preferences, zone: Option<&str>| {
            let views = [TerminalView {
                kind: TerminalKind::Phone,
                usable: true,
                state: LocalState::Available,
                prefs,
                sent_today: 0,
                cap: 10,
            }];
            decide(&Situation {
                item: ItemKind::Message,
                sender: BOB,
                sender_is_buddy: false,
                xmpp: XmppState::Offline,
                terminals: &views,
                primary: None,
                now,
                time_zone: zone,
                service_grace_secs: 120,
            })
            .forward
            .unwrap()
            .not_before
        };
        assert_eq!(
            decide_in(&prefs, Some("Europe/Berlin")),
            utc(2026, 1, 11, 6, 0)
        );
        assert_eq!(decide_in(&prefs, None), now);
        // The quiet hours' own zone wins over the user's.
        prefs.quiet_hours.as_mut().unwrap().time_zone = "UTC".into();
        assert_eq!(decide_in(&prefs, Some("Europe/Berlin")), now);
    }
}
