//! What a storage engine gives the store: ordered key-value trees read and written inside
//! transactions, plus the few guarantees that several Reach instances sharing one store need.
//!
//! The store's domain operations (`super::Tx`) are written once, over [`Txn`]; an engine only
//! provides a [`Backend`] (one open transaction) through its [`Engine`]. Two engines exist:
//! sled (`super::sled_engine`, one process) and PostgreSQL (`super::postgres`, several).
//!
//! [`Txn`] keeps the transaction's own writes in memory until commit (read-your-writes, and
//! a savepoint per event that costs nothing to roll back); the engine applies them all at once
//! on [`Backend::commit`]: one sled transaction plus a flush, or one SQL `COMMIT`.
//!
//! The guarantees, each named by the method that gives it:
//! - *take a user for update* ([`Txn::lock`] with `wait`): no other transaction holds the same
//!   name until this one ends; a second lock taken while others are held never waits
//!   ([`StoreError::Busy`] instead), so two instances cannot deadlock on a batch each;
//! - *claim due items* ([`Txn::try_lock`], [`Txn::claim`]): what another open transaction is
//!   working on is skipped, not waited for, so each due item is taken by one instance;
//! - *atomic counters* ([`Txn::add`]): increments are applied as increments at commit, so none
//!   is lost when two instances count at once;
//! - *first sight* and *unique keys* ([`Txn::insert_new`]): if another transaction committed
//!   the same key first, this commit fails with [`StoreError::Conflict`] and the caller runs the
//!   transaction again, where the key is then seen.

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::ops::Bound;

pub use crate::core::model::StoreError;

pub type Result<T> = std::result::Result<T, StoreError>;

/// A named, ordered key space. Counting trees hold numbers changed by [`Txn::add`] only.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Tree {
    pub name: &'static str,
    pub counts: bool,
}

impl Tree {
    pub const fn records(name: &'static str) -> Tree {
        Tree {
            name,
            counts: false,
        }
    }

    pub const fn counts(name: &'static str) -> Tree {
        Tree { name, counts: true }
    }
}

/// Keys from `start` (included) to `end` (excluded; `None`: to the end of the tree).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyRange {
    pub start: Vec<u8>,
    pub end: Option<Vec<u8>>,
}

impl KeyRange {
    /// Every key that starts with `prefix`.
    pub fn prefix(prefix: &[u8]) -> KeyRange {
        KeyRange {
            start: prefix.to_vec(),
            end: prefix_end(prefix),
        }
    }

    /// Every key of the tree.
    pub fn all() -> KeyRange {
        KeyRange {
            start: Vec::new(),
            end: None,
        }
    }

    /// Keys below `end`.
    pub fn below(end: &[u8]) -> KeyRange {
        KeyRange {
            start: Vec::new(),
            end: Some(end.to_vec()),
        }
    }

    #[cfg(test)]
    pub fn contains(&self, key: &[u8]) -> bool {
        key >= self.start.as_slice() && self.end.as_deref().is_none_or(|end| key < end)
    }
}

/// The first key after every key that starts with `prefix` (`None`: no such key).
pub fn prefix_end(prefix: &[u8]) -> Option<Vec<u8>> {
    let mut end = prefix.to_vec();
    while let Some(last) = end.pop() {
        if last < 0xff {
            end.push(last + 1);
            return Some(end);
        }
    }
    None
}

/// One write of a transaction, as the engine applies it at commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Write {
    /// Set the record.
    Put(Vec<u8>),
    /// Set the record, which must not exist yet: if another transaction committed it first,
    /// the commit fails with [`StoreError::Conflict`].
    Insert(Vec<u8>),
    /// Delete the record or the count.
    Remove,
    /// Add to a count (counting trees only); a count that comes to 0 or below is deleted.
    Add(i64),
    /// Set a count (counting trees only): what an [`Write::Add`] after a [`Write::Remove`] is.
    SetCount(i64),
}

/// What a commit carries: every write in key order, and the channels to notify.
#[derive(Debug, Default)]
pub struct Commit {
    pub writes: Vec<(Tree, Vec<u8>, Write)>,
    /// Channels other instances listen on ([`Engine::listen`]), told once the commit is done.
    pub notices: BTreeSet<&'static str>,
    /// False: the commit may reach the disk a moment later (what it records can be lost in a
    /// crash without harm, e.g. a claim).
    pub durable: bool,
}

/// A storage engine: opens transactions, and tells instances apart.
pub trait Engine: Send + Sync + 'static {
    /// "sled" or "postgres", for logs and errors.
    fn name(&self) -> &'static str;
    /// A new transaction.
    fn begin(&self) -> Result<Box<dyn Backend + '_>>;
    /// Marks this process as the live holder of instance `name` for as long as the engine is
    /// open. False if another live process holds it.
    fn hold_instance(&self, name: &str) -> Result<bool>;
    /// Whether a live process holds instance `name` (never asked of one's own name).
    fn instance_alive(&self, name: &str) -> Result<bool>;
    /// Calls `wake` with the channel's name whenever a commit (of any instance) notifies it.
    /// Engines without other instances call it for their own commits only (the store does).
    fn listen(&self, wake: Box<dyn Fn(&str) + Send + Sync>) -> Result<()>;
    /// How many records a tree holds (for stats; may be approximate under concurrent writes).
    fn len(&self, tree: Tree) -> Result<u64>;
    /// Makes every id handed out from now on greater than `floor` (after a copy from another
    /// store, whose ids must keep sorting first).
    fn ensure_ids_above(&self, floor: u64) -> Result<()>;
}

/// One open transaction of an engine: reads of what is committed, the guarantees, and the
/// commit of everything [`Txn`] buffered. Dropped without commit, it rolls back.
pub trait Backend {
    /// A record (never a count).
    fn get(&mut self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>>;
    /// A count (0 when absent).
    fn count(&mut self, tree: Tree, key: &[u8]) -> Result<i64>;
    /// Up to `limit` records (or counts, as 8-byte big-endian values) in key order.
    fn scan(
        &mut self,
        tree: Tree,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// Takes the lock `name` until the transaction ends. With `wait`, waits for another holder
    /// to finish; without, returns false at once if another transaction holds it.
    fn lock(&mut self, name: &str, wait: bool) -> Result<bool>;
    /// Up to `limit` records in the range, in key order, leaving out those another open
    /// transaction claimed; the ones returned are this transaction's until it ends.
    fn claim(
        &mut self,
        tree: Tree,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>>;
    /// A new id, greater than every id handed out before (by any instance) and never reused.
    fn next_id(&mut self) -> Result<u64>;
    /// `n` new ids at once, in increasing order, each as [`Backend::next_id`] gives them.
    fn next_ids(&mut self, n: usize) -> Result<Vec<u64>> {
        (0..n).map(|_| self.next_id()).collect()
    }
    /// Applies the writes atomically (all or none) and ends the transaction.
    fn commit(self: Box<Self>, commit: Commit) -> Result<()>;
}

/// How many ids [`Txn::next_id`] takes from the engine at once.
const IDS_AHEAD: usize = 16;

/// A transaction: a [`Backend`] and the writes made so far, applied at [`Txn::commit`].
pub struct Txn<'e> {
    backend: Box<dyn Backend + 'e>,
    writes: BTreeMap<Tree, BTreeMap<Vec<u8>, Write>>,
    /// What each write replaced, newest last, for rolling back to the savepoint.
    undo: Vec<(Tree, Vec<u8>, Option<Write>)>,
    savepoint: Option<Savepoint>,
    locks: HashSet<String>,
    notices: BTreeSet<&'static str>,
    /// What the engine answered to point reads (see [`Txn::base_get`]): a batch reads a
    /// user's records several times.
    reads: HashMap<(Tree, Vec<u8>), Option<Vec<u8>>>,
    counts: HashMap<(Tree, Vec<u8>), i64>,
    /// Ids taken from the engine ahead, in increasing order (see [`Txn::next_id`]).
    ids: std::collections::VecDeque<u64>,
}

struct Savepoint {
    undo_len: usize,
    notices: BTreeSet<&'static str>,
}

impl<'e> Txn<'e> {
    pub fn new(backend: Box<dyn Backend + 'e>) -> Txn<'e> {
        Txn {
            backend,
            writes: BTreeMap::new(),
            undo: Vec::new(),
            savepoint: None,
            locks: HashSet::new(),
            notices: BTreeSet::new(),
            reads: HashMap::new(),
            counts: HashMap::new(),
            ids: std::collections::VecDeque::new(),
        }
    }

    /// A record as the engine has it, read once per transaction. What a transaction reads of a
    /// user is under that user's lock, taken before (or with) the first read, so another
    /// instance cannot change it until the commit; the rest it reads (aliases, handles, ids
    /// taken) another instance rarely changes, and where it matters the commit checks (keys
    /// that must be new). The answers are forgotten whenever a lock or a claim is asked of the
    /// engine: what it waited for may have changed things.
    fn base_get(&mut self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        let slot = (tree, key.to_vec());
        if let Some(found) = self.reads.get(&slot) {
            return Ok(found.clone());
        }
        let found = self.backend.get(tree, key)?;
        self.reads.insert(slot, found.clone());
        Ok(found)
    }

    /// A count as the engine has it, read once per transaction (see [`Txn::base_get`]).
    fn base_count(&mut self, tree: Tree, key: &[u8]) -> Result<i64> {
        let slot = (tree, key.to_vec());
        if let Some(n) = self.counts.get(&slot) {
            return Ok(*n);
        }
        let n = self.backend.count(tree, key)?;
        self.counts.insert(slot, n);
        Ok(n)
    }

    /// Forgets what the engine answered: the next reads ask it again.
    fn forget_reads(&mut self) {
        self.reads.clear();
        self.counts.clear();
        // Ids taken before a lock may be smaller than those its last holder used.
        self.ids.clear();
    }

    fn record(&mut self, tree: Tree, key: &[u8], write: Write) {
        let previous = self
            .writes
            .entry(tree)
            .or_default()
            .insert(key.to_vec(), write);
        if self.savepoint.is_some() {
            self.undo.push((tree, key.to_vec(), previous));
        }
    }

    fn written(&self, tree: Tree, key: &[u8]) -> Option<&Write> {
        self.writes.get(&tree).and_then(|w| w.get(key))
    }

    pub fn get(&mut self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.written(tree, key) {
            Some(Write::Put(v) | Write::Insert(v)) => Ok(Some(v.clone())),
            Some(Write::Remove) => Ok(None),
            Some(Write::Add(_) | Write::SetCount(_)) => Err(StoreError::Corrupt(format!(
                "{}: a count read as a record",
                tree.name
            ))),
            None => self.base_get(tree, key),
        }
    }

    pub fn contains(&mut self, tree: Tree, key: &[u8]) -> Result<bool> {
        Ok(self.get(tree, key)?.is_some())
    }

    pub fn put(&mut self, tree: Tree, key: &[u8], value: Vec<u8>) -> Result<()> {
        debug_assert!(!tree.counts, "{}: put on a counting tree", tree.name);
        check_key(tree, key)?;
        self.record(tree, key, Write::Put(value));
        Ok(())
    }

    /// Removes a record or a count.
    pub fn remove(&mut self, tree: Tree, key: &[u8]) {
        self.record(tree, key, Write::Remove);
    }

    /// Sets the record if there is none; false (and nothing written) if there is. Another
    /// transaction committing the same key first makes this one's commit fail with
    /// [`StoreError::Conflict`] (see the module comment).
    pub fn insert_new(&mut self, tree: Tree, key: &[u8], value: Vec<u8>) -> Result<bool> {
        check_key(tree, key)?;
        let write = match self.written(tree, key) {
            Some(Write::Put(_) | Write::Insert(_)) => return Ok(false),
            // Removed by this transaction: a plain write if the engine has it, else still a
            // key that must be new at commit.
            Some(Write::Remove) => {
                if self.base_get(tree, key)?.is_some() {
                    Write::Put(value)
                } else {
                    Write::Insert(value)
                }
            }
            Some(_) => return Err(StoreError::Corrupt(format!("{}: not a record", tree.name))),
            None => {
                if self.base_get(tree, key)?.is_some() {
                    return Ok(false);
                }
                Write::Insert(value)
            }
        };
        self.record(tree, key, write);
        Ok(true)
    }

    /// The count under `key` (0 when absent).
    pub fn count(&mut self, tree: Tree, key: &[u8]) -> Result<i64> {
        debug_assert!(tree.counts, "{}: count on a record tree", tree.name);
        Ok(match self.written(tree, key) {
            Some(Write::SetCount(n)) => *n,
            Some(Write::Remove) => 0,
            Some(Write::Add(delta)) => {
                let delta = *delta;
                self.base_count(tree, key)?.saturating_add(delta).max(0)
            }
            _ => self.base_count(tree, key)?,
        })
    }

    /// Adds `delta` to a count and returns the new count as this transaction sees it (never
    /// below 0). The increment itself is applied at commit, so none is lost to another
    /// instance counting at the same time (the value returned may then be one behind theirs).
    pub fn add(&mut self, tree: Tree, key: &[u8], delta: i64) -> Result<i64> {
        debug_assert!(tree.counts, "{}: add on a record tree", tree.name);
        check_key(tree, key)?;
        let (write, value) = match self.written(tree, key) {
            Some(Write::SetCount(n)) => {
                let n = n.saturating_add(delta).max(0);
                (Write::SetCount(n), n)
            }
            Some(Write::Remove) => {
                let n = delta.max(0);
                (Write::SetCount(n), n)
            }
            Some(Write::Add(before)) => {
                let before = *before;
                let base = self.base_count(tree, key)?;
                let total = before.saturating_add(delta);
                (Write::Add(total), base.saturating_add(total).max(0))
            }
            _ => {
                let base = self.base_count(tree, key)?;
                (Write::Add(delta), base.saturating_add(delta).max(0))
            }
        };
        self.record(tree, key, write);
        Ok(value)
    }

    /// Up to `limit` records (or counts as 8-byte big-endian values) in the range, in key
    /// order, this transaction's own writes included.
    pub fn scan(
        &mut self,
        tree: Tree,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let mine: Vec<(Vec<u8>, Write)> = match self.writes.get(&tree) {
            Some(writes) => writes
                .range::<[u8], _>(bounds(range))
                .map(|(k, w)| (k.clone(), w.clone()))
                .collect(),
            None => Vec::new(),
        };
        if mine.is_empty() {
            return self.backend.scan(tree, range, limit);
        }
        // What this transaction removed may hide engine records: read that many more.
        let hidden = mine.len();
        let base = self
            .backend
            .scan(tree, range, limit.saturating_add(hidden))?;
        let mut merged: BTreeMap<Vec<u8>, Vec<u8>> = base.into_iter().collect();
        let complete = merged.len() < limit.saturating_add(hidden);
        let last_read = merged.keys().next_back().cloned();
        for (k, w) in mine {
            // Beyond what the engine returned, the merge would not know what lies between.
            if !complete && last_read.as_ref().is_some_and(|last| &k > last) {
                continue;
            }
            match w {
                Write::Put(v) | Write::Insert(v) => {
                    merged.insert(k, v);
                }
                Write::Remove => {
                    merged.remove(&k);
                }
                Write::SetCount(n) => {
                    if n > 0 {
                        merged.insert(k, (n as u64).to_be_bytes().to_vec());
                    } else {
                        merged.remove(&k);
                    }
                }
                Write::Add(delta) => {
                    let base = merged
                        .get(&k)
                        .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                        .map_or(0, i64::from_be_bytes);
                    let n = base.saturating_add(delta);
                    if n > 0 {
                        merged.insert(k, (n as u64).to_be_bytes().to_vec());
                    } else {
                        merged.remove(&k);
                    }
                }
            }
        }
        Ok(merged.into_iter().take(limit).collect())
    }

    /// Every record whose key starts with `prefix`.
    pub fn scan_prefix(&mut self, tree: Tree, prefix: &[u8]) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.scan(tree, &KeyRange::prefix(prefix), usize::MAX)
    }

    /// Removes every record (or count) whose key starts with `prefix`; returns how many.
    pub fn remove_prefix(&mut self, tree: Tree, prefix: &[u8]) -> Result<usize> {
        let keys: Vec<Vec<u8>> = self
            .scan_prefix(tree, prefix)?
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        for k in &keys {
            self.remove(tree, k);
        }
        Ok(keys.len())
    }

    /// Takes the lock `name` (e.g. a user, for update) until the transaction ends. It waits for
    /// another holder only while this transaction holds no other lock (or `wait_always`);
    /// otherwise a lock held elsewhere is [`StoreError::Busy`]: the caller commits what it has
    /// and takes this one in a new transaction. So two instances never wait on each other in
    /// a circle for more than the rare event that needs two locks.
    pub fn lock(&mut self, name: &str) -> Result<()> {
        if self.locks.contains(name) {
            return Ok(());
        }
        let wait = self.locks.is_empty();
        self.forget_reads();
        if self.backend.lock(name, wait)? {
            self.locks.insert(name.to_owned());
            Ok(())
        } else if wait {
            // An engine that gave up waiting (a deadlock broken by the database).
            Err(StoreError::Conflict)
        } else {
            Err(StoreError::Busy)
        }
    }

    /// Takes the lock `name` if nobody else holds it; false (at once) if another transaction
    /// does. For claiming work: what another instance is doing is skipped.
    pub fn try_lock(&mut self, name: &str) -> Result<bool> {
        if self.locks.contains(name) {
            return Ok(true);
        }
        self.forget_reads();
        let taken = self.backend.lock(name, false)?;
        if taken {
            self.locks.insert(name.to_owned());
        }
        Ok(taken)
    }

    /// Claims up to `limit` records in the range that no other open transaction claimed (see
    /// [`Backend::claim`]), leaving out what this transaction removed.
    pub fn claim(
        &mut self,
        tree: Tree,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.forget_reads();
        let claimed = self.backend.claim(tree, range, limit)?;
        Ok(claimed
            .into_iter()
            .filter_map(|(k, v)| match self.written(tree, &k) {
                Some(Write::Remove) => None,
                Some(Write::Put(mine) | Write::Insert(mine)) => Some((k, mine.clone())),
                _ => Some((k, v)),
            })
            .collect())
    }

    /// A new id, greater than every id the engine handed out before the transaction last took
    /// a lock (so, for what a user's lock guards, greater than every id its previous holders
    /// used: a user's held messages and pending items keep their order). Taken from the engine
    /// [`IDS_AHEAD`] at a time; the ids left when a lock is taken are dropped (gaps are fine).
    pub fn next_id(&mut self) -> Result<u64> {
        if self.ids.is_empty() {
            self.ids.extend(self.backend.next_ids(IDS_AHEAD)?);
        }
        self.ids
            .pop_front()
            .ok_or_else(|| StoreError::Engine("the engine gave no id".to_owned()))
    }

    /// Tells the instances listening on `channel` once this transaction commits.
    pub fn notify(&mut self, channel: &'static str) {
        self.notices.insert(channel);
    }

    /// Marks the point [`Txn::rollback_to_savepoint`] returns to (one at a time: a new one
    /// replaces the last).
    pub fn savepoint(&mut self) {
        self.undo.clear();
        self.savepoint = Some(Savepoint {
            undo_len: 0,
            notices: self.notices.clone(),
        });
    }

    /// Undoes every write since the savepoint (locks taken since stay taken).
    pub fn rollback_to_savepoint(&mut self) {
        let Some(point) = self.savepoint.as_ref() else {
            return;
        };
        let keep = point.undo_len;
        self.notices = point.notices.clone();
        while self.undo.len() > keep {
            let Some((tree, key, previous)) = self.undo.pop() else {
                break;
            };
            let writes = self.writes.entry(tree).or_default();
            match previous {
                Some(write) => {
                    writes.insert(key, write);
                }
                None => {
                    writes.remove(&key);
                }
            }
        }
    }

    /// Applies every write at once. `durable`: only once it is on disk (what is acknowledged
    /// waits for this); otherwise it may reach the disk a moment later.
    pub fn commit(self, durable: bool) -> Result<()> {
        let Txn {
            backend,
            writes,
            notices,
            ..
        } = self;
        let writes = writes
            .into_iter()
            .flat_map(|(t, w)| w.into_iter().map(move |(k, w)| (t, k, w)))
            .collect();
        backend.commit(Commit {
            writes,
            notices,
            durable,
        })
    }
}

/// The longest key a record or count may have. PostgreSQL's index of the keys takes at most
/// about 2.7 KB per entry; the store's keys are far shorter (addresses of bounded length,
/// hashes of what is not bounded), so a longer one is a bug, refused before it reaches the
/// engine (where it would fail the whole commit).
pub const MAX_KEY_BYTES: usize = 2048;

fn check_key(tree: Tree, key: &[u8]) -> Result<()> {
    if key.len() > MAX_KEY_BYTES {
        return Err(StoreError::KeyTooLong {
            tree: tree.name,
            bytes: key.len(),
        });
    }
    Ok(())
}

/// `range` as bounds over byte keys.
fn bounds(range: &KeyRange) -> (Bound<&[u8]>, Bound<&[u8]>) {
    (
        Bound::Included(range.start.as_slice()),
        match &range.end {
            Some(end) => Bound::Excluded(end.as_slice()),
            None => Bound::Unbounded,
        },
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::BTreeMap;

    /// An engine transaction over a map: what is "committed".
    struct MapBackend {
        committed: BTreeMap<(Tree, Vec<u8>), Vec<u8>>,
        applied: std::rc::Rc<std::cell::RefCell<Vec<(Tree, Vec<u8>, Write)>>>,
    }

    impl Backend for MapBackend {
        fn get(&mut self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
            Ok(self.committed.get(&(tree, key.to_vec())).cloned())
        }
        fn count(&mut self, tree: Tree, key: &[u8]) -> Result<i64> {
            Ok(self
                .committed
                .get(&(tree, key.to_vec()))
                .and_then(|v| <[u8; 8]>::try_from(v.as_slice()).ok())
                .map_or(0, i64::from_be_bytes))
        }
        fn scan(
            &mut self,
            tree: Tree,
            range: &KeyRange,
            limit: usize,
        ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
            Ok(self
                .committed
                .iter()
                .filter(|((t, k), _)| *t == tree && range.contains(k))
                .take(limit)
                .map(|((_, k), v)| (k.clone(), v.clone()))
                .collect())
        }
        fn lock(&mut self, _name: &str, _wait: bool) -> Result<bool> {
            Ok(true)
        }
        fn claim(
            &mut self,
            tree: Tree,
            range: &KeyRange,
            limit: usize,
        ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
            self.scan(tree, range, limit)
        }
        fn next_id(&mut self) -> Result<u64> {
            Ok(1)
        }
        fn commit(self: Box<Self>, commit: Commit) -> Result<()> {
            self.applied.borrow_mut().extend(commit.writes);
            Ok(())
        }
    }

    const T: Tree = Tree::records("t");
    const C: Tree = Tree::counts("c");

    fn txn(
        committed: &[(&str, &str)],
    ) -> (
        Txn<'static>,
        std::rc::Rc<std::cell::RefCell<Vec<(Tree, Vec<u8>, Write)>>>,
    ) {
        let applied = std::rc::Rc::new(std::cell::RefCell::new(Vec::new()));
        let backend = MapBackend {
            committed: committed
                .iter()
                .map(|(k, v)| ((T, k.as_bytes().to_vec()), v.as_bytes().to_vec()))
                .collect(),
            applied: applied.clone(),
        };
        (Txn::new(Box::new(backend)), applied)
    }

    fn keys(found: &[(Vec<u8>, Vec<u8>)]) -> Vec<String> {
        found
            .iter()
            .map(|(k, _)| String::from_utf8_lossy(k).into_owned())
            .collect()
    }

    #[test]
    fn a_transaction_reads_its_own_writes_over_what_is_committed() {
        let (mut t, _) = txn(&[("a", "1"), ("b", "2"), ("c", "3")]);
        t.put(T, b"b", b"20".to_vec()).unwrap();
        t.remove(T, b"c");
        t.put(T, b"d", b"4".to_vec()).unwrap();
        assert_eq!(t.get(T, b"b").unwrap(), Some(b"20".to_vec()));
        assert_eq!(t.get(T, b"c").unwrap(), None);
        let all = t.scan(T, &KeyRange::all(), usize::MAX).unwrap();
        assert_eq!(keys(&all), vec!["a", "b", "d"]);
        assert_eq!(all[1].1, b"20");
    }

    #[test]
    fn a_limited_scan_is_not_shortened_by_removals_nor_lengthened_past_the_limit() {
        let (mut t, _) = txn(&[("a", ""), ("b", ""), ("c", ""), ("d", ""), ("e", "")]);
        t.remove(T, b"a");
        t.remove(T, b"b");
        assert_eq!(
            keys(&t.scan(T, &KeyRange::all(), 2).unwrap()),
            vec!["c", "d"]
        );
        t.put(T, b"z", Vec::new()).unwrap();
        // "z" lies past what the engine returned for a limit of 2 (+3 hidden): still in order.
        assert_eq!(
            keys(&t.scan(T, &KeyRange::all(), 10).unwrap()),
            vec!["c", "d", "e", "z"]
        );
        assert_eq!(
            keys(&t.scan(T, &KeyRange::prefix(b"d"), 10).unwrap()),
            vec!["d"]
        );
    }

    #[test]
    fn rolling_back_to_the_savepoint_undoes_only_what_came_after_it() {
        let (mut t, applied) = txn(&[("a", "1")]);
        t.put(T, b"kept", b"k".to_vec()).unwrap();
        t.savepoint();
        t.put(T, b"kept", b"changed".to_vec()).unwrap();
        t.remove(T, b"a");
        t.put(T, b"new", b"n".to_vec()).unwrap();
        assert_eq!(t.add(C, b"n", 3).unwrap(), 3);
        t.rollback_to_savepoint();
        assert_eq!(t.get(T, b"kept").unwrap(), Some(b"k".to_vec()));
        assert_eq!(t.get(T, b"a").unwrap(), Some(b"1".to_vec()));
        assert_eq!(t.get(T, b"new").unwrap(), None);
        assert_eq!(t.count(C, b"n").unwrap(), 0);
        t.commit(true).unwrap();
        assert_eq!(
            *applied.borrow(),
            vec![(T, b"kept".to_vec(), Write::Put(b"k".to_vec()))]
        );
    }

    #[test]
    fn counts_are_committed_as_increments_and_after_a_removal_as_a_value() {
        let (mut t, applied) = txn(&[]);
        assert_eq!(t.add(C, b"x", 2).unwrap(), 2);
        assert_eq!(t.add(C, b"x", 1).unwrap(), 3);
        t.remove(C, b"y");
        assert_eq!(t.add(C, b"y", 5).unwrap(), 5);
        assert_eq!(t.add(C, b"z", -4).unwrap(), 0, "never below zero");
        t.commit(true).unwrap();
        assert_eq!(
            *applied.borrow(),
            vec![
                (C, b"x".to_vec(), Write::Add(3)),
                (C, b"y".to_vec(), Write::SetCount(5)),
                (C, b"z".to_vec(), Write::Add(-4)),
            ]
        );
    }

    #[test]
    fn a_new_key_is_inserted_once_and_marked_to_be_new_at_commit() {
        let (mut t, applied) = txn(&[("seen", "")]);
        assert!(!t.insert_new(T, b"seen", Vec::new()).unwrap());
        assert!(t.insert_new(T, b"fresh", b"1".to_vec()).unwrap());
        assert!(!t.insert_new(T, b"fresh", b"2".to_vec()).unwrap());
        t.commit(true).unwrap();
        assert_eq!(
            *applied.borrow(),
            vec![(T, b"fresh".to_vec(), Write::Insert(b"1".to_vec()))]
        );
    }

    #[test]
    fn a_key_too_long_for_an_engine_is_refused_before_it_reaches_one() {
        let (mut t, applied) = txn(&[]);
        let long = vec![b'x'; MAX_KEY_BYTES + 1];
        assert!(matches!(
            t.put(T, &long, Vec::new()),
            Err(StoreError::KeyTooLong { .. })
        ));
        assert!(t.insert_new(T, &long, Vec::new()).is_err());
        assert!(t.add(C, &long, 1).is_err());
        t.put(T, &long[..MAX_KEY_BYTES], Vec::new()).unwrap();
        t.commit(true).unwrap();
        assert_eq!(applied.borrow().len(), 1);
    }

    #[test]
    fn prefix_ends_skip_trailing_ff_bytes() {
        assert_eq!(prefix_end(b"ab"), Some(b"ac".to_vec()));
        assert_eq!(prefix_end(&[b'a', 0xff]), Some(b"b".to_vec()));
        assert_eq!(prefix_end(&[0xff, 0xff]), None);
        assert_eq!(prefix_end(b""), None);
    }
}
