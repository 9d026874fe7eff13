//! Crash soak with several instances (issue 12): three `reach` processes under the names a, b
//! and c on one PostgreSQL database, behind one ejabberd 23.01 (which gives each stanza for the
//! component domain to one of their connections at random), the aiosmtpd relay, and Kannel with
//! its fake SMSC (the test holds the handset). One SMTP port and one webhook URL are in front of
//! the three instances (`support::balancer`, round-robin with fail-over, as a site's load
//! balancer). While a buddy writes to Alice every 70 ms and Alice switches between XMPP, email
//! and SMS and answers by email (through the SMTP balancer) and by SMS (through Kannel and the
//! webhook balancer), one instance at a time is killed with SIGKILL at random moments and
//! started again under its name after a random while (mostly 2–9 s, so that another instance
//! often takes over its outbox and claims first, sometimes within a second). Before 40% of the
//! kills the instance's own way to ejabberd is cut (a forwarder between them, 0.3–1.5 s
//! before), so that the replies it takes meanwhile wait in its outbox and the takeover has
//! stanzas to move. The other two keep serving. Then everything drains and the test counts,
//! per flow, what was sent, acknowledged, delivered, lost (must be 0) and duplicated, how often
//! items arrived out of order, and how long after each kill another instance took over what the
//! dead one left.
//!
//! Environment (all optional; the same names as `tests/soak.rs`):
//! - `REACH_SOAK_KILLS`: how many SIGKILLs (default 4: the short run of `scripts/test`;
//!   `scripts/soak-instances` runs 30+).
//! - `REACH_SOAK_SECONDS`: the least time the chaos lasts (default 30).
//! - `REACH_SOAK_SEED`: the random seed (printed in the report), to replay a run's choices.
//! - `REACH_SOAK_REPORT`: a file to write the report to (it is always printed too).
//! - `REACH_SOAK_KEEP`: set, the instances' logs and the trace are kept (as after a failure)
//!   in `$TMPDIR/reach-soak-instances-PID`.
//!
//! What counts as acknowledged, per flow:
//! - Buddy → Alice over XMPP. XEP-0114 has no acknowledgements, and ejabberd spreads one
//!   buddy's stanzas over the instances at random, so the single-instance inference of
//!   `tests/soak.rs` (every message of an epoch up to the last delivered one) does not hold:
//!   a later message delivered by b says nothing about an earlier one given to a. What still
//!   holds is per *incarnation* (one process of one instance, from its start to its SIGKILL or
//!   to the end of the run): its link reads stanzas in order, the runtime commits them in that
//!   order, and nothing leaves before its commit. Which incarnation read a stanza is known
//!   from its debug log (`inbound stanza … id=…`, written before the stanza is handled, and
//!   line by line, so it survives the SIGKILL). So a buddy message is *acknowledged* when the
//!   incarnation that read it (a) was never killed (it ran to the end, so it committed all it
//!   read), or (b) read a later buddy message that was delivered to Alice (by any route, sent
//!   by any instance): that one was committed, hence this one too. The rest that were not
//!   delivered are *in flight*, which DESIGN.md allows (no acks on XEP-0114): either read by an
//!   incarnation killed before its next commit, or never read at all (in a socket, or given by
//!   ejabberd to a connection that was just dying; the test fails if one of those was sent
//!   more than 2 s before any kill or link cut). A message the buddy got an error for is
//!   *refused* (the sender knows). An acknowledged message that never arrived is *lost*. No
//!   stanza may be read by two instances.
//! - Alice's email replies: acknowledged when the SMTP balancer relayed Reach's 250. The test
//!   retries like an MTA (same Message-ID) until it hears 250 or a 5xx; the balancer sends
//!   each connection to the next live instance.
//! - Alice's SMS replies: acknowledged once Kannel has them (the handset wrote them to the fake
//!   SMSC; Kannel is never stopped here), since Kannel retries its webhook call until an
//!   instance answers 200.
//!
//! Reordering: for the buddy's messages, among those sent while Alice's client was online (and
//! known to Reach for 500 ms) and delivered to that session of her client, how many arrived
//! after one sent later ("late"); for the replies, the same over their first arrivals at the
//! buddy in the order Alice sent them. Takeover: for each kill, the first line `took over what a
//! stopped instance left` naming the killed instance in another instance's log, its timestamp
//! minus the kill's.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use support::balancer::Balancer;
use support::kannel::{Handset, Kannel};
use support::mail::MailSink;
use support::postgres::PgCluster;
use support::{attr, body, Client, Element, Reach, Server, ServerKind, StoreAt};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

const D: &str = "reach.localhost";
const T: Duration = Duration::from_secs(15);
const PHONE: &str = "+15551234567";
const SERVICE_NUMBER: &str = "+15550000000";
const ALICE_MAIL: &str = "alice@mail.example";
const SECRET: &str = "soaksecret9";
const NAMES: [&str; 3] = ["a", "b", "c"];
/// The buddy writes this often.
const BOB_EVERY: Duration = Duration::from_millis(70);
/// Alice's terminal changes this often (XMPP, email, SMS in turn).
const MODE_EVERY: Duration = Duration::from_millis(2500);
/// After logging in, Alice's session counts for the reordering figures once this has passed.
const SETTLED: Duration = Duration::from_millis(500);
/// A message never read by any instance is explained by a kill or a link cut at most this long
/// after it.
const KILL_WINDOW: Duration = Duration::from_secs(2);
/// How often a kill is preceded by a cut of the instance's link to ejabberd (0.3 to 1.5 s
/// before), so that its outbox holds what it took meanwhile (replies by email and SMS).
const CUT_FIRST: f64 = 0.4;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Route {
    Xmpp,
    Email,
    Sms,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Xmpp,
    Email,
    Sms,
}

struct BobMsg {
    n: u64,
    id: String,
    token: String,
    sent_at: Instant,
    /// Alice's XMPP session that was online (and settled) when it was sent.
    session: Option<usize>,
}

struct MailReply {
    token: String,
    attempts: u32,
    acked: bool,
    refused: Option<String>,
    done: bool,
}

/// One process of one instance.
struct Incarnation {
    instance: usize,
    /// Its part of the instance's log: bytes `from..to` (to the end while it runs).
    from: usize,
    to: Option<usize>,
    killed: Option<(Instant, SystemTime)>,
    /// When its link to ejabberd was cut (before the kill).
    link_cut: Option<Instant>,
}

#[derive(Default)]
struct Ledger {
    bob: Vec<BobMsg>,
    bob_errors: HashMap<String, String>,
    at_alice: HashMap<String, Vec<Route>>,
    /// Buddy messages at Alice's client, in arrival order: (session, n).
    xmpp_arrivals: Vec<(usize, u64)>,
    mo_sent: Vec<String>,
    at_bob: HashMap<String, usize>,
    /// Reply tokens at the buddy, first copies, in arrival order.
    bob_arrivals: Vec<String>,
    trace: Vec<String>,
    t0: Option<Instant>,
}

impl Ledger {
    fn trace(&mut self, what: impl Into<String>) {
        let t0 = *self.t0.get_or_insert_with(Instant::now);
        self.trace.push(format!(
            "{:9.3} {}",
            t0.elapsed().as_secs_f64(),
            what.into()
        ));
    }
}

fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
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

fn token_number(token: &str) -> u64 {
    token
        .rsplit('-')
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or(0)
}

/// Text without ANSI colour sequences.
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

/// The time at the start of a log line (`2026-12-07T10:37:42.123456Z …`), as seconds since
/// the Unix epoch.
fn line_time(line: &str) -> Option<f64> {
    let stamp = line.split_whitespace().next()?.strip_suffix('Z')?;
    let (date, time) = stamp.split_once('T')?;
    let mut d = date.split('-').map(|p| p.parse::<i64>());
    let (y, m, day) = (d.next()?.ok()?, d.next()?.ok()?, d.next()?.ok()?);
    let mut t = time.split(':');
    let (h, min) = (
        t.next()?.parse::<i64>().ok()?,
        t.next()?.parse::<i64>().ok()?,
    );
    let sec: f64 = t.next()?.parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some((days * 86_400 + h * 3600 + min * 60) as f64 + sec)
}

fn unix(t: SystemTime) -> f64 {
    t.duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64()
}

/// The value of `key=value` in a log line (quotes removed).
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let at = line.find(&format!("{key}="))? + key.len() + 1;
    let rest = &line[at..];
    let end = rest.find(char::is_whitespace).unwrap_or(rest.len());
    Some(rest[..end].trim_matches('"'))
}

/// Reordering of a sequence (numbers in sending order): how many arrived after one sent
/// later, and the largest such distance.
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

/// One SMTP transaction that never panics: Ok(final code) or Err(why it did not finish).
async fn try_submit(port: u16, from: &str, rcpt: &str, message: &str) -> Result<u16, String> {
    let step = Duration::from_secs(10);
    let stream = tokio::time::timeout(step, TcpStream::connect(("127.0.0.1", port)))
        .await
        .map_err(|_| "connect timeout".to_owned())?
        .map_err(|e| format!("connect: {e}"))?;
    let (read, mut write) = stream.into_split();
    let mut reader = BufReader::new(read);
    async fn reply(
        reader: &mut BufReader<tokio::net::tcp::OwnedReadHalf>,
        step: Duration,
    ) -> Result<u16, String> {
        loop {
            let mut line = String::new();
            let n = tokio::time::timeout(step, reader.read_line(&mut line))
                .await
                .map_err(|_| "reply timeout".to_owned())?
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("connection closed".into());
            }
            if line.as_bytes().get(3) != Some(&b'-') {
                return line
                    .get(..3)
                    .and_then(|c| c.parse().ok())
                    .ok_or_else(|| format!("bad reply {line:?}"));
            }
        }
    }
    let greeting = reply(&mut reader, step).await?;
    if greeting != 220 {
        return Ok(greeting);
    }
    let mut data = String::new();
    for line in message.split('\n') {
        if line.starts_with('.') {
            data.push('.');
        }
        data.push_str(line);
        data.push_str("\r\n");
    }
    data.push_str(".\r\n");
    for (command, want) in [
        ("EHLO soak.example\r\n".to_owned(), 250),
        (format!("MAIL FROM:<{from}>\r\n"), 250),
        (format!("RCPT TO:<{rcpt}>\r\n"), 250),
        ("DATA\r\n".to_owned(), 354),
        (data, 0),
    ] {
        write
            .write_all(command.as_bytes())
            .await
            .map_err(|e| format!("write: {e}"))?;
        let code = reply(&mut reader, step).await?;
        if want == 0 || code != want {
            let _ = write.write_all(b"QUIT\r\n").await;
            return Ok(code);
        }
    }
    unreachable!("the data answer returns")
}

/// Submits one reply like an MTA: retries (same Message-ID) until 250 or a 5xx, for up to 60 s.
async fn deliver_reply(
    port: u16,
    alias: String,
    token: String,
    slot: usize,
    replies: Arc<Mutex<Vec<MailReply>>>,
) {
    let message = format!(
        "From: Alice <{ALICE_MAIL}>\nTo: <{alias}>\nSubject: Re: IM\nMessage-ID: <{token}@mail.example>\n\
         Date: Tue, 25 Nov 2025 10:00:00 +0000\nContent-Type: text/plain; charset=utf-8\n\n{token}\n"
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let outcome = try_submit(port, ALICE_MAIL, &alias, &message).await;
        let finished = {
            let mut all = replies.lock().unwrap();
            let r = &mut all[slot];
            r.attempts += 1;
            match outcome {
                Ok(250) => r.acked = true,
                Ok(code) if code >= 500 => r.refused = Some(format!("{code}")),
                _ => {}
            }
            r.done = r.acked || r.refused.is_some() || Instant::now() >= deadline;
            r.done
        };
        if finished {
            return;
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// One instance: its folder, config and current process.
struct Node {
    name: &'static str,
    dir: tempfile::TempDir,
    config: String,
    reach: Reach,
    running: bool,
}

impl Node {
    fn log_path(&self) -> PathBuf {
        self.dir.path().join("reach.log")
    }

    fn log_len(&self) -> usize {
        std::fs::metadata(self.log_path()).map_or(0, |m| m.len() as usize)
    }
}

struct World {
    _pg: Arc<PgCluster>,
    server: Server,
    _kannel: Kannel,
    phone: Handset,
    sink: MailSink,
    smtp: Balancer,
    webhook: Balancer,
    /// Each instance's way to ejabberd, which the test can cut.
    links: Vec<Balancer>,
    /// When links were cut.
    cuts: Vec<Instant>,
    nodes: Vec<Node>,
    incarnations: Vec<Incarnation>,
    /// When each incarnation (by index) was started again after a kill.
    restarted_at: HashMap<usize, Instant>,
    bob: Client,
    alice: Option<Client>,
    /// Alice's sessions so far, and when the current one logged in.
    sessions: usize,
    alice_since: Option<Instant>,
    ledger: Ledger,
    replies: Arc<Mutex<Vec<MailReply>>>,
    reply_tasks: Vec<tokio::task::JoinHandle<()>>,
    seen_mails: HashSet<PathBuf>,
    rng: StdRng,
    next_token: u64,
    sms_conversation: bool,
    replying: bool,
    alias: Option<String>,
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() || std::env::var_os("REACH_SOAK_KEEP").is_some() {
            let keep =
                std::env::temp_dir().join(format!("reach-soak-instances-{}", std::process::id()));
            let _ = std::fs::create_dir_all(&keep);
            for node in &self.nodes {
                let _ = std::fs::copy(
                    node.log_path(),
                    keep.join(format!("reach-{}.log", node.name)),
                );
            }
            let _ = std::fs::write(keep.join("ejabberd.log"), self.server.log());
            let _ = std::fs::write(keep.join("trace.txt"), self.ledger.trace.join("\n"));
            eprintln!("logs kept in {}", keep.display());
        }
    }
}

async fn login(server: &Server, user: &str) -> Client {
    let mut c = Client::connect(server, user, &format!("{user}pw"), "soak").await;
    c.presence("").await;
    c
}

impl World {
    async fn new(seed: u64) -> World {
        let pg = PgCluster::shared();
        let url = pg.create_database();
        let server = Server::start(ServerKind::Ejabberd).await;
        for user in ["alice", "bob"] {
            server.register(user, &format!("{user}pw")).await;
        }
        let smtp_ports: Vec<u16> = NAMES.iter().map(|_| support::free_port()).collect();
        let webhook_ports: Vec<u16> = NAMES.iter().map(|_| support::free_port()).collect();
        let smtp = Balancer::on_ports(&smtp_ports).await;
        let webhook = Balancer::on_ports(&webhook_ports).await;
        let kannel = Kannel::start(&format!(
            "http://127.0.0.1:{}/sms/mo?secret={SECRET}",
            webhook.port()
        ))
        .await;
        let phone = Handset::connect(&kannel).await;
        let sink = MailSink::start().await;
        let mut nodes = Vec::new();
        let mut incarnations = Vec::new();
        let mut links = Vec::new();
        for (i, name) in NAMES.iter().enumerate() {
            let link = Balancer::on_ports(&[server.component_port()]).await;
            let dir = tempfile::Builder::new()
                .prefix(&format!("reach-soak-{name}-"))
                .tempdir()
                .unwrap();
            let store = StoreAt::Postgres {
                url: url.clone(),
                instance: (*name).to_owned(),
            };
            let mut config = Reach::config_at(&server, dir.path(), &store)
                .replace(&server.component_addr(), &link.addr());
            links.push(link);
            config.push_str(&format!(
                "\n[limits]\nemails_per_user_per_hour = 100000\n\n[routing]\ngrace_delay_secs = 3\n\n\
                 [email]\nrelay = \"smtp://127.0.0.1:{}\"\nfrom_address = \"reach@{D}\"\nreply_domain = \"{D}\"\n\
                 listen = \"127.0.0.1:{}\"\ndigest_window_secs = 1\n\n\
                 [sms]\nsendsms_url = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\nfrom = \"{SERVICE_NUMBER}\"\n\
                 webhook_listen = \"127.0.0.1:{}\"\nwebhook_url = \"http://127.0.0.1:{}\"\n\
                 webhook_secret = \"{SECRET}\"\ndaily_cap = 100000\nrate_per_second = 100\nallowed_prefixes = [\"+1\"]\n",
                sink.port,
                smtp_ports[i],
                kannel.sendsms_url(),
                kannel.username(),
                kannel.password(),
                webhook_ports[i],
                webhook.port(),
            ));
            let reach = Reach::start_config(dir.path(), &config).await;
            incarnations.push(Incarnation {
                instance: i,
                from: 0,
                to: None,
                killed: None,
                link_cut: None,
            });
            nodes.push(Node {
                name,
                dir,
                config,
                reach,
                running: true,
            });
        }
        for node in &nodes {
            assert!(
                node.reach.wait_for_log("component link up", T).await,
                "instance {}: no link\n{}",
                node.name,
                node.reach.log()
            );
        }
        let mut bob = login(&server, "bob").await;
        support::wait_for_component(&mut bob, D).await;
        World {
            _pg: pg,
            server,
            _kannel: kannel,
            phone,
            sink,
            smtp,
            webhook,
            links,
            cuts: Vec::new(),
            nodes,
            incarnations,
            restarted_at: HashMap::new(),
            bob,
            alice: None,
            sessions: 0,
            alice_since: None,
            ledger: Ledger::default(),
            replies: Arc::new(Mutex::new(Vec::new())),
            reply_tasks: Vec::new(),
            seen_mails: HashSet::new(),
            rng: StdRng::seed_from_u64(seed),
            next_token: 1,
            sms_conversation: false,
            replying: true,
            alias: None,
        }
    }

    async fn say(alice: &mut Client, line: &str) -> String {
        alice
            .send(&format!(
                "<message type='chat' to='{D}'><body>{line}</body></message>"
            ))
            .await;
        let reply = alice
            .expect(line, T, |s| {
                s.attr("from") == Some(D) && body(s).is_some_and(|b| !b.contains("on its way"))
            })
            .await;
        body(&reply).unwrap()
    }

    /// Alice registers her phone and email and verifies both; email is `away` and primary, so
    /// the phone gets messages while it is `available` (`/back`) and email while it is `away`.
    async fn setup_alice(&mut self) {
        let mut alice = login(&self.server, "alice").await;
        let ok = alice
            .iq(&format!(
                "<iq type='set' id='reg' to='{D}'><query xmlns='jabber:iq:register'><username>alice</username><phone>{PHONE}</phone><email>{ALICE_MAIL}</email></query></iq>"
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
        let deadline = Instant::now() + T;
        let code = loop {
            let left = deadline.saturating_duration_since(Instant::now());
            let mt = self.phone.recv_mt(left).await.expect("the phone's code");
            if let Some(code) = mt
                .text
                .split(|c: char| !c.is_ascii_digit())
                .find(|w| w.len() == 6)
            {
                break code.to_owned();
            }
        };
        let said = World::say(&mut alice, &format!("verify {code}")).await;
        assert!(said.contains("is verified"), "{said}");
        let mail = self.sink.wait_for(1, T).await.remove(0);
        self.seen_mails.insert(mail.path.clone());
        let subject = mail.header("Subject").unwrap();
        let code: String = subject.chars().filter(char::is_ascii_digit).collect();
        let said = World::say(&mut alice, &format!("verify {code}")).await;
        assert!(said.contains("is verified"), "{said}");
        for line in ["state email away", "state phone away", "primary email"] {
            let said = World::say(&mut alice, line).await;
            assert!(!said.contains("Nothing was changed"), "{line}: {said}");
        }
        self.sessions += 1;
        self.alice_since = Some(Instant::now());
        self.alice = Some(alice);
    }

    fn token(&mut self, prefix: &str) -> String {
        let t = format!("{prefix}-{}", self.next_token);
        self.next_token += 1;
        t
    }

    /// Alice's settled XMPP session, if she is online.
    fn settled_session(&self) -> Option<usize> {
        match (&self.alice, self.alice_since) {
            (Some(_), Some(since)) if since.elapsed() >= SETTLED => Some(self.sessions),
            _ => None,
        }
    }

    async fn bob_writes(&mut self) {
        let token = self.token("msg");
        let id = format!("b-{token}");
        self.bob
            .send(&format!(
                "<message type='chat' id='{id}' to='alice@{D}'><body>{token}</body></message>"
            ))
            .await;
        self.ledger.trace(format!("bob sends {token}"));
        let session = self.settled_session();
        self.ledger.bob.push(BobMsg {
            n: token_number(&token),
            id,
            token,
            sent_at: Instant::now(),
            session,
        });
    }

    fn note_bob(&mut self, el: &Element) {
        if el.name() != "message" {
            return;
        }
        if attr(el, "type") == "error" {
            let condition = el
                .get_child("error", support::NS_CLIENT)
                .and_then(|e| e.children().next().map(|c| c.name().to_owned()))
                .unwrap_or_default();
            self.ledger
                .trace(format!("bob gets error {condition} for {}", attr(el, "id")));
            self.ledger
                .bob_errors
                .insert(attr(el, "id").to_owned(), condition);
            return;
        }
        if let Some(text) = body(el) {
            for t in tokens(&text, "mail")
                .into_iter()
                .chain(tokens(&text, "sms"))
            {
                let copies = self.ledger.at_bob.entry(t.clone()).or_default();
                *copies += 1;
                if *copies == 1 {
                    self.ledger.bob_arrivals.push(t);
                }
            }
        }
    }

    fn note_alice_text(&mut self, text: &str, route: Route) {
        let found = tokens(text, "msg");
        if !found.is_empty() {
            self.ledger
                .trace(format!("at Alice by {route:?}: {}", found.join(" ")));
        }
        for t in found {
            if route == Route::Xmpp {
                self.ledger
                    .xmpp_arrivals
                    .push((self.sessions, token_number(&t)));
            }
            self.ledger.at_alice.entry(t).or_default().push(route);
        }
    }

    /// Reads whatever has arrived at every end, without waiting.
    async fn poll(&mut self) {
        while let Some(el) = self.bob.recv(Duration::from_millis(1)).await {
            self.note_bob(&el);
        }
        if let Some(mut alice) = self.alice.take() {
            while let Some(el) = alice.recv(Duration::from_millis(1)).await {
                if el.name() == "message" && attr(&el, "type") != "error" {
                    if let Some(text) = body(&el) {
                        self.note_alice_text(&text, Route::Xmpp);
                    }
                }
            }
            self.alice = Some(alice);
        }
        while let Some(mt) = self.phone.recv_mt(Duration::from_millis(1)).await {
            let before = self.ledger.at_alice.len();
            self.ledger.trace(format!("MT {:?}", mt.text));
            self.note_alice_text(&mt.text, Route::Sms);
            if !tokens(&mt.text, "msg").is_empty() {
                self.sms_conversation = true;
                if self.replying && self.rng.gen_bool(0.5) && before > 0 {
                    self.text_back().await;
                }
            }
        }
    }

    /// Checks the relay's mailbox: new forwards are noted, and some answered.
    fn poll_mail(&mut self) {
        for mail in self.sink.mails() {
            if !self.seen_mails.insert(mail.path.clone()) {
                continue;
            }
            let text = mail.text();
            self.note_alice_text(&text, Route::Email);
            if !tokens(&text, "msg").is_empty() {
                self.alias = Some(mail.reply_to());
                if self.replying && self.rng.gen_bool(0.5) {
                    self.mail_back();
                }
            }
        }
    }

    /// Alice answers the newest forwarded email, through the site's SMTP balancer.
    fn mail_back(&mut self) {
        let Some(alias) = self.alias.clone() else {
            return;
        };
        let token = self.token("mail");
        let slot = {
            let mut all = self.replies.lock().unwrap();
            all.push(MailReply {
                token: token.clone(),
                attempts: 0,
                acked: false,
                refused: None,
                done: false,
            });
            all.len() - 1
        };
        self.ledger.trace(format!("alice mails {token}"));
        self.reply_tasks.push(tokio::spawn(deliver_reply(
            self.smtp.port(),
            alias,
            token,
            slot,
            self.replies.clone(),
        )));
    }

    async fn text_back(&mut self) {
        if !self.sms_conversation {
            return;
        }
        let token = self.token("sms");
        self.phone.send_mo(PHONE, SERVICE_NUMBER, &token).await;
        self.ledger.trace(format!("phone texts {token}"));
        self.ledger.mo_sent.push(token);
    }

    /// Alice leaves XMPP: unavailable, then what is still on the way is read before the close.
    async fn alice_leaves(&mut self) {
        let Some(mut alice) = self.alice.take() else {
            return;
        };
        self.alice_since = None;
        alice.send("<presence type='unavailable'/>").await;
        let until = Instant::now() + Duration::from_millis(300);
        while Instant::now() < until {
            if let Some(el) = alice.recv(Duration::from_millis(50)).await {
                if let Some(text) = body(&el).filter(|_| attr(&el, "type") != "error") {
                    self.note_alice_text(&text, Route::Xmpp);
                }
            }
        }
        alice.send("</stream:stream>").await;
        while let Some(el) = alice.recv(Duration::from_secs(2)).await {
            if let Some(text) = body(&el).filter(|_| attr(&el, "type") != "error") {
                self.note_alice_text(&text, Route::Xmpp);
            }
        }
    }

    async fn set_mode(&mut self, mode: Mode) {
        self.ledger.trace(format!("mode {mode:?}"));
        match mode {
            Mode::Xmpp => {
                if self.alice.is_none() {
                    self.sessions += 1;
                    self.alice = Some(login(&self.server, "alice").await);
                    self.alice_since = Some(Instant::now());
                }
            }
            Mode::Email | Mode::Sms => {
                self.alice_leaves().await;
                let line = if mode == Mode::Sms { "/back" } else { "/away" };
                self.phone.send_mo(PHONE, SERVICE_NUMBER, line).await;
            }
        }
    }

    /// Cuts instance `i` off from ejabberd (its link goes down and cannot come back).
    fn cut_link(&mut self, i: usize) {
        self.links[i].set_mode(support::balancer::Mode::Refuse);
        self.links[i].cut();
        self.cuts.push(Instant::now());
        if let Some(inc) = self
            .incarnations
            .iter_mut()
            .rev()
            .find(|inc| inc.instance == i)
        {
            inc.link_cut = Some(Instant::now());
        }
        self.ledger.trace(format!("cut {}'s link", NAMES[i]));
    }

    fn kill(&mut self, i: usize) {
        let node = &mut self.nodes[i];
        node.reach.kill();
        node.running = false;
        let (now, wall) = (Instant::now(), SystemTime::now());
        let len = node.log_len();
        let inc = self
            .incarnations
            .iter_mut()
            .rev()
            .find(|inc| inc.instance == i)
            .expect("an incarnation");
        inc.to = Some(len);
        inc.killed = Some((now, wall));
        self.ledger.trace(format!("kill {}", NAMES[i]));
    }

    async fn restart(&mut self, i: usize) {
        self.links[i].set_mode(support::balancer::Mode::Forward);
        let node = &mut self.nodes[i];
        let from = node.log_len();
        node.reach = Reach::start_config(node.dir.path(), &node.config).await;
        node.running = true;
        self.incarnations.push(Incarnation {
            instance: i,
            from,
            to: None,
            killed: None,
            link_cut: None,
        });
        self.restarted_at
            .insert(self.incarnations.len() - 1, Instant::now());
        self.ledger.trace(format!("restart {}", NAMES[i]));
    }

    /// Each incarnation's part of its instance's log, colours removed.
    fn incarnation_logs(&self) -> Vec<String> {
        let logs: Vec<Vec<u8>> = self
            .nodes
            .iter()
            .map(|n| std::fs::read(n.log_path()).unwrap_or_default())
            .collect();
        self.incarnations
            .iter()
            .map(|inc| {
                let log = &logs[inc.instance];
                let to = inc.to.unwrap_or(log.len()).min(log.len());
                strip_ansi(&String::from_utf8_lossy(&log[inc.from.min(to)..to]))
            })
            .collect()
    }
}

#[derive(Default, Debug)]
struct Row {
    sent: usize,
    refused: usize,
    acked: usize,
    delivered: usize,
    duplicates: usize,
    lost: usize,
    in_flight: usize,
    late: usize,
    ordered_of: usize,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_instances_lose_nothing_acknowledged_across_sigkills() {
    let kills = env_num("REACH_SOAK_KILLS", 4) as usize;
    let min_secs = env_num("REACH_SOAK_SECONDS", 30);
    let seed = env_num("REACH_SOAK_SEED", rand::random::<u32>() as u64);
    let started = Instant::now();
    let mut w = World::new(seed).await;
    w.setup_alice().await;
    let setup_time = started.elapsed();

    let modes = [Mode::Xmpp, Mode::Email, Mode::Sms];
    let mut mode_index = 0;
    let mut next_mode = Instant::now() + MODE_EVERY;
    let mut next_bob = Instant::now();
    let mut next_mail_poll = Instant::now();
    let mut next_mo = Instant::now() + Duration::from_secs(1);
    let mut by_mail = false;
    let mut killed = 0usize;
    let mut down: Option<(usize, Instant)> = None;
    // An instance whose link was cut, and when it is to be killed.
    let mut cut: Option<(usize, Instant)> = None;
    let mut next_kill = Instant::now() + Duration::from_millis(w.rng.gen_range(1000..3000));
    let chaos_start = Instant::now();
    while killed < kills
        || down.is_some()
        || cut.is_some()
        || chaos_start.elapsed() < Duration::from_secs(min_secs)
    {
        let now = Instant::now();
        if now >= next_bob {
            w.bob_writes().await;
            next_bob = now + BOB_EVERY;
        }
        w.poll().await;
        if now >= next_mail_poll {
            w.poll_mail();
            next_mail_poll = now + Duration::from_millis(250);
        }
        if now >= next_mo {
            by_mail = !by_mail;
            if w.alias.is_some() && by_mail {
                w.mail_back();
            } else {
                w.text_back().await;
            }
            next_mo = now + Duration::from_millis(w.rng.gen_range(150..700));
        }
        if now >= next_mode {
            mode_index += 1;
            w.set_mode(modes[mode_index % modes.len()]).await;
            next_mode = Instant::now() + MODE_EVERY;
        }
        match (down, cut) {
            (None, None) if killed < kills && now >= next_kill => {
                let i = w.rng.gen_range(0..NAMES.len());
                if w.rng.gen_bool(CUT_FIRST) {
                    // Its link goes first: what it takes meanwhile waits in its outbox.
                    w.cut_link(i);
                    cut = Some((i, now + Duration::from_millis(w.rng.gen_range(300..1500))));
                } else {
                    next_kill = now;
                    cut = Some((i, now));
                }
            }
            (None, Some((i, at))) if now >= at => {
                cut = None;
                w.kill(i);
                killed += 1;
                // Mostly long enough for another instance's watch (every 5 s) to take over,
                // sometimes back within a second.
                let back = if w.rng.gen_bool(0.2) {
                    w.rng.gen_range(200..1000)
                } else {
                    w.rng.gen_range(2000..9000)
                };
                down = Some((i, Instant::now() + Duration::from_millis(back)));
            }
            (Some((i, at)), _) if now >= at => {
                w.restart(i).await;
                down = None;
                next_kill = Instant::now() + Duration::from_millis(w.rng.gen_range(500..3000));
            }
            _ => {}
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let chaos_time = chaos_start.elapsed();

    // Drain: no new traffic; all instances up. A few seconds in the current mode, then Alice
    // comes back to XMPP so that anything held for her client arrives; stop when nothing moved
    // for 8 s and every acknowledged reply arrived (bounded).
    let drain_start = Instant::now();
    let drain_cap = Duration::from_secs(if kills <= 5 { 40 } else { 120 });
    w.replying = false;
    let mut last_change = Instant::now();
    let mut last_seen = (0usize, 0usize, 0usize);
    let mut alice_back = false;
    loop {
        w.poll().await;
        w.poll_mail();
        if !alice_back && drain_start.elapsed() > Duration::from_secs(4) {
            w.set_mode(Mode::Xmpp).await;
            alice_back = true;
        }
        let seen = (
            w.ledger.at_alice.values().map(Vec::len).sum::<usize>(),
            w.ledger.at_bob.values().sum::<usize>(),
            w.ledger.bob_errors.len(),
        );
        if seen != last_seen {
            last_seen = seen;
            last_change = Instant::now();
        }
        let (replies_done, replies_in) = {
            let all = w.replies.lock().unwrap();
            (
                all.iter().all(|r| r.done),
                all.iter()
                    .filter(|r| r.acked)
                    .all(|r| w.ledger.at_bob.contains_key(&r.token))
                    && w.ledger
                        .mo_sent
                        .iter()
                        .all(|t| w.ledger.at_bob.contains_key(t)),
            )
        };
        if alice_back
            && replies_done
            && replies_in
            && last_change.elapsed() > Duration::from_secs(8)
        {
            break;
        }
        if drain_start.elapsed() > drain_cap {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drain_time = drain_start.elapsed();
    for task in std::mem::take(&mut w.reply_tasks) {
        task.abort();
    }

    // ---- counting: the buddy's messages ----
    let logs = w.incarnation_logs();
    let l = &w.ledger;
    let by_id: HashMap<&str, usize> = l
        .bob
        .iter()
        .enumerate()
        .map(|(i, m)| (m.id.as_str(), i))
        .collect();
    // Which incarnation read each message, and where in its reading order.
    let mut read_by: Vec<Vec<(usize, usize)>> = vec![Vec::new(); l.bob.len()];
    let mut reads: Vec<Vec<usize>> = vec![Vec::new(); logs.len()];
    for (inc, log) in logs.iter().enumerate() {
        for line in log.lines().filter(|l| l.contains("inbound stanza")) {
            // `id=Some("b-msg-7")` (the first quoted string after `id=`).
            let Some(id) = line
                .find(" id=")
                .and_then(|at| line[at..].split('"').nth(1))
            else {
                continue;
            };
            if let Some(&m) = by_id.get(id) {
                read_by[m].push((inc, reads[inc].len()));
                reads[inc].push(m);
            }
        }
    }
    let delivered = |m: usize| l.at_alice.contains_key(&l.bob[m].token);
    // The last position, per incarnation, of a message it read that was delivered.
    let last_delivered: Vec<Option<usize>> = reads
        .iter()
        .map(|r| r.iter().rposition(|&m| delivered(m)))
        .collect();
    let kill_times: Vec<Instant> = w
        .incarnations
        .iter()
        .filter_map(|inc| inc.killed.map(|k| k.0))
        .chain(w.cuts.iter().copied())
        .collect();
    let mut xmpp = Row::default();
    let (mut read_twice, mut acked_by_survivor, mut acked_by_later) = (0, 0, 0);
    let (mut flight_read, mut flight_unread, mut unexplained) = (0, 0, Vec::new());
    let mut lost = Vec::new();
    let mut routes: BTreeMap<Route, usize> = BTreeMap::new();
    let mut per_instance = vec![0usize; NAMES.len()];
    for (m, msg) in l.bob.iter().enumerate() {
        xmpp.sent += 1;
        let copies = l.at_alice.get(&msg.token);
        if let Some(copies) = copies {
            xmpp.delivered += 1;
            xmpp.duplicates += copies.len() - 1;
            *routes.entry(copies[0]).or_default() += 1;
        }
        if read_by[m].len() > 1 {
            read_twice += 1;
        }
        if let Some(&(inc, _)) = read_by[m].first() {
            per_instance[w.incarnations[inc].instance] += 1;
        }
        if l.bob_errors.contains_key(&msg.id) {
            xmpp.refused += 1;
            continue;
        }
        let acked = read_by[m].iter().any(|&(inc, pos)| {
            let survivor = w.incarnations[inc].killed.is_none();
            let later = last_delivered[inc].is_some_and(|last| pos <= last);
            if survivor {
                acked_by_survivor += 1;
            } else if later {
                acked_by_later += 1;
            }
            survivor || later
        });
        if acked {
            xmpp.acked += 1;
            if copies.is_none() {
                xmpp.lost += 1;
                lost.push(msg.token.clone());
            }
        } else if copies.is_none() {
            xmpp.in_flight += 1;
            if read_by[m].is_empty() {
                flight_unread += 1;
                let near_kill = kill_times
                    .iter()
                    .any(|&k| k >= msg.sent_at && k - msg.sent_at <= KILL_WINDOW);
                if !near_kill {
                    unexplained.push(msg.token.clone());
                }
            } else {
                flight_read += 1;
            }
        }
    }
    // Reordering at Alice's client: messages sent while she was online, in that session.
    let mut session_of: HashMap<u64, usize> = HashMap::new();
    for msg in &l.bob {
        if let Some(s) = msg.session {
            session_of.insert(msg.n, s);
        }
    }
    let mut by_session: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    let mut first_copy = HashSet::new();
    for &(s, n) in &l.xmpp_arrivals {
        if session_of.get(&n) == Some(&s) && first_copy.insert(n) {
            by_session.entry(s).or_default().push(n);
        }
    }
    let mut farthest_xmpp = 0;
    for arrivals in by_session.values() {
        let (late, far) = reordering(arrivals);
        xmpp.late += late;
        xmpp.ordered_of += arrivals.len();
        farthest_xmpp = farthest_xmpp.max(far);
    }

    // ---- the replies ----
    let replies = w.replies.lock().unwrap();
    let mut mail = Row::default();
    let mut mail_attempts = 0;
    let mut mail_lost = Vec::new();
    for r in replies.iter() {
        mail.sent += 1;
        mail_attempts += r.attempts;
        if r.refused.is_some() {
            mail.refused += 1;
        }
        let copies = l.at_bob.get(&r.token).copied().unwrap_or(0);
        if copies > 0 {
            mail.delivered += 1;
            mail.duplicates += copies - 1;
        }
        if r.acked {
            mail.acked += 1;
            if copies == 0 {
                mail.lost += 1;
                mail_lost.push(r.token.clone());
            }
        } else if copies == 0 {
            mail.in_flight += 1;
        }
    }
    let mut sms = Row::default();
    let mut sms_lost = Vec::new();
    for t in &l.mo_sent {
        sms.sent += 1;
        sms.acked += 1;
        let copies = l.at_bob.get(t).copied().unwrap_or(0);
        if copies > 0 {
            sms.delivered += 1;
            sms.duplicates += copies - 1;
        } else {
            sms.lost += 1;
            sms_lost.push(t.clone());
        }
    }
    for (row, prefix) in [(&mut mail, "mail"), (&mut sms, "sms")] {
        let order: Vec<u64> = l
            .bob_arrivals
            .iter()
            .filter(|t| t.starts_with(&format!("{prefix}-")))
            .map(|t| token_number(t))
            .collect();
        row.late = reordering(&order).0;
        row.ordered_of = order.len();
    }
    let mut conditions: BTreeMap<&str, usize> = BTreeMap::new();
    for c in l.bob_errors.values() {
        *conditions.entry(c.as_str()).or_default() += 1;
    }

    // ---- takeovers: how long after each kill another instance took over ----
    struct Takeover {
        by: &'static str,
        delay: f64,
        stanzas: usize,
        claims: usize,
    }
    let mut takeover_lines: Vec<(usize, f64, &'static str, usize, usize)> = Vec::new();
    for (inc, log) in logs.iter().enumerate() {
        let by = NAMES[w.incarnations[inc].instance];
        for line in log
            .lines()
            .filter(|l| l.contains("took over what a stopped instance left"))
        {
            let (Some(name), Some(at)) = (field(line, "instance"), line_time(line)) else {
                continue;
            };
            let Some(of) = NAMES.iter().position(|n| *n == name) else {
                continue;
            };
            let stanzas = field(line, "stanzas")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            let claims = field(line, "claims")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0);
            takeover_lines.push((of, at, by, stanzas, claims));
        }
    }
    let mut takeovers: Vec<Option<Takeover>> = Vec::new();
    let kills_list: Vec<(usize, f64)> = w
        .incarnations
        .iter()
        .filter_map(|inc| inc.killed.map(|k| (inc.instance, unix(k.1))))
        .collect();
    let cut_before: Vec<Option<f64>> = w
        .incarnations
        .iter()
        .filter_map(|inc| {
            let (at, _) = inc.killed?;
            Some(inc.link_cut.map(|c| (at - c).as_secs_f64()))
        })
        .collect();
    // How long each killed instance stayed down: until the next incarnation of it started.
    let down_for: Vec<f64> = w
        .incarnations
        .iter()
        .enumerate()
        .filter_map(|(n, inc)| {
            let (at, _) = inc.killed?;
            let back = w.incarnations[n + 1..]
                .iter()
                .position(|later| later.instance == inc.instance)
                .and_then(|k| w.restarted_at.get(&(n + 1 + k)).copied());
            Some(back.map_or(f64::NAN, |b| (b - at).as_secs_f64()))
        })
        .collect();
    let mut empty_takeovers = 0;
    for (k, &(instance, at)) in kills_list.iter().enumerate() {
        let next_kill_of_same = kills_list[k + 1..]
            .iter()
            .find(|(i, _)| *i == instance)
            .map_or(f64::MAX, |(_, t)| *t);
        // Usually one line; another instance looking at the same moment may log an empty
        // takeover just after the real one.
        let lines: Vec<&(usize, f64, &'static str, usize, usize)> = takeover_lines
            .iter()
            .filter(|(of, t, ..)| *of == instance && *t >= at - 0.01 && *t < next_kill_of_same)
            .collect();
        empty_takeovers += lines.len().saturating_sub(1);
        let earliest = lines.iter().map(|l| l.1).min_by(f64::total_cmp);
        let main = lines
            .iter()
            .max_by(|a, b| (a.3 + a.4).cmp(&(b.3 + b.4)).then(b.1.total_cmp(&a.1)));
        takeovers.push(earliest.zip(main).map(|(t, main)| Takeover {
            by: main.2,
            delay: t - at,
            stanzas: lines.iter().map(|l| l.3).sum(),
            claims: lines.iter().map(|l| l.4).sum(),
        }));
    }
    let mut delays: Vec<f64> = takeovers.iter().flatten().map(|t| t.delay).collect();
    delays.sort_by(f64::total_cmp);
    let moved: usize = takeovers.iter().flatten().map(|t| t.stanzas).sum();
    let released: usize = takeovers.iter().flatten().map(|t| t.claims).sum();
    let adopters: BTreeMap<&str, usize> =
        takeovers
            .iter()
            .flatten()
            .fold(BTreeMap::new(), |mut m, t| {
                *m.entry(t.by).or_default() += 1;
                m
            });

    // ---- the report ----
    let mut report = String::new();
    let r = &mut report;
    use std::fmt::Write;
    let _ = writeln!(
        r,
        "Reach soak with {} instances on PostgreSQL behind ejabberd (seed {seed}): {killed} SIGKILLs, one instance down at a time",
        NAMES.len()
    );
    let _ = writeln!(
        r,
        "setup {:.1} s, chaos {:.1} s, drain {:.1} s, total {:.1} s",
        setup_time.as_secs_f64(),
        chaos_time.as_secs_f64(),
        drain_time.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
    let _ = writeln!(
        r,
        "| flow | sent | refused | acknowledged | delivered | duplicates | lost (acknowledged) | in flight (unacknowledged, not delivered) | arrived after a later one |"
    );
    let _ = writeln!(r, "|---|---|---|---|---|---|---|---|---|");
    for (name, row) in [
        ("buddy XMPP -> Alice", &xmpp),
        ("Alice email reply -> buddy", &mail),
        ("Alice SMS reply -> buddy", &sms),
    ] {
        let _ = writeln!(
            r,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} of {} |",
            row.sent,
            row.refused,
            row.acked,
            row.delivered,
            row.duplicates,
            row.lost,
            row.in_flight,
            row.late,
            row.ordered_of
        );
    }
    let _ = writeln!(
        r,
        "buddy messages: read per instance {:?} (a b c), read twice {read_twice}; acknowledged as read by a process that ran to the end {acked_by_survivor}, by a later delivered one {acked_by_later}; in flight: read by a process killed before its commit {flight_read}, never read {flight_unread} (of which not within {} s before a kill: {}); first delivered by XMPP {}, email {}, SMS {}; farthest reordering at Alice's client {farthest_xmpp} places",
        per_instance,
        KILL_WINDOW.as_secs(),
        unexplained.len(),
        routes.get(&Route::Xmpp).unwrap_or(&0),
        routes.get(&Route::Email).unwrap_or(&0),
        routes.get(&Route::Sms).unwrap_or(&0),
    );
    let _ = writeln!(
        r,
        "replies: {} SMTP attempts for {} email replies (through the balancer: connections per instance {:?}); SMS webhook connections per instance {:?}; errors the buddy got: {conditions:?}",
        mail_attempts,
        mail.sent,
        w.smtp.served(),
        w.webhook.served(),
    );
    let median = delays.get(delays.len() / 2).copied().unwrap_or(f64::NAN);
    let _ = writeln!(
        r,
        "takeovers: {} of {killed} kills taken over by another instance before the restart (by {adopters:?}), {} back first; delay after the kill: min {:.2} s, median {:.2} s, max {:.2} s; stanzas moved {moved}, claims released {released} (empty takeovers logged by a second instance: {empty_takeovers})",
        delays.len(),
        killed - delays.len(),
        delays.first().copied().unwrap_or(f64::NAN),
        median,
        delays.last().copied().unwrap_or(f64::NAN),
    );
    for (k, ((instance, _), takeover)) in kills_list.iter().zip(&takeovers).enumerate() {
        let _ = writeln!(
            r,
            "kill {}: {}{} down {:.1} s; {}",
            k + 1,
            NAMES[*instance],
            match cut_before.get(k).copied().flatten() {
                Some(c) => format!(" (its link cut {c:.1} s before)"),
                None => String::new(),
            },
            down_for.get(k).copied().unwrap_or(f64::NAN),
            match takeover {
                Some(t) => format!(
                    "taken over by {} {:.2} s after the kill (stanzas {}, claims {})",
                    t.by, t.delay, t.stanzas, t.claims
                ),
                None => "back before a takeover".to_owned(),
            }
        );
    }
    println!("\n{report}");
    if let Ok(path) = std::env::var("REACH_SOAK_REPORT") {
        let _ = std::fs::write(Path::new(&path), &report);
    }

    assert_eq!(killed, kills);
    assert!(
        xmpp.lost == 0 && mail.lost == 0 && sms.lost == 0,
        "acknowledged items were lost:\n{report}\nXMPP: {lost:?}\nemail replies: {mail_lost:?}\nSMS replies: {sms_lost:?}"
    );
    assert_eq!(read_twice, 0, "a stanza read by two instances:\n{report}");
    assert!(
        unexplained.is_empty(),
        "buddy messages never read by any instance, with no kill near them: {unexplained:?}\n{report}"
    );
    assert_eq!(mail.refused, 0, "a reply was refused with 5xx:\n{report}");
    assert!(
        xmpp.delivered > 0 && mail.delivered > 0 && sms.delivered > 0,
        "every flow carried something:\n{report}"
    );
}
