//! Verification codes under abuse (issue 10), through the sans-IO core: SMS pumping, one mailbox
//! flooded through variants of its address, brute-forcing a code, and SMS answers that would
//! ping-pong with an auto-responder. Each case asserts the exact text the user sees, what was
//! (not) sent, and that a refusal leaves the store as it was (`Harness::snapshot` plus the
//! counters). The limits are `[limits]` keys; see `docs/limits.md`.

use super::limits::counter;
use super::testing::*;
use super::{Action, Event, Limits};
use crate::core::model::{TerminalKind, UserState};
use crate::core::Transaction;
use crate::sms::IncomingSms;
use crate::xmpp::stanza::STANZA_NS;

const ALICE: &str = "alice@example.org";
const MALLORY: &str = "mallory@example.org";
const PHONE: &str = "+15551234567";

fn stanza(xml: &str) -> Event {
    Event::Stanza(
        xml.replacen('>', &format!(" xmlns='{STANZA_NS}'>"), 1)
            .parse()
            .unwrap(),
    )
}

/// A chat line from `jid` to the service: what it answers, and every action.
fn say(t: &Harness, jid: &str, line: &str) -> (String, Vec<Action>) {
    let actions = t.actions(stanza(&format!(
        "<message type='chat' id='c' from='{jid}/pc' to='{D}'><body>{line}</body></message>"
    )));
    let said = actions
        .iter()
        .find_map(|a| match a {
            Action::SendStanza(s) if s.attr("to") == Some(&format!("{jid}/pc")) => {
                s.get_child("body", STANZA_NS).map(|b| b.text())
            }
            _ => None,
        })
        .unwrap_or_default();
    (said, actions)
}

fn texts(actions: &[Action]) -> Vec<(String, String)> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendSms(job) => Some((job.to.clone(), job.text.clone())),
            _ => None,
        })
        .collect()
}

fn mails(actions: &[Action]) -> Vec<String> {
    actions
        .iter()
        .filter_map(|a| match a {
            Action::SendEmail(job) => Some(job.email.to.clone()),
            _ => None,
        })
        .collect()
}

/// A text from `from` to Reach.
fn text_in(t: &Harness, from: &str, text: &str) -> Vec<Action> {
    t.actions(Event::SmsReceived(IncomingSms {
        from: from.into(),
        to: "+15550000000".into(),
        text: text.into(),
        provider_id: None,
    }))
}

/// Everything about the user plus the abuse counters that concern them.
fn state(t: &Harness, jid: &str) -> (UserState, Vec<u32>) {
    let now = t.now.get();
    let counters = [
        (counter::USER_CODES, jid, super::limits::DAY),
        (counter::NEW_TERMINALS, jid, super::limits::DAY),
        (counter::WRONG_CODES, jid, super::limits::DAY),
        (counter::VERIFICATION_SMS, "", super::limits::HOUR),
    ]
    .iter()
    .map(|(name, scope, period)| t.store.tx().counter(name, scope, *period, now).unwrap())
    .collect();
    (t.snapshot(jid), counters)
}

fn code(t: &Harness, jid: &str, kind: TerminalKind) -> String {
    t.store.tx().verification(jid, kind).unwrap().unwrap().code
}

/// A wrong code for this user: differs from every code waiting.
fn wrong_code(t: &Harness, jid: &str) -> String {
    let waiting: Vec<String> = [TerminalKind::Email, TerminalKind::Phone]
        .iter()
        .filter_map(|k| t.store.tx().verification(jid, *k).unwrap().map(|v| v.code))
        .collect();
    (0..1_000_000u32)
        .map(|n| format!("{n:06}"))
        .find(|c| !waiting.contains(c))
        .unwrap()
}

// ---- SMS pumping ------------------------------------------------------------------------------

#[test]
fn adding_thirty_numbers_sends_codes_to_three_and_changes_nothing_after() {
    let t = Harness::new();
    t.register(ALICE, "alice");
    let mut sent_to = Vec::new();
    for n in 0..30 {
        let number = format!("+1555010{n:04}");
        let before = state(&t, ALICE);
        let (said, actions) = say(&t, ALICE, &format!("add phone {number}"));
        let sms = texts(&actions);
        if n < 3 {
            assert_eq!(sms.len(), 1, "{said}");
            assert!(
                said.contains(&format!(
                    "A verification code is on its way to {number} by SMS."
                )),
                "{said}"
            );
            sent_to.extend(sms.into_iter().map(|(to, _)| to));
        } else {
            assert!(sms.is_empty(), "no SMS to {number}");
            assert_eq!(
                said,
                format!(
                    "phone: You already asked for codes to 3 different addresses and numbers \
                     today; Reach sends no code to {number} until tomorrow (UTC).\n\
                     Nothing was changed."
                )
            );
            assert_eq!(state(&t, ALICE), before, "a refused add changes nothing");
        }
    }
    assert_eq!(sent_to, ["+15550100000", "+15550100001", "+15550100002"]);
    // The last number that got a code is still the one waiting.
    let user = t.store.tx().user(ALICE).unwrap().unwrap();
    assert_eq!(user.phone.unwrap().address.as_str(), "+15550100002");
    // Numbers already tried today may get their codes again (within their own cap).
    let (_, actions) = say(&t, ALICE, "add phone +1 555 010 0000");
    assert_eq!(texts(&actions).len(), 1);
    // A new UTC day, a new allowance.
    t.advance(86_400);
    let (_, actions) = say(&t, ALICE, "add phone +15550100029");
    assert_eq!(texts(&actions).len(), 1);
}

#[test]
fn codes_per_user_per_day_hold_across_every_terminal_and_door() {
    let t = Harness::with_limits(Limits {
        codes_per_user_per_day: 4,
        ..Limits::default()
    });
    // Registration: two codes (email and phone).
    let actions = t.actions(stanza(&register_form(
        ALICE,
        "alice",
        "alice@mail.example.org",
        PHONE,
    )));
    assert_eq!(mails(&actions).len() + texts(&actions).len(), 2);
    // `verify` in the chat: two more.
    let (_, actions) = say(&t, ALICE, "verify");
    assert_eq!(mails(&actions).len() + texts(&actions).len(), 2);
    // A fifth through the ad-hoc command, SMS and chat alike: refused with the same text.
    let before = state(&t, ALICE);
    let (said, actions) = say(&t, ALICE, "verify");
    assert!(mails(&actions).is_empty() && texts(&actions).is_empty());
    let refusal = "Reach already sent you 4 verification codes today, the most it sends anyone \
                   in a day; no new code was sent. Ask again tomorrow (UTC).";
    assert_eq!(said, format!("{refusal}\n{refusal}"));
    assert_eq!(state(&t, ALICE), before);
    let (said, actions) = say(&t, ALICE, "add email alice@other.example.org");
    assert!(mails(&actions).is_empty());
    assert_eq!(said, format!("email: {refusal}\nNothing was changed."));
    assert_eq!(state(&t, ALICE), before);
    // The ad-hoc `verify` sends new codes once the old ones expired: not past the cap either.
    t.advance(super::email::CODE_VALIDITY_SECS + 1);
    let actions = t.actions(stanza(&format!(
        "<iq type='set' id='c1' from='{ALICE}/pc' to='{D}'>\
         <command xmlns='http://jabber.org/protocol/commands' node='verify' action='execute'/></iq>"
    )));
    assert!(mails(&actions).is_empty() && texts(&actions).is_empty());
    let form = actions
        .iter()
        .find_map(|a| match a {
            Action::SendStanza(s) => Some(String::from(s)),
            _ => None,
        })
        .unwrap();
    assert!(form.contains(refusal), "the ad-hoc form says why: {form}");
    assert!(!form.contains("A new code is on its way"), "{form}");
    // Removing the registration does not reset the count.
    t.run(&format!(
        "<iq type='set' id='r' from='{ALICE}/pc' to='{D}'><query xmlns='jabber:iq:register'><remove/></query></iq>"
    ));
    let actions = t.actions(stanza(&register_form(
        ALICE,
        "alice",
        "alice@mail.example.org",
        "",
    )));
    assert!(mails(&actions).is_empty());
    // The registration is saved; a chat from the service says why no code came.
    let note = actions
        .iter()
        .find_map(|a| match a {
            Action::SendStanza(s) if s.name() == "message" => {
                s.get_child("body", STANZA_NS).map(|b| b.text())
            }
            _ => None,
        })
        .unwrap();
    assert_eq!(note, refusal);
    assert!(t.store.tx().user(ALICE).unwrap().is_some());
    t.advance(86_400);
    let (_, actions) = say(&t, ALICE, "verify");
    assert_eq!(mails(&actions).len(), 1, "a new day");
}

#[test]
fn verification_sms_are_capped_per_hour_for_everyone() {
    let t = Harness::with_limits(Limits {
        verification_sms_per_hour: 2,
        ..Limits::default()
    });
    t.now.set(t.now.get() / 3_600 * 3_600 + 600);
    let next_hour = (t.now.get() / 3_600 + 1) * 3_600 % 86_400;
    let users = ["u1@example.org", "u2@example.org", "u3@example.org"];
    for (i, jid) in users.iter().enumerate() {
        t.register(jid, &format!("u{}", i + 1));
    }
    for jid in &users[..2] {
        let (_, actions) = say(&t, jid, &format!("add phone +1555020{:04}", jid.len()));
        assert_eq!(texts(&actions).len(), 1);
    }
    let before = state(&t, users[2]);
    let (said, actions) = say(&t, users[2], "add phone +15550209999");
    assert!(texts(&actions).is_empty());
    assert_eq!(
        said,
        format!(
            "phone: Reach is sending too many verification SMS right now; no code was sent to \
             +15550209999. Send \"verify\" again after {:02}:{:02} UTC.\nNothing was changed.",
            next_hour / 3_600,
            next_hour % 3_600 / 60
        )
    );
    assert_eq!(state(&t, users[2]), before);
    // Email codes are not SMS.
    let (_, actions) = say(&t, users[2], "add email u3@mail.example.org");
    assert_eq!(mails(&actions).len(), 1);
    t.advance(3_600);
    let (_, actions) = say(&t, users[2], "add phone +15550209999");
    assert_eq!(texts(&actions).len(), 1, "the next hour");
}

// ---- one mailbox, many spellings --------------------------------------------------------------

#[test]
fn case_variants_of_one_mailbox_get_five_codes_in_all() {
    let t = Harness::new();
    t.register(ALICE, "alice");
    let variants = [
        "Victim@example.net",
        "vIctim@example.net",
        "viCtim@example.net",
        "vicTim@example.net",
        "victIm@example.net",
        "victiM@example.net",
        "VICTIM@example.net",
        "victim+x@EXAMPLE.NET",
    ];
    let mut delivered = 0;
    for (i, variant) in variants.iter().enumerate() {
        let before = state(&t, ALICE);
        let (said, actions) = say(&t, ALICE, &format!("add email {variant}"));
        let sent = mails(&actions);
        if i < 5 {
            assert_eq!(sent.len(), 1, "{said}");
            delivered += 1;
        } else {
            assert!(sent.is_empty(), "{variant}");
            let shown = crate::address::Email::parse(variant).unwrap();
            assert_eq!(
                said,
                format!(
                    "email: Reach already sent 5 verification codes to {} today; no new code \
                     was sent. Ask again tomorrow (UTC).\nNothing was changed.",
                    shown.as_str()
                )
            );
            assert_eq!(state(&t, ALICE), before);
        }
    }
    assert_eq!(delivered, 5);
    // Another user asking for that mailbox is refused too.
    t.register(MALLORY, "mallory");
    let (said, actions) = say(&t, MALLORY, "add email victim@example.net");
    assert!(mails(&actions).is_empty());
    assert!(
        said.contains("Reach already sent 5 verification codes"),
        "{said}"
    );
}

#[test]
fn gmail_dots_and_tags_reach_one_mailbox() {
    let t = Harness::with_limits(Limits {
        codes_per_terminal_per_day: 2,
        ..Limits::default()
    });
    t.register(ALICE, "alice");
    for variant in ["j.doe@gmail.com", "JDoe+reach@googlemail.com"] {
        assert_eq!(
            mails(&say(&t, ALICE, &format!("add email {variant}")).1).len(),
            1
        );
    }
    let (said, actions) = say(&t, ALICE, "add email j.d.o.e@Gmail.com");
    assert!(mails(&actions).is_empty());
    assert!(
        said.contains("Reach already sent 2 verification codes"),
        "{said}"
    );
    // On other domains dots make another mailbox.
    assert_eq!(
        mails(&say(&t, ALICE, "add email j.doe@example.net").1).len(),
        1
    );
}

// ---- brute force ------------------------------------------------------------------------------

#[test]
fn a_wrong_guess_costs_every_waiting_code_a_try() {
    let t = Harness::new();
    t.run(&register_form(
        ALICE,
        "alice",
        "alice@mail.example.org",
        PHONE,
    ));
    let wrong = wrong_code(&t, ALICE);
    let (said, _) = say(&t, ALICE, &format!("verify {wrong}"));
    assert_eq!(said, "That code is wrong (4 tries left).");
    for kind in [TerminalKind::Email, TerminalKind::Phone] {
        assert_eq!(
            t.store
                .tx()
                .verification(ALICE, kind)
                .unwrap()
                .unwrap()
                .tries_left,
            4
        );
    }
}

#[test]
fn thirty_guesses_with_fresh_emails_never_reach_the_phone_code() {
    let t = Harness::new();
    t.run(&register_form(ALICE, "alice", "", PHONE));
    let phone_code = code(&t, ALICE, TerminalKind::Phone);
    let mut answers = Vec::new();
    for guess in 0..30 {
        if guess % 5 == 0 {
            say(
                &t,
                ALICE,
                &format!("add email fresh{guess}@mail.example.org"),
            );
        }
        let wrong = wrong_code(&t, ALICE);
        let wrong = if wrong == phone_code {
            "999999".into()
        } else {
            wrong
        };
        answers.push(say(&t, ALICE, &format!("verify {wrong}")).0);
    }
    // The phone code lost a try with every guess: gone after five.
    assert_eq!(answers[0], "That code is wrong (4 tries left).");
    assert_eq!(
        answers[4],
        "That code is wrong, and that was the last try. Send \"verify\" for a new code.",
        "the fresh email's code was spent with the phone's"
    );
    assert_eq!(answers[5], "That code is wrong (4 tries left).");
    assert!(t
        .store
        .tx()
        .verification(ALICE, TerminalKind::Phone)
        .unwrap()
        .is_none());
    assert_eq!(
        answers[9],
        "That code is wrong, and that was your last try today: Reach checks no more \
         verification codes from you until tomorrow (UTC)."
    );
    let refusal = "You entered 10 wrong verification codes today; Reach checks no more codes \
                   from you until tomorrow (UTC). Then send \"verify\" for new codes.";
    // Past the day's wrong codes, every guess is refused.
    for said in &answers[10..] {
        assert_eq!(said, refusal);
    }
    // The real phone code does not verify the phone, by chat, by SMS `/verify` or texted back.
    let before = state(&t, ALICE);
    say(&t, ALICE, &format!("verify {phone_code}"));
    let actions = text_in(&t, PHONE, &phone_code);
    assert!(texts(&actions).is_empty());
    assert_eq!(state(&t, ALICE), before);
    let user = t.store.tx().user(ALICE).unwrap().unwrap();
    assert!(!user.phone.unwrap().verified);
}

#[test]
fn past_the_wrong_codes_of_the_day_even_the_right_code_is_refused() {
    let t = Harness::with_limits(Limits {
        wrong_codes_per_user_per_day: 2,
        ..Limits::default()
    });
    t.run(&register_form(ALICE, "alice", "alice@mail.example.org", ""));
    let wrong = wrong_code(&t, ALICE);
    assert_eq!(
        say(&t, ALICE, &format!("verify {wrong}")).0,
        "That code is wrong (1 try left)."
    );
    say(&t, ALICE, &format!("verify {wrong}"));
    assert!(t
        .store
        .tx()
        .verification(ALICE, TerminalKind::Email)
        .unwrap()
        .is_none());
    // A new code can be sent, but not checked today.
    let (_, actions) = say(&t, ALICE, "verify");
    assert_eq!(mails(&actions).len(), 1);
    let right = code(&t, ALICE, TerminalKind::Email);
    let before = state(&t, ALICE);
    let refusal = "You entered 2 wrong verification codes today; Reach checks no more codes \
                   from you until tomorrow (UTC). Then send \"verify\" for new codes.";
    assert_eq!(say(&t, ALICE, &format!("verify {right}")).0, refusal);
    assert_eq!(state(&t, ALICE), before, "a refused guess changes nothing");
    // The ad-hoc door says the same.
    let reply = t.one(&format!(
        "<iq type='set' id='c2' from='{ALICE}/pc' to='{D}'>\
         <command xmlns='http://jabber.org/protocol/commands' node='verify' sessionid='s'>\
         <x xmlns='jabber:x:data' type='submit'><field var='code'><value>{right}</value></field></x>\
         </command></iq>"
    ));
    assert!(
        String::from(&reply).contains(refusal),
        "{}",
        String::from(&reply)
    );
    assert_eq!(state(&t, ALICE), before);
    // Tomorrow the guesses are back (that code has expired by then: a new one).
    t.advance(86_400);
    say(&t, ALICE, "verify");
    let right = code(&t, ALICE, TerminalKind::Email);
    let (said, _) = say(&t, ALICE, &format!("verify {right}"));
    assert!(said.starts_with("Your email address"), "{said}");
}

#[test]
fn a_wrong_code_texted_back_is_a_wrong_guess_and_no_sms_answers_it() {
    let t = Harness::new();
    t.run(&register_form(ALICE, "alice", "", PHONE));
    let wrong = wrong_code(&t, ALICE);
    let actions = text_in(&t, PHONE, &wrong);
    assert!(
        texts(&actions).is_empty(),
        "no SMS to a number no one verified"
    );
    let told: Vec<String> = actions
        .iter()
        .filter_map(|a| match a {
            Action::SendStanza(s) if s.attr("to") == Some(ALICE) => {
                s.get_child("body", STANZA_NS).map(|b| b.text())
            }
            _ => None,
        })
        .collect();
    assert_eq!(told, ["That code is wrong (4 tries left)."]);
    assert_eq!(
        t.store
            .tx()
            .counter(counter::WRONG_CODES, ALICE, 86_400, t.now.get())
            .unwrap(),
        1
    );
    // A text that is not a code costs nothing.
    let before = state(&t, ALICE);
    assert!(texts(&text_in(&t, PHONE, "hello")).is_empty());
    assert_eq!(state(&t, ALICE), before);
    // The right one verifies the phone and is answered there.
    let right = code(&t, ALICE, TerminalKind::Phone);
    let actions = text_in(&t, PHONE, &right);
    assert_eq!(texts(&actions).len(), 1);
    assert!(
        t.store
            .tx()
            .user(ALICE)
            .unwrap()
            .unwrap()
            .phone
            .unwrap()
            .verified
    );
}

#[test]
fn the_index_finds_every_user_waiting_on_a_number() {
    let t = Harness::new();
    t.run(&register_form(ALICE, "alice", "", PHONE));
    t.run(&register_form(MALLORY, "mallory", "", PHONE));
    let waiting = t
        .store
        .tx()
        .verifications_for_address(TerminalKind::Phone, PHONE)
        .unwrap();
    let jids: Vec<&str> = waiting.iter().map(|(j, _)| j.as_str()).collect();
    assert_eq!(jids, [ALICE, MALLORY]);
    // Mallory's code texted back verifies Mallory, not the user listed first.
    let right = code(&t, MALLORY, TerminalKind::Phone);
    text_in(&t, PHONE, &right);
    assert!(
        t.store
            .tx()
            .user(MALLORY)
            .unwrap()
            .unwrap()
            .phone
            .unwrap()
            .verified
    );
    assert!(
        !t.store
            .tx()
            .user(ALICE)
            .unwrap()
            .unwrap()
            .phone
            .unwrap()
            .verified
    );
}

// ---- answers texted to the phone --------------------------------------------------------------

#[test]
fn answers_to_texts_stop_at_the_daily_sms_cap() {
    let t = Harness::new();
    t.run(&register_form(ALICE, "alice", "", PHONE));
    let right = code(&t, ALICE, TerminalKind::Phone);
    text_in(&t, PHONE, &right);
    // The harness's cap is 5 SMS a day: the code and its confirmation are two.
    let mut answered = 0;
    for _ in 0..20 {
        answered += texts(&text_in(&t, PHONE, "hello")).len();
    }
    assert_eq!(answered, 3, "an auto-responder gets no more answers");
    // Keywords are still honoured past the cap, silently.
    let actions = text_in(&t, PHONE, "STOP");
    assert!(texts(&actions).is_empty());
    assert!(
        t.store
            .tx()
            .user(ALICE)
            .unwrap()
            .unwrap()
            .phone
            .unwrap()
            .stopped
    );
    t.advance(86_400);
    assert_eq!(texts(&text_in(&t, PHONE, "START")).len(), 1, "a new day");
}

#[test]
fn sms_verify_from_the_phone_counts_with_the_other_doors() {
    let t = Harness::new();
    t.run(&register_form(ALICE, "alice", "", PHONE));
    let right = code(&t, ALICE, TerminalKind::Phone);
    text_in(&t, PHONE, &right);
    say(&t, ALICE, "add email alice@mail.example.org");
    let wrong = wrong_code(&t, ALICE);
    // One wrong code by chat, one by SMS: the same day's count, the same code's tries.
    assert_eq!(
        say(&t, ALICE, &format!("verify {wrong}")).0,
        "That code is wrong (4 tries left)."
    );
    let answers = texts(&text_in(&t, PHONE, &format!("/verify {wrong}")));
    assert_eq!(
        answers,
        [(
            PHONE.to_owned(),
            "That code is wrong (3 tries left).".to_owned()
        )]
    );
    assert_eq!(
        t.store
            .tx()
            .counter(counter::WRONG_CODES, ALICE, 86_400, t.now.get())
            .unwrap(),
        2
    );
}

#[test]
fn an_expired_phone_code_texted_back_spends_no_try_of_the_email_code() {
    let t = Harness::new();
    t.run(&register_form(ALICE, "alice", "", PHONE));
    let old = code(&t, ALICE, TerminalKind::Phone);
    t.advance(super::email::CODE_VALIDITY_SECS + 1);
    say(&t, ALICE, "add email alice@mail.example.org");
    let actions = text_in(&t, PHONE, &old);
    assert!(texts(&actions).is_empty());
    let told: Vec<String> = actions
        .iter()
        .filter_map(|a| match a {
            Action::SendStanza(s) => s.get_child("body", STANZA_NS).map(|b| b.text()),
            _ => None,
        })
        .collect();
    assert_eq!(
        told,
        ["That code has expired. Send \"verify\" for a new one."]
    );
    let email = t
        .store
        .tx()
        .verification(ALICE, TerminalKind::Email)
        .unwrap()
        .unwrap();
    assert_eq!(email.tries_left, 5);
    assert_eq!(
        t.store
            .tx()
            .counter(counter::WRONG_CODES, ALICE, 86_400, t.now.get())
            .unwrap(),
        0
    );
    assert!(t
        .store
        .tx()
        .verifications_for_address(TerminalKind::Phone, PHONE)
        .unwrap()
        .is_empty());
}
