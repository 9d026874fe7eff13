//! The depth guard below the XML parser (src/xmpp/depth_guard.rs).
//!
//! Asserts, for any bytes and any split of them into reads:
//! - `DepthFilter::feed` never panics;
//! - feeding the bytes in pieces gives the same output as feeding them at once;
//! - the output is a fixed point: filtering it again with the same limit changes nothing (so
//!   nothing deeper than the limit survives, and each too-deep element became exactly one marker
//!   at the limit).
#![no_main]

use libfuzzer_sys::fuzz_target;
use reach::xmpp::depth_guard::DepthFilter;

fuzz_target!(|data: &[u8]| {
    let Some((&head, rest)) = data.split_first() else {
        return;
    };
    // The first byte picks the limit (1..=8) and where to split the rest.
    let limit = usize::from(head % 8) + 1;
    let split = usize::from(head) * rest.len() / 256;

    let mut whole = Vec::new();
    DepthFilter::new(limit).feed(rest, &mut whole);

    let mut pieces = Vec::new();
    let mut filter = DepthFilter::new(limit);
    filter.feed(&rest[..split], &mut pieces);
    filter.feed(&rest[split..], &mut pieces);
    assert_eq!(whole, pieces, "the split at {split} changed the output");

    let mut again = Vec::new();
    DepthFilter::new(limit).feed(&whole, &mut again);
    assert_eq!(whole, again, "filtering the output again changed it");
});
