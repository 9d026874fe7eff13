//! The admin guides are run, not only read. Every config block in `docs/*.md` that is marked
//! with an info string `reach-doc=NAME` (```` ```lua reach-doc=prosody-component ````) is taken
//! from the doc as written, given free ports and temporary folders, and run by a real server
//! with the built `reach` behind it:
//!
//! | doc | blocks | what runs |
//! |---|---|---|
//! | prosody.md | prosody-global, prosody-component, prosody-reach | Prosody + Reach; a user finds Reach and registers |
//! | ejabberd.md | ejabberd-listener, ejabberd-reach | ejabberd + Reach; the same |
//! | kannel.md | kannel-core, kannel-smsbox, kannel-sendsms-user, kannel-sms-service, kannel-reach | Kannel (fake SMSC) + Reach + Prosody; code to the phone, code back, delivery report as receipt |
//! | postfix.md | postfix-inbound, postfix-transport, postfix-outbound, postfix-reach | Postfix + Reach + Prosody + a mail sink; mail out through Postfix, the reply in through Postfix |
//!
//! The docs' site is `example.org` (Reach at `reach.example.org`); the tests' servers serve
//! `localhost`, so `example.org` becomes `localhost` everywhere. The docs' default ports
//! (5347, 13013, 8088, 25, 2525) and paths (`/etc/postfix/`, `/var/spool/kannel`,
//! `/var/lib/reach`) become free ports and temporary folders; each replacement insists that the
//! doc still contains what it replaces, so a doc that drifts fails here. Every Reach block also
//! passes `reach check-config`, and the systemd unit in `contrib/` runs the real CLI.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use support::kannel::{Handset, Kannel};
use support::mail::{submit, MailSink, SinkMail};
use support::postfix::Postfix;
use support::{body, escape, new_id, Client, Reach, Server, ServerKind};

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prosody_doc_plugs_reach_in() {
    // A Prosody from tests/servers gives the ports and folder; its config is then replaced by
    // the site config built from the doc, and it starts again.
    let mut server = Server::start(ServerKind::Prosody).await;
    server.stop().await;
    let config_path = server.dir().join("prosody.cfg.lua");
    std::fs::write(&config_path, prosody_config(&server)).unwrap();

    // Prosody's own checker finds nothing misplaced (a component port under a VirtualHost).
    let check = Command::new("prosodyctl")
        .arg("--config")
        .arg(&config_path)
        .args(["check", "config"])
        .output()
        .expect("run prosodyctl check config");
    let said = String::from_utf8_lossy(&check.stdout).into_owned();
    assert!(
        !said.contains("that should be") && !said.contains("deprecated"),
        "prosodyctl check config:\n{said}"
    );

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

// ---- ejabberd ------------------------------------------------------------------------------

/// An existing ejabberd site (users on `localhost`, c2s on loopback) with the doc's listener
/// added to its `listen:` list.
fn ejabberd_config(server: &Server) -> String {
    let listener = site(&fill(
        &block("ejabberd", "ejabberd-listener"),
        "port: 5347",
        &format!("port: {}", server.component_port()),
    ));
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
         # ---- docs/ejabberd.md, reach-doc=ejabberd-listener ----\n\
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
    let ok = alice
        .iq(&format!(
            "<iq type='set' id='reg' to='{D}'><query xmlns='jabber:iq:register'><username>alice</username><email>{ALICE_MAIL}</email></query></iq>"
        ))
        .await;
    assert_eq!(ok.attr("type"), Some("result"), "{}", String::from(&ok));
    let mails = sink.wait_for(1, T).await;
    assert!(
        postfix
            .wait_for_log(&["from=<reach@reach.localhost>"], T)
            .await
            .is_some(),
        "Reach's mail did not go through Postfix\n{}",
        postfix.logs()
    );
    let subject = mails[0].header("Subject").unwrap_or_default();
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

// ---- Reach's own config blocks -------------------------------------------------------------

#[test]
fn every_reach_block_in_the_docs_passes_check_config() {
    // As written (example.org, /var/lib/reach), alone and all together.
    let prosody = block("prosody", "prosody-reach");
    let ejabberd = block("ejabberd", "ejabberd-reach");
    let sms = block("kannel", "kannel-reach");
    let email = block("postfix", "postfix-reach");
    check_config("prosody-reach", &prosody);
    check_config("ejabberd-reach", &ejabberd);
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
    let text = std::fs::read_to_string(format!("{ROOT}/{UNIT}")).expect("read the unit");
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
    let mut text = example.replace(
        "path = \"/var/lib/reach\"",
        &format!("path = {:?}", dir.join("store").display().to_string()),
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
        example.contains(&format!("path = \"/var/lib/{}\"", state_dir[0])),
        "config.toml.example's [store] path is not /var/lib/{}",
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
    if Command::new("systemd-analyze")
        .arg("--version")
        .output()
        .is_err()
    {
        eprintln!("systemd-analyze not installed: unit syntax not verified by systemd");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let unit = std::fs::read_to_string(format!("{ROOT}/{UNIT}"))
        .unwrap()
        .replace("/usr/local/bin/reach", reach_bin());
    let path = dir.path().join("reach.service");
    std::fs::write(&path, unit).unwrap();
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("run systemd-analyze verify");
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    // Lines about reach.service itself are the unit's problems; others (e.g. the machine's own
    // units, or no running systemd) are not.
    let own: Vec<&str> = said
        .lines()
        .filter(|l| l.contains("reach.service"))
        .collect();
    assert!(own.is_empty(), "systemd-analyze verify:\n{said}");
}
