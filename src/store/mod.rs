//! The store: every piece of state Reach keeps, behind typed domain operations, on one of two
//! engines: sled (embedded, one process; the default) or PostgreSQL (several instances).
//!
//! The domain operations are written once, in [`Tx`], over ordered key-value trees
//! ([`engine::Txn`]); an engine only reads, writes and locks keys (`sled_engine`, `postgres`).
//! Records are the core's (`crate::core::model`), stored as JSON so that they can grow fields;
//! keys are `owner \0 item` so that a user's data is one prefix scan.
//!
//! A [`Tx`] is one transaction: the core handles a batch of events in one and the runtime
//! commits it once (a sled flush, an SQL `COMMIT`) before anything is acknowledged or sent.
//! It implements [`Transaction`], the trait the core sees, with its guarantees for several
//! instances (see `crate::core::transaction`).
//!
//! Besides the core's transaction, [`Store`] serves the senders (claiming due emails and SMS so
//! that each goes out from one instance), the component link (this instance's outbox of
//! stanzas), the instances (who is alive; a dead instance's outbox and claims are adopted) and
//! the admin commands.

#[cfg_attr(test, allow(clippy::type_complexity))]
mod engine;
pub mod migrate;
#[cfg(test)]
pub(crate) mod pg_cluster;
pub mod postgres;
mod sled_engine;

use std::sync::Arc;

use minidom::Element;
use serde::{de::DeserializeOwned, Deserialize, Serialize};
use tokio::sync::Notify;

use crate::address::Handle;
pub use crate::core::model::*;
pub use crate::core::transaction::Transaction;
use crate::core::GlobalPresence;
use engine::{Engine, KeyRange, Tree, Txn};

/// The version of the stored records' layout (keys and record formats, the same on every
/// engine); bumped with a migration in [`migrate_data`] whenever one changes.
pub const DATA_VERSION: u32 = 2;

/// How long a claimed email or SMS stays the claimer's if it never reports back (it died without
/// its death being seen): then another instance sends it.
pub const CLAIM_SECS: u64 = 300;

/// Ids of what was taken (a Message-ID, an SMS id) longer than this are kept as their hash.
const MAX_SEEN_ID_BYTES: usize = 512;

/// Channels of the notices instances send each other at commit.
pub const EMAIL_NOTICE: &str = "reach_email";
pub const SMS_NOTICE: &str = "reach_sms";

// ---- trees ----

const META: Tree = Tree::records("meta");
const INSTANCES: Tree = Tree::records("instances");
const USERS: Tree = Tree::records("users");
const HANDLES: Tree = Tree::records("handles");
const PHONES: Tree = Tree::records("phones");
const BUDDIES: Tree = Tree::records("buddies");
const RESOURCES: Tree = Tree::records("resources");
/// When a resource last went offline (`jid \0 resource`, 8-byte time): a short-lived note.
const RESOURCES_GONE: Tree = Tree::records("resources_gone");
const SESSIONS: Tree = Tree::records("sessions");
const HELD: Tree = Tree::records("held");
/// Held-message counts: `jid` for the user's total, `jid \0 peer` per sender, so checking the
/// caps reads two keys whatever is held.
const HELD_COUNTS: Tree = Tree::counts("held_counts");
/// Users whose held messages are being delivered a page at a time (`jid`, empty value).
const HELD_RELEASES: Tree = Tree::records("held_releases");
/// Stanzas for the component link: `instance \0 seq`, each instance draining its own.
const OUTBOX: Tree = Tree::records("stanza_outbox");
const ALIASES: Tree = Tree::records("aliases");
const USER_ALIASES: Tree = Tree::records("user_aliases");
const VERIFICATIONS: Tree = Tree::records("verifications");
/// `verifications` by terminal: `kind \0 address \0 jid` (empty values).
const VERIFICATIONS_BY_ADDRESS: Tree = Tree::records("verifications_by_address");
/// One small [`PendingHead`] per conversation with a pending forward (`jid \0 peer`).
const PENDING_HEADS: Tree = Tree::records("pending_heads");
/// The pending items, one per key (`jid \0 peer \0 seq`), in arrival order.
const PENDING_ITEMS: Tree = Tree::records("pending_items");
/// Heads by their earliest due time.
const PENDING_DUE: Tree = Tree::records("pending_due");
/// Pending items per user, all conversations together.
const PENDING_COUNTS: Tree = Tree::counts("pending_counts");
const EMAIL_JOBS: Tree = Tree::records("email_jobs");
const EMAIL_DUE: Tree = Tree::records("email_due");
const SMS_JOBS: Tree = Tree::records("sms_jobs");
const SMS_DUE: Tree = Tree::records("sms_due");
const SMS_SENT: Tree = Tree::records("sms_sent");
const SMS_PER_DAY: Tree = Tree::counts("sms_per_day");
const EMAIL_PER_DAY: Tree = Tree::counts("email_per_day");
/// Ids of what was taken (Message-IDs per alias, providers' SMS ids), with when.
const SEEN: Tree = Tree::records("seen_mail");
/// `seen_mail` keys by when they were first seen (8-byte big-endian time, then the key).
const SEEN_BY_TIME: Tree = Tree::records("seen_by_time");
const PUBLISHED: Tree = Tree::records("published");
const SUBSCRIPTION_REQUESTS: Tree = Tree::records("subscription_requests");
const BUDDY_ALERTS: Tree = Tree::records("buddy_alerts");
const BUDDY_ALERT_RECHECKS: Tree = Tree::records("buddy_alert_rechecks");
const RECHECKS_DUE: Tree = Tree::records("rechecks_due");
/// Abuse-limit counts: `name \0 scope \0 period \0 window` (see [`Tx::counter`]).
const ABUSE_COUNTS: Tree = Tree::counts("abuse_counts");
/// Abuse-limit counts by the end of their window.
const COUNTERS_DUE: Tree = Tree::records("counters_due");
/// Inputs set aside because handling them failed for good ([`DeadLetter`]), by id.
const DEAD_LETTERS: Tree = Tree::records("dead_letters");
/// Dead letters by the fingerprint of their input, so that a resend is refused at once.
const DEAD_BY_FINGERPRINT: Tree = Tree::records("dead_by_fingerprint");

/// Every tree of the current layout (what `reach migrate` copies).
const ALL_TREES: &[Tree] = &[
    META,
    INSTANCES,
    USERS,
    HANDLES,
    PHONES,
    BUDDIES,
    RESOURCES,
    RESOURCES_GONE,
    SESSIONS,
    HELD,
    HELD_COUNTS,
    HELD_RELEASES,
    OUTBOX,
    ALIASES,
    USER_ALIASES,
    VERIFICATIONS,
    VERIFICATIONS_BY_ADDRESS,
    PENDING_HEADS,
    PENDING_ITEMS,
    PENDING_DUE,
    PENDING_COUNTS,
    EMAIL_JOBS,
    EMAIL_DUE,
    SMS_JOBS,
    SMS_DUE,
    SMS_SENT,
    SMS_PER_DAY,
    EMAIL_PER_DAY,
    SEEN,
    SEEN_BY_TIME,
    PUBLISHED,
    SUBSCRIPTION_REQUESTS,
    BUDDY_ALERTS,
    BUDDY_ALERT_RECHECKS,
    RECHECKS_DUE,
    ABUSE_COUNTS,
    COUNTERS_DUE,
    DEAD_LETTERS,
    DEAD_BY_FINGERPRINT,
    HOST_PRIVILEGES,
];

/// What each server host allows Reach (XEP-0356), by host.
const HOST_PRIVILEGES: Tree = Tree::records("host_privileges");

const DATA_VERSION_KEY: &[u8] = b"data_version";
/// Progress of the walk over all users after a reconnect (see [`Tx::presence_walk`]).
const PRESENCE_WALK_KEY: &[u8] = b"presence_walk";

/// A durable job queue: its records, its index by due time, and who to tell of new jobs.
#[derive(Debug, Clone, Copy)]
pub struct Queue {
    jobs: Tree,
    due: Tree,
    notice: &'static str,
}

pub const EMAIL_QUEUE: Queue = Queue {
    jobs: EMAIL_JOBS,
    due: EMAIL_DUE,
    notice: EMAIL_NOTICE,
};
pub const SMS_QUEUE: Queue = Queue {
    jobs: SMS_JOBS,
    due: SMS_DUE,
    notice: SMS_NOTICE,
};

// ---- keys and values ----

fn key(owner: &str, item: &str) -> Vec<u8> {
    let mut k = Vec::with_capacity(owner.len() + 1 + item.len());
    k.extend_from_slice(owner.as_bytes());
    k.push(0);
    k.extend_from_slice(item.as_bytes());
    k
}

fn prefix(owner: &str) -> Vec<u8> {
    key(owner, "")
}

/// The part of a key after its owner.
fn item_of(k: &[u8]) -> String {
    let pos = k.iter().position(|b| *b == 0).map_or(0, |p| p + 1);
    String::from_utf8_lossy(&k[pos..]).into_owned()
}

/// The owner of a key (before the first `\0`).
fn owner_of(k: &[u8]) -> String {
    let end = k.iter().position(|b| *b == 0).unwrap_or(k.len());
    String::from_utf8_lossy(&k[..end]).into_owned()
}

/// The key of one entry of the index of verifications by address.
fn verification_index_key(kind: TerminalKind, address: &str, jid: &str) -> Vec<u8> {
    let mut k = key(kind.key(), address);
    k.push(0);
    k.extend_from_slice(jid.as_bytes());
    k
}

fn alert_key(jid: &str, terminal: TerminalKind, buddy: &str) -> Vec<u8> {
    key(jid, &format!("{}\0{buddy}", terminal.key()))
}

/// An entry of a time index: the 8-byte big-endian time, then the record's key.
fn due_entry(at: u64, record_key: &[u8]) -> Vec<u8> {
    let mut k = Vec::with_capacity(8 + record_key.len());
    k.extend_from_slice(&at.to_be_bytes());
    k.extend_from_slice(record_key);
    k
}

/// Splits a time-index entry into (time, record key).
fn split_due(entry: &[u8]) -> Option<(u64, &[u8])> {
    let at = <[u8; 8]>::try_from(entry.get(..8)?).ok()?;
    Some((u64::from_be_bytes(at), &entry[8..]))
}

/// Index entries due at `now` (all of them with `u64::MAX`).
fn due_range(now: u64) -> KeyRange {
    match now.checked_add(1) {
        Some(end) => KeyRange::below(&end.to_be_bytes()),
        None => KeyRange::all(),
    }
}

fn seq_of(k: &[u8]) -> Option<u64> {
    <[u8; 8]>::try_from(k).ok().map(u64::from_be_bytes)
}

fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    // Serialising these plain records cannot fail.
    serde_json::to_vec(value).unwrap_or_default()
}

fn decode<T: DeserializeOwned>(tree: Tree, bytes: &[u8]) -> Result<T> {
    serde_json::from_slice(bytes).map_err(|e| StoreError::Corrupt(format!("{}: {e}", tree.name)))
}

/// The lock that takes a user for update.
fn user_lock(jid: &str) -> String {
    format!("user:{jid}")
}

/// The lock that stands for an instance's outbox and claims while they are adopted.
fn adoption_lock(instance: &str) -> String {
    format!("adopt:{instance}")
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

/// What the store knows of a Reach instance sharing it.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct InstanceRecord {
    /// Seconds since the Unix epoch when it started.
    pub started_at: u64,
    /// Its component link is up (so the users' presence is kept up to date through it).
    pub link_up: bool,
    /// Milliseconds since the Unix epoch since when the link is up, while it is.
    pub link_up_since_ms: Option<u64>,
    /// Milliseconds since the Unix epoch since when the link is down (or the instance started),
    /// while it is: what reached the server meanwhile did not reach this instance.
    pub link_down_since_ms: Option<u64>,
}

/// How long an instance's link may be down before another instance (whose link is up) takes
/// over the stanzas it queues meanwhile (replies it took by email, pages of held messages).
pub const LINK_DOWN_ADOPTION_MS: u64 = 10_000;

/// Where the store lives.
#[derive(Clone, PartialEq, Eq)]
pub enum Location {
    /// The embedded engine, in this folder.
    Sled(std::path::PathBuf),
    /// A PostgreSQL database: a `postgres://` URL, and the password if it is kept apart.
    Postgres {
        url: String,
        password: Option<String>,
    },
}

impl std::fmt::Debug for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        std::fmt::Display::fmt(self, f)
    }
}

impl Location {
    /// Reads `sled://PATH` or `postgres://...` (also `postgresql://`); the error says what is
    /// expected.
    pub fn parse(url: &str) -> std::result::Result<Location, String> {
        if let Some(path) = url.strip_prefix("sled://") {
            if path.is_empty() {
                return Err("sled:// needs a folder, e.g. sled:///var/lib/reach".to_owned());
            }
            Ok(Location::Sled(std::path::PathBuf::from(path)))
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(Location::Postgres {
                url: url.to_owned(),
                password: None,
            })
        } else {
            Err("must start with sled:// (the embedded store) or postgres://".to_owned())
        }
    }

    /// The engine's name, for logs.
    pub fn engine(&self) -> &'static str {
        match self {
            Location::Sled(_) => "sled",
            Location::Postgres { .. } => "postgres",
        }
    }
}

impl std::fmt::Display for Location {
    /// The location without any password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::Sled(path) => write!(f, "sled://{}", path.display()),
            Location::Postgres { url, .. } => f.write_str(&postgres::redact(url)),
        }
    }
}

/// The store: an engine, this instance's name, and the wake-ups of the senders and the link.
/// Cheap to clone (all clones share the engine).
#[derive(Clone)]
pub struct Store {
    inner: Arc<Inner>,
}

struct Inner {
    engine: Box<dyn Engine>,
    instance: String,
    outbox_wake: Arc<Notify>,
    email_wake: Arc<Notify>,
    sms_wake: Arc<Notify>,
}

impl Store {
    /// Opens the store at `location` as instance `instance` (ignored by sled, which has one),
    /// creating or migrating what it holds.
    pub fn open_at(location: &Location, instance: &str) -> Result<Store> {
        match location {
            Location::Sled(path) => Store::open(path),
            Location::Postgres { url, password } => {
                let engine = postgres::Postgres::open_with_password(url, password.as_deref())?;
                Store::with_engine(Box::new(engine), instance, None)
            }
        }
    }

    /// Opens (or creates) an embedded store in `path`.
    pub fn open(path: &std::path::Path) -> Result<Store> {
        let engine = sled_engine::Sled::open(path)?;
        let legacy = engine.legacy_value(b"schema_version")?;
        let store = Store::with_engine(Box::new(engine), sled_engine::INSTANCE, legacy)?;
        Ok(store)
    }

    /// An embedded store that lives in memory only, for tests.
    pub fn temporary() -> Result<Store> {
        Store::with_engine(
            Box::new(sled_engine::Sled::temporary()?),
            sled_engine::INSTANCE,
            None,
        )
    }

    /// A PostgreSQL store as instance `instance` (see [`postgres::Postgres::open`]).
    pub fn postgres(url: &str, instance: &str) -> Result<Store> {
        Store::with_engine(Box::new(postgres::Postgres::open(url)?), instance, None)
    }

    /// `legacy_schema`: what the first sled layout kept as its version, if it did.
    fn with_engine(
        engine: Box<dyn Engine>,
        instance: &str,
        legacy_schema: Option<Vec<u8>>,
    ) -> Result<Store> {
        let store = Store {
            inner: Arc::new(Inner {
                engine,
                instance: instance.to_owned(),
                outbox_wake: Arc::new(Notify::new()),
                email_wake: Arc::new(Notify::new()),
                sms_wake: Arc::new(Notify::new()),
            }),
        };
        migrate_data(&store, legacy_schema)?;
        let (email, sms) = (store.inner.email_wake.clone(), store.inner.sms_wake.clone());
        store
            .inner
            .engine
            .listen(Box::new(move |channel| match channel {
                EMAIL_NOTICE => email.notify_one(),
                SMS_NOTICE => sms.notify_one(),
                _ => {}
            }))?;
        Ok(store)
    }

    /// This instance's name.
    pub fn instance(&self) -> &str {
        &self.inner.instance
    }

    /// The engine's name ("sled" or "postgres").
    pub fn engine_name(&self) -> &'static str {
        self.inner.engine.name()
    }

    /// Begins a transaction.
    pub fn begin(&self) -> Result<Tx<'_>> {
        Ok(Tx {
            txn: Txn::new(self.inner.engine.begin()?),
            store: self,
            stanzas: false,
            emails: false,
            texts: false,
        })
    }

    /// Runs `f` in a transaction and commits it durably, running it again (up to a few times)
    /// when another instance changed the same data at the same time.
    pub fn write<T>(&self, mut f: impl FnMut(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        self.transact(true, &mut f)
    }

    /// [`Store::write`] for what may reach the disk a moment later (a claim, a sent stanza's
    /// removal: lost in a crash, it is only done again).
    pub fn write_relaxed<T>(&self, mut f: impl FnMut(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        self.transact(false, &mut f)
    }

    fn transact<T>(&self, durable: bool, f: &mut dyn FnMut(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        let mut attempt = 0;
        loop {
            attempt += 1;
            let mut tx = self.begin()?;
            let outcome = f(&mut tx).and_then(|value| tx.commit_as(durable).map(|()| value));
            match outcome {
                Err(e) if e.is_retryable() && attempt < 8 => {
                    std::thread::sleep(std::time::Duration::from_millis(5 * attempt));
                }
                other => return other,
            }
        }
    }

    /// Runs `f` in a transaction that is then dropped (nothing it wrote is kept).
    pub fn read<T>(&self, f: impl FnOnce(&mut Tx<'_>) -> Result<T>) -> Result<T> {
        let mut tx = self.begin()?;
        f(&mut tx)
    }

    // ---- wake-ups ----

    /// Tells the link there is something to send (after a commit).
    pub fn wake_outbox(&self) {
        self.inner.outbox_wake.notify_one();
    }

    pub fn email_wake(&self) -> Arc<Notify> {
        self.inner.email_wake.clone()
    }

    pub fn sms_wake(&self) -> Arc<Notify> {
        self.inner.sms_wake.clone()
    }

    // ---- the job queues, for their senders ----

    /// Claims up to `limit` due jobs of `queue` for this instance: each is this instance's to
    /// send until it reports back ([`Store::settle_jobs`]) or [`CLAIM_SECS`] pass. Jobs another
    /// instance is claiming at this moment are left to it.
    pub fn claim_jobs<J: QueuedJob>(
        &self,
        queue: Queue,
        now: u64,
        limit: usize,
    ) -> Result<Vec<(u64, J)>> {
        let instance = self.inner.instance.clone();
        self.write_relaxed(|tx| {
            let entries = tx.txn.claim(queue.due, &due_range(now), limit)?;
            let mut claimed = Vec::new();
            for (entry, _) in entries {
                tx.txn.remove(queue.due, &entry);
                let Some((at, record)) = split_due(&entry) else {
                    continue;
                };
                let Some(seq) = seq_of(record) else { continue };
                let Some(bytes) = tx.txn.get(queue.jobs, record)? else {
                    continue;
                };
                let mut job: J = decode(queue.jobs, &bytes)?;
                if job.next_attempt_at() != at {
                    // A stale entry: the job is due at another time (and indexed there).
                    continue;
                }
                job.claim(&instance, now.saturating_add(CLAIM_SECS));
                tx.put_job(queue, seq, &job)?;
                claimed.push((seq, job));
            }
            Ok(claimed)
        })
    }

    /// The earliest next attempt among the queued jobs (claimed ones included: their claim
    /// runs out then).
    pub fn next_attempt(&self, queue: Queue) -> Result<Option<u64>> {
        self.read(|tx| {
            Ok(tx
                .txn
                .scan(queue.due, &KeyRange::all(), 1)?
                .first()
                .and_then(|(k, _)| split_due(k))
                .map(|(at, _)| at))
        })
    }

    /// Records what became of claimed jobs: `None` removes the job (sent), `Some(job)` puts it
    /// back as given (retry later, or parked for good). A job that is gone meanwhile (its user
    /// was removed, or the core already dealt with its failure) stays gone.
    pub fn settle_jobs<J: QueuedJob>(
        &self,
        queue: Queue,
        outcomes: &[(u64, Option<J>)],
    ) -> Result<()> {
        if outcomes.is_empty() {
            return Ok(());
        }
        self.write(|tx| {
            for (seq, outcome) in outcomes {
                let Some(current) = tx.job::<J>(queue, *seq)? else {
                    continue;
                };
                tx.txn.remove(
                    queue.due,
                    &due_entry(current.next_attempt_at(), &seq.to_be_bytes()),
                );
                match outcome {
                    None => tx.txn.remove(queue.jobs, &seq.to_be_bytes()),
                    Some(job) => tx.put_job(queue, *seq, job)?,
                }
            }
            Ok(())
        })
    }

    /// Every queued job whose next attempt is due at `now`, without claiming (for tests and
    /// the admin).
    pub fn due_jobs<J: DeserializeOwned + QueuedJob>(
        &self,
        queue: Queue,
        now: u64,
        limit: usize,
    ) -> Result<Vec<(u64, J)>> {
        self.read(|tx| tx.due_jobs(queue, now, limit))
    }

    /// Makes the jobs `instance` claimed due now (it is gone, or it is this instance starting
    /// again: nothing is in flight).
    fn release_claims(tx: &mut Tx<'_>, instance: &str, now: u64) -> Result<usize> {
        Ok(
            Store::release_claims_of::<EmailJob>(tx, EMAIL_QUEUE, instance, now)?
                + Store::release_claims_of::<SmsJob>(tx, SMS_QUEUE, instance, now)?,
        )
    }

    fn release_claims_of<J: DeserializeOwned + Serialize + QueuedJob>(
        tx: &mut Tx<'_>,
        queue: Queue,
        instance: &str,
        now: u64,
    ) -> Result<usize> {
        let mut released = 0;
        // Claimed jobs are due in the future, at most CLAIM_SECS ahead.
        let entries = tx.txn.scan(
            queue.due,
            &KeyRange {
                start: now.to_be_bytes().to_vec(),
                end: Some(now.saturating_add(CLAIM_SECS + 1).to_be_bytes().to_vec()),
            },
            usize::MAX,
        )?;
        for (entry, _) in entries {
            let Some((_, record)) = split_due(&entry) else {
                continue;
            };
            let Some(seq) = seq_of(record) else { continue };
            let Some(mut job) = tx.job::<J>(queue, seq)? else {
                continue;
            };
            if job.claimed_by() != Some(instance) {
                continue;
            }
            tx.txn.remove(queue.due, &entry);
            let attempts = job.attempts();
            job.reschedule(attempts, now);
            tx.put_job(queue, seq, &job)?;
            released += 1;
        }
        Ok(released)
    }

    // ---- this instance's outbox of stanzas, for the component link ----

    /// The oldest stanzas of this instance's outbox (only committed ones exist).
    pub fn outbox_pending(&self, limit: usize) -> Result<Vec<(u64, Element)>> {
        let instance = self.inner.instance.clone();
        let (found, unreadable) = self.read(|tx| {
            let mut found = Vec::new();
            let mut unreadable = Vec::new();
            let p = prefix(&instance);
            for (k, v) in tx.txn.scan(OUTBOX, &KeyRange::prefix(&p), limit)? {
                let Some(seq) = seq_of(&k[p.len()..]) else {
                    unreadable.push(k);
                    continue;
                };
                match std::str::from_utf8(&v)
                    .ok()
                    .and_then(|s| s.parse::<Element>().ok())
                {
                    Some(el) => found.push((seq, el)),
                    None => unreadable.push(k),
                }
            }
            Ok((found, unreadable))
        })?;
        if !unreadable.is_empty() {
            tracing::error!(
                count = unreadable.len(),
                "dropping unreadable outbound stanzas from the store"
            );
            self.write_relaxed(|tx| {
                for k in &unreadable {
                    tx.txn.remove(OUTBOX, k);
                }
                Ok(())
            })?;
        }
        Ok(found)
    }

    /// Forgets stanzas of this instance's outbox that were written to the socket.
    pub fn outbox_sent(&self, seqs: &[u64]) -> Result<()> {
        let instance = self.inner.instance.clone();
        self.write_relaxed(|tx| {
            for seq in seqs {
                let mut k = prefix(&instance);
                k.extend_from_slice(&seq.to_be_bytes());
                tx.txn.remove(OUTBOX, &k);
            }
            Ok(())
        })
    }

    /// How many stanzas wait in every instance's outbox.
    pub fn outbox_len(&self) -> Result<u64> {
        self.inner.engine.len(OUTBOX)
    }

    // ---- instances ----

    /// Makes this process the live holder of its instance name and records it. Fails if a live
    /// process already holds the name (two instances with one name would send twice).
    pub fn register_instance(&self, now: u64) -> Result<()> {
        let name = self.inner.instance.clone();
        // The record first, the name then: an instance seen alive never shows the record a
        // killed process left (readers look whether an instance is alive before reading its
        // record). A second process under a name in use writes it too before it is refused;
        // the running one writes its own again within `Store::keep_record`'s period.
        self.write(|tx| {
            tx.txn.put(
                INSTANCES,
                name.as_bytes(),
                encode(&InstanceRecord {
                    started_at: now,
                    link_up: false,
                    link_up_since_ms: None,
                    link_down_since_ms: Some(crate::clock::now_ms()),
                }),
            )
        })?;
        if !self.inner.engine.hold_instance(&name)? {
            return Err(StoreError::InUse(format!(
                "instance '{name}' is already running (each instance needs a name of its own: \
                 [store] instance)"
            )));
        }
        // Started again: nothing of this instance is in flight any more.
        self.write(|tx| Store::release_claims(tx, &name, now).map(drop))
    }

    /// Records whether this instance's component link is up, and since when (a change only;
    /// the same state again keeps its time).
    pub fn set_link_up(&self, up: bool) -> Result<()> {
        let name = self.inner.instance.clone();
        let now_ms = crate::clock::now_ms();
        self.write_relaxed(|tx| {
            let mut record: InstanceRecord = match tx.txn.get(INSTANCES, name.as_bytes())? {
                Some(v) => decode(INSTANCES, &v)?,
                None => InstanceRecord::default(),
            };
            if record.link_up != up || (up && record.link_up_since_ms.is_none()) {
                record.link_up = up;
                if up {
                    record.link_up_since_ms = Some(now_ms);
                } else {
                    record.link_up_since_ms = None;
                    record.link_down_since_ms = Some(now_ms);
                }
                tx.txn.put(INSTANCES, name.as_bytes(), encode(&record))?;
            }
            Ok(())
        })
    }

    fn record_of(&self, name: &str) -> Result<Option<InstanceRecord>> {
        self.read(|tx| tx.get_record(INSTANCES, name.as_bytes()))
    }

    fn instance_names(&self) -> Result<Vec<String>> {
        self.read(|tx| {
            Ok(tx
                .txn
                .scan(INSTANCES, &KeyRange::all(), usize::MAX)?
                .into_iter()
                .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
                .collect())
        })
    }

    /// Whether another live instance's link has been up all the time this instance's was down
    /// (then the users' presence it received is current, and this instance need not learn it
    /// again). Two links that came up together each walk the users: a walk too many is harmless,
    /// one too few leaves users who left meanwhile recorded online.
    pub fn links_up_elsewhere(&self) -> Result<bool> {
        let me = self.inner.instance.clone();
        let Some(down_since) = self.record_of(&me)?.and_then(|r| r.link_down_since_ms) else {
            return Ok(false);
        };
        for name in self.instance_names()? {
            // Alive first, the record then: a live instance's record is its own, never the
            // one a killed process left (see `register_instance`).
            if name == me || !self.inner.engine.instance_alive(&name)? {
                continue;
            }
            let Some(record) = self.record_of(&name)? else {
                continue;
            };
            if record.link_up && record.link_up_since_ms.is_some_and(|t| t < down_since) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// The instances the store knows of, with whether each is alive now.
    pub fn instances(&self) -> Result<Vec<(String, InstanceRecord, bool)>> {
        let me = self.inner.instance.clone();
        let records: Vec<(String, InstanceRecord)> = self.read(|tx| {
            tx.txn
                .scan(INSTANCES, &KeyRange::all(), usize::MAX)?
                .into_iter()
                .map(|(k, v)| {
                    Ok((
                        String::from_utf8_lossy(&k).into_owned(),
                        decode(INSTANCES, &v)?,
                    ))
                })
                .collect()
        })?;
        records
            .into_iter()
            .map(|(name, record)| {
                let alive = name == me || self.inner.engine.instance_alive(&name)?;
                Ok((name, record, alive))
            })
            .collect()
    }

    /// Takes over what instances that are gone left: their outboxes (appended to this
    /// instance's, in their order) and their claims on emails and SMS (due at once). Returns
    /// the names adopted.
    pub fn adopt_gone_instances(&self, now: u64) -> Result<Vec<String>> {
        let me = self.inner.instance.clone();
        let mut names = self.instance_names()?;
        // Outboxes of processes that never registered (an admin command's).
        names.extend(self.outbox_owners()?);
        names.sort();
        names.dedup();
        let my_link_up = self.record_of(&me)?.is_some_and(|r| r.link_up);
        let now_ms = crate::clock::now_ms();
        let mut adopted = Vec::new();
        for name in names {
            if name == me {
                continue;
            }
            let gone = !self.inner.engine.instance_alive(&name)?;
            // Alive, but cut off from the server for a while: what it queues would wait for
            // its link; this instance's link is up, so it sends that (its claims stay its own:
            // its senders work).
            let cut_off = !gone
                && my_link_up
                && self.record_of(&name)?.is_some_and(|r| {
                    !r.link_up
                        && r.link_down_since_ms
                            .is_some_and(|t| now_ms.saturating_sub(t) >= LINK_DOWN_ADOPTION_MS)
                });
            if !gone && !cut_off {
                continue;
            }
            let moved = self.write(|tx| {
                if !tx.txn.try_lock(&adoption_lock(&name))? {
                    return Ok(None);
                }
                let from = prefix(&name);
                let mut moved = 0;
                for (k, v) in tx.txn.scan_prefix(OUTBOX, &from)? {
                    let seq = tx.txn.next_id()?;
                    let mut to = prefix(&me);
                    to.extend_from_slice(&seq.to_be_bytes());
                    tx.txn.put(OUTBOX, &to, v)?;
                    tx.txn.remove(OUTBOX, &k);
                    moved += 1;
                }
                let (released, known) = if gone {
                    let known = tx.txn.contains(INSTANCES, name.as_bytes())?;
                    tx.txn.remove(INSTANCES, name.as_bytes());
                    (Store::release_claims(tx, &name, now)?, known)
                } else {
                    (0, false)
                };
                if moved > 0 {
                    tx.stanzas = true;
                }
                if released > 0 {
                    tx.emails = true;
                    tx.texts = true;
                }
                // Another instance took it over a moment before: nothing to say.
                Ok((moved > 0 || released > 0 || known).then_some((moved, released)))
            })?;
            if let Some((stanzas, claims)) = moved {
                if gone {
                    tracing::info!(
                        instance = name.as_str(),
                        stanzas,
                        claims,
                        "took over what a stopped instance left"
                    );
                } else {
                    tracing::info!(
                        instance = name.as_str(),
                        stanzas,
                        "sent what an instance cut off from the server queued"
                    );
                }
                adopted.push(name);
            }
        }
        Ok(adopted)
    }

    /// The instances that have stanzas in the outbox.
    fn outbox_owners(&self) -> Result<Vec<String>> {
        self.read(|tx| {
            let mut owners = Vec::new();
            let mut range = KeyRange::all();
            while let Some((k, _)) = tx.txn.scan(OUTBOX, &range, 1)?.into_iter().next() {
                let owner = owner_of(&k);
                let next = engine::prefix_end(&prefix(&owner));
                owners.push(owner);
                match next {
                    Some(start) => range = KeyRange { start, end: None },
                    None => break,
                }
            }
            Ok(owners)
        })
    }

    // ---- dead letters, for the admin ----

    /// Every dead letter, oldest first.
    pub fn dead_letters(&self) -> Result<Vec<(u64, DeadLetter)>> {
        self.read(|tx| tx.dead_letters())
    }

    /// Asks for the dead letter `id` to be handled again at the next start. False if none.
    pub fn mark_for_redrive(&self, id: u64) -> Result<bool> {
        self.write(|tx| {
            let Some(v) = tx.txn.get(DEAD_LETTERS, &id.to_be_bytes())? else {
                return Ok(false);
            };
            let mut letter: DeadLetter = decode(DEAD_LETTERS, &v)?;
            letter.redrive = true;
            tx.txn
                .put(DEAD_LETTERS, &id.to_be_bytes(), encode(&letter))?;
            Ok(true)
        })
    }

    /// Deletes the dead letter `id`. False if there is none.
    pub fn remove_dead_letter(&self, id: u64) -> Result<bool> {
        self.write(|tx| tx.remove_dead_letter(id))
    }

    /// Removes and returns the dead letters marked for re-drive, oldest first.
    pub fn take_redrives(&self) -> Result<Vec<DeadLetter>> {
        self.write(|tx| {
            let mut out = Vec::new();
            for (id, letter) in tx.dead_letters()? {
                if letter.redrive {
                    tx.remove_dead_letter(id)?;
                    out.push(letter);
                }
            }
            Ok(out)
        })
    }

    /// Counts for `reach stats` and the metrics.
    pub fn stats(&self) -> Result<Stats> {
        let engine = &self.inner.engine;
        Ok(Stats {
            users: engine.len(USERS)? as usize,
            sessions: engine.len(SESSIONS)? as usize,
            held: engine.len(HELD)? as usize,
            outbox: engine.len(OUTBOX)? as usize,
            email_queue: engine.len(EMAIL_JOBS)? as usize,
            sms_queue: engine.len(SMS_JOBS)? as usize,
        })
    }
}

impl crate::xmpp::link::OutboundQueue for Store {
    fn pending(&self, limit: usize) -> futures::future::BoxFuture<'static, Vec<(u64, Element)>> {
        let store = self.clone();
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || store.outbox_pending(limit)).await {
                Ok(Ok(found)) => found,
                Ok(Err(e)) => {
                    tracing::error!("cannot read the outbox: {e}");
                    Vec::new()
                }
                Err(_) => Vec::new(),
            }
        })
    }

    fn mark_sent(&self, keys: Vec<u64>) -> futures::future::BoxFuture<'static, ()> {
        let store = self.clone();
        Box::pin(async move {
            match tokio::task::spawn_blocking(move || store.outbox_sent(&keys)).await {
                Ok(Ok(())) => {}
                Ok(Err(e)) => tracing::error!("could not remove sent stanzas from the outbox: {e}"),
                Err(_) => {}
            }
        })
    }

    fn notify(&self) -> Arc<Notify> {
        self.inner.outbox_wake.clone()
    }
}

/// One transaction: the core's [`Transaction`], and what the runtime and the admin do besides.
pub struct Tx<'s> {
    txn: Txn<'s>,
    store: &'s Store,
    /// What this transaction queued (whom to wake after the commit).
    stanzas: bool,
    emails: bool,
    texts: bool,
}

impl<'s> Tx<'s> {
    /// Commits durably: once this returns, what the transaction wrote survives a crash. Then
    /// wakes whoever sends what it queued.
    pub fn commit(self) -> Result<()> {
        self.commit_as(true)
    }

    fn commit_as(self, durable: bool) -> Result<()> {
        let Tx {
            txn,
            store,
            stanzas,
            emails,
            texts,
        } = self;
        txn.commit(durable)?;
        if stanzas {
            store.wake_outbox();
        }
        if emails {
            store.inner.email_wake.notify_one();
        }
        if texts {
            store.inner.sms_wake.notify_one();
        }
        Ok(())
    }

    /// Marks the point [`Tx::rollback_to_savepoint`] returns to (before each event).
    pub fn savepoint(&mut self) {
        self.txn.savepoint();
    }

    /// Undoes what was written since the savepoint (an event that failed).
    pub fn rollback_to_savepoint(&mut self) {
        self.txn.rollback_to_savepoint();
    }

    fn locked_user(&mut self, jid: &str) -> Result<()> {
        self.txn.lock(&user_lock(jid))
    }

    fn get_record<T: DeserializeOwned>(&mut self, tree: Tree, k: &[u8]) -> Result<Option<T>> {
        self.txn.get(tree, k)?.map(|v| decode(tree, &v)).transpose()
    }

    fn records<T: DeserializeOwned>(&mut self, tree: Tree, p: &[u8]) -> Result<Vec<(String, T)>> {
        self.txn
            .scan_prefix(tree, p)?
            .into_iter()
            .map(|(k, v)| Ok((item_of(&k), decode(tree, &v)?)))
            .collect()
    }

    fn job<J: DeserializeOwned>(&mut self, queue: Queue, seq: u64) -> Result<Option<J>> {
        self.get_record(queue.jobs, &seq.to_be_bytes())
    }

    /// Writes a job and its index entry (the caller removed any previous entry).
    fn put_job<J: Serialize + QueuedJob>(&mut self, queue: Queue, seq: u64, job: &J) -> Result<()> {
        let record = seq.to_be_bytes();
        self.txn.put(
            queue.due,
            &due_entry(job.next_attempt_at(), &record),
            Vec::new(),
        )?;
        self.txn.put(queue.jobs, &record, encode(job))
    }

    fn enqueue<J: Serialize + QueuedJob>(&mut self, queue: Queue, job: &J) -> Result<u64> {
        let seq = self.txn.next_id()?;
        self.put_job(queue, seq, job)?;
        self.txn.notify(queue.notice);
        Ok(seq)
    }

    fn remove_job<J: DeserializeOwned + QueuedJob>(
        &mut self,
        queue: Queue,
        seq: u64,
    ) -> Result<()> {
        if let Some(job) = self.job::<J>(queue, seq)? {
            self.txn.remove(
                queue.due,
                &due_entry(job.next_attempt_at(), &seq.to_be_bytes()),
            );
            self.txn.remove(queue.jobs, &seq.to_be_bytes());
        }
        Ok(())
    }

    /// The jobs of `queue` queued for `jid`.
    fn jobs_of<J: DeserializeOwned + QueuedJob>(
        &mut self,
        queue: Queue,
        jid: &str,
        user_of: impl Fn(&J) -> &str,
    ) -> Result<Vec<(u64, J)>> {
        let mut out = Vec::new();
        for (k, v) in self.txn.scan(queue.jobs, &KeyRange::all(), usize::MAX)? {
            let job: J = decode(queue.jobs, &v)?;
            if user_of(&job) == jid {
                if let Some(seq) = seq_of(&k) {
                    out.push((seq, job));
                }
            }
        }
        Ok(out)
    }

    fn remove_dead_letter(&mut self, id: u64) -> Result<bool> {
        let Some(letter) = self.get_record::<DeadLetter>(DEAD_LETTERS, &id.to_be_bytes())? else {
            return Ok(false);
        };
        self.txn.remove(DEAD_LETTERS, &id.to_be_bytes());
        self.txn.remove(DEAD_BY_FINGERPRINT, &letter.fingerprint);
        Ok(true)
    }

    // ---- pending forwards (see the trait's methods) ----

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

    fn pending_head(&mut self, conversation: &[u8]) -> Result<Option<PendingHead>> {
        self.get_record(PENDING_HEADS, conversation)
    }

    fn put_head(
        &mut self,
        conversation: &[u8],
        previous: Option<u64>,
        head: &PendingHead,
    ) -> Result<()> {
        if let Some(at) = previous.filter(|at| *at != head.due_at) {
            self.txn.remove(PENDING_DUE, &due_entry(at, conversation));
        }
        self.txn.put(
            PENDING_DUE,
            &due_entry(head.due_at, conversation),
            Vec::new(),
        )?;
        self.txn.put(PENDING_HEADS, conversation, encode(head))
    }

    /// The conversation's pending forward with every item, each with its batch's due time.
    fn assemble(&mut self, conversation: &[u8], head: PendingHead) -> Result<Pending> {
        let mut items = Vec::with_capacity(head.count as usize);
        for (_, v) in self
            .txn
            .scan_prefix(PENDING_ITEMS, &Tx::items_prefix(conversation))?
        {
            let mut item: PendingItem = decode(PENDING_ITEMS, &v)?;
            item.due_at = Some(head.batch_due(item.terminal).unwrap_or(head.due_at));
            items.push(item);
        }
        Ok(Pending {
            peer: head.peer,
            due_at: head.due_at,
            items,
        })
    }

    fn add_held_count(&mut self, k: &[u8], delta: i64) -> Result<()> {
        self.txn.add(HELD_COUNTS, k, delta)?;
        Ok(())
    }

    /// The key of an abuse-limit count in its window.
    fn counter_key(name: &str, scope: &str, period: u64, now: u64) -> Vec<u8> {
        let mut k = key(name, scope);
        k.push(0);
        k.extend_from_slice(&period.to_be_bytes());
        k.extend_from_slice(&(now / period.max(1)).to_be_bytes());
        k
    }

    /// Records an id of something taken with the time it was first seen; false if it was seen
    /// before (the time then stays the first one). Ids come from outside (a Message-ID, a
    /// provider's id) and may be of any length: a long one is kept as its SHA-256.
    fn first_sight(&mut self, id: &[u8], now: u64) -> Result<bool> {
        let hashed;
        let id = if id.len() > MAX_SEEN_ID_BYTES {
            use sha2::Digest;
            let mut k = b"sha256\0".to_vec();
            k.extend_from_slice(&sha2::Sha256::digest(id));
            hashed = k;
            hashed.as_slice()
        } else {
            id
        };
        if !self.txn.insert_new(SEEN, id, now.to_be_bytes().to_vec())? {
            return Ok(false);
        }
        let mut by_time = now.to_be_bytes().to_vec();
        by_time.extend_from_slice(id);
        self.txn.put(SEEN_BY_TIME, &by_time, Vec::new())?;
        Ok(true)
    }

    // ---- for tests and the admin ----

    /// How many entries the index of verifications by address holds.
    pub fn verification_index_len(&mut self) -> usize {
        self.txn
            .scan(VERIFICATIONS_BY_ADDRESS, &KeyRange::all(), usize::MAX)
            .map_or(0, |v| v.len())
    }

    /// The number of live abuse-limit counts.
    pub fn counter_records(&mut self) -> usize {
        self.txn
            .scan(ABUSE_COUNTS, &KeyRange::all(), usize::MAX)
            .map_or(0, |v| v.len())
    }

    /// How many mail and SMS ids are remembered.
    pub fn seen_ids(&mut self) -> usize {
        self.txn
            .scan(SEEN, &KeyRange::all(), usize::MAX)
            .map_or(0, |v| v.len())
    }

    /// Every dead letter, oldest first.
    pub fn dead_letters(&mut self) -> Result<Vec<(u64, DeadLetter)>> {
        self.txn
            .scan(DEAD_LETTERS, &KeyRange::all(), usize::MAX)?
            .into_iter()
            .map(|(k, v)| {
                let id =
                    seq_of(&k).ok_or_else(|| StoreError::Corrupt("dead_letters key".into()))?;
                Ok((id, decode(DEAD_LETTERS, &v)?))
            })
            .collect()
    }

    /// Every email job queued, in order.
    pub fn email_jobs(&mut self) -> Result<Vec<(u64, EmailJob)>> {
        self.jobs_of(EMAIL_QUEUE, "", |_: &EmailJob| "")
    }

    /// Every SMS job queued, in order.
    pub fn sms_jobs(&mut self) -> Result<Vec<(u64, SmsJob)>> {
        self.jobs_of(SMS_QUEUE, "", |_: &SmsJob| "")
    }

    /// The jobs of a queue due at `now` (without claiming them).
    pub fn due_email_jobs(&mut self, now: u64, limit: usize) -> Result<Vec<(u64, EmailJob)>> {
        self.due_jobs(EMAIL_QUEUE, now, limit)
    }

    pub fn due_sms_jobs(&mut self, now: u64, limit: usize) -> Result<Vec<(u64, SmsJob)>> {
        self.due_jobs(SMS_QUEUE, now, limit)
    }

    fn due_jobs<J: DeserializeOwned + QueuedJob>(
        &mut self,
        queue: Queue,
        now: u64,
        limit: usize,
    ) -> Result<Vec<(u64, J)>> {
        let mut out = Vec::new();
        for (entry, _) in self.txn.scan(queue.due, &due_range(now), limit)? {
            let Some((at, record)) = split_due(&entry) else {
                continue;
            };
            let Some(seq) = seq_of(record) else { continue };
            if let Some(job) = self.job::<J>(queue, seq)? {
                if job.next_attempt_at() == at {
                    out.push((seq, job));
                }
            }
        }
        Ok(out)
    }

    /// Sets a queued email's record as given (tests: to make it due, or park it).
    pub fn update_email_job(&mut self, seq: u64, job: &EmailJob) -> Result<()> {
        self.remove_job::<EmailJob>(EMAIL_QUEUE, seq)?;
        self.put_job(EMAIL_QUEUE, seq, job)?;
        Ok(())
    }

    pub fn update_sms_job(&mut self, seq: u64, job: &SmsJob) -> Result<()> {
        self.remove_job::<SmsJob>(SMS_QUEUE, seq)?;
        self.put_job(SMS_QUEUE, seq, job)?;
        Ok(())
    }
}

impl Transaction for Tx<'_> {
    fn lock_user(&mut self, jid: &str) -> Result<()> {
        self.locked_user(jid)
    }

    fn host_privileges(&mut self, host: &str) -> Result<Option<HostPrivileges>> {
        self.get_record(HOST_PRIVILEGES, host.as_bytes())
    }

    fn put_host_privileges(&mut self, host: &str, privileges: &HostPrivileges) -> Result<()> {
        self.txn
            .put(HOST_PRIVILEGES, host.as_bytes(), encode(privileges))
    }

    fn put_resource_gone(&mut self, jid: &str, resource: &str, at: u64) -> Result<()> {
        self.locked_user(jid)?;
        self.txn.put(
            RESOURCES_GONE,
            &key(jid, resource),
            at.to_be_bytes().to_vec(),
        )
    }

    fn take_resource_gone(&mut self, jid: &str, resource: &str) -> Result<Option<u64>> {
        self.locked_user(jid)?;
        let k = key(jid, resource);
        let found = self.txn.get(RESOURCES_GONE, &k)?.and_then(|v| seq_of(&v));
        if found.is_some() {
            self.txn.remove(RESOURCES_GONE, &k);
        }
        Ok(found)
    }

    fn claim_user(&mut self, jid: &str) -> Result<bool> {
        self.txn.try_lock(&user_lock(jid))
    }

    fn claim_presence_walk(&mut self) -> Result<bool> {
        self.txn.try_lock("presence-walk")
    }

    // ---- users ----

    fn user(&mut self, jid: &str) -> Result<Option<User>> {
        self.locked_user(jid)?;
        self.get_record(USERS, jid.as_bytes())
    }

    fn user_by_handle(&mut self, handle: &Handle) -> Result<Option<User>> {
        let Some(jid) = self.txn.get(HANDLES, handle.as_str().as_bytes())? else {
            return Ok(None);
        };
        let jid = String::from_utf8_lossy(&jid).into_owned();
        // Taken for update, the user may have let the handle go meanwhile.
        Ok(self.user(&jid)?.filter(|u| &u.handle == handle))
    }

    /// Creates or updates a user. Fails with [`StoreError::HandleTaken`] if another user holds
    /// the handle; releases the user's previous handle when it changes. Two instances claiming
    /// one handle at once: one commit fails with a conflict and runs again, seeing it taken.
    fn put_user(&mut self, user: &User) -> Result<()> {
        let previous = self.user(&user.jid)?;
        match self.txn.get(HANDLES, user.handle.as_str().as_bytes())? {
            Some(holder) if holder != user.jid.as_bytes() => return Err(StoreError::HandleTaken),
            Some(_) => {}
            None => {
                if !self.txn.insert_new(
                    HANDLES,
                    user.handle.as_str().as_bytes(),
                    user.jid.as_bytes().to_vec(),
                )? {
                    return Err(StoreError::HandleTaken);
                }
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
                self.txn
                    .remove(HANDLES, previous.handle.as_str().as_bytes());
            }
            if let Some(old) = verified_phone(previous) {
                if verified_phone(user).as_deref() != Some(old.as_str()) {
                    self.txn.remove(PHONES, old.as_bytes());
                }
            }
        }
        if let Some(phone) = verified_phone(user) {
            self.txn
                .put(PHONES, phone.as_bytes(), user.jid.as_bytes().to_vec())?;
        }
        self.txn.put(USERS, user.jid.as_bytes(), encode(user))?;
        Ok(())
    }

    fn user_by_phone(&mut self, phone: &str) -> Result<Option<User>> {
        let Some(jid) = self.txn.get(PHONES, phone.as_bytes())? else {
            return Ok(None);
        };
        let jid = String::from_utf8_lossy(&jid).into_owned();
        Ok(self.user(&jid)?.filter(|u| {
            u.phone
                .as_ref()
                .is_some_and(|t| t.verified && t.address.as_str() == phone)
        }))
    }

    fn remove_user(&mut self, jid: &str) -> Result<Option<(User, Vec<String>)>> {
        let Some(user) = self.user(jid)? else {
            return Ok(None);
        };
        let buddies = self
            .buddies(&user.handle)?
            .into_iter()
            .map(|(b, _)| b)
            .collect();
        self.txn.remove(HANDLES, user.handle.as_str().as_bytes());
        if let Some(phone) = user.phone.as_ref().filter(|t| t.verified) {
            // Only if it still points at this user.
            if self
                .txn
                .get(PHONES, phone.address.as_str().as_bytes())?
                .as_deref()
                == Some(jid.as_bytes())
            {
                self.txn.remove(PHONES, phone.address.as_str().as_bytes());
            }
        }
        self.txn.remove(USERS, jid.as_bytes());
        for (k, _) in self.txn.scan_prefix(USER_ALIASES, &prefix(jid))? {
            self.txn.remove(ALIASES, &k[jid.len() + 1..]);
        }
        self.txn.remove(PUBLISHED, jid.as_bytes());
        for kind in [TerminalKind::Email, TerminalKind::Phone] {
            self.remove_verification(jid, kind)?;
        }
        self.txn.remove(HELD_COUNTS, jid.as_bytes());
        self.txn.remove(PENDING_COUNTS, jid.as_bytes());
        self.txn.remove(HELD_RELEASES, jid.as_bytes());
        // Due-index entries of the pending forwards go with their heads.
        for (k, v) in self.txn.scan_prefix(PENDING_HEADS, &prefix(jid))? {
            if let Ok(head) = decode::<PendingHead>(PENDING_HEADS, &v) {
                self.txn.remove(PENDING_DUE, &due_entry(head.due_at, &k));
            }
        }
        for (k, v) in self.txn.scan_prefix(BUDDY_ALERT_RECHECKS, &prefix(jid))? {
            if let Ok((due_at, ..)) =
                decode::<(u64, String, TerminalKind, String)>(BUDDY_ALERT_RECHECKS, &v)
            {
                self.txn.remove(RECHECKS_DUE, &due_entry(due_at, &k));
            }
        }
        for (tree, owner) in [
            (BUDDIES, user.handle.as_str()),
            (SUBSCRIPTION_REQUESTS, user.handle.as_str()),
            (BUDDY_ALERTS, jid),
            (BUDDY_ALERT_RECHECKS, jid),
            (RESOURCES, jid),
            (RESOURCES_GONE, jid),
            (SESSIONS, jid),
            (HELD, jid),
            (HELD_COUNTS, jid),
            (USER_ALIASES, jid),
            (VERIFICATIONS, jid),
            (PENDING_HEADS, jid),
            (PENDING_ITEMS, jid),
            (SMS_PER_DAY, jid),
            (EMAIL_PER_DAY, jid),
        ] {
            self.txn.remove_prefix(tree, &prefix(owner))?;
        }
        for (seq, _) in self.jobs_of(EMAIL_QUEUE, jid, |j: &EmailJob| &j.user)? {
            self.remove_job::<EmailJob>(EMAIL_QUEUE, seq)?;
        }
        for (seq, _) in self.jobs_of(SMS_QUEUE, jid, |j: &SmsJob| &j.user)? {
            self.remove_job::<SmsJob>(SMS_QUEUE, seq)?;
        }
        Ok(Some((user, buddies)))
    }

    fn users(&mut self) -> Result<Vec<User>> {
        self.txn
            .scan(USERS, &KeyRange::all(), usize::MAX)?
            .into_iter()
            .map(|(_, v)| decode(USERS, &v))
            .collect()
    }

    fn users_after(&mut self, after: Option<&str>, limit: usize) -> Result<Vec<User>> {
        let start = match after {
            Some(jid) => {
                let mut k = jid.as_bytes().to_vec();
                k.push(0);
                k
            }
            None => Vec::new(),
        };
        self.txn
            .scan(USERS, &KeyRange { start, end: None }, limit)?
            .into_iter()
            .map(|(_, v)| decode(USERS, &v))
            .collect()
    }

    fn presence_walk(&mut self) -> Result<Option<String>> {
        Ok(self
            .txn
            .get(META, PRESENCE_WALK_KEY)?
            .map(|v| String::from_utf8_lossy(&v).into_owned()))
    }

    fn set_presence_walk(&mut self, at: Option<&str>) -> Result<()> {
        match at {
            Some(jid) => self
                .txn
                .put(META, PRESENCE_WALK_KEY, jid.as_bytes().to_vec())?,
            None => self.txn.remove(META, PRESENCE_WALK_KEY),
        }
        Ok(())
    }

    // ---- buddies of a reach address ----

    fn buddy(&mut self, handle: &Handle, buddy: &str) -> Result<Option<Buddy>> {
        self.get_record(BUDDIES, &key(handle.as_str(), buddy))
    }

    fn put_buddy(&mut self, handle: &Handle, buddy: &str, record: &Buddy) -> Result<()> {
        self.txn
            .put(BUDDIES, &key(handle.as_str(), buddy), encode(record))?;
        Ok(())
    }

    fn remove_buddy(&mut self, handle: &Handle, buddy: &str) -> Result<()> {
        self.txn.remove(BUDDIES, &key(handle.as_str(), buddy));
        Ok(())
    }

    fn buddies(&mut self, handle: &Handle) -> Result<Vec<(String, Buddy)>> {
        self.records(BUDDIES, &prefix(handle.as_str()))
    }

    fn published_presence(&mut self, jid: &str) -> Result<Option<GlobalPresence>> {
        self.get_record(PUBLISHED, jid.as_bytes())
    }

    fn put_published_presence(&mut self, jid: &str, presence: &GlobalPresence) -> Result<()> {
        self.locked_user(jid)?;
        self.txn.put(PUBLISHED, jid.as_bytes(), encode(presence))?;
        Ok(())
    }

    fn subscription_request(
        &mut self,
        handle: &Handle,
        buddy: &str,
    ) -> Result<Option<SubscriptionRequest>> {
        self.get_record(SUBSCRIPTION_REQUESTS, &key(handle.as_str(), buddy))
    }

    fn put_subscription_request(
        &mut self,
        handle: &Handle,
        buddy: &str,
        request: &SubscriptionRequest,
    ) -> Result<()> {
        self.txn.put(
            SUBSCRIPTION_REQUESTS,
            &key(handle.as_str(), buddy),
            encode(request),
        )?;
        Ok(())
    }

    fn take_subscription_request(
        &mut self,
        handle: &Handle,
        buddy: &str,
    ) -> Result<Option<SubscriptionRequest>> {
        let k = key(handle.as_str(), buddy);
        let found = self.get_record(SUBSCRIPTION_REQUESTS, &k)?;
        if found.is_some() {
            self.txn.remove(SUBSCRIPTION_REQUESTS, &k);
        }
        Ok(found)
    }

    fn subscription_requests(
        &mut self,
        handle: &Handle,
    ) -> Result<Vec<(String, SubscriptionRequest)>> {
        self.records(SUBSCRIPTION_REQUESTS, &prefix(handle.as_str()))
    }

    fn buddy_count(&mut self, handle: &Handle) -> Result<usize> {
        let p = prefix(handle.as_str());
        Ok(self.txn.scan_prefix(BUDDIES, &p)?.len()
            + self.txn.scan_prefix(SUBSCRIPTION_REQUESTS, &p)?.len())
    }

    // ---- buddy presence alerts ----

    fn buddy_alert(
        &mut self,
        jid: &str,
        terminal: TerminalKind,
        buddy: &str,
    ) -> Result<Option<BuddyAlert>> {
        self.get_record(BUDDY_ALERTS, &alert_key(jid, terminal, buddy))
    }

    fn put_buddy_alert(&mut self, alert: &BuddyAlert) -> Result<()> {
        self.locked_user(&alert.user)?;
        self.txn.put(
            BUDDY_ALERTS,
            &alert_key(&alert.user, alert.terminal, &alert.buddy),
            encode(alert),
        )?;
        Ok(())
    }

    fn schedule_alert_recheck(&mut self, alert: &BuddyAlert, due_at: u64) -> Result<()> {
        let k = alert_key(&alert.user, alert.terminal, &alert.buddy);
        if let Some((previous, ..)) =
            self.get_record::<(u64, String, TerminalKind, String)>(BUDDY_ALERT_RECHECKS, &k)?
        {
            self.txn.remove(RECHECKS_DUE, &due_entry(previous, &k));
        }
        self.txn
            .put(RECHECKS_DUE, &due_entry(due_at, &k), Vec::new())?;
        self.txn.put(
            BUDDY_ALERT_RECHECKS,
            &k,
            encode(&(due_at, &alert.user, alert.terminal, &alert.buddy)),
        )?;
        Ok(())
    }

    /// Removes and returns the rechecks due at `now` whose user no other instance is busy
    /// with, as (user, terminal, buddy).
    fn take_due_alert_rechecks(&mut self, now: u64) -> Result<Vec<(String, TerminalKind, String)>> {
        let mut due = Vec::new();
        for (entry, _) in self.txn.scan(RECHECKS_DUE, &due_range(now), usize::MAX)? {
            let Some((at, k)) = split_due(&entry) else {
                self.txn.remove(RECHECKS_DUE, &entry);
                continue;
            };
            let k = k.to_vec();
            if !self.claim_user(&owner_of(&k))? {
                continue;
            }
            self.txn.remove(RECHECKS_DUE, &entry);
            if let Some((due_at, user, terminal, buddy)) =
                self.get_record::<(u64, String, TerminalKind, String)>(BUDDY_ALERT_RECHECKS, &k)?
            {
                if due_at == at {
                    self.txn.remove(BUDDY_ALERT_RECHECKS, &k);
                    due.push((user, terminal, buddy));
                }
            }
        }
        Ok(due)
    }

    // ---- the user's own XMPP resources ----

    fn set_resource(
        &mut self,
        jid: &str,
        resource: &str,
        presence: &ResourcePresence,
    ) -> Result<()> {
        self.locked_user(jid)?;
        self.txn
            .put(RESOURCES, &key(jid, resource), encode(presence))?;
        Ok(())
    }

    fn remove_resource(&mut self, jid: &str, resource: &str) -> Result<()> {
        self.locked_user(jid)?;
        self.txn.remove(RESOURCES, &key(jid, resource));
        Ok(())
    }

    fn resources(&mut self, jid: &str) -> Result<Vec<(String, ResourcePresence)>> {
        self.records(RESOURCES, &prefix(jid))
    }

    fn clear_resources(&mut self) -> Result<()> {
        self.txn.remove_prefix(RESOURCES, b"")?;
        Ok(())
    }

    // ---- sessions ----

    fn session(&mut self, jid: &str, peer: &str) -> Result<Option<Session>> {
        self.get_record(SESSIONS, &key(jid, peer))
    }

    fn touch_session(&mut self, jid: &str, peer: &str, now: u64) -> Result<Session> {
        self.locked_user(jid)?;
        let mut record = self.session(jid, peer)?.unwrap_or_else(|| Session {
            peer: peer.to_owned(),
            ..Session::default()
        });
        record.last_active = now;
        self.put_session(jid, &record)?;
        Ok(record)
    }

    fn put_session(&mut self, jid: &str, session: &Session) -> Result<()> {
        self.locked_user(jid)?;
        self.txn
            .put(SESSIONS, &key(jid, &session.peer), encode(session))?;
        Ok(())
    }

    fn sessions(&mut self, jid: &str) -> Result<Vec<Session>> {
        Ok(self
            .records(SESSIONS, &prefix(jid))?
            .into_iter()
            .map(|(_, s)| s)
            .collect())
    }

    // ---- held messages ----
    //
    // One key per held message (`jid \0 seq`), so holding and delivering a page cost the same
    // however many wait; counts per user and per sender beside them.

    fn hold(&mut self, jid: &str, message: &HeldMessage) -> Result<()> {
        self.locked_user(jid)?;
        let seq = self.txn.next_id()?;
        let mut k = prefix(jid);
        k.extend_from_slice(&seq.to_be_bytes());
        self.txn.put(HELD, &k, encode(message))?;
        self.add_held_count(jid.as_bytes(), 1)?;
        self.add_held_count(&key(jid, &message.peer), 1)?;
        Ok(())
    }

    fn take_held_page(&mut self, jid: &str, limit: usize) -> Result<Vec<HeldMessage>> {
        self.locked_user(jid)?;
        let mut out = Vec::new();
        for (k, v) in self
            .txn
            .scan(HELD, &KeyRange::prefix(&prefix(jid)), limit)?
        {
            let held: HeldMessage = decode(HELD, &v)?;
            self.txn.remove(HELD, &k);
            self.add_held_count(jid.as_bytes(), -1)?;
            self.add_held_count(&key(jid, &held.peer), -1)?;
            out.push(held);
        }
        Ok(out)
    }

    fn take_held(&mut self, jid: &str) -> Result<Vec<HeldMessage>> {
        self.take_held_page(jid, usize::MAX)
    }

    fn held_count(&mut self, jid: &str) -> Result<usize> {
        Ok(self.txn.count(HELD_COUNTS, jid.as_bytes())? as usize)
    }

    fn waiting_count(&mut self, jid: &str) -> Result<usize> {
        Ok((self.txn.count(HELD_COUNTS, jid.as_bytes())?
            + self.txn.count(PENDING_COUNTS, jid.as_bytes())?) as usize)
    }

    fn held_from(&mut self, jid: &str, peer: &str) -> Result<usize> {
        Ok(self.txn.count(HELD_COUNTS, &key(jid, peer))? as usize)
    }

    fn mark_held_release(&mut self, jid: &str) -> Result<()> {
        self.locked_user(jid)?;
        self.txn.put(HELD_RELEASES, jid.as_bytes(), Vec::new())?;
        Ok(())
    }

    fn held_release_running(&mut self, jid: &str) -> Result<bool> {
        self.txn.contains(HELD_RELEASES, jid.as_bytes())
    }

    fn end_held_release(&mut self, jid: &str) -> Result<()> {
        self.locked_user(jid)?;
        self.txn.remove(HELD_RELEASES, jid.as_bytes());
        Ok(())
    }

    fn held_releases(&mut self) -> Result<Vec<String>> {
        Ok(self
            .txn
            .scan(HELD_RELEASES, &KeyRange::all(), usize::MAX)?
            .into_iter()
            .map(|(k, _)| String::from_utf8_lossy(&k).into_owned())
            .collect())
    }

    fn hold_stanza(&mut self, jid: &str, peer: &str, stanza: &str, now: u64) -> Result<()> {
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

    fn put_alias(&mut self, token_hash: &[u8], alias: &Alias) -> Result<()> {
        self.txn.put(ALIASES, token_hash, encode(alias))?;
        let mut index = prefix(alias.purpose.user());
        index.extend_from_slice(token_hash);
        self.txn.put(USER_ALIASES, &index, Vec::new())?;
        Ok(())
    }

    fn alias(&mut self, token_hash: &[u8]) -> Result<Option<Alias>> {
        self.get_record(ALIASES, token_hash)
    }

    fn remove_alias(&mut self, token_hash: &[u8]) -> Result<()> {
        if let Some(alias) = self.alias(token_hash)? {
            let mut index = prefix(alias.purpose.user());
            index.extend_from_slice(token_hash);
            self.txn.remove(USER_ALIASES, &index);
        }
        self.txn.remove(ALIASES, token_hash);
        Ok(())
    }

    // ---- verification codes ----

    fn put_verification(&mut self, jid: &str, v: &Verification) -> Result<()> {
        self.locked_user(jid)?;
        let k = key(jid, v.kind.key());
        if let Some(previous) = self.get_record::<Verification>(VERIFICATIONS, &k)? {
            if previous.address != v.address {
                self.txn.remove(
                    VERIFICATIONS_BY_ADDRESS,
                    &verification_index_key(previous.kind, &previous.address, jid),
                );
            }
        }
        self.txn.put(VERIFICATIONS, &k, encode(v))?;
        self.txn.put(
            VERIFICATIONS_BY_ADDRESS,
            &verification_index_key(v.kind, &v.address, jid),
            Vec::new(),
        )?;
        Ok(())
    }

    fn verification(&mut self, jid: &str, kind: TerminalKind) -> Result<Option<Verification>> {
        self.get_record(VERIFICATIONS, &key(jid, kind.key()))
    }

    fn verifications_for_address(
        &mut self,
        kind: TerminalKind,
        address: &str,
    ) -> Result<Vec<(String, Verification)>> {
        let start = verification_index_key(kind, address, "");
        let mut found = Vec::new();
        for (k, _) in self.txn.scan_prefix(VERIFICATIONS_BY_ADDRESS, &start)? {
            let jid = String::from_utf8_lossy(&k[start.len()..]).into_owned();
            if let Some(v) = self.verification(&jid, kind)? {
                if v.address == address {
                    found.push((jid, v));
                }
            }
        }
        Ok(found)
    }

    fn remove_verification(&mut self, jid: &str, kind: TerminalKind) -> Result<()> {
        self.locked_user(jid)?;
        let k = key(jid, kind.key());
        if let Some(previous) = self.get_record::<Verification>(VERIFICATIONS, &k)? {
            self.txn.remove(VERIFICATIONS, &k);
            self.txn.remove(
                VERIFICATIONS_BY_ADDRESS,
                &verification_index_key(kind, &previous.address, jid),
            );
        }
        Ok(())
    }

    // ---- messages pending a forward ----
    //
    // A conversation's pending forward is a small head (due times per terminal, item count)
    // and one key per item, so a new message costs a read of the head and a few writes
    // however many items wait, and the cap is checked on the head alone. Items for the same
    // terminal go together: their due time is the terminal's batch time in the head.

    fn pending_of(&mut self, jid: &str, peer: &str) -> Result<Option<Pending>> {
        let conversation = key(jid, peer);
        match self.pending_head(&conversation)? {
            Some(head) => Ok(Some(self.assemble(&conversation, head)?)),
            None => Ok(None),
        }
    }

    fn pending_count(&mut self, jid: &str, peer: &str) -> Result<usize> {
        Ok(self
            .pending_head(&key(jid, peer))?
            .map_or(0, |h| h.count as usize))
    }

    fn add_pending(&mut self, jid: &str, peer: &str, item: &PendingItem) -> Result<()> {
        self.locked_user(jid)?;
        let conversation = key(jid, peer);
        let found = self.pending_head(&conversation)?;
        let previous = found.as_ref().map(|h| h.due_at);
        let mut head = found.unwrap_or(PendingHead {
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
        let seq = self.txn.next_id()?;
        self.txn.put(
            PENDING_ITEMS,
            &Tx::item_key(&conversation, seq),
            encode(item),
        )?;
        self.txn.add(PENDING_COUNTS, jid.as_bytes(), 1)?;
        self.put_head(&conversation, previous, &head)
    }

    fn put_pending(&mut self, jid: &str, pending: &Pending) -> Result<()> {
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
            let seq = self.txn.next_id()?;
            self.txn.put(
                PENDING_ITEMS,
                &Tx::item_key(&conversation, seq),
                encode(item),
            )?;
        }
        head.due_at = head
            .batches
            .iter()
            .map(|(_, at)| *at)
            .min()
            .unwrap_or(pending.due_at);
        self.txn
            .add(PENDING_COUNTS, jid.as_bytes(), i64::from(head.count))?;
        self.put_head(&conversation, None, &head)
    }

    fn remove_pending(&mut self, jid: &str, peer: &str) -> Result<()> {
        self.locked_user(jid)?;
        let conversation = key(jid, peer);
        let Some(head) = self.pending_head(&conversation)? else {
            return Ok(());
        };
        self.txn.remove(PENDING_HEADS, &conversation);
        self.txn
            .remove(PENDING_DUE, &due_entry(head.due_at, &conversation));
        self.txn
            .add(PENDING_COUNTS, jid.as_bytes(), -i64::from(head.count))?;
        self.txn
            .remove_prefix(PENDING_ITEMS, &Tx::items_prefix(&conversation))?;
        Ok(())
    }

    fn pending_for(&mut self, jid: &str) -> Result<Vec<Pending>> {
        let mut out = Vec::new();
        for (k, v) in self.txn.scan_prefix(PENDING_HEADS, &prefix(jid))? {
            let head = decode(PENDING_HEADS, &v)?;
            out.push(self.assemble(&k, head)?);
        }
        Ok(out)
    }

    /// Every conversation whose forward is due, as (user, pending), of the users this
    /// transaction could take for update (those another instance is busy with wait for the
    /// next tick). Reads only what is due.
    fn due_pending(&mut self, now: u64) -> Result<Vec<(String, Pending)>> {
        let mut due = Vec::new();
        for (entry, _) in self.txn.scan(PENDING_DUE, &due_range(now), usize::MAX)? {
            let Some((at, conversation)) = split_due(&entry) else {
                self.txn.remove(PENDING_DUE, &entry);
                continue;
            };
            let conversation = conversation.to_vec();
            let user = owner_of(&conversation);
            if !self.claim_user(&user)? {
                continue;
            }
            match self.pending_head(&conversation)? {
                Some(head) if head.due_at == at => {
                    let pending = self.assemble(&conversation, head)?;
                    due.push((user, pending));
                }
                // Stale: the head moved (indexed at its new time) or is gone.
                _ => self.txn.remove(PENDING_DUE, &entry),
            }
        }
        Ok(due)
    }

    // ---- the outbound queues ----

    fn enqueue_email(&mut self, job: &EmailJob) -> Result<u64> {
        self.emails = true;
        self.enqueue(EMAIL_QUEUE, job)
    }

    fn remove_email_job(&mut self, seq: u64) -> Result<()> {
        self.remove_job::<EmailJob>(EMAIL_QUEUE, seq)
    }

    fn enqueue_sms(&mut self, job: &SmsJob) -> Result<u64> {
        self.texts = true;
        self.enqueue(SMS_QUEUE, job)
    }

    fn remove_sms_job(&mut self, seq: u64) -> Result<()> {
        self.remove_job::<SmsJob>(SMS_QUEUE, seq)
    }

    fn put_sent_sms(&mut self, reference: &str, sent: &SentSms) -> Result<()> {
        self.txn.put(SMS_SENT, reference.as_bytes(), encode(sent))?;
        Ok(())
    }

    fn sent_sms(&mut self, reference: &str) -> Result<Option<SentSms>> {
        self.get_record(SMS_SENT, reference.as_bytes())
    }

    fn take_sent_sms(&mut self, reference: &str) -> Result<Option<SentSms>> {
        let found = self.sent_sms(reference)?;
        if found.is_some() {
            self.txn.remove(SMS_SENT, reference.as_bytes());
        }
        Ok(found)
    }

    fn sms_count(&mut self, jid: &str, day: u64) -> Result<u32> {
        Ok(self.txn.count(SMS_PER_DAY, &key(jid, &day.to_string()))? as u32)
    }

    fn count_sms(&mut self, jid: &str, day: u64) -> Result<u32> {
        Ok(self.txn.add(SMS_PER_DAY, &key(jid, &day.to_string()), 1)? as u32)
    }

    fn email_count(&mut self, jid: &str, day: u64) -> Result<u32> {
        Ok(self.txn.count(EMAIL_PER_DAY, &key(jid, &day.to_string()))? as u32)
    }

    fn count_email(&mut self, jid: &str, day: u64) -> Result<u32> {
        Ok(self
            .txn
            .add(EMAIL_PER_DAY, &key(jid, &day.to_string()), 1)? as u32)
    }

    fn first_sight_of_sms(&mut self, provider_id: &str, now: u64) -> Result<bool> {
        self.first_sight(&key("sms", provider_id), now)
    }

    // ---- abuse-limit counters ----
    //
    // One count per (name, scope, window): a count of an earlier window is simply not read,
    // and is pruned once its window is over.

    fn counter(&mut self, name: &str, scope: &str, period: u64, now: u64) -> Result<u32> {
        Ok(self
            .txn
            .count(ABUSE_COUNTS, &Tx::counter_key(name, scope, period, now))? as u32)
    }

    fn bump_counter(&mut self, name: &str, scope: &str, period: u64, now: u64) -> Result<u32> {
        let k = Tx::counter_key(name, scope, period, now);
        let count = self.txn.add(ABUSE_COUNTS, &k, 1)?;
        if count == 1 {
            let window_end = (now / period.max(1) + 1).saturating_mul(period.max(1));
            self.txn
                .put(COUNTERS_DUE, &due_entry(window_end, &k), Vec::new())?;
        }
        Ok(count as u32)
    }

    fn prune_counters(&mut self, now: u64) -> Result<()> {
        for (entry, _) in self.txn.scan(COUNTERS_DUE, &due_range(now), usize::MAX)? {
            if let Some((_, k)) = split_due(&entry) {
                let k = k.to_vec();
                self.txn.remove(ABUSE_COUNTS, &k);
            }
            self.txn.remove(COUNTERS_DUE, &entry);
        }
        Ok(())
    }

    fn user_state(&mut self, jid: &str) -> Result<UserState> {
        let user = self.user(jid)?;
        let buddies = match &user {
            Some(u) => self.buddies(&u.handle)?,
            None => Vec::new(),
        };
        let verifications = self
            .records::<Verification>(VERIFICATIONS, &prefix(jid))?
            .into_iter()
            .map(|(_, v)| v)
            .collect();
        let held = self
            .txn
            .scan_prefix(HELD, &prefix(jid))?
            .into_iter()
            .map(|(_, v)| decode(HELD, &v))
            .collect::<Result<Vec<_>>>()?;
        let email_jobs = self
            .jobs_of(EMAIL_QUEUE, jid, |j: &EmailJob| &j.user)?
            .into_iter()
            .map(|(_, j)| j)
            .collect();
        let sms_jobs = self
            .jobs_of(SMS_QUEUE, jid, |j: &SmsJob| &j.user)?
            .into_iter()
            .map(|(_, j)| j)
            .collect();
        Ok(UserState {
            buddies,
            resources: self.resources(jid)?,
            sessions: self.sessions(jid)?,
            held,
            pending: self.pending_for(jid)?,
            verifications,
            aliases: self.txn.scan_prefix(USER_ALIASES, &prefix(jid))?.len(),
            email_jobs,
            sms_jobs,
            user,
        })
    }

    // ---- inbound mail already taken (duplicate Message-IDs) ----

    /// Key: `mail \0 HEX(alias hash) \0 Message-ID`: one mail sent to two aliases is two
    /// deliveries (one per conversation); the same mail resent to one alias is one.
    fn first_sight_of_mail(
        &mut self,
        message_id: &str,
        alias_hash: &[u8; 32],
        now: u64,
    ) -> Result<bool> {
        let mut id = key("mail", &data_encoding::HEXLOWER.encode(alias_hash));
        id.push(0);
        id.extend_from_slice(message_id.as_bytes());
        self.first_sight(&id, now)
    }

    fn forget_seen_before(&mut self, cutoff: u64) -> Result<usize> {
        let mut forgotten = 0;
        for (k, _) in self.txn.scan(
            SEEN_BY_TIME,
            &KeyRange::below(&cutoff.to_be_bytes()),
            usize::MAX,
        )? {
            if let Some(id) = k.get(8..) {
                let id = id.to_vec();
                if self.txn.contains(SEEN, &id)? {
                    self.txn.remove(SEEN, &id);
                    forgotten += 1;
                }
            }
            self.txn.remove(SEEN_BY_TIME, &k);
        }
        Ok(forgotten)
    }

    // ---- outbound XMPP queue ----

    /// Queues a stanza for this instance's component link; it leaves once the transaction is
    /// committed.
    fn enqueue_stanza(&mut self, stanza: &Element) -> Result<()> {
        let xml = crate::xmpp::xml_text::to_xml(stanza)?;
        let seq = self.txn.next_id()?;
        let mut k = prefix(&self.store.inner.instance);
        k.extend_from_slice(&seq.to_be_bytes());
        self.txn.put(OUTBOX, &k, xml.into_bytes())?;
        self.stanzas = true;
        Ok(())
    }

    // ---- dead letters ----

    fn put_dead_letter(&mut self, letter: &DeadLetter) -> Result<u64> {
        let id = self.txn.next_id()?;
        self.txn.put(
            DEAD_BY_FINGERPRINT,
            &letter.fingerprint,
            id.to_be_bytes().to_vec(),
        )?;
        self.txn
            .put(DEAD_LETTERS, &id.to_be_bytes(), encode(letter))?;
        Ok(id)
    }

    fn dead_letter_by_fingerprint(&mut self, fingerprint: &[u8]) -> Result<Option<u64>> {
        Ok(self
            .txn
            .get(DEAD_BY_FINGERPRINT, fingerprint)?
            .and_then(|v| seq_of(&v)))
    }
}

/// Brings what the store holds to [`DATA_VERSION`]: a new store is marked current; the first
/// sled layout (version 1, which kept its version in sled's default tree) is converted.
fn migrate_data(store: &Store, legacy_schema: Option<Vec<u8>>) -> Result<()> {
    let found = store.read(|tx| {
        Ok(tx
            .txn
            .get(META, DATA_VERSION_KEY)?
            .and_then(|v| <[u8; 4]>::try_from(v.as_slice()).ok())
            .map(u32::from_be_bytes))
    })?;
    let version = match (found, legacy_schema) {
        (Some(v), _) => v,
        (None, Some(legacy)) => <[u8; 4]>::try_from(legacy.as_slice())
            .map(u32::from_be_bytes)
            .map_err(|_| StoreError::Corrupt("schema version".into()))?,
        (None, None) => {
            return store.write(|tx| {
                tx.txn
                    .put(META, DATA_VERSION_KEY, DATA_VERSION.to_be_bytes().to_vec())?;
                Ok(())
            });
        }
    };
    if version > DATA_VERSION || version == 0 {
        return Err(StoreError::Schema {
            found: version,
            expected: DATA_VERSION,
        });
    }
    if version == 1 {
        migrate::from_first_layout(store)?;
        tracing::info!("the store was converted to layout version {DATA_VERSION}");
    }
    Ok(())
}

/// A transaction that commits when dropped, for tests: `store.tx().user(..)` reads and
/// `store.tx().put_user(..)` writes in one statement each.
#[cfg(test)]
pub(crate) struct AutoCommit<'s>(Option<Tx<'s>>);

#[cfg(test)]
impl Store {
    pub(crate) fn tx(&self) -> AutoCommit<'_> {
        AutoCommit(Some(self.begin().expect("begin a test transaction")))
    }
}

#[cfg(test)]
impl<'s> std::ops::Deref for AutoCommit<'s> {
    type Target = Tx<'s>;
    fn deref(&self) -> &Tx<'s> {
        self.0.as_ref().expect("an open transaction")
    }
}

#[cfg(test)]
impl<'s> std::ops::DerefMut for AutoCommit<'s> {
    fn deref_mut(&mut self) -> &mut Tx<'s> {
        self.0.as_mut().expect("an open transaction")
    }
}

#[cfg(test)]
impl Drop for AutoCommit<'_> {
    fn drop(&mut self) {
        if let Some(tx) = self.0.take() {
            if !std::thread::panicking() {
                tx.commit().expect("commit a test transaction");
            }
        }
    }
}

#[cfg(test)]
pub(crate) mod conformance;
#[cfg(test)]
mod tests;
