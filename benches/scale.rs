//! Scale: Reach's start-up time, resident memory and per-message routing cost with a large
//! store (100,000 users and 1,000,000 sessions by default), each against the same measurement
//! with an empty store in the same run.
//!
//! ```sh
//! cargo bench --bench scale                       # 100,000 users x 10 sessions, 2 buddies each
//! cargo bench --bench scale -- 20000 10 2         # USERS SESSIONS_PER_USER BUDDIES_PER_USER
//! cargo bench --bench scale -- --populate DIR [USERS SESSIONS BUDDIES]   # only fill a store
//! ```
//!
//! Each run starts a private Prosody on loopback, writes the store through Reach's own store API
//! (users `userN@localhost` with a verified email, sessions with `peerM@example.net`, buddies
//! Reach is subscribed to), starts the release `reach` on it and measures: start to "component
//! link up" in Reach's log; peak resident memory (VmHWM) after the walk that probes every user
//! and buddy after connecting; and the time for a buddy's messages to reach an online user's
//! client through Reach (relay by per-session JID with a durable commit per batch).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use reach::address::{Email, Handle};
use reach::store::{Buddy, Session, Store, Terminal, Transaction, User};
use support::{body, Client, Reach, Server, ServerKind};

const D: &str = "reach.localhost";
const T: Duration = Duration::from_secs(30);
/// Messages per routing measurement.
const MESSAGES: usize = 2000;

/// Writes `users` users with `sessions` sessions and `buddies` buddies each into the store at `dir`.
fn populate(dir: &Path, users: usize, sessions: usize, buddies: usize) -> Duration {
    let started = Instant::now();
    let store = Store::open(dir).expect("open the store");
    let mut tx = store.begin().expect("a transaction");
    for i in 0..users {
        let handle = Handle::parse(&format!("user{i}")).expect("a valid handle");
        let mut email =
            Terminal::unverified(Email::parse(&format!("user{i}@mail.example")).expect("address"));
        email.verified = true;
        let user = User {
            jid: format!("user{i}@localhost"),
            handle: handle.clone(),
            email: Some(email),
            phone: None,
            registered_at: 1,
            primary: None,
            subscription_policy: Default::default(),
            time_zone: None,
            integrated: false,
        };
        tx.put_user(&user).expect("write a user");
        for s in 0..sessions {
            let session = Session {
                peer: format!("peer{}@example.net", (i * 7 + s) % (users * 3)),
                last_active: 1,
                thread: Some(format!("t{i}-{s}")),
                ..Session::default()
            };
            tx.put_session(&user.jid, &session)
                .expect("write a session");
        }
        for b in 0..buddies {
            let buddy = Buddy {
                receives_presence: true,
                we_subscribed: true,
                ..Buddy::default()
            };
            tx.put_buddy(&handle, &format!("buddy{b}-{i}@example.net"), &buddy)
                .expect("write a buddy");
        }
        if i % 10_000 == 9_999 {
            tx.commit().expect("commit");
            tx = store.begin().expect("a transaction");
        }
    }
    tx.commit().expect("commit");
    started.elapsed()
}

/// One process's resident memory now and at its peak, in KiB, from /proc.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let field = |name: &str| {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    (field("VmRSS:"), field("VmHWM:"))
}

struct Figures {
    users: usize,
    sessions: usize,
    populate: Duration,
    store_bytes: u64,
    start_to_connected: Duration,
    walk: Duration,
    rss_kib: u64,
    peak_kib: u64,
    relay: Duration,
}

fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .flatten()
                .map(|e| match e.metadata() {
                    Ok(m) if m.is_dir() => dir_bytes(&e.path()),
                    Ok(m) => m.len(),
                    Err(_) => 0,
                })
                .sum()
        })
        .unwrap_or(0)
}

async fn measure(server: &Server, users: usize, sessions: usize, buddies: usize) -> Figures {
    let state = tempfile::tempdir().expect("temp dir");
    let store_dir = state.path().join("store");
    let populate_time = populate(&store_dir, users, sessions, buddies);
    let store_bytes = dir_bytes(&store_dir);

    let started = Instant::now();
    let reach = Reach::start(server, state.path()).await;
    assert!(
        reach.wait_for_log("component link up", T).await,
        "Reach did not connect:\n{}",
        reach.log()
    );
    let start_to_connected = started.elapsed();
    // The walk after connecting probes 5,000 users per clock tick; wait until it is over
    // (Prosody answers each probe, so the log goes quiet when it is).
    let walk_started = Instant::now();
    let steps = users.div_ceil(5000) as u64;
    tokio::time::sleep(Duration::from_millis(1200 * steps + 1500)).await;
    let walk = walk_started.elapsed();
    let (rss_kib, peak_kib) = memory_kib(reach.pid());

    // Alice registers and comes online; Bob writes to her reach address.
    let mut alice = Client::connect(server, "alice", "alicepw", "pc").await;
    support::wait_for_component(&mut alice, D).await;
    alice.presence("").await;
    let reply = alice
        .iq(&format!(
            "<iq type='set' id='reg' to='{D}'><query xmlns='jabber:iq:register'><username>alice</username></query></iq>"
        ))
        .await;
    assert_eq!(
        reply.attr("type"),
        Some("result"),
        "{}",
        String::from(&reply)
    );
    alice
        .send(&format!("<presence type='subscribed' to='{D}'/>"))
        .await;
    alice.presence("").await;
    let mut bob = Client::connect(server, "bob", "bobpw", "pc").await;
    bob.presence("").await;
    // One message first: Alice's presence has reached Reach once it comes through by XMPP.
    bob.send(&format!(
        "<message type='chat' id='w' to='alice@{D}'><body>warm-up</body></message>"
    ))
    .await;
    alice
        .expect("the warm-up message", T, |s| {
            body(s).as_deref() == Some("warm-up")
        })
        .await;

    let relay_started = Instant::now();
    let sender = tokio::spawn(async move {
        for i in 0..MESSAGES {
            bob.send(&format!(
                "<message type='chat' id='m{i}' to='alice@{D}'><body>m{i}</body></message>"
            ))
            .await;
        }
        bob
    });
    let mut got = 0;
    while got < MESSAGES {
        match alice.recv(T).await {
            Some(s) if body(&s).is_some_and(|b| b.starts_with('m')) => got += 1,
            Some(_) => {}
            None => panic!(
                "only {got} of {MESSAGES} messages arrived:\n{}",
                reach.log()
            ),
        }
    }
    let relay = relay_started.elapsed();
    let bob = sender.await.expect("sender");
    bob.close().await;
    alice.close().await;
    let (_, peak_after) = memory_kib(reach.pid());
    drop(reach);
    Figures {
        users,
        sessions: users * sessions,
        populate: populate_time,
        store_bytes,
        start_to_connected,
        walk,
        rss_kib,
        peak_kib: peak_kib.max(peak_after),
        relay,
    }
}

fn number(args: &[String], i: usize, default: usize) -> usize {
    args.get(i).map_or(default, |s| {
        s.parse()
            .unwrap_or_else(|_| panic!("not a number: {s} (usage: see benches/scale.rs)"))
    })
}

fn main() {
    // `cargo bench` passes `--bench`; everything else is ours.
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    if args.first().map(String::as_str) == Some("--populate") {
        let dir = args
            .get(1)
            .expect("--populate DIR [USERS SESSIONS BUDDIES]");
        let (users, sessions, buddies) = (
            number(&args, 2, 100_000),
            number(&args, 3, 10),
            number(&args, 4, 2),
        );
        let took = populate(Path::new(dir), users, sessions, buddies);
        println!(
            "{users} users, {} sessions, {} buddies written to {dir} in {:.1} s",
            users * sessions,
            users * buddies,
            took.as_secs_f64()
        );
        return;
    }
    let (users, sessions, buddies) = (
        number(&args, 0, 100_000),
        number(&args, 1, 10),
        number(&args, 2, 2),
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime.block_on(async {
        let server = Server::start(ServerKind::Prosody).await;
        for user in ["alice", "bob"] {
            server.register(user, &format!("{user}pw")).await;
        }
        let empty = measure(&server, 0, 0, 0).await;
        let large = measure(&server, users, sessions, buddies).await;
        print_table(&empty, &large);
    });
}

fn print_table(empty: &Figures, large: &Figures) {
    let mib = |kib: u64| kib as f64 / 1024.0;
    let per_message_us = |f: &Figures| f.relay.as_secs_f64() * 1e6 / MESSAGES as f64;
    println!("| store | users | sessions | store on disk | populate | start → link up | walk | RSS after walk | peak RSS | {MESSAGES} messages relayed | per message |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|");
    for (name, f) in [("empty", empty), ("large", large)] {
        println!(
            "| {name} | {} | {} | {:.0} MiB | {:.1} s | {:.2} s | {:.1} s | {:.1} MiB | {:.1} MiB | {:.2} s | {:.0} µs |",
            f.users,
            f.sessions,
            f.store_bytes as f64 / 1048576.0,
            f.populate.as_secs_f64(),
            f.start_to_connected.as_secs_f64(),
            f.walk.as_secs_f64(),
            mib(f.rss_kib),
            mib(f.peak_kib),
            f.relay.as_secs_f64(),
            per_message_us(f),
        );
    }
    println!(
        "\nratios large/empty: start {:.2}, peak RSS {:.2}, per-message routing {:.2}",
        large.start_to_connected.as_secs_f64() / empty.start_to_connected.as_secs_f64(),
        large.peak_kib as f64 / empty.peak_kib.max(1) as f64,
        per_message_us(large) / per_message_us(empty)
    );
    println!(
        "targets: peak RSS < 128 MiB: {}; start → link up < 2 s: {}",
        if mib(large.peak_kib) < 128.0 {
            "met"
        } else {
            "NOT met"
        },
        if large.start_to_connected < Duration::from_secs(2) {
            "met"
        } else {
            "NOT met"
        }
    );
}
