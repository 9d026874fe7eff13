//! The hostile-input corpus for the core: each case asserts the exact error the sender sees and
//! that the store holds the same about the user before and after (`Harness::snapshot`).
//! Abuse limits (`[limits]`) are tested here too. See `docs/limits.md`.

use crate::core::Transaction;
use minidom::Element;
use xmpp_parsers::ns;

use super::testing::*;
use super::{Action, Event, Limits};
use crate::core::model::{EmailJob, SmsJob};
use crate::xmpp::stanza::STANZA_NS;

const ALICE: &str = "alice@example.org";
const BOB: &str = "bob@example.net";
const ALICE_MAIL: &str = "alice@mail.example.org";
const PHONE: &str = "+15551234567";

fn verified_email(t: &Harness) {
    t.register_verified(ALICE, "alice", ALICE_MAIL, "");
}

fn verified_phone(t: &Harness) {
    t.register_verified(ALICE, "alice", "", PHONE);
}

fn online(t: &Harness) {
    t.run(&format!("<presence from='{ALICE}/laptop' to='{D}'/>"));
}

fn emails(actions: &[Action]) -> Vec<EmailJob> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendEmail(job) => Some((**job).clone()),
            _ => None,
        })
        .collect()
}

fn texts(actions: &[Action]) -> Vec<SmsJob> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendSms(job) => Some((**job).clone()),
            _ => None,
        })
        .collect()
}

/// Runs `xml` and expects exactly one error back with `condition` and `text`, and no change to
/// what the store holds about Alice.
fn refused(t: &Harness, xml: &str, condition: &str, text: &str) {
    let before = t.snapshot(ALICE);
    let reply = t.one(xml);
    assert_error(&reply, condition);
    assert_eq!(error_text(&reply), text);
    // The error never echoes the offending payload.
    assert_eq!(reply.children().count(), 1, "{}", String::from(&reply));
    assert_eq!(t.snapshot(ALICE), before);
}

// ---- XML over the component link ----

#[test]
fn deep_nesting_is_refused_with_policy_violation_and_changes_nothing() {
    let t = Harness::new();
    t.register(ALICE, "alice");
    let open = "<x xmlns='urn:example:deep'>".repeat(40);
    let close = "</x>".repeat(40);
    refused(
        &t,
        &format!(
            "<message type='chat' id='d' from='{BOB}/pc' to='alice@{D}'><body>hi</body>{open}{close}</message>"
        ),
        "policy-violation",
        "the stanza is nested deeper than 32 elements",
    );
    // Also at the service and for an iq.
    let reply = t.one(&format!(
        "<iq type='get' id='q' from='{BOB}/pc' to='{D}'><query xmlns='urn:example:deep'>{open}{close}</query></iq>"
    ));
    assert_error(&reply, "policy-violation");
    assert_eq!(reply.name(), "iq");
}

/// A JID may have 1023-byte parts; Reach keeps JIDs in its store's keys, which every engine
/// must be able to index: a sender longer than `MAX_JID_BYTES` is refused at the door, and a
/// buddy list naming one is refused too.
#[test]
fn senders_with_overlong_addresses_are_refused_and_nothing_is_stored() {
    let t = Harness::new();
    t.register(ALICE, "alice");
    let long = format!("{}@example.net", "b".repeat(600));
    refused(
        &t,
        &format!(
            "<message type='chat' id='l' from='{long}/pc' to='alice@{D}'><body>hi</body></message>"
        ),
        "policy-violation",
        "addresses longer than 512 bytes are not served",
    );
    refused(
        &t,
        &format!("<presence type='subscribe' id='s' from='{long}' to='alice@{D}'/>"),
        "policy-violation",
        "addresses longer than 512 bytes are not served",
    );
    // At the limit it is served like any other.
    let fits = format!("{}@example.net", "b".repeat(512 - "@example.net".len()));
    let out = t.run(&format!(
        "<message type='chat' id='f' from='{fits}/pc' to='alice@{D}'><body>hi</body></message>"
    ));
    assert!(
        out.iter().all(|s| s.attr("type") != Some("error")),
        "{out:?}"
    );
}

#[test]
fn huge_attribute_counts_are_refused() {
    let t = Harness::new();
    t.register(ALICE, "alice");
    let attrs: String = (0..100).map(|i| format!(" a{i}='v'")).collect();
    refused(
        &t,
        &format!(
            "<message type='chat' id='a' from='{BOB}/pc' to='alice@{D}'><body>hi</body><x xmlns='urn:example:x'{attrs}/></message>"
        ),
        "policy-violation",
        "an element has more than 64 attributes",
    );
}

#[test]
fn oversized_stanzas_are_refused() {
    let t = Harness::with_limits(Limits {
        max_stanza_bytes: 4096,
        ..Limits::default()
    });
    t.register(ALICE, "alice");
    let filler = "y".repeat(5000);
    refused(
        &t,
        &format!(
            "<message type='chat' id='s' from='{BOB}/pc' to='alice@{D}'><x xmlns='urn:example:x'>{filler}</x></message>"
        ),
        "policy-violation",
        "the stanza is larger than 4096 bytes",
    );
}

#[test]
fn errors_and_results_over_the_limits_are_dropped_silently() {
    let t = Harness::new();
    t.register(ALICE, "alice");
    let open = "<x xmlns='urn:example:deep'>".repeat(40);
    let close = "</x>".repeat(40);
    let before = t.snapshot(ALICE);
    for type_ in ["error", "result"] {
        assert!(t
            .run(&format!(
                "<iq type='{type_}' id='e' from='{BOB}/pc' to='{D}'>{open}{close}</iq>"
            ))
            .is_empty());
    }
    assert_eq!(t.snapshot(ALICE), before);
}

#[test]
fn oversized_bodies_are_refused_both_ways_and_nothing_is_held() {
    let t = Harness::new();
    verified_email(&t);
    let long = "é".repeat(10_001);
    // To an offline user: refused, not held, not forwarded.
    refused(
        &t,
        &format!("<message type='chat' id='b' from='{BOB}/pc' to='alice@{D}'><body>{long}</body></message>"),
        "not-acceptable",
        "the message is longer than 10000 characters; send it in parts",
    );
    t.advance(3_600);
    assert!(emails(&t.actions(Event::Tick)).is_empty());
    // From the user to a buddy.
    refused(
        &t,
        &format!("<message type='chat' id='c' from='{ALICE}/pc' to='bob\\40example.net@{D}'><body>{long}</body></message>"),
        "not-acceptable",
        "the message is longer than 10000 characters; send it in parts",
    );
    // Exactly at the limit is fine.
    let fits = "é".repeat(10_000);
    online(&t);
    let out = t.run(&format!(
        "<message type='chat' id='f' from='{BOB}/pc' to='alice@{D}'><body>{fits}</body></message>"
    ));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].attr("id"), Some("f"));
}

#[test]
fn empty_bodies_are_relayed_but_never_forwarded() {
    let t = Harness::new();
    verified_email(&t);
    // Offline: an empty body is kept for XMPP, never mailed.
    for (id, body) in [("e1", ""), ("e2", "   ")] {
        assert!(t
            .run(&format!(
                "<message type='chat' id='{id}' from='{BOB}/pc' to='alice@{D}'><body>{body}</body></message>"
            ))
            .is_empty());
    }
    t.advance(3_600);
    let actions = t.actions(Event::Tick);
    assert!(emails(&actions).is_empty());
    assert!(t.store.tx().pending_for(ALICE).unwrap().is_empty());
    assert_eq!(t.store.tx().held_count(ALICE).unwrap(), 2);
    // Online: relayed as it is.
    let out = t.run(&format!("<presence from='{ALICE}/laptop' to='{D}'/>"));
    let ids: Vec<_> = out
        .iter()
        .filter(|s| s.name() == "message")
        .filter_map(|m| m.attr("id"))
        .collect();
    assert_eq!(ids, ["e1", "e2"]);
    let out = t.run(&format!(
        "<message type='chat' id='e3' from='{BOB}/pc' to='alice@{D}'><body/></message>"
    ));
    assert_eq!(out.len(), 1);
    assert_eq!(out[0].get_child("body", STANZA_NS).unwrap().text(), "");
}

#[test]
fn unknown_payloads_pass_through_and_unknown_iqs_get_service_unavailable() {
    let t = Harness::new();
    t.register(ALICE, "alice");
    online(&t);
    let out = t.run(&format!(
        "<message type='chat' id='u' from='{BOB}/pc' to='alice@{D}'><body>hi</body><thing xmlns='urn:example:unknown' a='1'><deep>x</deep></thing></message>"
    ));
    assert_eq!(out.len(), 1);
    let thing = out[0].get_child("thing", "urn:example:unknown").unwrap();
    assert_eq!(thing.attr("a"), Some("1"));
    assert_eq!(
        thing
            .get_child("deep", "urn:example:unknown")
            .unwrap()
            .text(),
        "x"
    );
    let before = t.snapshot(ALICE);
    for to in [D.to_string(), format!("alice@{D}")] {
        let reply = t.one(&format!(
            "<iq type='get' id='i' from='{BOB}/pc' to='{to}'><query xmlns='urn:example:unknown'/></iq>"
        ));
        assert_error(&reply, "service-unavailable");
    }
    let reply = t.one(&format!(
        "<iq type='set' id='j' from='{ALICE}/pc' to='bob\\40example.net@{D}'><query xmlns='urn:example:unknown'/></iq>"
    ));
    assert_error(&reply, "service-unavailable");
    assert_eq!(t.snapshot(ALICE), before);
}

#[test]
fn strangers_cannot_register_or_use_per_session_jids() {
    let t = Harness::new();
    let mallory = "mallory@evil.example";
    let before = t.snapshot(mallory);
    let reply = t.one(&register_form(mallory, "alice", "", ""));
    assert_error(&reply, "not-allowed");
    assert_eq!(
        error_text(&reply),
        "users of evil.example may not register with this service"
    );
    assert_eq!(t.snapshot(mallory), before);
    assert!(t.store.tx().users().unwrap().is_empty());
    // A message to a per-session JID claims to come from a user; only registered ones are.
    t.register(ALICE, "alice");
    for from in [mallory, "carol@example.org"] {
        let reply = t.one(&format!(
            "<message type='chat' id='p' from='{from}/x' to='bob\\40example.net@{D}'><body>x</body></message>"
        ));
        assert_error(&reply, "registration-required");
    }
    assert!(t.store.tx().sessions(ALICE).unwrap().is_empty());
    // Malformed addresses.
    let reply = t.one(&format!(
        "<message type='chat' id='j' from='a@b@c' to='alice@{D}'><body>x</body></message>"
    ));
    assert_error(&reply, "jid-malformed");
}

// ---- email ----

#[test]
fn a_nick_with_line_breaks_creates_no_header_in_the_forwarded_mail() {
    let t = Harness::new();
    verified_email(&t);
    t.run(&format!(
        "<message type='chat' id='n' from='{BOB}/pc' to='alice@{D}'><body>hello</body>\
         <nick xmlns='http://jabber.org/protocol/nick'>Bob&#13;&#10;Bcc: evil@example.org</nick></message>"
    ));
    t.advance(60);
    let jobs = emails(&t.actions(Event::Tick));
    assert_eq!(jobs.len(), 1);
    let raw =
        crate::email::message::render(&jobs[0].email, std::time::SystemTime::UNIX_EPOCH).unwrap();
    let raw = String::from_utf8(raw).unwrap();
    let headers = raw.split("\r\n\r\n").next().unwrap();
    assert!(
        !headers
            .lines()
            .any(|l| l.to_ascii_lowercase().starts_with("bcc:")),
        "{headers}"
    );
    assert!(!jobs[0].email.from_name.contains(['\r', '\n']));
    assert!(!jobs[0].email.subject.contains(['\r', '\n']));
}

#[test]
fn a_reply_alias_is_dead_once_the_user_removed_the_registration() {
    let t = Harness::new();
    verified_email(&t);
    t.run(&format!(
        "<message type='chat' id='m' from='{BOB}/pc' to='alice@{D}'><body>hello</body></message>"
    ));
    t.advance(60);
    let jobs = emails(&t.actions(Event::Tick));
    let alias = jobs[0].email.from_address.clone();
    let live = t
        .core
        .check_mail_recipient(&mut *t.store.tx(), t.now.get(), ALICE_MAIL, &alias)
        .unwrap();
    assert_eq!(live.code, 250, "{live:?}");
    // A forged envelope sender with a valid token is refused at RCPT.
    let forged = t
        .core
        .check_mail_recipient(
            &mut *t.store.tx(),
            t.now.get(),
            "mallory@evil.example",
            &alias,
        )
        .unwrap();
    assert_eq!((forged.code, forged.enhanced), (550, "5.7.1"));
    let reply = t.run(&format!(
        "<iq type='set' id='rm' from='{ALICE}/pc' to='{D}'><query xmlns='{}'><remove/></query></iq>",
        ns::REGISTER
    ));
    let reply = &reply[0];
    assert_eq!(reply.attr("type"), Some("result"));
    let replay = t
        .core
        .check_mail_recipient(&mut *t.store.tx(), t.now.get(), ALICE_MAIL, &alias)
        .unwrap();
    assert_eq!((replay.code, replay.enhanced), (550, "5.1.1"));
}

// ---- SMS ----

#[test]
fn stop_variants_stop_and_stop_please_is_a_message() {
    for (text, stops) in [
        ("stop", true),
        ("Stop.", true),
        ("UNSUBSCRIBE", true),
        ("stop please", false),
    ] {
        let t = Harness::new();
        verified_phone(&t);
        t.run(&format!(
            "<message type='chat' id='m' from='{BOB}/pc' to='alice@{D}'><body>hi</body></message>"
        ));
        t.actions(Event::Tick);
        let actions = t.actions(Event::SmsReceived(crate::sms::IncomingSms {
            from: PHONE.into(),
            to: "+15550000000".into(),
            text: text.into(),
            provider_id: None,
        }));
        let user = t.store.tx().user(ALICE).unwrap().unwrap();
        assert_eq!(user.phone.unwrap().stopped, stops, "{text:?}");
        let to_bob: Vec<&Element> = actions
            .iter()
            .filter_map(|a| match a {
                Action::SendStanza(s) if s.attr("to") == Some(BOB) => Some(s),
                _ => None,
            })
            .collect();
        if stops {
            assert!(to_bob.is_empty(), "{text:?}");
        } else {
            assert_eq!(
                to_bob[0].get_child("body", STANZA_NS).unwrap().text(),
                "stop please"
            );
        }
    }
}

#[test]
fn texts_from_unknown_numbers_are_accepted_and_change_nothing() {
    let t = Harness::new();
    verified_phone(&t);
    let before = t.snapshot(ALICE);
    let actions = t.actions(Event::SmsReceived(crate::sms::IncomingSms {
        from: "+15559999999".into(),
        to: "+15550000000".into(),
        text: "STOP".into(),
        provider_id: Some("x1".into()),
    }));
    assert_eq!(
        actions,
        vec![Action::AnswerWebhook(super::sms::WebhookAnswer::Accepted)]
    );
    assert_eq!(t.snapshot(ALICE), before);
}

#[test]
fn a_ucs2_text_reaches_the_buddy_intact() {
    let t = Harness::new();
    verified_phone(&t);
    t.run(&format!(
        "<message type='chat' id='m' from='{BOB}/pc' to='alice@{D}'><body>hi</body></message>"
    ));
    t.actions(Event::Tick);
    let text = "Привет 👋 — à bientôt";
    let actions = t.actions(Event::SmsReceived(crate::sms::IncomingSms {
        from: PHONE.into(),
        to: "+15550000000".into(),
        text: text.into(),
        provider_id: None,
    }));
    let body = actions
        .iter()
        .find_map(|a| match a {
            Action::SendStanza(s) if s.attr("to") == Some(BOB) => {
                s.get_child("body", STANZA_NS).map(|b| b.text())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(body, text);
}

// ---- abuse limits ----

#[test]
fn registration_updates_are_limited_per_jid_per_hour() {
    let t = Harness::with_limits(Limits {
        registrations_per_jid_per_hour: 3,
        ..Limits::default()
    });
    t.register(ALICE, "alice");
    t.register(ALICE, "alice");
    t.register(ALICE, "alice");
    let before = t.snapshot(ALICE);
    let reply = t.one(&register_form(ALICE, "alice", ALICE_MAIL, ""));
    assert_error(&reply, "resource-constraint");
    assert_eq!(
        error_text(&reply),
        "too many registration changes: at most 3 per hour; try again later"
    );
    assert_eq!(t.snapshot(ALICE), before);
    // Removing is never limited; a new hour starts afresh.
    t.advance(3_600);
    t.register(ALICE, "alice");
    let reply = t.run(&format!(
        "<iq type='set' id='rm' from='{ALICE}/pc' to='{D}'><query xmlns='{}'><remove/></query></iq>",
        ns::REGISTER
    ));
    let reply = &reply[0];
    assert_eq!(reply.attr("type"), Some("result"));
}

#[test]
fn new_registrations_are_limited_per_domain_per_hour() {
    let t = Harness::with_limits(Limits {
        new_registrations_per_domain_per_hour: 2,
        ..Limits::default()
    });
    t.register("u1@example.org", "u1");
    t.register("u2@example.org", "u2");
    // Updates by existing users are not new registrations.
    t.register("u1@example.org", "u1");
    let before = t.snapshot("u3@example.org");
    let reply = t.one(&register_form("u3@example.org", "u3", "", ""));
    assert_error(&reply, "policy-violation");
    assert_eq!(
        error_text(&reply),
        "too many new registrations from example.org: at most 2 per hour; try again later"
    );
    assert_eq!(t.snapshot("u3@example.org"), before);
    assert!(t
        .store
        .tx()
        .user_by_handle(&crate::address::Handle::parse("u3").unwrap())
        .unwrap()
        .is_none());
    t.advance(3_600);
    t.register("u3@example.org", "u3");
}

#[test]
fn verification_codes_are_limited_per_terminal_per_day() {
    let t = Harness::with_limits(Limits {
        codes_per_terminal_per_day: 2,
        ..Limits::default()
    });
    let actions = t.actions(Event::Stanza(
        register_form(ALICE, "alice", "", PHONE)
            .replacen('>', &format!(" xmlns='{STANZA_NS}'>"), 1)
            .parse()
            .unwrap(),
    ));
    assert_eq!(texts(&actions).len(), 1, "the first code");
    let verify = |t: &Harness| {
        t.actions(Event::Stanza(
            format!(
                "<message xmlns='{STANZA_NS}' type='chat' id='v' from='{ALICE}/pc' to='{D}'><body>verify</body></message>"
            )
            .parse()
            .unwrap(),
        ))
    };
    assert_eq!(texts(&verify(&t)).len(), 1, "the second code");
    let code = t
        .store
        .tx()
        .verification(ALICE, crate::core::model::TerminalKind::Phone)
        .unwrap()
        .unwrap();
    let actions = verify(&t);
    assert!(texts(&actions).is_empty(), "no third code");
    let said = actions
        .iter()
        .find_map(|a| match a {
            Action::SendStanza(s) => s.get_child("body", STANZA_NS).map(|b| b.text()),
            _ => None,
        })
        .unwrap();
    assert!(
        said.contains(
            "Reach already sent 2 verification codes to +15551234567 today; no new code was sent."
        ),
        "{said}"
    );
    // The code sent last still works.
    assert_eq!(
        t.store
            .tx()
            .verification(ALICE, crate::core::model::TerminalKind::Phone)
            .unwrap(),
        Some(code)
    );
    // Another user cannot get codes sent to the same number either.
    let reply = t.actions(Event::Stanza(
        register_form("carol@example.org", "carol", "", PHONE)
            .replacen('>', &format!(" xmlns='{STANZA_NS}'>"), 1)
            .parse()
            .unwrap(),
    ));
    assert!(texts(&reply).is_empty());
    t.advance(86_400);
    assert_eq!(texts(&verify(&t)).len(), 1, "a new day");
}

#[test]
fn forwarding_emails_are_limited_per_user_per_hour_and_nothing_is_lost() {
    let t = Harness::with_limits(Limits {
        emails_per_user_per_hour: 1,
        ..Limits::default()
    });
    // Start at the top of an hour, so the digest windows stay within it.
    t.now.set(t.now.get() / 3_600 * 3_600);
    verified_email(&t);
    let from_bob = |id: &str| {
        t.run(&format!(
            "<message type='chat' id='{id}' from='{BOB}/pc' to='alice@{D}'><body>{id}</body></message>"
        ))
    };
    from_bob("m1");
    t.advance(60);
    assert_eq!(emails(&t.actions(Event::Tick)).len(), 1);
    from_bob("m2");
    t.advance(60);
    assert!(emails(&t.actions(Event::Tick)).is_empty(), "over the limit");
    let pending = t.store.tx().pending_for(ALICE).unwrap();
    assert_eq!(pending.len(), 1);
    assert_eq!(pending[0].items[0].id.as_deref(), Some("m2"));
    assert_eq!(pending[0].due_at % 3_600, 0, "waits for the next hour");
    from_bob("m3");
    t.advance(3_600);
    let jobs = emails(&t.actions(Event::Tick));
    assert_eq!(jobs.len(), 1);
    assert_eq!(
        jobs[0]
            .items
            .iter()
            .filter_map(|i| i.id.as_deref())
            .collect::<Vec<_>>(),
        ["m2", "m3"]
    );
    assert!(t.store.tx().pending_for(ALICE).unwrap().is_empty());
}

#[test]
fn messages_waiting_for_the_email_limit_reach_xmpp_when_the_user_comes_back() {
    let t = Harness::with_limits(Limits {
        emails_per_user_per_hour: 1,
        ..Limits::default()
    });
    t.now.set(t.now.get() / 3_600 * 3_600);
    verified_email(&t);
    for id in ["m1", "m2"] {
        t.run(&format!(
            "<message type='chat' id='{id}' from='{BOB}/pc' to='alice@{D}'><body>{id}</body></message>"
        ));
        t.advance(60);
        t.actions(Event::Tick);
    }
    let out = t.run(&format!("<presence from='{ALICE}/laptop' to='{D}'/>"));
    let ids: Vec<_> = out
        .iter()
        .filter(|s| s.name() == "message" && s.attr("to") == Some(ALICE))
        .filter_map(|m| m.attr("id"))
        .collect();
    assert_eq!(ids, ["m2"]);
}

#[test]
fn counters_are_pruned_when_their_window_is_over() {
    let t = Harness::new();
    t.register(ALICE, "alice");
    assert_eq!(t.store.tx().counter_records(), 2);
    t.actions(Event::Tick);
    assert_eq!(t.store.tx().counter_records(), 2);
    t.advance(3_600);
    t.actions(Event::Tick);
    assert_eq!(t.store.tx().counter_records(), 0);
}
