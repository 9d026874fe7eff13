//! Registered users written straight into Reach's store through its public library API
//! (`reach::store::Store`), before Reach starts: thousands of users with a verified email
//! address or phone in milliseconds, instead of an XMPP registration and verification each.

use std::path::Path;

use reach::address::{Email, Handle, Phone};
use reach::store::{Store, Terminal, Transaction, User};

/// What the seeded users get.
#[derive(Debug, Clone, Copy)]
pub enum Terminals {
    /// None: XMPP only.
    None,
    /// A verified email address `u{i}@mail.example`, already asked for its local state today.
    Email,
    /// A verified phone `+1555{i:07}`, already asked for its local state today.
    Phone,
}

pub fn email_of(i: usize) -> String {
    format!("u{i}@mail.example")
}

pub fn phone_of(i: usize) -> String {
    format!("+1555{i:07}")
}

/// Writes users `{prefix}{i}@localhost` with handle `{prefix}{i}` for `i` in `range`.
pub fn users(store_dir: &Path, prefix: &str, range: std::ops::Range<usize>, terminals: Terminals) {
    let store = Store::open(store_dir).expect("open Reach's store");
    users_into(&store, prefix, range, terminals);
}

/// [`users`] into the PostgreSQL store at `url` (on a thread of its own: the PostgreSQL engine
/// is synchronous and must not run inside the bench's async tasks).
pub fn users_pg(url: &str, prefix: &str, range: std::ops::Range<usize>, terminals: Terminals) {
    std::thread::scope(|s| {
        s.spawn(|| {
            let store = Store::postgres(url, "bench-seed").expect("open the PostgreSQL store");
            make_lock_rows(url, prefix, &range);
            users_into(&store, prefix, range, terminals);
        })
        .join()
        .expect("seeding PostgreSQL");
    });
}

/// Makes the rows of the users' locks in PostgreSQL's `reach_locks` at once: the engine makes
/// each on first use with a commit of its own (a WAL flush, ~3 ms per user here), which would
/// make seeding thousands of users slow. Only a shortcut: if the engine names its locks
/// otherwise, these rows are unused and seeding is merely slower.
fn make_lock_rows(url: &str, prefix: &str, range: &std::ops::Range<usize>) {
    let mut client = postgres::Client::connect(url, postgres::NoTls).expect("connect");
    let (from, to) = (range.start as i64, range.end as i64 - 1);
    client
        .execute(
            "INSERT INTO reach_locks (name) SELECT 'user:' || $1 || i || '@localhost' \
             FROM generate_series($2::bigint, $3::bigint) AS i ON CONFLICT DO NOTHING",
            &[&prefix, &from, &to],
        )
        .expect("lock rows");
}

/// Writes the users in one transaction of `store`.
pub fn users_into(
    store: &Store,
    prefix: &str,
    range: std::ops::Range<usize>,
    terminals: Terminals,
) {
    let mut tx = store.begin().expect("a transaction");
    let now = reach::clock::now();
    for i in range {
        let handle = format!("{prefix}{i}");
        let mut user = User {
            jid: format!("{handle}@localhost"),
            handle: Handle::parse(&handle).expect("handle"),
            email: None,
            phone: None,
            registered_at: now,
            primary: None,
            subscription_policy: Default::default(),
            time_zone: None,
            integrated: false,
        };
        match terminals {
            Terminals::None => {}
            Terminals::Email => {
                let mut t = Terminal::unverified(Email::parse(&email_of(i)).expect("email"));
                t.verified = true;
                t.prompted_day = Some(now / 86_400);
                user.email = Some(t);
            }
            Terminals::Phone => {
                let mut t = Terminal::unverified(Phone::parse(&phone_of(i)).expect("phone"));
                t.verified = true;
                t.prompted_day = Some(now / 86_400);
                user.phone = Some(t);
            }
        }
        tx.put_user(&user).expect("put user");
    }
    tx.commit().expect("commit the users");
}
