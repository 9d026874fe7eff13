//! The `reach` command line as an admin uses it: checking a configuration file.

use std::process::Command;

fn reach(args: &[&str]) -> (bool, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_reach"))
        .args(args)
        .output()
        .expect("run reach");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

#[test]
fn check_config_accepts_the_example_and_hides_the_secret() {
    let example = concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml.example");
    let (ok, text) = reach(&["check-config", example]);
    assert!(ok, "{text}");
    assert!(text.contains("reach.example.org"), "{text}");
    assert!(
        !text.contains("change-me"),
        "the secret must not be printed: {text}"
    );
}

#[test]
fn check_config_names_the_unknown_key_and_fails() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    let example =
        std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/config.toml.example"))
            .unwrap();
    std::fs::write(
        &path,
        example.replace("[users]", "[users]\nallowed_domain = [\"x.org\"]"),
    )
    .unwrap();
    let (ok, text) = reach(&["check-config", path.to_str().unwrap()]);
    assert!(!ok);
    assert!(text.contains("allowed_domain"), "{text}");
}

#[test]
fn running_with_a_missing_file_fails_with_a_readable_message() {
    let (ok, text) = reach(&["--config", "/nonexistent/reach.toml"]);
    assert!(!ok);
    assert!(text.contains("/nonexistent/reach.toml"), "{text}");
    let (ok, text) = reach(&["frobnicate"]);
    assert!(!ok);
    assert!(text.contains("usage"), "{text}");
}
