//! Integrated mode end to end: a user's own JID (`alice@localhost`) reaches her mailbox and
//! phone. A real Prosody with Debian's prosody-modules (mod_privilege, mod_firewall running the
//! copy rules of docs/integrated-mode.md as shipped, carbons, MAM), a second Prosody
//! (`remote.localhost`) linked to it by s2s on loopback, the built `reach` with
//! `[integrated] hosts = ["localhost"]`, a mail sink (and Kannel for the SMS story), and raw-XML
//! clients for Alice (who chooses her own address), Bob (same server), Carol (the other server)
//! and Dave (who keeps his reach address, then chooses his own in the preferences form).
//!
//! This Prosody grants Reach all three XEP-0356 permissions (message, roster, presence), more
//! than the doc asks for (message only; `tests/admin_docs.rs` runs that), so the stories also
//! show that Reach copes with the presence Prosody then forwards to it. The last story checks
//! what ejabberd 23.01 offers instead, and that its users keep their reach addresses.

use crate::support;

use std::time::{Duration, Instant};

use support::kannel::{Handset, Kannel};
use support::mail::{submit, MailSink, SinkMail};
use support::{attr, body, docs, new_id, Client, Element, ProsodySetup, Reach, Server, ServerKind};

const HOST: &str = "localhost";
const REMOTE: &str = "remote.localhost";
const D: &str = "reach.localhost";
const ALICE: &str = "alice@localhost";
const BOB: &str = "bob@localhost";
const CAROL: &str = "carol@remote.localhost";
const ALICE_MAIL: &str = "alice@mail.example";
const DAVE_MAIL: &str = "dave@mail.example";
const PHONE: &str = "+15551234567";
const SERVICE_NUMBER: &str = "+15550000000";
const SMS_SECRET: &str = "webhooksecret42";
const T: Duration = Duration::from_secs(15);
/// How long a test waits to be sure that something does NOT happen (several digest windows).
const QUIET: Duration = Duration::from_secs(3);
const SENT_AS_USER: &str = "urn:reach:sent-as-user:0";
const MAM: &str = "urn:xmpp:mam:2";
const CARBONS: &str = "urn:xmpp:carbons:2";
const FORWARD: &str = "urn:xmpp:forward:0";

struct World {
    home: Server,
    remote: Server,
    sink: MailSink,
    reach: Reach,
    smtp_port: u16,
    /// Kannel and the phone (the fake SMSC's handset), for the SMS story.
    sms: Option<(Kannel, Handset)>,
    _state: tempfile::TempDir,
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- reach log ---\n{}", self.reach.log());
            eprintln!("--- home prosody ---\n{}", self.home.log_tail(40));
            eprintln!("--- remote prosody ---\n{}", self.remote.log_tail(20));
        }
    }
}

impl World {
    async fn new() -> World {
        World::start(false).await
    }

    /// The world, with Kannel and a phone if `sms`.
    async fn start(sms: bool) -> World {
        let routes = vec![
            (HOST.to_owned(), support::free_port()),
            (REMOTE.to_owned(), support::free_port()),
        ];
        let rules = docs::for_host(&docs::block("integrated-mode", "integrated-firewall"), HOST);
        let home =
            Server::start_prosody(ProsodySetup::new(HOST, routes[0].1, &routes).integrated(&rules))
                .await;
        let remote = Server::start_prosody(ProsodySetup::new(REMOTE, routes[1].1, &routes)).await;
        for user in ["alice", "bob", "dave"] {
            home.register(user, &format!("{user}pw")).await;
        }
        remote.register("carol", "carolpw").await;
        let sink = MailSink::start().await;
        let smtp_port = support::free_port();
        let state = tempfile::tempdir().unwrap();
        let mut extra = format!(
            "[routing]\ngrace_delay_secs = 3\n\n[email]\nrelay = \"smtp://127.0.0.1:{}\"\n\
             from_address = \"reach@{D}\"\nreply_domain = \"{D}\"\nlisten = \"127.0.0.1:{smtp_port}\"\n\
             digest_window_secs = 1\n\n[integrated]\nhosts = [\"{HOST}\"]\n",
            sink.port
        );
        let sms = if sms {
            let webhook_port = support::free_port();
            let kannel = Kannel::start(&format!(
                "http://127.0.0.1:{webhook_port}/sms/mo?secret={SMS_SECRET}"
            ))
            .await;
            let phone = Handset::connect(&kannel).await;
            extra.push_str(&format!(
                "\n[sms]\nsendsms_url = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\n\
                 from = \"{SERVICE_NUMBER}\"\nwebhook_listen = \"127.0.0.1:{webhook_port}\"\n\
                 webhook_url = \"http://127.0.0.1:{webhook_port}\"\nwebhook_secret = \"{SMS_SECRET}\"\n\
                 allowed_prefixes = [\"+1\"]\n",
                kannel.sendsms_url(),
                kannel.username(),
                kannel.password()
            ));
            Some((kannel, phone))
        } else {
            None
        };
        let reach = Reach::start_with(&home, state.path(), &extra).await;
        let w = World {
            home,
            remote,
            sink,
            reach,
            smtp_port,
            sms,
            _state: state,
        };
        let debug_log = w.home.dir().join("debug.log");
        let loaded = format!("Loaded {}", w.home.dir().join("reach-copy.pfw").display());
        assert!(
            std::fs::read_to_string(&debug_log).is_ok_and(|log| log.contains(&loaded)),
            "mod_firewall did not load the rules of docs/integrated-mode.md:\n{}",
            w.home.log_tail(20)
        );
        assert!(
            w.reach
                .wait_for_log("the server's privileges for Reach", T)
                .await,
            "Prosody did not tell Reach its privileges"
        );
        w
    }

    async fn client(&self, user: &str) -> Client {
        let mut c = Client::connect(&self.home, user, &format!("{user}pw"), "pc").await;
        support::wait_for_component(&mut c, D).await;
        c
    }

    /// A client that does not wait for Reach to answer (Reach may be down).
    async fn client_no_wait(&self, user: &str) -> Client {
        Client::connect(&self.home, user, &format!("{user}pw"), "pc").await
    }

    async fn carol(&self) -> Client {
        let mut carol = Client::connect(&self.remote, "carol", "carolpw", "pc").await;
        carol.presence("").await;
        carol
    }

    /// `user` registers with Reach with `mail`, confirms it with the code from the mail, and
    /// chooses her own address. Her client stays online (available).
    async fn opted_in(&self, user: &str, mail: &str) -> Client {
        let mut c = self.registered(user, mail).await;
        let said = say(&mut c, "address own").await;
        assert!(said.starts_with("Saved."), "{said}");
        assert!(
            said.contains(&format!(
                "Buddies reach you at: your own address {user}@{HOST}"
            )),
            "{said}"
        );
        c
    }

    /// `user` registers with Reach with `mail` and confirms it; her address stays the reach one.
    async fn registered(&self, user: &str, mail: &str) -> Client {
        let mut c = self.client(user).await;
        c.presence("").await;
        let before = self.sink.mails().len();
        let ok = c
            .iq(&format!(
                "<iq type='set' id='{}' to='{D}'><query xmlns='jabber:iq:register'>\
                 <username>{user}</username><email>{mail}</email></query></iq>",
                new_id()
            ))
            .await;
        assert_eq!(attr(&ok, "type"), "result", "{}", String::from(&ok));
        c.expect("Reach's subscription request", T, |s| {
            s.name() == "presence" && attr(s, "type") == "subscribe"
        })
        .await;
        c.send(&format!("<presence type='subscribed' to='{D}'/>"))
            .await;
        c.expect("the note that a code is on its way", T, |s| {
            attr(s, "from") == D && body(s).is_some_and(|b| b.contains("verification code"))
        })
        .await;
        let mails = self.sink.wait_for(before + 1, T).await;
        let subject = mails[before].header("Subject").unwrap();
        let code: String = subject.chars().filter(char::is_ascii_digit).collect();
        assert_eq!(code.len(), 6, "subject: {subject}");
        let said = say(&mut c, &format!("verify {code}")).await;
        assert!(said.contains("is verified"), "{said}");
        c
    }

    /// Alice answers a forwarded mail from her mailbox.
    async fn reply(&self, mail: &SinkMail, text: &str) -> (u16, String) {
        let message = format!(
            "From: Alice <{ALICE_MAIL}>\nTo: {}\nSubject: Re: IM\nMessage-ID: <{}@mail.example>\n\
             In-Reply-To: {}\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\n\n{text}\n",
            mail.reply_to(),
            new_id(),
            mail.message_id()
        );
        submit(self.smtp_port, ALICE_MAIL, &[&mail.reply_to()], &message)
            .await
            .outcome()
    }
}

impl World {
    /// How many copies the server has forwarded to Reach so far: `received` (delivered to one
    /// of its users) or `sent` (sent by one of them), as Reach's link logged them.
    fn copies(&self, kind: &str) -> usize {
        let marker = format!("from=Some(Jid(\"{HOST}\")) to=Some(Jid(\"{D}/{kind}\"))");
        self.reach
            .log()
            .lines()
            .filter(|l| l.contains("inbound stanza kind=\"message\"") && l.contains(&marker))
            .count()
    }

    /// How many presences of `full_jid` Reach's link has taken so far.
    fn presences_seen(&self, full_jid: &str) -> usize {
        let marker = format!("kind=\"presence\" from=Some(Jid(\"{full_jid}\"))");
        self.reach
            .log()
            .lines()
            .filter(|l| l.contains("inbound stanza") && l.contains(&marker))
            .count()
    }

    async fn wait_presences_seen(&self, full_jid: &str, count: usize) {
        let deadline = Instant::now() + T;
        while self.presences_seen(full_jid) < count {
            assert!(
                Instant::now() < deadline,
                "Reach did not see {full_jid}'s presence"
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Waits until the server has forwarded `count` copies of `kind` in all.
    async fn wait_copies(&self, kind: &str, count: usize) {
        let deadline = Instant::now() + T;
        while self.copies(kind) < count {
            assert!(
                Instant::now() < deadline,
                "expected {count} {kind} copies, saw {}",
                self.copies(kind)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// The end of a story: neither server logged an error (a firewall rule that fails to
    /// compile or to run, which would also stop the message it failed on).
    fn done(&self) {
        for server in [&self.home, &self.remote] {
            let log = server.log();
            for bad in ["Traceback", "Error compiling", " error\t"] {
                assert!(
                    !log.contains(bad),
                    "{}: {bad:?} in the log:\n{}",
                    server.host(),
                    server.log_tail(40)
                );
            }
        }
    }

    fn phone(&mut self) -> &mut Handset {
        &mut self.sms.as_mut().expect("a world with SMS").1
    }

    /// The next SMS to the phone.
    async fn sms(&mut self, what: &str) -> String {
        match self.phone().recv_mt(T).await {
            Some(mt) => {
                assert_eq!(mt.to, PHONE);
                mt.text
            }
            None => panic!("the phone got no SMS: expected {what}"),
        }
    }

    async fn text(&mut self, text: &str) {
        self.phone().send_mo(PHONE, SERVICE_NUMBER, text).await;
    }
}

/// A chat line to the service; returns its answer.
async fn say(c: &mut Client, line: &str) -> String {
    c.send(&format!(
        "<message type='chat' to='{D}' id='{}'><body>{line}</body></message>",
        new_id()
    ))
    .await;
    let answer = c
        .expect(&format!("Reach's answer to {line:?}"), T, |s| {
            s.name() == "message" && attr(s, "from") == D && body(s).is_some()
        })
        .await;
    body(&answer).unwrap_or_default()
}

async fn chat(c: &mut Client, to: &str, text: &str) -> String {
    let id = new_id();
    c.send(&format!(
        "<message type='chat' to='{to}' id='{id}'><body>{text}</body><markable xmlns='urn:xmpp:chat-markers:0'/></message>"
    ))
    .await;
    id
}

/// The mails that forward IMs to `to` (not verification mails).
fn forwards_to(sink: &MailSink, to: &str) -> Vec<SinkMail> {
    sink.mails()
        .into_iter()
        .filter(|m| {
            m.header("To").as_deref() == Some(to)
                && m.header("Subject")
                    .is_some_and(|s| s.starts_with("IM from"))
        })
        .collect()
}

async fn wait_forwards(sink: &MailSink, to: &str, count: usize) -> Vec<SinkMail> {
    let deadline = Instant::now() + T;
    loop {
        let mails = forwards_to(sink, to);
        if mails.len() >= count {
            return mails;
        }
        assert!(
            Instant::now() < deadline,
            "expected {count} forwarded mails to {to}, got {}",
            mails.len()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

fn is_chat_with(text: &'static str) -> impl Fn(&Element) -> bool {
    move |s| s.name() == "message" && body(s).as_deref() == Some(text)
}

/// The message inside a carbon (XEP-0280) or a MAM result (XEP-0313).
fn forwarded_message(outer: &Element) -> Option<Element> {
    outer
        .children()
        .find_map(|c| c.get_child("forwarded", FORWARD))
        .and_then(|f| f.get_child("message", support::NS_CLIENT))
        .cloned()
}

/// Everything in the user's archive (XEP-0313), oldest first.
async fn archive(c: &mut Client) -> Vec<Element> {
    let id = new_id();
    c.send(&format!(
        "<iq type='set' id='{id}'><query xmlns='{MAM}' queryid='q-{id}'/></iq>"
    ))
    .await;
    let mut found = Vec::new();
    loop {
        let s = c
            .expect("MAM results and the end of the query", T, |s| {
                (s.name() == "iq" && attr(s, "id") == id)
                    || s.get_child("result", MAM)
                        .is_some_and(|r| attr(r, "queryid") == format!("q-{id}"))
            })
            .await;
        if s.name() == "iq" {
            assert_eq!(attr(&s, "type"), "result", "{}", String::from(&s));
            return found;
        }
        if let Some(m) = forwarded_message(&s) {
            found.push(m);
        }
    }
}

// ---- the stories ----------------------------------------------------------------------------

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bobs_message_to_her_own_jid_reaches_her_mailbox_and_her_reply_comes_from_her_jid() {
    let w = World::new().await;
    w.opted_in("alice", ALICE_MAIL).await.close().await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;

    chat(&mut bob, ALICE, "Lunch at noon?").await;
    let mail = wait_forwards(&w.sink, ALICE_MAIL, 1).await.remove(0);
    assert_eq!(
        mail.text().matches("Lunch at noon?").count(),
        1,
        "once: {}",
        mail.text()
    );
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("IM from bob (bob@localhost)")
    );
    assert!(
        mail.text().contains("from alice@localhost"),
        "the footer names the address her reply comes from: {}",
        mail.text()
    );

    let answer = w.reply(&mail, "Yes, see you there").await;
    assert_eq!(answer.0, 250, "{answer:?}");
    let got = bob
        .expect("Alice's email reply", T, is_chat_with("Yes, see you there"))
        .await;
    assert_eq!(
        attr(&got, "from"),
        ALICE,
        "from her own JID, not her reach address"
    );
    assert_eq!(attr(&got, "type"), "chat");

    // Alice comes back: her server kept Bob's message for her, and her archive holds the
    // whole conversation, her email reply included (sent as her by her server).
    let mut alice = w.client("alice").await;
    alice.presence("").await;
    let offline = alice
        .expect(
            "Bob's message, kept while she was away",
            T,
            is_chat_with("Lunch at noon?"),
        )
        .await;
    assert_eq!(support::bare(attr(&offline, "from")), BOB);
    // Her own reply is not kept for her like a message to her (mod_offline): her clients see
    // it in her archive (XEP-0313).
    alice
        .expect_none(
            Duration::from_millis(500),
            is_chat_with("Yes, see you there"),
        )
        .await;
    let history = archive(&mut alice).await;
    let texts: Vec<(String, String)> = history
        .iter()
        .filter(|m| {
            [attr(m, "from"), attr(m, "to")]
                .iter()
                .any(|j| support::bare(j) == BOB)
        })
        .map(|m| {
            (
                support::bare(attr(m, "from")).to_owned(),
                body(m).unwrap_or_default(),
            )
        })
        .collect();
    assert!(
        texts.contains(&(BOB.to_owned(), "Lunch at noon?".to_owned())),
        "{texts:?}"
    );
    assert!(
        texts.contains(&(ALICE.to_owned(), "Yes, see you there".to_owned())),
        "{texts:?}"
    );
    // Exactly these two: nothing of Reach's (no copies, no notices) got into the conversation.
    assert_eq!(texts.len(), 2, "{texts:?}");
    // Bob's archive has her reply too, from her own address.
    let bobs = archive(&mut bob).await;
    assert!(
        bobs.iter().any(|m| support::bare(attr(m, "from")) == ALICE
            && body(m).as_deref() == Some("Yes, see you there")),
        "{:?}",
        bobs.iter().map(String::from).collect::<Vec<_>>()
    );
    w.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_buddy_on_another_server_reaches_her_mailbox_and_her_reply_goes_back_over_s2s() {
    let w = World::new().await;
    w.opted_in("alice", ALICE_MAIL).await.close().await;
    let mut carol = w.carol().await;
    assert_eq!(carol.bare, CAROL);

    chat(&mut carol, ALICE, "Greetings from the other server").await;
    let mail = wait_forwards(&w.sink, ALICE_MAIL, 1).await.remove(0);
    assert!(mail.text().contains("Greetings from the other server"));
    assert_eq!(
        mail.header("Subject").as_deref(),
        Some("IM from carol (carol@remote.localhost)")
    );
    let answer = w.reply(&mail, "Hello Carol").await;
    assert_eq!(answer.0, 250, "{answer:?}");
    let got = carol
        .expect("Alice's reply over s2s", T, is_chat_with("Hello Carol"))
        .await;
    assert_eq!(attr(&got, "from"), ALICE);
    // The next message of Carol's continues the same mail thread.
    chat(&mut carol, ALICE, "Glad to hear").await;
    let next = wait_forwards(&w.sink, ALICE_MAIL, 2).await.remove(1);
    assert!(next.text().contains("Glad to hear"));
    assert!(
        next.raw_header("References")
            .is_some_and(|r| r.contains(&mail.message_id())),
        "{:?}",
        next.raw_header("References")
    );
    w.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_her_client_nothing_is_forwarded_and_away_only_what_she_neither_reads_nor_answers() {
    let w = World::new().await;
    let mut alice = w.opted_in("alice", ALICE_MAIL).await;
    alice
        .send(&format!(
            "<iq type='set' id='cc'><enable xmlns='{CARBONS}'/></iq>"
        ))
        .await;
    alice
        .expect("carbons enabled", T, |s| {
            attr(s, "id") == "cc" && attr(s, "type") == "result"
        })
        .await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;

    // Available: her client has it, nothing goes by email.
    chat(&mut bob, ALICE, "You are here").await;
    alice
        .expect("Bob's message", T, is_chat_with("You are here"))
        .await;
    w.wait_copies("received", 1).await;

    // Away (once Reach has seen it): what she reads (a displayed marker from her client) is
    // not forwarded...
    let seen = w.presences_seen(&alice.jid);
    alice.presence("<show>away</show>").await;
    w.wait_presences_seen(&alice.jid, seen + 1).await;
    let id = chat(&mut bob, ALICE, "Read this one").await;
    alice
        .expect("Bob's message", T, is_chat_with("Read this one"))
        .await;
    alice
        .send(&format!(
            "<message to='{BOB}' type='chat'><displayed xmlns='urn:xmpp:chat-markers:0' id='{id}'/></message>"
        ))
        .await;
    bob.expect("Alice's read marker", T, |s| {
        s.has_child("displayed", "urn:xmpp:chat-markers:0")
    })
    .await;
    // ... nor what she answers from her client.
    chat(&mut bob, ALICE, "Answer this one").await;
    alice
        .expect("Bob's message", T, is_chat_with("Answer this one"))
        .await;
    chat(&mut alice, BOB, "Answered from my phone").await;
    bob.expect("Alice's answer", T, is_chat_with("Answered from my phone"))
        .await;
    // What she does not read goes by email after the grace delay, although her client acked
    // it with an automatic receipt (XEP-0184): delivered is not read.
    bob.send(&format!(
        "<message to='{ALICE}' type='chat' id='unread'><body>Nobody reads this</body>\
         <request xmlns='urn:xmpp:receipts'/></message>"
    ))
    .await;
    alice
        .expect("Bob's message", T, is_chat_with("Nobody reads this"))
        .await;
    alice
        .send(&format!(
            "<message to='{BOB}'><received xmlns='urn:xmpp:receipts' id='unread'/></message>"
        ))
        .await;
    let mails = wait_forwards(&w.sink, ALICE_MAIL, 1).await;
    tokio::time::sleep(QUIET).await;
    let mails_now = forwards_to(&w.sink, ALICE_MAIL);
    assert_eq!(mails_now.len(), 1, "one email, for the unread message only");
    let text = mails[0].text();
    assert_eq!(text.matches("Nobody reads this").count(), 1, "once: {text}");
    for handled in ["You are here", "Read this one", "Answer this one"] {
        assert!(!text.contains(handled), "{handled:?} was forwarded: {text}");
    }

    // Her reply by email reaches Bob as her, and her away client gets it as a sent carbon.
    let answer = w.reply(&mails[0], "Answered by email").await;
    assert_eq!(answer.0, 250, "{answer:?}");
    let got = bob
        .expect("Alice's email reply", T, is_chat_with("Answered by email"))
        .await;
    assert_eq!(attr(&got, "from"), ALICE);
    let carbon = alice
        .expect("the sent carbon of her email reply", T, |s| {
            s.has_child("sent", CARBONS)
                && forwarded_message(s)
                    .is_some_and(|m| body(&m).as_deref() == Some("Answered by email"))
        })
        .await;
    let sent = forwarded_message(&carbon).unwrap();
    assert_eq!(attr(&sent, "to"), BOB);
    assert_eq!(attr(&sent, "from"), ALICE);
    w.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reachs_own_messages_are_never_copied_back_to_it() {
    let w = World::new().await;
    // Registering, the code, `verify` and `address own`: chat lines between Alice and the
    // service, in both directions.
    let mut alice = w.opted_in("alice", ALICE_MAIL).await;
    let status = say(&mut alice, "status").await;
    assert!(
        status.contains("your own address alice@localhost"),
        "{status}"
    );
    alice.close().await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;
    chat(&mut bob, ALICE, "One").await;
    let mail = wait_forwards(&w.sink, ALICE_MAIL, 1).await.remove(0);
    // Bob is a user of the same server: his message is copied as sent by him and as
    // delivered to her; nothing else (Alice's chat with the service, its answers) was.
    assert_eq!(w.copies("received"), 1, "Bob's message only");
    assert_eq!(w.copies("sent"), 1, "Bob's message only");

    // What Reach sends as Alice is not copied back: neither the reply nor its delivery.
    let answer = w.reply(&mail, "Only once").await;
    assert_eq!(answer.0, 250, "{answer:?}");
    let got = bob
        .expect("Alice's email reply", T, is_chat_with("Only once"))
        .await;
    assert_eq!(
        got.get_child("sent-as-user", SENT_AS_USER).map(|_| ()),
        Some(()),
        "Reach marks what it sends as a user"
    );
    bob.expect_none(QUIET, is_chat_with("Only once")).await;
    assert_eq!(w.copies("received"), 1);
    assert_eq!(w.copies("sent"), 1);
    // No mail to Alice about her own reply, or about anything the service said.
    assert_eq!(forwards_to(&w.sink, ALICE_MAIL).len(), 1);
    w.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn back_to_the_reach_address_or_removed_copies_are_ignored_and_the_reach_address_works() {
    let w = World::new().await;
    let mut alice = w.opted_in("alice", ALICE_MAIL).await;
    let said = say(&mut alice, "address reach").await;
    assert!(
        said.contains("Buddies reach you at: your reach address"),
        "{said}"
    );
    alice.close().await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;

    chat(&mut bob, ALICE, "To her own address").await;
    w.wait_copies("received", 1).await;
    chat(&mut bob, &format!("alice@{D}"), "To her reach address").await;
    let mails = wait_forwards(&w.sink, ALICE_MAIL, 1).await;
    tokio::time::sleep(QUIET).await;
    let mails_now = forwards_to(&w.sink, ALICE_MAIL);
    assert_eq!(mails_now.len(), 1, "the reach address's message only");
    assert!(mails[0].text().contains("To her reach address"));
    assert!(!mails[0].text().contains("To her own address"));
    // Her reply comes from the reach address again.
    let answer = w.reply(&mails[0], "From the reach address").await;
    assert_eq!(answer.0, 250, "{answer:?}");
    let got = bob
        .expect("Alice's reply", T, is_chat_with("From the reach address"))
        .await;
    assert_eq!(attr(&got, "from"), format!("alice@{D}"));

    // Own address again, then removed: nothing of hers is forwarded any more.
    let mut alice = w.client("alice").await;
    alice.presence("").await;
    assert!(say(&mut alice, "address own").await.starts_with("Saved."));
    let removed = alice
        .iq(&format!(
            "<iq type='set' id='{}' to='{D}'><query xmlns='jabber:iq:register'><remove/></query></iq>",
            new_id()
        ))
        .await;
    assert_eq!(
        attr(&removed, "type"),
        "result",
        "{}",
        String::from(&removed)
    );
    alice.close().await;
    let copies = w.copies("received");
    chat(&mut bob, ALICE, "After she left Reach").await;
    w.wait_copies("received", copies + 1).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(
        forwards_to(&w.sink, ALICE_MAIL).len(),
        1,
        "nothing more by email"
    );
    // Her server still delivers it to her.
    let mut alice = w.client("alice").await;
    alice.presence("").await;
    alice
        .expect(
            "Bob's message, from her server",
            T,
            is_chat_with("After she left Reach"),
        )
        .await;
    w.done();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_user_who_keeps_his_reach_address_gets_nothing_through_the_copies_until_he_opts_in() {
    let w = World::new().await;
    let dave = w.registered("dave", DAVE_MAIL).await;
    let mut bob = w.client("bob").await;
    bob.presence("").await;
    dave.close().await;
    chat(&mut bob, "dave@localhost", "To Dave's own address").await;
    w.wait_copies("received", 1).await;
    chat(&mut bob, &format!("dave@{D}"), "To Dave's reach address").await;
    let mails = wait_forwards(&w.sink, DAVE_MAIL, 1).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(forwards_to(&w.sink, DAVE_MAIL).len(), 1);
    assert!(mails[0].text().contains("To Dave's reach address"));
    assert!(!mails[0].text().contains("To Dave's own address"));

    // He chooses his own address in his client's "Preferences" form (XEP-0050), which offers
    // the choice because his server is one of [integrated] hosts.
    let mut dave = w.client("dave").await;
    dave.presence("").await;
    let start = command(&mut dave, "node='preferences' action='execute'", "").await;
    let session = attr(&start, "sessionid").to_owned();
    let form = start.get_child("x", DATA_FORMS).expect("a form").clone();
    let address = form
        .children()
        .find(|f| attr(f, "var") == "address")
        .expect("the address field");
    assert_eq!(attr(address, "type"), "list-single");
    let options: Vec<String> = address
        .children()
        .filter(|o| o.name() == "option")
        .filter_map(|o| o.get_child("value", DATA_FORMS).map(|v| v.text()))
        .collect();
    assert_eq!(options, ["reach", "own"]);
    let done = command(
        &mut dave,
        &format!("node='preferences' sessionid='{session}' action='complete'"),
        &filled_in(&form, "address", "own"),
    )
    .await;
    assert_eq!(
        attr(&done, "status"),
        "completed",
        "{}",
        String::from(&done)
    );
    let status = say(&mut dave, "status").await;
    assert!(
        status.contains("Buddies reach you at: your own address dave@localhost"),
        "{status}"
    );
    dave.close().await;
    chat(&mut bob, "dave@localhost", "Now to his own address").await;
    let mails = wait_forwards(&w.sink, DAVE_MAIL, 2).await;
    assert!(mails[1].text().contains("Now to his own address"));
    w.done();
}

const COMMANDS: &str = "http://jabber.org/protocol/commands";
const DATA_FORMS: &str = "jabber:x:data";

/// What a client sends back for `form`: every field with its values, `var` set to `value`.
fn filled_in(form: &Element, var: &str, value: &str) -> String {
    let mut x = format!("<x xmlns='{DATA_FORMS}' type='submit'>");
    for field in form
        .children()
        .filter(|f| f.is("field", DATA_FORMS) && attr(f, "type") != "fixed")
    {
        let values: Vec<String> = if attr(field, "var") == var {
            vec![value.to_owned()]
        } else {
            field
                .children()
                .filter(|v| v.is("value", DATA_FORMS))
                .map(|v| v.text())
                .collect()
        };
        x.push_str(&format!(
            "<field var='{}'>",
            support::escape(attr(field, "var"))
        ));
        for v in values {
            x.push_str(&format!("<value>{}</value>", support::escape(&v)));
        }
        x.push_str("</field>");
    }
    x + "</x>"
}

/// An ad-hoc command request (XEP-0050) to the service; the `<command/>` of the result.
async fn command(client: &mut Client, attrs: &str, inner: &str) -> Element {
    let reply = client
        .iq_ok(&format!(
            "<iq type='set' id='{}' to='{D}'><command xmlns='{COMMANDS}' {attrs}>{inner}</command></iq>",
            new_id()
        ))
        .await;
    reply
        .get_child("command", COMMANDS)
        .unwrap_or_else(|| panic!("no <command/> in {}", String::from(&reply)))
        .clone()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn her_text_message_reply_reaches_bob_from_her_own_jid() {
    let mut w = World::start(true).await;
    // Alice registers her phone (no email address), confirms it by texting the code back,
    // chooses her own address and leaves.
    let mut alice = w.client("alice").await;
    alice.presence("").await;
    let ok = alice
        .iq(&format!(
            "<iq type='set' id='{}' to='{D}'><query xmlns='jabber:iq:register'>\
             <username>alice</username><phone>{PHONE}</phone></query></iq>",
            new_id()
        ))
        .await;
    assert_eq!(attr(&ok, "type"), "result", "{}", String::from(&ok));
    alice
        .expect("the note that a code is on its way", T, |s| {
            body(s).is_some_and(|b| b.contains("verification code"))
        })
        .await;
    let code_sms = w.sms("the verification code").await;
    let code: String = code_sms
        .split(|c: char| !c.is_ascii_digit())
        .find(|w| w.len() == 6)
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("a 6-digit code in {code_sms:?}"));
    w.text(&code).await;
    w.sms("the confirmation").await;
    alice
        .expect("the phone is verified", T, |s| {
            body(s).is_some_and(|b| b.contains("is verified"))
        })
        .await;
    let said = say(&mut alice, "address own").await;
    assert!(said.starts_with("Saved."), "{said}");
    alice.close().await;

    let mut bob = w.client("bob").await;
    bob.presence("").await;
    chat(&mut bob, ALICE, "Call me?").await;
    let mut texts = Vec::new();
    while !texts.iter().any(|t: &String| t.contains("Call me?")) {
        texts.push(w.sms("Bob's message").await);
    }
    let forwarded = texts.last().unwrap();
    assert!(forwarded.starts_with("bob: Call me?"), "{forwarded:?}");
    w.text("In 5 minutes").await;
    let got = bob
        .expect("Alice's SMS reply", T, is_chat_with("In 5 minutes"))
        .await;
    assert_eq!(attr(&got, "from"), ALICE);
    w.done();
}

// ---- ejabberd ---------------------------------------------------------------------------------

/// An ejabberd (tests/servers) whose config gets `mod_privilege` granting the component all it
/// can grant (as in the project's recipe), and `mod_service_log` sending it a copy of every
/// stanza its users send and receive, the closest ejabberd 23.01 comes to Prosody's copies.
async fn privileged_ejabberd() -> Server {
    let mut server = Server::start(ServerKind::Ejabberd).await;
    server.stop().await;
    let path = server.dir().join("ejabberd.yml");
    let config = std::fs::read_to_string(&path).unwrap();
    for needle in ["\nacl:\n", "\naccess_rules:\n", "\nmodules:\n"] {
        assert!(config.contains(needle), "ejabberd.yml.in lacks {needle:?}");
    }
    let config = config
        .replace("\nacl:\n", &format!("\nacl:\n  gateway:\n    server: {D}\n"))
        .replace(
            "\naccess_rules:\n",
            "\naccess_rules:\n  gateway_priv:\n    allow: gateway\n",
        )
        .replace(
            "\nmodules:\n",
            &format!(
                "\nmodules:\n  mod_privilege:\n    roster:\n      both: gateway_priv\n    message:\n      \
                 outgoing: gateway_priv\n    presence:\n      roster: gateway_priv\n  \
                 mod_service_log:\n    loggers:\n      - {D}\n"
            ),
        );
    // Overwriting keeps the file's owner (ejabberd), which ejabberdctl needs.
    std::fs::write(&path, config).unwrap();
    server.restart().await;
    for user in ["alice", "bob"] {
        server.register(user, &format!("{user}pw")).await;
    }
    server
}

/// Waits for a stanza at the raw component matching `pred`; the others are returned too.
async fn component_expect(
    c: &mut support::RawComponent,
    what: &str,
    pred: impl Fn(&Element) -> bool,
) -> (Element, Vec<Element>) {
    let deadline = Instant::now() + T;
    let mut others = Vec::new();
    while Instant::now() < deadline {
        if let Some(s) = c.recv(Duration::from_millis(200)).await {
            if pred(&s) {
                return (s, others);
            }
            others.push(s);
        }
    }
    panic!(
        "the component got no {what}; got:\n{}",
        others
            .iter()
            .map(String::from)
            .collect::<Vec<_>>()
            .join("\n")
    );
}

/// Everything the raw component gets within `time`.
async fn component_drain(c: &mut support::RawComponent, time: Duration) -> Vec<Element> {
    let deadline = Instant::now() + time;
    let mut got = Vec::new();
    while Instant::now() < deadline {
        if let Some(s) = c.recv(Duration::from_millis(100)).await {
            got.push(s);
        }
    }
    got
}

/// The messages inside `mod_service_log`'s copies (XEP-0297, from the host).
fn logged_messages(stanzas: &[Element]) -> Vec<Element> {
    stanzas
        .iter()
        .filter(|s| s.name() == "message" && attr(s, "from") == HOST)
        .filter_map(|s| {
            s.get_child("forwarded", FORWARD)?
                .children()
                .find(|m| m.name() == "message")
                .cloned()
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ejabberd_grants_too_little_for_integrated_mode_and_its_users_keep_their_reach_addresses() {
    // What ejabberd 23.01 offers, seen from a bare component (docs/integrated-mode.md).
    let server = privileged_ejabberd().await;
    let mut component = support::RawComponent::connect(&server, D, server.secret())
        .await
        .expect("the component logs in");
    // XEP-0356 in its first version, the message permission granted.
    let (advert, _) = component_expect(&mut component, "privilege advertisement", |s| {
        s.children().any(|c| c.name() == "privilege")
    })
    .await;
    let privilege = advert.children().find(|c| c.name() == "privilege").unwrap();
    assert_eq!(privilege.ns(), "urn:xmpp:privilege:1");
    let perm = |access: &str| {
        privilege
            .children()
            .find(|p| attr(p, "access") == access)
            .map(|p| attr(p, "type").to_owned())
    };
    assert_eq!(perm("message").as_deref(), Some("outgoing"));
    assert_eq!(perm("roster").as_deref(), Some("both"));
    assert_eq!(perm("presence").as_deref(), Some("roster"));

    let mut bob = Client::connect(&server, "bob", "bobpw", "pc").await;
    bob.presence("").await;
    // A message sent as Alice in the second version (Prosody's, Reach's) is refused...
    let as_alice = |ns: &str, text: &str| {
        format!(
            "<message from='{D}' to='{HOST}' id='{}'><privilege xmlns='{ns}'><forwarded xmlns='{FORWARD}'>\
             <message xmlns='jabber:client' from='{ALICE}' to='{BOB}' type='chat'><body>{text}</body></message>\
             </forwarded></privilege></message>",
            new_id()
        )
    };
    component
        .send(&as_alice("urn:xmpp:privilege:2", "version 2"))
        .await;
    let (refused, _) = component_expect(&mut component, "an error", |s| {
        s.name() == "message" && attr(s, "type") == "error"
    })
    .await;
    assert!(
        String::from(&refused).contains("bad-request"),
        "{}",
        String::from(&refused)
    );
    // ... the first version goes out as her.
    component
        .send(&as_alice("urn:xmpp:privilege:1", "version 1"))
        .await;
    let got = bob
        .expect("the message sent as Alice", T, is_chat_with("version 1"))
        .await;
    assert_eq!(attr(&got, "from"), ALICE);
    bob.expect_none(Duration::from_millis(300), is_chat_with("version 2"))
        .await;

    // mod_service_log: what Bob sends is copied; what is delivered to Alice only while she has
    // a session. A message to her while she is offline is not copied.
    component_drain(&mut component, Duration::from_millis(500)).await;
    chat(&mut bob, ALICE, "while you are offline").await;
    let copies = logged_messages(&component_drain(&mut component, Duration::from_secs(2)).await);
    let bodies: Vec<(String, String)> = copies
        .iter()
        .filter(|m| body(m).is_some())
        .map(|m| (attr(m, "to").to_owned(), body(m).unwrap_or_default()))
        .collect();
    assert_eq!(
        bodies,
        [(ALICE.to_owned(), "while you are offline".to_owned())],
        "one copy, as sent by Bob; none as delivered to Alice"
    );
    let mut alice = Client::connect(&server, "alice", "alicepw", "pc").await;
    alice.presence("").await;
    alice
        .expect(
            "the offline message",
            T,
            is_chat_with("while you are offline"),
        )
        .await;
    component_drain(&mut component, Duration::from_millis(500)).await;
    chat(&mut bob, ALICE, "now you are here").await;
    alice
        .expect("Bob's message", T, is_chat_with("now you are here"))
        .await;
    let copies = logged_messages(&component_drain(&mut component, Duration::from_secs(2)).await);
    let online = copies
        .iter()
        .filter(|m| body(m).as_deref() == Some("now you are here"))
        .count();
    assert_eq!(online, 2, "copied as sent by Bob and as received by Alice");

    alice.close().await;
    component.close().await;

    // Reach on that server, with [integrated] naming its host: the users keep their reach
    // addresses, which work as ever.
    let sink = MailSink::start().await;
    let smtp_port = support::free_port();
    let state = tempfile::tempdir().unwrap();
    let extra = format!(
        "[email]\nrelay = \"smtp://127.0.0.1:{}\"\nfrom_address = \"reach@{D}\"\n\
         reply_domain = \"{D}\"\nlisten = \"127.0.0.1:{smtp_port}\"\ndigest_window_secs = 1\n\n\
         [integrated]\nhosts = [\"{HOST}\"]\n",
        sink.port
    );
    let reach = Reach::start_with(&server, state.path(), &extra).await;
    assert!(
        reach
            .wait_for_log("speaks XEP-0356 urn:xmpp:privilege:1 only", T)
            .await,
        "{}",
        reach.log()
    );
    let mut alice = Client::connect(&server, "alice", "alicepw", "pc").await;
    support::wait_for_component(&mut alice, D).await;
    alice.presence("").await;
    support::account::asks_to_register(
        &mut alice,
        &format!("<username>alice</username><email>{ALICE_MAIL}</email>"),
    )
    .await;
    let mail = sink.wait_for(1, T).await.remove(0);
    let code = support::account::email_code(&mail);
    alice
        .expect("the note that a code is on its way", T, |s| {
            body(s).is_some_and(|b| b.contains("verification code"))
        })
        .await;
    assert!(say(&mut alice, &format!("verify {code}"))
        .await
        .contains("is verified"));
    let said = say(&mut alice, "address own").await;
    assert!(
        said.contains("has not allowed Reach to send messages as you"),
        "{said}"
    );
    alice.close().await;

    // Her reach address works as ever.
    let mut bob = Client::connect(&server, "bob", "bobpw", "pc").await;
    bob.presence("").await;
    chat(&mut bob, &format!("alice@{D}"), "Via the reach address").await;
    let mail = wait_forwards(&sink, ALICE_MAIL, 1).await.remove(0);
    let message = format!(
        "From: Alice <{ALICE_MAIL}>\nTo: {}\nSubject: Re: IM\nMessage-ID: <{}@mail.example>\n\
         In-Reply-To: {}\n\nFrom the reach address\n",
        mail.reply_to(),
        new_id(),
        mail.message_id()
    );
    let answer = submit(smtp_port, ALICE_MAIL, &[&mail.reply_to()], &message)
        .await
        .outcome();
    assert_eq!(answer.0, 250, "{answer:?}");
    let got = bob
        .expect("Alice's reply", T, is_chat_with("From the reach address"))
        .await;
    assert_eq!(attr(&got, "from"), format!("alice@{D}"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn while_reach_is_down_the_rules_copy_nothing_and_nobody_sees_an_error() {
    let mut w = World::new().await;
    w.opted_in("alice", ALICE_MAIL).await.close().await;
    w.reach.stop().await;
    let mut bob = w.client_no_wait("bob").await;
    bob.presence("").await;
    let mut carol = w.carol().await;
    chat(&mut bob, ALICE, "Bob while Reach is down").await;
    chat(&mut carol, ALICE, "Carol while Reach is down").await;
    chat(&mut carol, ALICE, "Carol again").await;
    // Prosody would bounce a copy to the sender of the message it copies: to Bob as a stray
    // error, and on the s2s link to Carol's server, which drops the link over it. The rules
    // copy only while Reach is connected.
    let error = |s: &Element| s.name() == "message" && attr(s, "type") == "error";
    bob.expect_none(QUIET, error).await;
    carol.expect_none(Duration::from_millis(200), error).await;
    for server in [&w.home, &w.remote] {
        let log = server.log();
        assert!(!log.contains("bouncing error for: <message"), "{log}");
        assert!(!log.contains("not-authorized"), "{log}");
    }

    // Back again: what came meanwhile waits for her clients; what comes now is forwarded.
    let config = std::fs::read_to_string(w.reach.state_dir().join("reach.toml")).unwrap();
    w.reach = Reach::start_config(w.reach.state_dir(), &config).await;
    support::wait_for_component(&mut bob, D).await;
    chat(&mut bob, ALICE, "Bob after Reach is back").await;
    let mails = wait_forwards(&w.sink, ALICE_MAIL, 1).await;
    tokio::time::sleep(QUIET).await;
    assert_eq!(forwards_to(&w.sink, ALICE_MAIL).len(), 1);
    let text = mails[0].text();
    assert!(text.contains("Bob after Reach is back"), "{text}");
    assert!(!text.contains("while Reach is down"), "{text}");
    let mut alice = w.client("alice").await;
    alice.presence("").await;
    for text in [
        "Bob while Reach is down",
        "Carol while Reach is down",
        "Carol again",
        "Bob after Reach is back",
    ] {
        alice
            .expect(text, T, move |s| body(s).as_deref() == Some(text))
            .await;
    }
    w.done();
}
