//! XEP-0106 escaping and the address parsers (src/address.rs).
//!
//! Asserts, for any UTF-8 input `s`:
//! - `unescape_node(escape_node(s)) == s` with leading and trailing spaces removed (they cannot
//!   be represented, as `escape_node` documents), and `escape_node(s)` contains none of the nine
//!   characters a JID node may not hold (space `"` `&` `'` `/` `:` `<` `>` `@`);
//! - `unescape_node` and `escape_node` never panic on arbitrary input;
//! - `classify_local`: a per-session node is written exactly as `escape_node` writes its peer's
//!   bare JID (one per-session JID per peer, no aliases), and a handle re-parses to itself;
//! - `Handle::parse`, `Email::parse`, `Phone::parse`: never panic; what they accept is in their
//!   documented shape and re-parses to the same value.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reach::address::{
    classify_local, escape_node, unescape_node, Email, Handle, LocalTarget, Phone,
};

const FORBIDDEN: &[char] = &[' ', '"', '&', '\'', '/', ':', '<', '>', '@'];

fuzz_target!(|data: &[u8]| {
    let Ok(s) = std::str::from_utf8(data) else {
        return;
    };

    let escaped = escape_node(s);
    assert!(
        !escaped.contains(FORBIDDEN),
        "escape_node({s:?}) = {escaped:?}"
    );
    assert_eq!(
        unescape_node(&escaped),
        s.trim_matches(' '),
        "round trip of {s:?} via {escaped:?}"
    );
    let _ = unescape_node(s);

    match classify_local(Some(s)) {
        LocalTarget::Session(peer) => {
            assert_eq!(
                escape_node(peer.as_str()),
                s,
                "per-session node alias for {peer}"
            );
            assert!(s.contains("\\40"));
        }
        LocalTarget::User(handle) => assert_eq!(handle.as_str(), s),
        LocalTarget::Service => panic!("a node is never the service"),
        LocalTarget::Invalid => {}
    }

    if let Ok(h) = Handle::parse(s) {
        let t = h.as_str();
        assert!((1..=Handle::MAX_LEN).contains(&t.len()));
        assert!(t
            .bytes()
            .next()
            .is_some_and(|b| b.is_ascii_lowercase() || b.is_ascii_digit()));
        assert!(t
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"._-".contains(&b)));
        assert_eq!(Handle::parse(t).as_ref(), Ok(&h));
    }
    if let Ok(e) = Email::parse(s) {
        assert_eq!(format!("{}@{}", e.local_part(), e.domain()), e.as_str());
        assert!(!e
            .as_str()
            .contains(|c: char| c.is_whitespace() || c.is_control()));
        assert_eq!(Email::parse(e.as_str()).as_ref(), Ok(&e));
    }
    if let Ok(p) = Phone::parse(s) {
        let digits = &p.as_str()[1..];
        assert!(p.as_str().starts_with('+'));
        assert!((Phone::MIN_DIGITS..=Phone::MAX_DIGITS).contains(&digits.len()));
        assert!(digits.bytes().all(|b| b.is_ascii_digit()) && !digits.starts_with('0'));
        assert_eq!(Phone::parse(p.as_str()).as_ref(), Ok(&p));
    }
});
