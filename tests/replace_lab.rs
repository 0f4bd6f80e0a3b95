//! Replacing failed hosts end to end, on a real namespace lab (subnet 10.232.26.0/24, bridge
//! `phrep0`) over SSH, by editing the inventory (the dead host out, a new host at a new address
//! in) and running `apply`, with a write probe through HAProxy's primary port running:
//! - a replica's host crashed for good → 3 healthy etcd voters (the dead member removed first),
//!   the replacement streaming, no slot of the old name on the leader, `plan` empty afterwards;
//! - then the leader's host crashed for good → the agents fail over first (pgherd never
//!   promotes), then the same replace completes;
//! - no acknowledged write lost. Needs root.

use std::path::Path;
use std::time::Duration;

use pgherd::lab::{self, LabInfo, LabSpec};
use pgherd::provision::apply;

mod common;
use common::cluster::eventually;
use common::deploy::{
    LabGuard, apply_inventory, build_spec, fresh_lab, get_json, healthy_voters, is_root,
    leader_with_streaming_replicas, write_lab_inventory,
};
use common::probe::{WriteProbe, lost_writes};

const SUBNET: &str = "10.232.26";

/// The lab hosts `hosts`, each with every role.
fn write_inventory(info: &LabInfo, path: &Path, hosts: &[&str]) {
    let hosts: Vec<(&str, &str)> = hosts
        .iter()
        .map(|h| (*h, "[postgres, etcd, haproxy]"))
        .collect();
    write_lab_inventory(info, "rep", path, &hosts);
}

/// Physical slot names on the server behind HAProxy's primary port (the leader).
async fn leader_slots(addr: &str, port: u16, pw: &str) -> Vec<String> {
    let c = common::deploy::pg(addr, port, pw).await.expect("leader");
    c.query("SELECT slot_name::text FROM pg_replication_slots", &[])
        .await
        .unwrap()
        .iter()
        .map(|r| r.get(0))
        .collect()
}

/// Replaces the hosts of the inventory with `hosts`, applies, and checks the end state.
async fn replace_and_check(
    info: &LabInfo,
    inv_path: &Path,
    state: &Path,
    hosts: &[&str],
    gone: &str,
    pw: &str,
) {
    write_inventory(info, inv_path, hosts);
    let (fleet, r) = apply_inventory(inv_path, state).await;
    r.unwrap_or_else(|e| panic!("replace {gone}: {e}"));
    let (_, s) = build_spec(inv_path);
    let mut names: Vec<String> = hosts.iter().map(|h| h.to_string()).collect();
    names.sort();
    assert_eq!(healthy_voters(fleet[hosts[0]].as_ref()).await, names);
    let api = format!(
        "http://{}:{}",
        info.host(hosts[0]).unwrap().address,
        s.restapi_port
    );
    leader_with_streaming_replicas(&api, hosts.len() - 1).await;
    let via = &info.host(hosts[0]).unwrap().address;
    let slots = eventually(
        Duration::from_secs(60),
        "no slot of the replaced member is left",
        || async {
            let slots = leader_slots(via, s.primary_port, pw).await;
            (!slots.iter().any(|x| x == gone)).then_some(slots)
        },
    )
    .await;
    assert_eq!(slots.len(), hosts.len() - 1, "{slots:?}");
    let plan = apply::make_plan(&s, &fleet).await.expect("plan");
    assert!(
        plan.is_noop(),
        "{}",
        pgherd::provision::report::render_plan(&plan, Default::default())
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_hosts_are_replaced_from_the_inventory() {
    if !is_root() {
        eprintln!("skipped: replace_lab needs root (network namespaces)");
        return;
    }
    let (tmp, guard, info3) =
        fresh_lab("pgrep", |dir| LabSpec::new("rep", 3, SUBNET, "phrep0", dir));
    let spec5 = LabSpec {
        hosts: 5,
        ..guard.0.clone()
    };
    let _guard5 = LabGuard(spec5.clone());
    let state = tmp.path().join("st");
    let inv_path = tmp.path().join("lab.yml");
    write_inventory(&info3, &inv_path, &["rep1", "rep2", "rep3"]);
    let (_, r) = apply_inventory(&inv_path, &state).await;
    r.unwrap_or_else(|e| panic!("first apply: {e}"));
    let (inv, s) = build_spec(&inv_path);
    let pw = inv.secrets.superuser.expose().to_string();
    let api1 = format!("http://{}:{}", info3.hosts[0].address, s.restapi_port);
    let leader = leader_with_streaming_replicas(&api1, 2).await;
    let info5 = lab::up(&spec5).expect("the lab grows to 5 hosts");
    // The replica that dies first, and the host that survives both crashes (its HAProxy
    // carries the probe).
    let mut others = ["rep1", "rep2", "rep3"]
        .into_iter()
        .filter(|h| *h != leader);
    let (replica, survivor) = (others.next().unwrap(), others.next().unwrap());
    let via = info5.host(survivor).unwrap().address.clone();
    let probe = WriteProbe::start(&via, s.primary_port, &pw).await;

    // 1. A replica's host dies for good; rep4 (a new address) takes its place.
    lab::crash(&guard.0, replica).expect("crash the replica's host");
    let mut hosts: Vec<&str> = ["rep1", "rep2", "rep3"]
        .into_iter()
        .filter(|h| *h != replica)
        .collect();
    hosts.push("rep4");
    replace_and_check(&info5, &inv_path, &state, &hosts, replica, &pw).await;
    println!(
        "MEASURED replace a dead replica: longest write gap {:.2}s",
        probe.take_max_gap().as_secs_f64()
    );

    // 2. The leader's host dies for good: the agents fail over first, then rep5 replaces it.
    let api = format!("http://{via}:{}", s.restapi_port);
    lab::crash(&guard.0, &leader).expect("crash the leader's host");
    let new_leader = eventually(
        Duration::from_secs(90),
        "the agents fail over to a new leader",
        || {
            let url = format!("{api}/cluster");
            let old = leader.clone();
            async move {
                let v = get_json(&url).await?;
                v["members"]
                    .as_array()?
                    .iter()
                    .find(|m| m["role"] == "leader" && m["name"] != old.as_str())
                    .and_then(|m| m["name"].as_str().map(str::to_string))
            }
        },
    )
    .await;
    let mut hosts: Vec<&str> = hosts.into_iter().filter(|h| *h != leader).collect();
    hosts.push("rep5");
    replace_and_check(&info5, &inv_path, &state, &hosts, &leader, &pw).await;
    println!(
        "MEASURED leader host lost (failover {new_leader}) and replaced: longest write gap {:.2}s",
        probe.take_max_gap().as_secs_f64()
    );

    let report = probe.stop().await;
    let lost = lost_writes(&via, s.primary_port, &pw, &report.acked).await;
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    drop(guard);
}
