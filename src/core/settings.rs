//! The user's settings, as every door sees them: terminals (add, remove, primary), their local
//! states, their preferences, and the account-wide time zone and subscription policy.
//!
//! Each operation validates what the user typed and applies it, or changes nothing and says which
//! field is wrong ([`Invalid`], e.g. "quiet hours start: '25:00' is not a time like 22:30"). The
//! ad-hoc forms (`adhoc.rs`) and the chat lines (`commands.rs`) both go through here, with the same
//! raw text in a [`Draft`], so they cannot disagree; the descriptions in words (`status`, `prefs`,
//! `terminals`) live here too, so both doors say the same sentences.
//!
//! This module knows neither forms nor chat syntax: the doors turn their input into strings and
//! show the sentences they get back.

use chrono_tz::Tz;

use super::rules::{
    ForwardWhen, Preferences, QuietAction, QuietHours, SenderFilter, SubscriptionPolicy,
};
use super::{Core, Out};
use crate::address::{Email, Phone};
use crate::core::model::{LocalState, StoreError, Terminal, TerminalKind, User};
use crate::core::Transaction;

/// A value the user gave was refused: the field as the user knows it, and why. Nothing was
/// changed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {problem}")]
pub(super) struct Invalid {
    pub field: &'static str,
    pub problem: String,
}

impl Invalid {
    pub(super) fn new(field: &'static str, problem: impl Into<String>) -> Invalid {
        Invalid {
            field,
            problem: problem.into(),
        }
    }
}

/// What an operation decided: the sentence saying what was done, or why nothing was.
pub(super) type Decision = Result<String, Vec<Invalid>>;

/// The field names used in [`Invalid`], shared with the doors that lay out the fields.
pub(super) mod field {
    pub const TERMINAL: &str = "terminal";
    /// The ad-hoc `terminals` command's first choice.
    pub const ACTION: &str = "action";
    pub const EMAIL: &str = "email";
    pub const PHONE: &str = "phone";
    pub const STATE: &str = "state";
    pub const WHEN: &str = "when";
    pub const GRACE: &str = "grace delay";
    pub const SENDERS: &str = "senders";
    pub const QUIET_START: &str = "quiet hours start";
    pub const QUIET_END: &str = "quiet hours end";
    pub const QUIET_ACTION: &str = "quiet hours action";
    pub const TIME_ZONE: &str = "time zone";
    pub const SUBSCRIPTIONS: &str = "forward subscription requests";
    pub const ALERTS: &str = "buddy alerts";
    pub const DAILY_CAP: &str = "daily cap";
    pub const POLICY: &str = "subscription policy";
    pub const ADDRESS: &str = "address";
}

/// Longest grace delay a user may ask for: a day.
const MAX_GRACE_SECS: u64 = 86_400;
/// Largest daily cap a user may set where the service has none of its own.
const MAX_DAILY_CAP: u32 = 10_000;
/// Most buddies in a sender list or an alert list.
const MAX_JIDS: usize = 100;

// ---- words ----

/// `email` or `phone`: the word both doors use for a terminal kind.
pub(super) fn kind_word(kind: TerminalKind) -> &'static str {
    match kind {
        TerminalKind::Email => "email",
        TerminalKind::Phone => "phone",
    }
}

fn kind_title(kind: TerminalKind) -> &'static str {
    match kind {
        TerminalKind::Email => "Email",
        TerminalKind::Phone => "Phone",
    }
}

/// "your email address alice@…" / "your phone +1…".
fn kind_noun(kind: TerminalKind, address: &str) -> String {
    match kind {
        TerminalKind::Email => format!("your email address {address}"),
        TerminalKind::Phone => format!("your phone {address}"),
    }
}

/// A terminal kind as typed (`email`, `phone`; `mail`, `sms` too).
pub(super) fn parse_kind(text: &str) -> Result<TerminalKind, Invalid> {
    match text.trim().to_lowercase().as_str() {
        "email" | "mail" | "e-mail" => Ok(TerminalKind::Email),
        "phone" | "sms" => Ok(TerminalKind::Phone),
        _ => Err(Invalid::new(
            field::TERMINAL,
            format!("'{}' is not a terminal: say email or phone", shown(text)),
        )),
    }
}

pub(super) fn state_word(state: LocalState) -> &'static str {
    match state {
        LocalState::Available => "available",
        LocalState::Away => "away",
        LocalState::Dnd => "dnd",
    }
}

fn state_words(state: LocalState) -> &'static str {
    match state {
        LocalState::Available => "available",
        LocalState::Away => "away",
        LocalState::Dnd => "do not disturb",
    }
}

/// A local state as typed.
pub(super) fn parse_state(text: &str) -> Result<LocalState, Invalid> {
    match text.trim().to_lowercase().as_str() {
        "available" | "back" | "online" => Ok(LocalState::Available),
        "away" => Ok(LocalState::Away),
        "dnd" | "do-not-disturb" | "do_not_disturb" => Ok(LocalState::Dnd),
        _ => Err(Invalid::new(
            field::STATE,
            format!(
                "'{}' is not one of available, away, dnd",
                shown(text.trim())
            ),
        )),
    }
}

/// The `when` choices: (value, label).
pub(super) const WHEN_CHOICES: &[(&str, &str)] = &[
    ("always", "Always, even while I am at an XMPP client"),
    (
        "no_xmpp_resource",
        "Only while none of my XMPP clients is online",
    ),
    (
        "away_or_offline",
        "While my XMPP clients are away or offline",
    ),
    ("never", "Never"),
];

pub(super) fn when_word(when: ForwardWhen) -> &'static str {
    match when {
        ForwardWhen::Always => "always",
        ForwardWhen::NoXmppResource => "no_xmpp_resource",
        ForwardWhen::AwayOrOffline => "away_or_offline",
        ForwardWhen::Never => "never",
    }
}

fn when_words(when: ForwardWhen) -> &'static str {
    match when {
        ForwardWhen::Always => "always, even while you are at an XMPP client",
        ForwardWhen::NoXmppResource => "only while none of your XMPP clients is online",
        ForwardWhen::AwayOrOffline => "while your XMPP clients are away or offline",
        ForwardWhen::Never => "nothing is forwarded here",
    }
}

/// The `senders` choices: (value, label).
pub(super) const SENDER_CHOICES: &[(&str, &str)] = &[
    ("everyone", "Everyone"),
    ("buddies", "Buddies (subscribed to my reach address)"),
    ("list", "Only the JIDs listed below"),
];

/// The quiet hours actions: (value, label).
pub(super) const QUIET_ACTION_CHOICES: &[(&str, &str)] = &[
    ("hold", "Hold messages until the quiet hours end"),
    ("email", "Send them by email instead"),
];

fn quiet_action_word(action: QuietAction) -> &'static str {
    match action {
        QuietAction::Hold => "hold",
        QuietAction::Email => "email",
    }
}

/// The subscription policies: (value, label).
pub(super) const POLICY_CHOICES: &[(&str, &str)] = &[
    ("auto", "Everyone who asks"),
    ("buddies_only", "Only people I already talk with"),
    ("ask", "Ask me about each request"),
];

/// Where buddies reach the user (integrated mode): her own JID or her reach address.
pub(super) const ADDRESS_CHOICES: &[(&str, &str)] = &[
    ("reach", "At my reach address"),
    (
        "own",
        "At my own address (my server copies my messages to Reach)",
    ),
];

pub(super) fn address_word(user: &User) -> &'static str {
    if user.integrated {
        "own"
    } else {
        "reach"
    }
}

fn parse_address(text: &str) -> Result<bool, Invalid> {
    match choice(text).as_str() {
        "own" | "mine" | "my" | "jid" => Ok(true),
        "reach" | "reach_address" => Ok(false),
        _ => Err(Invalid::new(
            field::ADDRESS,
            format!("'{}' is not one of own, reach", shown(text.trim())),
        )),
    }
}

/// Whether the user's server lets her be reached at her own address; the reason if not.
fn own_address_refusal(
    core: &Core,
    store: &mut dyn Transaction,
    user: &User,
) -> Result<Option<Invalid>, StoreError> {
    let host = user.jid.rsplit_once('@').map_or("", |(_, h)| h);
    if !core.settings.integrated_hosts.iter().any(|h| h == host) {
        return Ok(Some(Invalid::new(
            field::ADDRESS,
            format!(
                "your server {host} does not copy your messages to Reach (integrated mode is not \
                 set up for it): buddies reach you at your reach address"
            ),
        )));
    }
    if !store
        .host_privileges(host)?
        .is_some_and(|p| p.send_as_users)
    {
        return Ok(Some(Invalid::new(
            field::ADDRESS,
            format!(
                "your server {host} has not allowed Reach to send messages as you (XEP-0356): \
                 ask its admin"
            ),
        )));
    }
    Ok(None)
}

pub(super) fn policy_word(policy: SubscriptionPolicy) -> &'static str {
    match policy {
        SubscriptionPolicy::Auto => "auto",
        SubscriptionPolicy::BuddiesOnly => "buddies_only",
        SubscriptionPolicy::Ask => "ask",
    }
}

fn policy_words(policy: SubscriptionPolicy) -> &'static str {
    match policy {
        SubscriptionPolicy::Auto => "everyone who asks may subscribe to your reach address",
        SubscriptionPolicy::BuddiesOnly => "only people you already talk with may subscribe",
        SubscriptionPolicy::Ask => "you are asked about each subscription request",
    }
}

/// User input quoted back in an error: at most 40 characters, no control characters.
fn shown(text: &str) -> String {
    let clean: String = text.chars().filter(|c| !c.is_control()).collect();
    if clean.chars().count() > 40 {
        format!("{}…", clean.chars().take(40).collect::<String>())
    } else {
        clean
    }
}

/// A choice as typed: lower case, `-` and spaces as `_`.
fn choice(text: &str) -> String {
    text.trim().to_lowercase().replace(['-', ' '], "_")
}

// ---- a uniform view of the two terminal kinds ----

/// One of the user's terminals, whatever its kind.
pub(super) struct View<'a> {
    pub kind: TerminalKind,
    pub address: String,
    pub verified: bool,
    pub failing: bool,
    pub stopped: bool,
    pub state: LocalState,
    pub prefs: &'a Preferences,
}

fn view_of<A: std::fmt::Display>(kind: TerminalKind, t: &Terminal<A>) -> View<'_> {
    View {
        kind,
        address: t.address.to_string(),
        verified: t.verified,
        failing: t.failing,
        stopped: t.stopped,
        state: t.state,
        prefs: &t.prefs,
    }
}

/// The user's terminal of this kind.
pub(super) fn terminal(user: &User, kind: TerminalKind) -> Option<View<'_>> {
    match kind {
        TerminalKind::Email => user.email.as_ref().map(|t| view_of(kind, t)),
        TerminalKind::Phone => user.phone.as_ref().map(|t| view_of(kind, t)),
    }
}

/// The user's terminals: email first, then phone.
pub(super) fn terminals(user: &User) -> Vec<View<'_>> {
    [TerminalKind::Email, TerminalKind::Phone]
        .into_iter()
        .filter_map(|kind| terminal(user, kind))
        .collect()
}

fn prefs_mut(user: &mut User, kind: TerminalKind) -> Option<&mut Preferences> {
    match kind {
        TerminalKind::Email => user.email.as_mut().map(|t| &mut t.prefs),
        TerminalKind::Phone => user.phone.as_mut().map(|t| &mut t.prefs),
    }
}

fn state_mut(user: &mut User, kind: TerminalKind) -> Option<&mut LocalState> {
    match kind {
        TerminalKind::Email => user.email.as_mut().map(|t| &mut t.state),
        TerminalKind::Phone => user.phone.as_mut().map(|t| &mut t.state),
    }
}

pub(super) fn no_terminal(kind: TerminalKind) -> Invalid {
    let word = kind_word(kind);
    let how = match kind {
        TerminalKind::Email => "add email ADDRESS",
        TerminalKind::Phone => "add phone NUMBER",
    };
    Invalid::new(
        field::TERMINAL,
        format!("you have no {word} terminal (add one with: {how})"),
    )
}

/// The kinds of terminal this service can forward to.
pub(super) fn offered_kinds(core: &Core) -> Vec<TerminalKind> {
    let mut kinds = Vec::new();
    if core.settings.email.is_some() {
        kinds.push(TerminalKind::Email);
    }
    if core.settings.sms.is_some() {
        kinds.push(TerminalKind::Phone);
    }
    kinds
}

// ---- terminals ----

/// What storing an address did to the terminal slot.
enum Stored {
    /// The same address, already verified: nothing to do.
    AlreadyVerified,
    /// The same address, still waiting for its code.
    Waiting,
    /// A new terminal (replacing this address, if any).
    New { replaced: Option<String> },
}

/// Puts `address` in the slot. A new address starts unverified; the preferences of the terminal
/// it replaces are kept (they are the user's wishes for "my phone", not for one number).
fn store_address<A: PartialEq + std::fmt::Display>(
    slot: &mut Option<Terminal<A>>,
    address: A,
) -> Stored {
    match slot {
        Some(t) if t.address == address && t.verified => Stored::AlreadyVerified,
        Some(t) if t.address == address => Stored::Waiting,
        _ => {
            let old = slot.take();
            let replaced = old.as_ref().map(|t| t.address.to_string());
            let prefs = old.map(|t| t.prefs).unwrap_or_default();
            *slot = Some(Terminal {
                prefs,
                ..Terminal::unverified(address)
            });
            Stored::New { replaced }
        }
    }
}

/// `add email ADDRESS` / `add phone NUMBER`: stores the terminal unverified and sends it a code,
/// as registration does. A terminal of the same kind is replaced.
pub(super) fn add_terminal(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    kind: TerminalKind,
    text: &str,
    out: &mut Out,
) -> Result<Decision, StoreError> {
    let text = text.trim();
    let mut updated = user.clone();
    let stored = match kind {
        TerminalKind::Email => {
            if core.settings.email.is_none() {
                return refuse(field::EMAIL, "this service does not forward to email");
            }
            match Email::parse(text) {
                Ok(address) => store_address(&mut updated.email, address),
                Err(e) => return refuse(field::EMAIL, e.to_string()),
            }
        }
        TerminalKind::Phone => {
            let Some(sms) = &core.settings.sms else {
                return refuse(field::PHONE, "this service does not send SMS");
            };
            let number = match Phone::parse(text) {
                Ok(number) => number,
                Err(e) => return refuse(field::PHONE, e.to_string()),
            };
            if !super::sms::number_allowed(sms, number.as_str()) {
                return refuse(
                    field::PHONE,
                    format!("this service does not send SMS to {}", number.as_str()),
                );
            }
            if store
                .user_by_phone(number.as_str())?
                .is_some_and(|other| other.jid != user.jid)
            {
                return refuse(
                    field::PHONE,
                    "this number is already verified by another user",
                );
            }
            store_address(&mut updated.phone, number)
        }
    };
    let address = terminal(&updated, kind)
        .map(|t| t.address)
        .unwrap_or_default();
    let noun = kind_noun(kind, &address);
    let first = match stored {
        Stored::AlreadyVerified => {
            return Ok(Ok(format!(
                "{} is already one of your terminals, and verified.",
                capitalised(&noun)
            )))
        }
        Stored::Waiting => format!("{} is waiting for its code.", capitalised(&noun)),
        Stored::New { replaced: None } => format!("Added {noun}."),
        Stored::New {
            replaced: Some(old),
        } => format!("Replaced {old} with {noun}."),
    };
    // The caps on codes are checked before anything changes: a code Reach may not send refuses
    // the whole `add`, so flooding a mailbox or pumping SMS leaves the terminals as they were.
    if let Some(refusal) =
        super::limits::code_refusal(&core.settings.limits, store, now, &user.jid, kind, &address)?
    {
        tracing::info!(
            handle = user.handle.as_str(),
            kind = kind_word(kind),
            "terminal refused: verification code limit"
        );
        let field = match kind {
            TerminalKind::Email => field::EMAIL,
            TerminalKind::Phone => field::PHONE,
        };
        return refuse(field, refusal);
    }
    store.remove_verification(&user.jid, kind)?;
    store.put_user(&updated)?;
    let sent = match kind {
        TerminalKind::Email => super::email::start_verification(core, store, now, &updated, out)?,
        TerminalKind::Phone => super::sms::start_verification(core, store, now, &updated, out)?,
    };
    super::presence::refresh_global(core, store, now, &updated, out)?;
    tracing::info!(
        handle = user.handle.as_str(),
        kind = kind_word(kind),
        "terminal added"
    );
    Ok(Ok(match sent {
        Some(sent) => format!("{first} {sent}"),
        None => first,
    }))
}

/// `remove email|phone`: Reach forwards nothing there any more.
pub(super) fn remove_terminal(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    kind: TerminalKind,
    out: &mut Out,
) -> Result<Decision, StoreError> {
    let mut updated = user.clone();
    let removed = match kind {
        TerminalKind::Email => updated.email.take().map(|t| t.address.to_string()),
        TerminalKind::Phone => updated.phone.take().map(|t| t.address.to_string()),
    };
    let Some(address) = removed else {
        return Ok(Err(vec![no_terminal(kind)]));
    };
    if updated.primary == Some(kind) {
        updated.primary = None;
    }
    store.remove_verification(&user.jid, kind)?;
    store.put_user(&updated)?;
    super::presence::refresh_global(core, store, now, &updated, out)?;
    tracing::info!(
        handle = user.handle.as_str(),
        kind = kind_word(kind),
        "terminal removed"
    );
    Ok(Ok(format!(
        "Removed {}: Reach forwards nothing there any more.",
        kind_noun(kind, &address)
    )))
}

/// `primary email|phone`: the terminal that takes forwards first when several may.
pub(super) fn set_primary(
    store: &mut dyn Transaction,
    user: &User,
    kind: TerminalKind,
) -> Result<Decision, StoreError> {
    let Some(view) = terminal(user, kind) else {
        return Ok(Err(vec![no_terminal(kind)]));
    };
    let noun = kind_noun(kind, &view.address);
    if user.primary == Some(kind) {
        return Ok(Ok(format!(
            "{} is already your primary terminal.",
            capitalised(&noun)
        )));
    }
    let waiting = !view.verified;
    let mut updated = user.clone();
    updated.primary = Some(kind);
    store.put_user(&updated)?;
    let mut said = format!(
        "{} is now your primary terminal: it takes forwards first when several may.",
        capitalised(&noun)
    );
    if waiting {
        said.push_str(" It forwards nothing until it is verified.");
    }
    Ok(Ok(said))
}

/// `state email|phone available|away|dnd`, the ad-hoc `state`: a terminal's local state.
pub(super) fn set_state(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    kind: TerminalKind,
    state: LocalState,
    out: &mut Out,
) -> Result<Decision, StoreError> {
    let mut updated = user.clone();
    let Some(slot) = state_mut(&mut updated, kind) else {
        return Ok(Err(vec![no_terminal(kind)]));
    };
    *slot = state;
    let address = terminal(&updated, kind)
        .map(|t| t.address)
        .unwrap_or_default();
    store.put_user(&updated)?;
    super::presence::refresh_global(core, store, now, &updated, out)?;
    let noun = capitalised(&kind_noun(kind, &address));
    let seen = super::presence::seen_by_buddies(core, store, &updated)?;
    Ok(Ok(match state {
        LocalState::Available => format!("{noun} is available. Buddies see you: {seen}."),
        LocalState::Away => format!("{noun} is away. Buddies see you: {seen}."),
        LocalState::Dnd => format!(
            "{noun} is on do not disturb: nothing is forwarded there until you set it available. \
             Buddies see you: {seen}."
        ),
    }))
}

fn refuse(field: &'static str, problem: impl Into<String>) -> Result<Decision, StoreError> {
    Ok(Err(vec![Invalid::new(field, problem)]))
}

pub(super) fn capitalised(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

// ---- preferences ----

/// Preferences as typed, field by field: `None` leaves a field as it is. The ad-hoc form fills
/// every field it shows; a chat line fills one. Both are checked by the same [`save_preferences`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(super) struct Draft {
    /// One of [`WHEN_CHOICES`].
    pub when: Option<String>,
    /// Seconds; empty: the service's default.
    pub grace: Option<String>,
    /// One of [`SENDER_CHOICES`].
    pub senders: Option<String>,
    /// The JIDs for `senders = list` (each entry may hold several, separated by commas).
    pub sender_list: Option<Vec<String>>,
    /// `HH:MM`; empty start and end: no quiet hours.
    pub quiet_start: Option<String>,
    pub quiet_end: Option<String>,
    /// One of [`QUIET_ACTION_CHOICES`].
    pub quiet_action: Option<String>,
    /// An IANA name; empty: UTC. Account-wide.
    pub time_zone: Option<String>,
    /// A yes/no (`1`, `true`, `on`, `yes`...).
    pub forward_subscriptions: Option<String>,
    /// Bare JIDs whose comings and goings are told on this terminal.
    pub alerts: Option<Vec<String>>,
    /// Forwards a day; empty: the service's default.
    pub daily_cap: Option<String>,
    /// One of [`POLICY_CHOICES`]. Account-wide.
    pub policy: Option<String>,
    /// One of [`ADDRESS_CHOICES`]. Account-wide.
    pub address: Option<String>,
}

impl Draft {
    /// The current values of a terminal (or only the account-wide ones), as a form shows them.
    pub(super) fn current(user: &User, kind: Option<TerminalKind>) -> Draft {
        let account = Draft {
            time_zone: Some(user.time_zone.clone().unwrap_or_default()),
            policy: Some(policy_word(user.subscription_policy).to_owned()),
            address: Some(address_word(user).to_owned()),
            ..Draft::default()
        };
        let Some(view) = kind.and_then(|kind| terminal(user, kind)) else {
            return account;
        };
        let p = view.prefs;
        let (senders, list) = match &p.senders {
            SenderFilter::Everyone => ("everyone", Vec::new()),
            SenderFilter::Buddies => ("buddies", Vec::new()),
            SenderFilter::List(jids) => ("list", jids.clone()),
        };
        let (start, end, action) = match &p.quiet_hours {
            None => (String::new(), String::new(), QuietAction::Hold),
            Some(q) => (hhmm(q.start_minute), hhmm(q.end_minute), q.action),
        };
        Draft {
            when: Some(when_word(p.when).to_owned()),
            grace: Some(
                p.grace_delay_secs
                    .map(|s| s.to_string())
                    .unwrap_or_default(),
            ),
            senders: Some(senders.to_owned()),
            sender_list: Some(list),
            quiet_start: Some(start),
            quiet_end: Some(end),
            quiet_action: Some(quiet_action_word(action).to_owned()),
            forward_subscriptions: Some(if p.forward_subscriptions { "1" } else { "0" }.to_owned()),
            alerts: Some(p.alert_buddies.clone()),
            daily_cap: Some(p.daily_cap.map(|c| c.to_string()).unwrap_or_default()),
            ..account
        }
    }

    /// These values where given, `base`'s elsewhere: a form shown again after an error keeps what
    /// the user typed.
    pub(super) fn over(self, base: Draft) -> Draft {
        Draft {
            when: self.when.or(base.when),
            grace: self.grace.or(base.grace),
            senders: self.senders.or(base.senders),
            sender_list: self.sender_list.or(base.sender_list),
            quiet_start: self.quiet_start.or(base.quiet_start),
            quiet_end: self.quiet_end.or(base.quiet_end),
            quiet_action: self.quiet_action.or(base.quiet_action),
            time_zone: self.time_zone.or(base.time_zone),
            forward_subscriptions: self.forward_subscriptions.or(base.forward_subscriptions),
            alerts: self.alerts.or(base.alerts),
            daily_cap: self.daily_cap.or(base.daily_cap),
            policy: self.policy.or(base.policy),
            address: self.address.or(base.address),
        }
    }

    fn touches_terminal(&self) -> bool {
        self.when.is_some()
            || self.grace.is_some()
            || self.senders.is_some()
            || self.sender_list.is_some()
            || self.quiet_start.is_some()
            || self.quiet_end.is_some()
            || self.quiet_action.is_some()
            || self.forward_subscriptions.is_some()
            || self.alerts.is_some()
            || self.daily_cap.is_some()
    }
}

/// The typed values of a draft that passed every check.
#[derive(Debug, Default)]
struct Checked {
    when: Option<ForwardWhen>,
    grace: Option<Option<u64>>,
    senders: Option<SenderFilter>,
    /// `Some(None)`: quiet hours off.
    quiet: Option<Option<Quiet>>,
    time_zone: Option<Option<String>>,
    forward_subscriptions: Option<bool>,
    alerts: Option<Vec<String>>,
    daily_cap: Option<Option<u32>>,
    policy: Option<SubscriptionPolicy>,
    /// Reached at her own JID (true) or her reach address.
    address: Option<bool>,
}

/// Keeps a checked value, or notes why it was refused.
fn keep<T>(errors: &mut Vec<Invalid>, checked: Result<T, Invalid>) -> Option<T> {
    checked.map_err(|e| errors.push(e)).ok()
}

/// Checks and saves a draft for the terminal `kind` (or only the account-wide fields when `None`).
/// Every field is checked; if one is wrong, nothing at all is saved.
pub(super) fn save_preferences(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    kind: Option<TerminalKind>,
    draft: &Draft,
    out: &mut Out,
) -> Result<Decision, StoreError> {
    let checked = match (kind, draft.touches_terminal()) {
        (Some(kind), _) if terminal(user, kind).is_none() => {
            return Ok(Err(vec![no_terminal(kind)]))
        }
        (None, true) => {
            return refuse(
                field::TERMINAL,
                "choose the terminal these preferences are for",
            )
        }
        _ => match check(core, user, kind, draft) {
            Ok(checked) => checked,
            Err(errors) => return Ok(Err(errors)),
        },
    };
    if checked.address == Some(true) && !user.integrated {
        if let Some(refusal) = own_address_refusal(core, store, user)? {
            return Ok(Err(vec![refusal]));
        }
    }
    let mut updated = user.clone();
    apply(&mut updated, kind, checked);
    if user.integrated && !updated.integrated {
        // Back to the reach address: what only her server's copies brought waits no more
        // (her clients have it, from her server).
        for pending in store.pending_for(&user.jid)? {
            super::forward::cancel_pending(store, user, &pending.peer)?;
        }
    }
    if updated != *user {
        store.put_user(&updated)?;
        super::presence::refresh_global(core, store, now, &updated, out)?;
        tracing::info!(handle = user.handle.as_str(), "preferences changed");
    }
    let summary = match kind {
        Some(kind) => format!(
            "{}\n{}",
            describe_terminal(core, &updated, kind),
            account_lines(&updated)
        ),
        None => account_lines(&updated),
    };
    Ok(Ok(format!("Saved.\n{summary}")))
}

fn check(
    core: &Core,
    user: &User,
    kind: Option<TerminalKind>,
    draft: &Draft,
) -> Result<Checked, Vec<Invalid>> {
    let current = Draft::current(user, kind);
    let mut errors = Vec::new();
    let mut checked = Checked {
        time_zone: draft
            .time_zone
            .as_deref()
            .and_then(|t| keep(&mut errors, parse_time_zone(t))),
        policy: draft
            .policy
            .as_deref()
            .and_then(|p| keep(&mut errors, parse_policy(p))),
        address: draft
            .address
            .as_deref()
            .and_then(|a| keep(&mut errors, parse_address(a))),
        ..Checked::default()
    };
    if let Some(kind) = kind {
        checked.when = draft
            .when
            .as_deref()
            .and_then(|w| keep(&mut errors, parse_when(w)));
        checked.grace = draft
            .grace
            .as_deref()
            .and_then(|g| keep(&mut errors, parse_grace(g)));
        if draft.senders.is_some() || draft.sender_list.is_some() {
            let senders = draft.senders.as_deref().or(current.senders.as_deref());
            let list = draft.sender_list.as_ref().or(current.sender_list.as_ref());
            checked.senders = keep(
                &mut errors,
                parse_senders(senders.unwrap_or(""), list.map_or(&[], Vec::as_slice)),
            );
        }
        if draft.quiet_start.is_some() || draft.quiet_end.is_some() || draft.quiet_action.is_some()
        {
            let pick = |given: &Option<String>, now: &Option<String>| {
                given.clone().or_else(|| now.clone()).unwrap_or_default()
            };
            let quiet = parse_quiet(
                &pick(&draft.quiet_start, &current.quiet_start),
                &pick(&draft.quiet_end, &current.quiet_end),
                &pick(&draft.quiet_action, &current.quiet_action),
                kind,
                user,
            );
            match quiet {
                Ok(quiet) => checked.quiet = Some(quiet),
                Err(mut e) => errors.append(&mut e),
            }
        }
        checked.forward_subscriptions = draft
            .forward_subscriptions
            .as_deref()
            .and_then(|f| keep(&mut errors, parse_yes_no(field::SUBSCRIPTIONS, f)));
        checked.alerts = draft
            .alerts
            .as_ref()
            .and_then(|a| keep(&mut errors, parse_jids(field::ALERTS, a)));
        checked.daily_cap = draft
            .daily_cap
            .as_deref()
            .and_then(|c| keep(&mut errors, parse_daily_cap(core, kind, c)));
    }
    if errors.is_empty() {
        Ok(checked)
    } else {
        Err(errors)
    }
}

fn apply(user: &mut User, kind: Option<TerminalKind>, checked: Checked) {
    if let Some(time_zone) = checked.time_zone {
        user.time_zone = time_zone;
    }
    if let Some(policy) = checked.policy {
        user.subscription_policy = policy;
    }
    if let Some(own) = checked.address {
        user.integrated = own;
    }
    let zone = user.time_zone.clone().unwrap_or_else(|| "UTC".to_owned());
    if let Some(prefs) = kind.and_then(|kind| prefs_mut(user, kind)) {
        if let Some(when) = checked.when {
            prefs.when = when;
        }
        if let Some(grace) = checked.grace {
            prefs.grace_delay_secs = grace;
        }
        if let Some(senders) = checked.senders {
            prefs.senders = senders;
        }
        if let Some(quiet) = checked.quiet {
            prefs.quiet_hours = quiet.map(|(start, end, action)| QuietHours {
                start_minute: start,
                end_minute: end,
                time_zone: zone.clone(),
                action,
            });
        }
        if let Some(forward) = checked.forward_subscriptions {
            prefs.forward_subscriptions = forward;
        }
        if let Some(alerts) = checked.alerts {
            prefs.alert_buddies = alerts;
        }
        if let Some(cap) = checked.daily_cap {
            prefs.daily_cap = cap;
        }
    }
    // Quiet hours are kept in the user's time zone: every terminal's follow it.
    for kind in [TerminalKind::Email, TerminalKind::Phone] {
        if let Some(quiet) = prefs_mut(user, kind).and_then(|p| p.quiet_hours.as_mut()) {
            quiet.time_zone = zone.clone();
        }
    }
}

fn parse_when(text: &str) -> Result<ForwardWhen, Invalid> {
    Ok(match choice(text).as_str() {
        "always" => ForwardWhen::Always,
        "no_xmpp_resource" => ForwardWhen::NoXmppResource,
        "away_or_offline" => ForwardWhen::AwayOrOffline,
        "never" => ForwardWhen::Never,
        _ => {
            return Err(Invalid::new(
                field::WHEN,
                format!(
                    "'{}' is not one of always, no_xmpp_resource, away_or_offline, never",
                    shown(text.trim())
                ),
            ))
        }
    })
}

fn parse_grace(text: &str) -> Result<Option<u64>, Invalid> {
    let text = text.trim();
    if text.is_empty() || text.eq_ignore_ascii_case("default") {
        return Ok(None);
    }
    let secs: u64 = whole_number(text).ok_or_else(|| {
        Invalid::new(
            field::GRACE,
            format!(
                "'{}' is not a number of seconds (leave it empty for the service's default)",
                shown(text)
            ),
        )
    })?;
    if secs > MAX_GRACE_SECS {
        return Err(Invalid::new(
            field::GRACE,
            format!("{secs} seconds is more than a day ({MAX_GRACE_SECS})"),
        ));
    }
    Ok(Some(secs))
}

/// Plain decimal digits only (no sign, no spaces inside), as a number.
fn whole_number<T: std::str::FromStr>(text: &str) -> Option<T> {
    if text.is_empty() || !text.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    text.parse().ok()
}

fn parse_senders(kind: &str, list: &[String]) -> Result<SenderFilter, Invalid> {
    match choice(kind).as_str() {
        "everyone" | "all" => Ok(SenderFilter::Everyone),
        "buddies" => Ok(SenderFilter::Buddies),
        "list" => {
            let jids = parse_jids(field::SENDERS, list)?;
            if jids.is_empty() {
                return Err(Invalid::new(
                    field::SENDERS,
                    "'list' needs at least one JID, like bob@example.net",
                ));
            }
            Ok(SenderFilter::List(jids))
        }
        _ => Err(Invalid::new(
            field::SENDERS,
            format!(
                "'{}' is not one of everyone, buddies, list",
                shown(kind.trim())
            ),
        )),
    }
}

/// Bare JIDs like `bob@example.net`, separated by commas, spaces or separate values; duplicates
/// are dropped.
fn parse_jids(field: &'static str, values: &[String]) -> Result<Vec<String>, Invalid> {
    let mut jids: Vec<String> = Vec::new();
    for text in values
        .iter()
        .flat_map(|v| v.split(|c: char| c == ',' || c == ';' || c.is_whitespace()))
        .filter(|t| !t.is_empty())
    {
        let jid = jid::BareJid::new(text)
            .ok()
            .filter(|j| j.node().is_some())
            .ok_or_else(|| {
                Invalid::new(
                    field,
                    format!("'{}' is not a JID like bob@example.net", shown(text)),
                )
            })?
            .to_string();
        if jid.len() > super::limits::MAX_JID_BYTES {
            return Err(Invalid::new(
                field,
                format!(
                    "a JID longer than {} bytes is not accepted",
                    super::limits::MAX_JID_BYTES
                ),
            ));
        }
        if !jids.contains(&jid) {
            jids.push(jid);
        }
    }
    if jids.len() > MAX_JIDS {
        return Err(Invalid::new(
            field,
            format!("at most {MAX_JIDS} JIDs, not {}", jids.len()),
        ));
    }
    Ok(jids)
}

/// Minutes after midnight of `HH:MM` (or `H:MM`), 00:00 to 23:59.
fn parse_time(field: &'static str, text: &str) -> Result<u16, Invalid> {
    let bad = || {
        Invalid::new(
            field,
            format!("'{}' is not a time like 22:30", shown(text.trim())),
        )
    };
    let (hours, minutes) = text.trim().split_once(':').ok_or_else(bad)?;
    if hours.len() > 2 || minutes.len() != 2 {
        return Err(bad());
    }
    let hours: u16 = whole_number(hours).ok_or_else(bad)?;
    let minutes: u16 = whole_number(minutes).ok_or_else(bad)?;
    if hours > 23 || minutes > 59 {
        return Err(bad());
    }
    Ok(hours * 60 + minutes)
}

fn hhmm(minute: u16) -> String {
    format!("{:02}:{:02}", minute / 60, minute % 60)
}

/// Quiet hours as checked: start and end (minutes after midnight) and what happens meanwhile.
type Quiet = (u16, u16, QuietAction);

/// Quiet hours from their three fields: `None` when start and end are both empty.
fn parse_quiet(
    start: &str,
    end: &str,
    action: &str,
    kind: TerminalKind,
    user: &User,
) -> Result<Option<Quiet>, Vec<Invalid>> {
    let (start, end) = (start.trim(), end.trim());
    let both = "give both a start and an end, or neither for no quiet hours";
    match (start.is_empty(), end.is_empty()) {
        (true, true) => return Ok(None),
        (false, true) => return Err(vec![Invalid::new(field::QUIET_END, both)]),
        (true, false) => return Err(vec![Invalid::new(field::QUIET_START, both)]),
        (false, false) => {}
    }
    let mut errors = Vec::new();
    let start = keep(&mut errors, parse_time(field::QUIET_START, start));
    let end = keep(&mut errors, parse_time(field::QUIET_END, end));
    let action = match choice(action).as_str() {
        "" | "hold" => Some(QuietAction::Hold),
        "email" if kind == TerminalKind::Email => {
            errors.push(Invalid::new(
                field::QUIET_ACTION,
                "email is this terminal itself: choose hold",
            ));
            None
        }
        "email" if user.email.is_none() => {
            errors.push(Invalid::new(
                field::QUIET_ACTION,
                "you have no email terminal to send them to",
            ));
            None
        }
        "email" => Some(QuietAction::Email),
        _ => {
            errors.push(Invalid::new(
                field::QUIET_ACTION,
                format!("'{}' is not one of hold, email", shown(action.trim())),
            ));
            None
        }
    };
    match (start, end, action) {
        (Some(s), Some(e), _) if s == e => Err(vec![Invalid::new(
            field::QUIET_END,
            "the end is the start: quiet hours need a length",
        )]),
        (Some(s), Some(e), Some(a)) if errors.is_empty() => Ok(Some((s, e, a))),
        _ => Err(errors),
    }
}

/// An IANA time zone, stored by its canonical name; empty: none (UTC).
fn parse_time_zone(text: &str) -> Result<Option<String>, Invalid> {
    let text = text.trim();
    if text.is_empty() {
        return Ok(None);
    }
    text.parse::<Tz>()
        .map(|tz| Some(tz.name().to_owned()))
        .map_err(|_| {
            Invalid::new(
                field::TIME_ZONE,
                format!(
                    "'{}' is not an IANA time zone name like Europe/Berlin",
                    shown(text)
                ),
            )
        })
}

fn parse_yes_no(field: &'static str, text: &str) -> Result<bool, Invalid> {
    match text.trim().to_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Ok(true),
        "" | "0" | "false" | "no" | "off" => Ok(false),
        _ => Err(Invalid::new(
            field,
            format!("'{}' is not yes or no", shown(text.trim())),
        )),
    }
}

fn parse_daily_cap(core: &Core, kind: TerminalKind, text: &str) -> Result<Option<u32>, Invalid> {
    let text = text.trim();
    if text.is_empty() || text.eq_ignore_ascii_case("default") {
        return Ok(None);
    }
    let cap: u32 = whole_number(text).ok_or_else(|| {
        Invalid::new(
            field::DAILY_CAP,
            format!(
                "'{}' is not a whole number (leave it empty for the service's default)",
                shown(text)
            ),
        )
    })?;
    if cap == 0 {
        return Err(Invalid::new(
            field::DAILY_CAP,
            "0 would forward nothing: set when to never instead",
        ));
    }
    let service_cap = match (kind, &core.settings.sms) {
        (TerminalKind::Phone, Some(sms)) => Some(sms.daily_cap),
        _ => None,
    };
    match service_cap {
        Some(most) if cap > most => Err(Invalid::new(
            field::DAILY_CAP,
            format!("this service sends at most {most} SMS a day"),
        )),
        None if cap > MAX_DAILY_CAP => Err(Invalid::new(
            field::DAILY_CAP,
            format!("at most {MAX_DAILY_CAP}"),
        )),
        _ => Ok(Some(cap)),
    }
}

fn parse_policy(text: &str) -> Result<SubscriptionPolicy, Invalid> {
    Ok(match choice(text).as_str() {
        "auto" => SubscriptionPolicy::Auto,
        "buddies_only" => SubscriptionPolicy::BuddiesOnly,
        "ask" => SubscriptionPolicy::Ask,
        _ => {
            return Err(Invalid::new(
                field::POLICY,
                format!(
                    "'{}' is not one of auto, buddies_only, ask",
                    shown(text.trim())
                ),
            ))
        }
    })
}

// ---- descriptions in words ----

/// `Email: alice@… (verified, away, primary)`.
fn terminal_line(user: &User, view: &View<'_>) -> String {
    let mut facts = vec![
        if view.verified {
            "verified"
        } else {
            "not verified yet"
        },
        state_words(view.state),
    ];
    if user.primary == Some(view.kind) {
        facts.push("primary");
    }
    if view.failing {
        facts.push("failing: mail to it bounced");
    }
    if view.stopped {
        facts.push("stopped by STOP: text START to resume");
    }
    format!(
        "{}: {} ({})",
        kind_title(view.kind),
        view.address,
        facts.join(", ")
    )
}

/// The user's terminals, one a line (`Email: none` for a missing one).
pub(super) fn terminals_text(user: &User) -> String {
    [TerminalKind::Email, TerminalKind::Phone]
        .into_iter()
        .map(|kind| match terminal(user, kind) {
            Some(view) => terminal_line(user, &view),
            None => format!("{}: none", kind_title(kind)),
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// A terminal's line and its preferences in words, one a line, named as the chat's `set` names
/// them.
pub(super) fn describe_terminal(core: &Core, user: &User, kind: TerminalKind) -> String {
    let Some(view) = terminal(user, kind) else {
        return format!("{}: none", kind_title(kind));
    };
    let p = view.prefs;
    let grace = match p.grace_delay_secs {
        Some(secs) => format!("{secs} s"),
        None => format!(
            "{} s (the service's default)",
            core.settings.grace_delay_secs
        ),
    };
    let senders = match &p.senders {
        SenderFilter::Everyone => "everyone".to_owned(),
        SenderFilter::Buddies => "buddies only (subscribed to your reach address)".to_owned(),
        SenderFilter::List(jids) => format!("only {}", jids.join(", ")),
    };
    let quiet = match &p.quiet_hours {
        None => "off".to_owned(),
        Some(q) => format!(
            "{}-{} {} ({}; {})",
            hhmm(q.start_minute),
            hhmm(q.end_minute),
            quiet_action_word(q.action),
            user.time_zone.as_deref().unwrap_or("UTC"),
            match q.action {
                QuietAction::Hold => "messages wait until they end",
                QuietAction::Email => "messages go by email instead",
            }
        ),
    };
    let subscriptions = if p.forward_subscriptions {
        "on (subscription requests are forwarded here)"
    } else {
        "off (subscription requests are not forwarded here)"
    };
    let alerts = if p.alert_buddies.is_empty() {
        "none".to_owned()
    } else {
        p.alert_buddies.join(", ")
    };
    let cap = match (p.daily_cap, kind, &core.settings.sms) {
        (Some(cap), _, _) => format!("{cap} a day"),
        (None, TerminalKind::Phone, Some(sms)) => {
            format!("the service's default ({} SMS a day)", sms.daily_cap)
        }
        (None, _, _) => "the service's default".to_owned(),
    };
    format!(
        "{}\n  when: {} ({})\n  grace: {grace}\n  senders: {senders}\n  quiet: {quiet}\n  \
         subscriptions: {subscriptions}\n  alerts: {alerts}\n  cap: {cap}",
        terminal_line(user, &view),
        when_word(p.when),
        when_words(p.when),
    )
}

/// The account-wide settings in words.
pub(super) fn account_lines(user: &User) -> String {
    format!(
        "Time zone: {} (for quiet hours)\nSubscription policy: {} ({})\nBuddies reach you at: {}",
        user.time_zone.as_deref().unwrap_or("UTC"),
        policy_word(user.subscription_policy),
        policy_words(user.subscription_policy),
        if user.integrated {
            format!("your own address {} (address own)", user.jid)
        } else {
            "your reach address (address reach)".to_owned()
        }
    )
}

/// `prefs [email|phone]`: one terminal's preferences, or all of them, and the account's.
pub(super) fn preferences_text(core: &Core, user: &User, kind: Option<TerminalKind>) -> String {
    let kinds = match kind {
        Some(kind) => vec![kind],
        None => terminals(user).iter().map(|t| t.kind).collect(),
    };
    let mut parts: Vec<String> = kinds
        .into_iter()
        .map(|kind| describe_terminal(core, user, kind))
        .collect();
    if parts.is_empty() {
        parts.push("You have no email or phone terminal yet.".to_owned());
    }
    parts.push(account_lines(user));
    parts.join("\n")
}

/// `status`: the reach address, every terminal with its state and preferences, the account's
/// settings, and what waits.
pub(super) fn status_text(
    core: &Core,
    store: &mut dyn Transaction,
    user: &User,
) -> Result<String, StoreError> {
    let terminals: Vec<String> = [TerminalKind::Email, TerminalKind::Phone]
        .into_iter()
        .map(|kind| describe_terminal(core, user, kind))
        .collect();
    let waiting: usize = store
        .pending_for(&user.jid)?
        .iter()
        .map(|p| p.items.len())
        .sum();
    Ok(format!(
        "Your reach address: {}\nBuddies see: {}\n{}\n{}\nHeld messages: {}\nWaiting to be forwarded: {waiting}",
        core.reach_address(&user.handle),
        super::presence::seen_by_buddies(core, store, user)?,
        terminals.join("\n"),
        account_lines(user),
        store.held_count(&user.jid)?,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    #[allow(unused_imports)]
    use crate::core::Transaction;

    fn err<T: std::fmt::Debug>(r: Result<T, Invalid>) -> String {
        r.unwrap_err().to_string()
    }

    #[test]
    fn times_are_hh_mm_within_a_day() {
        assert_eq!(parse_time(field::QUIET_START, "22:30"), Ok(22 * 60 + 30));
        assert_eq!(parse_time(field::QUIET_START, "7:05"), Ok(7 * 60 + 5));
        assert_eq!(parse_time(field::QUIET_START, " 00:00 "), Ok(0));
        assert_eq!(parse_time(field::QUIET_END, "23:59"), Ok(23 * 60 + 59));
        for bad in [
            "25:00", "24:00", "12:60", "12", "12:5", "-1:00", "+1:00", "ab:cd", "1:2:3", "",
        ] {
            assert_eq!(
                err(parse_time(field::QUIET_START, bad)),
                format!(
                    "quiet hours start: '{}' is not a time like 22:30",
                    bad.trim()
                ),
            );
        }
        assert_eq!(hhmm(7 * 60 + 5), "07:05");
    }

    #[test]
    fn choices_accept_their_spellings_and_name_the_field_otherwise() {
        assert_eq!(
            parse_when("Away-Or-Offline"),
            Ok(ForwardWhen::AwayOrOffline)
        );
        assert_eq!(
            parse_when("no xmpp resource"),
            Ok(ForwardWhen::NoXmppResource)
        );
        assert_eq!(
            err(parse_when("sometimes")),
            "when: 'sometimes' is not one of always, no_xmpp_resource, away_or_offline, never"
        );
        assert_eq!(
            parse_policy("buddies-only"),
            Ok(SubscriptionPolicy::BuddiesOnly)
        );
        assert_eq!(
            err(parse_policy("nobody")),
            "subscription policy: 'nobody' is not one of auto, buddies_only, ask"
        );
        assert_eq!(parse_kind("SMS"), Ok(TerminalKind::Phone));
        assert_eq!(
            err(parse_kind("fax")),
            "terminal: 'fax' is not a terminal: say email or phone"
        );
        assert_eq!(parse_state("back"), Ok(LocalState::Available));
        assert_eq!(
            err(parse_state("asleep")),
            "state: 'asleep' is not one of available, away, dnd"
        );
        assert_eq!(parse_yes_no(field::SUBSCRIPTIONS, "on"), Ok(true));
        assert_eq!(parse_yes_no(field::SUBSCRIPTIONS, "0"), Ok(false));
        assert_eq!(
            err(parse_yes_no(field::SUBSCRIPTIONS, "maybe")),
            "forward subscription requests: 'maybe' is not yes or no"
        );
    }

    #[test]
    fn numbers_are_plain_and_empty_means_the_default() {
        assert_eq!(parse_grace(""), Ok(None));
        assert_eq!(parse_grace("default"), Ok(None));
        assert_eq!(parse_grace("300"), Ok(Some(300)));
        assert_eq!(
            err(parse_grace("-5")),
            "grace delay: '-5' is not a number of seconds (leave it empty for the service's default)"
        );
        assert_eq!(
            err(parse_grace("90000")),
            "grace delay: 90000 seconds is more than a day (86400)"
        );
        assert_eq!(parse_grace("86400"), Ok(Some(86_400)));
    }

    #[test]
    fn jid_lists_split_on_commas_and_drop_duplicates() {
        let values = vec![
            "bob@example.net, carol@example.org".to_owned(),
            "bob@example.net".to_owned(),
            "".to_owned(),
        ];
        assert_eq!(
            parse_jids(field::ALERTS, &values),
            Ok(vec![
                "bob@example.net".to_owned(),
                "carol@example.org".to_owned()
            ])
        );
        for bad in ["example.net", "bob@example.net/phone", "@example.net"] {
            assert_eq!(
                err(parse_jids(field::ALERTS, &[bad.to_owned()])),
                format!("buddy alerts: '{bad}' is not a JID like bob@example.net")
            );
        }
        assert_eq!(
            err(parse_senders("list", &[])),
            "senders: 'list' needs at least one JID, like bob@example.net"
        );
        assert_eq!(
            parse_senders("everyone", &values),
            Ok(SenderFilter::Everyone)
        );
    }

    #[test]
    fn time_zones_are_iana_names() {
        assert_eq!(
            parse_time_zone("Europe/Berlin"),
            Ok(Some("Europe/Berlin".to_owned()))
        );
        assert_eq!(parse_time_zone(" "), Ok(None));
        assert_eq!(
            err(parse_time_zone("Mars/Olympus_Mons")),
            "time zone: 'Mars/Olympus_Mons' is not an IANA time zone name like Europe/Berlin"
        );
    }

    #[test]
    fn quoted_input_is_short_and_printable() {
        assert_eq!(shown("a\nb"), "ab");
        assert_eq!(shown(&"x".repeat(50)), format!("{}…", "x".repeat(40)));
    }

    /// Each operation through both doors: chat lines to `D` and ad-hoc commands at `D`.
    mod doors {
        use crate::core::Transaction;
        use minidom::Element;
        use xmpp_parsers::ns;

        use crate::core::model::{LocalState, TerminalKind, User};
        use crate::core::rules::{
            ForwardWhen, QuietAction, QuietHours, SenderFilter, SubscriptionPolicy,
        };
        use crate::core::testing::*;
        use crate::core::{Action, Event};
        use crate::xmpp::adhoc::{Action as Step, Command, NoteType, Status, COMMANDS};
        use crate::xmpp::stanza::{child_text, STANZA_NS};

        const ALICE: &str = "alice@example.org";
        const MAIL: &str = "alice@mail.example.org";
        const PHONE: &str = "+15551234567";

        fn user(t: &Harness) -> User {
            t.store.tx().user(ALICE).unwrap().unwrap()
        }

        /// Alice registered with both terminals, both verified.
        fn alice(t: &Harness) {
            t.run(&register_form(ALICE, "alice", MAIL, PHONE));
            let mut u = user(t);
            u.email.as_mut().unwrap().verified = true;
            u.phone.as_mut().unwrap().verified = true;
            t.store.tx().put_user(&u).unwrap();
            t.store
                .tx()
                .remove_verification(ALICE, TerminalKind::Email)
                .unwrap();
            t.store
                .tx()
                .remove_verification(ALICE, TerminalKind::Phone)
                .unwrap();
        }

        /// Alice with her email address only, verified.
        fn alice_with_email(t: &Harness) {
            alice(t);
            let mut u = user(t);
            u.phone = None;
            t.store.tx().put_user(&u).unwrap();
        }

        fn stanza(xml: &str) -> Event {
            let with_ns = xml.replacen('>', &format!(" xmlns='{STANZA_NS}'>"), 1);
            Event::Stanza(with_ns.parse().unwrap())
        }

        /// A chat line to the service, and everything it led to.
        fn chat_actions(t: &Harness, line: &str) -> (String, Vec<Action>) {
            let actions = t.actions(stanza(&format!(
                "<message type='chat' from='{ALICE}/pc' to='{D}'><body>{line}</body></message>"
            )));
            let reply = actions
                .iter()
                .find_map(|a| match a {
                    Action::SendStanza(s)
                        if s.name() == "message"
                            && s.attr("to") == Some("alice@example.org/pc") =>
                    {
                        child_text(s, "body")
                    }
                    _ => None,
                })
                .unwrap_or_else(|| panic!("no answer to '{line}'"));
            (reply, actions)
        }

        fn say(t: &Harness, line: &str) -> String {
            chat_actions(t, line).0
        }

        /// An ad-hoc request and the `<command/>` of its result.
        fn adhoc(t: &Harness, attrs: &str, inner: &str) -> Command {
            let actions = t.actions(stanza(&format!(
                "<iq type='set' id='c1' from='{ALICE}/pc' to='{D}'>\
                 <command xmlns='{COMMANDS}' {attrs}>{inner}</command></iq>"
            )));
            let reply = actions
                .into_iter()
                .find_map(|a| match a {
                    Action::SendStanza(s) if s.name() == "iq" => Some(s),
                    _ => None,
                })
                .expect("an iq answer");
            assert_eq!(
                reply.attr("type"),
                Some("result"),
                "{}",
                String::from(&reply)
            );
            Command::try_from(reply.get_child("command", COMMANDS).unwrap()).unwrap()
        }

        fn submit(fields: &[(&str, &[&str])]) -> String {
            let mut x = format!("<x xmlns='{}' type='submit'>", ns::DATA_FORMS);
            for (var, values) in fields {
                x.push_str(&format!("<field var='{var}'>"));
                for v in *values {
                    x.push_str(&format!("<value>{v}</value>"));
                }
                x.push_str("</field>");
            }
            x + "</x>"
        }

        /// The form's fields as a client returns them: every field with its current values.
        fn echo(form: &Element, changes: &[(&str, &[&str])]) -> String {
            let mut fields: Vec<(String, Vec<String>)> = form
                .children()
                .filter(|f| f.is("field", ns::DATA_FORMS) && f.attr("type") != Some("fixed"))
                .map(|f| {
                    let var = f.attr("var").unwrap().to_owned();
                    let values = f
                        .children()
                        .filter(|v| v.is("value", ns::DATA_FORMS))
                        .map(|v| v.text())
                        .collect();
                    (var, values)
                })
                .collect();
            for (var, values) in changes {
                let values: Vec<String> = values.iter().map(|v| v.to_string()).collect();
                match fields.iter_mut().find(|(v, _)| v == var) {
                    Some(field) => field.1 = values,
                    None => panic!("the form has no field '{var}'"),
                }
            }
            let borrowed: Vec<(&str, Vec<&str>)> = fields
                .iter()
                .map(|(var, values)| (var.as_str(), values.iter().map(String::as_str).collect()))
                .collect();
            let refs: Vec<(&str, &[&str])> = borrowed
                .iter()
                .map(|(v, vals)| (*v, vals.as_slice()))
                .collect();
            submit(&refs)
        }

        fn values(form: &Element, var: &str) -> Vec<String> {
            form.children()
                .find(|f| f.is("field", ns::DATA_FORMS) && f.attr("var") == Some(var))
                .unwrap_or_else(|| panic!("no field '{var}' in {}", String::from(form)))
                .children()
                .filter(|v| v.is("value", ns::DATA_FORMS))
                .map(|v| v.text())
                .collect()
        }

        fn value(form: &Element, var: &str) -> String {
            values(form, var).into_iter().next().unwrap_or_default()
        }

        fn notes(c: &Command) -> Vec<(NoteType, String)> {
            c.notes.iter().map(|n| (n.type_, n.text.clone())).collect()
        }

        fn sms_sent(actions: &[Action]) -> Vec<String> {
            actions
                .iter()
                .filter_map(|a| match a {
                    Action::SendSms(job) => Some(job.to.clone()),
                    _ => None,
                })
                .collect()
        }

        #[test]
        fn help_lists_every_command() {
            let t = Harness::new();
            let help = say(&t, "help");
            for command in [
                "status",
                "terminals",
                "add email",
                "add phone",
                "remove",
                "primary",
                "verify",
                "state",
                "prefs",
                "set email|phone when",
                "grace",
                "senders",
                "quiet",
                "subscriptions",
                "alerts",
                "cap",
                "timezone",
                "policy",
            ] {
                assert!(help.contains(command), "help lacks {command}: {help}");
            }
        }

        #[test]
        fn strangers_are_told_to_register() {
            let t = Harness::new();
            for line in [
                "terminals",
                "add email a@b.c",
                "set email when never",
                "status",
            ] {
                assert!(
                    say(&t, line).starts_with("You are not registered."),
                    "{line}"
                );
            }
            assert!(say(&t, "frobnicate").starts_with("Unknown command 'frobnicate'"));
        }

        #[test]
        fn terminals_by_chat_add_primary_and_remove() {
            let t = Harness::new();
            alice_with_email(&t);
            assert_eq!(
                say(&t, "terminals"),
                format!(
                    "Email: {MAIL} (verified, available)\nPhone: none\n\
                     add email ADDRESS, add phone NUMBER, remove email|phone, primary email|phone."
                )
            );

            // Bad numbers change nothing and name the field.
            let before = user(&t);
            assert_eq!(
                say(&t, "add phone 555 123"),
                format!(
                    "phone: {}\nNothing was changed.",
                    crate::address::Phone::parse("555 123").unwrap_err()
                )
            );
            assert_eq!(
                say(&t, "add phone +33612345678"),
                "phone: this service does not send SMS to +33612345678\nNothing was changed."
            );
            assert_eq!(
                say(&t, "add fax 123"),
                "terminal: 'fax' is not a terminal: say email or phone\n\
                Usage: add email ADDRESS, or add phone NUMBER"
            );
            assert_eq!(
                say(&t, "add phone"),
                "Usage: add phone NUMBER (like +15551234567)"
            );
            assert_eq!(user(&t), before);

            // A good number is stored unverified and gets a code by SMS.
            let (said, actions) = chat_actions(&t, &format!("add phone {PHONE}"));
            assert!(
                said.starts_with(&format!(
                    "Added your phone {PHONE}. A verification code is on its way to {PHONE}"
                )),
                "{said}"
            );
            assert_eq!(sms_sent(&actions), vec![PHONE.to_owned()]);
            let phone = user(&t).phone.unwrap();
            assert!(!phone.verified);
            assert!(t
                .store
                .tx()
                .verification(ALICE, TerminalKind::Phone)
                .unwrap()
                .is_some());

            assert_eq!(
                say(&t, "primary phone"),
                format!("Your phone {PHONE} is now your primary terminal: it takes forwards first when several may. \
                         It forwards nothing until it is verified.")
            );
            assert_eq!(user(&t).primary, Some(TerminalKind::Phone));
            assert!(say(&t, "terminals").contains(&format!(
                "Phone: {PHONE} (not verified yet, available, primary)"
            )));

            assert_eq!(
                say(&t, "remove phone"),
                format!("Removed your phone {PHONE}: Reach forwards nothing there any more.")
            );
            let u = user(&t);
            assert!(u.phone.is_none() && u.primary.is_none());
            assert!(t
                .store
                .tx()
                .verification(ALICE, TerminalKind::Phone)
                .unwrap()
                .is_none());
            assert_eq!(
                say(&t, "remove phone"),
                "terminal: you have no phone terminal (add one with: add phone NUMBER)\nNothing was changed."
            );
            assert_eq!(
                say(&t, "primary phone"),
                "terminal: you have no phone terminal (add one with: add phone NUMBER)\nNothing was changed."
            );

            // Replacing the email address keeps its preferences and asks for a new code.
            say(&t, "set email when never");
            let (said, actions) = chat_actions(&t, "add email new@mail.example.org");
            assert!(said.starts_with(&format!("Replaced {MAIL} with your email address new@mail.example.org. A verification code")), "{said}");
            assert!(actions.iter().any(|a| matches!(a, Action::SendEmail(_))));
            let email = user(&t).email.unwrap();
            assert_eq!(email.address.as_str(), "new@mail.example.org");
            assert!(!email.verified);
            assert_eq!(email.prefs.when, ForwardWhen::Never);
            assert_eq!(
                say(&t, "add email not-an-address"),
                format!(
                    "email: {}\nNothing was changed.",
                    crate::address::Email::parse("not-an-address").unwrap_err()
                )
            );
        }

        #[test]
        fn terminals_by_adhoc_choose_an_action_then_fill_it_in() {
            let t = Harness::new();
            alice_with_email(&t);
            let first = adhoc(&t, "node='terminals'", "");
            assert_eq!(first.status, Some(Status::Executing));
            let actions = first.actions.as_ref().unwrap();
            assert_eq!(
                (actions.execute, actions.allowed.clone()),
                (Some(Step::Next), vec![Step::Next])
            );
            let form = first.form.unwrap();
            assert_eq!(value(&form, "action"), "list");
            assert!(form.get_child("instructions", ns::DATA_FORMS).is_some());

            // list
            let c = adhoc(
                &t,
                "node='terminals' sessionid='s' action='next'",
                &submit(&[("action", &["list"])]),
            );
            assert_eq!(c.status, Some(Status::Completed));
            assert_eq!(
                notes(&c),
                vec![(
                    NoteType::Info,
                    format!("Email: {MAIL} (verified, available)\nPhone: none")
                )]
            );

            // add: the second page, with prev allowed.
            let c = adhoc(
                &t,
                "node='terminals' sessionid='s' action='next'",
                &submit(&[("action", &["add"])]),
            );
            let actions = c.actions.as_ref().unwrap();
            assert_eq!(
                (actions.execute, actions.allowed.clone()),
                (Some(Step::Complete), vec![Step::Prev, Step::Complete])
            );
            let form = c.form.unwrap();
            assert_eq!(value(&form, "page"), "add");
            assert_eq!(
                value(&form, "kind"),
                "phone",
                "the kind she lacks is suggested"
            );

            // A bad number: the page again, with her input and the error, and nothing changed.
            let before = user(&t);
            let c = adhoc(
                &t,
                "node='terminals' sessionid='s' action='complete'",
                &echo(&form, &[("address", &["+33612345678"])]),
            );
            assert_eq!(c.status, Some(Status::Executing));
            assert_eq!(
                notes(&c),
                vec![(
                    NoteType::Error,
                    "phone: this service does not send SMS to +33612345678".to_owned()
                )]
            );
            let again = c.form.unwrap();
            assert_eq!(value(&again, "address"), "+33612345678");
            assert_eq!(user(&t), before);

            // prev goes back to the first page.
            let c = adhoc(&t, "node='terminals' sessionid='s' action='prev'", "");
            assert_eq!(
                c.form.as_ref().map(|f| value(f, "action")),
                Some("list".to_owned())
            );

            let c = adhoc(
                &t,
                "node='terminals' sessionid='s' action='complete'",
                &echo(&again, &[("address", &[PHONE])]),
            );
            assert_eq!(c.status, Some(Status::Completed));
            assert!(
                notes(&c)[0]
                    .1
                    .starts_with(&format!("Added your phone {PHONE}.")),
                "{:?}",
                notes(&c)
            );
            assert_eq!(user(&t).phone.unwrap().address.as_str(), PHONE);

            // primary, then remove: a terminal to choose.
            let c = adhoc(
                &t,
                "node='terminals' sessionid='s' action='next'",
                &submit(&[("action", &["primary"])]),
            );
            let form = c.form.unwrap();
            assert_eq!(value(&form, "page"), "primary");
            assert_eq!(value(&form, "terminal"), "email");
            let c = adhoc(
                &t,
                "node='terminals' sessionid='s' action='complete'",
                &echo(&form, &[("terminal", &["phone"])]),
            );
            assert_eq!(c.status, Some(Status::Completed));
            assert_eq!(user(&t).primary, Some(TerminalKind::Phone));
            let c = adhoc(
                &t,
                "node='terminals' sessionid='s' action='next'",
                &submit(&[("action", &["remove"])]),
            );
            let form = c.form.unwrap();
            let c = adhoc(
                &t,
                "node='terminals' sessionid='s' action='complete'",
                &echo(&form, &[("terminal", &["fax"])]),
            );
            assert_eq!(
                notes(&c),
                vec![(
                    NoteType::Error,
                    "terminal: 'fax' is not a terminal: say email or phone".to_owned()
                )]
            );
            let c = adhoc(
                &t,
                "node='terminals' sessionid='s' action='complete'",
                &echo(&form, &[("terminal", &["phone"])]),
            );
            assert_eq!(
                notes(&c),
                vec![(
                    NoteType::Info,
                    format!("Removed your phone {PHONE}: Reach forwards nothing there any more.")
                )]
            );
            assert!(user(&t).phone.is_none());

            // An unknown action: the first page again.
            let c = adhoc(
                &t,
                "node='terminals' sessionid='s' action='next'",
                &submit(&[("action", &["juggle"])]),
            );
            assert_eq!(c.status, Some(Status::Executing));
            assert_eq!(
                notes(&c),
                vec![(
                    NoteType::Error,
                    "action: 'juggle' is not one of list, add, remove, primary".to_owned()
                )]
            );
        }

        #[test]
        fn preferences_by_adhoc_prefill_refuse_a_bad_value_then_save() {
            let t = Harness::new();
            alice_with_email(&t);
            let c = adhoc(&t, "node='preferences'", "");
            // One terminal: nothing to choose, the form is the only page.
            assert_eq!(c.status, Some(Status::Executing));
            assert_eq!(c.actions.as_ref().unwrap().allowed, vec![Step::Complete]);
            let form = c.form.unwrap();
            assert_eq!(value(&form, "terminal"), "email");
            assert_eq!(value(&form, "when"), "away_or_offline");
            assert_eq!(value(&form, "grace"), "");
            assert_eq!(value(&form, "senders"), "everyone");
            assert_eq!(value(&form, "quiet_start"), "");
            assert_eq!(value(&form, "quiet_action"), "hold");
            assert_eq!(value(&form, "forward_subscriptions"), "0");
            assert_eq!(value(&form, "time_zone"), "");
            assert_eq!(value(&form, "subscription_policy"), "auto");
            assert_eq!(value(&form, "daily_cap"), "");

            // A bad start among good values: nothing is saved, the form comes back as she typed it.
            let before = user(&t);
            let typed: &[(&str, &[&str])] = &[
                ("when", &["never"]),
                ("quiet_start", &["25:00"]),
                ("quiet_end", &["07:00"]),
                ("time_zone", &["Europe/Berlin"]),
            ];
            let c = adhoc(
                &t,
                "node='preferences' sessionid='s' action='complete'",
                &echo(&form, typed),
            );
            assert_eq!(c.status, Some(Status::Executing));
            assert_eq!(
                notes(&c),
                vec![(
                    NoteType::Error,
                    "quiet hours start: '25:00' is not a time like 22:30".to_owned()
                )]
            );
            assert_eq!(user(&t), before, "nothing changed");
            let again = c.form.unwrap();
            assert_eq!(value(&again, "quiet_start"), "25:00");
            assert_eq!(value(&again, "when"), "never");

            // Several bad values: each named.
            let c = adhoc(
                &t,
                "node='preferences' sessionid='s' action='complete'",
                &echo(
                    &again,
                    &[
                        ("quiet_start", &["22:00"]),
                        ("grace", &["soon"]),
                        ("alerts", &["bob"]),
                        ("time_zone", &["Mars/Base"]),
                    ],
                ),
            );
            let texts: Vec<String> = notes(&c).into_iter().map(|(_, t)| t).collect();
            assert_eq!(texts, vec![
                "time zone: 'Mars/Base' is not an IANA time zone name like Europe/Berlin",
                "grace delay: 'soon' is not a number of seconds (leave it empty for the service's default)",
                "buddy alerts: 'bob' is not a JID like bob@example.net",
            ]);
            assert_eq!(user(&t), before, "nothing changed");

            let c = adhoc(
                &t,
                "node='preferences' sessionid='s' action='complete'",
                &echo(
                    &again,
                    &[
                        ("quiet_start", &["22:00"]),
                        ("grace", &["300"]),
                        ("senders", &["list"]),
                        ("senders_list", &["bob@example.net", "carol@example.org"]),
                        ("forward_subscriptions", &["1"]),
                        ("alerts", &["bob@example.net"]),
                        ("daily_cap", &["20"]),
                        ("subscription_policy", &["ask"]),
                    ],
                ),
            );
            assert_eq!(c.status, Some(Status::Completed));
            let (type_, text) = &notes(&c)[0];
            assert_eq!(*type_, NoteType::Info);
            assert!(text.starts_with("Saved.\n"), "{text}");
            let u = user(&t);
            assert_eq!(u.time_zone.as_deref(), Some("Europe/Berlin"));
            assert_eq!(u.subscription_policy, SubscriptionPolicy::Ask);
            let prefs = u.email.unwrap().prefs;
            assert_eq!(prefs.when, ForwardWhen::Never);
            assert_eq!(prefs.grace_delay_secs, Some(300));
            assert_eq!(
                prefs.senders,
                SenderFilter::List(vec!["bob@example.net".into(), "carol@example.org".into()])
            );
            assert_eq!(
                prefs.quiet_hours,
                Some(QuietHours {
                    start_minute: 22 * 60,
                    end_minute: 7 * 60,
                    time_zone: "Europe/Berlin".into(),
                    action: QuietAction::Hold,
                })
            );
            assert!(prefs.forward_subscriptions);
            assert_eq!(prefs.alert_buddies, vec!["bob@example.net".to_owned()]);
            assert_eq!(prefs.daily_cap, Some(20));

            // The chat shows the same values, and the form is pre-filled with them next time.
            let shown = say(&t, "prefs email");
            for line in [
                "  when: never (nothing is forwarded here)",
                "  grace: 300 s",
                "  senders: only bob@example.net, carol@example.org",
                "  quiet: 22:00-07:00 hold (Europe/Berlin; messages wait until they end)",
                "  subscriptions: on",
                "  alerts: bob@example.net",
                "  cap: 20 a day",
                "Time zone: Europe/Berlin",
                "Subscription policy: ask",
            ] {
                assert!(shown.contains(line), "{line} not in {shown}");
            }
            assert!(
                text.contains("  quiet: 22:00-07:00 hold"),
                "the note says it too: {text}"
            );
            let form = adhoc(&t, "node='preferences'", "").form.unwrap();
            assert_eq!(value(&form, "quiet_start"), "22:00");
            assert_eq!(
                values(&form, "senders_list"),
                vec!["bob@example.net", "carol@example.org"]
            );
            assert_eq!(value(&form, "time_zone"), "Europe/Berlin");
        }

        #[test]
        fn preferences_by_adhoc_with_two_terminals_choose_one_first() {
            let t = Harness::new();
            alice(&t);
            let c = adhoc(&t, "node='preferences'", "");
            assert_eq!(c.actions.as_ref().unwrap().execute, Some(Step::Next));
            let form = c.form.unwrap();
            assert_eq!(value(&form, "terminal"), "email");
            let c = adhoc(
                &t,
                "node='preferences' sessionid='s' action='next'",
                &submit(&[("terminal", &["sms"])]),
            );
            assert_eq!(
                c.actions.as_ref().unwrap().allowed,
                vec![Step::Prev, Step::Complete]
            );
            let form = c.form.unwrap();
            assert_eq!(value(&form, "terminal"), "phone");
            assert!(form
                .get_child("instructions", ns::DATA_FORMS)
                .unwrap()
                .text()
                .contains(PHONE));

            // The phone's cap may not pass the service's.
            let c = adhoc(
                &t,
                "node='preferences' sessionid='s' action='complete'",
                &echo(&form, &[("daily_cap", &["50"])]),
            );
            assert_eq!(
                notes(&c),
                vec![(
                    NoteType::Error,
                    "daily cap: this service sends at most 5 SMS a day".to_owned()
                )]
            );
            let c = adhoc(
                &t,
                "node='preferences' sessionid='s' action='complete'",
                &echo(
                    &form,
                    &[
                        ("quiet_start", &["23:00"]),
                        ("quiet_end", &["06:30"]),
                        ("quiet_action", &["email"]),
                        ("daily_cap", &["3"]),
                    ],
                ),
            );
            assert_eq!(c.status, Some(Status::Completed), "{:?}", notes(&c));
            let u = user(&t);
            let phone = u.phone.unwrap().prefs;
            assert_eq!(phone.quiet_hours.unwrap().action, QuietAction::Email);
            assert_eq!(phone.daily_cap, Some(3));
            assert_eq!(
                u.email.unwrap().prefs,
                Default::default(),
                "the email terminal is untouched"
            );

            // A terminal she does not have, on the first page.
            let mut u = user(&t);
            u.email = None;
            t.store.tx().put_user(&u).unwrap();
            let c = adhoc(
                &t,
                "node='preferences' sessionid='s' action='next'",
                &submit(&[("terminal", &["email"])]),
            );
            assert!(
                notes(&c)[0]
                    .1
                    .starts_with("terminal: you have no email terminal"),
                "{:?}",
                notes(&c)
            );
        }

        #[test]
        fn preferences_without_terminals_are_the_accounts() {
            let t = Harness::new();
            t.register(ALICE, "alice");
            let form = adhoc(&t, "node='preferences'", "").form.unwrap();
            assert_eq!(value(&form, "terminal"), "");
            assert!(form.children().all(|f| f.attr("var") != Some("when")));
            let c = adhoc(
                &t,
                "node='preferences' sessionid='s'",
                &echo(&form, &[("subscription_policy", &["buddies_only"])]),
            );
            assert_eq!(c.status, Some(Status::Completed), "{:?}", notes(&c));
            assert_eq!(
                user(&t).subscription_policy,
                SubscriptionPolicy::BuddiesOnly
            );
        }

        #[test]
        fn preferences_by_chat_one_setting_at_a_time() {
            let t = Harness::new();
            alice(&t);
            let ok = |line: &str| {
                let said = say(&t, line);
                assert!(said.starts_with("Saved.\n"), "{line}: {said}");
                said
            };
            ok("set email when never");
            ok("set email grace 300");
            ok("set email senders buddies");
            ok("set phone senders bob@example.net, carol@example.org");
            ok("set phone quiet 22:00-07:00 email");
            ok("set email quiet 21:30-06:00");
            ok("set email subscriptions on");
            ok("set phone alerts bob@example.net,carol@example.org");
            ok("set phone cap 4");
            let said = ok("timezone Europe/Berlin");
            assert!(said.contains("Time zone: Europe/Berlin"), "{said}");
            ok("policy buddies_only");
            let u = user(&t);
            let email = &u.email.as_ref().unwrap().prefs;
            let phone = &u.phone.as_ref().unwrap().prefs;
            assert_eq!(email.when, ForwardWhen::Never);
            assert_eq!(email.grace_delay_secs, Some(300));
            assert_eq!(email.senders, SenderFilter::Buddies);
            assert!(email.forward_subscriptions);
            assert_eq!(
                phone.senders,
                SenderFilter::List(vec!["bob@example.net".into(), "carol@example.org".into()])
            );
            assert_eq!(
                phone.alert_buddies,
                vec!["bob@example.net".to_owned(), "carol@example.org".to_owned()]
            );
            assert_eq!(phone.daily_cap, Some(4));
            assert_eq!(u.subscription_policy, SubscriptionPolicy::BuddiesOnly);
            // The time zone set after the quiet hours applies to them too.
            for quiet in [&email.quiet_hours, &phone.quiet_hours] {
                assert_eq!(quiet.as_ref().unwrap().time_zone, "Europe/Berlin");
            }
            assert_eq!(
                email.quiet_hours.as_ref().unwrap().start_minute,
                21 * 60 + 30
            );
            assert_eq!(
                phone.quiet_hours.as_ref().unwrap().action,
                QuietAction::Email
            );

            // Bad values: the field named, nothing changed.
            let before = user(&t);
            for (line, said) in [
                ("set email quiet 25:00-07:00 hold", "quiet hours start: '25:00' is not a time like 22:30"),
                ("set email quiet 22:00-22:00", "quiet hours end: the end is the start: quiet hours need a length"),
                ("set email quiet 22:00-07:00 email", "quiet hours action: email is this terminal itself: choose hold"),
                ("set phone quiet 22:00-07:00 later", "quiet hours action: 'later' is not one of hold, email"),
                ("set email when sometimes", "when: 'sometimes' is not one of always, no_xmpp_resource, away_or_offline, never"),
                ("set email grace 2 minutes", "grace delay: '2 minutes' is not a number of seconds (leave it empty for the service's default)"),
                ("set email senders friends", "senders: 'friends' is not one of everyone, buddies, list"),
                ("set email senders list", "senders: 'list' needs at least one JID, like bob@example.net"),
                ("set email alerts bob@example.net,example.org", "buddy alerts: 'example.org' is not a JID like bob@example.net"),
                ("set email subscriptions maybe", "forward subscription requests: 'maybe' is not yes or no"),
                ("set email cap 0", "daily cap: 0 would forward nothing: set when to never instead"),
                ("set phone cap 6", "daily cap: this service sends at most 5 SMS a day"),
                ("set email cap lots", "daily cap: 'lots' is not a whole number (leave it empty for the service's default)"),
                ("timezone Mars/Base", "time zone: 'Mars/Base' is not an IANA time zone name like Europe/Berlin"),
                ("policy nobody", "subscription policy: 'nobody' is not one of auto, buddies_only, ask"),
            ] {
                assert_eq!(say(&t, line), format!("{said}\nNothing was changed."), "{line}");
            }
            assert_eq!(user(&t), before);
            assert!(say(&t, "set fax when never").starts_with("terminal: 'fax' is not a terminal"));
            assert!(say(&t, "set email colour blue").starts_with("There is no setting 'colour'."));
            assert!(say(&t, "set email quiet tonight").starts_with("Usage: set email|phone quiet"));
            assert_eq!(user(&t), before);

            // Back to the defaults.
            ok("set email quiet off");
            ok("set email grace default");
            ok("set phone cap default");
            ok("set phone alerts off");
            ok("set email senders everyone");
            let u = user(&t);
            assert_eq!(u.email.as_ref().unwrap().prefs.quiet_hours, None);
            assert_eq!(u.email.as_ref().unwrap().prefs.grace_delay_secs, None);
            assert_eq!(
                u.email.as_ref().unwrap().prefs.senders,
                SenderFilter::Everyone
            );
            assert_eq!(u.phone.as_ref().unwrap().prefs.daily_cap, None);
            assert!(u.phone.as_ref().unwrap().prefs.alert_buddies.is_empty());
            assert_eq!(
                say(&t, "timezone"),
                "Your time zone is Europe/Berlin. Usage: timezone Europe/Berlin (or timezone UTC)"
            );
            assert_eq!(
                say(&t, "policy"),
                "Your subscription policy is buddies_only. Usage: policy auto|buddies_only|ask"
            );
        }

        #[test]
        fn both_doors_refuse_with_the_same_sentence() {
            let t = Harness::new();
            alice_with_email(&t);
            let form = adhoc(&t, "node='preferences'", "").form.unwrap();
            for (chat, var, typed) in [
                ("set email quiet 25:00-07:00", "quiet_start", "25:00"),
                ("set email grace -5", "grace", "-5"),
                ("set email cap 0", "daily_cap", "0"),
                ("set email when soon", "when", "soon"),
                ("timezone Nowhere/Town", "time_zone", "Nowhere/Town"),
                ("policy maybe", "subscription_policy", "maybe"),
            ] {
                let mut changes: Vec<(&str, &[&str])> = vec![(var, std::slice::from_ref(&typed))];
                if var == "quiet_start" {
                    changes.push(("quiet_end", &["07:00"]));
                }
                let c = adhoc(
                    &t,
                    "node='preferences' sessionid='s'",
                    &echo(&form, &changes),
                );
                let by_chat = say(&t, chat);
                assert_eq!(
                    by_chat,
                    format!("{}\nNothing was changed.", c.notes[0].text),
                    "{chat}"
                );
            }
        }

        #[test]
        fn state_by_both_doors_and_status_says_it() {
            let t = Harness::new();
            alice(&t);
            assert_eq!(
                say(&t, "state phone away"),
                format!("Your phone {PHONE} is away. Buddies see you: available (by email).")
            );
            assert_eq!(user(&t).phone.unwrap().state, LocalState::Away);
            assert_eq!(
                say(&t, "state phone"),
                "Your phone is away. Usage: state phone available|away|dnd"
            );
            let before = user(&t);
            assert_eq!(
                say(&t, "state phone asleep"),
                "state: 'asleep' is not one of available, away, dnd\nNothing was changed."
            );
            assert_eq!(user(&t), before);

            // Ad-hoc: one page, pre-filled with the primary (else first) terminal's state.
            say(&t, "primary phone");
            let after_primary = user(&t);
            let c = adhoc(&t, "node='state'", "");
            assert_eq!(c.actions.as_ref().unwrap().allowed, vec![Step::Complete]);
            let form = c.form.unwrap();
            assert_eq!(
                (value(&form, "terminal"), value(&form, "state")),
                ("phone".to_owned(), "away".to_owned())
            );
            let c = adhoc(
                &t,
                "node='state' sessionid='s'",
                &echo(&form, &[("terminal", &["email"]), ("state", &["sleepy"])]),
            );
            assert_eq!(c.status, Some(Status::Executing));
            assert_eq!(
                notes(&c),
                vec![(
                    NoteType::Error,
                    "state: 'sleepy' is not one of available, away, dnd".to_owned()
                )]
            );
            assert_eq!(user(&t), after_primary);
            let c = adhoc(
                &t,
                "node='state' sessionid='s'",
                &echo(&form, &[("terminal", &["email"]), ("state", &["dnd"])]),
            );
            assert_eq!(notes(&c), vec![(NoteType::Info, format!(
                "Your email address {MAIL} is on do not disturb: nothing is forwarded there until you set it available. \
                 Buddies see you: away (reachable by SMS)."
            ))]);
            assert_eq!(user(&t).email.unwrap().state, LocalState::Dnd);

            // Status, by chat and ad-hoc, says the same.
            let status = say(&t, "status");
            let c = adhoc(&t, "node='status'", "");
            assert_eq!(c.status, Some(Status::Completed));
            assert_eq!(notes(&c), vec![(NoteType::Info, status.clone())]);
            for line in [
                format!("Your reach address: alice@{D}"),
                "Buddies see: away (reachable by SMS)".to_owned(),
                format!("Email: {MAIL} (verified, do not disturb)"),
                format!("Phone: {PHONE} (verified, away, primary)"),
                "  when: away_or_offline (while your XMPP clients are away or offline)".to_owned(),
                "  grace: 120 s (the service's default)".to_owned(),
                "  cap: the service's default (5 SMS a day)".to_owned(),
                "Time zone: UTC (for quiet hours)".to_owned(),
                "Subscription policy: auto (everyone who asks may subscribe to your reach address)"
                    .to_owned(),
                "Held messages: 0".to_owned(),
                "Waiting to be forwarded: 0".to_owned(),
            ] {
                assert!(status.contains(&line), "{line} not in {status}");
            }

            // No terminal, no state to set.
            let mut u = user(&t);
            u.email = None;
            u.phone = None;
            t.store.tx().put_user(&u).unwrap();
            let c = adhoc(&t, "node='state'", "");
            assert_eq!(c.status, Some(Status::Completed));
            assert!(say(&t, "state email away").starts_with("terminal: you have no email terminal"));
        }
    }
}
