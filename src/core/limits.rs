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
//! nothing. Rate limits count in the store ([`crate::store::Store::bump_counter`]), in fixed
//! hour or day windows (UTC), so they hold across restarts.
//!
//! Every limit is documented in `docs/limits.md` and configurable in `[limits]`.

use minidom::{Element, Node};

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
    /// Verification codes, per terminal address (daily).
    pub const CODES: &str = "codes";
    /// Forwarding emails, per user (hourly).
    pub const EMAILS: &str = "emails";
}

/// Whether a stanza is within the size, depth and attribute limits.
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

/// Counts one more verification code for `address` (an email address or phone number); `Some`
/// note for the user instead when today's codes for it are used up (nothing is sent then).
pub(crate) fn take_code(
    limits: &Limits,
    store: &crate::store::Store,
    now: u64,
    address: &str,
) -> Result<Option<String>, crate::store::StoreError> {
    if store.counter(counter::CODES, address, DAY, now)? >= limits.codes_per_terminal_per_day {
        return Ok(Some(format!(
            "Reach already sent {} verification codes to {address} today; no new code was sent. \
             Ask again tomorrow (UTC).",
            limits.codes_per_terminal_per_day
        )));
    }
    store.bump_counter(counter::CODES, address, DAY, now)?;
    Ok(None)
}

/// The first second of the window after the one `now` is in.
pub(crate) fn next_window(now: u64, period: u64) -> u64 {
    (now / period + 1) * period
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn windows() {
        assert_eq!(next_window(7_199, HOUR), 7_200);
        assert_eq!(next_window(7_200, HOUR), 10_800);
    }
}
