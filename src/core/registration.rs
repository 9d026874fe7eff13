//! In-band registration (XEP-0077) at `D`, with an XEP-0004 form and the legacy fields.
//!
//! A registration binds a user's bare JID to a handle (their reach address) and optional email and
//! phone terminals, stored unverified until the user proves them.

use minidom::Element;

use crate::xmpp::stanza::{an, NONE};
use xmpp_parsers::ns;

use super::{Addressing, Core, Handled, Out};
use crate::address::{Email, Handle, Phone};
use crate::core::model::{StoreError, Terminal, User};
use crate::core::Transaction;
use crate::xmpp::stanza::{iq_result, presence, ErrorType, StanzaFault};

const INSTRUCTIONS: &str =
    "Choose the name of your reach address (username) and, optionally, an email \
address and a phone number (E.164, like +15551234567) where Reach may forward messages while you \
are away from your XMPP clients.";

pub(super) fn registration_required() -> StanzaFault {
    StanzaFault::new(ErrorType::Auth, "registration-required")
        .with_text("register with this service first (XEP-0077 at the service address)")
}

pub(super) fn on_register(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    iq: &Element,
    query: &Element,
    who: &Addressing,
    out: &mut Out,
) -> Handled {
    let domain = who.from.domain().as_str();
    if !core.settings.allowed_domains.iter().any(|d| d == domain) {
        return Err(StanzaFault::new(ErrorType::Cancel, "not-allowed")
            .with_text(format!(
                "users of {domain} may not register with this service"
            ))
            .into());
    }
    let existing = store.user(&who.from_bare)?;
    if iq.attr("type") == Some("get") {
        out.send(iq_result(
            iq,
            Some(registration_form(who, existing.as_ref())),
        ));
        return Ok(());
    }
    if query.has_child("remove", ns::REGISTER) {
        return remove(core, store, iq, who, out);
    }
    let submitted = Submitted::read(query);
    let user = validate(who, existing.as_ref(), &submitted, now)?;
    check_rates(core, store, now, who, existing.is_none())?;
    if let (Some(sms), Some(phone)) = (&core.settings.sms, &user.phone) {
        if !super::sms::number_allowed(sms, phone.address.as_str()) {
            return Err(StanzaFault::not_acceptable(format!(
                "phone: this service does not send SMS to {}",
                phone.address.as_str()
            ))
            .into());
        }
    }
    match store.put_user(&user) {
        Ok(()) => count_registration(store, now, who, existing.is_none())?,
        Err(StoreError::HandleTaken) => {
            return Err(StanzaFault::new(ErrorType::Cancel, "conflict")
                .with_text(format!(
                    "the username '{}' is already taken",
                    user.handle.as_str()
                ))
                .into())
        }
        Err(e) => return Err(e.into()),
    }
    out.send(iq_result(iq, None));
    super::presence::refresh_global(core, store, now, &user, out)?;
    let email_changed = user.email.as_ref().map(|t| &t.address)
        != existing
            .as_ref()
            .and_then(|u| u.email.as_ref())
            .map(|t| &t.address);
    let phone_changed = user.phone.as_ref().map(|t| &t.address)
        != existing
            .as_ref()
            .and_then(|u| u.phone.as_ref())
            .map(|t| &t.address);
    let mut notes = Vec::new();
    if email_changed {
        store.remove_verification(&user.jid, crate::core::model::TerminalKind::Email)?;
        notes.extend(super::email::start_verification(
            core, store, now, &user, out,
        )?);
    }
    if phone_changed {
        store.remove_verification(&user.jid, crate::core::model::TerminalKind::Phone)?;
        notes.extend(super::sms::start_verification(
            core, store, now, &user, out,
        )?);
    }
    for note in notes {
        out.send(crate::xmpp::stanza::chat(
            &core.settings.domain,
            &user.jid,
            &note,
        ));
    }
    if existing.is_none() {
        tracing::info!(handle = user.handle.as_str(), "user registered");
        // Ask for the user's presence so Reach sees all their resources; say the service is up.
        out.send(presence(
            &core.settings.domain,
            &user.jid,
            Some("subscribe"),
        ));
        out.send(presence(&core.settings.domain, &user.jid, None));
    } else {
        tracing::info!(handle = user.handle.as_str(), "registration updated");
    }
    Ok(())
}

/// The registration abuse limits: so many registrations and updates per JID per hour, so many
/// new users per domain per hour. Removing a registration is never limited.
fn check_rates(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    who: &Addressing,
    new: bool,
) -> Result<(), super::Failure> {
    use super::limits::{counter, HOUR};
    let limits = &core.settings.limits;
    let mine = store.counter(counter::REGISTRATIONS, &who.from_bare, HOUR, now)?;
    if mine >= limits.registrations_per_jid_per_hour {
        return Err(StanzaFault::new(ErrorType::Wait, "resource-constraint")
            .with_text(format!(
                "too many registration changes: at most {} per hour; try again later",
                limits.registrations_per_jid_per_hour
            ))
            .into());
    }
    let domain = who.from.domain().as_str();
    if new
        && store.counter(counter::NEW_REGISTRATIONS, domain, HOUR, now)?
            >= limits.new_registrations_per_domain_per_hour
    {
        tracing::warn!(
            domain,
            "new registrations from this domain are being limited"
        );
        return Err(StanzaFault::new(ErrorType::Wait, "policy-violation")
            .with_text(format!(
                "too many new registrations from {domain}: at most {} per hour; try again later",
                limits.new_registrations_per_domain_per_hour
            ))
            .into());
    }
    Ok(())
}

fn count_registration(
    store: &mut dyn Transaction,
    now: u64,
    who: &Addressing,
    new: bool,
) -> Result<(), StoreError> {
    use super::limits::{counter, HOUR};
    store.bump_counter(counter::REGISTRATIONS, &who.from_bare, HOUR, now)?;
    if new {
        store.bump_counter(
            counter::NEW_REGISTRATIONS,
            who.from.domain().as_str(),
            HOUR,
            now,
        )?;
    }
    Ok(())
}

fn remove(
    core: &Core,
    store: &mut dyn Transaction,
    iq: &Element,
    who: &Addressing,
    out: &mut Out,
) -> Handled {
    let Some(goodbyes) = core.purge_user(store, &who.from_bare)? else {
        return Err(registration_required().into());
    };
    out.send(iq_result(iq, None));
    for stanza in goodbyes {
        out.send(stanza);
    }
    Ok(())
}

impl Core {
    /// Deletes the user with bare JID `jid` and everything Reach holds about them (terminals,
    /// sessions, held and queued items), as XEP-0077 `<remove/>` does, and returns the presences
    /// that tell their buddies and them (unavailable, unsubscribed, unsubscribe). `None` if no
    /// such user is registered. The caller queues the stanzas and flushes; `reach purge` uses
    /// this with the store of a stopped Reach.
    pub fn purge_user(
        &self,
        store: &mut dyn Transaction,
        jid: &str,
    ) -> Result<Option<Vec<Element>>, StoreError> {
        let Some((user, buddies)) = store.remove_user(jid)? else {
            return Ok(None);
        };
        let mut goodbyes = Vec::with_capacity(3 * buddies.len() + 3);
        let address = self.reach_address(&user.handle);
        for buddy in buddies {
            goodbyes.push(presence(&address, &buddy, Some("unavailable")));
            goodbyes.push(presence(&address, &buddy, Some("unsubscribed")));
            goodbyes.push(presence(&address, &buddy, Some("unsubscribe")));
        }
        let service = &self.settings.domain;
        goodbyes.push(presence(service, &user.jid, Some("unavailable")));
        goodbyes.push(presence(service, &user.jid, Some("unsubscribed")));
        goodbyes.push(presence(service, &user.jid, Some("unsubscribe")));
        tracing::info!(handle = user.handle.as_str(), "user removed");
        Ok(Some(goodbyes))
    }
}

/// The values a client submitted, by form or by legacy fields. `None` = field absent.
#[derive(Debug, Default)]
struct Submitted {
    username: Option<String>,
    email: Option<String>,
    phone: Option<String>,
}

impl Submitted {
    fn read(query: &Element) -> Submitted {
        if let Some(form) = query.get_child("x", ns::DATA_FORMS) {
            let mut s = Submitted::default();
            for field in form.children().filter(|c| c.is("field", ns::DATA_FORMS)) {
                let value = field.get_child("value", ns::DATA_FORMS).map(|v| v.text());
                let value = Some(value.unwrap_or_default());
                match field.attr("var") {
                    Some("username") => s.username = value,
                    Some("email") => s.email = value,
                    Some("phone") => s.phone = value,
                    _ => {}
                }
            }
            return s;
        }
        let legacy = |name: &str| query.get_child(name, ns::REGISTER).map(|c| c.text());
        Submitted {
            username: legacy("username"),
            email: legacy("email"),
            phone: legacy("phone"),
        }
    }
}

fn validate(
    who: &Addressing,
    existing: Option<&User>,
    s: &Submitted,
    now: u64,
) -> Result<User, StanzaFault> {
    let field_error = |field: &str, e: &dyn std::fmt::Display| {
        StanzaFault::not_acceptable(format!("{field}: {e}"))
    };
    let handle = match (s.username.as_deref().map(str::trim), existing) {
        (None | Some(""), Some(user)) => user.handle.clone(),
        (None | Some(""), None) => {
            return Err(StanzaFault::not_acceptable(
                "username: a username is required",
            ))
        }
        (Some(name), existing) => {
            let handle = Handle::parse(name).map_err(|e| field_error("username", &e))?;
            if let Some(user) = existing {
                if user.handle != handle {
                    return Err(StanzaFault::not_acceptable(
                        "username: a reach address cannot be renamed; remove the registration and register again",
                    ));
                }
            }
            handle
        }
    };
    let email = terminal_field(
        "email",
        s.email.as_deref(),
        existing.and_then(|u| u.email.as_ref()),
        Email::parse,
    )?;
    let phone = terminal_field(
        "phone",
        s.phone.as_deref(),
        existing.and_then(|u| u.phone.as_ref()),
        Phone::parse,
    )?;
    Ok(User {
        jid: who.from_bare.clone(),
        handle,
        email,
        phone,
        registered_at: existing.map_or(now, |u| u.registered_at),
        primary: existing.and_then(|u| u.primary),
        subscription_policy: existing.map(|u| u.subscription_policy).unwrap_or_default(),
        time_zone: existing.and_then(|u| u.time_zone.clone()),
        integrated: existing.is_some_and(|u| u.integrated),
    })
}

/// A terminal field of the form: absent keeps the current terminal, empty removes it, a new value
/// replaces it unverified, and the same value keeps its verification.
fn terminal_field<A: PartialEq + Clone, E: std::fmt::Display>(
    field: &str,
    submitted: Option<&str>,
    current: Option<&Terminal<A>>,
    parse: impl Fn(&str) -> Result<A, E>,
) -> Result<Option<Terminal<A>>, StanzaFault> {
    match submitted.map(str::trim) {
        None => Ok(current.cloned()),
        Some("") => Ok(None),
        Some(text) => {
            let address =
                parse(text).map_err(|e| StanzaFault::not_acceptable(format!("{field}: {e}")))?;
            match current {
                Some(t) if t.address == address => Ok(Some(t.clone())),
                _ => Ok(Some(Terminal::unverified(address))),
            }
        }
    }
}

fn registration_form(who: &Addressing, user: Option<&User>) -> Element {
    let suggested = who.from.node().and_then(|n| Handle::suggest(n.as_str()));
    let username = user
        .map(|u| u.handle.as_str().to_owned())
        .or(suggested.map(|h| h.as_str().to_owned()));
    let email = user
        .and_then(|u| u.email.as_ref())
        .map(|t| t.address.as_str().to_owned());
    let phone = user
        .and_then(|u| u.phone.as_ref())
        .map(|t| t.address.as_str().to_owned());

    let mut query = Element::builder("query", ns::REGISTER).build();
    if user.is_some() {
        query.append_child(Element::builder("registered", ns::REGISTER).build());
    }
    query.append_child(
        Element::builder("instructions", ns::REGISTER)
            .append(INSTRUCTIONS)
            .build(),
    );
    for (name, value) in [
        ("username", &username),
        ("email", &email),
        ("phone", &phone),
    ] {
        let mut legacy = Element::builder(name, ns::REGISTER).build();
        if let Some(v) = value {
            legacy.append_text_node(v.as_str());
        }
        query.append_child(legacy);
    }

    let mut form = Element::builder("x", ns::DATA_FORMS)
        .attr(an("type"), "form")
        .build();
    form.append_child(
        Element::builder("title", ns::DATA_FORMS)
            .append("Register with Reach")
            .build(),
    );
    form.append_child(
        Element::builder("instructions", ns::DATA_FORMS)
            .append(INSTRUCTIONS)
            .build(),
    );
    form.append_child(field(
        "FORM_TYPE",
        "hidden",
        None,
        false,
        Some(ns::REGISTER),
    ));
    form.append_child(field(
        "username",
        "text-single",
        Some("Reach address name"),
        true,
        username.as_deref(),
    ));
    form.append_child(field(
        "email",
        "text-single",
        Some("Email address (optional)"),
        false,
        email.as_deref(),
    ));
    form.append_child(field(
        "phone",
        "text-single",
        Some("Phone number, E.164 (optional)"),
        false,
        phone.as_deref(),
    ));
    query.append_child(form);
    query
}

fn field(
    var: &str,
    type_: &str,
    label: Option<&str>,
    required: bool,
    value: Option<&str>,
) -> Element {
    let mut f = Element::builder("field", ns::DATA_FORMS)
        .attr(an("var"), var)
        .attr(an("type"), type_)
        .build();
    if let Some(label) = label {
        f.set_attr(NONE, an("label"), label);
    }
    if required {
        f.append_child(Element::builder("required", ns::DATA_FORMS).build());
    }
    if let Some(value) = value {
        f.append_child(
            Element::builder("value", ns::DATA_FORMS)
                .append(value)
                .build(),
        );
    }
    f
}

#[cfg(test)]
mod tests {
    use crate::core::testing::*;
    #[allow(unused_imports)]
    use crate::core::Transaction;
    use xmpp_parsers::ns;

    fn get(t: &Harness, from: &str) -> minidom::Element {
        t.one(&format!(
            "<iq type='get' id='g' from='{from}/res' to='{D}'><query xmlns='{}'/></iq>",
            ns::REGISTER
        ))
    }

    #[test]
    fn the_form_suggests_a_handle_from_the_localpart() {
        let t = Harness::new();
        let reply = get(&t, "Alice.Smith@example.org");
        assert_eq!(reply.attr("type"), Some("result"));
        let query = reply.get_child("query", ns::REGISTER).unwrap();
        assert!(!query.has_child("registered", ns::REGISTER));
        assert_eq!(
            form_value(query, "username").as_deref(),
            Some("alice.smith")
        );
        let form = query.get_child("x", ns::DATA_FORMS).unwrap();
        let vars: Vec<_> = form.children().filter_map(|f| f.attr("var")).collect();
        assert_eq!(vars, vec!["FORM_TYPE", "username", "email", "phone"]);
    }

    #[test]
    fn registering_stores_the_user_and_subscribes_to_them() {
        let t = Harness::new();
        let out = t.run(&register_form(
            "alice@example.org",
            "alice",
            "alice@mail.example.org",
            "+1 555 123 4567",
        ));
        assert_eq!(out[0].attr("type"), Some("result"));
        assert!(out.iter().any(|s| s.name() == "presence"
            && s.attr("type") == Some("subscribe")
            && s.attr("to") == Some("alice@example.org")
            && s.attr("from") == Some(D)));
        let user = t.store.tx().user("alice@example.org").unwrap().unwrap();
        assert_eq!(user.handle.as_str(), "alice");
        assert_eq!(
            user.phone.as_ref().unwrap().address.as_str(),
            "+15551234567"
        );
        assert!(!user.phone.unwrap().verified);
        assert!(!user.email.unwrap().verified);

        // A registered user sees <registered/> and their values.
        let reply = get(&t, "alice@example.org");
        let query = reply.get_child("query", ns::REGISTER).unwrap();
        assert!(query.has_child("registered", ns::REGISTER));
        assert_eq!(
            form_value(query, "email").as_deref(),
            Some("alice@mail.example.org")
        );
    }

    #[test]
    fn bad_values_are_refused_naming_the_field_and_change_nothing() {
        let t = Harness::new();
        for (username, email, phone, field) in [
            ("Alice", "", "", "username"),
            ("alice", "not-an-address", "", "email"),
            ("alice", "", "555-1234", "phone"),
            ("", "", "", "username"),
        ] {
            let reply = t.one(&register_form("alice@example.org", username, email, phone));
            assert_error(&reply, "not-acceptable");
            assert!(
                error_text(&reply).starts_with(field),
                "{}",
                error_text(&reply)
            );
        }
        assert!(t.store.tx().user("alice@example.org").unwrap().is_none());
    }

    #[test]
    fn a_taken_handle_is_a_conflict_and_foreign_domains_are_not_allowed() {
        let t = Harness::new();
        t.register("alice@example.org", "alice");
        let reply = t.one(&register_form("mallory@example.org", "alice", "", ""));
        assert_error(&reply, "conflict");
        let reply = t.one(&register_form("eve@elsewhere.example", "eve", "", ""));
        assert_error(&reply, "not-allowed");
        assert!(t
            .store
            .tx()
            .user("eve@elsewhere.example")
            .unwrap()
            .is_none());
        let reply = get(&t, "eve@elsewhere.example");
        assert_error(&reply, "not-allowed");
    }

    #[test]
    fn an_update_keeps_the_handle_and_clears_an_emptied_terminal() {
        let t = Harness::new();
        t.run(&register_form(
            "alice@example.org",
            "alice",
            "a@mail.example.org",
            "+15551234567",
        ));
        let out = t.run(&register_form("alice@example.org", "", "", "+15557654321"));
        assert!(
            !out.iter().any(|s| s.attr("type") == Some("subscribe")),
            "an update does not subscribe again"
        );
        let user = t.store.tx().user("alice@example.org").unwrap().unwrap();
        assert_eq!(user.handle.as_str(), "alice");
        assert!(user.email.is_none());
        assert_eq!(user.phone.unwrap().address.as_str(), "+15557654321");
        let reply = t.one(&register_form("alice@example.org", "alice2", "", ""));
        assert_error(&reply, "not-acceptable");
    }

    #[test]
    fn legacy_fields_work_too() {
        let t = Harness::new();
        let out = t.run(&format!(
            "<iq type='set' id='l' from='carol@example.org/x' to='{D}'><query xmlns='{}'><username>carol</username><email>carol@example.org</email></query></iq>",
            ns::REGISTER
        ));
        assert_eq!(out[0].attr("type"), Some("result"));
        assert_eq!(
            t.store
                .tx()
                .user("carol@example.org")
                .unwrap()
                .unwrap()
                .handle
                .as_str(),
            "carol"
        );
    }

    #[test]
    fn remove_deletes_everything_and_unsubscribes_buddies() {
        let t = Harness::new();
        t.register("alice@example.org", "alice");
        t.run(&format!(
            "<presence type='subscribe' from='bob@example.net' to='alice@{D}'/>"
        ));
        let out = t.run(&format!(
            "<iq type='set' id='r' from='alice@example.org/x' to='{D}'><query xmlns='{}'><remove/></query></iq>",
            ns::REGISTER
        ));
        assert_eq!(out[0].attr("type"), Some("result"));
        assert!(out
            .iter()
            .any(|s| s.attr("to") == Some("bob@example.net")
                && s.attr("type") == Some("unsubscribed")));
        assert!(out
            .iter()
            .any(|s| s.attr("to") == Some("alice@example.org")
                && s.attr("type") == Some("unsubscribe")));
        assert!(t.store.tx().user("alice@example.org").unwrap().is_none());
        let again = t.one(&format!(
            "<iq type='set' id='r2' from='alice@example.org/x' to='{D}'><query xmlns='{}'><remove/></query></iq>",
            ns::REGISTER
        ));
        assert_error(&again, "registration-required");
    }
}
