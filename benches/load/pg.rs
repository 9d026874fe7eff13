//! PostgreSQL for the store benchmarks: a private server (`tests/support/postgres.rs`) with
//! `pg_stat_statements` loaded, so that a measured window can say how many statements (each one
//! round trip from Reach) of each kind a message cost; and a statement log of one database
//! (`log_statement = 'all'`, with the parameters) that says which tree each read touched and
//! which trees each commit wrote.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::postgres::PgCluster;

pub struct Pg {
    pub cluster: Arc<PgCluster>,
}

impl Pg {
    /// Starts a private server and restarts it once with `pg_stat_statements` preloaded (it
    /// counts utility statements, `BEGIN` and `COMMIT`, too: `track_utility` is on by default).
    pub async fn start() -> Pg {
        let cluster = tokio::task::spawn_blocking(|| {
            let cluster = PgCluster::start();
            cluster.psql(
                "postgres",
                "ALTER SYSTEM SET shared_preload_libraries = 'pg_stat_statements'",
            );
            cluster.restart();
            cluster.psql(
                "postgres",
                "CREATE EXTENSION IF NOT EXISTS pg_stat_statements",
            );
            Arc::new(cluster)
        })
        .await
        .expect("start PostgreSQL");
        Pg { cluster }
    }

    /// A fresh database: (URL, name).
    pub async fn database(&self) -> (String, String) {
        let cluster = self.cluster.clone();
        tokio::task::spawn_blocking(move || {
            let url = cluster.create_database();
            let name = url.rsplit('/').next().unwrap_or_default().to_owned();
            (url, name)
        })
        .await
        .expect("create a database")
    }

    /// Logs every statement of sessions opened from now on in `database`, with parameters.
    pub async fn log_statements(&self, database: &str) {
        let cluster = self.cluster.clone();
        let sql = format!("ALTER DATABASE {database} SET log_statement = 'all'");
        tokio::task::spawn_blocking(move || cluster.psql("postgres", &sql))
            .await
            .expect("psql");
    }

    /// The server's log file (written by `pg_ctl -l` beside the socket folder).
    pub fn log_file(&self) -> PathBuf {
        self.cluster
            .socket_dir()
            .parent()
            .expect("cluster folder")
            .join("server.log")
    }

    /// How long the server log is now (where a window's statements start).
    pub fn log_len(&self) -> u64 {
        std::fs::metadata(self.log_file()).map_or(0, |m| m.len())
    }

    /// Statement counts of `databases` so far (pg_stat_statements), by normalized text.
    pub async fn statements(&self, databases: &[String]) -> Statements {
        let cluster = self.cluster.clone();
        let names = databases
            .iter()
            .map(|d| format!("'{d}'"))
            .collect::<Vec<_>>()
            .join(",");
        let sql = format!(
            "SELECT calls::text || ' ' || regexp_replace(query, '\\s+', ' ', 'g') \
             FROM pg_stat_statements s JOIN pg_database d ON d.oid = s.dbid \
             WHERE d.datname IN ({names})"
        );
        let text = tokio::task::spawn_blocking(move || cluster.psql("postgres", &sql))
            .await
            .expect("psql");
        let mut calls = BTreeMap::new();
        for line in text.lines() {
            if let Some((n, query)) = line.split_once(' ') {
                if let Ok(n) = n.parse::<u64>() {
                    *calls.entry(query.to_owned()).or_insert(0) += n;
                }
            }
        }
        Statements { calls }
    }
}

/// The median time of one store read (`get` of a missing key, a prepared statement, as the
/// PostgreSQL engine runs it) from this machine, `samples` back to back: what each of Reach's
/// round trips costs at least. `url` must be a database Reach's schema is in. On a thread of its
/// own (the synchronous client must not run inside an async task).
pub fn read_round_trip(url: &str, samples: usize) -> Duration {
    let url = url.to_owned();
    std::thread::spawn(move || {
        let mut client = postgres::Client::connect(&url, postgres::NoTls).expect("connect");
        let get = client
            .prepare("SELECT value FROM reach_records WHERE tree = $1 AND key = $2")
            .expect("prepare");
        let key: &[u8] = b"no such key";
        let mut times: Vec<Duration> = (0..samples.max(1))
            .map(|_| {
                let t = Instant::now();
                client.query_opt(&get, &[&"users", &key]).expect("get");
                t.elapsed()
            })
            .collect();
        times.sort();
        times[times.len() / 2]
    })
    .join()
    .expect("round-trip thread")
}

/// Statement calls by normalized query text.
#[derive(Debug, Clone, Default)]
pub struct Statements {
    pub calls: BTreeMap<String, u64>,
}

impl Statements {
    /// What was run between `self` (earlier) and `later`, by store operation.
    pub fn delta(&self, later: &Statements) -> OpCounts {
        let mut ops = BTreeMap::new();
        for (query, n) in &later.calls {
            let d = n.saturating_sub(self.calls.get(query).copied().unwrap_or(0));
            if d > 0 {
                *ops.entry(operation(query)).or_insert(0) += d;
            }
        }
        OpCounts { ops }
    }
}

/// Statements (round trips) by store operation.
#[derive(Debug, Clone, Default)]
pub struct OpCounts {
    pub ops: BTreeMap<String, u64>,
}

impl OpCounts {
    /// All statements except the ones that are part of a multi-statement round trip (the `SET
    /// LOCAL` of a relaxed commit goes with its `COMMIT`).
    pub fn round_trips(&self) -> u64 {
        self.ops
            .iter()
            .filter(|(k, _)| !k.starts_with("(commit relaxed"))
            .map(|(_, n)| n)
            .sum()
    }

    pub fn get(&self, op: &str) -> u64 {
        self.ops.get(op).copied().unwrap_or(0)
    }

    /// "12.3 statements/msg (...): get 5.1, lock 1.0, ..." for `messages` messages.
    pub fn per_message(&self, messages: u64) -> String {
        let n = messages.max(1) as f64;
        let mut ops: Vec<(&String, &u64)> = self.ops.iter().collect();
        ops.sort_by(|a, b| b.1.cmp(a.1));
        let parts: Vec<String> = ops
            .iter()
            .map(|(k, v)| format!("{k} {:.3}", **v as f64 / n))
            .collect();
        // A relaxed commit is `SET LOCAL synchronous_commit TO OFF; COMMIT`.
        let relaxed = self.get("(commit relaxed: SET LOCAL)");
        let durable = self.get("COMMIT").saturating_sub(relaxed);
        format!(
            "{:.2} statements/msg; {durable} durable commits ({:.0} msgs each), {relaxed} relaxed, \
             {} read-only (ROLLBACK): {}",
            self.round_trips() as f64 / n,
            messages as f64 / durable.max(1) as f64,
            self.get("ROLLBACK"),
            parts.join(", ")
        )
    }
}

/// The store operation a statement of `src/store/postgres.rs` stands for.
pub fn operation(query: &str) -> String {
    let q = query.trim();
    let name = if q.starts_with("BEGIN") {
        "BEGIN"
    } else if q == "COMMIT" {
        "COMMIT"
    } else if q.starts_with("ROLLBACK") {
        "ROLLBACK"
    } else if q.starts_with("SET LOCAL synchronous_commit") {
        "(commit relaxed: SET LOCAL)"
    } else if q.starts_with("SELECT value FROM reach_records WHERE tree = $1 AND key = $2") {
        "get"
    } else if q.starts_with("SELECT n FROM reach_counts WHERE tree = $1 AND key = $2") {
        "count"
    } else if q.contains("FOR UPDATE SKIP LOCKED") && q.contains("reach_locks") {
        "lock (try)"
    } else if q.contains("FOR UPDATE SKIP LOCKED") {
        "claim"
    } else if q.contains("reach_locks") && q.contains("FOR UPDATE") {
        "lock (wait)"
    } else if q.contains("FROM reach_locks WHERE name = $1") {
        // `SELECT 1 ...`: pg_stat_statements shows the constant as a parameter.
        "lock: exists?"
    } else if q.starts_with("INSERT INTO reach_locks") {
        "lock: first use (own commit)"
    } else if q.starts_with("SELECT key, value FROM reach_records")
        || q.starts_with("SELECT key, n FROM reach_counts")
    {
        "scan"
    } else if q.contains("nextval") {
        "next id"
    } else if q.starts_with("INSERT INTO reach_records") && q.contains("ON CONFLICT") {
        "commit: put"
    } else if q.starts_with("INSERT INTO reach_records") {
        "commit: insert"
    } else if q.starts_with("DELETE FROM reach_records") {
        "commit: remove"
    } else if q
        .starts_with("DELETE FROM reach_counts c USING unnest($1::text[], $2::bytea[]) AS added")
    {
        "commit: prune counts"
    } else if q.starts_with("DELETE FROM reach_counts") {
        "commit: remove counts"
    } else if q.starts_with("INSERT INTO reach_counts AS c") {
        "commit: add"
    } else if q.starts_with("INSERT INTO reach_counts") {
        "commit: set count"
    } else if q.contains("pg_notify") {
        "commit: notify"
    } else if q.contains("pg_try_advisory_lock") {
        "instance check"
    } else {
        return format!("other: {}", q.chars().take(60).collect::<String>());
    };
    name.to_owned()
}

/// Statements of a traced database, from the server log: (operation, tree) → count, rows
/// written at commit by (kind, tree), and reads that repeat a read of the same transaction
/// (same connection since its `BEGIN`, same statement and parameters) by (operation, tree).
#[derive(Debug, Default)]
pub struct Trace {
    pub statements: BTreeMap<(String, String), u64>,
    pub written: BTreeMap<(String, String), u64>,
    pub repeated: BTreeMap<(String, String), u64>,
}

/// The backend's process id in a log line ("2026-12-07 10:00:00.123 UTC [1234] LOG: ...").
fn backend(line: &str) -> &str {
    line.split_once(" [")
        .and_then(|(_, rest)| rest.split_once(']'))
        .map_or("", |(pid, _)| pid)
}

impl Trace {
    /// Reads the server log from byte `from` to byte `to`.
    pub fn read(pg: &Pg, from: u64, to: u64) -> Trace {
        let raw = std::fs::read(pg.log_file()).unwrap_or_default();
        let end = (to as usize).min(raw.len());
        let start = (from as usize).min(end);
        let text = String::from_utf8_lossy(&raw[start..end]);
        let mut trace = Trace::default();
        let mut last_op: Option<String> = None;
        // Per backend: the reads of its open transaction.
        let mut reads: std::collections::HashMap<String, std::collections::HashSet<String>> =
            std::collections::HashMap::new();
        for line in text.lines() {
            if line.contains("LOG:  statement: BEGIN") {
                reads.remove(backend(line));
            }
            if let Some((_, sql)) = line.split_once("LOG:  execute ") {
                // "s12: SELECT ..." (a prepared statement's name, then the text)
                let sql = sql.split_once(": ").map_or(sql, |x| x.1);
                let op = operation(sql);
                last_op = Some(op.clone());
                // Without parameters (none logged) the statement counts here.
                if !sql.contains("$1") {
                    *trace.statements.entry((op, String::new())).or_insert(0) += 1;
                    last_op = None;
                }
            } else if let Some((_, sql)) = line.split_once("LOG:  statement: ") {
                for part in sql.split(';').map(str::trim).filter(|p| !p.is_empty()) {
                    *trace
                        .statements
                        .entry((operation(part), String::new()))
                        .or_insert(0) += 1;
                }
                last_op = None;
            } else if let Some((_, params)) = line.split_once("DETAIL:  parameters: ") {
                let Some(op) = last_op.take() else { continue };
                let first = first_param(params);
                let what = if op.starts_with("lock") {
                    // "user:alice@localhost" → "user:"
                    first
                        .split_once(':')
                        .map_or(first.clone(), |(kind, _)| format!("{kind}:"))
                } else if first.starts_with('{') {
                    for tree in first.trim_matches(|c| c == '{' || c == '}').split(',') {
                        *trace
                            .written
                            .entry((op.clone(), tree.trim_matches('"').to_owned()))
                            .or_insert(0) += 1;
                    }
                    String::new()
                } else {
                    first
                };
                let read = ["get", "count", "scan"].contains(&op.as_str());
                if read
                    && !reads
                        .entry(backend(line).to_owned())
                        .or_default()
                        .insert(format!("{op} {params}"))
                {
                    *trace
                        .repeated
                        .entry((op.clone(), what.clone()))
                        .or_insert(0) += 1;
                }
                *trace.statements.entry((op, what)).or_insert(0) += 1;
            }
        }
        trace
    }

    /// Lines "operation tree: n per message", most frequent first.
    pub fn lines(&self, messages: u64) -> Vec<String> {
        let n = messages.max(1) as f64;
        let mut rows: Vec<(&(String, String), &u64)> = self.statements.iter().collect();
        rows.sort_by(|a, b| b.1.cmp(a.1));
        let mut out: Vec<String> = rows
            .iter()
            .map(|((op, tree), c)| {
                let on = if tree.is_empty() {
                    String::new()
                } else {
                    format!(" `{tree}`")
                };
                format!("| {op}{on} | {:.3} |", **c as f64 / n)
            })
            .collect();
        let mut rows: Vec<(&(String, String), &u64)> = self.repeated.iter().collect();
        rows.sort_by(|a, b| b.1.cmp(a.1));
        for ((op, tree), c) in rows {
            out.push(format!(
                "| of which repeats within the transaction: {op} `{tree}` | {:.3} |",
                *c as f64 / n
            ));
        }
        let mut rows: Vec<(&(String, String), &u64)> = self.written.iter().collect();
        rows.sort_by(|a, b| b.1.cmp(a.1));
        for ((op, tree), c) in rows {
            out.push(format!(
                "| rows written by {op} `{tree}` | {:.3} |",
                *c as f64 / n
            ));
        }
        out
    }

    /// Reads (get, count, scan) per message, and how many of them repeat a read the same
    /// transaction made before.
    pub fn reads(&self, messages: u64) -> (f64, f64) {
        let n = messages.max(1) as f64;
        let is_read = |op: &str| ["get", "count", "scan"].contains(&op);
        let all: u64 = self
            .statements
            .iter()
            .filter(|((op, _), _)| is_read(op))
            .map(|(_, c)| c)
            .sum();
        let again: u64 = self.repeated.values().sum();
        (all as f64 / n, again as f64 / n)
    }
}

/// The first parameter's value in "$1 = 'users', $2 = '\x..'" (quotes removed).
fn first_param(params: &str) -> String {
    let Some(rest) = params.strip_prefix("$1 = ") else {
        return String::new();
    };
    if let Some(quoted) = rest.strip_prefix('\'') {
        // Up to the closing quote (values here have no quotes inside).
        quoted.split('\'').next().unwrap_or_default().to_owned()
    } else {
        rest.split(',').next().unwrap_or_default().to_owned()
    }
}
