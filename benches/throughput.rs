//! Reach's throughput benchmarks (issue 7, "Benchmarks"): each scenario measures the release
//! `reach` binary against real servers on loopback, and a baseline measured in the same run on
//! the same machine, and prints a table of rates, ratios and targets. See BENCHMARKS.md.
//!
//! Run with `scripts/bench` (or `cargo bench --bench throughput -- [--quick] [SCENARIO...]`,
//! scenarios: xmpp, email, replies, sms; and, not run by default, pg (the routing and email
//! loads with the store on sled and on PostgreSQL) and instances (one and two Reach instances
//! on one PostgreSQL database behind ejabberd)).

#[path = "../tests/support/mod.rs"]
mod support;

mod load;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use load::pg::{OpCounts, Pg, Statements, Trace};
use load::procs::{Group, Meter, Sample, Usage};
use load::xmpp::{chat, Probe, D};
use load::{fmt_rate, Row};
use support::{Reach, Server, ServerKind, StoreAt};

/// How big each run is: `--quick` for a smoke run of a minute or two.
#[derive(Debug, Clone, Copy)]
struct Size {
    quick: bool,
    /// Seconds of steady load measured (after one second of warm-up).
    measure: Duration,
}

impl Size {
    fn pick(&self, full: usize, quick: usize) -> usize {
        if self.quick {
            quick
        } else {
            full
        }
    }
}

const REACH_LOG: &str = "warn";
/// For the store scenarios: also the link's few state changes ("component link up"), which say
/// when each instance is connected.
const REACH_LOG_LINK: &str = "warn,reach::xmpp::link=info";

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let quick = args.iter().any(|a| a == "--quick");
    let mut chosen: Vec<&str> = args
        .iter()
        .map(String::as_str)
        .filter(|a| !a.starts_with("--"))
        .collect();
    if chosen.is_empty() {
        chosen = vec!["xmpp", "email", "replies", "sms"];
    }
    let size = Size {
        quick,
        measure: Duration::from_secs(if quick { 2 } else { 5 }),
    };
    println!(
        "reach binary: {} ({} run)",
        env!("CARGO_BIN_EXE_reach"),
        if quick { "quick" } else { "full" }
    );
    let started = Instant::now();
    let mut rows = Vec::new();
    let mut details = Vec::new();
    for scenario in chosen {
        let t = Instant::now();
        println!("== {scenario}");
        match scenario {
            "xmpp" => rows.extend(xmpp_routing(size).await),
            "email" => rows.extend(xmpp_to_email(size).await),
            "replies" => rows.extend(email_replies(size).await),
            "sms" => rows.extend(xmpp_to_sms(size).await),
            "pg" => {
                let (r, d) = store_engines(size).await;
                rows.extend(r);
                details.extend(d);
            }
            "instances" => {
                let (r, d) = store_instances(size).await;
                rows.extend(r);
                details.extend(d);
            }
            other => {
                panic!("unknown scenario {other:?}; use xmpp, email, replies, sms, pg, instances")
            }
        }
        println!("   ({:.0} s)", t.elapsed().as_secs_f64());
    }
    print_table(&rows);
    for d in &details {
        println!("{d}");
    }
    println!("total {:.0} s", started.elapsed().as_secs_f64());
}

fn print_table(rows: &[Row]) {
    println!();
    println!(
        "| scenario | Reach | baseline | ratio | target | result | notes |\n|---|---|---|---|---|---|---|"
    );
    for r in rows {
        println!(
            "| {} | {} | {} | {} | {} | {} | {} |",
            r.scenario,
            r.reach,
            r.baseline,
            r.ratio.map_or("".to_owned(), |x| format!("{x:.2}")),
            r.target,
            match r.pass {
                Some(true) => "pass",
                Some(false) => "FAIL",
                None => "",
            },
            r.note
        );
    }
}

/// Reach's config for `server`, with `extra` tables appended.
fn reach_config(server: &Server, state: &std::path::Path, extra: &str) -> String {
    format!("{}\n{extra}\n", Reach::config(server, state))
}

async fn start_reach(server: &Server, state: &std::path::Path, extra: &str) -> Reach {
    let config = reach_config(server, state, extra);
    Reach::start_config_with_log(state, &config, REACH_LOG).await
}

/// Bob clients logged in, Reach's component answering; the clients handed over as raw pipes
/// counting the messages they receive into `received`.
async fn bobs_raw(
    server: &Server,
    count: usize,
    received: &Arc<AtomicU64>,
    wait_component: bool,
) -> Vec<tokio::net::tcp::OwnedWriteHalf> {
    let mut out = Vec::new();
    for i in 0..count {
        let mut c = load::xmpp::login(server, &format!("bob{i}")).await;
        c.presence("").await;
        if wait_component && i == 0 {
            support::wait_for_component(&mut c, D).await;
        }
        let (stream, pending) = c.into_parts();
        out.push(load::xmpp::count_messages(
            stream,
            &pending,
            received.clone(),
        ));
    }
    out
}

// ---- 1. XMPP routing ------------------------------------------------------------------------

/// Buddies send to reach addresses of users whose client is online; Reach relays each message
/// to the user's client from the per-session JID, after a durable commit. Baseline: the same
/// load into a null component that only counts.
async fn xmpp_routing(size: Size) -> Vec<Row> {
    let pairs = size.pick(8, 4);
    let window = 4000;
    let server = Server::start(ServerKind::Prosody).await;
    load::xmpp::register_accounts(&server, "bob", pairs).await;
    load::xmpp::register_accounts(&server, "alice", pairs).await;

    // Baseline: null component.
    let null_count = Arc::new(AtomicU64::new(0));
    let null = load::xmpp::null_component(&server, null_count.clone()).await;
    let gate = load::xmpp::Gate::new(window, null_count.clone());
    let ignored = Arc::new(AtomicU64::new(0));
    let bobs = bobs_raw(&server, pairs, &ignored, false).await;
    let senders = bobs
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            load::xmpp::closed_loop_sender(w, gate.clone(), move |n| {
                chat(
                    &format!("alice{i}@{D}"),
                    &format!("n{n}"),
                    &format!("load {n}"),
                )
            })
        })
        .collect();
    let (null_rate, null_sent, null_got) =
        load::xmpp::measure_closed_loop(&gate, senders, Duration::from_secs(1), size.measure).await;
    println!(
        "   null component: {} ({null_got}/{null_sent} received)",
        fmt_rate(null_rate)
    );
    drop(null);
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Reach.
    let run = routing_once(
        &server,
        Setup::SLED,
        None,
        false,
        pairs,
        window,
        size.measure,
        "reach",
    )
    .await;
    let (reach_rate, sent, got) = (run.rate, run.sent, run.got);
    println!("   {}", run.usage().cores_line());
    let ratio = reach_rate / null_rate;
    vec![Row {
        scenario: "1 XMPP routing (delivered msgs/s)",
        reach: fmt_rate(reach_rate),
        baseline: format!("{} null component", fmt_rate(null_rate)),
        ratio: Some(ratio),
        target: ">= 0.50",
        pass: Some(ratio >= 0.5),
        note: format!("{pairs} buddy->user pairs, {window} in flight; {got}/{sent} delivered"),
    }]
}

// ---- 2. XMPP -> email -----------------------------------------------------------------------

const EMAIL_EXTRA: &str =
    "[routing]\ngrace_delay_secs = 0\n\n[limits]\nemails_per_user_per_hour = 100000\n";

fn email_config(sink_port: u16, listen_port: u16) -> String {
    format!(
        "{EMAIL_EXTRA}\n[email]\nrelay = \"smtp://127.0.0.1:{sink_port}\"\nfrom_address = \"reach@{D}\"\n\
         reply_domain = \"{D}\"\nlisten = \"127.0.0.1:{listen_port}\"\ndigest_window_secs = 0\n"
    )
}

/// Offline users with a verified email address; buddies write to them, one message per
/// conversation (so each message is one email); Reach mails them to smtp-sink.
async fn xmpp_to_email(size: Size) -> Vec<Row> {
    let buddies = 4;
    let burst = size.pick(20_000, 6_000);
    let paced = (PACED_RATE * size.measure.as_secs_f64()) as usize;

    let ceiling = load::mail::source_to_sink(size.pick(100_000, 30_000) as u64, 20).await;
    println!("   smtp-source -> smtp-sink: {}", fmt_rate(ceiling));

    let server = Server::start(ServerKind::Prosody).await;
    load::xmpp::register_accounts(&server, "bob", buddies).await;
    let run = email_once(
        &server,
        Setup::SLED,
        None,
        false,
        buddies,
        burst,
        Duration::from_secs(60),
        paced,
        PACED_RATE,
        "reach",
    )
    .await;
    let EmailRun {
        accepted,
        p50,
        p99,
        lost,
        ..
    } = run;
    let burst_rate = run.burst.rate;
    println!("   {}", run.burst.usage().cores_line());
    vec![
        Row {
            scenario: "2 XMPP->email (msgs/s accepted by smtp-sink)",
            reach: fmt_rate(burst_rate),
            baseline: format!("{} smtp-source->smtp-sink", fmt_rate(ceiling)),
            ratio: Some(burst_rate / ceiling),
            target: ">= 5000/s",
            pass: Some(burst_rate >= 5000.0),
            note: format!("{accepted}/{burst} one-message emails, {buddies} buddies, digest 0 s"),
        },
        Row {
            scenario: "2 XMPP->email latency at 2000/s (send->accepted)",
            reach: format!("p50 {p50:.0} ms, p99 {p99:.0} ms"),
            baseline: String::new(),
            ratio: None,
            target: "p99 < 50 ms",
            pass: Some(p99 < 50.0 && lost == 0),
            note: format!("{paced} messages; {lost} not accepted within 30 s"),
        },
    ]
}

// ---- 3. Email replies -> XMPP ---------------------------------------------------------------

/// Users reply by email (from their verified address, to the reply alias of a mail Reach really
/// sent) to Reach's SMTP listener; baseline: the same submissions into a private Postfix smtpd
/// with its durable queue.
async fn email_replies(size: Size) -> Vec<Row> {
    let buddies = 4;
    let users = size.pick(400, 100);
    let replies = size.pick(20_000, 4_000);
    let connections = 20;

    let server = Server::start(ServerKind::Prosody).await;
    load::xmpp::register_accounts(&server, "bob", buddies).await;
    let state = tempfile::tempdir().unwrap();
    load::seed::users(
        &state.path().join("store"),
        "u",
        0..users,
        load::seed::Terminals::Email,
    );
    let dump = tempfile::tempdir().unwrap();
    std::process::Command::new("chown")
        .arg("nobody")
        .arg(dump.path())
        .status()
        .expect("chown the dump folder");
    let sink = load::mail::Sink::start(Some(dump.path())).await;
    let listen = load::port();
    let mut reach = start_reach(&server, state.path(), &email_config(sink.port, listen)).await;
    let relayed = Arc::new(AtomicU64::new(0));
    let mut bobs = bobs_raw(&server, buddies, &relayed, true).await;

    // One forwarded mail per user gives each a real reply alias.
    use tokio::io::AsyncWriteExt;
    for i in 0..users {
        let stanza = chat(&format!("u{i}@{D}"), &format!("f{i}"), "please reply");
        bobs[i % buddies]
            .write_all(stanza.as_bytes())
            .await
            .unwrap();
    }
    load::wait_until(Duration::from_secs(60), || sink.count() >= users as u64).await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let forwarded = load::mail::dumped(dump.path());
    assert_eq!(
        forwarded.len(),
        users,
        "forwarded mails captured by smtp-sink -d"
    );
    let run = std::process::id();
    let submissions: Vec<load::mail::Submission> = (0..replies)
        .map(|m| {
            let f = &forwarded[m % users];
            load::mail::reply(
                &f.to,
                &f.alias,
                &f.message_id,
                &format!("r{m}-{run}@mail.example"),
                &format!("reply number {m}"),
            )
        })
        .collect();

    // Baseline: private Postfix.
    let mut postfix = load::mail::Postfix::start().await;
    let (pf_ok, pf_refused, pf_elapsed) =
        load::mail::submit_all(postfix.port, submissions.clone(), connections).await;
    let pf_rate = load::rate(pf_ok, pf_elapsed);
    let held = postfix.held();
    postfix.stop().await;
    println!(
        "   postfix: {} ({pf_ok} accepted, {pf_refused} refused, {held} in its queue)",
        fmt_rate(pf_rate)
    );

    // Reach.
    let before = relayed.load(Ordering::Relaxed);
    let (ok, refused, elapsed) = load::mail::submit_all(listen, submissions, connections).await;
    let reach_rate = load::rate(ok, elapsed);
    load::wait_until(Duration::from_secs(30), || {
        relayed.load(Ordering::Relaxed) >= before + ok
    })
    .await;
    let delivered = relayed.load(Ordering::Relaxed) - before;
    println!(
        "   reach: {} ({ok} accepted, {refused} refused, {delivered} relayed to buddies)",
        fmt_rate(reach_rate)
    );
    reach.stop().await;
    let ratio = reach_rate / pf_rate;
    vec![Row {
        scenario: "3 email replies->XMPP (msgs/s answered 250)",
        reach: fmt_rate(reach_rate),
        baseline: format!("{} Postfix smtpd+queue", fmt_rate(pf_rate)),
        ratio: Some(ratio),
        target: ">= 3.00",
        pass: Some(ratio >= 3.0 && refused == 0),
        note: format!("{replies} replies over {connections} connections to {users} aliases; {refused} refused; {delivered} relayed to buddies"),
    }]
}

// ---- 4. XMPP -> SMS -------------------------------------------------------------------------

/// SMS requests in flight, for Reach (`[sms] concurrency`, its default) and for the baseline.
const SMS_CONCURRENCY: usize = 4;

/// Offline users with a verified phone (no email); buddies write to them; Reach hands each
/// message to Kannel's sendsms. Baseline: plain keep-alive sendsms requests at Reach's
/// concurrency (`[sms] concurrency`, set to [`SMS_CONCURRENCY`] for both). Both counted at the
/// fake SMSC's handset.
async fn xmpp_to_sms(size: Size) -> Vec<Row> {
    let buddies = 4;
    let users = 50;
    let total = size.pick(20_000, 5_000);
    let secret = "benchsecret1";
    let webhook = load::port();
    let kannel = support::kannel::Kannel::start(&format!(
        "http://127.0.0.1:{webhook}/sms/mo?secret={secret}"
    ))
    .await;
    let handset = load::sms::Handset::connect(&kannel).await;

    // Baseline: counted like Reach, from the first request until the handset has them all.
    let phones: Vec<String> = (0..users).map(load::seed::phone_of).collect();
    let before = handset.count();
    let t0 = Instant::now();
    let (accepted, http_elapsed) = load::sms::sendsms_loop(
        &kannel,
        "+15550000000",
        &phones,
        total as u64,
        SMS_CONCURRENCY,
    )
    .await;
    let done = load::wait_until(Duration::from_secs(60), || {
        handset.count() >= before + total as u64
    })
    .await;
    let base_got = handset.count() - before;
    let base_rate = load::rate(base_got, done.map_or(t0.elapsed(), |d| d - t0));
    println!(
        "   sendsms loop: {} at the handset ({base_got}/{total}); {} answered 202",
        fmt_rate(base_rate),
        fmt_rate(load::rate(accepted, http_elapsed))
    );

    // Reach.
    let server = Server::start(ServerKind::Prosody).await;
    load::xmpp::register_accounts(&server, "bob", buddies).await;
    let state = tempfile::tempdir().unwrap();
    load::seed::users(
        &state.path().join("store"),
        "u",
        0..users,
        load::seed::Terminals::Phone,
    );
    let extra = format!(
        "[sms]\nsendsms_url = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\nfrom = \"+15550000000\"\n\
         webhook_listen = \"127.0.0.1:{webhook}\"\nwebhook_url = \"http://127.0.0.1:{webhook}\"\n\
         webhook_secret = \"{secret}\"\ndaily_cap = 1000000\nrate_per_second = 1000000\ndelivery_reports = false\n\
         concurrency = {SMS_CONCURRENCY}\n",
        kannel.sendsms_url(),
        kannel.username(),
        kannel.password()
    );
    let mut reach = start_reach(&server, state.path(), &extra).await;
    let ignored = Arc::new(AtomicU64::new(0));
    let bobs = bobs_raw(&server, buddies, &ignored, true).await;
    use tokio::io::AsyncWriteExt;
    let before = handset.count();
    let t0 = Instant::now();
    let mut writers = Vec::new();
    for (k, mut bob) in bobs.into_iter().enumerate() {
        writers.push(tokio::spawn(async move {
            let mut buf = String::new();
            for j in (k..total).step_by(buddies) {
                buf.push_str(&chat(
                    &format!("u{}@{D}", j % users),
                    &format!("s{j}"),
                    &format!("load message {j}"),
                ));
                if buf.len() > 16_000 {
                    bob.write_all(buf.as_bytes()).await.unwrap();
                    buf.clear();
                }
            }
            bob.write_all(buf.as_bytes()).await.unwrap();
            bob
        }));
    }
    let mut _bobs = Vec::new();
    for w in writers {
        _bobs.push(w.await.unwrap());
    }
    let limit = Duration::from_secs(60);
    let done = load::wait_until(limit, || handset.count() >= before + total as u64).await;
    let got = handset.count() - before;
    let elapsed = done.map_or(t0.elapsed(), |d| d - t0);
    let reach_rate = load::rate(got, elapsed);
    println!(
        "   reach: {} ({got}/{total} SMS reached the handset in {:.1} s)",
        fmt_rate(reach_rate),
        elapsed.as_secs_f64()
    );
    reach.stop().await;
    let ratio = reach_rate / base_rate;
    vec![Row {
        scenario: "4 XMPP->SMS (msgs/s handed to Kannel)",
        reach: fmt_rate(reach_rate),
        baseline: format!(
            "{} keep-alive sendsms, {SMS_CONCURRENCY} connections",
            fmt_rate(base_rate)
        ),
        ratio: Some(ratio),
        target: ">= 0.50",
        pass: Some(ratio >= 0.5 && got == total as u64),
        note: format!(
            "{got}/{total} SMS at the handset; {users} users, {buddies} buddies; rate limit lifted"
        ),
    }]
}

// ---- Shared by the scenarios: Reach deployed on a store, one run of a load -------------------

/// The paced load's rate in scenario 2 (latency).
const PACED_RATE: f64 = 2_000.0;
/// The paced load's rate in the store scenarios, a rate one PostgreSQL keeps up with (scenario 2's
/// 2,000/s is several times what it takes, so its latency would only measure the backlog).
const STORE_PACED_RATE: f64 = 200.0;
/// The store scenarios' email burst: smaller than scenario 2's, since PostgreSQL takes a few
/// hundred per second; and how long it may take.
const STORE_BURST: (usize, usize) = (10_000, 3_000);
const STORE_BURST_LIMIT: Duration = Duration::from_secs(120);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Engine {
    Sled,
    Postgres,
}

/// Where Reach keeps its store and how many instances share it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Setup {
    engine: Engine,
    instances: usize,
}

impl Setup {
    const SLED: Setup = Setup {
        engine: Engine::Sled,
        instances: 1,
    };
    const PG: Setup = Setup {
        engine: Engine::Postgres,
        instances: 1,
    };
    const PG2: Setup = Setup {
        engine: Engine::Postgres,
        instances: 2,
    };

    fn label(&self) -> String {
        match (self.engine, self.instances) {
            (Engine::Sled, _) => "sled".to_owned(),
            (Engine::Postgres, 1) => "postgres, 1 instance".to_owned(),
            (Engine::Postgres, n) => format!("postgres, {n} instances"),
        }
    }
}

/// The Reach instances of one run, their state folders and their database.
struct Deployment {
    reaches: Vec<Reach>,
    _states: Vec<tempfile::TempDir>,
    /// The PostgreSQL database's name.
    database: Option<String>,
}

impl Deployment {
    async fn stop(&mut self) {
        for reach in &mut self.reaches {
            reach.stop().await;
        }
    }

    fn logs(&self) -> String {
        self.reaches
            .iter()
            .map(|r| r.log())
            .collect::<Vec<_>>()
            .join("\n---\n")
    }
}

/// Seeds users `{prefix}{i}` for `i` in `0..users` into a fresh store of `setup`, then starts
/// `setup.instances` Reach processes on it (each with its own state folder, its config plus
/// `extra(k)`, instance names `i0`, `i1`, ...) and waits until each one's link is up. With
/// `trace`, the database logs every statement of the sessions Reach opens.
#[allow(clippy::too_many_arguments)]
async fn deploy(
    server: &Server,
    setup: Setup,
    pg: Option<&Pg>,
    trace: bool,
    prefix: &str,
    users: usize,
    terminals: load::seed::Terminals,
    extra: impl Fn(usize) -> String,
) -> Deployment {
    let states: Vec<tempfile::TempDir> = (0..setup.instances)
        .map(|_| tempfile::tempdir().unwrap())
        .collect();
    let (stores, database) = match setup.engine {
        Engine::Sled => {
            assert_eq!(setup.instances, 1, "the embedded store has one instance");
            load::seed::users(&states[0].path().join("store"), prefix, 0..users, terminals);
            (vec![StoreAt::Sled], None)
        }
        Engine::Postgres => {
            let pg = pg.expect("a PostgreSQL server for a PostgreSQL store");
            let (url, name) = pg.database().await;
            let (u, p) = (url.clone(), prefix.to_owned());
            let t = Instant::now();
            tokio::task::spawn_blocking(move || load::seed::users_pg(&u, &p, 0..users, terminals))
                .await
                .expect("seed PostgreSQL");
            println!(
                "   ({users} users seeded into PostgreSQL in {:.1} s)",
                t.elapsed().as_secs_f64()
            );
            if trace {
                pg.log_statements(&name).await;
            }
            let stores = (0..setup.instances)
                .map(|k| StoreAt::Postgres {
                    url: url.clone(),
                    instance: format!("i{k}"),
                })
                .collect();
            (stores, Some(name))
        }
    };
    let mut reaches = Vec::new();
    for (k, store) in stores.iter().enumerate() {
        let state = states[k].path();
        let config = format!("{}\n{}\n", Reach::config_at(server, state, store), extra(k));
        let reach = Reach::start_config_with_log(state, &config, REACH_LOG_LINK).await;
        assert!(
            reach
                .wait_for_log("component link up", Duration::from_secs(30))
                .await,
            "Reach instance {k} ({}) did not connect:\n{}",
            setup.label(),
            reach.log()
        );
        reaches.push(reach);
    }
    Deployment {
        reaches,
        _states: states,
        database,
    }
}

/// What a measured window watches: the CPU time of each process taking part, and with
/// PostgreSQL the statements run in Reach's database (with `trace`, also the statement log).
struct Watch<'a> {
    meter: Meter,
    pg: Option<&'a Pg>,
    databases: Vec<String>,
    trace: bool,
    cpu: Option<Sample>,
    statements: Option<Statements>,
    log_from: u64,
    seen: Option<Seen>,
}

/// What a [`Watch`] saw in its window.
struct Seen {
    usage: Usage,
    ops: Option<OpCounts>,
    trace: Option<Trace>,
    messages: u64,
}

impl<'a> Watch<'a> {
    /// Watches Reach's processes, the XMPP server, PostgreSQL and `more`.
    fn new(
        server: &Server,
        deployment: &Deployment,
        pg: Option<&'a Pg>,
        trace: bool,
        more: Vec<Group>,
    ) -> Watch<'a> {
        let mut groups = vec![Group::new(
            "reach",
            deployment.reaches.iter().map(|r| r.pid()),
        )];
        let server_pid = load::procs::pid_listening_on(server.c2s_port());
        let name = match server.kind {
            ServerKind::Prosody => "prosody",
            ServerKind::Ejabberd => "ejabberd",
        };
        groups.push(Group::new(name, server_pid));
        if let (Some(pg), Some(_)) = (pg, &deployment.database) {
            groups.push(Group::new("postgres", pg.cluster.pid()));
        }
        groups.extend(more);
        Watch {
            meter: Meter::new(groups),
            pg: pg.filter(|_| deployment.database.is_some()),
            databases: deployment.database.iter().cloned().collect(),
            trace,
            cpu: None,
            statements: None,
            log_from: 0,
            seen: None,
        }
    }

    fn seen(self) -> Seen {
        self.seen.expect("the window was closed")
    }
}

impl Probe for Watch<'_> {
    async fn open(&mut self) {
        if let Some(pg) = self.pg {
            self.statements = Some(pg.statements(&self.databases).await);
            self.log_from = pg.log_len();
        }
        self.cpu = Some(self.meter.sample());
    }

    async fn close(&mut self, messages: u64) {
        let cpu = self.meter.sample();
        let usage = self
            .meter
            .usage(self.cpu.as_ref().expect("window opened"), &cpu);
        let (mut ops, mut trace) = (None, None);
        if let Some(pg) = self.pg {
            let log_to = pg.log_len();
            let after = pg.statements(&self.databases).await;
            ops = self.statements.as_ref().map(|before| before.delta(&after));
            if self.trace {
                trace = Some(Trace::read(pg, self.log_from, log_to));
            }
        }
        self.seen = Some(Seen {
            usage,
            ops,
            trace,
            messages,
        });
    }
}

/// One measured run: a rate and what was seen meanwhile.
struct Run {
    label: String,
    rate: f64,
    sent: u64,
    got: u64,
    seen: Seen,
}

impl Run {
    fn usage(&self) -> &Usage {
        &self.seen.usage
    }

    /// Lines for the details after the table.
    fn details(&self, what: &str) -> Vec<String> {
        let mut out = vec![format!(
            "- {what}, {}: {} ({} messages in the window)\n  - CPU, cores: {}\n  - CPU per message: {}\n  - busiest threads, cores: {}",
            self.label,
            fmt_rate(self.rate),
            self.seen.messages,
            self.seen.usage.cores_line(),
            self.seen.usage.per_message_line(self.seen.messages),
            self.seen.usage.threads_line(4)
        )];
        if let Some(ops) = &self.seen.ops {
            out.push(format!(
                "  - PostgreSQL: {}",
                ops.per_message(self.seen.messages)
            ));
            let per_message = 1e6 / self.rate.max(1e-9);
            let statements = ops.round_trips() as f64 / self.seen.messages.max(1) as f64;
            out.push(format!(
                "  - {per_message:.0} µs between two messages / {statements:.2} statements = \
                 {:.0} µs per statement",
                per_message / statements.max(1e-9)
            ));
        }
        out
    }
}

// ---- The XMPP routing load (scenario 1's Reach side) ----------------------------------------

/// Reach on `setup` with `pairs` online users `alice{i}` (XMPP only, seeded); buddies `bob{i}`
/// write to them in a closed loop with `window` messages in flight; measured for `measure` after
/// one second of warm-up. The accounts must exist on `server`.
#[allow(clippy::too_many_arguments)]
async fn routing_once(
    server: &Server,
    setup: Setup,
    pg: Option<&Pg>,
    trace: bool,
    pairs: usize,
    window: u64,
    measure: Duration,
    label: &str,
) -> Run {
    let mut deployment = deploy(
        server,
        setup,
        pg,
        trace,
        "alice",
        pairs,
        load::seed::Terminals::None,
        |_| String::new(),
    )
    .await;
    let delivered = Arc::new(AtomicU64::new(0));
    let ignored = Arc::new(AtomicU64::new(0));
    let mut bobs = bobs_raw(server, pairs, &ignored, true).await;
    let mut alices = Vec::new();
    for i in 0..pairs {
        let mut a = load::xmpp::login(server, &format!("alice{i}")).await;
        a.presence("").await;
        a.send(&format!("<presence to='{D}'/>")).await;
        alices.push(a);
    }
    // One message per pair, checked in full: from the per-session JID, with its body.
    use tokio::io::AsyncWriteExt;
    for (i, bob) in bobs.iter_mut().enumerate() {
        bob.write_all(chat(&format!("alice{i}@{D}"), "w", "warm-up").as_bytes())
            .await
            .unwrap();
    }
    let mut raw_alices = Vec::new();
    for (i, mut a) in alices.into_iter().enumerate() {
        let from = format!("bob{i}\\40localhost@{D}");
        let got = a
            .wait_for(Duration::from_secs(20), |s| {
                s.name() == "message" && s.attr("from").is_some_and(|f| f.starts_with(&from))
            })
            .await;
        assert!(
            got.as_ref().and_then(support::body).as_deref() == Some("warm-up"),
            "alice{i} did not get the warm-up message from {from}\n{}",
            deployment.logs()
        );
        let (stream, pending) = a.into_parts();
        raw_alices.push(load::xmpp::count_messages(
            stream,
            &pending,
            delivered.clone(),
        ));
    }
    let gate = load::xmpp::Gate::new(window, delivered.clone());
    let senders = bobs
        .into_iter()
        .enumerate()
        .map(|(i, w)| {
            load::xmpp::closed_loop_sender(w, gate.clone(), move |n| {
                chat(
                    &format!("alice{i}@{D}"),
                    &format!("r{n}"),
                    &format!("load {n}"),
                )
            })
        })
        .collect();
    let mut watch = Watch::new(server, &deployment, pg, trace, Vec::new());
    let (rate, sent, got, _) = load::xmpp::measure_closed_loop_probed(
        &gate,
        senders,
        Duration::from_secs(1),
        measure,
        &mut watch,
    )
    .await;
    println!("   {label}: {} ({got}/{sent} delivered)", fmt_rate(rate));
    deployment.stop().await;
    drop(raw_alices);
    Run {
        label: label.to_owned(),
        rate,
        sent,
        got,
        seen: watch.seen(),
    }
}

// ---- The XMPP -> email load (scenario 2's Reach side) ---------------------------------------

/// One XMPP -> email run: the burst's rate (and what was seen meanwhile), then the latency at
/// [`PACED_RATE`].
struct EmailRun {
    burst: Run,
    accepted: u64,
    p50: f64,
    p99: f64,
    /// Paced messages sent, at what rate, and how many were not accepted within 30 s.
    paced: usize,
    paced_rate: f64,
    lost: usize,
}

/// Reach on `setup` with offline users `u{i}` with a verified email address (seeded); buddies
/// `bob0..bob{buddies}` write `burst` messages as fast as they can, each to a conversation of
/// its own, then `paced` more at [`PACED_RATE`] to other users (none: no latency measured);
/// Reach mails them to a fresh smtp-sink, which counts. The accounts must exist on `server`.
#[allow(clippy::too_many_arguments)]
async fn email_once(
    server: &Server,
    setup: Setup,
    pg: Option<&Pg>,
    trace: bool,
    buddies: usize,
    burst: usize,
    limit: Duration,
    paced: usize,
    paced_rate: f64,
    label: &str,
) -> EmailRun {
    let users = (burst + paced).div_ceil(buddies);
    let sink = load::mail::Sink::start(None).await;
    let mut deployment = deploy(
        server,
        setup,
        pg,
        trace,
        "u",
        users,
        load::seed::Terminals::Email,
        |_| email_config(sink.port, load::port()),
    )
    .await;
    let ignored = Arc::new(AtomicU64::new(0));
    let bobs = bobs_raw(server, buddies, &ignored, true).await;
    let more = load::procs::pid_listening_on(sink.port)
        .map(|pid| vec![Group::new("smtp-sink", [pid])])
        .unwrap_or_default();
    let mut watch = Watch::new(server, &deployment, pg, trace, more);

    // Throughput: `burst` messages as fast as the buddies can write them.
    use tokio::io::AsyncWriteExt;
    let before = sink.count();
    watch.open().await;
    let t0 = Instant::now();
    let mut writers = Vec::new();
    for (k, mut bob) in bobs.into_iter().enumerate() {
        writers.push(tokio::spawn(async move {
            let mut buf = String::new();
            for j in (k..burst).step_by(buddies) {
                buf.push_str(&chat(
                    &format!("u{}@{D}", j / buddies),
                    &format!("e{j}"),
                    &format!("mail load {j}"),
                ));
                if buf.len() > 16_000 {
                    bob.write_all(buf.as_bytes()).await.unwrap();
                    buf.clear();
                }
            }
            bob.write_all(buf.as_bytes()).await.unwrap();
            bob
        }));
    }
    let mut bobs = Vec::new();
    for w in writers {
        bobs.push(w.await.unwrap());
    }
    let done = load::wait_until(limit, || sink.count() >= before + burst as u64).await;
    let accepted = sink.count() - before;
    let elapsed = done.map_or(t0.elapsed(), |d| d - t0);
    watch.close(accepted).await;
    let burst_rate = load::rate(accepted, elapsed);
    println!(
        "   {label} burst: {} ({accepted}/{burst} emails in {:.1} s)",
        fmt_rate(burst_rate),
        elapsed.as_secs_f64()
    );

    // Latency at a fixed offered rate: message j at j / rate seconds.
    let (mut p50, mut p99, mut lost) = (f64::NAN, f64::NAN, 0);
    if paced > 0 {
        tokio::time::sleep(Duration::from_secs(2)).await;
        let before = sink.count();
        let start = tokio::time::Instant::now() + Duration::from_millis(100);
        let mut jobs = Vec::new();
        for (k, bob) in bobs.into_iter().enumerate() {
            let plan: Vec<(Duration, String)> = (k..paced)
                .step_by(buddies)
                .map(|j| {
                    let user = (burst + j) / buddies;
                    (
                        Duration::from_secs_f64(j as f64 / paced_rate),
                        chat(
                            &format!("u{user}@{D}"),
                            &format!("p{j}"),
                            &format!("paced {j}"),
                        ),
                    )
                })
                .collect();
            jobs.push(tokio::spawn(load::xmpp::paced_sender(bob, start, plan)));
        }
        let mut sent_at = Vec::new();
        for j in jobs {
            sent_at.extend(j.await.unwrap().1);
        }
        load::wait_until(Duration::from_secs(30), || {
            sink.count() >= before + paced as u64
        })
        .await;
        sent_at.sort();
        let accepted_at = sink.times(before, paced as u64);
        let mut latencies: Vec<Duration> = sent_at
            .iter()
            .zip(&accepted_at)
            .filter_map(|(s, a)| a.map(|a| a.saturating_duration_since(*s)))
            .collect();
        latencies.sort();
        lost = accepted_at.iter().filter(|a| a.is_none()).count();
        (p50, p99) = (
            load::quantile_ms(&latencies, 0.5),
            load::quantile_ms(&latencies, 0.99),
        );
        println!(
            "   {label} at {paced_rate}/s: p50 {p50:.0} ms, p99 {p99:.0} ms ({lost} not accepted in time)"
        );
    }
    deployment.stop().await;
    EmailRun {
        burst: Run {
            label: label.to_owned(),
            rate: burst_rate,
            sent: burst as u64,
            got: accepted,
            seen: watch.seen(),
        },
        accepted,
        p50,
        p99,
        paced,
        paced_rate,
        lost,
    }
}

// ---- 5. The store: sled against PostgreSQL ---------------------------------------------------

/// Runs `a` and `b` alternately `rounds` times (a b, b a, a b, ...: a drift of the shared
/// machine weighs on both alike) and returns each one's runs.
async fn alternate<T, F, Fut>(rounds: usize, a: Setup, b: Setup, mut run: F) -> (Vec<T>, Vec<T>)
where
    F: FnMut(Setup, usize) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let (mut ra, mut rb) = (Vec::new(), Vec::new());
    for round in 0..rounds {
        if round % 2 == 0 {
            ra.push(run(a, round).await);
            rb.push(run(b, round).await);
        } else {
            rb.push(run(b, round).await);
            ra.push(run(a, round).await);
        }
    }
    (ra, rb)
}

fn mean(xs: impl IntoIterator<Item = f64>) -> f64 {
    let v: Vec<f64> = xs.into_iter().collect();
    v.iter().sum::<f64>() / v.len().max(1) as f64
}

/// "0.61, 0.58": the ratio of each round.
fn round_ratios(b: &[f64], a: &[f64]) -> String {
    b.iter()
        .zip(a)
        .map(|(y, x)| format!("{:.2}", y / x))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Rows comparing setup `b` with baseline `a` on the routing runs and the email runs.
#[allow(clippy::too_many_arguments)]
fn comparison_rows(
    names: [&'static str; 3],
    a_label: &str,
    routing: (&[Run], &[Run]),
    email: (&[EmailRun], &[EmailRun]),
    routing_note: String,
    email_note: String,
) -> Vec<Row> {
    let (ra, rb) = routing;
    let (ea, eb) = email;
    let rate_a: Vec<f64> = ra.iter().map(|r| r.rate).collect();
    let rate_b: Vec<f64> = rb.iter().map(|r| r.rate).collect();
    let mail_a: Vec<f64> = ea.iter().map(|r| r.burst.rate).collect();
    let mail_b: Vec<f64> = eb.iter().map(|r| r.burst.rate).collect();
    let (ma, mb) = (mean(rate_a.iter().copied()), mean(rate_b.iter().copied()));
    let (qa, qb) = (mean(mail_a.iter().copied()), mean(mail_b.iter().copied()));
    let delivered = |runs: &[Run]| {
        runs.iter()
            .map(|r| format!("{}/{}", r.got, r.sent))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let accepted = |runs: &[EmailRun]| {
        runs.iter()
            .map(|r| format!("{}/{}", r.accepted, r.burst.sent))
            .collect::<Vec<_>>()
            .join(", ")
    };
    let latency = |runs: &[EmailRun]| {
        runs.iter()
            .map(|r| format!("p50 {:.0} ms, p99 {:.0} ms", r.p50, r.p99))
            .collect::<Vec<_>>()
            .join("; ")
    };
    let lost = |runs: &[EmailRun]| runs.iter().map(|r| r.lost).sum::<usize>();
    vec![
        Row {
            scenario: names[0],
            reach: fmt_rate(mb),
            baseline: format!("{} {a_label}", fmt_rate(ma)),
            ratio: Some(mb / ma),
            target: "",
            pass: None,
            note: format!(
                "{routing_note}; rounds: {}; delivered {} and {}",
                round_ratios(&rate_b, &rate_a),
                delivered(rb),
                delivered(ra)
            ),
        },
        Row {
            scenario: names[1],
            reach: fmt_rate(qb),
            baseline: format!("{} {a_label}", fmt_rate(qa)),
            ratio: Some(qb / qa),
            target: "",
            pass: None,
            note: format!(
                "{email_note}; rounds: {}; accepted {} and {}",
                round_ratios(&mail_b, &mail_a),
                accepted(eb),
                accepted(ea)
            ),
        },
        Row {
            scenario: names[2],
            reach: latency(eb),
            baseline: format!("{a_label}: {}", latency(ea)),
            ratio: None,
            target: "",
            pass: None,
            note: format!(
                "{} messages at {}/s per run; not accepted within 30 s: {} and {}",
                eb.first().map_or(0, |r| r.paced),
                eb.first().map_or(0.0, |r| r.paced_rate),
                lost(eb),
                lost(ea)
            ),
        },
    ]
}

/// The details printed after the table: each run's CPU split and statements per message.
fn run_details(title: &str, routing: &[&Run], email: &[&EmailRun]) -> Vec<String> {
    let mut out = vec![String::new(), format!("### {title}")];
    for r in routing {
        out.extend(r.details("routing"));
    }
    for r in email {
        out.extend(r.burst.details("email burst"));
    }
    out
}

/// The statement log of a traced run, per message.
fn trace_details(title: &str, run: &Run) -> Vec<String> {
    let Some(trace) = &run.seen.trace else {
        return Vec::new();
    };
    let mut out = vec![
        String::new(),
        format!(
            "#### {title}: statements per message by operation and tree ({} messages, statement log)",
            run.seen.messages
        ),
        "| statement | per message |".to_owned(),
        "|---|---|".to_owned(),
    ];
    out.extend(trace.lines(run.seen.messages));
    let (reads, again) = trace.reads(run.seen.messages);
    out.push(String::new());
    out.push(format!(
        "{title}: {reads:.2} reads per message, {again:.2} of them ({:.0}%) repeat a read of the same transaction",
        100.0 * again / reads.max(1e-9)
    ));
    out
}

/// What one read costs from here on the idle server (in a database with Reach's schema).
async fn idle_round_trip(pg: &Pg) -> Duration {
    let (url, _) = pg.database().await;
    let u = url.clone();
    tokio::task::spawn_blocking(move || {
        load::seed::users_pg(&u, "rtt", 0..1, load::seed::Terminals::None)
    })
    .await
    .expect("schema");
    let rtt = tokio::task::spawn_blocking(move || load::pg::read_round_trip(&url, 2000))
        .await
        .expect("round trips");
    println!(
        "   one read round trip (median of 2000 back to back, before the load): {} µs",
        rtt.as_micros()
    );
    rtt
}

/// The two loads both store comparisons run: routing between `pairs` pairs with `window`
/// messages in flight, and an email burst then a paced run from `buddies` buddies.
#[derive(Clone, Copy)]
struct StoreLoads {
    size: Size,
    rounds: usize,
    pairs: usize,
    window: u64,
    buddies: usize,
    burst: usize,
    paced: usize,
}

impl StoreLoads {
    fn new(size: Size) -> StoreLoads {
        StoreLoads {
            size,
            rounds: size.pick(2, 1),
            pairs: size.pick(8, 4),
            window: 4000,
            buddies: 4,
            burst: size.pick(STORE_BURST.0, STORE_BURST.1),
            paced: (STORE_PACED_RATE * size.measure.as_secs_f64()) as usize,
        }
    }

    /// Both loads on set-ups `a` and `b`, alternately (see [`alternate`]): the routing runs of
    /// each, then the email runs of each.
    #[allow(clippy::type_complexity)]
    async fn alternate(
        self,
        server: &Server,
        pg: &Pg,
        a: Setup,
        b: Setup,
    ) -> ((Vec<Run>, Vec<Run>), (Vec<EmailRun>, Vec<EmailRun>)) {
        let routing = alternate(self.rounds, a, b, |setup, _| async move {
            routing_once(
                server,
                setup,
                Some(pg),
                false,
                self.pairs,
                self.window,
                self.size.measure,
                &setup.label(),
            )
            .await
        })
        .await;
        let email = alternate(self.rounds, a, b, |setup, _| async move {
            email_once(
                server,
                setup,
                Some(pg),
                false,
                self.buddies,
                self.burst,
                STORE_BURST_LIMIT,
                self.paced,
                STORE_PACED_RATE,
                &setup.label(),
            )
            .await
        })
        .await;
        (routing, email)
    }
}

/// A private PostgreSQL (and its idle read round trip) and an XMPP server of `kind` with the
/// loads' accounts.
async fn store_site(kind: ServerKind, loads: &StoreLoads) -> (Pg, Duration, Server) {
    let pg = Pg::start().await;
    let rtt = idle_round_trip(&pg).await;
    let server = Server::start(kind).await;
    load::xmpp::register_accounts(&server, "bob", loads.pairs.max(loads.buddies)).await;
    load::xmpp::register_accounts(&server, "alice", loads.pairs).await;
    (pg, rtt, server)
}

/// XMPP routing and XMPP -> email (scenarios 1 and 2's loads, on Prosody) with the store on sled
/// and on PostgreSQL (one instance), alternately; then one shorter run of each on PostgreSQL with
/// the statement log on, to say which store operation costs how many round trips.
async fn store_engines(size: Size) -> (Vec<Row>, Vec<String>) {
    let loads = StoreLoads::new(size);
    let StoreLoads {
        pairs,
        window,
        buddies,
        burst,
        ..
    } = loads;
    let (pg, rtt, server) = store_site(ServerKind::Prosody, &loads).await;
    let ((routing_sled, routing_pg), (email_sled, email_pg)) =
        loads.alternate(&server, &pg, Setup::SLED, Setup::PG).await;
    // The statement logs (slower: not measured for speed).
    println!("   with the statement log on (counts only):");
    let traced_routing = routing_once(
        &server,
        Setup::PG,
        Some(&pg),
        true,
        pairs,
        window,
        Duration::from_secs(2),
        "postgres, statement log",
    )
    .await;
    let traced_email = email_once(
        &server,
        Setup::PG,
        Some(&pg),
        true,
        buddies,
        2_000,
        STORE_BURST_LIMIT,
        0,
        STORE_PACED_RATE,
        "postgres, statement log",
    )
    .await;

    let rows = comparison_rows(
        [
            "pg-1 XMPP routing, PostgreSQL vs sled (delivered msgs/s)",
            "pg-2 XMPP->email burst, PostgreSQL vs sled (msgs/s)",
            "pg-2 XMPP->email latency at 200/s, PostgreSQL vs sled",
        ],
        "sled",
        (&routing_sled, &routing_pg),
        (&email_sled, &email_pg),
        format!("Prosody, {pairs} pairs, {window} in flight"),
        format!("Prosody, {burst} one-message emails, {buddies} buddies"),
    );
    let mut details = run_details(
        &format!(
            "pg: CPU and statements per run (one read round trip before the load: {} µs)",
            rtt.as_micros()
        ),
        &routing_sled.iter().chain(&routing_pg).collect::<Vec<_>>(),
        &email_sled.iter().chain(&email_pg).collect::<Vec<_>>(),
    );
    details.extend(trace_details("pg, XMPP routing", &traced_routing));
    details.extend(traced_routing.details("routing (statement log on, not a speed)"));
    details.extend(trace_details("pg, XMPP->email burst", &traced_email.burst));
    details.extend(
        traced_email
            .burst
            .details("email burst (statement log on, not a speed)"),
    );
    (rows, details)
}

// ---- 6. One and two instances on PostgreSQL behind ejabberd -----------------------------------

/// The same two loads on ejabberd (which spreads a component domain's stanzas over all its
/// connections) with the store on one PostgreSQL database: one Reach instance, then two
/// (each with its own state folder, SMTP listener and instance name), alternately.
async fn store_instances(size: Size) -> (Vec<Row>, Vec<String>) {
    let loads = StoreLoads::new(size);
    let StoreLoads {
        pairs,
        window,
        buddies,
        burst,
        ..
    } = loads;
    let (pg, rtt, server) = store_site(ServerKind::Ejabberd, &loads).await;
    let ((routing_one, routing_two), (email_one, email_two)) =
        loads.alternate(&server, &pg, Setup::PG, Setup::PG2).await;
    let rows = comparison_rows(
        [
            "inst-1 XMPP routing on ejabberd, 2 vs 1 PostgreSQL instances (delivered msgs/s)",
            "inst-2 XMPP->email burst on ejabberd, 2 vs 1 instances (msgs/s)",
            "inst-2 XMPP->email latency at 200/s, 2 vs 1 instances",
        ],
        "1 instance",
        (&routing_one, &routing_two),
        (&email_one, &email_two),
        format!("ejabberd, {pairs} pairs, {window} in flight"),
        format!("ejabberd, {burst} one-message emails, {buddies} buddies"),
    );
    let details = run_details(
        &format!(
            "instances: CPU and statements per run (one read round trip before the load: {} µs)",
            rtt.as_micros()
        ),
        &routing_one.iter().chain(&routing_two).collect::<Vec<_>>(),
        &email_one.iter().chain(&email_two).collect::<Vec<_>>(),
    );
    (rows, details)
}
