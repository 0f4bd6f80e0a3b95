//! `pgherd-agent --validate-config`: exit codes and located error messages.

use std::process::Command;

const VALID: &str = include_str!("fixtures/agent/valid.yml");

fn validate(text: &str) -> (i32, String, String) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("node.yml");
    std::fs::write(&path, text).unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_pgherd-agent"))
        .arg("--validate-config")
        .arg(&path)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

#[test]
fn valid_config_passes_validation() {
    let (code, out, _) = validate(VALID);
    assert_eq!(code, 0);
    assert!(out.contains("configuration is valid"), "{out}");
}

#[test]
fn unknown_key_fails_with_file_line_and_column() {
    let bad = VALID.replace("  use_slots: true", "  use_slotz: true");
    let line = bad.lines().position(|l| l.contains("use_slotz")).unwrap() + 1;
    let (code, _, err) = validate(&bad);
    assert_eq!(code, 2);
    assert!(err.contains(&format!("node.yml:{line}:")), "{err}");
    assert!(err.contains("use_slotz"), "{err}");
}

#[test]
fn yaml_syntax_error_is_located() {
    let bad = VALID.replace("name: node1", "name: [node1");
    let (code, _, err) = validate(&bad);
    assert_eq!(code, 2);
    assert!(err.contains("node.yml:"), "{err}");
}

#[test]
fn unsafe_timing_is_rejected_with_the_rule() {
    let bad = VALID.replace("ttl: 10", "ttl: 7");
    let (code, _, err) = validate(&bad);
    assert_eq!(code, 2);
    assert!(
        err.contains("loop_wait + 2*retry_timeout must be <= ttl"),
        "{err}"
    );
}

#[test]
fn missing_file_is_a_clear_error() {
    let out = Command::new(env!("CARGO_BIN_EXE_pgherd-agent"))
        .args(["--validate-config", "/nonexistent/pgherd.yml"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("/nonexistent/pgherd.yml") && err.contains("cannot read"),
        "{err}"
    );
}

#[test]
fn secrets_never_appear_in_validation_errors() {
    let bad = VALID.replace("safety_margin: 5", "safety_margin: lots");
    let (_, out, err) = validate(&bad);
    // (The secrets contain `_`, which a random temporary directory name in the error never
    // does: a bare "pw1" once matched one.)
    for secret in ["s3cret", "pw_1", "pw_2", "pw_3"] {
        assert!(
            !out.contains(secret) && !err.contains(secret),
            "secret {secret} leaked: {err}"
        );
    }
}

#[test]
fn error_next_to_a_password_does_not_echo_it() {
    let bad = VALID.replace(
        "superuser: {username: postgres, password: pw_1}",
        "superuser: {username: postgres, password: pw_1, pasword: oops}",
    );
    let (code, out, err) = validate(&bad);
    assert_eq!(code, 2);
    assert!(err.contains("pasword"), "{err}");
    assert!(
        !out.contains("pw_1") && !err.contains("pw_1"),
        "password leaked: {err}"
    );
}
