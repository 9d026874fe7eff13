//! The admin guides are run, not only read. Every config block in `docs/*.md` that is marked
//! with an info string `reach-doc=NAME` (```` ```lua reach-doc=prosody-component ````) is taken
//! from the doc as written, given free ports and temporary folders, and run by a real server
//! with the built `reach` behind it:
//!
//! | doc | blocks | what runs |
//! |---|---|---|
//! | prosody.md | prosody-global, prosody-component, prosody-reach | Prosody + Reach; a user finds Reach and registers |
//! | ejabberd.md | ejabberd-listener, ejabberd-reach | ejabberd + Reach; the same |
//! | integrated-mode.md | integrated-virtualhost, integrated-component, integrated-firewall, integrated-reach | Prosody (prosody.md's global block, then these: mod_privilege, mod_firewall with the copy rules) + Reach + a mail sink; Alice chooses her own address, Bob's message to `alice@localhost` reaches her mailbox, her reply reaches Bob from `alice@localhost`, and the rules copy nothing Reach sends |
//! | kannel.md | kannel-core, kannel-smsbox, kannel-sendsms-user, kannel-sms-service, kannel-reach | Kannel (fake SMSC) + Reach + Prosody; code to the phone, code back, delivery report as receipt |
//! | postfix.md | postfix-inbound, postfix-transport, postfix-outbound, postfix-reach | Postfix + Reach + Prosody + a mail sink; mail out through Postfix, the reply in through Postfix |
//! | instances.md | instances-database, instances-pg-hba, instances-listener, instances-reach, instances-postfix-transport | a private PostgreSQL set up by the doc's SQL and pg_hba lines + ejabberd + two Reach instances + Postfix; a name in use is refused, a user registers, a buddy's message reaches her, `stats` and `check-config` beside the instances, one is killed and the other takes over, reply mail fails over to it |
//! | instances.md | instances-migrate, instances-backup, instances-restore, instances-migrate-back | the `reach`, `pg_dump`, `dropdb`, `createdb` and `pg_restore` lines of these shell blocks: an embedded store (made by a Reach, then stopped) into a new database, Reach on it sees the user and sends what the old outbox held; a backup restored into a new database holds the same; then back into a new folder |
//!
//! The docs' site is `example.org` (Reach at `reach.example.org`); the tests' servers serve
//! `localhost`, so `example.org` becomes `localhost` everywhere. The docs' default ports
//! (5347, 13013, 8088, 25, 2525), private addresses (`10.0.0.x`) and paths (`/etc/postfix/`,
//! `/var/spool/kannel`, `/var/lib/reach`, `/etc/reach/...`) become free ports, loopback and
//! temporary folders; each replacement insists that the doc still contains what it replaces, so
//! a doc that drifts fails here. Every Reach block also passes `reach check-config`, and the
//! systemd units in `contrib/` (`reach.service`, the template `reach@.service`) run the real CLI.

use crate::support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use support::kannel::{Handset, Kannel};
use support::mail::{submit, MailSink, SinkMail};
use support::postfix::Postfix;
use support::postgres::PgCluster;
use support::{bare, body, escape, new_id, Client, Reach, Server, ServerKind};

const D: &str = "reach.localhost";
const T: Duration = Duration::from_secs(15);
const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// Every marked block a test below runs, by doc.
const EXERCISED: &[(&str, &[&str])] = &[
    (
        "prosody",
        &["prosody-global", "prosody-component", "prosody-reach"],
    ),
    ("ejabberd", &["ejabberd-listener", "ejabberd-reach"]),
    (
        "integrated-mode",
        &[
            "integrated-virtualhost",
            "integrated-component",
            "integrated-firewall",
            "integrated-reach",
        ],
    ),
    (
        "kannel",
        &[
            "kannel-core",
            "kannel-smsbox",
            "kannel-sendsms-user",
            "kannel-sms-service",
            "kannel-reach",
        ],
    ),
    (
        "postfix",
        &[
            "postfix-inbound",
            "postfix-transport",
            "postfix-outbound",
            "postfix-reach",
        ],
    ),
    (
        "instances",
        &[
            "instances-database",
            "instances-pg-hba",
            "instances-listener",
            "instances-reach",
            "instances-postfix-transport",
            "instances-migrate",
            "instances-backup",
            "instances-restore",
            "instances-migrate-back",
        ],
    ),
];

// ---- reading the docs ----------------------------------------------------------------------

fn doc_text(doc: &str) -> String {
    let path = format!("{ROOT}/docs/{doc}.md");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"))
}

/// (marker, body) of every fenced block whose info string carries `reach-doc=NAME`.
fn marked_blocks(doc: &str) -> Vec<(String, String)> {
    let text = doc_text(doc);
    let mut blocks = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let trimmed = line.trim_start();
        let Some(info) = trimmed.strip_prefix("```") else {
            continue;
        };
        let marker = info
            .split_whitespace()
            .find_map(|w| w.strip_prefix("reach-doc="))
            .map(str::to_owned);
        let mut body = String::new();
        for inner in lines.by_ref() {
            if inner.trim_start().starts_with("```") {
                break;
            }
            body.push_str(inner);
            body.push('\n');
        }
        if let Some(marker) = marker {
            blocks.push((marker, body));
        }
    }
    blocks
}

/// The one block of `doc` marked `marker`.
fn block(doc: &str, marker: &str) -> String {
    let found: Vec<String> = marked_blocks(doc)
        .into_iter()
        .filter(|(m, _)| m == marker)
        .map(|(_, b)| b)
        .collect();
    assert_eq!(
        found.len(),
        1,
        "docs/{doc}.md must have exactly one block marked reach-doc={marker}"
    );
    found.into_iter().next().unwrap_or_default()
}

/// `text` with every `from` replaced; `from` must occur in it.
fn fill(text: &str, from: &str, to: &str) -> String {
    assert!(
        text.contains(from),
        "the doc block no longer contains {from:?}:\n{text}"
    );
    text.replace(from, to)
}

/// The docs' site domain becomes the test servers' one.
fn site(text: &str) -> String {
    fill(text, "example.org", "localhost")
}

fn reach_bin() -> &'static str {
    env!("CARGO_BIN_EXE_reach")
}

/// `reach check-config` on `text`; panics with its output unless it passes.
fn check_config(name: &str, text: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join(format!("{name}.toml"));
    std::fs::write(&path, text).unwrap();
    let out = Command::new(reach_bin())
        .arg("check-config")
        .arg(&path)
        .output()
        .expect("run reach check-config");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        out.status.success(),
        "reach check-config rejects {name}:\n{said}\n--- config ---\n{text}"
    );
    said
}

/// The docs' Reach base config (`[component]`, `[users]`, `[store]`) made to run here.
fn reach_base(doc: &str, marker: &str, component_addr: &str, state: &Path) -> String {
    let text = site(&block(doc, marker));
    let text = fill(&text, "127.0.0.1:5347", component_addr);
    fill(
        &text,
        "\"/var/lib/reach\"",
        &format!("{:?}", state.join("store").display().to_string()),
    )
}

// ---- what a user does to see that Reach is plugged in ----------------------------------------

/// Alice logs in, finds Reach by service discovery and registers a handle.
async fn alice_finds_and_registers(server: &Server) -> Client {
    let mut alice = Client::connect(server, "alice", "alicepw", "pc").await;
    support::wait_for_component(&mut alice, D).await;
    let info = alice
        .iq(&format!(
            "<iq type='get' id='{}' to='{D}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
            new_id()
        ))
        .await;
    let gateway = info
        .get_child("query", "http://jabber.org/protocol/disco#info")
        .is_some_and(|q| {
            q.children().any(|c| {
                c.name() == "identity"
                    && c.attr("category") == Some("gateway")
                    && c.attr("name") == Some("Reach")
            })
        });
    assert!(gateway, "Reach's disco#info: {}", String::from(&info));
    alice.presence("").await;
    let reply = alice
        .iq(&format!(
            "<iq type='set' id='{}' to='{D}'><query xmlns='jabber:iq:register'><username>alice</username></query></iq>",
            new_id()
        ))
        .await;
    assert_eq!(
        reply.attr("type"),
        Some("result"),
        "registration: {}",
        String::from(&reply)
    );
    alice
        .expect("Reach asks for Alice's presence", T, |s| {
            s.name() == "presence"
                && s.attr("type") == Some("subscribe")
                && s.attr("from") == Some(D)
        })
        .await;
    alice
        .send(&format!("<presence type='subscribed' to='{D}'/>"))
        .await;
    alice
}

/// The server's disco#items of its own domain (Prosody lists its components there).
async fn server_items(client: &mut Client, host: &str) -> String {
    let items = client
        .iq(&format!(
            "<iq type='get' id='{}' to='{}'><query xmlns='http://jabber.org/protocol/disco#items'/></iq>",
            new_id(),
            escape(host)
        ))
        .await;
    String::from(&items)
}

/// Prints Reach's log and the `extra` files (the servers' logs, read when it fails) when a test
/// fails.
struct Logs {
    reach_log: PathBuf,
    extra: Vec<(&'static str, PathBuf)>,
}

impl Logs {
    fn new(reach: &Reach, extra: Vec<(&'static str, PathBuf)>) -> Logs {
        Logs {
            reach_log: reach.state_dir().join("reach.log"),
            extra,
        }
    }
}

impl Drop for Logs {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- reach log ---\n{}",
                std::fs::read_to_string(&self.reach_log).unwrap_or_default()
            );
            for (name, path) in &self.extra {
                eprintln!("--- {name} ---\n{}", support::process::tail(path, 60));
            }
        }
    }
}

// ---- Prosody -------------------------------------------------------------------------------

/// An existing Prosody site (loopback, no TLS, users on `localhost`) plus the doc's blocks where
/// the doc says to put them: the global block above the first VirtualHost, the Component after.
fn prosody_config(server: &Server) -> String {
    let dir = server.dir().display().to_string();
    let global = fill(
        &block("prosody", "prosody-global"),
        "{ 5347 }",
        &format!("{{ {} }}", server.component_port()),
    );
    let component = site(&block("prosody", "prosody-component"));
    format!(
        "-- The site's own settings (tests/admin_docs.rs).\n\
         pidfile = \"{dir}/prosody.pid\"\n\
         data_path = \"{dir}/data\"\n\
         certificates = \"{dir}/certs\"\n\
         run_as_root = true\n\
         log = {{ info = \"*console\" }}\n\
         interfaces = {{ \"127.0.0.1\" }}\n\
         c2s_ports = {{ {c2s} }}\n\
         c2s_direct_tls_ports = {{ }}\n\
         s2s_ports = {{ }}\n\
         http_ports = {{ }}\n\
         https_ports = {{ }}\n\
         modules_enabled = {{ \"roster\"; \"saslauth\"; \"disco\"; \"ping\"; \"posix\"; }}\n\
         modules_disabled = {{ \"s2s\"; \"tls\" }}\n\
         c2s_require_encryption = false\n\
         allow_unencrypted_plain_auth = true\n\
         authentication = \"internal_hashed\"\n\
         storage = \"internal\"\n\
         \n\
         -- ---- docs/prosody.md, reach-doc=prosody-global ----\n\
         {global}\n\
         VirtualHost \"localhost\"\n\
         \n\
         -- ---- docs/prosody.md, reach-doc=prosody-component ----\n\
         {component}",
        c2s = server.c2s_port(),
    )
}

/// Prosody's own checker finds nothing misplaced in the config at `path` (e.g. a component port
/// under a VirtualHost) and nothing deprecated.
fn prosodyctl_finds_nothing_misplaced(path: &std::path::Path) {
    let check = Command::new("prosodyctl")
        .arg("--config")
        .arg(path)
        .args(["check", "config"])
        .output()
        .expect("run prosodyctl check config");
    let said = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        !said.contains("that should be") && !said.contains("deprecated"),
        "prosodyctl check config:\n{said}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_doc_plugs_reach_in() {
    // A Prosody from tests/servers gives the ports and folder; its config is then replaced by
    // the site config built from the doc, and it starts again.
    let mut server = Server::start(ServerKind::Prosody).await;
    server.stop().await;
    let config_path = server.dir().join("prosody.cfg.lua");
    std::fs::write(&config_path, prosody_config(&server)).unwrap();

    prosodyctl_finds_nothing_misplaced(&config_path);

    server.restart().await;
    server.register("alice", "alicepw").await;
    let state = tempfile::tempdir().unwrap();
    let config = reach_base(
        "prosody",
        "prosody-reach",
        &server.component_addr(),
        state.path(),
    );
    check_config("prosody-reach", &config);
    let reach = Reach::start_config(state.path(), &config).await;
    let _logs = Logs::new(&reach, vec![("prosody", server.dir().join("console.log"))]);

    let mut alice = alice_finds_and_registers(&server).await;
    assert!(reach.wait_for_log("component link up", T).await);
    assert!(
        server
            .log()
            .contains("External component successfully authenticated"),
        "{}",
        server.log_tail(40)
    );
    // "Checking that it works", step 2: the server lists Reach among its services.
    let items = server_items(&mut alice, "localhost").await;
    assert!(items.contains(D), "disco#items of localhost: {items}");
    // Step 4: Reach answers `help`.
    alice
        .send(&format!(
            "<message type='chat' to='{D}'><body>help</body></message>"
        ))
        .await;
    alice
        .expect("Reach's help", T, |s| {
            body(s).is_some_and(|b| !b.is_empty())
        })
        .await;
}

// ---- Integrated mode (Prosody) ---------------------------------------------------------------

/// The existing Prosody site with prosody.md's global block, and integrated-mode.md's lines
/// under its VirtualHost and its Component block (which replaces prosody.md's); the rules file
/// goes to `rules` instead of `/etc/prosody/reach-copy.pfw`.
fn integrated_prosody_config(server: &Server, rules: &Path) -> String {
    let dir = server.dir().display().to_string();
    let global = fill(
        &block("prosody", "prosody-global"),
        "{ 5347 }",
        &format!("{{ {} }}", server.component_port()),
    );
    let host = site(&fill(
        &block("integrated-mode", "integrated-virtualhost"),
        "/etc/prosody/reach-copy.pfw",
        &rules.display().to_string(),
    ));
    let component = site(&block("integrated-mode", "integrated-component"));
    format!(
        "-- The site's own settings (tests/admin_docs.rs).\n\
         pidfile = \"{dir}/prosody.pid\"\n\
         data_path = \"{dir}/data\"\n\
         certificates = \"{dir}/certs\"\n\
         run_as_root = true\n\
         log = {{ debug = \"{dir}/debug.log\"; info = \"*console\" }}\n\
         interfaces = {{ \"127.0.0.1\" }}\n\
         c2s_ports = {{ {c2s} }}\n\
         c2s_direct_tls_ports = {{ }}\n\
         s2s_ports = {{ }}\n\
         http_ports = {{ }}\n\
         https_ports = {{ }}\n\
         modules_enabled = {{ \"roster\"; \"saslauth\"; \"disco\"; \"ping\"; \"posix\"; \"carbons\"; \"offline\"; }}\n\
         modules_disabled = {{ \"s2s\"; \"tls\" }}\n\
         c2s_require_encryption = false\n\
         allow_unencrypted_plain_auth = true\n\
         authentication = \"internal_hashed\"\n\
         storage = \"internal\"\n\
         \n\
         -- ---- docs/prosody.md, reach-doc=prosody-global ----\n\
         {global}\n\
         VirtualHost \"localhost\"\n\
         -- ---- docs/integrated-mode.md, reach-doc=integrated-virtualhost ----\n\
         {host}\n\
         -- ---- docs/integrated-mode.md, reach-doc=integrated-component ----\n\
         {component}",
        c2s = server.c2s_port(),
    )
}

/// Copies Reach's link logged as coming from the host `localhost` to `D/KIND`.
fn copies_seen(reach: &Reach, kind: &str) -> usize {
    let marker = format!("from=Some(Jid(\"localhost\")) to=Some(Jid(\"{D}/{kind}\"))");
    reach
        .log()
        .lines()
        .filter(|l| l.contains("inbound stanza kind=\"message\"") && l.contains(&marker))
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn integrated_mode_doc_reaches_a_users_own_address_by_email() {
    let mut server = Server::start(ServerKind::Prosody).await;
    server.stop().await;
    let rules = server.dir().join("reach-copy.pfw");
    std::fs::write(
        &rules,
        site(&block("integrated-mode", "integrated-firewall")),
    )
    .unwrap();
    let config_path = server.dir().join("prosody.cfg.lua");
    std::fs::write(&config_path, integrated_prosody_config(&server, &rules)).unwrap();
    prosodyctl_finds_nothing_misplaced(&config_path);
    server.restart().await;
    for user in ["alice", "bob"] {
        server.register(user, &format!("{user}pw")).await;
    }
    let debug_log = std::fs::read_to_string(server.dir().join("debug.log")).unwrap_or_default();
    assert!(
        debug_log.contains(&format!("Loaded {}", rules.display())),
        "mod_firewall did not load the doc's rules:\n{}",
        server.log_tail(30)
    );

    let sink = MailSink::start().await;
    let listen_port = support::free_port();
    let state = tempfile::tempdir().unwrap();
    let base = reach_base(
        "prosody",
        "prosody-reach",
        &server.component_addr(),
        state.path(),
    );
    let integrated = site(&block("integrated-mode", "integrated-reach"));
    // Test only: the mail sink as relay, and a short digest window.
    let config = format!(
        "{base}\n{integrated}\n[email]\nrelay = \"smtp://127.0.0.1:{}\"\nfrom_address = \"reach@{D}\"\n\
         reply_domain = \"{D}\"\nlisten = \"127.0.0.1:{listen_port}\"\ndigest_window_secs = 1\n",
        sink.port
    );
    check_config("integrated-reach", &config);
    let reach = Reach::start_config(state.path(), &config).await;
    let _logs = Logs::new(&reach, vec![("prosody", server.dir().join("console.log"))]);
    // "Reach's side": the log line the doc quotes.
    assert!(
        reach
            .wait_for_log(
                "the server's privileges for Reach host=\"localhost\" send_as_users=true roster=\"none\" presence=\"none\"",
                T
            )
            .await,
        "{}",
        reach.log()
    );

    // Alice registers with her mailbox, confirms it, and chooses her own address.
    let mut alice = Client::connect(&server, "alice", "alicepw", "pc").await;
    support::wait_for_component(&mut alice, D).await;
    alice.presence("").await;
    support::account::asks_to_register(
        &mut alice,
        &format!("<username>alice</username><email>{ALICE_MAIL}</email>"),
    )
    .await;
    let mails = sink.wait_for(1, T).await;
    let code = support::account::email_code(&mails[0]);
    for (line, answer) in [
        (format!("verify {code}"), "is verified"),
        ("address own".to_owned(), "your own address alice@localhost"),
    ] {
        alice
            .send(&format!(
                "<message type='chat' to='{D}'><body>{line}</body></message>"
            ))
            .await;
        alice
            .expect(answer, T, |s| body(s).is_some_and(|b| b.contains(answer)))
            .await;
    }
    alice.close().await;

    // Bob writes to her own address: the message reaches her mailbox.
    let mut bob = Client::connect(&server, "bob", "bobpw", "pc").await;
    bob.presence("").await;
    bob.send(
        "<message type='chat' id='b1' to='alice@localhost'><body>Hi Alice, lunch?</body></message>",
    )
    .await;
    let deadline = std::time::Instant::now() + T;
    let mail = loop {
        if let Some(m) = forwards(&sink).into_iter().next() {
            break m;
        }
        assert!(std::time::Instant::now() < deadline, "no forwarded mail");
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(mail.text().contains("Hi Alice, lunch?"), "{}", mail.text());
    // Bob is a user of the same host: his message was copied as sent and as delivered, and
    // nothing else was (Alice's chat with the service, its answers, the verification).
    assert_eq!(
        (copies_seen(&reach, "sent"), copies_seen(&reach, "received")),
        (1, 1)
    );

    // Her reply reaches Bob from her own address; the rules copy nothing of it.
    let reply = format!(
        "From: Alice <{ALICE_MAIL}>\nTo: {}\nSubject: Re: IM\nMessage-ID: <reply-1@mail.example>\n\
         In-Reply-To: <{}>\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n\
         Yes, 12:30\n",
        mail.reply_to(),
        mail.message_id()
    );
    let answer = submit(listen_port, ALICE_MAIL, &[&mail.reply_to()], &reply).await;
    assert_eq!(answer.outcome().0, 250, "{answer:?}");
    let got = bob
        .expect("Alice's reply", T, |s| {
            body(s).as_deref() == Some("Yes, 12:30")
        })
        .await;
    assert_eq!(got.attr("from"), Some("alice@localhost"));
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        (copies_seen(&reach, "sent"), copies_seen(&reach, "received")),
        (1, 1)
    );
    assert_eq!(forwards(&sink).len(), 1, "nothing more by email");
    let log = server.log();
    assert!(
        !log.contains("Traceback") && !log.contains("Error compiling"),
        "{log}"
    );
}

// ---- ejabberd ------------------------------------------------------------------------------

/// An existing ejabberd site (users on `localhost`, c2s on loopback) with the doc's listener
/// added to its `listen:` list.
fn ejabberd_config(server: &Server) -> String {
    let listener = site(&fill(
        &block("ejabberd", "ejabberd-listener"),
        "port: 5347",
        &format!("port: {}", server.component_port()),
    ));
    ejabberd_site(
        server,
        "ejabberd.md, reach-doc=ejabberd-listener",
        &listener,
    )
}

/// The existing ejabberd site with `listener` (from the doc named by `from`) in its `listen:`.
fn ejabberd_site(server: &Server, from: &str, listener: &str) -> String {
    format!(
        "# The site's own settings (tests/admin_docs.rs).\n\
         loglevel: info\n\
         log_rotate_count: 0\n\
         hosts:\n  - localhost\n\
         certfiles: []\n\
         listen:\n\
         \x20 -\n\
         \x20   port: {c2s}\n\
         \x20   ip: \"127.0.0.1\"\n\
         \x20   module: ejabberd_c2s\n\
         \x20   max_stanza_size: 262144\n\
         \x20   access: c2s\n\
         \x20   starttls_required: false\n\
         # ---- docs/{from} ----\n\
         {listener}\
         auth_method: internal\n\
         auth_password_format: scram\n\
         acl:\n  local:\n    user_regexp: \"\"\n\
         access_rules:\n  local:\n    allow: local\n  c2s:\n    allow: all\n\
         api_permissions:\n  \"console commands\":\n    from:\n      - ejabberd_ctl\n    who: all\n    what: \"*\"\n\
         modules:\n  mod_disco: {{}}\n  mod_ping: {{}}\n  mod_roster: {{}}\n",
        c2s = server.c2s_port(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_doc_plugs_reach_in() {
    let mut server = Server::start(ServerKind::Ejabberd).await;
    server.stop().await;
    // Overwriting keeps the file's owner (ejabberd), which ejabberdctl needs.
    std::fs::write(server.dir().join("ejabberd.yml"), ejabberd_config(&server)).unwrap();
    server.restart().await;
    server.register("alice", "alicepw").await;
    let state = tempfile::tempdir().unwrap();
    let config = reach_base(
        "ejabberd",
        "ejabberd-reach",
        &server.component_addr(),
        state.path(),
    );
    check_config("ejabberd-reach", &config);
    let reach = Reach::start_config(state.path(), &config).await;
    let _logs = Logs::new(&reach, vec![("ejabberd", server.dir().join("console.log"))]);

    let mut alice = alice_finds_and_registers(&server).await;
    assert!(reach.wait_for_log("component link up", T).await);
    assert!(
        server.log().contains(&format!(
            "Accepted external component handshake authentication for {D}"
        )),
        "{}",
        server.log_tail(40)
    );
    alice
        .send(&format!(
            "<message type='chat' to='{D}'><body>help</body></message>"
        ))
        .await;
    alice
        .expect("Reach's help", T, |s| {
            body(s).is_some_and(|b| !b.is_empty())
        })
        .await;
}

// ---- Kannel --------------------------------------------------------------------------------

const PHONE: &str = "+15551234567";

/// Kannel's config with the doc's lines merged into `group = core` and `group = smsbox`, and
/// the doc's `sendsms-user` and `sms-service` groups in place of the ones there.
fn kannel_config(existing: &str, sendsms_port: u16, webhook_port: u16, dir: &Path) -> String {
    let local = |text: &str| {
        let text = text.replace("13013", &sendsms_port.to_string());
        let text = text.replace("8088", &webhook_port.to_string());
        text.replace("/var/spool/kannel", &dir.display().to_string())
    };
    let core = local(&fill(
        &block("kannel", "kannel-core"),
        "/var/spool/kannel",
        "/var/spool/kannel",
    ));
    let smsbox = local(&fill(&block("kannel", "kannel-smsbox"), "13013", "13013"));
    let user = local(&block("kannel", "kannel-sendsms-user"));
    let service = local(&fill(
        &block("kannel", "kannel-sms-service"),
        "8088",
        "8088",
    ));

    let mut lines: Vec<String> = existing.lines().map(str::to_owned).collect();
    merge_into_group(&mut lines, "core", &core);
    merge_into_group(&mut lines, "smsbox", &smsbox);
    remove_group(&mut lines, "sendsms-user");
    remove_group(&mut lines, "sms-service");
    let mut out = lines.join("\n");
    for group in [user, service] {
        out.push_str("\n\n");
        out.push_str(group.trim_end());
    }
    out.push('\n');
    out
}

/// (start, end) line indexes of `group = NAME`: from its `group` line to the first empty line.
fn group_range(lines: &[String], name: &str) -> (usize, usize) {
    let start = lines
        .iter()
        .position(|l| {
            let l: String = l.chars().filter(|c| !c.is_whitespace()).collect();
            l == format!("group={name}")
        })
        .unwrap_or_else(|| panic!("no group = {name}"));
    let end = lines[start..]
        .iter()
        .position(|l| l.trim().is_empty())
        .map_or(lines.len(), |n| start + n);
    (start, end)
}

fn key_of(line: &str) -> Option<String> {
    let line = line.trim();
    if line.starts_with('#') {
        return None;
    }
    line.split_once('=').map(|(k, _)| k.trim().to_owned())
}

fn merge_into_group(lines: &mut Vec<String>, name: &str, block: &str) {
    let keys: Vec<String> = block.lines().filter_map(key_of).collect();
    assert!(
        !block.lines().any(|l| l.trim().is_empty()),
        "an empty line would end group {name} early:\n{block}"
    );
    let (start, end) = group_range(lines, name);
    let mut group: Vec<String> = lines[start..end]
        .iter()
        .filter(|l| !key_of(l).is_some_and(|k| keys.contains(&k)))
        .cloned()
        .collect();
    group.extend(block.lines().map(str::to_owned));
    lines.splice(start..end, group);
}

fn remove_group(lines: &mut Vec<String>, name: &str) {
    let (start, end) = group_range(lines, name);
    lines.drain(start..end);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kannel_doc_carries_sms_both_ways_and_delivery_reports() {
    let server = Server::start(ServerKind::Prosody).await;
    for user in ["alice", "bob"] {
        server.register(user, &format!("{user}pw")).await;
    }
    let webhook_port = support::free_port();
    // A Kannel from tests/servers gives the ports, the SMSC group and the folder; then the
    // doc's blocks go in and it starts again.
    let mut kannel = Kannel::start("http://127.0.0.1:1/unused?x=1").await;
    kannel.stop().await;
    let conf_path = kannel.dir().join("kannel.conf");
    let existing = std::fs::read_to_string(&conf_path).unwrap();
    let sendsms_port: u16 = kannel
        .sendsms_url()
        .trim_start_matches("http://127.0.0.1:")
        .trim_end_matches("/cgi-bin/sendsms")
        .parse()
        .expect("sendsms port");
    let conf = kannel_config(&existing, sendsms_port, webhook_port, kannel.dir());
    std::fs::write(&conf_path, &conf).unwrap();
    std::fs::create_dir_all(kannel.dir().join("dlr")).unwrap();
    kannel.restart().await;
    let mut phone = Handset::connect(&kannel).await;

    let state = tempfile::tempdir().unwrap();
    let sms = fill(
        &fill(
            &block("kannel", "kannel-reach"),
            "127.0.0.1:13013",
            &format!("127.0.0.1:{sendsms_port}"),
        ),
        "127.0.0.1:8088",
        &format!("127.0.0.1:{webhook_port}"),
    );
    let config = format!("{}\n{sms}", Reach::config(&server, state.path()));
    check_config("kannel-reach", &config);
    let reach = Reach::start_config(state.path(), &config).await;
    let _logs = Logs::new(
        &reach,
        ["kannel.conf", "bearerbox.log", "smsbox.log"]
            .into_iter()
            .map(|name| (name, kannel.dir().join(name)))
            .collect(),
    );

    // MT through the doc's sendsms-user: the verification code reaches the phone.
    let mut alice = Client::connect(&server, "alice", "alicepw", "pc").await;
    support::wait_for_component(&mut alice, D).await;
    alice.presence("").await;
    let ok = alice
        .iq(&format!(
            "<iq type='set' id='reg' to='{D}'><query xmlns='jabber:iq:register'><username>alice</username><phone>{PHONE}</phone></query></iq>"
        ))
        .await;
    assert_eq!(ok.attr("type"), Some("result"), "{}", String::from(&ok));
    let code_sms = phone
        .recv_mt(T)
        .await
        .expect("the verification code by SMS");
    assert_eq!(code_sms.to, PHONE);
    assert_eq!(code_sms.from, "+15550000000", "[sms] from");
    let code: String = code_sms
        .text
        .split(|c: char| !c.is_ascii_digit())
        .find(|w| w.len() == 6)
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("a 6-digit code in {code_sms:?}"));

    // MO through the doc's sms-service: the code texted back verifies the phone.
    phone.send_mo(PHONE, "+15550000000", &code).await;
    alice
        .expect("the phone is verified", T, |s| {
            body(s).is_some_and(|b| b.contains("is verified"))
        })
        .await;
    alice.close().await;
    while let Some(mt) = phone.recv_mt(Duration::from_secs(2)).await {
        // the confirmation SMS
        assert_eq!(mt.to, PHONE);
    }

    // DLR through the doc's dlr-storage: the phone's delivery report becomes Bob's receipt.
    let mut bob = Client::connect(&server, "bob", "bobpw", "pc").await;
    support::wait_for_component(&mut bob, D).await;
    bob.presence("").await;
    bob.send(&format!(
        "<message type='chat' id='r-1' to='alice@{D}'><body>did you get this?</body><request xmlns='urn:xmpp:receipts'/></message>"
    ))
    .await;
    let mut got = Vec::new();
    while let Some(mt) = phone.recv_mt(T).await {
        let done = mt.text.contains("did you get this?");
        got.push(mt);
        if done {
            break;
        }
    }
    assert!(
        got.iter().any(|m| m.text.contains("did you get this?")),
        "Bob's message by SMS: {got:?}"
    );
    let receipt = bob
        .expect("the receipt", T, |s| {
            s.has_child("received", "urn:xmpp:receipts")
        })
        .await;
    assert_eq!(receipt.attr("from"), Some(&*format!("alice@{D}")));
}

// ---- Postfix -------------------------------------------------------------------------------

const ALICE_MAIL: &str = "alice@mail.example";

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
async fn postfix_doc_carries_mail_out_and_replies_in() {
    let server = Server::start(ServerKind::Prosody).await;
    for user in ["alice", "bob"] {
        server.register(user, &format!("{user}pw")).await;
    }
    // Where Postfix delivers users' mail: a sink standing for the world's mailboxes.
    let sink = MailSink::start().await;
    let listen_port = support::free_port();
    let mut postfix = Postfix::new();
    let etc = format!("{}/", postfix.config_dir().display());
    let transport = site(&fill(
        &block("postfix", "postfix-transport"),
        "[127.0.0.1]:2525",
        &format!("[127.0.0.1]:{listen_port}"),
    ));
    postfix.write_file("transport", &transport);
    let inbound = site(&fill(
        &block("postfix", "postfix-inbound"),
        "/etc/postfix/",
        &etc,
    ));
    let outbound = block("postfix", "postfix-outbound");
    postfix.write_main_cf(&format!(
        "# docs/postfix.md, reach-doc=postfix-inbound\n{inbound}\n\
         # docs/postfix.md, reach-doc=postfix-outbound\n{outbound}\n\
         # the site's smarthost (test only: the sink)\nrelayhost = [127.0.0.1]:{}\n",
        sink.port
    ));
    postfix.postmap("transport");
    postfix.start().await;

    let state = tempfile::tempdir().unwrap();
    let email = site(&fill(
        &fill(
            &block("postfix", "postfix-reach"),
            "smtp://127.0.0.1:25\"",
            &format!("smtp://127.0.0.1:{}\"", postfix.port()),
        ),
        "127.0.0.1:2525",
        &format!("127.0.0.1:{listen_port}"),
    ));
    // Test only: a short digest window instead of 30 s.
    let config = format!(
        "{}\n{email}digest_window_secs = 1\n",
        Reach::config(&server, state.path())
    );
    check_config("postfix-reach", &config);
    let mut reach = Reach::start_config(state.path(), &config).await;
    let _logs = Logs::new(&reach, vec![("postfix", postfix.dir().join("maillog"))]);

    // Out through Postfix: the verification mail.
    let mut alice = Client::connect(&server, "alice", "alicepw", "pc").await;
    support::wait_for_component(&mut alice, D).await;
    alice.presence("").await;
    support::account::asks_to_register(
        &mut alice,
        &format!("<username>alice</username><email>{ALICE_MAIL}</email>"),
    )
    .await;
    let mails = sink.wait_for(1, T).await;
    assert!(
        postfix
            .wait_for_log(&["from=<reach@reach.localhost>"], T)
            .await
            .is_some(),
        "Reach's mail did not go through Postfix\n{}",
        postfix.logs()
    );
    let code = support::account::email_code(&mails[0]);
    assert_eq!(code.len(), 6, "subject: {:?}", mails[0].header("Subject"));
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

    // A buddy's message goes out by mail; the reply comes back through Postfix's transport.
    let mut bob = Client::connect(&server, "bob", "bobpw", "pc").await;
    support::wait_for_component(&mut bob, D).await;
    bob.presence("").await;
    bob.send(&format!(
        "<message type='chat' id='b1' to='alice@{D}'><body>Hi Alice, lunch?</body></message>"
    ))
    .await;
    let deadline = std::time::Instant::now() + T;
    let mail = loop {
        if let Some(m) = forwards(&sink).into_iter().next() {
            break m;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "no forwarded mail\n{}",
            postfix.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let alias = mail.reply_to();
    let reply = format!(
        "From: Alice <{ALICE_MAIL}>\nTo: {alias}\nSubject: Re: IM\nMessage-ID: <reply-1@mail.example>\n\
         In-Reply-To: <{}>\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n\
         Yes, 12:30 through postfix\n",
        mail.message_id()
    );
    // Submitted where the internet meets Postfix (not from mynetworks): relay_domains lets it in.
    let to_postfix = submit(postfix.outside_port(), ALICE_MAIL, &[&alias], &reply).await;
    assert_eq!(to_postfix.outcome().0, 250, "Postfix: {to_postfix:?}");
    let got = bob
        .expect("Alice's reply, through Postfix", T, |s| body(s).is_some())
        .await;
    assert_eq!(got.attr("from"), Some(&*format!("alice@{D}")));
    assert_eq!(body(&got).as_deref(), Some("Yes, 12:30 through postfix"));
    let relayed = postfix
        .wait_for_log(
            &[
                &format!("relay=127.0.0.1[127.0.0.1]:{listen_port}"),
                "status=sent",
            ],
            T,
        )
        .await;
    assert!(relayed.is_some(), "{}", postfix.logs());

    // "Checking it", step 4: while Reach is down Postfix keeps the reply, and delivers it once
    // Reach is back and the queue is flushed.
    reach.stop().await;
    let reply2 = reply
        .replace("reply-1@mail.example", "reply-2@mail.example")
        .replace("Yes, 12:30 through postfix", "Queued while Reach was down");
    let queued = submit(postfix.outside_port(), ALICE_MAIL, &[&alias], &reply2).await;
    assert_eq!(queued.outcome().0, 250, "Postfix: {queued:?}");
    let deferred = postfix
        .wait_for_log(&["status=deferred", "Connection refused"], T)
        .await;
    assert!(deferred.is_some(), "{}", postfix.logs());
    let reach = Reach::start_config(state.path(), &config).await;
    let deadline = std::time::Instant::now() + T;
    while reach
        .log()
        .matches("SMTP listener accepting connections")
        .count()
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "Reach's listener is not back"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let flush = Command::new("postqueue")
        .arg("-c")
        .arg(postfix.config_dir())
        .arg("-f")
        .output()
        .expect("run postqueue -f");
    assert!(flush.status.success(), "{flush:?}");
    let deadline = std::time::Instant::now() + T;
    let reach_relay = format!("relay=127.0.0.1[127.0.0.1]:{listen_port}");
    while postfix
        .log()
        .lines()
        .filter(|l| l.contains(&reach_relay) && l.contains("status=sent"))
        .count()
        < 2
    {
        assert!(
            std::time::Instant::now() < deadline,
            "the queued reply was not delivered to Reach\n{}",
            postfix.logs()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let got = bob
        .expect("the queued reply, after Reach came back", T, |s| {
            body(s).is_some()
        })
        .await;
    assert_eq!(body(&got).as_deref(), Some("Queued while Reach was down"));
    postfix.stop().await;
}

// ---- Several instances on PostgreSQL -------------------------------------------------------

/// The role's password in docs/instances.md (`\password reach` and the password file hold it).
const DB_PASSWORD: &str = "CHANGE-ME-database-password";

/// The SQL statements of a block, comments and empty lines left out (psql runs several
/// statements given at once in one transaction, where `CREATE DATABASE` may not run).
fn sql_statements(block: &str) -> Vec<String> {
    let text: String = block
        .lines()
        .map(|l| l.split("--").next().unwrap_or(""))
        .collect::<Vec<_>>()
        .join("\n");
    text.split(';')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned)
        .collect()
}

/// The `reach ...` command lines of a shell block, each as its words: continuation lines joined,
/// comments and a leading `sudo -u reach` dropped, single quotes removed. The other lines of
/// the block (`systemctl`, `mv`, `install`) act on the host and are not run here.
fn reach_lines(doc: &str, marker: &str) -> Vec<Vec<String>> {
    let joined = block(doc, marker).replace("\\\n", " ");
    joined
        .lines()
        .map(|l| l.split(" #").next().unwrap_or("").trim())
        .map(|l| l.strip_prefix("sudo -u reach ").unwrap_or(l))
        .filter(|l| l.starts_with("reach "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .map(|w| w.trim_matches('\'').to_owned())
                .collect()
        })
        .collect()
}

/// Runs the built `reach` with `args`: (success, stdout, stderr).
fn reach_cli<S: AsRef<std::ffi::OsStr>>(args: &[S]) -> (bool, String, String) {
    let out = Command::new(reach_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run reach");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// `reach stats` on `config`: its output, which must come with exit status 0.
fn stats(config: &Path) -> String {
    let (ok, out, err) = reach_cli(&["stats".as_ref(), "--config".as_ref(), config.as_os_str()]);
    assert!(ok, "reach stats --config {}: {out}{err}", config.display());
    out
}

/// The number on the line of `reach stats` (or `reach migrate`) output that starts with `what`.
fn count_of(output: &str, what: &str) -> Option<u64> {
    output
        .lines()
        .find(|l| l.starts_with(what))
        .and_then(|l| l.split_whitespace().last())
        .and_then(|n| n.parse().ok())
}

/// The machine's host name: the default instance name.
fn host_name() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_default()
}

/// A private PostgreSQL set up as docs/instances.md says: the doc's SQL run by the superuser,
/// the role's password set (what `\password reach` does), and the doc's `pg_hba.conf` lines put
/// above the server's own, with the private network `10.0.0.0/24` as loopback. The server's own
/// lines trust every local connection, so only the doc's lines stand between Reach and the
/// database: Reach logs in over TCP with the password from `password_file`.
struct DocDatabase {
    pg: PgCluster,
    /// Holds the password files.
    dir: tempfile::TempDir,
    password_file: PathBuf,
}

impl DocDatabase {
    async fn set_up() -> DocDatabase {
        let pg = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
        for statement in sql_statements(&block("instances", "instances-database")) {
            pg.psql("postgres", &statement);
        }
        pg.psql(
            "postgres",
            &format!("ALTER ROLE reach PASSWORD '{DB_PASSWORD}'"),
        );
        let lines = fill(
            &block("instances", "instances-pg-hba"),
            "10.0.0.0/24",
            "127.0.0.1/32",
        );
        let hba = PathBuf::from(pg.psql("postgres", "SHOW hba_file"));
        let existing = std::fs::read_to_string(&hba).unwrap();
        // Writing over the file keeps its owner (the server's user).
        std::fs::write(
            &hba,
            format!(
                "# ---- docs/instances.md, reach-doc=instances-pg-hba ----\n{lines}\n{existing}"
            ),
        )
        .unwrap();
        let errors = pg.psql(
            "postgres",
            "SELECT string_agg(line_number || ': ' || error, '; ') FROM pg_hba_file_rules WHERE error IS NOT NULL",
        );
        assert!(errors.is_empty(), "the doc's pg_hba.conf lines: {errors}");
        assert_eq!(pg.psql("postgres", "SELECT pg_reload_conf()"), "t");
        let dir = tempfile::tempdir().unwrap();
        let password_file = dir.path().join("database-password");
        std::fs::write(&password_file, format!("{DB_PASSWORD}\n")).unwrap();
        let db = DocDatabase {
            pg,
            dir,
            password_file,
        };
        db.wait_for_password_rule().await;
        db
    }

    /// A URL or config of the doc with the database host `10.0.0.2` made this server.
    fn local(&self, text: &str) -> String {
        fill(
            text,
            "@10.0.0.2/",
            &format!("@127.0.0.1:{}/", self.pg.port()),
        )
    }

    /// The doc's Reach block made to run here: `component_addr` for ejabberd's listener, the
    /// component secret replaced when the server has its own, the database here, the password
    /// file in a temporary folder.
    fn reach_config(
        &self,
        component_addr: &str,
        secret: Option<&str>,
        password_file: &Path,
    ) -> String {
        let text = site(&block("instances", "instances-reach"));
        let text = fill(&text, "10.0.0.1:5347", component_addr);
        let text = match secret {
            Some(secret) => fill(&text, "CHANGE-ME-component-secret", secret),
            None => text,
        };
        let text = self.local(&text);
        fill(
            &text,
            "\"/etc/reach/database-password\"",
            &format!("{:?}", password_file.display().to_string()),
        )
    }

    /// Runs the `sudo -u postgres ...` lines of a shell block of the doc as the server's
    /// superuser on this server (connection options added after the program), with the dump
    /// file `/var/backups/reach.dump` of their redirections as `dump`. Returns how many ran.
    fn run_superuser_lines(&self, marker: &str, dump: &Path) -> usize {
        let mut ran = 0;
        for line in block("instances", marker).lines() {
            let Some(command) = line.trim().strip_prefix("sudo -u postgres ") else {
                continue;
            };
            let (command, redirect) = match command.split_once(" > ") {
                Some((c, file)) => (c, Some((false, file))),
                None => match command.split_once(" < ") {
                    Some((c, file)) => (c, Some((true, file))),
                    None => (command, None),
                },
            };
            let mut words = command.split_whitespace();
            let program = words.next().expect("a program");
            let mut cmd = Command::new(program);
            cmd.arg("-h")
                .arg(self.pg.socket_dir())
                .args(["-p", &self.pg.port().to_string(), "-U", "postgres"])
                .args(words);
            if let Some((input, file)) = redirect {
                assert_eq!(file.trim(), "/var/backups/reach.dump", "{line}");
                if input {
                    cmd.stdin(std::fs::File::open(dump).expect("the dump"));
                } else {
                    cmd.stdout(std::fs::File::create(dump).expect("the dump file"));
                }
            }
            let out = cmd
                .output()
                .unwrap_or_else(|e| panic!("run {program}: {e}"));
            assert!(
                out.status.success(),
                "{line}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
            ran += 1;
        }
        ran
    }

    /// Waits until the reloaded `pg_hba.conf` is in force: a wrong password is refused (with
    /// the trust the server starts with, anything would pass).
    async fn wait_for_password_rule(&self) {
        let wrong = self.dir.path().join("wrong-password");
        std::fs::write(&wrong, "not the password\n").unwrap();
        let config = self.reach_config("127.0.0.1:5347", None, &wrong);
        let path = self.dir.path().join("wrong.toml");
        std::fs::write(&path, &config).unwrap();
        let deadline = Instant::now() + T;
        loop {
            let (ok, out, err) = reach_cli(&["check-config".as_ref(), path.as_os_str()]);
            if !ok {
                assert!(
                    err.contains("password authentication failed"),
                    "check-config with a wrong password: {out}{err}"
                );
                return;
            }
            assert!(
                Instant::now() < deadline,
                "pg_hba.conf not in force after {T:?}: a wrong password passes"
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// How many stanzas the link of this Reach read (its debug lines `inbound stanza`).
fn inbound_stanzas(reach: &Reach) -> usize {
    reach
        .log()
        .lines()
        .filter(|l| l.contains("inbound stanza"))
        .count()
}

/// Bob says `text` to Alice's reach address; Alice's client gets it from Bob's per-session JID.
async fn bob_reaches_alice(bob: &mut Client, alice: &mut Client, text: &str) {
    bob.send(&format!(
        "<message type='chat' id='{}' to='alice@{D}'><body>{text}</body></message>",
        new_id()
    ))
    .await;
    let got = alice
        .expect(&format!("Bob's message {text:?}"), T, |s| {
            s.name() == "message" && body(s).as_deref() == Some(text)
        })
        .await;
    assert_eq!(
        got.attr("from").map(bare),
        Some(&*format!("bob\\40localhost@{D}")),
        "{}",
        String::from(&got)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_doc_runs_two_reach_behind_ejabberd_on_postgresql() {
    let began = Instant::now();
    let db = DocDatabase::set_up().await;

    // ejabberd with the doc's listener, on loopback, and no domain_balancing anywhere.
    let mut server = Server::start(ServerKind::Ejabberd).await;
    server.stop().await;
    let listener = block("instances", "instances-listener");
    assert!(
        !listener.contains("domain_balancing"),
        "the doc warns against domain_balancing; its listener must not set it"
    );
    let listener = site(&fill(
        &fill(
            &listener,
            "port: 5347",
            &format!("port: {}", server.component_port()),
        ),
        "ip: \"10.0.0.1\"",
        "ip: \"127.0.0.1\"",
    ));
    std::fs::write(
        server.dir().join("ejabberd.yml"),
        ejabberd_site(
            &server,
            "instances.md, reach-doc=instances-listener",
            &listener,
        ),
    )
    .unwrap();
    server.restart().await;
    for user in ["alice", "bob"] {
        server.register(user, &format!("{user}pw")).await;
    }

    // The doc's Reach block, with an SMTP listener per instance for the Postfix part.
    let base = db.reach_config(&server.component_addr(), None, &db.password_file);
    let said = check_config("instances-reach", &base);
    assert!(
        said.contains("The database answers: PostgreSQL") && said.contains("empty database"),
        "check-config on the new database: {said}"
    );
    let smtp = [support::free_port(), support::free_port()];
    let unused_relay = support::free_port();
    let with_listener = |port: u16| {
        format!(
            "{base}\n[email]\nrelay = \"smtp://127.0.0.1:{unused_relay}\"\nreply_domain = \"{D}\"\n\
             listen = \"127.0.0.1:{port}\"\n"
        )
    };

    // The first instance, as written: named after the host.
    let host = host_name();
    let dir1 = tempfile::tempdir().unwrap();
    let mut reach1 = Reach::start_config(dir1.path(), &with_listener(smtp[0])).await;
    let _logs1 = Logs::new(
        &reach1,
        vec![("ejabberd", server.dir().join("console.log"))],
    );
    assert!(reach1.wait_for_log("component link up", T).await);

    // A second process from the same file takes the same name, and is refused.
    let dir_same = tempfile::tempdir().unwrap();
    let mut same = Reach::start_config(dir_same.path(), &with_listener(smtp[1])).await;
    let status = same.wait_exit(T).await.expect("the second process exits");
    assert!(!status.success(), "a second '{host}' ran");
    assert!(
        same.log()
            .contains(&format!("instance '{host}' is already running")),
        "{}",
        same.log()
    );

    // The second instance under the name the doc's comment shows.
    let named = fill(
        &with_listener(smtp[1]),
        "# instance = \"reach-2\"",
        "instance = \"reach-2\"",
    );
    let dir2 = tempfile::tempdir().unwrap();
    let reach2 = Reach::start_config(dir2.path(), &named).await;
    let _logs2 = Logs::new(&reach2, vec![]);
    assert!(reach2.wait_for_log("component link up", T).await);
    assert!(reach2.log().contains("reach-2"), "{}", reach2.log());
    let handshake = format!("Accepted external component handshake authentication for {D}");
    let deadline = Instant::now() + T;
    while server.log().matches(&handshake).count() < 2 {
        assert!(
            Instant::now() < deadline,
            "ejabberd did not accept both instances\n{}",
            server.log_tail(40)
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A user registers through the service, and ejabberd spreads her stanzas over both.
    let mut alice = alice_finds_and_registers(&server).await;
    for _ in 0..20 {
        let reply = alice
            .iq(&format!(
                "<iq type='get' id='{}' to='{D}'><query xmlns='http://jabber.org/protocol/disco#info'/></iq>",
                new_id()
            ))
            .await;
        assert_eq!(reply.attr("type"), Some("result"));
    }
    let (read1, read2) = (inbound_stanzas(&reach1), inbound_stanzas(&reach2));
    assert!(
        read1 > 0 && read2 > 0,
        "ejabberd sent stanzas to one instance only: {read1} and {read2}"
    );

    // A buddy's message reaches her.
    let mut bob = Client::connect(&server, "bob", "bobpw", "pc").await;
    support::wait_for_component(&mut bob, D).await;
    bob.presence("").await;
    bob_reaches_alice(&mut bob, &mut alice, "Hello Alice, from either instance").await;

    // Admin commands beside the running instances.
    let counts = stats(&dir1.path().join("reach.toml"));
    assert_eq!(count_of(&counts, "users"), Some(1), "{counts}");
    let said = check_config("instances-reach", &base);
    assert!(said.contains("schema version 1"), "{said}");

    // The first instance dies: the other takes over what it left, and carries everything.
    reach1.kill();
    let killed = Instant::now();
    let deadline = killed + T;
    loop {
        let log = reach2.log();
        if log
            .lines()
            .any(|l| l.contains("took over what a stopped instance left") && l.contains(&host))
        {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "reach-2 did not take over '{host}' within {T:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let takeover = killed.elapsed();
    assert!(
        takeover < Duration::from_secs(11),
        "took over after {takeover:?}"
    );
    bob_reaches_alice(&mut bob, &mut alice, "Still there?").await;

    // Reply mail goes to the instance left: the doc's transport lists both listeners, the
    // first (the killed instance) refuses connections, Postfix goes on to the second, which
    // answers for itself (an unknown reply alias: 550 at RCPT).
    let mut postfix = Postfix::new();
    let etc = format!("{}/", postfix.config_dir().display());
    let transport = site(&fill(
        &fill(
            &block("instances", "instances-postfix-transport"),
            "[10.0.0.11]:2525",
            &format!("[127.0.0.1]:{}", smtp[0]),
        ),
        "[10.0.0.12]:2525",
        &format!("[127.0.0.1]:{}", smtp[1]),
    ));
    postfix.write_file("transport", &transport);
    let inbound = site(&fill(
        &block("postfix", "postfix-inbound"),
        "/etc/postfix/",
        &etc,
    ));
    postfix.write_main_cf(&format!(
        "# docs/postfix.md, reach-doc=postfix-inbound\n{inbound}\n"
    ));
    postfix.postmap("transport");
    postfix.start().await;
    let alias = format!("r-{}@{D}", "a".repeat(26));
    let mail = format!(
        "From: Someone <someone@mail.example>\nTo: {alias}\nSubject: Re: IM\n\
         Message-ID: <m1@mail.example>\n\nA reply for an alias no instance knows\n"
    );
    let submitted = submit(
        postfix.outside_port(),
        "someone@mail.example",
        &[&alias],
        &mail,
    )
    .await;
    assert_eq!(submitted.outcome().0, 250, "Postfix: {submitted:?}");
    let first = postfix
        .wait_for_log(
            &[
                &format!("connect to 127.0.0.1[127.0.0.1]:{}", smtp[0]),
                "Connection refused",
            ],
            T,
        )
        .await;
    assert!(first.is_some(), "{}", postfix.logs());
    let second = postfix
        .wait_for_log(
            &[
                &format!("relay=127.0.0.1[127.0.0.1]:{}", smtp[1]),
                "said: 550",
            ],
            T,
        )
        .await;
    assert!(second.is_some(), "{}", postfix.logs());
    postfix.stop().await;
    eprintln!(
        "two instances from docs/instances.md: took over {} ms after the kill; whole test {} s",
        takeover.as_millis(),
        began.elapsed().as_secs()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_doc_moves_an_embedded_store_into_postgresql_and_back() {
    let began = Instant::now();
    let server = Server::start(ServerKind::Prosody).await;
    for user in ["alice", "bob"] {
        server.register(user, &format!("{user}pw")).await;
    }

    // A Reach on the embedded store (`path`): Alice and Bob register; Reach stops; the admin
    // purges Bob, which leaves stanzas in the stopped Reach's outbox.
    let sled_dir = tempfile::tempdir().unwrap();
    let sled_config = sled_dir.path().join("reach.toml");
    let mut reach = Reach::start(&server, sled_dir.path()).await;
    let logs = Logs::new(&reach, vec![]);
    let mut alice = alice_finds_and_registers(&server).await;
    let mut bob = Client::connect(&server, "bob", "bobpw", "pc").await;
    support::wait_for_component(&mut bob, D).await;
    bob.presence("").await;
    let ok = bob
        .iq(&format!(
            "<iq type='set' id='{}' to='{D}'><query xmlns='jabber:iq:register'><username>bob</username></query></iq>",
            new_id()
        ))
        .await;
    assert_eq!(ok.attr("type"), Some("result"), "{}", String::from(&ok));
    assert!(reach.stop().await.success());
    drop(logs);
    let (ok, out, err) = reach_cli(&[
        "purge".as_ref(),
        "--config".as_ref(),
        sled_config.as_os_str(),
        "bob@localhost".as_ref(),
    ]);
    assert!(ok, "reach purge: {out}{err}");
    let before = stats(&sled_config);
    assert_eq!(count_of(&before, "users"), Some(1), "{before}");
    let queued = count_of(&before, "outbox").unwrap_or(0);
    assert!(queued > 0, "the purge queued nothing: {before}");

    // The doc's lines, as written: stats, then migrate into the new database.
    let db = DocDatabase::set_up().await;
    let lines = reach_lines("instances", "instances-migrate");
    assert_eq!(lines.len(), 2, "stats and migrate: {lines:?}");
    let mut copied = String::new();
    for words in &lines {
        let args: Vec<String> = words
            .iter()
            .map(|w| match w.as_str() {
                "/etc/reach/config.toml" => sled_config.display().to_string(),
                "/etc/reach/database-password" => db.password_file.display().to_string(),
                w if w.starts_with("postgres://") => {
                    assert!(
                        !w.contains(DB_PASSWORD),
                        "a password in the doc's --to URL: {w}"
                    );
                    db.local(w)
                }
                w => w.to_owned(),
            })
            .collect();
        let (ok, out, err) = reach_cli(&args);
        assert!(ok, "reach {}: {out}{err}", words.join(" "));
        if words[0] == "stats" {
            assert_eq!(out, before, "the doc's stats line");
        } else {
            assert_eq!(words[0], "migrate");
            copied = out;
        }
    }
    assert!(copied.contains("every tree checked"), "{copied}");
    assert!(
        !copied.contains(DB_PASSWORD),
        "the password is printed: {copied}"
    );
    assert_eq!(count_of(&copied, "users"), Some(1), "{copied}");
    assert_eq!(count_of(&copied, "stanza_outbox"), Some(queued), "{copied}");

    // The switch: the doc's Reach block, on this server. `reach stats` shows what the old
    // store held; a Reach started on it knows Alice, and sends what the old outbox held.
    let pg_dir = tempfile::tempdir().unwrap();
    let pg_text = db.reach_config(
        &server.component_addr(),
        Some(server.secret()),
        &db.password_file,
    );
    check_config("instances-reach", &pg_text);
    let pg_config = pg_dir.path().join("reach.toml");
    std::fs::write(&pg_config, &pg_text).unwrap();
    assert_eq!(stats(&pg_config), before, "the counts after the move");
    let mut reach = Reach::start_config(pg_dir.path(), &pg_text).await;
    let _logs = Logs::new(&reach, vec![]);
    assert!(reach.wait_for_log("component link up", T).await);
    let form = alice
        .iq(&format!(
            "<iq type='get' id='{}' to='{D}'><query xmlns='jabber:iq:register'/></iq>",
            new_id()
        ))
        .await;
    let query = form.get_child("query", "jabber:iq:register");
    assert!(
        query.is_some_and(|q| q.has_child("registered", "jabber:iq:register")),
        "Alice is not registered after the move: {}",
        String::from(&form)
    );
    bob_reaches_alice(&mut bob, &mut alice, "Hello from the moved store").await;
    let deadline = Instant::now() + T;
    loop {
        let now = stats(&pg_config);
        if count_of(&now, "outbox") == Some(0) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the old outbox was not sent: {now}\n{}",
            reach.log()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        reach
            .log()
            .contains("took over what a stopped instance left"),
        "{}",
        reach.log()
    );
    assert!(reach.stop().await.success());

    // A backup and a restore into a new database, as the doc writes them: the restored
    // database holds the same, and its objects belong to the role.
    let on_postgresql = stats(&pg_config);
    let dump = pg_dir.path().join("reach.dump");
    assert_eq!(db.run_superuser_lines("instances-backup", &dump), 1);
    assert!(std::fs::metadata(&dump).unwrap().len() > 0);
    assert_eq!(db.run_superuser_lines("instances-restore", &dump), 3);
    assert_eq!(stats(&pg_config), on_postgresql, "after the restore");
    let owners = db.pg.psql(
        "reach",
        "SELECT string_agg(DISTINCT pg_get_userbyid(relowner), ',') FROM pg_class \
         WHERE relname LIKE 'reach\\_%' AND relkind IN ('r', 'S')",
    );
    assert_eq!(owners, "reach", "owners of the restored tables");

    // And back, as the doc writes it, into a new folder.
    let back = tempfile::tempdir().unwrap();
    // An empty folder, as `install -d` leaves it.
    let back_store = back.path().join("store");
    std::fs::create_dir(&back_store).unwrap();
    let lines = reach_lines("instances", "instances-migrate-back");
    assert_eq!(lines.len(), 1, "migrate: {lines:?}");
    let args: Vec<String> = lines[0]
        .iter()
        .map(|w| match w.as_str() {
            "/etc/reach/config.toml" => pg_config.display().to_string(),
            "sled:///var/lib/reach" => format!("sled://{}", back_store.display()),
            w => w.to_owned(),
        })
        .collect();
    let (ok, out, err) = reach_cli(&args);
    assert!(ok, "reach {}: {out}{err}", lines[0].join(" "));
    assert!(out.contains("every tree checked"), "{out}");
    let sled_back = back.path().join("reach.toml");
    std::fs::write(
        &sled_back,
        fill(
            &Reach::config(&server, back.path()),
            &format!("path = {:?}", back_store.display().to_string()),
            &format!("url = {:?}", format!("sled://{}", back_store.display())),
        ),
    )
    .unwrap();
    let after = stats(&sled_back);
    assert_eq!(count_of(&after, "users"), Some(1), "{after}");
    eprintln!(
        "docs/instances.md's migration, there and back: {} s",
        began.elapsed().as_secs()
    );
}

// ---- Reach's own config blocks -------------------------------------------------------------

#[test]
fn every_reach_block_in_the_docs_passes_check_config() {
    // As written (example.org, /var/lib/reach), alone and all together.
    let prosody = block("prosody", "prosody-reach");
    let ejabberd = block("ejabberd", "ejabberd-reach");
    let sms = block("kannel", "kannel-reach");
    let email = block("postfix", "postfix-reach");
    let integrated = block("integrated-mode", "integrated-reach");
    check_config("prosody-reach", &prosody);
    check_config("ejabberd-reach", &ejabberd);
    check_config("integrated-reach", &format!("{prosody}\n{integrated}"));
    check_config("kannel-reach", &format!("{prosody}\n{sms}"));
    check_config("postfix-reach", &format!("{prosody}\n{email}"));
    let said = check_config("all", &format!("{ejabberd}\n{email}\n{sms}"));
    assert!(!said.contains("CHANGE-ME"), "secret printed: {said}");
}

#[test]
fn every_marked_block_is_exercised_and_markers_are_unique() {
    for (doc, used) in EXERCISED {
        let markers: Vec<String> = marked_blocks(doc).into_iter().map(|(m, _)| m).collect();
        let mut sorted = markers.clone();
        sorted.sort();
        sorted.dedup();
        assert_eq!(sorted.len(), markers.len(), "duplicate marker in {doc}.md");
        let mut expected: Vec<String> = used.iter().map(|s| s.to_string()).collect();
        expected.sort();
        assert_eq!(
            sorted, expected,
            "docs/{doc}.md's marked blocks and the ones tests/admin_docs.rs runs differ"
        );
    }
}

// ---- the systemd unit ----------------------------------------------------------------------

const UNIT: &str = "contrib/systemd/reach.service";

fn unit_values(key: &str) -> Vec<String> {
    unit_values_of(UNIT, key)
}

/// The values of `key=` in the unit file `unit` (relative to the repository).
fn unit_values_of(unit: &str, key: &str) -> Vec<String> {
    let text = std::fs::read_to_string(format!("{ROOT}/{unit}")).expect("read the unit");
    text.lines()
        .filter_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(str::to_owned)
        .collect()
}

/// A unit command line with the installed paths replaced by the built binary and `config`.
fn unit_command(line: &str, config: &Path) -> Command {
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        words.first(),
        Some(&"/usr/local/bin/reach"),
        "the unit runs /usr/local/bin/reach (README: cargo install): {line}"
    );
    let mut cmd = Command::new(reach_bin());
    for word in &words[1..] {
        if *word == "/etc/reach/config.toml" {
            cmd.arg(config);
        } else {
            cmd.arg(word);
        }
    }
    cmd
}

/// config.toml.example made runnable here: free ports, the store in `dir`.
fn runnable_example(dir: &Path) -> PathBuf {
    let example = std::fs::read_to_string(format!("{ROOT}/config.toml.example")).unwrap();
    let mut text = fill(
        &example,
        "url = \"sled:///var/lib/reach\"",
        &format!("url = \"sled://{}\"", dir.join("store").display()),
    );
    for port in ["5347", "2525", "8088", "13013"] {
        text = fill(
            &text,
            &format!("127.0.0.1:{port}"),
            &format!("127.0.0.1:{}", support::free_port()),
        );
    }
    let path = dir.join("config.toml");
    std::fs::write(&path, text).unwrap();
    path
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_systemd_unit_runs_the_real_cli() {
    let pre = unit_values("ExecStartPre");
    let start = unit_values("ExecStart");
    assert_eq!(pre.len(), 1, "one ExecStartPre");
    assert_eq!(start.len(), 1, "one ExecStart");
    assert!(
        start[0].ends_with("--config /etc/reach/config.toml"),
        "{start:?}"
    );
    // The store the example config names is the unit's StateDirectory.
    let state_dir = unit_values("StateDirectory");
    let example = std::fs::read_to_string(format!("{ROOT}/config.toml.example")).unwrap();
    assert!(
        example.contains(&format!("url = \"sled:///var/lib/{}\"", state_dir[0])),
        "config.toml.example's [store] url is not sled:///var/lib/{}",
        state_dir[0]
    );

    let dir = tempfile::tempdir().unwrap();
    // ExecStartPre, on the example as shipped: accepted, secret not shown.
    let example_path = PathBuf::from(format!("{ROOT}/config.toml.example"));
    let out = unit_command(&pre[0], &example_path)
        .output()
        .expect("run ExecStartPre");
    assert!(
        out.status.success(),
        "ExecStartPre failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // ExecStartPre on a broken file fails, so systemd would not start Reach.
    let broken = dir.path().join("broken.toml");
    std::fs::write(
        &broken,
        example.replace("[users]", "[users]\nallowed_domain = [\"x\"]"),
    )
    .unwrap();
    assert!(!unit_command(&pre[0], &broken).status().unwrap().success());

    // ExecStart on the example (ports and store moved here): it runs until SIGTERM, then
    // exits 0, which Restart=on-failure leaves alone.
    let config = runnable_example(dir.path());
    let log = dir.path().join("reach.log");
    let (out, err) = support::process::append_log(&log);
    let mut child = unit_command(&start[0], &config)
        .stdout(out)
        .stderr(err)
        .spawn()
        .expect("run ExecStart");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "ExecStart exited early:\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    let status = support::process::terminate(&mut child, Duration::from_secs(10)).await;
    assert!(
        status.success(),
        "SIGTERM should stop Reach cleanly ({status}):\n{}",
        std::fs::read_to_string(&log).unwrap_or_default()
    );
}

/// `systemd-analyze verify` when the machine has it (it is not required: containers and CI
/// images often lack it). The unit's binary path is pointed at the built binary first, since
/// verify insists that ExecStart exists.
#[test]
fn the_systemd_unit_passes_systemd_analyze_verify_when_available() {
    verify_unit(UNIT, "reach.service", "reach.service");
}

/// The template, and an instance of it (`%i` expanded), the same way.
#[test]
fn the_template_unit_passes_systemd_analyze_verify_when_available() {
    verify_unit(TEMPLATE_UNIT, "reach@.service", "reach@.service");
    verify_unit(TEMPLATE_UNIT, "reach@.service", "reach@reach-1.service");
}

/// Writes `unit` as `file_name` into a temporary folder and verifies `verify_name` there.
fn verify_unit(unit: &str, file_name: &str, verify_name: &str) {
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not installed: unit syntax not verified by systemd");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(format!("{ROOT}/{unit}"))
        .unwrap()
        .replace("/usr/local/bin/reach", reach_bin());
    std::fs::write(dir.path().join(file_name), text).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join(verify_name))
        .output()
        .expect("run systemd-analyze verify");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Lines about the unit itself are its problems; others (e.g. the machine's own units, or
    // no running systemd) are not.
    let own: Vec<&str> = said
        .lines()
        .filter(|l| l.contains(file_name) || l.contains(verify_name))
        .collect();
    assert!(
        own.is_empty(),
        "systemd-analyze verify {verify_name}:\n{said}"
    );
}

// ---- the template unit (several instances on one host) ---------------------------------------

const TEMPLATE_UNIT: &str = "contrib/systemd/reach@.service";

/// A command line of the template unit for instance `instance`, as systemd would run it: `%i`
/// expanded, the installed binary replaced by the built one, `/etc/reach/FILE` by `dir/FILE`, and
/// the unit's `Environment=` set.
fn template_command(line: &str, instance: &str, dir: &Path) -> Command {
    let line = line.replace("%i", instance);
    let words: Vec<&str> = line.split_whitespace().collect();
    assert_eq!(
        words.first(),
        Some(&"/usr/local/bin/reach"),
        "the unit runs /usr/local/bin/reach (README: cargo install): {line}"
    );
    let mut cmd = Command::new(reach_bin());
    for word in &words[1..] {
        match word.strip_prefix("/etc/reach/") {
            Some(file) => cmd.arg(dir.join(file)),
            None => cmd.arg(word),
        };
    }
    for assignment in unit_values_of(TEMPLATE_UNIT, "Environment") {
        let assignment = assignment.replace("%i", instance);
        let (key, value) = assignment.split_once('=').expect("Environment=KEY=VALUE");
        cmd.env(key, value);
    }
    cmd.env("RUST_LOG", "info");
    cmd
}

/// A child process killed and reaped when dropped, so that a failing test leaves none running.
struct KilledOnDrop(std::process::Child);

impl Drop for KilledOnDrop {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_template_unit_runs_instances_by_name() {
    let pre = unit_values_of(TEMPLATE_UNIT, "ExecStartPre");
    let start = unit_values_of(TEMPLATE_UNIT, "ExecStart");
    assert_eq!(pre.len(), 1, "one ExecStartPre");
    assert_eq!(start.len(), 1, "one ExecStart");
    assert!(
        start[0].ends_with("--config /etc/reach/%i.toml"),
        "{start:?}"
    );
    assert_eq!(
        unit_values_of(TEMPLATE_UNIT, "Environment"),
        ["REACH_INSTANCE=%i"]
    );
    // Consistent with reach.service: the same user, start, stop and restart policy, and every
    // hardening line; no state folder (the store is in PostgreSQL).
    for key in [
        "Type",
        "User",
        "Group",
        "KillSignal",
        "TimeoutStopSec",
        "Restart",
        "RestartSec",
        "UMask",
        "LimitNOFILE",
        "WantedBy",
    ] {
        assert_eq!(
            unit_values_of(TEMPLATE_UNIT, key),
            unit_values(key),
            "{key}="
        );
    }
    let single = std::fs::read_to_string(format!("{ROOT}/{UNIT}")).unwrap();
    let template = std::fs::read_to_string(format!("{ROOT}/{TEMPLATE_UNIT}")).unwrap();
    let hardening: Vec<&str> = single
        .lines()
        .skip_while(|l| !l.starts_with("NoNewPrivileges="))
        .take_while(|l| !l.trim().is_empty())
        .collect();
    assert!(hardening.len() > 20, "{hardening:?}");
    for line in hardening {
        assert!(
            template.lines().any(|t| t == line),
            "reach@.service lacks reach.service's {line}"
        );
    }
    assert!(unit_values_of(TEMPLATE_UNIT, "StateDirectory").is_empty());

    // Two instances on one host: one config file each, one database.
    let pg = tokio::task::spawn_blocking(PgCluster::shared)
        .await
        .unwrap();
    let url = pg.create_database();
    let dir = tempfile::tempdir().unwrap();
    for name in ["reach-1", "reach-2"] {
        std::fs::write(
            dir.path().join(format!("{name}.toml")),
            format!(
                "[component]\ndomain = \"{D}\"\nserver = \"127.0.0.1:{}\"\nsecret = \"s3cret\"\n\n\
                 [users]\nallowed_domains = [\"localhost\"]\n\n[store]\nurl = \"{url}\"\n\n\
                 [metrics]\nlisten = \"127.0.0.1:{}\"\n",
                support::free_port(),
                support::free_port()
            ),
        )
        .unwrap();
    }

    // ExecStartPre: the check connects to the database and names the instance.
    let out = template_command(&pre[0], "reach-1", dir.path())
        .output()
        .expect("run ExecStartPre");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "ExecStartPre failed: {said}");
    assert!(said.contains("this one is \"reach-1\""), "{said}");
    assert!(said.contains("The database answers: PostgreSQL"), "{said}");

    // ExecStart, for each instance: both run, each under its unit's name.
    let mut running = Vec::new();
    for name in ["reach-1", "reach-2"] {
        let log = dir.path().join(format!("{name}.log"));
        let (out, err) = support::process::append_log(&log);
        let child = template_command(&start[0], name, dir.path())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("run ExecStart");
        running.push((name, KilledOnDrop(child), log));
    }
    for (name, child, log) in &mut running {
        let deadline = Instant::now() + T;
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            // The runtime's line: `store open engine=... instance=...`.
            if let Some(line) = text
                .lines()
                .find(|l| l.contains("store open") && l.contains("instance"))
            {
                assert!(line.contains(*name), "{name}: {line}");
                break;
            }
            assert!(
                child.0.try_wait().unwrap().is_none(),
                "{name} exited:\n{text}"
            );
            assert!(
                Instant::now() < deadline,
                "{name} did not open its store:\n{text}"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    // A second reach@reach-1 is refused, and says why.
    let log = dir.path().join("reach-1-again.log");
    let (out, err) = support::process::append_log(&log);
    let mut again = KilledOnDrop(
        template_command(&start[0], "reach-1", dir.path())
            .stdout(out)
            .stderr(err)
            .spawn()
            .expect("run ExecStart again"),
    );
    let status = support::process::wait_child(&mut again.0, T).await;
    let text = std::fs::read_to_string(&log).unwrap_or_default();
    assert!(
        status.is_some_and(|s| !s.success()),
        "a second reach-1 ran ({status:?}):\n{text}"
    );
    assert!(
        text.contains("instance 'reach-1' is already running"),
        "{text}"
    );

    // SIGTERM stops each cleanly (status 0, which Restart=on-failure leaves alone).
    for (name, child, log) in &mut running {
        let status = support::process::terminate(&mut child.0, Duration::from_secs(10)).await;
        assert!(
            status.success(),
            "{name} on SIGTERM ({status}):\n{}",
            std::fs::read_to_string(&log).unwrap_or_default()
        );
    }
}
