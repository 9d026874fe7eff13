//! Stanza-to-event conversion and everything the core does with a stanza.
//!
//! The input is read as one XML element; unless it parses and is in the component namespace
//! `jabber:component:accept` (as everything the server sends over XEP-0114 is), it is ignored.
//! The stanza then goes through `Core::handle(store, now, Event::Stanza(..))` on a temporary
//! store with two registered users (Alice offline with an email address and a phone, Carol
//! online), followed by an `Event::Tick` an hour later so that whatever it queued is forwarded.
//! Asserts: no panic and no `Err` (a temporary store never fails, so an `Err` would be a
//! handler turning bad input into a store error).
#![no_main]

#[path = "common/harness.rs"]
mod harness;

use harness::{with_harness, NOW, NS};
use libfuzzer_sys::fuzz_target;
use minidom::Element;
use reach::core::Event;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let Ok(stanza) = text.parse::<Element>() else {
        return;
    };
    if stanza.ns() != NS {
        return;
    }
    with_harness(|h| {
        if let Err(e) = h.handle(NOW, Event::Stanza(stanza)) {
            panic!("a well-formed stanza made the core fail: {e}");
        }
        if let Err(e) = h.handle(NOW + 3_600, Event::Tick) {
            panic!("the tick after a stanza failed: {e}");
        }
    });
});
