//! SMS text parsing and SMS formatting.
//!
//! Asserts: `parse`, `as_verification_code` and `find_target` (against a fixed list of
//! conversations) never panic; a verification code is always 6 ASCII digits; a found target is
//! one of the conversations; `fit(text, max)` fits in `max` segments (0 counts as 1) and returns a
//! text that fits unchanged; `format_mt(name, text, hint, max)` fits in `max` segments.
//!
//! Input layout: byte 0 = max segments (0..=7), byte 1 bit 0 = with a reply hint; the rest is
//! UTF-8 (lossy), split at the first `\u{1}` into peer name and text when there is one.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reach::sms::format::{fit, format_mt, reply_hint, segments};
use reach::sms::text::{as_verification_code, find_target, parse, Conversation, SmsInput, Target};

fn conversations() -> Vec<Conversation> {
    let c = |peer: &str, name: Option<&str>, last_active| Conversation {
        peer: peer.into(),
        name: name.map(Into::into),
        last_active,
    };
    vec![
        c("bob@example.net", Some("Bob Smith"), 100),
        c("bob.jones@example.com", Some("Bob"), 200),
        c("carol@reach.example.org", None, 150),
        c("dave@example.net", Some("Dâve ✨"), 150),
        c("example.org", None, 10),
    ]
}

fuzz_target!(|data: &[u8]| {
    let (max, hint, rest) = match data {
        [m, h, rest @ ..] => ((*m & 7) as usize, h & 1 == 1, rest),
        _ => (1, false, data),
    };
    let input = String::from_utf8_lossy(rest);
    let convs = conversations();

    // Parsing what the user texted.
    if let Some(code) = as_verification_code(&input) {
        assert!(
            code.len() == 6 && code.bytes().all(|b| b.is_ascii_digit()),
            "{code:?}"
        );
    }
    let target = match parse(&input) {
        SmsInput::Addressed { target, .. } => Some(target),
        SmsInput::Command(_) => {
            // `/msg NAME text` and friends: look the first word up too.
            input.split_whitespace().nth(1).map(str::to_owned)
        }
        _ => None,
    };
    for query in target.iter().map(String::as_str).chain([input.as_ref()]) {
        match find_target(query, &convs) {
            Target::Found(c) => assert!(convs.contains(c)),
            Target::Ambiguous(cs) => {
                assert!(cs.len() >= 2 && cs.iter().all(|c| convs.contains(c)));
                let _ = reach::sms::text::usage_for_ambiguous(&cs);
            }
            _ => {}
        }
    }

    // Formatting what Reach texts.
    let limit = max.max(1);
    let fitted = fit(&input, max);
    assert!(
        segments(&fitted).count <= limit,
        "fit({input:?}, {max}) = {fitted:?}"
    );
    if segments(&input).count <= limit {
        assert_eq!(fitted, input, "a text that fits is returned unchanged");
    }
    let (name, text) = input.split_once('\u{1}').unwrap_or(("Bob", &input));
    let hint = hint.then(|| reply_hint(name));
    let sms = format_mt(name, text, hint.as_deref(), max);
    assert!(
        segments(&sms).count <= limit,
        "format_mt({name:?}, {text:?}, {hint:?}, {max}) = {sms:?}"
    );
});
