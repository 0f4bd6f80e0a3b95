//! Adding nodes end to end, on a real namespace lab (subnet 10.232.25.0/24, bridge `phadd0`)
//! over SSH: a 3-host cluster (postgres + etcd + haproxy on each) grows to 5 in one `apply` of
//! the edited inventory, with a write probe through HAProxy's primary port running throughout.
//! Proves: 5 healthy etcd voters, the leader kept and 4 streaming replicas (the running members
//! admitted the new ones in pg_hba before they cloned), every HAProxy (old and new) has a server
//! for every member and routes writes to the leader and reads to the 4 replicas (health checks
//! passing), no acknowledged write lost and no write refused, a second apply plans nothing.
//! The grow is first cut twice — `pgherd apply` SIGKILLed while a new etcd member joins, and
//! again while the new replicas clone — and the next run converges (it waits for the killed
//! run's day-2 lock to lapse). Then back to 3: the two new postgres + etcd replicas leave the
//! inventory; refused while a remaining etcd member is unhealthy (nothing changed), then
//! removed from the DCS, etcd, slots, HAProxy and pg_hba, their agent and etcd stopped and not
//! started at boot. Needs root.

use std::path::Path;
use std::time::Duration;

use pgherd::lab::{self, LabInfo, LabSpec};

mod common;
use common::cluster::eventually;
use common::deploy::{
    LabGuard, agent_logs, agent_state_check, apply_inventory, assert_plan_empty, build_spec,
    fresh_lab, get_json, haproxy_servers, haproxy_servers_up, healthy_voters, is_root,
    leader_with_streaming_replicas, pgherd_killed_at, sql_on, words_of, write_lab_inventory,
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
    // Every HAProxy routes writes to the leader and reads to the four replicas (their health
    // checks pass, not only their server lines exist).
    let replicas: Vec<String> = names.iter().filter(|n| **n != leader).cloned().collect();
    for h in &names {
        eventually(
            Duration::from_secs(60),
            "HAProxy routes to the leader and every replica",
            || async {
                (haproxy_servers_up(&fleet5, h, "add_primary").await == [leader.clone()]
                    && haproxy_servers_up(&fleet5, h, "add_replicas").await == replicas)
                    .then_some(())
            },
        )
        .await;
    }
    let (_, s5) = build_spec(&inv_path);
    assert_plan_empty(&s5, &fleet5).await;

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

    shrink_back_to_three(&info5, &inv_path, &state, &leader, &pw).await;
    drop(guard);
}

/// 5 → 3: the two new hosts (postgres + etcd replicas) leave the inventory. First refused while
/// a remaining etcd member is not healthy (its etcd frozen by SIGSTOP: a membership change then
/// risks quorum), with nothing changed; then, once it is back, one apply removes both: gone
/// from the DCS, etcd, the leader's slots, every HAProxy and every pg_hba; their agents and
/// etcd stopped and not started at boot; the leader kept; `plan` empty; no write lost.
async fn shrink_back_to_three(
    info5: &LabInfo,
    inv_path: &Path,
    state: &Path,
    leader: &str,
    pw: &str,
) {
    let (_, s5) = build_spec(inv_path);
    let via = info5.hosts[0].address.clone();
    let api = format!("http://{via}:{}", s5.restapi_port);
    let probe = WriteProbe::start(&via, s5.primary_port, pw).await;
    let fleet5 = pgherd::cli::connect(&build_spec(inv_path).0, state)
        .await
        .expect("connect");
    let frozen = ["add2", "add3"].into_iter().find(|h| *h != leader).unwrap();
    let freeze = |sig: &'static str| {
        let t = fleet5[frozen].clone();
        async move {
            t.run_ok(&format!("pkill -{sig} -x etcd"), Duration::from_secs(20))
                .await
                .unwrap_or_else(|e| panic!("pkill -{sig} etcd: {e}"));
        }
    };
    write_inventory(info5, inv_path, 3);
    freeze("STOP").await;
    let (_, r) = apply_inventory(inv_path, state).await;
    freeze("CONT").await;
    let err = r.expect_err("a membership change with an unhealthy remaining member is refused");
    assert!(err.contains(frozen) && err.contains("not healthy"), "{err}");
    let all: Vec<String> = info5.hosts.iter().map(|h| h.name.clone()).collect();
    let voters = eventually(Duration::from_secs(60), "etcd healthy again", || async {
        let v = healthy_voters(fleet5["add1"].as_ref()).await;
        (v.len() == 5).then_some(v)
    })
    .await;
    assert_eq!(voters, all, "the refused run changed etcd membership");
    let now = leader_with_streaming_replicas(&api, 4).await;
    assert_eq!(
        now,
        leader,
        "the leader changed while one etcd member was frozen:\n{}",
        agent_logs(info5)
    );

    let (fleet3, r) = apply_inventory(inv_path, state).await;
    let report = r.unwrap_or_else(|e| panic!("shrink apply: {e}"));
    for d in &report.done {
        eprintln!("[{}] {}: {}", d.0, d.1, d.2);
    }
    let (_, s3) = build_spec(inv_path);
    let three = ["add1", "add2", "add3"];
    assert_eq!(healthy_voters(fleet3["add1"].as_ref()).await, three);
    assert_eq!(leader_with_streaming_replicas(&api, 2).await, leader);
    let members = get_json(&format!("{api}/cluster"))
        .await
        .expect("GET /cluster");
    let mut listed: Vec<&str> = members["members"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|m| m["name"].as_str())
        .collect();
    listed.sort();
    assert_eq!(listed, three, "DCS members");
    let slots = sql_on(
        &s3,
        fleet3[leader].as_ref(),
        leader,
        "select coalesce(string_agg(slot_name::text, ' ' order by slot_name), '') from pg_replication_slots",
    )
    .await;
    let mut want: Vec<&str> = three.into_iter().filter(|h| *h != leader).collect();
    want.sort();
    assert_eq!(
        slots.split_whitespace().collect::<Vec<_>>(),
        want,
        "the leader's slots"
    );
    let gone = [
        info5.hosts[3].address.clone(),
        info5.hosts[4].address.clone(),
    ];
    for h in three {
        for backend in ["add_primary", "add_replicas"] {
            assert_eq!(
                haproxy_servers(&fleet3, h, backend).await,
                three,
                "{h}: HAProxy {backend}"
            );
        }
        let hba = sql_on(
            &s3,
            fleet3[h].as_ref(),
            h,
            "select coalesce(string_agg(address, ' '), '') from pg_hba_file_rules",
        )
        .await;
        for a in &gone {
            assert!(
                !hba.split([' ', ',', '\n']).any(|x| x == a),
                "{h}'s pg_hba still admits {a}: {hba}"
            );
        }
    }
    let check = format!(
        "{}; pgrep -x etcd >/dev/null && echo etcd || echo no-etcd",
        agent_state_check()
    );
    for h in ["add4", "add5"] {
        assert_eq!(
            words_of(fleet5[h].as_ref(), &check).await,
            ["no-agent", "no-sup", "no-run", "no-etcd"],
            "{h}"
        );
    }
    assert_plan_empty(&s3, &fleet3).await;
    let report = probe.stop().await;
    let lost = lost_writes(&via, s5.primary_port, pw, &report.acked).await;
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(!report.acked.is_empty());
    println!(
        "MEASURED 5 → 3 hosts: longest write gap {:.2}s",
        report.max_gap.as_secs_f64()
    );
}
