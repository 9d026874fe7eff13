//! Proves the test harness (tests/support) against real Prosody and ejabberd.

use crate::support;

use std::time::{Duration, Instant};

use support::component::NS_COMPONENT;
use support::xml::{Item, StreamParser};
use support::*;

const T: Duration = Duration::from_secs(10);

fn is_chat_with_body(text: &'static str) -> impl Fn(&Element) -> bool {
    move |e| e.name() == "message" && body(e).as_deref() == Some(text)
}

async fn chat_between_two_users(kind: ServerKind) {
    let t0 = Instant::now();
    let mut server = Server::start(kind).await;
    eprintln!("{kind:?} up in {:?}", server.startup_time);
    server.register("alice", "alicepw").await;
    server.register("bob", "bobpw").await;

    let mut a = Client::connect(&server, "alice", "alicepw", "desk").await;
    let mut b = Client::connect(&server, "bob", "bobpw", "phone").await;
    assert_eq!(a.bare, "alice@localhost");
    assert_eq!(a.jid, "alice@localhost/desk");
    assert_eq!(b.bare, "bob@localhost");

    // Make bob available, and wait until the server has processed it (it echoes
    // initial presence back to the sending resource).
    b.presence("").await;
    let me = b.jid.clone();
    b.expect("own presence", T, |e| {
        e.name() == "presence" && attr(e, "from") == me
    })
    .await;

    let to = b.bare.clone();
    a.send(&format!(
        "<message to='{to}' type='chat' id='{}'><body>{}</body></message>",
        new_id(),
        escape("hello <bob> & welcome")
    ))
    .await;
    let msg = b
        .expect(
            "alice's chat message",
            T,
            is_chat_with_body("hello <bob> & welcome"),
        )
        .await;
    assert_eq!(bare(attr(&msg, "from")), "alice@localhost");
    assert_eq!(attr(&msg, "type"), "chat");
    assert_eq!(msg.ns(), NS_CLIENT);

    // Nothing else addressed to alice arrives at bob.
    b.expect_none(Duration::from_millis(300), is_chat_with_body("nope"))
        .await;

    // A wrong password is refused.
    let bad = Client::try_connect(&server, "alice", "wrong", "x").await;
    assert!(bad.is_err(), "wrong password accepted");

    a.close().await;
    b.close().await;
    server.stop().await;
    assert!(!server.is_running());
    eprintln!("{kind:?} chat test took {:?}", t0.elapsed());
}

async fn restart_keeps_accounts(kind: ServerKind) {
    let mut server = Server::start(kind).await;
    server.register("carol", "carolpw").await;
    let mut c = Client::connect(&server, "carol", "carolpw", "r1").await;
    let ping = format!(
        "<iq type='get' to='localhost' id='{}'><ping xmlns='urn:xmpp:ping'/></iq>",
        new_id()
    );
    c.iq_ok(&ping).await;

    let ports = (server.c2s_port(), server.component_port());
    let t = Instant::now();
    server.restart().await;
    eprintln!(
        "{kind:?} restart took {:?} (start-up part {:?})",
        t.elapsed(),
        server.startup_time
    );
    assert_eq!(ports, (server.c2s_port(), server.component_port()));

    // The old session is gone.
    let _ = c.recv(Duration::from_secs(2)).await;
    c.send("<presence/>").await;
    let _ = c.recv(Duration::from_millis(500)).await;

    let mut c = Client::connect(&server, "carol", "carolpw", "r2").await;
    let ping = format!(
        "<iq type='get' to='localhost' id='{}'><ping xmlns='urn:xmpp:ping'/></iq>",
        new_id()
    );
    c.iq_ok(&ping).await;
    c.close().await;
    server.stop().await;
}

/// A bare component connects with the configured secret; wait_for_component sees it;
/// messages to the component domain reach it and its replies reach the client.
async fn component_link(kind: ServerKind) {
    let server = Server::start(kind).await;
    server.register("dave", "davepw").await;
    let mut d = Client::connect(&server, "dave", "davepw", "x").await;
    d.presence("").await;

    // While no component is connected the server answers with an error.
    let probe = format!(
        "<iq type='get' to='{}' id='{}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
        server.component_domain(),
        new_id()
    );
    let err = d.iq(&probe).await;
    assert_eq!(attr(&err, "type"), "error", "{}", to_xml(&err));
    eprintln!("{kind:?} with no component: {}", to_xml(&err));

    // A wrong secret is refused.
    assert!(
        RawComponent::connect(&server, server.component_domain(), "wrong")
            .await
            .is_err()
    );

    let mut comp = RawComponent::connect(&server, server.component_domain(), server.secret())
        .await
        .expect("component handshake");
    let domain = server.component_domain().to_string();
    let responder = tokio::spawn(async move {
        while let Some(st) = comp.recv(Duration::from_secs(30)).await {
            let from = attr(&st, "from").to_string();
            let to = attr(&st, "to").to_string();
            let id = attr(&st, "id").to_string();
            match (st.name(), attr(&st, "type")) {
                ("iq", "get") => {
                    comp.send(&format!(
                        "<iq type='result' from='{to}' to='{from}' id='{id}'>\
                         <query xmlns='http://jabber.org/protocol/disco#info'>\
                         <identity category='gateway' type='smtp' name='Fake'/></query></iq>"
                    ))
                    .await
                }
                ("message", _) => {
                    let text = child_text(&st, "body", NS_COMPONENT).unwrap_or_default();
                    comp.send(&format!(
                        "<message type='chat' from='{to}' to='{from}'><body>echo: {}</body></message>",
                        escape(&text)
                    ))
                    .await
                }
                _ => {}
            }
        }
        comp.close().await;
    });

    wait_for_component(&mut d, &domain).await;
    d.send(&format!(
        "<message type='chat' to='echo@{domain}'><body>ping</body></message>"
    ))
    .await;
    let echo = d.expect("echo", T, is_chat_with_body("echo: ping")).await;
    assert_eq!(attr(&echo, "from"), format!("echo@{domain}"));
    responder.abort();
    d.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_chat() {
    chat_between_two_users(ServerKind::Prosody).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_chat() {
    chat_between_two_users(ServerKind::Ejabberd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_restart() {
    restart_keeps_accounts(ServerKind::Prosody).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_restart() {
    restart_keeps_accounts(ServerKind::Ejabberd).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_component_link() {
    component_link(ServerKind::Prosody).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_component_link() {
    component_link(ServerKind::Ejabberd).await;
}

#[test]
fn splitter_handles_fragments_prefixes_and_restarts() {
    let input = "<?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' id='abc' from='localhost' version='1.0'>\
        <stream:features><mechanisms xmlns='urn:ietf:params:xml:ns:xmpp-sasl'>\
        <mechanism>PLAIN</mechanism></mechanisms></stream:features> \n\
        <message from='a@b/c' to='d@e'><body>x &amp; y</body><x xmlns='urn:x'><y/></x></message>\
        <presence/>\
        <success xmlns='urn:ietf:params:xml:ns:xmpp-sasl'/>\
        <?xml version='1.0'?><stream:stream xmlns='jabber:client' \
        xmlns:stream='http://etherx.jabber.org/streams' id='def'>\
        <stream:error><conflict xmlns='urn:ietf:params:xml:ns:xmpp-streams'/></stream:error>\
        </stream:stream>";
    // Feed byte by byte: every split point must be handled.
    let mut p = StreamParser::new(NS_CLIENT);
    let mut items = Vec::new();
    for b in input.as_bytes() {
        p.push(std::slice::from_ref(b));
        while let Some(item) = p.next_item().expect("parse") {
            if let Item::Element(el) = &item {
                if el.name() == "success" {
                    p.reset();
                }
            }
            items.push(item);
        }
    }
    let summary: Vec<String> = items
        .iter()
        .map(|i| match i {
            Item::Header { id } => format!("header:{}", id.as_deref().unwrap_or("")),
            Item::Element(e) => format!("{}|{}", e.name(), e.ns()),
            Item::End => "end".into(),
        })
        .collect();
    assert_eq!(
        summary,
        [
            "header:abc",
            "features|http://etherx.jabber.org/streams",
            "message|jabber:client",
            "presence|jabber:client",
            "success|urn:ietf:params:xml:ns:xmpp-sasl",
            "header:def",
            "error|http://etherx.jabber.org/streams",
            "end",
        ]
    );
    let Item::Element(msg) = &items[2] else {
        unreachable!()
    };
    assert_eq!(body(msg).as_deref(), Some("x & y"));
    assert!(msg.get_child("x", "urn:x").unwrap().has_child("y", "urn:x"));
}

#[test]
fn free_ports_are_distinct() {
    let ports: std::collections::HashSet<u16> = (0..50).map(|_| free_port()).collect();
    assert_eq!(ports.len(), 50);
}

#[test]
fn base64_vectors() {
    use support::xml::base64;
    assert_eq!(base64(b""), "");
    assert_eq!(base64(b"f"), "Zg==");
    assert_eq!(base64(b"fo"), "Zm8=");
    assert_eq!(base64(b"foo"), "Zm9v");
    assert_eq!(base64(b"\0alice\0pw"), "AGFsaWNlAHB3");
}

/// Two Prosodies on loopback (`localhost` and `remote.localhost`) with s2s between them:
/// `tests/servers/mod_s2s_loopback.lua` sends each domain's s2s to the other's free port,
/// without DNS, and dialback authenticates without TLS.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_s2s_on_loopback_carries_chat_both_ways() {
    let t0 = Instant::now();
    let routes = vec![
        ("localhost".to_owned(), free_port()),
        ("remote.localhost".to_owned(), free_port()),
    ];
    let home = Server::start_prosody(ProsodySetup::new("localhost", routes[0].1, &routes)).await;
    let remote =
        Server::start_prosody(ProsodySetup::new("remote.localhost", routes[1].1, &routes)).await;
    assert_eq!(remote.host(), "remote.localhost");
    assert_eq!(remote.component_domain(), "reach.remote.localhost");
    home.register("alice", "alicepw").await;
    remote.register("carol", "carolpw").await;
    let mut alice = Client::connect(&home, "alice", "alicepw", "pc").await;
    let mut carol = Client::connect(&remote, "carol", "carolpw", "pc").await;
    assert_eq!(carol.bare, "carol@remote.localhost");
    alice.presence("").await;
    carol.presence("").await;

    carol
        .send(&format!(
            "<message to='alice@localhost' type='chat' id='{}'><body>hi from afar</body></message>",
            new_id()
        ))
        .await;
    let got = alice
        .expect(
            "carol's message over s2s",
            T,
            is_chat_with_body("hi from afar"),
        )
        .await;
    assert_eq!(bare(attr(&got, "from")), "carol@remote.localhost");
    alice
        .send(&format!(
            "<message to='carol@remote.localhost' type='chat' id='{}'><body>hi back</body></message>",
            new_id()
        ))
        .await;
    let got = carol
        .expect("alice's answer over s2s", T, is_chat_with_body("hi back"))
        .await;
    assert_eq!(bare(attr(&got, "from")), "alice@localhost");
    // Through the loopback routes, authenticated by dialback, both ways.
    for (server, other) in [(&home, &remote), (&remote, &home)] {
        let log = std::fs::read_to_string(server.dir().join("debug.log")).unwrap_or_default();
        let routed = format!(
            "s2s to {} goes to 127.0.0.1:{}",
            other.host(),
            other.s2s_port().unwrap()
        );
        let authenticated = format!(
            "connection {}->{} is now authenticated for {}",
            server.host(),
            other.host(),
            other.host()
        );
        assert!(
            log.contains(&routed),
            "{}: {routed:?} not logged",
            server.host()
        );
        assert!(
            log.contains(&authenticated),
            "{}: {authenticated:?} not logged",
            server.host()
        );
    }
    eprintln!("s2s selftest took {:?}", t0.elapsed());
}
