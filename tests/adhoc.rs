//! Ad-hoc commands (XEP-0050) end to end: the built `reach` against a real Prosody, with the
//! verification code read from the mail Reach sent to a real SMTP sink (aiosmtpd).
//!
//! Alice does what her client's "Commands" menu does: list the commands of the service, run
//! `verify`, fill in the form; set her preferences with the `preferences` form (a typo first),
//! read them back in a chat with the service, and set her email terminal away with `state`.

use crate::support;

use std::time::Duration;

use support::mail::MailSink;
use support::{attr, body, Client, Element, Reach, Server, ServerKind};

const D: &str = "reach.localhost";
const T: Duration = Duration::from_secs(15);
const ALICE_MAIL: &str = "alice@mail.example";
const COMMANDS: &str = "http://jabber.org/protocol/commands";
const DISCO_ITEMS: &str = "http://jabber.org/protocol/disco#items";
const DATA_FORMS: &str = "jabber:x:data";

struct World {
    server: Server,
    sink: MailSink,
    reach: Reach,
    _state: tempfile::TempDir,
}

impl Drop for World {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("--- reach log ---\n{}", self.reach.log());
        }
    }
}

impl World {
    async fn new() -> World {
        let server = Server::start(ServerKind::Prosody).await;
        server.register("alice", "alicepw").await;
        let sink = MailSink::start().await;
        let state = tempfile::tempdir().unwrap();
        let extra = format!(
            "[email]\nrelay = \"smtp://127.0.0.1:{}\"\nfrom_address = \"reach@{D}\"\n\
             reply_domain = \"{D}\"\nlisten = \"127.0.0.1:{}\"\n",
            sink.port,
            support::free_port()
        );
        let reach = Reach::start_with(&server, state.path(), &extra).await;
        World {
            server,
            sink,
            reach,
            _state: state,
        }
    }

    /// Alice online, registered with her email address; returns her and the code from the mail.
    async fn alice_registered_with_email(&self) -> (Client, String) {
        let mut alice = Client::connect(&self.server, "alice", "alicepw", "pc").await;
        support::wait_for_component(&mut alice, D).await;
        alice.presence("").await;
        alice
            .iq_ok(&format!(
                "<iq type='set' id='reg' to='{D}'><query xmlns='jabber:iq:register'>\
                 <username>alice</username><email>{ALICE_MAIL}</email></query></iq>"
            ))
            .await;
        let mails = self.sink.wait_for(1, T).await;
        let subject = mails[0].header("Subject").unwrap();
        let code: String = subject.chars().filter(char::is_ascii_digit).collect();
        assert_eq!(code.len(), 6, "subject: {subject}");
        (alice, code)
    }
}

/// Sends a command request and returns the `<command/>` of the result.
async fn command(client: &mut Client, attrs: &str, inner: &str) -> Element {
    let id = support::new_id();
    let reply = client
        .iq_ok(&format!(
            "<iq type='set' id='{id}' to='{D}'><command xmlns='{COMMANDS}' {attrs}>{inner}</command></iq>"
        ))
        .await;
    reply
        .get_child("command", COMMANDS)
        .unwrap_or_else(|| panic!("no <command/> in {}", support::to_xml(&reply)))
        .clone()
}

fn submitted_code(code: &str) -> String {
    format!(
        "<x xmlns='{DATA_FORMS}' type='submit'><field var='code'><value>{code}</value></field></x>"
    )
}

/// What a client sends back for a form: every field but the fixed ones, with its values, and
/// the user's `changes`.
fn filled_in(form: &Element, changes: &[(&str, &[&str])]) -> String {
    let mut x = format!("<x xmlns='{DATA_FORMS}' type='submit'>");
    for field in form
        .children()
        .filter(|f| f.is("field", DATA_FORMS) && attr(f, "type") != "fixed")
    {
        let var = attr(field, "var");
        let values: Vec<String> = match changes.iter().find(|(v, _)| *v == var) {
            Some((_, values)) => values.iter().map(|v| v.to_string()).collect(),
            None => field
                .children()
                .filter(|v| v.is("value", DATA_FORMS))
                .map(|v| v.text())
                .collect(),
        };
        x.push_str(&format!("<field var='{}'>", support::escape(var)));
        for value in values {
            x.push_str(&format!("<value>{}</value>", support::escape(&value)));
        }
        x.push_str("</field>");
    }
    x + "</x>"
}

/// The first value of a form field.
fn value_of(form: &Element, var: &str) -> String {
    form.children()
        .find(|f| f.is("field", DATA_FORMS) && attr(f, "var") == var)
        .unwrap_or_else(|| panic!("no field '{var}' in {}", support::to_xml(form)))
        .get_child("value", DATA_FORMS)
        .map(|v| v.text())
        .unwrap_or_default()
}

/// Says `line` to the service and waits for the answer that satisfies `pred`.
async fn chat_until(
    client: &mut Client,
    line: &str,
    what: &str,
    pred: impl Fn(&str) -> bool,
) -> String {
    client
        .send(&format!(
            "<message type='chat' to='{D}'><body>{}</body></message>",
            support::escape(line)
        ))
        .await;
    let answer = client
        .expect(what, T, |s| {
            attr(s, "from") == D && body(s).is_some_and(|b| pred(&b))
        })
        .await;
    body(&answer).unwrap_or_default()
}

/// The (type, text) of each note.
fn notes(command: &Element) -> Vec<(String, String)> {
    command
        .children()
        .filter(|c| c.is("note", COMMANDS))
        .map(|n| (attr(n, "type").to_owned(), n.text()))
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_verifies_her_email_address_with_the_verify_command() {
    let w = World::new().await;
    let (mut alice, code) = w.alice_registered_with_email().await;

    // Her client lists the service's commands.
    let items = alice
        .iq_ok(&format!(
            "<iq type='get' id='items' to='{D}'><query xmlns='{DISCO_ITEMS}' node='{COMMANDS}'/></iq>"
        ))
        .await;
    let listed: Vec<(String, String)> = items
        .get_child("query", DISCO_ITEMS)
        .unwrap()
        .children()
        .map(|i| (attr(i, "node").to_owned(), attr(i, "name").to_owned()))
        .collect();
    assert!(
        listed.contains(&("verify".into(), "Verify a terminal".into())),
        "{listed:?}"
    );

    // She runs "Verify a terminal": a form asking for the code sent to her address.
    let start = command(&mut alice, "node='verify' action='execute'", "").await;
    assert_eq!(attr(&start, "status"), "executing");
    let session = attr(&start, "sessionid").to_owned();
    assert!(!session.is_empty());
    let form = start.get_child("x", DATA_FORMS).expect("a form");
    let instructions = form.get_child("instructions", DATA_FORMS).unwrap().text();
    assert!(instructions.contains(ALICE_MAIL), "{instructions}");
    assert!(form
        .children()
        .any(|f| f.is("field", DATA_FORMS) && attr(f, "var") == "code"));

    // A typo: an error note, and she can try again.
    let wrong = if code == "000000" { "111111" } else { "000000" };
    let typo = command(
        &mut alice,
        &format!("node='verify' sessionid='{session}' action='complete'"),
        &submitted_code(wrong),
    )
    .await;
    assert_eq!(attr(&typo, "status"), "completed");
    assert_eq!(
        notes(&typo),
        vec![(
            "error".to_owned(),
            "That code is wrong (4 tries left).".to_owned()
        )]
    );

    // The right code.
    let again = command(&mut alice, "node='verify'", "").await;
    let session = attr(&again, "sessionid").to_owned();
    let done = command(
        &mut alice,
        &format!("node='verify' sessionid='{session}' action='complete'"),
        &submitted_code(&code),
    )
    .await;
    assert_eq!(attr(&done, "status"), "completed");
    let said = notes(&done);
    assert_eq!(said.len(), 1);
    assert_eq!(said[0].0, "info");
    assert!(
        said[0].1.contains(&format!("{ALICE_MAIL} is verified")),
        "{said:?}"
    );

    // The chat prompt agrees, and running the command again has nothing left to do.
    alice
        .send(&format!(
            "<message type='chat' to='{D}'><body>status</body></message>"
        ))
        .await;
    alice
        .expect("status saying the address is verified", T, |s| {
            body(s)
                .is_some_and(|b| b.contains(&format!("Email: {ALICE_MAIL} (verified, available)")))
        })
        .await;
    let after = command(&mut alice, "node='verify'", "").await;
    assert_eq!(attr(&after, "status"), "completed");
    assert_eq!(
        notes(&after),
        vec![(
            "info".to_owned(),
            "All your terminals are verified.".to_owned()
        )]
    );
    assert_eq!(w.sink.mails().len(), 1, "no code was sent twice");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn commands_answer_errors_a_client_can_show() {
    let w = World::new().await;
    let mut alice = Client::connect(&w.server, "alice", "alicepw", "pc").await;
    support::wait_for_component(&mut alice, D).await;
    alice.presence("").await;
    let error_of = |reply: &Element| {
        assert_eq!(attr(reply, "type"), "error", "{}", support::to_xml(reply));
        reply
            .get_child("error", support::NS_CLIENT)
            .and_then(|e| e.children().next())
            .map(|c| c.name().to_owned())
            .unwrap_or_default()
    };
    let reply = alice
        .iq(&format!(
            "<iq type='set' id='unreg' to='{D}'><command xmlns='{COMMANDS}' node='verify' action='execute'/></iq>"
        ))
        .await;
    assert_eq!(error_of(&reply), "registration-required");
    let reply = alice
        .iq(&format!(
            "<iq type='set' id='nope' to='{D}'><command xmlns='{COMMANDS}' node='nope'/></iq>"
        ))
        .await;
    assert_eq!(error_of(&reply), "item-not-found");
    let reply = alice
        .iq(&format!(
            "<iq type='set' id='bad' to='{D}'><command xmlns='{COMMANDS}' node='verify' action='jump'/></iq>"
        ))
        .await;
    assert_eq!(error_of(&reply), "bad-request");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn alice_sets_her_preferences_in_a_form_and_reads_them_in_the_chat() {
    let w = World::new().await;
    let (mut alice, code) = w.alice_registered_with_email().await;
    chat_until(
        &mut alice,
        &format!("verify {code}"),
        "the verification",
        |b| b.contains("is verified"),
    )
    .await;

    // She runs "Preferences": her only terminal's form, filled in with the defaults.
    let start = command(&mut alice, "node='preferences' action='execute'", "").await;
    assert_eq!(attr(&start, "status"), "executing");
    let session = attr(&start, "sessionid").to_owned();
    let form = start.get_child("x", DATA_FORMS).expect("a form").clone();
    assert_eq!(value_of(&form, "when"), "away_or_offline");
    assert_eq!(value_of(&form, "quiet_start"), "");
    assert_eq!(value_of(&form, "subscription_policy"), "auto");

    // A typo in the quiet hours: the form comes back with an error note and her input, and
    // nothing was saved, not even the good values next to it.
    let typo = command(
        &mut alice,
        &format!("node='preferences' sessionid='{session}' action='complete'"),
        &filled_in(
            &form,
            &[
                ("when", &["never"]),
                ("quiet_start", &["25:00"]),
                ("quiet_end", &["07:00"]),
                ("time_zone", &["Europe/Berlin"]),
            ],
        ),
    )
    .await;
    assert_eq!(attr(&typo, "status"), "executing");
    assert_eq!(
        notes(&typo),
        vec![(
            "error".to_owned(),
            "quiet hours start: '25:00' is not a time like 22:30".to_owned()
        )]
    );
    let again = typo
        .get_child("x", DATA_FORMS)
        .expect("the form again")
        .clone();
    assert_eq!(value_of(&again, "quiet_start"), "25:00");
    assert_eq!(value_of(&again, "when"), "never");
    let unchanged = chat_until(&mut alice, "prefs email", "her preferences", |b| {
        b.starts_with(&format!("Email: {ALICE_MAIL}"))
    })
    .await;
    assert!(unchanged.contains("  quiet: off"), "{unchanged}");
    assert!(unchanged.contains("  when: away_or_offline"), "{unchanged}");
    assert!(unchanged.contains("Time zone: UTC"), "{unchanged}");

    // She fixes it and completes.
    let done = command(
        &mut alice,
        &format!("node='preferences' sessionid='{session}' action='complete'"),
        &filled_in(
            &again,
            &[
                ("quiet_start", &["22:00"]),
                ("alerts", &["bob@example.net"]),
            ],
        ),
    )
    .await;
    assert_eq!(attr(&done, "status"), "completed");
    let said = notes(&done);
    assert_eq!(said.len(), 1, "{said:?}");
    assert_eq!(said[0].0, "info");
    assert!(said[0].1.starts_with("Saved."), "{said:?}");

    // The chat shows what the form saved.
    let prefs = chat_until(&mut alice, "prefs email", "her new preferences", |b| {
        b.starts_with(&format!("Email: {ALICE_MAIL}")) && b.contains("when: never")
    })
    .await;
    for line in [
        "  when: never",
        "  quiet: 22:00-07:00 hold (Europe/Berlin; messages wait until they end)",
        "  alerts: bob@example.net",
        "Time zone: Europe/Berlin",
    ] {
        assert!(prefs.contains(line), "'{line}' not in:\n{prefs}");
    }

    // She sets her email terminal away with "Set a terminal's state"; status says so.
    let start = command(&mut alice, "node='state'", "").await;
    let session = attr(&start, "sessionid").to_owned();
    let form = start.get_child("x", DATA_FORMS).expect("a form").clone();
    assert_eq!(value_of(&form, "terminal"), "email");
    assert_eq!(value_of(&form, "state"), "available");
    let away = command(
        &mut alice,
        &format!("node='state' sessionid='{session}' action='complete'"),
        &filled_in(&form, &[("state", &["away"])]),
    )
    .await;
    assert_eq!(attr(&away, "status"), "completed");
    assert_eq!(
        notes(&away),
        vec![(
            "info".to_owned(),
            // Her email terminal forwards never, and Reach does not see her client (she did not
            // approve its subscription): nothing reaches her, whatever the state.
            format!("Your email address {ALICE_MAIL} is away. Buddies see you: unavailable.")
        )]
    );
    let status = chat_until(&mut alice, "status", "her status", |b| {
        b.starts_with("Your reach address:")
    })
    .await;
    assert!(
        status.contains(&format!("Email: {ALICE_MAIL} (verified, away)")),
        "{status}"
    );
    assert!(status.contains("Buddies see: unavailable\n"), "{status}");
    let by_command = command(&mut alice, "node='status'", "").await;
    assert_eq!(attr(&by_command, "status"), "completed");
    assert_eq!(notes(&by_command), vec![("info".to_owned(), status)]);
}
