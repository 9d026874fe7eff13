//! The shared engine: PostgreSQL, for several Reach instances on one database. The only file
//! that knows PostgreSQL.
//!
//! Records live in `reach_records` and counts in `reach_counts`, keyed by (tree, key) with
//! keys as `bytea`, which PostgreSQL orders bytewise exactly as sled orders its keys. A
//! [`Backend`] is one SQL transaction (read committed) on a pooled connection: reads go to the
//! server, and [`Backend::commit`] applies what `Txn` buffered with one statement per kind of
//! write (the rows passed as arrays through `unnest`), then `COMMIT`. Each guarantee of the
//! engine contract is one of PostgreSQL's own: a user lock is the row lock (`SELECT ... FOR
//! UPDATE`) of the user's row in `reach_locks` (row locks live in the rows, so a transaction
//! may hold thousands without filling the server's shared lock table, which advisory locks
//! would), claims are `SELECT ... FOR UPDATE SKIP LOCKED`, counters are `n = n + delta`
//! upserts, unique keys are plain `INSERT`s whose unique violation is a
//! [`StoreError::Conflict`], a live instance is a session-level advisory lock held by a
//! connection of its own (PostgreSQL releases it the moment the process's connection closes),
//! and notices are `NOTIFY`s, which PostgreSQL delivers only when the transaction commits.
//! A transaction waits at most 30 s for a lock (a user lock, or a row at commit), then gives
//! up as a conflict, as the sled engine does. The schema is a numbered list of migrations,
//! applied at open.
//!
//! The connection is plain, without TLS: reach the server over a Unix socket or a private
//! network only. The database role needs the right to create tables in its schema (the owner
//! of the database has it). The client is synchronous and each connection runs a small tokio
//! runtime of its own, so the engine is used from blocking threads, never from inside an async
//! task (tokio refuses to block a runtime inside another); dropping the engine is safe anywhere.
//! Logs never show the URL's password nor record contents.

use std::collections::{BTreeSet, HashMap};
use std::str::FromStr;
use std::sync::{Arc, Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use postgres::config::Host;
use postgres::error::SqlState;
use postgres::types::{FromSql, ToSql};
use postgres::{Client, Config, NoTls, Row, Statement};
use sha2::{Digest, Sha256};
use tracing::{debug, info, warn};

use super::engine::{Backend, Commit, Engine, KeyRange, Result, StoreError, Tree, Write};

/// The channels [`Engine::listen`] listens on: every channel Reach's commits notify.
pub const LISTEN_CHANNELS: [&str; 3] = ["reach_email", "reach_sms", "reach_outbox"];

/// The most connections open at once for transactions (the instance holder and each listener
/// have one more of their own).
pub const POOL_SIZE: usize = 16;

/// The schema migrations, oldest first: a new version appends an entry, never edits one.
/// Each runs in the transaction that records it in `reach_schema`.
const MIGRATIONS: &[(u32, &str)] = &[(
    1,
    "CREATE TABLE reach_records (
        tree text COLLATE \"C\" NOT NULL,
        key bytea NOT NULL,
        value bytea NOT NULL,
        PRIMARY KEY (tree, key)
    );
    CREATE TABLE reach_counts (
        tree text COLLATE \"C\" NOT NULL,
        key bytea NOT NULL,
        n bigint NOT NULL,
        PRIMARY KEY (tree, key)
    ) WITH (fillfactor = 90);
    CREATE SEQUENCE reach_ids;
    CREATE TABLE reach_locks (
        name text COLLATE \"C\" PRIMARY KEY
    );",
)];

/// The schema version this code creates and understands.
pub const SCHEMA_VERSION: u32 = MIGRATIONS[MIGRATIONS.len() - 1].0;

/// The table of applied migrations, created before anything else.
const SCHEMA_TABLE: &str = "CREATE TABLE IF NOT EXISTS reach_schema (
    version int PRIMARY KEY,
    applied_at timestamptz NOT NULL DEFAULT now()
)";

/// Advisory lock namespaces: the 64-bit key of a lock is the hash of namespace + name.
const INSTANCE_NAMESPACE: &str = "instance:";
const MIGRATION_LOCK: (&str, &str) = ("migration:", "reach");

/// The longest a transaction waits for a lock (a user lock, or a row at commit) before giving
/// up as a conflict, as the sled engine does: an instance stuck while holding a lock must not
/// stop the others for good.
const LOCK_WAIT_LIMIT: Duration = Duration::from_secs(30);
/// How long `begin` waits for a connection while all [`POOL_SIZE`] are busy.
const POOL_WAIT: Duration = Duration::from_secs(30);
/// The connect timeout when the URL gives none.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How many times taking an instance is tried before it counts as held elsewhere, and the
/// pause between tries (see `take_instance_patiently`).
const HOLD_TRIES: u32 = 3;
const HOLD_TRY_PAUSE: Duration = Duration::from_millis(20);
/// How often the instance holder checks that its connection is still there.
const HOLD_CHECK: Duration = Duration::from_secs(2);
/// How long a listener waits for a notification before looking whether the engine closed.
const LISTEN_POLL: Duration = Duration::from_millis(250);
/// After this long without a notification, a listener checks its connection.
const LISTEN_PING: Duration = Duration::from_secs(30);
/// How long a connection check may take before the connection counts as broken.
const PING_TIMEOUT: Duration = Duration::from_secs(5);
/// Reconnection backoff of the listeners: from the first delay, doubling, up to the last.
const RECONNECT_FIRST: Duration = Duration::from_millis(100);
const RECONNECT_LAST: Duration = Duration::from_secs(10);
/// Server-side TCP keepalives of the instance holder's session: if the holder's machine
/// vanishes without closing the connection, PostgreSQL drops it (and the instance) after
/// about idle + interval × count seconds instead of the system's two hours.
const HOLDER_KEEPALIVES: &str =
    "SET tcp_keepalives_idle = 10; SET tcp_keepalives_interval = 5; SET tcp_keepalives_count = 3";

// Statements of a transaction (prepared once per connection).
const BEGIN: &str = "BEGIN ISOLATION LEVEL READ COMMITTED";
const GET: &str = "SELECT value FROM reach_records WHERE tree = $1 AND key = $2";
const COUNT: &str = "SELECT n FROM reach_counts WHERE tree = $1 AND key = $2";
const SCAN_RECORDS: &str = "SELECT key, value FROM reach_records \
     WHERE tree = $1 AND key >= $2 ORDER BY key LIMIT $3";
const SCAN_RECORDS_BELOW: &str = "SELECT key, value FROM reach_records \
     WHERE tree = $1 AND key >= $2 AND key < $3 ORDER BY key LIMIT $4";
const SCAN_COUNTS: &str = "SELECT key, n FROM reach_counts \
     WHERE tree = $1 AND key >= $2 ORDER BY key LIMIT $3";
const SCAN_COUNTS_BELOW: &str = "SELECT key, n FROM reach_counts \
     WHERE tree = $1 AND key >= $2 AND key < $3 ORDER BY key LIMIT $4";
const CLAIM_RECORDS: &str = "SELECT key, value FROM reach_records \
     WHERE tree = $1 AND key >= $2 ORDER BY key LIMIT $3 FOR UPDATE SKIP LOCKED";
const CLAIM_RECORDS_BELOW: &str = "SELECT key, value FROM reach_records \
     WHERE tree = $1 AND key >= $2 AND key < $3 ORDER BY key LIMIT $4 FOR UPDATE SKIP LOCKED";
const CLAIM_COUNTS: &str = "SELECT key, n FROM reach_counts \
     WHERE tree = $1 AND key >= $2 ORDER BY key LIMIT $3 FOR UPDATE SKIP LOCKED";
const CLAIM_COUNTS_BELOW: &str = "SELECT key, n FROM reach_counts \
     WHERE tree = $1 AND key >= $2 AND key < $3 ORDER BY key LIMIT $4 FOR UPDATE SKIP LOCKED";
const LOCK_WAIT: &str = "SELECT 1 FROM reach_locks WHERE name = $1 FOR UPDATE";
const LOCK_TRY: &str = "SELECT 1 FROM reach_locks WHERE name = $1 FOR UPDATE SKIP LOCKED";
/// Whether a lock's row exists (without taking it).
const LOCK_EXISTS: &str = "SELECT 1 FROM reach_locks WHERE name = $1";
/// A lock's row, made (and committed at once, on a connection of its own) the first time the
/// name is locked: made inside the transaction, it would make another transaction that wants
/// the same new name wait, even a `try`.
const LOCK_ROW: &str = "INSERT INTO reach_locks (name) VALUES ($1) ON CONFLICT DO NOTHING";
const ENSURE_IDS_ABOVE: &str =
    "SELECT setval('reach_ids', GREATEST($1::bigint, (SELECT last_value FROM reach_ids)))";
const NEXT_ID: &str = "SELECT nextval('reach_ids')";
const NEXT_IDS: &str = "SELECT nextval('reach_ids') FROM generate_series(1, $1::int)";
const PUT: &str = "INSERT INTO reach_records (tree, key, value) \
     SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[]) \
     ON CONFLICT (tree, key) DO UPDATE SET value = EXCLUDED.value";
const INSERT: &str = "INSERT INTO reach_records (tree, key, value) \
     SELECT * FROM unnest($1::text[], $2::bytea[], $3::bytea[])";
const REMOVE_RECORDS: &str = "DELETE FROM reach_records r \
     USING unnest($1::text[], $2::bytea[]) AS gone(tree, key) \
     WHERE r.tree = gone.tree AND r.key = gone.key";
const REMOVE_COUNTS: &str = "DELETE FROM reach_counts c \
     USING unnest($1::text[], $2::bytea[]) AS gone(tree, key) \
     WHERE c.tree = gone.tree AND c.key = gone.key";
/// Adds, saturating at the ends of bigint as the sled engine does.
const ADD: &str = "INSERT INTO reach_counts AS c (tree, key, n) \
     SELECT * FROM unnest($1::text[], $2::bytea[], $3::int8[]) \
     ON CONFLICT (tree, key) DO UPDATE SET n = LEAST(GREATEST(c.n::numeric + EXCLUDED.n, \
     -9223372036854775808), 9223372036854775807)::bigint";
/// Deletes the counts an addition brought to 0 or below.
const PRUNE_COUNTS: &str = "DELETE FROM reach_counts c \
     USING unnest($1::text[], $2::bytea[]) AS added(tree, key) \
     WHERE c.tree = added.tree AND c.key = added.key AND c.n <= 0";
const SET_COUNT: &str = "INSERT INTO reach_counts (tree, key, n) \
     SELECT * FROM unnest($1::text[], $2::bytea[], $3::int8[]) \
     ON CONFLICT (tree, key) DO UPDATE SET n = EXCLUDED.n";
const NOTIFY: &str = "SELECT pg_notify(channel, '') FROM unnest($1::text[]) AS c(channel)";
const COMMIT_DURABLE: &str = "COMMIT";
const COMMIT_LAZY: &str = "SET LOCAL synchronous_commit TO OFF; COMMIT";
const ROLLBACK: &str = "ROLLBACK";

// Statements outside transactions.
const LEN_RECORDS: &str = "SELECT count(*) FROM reach_records WHERE tree = $1";
const LEN_COUNTS: &str = "SELECT count(*) FROM reach_counts WHERE tree = $1";
/// Whether another session holds the instance lock: taking it (and giving it back at once)
/// tells. `CASE` fixes the order of evaluation.
const PROBE_INSTANCE: &str = "SELECT CASE WHEN pg_try_advisory_lock($1) \
     THEN NOT pg_advisory_unlock($1) ELSE true END";
const HOLD_INSTANCE: &str = "SELECT pg_try_advisory_lock($1)";

type PgResult<T> = std::result::Result<T, postgres::Error>;
type Params<'a> = &'a [&'a (dyn ToSql + Sync)];

/// The PostgreSQL engine (see the module comment).
pub struct Postgres {
    config: Config,
    /// Where the database is, without the password, for logs and errors.
    location: String,
    pool: Pool,
    holder: Arc<Holder>,
    closing: Arc<Closing>,
    /// The instance keeper and the listeners, joined when the engine closes.
    threads: Mutex<Vec<JoinHandle<()>>>,
}

impl Postgres {
    /// Connects to the database at `url` (libpq style: `postgres://user:password@host:port/db`,
    /// a Unix socket as `host=/path` or a percent-encoded path as host) and brings its schema
    /// to [`SCHEMA_VERSION`]. A schema newer than this code is [`StoreError::Schema`].
    pub fn open(url: &str) -> Result<Postgres> {
        Postgres::open_config(parse_url(url)?)
    }

    fn open_config(config: Config) -> Result<Postgres> {
        let location = location(&config);
        let transactions = with_lock_wait_limit(&config);
        let mut first = connect(&transactions, &location)?;
        let found = migrate(&mut first, &location)?;
        if found < SCHEMA_VERSION {
            info!(%location, from = found, to = SCHEMA_VERSION, "postgres schema migrated");
        }
        info!(%location, schema = SCHEMA_VERSION, "postgres store opened");
        Ok(Postgres {
            pool: Pool::new(transactions, location.clone(), Connection::new(first)),
            holder: Arc::new(Holder::new(config.clone(), location.clone())),
            closing: Arc::new(Closing::default()),
            threads: Mutex::new(Vec::new()),
            config,
            location,
        })
    }

    /// [`Postgres::open`] with the password given apart from the URL (`[store] password_file`).
    pub fn open_with_password(url: &str, password: Option<&str>) -> Result<Postgres> {
        match password {
            Some(password) => Postgres::open_config(with_password(parse_url(url)?, password)),
            None => Postgres::open(url),
        }
    }

    /// Where the database is (user, host, port and database; never the password).
    pub fn location(&self) -> &str {
        &self.location
    }

    fn spawn(&self, name: &str, run: impl FnOnce() + Send + 'static) -> Result<()> {
        let handle = std::thread::Builder::new()
            .name(name.to_owned())
            .spawn(run)
            .map_err(|e| {
                StoreError::Engine(format!("postgres: cannot start thread {name}: {e}"))
            })?;
        locked(&self.threads).push(handle);
        Ok(())
    }
}

/// Connects to `url` and describes, in one line, the server and what Reach would do with its
/// schema: for `reach check-config`. A schema newer than this code is [`StoreError::Schema`].
pub fn check(url: &str, password: Option<&str>) -> Result<String> {
    let mut config = parse_url(url)?;
    if let Some(password) = password {
        config = with_password(config, password);
    }
    let location = location(&config);
    let mut client = connect(&config, &location)?;
    let failed = |doing: &str, e: postgres::Error| engine_error(&location, doing, &e);
    let version: String = client
        .query_one("SHOW server_version", &[])
        .map_err(|e| failed("server version", e))
        .and_then(|row| column(&row, 0))?;
    let schema = match applied_version(&mut client).map_err(|e| failed("schema version", e))? {
        None => "empty database: the schema is created at first start".to_owned(),
        Some(found) if found > SCHEMA_VERSION => {
            return Err(StoreError::Schema {
                found,
                expected: SCHEMA_VERSION,
            })
        }
        Some(found) if found == SCHEMA_VERSION => format!("schema version {found}"),
        Some(found) => {
            format!("schema version {found}, migrated to {SCHEMA_VERSION} at first start")
        }
    };
    Ok(format!("PostgreSQL {version} at {location}: {schema}"))
}

impl Engine for Postgres {
    fn name(&self) -> &'static str {
        "postgres"
    }

    fn begin(&self) -> Result<Box<dyn Backend + '_>> {
        let (lease, ()) = self
            .pool
            .lease_with("begin", |c| c.client.batch_execute(BEGIN))?;
        Ok(Box::new(PgTxn {
            lease,
            open: true,
            conflicted: false,
        }))
    }

    fn hold_instance(&self, name: &str) -> Result<bool> {
        let held = self.holder.hold(name)?;
        if held && self.holder.start_keeper() {
            let holder = Arc::clone(&self.holder);
            let closing = Arc::clone(&self.closing);
            self.spawn("reach-pg-instance", move || {
                while !closing.wait(HOLD_CHECK) {
                    holder.keep();
                }
            })?;
        }
        Ok(held)
    }

    fn instance_alive(&self, name: &str) -> Result<bool> {
        let key = advisory_key(INSTANCE_NAMESPACE, name);
        let (_lease, row) = self
            .pool
            .lease_with("instance check", |c| c.query_one(PROBE_INSTANCE, &[&key]))?;
        column(&row, 0)
    }

    fn listen(&self, wake: Box<dyn Fn(&str) + Send + Sync>) -> Result<()> {
        // Subscribed before returning: a commit made after `listen` returns is heard.
        let client = subscribe(&self.config, &self.location)?;
        let config = self.config.clone();
        let location = self.location.clone();
        let closing = Arc::clone(&self.closing);
        self.spawn("reach-pg-listen", move || {
            listen_until_closed(client, &config, &location, &*wake, &closing);
        })
    }

    fn ensure_ids_above(&self, floor: u64) -> Result<()> {
        let floor = i64::try_from(floor).unwrap_or(i64::MAX);
        self.pool
            .lease_with("ids", |c| c.query_one(ENSURE_IDS_ABOVE, &[&floor]))?;
        Ok(())
    }

    fn len(&self, tree: Tree) -> Result<u64> {
        let sql = if tree.counts { LEN_COUNTS } else { LEN_RECORDS };
        let (_lease, row) = self
            .pool
            .lease_with("len", |c| c.query_one(sql, &[&tree.name]))?;
        let n: i64 = column(&row, 0)?;
        Ok(u64::try_from(n).unwrap_or(0))
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        self.closing.close();
        let threads = std::mem::take(&mut *locked(&self.threads));
        let idle = std::mem::take(&mut locked(&self.pool.state).idle);
        let holder = Arc::clone(&self.holder);
        // Closing a connection runs its runtime to say goodbye to the server, which tokio
        // forbids on a thread that runs an async task: so it happens on a thread of its own.
        let close = move || {
            for thread in threads {
                if thread.join().is_err() {
                    warn!("a postgres background thread had panicked");
                }
            }
            drop(idle);
            holder.release();
        };
        match std::thread::Builder::new()
            .name("reach-pg-close".to_owned())
            .spawn(close)
        {
            Ok(closer) => {
                if closer.join().is_err() {
                    warn!("closing the postgres connections panicked");
                }
            }
            Err(e) => warn!("cannot start a thread to close the postgres connections: {e}"),
        }
    }
}

/// One transaction: a pooled connection inside `BEGIN`.
struct PgTxn<'e> {
    lease: Lease<'e>,
    /// The transaction is still open on the server: dropped, it rolls back.
    open: bool,
    /// PostgreSQL ended the transaction as a conflict (e.g. a deadlock broken on a lock): what
    /// follows is a conflict too, the commit included.
    conflicted: bool,
}

impl PgTxn<'_> {
    fn usable(&self) -> Result<()> {
        if self.conflicted {
            Err(StoreError::Conflict)
        } else {
            Ok(())
        }
    }

    fn failed(&mut self, doing: &str, e: &postgres::Error) -> StoreError {
        let error = self.lease.error(doing, e);
        if matches!(error, StoreError::Conflict) {
            self.conflicted = true;
        }
        error
    }

    fn query(&mut self, doing: &str, sql: &'static str, params: Params) -> Result<Vec<Row>> {
        self.usable()?;
        self.lease
            .conn()
            .query(sql, params)
            .map_err(|e| self.failed(doing, &e))
    }

    fn query_opt(&mut self, doing: &str, sql: &'static str, params: Params) -> Result<Option<Row>> {
        self.usable()?;
        self.lease
            .conn()
            .query_opt(sql, params)
            .map_err(|e| self.failed(doing, &e))
    }

    fn query_one(&mut self, doing: &str, sql: &'static str, params: Params) -> Result<Row> {
        self.usable()?;
        self.lease
            .conn()
            .query_one(sql, params)
            .map_err(|e| self.failed(doing, &e))
    }

    fn execute(&mut self, doing: &str, sql: &'static str, params: Params) -> Result<u64> {
        self.usable()?;
        self.lease
            .conn()
            .execute(sql, params)
            .map_err(|e| self.failed(doing, &e))
    }

    /// Records or counts in `range` (see [`Backend::scan`]); with `claim`, row-locked and
    /// skipping rows another transaction locked.
    fn range(
        &mut self,
        doing: &str,
        tree: Tree,
        range: &KeyRange,
        limit: usize,
        claim: bool,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        if limit == 0 {
            return Ok(Vec::new());
        }
        // SQL's LIMIT NULL is no limit.
        let limit: Option<i64> = i64::try_from(limit).ok();
        let rows = match &range.end {
            Some(end) => {
                let sql = range_statement(tree, true, claim);
                self.query(doing, sql, &[&tree.name, &range.start, end, &limit])?
            }
            None => {
                let sql = range_statement(tree, false, claim);
                self.query(doing, sql, &[&tree.name, &range.start, &limit])?
            }
        };
        rows.iter()
            .map(|row| {
                let key: Vec<u8> = column(row, 0)?;
                let value = if tree.counts {
                    column::<i64>(row, 1)?.to_be_bytes().to_vec()
                } else {
                    column(row, 1)?
                };
                Ok((key, value))
            })
            .collect()
    }

    /// Applies the writes of a commit, one statement per kind.
    fn apply(&mut self, writes: &[(Tree, Vec<u8>, Write)]) -> Result<()> {
        let batches = Batches::of(writes);
        let removed = &batches.remove_records;
        if !removed.is_empty() {
            self.execute(
                "commit: remove",
                REMOVE_RECORDS,
                &[&removed.trees, &removed.keys],
            )?;
        }
        let removed = &batches.remove_counts;
        if !removed.is_empty() {
            self.execute(
                "commit: remove counts",
                REMOVE_COUNTS,
                &[&removed.trees, &removed.keys],
            )?;
        }
        for (doing, sql, rows) in [
            ("commit: put", PUT, &batches.put),
            ("commit: insert", INSERT, &batches.insert),
        ] {
            if !rows.is_empty() {
                self.execute(doing, sql, &[&rows.trees, &rows.keys, &rows.values])?;
            }
        }
        for (doing, sql, rows) in [
            ("commit: add", ADD, &batches.add),
            ("commit: set count", SET_COUNT, &batches.set_count),
        ] {
            if !rows.is_empty() {
                self.execute(doing, sql, &[&rows.trees, &rows.keys, &rows.values])?;
            }
        }
        let lowered = &batches.lowered;
        if !lowered.is_empty() {
            self.execute(
                "commit: prune counts",
                PRUNE_COUNTS,
                &[&lowered.trees, &lowered.keys],
            )?;
        }
        Ok(())
    }
}

impl Backend for PgTxn<'_> {
    fn get(&mut self, tree: Tree, key: &[u8]) -> Result<Option<Vec<u8>>> {
        match self.query_opt("get", GET, &[&tree.name, &key])? {
            Some(row) => Ok(Some(column(&row, 0)?)),
            None => Ok(None),
        }
    }

    fn count(&mut self, tree: Tree, key: &[u8]) -> Result<i64> {
        match self.query_opt("count", COUNT, &[&tree.name, &key])? {
            Some(row) => column(&row, 0),
            None => Ok(0),
        }
    }

    fn scan(
        &mut self,
        tree: Tree,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.range("scan", tree, range, limit, false)
    }

    fn lock(&mut self, name: &str, wait: bool) -> Result<bool> {
        let outcome = (|| {
            let sql = if wait { LOCK_WAIT } else { LOCK_TRY };
            if !self.query("lock", sql, &[&name])?.is_empty() {
                return Ok(true);
            }
            // No row taken: without waiting, another transaction may hold it.
            if !wait
                && !self
                    .query("lock: exists", LOCK_EXISTS, &[&name])?
                    .is_empty()
            {
                return Ok(false);
            }
            // The name's first use: its row is made apart, then taken.
            self.lease
                .pool
                .lease_with("lock: first use", |c| c.execute(LOCK_ROW, &[&name]))?;
            Ok(!self.query("lock", sql, &[&name])?.is_empty())
        })();
        match outcome {
            Ok(taken) => Ok(taken),
            // PostgreSQL broke a deadlock by ending this transaction, or the holder kept the
            // lock too long: the caller gives up and runs it again (its commit is a conflict).
            Err(StoreError::Conflict) => Ok(false),
            Err(e) => Err(e),
        }
    }

    fn claim(
        &mut self,
        tree: Tree,
        range: &KeyRange,
        limit: usize,
    ) -> Result<Vec<(Vec<u8>, Vec<u8>)>> {
        self.range("claim", tree, range, limit, true)
    }

    fn next_id(&mut self) -> Result<u64> {
        let row = self.query_one("next id", NEXT_ID, &[])?;
        let id: i64 = column(&row, 0)?;
        u64::try_from(id)
            .map_err(|_| StoreError::Corrupt(format!("postgres: sequence reach_ids gave {id}")))
    }

    fn next_ids(&mut self, n: usize) -> Result<Vec<u64>> {
        let n = i32::try_from(n.clamp(1, 1000)).unwrap_or(1);
        let mut ids = self
            .query("next ids", NEXT_IDS, &[&n])?
            .iter()
            .map(|row| {
                let id: i64 = column(row, 0)?;
                u64::try_from(id).map_err(|_| {
                    StoreError::Corrupt(format!("postgres: sequence reach_ids gave {id}"))
                })
            })
            .collect::<Result<Vec<u64>>>()?;
        ids.sort_unstable();
        Ok(ids)
    }

    fn commit(mut self: Box<Self>, commit: Commit) -> Result<()> {
        self.apply(&commit.writes)?;
        if !commit.notices.is_empty() {
            let channels: Vec<&str> = commit.notices.iter().copied().collect();
            self.execute("commit: notify", NOTIFY, &[&channels])?;
        }
        self.usable()?;
        let end = if commit.durable {
            COMMIT_DURABLE
        } else {
            COMMIT_LAZY
        };
        match self.lease.conn().client.batch_execute(end) {
            Ok(()) => {
                self.open = false;
                Ok(())
            }
            // Left open: dropping rolls back whatever is left of the transaction.
            Err(e) => Err(self.failed("commit", &e)),
        }
    }
}

impl Drop for PgTxn<'_> {
    fn drop(&mut self) {
        if self.open && self.lease.healthy {
            if let Err(e) = self.lease.conn().client.batch_execute(ROLLBACK) {
                debug!(
                    "postgres rollback failed, closing the connection: {}",
                    error_text(&e)
                );
                self.lease.healthy = false;
            }
        }
    }
}

/// The writes of a commit grouped by kind, as the columns the statements take.
#[derive(Default)]
struct Batches<'c> {
    put: Rows<'c, &'c [u8]>,
    insert: Rows<'c, &'c [u8]>,
    remove_records: Rows<'c, ()>,
    remove_counts: Rows<'c, ()>,
    add: Rows<'c, i64>,
    set_count: Rows<'c, i64>,
    /// Counts an addition may have brought to 0 or below (deleted after the additions).
    lowered: Rows<'c, ()>,
}

impl<'c> Batches<'c> {
    /// Each (tree, key) is written once per commit (what `Txn` hands over): the statements
    /// could not apply two writes of one key in order.
    fn of(writes: &'c [(Tree, Vec<u8>, Write)]) -> Batches<'c> {
        let mut batches = Batches::default();
        for (tree, key, write) in writes {
            match write {
                Write::Put(value) => batches.put.push(*tree, key, value.as_slice()),
                Write::Insert(value) => batches.insert.push(*tree, key, value.as_slice()),
                Write::Remove if tree.counts => batches.remove_counts.push(*tree, key, ()),
                Write::Remove => batches.remove_records.push(*tree, key, ()),
                Write::Add(delta) => {
                    batches.add.push(*tree, key, *delta);
                    if *delta <= 0 {
                        batches.lowered.push(*tree, key, ());
                    }
                }
                Write::SetCount(n) if *n > 0 => batches.set_count.push(*tree, key, *n),
                Write::SetCount(_) => batches.remove_counts.push(*tree, key, ()),
            }
        }
        batches
    }
}

/// Rows as columns: tree names, keys and values, passed as arrays.
#[derive(Default)]
struct Rows<'c, V> {
    trees: Vec<&'static str>,
    keys: Vec<&'c [u8]>,
    values: Vec<V>,
}

impl<'c, V> Rows<'c, V> {
    fn push(&mut self, tree: Tree, key: &'c [u8], value: V) {
        self.trees.push(tree.name);
        self.keys.push(key);
        self.values.push(value);
    }

    fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }
}

/// The statement reading a range of records or counts, bounded above or not, claiming or not.
fn range_statement(tree: Tree, bounded: bool, claim: bool) -> &'static str {
    match (tree.counts, bounded, claim) {
        (false, false, false) => SCAN_RECORDS,
        (false, true, false) => SCAN_RECORDS_BELOW,
        (true, false, false) => SCAN_COUNTS,
        (true, true, false) => SCAN_COUNTS_BELOW,
        (false, false, true) => CLAIM_RECORDS,
        (false, true, true) => CLAIM_RECORDS_BELOW,
        (true, false, true) => CLAIM_COUNTS,
        (true, true, true) => CLAIM_COUNTS_BELOW,
    }
}

/// A connection and the statements prepared on it.
struct Connection {
    client: Client,
    prepared: HashMap<&'static str, Statement>,
}

impl Connection {
    fn new(client: Client) -> Connection {
        Connection {
            client,
            prepared: HashMap::new(),
        }
    }

    /// `sql` prepared on this connection (once: the server keeps it for the session).
    fn statement(&mut self, sql: &'static str) -> PgResult<Statement> {
        if let Some(statement) = self.prepared.get(sql) {
            return Ok(statement.clone());
        }
        let statement = self.client.prepare(sql)?;
        self.prepared.insert(sql, statement.clone());
        Ok(statement)
    }

    fn query(&mut self, sql: &'static str, params: Params) -> PgResult<Vec<Row>> {
        let statement = self.statement(sql)?;
        self.client.query(&statement, params)
    }

    fn query_opt(&mut self, sql: &'static str, params: Params) -> PgResult<Option<Row>> {
        let statement = self.statement(sql)?;
        self.client.query_opt(&statement, params)
    }

    fn query_one(&mut self, sql: &'static str, params: Params) -> PgResult<Row> {
        let statement = self.statement(sql)?;
        self.client.query_one(&statement, params)
    }

    fn execute(&mut self, sql: &'static str, params: Params) -> PgResult<u64> {
        let statement = self.statement(sql)?;
        self.client.execute(&statement, params)
    }
}

/// The connections for transactions: at most `capacity` open, idle ones kept for reuse.
struct Pool {
    config: Config,
    location: String,
    capacity: usize,
    state: Mutex<PoolState>,
    /// Signalled when a connection comes back or closes.
    returned: Condvar,
}

struct PoolState {
    idle: Vec<Connection>,
    /// Connections open, idle or leased.
    open: usize,
}

impl Pool {
    fn new(config: Config, location: String, first: Connection) -> Pool {
        Pool {
            config,
            location,
            capacity: POOL_SIZE,
            state: Mutex::new(PoolState {
                idle: vec![first],
                open: 1,
            }),
            returned: Condvar::new(),
        }
    }

    /// An idle connection, else a new one, else (all busy) the first one given back.
    fn lease(&self) -> Result<Lease<'_>> {
        let deadline = Instant::now() + POOL_WAIT;
        let mut state = locked(&self.state);
        loop {
            if let Some(connection) = state.idle.pop() {
                return Ok(Lease::new(self, connection, false));
            }
            if state.open < self.capacity {
                state.open += 1;
                drop(state);
                return match connect(&self.config, &self.location) {
                    Ok(client) => Ok(Lease::new(self, Connection::new(client), true)),
                    Err(e) => {
                        self.forget_one();
                        Err(e)
                    }
                };
            }
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(StoreError::Unavailable(format!(
                    "postgres: all {} connections stayed busy for {} s",
                    self.capacity,
                    POOL_WAIT.as_secs()
                )));
            }
            state = self
                .returned
                .wait_timeout(state, left)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// A lease whose connection ran `first` successfully. A pooled connection that died while
    /// idle (the server restarted, or dropped it) is closed and the next one tried.
    fn lease_with<T>(
        &self,
        doing: &str,
        mut first: impl FnMut(&mut Connection) -> PgResult<T>,
    ) -> Result<(Lease<'_>, T)> {
        loop {
            let mut lease = self.lease()?;
            match first(lease.conn()) {
                Ok(value) => return Ok((lease, value)),
                Err(e) => {
                    let error = lease.error(doing, &e);
                    if lease.healthy || lease.fresh {
                        return Err(error);
                    }
                    debug!("postgres: a pooled connection had closed, trying another");
                }
            }
        }
    }

    fn give_back(&self, connection: Connection, healthy: bool) {
        if healthy && !connection.client.is_closed() {
            locked(&self.state).idle.push(connection);
            self.returned.notify_one();
        } else {
            self.forget_one();
            // Closed here, outside the pool's lock.
            drop(connection);
        }
    }

    /// Counts one connection less (closed or never opened).
    fn forget_one(&self) {
        let mut state = locked(&self.state);
        state.open = state.open.saturating_sub(1);
        drop(state);
        self.returned.notify_one();
    }
}

/// A connection taken from the pool, given back (or closed if broken) when dropped.
struct Lease<'p> {
    pool: &'p Pool,
    /// Always `Some` until dropped.
    connection: Option<Connection>,
    /// False once the connection failed in a way that leaves it unusable: it is then closed
    /// instead of given back.
    healthy: bool,
    /// Opened for this lease (not reused from the pool).
    fresh: bool,
}

impl<'p> Lease<'p> {
    fn new(pool: &'p Pool, connection: Connection, fresh: bool) -> Lease<'p> {
        Lease {
            pool,
            connection: Some(connection),
            healthy: true,
            fresh,
        }
    }

    fn conn(&mut self) -> &mut Connection {
        self.connection
            .as_mut()
            .expect("a lease holds its connection until dropped")
    }

    /// The store's error for `e`, marking the connection broken if it is.
    fn error(&mut self, doing: &str, e: &postgres::Error) -> StoreError {
        if e.as_db_error().is_none() || self.conn().client.is_closed() {
            self.healthy = false;
        }
        store_error(&self.pool.location, doing, e)
    }
}

impl Drop for Lease<'_> {
    fn drop(&mut self) {
        if let Some(connection) = self.connection.take() {
            self.pool.give_back(connection, self.healthy);
        }
    }
}

/// The instances this process holds, on a connection of their own.
struct Holder {
    config: Config,
    location: String,
    state: Mutex<Held>,
}

#[derive(Default)]
struct Held {
    client: Option<Client>,
    /// The instances this process holds (or is to take again, see `retake`).
    names: BTreeSet<String>,
    /// Instances to take again: their connection closed (the server restarted, the network
    /// failed), so PostgreSQL released them.
    retake: BTreeSet<String>,
    /// Instances to take again that another process took meanwhile (warned about once).
    elsewhere: BTreeSet<String>,
    keeper_started: bool,
}

impl Held {
    /// Closes the connection: whatever it held is to be taken again (see [`Holder::keep`]).
    fn drop_connection(&mut self) {
        self.client = None;
        self.retake.extend(self.names.iter().cloned());
    }

    fn taken(&mut self, name: &str) {
        self.names.insert(name.to_owned());
        self.retake.remove(name);
        self.elsewhere.remove(name);
    }
}

impl Holder {
    fn new(config: Config, location: String) -> Holder {
        Holder {
            config,
            location,
            state: Mutex::new(Held::default()),
        }
    }

    fn hold(&self, name: &str) -> Result<bool> {
        let mut held = locked(&self.state);
        if held.names.contains(name) && !held.retake.contains(name) {
            return Ok(true);
        }
        // The connection may have died unnoticed (a server restart): then once more on a new one.
        let mut reused = held.client.is_some();
        loop {
            if held.client.as_ref().is_some_and(Client::is_closed) {
                held.drop_connection();
            }
            let client = match &mut held.client {
                Some(client) => client,
                slot => {
                    reused = false;
                    slot.insert(self.connect()?)
                }
            };
            match take_instance_patiently(client, name) {
                Ok(taken) => {
                    if taken {
                        held.taken(name);
                    }
                    return Ok(taken);
                }
                Err(e) => {
                    held.drop_connection();
                    if !reused || e.as_db_error().is_some() {
                        return Err(engine_error(&self.location, "hold instance", &e));
                    }
                    reused = false;
                }
            }
        }
    }

    /// True the first time only: the caller then starts the thread running [`Holder::keep`].
    fn start_keeper(&self) -> bool {
        !std::mem::replace(&mut locked(&self.state).keeper_started, true)
    }

    /// Checks the connection; once it broke, reconnects and takes the instances again.
    fn keep(&self) {
        let mut held = locked(&self.state);
        if held.names.is_empty() {
            return;
        }
        let alive = held
            .client
            .as_mut()
            .is_some_and(|c| !c.is_closed() && c.is_valid(PING_TIMEOUT).is_ok());
        if !alive {
            if held.client.is_some() {
                warn!(location = %self.location, "postgres: the instance connection broke, reconnecting");
            }
            held.drop_connection();
            match self.connect() {
                Ok(fresh) => held.client = Some(fresh),
                Err(e) => {
                    debug!("postgres: cannot reconnect the instance connection yet: {e}");
                    return;
                }
            }
        }
        let to_take: Vec<String> = held.retake.iter().cloned().collect();
        for name in to_take {
            let Some(client) = held.client.as_mut() else {
                return;
            };
            match take_instance(client, &name) {
                Ok(true) => {
                    info!(instance = %name, "postgres: instance held again");
                    held.taken(&name);
                }
                Ok(false) => {
                    if held.elsewhere.insert(name.clone()) {
                        warn!(instance = %name, "postgres: another process holds this instance now");
                    }
                }
                Err(e) => {
                    debug!(
                        "postgres: cannot take the instances again yet: {}",
                        error_text(&e)
                    );
                    held.drop_connection();
                    return;
                }
            }
        }
    }

    fn connect(&self) -> Result<Client> {
        let mut client = connect(&self.config, &self.location)?;
        client
            .batch_execute(HOLDER_KEEPALIVES)
            .map_err(|e| engine_error(&self.location, "instance keepalives", &e))?;
        Ok(client)
    }

    /// Closes the connection: the instances are free at once.
    fn release(&self) {
        let client = locked(&self.state).client.take();
        drop(client);
    }
}

/// Takes instance `name`, trying again for a moment: another instance's
/// [`Engine::instance_alive`] holds the lock for an instant when it finds it free, and must not
/// pass for a live holder.
fn take_instance_patiently(client: &mut Client, name: &str) -> PgResult<bool> {
    for _ in 1..HOLD_TRIES {
        if take_instance(client, name)? {
            return Ok(true);
        }
        std::thread::sleep(HOLD_TRY_PAUSE);
    }
    take_instance(client, name)
}

fn take_instance(client: &mut Client, name: &str) -> PgResult<bool> {
    let key = advisory_key(INSTANCE_NAMESPACE, name);
    client.query_one(HOLD_INSTANCE, &[&key])?.try_get(0)
}

/// Tells background threads that the engine is closing.
#[derive(Default)]
struct Closing {
    closed: Mutex<bool>,
    signal: Condvar,
}

impl Closing {
    fn close(&self) {
        *locked(&self.closed) = true;
        self.signal.notify_all();
    }

    fn is_closed(&self) -> bool {
        *locked(&self.closed)
    }

    /// Waits up to `time`; true if the engine is closing.
    fn wait(&self, time: Duration) -> bool {
        let closed = locked(&self.closed);
        *self
            .signal
            .wait_timeout_while(closed, time, |closed| !*closed)
            .unwrap_or_else(PoisonError::into_inner)
            .0
    }
}

/// A new connection listening on [`LISTEN_CHANNELS`].
fn subscribe(config: &Config, location: &str) -> Result<Client> {
    let mut client = connect(config, location)?;
    let listen: String = LISTEN_CHANNELS
        .iter()
        .map(|channel| format!("LISTEN \"{channel}\";"))
        .collect();
    client
        .batch_execute(&listen)
        .map_err(|e| engine_error(location, "listen", &e))?;
    Ok(client)
}

/// The listener thread: calls `wake` for each notification until the engine closes;
/// reconnects with backoff when the connection breaks (and then wakes every channel, for what
/// was notified meanwhile).
fn listen_until_closed(
    client: Client,
    config: &Config,
    location: &str,
    wake: &(dyn Fn(&str) + Send + Sync),
    closing: &Closing,
) {
    let mut client = Some(client);
    let mut backoff = RECONNECT_FIRST;
    let mut last_heard = Instant::now();
    while !closing.is_closed() {
        let Some(connection) = client.as_mut() else {
            if closing.wait(backoff) {
                break;
            }
            match subscribe(config, location) {
                Ok(fresh) => {
                    info!(%location, "postgres: listener reconnected");
                    client = Some(fresh);
                    backoff = RECONNECT_FIRST;
                    last_heard = Instant::now();
                    for channel in LISTEN_CHANNELS {
                        wake(channel);
                    }
                }
                Err(e) => {
                    debug!("postgres: listener cannot reconnect yet: {e}");
                    backoff = (backoff * 2).min(RECONNECT_LAST);
                }
            }
            continue;
        };
        let mut broken = false;
        {
            let mut notifications = connection.notifications();
            let mut heard = notifications.timeout_iter(LISTEN_POLL);
            loop {
                match postgres::fallible_iterator::FallibleIterator::next(&mut heard) {
                    Ok(Some(notification)) => {
                        last_heard = Instant::now();
                        wake(notification.channel());
                    }
                    Ok(None) => break,
                    Err(e) => {
                        debug!("postgres: listener connection failed: {}", error_text(&e));
                        broken = true;
                        break;
                    }
                }
            }
        }
        if !broken && connection.is_closed() {
            broken = true;
        }
        if !broken && last_heard.elapsed() >= LISTEN_PING {
            broken = connection.is_valid(PING_TIMEOUT).is_err();
            last_heard = Instant::now();
        }
        if broken {
            warn!(%location, "postgres: the listener lost its connection, reconnecting");
            client = None;
        }
    }
}

/// Applies the missing migrations, under a session advisory lock so that instances starting
/// together do not race; returns the version the database had.
fn migrate(client: &mut Client, location: &str) -> Result<u32> {
    let key = advisory_key(MIGRATION_LOCK.0, MIGRATION_LOCK.1);
    // Another instance may take its time migrating: wait for it without limit.
    client
        .batch_execute("SET lock_timeout = 0")
        .and_then(|()| client.execute("SELECT pg_advisory_lock($1)", &[&key]))
        .map_err(|e| engine_error(location, "migration lock", &e))?;
    let migrated = apply_migrations(client, location);
    let unlocked = client
        .execute("SELECT pg_advisory_unlock($1)", &[&key])
        .and_then(|_| client.batch_execute("RESET lock_timeout"));
    let found = migrated?;
    unlocked.map_err(|e| engine_error(location, "migration unlock", &e))?;
    Ok(found)
}

fn apply_migrations(client: &mut Client, location: &str) -> Result<u32> {
    let failed = |doing: &str, e: postgres::Error| engine_error(location, doing, &e);
    let mut transaction = client.transaction().map_err(|e| failed("migration", e))?;
    transaction
        .batch_execute(SCHEMA_TABLE)
        .map_err(|e| failed("schema table", e))?;
    let row = transaction
        .query_one("SELECT max(version) FROM reach_schema", &[])
        .map_err(|e| failed("schema version", e))?;
    let found = version_of(column(&row, 0)?)?.unwrap_or(0);
    if found > SCHEMA_VERSION {
        return Err(StoreError::Schema {
            found,
            expected: SCHEMA_VERSION,
        });
    }
    for (version, sql) in MIGRATIONS.iter().filter(|(version, _)| *version > found) {
        let doing = format!("migration {version}");
        transaction
            .batch_execute(sql)
            .map_err(|e| failed(&doing, e))?;
        transaction
            .execute(
                "INSERT INTO reach_schema (version) VALUES ($1)",
                &[&i32::try_from(*version).unwrap_or(i32::MAX)],
            )
            .map_err(|e| failed(&doing, e))?;
    }
    transaction
        .commit()
        .map_err(|e| failed("migration commit", e))?;
    Ok(found)
}

/// The schema version the database has (`None`: no Reach schema yet).
fn applied_version(client: &mut Client) -> PgResult<Option<u32>> {
    let exists: bool = client
        .query_one("SELECT to_regclass('reach_schema') IS NOT NULL", &[])?
        .try_get(0)?;
    if !exists {
        return Ok(None);
    }
    let found: Option<i32> = client
        .query_one("SELECT max(version) FROM reach_schema", &[])?
        .try_get(0)?;
    Ok(found.and_then(|v| u32::try_from(v).ok()))
}

fn version_of(found: Option<i32>) -> Result<Option<u32>> {
    found
        .map(|v| {
            u32::try_from(v)
                .map_err(|_| StoreError::Corrupt(format!("postgres: schema version {v}")))
        })
        .transpose()
}

/// `config` with this password.
fn with_password(mut config: Config, password: &str) -> Config {
    config.password(password);
    config
}

/// The URL as it may be shown: where the database is, never the password.
pub fn redact(url: &str) -> String {
    match parse_url(url) {
        Ok(config) => format!("postgres://{}", location(&config)),
        Err(_) => "postgres://(an unreadable URL)".to_owned(),
    }
}

/// The 64-bit key of advisory lock `name`: the first 8 bytes of SHA-256(namespace + name).
/// Stable across versions and instances (they must agree on it).
fn advisory_key(namespace: &str, name: &str) -> i64 {
    let digest = Sha256::new()
        .chain_update(namespace.as_bytes())
        .chain_update(name.as_bytes())
        .finalize();
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    i64::from_be_bytes(first)
}

fn parse_url(url: &str) -> Result<Config> {
    let mut config = Config::from_str(url).map_err(|e| {
        // The reason names an option, but could quote a character of a key=value string.
        if url.contains("password") {
            StoreError::Engine("postgres: the database URL is not valid".to_owned())
        } else {
            StoreError::Engine(format!("postgres: the database URL is not valid: {e}"))
        }
    })?;
    if config.get_application_name().is_none() {
        config.application_name("reach");
    }
    if config.get_connect_timeout().is_none() {
        config.connect_timeout(CONNECT_TIMEOUT);
    }
    config.notice_callback(|notice| debug!("postgres notice: {}", notice.message()));
    Ok(config)
}

/// `user@host:port/database` (hosts and ports as given; never the password).
fn location(config: &Config) -> String {
    let ports = config.get_ports();
    let port = |i: usize| ports.get(i).or(ports.first()).copied().unwrap_or(5432);
    let hosts: Vec<String> = config
        .get_hosts()
        .iter()
        .enumerate()
        .map(|(i, host)| match host {
            Host::Tcp(name) => format!("{name}:{}", port(i)),
            Host::Unix(path) => format!("{}:{}", path.display(), port(i)),
        })
        .collect();
    format!(
        "{}@{}/{}",
        config.get_user().unwrap_or("(default user)"),
        if hosts.is_empty() {
            "(default host)".to_owned()
        } else {
            hosts.join(",")
        },
        config.get_dbname().unwrap_or("(default database)")
    )
}

/// `config` for the connections of transactions: their lock waits are limited to
/// [`LOCK_WAIT_LIMIT`] (set at connection, so it costs no round trip), unless the URL's own
/// `options` set `lock_timeout` (they come after, and the last setting wins).
fn with_lock_wait_limit(config: &Config) -> Config {
    let limit = format!("-c lock_timeout={}", LOCK_WAIT_LIMIT.as_millis());
    let options = match config.get_options() {
        Some(given) => format!("{limit} {given}"),
        None => limit,
    };
    let mut config = config.clone();
    config.options(&options);
    config
}

fn connect(config: &Config, location: &str) -> Result<Client> {
    debug!(%location, "postgres: connecting");
    config.connect(NoTls).map_err(|e| {
        StoreError::Unavailable(format!(
            "postgres: cannot connect to {location}: {}",
            error_text(&e)
        ))
    })
}

/// A PostgreSQL error as the store reports it in a transaction: a conflict (serialization
/// failure, deadlock, unique key, a lock waited for too long) or an engine error.
fn store_error(location: &str, doing: &str, e: &postgres::Error) -> StoreError {
    let conflict = [
        SqlState::T_R_SERIALIZATION_FAILURE,
        SqlState::T_R_DEADLOCK_DETECTED,
        SqlState::UNIQUE_VIOLATION,
        SqlState::LOCK_NOT_AVAILABLE,
    ];
    match e.code() {
        Some(code) if conflict.contains(code) => StoreError::Conflict,
        _ => engine_error(location, doing, e),
    }
}

fn engine_error(location: &str, doing: &str, e: &postgres::Error) -> StoreError {
    let text = format!("postgres {location}: {doing}: {}", error_text(e));
    if is_unavailable(e) {
        StoreError::Unavailable(text)
    } else {
        StoreError::Engine(text)
    }
}

/// Whether the error is the server being out of reach (a connection lost or refused, the
/// server shutting down or starting), rather than a statement it refused: worth trying again
/// once it is back.
fn is_unavailable(e: &postgres::Error) -> bool {
    match e.as_db_error() {
        // Class 08: connection exception; 57P01-57P03: shutting down, cannot connect now.
        Some(db) => {
            let code = db.code().code();
            code.starts_with("08") || matches!(code, "57P01" | "57P02" | "57P03")
        }
        None => true,
    }
}

/// What went wrong, without the server's DETAIL (which can quote the values of a row).
fn error_text(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => format!("{} {} ({})", db.severity(), db.message(), db.code().code()),
        None => {
            // The reason (e.g. the I/O error) is a source, not in the message.
            let mut text = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(reason) = source {
                text.push_str(&format!(": {reason}"));
                source = reason.source();
            }
            text
        }
    }
}

/// Column `index` of a row, as `T`.
fn column<'r, T: FromSql<'r>>(row: &'r Row, index: usize) -> Result<T> {
    row.try_get(index)
        .map_err(|e| StoreError::Engine(format!("postgres: column {index}: {e}")))
}

fn locked<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::super::engine::Txn;
    use super::super::pg_cluster::PgCluster;
    use super::*;
    use std::io::{BufRead, BufReader};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{mpsc, Barrier};
    use std::thread;

    const T: Tree = Tree::records("t");
    const OTHER: Tree = Tree::records("other");
    const C: Tree = Tree::counts("c");

    /// A fresh database on the test binary's server, and an engine open on it.
    struct Db {
        engine: Postgres,
        url: String,
        cluster: Arc<PgCluster>,
    }

    impl Db {
        fn new() -> Db {
            let cluster = PgCluster::shared();
            let url = cluster.create_database();
            let engine = Postgres::open(&url).expect("open the engine");
            Db {
                engine,
                url,
                cluster,
            }
        }

        /// Another instance on the same database.
        fn another_instance(&self) -> Postgres {
            Postgres::open(&self.url).expect("open a second instance")
        }

        fn name(&self) -> &str {
            database_name(&self.url)
        }
    }

    fn database_name(url: &str) -> &str {
        url.rsplit('/').next().expect("a database in the URL")
    }

    fn txn(engine: &Postgres) -> Txn<'_> {
        Txn::new(engine.begin().expect("begin"))
    }

    fn keys(found: &[(Vec<u8>, Vec<u8>)]) -> Vec<Vec<u8>> {
        found.iter().map(|(k, _)| k.clone()).collect()
    }

    fn bytes(list: &[&[u8]]) -> Vec<Vec<u8>> {
        list.iter().map(|k| k.to_vec()).collect()
    }

    /// Waits until `check` holds; panics after `patience`. Returns how long it took.
    fn wait_until(what: &str, patience: Duration, mut check: impl FnMut() -> bool) -> Duration {
        let began = Instant::now();
        while !check() {
            assert!(
                began.elapsed() < patience,
                "{what}: still not after {patience:?}"
            );
            thread::sleep(Duration::from_millis(20));
        }
        began.elapsed()
    }

    /// Collects the channels an engine's listener is woken for.
    fn listener(engine: &Postgres) -> mpsc::Receiver<String> {
        let (tx, rx) = mpsc::channel();
        let tx = Mutex::new(tx);
        engine
            .listen(Box::new(move |channel| {
                let _ = locked(&tx).send(channel.to_owned());
            }))
            .expect("listen");
        rx
    }

    #[test]
    fn records_are_written_read_removed_and_scanned_in_byte_order() {
        let db = Db::new();
        let e = &db.engine;
        // In byte order.
        let stored: [&[u8]; 9] = [
            b"a",
            b"a\x00",
            b"ab",
            b"a\xff",
            b"a\xff\x00",
            b"a\xff\xff",
            b"b",
            b"\xff",
            b"\xff\xff\x01",
        ];
        let mut t = txn(e);
        for k in stored {
            t.put(T, k, k.to_vec()).unwrap();
        }
        t.put(OTHER, b"a", b"other tree".to_vec()).unwrap();
        t.commit(true).unwrap();

        let mut t = txn(e);
        assert_eq!(t.get(T, b"a\xff").unwrap(), Some(b"a\xff".to_vec()));
        assert_eq!(t.get(T, b"zz").unwrap(), None);
        assert_eq!(t.get(OTHER, b"a").unwrap(), Some(b"other tree".to_vec()));
        assert_eq!(t.get(OTHER, b"b").unwrap(), None);
        let all = t.scan(T, &KeyRange::all(), usize::MAX).unwrap();
        assert_eq!(keys(&all), bytes(&stored), "bytewise order, like sled");
        assert!(all.iter().all(|(k, v)| k == v));
        assert_eq!(
            keys(&t.scan_prefix(T, b"a").unwrap()),
            bytes(&[b"a", b"a\x00", b"ab", b"a\xff", b"a\xff\x00", b"a\xff\xff"])
        );
        assert_eq!(
            keys(&t.scan_prefix(T, b"a\xff").unwrap()),
            bytes(&[b"a\xff", b"a\xff\x00", b"a\xff\xff"]),
            "a prefix ending in 0xff ends before b"
        );
        assert_eq!(
            keys(&t.scan_prefix(T, b"\xff").unwrap()),
            bytes(&[b"\xff", b"\xff\xff\x01"]),
            "a prefix of 0xff bytes only runs to the end of the tree"
        );
        assert_eq!(
            keys(&t.scan(T, &KeyRange::prefix(b"a"), 2).unwrap()),
            bytes(&[b"a", b"a\x00"])
        );
        assert_eq!(
            keys(&t.scan(T, &KeyRange::all(), 3).unwrap()),
            bytes(&[b"a", b"a\x00", b"ab"])
        );
        assert!(t.scan(T, &KeyRange::all(), 0).unwrap().is_empty());
        assert_eq!(
            keys(&t.scan(T, &KeyRange::below(b"a\xff"), usize::MAX).unwrap()),
            bytes(&[b"a", b"a\x00", b"ab"])
        );
        let middle = KeyRange {
            start: b"a\xff\x00".to_vec(),
            end: Some(b"b\x00".to_vec()),
        };
        assert_eq!(
            keys(&t.scan(T, &middle, usize::MAX).unwrap()),
            bytes(&[b"a\xff\x00", b"a\xff\xff", b"b"])
        );
        assert!(t.scan_prefix(T, b"c").unwrap().is_empty());
        drop(t);

        let mut t = txn(e);
        t.remove(T, b"a");
        assert_eq!(t.remove_prefix(T, b"a\xff").unwrap(), 3);
        t.put(T, b"b", b"changed".to_vec()).unwrap();
        t.remove(T, b"never stored");
        t.commit(true).unwrap();
        let mut t = txn(e);
        assert_eq!(t.get(T, b"a").unwrap(), None);
        assert_eq!(t.get(T, b"b").unwrap(), Some(b"changed".to_vec()));
        assert_eq!(
            keys(&t.scan(T, &KeyRange::all(), usize::MAX).unwrap()),
            bytes(&[b"a\x00", b"ab", b"b", b"\xff", b"\xff\xff\x01"])
        );
        assert_eq!(e.len(T).unwrap(), 5);
        assert_eq!(e.len(OTHER).unwrap(), 1);
        assert_eq!(e.len(Tree::records("empty")).unwrap(), 0);
    }

    #[test]
    fn counts_are_added_set_removed_and_scanned_as_big_endian_numbers() {
        let db = Db::new();
        let e = &db.engine;
        let mut t = txn(e);
        assert_eq!(t.add(C, b"x", 2).unwrap(), 2);
        assert_eq!(t.add(C, b"y", 5).unwrap(), 5);
        assert_eq!(t.add(C, b"z", 1).unwrap(), 1);
        assert_eq!(t.add(C, b"never", -3).unwrap(), 0);
        t.commit(true).unwrap();

        let mut t = txn(e);
        assert_eq!(t.add(C, b"x", 3).unwrap(), 5, "added to what is stored");
        assert_eq!(t.add(C, b"z", -1).unwrap(), 0);
        t.commit(false).unwrap();
        let mut t = txn(e);
        assert_eq!(t.count(C, b"x").unwrap(), 5);
        assert_eq!(t.count(C, b"z").unwrap(), 0);
        assert_eq!(t.count(C, b"never").unwrap(), 0);
        assert_eq!(t.get(C, b"x").unwrap(), None, "counts are not records");
        drop(t);
        assert_eq!(e.len(C).unwrap(), 2, "counts at 0 are deleted");

        // A removal then an addition is committed as a set count.
        let mut t = txn(e);
        t.remove(C, b"y");
        assert_eq!(t.add(C, b"y", 7).unwrap(), 7);
        t.remove(C, b"x");
        t.remove(C, b"w");
        assert_eq!(t.add(C, b"w", 0).unwrap(), 0);
        t.commit(true).unwrap();
        let mut t = txn(e);
        assert_eq!(t.count(C, b"y").unwrap(), 7);
        assert_eq!(t.count(C, b"x").unwrap(), 0);
        assert_eq!(t.count(C, b"w").unwrap(), 0);
        drop(t);
        assert_eq!(e.len(C).unwrap(), 1);

        let mut t = txn(e);
        t.add(C, b"p\x01", 300).unwrap();
        t.add(C, b"p\x02", 1).unwrap();
        t.add(C, b"q", 9).unwrap();
        t.add(C, b"big", i64::MAX).unwrap();
        t.commit(true).unwrap();
        let mut t = txn(e);
        t.add(C, b"big", i64::MAX).unwrap();
        t.commit(true).unwrap();
        let mut t = txn(e);
        assert_eq!(t.count(C, b"big").unwrap(), i64::MAX, "saturates like sled");
        let found = t.scan_prefix(C, b"p").unwrap();
        assert_eq!(
            found,
            vec![
                (b"p\x01".to_vec(), 300i64.to_be_bytes().to_vec()),
                (b"p\x02".to_vec(), 1i64.to_be_bytes().to_vec()),
            ]
        );
        assert_eq!(
            keys(&t.scan(C, &KeyRange::all(), 2).unwrap()),
            bytes(&[b"big", b"p\x01"])
        );
        assert_eq!(e.len(T).unwrap(), 0, "counts are not in the record trees");
    }

    #[test]
    fn a_commit_of_thousands_of_writes_lands_all_at_once() {
        const N: usize = 5_000;
        let db = Db::new();
        let e = &db.engine;
        let done = AtomicBool::new(false);
        let (commit_time, seen) = thread::scope(|s| {
            // A reader counting all along sees none or all, never a part.
            let reader = s.spawn(|| {
                let mut seen = BTreeSet::new();
                while !done.load(Ordering::Relaxed) {
                    seen.insert(e.len(T).unwrap());
                }
                seen.insert(e.len(T).unwrap());
                seen
            });
            let mut t = txn(e);
            for i in 0..N {
                t.put(T, format!("k{i:05}").as_bytes(), vec![b'v'; 100])
                    .unwrap();
                t.add(C, format!("n{}", i % 10).as_bytes(), 1).unwrap();
            }
            let began = Instant::now();
            t.commit(true).unwrap();
            let commit_time = began.elapsed();
            thread::sleep(Duration::from_millis(50));
            done.store(true, Ordering::Relaxed);
            (commit_time, reader.join().unwrap())
        });
        eprintln!(
            "commit of {N} puts + {N} additions (10 counters): {} ms",
            commit_time.as_millis()
        );
        assert_eq!(seen.last(), Some(&(N as u64)));
        assert!(
            seen.iter().all(|n| *n == 0 || *n == N as u64),
            "partial commit seen: {seen:?}"
        );
        let mut t = txn(e);
        assert_eq!(t.count(C, b"n7").unwrap(), (N / 10) as i64);
        assert_eq!(t.scan_prefix(T, b"k").unwrap().len(), N);
    }

    #[test]
    fn a_conflicting_insert_rolls_back_the_whole_commit() {
        let db = Db::new();
        let e = &db.engine;
        let mut t = txn(e);
        for i in 0..100 {
            t.put(T, format!("p{i}").as_bytes(), b"lost".to_vec())
                .unwrap();
        }
        t.add(C, b"n", 1).unwrap();
        t.notify("reach_email");
        assert!(t.insert_new(T, b"unique", b"mine".to_vec()).unwrap());
        // Another transaction commits the same key first.
        let mut other = txn(e);
        assert!(other.insert_new(T, b"unique", b"theirs".to_vec()).unwrap());
        other.commit(true).unwrap();
        assert!(matches!(t.commit(true), Err(StoreError::Conflict)));

        let mut t = txn(e);
        assert_eq!(t.get(T, b"unique").unwrap(), Some(b"theirs".to_vec()));
        assert!(!t.insert_new(T, b"unique", b"again".to_vec()).unwrap());
        assert_eq!(t.count(C, b"n").unwrap(), 0);
        drop(t);
        assert_eq!(
            e.len(T).unwrap(),
            1,
            "nothing of the failed commit was applied"
        );

        // The engine goes on (the failed transaction's connection was rolled back).
        for i in 0..(POOL_SIZE as u8 + 2) {
            let mut t = txn(e);
            t.put(T, &[b'z', i], Vec::new()).unwrap();
            t.commit(true).unwrap();
        }
        assert_eq!(e.len(T).unwrap(), 1 + POOL_SIZE as u64 + 2);
    }

    #[test]
    fn a_transaction_dropped_without_commit_applies_nothing_and_frees_its_locks() {
        let db = Db::new();
        let e = &db.engine;
        let mut t = txn(e);
        t.put(T, b"k", b"v".to_vec()).unwrap();
        t.add(C, b"n", 1).unwrap();
        t.lock("alice").unwrap();
        assert!(t.try_lock("job").unwrap());
        assert!(t.next_id().unwrap() > 0);
        drop(t);
        // A backend that did write statements, dropped: rolled back too.
        let mut b = e.begin().unwrap();
        assert!(b.lock("bob", true).unwrap());
        drop(b);

        let mut t = txn(e);
        assert_eq!(t.get(T, b"k").unwrap(), None);
        assert_eq!(t.count(C, b"n").unwrap(), 0);
        assert!(t.try_lock("alice").unwrap());
        assert!(t.try_lock("job").unwrap());
        assert!(t.try_lock("bob").unwrap());
        drop(t);
        assert_eq!(e.len(T).unwrap(), 0);
    }

    #[test]
    fn of_two_transactions_inserting_one_key_exactly_one_commits() {
        let db = Db::new();
        let e = &db.engine;
        for round in 0..5u8 {
            let key = [b'k', round];
            let barrier = Barrier::new(2);
            let outcomes: Vec<Result<()>> = thread::scope(|s| {
                let runs: Vec<_> = (0..2u8)
                    .map(|who| {
                        let barrier = &barrier;
                        s.spawn(move || {
                            let mut t = txn(e);
                            assert!(t.insert_new(T, &key, vec![who]).unwrap());
                            barrier.wait();
                            t.commit(true)
                        })
                    })
                    .collect();
                runs.into_iter().map(|r| r.join().unwrap()).collect()
            });
            assert_eq!(
                outcomes.iter().filter(|o| o.is_ok()).count(),
                1,
                "{outcomes:?}"
            );
            assert_eq!(
                outcomes
                    .iter()
                    .filter(|o| matches!(o, Err(StoreError::Conflict)))
                    .count(),
                1,
                "{outcomes:?}"
            );
        }
        assert_eq!(e.len(T).unwrap(), 5);
    }

    #[test]
    fn increments_from_two_instances_at_once_are_never_lost() {
        const EACH: i64 = 200;
        let db = Db::new();
        let second = db.another_instance();
        let barrier = Barrier::new(2);
        thread::scope(|s| {
            for engine in [&db.engine, &second] {
                let barrier = &barrier;
                s.spawn(move || {
                    barrier.wait();
                    for i in 0..EACH {
                        let mut t = txn(engine);
                        t.add(C, b"hits", 1).unwrap();
                        t.add(C, b"shared", if i % 2 == 0 { 2 } else { -1 })
                            .unwrap();
                        t.commit(i % 2 == 0).unwrap();
                    }
                });
            }
        });
        let mut t = txn(&db.engine);
        assert_eq!(t.count(C, b"hits").unwrap(), 2 * EACH);
        assert_eq!(t.count(C, b"shared").unwrap(), EACH);
    }

    #[test]
    fn two_transactions_claim_disjoint_records() {
        const Q: Tree = Tree::records("queue");
        let db = Db::new();
        let e = &db.engine;
        let mut t = txn(e);
        for i in 0..10u8 {
            t.put(Q, &[b'q', i], vec![i]).unwrap();
        }
        t.put(Q, b"r", Vec::new()).unwrap();
        t.commit(true).unwrap();
        let due = KeyRange::prefix(b"q");

        let barrier = Barrier::new(2);
        let claimed: Vec<Vec<Vec<u8>>> = thread::scope(|s| {
            let runs: Vec<_> = (0..2)
                .map(|_| {
                    let (barrier, due) = (&barrier, &due);
                    s.spawn(move || {
                        let mut t = txn(e);
                        barrier.wait();
                        let mine = keys(&t.claim(Q, due, 5).unwrap());
                        // Both hold their claims until both claimed.
                        barrier.wait();
                        t.commit(false).unwrap();
                        mine
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        assert_eq!(claimed[0].len(), 5);
        assert_eq!(claimed[1].len(), 5);
        let all: BTreeSet<Vec<u8>> = claimed.concat().into_iter().collect();
        assert_eq!(all.len(), 10, "disjoint: {claimed:?}");

        // Claims last until the transaction ends, then the records are free again.
        let mut first = txn(e);
        assert_eq!(
            keys(&first.claim(Q, &due, 3).unwrap()),
            bytes(&[b"q\x00", b"q\x01", b"q\x02"])
        );
        assert_eq!(
            keys(&first.claim(Q, &due, 1).unwrap()),
            bytes(&[b"q\x00"]),
            "a transaction sees its own claims"
        );
        let mut second = txn(e);
        assert_eq!(second.claim(Q, &due, usize::MAX).unwrap().len(), 7);
        let mut third = txn(e);
        assert!(third.claim(Q, &due, usize::MAX).unwrap().is_empty());
        drop(first);
        assert_eq!(third.claim(Q, &due, usize::MAX).unwrap().len(), 3);
        let below = KeyRange::below(b"q\x05");
        drop(second);
        assert_eq!(
            keys(&third.claim(Q, &below, 10).unwrap()),
            bytes(&[b"q\x00", b"q\x01", b"q\x02", b"q\x03", b"q\x04"])
        );
    }

    #[test]
    fn a_waiting_lock_waits_until_the_holder_commits() {
        let db = Db::new();
        let e = &db.engine;
        let mut first = txn(e);
        first.lock("alice").unwrap();
        first.put(T, b"by", b"first".to_vec()).unwrap();
        let (tx, rx) = mpsc::channel();
        thread::scope(|s| {
            s.spawn(move || {
                let mut second = txn(e);
                second.lock("alice").unwrap();
                tx.send(second.get(T, b"by").unwrap()).unwrap();
                second.commit(true).unwrap();
            });
            assert!(
                rx.recv_timeout(Duration::from_millis(300)).is_err(),
                "the second transaction did not wait"
            );
            first.commit(true).unwrap();
            assert_eq!(
                rx.recv_timeout(Duration::from_secs(5)).unwrap(),
                Some(b"first".to_vec()),
                "the second transaction sees what the first committed"
            );
        });
    }

    #[test]
    fn try_lock_fails_while_another_transaction_holds_the_lock() {
        let db = Db::new();
        let e = &db.engine;
        let mut a = txn(e);
        assert!(a.try_lock("job:1").unwrap());
        assert!(a.try_lock("job:1").unwrap(), "held again by its holder");
        let mut b = txn(e);
        assert!(!b.try_lock("job:1").unwrap());
        assert!(b.try_lock("job:2").unwrap());
        assert!(
            matches!(b.lock("job:1"), Err(StoreError::Busy)),
            "a second lock never waits"
        );
        a.commit(true).unwrap();
        assert!(
            b.try_lock("job:1").unwrap(),
            "free once its holder committed"
        );
        b.commit(true).unwrap();
    }

    #[test]
    fn a_deadlock_between_two_waiting_transactions_ends_one_as_a_conflict() {
        let db = Db::new();
        let e = &db.engine;
        let barrier = Barrier::new(2);
        let outcomes: Vec<(bool, Result<()>)> = thread::scope(|s| {
            let runs: Vec<_> = [("x", "y"), ("y", "x")]
                .into_iter()
                .map(|(mine, theirs)| {
                    let barrier = &barrier;
                    s.spawn(move || {
                        let mut b = e.begin().unwrap();
                        assert!(b.lock(mine, true).unwrap());
                        barrier.wait();
                        let took = b.lock(theirs, true).unwrap();
                        if !took {
                            assert!(
                                matches!(b.get(T, b"k"), Err(StoreError::Conflict)),
                                "the transaction ended"
                            );
                        }
                        (took, b.commit(Commit::default()))
                    })
                })
                .collect();
            runs.into_iter().map(|r| r.join().unwrap()).collect()
        });
        let winners = outcomes.iter().filter(|(took, r)| *took && r.is_ok());
        let losers = outcomes
            .iter()
            .filter(|(took, r)| !*took && matches!(r, Err(StoreError::Conflict)));
        assert_eq!((winners.count(), losers.count()), (1, 1), "{outcomes:?}");
    }

    #[test]
    fn a_lock_held_too_long_is_a_conflict() {
        let db = Db::new();
        // The URL's options come after the engine's own limit (30 s), and win.
        let impatient =
            Postgres::open(&format!("{}?options=-c%20lock_timeout%3D200", db.url)).unwrap();
        let mut holder = txn(&db.engine);
        holder.lock("alice").unwrap();
        let mut waiter = txn(&impatient);
        let began = Instant::now();
        assert!(matches!(waiter.lock("alice"), Err(StoreError::Conflict)));
        assert!(began.elapsed() < Duration::from_secs(5));
        holder.commit(true).unwrap();
    }

    #[test]
    fn ids_increase_across_instances_and_are_never_reused() {
        let db = Db::new();
        let second = db.another_instance();
        let mut last = 0;
        for i in 0..20 {
            let engine = if i % 2 == 0 { &db.engine } else { &second };
            let mut t = txn(engine);
            let id = t.next_id().unwrap();
            assert!(id > last, "{id} after {last}");
            last = id;
            // Rolled back: the id is still never handed out again.
        }
        let ids: Vec<u64> = thread::scope(|s| {
            let runs: Vec<_> = [&db.engine, &second]
                .into_iter()
                .map(|engine| {
                    s.spawn(move || {
                        let mut t = txn(engine);
                        (0..100).map(|_| t.next_id().unwrap()).collect::<Vec<_>>()
                    })
                })
                .collect();
            runs.into_iter().flat_map(|r| r.join().unwrap()).collect()
        });
        let distinct: BTreeSet<u64> = ids.iter().copied().collect();
        assert_eq!(distinct.len(), 200);
        assert!(distinct.first().is_some_and(|first| *first > last));
    }

    #[test]
    fn notices_reach_other_instances_only_when_committed() {
        let db = Db::new();
        let sender = db.another_instance();
        let heard = listener(&db.engine);

        let mut t = txn(&sender);
        t.put(T, b"k", Vec::new()).unwrap();
        t.notify("reach_email");
        drop(t);
        let mut t = txn(&sender);
        t.notify("reach_email");
        assert!(t.insert_new(T, b"taken", Vec::new()).unwrap());
        let mut first = txn(&sender);
        first.put(T, b"taken", Vec::new()).unwrap();
        first.commit(true).unwrap();
        assert!(matches!(t.commit(true), Err(StoreError::Conflict)));
        assert!(
            heard.recv_timeout(Duration::from_millis(500)).is_err(),
            "nothing is told of transactions that did not commit"
        );

        let mut t = txn(&sender);
        t.notify("reach_sms");
        t.notify("reach_outbox");
        let sent = Instant::now();
        t.commit(false).unwrap();
        let mut got = BTreeSet::new();
        got.insert(heard.recv_timeout(Duration::from_secs(5)).unwrap());
        let latency = sent.elapsed();
        got.insert(heard.recv_timeout(Duration::from_secs(5)).unwrap());
        assert_eq!(
            got,
            BTreeSet::from(["reach_outbox".to_owned(), "reach_sms".to_owned()])
        );
        eprintln!("notice heard {} µs after commit", latency.as_micros());
        assert!(heard.recv_timeout(Duration::from_millis(200)).is_err());
    }

    #[test]
    fn an_instance_is_alive_while_its_engine_is_open() {
        let db = Db::new();
        let watcher = &db.engine;
        let holder = db.another_instance();
        assert!(holder.hold_instance("reach-1").unwrap());
        assert!(holder.hold_instance("reach-1").unwrap(), "still ours");
        assert!(!watcher.hold_instance("reach-1").unwrap());
        assert!(watcher.instance_alive("reach-1").unwrap());
        assert!(!watcher.instance_alive("reach-2").unwrap());
        assert!(
            !watcher.instance_alive("reach-2").unwrap(),
            "the check leaves no lock behind"
        );
        assert!(watcher.hold_instance("reach-2").unwrap());
        assert!(holder.instance_alive("reach-2").unwrap());

        drop(holder);
        let took = wait_until("dropped holder seen dead", Duration::from_secs(2), || {
            !watcher.instance_alive("reach-1").unwrap()
        });
        eprintln!("instance seen dead {} ms after drop", took.as_millis());
        assert!(watcher.hold_instance("reach-1").unwrap(), "taken over");
    }

    #[test]
    fn an_instance_lost_with_its_connection_is_taken_again_once_free() {
        let db = Db::new();
        let watcher = &db.engine;
        let holder = db.another_instance();
        assert!(holder.hold_instance("reach-1").unwrap());
        // Another process ends the holder's session and takes the instance meanwhile.
        let key = advisory_key(INSTANCE_NAMESPACE, "reach-1");
        let mut thief = Client::connect(&db.url, NoTls).unwrap();
        let session: i32 = thief
            .query_one(
                "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND objsubid = 1 \
                 AND ((classid::bigint << 32) | objid::bigint) = $1 AND database = \
                 (SELECT oid FROM pg_database WHERE datname = current_database())",
                &[&key],
            )
            .unwrap()
            .get(0);
        thief
            .execute("SELECT pg_terminate_backend($1)", &[&session])
            .unwrap();
        thief
            .execute("SELECT pg_advisory_lock($1)", &[&key])
            .unwrap();
        thread::sleep(HOLD_CHECK * 2);
        assert!(
            !holder.hold_instance("reach-1").unwrap(),
            "another process holds it"
        );
        drop(thief);
        let took = wait_until("instance taken again", HOLD_CHECK * 3, || {
            watcher.instance_alive("reach-1").unwrap()
        });
        eprintln!(
            "instance taken again {} ms after it was free",
            took.as_millis()
        );
        assert!(holder.hold_instance("reach-1").unwrap());
        assert!(!watcher.hold_instance("reach-1").unwrap());
    }

    const HOLDER_URL: &str = "REACH_TEST_HOLDER_URL";
    const HOLDER_NAME: &str = "REACH_TEST_HOLDER_NAME";
    const HOLDING: &str = "holding the instance";

    /// The child process of `a_killed_holder_process_releases_its_instance`.
    #[test]
    #[ignore = "run as a child process by a_killed_holder_process_releases_its_instance"]
    fn holder_child_process() {
        let (Ok(url), Ok(name)) = (std::env::var(HOLDER_URL), std::env::var(HOLDER_NAME)) else {
            return;
        };
        let engine = Postgres::open(&url).unwrap();
        assert!(engine.hold_instance(&name).unwrap());
        println!("{HOLDING}");
        thread::sleep(Duration::from_secs(60));
    }

    /// Kills the child process when the test ends, however it ends.
    struct KillOnDrop(std::process::Child);

    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }

    #[test]
    fn a_killed_holder_process_releases_its_instance() {
        let db = Db::new();
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "store::postgres::tests::holder_child_process",
                "--exact",
                "--ignored",
            ])
            .args(["--nocapture", "--test-threads=1"])
            .env(HOLDER_URL, &db.url)
            .env(HOLDER_NAME, "reach-child")
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::null())
            .spawn()
            .unwrap();
        let mut child = KillOnDrop(child);
        let stdout = child.0.stdout.take().unwrap();
        let holding = BufReader::new(stdout)
            .lines()
            .map_while(std::result::Result::ok)
            // libtest prints the test's name on the same line first.
            .any(|line| line.ends_with(HOLDING));
        assert!(holding, "the child process did not hold the instance");
        assert!(db.engine.instance_alive("reach-child").unwrap());

        child.0.kill().unwrap(); // SIGKILL: no goodbye to the server
        child.0.wait().unwrap();
        let took = wait_until("killed holder seen dead", Duration::from_secs(2), || {
            !db.engine.instance_alive("reach-child").unwrap()
        });
        eprintln!(
            "killed instance seen dead {} ms after the kill",
            took.as_millis()
        );
    }

    #[test]
    fn opening_migrates_once_and_refuses_a_newer_schema() {
        let db = Db::new();
        let mut sql = Client::connect(&db.url, NoTls).unwrap();
        let count = |sql: &mut Client| -> i64 {
            sql.query_one("SELECT count(*) FROM reach_schema", &[])
                .unwrap()
                .get(0)
        };
        assert_eq!(count(&mut sql), MIGRATIONS.len() as i64);
        drop(Postgres::open(&db.url).unwrap());
        assert_eq!(count(&mut sql), MIGRATIONS.len() as i64, "idempotent");
        assert!(check(&db.url, None)
            .unwrap()
            .ends_with(&format!("schema version {SCHEMA_VERSION}")));

        sql.execute(
            "INSERT INTO reach_schema (version) VALUES ($1)",
            &[&(SCHEMA_VERSION as i32 + 1)],
        )
        .unwrap();
        let newer = StoreError::Schema {
            found: SCHEMA_VERSION + 1,
            expected: SCHEMA_VERSION,
        };
        for refused in [
            Postgres::open(&db.url).map(drop),
            check(&db.url, None).map(drop),
        ] {
            match refused {
                Err(StoreError::Schema { found, expected }) => {
                    assert_eq!(
                        newer.to_string(),
                        StoreError::Schema { found, expected }.to_string()
                    )
                }
                other => panic!("a newer schema was not refused: {other:?}"),
            }
        }
    }

    #[test]
    fn instances_starting_together_migrate_a_new_database_once() {
        let cluster = PgCluster::shared();
        let url = cluster.create_database();
        let description = check(&url, None).unwrap();
        assert!(description.starts_with("PostgreSQL 15"), "{description}");
        assert!(
            description.ends_with("empty database: the schema is created at first start"),
            "{description}"
        );
        let barrier = Barrier::new(4);
        thread::scope(|s| {
            for _ in 0..4 {
                let (barrier, url) = (&barrier, &url);
                s.spawn(move || {
                    barrier.wait();
                    Postgres::open(url).unwrap()
                });
            }
        });
        let mut sql = Client::connect(&url, NoTls).unwrap();
        let versions: i64 = sql
            .query_one("SELECT count(*) FROM reach_schema", &[])
            .unwrap()
            .get(0);
        assert_eq!(versions, MIGRATIONS.len() as i64);
    }

    #[test]
    fn migrations_are_numbered_from_one_in_order() {
        for (i, (version, _)) in MIGRATIONS.iter().enumerate() {
            assert_eq!(*version as usize, i + 1);
        }
    }

    #[test]
    fn lock_keys_are_stable() {
        // Instances of different versions must agree: these are SHA-256's, computed apart.
        assert_eq!(
            advisory_key(INSTANCE_NAMESPACE, "reach-1"),
            -1664242583177224209
        );
    }

    #[test]
    fn unix_sockets_work_and_passwords_stay_out_of_errors_and_logs() {
        let db = Db::new();
        let socket = db.cluster.socket_dir();
        let socket = socket.to_str().unwrap();
        let port = db.cluster.port();
        let name = db.name();
        for url in [
            db.cluster.socket_url(name),
            format!("postgres://postgres:s3cret-pw@localhost/{name}?host={socket}&port={port}"),
            format!("host={socket} port={port} user=postgres password=s3cret-pw dbname={name}"),
        ] {
            let engine = Postgres::open(&url).unwrap();
            assert!(engine.location().contains(socket), "{}", engine.location());
            assert!(!engine.location().contains("s3cret"));
            let mut t = txn(&engine);
            t.put(T, url.as_bytes(), Vec::new()).unwrap();
            t.commit(true).unwrap();
        }
        assert_eq!(db.engine.len(T).unwrap(), 3);

        for url in [
            "postgres://reach:s3cret-pw@127.0.0.1:1/reach",
            "postgres://reach:s3cret-pw@127.0.0.1:notaport/reach",
            "host=127.0.0.1 port=1 password='s3cret-pw",
        ] {
            let error = match Postgres::open(url) {
                Err(StoreError::Engine(text) | StoreError::Unavailable(text)) => text,
                other => panic!("{url}: {:?}", other.map(|_| ())),
            };
            assert!(!error.contains("s3cret"), "{error}");
            let error = check(url, None).unwrap_err().to_string();
            assert!(!error.contains("s3cret"), "{error}");
        }
        let error = Postgres::open("postgres://reach:s3cret-pw@127.0.0.1:1/reach")
            .err()
            .unwrap()
            .to_string();
        assert!(error.contains("reach@127.0.0.1:1/reach"), "{error}");
    }

    #[test]
    fn the_engine_can_be_dropped_inside_an_async_task() {
        let db = Db::new();
        let engine = db.another_instance();
        assert!(engine.hold_instance("async").unwrap());
        let _heard = listener(&engine);
        let mut t = txn(&engine);
        t.put(T, b"k", Vec::new()).unwrap();
        t.commit(true).unwrap();
        let runtime = tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap();
        runtime.block_on(async move { drop(engine) });
        assert!(!db.engine.instance_alive("async").unwrap());
    }

    #[test]
    fn committed_data_survives_a_server_crash_and_the_engine_reconnects() {
        let cluster = PgCluster::start();
        let url = cluster.create_database();
        let engine = Postgres::open(&url).unwrap();
        let watcher = Postgres::open(&url).unwrap();
        assert!(engine.hold_instance("crashy").unwrap());
        let heard = listener(&engine);
        let mut t = txn(&engine);
        t.put(T, b"kept", b"durable".to_vec()).unwrap();
        t.add(C, b"n", 3).unwrap();
        t.commit(true).unwrap();
        assert!(watcher.instance_alive("crashy").unwrap());

        let pid = cluster.pid().unwrap();
        cluster.kill();
        assert_eq!(cluster.pid(), None, "server {pid} still runs");
        assert!(engine.begin().is_err(), "no server");
        let began = Instant::now();
        cluster.restart();
        eprintln!("crash recovery restart: {} ms", began.elapsed().as_millis());

        // The pool replaces its dead connections by itself.
        let mut t = txn(&engine);
        assert_eq!(t.get(T, b"kept").unwrap(), Some(b"durable".to_vec()));
        assert_eq!(t.count(C, b"n").unwrap(), 3);
        drop(t);
        // The holder takes its instance again.
        let took = wait_until("instance held again", Duration::from_secs(10), || {
            watcher.instance_alive("crashy").unwrap()
        });
        eprintln!("instance held again {} ms after restart", took.as_millis());
        // The listener reconnects, wakes every channel once, and hears new commits.
        let mut woken = BTreeSet::new();
        while woken.len() < LISTEN_CHANNELS.len() {
            woken.insert(heard.recv_timeout(Duration::from_secs(10)).unwrap());
        }
        while heard.try_recv().is_ok() {}
        let mut t = txn(&watcher);
        t.notify("reach_outbox");
        t.commit(true).unwrap();
        assert_eq!(
            heard.recv_timeout(Duration::from_secs(5)).unwrap(),
            "reach_outbox"
        );
    }

    #[test]
    fn measurements() {
        let db = Db::new();
        let e = &db.engine;
        let mut t = txn(e);
        t.put(T, b"k", vec![0; 100]).unwrap();
        t.commit(true).unwrap();
        const N: u32 = 1_000;
        let mut t = txn(e);
        t.get(T, b"k").unwrap();
        let began = Instant::now();
        for _ in 0..N {
            t.get(T, b"k").unwrap();
        }
        let cached = began.elapsed() / N;
        drop(t);
        let mut client = Client::connect(&db.url, NoTls).unwrap();
        let began = Instant::now();
        for _ in 0..N {
            client.query_opt(GET, &[&"t", &b"k".as_slice()]).unwrap();
        }
        let unprepared = began.elapsed() / N;
        let small_commit = |durable: bool| {
            let began = Instant::now();
            for i in 0..N / 10 {
                let mut t = txn(e);
                t.put(T, &i.to_be_bytes(), Vec::new()).unwrap();
                t.commit(durable).unwrap();
            }
            began.elapsed() / (N / 10)
        };
        let (durable, lazy) = (small_commit(true), small_commit(false));
        eprintln!(
            "get: {} µs (prepared once), {} µs (prepared each time); \
             begin + put + commit: {} µs durable, {} µs not durable",
            cached.as_micros(),
            unprepared.as_micros(),
            durable.as_micros(),
            lazy.as_micros()
        );
        eprintln!(
            "test server startup (initdb + start): {} ms",
            db.cluster.startup_time().as_millis()
        );
    }
}
