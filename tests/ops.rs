//! Operating Reach, as an admin does: the metrics endpoint, JSON logs, `reach stats`, `reach
//! export` and `reach purge`, and stopping with SIGTERM in the middle of traffic. Against a real
//! Prosody, a real SMTP relay (aiosmtpd) and the built `reach` binary.

use crate::support;

use std::process::Command;
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use support::mail::{MailSink, SinkMail};
use support::process::signal;
use support::{body, Client, Element, Reach, Server, ServerKind};

const D: &str = "reach.localhost";
const T: Duration = Duration::from_secs(15);
const ALICE_MAIL: &str = "alice@mail.example";

struct World {
    server: Server,
    sink: MailSink,
    reach: Reach,
    config: String,
    smtp_port: u16,
    metrics_port: u16,
    state: tempfile::TempDir,
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- reach log ---\n{}", self.reach.log());
        }
    }
}

impl World {
    /// Prosody with alice and bob, a mail relay, and Reach with email, JSON logs and (if
    /// `metrics`) the metrics endpoint.
    async fn new(metrics: bool) -> World {
        let server = Server::start(ServerKind::Prosody).await;
        for user in ["alice", "bob"] {
            server.register(user, &format!("{user}pw")).await;
        }
        let sink = MailSink::start().await;
        let smtp_port = support::free_port();
        let metrics_port = support::free_port();
        let state = tempfile::tempdir().unwrap();
        let mut config = Reach::config(&server, state.path());
        config.push_str(&format!(
            "\n[log]\nformat = \"json\"\n\n[email]\nrelay = \"smtp://127.0.0.1:{}\"\n\
             from_address = \"reach@{D}\"\nreply_domain = \"{D}\"\nlisten = \"127.0.0.1:{smtp_port}\"\n\
             digest_window_secs = 1\n",
            sink.port
        ));
        if metrics {
            config.push_str(&format!(
                "\n[metrics]\nlisten = \"127.0.0.1:{metrics_port}\"\n"
            ));
        }
        let reach = Reach::start_config(state.path(), &config).await;
        World {
            server,
            sink,
            reach,
            config,
            smtp_port,
            metrics_port,
            state,
        }
    }

    fn config_path(&self) -> String {
        self.state.path().join("reach.toml").display().to_string()
    }

    /// Starts Reach again and waits for its component link.
    async fn restart(&mut self) {
        let links = self.reach.log().matches("component link up").count();
        self.reach = Reach::start_config(self.state.path(), &self.config).await;
        let deadline = Instant::now() + T;
        while self.reach.log().matches("component link up").count() == links {
            assert!(Instant::now() < deadline, "Reach did not connect again");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    async fn client(&self, user: &str) -> Client {
        let mut c = Client::connect(&self.server, user, &format!("{user}pw"), "pc").await;
        support::wait_for_component(&mut c, D).await;
        c
    }

    /// `reach ARGS...`: (exit success, stdout, stderr).
    fn admin(&self, args: &[&str]) -> (bool, String, String) {
        run_reach(args)
    }

    /// SIGTERM, and the exit status within `limit` (None if still running).
    async fn terminate(&mut self, limit: Duration) -> (Option<std::process::ExitStatus>, Duration) {
        let started = Instant::now();
        assert!(signal(self.reach.pid(), "TERM"), "kill -TERM");
        let status = self.reach.wait_exit(limit).await;
        (status, started.elapsed())
    }

    async fn metrics(&self) -> String {
        http_get(self.metrics_port, "/metrics").await
    }
}

fn run_reach(args: &[&str]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_reach"))
        .args(args)
        .output()
        .expect("run reach");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The body of `GET path` on 127.0.0.1:`port` (HTTP/1.0, so the server closes after it).
async fn http_get(port: u16, path: &str) -> String {
    let mut stream = TcpStream::connect(("127.0.0.1", port))
        .await
        .expect("connect to the metrics endpoint");
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .unwrap();
    let mut text = String::new();
    tokio::time::timeout(T, stream.read_to_string(&mut text))
        .await
        .expect("metrics answer in time")
        .unwrap();
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP answer");
    assert!(head.starts_with("HTTP/1.0 200"), "{head}");
    body.to_owned()
}

/// The value of one sample line `series value` in a Prometheus text page.
fn sample(page: &str, series: &str) -> Option<f64> {
    page.lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// Waits until `series` in /metrics reaches at least `min`.
async fn wait_for_sample(w: &World, series: &str, min: f64) -> String {
    let deadline = Instant::now() + T;
    loop {
        let page = w.metrics().await;
        if sample(&page, series).is_some_and(|v| v >= min) {
            return page;
        }
        assert!(
            Instant::now() < deadline,
            "{series} did not reach {min}:\n{page}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn register_iq(handle: &str, email: &str) -> String {
    format!(
        "<iq type='set' id='reg-{handle}' to='{D}'><query xmlns='jabber:iq:register'>\
         <username>{handle}</username><email>{email}</email></query></iq>"
    )
}

/// Alice registers (with `email`, possibly empty) and approves Reach's subscription.
async fn register_alice(alice: &mut Client, email: &str) {
    alice.presence("").await;
    let ok = alice.iq(&register_iq("alice", email)).await;
    assert_eq!(ok.attr("type"), Some("result"), "{}", String::from(&ok));
    alice
        .expect("Reach's subscription request", T, |s| {
            s.name() == "presence" && s.attr("type") == Some("subscribe")
        })
        .await;
    alice
        .send(&format!("<presence type='subscribed' to='{D}'/>"))
        .await;
}

/// Bob adds alice@D and accepts Reach's request back.
async fn bob_subscribes(bob: &mut Client) {
    let address = format!("alice@{D}");
    bob.send(&format!("<presence type='subscribe' to='{address}'/>"))
        .await;
    bob.expect("Reach asks for Bob's presence back", T, |s| {
        s.attr("from") == Some(&address) && s.attr("type") == Some("subscribe")
    })
    .await;
    bob.send(&format!("<presence type='subscribed' to='{address}'/>"))
        .await;
}

fn chat(to: &str, id: &str, text: &str) -> String {
    format!("<message type='chat' id='{id}' to='{to}'><body>{text}</body></message>")
}

fn is_body(s: &Element, text: &str) -> bool {
    body(s).as_deref() == Some(text)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_routed_messages_by_terminal_and_show_the_link() {
    let w = World::new(true).await;
    let mut alice = w.client("alice").await;
    register_alice(&mut alice, "").await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;

    let page = wait_for_sample(&w, "reach_xmpp_link_up", 1.0).await;
    assert_eq!(sample(&page, "reach_xmpp_link_reconnects_total"), Some(0.0));
    assert!(page.contains("# TYPE reach_smtp_send_seconds histogram"));

    // Alice is online: Bob's message is relayed to her client.
    bob.send(&chat(&format!("alice@{D}"), "m1", "hello over xmpp"))
        .await;
    alice
        .expect("Bob's message", T, |s| is_body(s, "hello over xmpp"))
        .await;
    wait_for_sample(&w, "reach_messages_routed_total{terminal=\"xmpp\"}", 1.0).await;

    // Alice goes offline, with no terminal: the next one is held.
    alice.close().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    bob.send(&chat(&format!("alice@{D}"), "m2", "held for later"))
        .await;
    wait_for_sample(&w, "reach_messages_routed_total{terminal=\"held\"}", 1.0).await;
    // (The store's counts are read just before the counters: wait for them separately.)
    let page = wait_for_sample(&w, "reach_held_messages", 1.0).await;
    assert_eq!(
        sample(&page, "reach_messages_routed_total{terminal=\"email\"}"),
        Some(0.0)
    );
    assert_eq!(sample(&page, "reach_users"), Some(1.0));
    assert_eq!(sample(&page, "reach_held_messages"), Some(1.0));
    assert!(sample(&page, "reach_queue_depth{queue=\"outbox\"}").is_some());

    // /stats, and `reach stats` against the running instance, which reads it.
    let stats: serde_json::Value =
        serde_json::from_str(&http_get(w.metrics_port, "/stats").await).unwrap();
    assert_eq!(stats["users"], 1);
    assert_eq!(stats["held"], 1);
    let (ok, out, err) = w.admin(&["stats", "--config", &w.config_path()]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("users        1"), "{out}");
    assert!(out.contains("held         1"), "{out}");
    assert!(out.contains("from the running Reach"), "{out}");

    // Every log line is a JSON object (format = "json").
    let log = w.reach.log();
    let mut parsed = 0;
    for line in log.lines().filter(|l| !l.trim().is_empty()) {
        let value: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
        assert!(value["level"].is_string(), "{line}");
        assert!(value["fields"].is_object(), "{line}");
        parsed += 1;
    }
    assert!(
        log.contains("\"message\":\"Reach started\""),
        "no start line in:\n{log}"
    );
    assert!(parsed > 3, "{log}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stats_export_and_purge_as_the_admin_runs_them() {
    let mut w = World::new(false).await;
    let mut alice = w.client("alice").await;
    register_alice(&mut alice, "").await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;
    bob_subscribes(&mut bob).await;
    let config = w.config_path();

    // While Reach runs, its store is locked: the commands say so.
    let (ok, out, err) = w.admin(&["stats", "--config", &config]);
    assert!(!ok, "{out}");
    assert!(err.contains("Reach is running"), "{err}");
    assert!(err.contains("[metrics] listen"), "{err}");
    let (ok, _, err) = w.admin(&["purge", "--config", &config, "alice@localhost"]);
    assert!(!ok);
    assert!(err.contains("Reach is running"), "{err}");

    let (status, took) = w.terminate(Duration::from_secs(10)).await;
    assert!(
        status.is_some_and(|s| s.success()),
        "{status:?} after {took:?}"
    );

    // Stopped: stats from the store, and everything about Alice.
    let (ok, out, err) = w.admin(&["stats", "--config", &config]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("users        1"), "{out}");
    let (ok, out, err) = w.admin(&["export", "--config", &config, "alice@localhost/pc"]);
    assert!(ok, "{err}");
    let export: serde_json::Value = serde_json::from_str(&out).expect("export is JSON");
    assert_eq!(export["jid"], "alice@localhost");
    assert_eq!(export["registered"], true);
    assert_eq!(export["data"]["user"]["handle"], "alice");
    let buddies = export["data"]["buddies"].to_string();
    assert!(buddies.contains("bob@localhost"), "{buddies}");

    // Purge, then nothing is left.
    let (ok, out, err) = w.admin(&["purge", "--config", &config, "alice@localhost"]);
    assert!(ok, "{out}{err}");
    assert!(out.contains("alice@localhost deleted"), "{out}");
    let (ok, out, _) = w.admin(&["export", "--config", &config, "alice@localhost"]);
    assert!(ok);
    let export: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(export["registered"], false);
    assert!(export["data"]["user"].is_null());
    assert_eq!(export["data"]["buddies"], serde_json::json!([]));
    let (ok, _, err) = w.admin(&["purge", "--config", &config, "alice@localhost"]);
    assert!(!ok);
    assert!(err.contains("not registered"), "{err}");

    // Started again, Reach sends what <remove/> sends: alice@D goes offline for Bob and the
    // subscriptions both ways end (the server shows that in Bob's roster).
    w.restart().await;
    bob.expect("alice@D goes offline", T, |s| {
        s.name() == "presence"
            && s.attr("from") == Some(&*format!("alice@{D}"))
            && s.attr("type") == Some("unavailable")
    })
    .await;
    let deadline = Instant::now() + T;
    loop {
        let roster = bob
            .iq(&format!(
                "<iq type='get' id='{}'><query xmlns='jabber:iq:roster'/></iq>",
                Client::new_id()
            ))
            .await;
        let subscription = roster
            .get_child("query", "jabber:iq:roster")
            .and_then(|q| {
                q.children()
                    .find(|i| i.attr("jid") == Some(&*format!("alice@{D}")))
            })
            .and_then(|i| i.attr("subscription").map(str::to_owned));
        if matches!(subscription.as_deref(), None | Some("none")) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "Bob's roster still has alice@D as {subscription:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (status, _) = w.terminate(Duration::from_secs(10)).await;
    assert!(status.is_some_and(|s| s.success()));
    let (ok, out, _) = w.admin(&["stats", "--config", &config]);
    assert!(ok);
    assert!(out.contains("users        0"), "{out}");
    assert!(out.contains("outbox       0"), "{out}");
}

/// One SMTP reply line group; None if the connection closed.
async fn smtp_reply(reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>) -> Option<u16> {
    loop {
        let mut line = String::new();
        let n = tokio::time::timeout(T, reader.read_line(&mut line))
            .await
            .ok()?
            .ok()?;
        if n == 0 {
            return None;
        }
        if line.as_bytes().get(3) != Some(&b'-') {
            return line.get(..3)?.parse().ok();
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_mid_traffic_exits_0_and_keeps_what_was_acknowledged() {
    let mut w = World::new(true).await;
    let mut alice = w.client("alice").await;
    register_alice(&mut alice, ALICE_MAIL).await;
    let mails = w.sink.wait_for(1, T).await;
    let subject = mails[0].header("Subject").unwrap();
    let code: String = subject.chars().filter(char::is_ascii_digit).collect();
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
    alice.close().await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;

    // Alice is away from XMPP: Bob's message goes by email, with a reply alias.
    bob.send(&chat(&format!("alice@{D}"), "b1", "are you there?"))
        .await;
    let forward = wait_forward(&w.sink).await;
    let alias = forward.reply_to();
    wait_for_sample(&w, "reach_messages_routed_total{terminal=\"email\"}", 1.0).await;
    wait_for_sample(&w, "reach_email_sent_total", 2.0).await;

    // Alice's reply is submitted; Bob keeps writing; SIGTERM arrives as the reply ends.
    let stream = TcpStream::connect(("127.0.0.1", w.smtp_port))
        .await
        .unwrap();
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    assert_eq!(smtp_reply(&mut reader).await, Some(220));
    for (line, expected) in [
        ("EHLO mail.example".to_owned(), 250),
        (format!("MAIL FROM:<{ALICE_MAIL}>"), 250),
        (format!("RCPT TO:<{alias}>"), 250),
        ("DATA".to_owned(), 354),
    ] {
        write
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
        assert_eq!(smtp_reply(&mut reader).await, Some(expected), "{line}");
    }
    write
        .write_all(
            format!(
                "From: Alice <{ALICE_MAIL}>\r\nTo: {alias}\r\nSubject: Re: IM\r\n\
                 Message-ID: <last-word@mail.example>\r\n\r\nsaved before the stop\r\n"
            )
            .as_bytes(),
        )
        .await
        .unwrap();
    for i in 0..5 {
        bob.send(&chat(
            &format!("alice@{D}"),
            &format!("f{i}"),
            "more traffic",
        ))
        .await;
    }
    write.write_all(b".\r\n").await.unwrap();
    let started = Instant::now();
    assert!(signal(w.reach.pid(), "TERM"));
    let answer = smtp_reply(&mut reader).await;
    let status = w.reach.wait_exit(Duration::from_secs(10)).await;
    let took = started.elapsed();
    assert!(
        status.is_some_and(|s| s.success()),
        "exit {status:?} after {took:?}"
    );
    assert!(took < Duration::from_secs(8), "stopping took {took:?}");
    assert!(
        w.reach.log().contains("\"message\":\"Reach stopped\""),
        "{}",
        w.reach.log()
    );

    // An acknowledged reply reaches Bob, before the stop or after the restart.
    w.restart().await;
    match answer {
        Some(250) => {
            bob.expect("the reply taken just before SIGTERM", T, |s| {
                is_body(s, "saved before the stop")
            })
            .await;
        }
        // Not acknowledged (the listener was already closing): the sending MTA retries.
        other => assert!(matches!(other, None | Some(421) | Some(451)), "{other:?}"),
    }
    let (status, _) = w.terminate(Duration::from_secs(10)).await;
    assert!(status.is_some_and(|s| s.success()));
}

async fn wait_forward(sink: &MailSink) -> SinkMail {
    let deadline = Instant::now() + T;
    loop {
        if let Some(mail) = sink.mails().into_iter().find(|m| {
            m.header("Subject")
                .is_some_and(|s| s.starts_with("IM from"))
        }) {
            return mail;
        }
        assert!(Instant::now() < deadline, "no forwarding email");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_dead_letter_is_listed_shown_and_redriven_by_the_admin() {
    let mut w = World::new(false).await;
    let mut alice = w.client("alice").await;
    register_alice(&mut alice, "").await;
    let config = w.config_path();
    let (status, _) = w.terminate(Duration::from_secs(10)).await;
    assert!(status.is_some_and(|s| s.success()));

    let (ok, out, err) = w.admin(&["dead-letters", "--config", &config]);
    assert!(ok, "{err}");
    assert!(
        out.is_empty() && err.contains("no dead letters"),
        "{out}{err}"
    );

    // A dead letter as a bug would have left one: Bob's message, set aside unhandled.
    {
        let store = reach::store::Store::open(&w.state.path().join("store")).unwrap();
        let stanza = format!(
            "<message xmlns='jabber:component:accept' from='bob@localhost/pc' \
             to='alice@{D}' type='chat' id='dl-1'><body>set aside earlier</body></message>"
        );
        let event = reach::core::Event::Stanza(stanza.parse().unwrap());
        let letter =
            reach::core::dead_letter::set_aside(&event, 1_795_000_000, "the core panicked: test")
                .unwrap();
        store
            .write(|tx| {
                use reach::store::Transaction;
                tx.put_dead_letter(&letter)
            })
            .unwrap();
    }
    let (ok, out, err) = w.admin(&["dead-letters", "--config", &config]);
    assert!(ok, "{err}");
    let line = out.lines().next().unwrap_or_default().to_owned();
    assert!(
        line.contains("stanza") && line.contains("the core panicked: test"),
        "{out}"
    );
    assert!(
        !line.contains("set aside earlier"),
        "the list shows no message text: {line}"
    );
    let id = line.split('\t').next().unwrap().to_owned();
    let (ok, out, _) = w.admin(&["dead-letters", "--config", &config, "show", &id]);
    assert!(ok && out.contains("set aside earlier"), "{out}");
    let (ok, _, err) = w.admin(&["dead-letters", "--config", &config, "show", "999999"]);
    assert!(
        !ok && err.contains("there is no dead letter 999999"),
        "{err}"
    );
    let (ok, out, err) = w.admin(&["dead-letters", "--config", &config, "redrive", &id]);
    assert!(ok, "{err}");
    assert!(
        out.contains("handled again when Reach next starts"),
        "{out}"
    );

    // At the next start it is handled like any message: Alice's client gets it from Bob's
    // per-session JID.
    w.restart().await;
    let got = alice
        .expect("the re-driven message", T, |s| {
            body(s).as_deref() == Some("set aside earlier")
        })
        .await;
    assert_eq!(got.attr("from"), Some(&*format!("bob\\40localhost@{D}")));
    let (status, _) = w.terminate(Duration::from_secs(10)).await;
    assert!(status.is_some_and(|s| s.success()));
    let (ok, _, err) = w.admin(&["dead-letters", "--config", &config]);
    assert!(ok && err.contains("no dead letters"), "{err}");
}

#[test]
fn help_lists_every_command() {
    let (ok, out, _) = run_reach(&["--help"]);
    assert!(ok);
    for command in [
        "--config FILE",
        "check-config FILE",
        "reach stats --config FILE",
        "reach export --config FILE USER_JID",
        "reach purge --config FILE USER_JID",
        "reach dead-letters --config FILE",
        "--log-format",
    ] {
        assert!(out.contains(command), "{command} missing in:\n{out}");
    }
    let (ok, _, err) = run_reach(&["export", "--config", "/nonexistent/reach.toml", "a@b"]);
    assert!(!ok);
    assert!(err.contains("/nonexistent/reach.toml"), "{err}");
    let (ok, _, err) = run_reach(&["--config", "x.toml", "--log-format", "xml"]);
    assert!(!ok);
    assert!(err.contains("unknown log format 'xml'"), "{err}");
}
