//! Identifiers users see and the store keeps forever: handles (the local part of a reach address),
//! per-session JIDs (XEP-0106 escaping of a peer's bare JID), email addresses and phone numbers.
//!
//! Every type here is validated on construction, so a value that exists is well formed; the stored
//! form is the normalised string returned by `as_str()` (and written by serde). Because the store
//! keeps these strings forever, changing what a type accepts or how it normalises needs a store
//! migration.
//!
//! Error texts are written for users: registration returns them in `<not-acceptable/>` errors, so
//! they say what is wrong in plain words and never echo more than the offending character.
//!
//! This module does no I/O and knows nothing of the store, the link or the router.

use std::fmt;
use std::str::FromStr;

use jid::BareJid;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// What is wrong with a handle, an email address or a phone number, in words shown to the user.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    /// The handle is the empty string.
    #[error("the handle is empty; choose one like 'alice' or 'bob.smith'")]
    HandleEmpty,
    /// The handle is longer than [`Handle::MAX_LEN`] characters.
    #[error("the handle is {len} characters long; the limit is 32")]
    HandleTooLong {
        /// Its length in characters.
        len: usize,
    },
    /// The handle starts with `.`, `_` or `-`.
    #[error("the handle must start with a lowercase letter or a digit, not {0:?}")]
    HandleStart(char),
    /// The handle contains an uppercase ASCII letter.
    #[error("the handle contains the capital letter {0:?}; handles are all lowercase")]
    HandleUppercase(char),
    /// The handle contains a character outside `[a-z0-9._-]`.
    #[error(
        "the handle contains {0:?}; only lowercase letters a-z, digits 0-9, '.', '_' and '-' are allowed"
    )]
    HandleChar(char),

    /// The email address is the empty string.
    #[error("the email address is empty")]
    EmailEmpty,
    /// The email address contains whitespace (including CR and LF) or a control character.
    #[error("the email address contains a space, a line break or another invisible character")]
    EmailInvisible,
    /// The email address is longer than [`Email::MAX_LEN`] characters.
    #[error("the email address is {len} characters long; the limit is 254")]
    EmailTooLong {
        /// Its length in characters.
        len: usize,
    },
    /// The email address has no `@`.
    #[error("the email address has no '@'; write it like alice@example.org")]
    EmailNoAt,
    /// The email address has more than one `@`.
    #[error("the email address contains more than one '@'")]
    EmailManyAt,
    /// Nothing before the `@`.
    #[error("the email address has nothing before the '@'")]
    EmailLocalEmpty,
    /// The part before the `@` is longer than 64 characters.
    #[error("the part of the email address before the '@' is longer than 64 characters")]
    EmailLocalTooLong,
    /// The part before the `@` contains a character outside the RFC 5322 dot-atom.
    #[error("the part of the email address before the '@' contains {0:?}, which is not allowed")]
    EmailLocalChar(char),
    /// The part before the `@` starts or ends with a dot, or has two dots in a row.
    #[error(
        "the part of the email address before the '@' may not start or end with a dot or contain two dots in a row"
    )]
    EmailLocalDots,
    /// The part after the `@` is not a domain name; the text says why.
    #[error("the domain of the email address {0}")]
    EmailDomain(&'static str),

    /// The phone number is the empty string.
    #[error("the phone number is empty")]
    PhoneEmpty,
    /// The phone number does not start with `+`.
    #[error(
        "the phone number must be in international format: '+', the country code, then the number, like +15551234567"
    )]
    PhoneNoPlus,
    /// The phone number contains something other than digits and separators.
    #[error(
        "the phone number contains {0:?}; use only digits after the '+', optionally grouped with spaces, '-', '.' or parentheses"
    )]
    PhoneChar(char),
    /// The phone number has fewer than 8 or more than 15 digits.
    #[error(
        "the phone number has {digits} digits after the '+'; an international number has 8 to 15"
    )]
    PhoneLength {
        /// How many digits it has.
        digits: usize,
    },
    /// The number contains the national trunk prefix `(0)`, which E.164 leaves out.
    #[error(
        "write the phone number without the '(0)', like +44 20 7946 0958 rather than +44 (0)20 7946 0958"
    )]
    PhoneTrunkZero,
    /// The first digit (the start of the country code) is 0.
    #[error("the phone number starts with 0 after the '+'; country codes never start with 0")]
    PhoneCountryCode,
}

/// Serde as a plain string, validated by `parse` when read back.
macro_rules! serde_as_validated_string {
    ($ty:ident) => {
        impl Serialize for $ty {
            fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
                serializer.serialize_str(self.as_str())
            }
        }

        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
                let text = String::deserialize(deserializer)?;
                $ty::parse(&text).map_err(serde::de::Error::custom)
            }
        }

        impl FromStr for $ty {
            type Err = AddressError;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                $ty::parse(s)
            }
        }

        impl fmt::Display for $ty {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str(self.as_str())
            }
        }

        impl AsRef<str> for $ty {
            fn as_ref(&self) -> &str {
                self.as_str()
            }
        }
    };
}

// ---------------------------------------------------------------------------------------------
// Handle
// ---------------------------------------------------------------------------------------------

/// The local part of a reach address: `alice` in `alice@reach.example.org`.
///
/// A handle matches `[a-z0-9][a-z0-9._-]{0,31}`: 1 to 32 characters, lowercase ASCII letters,
/// digits, `.`, `_` and `-`, starting with a letter or a digit. It never contains `\`, so it can
/// never be mistaken for a per-session JID (which always contains `\40`).
///
/// ```
/// use reach::address::{AddressError, Handle};
///
/// let alice = Handle::parse("alice").unwrap();
/// assert_eq!(alice.as_str(), "alice");
/// assert_eq!(alice.to_string(), "alice");
/// assert!(Handle::parse("bob.smith-2").is_ok());
///
/// assert_eq!(Handle::parse("Alice"), Err(AddressError::HandleUppercase('A')));
/// assert_eq!(Handle::parse(".alice"), Err(AddressError::HandleStart('.')));
/// assert_eq!(Handle::parse("bob\\40example.net"), Err(AddressError::HandleChar('\\')));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Handle(String);

impl Handle {
    /// The longest handle, in characters.
    pub const MAX_LEN: usize = 32;

    /// Validates a handle exactly as typed (no case folding, no trimming).
    pub fn parse(s: &str) -> Result<Handle, AddressError> {
        let mut chars = s.chars();
        let first = chars.next().ok_or(AddressError::HandleEmpty)?;
        let len = s.chars().count();
        if len > Self::MAX_LEN {
            return Err(AddressError::HandleTooLong { len });
        }
        if matches!(first, '.' | '_' | '-') {
            return Err(AddressError::HandleStart(first));
        }
        for c in s.chars() {
            if c.is_ascii_uppercase() {
                return Err(AddressError::HandleUppercase(c));
            }
            if !is_handle_char(c) {
                return Err(AddressError::HandleChar(c));
            }
        }
        Ok(Handle(s.to_owned()))
    }

    /// Suggests a handle from a JID local part, for the registration form.
    ///
    /// The local part is XEP-0106-unescaped, lowercased, characters outside `[a-z0-9._-]` become
    /// `-` (ASCII) or are dropped (non-ASCII), runs of `-` collapse to one, leading characters
    /// other than letters and digits are dropped, the result is cut to 32 characters and trailing
    /// `.`, `_` and `-` are dropped. `None` when nothing usable is left. The suggestion may
    /// already be taken: the caller still checks availability.
    ///
    /// ```
    /// use reach::address::Handle;
    ///
    /// let s = |l: &str| Handle::suggest(l).map(|h| h.to_string());
    /// assert_eq!(s("Alice").as_deref(), Some("alice"));
    /// assert_eq!(s("John Smith").as_deref(), Some("john-smith"));
    /// assert_eq!(s("d\\27artagnan").as_deref(), Some("d-artagnan"));
    /// assert_eq!(s("_jérôme_").as_deref(), Some("jrme"));
    /// assert_eq!(s("___").as_deref(), None);
    /// ```
    pub fn suggest(localpart: &str) -> Option<Handle> {
        let unescaped = unescape_node(localpart);
        let mut out = String::new();
        for c in unescaped.chars().flat_map(char::to_lowercase) {
            let mapped = if is_handle_char(c) {
                c
            } else if c.is_ascii() {
                '-'
            } else {
                continue;
            };
            if mapped == '-' && out.ends_with('-') {
                continue;
            }
            if out.is_empty() && !mapped.is_ascii_alphanumeric() {
                continue;
            }
            out.push(mapped);
        }
        out.truncate(Self::MAX_LEN); // all ASCII, so bytes are characters
        let trimmed = out.trim_end_matches(['.', '_', '-']);
        Handle::parse(trimmed).ok()
    }

    /// The handle as stored and shown.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

fn is_handle_char(c: char) -> bool {
    c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-')
}

serde_as_validated_string!(Handle);

// ---------------------------------------------------------------------------------------------
// XEP-0106 JID escaping
// ---------------------------------------------------------------------------------------------

/// The XEP-0106 escapes: (character, the two lowercase hex digits after the backslash).
const ESCAPES: [(char, &str); 10] = [
    (' ', "20"),
    ('"', "22"),
    ('&', "26"),
    ('\'', "27"),
    ('/', "2f"),
    (':', "3a"),
    ('<', "3c"),
    ('>', "3e"),
    ('@', "40"),
    ('\\', "5c"),
];

/// The character an escape code stands for; `code` must be exactly two lowercase hex digits
/// (XEP-0106: "CASE IS SIGNIFICANT").
fn unescaped_char(code: &str) -> Option<char> {
    ESCAPES
        .iter()
        .find(|(_, hex)| *hex == code)
        .map(|(c, _)| *c)
}

/// The escape code of a character that XEP-0106 escapes.
fn escape_code(c: char) -> Option<&'static str> {
    ESCAPES.iter().find(|(e, _)| *e == c).map(|(_, hex)| *hex)
}

/// XEP-0106-escapes a string for use as a JID local part (node).
///
/// The nine characters disallowed in a node become `\hh`: space `\20`, `"` `\22`, `&` `\26`,
/// `'` `\27`, `/` `\2f`, `:` `\3a`, `<` `\3c`, `>` `\3e`, `@` `\40`. A backslash becomes `\5c` only
/// when it is followed by one of the ten escape codes (`20 22 26 27 2f 3a 3c 3e 40 5c`, lowercase),
/// i.e. when it would otherwise be read as an escape (XEP-0106 §5.1 rule 7 and §5.3); any other
/// backslash is kept as is (§5.3: `foo\bar` is not modified). Nothing else is touched.
///
/// XEP-0106 forbids `\20` as the first or last character of an escaped node, so leading and
/// trailing spaces cannot be represented: they are removed before escaping.
///
/// Note: the XEP's examples table (rows 9 to 11) escapes every backslash (`c:\net` →
/// `c\3a\5cnet`), contradicting its own rules; we follow the rules. Both forms unescape to the
/// same text.
///
/// ```
/// use reach::address::escape_node;
///
/// assert_eq!(escape_node("bob@example.net"), "bob\\40example.net");
/// assert_eq!(escape_node("d'artagnan"), "d\\27artagnan");
/// assert_eq!(escape_node("call me \"ishmael\""), "call\\20me\\20\\22ishmael\\22");
/// assert_eq!(escape_node("c:\\5commas"), "c\\3a\\5c5commas"); // `\5c` would read as an escape
/// assert_eq!(escape_node("foo\\bar"), "foo\\bar"); // `\ba` would not
/// assert_eq!(escape_node(" space cadet "), "space\\20cadet");
/// ```
pub fn escape_node(s: &str) -> String {
    let s = s.trim_matches(' ');
    let mut out = String::with_capacity(s.len() + 8);
    for (i, c) in s.char_indices() {
        if c == '\\' {
            let next = s.get(i + 1..i + 3);
            if next.and_then(unescaped_char).is_some() {
                out.push_str("\\5c");
            } else {
                out.push('\\');
            }
        } else if let Some(code) = escape_code(c) {
            out.push('\\');
            out.push_str(code);
        } else {
            out.push(c);
        }
    }
    out
}

/// Reverses [`escape_node`]: turns exactly the ten sequences `\20 \22 \26 \27 \2f \3a \3c \3e \40
/// \5c` (lowercase hex) back into their characters and leaves everything else as is (partial
/// or unknown sequences such as `\2plus`, `\bar`, `\41` or `\2F` are not escapes, XEP-0106 §5.3).
///
/// A `\20` at the very start or end of the node is not an escape (XEP-0106 forbids it there),
/// so it is kept as the literal text `\20`.
///
/// ```
/// use reach::address::unescape_node;
///
/// assert_eq!(unescape_node("bob\\40example.net"), "bob@example.net");
/// assert_eq!(unescape_node("\\5c3and\\2is\\5c5cool"), "\\3and\\2is\\5cool");
/// assert_eq!(unescape_node("foob\\41r"), "foob\\41r");
/// assert_eq!(unescape_node("\\20x"), "\\20x");
/// ```
pub fn unescape_node(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    let mut pos = 0;
    while let Some(at) = rest.find('\\') {
        out.push_str(&rest[..at]);
        let code = rest.get(at + 1..at + 3);
        let start = pos + at;
        let at_edge = start == 0 || start + 3 == s.len();
        match code.and_then(unescaped_char) {
            Some(' ') if at_edge => {
                out.push('\\');
                rest = &rest[at + 1..];
                pos = start + 1;
            }
            Some(c) => {
                out.push(c);
                rest = &rest[at + 3..];
                pos = start + 3;
            }
            None => {
                out.push('\\');
                rest = &rest[at + 1..];
                pos = start + 1;
            }
        }
    }
    out.push_str(rest);
    out
}

// ---------------------------------------------------------------------------------------------
// Per-session JIDs and what a local part at D stands for
// ---------------------------------------------------------------------------------------------

/// Per-session JIDs: `ESCAPED@D`, where ESCAPED is the XEP-0106-escaped bare JID of the peer.
///
/// To registered user Alice, `bob\40example.net@reach.example.org` stands for "my conversation
/// with bob@example.net, held from my reach address". The node always contains `\40` (a bare
/// JID with a node always has an `@`), so it never collides with a [`Handle`].
///
/// This type is only a namespace; the node is a `String` and the peer a [`BareJid`].
///
/// ```
/// use jid::BareJid;
/// use reach::address::{peer_from_session_node, SessionJid};
///
/// let bob = BareJid::new("bob@example.net").unwrap();
/// assert_eq!(SessionJid::for_peer(&bob), "bob\\40example.net");
/// assert_eq!(peer_from_session_node("bob\\40example.net"), Some(bob.clone()));
///
/// let jid = SessionJid::jid(&bob, "reach.example.org").unwrap();
/// assert_eq!(jid.to_string(), "bob\\40example.net@reach.example.org");
/// ```
#[derive(Debug)]
pub enum SessionJid {}

impl SessionJid {
    /// The node of the per-session JID for `peer`: `bob@example.net` → `bob\40example.net`.
    pub fn for_peer(peer: &BareJid) -> String {
        escape_node(peer.as_str())
    }

    /// The whole per-session JID for `peer` at component domain `domain`.
    ///
    /// Fails only if the result is not a valid JID, e.g. when the escaped peer is longer than
    /// the 1023 bytes a JID node may have.
    pub fn jid(peer: &BareJid, domain: &str) -> Result<BareJid, jid::Error> {
        BareJid::new(&format!("{}@{}", Self::for_peer(peer), domain))
    }
}

/// The peer a per-session JID node stands for, or `None` if the node is not one.
///
/// The node must unescape to a bare JID with a node (so it must contain `\40`), and must be
/// written exactly as [`escape_node`] writes it, so each peer has one per-session JID and no
/// aliases (`\5c40`-style tricks, a stray `\20` at an edge, a resource via `\2f` are refused).
///
/// ```
/// use reach::address::peer_from_session_node;
///
/// assert_eq!(
///     peer_from_session_node("bob\\40example.net").map(|j| j.to_string()).as_deref(),
///     Some("bob@example.net"),
/// );
/// assert_eq!(peer_from_session_node("alice"), None); // a handle
/// assert_eq!(peer_from_session_node("\\40example.net"), None); // no node
/// assert_eq!(peer_from_session_node("bob\\40example.net\\2fphone"), None); // a resource
/// ```
pub fn peer_from_session_node(node: &str) -> Option<BareJid> {
    let unescaped = unescape_node(node);
    if !unescaped.contains('@') || escape_node(&unescaped) != node {
        return None;
    }
    let peer = BareJid::new(&unescaped).ok()?;
    peer.node()?;
    // `BareJid::new` normalises (stringprep: `BOB@Example.NET` is `bob@example.net`), so the
    // node must also be the one written for the normalised peer, or it would be an alias.
    if escape_node(peer.as_str()) != node {
        return None;
    }
    Some(peer)
}

/// What a JID at the component domain D stands for, decided by its node alone.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LocalTarget {
    /// `D` itself: the service (registration, commands, the command prompt).
    Service,
    /// `HANDLE@D`: a reach address (the user may or may not exist).
    User(Handle),
    /// `ESCAPED@D`: a per-session JID; the peer's bare JID.
    Session(BareJid),
    /// Neither: answer with `item-not-found` (or ignore, for errors).
    Invalid,
}

/// Classifies the node of a JID addressed to D.
///
/// ```
/// use reach::address::{classify_local, Handle, LocalTarget};
///
/// assert_eq!(classify_local(None), LocalTarget::Service);
/// assert_eq!(classify_local(Some("alice")), LocalTarget::User(Handle::parse("alice").unwrap()));
/// assert!(matches!(classify_local(Some("bob\\40example.net")), LocalTarget::Session(_)));
/// assert_eq!(classify_local(Some("bob\\40")), LocalTarget::Invalid);
/// assert_eq!(classify_local(Some("-x")), LocalTarget::Invalid);
/// ```
pub fn classify_local(node: Option<&str>) -> LocalTarget {
    let Some(node) = node else {
        return LocalTarget::Service;
    };
    if node.contains("\\40") {
        return match peer_from_session_node(node) {
            Some(peer) => LocalTarget::Session(peer),
            None => LocalTarget::Invalid,
        };
    }
    match Handle::parse(node) {
        Ok(handle) => LocalTarget::User(handle),
        Err(_) => LocalTarget::Invalid,
    }
}

// ---------------------------------------------------------------------------------------------
// Domain names (shared with config)
// ---------------------------------------------------------------------------------------------

/// Why `s` is not an ASCII domain name, in words that follow "the domain ...", or `None` if it
/// is one: dot-separated labels of `[A-Za-z0-9-]`, 1 to 63 characters each, not starting or
/// ending with `-`, at most 253 characters in all, with at least one dot if `need_dot`.
pub(crate) fn domain_problem(s: &str, need_dot: bool) -> Option<&'static str> {
    if s.is_empty() {
        return Some("is missing");
    }
    if s.len() > 253 {
        return Some("is longer than 253 characters");
    }
    if need_dot && !s.contains('.') {
        return Some("needs at least one dot, like example.org");
    }
    for label in s.split('.') {
        if label.is_empty() {
            return Some("has an empty part (a dot at the start or end, or two dots in a row)");
        }
        if label.len() > 63 {
            return Some("has a part longer than 63 characters");
        }
        if !label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-') {
            return Some("may contain only letters, digits, '-' and dots");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return Some("has a part starting or ending with '-'");
        }
    }
    None
}

// ---------------------------------------------------------------------------------------------
// Email
// ---------------------------------------------------------------------------------------------

/// A validated email address (`local@domain`), as used for the email terminal.
///
/// The local part is an RFC 5322 dot-atom (letters, digits, ``!#$%&'*+/=?^_`{|}~-`` and dots,
/// no dot at either end nor two in a row, at most 64 characters; no quoted strings, comments or
/// non-ASCII). The domain has at least one dot and labels of `[A-Za-z0-9-]` not starting or
/// ending with `-`; it is stored lowercased, the local part as given. At most 254 characters.
/// Whitespace, CR and LF are always refused, so the value is safe in a mail header.
///
/// Input is not trimmed: trim form input before parsing if that is wanted.
///
/// ```
/// use reach::address::{AddressError, Email};
///
/// let e = Email::parse("Alice.Smith+im@Example.ORG").unwrap();
/// assert_eq!(e.as_str(), "Alice.Smith+im@example.org");
/// assert_eq!(e.local_part(), "Alice.Smith+im");
/// assert_eq!(e.domain(), "example.org");
///
/// assert_eq!(Email::parse("alice@example.org\r\nBcc: x@y.z"), Err(AddressError::EmailInvisible));
/// assert_eq!(Email::parse("alice.example.org"), Err(AddressError::EmailNoAt));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Email {
    /// `local@domain`, domain lowercased.
    text: String,
    /// Byte index of the `@` in `text`.
    at: usize,
}

impl Email {
    /// The longest address, in characters.
    pub const MAX_LEN: usize = 254;
    /// The longest local part, in characters (RFC 5321).
    pub const MAX_LOCAL_LEN: usize = 64;

    /// Validates and normalises an email address.
    pub fn parse(s: &str) -> Result<Email, AddressError> {
        if s.is_empty() {
            return Err(AddressError::EmailEmpty);
        }
        if s.chars().any(|c| c.is_whitespace() || c.is_control()) {
            return Err(AddressError::EmailInvisible);
        }
        let len = s.chars().count();
        if len > Self::MAX_LEN {
            return Err(AddressError::EmailTooLong { len });
        }
        let (local, domain) = s.split_once('@').ok_or(AddressError::EmailNoAt)?;
        if domain.contains('@') {
            return Err(AddressError::EmailManyAt);
        }
        if local.is_empty() {
            return Err(AddressError::EmailLocalEmpty);
        }
        if local.chars().count() > Self::MAX_LOCAL_LEN {
            return Err(AddressError::EmailLocalTooLong);
        }
        if let Some(c) = local.chars().find(|&c| !is_atext(c) && c != '.') {
            return Err(AddressError::EmailLocalChar(c));
        }
        if local.starts_with('.') || local.ends_with('.') || local.contains("..") {
            return Err(AddressError::EmailLocalDots);
        }
        if let Some(problem) = domain_problem(domain, true) {
            return Err(AddressError::EmailDomain(problem));
        }
        Ok(Email {
            text: format!("{local}@{}", domain.to_ascii_lowercase()),
            at: local.len(),
        })
    }

    /// The address as stored and shown: `local@domain`.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// The part before the `@`, as given.
    pub fn local_part(&self) -> &str {
        &self.text[..self.at]
    }

    /// The part after the `@`, lowercased.
    pub fn domain(&self) -> &str {
        &self.text[self.at + 1..]
    }

    /// The mailbox this address reaches, as its mail server sees it, for counting what is sent
    /// there (never for sending): lowercased, a `+tag` removed, and for Gmail
    /// (`gmail.com`, `googlemail.com`) the dots of the local part removed and the domain
    /// spelt `gmail.com`. Most servers ignore case and deliver `local+tag` to `local`; an
    /// attacker who varies either still reaches the same inbox.
    ///
    /// ```
    /// use reach::address::Email;
    ///
    /// let canonical = |s: &str| Email::parse(s).unwrap().mailbox();
    /// assert_eq!(canonical("Victim@Example.NET"), "victim@example.net");
    /// assert_eq!(canonical("vIcTiM+reach@example.net"), "victim@example.net");
    /// assert_eq!(canonical("J.Doe+x@GoogleMail.com"), "jdoe@gmail.com");
    /// assert_eq!(canonical("j.doe@example.org"), "j.doe@example.org");
    /// ```
    pub fn mailbox(&self) -> String {
        let local = self.local_part().to_lowercase();
        let local = match local.split_once('+') {
            // A local part that starts with `+` has no tag to remove.
            Some((base, _)) if !base.is_empty() => base.to_owned(),
            _ => local,
        };
        match self.domain() {
            "gmail.com" | "googlemail.com" => format!("{}@gmail.com", local.replace('.', "")),
            domain => format!("{local}@{domain}"),
        }
    }
}

/// RFC 5322 `atext`.
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+/=?^_`{|}~-".contains(c)
}

serde_as_validated_string!(Email);

// ---------------------------------------------------------------------------------------------
// Phone
// ---------------------------------------------------------------------------------------------

/// A phone number in E.164 form: `+`, then 8 to 15 digits, the first not 0.
///
/// Input may group the digits after the `+` with spaces, `-`, `.` and parentheses; they are
/// removed. Anything else (letters, extensions, a missing `+`, line breaks) is refused, and so
/// is the national trunk prefix written `(0)` (`+44 (0)20 ...`), which would otherwise silently
/// become a wrong number.
///
/// ```
/// use reach::address::{AddressError, Phone};
///
/// assert_eq!(Phone::parse("+1 (555) 123-4567").unwrap().as_str(), "+15551234567");
/// assert_eq!(Phone::parse("+44 20 7946 0958").unwrap().as_str(), "+442079460958");
/// assert_eq!(Phone::parse("555 123 4567"), Err(AddressError::PhoneNoPlus));
/// assert_eq!(Phone::parse("+1 555 CALL NOW"), Err(AddressError::PhoneChar('C')));
/// ```
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Phone(String);

impl Phone {
    /// Fewest digits after the `+`.
    pub const MIN_DIGITS: usize = 8;
    /// Most digits after the `+` (E.164).
    pub const MAX_DIGITS: usize = 15;

    /// Validates and normalises a phone number.
    pub fn parse(s: &str) -> Result<Phone, AddressError> {
        if s.is_empty() {
            return Err(AddressError::PhoneEmpty);
        }
        let rest = s.strip_prefix('+').ok_or(AddressError::PhoneNoPlus)?;
        if rest.replace(' ', "").contains("(0)") {
            return Err(AddressError::PhoneTrunkZero);
        }
        let mut out = String::with_capacity(16);
        out.push('+');
        for c in rest.chars() {
            match c {
                '0'..='9' => out.push(c),
                ' ' | '-' | '.' | '(' | ')' => {}
                _ => return Err(AddressError::PhoneChar(c)),
            }
        }
        let digits = out.len() - 1;
        if !(Self::MIN_DIGITS..=Self::MAX_DIGITS).contains(&digits) {
            return Err(AddressError::PhoneLength { digits });
        }
        if out.as_bytes()[1] == b'0' {
            return Err(AddressError::PhoneCountryCode);
        }
        Ok(Phone(out))
    }

    /// The number as stored and shown: `+15551234567`.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The E.164 digits without the `+`: the handset this number reaches, for counting.
    ///
    /// ```
    /// use reach::address::Phone;
    ///
    /// assert_eq!(Phone::parse("+1 (555) 123-4567").unwrap().digits(), "15551234567");
    /// ```
    pub fn digits(&self) -> &str {
        &self.0[1..]
    }
}

serde_as_validated_string!(Phone);

#[cfg(test)]
mod tests {
    use super::*;

    // ---- XEP-0106 ----------------------------------------------------------------------------

    /// Every escapable character, its escape, both ways.
    #[test]
    fn all_ten_escapes_both_ways() {
        let table = [
            (" ", "\\20"),
            ("\"", "\\22"),
            ("&", "\\26"),
            ("'", "\\27"),
            ("/", "\\2f"),
            (":", "\\3a"),
            ("<", "\\3c"),
            (">", "\\3e"),
            ("@", "\\40"),
        ];
        for (plain, escaped) in table {
            // In the middle (a space may not be at an edge).
            let p = format!("a{plain}b");
            let e = format!("a{escaped}b");
            assert_eq!(escape_node(&p), e, "escaping {plain:?}");
            assert_eq!(unescape_node(&e), p, "unescaping {escaped:?}");
        }
        // The backslash: escaped when followed by an escape code, and unescaped back.
        assert_eq!(escape_node("a\\5cb"), "a\\5c5cb");
        assert_eq!(unescape_node("a\\5cb"), "a\\b");
        assert_eq!(unescape_node("a\\5c5cb"), "a\\5cb");
    }

    #[test]
    fn xep_0106_examples() {
        // XEP-0106 §6.1 table, rows 1-8 and 12 (rows 9-11 contradict the XEP's rules, see
        // escape_node), and the email / IMPS examples.
        let examples = [
            ("space cadet", "space\\20cadet"),
            ("call me \"ishmael\"", "call\\20me\\20\\22ishmael\\22"),
            ("at&t guy", "at\\26t\\20guy"),
            ("d'artagnan", "d\\27artagnan"),
            ("/.fanboy", "\\2f.fanboy"),
            ("::foo::", "\\3a\\3afoo\\3a\\3a"),
            ("<foo>", "\\3cfoo\\3e"),
            ("user@host", "user\\40host"),
            ("c:\\5commas", "c\\3a\\5c5commas"),
            (
                "here's_a_wild_&_/cr%zy/_address",
                "here\\27s_a_wild_\\26_\\2fcr%zy\\2f_address",
            ),
            ("\\3and\\2is\\5cool", "\\5c3and\\2is\\5c5cool"),
            (
                "here's_a_wild_&_/cr%zy/_address_for:<wv>(\"IMPS\")",
                "here\\27s_a_wild_\\26_\\2fcr%zy\\2f_address_for\\3a\\3cwv\\3e(\\22IMPS\\22)",
            ),
        ];
        for (plain, escaped) in examples {
            assert_eq!(escape_node(plain), escaped, "escaping {plain:?}");
            assert_eq!(unescape_node(escaped), plain, "unescaping {escaped:?}");
        }
        // Rows 9-11 as the XEP's table writes them still unescape to the intended text.
        assert_eq!(unescape_node("c\\3a\\5cnet"), "c:\\net");
        assert_eq!(unescape_node("c\\3a\\5ccool\\20stuff"), "c:\\cool stuff");
    }

    #[test]
    fn backslash_escaped_only_before_an_escape_code() {
        // Followed by each of the ten codes: escaped.
        for (_, code) in ESCAPES {
            let plain = format!("x\\{code}y");
            assert_eq!(escape_node(&plain), format!("x\\5c{code}y"));
            assert_eq!(unescape_node(&escape_node(&plain)), plain);
        }
        // Otherwise: left alone (XEP-0106 §5.3 exceptions).
        for plain in [
            "foo\\bar",
            "foob\\41r",
            "\\2plus\\2is\\4",
            "c:\\net",
            "end\\",
            "\\",
            "x\\2Fy", // uppercase hex is not an escape
            "x\\5",
            "x\\\\y",
        ] {
            let escaped = escape_node(plain);
            assert!(!escaped.contains("\\5c"), "{plain:?} -> {escaped:?}");
            assert_eq!(unescape_node(&escaped), plain);
        }
        assert_eq!(escape_node("c:\\net"), "c\\3a\\net");
        // Partial and unknown sequences are not unescaped.
        for s in [
            "\\2plus\\2is\\4",
            "foo\\bar",
            "foob\\41r",
            "x\\2Fy",
            "x\\5",
            "\\",
            "a\\4",
        ] {
            assert_eq!(unescape_node(s), s);
        }
        // Two backslashes before a code: only the second one starts a sequence.
        assert_eq!(escape_node("\\\\40"), "\\\\5c40");
        assert_eq!(unescape_node("\\\\5c40"), "\\\\40");
    }

    #[test]
    fn spaces_at_the_edges() {
        // \20 may not be the first or last character of an escaped node.
        assert_eq!(escape_node(" bob "), "bob");
        assert_eq!(escape_node("  a b  "), "a\\20b");
        assert_eq!(escape_node("   "), "");
        assert_eq!(unescape_node("\\20bob"), "\\20bob");
        assert_eq!(unescape_node("bob\\20"), "bob\\20");
        assert_eq!(unescape_node("\\20"), "\\20");
        assert_eq!(unescape_node("a\\20b"), "a b");
        // A literal "\20" at an edge of the source is escaped, so it round-trips.
        assert_eq!(escape_node("\\20bob"), "\\5c20bob");
        assert_eq!(unescape_node("\\5c20bob"), "\\20bob");
    }

    #[test]
    fn round_trips() {
        for plain in [
            "",
            "bob",
            "bob@example.net",
            "a b c",
            "\"quoted\" & 'single' </slash:colon>",
            "\\5c\\5c",
            "\\20\\22\\26\\27\\2f\\3a\\3c\\3e\\40\\5c",
            "\\\\\\",
            "user\\40gmail.com@smtp.gw.org",
            "naïve@exämple.net",
            "trailing\\",
        ] {
            assert_eq!(unescape_node(&escape_node(plain)), plain, "{plain:?}");
        }
        // Escaped output never contains a disallowed character.
        let all = " \"&'/:<>@\\";
        let escaped = escape_node(&format!("x{all}x"));
        assert!(!escaped.contains([' ', '"', '&', '\'', '/', ':', '<', '>', '@']));
    }

    // ---- per-session JIDs ---------------------------------------------------------------------

    fn bare(s: &str) -> BareJid {
        BareJid::new(s).unwrap()
    }

    #[test]
    fn session_node_for_peer() {
        assert_eq!(
            SessionJid::for_peer(&bare("bob@example.net")),
            "bob\\40example.net"
        );
        assert_eq!(
            SessionJid::for_peer(&bare("Bob@Example.NET")),
            "bob\\40example.net"
        );
        assert_eq!(
            SessionJid::for_peer(&bare("user\\40gmail.com@smtp.gw.org")),
            "user\\5c40gmail.com\\40smtp.gw.org"
        );
        let jid = SessionJid::jid(&bare("bob@example.net"), "reach.example.org").unwrap();
        assert_eq!(jid.as_str(), "bob\\40example.net@reach.example.org");
        assert_eq!(jid.node().unwrap().as_str(), "bob\\40example.net");
    }

    #[test]
    fn peer_from_session_node_round_trips() {
        for peer in [
            "bob@example.net",
            "a\\b@example.net",
            "a\\40b@example.net",
            "user\\40gmail.com@smtp.gw.org",
            "bob@1.2.3.4",
            "bob@[::1]",
            "bob@localhost",
        ] {
            let peer = bare(peer);
            let node = SessionJid::for_peer(&peer);
            assert_eq!(peer_from_session_node(&node), Some(peer.clone()), "{node}");
            assert_eq!(classify_local(Some(&node)), LocalTarget::Session(peer));
        }
    }

    #[test]
    fn not_session_nodes() {
        for node in [
            "",
            "bob",
            "bob\\40",                     // no domain
            "\\40example.net",             // no node
            "bob\\40example.net\\2fphone", // a resource
            "a\\40b\\40example.net",       // two @
            "bob\\40exa\\20mple.net",      // a space in the domain
            "bob\\5c40example.net",        // unescapes to a literal "\40", no '@'
            "bob\\40example.net\\20",      // \20 at the end is not an escape
            "b\\3cb\\40example.net",       // '<' is not allowed in a node
            "bob@example.net",             // a raw '@' is not escaped
            "bob\\40example.net@x",        // idem
        ] {
            assert_eq!(peer_from_session_node(node), None, "{node:?}");
        }
        // A node that unescapes to a valid peer but is not written canonically is refused, so a
        // peer has exactly one per-session JID.
        assert_eq!(peer_from_session_node("a\\5cb\\40example.net"), None);
        assert!(peer_from_session_node("a\\b\\40example.net").is_some());
    }

    /// Found by the `xep0106` fuzz target: a node naming the peer in another case (or any form
    /// stringprep normalises) was taken as that peer's per-session JID, a second JID for it.
    #[test]
    fn unnormalised_session_nodes_are_not_aliases() {
        for node in [
            "BOB\\40Example.NET",
            "bob\\40Example.net",
            "Bob\\40example.net",
        ] {
            assert_eq!(peer_from_session_node(node), None, "{node:?}");
            assert_eq!(classify_local(Some(node)), LocalTarget::Invalid, "{node:?}");
        }
        assert_eq!(
            peer_from_session_node("bob\\40example.net"),
            Some(bare("bob@example.net"))
        );
    }

    #[test]
    fn classify() {
        assert_eq!(classify_local(None), LocalTarget::Service);
        assert_eq!(
            classify_local(Some("alice")),
            LocalTarget::User(Handle::parse("alice").unwrap())
        );
        assert_eq!(
            classify_local(Some("bob\\40example.net")),
            LocalTarget::Session(bare("bob@example.net"))
        );
        for invalid in [
            "",
            "Alice",
            ".alice",
            "bob\\40",
            "bob\\40example.net\\2fres",
            "a\\b",
            "x".repeat(33).as_str(),
        ] {
            assert_eq!(
                classify_local(Some(invalid)),
                LocalTarget::Invalid,
                "{invalid:?}"
            );
        }
    }

    // ---- handles ------------------------------------------------------------------------------

    #[test]
    fn handles_valid() {
        let max = "a".repeat(32);
        for h in [
            "a",
            "0",
            "alice",
            "bob.smith",
            "bob_smith",
            "bob-smith",
            "a.",
            "a-",
            "9lives",
            &max,
        ] {
            assert_eq!(Handle::parse(h).map(|h| h.to_string()), Ok(h.to_owned()));
        }
    }

    #[test]
    fn handles_invalid() {
        use AddressError::*;
        let cases: &[(&str, AddressError)] = &[
            ("", HandleEmpty),
            (&"a".repeat(33), HandleTooLong { len: 33 }),
            (".alice", HandleStart('.')),
            ("_alice", HandleStart('_')),
            ("-alice", HandleStart('-')),
            ("Alice", HandleUppercase('A')),
            ("aLice", HandleUppercase('L')),
            ("bob\\40example.net", HandleChar('\\')),
            ("\\40", HandleChar('\\')),
            ("al ice", HandleChar(' ')),
            ("alice@x", HandleChar('@')),
            ("alice\n", HandleChar('\n')),
            ("jérôme", HandleChar('é')),
            ("a+b", HandleChar('+')),
        ];
        for (input, err) in cases {
            assert_eq!(Handle::parse(input).as_ref(), Err(err), "{input:?}");
        }
    }

    #[test]
    fn handle_errors_read_well() {
        assert_eq!(
            Handle::parse("Alice").unwrap_err().to_string(),
            "the handle contains the capital letter 'A'; handles are all lowercase"
        );
        assert_eq!(
            Handle::parse("a\nb").unwrap_err().to_string(),
            "the handle contains '\\n'; only lowercase letters a-z, digits 0-9, '.', '_' and '-' are allowed"
        );
    }

    #[test]
    fn suggest() {
        let s = |l: &str| Handle::suggest(l).map(|h| h.to_string());
        let cases: &[(&str, Option<&str>)] = &[
            ("alice", Some("alice")),
            ("Alice", Some("alice")),
            ("ALICE.Smith", Some("alice.smith")),
            ("john smith", Some("john-smith")),
            ("john+++smith", Some("john-smith")),
            ("d\\27artagnan", Some("d-artagnan")),
            ("bob\\40example.net", Some("bob-example.net")),
            ("...alice", Some("alice")),
            ("_alice_", Some("alice")),
            ("-", None),
            ("", None),
            ("日本", None),
            ("jérôme", Some("jrme")),
            ("ÉMILE", Some("mile")),
            (&"b".repeat(40), Some(&"b".repeat(32))),
            (&format!("{}-x", "c".repeat(31)), Some(&"c".repeat(31))),
        ];
        for (input, want) in cases {
            assert_eq!(s(input).as_deref(), *want, "{input:?}");
        }
        // Whatever it suggests is a valid handle.
        for input in ["Ωmega", "a b c d e f g h i j k l m n o p q r s t", "x\\y"] {
            if let Some(h) = Handle::suggest(input) {
                assert_eq!(Handle::parse(h.as_str()).as_ref(), Ok(&h));
            }
        }
    }

    #[test]
    fn handle_serde() {
        #[derive(Serialize, Deserialize, Debug, PartialEq)]
        struct W {
            h: Handle,
        }
        let w: W = toml::from_str("h = 'alice'").unwrap();
        assert_eq!(w.h.as_str(), "alice");
        assert_eq!(toml::to_string(&w).unwrap().trim(), "h = \"alice\"");
        let err = toml::from_str::<W>("h = 'Alice'").unwrap_err().to_string();
        assert!(err.contains("capital letter 'A'"), "{err}");
    }

    // ---- email --------------------------------------------------------------------------------

    #[test]
    fn emails_valid() {
        let long_local = "l".repeat(64);
        let long_ok = format!(
            "{}@{}.{}.{}.org",
            "a".repeat(64),
            "b".repeat(60),
            "c".repeat(60),
            "d".repeat(63)
        );
        assert_eq!(long_ok.len(), 254);
        let cases: &[(&str, &str)] = &[
            ("alice@example.org", "alice@example.org"),
            ("Alice@Example.ORG", "Alice@example.org"),
            ("a.b.c@sub.example.co.uk", "a.b.c@sub.example.co.uk"),
            ("bob+tag@example.net", "bob+tag@example.net"),
            (
                "!#$%&'*+/=?^_`{|}~-@example.org",
                "!#$%&'*+/=?^_`{|}~-@example.org",
            ),
            ("x@a-b.example", "x@a-b.example"),
            ("1@2.3", "1@2.3"),
            (
                &format!("{long_local}@example.org"),
                &format!("{long_local}@example.org"),
            ),
            (&long_ok, &long_ok),
        ];
        for (input, stored) in cases {
            let e = Email::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(e.as_str(), *stored);
            assert_eq!(e.to_string(), *stored);
            assert_eq!(
                Email::parse(e.as_str()).as_ref(),
                Ok(&e),
                "stored form re-parses"
            );
            assert_eq!(format!("{}@{}", e.local_part(), e.domain()), *stored);
        }
    }

    #[test]
    fn emails_invalid() {
        use AddressError::*;
        let too_long = format!(
            "{}@{}.{}.{}.org",
            "a".repeat(64),
            "b".repeat(61),
            "c".repeat(60),
            "d".repeat(63)
        );
        let cases: &[(&str, AddressError)] = &[
            ("", EmailEmpty),
            // Header injection and whitespace.
            (
                "alice@example.org\r\nBcc: victim@example.net",
                EmailInvisible,
            ),
            ("alice@example.org\nBcc: victim@example.net", EmailInvisible),
            ("alice@example.org\r", EmailInvisible),
            ("alice\r\n@example.org", EmailInvisible),
            ("\nalice@example.org", EmailInvisible),
            ("alice @example.org", EmailInvisible),
            (" alice@example.org", EmailInvisible),
            ("alice@example.org ", EmailInvisible),
            ("alice\t@example.org", EmailInvisible),
            ("alice@exa\u{0}mple.org", EmailInvisible),
            ("alice\u{2028}@example.org", EmailInvisible),
            ("alice\u{a0}@example.org", EmailInvisible),
            (&too_long, EmailTooLong { len: 255 }),
            ("alice.example.org", EmailNoAt),
            ("alice@b@example.org", EmailManyAt),
            ("\"a@b\"@example.org", EmailManyAt),
            ("@example.org", EmailLocalEmpty),
            (
                &format!("{}@example.org", "l".repeat(65)),
                EmailLocalTooLong,
            ),
            ("\"alice\"@example.org", EmailLocalChar('"')),
            ("al(ice)@example.org", EmailLocalChar('(')),
            ("a,b@example.org", EmailLocalChar(',')),
            ("a<b>@example.org", EmailLocalChar('<')),
            ("a\\b@example.org", EmailLocalChar('\\')),
            ("jérôme@example.org", EmailLocalChar('é')),
            (".alice@example.org", EmailLocalDots),
            ("alice.@example.org", EmailLocalDots),
            ("al..ice@example.org", EmailLocalDots),
            ("alice@", EmailDomain("is missing")),
            (
                "alice@localhost",
                EmailDomain("needs at least one dot, like example.org"),
            ),
            (
                "alice@.example.org",
                EmailDomain("has an empty part (a dot at the start or end, or two dots in a row)"),
            ),
            (
                "alice@example.org.",
                EmailDomain("has an empty part (a dot at the start or end, or two dots in a row)"),
            ),
            (
                "alice@example..org",
                EmailDomain("has an empty part (a dot at the start or end, or two dots in a row)"),
            ),
            (
                "alice@-example.org",
                EmailDomain("has a part starting or ending with '-'"),
            ),
            (
                "alice@example-.org",
                EmailDomain("has a part starting or ending with '-'"),
            ),
            (
                "alice@exa_mple.org",
                EmailDomain("may contain only letters, digits, '-' and dots"),
            ),
            (
                "alice@[127.0.0.1]",
                EmailDomain("may contain only letters, digits, '-' and dots"),
            ),
            (
                "alice@exämple.org",
                EmailDomain("may contain only letters, digits, '-' and dots"),
            ),
            (
                &format!("a@{}.org", "x".repeat(64)),
                EmailDomain("has a part longer than 63 characters"),
            ),
        ];
        for (input, err) in cases {
            assert_eq!(Email::parse(input).as_ref(), Err(err), "{input:?}");
        }
    }

    #[test]
    fn email_errors_read_well() {
        assert_eq!(
            Email::parse("alice@localhost").unwrap_err().to_string(),
            "the domain of the email address needs at least one dot, like example.org"
        );
        assert_eq!(
            Email::parse("a\r\nb@example.org").unwrap_err().to_string(),
            "the email address contains a space, a line break or another invisible character"
        );
    }

    #[test]
    fn email_serde() {
        #[derive(Serialize, Deserialize)]
        struct W {
            e: Email,
        }
        let w: W = toml::from_str("e = 'Bob@Example.net'").unwrap();
        assert_eq!(w.e.as_str(), "Bob@example.net");
        assert_eq!(
            toml::to_string(&w).unwrap().trim(),
            "e = \"Bob@example.net\""
        );
        assert!(toml::from_str::<W>("e = \"a@b.c\\r\\nBcc: x@y.z\"").is_err());
    }

    // ---- phone --------------------------------------------------------------------------------

    #[test]
    fn phones_valid() {
        let cases = [
            ("+15551234567", "+15551234567"),
            ("+1 (555) 123-4567", "+15551234567"),
            ("+1-555-123-4567", "+15551234567"),
            ("+1.555.123.4567", "+15551234567"),
            ("+44 20 7946 0958", "+442079460958"),
            ("+33 1 23 45 67 89", "+33123456789"),
            ("+12345678", "+12345678"),
            ("+123456789012345", "+123456789012345"),
            ("+ 49 30 1234567", "+49301234567"),
        ];
        for (input, stored) in cases {
            let p = Phone::parse(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!(p.as_str(), stored);
            assert_eq!(p.to_string(), stored);
            assert_eq!(Phone::parse(stored).as_ref(), Ok(&p));
        }
    }

    #[test]
    fn phones_invalid() {
        use AddressError::*;
        let cases: &[(&str, AddressError)] = &[
            ("", PhoneEmpty),
            ("15551234567", PhoneNoPlus),
            ("005551234567", PhoneNoPlus),
            (" +15551234567", PhoneNoPlus),
            ("(+1) 555 123 4567", PhoneNoPlus),
            ("+1 555 123 4567\r\n", PhoneChar('\r')),
            ("+15551234567\nBcc: x", PhoneChar('\n')),
            ("+1\t5551234567", PhoneChar('\t')),
            ("+1 555 CALL NOW", PhoneChar('C')),
            ("+1 555 123 4567 ext 12", PhoneChar('e')),
            ("+1/555/1234567", PhoneChar('/')),
            ("++15551234567", PhoneChar('+')),
            ("+1555123456７", PhoneChar('７')),
            ("+", PhoneLength { digits: 0 }),
            ("+1234567", PhoneLength { digits: 7 }),
            ("+1234567890123456", PhoneLength { digits: 16 }),
            ("+05551234567", PhoneCountryCode),
            ("+44 (0)20 7946 0958", PhoneTrunkZero),
            ("+44 ( 0 ) 20 7946 0958", PhoneTrunkZero),
        ];
        for (input, err) in cases {
            assert_eq!(Phone::parse(input).as_ref(), Err(err), "{input:?}");
        }
    }

    #[test]
    fn phone_serde() {
        #[derive(Serialize, Deserialize)]
        struct W {
            p: Phone,
        }
        let w: W = toml::from_str("p = '+1 (555) 123-4567'").unwrap();
        assert_eq!(w.p.as_str(), "+15551234567");
        assert_eq!(toml::to_string(&w).unwrap().trim(), "p = \"+15551234567\"");
        assert!(toml::from_str::<W>("p = '5551234567'").is_err());
    }

    #[test]
    fn domains() {
        assert_eq!(domain_problem("example.org", true), None);
        assert_eq!(domain_problem("localhost", false), None);
        assert!(domain_problem("localhost", true).is_some());
        assert!(domain_problem(&format!("{}.org", "a.".repeat(126)), false).is_some());
    }

    // ---- mailboxes and handsets, for counting ---------------------------------------------

    #[test]
    fn variants_of_one_mailbox_count_as_one() {
        let mailbox = |s: &str| Email::parse(s).unwrap().mailbox();
        let variants = [
            "Victim@example.net",
            "vIctim@example.net",
            "viCtim@EXAMPLE.net",
            "VICTIM@example.NET",
            "victim+1@example.net",
            "Victim+reach+x@example.net",
        ];
        for v in variants {
            assert_eq!(mailbox(v), "victim@example.net", "{v}");
        }
        // Gmail ignores dots too, under both its names; other domains keep them.
        assert_eq!(mailbox("v.i.c.t.i.m@gmail.com"), "victim@gmail.com");
        assert_eq!(mailbox("Vic.Tim+a@googlemail.com"), "victim@gmail.com");
        assert_eq!(mailbox("vic.tim@example.net"), "vic.tim@example.net");
        // A `+` that starts the local part is not a tag.
        assert_eq!(mailbox("+x@example.net"), "+x@example.net");
        // Different people stay different.
        assert_ne!(mailbox("victim@example.net"), mailbox("victim@example.org"));
        assert_ne!(
            mailbox("victim@example.net"),
            mailbox("victims@example.net")
        );
    }

    #[test]
    fn a_number_counts_by_its_digits() {
        assert_eq!(
            Phone::parse("+44 20 7946 0958").unwrap().digits(),
            Phone::parse("+442079460958").unwrap().digits()
        );
    }
}
