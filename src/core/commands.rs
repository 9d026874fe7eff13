//! The command prompt: a chat with the service `D`.
//!
//! Every line is a command; `help` lists them. The lines that change settings are read here and
//! carried out by `settings.rs`, which the ad-hoc commands (`adhoc.rs`) use too: both doors check
//! the same values with the same sentences. A refused value changes nothing and the answer names
//! the field.

use minidom::Element;

use super::settings::{self, Decision, Draft, Invalid};
use super::{Addressing, Core, Out};
use crate::core::model::{StoreError, TerminalKind, User};
use crate::core::Transaction;
use crate::xmpp::stanza::{attr, chat, child_text};

const HELP: &str = "Reach commands:\n\
help: this list\n\
status: your reach address, terminals, states, preferences and held messages\n\
terminals: list your terminals\n\
add email ADDRESS, add phone NUMBER: add a terminal (Reach sends it a code to verify)\n\
remove email|phone: remove a terminal\n\
primary email|phone: the terminal that takes forwards first\n\
verify CODE: confirm a terminal with the code Reach sent there\n\
verify: send new codes to the terminals not verified yet\n\
state email|phone available|away|dnd: set a terminal's local state\n\
prefs [email|phone]: show a terminal's preferences\n\
set email|phone when always|no_xmpp_resource|away_or_offline|never\n\
set email|phone grace SECONDS|default: how long an away client has to read a message first\n\
set email|phone senders everyone|buddies|JID,JID...: whose messages it gets\n\
set email|phone quiet 22:00-07:00 hold|email, or quiet off: quiet hours\n\
set email|phone subscriptions on|off: forward subscription requests\n\
set email|phone alerts JID,JID...|off: tell it when these buddies come and go\n\
set email|phone cap NUMBER|default: most forwards a day\n\
timezone Europe/Berlin: your time zone, for quiet hours\n\
address own|reach: whether buddies reach you at your own address (where your server allows it) or at your reach address\n\
policy auto|buddies_only|ask: who may subscribe to your reach address\n\
approve JID, deny JID: answer a subscription request (policy ask)\n\
The same commands are in your client's ad-hoc commands (terminals, verify, preferences, state, status).";

const NOT_REGISTERED: &str = "You are not registered. Register with this service from your XMPP \
client (Service discovery → Register) to get a reach address.";

fn verify(
    core: &Core,
    store: &mut dyn Transaction,
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

/// What `verify CODE` says when no code waits.
const NOTHING_TO_VERIFY: &str = "There is nothing to verify. Register an email address first.";

/// Checks a code against every terminal waiting for verification. Shared by every door: chat,
/// ad-hoc, SMS `/verify`. See [`check_guess`].
pub(super) fn verify_any(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    code: &str,
    out: &mut Out,
) -> Result<String, StoreError> {
    Ok(check_guess(core, store, now, user, code, None, out)?
        .unwrap_or_else(|| NOTHING_TO_VERIFY.to_owned()))
}

/// Checks one guess of user `user`; `None` if no code waits. In order: the user's wrong codes
/// of the day (past `wrong_codes_per_user_per_day` nothing is checked, not even the right
/// code, and nothing changes); whether a code waits; expiry; then the code against the
/// waiting codes (all of them, or with `only`, the one of that kind: a code texted back from a
/// phone proves that phone only). A right code confirms its terminal. A wrong one counts
/// towards the day's wrong codes and costs *every* waiting code of the user a try, so that
/// asking for fresh codes elsewhere never buys more guesses at one code.
pub(super) fn check_guess(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    code: &str,
    only: Option<TerminalKind>,
    out: &mut Out,
) -> Result<Option<String>, StoreError> {
    let limits = &core.settings.limits;
    if let Some(refusal) = super::limits::guesses_refusal(limits, store, now, &user.jid)? {
        return Ok(Some(refusal));
    }
    let mut waiting = Vec::new();
    for kind in [TerminalKind::Email, TerminalKind::Phone] {
        if let Some(v) = store.verification(&user.jid, kind)? {
            waiting.push(v);
        }
    }
    if waiting.is_empty() {
        return Ok(None);
    }
    let mut expired = false;
    waiting.retain(|v| {
        let live = v.expires_at >= now;
        expired |= !live;
        live
    });
    for kind in [TerminalKind::Email, TerminalKind::Phone] {
        if !waiting.iter().any(|v| v.kind == kind) {
            store.remove_verification(&user.jid, kind)?;
        }
    }
    // No live code that this guess could match: nothing to guess at, so no try is spent.
    if !waiting.iter().any(|v| only.is_none_or(|k| k == v.kind)) {
        return Ok(
            expired.then(|| "That code has expired. Send \"verify\" for a new one.".to_owned())
        );
    }
    let code = code.trim();
    if let Some(right) = waiting
        .iter()
        .find(|v| only.is_none_or(|k| k == v.kind) && same_code(&v.code, code))
    {
        return match right.kind {
            TerminalKind::Email => {
                super::email::confirm_email(core, store, now, user, &right.address, out)
            }
            TerminalKind::Phone => {
                super::sms::confirm_phone(core, store, now, user, &right.address, out)
            }
        }
        .map(Some);
    }
    let left_today = super::limits::count_wrong_code(limits, store, now, &user.jid)?;
    let mut tries_left = 0;
    for v in waiting {
        let left = v.tries_left.saturating_sub(1);
        if left == 0 || left_today == 0 {
            store.remove_verification(&user.jid, v.kind)?;
        } else {
            tries_left = tries_left.max(u32::from(left));
            store.put_verification(
                &user.jid,
                &crate::core::model::Verification {
                    tries_left: left,
                    ..v
                },
            )?;
        }
    }
    tracing::info!(
        handle = user.handle.as_str(),
        left_today,
        "wrong verification code"
    );
    Ok(Some(if left_today == 0 {
        "That code is wrong, and that was your last try today: Reach checks no more \
         verification codes from you until tomorrow (UTC)."
            .to_owned()
    } else if tries_left == 0 {
        "That code is wrong, and that was the last try. Send \"verify\" for a new code.".to_owned()
    } else {
        match tries_left.min(left_today) {
            1 => "That code is wrong (1 try left).".to_owned(),
            left => format!("That code is wrong ({left} tries left)."),
        }
    }))
}

/// Compares a stored code with a guess without stopping at the first different byte.
fn same_code(stored: &str, guess: &str) -> bool {
    stored.len() == guess.len()
        && stored
            .bytes()
            .zip(guess.bytes())
            .fold(0u8, |diff, (a, b)| diff | (a ^ b))
            == 0
}

/// Sends new codes to every terminal not verified yet.
pub(super) fn resend_codes(
    core: &Core,
    store: &mut dyn Transaction,
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
    store: &mut dyn Transaction,
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
    let (command, args) = split_word(line);
    let command = command.to_lowercase();
    let reply = match command.as_str() {
        "" => return Ok(()),
        "help" | "?" => HELP.to_owned(),
        "verify" => verify(core, store, now, who, args, out)?,
        "approve" => super::presence::approve(core, store, who, args, out)?,
        "deny" => super::presence::deny(core, store, who, args, out)?,
        _ => match store.user(&who.from_bare)? {
            None if SETTINGS_COMMANDS.contains(&command.as_str()) => NOT_REGISTERED.to_owned(),
            None => unknown(&command),
            Some(user) => on_settings_line(core, store, now, &user, &command, args, out)?,
        },
    };
    let mut message = chat(&core.settings.domain, attr(stanza, "from"), &reply);
    if let Some(thread) = stanza.get_child("thread", crate::xmpp::stanza::STANZA_NS) {
        message.append_child(thread.clone());
    }
    out.send(message);
    Ok(())
}

/// The commands that need a registered user and are carried out by `settings.rs`.
const SETTINGS_COMMANDS: &[&str] = &[
    "status",
    "terminals",
    "add",
    "remove",
    "primary",
    "state",
    "prefs",
    "preferences",
    "set",
    "timezone",
    "policy",
    "address",
];

fn unknown(command: &str) -> String {
    format!("Unknown command '{command}'. Send help for the list.")
}

/// The first word of `text` and the rest, trimmed.
fn split_word(text: &str) -> (&str, &str) {
    let text = text.trim();
    match text.split_once(char::is_whitespace) {
        Some((word, rest)) => (word, rest.trim()),
        None => (text, ""),
    }
}

/// What a decision says in the chat: the sentence, or every refused field and that nothing
/// changed.
fn said(decision: Decision) -> String {
    match decision {
        Ok(said) => said,
        Err(refused) => refusal(&refused),
    }
}

fn refusal(refused: &[Invalid]) -> String {
    let mut lines: Vec<String> = refused.iter().map(ToString::to_string).collect();
    lines.push("Nothing was changed.".to_owned());
    lines.join("\n")
}

/// A line that reads or changes the registered user's settings.
fn on_settings_line(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    command: &str,
    args: &str,
    out: &mut Out,
) -> Result<String, StoreError> {
    // `KIND REST`: the terminal named first, then the rest of the line.
    let with_kind = |usage: &str| -> Result<(TerminalKind, &str), String> {
        let (kind, rest) = split_word(args);
        if kind.is_empty() {
            return Err(format!("Usage: {usage}"));
        }
        settings::parse_kind(kind)
            .map(|kind| (kind, rest))
            .map_err(|e| format!("{e}\nUsage: {usage}"))
    };
    Ok(match command {
        "status" => settings::status_text(core, store, user)?,
        "terminals" => format!(
            "{}\nadd email ADDRESS, add phone NUMBER, remove email|phone, primary email|phone.",
            settings::terminals_text(user)
        ),
        "add" => match with_kind("add email ADDRESS, or add phone NUMBER") {
            Err(usage) => usage,
            Ok((kind, "")) => format!(
                "Usage: add {0} {1}",
                settings::kind_word(kind),
                match kind {
                    TerminalKind::Email => "ADDRESS",
                    TerminalKind::Phone => "NUMBER (like +15551234567)",
                }
            ),
            Ok((kind, address)) => said(settings::add_terminal(
                core, store, now, user, kind, address, out,
            )?),
        },
        "remove" => match with_kind("remove email|phone") {
            Err(usage) => usage,
            Ok((kind, _)) => said(settings::remove_terminal(
                core, store, now, user, kind, out,
            )?),
        },
        "primary" => match with_kind("primary email|phone") {
            Err(usage) => usage,
            Ok((kind, _)) => said(settings::set_primary(store, user, kind)?),
        },
        "state" => match with_kind("state email|phone available|away|dnd") {
            Err(usage) => usage,
            Ok((kind, "")) => match settings::terminal(user, kind) {
                Some(t) => format!(
                    "Your {} is {}. Usage: state {} available|away|dnd",
                    settings::kind_word(kind),
                    settings::state_word(t.state),
                    settings::kind_word(kind)
                ),
                None => settings::no_terminal(kind).to_string(),
            },
            Ok((kind, state)) => match settings::parse_state(state) {
                Err(e) => refusal(&[e]),
                Ok(state) => said(settings::set_state(
                    core, store, now, user, kind, state, out,
                )?),
            },
        },
        "prefs" | "preferences" => {
            if args.is_empty() {
                settings::preferences_text(core, user, None)
            } else {
                match with_kind("prefs email|phone") {
                    Err(usage) => usage,
                    Ok((kind, _)) if settings::terminal(user, kind).is_none() => {
                        settings::no_terminal(kind).to_string()
                    }
                    Ok((kind, _)) => settings::preferences_text(core, user, Some(kind)),
                }
            }
        }
        "set" => match with_kind(SET_USAGE) {
            Err(usage) => usage,
            Ok((kind, rest)) => match set_draft(rest) {
                Err(usage) => usage,
                Ok(draft) => said(settings::save_preferences(
                    core,
                    store,
                    now,
                    user,
                    Some(kind),
                    &draft,
                    out,
                )?),
            },
        },
        "timezone" if args.is_empty() => format!(
            "Your time zone is {}. Usage: timezone Europe/Berlin (or timezone UTC)",
            user.time_zone.as_deref().unwrap_or("UTC")
        ),
        "timezone" => said(settings::save_preferences(
            core,
            store,
            now,
            user,
            None,
            &Draft {
                time_zone: Some(args.to_owned()),
                ..Draft::default()
            },
            out,
        )?),
        "address" if args.is_empty() => format!(
            "Buddies reach you at {}. Usage: address own|reach",
            if user.integrated {
                format!("your own address {}", user.jid)
            } else {
                format!("your reach address {}", core.reach_address(&user.handle))
            }
        ),
        "address" => said(settings::save_preferences(
            core,
            store,
            now,
            user,
            None,
            &Draft {
                address: Some(args.to_owned()),
                ..Draft::default()
            },
            out,
        )?),
        "policy" if args.is_empty() => format!(
            "Your subscription policy is {}. Usage: policy auto|buddies_only|ask",
            settings::policy_word(user.subscription_policy)
        ),
        "policy" => said(settings::save_preferences(
            core,
            store,
            now,
            user,
            None,
            &Draft {
                policy: Some(args.to_owned()),
                ..Draft::default()
            },
            out,
        )?),
        other => unknown(other),
    })
}

const SET_USAGE: &str = "set email|phone SETTING VALUE, SETTING one of when, grace, senders, \
quiet, subscriptions, alerts, cap (send help for their values)";

/// The draft of `set KIND SETTING VALUE`: only that setting is filled in, as the user typed it.
fn set_draft(rest: &str) -> Result<Draft, String> {
    let (setting, value) = split_word(rest);
    let value = value.to_owned();
    let off = |v: &str| matches!(v.to_lowercase().as_str(), "off" | "none" | "nobody");
    let mut draft = Draft::default();
    match setting.to_lowercase().as_str() {
        "" => return Err(format!("Usage: {SET_USAGE}")),
        "when" => draft.when = Some(value),
        "grace" => draft.grace = Some(value),
        "senders" | "from" => {
            let (first, jids) = split_word(&value);
            match first.to_lowercase().as_str() {
                "everyone" | "all" | "buddies" => draft.senders = Some(value),
                "list" if jids.is_empty() => draft.senders = Some("list".to_owned()),
                "list" => {
                    draft.senders = Some("list".to_owned());
                    draft.sender_list = Some(vec![jids.to_owned()]);
                }
                // JIDs straight away: only these.
                _ if value.contains('@') => {
                    draft.senders = Some("list".to_owned());
                    draft.sender_list = Some(vec![value]);
                }
                _ => draft.senders = Some(value),
            }
        }
        "quiet" => {
            let (hours, action) = split_word(&value);
            if off(hours) {
                draft.quiet_start = Some(String::new());
                draft.quiet_end = Some(String::new());
            } else {
                let Some((start, end)) = hours.split_once(['-', '–']) else {
                    return Err(
                        "Usage: set email|phone quiet 22:00-07:00 hold|email, or quiet off"
                            .to_owned(),
                    );
                };
                draft.quiet_start = Some(start.to_owned());
                draft.quiet_end = Some(end.to_owned());
                if !action.is_empty() {
                    draft.quiet_action = Some(action.to_owned());
                }
            }
        }
        "subscriptions" | "subscription" => draft.forward_subscriptions = Some(value),
        "alerts" => draft.alerts = Some(if off(&value) { Vec::new() } else { vec![value] }),
        "cap" => draft.daily_cap = Some(value),
        other => return Err(format!("There is no setting '{other}'. Usage: {SET_USAGE}")),
    }
    Ok(draft)
}

#[cfg(test)]
mod tests {
    use crate::core::testing::*;
    #[allow(unused_imports)]
    use crate::core::Transaction;
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
