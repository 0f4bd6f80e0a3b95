//! End-to-end HA behaviour of pgherd-agent on real etcd (3 members) and real PostgreSQL 15:
//! three agents on loopback ports, driven through their Patroni-compatible REST API.
//!
//! Steps run in order on one cluster (starting it costs ~10 s) and each step says what it
//! checks; a failure dumps the agents' logs.

mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicI64, Ordering};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, ClusterOpts, SUPERUSER_PW, eventually, pg_ctl_as_postgres};
use serde_json::json;

fn step(s: &str) {
    eprintln!("\n=== step: {s} ===");
}

/// The replica answering 200 on `/sync` (waits up to 20 s for one).
async fn sync_standby(c: &Cluster, primary: usize) -> usize {
    eventually(Duration::from_secs(20), "a sync standby", || async {
        for i in 0..c.nodes.len() {
            if i != primary && c.code(i, "GET", "/sync").await == Some(200) {
                return Some(i);
            }
        }
        None
    })
    .await
}

async fn count_rows(c: &Cluster, i: usize) -> Result<i64, String> {
    c.query_one_i64(i, "SELECT count(*) FROM acked").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_bootstraps_fails_over_rejoins_and_obeys_rest_commands() {
    let mut opts = ClusterOpts::new("e2e", 27000);
    opts.synchronous_mode = true;
    let mut c = Cluster::new(opts);
    let ttl = c.opts.ttl;

    step("bootstrap: one primary and two streaming replicas");
    let t0 = Instant::now();
    c.start_all();
    let p0 = c.wait_healthy(Duration::from_secs(90)).await;
    eprintln!("healthy after {:?}, primary node{p0}", t0.elapsed());
    let (code, cl) = c.get(p0, "/cluster").await.unwrap();
    assert_eq!(code, 200);
    assert_eq!(cl["members"].as_array().unwrap().len(), 3, "{cl}");

    step("synchronous mode: one replica is the sync standby");
    let sync = sync_standby(&c, p0).await;
    eprintln!("sync standby: node{sync}");

    step("acknowledged writes on the primary");
    c.sql(p0, "CREATE TABLE acked(id int primary key, note text)")
        .await
        .unwrap();
    for k in 0..100 {
        c.sql(p0, &format!("INSERT INTO acked VALUES ({k}, 'x')"))
            .await
            .unwrap();
    }

    step(
        "SIGKILL primary agent + postgres while writes run: another node is promoted, every acked write survives",
    );
    // A writer on its own connection to the primary, one row per commit (ids from 100000,
    // in order); it stops at its first error, so the acknowledged ids are contiguous.
    let acked = Arc::new(AtomicI64::new(0));
    let writer = {
        let acked = acked.clone();
        let conn = format!(
            "host=127.0.0.1 port={} user=postgres password={SUPERUSER_PW} dbname=postgres connect_timeout=3",
            c.nodes[p0].pg_port
        );
        tokio::spawn(async move {
            let (client, io) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
                .await
                .expect("writer connects to the primary");
            tokio::spawn(io);
            for id in 100_000.. {
                let q = format!("INSERT INTO acked VALUES ({id}, 'during the kill')");
                if client.simple_query(&q).await.is_err() {
                    break;
                }
                acked.fetch_add(1, Ordering::SeqCst);
            }
        })
    };
    eventually(Duration::from_secs(30), "the writer commits", || async {
        (acked.load(Ordering::SeqCst) >= 50).then_some(())
    })
    .await;
    let t_kill = Instant::now();
    c.kill_agent(p0);
    c.kill_postgres(p0);
    tokio::time::timeout(Duration::from_secs(30), writer)
        .await
        .expect("the writer stops once the primary is gone")
        .unwrap();
    let n = acked.load(Ordering::SeqCst);
    let p1 = eventually(Duration::from_secs(ttl + 30), "a new primary", || async {
        c.primary().await.filter(|p| *p != p0)
    })
    .await;
    eprintln!(
        "new primary node{p1} after {:?}; {n} writes acknowledged during the run-up to the kill",
        t_kill.elapsed()
    );
    assert_eq!(
        c.query_one_i64(p1, "SELECT count(*) FROM acked WHERE id < 100")
            .await
            .unwrap(),
        100,
        "acked writes from before lost"
    );
    assert_eq!(
        c.query_one_i64(
            p1,
            &format!(
                "SELECT count(*) FROM acked WHERE id >= 100000 AND id < {}",
                100_000 + n
            )
        )
        .await
        .unwrap(),
        n,
        "writes acknowledged while the primary was killed are lost"
    );
    eventually(
        Duration::from_secs(20),
        "writes accepted on the new primary",
        || async {
            c.sql(p1, "INSERT INTO acked VALUES (1000, 'after failover')")
                .await
                .ok()
        },
    )
    .await;

    step("divergent write on the old primary, then it rejoins via pg_rewind");
    let old = &c.nodes[p0];
    let log = old.dir.join("standalone.log");
    assert!(
        pg_ctl_as_postgres(
            old,
            &[
                "-w",
                "-t",
                "30",
                "-l",
                log.to_str().unwrap(),
                "-o",
                "-c synchronous_standby_names= -c hot_standby=on",
                "start"
            ],
        ),
        "standalone start of the old primary failed"
    );
    // Without standby.signal the old primary comes up read-write on its old timeline.
    let _ = std::fs::remove_file(old.data_dir().join("standby.signal"));
    c.sql(p0, "INSERT INTO acked VALUES (5000, 'divergent')")
        .await
        .unwrap();
    assert!(pg_ctl_as_postgres(
        &c.nodes[p0],
        &["-m", "immediate", "stop"]
    ));
    c.start_agent(p0);
    let p = c.wait_healthy(Duration::from_secs(90)).await;
    assert_eq!(p, p1);
    let divergent = c
        .query_one_i64(p0, "SELECT count(*) FROM acked WHERE id = 5000")
        .await
        .unwrap();
    assert_eq!(divergent, 0, "divergent row survived on the rejoined node");
    eventually(
        Duration::from_secs(20),
        "new primary's row on the rejoined node",
        || async {
            c.query_one_i64(p0, "SELECT count(*) FROM acked WHERE id = 1000")
                .await
                .ok()
                .filter(|n| *n == 1)
        },
    )
    .await;
    let log = std::fs::read_to_string(c.nodes[p0].log()).unwrap();
    assert!(
        log.contains("rewind"),
        "the rejoin did not go through pg_rewind"
    );

    step("switchover via REST to a named candidate (in sync mode: the sync standby)");
    let cand = sync_standby(&c, p1).await;
    let not_sync = (0..3).find(|i| *i != p1 && *i != cand).unwrap();
    let (code, body) = c
        .call(
            p1,
            "POST",
            "/switchover",
            Some(json!({"leader": c.nodes[p1].name, "candidate": c.nodes[not_sync].name})),
        )
        .await;
    assert_eq!(
        (code, body.as_str()),
        (412, "candidate name does not match with sync_standby")
    );
    let (code, body) = c
        .call(
            p1,
            "POST",
            "/switchover",
            Some(json!({"leader": c.nodes[p1].name, "candidate": c.nodes[cand].name})),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let p2 = c.wait_healthy(Duration::from_secs(60)).await;
    assert_eq!(p2, cand);

    step("failover via REST to a named candidate");
    let cand = (0..3).find(|i| *i != p2).unwrap();
    let (code, body) = c
        .call(
            p2,
            "POST",
            "/failover",
            Some(json!({"candidate": c.nodes[cand].name})),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    let p3 = c.wait_healthy(Duration::from_secs(60)).await;
    assert_eq!(p3, cand);

    step("restart a replica via REST");
    let r = (0..3).find(|i| *i != p3).unwrap();
    let before = c.get(r, "/patroni").await.unwrap().1["postmaster_start_time"].clone();
    let (code, body) = c.call(r, "POST", "/restart", Some(json!({}))).await;
    assert_eq!(code, 200, "{body}");
    // The API answers from the snapshot the loop publishes each cycle.
    eventually(
        Duration::from_secs(5),
        "a new postmaster start time",
        || async {
            let after = c.get(r, "/patroni").await?.1["postmaster_start_time"].clone();
            (after != before && !after.is_null()).then_some(())
        },
    )
    .await;
    c.wait_healthy(Duration::from_secs(60)).await;

    step("reinitialize a replica via REST");
    let (code, body) = c
        .call(r, "POST", "/reinitialize", Some(json!({"force": true})))
        .await;
    assert_eq!(code, 200, "{body}");
    let want = count_rows(&c, p3).await.unwrap();
    eventually(
        Duration::from_secs(90),
        "the reinitialized replica streaming the primary's rows",
        || async {
            let (_, v) = c.get(r, "/patroni").await?;
            let streaming = v["state"] == "running" && v["replication_state"] == "streaming";
            (streaming && count_rows(&c, r).await.ok()? == want).then_some(())
        },
    )
    .await;
    c.wait_healthy(Duration::from_secs(30)).await;

    step("PATCH /config: reload-only parameter applied, restart-only one pending");
    let (code, body) = c
        .call(
            p3,
            "PATCH",
            "/config",
            Some(json!({"postgresql": {"parameters": {"work_mem": "7MB", "max_connections": 60}}})),
        )
        .await;
    assert_eq!(code, 200, "{body}");
    eventually(
        Duration::from_secs(20),
        "work_mem reloaded everywhere",
        || async {
            for i in 0..3 {
                let conn = c
                    .query_one_i64(
                        i,
                        "SELECT setting::bigint FROM pg_settings WHERE name = 'work_mem'",
                    )
                    .await
                    .ok()?;
                if conn != 7 * 1024 {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    eventually(
        Duration::from_secs(20),
        "pending_restart for max_connections",
        || async {
            let (_, v) = c.get(p3, "/patroni").await?;
            (v["pending_restart"] == true).then_some(())
        },
    )
    .await;

    step("pause: a stopped replica stays stopped; resume restarts it");
    let (code, body) = c
        .call(p3, "PATCH", "/config", Some(json!({"pause": true})))
        .await;
    assert_eq!(code, 200, "{body}");
    eventually(
        Duration::from_secs(10),
        "pause visible on all members",
        || async {
            for i in 0..3 {
                if c.get(i, "/patroni").await?.1["pause"] != true {
                    return None;
                }
            }
            Some(())
        },
    )
    .await;
    c.kill_postgres(r);
    tokio::time::sleep(Duration::from_secs(3 * c.opts.loop_wait + 2)).await;
    assert_ne!(
        c.code(r, "GET", "/health").await,
        Some(200),
        "paused agent restarted postgres"
    );
    let (code, body) = c
        .call(p3, "PATCH", "/config", Some(json!({"pause": null})))
        .await;
    assert_eq!(code, 200, "{body}");
    c.wait_healthy(Duration::from_secs(60)).await;

    step("callbacks called with argv `cmd action role scope`");
    let all: String = (0..3)
        .map(|i| std::fs::read_to_string(c.nodes[i].callback_log()).unwrap_or_default())
        .collect();
    for want in [
        "callback.sh on_role_change primary e2e",
        "callback.sh on_start replica e2e",
        "callback.sh on_role_change replica e2e",
    ] {
        assert!(
            all.lines().any(|l| l == want),
            "missing callback line {want:?} in:\n{all}"
        );
    }

    step("etcd fully stopped: the primary takes no write past ttl, then serves read-only");
    let p = c.primary().await.unwrap();
    // Writes run throughout (reconnecting when the server goes away): the demotion is the last
    // write PostgreSQL accepted, not the first failed probe (a refused connection proves
    // nothing about what the server would still accept).
    let last_ok: Arc<std::sync::Mutex<Option<Instant>>> = Arc::default();
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let writer = {
        let (last_ok, stop) = (last_ok.clone(), stop.clone());
        let conn = format!(
            "host=127.0.0.1 port={} user=postgres password={SUPERUSER_PW} dbname=postgres connect_timeout=1",
            c.nodes[p].pg_port
        );
        tokio::spawn(async move {
            let mut client = None;
            while !stop.load(Ordering::SeqCst) {
                if client.is_none()
                    && let Ok((cl, io)) =
                        tokio_postgres::connect(&conn, tokio_postgres::NoTls).await
                {
                    tokio::spawn(io);
                    client = Some(cl);
                }
                if let Some(cl) = &client {
                    match cl
                        .simple_query("INSERT INTO acked VALUES (-1, 'etcd gone') ON CONFLICT (id) DO UPDATE SET note = 'etcd gone'")
                        .await
                    {
                        Ok(_) => *last_ok.lock().unwrap() = Some(Instant::now()),
                        Err(e) if e.as_db_error().is_none() => client = None,
                        Err(_) => {}
                    }
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    eventually(
        Duration::from_secs(20),
        "writes reach the primary",
        || async { last_ok.lock().unwrap().map(|_| ()) },
    )
    .await;
    let t_stop = Instant::now();
    c.etcd.stop_all();
    eventually(
        Duration::from_secs(ttl + 60),
        "the old primary serves read-only",
        || async {
            (c.query_one_i64(p, "SELECT pg_is_in_recovery()::int::bigint")
                .await
                .ok()?
                == 1)
                .then_some(())
        },
    )
    .await;
    stop.store(true, Ordering::SeqCst);
    writer.await.unwrap();
    let demoted_after = last_ok
        .lock()
        .unwrap()
        .expect("a write succeeded")
        .saturating_duration_since(t_stop);
    eprintln!("last write accepted {demoted_after:?} after etcd stopped (ttl {ttl}s)");
    // The safety bound itself: no write may be accepted once the lease could have expired.
    assert!(
        demoted_after < Duration::from_secs(ttl),
        "a write was accepted {demoted_after:?} after etcd stopped (ttl {ttl} s)"
    );
    let agent = c.nodes[p].agent.as_mut().expect("agent");
    assert!(
        agent.try_wait().unwrap().is_none(),
        "the agent died instead of demoting"
    );
    assert!(
        c.code(p, "GET", "/patroni").await.is_some(),
        "the agent does not answer while the DCS is gone"
    );
    c.etcd.start_all();
    c.wait_healthy(Duration::from_secs(90)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchdog_required_without_a_usable_device_never_takes_leadership() {
    let mut opts = ClusterOpts::new("wdreq", 27500);
    opts.nodes = 1;
    opts.watchdog = vec![
        "watchdog:\n  mode: required\n  device: /dev/pgherd-no-such-watchdog\n  fence: false\n"
            .into(),
    ];
    let mut c = Cluster::new(opts);
    c.start_all();
    // Give it several cycles: it must stay alive and answering, and never lead. (A dead
    // agent would pass a "never 200" check too: `None` means nobody answered.)
    let t0 = Instant::now();
    let mut answered = 0;
    while t0.elapsed() < Duration::from_secs(12) {
        let code = c.code(0, "GET", "/leader").await;
        assert_ne!(code, Some(200), "took leadership without a watchdog");
        if code.is_some() {
            answered += 1;
        }
        let agent = c.nodes[0].agent.as_mut().expect("agent started");
        assert!(
            agent.try_wait().unwrap().is_none(),
            "the agent exited instead of refusing leadership"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    assert!(
        answered >= 20,
        "the agent answered only {answered} times in 12 s"
    );
    let (_, cluster) = c.get(0, "/cluster").await.expect("GET /cluster");
    let members = cluster["members"].as_array().expect("members");
    assert!(
        members.iter().any(|m| m["name"] == "node0"),
        "the refusing agent keeps its member key: {cluster}"
    );
    assert!(
        !members.iter().any(|m| m["role"] == "leader"),
        "somebody leads: {cluster}"
    );
    let log = std::fs::read_to_string(c.nodes[0].log()).unwrap();
    assert!(
        log.contains("watchdog required but unusable"),
        "no watchdog explanation in the log"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn leader_pets_its_watchdog_after_renewals_and_disarms_it_on_shutdown() {
    // The file driver stands in for /dev/watchdog (none exists here): it records
    // `<open|keepalive|close> <unix_ms> <timeout_ms>` lines, like a test "hardware" would see.
    let device = format!("/tmp/pgherd-e2e-watchdog-{}.log", std::process::id());
    let _ = std::fs::remove_file(&device);
    let mut opts = ClusterOpts::new("wdfile", 26500);
    opts.nodes = 1;
    opts.watchdog = vec![format!(
        "watchdog:\n  mode: required\n  device: file:{device}\n  safety_margin: 2\n"
    )];
    let mut c = Cluster::new(opts);
    c.start_all();
    eventually(Duration::from_secs(60), "the node to lead", || async {
        (c.code(0, "GET", "/leader").await == Some(200)).then_some(())
    })
    .await;
    tokio::time::sleep(Duration::from_secs(4)).await;
    let log = std::fs::read_to_string(&device).unwrap();
    let lines: Vec<Vec<&str>> = log.lines().map(|l| l.split(' ').collect()).collect();
    // Opened before leading, with timeout = ttl − safety_margin = 6 − 2 s.
    assert_eq!(lines[0][0], "open", "{log}");
    assert_eq!(lines[0][2], "4000", "{log}");
    // Petted after each lease renewal (every loop_wait = 1 s), never letting the timeout lapse.
    let pets: Vec<u64> = lines
        .iter()
        .filter(|l| l[0] == "keepalive")
        .map(|l| l[1].parse().unwrap())
        .collect();
    assert!(pets.len() >= 3, "too few keepalives: {log}");
    let max_gap = pets.windows(2).map(|w| w[1] - w[0]).max().unwrap();
    assert!(
        max_gap < 4000,
        "keepalive gap {max_gap} ms reached the watchdog timeout: {log}"
    );
    // A graceful shutdown disarms it (magic close) so the host is not reset.
    c.stop_agent(0);
    let log = std::fs::read_to_string(&device).unwrap();
    assert!(log.lines().last().unwrap().starts_with("close "), "{log}");
    let _ = std::fs::remove_file(&device);
}
