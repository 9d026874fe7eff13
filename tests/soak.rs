//! Crash and restart soak: the built `reach` against a real Prosody, a real SMTP relay (aiosmtpd)
//! and a real Kannel (fake SMSC, the test holding the handset), killed with SIGKILL at random
//! moments while a buddy writes to Alice and Alice answers by email and by SMS; Prosody, the relay
//! and Kannel are restarted a few times too. Then everything drains and the test counts what each
//! side sent, what was acknowledged, what arrived, how often, and what was lost.
//!
//! Environment (all optional):
//! - `REACH_SOAK_KILLS`: how many times `reach` is killed (default 3, the short run of
//!   `scripts/test`; `scripts/soak` runs 50+).
//! - `REACH_SOAK_SECONDS`: the least time the kills are spread over (default 20; with many kills
//!   the random 100–800 ms gaps take longer anyway).
//! - `REACH_SOAK_SEED`: the random seed (printed in the report), to replay a run.
//! - `REACH_SOAK_REPORT`: a file to write the report to (it is always printed too).
//! - `REACH_SOAK_STORE`: `sled` or `postgres` runs only the soak on that store (default: both
//!   tests run, `acknowledged_items_survive_kills_and_restarts` on the embedded store and
//!   `..._on_postgres` on a private PostgreSQL server, which is restarted a few times too).
//! - `REACH_SOAK_REPLIES`: by default (`any`) Alice answers by email and SMS at any time, also
//!   while the buddy's latest messages still wait for their forward (the case that once lost
//!   messages, see RELIABILITY.md); `xmpp` lets her answer only while she is on XMPP (and stay
//!   there until her answers arrived), which keeps a run about crashes alone.
//!
//! What counts as acknowledged, per flow:
//! - Buddy → Alice over XMPP: XEP-0114 has no acknowledgements, so "what Reach received before
//!   its last commit" is inferred. Reach takes the link's stanzas in order and commits them in
//!   order (one flush per batch), so within one epoch (the time between two disruptions: a kill of
//!   `reach` or a restart of Prosody), if a message arrived, every earlier message of that epoch
//!   that Prosody did not bounce was committed too. Those are "acknowledged"; one of them missing
//!   is a loss. A message Prosody bounced (the buddy got an error) is "refused": the sender knows.
//!   The rest (sent just before a disruption, never seen, never bounced) were in flight on a
//!   socket, which DESIGN.md allows; they are reported as "in flight". A gap in the last 3 s before
//!   a Prosody restart is the outbound side of a link drop (also allowed) and reported as such.
//! - Alice's email replies: acknowledged when Reach's listener said 250. The test retries like an
//!   MTA (same Message-ID) until it hears 250 or a 5xx.
//! - Alice's SMS replies: acknowledged once Kannel has them (the handset wrote them to the fake
//!   SMSC while Kannel was up); Kannel retries its webhook call until Reach answers 200.
//!
//! Delivered items are recognised by a unique token in the text; duplicates (the same token more
//! than once, e.g. a stanza or mail re-sent after a crash before its dequeue was committed) are
//! counted and removed by token. Lost acknowledged items must be 0.

mod support;

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
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
/// The buddy writes this often.
const BOB_EVERY: Duration = Duration::from_millis(70);
/// Alice's terminal changes this often (XMPP, email, SMS in turn).
const MODE_EVERY: Duration = Duration::from_millis(2500);
/// A gap this close before a Prosody restart is the outbound side of a link drop.
const LINK_DROP_WINDOW: Duration = Duration::from_secs(3);

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

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Disruption {
    Kill,
    ProsodyRestart,
}

struct BobMsg {
    id: String,
    token: String,
    epoch: usize,
}

struct MailReply {
    token: String,
    attempts: u32,
    acked: bool,
    /// A permanent refusal (5xx): the "sender" knows.
    refused: Option<String>,
    done: bool,
}

#[derive(Default)]
struct Ledger {
    bob: Vec<BobMsg>,
    /// Errors the buddy got, by message id: the condition.
    bob_errors: HashMap<String, String>,
    /// Where each of the buddy's tokens arrived, every copy.
    at_alice: HashMap<String, Vec<Route>>,
    /// Disruptions in order: (when, what). Epoch `n` ends with disruption `n`.
    disruptions: Vec<(Instant, Disruption)>,
    /// Alice's SMS replies the handset wrote while Kannel was up.
    mo_sent: Vec<String>,
    /// Alice's replies (tokens) that reached the buddy, every copy.
    at_bob: HashMap<String, usize>,
    /// What happened, in order, for the failure report.
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

/// Incremental reader of Reach's log: counts "component link up".
struct LogWatch {
    path: PathBuf,
    offset: u64,
    ups: usize,
    carry: String,
}

impl LogWatch {
    fn poll(&mut self) -> usize {
        use std::io::{Read, Seek, SeekFrom};
        if let Ok(mut f) = std::fs::File::open(&self.path) {
            if f.seek(SeekFrom::Start(self.offset)).is_ok() {
                let mut buf = Vec::new();
                if let Ok(n) = f.read_to_end(&mut buf) {
                    self.offset += n as u64;
                    self.carry.push_str(&String::from_utf8_lossy(&buf));
                    if let Some(end) = self.carry.rfind('\n') {
                        self.ups += self.carry[..end].matches("component link up").count();
                        self.carry.drain(..=end);
                    }
                }
            }
        }
        self.ups
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
                _ if Instant::now() >= deadline => {}
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

/// Where the soak's Reach keeps its store.
enum SoakStore {
    Sled,
    /// A private PostgreSQL server (restarted during the soak, so not the shared one).
    Postgres(PgCluster),
}

struct World {
    server: Server,
    store: SoakStore,
    kannel: Kannel,
    phone: Handset,
    sink: MailSink,
    reach: Reach,
    config: String,
    smtp_port: u16,
    state: tempfile::TempDir,
    log: LogWatch,
    bob: Client,
    alice: Option<Client>,
    ledger: Ledger,
    replies: Arc<Mutex<Vec<MailReply>>>,
    reply_tasks: Vec<tokio::task::JoinHandle<()>>,
    seen_mails: HashSet<PathBuf>,
    rng: StdRng,
    next_token: u64,
    /// SMS replies are possible once a forwarded SMS started a conversation.
    sms_conversation: bool,
    replying: bool,
    /// Alice also answers while messages wait for her email or phone (the default);
    /// `REACH_SOAK_REPLIES=xmpp`: only while she is on XMPP (see the note at the top of this file).
    replies_anytime: bool,
    /// The newest reply alias, for answering by email.
    alias: Option<String>,
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            let keep = std::env::temp_dir().join(format!("reach-soak-{}", std::process::id()));
            let _ = std::fs::create_dir_all(&keep);
            let _ = std::fs::copy(self.state.path().join("reach.log"), keep.join("reach.log"));
            let _ = std::fs::copy(
                self.server.dir().join("debug.log"),
                keep.join("prosody.log"),
            );
            for mail in self.sink.mails() {
                if let Some(name) = mail.path.file_name() {
                    let _ = std::fs::create_dir_all(keep.join("mail"));
                    let _ = std::fs::write(keep.join("mail").join(name), &mail.raw);
                }
            }
            let _ = std::fs::write(keep.join("trace.txt"), self.ledger.trace.join("\n"));
            eprintln!("logs kept in {}", keep.display());
            eprintln!(
                "--- reach log (tail) ---\n{}\n--- kannel ---\n{}",
                support::process::tail(&self.state.path().join("reach.log"), 80),
                self.kannel.logs(20)
            );
        }
    }
}

async fn login(server: &Server, user: &str) -> Client {
    let mut c = Client::connect(server, user, &format!("{user}pw"), "soak").await;
    c.presence("").await;
    c
}

impl World {
    async fn new(seed: u64, store: SoakStore) -> World {
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
        let smtp_port = support::free_port();
        // The forwarding-email limit, where this build has one, must not be what the soak measures.
        let example = include_str!("../config.toml.example");
        let limits = if example.contains("emails_per_user_per_hour") {
            "[limits]\nemails_per_user_per_hour = 100000\n\n"
        } else {
            ""
        };
        let extra = format!(
            "{limits}[routing]\ngrace_delay_secs = 3\n\n\
             [email]\nrelay = \"smtp://127.0.0.1:{}\"\nfrom_address = \"reach@{D}\"\nreply_domain = \"{D}\"\n\
             listen = \"127.0.0.1:{smtp_port}\"\ndigest_window_secs = 1\n\n\
             [sms]\nsendsms_url = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\nfrom = \"{SERVICE_NUMBER}\"\n\
             webhook_listen = \"127.0.0.1:{webhook_port}\"\nwebhook_url = \"http://127.0.0.1:{webhook_port}\"\n\
             webhook_secret = \"{SECRET}\"\ndaily_cap = 100000\nrate_per_second = 100\nallowed_prefixes = [\"+1\"]\n",
            sink.port,
            kannel.sendsms_url(),
            kannel.username(),
            kannel.password()
        );
        let store_at = match &store {
            SoakStore::Sled => StoreAt::Sled,
            SoakStore::Postgres(cluster) => StoreAt::Postgres {
                url: cluster.create_database(),
                instance: "soak".to_owned(),
            },
        };
        let mut config = Reach::config_at(&server, state.path(), &store_at);
        config.push('\n');
        config.push_str(&extra);
        let reach = Reach::start_config(state.path(), &config).await;
        let mut bob = login(&server, "bob").await;
        support::wait_for_component(&mut bob, D).await;
        let log = LogWatch {
            path: state.path().join("reach.log"),
            offset: 0,
            ups: 0,
            carry: String::new(),
        };
        World {
            server,
            store,
            kannel,
            phone,
            sink,
            reach,
            config,
            smtp_port,
            state,
            log,
            bob,
            alice: None,
            ledger: Ledger::default(),
            replies: Arc::new(Mutex::new(Vec::new())),
            reply_tasks: Vec::new(),
            seen_mails: HashSet::new(),
            rng: StdRng::seed_from_u64(seed),
            next_token: 1,
            sms_conversation: false,
            replying: true,
            replies_anytime: std::env::var("REACH_SOAK_REPLIES").map_or(true, |v| v != "xmpp"),
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

    /// Alice registers her phone and email, verifies both; email is `away` and primary, so the
    /// phone gets messages while it is `available` (`/back`) and email while it is `away`.
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
        self.alice = Some(alice);
    }

    /// Whether Alice answers now.
    fn may_reply(&self) -> bool {
        self.replying && (self.replies_anytime || self.alice.is_some())
    }

    /// Replies still on their way to the buddy.
    fn replies_outstanding(&self) -> bool {
        let mail = self
            .replies
            .lock()
            .unwrap()
            .iter()
            .any(|r| !r.done || (r.acked && !self.ledger.at_bob.contains_key(&r.token)));
        mail || self
            .ledger
            .mo_sent
            .iter()
            .any(|t| !self.ledger.at_bob.contains_key(t))
    }

    fn token(&mut self, prefix: &str) -> String {
        let t = format!("{prefix}-{}", self.next_token);
        self.next_token += 1;
        t
    }

    fn epoch(&self) -> usize {
        self.ledger.disruptions.len()
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
        self.ledger.bob.push(BobMsg {
            id,
            token,
            epoch: self.epoch(),
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
                .bob_errors
                .insert(attr(el, "id").to_owned(), condition);
            return;
        }
        if let Some(text) = body(el) {
            for t in tokens(&text, "mail")
                .into_iter()
                .chain(tokens(&text, "sms"))
            {
                *self.ledger.at_bob.entry(t).or_default() += 1;
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
        if !self.phone.is_closed() {
            while let Some(mt) = self.phone.recv_mt(Duration::from_millis(1)).await {
                let before = self.ledger.at_alice.len();
                self.ledger.trace(format!("MT {:?}", mt.text));
                self.note_alice_text(&mt.text, Route::Sms);
                if !tokens(&mt.text, "msg").is_empty() {
                    self.sms_conversation = true;
                    if self.may_reply() && self.rng.gen_bool(0.5) && before > 0 {
                        self.text_back().await;
                    }
                }
                if self.phone.is_closed() {
                    break;
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
                if self.may_reply() && self.rng.gen_bool(0.5) {
                    self.mail_back();
                }
            }
        }
    }

    /// Alice answers the newest forwarded email.
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
            self.smtp_port,
            alias,
            token,
            slot,
            self.replies.clone(),
        )));
    }

    async fn text_back(&mut self) {
        if !self.sms_conversation || self.phone.is_closed() {
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
                    self.alice = Some(login(&self.server, "alice").await);
                }
            }
            Mode::Email | Mode::Sms => {
                self.alice_leaves().await;
                if !self.phone.is_closed() {
                    let line = if mode == Mode::Sms { "/back" } else { "/away" };
                    self.phone.send_mo(PHONE, SERVICE_NUMBER, line).await;
                }
            }
        }
    }

    async fn kill_reach(&mut self) {
        self.reach.kill();
        self.ledger.trace("kill reach");
        self.ledger
            .disruptions
            .push((Instant::now(), Disruption::Kill));
        self.reach = Reach::start_config(self.state.path(), &self.config).await;
    }

    async fn restart_prosody(&mut self, mode: Mode) {
        self.poll().await;
        self.ledger
            .disruptions
            .push((Instant::now(), Disruption::ProsodyRestart));
        self.ledger.trace("restart prosody");
        let alice_was_on = self.alice.take().is_some();
        self.server.restart().await;
        self.bob = login(&self.server, "bob").await;
        if alice_was_on || mode == Mode::Xmpp {
            self.alice = Some(login(&self.server, "alice").await);
        }
    }

    async fn restart_kannel(&mut self) {
        self.poll().await;
        self.ledger.trace("restart kannel");
        self.phone.disconnect();
        self.kannel.restart().await;
        self.phone.reconnect(&self.kannel).await;
    }

    /// Restarts PostgreSQL (a fast shutdown, then a start): Reach's batches wait for it.
    async fn restart_postgres(&mut self) {
        if let SoakStore::Postgres(cluster) = &self.store {
            self.ledger.trace("restart postgres");
            tokio::task::block_in_place(|| cluster.restart());
        }
    }

    async fn restart_sink(&mut self) {
        self.sink.stop();
        tokio::time::sleep(Duration::from_millis(self.rng.gen_range(200..1200))).await;
        self.sink.resume().await;
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
    link_drop: usize,
}

/// Whether the soak on `store` runs (`REACH_SOAK_STORE` picks one).
fn soak_on(store: &str) -> bool {
    std::env::var("REACH_SOAK_STORE").map_or(true, |s| s.is_empty() || s == store)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_items_survive_kills_and_restarts() {
    if soak_on("sled") {
        soak(SoakStore::Sled).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_items_survive_kills_and_restarts_on_postgres() {
    if soak_on("postgres") {
        let cluster = tokio::task::spawn_blocking(PgCluster::start).await.unwrap();
        soak(SoakStore::Postgres(cluster)).await;
    }
}

async fn soak(store: SoakStore) {
    let on_postgres = matches!(store, SoakStore::Postgres(_));
    let kills = env_num("REACH_SOAK_KILLS", 3) as usize;
    let min_secs = env_num("REACH_SOAK_SECONDS", 20);
    let seed = env_num("REACH_SOAK_SEED", rand::random::<u32>() as u64);
    let started = Instant::now();
    let mut w = World::new(seed, store).await;
    w.setup_alice().await;
    let setup_time = started.elapsed();

    // Restarts of each server, spread over the kills (a few each; at least one).
    let restarts = (kills / 16).clamp(1, 5);
    let mut plan: BTreeMap<usize, Vec<&str>> = BTreeMap::new();
    for i in 0..restarts {
        let at = |offset: usize| {
            (kills * (3 * i + offset) / (3 * restarts)).min(kills.saturating_sub(1))
        };
        plan.entry(at(1)).or_default().push("prosody");
        plan.entry(at(2)).or_default().push("relay");
        plan.entry(at(3).min(kills.saturating_sub(1)))
            .or_default()
            .push("kannel");
        if on_postgres {
            plan.entry(at(2)).or_default().push("postgres");
        }
    }
    let extra_gap = (min_secs * 1000 / kills.max(1) as u64).saturating_sub(450);

    let modes = [Mode::Xmpp, Mode::Email, Mode::Sms];
    let mut mode_index = 0;
    let mut mode = modes[0];
    let mut next_mode = Instant::now() + MODE_EVERY;
    let mut next_bob = Instant::now();
    let mut next_mail_poll = Instant::now();
    let mut next_mo = Instant::now() + Duration::from_secs(1);
    let mut by_mail = false;
    let (mut killed, mut restarted) = (0usize, HashMap::<&str, usize>::new());
    let mut kill_at: Option<Instant> =
        Some(Instant::now() + Duration::from_millis(w.rng.gen_range(100..800) + extra_gap));
    // Some kills wait for the link to come up first, so that traffic flows between crashes.
    let mut wait_link_from: Option<(usize, Instant)> = None;
    w.log.poll();
    let chaos_start = Instant::now();
    while killed < kills || chaos_start.elapsed() < Duration::from_secs(min_secs) {
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
            if w.may_reply() {
                // Email and SMS in turn, so that both flows carry something in a short run.
                by_mail = !by_mail;
                if w.alias.is_some() && by_mail {
                    w.mail_back();
                } else {
                    w.text_back().await;
                }
            }
            next_mo = now + Duration::from_millis(w.rng.gen_range(150..700));
        }
        // Unless replies may come at any time, Alice stays on XMPP until hers have arrived
        // (for at most 10 s).
        let hold_mode = !w.replies_anytime
            && mode == Mode::Xmpp
            && now < next_mode + Duration::from_secs(10)
            && w.replies_outstanding();
        if now >= next_mode && !hold_mode {
            mode_index += 1;
            mode = modes[mode_index % modes.len()];
            w.set_mode(mode).await;
            next_mode = Instant::now() + MODE_EVERY;
        }
        if killed < kills {
            if let Some((ups, since)) = wait_link_from {
                // (a link that does not come up within 5 s is killed anyway)
                if w.log.poll() > ups || since.elapsed() > Duration::from_secs(5) {
                    wait_link_from = None;
                    kill_at =
                        Some(now + Duration::from_millis(w.rng.gen_range(100..800) + extra_gap));
                }
            }
            if kill_at.is_some_and(|at| now >= at) {
                w.kill_reach().await;
                kill_at = None;
                if w.rng.gen_bool(0.5) {
                    // Kill again while it starts up (or just after).
                    kill_at = Some(
                        Instant::now()
                            + Duration::from_millis(w.rng.gen_range(100..800) + extra_gap),
                    );
                } else {
                    wait_link_from = Some((w.log.poll(), Instant::now()));
                }
                for what in plan.get(&killed).cloned().unwrap_or_default() {
                    match what {
                        "prosody" => w.restart_prosody(mode).await,
                        "relay" => w.restart_sink().await,
                        "postgres" => w.restart_postgres().await,
                        _ => w.restart_kannel().await,
                    }
                    *restarted.entry(what).or_default() += 1;
                }
                killed += 1;
            }
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let chaos_time = chaos_start.elapsed();

    // Drain: no new traffic; Reach stays up. A few seconds in the current mode, then Alice comes
    // back to XMPP so that anything held for her client arrives; stop when nothing moved for 8 s
    // and every acknowledged reply arrived (bounded).
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
        let replies_done = w.replies.lock().unwrap().iter().all(|r| r.done);
        let replies_in = {
            let all = w.replies.lock().unwrap();
            all.iter()
                .filter(|r| r.acked)
                .all(|r| w.ledger.at_bob.contains_key(&r.token))
                && w.ledger
                    .mo_sent
                    .iter()
                    .all(|t| w.ledger.at_bob.contains_key(t))
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

    // Counting.
    let l = &w.ledger;
    let mut xmpp = Row::default();
    let mut routes: BTreeMap<Route, usize> = BTreeMap::new();
    let mut gaps = Vec::new();
    let epochs = l.disruptions.len() + 1;
    for epoch in 0..epochs {
        let msgs: Vec<&BobMsg> = l.bob.iter().filter(|m| m.epoch == epoch).collect();
        let last = msgs.iter().rposition(|m| l.at_alice.contains_key(&m.token));
        for (i, m) in msgs.iter().enumerate() {
            xmpp.sent += 1;
            let copies = l.at_alice.get(&m.token);
            let refused = l.bob_errors.contains_key(&m.id);
            if let Some(copies) = copies {
                xmpp.delivered += 1;
                xmpp.duplicates += copies.len() - 1;
                *routes.entry(copies[0]).or_default() += 1;
            }
            if refused {
                xmpp.refused += 1;
                continue;
            }
            if last.is_some_and(|last| i <= last) {
                xmpp.acked += 1;
                if copies.is_none() {
                    gaps.push((epoch, m.token.clone()));
                }
            } else if copies.is_none() {
                xmpp.in_flight += 1;
            }
        }
    }
    // Gaps in an epoch ended by a Prosody restart, among its last messages, are a link drop.
    let per_epoch_count: HashMap<usize, usize> = l.bob.iter().fold(HashMap::new(), |mut m, b| {
        *m.entry(b.epoch).or_default() += 1;
        m
    });
    let tail_len = (LINK_DROP_WINDOW.as_millis() / BOB_EVERY.as_millis()) as usize;
    for (epoch, token) in &gaps {
        let ended_by_prosody = matches!(
            l.disruptions.get(*epoch),
            Some((_, Disruption::ProsodyRestart))
        );
        let index = l
            .bob
            .iter()
            .filter(|m| m.epoch == *epoch)
            .position(|m| &m.token == token)
            .unwrap();
        if ended_by_prosody && index + tail_len >= per_epoch_count[epoch] {
            xmpp.link_drop += 1;
        } else {
            xmpp.lost += 1;
        }
    }

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
    let mut conditions: BTreeMap<&str, usize> = BTreeMap::new();
    for c in l.bob_errors.values() {
        *conditions.entry(c.as_str()).or_default() += 1;
    }

    let mut report = String::new();
    let r = &mut report;
    use std::fmt::Write;
    let _ = writeln!(
        r,
        "Reach soak on {} (seed {seed}, replies {}): {killed} SIGKILLs of reach; restarts: Prosody {}, SMTP relay {}, Kannel {}{}",
        if on_postgres { "PostgreSQL" } else { "the embedded store" },
        if w.replies_anytime { "any time" } else { "while on XMPP" },
        restarted.get("prosody").unwrap_or(&0),
        restarted.get("relay").unwrap_or(&0),
        restarted.get("kannel").unwrap_or(&0),
        if on_postgres {
            format!(", PostgreSQL {}", restarted.get("postgres").unwrap_or(&0))
        } else {
            String::new()
        }
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
        "| flow | sent | refused | acknowledged | delivered | duplicates | lost (acknowledged) | in flight (unacknowledged, not delivered) | link drop (allowed) |"
    );
    let _ = writeln!(r, "|---|---|---|---|---|---|---|---|---|");
    for (name, row) in [
        ("buddy XMPP -> Alice", &xmpp),
        ("Alice email reply -> buddy", &mail),
        ("Alice SMS reply -> buddy", &sms),
    ] {
        let _ = writeln!(
            r,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.sent,
            row.refused,
            row.acked,
            row.delivered,
            row.duplicates,
            row.lost,
            row.in_flight,
            row.link_drop
        );
    }
    let _ = writeln!(
        r,
        "buddy messages first delivered by: XMPP {}, email {}, SMS {}; SMTP attempts for {} replies: {mail_attempts}; errors the buddy got: {conditions:?}",
        routes.get(&Route::Xmpp).unwrap_or(&0),
        routes.get(&Route::Email).unwrap_or(&0),
        routes.get(&Route::Sms).unwrap_or(&0),
        mail.sent,
    );
    println!("\n{report}");
    if let Ok(path) = std::env::var("REACH_SOAK_REPORT") {
        // Appended: the soak on each store adds its report.
        use std::io::Write as _;
        if let Ok(mut file) = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(Path::new(&path))
        {
            let _ = writeln!(file, "{report}");
        }
    }

    assert_eq!(killed, kills);
    assert!(
        xmpp.lost == 0 && mail.lost == 0 && sms.lost == 0,
        "acknowledged items were lost:\n{report}\nXMPP gaps (epoch, token): {gaps:?}\nemail replies: {mail_lost:?}\nSMS replies: {sms_lost:?}"
    );
    assert_eq!(mail.refused, 0, "a reply was refused with 5xx:\n{report}");
    assert!(
        xmpp.delivered > 0 && mail.delivered > 0 && sms.delivered > 0,
        "every flow carried something:\n{report}"
    );
}
