//! Moving stored data: from the first sled layout to the current one (at open), and from one
//! engine to another (`reach migrate`, e.g. sled into PostgreSQL when one instance is no
//! longer enough).

use serde::Deserialize;

use super::engine::{KeyRange, Tree};
use super::*;

// The first layout's trees that the current one replaced.
const OLD_OUTBOX: Tree = Tree::records("outbox");
const OLD_COUNTERS: Tree = Tree::records("counters");
const OLD_SMS_COUNTS: Tree = Tree::records("sms_counts");
const OLD_EMAIL_COUNTS: Tree = Tree::records("email_counts");
const OLD_PENDING: Tree = Tree::records("pending");

/// An abuse-limit counter as the first layout stored it, under `name \0 scope`.
#[derive(Deserialize)]
struct OldCounter {
    period: u64,
    window: u64,
    count: u32,
}

/// Converts a store of the first layout (data version 1) in one transaction: the outbox gets
/// instance names in its keys, counters become counts, the indexes a store of an older Reach
/// may lack are built.
pub(super) fn from_first_layout(store: &Store) -> Result<()> {
    store.write(|tx| {
        let instance = store.instance().to_owned();
        for (k, v) in tx.txn.scan(OLD_OUTBOX, &KeyRange::all(), usize::MAX)? {
            let mut new = prefix(&instance);
            new.extend_from_slice(&k);
            tx.txn.put(OUTBOX, &new, v)?;
            tx.txn.remove(OLD_OUTBOX, &k);
        }
        // Counters: one count per window; the time index points at the new keys.
        tx.txn.remove_prefix(COUNTERS_DUE, b"")?;
        for (k, v) in tx.txn.scan(OLD_COUNTERS, &KeyRange::all(), usize::MAX)? {
            tx.txn.remove(OLD_COUNTERS, &k);
            let Ok(old) = serde_json::from_slice::<OldCounter>(&v) else {
                continue;
            };
            let mut new = k.clone();
            new.push(0);
            new.extend_from_slice(&old.period.to_be_bytes());
            new.extend_from_slice(&old.window.to_be_bytes());
            tx.txn.add(ABUSE_COUNTS, &new, i64::from(old.count))?;
            let window_end = (old.window + 1).saturating_mul(old.period.max(1));
            tx.txn
                .put(COUNTERS_DUE, &due_entry(window_end, &new), Vec::new())?;
        }
        for (old, new) in [
            (OLD_SMS_COUNTS, SMS_PER_DAY),
            (OLD_EMAIL_COUNTS, EMAIL_PER_DAY),
        ] {
            for (k, v) in tx.txn.scan(old, &KeyRange::all(), usize::MAX)? {
                tx.txn.remove(old, &k);
                if let Ok(count) = <[u8; 4]>::try_from(v.as_slice()) {
                    tx.txn.add(new, &k, i64::from(u32::from_be_bytes(count)))?;
                }
            }
        }
        // Pending forwards of the very first layout (one record per conversation).
        for (k, v) in tx.txn.scan(OLD_PENDING, &KeyRange::all(), usize::MAX)? {
            tx.txn.remove(OLD_PENDING, &k);
            let pending: Pending = decode(OLD_PENDING, &v)?;
            tx.put_pending(&owner_of(&k), &pending)?;
        }
        build_missing_indexes(tx)?;
        tx.txn
            .put(META, DATA_VERSION_KEY, DATA_VERSION.to_be_bytes().to_vec())?;
        Ok(())
    })
}

fn is_empty(tx: &mut Tx<'_>, tree: Tree) -> Result<bool> {
    Ok(tx.txn.scan(tree, &KeyRange::all(), 1)?.is_empty())
}

/// Indexes a store written by a Reach older than them may lack.
fn build_missing_indexes(tx: &mut Tx<'_>) -> Result<()> {
    if is_empty(tx, HELD_COUNTS)? {
        for (k, v) in tx.txn.scan(HELD, &KeyRange::all(), usize::MAX)? {
            let jid = owner_of(&k);
            let held: HeldMessage = decode(HELD, &v)?;
            tx.txn.add(HELD_COUNTS, jid.as_bytes(), 1)?;
            tx.txn.add(HELD_COUNTS, &key(&jid, &held.peer), 1)?;
        }
    }
    if is_empty(tx, SEEN_BY_TIME)? {
        for (id, at) in tx.txn.scan(SEEN, &KeyRange::all(), usize::MAX)? {
            let mut by_time = <[u8; 8]>::try_from(at.as_slice())
                .unwrap_or([0; 8])
                .to_vec();
            by_time.extend_from_slice(&id);
            tx.txn.put(SEEN_BY_TIME, &by_time, Vec::new())?;
        }
    }
    if is_empty(tx, PENDING_DUE)? {
        for (k, v) in tx.txn.scan(PENDING_HEADS, &KeyRange::all(), usize::MAX)? {
            let head: PendingHead = decode(PENDING_HEADS, &v)?;
            tx.txn
                .put(PENDING_DUE, &due_entry(head.due_at, &k), Vec::new())?;
        }
    }
    for queue in [EMAIL_QUEUE, SMS_QUEUE] {
        // Rebuilt whole: entries a crash of the first layout left without a job go too.
        tx.txn.remove_prefix(queue.due, b"")?;
        for (k, v) in tx.txn.scan(queue.jobs, &KeyRange::all(), usize::MAX)? {
            #[derive(Deserialize)]
            struct Due {
                next_attempt_at: u64,
            }
            if let Ok(due) = serde_json::from_slice::<Due>(&v) {
                tx.txn
                    .put(queue.due, &due_entry(due.next_attempt_at, &k), Vec::new())?;
            }
        }
    }
    if is_empty(tx, RECHECKS_DUE)? {
        for (k, v) in tx
            .txn
            .scan(BUDDY_ALERT_RECHECKS, &KeyRange::all(), usize::MAX)?
        {
            if let Ok((due_at, ..)) =
                serde_json::from_slice::<(u64, String, TerminalKind, String)>(&v)
            {
                tx.txn
                    .put(RECHECKS_DUE, &due_entry(due_at, &k), Vec::new())?;
            }
        }
    }
    tx.txn.remove_prefix(VERIFICATIONS_BY_ADDRESS, b"")?;
    for (k, v) in tx.txn.scan(VERIFICATIONS, &KeyRange::all(), usize::MAX)? {
        let Ok(v) = decode::<Verification>(VERIFICATIONS, &v) else {
            continue;
        };
        tx.txn.put(
            VERIFICATIONS_BY_ADDRESS,
            &verification_index_key(v.kind, &v.address, &owner_of(&k)),
            Vec::new(),
        )?;
    }
    Ok(())
}

/// What `reach migrate` copied.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Copied {
    /// Records and counts per tree, in the order copied.
    pub trees: Vec<(&'static str, u64)>,
}

impl Copied {
    pub fn total(&self) -> u64 {
        self.trees.iter().map(|(_, n)| n).sum()
    }
}

/// How many records a copy moves per transaction.
const CHUNK: usize = 1000;

/// Copies everything `from` holds into `to`, which must be empty (a new database), then checks
/// that every tree holds as many records on both sides. Reach must not be running on either
/// (sled refuses a second process; for PostgreSQL it is the admin's part).
pub fn copy(from: &Store, to: &Store, mut progress: impl FnMut(&str, u64)) -> Result<Copied> {
    for tree in ALL_TREES.iter().filter(|t| **t != META) {
        if to.inner.engine.len(*tree)? > 0 {
            return Err(StoreError::InUse(format!(
                "the destination already holds data (tree {}); copy into a new, empty database",
                tree.name
            )));
        }
    }
    let mut copied = Copied::default();
    for tree in ALL_TREES.iter().filter(|t| **t != META) {
        let mut range = KeyRange::all();
        let mut count = 0u64;
        loop {
            let chunk = from.read(|tx| tx.txn.scan(*tree, &range, CHUNK))?;
            let Some((last, _)) = chunk.last() else { break };
            range.start = last.clone();
            range.start.push(0);
            let n = chunk.len();
            to.write(|tx| {
                for (k, v) in &chunk {
                    if tree.counts {
                        let value = <[u8; 8]>::try_from(v.as_slice()).map_or(0, i64::from_be_bytes);
                        tx.txn.add(*tree, k, value)?;
                    } else {
                        tx.txn.put(*tree, k, v.clone())?;
                    }
                }
                Ok(())
            })?;
            count += n as u64;
            progress(tree.name, count);
            if n < CHUNK {
                break;
            }
        }
        copied.trees.push((tree.name, count));
    }
    // Ids handed out from now on sort after every copied one (held messages, queues).
    let floor = from.begin()?.txn.next_id()?;
    to.inner.engine.ensure_ids_above(floor)?;
    for (name, count) in &copied.trees {
        let tree = ALL_TREES
            .iter()
            .find(|t| t.name == *name)
            .copied()
            .unwrap_or(Tree::records("meta"));
        let found = to.inner.engine.len(tree)?;
        if found != *count {
            return Err(StoreError::Corrupt(format!(
                "after the copy, {name} holds {found} records, the source {count}"
            )));
        }
    }
    Ok(copied)
}
