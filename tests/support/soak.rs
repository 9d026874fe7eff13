//! What the two crash soaks share (`tests/soak.rs`: one Reach killed and restarted among
//! restarts of its servers; `tests/instances_soak.rs`: three instances on PostgreSQL, one killed
//! at a time): the conversation they keep going while processes die, and its ledger.
//!
//! A buddy (Bob) writes to Alice every [`BOB_EVERY`]; Alice switches between XMPP, email and SMS
//! every [`MODE_EVERY`] and answers by email (retried like an MTA: same Message-ID until 250 or a
//! 5xx) and by SMS. Every message carries a unique token (`msg-N`, `mail-N`, `sms-N`), and the
//! [`Ledger`] notes what each side sent, what was acknowledged and where and how often each
//! token arrived. At the end [`Conversation::drain`] lets everything arrive, and the replies'
//! rows of the report are counted alike ([`Conversation::reply_rows`], [`write_flow_table`]).
//! What counts as an acknowledged buddy message differs between the soaks (see each file).

use std::collections::{BTreeMap, HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpStream;

use super::account::{self, ALICE_MAIL, PHONE, SERVICE_NUMBER};
use super::kannel::Handset;
use super::mail::MailSink;
use super::server::COMPONENT_DOMAIN;
use super::tokens::{token_number, tokens};
use super::{attr, body, Client, Element, Server};

/// The buddy writes this often.
pub const BOB_EVERY: Duration = Duration::from_millis(70);
/// Alice's terminal changes this often (XMPP, email, SMS in turn).
pub const MODE_EVERY: Duration = Duration::from_millis(2500);
/// After logging in, Alice's session counts for the reordering figures once this has passed.
pub const SETTLED: Duration = Duration::from_millis(500);
/// How long the soaks wait for a login, an answer or a code at the start.
const T: Duration = Duration::from_secs(15);

/// A number from the environment (`REACH_SOAK_...`), or `default`.
pub fn env_num(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

/// Logs `user` (password `USERpw`) in as resource `soak`, available.
pub async fn login(server: &Server, user: &str) -> Client {
    let mut c = Client::connect(server, user, &format!("{user}pw"), "soak").await;
    c.presence("").await;
    c
}

/// How a buddy message reached Alice.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Route {
    Xmpp,
    Email,
    Sms,
}

/// Where Alice reads her messages: on XMPP, or offline with her email (`/away`) or her phone
/// (`/back`) as the terminal Reach uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Xmpp,
    Email,
    Sms,
}

/// One of the buddy's messages.
pub struct BobMsg {
    /// Its N (the token is `msg-N`).
    pub n: u64,
    pub id: String,
    pub token: String,
    pub sent_at: Instant,
    /// [`Conversation::epoch`] when it was sent.
    pub epoch: usize,
    /// Alice's XMPP session that was online (and settled) when it was sent.
    pub session: Option<usize>,
}

/// One of Alice's email replies, as its MTA-like sender sees it.
pub struct MailReply {
    pub token: String,
    pub attempts: u32,
    pub acked: bool,
    /// A permanent refusal (5xx): the "sender" knows.
    pub refused: Option<String>,
    pub done: bool,
}

/// What each side sent and got.
#[derive(Default)]
pub struct Ledger {
    pub bob: Vec<BobMsg>,
    /// Errors the buddy got, by message id: the condition.
    pub bob_errors: HashMap<String, String>,
    /// Where each of the buddy's tokens arrived, every copy.
    pub at_alice: HashMap<String, Vec<Route>>,
    /// Buddy messages at Alice's client, in arrival order: (session, n).
    pub xmpp_arrivals: Vec<(usize, u64)>,
    /// Alice's SMS replies the handset wrote while Kannel was up, and when.
    pub mo_sent: Vec<(String, Instant)>,
    /// When Kannel was stopped (to be started again).
    pub kannel_stops: Vec<Instant>,
    /// Alice's replies (tokens) that reached the buddy, every copy.
    pub at_bob: HashMap<String, usize>,
    /// Reply tokens at the buddy, first copies, in arrival order.
    pub bob_arrivals: Vec<String>,
    /// What happened, in order, for the failure report.
    pub trace: Vec<String>,
    t0: Option<Instant>,
}

/// Kannel 1.4.5's smsbox tells bearerbox it has a text as it starts the webhook call, and keeps
/// the call's retries (every `http-queue-delay`, 1 s in the tests' config) in memory only: a text
/// whose call has not succeeded when smsbox stops is gone with it, before Reach ever saw it.
/// Texts written this long before a stop of Kannel and never delivered are counted in flight.
pub const KANNEL_IN_MEMORY: Duration = Duration::from_secs(3);

impl Ledger {
    /// Whether an SMS reply is Kannel's to lose: written shortly before Kannel stopped.
    pub fn mo_in_kannels_memory(&self, sent_at: Instant) -> bool {
        self.kannel_stops
            .iter()
            .any(|&stop| stop >= sent_at && stop - sent_at <= KANNEL_IN_MEMORY)
    }

    /// The SMS replies that count as acknowledged (see [`KANNEL_IN_MEMORY`]).
    pub fn mo_acked(&self) -> impl Iterator<Item = &String> {
        self.mo_sent
            .iter()
            .filter(|(_, at)| !self.mo_in_kannels_memory(*at))
            .map(|(t, _)| t)
    }

    pub fn trace(&mut self, what: impl Into<String>) {
        let t0 = *self.t0.get_or_insert_with(Instant::now);
        self.trace.push(format!(
            "{:9.3} {}",
            t0.elapsed().as_secs_f64(),
            what.into()
        ));
    }
}

/// One flow's line of the report.
#[derive(Default, Debug)]
pub struct Row {
    pub sent: usize,
    pub refused: usize,
    pub acked: usize,
    pub delivered: usize,
    pub duplicates: usize,
    pub lost: usize,
    pub in_flight: usize,
    /// Gaps just before a restart of the XMPP server: the outbound side of a link drop.
    pub link_drop: usize,
    /// How many arrived after one sent later, of `ordered_of`.
    pub late: usize,
    pub ordered_of: usize,
}

/// The replies' rows: Alice's email replies and her SMS replies.
pub struct ReplyRows {
    pub mail: Row,
    /// SMTP transactions tried for all email replies.
    pub mail_attempts: u32,
    pub mail_lost: Vec<String>,
    pub sms: Row,
    pub sms_lost: Vec<String>,
}

/// The report's table, a line per flow (the buddy's messages, Alice's email and SMS replies);
/// the last column is `last_column`, its cells `last_cell` of each row.
pub fn write_flow_table(
    out: &mut String,
    last_column: &str,
    [xmpp, mail, sms]: [&Row; 3],
    last_cell: impl Fn(&Row) -> String,
) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "| flow | sent | refused | acknowledged | delivered | duplicates | lost (acknowledged) | in flight (unacknowledged, not delivered) | {last_column} |"
    );
    let _ = writeln!(out, "|---|---|---|---|---|---|---|---|---|");
    for (name, row) in [
        ("buddy XMPP -> Alice", xmpp),
        ("Alice email reply -> buddy", mail),
        ("Alice SMS reply -> buddy", sms),
    ] {
        let _ = writeln!(
            out,
            "| {name} | {} | {} | {} | {} | {} | {} | {} | {} |",
            row.sent,
            row.refused,
            row.acked,
            row.delivered,
            row.duplicates,
            row.lost,
            row.in_flight,
            last_cell(row)
        );
    }
}

/// The report's line on how long each phase took.
pub fn write_phases(
    out: &mut String,
    setup: Duration,
    chaos: Duration,
    drain: Duration,
    started: Instant,
) {
    use std::fmt::Write;
    let _ = writeln!(
        out,
        "setup {:.1} s, chaos {:.1} s, drain {:.1} s, total {:.1} s",
        setup.as_secs_f64(),
        chaos.as_secs_f64(),
        drain.as_secs_f64(),
        started.elapsed().as_secs_f64()
    );
}

/// One SMTP transaction that never panics: Ok(final code) or Err(why it did not finish).
pub async fn try_submit(port: u16, from: &str, rcpt: &str, message: &str) -> Result<u16, String> {
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
pub async fn deliver_reply(
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

/// Alice, her buddy, her phone and the relay's mailbox, and the ledger of what went between
/// them (see the module comment).
pub struct Conversation {
    pub bob: Client,
    pub alice: Option<Client>,
    pub phone: Handset,
    /// The relay Reach forwards Alice's email to.
    pub sink: MailSink,
    /// Where Alice's email replies are submitted (Reach's listener, or a balancer in front).
    smtp_port: u16,
    pub ledger: Ledger,
    pub replies: Arc<Mutex<Vec<MailReply>>>,
    reply_tasks: Vec<tokio::task::JoinHandle<()>>,
    seen_mails: HashSet<PathBuf>,
    /// The soak's random choices (seeded, to replay a run).
    pub rng: StdRng,
    next_token: u64,
    /// SMS replies are possible once a forwarded SMS started a conversation.
    sms_conversation: bool,
    /// Alice answers at all (not while draining).
    pub replying: bool,
    /// Alice also answers while messages wait for her email or phone; otherwise only while she
    /// is on XMPP (`REACH_SOAK_REPLIES=xmpp` in `tests/soak.rs`).
    pub replies_anytime: bool,
    /// The newest reply alias, for answering by email.
    pub alias: Option<String>,
    /// Alice's XMPP sessions so far, and when the current one logged in.
    pub sessions: usize,
    alice_since: Option<Instant>,
    /// Disruptions so far: the buddy's messages are noted with it.
    pub epoch: usize,
}

impl Conversation {
    /// The buddy logs in (once Reach answers him); Alice is not set up yet.
    pub async fn new(
        server: &Server,
        phone: Handset,
        sink: MailSink,
        smtp_port: u16,
        seed: u64,
        replies_anytime: bool,
    ) -> Conversation {
        let mut bob = login(server, "bob").await;
        super::wait_for_component(&mut bob, COMPONENT_DOMAIN).await;
        Conversation {
            bob,
            alice: None,
            phone,
            sink,
            smtp_port,
            ledger: Ledger::default(),
            replies: Arc::new(Mutex::new(Vec::new())),
            reply_tasks: Vec::new(),
            seen_mails: HashSet::new(),
            rng: StdRng::seed_from_u64(seed),
            next_token: 1,
            sms_conversation: false,
            replying: true,
            replies_anytime,
            alias: None,
            sessions: 0,
            alice_since: None,
            epoch: 0,
        }
    }

    /// Alice registers her phone and email and verifies both; email is `away` and primary, so
    /// the phone gets messages while it is `available` (`/back`) and email while it is `away`.
    pub async fn setup_alice(&mut self, server: &Server) {
        let mut alice = login(server, "alice").await;
        account::register(
            &mut alice,
            &format!("<username>alice</username><phone>{PHONE}</phone><email>{ALICE_MAIL}</email>"),
            T,
        )
        .await;
        let code = account::phone_code(&mut self.phone, T).await;
        let said = account::say(&mut alice, &format!("verify {code}"), T).await;
        assert!(said.contains("is verified"), "{said}");
        let mail = self.sink.wait_for(1, T).await.remove(0);
        self.seen_mails.insert(mail.path.clone());
        let code = account::email_code(&mail);
        let said = account::say(&mut alice, &format!("verify {code}"), T).await;
        assert!(said.contains("is verified"), "{said}");
        for line in ["state email away", "state phone away", "primary email"] {
            let said = account::say(&mut alice, line, T).await;
            assert!(!said.contains("Nothing was changed"), "{line}: {said}");
        }
        self.sessions += 1;
        self.alice_since = Some(Instant::now());
        self.alice = Some(alice);
    }

    /// Alice's client logs in again (a new session).
    pub async fn alice_logs_in(&mut self, server: &Server) {
        self.sessions += 1;
        self.alice = Some(login(server, "alice").await);
        self.alice_since = Some(Instant::now());
    }

    /// Whether Alice answers now.
    pub fn may_reply(&self) -> bool {
        self.replying && (self.replies_anytime || self.alice.is_some())
    }

    /// Replies still on their way to the buddy.
    pub fn replies_outstanding(&self) -> bool {
        let mail = self
            .replies
            .lock()
            .unwrap()
            .iter()
            .any(|r| !r.done || (r.acked && !self.ledger.at_bob.contains_key(&r.token)));
        mail || self
            .ledger
            .mo_acked()
            .any(|t| !self.ledger.at_bob.contains_key(t))
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

    pub async fn bob_writes(&mut self) {
        let token = self.token("msg");
        let id = format!("b-{token}");
        self.bob
            .send(&format!(
                "<message type='chat' id='{id}' to='alice@{COMPONENT_DOMAIN}'><body>{token}</body></message>"
            ))
            .await;
        self.ledger.trace(format!("bob sends {token}"));
        let session = self.settled_session();
        self.ledger.bob.push(BobMsg {
            n: token_number(&token),
            id,
            token,
            sent_at: Instant::now(),
            epoch: self.epoch,
            session,
        });
    }

    fn note_bob(&mut self, el: &Element) {
        if el.name() != "message" {
            return;
        }
        if attr(el, "type") == "error" {
            let condition = el
                .get_child("error", super::NS_CLIENT)
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
    pub async fn poll(&mut self) {
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
    pub fn poll_mail(&mut self) {
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

    /// Alice answers the newest forwarded email (in a task that retries like an MTA).
    pub fn mail_back(&mut self) {
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

    /// Alice answers by SMS (once an SMS from Reach started a conversation).
    pub async fn text_back(&mut self) {
        if !self.sms_conversation || self.phone.is_closed() {
            return;
        }
        let token = self.token("sms");
        self.phone.send_mo(PHONE, SERVICE_NUMBER, &token).await;
        self.ledger.trace(format!("phone texts {token}"));
        self.ledger.mo_sent.push((token, Instant::now()));
    }

    /// Alice leaves XMPP: unavailable, then what is still on the way is read before the close.
    pub async fn alice_leaves(&mut self) {
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

    /// Alice moves to `mode`: logs in on XMPP, or leaves it and tells Reach by SMS which of her
    /// terminals is available.
    pub async fn set_mode(&mut self, server: &Server, mode: Mode) {
        self.ledger.trace(format!("mode {mode:?}"));
        match mode {
            Mode::Xmpp => {
                if self.alice.is_none() {
                    self.alice_logs_in(server).await;
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

    /// Drain: no new traffic. A few seconds in the current mode, then Alice comes back to XMPP
    /// so that anything held for her client arrives; stops when nothing moved for 8 s and every
    /// acknowledged reply arrived (at most 40 s, or 120 s after more than 5 kills). Returns how
    /// long it took; the email replies still being retried are given up.
    pub async fn drain(&mut self, server: &Server, kills: usize) -> Duration {
        let drain_start = Instant::now();
        let drain_cap = Duration::from_secs(if kills <= 5 { 40 } else { 120 });
        self.replying = false;
        let mut last_change = Instant::now();
        let mut last_seen = (0usize, 0usize, 0usize);
        let mut alice_back = false;
        loop {
            self.poll().await;
            self.poll_mail();
            if !alice_back && drain_start.elapsed() > Duration::from_secs(4) {
                self.set_mode(server, Mode::Xmpp).await;
                alice_back = true;
            }
            let seen = (
                self.ledger.at_alice.values().map(Vec::len).sum::<usize>(),
                self.ledger.at_bob.values().sum::<usize>(),
                self.ledger.bob_errors.len(),
            );
            if seen != last_seen {
                last_seen = seen;
                last_change = Instant::now();
            }
            let (replies_done, replies_in) = {
                let all = self.replies.lock().unwrap();
                (
                    all.iter().all(|r| r.done),
                    all.iter()
                        .filter(|r| r.acked)
                        .all(|r| self.ledger.at_bob.contains_key(&r.token))
                        && self
                            .ledger
                            .mo_acked()
                            .all(|t| self.ledger.at_bob.contains_key(t)),
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
        for task in std::mem::take(&mut self.reply_tasks) {
            task.abort();
        }
        drain_time
    }

    /// Alice's replies counted: an email reply is acknowledged when it got 250, an SMS reply
    /// once the handset wrote it to Kannel (unless Kannel stopped within [`KANNEL_IN_MEMORY`]
    /// after); acknowledged and never at the buddy is lost.
    pub fn reply_rows(&self) -> ReplyRows {
        let replies = self.replies.lock().unwrap();
        let l = &self.ledger;
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
        for (t, at) in &l.mo_sent {
            sms.sent += 1;
            let acked = !l.mo_in_kannels_memory(*at);
            if acked {
                sms.acked += 1;
            }
            let copies = l.at_bob.get(t).copied().unwrap_or(0);
            if copies > 0 {
                sms.delivered += 1;
                sms.duplicates += copies - 1;
            } else if acked {
                sms.lost += 1;
                sms_lost.push(t.clone());
            } else {
                sms.in_flight += 1;
            }
        }
        ReplyRows {
            mail,
            mail_attempts,
            mail_lost,
            sms,
            sms_lost,
        }
    }

    /// The error conditions the buddy got, and how often.
    pub fn error_conditions(&self) -> BTreeMap<&str, usize> {
        let mut conditions: BTreeMap<&str, usize> = BTreeMap::new();
        for c in self.ledger.bob_errors.values() {
            *conditions.entry(c.as_str()).or_default() += 1;
        }
        conditions
    }
}

/// When the conversation's next steps are due during the chaos: the buddy's next message, the
/// next look at the relay's mailbox, Alice's next reply and her next change of terminal.
pub struct Pace {
    next_bob: Instant,
    next_mail_poll: Instant,
    next_reply: Instant,
    next_mode: Instant,
    /// Alice answers by email and by SMS in turn, so that both flows carry something.
    by_mail: bool,
    modes_so_far: usize,
    /// Alice's current terminal.
    pub mode: Mode,
}

impl Pace {
    /// From now on: Alice on XMPP, the buddy writing at once, the first reply after 1 s.
    pub fn start() -> Pace {
        Pace {
            next_bob: Instant::now(),
            next_mail_poll: Instant::now(),
            next_reply: Instant::now() + Duration::from_secs(1),
            next_mode: Instant::now() + MODE_EVERY,
            by_mail: false,
            modes_so_far: 0,
            mode: Mode::Xmpp,
        }
    }

    /// Does what is due at `now`: the buddy writes, what arrived is noted, Alice answers (150 to
    /// 700 ms apart) and changes terminal (unless replies may only come on XMPP and hers are
    /// still on their way: then she stays on XMPP for up to 10 s more).
    pub async fn step(&mut self, c: &mut Conversation, server: &Server, now: Instant) {
        if now >= self.next_bob {
            c.bob_writes().await;
            self.next_bob = now + BOB_EVERY;
        }
        c.poll().await;
        if now >= self.next_mail_poll {
            c.poll_mail();
            self.next_mail_poll = now + Duration::from_millis(250);
        }
        if now >= self.next_reply {
            if c.may_reply() {
                self.by_mail = !self.by_mail;
                if c.alias.is_some() && self.by_mail {
                    c.mail_back();
                } else {
                    c.text_back().await;
                }
            }
            self.next_reply = now + Duration::from_millis(c.rng.gen_range(150..700));
        }
        let hold_mode = !c.replies_anytime
            && self.mode == Mode::Xmpp
            && now < self.next_mode + Duration::from_secs(10)
            && c.replies_outstanding();
        if now >= self.next_mode && !hold_mode {
            let modes = [Mode::Xmpp, Mode::Email, Mode::Sms];
            self.modes_so_far += 1;
            self.mode = modes[self.modes_so_far % modes.len()];
            c.set_mode(server, self.mode).await;
            self.next_mode = Instant::now() + MODE_EVERY;
        }
    }
}
