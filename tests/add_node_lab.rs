//! Adding nodes end to end, on a real namespace lab (subnet 10.232.25.0/24, bridge `phadd0`)
//! over SSH: a 3-host cluster (postgres + etcd + haproxy on each) grows to 5 in one `apply` of
//! the edited inventory, with a write probe through HAProxy's primary port running throughout.
//! Proves: 5 healthy etcd voters, the leader kept and 4 streaming replicas (the running members
//! admitted the new ones in pg_hba before they cloned), every HAProxy (old and new) has a server
//! for every member, no acknowledged write lost and no write refused, a second apply plans
//! nothing. The grow is first cut twice — `pgherd apply` SIGKILLed while a new etcd member
//! joins, and again while the new replicas clone — and the next run converges (it waits for the
//! killed run's day-2 lock to lapse). Needs root.

use std::path::Path;

use pgherd::lab::{self, LabInfo, LabSpec};
use pgherd::provision::apply::{self};

mod common;
use common::deploy::{
    LabGuard, apply_inventory, build_spec, fresh_lab, haproxy_servers, healthy_voters, is_root,
    leader_with_streaming_replicas, pgherd_killed_at, write_lab_inventory,
};
use common::probe::{WriteProbe, lost_writes};

const SUBNET: &str = "10.232.25";

/// The first `n` lab hosts, each with every role.
fn write_inventory(info: &LabInfo, path: &Path, n: usize) {
    let hosts: Vec<(&str, &str)> = info
        .hosts
        .iter()
        .take(n)
        .map(|h| (h.name.as_str(), "[postgres, etcd, haproxy]"))
        .collect();
    write_lab_inventory(info, "add", path, &hosts);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn three_hosts_grow_to_five_in_one_apply_without_interrupting_writes() {
    if !is_root() {
        eprintln!("skipped: add_node_lab needs root (network namespaces)");
        return;
    }
    let (tmp, guard, info3) =
        fresh_lab("pgadd", |dir| LabSpec::new("add", 3, SUBNET, "phadd0", dir));
    let spec5 = LabSpec {
        hosts: 5,
        ..guard.0.clone()
    };
    let _guard5 = LabGuard(spec5.clone());
    let state = tmp.path().join("st");
    let inv_path = tmp.path().join("lab.yml");
    write_inventory(&info3, &inv_path, 3);
    let (fleet, r) = apply_inventory(&inv_path, &state).await;
    r.unwrap_or_else(|e| panic!("first apply: {e}"));
    let (inv, s) = build_spec(&inv_path);
    let pw = inv.secrets.superuser.expose().to_string();
    let api = format!("http://{}:{}", info3.hosts[0].address, s.restapi_port);
    let leader = leader_with_streaming_replicas(&api, 2).await;
    let probe = WriteProbe::start(&info3.hosts[0].address, s.primary_port, &pw).await;

    let info5 = lab::up(&spec5).expect("the lab grows to 5 hosts");
    write_inventory(&info5, &inv_path, 5);
    let inv_arg = inv_path.to_str().unwrap();
    // Cut twice: during an etcd join, then during the clones.
    for at in [
        "waiting until the learner is started and in sync",
        "waiting until replicas stream",
    ] {
        let (killed, out) = pgherd_killed_at(&state, &["apply", "-y", "-i", inv_arg], at);
        assert!(killed, "apply finished before reaching {at:?}:\n{out}");
    }
    let (fleet5, r) = apply_inventory(&inv_path, &state).await;
    r.unwrap_or_else(|e| panic!("grow apply: {e}"));

    let names: Vec<String> = info5.hosts.iter().map(|h| h.name.clone()).collect();
    assert_eq!(healthy_voters(fleet[&names[0]].as_ref()).await, names);
    assert_eq!(leader_with_streaming_replicas(&api, 4).await, leader);
    for h in &names {
        for backend in ["add_primary", "add_replicas"] {
            assert_eq!(
                haproxy_servers(&fleet5, h, backend).await,
                names,
                "{h}: HAProxy {backend}"
            );
        }
    }
    let (_, s5) = build_spec(&inv_path);
    let plan = apply::make_plan(&s5, &fleet5).await.expect("plan");
    assert!(
        plan.is_noop(),
        "{}",
        pgherd::provision::report::render_plan(&plan, Default::default())
    );

    let report = probe.stop().await;
    // Read back through HAProxy's primary port: the leader.
    let lost = lost_writes(&info5.hosts[1].address, s.primary_port, &pw, &report.acked).await;
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    println!(
        "MEASURED 3 → 5 hosts: longest write gap {:.2}s, {} writes refused",
        report.max_gap.as_secs_f64(),
        report.failures
    );
    assert_eq!(report.failures, 0, "writes were refused during the grow");
    drop(guard);
}
