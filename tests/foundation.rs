//! The foundation, end to end: the built `reach` binary against a real Prosody and a real
//! ejabberd, driven by real c2s clients. Each scenario reads as what users do and what they see,
//! and runs once per server.

use crate::support;

use std::time::Duration;

use minidom::Element;
use support::{Client, Reach, Server, ServerKind};

const D: &str = "reach.localhost";
const T: Duration = Duration::from_secs(10);
const REGISTER: &str = "jabber:iq:register";
const DATA: &str = "jabber:x:data";
const STANZAS: &str = "urn:ietf:params:xml:ns:xmpp-stanzas";
const CLIENT: &str = "jabber:client";

/// A server with users alice, bob and carol, and Reach attached to it.
struct World {
    server: Server,
    reach: Reach,
    state: tempfile::TempDir,
}

impl World {
    async fn new(kind: ServerKind) -> World {
        let server = Server::start(kind).await;
        for user in ["alice", "bob", "carol"] {
            server.register(user, &format!("{user}pw")).await;
        }
        let state = tempfile::tempdir().unwrap();
        let reach = Reach::start(&server, state.path()).await;
        World {
            server,
            reach,
            state,
        }
    }

    /// A logged-in client that has seen Reach come up (no initial presence sent).
    async fn client(&self, user: &str, resource: &str) -> Client {
        let mut c = Client::connect(&self.server, user, &format!("{user}pw"), resource).await;
        support::wait_for_component(&mut c, D).await;
        c
    }

    async fn restart_reach(&mut self) {
        self.reach.stop().await;
        self.reach = Reach::start(&self.server, self.state.path()).await;
    }
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- reach log ---\n{}\n--- server log ---\n{}",
                self.reach.log(),
                self.server.log_tail(40)
            );
        }
    }
}

fn is_from(el: &Element, name: &str, from: &str) -> bool {
    el.name() == name
        && el
            .attr("from")
            .is_some_and(|f| f == from || f.starts_with(&format!("{from}/")))
}

fn body(el: &Element) -> Option<String> {
    el.get_child("body", CLIENT).map(|b| b.text())
}

fn error_condition(el: &Element) -> Option<String> {
    let error = el.get_child("error", CLIENT)?;
    error
        .children()
        .find(|c| c.ns() == STANZAS && c.name() != "text")
        .map(|c| c.name().to_owned())
}

fn register_iq(id: &str, username: &str, email: &str, phone: &str) -> String {
    format!(
        "<iq type='set' id='{id}' to='{D}'><query xmlns='{REGISTER}'><x xmlns='{DATA}' type='submit'>\
         <field var='FORM_TYPE'><value>{REGISTER}</value></field>\
         <field var='username'><value>{username}</value></field>\
         <field var='email'><value>{email}</value></field>\
         <field var='phone'><value>{phone}</value></field></x></query></iq>"
    )
}

/// Registers through XEP-0077 and approves Reach's subscription request, as a client would.
/// The client is made available first: servers deliver subscription requests to available resources.
async fn register_and_approve(c: &mut Client, handle: &str) {
    c.presence("").await;
    let reply = c.iq(&register_iq(&Client::new_id(), handle, "", "")).await;
    assert_eq!(
        reply.attr("type"),
        Some("result"),
        "registration of {handle}: {}",
        String::from(&reply)
    );
    let request = c
        .expect("Reach asks for the user's presence", T, |s| {
            is_from(s, "presence", D) && s.attr("type") == Some("subscribe")
        })
        .await;
    assert_eq!(request.attr("from"), Some(D));
    c.send(&format!("<presence type='subscribed' to='{D}'/>"))
        .await;
}

/// Bob adds `handle@D` to his roster; Reach accepts and asks back, and Bob accepts.
async fn subscribe_to_reach_address(bob: &mut Client, handle: &str) {
    let address = format!("{handle}@{D}");
    bob.send(&format!("<presence type='subscribe' to='{address}'/>"))
        .await;
    bob.expect("Reach asks for Bob's presence back", T, |s| {
        is_from(s, "presence", &address) && s.attr("type") == Some("subscribe")
    })
    .await;
    bob.send(&format!("<presence type='subscribed' to='{address}'/>"))
        .await;
}

async fn expect_reach_presence(
    bob: &mut Client,
    handle: &str,
    what: &str,
    check: impl Fn(&Element) -> bool,
) -> Element {
    let address = format!("{handle}@{D}");
    bob.expect(what, T, |s| {
        is_from(s, "presence", &address)
            && s.attr("type") != Some("subscribe")
            && s.attr("type") != Some("subscribed")
            && check(s)
    })
    .await
}

fn show(el: &Element) -> Option<String> {
    el.get_child("show", CLIENT).map(|s| s.text())
}

macro_rules! on_both_servers {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn prosody() {
                super::$scenario(ServerKind::Prosody).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ejabberd() {
                super::$scenario(ServerKind::Ejabberd).await
            }
        }
    )*};
}

on_both_servers!(
    registration_good_and_bad,
    presence_follows_the_users_client,
    relay_both_ways_through_per_session_jids,
    offline_messages_wait_for_login_and_survive_a_reach_restart,
    reach_reconnects_after_the_server_restarts,
    an_invalid_stanza_gets_an_error_and_the_link_stays_up,
    errors_for_unknown_addresses_and_strangers,
);

async fn registration_good_and_bad(kind: ServerKind) {
    let w = World::new(kind).await;
    let mut alice = w.client("alice", "laptop").await;
    alice.presence("").await;

    // The form suggests the handle from the localpart.
    let form = alice
        .iq(&format!(
            "<iq type='get' id='f1' to='{D}'><query xmlns='{REGISTER}'/></iq>"
        ))
        .await;
    let query = form.get_child("query", REGISTER).expect("a register query");
    let x = query.get_child("x", DATA).expect("an XEP-0004 form");
    let vars: Vec<_> = x.children().filter_map(|f| f.attr("var")).collect();
    assert_eq!(vars, ["FORM_TYPE", "username", "email", "phone"]);
    assert!(!query.has_child("registered", REGISTER));

    // Bad input is refused, naming the field, and registers nothing.
    let bad = alice.iq(&register_iq("b1", "Not Valid", "", "")).await;
    assert_eq!(error_condition(&bad).as_deref(), Some("not-acceptable"));
    let bad = alice.iq(&register_iq("b2", "alice", "nope", "")).await;
    assert_eq!(error_condition(&bad).as_deref(), Some("not-acceptable"));
    let bad = alice.iq(&register_iq("b3", "alice", "", "12345")).await;
    assert_eq!(error_condition(&bad).as_deref(), Some("not-acceptable"));
    let still = alice
        .iq(&format!(
            "<iq type='get' id='f2' to='{D}'><query xmlns='{REGISTER}'/></iq>"
        ))
        .await;
    assert!(!still
        .get_child("query", REGISTER)
        .unwrap()
        .has_child("registered", REGISTER));

    // Good input registers, and Reach subscribes to Alice.
    let ok = alice
        .iq(&register_iq(
            "g1",
            "alice",
            "alice@example.org",
            "+15551234567",
        ))
        .await;
    assert_eq!(ok.attr("type"), Some("result"));
    alice
        .expect("subscription request from Reach", T, |s| {
            is_from(s, "presence", D) && s.attr("type") == Some("subscribe")
        })
        .await;
    let again = alice
        .iq(&format!(
            "<iq type='get' id='f3' to='{D}'><query xmlns='{REGISTER}'/></iq>"
        ))
        .await;
    let query = again.get_child("query", REGISTER).unwrap();
    assert!(query.has_child("registered", REGISTER));
    assert_eq!(
        query
            .get_child("email", REGISTER)
            .map(|e| e.text())
            .as_deref(),
        Some("alice@example.org")
    );

    // Someone else cannot take the handle.
    let mut bob = w.client("bob", "pc").await;
    let taken = bob.iq(&register_iq("c1", "alice", "", "")).await;
    assert_eq!(error_condition(&taken).as_deref(), Some("conflict"));

    // Removal deletes the registration.
    let removed = alice
        .iq(&format!(
            "<iq type='set' id='r1' to='{D}'><query xmlns='{REGISTER}'><remove/></query></iq>"
        ))
        .await;
    assert_eq!(removed.attr("type"), Some("result"));
    let after = alice
        .iq(&format!(
            "<iq type='get' id='f4' to='{D}'><query xmlns='{REGISTER}'/></iq>"
        ))
        .await;
    assert!(!after
        .get_child("query", REGISTER)
        .unwrap()
        .has_child("registered", REGISTER));
    let now_free = bob.iq(&register_iq("c2", "alice", "", "")).await;
    assert_eq!(now_free.attr("type"), Some("result"));
}

async fn presence_follows_the_users_client(kind: ServerKind) {
    let w = World::new(kind).await;
    let mut alice = w.client("alice", "laptop").await;
    register_and_approve(&mut alice, "alice").await;
    alice.close().await;
    let mut bob = w.client("bob", "pc").await;
    bob.presence("").await;
    subscribe_to_reach_address(&mut bob, "alice").await;
    expect_reach_presence(
        &mut bob,
        "alice",
        "alice@D unavailable while Alice is offline",
        |p| p.attr("type") == Some("unavailable"),
    )
    .await;

    let mut alice = w.client("alice", "laptop").await;
    alice.presence("").await;
    expect_reach_presence(&mut bob, "alice", "alice@D available", |p| {
        p.attr("type").is_none() && show(p).is_none()
    })
    .await;

    alice
        .presence("<show>away</show><status>out for lunch</status>")
        .await;
    let away = expect_reach_presence(&mut bob, "alice", "alice@D away", |p| {
        show(p).as_deref() == Some("away")
    })
    .await;
    assert_eq!(
        away.get_child("status", CLIENT)
            .map(|s| s.text())
            .as_deref(),
        Some("out for lunch")
    );

    // A second client that is available wins over the away one.
    let mut phone = w.client("alice", "phone").await;
    phone.presence("").await;
    expect_reach_presence(&mut bob, "alice", "alice@D available again", |p| {
        p.attr("type").is_none() && show(p).is_none()
    })
    .await;

    phone.close().await;
    expect_reach_presence(&mut bob, "alice", "back to away", |p| {
        show(p).as_deref() == Some("away")
    })
    .await;
    alice.close().await;
    expect_reach_presence(&mut bob, "alice", "alice@D unavailable", |p| {
        p.attr("type") == Some("unavailable")
    })
    .await;
}

async fn relay_both_ways_through_per_session_jids(kind: ServerKind) {
    let w = World::new(kind).await;
    let mut alice = w.client("alice", "laptop").await;
    register_and_approve(&mut alice, "alice").await;
    alice.presence("").await;
    let mut bob = w.client("bob", "pc").await;
    bob.presence("").await;
    let session = format!("bob\\40localhost@{D}");
    let address = format!("alice@{D}");

    bob.send(&format!(
        "<message type='chat' id='m1' to='{address}'><body>Hi Alice</body><thread>t-1</thread>\
         <request xmlns='urn:xmpp:receipts'/><markable xmlns='urn:xmpp:chat-markers:0'/>\
         <active xmlns='http://jabber.org/protocol/chatstates'/></message>"
    ))
    .await;
    let got = alice
        .expect("Bob's message from his per-session JID", T, |s| {
            s.name() == "message" && body(s).is_some()
        })
        .await;
    assert_eq!(got.attr("from"), Some(session.as_str()));
    assert_eq!(body(&got).as_deref(), Some("Hi Alice"));
    assert_eq!(got.attr("id"), Some("m1"));
    assert_eq!(
        got.get_child("thread", CLIENT).map(|t| t.text()).as_deref(),
        Some("t-1")
    );
    assert!(got.has_child("request", "urn:xmpp:receipts"));
    assert!(got.has_child("active", "http://jabber.org/protocol/chatstates"));

    // Alice's client acknowledges and reads; Bob sees both for his message id, from alice@D.
    alice.send(&format!("<message id='a1' to='{session}'><received xmlns='urn:xmpp:receipts' id='m1'/></message>")).await;
    let receipt = bob
        .expect("receipt", T, |s| {
            is_from(s, "message", &address) && s.has_child("received", "urn:xmpp:receipts")
        })
        .await;
    assert_eq!(
        receipt
            .get_child("received", "urn:xmpp:receipts")
            .unwrap()
            .attr("id"),
        Some("m1")
    );
    alice.send(&format!("<message id='a2' to='{session}'><displayed xmlns='urn:xmpp:chat-markers:0' id='m1'/></message>")).await;
    let marker = bob
        .expect("displayed marker", T, |s| {
            is_from(s, "message", &address) && s.has_child("displayed", "urn:xmpp:chat-markers:0")
        })
        .await;
    assert_eq!(
        marker
            .get_child("displayed", "urn:xmpp:chat-markers:0")
            .unwrap()
            .attr("id"),
        Some("m1")
    );

    // Alice replies in the same thread; Bob gets it from alice@D.
    alice.send(&format!(
        "<message type='chat' id='r1' to='{session}'><body>Hello Bob</body><thread>t-1</thread><composing xmlns='http://jabber.org/protocol/chatstates'/></message>"
    ))
    .await;
    let reply = bob
        .expect("Alice's reply", T, |s| {
            is_from(s, "message", &address) && body(s).is_some()
        })
        .await;
    assert_eq!(reply.attr("from"), Some(address.as_str()));
    assert_eq!(body(&reply).as_deref(), Some("Hello Bob"));
    assert_eq!(reply.attr("id"), Some("r1"));
    assert_eq!(
        reply
            .get_child("thread", CLIENT)
            .map(|t| t.text())
            .as_deref(),
        Some("t-1")
    );
}

async fn offline_messages_wait_for_login_and_survive_a_reach_restart(kind: ServerKind) {
    let mut w = World::new(kind).await;
    let mut alice = w.client("alice", "laptop").await;
    register_and_approve(&mut alice, "alice").await;
    alice.close().await;

    let mut bob = w.client("bob", "pc").await;
    bob.presence("").await;
    for i in 1..=2 {
        bob.send(&format!("<message type='chat' id='o{i}' to='alice@{D}'><body>while you were out {i}</body></message>")).await;
    }
    // Held messages and the registration survive a restart of Reach.
    tokio::time::sleep(Duration::from_millis(500)).await;
    w.restart_reach().await;

    let mut alice = w.client("alice", "laptop").await;
    alice.presence("").await;
    for i in 1..=2 {
        let got = alice
            .expect("a held message", T, |s| {
                s.name() == "message" && s.attr("id") == Some(&*format!("o{i}"))
            })
            .await;
        assert_eq!(body(&got), Some(format!("while you were out {i}")));
        assert!(
            got.has_child("delay", "urn:xmpp:delay"),
            "held messages carry their original time"
        );
    }
    // Delivered once only.
    alice
        .expect_none(Duration::from_secs(1), |s| {
            s.name() == "message" && s.attr("id") == Some("o1")
        })
        .await;
}

async fn reach_reconnects_after_the_server_restarts(kind: ServerKind) {
    let mut w = World::new(kind).await;
    let mut alice = w.client("alice", "laptop").await;
    register_and_approve(&mut alice, "alice").await;
    alice.presence("").await;
    let mut bob = w.client("bob", "pc").await;
    bob.presence("").await;
    bob.send(&format!(
        "<message type='chat' id='before' to='alice@{D}'><body>before</body></message>"
    ))
    .await;
    alice
        .expect("message before the restart", T, |s| {
            body(s).as_deref() == Some("before")
        })
        .await;

    w.server.restart().await;
    let mut alice = w.client("alice", "laptop").await;
    alice.presence("").await;
    let mut bob = w.client("bob", "pc").await;
    bob.presence("").await;
    // Reach reconnects by itself (its backoff starts at 1 s), re-learns Alice's presence and relays.
    let mut delivered = false;
    for attempt in 0..10 {
        bob.send(&format!(
            "<message type='chat' id='after{attempt}' to='alice@{D}'><body>after</body></message>"
        ))
        .await;
        if alice
            .recv_matching(Duration::from_secs(2), |s| {
                body(s).as_deref() == Some("after")
            })
            .await
            .is_some()
        {
            delivered = true;
            break;
        }
    }
    assert!(
        delivered,
        "no message flowed after the server restart; reach log:\n{}",
        w.reach.log()
    );
    alice.send(&format!("<message type='chat' id='back' to='bob\\40localhost@{D}'><body>I'm back</body></message>")).await;
    bob.expect("Alice's reply after the restart", T, |s| {
        body(s).as_deref() == Some("I'm back")
    })
    .await;
}

async fn an_invalid_stanza_gets_an_error_and_the_link_stays_up(kind: ServerKind) {
    let w = World::new(kind).await;
    let mut alice = w.client("alice", "laptop").await;
    register_and_approve(&mut alice, "alice").await;
    alice.presence("").await;
    let mut bob = w.client("bob", "pc").await;
    bob.presence("").await;
    // A priority outside -128..127 is invalid (RFC 6121 §4.7.2.3); both servers route it as it is,
    // so the refusal comes from Reach's own parser.
    bob.send(&format!(
        "<presence id='bad1' to='alice@{D}'><priority>999</priority></presence>"
    ))
    .await;
    let error = bob
        .expect("an error for the invalid stanza", T, |s| {
            s.attr("id") == Some("bad1")
        })
        .await;
    assert_eq!(error.attr("type"), Some("error"));
    assert_eq!(
        error_condition(&error).as_deref(),
        Some("bad-request"),
        "{}",
        String::from(&error)
    );
    let text = error
        .get_child("error", CLIENT)
        .and_then(|e| e.get_child("text", STANZAS))
        .map(|t| t.text());
    assert!(
        text.unwrap_or_default()
            .starts_with("Reach could not parse"),
        "{}",
        String::from(&error)
    );
    // The link stays up: the next message flows.
    bob.send(&format!(
        "<message type='chat' id='good' to='alice@{D}'><body>still there?</body></message>"
    ))
    .await;
    alice
        .expect("the next message", T, |s| {
            body(s).as_deref() == Some("still there?")
        })
        .await;
}

async fn errors_for_unknown_addresses_and_strangers(kind: ServerKind) {
    let w = World::new(kind).await;
    let mut alice = w.client("alice", "laptop").await;
    register_and_approve(&mut alice, "alice").await;
    let mut carol = w.client("carol", "pc").await;
    carol
        .send(&format!(
            "<message type='chat' id='u1' to='nobody@{D}'><body>hello?</body></message>"
        ))
        .await;
    let e = carol
        .expect("error for an unknown handle", T, |s| {
            s.attr("id") == Some("u1")
        })
        .await;
    assert_eq!(error_condition(&e).as_deref(), Some("item-not-found"));
    // Carol is not registered: she has no conversations to hold through per-session JIDs.
    carol
        .send(&format!(
            "<message type='chat' id='u2' to='bob\\40localhost@{D}'><body>hello?</body></message>"
        ))
        .await;
    let e = carol
        .expect("error for an unregistered sender", T, |s| {
            s.attr("id") == Some("u2")
        })
        .await;
    assert_eq!(
        error_condition(&e).as_deref(),
        Some("registration-required")
    );
    // Disco on a reach address works for anyone.
    let info = carol.iq(&format!("<iq type='get' id='d1' to='alice@{D}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")).await;
    assert_eq!(info.attr("type"), Some("result"));
    let service = carol.iq(&format!("<iq type='get' id='d2' to='{D}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>")).await;
    let identities: Vec<_> = service
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .unwrap()
        .children()
        .filter(|c| c.name() == "identity")
        .map(|c| {
            format!(
                "{}/{}",
                c.attr("category").unwrap_or(""),
                c.attr("type").unwrap_or("")
            )
        })
        .collect();
    assert_eq!(identities, ["gateway/smtp", "gateway/sms"]);
}
