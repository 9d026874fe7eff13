//! The cost of one more message pending a forward: 1,000 messages from one stranger to an
//! offline user with a verified email address, through the core on a temporary store, timed per
//! hundred. A flat cost per message gives "last 100 / first 100" near 1; a pending record decoded
//! and rewritten whole for every message (as the first store layout did) grows with its length
//! (19.1 there, BENCHMARKS.md / RELIABILITY.md section 5).
//!
//! ```sh
//! cargo bench --bench pending            # 1,000 messages
//! cargo bench --bench pending -- 5000    # another count (a multiple of 100)
//! ```

use std::time::Instant;

use reach::core::email::EmailSettings;
use reach::core::{Core, Event, Limits, Settings};
use reach::store::{Store, Transaction};

const D: &str = "reach.example.org";
const NS: &str = "jabber:component:accept";
const ALICE: &str = "alice@example.org";
const NOW: u64 = 1_795_000_000;

fn stanza(xml: &str) -> Event {
    Event::Stanza(xml.parse().expect("a bench stanza"))
}

fn main() {
    let messages: usize = std::env::args()
        .skip(1)
        .find(|a| !a.starts_with('-'))
        .and_then(|a| a.parse().ok())
        .unwrap_or(1_000);
    let core = Core::with_seed(
        Settings {
            domain: D.into(),
            allowed_domains: vec!["example.org".into()],
            grace_delay_secs: 120,
            email: Some(EmailSettings {
                from_address: "reach@reply.example.org".into(),
                from_name: "Reach".into(),
                reply_domain: "reply.example.org".into(),
                // Long enough that every message of the run waits in one pending forward.
                digest_window_secs: 86_400,
                alias_idle_secs: 30 * 86_400,
            }),
            sms: None,
            limits: Limits {
                pending_per_conversation: 1_000_000,
                held_per_sender: 1_000_000,
                waiting_per_user: 1_000_000,
                ..Limits::default()
            },
            integrated_hosts: Vec::new(),
        },
        7,
    );
    let store = Store::temporary().expect("a temporary store");
    let handle = |event: Event| {
        let mut tx = store.begin().expect("a transaction");
        core.handle(&mut tx, NOW, event).expect("handled");
        tx.commit().expect("committed");
    };
    handle(stanza(&format!(
        "<iq xmlns='{NS}' type='set' id='reg' from='{ALICE}/pc' to='{D}'>\
         <query xmlns='jabber:iq:register'><username>alice</username>\
         <email>alice@mail.example.org</email></query></iq>"
    )));
    store
        .write(|tx| {
            let mut user = tx.user(ALICE)?.expect("alice");
            if let Some(email) = user.email.as_mut() {
                email.verified = true;
            }
            tx.put_user(&user)
        })
        .expect("store");

    let text = "x".repeat(200);
    let mut hundreds = Vec::new();
    let mut started = Instant::now();
    for i in 0..messages {
        handle(stanza(&format!(
            "<message xmlns='{NS}' type='chat' id='s{i}' from='mallory@example.com/x' \
             to='alice@{D}'><body>{text} {i}</body></message>"
        )));
        if i % 100 == 99 {
            hundreds.push(started.elapsed());
            started = Instant::now();
        }
    }
    let pending: usize = store
        .read(|tx| tx.pending_for(ALICE))
        .expect("store")
        .iter()
        .map(|p| p.items.len())
        .sum();
    assert_eq!(
        pending, messages,
        "every message waits in the pending forward"
    );
    let ms: Vec<String> = hundreds
        .iter()
        .map(|d| format!("{:.1}", d.as_secs_f64() * 1e3))
        .collect();
    println!("ms per 100 messages: {}", ms.join(" "));
    if let (Some(first), Some(last)) = (hundreds.first(), hundreds.last()) {
        println!(
            "last 100 / first 100: {:.2}",
            last.as_secs_f64() / first.as_secs_f64()
        );
    }
}
