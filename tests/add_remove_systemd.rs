//! Adding and removing a node on hosts that boot systemd as PID 1 (subnet 10.232.27.0/24,
//! bridge `phars0`), by editing the inventory and running `apply`, with a write probe through
//! HAProxy's primary port: a 4th host (postgres + haproxy; etcd stays at 3 voters) joins —
//! units enabled and active, streaming, in every HAProxy; then it is removed — gone from the
//! DCS, its slot gone from the leader, its server gone from every HAProxy, its agent stopped and
//! disabled at boot; no acknowledged write lost; a second apply plans nothing. Needs root.

use std::time::Duration;

use pgherd::lab::{self, HostInit, LabSpec};
use pgherd::provision::apply::Fleet;

mod common;
use common::cluster::eventually;
use common::deploy::{
    LabGuard, apply_inventory, assert_plan_empty, build_spec, fresh_lab, get_json, haproxy_servers,
    is_root, leader_with_streaming_replicas, pg, write_lab_inventory,
};
use common::probe::{WriteProbe, lost_writes};

const SUBNET: &str = "10.232.27";

async fn systemctl(fleet: &Fleet, host: &str, args: &str) -> String {
    fleet[host]
        .run(&format!("systemctl {args}"), Duration::from_secs(20))
        .await
        .expect("systemctl")
        .stdout_str()
        .trim()
        .to_string()
}

/// Servers of the replica backend in `host`'s HAProxy.
async fn replica_servers(fleet: &Fleet, host: &str) -> Vec<String> {
    haproxy_servers(fleet, host, "ars_replicas").await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_joins_and_leaves_on_systemd_hosts() {
    if !is_root() {
        eprintln!("skipped: add_remove_systemd needs root (network namespaces)");
        return;
    }
    let (tmp, guard, _) = fresh_lab("pgars", |dir| {
        LabSpec::new("ars", 3, SUBNET, "phars0", dir).with_init(HostInit::Systemd)
    });
    let spec4 = LabSpec {
        hosts: 4,
        ..guard.0.clone()
    };
    let _guard4 = LabGuard(spec4.clone());
    let info = lab::up(&spec4).expect("a 4-host systemd lab");
    let state = tmp.path().join("st");
    let inv_path = tmp.path().join("lab.yml");
    let all = "[postgres, etcd, haproxy]";
    let three = [("ars1", all), ("ars2", all), ("ars3", all)];
    write_lab_inventory(&info, "ars", &inv_path, &three);
    let (_, r) = apply_inventory(&inv_path, &state).await;
    r.unwrap_or_else(|e| panic!("first apply: {e}"));
    let (inv, s) = build_spec(&inv_path);
    let pw = inv.secrets.superuser.expose().to_string();
    let via = info.host("ars2").unwrap().address.clone();
    let api = format!("http://{via}:{}", s.restapi_port);
    let leader = leader_with_streaming_replicas(&api, 2).await;
    let probe = WriteProbe::start(&via, s.primary_port, &pw).await;

    // Join.
    let mut four = three.to_vec();
    four.push(("ars4", "[postgres, haproxy]"));
    write_lab_inventory(&info, "ars", &inv_path, &four);
    let (fleet, r) = apply_inventory(&inv_path, &state).await;
    r.unwrap_or_else(|e| panic!("join apply: {e}"));
    assert_eq!(leader_with_streaming_replicas(&api, 3).await, leader);
    assert_eq!(
        systemctl(&fleet, "ars4", "is-active pgherd-agent").await,
        "active"
    );
    assert_eq!(
        systemctl(&fleet, "ars4", "is-enabled pgherd-agent").await,
        "enabled"
    );
    for h in ["ars1", "ars2", "ars3", "ars4"] {
        assert_eq!(
            replica_servers(&fleet, h).await,
            ["ars1", "ars2", "ars3", "ars4"],
            "{h}: HAProxy replica backend"
        );
    }

    // Leave.
    write_lab_inventory(&info, "ars", &inv_path, &three);
    let (fleet3, r) = apply_inventory(&inv_path, &state).await;
    r.unwrap_or_else(|e| panic!("remove apply: {e}"));
    eventually(
        Duration::from_secs(60),
        "ars4 gone from the DCS",
        || async {
            let v = get_json(&format!("{api}/cluster")).await?;
            (!v["members"].as_array()?.iter().any(|m| m["name"] == "ars4")).then_some(())
        },
    )
    .await;
    assert_eq!(leader_with_streaming_replicas(&api, 2).await, leader);
    let c = pg(&via, s.primary_port, &pw).await.expect("leader");
    let slots: Vec<String> = c
        .query("SELECT slot_name::text FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect();
    assert!(!slots.iter().any(|x| x == "ars4"), "{slots:?}");
    for h in ["ars1", "ars2", "ars3"] {
        assert_eq!(
            replica_servers(&fleet3, h).await,
            ["ars1", "ars2", "ars3"],
            "{h}: HAProxy replica backend"
        );
    }
    assert_ne!(
        systemctl(&fleet, "ars4", "is-active pgherd-agent").await,
        "active"
    );
    assert_eq!(
        systemctl(&fleet, "ars4", "is-enabled pgherd-agent").await,
        "disabled"
    );
    let (_, s3) = build_spec(&inv_path);
    assert_plan_empty(&s3, &fleet3).await;

    let report = probe.stop().await;
    let lost = lost_writes(&via, s.primary_port, &pw, &report.acked).await;
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    println!(
        "MEASURED systemd join + leave: longest write gap {:.2}s",
        report.max_gap.as_secs_f64()
    );
    drop(guard);
}
