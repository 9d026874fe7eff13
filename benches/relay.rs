//! The outbound relay client alone (`reach::email::outbound::Relay`) against Postfix's
//! `smtp-sink` on loopback: the send latency one email at a time, then the rate with
//! `[email] connections` (4) sends in flight, as the email sender runs them.
//!
//! This is the latency check for the relay client: the run fails when the p99 of a single send
//! is above 20 ms. Without `TCP_NODELAY` every email waited ~40 ms for the relay's delayed ACK
//! (BENCHMARKS.md, "where the time goes"), so that regression cannot pass.
//!
//! Run with `cargo bench --bench relay [-- --quick]` (needs `smtp-sink`: apt `postfix`, which
//! `scripts/bench` installs).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime};

use futures::stream::{self, StreamExt};
use reach::email::outbound::{render, OutgoingEmail, Relay, RelayConfig, RelaySecurity};

/// The most a single send may take at the 99th percentile.
const P99_LIMIT: Duration = Duration::from_millis(20);

/// `smtp-sink` on a free loopback port, killed (by PID) when dropped.
struct Sink {
    child: Child,
    port: u16,
}

impl Sink {
    fn start() -> Sink {
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let child = Command::new("smtp-sink")
            .args(["-u", "nobody"])
            .arg(format!("127.0.0.1:{port}"))
            .arg("1024")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start smtp-sink (apt: postfix)");
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
            assert!(Instant::now() < deadline, "smtp-sink did not come up");
            std::thread::sleep(Duration::from_millis(20));
        }
        Sink { child, port }
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn email() -> OutgoingEmail {
    OutgoingEmail {
        from_name: "Bob via Reach".into(),
        from_address: "r-abcdef@reply.example.com".into(),
        to: "alice@example.org".into(),
        subject: "IM from Bob (bob@example.net)".into(),
        message_id: "m1.xyz@reply.example.com".into(),
        in_reply_to: None,
        references: vec![],
        paragraphs: vec!["10:02 Bob: hi there".into(), "10:03 Bob: ça va? 🦀".into()],
        footer: "Reply to this email to answer Bob.".into(),
    }
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let quick = std::env::args().any(|a| a == "--quick");
    let (one_by_one, in_flight_total) = if quick { (300, 3_000) } else { (1_000, 20_000) };
    let connections = 4;

    let sink = Sink::start();
    let relay = Relay::new(&RelayConfig {
        host: "127.0.0.1".into(),
        port: sink.port,
        security: RelaySecurity::Plain,
        username: None,
        password: None,
        hello_name: "reach.bench".into(),
        timeout: Duration::from_secs(30),
        connections,
    })
    .unwrap();
    let raw = render(&email(), SystemTime::now()).unwrap();
    let send = || relay.send("bounces@reply.example.com", "alice@example.org", &raw);

    // Warm-up: opens the connections.
    for _ in 0..20 {
        send().await.expect("warm-up send");
    }

    let mut took = Vec::with_capacity(one_by_one);
    for _ in 0..one_by_one {
        let started = Instant::now();
        send().await.expect("send");
        took.push(started.elapsed());
    }
    took.sort();
    let at = |q: f64| took[((took.len() - 1) as f64 * q).round() as usize];
    let (p50, p99, max) = (at(0.5), at(0.99), took[took.len() - 1]);
    println!(
        "relay -> smtp-sink, one at a time ({one_by_one} emails): p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms",
        ms(p50),
        ms(p99),
        ms(max)
    );

    let started = Instant::now();
    let failures = stream::iter(0..in_flight_total)
        .map(|_| send())
        .buffer_unordered(connections)
        .filter(|result| std::future::ready(result.is_err()))
        .count()
        .await;
    let elapsed = started.elapsed();
    assert_eq!(failures, 0, "sends failed");
    println!(
        "relay -> smtp-sink, {connections} in flight ({in_flight_total} emails): {:.0} emails/s",
        in_flight_total as f64 / elapsed.as_secs_f64()
    );

    drop(relay);
    drop(sink); // exit() below skips destructors: stop smtp-sink first.
    if p99 > P99_LIMIT {
        eprintln!(
            "FAIL: p99 {:.2} ms > {} ms for one send (Nagle? TCP_NODELAY lost?)",
            ms(p99),
            P99_LIMIT.as_millis()
        );
        std::process::exit(1);
    }
    println!("pass: p99 under {} ms", P99_LIMIT.as_millis());
}
