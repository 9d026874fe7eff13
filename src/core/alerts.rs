//! Buddy presence alerts: a buddy listed in a terminal's `alert_buddies` came online or went
//! offline, and that terminal is told ("Reach: bob@example.net is online" by SMS, a short mail by
//! email).
//!
//! `presence` decides what a change is (the first resource coming, the last one going); this
//! module decides whether to tell it. Per terminal and buddy, at most one alert per
//! [`ALERT_INTERVAL_SECS`]: a change inside that interval is not told at once, and when the
//! interval is over (`on_tick`) the terminal hears the buddy's state then, only if it differs
//! from what it was last told. So a buddy flapping online/offline costs one alert, and the
//! terminal never keeps a wrong picture for longer than the interval.
//!
//! Terminals in do-not-disturb or stopped get no alerts; an SMS alert counts against the daily
//! cap and is not sent past it.

use rand::Rng;

use super::{Action, Core, Out};
use crate::core::model::{BuddyAlert, EmailJob, StoreError, TerminalKind, User};
use crate::core::Transaction;
use crate::email::message::OutgoingEmail;

/// Least time between two alerts about the same buddy on the same terminal.
pub(super) const ALERT_INTERVAL_SECS: u64 = 300;

const TERMINALS: [TerminalKind; 2] = [TerminalKind::Email, TerminalKind::Phone];

/// Whether the terminal of this kind asks for alerts about `buddy`.
fn listed(user: &User, kind: TerminalKind, buddy: &str) -> bool {
    let list = match kind {
        TerminalKind::Email => user.email.as_ref().map(|t| &t.prefs.alert_buddies),
        TerminalKind::Phone => user.phone.as_ref().map(|t| &t.prefs.alert_buddies),
    };
    list.is_some_and(|l| l.iter().any(|b| b.trim().eq_ignore_ascii_case(buddy)))
}

/// A buddy of the user came online (`online`) or went offline.
pub(super) fn buddy_changed(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    buddy: &str,
    online: bool,
    out: &mut Out,
) -> Result<(), StoreError> {
    for kind in TERMINALS {
        if listed(user, kind, buddy) {
            consider(core, store, now, user, kind, buddy, online, out)?;
        }
    }
    Ok(())
}

/// Alerts held back by the interval: tell the buddy's state now if it is not what the terminal
/// was last told.
pub(super) fn on_tick(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    out: &mut Out,
) -> Result<(), StoreError> {
    for (jid, kind, buddy) in store.take_due_alert_rechecks(now)? {
        let Some(user) = store.user(&jid)? else {
            continue;
        };
        if !listed(&user, kind, &buddy) {
            continue;
        }
        let online = store.buddy(&user.handle, &buddy)?.is_some_and(|b| b.online);
        consider(core, store, now, &user, kind, &buddy, online, out)?;
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn consider(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    kind: TerminalKind,
    buddy: &str,
    online: bool,
    out: &mut Out,
) -> Result<(), StoreError> {
    match store.buddy_alert(&user.jid, kind, buddy)? {
        Some(last) if now < last.sent_at + ALERT_INTERVAL_SECS => {
            store.schedule_alert_recheck(&last, last.sent_at + ALERT_INTERVAL_SECS)
        }
        Some(last) if last.told_online == online => Ok(()),
        _ => {
            if tell(core, store, now, user, kind, buddy, online, out)? {
                store.put_buddy_alert(&BuddyAlert {
                    user: user.jid.clone(),
                    terminal: kind,
                    buddy: buddy.to_owned(),
                    sent_at: now,
                    told_online: online,
                })?;
            }
            Ok(())
        }
    }
}

/// Sends the alert; false if the terminal may not get it now.
#[allow(clippy::too_many_arguments)]
fn tell(
    core: &Core,
    store: &mut dyn Transaction,
    now: u64,
    user: &User,
    kind: TerminalKind,
    buddy: &str,
    online: bool,
    out: &mut Out,
) -> Result<bool, StoreError> {
    let state = if online { "online" } else { "offline" };
    match kind {
        TerminalKind::Phone => super::sms::unsolicited(
            core,
            store,
            now,
            user,
            &format!("Reach: {buddy} is {state}"),
            out,
        ),
        TerminalKind::Email => {
            if !user.email.as_ref().is_some_and(|t| t.usable()) {
                return Ok(false);
            }
            Ok(notice_mail(
                core,
                now,
                user,
                &format!("{buddy} is {state}"),
                vec![format!(
                    "{buddy} is {state} (as seen by your reach address {}).",
                    core.reach_address(&user.handle)
                )],
                out,
            ))
        }
    }
}

/// A short mail from Reach itself to the user's email terminal (alerts, requests): no reply
/// alias, nothing to answer. False if email is not configured or the user has no address.
pub(super) fn notice_mail(
    core: &Core,
    now: u64,
    user: &User,
    subject: &str,
    paragraphs: Vec<String>,
    out: &mut Out,
) -> bool {
    let (Some(settings), Some(terminal)) = (core.settings.email.as_ref(), user.email.as_ref())
    else {
        return false;
    };
    let token: [u8; 16] = core.rng().gen();
    let message_id = format!(
        "{}@{}",
        data_encoding::BASE32_NOPAD
            .encode(&token)
            .to_ascii_lowercase(),
        settings.reply_domain
    );
    out.push(Action::SendEmail(Box::new(EmailJob {
        user: user.jid.clone(),
        peer: None,
        envelope_from: settings.from_address.clone(),
        email: OutgoingEmail {
            from_name: settings.from_name.clone(),
            from_address: settings.from_address.clone(),
            to: terminal.address.as_str().to_owned(),
            subject: subject.to_owned(),
            message_id,
            in_reply_to: None,
            references: Vec::new(),
            paragraphs,
            footer: format!(
                "Sent by Reach for {}. Do not reply to this email.",
                core.reach_address(&user.handle)
            ),
        },
        items: Vec::new(),
        attempts: 0,
        next_attempt_at: now,
        queued_at: now,
        claimed_by: None,
    })));
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::model::{LocalState, Terminal};
    use crate::core::testing::*;
    use crate::core::Event;
    #[allow(unused_imports)]
    use crate::core::Transaction;

    const ALICE: &str = "alice@example.org";
    const PHONE: &str = "+15551234567";

    /// Alice, with a verified phone (and email) that asks for alerts about Bob.
    fn alice_alerted_about_bob(t: &Harness) {
        t.run(&register_form(
            ALICE,
            "alice",
            "alice@mail.example.org",
            PHONE,
        ));
        let mut user = t.store.tx().user(ALICE).unwrap().unwrap();
        let mut phone = Terminal {
            verified: true,
            ..Terminal::unverified(user.phone.unwrap().address)
        };
        phone.prefs.alert_buddies = vec!["bob@example.net".into()];
        user.phone = Some(phone);
        t.store.tx().put_user(&user).unwrap();
    }

    fn sms(actions: &[Action]) -> Vec<String> {
        actions
            .iter()
            .filter_map(|a| match a {
                Action::SendSms(job) => Some(job.text.clone()),
                _ => None,
            })
            .collect()
    }

    fn bob(t: &Harness, resource: &str, available: bool) -> Vec<String> {
        let type_ = if available { "" } else { " type='unavailable'" };
        let stanza = format!(
            "<presence xmlns='jabber:component:accept'{type_} from='bob@example.net/{resource}' to='alice@{D}'/>"
        );
        sms(&t.actions(Event::Stanza(stanza.parse().unwrap())))
    }

    fn tick(t: &Harness) -> Vec<String> {
        sms(&t.actions(Event::Tick))
    }

    const ONLINE: &str = "Reach: bob@example.net is online";
    const OFFLINE: &str = "Reach: bob@example.net is offline";

    #[test]
    fn a_listed_buddy_coming_and_going_is_told_once_per_change() {
        let t = Harness::new();
        alice_alerted_about_bob(&t);
        assert_eq!(bob(&t, "pc", true), vec![ONLINE]);
        // A second resource, and one of two leaving, are no change.
        t.advance(ALERT_INTERVAL_SECS);
        assert!(bob(&t, "phone", true).is_empty());
        assert!(bob(&t, "pc", false).is_empty());
        assert_eq!(bob(&t, "phone", false), vec![OFFLINE]);
        // Carol is not listed.
        t.advance(ALERT_INTERVAL_SECS);
        let carol = format!(
            "<presence xmlns='jabber:component:accept' from='carol@example.net/x' to='alice@{D}'/>"
        );
        assert!(sms(&t.actions(Event::Stanza(carol.parse().unwrap()))).is_empty());
    }

    #[test]
    fn changes_inside_the_interval_are_told_after_it_only_if_still_true() {
        let t = Harness::new();
        alice_alerted_about_bob(&t);
        assert_eq!(bob(&t, "pc", true), vec![ONLINE]);
        // Flapping: offline and back within the interval costs nothing.
        t.advance(10);
        assert!(bob(&t, "pc", false).is_empty());
        t.advance(10);
        assert!(bob(&t, "pc", true).is_empty());
        t.advance(ALERT_INTERVAL_SECS);
        assert!(tick(&t).is_empty(), "the phone already believes Bob online");
        // Gone for good inside the interval: told when it is over, not before.
        let t = Harness::new();
        alice_alerted_about_bob(&t);
        assert_eq!(bob(&t, "pc", true), vec![ONLINE]);
        t.advance(60);
        assert!(bob(&t, "pc", false).is_empty());
        t.advance(ALERT_INTERVAL_SECS - 61);
        assert!(tick(&t).is_empty(), "still inside the interval");
        t.advance(1);
        assert_eq!(tick(&t), vec![OFFLINE]);
        assert!(tick(&t).is_empty(), "told once");
    }

    #[test]
    fn no_alerts_to_a_phone_in_dnd_stopped_or_over_its_cap() {
        let t = Harness::new();
        alice_alerted_about_bob(&t);
        let set = |change: &dyn Fn(&mut Terminal<crate::address::Phone>)| {
            let mut user = t.store.tx().user(ALICE).unwrap().unwrap();
            change(user.phone.as_mut().unwrap());
            t.store.tx().put_user(&user).unwrap();
        };
        set(&|p| p.state = LocalState::Dnd);
        assert!(bob(&t, "pc", true).is_empty());
        set(&|p| {
            p.state = LocalState::Away;
            p.stopped = true;
        });
        assert!(bob(&t, "pc", false).is_empty());
        set(&|p| p.stopped = false);
        for _ in 0..5 {
            t.store.tx().count_sms(ALICE, t.now.get() / 86_400).unwrap();
        }
        assert!(bob(&t, "pc", true).is_empty(), "over the daily cap");
        t.advance(86_400);
        assert_eq!(bob(&t, "pc", false), vec![OFFLINE]);
    }

    #[test]
    fn an_email_terminal_gets_a_short_mail() {
        let t = Harness::new();
        alice_alerted_about_bob(&t);
        let mut user = t.store.tx().user(ALICE).unwrap().unwrap();
        let email = user.email.as_mut().unwrap();
        email.verified = true;
        email.prefs.alert_buddies = vec!["Bob@Example.net".into()];
        user.phone.as_mut().unwrap().prefs.alert_buddies.clear();
        t.store.tx().put_user(&user).unwrap();
        let stanza = format!(
            "<presence xmlns='jabber:component:accept' from='bob@example.net/pc' to='alice@{D}'/>"
        );
        let mails: Vec<EmailJob> = t
            .actions(Event::Stanza(stanza.parse().unwrap()))
            .into_iter()
            .filter_map(|a| match a {
                Action::SendEmail(job) => Some(*job),
                _ => None,
            })
            .collect();
        assert_eq!(mails.len(), 1);
        assert_eq!(mails[0].email.to, "alice@mail.example.org");
        assert_eq!(mails[0].email.subject, "bob@example.net is online");
        assert!(mails[0].peer.is_none() && mails[0].items.is_empty());
        crate::email::message::render(&mails[0].email, std::time::SystemTime::UNIX_EPOCH)
            .expect("a valid email");
    }
}
