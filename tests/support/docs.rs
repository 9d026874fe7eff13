//! The config blocks of the admin guides (`docs/*.md`), for tests that run a server the way a
//! guide says. A block is marked with `reach-doc=NAME` in its fence's info string
//! (```` ```lua reach-doc=NAME ````); `tests/admin_docs.rs` checks that every marked block is
//! run by some test.

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

/// The body of the one block of `docs/DOC.md` marked `marker`. Panics unless there is exactly
/// one.
pub fn block(doc: &str, marker: &str) -> String {
    let path = format!("{ROOT}/docs/{doc}.md");
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {path}: {e}"));
    let mut found = Vec::new();
    let mut lines = text.lines();
    while let Some(line) = lines.next() {
        let Some(info) = line.trim_start().strip_prefix("```") else {
            continue;
        };
        let marked = info
            .split_whitespace()
            .any(|w| w.strip_prefix("reach-doc=") == Some(marker));
        let mut body = String::new();
        for inner in lines.by_ref() {
            if inner.trim_start().starts_with("```") {
                break;
            }
            body.push_str(inner);
            body.push('\n');
        }
        if marked {
            found.push(body);
        }
    }
    assert_eq!(
        found.len(),
        1,
        "docs/{doc}.md must have exactly one block marked reach-doc={marker}"
    );
    found.remove(0)
}

/// `text` with the docs' site domain (`example.org`, Reach at `reach.example.org`) replaced by
/// the test server's `host`; the doc must still name it.
pub fn for_host(text: &str, host: &str) -> String {
    assert!(
        text.contains("example.org"),
        "the doc block no longer names example.org:\n{text}"
    );
    text.replace("example.org", host)
}
