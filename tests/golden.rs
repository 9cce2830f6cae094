//! Golden tests: `ces-stream replay` on small hand-checked inputs under
//! `tests/golden/*/` (see each NOTES.md) must reproduce `expected.jsonl` and
//! `expected_dead.jsonl` exactly, and exit 0 with a summary on stderr.

use std::path::Path;
use std::process::Command;

fn run_case(name: &str) {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/golden")
        .join(name);
    let tmp = tempfile::tempdir().unwrap();
    let out = tmp.path().join("out.jsonl");
    let dead = tmp.path().join("dead.jsonl");
    let result = Command::new(env!("CARGO_BIN_EXE_ces-stream"))
        .arg("replay")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .arg("--input")
        .arg(dir.join("input.jsonl"))
        .arg("--output")
        .arg(&out)
        .arg("--dead-letter")
        .arg(&dead)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(result.status.success(), "{name}: replay failed: {stderr}");
    assert!(
        stderr.contains("replay:") && stderr.contains("accepted"),
        "{stderr}"
    );
    for (actual, expected) in [(&out, "expected.jsonl"), (&dead, "expected_dead.jsonl")] {
        let actual = std::fs::read_to_string(actual).unwrap();
        let expected = std::fs::read_to_string(dir.join(expected)).unwrap();
        assert_eq!(actual, expected, "{name}: {actual}");
    }
}

#[test]
fn basics() {
    run_case("basics");
}

#[test]
fn segment() {
    run_case("segment");
}

#[test]
fn invalid() {
    run_case("invalid");
}

#[test]
fn v2() {
    run_case("v2");
}

#[test]
fn stdin_and_stdout() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/basics");
    let input = std::fs::read(dir.join("input.jsonl")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_ces-stream"))
        .args(["replay", "--input", "-", "--config"])
        .arg(dir.join("config.toml"))
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    child.stdin.take().unwrap().write_all(&input).unwrap();
    let result = child.wait_with_output().unwrap();
    assert!(result.status.success());
    let expected = std::fs::read(dir.join("expected.jsonl")).unwrap();
    assert_eq!(result.stdout, expected);
}

#[test]
fn a_bad_config_fails_before_reading_events() {
    let tmp = tempfile::tempdir().unwrap();
    let config = tmp.path().join("bad.toml");
    std::fs::write(
        &config,
        "[scoring]\nhalf_life = \"-3d\"\n[scoring.activities]\nx = {weight = 1}\n",
    )
    .unwrap();
    let result = Command::new(env!("CARGO_BIN_EXE_ces-stream"))
        .args(["replay", "--input", "/nonexistent/input.jsonl", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!result.status.success());
    let stderr = String::from_utf8_lossy(&result.stderr);
    assert!(
        stderr.contains("scoring.half_life") && stderr.contains("negative"),
        "{stderr}"
    );
    assert!(
        !stderr.contains("nonexistent"),
        "the config is checked first: {stderr}"
    );
}

#[test]
fn check_config_prints_the_effective_model() {
    let result = Command::new(env!("CARGO_BIN_EXE_ces-stream"))
        .arg("check-config")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/invalid/config.toml"))
        .output()
        .unwrap();
    assert!(result.status.success());
    let text = String::from_utf8(result.stdout).unwrap();
    // Defaults the file does not set are written out.
    for line in [
        "half_life = \"14d\"",
        "tier_hysteresis = 0.0",
        "dedup_depth = 4",
        "kind = \"saturating\"",
        "half_score_at = 40.0",
        "sweep_interval = \"1h\"",
        "min_delta = 5.0",
        "max_event_bytes = 300",
        "name = \"very_engaged\"",
        "channel = \"default\"",
    ] {
        assert!(text.contains(line), "missing {line:?} in\n{text}");
    }
}
