//! Two behaviours of real agents that only a table test covered before, on real etcd ×3 +
//! PostgreSQL 15 + three agents on loopback (ports 32000+), synchronous mode:
//! 1. the `nosync` tag: node2 (`{nosync: true, nofailover: true}`) is never named the
//!    synchronous standby — not while the other replica is, and not after that replica's agent
//!    and PostgreSQL are gone (the leader then runs with no synchronous standby and writes
//!    still commit, as Patroni's non-strict synchronous mode does);
//! 2. a scheduled restart (`POST /restart` with `schedule`): the replica's PostgreSQL is not
//!    restarted before the scheduled time and is restarted after it (its postmaster start
//!    time moves past the schedule), and the schedule is gone from `/patroni` afterwards.
//!
//! Needs root (PostgreSQL runs as the postgres user); skipped with a message otherwise.

use std::time::{Duration, Instant};

mod common;
use common::cluster::{Cluster, ClusterOpts, eventually};
use serde_json::{Value, json};

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

async fn sync_standby(c: &Cluster, leader: usize) -> Option<String> {
    let (_, body) = c.get(leader, "/cluster").await?;
    body["members"]
        .as_array()?
        .iter()
        .find(|m| m["role"] == "sync_standby")
        .and_then(|m| m["name"].as_str().map(str::to_string))
}

async fn postmaster_start(c: &Cluster, i: usize) -> Option<String> {
    let (_, body) = c.get(i, "/patroni").await?;
    body["postmaster_start_time"].as_str().map(str::to_string)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn nosync_is_never_the_sync_standby_and_a_scheduled_restart_waits_for_its_time() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut opts = ClusterOpts::new("tagsrestart", 32000);
    opts.synchronous_mode = true;
    opts.tags = vec![
        "{}".into(),
        "{}".into(),
        "{nosync: true, nofailover: true}".into(),
    ];
    let mut c = Cluster::new(opts);
    c.start_all();
    let leader = c.wait_healthy(Duration::from_secs(120)).await;
    assert_ne!(leader, 2, "a nofailover node leads");
    let other = 1 - leader;
    let other_name = c.nodes[other].name.clone();

    // 1. nosync: the other replica is the synchronous standby, node2 never is.
    eventually(
        Duration::from_secs(30),
        "the other replica becomes the synchronous standby",
        || async { (sync_standby(&c, leader).await? == other_name).then_some(()) },
    )
    .await;

    // 2. A scheduled restart of node2 (a replica), 6 s from now.
    let before = eventually(
        Duration::from_secs(20),
        "node2 reports its postmaster start",
        || postmaster_start(&c, 2),
    )
    .await;
    let at = chrono::Utc::now() + chrono::Duration::seconds(6);
    let (code, body) = c
        .call(
            2,
            "POST",
            "/restart",
            Some(json!({"schedule": at.to_rfc3339()})),
        )
        .await;
    assert_eq!(code, 202, "{body}");
    // (The loop records it and publishes at its next cycle.)
    eventually(
        Duration::from_secs(5),
        "/patroni shows the schedule",
        || async {
            let (_, st) = c.get(2, "/patroni").await?;
            st.get("scheduled_restart").map(|_| ())
        },
    )
    .await;

    // Meanwhile, node1/0's sync duty goes: stop the sync standby's agent and PostgreSQL.
    c.stop_agent(other);
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(4) {
        let s = sync_standby(&c, leader).await;
        assert_ne!(
            s.as_deref(),
            Some(c.nodes[2].name.as_str()),
            "the nosync node was named synchronous standby"
        );
        // The schedule is not due yet: node2's PostgreSQL still runs from before (an answer
        // lost on a loaded machine proves nothing either way).
        if let Some(s) = postmaster_start(&c, 2).await {
            assert_eq!(s, before, "restarted before its scheduled time");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // Writes still commit on the leader with no synchronous standby left.
    let n = tokio::time::timeout(
        Duration::from_secs(20),
        c.query_one_i64(leader, "SELECT 1::bigint"),
    )
    .await;
    assert!(matches!(n, Ok(Ok(1))), "{n:?}");
    eventually(Duration::from_secs(20), "a write commits", || async {
        c.sql(leader, "CREATE TABLE IF NOT EXISTS nosync_probe(i int)")
            .await
            .ok()?;
        c.sql(leader, "INSERT INTO nosync_probe VALUES (1)")
            .await
            .ok()
    })
    .await;

    // The scheduled restart happens, after its time.
    let after = eventually(
        Duration::from_secs(60),
        "node2's PostgreSQL restarted by the schedule",
        || async {
            let s = postmaster_start(&c, 2).await?;
            (s != before).then_some(s)
        },
    )
    .await;
    assert!(
        chrono::Utc::now() >= at,
        "restarted at {after}, before the schedule {at}"
    );
    eventually(
        Duration::from_secs(30),
        "the schedule is cleared",
        || async {
            let (_, st) = c.get(2, "/patroni").await?;
            (st.get("scheduled_restart").is_none_or(Value::is_null)).then_some(())
        },
    )
    .await;
    // Still never the sync standby, also with the other replica back.
    c.start_agent(other);
    c.wait_healthy(Duration::from_secs(90)).await;
    eventually(
        Duration::from_secs(30),
        "the other replica is the synchronous standby again",
        || async { (sync_standby(&c, leader).await? == other_name).then_some(()) },
    )
    .await;
}
