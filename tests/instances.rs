//! Several Reach instances behind one ejabberd, on one PostgreSQL database (issue 12), as user
//! stories: the built `reach` run two or three times under distinct `[store] instance` names,
//! against a real ejabberd 23.01 (which spreads the stanzas for the component domain over the
//! instances' connections at random), a real PostgreSQL (`PgCluster`), the aiosmtpd relay and a
//! real Kannel with its fake SMSC. A site's load balancer "behind the same names" is
//! `support::balancer`: one SMTP port and one webhook URL in front of every instance.
//!
//! Each instance has its own state folder (config, log), SMTP listener port and webhook port;
//! all use the same component domain and secret. Which instance handled a stanza is read from
//! its debug log (`RUST_LOG=reach=debug`): the link logs every stanza it reads as
//! `inbound stanza` with the stanza's id; an email handed to the relay is `email handed over`,
//! an SMS from Kannel `SMS webhook: incoming SMS`, a takeover `took over what a stopped
//! instance left`.
//!
//! Measured figures (reordering, takeover delay) are printed with `--nocapture`; see
//! RELIABILITY.md, "Several instances on PostgreSQL". The tests marked `ignore` show bugs found
//! in Reach: they fail until it is fixed.

mod support;

use std::sync::Arc;
use std::time::{Duration, Instant};

use support::balancer::{Balancer, Mode};
use support::kannel::{Handset, Kannel, Mt};
use support::mail::{submit, MailSink, SinkMail};
use support::postgres::PgCluster;
use support::{attr, body, Client, Element, Reach, Server, ServerKind, StoreAt};

const D: &str = "reach.localhost";
const T: Duration = Duration::from_secs(20);
const ALICE_MAIL: &str = "alice@mail.example";
const PHONE: &str = "+15551234567";
const SERVICE_NUMBER: &str = "+15550000000";
const SECRET: &str = "instancesecret7";
/// Bob's per-session JID at Alice's client.
const BOB_SESSION: &str = "bob\\40localhost@reach.localhost";

// ---- one Reach instance ----

/// A `reach` process under one instance name, with its own folder and ports; it can be killed
/// and started again under the same name.
struct Instance {
    name: String,
    dir: tempfile::TempDir,
    config: String,
    reach: Reach,
    smtp_port: u16,
    /// Length of the log when the running process started: what it wrote is after this.
    log_from: usize,
}

impl Instance {
    /// Everything every process of this instance wrote, colours removed.
    fn log_all(&self) -> String {
        strip_ansi(&self.reach.log())
    }

    /// What the running (or last) process wrote.
    fn log(&self) -> String {
        let all = self.reach.log();
        strip_ansi(all.get(self.log_from..).unwrap_or(""))
    }

    fn kill(&mut self) {
        self.reach.kill();
    }

    async fn start_again(&mut self) {
        self.log_from = self.reach.log().len();
        self.reach = Reach::start_config(self.dir.path(), &self.config).await;
    }

    async fn wait_for_log(&self, needle: &str, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        loop {
            if self.log().contains(needle) {
                return true;
            }
            if Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Waits until the running process has its component link up.
    async fn wait_link_up(&self) {
        assert!(
            self.wait_for_log("component link up", T).await,
            "instance {}: no component link within {T:?}\n{}",
            self.name,
            tail(&self.log(), 40)
        );
    }
}

/// Text without ANSI colour sequences (Reach logs in colour to its log file).
fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

fn tail(text: &str, lines: usize) -> String {
    let all: Vec<&str> = text.lines().collect();
    all[all.len().saturating_sub(lines)..].join("\n")
}

/// How many lines of `log` contain `what`.
fn count_lines(log: &str, what: &str) -> usize {
    log.lines().filter(|l| l.contains(what)).count()
}

/// How many of the stanza ids in `ids` the link of this log read (its `inbound stanza` lines).
fn inbound_ids(log: &str, ids: &[String]) -> usize {
    let wanted: std::collections::HashSet<String> =
        ids.iter().map(|id| format!("\"{id}\"")).collect();
    log.lines()
        .filter(|l| l.contains("inbound stanza"))
        .filter(|l| wanted.iter().any(|w| l.contains(w.as_str())))
        .count()
}

/// Words of `text` that look like `PREFIX-DIGITS`.
fn tokens(text: &str, prefix: &str) -> Vec<String> {
    text.split(|c: char| !(c.is_ascii_alphanumeric() || c == '-'))
        .filter(|w| {
            w.strip_prefix(prefix)
                .and_then(|r| r.strip_prefix('-'))
                .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(str::to_owned)
        .collect()
}

/// Reordering of a sequence of arrivals (numbers in the order they were sent): how many arrived
/// after one sent later ("late"), and the largest such distance.
fn reordering(arrivals: &[u64]) -> (usize, u64) {
    let mut highest = None::<u64>;
    let (mut late, mut farthest) = (0, 0);
    for &n in arrivals {
        match highest {
            Some(h) if n < h => {
                late += 1;
                farthest = farthest.max(h - n);
            }
            _ => highest = Some(n),
        }
    }
    (late, farthest)
}

// ---- the site: ejabberd, PostgreSQL, the instances and their doors ----

#[derive(Default)]
struct Options {
    instances: usize,
    email: bool,
    sms: bool,
    /// The first instance reaches ejabberd through a forwarder the test can cut.
    cuttable_link: bool,
    /// The first instance reaches the mail relay through a forwarder that can swallow.
    cuttable_relay: bool,
    digest_secs: u64,
}

struct Site {
    server: Server,
    pg: Arc<PgCluster>,
    url: String,
    instances: Vec<Instance>,
    sink: Option<MailSink>,
    kannel: Option<Kannel>,
    phone: Option<Handset>,
    /// One SMTP port in front of every instance's listener.
    smtp: Option<Balancer>,
    /// One webhook address (Kannel's get-url and dlr-url) in front of every instance's webhook.
    webhook: Option<Balancer>,
    /// Between the first instance and ejabberd (with `cuttable_link`).
    link_cut: Option<Balancer>,
    /// Between the first instance and the relay (with `cuttable_relay`).
    relay_cut: Option<Balancer>,
}

impl Drop for Site {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let keep = std::env::temp_dir().join(format!(
                "reach-instances-{}-{}",
                std::process::id(),
                std::thread::current().name().unwrap_or("test")
            ));
            let _ = std::fs::create_dir_all(&keep);
            for i in &self.instances {
                eprintln!(
                    "--- instance {} (tail) ---\n{}",
                    i.name,
                    tail(&i.log_all(), 60)
                );
                let _ = std::fs::write(keep.join(format!("reach-{}.log", i.name)), i.log_all());
            }
            let _ = std::fs::write(keep.join("ejabberd.log"), self.server.log());
            eprintln!("logs kept in {}", keep.display());
            if let Some(k) = &self.kannel {
                eprintln!("--- kannel ---\n{}", k.logs(20));
            }
            eprintln!("--- ejabberd ---\n{}", self.server.log_tail(20));
        }
    }
}

const NAMES: [&str; 3] = ["a", "b", "c"];

impl Site {
    async fn new(o: Options) -> Site {
        let pg = PgCluster::shared();
        let url = pg.create_database();
        let server = Server::start(ServerKind::Ejabberd).await;
        for user in ["alice", "bob"] {
            server.register(user, &format!("{user}pw")).await;
        }
        let n = o.instances;
        let smtp_ports: Vec<u16> = (0..n).map(|_| support::free_port()).collect();
        let webhook_ports: Vec<u16> = (0..n).map(|_| support::free_port()).collect();
        let sink = if o.email {
            Some(MailSink::start().await)
        } else {
            None
        };
        let smtp = if o.email {
            Some(Balancer::on_ports(&smtp_ports).await)
        } else {
            None
        };
        let webhook = if o.sms {
            Some(Balancer::on_ports(&webhook_ports).await)
        } else {
            None
        };
        let (kannel, phone) = match &webhook {
            Some(w) => {
                let kannel = Kannel::start(&format!(
                    "http://127.0.0.1:{}/sms/mo?secret={SECRET}",
                    w.port()
                ))
                .await;
                let phone = Handset::connect(&kannel).await;
                (Some(kannel), Some(phone))
            }
            None => (None, None),
        };
        let link_cut = if o.cuttable_link {
            Some(Balancer::on_ports(&[server.component_port()]).await)
        } else {
            None
        };
        let relay_cut = match (&sink, o.cuttable_relay) {
            (Some(sink), true) => Some(Balancer::on_ports(&[sink.port]).await),
            _ => None,
        };
        let mut instances = Vec::new();
        for i in 0..n {
            let dir = tempfile::Builder::new()
                .prefix(&format!("reach-instance-{}-", NAMES[i]))
                .tempdir()
                .unwrap();
            let store = StoreAt::Postgres {
                url: url.clone(),
                instance: NAMES[i].to_owned(),
            };
            let mut config = Reach::config_at(&server, dir.path(), &store);
            if let (0, Some(cut)) = (i, &link_cut) {
                config = config.replace(&server.component_addr(), &cut.addr());
            }
            config.push_str(
                "\n[routing]\ngrace_delay_secs = 3\n\n[limits]\nemails_per_user_per_hour = 100000\n",
            );
            if let Some(sink) = &sink {
                let relay_port = match (i, &relay_cut) {
                    (0, Some(cut)) => cut.port(),
                    _ => sink.port,
                };
                config.push_str(&format!(
                    "\n[email]\nrelay = \"smtp://127.0.0.1:{relay_port}\"\nfrom_address = \"reach@{D}\"\n\
                     reply_domain = \"{D}\"\nlisten = \"127.0.0.1:{}\"\ndigest_window_secs = {}\n",
                    smtp_ports[i],
                    o.digest_secs.max(1)
                ));
            }
            if let (Some(kannel), Some(webhook)) = (&kannel, &webhook) {
                config.push_str(&format!(
                    "\n[sms]\nsendsms_url = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\nfrom = \"{SERVICE_NUMBER}\"\n\
                     webhook_listen = \"127.0.0.1:{}\"\nwebhook_url = \"http://127.0.0.1:{}\"\n\
                     webhook_secret = \"{SECRET}\"\ndaily_cap = 1000\nallowed_prefixes = [\"+1\"]\n",
                    kannel.sendsms_url(),
                    kannel.username(),
                    kannel.password(),
                    webhook_ports[i],
                    webhook.port()
                ));
            }
            let reach = Reach::start_config(dir.path(), &config).await;
            instances.push(Instance {
                name: NAMES[i].to_owned(),
                dir,
                config,
                reach,
                smtp_port: smtp_ports[i],
                log_from: 0,
            });
        }
        let site = Site {
            server,
            pg,
            url,
            instances,
            sink,
            kannel,
            phone,
            smtp,
            webhook,
            link_cut,
            relay_cut,
        };
        for i in &site.instances {
            i.wait_link_up().await;
        }
        site
    }

    /// Adds an instance (the next name) without email or SMS.
    async fn add_instance(&mut self) -> &Instance {
        let name = NAMES[self.instances.len()];
        let dir = tempfile::Builder::new()
            .prefix(&format!("reach-instance-{name}-"))
            .tempdir()
            .unwrap();
        let store = StoreAt::Postgres {
            url: self.url.clone(),
            instance: name.to_owned(),
        };
        let config = Reach::config_at(&self.server, dir.path(), &store);
        let reach = Reach::start_config(dir.path(), &config).await;
        self.instances.push(Instance {
            name: name.to_owned(),
            dir,
            config,
            reach,
            smtp_port: 0,
            log_from: 0,
        });
        let added = self.instances.last().unwrap();
        added.wait_link_up().await;
        added
    }

    async fn client(&self, user: &str, resource: &str) -> Client {
        let mut c = Client::connect(&self.server, user, &format!("{user}pw"), resource).await;
        support::wait_for_component(&mut c, D).await;
        c
    }

    fn sink(&self) -> &MailSink {
        self.sink.as_ref().expect("a site with email")
    }

    fn phone(&mut self) -> &mut Handset {
        self.phone.as_mut().expect("a site with SMS")
    }

    /// Alice logs in, registers (with the email address and phone number given), accepts
    /// Reach's subscription and verifies each terminal; she stays online.
    async fn alice_registers(&mut self, email: bool, phone: bool) -> Client {
        let mut alice = self.client("alice", "pc").await;
        alice.presence("").await;
        let mut fields = String::from("<username>alice</username>");
        if email {
            fields.push_str(&format!("<email>{ALICE_MAIL}</email>"));
        }
        if phone {
            fields.push_str(&format!("<phone>{PHONE}</phone>"));
        }
        let ok = alice
            .iq(&format!(
                "<iq type='set' id='reg' to='{D}'><query xmlns='jabber:iq:register'>{fields}</query></iq>"
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
        if email {
            let mail = self.sink().wait_for(1, T).await.remove(0);
            let subject = mail.header("Subject").unwrap();
            let code: String = subject.chars().filter(char::is_ascii_digit).collect();
            assert_eq!(code.len(), 6, "subject: {subject}");
            let said = say(&mut alice, &format!("verify {code}")).await;
            assert!(said.contains("is verified"), "{said}");
        }
        if phone {
            let deadline = Instant::now() + T;
            let code = loop {
                let left = deadline.saturating_duration_since(Instant::now());
                let mt = self.phone().recv_mt(left).await.expect("the phone's code");
                if let Some(code) = mt
                    .text
                    .split(|c: char| !c.is_ascii_digit())
                    .find(|w| w.len() == 6)
                {
                    break code.to_owned();
                }
            };
            self.phone().send_mo(PHONE, SERVICE_NUMBER, &code).await;
            alice
                .expect("the phone verified", T, |s| {
                    body(s).is_some_and(|b| b.contains("is verified"))
                })
                .await;
        }
        alice
    }

    /// Email and SMS counts of every instance's logs: (emails handed over, SMS webhook calls).
    fn door_counts(&self) -> Vec<(usize, usize)> {
        self.instances
            .iter()
            .map(|i| {
                let log = i.log_all();
                (
                    count_lines(&log, "email handed over"),
                    count_lines(&log, "SMS webhook: incoming SMS"),
                )
            })
            .collect()
    }

    /// How many stanzas wait in instance `name`'s outbox (read in the database).
    fn outbox_len(&self, name: &str) -> usize {
        let sql = format!(
            "SELECT count(*) FROM reach_records WHERE tree = 'stanza_outbox' \
             AND substring(key from 1 for {}) = '\\x{}00'::bytea",
            name.len() + 1,
            hex(name)
        );
        let db = self.url.rsplit('/').next().unwrap().to_owned();
        self.pg.psql(&db, &sql).trim().parse().unwrap_or(usize::MAX)
    }

    /// How many XMPP resources of users Reach records as online (read in the database).
    fn resources_of_users(&self) -> usize {
        let db = self.url.rsplit('/').next().unwrap().to_owned();
        self.pg
            .psql(
                &db,
                "SELECT count(*) FROM reach_records WHERE tree = 'resources'",
            )
            .trim()
            .parse()
            .unwrap_or(usize::MAX)
    }

    /// How many email jobs instance `name` holds claimed (read in the database).
    fn email_claims(&self, name: &str) -> usize {
        let sql = format!(
            "SELECT count(*) FROM reach_records WHERE tree = 'email_jobs' \
             AND convert_from(value, 'UTF8')::json->>'claimed_by' = '{name}'"
        );
        let db = self.url.rsplit('/').next().unwrap().to_owned();
        self.pg.psql(&db, &sql).trim().parse().unwrap_or(usize::MAX)
    }
}

fn hex(s: &str) -> String {
    s.bytes().map(|b| format!("{b:02x}")).collect()
}

/// A chat line to the service; returns its answer.
async fn say(client: &mut Client, line: &str) -> String {
    client
        .send(&format!(
            "<message type='chat' to='{D}'><body>{line}</body></message>"
        ))
        .await;
    let reply = client
        .expect(line, T, |s| {
            s.attr("from") == Some(D) && body(s).is_some_and(|b| !b.contains("on its way"))
        })
        .await;
    body(&reply).unwrap()
}

/// Bob sends `count` messages `PREFIX-1` … to alice@D, `gap` apart (none: back to back).
/// Returns their stanza ids.
async fn bob_sends(bob: &mut Client, prefix: &str, count: u64, gap: Duration) -> Vec<String> {
    let mut ids = Vec::new();
    for n in 1..=count {
        let id = format!("b-{prefix}-{n}");
        bob.send(&format!(
            "<message type='chat' id='{id}' to='alice@{D}'><body>{prefix}-{n}</body></message>"
        ))
        .await;
        ids.push(id);
        if !gap.is_zero() {
            tokio::time::sleep(gap).await;
        }
    }
    ids
}

/// Alice's client collects Bob's messages `PREFIX-n` until all `count` are in (then `quiet`
/// more, to see duplicates). Returns the numbers in arrival order (every copy).
async fn alice_collects(alice: &mut Client, prefix: &str, count: u64, quiet: Duration) -> Vec<u64> {
    let mut arrivals = Vec::new();
    let mut distinct = std::collections::HashSet::new();
    let deadline = Instant::now() + T;
    let mut all_in: Option<Instant> = None;
    loop {
        let until = match all_in {
            Some(at) => at + quiet,
            None => deadline,
        };
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            break;
        }
        let Some(el) = alice.recv(left).await else {
            break;
        };
        if el.name() != "message" || attr(&el, "type") == "error" {
            continue;
        }
        let Some(text) = body(&el) else { continue };
        for t in tokens(&text, prefix) {
            assert_eq!(
                support::bare(attr(&el, "from")),
                BOB_SESSION,
                "Bob's message comes from his per-session JID: {}",
                support::to_xml(&el)
            );
            let n: u64 = t[prefix.len() + 1..].parse().unwrap();
            arrivals.push(n);
            distinct.insert(n);
        }
        if all_in.is_none() && distinct.len() as u64 == count {
            all_in = Some(Instant::now());
        }
    }
    arrivals
}

/// Asserts each of `1..=count` arrived exactly once.
fn assert_each_once(what: &str, arrivals: &[u64], count: u64) {
    let mut seen = vec![0usize; count as usize + 1];
    for &n in arrivals {
        seen[n as usize] += 1;
    }
    let missing: Vec<u64> = (1..=count).filter(|&n| seen[n as usize] == 0).collect();
    let twice: Vec<u64> = (1..=count).filter(|&n| seen[n as usize] > 1).collect();
    assert!(
        missing.is_empty() && twice.is_empty(),
        "{what}: missing {missing:?}, more than once {twice:?} (arrivals {arrivals:?})"
    );
}

// ---- the stories ----

/// Bob writes to Alice while her client is online, first with two instances, then with three:
/// ejabberd gives each stanza to one instance's connection, so Alice gets every message once,
/// from Bob's per-session JID, and more than one instance did the work. How often messages sent
/// back to back (or 5 or 20 ms apart) arrive out of order is printed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_stanza_is_handled_once_by_two_and_by_three_instances() {
    let mut site = Site::new(Options {
        instances: 2,
        ..Options::default()
    })
    .await;
    let mut alice = site.alice_registers(false, false).await;
    let mut bob = site.client("bob", "pc").await;
    bob.presence("").await;
    // Reach has seen Alice's client once a first message reaches it.
    bob.send(&format!(
        "<message type='chat' id='hello' to='alice@{D}'><body>hello-0</body></message>"
    ))
    .await;
    alice
        .expect("Bob's first message", T, |s| {
            body(s).is_some_and(|b| b.contains("hello-0"))
        })
        .await;

    let mut report = Vec::new();
    for (instances, prefix, gap) in [
        (2, "two", Duration::ZERO),
        (3, "three", Duration::ZERO),
        (3, "fivems", Duration::from_millis(5)),
        (3, "paced", Duration::from_millis(20)),
    ] {
        if site.instances.len() < instances {
            site.add_instance().await;
            // Give ejabberd a moment to route to the new connection.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        const N: u64 = 60;
        let ids = bob_sends(&mut bob, prefix, N, gap).await;
        let arrivals = alice_collects(&mut alice, prefix, N, Duration::from_secs(2)).await;
        assert_each_once(prefix, &arrivals, N);
        let handled: Vec<usize> = site
            .instances
            .iter()
            .map(|i| inbound_ids(&i.log_all(), &ids))
            .collect();
        assert_eq!(
            handled.iter().sum::<usize>(),
            N as usize,
            "{prefix}: each stanza was read by exactly one instance: {handled:?}"
        );
        assert!(
            handled.iter().all(|&h| h > 0),
            "{prefix}: every instance handled some of the {N} stanzas: {handled:?}"
        );
        let (late, farthest) = reordering(&arrivals);
        report.push(format!(
            "{instances} instances, {N} messages {}: read per instance {handled:?}; \
             {late} arrived after a later one (farthest {farthest} places)",
            if gap.is_zero() {
                "back to back".to_owned()
            } else {
                format!("{} ms apart", gap.as_millis())
            }
        ));
    }
    println!("\n{}", report.join("\n"));
}

/// Alice is offline with a verified email address; Bob writes 30 messages over 4.5 s. Three
/// instances compete for the due forwards (claimed per user) and the email jobs (claimed with
/// SKIP LOCKED): every message is in exactly one forwarded email, none twice, and the relay got
/// exactly as many mails as the instances handed over.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn due_forwards_go_out_once_from_one_instance() {
    let mut site = Site::new(Options {
        instances: 3,
        email: true,
        digest_secs: 1,
        ..Options::default()
    })
    .await;
    let alice = site.alice_registers(true, false).await;
    alice.close().await;
    let mut bob = site.client("bob", "pc").await;
    bob.presence("").await;
    // Reach has seen Alice leave once its presence says so.
    tokio::time::sleep(Duration::from_millis(500)).await;

    const N: u64 = 30;
    bob_sends(&mut bob, "fwd", N, Duration::from_millis(150)).await;
    let forwards = |sink: &MailSink| -> Vec<SinkMail> {
        sink.mails()
            .into_iter()
            .filter(|m| {
                m.header("Subject")
                    .is_some_and(|s| s.starts_with("IM from"))
            })
            .collect()
    };
    let deadline = Instant::now() + Duration::from_secs(40);
    let mut all_in: Option<Instant> = None;
    loop {
        let mut seen = std::collections::HashSet::new();
        for m in forwards(site.sink()) {
            seen.extend(tokens(&m.text(), "fwd"));
        }
        if seen.len() as u64 == N && all_in.is_none() {
            all_in = Some(Instant::now());
        }
        // A few seconds more, for any forward sent twice.
        if all_in.is_some_and(|at| at.elapsed() > Duration::from_secs(4)) {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "not every message was forwarded: {} of {N}",
            seen.len()
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mails = forwards(site.sink());
    let mut arrivals = Vec::new();
    for m in &mails {
        for t in tokens(&m.text(), "fwd") {
            arrivals.push(t[4..].parse::<u64>().unwrap());
        }
    }
    assert_each_once("forwarded emails", &arrivals, N);
    let doors = site.door_counts();
    let handed: usize = doors.iter().map(|d| d.0).sum();
    let all_mails = site.sink().mails().len();
    assert_eq!(
        handed, all_mails,
        "every mail at the relay was handed over once, by one instance: {doors:?}"
    );
    let senders = doors.iter().filter(|d| d.0 > 0).count();
    println!(
        "\n{N} messages in {} forwarded emails; emails handed over per instance {:?}; \
         {senders} instances sent",
        mails.len(),
        doors.iter().map(|d| d.0).collect::<Vec<_>>()
    );
}

/// The doors of each instance: a reply by email to an alias made by whichever instance
/// forwarded, submitted through the site's SMTP name to each instance in turn, and a text from
/// the phone through Kannel's one webhook URL to each instance in turn, reach Bob once each.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn replies_through_any_instance_reach_the_buddy_once() {
    let mut site = Site::new(Options {
        instances: 2,
        email: true,
        sms: true,
        digest_secs: 1,
        ..Options::default()
    })
    .await;
    let mut alice = site.alice_registers(true, true).await;
    // The phone's confirmation and anything else it got so far.
    while site
        .phone()
        .recv_mt(Duration::from_millis(500))
        .await
        .is_some()
    {}
    let said = say(&mut alice, "primary email").await;
    assert!(!said.contains("Nothing was changed"), "{said}");
    alice.close().await;
    let mut bob = site.client("bob", "pc").await;
    bob.presence("").await;
    tokio::time::sleep(Duration::from_millis(500)).await;

    // By email first: the forward comes from one instance's alias.
    let before = site.door_counts();
    bob_sends(&mut bob, "mail", 1, Duration::ZERO).await;
    let mail = wait_mail_with(site.sink(), "mail-1").await;
    let alias = mail.reply_to();
    let deadline = Instant::now() + T;
    let forwarded_by = loop {
        let after = site.door_counts();
        if let Some(i) = (0..after.len()).find(|&i| after[i].0 > before[i].0) {
            break site.instances[i].name.clone();
        }
        assert!(
            Instant::now() < deadline,
            "no instance says it sent the forward"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };

    // Then by SMS: her email address is away, the phone available.
    let mut alice = site.client("alice", "pc").await;
    let said = say(&mut alice, "state email away").await;
    assert!(!said.contains("Nothing was changed"), "{said}");
    let said = say(&mut alice, "state phone available").await;
    assert!(!said.contains("Nothing was changed"), "{said}");
    alice.close().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    bob_sends(&mut bob, "sms", 1, Duration::ZERO).await;
    let mt = wait_mt_with(site.phone(), "sms-1").await;
    assert!(mt.text.contains("sms-1"), "{mt:?}");

    // Each instance in turn takes the site's SMTP name and its webhook URL.
    let n = site.instances.len();
    let mut report = Vec::new();
    for target in 0..n {
        for other in 0..n {
            site.smtp.as_ref().unwrap().set_down(other, other != target);
            site.webhook
                .as_ref()
                .unwrap()
                .set_down(other, other != target);
        }
        site.smtp.as_ref().unwrap().cut();
        site.webhook.as_ref().unwrap().cut();
        let before = site.door_counts();
        let name = site.instances[target].name.clone();

        let token = format!("emailreply-{}", target + 1);
        let message = format!(
            "From: Alice <{ALICE_MAIL}>\nTo: <{alias}>\nSubject: Re: IM\nMessage-ID: <{token}@mail.example>\n\
             Content-Type: text/plain; charset=utf-8\n\n{token}\n"
        );
        let port = site.smtp.as_ref().unwrap().port();
        let answer = submit(port, ALICE_MAIL, &[&alias], &message)
            .await
            .outcome();
        assert_eq!(
            answer.0, 250,
            "the reply through instance {name}: {answer:?}"
        );
        expect_once(&mut bob, &token).await;

        let token = format!("smsreply-{}", target + 1);
        site.phone().send_mo(PHONE, SERVICE_NUMBER, &token).await;
        expect_once(&mut bob, &token).await;
        let after = site.door_counts();
        assert_eq!(
            after[target].1,
            before[target].1 + 1,
            "the text went through instance {name}'s webhook: {before:?} -> {after:?}"
        );
        report.push(format!(
            "instance {name}: email reply 250 and delivered once, SMS through its webhook delivered once"
        ));
    }
    let smtp_served = site.smtp.as_ref().unwrap().served();
    assert!(
        smtp_served.iter().all(|&s| s > 0),
        "each instance's SMTP listener took a reply: {smtp_served:?}"
    );
    println!(
        "\nthe forward (and its alias) came from instance {forwarded_by}; {}",
        report.join("; ")
    );
}

async fn wait_mail_with(sink: &MailSink, token: &str) -> SinkMail {
    let deadline = Instant::now() + T;
    loop {
        if let Some(m) = sink.mails().into_iter().find(|m| {
            tokens(&m.text(), token.split('-').next().unwrap()).contains(&token.to_owned())
        }) {
            return m;
        }
        assert!(Instant::now() < deadline, "no forwarded mail with {token}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn wait_mt_with(phone: &mut Handset, token: &str) -> Mt {
    let deadline = Instant::now() + T;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let mt = phone
            .recv_mt(left)
            .await
            .unwrap_or_else(|| panic!("no SMS with {token}"));
        if mt.text.contains(token) {
            return mt;
        }
    }
}

/// Waits for Bob to get `token` from alice@D, then makes sure no second copy follows.
async fn expect_once(bob: &mut Client, token: &str) -> Element {
    let has =
        |s: &Element| attr(s, "type") != "error" && body(s).is_some_and(|b| b.contains(token));
    let got = bob.expect(token, T, has).await;
    assert_eq!(support::bare(attr(&got, "from")), format!("alice@{D}"));
    bob.expect_none(Duration::from_millis(1500), has).await;
    got
}

/// Three instances. The first one's relay hangs (it swallows the connections, so that
/// instance's email sends never finish): Bob writes until it holds an email job claimed. Then
/// its link to ejabberd is cut and it takes Alice's email reply (250), which waits in its own
/// outbox. Then it is killed with SIGKILL: another instance sends both the reply and the
/// claimed mails within seconds (the instance watch runs every 5 s; without it the claim would
/// wait out its 300 s lease), while the others keep serving Alice's client. Started again under
/// the same name, it rejoins and handles stanzas again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_instance_is_taken_over_and_rejoins_under_its_name() {
    let mut site = Site::new(Options {
        instances: 3,
        email: true,
        cuttable_link: true,
        cuttable_relay: true,
        digest_secs: 1,
        ..Options::default()
    })
    .await;
    let alice = site.alice_registers(true, false).await;
    alice.close().await;
    let mut bob = site.client("bob", "pc").await;
    bob.presence("").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    bob_sends(&mut bob, "first", 1, Duration::ZERO).await;
    let alias = wait_mail_with(site.sink(), "first-1").await.reply_to();

    // Instance a's relay hangs: Bob writes until a holds an email job it cannot send (its
    // relay swallowed a connection and the job is claimed by a in the database).
    site.relay_cut.as_ref().unwrap().set_mode(Mode::Swallow);
    site.relay_cut.as_ref().unwrap().cut();
    let mut sent = 0u64;
    let deadline = Instant::now() + Duration::from_secs(40);
    while site.relay_cut.as_ref().unwrap().swallowed() == 0 || site.email_claims("a") == 0 {
        assert!(
            Instant::now() < deadline,
            "instance a never claimed an email job ({sent} messages sent)"
        );
        sent += 1;
        bob.send(&format!(
            "<message type='chat' id='b-stuck-{sent}' to='alice@{D}'><body>stuck-{sent}</body></message>"
        ))
        .await;
        tokio::time::sleep(Duration::from_millis(1300)).await;
    }
    let claims = site.email_claims("a");
    let stuck_tokens: Vec<String> = (1..=sent).map(|n| format!("stuck-{n}")).collect();

    // Then a loses ejabberd, and takes Alice's reply: committed (250) into a's outbox, which
    // cannot drain.
    let link = site.link_cut.as_ref().unwrap();
    link.set_mode(Mode::Refuse);
    link.cut();
    assert!(
        site.instances[0]
            .wait_for_log("component link down", T)
            .await,
        "instance a's link went down"
    );
    let token = "stuckreply-1";
    let message = format!(
        "From: Alice <{ALICE_MAIL}>\nTo: <{alias}>\nSubject: Re: IM\nMessage-ID: <{token}@mail.example>\n\
         Content-Type: text/plain; charset=utf-8\n\n{token}\n"
    );
    let answer = submit(site.instances[0].smtp_port, ALICE_MAIL, &[&alias], &message)
        .await
        .outcome();
    assert_eq!(answer.0, 250, "{answer:?}");
    let has_reply = |s: &Element| body(s).is_some_and(|b| b.contains(token));
    assert_eq!(site.outbox_len("a"), 1, "the reply waits in a's outbox");

    // SIGKILL a.
    let killed_at = Instant::now();
    site.instances[0].kill();
    let got = bob.expect("the reply from a's outbox", T, has_reply).await;
    let reply_after = killed_at.elapsed();
    assert_eq!(support::bare(attr(&got, "from")), format!("alice@{D}"));
    bob.expect_none(Duration::from_millis(1500), has_reply)
        .await;
    let deadline = Instant::now() + T;
    let mails_after = loop {
        let mut seen = std::collections::HashSet::new();
        for m in site.sink().mails() {
            seen.extend(tokens(&m.text(), "stuck"));
        }
        if stuck_tokens.iter().all(|t| seen.contains(t)) {
            break killed_at.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the emails a had claimed were not sent within {T:?}: {seen:?} of {stuck_tokens:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let takeover: Vec<String> = site.instances[1..]
        .iter()
        .flat_map(|i| {
            i.log_all()
                .lines()
                .filter(|l| l.contains("took over what a stopped instance left"))
                .map(|l| format!("{}: {}", i.name, l.trim()))
                .collect::<Vec<_>>()
        })
        .collect();
    // One instance moved the stanza and released the claims; another one looking at the same
    // moment may log an empty takeover after it (it found nothing left).
    let moved: Vec<&String> = takeover
        .iter()
        .filter(|l| !l.contains("stanzas=0 claims=0"))
        .collect();
    assert!(
        moved.len() == 1 && moved[0].contains("stanzas=1") && !moved[0].contains("claims=0"),
        "one other instance took over a's outbox and claims: {takeover:?}"
    );
    // Every stuck message was mailed once.
    let mut arrivals = Vec::new();
    for m in site.sink().mails() {
        for t in tokens(&m.text(), "stuck") {
            arrivals.push(t[6..].parse::<u64>().unwrap());
        }
    }
    assert_each_once("messages a had claimed", &arrivals, sent);

    // The others keep serving Alice's client.
    let mut alice = site.client("alice", "pc").await;
    alice.presence("").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    bob_sends(&mut bob, "after", 20, Duration::from_millis(10)).await;
    let arrivals = alice_collects(&mut alice, "after", 20, Duration::from_secs(1)).await;
    assert_each_once("after the kill", &arrivals, 20);

    // a comes back under its name, with ejabberd and its relay reachable again, and rejoins.
    site.link_cut.as_ref().unwrap().set_mode(Mode::Forward);
    site.relay_cut.as_ref().unwrap().set_mode(Mode::Forward);
    site.relay_cut.as_ref().unwrap().cut();
    site.instances[0].start_again().await;
    site.instances[0].wait_link_up().await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids = bob_sends(&mut bob, "rejoined", 60, Duration::ZERO).await;
    let arrivals = alice_collects(&mut alice, "rejoined", 60, Duration::from_secs(2)).await;
    assert_each_once("after a rejoined", &arrivals, 60);
    let handled: Vec<usize> = site
        .instances
        .iter()
        .map(|i| inbound_ids(&i.log(), &ids))
        .collect();
    assert!(
        handled[0] > 0,
        "the restarted instance a handles stanzas again: {handled:?}"
    );
    assert_eq!(handled.iter().sum::<usize>(), 60, "{handled:?}");
    println!(
        "\nSIGKILL of a with 1 stanza in its outbox and {claims} email job(s) claimed: the reply reached Bob \
         {:.2} s after the kill, the claimed mails were at the relay {:.2} s after it; \
         takeover: {takeover:?}; after a rejoined, stanzas read per instance {handled:?}",
        reply_after.as_secs_f64(),
        mails_after.as_secs_f64(),
    );
}

/// An instance cut off from ejabberd (a partition: its link cannot come up) while the others
/// stay connected. It still takes Alice's email reply on its SMTP listener (250, committed), and
/// the stanza for Bob waits in that instance's own outbox while its link is down; a connected
/// instance sends it once the link has been down for `LINK_DOWN_ADOPTION_MS` (a live instance's
/// outbox is taken over then, not only a stopped one's). What a user should see: Bob gets the
/// reply within seconds, since two instances are connected all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reply_taken_by_an_instance_cut_off_from_the_server_reaches_the_buddy() {
    let mut site = Site::new(Options {
        instances: 2,
        email: true,
        cuttable_link: true,
        digest_secs: 1,
        ..Options::default()
    })
    .await;
    let alice = site.alice_registers(true, false).await;
    alice.close().await;
    let mut bob = site.client("bob", "pc").await;
    bob.presence("").await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    bob_sends(&mut bob, "first", 1, Duration::ZERO).await;
    let alias = wait_mail_with(site.sink(), "first-1").await.reply_to();

    let link = site.link_cut.as_ref().unwrap();
    link.set_mode(Mode::Refuse);
    link.cut();
    assert!(
        site.instances[0]
            .wait_for_log("component link down", T)
            .await,
        "instance a's link went down"
    );
    let token = "partitionreply-1";
    let message = format!(
        "From: Alice <{ALICE_MAIL}>\nTo: <{alias}>\nSubject: Re: IM\nMessage-ID: <{token}@mail.example>\n\
         Content-Type: text/plain; charset=utf-8\n\n{token}\n"
    );
    let answer = submit(site.instances[0].smtp_port, ALICE_MAIL, &[&alias], &message)
        .await
        .outcome();
    assert_eq!(answer.0, 250, "{answer:?}");
    let got = bob
        .wait_for(Duration::from_secs(30), |s| {
            body(s).is_some_and(|b| b.contains(token))
        })
        .await;
    assert!(
        got.is_some(),
        "Alice's reply, accepted by instance a while its link was down, did not reach Bob within \
         30 s although instance b was connected all along; a's outbox holds {} stanza(s)",
        site.outbox_len("a")
    );
}

/// Alice's client comes online and goes at once (a phone on a flaky network): her available
/// presence and her unavailable presence reach Reach a moment apart, and ejabberd may give
/// them to two instances, which then decide for her one after the other in either order (an
/// "available" just after the same resource's "unavailable" is checked with the server, whose
/// answer decides). What a user should see: once her client is gone, Reach knows she is
/// offline, so Bob's next message goes to her email and Bob sees her reach address as not
/// available on XMPP.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_comes_and_goes_at_once_is_seen_gone() {
    let mut site = Site::new(Options {
        instances: 3,
        email: true,
        digest_secs: 1,
        ..Options::default()
    })
    .await;
    let alice = site.alice_registers(true, false).await;
    alice.close().await;
    let mut bob = site.client("bob", "pc").await;
    bob.presence("").await;
    let stale = || site.resources_of_users();
    let deadline = Instant::now() + T;
    while stale() > 0 {
        assert!(
            Instant::now() < deadline,
            "Alice's first client never seen gone"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut flaps = 0;
    while flaps < 40 && stale() == 0 {
        flaps += 1;
        let mut client =
            Client::connect(&site.server, "alice", "alicepw", &format!("flap{flaps}")).await;
        client
            .send("<presence/><presence type='unavailable'/>")
            .await;
        client.close().await;
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let left = stale();
    // What Bob's next message shows: by email if Reach knows she is offline.
    bob_sends(&mut bob, "afterflap", 1, Duration::ZERO).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut mailed = false;
    while Instant::now() < deadline && !mailed {
        mailed = site
            .sink()
            .mails()
            .iter()
            .any(|m| m.text().contains("afterflap-1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        left == 0 && mailed,
        "after {flaps} clients of Alice's that came and went at once, Reach still records {left} \
         of them online, and Bob's next message {} her email within 10 s",
        if mailed { "reached" } else { "did not reach" }
    );
}

/// ejabberd restarts under two instances while Alice's client is online, and she does not come
/// back. Both links drop and come back; the first instance up forgets every resource and asks
/// each user's presence again, the second sees a link up elsewhere and skips that walk. Either
/// way Reach knows Alice is gone: Bob's next message goes to her email.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn after_the_server_restarts_the_instances_know_who_is_gone() {
    let mut site = Site::new(Options {
        instances: 2,
        email: true,
        digest_secs: 1,
        ..Options::default()
    })
    .await;
    let mut alice = site.alice_registers(true, false).await;
    let mut bob = site.client("bob", "pc").await;
    bob.presence("").await;
    bob_sends(&mut bob, "before", 1, Duration::ZERO).await;
    alice
        .expect("Bob's message on her client", T, |s| {
            body(s).is_some_and(|b| b.contains("before-1"))
        })
        .await;
    drop(alice);
    drop(bob);
    let skipped_before: Vec<usize> = site
        .instances
        .iter()
        .map(|i| count_lines(&i.log(), "another instance's link is up"))
        .collect();
    let ups: Vec<usize> = site
        .instances
        .iter()
        .map(|i| count_lines(&i.log(), "component link up"))
        .collect();
    site.server.restart().await;
    let deadline = Instant::now() + Duration::from_secs(40);
    for (i, up) in site.instances.iter().zip(&ups) {
        while count_lines(&i.log(), "component link up") <= *up {
            assert!(
                Instant::now() < deadline,
                "instance {}'s link did not come back",
                i.name
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
    // Give a walk time to run.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let skipped: Vec<(String, usize)> = site
        .instances
        .iter()
        .zip(&skipped_before)
        .map(|(i, before)| {
            (
                i.name.clone(),
                count_lines(&i.log(), "another instance's link is up") - before,
            )
        })
        .collect();
    let mut bob = site.client("bob", "pc").await;
    bob.presence("").await;
    bob_sends(&mut bob, "after", 1, Duration::ZERO).await;
    let mail = wait_mail_with(site.sink(), "after-1").await;
    assert!(mail.text().contains("after-1"));
    println!("\nafter the restart, walks skipped per instance: {skipped:?}");
    assert!(
        skipped.iter().any(|(_, n)| *n == 0),
        "one instance walked the users after the restart: {skipped:?}"
    );
}

/// Every instance stops at once (a crash, or a deploy), Alice's client leaves while none runs
/// (ejabberd cannot tell Reach), and the instances start again together. A single Reach walks
/// its users when its link comes up (forgets their resources and asks their presence again);
/// an instance skips that walk only when another instance's link was up all the time its own
/// was down, so instances started together each walk. What a user should see: Reach knows Alice
/// is gone, so Bob's next message goes to her email.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_started_together_still_learn_who_left_meanwhile() {
    let mut site = Site::new(Options {
        instances: 2,
        email: true,
        digest_secs: 1,
        ..Options::default()
    })
    .await;
    let alice = site.alice_registers(true, false).await;
    alice.close().await;
    // A race: each round is one restart of every instance; it goes wrong about one time in three.
    let mut rounds = Vec::new();
    for round in 1..=10 {
        let mut alice = Client::connect(&site.server, "alice", "alicepw", "pc").await;
        alice.presence("").await;
        let deadline = Instant::now() + T;
        while site.resources_of_users() != 1 {
            assert!(Instant::now() < deadline, "Reach never saw Alice's client");
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        for i in site.instances.iter_mut() {
            i.kill();
        }
        alice.close().await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        for i in site.instances.iter_mut() {
            i.start_again().await;
        }
        for i in &site.instances {
            i.wait_link_up().await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let skipped: Vec<usize> = site
            .instances
            .iter()
            .map(|i| count_lines(&i.log(), "another instance's link is up"))
            .collect();
        let stale = site.resources_of_users();
        rounds.push(format!(
            "round {round}: walks skipped {skipped:?}, resources online {stale}"
        ));
        if stale > 0 {
            break;
        }
    }
    // What Bob sees now: by email if Reach knows Alice is gone.
    let mut bob = site.client("bob", "pc").await;
    bob.presence("").await;
    bob_sends(&mut bob, "afterrestart", 1, Duration::ZERO).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut mailed = false;
    while Instant::now() < deadline && !mailed {
        mailed = site
            .sink()
            .mails()
            .iter()
            .any(|m| m.text().contains("afterrestart-1"));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        mailed,
        "Alice left while no instance ran; after they started again Reach still records her \
         client online and Bob's message did not reach her email within 10 s: {rounds:?}"
    );
}

/// A second process under an instance name that a live process holds is refused at start with
/// a clear error, and the first goes on; once the first stops, the name is free again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_process_under_a_name_in_use_is_refused() {
    let pg = PgCluster::shared();
    let url = pg.create_database();
    // No XMPP server is needed: the name is taken before the link starts.
    let nowhere = support::free_port();
    let config = |dir: &std::path::Path| {
        format!(
            "[component]\ndomain = \"{D}\"\nserver = \"127.0.0.1:{nowhere}\"\nsecret = \"s\"\n\n\
             [users]\nallowed_domains = [\"localhost\"]\n\n[store]\n{}",
            StoreAt::Postgres {
                url: url.clone(),
                instance: "a".into()
            }
            .toml(dir)
        )
    };
    let first_dir = tempfile::tempdir().unwrap();
    let mut first = Reach::start_config(first_dir.path(), &config(first_dir.path())).await;
    assert!(first.wait_for_log("store open", T).await, "{}", first.log());
    let second_dir = tempfile::tempdir().unwrap();
    let mut second = Reach::start_config(second_dir.path(), &config(second_dir.path())).await;
    let status = second.wait_exit(T).await;
    let log = strip_ansi(&second.log());
    assert!(
        status.is_some_and(|s| !s.success()),
        "the second process exits with an error: {status:?}\n{log}"
    );
    assert!(
        log.contains("instance 'a' is already running"),
        "the error names the instance: {log}"
    );
    assert!(
        log.contains("[store] instance"),
        "the error says which setting to change: {log}"
    );
    assert!(first.is_running(), "the first process goes on");
    assert!(
        !strip_ansi(&first.log()).contains("already running"),
        "{}",
        first.log()
    );

    // Stopped cleanly, the first frees the name: the second starts.
    let stopped = first.stop().await;
    assert!(stopped.success(), "{stopped:?}");
    let mut second = Reach::start_config(second_dir.path(), &config(second_dir.path())).await;
    let log_from = second.log().len();
    let deadline = Instant::now() + T;
    while !second.log()[log_from..].contains("store open") {
        assert!(second.is_running(), "{}", second.log());
        assert!(Instant::now() < deadline, "{}", second.log());
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(second.is_running());
    second.stop().await;
}
