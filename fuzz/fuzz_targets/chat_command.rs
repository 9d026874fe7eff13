//! The chat door: any line a user types to the service `D` in a chat.
//!
//! The chat-command parser (`split_word`/`set_draft` in `src/core/commands.rs`) hands each command
//! straight to the store-backed handlers, so the whole door is fuzzed: the input becomes the body
//! of `<message type='chat'/>` from a registered user (Alice, with an unverified email address and
//! phone) or from a stranger, and goes through `Core::handle`.
//! Asserts: no panic, no store error, and every line gets exactly one chat answer from `D`.
#![no_main]

#[path = "common/harness.rs"]
mod harness;

use harness::{with_harness, xml_text, D, NOW, NS};
use libfuzzer_sys::fuzz_target;
use minidom::Element;
use reach::core::{Action, Event};

fuzz_target!(|data: &[u8]| {
    // First byte: who types (registered Alice, or a stranger); the rest is the line.
    let Some((&who, line)) = data.split_first() else {
        return;
    };
    let from = if who & 1 == 0 {
        "alice@example.org/x"
    } else {
        "stranger@example.org/x"
    };
    let body = xml_text(&String::from_utf8_lossy(line));
    let xml = format!(
        "<message xmlns='{NS}' type='chat' id='c1' from='{from}' to='{D}'><body>{body}</body></message>"
    );
    let Ok(stanza) = xml.parse::<Element>() else {
        return;
    };
    let actions = with_harness(|h| h.handle(NOW, Event::Stanza(stanza)))
        .expect("the chat door must not fail on a temporary store");
    if !body.trim().is_empty() {
        let answers = actions
            .iter()
            .filter(|a| matches!(a, Action::SendStanza(s) if s.name() == "message" && s.attr("to") == Some(from)))
            .count();
        assert_eq!(answers, 1, "one answer per command line: {actions:?}");
    }
});
