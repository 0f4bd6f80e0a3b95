//! `--json` on the verbs that report, run as the built binary wherever that is possible
//! without a cluster: `check --offline` prints one document (and the text stays as it was
//! without the flag); an invalid inventory or an unreachable host is still an `error:` on
//! stderr with the usual exit code and nothing on stdout; `lab status` of a lab that was never
//! built. The documents of `plan`, `apply`, `restart --pending` and `drill` are built from
//! fixture plans in the unit tests of `src/cli/json.rs` and `src/cli/drill.rs`. No service is
//! started; the only connection attempted is to a closed port on 127.0.0.1.

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn pgherd(args: &[&str], state: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_pgherd"))
        .args(args)
        .arg("--state-dir")
        .arg(state)
        .output()
        .unwrap()
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

/// The example inventory, copied where its generated secrets file may be written.
fn example(dir: &Path) -> String {
    let inv = dir.join("inv.yml");
    std::fs::copy("inventories/example.yml", &inv).unwrap();
    inv.display().to_string()
}

#[test]
fn check_offline_json_is_one_document_with_hosts_files_and_the_agent_binary() {
    let dir = tempfile::tempdir().unwrap();
    let inv = example(dir.path());
    let state = dir.path().join("st");
    let agent = env!("CARGO_BIN_EXE_pgherd-agent");
    let out = pgherd(
        &[
            "check",
            "--offline",
            "--json",
            "-i",
            &inv,
            "--agent-binary",
            agent,
        ],
        &state,
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    // The whole of stdout is the document.
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["inventory"], inv.as_str());
    assert_eq!(doc["hosts"], 3);
    assert_eq!(doc["playbook"]["origin"], "playbooks/deploy.yml");
    assert!(doc["playbook"]["steps"].as_u64().unwrap() > 10);
    let rendered = doc["rendered"].as_array().unwrap();
    assert_eq!(rendered.len(), 3);
    assert_eq!(rendered[0]["host"], "pg1");
    assert_eq!(rendered[0]["address"], "10.0.0.11");
    assert!(rendered[0]["files"].as_u64().unwrap() > 0);
    let size = std::fs::metadata(agent).unwrap().len();
    assert_eq!(doc["agent_binary"]["bytes"], size);
    let sha = doc["agent_binary"]["sha256"].as_str().unwrap();
    assert!(
        sha.len() == 64 && sha.bytes().all(|b| b.is_ascii_hexdigit()),
        "{sha}"
    );
    assert_eq!(doc["offline"], true);
    assert_eq!(doc["reached"], serde_json::json!([]));
    assert!(!state.exists(), "offline: no SSH state, no connection");
    // No generated password reaches the document.
    let secrets = std::fs::read_to_string(dir.path().join("inv.secrets.yml")).unwrap();
    for pw in secrets
        .lines()
        .filter(|l| !l.trim_start().starts_with('#'))
        .filter_map(|l| l.split_once(": ").map(|(_, v)| v.trim()))
    {
        assert!(!text(&out.stdout).contains(pw), "secret in the document");
    }

    // Without --json: the lines, with the same facts.
    let out = pgherd(
        &["check", "--offline", "-i", &inv, "--agent-binary", agent],
        &state,
    );
    let lines = text(&out.stdout);
    assert!(out.status.success());
    assert!(
        lines.starts_with(&format!("inventory {inv}: valid (3 hosts)\n")),
        "{lines}"
    );
    assert!(
        lines.contains(&format!(
            "agent binary: {size} bytes (sha256 {}",
            &sha[..12]
        )),
        "{lines}"
    );
    assert!(
        lines.ends_with("check passed (offline: no host contacted)\n"),
        "{lines}"
    );
}

/// Runs each of `runs` and checks it failed with `code`, printed nothing on stdout (no
/// document) and an `error: …` on stderr that `says` holds for.
fn fails_without_document(
    runs: &[Vec<&str>],
    state: &Path,
    code: i32,
    says: impl Fn(&str) -> bool,
) {
    for args in runs {
        let out = pgherd(args, state);
        let err = text(&out.stderr);
        assert_eq!(out.status.code(), Some(code), "{args:?}: {err}");
        assert!(out.stdout.is_empty(), "{args:?}: {}", text(&out.stdout));
        assert!(err.starts_with("error: ") && says(&err), "{args:?}: {err}");
    }
}

#[test]
fn an_invalid_inventory_under_json_is_a_located_error_on_stderr_and_no_document() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("bad.yml");
    // Line 4: `adress:`, a typo'd host key.
    std::fs::copy("tests/fixtures/inventories/bad/unknown_key_host.yml", &inv).unwrap();
    let inv = inv.display().to_string();
    let state = dir.path().join("st");
    let runs = [
        vec!["plan", "--json", "-i", &inv],
        vec!["apply", "--json", "-y", "-i", &inv],
        vec!["check", "--json", "--offline", "-i", &inv],
        vec!["remove", "n9", "--json", "-y", "-i", &inv],
        vec!["status", "--json", "-i", &inv],
        vec!["restart", "--pending", "--json", "-y", "-i", &inv],
        vec!["drill", "switchover", "--json", "-y", "-i", &inv],
    ];
    fails_without_document(&runs, &state, 2, |err| {
        err.contains("bad.yml:4:") && err.contains("adress")
    });
    assert!(!state.exists(), "nothing may be set up before validation");
}

#[test]
fn an_unreachable_host_under_json_is_an_error_naming_it_and_no_document() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("inv.yml");
    // Nothing listens on port 1 of the loopback address: the connection is refused at once.
    std::fs::write(
        &inv,
        "cluster: offline\nssh:\n  port: 1\n  connect_timeout: 2\nhosts:\n  - name: n1\n    address: 127.0.0.1\n    roles: [postgres, etcd, haproxy]\n",
    )
    .unwrap();
    let inv = inv.display().to_string();
    let runs = [
        vec!["plan", "--json", "-i", &inv],
        vec!["apply", "--json", "-y", "-i", &inv],
        vec!["check", "--json", "-i", &inv],
    ];
    fails_without_document(&runs, &dir.path().join("st"), 1, |err| {
        err.starts_with("error: cannot connect to 1 host(s)") && err.contains("n1")
    });
}

#[test]
fn lab_status_json_lists_the_hosts_of_a_lab_never_built_as_down() {
    // `lab status` reads /run/netns and /proc only, but requires root like every lab verb.
    if unsafe { libc::geteuid() } != 0 {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let lab = dir.path().join("lab");
    let out = pgherd(
        &[
            "lab",
            "status",
            "--json",
            "--name",
            "jsonchk",
            "--lab-dir",
            lab.to_str().unwrap(),
        ],
        &dir.path().join("st"),
    );
    assert!(out.status.success(), "{}", text(&out.stderr));
    let doc: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(doc["lab"], "jsonchk");
    assert_eq!(
        doc["hosts"][0],
        serde_json::json!({"name": "jsonchk1", "address": "10.230.0.11", "up": false, "partitioned": false})
    );
}

#[test]
fn json_is_a_usage_error_where_the_verb_reports_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let inv = example(dir.path());
    let state = dir.path().join("st");
    // Day-2 actions print one sentence; `restart` reports only with --pending.
    for args in [
        vec!["restart", "--json", "-i", &inv],
        vec!["switchover", "--json", "-i", &inv],
        vec!["pause", "--json", "-i", &inv],
    ] {
        let out = pgherd(&args, &state);
        assert_eq!(out.status.code(), Some(2), "{args:?}");
        assert!(out.stdout.is_empty(), "{args:?}");
    }
}
