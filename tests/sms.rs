//! The SMS terminal end to end: the built `reach` against a real Prosody and a real Kannel
//! (bearerbox + smsbox with the fake SMSC), the test holding the fake SMSC's socket as the phone.

use crate::support;

use std::time::Duration;

use support::kannel::{Handset, Kannel, Mt};
use support::{body, Client, Reach, Server, ServerKind};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

const D: &str = "reach.localhost";
const T: Duration = Duration::from_secs(15);
const PHONE: &str = "+15551234567";
const SERVICE_NUMBER: &str = "+15550000000";
const SECRET: &str = "webhooksecret42";

struct World {
    server: Server,
    kannel: Kannel,
    phone: Handset,
    reach: Reach,
    webhook_port: u16,
    _state: tempfile::TempDir,
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- reach log ---\n{}\n--- kannel ---\n{}",
                self.reach.log(),
                self.kannel.logs(30)
            );
        }
    }
}

impl World {
    async fn new(daily_cap: u32) -> World {
        let server = Server::start(ServerKind::Prosody).await;
        for user in ["alice", "bob"] {
            server.register(user, &format!("{user}pw")).await;
        }
        let webhook_port = support::free_port();
        let kannel = Kannel::start(&format!(
            "http://127.0.0.1:{webhook_port}/sms/mo?secret={SECRET}"
        ))
        .await;
        let phone = Handset::connect(&kannel).await;
        let state = tempfile::tempdir().unwrap();
        let extra = format!(
            "[sms]\nsendsms_url = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\nfrom = \"{SERVICE_NUMBER}\"\n\
             webhook_listen = \"127.0.0.1:{webhook_port}\"\nwebhook_url = \"http://127.0.0.1:{webhook_port}\"\n\
             webhook_secret = \"{SECRET}\"\ndaily_cap = {daily_cap}\nallowed_prefixes = [\"+1\"]\n",
            kannel.sendsms_url(),
            kannel.username(),
            kannel.password()
        );
        let reach = Reach::start_with(&server, state.path(), &extra).await;
        World {
            server,
            kannel,
            phone,
            reach,
            webhook_port,
            _state: state,
        }
    }

    async fn client(&self, user: &str) -> Client {
        let mut c = Client::connect(&self.server, user, &format!("{user}pw"), "pc").await;
        support::wait_for_component(&mut c, D).await;
        c
    }

    async fn mt(&mut self, what: &str) -> Mt {
        match self.phone.recv_mt(T).await {
            Some(mt) => mt,
            None => panic!("the phone got no SMS: expected {what}"),
        }
    }

    /// The first forward of the day is preceded by Reach's prompt for the phone's local state.
    async fn prompt(&mut self) {
        let prompt = self.mt("the prompt for a local state").await;
        assert!(
            prompt.text.contains("now forwarding to this phone"),
            "{prompt:?}"
        );
    }

    async fn text(&mut self, text: &str) {
        self.phone.send_mo(PHONE, SERVICE_NUMBER, text).await;
    }

    /// Alice registers her phone and confirms it by texting the code back; then she logs out.
    async fn alice_with_verified_phone(&mut self) {
        let mut alice = self.client("alice").await;
        alice.presence("").await;
        let ok = alice
            .iq(&format!(
                "<iq type='set' id='reg' to='{D}'><query xmlns='jabber:iq:register'><username>alice</username><phone>{PHONE}</phone></query></iq>"
            ))
            .await;
        assert_eq!(ok.attr("type"), Some("result"), "{}", String::from(&ok));
        alice
            .expect("Reach's subscription request", T, |s| {
                s.attr("type") == Some("subscribe")
            })
            .await;
        alice
            .send(&format!("<presence type='subscribed' to='{D}'/>"))
            .await;
        let code_sms = self.mt("the verification code").await;
        assert_eq!(code_sms.to, PHONE);
        let code: String = code_sms
            .text
            .split(|c: char| !c.is_ascii_digit())
            .find(|w| w.len() == 6)
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("a 6-digit code in {code_sms:?}"));
        self.text(&code).await;
        alice
            .expect("verified", T, |s| {
                body(s).is_some_and(|b| b.contains("is verified"))
            })
            .await;
        let confirmation = self.mt("the confirmation").await;
        assert!(
            confirmation.text.contains("is verified"),
            "{confirmation:?}"
        );
        alice.close().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_reaches_the_phone_and_the_text_back_reaches_the_buddy() {
    let mut w = World::new(20).await;
    w.alice_with_verified_phone().await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;

    bob.send(&format!("<message type='chat' id='b1' to='alice@{D}'><body>Hi Alice, lunch?</body><thread>t-3</thread></message>")).await;
    w.prompt().await;
    let sms = w.mt("Bob's message").await;
    assert_eq!(sms.to, PHONE);
    assert!(sms.text.starts_with("bob: Hi Alice, lunch?\n"), "{sms:?}");
    assert!(
        sms.text.contains("Reply to answer bob"),
        "the first SMS explains how to reply: {sms:?}"
    );

    w.text("Sure, 12:30").await;
    let got = bob.expect("Alice's text", T, |s| body(s).is_some()).await;
    assert_eq!(got.attr("from"), Some(&*format!("alice@{D}")));
    assert_eq!(body(&got).as_deref(), Some("Sure, 12:30"));
    assert_eq!(
        got.get_child("thread", "jabber:client")
            .map(|t| t.text())
            .as_deref(),
        Some("t-3")
    );

    // The next SMS of the conversation has no hint.
    bob.send(&format!(
        "<message type='chat' id='b2' to='alice@{D}'><body>Great</body></message>"
    ))
    .await;
    assert_eq!(w.mt("the second message").await.text, "bob: Great");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stop_start_and_commands_from_the_phone() {
    let mut w = World::new(40).await;
    w.alice_with_verified_phone().await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;
    // Bob adds alice@D, so he is one of her buddies and Reach sees him online.
    bob.send(&format!("<presence type='subscribe' to='alice@{D}'/>"))
        .await;
    bob.expect("Reach asks back", T, |s| {
        s.attr("type") == Some("subscribe")
    })
    .await;
    bob.send(&format!("<presence type='subscribed' to='alice@{D}'/>"))
        .await;
    bob.presence("").await;

    // Reach learns Bob's presence through the server a moment later: ask until it has.
    let deadline = std::time::Instant::now() + T;
    loop {
        w.text("/who").await;
        let who = w.mt("the answer to /who").await;
        if who.text.contains("bob@localhost") {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "{who:?}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }

    w.text("@bob Are you there?").await;
    assert_eq!(
        body(&bob.expect("@bob", T, |s| body(s).is_some()).await).as_deref(),
        Some("Are you there?")
    );
    w.text("/msg bob@localhost Second way").await;
    assert_eq!(
        body(&bob.expect("/msg", T, |s| body(s).is_some()).await).as_deref(),
        Some("Second way")
    );
    w.text("@nobody hello").await;
    assert!(w.mt("how to address").await.text.contains("no chat with"));

    w.text("STOP").await;
    assert!(w
        .mt("the STOP confirmation")
        .await
        .text
        .contains("no more SMS"));
    bob.send(&format!(
        "<message type='chat' id='s1' to='alice@{D}'><body>while stopped</body></message>"
    ))
    .await;
    assert!(
        w.phone.recv_mt(Duration::from_secs(3)).await.is_none(),
        "nothing is sent after STOP"
    );
    w.text("START").await;
    assert!(w
        .mt("the START confirmation")
        .await
        .text
        .contains("resumed"));
    bob.send(&format!(
        "<message type='chat' id='s2' to='alice@{D}'><body>after start</body></message>"
    ))
    .await;
    w.prompt().await;
    assert!(w
        .mt("a message after START")
        .await
        .text
        .contains("after start"));

    w.text("/away").await;
    assert!(w.mt("the answer to /away").await.text.contains("away"));
    // The message held while stopped waits for Alice's XMPP client.
    let mut alice = w.client("alice").await;
    alice.presence("").await;
    alice
        .expect("the message held while stopped", T, |s| {
            body(s).as_deref() == Some("while stopped")
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_and_non_latin_messages_arrive_segmented() {
    let mut w = World::new(20).await;
    w.alice_with_verified_phone().await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;
    let long = "word ".repeat(120);
    bob.send(&format!(
        "<message type='chat' id='l1' to='alice@{D}'><body>{long}</body></message>"
    ))
    .await;
    w.prompt().await;
    let sms = w.mt("the long message").await;
    assert_eq!(sms.parts, 3, "{sms:?}");
    // Shortened to 3 segments; the hint of the first SMS of the conversation is kept whole.
    assert!(sms.text.contains("word...\nReply to answer bob"), "{sms:?}");
    bob.send(&format!(
        "<message type='chat' id='l2' to='alice@{D}'><body>Привет, как дела?</body></message>"
    ))
    .await;
    let sms = w.mt("the Cyrillic message").await;
    assert_eq!(sms.text, "bob: Привет, как дела?");
    assert_eq!(sms.parts, 1);
    w.text("Всё хорошо!").await;
    let got = bob
        .expect("the Cyrillic answer", T, |s| body(s).is_some())
        .await;
    assert_eq!(body(&got).as_deref(), Some("Всё хорошо!"));

    // A long answer comes from the phone in three parts, the last first: Kannel joins them in
    // order (`sms-combine-concatenated-mo`) and Bob gets one message, whole.
    let parts = [
        "Part one of a long answer from the phone, ",
        "part two in the middle, ",
        "and part three at the end.",
    ];
    for seq in [3, 1, 2] {
        // Concatenation header: IEI 0, length 3, reference 0x7a, 3 parts, this part.
        w.phone
            .send_line(&format!(
                "{PHONE} {SERVICE_NUMBER} udh-text %05%00%03%7A%03%0{seq} {}",
                parts[seq - 1]
            ))
            .await;
    }
    let got = bob
        .expect("the answer sent in parts", T, |s| body(s).is_some())
        .await;
    assert_eq!(body(&got).as_deref(), Some(&*parts.concat()));
    bob.expect_none(Duration::from_secs(2), |s| body(s).is_some())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_while_kannel_is_down() {
    let mut w = World::new(20).await;
    w.alice_with_verified_phone().await;
    let mut bob = w.client("bob").await;
    w.kannel.stop().await;
    bob.send(&format!(
        "<message type='chat' id='k1' to='alice@{D}'><body>while Kannel is down</body></message>"
    ))
    .await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    w.kannel.restart().await;
    w.phone.reconnect(&w.kannel).await;
    // Both queued SMS (the prompt and Bob's message) are retried once Kannel is back, several at
    // a time, so they may arrive in either order.
    let first = w.mt("the prompt or the message").await;
    let second = w.mt("the other one").await;
    let texts = [first.text, second.text];
    assert!(
        texts
            .iter()
            .any(|t| t.contains("now forwarding to this phone")),
        "{texts:?}"
    );
    assert!(
        texts.iter().any(|t| t.contains("while Kannel is down")),
        "{texts:?}"
    );
}

async fn http_get(port: u16, target: &str) -> u16 {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .unwrap();
    stream
        .write_all(
            format!("GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
                .as_bytes(),
        )
        .await
        .unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).await.unwrap();
    response
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_forged_text_is_refused_and_changes_nothing() {
    let mut w = World::new(20).await;
    w.alice_with_verified_phone().await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;
    bob.send(&format!(
        "<message type='chat' id='f1' to='alice@{D}'><body>hello</body></message>"
    ))
    .await;
    w.prompt().await;
    w.mt("Bob's message").await;
    let forged =
        "/sms/mo?from=%2B15551234567&to=%2B15550000000&text=forged&coding=0&charset=UTF-8&id=1";
    assert_eq!(http_get(w.webhook_port, forged).await, 403);
    assert_eq!(
        http_get(w.webhook_port, &format!("{forged}&secret=wrong")).await,
        403
    );
    bob.expect_none(Duration::from_secs(2), |s| body(s).is_some())
        .await;
    // The real path still works.
    w.text("real").await;
    assert_eq!(
        body(&bob.expect("the real text", T, |s| body(s).is_some()).await).as_deref(),
        Some("real")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_daily_cap_keeps_the_rest_for_xmpp() {
    // The verification code, its confirmation and the prompt count: 5 leaves room for 2 messages.
    let mut w = World::new(5).await;
    w.alice_with_verified_phone().await;
    let mut bob = w.client("bob").await;
    for i in 1..=4 {
        bob.send(&format!(
            "<message type='chat' id='c{i}' to='alice@{D}'><body>number {i}</body></message>"
        ))
        .await;
    }
    w.prompt().await;
    assert!(w.mt("message 1").await.text.contains("number 1"));
    assert!(w.mt("message 2").await.text.contains("number 2"));
    assert!(
        w.phone.recv_mt(Duration::from_secs(3)).await.is_none(),
        "the cap holds"
    );
    let mut alice = w.client("alice").await;
    alice.presence("").await;
    for i in 3..=4 {
        alice
            .expect("a message over the cap", T, |s| {
                body(s) == Some(format!("number {i}"))
            })
            .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_phones_delivery_report_becomes_the_buddys_receipt() {
    let mut w = World::new(20).await;
    w.alice_with_verified_phone().await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;
    bob.send(&format!(
        "<message type='chat' id='r-1' to='alice@{D}'><body>did you get this?</body><request xmlns='urn:xmpp:receipts'/></message>"
    ))
    .await;
    w.prompt().await;
    w.mt("the message").await;
    // Kannel's fake SMSC acknowledges delivery; Reach turns the report into Bob's receipt.
    let receipt = bob
        .expect("the receipt", T, |s| {
            s.has_child("received", "urn:xmpp:receipts")
        })
        .await;
    assert_eq!(receipt.attr("from"), Some(&*format!("alice@{D}")));
    assert_eq!(
        receipt
            .get_child("received", "urn:xmpp:receipts")
            .unwrap()
            .attr("id"),
        Some("r-1")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_text_with_a_form_feed_or_a_non_character_reaches_the_buddy_and_reach_keeps_running() {
    let mut w = World::new(20).await;
    w.alice_with_verified_phone().await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;
    bob.send(&format!(
        "<message type='chat' id='b1' to='alice@{D}'><body>Coming?</body></message>"
    ))
    .await;
    w.prompt().await;
    w.mt("Bob's message").await;

    // Sent as UCS-2 by the handset, as a phone sends anything beyond printable ASCII.
    w.text("page one\u{c}page two").await;
    let got = bob.expect("the text", T, |s| body(s).is_some()).await;
    assert_eq!(body(&got).as_deref(), Some("page one\npage two"));
    w.text("odd\u{ffff} one\u{1}").await;
    let got = bob
        .expect("the second text", T, |s| body(s).is_some())
        .await;
    assert_eq!(body(&got).as_deref(), Some("odd one"));

    // Reach is still there: Bob's next message reaches the phone.
    bob.send(&format!(
        "<message type='chat' id='b2' to='alice@{D}'><body>Great</body></message>"
    ))
    .await;
    assert_eq!(w.mt("the next message").await.text, "bob: Great");
    assert!(!w.reach.log().contains("panicked"), "{}", w.reach.log());
}
