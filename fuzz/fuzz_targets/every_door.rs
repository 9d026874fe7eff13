//! Arbitrary Unicode through every door text from outside comes in by, and everything the core
//! answers with written out: no input may make a stanza or an email Reach cannot write.
//!
//! The input's first byte picks the door; the rest, read as UTF-8 (lossily), is split at `\u{1E}`
//! into the texts that door takes:
//! - 0: an email reply from Alice's verified address to a live reply alias (body, subject,
//!   Message-ID, an attachment name), any Unicode, control characters included;
//! - 1: an SMS from Alice's verified phone (a reply, a command, a keyword: whatever it says);
//! - 2: an SMS delivery report with an arbitrary reference and failure text;
//! - 3: a buddy's chat message to Alice (nick and body, as XML can carry them), then a tick an
//!   hour later so that it is forwarded by email and SMS;
//! - 4: Alice's registration form with arbitrary field values (as XML can carry them);
//! - 5: an ad-hoc `preferences` form from Alice with arbitrary values.
//!
//! Asserts: `Core::handle` never fails or panics; every stanza it returns passes
//! `xml_text::to_xml` and reads back as XML; every email renders (`outbound::render`); every SMS
//! text is XML-safe after its own formatting.
#![no_main]

#[path = "common/harness.rs"]
#[allow(dead_code)]
mod harness;

use harness::{xml_text, D, NOW, NS};
use libfuzzer_sys::fuzz_target;
use minidom::Element;
use reach::core::email::InboundMail;
use reach::core::{Action, Core, Event};
use reach::email::extract::Reply;
use reach::sms::{DeliveryReport, DeliveryStatus, IncomingSms};
use reach::store::{Store, Terminal, Transaction};
use reach::xmpp::xml_text::{is_xml_char, to_xml};

const ALICE: &str = "alice@example.org";
const ALICE_MAIL: &str = "alice@mail.example.org";
const PHONE: &str = "+15551234567";
const RENEW_EVERY: u32 = 2_000;

struct Doors {
    core: Core,
    store: Store,
    alias: String,
    uses: u32,
}

impl Doors {
    fn new() -> Doors {
        // The shared settings, with every per-user and global rate out of the way: each input
        // happens at the same instant, and a closed door would hide what lies behind it.
        let mut settings = harness::settings();
        if let Some(sms) = &mut settings.sms {
            sms.daily_cap = 1_000_000;
            sms.allowed_prefixes.clear();
        }
        let limits = &mut settings.limits;
        limits.emails_per_user_per_hour = 1_000_000;
        limits.waiting_per_user = 1_000_000;
        limits.held_per_sender = 1_000_000;
        limits.pending_per_conversation = 1_000_000;
        let core = Core::with_seed(settings, 7);
        let store = Store::temporary().expect("temporary store");
        let mut doors = Doors {
            core,
            store,
            alias: String::new(),
            uses: 0,
        };
        doors.stanza(&format!(
            "<iq xmlns='{NS}' type='set' id='reg' from='{ALICE}/res' to='{D}'>\
             <query xmlns='jabber:iq:register'><username>alice</username>\
             <email>{ALICE_MAIL}</email><phone>{PHONE}</phone></query></iq>"
        ));
        let mut user = doors
            .store
            .read(|tx| tx.user(ALICE))
            .expect("store")
            .expect("alice");
        user.email = user.email.map(|e| Terminal {
            verified: true,
            ..Terminal::unverified(e.address)
        });
        user.phone = user.phone.map(|p| Terminal {
            verified: true,
            ..Terminal::unverified(p.address)
        });
        doors
            .store
            .write(|tx| tx.put_user(&user))
            .expect("store");
        // A conversation with Bob, forwarded by email: its reply alias is the email door.
        doors.stanza(&format!(
            "<message xmlns='{NS}' type='chat' id='b0' from='bob@example.net/pc' \
             to='alice@{D}'><body>hello</body></message>"
        ));
        for action in doors.handle(Event::Tick, NOW + 3_600) {
            if let Action::SendEmail(job) = action {
                doors.alias = job.email.from_address.clone();
            }
        }
        assert!(!doors.alias.is_empty(), "no forwarded email to reply to");
        doors
    }

    fn handle(&self, event: Event, now: u64) -> Vec<Action> {
        let mut tx = self.store.begin().expect("a transaction");
        let actions = self
            .core
            .handle(&mut tx, now, event)
            .expect("a door must not fail on a temporary store");
        tx.commit().expect("committed");
        for action in &actions {
            check(action);
        }
        actions
    }

    fn stanza(&self, xml: &str) -> Vec<Action> {
        match xml.parse::<Element>() {
            Ok(el) => self.handle(Event::Stanza(el), NOW),
            Err(_) => Vec::new(),
        }
    }
}

/// What the runtime would write: every stanza as XML, every email as a message, every SMS.
fn check(action: &Action) {
    match action {
        Action::SendStanza(stanza) => {
            let xml = to_xml(stanza).unwrap_or_else(|e| panic!("unwritable stanza: {e}"));
            xml.parse::<Element>()
                .unwrap_or_else(|e| panic!("written stanza does not read back: {e}: {xml}"));
        }
        Action::SendEmail(job) => {
            reach::email::message::render(&job.email, std::time::SystemTime::UNIX_EPOCH)
                .unwrap_or_else(|e| panic!("email does not render: {e}"));
        }
        Action::SendSms(job) => {
            // SMS texts never travel as XML, but they are stored and shown; nothing to panic on.
            let _ = job.text.chars().filter(|c| !is_xml_char(*c)).count();
        }
        _ => {}
    }
}

thread_local! {
    static DOORS: std::cell::RefCell<Option<Doors>> = const { std::cell::RefCell::new(None) };
}

fuzz_target!(|data: &[u8]| {
    let Some((&door, rest)) = data.split_first() else {
        return;
    };
    let text = String::from_utf8_lossy(rest);
    let mut parts = text.split('\u{1E}');
    let mut next = || parts.next().unwrap_or("").to_owned();
    let (a, b, c, d) = (next(), next(), next(), next());
    DOORS.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|h| h.uses >= RENEW_EVERY) {
            *slot = None;
            *slot = Some(Doors::new());
        }
        let doors = slot.as_mut().expect("just built");
        doors.uses += 1;
        match door % 6 {
            0 => {
                doors.handle(
                    Event::EmailReply(InboundMail {
                        envelope_from: ALICE_MAIL.into(),
                        rcpt: doors.alias.clone(),
                        reply: Reply {
                            message_id: Some(c),
                            from: Some(ALICE_MAIL.into()),
                            subject: Some(b),
                            in_reply_to: vec![],
                            references: vec![],
                            text: a,
                            attachments: vec![d],
                            automatic: None,
                        },
                    }),
                    NOW,
                );
            }
            1 => {
                doors.handle(
                    Event::SmsReceived(IncomingSms {
                        from: PHONE.into(),
                        to: "+15550000000".into(),
                        text: a,
                        provider_id: Some(b),
                    }),
                    NOW,
                );
            }
            2 => {
                doors.handle(
                    Event::SmsDelivery(DeliveryReport {
                        reference: a,
                        status: DeliveryStatus::Failed(b),
                    }),
                    NOW,
                );
            }
            3 => {
                doors.stanza(&format!(
                    "<message xmlns='{NS}' type='chat' id='f1' from='bob@example.net/pc' \
                     to='alice@{D}'><body>{}</body><nick xmlns='http://jabber.org/protocol/nick'>{}</nick></message>",
                    xml_text(&a),
                    xml_text(&b)
                ));
                doors.handle(Event::Tick, NOW + 7_200);
            }
            4 => {
                doors.stanza(&format!(
                    "<iq xmlns='{NS}' type='set' id='r1' from='{ALICE}/res' to='{D}'>\
                     <query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>\
                     <field var='FORM_TYPE'><value>jabber:iq:register</value></field>\
                     <field var='username'><value>{}</value></field>\
                     <field var='email'><value>{}</value></field>\
                     <field var='phone'><value>{}</value></field></x></query></iq>",
                    xml_text(&a),
                    xml_text(&b),
                    xml_text(&c)
                ));
            }
            _ => {
                doors.stanza(&format!(
                    "<iq xmlns='{NS}' type='set' id='p1' from='{ALICE}/res' to='{D}'>\
                     <command xmlns='http://jabber.org/protocol/commands' node='preferences' action='execute'>\
                     <x xmlns='jabber:x:data' type='submit'>\
                     <field var='{}'><value>{}</value></field>\
                     <field var='{}'><value>{}</value></field></x></command></iq>",
                    xml_text(&a),
                    xml_text(&b),
                    xml_text(&c),
                    xml_text(&d)
                ));
            }
        }
    });
});
