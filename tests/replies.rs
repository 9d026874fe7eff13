//! Every golden reply fixture (`tests/fixtures/email/**`) as a user would see it: Alice's mail
//! program sends it to the reply alias of her conversation with Bob, through Reach's real SMTP
//! listener, and Bob's XMPP client (on a real Prosody) shows exactly the expected `.txt` text.
//!
//! Each fixture is sent as written, except that its From header becomes Alice's verified address
//! (the listener takes a reply from the alias's owner only), its Message-ID is made unique (the
//! listener delivers one mail once) and a `Return-Path` is dropped (an empty one marks a bounce;
//! the envelope carries the sender). Automatic mails must be accepted and reach nobody; mails
//! the golden test expects an error for must be refused with a 5xx; a fixture whose expected text
//! is empty (it only quoted) must be refused with a 5xx too, so Alice learns it did not go out.

use crate::support;

use std::path::{Path, PathBuf};
use std::time::Duration;

use support::mail::{MailSink, SinkMail, SmtpConn};
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
        // No from_address: the default (reach@reply_domain) is what this test runs with.
        let extra = format!(
            "[routing]\ngrace_delay_secs = 3\n\n[email]\nrelay = \"smtp://127.0.0.1:{}\"\n\
             reply_domain = \"{D}\"\nlisten = \"127.0.0.1:{smtp_port}\"\n\
             digest_window_secs = 1\nmax_message_bytes = 262144\n",
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
        let ok = alice
            .iq(&format!(
                "<iq type='set' id='reg' to='{D}'><query xmlns='jabber:iq:register'>\
                 <username>alice</username><email>{ALICE_MAIL}</email></query></iq>"
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
        let mails = self.sink.wait_for(1, T).await;
        assert_eq!(
            mails[0].raw_header("X-MailFrom").as_deref(),
            Some(&*format!("reach@{D}")),
            "the default from_address is reach@ the reply domain"
        );
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

    /// Sends `message` (bytes as they are, dot-stuffed, CRLF line ends) from Alice's address to
    /// `alias`; returns the listener's final answer to the message (or to RCPT/MAIL if refused).
    async fn send(&self, alias: &str, message: &[u8]) -> (u16, String) {
        let mut smtp = SmtpConn::try_connect("127.0.0.1", self.smtp_port)
            .await
            .expect("connect to the SMTP listener");
        assert_eq!(smtp.reply().await.map(|r| r.0), Some(220));
        assert_eq!(smtp.command("EHLO mail.example").await.0, 250);
        let from = smtp.command(&format!("MAIL FROM:<{ALICE_MAIL}>")).await;
        if from.0 >= 400 {
            return from;
        }
        let rcpt = smtp.command(&format!("RCPT TO:<{alias}>")).await;
        if rcpt.0 >= 400 {
            return rcpt;
        }
        assert_eq!(smtp.command("DATA").await.0, 354);
        let mut data = Vec::with_capacity(message.len() + 64);
        for line in message.split(|&b| b == b'\n') {
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            if line.first() == Some(&b'.') {
                data.push(b'.');
            }
            data.extend_from_slice(line);
            data.extend_from_slice(b"\r\n");
        }
        data.extend_from_slice(b".\r\n");
        smtp.send_raw(&data).await;
        let answer = smtp.reply().await.expect("an answer to the message");
        smtp.send("QUIT").await;
        answer
    }
}

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/email")
}

fn sidecar(eml: &Path, ext: &str) -> Option<String> {
    let text = std::fs::read_to_string(eml.with_extension(ext)).ok()?;
    Some(text.strip_suffix('\n').unwrap_or(&text).to_string())
}

/// The fixture with Alice as its sender and a Message-ID of its own (see the module doc).
fn as_alices_mail(raw: &[u8], unique: &str) -> Vec<u8> {
    let split = raw
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|p| p + 1)
        .or_else(|| raw.windows(4).position(|w| w == b"\r\n\r\n").map(|p| p + 2))
        .unwrap_or(raw.len());
    let (head, rest) = raw.split_at(split);
    let mut out = Vec::with_capacity(raw.len() + 100);
    let mut skipping = false;
    for line in head.split_inclusive(|&b| b == b'\n') {
        let continuation = line.first().is_some_and(|b| *b == b' ' || *b == b'\t');
        if continuation && skipping {
            continue;
        }
        let lower = String::from_utf8_lossy(line).to_ascii_lowercase();
        skipping = false;
        if lower.starts_with("from:") {
            out.extend_from_slice(format!("From: Alice <{ALICE_MAIL}>\n").as_bytes());
            skipping = true;
        } else if lower.starts_with("message-id:") {
            out.extend_from_slice(format!("Message-ID: <{unique}@mail.example>\n").as_bytes());
            skipping = true;
        } else if lower.starts_with("return-path:") {
            skipping = true;
        } else {
            out.extend_from_slice(line);
        }
    }
    out.extend_from_slice(rest);
    out
}

/// Whether this build decodes ISO-2022-JP (mail-parser's `full_encoding`); fixtures that need
/// it are skipped without it, as in the golden test.
fn has_full_encoding() -> bool {
    let raw = b"From: a@example.com\r\nContent-Type: text/plain; charset=iso-2022-jp\r\n\r\n\x1b$B$3$s\x1b(B\r\n";
    reach::email::extract::parse_reply(raw).is_ok_and(|reply| reply.text == "こん")
}

fn forwards(sink: &MailSink) -> Vec<SinkMail> {
    sink.mails()
        .into_iter()
        .filter(|m| {
            m.header("Subject")
                .is_some_and(|s| s.starts_with("IM from"))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fixture_reaches_the_buddy_as_its_golden_text() {
    let w = World::new().await;
    w.alice_with_verified_email().await.close().await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;
    bob.send(&format!(
        "<message type='chat' id='b1' to='alice@{D}'><body>Bob: dinner tonight?</body></message>"
    ))
    .await;
    let deadline = std::time::Instant::now() + T;
    let alias = loop {
        if let Some(mail) = forwards(&w.sink).first() {
            break mail.reply_to();
        }
        assert!(std::time::Instant::now() < deadline, "no forwarded mail");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };

    let full_encoding = has_full_encoding();
    let mut failures = Vec::new();
    let mut checked = 0;
    for category in ["clients", "automatic", "malformed"] {
        let mut emls: Vec<PathBuf> = std::fs::read_dir(fixtures_root().join(category))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        emls.sort();
        for eml in emls {
            let name = format!("{category}/{}", eml.file_stem().unwrap().to_string_lossy());
            if sidecar(&eml, "needs").is_some() && !full_encoding {
                eprintln!("{name}: skipped (needs mail-parser's full_encoding)");
                continue;
            }
            checked += 1;
            let raw = std::fs::read(&eml).unwrap();
            let unique = format!("fixture-{checked}-{}", support::new_id());
            let automatic = sidecar(&eml, "auto").is_some();
            let refused = sidecar(&eml, "err").is_some();
            let message = if automatic || refused {
                raw.clone()
            } else {
                as_alices_mail(&raw, &unique)
            };
            let answer = w.send(&alias, &message).await;
            if refused {
                if !(500..600).contains(&answer.0) {
                    failures.push(format!("{name}: expected a 5xx refusal, got {answer:?}"));
                }
                continue;
            }
            if automatic {
                if answer.0 != 250 {
                    failures.push(format!("{name}: automatic mail not accepted: {answer:?}"));
                }
                // Nothing may reach Bob: the next thing he sees is a plain check reply.
                let check = format!("check after {name}");
                let plain = format!(
                    "From: Alice <{ALICE_MAIL}>\nTo: {alias}\nSubject: Re: IM\n\
                     Message-ID: <{unique}-check@mail.example>\n\n{check}\n"
                );
                let answer = w.send(&alias, plain.as_bytes()).await;
                assert_eq!(answer.0, 250, "{name}: check reply: {answer:?}");
                let got = bob
                    .expect("a message from Alice", T, |s| body(s).is_some())
                    .await;
                if body(&got).as_deref() != Some(check.as_str()) {
                    failures.push(format!(
                        "{name}: automatic mail reached Bob as {:?}",
                        body(&got)
                    ));
                }
                continue;
            }
            let expected = sidecar(&eml, "txt").unwrap_or_default();
            if expected.trim().is_empty() {
                if !(500..600).contains(&answer.0) {
                    failures.push(format!(
                        "{name}: a reply with no text of its own was not refused: {answer:?}"
                    ));
                }
                continue;
            }
            if answer.0 != 250 {
                failures.push(format!("{name}: not accepted: {answer:?}"));
                continue;
            }
            let got = bob
                .expect(&format!("Alice's reply {name}"), T, |s| body(s).is_some())
                .await;
            assert_eq!(got.attr("from"), Some(&*format!("alice@{D}")), "{name}");
            let got = body(&got).unwrap_or_default();
            if got != expected {
                failures.push(format!(
                    "{name}: Bob saw\n{got:?}\n  expected\n{expected:?}"
                ));
            }
        }
    }
    assert!(checked >= 50, "only {checked} fixtures were sent");
    assert!(
        failures.is_empty(),
        "{} of {checked} fixtures failed:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
