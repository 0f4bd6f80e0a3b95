//! pgherd's systemd mode end to end, against a real systemd: a 3-host namespace lab whose
//! hosts boot systemd as PID 1 (subnet 10.232.11.0/24, bridge `phsd0`). `apply` renders and
//! installs the units, runs `daemon-reload`, enables and starts etcd, the agents and Debian's
//! HAProxy unit with pgherd's drop-in; a second `apply` changes nothing and restarts nothing; a
//! HAProxy setting reloads HAProxy in place (same main PID); the day-2 verbs (`pgherd
//! switchover`, `restart`, `reinit`, `pause`, `resume`) work; a crashed primary host fails over,
//! and when it boots, systemd alone (no `apply`) brings its enabled services back and it rejoins
//! as a replica. Needs root; skipped with a message otherwise.

use std::path::{Path, PathBuf};
use std::time::Duration;

use pgherd::inventory::{self, Inventory};
use pgherd::lab::{self, HostInit, LabSpec};
use pgherd::provision::apply::{self, ApplyOptions, Fleet};
use pgherd::provision::desired::DeploySpec;
use pgherd::provision::services::{Service, ServiceMode, ServiceOp};
use pgherd::provision::spec;

mod common;
use common::deploy::{
    fresh_lab, get_json, is_root, leader_with_streaming_replicas, pg, pids,
    rejoined_as_streaming_replica, writes_resume_through,
};

const SUBNET: &str = "10.232.11";

fn write_inventory(spec: &LabSpec, path: &Path, maxconn: u32) {
    let mut y = lab::inventory_yaml(spec);
    y.push_str(&format!(
        "profile: fast\nhaproxy:\n  maxconn: {maxconn}\nwatchdog:\n  mode: \"off\"\n"
    ));
    std::fs::write(path, y).unwrap();
}

fn build(inv_path: &Path) -> (Inventory, DeploySpec) {
    let inv = inventory::load(inv_path).expect("inventory");
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_pgherd-agent"));
    let s = spec::build(&inv, Some(&agent), None).expect("desired state");
    (inv, s)
}

/// `systemctl <args>` on a host, stdout trimmed (whatever the exit status).
async fn systemctl(fleet: &Fleet, host: &str, args: &str) -> String {
    let out = fleet[host]
        .run(&format!("systemctl {args}"), Duration::from_secs(20))
        .await
        .expect("systemctl");
    out.stdout_str().trim().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn systemd_hosts_get_enabled_units_converge_reload_in_place_and_come_back_on_boot() {
    if !is_root() {
        eprintln!("skipped: deploy_systemd needs root (network namespaces)");
        return;
    }
    let (tmp, guard, info) = fresh_lab("pgsd", |dir| {
        LabSpec::new("sdl", 3, SUBNET, "phsd0", dir).with_init(HostInit::Systemd)
    });
    let lab_spec = guard.0.clone();
    let state = tmp.path().join("st");
    let inv_path = tmp.path().join("lab.yml");
    write_inventory(&lab_spec, &inv_path, 100);
    let (inv, s) = build(&inv_path);
    let password = inv.secrets.superuser.expose().to_string();
    let fleet = pgherd::cli::connect(&inv, &state).await.expect("connect");
    let opts = ApplyOptions {
        wait_timeout: Duration::from_secs(120),
        progress: false,
        ..Default::default()
    };

    // The hosts really run systemd, and pgherd sees it.
    let facts = apply::gather_all(&s, &fleet).await.expect("facts");
    for (h, f) in &facts {
        assert_eq!(f.mode, ServiceMode::Systemd, "{h}");
    }

    let report = apply::apply(&s, &fleet, &opts)
        .await
        .unwrap_or_else(|e| panic!("first apply: {}", pgherd::provision::error_chain(&e)));
    // Units written → daemon-reload before the first start on every host.
    for h in &info.hosts {
        let done: Vec<&str> = report
            .done
            .iter()
            .filter(|(host, _, _)| host == &h.name)
            .map(|(_, step, _)| step.as_str())
            .collect();
        let reload = done
            .iter()
            .position(|d| d.ends_with("systemd"))
            .expect("daemon-reload");
        let start = done
            .iter()
            .position(|d| d.ends_with("service etcd"))
            .expect("etcd start");
        assert!(reload < start, "{done:?}");
        assert_eq!(
            systemctl(&fleet, &h.name, "is-enabled etcd pgherd-agent haproxy").await,
            "enabled\nenabled\nenabled",
            "{}",
            h.name
        );
        assert_eq!(
            systemctl(&fleet, &h.name, "is-active etcd pgherd-agent haproxy").await,
            "active\nactive\nactive"
        );
        assert_eq!(
            systemctl(&fleet, &h.name, "list-units --failed --no-legend --plain").await,
            "",
            "{}: failed units",
            h.name
        );
    }

    // One leader, two streaming replicas; a write through HAProxy's primary port.
    let api = |addr: &str| format!("http://{addr}:{}", s.restapi_port);
    let a0 = api(&info.hosts[0].address);
    let leader = leader_with_streaming_replicas(&a0, 2).await;
    let c = pg(&info.hosts[1].address, s.primary_port, &password)
        .await
        .expect("connect through haproxy primary port");
    c.batch_execute("CREATE TABLE t(x int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();

    // Second apply: nothing planned, nothing restarted.
    let before = pids(&s, &fleet).await;
    let plan = apply::make_plan(&s, &fleet).await.unwrap();
    assert!(
        plan.is_noop(),
        "{}",
        pgherd::provision::report::render_plan(&plan, Default::default())
    );
    let report = apply::apply(&s, &fleet, &opts).await.unwrap();
    assert!(report.done.is_empty(), "{:?}", report.done);
    assert_eq!(pids(&s, &fleet).await, before);

    // A HAProxy setting: `systemctl reload haproxy` on every host, HAProxy's master keeps its
    // PID (seamless reload), nothing else moves.
    write_inventory(&lab_spec, &inv_path, 150);
    let (_, s2) = build(&inv_path);
    let main_pids = |fleet: &Fleet, h: String| {
        let t = fleet[&h].clone();
        async move {
            t.run_ok(
                "systemctl show -p MainPID --value haproxy",
                Duration::from_secs(10),
            )
            .await
            .unwrap()
            .stdout_str()
            .trim()
            .to_string()
        }
    };
    let mut masters = Vec::new();
    for h in &info.hosts {
        masters.push(main_pids(&fleet, h.name.clone()).await);
    }
    let report = apply::apply(&s2, &fleet, &opts).await.unwrap();
    for (i, h) in info.hosts.iter().enumerate() {
        assert_eq!(
            report.service_ops(&h.name),
            vec![(Service::Haproxy, ServiceOp::Reload)]
        );
        assert_eq!(
            main_pids(&fleet, h.name.clone()).await,
            masters[i],
            "{}",
            h.name
        );
        let cfg = fleet[&h.name]
            .run_ok(
                "grep -c 'maxconn 150' /etc/haproxy/haproxy.cfg",
                Duration::from_secs(5),
            )
            .await
            .unwrap();
        assert_ne!(cfg.stdout_str().trim(), "0");
    }
    let after = pids(&s2, &fleet).await;
    for (h, p) in &before {
        assert_eq!(p[..2], after[h][..2], "{h}: etcd/agent restarted");
        assert_eq!(p[3], after[h][3], "{h}: postgres restarted");
    }

    // Day-2 verbs through the agents' REST API: switchover to a named replica, restart and
    // reinitialize a replica, pause and resume automatic failover.
    let ctl = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgherd"))
            .args(args)
            .arg("-i")
            .arg(&inv_path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let err = String::from_utf8_lossy(&out.stderr).into_owned();
        assert!(out.status.success(), "pgherd {args:?}: {text}{err}");
        assert!(!text.contains(&password) && !err.contains(&password));
        text
    };
    let candidate = info.other_than(&leader).unwrap().name.clone();
    let text = ctl(&["switchover", "--candidate", &candidate, "--yes"]);
    assert!(
        text.contains(&format!("switchover done: {candidate} leads")),
        "{text}"
    );
    let leader = leader_with_streaming_replicas(&a0, 2).await;
    assert_eq!(leader, candidate);
    let replica = info.other_than(&leader).unwrap().name.clone();
    assert!(ctl(&["restart", &replica, "--yes"]).contains(&format!("restarted {replica}")));
    assert!(ctl(&["reinit", &replica, "--yes"]).contains("reinitialized and streaming"));
    assert!(ctl(&["pause"]).starts_with("paused"));
    assert_eq!(
        get_json(&format!("{a0}/cluster")).await.unwrap()["pause"],
        true
    );
    assert!(ctl(&["resume"]).starts_with("resumed"));
    // Without a terminal, a mutating verb needs --yes.
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgherd"))
        .args(["switchover", "-i"])
        .arg(&inv_path)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("pass --yes"));
    let leader = leader_with_streaming_replicas(&a0, 2).await;

    // Power-cut the primary's host: writes resume through HAProxy on a surviving host.
    lab::crash(&lab_spec, &leader).unwrap();
    let survivor = info.other_than(&leader).unwrap().address.clone();
    writes_resume_through(&survivor, 5000, &password).await;

    // Boot it: systemd starts the enabled units by itself (no apply), and the old primary
    // rejoins the new one as a streaming replica.
    lab::boot(&lab_spec, &leader).unwrap();
    let old = info.host(&leader).unwrap().address.clone();
    rejoined_as_streaming_replica(&api(&old)).await;
    let fleet = pgherd::cli::connect(&inv, &state).await.expect("reconnect");
    assert_eq!(
        systemctl(&fleet, &leader, "is-active etcd pgherd-agent haproxy").await,
        "active\nactive\nactive"
    );
}
