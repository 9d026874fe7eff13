//! The command prompt: a chat with the service `D`.
//!
//! Every line is a command; `help` lists them. Later doors (ad-hoc commands, SMS, email subjects)
//! share the same command model.

use minidom::Element;

use super::{Addressing, Core, Out};
use crate::store::{Store, StoreError, TerminalKind, User};
use crate::xmpp::stanza::{attr, chat, child_text};

const HELP: &str = "Reach commands:\n\
help: this list\n\
status: your reach address, terminals and held messages\n\
verify CODE: confirm a terminal with the code Reach sent there\n\
verify: send new codes to the terminals not verified yet";

fn verify(
    core: &Core,
    store: &Store,
    now: u64,
    who: &Addressing,
    code: &str,
    out: &mut Out,
) -> Result<String, StoreError> {
    let Some(user) = store.user(&who.from_bare)? else {
        return Ok("You are not registered.".to_owned());
    };
    if code.is_empty() {
        return resend_codes(core, store, now, &user, out);
    }
    verify_any(core, store, now, &user, code, out)
}

/// Checks a code against the terminals waiting for verification (the phone's if it matches, else
/// the email's, which then counts the try). Shared by every door: chat, ad-hoc, SMS.
pub(super) fn verify_any(
    core: &Core,
    store: &Store,
    now: u64,
    user: &User,
    code: &str,
    out: &mut Out,
) -> Result<String, StoreError> {
    let phone_waits = store
        .verification(&user.jid, TerminalKind::Phone)?
        .is_some();
    let email_waits = store
        .verification(&user.jid, TerminalKind::Email)?
        .is_some();
    if phone_waits && (super::sms::is_phone_code(store, user, code)? || !email_waits) {
        return Ok(super::sms::verify_code(core, store, now, user, code, out)?.unwrap_or_default());
    }
    super::email::verify_code(core, store, now, user, code, out)
}

/// Sends new codes to every terminal not verified yet.
pub(super) fn resend_codes(
    core: &Core,
    store: &Store,
    now: u64,
    user: &User,
    out: &mut Out,
) -> Result<String, StoreError> {
    let mut said = Vec::new();
    if user.email.as_ref().is_some_and(|t| !t.verified) {
        said.extend(super::email::start_verification(
            core, store, now, user, out,
        )?);
    }
    if user.phone.as_ref().is_some_and(|t| !t.verified) {
        said.extend(super::sms::start_verification(core, store, now, user, out)?);
    }
    Ok(if said.is_empty() {
        "All your terminals are verified.".to_owned()
    } else {
        said.join("\n")
    })
}

pub(super) fn on_chat(
    core: &Core,
    store: &Store,
    now: u64,
    stanza: &Element,
    who: &Addressing,
    out: &mut Out,
) -> Result<(), StoreError> {
    if attr(stanza, "type") == "error" {
        return Ok(());
    }
    let Some(body) = child_text(stanza, "body") else {
        return Ok(());
    };
    let line = body.trim();
    let command = line.split_whitespace().next().unwrap_or("").to_lowercase();
    let reply = match command.as_str() {
        "" => return Ok(()),
        "help" | "?" => HELP.to_owned(),
        "status" => status(core, store, who)?,
        "verify" => verify(core, store, now, who, line["verify".len()..].trim(), out)?,
        other => format!("Unknown command '{other}'. Send help for the list."),
    };
    let mut message = chat(&core.settings.domain, attr(stanza, "from"), &reply);
    if let Some(thread) = stanza.get_child("thread", crate::xmpp::stanza::STANZA_NS) {
        message.append_child(thread.clone());
    }
    out.send(message);
    Ok(())
}

fn status(core: &Core, store: &Store, who: &Addressing) -> Result<String, StoreError> {
    let Some(user) = store.user(&who.from_bare)? else {
        return Ok(
            "You are not registered. Register with this service from your XMPP client \
                   (Service discovery → Register) to get a reach address."
                .to_owned(),
        );
    };
    let terminal = |name: &str, t: Option<(&str, bool)>| match t {
        None => format!("{name}: none"),
        Some((address, verified)) => {
            format!(
                "{name}: {address} ({})",
                if verified {
                    "verified"
                } else {
                    "not verified yet"
                }
            )
        }
    };
    Ok(format!(
        "Your reach address: {}\n{}\n{}\nHeld messages: {}",
        core.reach_address(&user.handle),
        terminal(
            "Email",
            user.email
                .as_ref()
                .map(|t| (t.address.as_str(), t.verified))
        ),
        terminal(
            "Phone",
            user.phone
                .as_ref()
                .map(|t| (t.address.as_str(), t.verified))
        ),
        store.held_count(&user.jid)?
    ))
}

#[cfg(test)]
mod tests {
    use crate::core::testing::*;
    use crate::xmpp::stanza::child_text;

    #[test]
    fn help_and_status_answer_in_the_chat() {
        let t = Harness::new();
        let reply = t.one(&format!(
            "<message type='chat' from='alice@example.org/x' to='{D}'><body>help</body></message>"
        ));
        assert_eq!(reply.attr("to"), Some("alice@example.org/x"));
        assert!(child_text(&reply, "body").unwrap().contains("status"));
        let reply = t.one(&format!("<message type='chat' from='alice@example.org/x' to='{D}'><body>status</body></message>"));
        assert!(child_text(&reply, "body")
            .unwrap()
            .contains("not registered"));
        t.register("alice@example.org", "alice");
        let reply = t.one(&format!("<message type='chat' from='alice@example.org/x' to='{D}'><body>Status</body></message>"));
        assert!(child_text(&reply, "body")
            .unwrap()
            .contains(&format!("alice@{D}")));
        let reply = t.one(&format!("<message type='chat' from='alice@example.org/x' to='{D}'><body>frobnicate</body></message>"));
        assert!(child_text(&reply, "body")
            .unwrap()
            .contains("Unknown command 'frobnicate'"));
    }
}
