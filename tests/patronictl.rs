//! Compatibility with the unmodified patronictl 4.1.5 from PyPI (installed by
//! `scripts/patronictl-venv.sh`; path in `PGHERD_PATRONICTL`), against a real pgherd cluster.
//! patronictl reads etcd directly (gRPC gateway, v3 JSON API) and calls the agents' REST API,
//! so this exercises both wire formats.

mod common;

use std::process::Command;
use std::time::Duration;

use common::cluster::{API_PW, API_USER, Cluster, ClusterOpts, eventually};

fn patronictl() -> String {
    std::env::var("PGHERD_PATRONICTL")
        .unwrap_or_else(|_| "/var/tmp/pgherd-patroni-venv/bin/patronictl".to_string())
}

struct Ctl {
    config: std::path::PathBuf,
    scope: String,
}

impl Ctl {
    fn new(c: &Cluster) -> Ctl {
        let hosts: Vec<String> =
            c.etcd.endpoints().iter().map(|e| e.trim_start_matches("http://").to_string()).collect();
        let config = c.root.path().join("patronictl.yml");
        std::fs::write(
            &config,
            format!(
                "scope: {}\nnamespace: /service/\netcd3:\n  hosts: {}\nctl:\n  authentication:\n    username: {API_USER}\n    password: {API_PW}\n",
                c.opts.scope,
                hosts.join(",")
            ),
        )
        .unwrap();
        Ctl { config, scope: c.opts.scope.clone() }
    }

    /// Runs patronictl; returns stdout, panicking with stdout+stderr on a non-zero exit.
    fn run(&self, args: &[&str]) -> String {
        let out = Command::new(patronictl())
            .arg("-c")
            .arg(&self.config)
            .args(args)
            .output()
            .expect("patronictl not installed: run scripts/patronictl-venv.sh");
        let stdout = String::from_utf8_lossy(&out.stdout).to_string();
        let stderr = String::from_utf8_lossy(&out.stderr).to_string();
        eprintln!("$ patronictl {}\n{stdout}{stderr}", args.join(" "));
        assert!(out.status.success(), "patronictl {args:?} failed:\n{stdout}\n{stderr}");
        stdout
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unmodified_patronictl_manages_a_pgherd_cluster() {
    let mut c = Cluster::new(ClusterOpts::new("ctl", 27600));
    c.start_all();
    let p = c.wait_healthy(Duration::from_secs(90)).await;
    let ctl = Ctl::new(&c);
    let s = ctl.scope.clone();

    // Member keys are refreshed every cycle: wait until both replicas report streaming.
    let mut list = String::new();
    for _ in 0..60 {
        list = ctl.run(&["list", &s]);
        if list.matches("streaming").count() == 2 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    assert!(list.contains(&format!("Cluster: {s}")), "{list}");
    assert!(list.contains("Leader") && list.contains("Replica"), "{list}");
    assert_eq!(list.matches("streaming").count(), 2, "{list}");
    let topo = ctl.run(&["topology", &s]);
    assert!(topo.contains(&format!("+ {}", c.nodes[(p + 1) % 3].name)) || topo.contains("+ node"), "{topo}");

    let cfg = ctl.run(&["show-config", &s]);
    assert!(cfg.contains("loop_wait: 1"), "{cfg}");
    let out = ctl.run(&["edit-config", &s, "--force", "--set", "postgresql.parameters.work_mem=9MB"]);
    assert!(out.contains("Configuration changed") || out.contains("work_mem"), "{out}");
    assert!(ctl.run(&["show-config", &s]).contains("work_mem: 9MB"));

    let cand = c.nodes[(p + 1) % 3].name.clone();
    let out = ctl.run(&["switchover", &s, "--leader", &c.nodes[p].name, "--candidate", &cand, "--force"]);
    assert!(out.contains(&format!("Successfully switched over to \"{cand}\"")), "{out}");
    let p1 = c.wait_healthy(Duration::from_secs(60)).await;
    assert_eq!(c.nodes[p1].name, cand);

    let hist = ctl.run(&["history", &s]);
    assert!(hist.contains(&cand), "{hist}");

    let cand2 = c.nodes[(p1 + 1) % 3].name.clone();
    let out = ctl.run(&["failover", &s, "--candidate", &cand2, "--force"]);
    assert!(out.contains(&cand2), "{out}");
    let p2 = c.wait_healthy(Duration::from_secs(60)).await;
    assert_eq!(c.nodes[p2].name, cand2);

    let replica = c.nodes[(p2 + 1) % 3].name.clone();
    let out = ctl.run(&["restart", &s, &replica, "--force"]);
    assert!(out.contains(&format!("Success: restart on member {replica}")), "{out}");
    c.wait_healthy(Duration::from_secs(60)).await;

    let out = ctl.run(&["reinit", &s, &replica, "--force", "--wait"]);
    assert!(out.contains(&format!("Success: reinitialize for member {replica}")), "{out}");
    c.wait_healthy(Duration::from_secs(90)).await;

    let out = ctl.run(&["reload", &s, "--force"]);
    assert!(out.contains("Reload request received") || out.contains("No changes to apply"), "{out}");

    let out = ctl.run(&["pause", &s, "--wait"]);
    assert!(out.contains("Success: cluster management is paused"), "{out}");
    let list = ctl.run(&["list", &s]);
    assert!(list.contains("Maintenance mode: on"), "{list}");
    let out = ctl.run(&["resume", &s, "--wait"]);
    assert!(out.contains("Success: cluster management is resumed"), "{out}");
    eventually(Duration::from_secs(10), "pause cleared", || async {
        (c.get(p2, "/patroni").await?.1.get("pause").is_none()).then_some(())
    })
    .await;
    let list = ctl.run(&["list", &s]);
    assert!(!list.contains("Maintenance mode"), "{list}");
}
