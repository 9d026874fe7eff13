//! Hostile input where the real component link matters: Reach attached to a real Prosody, and
//! Reach against a fake XMPP server that writes what no real server would (invalid UTF-8).
//! The exact errors and "nothing changed" are unit-tested in `src/core/hostile.rs`; here we check
//! what really reaches Reach, that it answers, and that the link survives or comes back.

use crate::support;

use std::time::Duration;

use minidom::Element;
use support::{Client, Reach, Server, ServerKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

const D: &str = "reach.localhost";
const T: Duration = Duration::from_secs(10);
const CLIENT: &str = "jabber:client";
const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";

fn error_condition(el: &Element) -> Option<(String, String)> {
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
    Some((condition, text))
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
    // Let Reach see this user's presence.
    c.expect("Reach's subscription request", T, |e: &Element| {
        e.name() == "presence" && e.attr("type") == Some("subscribe")
    })
    .await;
    c.send(&format!("<presence type='subscribed' to='{D}'/>"))
        .await;
}

/// Bob writes to alice@D and Alice (online) gets it: the path works.
async fn relayed(bob: &mut Client, alice: &mut Client, text: &str) {
    bob.send(&format!(
        "<message type='chat' to='alice@{D}' id='{}'><body>{text}</body></message>",
        Client::new_id()
    ))
    .await;
    alice
        .expect("the relayed message", T, |e: &Element| {
            e.name() == "message" && support::body(e).as_deref() == Some(text)
        })
        .await;
}

/// Shows Reach's and the server's logs when a test fails.
struct DumpOnPanic<'a>(&'a Reach, &'a Server);

impl Drop for DumpOnPanic<'_> {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- reach log ---\n{}\n--- server log ---\n{}\n--- debug ---\n{}",
                self.0.log(),
                self.1.log_tail(40),
                std::fs::read_to_string(self.1.dir().join("debug.log")).unwrap_or_default()
            );
        }
    }
}

#[tokio::test]
async fn prosody_passes_hostile_stanzas_and_reach_refuses_them_with_its_own_limits() {
    let server = Server::start(ServerKind::Prosody).await;
    for user in ["alice", "bob", "mallory"] {
        server.register(user, &format!("{user}pw")).await;
    }
    let state = tempfile::tempdir().unwrap();
    let reach = Reach::start(&server, state.path()).await;
    let _dump = DumpOnPanic(&reach, &server);
    let mut alice = Client::connect(&server, "alice", "alicepw", "laptop").await;
    support::wait_for_component(&mut alice, D).await;
    register(&mut alice, "alice").await;
    let mut bob = Client::connect(&server, "bob", "bobpw", "pc").await;
    bob.presence("").await;
    relayed(&mut bob, &mut alice, "hello").await;

    // Deep nesting: Prosody lets it through; Reach answers policy-violation. 30,000 levels fit
    // in Prosody's stanza size limit (256 KiB): without Reach's guard below the parser that
    // overflowed the stack and aborted the process.
    for (id, open, levels) in [
        ("deep", "<x xmlns='urn:example:deep'>", 40),
        ("deeper", "<x>", 30_000),
    ] {
        bob.send(&format!(
            "<message type='chat' to='alice@{D}' id='{id}'><body>deep</body>{}{}</message>",
            open.repeat(levels),
            "</x>".repeat(levels)
        ))
        .await;
        let reply = bob
            .expect("the error for a deep stanza", T, |e: &Element| {
                e.name() == "message" && e.attr("id") == Some(id)
            })
            .await;
        assert_eq!(
            error_condition(&reply),
            Some((
                "policy-violation".into(),
                "the stanza is nested deeper than 32 elements".into()
            )),
            "{id}"
        );
    }

    // Many attributes.
    let attrs: String = (0..100).map(|i| format!(" a{i}='v'")).collect();
    bob.send(&format!(
        "<message type='chat' to='alice@{D}' id='attrs'><body>a</body><x xmlns='urn:example:x'{attrs}/></message>"
    ))
    .await;
    let reply = bob
        .expect("the error for attrs", T, |e: &Element| {
            e.name() == "message" && e.attr("id") == Some("attrs")
        })
        .await;
    assert_eq!(
        error_condition(&reply).map(|(c, _)| c).as_deref(),
        Some("policy-violation")
    );

    // An oversized body.
    let long = "x".repeat(10_001);
    bob.send(&format!(
        "<message type='chat' to='alice@{D}' id='long'><body>{long}</body></message>"
    ))
    .await;
    let reply = bob
        .expect("the error for long", T, |e: &Element| {
            e.name() == "message" && e.attr("id") == Some("long")
        })
        .await;
    assert_eq!(
        error_condition(&reply),
        Some((
            "not-acceptable".into(),
            "the message is longer than 10000 characters; send it in parts".into()
        ))
    );
    alice
        .expect_none(Duration::from_secs(1), |e: &Element| {
            e.name() == "message"
                && matches!(e.attr("id"), Some("deep" | "deeper" | "attrs" | "long"))
        })
        .await;

    // Invalid UTF-8 from a client: Prosody ends that client's stream itself; nothing reaches
    // Reach, and everyone else carries on.
    let mut mallory = Client::connect(&server, "mallory", "mallorypw", "x").await;
    mallory
        .send_bytes(b"<message type='chat' to='alice@reach.localhost' id='utf'><body>\xff\xfe</body></message>")
        .await;
    let mut seen = Vec::new();
    while let Some(el) = mallory.recv(Duration::from_secs(3)).await {
        seen.push(String::from(&el));
    }
    assert!(
        mallory.is_closed(),
        "Prosody kept a stream with invalid UTF-8: {seen:?}"
    );
    relayed(&mut bob, &mut alice, "still here").await;
    assert!(!reach.log().contains("utf-8"), "{}", reach.log());
}

/// A fake XMPP server's component listener: accepts Reach, completes the handshake (without
/// checking the secret) and hands back the socket.
async fn accept_component(listener: &TcpListener) -> TcpStream {
    let (mut socket, _) = tokio::time::timeout(Duration::from_secs(20), listener.accept())
        .await
        .expect("Reach connects")
        .unwrap();
    read_until(&mut socket, ">").await;
    socket
        .write_all(
            format!(
                "<?xml version='1.0'?><stream:stream xmlns='jabber:component:accept' \
                 xmlns:stream='http://etherx.jabber.org/streams' from='{D}' id='s1'>"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    read_until(&mut socket, "</handshake>").await;
    socket.write_all(b"<handshake/>").await.unwrap();
    socket
}

async fn read_until(socket: &mut TcpStream, needle: &str) -> String {
    let mut seen = Vec::new();
    let mut buf = [0u8; 4096];
    while !String::from_utf8_lossy(&seen).contains(needle) {
        let n = tokio::time::timeout(Duration::from_secs(10), socket.read(&mut buf))
            .await
            .unwrap_or_else(|_| {
                panic!(
                    "timed out waiting for {needle}; got {}",
                    String::from_utf8_lossy(&seen)
                )
            })
            .unwrap();
        assert!(n > 0, "Reach closed the link while we waited for {needle}");
        seen.extend_from_slice(&buf[..n]);
    }
    String::from_utf8_lossy(&seen).into_owned()
}

#[tokio::test]
async fn invalid_utf8_on_the_link_ends_the_stream_and_reach_reconnects() {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let state = tempfile::tempdir().unwrap();
    let config = format!(
        "[component]\ndomain = \"{D}\"\nserver = \"{addr}\"\nsecret = \"s\"\n\
         [users]\nallowed_domains = [\"localhost\"]\n\
         [store]\npath = {:?}\n",
        state.path().join("store").display().to_string()
    );
    let reach = Reach::start_config(state.path(), &config).await;

    let mut first = accept_component(&listener).await;
    first
        .write_all(
            b"<message from='bob@localhost/pc' to='alice@reach.localhost' id='bad'><body>\xff\xfe</body></message>",
        )
        .await
        .unwrap();
    // The parser refuses the stream: Reach drops this connection and comes back.
    let mut second = accept_component(&listener).await;
    let mut rest = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), first.read_to_end(&mut rest)).await;
    // On the new link, Reach answers as usual.
    second
        .write_all(
            format!(
                "<iq type='get' from='bob@localhost/pc' to='{D}' id='after'>\
                 <ping xmlns='urn:xmpp:ping'/></iq>"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    let answer = read_until(&mut second, "id='after'").await;
    assert!(answer.contains("type='result'"), "{answer}");
    drop(reach);
}
