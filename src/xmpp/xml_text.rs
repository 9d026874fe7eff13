//! Text that XML 1.0 can carry, and serialising stanzas without the chance of a panic.
//!
//! XML 1.0 allows tab, line feed, carriage return and every other character except the C0
//! controls, the surrogates (which a Rust `str` cannot hold anyway) and U+FFFE/U+FFFF. Text from
//! outside XMPP (an email reply, an SMS, an HTML entity such as `&#1;` turned into text) can hold
//! any of them, and minidom's serialiser panics on such a character instead of returning an
//! error. So:
//!
//! - [`clean`] is applied once, where outside text enters the core's vocabulary
//!   (`Core::handle`, see `crate::core::clean_event`): forbidden characters are dropped, except
//!   vertical tab and form feed, which become a line feed (they separate lines in an SMS or a
//!   mail body).
//! - [`to_xml`] is the only way Reach turns an element into text to store or send: it checks
//!   every text and attribute value first and returns [`UnsafeXml`] rather than panicking, so a
//!   bug that lets such a character through costs one item, not the process.

use std::borrow::Cow;

use minidom::{Element, Node};

/// Whether XML 1.0 (its `Char` production) allows `c` in text and attribute values.
pub fn is_xml_char(c: char) -> bool {
    matches!(c, '\t' | '\n' | '\r')
        || ('\u{20}'..='\u{D7FF}').contains(&c)
        || ('\u{E000}'..='\u{FFFD}').contains(&c)
        || c >= '\u{10000}'
}

/// `text` with every character XML 1.0 forbids removed; vertical tab and form feed become a
/// line feed. Borrows when there is nothing to change (the common case).
pub fn clean(text: &str) -> Cow<'_, str> {
    if text.chars().all(is_xml_char) {
        return Cow::Borrowed(text);
    }
    Cow::Owned(
        text.chars()
            .filter_map(|c| match c {
                '\u{0B}' | '\u{0C}' => Some('\n'),
                c if is_xml_char(c) => Some(c),
                _ => None,
            })
            .collect(),
    )
}

/// Cleans a `String` in place (see [`clean`]).
pub fn clean_in_place(text: &mut String) {
    if let Cow::Owned(cleaned) = clean(text) {
        *text = cleaned;
    }
}

/// An element that cannot be serialised: a text or attribute value holds a character XML 1.0
/// forbids.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("<{element}> holds U+{code:04X}, which XML 1.0 cannot carry (in {place})")]
pub struct UnsafeXml {
    /// The name of the element holding it.
    pub element: String,
    /// `text` or `attribute NAME`.
    pub place: String,
    /// The offending character.
    pub code: u32,
}

/// Checks that every text and attribute value of `el` and its descendants can be serialised.
pub fn check(el: &Element) -> Result<(), UnsafeXml> {
    for ((_, name), value) in el.attrs() {
        if let Some(bad) = value.chars().find(|c| !is_xml_char(*c)) {
            return Err(UnsafeXml {
                element: el.name().to_owned(),
                place: format!("attribute {name}"),
                code: bad as u32,
            });
        }
    }
    for node in el.nodes() {
        match node {
            Node::Element(child) => check(child)?,
            Node::Text(text) => {
                if let Some(bad) = text.chars().find(|c| !is_xml_char(*c)) {
                    return Err(UnsafeXml {
                        element: el.name().to_owned(),
                        place: "text".to_owned(),
                        code: bad as u32,
                    });
                }
            }
        }
    }
    Ok(())
}

/// The element as XML text, or why it cannot be written. Never panics on content.
pub fn to_xml(el: &Element) -> Result<String, UnsafeXml> {
    check(el)?;
    let mut bytes = Vec::new();
    el.write_to(&mut bytes).map_err(|e| UnsafeXml {
        element: el.name().to_owned(),
        place: format!("serialiser: {e}"),
        code: 0,
    })?;
    String::from_utf8(bytes).map_err(|_| UnsafeXml {
        element: el.name().to_owned(),
        place: "serialiser output".to_owned(),
        code: 0,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::xmpp::stanza::{an, chat, NONE};

    #[test]
    fn xml_chars_follow_the_char_production() {
        for ok in [
            '\t',
            '\n',
            '\r',
            ' ',
            'a',
            '\u{D7FF}',
            '\u{E000}',
            '\u{FFFD}',
            '\u{10000}',
        ] {
            assert!(is_xml_char(ok), "{:?}", ok);
        }
        for bad in [
            '\0', '\u{1}', '\u{8}', '\u{B}', '\u{C}', '\u{1F}', '\u{FFFE}', '\u{FFFF}',
        ] {
            assert!(!is_xml_char(bad), "{:?}", bad);
        }
    }

    #[test]
    fn clean_drops_controls_and_keeps_line_structure() {
        assert_eq!(clean("yes\u{1} I am"), "yes I am");
        assert_eq!(clean("line one\u{C}line two"), "line one\nline two");
        assert_eq!(clean("tab\there\r\nok"), "tab\there\r\nok");
        assert_eq!(clean("\u{FFFE}x\u{FFFF}\0"), "x");
        assert_eq!(clean("emoji 😀 stays"), "emoji 😀 stays");
        assert!(matches!(clean("plain"), Cow::Borrowed(_)));
        let mut s = "a\u{7}b".to_owned();
        clean_in_place(&mut s);
        assert_eq!(s, "ab");
    }

    #[test]
    fn to_xml_refuses_a_forbidden_character_instead_of_panicking() {
        let body = chat("a@d", "b@e", "yes\u{1} I am");
        let err = to_xml(&body).unwrap_err();
        assert_eq!(err.element, "body");
        assert_eq!(err.code, 1);
        assert_eq!(
            err.to_string(),
            "<body> holds U+0001, which XML 1.0 cannot carry (in text)"
        );

        let mut attr = chat("a@d", "b@e", "fine");
        attr.set_attr(NONE, an("id"), "x\u{FFFF}");
        let err = to_xml(&attr).unwrap_err();
        assert_eq!((err.place.as_str(), err.code), ("attribute id", 0xFFFF));
    }

    #[test]
    fn cleaned_text_always_serialises_and_reads_back_the_same() {
        let nasty: String = (0u32..0x110)
            .chain([0xD7FF, 0xE000, 0xFFFD, 0xFFFE, 0xFFFF, 0x10000, 0x10FFFF])
            .filter_map(char::from_u32)
            .collect();
        let cleaned = clean(&nasty).into_owned();
        let xml = to_xml(&chat("a@d", "b@e", &cleaned)).unwrap();
        let back: Element = xml.parse().unwrap();
        let text = back
            .get_child("body", crate::xmpp::stanza::STANZA_NS)
            .unwrap()
            .text();
        // A carriage return is written as `&#xd;`, so it survives the reader's line-end rules.
        assert_eq!(text, cleaned);
    }
}
