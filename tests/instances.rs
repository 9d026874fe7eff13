//! Several Reach instances behind one ejabberd, on one PostgreSQL database (issue 12), as user
//! stories: the built `reach` run two or three times under distinct `[store] instance` names,
//! against a real ejabberd 23.01 (which spreads the stanzas for the component domain over the
//! instances' connections at random), a real PostgreSQL (`PgCluster`), the aiosmtpd relay and a
//! real Kannel with its fake SMSC, all built by `support::site` (shared with
//! `tests/instances_soak.rs`). A site's load balancer "behind the same names" is
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

use crate::support;

use std::time::{Duration, Instant};

use support::account::{self, ALICE_MAIL, PHONE, SERVICE_NUMBER};
use support::balancer::Mode;
use support::kannel::{Handset, Mt};
use support::logs::{count_lines, strip_ansi};
use support::mail::{submit, MailSink, SinkMail};
use support::postgres::PgCluster;
use support::site::{Site, SiteOptions};
use support::tokens::{reordering, token_number, tokens};
use support::{attr, body, Client, Element, Reach, StoreAt};

const D: &str = "reach.localhost";
const T: Duration = Duration::from_secs(20);
/// What an instance logs when it skips the walk over the users as its link comes up.
const WALK_SKIPPED: &str = "another instance's link is up";
/// Bob's per-session JID at Alice's client.
const BOB_SESSION: &str = "bob\\40localhost@reach.localhost";

/// How many of the stanza ids in `ids` the link of each instance's running process read (its
/// `inbound stanza` lines).
fn stanzas_read(site: &Site, ids: &[String]) -> Vec<usize> {
    let wanted: std::collections::HashSet<String> =
        ids.iter().map(|id| format!("\"{id}\"")).collect();
    site.instances
        .iter()
        .map(|i| {
            i.log()
                .lines()
                .filter(|l| l.contains("inbound stanza"))
                .filter(|l| wanted.iter().any(|w| l.contains(w.as_str())))
                .count()
        })
        .collect()
}

/// Alice logs in, registers (with the email address and phone number given), accepts Reach's
/// subscription and verifies each terminal; she stays online.
async fn alice_registers(site: &mut Site, email: bool, phone: bool) -> Client {
    let mut alice = site.client("alice", "pc").await;
    alice.presence("").await;
    let mut fields = String::from("<username>alice</username>");
    if email {
        fields.push_str(&format!("<email>{ALICE_MAIL}</email>"));
    }
    if phone {
        fields.push_str(&format!("<phone>{PHONE}</phone>"));
    }
    account::register(&mut alice, &fields, T).await;
    if email {
        let mail = site.sink().wait_for(1, T).await.remove(0);
        let code = account::email_code(&mail);
        assert_eq!(code.len(), 6, "subject: {:?}", mail.header("Subject"));
        let said = account::say(&mut alice, &format!("verify {code}"), T).await;
        assert!(said.contains("is verified"), "{said}");
    }
    if phone {
        let code = account::phone_code(site.phone(), T).await;
        site.phone().send_mo(PHONE, SERVICE_NUMBER, &code).await;
        alice
            .expect("the phone verified", T, |s| {
                body(s).is_some_and(|b| b.contains("is verified"))
            })
            .await;
    }
    alice
}

/// A site of `instances` instances with email (forwards go out after 1 s).
async fn site_with_email(instances: usize) -> Site {
    Site::new(SiteOptions {
        instances,
        email: true,
        digest_secs: 1,
        ..SiteOptions::default()
    })
    .await
}

/// Alice registers with her email address, verifies it and goes offline.
async fn alice_verifies_email_and_leaves(site: &mut Site) {
    let alice = alice_registers(site, true, false).await;
    alice.close().await;
}

/// Bob's client, online.
async fn bob_online(site: &Site) -> Client {
    let mut bob = site.client("bob", "pc").await;
    bob.presence("").await;
    bob
}

/// Once Reach has seen Alice leave (500 ms), Bob writes `first-1` to her: the reply alias of the
/// email it is forwarded in.
async fn alias_of_a_first_forward(site: &Site, bob: &mut Client) -> String {
    tokio::time::sleep(Duration::from_millis(500)).await;
    bob_sends(bob, "first", 1, Duration::ZERO).await;
    wait_mail_with(site.sink(), "first-1").await.reply_to()
}

/// The start of the stories where instance a loses ejabberd: a site of `instances` with email,
/// whose instance a reaches ejabberd through a forwarder the test can cut (and with
/// `cuttable_relay` its relay too); Alice offline with a verified email address; Bob online.
/// Returns the site, Bob's client and the reply alias of a first forward.
async fn site_where_a_can_be_cut_off(
    instances: usize,
    cuttable_relay: bool,
) -> (Site, Client, String) {
    let mut site = Site::new(SiteOptions {
        instances,
        email: true,
        cuttable_links: 1,
        cuttable_relay,
        digest_secs: 1,
        ..SiteOptions::default()
    })
    .await;
    alice_verifies_email_and_leaves(&mut site).await;
    let mut bob = bob_online(&site).await;
    let alias = alias_of_a_first_forward(&site, &mut bob).await;
    (site, bob, alias)
}

/// Cuts instance a off from ejabberd and waits until its link is down.
async fn cut_a_off_from_the_server(site: &Site) {
    site.cut_link(0);
    assert!(
        site.instances[0]
            .wait_for_log("component link down", T)
            .await,
        "instance a's link went down"
    );
}

/// Alice's email reply to `alias`, with `token` in its Message-ID and text.
fn reply_mail(alias: &str, token: &str) -> String {
    format!(
        "From: Alice <{ALICE_MAIL}>\nTo: <{alias}>\nSubject: Re: IM\nMessage-ID: <{token}@mail.example>\n\
         Content-Type: text/plain; charset=utf-8\n\n{token}\n"
    )
}

/// Alice's email reply is submitted to instance a's own SMTP listener, which takes it (250).
async fn alice_replies_through_a(site: &Site, alias: &str, token: &str) {
    let answer = submit(
        site.instances[0].smtp_port,
        ALICE_MAIL,
        &[alias],
        &reply_mail(alias, token),
    )
    .await
    .outcome();
    assert_eq!(answer.0, 250, "{answer:?}");
}

/// Whether a mail with `token` is at the relay within `within`.
async fn mailed_within(sink: &MailSink, token: &str, within: Duration) -> bool {
    let deadline = Instant::now() + within;
    let mut mailed = false;
    while Instant::now() < deadline && !mailed {
        mailed = sink.mails().iter().any(|m| m.text().contains(token));
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    mailed
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
            let n = token_number(&t);
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
    let mut site = Site::new(SiteOptions {
        instances: 2,
        ..SiteOptions::default()
    })
    .await;
    let mut alice = alice_registers(&mut site, false, false).await;
    let mut bob = bob_online(&site).await;
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
            site.add_instance(T).await;
            // Give ejabberd a moment to route to the new connection.
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
        const N: u64 = 60;
        let ids = bob_sends(&mut bob, prefix, N, gap).await;
        let arrivals = alice_collects(&mut alice, prefix, N, Duration::from_secs(2)).await;
        assert_each_once(prefix, &arrivals, N);
        let handled = stanzas_read(&site, &ids);
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
    let mut site = site_with_email(3).await;
    alice_verifies_email_and_leaves(&mut site).await;
    let mut bob = bob_online(&site).await;
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
            arrivals.push(token_number(&t));
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
    let mut site = Site::new(SiteOptions {
        instances: 2,
        email: true,
        sms: true,
        digest_secs: 1,
        ..SiteOptions::default()
    })
    .await;
    let mut alice = alice_registers(&mut site, true, true).await;
    // The phone's confirmation and anything else it got so far.
    while site
        .phone()
        .recv_mt(Duration::from_millis(500))
        .await
        .is_some()
    {}
    let said = account::say(&mut alice, "primary email", T).await;
    assert!(!said.contains("Nothing was changed"), "{said}");
    alice.close().await;
    let mut bob = bob_online(&site).await;
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
    let said = account::say(&mut alice, "state email away", T).await;
    assert!(!said.contains("Nothing was changed"), "{said}");
    let said = account::say(&mut alice, "state phone available", T).await;
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
            site.smtp().set_down(other, other != target);
            site.webhook().set_down(other, other != target);
        }
        site.smtp().cut();
        site.webhook().cut();
        let before = site.door_counts();
        let name = site.instances[target].name.clone();

        let token = format!("emailreply-{}", target + 1);
        let port = site.smtp().port();
        let answer = submit(port, ALICE_MAIL, &[&alias], &reply_mail(&alias, &token))
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
    let smtp_served = site.smtp().served();
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
    let (mut site, mut bob, alias) = site_where_a_can_be_cut_off(3, true).await;

    // Instance a's relay hangs: Bob writes until a holds an email job it cannot send (its
    // relay swallowed a connection and the job is claimed by a in the database).
    site.relay_cut().set_mode(Mode::Swallow);
    site.relay_cut().cut();
    let mut sent = 0u64;
    let deadline = Instant::now() + Duration::from_secs(40);
    while site.relay_cut().swallowed() == 0 || site.email_claims("a") == 0 {
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
    cut_a_off_from_the_server(&site).await;
    let token = "stuckreply-1";
    alice_replies_through_a(&site, &alias, token).await;
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
            arrivals.push(token_number(&t));
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
    site.mend_link(0);
    site.relay_cut().set_mode(Mode::Forward);
    site.relay_cut().cut();
    site.instances[0].start_again().await;
    site.instances[0].wait_link_up(T).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let ids = bob_sends(&mut bob, "rejoined", 60, Duration::ZERO).await;
    let arrivals = alice_collects(&mut alice, "rejoined", 60, Duration::from_secs(2)).await;
    assert_each_once("after a rejoined", &arrivals, 60);
    let handled = stanzas_read(&site, &ids);
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
    let (site, mut bob, alias) = site_where_a_can_be_cut_off(2, false).await;

    cut_a_off_from_the_server(&site).await;
    let token = "partitionreply-1";
    alice_replies_through_a(&site, &alias, token).await;
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
    let mut site = site_with_email(3).await;
    alice_verifies_email_and_leaves(&mut site).await;
    let mut bob = bob_online(&site).await;
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
    while flaps < 20 && stale() == 0 {
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
    let mailed = mailed_within(site.sink(), "afterflap-1", Duration::from_secs(10)).await;
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
    let mut site = site_with_email(2).await;
    let mut alice = alice_registers(&mut site, true, false).await;
    let mut bob = bob_online(&site).await;
    bob_sends(&mut bob, "before", 1, Duration::ZERO).await;
    alice
        .expect("Bob's message on her client", T, |s| {
            body(s).is_some_and(|b| b.contains("before-1"))
        })
        .await;
    drop(alice);
    drop(bob);
    let skipped_before = site.count_in_logs(WALK_SKIPPED);
    let ups = site.count_in_logs("component link up");
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
        .map(|(i, before)| (i.name.clone(), count_lines(&i.log(), WALK_SKIPPED) - before))
        .collect();
    let mut bob = bob_online(&site).await;
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
    let mut site = site_with_email(2).await;
    alice_verifies_email_and_leaves(&mut site).await;
    // A race: each round is one restart of every instance; before the fix it went wrong about
    // one time in three, so six rounds show it again in nine runs out of ten.
    let mut rounds = Vec::new();
    for round in 1..=6 {
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
            i.wait_link_up(T).await;
        }
        tokio::time::sleep(Duration::from_secs(2)).await;
        let skipped = site.count_in_logs(WALK_SKIPPED);
        let stale = site.resources_of_users();
        rounds.push(format!(
            "round {round}: walks skipped {skipped:?}, resources online {stale}"
        ));
        if stale > 0 {
            break;
        }
    }
    // What Bob sees now: by email if Reach knows Alice is gone.
    let mut bob = bob_online(&site).await;
    bob_sends(&mut bob, "afterrestart", 1, Duration::ZERO).await;
    let mailed = mailed_within(site.sink(), "afterrestart-1", Duration::from_secs(10)).await;
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
