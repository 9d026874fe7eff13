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
