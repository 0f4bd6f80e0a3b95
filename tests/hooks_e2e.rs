//! The `pre_promote` veto and `before_stop`, executed for real: three agents on real etcd and
//! PostgreSQL 15 (loopback ports 30500+). node0 carries `nofailover`, so once the leader dies
//! only the other replica may promote — and its `pre_promote` script vetoes while a file
//! exists: the script runs (its own log line), nobody becomes primary meanwhile, and once the
//! file is gone the same node promotes. A graceful stop of that node's agent runs its
//! `before_stop` script. Needs root (PostgreSQL runs as postgres); skipped otherwise.

use std::os::unix::fs::PermissionsExt;
use std::time::{Duration, Instant};

mod common;
use common::cluster::{Cluster, ClusterOpts, eventually};

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

fn hooks_log(c: &Cluster, i: usize) -> String {
    std::fs::read_to_string(c.nodes[i].dir.join("hooks.log")).unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_vetoing_pre_promote_keeps_its_node_from_promoting_and_before_stop_runs_on_stop() {
    if !is_root() {
        eprintln!("skipped: hooks_e2e needs root (PostgreSQL runs as postgres)");
        return;
    }
    let mut opts = ClusterOpts::new("hooks", 30500);
    opts.tags = vec!["{nofailover: true}".into()];
    opts.pg_extra =
        "  pre_promote: {dir}/pre_promote.sh\n  before_stop: {dir}/before_stop.sh\n".into();
    let mut c = Cluster::new(opts);
    for n in &c.nodes {
        let d = n.dir.display();
        for (name, body) in [
            (
                "pre_promote.sh",
                format!("#!/bin/sh\necho pre_promote >> {d}/hooks.log\ntest ! -e {d}/veto\n"),
            ),
            (
                "before_stop.sh",
                format!("#!/bin/sh\necho before_stop >> {d}/hooks.log\n"),
            ),
        ] {
            let p = n.dir.join(name);
            std::fs::write(&p, body).unwrap();
            std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).unwrap();
        }
    }
    c.start_all();
    // node0 (nofailover) never bootstraps: the leader is node1 or node2.
    let leader = c.wait_healthy(Duration::from_secs(120)).await;
    assert_ne!(leader, 0, "a nofailover node bootstrapped");
    let veto = 3 - leader;
    std::fs::write(c.nodes[veto].dir.join("veto"), "").unwrap();

    c.kill_agent(leader);
    c.kill_postgres(leader);
    let ttl = c.opts.ttl;
    eventually(
        Duration::from_secs(ttl + 30),
        "the candidate's pre_promote runs",
        || async { hooks_log(&c, veto).contains("pre_promote").then_some(()) },
    )
    .await;
    // While the script vetoes, nobody may become primary (node0 may not, the candidate will
    // not): watched for a few seconds.
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        assert_eq!(c.primary().await, None, "a node promoted despite the veto");
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    std::fs::remove_file(c.nodes[veto].dir.join("veto")).unwrap();
    let p = eventually(
        Duration::from_secs(3 * ttl + 30),
        "the candidate promotes once its pre_promote allows it",
        || async { c.primary().await },
    )
    .await;
    assert_eq!(p, veto, "node{p} promoted instead of the only candidate");
    let runs = hooks_log(&c, veto).matches("pre_promote").count();
    assert!(
        runs >= 2,
        "pre_promote ran {runs} times: {}",
        hooks_log(&c, veto)
    );
    assert!(!hooks_log(&c, veto).contains("before_stop"));

    // A graceful stop stops PostgreSQL, running before_stop first.
    c.stop_agent(veto);
    assert!(
        hooks_log(&c, veto).contains("before_stop"),
        "before_stop did not run: {}",
        hooks_log(&c, veto)
    );
}
