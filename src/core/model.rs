//! The records Reach keeps: users and their terminals, buddies, sessions, held and pending
//! messages, queued emails and SMS, and what can go wrong keeping them.
//!
//! They belong to the core, which decides with them; the store (`crate::store`) depends on this
//! module and never the reverse. They are stored as JSON so that they can grow fields (new
//! fields carry `#[serde(default)]`); renaming or removing one needs a migration.

use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::address::{Email, Handle, Phone};

/// What can go wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The engine failed (I/O, or the database refused or went away).
    #[error("store error: {0}")]
    Engine(String),
    /// The engine cannot be reached now (a database restarting, a connection lost): what was
    /// asked may succeed once it is back.
    #[error("the store is unavailable: {0}")]
    Unavailable(String),
    /// Another process holds the store (sled allows one).
    #[error("the store is in use by another process: {0}")]
    InUse(String),
    #[error("store record is corrupt: {0}")]
    Corrupt(String),
    #[error("store has schema version {found}, this Reach understands {expected}")]
    Schema { found: u32, expected: u32 },
    #[error("the handle is already taken")]
    HandleTaken,
    /// A stanza that cannot be written as XML (see [`crate::xmpp::xml_text::to_xml`]).
    #[error("cannot queue the stanza: {0}")]
    Unwritable(#[from] crate::xmpp::xml_text::UnsafeXml),
    /// A key longer than any engine keeps (a bug: keys are built from bounded parts).
    #[error("a key of {bytes} bytes for {tree} is longer than the store keeps")]
    KeyTooLong { tree: &'static str, bytes: usize },
    /// Another instance committed the same data first: the transaction is run again.
    #[error("another instance changed the same data at the same time")]
    Conflict,
    /// A lock another instance holds, asked for while this transaction holds others: the
    /// caller commits what it has and asks again in a new transaction.
    #[error("the user is busy in another instance")]
    Busy,
}

impl StoreError {
    /// Whether running the transaction again may succeed ([`StoreError::Conflict`],
    /// [`StoreError::Busy`]).
    pub fn is_retryable(&self) -> bool {
        matches!(self, StoreError::Conflict | StoreError::Busy)
    }
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// An input whose handling failed for good (a bug: a panic, or a stanza that cannot be
/// written), set aside so that it is not retried into a crash loop. `reach dead-letters` lists
/// them; marked for re-drive, they are handled again at the next start.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetter {
    /// When it was set aside.
    pub at: u64,
    /// What kind of input: `stanza`, `email`, `sms`, `sms-report`.
    pub kind: String,
    /// Why it was set aside (no message text in it).
    pub reason: String,
    /// The input itself, as the core's encoding of it (see `crate::core::dead_letter`).
    pub payload: String,
    /// Identifies the input, so that a resend of the same one is refused without handling.
    pub fingerprint: Vec<u8>,
    /// The admin asked for it to be handled again.
    #[serde(default)]
    pub redrive: bool,
}

/// A terminal address and whether its owner has proven they control it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Terminal<A> {
    pub address: A,
    pub verified: bool,
    /// Mail to it bounced since it was last confirmed working.
    #[serde(default)]
    pub failing: bool,
    /// The user texted STOP: nothing is sent to it until START.
    #[serde(default)]
    pub stopped: bool,
    /// The state the user set from this terminal (`/away`, `/back`, `/dnd`).
    #[serde(default)]
    pub state: LocalState,
    /// What the user wants this terminal to get.
    #[serde(default)]
    pub prefs: crate::core::rules::Preferences,
    /// Day (since the Unix epoch) Reach last asked the user for this terminal's local state.
    #[serde(default)]
    pub prompted_day: Option<u64>,
}

/// A terminal's local state, set by the user from that terminal.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LocalState {
    #[default]
    Available,
    Away,
    Dnd,
}

impl<A> Terminal<A> {
    /// A new, unverified terminal.
    pub fn unverified(address: A) -> Self {
        Terminal {
            address,
            verified: false,
            failing: false,
            stopped: false,
            state: LocalState::Available,
            prefs: crate::core::rules::Preferences::default(),
            prompted_day: None,
        }
    }

    /// Whether Reach may forward messages to it: verified, not stopped, not do-not-disturb.
    pub fn usable(&self) -> bool {
        self.verified && !self.stopped && self.state != LocalState::Dnd
    }
}

/// A registered user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct User {
    /// The user's own bare JID (the key).
    pub jid: String,
    /// The local part of the reach address.
    pub handle: Handle,
    pub email: Option<Terminal<Email>>,
    pub phone: Option<Terminal<Phone>>,
    /// Seconds since the Unix epoch.
    pub registered_at: u64,
    /// The terminal that takes forwards first when several may.
    #[serde(default)]
    pub primary: Option<TerminalKind>,
    /// Who may subscribe to the reach address.
    #[serde(default)]
    pub subscription_policy: crate::core::rules::SubscriptionPolicy,
    /// The user's IANA time zone (for quiet hours), e.g. "Europe/Berlin"; UTC when unset.
    #[serde(default)]
    pub time_zone: Option<String>,
    /// Buddies reach the user at her own JID (integrated mode, `address own`): her server
    /// copies her messages to Reach, and her replies by email and SMS go out from her JID.
    /// Otherwise at her reach address.
    #[serde(default)]
    pub integrated: bool,
}

/// What a server host allows Reach (XEP-0356), as it last said when Reach connected.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct HostPrivileges {
    /// Reach may send messages as the host's users (`message` = `outgoing`).
    pub send_as_users: bool,
    /// The roster permission, as the host named it (`get`, `set`, `both`), if any.
    pub roster: Option<String>,
    /// The presence permission (`managed_entity`, `roster`), if any: to receive presence only.
    pub presence: Option<String>,
    /// Seconds since the Unix epoch when the host said so.
    pub at: u64,
}

/// The presence of one of the user's own XMPP resources, as last seen.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ResourcePresence {
    /// `None` = plain available; otherwise `away`, `chat`, `dnd` or `xa`.
    pub show: Option<String>,
    pub priority: i8,
    pub status: Option<String>,
}

/// A buddy's relation with a reach address.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Buddy {
    /// The buddy receives the reach address's presence (we approved their subscription).
    pub receives_presence: bool,
    /// We asked for the buddy's presence.
    pub we_subscribed: bool,
    /// The buddy's last presence towards the reach address was available.
    pub online: bool,
    /// The buddy's resources last seen available towards the reach address (`""` for presence
    /// from the bare JID), so a second resource coming or going is not a change of `online`.
    pub resources: Vec<String>,
}

/// A buddy's request to see a reach address's presence, waiting for the user's answer (under
/// [`crate::core::rules::SubscriptionPolicy::Ask`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct SubscriptionRequest {
    /// Seconds since the Unix epoch when it (first) arrived.
    pub requested_at: u64,
}

/// The last buddy presence alert told on one terminal about one buddy.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuddyAlert {
    /// The user's bare JID.
    pub user: String,
    pub terminal: TerminalKind,
    /// The buddy's bare JID.
    pub buddy: String,
    /// Seconds since the Unix epoch when the last alert was sent.
    pub sent_at: u64,
    /// What the last alert said: online (true) or offline.
    pub told_online: bool,
}

/// A conversation between a user and a peer.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct Session {
    pub peer: String,
    /// Seconds since the Unix epoch of the last message either way.
    pub last_active: u64,
    /// The peer's name when known (XEP-0172 nick), for email and SMS.
    pub peer_name: Option<String>,
    /// The XMPP thread of the conversation, so replies from other terminals join it.
    pub thread: Option<String>,
    /// Message-ID of the first email of the conversation (the email thread's root).
    pub email_root: Option<String>,
    /// Message-ID of the latest email either way, for In-Reply-To.
    pub email_last: Option<String>,
    /// The first SMS of the conversation (which explains how to reply) was sent.
    pub sms_hinted: bool,
}

/// What a reply alias `r-TOKEN@reply_domain` stands for. Stored under the token's SHA-256.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum AliasPurpose {
    /// Replies go into the user's conversation with the peer.
    Session { user: String, peer: String },
    /// A reply from `address` confirms it as the user's email terminal.
    Verify { user: String, address: String },
}

/// A reply alias.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Alias {
    pub purpose: AliasPurpose,
    pub created: u64,
    pub last_used: u64,
}

impl AliasPurpose {
    pub fn user(&self) -> &str {
        match self {
            AliasPurpose::Session { user, .. } | AliasPurpose::Verify { user, .. } => user,
        }
    }
}

/// Which kind of terminal a verification code is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TerminalKind {
    Email,
    Phone,
}

impl TerminalKind {
    /// Its name in keys and logs: `email` or `phone`.
    pub fn key(self) -> &'static str {
        match self {
            TerminalKind::Email => "email",
            TerminalKind::Phone => "phone",
        }
    }
}

/// A verification code sent to a new terminal.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Verification {
    pub kind: TerminalKind,
    /// The address the code was sent to (the user may have changed it since).
    pub address: String,
    pub code: String,
    pub expires_at: u64,
    pub tries_left: u8,
}

/// A message waiting to be forwarded to a terminal other than XMPP.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PendingItem {
    /// Seconds since the Unix epoch when it arrived.
    pub at: u64,
    pub id: Option<String>,
    /// The text to forward.
    pub text: String,
    /// The stanza as it is (or would be) relayed to the user's XMPP clients.
    pub stanza: String,
    /// Already delivered to an XMPP client (the forward is a second chance, after the grace delay).
    pub on_xmpp: bool,
    /// The buddy asked for an XEP-0184 receipt.
    #[serde(default)]
    pub receipt: bool,
    /// The terminal it goes to (`None`: recorded before terminals were chosen per item; the
    /// best terminal at forwarding time takes it).
    #[serde(default)]
    pub terminal: Option<TerminalKind>,
    /// When it is due (`None`: the conversation's [`Pending::due_at`]).
    #[serde(default)]
    pub due_at: Option<u64>,
    /// Forwarded whatever happens on XMPP (the terminal's preference is `Always`): reading,
    /// answering or coming back to XMPP does not cancel it.
    #[serde(default)]
    pub unconditional: bool,
}

/// What waits for one conversation's next forward.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Pending {
    pub peer: String,
    /// When the earliest of its items is due (digest window, grace delay or quiet hours).
    pub due_at: u64,
    pub items: Vec<PendingItem>,
}

/// An email in the durable outbound queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmailJob {
    pub user: String,
    /// The conversation it forwards, if any (verification mails have none).
    pub peer: Option<String>,
    pub envelope_from: String,
    pub email: crate::email::message::OutgoingEmail,
    /// The messages it carries: held again for XMPP if the mail cannot be delivered.
    pub items: Vec<PendingItem>,
    pub attempts: u32,
    /// Seconds since the Unix epoch of the next attempt.
    pub next_attempt_at: u64,
    /// Seconds since the Unix epoch when it was queued.
    pub queued_at: u64,
    /// The instance sending it now (a claim that expires at `next_attempt_at`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
}

/// A message kept for a user until one of their terminals may take it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HeldMessage {
    /// The peer it comes from.
    pub peer: String,
    /// The stanza as it will be relayed (addressed from the per-session JID).
    pub stanza: String,
    /// Seconds since the Unix epoch.
    pub held_at: u64,
}

/// An SMS in the durable outbound queue.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SmsJob {
    pub user: String,
    /// The conversation it forwards, if any (verification codes and command answers have none).
    pub peer: Option<String>,
    /// E.164 number.
    pub to: String,
    pub text: String,
    /// Reach's reference, echoed by delivery reports.
    pub reference: String,
    /// The messages it carries: held again for XMPP if the SMS cannot be delivered.
    pub items: Vec<PendingItem>,
    pub attempts: u32,
    pub next_attempt_at: u64,
    pub queued_at: u64,
    /// The instance sending it now (a claim that expires at `next_attempt_at`), if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub claimed_by: Option<String>,
}

/// What a delivery report for an SMS refers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentSms {
    pub user: String,
    pub peer: String,
    pub items: Vec<PendingItem>,
    pub sent_at: u64,
}

/// Everything the store holds about one user, for comparing before and after an event (tests,
/// and `debug` dumps). Counters are not part of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct UserState {
    pub user: Option<User>,
    pub buddies: Vec<(String, Buddy)>,
    pub resources: Vec<(String, ResourcePresence)>,
    pub sessions: Vec<Session>,
    pub held: Vec<HeldMessage>,
    pub pending: Vec<Pending>,
    pub verifications: Vec<Verification>,
    pub aliases: usize,
    pub email_jobs: Vec<EmailJob>,
    pub sms_jobs: Vec<SmsJob>,
}

/// Counts for `reach stats` and logs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize)]
pub struct Stats {
    pub users: usize,
    pub sessions: usize,
    pub held: usize,
    pub outbox: usize,
    pub email_queue: usize,
    pub sms_queue: usize,
}

/// A job in one of the durable outbound queues (email, SMS), keyed by a big-endian sequence number.
pub trait QueuedJob: Serialize + DeserializeOwned {
    fn next_attempt_at(&self) -> u64;
    /// Failed attempts so far.
    fn attempts(&self) -> u32;
    /// Seconds since the Unix epoch when it was queued.
    fn queued_at(&self) -> u64;
    /// Records `attempts` failed attempts and when to try next (and that nobody sends it now).
    fn reschedule(&mut self, attempts: u32, next_attempt_at: u64);
    /// The instance sending it now, if any.
    fn claimed_by(&self) -> Option<&str>;
    /// Marks it as being sent by `instance` until `until` (when another may take it).
    fn claim(&mut self, instance: &str, until: u64);
}

macro_rules! queued_job {
    ($job:ty) => {
        impl QueuedJob for $job {
            fn next_attempt_at(&self) -> u64 {
                self.next_attempt_at
            }
            fn attempts(&self) -> u32 {
                self.attempts
            }
            fn queued_at(&self) -> u64 {
                self.queued_at
            }
            fn reschedule(&mut self, attempts: u32, next_attempt_at: u64) {
                self.attempts = attempts;
                self.next_attempt_at = next_attempt_at;
                self.claimed_by = None;
            }
            fn claimed_by(&self) -> Option<&str> {
                self.claimed_by.as_deref()
            }
            fn claim(&mut self, instance: &str, until: u64) {
                self.claimed_by = Some(instance.to_owned());
                self.next_attempt_at = until;
            }
        }
    };
}

queued_job!(EmailJob);
queued_job!(SmsJob);
