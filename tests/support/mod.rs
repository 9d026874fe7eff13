//! Integration-test support: private XMPP servers, the `reach` binary as a child
//! process, a raw-XML c2s client and a bare component connection.
//!
//! Use from a test file with `mod support;` (then `use support::*;`).
//! Everything binds/connects on 127.0.0.1 only, lives in temporary folders, and
//! child processes are cleaned up by PID (never by name).

#![allow(dead_code)]
// Each test file uses only part of the re-exports below.
#![allow(unused_imports)]

pub mod account;
pub mod balancer;
pub mod client;
pub mod component;
pub mod docs;
pub mod kannel;
pub mod logs;
pub mod mail;
pub mod postfix;
pub mod postgres;
pub mod process;
pub mod reach;
pub mod server;
pub mod site;
pub mod soak;
pub mod tokens;
pub mod xml;

use std::collections::HashSet;
use std::net::TcpListener;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

pub use client::{attr, bare, body, child_text, Client, NS_CLIENT};
pub use component::RawComponent;
pub use minidom::Element;
pub use reach::{Reach, StoreAt};
pub use server::{ProsodySetup, Server, ServerKind};
pub use xml::{escape, to_xml};

/// Whether `condition` holds within `timeout` (looked at every 50 ms, and once more at the end).
pub async fn within(timeout: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if condition() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A TCP port on 127.0.0.1 that was free a moment ago and that this process has
/// not handed out before.
pub fn free_port() -> u16 {
    static GIVEN: Mutex<Option<HashSet<u16>>> = Mutex::new(None);
    let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
    let given = given.get_or_insert_with(HashSet::new);
    for _ in 0..1000 {
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("bind 127.0.0.1:0")
            .port();
        if given.insert(port) {
            return port;
        }
    }
    panic!("no free port found");
}

/// A stanza id unique within this process.
pub fn new_id() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(1);
    format!("t{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// Waits until the component `domain` answers a disco#info query with a result
/// (servers answer with an error while no component is connected). Panics after ~20 s.
pub async fn wait_for_component(client: &mut Client, domain: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut last = String::from("(no reply)");
    while Instant::now() < deadline {
        let id = new_id();
        client
            .send(&format!(
                "<iq type='get' to='{}' id='{id}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
                escape(domain)
            ))
            .await;
        let reply = client
            .wait_for(Duration::from_secs(5), |e| {
                e.name() == "iq" && attr(e, "id") == id
            })
            .await;
        match reply {
            Some(r) if attr(&r, "type") == "result" => return,
            Some(r) => last = to_xml(&r),
            None if client.is_closed() => {
                panic!("wait_for_component({domain}): client stream closed")
            }
            None => last = "(no reply within 5 s)".into(),
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("component {domain} did not answer disco#info within 20 s; last reply: {last}");
}
