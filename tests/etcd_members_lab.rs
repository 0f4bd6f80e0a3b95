//! etcd membership changes end to end, on a real namespace lab (subnet 10.232.23.0/24, bridge
//! `phetcd0`) over SSH, each made by editing the inventory and running `apply`, with a write
//! probe through HAProxy's primary port running throughout:
//! - 3 hosts deployed; the lab grows to 5 and the 2 new hosts join the inventory with roles
//!   `[etcd]`: one apply → 5 started voters, all healthy, the PostgreSQL leader kept, no
//!   acknowledged write lost;
//! - one etcd-only host removed from the inventory → refused (4 members would be even), and
//!   nothing changed; both removed → 3 voters, etcd stopped and its data dir wiped on the
//!   removed hosts; a second apply plans nothing;
//! - an original member's host crashed for good and replaced in the inventory by a 6th lab host
//!   → the dead member is removed first, the new one added: 3 healthy voters.
//!
//! Needs root (namespaces); skipped with a message otherwise.

use std::path::Path;
use std::time::Duration;

use pgherd::inventory::{self};
use pgherd::lab::{self, LabInfo, LabSpec};
use pgherd::provision::etcd_members::parse_endpoint_status;
use pgherd::transport::{SshTransport, Transport};

mod common;
use common::cluster::eventually;
use common::deploy::{
    LabGuard, apply_inventory, assert_plan_empty, build_spec, fresh_lab, healthy_voters, is_root,
    leader_with_streaming_replicas, pids, write_lab_inventory,
};
use common::probe::{WriteProbe, lost_writes};

const SUBNET: &str = "10.232.23";
const ALL: &str = "[postgres, etcd, haproxy]";
const ETCD: &str = "[etcd]";

async fn ssh(info: &LabInfo, host: &str, state: &Path) -> SshTransport {
    SshTransport::connect(&info.host_spec(host).unwrap(), state)
        .await
        .expect("ssh to a lab host")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn etcd_membership_follows_the_inventory() {
    if !is_root() {
        eprintln!("skipped: etcd_members_lab needs root (network namespaces)");
        return;
    }
    let (tmp, guard, info3) = fresh_lab("pgetcd", |dir| {
        LabSpec::new("etm", 3, SUBNET, "phetcd0", dir)
    });
    // The lab grows to 6 hosts: tear all of them down at the end.
    let spec6 = LabSpec {
        hosts: 6,
        ..guard.0.clone()
    };
    let _guard6 = LabGuard(spec6.clone());
    let state = tmp.path().join("st");
    let inv_path = tmp.path().join("lab.yml");
    let info6 = spec6.info();
    let (e1, e2, e3) = ("etm1", "etm2", "etm3");
    write_lab_inventory(&info3, "etm", &inv_path, &[(e1, ALL), (e2, ALL), (e3, ALL)]);
    let (fleet, r) = apply_inventory(&inv_path, &state).await;
    r.unwrap_or_else(|e| panic!("first apply: {e}"));
    let (inv, s) = build_spec(&inv_path);
    let pw = inv.secrets.superuser.expose().to_string();
    let t1 = fleet[e1].clone();
    assert_eq!(healthy_voters(t1.as_ref()).await, [e1, e2, e3]);
    let api = format!("http://{}:{}", info3.hosts[0].address, s.restapi_port);
    let leader = leader_with_streaming_replicas(&api, 2).await;
    let probe = WriteProbe::start(&info3.hosts[0].address, s.primary_port, &pw).await;

    // 1. Grow: two etcd-only hosts join; one apply makes them voters.
    let info5 = lab::up(&LabSpec {
        hosts: 5,
        ..guard.0.clone()
    })
    .expect("lab grows to 5 hosts");
    assert_eq!(info5.hosts.len(), 5);
    write_lab_inventory(
        &info5,
        "etm",
        &inv_path,
        &[
            (e1, ALL),
            (e2, ALL),
            (e3, ALL),
            ("etm4", ETCD),
            ("etm5", ETCD),
        ],
    );
    let before = pids(&s, &fleet).await;
    let (fleet5, r) = apply_inventory(&inv_path, &state).await;
    let report = r.unwrap_or_else(|e| panic!("grow apply: {e}"));
    let (_, s5) = build_spec(&inv_path);
    for d in report
        .done
        .iter()
        .filter(|d| d.1.contains("etcd membership"))
    {
        eprintln!("[{}] {}: {}", d.0, d.1, d.2);
    }
    assert_eq!(
        healthy_voters(t1.as_ref()).await,
        [e1, e2, e3, "etm4", "etm5"]
    );
    assert_eq!(leader_with_streaming_replicas(&api, 2).await, leader);
    // The original members kept their etcd process (their etcd.conf differs only in initial-*).
    let after = pids(&s5, &fleet5).await;
    for h in [e1, e2, e3] {
        assert_eq!(after[h][0], before[h][0], "etcd on {h} was restarted");
    }
    eprintln!(
        "MEASURED grow: longest write gap {:?}",
        probe.take_max_gap()
    );

    // 2. Shrink by one: 4 members would be even → refused, nothing changed.
    write_lab_inventory(
        &info5,
        "etm",
        &inv_path,
        &[(e1, ALL), (e2, ALL), (e3, ALL), ("etm4", ETCD)],
    );
    let err = inventory::load(&inv_path).expect_err("an even etcd member count is refused");
    assert!(err.to_string().contains("odd number"), "{err}");
    assert_eq!(healthy_voters(t1.as_ref()).await.len(), 5);

    // 3. Shrink by two: 3 voters; etcd stopped and wiped on the removed hosts.
    write_lab_inventory(&info5, "etm", &inv_path, &[(e1, ALL), (e2, ALL), (e3, ALL)]);
    let (fleet, r) = apply_inventory(&inv_path, &state).await;
    let report = r.unwrap_or_else(|e| panic!("shrink apply: {e}"));
    for d in report
        .done
        .iter()
        .filter(|d| d.1.contains("etcd membership"))
    {
        eprintln!("[{}] {}: {}", d.0, d.1, d.2);
    }
    assert_eq!(healthy_voters(t1.as_ref()).await, [e1, e2, e3]);
    let data_dir = s.etcd.as_ref().unwrap().data_dir.clone();
    for gone in ["etm4", "etm5"] {
        let t = ssh(&info5, gone, &state).await;
        let out = t
            .run_ok(
                &format!(
                    "pgrep -x etcd >/dev/null && echo running || echo stopped; ls -A {data_dir} | wc -l"
                ),
                Duration::from_secs(20),
            )
            .await
            .unwrap()
            .stdout_str();
        assert_eq!(
            out.split_whitespace().collect::<Vec<_>>(),
            ["stopped", "0"],
            "{gone}: {out}"
        );
    }
    let (_, s3) = build_spec(&inv_path);
    assert_plan_empty(&s3, &fleet).await;
    assert_eq!(leader_with_streaming_replicas(&api, 2).await, leader);
    let report_probe = probe.stop().await;
    let lost = lost_writes(
        &info3.hosts[0].address,
        s.primary_port,
        &pw,
        &report_probe.acked,
    )
    .await;
    assert!(lost.is_empty(), "acknowledged writes lost: {lost:?}");
    assert!(!report_probe.acked.is_empty());
    eprintln!(
        "MEASURED shrink: longest write gap {:?}, {} writes acknowledged, {} failed",
        report_probe.max_gap,
        report_probe.acked.len(),
        report_probe.failures
    );

    // 4. Replace a dead member: etm6 joins the lab, etm3 dies for good, the inventory swaps them.
    let info6b = lab::up(&spec6).expect("lab grows to 6 hosts");
    assert_eq!(info6b, info6);
    lab::crash(&spec6, e3).expect("crash etm3");
    // The survivors elect an etcd leader and a PostgreSQL leader (etm3 may have held either),
    // and etm3's member key expires.
    let t2 = fleet[e2].clone();
    eventually(Duration::from_secs(60), "an etcd leader among etm1/etm2", || {
        let (t1, t2) = (t1.clone(), t2.clone());
        async move {
            for t in [t1, t2] {
                let out = t
                    .run(
                        "ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 --dial-timeout=1s --command-timeout=2s endpoint status -w json 2>/dev/null",
                        Duration::from_secs(10),
                    )
                    .await
                    .ok()?
                    .stdout_str();
                let st = parse_endpoint_status(&out).ok()?;
                if st.first()?.leader == 0 {
                    return None;
                }
            }
            Some(())
        }
    })
    .await;
    leader_with_streaming_replicas(&api, 1).await;
    write_lab_inventory(
        &info6,
        "etm",
        &inv_path,
        &[(e1, ALL), (e2, ALL), ("etm6", ETCD)],
    );
    let (_, r) = apply_inventory(&inv_path, &state).await;
    let report = r.unwrap_or_else(|e| panic!("replace apply: {e}"));
    let membership: Vec<&str> = report
        .done
        .iter()
        .filter(|d| d.1.contains("etcd membership"))
        .map(|d| d.2.as_str())
        .collect();
    eprintln!("{membership:#?}");
    let remove = membership
        .iter()
        .position(|m| m.starts_with("remove etcd member etm3"))
        .expect("etm3 removed");
    let add = membership
        .iter()
        .position(|m| m.starts_with("add etcd member etm6"))
        .expect("etm6 added");
    assert!(remove < add, "{membership:?}");
    assert_eq!(healthy_voters(t1.as_ref()).await, [e1, e2, "etm6"]);
}
