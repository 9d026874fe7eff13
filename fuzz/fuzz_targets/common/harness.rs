//! A core and a temporary store with two registered users, shared by the targets that drive
//! `Core::handle` (`chat_command`, `stanza_event`).
//!
//! Creating a sled store and registering users costs milliseconds, so one harness lives for
//! `RENEW_EVERY` inputs and is then rebuilt (this bounds the store's growth over a long run).
//! State therefore carries over between consecutive inputs of one run: a crash that needs an
//! earlier input shows up as an artifact that does not reproduce alone, which is then worth a
//! look at the run's log (none has been seen so far).

use minidom::Element;
use reach::core::email::EmailSettings;
use reach::core::sms::SmsSettings;
use reach::core::{Action, Core, Event, Limits, Settings};
use reach::store::{Store, StoreError};

pub const D: &str = "reach.example.org";
pub const NS: &str = "jabber:component:accept";
/// The time every input happens at (seconds since the Unix epoch).
pub const NOW: u64 = 1_795_000_000;
const RENEW_EVERY: u32 = 5_000;

/// The settings every Core-driving target uses: email and SMS configured, the shipped stanza
/// limits, the rate limits raised (see below).
pub fn settings() -> Settings {
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
        // The stanza limits as shipped; the rate limits raised, since every input happens
        // at the same `NOW` and the default ones would soon shut the registration and
        // verification paths for the rest of a harness's life.
        limits: Limits {
            registrations_per_jid_per_hour: 1_000,
            new_registrations_per_domain_per_hour: 1_000,
            codes_per_terminal_per_day: 1_000,
            codes_per_user_per_day: 1_000,
            new_terminals_per_user_per_day: 1_000,
            verification_sms_per_hour: 1_000,
            wrong_codes_per_user_per_day: 1_000,
            ..Limits::default()
        },
        integrated_hosts: vec!["example.org".into()],
    }
}

pub struct Harness {
    pub core: Core,
    pub store: Store,
    uses: u32,
}

impl Harness {
    fn new() -> Harness {
        let core = Core::with_seed(settings(), 7);
        let store = Store::temporary().expect("temporary store");
        let h = Harness {
            core,
            store,
            uses: 0,
        };
        h.register(
            "alice@example.org",
            "alice",
            "alice@mail.example.org",
            "+15551234567",
        );
        h.register("carol@example.org", "carol", "", "");
        // Carol is online; Alice is not (so her messages queue for email and SMS).
        h.stanza(&format!(
            "<presence xmlns='{NS}' from='carol@example.org/phone' to='{D}'/>"
        ));
        h
    }

    fn register(&self, jid: &str, handle: &str, email: &str, phone: &str) {
        let form = format!(
            "<iq xmlns='{NS}' type='set' id='reg' from='{jid}/res' to='{D}'>\
             <query xmlns='jabber:iq:register'><x xmlns='jabber:x:data' type='submit'>\
             <field var='FORM_TYPE'><value>jabber:iq:register</value></field>\
             <field var='username'><value>{handle}</value></field>\
             <field var='email'><value>{email}</value></field>\
             <field var='phone'><value>{phone}</value></field></x></query></iq>"
        );
        let out = self.stanza(&form);
        let ok = out.iter().any(|a| match a {
            Action::SendStanza(s) => s.name() == "iq" && s.attr("type") == Some("result"),
            _ => false,
        });
        assert!(ok, "registering {jid} failed: {out:?}");
    }

    fn stanza(&self, xml: &str) -> Vec<Action> {
        let el: Element = xml.parse().expect("harness stanza");
        self.handle(NOW, Event::Stanza(el))
            .expect("harness stanza handled")
    }

    /// Handles one event in a transaction of its own, committed.
    pub fn handle(&self, now: u64, event: Event) -> Result<Vec<Action>, StoreError> {
        let mut tx = self.store.begin()?;
        let actions = self.core.handle(&mut tx, now, event)?;
        tx.commit()?;
        Ok(actions)
    }
}

thread_local! {
    static HARNESS: std::cell::RefCell<Option<Harness>> = const { std::cell::RefCell::new(None) };
}

/// Runs `f` with the shared harness, rebuilding it every `RENEW_EVERY` inputs.
pub fn with_harness<R>(f: impl FnOnce(&Harness) -> R) -> R {
    HARNESS.with(|cell| {
        let mut slot = cell.borrow_mut();
        if slot.as_ref().is_none_or(|h| h.uses >= RENEW_EVERY) {
            *slot = None; // drop the old store first
            *slot = Some(Harness::new());
        }
        let h = slot.as_mut().expect("just built");
        h.uses += 1;
        f(h)
    })
}

/// `text` with the characters XML 1.0 cannot carry removed and the markup characters escaped,
/// ready to go between tags or in a quoted attribute.
#[allow(dead_code)] // used by chat_command only
pub fn xml_text(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '\'' => out.push_str("&apos;"),
            '"' => out.push_str("&quot;"),
            c if reach::xmpp::xml_text::is_xml_char(c) => out.push(c),
            _ => {}
        }
    }
    out
}
