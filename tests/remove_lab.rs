//! Removing a PostgreSQL member by deleting its host from the inventory, end to end on a real
//! namespace lab (subnet 10.232.24.0/24, bridge `phrm0`) over SSH, with a write probe through
//! HAProxy's primary port running throughout. 4 hosts: rm1-rm3 `[postgres, etcd, haproxy]`,
//! rm4 `[postgres]` (etcd stays at 3 members).
//! 1. the refusal: rm4 made leader (switchover), then deleted from the inventory → `apply`
//!    fails naming rm4 as the leader, and nothing changed (still a member, still the leader);
//! 2. `pgherd remove rm4` refused while the inventory lists it; deleted there, `pgherd remove
//!    rm4 --switchover-first` hands the leader key to a replica and removes rm4;
//! 3. rm4 back in the inventory: one `apply` makes it a streaming replica again;
//! 4. rm4 (a replica) deleted from the inventory, one `apply` → rm4 gone from `GET /cluster`,
//!    its slot gone from the leader, its server gone from every HAProxy (`show servers
//!    state`), its address gone from every remaining node's `pg_hba_file_rules`, its agent
//!    stopped and not started again when its host boots; the leader unchanged;
//! 5. a second `apply` plans nothing; no acknowledged write was lost.
//!
//! Needs root (namespaces); skipped with a message otherwise.

use std::path::Path;
use std::time::Duration;

use pgherd::lab::{self, LabSpec};
use pgherd::provision::apply::{ApplyReport, Fleet};
use pgherd::provision::rolling::haproxy::haproxy_admin_command;
use pgherd::transport::SshTransport;

mod common;
use common::cluster::eventually;
use common::deploy::{
    agent_state_check, apply_inventory_within, assert_plan_empty, build_spec, fresh_lab, get_json,
    is_root, leader_with_streaming_replicas, sql_on, words_of, write_lab_inventory,
};
use common::probe::{WriteProbe, lost_writes};

const SUBNET: &str = "10.232.24";
const ALL: &str = "[postgres, etcd, haproxy]";
const PG: &str = "[postgres]";

async fn apply_inventory(inv_path: &Path, state: &Path) -> (Fleet, Result<ApplyReport, String>) {
    apply_inventory_within(inv_path, state, Duration::from_secs(120)).await
}

async fn members(api: &str) -> Vec<(String, String)> {
    let c = get_json(&format!("{api}/cluster"))
        .await
        .expect("GET /cluster");
    c["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| {
            (
                m["name"].as_str().unwrap().to_string(),
                m["role"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_member_deleted_from_the_inventory_is_removed_cleanly() {
    if !is_root() {
        eprintln!("skipped: remove_lab needs root (network namespaces)");
        return;
    }
    let (tmp, guard, info) = fresh_lab("pgrm", |dir| LabSpec::new("rm", 4, SUBNET, "phrm0", dir));
    let state = tmp.path().join("st");
    let inv_path = tmp.path().join("lab.yml");
    let full = [("rm1", ALL), ("rm2", ALL), ("rm3", ALL), ("rm4", PG)];
    let without_rm4 = [("rm1", ALL), ("rm2", ALL), ("rm3", ALL)];
    write_lab_inventory(&info, "rmc", &inv_path, &full);
    let (fleet, r) = apply_inventory(&inv_path, &state).await;
    r.unwrap_or_else(|e| panic!("first apply: {e}"));
    let (inv, s) = build_spec(&inv_path);
    let pw = inv.secrets.superuser.expose().to_string();
    let addr = |h: &str| info.host(h).unwrap().address.clone();
    let api = format!("http://{}:{}", addr("rm1"), s.restapi_port);
    leader_with_streaming_replicas(&api, 3).await;
    let probe = WriteProbe::start(&addr("rm1"), s.primary_port, &pw).await;

    // 1. The refusal: the departing member leads → nothing done, naming it.
    let out = pgherd::cli::ctl::switchover(&inv, Some("rm4"), false, true)
        .await
        .expect("switchover to rm4");
    eprintln!("{out}");
    assert_eq!(leader_with_streaming_replicas(&api, 3).await, "rm4");
    write_lab_inventory(&info, "rmc", &inv_path, &without_rm4);
    let (_, r) = apply_inventory(&inv_path, &state).await;
    let err = r.expect_err("removing the leader's host is refused");
    assert!(
        err.contains("rm4") && err.contains("leader key"),
        "not a clear refusal: {err}"
    );
    let ms = members(&api).await;
    assert!(
        ms.contains(&("rm4".to_string(), "leader".to_string())),
        "something changed: {ms:?}"
    );

    // 2. `pgherd remove rm4`: refused while the inventory lists it; once deleted there, with
    //    --switchover-first, the leader key goes to the healthiest replica and rm4 leaves.
    let agent = env!("CARGO_BIN_EXE_pgherd-agent");
    let remove = |extra: &[&str]| {
        let mut args = vec![
            "pgherd".to_string(),
            "--state-dir".into(),
            state.display().to_string(),
            "remove".into(),
            "-i".into(),
            inv_path.display().to_string(),
            "--agent-binary".into(),
            agent.into(),
            "-y".into(),
            "rm4".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        pgherd::cli::run(<pgherd::cli::Cli as clap::Parser>::parse_from(args))
    };
    write_lab_inventory(&info, "rmc", &inv_path, &full);
    let e = remove(&[])
        .await
        .expect_err("refused while listed")
        .to_string();
    assert!(e.contains("rm4 is still a postgres host"), "{e}");
    write_lab_inventory(&info, "rmc", &inv_path, &without_rm4);
    remove(&["--switchover-first"])
        .await
        .expect("pgherd remove rm4 --switchover-first");
    let leader = leader_with_streaming_replicas(&api, 2).await;
    assert_ne!(leader, "rm4");
    assert!(!members(&api).await.iter().any(|(n, _)| n == "rm4"));

    // 3. rm4 back in the inventory: one apply makes it a streaming replica again.
    write_lab_inventory(&info, "rmc", &inv_path, &full);
    let (_, r) = apply_inventory(&inv_path, &state).await;
    r.unwrap_or_else(|e| panic!("re-adding rm4: {e}"));
    assert_eq!(leader_with_streaming_replicas(&api, 3).await, leader);

    // 4. The removal of a replica by deleting it from the inventory and applying.
    let slot_sql = "select count(*) from pg_replication_slots where slot_name = 'rm4'";
    assert_eq!(
        sql_on(&s, fleet[leader.as_str()].as_ref(), &leader, slot_sql)
            .await
            .trim(),
        "1",
        "the leader has a slot for rm4 before the removal"
    );
    write_lab_inventory(&info, "rmc", &inv_path, &without_rm4);
    let (fleet3, r) = apply_inventory(&inv_path, &state).await;
    let report = r.unwrap_or_else(|e| panic!("removal apply: {e}"));
    for d in &report.done {
        eprintln!("[{}] {}: {}", d.0, d.1, d.2);
    }
    let (_, s3) = build_spec(&inv_path);
    let ms = members(&api).await;
    assert!(!ms.iter().any(|(n, _)| n == "rm4"), "{ms:?}");
    assert_eq!(leader_with_streaming_replicas(&api, 2).await, leader);
    assert_eq!(
        sql_on(&s3, fleet3[leader.as_str()].as_ref(), &leader, slot_sql)
            .await
            .trim(),
        "0",
        "rm4's slot is left on the leader"
    );
    let rm4 = addr("rm4");
    for h in ["rm1", "rm2", "rm3"] {
        let t = fleet3[h].as_ref();
        let state = t
            .run_ok(
                &haproxy_admin_command("show servers state"),
                Duration::from_secs(20),
            )
            .await
            .unwrap()
            .stdout_str();
        assert!(
            !state.split_whitespace().any(|w| w == "rm4"),
            "HAProxy on {h} still has rm4:\n{state}"
        );
        assert!(state.split_whitespace().any(|w| w == "rm2"), "{state}");
        let hba = sql_on(
            &s3,
            t,
            h,
            "select coalesce(string_agg(address, ' '), '') from pg_hba_file_rules",
        )
        .await;
        assert!(
            !hba.split([' ', ',', '\n']).any(|a| a == rm4),
            "{h}'s pg_hba still admits {rm4}: {hba}"
        );
        assert!(hba.contains(&addr("rm2")), "{h}: {hba}");
    }
    // rm4's agent is stopped, and stays stopped when its host boots again.
    let check = agent_state_check();
    let ssh = |h: &str| {
        let hs = info.host_spec(h).unwrap();
        let state = state.clone();
        async move { SshTransport::connect(&hs, &state).await.ok() }
    };
    let t4 = ssh("rm4").await.expect("ssh to rm4");
    assert_eq!(
        words_of(&t4, &check).await,
        ["no-agent", "no-sup", "no-run"]
    );
    drop(t4);
    lab::crash(&guard.0, "rm4").expect("crash rm4");
    lab::boot(&guard.0, "rm4").expect("boot rm4");
    // sshd starts after the boot hook: once it answers, the hook has run.
    let t4 = eventually(
        Duration::from_secs(60),
        "rm4 answers ssh after boot",
        || ssh("rm4"),
    )
    .await;
    assert_eq!(
        words_of(&t4, &check).await,
        ["no-agent", "no-sup", "no-run"],
        "after boot"
    );
    assert!(!members(&api).await.iter().any(|(n, _)| n == "rm4"));

    // 5. A second apply plans nothing.
    assert_plan_empty(&s3, &fleet3).await;
    let rp = probe.stop().await;
    let lost = lost_writes(&addr("rm1"), s.primary_port, &pw, &rp.acked).await;
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(!rp.acked.is_empty());
    eprintln!(
        "MEASURED removal: longest write gap {:?}, {} writes acknowledged, {} failed",
        rp.max_gap,
        rp.acked.len(),
        rp.failures
    );
}
