//! `pgherd drill` on a real namespace lab (subnet 10.232.28.0/24, bridge `phdr0`): three hosts
//! `[postgres, etcd, haproxy]`, `synchronous_mode: true`, `watchdog: automatic` (no device in
//! the lab, so the fence guards the leader), the fast profile. Every fault of the seed
//! failure model once (kill-pg, kill-agent, freeze-agent, the leader host's crash,
//! replica-crash, isolate-primary, etcd-minority, etcd-majority, sync-standby-crash), then ten
//! rounds of random faults (`--rounds 10 --seed 1`). The drill's own checks are the
//! assertions: in every round no acknowledged write lost (probe and direct writes, read back
//! on the final leader), never two writable primaries (direct writes to every node, by the
//! server clock), the cluster reconverged with writes flowing; the command exits 0.
//!
//! Needs root (namespaces); skipped with a message otherwise.

use std::path::Path;
use std::time::Duration;

use pgherd::lab::LabSpec;
use serde_json::Value;

mod common;
use common::deploy::{
    agent_logs, apply_inventory_within, fresh_lab, is_root, leader_with_streaming_replicas,
};

const SUBNET: &str = "10.232.28";

/// Runs `pgherd drill ... --json -y` and returns (exit ok, the document, stderr).
fn drill(state: &Path, inv: &Path, args: &[&str]) -> (bool, Value, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgherd"))
        .arg("--state-dir")
        .arg(state)
        .arg("drill")
        .args(args)
        .args(["--json", "-y", "-i"])
        .arg(inv)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("pgherd drill");
    let stderr = String::from_utf8_lossy(&out.stderr).to_string();
    let doc = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|e| panic!("drill {args:?} printed no document ({e}); stderr:\n{stderr}"));
    (out.status.success(), doc, stderr)
}

/// Every round of `doc` passed the drill's checks; prints the measured figures.
fn assert_rounds_pass(doc: &Value, what: &str, logs: &str) {
    let rounds = doc["rounds"].as_array().expect("rounds");
    assert!(!rounds.is_empty(), "{what}: no round ran");
    for r in rounds {
        println!(
            "MEASURED {what} round {} {} on {}: {} → {}, write-unavailable {} s, reconverged {} s, {} acknowledged, {} lost",
            r["round"],
            r["fault"],
            r["target"],
            r["old_leader"],
            r["new_leader"],
            r["write_unavailable_s"],
            r["reconverged_after_s"],
            r["acknowledged"],
            r["lost_count"]
        );
        assert_eq!(r["error"], Value::Null, "{what}: {r}");
        assert_eq!(
            r["two_primaries"],
            Value::Null,
            "{what}: two primaries: {r}"
        );
        assert_eq!(r["lost_count"], 0, "{what}: acknowledged writes lost: {r}");
        assert!(
            r["acknowledged"].as_u64().unwrap_or(0) > 0,
            "{what}: nothing was written: {r}"
        );
        assert!(r["reconverged_after_s"].is_number(), "{what}: {r}");
    }
    assert_eq!(doc["ok"], true, "{what}: {doc}\n{logs}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drills_of_every_fault_and_random_rounds_lose_nothing_and_never_split_the_brain() {
    if !is_root() {
        eprintln!("skipped: drill_lab needs root (network namespaces)");
        return;
    }
    let (tmp, _guard, info) = fresh_lab("pgdr", |dir| LabSpec::new("dr", 3, SUBNET, "phdr0", dir));
    let state = tmp.path().join("st");
    let inv = tmp.path().join("lab.yml");
    let mut y = format!(
        "cluster: drill\nprofile: fast\nsynchronous_mode: true\nssh:\n  user: root\n  port: 22\n  \
         identity_file: {:?}\nhosts:\n",
        info.key_path.display().to_string()
    );
    for h in &info.hosts {
        y.push_str(&format!(
            "  - name: {}\n    address: {}\n    roles: [postgres, etcd, haproxy]\n",
            h.name, h.address
        ));
    }
    y.push_str(&format!(
        "postgresql:\n  pg_hba:\n    - host all all {SUBNET}.0/24 scram-sha-256\nwatchdog:\n  mode: automatic\n"
    ));
    std::fs::write(&inv, y).unwrap();
    let (_fleet, r) = apply_inventory_within(&inv, &state, Duration::from_secs(180)).await;
    r.unwrap_or_else(|e| panic!("apply: {e}"));
    let api = format!("http://{}:8008", info.hosts[0].address);
    leader_with_streaming_replicas(&api, 2).await;

    for fault in [
        "kill-pg",
        "kill-agent",
        "freeze-agent",
        "kill-primary",
        "replica-crash",
        "isolate-primary",
        "etcd-minority",
        "etcd-majority",
        "sync-standby-crash",
    ] {
        let (ok, doc, stderr) = drill(&state, &inv, &[fault, "--hold", "12"]);
        let logs = if doc["ok"] == true {
            String::new()
        } else {
            agent_logs(&info)
        };
        assert_rounds_pass(&doc, fault, &logs);
        assert!(ok, "drill {fault} exited non-zero: {stderr}");
    }
    let (ok, doc, stderr) = drill(&state, &inv, &["--rounds", "10", "--seed", "1"]);
    let logs = if doc["ok"] == true {
        String::new()
    } else {
        agent_logs(&info)
    };
    assert_rounds_pass(&doc, "random", &logs);
    assert_eq!(doc["rounds"].as_array().unwrap().len(), 10);
    assert!(ok, "random rounds exited non-zero: {stderr}");
}
