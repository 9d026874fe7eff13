//! Fills a store with many users and sessions, for the scale figures in BENCHMARKS.md.
//!
//! ```sh
//! cargo run --release --example populate -- STORE_DIR [USERS] [SESSIONS_PER_USER] [BUDDIES_PER_USER]
//! ```
//!
//! Defaults: 100,000 users `userN@localhost` (handle `userN`, a verified email
//! `userN@mail.example`), 10 sessions each (1,000,000 in all) with `peerM@example.net`, and 2
//! buddies each. The store must not exist yet or belong to a stopped Reach; it is written through
//! Reach's own store API, exactly as Reach would have written it, and flushed in batches.

use std::time::Instant;

use reach::address::{Email, Handle};
use reach::store::{Buddy, Session, Store, Terminal, User};

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let Some(dir) = args.first() else {
        eprintln!("usage: populate STORE_DIR [USERS] [SESSIONS_PER_USER] [BUDDIES_PER_USER]");
        std::process::exit(2);
    };
    let number = |i: usize, default: usize| -> usize {
        args.get(i).map_or(default, |s| {
            s.parse().unwrap_or_else(|_| {
                eprintln!("not a number: {s}");
                std::process::exit(2)
            })
        })
    };
    let users = number(1, 100_000);
    let sessions_per_user = number(2, 10);
    let buddies_per_user = number(3, 2);

    let store = Store::open(std::path::Path::new(dir)).unwrap_or_else(|e| {
        eprintln!("cannot open the store at {dir}: {e}");
        std::process::exit(1)
    });
    let started = Instant::now();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for i in 0..users {
        let handle = Handle::parse(&format!("user{i}")).expect("a valid handle");
        let mut email = Terminal::unverified(
            Email::parse(&format!("user{i}@mail.example")).expect("a valid address"),
        );
        email.verified = true;
        let user = User {
            jid: format!("user{i}@localhost"),
            handle: handle.clone(),
            email: Some(email),
            phone: None,
            registered_at: now,
            primary: None,
            subscription_policy: Default::default(),
            time_zone: None,
        };
        store.put_user(&user).expect("write a user");
        for s in 0..sessions_per_user {
            let session = Session {
                peer: format!("peer{}@example.net", (i * 7 + s) % (users.max(1) * 3)),
                last_active: now,
                thread: Some(format!("t{i}-{s}")),
                ..Session::default()
            };
            store
                .put_session(&user.jid, &session)
                .expect("write a session");
        }
        for b in 0..buddies_per_user {
            let buddy = Buddy {
                receives_presence: true,
                we_subscribed: true,
                ..Buddy::default()
            };
            store
                .put_buddy(&handle, &format!("buddy{b}-{i}@example.net"), &buddy)
                .expect("write a buddy");
        }
        if i % 10_000 == 9_999 {
            store.flush().expect("flush");
            eprintln!("{} users, {:.1} s", i + 1, started.elapsed().as_secs_f64());
        }
    }
    store.flush().expect("flush");
    println!(
        "{users} users, {} sessions, {} buddies written to {dir} in {:.1} s",
        users * sessions_per_user,
        users * buddies_per_user,
        started.elapsed().as_secs_f64()
    );
}
