//! The embedded engine: sled, one process. The only file that knows sled.
//!
//! A transaction reads what is committed straight from sled and applies its writes at commit in
//! one sled transaction over every tree it touched, so a commit lands whole or not at all; a
//! durable commit then flushes (one fsync for the whole batch). Locks and claims are kept in
//! this process (there is no other: sled holds a file lock), so the guarantees hold between the
//! threads of one Reach (the batch, the senders, the link) exactly as between instances on
//! PostgreSQL.

use std::collections::HashMap;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::Duration;

use sled::transaction::{ConflictableTransactionError, TransactionError};
use sled::Transactional;

use super::engine::{Backend, Commit, Engine, KeyRange, Result, Tree, Write};
use super::StoreError;

/// sled's page cache. sled's default (1 GiB) lets the cache, not the data Reach uses, decide the
/// resident size; 32 MiB holds the hot records (users, sessions of active conversations, queues)
/// of a large installation (BENCHMARKS.md, scale).
const CACHE_BYTES: u64 = 32 * 1024 * 1024;
/// The longest a transaction waits for a lock another thread holds; then it gives up as a
/// conflict (never reached in practice: only the batch thread takes user locks).
const LOCK_WAIT: Duration = Duration::from_secs(30);
/// Where the floor of the ids is kept (sled's default tree).
const ID_FLOOR_KEY: &[u8] = b"id_floor";
/// The instance name of the one process an embedded store has.
pub const INSTANCE: &str = "local";

impl From<sled::Error> for StoreError {
    fn from(e: sled::Error) -> Self {
        match e {
            sled::Error::Io(io) if io.kind() == std::io::ErrorKind::WouldBlock => {
                StoreError::InUse(io.to_string())
            }
            sled::Error::Io(io) if io.to_string().contains("lock") => {
                StoreError::InUse(io.to_string())
            }
            sled::Error::Corruption { .. } => StoreError::Corrupt(e.to_string()),
            other => StoreError::Engine(other.to_string()),
        }
    }
}

/// The sled engine.
pub struct Sled {
    db: sled::Db,
    /// Added to sled's ids (see [`Engine::ensure_ids_above`]).
    id_floor: std::sync::atomic::AtomicU64,
    trees: Mutex<HashMap<Tree, sled::Tree>>,
    locks: Arc<Locks>,
}

/// Who holds which lock and which claimed record, by transaction number.
#[derive(Default)]
struct Locks {
    held: Mutex<LockTable>,
    released: Condvar,
}

#[derive(Default)]
struct LockTable {
    next_txn: u64,
    names: HashMap<String, u64>,
    claims: HashMap<(Tree, Vec<u8>), u64>,
}

impl Locks {
    fn table(&self) -> MutexGuard<'_, LockTable> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn release(&self, txn: u64) {
        let mut table = self.table();
        table.names.retain(|_, holder| *holder != txn);
        table.claims.retain(|_, holder| *holder != txn);
        drop(table);
        self.released.notify_all();
    }
}

impl Sled {
    /// Opens (or creates) the store in `path`.
    pub fn open(path: &std::path::Path) -> Result<Sled> {
        let db = sled::Config::new()
            .path(path)
            .cache_capacity(CACHE_BYTES)
            .open()?;
        Sled::from_db(db)
    }

    /// A store that lives in memory only, for tests.
    pub fn temporary() -> Result<Sled> {
        Sled::from_db(sled::Config::new().temporary(true).open()?)
    }

    fn from_db(db: sled::Db) -> Result<Sled> {
        let floor = db
            .get(ID_FLOOR_KEY)?
            .and_then(|v| <[u8; 8]>::try_from(v.as_ref()).ok())
            .map_or(0, u64::from_be_bytes);
        Ok(Sled {
            id_floor: std::sync::atomic::AtomicU64::new(floor),
            db,
            trees: Mutex::new(HashMap::new()),
            locks: Arc::new(Locks::default()),
        })
    }

    /// The sled tree behind `tree` (counting trees have names of their own in sled).
    fn tree(&self, tree: Tree) -> Result<sled::Tree> {
        let mut trees = self.trees.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(t) = trees.get(&tree) {
            return Ok(t.clone());
        }
        let opened = self.db.open_tree(tree.name)?;
        trees.insert(tree, opened.clone());
        Ok(opened)
    }

    /// A value kept in sled's default tree (the first layout kept its schema version there).
    pub fn legacy_value(&self, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.db.get(key)?.map(|v| v.to_vec()))
    }
}

impl Engine for Sled {
    fn name(&self) -> &'static str {
        "sled"
    }

    fn begin(&self) -> Result<Box<dyn Backend + '_>> {
        let txn = {
            let mut table = self.locks.table();
            table.next_txn += 1;
            table.next_txn
        };
        Ok(Box::new(SledTxn { engine: self, txn }))
    }

    fn hold_instance(&self, name: &str) -> Result<bool> {
        // sled's file lock already makes this process the only one.
        Ok(name == INSTANCE)
    }

    fn instance_alive(&self, name: &str) -> Result<bool> {
        Ok(name == INSTANCE)
    }

    fn listen(&self, _wake: Box<dyn Fn(&str) + Send + Sync>) -> Result<()> {
        // No other process commits: the store wakes its own listeners after each commit.
        Ok(())
    }

    fn len(&self, tree: Tree) -> Result<u64> {
        Ok(self.tree(tree)?.len() as u64)
    }

    fn ensure_ids_above(&self, floor: u64) -> Result<()> {
        use std::sync::atomic::Ordering;
        let next = self.db.generate_id()?;
        let current = self.id_floor.load(Ordering::SeqCst);
        if next.saturating_add(current) <= floor {
            let raised = floor.saturating_add(1);
            self.db.insert(ID_FLOOR_KEY, &raised.to_be_bytes())?;
            self.db.flush()?;
            self.id_floor.store(raised, Ordering::SeqCst);
        }
        Ok(())
    }
}

/// One transaction on the sled engine.
struct SledTxn<'e> {
    engine: &'e Sled,
    txn: u64,
}

impl Drop for SledTxn<'_> {
    fn drop(&mut self) {
        self.engine.locks.release(self.txn);
    }
}

fn count_of(bytes: &[u8]) -> i64 {
    <[u8; 8]>::try_from(bytes).map_or(0, i64::from_be_bytes)
}

fn sled_range(tree: &sled::Tree, range: &KeyRange) -> sled::Iter {
    match &range.end {
        Some(end) => tree.range(range.start.clone()..end.clone()),
        None => tree.range(range.start.clone()..),
    }
}

impl Backend for SledTxn<'_> {
    fn get(&mut self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        Ok(self.engine.tree(tree)?.get(key)?.map(|v| v.to_vec()))
    }

    fn count(&mut self, tree: Tree, key: &[u8]) -> Result<i64> {
        Ok(self
            .engine
            .tree(tree)?
            .get(key)?
            .map_or(0, |v| count_of(&v)))
    }

    fn scan(
        &mut self,
        tree: Tree,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let t = self.engine.tree(tree)?;
        sled_range(&t, range)
            .take(limit)
            .map(|kv| {
                let (k, v) = kv?;
                Ok((k.to_vec(), v.to_vec()))
            })
            .collect()
    }

    fn lock(&mut self, name: &str, wait: bool) -> Result<bool> {
        let locks = &self.engine.locks;
        let mut table = locks.table();
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match table.names.get(name) {
                None => {
                    table.names.insert(name.to_owned(), self.txn);
                    return Ok(true);
                }
                Some(holder) if *holder == self.txn => return Ok(true),
                Some(_) if !wait => return Ok(false),
                Some(_) => {
                    let left = deadline.saturating_duration_since(std::time::Instant::now());
                    if left.is_zero() {
                        return Ok(false);
                    }
                    table = locks
                        .released
                        .wait_timeout(table, left)
                        .unwrap_or_else(|p| p.into_inner())
                        .0;
                }
            }
        }
    }

    fn claim(
        &mut self,
        tree: Tree,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        let t = self.engine.tree(tree)?;
        let mut out = Vec::new();
        let mut table = self.engine.locks.table();
        for kv in sled_range(&t, range) {
            if out.len() >= limit {
                break;
            }
            let (k, v) = kv?;
            let slot = (tree, k.to_vec());
            match table.claims.get(&slot) {
                Some(holder) if *holder != self.txn => continue,
                _ => {
                    table.claims.insert(slot, self.txn);
                    out.push((k.to_vec(), v.to_vec()));
                }
            }
        }
        Ok(out)
    }

    fn next_id(&mut self) -> Result<u64> {
        let floor = self
            .engine
            .id_floor
            .load(std::sync::atomic::Ordering::SeqCst);
        Ok(self.engine.db.generate_id()?.saturating_add(floor))
    }

    fn commit(self: Box<Self>, commit: Commit) -> Result<()> {
        let Commit {
            writes, durable, ..
        } = commit;
        let writes_were_empty = writes.is_empty();
        if !writes_were_empty {
            let mut names: Vec<Tree> = writes.iter().map(|(t, _, _)| *t).collect();
            names.sort();
            names.dedup();
            let trees = names
                .iter()
                .map(|t| self.engine.tree(*t))
                .collect::<Result<Vec<_>>>()?;
            let slot: HashMap<Tree, usize> =
                names.iter().enumerate().map(|(i, t)| (*t, i)).collect();
            let applied = trees.as_slice().transaction(|views| {
                for (tree, key, write) in &writes {
                    let view = &views[slot[tree]];
                    match write {
                        Write::Put(v) => {
                            view.insert(key.as_slice(), v.as_slice())?;
                        }
                        Write::Insert(v) => {
                            if view.get(key.as_slice())?.is_some() {
                                return Err(ConflictableTransactionError::Abort(()));
                            }
                            view.insert(key.as_slice(), v.as_slice())?;
                        }
                        Write::Remove => {
                            view.remove(key.as_slice())?;
                        }
                        Write::Add(_) | Write::SetCount(_) => {
                            let n = match write {
                                Write::Add(delta) => view
                                    .get(key.as_slice())?
                                    .map_or(0, |v| count_of(&v))
                                    .saturating_add(*delta),
                                Write::SetCount(n) => *n,
                                _ => 0,
                            };
                            if n > 0 {
                                view.insert(key.as_slice(), &n.to_be_bytes())?;
                            } else {
                                view.remove(key.as_slice())?;
                            }
                        }
                    }
                }
                Ok(())
            });
            match applied {
                Ok(()) => {}
                Err(TransactionError::Abort(())) => return Err(StoreError::Conflict),
                Err(TransactionError::Storage(e)) => return Err(e.into()),
            }
        }
        if durable && !writes_were_empty {
            self.engine.db.flush()?;
        }
        Ok(())
    }
}
