//! Crash and restart soak: the built `reach` against a real Prosody, a real SMTP relay (aiosmtpd)
//! and a real Kannel (fake SMSC, the test holding the handset), killed with SIGKILL at random
//! moments while a buddy writes to Alice and Alice answers by email and by SMS; Prosody, the relay
//! and Kannel are restarted a few times too. Then everything drains and the test counts what each
//! side sent, what was acknowledged, what arrived, how often, and what was lost.
//!
//! Environment (all optional):
//! - `REACH_SOAK_KILLS`: how many times `reach` is killed (default 3, the short run of
//!   `scripts/test`; `scripts/soak` runs 50+).
//! - `REACH_SOAK_SECONDS`: the least time the kills are spread over (default 20; with many kills
//!   the random 100–800 ms gaps take longer anyway).
//! - `REACH_SOAK_SEED`: the random seed (printed in the report), to replay a run.
//! - `REACH_SOAK_REPORT`: a file to write the report to (it is always printed too).
//! - `REACH_SOAK_STORE`: `sled` or `postgres` runs only the soak on that store (default: both
//!   tests run, `acknowledged_items_survive_kills_and_restarts` on the embedded store and
//!   `..._on_postgres` on a private PostgreSQL server, which is restarted a few times too).
//! - `REACH_SOAK_REPLIES`: by default (`any`) Alice answers by email and SMS at any time, also
//!   while the buddy's latest messages still wait for their forward (the case that once lost
//!   messages, see RELIABILITY.md); `xmpp` lets her answer only while she is on XMPP (and stay
//!   there until her answers arrived), which keeps a run about crashes alone.
//!
//! What counts as acknowledged, per flow:
//! - Buddy → Alice over XMPP: XEP-0114 has no acknowledgements, so "what Reach received before
//!   its last commit" is inferred. Reach takes the link's stanzas in order and commits them in
//!   order (one flush per batch), so within one epoch (the time between two disruptions: a kill of
//!   `reach` or a restart of Prosody), if a message arrived, every earlier message of that epoch
//!   that Prosody did not bounce was committed too. Those are "acknowledged"; one of them missing
//!   is a loss. A message Prosody bounced (the buddy got an error) is "refused": the sender knows.
//!   The rest (sent just before a disruption, never seen, never bounced) were in flight on a
//!   socket, which DESIGN.md allows; they are reported as "in flight". A gap in the last 3 s before
//!   a Prosody restart is the outbound side of a link drop (also allowed) and reported as such.
//! - Alice's email replies: acknowledged when Reach's listener said 250. The test retries like an
//!   MTA (same Message-ID) until it hears 250 or a 5xx.
//! - Alice's SMS replies: acknowledged once Kannel has them (the handset wrote them to the fake
//!   SMSC while Kannel was up); Kannel retries its webhook call until Reach answers 200. But its
//!   smsbox keeps those retries in memory (it tells bearerbox it has the text as the first call
//!   starts), so a text written less than 3 s before a restart of Kannel, and never delivered,
//!   is counted in flight: Kannel's to lose, not Reach's (see `support::soak::KANNEL_IN_MEMORY`).
//!
//! Delivered items are recognised by a unique token in the text; duplicates (the same token more
//! than once, e.g. a stanza or mail re-sent after a crash before its dequeue was committed) are
//! counted and removed by token. Lost acknowledged items must be 0.

use crate::support;

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use rand::Rng;
use support::account::SERVICE_NUMBER;
use support::kannel::{Handset, Kannel};
use support::mail::MailSink;
use support::postgres::PgCluster;
use support::soak::{
    env_num, login, write_flow_table, write_phases, BobMsg, Conversation, Mode, Pace, ReplyRows,
    Route, Row, BOB_EVERY,
};
use support::{Reach, Server, ServerKind, StoreAt};

const D: &str = "reach.localhost";
const SECRET: &str = "soaksecret9";
/// A gap this close before a Prosody restart is the outbound side of a link drop.
const LINK_DROP_WINDOW: Duration = Duration::from_secs(3);

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Disruption {
    Kill,
    ProsodyRestart,
}

/// Incremental reader of Reach's log: counts "component link up".
struct LogWatch {
    path: PathBuf,
    offset: u64,
    ups: usize,
    carry: String,
}

impl LogWatch {
    fn poll(&mut self) -> usize {
        use std::io::{Read, Seek, SeekFrom};
        if let Ok(mut f) = std::fs::File::open(&self.path) {
            if f.seek(SeekFrom::Start(self.offset)).is_ok() {
                let mut buf = Vec::new();
                if let Ok(n) = f.read_to_end(&mut buf) {
                    self.offset += n as u64;
                    self.carry.push_str(&String::from_utf8_lossy(&buf));
                    if let Some(end) = self.carry.rfind('\n') {
                        self.ups += self.carry[..end].matches("component link up").count();
                        self.carry.drain(..=end);
                    }
                }
            }
        }
        self.ups
    }
}

/// Where the soak's Reach keeps its store.
enum SoakStore {
    Sled,
    /// A private PostgreSQL server (restarted during the soak, so not the shared one).
    Postgres(PgCluster),
}

struct World {
    server: Server,
    store: SoakStore,
    kannel: Kannel,
    reach: Reach,
    config: String,
    state: tempfile::TempDir,
    log: LogWatch,
    /// Alice, the buddy, the phone, the relay's mailbox and what went between them.
    conversation: Conversation,
    /// Disruptions in order: (when, what). Epoch `n` ends with disruption `n`.
    disruptions: Vec<(Instant, Disruption)>,
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let keep = std::env::temp_dir().join(format!("reach-soak-{}", std::process::id()));
            let _ = std::fs::create_dir_all(&keep);
            let _ = std::fs::copy(self.state.path().join("reach.log"), keep.join("reach.log"));
            let _ = std::fs::copy(
                self.server.dir().join("debug.log"),
                keep.join("prosody.log"),
            );
            for mail in self.conversation.sink.mails() {
                if let Some(name) = mail.path.file_name() {
                    let _ = std::fs::create_dir_all(keep.join("mail"));
                    let _ = std::fs::write(keep.join("mail").join(name), &mail.raw);
                }
            }
            let trace = self.conversation.ledger.trace.join("\n");
            let _ = std::fs::write(keep.join("trace.txt"), trace);
            eprintln!("logs kept in {}", keep.display());
            eprintln!(
                "--- reach log (tail) ---\n{}\n--- kannel ---\n{}",
                support::process::tail(&self.state.path().join("reach.log"), 80),
                self.kannel.logs(20)
            );
        }
    }
}

impl World {
    async fn new(seed: u64, store: SoakStore) -> World {
        let server = Server::start(ServerKind::Prosody).await;
        for user in ["alice", "bob"] {
            server.register(user, &format!("{user}pw")).await;
        }
        let webhook_port = support::free_port();
        let kannel = Kannel::start(&format!(
            "http://127.0.0.1:{webhook_port}/sms/mo?secret={SECRET}"
        ))
        .await;
        let phone = Handset::connect(&kannel).await;
        let sink = MailSink::start().await;
        let state = tempfile::tempdir().unwrap();
        let smtp_port = support::free_port();
        // The forwarding-email limit, where this build has one, must not be what the soak measures.
        let example = include_str!("../config.toml.example");
        let limits = if example.contains("emails_per_user_per_hour") {
            "[limits]\nemails_per_user_per_hour = 100000\n\n"
        } else {
            ""
        };
        let extra = format!(
            "{limits}[routing]\ngrace_delay_secs = 3\n\n\
             [email]\nrelay = \"smtp://127.0.0.1:{}\"\nfrom_address = \"reach@{D}\"\nreply_domain = \"{D}\"\n\
             listen = \"127.0.0.1:{smtp_port}\"\ndigest_window_secs = 1\n\n\
             [sms]\nsendsms_url = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\nfrom = \"{SERVICE_NUMBER}\"\n\
             webhook_listen = \"127.0.0.1:{webhook_port}\"\nwebhook_url = \"http://127.0.0.1:{webhook_port}\"\n\
             webhook_secret = \"{SECRET}\"\ndaily_cap = 100000\nrate_per_second = 100\nallowed_prefixes = [\"+1\"]\n",
            sink.port,
            kannel.sendsms_url(),
            kannel.username(),
            kannel.password()
        );
        let store_at = match &store {
            SoakStore::Sled => StoreAt::Sled,
            SoakStore::Postgres(cluster) => StoreAt::Postgres {
                url: cluster.create_database(),
                instance: "soak".to_owned(),
            },
        };
        let mut config = Reach::config_at(&server, state.path(), &store_at);
        config.push('\n');
        config.push_str(&extra);
        let reach = Reach::start_config(state.path(), &config).await;
        let replies_anytime = std::env::var("REACH_SOAK_REPLIES").map_or(true, |v| v != "xmpp");
        let conversation =
            Conversation::new(&server, phone, sink, smtp_port, seed, replies_anytime).await;
        let log = LogWatch {
            path: state.path().join("reach.log"),
            offset: 0,
            ups: 0,
            carry: String::new(),
        };
        World {
            server,
            store,
            kannel,
            reach,
            config,
            state,
            log,
            conversation,
            disruptions: Vec::new(),
        }
    }

    /// Notes a disruption: the buddy's next messages are of the next epoch.
    fn disrupted(&mut self, what: Disruption) {
        self.disruptions.push((Instant::now(), what));
        self.conversation.epoch = self.disruptions.len();
    }

    async fn kill_reach(&mut self) {
        self.reach.kill();
        self.conversation.ledger.trace("kill reach");
        self.disrupted(Disruption::Kill);
        self.reach = Reach::start_config(self.state.path(), &self.config).await;
    }

    async fn restart_prosody(&mut self, mode: Mode) {
        self.conversation.poll().await;
        self.disrupted(Disruption::ProsodyRestart);
        self.conversation.ledger.trace("restart prosody");
        let alice_was_on = self.conversation.alice.take().is_some();
        self.server.restart().await;
        self.conversation.bob = login(&self.server, "bob").await;
        if alice_was_on || mode == Mode::Xmpp {
            self.conversation.alice_logs_in(&self.server).await;
        }
    }

    async fn restart_kannel(&mut self) {
        self.conversation.poll().await;
        self.conversation.ledger.trace("restart kannel");
        self.conversation.ledger.kannel_stops.push(Instant::now());
        self.conversation.phone.disconnect();
        self.kannel.restart().await;
        self.conversation.phone.reconnect(&self.kannel).await;
    }

    /// Restarts PostgreSQL (a fast shutdown, then a start): Reach's batches wait for it.
    async fn restart_postgres(&mut self) {
        if let SoakStore::Postgres(cluster) = &self.store {
            self.conversation.ledger.trace("restart postgres");
            tokio::task::block_in_place(|| cluster.restart());
        }
    }

    async fn restart_sink(&mut self) {
        self.conversation.sink.stop();
        let pause = self.conversation.rng.gen_range(200..1200);
        tokio::time::sleep(Duration::from_millis(pause)).await;
        self.conversation.sink.resume().await;
    }
}

/// Whether the soak on `store` runs (`REACH_SOAK_STORE` picks one).
fn soak_on(store: &str) -> bool {
    std::env::var("REACH_SOAK_STORE").map_or(true, |s| s.is_empty() || s == store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_items_survive_kills_and_restarts() {
    if soak_on("sled") {
        soak(SoakStore::Sled).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_items_survive_kills_and_restarts_on_postgres() {
    if soak_on("postgres") {
        let cluster = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
        soak(SoakStore::Postgres(cluster)).await;
    }
}

async fn soak(store: SoakStore) {
    let on_postgres = matches!(store, SoakStore::Postgres(_));
    let kills = env_num("REACH_SOAK_KILLS", 3) as usize;
    let min_secs = env_num("REACH_SOAK_SECONDS", 20);
    let seed = env_num("REACH_SOAK_SEED", rand::random::<u32>() as u64);
    let started = Instant::now();
    let mut w = World::new(seed, store).await;
    w.conversation.setup_alice(&w.server).await;
    let setup_time = started.elapsed();

    // Restarts of each server, spread over the kills (a few each; at least one).
    let restarts = (kills / 16).clamp(1, 5);
    let mut plan: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for i in 0..restarts {
        let at = |offset: usize| {
            (kills * (3 * i + offset) / (3 * restarts)).min(kills.saturating_sub(1))
        };
        plan.entry(at(1)).or_default().push("prosody");
        plan.entry(at(2)).or_default().push("relay");
        plan.entry(at(3).min(kills.saturating_sub(1)))
            .or_default()
            .push("kannel");
        if on_postgres {
            plan.entry(at(2)).or_default().push("postgres");
        }
    }
    let extra_gap = (min_secs * 1000 / kills.max(1) as u64).saturating_sub(450);

    let mut pace = Pace::start();
    let (mut killed, mut restarted) = (0usize, HashMap::<&str, usize>::new());
    let mut kill_at: Option<Instant> = Some(
        Instant::now() + Duration::from_millis(w.conversation.rng.gen_range(100..800) + extra_gap),
    );
    // Some kills wait for the link to come up first, so that traffic flows between crashes.
    let mut wait_link_from: Option<(usize, Instant)> = None;
    w.log.poll();
    let chaos_start = Instant::now();
    while killed < kills || chaos_start.elapsed() < Duration::from_secs(min_secs) {
        let now = Instant::now();
        pace.step(&mut w.conversation, &w.server, now).await;
        if killed < kills {
            if let Some((ups, since)) = wait_link_from {
                // (a link that does not come up within 5 s is killed anyway)
                if w.log.poll() > ups || since.elapsed() > Duration::from_secs(5) {
                    wait_link_from = None;
                    kill_at = Some(
                        now + Duration::from_millis(
                            w.conversation.rng.gen_range(100..800) + extra_gap,
                        ),
                    );
                }
            }
            if kill_at.is_some_and(|at| now >= at) {
                w.kill_reach().await;
                kill_at = None;
                if w.conversation.rng.gen_bool(0.5) {
                    // Kill again while it starts up (or just after).
                    kill_at = Some(
                        Instant::now()
                            + Duration::from_millis(
                                w.conversation.rng.gen_range(100..800) + extra_gap,
                            ),
                    );
                } else {
                    wait_link_from = Some((w.log.poll(), Instant::now()));
                }
                for what in plan.get(&killed).cloned().unwrap_or_default() {
                    match what {
                        "prosody" => w.restart_prosody(pace.mode).await,
                        "relay" => w.restart_sink().await,
                        "postgres" => w.restart_postgres().await,
                        _ => w.restart_kannel().await,
                    }
                    *restarted.entry(what).or_default() += 1;
                }
                killed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let chaos_time = chaos_start.elapsed();

    // Drain: no new traffic; Reach stays up.
    let drain_time = w.conversation.drain(&w.server, kills).await;

    // Counting.
    let l = &w.conversation.ledger;
    let mut xmpp = Row::default();
    let mut routes: BTreeMap<Route, usize> = BTreeMap::new();
    let mut gaps = Vec::new();
    let epochs = w.disruptions.len() + 1;
    for epoch in 0..epochs {
        let msgs: Vec<&BobMsg> = l.bob.iter().filter(|m| m.epoch == epoch).collect();
        let last = msgs.iter().rposition(|m| l.at_alice.contains_key(&m.token));
        for (i, m) in msgs.iter().enumerate() {
            xmpp.sent += 1;
            let copies = l.at_alice.get(&m.token);
            let refused = l.bob_errors.contains_key(&m.id);
            if let Some(copies) = copies {
                xmpp.delivered += 1;
                xmpp.duplicates += copies.len() - 1;
                *routes.entry(copies[0]).or_default() += 1;
            }
            if refused {
                xmpp.refused += 1;
                continue;
            }
            if last.is_some_and(|last| i <= last) {
                xmpp.acked += 1;
                if copies.is_none() {
                    gaps.push((epoch, m.token.clone()));
                }
            } else if copies.is_none() {
                xmpp.in_flight += 1;
            }
        }
    }
    // Gaps in an epoch ended by a Prosody restart, among its last messages, are a link drop.
    let per_epoch_count: HashMap<usize, usize> = l.bob.iter().fold(HashMap::new(), |mut m, b| {
        *m.entry(b.epoch).or_default() += 1;
        m
    });
    let tail_len = (LINK_DROP_WINDOW.as_millis() / BOB_EVERY.as_millis()) as usize;
    for (epoch, token) in &gaps {
        let ended_by_prosody = matches!(
            w.disruptions.get(*epoch),
            Some((_, Disruption::ProsodyRestart))
        );
        let index = l
            .bob
            .iter()
            .filter(|m| m.epoch == *epoch)
            .position(|m| &m.token == token)
            .unwrap();
        if ended_by_prosody && index + tail_len >= per_epoch_count[epoch] {
            xmpp.link_drop += 1;
        } else {
            xmpp.lost += 1;
        }
    }

    let ReplyRows {
        mail,
        mail_attempts,
        mail_lost,
        sms,
        sms_lost,
    } = w.conversation.reply_rows();
    let conditions = w.conversation.error_conditions();

    let mut report = String::new();
    let r = &mut report;
    use std::fmt::Write;
    let _ = writeln!(
        r,
        "Reach soak on {} (seed {seed}, replies {}): {killed} SIGKILLs of reach; restarts: Prosody {}, SMTP relay {}, Kannel {}{}",
        if on_postgres { "PostgreSQL" } else { "the embedded store" },
        if w.conversation.replies_anytime { "any time" } else { "while on XMPP" },
        restarted.get("prosody").unwrap_or(&0),
        restarted.get("relay").unwrap_or(&0),
        restarted.get("kannel").unwrap_or(&0),
        if on_postgres {
            format!(", PostgreSQL {}", restarted.get("postgres").unwrap_or(&0))
        } else {
            String::new()
        }
    );
    write_phases(r, setup_time, chaos_time, drain_time, started);
    write_flow_table(r, "link drop (allowed)", [&xmpp, &mail, &sms], |row| {
        row.link_drop.to_string()
    });
    let _ = writeln!(
        r,
        "buddy messages first delivered by: XMPP {}, email {}, SMS {}; SMTP attempts for {} replies: {mail_attempts}; errors the buddy got: {conditions:?}",
        routes.get(&Route::Xmpp).unwrap_or(&0),
        routes.get(&Route::Email).unwrap_or(&0),
        routes.get(&Route::Sms).unwrap_or(&0),
        mail.sent,
    );
    println!("\n{report}");
    if let Ok(path) = std::env::var("REACH_SOAK_REPORT") {
        // Appended: the soak on each store adds its report.
        use std::io::Write as _;
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(&path))
        {
            let _ = writeln!(file, "{report}");
        }
    }

    assert_eq!(killed, kills);
    assert!(
        xmpp.lost == 0 && mail.lost == 0 && sms.lost == 0,
        "acknowledged items were lost:\n{report}\nXMPP gaps (epoch, token): {gaps:?}\nemail replies: {mail_lost:?}\nSMS replies: {sms_lost:?}"
    );
    assert_eq!(mail.refused, 0, "a reply was refused with 5xx:\n{report}");
    assert!(
        xmpp.delivered > 0 && mail.delivered > 0 && sms.delivered > 0,
        "every flow carried something:\n{report}"
    );
}
