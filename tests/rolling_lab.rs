//! `pgherd restart --pending` on a real 3-host namespace lab (subnet 10.232.21.0/24, bridge
//! `phroll0`): a `shared_buffers` change (PATCH /config) restarts the replicas one by one, then
//! the primary, while a write probe through HAProxy's primary port loses no acknowledged row;
//! a second run restarts nothing; a decrease of `max_connections` restarts the primary first
//! and every standby comes back streaming with the new value.
//! Needs root (namespaces); skipped with a message otherwise. Prints the measured write outage.

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use pgherd::inventory::Inventory;
use pgherd::lab::{self, LabSpec};
use pgherd::provision::apply::{self, ApplyOptions, Fleet};
use pgherd::provision::rolling;
use serde_json::{Value, json};
use tokio::sync::Mutex;

mod common;
use common::cluster::eventually;
use common::deploy::{
    build_spec, fresh_lab, get_json, is_root, leader_with_streaming_replicas, pg, pids,
};

const SUBNET: &str = "10.232.21";

/// `pgherd restart --pending -y`; returns stdout (asserts success, no password printed).
fn restart_pending(state: &Path, inv_path: &Path, password: &str) -> String {
    restart_pending_with(state, inv_path, password, &[])
}

fn restart_pending_with(state: &Path, inv_path: &Path, password: &str, extra: &[&str]) -> String {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgherd"))
        .arg("--state-dir")
        .arg(state)
        .args(["restart", "--pending", "-y", "-i"])
        .arg(inv_path)
        .args(extra)
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "restart --pending: {text}{err}");
    assert!(!text.contains(password) && !err.contains(password));
    eprintln!("{err}");
    text
}

/// `sql` on each node's own PostgreSQL (psql as postgres over the local socket, via SSH: the
/// nodes' pg_hba does not admit the lab controller directly).
async fn on_every_node(inv: &Inventory, fleet: &Fleet, sql: &str) -> BTreeMap<String, String> {
    let sock = inv
        .postgresql
        .data_dir
        .parent()
        .unwrap()
        .display()
        .to_string();
    let cmd = format!(
        "cd / && runuser -u postgres -- {} -X -A -t -q -h {sock} -p {} -d postgres -c \"{sql}\"",
        inv.postgresql.bin_dir.join("psql").display(),
        inv.postgresql.port
    );
    let mut out = BTreeMap::new();
    for (name, t) in fleet {
        let o = t
            .run_ok(&cmd, Duration::from_secs(20))
            .await
            .expect("psql on node");
        out.insert(name.clone(), o.stdout_str().trim().to_string());
    }
    out
}

/// Postmaster start time of every member (epoch seconds).
async fn started_at(inv: &Inventory, fleet: &Fleet) -> BTreeMap<String, f64> {
    on_every_node(
        inv,
        fleet,
        "SELECT extract(epoch FROM pg_postmaster_start_time())::float8",
    )
    .await
    .into_iter()
    .map(|(k, v)| (k, v.parse().expect("epoch")))
    .collect()
}

async fn show_everywhere(inv: &Inventory, fleet: &Fleet, guc: &str) -> BTreeMap<String, String> {
    on_every_node(inv, fleet, &format!("SHOW {guc}")).await
}

/// HAProxy's servers of the replica backend in forced drain/maintenance, per HAProxy host.
async fn drained(fleet: &Fleet) -> BTreeMap<String, Vec<String>> {
    let mut out = BTreeMap::new();
    for (name, t) in fleet {
        let o = t
            .run_ok(
                &rolling::haproxy_admin_command("show servers state rol_replicas"),
                Duration::from_secs(20),
            )
            .await
            .expect("show servers state");
        let text = o.stdout_str();
        assert!(text.contains("rol_replicas"), "{name}: {text}");
        out.insert(
            name.clone(),
            rolling::drained_servers(&text, "rol_replicas"),
        );
    }
    out
}

fn none_drained(fleet: &Fleet) -> BTreeMap<String, Vec<String>> {
    fleet.keys().map(|k| (k.clone(), Vec::new())).collect()
}

async fn patch_config(inv: &Inventory, api: &str, body: Value) {
    let r = reqwest::Client::new()
        .patch(format!("{api}/config"))
        .basic_auth(
            &inv.agent.restapi_username,
            Some(inv.secrets.restapi.expose()),
        )
        .json(&body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("PATCH /config");
    assert!(r.status().is_success(), "PATCH /config: {}", r.status());
}

/// Waits until `/cluster` shows `pending_restart` on every member named in `who`.
async fn wait_pending(api: &str, who: &[String]) {
    let url = format!("{api}/cluster");
    eventually(
        Duration::from_secs(60),
        "the members show pending_restart",
        || {
            let url = url.clone();
            async move {
                let c = get_json(&url).await?;
                let m = c["members"].as_array()?;
                who.iter()
                    .all(|n| {
                        m.iter()
                            .any(|x| x["name"] == *n && x["pending_restart"] == true)
                    })
                    .then_some(())
            }
        },
    )
    .await;
}

/// Nobody pending, one leader, `replicas` streaming.
async fn settled(api: &str, replicas: usize) {
    let c = get_json(&format!("{api}/cluster")).await.expect("/cluster");
    let m = c["members"].as_array().unwrap();
    assert!(
        m.iter().all(|x| x.get("pending_restart").is_none()),
        "still pending: {c}"
    );
    assert_eq!(
        m.iter().filter(|x| x["state"] == "streaming").count(),
        replicas,
        "{c}"
    );
}

/// Writes through HAProxy's primary port, a new connection per row (as a client after an
/// outage), recording the rows acknowledged and the longest gap between two acknowledgements.
struct WriteProbe {
    acked: Vec<i64>,
    failed: u64,
    last_ok: Option<Instant>,
    longest_gap: Duration,
}

async fn write_probe(
    addr: String,
    port: u16,
    password: String,
    stop: Arc<AtomicBool>,
    p: Arc<Mutex<WriteProbe>>,
) {
    let mut conf = tokio_postgres::Config::new();
    conf.host(&addr)
        .port(port)
        .user("postgres")
        .password(&password)
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(1));
    let mut seq: i64 = 0;
    while !stop.load(Ordering::Relaxed) {
        seq += 1;
        let attempt = async {
            let (c, conn) = conf.connect(tokio_postgres::NoTls).await.ok()?;
            tokio::spawn(conn);
            c.execute("INSERT INTO probe VALUES ($1)", &[&seq])
                .await
                .ok()
        };
        let ok = matches!(
            tokio::time::timeout(Duration::from_secs(2), attempt).await,
            Ok(Some(1))
        );
        let now = Instant::now();
        let mut g = p.lock().await;
        if ok {
            g.acked.push(seq);
            if let Some(last) = g.last_ok {
                g.longest_gap = g.longest_gap.max(now - last);
            }
            g.last_ok = Some(now);
        } else {
            g.failed += 1;
        }
        drop(g);
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pending_restarts_roll_replicas_first_without_losing_writes_and_decreases_go_primary_first()
{
    if !is_root() {
        eprintln!("skipped: rolling_lab needs root (network namespaces)");
        return;
    }
    let (tmp, guard, info) = fresh_lab("pgroll", |dir| {
        LabSpec::new("rol", 3, SUBNET, "phroll0", dir)
    });
    let state = tmp.path().join("st");
    let inv_path = tmp.path().join("lab.yml");
    let mut y = lab::inventory_yaml(&guard.0);
    y.push_str("profile: fast\nwatchdog:\n  mode: \"off\"\n");
    std::fs::write(&inv_path, y).unwrap();
    let (inv, s) = build_spec(&inv_path);
    let password = inv.secrets.superuser.expose().to_string();
    let fleet = pgherd::cli::connect(&inv, &state).await.expect("connect");
    let opts = ApplyOptions {
        wait_timeout: Duration::from_secs(120),
        progress: false,
        ..Default::default()
    };
    apply::apply(&s, &fleet, &opts)
        .await
        .unwrap_or_else(|e| panic!("apply: {}", pgherd::provision::error_chain(&e)));
    let api = |addr: &str| format!("http://{addr}:{}", s.restapi_port);
    let a0 = api(&info.hosts[0].address);
    let leader = leader_with_streaming_replicas(&a0, 2).await;
    let names: Vec<String> = info.hosts.iter().map(|h| h.name.clone()).collect();
    let hp = info.hosts[1].address.clone();
    let c = pg(&hp, s.primary_port, &password).await.expect("haproxy");
    c.batch_execute("CREATE TABLE probe(x bigint PRIMARY KEY)")
        .await
        .unwrap();

    // 1. A restart-needing raise: shared_buffers → 64MB on every member.
    let before = started_at(&inv, &fleet).await;
    patch_config(
        &inv,
        &api(&info.host(&leader).unwrap().address),
        json!({"postgresql": {"parameters": {"shared_buffers": "64MB"}}}),
    )
    .await;
    wait_pending(&a0, &names).await;

    let stop = Arc::new(AtomicBool::new(false));
    let probe = Arc::new(Mutex::new(WriteProbe {
        acked: Vec::new(),
        failed: 0,
        last_ok: None,
        longest_gap: Duration::ZERO,
    }));
    let task = tokio::spawn(write_probe(
        hp.clone(),
        s.primary_port,
        password.clone(),
        stop.clone(),
        probe.clone(),
    ));
    // Let the probe get going before the restarts start.
    eventually(Duration::from_secs(30), "the write probe writes", || {
        let probe = probe.clone();
        async move { (probe.lock().await.acked.len() >= 3).then_some(()) }
    })
    .await;
    let (st, ip, pw) = (state.clone(), inv_path.clone(), password.clone());
    let text = tokio::task::spawn_blocking(move || restart_pending(&st, &ip, &pw))
        .await
        .unwrap();
    println!("{text}");
    // A few more writes after the run, then stop the probe.
    let n = probe.lock().await.acked.len();
    eventually(
        Duration::from_secs(30),
        "writes continue after the run",
        || {
            let probe = probe.clone();
            async move { (probe.lock().await.acked.len() >= n + 3).then_some(()) }
        },
    )
    .await;
    stop.store(true, Ordering::Relaxed);
    task.await.unwrap();
    let p = probe.lock().await;

    // Every member restarted; the replicas before the primary, one at a time.
    let after = started_at(&inv, &fleet).await;
    for n in &names {
        assert!(after[n] > before[n], "{n} was not restarted");
    }
    let replicas: Vec<&String> = names.iter().filter(|n| **n != leader).collect();
    for r in &replicas {
        assert!(
            after[*r] < after[&leader],
            "replica {r} restarted after the primary {leader}: {after:?}"
        );
    }
    assert!(
        text.find(&format!("restart primary {leader}")).unwrap()
            > text
                .find(&format!("restart replica {}", replicas[0]))
                .unwrap(),
        "{text}"
    );
    assert!(
        text.contains("expected write outage: writes stop while"),
        "{text}"
    );
    assert_eq!(
        show_everywhere(&inv, &fleet, "shared_buffers").await,
        names
            .iter()
            .map(|n| (n.clone(), "64MB".to_string()))
            .collect(),
    );
    settled(&a0, 2).await;
    assert_eq!(
        drained(&fleet).await,
        none_drained(&fleet),
        "a server left drained"
    );
    assert_eq!(
        get_json(&format!("{a0}/cluster")).await.unwrap()["members"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["role"] == "leader")
            .unwrap()["name"],
        leader.as_str(),
        "restart in place keeps the leader"
    );
    // No acknowledged row lost.
    let c = pg(&hp, s.primary_port, &password).await.expect("haproxy");
    let rows: Vec<i64> = c
        .query("SELECT x FROM probe", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    let missing: Vec<&i64> = p.acked.iter().filter(|x| !rows.contains(x)).collect();
    assert!(missing.is_empty(), "acknowledged rows lost: {missing:?}");
    println!(
        "MEASURED write outage of the rolling restart (longest gap between acknowledged writes through HAProxy): {:.2}s ({} writes acknowledged, {} failed)",
        p.longest_gap.as_secs_f64(),
        p.acked.len(),
        p.failed
    );
    drop(p);

    // 2. A second run restarts nothing.
    let pid_before = pids(&s, &fleet).await;
    let text = restart_pending(&state, &inv_path, &password);
    assert!(text.contains("no member is pending restart"), "{text}");
    assert_eq!(
        pids(&s, &fleet).await,
        pid_before,
        "a no-op run restarted something"
    );

    // A server an interrupted run left drained is put back by the next run (and reported).
    let stray = replicas[1].clone();
    let on = info.hosts[2].name.clone();
    fleet[&on]
        .run_ok(
            &rolling::haproxy_admin_command(&format!(
                "set server rol_replicas/{stray} state drain"
            )),
            Duration::from_secs(20),
        )
        .await
        .unwrap();
    assert_eq!(drained(&fleet).await[&on], vec![stray.clone()]);
    let text = restart_pending(&state, &inv_path, &password);
    assert!(
        text.contains(&format!(
            "[{stray}] put back into rol_replicas on {on} (left drained by an interrupted run)"
        )) && text.contains("no member is pending restart"),
        "{text}"
    );
    assert_eq!(drained(&fleet).await, none_drained(&fleet));

    // 3. A decrease of max_connections: the primary first, then each standby.
    let before = started_at(&inv, &fleet).await;
    patch_config(
        &inv,
        &api(&info.host(&leader).unwrap().address),
        json!({"postgresql": {"parameters": {"max_connections": 90}}}),
    )
    .await;
    wait_pending(&a0, std::slice::from_ref(&leader)).await;
    let (st, ip, pw) = (state.clone(), inv_path.clone(), password.clone());
    let text = tokio::task::spawn_blocking(move || restart_pending(&st, &ip, &pw))
        .await
        .unwrap();
    println!("{text}");
    assert!(
        text.contains(&format!("restart primary {leader} in place")),
        "{text}"
    );
    let after = started_at(&inv, &fleet).await;
    for n in &names {
        assert!(after[n] > before[n], "{n} was not restarted");
    }
    for r in &replicas {
        assert!(
            after[*r] > after[&leader],
            "replica {r} restarted before the primary {leader}: {after:?}"
        );
    }
    assert_eq!(
        show_everywhere(&inv, &fleet, "max_connections").await,
        names
            .iter()
            .map(|n| (n.clone(), "90".to_string()))
            .collect(),
    );
    settled(&a0, 2).await;
    assert_eq!(drained(&fleet).await, none_drained(&fleet));

    // A raise and a decrease together: two phases (raises replicas-first, then the decrease
    // on the standbys once replayed); everyone ends on the new values, streaming.
    patch_config(
        &inv,
        &api(&info.host(&leader).unwrap().address),
        json!({"postgresql": {"parameters": {"max_worker_processes": 16, "max_connections": 80}}}),
    )
    .await;
    wait_pending(&a0, &names).await;
    let (st, ip, pw) = (state.clone(), inv_path.clone(), password.clone());
    let text = tokio::task::spawn_blocking(move || restart_pending(&st, &ip, &pw))
        .await
        .unwrap();
    println!("{text}");
    assert!(
        text.contains("phase 1: increases") && text.contains("phase 2: decreases"),
        "{text}"
    );
    for (guc, want) in [("max_worker_processes", "16"), ("max_connections", "80")] {
        assert_eq!(
            show_everywhere(&inv, &fleet, guc).await,
            names
                .iter()
                .map(|n| (n.clone(), want.to_string()))
                .collect(),
            "{guc}"
        );
    }
    settled(&a0, 2).await;
    assert_eq!(drained(&fleet).await, none_drained(&fleet));

    // 4. primary_update_method switchover: the replicas, then a switchover to a restarted
    // replica; the old primary comes back as a streaming replica with the new value.
    patch_config(
        &inv,
        &api(&info.host(&leader).unwrap().address),
        json!({"postgresql": {"parameters": {"shared_buffers": "96MB"}}}),
    )
    .await;
    wait_pending(&a0, &names).await;
    let (st, ip, pw) = (state.clone(), inv_path.clone(), password.clone());
    let text = tokio::task::spawn_blocking(move || {
        restart_pending_with(&st, &ip, &pw, &["--primary-update-method", "switchover"])
    })
    .await
    .unwrap();
    println!("{text}");
    assert!(text.contains(&format!("switch over {leader} → ")), "{text}");
    let new_leader = leader_with_streaming_replicas(&a0, 2).await;
    assert_ne!(new_leader, leader, "the switchover did not move the leader");
    assert_eq!(
        show_everywhere(&inv, &fleet, "shared_buffers").await,
        names
            .iter()
            .map(|n| (n.clone(), "96MB".to_string()))
            .collect(),
    );
    settled(&a0, 2).await;
    assert_eq!(drained(&fleet).await, none_drained(&fleet));
    let text = restart_pending(&state, &inv_path, &password);
    assert!(text.contains("no member is pending restart"), "{text}");
}
