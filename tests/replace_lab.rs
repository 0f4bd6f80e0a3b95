//! Replacing failed hosts end to end, on a real namespace lab (subnet 10.232.26.0/24, bridge
//! `phrep0`) over SSH, with a write probe through HAProxy's primary port running throughout:
//! - a live host is never replaced: `pgherd replace` of a running replica, and an `apply` of an
//!   inventory that moves it by hand, are both refused with the evidence (the inventory file
//!   untouched, the replica still streaming);
//! - a replica's host crashed for good, replaced under a new name by editing the inventory →
//!   the run is SIGKILLed twice (at the dead etcd member's removal, during the clone) and the
//!   next one converges: 3 healthy etcd voters, the replacement streaming, no slot of the old
//!   name, `plan` empty;
//! - the leader's host crashed for good → the agents fail over first (pgherd never promotes),
//!   then `pgherd replace OLDLEADER --address NEW` (cut once during the clone, run again)
//!   brings the same name back on a new host: its etcd member at the new peer URL, its slot
//!   (same name) active on the new leader, `plan` empty;
//! - no acknowledged write lost. Needs root.

use std::path::Path;
use std::time::Duration;

use pgherd::lab::{self, LabInfo, LabSpec};

mod common;
use common::cluster::eventually;
use common::deploy::{
    LabGuard, apply_inventory, assert_plan_empty, build_spec, fresh_lab, get_json, healthy_voters,
    is_root, leader_with_streaming_replicas, pgherd_killed_at, pgherd_run, write_lab_inventory,
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

/// Slots on the leader (behind HAProxy's primary port at `via`): (name, active).
async fn leader_slots_active(addr: &str, port: u16, pw: &str) -> Vec<(String, bool)> {
    let c = common::deploy::pg(addr, port, pw).await.expect("leader");
    c.query(
        "SELECT slot_name::text, active FROM pg_replication_slots",
        &[],
    )
    .await
    .unwrap()
    .iter()
    .map(|r| (r.get(0), r.get(1)))
    .collect()
}

/// The end state of a replace: `names` (the inventory's, `names[0]` a survivor on lab host
/// `names[0]`) are the healthy etcd voters, the leader streams to the others, its slots are
/// exactly the other members' (none of `gone`), all active, and `plan` is empty.
async fn check_replaced(
    info: &LabInfo,
    inv_path: &Path,
    state: &Path,
    names: &[&str],
    gone: Option<&str>,
    pw: &str,
) {
    let (fleet, r) = apply_inventory(inv_path, state).await;
    r.unwrap_or_else(|e| panic!("the converging run: {e}"));
    let (_, s) = build_spec(inv_path);
    let mut sorted: Vec<String> = names.iter().map(|h| h.to_string()).collect();
    sorted.sort();
    assert_eq!(healthy_voters(fleet[names[0]].as_ref()).await, sorted);
    let via = &info.host(names[0]).unwrap().address;
    let api = format!("http://{via}:{}", s.restapi_port);
    let leader = leader_with_streaming_replicas(&api, names.len() - 1).await;
    let mut want: Vec<String> = sorted.iter().filter(|n| **n != leader).cloned().collect();
    want.sort();
    let slots = eventually(
        Duration::from_secs(60),
        "the leader's slots are the other members', all active",
        || async {
            let mut slots = leader_slots_active(via, s.primary_port, pw).await;
            slots.sort();
            let names: Vec<String> = slots.iter().map(|(n, _)| n.clone()).collect();
            (names == want && slots.iter().all(|(_, a)| *a)).then_some(names)
        },
    )
    .await;
    if let Some(g) = gone {
        assert!(!slots.iter().any(|x| x == g), "{slots:?}");
    }
    assert_plan_empty(&s, &fleet).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_hosts_are_replaced_and_live_ones_never() {
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
    let inv_arg = inv_path.to_str().unwrap();
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
    let api = format!("http://{via}:{}", s.restapi_port);
    let probe = WriteProbe::start(&via, s.primary_port, &pw).await;
    let addr = |h: &str| info5.host(h).unwrap().address.clone();

    // 0. A live host is never replaced: by the verb, nor by an edited inventory.
    let before = std::fs::read_to_string(&inv_path).unwrap();
    let (ok, out) = pgherd_run(
        &state,
        &[
            "replace",
            replica,
            "--address",
            &addr("rep4"),
            "-y",
            "-i",
            inv_arg,
        ],
    );
    assert!(!ok, "replace of a live replica succeeded:\n{out}");
    assert!(out.contains("still answers"), "{out}");
    assert!(out.contains("unchanged"), "{out}");
    assert_eq!(std::fs::read_to_string(&inv_path).unwrap(), before);
    let moved = before.replace(
        &format!("address: {}\n", addr(replica)),
        &format!("address: {}\n", addr("rep4")),
    );
    std::fs::write(&inv_path, &moved).unwrap();
    let (_, r) = apply_inventory(&inv_path, &state).await;
    let e = r.expect_err("an apply moving a live replica was not refused");
    assert!(e.contains("still answers"), "{e}");
    std::fs::write(&inv_path, &before).unwrap();
    leader_with_streaming_replicas(&api, 2).await;

    // 1. A replica's host dies for good; rep4 (a new name, a new address) takes its place.
    //    The run is cut twice, then converges.
    lab::crash(&guard.0, replica).expect("crash the replica's host");
    let mut hosts: Vec<&str> = ["rep1", "rep2", "rep3"]
        .into_iter()
        .filter(|h| *h != replica)
        .collect();
    hosts.push("rep4");
    write_inventory(&info5, &inv_path, &hosts);
    for at in [
        &format!("remove etcd member {replica}"),
        "waiting until replicas stream",
    ] {
        let (killed, out) = pgherd_killed_at(&state, &["apply", "-y", "-i", inv_arg], at);
        assert!(killed, "apply finished before reaching {at:?}:\n{out}");
    }
    let mut names = hosts.clone();
    names.sort_by_key(|n| *n != survivor);
    check_replaced(&info5, &inv_path, &state, &names, Some(replica), &pw).await;
    println!(
        "MEASURED replace a dead replica: longest write gap {:.2}s",
        probe.take_max_gap().as_secs_f64()
    );

    // 2. The leader's host dies for good: the agents fail over first, then the same name
    //    comes back on rep5's address through `pgherd replace`.
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
    let new_addr = addr("rep5");
    let replace = [
        "replace",
        leader.as_str(),
        "--address",
        &new_addr,
        "-y",
        "-i",
        inv_arg,
    ];
    let (killed, out) = pgherd_killed_at(&state, &replace, "waiting until replicas stream");
    assert!(killed, "replace finished before the clone:\n{out}");
    let text = std::fs::read_to_string(&inv_path).unwrap();
    assert!(
        text.contains(&format!("name: {leader}\n    address: {new_addr}\n")),
        "the interrupted replace did not leave the edited inventory:\n{text}"
    );
    let (ok, out) = pgherd_run(&state, &replace);
    assert!(ok, "the re-run replace failed:\n{out}");
    assert!(out.contains("converging"), "{out}");
    check_replaced(&info5, &inv_path, &state, &names, None, &pw).await;
    println!(
        "MEASURED leader host lost (failover {new_leader}) and replaced under its name: longest write gap {:.2}s",
        probe.take_max_gap().as_secs_f64()
    );

    let report = probe.stop().await;
    let lost = lost_writes(&via, s.primary_port, &pw, &report.acked).await;
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    drop(guard);
}
