//! Reply extraction from email: the raw message as received by the SMTP listener.
//!
//! Asserts: `parse_reply` never panics (it returns a `Reply` or an `ExtractError`), and neither
//! do `strip_quoted_and_signature` and `html_to_text` on the input read as UTF-8 (lossily).
//! `strip_quoted_and_signature` must also never make the text longer.
#![no_main]

use libfuzzer_sys::fuzz_target;
use reach::email::extract::{html_to_text, parse_reply, strip_quoted_and_signature};

fuzz_target!(|data: &[u8]| {
    let _ = parse_reply(data);
    let text = String::from_utf8_lossy(data);
    let stripped = strip_quoted_and_signature(&text);
    assert!(
        stripped.len() <= text.len(),
        "stripping quotes made the text longer"
    );
    let _ = html_to_text(&text);
});
