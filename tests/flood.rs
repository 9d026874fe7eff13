//! A stranger floods a user through a real Prosody: what Reach keeps for an offline user is
//! bounded per sender, the stranger hears why past the bound, another buddy still gets through,
//! and the user gets exactly what was kept, in order, when she comes online. And past the most
//! buddies a reach address may have, a new subscription request is refused.
//!
//! The exact errors and "nothing changed in the store" are unit-tested in `src/core/relay.rs`
//! and `src/core/presence.rs`; here we check what users of a real server see.

use crate::support;

use std::time::Duration;

use minidom::Element;
use support::{body, Client, Reach, Server, ServerKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const D: &str = "reach.localhost";
const T: Duration = Duration::from_secs(20);
const CLIENT: &str = "jabber:client";
const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
const DELAY: &str = "urn:xmpp:delay";
const ROSTER: &str = "jabber:iq:roster";
/// What one stranger may leave for Alice in this test (`[limits] held_per_sender`): more than
/// one page of delivery (100), so that Alice gets them over several batches.
const PER_SENDER: usize = 120;
const FLOOD: usize = 140;

/// The condition, error type and text of an error stanza.
fn error_of(el: &Element) -> Option<(String, String, String)> {
    let error = el.get_child("error", CLIENT)?;
    let condition = error
        .children()
        .find(|c| c.ns() == STANZAS && c.name() != "text")?
        .name()
        .to_owned();
    let text = error
        .get_child("text", STANZAS)
        .map(|t| t.text())
        .unwrap_or_default();
    Some((
        condition,
        error.attr("type").unwrap_or_default().to_owned(),
        text,
    ))
}

/// Shows Reach's and the server's logs when a test fails.
struct DumpOnPanic<'a>(&'a Reach, &'a Server);

impl Drop for DumpOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- reach log (tail) ---\n{}\n--- server log ---\n{}",
                tail(&self.0.log(), 80),
                self.1.log_tail(40)
            );
        }
    }
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// `GET path` on Reach's metrics endpoint, the body.
async fn http_get(port: u16, path: &str) -> String {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the metrics endpoint");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(T, stream.read_to_string(&mut text))
        .await
        .expect("an answer in time")
        .unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    body.to_owned()
}

/// How many messages the store holds for XMPP clients (`/stats`).
async fn held(port: u16) -> u64 {
    let stats: serde_json::Value = serde_json::from_str(&http_get(port, "/stats").await).unwrap();
    stats["held"].as_u64().expect("a held count")
}

/// Waits until the store holds `count` messages; the last count seen otherwise.
async fn wait_held(port: u16, count: u64) -> u64 {
    let deadline = std::time::Instant::now() + T;
    loop {
        let now = held(port).await;
        if now == count || std::time::Instant::now() > deadline {
            return now;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

async fn register(c: &mut Client, handle: &str) {
    c.presence("").await;
    let reply = c
        .iq(&format!(
            "<iq type='set' to='{D}' id='{}'><query xmlns='jabber:iq:register'><username>{handle}</username></query></iq>",
            Client::new_id()
        ))
        .await;
    assert_eq!(reply.attr("type"), Some("result"), "{reply:?}");
    c.expect("Reach's subscription request", T, |e: &Element| {
        e.name() == "presence" && e.attr("type") == Some("subscribe")
    })
    .await;
    c.send(&format!("<presence type='subscribed' to='{D}'/>"))
        .await;
}

async fn chat(c: &mut Client, id: &str) {
    c.send(&format!(
        "<message type='chat' to='alice@{D}' id='{id}'><body>{id}</body></message>"
    ))
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stranger_flooding_an_offline_user_is_stopped_at_its_share_and_nothing_kept_is_lost() {
    let server = Server::start(ServerKind::Prosody).await;
    for user in ["alice", "bob", "mallory"] {
        server.register(user, &format!("{user}pw")).await;
    }
    let state = tempfile::tempdir().unwrap();
    let metrics = support::free_port();
    let reach = Reach::start_with(
        &server,
        state.path(),
        &format!(
            "[limits]\nheld_per_sender = {PER_SENDER}\n\n[metrics]\nlisten = \"127.0.0.1:{metrics}\"\n"
        ),
    )
    .await;
    let _dump = DumpOnPanic(&reach, &server);

    let mut alice = Client::connect(&server, "alice", "alicepw", "pc").await;
    support::wait_for_component(&mut alice, D).await;
    register(&mut alice, "alice").await;
    alice.close().await;
    let mut bob = Client::connect(&server, "bob", "bobpw", "pc").await;
    bob.presence("").await;
    let mut mallory = Client::connect(&server, "mallory", "mallorypw", "pc").await;
    mallory.presence("").await;

    // Alice is offline: Bob's first message is held.
    chat(&mut bob, "b0").await;
    assert_eq!(wait_held(metrics, 1).await, 1, "Bob's message is held");

    // Mallory floods; Bob writes now and then during the flood.
    let mut bob_sent = vec!["b0".to_owned()];
    for i in 0..FLOOD {
        chat(&mut mallory, &format!("f{i:03}")).await;
        if i % 35 == 17 {
            let id = format!("b{}", bob_sent.len());
            chat(&mut bob, &id).await;
            bob_sent.push(id);
        }
    }
    // Past its share, Mallory hears why for each refused message, and only for those.
    let mut refused = Vec::new();
    while refused.len() < FLOOD - PER_SENDER {
        let Some(error) = mallory
            .wait_for(T, |e| {
                e.name() == "message" && e.attr("type") == Some("error")
            })
            .await
        else {
            break;
        };
        let (condition, type_, text) = error_of(&error).expect("an error");
        assert_eq!(
            (condition.as_str(), type_.as_str(), text.as_str()),
            (
                "resource-constraint",
                "wait",
                "alice cannot take more messages from you until the ones waiting are read; try again later"
            )
        );
        refused.push(error.attr("id").unwrap_or_default().to_owned());
    }
    let expected_refused: Vec<String> = (PER_SENDER..FLOOD).map(|i| format!("f{i:03}")).collect();
    assert_eq!(refused, expected_refused);
    mallory
        .expect_none(Duration::from_millis(500), |e| {
            e.attr("type") == Some("error")
        })
        .await;
    // Bob got through: no error, and the store holds his messages and Mallory's share, no more.
    bob.expect_none(Duration::from_millis(200), |e| {
        e.attr("type") == Some("error")
    })
    .await;
    let kept = (PER_SENDER + bob_sent.len()) as u64;
    assert_eq!(wait_held(metrics, kept).await, kept);

    // Alice comes online: exactly what was kept, each sender's in order, over several batches.
    let mut alice = Client::connect(&server, "alice", "alicepw", "pc").await;
    alice.presence("").await;
    let mut got: Vec<(String, String)> = Vec::new();
    while got.len() < kept as usize {
        let Some(m) = alice
            .wait_for(T, |e| e.name() == "message" && body(e).is_some())
            .await
        else {
            break;
        };
        assert!(
            m.has_child("delay", DELAY),
            "held messages carry their delay"
        );
        let from = m.attr("from").unwrap_or_default();
        let sender = if from.starts_with("bob\\40") {
            "bob"
        } else if from.starts_with("mallory\\40") {
            "mallory"
        } else {
            panic!("unexpected sender {from}")
        };
        got.push((sender.to_owned(), body(&m).unwrap()));
    }
    let of = |who: &str| -> Vec<String> {
        got.iter()
            .filter(|(s, _)| s == who)
            .map(|(_, b)| b.clone())
            .collect()
    };
    let mallory_kept: Vec<String> = (0..PER_SENDER).map(|i| format!("f{i:03}")).collect();
    assert_eq!(of("mallory"), mallory_kept);
    assert_eq!(of("bob"), bob_sent);
    alice
        .expect_none(Duration::from_millis(500), |e| {
            e.name() == "message" && body(e).is_some()
        })
        .await;
    assert_eq!(held(metrics).await, 0);
    // A page at a time: the first batch left the rest for the next ones.
    let first_page_left = format!("{} still held", kept - 100);
    assert!(
        reach.log().contains(&first_page_left),
        "no page of 100 leaving {first_page_left}"
    );

    // Now that Alice read them, Mallory may write again: relayed at once.
    chat(&mut mallory, "again").await;
    alice
        .expect("Mallory's new message", T, |e| {
            body(e).as_deref() == Some("again")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_the_most_buddies_a_subscription_request_is_refused() {
    let server = Server::start(ServerKind::Prosody).await;
    for user in ["alice", "bob", "mallory"] {
        server.register(user, &format!("{user}pw")).await;
    }
    let state = tempfile::tempdir().unwrap();
    let reach = Reach::start_with(&server, state.path(), "[limits]\nbuddies_per_user = 1\n").await;
    let _dump = DumpOnPanic(&reach, &server);
    let mut alice = Client::connect(&server, "alice", "alicepw", "pc").await;
    support::wait_for_component(&mut alice, D).await;
    register(&mut alice, "alice").await;

    let mut bob = Client::connect(&server, "bob", "bobpw", "pc").await;
    bob.presence("").await;
    bob.send(&format!("<presence type='subscribe' to='alice@{D}'/>"))
        .await;
    bob.expect("Alice's presence, now that Bob may see it", T, |e| {
        e.name() == "presence" && e.attr("from") == Some(&*format!("alice@{D}"))
    })
    .await;
    bob.expect("Reach subscribing back", T, |e| {
        e.name() == "presence" && e.attr("type") == Some("subscribe")
    })
    .await;

    // Mallory's client follows its roster, as clients do: the server shows the refusal there
    // (the request no longer pending, no subscription).
    let mut mallory = Client::connect(&server, "mallory", "mallorypw", "pc").await;
    mallory
        .iq_ok(&format!(
            "<iq type='get' id='{}'><query xmlns='{ROSTER}'/></iq>",
            Client::new_id()
        ))
        .await;
    mallory.presence("").await;
    mallory
        .send(&format!("<presence type='subscribe' to='alice@{D}'/>"))
        .await;
    let alice_d = format!("alice@{D}");
    let item = |e: &Element| -> Option<(String, Option<String>)> {
        let item = e.get_child("query", ROSTER)?.get_child("item", ROSTER)?;
        (item.attr("jid") == Some(alice_d.as_str())).then(|| {
            (
                item.attr("subscription").unwrap_or("none").to_owned(),
                item.attr("ask").map(str::to_owned),
            )
        })
    };
    mallory
        .expect("the request pending in the roster", T, |e| {
            item(e).is_some_and(|(_, ask)| ask.as_deref() == Some("subscribe"))
        })
        .await;
    let refused = mallory
        .expect("the refusal in the roster", T, |e| {
            item(e).is_some_and(|(_, ask)| ask.is_none())
        })
        .await;
    assert_eq!(item(&refused).unwrap().0, "none");
    // Reach neither subscribes back nor lets Mallory see Alice's presence.
    mallory
        .expect_none(Duration::from_millis(800), |e| {
            e.name() == "presence"
                && e.attr("from").is_some_and(|f| f.starts_with("alice@"))
                && e.attr("type") != Some("unsubscribed")
        })
        .await;
    // Bob, a buddy, still sees Alice's presence change.
    alice.presence("<show>away</show>").await;
    bob.expect("Alice away", T, |e| {
        e.name() == "presence"
            && e.attr("from") == Some(&*format!("alice@{D}"))
            && e.get_child("show", CLIENT).map(|s| s.text()).as_deref() == Some("away")
    })
    .await;
}
