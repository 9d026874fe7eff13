//! Golden fixtures for reading emailed replies (`reach::email::extract`), in the style of
//! mail-parser's own: `tests/fixtures/email/<category>/<name>.eml` with, next to it,
//!
//! - `<name>.txt`: the expected `Reply::text`, exactly (one final newline of the file is ignored);
//! - `<name>.auto` (optional): the expected `Automatic` variant name (`Bounce`, `AutoSubmitted`...);
//!   without it the mail must not be automatic;
//! - `<name>.err` (optional, instead of `.txt`): the expected `ExtractError` variant name;
//! - `<name>.subject` (optional): the expected decoded `Reply::subject`;
//! - `<name>.needs` (optional): `full_encoding` when the fixture needs mail-parser's
//!   `full_encoding` feature (ISO-2022-JP, Shift_JIS...). Without the feature such a fixture is
//!   reported as skipped, not failed.
//!
//! Every fixture is checked as written (LF line ends) and with CRLF line ends, as SMTP delivers
//! it. All mismatches are reported together. `REACH_BLESS=1 cargo test --test integration extract_golden`
//! rewrites the `.txt` files from the current output (review the diff before committing).
//!
//! The robustness test feeds every prefix of every fixture, byte mutations and random garbage
//! to `parse_reply`, which must return (Ok or Err) without panicking.

use std::fs;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use reach::email::extract::parse_reply;

const CATEGORIES: &[&str] = &["clients", "automatic", "malformed"];

fn fixtures_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/email")
}

/// All `.eml` fixtures, sorted, as (category, path).
fn fixtures() -> Vec<(&'static str, PathBuf)> {
    let mut all = Vec::new();
    for &category in CATEGORIES {
        let dir = fixtures_root().join(category);
        let mut emls: Vec<PathBuf> = fs::read_dir(&dir)
            .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
            .map(|entry| entry.expect("directory entry").path())
            .filter(|p| p.extension().is_some_and(|e| e == "eml"))
            .collect();
        emls.sort();
        assert!(!emls.is_empty(), "no fixtures in {}", dir.display());
        all.extend(emls.into_iter().map(|p| (category, p)));
    }
    all
}

fn read_sidecar(eml: &Path, ext: &str) -> Option<String> {
    let text = fs::read_to_string(eml.with_extension(ext)).ok()?;
    Some(text.strip_suffix('\n').unwrap_or(&text).to_string())
}

fn to_crlf(raw: &[u8]) -> Option<Vec<u8>> {
    if raw.windows(2).any(|w| w == b"\r\n") {
        return None;
    }
    let mut out = Vec::with_capacity(raw.len() + raw.len() / 20);
    for &b in raw {
        if b == b'\n' {
            out.push(b'\r');
        }
        out.push(b);
    }
    Some(out)
}

/// Whether this build of mail-parser decodes ISO-2022-JP (its `full_encoding` feature).
fn has_full_encoding() -> bool {
    let raw = b"From: a@example.com\r\nContent-Type: text/plain; charset=iso-2022-jp\r\n\r\n\x1b$B$3$s\x1b(B\r\n";
    parse_reply(raw).is_ok_and(|reply| reply.text == "こん")
}

/// A side-by-side, line-numbered view of two texts, marking the lines that differ.
fn diff(expected: &str, actual: &str) -> String {
    let expected: Vec<&str> = expected.split('\n').collect();
    let actual: Vec<&str> = actual.split('\n').collect();
    let mut out = String::new();
    for i in 0..expected.len().max(actual.len()) {
        let (e, a) = (expected.get(i), actual.get(i));
        let mark = if e == a { ' ' } else { '!' };
        out.push_str(&format!(
            "    {mark}{:>3} expected {:?}\n    {mark}{:>3} actual   {:?}\n",
            i + 1,
            e.copied().unwrap_or("<none>"),
            i + 1,
            a.copied().unwrap_or("<none>"),
        ));
    }
    out
}

fn check(name: &str, raw: &[u8], eml: &Path, failures: &mut Vec<String>) {
    let expected_err = read_sidecar(eml, "err");
    let expected_auto = read_sidecar(eml, "auto");
    let result = catch_unwind(AssertUnwindSafe(|| parse_reply(raw)));
    let result = match result {
        Ok(result) => result,
        Err(_) => {
            failures.push(format!("{name}: parse_reply panicked"));
            return;
        }
    };
    match (result, expected_err) {
        (Err(e), Some(want)) => {
            if format!("{e:?}") != want.trim() {
                failures.push(format!("{name}: expected error {want}, got {e:?}"));
            }
        }
        (Err(e), None) => failures.push(format!("{name}: unexpected error {e:?} ({e})")),
        (Ok(reply), Some(want)) => failures.push(format!(
            "{name}: expected error {want}, got Ok with text {:?}",
            reply.text
        )),
        (Ok(reply), None) => {
            let actual_auto = reply.automatic.as_ref().map(|a| a.kind());
            if actual_auto != expected_auto.as_deref().map(str::trim) {
                failures.push(format!(
                    "{name}: automatic: expected {expected_auto:?}, got {:?}",
                    reply.automatic
                ));
            }
            if reply.automatic.is_none() && reply.from.is_none() {
                failures.push(format!("{name}: an IM-bound reply has no From"));
            }
            if let Some(subject) = read_sidecar(eml, "subject") {
                if reply.subject.as_deref() != Some(subject.as_str()) {
                    failures.push(format!(
                        "{name}: subject: expected {subject:?}, got {:?}",
                        reply.subject
                    ));
                }
            }
            let txt = eml.with_extension("txt");
            if std::env::var_os("REACH_BLESS").is_some() {
                fs::write(&txt, format!("{}\n", reply.text)).expect("write .txt");
                return;
            }
            match read_sidecar(eml, "txt") {
                None => failures.push(format!("{name}: missing {}", txt.display())),
                Some(expected) if expected != reply.text => failures.push(format!(
                    "{name}: text differs\n{}",
                    diff(&expected, &reply.text)
                )),
                Some(_) => {}
            }
        }
    }
}

#[test]
fn golden_fixtures() {
    let full_encoding = has_full_encoding();
    let mut failures = Vec::new();
    let mut skipped = Vec::new();
    let mut checked = 0;
    for (category, eml) in fixtures() {
        let stem = eml.file_stem().unwrap_or_default().to_string_lossy();
        let name = format!("{category}/{stem}");
        let needs = read_sidecar(&eml, "needs").unwrap_or_default();
        if needs.trim() == "full_encoding" && !full_encoding {
            skipped.push(name);
            continue;
        }
        let raw = fs::read(&eml).expect("read fixture");
        check(&name, &raw, &eml, &mut failures);
        if let Some(crlf) = to_crlf(&raw) {
            check(&format!("{name} (CRLF)"), &crlf, &eml, &mut failures);
        }
        checked += 1;
    }
    if !skipped.is_empty() {
        eprintln!(
            "SKIPPED (mail-parser built without its `full_encoding` feature): {}",
            skipped.join(", ")
        );
    }
    assert!(checked >= 20, "only {checked} fixtures checked");
    assert!(
        failures.is_empty(),
        "{} of the golden checks failed:\n\n{}",
        failures.len(),
        failures.join("\n\n")
    );
}

#[test]
fn every_fixture_has_its_expectations() {
    for (_, eml) in fixtures() {
        assert!(
            eml.with_extension("txt").exists() || eml.with_extension("err").exists(),
            "{} has neither .txt nor .err",
            eml.display()
        );
    }
    for &category in CATEGORIES {
        for entry in fs::read_dir(fixtures_root().join(category)).expect("category dir") {
            let path = entry.expect("entry").path();
            assert!(
                path.with_extension("eml").exists(),
                "{} has no .eml beside it",
                path.display()
            );
        }
    }
}

#[test]
fn automatic_fixtures_are_all_automatic() {
    for (category, eml) in fixtures() {
        let has_auto = eml.with_extension("auto").exists();
        assert_eq!(
            category == "automatic",
            has_auto,
            "{}: .auto files belong in automatic/ and every mail there needs one",
            eml.display()
        );
    }
}

/// A small deterministic generator (xorshift64*), so failures reproduce without a seed file.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n as u64) as usize
    }
}

fn must_not_panic(what: &str, raw: &[u8], failures: &mut Vec<String>) {
    if catch_unwind(AssertUnwindSafe(|| parse_reply(raw))).is_err() {
        failures.push(what.to_string());
    }
}

#[test]
fn truncated_mutated_and_garbage_input_never_panics() {
    let mut failures = Vec::new();
    let mut rng = Rng(0x5eed_1234_abcd_ef01);
    // Bytes that matter to MIME parsers, to make mutations interesting.
    const SPICE: &[u8] = b"\r\n-=?:;\"<>\\ \t\x00\xff\x1b";
    for (category, eml) in fixtures() {
        let raw = fs::read(&eml).expect("read fixture");
        let name = format!("{category}/{}", eml.display());
        for end in 0..=raw.len() {
            must_not_panic(
                &format!("{name}: prefix of {end} bytes"),
                &raw[..end],
                &mut failures,
            );
        }
        for round in 0..200 {
            let mut mutated = raw.clone();
            for _ in 0..1 + rng.below(4) {
                if mutated.is_empty() {
                    break;
                }
                let at = rng.below(mutated.len());
                match rng.below(3) {
                    0 => mutated[at] = SPICE[rng.below(SPICE.len())],
                    1 => {
                        mutated.remove(at);
                    }
                    _ => mutated.insert(at, rng.next() as u8),
                }
            }
            must_not_panic(
                &format!("{name}: mutation round {round}"),
                &mutated,
                &mut failures,
            );
        }
    }
    for round in 0..500 {
        let len = rng.below(2048);
        let garbage: Vec<u8> = (0..len)
            .map(|_| {
                if rng.below(3) == 0 {
                    SPICE[rng.below(SPICE.len())]
                } else {
                    rng.next() as u8
                }
            })
            .collect();
        must_not_panic(&format!("garbage round {round}"), &garbage, &mut failures);
        let mut with_headers =
            b"From: a@example.com\r\nContent-Type: multipart/mixed; boundary=\"b\"\r\n\r\n--b\r\n"
                .to_vec();
        with_headers.extend_from_slice(&garbage);
        must_not_panic(
            &format!("garbage-with-headers round {round}"),
            &with_headers,
            &mut failures,
        );
    }
    // Deep nesting must not overflow the stack.
    let mut deep = b"From: a@example.com\r\n".to_vec();
    for level in 0..2000 {
        deep.extend_from_slice(
            format!("Content-Type: multipart/mixed; boundary=\"b{level}\"\r\n\r\n--b{level}\r\n")
                .as_bytes(),
        );
    }
    deep.extend_from_slice(b"\r\nhello\r\n");
    must_not_panic("2000 nested multiparts", &deep, &mut failures);
    let mut deep_html = b"From: a@example.com\r\nContent-Type: text/html\r\n\r\n".to_vec();
    deep_html.extend(std::iter::repeat_n(b"<blockquote><div>".as_slice(), 5000).flatten());
    must_not_panic("deeply nested html", &deep_html, &mut failures);
    assert!(
        failures.is_empty(),
        "parse_reply panicked on {} inputs:\n{}",
        failures.len(),
        failures.join("\n")
    );
}
