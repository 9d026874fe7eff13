//! Presence end to end: the built `reach` against a real Prosody and a real Kannel (the test holds
//! the fake SMSC's socket as Alice's phone). What Bob sees of alice@D as Alice leaves XMPP and
//! sets her phone's local state, and the buddy alerts her phone gets.

mod support;

use std::time::Duration;

use support::kannel::{Handset, Kannel, Mt};
use support::{attr, child_text, Client, Element, Reach, Server, ServerKind, NS_CLIENT};

const D: &str = "reach.localhost";
const ALICE_D: &str = "alice@reach.localhost";
const T: Duration = Duration::from_secs(15);
const PHONE: &str = "+15551234567";
const SERVICE_NUMBER: &str = "+15550000000";
const SECRET: &str = "webhooksecret42";

struct World {
    server: Server,
    kannel: Kannel,
    phone: Handset,
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
    async fn new() -> World {
        let server = Server::start(ServerKind::Prosody).await;
        for user in ["alice", "bob", "carol"] {
            server.register(user, &format!("{user}pw")).await;
        }
        let webhook_port = support::free_port();
        let kannel = Kannel::start(&format!(
            "http://127.0.0.1:{webhook_port}/sms/mo?secret={SECRET}"
        ))
        .await;
        let phone = Handset::connect(&kannel).await;
        let state = tempfile::tempdir().unwrap();
        let extra = format!(
            "[sms]\nsendsms_url = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\nfrom = \"{SERVICE_NUMBER}\"\n\
             webhook_listen = \"127.0.0.1:{webhook_port}\"\nwebhook_url = \"http://127.0.0.1:{webhook_port}\"\n\
             webhook_secret = \"{SECRET}\"\ndaily_cap = 40\nallowed_prefixes = [\"+1\"]\n",
            kannel.sendsms_url(),
            kannel.username(),
            kannel.password()
        );
        let reach = Reach::start_with(&server, state.path(), &extra).await;
        World {
            server,
            kannel,
            phone,
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

    /// Alice (online, as `alice/pc`) registers her phone and confirms it by texting the code.
    async fn alice_with_verified_phone(&mut self) -> Client {
        let mut alice = self.client("alice", "pc").await;
        alice.presence("").await;
        alice
            .iq_ok(&format!(
                "<iq type='set' id='reg' to='{D}'><query xmlns='jabber:iq:register'><username>alice</username><phone>{PHONE}</phone></query></iq>"
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
        let code_sms = self.mt("the verification code").await;
        let code: String = code_sms
            .text
            .split(|c: char| !c.is_ascii_digit())
            .find(|w| w.len() == 6)
            .map(str::to_owned)
            .unwrap_or_else(|| panic!("a 6-digit code in {code_sms:?}"));
        assert!(self.text(&code).await.contains("is verified"));
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
}

/// A presence of alice@D as a buddy sees it: `None` unavailable, else (show, status).
fn alice_d(s: &Element) -> Option<Option<(Option<String>, Option<String>)>> {
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

fn reachable_by_sms(s: &Element) -> bool {
    alice_d(s) == Some(Some((Some("away".into()), Some("reachable by SMS".into()))))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bob_sees_alice_go_from_xmpp_to_her_phone_and_its_local_states() {
    let mut w = World::new().await;
    let alice = w.alice_with_verified_phone().await;
    let mut bob = w.buddy("bob").await;
    bob.expect("alice@D available, as Alice is at her client", T, |s| {
        alice_d(s) == Some(Some((None, None)))
    })
    .await;

    alice.close().await;
    bob.expect("alice@D away, reachable by SMS", T, reachable_by_sms)
        .await;

    assert!(w.text("/dnd").await.contains("do not disturb"));
    bob.expect("alice@D unavailable while her phone is dnd", T, |s| {
        alice_d(s) == Some(None)
    })
    .await;

    assert!(w.text("/back").await.contains("available"));
    bob.expect("alice@D reachable by SMS again", T, reachable_by_sms)
        .await;

    // Bob logs in again: his server probes alice@D, and Reach answers what it published.
    bob.close().await;
    let mut bob = w.client("bob", "laptop").await;
    bob.presence("").await;
    bob.expect("the probe's answer", T, reachable_by_sms).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alices_phone_hears_once_of_each_change_of_the_buddies_she_chose() {
    let mut w = World::new().await;
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
