//! Rolling configuration changes end to end, on a real 3-host namespace lab (subnet
//! 10.232.22.0/24, bridge `phcfg0`) over SSH, with a write probe through HAProxy's primary port
//! running throughout: each change is made by editing the inventory and running `apply`, as an
//! operator would.
//! - a reload-only parameter (work_mem) reaches every node, no postmaster restarts;
//! - a restart-needing increase (shared_buffers) restarts the replicas one by one and the
//!   primary last, leaves nobody pending, and a second apply plans and restarts nothing;
//! - a lowered max_connections restarts the primary first and every standby still starts;
//! - a pg_hba line added in the inventory is in force on every node; an invalid one is
//!   refused with the member's reason and every node keeps its working pg_hba.conf;
//! - a changed callback is run by the agents on the next role change, PostgreSQL untouched;
//! - agent.yml written but never loaded (an apply cut before its reloads) converges on re-run.
//!
//! The write outage of each kind of change is printed (`MEASURED ...`). Needs root.

use std::path::Path;
use std::time::Duration;

use pgherd::lab::{self, LabSpec};
use pgherd::provision::apply::{self, Fleet};

mod common;
use common::cluster::eventually;
use common::deploy::{
    apply_inventory, build_spec, fresh_lab, get_json, is_root, leader_with_streaming_replicas, pg,
    pids,
};
use common::probe::{WriteProbe, lost_writes};

const SUBNET: &str = "10.232.22";

/// What the test varies in the inventory.
#[derive(Clone)]
struct Knobs {
    params: Vec<(&'static str, String)>,
    hba: Vec<String>,
    on_role_change: String,
}

fn write_inventory(lab: &LabSpec, path: &Path, k: &Knobs) {
    let mut y = lab::inventory_yaml(lab);
    y.push_str("profile: fast\nwatchdog:\n  mode: \"off\"\n");
    y.push_str(&format!(
        "callbacks:\n  on_role_change: {}\n",
        k.on_role_change
    ));
    y.push_str("postgresql:\n  parameters:\n");
    for (n, v) in &k.params {
        y.push_str(&format!("    {n}: {v}\n"));
    }
    if !k.hba.is_empty() {
        y.push_str("  pg_hba:\n");
        for l in &k.hba {
            y.push_str(&format!("    - {l:?}\n"));
        }
    }
    std::fs::write(path, y).unwrap();
}

/// `SHOW name` on every host's own PostgreSQL.
async fn show_everywhere(
    hosts: &[(String, String)],
    port: u16,
    pw: &str,
    name: &str,
) -> Vec<String> {
    let mut out = Vec::new();
    for (_, addr) in hosts {
        let c = pg(addr, port, pw).await.expect("direct connection");
        let v: String = c
            .query_one(&format!("SHOW {name}"), &[])
            .await
            .unwrap()
            .get(0);
        out.push(v);
    }
    out
}

/// `pg_postmaster_start_time()` of each host, as epoch seconds.
async fn start_times(hosts: &[(String, String)], port: u16, pw: &str) -> Vec<(String, f64)> {
    let mut out = Vec::new();
    for (name, addr) in hosts {
        let c = pg(addr, port, pw).await.expect("direct connection");
        let t: f64 = c
            .query_one(
                "SELECT extract(epoch from pg_postmaster_start_time())::float8",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        out.push((name.clone(), t));
    }
    out
}

/// Waits until no member reports pending_restart and every replica streams.
async fn settled(api: &str, replicas: usize) {
    let url = format!("{api}/cluster");
    eventually(
        Duration::from_secs(90),
        "no member pending restart, all replicas streaming",
        || {
            let url = url.clone();
            async move {
                let v = get_json(&url).await?;
                let m = v["members"].as_array()?;
                let streaming = m
                    .iter()
                    .filter(|x| x["role"] == "replica" && x["state"] == "streaming")
                    .count();
                let pending = m.iter().any(|x| x["pending_restart"] == true);
                (streaming == replicas && !pending).then_some(())
            }
        },
    )
    .await;
}

async fn sh(fleet: &Fleet, host: &str, cmd: &str) -> String {
    fleet[host]
        .run_ok(cmd, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{host}: {cmd}: {e}"))
        .stdout_str()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_changes_reach_the_running_cluster_safely() {
    if !is_root() {
        eprintln!("skipped: rolling_config_lab needs root (network namespaces)");
        return;
    }
    let (tmp, guard, info) =
        fresh_lab("pgcfg", |dir| LabSpec::new("cfg", 3, SUBNET, "phcfg0", dir));
    let lab_spec = guard.0.clone();
    let state = tmp.path().join("st");
    let inv_path = tmp.path().join("lab.yml");
    let mut k = Knobs {
        params: vec![
            ("max_connections", "100".into()),
            ("shared_buffers", "32MB".into()),
            ("work_mem", "4MB".into()),
        ],
        // The controller (the test) connects to every node directly.
        hba: vec![format!("host all all {SUBNET}.0/24 scram-sha-256")],
        on_role_change: "/usr/local/bin/cb-old".into(),
    };
    write_inventory(&lab_spec, &inv_path, &k);
    let (inv, s) = build_spec(&inv_path);
    let pw = inv.secrets.superuser.expose().to_string();
    let fleet = pgherd::cli::connect(&inv, &state).await.expect("connect");
    // Two callback scripts on every host: each appends its name and arguments to a log.
    for h in &info.hosts {
        for which in ["old", "new"] {
            sh(
                &fleet,
                &h.name,
                &format!(
                    "printf '#!/bin/sh\\necho {which} \"$@\" >> /var/tmp/callbacks.log\\n' > /usr/local/bin/cb-{which} && chmod 755 /usr/local/bin/cb-{which}"
                ),
            )
            .await;
        }
    }
    apply_inventory(&inv_path, &state)
        .await
        .1
        .unwrap_or_else(|e| panic!("first apply: {e}"));
    let hosts: Vec<(String, String)> = info
        .hosts
        .iter()
        .map(|h| (h.name.clone(), h.address.clone()))
        .collect();
    let api = format!("http://{}:{}", hosts[0].1, s.restapi_port);
    let leader = leader_with_streaming_replicas(&api, 2).await;
    let probe = WriteProbe::start(&hosts[1].1, s.primary_port, &pw).await;

    // 1. Reload only: work_mem everywhere, no postmaster restarted.
    let before = pids(&s, &fleet).await;
    k.params[2].1 = "8MB".into();
    write_inventory(&lab_spec, &inv_path, &k);
    let (_, s2) = build_spec(&inv_path);
    let plan = apply::make_plan(&s2, &fleet).await.expect("plan");
    let text = pgherd::provision::report::render_plan(&plan, Default::default());
    assert!(
        text.contains("postgresql.parameters.work_mem: 4MB → 8MB (reload)"),
        "{text}"
    );
    probe.take_max_gap();
    apply_inventory(&inv_path, &state)
        .await
        .1
        .unwrap_or_else(|e| panic!("work_mem apply: {e}"));
    assert_eq!(
        show_everywhere(&hosts, s.pg_port, &pw, "work_mem").await,
        vec!["8MB"; 3]
    );
    let after = pids(&s, &fleet).await;
    for (h, p) in &before {
        assert_eq!(p[3], after[h][3], "{h}: postmaster restarted for a reload");
    }
    println!(
        "MEASURED reload-only change (work_mem): longest write gap {:.2}s",
        probe.take_max_gap().as_secs_f64()
    );

    // 2. Restart needed: shared_buffers up; replicas first, the primary last.
    k.params[1].1 = "64MB".into();
    write_inventory(&lab_spec, &inv_path, &k);
    let t_before = start_times(&hosts, s.pg_port, &pw).await;
    apply_inventory(&inv_path, &state)
        .await
        .1
        .unwrap_or_else(|e| panic!("shared_buffers apply: {e}"));
    assert_eq!(
        show_everywhere(&hosts, s.pg_port, &pw, "shared_buffers").await,
        vec!["64MB"; 3]
    );
    settled(&api, 2).await;
    let t_after = start_times(&hosts, s.pg_port, &pw).await;
    let leader_start = t_after.iter().find(|(n, _)| *n == leader).unwrap().1;
    for ((n, t0), (_, t1)) in t_before.iter().zip(&t_after) {
        assert!(t1 > t0, "{n} was not restarted");
        if *n != leader {
            assert!(
                *t1 < leader_start,
                "replica {n} restarted after the primary {leader}"
            );
        }
    }
    println!(
        "MEASURED restart-needing increase (shared_buffers): longest write gap {:.2}s",
        probe.take_max_gap().as_secs_f64()
    );
    // A second apply plans nothing and restarts nothing.
    let before = pids(&s, &fleet).await;
    let (_, s2) = build_spec(&inv_path);
    let plan = apply::make_plan(&s2, &fleet).await.expect("plan");
    assert!(
        plan.is_noop(),
        "{}",
        pgherd::provision::report::render_plan(&plan, Default::default())
    );
    let report = apply_inventory(&inv_path, &state).await.1.unwrap();
    assert!(report.done.is_empty(), "{:?}", report.done);
    assert_eq!(pids(&s, &fleet).await, before);

    // 3. A lowered max_connections: the primary first, every standby still starts.
    k.params[0].1 = "90".into();
    write_inventory(&lab_spec, &inv_path, &k);
    let (_, s2) = build_spec(&inv_path);
    let plan = apply::make_plan(&s2, &fleet).await.expect("plan");
    let text = pgherd::provision::report::render_plan(&plan, Default::default());
    assert!(text.contains(&format!("restart: {leader} first")), "{text}");
    apply_inventory(&inv_path, &state)
        .await
        .1
        .unwrap_or_else(|e| panic!("max_connections apply: {e}"));
    settled(&api, 2).await;
    assert_eq!(
        show_everywhere(&hosts, s.pg_port, &pw, "max_connections").await,
        vec!["90"; 3]
    );
    let t_dec = start_times(&hosts, s.pg_port, &pw).await;
    let leader_start = t_dec.iter().find(|(n, _)| *n == leader).unwrap().1;
    for (n, t) in &t_dec {
        if *n != leader {
            assert!(
                *t > leader_start,
                "replica {n} restarted before the primary"
            );
        }
    }
    println!(
        "MEASURED lowered max_connections (primary first): longest write gap {:.2}s",
        probe.take_max_gap().as_secs_f64()
    );

    // 4. pg_hba: a new line is in force everywhere; an invalid one is refused.
    let before = pids(&s, &fleet).await;
    k.hba.push("host all all 192.0.2.0/24 scram-sha-256".into());
    write_inventory(&lab_spec, &inv_path, &k);
    apply_inventory(&inv_path, &state)
        .await
        .1
        .unwrap_or_else(|e| panic!("pg_hba apply: {e}"));
    for (name, addr) in &hosts {
        let c = pg(addr, s.pg_port, &pw).await.unwrap();
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_hba_file_rules WHERE address = '192.0.2.0' AND error IS NULL",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(n, 1, "{name}: the new pg_hba line is not in force");
    }
    let hba_path = format!("{}/pg_hba.conf", inv.postgresql.data_dir.display());
    let mut good = Vec::new();
    for (name, _) in &hosts {
        good.push(sh(&fleet, name, &format!("cat {hba_path}")).await);
    }
    k.hba
        .push("host all all 198.51.100.0/24 scram-sha-257".into());
    write_inventory(&lab_spec, &inv_path, &k);
    let err = apply_inventory(&inv_path, &state)
        .await
        .1
        .expect_err("an invalid pg_hba line must be refused");
    assert!(err.contains("pg_hba"), "{err}");
    assert!(
        hosts.iter().any(|(n, _)| err.contains(n.as_str())),
        "the error names no member: {err}"
    );
    for ((name, addr), was) in hosts.iter().zip(&good) {
        assert_eq!(
            &sh(&fleet, name, &format!("cat {hba_path}")).await,
            was,
            "{name}: pg_hba.conf changed although the new one was invalid"
        );
        pg(addr, s.pg_port, &pw)
            .await
            .unwrap_or_else(|e| panic!("{name}: no longer accepts connections: {e}"));
    }
    k.hba.pop();
    write_inventory(&lab_spec, &inv_path, &k);
    apply_inventory(&inv_path, &state)
        .await
        .1
        .unwrap_or_else(|e| panic!("apply after fixing pg_hba: {e}"));

    // 5. A changed callback: PostgreSQL untouched, the new script runs on the next role change.
    k.on_role_change = "/usr/local/bin/cb-new".into();
    write_inventory(&lab_spec, &inv_path, &k);
    apply_inventory(&inv_path, &state)
        .await
        .1
        .unwrap_or_else(|e| panic!("callback apply: {e}"));
    let after = pids(&s, &fleet).await;
    for (h, p) in &before {
        assert_eq!(
            p[3], after[h][3],
            "{h}: postmaster restarted for an agent reload"
        );
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgherd"))
        .arg("--state-dir")
        .arg(&state)
        .args(["switchover", "-y", "-i"])
        .arg(&inv_path)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "switchover: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let new_leader = leader_with_streaming_replicas(&api, 2).await;
    assert_ne!(new_leader, leader);
    let log = eventually(
        Duration::from_secs(30),
        "the new callback ran on the new leader",
        || async {
            let l = fleet[&new_leader]
                .run("cat /var/tmp/callbacks.log", Duration::from_secs(10))
                .await
                .ok()?
                .stdout_str();
            l.lines()
                .any(|x| x.starts_with("new on_role_change primary"))
                .then_some(l)
        },
    )
    .await;
    assert!(
        !log.lines()
            .any(|x| x.starts_with("old on_role_change primary")),
        "the old callback ran: {log}"
    );
    println!(
        "MEASURED switchover after the callback change: longest write gap {:.2}s",
        probe.take_max_gap().as_secs_f64()
    );

    // 6. agent.yml written but not loaded (an apply cut between the files and the reloads):
    //    the re-run reloads it and the setting is in force.
    k.hba
        .push("host all all 203.0.113.0/24 scram-sha-256".into());
    write_inventory(&lab_spec, &inv_path, &k);
    let (_, s3) = build_spec(&inv_path);
    for h in &s3.hosts {
        let f = h
            .files
            .iter()
            .find(|f| f.path == pgherd::render::AGENT_CONFIG_PATH)
            .unwrap();
        let tmp_path = format!("{}.cut", f.path);
        fleet[&h.name]
            .upload(&tmp_path, &f.content, f.mode, Some(&f.owner))
            .await
            .expect("write agent.yml as a cut apply would");
        sh(&fleet, &h.name, &format!("mv {tmp_path} {}", f.path)).await;
    }
    let plan = apply::make_plan(&s3, &fleet).await.expect("plan");
    let text = pgherd::provision::report::render_plan(&plan, Default::default());
    assert!(text.contains("written but not loaded"), "{text}");
    apply_inventory(&inv_path, &state)
        .await
        .1
        .unwrap_or_else(|e| panic!("re-run after a cut apply: {e}"));
    for (name, addr) in &hosts {
        let c = pg(addr, s.pg_port, &pw).await.unwrap();
        let n: i64 = c
            .query_one(
                "SELECT count(*) FROM pg_hba_file_rules WHERE address = '203.0.113.0'",
                &[],
            )
            .await
            .unwrap()
            .get(0);
        assert_eq!(
            n, 1,
            "{name}: the re-run did not load the written agent.yml"
        );
    }
    let plan = apply::make_plan(&s3, &fleet).await.expect("plan");
    if !plan.is_noop() {
        let mut why = String::new();
        for (name, addr) in &hosts {
            let p = get_json(&format!("http://{addr}:{}/patroni", s.restapi_port)).await;
            why.push_str(&format!("{name}: {p:?}\n"));
            let c = pg(addr, s.pg_port, &pw).await.unwrap();
            for r in c
                .query(
                    "SELECT name, setting, coalesce(unit,'') FROM pg_settings WHERE pending_restart",
                    &[],
                )
                .await
                .unwrap()
            {
                let (n, v, u): (String, String, String) = (r.get(0), r.get(1), r.get(2));
                why.push_str(&format!("  pending in pg_settings: {n} = {v}{u}\n"));
            }
        }
        panic!(
            "{}\n{why}",
            pgherd::provision::report::render_plan(&plan, Default::default())
        );
    }

    // No acknowledged write was lost through all of it.
    let report = probe.stop().await;
    let leader_addr = &hosts.iter().find(|(n, _)| *n == new_leader).unwrap().1;
    let lost = lost_writes(leader_addr, s.pg_port, &pw, &report.acked).await;
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(
        report.acked.len() > 100,
        "the probe barely wrote: {report:?}"
    );
    drop(guard);
}
