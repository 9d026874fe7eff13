//! The SMS terminal's decisions: forwarding messages to the user's phone within the abuse limits,
//! verifying the phone, and what a text from the phone means (keywords, commands, replies).
//!
//! The SMS adapters (provider, webhook) carry these decisions out; text formatting and parsing
//! live in `crate::sms::{format, text}` as pure functions.

use minidom::Element;
use rand::Rng;

use super::{forward, Action, Core, Out};
use crate::core::model::{
    LocalState, Pending, PendingItem, SentSms, SmsJob, StoreError, TerminalKind, User, Verification,
};
use crate::core::Transaction;
use crate::sms::text::{self, Command, Conversation, Keyword, SmsInput, Target};
use crate::sms::{format, DeliveryReport, DeliveryStatus, IncomingSms};
use crate::xmpp::stanza::{an, chat, NONE, STANZA_NS};

/// The SMS terminal's settings (from `[sms]`).
#[derive(Debug, Clone)]
pub struct SmsSettings {
    /// Longest SMS, in segments; longer texts are shortened with an ellipsis.
    pub max_segments: usize,
    /// SMS per user per (UTC) day.
    pub daily_cap: u32,
    /// E.164 prefixes Reach may text (empty: all).
    pub allowed_prefixes: Vec<String>,
}

/// What the webhook answers Kannel: accepted (200, after the commit) or refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WebhookAnswer {
    Accepted,
    /// Kannel should retry later (e.g. the store failed).
    Temporary(String),
    /// Reach will never take this call (it was set aside as a dead letter): 422.
    Rejected(String),
}

const HELP: &str =
    "Reach: reply to answer the last chat; @name text to pick a chat; /msg NAME text; \
/who; /away /back /dnd; /status; /alert JID (/noalert JID) for online alerts; \
/approve JID or /deny JID answers a presence request; STOP ends SMS, START resumes.";

/// The prompt for a local state, texted when forwarding to the phone starts (once a day).
pub(super) const PROMPT: &str =
    "Reach: now forwarding to this phone. /away, /dnd (messages wait) or /back sets what buddies see.";

fn settings(core: &Core) -> Option<&SmsSettings> {
    core.settings.sms.as_ref()
}

fn day(now: u64) -> u64 {
    now / 86_400
}

/// Whether Reach may text this number at all (country allow-list).
pub fn number_allowed(settings: &SmsSettings, number: &str) -> bool {
    settings.allowed_prefixes.is_empty()
        || settings
            .allowed_prefixes
            .iter()
            .any(|p| number.starts_with(p.as_str()))
}

/// Whether Reach may forward to the user's phone now.
pub(super) fn can_forward(core: &Core, user: &User) -> bool {
    let (Some(settings), Some(phone)) = (settings(core), user.phone.as_ref()) else {
        return false;
    };
    phone.usable() && number_allowed(settings, phone.address.as_str())
}

fn reference(core: &Core) -> String {
    let bytes: [u8; 10] = core.rng().gen();
    data_encoding::BASE32_NOPAD
        .encode(&bytes)
        .to_ascii_lowercase()
}

/// An SMS to the user that carries no buddy message (answers, confirmations, codes).
fn notice(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    to: &str,
    text: &str,
    out: &mut Out,
) -> Result<(), StoreError> {
    let Some(settings) = settings(core) else {
        return Ok(());
    };
    if !number_allowed(settings, to) {
        return Ok(());
    }
    store.count_sms(&user.jid, day(now))?;
    out.push(Action::SendSms(Box::new(SmsJob {
        user: user.jid.clone(),
        peer: None,
        to: to.to_owned(),
        text: format::fit(text, settings.max_segments),
        reference: reference(core),
        items: Vec::new(),
        attempts: 0,
        next_attempt_at: now,
        queued_at: now,
        claimed_by: None,
    })));
    Ok(())
}

/// An SMS Reach sends on its own (an alert, a request to answer), not in answer to the user: only
/// to a usable phone (verified, not stopped, not do-not-disturb) and within the daily cap. Returns
/// whether it was sent.
pub(super) fn unsolicited(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    text: &str,
    out: &mut Out,
) -> Result<bool, StoreError> {
    let (Some(settings), Some(phone)) = (settings(core), user.phone.as_ref()) else {
        return Ok(false);
    };
    if !phone.usable() || store.sms_count(&user.jid, day(now))? >= settings.daily_cap {
        return Ok(false);
    }
    let to = phone.address.as_str().to_owned();
    notice(core, store, now, user, &to, text, out)?;
    Ok(true)
}

/// A due forward: one SMS per message, `Bob: text`, the first of a conversation with a hint on
/// how to reply. Past the daily cap, messages wait for the user's XMPP client instead (the buddy
/// is told nothing that would not be true).
pub(super) fn forward(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    pending: Pending,
    out: &mut Out,
) -> Result<(), StoreError> {
    // The decision checked both; if either went away meanwhile, the messages wait for XMPP.
    let (Some(settings), Some(phone)) = (settings(core), user.phone.as_ref()) else {
        return forward::hold_for_xmpp(store, now, &user.jid, &pending.peer, &pending.items);
    };
    let to = phone.address.as_str().to_owned();
    // Forwarding to this phone starts: ask once a day for its local state, if the cap leaves room
    // for the prompt and a message (the message goes first otherwise).
    if store.sms_count(&user.jid, day(now))? + 2 <= settings.daily_cap
        && super::presence::take_prompt(store, now, user, TerminalKind::Phone)?
    {
        notice(core, store, now, user, &to, PROMPT, out)?;
    }
    let mut session = store.touch_session(&user.jid, &pending.peer, now)?;
    let name = super::email::peer_name(session.peer_name.as_deref(), &pending.peer);
    for item in pending.items {
        if store.sms_count(&user.jid, day(now))? >= settings.daily_cap {
            tracing::info!(
                handle = user.handle.as_str(),
                "daily SMS cap reached: message kept for XMPP"
            );
            forward::hold_for_xmpp(
                store,
                now,
                &user.jid,
                &pending.peer,
                std::slice::from_ref(&item),
            )?;
            continue;
        }
        let hint = (!session.sms_hinted).then(|| format::reply_hint(&name));
        session.sms_hinted = true;
        let reference = reference(core);
        let text = format::format_mt(&name, &item.text, hint.as_deref(), settings.max_segments);
        store.count_sms(&user.jid, day(now))?;
        store.put_sent_sms(
            &reference,
            &SentSms {
                user: user.jid.clone(),
                peer: pending.peer.clone(),
                items: vec![item.clone()],
                sent_at: now,
            },
        )?;
        out.push(Action::SendSms(Box::new(SmsJob {
            user: user.jid.clone(),
            peer: Some(pending.peer.clone()),
            to: to.clone(),
            text,
            reference,
            items: vec![item],
            attempts: 0,
            next_attempt_at: now,
            queued_at: now,
            claimed_by: None,
        })));
    }
    store.put_session(&user.jid, &session)
}

/// Starts (or restarts) the verification of the user's phone: a code by SMS, confirmed by texting
/// it back, `verify CODE` to the service, or the ad-hoc command. Returns what to tell the user.
pub(super) fn start_verification(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    out: &mut Out,
) -> Result<Option<String>, StoreError> {
    let (Some(settings), Some(phone)) = (settings(core), user.phone.as_ref()) else {
        return Ok(None);
    };
    if phone.verified {
        return Ok(None);
    }
    let number = phone.address.as_str().to_owned();
    if !number_allowed(settings, &number) {
        return Ok(Some(format!("Reach does not send SMS to {number}.")));
    }
    if let Some(note) = super::limits::take_code(
        &core.settings.limits,
        store,
        now,
        &user.jid,
        TerminalKind::Phone,
        &number,
    )? {
        return Ok(Some(note));
    }
    let code = format!("{:06}", core.rng().gen_range(0..1_000_000u32));
    store.put_verification(
        &user.jid,
        &Verification {
            kind: TerminalKind::Phone,
            address: number.clone(),
            code: code.clone(),
            expires_at: now + super::email::CODE_VALIDITY_SECS,
            tries_left: super::email::CODE_TRIES,
        },
    )?;
    let text = format!(
        "Your Reach code is {code}. Text it back, or send \"verify {code}\" to {}. Valid {} minutes.",
        core.settings.domain,
        super::email::CODE_VALIDITY_SECS / 60
    );
    notice(core, store, now, user, &number, &text, out)?;
    Ok(Some(format!("A verification code is on its way to {number} by SMS. Text it back, or send \"verify CODE\" here.")))
}

/// The user proved they hold `number`: it becomes their phone terminal (unless another user
/// verified it first).
pub(super) fn confirm_phone(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    number: &str,
    out: &mut Out,
) -> Result<String, StoreError> {
    if let Some(other) = store.user_by_phone(number)? {
        if other.jid != user.jid {
            store.remove_verification(&user.jid, TerminalKind::Phone)?;
            return Ok("This number is already verified by another user.".to_owned());
        }
    }
    let mut user = user.clone();
    let Some(phone) = user.phone.as_mut().filter(|t| t.address.as_str() == number) else {
        return Ok("That code was for a number you no longer use.".to_owned());
    };
    phone.verified = true;
    phone.stopped = false;
    store.put_user(&user)?;
    store.remove_verification(&user.jid, TerminalKind::Phone)?;
    tracing::info!(handle = user.handle.as_str(), "phone terminal verified");
    if !super::presence::xmpp_presence(store, &user)?.is_available() {
        super::forward::forward_held(core, store, now, &user, out)?;
    }
    super::presence::refresh_global(core, store, now, &user, out)?;
    Ok(format!("Your phone {number} is verified. Reach forwards messages there while you are away from XMPP."))
}

/// A text from a phone. Accepted (and so acknowledged to the provider) once what it leads to is
/// stored; texts from numbers no user has verified are ignored.
pub(super) fn on_incoming(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    sms: &IncomingSms,
    out: &mut Out,
) -> Result<WebhookAnswer, StoreError> {
    let Ok(number) = crate::address::Phone::parse(&sms.from) else {
        tracing::debug!("SMS from an unreadable number ignored");
        return Ok(WebhookAnswer::Accepted);
    };
    let number = number.as_str().to_owned();
    // The provider retries until it hears 200, with the same id: take each SMS once.
    if let Some(id) = &sms.provider_id {
        if !store.first_sight_of_sms(id, now)? {
            return Ok(WebhookAnswer::Accepted);
        }
    }
    let Some(user) = store.user_by_phone(&number)? else {
        if let Some(code) = text::as_verification_code(&sms.text) {
            texted_code(core, store, now, &number, &code, out)?;
        } else {
            tracing::debug!(from = %number, "SMS from an unknown number ignored");
        }
        return Ok(WebhookAnswer::Accepted);
    };
    let answer = |store: &mut dyn Transaction, out: &mut Out, text: &str| {
        answer_text(core, store, now, &user, &number, text, out).map(|_| ())
    };
    let stopped = user.phone.as_ref().is_some_and(|t| t.stopped);
    if let Some(said) = on_presence_command(core, store, now, &user, &sms.text, out)? {
        answer(store, out, &said)?;
        return Ok(WebhookAnswer::Accepted);
    }
    let input = match text::parse(&sms.text) {
        // "Yes" answers a buddy unless the number is stopped; START itself always resumes.
        SmsInput::Keyword(Keyword::Start)
            if !stopped && !sms.text.trim().eq_ignore_ascii_case("start") =>
        {
            SmsInput::Reply(sms.text.trim().to_owned())
        }
        other => other,
    };
    match input {
        SmsInput::Invalid(problem) => answer(store, out, &problem.to_string())?,
        SmsInput::Keyword(Keyword::Stop) => {
            set_phone(core, store, now, &user, out, |t| t.stopped = true)?;
            answer(
                store,
                out,
                "Reach: you will get no more SMS. Text START to resume.",
            )?;
        }
        SmsInput::Keyword(Keyword::Start) => {
            set_phone(core, store, now, &user, out, |t| t.stopped = false)?;
            answer(store, out, "Reach: SMS resumed. Text HELP for help.")?;
        }
        SmsInput::Keyword(Keyword::Help) | SmsInput::Command(Command::Help) => {
            answer(store, out, HELP)?
        }
        SmsInput::Command(command) => {
            let said = on_command(core, store, now, &user, command, out)?;
            if let Some(said) = said {
                answer(store, out, &said)?;
            }
        }
        SmsInput::Addressed { target, text } => {
            let said = send_to_named(core, store, now, &user, &target, &text, out)?;
            if let Some(said) = said {
                answer(store, out, &said)?;
            }
        }
        SmsInput::Reply(text) => {
            let conversations = conversations(store, &user)?;
            match text::most_recent(&conversations) {
                Some(c) => {
                    let peer = c.peer.clone();
                    send_im(core, store, now, &user, &peer, &text, out)?;
                }
                None => answer(
                    store,
                    out,
                    "Reach: no conversation yet. Use /msg NAME text.",
                )?,
            }
        }
    }
    Ok(WebhookAnswer::Accepted)
}

/// A code texted from `number`, which no user has verified: found through the index of waiting
/// verifications by number. The right code verifies the phone of the user it was sent for; a
/// wrong one is a wrong guess for every user waiting to verify this number (texting guesses
/// is no cheaper than typing them). The user hears the outcome in a chat from `D`; only a
/// number that is now verified is answered by SMS, so that a text from a number Reach does not
/// know never makes Reach send an SMS.
fn texted_code(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    number: &str,
    code: &str,
    out: &mut Out,
) -> Result<(), StoreError> {
    let waiting = store.verifications_for_address(TerminalKind::Phone, number)?;
    if waiting.is_empty() {
        tracing::debug!(from = %number, "SMS from an unknown number ignored");
        return Ok(());
    }
    let guessers: Vec<String> = match waiting.iter().find(|(_, v)| v.code == code) {
        Some((jid, _)) => vec![jid.clone()],
        None => waiting.into_iter().map(|(jid, _)| jid).collect(),
    };
    for jid in guessers {
        let Some(user) = store.user(&jid)? else {
            continue;
        };
        let Some(said) = super::commands::check_guess(
            core,
            store,
            now,
            &user,
            code,
            Some(TerminalKind::Phone),
            out,
        )?
        else {
            continue;
        };
        if let Some(verified) = store.user(&jid)?.filter(|u| {
            u.phone
                .as_ref()
                .is_some_and(|p| p.verified && p.address.as_str() == number)
        }) {
            answer_text(core, store, now, &verified, number, &said, out)?;
        }
        out.send(chat(&core.settings.domain, &user.jid, &said));
    }
    Ok(())
}

/// The most SMS the user's phone gets today: the service's cap, or the user's own if lower.
fn daily_cap(core: &Core, user: &User) -> u32 {
    let service = settings(core).map_or(0, |s| s.daily_cap);
    user.phone
        .as_ref()
        .and_then(|t| t.prefs.daily_cap)
        .map_or(service, |own| own.min(service))
}

/// An answer texted to the phone (to a keyword, a command, a text Reach cannot place): an SMS
/// like any other, so it counts towards the user's daily SMS cap, and past the cap no answer is
/// sent (what the text asked for is still done). Without this an auto-responding number would
/// ping-pong with Reach forever. Returns whether it was sent.
fn answer_text(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    to: &str,
    text: &str,
    out: &mut Out,
) -> Result<bool, StoreError> {
    if store.sms_count(&user.jid, day(now))? >= daily_cap(core, user) {
        tracing::info!(
            handle = user.handle.as_str(),
            "daily SMS cap reached: no answer texted"
        );
        return Ok(false);
    }
    notice(core, store, now, user, to, text, out)?;
    Ok(true)
}

/// Changes the phone terminal (on the stored record, which may be newer than `user`) and
/// publishes what that does to the global presence.
fn set_phone(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    out: &mut Out,
    change: impl FnOnce(&mut crate::core::model::Terminal<crate::address::Phone>),
) -> Result<(), StoreError> {
    let mut user = store.user(&user.jid)?.unwrap_or_else(|| user.clone());
    if let Some(phone) = user.phone.as_mut() {
        change(phone);
    }
    store.put_user(&user)?;
    super::presence::refresh_global(core, store, now, &user, out)
}

/// What buddies see now, in words short enough for an SMS (an XMPP client's status text may be
/// long: it is cut at [`SEEN_CHARS`] characters).
fn seen_by_buddies(
    core: &Core,
    store: &mut dyn Transaction,
    user: &User,
) -> Result<String, StoreError> {
    let seen = super::presence::seen_by_buddies(core, store, user)?;
    Ok(if seen.chars().count() > SEEN_CHARS {
        let cut: String = seen.chars().take(SEEN_CHARS - 3).collect();
        format!("{cut}...")
    } else {
        seen
    })
}

/// The longest presence, in characters, an answer by SMS repeats.
const SEEN_CHARS: usize = 60;

/// Sets the phone's local state. The user chose it today, so no prompt for one is needed.
fn set_state(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    state: LocalState,
    out: &mut Out,
) -> Result<(), StoreError> {
    set_phone(core, store, now, user, out, |t| {
        t.state = state;
        t.prompted_day = Some(day(now));
    })
}

/// The commands about presence that carry a JID: `/approve JID`, `/deny JID` (a subscription
/// request), `/alert [JID]` and `/noalert JID` (buddy alerts on this phone). `None`: not one of
/// them. Read here rather than in `crate::sms::text` because they answer with the user's data.
fn on_presence_command(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    text: &str,
    out: &mut Out,
) -> Result<Option<String>, StoreError> {
    let Some(line) = text.trim().strip_prefix('/') else {
        return Ok(None);
    };
    let (name, args) = match line.find(char::is_whitespace) {
        Some(end) => (&line[..end], line[end..].trim()),
        None => (line, ""),
    };
    let said = match name.to_lowercase().as_str() {
        "approve" => super::presence::answer_request(core, store, user, args, true, out)?,
        "deny" => super::presence::answer_request(core, store, user, args, false, out)?,
        "alert" | "alerts" if args.is_empty() => {
            let listed = user
                .phone
                .as_ref()
                .map(|t| t.prefs.alert_buddies.join(", "))
                .unwrap_or_default();
            if listed.is_empty() {
                "No alerts. /alert JID tells you here when that buddy comes online or goes offline."
                    .to_owned()
            } else {
                format!("Alerts here for: {listed}")
            }
        }
        "alert" | "alerts" | "noalert" => {
            let buddy = match jid::Jid::new(args) {
                Ok(jid) if jid.node().is_some() => jid.to_bare().to_string(),
                _ => return Ok(Some(format!("Reach: '{args}' is not an XMPP address."))),
            };
            let add = !name.eq_ignore_ascii_case("noalert");
            set_phone(core, store, now, user, out, |t| {
                let list = &mut t.prefs.alert_buddies;
                list.retain(|b| !b.eq_ignore_ascii_case(&buddy));
                if add {
                    list.push(buddy.clone());
                }
            })?;
            if add {
                format!("{buddy} coming online or going offline will be told here.")
            } else {
                format!("No more alerts about {buddy}.")
            }
        }
        _ => return Ok(None),
    };
    Ok(Some(if said.starts_with("Reach") {
        said
    } else {
        format!("Reach: {said}")
    }))
}

fn on_command(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    command: Command,
    out: &mut Out,
) -> Result<Option<String>, StoreError> {
    Ok(Some(match command {
        Command::Help => HELP.to_owned(),
        Command::Who => {
            let online: Vec<String> = store
                .buddies(&user.handle)?
                .into_iter()
                .filter(|(_, b)| b.online)
                .map(|(jid, _)| jid)
                .collect();
            if online.is_empty() {
                "Reach: no buddies online.".to_owned()
            } else {
                format!("Online: {}", online.join(", "))
            }
        }
        Command::Away(_) => {
            set_state(core, store, now, user, LocalState::Away, out)?;
            format!(
                "Reach: phone set to away. Buddies see you: {}.",
                seen_by_buddies(core, store, user)?
            )
        }
        Command::Back => {
            set_state(core, store, now, user, LocalState::Available, out)?;
            format!(
                "Reach: phone set to available. Buddies see you: {}.",
                seen_by_buddies(core, store, user)?
            )
        }
        Command::Dnd(_) => {
            set_state(core, store, now, user, LocalState::Dnd, out)?;
            format!(
                "Reach: do not disturb. Nothing is forwarded to this phone until /back. \
                 Buddies see you: {}.",
                seen_by_buddies(core, store, user)?
            )
        }
        Command::Status => {
            let state = user
                .phone
                .as_ref()
                .map_or(LocalState::Available, |t| t.state);
            format!(
                "Reach: {} phone {}; buddies see: {}. {} held, {} SMS today.",
                super::integrated::public_address(core, store, user)?,
                super::settings::state_word(state),
                seen_by_buddies(core, store, user)?,
                store.held_count(&user.jid)?,
                store.sms_count(&user.jid, day(now))?
            )
        }
        Command::Msg { peer, text } => {
            return send_to_named(core, store, now, user, &peer, &text, out)
        }
        Command::Verify(code) => {
            super::commands::check_guess(core, store, now, user, &code, None, out)?
                .unwrap_or_else(|| "Reach: nothing to verify.".to_owned())
        }
        Command::Unknown(name) => format!("Reach: unknown command /{name}. Text /help."),
    }))
}

/// The user's conversations and buddies, as candidates for `@name` and `/msg`.
fn conversations(
    store: &mut dyn Transaction,
    user: &User,
) -> Result<Vec<Conversation>, StoreError> {
    let mut list: Vec<Conversation> = store
        .sessions(&user.jid)?
        .into_iter()
        .map(|s| Conversation {
            peer: s.peer,
            name: s.peer_name,
            last_active: s.last_active,
        })
        .collect();
    for (buddy, _) in store.buddies(&user.handle)? {
        if !list.iter().any(|c| c.peer == buddy) {
            list.push(Conversation {
                peer: buddy,
                name: None,
                last_active: 0,
            });
        }
    }
    Ok(list)
}

fn send_to_named(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    target: &str,
    text: &str,
    out: &mut Out,
) -> Result<Option<String>, StoreError> {
    let conversations = conversations(store, user)?;
    let peer = match text::find_target(target, &conversations) {
        Target::Found(c) => c.peer.clone(),
        Target::Ambiguous(matches) => return Ok(Some(text::usage_for_ambiguous(&matches))),
        Target::Unknown => match jid::BareJid::new(target) {
            Ok(jid) if jid.node().is_some() => jid.to_string(),
            _ => {
                return Ok(Some(format!(
                    "Reach: no chat with \"{target}\". Use @name or /msg user@server text."
                )))
            }
        },
    };
    send_im(core, store, now, user, &peer, text, out)?;
    Ok(None)
}

/// The user's text from the phone, to the peer from the reach address, in the conversation.
fn send_im(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    peer: &str,
    text: &str,
    out: &mut Out,
) -> Result<(), StoreError> {
    let session = store.touch_session(&user.jid, peer, now)?;
    let mut message = chat(&core.reach_address(&user.handle), peer, text);
    message.set_attr(NONE, an("id"), reference(core));
    if let Some(thread) = &session.thread {
        message.append_child(
            Element::builder("thread", STANZA_NS)
                .append(thread.as_str())
                .build(),
        );
    }
    super::integrated::send_as_user(core, store, user, message, out)?;
    forward::cancel_pending(store, user, peer)?;
    tracing::debug!(handle = user.handle.as_str(), "SMS reply relayed");
    Ok(())
}

/// A delivery report: delivered becomes the receipt the buddy asked for; failed tells the buddy
/// and keeps the message for the user's XMPP client.
pub(super) fn on_delivery(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    report: &DeliveryReport,
    out: &mut Out,
) -> Result<WebhookAnswer, StoreError> {
    match &report.status {
        DeliveryStatus::Pending => {}
        DeliveryStatus::Delivered => {
            if let Some(sent) = store.take_sent_sms(&report.reference)? {
                let Some(user) = store.user(&sent.user)? else {
                    return Ok(WebhookAnswer::Accepted);
                };
                for item in sent.items.iter().filter(|i| i.receipt) {
                    if let Some(id) = &item.id {
                        let mut receipt = crate::xmpp::stanza::stanza(
                            "message",
                            &core.reach_address(&user.handle),
                            &sent.peer,
                        );
                        receipt.append_child(
                            Element::builder("received", xmpp_parsers::ns::RECEIPTS)
                                .attr(an("id"), id.as_str())
                                .build(),
                        );
                        super::integrated::send_as_user(core, store, &user, receipt, out)?;
                    }
                }
            }
        }
        DeliveryStatus::Failed(reason) => {
            if let Some(sent) = store.take_sent_sms(&report.reference)? {
                undelivered(
                    core,
                    store,
                    now,
                    &sent.user,
                    &sent.peer,
                    &sent.items,
                    reason,
                    out,
                )?;
            }
        }
    }
    Ok(WebhookAnswer::Accepted)
}

/// The provider refused an SMS for good.
pub(super) fn on_failed(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    job: &SmsJob,
    reason: &str,
    out: &mut Out,
) -> Result<(), StoreError> {
    store.take_sent_sms(&job.reference)?;
    match &job.peer {
        Some(peer) => undelivered(core, store, now, &job.user, peer, &job.items, reason, out),
        None => Ok(()),
    }
}

#[allow(clippy::too_many_arguments)]
fn undelivered(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    jid: &str,
    peer: &str,
    items: &[PendingItem],
    reason: &str,
    out: &mut Out,
) -> Result<(), StoreError> {
    tracing::warn!("an SMS could not be delivered; its messages wait for XMPP");
    tracing::debug!(reason, "provider's answer");
    let Some(user) = store.user(jid)? else {
        return Ok(());
    };
    forward::undelivered(core, store, now, &user, peer, items, "SMS", out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::Terminal;
    use crate::core::testing::*;
    use crate::core::Event;
    #[allow(unused_imports)]
    use crate::core::Transaction;
    use crate::xmpp::stanza::child_text;

    const BOB: &str = "bob@example.net";
    const ALICE: &str = "alice@example.org";
    const PHONE: &str = "+15551234567";

    fn alice_with_phone(t: &Harness) {
        t.run(&register_form(ALICE, "alice", "", PHONE));
        let mut user = t.store.tx().user(ALICE).unwrap().unwrap();
        user.phone = Some(Terminal {
            verified: true,
            ..Terminal::unverified(user.phone.unwrap().address)
        });
        t.store.tx().put_user(&user).unwrap();
    }

    fn from_bob(t: &Harness, id: &str, body: &str) {
        t.run(&format!(
            "<message type='chat' id='{id}' from='{BOB}/pc' to='alice@{D}'><body>{body}</body><request xmlns='urn:xmpp:receipts'/></message>"
        ));
    }

    fn texts(actions: Vec<Action>) -> Vec<SmsJob> {
        actions
            .into_iter()
            .filter_map(|a| match a {
                Action::SendSms(job) => Some(*job),
                _ => None,
            })
            .collect()
    }

    fn tick(t: &Harness) -> Vec<SmsJob> {
        texts(t.actions(Event::Tick))
    }

    /// The first forward of the day: the prompt for a local state, then the messages.
    fn first_tick(t: &Harness) -> Vec<SmsJob> {
        let mut sms = tick(t);
        assert_eq!(sms.first().map(|s| s.text.as_str()), Some(PROMPT));
        sms.remove(0);
        sms
    }

    fn text_in(t: &Harness, text: &str) -> (Vec<SmsJob>, Vec<Element>) {
        let actions = t.actions(Event::SmsReceived(IncomingSms {
            from: PHONE.into(),
            to: "+15550000000".into(),
            text: text.into(),
            provider_id: None,
        }));
        let stanzas = actions
            .iter()
            .filter_map(|a| match a {
                Action::SendStanza(s) => Some(s.clone()),
                _ => None,
            })
            .collect();
        assert!(actions.contains(&Action::AnswerWebhook(WebhookAnswer::Accepted)));
        (texts(actions), stanzas)
    }

    #[test]
    fn an_offline_users_messages_go_to_the_phone_one_sms_each_the_first_with_a_hint() {
        let t = Harness::new();
        alice_with_phone(&t);
        from_bob(&t, "m1", "Hi Alice");
        from_bob(&t, "m2", "Lunch?");
        let sms = first_tick(&t);
        assert_eq!(sms.len(), 2);
        assert_eq!(sms[0].to, PHONE);
        assert!(
            sms[0].text.starts_with("bob: Hi Alice\n"),
            "{}",
            sms[0].text
        );
        assert!(sms[0].text.contains("Reply to answer bob"));
        assert_eq!(sms[1].text, "bob: Lunch?");
        assert!(tick(&t).is_empty());
        // Later forwards that day are not prompted again.
        from_bob(&t, "m3", "Still there?");
        assert_eq!(tick(&t).len(), 1);
    }

    #[test]
    fn the_prompt_comes_once_a_day_and_not_after_the_user_chose_a_state() {
        let t = Harness::new();
        alice_with_phone(&t);
        from_bob(&t, "m1", "one");
        assert_eq!(first_tick(&t).len(), 1);
        // Alice comes back to XMPP and leaves again: same day, no second prompt.
        t.run(&format!("<presence from='{ALICE}/pc' to='{D}'/>"));
        t.run(&format!(
            "<presence type='unavailable' from='{ALICE}/pc' to='{D}'/>"
        ));
        from_bob(&t, "m2", "two");
        assert_eq!(tick(&t).len(), 1);
        // The next day forwarding starts with a prompt again...
        t.advance(86_400);
        from_bob(&t, "m3", "three");
        assert_eq!(first_tick(&t).len(), 1);
        // ...unless the user already set the phone's state that day.
        t.advance(86_400);
        text_in(&t, "/away");
        from_bob(&t, "m4", "four");
        let sms = tick(&t);
        assert_eq!(sms.len(), 1);
        assert_eq!(sms[0].text, "bob: four");
        // A prompt is not worth the last SMS of the day: the message takes it.
        let t = Harness::new();
        alice_with_phone(&t);
        for _ in 0..3 {
            t.store.tx().count_sms(ALICE, t.now.get() / 86_400).unwrap();
        }
        from_bob(&t, "m1", "last one");
        let sms = tick(&t);
        assert_eq!(sms.len(), 1);
        assert!(sms[0].text.starts_with("bob: last one"));
    }

    #[test]
    fn the_daily_cap_keeps_further_messages_for_xmpp() {
        let t = Harness::new();
        alice_with_phone(&t);
        // The verification code sent at registration counts too, and so does the prompt.
        let already = t.store.tx().sms_count(ALICE, t.now.get() / 86_400).unwrap() as usize;
        assert_eq!(already, 1);
        for i in 0..7 {
            from_bob(&t, &format!("m{i}"), "x");
        }
        assert_eq!(first_tick(&t).len(), 5 - already - 1);
        assert_eq!(
            t.store.tx().held_count(ALICE).unwrap(),
            7 - (5 - already - 1)
        );
        t.advance(86_400);
        from_bob(&t, "next-day", "y");
        assert_eq!(first_tick(&t).len(), 1);
    }

    #[test]
    fn a_text_back_reaches_the_most_recent_conversation() {
        let t = Harness::new();
        alice_with_phone(&t);
        t.run(&format!("<message type='chat' id='c1' from='carol@example.net/x' to='alice@{D}'><body>hey</body></message>"));
        tick(&t);
        t.advance(5);
        from_bob(&t, "m1", "Hi");
        tick(&t);
        let (sms, im) = text_in(&t, "Sure, see you");
        assert!(sms.is_empty());
        assert_eq!(im.len(), 1);
        assert_eq!(im[0].attr("to"), Some(BOB));
        assert_eq!(im[0].attr("from"), Some(&*format!("alice@{D}")));
        assert_eq!(child_text(&im[0], "body").as_deref(), Some("Sure, see you"));
        let (_, im) = text_in(&t, "@carol hello you");
        assert_eq!(im[0].attr("to"), Some("carol@example.net"));
        let (_, im) = text_in(&t, "/msg bob again");
        assert_eq!(im[0].attr("to"), Some(BOB));
        assert_eq!(child_text(&im[0], "body").as_deref(), Some("again"));
        let (sms, im) = text_in(&t, "@zed who?");
        assert!(im.is_empty());
        assert!(sms[0].text.contains("no chat with"), "{}", sms[0].text);
    }

    #[test]
    fn stop_and_start_are_always_honoured() {
        let t = Harness::new();
        alice_with_phone(&t);
        let (sms, _) = text_in(&t, "STOP");
        assert!(sms[0].text.contains("no more SMS"));
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
        from_bob(&t, "m1", "are you there?");
        assert!(tick(&t).is_empty());
        assert_eq!(t.store.tx().held_count(ALICE).unwrap(), 1);
        let (sms, _) = text_in(&t, "start");
        assert!(sms[0].text.contains("resumed"));
        from_bob(&t, "m2", "now?");
        assert_eq!(first_tick(&t).len(), 1);
    }

    #[test]
    fn local_states_who_and_unknown_numbers() {
        let t = Harness::new();
        alice_with_phone(&t);
        t.run(&format!(
            "<presence type='subscribe' from='{BOB}' to='alice@{D}'/>"
        ));
        t.run(&format!("<presence from='{BOB}/pc' to='alice@{D}'/>"));
        let (sms, _) = text_in(&t, "/who");
        assert!(sms[0].text.contains(BOB), "{}", sms[0].text);
        text_in(&t, "/dnd");
        from_bob(&t, "m1", "psst");
        assert!(tick(&t).is_empty(), "do not disturb");
        text_in(&t, "/back");
        from_bob(&t, "m2", "psst");
        assert_eq!(tick(&t).len(), 1);
        let actions = t.actions(Event::SmsReceived(IncomingSms {
            from: "+15559999999".into(),
            to: "+15550000000".into(),
            text: "hello".into(),
            provider_id: None,
        }));
        assert_eq!(
            actions,
            vec![Action::AnswerWebhook(WebhookAnswer::Accepted)]
        );
    }

    #[test]
    fn alerts_are_chosen_from_the_phone() {
        let t = Harness::new();
        alice_with_phone(&t);
        let alerts = || {
            t.store
                .tx()
                .user(ALICE)
                .unwrap()
                .unwrap()
                .phone
                .unwrap()
                .prefs
                .alert_buddies
        };
        let said = |text: &str| text_in(&t, text).0[0].text.clone();
        assert!(said("/alert").starts_with("Reach: No alerts."));
        assert_eq!(
            said("/alert Bob@Example.net"),
            "Reach: bob@example.net coming online or going offline will be told here."
        );
        assert_eq!(
            said("/alert bob@example.net"),
            "Reach: bob@example.net coming online or going offline will be told here."
        );
        assert_eq!(alerts(), vec![BOB.to_owned()]);
        assert_eq!(said("/alerts"), "Reach: Alerts here for: bob@example.net");
        // Answers count towards the daily cap (5 here): the rest is said on another day.
        t.advance(86_400);
        assert_eq!(
            said("/noalert bob@example.net"),
            "Reach: No more alerts about bob@example.net."
        );
        assert!(alerts().is_empty());
        assert_eq!(
            said("/alert not a jid"),
            "Reach: 'not a jid' is not an XMPP address."
        );
    }

    #[test]
    fn a_phone_is_verified_by_texting_the_code_back() {
        let t = Harness::new();
        let sms = texts(
            t.actions(Event::Stanza(
                register_form(ALICE, "alice", "", PHONE)
                    .replacen(
                        "<iq ",
                        &format!("<iq xmlns='{}' ", crate::xmpp::stanza::STANZA_NS),
                        1,
                    )
                    .parse()
                    .unwrap(),
            )),
        );
        assert_eq!(sms.len(), 1);
        let code = t
            .store
            .tx()
            .verification(ALICE, TerminalKind::Phone)
            .unwrap()
            .unwrap()
            .code;
        assert!(sms[0].text.contains(&code));
        // Not verified yet: a text that is not the code is ignored.
        let (sms, im) = text_in(&t, "hello");
        assert!(sms.is_empty() && im.is_empty());
        let (sms, im) = text_in(&t, &code);
        assert!(sms[0].text.contains("is verified"), "{}", sms[0].text);
        assert!(child_text(&im[0], "body").unwrap().contains("is verified"));
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
    fn a_text_retried_by_the_provider_is_taken_once() {
        let t = Harness::new();
        alice_with_phone(&t);
        from_bob(&t, "m1", "Hi");
        tick(&t);
        let sms = || {
            Event::SmsReceived(IncomingSms {
                from: PHONE.into(),
                to: "+15550000000".into(),
                text: "once".into(),
                provider_id: Some("kannel-7".into()),
            })
        };
        assert_eq!(t.event(sms()).len(), 1);
        assert!(
            t.event(sms()).is_empty(),
            "the retry is accepted and dropped"
        );
    }

    #[test]
    fn numbers_outside_the_allowed_countries_are_refused_at_registration() {
        let t = Harness::new();
        let reply = t.one(&register_form(ALICE, "alice", "", "+33612345678"));
        assert_error(&reply, "not-acceptable");
        assert!(
            error_text(&reply).starts_with("phone"),
            "{}",
            error_text(&reply)
        );
    }

    #[test]
    fn delivery_reports_become_receipts_or_errors() {
        let t = Harness::new();
        alice_with_phone(&t);
        from_bob(&t, "m1", "one");
        from_bob(&t, "m2", "two");
        let sms = first_tick(&t);
        let delivered = t.event(Event::SmsDelivery(DeliveryReport {
            reference: sms[0].reference.clone(),
            status: DeliveryStatus::Delivered,
        }));
        assert_eq!(delivered.len(), 1);
        assert_eq!(delivered[0].attr("to"), Some(BOB));
        let received = delivered[0]
            .get_child("received", xmpp_parsers::ns::RECEIPTS)
            .unwrap();
        assert_eq!(received.attr("id"), Some("m1"));
        let failed = t.event(Event::SmsDelivery(DeliveryReport {
            reference: sms[1].reference.clone(),
            status: DeliveryStatus::Failed("rejected by the carrier".into()),
        }));
        assert_eq!(failed[0].attr("type"), Some("error"));
        assert_eq!(failed[0].attr("id"), Some("m2"));
        assert_eq!(t.store.tx().held_count(ALICE).unwrap(), 1);
    }
}
