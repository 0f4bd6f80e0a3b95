//! Fencing without a watchdog device, on real etcd + PostgreSQL 15 + agents on loopback
//! (ports 29500+): `watchdog: automatic` with no device, so the fence process guards the leader.
//! Two faults that used to leave two writable primaries (the agent gone or frozen, PostgreSQL
//! left running):
//! 1. the leader's agent frozen (SIGSTOP): the agent process stays (frozen), its PostgreSQL is
//!    stopped by the fence, and the last write the old primary accepted (server clock) comes
//!    before the first write the new primary accepts — direct writes to both nodes run
//!    throughout; after SIGCONT the old leader rejoins as a replica with the new leader's rows;
//! 2. the new leader's agent SIGKILLed: the same, then a fresh agent rejoins it.
//!
//! Needs root (PostgreSQL runs as the postgres user); skipped with a message otherwise.

use std::time::Duration;

mod common;
use common::cluster::{Cluster, ClusterOpts, eventually, postmaster_pid};
use common::writers::{Writers, assert_no_overlap};

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Whether a fence process runs for node `i` (its command line names the node's state file).
fn fence_runs(c: &Cluster, i: usize) -> bool {
    let mut state = c.nodes[i].data_dir().into_os_string();
    state.push(".fence");
    std::process::Command::new("pgrep")
        .args(["-f", "--"])
        .arg(format!("--fence {}( |$)", state.to_string_lossy()))
        .stdout(std::process::Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn agent_pid(c: &Cluster, i: usize) -> i32 {
    c.nodes[i].agent.as_ref().expect("agent running").id() as i32
}

/// The process is alive and stopped (state `T` in /proc).
fn is_frozen(pid: i32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|s| {
            s.rsplit_once(')')
                .map(|(_, r)| r.trim_start().starts_with('T'))
        })
        .unwrap_or(false)
}

async fn rejoins_with_rows_of(c: &Cluster, i: usize, leader: usize) {
    eventually(
        Duration::from_secs(120),
        "the old leader rejoins as a streaming replica",
        || async {
            c.streaming_replicas(leader)
                .await
                .contains(&c.nodes[i].name)
                .then_some(())
        },
    )
    .await;
    let q = format!("SELECT count(*) FROM fence_probe WHERE node = {leader}");
    let on_leader = c
        .query_one_i64(leader, &q)
        .await
        .expect("count on the leader");
    eventually(
        Duration::from_secs(60),
        "the rejoined node has the new leader's rows",
        || async { (c.query_one_i64(i, &q).await.ok()? >= on_leader).then_some(()) },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_frozen_or_killed_leader_agent_is_fenced_before_another_node_promotes() {
    if !is_root() {
        eprintln!("skipped: fence needs root (PostgreSQL runs as postgres)");
        return;
    }
    let mut opts = ClusterOpts::new("fence", 29500);
    opts.nodes = 2;
    // No device: the fence guards the leader, armed for ttl − safety_margin = 6 − 2 s.
    opts.watchdog = vec![
        "watchdog:\n  mode: automatic\n  device: /dev/pgherd-no-such-watchdog\n  safety_margin: 2\n"
            .into();
        opts.nodes
    ];
    let mut c = Cluster::new(opts);
    c.start_all();
    let first = c.wait_healthy(Duration::from_secs(120)).await;
    let other = 1 - first;
    c.sql(first, "CREATE TABLE fence_probe(id bigserial, node int)")
        .await
        .expect("create the probe table");
    let logs: Vec<std::path::PathBuf> = c
        .nodes
        .iter()
        .map(|n| {
            let mut p = n.data_dir().into_os_string();
            p.push(".fence.log");
            p.into()
        })
        .collect();
    let fence_log = |i: usize| std::fs::read_to_string(&logs[i]).unwrap_or_default();
    eventually(
        Duration::from_secs(30),
        "the leader's fence runs",
        || async { fence_log(first).contains("fence started").then_some(()) },
    )
    .await;

    // 1. The leader's agent frozen.
    let w = Writers::start(&c, "fence_probe");
    w.wait_writable(first, "writes reach the leader").await;
    let frozen = agent_pid(&c, first);
    unsafe { libc::kill(frozen, libc::SIGSTOP) };
    w.wait_writable(other, "the replica is promoted").await;
    let acked = w.stop().await;
    assert!(is_frozen(frozen), "the frozen agent is gone");
    assert!(
        postmaster_pid(&c.nodes[first].data_dir()).is_none_or(|p| unsafe { libc::kill(p, 0) } != 0),
        "the frozen leader's PostgreSQL still runs"
    );
    assert!(fence_log(first).contains("stopped"), "{}", fence_log(first));
    assert_no_overlap(&acked, first, other);
    unsafe { libc::kill(frozen, libc::SIGCONT) };
    rejoins_with_rows_of(&c, first, other).await;
    // A fence runs only while a leader is armed: the new leader's does, the rejoined
    // replica's (it fenced, then the agent disarmed) is gone.
    eventually(
        Duration::from_secs(30),
        "fences only on the leader",
        || async { (fence_runs(&c, other) && !fence_runs(&c, first)).then_some(()) },
    )
    .await;

    // 2. The new leader's agent killed (PostgreSQL left running).
    eventually(
        Duration::from_secs(30),
        "the new leader's fence runs",
        || async { fence_log(other).contains("fence started").then_some(()) },
    )
    .await;
    let w = Writers::start(&c, "fence_probe");
    w.wait_writable(other, "writes reach the new leader").await;
    c.kill_agent(other);
    w.wait_writable(first, "the old leader is promoted again")
        .await;
    let acked = w.stop().await;
    assert!(fence_log(other).contains("stopped"), "{}", fence_log(other));
    assert_no_overlap(&acked, other, first);
    c.start_agent(other);
    rejoins_with_rows_of(&c, other, first).await;
}
