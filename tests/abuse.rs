//! Verification codes under abuse, end to end (issue 10): the built `reach` with its default
//! `[limits]`, against a real Prosody, a real Kannel (bearerbox + smsbox with the fake SMSC; the
//! test holds the fake SMSC's socket and counts the SMS that actually arrive there) and a real
//! SMTP relay (aiosmtpd, counting the mails stored for one mailbox).
//!
//! Each test ends with a marker: a code queued after everything the attack could have sent, so
//! "no more than N arrived" is read from what came before the marker, not from a wait. Reach's
//! queues send in order but a few at a time (`sms.concurrency`), so one of the attack's last
//! sends could in principle arrive just after the marker: that could hide an extra SMS or two
//! of a broken build (which sent 27 extra), never fail a correct one.

use crate::support;

use std::time::Duration;

use support::kannel::{Handset, Kannel, Mt};
use support::mail::MailSink;
use support::{body, Client, Reach, Server, ServerKind};

const D: &str = "reach.localhost";
const T: Duration = Duration::from_secs(15);
const SERVICE_NUMBER: &str = "+15550000000";
const SECRET: &str = "webhooksecret42";

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
    async fn new() -> World {
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
        let smtp_port = support::free_port();
        let state = tempfile::tempdir().unwrap();
        // No [limits]: the defaults are what is tested. The SMS cap and country list are the
        // service's, as an operator would set them; they do not bound verification codes.
        let extra = format!(
            "[email]\nrelay = \"smtp://127.0.0.1:{}\"\nfrom_address = \"reach@{D}\"\n\
             reply_domain = \"{D}\"\nlisten = \"127.0.0.1:{smtp_port}\"\n\n\
             [sms]\nsendsms_url = \"{}\"\nusername = \"{}\"\npassword = \"{}\"\nfrom = \"{SERVICE_NUMBER}\"\n\
             webhook_listen = \"127.0.0.1:{webhook_port}\"\nwebhook_url = \"http://127.0.0.1:{webhook_port}\"\n\
             webhook_secret = \"{SECRET}\"\ndaily_cap = 50\n",
            sink.port,
            kannel.sendsms_url(),
            kannel.username(),
            kannel.password()
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

    /// A registered user, online, with no terminal yet.
    async fn registered(&self, user: &str) -> Client {
        let mut c = Client::connect(&self.server, user, &format!("{user}pw"), "pc").await;
        support::wait_for_component(&mut c, D).await;
        c.presence("").await;
        c.iq_ok(&format!(
            "<iq type='set' id='reg-{user}' to='{D}'><query xmlns='jabber:iq:register'><username>{user}</username></query></iq>"
        ))
        .await;
        c
    }

    /// Every SMS the handset gets until one to `marker` arrives (that one not included).
    async fn sms_before(&mut self, marker: &str) -> Vec<Mt> {
        let mut seen = Vec::new();
        loop {
            match self.phone.recv_mt(T).await {
                Some(mt) if mt.to == marker => return seen,
                Some(mt) => seen.push(mt),
                None => panic!("no SMS to the marker {marker}; before it: {seen:?}"),
            }
        }
    }
}

/// A chat line to the service, and its answer.
async fn say(client: &mut Client, line: &str) -> String {
    let id = support::new_id();
    client
        .send(&format!(
            "<message type='chat' id='{id}' to='{D}'><body>{line}</body></message>"
        ))
        .await;
    let answer = client
        .expect(&format!("the answer to '{line}'"), T, |s| {
            s.name() == "message" && s.attr("from") == Some(D) && body(s).is_some()
        })
        .await;
    body(&answer).unwrap_or_default()
}

fn six_digits(text: &str) -> String {
    text.split(|c: char| !c.is_ascii_digit())
        .find(|w| w.len() == 6)
        .map(str::to_owned)
        .unwrap_or_else(|| panic!("a 6-digit code in {text:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_numbers_added_by_chat_get_three_verification_sms() {
    let mut w = World::new().await;
    let mut alice = w.registered("alice").await;
    let mut refused = 0;
    for n in 0..30 {
        let said = say(&mut alice, &format!("add phone +1555010{n:04}")).await;
        if said.contains("Reach sends no code to") {
            assert!(said.ends_with("Nothing was changed."), "{said}");
            refused += 1;
        }
    }
    // The marker: Bob adds his own number, after all of Alice's.
    let mut bob = w.registered("bob").await;
    let said = say(&mut bob, "add phone +15550209999").await;
    assert!(said.contains("on its way"), "{said}");
    let arrived = w.sms_before("+15550209999").await;
    let numbers: Vec<&str> = arrived.iter().map(|mt| mt.to.as_str()).collect();
    assert_eq!(numbers, ["+15550100000", "+15550100001", "+15550100002"]);
    for mt in &arrived {
        assert!(mt.text.starts_with("Your Reach code is"), "{mt:?}");
    }
    assert_eq!(refused, 27, "every number past the third is refused");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn case_variants_of_one_mailbox_get_five_mails() {
    let w = World::new().await;
    let mut alice = w.registered("alice").await;
    let variants = [
        "Victim@example.net",
        "vIctim@example.net",
        "viCtim@example.net",
        "vicTim@example.net",
        "victIm@example.net",
        "victiM@example.net",
        "VICTIM@example.net",
        "victim+reach@example.net",
    ];
    let mut answers = Vec::new();
    for variant in variants {
        answers.push(say(&mut alice, &format!("add email {variant}")).await);
    }
    // The marker: Bob's own code, sent after all of Alice's.
    let mut bob = w.registered("bob").await;
    say(&mut bob, "add email bob@mail.example").await;
    let mails = w.sink.wait_for(1, T).await;
    let mut mails = mails;
    let deadline = std::time::Instant::now() + T;
    while !mails
        .iter()
        .any(|m| m.raw_header("X-RcptTo").as_deref() == Some("bob@mail.example"))
    {
        assert!(
            std::time::Instant::now() < deadline,
            "no mail to the marker"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
        mails = w.sink.mails();
    }
    let to_victim = mails
        .iter()
        .filter(|m| {
            m.raw_header("X-RcptTo")
                .is_some_and(|to| to.to_lowercase().starts_with("victim"))
        })
        .count();
    assert_eq!(to_victim, 5, "mails stored for the victim's mailbox");
    for said in &answers[5..] {
        assert!(
            said.contains("Reach already sent 5 verification codes to"),
            "{said}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn thirty_wrong_guesses_with_fresh_emails_leave_the_phone_unverified() {
    let mut w = World::new().await;
    let mut alice = w.registered("alice").await;
    // Alice adds a number she does not own; the test, holding that handset, sees the code.
    const NOT_HERS: &str = "+15550107777";
    let said = say(&mut alice, &format!("add phone {NOT_HERS}")).await;
    assert!(said.contains("on its way"), "{said}");
    let code_sms = w.phone.recv_mt(T).await.expect("the code SMS");
    assert_eq!(code_sms.to, NOT_HERS);
    let real_code = six_digits(&code_sms.text);
    let wrong = if real_code == "000000" {
        "111111"
    } else {
        "000000"
    };
    let mut answers = Vec::new();
    for guess in 0..30 {
        if guess % 5 == 0 {
            say(&mut alice, &format!("add email fresh{guess}@mail.example")).await;
        }
        answers.push(say(&mut alice, &format!("verify {wrong}")).await);
    }
    // The real code texted back from the phone verifies nothing...
    w.phone.send_mo(NOT_HERS, SERVICE_NUMBER, &real_code).await;
    // (wait until Reach has decided about that text: it logs either outcome)
    let deadline = std::time::Instant::now() + T;
    loop {
        let log = w.reach.log();
        if log.contains("SMS from an unknown number ignored")
            || log.contains("phone terminal verified")
        {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the text was not handled"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let unverified = format!("Phone: {NOT_HERS} (not verified yet");
    let terminals = say(&mut alice, "terminals").await;
    assert!(terminals.contains(&unverified), "texted back: {terminals}");
    // ...nor typed in the chat.
    let typed = say(&mut alice, &format!("verify {real_code}")).await;
    let terminals = say(&mut alice, "terminals").await;
    assert!(terminals.contains(&unverified), "typed: {terminals}");
    // Nothing but the marker reaches the phone: no confirmation was sent.
    let mut bob = w.registered("bob").await;
    say(&mut bob, "add phone +15550209999").await;
    let arrived = w.sms_before("+15550209999").await;
    assert!(arrived.is_empty(), "{arrived:?}");
    // What Alice was told.
    assert_eq!(answers[0], "That code is wrong (4 tries left).");
    assert_eq!(
        answers[4],
        "That code is wrong, and that was the last try. Send \"verify\" for a new code."
    );
    let used_up = "You entered 10 wrong verification codes today; Reach checks no more codes \
                   from you until tomorrow (UTC). Then send \"verify\" for new codes.";
    assert_eq!(answers[29], used_up);
    assert_eq!(typed, used_up);
}
