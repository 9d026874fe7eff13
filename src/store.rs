//! The store: every piece of state Reach keeps, behind typed domain operations.
//!
//! This is the only module that knows sled. Everything else speaks of users, buddies, resources,
//! sessions, held messages and the outbound queue, so another engine (e.g. PostgreSQL for several
//! instances) can replace this file without touching the core. Records are JSON so that they can
//! grow fields; keys are `owner \0 item` so that a user's data is one prefix scan.
//!
//! Durability: writes land in sled's log immediately but only [`Store::flush`] makes them durable.
//! Callers flush once per batch (group commit) before anything is acknowledged or sent.

use std::sync::Arc;

use minidom::Element;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::sync::Notify;

use crate::address::{Email, Handle, Phone};
use crate::xmpp::link::OutboundQueue;

/// The on-disk layout version; bumped with a migration whenever a record or key format changes.
pub const SCHEMA_VERSION: u32 = 1;
const SCHEMA_KEY: &[u8] = b"schema_version";
/// sled's page cache. sled's default (1 GiB) lets the cache, not the data Reach uses, decide the
/// resident size; 32 MiB holds the hot records (users, sessions of active conversations, queues)
/// of a large installation (BENCHMARKS.md, scale).
const CACHE_BYTES: u64 = 32 * 1024 * 1024;
/// Progress of the walk over all users after a reconnect (see [`Store::presence_walk`]).
const PRESENCE_WALK_KEY: &[u8] = b"presence_walk";

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

/// What can go wrong with the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("store I/O error: {0}")]
    Sled(#[from] sled::Error),
    #[error("store record is corrupt: {0}")]
    Corrupt(String),
    #[error("store has schema version {found}, this Reach understands {expected}")]
    Schema { found: u32, expected: u32 },
    #[error("the handle is already taken")]
    HandleTaken,
    /// A stanza that cannot be written as XML (see [`crate::xmpp::xml_text::to_xml`]).
    #[error("cannot queue the stanza: {0}")]
    Unwritable(#[from] crate::xmpp::xml_text::UnsafeXml),
}

pub type Result<T> = std::result::Result<T, StoreError>;

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
    fn key(self) -> &'static str {
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

/// The head of one conversation's pending forward: when each terminal's batch is due and how
/// many items wait (the items are stored one per key beside it).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct PendingHead {
    peer: String,
    /// The earliest of the batches' times.
    due_at: u64,
    /// When the items for each terminal are due (`None`: items recorded before terminals were
    /// chosen per item).
    batches: Vec<(Option<TerminalKind>, u64)>,
    count: u32,
}

impl PendingHead {
    fn batch_due(&self, terminal: Option<TerminalKind>) -> Option<u64> {
        self.batches
            .iter()
            .find(|(t, _)| *t == terminal)
            .map(|(_, at)| *at)
    }
}

/// An email in the durable outbound queue.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EmailJob {
    pub user: String,
    /// The conversation it forwards, if any (verification mails have none).
    pub peer: Option<String>,
    pub envelope_from: String,
    pub email: crate::email::outbound::OutgoingEmail,
    /// The messages it carries: held again for XMPP if the mail cannot be delivered.
    pub items: Vec<PendingItem>,
    pub attempts: u32,
    /// Seconds since the Unix epoch of the next attempt.
    pub next_attempt_at: u64,
    /// Seconds since the Unix epoch when it was queued.
    pub queued_at: u64,
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
}

/// What a delivery report for an SMS refers to.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SentSms {
    pub user: String,
    pub peer: String,
    pub items: Vec<PendingItem>,
    pub sent_at: u64,
}

/// An abuse-limit counter: how many times something happened in one fixed window of time.
/// Stored under `name \0 scope`; a record from an earlier window counts as zero and is pruned.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
struct Counter {
    /// The window's length in seconds (3600: hourly, 86400: daily, UTC).
    period: u64,
    /// Which window (`now / period`).
    window: u64,
    count: u32,
}

impl Counter {
    /// The first second after the window.
    fn window_end(&self) -> u64 {
        (self.window + 1).saturating_mul(self.period.max(1))
    }
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
    /// Records `attempts` failed attempts and when to try next.
    fn reschedule(&mut self, attempts: u32, next_attempt_at: u64);
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
            }
        }
    };
}

queued_job!(EmailJob);
queued_job!(SmsJob);

/// A time index beside a tree of records that each have a due time: keys are the 8-byte
/// big-endian due time followed by the record's key, values empty. Finding what is due reads only
/// the entries due, however many records wait. Entries are hints: each write of a record adds one
/// for its due time (the entry first, so a crash between the two leaves at worst an entry
/// without a record, never a record without an entry), and an entry whose record is now due at
/// another time is dropped when it is met.
///
/// The job queues are written by the core and walked by their drainer at the same time, so there
/// an entry without its record may be a record about to be written: it is skipped, not dropped.
/// Their drainer removes a job's entry with the job, and entries a crash left without a record
/// are dropped when the store opens.
struct DueIndex(sled::Tree);

impl DueIndex {
    fn entry(at: u64, record_key: &[u8]) -> Vec<u8> {
        let mut k = Vec::with_capacity(8 + record_key.len());
        k.extend_from_slice(&at.to_be_bytes());
        k.extend_from_slice(record_key);
        k
    }

    fn add(&self, at: u64, record_key: &[u8]) -> Result<()> {
        self.0.insert(Self::entry(at, record_key), &[])?;
        Ok(())
    }

    fn remove(&self, at: u64, record_key: &[u8]) -> Result<()> {
        self.0.remove(Self::entry(at, record_key))?;
        Ok(())
    }

    /// Drops the entries whose record is gone (what a crash between the two writes can leave).
    fn drop_orphans(&self, records: &sled::Tree) -> Result<()> {
        for kv in self.0.iter() {
            let (k, _) = kv?;
            if !k
                .get(8..)
                .is_some_and(|r| records.contains_key(r).unwrap_or(true))
            {
                self.0.remove(&k)?;
            }
        }
        Ok(())
    }

    /// Walks the entries due at `now` (all of them with `now = u64::MAX`), earliest first,
    /// passing (due time, record key) to `visit`, which says whether the entry is still right;
    /// wrong entries are removed. Stops when `visit` returns `Visit::Stop`.
    fn walk(&self, now: u64, mut visit: impl FnMut(u64, &[u8]) -> Result<Visit>) -> Result<()> {
        let upper = match now.checked_add(1) {
            Some(end) => std::ops::Bound::Excluded(end.to_be_bytes().to_vec()),
            None => std::ops::Bound::Unbounded,
        };
        for kv in self.0.range((std::ops::Bound::Unbounded, upper)) {
            let (k, _) = kv?;
            let (Some(at), Some(record_key)) = (k.get(..8), k.get(8..)) else {
                self.0.remove(&k)?;
                continue;
            };
            let at = u64::from_be_bytes(at.try_into().unwrap_or([0; 8]));
            match visit(at, record_key)? {
                Visit::Keep => {}
                Visit::Stale => {
                    self.0.remove(&k)?;
                }
                Visit::Stop => break,
            }
        }
        Ok(())
    }

    /// Indexes every record of `records` once, for stores written before the index existed.
    fn build_if_missing(
        &self,
        records: &sled::Tree,
        due_of: impl Fn(&[u8]) -> Option<u64>,
    ) -> Result<()> {
        if !self.0.is_empty() || records.is_empty() {
            return Ok(());
        }
        for kv in records.iter() {
            let (k, v) = kv?;
            if let Some(at) = due_of(&v) {
                self.add(at, &k)?;
            }
        }
        Ok(())
    }
}

/// What [`DueIndex::walk`] does with an entry.
enum Visit {
    Keep,
    Stale,
    Stop,
}

fn queue_put<T: Serialize + QueuedJob>(
    tree: &sled::Tree,
    index: &DueIndex,
    seq: u64,
    job: &T,
) -> Result<()> {
    index.add(job.next_attempt_at(), &seq.to_be_bytes())?;
    tree.insert(seq.to_be_bytes(), encode(job))?;
    Ok(())
}

/// What an index entry of a job queue points at.
enum Indexed<T> {
    /// The job, due at the entry's time.
    Due(u64, T),
    /// The job was rescheduled: the entry is stale.
    Moved,
    /// No job (yet: the core may be about to write it): skip the entry, keep it.
    Absent,
}

fn indexed_job<T: QueuedJob>(
    tree: &sled::Tree,
    name: &str,
    at: u64,
    record_key: &[u8],
) -> Result<Indexed<T>> {
    let Some(v) = tree.get(record_key)? else {
        return Ok(Indexed::Absent);
    };
    let job: T = decode(name, &v)?;
    let seq = <[u8; 8]>::try_from(record_key)
        .map(u64::from_be_bytes)
        .unwrap_or_default();
    Ok(if job.next_attempt_at() == at {
        Indexed::Due(seq, job)
    } else {
        Indexed::Moved
    })
}

/// Removes a job and its index entry.
fn queue_remove<T: QueuedJob>(
    tree: &sled::Tree,
    index: &DueIndex,
    name: &str,
    seq: u64,
) -> Result<()> {
    if let Some(v) = tree.remove(seq.to_be_bytes())? {
        if let Ok(job) = decode::<T>(name, &v) {
            index.remove(job.next_attempt_at(), &seq.to_be_bytes())?;
        }
    }
    Ok(())
}

fn queue_due<T: QueuedJob>(
    tree: &sled::Tree,
    index: &DueIndex,
    name: &str,
    now: u64,
    limit: usize,
) -> Result<Vec<(u64, T)>> {
    let mut out = Vec::new();
    index.walk(now, |at, record_key| {
        if out.len() >= limit {
            return Ok(Visit::Stop);
        }
        Ok(match indexed_job(tree, name, at, record_key)? {
            Indexed::Due(seq, job) => {
                out.push((seq, job));
                Visit::Keep
            }
            Indexed::Moved => Visit::Stale,
            Indexed::Absent => Visit::Keep,
        })
    })?;
    Ok(out)
}

fn queue_next<T: QueuedJob>(
    tree: &sled::Tree,
    index: &DueIndex,
    name: &str,
) -> Result<Option<u64>> {
    let mut next = None;
    index.walk(u64::MAX, |at, record_key| {
        Ok(match indexed_job::<T>(tree, name, at, record_key)? {
            Indexed::Due(..) => {
                next = Some(at);
                Visit::Stop
            }
            Indexed::Moved => Visit::Stale,
            Indexed::Absent => Visit::Keep,
        })
    })?;
    Ok(next)
}

/// The due time of a stored job record, whatever its type (for building an index).
fn job_due(v: &[u8]) -> Option<u64> {
    #[derive(Deserialize)]
    struct Due {
        next_attempt_at: u64,
    }
    serde_json::from_slice::<Due>(v)
        .ok()
        .map(|d| d.next_attempt_at)
}

/// The store. Cheap to share behind an `Arc`.
pub struct Store {
    db: sled::Db,
    users: sled::Tree,
    handles: sled::Tree,
    buddies: sled::Tree,
    resources: sled::Tree,
    sessions: sled::Tree,
    held: sled::Tree,
    outbox: sled::Tree,
    aliases: sled::Tree,
    user_aliases: sled::Tree,
    verifications: sled::Tree,
    /// `verifications` by terminal: `kind \0 address \0 jid` (empty values), kept in step by
    /// `put_verification` and `remove_verification`, rebuilt when the store opens.
    verifications_by_address: sled::Tree,
    /// Pending forwards as the first version stored them (one record per conversation holding
    /// every item): moved to `pending_heads` / `pending_items` when the store opens.
    legacy_pending: sled::Tree,
    /// One small [`PendingHead`] per conversation with a pending forward (`jid \0 peer`).
    pending_heads: sled::Tree,
    /// The pending items, one per key (`jid \0 peer \0 seq`), in arrival order.
    pending_items: sled::Tree,
    /// Heads by their earliest due time.
    pending_due: DueIndex,
    /// Pending items per user, all conversations together (`jid`, 8-byte big-endian).
    pending_counts: sled::Tree,
    /// Held-message counts: `jid` for the user's total, `jid \0 peer` per sender (8-byte
    /// big-endian), so checking the caps reads two keys whatever is held.
    held_counts: sled::Tree,
    /// Users whose held messages are being delivered a page at a time (`jid`, empty value).
    held_releases: sled::Tree,
    email_jobs: sled::Tree,
    email_due: DueIndex,
    seen_mail: sled::Tree,
    /// `seen_mail` keys by when they were first seen (8-byte big-endian time, then the key),
    /// so that forgetting old ones reads only those.
    seen_by_time: sled::Tree,
    phones: sled::Tree,
    sms_jobs: sled::Tree,
    sms_due: DueIndex,
    sms_sent: sled::Tree,
    sms_counts: sled::Tree,
    email_counts: sled::Tree,
    published: sled::Tree,
    subscription_requests: sled::Tree,
    buddy_alerts: sled::Tree,
    buddy_alert_rechecks: sled::Tree,
    rechecks_due: DueIndex,
    counters: sled::Tree,
    /// Counters by the end of their window.
    counters_due: DueIndex,
    /// Inputs set aside because handling them failed for good ([`DeadLetter`]), by id.
    dead_letters: sled::Tree,
    /// Dead letters by the fingerprint of their input, so that a resend is refused at once.
    dead_by_fingerprint: sled::Tree,
    outbox_wake: Arc<Notify>,
    sms_wake: Arc<Notify>,
    email_wake: Arc<Notify>,
    /// Outbox keys below this are durable (committed by a flush): the only ones the link may
    /// send, so that nothing (a receipt, a relayed message) leaves before its batch is committed.
    outbox_committed: std::sync::atomic::AtomicU64,
}

fn key(owner: &str, item: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.len() + 1 + item.len());
    k.extend_from_slice(owner.as_bytes());
    k.push(0);
    k.extend_from_slice(item.as_bytes());
    k
}

/// The key of one entry of the index of verifications by address.
fn verification_index_key(kind: TerminalKind, address: &str, jid: &str) -> Vec<u8> {
    let mut k = key(kind.key(), address);
    k.push(0);
    k.extend_from_slice(jid.as_bytes());
    k
}

fn prefix(owner: &str) -> Vec<u8> {
    key(owner, "")
}

fn item_of(k: &[u8]) -> String {
    let pos = k.iter().position(|b| *b == 0).map_or(0, |p| p + 1);
    String::from_utf8_lossy(&k[pos..]).into_owned()
}

/// A count kept as an 8-byte big-endian value (0 when absent).
fn count_at(tree: &sled::Tree, k: &[u8]) -> Result<u64> {
    Ok(tree
        .get(k)?
        .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
        .map_or(0, u64::from_be_bytes))
}

/// Adds `delta` to a count (never below 0; a count of 0 is removed).
fn add_count(tree: &sled::Tree, k: &[u8], delta: i64) -> Result<()> {
    let count = count_at(tree, k)?.saturating_add_signed(delta);
    if count == 0 {
        tree.remove(k)?;
    } else {
        tree.insert(k, &count.to_be_bytes())?;
    }
    Ok(())
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain records cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(tree: &str, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{tree}: {e}")))
}

impl Store {
    /// Opens (or creates) the store in `path`, checking the schema version.
    pub fn open(path: &std::path::Path) -> Result<Store> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            .open()?;
        Self::from_db(db)
    }

    /// A store that lives in memory only, for tests.
    pub fn temporary() -> Result<Store> {
        Self::from_db(sled::Config::new().temporary(true).open()?)
    }

    fn from_db(db: sled::Db) -> Result<Store> {
        match db.get(SCHEMA_KEY)? {
            None => {
                db.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())?;
                db.flush()?;
            }
            Some(v) => {
                let found = <[u8; 4]>::try_from(v.as_ref())
                    .map(u32::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt("schema version".into()))?;
                if found != SCHEMA_VERSION {
                    return Err(StoreError::Schema {
                        found,
                        expected: SCHEMA_VERSION,
                    });
                }
            }
        }
        let store = Store {
            users: db.open_tree("users")?,
            handles: db.open_tree("handles")?,
            buddies: db.open_tree("buddies")?,
            resources: db.open_tree("resources")?,
            sessions: db.open_tree("sessions")?,
            held: db.open_tree("held")?,
            outbox: db.open_tree("outbox")?,
            aliases: db.open_tree("aliases")?,
            user_aliases: db.open_tree("user_aliases")?,
            verifications: db.open_tree("verifications")?,
            verifications_by_address: db.open_tree("verifications_by_address")?,
            legacy_pending: db.open_tree("pending")?,
            pending_heads: db.open_tree("pending_heads")?,
            pending_items: db.open_tree("pending_items")?,
            held_counts: db.open_tree("held_counts")?,
            pending_counts: db.open_tree("pending_counts")?,
            held_releases: db.open_tree("held_releases")?,
            pending_due: DueIndex(db.open_tree("pending_due")?),
            email_jobs: db.open_tree("email_jobs")?,
            email_due: DueIndex(db.open_tree("email_due")?),
            seen_mail: db.open_tree("seen_mail")?,
            seen_by_time: db.open_tree("seen_by_time")?,
            phones: db.open_tree("phones")?,
            sms_jobs: db.open_tree("sms_jobs")?,
            sms_due: DueIndex(db.open_tree("sms_due")?),
            sms_sent: db.open_tree("sms_sent")?,
            sms_counts: db.open_tree("sms_counts")?,
            email_counts: db.open_tree("email_counts")?,
            published: db.open_tree("published")?,
            subscription_requests: db.open_tree("subscription_requests")?,
            buddy_alerts: db.open_tree("buddy_alerts")?,
            buddy_alert_rechecks: db.open_tree("buddy_alert_rechecks")?,
            rechecks_due: DueIndex(db.open_tree("rechecks_due")?),
            counters: db.open_tree("counters")?,
            counters_due: DueIndex(db.open_tree("counters_due")?),
            dead_letters: db.open_tree("dead_letters")?,
            dead_by_fingerprint: db.open_tree("dead_by_fingerprint")?,
            outbox_wake: Arc::new(Notify::new()),
            email_wake: Arc::new(Notify::new()),
            sms_wake: Arc::new(Notify::new()),
            outbox_committed: std::sync::atomic::AtomicU64::new(0),
            db,
        };
        // Everything already in the store is committed.
        store
            .outbox_committed
            .store(store.outbox_end()?, std::sync::atomic::Ordering::SeqCst);
        store.index_seen_ids()?;
        store.migrate_pending()?;
        store.count_held_if_missing()?;
        store.build_due_indexes()?;
        store.index_verifications()?;
        Ok(store)
    }

    /// Stores written before the due indexes existed: index their records once.
    fn build_due_indexes(&self) -> Result<()> {
        self.pending_due
            .build_if_missing(&self.pending_heads, |v| {
                serde_json::from_slice::<PendingHead>(v)
                    .ok()
                    .map(|p| p.due_at)
            })?;
        self.email_due.build_if_missing(&self.email_jobs, job_due)?;
        self.sms_due.build_if_missing(&self.sms_jobs, job_due)?;
        self.email_due.drop_orphans(&self.email_jobs)?;
        self.sms_due.drop_orphans(&self.sms_jobs)?;
        self.rechecks_due
            .build_if_missing(&self.buddy_alert_rechecks, |v| {
                serde_json::from_slice::<(u64, String, TerminalKind, String)>(v)
                    .ok()
                    .map(|r| r.0)
            })?;
        self.counters_due.build_if_missing(&self.counters, |v| {
            serde_json::from_slice::<Counter>(v)
                .ok()
                .map(|c| c.window_end())
        })?;
        self.db.flush()?;
        Ok(())
    }

    /// Stores written before `seen_by_time` existed have ids without it: index them once.
    fn index_seen_ids(&self) -> Result<()> {
        if !self.seen_by_time.is_empty() || self.seen_mail.is_empty() {
            return Ok(());
        }
        for entry in self.seen_mail.iter() {
            let (id, at) = entry?;
            let at = <[u8; 8]>::try_from(at.as_ref()).unwrap_or([0; 8]);
            let mut by_time = at.to_vec();
            by_time.extend_from_slice(&id);
            self.seen_by_time.insert(by_time, &[])?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// Makes every write so far durable (one fsync for the whole batch).
    pub fn flush(&self) -> Result<()> {
        // Outbox keys are written in order by one thread (the runtime's), so every key below
        // this end was written before the flush began, and is durable once it returns.
        let end = self.outbox_end()?;
        self.db.flush()?;
        self.outbox_committed
            .fetch_max(end, std::sync::atomic::Ordering::SeqCst);
        Ok(())
    }

    /// One past the newest outbox key (0 for an empty outbox).
    fn outbox_end(&self) -> Result<u64> {
        Ok(self
            .outbox
            .last()?
            .and_then(|(k, _)| <[u8; 8]>::try_from(k.as_ref()).ok())
            .map_or(0, |k| u64::from_be_bytes(k).saturating_add(1)))
    }

    // ---- users ----

    pub fn user(&self, jid: &str) -> Result<Option<User>> {
        self.users
            .get(jid)?
            .map(|v| decode("users", &v))
            .transpose()
    }

    pub fn user_by_handle(&self, handle: &Handle) -> Result<Option<User>> {
        match self.handles.get(handle.as_str())? {
            Some(jid) => self.user(&String::from_utf8_lossy(&jid)),
            None => Ok(None),
        }
    }

    /// Creates or updates a user. Fails with [`StoreError::HandleTaken`] if another user holds
    /// the handle; releases the user's previous handle when it changes.
    pub fn put_user(&self, user: &User) -> Result<()> {
        let previous = self.user(&user.jid)?;
        let claimed = self.handles.compare_and_swap(
            user.handle.as_str(),
            None as Option<&[u8]>,
            Some(user.jid.as_bytes()),
        )?;
        if let Err(current) = claimed {
            if current.current.as_deref() != Some(user.jid.as_bytes()) {
                return Err(StoreError::HandleTaken);
            }
        }
        let verified_phone = |u: &User| {
            u.phone
                .as_ref()
                .filter(|t| t.verified)
                .map(|t| t.address.as_str().to_owned())
        };
        if let Some(previous) = &previous {
            if previous.handle != user.handle {
                self.handles.remove(previous.handle.as_str())?;
            }
            if let Some(old) = verified_phone(previous) {
                if verified_phone(user).as_deref() != Some(old.as_str()) {
                    self.phones.remove(old.as_bytes())?;
                }
            }
        }
        if let Some(phone) = verified_phone(user) {
            self.phones.insert(phone.as_bytes(), user.jid.as_bytes())?;
        }
        self.users.insert(user.jid.as_str(), encode(user))?;
        Ok(())
    }

    /// The user whose verified phone this is.
    pub fn user_by_phone(&self, phone: &str) -> Result<Option<User>> {
        match self.phones.get(phone.as_bytes())? {
            Some(jid) => self.user(&String::from_utf8_lossy(&jid)),
            None => Ok(None),
        }
    }

    /// Deletes the user and everything that belongs to them. Returns the removed record and the
    /// buddies of their reach address (so they can be told).
    pub fn remove_user(&self, jid: &str) -> Result<Option<(User, Vec<String>)>> {
        let Some(user) = self.user(jid)? else {
            return Ok(None);
        };
        let buddies = self
            .buddies(&user.handle)?
            .into_iter()
            .map(|(b, _)| b)
            .collect();
        self.handles.remove(user.handle.as_str())?;
        if let Some(phone) = user.phone.as_ref().filter(|t| t.verified) {
            self.phones.remove(phone.address.as_str().as_bytes())?;
        }
        self.users.remove(jid)?;
        for k in self.user_aliases.scan_prefix(prefix(jid)).keys() {
            let k = k?;
            self.aliases.remove(&k[jid.len() + 1..])?;
        }
        self.published.remove(jid)?;
        for kind in [TerminalKind::Email, TerminalKind::Phone] {
            self.remove_verification(jid, kind)?;
        }
        self.held_counts.remove(jid)?;
        self.pending_counts.remove(jid)?;
        self.held_releases.remove(jid)?;
        for (tree, owner) in [
            (&self.buddies, user.handle.as_str()),
            (&self.subscription_requests, user.handle.as_str()),
            (&self.buddy_alerts, jid),
            (&self.buddy_alert_rechecks, jid),
            (&self.resources, jid),
            (&self.sessions, jid),
            (&self.held, jid),
            (&self.held_counts, jid),
            (&self.user_aliases, jid),
            (&self.verifications, jid),
            (&self.pending_heads, jid),
            (&self.pending_items, jid),
        ] {
            for k in tree.scan_prefix(prefix(owner)).keys() {
                tree.remove(k?)?;
            }
        }
        for kv in self.email_jobs.iter() {
            let (k, v) = kv?;
            if let Ok(job) = decode::<EmailJob>("email_jobs", &v) {
                if job.user == jid {
                    self.email_due.remove(job.next_attempt_at, &k)?;
                    self.email_jobs.remove(k)?;
                }
            }
        }
        for kv in self.sms_jobs.iter() {
            let (k, v) = kv?;
            if let Ok(job) = decode::<SmsJob>("sms_jobs", &v) {
                if job.user == jid {
                    self.sms_due.remove(job.next_attempt_at, &k)?;
                    self.sms_jobs.remove(k)?;
                }
            }
        }
        for counts in [&self.sms_counts, &self.email_counts] {
            for k in counts.scan_prefix(prefix(jid)).keys() {
                counts.remove(k?)?;
            }
        }
        Ok(Some((user, buddies)))
    }

    pub fn users(&self) -> Result<Vec<User>> {
        self.users
            .iter()
            .values()
            .map(|v| decode("users", &v?))
            .collect()
    }

    /// Up to `limit` users whose JID sorts after `after` (from the first with `None`), in JID
    /// order: for walking all users a step at a time.
    pub fn users_after(&self, after: Option<&str>, limit: usize) -> Result<Vec<User>> {
        let start = match after {
            Some(jid) => std::ops::Bound::Excluded(jid.as_bytes().to_vec()),
            None => std::ops::Bound::Unbounded,
        };
        self.users
            .range((start, std::ops::Bound::Unbounded))
            .values()
            .take(limit)
            .map(|v| decode("users", &v?))
            .collect()
    }

    /// Where the walk over all users after a reconnect stands: `Some("")` at its start,
    /// `Some(jid)` after that user, `None` when there is no walk.
    pub fn presence_walk(&self) -> Result<Option<String>> {
        Ok(self
            .db
            .get(PRESENCE_WALK_KEY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    pub fn set_presence_walk(&self, at: Option<&str>) -> Result<()> {
        match at {
            Some(jid) => self.db.insert(PRESENCE_WALK_KEY, jid.as_bytes())?,
            None => self.db.remove(PRESENCE_WALK_KEY)?,
        };
        Ok(())
    }

    // ---- buddies of a reach address ----

    pub fn buddy(&self, handle: &Handle, buddy: &str) -> Result<Option<Buddy>> {
        self.buddies
            .get(key(handle.as_str(), buddy))?
            .map(|v| decode("buddies", &v))
            .transpose()
    }

    pub fn put_buddy(&self, handle: &Handle, buddy: &str, record: &Buddy) -> Result<()> {
        self.buddies
            .insert(key(handle.as_str(), buddy), encode(record))?;
        Ok(())
    }

    pub fn remove_buddy(&self, handle: &Handle, buddy: &str) -> Result<()> {
        self.buddies.remove(key(handle.as_str(), buddy))?;
        Ok(())
    }

    pub fn buddies(&self, handle: &Handle) -> Result<Vec<(String, Buddy)>> {
        self.buddies
            .scan_prefix(prefix(handle.as_str()))
            .map(|kv| {
                let (k, v) = kv?;
                Ok((item_of(&k), decode("buddies", &v)?))
            })
            .collect()
    }

    // ---- what the reach address last showed, and who asks to see it ----

    /// The global presence last sent to the reach address's buddies (`None`: never published).
    pub fn published_presence(&self, jid: &str) -> Result<Option<crate::core::GlobalPresence>> {
        self.published
            .get(jid)?
            .map(|v| decode("published", &v))
            .transpose()
    }

    pub fn put_published_presence(
        &self,
        jid: &str,
        presence: &crate::core::GlobalPresence,
    ) -> Result<()> {
        self.published.insert(jid, encode(presence))?;
        Ok(())
    }

    pub fn subscription_request(
        &self,
        handle: &Handle,
        buddy: &str,
    ) -> Result<Option<SubscriptionRequest>> {
        self.subscription_requests
            .get(key(handle.as_str(), buddy))?
            .map(|v| decode("subscription_requests", &v))
            .transpose()
    }

    pub fn put_subscription_request(
        &self,
        handle: &Handle,
        buddy: &str,
        request: &SubscriptionRequest,
    ) -> Result<()> {
        self.subscription_requests
            .insert(key(handle.as_str(), buddy), encode(request))?;
        Ok(())
    }

    /// Removes a waiting request; returns it if there was one.
    pub fn take_subscription_request(
        &self,
        handle: &Handle,
        buddy: &str,
    ) -> Result<Option<SubscriptionRequest>> {
        self.subscription_requests
            .remove(key(handle.as_str(), buddy))?
            .map(|v| decode("subscription_requests", &v))
            .transpose()
    }

    /// The waiting requests to a reach address, as (buddy, request).
    pub fn subscription_requests(
        &self,
        handle: &Handle,
    ) -> Result<Vec<(String, SubscriptionRequest)>> {
        self.subscription_requests
            .scan_prefix(prefix(handle.as_str()))
            .map(|kv| {
                let (k, v) = kv?;
                Ok((item_of(&k), decode("subscription_requests", &v)?))
            })
            .collect()
    }

    /// How many buddy records and waiting subscription requests the reach address has
    /// (`[limits] buddies_per_user`); counts keys, decodes nothing.
    pub fn buddy_count(&self, handle: &Handle) -> Result<usize> {
        let p = prefix(handle.as_str());
        Ok(self.buddies.scan_prefix(&p).keys().count()
            + self.subscription_requests.scan_prefix(&p).keys().count())
    }

    // ---- buddy presence alerts ----

    fn alert_key(jid: &str, terminal: TerminalKind, buddy: &str) -> Vec<u8> {
        key(jid, &format!("{}\0{buddy}", terminal.key()))
    }

    pub fn buddy_alert(
        &self,
        jid: &str,
        terminal: TerminalKind,
        buddy: &str,
    ) -> Result<Option<BuddyAlert>> {
        self.buddy_alerts
            .get(Self::alert_key(jid, terminal, buddy))?
            .map(|v| decode("buddy_alerts", &v))
            .transpose()
    }

    pub fn put_buddy_alert(&self, alert: &BuddyAlert) -> Result<()> {
        self.buddy_alerts.insert(
            Self::alert_key(&alert.user, alert.terminal, &alert.buddy),
            encode(alert),
        )?;
        Ok(())
    }

    /// Asks for another look at this alert record at `due_at` (an alert was held back by the
    /// rate limit, so the terminal may not know the buddy's latest state).
    pub fn schedule_alert_recheck(&self, alert: &BuddyAlert, due_at: u64) -> Result<()> {
        let k = Self::alert_key(&alert.user, alert.terminal, &alert.buddy);
        self.rechecks_due.add(due_at, &k)?;
        self.buddy_alert_rechecks.insert(
            k,
            encode(&(due_at, &alert.user, alert.terminal, &alert.buddy)),
        )?;
        Ok(())
    }

    /// Removes and returns the rechecks due at `now`, as (user, terminal, buddy).
    pub fn take_due_alert_rechecks(&self, now: u64) -> Result<Vec<(String, TerminalKind, String)>> {
        let mut due = Vec::new();
        self.rechecks_due.walk(now, |at, k| {
            if let Some(v) = self.buddy_alert_rechecks.get(k)? {
                let (due_at, user, terminal, buddy): (u64, String, TerminalKind, String) =
                    decode("buddy_alert_rechecks", &v)?;
                if due_at == at {
                    self.buddy_alert_rechecks.remove(k)?;
                    due.push((user, terminal, buddy));
                }
            }
            // Taken, or stale: the entry is done either way.
            Ok(Visit::Stale)
        })?;
        Ok(due)
    }

    // ---- the user's own XMPP resources ----

    pub fn set_resource(
        &self,
        jid: &str,
        resource: &str,
        presence: &ResourcePresence,
    ) -> Result<()> {
        self.resources
            .insert(key(jid, resource), encode(presence))?;
        Ok(())
    }

    pub fn remove_resource(&self, jid: &str, resource: &str) -> Result<()> {
        self.resources.remove(key(jid, resource))?;
        Ok(())
    }

    pub fn resources(&self, jid: &str) -> Result<Vec<(String, ResourcePresence)>> {
        self.resources
            .scan_prefix(prefix(jid))
            .map(|kv| {
                let (k, v) = kv?;
                Ok((item_of(&k), decode("resources", &v)?))
            })
            .collect()
    }

    /// Forgets every resource of every user (their presence is re-learnt after a reconnect).
    pub fn clear_resources(&self) -> Result<()> {
        self.resources.clear()?;
        Ok(())
    }

    // ---- sessions ----

    pub fn session(&self, jid: &str, peer: &str) -> Result<Option<Session>> {
        self.sessions
            .get(key(jid, peer))?
            .map(|v| decode("sessions", &v))
            .transpose()
    }

    /// Marks activity in the conversation, creating it if new.
    pub fn touch_session(&self, jid: &str, peer: &str, now: u64) -> Result<Session> {
        let mut record = self.session(jid, peer)?.unwrap_or_else(|| Session {
            peer: peer.to_owned(),
            ..Session::default()
        });
        record.last_active = now;
        self.put_session(jid, &record)?;
        Ok(record)
    }

    pub fn put_session(&self, jid: &str, session: &Session) -> Result<()> {
        self.sessions
            .insert(key(jid, &session.peer), encode(session))?;
        Ok(())
    }

    pub fn sessions(&self, jid: &str) -> Result<Vec<Session>> {
        self.sessions
            .scan_prefix(prefix(jid))
            .values()
            .map(|v| decode("sessions", &v?))
            .collect()
    }

    // ---- held messages ----
    //
    // One key per held message (`jid \0 seq`), so holding and delivering a page cost the same
    // however many wait; counts per user and per sender beside them (`held_counts`) so the caps
    // are checked without a scan.

    pub fn hold(&self, jid: &str, message: &HeldMessage) -> Result<()> {
        let seq = self.db.generate_id()?;
        let mut k = prefix(jid);
        k.extend_from_slice(&seq.to_be_bytes());
        self.held.insert(k, encode(message))?;
        self.add_held_count(jid.as_bytes(), 1)?;
        self.add_held_count(&key(jid, &message.peer), 1)?;
        Ok(())
    }

    fn held_count_at(&self, k: &[u8]) -> Result<u64> {
        count_at(&self.held_counts, k)
    }

    fn add_held_count(&self, k: &[u8], delta: i64) -> Result<()> {
        add_count(&self.held_counts, k, delta)
    }

    /// Stores written before `held_counts` existed: count their held messages once.
    fn count_held_if_missing(&self) -> Result<()> {
        if !self.held_counts.is_empty() || self.held.is_empty() {
            return Ok(());
        }
        for kv in self.held.iter() {
            let (k, v) = kv?;
            let Some(sep) = k.iter().position(|b| *b == 0) else {
                continue;
            };
            let jid = String::from_utf8_lossy(&k[..sep]).into_owned();
            let held: HeldMessage = decode("held", &v)?;
            self.add_held_count(jid.as_bytes(), 1)?;
            self.add_held_count(&key(&jid, &held.peer), 1)?;
        }
        self.db.flush()?;
        Ok(())
    }

    /// Removes and returns the user's oldest held messages, at most `limit` of them, oldest
    /// first. Only that page is read.
    pub fn take_held_page(&self, jid: &str, limit: usize) -> Result<Vec<HeldMessage>> {
        let mut out = Vec::new();
        for kv in self.held.scan_prefix(prefix(jid)).take(limit) {
            let (k, v) = kv?;
            let held: HeldMessage = decode("held", &v)?;
            self.held.remove(k)?;
            self.add_held_count(jid.as_bytes(), -1)?;
            self.add_held_count(&key(jid, &held.peer), -1)?;
            out.push(held);
        }
        Ok(out)
    }

    /// Removes and returns all the user's held messages, oldest first (bounded by the caps on
    /// what may be held, `[limits] held_per_user`).
    pub fn take_held(&self, jid: &str) -> Result<Vec<HeldMessage>> {
        self.take_held_page(jid, usize::MAX)
    }

    /// How many messages are held for the user (one read).
    pub fn held_count(&self, jid: &str) -> Result<usize> {
        Ok(self.held_count_at(jid.as_bytes())? as usize)
    }

    /// How many messages wait for the user, held for XMPP or pending a forward (two reads).
    pub fn waiting_count(&self, jid: &str) -> Result<usize> {
        Ok(
            (self.held_count_at(jid.as_bytes())? + count_at(&self.pending_counts, jid.as_bytes())?)
                as usize,
        )
    }

    /// How many messages from `peer` are held for the user (one read).
    pub fn held_from(&self, jid: &str, peer: &str) -> Result<usize> {
        Ok(self.held_count_at(&key(jid, peer))? as usize)
    }

    /// Notes that the user's held messages are being delivered a page at a time.
    pub fn mark_held_release(&self, jid: &str) -> Result<()> {
        self.held_releases.insert(jid, &[])?;
        Ok(())
    }

    /// Whether the user's held messages are being delivered a page at a time.
    pub fn held_release_running(&self, jid: &str) -> Result<bool> {
        Ok(self.held_releases.contains_key(jid)?)
    }

    pub fn end_held_release(&self, jid: &str) -> Result<()> {
        self.held_releases.remove(jid)?;
        Ok(())
    }

    /// The users whose held messages are being delivered a page at a time.
    pub fn held_releases(&self) -> Result<Vec<String>> {
        self.held_releases
            .iter()
            .keys()
            .map(|k| Ok(String::from_utf8_lossy(&k?).into_owned()))
            .collect()
    }

    /// Puts messages back on hold (in front of nothing: they keep their own order after what is held).
    pub fn hold_stanza(&self, jid: &str, peer: &str, stanza: &str, now: u64) -> Result<()> {
        self.hold(
            jid,
            &HeldMessage {
                peer: peer.to_owned(),
                stanza: stanza.to_owned(),
                held_at: now,
            },
        )
    }

    // ---- reply aliases (keyed by the SHA-256 of their token) ----

    pub fn put_alias(&self, token_hash: &[u8], alias: &Alias) -> Result<()> {
        self.aliases.insert(token_hash, encode(alias))?;
        let mut index = prefix(alias.purpose.user());
        index.extend_from_slice(token_hash);
        self.user_aliases.insert(index, &[])?;
        Ok(())
    }

    pub fn alias(&self, token_hash: &[u8]) -> Result<Option<Alias>> {
        self.aliases
            .get(token_hash)?
            .map(|v| decode("aliases", &v))
            .transpose()
    }

    pub fn remove_alias(&self, token_hash: &[u8]) -> Result<()> {
        if let Some(alias) = self.alias(token_hash)? {
            let mut index = prefix(alias.purpose.user());
            index.extend_from_slice(token_hash);
            self.user_aliases.remove(index)?;
        }
        self.aliases.remove(token_hash)?;
        Ok(())
    }

    // ---- verification codes ----

    pub fn put_verification(&self, jid: &str, v: &Verification) -> Result<()> {
        let previous = self
            .verifications
            .insert(key(jid, v.kind.key()), encode(v))?;
        if let Some(previous) = previous {
            let previous: Verification = decode("verifications", &previous)?;
            if previous.address != v.address {
                self.verifications_by_address
                    .remove(verification_index_key(
                        previous.kind,
                        &previous.address,
                        jid,
                    ))?;
            }
        }
        self.verifications_by_address
            .insert(verification_index_key(v.kind, &v.address, jid), &[])?;
        Ok(())
    }

    pub fn verification(&self, jid: &str, kind: TerminalKind) -> Result<Option<Verification>> {
        self.verifications
            .get(key(jid, kind.key()))?
            .map(|v| decode("verifications", &v))
            .transpose()
    }

    /// Every user waiting to verify `address` as a terminal of this kind (several may have
    /// asked for the same number before one of them proved it), with the verification; read
    /// from the index, not by a scan.
    pub fn verifications_for_address(
        &self,
        kind: TerminalKind,
        address: &str,
    ) -> Result<Vec<(String, Verification)>> {
        let start = verification_index_key(kind, address, "");
        let mut found = Vec::new();
        for k in self.verifications_by_address.scan_prefix(&start).keys() {
            let k = k?;
            let jid = String::from_utf8_lossy(&k[start.len()..]).into_owned();
            if let Some(v) = self.verification(&jid, kind)? {
                if v.address == address {
                    found.push((jid, v));
                }
            }
        }
        Ok(found)
    }

    pub fn remove_verification(&self, jid: &str, kind: TerminalKind) -> Result<()> {
        if let Some(previous) = self.verifications.remove(key(jid, kind.key()))? {
            let previous: Verification = decode("verifications", &previous)?;
            self.verifications_by_address
                .remove(verification_index_key(kind, &previous.address, jid))?;
        }
        Ok(())
    }

    /// Rebuilds the index of verifications by address from the verifications (a few short-lived
    /// records), so that a store written before the index existed has one.
    fn index_verifications(&self) -> Result<()> {
        self.verifications_by_address.clear()?;
        for kv in self.verifications.iter() {
            let (k, v) = kv?;
            let Ok(v) = decode::<Verification>("verifications", &v) else {
                continue;
            };
            let jid = k.iter().position(|b| *b == 0).map_or(String::new(), |p| {
                String::from_utf8_lossy(&k[..p]).into_owned()
            });
            self.verifications_by_address
                .insert(verification_index_key(v.kind, &v.address, &jid), &[])?;
        }
        Ok(())
    }

    /// How many entries the index of verifications by address holds (for tests).
    pub fn verification_index_len(&self) -> usize {
        self.verifications_by_address.len()
    }

    // ---- messages pending a forward ----
    //
    // A conversation's pending forward is a small head (`pending_heads`: due times per terminal,
    // item count) and one key per item (`pending_items`), so a new message costs a read of the
    // head and two writes however many items wait, and the cap is checked on the head alone.
    // Items for the same terminal go together: their due time is the terminal's batch time in
    // the head, the earliest of theirs.

    fn item_key(conversation: &[u8], seq: u64) -> Vec<u8> {
        let mut k = Vec::with_capacity(conversation.len() + 9);
        k.extend_from_slice(conversation);
        k.push(0);
        k.extend_from_slice(&seq.to_be_bytes());
        k
    }

    fn items_prefix(conversation: &[u8]) -> Vec<u8> {
        let mut k = conversation.to_vec();
        k.push(0);
        k
    }

    fn pending_head(&self, conversation: &[u8]) -> Result<Option<PendingHead>> {
        self.pending_heads
            .get(conversation)?
            .map(|v| decode("pending_heads", &v))
            .transpose()
    }

    fn put_head(&self, conversation: &[u8], head: &PendingHead) -> Result<()> {
        self.pending_due.add(head.due_at, conversation)?;
        self.pending_heads.insert(conversation, encode(head))?;
        Ok(())
    }

    /// The conversation's pending forward with every item, each with its batch's due time.
    fn assemble(&self, conversation: &[u8], head: PendingHead) -> Result<Pending> {
        let mut items = Vec::with_capacity(head.count as usize);
        for v in self
            .pending_items
            .scan_prefix(Self::items_prefix(conversation))
            .values()
        {
            let mut item: PendingItem = decode("pending_items", &v?)?;
            item.due_at = Some(head.batch_due(item.terminal).unwrap_or(head.due_at));
            items.push(item);
        }
        Ok(Pending {
            peer: head.peer,
            due_at: head.due_at,
            items,
        })
    }

    pub fn pending_of(&self, jid: &str, peer: &str) -> Result<Option<Pending>> {
        let conversation = key(jid, peer);
        match self.pending_head(&conversation)? {
            Some(head) => Ok(Some(self.assemble(&conversation, head)?)),
            None => Ok(None),
        }
    }

    /// How many items wait in the conversation's pending forward (reads the head only).
    pub fn pending_count(&self, jid: &str, peer: &str) -> Result<usize> {
        Ok(self
            .pending_head(&key(jid, peer))?
            .map_or(0, |h| h.count as usize))
    }

    /// Adds one item (with its terminal and due time) to the conversation's pending forward:
    /// it joins its terminal's batch, which is then due at the earlier of the two times. Reads
    /// and writes the head and writes the item, nothing else.
    pub fn add_pending(&self, jid: &str, peer: &str, item: &PendingItem) -> Result<()> {
        let conversation = key(jid, peer);
        let mut head = self.pending_head(&conversation)?.unwrap_or(PendingHead {
            peer: peer.to_owned(),
            due_at: u64::MAX,
            batches: Vec::new(),
            count: 0,
        });
        let due = item.due_at.unwrap_or(head.due_at);
        match head.batches.iter_mut().find(|(t, _)| *t == item.terminal) {
            Some((_, at)) => *at = (*at).min(due),
            None => head.batches.push((item.terminal, due)),
        }
        head.due_at = head.batches.iter().map(|(_, at)| *at).min().unwrap_or(due);
        head.count += 1;
        let seq = self.db.generate_id()?;
        self.pending_items
            .insert(Self::item_key(&conversation, seq), encode(item))?;
        add_count(&self.pending_counts, jid.as_bytes(), 1)?;
        self.put_head(&conversation, &head)
    }

    /// Replaces the conversation's pending forward with this one (an empty one removes it).
    pub fn put_pending(&self, jid: &str, pending: &Pending) -> Result<()> {
        self.remove_pending(jid, &pending.peer)?;
        if pending.items.is_empty() {
            return Ok(());
        }
        let conversation = key(jid, &pending.peer);
        let mut head = PendingHead {
            peer: pending.peer.clone(),
            due_at: pending.due_at,
            batches: Vec::new(),
            count: 0,
        };
        for item in &pending.items {
            let due = item.due_at.unwrap_or(pending.due_at);
            match head.batches.iter_mut().find(|(t, _)| *t == item.terminal) {
                Some((_, at)) => *at = (*at).min(due),
                None => head.batches.push((item.terminal, due)),
            }
            head.count += 1;
            let seq = self.db.generate_id()?;
            self.pending_items
                .insert(Self::item_key(&conversation, seq), encode(item))?;
        }
        head.due_at = head
            .batches
            .iter()
            .map(|(_, at)| *at)
            .min()
            .unwrap_or(pending.due_at);
        add_count(&self.pending_counts, jid.as_bytes(), i64::from(head.count))?;
        self.put_head(&conversation, &head)
    }

    pub fn remove_pending(&self, jid: &str, peer: &str) -> Result<()> {
        let conversation = key(jid, peer);
        let Some(head) = self.pending_heads.remove(&conversation)? else {
            return Ok(());
        };
        let count = decode::<PendingHead>("pending_heads", &head).map_or(0, |h| h.count);
        add_count(&self.pending_counts, jid.as_bytes(), -i64::from(count))?;
        for k in self
            .pending_items
            .scan_prefix(Self::items_prefix(&conversation))
            .keys()
        {
            self.pending_items.remove(k?)?;
        }
        Ok(())
    }

    /// Everything pending for the user, by conversation.
    pub fn pending_for(&self, jid: &str) -> Result<Vec<Pending>> {
        let mut out = Vec::new();
        for kv in self.pending_heads.scan_prefix(prefix(jid)) {
            let (k, v) = kv?;
            out.push(self.assemble(&k, decode("pending_heads", &v)?)?);
        }
        Ok(out)
    }

    /// Every conversation whose forward is due, as (user, pending). Reads only what is due.
    pub fn due_pending(&self, now: u64) -> Result<Vec<(String, Pending)>> {
        let mut due = Vec::new();
        self.pending_due.walk(now, |at, k| {
            let Some(head) = self.pending_head(k)? else {
                return Ok(Visit::Stale);
            };
            if head.due_at != at {
                return Ok(Visit::Stale);
            }
            let user = k.iter().position(|b| *b == 0).map_or(String::new(), |p| {
                String::from_utf8_lossy(&k[..p]).into_owned()
            });
            due.push((user, self.assemble(k, head)?));
            Ok(Visit::Keep)
        })?;
        Ok(due)
    }

    /// Stores written before pending items had keys of their own: move each conversation's
    /// record to a head and one key per item, once.
    fn migrate_pending(&self) -> Result<()> {
        if self.legacy_pending.is_empty() {
            return Ok(());
        }
        for kv in self.legacy_pending.iter() {
            let (k, v) = kv?;
            let pending: Pending = decode("pending", &v)?;
            let jid = k.iter().position(|b| *b == 0).map_or(String::new(), |p| {
                String::from_utf8_lossy(&k[..p]).into_owned()
            });
            self.put_pending(&jid, &pending)?;
            self.legacy_pending.remove(k)?;
        }
        self.db.flush()?;
        Ok(())
    }

    // ---- the email queue ----

    pub fn enqueue_email(&self, job: &EmailJob) -> Result<u64> {
        self.queue_push(&self.email_jobs, &self.email_due, job)
    }

    /// Email jobs whose next attempt is due, oldest first.
    pub fn due_email_jobs(&self, now: u64, limit: usize) -> Result<Vec<(u64, EmailJob)>> {
        queue_due(&self.email_jobs, &self.email_due, "email_jobs", now, limit)
    }

    /// The earliest next attempt among queued emails.
    pub fn next_email_attempt(&self) -> Result<Option<u64>> {
        queue_next::<EmailJob>(&self.email_jobs, &self.email_due, "email_jobs")
    }

    pub fn update_email_job(&self, seq: u64, job: &EmailJob) -> Result<()> {
        queue_put(&self.email_jobs, &self.email_due, seq, job)
    }

    pub fn remove_email_job(&self, seq: u64) -> Result<()> {
        queue_remove::<EmailJob>(&self.email_jobs, &self.email_due, "email_jobs", seq)
    }

    pub fn wake_email(&self) {
        self.email_wake.notify_one();
    }

    pub fn email_wake(&self) -> Arc<Notify> {
        self.email_wake.clone()
    }

    // ---- the SMS queue ----

    pub fn enqueue_sms(&self, job: &SmsJob) -> Result<u64> {
        self.queue_push(&self.sms_jobs, &self.sms_due, job)
    }

    /// SMS jobs whose next attempt is due, oldest first.
    pub fn due_sms_jobs(&self, now: u64, limit: usize) -> Result<Vec<(u64, SmsJob)>> {
        queue_due(&self.sms_jobs, &self.sms_due, "sms_jobs", now, limit)
    }

    /// The earliest next attempt among queued SMS.
    pub fn next_sms_attempt(&self) -> Result<Option<u64>> {
        queue_next::<SmsJob>(&self.sms_jobs, &self.sms_due, "sms_jobs")
    }

    pub fn update_sms_job(&self, seq: u64, job: &SmsJob) -> Result<()> {
        queue_put(&self.sms_jobs, &self.sms_due, seq, job)
    }

    pub fn remove_sms_job(&self, seq: u64) -> Result<()> {
        queue_remove::<SmsJob>(&self.sms_jobs, &self.sms_due, "sms_jobs", seq)
    }

    fn queue_push<T: Serialize + QueuedJob>(
        &self,
        tree: &sled::Tree,
        index: &DueIndex,
        job: &T,
    ) -> Result<u64> {
        let seq = self.db.generate_id()?;
        queue_put(tree, index, seq, job)?;
        Ok(seq)
    }

    pub fn wake_sms(&self) {
        self.sms_wake.notify_one();
    }

    pub fn sms_wake(&self) -> Arc<Notify> {
        self.sms_wake.clone()
    }

    /// Remembers what an SMS carried, for its delivery report.
    pub fn put_sent_sms(&self, reference: &str, sent: &SentSms) -> Result<()> {
        self.sms_sent.insert(reference.as_bytes(), encode(sent))?;
        Ok(())
    }

    pub fn sent_sms(&self, reference: &str) -> Result<Option<SentSms>> {
        self.sms_sent
            .get(reference.as_bytes())?
            .map(|v| decode("sms_sent", &v))
            .transpose()
    }

    pub fn take_sent_sms(&self, reference: &str) -> Result<Option<SentSms>> {
        self.sms_sent
            .remove(reference.as_bytes())?
            .map(|v| decode("sms_sent", &v))
            .transpose()
    }

    /// SMS sent to the user on `day` (days since the Unix epoch).
    pub fn sms_count(&self, jid: &str, day: u64) -> Result<u32> {
        Ok(self
            .sms_counts
            .get(key(jid, &day.to_string()))?
            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
            .map_or(0, u32::from_be_bytes))
    }

    pub fn count_sms(&self, jid: &str, day: u64) -> Result<u32> {
        let count = self.sms_count(jid, day)? + 1;
        self.sms_counts
            .insert(key(jid, &day.to_string()), &count.to_be_bytes())?;
        Ok(count)
    }

    /// Forwarding emails sent to the user on `day` (days since the Unix epoch).
    pub fn email_count(&self, jid: &str, day: u64) -> Result<u32> {
        Ok(self
            .email_counts
            .get(key(jid, &day.to_string()))?
            .and_then(|v| <[u8; 4]>::try_from(v.as_ref()).ok())
            .map_or(0, u32::from_be_bytes))
    }

    pub fn count_email(&self, jid: &str, day: u64) -> Result<u32> {
        let count = self.email_count(jid, day)? + 1;
        self.email_counts
            .insert(key(jid, &day.to_string()), &count.to_be_bytes())?;
        Ok(count)
    }

    /// Records an incoming SMS's provider id; false if it was seen before.
    pub fn first_sight_of_sms(&self, provider_id: &str, now: u64) -> Result<bool> {
        self.first_sight(&key("sms", provider_id), now)
    }

    // ---- abuse-limit counters ----

    fn counter_key(name: &str, scope: &str) -> Vec<u8> {
        key(name, scope)
    }

    /// How many times `name` happened for `scope` in the current window of `period` seconds.
    pub fn counter(&self, name: &str, scope: &str, period: u64, now: u64) -> Result<u32> {
        let window = now / period.max(1);
        Ok(self
            .counters
            .get(Self::counter_key(name, scope))?
            .map(|v| decode::<Counter>("counters", &v))
            .transpose()?
            .filter(|c| c.period == period && c.window == window)
            .map_or(0, |c| c.count))
    }

    /// Counts one more `name` for `scope` in the current window; returns the new count.
    pub fn bump_counter(&self, name: &str, scope: &str, period: u64, now: u64) -> Result<u32> {
        let count = self.counter(name, scope, period, now)? + 1;
        let record = Counter {
            period,
            window: now / period.max(1),
            count,
        };
        let k = Self::counter_key(name, scope);
        if count == 1 {
            self.counters_due.add(record.window_end(), &k)?;
        }
        self.counters.insert(k, encode(&record))?;
        Ok(count)
    }

    /// Removes the counters of windows that are over.
    /// Reads only the counters whose window ended.
    pub fn prune_counters(&self, now: u64) -> Result<()> {
        self.counters_due.walk(now, |at, k| {
            if let Some(v) = self.counters.get(k)? {
                let ended =
                    decode::<Counter>("counters", &v).map_or(true, |c| c.window_end() <= at);
                if ended {
                    self.counters.remove(k)?;
                }
            }
            Ok(Visit::Stale)
        })
    }

    /// The number of live counters (for tests and stats).
    pub fn counter_records(&self) -> usize {
        self.counters.len()
    }

    /// Everything held about one user (see [`UserState`]).
    pub fn user_state(&self, jid: &str) -> Result<UserState> {
        let user = self.user(jid)?;
        let buddies = match &user {
            Some(u) => self.buddies(&u.handle)?,
            None => Vec::new(),
        };
        let verifications = self
            .verifications
            .scan_prefix(prefix(jid))
            .values()
            .map(|v| decode("verifications", &v?))
            .collect::<Result<Vec<_>>>()?;
        let held = self
            .held
            .scan_prefix(prefix(jid))
            .values()
            .map(|v| decode("held", &v?))
            .collect::<Result<Vec<_>>>()?;
        let mut email_jobs = Vec::new();
        for v in self.email_jobs.iter().values() {
            let job: EmailJob = decode("email_jobs", &v?)?;
            if job.user == jid {
                email_jobs.push(job);
            }
        }
        let mut sms_jobs = Vec::new();
        for v in self.sms_jobs.iter().values() {
            let job: SmsJob = decode("sms_jobs", &v?)?;
            if job.user == jid {
                sms_jobs.push(job);
            }
        }
        Ok(UserState {
            buddies,
            resources: self.resources(jid)?,
            sessions: self.sessions(jid)?,
            held,
            pending: self.pending_for(jid)?,
            verifications,
            aliases: self.user_aliases.scan_prefix(prefix(jid)).count(),
            email_jobs,
            sms_jobs,
            user,
        })
    }

    // ---- inbound mail already taken (duplicate Message-IDs) ----

    /// Records that the mail with this Message-ID was taken for one recipient alias (given by its
    /// token hash); false if that pair was seen before. One mail sent to two aliases is two
    /// deliveries (one per conversation); the same mail resent to one alias is one.
    ///
    /// Key: `mail \0 HEX(alias hash) \0 Message-ID`. Ids recorded before the key named the alias
    /// (the bare Message-ID) are not consulted: they age out like any other.
    pub fn first_sight_of_mail(
        &self,
        message_id: &str,
        alias_hash: &[u8; 32],
        now: u64,
    ) -> Result<bool> {
        let mut id = key("mail", &data_encoding::HEXLOWER.encode(alias_hash));
        id.push(0);
        id.extend_from_slice(message_id.as_bytes());
        self.first_sight(&id, now)
    }

    /// Records an id of something taken (a Message-ID, a provider's SMS id) with the time it was
    /// first seen; false if it was seen before (the time then stays the first one).
    fn first_sight(&self, id: &[u8], now: u64) -> Result<bool> {
        if self.seen_mail.contains_key(id)? {
            return Ok(false);
        }
        // The index first: a crash between the two leaves an index entry that forgetting
        // skips, never an id that is never forgotten.
        let mut by_time = now.to_be_bytes().to_vec();
        by_time.extend_from_slice(id);
        self.seen_by_time.insert(by_time, &[])?;
        self.seen_mail.insert(id, &now.to_be_bytes())?;
        Ok(true)
    }

    /// Forgets the ids of mail and SMS first seen before `cutoff` (a resend after that is taken
    /// again). Reads only what it forgets. Returns how many were forgotten.
    pub fn forget_seen_before(&self, cutoff: u64) -> Result<usize> {
        let mut forgotten = 0;
        for entry in self.seen_by_time.range(..cutoff.to_be_bytes().to_vec()) {
            let (k, _) = entry?;
            if let Some(id) = k.get(8..) {
                if self.seen_mail.remove(id)?.is_some() {
                    forgotten += 1;
                }
            }
            self.seen_by_time.remove(k)?;
        }
        Ok(forgotten)
    }

    /// How many mail and SMS ids are remembered (for tests and stats).
    pub fn seen_ids(&self) -> usize {
        self.seen_mail.len()
    }

    // ---- outbound XMPP queue ----

    /// Queues a stanza for the component link. Durable after the next [`Store::flush`]; the link
    /// is woken by [`Store::wake_outbox`] once the batch is flushed.
    pub fn enqueue_stanza(&self, stanza: &Element) -> Result<()> {
        let xml = crate::xmpp::xml_text::to_xml(stanza)?;
        let seq = self.db.generate_id()?;
        self.outbox.insert(seq.to_be_bytes(), xml.into_bytes())?;
        Ok(())
    }

    // ---- dead letters: inputs set aside for the admin ----

    /// Sets an input aside. Durable after the next [`Store::flush`]. Returns its id.
    pub fn put_dead_letter(&self, letter: &DeadLetter) -> Result<u64> {
        let id = self.db.generate_id()?;
        self.dead_by_fingerprint
            .insert(&letter.fingerprint, &id.to_be_bytes())?;
        self.dead_letters.insert(id.to_be_bytes(), encode(letter))?;
        Ok(id)
    }

    /// The dead letter whose input has this fingerprint, if one was set aside.
    pub fn dead_letter_by_fingerprint(&self, fingerprint: &[u8]) -> Result<Option<u64>> {
        Ok(self
            .dead_by_fingerprint
            .get(fingerprint)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map(u64::from_be_bytes))
    }

    /// Every dead letter, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<(u64, DeadLetter)>> {
        self.dead_letters
            .iter()
            .map(|kv| {
                let (k, v) = kv?;
                let id = <[u8; 8]>::try_from(k.as_ref())
                    .map(u64::from_be_bytes)
                    .map_err(|_| StoreError::Corrupt("dead_letters key".into()))?;
                Ok((id, decode("dead_letters", &v)?))
            })
            .collect()
    }

    /// Asks for the dead letter `id` to be handled again at the next start. False if none.
    pub fn mark_for_redrive(&self, id: u64) -> Result<bool> {
        let Some(v) = self.dead_letters.get(id.to_be_bytes())? else {
            return Ok(false);
        };
        let mut letter: DeadLetter = decode("dead_letters", &v)?;
        letter.redrive = true;
        self.dead_letters
            .insert(id.to_be_bytes(), encode(&letter))?;
        Ok(true)
    }

    /// Deletes the dead letter `id`. False if there is none.
    pub fn remove_dead_letter(&self, id: u64) -> Result<bool> {
        let Some(v) = self.dead_letters.remove(id.to_be_bytes())? else {
            return Ok(false);
        };
        let letter: DeadLetter = decode("dead_letters", &v)?;
        self.dead_by_fingerprint.remove(&letter.fingerprint)?;
        Ok(true)
    }

    /// Removes and returns the dead letters marked for re-drive, oldest first.
    pub fn take_redrives(&self) -> Result<Vec<DeadLetter>> {
        let mut out = Vec::new();
        for (id, letter) in self.dead_letters()? {
            if letter.redrive {
                self.remove_dead_letter(id)?;
                out.push(letter);
            }
        }
        Ok(out)
    }

    /// Tells the link there is something to send (call after flushing).
    pub fn wake_outbox(&self) {
        self.outbox_wake.notify_one();
    }

    pub fn stats(&self) -> Result<Stats> {
        Ok(Stats {
            users: self.users.len(),
            sessions: self.sessions.len(),
            held: self.held.len(),
            outbox: self.outbox.len(),
            email_queue: self.email_jobs.len(),
            sms_queue: self.sms_jobs.len(),
        })
    }
}

impl OutboundQueue for Store {
    /// The oldest committed stanzas; what the current batch queued waits for its flush.
    fn pending(&self, limit: usize) -> Vec<(u64, Element)> {
        let mut out = Vec::new();
        let committed = self
            .outbox_committed
            .load(std::sync::atomic::Ordering::SeqCst);
        for kv in self.outbox.range(..committed.to_be_bytes()).take(limit) {
            let Ok((k, v)) = kv else { break };
            let Ok(seq) = <[u8; 8]>::try_from(k.as_ref()).map(u64::from_be_bytes) else {
                continue;
            };
            match std::str::from_utf8(&v)
                .ok()
                .and_then(|s| s.parse::<Element>().ok())
            {
                Some(el) => out.push((seq, el)),
                None => {
                    tracing::error!(seq, "dropping unreadable outbound stanza from the store");
                    let _ = self.outbox.remove(k);
                }
            }
        }
        out
    }

    fn mark_sent(&self, keys: &[u64]) {
        for k in keys {
            if let Err(e) = self.outbox.remove(k.to_be_bytes()) {
                tracing::error!("could not remove a sent stanza from the outbox: {e}");
            }
        }
    }

    fn notify(&self) -> Arc<Notify> {
        self.outbox_wake.clone()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Opens the store again once the previous `Store` is dropped. sled lets go of its file lock
    /// a moment after the drop (its flusher thread ends on its own), so wait for it briefly.
    fn reopen(path: &std::path::Path) -> Store {
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        loop {
            match Store::open(path) {
                Ok(store) => return store,
                Err(_) if std::time::Instant::now() < deadline => {
                    std::thread::sleep(std::time::Duration::from_millis(20));
                }
                Err(e) => panic!("cannot reopen the store: {e}"),
            }
        }
    }

    fn alice() -> User {
        User {
            jid: "alice@example.org".into(),
            handle: Handle::parse("alice").unwrap(),
            email: None,
            phone: None,
            registered_at: 1,
            primary: None,
            subscription_policy: Default::default(),
            time_zone: None,
        }
    }

    #[test]
    fn handles_are_unique_and_released_on_rename() {
        let store = Store::temporary().unwrap();
        store.put_user(&alice()).unwrap();
        let mut mallory = alice();
        mallory.jid = "mallory@example.org".into();
        assert!(matches!(
            store.put_user(&mallory),
            Err(StoreError::HandleTaken)
        ));
        // Updating oneself with the same handle is fine.
        store.put_user(&alice()).unwrap();
        let mut renamed = alice();
        renamed.handle = Handle::parse("al").unwrap();
        store.put_user(&renamed).unwrap();
        assert!(store
            .user_by_handle(&Handle::parse("alice").unwrap())
            .unwrap()
            .is_none());
        store.put_user(&mallory).unwrap();
        assert_eq!(
            store
                .user_by_handle(&Handle::parse("alice").unwrap())
                .unwrap()
                .unwrap()
                .jid,
            "mallory@example.org"
        );
    }

    #[test]
    fn removing_a_user_removes_everything_of_theirs() {
        let store = Store::temporary().unwrap();
        let a = alice();
        store.put_user(&a).unwrap();
        store
            .put_buddy(&a.handle, "bob@example.net", &Buddy::default())
            .unwrap();
        store
            .set_resource(
                &a.jid,
                "phone",
                &ResourcePresence {
                    show: None,
                    priority: 0,
                    status: None,
                },
            )
            .unwrap();
        store.touch_session(&a.jid, "bob@example.net", 5).unwrap();
        let held = HeldMessage {
            peer: "bob@example.net".into(),
            stanza: "<message/>".into(),
            held_at: 5,
        };
        store.hold(&a.jid, &held).unwrap();
        // Another user's data sharing a prefix must survive.
        store
            .touch_session("alice@example.org.evil", "x@y", 5)
            .unwrap();

        let (removed, buddies) = store.remove_user(&a.jid).unwrap().unwrap();
        assert_eq!(removed, a);
        assert_eq!(buddies, vec!["bob@example.net".to_string()]);
        assert!(store.user(&a.jid).unwrap().is_none());
        assert!(store.user_by_handle(&a.handle).unwrap().is_none());
        assert!(store.buddies(&a.handle).unwrap().is_empty());
        assert!(store.resources(&a.jid).unwrap().is_empty());
        assert!(store.sessions(&a.jid).unwrap().is_empty());
        assert_eq!(store.held_count(&a.jid).unwrap(), 0);
        assert_eq!(store.sessions("alice@example.org.evil").unwrap().len(), 1);
    }

    #[test]
    fn held_messages_come_back_in_order_once() {
        let store = Store::temporary().unwrap();
        for i in 0..3 {
            let m = HeldMessage {
                peer: "b@c".into(),
                stanza: format!("<m{i}/>"),
                held_at: i,
            };
            store.hold("a@b", &m).unwrap();
        }
        let taken = store.take_held("a@b").unwrap();
        assert_eq!(
            taken.iter().map(|m| m.held_at).collect::<Vec<_>>(),
            vec![0, 1, 2]
        );
        assert!(store.take_held("a@b").unwrap().is_empty());
    }

    #[test]
    fn outbox_is_fifo_and_survives_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = reopen(dir.path());
            for i in 0..3 {
                let el: Element = format!("<message xmlns='jabber:component:accept' id='m{i}'/>")
                    .parse()
                    .unwrap();
                store.enqueue_stanza(&el).unwrap();
            }
            store.flush().unwrap();
            let first = store.pending(1);
            store.mark_sent(&[first[0].0]);
            store.flush().unwrap();
        }
        let store = reopen(dir.path());
        let ids: Vec<String> = store
            .pending(10)
            .into_iter()
            .map(|(_, el)| el.attr("id").unwrap().to_string())
            .collect();
        assert_eq!(ids, vec!["m1", "m2"]);
    }

    fn sms_job(text: &str, next_attempt_at: u64) -> SmsJob {
        SmsJob {
            user: "a@x".into(),
            peer: None,
            to: "+15550001111".into(),
            text: text.into(),
            reference: text.into(),
            items: Vec::new(),
            attempts: 0,
            next_attempt_at,
            queued_at: 0,
        }
    }

    fn texts(jobs: &[(u64, SmsJob)]) -> Vec<&str> {
        jobs.iter().map(|(_, j)| j.text.as_str()).collect()
    }

    #[test]
    fn queued_jobs_come_due_by_time_through_the_index() {
        let dir = tempfile::tempdir().unwrap();
        let (a, c) = {
            let store = reopen(dir.path());
            let a = store.enqueue_sms(&sms_job("a", 30)).unwrap();
            store.enqueue_sms(&sms_job("b", 10)).unwrap();
            let c = store.enqueue_sms(&sms_job("c", 20)).unwrap();
            assert_eq!(store.next_sms_attempt().unwrap(), Some(10));
            assert_eq!(
                texts(&store.due_sms_jobs(5, 10).unwrap()),
                Vec::<&str>::new()
            );
            assert_eq!(texts(&store.due_sms_jobs(25, 10).unwrap()), vec!["b", "c"]);
            assert_eq!(texts(&store.due_sms_jobs(25, 1).unwrap()), vec!["b"]);
            store.flush().unwrap();
            (a, c)
        };
        let store = reopen(dir.path());
        // A retry moves a job later; a sent job leaves; the old index entries do not resurface.
        store.update_sms_job(c, &sms_job("c", 50)).unwrap();
        let b = store.due_sms_jobs(25, 10).unwrap()[0].0;
        store.remove_sms_job(b).unwrap();
        assert_eq!(texts(&store.due_sms_jobs(40, 10).unwrap()), vec!["a"]);
        assert_eq!(store.next_sms_attempt().unwrap(), Some(30));
        store.remove_sms_job(a).unwrap();
        assert_eq!(store.next_sms_attempt().unwrap(), Some(50));
        assert_eq!(texts(&store.due_sms_jobs(u64::MAX, 10).unwrap()), vec!["c"]);
        assert_eq!(store.sms_due.0.len(), 1, "stale entries were dropped");
    }

    #[test]
    fn a_job_being_written_while_the_drainer_walks_is_not_lost() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = reopen(dir.path());
            // The core has written the index entry and not yet the job (another thread).
            let seq = 99u64.to_be_bytes();
            store.sms_due.add(5, &seq).unwrap();
            assert!(store.due_sms_jobs(10, 10).unwrap().is_empty());
            assert_eq!(store.next_sms_attempt().unwrap(), None);
            store
                .sms_jobs
                .insert(seq, encode(&sms_job("late", 5)))
                .unwrap();
            assert_eq!(texts(&store.due_sms_jobs(10, 10).unwrap()), vec!["late"]);
            // An entry a crash left without its job is dropped when the store opens.
            store.sms_due.add(7, &100u64.to_be_bytes()).unwrap();
            store.flush().unwrap();
        }
        let store = reopen(dir.path());
        assert_eq!(store.sms_due.0.len(), 1);
        assert_eq!(texts(&store.due_sms_jobs(10, 10).unwrap()), vec!["late"]);
    }

    fn pending_item(text: &str, due_at: Option<u64>) -> PendingItem {
        PendingItem {
            at: 1,
            id: Some(text.into()),
            text: text.into(),
            stanza: format!("<message xmlns='jabber:client' id='{text}'/>"),
            on_xmpp: false,
            receipt: false,
            terminal: Some(TerminalKind::Email),
            due_at,
            unconditional: false,
        }
    }

    #[test]
    fn pending_items_are_kept_one_per_key_with_their_batch_time_and_counts() {
        let store = Store::temporary().unwrap();
        for (i, due) in [(0, 100), (1, 60), (2, 80)] {
            store
                .add_pending("a@x", "p@y", &pending_item(&format!("m{i}"), Some(due)))
                .unwrap();
        }
        store
            .add_pending("a@x", "q@y", &pending_item("other", Some(500)))
            .unwrap();
        assert_eq!(store.pending_count("a@x", "p@y").unwrap(), 3);
        assert_eq!(store.waiting_count("a@x").unwrap(), 4);
        let p = store.pending_of("a@x", "p@y").unwrap().unwrap();
        let texts: Vec<_> = p.items.iter().map(|i| i.text.as_str()).collect();
        assert_eq!(texts, vec!["m0", "m1", "m2"], "in arrival order");
        // One terminal's items go together, at the earliest of their times.
        assert_eq!(p.due_at, 60);
        assert!(p.items.iter().all(|i| i.due_at == Some(60)));
        assert_eq!(store.due_pending(60).unwrap().len(), 1);
        store.remove_pending("a@x", "p@y").unwrap();
        assert_eq!(store.pending_count("a@x", "p@y").unwrap(), 0);
        assert_eq!(store.waiting_count("a@x").unwrap(), 1);
        assert_eq!(store.pending_items.len(), 1);
    }

    #[test]
    fn pending_records_of_the_first_layout_are_moved_when_the_store_opens() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = reopen(dir.path());
            let old = Pending {
                peer: "p@y".into(),
                due_at: 42,
                items: vec![pending_item("one", None), pending_item("two", None)],
            };
            store
                .legacy_pending
                .insert(key("a@x", "p@y"), encode(&old))
                .unwrap();
            store.flush().unwrap();
        }
        let store = reopen(dir.path());
        assert!(store.legacy_pending.is_empty());
        let p = store.pending_of("a@x", "p@y").unwrap().unwrap();
        assert_eq!(p.items.len(), 2);
        assert_eq!(p.due_at, 42);
        assert_eq!(store.waiting_count("a@x").unwrap(), 2);
        assert_eq!(store.due_pending(42).unwrap().len(), 1);
    }

    #[test]
    fn held_messages_are_counted_per_user_and_sender_and_taken_a_page_at_a_time() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = reopen(dir.path());
            for i in 0..5 {
                let peer = if i % 2 == 0 { "p@y" } else { "q@y" };
                store
                    .hold_stanza("a@x", peer, &format!("<m{i}/>"), 1)
                    .unwrap();
            }
            assert_eq!(store.held_count("a@x").unwrap(), 5);
            assert_eq!(store.held_from("a@x", "p@y").unwrap(), 3);
            let page = store.take_held_page("a@x", 2).unwrap();
            let stanzas: Vec<_> = page.iter().map(|h| h.stanza.as_str()).collect();
            assert_eq!(stanzas, vec!["<m0/>", "<m1/>"]);
            assert_eq!(store.held_count("a@x").unwrap(), 3);
            assert_eq!(store.held_from("a@x", "p@y").unwrap(), 2);
            assert_eq!(store.held_from("a@x", "q@y").unwrap(), 1);
            // As a store from before the counts: drop them.
            store.held_counts.clear().unwrap();
            store.flush().unwrap();
        }
        let store = reopen(dir.path());
        assert_eq!(store.held_count("a@x").unwrap(), 3);
        assert_eq!(store.held_from("a@x", "p@y").unwrap(), 2);
        let rest = store.take_held("a@x").unwrap();
        assert_eq!(rest.len(), 3);
        assert_eq!(store.held_count("a@x").unwrap(), 0);
        assert!(store.held_counts.is_empty());
    }

    #[test]
    fn pending_forwards_come_due_by_time_through_the_index() {
        let store = Store::temporary().unwrap();
        let pending = |peer: &str, due_at: u64| Pending {
            peer: peer.into(),
            due_at,
            items: vec![pending_item("m", None)],
        };
        store.put_pending("a@x", &pending("p1@y", 100)).unwrap();
        store.put_pending("a@x", &pending("p2@y", 50)).unwrap();
        store.put_pending("b@x", &pending("p1@y", 70)).unwrap();
        let due = |now| -> Vec<(String, String)> {
            store
                .due_pending(now)
                .unwrap()
                .into_iter()
                .map(|(u, p)| (u, p.peer))
                .collect()
        };
        assert!(due(49).is_empty());
        assert_eq!(
            due(80),
            vec![("a@x".into(), "p2@y".into()), ("b@x".into(), "p1@y".into())]
        );
        // Postponed, removed: only the current due time counts.
        store.put_pending("a@x", &pending("p2@y", 200)).unwrap();
        store.remove_pending("b@x", "p1@y").unwrap();
        assert_eq!(due(150), vec![("a@x".into(), "p1@y".into())]);
        assert_eq!(due(300).len(), 2);
    }

    #[test]
    fn indexes_are_built_for_stores_written_before_them() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = reopen(dir.path());
            store.enqueue_sms(&sms_job("old", 10)).unwrap();
            store
                .put_pending(
                    "a@x",
                    &Pending {
                        peer: "p@y".into(),
                        due_at: 5,
                        items: vec![pending_item("m", None)],
                    },
                )
                .unwrap();
            // As a store from before the indexes: drop them.
            store.sms_due.0.clear().unwrap();
            store.pending_due.0.clear().unwrap();
            store.flush().unwrap();
        }
        let store = reopen(dir.path());
        assert_eq!(texts(&store.due_sms_jobs(10, 10).unwrap()), vec!["old"]);
        assert_eq!(store.due_pending(5).unwrap().len(), 1);
    }

    #[test]
    fn taken_ids_are_remembered_until_forgotten_by_age() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = reopen(dir.path());
            assert!(store.first_sight_of_mail("<a@x>", &A1, 100).unwrap());
            assert!(store.first_sight_of_sms("k-1", 200).unwrap());
            assert!(store.first_sight_of_mail("<b@x>", &A1, 300).unwrap());
            // Seen again later: still a duplicate, and it keeps its first time.
            assert!(!store.first_sight_of_mail("<a@x>", &A1, 250).unwrap());
            assert!(!store.first_sight_of_sms("k-1", 250).unwrap());
            // A Message-ID that looks like an SMS key is its own id.
            assert!(store.first_sight_of_mail("sms", &A1, 300).unwrap());
            store.flush().unwrap();
        }
        let store = reopen(dir.path());
        assert!(!store.first_sight_of_mail("<a@x>", &A1, 400).unwrap());
        assert_eq!(store.forget_seen_before(100).unwrap(), 0);
        assert_eq!(store.forget_seen_before(201).unwrap(), 2);
        assert_eq!(store.seen_ids(), 2);
        // Forgotten: taken again (and remembered from now on).
        assert!(store.first_sight_of_mail("<a@x>", &A1, 500).unwrap());
        assert!(!store.first_sight_of_mail("<b@x>", &A1, 500).unwrap());
        assert_eq!(store.forget_seen_before(400).unwrap(), 2);
        assert_eq!(store.forget_seen_before(400).unwrap(), 0);
        assert!(!store.first_sight_of_mail("<a@x>", &A1, 600).unwrap());
        assert!(store.first_sight_of_sms("k-1", 600).unwrap());
    }

    const A1: [u8; 32] = [1; 32];

    #[test]
    fn one_message_id_is_taken_once_per_recipient_alias() {
        let store = Store::temporary().unwrap();
        let a2 = [2u8; 32];
        assert!(store.first_sight_of_mail("<m@x>", &A1, 100).unwrap());
        assert!(store.first_sight_of_mail("<m@x>", &a2, 100).unwrap());
        assert!(!store.first_sight_of_mail("<m@x>", &A1, 101).unwrap());
        assert!(!store.first_sight_of_mail("<m@x>", &a2, 101).unwrap());
        assert_eq!(store.seen_ids(), 2);
        assert_eq!(store.forget_seen_before(101).unwrap(), 2);
    }

    #[test]
    fn ids_taken_before_the_time_index_existed_are_indexed_on_open() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::Config::new().path(dir.path()).open().unwrap();
            db.insert(SCHEMA_KEY, &SCHEMA_VERSION.to_be_bytes())
                .unwrap();
            let seen = db.open_tree("seen_mail").unwrap();
            seen.insert(b"<old@x>", &10u64.to_be_bytes()).unwrap();
            seen.insert(b"<new@x>", &1000u64.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        let store = reopen(dir.path());
        assert_eq!(store.forget_seen_before(500).unwrap(), 1);
        // The old one is forgotten, the new one still remembered until its own time.
        assert_eq!(store.seen_ids(), 1);
        assert_eq!(store.forget_seen_before(1001).unwrap(), 1);
        assert_eq!(store.seen_ids(), 0);
    }

    #[test]
    fn the_link_gets_only_stanzas_whose_batch_is_committed() {
        let store = Store::temporary().unwrap();
        let stanza = |id: &str| -> Element {
            format!("<message xmlns='jabber:component:accept' id='{id}'/>")
                .parse()
                .unwrap()
        };
        store.enqueue_stanza(&stanza("a")).unwrap();
        assert!(store.pending(10).is_empty(), "queued, not yet committed");
        store.flush().unwrap();
        store.enqueue_stanza(&stanza("b")).unwrap();
        let ids = |store: &Store| -> Vec<String> {
            store
                .pending(10)
                .into_iter()
                .map(|(_, el)| el.attr("id").unwrap().to_owned())
                .collect()
        };
        assert_eq!(ids(&store), vec!["a"]);
        store.flush().unwrap();
        assert_eq!(ids(&store), vec!["a", "b"]);
    }

    #[test]
    fn a_store_from_another_schema_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = sled::open(dir.path()).unwrap();
            db.insert(SCHEMA_KEY, &99u32.to_be_bytes()).unwrap();
            db.flush().unwrap();
        }
        assert!(matches!(
            Store::open(dir.path()),
            Err(StoreError::Schema { found: 99, .. })
        ));
    }

    // ---- verifications by address (issue 10) ----

    fn phone_code(address: &str) -> Verification {
        Verification {
            kind: TerminalKind::Phone,
            address: address.into(),
            code: "123456".into(),
            expires_at: 10,
            tries_left: 5,
        }
    }

    fn waiting_on(store: &Store, address: &str) -> Vec<String> {
        store
            .verifications_for_address(TerminalKind::Phone, address)
            .unwrap()
            .into_iter()
            .map(|(jid, _)| jid)
            .collect()
    }

    #[test]
    fn the_verification_index_follows_put_replace_remove_and_reopen() {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = reopen(dir.path());
            store.put_user(&alice()).unwrap();
            store
                .put_verification("alice@example.org", &phone_code("+15550001"))
                .unwrap();
            store
                .put_verification("bob@example.org", &phone_code("+15550001"))
                .unwrap();
            assert_eq!(
                waiting_on(&store, "+15550001"),
                ["alice@example.org", "bob@example.org"]
            );
            // A prefix of a number is another number.
            assert!(waiting_on(&store, "+1555000").is_empty());
            // A new code for another number moves Alice's entry.
            store
                .put_verification("alice@example.org", &phone_code("+15550002"))
                .unwrap();
            assert_eq!(waiting_on(&store, "+15550001"), ["bob@example.org"]);
            assert_eq!(waiting_on(&store, "+15550002"), ["alice@example.org"]);
            store
                .remove_verification("bob@example.org", TerminalKind::Phone)
                .unwrap();
            assert!(waiting_on(&store, "+15550001").is_empty());
            assert_eq!(store.verification_index_len(), 1);
            store.flush().unwrap();
        }
        // Rebuilt from the verifications when the store opens.
        let store = reopen(dir.path());
        assert_eq!(waiting_on(&store, "+15550002"), ["alice@example.org"]);
        assert_eq!(store.verification_index_len(), 1);
        // Removing the user removes their entry.
        store.remove_user("alice@example.org").unwrap();
        assert!(waiting_on(&store, "+15550002").is_empty());
        assert_eq!(store.verification_index_len(), 0);
    }
}
