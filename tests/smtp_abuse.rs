//! Reach's SMTP listener under abuse, end to end: the built `reach` with a real Prosody, the
//! aiosmtpd relay and raw SMTP clients on loopback.
//!
//! - Slow clients lose their place: a command line sent a byte a second gets `421 4.4.2` at the
//!   command deadline; a client sending NOOP every second is closed at the idle timeout, and a
//!   fresh client from the same address then gets in.
//! - One address cannot take every place: over `max_connections_per_ip` a client gets
//!   `421 4.7.0`, while a client from another address (127.0.0.2) still gets in, also when the
//!   first address holds every place (its oldest idle session is closed to make room).
//! - One mail to two reply aliases (Alice answers Bob and Cc's Carol's conversation) reaches
//!   both conversations, and the same mail resent reaches neither again.
//!
//! Deadlines are configured in seconds here; the assertions are that the disconnect comes, and
//! not before its deadline, never how fast anything is.

use crate::support;

use std::time::{Duration, Instant};

use support::mail::{submit, MailSink, SinkMail, SmtpConn};
use support::{body, Client, Reach, Server, ServerKind};

const D: &str = "reach.localhost";
const T: Duration = Duration::from_secs(20);
const ALICE_MAIL: &str = "alice@mail.example";
const COMMAND_SECS: u64 = 3;
const IDLE_SECS: u64 = 6;

struct World {
    server: Server,
    sink: MailSink,
    reach: Reach,
    smtp_port: u16,
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
    async fn new(users: &[&str], listener: &str) -> World {
        let server = Server::start(ServerKind::Prosody).await;
        for user in users {
            server.register(user, &format!("{user}pw")).await;
        }
        let sink = MailSink::start().await;
        let smtp_port = support::free_port();
        let state = tempfile::tempdir().unwrap();
        let extra = format!(
            "[routing]\ngrace_delay_secs = 3\n\n[email]\nrelay = \"smtp://127.0.0.1:{}\"\n\
             from_address = \"reach@{D}\"\nreply_domain = \"{D}\"\nlisten = \"127.0.0.1:{smtp_port}\"\n\
             digest_window_secs = 1\nmax_message_bytes = 65536\n\
             command_timeout_secs = {COMMAND_SECS}\nidle_timeout_secs = {IDLE_SECS}\n\
             transaction_timeout_secs = 30\ndata_timeout_secs = 10\ndata_min_bytes_per_sec = 65536\n\
             {listener}\n",
            sink.port
        );
        let reach = Reach::start_with(&server, state.path(), &extra).await;
        let w = World {
            server,
            sink,
            reach,
            smtp_port,
            _state: state,
        };
        // The listener is up once it greets.
        let deadline = Instant::now() + T;
        loop {
            if let Some(mut c) = SmtpConn::try_connect("127.0.0.1", w.smtp_port).await {
                if c.reply().await.is_some_and(|(code, _)| code == 220) {
                    c.send("QUIT").await;
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "the SMTP listener did not come up"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        w
    }

    async fn client(&self, user: &str) -> Client {
        let mut c = Client::connect(&self.server, user, &format!("{user}pw"), "pc").await;
        support::wait_for_component(&mut c, D).await;
        c
    }

    async fn smtp_from(&self, source: &str) -> SmtpConn {
        SmtpConn::try_connect(source, self.smtp_port)
            .await
            .unwrap_or_else(|| panic!("connect to the listener from {source}"))
    }

    /// Alice registers with her email address and confirms it with the code from the mail.
    async fn alice_with_verified_email(&self) -> Client {
        let mut alice = self.client("alice").await;
        alice.presence("").await;
        let register = format!(
            "<iq type='set' id='reg' to='{D}'><query xmlns='jabber:iq:register'><username>alice</username><email>{ALICE_MAIL}</email></query></iq>"
        );
        let ok = alice.iq(&register).await;
        assert_eq!(ok.attr("type"), Some("result"), "{}", String::from(&ok));
        alice
            .expect("Reach's subscription request", T, |s| {
                s.attr("type") == Some("subscribe")
            })
            .await;
        alice
            .send(&format!("<presence type='subscribed' to='{D}'/>"))
            .await;
        let mails = self.sink.wait_for(1, T).await;
        let subject = mails[0].header("Subject").unwrap();
        let code: String = subject.chars().filter(char::is_ascii_digit).collect();
        assert_eq!(code.len(), 6, "subject: {subject}");
        alice
            .send(&format!(
                "<message type='chat' to='{D}'><body>verify {code}</body></message>"
            ))
            .await;
        alice
            .expect("verified", T, |s| {
                body(s).is_some_and(|b| b.contains("is verified"))
            })
            .await;
        alice
    }
}

/// The mails to Alice that forward IMs (not the verification mail).
fn forwards(sink: &MailSink) -> Vec<SinkMail> {
    sink.mails()
        .into_iter()
        .filter(|m| {
            m.header("Subject")
                .is_some_and(|s| s.starts_with("IM from"))
        })
        .collect()
}

async fn wait_forwards(sink: &MailSink, count: usize) -> Vec<SinkMail> {
    let deadline = Instant::now() + T;
    loop {
        let mails = forwards(sink);
        if mails.len() >= count {
            return mails;
        }
        assert!(
            Instant::now() < deadline,
            "expected {count} forwarded mails, got {}",
            mails.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_clients_are_cut_at_their_deadlines_and_the_address_gets_in_again() {
    let w = World::new(&[], "").await;

    // A command line sent one byte per second: every read brings a byte, yet the line must be
    // complete within the command deadline.
    // (Clocks start before connecting: the server's start later, so `waited` never overstates.)
    let started = Instant::now();
    let mut slow = w.smtp_from("127.0.0.1").await;
    assert_eq!(slow.reply().await.map(|r| r.0), Some(220));
    let line = format!("EHLO {}\r\n", "slow".repeat(20));
    let mut heard = None;
    for byte in line.as_bytes() {
        slow.send_raw(&[*byte]).await;
        if let Some(reply) = slow.reply_within(Duration::from_secs(1)).await {
            heard = Some(reply);
            break;
        }
    }
    let waited = started.elapsed();
    let (code, text) = heard.expect("an answer before the line was complete");
    assert_eq!(code, 421, "{text}");
    assert!(
        text.starts_with("4.4.2 ") && text.contains("complete command"),
        "{text}"
    );
    assert!(
        waited >= Duration::from_secs(COMMAND_SECS),
        "cut after {waited:?}"
    );
    assert!(slow.closed().await, "the connection is closed after 421");

    // NOOP every second: each answered, yet the connection is closed at the idle timeout.
    let started = Instant::now();
    let mut idle = w.smtp_from("127.0.0.1").await;
    assert_eq!(idle.reply().await.map(|r| r.0), Some(220));
    assert_eq!(idle.command("EHLO idle.example").await.0, 250);
    let mut noops = 0;
    let (code, text) = loop {
        idle.send("NOOP").await;
        match idle.reply().await {
            Some((250, _)) => noops += 1,
            Some(other) => break other,
            None => panic!("closed without 421 after {noops} NOOPs"),
        }
        if let Some(reply) = idle.reply_within(Duration::from_secs(1)).await {
            break reply;
        }
        assert!(started.elapsed() < T, "still open after {noops} NOOPs");
    };
    let waited = started.elapsed();
    assert_eq!(code, 421, "{text}");
    assert!(
        text.starts_with("4.4.2 ") && text.contains("idle"),
        "{text}"
    );
    assert!(
        waited >= Duration::from_secs(IDLE_SECS),
        "cut after {waited:?}"
    );
    // Each NOOP came well within the command deadline: it was the idle clock that ran out.
    assert!(noops >= 3, "{noops} NOOPs answered");
    assert!(idle.closed().await);

    // The same address gets in again and can use the listener.
    let mut fresh = w.smtp_from("127.0.0.1").await;
    assert_eq!(fresh.reply().await.map(|r| r.0), Some(220));
    assert_eq!(fresh.command("EHLO fresh.example").await.0, 250);
    assert_eq!(fresh.command("QUIT").await.0, 221);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_address_over_its_connection_cap_is_refused_while_another_gets_in() {
    let w = World::new(&[], "max_connections = 10\nmax_connections_per_ip = 2").await;
    let mut held = Vec::new();
    for _ in 0..2 {
        let mut c = w.smtp_from("127.0.0.1").await;
        assert_eq!(c.reply().await.map(|r| r.0), Some(220));
        assert_eq!(c.command("EHLO held.example").await.0, 250);
        held.push(c);
    }
    let mut third = w.smtp_from("127.0.0.1").await;
    let (code, text) = third.reply().await.expect("an answer");
    assert_eq!(code, 421, "{text}");
    assert!(
        text.starts_with("4.7.0 ") && text.contains("from your address"),
        "{text}"
    );
    assert!(third.closed().await);

    // Another source address is not affected by 127.0.0.1's connections.
    let mut other = w.smtp_from("127.0.0.2").await;
    assert_eq!(other.reply().await.map(|r| r.0), Some(220));
    assert_eq!(other.command("EHLO other.example").await.0, 250);
    let (code, _) = other
        .command(&format!("RCPT TO:<r-{}@{D}>", "a".repeat(26)))
        .await;
    assert_eq!(
        code, 503,
        "RCPT before MAIL is a sequence error, not a refusal"
    );

    // When one of 127.0.0.1's sessions ends, its place is free again.
    assert_eq!(held.remove(0).command("QUIT").await.0, 221);
    let deadline = Instant::now() + T;
    loop {
        let mut c = w.smtp_from("127.0.0.1").await;
        match c.reply().await {
            Some((220, _)) => break,
            Some((421, _)) => {}
            other => panic!("unexpected {other:?}"),
        }
        assert!(Instant::now() < deadline, "127.0.0.1 never got back in");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_one_address_holds_every_place_another_address_still_gets_in() {
    let w = World::new(&[], "max_connections = 3\nmax_connections_per_ip = 3").await;
    let mut held = Vec::new();
    for _ in 0..3 {
        let mut c = w.smtp_from("127.0.0.1").await;
        assert_eq!(c.reply().await.map(|r| r.0), Some(220));
        assert_eq!(c.command("EHLO held.example").await.0, 250);
        held.push(c);
    }
    // Every place is taken; 127.0.0.2 still gets in, and 127.0.0.1's oldest idle session is the
    // one told to go.
    let mut other = w.smtp_from("127.0.0.2").await;
    assert_eq!(other.reply().await.map(|r| r.0), Some(220));
    assert_eq!(other.command("EHLO other.example").await.0, 250);
    let (code, text) = held[0]
        .reply()
        .await
        .expect("421 for the oldest idle session");
    assert_eq!(code, 421, "{text}");
    assert!(
        text.starts_with("4.7.0 ") && text.contains("idle one"),
        "{text}"
    );
    assert!(held[0].closed().await);
    for c in &mut held[1..] {
        assert_eq!(c.command("NOOP").await.0, 250);
    }
    // 127.0.0.1 cannot take the place back from 127.0.0.2: it holds more already.
    let mut again = w.smtp_from("127.0.0.1").await;
    let (code, text) = again.reply().await.expect("an answer");
    assert_eq!(code, 421, "{text}");
    assert_eq!(other.command("NOOP").await.0, 250);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_mail_to_two_aliases_reaches_both_conversations_once() {
    let w = World::new(&["alice", "bob", "carol"], "").await;
    w.alice_with_verified_email().await.close().await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;
    let mut carol = w.client("carol").await;
    carol.presence("").await;

    bob.send(&format!(
        "<message type='chat' id='b1' to='alice@{D}'><body>Lunch at noon?</body></message>"
    ))
    .await;
    let from_bob = wait_forwards(&w.sink, 1).await.remove(0);
    carol
        .send(&format!(
            "<message type='chat' id='c1' to='alice@{D}'><body>Are you joining us?</body></message>"
        ))
        .await;
    let from_carol = wait_forwards(&w.sink, 2).await.remove(1);
    let (bob_alias, carol_alias) = (from_bob.reply_to(), from_carol.reply_to());
    assert_ne!(bob_alias, carol_alias);

    // Alice answers Bob and Cc's Carol's conversation: one mail, one Message-ID, two RCPT TO.
    let mail = |id: &str, text: &str| {
        format!(
            "From: Alice <{ALICE_MAIL}>\nTo: {bob_alias}\nCc: {carol_alias}\nSubject: Re: IM\n\
             Message-ID: <{id}>\nIn-Reply-To: {}\nMIME-Version: 1.0\n\
             Content-Type: text/plain; charset=utf-8\n\n{text}\n",
            from_bob.message_id()
        )
    };
    let both = mail("both-1@mail.example", "Yes, both of you: noon!");
    let s = submit(w.smtp_port, ALICE_MAIL, &[&bob_alias, &carol_alias], &both).await;
    assert!(s.rcpt.iter().all(|r| r.0 == 250), "{s:?}");
    assert_eq!(s.outcome().0, 250, "{s:?}");
    for (who, client) in [("Bob", &mut bob), ("Carol", &mut carol)] {
        let got = client
            .expect(&format!("{who} gets Alice's reply"), T, |s| {
                body(s).is_some()
            })
            .await;
        assert_eq!(got.attr("from"), Some(&*format!("alice@{D}")), "{who}");
        assert_eq!(
            body(&got).as_deref(),
            Some("Yes, both of you: noon!"),
            "{who}"
        );
    }

    // Alice's MTA sends the same mail again (it never heard the 250): taken, delivered to nobody
    // again. A new mail after it is the next thing each of them sees.
    let s = submit(w.smtp_port, ALICE_MAIL, &[&bob_alias, &carol_alias], &both).await;
    assert_eq!(s.outcome().0, 250, "{s:?}");
    let next = mail("both-2@mail.example", "See you there.");
    let s = submit(w.smtp_port, ALICE_MAIL, &[&bob_alias, &carol_alias], &next).await;
    assert_eq!(s.outcome().0, 250, "{s:?}");
    for (who, client) in [("Bob", &mut bob), ("Carol", &mut carol)] {
        let got = client
            .expect(&format!("{who}'s next message"), T, |s| body(s).is_some())
            .await;
        assert_eq!(
            body(&got).as_deref(),
            Some("See you there."),
            "{who} got the resent mail a second time"
        );
        client
            .expect_none(Duration::from_secs(1), |s| body(s).is_some())
            .await;
    }
}
