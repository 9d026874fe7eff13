//! Reach's throughput benchmarks (issue 7, "Benchmarks"): each scenario measures the release
//! `reach` binary against real servers on loopback, and a baseline measured in the same run on
//! the same machine, and prints a table of rates, ratios and targets. See BENCHMARKS.md.
//!
//! Run with `scripts/bench` (or `cargo bench --bench throughput -- [--quick] [SCENARIO...]`,
//! scenarios: xmpp, email, replies, sms).

#[path = "../tests/support/mod.rs"]
mod support;

mod load;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use load::xmpp::{chat, D};
use load::{fmt_rate, Row};
use support::{Reach, Server, ServerKind};

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
    for scenario in chosen {
        let t = Instant::now();
        println!("== {scenario}");
        match scenario {
            "xmpp" => rows.extend(xmpp_routing(size).await),
            "email" => rows.extend(xmpp_to_email(size).await),
            "replies" => rows.extend(email_replies(size).await),
            "sms" => rows.extend(xmpp_to_sms(size).await),
            other => panic!("unknown scenario {other:?}; use xmpp, email, replies, sms"),
        }
        println!("   ({:.0} s)", t.elapsed().as_secs_f64());
    }
    print_table(&rows);
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
    let state = tempfile::tempdir().unwrap();
    load::seed::users(
        &state.path().join("store"),
        "alice",
        0..pairs,
        load::seed::Terminals::None,
    );
    let mut reach = start_reach(&server, state.path(), "").await;
    let delivered = Arc::new(AtomicU64::new(0));
    let ignored = Arc::new(AtomicU64::new(0));
    let mut bobs = bobs_raw(&server, pairs, &ignored, true).await;
    let mut alices = Vec::new();
    for i in 0..pairs {
        let mut a = load::xmpp::login(&server, &format!("alice{i}")).await;
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
            reach.log()
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
    let (reach_rate, sent, got) =
        load::xmpp::measure_closed_loop(&gate, senders, Duration::from_secs(1), size.measure).await;
    println!(
        "   reach: {} ({got}/{sent} delivered)",
        fmt_rate(reach_rate)
    );
    reach.stop().await;
    drop(raw_alices);
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
    let paced_rate = 2_000.0;
    let paced = (paced_rate * size.measure.as_secs_f64()) as usize;
    let users = (burst + paced).div_ceil(buddies);

    let ceiling = load::mail::source_to_sink(size.pick(100_000, 30_000) as u64, 20).await;
    println!("   smtp-source -> smtp-sink: {}", fmt_rate(ceiling));

    let server = Server::start(ServerKind::Prosody).await;
    load::xmpp::register_accounts(&server, "bob", buddies).await;
    let state = tempfile::tempdir().unwrap();
    load::seed::users(
        &state.path().join("store"),
        "u",
        0..users,
        load::seed::Terminals::Email,
    );
    let sink = load::mail::Sink::start(None).await;
    let mut reach = start_reach(
        &server,
        state.path(),
        &email_config(sink.port, load::port()),
    )
    .await;
    let ignored = Arc::new(AtomicU64::new(0));
    let bobs = bobs_raw(&server, buddies, &ignored, true).await;

    // Throughput: `burst` messages as fast as the buddies can write them.
    use tokio::io::AsyncWriteExt;
    let before = sink.count();
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
    let limit = Duration::from_secs(60);
    let done = load::wait_until(limit, || sink.count() >= before + burst as u64).await;
    let accepted = sink.count() - before;
    let elapsed = done.map_or(t0.elapsed(), |d| d - t0);
    let burst_rate = load::rate(accepted, elapsed);
    println!(
        "   reach burst: {} ({accepted}/{burst} emails in {:.1} s)",
        fmt_rate(burst_rate),
        elapsed.as_secs_f64()
    );

    // Latency at a fixed offered rate: message j at j / rate seconds.
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
    let lost = accepted_at.iter().filter(|a| a.is_none()).count();
    let (p50, p99) = (
        load::quantile_ms(&latencies, 0.5),
        load::quantile_ms(&latencies, 0.99),
    );
    println!("   reach at {paced_rate}/s: p50 {p50:.0} ms, p99 {p99:.0} ms ({lost} not accepted in time)");
    reach.stop().await;
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
