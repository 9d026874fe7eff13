//! The user's routing rules end to end: the built `reach` against a real Prosody, a real Kannel
//! (the test holds the fake SMSC's socket as Alice's phone) and a real SMTP relay (aiosmtpd).
//! A grace delay cancelled by reading, and quiet hours on the phone.

use crate::support;

use std::time::Duration;

use support::kannel::{Handset, Kannel, Mt};
use support::mail::MailSink;
use support::{body, Client, Reach, Server, ServerKind};

const D: &str = "reach.localhost";
const T: Duration = Duration::from_secs(15);
const PHONE: &str = "+15551234567";
const SERVICE_NUMBER: &str = "+15550000000";
const ALICE_MAIL: &str = "alice@mail.example";
const SECRET: &str = "routingsecret7";
const SESSION: &str = "bob\\40localhost@reach.localhost";

struct World {
    server: Server,
    _kannel: Kannel,
    phone: Handset,
    sink: MailSink,
    reach: Reach,
    _state: tempfile::TempDir,
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- reach log ---\n{}", self.reach.log());
        }
    }
}

impl World {
    async fn new() -> World {
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
        let sink = MailSink::start().await;
        let state = tempfile::tempdir().unwrap();
        let extra = format!(
            "[routing]\ngrace_delay_secs = 3\n\n\
             [email]\nrelay = \"smtp://127.0.0.1:{}\"\nfrom_address = \"reach@{D}\"\nreply_domain = \"{D}\"\n\
             listen = \"127.0.0.1:{}\"\ndigest_window_secs = 1\n\n\
             [sms]\nsendsms_url = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\nfrom = \"{SERVICE_NUMBER}\"\n\
             webhook_listen = \"127.0.0.1:{webhook_port}\"\nwebhook_url = \"http://127.0.0.1:{webhook_port}\"\n\
             webhook_secret = \"{SECRET}\"\n",
            sink.port,
            support::free_port(),
            kannel.sendsms_url(),
            kannel.username(),
            kannel.password()
        );
        let reach = Reach::start_with(&server, state.path(), &extra).await;
        World {
            server,
            _kannel: kannel,
            phone,
            sink,
            reach,
            _state: state,
        }
    }

    async fn client(&self, user: &str) -> Client {
        let mut c = Client::connect(&self.server, user, &format!("{user}pw"), "pc").await;
        support::wait_for_component(&mut c, D).await;
        c
    }

    /// The next SMS whose text contains `needle` (the daily "now forwarding" prompt is skipped).
    async fn sms_containing(&mut self, needle: &str) -> Mt {
        let deadline = std::time::Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            match self.phone.recv_mt(left).await {
                Some(mt) if mt.text.contains(needle) => return mt,
                Some(_) => continue,
                None => panic!("the phone got no SMS containing {needle:?}"),
            }
        }
    }

    /// Asserts that no SMS with `needle` comes within `wait`.
    async fn no_sms_containing(&mut self, needle: &str, wait: Duration) {
        let deadline = std::time::Instant::now() + wait;
        while let Some(mt) = self
            .phone
            .recv_mt(deadline.saturating_duration_since(std::time::Instant::now()))
            .await
        {
            assert!(!mt.text.contains(needle), "unexpected SMS: {mt:?}");
        }
    }

    async fn say(alice: &mut Client, line: &str) -> String {
        alice
            .send(&format!(
                "<message type='chat' to='{D}'><body>{line}</body></message>"
            ))
            .await;
        let reply = alice
            .expect(line, T, |s| s.attr("from") == Some(D) && body(s).is_some())
            .await;
        body(&reply).unwrap()
    }

    /// Alice registers with a phone (and optionally an email address) and verifies them.
    async fn alice(&mut self, with_email: bool) -> Client {
        let mut alice = self.client("alice").await;
        alice.presence("").await;
        let email = if with_email {
            format!("<email>{ALICE_MAIL}</email>")
        } else {
            String::new()
        };
        let ok = alice
            .iq(&format!(
                "<iq type='set' id='reg' to='{D}'><query xmlns='jabber:iq:register'><username>alice</username><phone>{PHONE}</phone>{email}</query></iq>"
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
        // Registration says where the codes went, once per terminal.
        for _ in 0..if with_email { 2 } else { 1 } {
            alice
                .expect("a note that a code is on its way", T, |s| {
                    s.attr("from") == Some(D) && body(s).is_some_and(|b| b.contains("on its way"))
                })
                .await;
        }
        let code_sms = self.sms_containing("code").await;
        let code: String = code_sms
            .text
            .split(|c: char| !c.is_ascii_digit())
            .find(|w| w.len() == 6)
            .unwrap()
            .to_owned();
        assert!(World::say(&mut alice, &format!("verify {code}"))
            .await
            .contains("is verified"));
        if with_email {
            let mail = self.sink.wait_for(1, T).await.remove(0);
            let subject = mail.header("Subject").unwrap();
            let code: String = subject.chars().filter(char::is_ascii_digit).collect();
            assert!(World::say(&mut alice, &format!("verify {code}"))
                .await
                .contains("is verified"));
        }
        alice
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reading_a_message_cancels_its_forward_and_unread_ones_go_out_after_the_grace_delay() {
    let mut w = World::new().await;
    let mut alice = w.alice(false).await;
    alice.presence("<show>away</show>").await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;

    bob.send(&format!("<message type='chat' id='g1' to='alice@{D}'><body>read me</body><markable xmlns='urn:xmpp:chat-markers:0'/></message>")).await;
    alice
        .expect("the message on XMPP at once", T, |s| {
            body(s).as_deref() == Some("read me")
        })
        .await;
    alice.send(&format!("<message to='{SESSION}'><displayed xmlns='urn:xmpp:chat-markers:0' id='g1'/></message>")).await;
    w.no_sms_containing("read me", Duration::from_secs(6)).await;

    bob.send(&format!(
        "<message type='chat' id='g2' to='alice@{D}'><body>unread one</body></message>"
    ))
    .await;
    alice
        .expect("the second message on XMPP", T, |s| {
            body(s).as_deref() == Some("unread one")
        })
        .await;
    let started = std::time::Instant::now();
    w.sms_containing("unread one").await;
    assert!(
        started.elapsed() >= Duration::from_secs(2),
        "the grace delay (3 s) was waited out"
    );
}

/// `HH:MM-HH:MM` in UTC around now: quiet hours that are on right now.
fn quiet_window_around_now() -> String {
    let now = chrono::Utc::now().timestamp().rem_euclid(86_400) / 60;
    let start = (now + 1440 - 10) % 1440;
    let end = (now + 50) % 1440;
    format!(
        "{:02}:{:02}-{:02}:{:02}",
        start / 60,
        start % 60,
        end / 60,
        end % 60
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn quiet_hours_on_the_phone_send_by_email_or_hold() {
    let mut w = World::new().await;
    let mut alice = w.alice(true).await;
    assert!(World::say(&mut alice, "primary phone")
        .await
        .to_lowercase()
        .contains("phone"));
    let window = quiet_window_around_now();
    let said = World::say(&mut alice, &format!("set phone quiet {window} email")).await;
    assert!(!said.contains("Nothing was changed"), "{said}");
    alice.close().await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;

    // Quiet hours with "email": the message goes by email instead of SMS.
    bob.send(&format!(
        "<message type='chat' id='q1' to='alice@{D}'><body>during quiet hours</body></message>"
    ))
    .await;
    let mails = w.sink.wait_for(2, T).await;
    assert!(
        mails
            .iter()
            .any(|m| m.text().contains("during quiet hours")),
        "forwarded by email"
    );
    w.no_sms_containing("during quiet hours", Duration::from_secs(3))
        .await;

    // Quiet hours with "hold": nothing now, and the message waits for Alice's client.
    let mut alice = w.client("alice").await;
    let said = World::say(&mut alice, &format!("set phone quiet {window} hold")).await;
    assert!(!said.contains("Nothing was changed"), "{said}");
    alice.close().await;
    bob.send(&format!(
        "<message type='chat' id='q2' to='alice@{D}'><body>held for quiet hours</body></message>"
    ))
    .await;
    w.no_sms_containing("held for quiet hours", Duration::from_secs(4))
        .await;
    assert!(
        !w.sink
            .mails()
            .iter()
            .any(|m| m.text().contains("held for quiet hours")),
        "not by email either"
    );
    let mut alice = w.client("alice").await;
    alice.presence("").await;
    alice
        .expect("the held message on XMPP", T, |s| {
            body(s).as_deref() == Some("held for quiet hours")
        })
        .await;
}
