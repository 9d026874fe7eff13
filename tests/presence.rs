//! Presence end to end: the built `reach` against a real Prosody or ejabberd, a real Kannel (the
//! test holds the fake SMSC's socket as Alice's phone) and a mail sink (Alice's mailbox). What Bob
//! sees of alice@D as Alice leaves XMPP and sets her terminals' local states (the global presence,
//! DESIGN.md "Presence"), what `status` says of it, and the buddy alerts her phone gets.

use crate::support;

use std::time::Duration;

use support::kannel::{Handset, Kannel, Mt};
use support::mail::MailSink;
use support::{attr, body, child_text, Client, Element, Reach, Server, ServerKind, NS_CLIENT};

const D: &str = "reach.localhost";
const ALICE_D: &str = "alice@reach.localhost";
const ALICE_MAIL: &str = "alice@mail.example";
const T: Duration = Duration::from_secs(15);
const PHONE: &str = "+15551234567";
const SERVICE_NUMBER: &str = "+15550000000";
const SECRET: &str = "webhooksecret42";
/// What Bob's client sees while every terminal that can reach Alice is on do not disturb.
const DND_STATUS: &str = "do not disturb: messages wait";

struct World {
    server: Server,
    kannel: Kannel,
    phone: Handset,
    sink: MailSink,
    reach: Reach,
    _state: tempfile::TempDir,
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- reach log ---\n{}\n--- kannel ---\n{}",
                self.reach.log(),
                self.kannel.logs(30)
            );
        }
    }
}

impl World {
    async fn new(kind: ServerKind) -> World {
        let server = Server::start(kind).await;
        for user in ["alice", "bob", "carol"] {
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
        // A one-second grace delay, so a forward that dnd failed to stop would show in seconds.
        let extra = format!(
            "[routing]\ngrace_delay_secs = 1\n\n\
             [sms]\nsendsms_url = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\nfrom = \"{SERVICE_NUMBER}\"\n\
             webhook_listen = \"127.0.0.1:{webhook_port}\"\nwebhook_url = \"http://127.0.0.1:{webhook_port}\"\n\
             webhook_secret = \"{SECRET}\"\ndaily_cap = 40\nallowed_prefixes = [\"+1\"]\n\n\
             [email]\nrelay = \"smtp://127.0.0.1:{}\"\nfrom_address = \"reach@{D}\"\n\
             reply_domain = \"{D}\"\nlisten = \"127.0.0.1:{}\"\ndigest_window_secs = 1\n",
            kannel.sendsms_url(),
            kannel.username(),
            kannel.password(),
            sink.port,
            support::free_port(),
        );
        let reach = Reach::start_with(&server, state.path(), &extra).await;
        World {
            server,
            kannel,
            phone,
            sink,
            reach,
            _state: state,
        }
    }

    async fn client(&self, user: &str, resource: &str) -> Client {
        let mut c = Client::connect(&self.server, user, &format!("{user}pw"), resource).await;
        support::wait_for_component(&mut c, D).await;
        c
    }

    async fn mt(&mut self, what: &str) -> Mt {
        match self.phone.recv_mt(T).await {
            Some(mt) => mt,
            None => panic!("the phone got no SMS: expected {what}"),
        }
    }

    async fn no_mt(&mut self, why: &str) {
        if let Some(mt) = self.phone.recv_mt(Duration::from_secs(3)).await {
            panic!("the phone got an SMS, but {why}: {mt:?}");
        }
    }

    /// Texts from the phone and returns Reach's answer.
    async fn text(&mut self, text: &str) -> String {
        self.phone.send_mo(PHONE, SERVICE_NUMBER, text).await;
        self.mt(&format!("the answer to {text}")).await.text
    }

    /// Alice (online, as `alice/pc`) registers `fields` and approves Reach's subscription, so
    /// Reach sees her client.
    async fn alice_registers(&mut self, fields: &str) -> Client {
        let mut alice = self.client("alice", "pc").await;
        alice.presence("").await;
        alice
            .iq_ok(&format!(
                "<iq type='set' id='reg' to='{D}'><query xmlns='jabber:iq:register'><username>alice</username>{fields}</query></iq>"
            ))
            .await;
        alice
            .expect("Reach's subscription request", T, |s| {
                s.attr("type") == Some("subscribe")
            })
            .await;
        alice
            .send(&format!("<presence type='subscribed' to='{D}'/>"))
            .await;
        alice
    }

    /// Confirms the phone by texting back the code it got.
    async fn verify_phone(&mut self) {
        let code_sms = self.mt("the verification code").await;
        let code: String = code_sms
            .text
            .split(|c: char| !c.is_ascii_digit())
            .find(|w| w.len() == 6)
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("a 6-digit code in {code_sms:?}"));
        assert!(self.text(&code).await.contains("is verified"));
    }

    /// Alice (online, as `alice/pc`) registers her phone and confirms it by texting the code.
    async fn alice_with_verified_phone(&mut self) -> Client {
        let alice = self
            .alice_registers(&format!("<phone>{PHONE}</phone>"))
            .await;
        self.verify_phone().await;
        alice
    }

    /// Alice registers her phone and her email address and confirms both.
    async fn alice_with_verified_phone_and_email(&mut self) -> Client {
        let mut alice = self
            .alice_registers(&format!(
                "<phone>{PHONE}</phone><email>{ALICE_MAIL}</email>"
            ))
            .await;
        self.verify_phone().await;
        let mails = self.sink.wait_for(1, T).await;
        let subject = mails[0].header("Subject").unwrap();
        let code: String = subject.chars().filter(char::is_ascii_digit).collect();
        assert_eq!(code.len(), 6, "subject: {subject}");
        say(&mut alice, &format!("verify {code}"), "is verified").await;
        alice
    }

    /// `who` adds alice@D and approves Reach's request back, so each sees the other's presence.
    async fn buddy(&self, who: &str) -> Client {
        let mut c = self.client(who, "pc").await;
        c.presence("").await;
        c.send(&format!("<presence type='subscribe' to='{ALICE_D}'/>"))
            .await;
        c.expect("Reach asks back", T, |s| {
            s.attr("from") == Some(ALICE_D) && s.attr("type") == Some("subscribe")
        })
        .await;
        c.send(&format!("<presence type='subscribed' to='{ALICE_D}'/>"))
            .await;
        c
    }

    /// The mails that forward IMs (not the verification mail).
    fn forwarded_mails(&self) -> usize {
        self.sink
            .mails()
            .iter()
            .filter(|m| {
                m.header("Subject")
                    .is_some_and(|s| s.starts_with("IM from"))
            })
            .count()
    }
}

/// Chats `line` to the service and returns its answer, the first one containing `needle`.
async fn say(c: &mut Client, line: &str, needle: &str) -> String {
    c.send(&format!(
        "<message type='chat' to='{D}'><body>{line}</body></message>"
    ))
    .await;
    let answer = c
        .expect(&format!("the answer to {line}"), T, |s| {
            attr(s, "from") == D && body(s).is_some_and(|b| b.contains(needle))
        })
        .await;
    body(&answer).unwrap_or_default()
}

/// A presence of alice@D as a buddy sees it: `None` unavailable, else (show, status).
type Seen = Option<(Option<String>, Option<String>)>;

fn alice_d(s: &Element) -> Option<Seen> {
    if s.name() != "presence" || attr(s, "from") != ALICE_D {
        return None;
    }
    match attr(s, "type") {
        "unavailable" => Some(None),
        "" => Some(Some((
            child_text(s, "show", NS_CLIENT),
            child_text(s, "status", NS_CLIENT),
        ))),
        _ => None,
    }
}

fn seen(show: Option<&str>, status: &str) -> Seen {
    Some((show.map(Into::into), Some(status.into())))
}

/// Bob's client watching alice@D: what it saw last.
struct Watching {
    bob: Client,
    last: Seen,
}

impl Watching {
    /// Bob, once alice@D shows her client (available, no show, no status).
    async fn start(bob: Client) -> Watching {
        let mut watching = Watching { bob, last: None };
        watching
            .sees(
                "alice@D available, as Alice is at her client",
                Some((None, None)),
            )
            .await;
        watching
    }

    /// The next presence of alice@D that differs from the last one (servers may repeat one,
    /// e.g. a probe's answer) must be `expected`: no stale or intermediate presence comes first.
    /// Every presence of alice@D up to it is taken off the client, in the order it came.
    async fn sees(&mut self, what: &str, expected: Seen) {
        let deadline = std::time::Instant::now() + T;
        loop {
            let left = deadline.saturating_duration_since(std::time::Instant::now());
            let Some(got) = self.bob.wait_for(left, |s| alice_d(s).is_some()).await else {
                panic!("Bob got no new presence of alice@D: expected {what}");
            };
            let got = alice_d(&got).unwrap_or(None);
            if got == self.last {
                continue;
            }
            assert_eq!(got, expected, "{what}");
            self.last = expected;
            return;
        }
    }
}

macro_rules! on_both_servers {
    ($($scenario:ident),* $(,)?) => {$(
        mod $scenario {
            use super::*;
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn prosody() {
                super::$scenario(ServerKind::Prosody).await
            }
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn ejabberd() {
                super::$scenario(ServerKind::Ejabberd).await
            }
        }
    )*};
}

on_both_servers!(
    bob_sees_alice_go_from_xmpp_to_her_phone_and_its_local_states,
    dnd_on_one_terminal_and_available_on_another,
);

async fn bob_sees_alice_go_from_xmpp_to_her_phone_and_its_local_states(kind: ServerKind) {
    let mut w = World::new(kind).await;
    let alice = w.alice_with_verified_phone().await;
    let mut bob = Watching::start(w.buddy("bob").await).await;

    alice.close().await;
    bob.sees("alice@D available on SMS", seen(None, "on SMS"))
        .await;

    let said = w.text("/dnd").await;
    assert!(
        said.contains("Buddies see you: do not disturb (messages wait)."),
        "{said}"
    );
    bob.sees("alice@D dnd", seen(Some("dnd"), DND_STATUS)).await;

    let said = w.text("/away").await;
    assert!(
        said.contains("Buddies see you: away (reachable by SMS)."),
        "{said}"
    );
    bob.sees("alice@D away", seen(Some("away"), "reachable by SMS"))
        .await;

    let said = w.text("/back").await;
    assert!(
        said.contains("Buddies see you: available (on SMS)."),
        "{said}"
    );
    bob.sees("alice@D available on SMS again", seen(None, "on SMS"))
        .await;
    let status = w.text("/status").await;
    assert!(
        status.contains("phone available; buddies see: available (on SMS)."),
        "{status}"
    );

    // STOP: the phone cannot reach her any more, and nothing else can.
    w.phone.send_mo(PHONE, SERVICE_NUMBER, "STOP").await;
    bob.sees("alice@D unavailable after STOP", None).await;

    // Bob logs in again: his server probes alice@D, and Reach answers what it published.
    bob.bob.close().await;
    let mut bob = w.client("bob", "laptop").await;
    bob.presence("").await;
    let answer = bob
        .expect("the probe's answer", T, |s| alice_d(s).is_some())
        .await;
    assert_eq!(alice_d(&answer), Some(None));
}

async fn dnd_on_one_terminal_and_available_on_another(kind: ServerKind) {
    let mut w = World::new(kind).await;
    let mut alice = w.alice_with_verified_phone_and_email().await;
    let mut bob = Watching::start(w.buddy("bob").await).await;

    // At her client, Alice sets her email address to dnd: Bob still sees her client.
    let said = say(&mut alice, "state email dnd", "do not disturb").await;
    assert!(said.ends_with("Buddies see you: available."), "{said}");
    let status = say(&mut alice, "status", "Your reach address").await;
    assert!(status.contains("\nBuddies see: available\n"), "{status}");

    // She leaves: the phone is available, the email address dnd: available on SMS.
    alice.close().await;
    bob.sees("alice@D available on SMS", seen(None, "on SMS"))
        .await;

    // Now dnd on the phone too: dnd, and what Bob writes waits for her.
    let said = w.text("/dnd").await;
    assert!(
        said.contains("Buddies see you: do not disturb (messages wait)."),
        "{said}"
    );
    bob.sees("alice@D dnd", seen(Some("dnd"), DND_STATUS)).await;
    bob.bob
        .send(&format!(
            "<message type='chat' id='w1' to='{ALICE_D}'><body>while you rest</body></message>"
        ))
        .await;
    w.no_mt("the phone is on do not disturb").await;
    assert_eq!(w.forwarded_mails(), 0, "the email address is on dnd");

    // Away on the phone: away, reachable by SMS, while the email address stays dnd.
    let said = w.text("/away").await;
    assert!(
        said.contains("Buddies see you: away (reachable by SMS)."),
        "{said}"
    );
    bob.sees(
        "alice@D away by SMS",
        seen(Some("away"), "reachable by SMS"),
    )
    .await;

    // Available by email, away on the phone: available by email.
    let mut alice = w.client("alice", "pc").await;
    let said = say(&mut alice, "state email available", "is available").await;
    // Her new client has sent no presence yet, so Reach does not count it.
    assert!(
        said.ends_with("Buddies see you: available (by email)."),
        "{said}"
    );
    bob.sees("alice@D available by email", seen(None, "by email"))
        .await;

    // Alice's client comes online: Bob sees her client.
    alice.presence("").await;
    bob.sees("alice@D available at her client", Some((None, None)))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alices_phone_hears_once_of_each_change_of_the_buddies_she_chose() {
    let mut w = World::new(ServerKind::Prosody).await;
    let alice = w.alice_with_verified_phone().await;
    alice.close().await;
    let bob = w.buddy("bob").await;
    let carol = w.buddy("carol").await;
    carol.close().await;
    // Let Reach see Bob online and Carol gone before the alerts are chosen.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for buddy in ["bob@localhost", "carol@localhost"] {
        let said = w.text(&format!("/alert {buddy}")).await;
        assert!(said.contains("will be told here"), "{said}");
    }

    // A second resource of an online buddy, and one of two leaving, change nothing.
    let mut bob_phone = w.client("bob", "phone").await;
    bob_phone.presence("").await;
    w.no_mt("Bob was online already").await;
    bob.close().await;
    w.no_mt("Bob is still online on his phone").await;
    bob_phone.close().await;
    assert_eq!(
        w.mt("Bob going offline").await.text,
        "Reach: bob@localhost is offline"
    );

    let mut carol = w.client("carol", "pc").await;
    carol.presence("").await;
    assert_eq!(
        w.mt("Carol coming online").await.text,
        "Reach: carol@localhost is online"
    );
    carol.presence("<status>busy</status>").await;
    w.no_mt("Carol only changed her status").await;

    // Bob back within five minutes of his last alert: held back by the rate limit.
    let mut bob = w.client("bob", "pc").await;
    bob.presence("").await;
    w.no_mt("the last alert about Bob was less than five minutes ago")
        .await;
}
