//! Test helpers for the core: a temporary store, stanza input as text, stanzas out.

use minidom::Element;
use xmpp_parsers::ns;

use super::email::EmailSettings;
use super::sms::SmsSettings;
use super::{Action, Core, Event, Settings};
use crate::core::Transaction;
use crate::store::Store;
use crate::xmpp::stanza::STANZA_NS;

pub const D: &str = "reach.example.org";

pub struct Harness {
    pub core: Core,
    pub store: Store,
    pub now: std::cell::Cell<u64>,
}

impl Harness {
    pub fn new() -> Harness {
        Harness::with_limits(super::Limits::default())
    }

    /// A harness whose core enforces these limits.
    pub fn with_limits(limits: super::Limits) -> Harness {
        Harness {
            core: Core::with_seed(
                Settings {
                    domain: D.into(),
                    allowed_domains: vec!["example.org".into()],
                    grace_delay_secs: 120,
                    email: Some(EmailSettings {
                        from_address: "reach@reply.example.org".into(),
                        from_name: "Reach".into(),
                        reply_domain: "reply.example.org".into(),
                        digest_window_secs: 30,
                        alias_idle_secs: 30 * 86_400,
                    }),
                    sms: Some(SmsSettings {
                        max_segments: 3,
                        daily_cap: 5,
                        allowed_prefixes: vec!["+1".into(), "+44".into()],
                    }),
                    limits,
                    integrated_hosts: vec!["example.org".into()],
                },
                7,
            ),
            store: Store::temporary().unwrap(),
            now: std::cell::Cell::new(1_795_000_000),
        }
    }

    /// Feeds one stanza (written without xmlns) and returns what the core sends.
    pub fn run(&self, xml: &str) -> Vec<Element> {
        let with_ns = xml
            .replacen('>', &format!(" xmlns='{STANZA_NS}'>"), 1)
            .replacen(
                &format!("/ xmlns='{STANZA_NS}'>"),
                &format!(" xmlns='{STANZA_NS}'/>"),
                1,
            );
        let stanza: Element = with_ns
            .parse()
            .unwrap_or_else(|e| panic!("bad test stanza {xml}: {e}"));
        self.event(Event::Stanza(stanza))
    }

    /// Feeds an event and returns the stanzas sent (other actions: see [`Harness::actions`]).
    pub fn event(&self, event: Event) -> Vec<Element> {
        self.actions(event)
            .into_iter()
            .filter_map(|a| match a {
                Action::SendStanza(s) => Some(s),
                _ => None,
            })
            .collect()
    }

    /// Feeds an event in a transaction of its own, committed, and returns every action.
    pub fn actions(&self, event: Event) -> Vec<Action> {
        let mut tx = self.store.begin().unwrap();
        let actions = self.core.handle(&mut tx, self.now.get(), event).unwrap();
        tx.commit().unwrap();
        actions
    }

    /// Feeds an email reply; returns the SMTP answer and the stanzas sent.
    pub fn mail(
        &self,
        mail: super::email::InboundMail,
    ) -> (super::email::SmtpAnswer, Vec<Element>) {
        let mut answer = None;
        let mut stanzas = Vec::new();
        for action in self.actions(Event::EmailReply(mail)) {
            match action {
                Action::AnswerMail(a) => answer = Some(a),
                Action::SendStanza(s) => stanzas.push(s),
                _ => {}
            }
        }
        (answer.expect("an SMTP answer"), stanzas)
    }

    /// Registers `jid` with the form and marks the terminals given (non-empty) verified, as if
    /// their codes had come back.
    pub fn register_verified(&self, jid: &str, handle: &str, email: &str, phone: &str) {
        self.run(&register_form(jid, handle, email, phone));
        use crate::core::model::Terminal;
        fn verified<A>(terminal: Option<Terminal<A>>) -> Option<Terminal<A>> {
            terminal.map(|t| Terminal {
                verified: true,
                ..Terminal::unverified(t.address)
            })
        }
        let mut user = self.store.tx().user(jid).unwrap().unwrap();
        user.email = verified(user.email);
        user.phone = verified(user.phone);
        self.store.tx().put_user(&user).unwrap();
    }

    /// Feeds one stanza and expects exactly one stanza back.
    pub fn one(&self, xml: &str) -> Element {
        let mut out = self.run(xml);
        assert_eq!(
            out.len(),
            1,
            "expected one stanza, got {:?}",
            out.iter().map(String::from).collect::<Vec<_>>()
        );
        out.remove(0)
    }

    /// Everything the store holds about `jid`, to compare before and after an event.
    pub fn snapshot(&self, jid: &str) -> crate::core::model::UserState {
        self.store.tx().user_state(jid).unwrap()
    }

    /// Lets time pass.
    pub fn advance(&self, secs: u64) {
        self.now.set(self.now.get() + secs);
    }

    pub fn register(&self, jid: &str, handle: &str) {
        let out = self.run(&register_form(jid, handle, "", ""));
        assert_eq!(
            out[0].attr("type"),
            Some("result"),
            "{}",
            String::from(&out[0])
        );
    }
}

pub fn register_form(jid: &str, username: &str, email: &str, phone: &str) -> String {
    format!(
        "<iq type='set' id='reg' from='{jid}/res' to='{D}'><query xmlns='{}'><x xmlns='{}' type='submit'>\
         <field var='FORM_TYPE'><value>{}</value></field>\
         <field var='username'><value>{username}</value></field>\
         <field var='email'><value>{email}</value></field>\
         <field var='phone'><value>{phone}</value></field></x></query></iq>",
        ns::REGISTER,
        ns::DATA_FORMS,
        ns::REGISTER
    )
}

pub fn form_value(query: &Element, var: &str) -> Option<String> {
    query
        .get_child("x", ns::DATA_FORMS)?
        .children()
        .find(|f| f.attr("var") == Some(var))?
        .get_child("value", ns::DATA_FORMS)
        .map(|v| v.text())
}

pub fn assert_error(reply: &Element, condition: &str) {
    assert_eq!(reply.attr("type"), Some("error"), "{}", String::from(reply));
    let error = reply
        .get_child("error", STANZA_NS)
        .expect("an <error/> child");
    assert!(
        error.has_child(condition, ns::XMPP_STANZAS),
        "expected {condition}: {}",
        String::from(reply)
    );
}

pub fn error_text(reply: &Element) -> String {
    reply
        .get_child("error", STANZA_NS)
        .and_then(|e| e.get_child("text", ns::XMPP_STANZAS))
        .map(|t| t.text())
        .unwrap_or_default()
}
