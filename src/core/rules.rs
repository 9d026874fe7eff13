//! The user's rules: per-terminal preferences (when to forward, from whom, quiet hours, buddy
//! alerts, caps) and the routing decision they drive.
//!
//! Everything here is stored forever inside terminal records, so the serde shapes are part of the
//! store's format: add fields with defaults, never rename.

use serde::{Deserialize, Serialize};

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
