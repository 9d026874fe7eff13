//! Reach's own limits: bounds on the stanzas it takes, and abuse limits on registrations,
//! verification codes and forwarded email.
//!
//! The XML parser below the link (rxml, through tokio-xmpp) only bounds single tokens (an element
//! or attribute name, an attribute value: 8192 bytes each; longer text is split, not refused) and
//! checks UTF-8 and well-formedness; it has no limit on a stanza's size, nesting depth or number
//! of attributes, and tokio-xmpp adds none. The XMPP server bounds the stanza size before the
//! stanza ever reaches Reach (Prosody: `c2s_stanza_size_limit`, 256 KiB by default). Depth is
//! also bounded below the parser ([`crate::xmpp::depth_guard`]), which replaces an element opening
//! too deep by a marker so that the check here sees it one level too deep. These checks
//! run where stanzas enter the core, before anything is read from or written to the store; a
//! stanza over a limit gets `policy-violation` with a text saying which limit, and changes
//! nothing. Rate limits count in the store ([`crate::core::Transaction::bump_counter`]), in fixed
//! hour or day windows (UTC), so they hold across restarts.
//!
//! Every limit is documented in `docs/limits.md` and configurable in `[limits]`.

use minidom::{Element, Node};

use crate::core::model::{StoreError, TerminalKind};
use crate::core::Transaction;
use crate::xmpp::stanza::{ErrorType, StanzaFault};

/// The limits, as configured in `[limits]` (see [`crate::config::LimitsConfig`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Limits {
    /// Largest stanza, in bytes of names, attribute names and values, and text (about its size
    /// on the wire without markup).
    pub max_stanza_bytes: usize,
    /// Deepest element nesting, the stanza itself being depth 1.
    pub max_depth: usize,
    /// Most attributes on one element.
    pub max_attributes: usize,
    /// Longest message body, in characters.
    pub max_body_chars: usize,
    /// Registrations and registration updates per JID per hour.
    pub registrations_per_jid_per_hour: u32,
    /// New registrations per user domain per hour.
    pub new_registrations_per_domain_per_hour: u32,
    /// Verification codes sent to one email address or phone number per day.
    pub codes_per_terminal_per_day: u32,
    /// Forwarding emails per user per hour.
    pub emails_per_user_per_hour: u32,
    // ---- verification codes: pumping, flooding, guessing (issue 10) ----
    /// Verification codes sent for one user per day, to all their terminals together.
    pub codes_per_user_per_day: u32,
    /// Different terminals (mailboxes, numbers) one user may ask codes for per day.
    pub new_terminals_per_user_per_day: u32,
    /// Verification SMS Reach sends per hour, for all users together.
    pub verification_sms_per_hour: u32,
    /// Wrong verification codes one user may enter per day; past it no code is checked.
    pub wrong_codes_per_user_per_day: u32,

    // ---- storage per user (what strangers can make Reach keep) ----
    /// Messages waiting for one user (held for XMPP or pending a forward), all senders together.
    pub waiting_per_user: u32,
    /// Messages held for one user from one sender.
    pub held_per_sender: u32,
    /// Messages waiting for a forward (email or SMS) in one conversation.
    pub pending_per_conversation: u32,
    /// Buddies (JIDs with a relation to the reach address) per user.
    pub buddies_per_user: u32,
    /// Messages in one forwarding email (the rest go in the next email of the thread).
    pub digest_max_items: u32,
    /// Characters of message text in one forwarding email (at least one message per email).
    pub digest_max_chars: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_stanza_bytes: 262_144,
            max_depth: 32,
            max_attributes: 64,
            max_body_chars: 10_000,
            registrations_per_jid_per_hour: 10,
            new_registrations_per_domain_per_hour: 100,
            codes_per_terminal_per_day: 5,
            emails_per_user_per_hour: 30,
            codes_per_user_per_day: 10,
            new_terminals_per_user_per_day: 3,
            verification_sms_per_hour: 100,
            wrong_codes_per_user_per_day: 10,
            waiting_per_user: 1_000,
            held_per_sender: 100,
            pending_per_conversation: 200,
            buddies_per_user: 1_000,
            digest_max_items: 50,
            digest_max_chars: 100_000,
        }
    }
}

pub(crate) const HOUR: u64 = 3_600;
pub(crate) const DAY: u64 = 86_400;

/// Counter names in the store.
pub(crate) mod counter {
    /// Registrations and updates, per bare JID (hourly).
    pub const REGISTRATIONS: &str = "registrations";
    /// New registrations, per JID domain (hourly).
    pub const NEW_REGISTRATIONS: &str = "new_registrations";
    /// Verification codes, per terminal: its mailbox or its number's digits (daily).
    pub const CODES: &str = "codes";
    /// Verification codes, per user (daily).
    pub const USER_CODES: &str = "user_codes";
    /// One per user and terminal asked for today: `JID \0 terminal` (daily).
    pub const TERMINAL_TRIED: &str = "terminal_tried";
    /// Different terminals asked for, per user (daily).
    pub const NEW_TERMINALS: &str = "new_terminals";
    /// Verification SMS, for everyone (hourly, scope empty).
    pub const VERIFICATION_SMS: &str = "verification_sms";
    /// Wrong verification codes, per user (daily).
    pub const WRONG_CODES: &str = "wrong_codes";
    /// Forwarding emails, per user (hourly).
    pub const EMAILS: &str = "emails";
}

/// Whether a stanza is within the size, depth and attribute limits.
/// The longest bare JID Reach serves (a sender, a user, a JID in a preference). RFC 7622 lets
/// each part of a JID be 1023 bytes; real addresses are far shorter, and Reach keeps JIDs in
/// the keys of its store, which must stay short enough for every engine.
pub const MAX_JID_BYTES: usize = 512;

pub(crate) fn check_stanza(limits: &Limits, stanza: &Element) -> Result<(), StanzaFault> {
    let mut bytes = 0usize;
    walk(limits, stanza, 1, &mut bytes)
}

fn walk(limits: &Limits, el: &Element, depth: usize, bytes: &mut usize) -> Result<(), StanzaFault> {
    if depth > limits.max_depth {
        return Err(policy(format!(
            "the stanza is nested deeper than {} elements",
            limits.max_depth
        )));
    }
    let attributes = el.attrs();
    for ((ns, name), value) in attributes.iter() {
        *bytes += ns.len() + name.len() + value.len() + 4;
    }
    if attributes.len() > limits.max_attributes {
        return Err(policy(format!(
            "an element has more than {} attributes",
            limits.max_attributes
        )));
    }
    *bytes += 2 * el.name().len() + 5;
    for node in el.nodes() {
        match node {
            Node::Element(child) => walk(limits, child, depth + 1, bytes)?,
            Node::Text(text) => *bytes += text.len(),
        }
        if *bytes > limits.max_stanza_bytes {
            break;
        }
    }
    if *bytes > limits.max_stanza_bytes {
        return Err(policy(format!(
            "the stanza is larger than {} bytes",
            limits.max_stanza_bytes
        )));
    }
    Ok(())
}

fn policy(text: String) -> StanzaFault {
    StanzaFault::new(ErrorType::Modify, "policy-violation").with_text(text)
}

/// Whether a message body is within `max_body_chars`.
pub(crate) fn check_body(limits: &Limits, body: &str) -> Result<(), StanzaFault> {
    if body.chars().count() > limits.max_body_chars {
        return Err(StanzaFault::not_acceptable(format!(
            "the message is longer than {} characters; send it in parts",
            limits.max_body_chars
        )));
    }
    Ok(())
}

/// The terminal a code goes to, as counted: an email address by its mailbox
/// ([`crate::address::Email::mailbox`]: case, `+tag` and Gmail dots do not make another one),
/// a number by its E.164 digits.
pub(crate) fn terminal_scope(kind: TerminalKind, address: &str) -> String {
    match kind {
        TerminalKind::Email => crate::address::Email::parse(address)
            .map_or_else(|_| address.to_lowercase(), |e| e.mailbox()),
        TerminalKind::Phone => crate::address::Phone::parse(address)
            .map_or_else(|_| address.to_owned(), |p| format!("+{}", p.digits())),
    }
}

fn tried_scope(jid: &str, terminal: &str) -> String {
    format!("{jid}\0{terminal}")
}

/// Why no verification code may go to `address` for user `jid` now: the text for the user, or
/// `None` when one may. Reads the counters only; every door that sends a code asks this first
/// (through [`take_code`]), so the caps hold whichever door is used.
pub(crate) fn code_refusal(
    limits: &Limits,
    store: &mut dyn Transaction,
    now: u64,
    jid: &str,
    kind: TerminalKind,
    address: &str,
) -> Result<Option<String>, StoreError> {
    let terminal = terminal_scope(kind, address);
    if store.counter(counter::USER_CODES, jid, DAY, now)? >= limits.codes_per_user_per_day {
        return Ok(Some(format!(
            "Reach already sent you {} verification codes today, the most it sends anyone in a \
             day; no new code was sent. Ask again tomorrow (UTC).",
            limits.codes_per_user_per_day
        )));
    }
    let tried = store.counter(
        counter::TERMINAL_TRIED,
        &tried_scope(jid, &terminal),
        DAY,
        now,
    )? > 0;
    if !tried
        && store.counter(counter::NEW_TERMINALS, jid, DAY, now)?
            >= limits.new_terminals_per_user_per_day
    {
        return Ok(Some(format!(
            "You already asked for codes to {} different addresses and numbers today; Reach \
             sends no code to {address} until tomorrow (UTC).",
            limits.new_terminals_per_user_per_day
        )));
    }
    if store.counter(counter::CODES, &terminal, DAY, now)? >= limits.codes_per_terminal_per_day {
        return Ok(Some(format!(
            "Reach already sent {} verification codes to {address} today; no new code was sent. \
             Ask again tomorrow (UTC).",
            limits.codes_per_terminal_per_day
        )));
    }
    if kind == TerminalKind::Phone
        && store.counter(counter::VERIFICATION_SMS, "", HOUR, now)?
            >= limits.verification_sms_per_hour
    {
        let next = next_window(now, HOUR) % DAY;
        return Ok(Some(format!(
            "Reach is sending too many verification SMS right now; no code was sent to \
             {address}. Send \"verify\" again after {:02}:{:02} UTC.",
            next / HOUR,
            next % HOUR / 60
        )));
    }
    Ok(None)
}

/// Counts one more verification code for user `jid` to `address` (an email address or phone
/// number); `Some` note for the user instead when a cap forbids it (then nothing is counted and
/// nothing may be sent). See [`code_refusal`].
pub(crate) fn take_code(
    limits: &Limits,
    store: &mut dyn Transaction,
    now: u64,
    jid: &str,
    kind: TerminalKind,
    address: &str,
) -> Result<Option<String>, StoreError> {
    if let Some(note) = code_refusal(limits, store, now, jid, kind, address)? {
        return Ok(Some(note));
    }
    let terminal = terminal_scope(kind, address);
    store.bump_counter(counter::USER_CODES, jid, DAY, now)?;
    let tried = tried_scope(jid, &terminal);
    if store.counter(counter::TERMINAL_TRIED, &tried, DAY, now)? == 0 {
        store.bump_counter(counter::NEW_TERMINALS, jid, DAY, now)?;
    }
    store.bump_counter(counter::TERMINAL_TRIED, &tried, DAY, now)?;
    store.bump_counter(counter::CODES, &terminal, DAY, now)?;
    if kind == TerminalKind::Phone {
        store.bump_counter(counter::VERIFICATION_SMS, "", HOUR, now)?;
    }
    Ok(None)
}

/// What the user is told when today's wrong codes are used up: no code is checked until the next
/// UTC day, not even the right one.
pub(crate) fn guesses_refusal(
    limits: &Limits,
    store: &mut dyn Transaction,
    now: u64,
    jid: &str,
) -> Result<Option<String>, StoreError> {
    if store.counter(counter::WRONG_CODES, jid, DAY, now)? >= limits.wrong_codes_per_user_per_day {
        return Ok(Some(wrong_codes_used_up(limits)));
    }
    Ok(None)
}

/// The refusal once the wrong codes of the day are used up.
pub(crate) fn wrong_codes_used_up(limits: &Limits) -> String {
    format!(
        "You entered {} wrong verification codes today; Reach checks no more codes from you \
         until tomorrow (UTC). Then send \"verify\" for new codes.",
        limits.wrong_codes_per_user_per_day
    )
}

/// Counts one wrong code for user `jid`; returns how many more they may enter today.
pub(crate) fn count_wrong_code(
    limits: &Limits,
    store: &mut dyn Transaction,
    now: u64,
    jid: &str,
) -> Result<u32, StoreError> {
    let wrong = store.bump_counter(counter::WRONG_CODES, jid, DAY, now)?;
    Ok(limits.wrong_codes_per_user_per_day.saturating_sub(wrong))
}

/// The first second of the window after the one `now` is in.
pub(crate) fn next_window(now: u64, period: u64) -> u64 {
    (now / period + 1) * period
}

#[cfg(test)]
mod tests {
    use super::*;
    #[allow(unused_imports)]
    use crate::core::Transaction;

    fn el(xml: &str) -> Element {
        xml.parse().unwrap()
    }

    fn nested(depth: usize) -> Element {
        let open: String = (1..depth).map(|_| "<x>").collect();
        let close: String = (1..depth).map(|_| "</x>").collect();
        el(&format!(
            "<message xmlns='jabber:component:accept'>{open}{close}</message>"
        ))
    }

    #[test]
    fn depth_is_counted_from_the_stanza() {
        let limits = Limits::default();
        assert!(check_stanza(&limits, &nested(32)).is_ok());
        let fault = check_stanza(&limits, &nested(33)).unwrap_err();
        assert_eq!(fault.condition, "policy-violation");
        assert_eq!(
            fault.text.as_deref(),
            Some("the stanza is nested deeper than 32 elements")
        );
    }

    #[test]
    fn attributes_are_counted_per_element() {
        let limits = Limits {
            max_attributes: 3,
            ..Limits::default()
        };
        assert!(check_stanza(&limits, &el("<m xmlns='a' a='1' b='2' c='3'/>")).is_ok());
        let fault = check_stanza(
            &limits,
            &el("<m xmlns='a'><x a='1' b='2' c='3' d='4'/></m>"),
        )
        .unwrap_err();
        assert_eq!(
            fault.text.as_deref(),
            Some("an element has more than 3 attributes")
        );
    }

    #[test]
    fn size_counts_names_attributes_and_text() {
        let limits = Limits {
            max_stanza_bytes: 100,
            ..Limits::default()
        };
        assert!(check_stanza(&limits, &el("<m xmlns='a'><b>hello</b></m>")).is_ok());
        let big = format!("<m xmlns='a'><b>{}</b></m>", "x".repeat(100));
        let fault = check_stanza(&limits, &el(&big)).unwrap_err();
        assert_eq!(
            fault.text.as_deref(),
            Some("the stanza is larger than 100 bytes")
        );
    }

    #[test]
    fn bodies_are_counted_in_characters() {
        let limits = Limits {
            max_body_chars: 3,
            ..Limits::default()
        };
        assert!(check_body(&limits, "été").is_ok());
        assert_eq!(
            check_body(&limits, "étés").unwrap_err().condition,
            "not-acceptable"
        );
    }

    #[test]
    fn terminals_are_counted_by_mailbox_and_digits() {
        use crate::core::model::TerminalKind::{Email, Phone};
        assert_eq!(
            terminal_scope(Email, "Victim+x@Example.net"),
            "victim@example.net"
        );
        assert_eq!(
            terminal_scope(Email, "j.doe@googlemail.com"),
            "jdoe@gmail.com"
        );
        assert_eq!(terminal_scope(Phone, "+1 555 010 0000"), "+15550100000");
        // A stored value that no longer parses is still counted, by itself.
        assert_eq!(terminal_scope(Email, "not an address"), "not an address");
    }

    #[test]
    fn a_refused_code_counts_nothing() {
        let store = crate::store::Store::temporary().unwrap();
        let limits = Limits {
            codes_per_user_per_day: 1,
            ..Limits::default()
        };
        let now = 1_795_000_000;
        let take = |address: &str| {
            take_code(
                &limits,
                &mut *store.tx(),
                now,
                "a@b",
                TerminalKind::Phone,
                address,
            )
            .unwrap()
        };
        assert_eq!(take("+15550100000"), None);
        let records = store.tx().counter_records();
        assert!(take("+15550100001").is_some());
        assert_eq!(store.tx().counter_records(), records);
        assert_eq!(
            store
                .tx()
                .counter(counter::VERIFICATION_SMS, "", HOUR, now)
                .unwrap(),
            1
        );
        assert_eq!(
            store
                .tx()
                .counter(counter::USER_CODES, "a@b", DAY, now)
                .unwrap(),
            1
        );
        assert_eq!(
            store
                .tx()
                .counter(counter::CODES, "+15550100001", DAY, now)
                .unwrap(),
            0
        );
    }

    #[test]
    fn windows() {
        assert_eq!(next_window(7_199, HOUR), 7_200);
        assert_eq!(next_window(7_200, HOUR), 10_800);
    }
}
