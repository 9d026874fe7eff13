//! The email terminal's decisions: when a message is forwarded by email, what the email says,
//! reply aliases, verification of email addresses, and whether an inbound reply is accepted.
//!
//! The email adapters (listener, relay, MIME) carry these decisions out; nothing here speaks SMTP
//! or MIME, except the reply codes the listener gives back, which are decided here because this
//! is where an alias or a sender is understood.

use minidom::Element;
use rand::Rng;
use sha2::{Digest, Sha256};

use super::{presence, Core, Out};
use crate::core::model::{
    Alias, AliasPurpose, EmailJob, Pending, StoreError, TerminalKind, User, Verification,
};
use crate::core::Transaction;
use crate::email::extract::{Automatic, Reply};
use crate::email::message::OutgoingEmail;
use crate::xmpp::stanza::{chat, STANZA_NS};

/// How long a verification code is valid.
pub const CODE_VALIDITY_SECS: u64 = 600;
/// How many wrong codes end a verification.
pub const CODE_TRIES: u8 = 5;

/// The email terminal's settings (from `[email]` and `[routing]`).
#[derive(Debug, Clone)]
pub struct EmailSettings {
    /// Envelope sender of every mail.
    pub from_address: String,
    /// "Bob via NAME".
    pub from_name: String,
    /// Domain of the reply aliases.
    pub reply_domain: String,
    pub digest_window_secs: u64,
    pub alias_idle_secs: u64,
}

/// A decision on an SMTP command, as the listener will send it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SmtpAnswer {
    pub code: u16,
    pub enhanced: &'static str,
    pub text: String,
}

impl SmtpAnswer {
    fn new(code: u16, enhanced: &'static str, text: impl Into<String>) -> Self {
        SmtpAnswer {
            code,
            enhanced,
            text: text.into(),
        }
    }

    fn accepted(text: impl Into<String>) -> Self {
        Self::new(250, "2.0.0", text)
    }

    pub fn is_positive(&self) -> bool {
        self.code < 400
    }
}

/// A reply that reached the listener and was read.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct InboundMail {
    /// The envelope sender (`""` for the null sender of bounces).
    pub envelope_from: String,
    /// The accepted recipient (a reply alias).
    pub rcpt: String,
    pub reply: Reply,
}

/// A fresh random token: 160 bits, lowercase base32 (no padding), 32 characters.
fn new_token(core: &Core) -> String {
    let bytes: [u8; 20] = core.rng().gen();
    data_encoding::BASE32_NOPAD
        .encode(&bytes)
        .to_ascii_lowercase()
}

/// The stored form of a token: its SHA-256. A leaked store does not yield working aliases.
pub fn token_hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.to_ascii_lowercase().as_bytes()).into()
}

/// The token of an alias address `r-TOKEN@reply_domain`, if it is one.
pub fn token_of(address: &str, reply_domain: &str) -> Option<String> {
    let (local, domain) = address.rsplit_once('@')?;
    if !domain.eq_ignore_ascii_case(reply_domain) {
        return None;
    }
    let token = local
        .strip_prefix("r-")
        .or_else(|| local.strip_prefix("R-"))?;
    let valid = token.len() == 32 && token.chars().all(|c| c.is_ascii_alphanumeric());
    valid.then(|| token.to_ascii_lowercase())
}

fn settings(core: &Core) -> Option<&EmailSettings> {
    core.settings.email.as_ref()
}

/// Whether Reach may forward to the user's email now.
pub(super) fn can_forward(core: &Core, user: &User) -> bool {
    settings(core).is_some() && user.email.as_ref().is_some_and(|t| t.usable())
}

/// The email carrying a conversation's pending messages, with a fresh reply alias.
pub(super) fn forward_job(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    pending: Pending,
) -> Result<Option<EmailJob>, StoreError> {
    // The decision checked both; if either went away meanwhile, the messages wait for XMPP.
    let (Some(settings), Some(terminal)) = (settings(core), user.email.as_ref()) else {
        super::forward::hold_for_xmpp(store, now, &user.jid, &pending.peer, &pending.items)?;
        return Ok(None);
    };
    let to = terminal.address.as_str().to_owned();
    let peer = pending.peer.clone();
    let alias = new_alias(
        core,
        store,
        now,
        AliasPurpose::Session {
            user: user.jid.clone(),
            peer: peer.clone(),
        },
    )?;
    let message_id = format!("{}@{}", new_token(core), settings.reply_domain);

    let mut session = store.touch_session(&user.jid, &peer, now)?;
    let in_reply_to = session.email_last.clone();
    let references: Vec<String> = session
        .email_root
        .iter()
        .chain(session.email_last.iter())
        .cloned()
        .collect();
    let mut references = references;
    references.dedup();
    session.email_root.get_or_insert_with(|| message_id.clone());
    session.email_last = Some(message_id.clone());
    store.put_session(&user.jid, &session)?;

    let name = peer_name(session.peer_name.as_deref(), &peer);
    let email = OutgoingEmail {
        from_name: format!("{name} via {}", settings.from_name),
        from_address: alias,
        to,
        subject: format!("IM from {name} ({peer})"),
        message_id,
        in_reply_to,
        references,
        paragraphs: pending.items.iter().map(|i| i.text.clone()).collect(),
        footer: format!(
            "Reply to this email to answer {name}: your reply reaches {peer} from {}. \
             Only replies from this address are accepted.{}",
            super::integrated::public_address(core, store, user)?,
            presence::email_prompt(core, store, now, user)?
        ),
    };
    Ok(Some(EmailJob {
        user: user.jid.clone(),
        peer: Some(peer),
        envelope_from: settings.from_address.clone(),
        email,
        items: pending.items,
        attempts: 0,
        next_attempt_at: now,
        queued_at: now,
        claimed_by: None,
    }))
}

/// A buddy's display name: their nick, else the local part of their JID.
pub(super) fn peer_name(nick: Option<&str>, peer: &str) -> String {
    let cleaned: Option<String> = nick.map(|n| {
        n.chars()
            .filter(|c| !c.is_control())
            .collect::<String>()
            .trim()
            .to_owned()
    });
    match cleaned {
        Some(n) if !n.is_empty() => n.chars().take(64).collect(),
        _ => peer.split('@').next().unwrap_or(peer).to_owned(),
    }
}

fn new_alias(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    purpose: AliasPurpose,
) -> Result<String, StoreError> {
    let Some(settings) = settings(core) else {
        // Only called with email configured; an alias without a domain would be useless.
        return Ok(String::new());
    };
    let token = new_token(core);
    store.put_alias(
        &token_hash(&token),
        &Alias {
            purpose,
            created: now,
            last_used: now,
        },
    )?;
    Ok(format!("r-{token}@{}", settings.reply_domain))
}

/// Starts (or restarts) the verification of the user's email address: a code by email, which the
/// user confirms with `verify CODE`, or by replying to that email. Returns what to tell the user.
pub(super) fn start_verification(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    out: &mut Out,
) -> Result<Option<String>, StoreError> {
    let (Some(settings), Some(terminal)) = (settings(core), user.email.as_ref()) else {
        return Ok(None);
    };
    if terminal.verified {
        return Ok(None);
    }
    let address = terminal.address.as_str().to_owned();
    if let Some(note) = super::limits::take_code(
        &core.settings.limits,
        store,
        now,
        &user.jid,
        TerminalKind::Email,
        &address,
    )? {
        return Ok(Some(note));
    }
    let code = format!("{:06}", core.rng().gen_range(0..1_000_000u32));
    store.put_verification(
        &user.jid,
        &Verification {
            kind: TerminalKind::Email,
            address: address.clone(),
            code: code.clone(),
            expires_at: now + CODE_VALIDITY_SECS,
            tries_left: CODE_TRIES,
        },
    )?;
    let alias = new_alias(
        core,
        store,
        now,
        AliasPurpose::Verify {
            user: user.jid.clone(),
            address: address.clone(),
        },
    )?;
    let service = &core.settings.domain;
    let email = OutgoingEmail {
        from_name: settings.from_name.clone(),
        from_address: alias,
        to: address.clone(),
        subject: format!("Your {} verification code is {code}", settings.from_name),
        message_id: format!("{}@{}", new_token(core), settings.reply_domain),
        in_reply_to: None,
        references: Vec::new(),
        paragraphs: vec![
            format!(
                "{} asked to receive the messages of the reach address {} at this email address while away from XMPP.",
                user.jid,
                core.reach_address(&user.handle)
            ),
            format!(
                "To confirm, simply reply to this email, or send \"verify {code}\" in a chat with {service}. \
                 The code is valid for {} minutes.",
                CODE_VALIDITY_SECS / 60
            ),
        ],
        footer: "If this was not you, ignore this email: nothing else will be sent to this address.".to_owned(),
    };
    out.push(super::Action::SendEmail(Box::new(EmailJob {
        user: user.jid.clone(),
        peer: None,
        envelope_from: settings.from_address.clone(),
        email,
        items: Vec::new(),
        attempts: 0,
        next_attempt_at: now,
        queued_at: now,
        claimed_by: None,
    })));
    Ok(Some(format!(
        "A verification code is on its way to {address}. Reply to that email, or send \"verify CODE\" here."
    )))
}

/// The user proved they read `address`: it becomes their email terminal.
pub(super) fn confirm_email(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    address: &str,
    out: &mut Out,
) -> Result<String, StoreError> {
    let mut user = user.clone();
    let Some(terminal) = user
        .email
        .as_mut()
        .filter(|t| t.address.as_str() == address)
    else {
        return Ok("That code was for an address you no longer use.".to_owned());
    };
    terminal.verified = true;
    terminal.failing = false;
    store.put_user(&user)?;
    store.remove_verification(&user.jid, TerminalKind::Email)?;
    tracing::info!(handle = user.handle.as_str(), "email terminal verified");
    // What was held while there was no terminal goes out the usual way.
    if !presence::xmpp_presence(store, &user)?.is_available() {
        super::forward::forward_held(core, store, now, &user, out)?;
    }
    presence::refresh_global(core, store, now, &user, out)?;
    Ok(format!(
        "Your email address {address} is verified. Reach forwards messages there while you are away from XMPP."
    ))
}

/// RCPT TO: is this a live alias, and may this envelope sender write to it?
pub fn check_recipient(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    envelope_from: &str,
    rcpt: &str,
) -> Result<SmtpAnswer, StoreError> {
    let unknown = || {
        SmtpAnswer::new(
            550,
            "5.1.1",
            "no such reply address here (it may have expired)",
        )
    };
    let Some(settings) = settings(core) else {
        return Ok(unknown());
    };
    let Some(token) = token_of(rcpt, &settings.reply_domain) else {
        return Ok(unknown());
    };
    let Some((alias, user)) = live_alias(core, store, now, &token)? else {
        return Ok(unknown());
    };
    if !envelope_from.is_empty() && !sender_may_use(&alias.purpose, &user, envelope_from) {
        return Ok(SmtpAnswer::new(
            550,
            "5.7.1",
            "this reply address takes mail from its owner's address only",
        ));
    }
    Ok(SmtpAnswer::new(250, "2.1.5", "recipient ok"))
}

fn live_alias(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    token: &str,
) -> Result<Option<(Alias, User)>, StoreError> {
    let Some(settings) = settings(core) else {
        return Ok(None);
    };
    let hash = token_hash(token);
    let Some(alias) = store.alias(&hash)? else {
        return Ok(None);
    };
    if alias.last_used + settings.alias_idle_secs < now {
        store.remove_alias(&hash)?;
        return Ok(None);
    }
    let Some(user) = store.user(alias.purpose.user())? else {
        return Ok(None);
    };
    Ok(Some((alias, user)))
}

fn same_address(a: &str, b: &str) -> bool {
    a.trim().eq_ignore_ascii_case(b.trim())
}

fn sender_may_use(purpose: &AliasPurpose, user: &User, sender: &str) -> bool {
    match purpose {
        AliasPurpose::Verify { address, .. } => same_address(address, sender),
        AliasPurpose::Session { .. } => user
            .email
            .as_ref()
            .is_some_and(|t| t.verified && same_address(t.address.as_str(), sender)),
    }
}

/// The one reply to DATA for a mail with several recipients, from each recipient's answer (in
/// RCPT order). SMTP without LMTP answers DATA once for all recipients, so:
/// - every recipient took it (or had it already): 250;
/// - any recipient failed for now (4xx): that 4xx, so the client sends the whole mail again
///   later; recipients that took it already answer "already delivered" to the resend (the
///   Message-ID is remembered per alias) and are not given it twice;
/// - some took it and the others refused it for good (5xx): the first 5xx, its text saying which
///   recipients refused it and that the others have it. The sender's MTA turns that into a bounce
///   for the user, which is the only way left to tell them (per-recipient refusals belong at
///   RCPT, and the reasons found only in the message, like an empty reply, are known only now);
/// - none took it: the first refusal, as it is.
pub fn answer_for_recipients(answers: &[(String, SmtpAnswer)]) -> SmtpAnswer {
    let taken = answers.iter().filter(|(_, a)| a.is_positive()).count();
    if answers.len() == 1 || taken == answers.len() {
        return match answers {
            [(_, only)] => only.clone(),
            _ => SmtpAnswer::accepted(format!("delivered to {taken} conversations")),
        };
    }
    let refused = |failed: &dyn Fn(&SmtpAnswer) -> bool| -> Option<(SmtpAnswer, String)> {
        let mut first = None;
        let mut who = Vec::new();
        for (rcpt, answer) in answers.iter().filter(|(_, a)| failed(a)) {
            first.get_or_insert_with(|| answer.clone());
            who.push(rcpt.as_str());
        }
        first.map(|f| (f, who.join(", ")))
    };
    if let Some((first, who)) = refused(&|a| (400..500).contains(&a.code)) {
        return SmtpAnswer::new(
            first.code,
            first.enhanced,
            format!(
                "not taken for {who} for now ({}); send it again later: the recipients that took it will not get it twice",
                first.text
            ),
        );
    }
    let Some((first, who)) = refused(&|a| !a.is_positive()) else {
        return SmtpAnswer::accepted(format!("delivered to {taken} conversations"));
    };
    if taken == 0 {
        return first;
    }
    SmtpAnswer::new(
        first.code,
        first.enhanced,
        format!(
            "refused for {who}: {}; delivered to the other {taken} recipient(s)",
            first.text
        ),
    )
}

/// DATA: a read reply. Accepted (250) only once what it leads to is stored, which the caller
/// guarantees by committing before it answers.
pub(super) fn on_reply(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    mail: &InboundMail,
    out: &mut Out,
) -> Result<SmtpAnswer, StoreError> {
    let unknown = SmtpAnswer::new(
        550,
        "5.1.1",
        "no such reply address here (it may have expired)",
    );
    let Some(settings) = settings(core) else {
        return Ok(unknown);
    };
    let Some(token) = token_of(&mail.rcpt, &settings.reply_domain) else {
        return Ok(unknown);
    };
    let Some((alias, user)) = live_alias(core, store, now, &token)? else {
        return Ok(unknown);
    };

    // Bounces and automatic replies never become messages.
    let bounce = mail.envelope_from.is_empty()
        || matches!(
            mail.reply.automatic,
            Some(Automatic::Bounce | Automatic::MailerDaemon)
        );
    if bounce {
        if let Some(mut failing) = store.user(&user.jid)? {
            if let Some(t) = failing.email.as_mut() {
                t.failing = true;
            }
            store.put_user(&failing)?;
            // A failing address cannot reach the user: buddies see what is left.
            super::presence::refresh_global(core, store, now, &failing, out)?;
        }
        tracing::info!(
            handle = user.handle.as_str(),
            "a bounce came back: email terminal marked failing"
        );
        return Ok(SmtpAnswer::accepted("bounce noted"));
    }
    if mail.reply.automatic.is_some() {
        tracing::debug!(handle = user.handle.as_str(), "automatic reply ignored");
        return Ok(SmtpAnswer::accepted("automatic reply ignored"));
    }
    let from_ok = mail
        .reply
        .from
        .as_deref()
        .is_some_and(|f| same_address(f, &mail.envelope_from));
    if !sender_may_use(&alias.purpose, &user, &mail.envelope_from) || !from_ok {
        return Ok(SmtpAnswer::new(
            550,
            "5.7.1",
            "this reply address takes mail from its owner's address only",
        ));
    }
    // Checked before the Message-ID is recorded: a refused mail leaves nothing behind, so the
    // same mail corrected and resent is taken.
    if matches!(alias.purpose, AliasPurpose::Session { .. }) && mail.reply.text.trim().is_empty() {
        return Ok(SmtpAnswer::new(
            550,
            "5.6.0",
            "no reply text found above the quoted message",
        ));
    }
    let hash = token_hash(&token);
    // One mail to several aliases is one delivery per alias (per conversation); the same mail
    // resent to an alias that already took it is accepted and not delivered again.
    if let Some(id) = &mail.reply.message_id {
        if !store.first_sight_of_mail(id, &hash, now)? {
            return Ok(SmtpAnswer::accepted("already delivered"));
        }
    }
    store.put_alias(
        &hash,
        &Alias {
            last_used: now,
            ..alias.clone()
        },
    )?;
    match alias.purpose {
        AliasPurpose::Verify { address, .. } => {
            let said = confirm_email(core, store, now, &user, &address, out)?;
            out.send(chat(&core.settings.domain, &user.jid, &said));
            Ok(SmtpAnswer::accepted("address verified"))
        }
        AliasPurpose::Session { peer, .. } => {
            let text = mail.reply.text.trim();
            let mut session = store.touch_session(&user.jid, &peer, now)?;
            let mut message = chat(&core.reach_address(&user.handle), &peer, text);
            message.set_attr(
                crate::xmpp::stanza::NONE,
                crate::xmpp::stanza::an("id"),
                new_token(core),
            );
            if let Some(thread) = &session.thread {
                message.append_child(
                    Element::builder("thread", STANZA_NS)
                        .append(thread.as_str())
                        .build(),
                );
            }
            super::integrated::send_as_user(core, store, &user, message, out)?;
            if let Some(id) = &mail.reply.message_id {
                session.email_last = Some(id.clone());
            }
            store.put_session(&user.jid, &session)?;
            super::forward::cancel_pending(store, &user, &peer)?;
            if let Some(mut fresh) = store.user(&user.jid)? {
                if let Some(t) = fresh.email.as_mut().filter(|t| t.failing) {
                    t.failing = false;
                    store.put_user(&fresh)?;
                    super::presence::refresh_global(core, store, now, &fresh, out)?;
                }
            }
            tracing::debug!(handle = user.handle.as_str(), "email reply relayed");
            Ok(SmtpAnswer::accepted(format!("delivered to {peer}")))
        }
    }
}

/// The relay refused an email for good: the buddies hear that their messages did not go out by
/// email, and those messages wait for the user's XMPP client instead.
pub(super) fn on_failed(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    job: &EmailJob,
    reason: &str,
    out: &mut Out,
) -> Result<(), StoreError> {
    tracing::warn!("an email could not be delivered; its messages wait for XMPP");
    tracing::debug!(reason, "relay's answer");
    let Some(user) = store.user(&job.user)? else {
        return Ok(());
    };
    let Some(peer) = &job.peer else {
        out.send(chat(
            &core.settings.domain,
            &user.jid,
            "The verification email could not be delivered. Check the address and register it again.",
        ));
        return Ok(());
    };
    super::forward::undelivered(core, store, now, &user, peer, &job.items, "email", out)
}

#[cfg(test)]
mod tests {
    use super::*;
    #[allow(unused_imports)]
    use crate::core::Transaction;

    use crate::core::testing::*;
    use crate::core::{Action, Event};
    use crate::xmpp::stanza::child_text;

    const BOB: &str = "bob@example.net";
    const ALICE: &str = "alice@example.org";
    const ALICE_MAIL: &str = "alice@mail.example.org";

    /// Alice registered with a verified email address.
    fn alice_with_email(t: &Harness) {
        t.register_verified(ALICE, "alice", ALICE_MAIL, "");
    }

    fn from_bob(t: &Harness, id: &str, body: &str) -> Vec<Element> {
        t.run(&format!("<message type='chat' id='{id}' from='{BOB}/pc' to='alice@{D}'><body>{body}</body><thread>th</thread><nick xmlns='http://jabber.org/protocol/nick'>Bobby</nick></message>"))
    }

    fn emails(actions: Vec<Action>) -> Vec<EmailJob> {
        actions
            .into_iter()
            .filter_map(|a| match a {
                Action::SendEmail(job) => Some(*job),
                _ => None,
            })
            .collect()
    }

    fn tick(t: &Harness) -> Vec<EmailJob> {
        emails(t.actions(Event::Tick))
    }

    fn reply(from: &str, text: &str, id: &str) -> Reply {
        Reply {
            message_id: Some(id.into()),
            from: Some(from.into()),
            subject: Some("Re: IM".into()),
            in_reply_to: vec![],
            references: vec![],
            text: text.into(),
            attachments: vec![],
            automatic: None,
        }
    }

    fn answer(
        t: &Harness,
        envelope_from: &str,
        rcpt: &str,
        reply: Reply,
    ) -> (SmtpAnswer, Vec<Element>) {
        t.mail(InboundMail {
            envelope_from: envelope_from.into(),
            rcpt: rcpt.into(),
            reply,
        })
    }

    #[test]
    fn an_offline_users_messages_share_one_email_after_the_digest_window() {
        let t = Harness::new();
        alice_with_email(&t);
        assert!(from_bob(&t, "m1", "first").is_empty());
        t.advance(10);
        assert!(from_bob(&t, "m2", "second").is_empty());
        assert!(tick(&t).is_empty(), "the window is still open");
        t.advance(25);
        let jobs = tick(&t);
        assert_eq!(jobs.len(), 1);
        let job = &jobs[0];
        assert_eq!(job.email.to, ALICE_MAIL);
        assert_eq!(job.email.paragraphs, vec!["first", "second"]);
        assert_eq!(job.email.from_name, "Bobby via Reach");
        assert_eq!(job.email.subject, format!("IM from Bobby ({BOB})"));
        assert!(
            job.email.from_address.starts_with("r-")
                && job.email.from_address.ends_with("@reply.example.org")
        );
        assert_eq!(job.envelope_from, "reach@reply.example.org");
        assert!(tick(&t).is_empty(), "nothing is forwarded twice");
        assert_eq!(t.store.tx().held_count(ALICE).unwrap(), 0);
        // The next email continues the thread.
        from_bob(&t, "m3", "third");
        t.advance(31);
        let next = &tick(&t)[0];
        assert_eq!(
            next.email.in_reply_to.as_deref(),
            Some(job.email.message_id.as_str())
        );
        assert_eq!(next.email.references, vec![job.email.message_id.clone()]);
    }

    #[test]
    fn coming_online_before_the_forward_delivers_by_xmpp_instead() {
        let t = Harness::new();
        alice_with_email(&t);
        from_bob(&t, "m1", "hello");
        let out = t.run(&format!("<presence from='{ALICE}/laptop' to='{D}'/>"));
        let m = out
            .iter()
            .find(|s| s.name() == "message")
            .expect("the message on XMPP");
        assert_eq!(m.attr("id"), Some("m1"));
        t.advance(60);
        assert!(tick(&t).is_empty());
    }

    #[test]
    fn an_away_user_gets_email_only_for_what_stays_unread_after_the_grace_delay() {
        let t = Harness::new();
        alice_with_email(&t);
        t.run(&format!(
            "<presence from='{ALICE}/laptop' to='{D}'><show>away</show></presence>"
        ));
        let out = from_bob(&t, "m1", "one");
        assert_eq!(out.len(), 1, "delivered to XMPP at once");
        t.advance(119);
        assert!(tick(&t).is_empty());
        t.advance(1);
        assert_eq!(tick(&t)[0].email.paragraphs, vec!["one"]);

        // Read (displayed marker): cancelled.
        from_bob(&t, "m2", "two");
        t.run(&format!("<message from='{ALICE}/laptop' to='bob\\40example.net@{D}'><displayed xmlns='urn:xmpp:chat-markers:0' id='m2'/></message>"));
        t.advance(200);
        assert!(tick(&t).is_empty());
        // Answered in XMPP: cancelled.
        from_bob(&t, "m3", "three");
        t.run(&format!("<message type='chat' from='{ALICE}/laptop' to='bob\\40example.net@{D}'><body>ok</body></message>"));
        t.advance(200);
        assert!(tick(&t).is_empty());
        // Back to available: cancelled.
        from_bob(&t, "m4", "four");
        t.run(&format!("<presence from='{ALICE}/laptop' to='{D}'/>"));
        t.advance(200);
        assert!(tick(&t).is_empty());
    }

    #[test]
    fn an_unverified_address_gets_a_code_and_nothing_else() {
        let t = Harness::new();
        let out = t.actions(Event::Stanza(
            register_form(ALICE, "alice", ALICE_MAIL, "")
                .replacen(
                    "<iq ",
                    &format!("<iq xmlns='{}' ", crate::xmpp::stanza::STANZA_NS),
                    1,
                )
                .parse()
                .unwrap(),
        ));
        let jobs = emails(out);
        assert_eq!(jobs.len(), 1);
        let code = t
            .store
            .tx()
            .verification(ALICE, TerminalKind::Email)
            .unwrap()
            .unwrap()
            .code;
        assert!(jobs[0].email.subject.contains(&code));
        assert!(jobs[0]
            .email
            .paragraphs
            .iter()
            .any(|p| p.contains(&format!("verify {code}"))));
        // Messages wait on XMPP hold, not in email.
        from_bob(&t, "m1", "held");
        t.advance(60);
        assert!(tick(&t).is_empty());
        assert_eq!(t.store.tx().held_count(ALICE).unwrap(), 1);

        let say = |text: &str| {
            let reply = t.one(&format!(
                "<message type='chat' from='{ALICE}/x' to='{D}'><body>{text}</body></message>"
            ));
            child_text(&reply, "body").unwrap()
        };
        assert!(say("verify 000000x").contains("wrong (4 tries left)"));
        assert!(say(&format!("verify {code}")).contains("is verified"));
        assert!(
            t.store
                .tx()
                .user(ALICE)
                .unwrap()
                .unwrap()
                .email
                .unwrap()
                .verified
        );
        // What was held goes out by email now.
        assert_eq!(t.store.tx().held_count(ALICE).unwrap(), 0);
        t.advance(31);
        assert_eq!(tick(&t)[0].email.paragraphs, vec!["held"]);
    }

    #[test]
    fn codes_expire_and_run_out_of_tries() {
        let t = Harness::new();
        t.run(&register_form(ALICE, "alice", ALICE_MAIL, ""));
        let say = |text: &str| {
            let reply = t.one(&format!(
                "<message type='chat' from='{ALICE}/x' to='{D}'><body>{text}</body></message>"
            ));
            child_text(&reply, "body").unwrap()
        };
        for _ in 0..4 {
            say("verify 1");
        }
        assert!(say("verify 1").contains("last try"));
        assert!(say("verify 1").contains("nothing to verify"));
        say("verify");
        t.advance(CODE_VALIDITY_SECS + 1);
        let code = t
            .store
            .tx()
            .verification(ALICE, TerminalKind::Email)
            .unwrap()
            .unwrap()
            .code;
        assert!(say(&format!("verify {code}")).contains("expired"));
        assert!(
            !t.store
                .tx()
                .user(ALICE)
                .unwrap()
                .unwrap()
                .email
                .unwrap()
                .verified
        );
    }

    #[test]
    fn replying_to_the_verification_email_verifies() {
        let t = Harness::new();
        let jobs = emails(
            t.actions(Event::Stanza(
                register_form(ALICE, "alice", ALICE_MAIL, "")
                    .replacen(
                        "<iq ",
                        &format!("<iq xmlns='{}' ", crate::xmpp::stanza::STANZA_NS),
                        1,
                    )
                    .parse()
                    .unwrap(),
            )),
        );
        let alias = jobs[0].email.from_address.clone();
        let (a, _) = answer(
            &t,
            "mallory@evil.example",
            &alias,
            reply("mallory@evil.example", "yes", "v0@x"),
        );
        assert_eq!(a.code, 550);
        let (a, stanzas) = answer(&t, ALICE_MAIL, &alias, reply(ALICE_MAIL, "yes", "v1@x"));
        assert_eq!(a.code, 250, "{a:?}");
        assert!(
            t.store
                .tx()
                .user(ALICE)
                .unwrap()
                .unwrap()
                .email
                .unwrap()
                .verified
        );
        assert!(child_text(&stanzas[0], "body")
            .unwrap()
            .contains("is verified"));
    }

    fn forwarded_alias(t: &Harness) -> String {
        alice_with_email(t);
        from_bob(t, "m1", "hello");
        t.advance(31);
        tick(t)[0].email.from_address.clone()
    }

    #[test]
    fn a_reply_does_not_drop_messages_still_waiting_for_their_email() {
        // Found by the soak test: replying to the first email used to drop a second message
        // that was waiting out the digest window.
        let t = Harness::new();
        let alias = forwarded_alias(&t);
        from_bob(&t, "m2", "second");
        let (a, _) = answer(
            &t,
            ALICE_MAIL,
            &alias,
            reply(ALICE_MAIL, "Hi Bob", "r9@mail"),
        );
        assert_eq!(a.code, 250);
        t.advance(31);
        let jobs = tick(&t);
        assert_eq!(jobs.len(), 1, "the second message still goes out");
        assert_eq!(jobs[0].email.paragraphs, vec!["second"]);
    }

    #[test]
    fn a_reply_from_the_owner_reaches_the_buddy_in_the_same_thread() {
        let t = Harness::new();
        let alias = forwarded_alias(&t);
        assert_eq!(
            t.core
                .check_mail_recipient(&mut *t.store.tx(), t.now.get(), ALICE_MAIL, &alias)
                .unwrap()
                .code,
            250
        );
        let (a, stanzas) = answer(
            &t,
            ALICE_MAIL,
            &alias,
            reply(ALICE_MAIL, "Hi Bob", "r1@mail"),
        );
        assert_eq!(a.code, 250);
        assert_eq!(stanzas.len(), 1);
        let m = &stanzas[0];
        assert_eq!(m.attr("from"), Some(&*format!("alice@{D}")));
        assert_eq!(m.attr("to"), Some(BOB));
        assert_eq!(child_text(m, "body").as_deref(), Some("Hi Bob"));
        assert_eq!(child_text(m, "thread").as_deref(), Some("th"));
        // The same Message-ID again: accepted, not delivered twice.
        let (a, stanzas) = answer(
            &t,
            ALICE_MAIL,
            &alias,
            reply(ALICE_MAIL, "Hi Bob", "r1@mail"),
        );
        assert_eq!(a.code, 250);
        assert!(stanzas.is_empty());
        // Bob's next message continues the email thread from Alice's reply.
        from_bob(&t, "m2", "again");
        t.advance(31);
        assert_eq!(tick(&t)[0].email.in_reply_to.as_deref(), Some("r1@mail"));
        // The Message-ID is remembered for 30 days, then forgotten by the clock tick.
        assert_eq!(t.store.tx().seen_ids(), 1);
        t.advance(crate::core::SEEN_IDS_KEPT_SECS - 100);
        tick(&t);
        assert_eq!(t.store.tx().seen_ids(), 1);
        t.advance(200);
        tick(&t);
        assert_eq!(t.store.tx().seen_ids(), 0);
    }

    #[test]
    fn one_mail_to_two_aliases_reaches_both_conversations_once_each() {
        // Alice answers Bob's and Carol's emails with one mail (one To, one Cc): one Message-ID,
        // two recipients. Each conversation gets its copy; a resend reaches neither again.
        const CAROL: &str = "carol@example.net";
        let t = Harness::new();
        let bob_alias = forwarded_alias(&t);
        t.run(&format!("<message type='chat' id='c1' from='{CAROL}/pc' to='alice@{D}'><body>hi from carol</body></message>"));
        t.advance(31);
        let carol_alias = tick(&t)[0].email.from_address.clone();
        assert_ne!(bob_alias, carol_alias);
        let mail = || reply(ALICE_MAIL, "See you both at noon", "both@mail");
        for (alias, peer) in [(&bob_alias, BOB), (&carol_alias, CAROL)] {
            let (a, stanzas) = answer(&t, ALICE_MAIL, alias, mail());
            assert_eq!(a.code, 250, "{a:?}");
            assert_eq!(stanzas.len(), 1, "{peer} gets the reply");
            assert_eq!(stanzas[0].attr("to"), Some(peer));
            assert_eq!(
                child_text(&stanzas[0], "body").as_deref(),
                Some("See you both at noon")
            );
        }
        // The same mail resent (an MTA retrying after a lost 250): taken once per conversation.
        for alias in [&bob_alias, &carol_alias] {
            let (a, stanzas) = answer(&t, ALICE_MAIL, alias, mail());
            assert_eq!(a.code, 250);
            assert!(stanzas.is_empty(), "{stanzas:?}");
        }
        assert_eq!(t.store.tx().seen_ids(), 2);
    }

    #[test]
    fn one_answer_to_data_for_several_recipients() {
        let ok = |t: &str| SmtpAnswer::accepted(t);
        let later = SmtpAnswer::new(451, "4.3.0", "temporary failure, try again later");
        let gone = SmtpAnswer::new(550, "5.1.1", "no such reply address here");
        let r = |rcpt: &str, a: &SmtpAnswer| (rcpt.to_owned(), a.clone());
        // One recipient: its own answer.
        assert_eq!(answer_for_recipients(&[r("r-a@d", &gone)]), gone);
        assert_eq!(
            answer_for_recipients(&[r("r-a@d", &ok("delivered to bob"))]),
            ok("delivered to bob")
        );
        // All took it (a resend counts as taken).
        let all =
            answer_for_recipients(&[r("r-a@d", &ok("x")), r("r-b@d", &ok("already delivered"))]);
        assert_eq!(
            (all.code, all.text.as_str()),
            (250, "delivered to 2 conversations")
        );
        // A transient failure anywhere: try the whole mail again.
        let again =
            answer_for_recipients(&[r("r-a@d", &ok("x")), r("r-b@d", &gone), r("r-c@d", &later)]);
        assert_eq!((again.code, again.enhanced), (451, "4.3.0"));
        assert!(
            again.text.contains("r-c@d") && !again.text.contains("r-a@d"),
            "{}",
            again.text
        );
        // Taken by some, refused for good by others: a 5xx naming the refused ones.
        let part = answer_for_recipients(&[r("r-a@d", &ok("x")), r("r-b@d", &gone)]);
        assert_eq!((part.code, part.enhanced), (550, "5.1.1"));
        assert!(
            part.text
                .starts_with("refused for r-b@d: no such reply address here;"),
            "{}",
            part.text
        );
        assert!(
            part.text.ends_with("delivered to the other 1 recipient(s)"),
            "{}",
            part.text
        );
        // Refused by all: the first refusal as it is.
        let none = answer_for_recipients(&[
            r("r-a@d", &gone),
            r("r-b@d", &SmtpAnswer::new(550, "5.7.1", "x")),
        ]);
        assert_eq!(none, gone);
    }

    #[test]
    fn a_reply_without_text_is_refused_and_the_corrected_resend_is_taken() {
        let t = Harness::new();
        let alias = forwarded_alias(&t);
        let (a, stanzas) = answer(
            &t,
            ALICE_MAIL,
            &alias,
            reply(ALICE_MAIL, "  ", "empty@mail"),
        );
        assert_eq!(a.code, 550);
        assert!(stanzas.is_empty());
        // Refused mail is not remembered: the same Message-ID with text is a new delivery.
        let (a, stanzas) = answer(
            &t,
            ALICE_MAIL,
            &alias,
            reply(ALICE_MAIL, "oops, here", "empty@mail"),
        );
        assert_eq!(a.code, 250);
        assert_eq!(stanzas.len(), 1);
    }

    #[test]
    fn strangers_unknown_and_expired_aliases_bounces_and_auto_replies_make_no_message() {
        let t = Harness::new();
        let alias = forwarded_alias(&t);
        let check = |from: &str, rcpt: &str| {
            t.core
                .check_mail_recipient(&mut *t.store.tx(), t.now.get(), from, rcpt)
                .unwrap()
        };
        assert_eq!(check("mallory@evil.example", &alias).enhanced, "5.7.1");
        assert_eq!(
            check(
                ALICE_MAIL,
                "r-aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa@reply.example.org"
            )
            .enhanced,
            "5.1.1"
        );
        assert_eq!(
            check(ALICE_MAIL, "postmaster@reply.example.org").enhanced,
            "5.1.1"
        );
        // A forged From with the right envelope is refused too.
        let (a, s) = answer(
            &t,
            ALICE_MAIL,
            &alias,
            reply("mallory@evil.example", "x", "f1@x"),
        );
        assert_eq!((a.code, s.len()), (550, 0));
        // Bounces and automatic replies: accepted, no message.
        let mut dsn = reply("mailer-daemon@mail.example.org", "delivery failed", "b1@x");
        dsn.automatic = Some(Automatic::Bounce);
        let (a, s) = answer(&t, "", &alias, dsn);
        assert_eq!((a.code, s.len()), (250, 0));
        assert!(
            t.store
                .tx()
                .user(ALICE)
                .unwrap()
                .unwrap()
                .email
                .unwrap()
                .failing
        );
        let mut vacation = reply(ALICE_MAIL, "I am away", "a1@x");
        vacation.automatic = Some(Automatic::AutoSubmitted("auto-replied".into()));
        let (a, s) = answer(&t, ALICE_MAIL, &alias, vacation);
        assert_eq!((a.code, s.len()), (250, 0));
        // Empty text is refused so that the user hears of it.
        let (a, _) = answer(&t, ALICE_MAIL, &alias, reply(ALICE_MAIL, "  ", "e1@x"));
        assert_eq!(a.enhanced, "5.6.0");
        // Idle for longer than the alias lives: gone.
        t.advance(31 * 86_400);
        assert_eq!(check(ALICE_MAIL, &alias).enhanced, "5.1.1");
        let (a, _) = answer(&t, ALICE_MAIL, &alias, reply(ALICE_MAIL, "late", "l1@x"));
        assert_eq!(a.code, 550);
    }

    #[test]
    fn a_permanent_failure_tells_the_buddy_and_keeps_the_message_for_xmpp() {
        let t = Harness::new();
        alice_with_email(&t);
        from_bob(&t, "m1", "hello");
        t.advance(31);
        let job = tick(&t).remove(0);
        let seq = t.store.tx().enqueue_email(&job).unwrap();
        let out = t.event(Event::EmailFailed {
            seq,
            job: Box::new(job),
            reason: "550 no such user".into(),
        });
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].attr("type"), Some("error"));
        assert_eq!(out[0].attr("to"), Some(BOB));
        assert_eq!(out[0].attr("id"), Some("m1"));
        assert_eq!(t.store.tx().held_count(ALICE).unwrap(), 1);
        assert_eq!(t.store.stats().unwrap().email_queue, 0);
        let back = t.run(&format!("<presence from='{ALICE}/laptop' to='{D}'/>"));
        assert!(back.iter().any(|s| s.attr("id") == Some("m1")));
    }

    #[test]
    fn removing_the_registration_kills_its_aliases() {
        let t = Harness::new();
        let alias = forwarded_alias(&t);
        t.run(&format!("<iq type='set' id='r' from='{ALICE}/x' to='{D}'><query xmlns='jabber:iq:register'><remove/></query></iq>"));
        assert_eq!(
            t.core
                .check_mail_recipient(&mut *t.store.tx(), t.now.get(), ALICE_MAIL, &alias)
                .unwrap()
                .enhanced,
            "5.1.1"
        );
    }

    #[test]
    fn tokens_are_found_only_in_alias_addresses_of_the_reply_domain() {
        let t = "abcdefghijklmnopqrstuvwxyz234567";
        assert_eq!(
            token_of(&format!("r-{t}@reply.example.org"), "reply.example.org").as_deref(),
            Some(t)
        );
        assert_eq!(
            token_of(
                &format!("R-{}@Reply.Example.org", t.to_uppercase()),
                "reply.example.org"
            )
            .as_deref(),
            Some(t)
        );
        assert_eq!(
            token_of(&format!("r-{t}@other.example.org"), "reply.example.org"),
            None
        );
        assert_eq!(
            token_of("r-short@reply.example.org", "reply.example.org"),
            None
        );
        assert_eq!(
            token_of(&format!("x-{t}@reply.example.org"), "reply.example.org"),
            None
        );
        assert_eq!(token_of("no-at-sign", "reply.example.org"), None);
        assert_eq!(token_hash(t), token_hash(&t.to_uppercase()));
    }

    #[test]
    fn peer_names_never_carry_line_breaks() {
        assert_eq!(
            peer_name(Some("Bob\r\nBcc: x@y"), "bob@example.net"),
            "BobBcc: x@y"
        );
        assert_eq!(peer_name(Some("  "), "bob@example.net"), "bob");
        assert_eq!(peer_name(None, "bob@example.net"), "bob");
    }
}
