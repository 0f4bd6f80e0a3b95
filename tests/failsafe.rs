//! Failsafe mode (Patroni 4's `failsafe_mode`) on real etcd ×3 + PostgreSQL 15 + three agents
//! on loopback (ports 31000+), ttl 6 / loop_wait 1 / retry_timeout 2, direct writes to every
//! node running throughout (server clock):
//! 1. the leader writes the `failsafe` key listing every member (`GET /failsafe`);
//! 2. every etcd member stopped for three ttls: the primary keeps taking writes (no gap between
//!    acknowledged writes longer than a lease), no replica is promoted, `/patroni` says
//!    `failsafe_mode_is_active`; etcd back: the same leader, its PostgreSQL never restarted;
//! 3. etcd stopped again with one replica's agent stopped: that member cannot accept the
//!    leader's `POST /failsafe`, so the primary demotes as without failsafe, and its agent
//!    stays alive.
//!
//! With failsafe off, etcd loss demotes: tests/cluster.rs.
//!
//! Needs root (PostgreSQL runs as the postgres user); skipped with a message otherwise.

use std::time::Duration;

mod common;
use common::cluster::{Cluster, ClusterOpts, eventually, postmaster_pid};
use common::writers::Writers;

fn is_root() -> bool {
    unsafe { libc::geteuid() == 0 }
}

/// Acknowledged writes of node `i` (server clock, seconds), sorted.
fn acked_by(acked: &[(usize, f64)], i: usize) -> Vec<f64> {
    let mut v: Vec<f64> = acked
        .iter()
        .filter(|(n, _)| *n == i)
        .map(|(_, t)| *t)
        .collect();
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failsafe_keeps_the_primary_writable_without_etcd_while_every_member_accepts_it() {
    if !is_root() {
        eprintln!("skipped: needs root");
        return;
    }
    let mut opts = ClusterOpts::new("failsafe", 31000);
    opts.extra_dcs = "    failsafe_mode: true\n".into();
    let ttl = opts.ttl;
    let mut c = Cluster::new(opts);
    c.start_all();
    let p = c.wait_healthy(Duration::from_secs(90)).await;
    c.sql(p, "CREATE TABLE failsafe_probe(id bigserial, node int)")
        .await
        .unwrap();

    // 1. The failsafe key lists all three members.
    eventually(
        Duration::from_secs(30),
        "GET /failsafe lists every member",
        || async {
            let (code, body) = c.get(p, "/failsafe").await?;
            (code == 200 && body.as_object()?.len() == 3).then_some(())
        },
    )
    .await;
    let postmaster = postmaster_pid(&c.nodes[p].data_dir()).expect("primary runs");

    // 2. etcd gone for three ttls.
    let w = Writers::start(&c, "failsafe_probe");
    w.wait_writable(p, "writes reach the primary").await;
    let t_stop = now_epoch();
    c.etcd.stop_all();
    eventually(
        Duration::from_secs(ttl + 30),
        "the primary reports failsafe mode active",
        || async {
            let (_, body) = c.get(p, "/patroni").await?;
            (body.get("failsafe_mode_is_active")? == true).then_some(())
        },
    )
    .await;
    tokio::time::sleep(Duration::from_secs(3 * ttl)).await;
    let t_back = now_epoch();
    c.etcd.start_all();
    let p_after = c.wait_healthy(Duration::from_secs(90)).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let acked = w.stop().await;
    let mine = acked_by(&acked, p);
    let during: Vec<f64> = mine
        .iter()
        .copied()
        .filter(|t| *t >= t_stop - 1.0 && *t <= t_back + 1.0)
        .collect();
    assert!(
        during.last().is_some_and(|t| *t >= t_back - 1.0),
        "the primary stopped taking writes while etcd was gone (last at {:?}, etcd back at {t_back})",
        during.last()
    );
    let longest = during
        .windows(2)
        .map(|w| w[1] - w[0])
        .fold(0.0f64, f64::max);
    eprintln!("MEASURED longest gap between acknowledged writes without etcd: {longest:.2}s");
    assert!(
        longest < ttl as f64,
        "a write outage of {longest:.2}s without etcd: failsafe did not keep the primary"
    );
    for (i, _) in c.nodes.iter().enumerate().filter(|(i, _)| *i != p) {
        assert!(
            acked_by(&acked, i).is_empty(),
            "node{i} took writes: two primaries"
        );
    }
    assert_eq!(p_after, p, "leadership moved");
    assert_eq!(
        postmaster_pid(&c.nodes[p].data_dir()),
        Some(postmaster),
        "the primary's PostgreSQL was restarted"
    );

    // 3. A member that cannot answer: the primary demotes.
    let r = (p + 1) % 3;
    c.stop_agent(r);
    c.etcd.stop_all();
    eventually(
        Duration::from_secs(ttl + 60),
        "the primary demotes when a failsafe member does not answer",
        || async {
            (c.query_one_i64(p, "SELECT pg_is_in_recovery()::int::bigint")
                .await
                .ok()?
                == 1)
                .then_some(())
        },
    )
    .await;
    let agent = c.nodes[p].agent.as_mut().expect("agent");
    assert!(
        agent.try_wait().unwrap().is_none(),
        "the agent died instead of demoting"
    );
    c.etcd.start_all();
    c.start_agent(r);
    c.wait_healthy(Duration::from_secs(90)).await;
}

fn now_epoch() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}
