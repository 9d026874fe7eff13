//! The email terminal end to end: the built `reach` against a real Prosody, a real SMTP relay
//! (aiosmtpd storing what Reach sends) and real SMTP submissions to Reach's own listener.

use crate::support;

use std::time::Duration;

use support::mail::{submit, MailSink, SinkMail};
use support::{body, Client, Reach, Server, ServerKind};

const D: &str = "reach.localhost";
const T: Duration = Duration::from_secs(15);
const ALICE_MAIL: &str = "alice@mail.example";

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
    async fn new() -> World {
        let server = Server::start(ServerKind::Prosody).await;
        for user in ["alice", "bob"] {
            server.register(user, &format!("{user}pw")).await;
        }
        let sink = MailSink::start().await;
        let smtp_port = support::free_port();
        let state = tempfile::tempdir().unwrap();
        let extra = format!(
            "[routing]\ngrace_delay_secs = 3\n\n[email]\nrelay = \"smtp://127.0.0.1:{}\"\n\
             from_address = \"reach@{D}\"\nreply_domain = \"{D}\"\nlisten = \"127.0.0.1:{smtp_port}\"\n\
             digest_window_secs = 2\nmax_message_bytes = 65536\n",
            sink.port
        );
        let reach = Reach::start_with(&server, state.path(), &extra).await;
        World {
            server,
            sink,
            reach,
            smtp_port,
            _state: state,
        }
    }

    async fn client(&self, user: &str) -> Client {
        let mut c = Client::connect(&self.server, user, &format!("{user}pw"), "pc").await;
        support::wait_for_component(&mut c, D).await;
        c
    }

    /// Alice registers with her email address and confirms it with the code from the mail.
    async fn alice_with_verified_email(&self) -> Client {
        let mut alice = self.client("alice").await;
        alice.presence("").await;
        let ok = alice.iq(&register("alice", ALICE_MAIL)).await;
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

    async fn reply(&self, to: &str, message: &str) -> (u16, String) {
        submit(self.smtp_port, ALICE_MAIL, &[to], message)
            .await
            .outcome()
    }
}

fn register(handle: &str, email: &str) -> String {
    format!(
        "<iq type='set' id='reg' to='{D}'><query xmlns='jabber:iq:register'><username>{handle}</username><email>{email}</email></query></iq>"
    )
}

fn reply_mail(from: &str, in_reply_to: &str, message_id: &str, text: &str) -> String {
    format!(
        "From: Alice <{from}>\nTo: x@{D}\nSubject: Re: IM\nMessage-ID: <{message_id}>\nIn-Reply-To: <{in_reply_to}>\n\
         MIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n{text}\n\nOn Wed, 25 Nov 2026 at 10:00, bob via Reach wrote:\n> earlier text\n"
    )
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
    let deadline = std::time::Instant::now() + T;
    loop {
        let mails = forwards(sink);
        if mails.len() >= count {
            return mails;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "expected {count} forwarded mails, got {}",
            mails.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_goes_by_email_and_the_reply_comes_back_in_the_conversation() {
    let w = World::new().await;
    let alice = w.alice_with_verified_email().await;
    alice.close().await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;

    bob.send(&format!("<message type='chat' id='b1' to='alice@{D}'><body>Hi Alice, lunch?</body><thread>t-9</thread></message>"))
        .await;
    let mail = wait_forwards(&w.sink, 1).await.remove(0);
    assert_eq!(mail.header("To").as_deref(), Some(ALICE_MAIL));
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("IM from bob (bob@localhost)")
    );
    assert_eq!(
        mail.raw_header("Auto-Submitted").as_deref(),
        Some("auto-generated")
    );
    assert_eq!(
        mail.raw_header("X-Auto-Response-Suppress").as_deref(),
        Some("All")
    );
    assert!(mail.raw_header("From").unwrap().contains("bob via Reach"));
    assert!(mail.text().contains("Hi Alice, lunch?"));
    let alias = mail.reply_to();
    assert!(
        alias.starts_with("r-") && alias.ends_with(&format!("@{D}")),
        "{alias}"
    );

    // Alice answers from her mail program; Bob gets it from alice@D in the same thread.
    let answer = w
        .reply(
            &alias,
            &reply_mail(
                ALICE_MAIL,
                &mail.message_id(),
                "reply-1@mail.example",
                "Yes! 12:30?",
            ),
        )
        .await;
    assert_eq!(answer.0, 250, "{answer:?}");
    let got = bob
        .expect("Alice's email reply", T, |s| body(s).is_some())
        .await;
    assert_eq!(got.attr("from"), Some(&*format!("alice@{D}")));
    assert_eq!(body(&got).as_deref(), Some("Yes! 12:30?"));
    assert_eq!(
        got.get_child("thread", "jabber:client")
            .map(|t| t.text())
            .as_deref(),
        Some("t-9")
    );

    // Bob's next message continues the same email thread.
    bob.send(&format!(
        "<message type='chat' id='b2' to='alice@{D}'><body>Great</body></message>"
    ))
    .await;
    let next = wait_forwards(&w.sink, 2).await.remove(1);
    assert_eq!(
        next.raw_header("In-Reply-To").as_deref(),
        Some("<reply-1@mail.example>")
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buddys_nick_with_line_breaks_never_becomes_a_header_or_a_recipient() {
    let w = World::new().await;
    w.alice_with_verified_email().await.close().await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;
    // XEP-0172 nick carrying CR/LF and header lines, as a malicious buddy could send it.
    let nick = "Bob&#13;&#10;Bcc: eve@evil.example&#13;&#10;X-Injected: yes&#10;Subject: pwned";
    bob.send(&format!(
        "<message type='chat' id='n1' to='alice@{D}'><body>hello</body>\
         <nick xmlns='http://jabber.org/protocol/nick'>{nick}</nick></message>"
    ))
    .await;
    let mail = wait_forwards(&w.sink, 1).await.remove(0);
    let raw = String::from_utf8_lossy(&mail.raw).into_owned();
    let head = raw.split("\r\n\r\n").next().unwrap_or(&raw);
    for line in head.lines() {
        let name = line.split(':').next().unwrap_or("").to_ascii_lowercase();
        assert!(
            !matches!(name.as_str(), "bcc" | "x-injected"),
            "an injected header line: {line:?} in\n{head}"
        );
    }
    assert_eq!(
        head.lines()
            .filter(|l| l.to_ascii_lowercase().starts_with("subject:"))
            .count(),
        1,
        "{head}"
    );
    // The relay was asked to deliver to Alice alone (aiosmtpd records the envelope).
    assert_eq!(mail.raw_header("X-RcptTo").as_deref(), Some(ALICE_MAIL));
    // The name survives, flattened to one line.
    let from = mail.header("From").unwrap_or_default();
    assert!(!from.contains("eve@evil.example"), "{from}");
    let subject = mail.header("Subject").unwrap_or_default();
    assert!(subject.starts_with("IM from Bob"), "{subject}");
    assert!(
        !subject.contains('\n') && !subject.contains('\r'),
        "{subject:?}"
    );
    assert!(mail.text().contains("hello"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replying_to_the_verification_mail_verifies_the_address() {
    let w = World::new().await;
    let mut alice = w.client("alice").await;
    alice.presence("").await;
    assert_eq!(
        alice.iq(&register("alice", ALICE_MAIL)).await.attr("type"),
        Some("result")
    );
    let mail = w.sink.wait_for(1, T).await.remove(0);
    assert_eq!(mail.header("To").as_deref(), Some(ALICE_MAIL));
    let answer = w
        .reply(
            &mail.reply_to(),
            &reply_mail(
                ALICE_MAIL,
                &mail.message_id(),
                "v-1@mail.example",
                "yes it's me",
            ),
        )
        .await;
    assert_eq!(answer.0, 250, "{answer:?}");
    alice
        .expect("verified", T, |s| {
            body(s).is_some_and(|b| b.contains("is verified"))
        })
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_within_the_digest_window_share_one_email() {
    let w = World::new().await;
    w.alice_with_verified_email().await.close().await;
    let mut bob = w.client("bob").await;
    for i in 1..=3 {
        bob.send(&format!(
            "<message type='chat' id='d{i}' to='alice@{D}'><body>part {i}</body></message>"
        ))
        .await;
    }
    let mails = wait_forwards(&w.sink, 1).await;
    tokio::time::sleep(Duration::from_secs(3)).await;
    assert_eq!(
        forwards(&w.sink).len(),
        1,
        "one email for the three messages"
    );
    let text = mails[0].text();
    for i in 1..=3 {
        assert!(text.contains(&format!("part {i}")), "{text}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nothing_is_lost_while_the_relay_is_down() {
    let mut w = World::new().await;
    w.alice_with_verified_email().await.close().await;
    w.sink.stop();
    let mut bob = w.client("bob").await;
    bob.send(&format!("<message type='chat' id='x1' to='alice@{D}'><body>while the relay is down</body></message>")).await;
    tokio::time::sleep(Duration::from_secs(5)).await;
    w.sink.resume().await;
    let mails = wait_forwards(&w.sink, 1).await;
    assert!(mails[0].text().contains("while the relay is down"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_listener_refuses_what_it_must_and_never_turns_it_into_messages() {
    let w = World::new().await;
    w.alice_with_verified_email().await.close().await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;
    bob.send(&format!(
        "<message type='chat' id='s1' to='alice@{D}'><body>hello</body></message>"
    ))
    .await;
    let mail = wait_forwards(&w.sink, 1).await.remove(0);
    let alias = mail.reply_to();
    let thread = mail.message_id();

    // A stranger, even with a valid-looking alias: refused at RCPT.
    let s = submit(
        w.smtp_port,
        "mallory@evil.example",
        &[&alias],
        &reply_mail("mallory@evil.example", &thread, "m1@evil", "hi"),
    )
    .await;
    assert_eq!((s.rcpt[0].0, s.data.is_none()), (550, true), "{s:?}");
    // Right envelope, forged From header: refused after DATA.
    let forged = w
        .reply(
            &alias,
            &reply_mail("mallory@evil.example", &thread, "m2@evil", "hi"),
        )
        .await;
    assert_eq!(forged.0, 550, "{forged:?}");
    // Unknown alias and a non-alias address: 550 at RCPT.
    let unknown = submit(
        w.smtp_port,
        ALICE_MAIL,
        &[&format!("r-{}@{D}", "a".repeat(32))],
        "Subject: x\n\nx",
    )
    .await;
    assert_eq!(unknown.rcpt[0].0, 550);
    let other = submit(
        w.smtp_port,
        ALICE_MAIL,
        &[&format!("postmaster@{D}")],
        "Subject: x\n\nx",
    )
    .await;
    assert_eq!(other.rcpt[0].0, 550);

    // A bounce (null sender, DSN) and an auto-reply are accepted and dropped.
    let dsn = format!(
        "From: Mail Delivery System <MAILER-DAEMON@mail.example>\nTo: {alias}\nSubject: Undelivered Mail\nMessage-ID: <dsn-1@mail.example>\n\
         MIME-Version: 1.0\nContent-Type: multipart/report; report-type=delivery-status; boundary=\"b\"\n\n--b\nContent-Type: text/plain\n\nYour message could not be delivered.\n\
         --b\nContent-Type: message/delivery-status\n\nReporting-MTA: dns; mail.example\n\nFinal-Recipient: rfc822; alice@mail.example\nAction: failed\nStatus: 5.1.1\n--b--\n"
    );
    let s = submit(w.smtp_port, "", &[&alias], &dsn).await;
    assert_eq!(s.outcome().0, 250, "{s:?}");
    let auto = format!(
        "From: {ALICE_MAIL}\nTo: {alias}\nSubject: Out of office\nMessage-ID: <ooo-1@mail.example>\nAuto-Submitted: auto-replied\n\nI am away until Monday.\n"
    );
    assert_eq!(w.reply(&alias, &auto).await.0, 250);

    // Oversize: 552.
    let big = format!(
        "From: {ALICE_MAIL}\nSubject: big\nMessage-ID: <big-1@mail.example>\n\n{}\n",
        "x".repeat(70_000)
    );
    assert_eq!(w.reply(&alias, &big).await.0, 552);

    // Malformed MIME: refused with 5xx, or read leniently; never a crash, and the next mail works.
    let broken = format!(
        "From: {ALICE_MAIL}\nSubject: broken\nMessage-ID: <broken-1@mail.example>\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"never\"\n\nno boundary ever\n"
    );
    let (code, _) = w.reply(&alias, &broken).await;
    assert!(code == 250 || code >= 500, "malformed MIME got {code}");

    // HTML only: converted to text.
    let html = format!(
        "From: {ALICE_MAIL}\nSubject: Re: IM\nMessage-ID: <html-1@mail.example>\nMIME-Version: 1.0\nContent-Type: text/html; charset=utf-8\n\n\
         <html><body><p>Sounds <b>good</b> &amp; see you</p><blockquote>hello</blockquote></body></html>\n"
    );
    assert_eq!(w.reply(&alias, &html).await.0, 250);
    let got = bob
        .expect("the HTML reply as text", T, |s| body(s).is_some())
        .await;
    assert_eq!(body(&got).as_deref(), Some("Sounds good & see you"));

    // The same Message-ID twice: both accepted, one message.
    let dup = reply_mail(
        ALICE_MAIL,
        &thread,
        "dup-1@mail.example",
        "only once please",
    );
    assert_eq!(w.reply(&alias, &dup).await.0, 250);
    assert_eq!(w.reply(&alias, &dup).await.0, 250);
    let once = bob
        .expect("the duplicated reply", T, |s| body(s).is_some())
        .await;
    if body(&once).as_deref() == Some("hi") {
        panic!("the forged reply reached Bob");
    }
    assert_eq!(body(&once).as_deref(), Some("only once please"));
    // Nothing else reached Bob: no bounce, auto-reply, stranger, broken or duplicate message.
    bob.expect_none(Duration::from_secs(2), |s| body(s).is_some())
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_holding_characters_xml_forbids_reaches_the_buddy_and_reach_keeps_running() {
    let w = World::new().await;
    let alice = w.alice_with_verified_email().await;
    alice.close().await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;
    bob.send(&format!(
        "<message type='chat' id='b1' to='alice@{D}'><body>Coming?</body></message>"
    ))
    .await;
    let mail = wait_forwards(&w.sink, 1).await.remove(0);
    let alias = mail.reply_to();

    // A C0 control in a plain-text reply once stopped Reach for everyone.
    let plain = reply_mail(
        ALICE_MAIL,
        &mail.message_id(),
        "ctl-1@mail.example",
        "yes\u{1} I am\u{7f}",
    );
    let answer = w.reply(&alias, &plain).await;
    assert_eq!(answer.0, 250, "{answer:?}");
    let got = bob
        .expect("the plain reply", T, |s| body(s).is_some())
        .await;
    assert_eq!(body(&got).as_deref(), Some("yes I am\u{7f}"));

    // The same through HTML character references and the two non-characters.
    let html = format!(
        "From: {ALICE_MAIL}\nSubject: Re: IM \u{1}\nMessage-ID: <ctl-2@mail.example>\nMIME-Version: 1.0\n\
         Content-Type: text/html; charset=utf-8\n\n<html><body><p>on&#1; my &#xFFFE;way\u{FFFF}</p></body></html>\n"
    );
    let answer = w.reply(&alias, &html).await;
    assert_eq!(answer.0, 250, "{answer:?}");
    let got = bob.expect("the HTML reply", T, |s| body(s).is_some()).await;
    assert_eq!(body(&got).as_deref(), Some("on my way"));

    // Reach is still there for everyone: Bob's next message is forwarded as usual.
    bob.send(&format!(
        "<message type='chat' id='b2' to='alice@{D}'><body>Great</body></message>"
    ))
    .await;
    let mails = wait_forwards(&w.sink, 2).await;
    assert!(mails[1].text().contains("Great"));
    assert!(
        !w.reach.log().contains("panicked"),
        "no panic: {}",
        w.reach.log()
    );
}
