//! Small helpers to read and build stanzas as `minidom` elements in the component namespace.
//!
//! The core relays stanzas with all their payloads intact, so it works on elements; these helpers
//! keep the attribute plumbing and error construction in one place.

use minidom::rxml::{Namespace, NcName};
use minidom::Element;
use xmpp_parsers::ns;

/// The "no namespace" of plain attributes.
pub const NONE: Namespace<'static> = Namespace::NONE;

/// An attribute name. Only ever called with literal names, which are valid XML names.
pub fn an(name: &'static str) -> NcName {
    NcName::try_from(name).expect("attribute names in Reach's source are valid XML names")
}

/// The namespace of stanzas on the component stream.
pub const STANZA_NS: &str = ns::DEFAULT_NS;
/// XEP-0333 chat markers.
pub const CHAT_MARKERS: &str = "urn:xmpp:chat-markers:0";
/// XEP-0050 ad-hoc commands.
pub const COMMANDS: &str = "http://jabber.org/protocol/commands";

/// The error type attribute of RFC 6120 §8.3.2.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorType {
    Auth,
    Cancel,
    Modify,
    Wait,
}

impl ErrorType {
    fn as_str(self) -> &'static str {
        match self {
            ErrorType::Auth => "auth",
            ErrorType::Cancel => "cancel",
            ErrorType::Modify => "modify",
            ErrorType::Wait => "wait",
        }
    }
}

/// A stanza error a handler decided on: what the sender will see.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StanzaFault {
    pub type_: ErrorType,
    /// An RFC 6120 defined condition, e.g. `item-not-found`.
    pub condition: &'static str,
    pub text: Option<String>,
}

impl StanzaFault {
    pub fn new(type_: ErrorType, condition: &'static str) -> Self {
        StanzaFault {
            type_,
            condition,
            text: None,
        }
    }

    pub fn with_text(mut self, text: impl Into<String>) -> Self {
        self.text = Some(text.into());
        self
    }

    pub fn bad_request(text: impl Into<String>) -> Self {
        Self::new(ErrorType::Modify, "bad-request").with_text(text)
    }

    pub fn not_acceptable(text: impl Into<String>) -> Self {
        Self::new(ErrorType::Modify, "not-acceptable").with_text(text)
    }

    pub fn item_not_found(text: impl Into<String>) -> Self {
        Self::new(ErrorType::Cancel, "item-not-found").with_text(text)
    }

    pub fn service_unavailable() -> Self {
        Self::new(ErrorType::Cancel, "service-unavailable")
    }

    /// The `<error/>` element.
    pub fn to_element(&self) -> Element {
        let mut error = Element::builder("error", STANZA_NS)
            .attr(an("type"), self.type_.as_str())
            .build();
        error.append_child(Element::builder(self.condition, ns::XMPP_STANZAS).build());
        if let Some(text) = &self.text {
            error.append_child(
                Element::builder("text", ns::XMPP_STANZAS)
                    .append(text.as_str())
                    .build(),
            );
        }
        error
    }
}

/// A stanza's attribute, or "" when missing.
pub fn attr<'a>(el: &'a Element, name: &'a str) -> &'a str {
    el.attr(name).unwrap_or("")
}

/// A new stanza (`message`, `presence` or `iq`) with the given addresses.
pub fn stanza(name: &str, from: &str, to: &str) -> Element {
    Element::builder(name, STANZA_NS)
        .attr(an("from"), from)
        .attr(an("to"), to)
        .build()
}

/// The answer to `original` carrying `fault`: addresses swapped, same kind and id, type error.
pub fn error_reply(original: &Element, fault: &StanzaFault) -> Element {
    let mut reply = stanza(
        original.name(),
        attr(original, "to"),
        attr(original, "from"),
    );
    if let Some(id) = original.attr("id") {
        reply.set_attr(NONE, an("id"), id);
    }
    reply.set_attr(NONE, an("type"), "error");
    reply.append_child(fault.to_element());
    reply
}

/// An iq result answering `request`, with an optional payload.
pub fn iq_result(request: &Element, payload: Option<Element>) -> Element {
    let mut reply = stanza("iq", attr(request, "to"), attr(request, "from"));
    reply.set_attr(NONE, an("id"), attr(request, "id"));
    reply.set_attr(NONE, an("type"), "result");
    if let Some(payload) = payload {
        reply.append_child(payload);
    }
    reply
}

/// A chat message with a body.
pub fn chat(from: &str, to: &str, body: &str) -> Element {
    let mut message = stanza("message", from, to);
    message.set_attr(NONE, an("type"), "chat");
    message.append_child(Element::builder("body", STANZA_NS).append(body).build());
    message
}

/// A presence of the given type (`None` = available).
pub fn presence(from: &str, to: &str, type_: Option<&str>) -> Element {
    let mut p = stanza("presence", from, to);
    if let Some(t) = type_ {
        p.set_attr(NONE, an("type"), t);
    }
    p
}

/// The text of a child in the stanza namespace (`body`, `status`...).
pub fn child_text(el: &Element, name: &str) -> Option<String> {
    el.get_child(name, STANZA_NS).map(|c| c.text())
}

/// Makes `el` a copy of the given stanza with new addresses (all payloads kept).
pub fn readdress(el: &Element, from: &str, to: &str) -> Element {
    let mut copy = el.clone();
    copy.set_attr(NONE, an("from"), from);
    copy.set_attr(NONE, an("to"), to);
    copy
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_reply_swaps_addresses_and_keeps_kind_and_id() {
        let msg: Element = format!(
            "<message xmlns='{STANZA_NS}' from='a@b/c' to='x@reach' id='m1'><body>hi</body></message>"
        )
        .parse()
        .unwrap();
        let reply = error_reply(&msg, &StanzaFault::item_not_found("no such user"));
        assert_eq!(reply.name(), "message");
        assert_eq!(attr(&reply, "from"), "x@reach");
        assert_eq!(attr(&reply, "to"), "a@b/c");
        assert_eq!(attr(&reply, "id"), "m1");
        assert_eq!(attr(&reply, "type"), "error");
        let error = reply.get_child("error", STANZA_NS).unwrap();
        assert_eq!(error.attr("type"), Some("cancel"));
        assert!(error.has_child("item-not-found", ns::XMPP_STANZAS));
        assert_eq!(
            error.get_child("text", ns::XMPP_STANZAS).unwrap().text(),
            "no such user"
        );
    }
}
