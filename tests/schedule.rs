//! The playbook drives `apply`: every planned change is executed by one step of the playbook,
//! in the playbook's order, and a playbook whose order would break the cluster (a service
//! started before its files, an agent before etcd, replicas before the bootstrap) or that
//! leaves a change without a step is refused with a located error before any host is touched.

use std::collections::BTreeMap;
use std::path::PathBuf;

use pgherd::inventory::{self, Inventory};
use pgherd::provision::desired::DeploySpec;
use pgherd::provision::facts::HostFacts;
use pgherd::provision::plan::{self, Action, Plan, Planned};
use pgherd::provision::playbook::{Parallelism, StepKind};
use pgherd::provision::schedule::{self, Item, Stage};
use pgherd::provision::services::{Service, ServiceMode, ServiceOp};
use pgherd::provision::spec;

const DEPLOY: &str = include_str!("../playbooks/deploy.yml");

fn example() -> Inventory {
    let text = std::fs::read_to_string("inventories/example.yml").unwrap();
    inventory::parse(&text, "inventories/example.yml").unwrap()
}

/// A file of its own per call (tests run in parallel).
fn tmp(name: &str, content: &[u8]) -> PathBuf {
    static N: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
    let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let dir = std::env::temp_dir().join(format!("pgherd-schedule-{}-{n}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let p = dir.join(name);
    std::fs::write(&p, content).unwrap();
    p
}

fn deploy_spec(playbook: Option<&str>) -> Result<DeploySpec, String> {
    let agent = tmp("agent", b"pgherd-agent test binary");
    let pb = playbook.map(|text| tmp("deploy.yml", text.as_bytes()));
    spec::build_with(&example(), Some(&agent), None, pb.as_deref())
        .map_err(|e| pgherd::provision::error_chain(&e))
}

fn blank_plan(s: &DeploySpec) -> Plan {
    let facts: BTreeMap<String, HostFacts> = s
        .hosts
        .iter()
        .map(|h| (h.name.clone(), HostFacts::blank(ServiceMode::Supervisor)))
        .collect();
    plan::plan(s, &facts)
}

/// `(step name, hosts with work)` of the stages that do something.
fn busy(stages: &[Stage]) -> Vec<(String, Vec<String>)> {
    stages
        .iter()
        .filter(|s| s.has_work())
        .map(|s| {
            (
                s.step.name.clone(),
                s.hosts
                    .iter()
                    .filter(|(_, _, w)| !w.is_empty())
                    .map(|(h, _, _)| h.clone())
                    .collect(),
            )
        })
        .collect()
}

fn pos(order: &[(String, Vec<String>)], name: &str) -> usize {
    order
        .iter()
        .position(|(n, _)| n == name)
        .unwrap_or_else(|| panic!("no busy step {name:?} in {order:#?}"))
}

fn hosts(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

#[test]
fn fresh_cluster_runs_in_playbook_order_etcd_then_first_primary_then_replicas_then_haproxy() {
    let s = deploy_spec(None).unwrap();
    let plan = blank_plan(&s);
    let stages = schedule::build(&s, &plan, true).unwrap();
    let order = busy(&stages);
    let etcd = pos(&order, "start etcd");
    let boot = pos(&order, "bootstrap the primary");
    let replicas = pos(&order, "start the replicas");
    let haproxy = pos(&order, "HAProxy running");
    assert!(pos(&order, "install PostgreSQL") < pos(&order, "etcd config"));
    assert!(pos(&order, "etcd config") < etcd);
    assert!(
        etcd < boot && boot < replicas && replicas < haproxy,
        "{order:#?}"
    );
    assert_eq!(
        order[etcd].1,
        hosts(&["pg1", "pg2", "pg3"]),
        "etcd members start together"
    );
    assert_eq!(order[boot].1, hosts(&["pg1"]), "the first primary alone");
    assert_eq!(order[replicas].1, hosts(&["pg2", "pg3"]));
    // Nothing to restart on a fresh cluster: the rolling steps are idle.
    for idle in ["restart changed etcd members", "restart changed agents"] {
        assert!(!order.iter().any(|(n, _)| n == idle), "{idle} is busy");
    }
}

#[test]
fn every_planned_change_is_executed_by_exactly_one_step() {
    let s = deploy_spec(None).unwrap();
    for mode in [ServiceMode::Supervisor, ServiceMode::Systemd] {
        let facts: BTreeMap<String, HostFacts> = s
            .hosts
            .iter()
            .map(|h| (h.name.clone(), HostFacts::blank(mode)))
            .collect();
        let plan = plan::plan(&s, &facts);
        let stages = schedule::build(&s, &plan, true).unwrap();
        for hp in &plan.hosts {
            let mut planned: Vec<String> = Vec::new();
            for st in hp.changes() {
                if let Planned::Change { action, .. } = &st.planned {
                    planned.extend(schedule::items(action).iter().map(|i| i.to_string()));
                }
            }
            let mut scheduled: Vec<String> = Vec::new();
            for stage in &stages {
                for (h, _, work) in &stage.hosts {
                    if h != &hp.host {
                        continue;
                    }
                    for st in work {
                        if let Planned::Change { action, .. } = &st.planned {
                            scheduled.extend(schedule::items(action).iter().map(|i| i.to_string()));
                        }
                    }
                }
            }
            planned.sort();
            scheduled.sort();
            assert_eq!(planned, scheduled, "{mode} host {}", hp.host);
        }
    }
}

#[test]
fn on_a_running_cluster_a_stopped_first_host_rejoins_through_start_replicas_not_bootstrap() {
    let s = deploy_spec(None).unwrap();
    let plan = blank_plan(&s);
    let order = busy(&schedule::build(&s, &plan, false).unwrap());
    assert!(!order.iter().any(|(n, _)| n == "bootstrap the primary"));
    let r = pos(&order, "start the replicas");
    assert_eq!(order[r].1, hosts(&["pg1", "pg2", "pg3"]));
}

#[test]
fn changes_of_running_services_go_to_the_rolling_steps() {
    let s = deploy_spec(None).unwrap();
    let h = s.host("pg2").unwrap();
    let name_of = |item| {
        let i = schedule::slot(h, item, false).expect("scheduled");
        let step = &s.playbook.steps[i];
        (step.name.as_str(), step.parallelism)
    };
    let serial = Parallelism::Serial(std::num::NonZeroUsize::MIN);
    let rows = [
        (
            Item::Service(Service::Etcd, ServiceOp::Restart),
            "restart changed etcd members",
        ),
        (
            Item::Service(Service::Agent, ServiceOp::Restart),
            "restart changed agents",
        ),
        (
            Item::Service(Service::Agent, ServiceOp::Reload),
            "reload changed agent configs",
        ),
        (
            Item::Service(Service::Haproxy, ServiceOp::Reload),
            "reload changed HAProxy configs",
        ),
    ];
    for (item, want) in rows {
        assert_eq!(name_of(item), (want, serial), "{item}");
    }
    assert_eq!(
        name_of(Item::Service(Service::Etcd, ServiceOp::Start)).0,
        "start etcd"
    );
    assert_eq!(
        name_of(Item::File("/etc/haproxy/haproxy.cfg")).0,
        "HAProxy config"
    );
    // pgherd's own support files travel with their service's first file.
    assert_eq!(
        name_of(Item::File("/etc/pgherd/services/etcd.run")).0,
        "etcd config"
    );
    assert_eq!(
        name_of(Item::File("/usr/local/lib/pgherd/haproxy-state")).0,
        "HAProxy config"
    );
}

#[test]
fn systemd_daemon_reload_is_not_a_step_of_its_own() {
    let s = deploy_spec(None).unwrap();
    let facts: BTreeMap<String, HostFacts> = s
        .hosts
        .iter()
        .map(|h| (h.name.clone(), HostFacts::blank(ServiceMode::Systemd)))
        .collect();
    let plan = plan::plan(&s, &facts);
    assert!(plan.hosts[0].steps.iter().any(|st| matches!(
        st.planned,
        Planned::Change {
            action: Action::DaemonReload,
            ..
        }
    )));
    // apply inserts it before the host's next service action after a unit was written.
    for stage in schedule::build(&s, &plan, true).unwrap() {
        for (_, _, work) in &stage.hosts {
            assert!(!work.iter().any(|st| matches!(
                st.planned,
                Planned::Change {
                    action: Action::DaemonReload,
                    ..
                }
            )));
        }
    }
}

/// Moves the step named `name` (with its comment-free block) to just before `before`.
fn move_step(text: &str, name: &str, before: &str) -> String {
    let blocks = split_steps(text);
    let (head, mut steps) = blocks;
    let i = steps
        .iter()
        .position(|b| b.contains(&format!("- name: {name}\n")))
        .unwrap();
    let b = steps.remove(i);
    let j = steps
        .iter()
        .position(|b| b.contains(&format!("- name: {before}\n")))
        .unwrap();
    steps.insert(j, b);
    head + &steps.concat()
}

fn remove_step(text: &str, name: &str) -> String {
    let (head, steps) = split_steps(text);
    head + &steps
        .into_iter()
        .filter(|b| !b.contains(&format!("- name: {name}\n")))
        .collect::<String>()
}

/// (text before the first step, each step's lines) of a playbook whose steps start with
/// `  - name:` (comments between steps are dropped).
fn split_steps(text: &str) -> (String, Vec<String>) {
    let start = text.find("\n  - name:").unwrap() + 1;
    let head = text[..start].to_string();
    let mut steps: Vec<String> = Vec::new();
    for line in text[start..].lines() {
        if line.trim_start().starts_with('#') || line.trim().is_empty() {
            continue;
        }
        if line.starts_with("  - name:") {
            steps.push(String::new());
        }
        let last = steps.last_mut().unwrap();
        last.push_str(line);
        last.push('\n');
    }
    (head, steps)
}

fn line_of(text: &str, needle: &str) -> usize {
    text.lines().position(|l| l.contains(needle)).unwrap() + 1
}

#[test]
fn the_shipped_playbook_round_trips_through_the_test_editor() {
    let (head, steps) = split_steps(DEPLOY);
    let again = head + &steps.concat();
    assert!(deploy_spec(Some(&again)).is_ok());
}

#[test]
fn starting_etcd_before_its_config_is_written_is_a_located_error() {
    let text = move_step(DEPLOY, "start etcd", "etcd config");
    let e = deploy_spec(Some(&text)).unwrap_err();
    let line = line_of(&text, "- name: start etcd");
    assert!(e.contains(&format!("deploy.yml:{line}:")), "{e}");
    assert!(
        e.contains("step \"start etcd\" starts etcd before step")
            && e.contains("\"etcd config\"")
            && e.contains("writes /etc/pgherd/etcd.yml on hosts pg1, pg2, pg3"),
        "{e}"
    );
}

#[test]
fn bootstrapping_before_etcd_starts_is_a_located_error() {
    let text = move_step(DEPLOY, "bootstrap the primary", "start etcd");
    let e = deploy_spec(Some(&text)).unwrap_err();
    let line = line_of(&text, "- name: bootstrap the primary");
    assert!(e.contains(&format!("deploy.yml:{line}:")), "{e}");
    assert!(e.contains("starts pgherd-agent before"), "{e}");
    assert!(e.contains("starts etcd"), "{e}");
}

#[test]
fn starting_replicas_before_the_bootstrap_is_a_located_error() {
    let text = move_step(DEPLOY, "start the replicas", "bootstrap the primary");
    let e = deploy_spec(Some(&text)).unwrap_err();
    let line = line_of(&text, "- name: start the replicas");
    assert!(e.contains(&format!("deploy.yml:{line}:")), "{e}");
    assert!(e.contains("bootstraps the first primary"), "{e}");
}

#[test]
fn a_playbook_without_a_step_for_a_needed_change_is_refused_naming_it_and_the_host() {
    let text = remove_step(DEPLOY, "upload pgherd-agent");
    let e = deploy_spec(Some(&text)).unwrap_err();
    assert!(
        e.contains(
            "no step of the playbook writes /usr/local/bin/pgherd-agent on hosts pg1, pg2, pg3"
        ),
        "{e}"
    );
    let text = remove_step(
        &remove_step(DEPLOY, "start etcd"),
        "restart changed etcd members",
    );
    let e = deploy_spec(Some(&text)).unwrap_err();
    assert!(
        e.contains("no step of the playbook starts etcd on hosts pg1, pg2, pg3"),
        "{e}"
    );
}

#[test]
fn a_reordered_playbook_that_keeps_dependencies_is_accepted_and_followed() {
    // HAProxy before the agents is fine (it routes nothing until a leader exists).
    let mut text = DEPLOY.to_string();
    for name in [
        "HAProxy config",
        "HAProxy running",
        "reload changed HAProxy configs",
    ] {
        text = move_step(&text, name, "upload pgherd-agent");
    }
    let s = deploy_spec(Some(&text)).unwrap_or_else(|e| panic!("{e}"));
    let order = busy(&schedule::build(&s, &blank_plan(&s), true).unwrap());
    assert!(pos(&order, "HAProxy running") < pos(&order, "bootstrap the primary"));
    match &s.playbook.steps[s
        .playbook
        .steps
        .iter()
        .position(|st| st.name == "HAProxy running")
        .unwrap()]
    .kind
    {
        StepKind::Service { name, .. } => assert_eq!(name, "haproxy"),
        other => panic!("{other:?}"),
    }
}

#[test]
fn plan_output_lists_the_run_order_with_hosts_and_serial_steps() {
    let s = deploy_spec(None).unwrap();
    let plan = blank_plan(&s);
    let text = pgherd::provision::report::render_order(
        &schedule::build(&s, &plan, true).unwrap(),
        &s.playbook_origin,
    );
    assert!(
        text.starts_with("run order (playbooks/deploy.yml):"),
        "{text}"
    );
    let line = |name: &str| {
        text.lines()
            .position(|l| l.contains(name))
            .unwrap_or_else(|| panic!("{name} not in {text}"))
    };
    assert!(line("start etcd") < line("bootstrap the primary"));
    assert!(line("bootstrap the primary") < line("start the replicas"));
    let boot = text.lines().nth(line("bootstrap the primary")).unwrap();
    assert!(boot.trim_end().ends_with("pg1"), "{boot}");
    // A converged cluster has no run order to show.
    assert_eq!(
        pgherd::provision::report::render_order(&[], &s.playbook_origin),
        ""
    );
}

#[test]
fn check_offline_validates_inventory_and_playbook_without_contacting_any_host() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("inv.yml");
    std::fs::copy("inventories/example.yml", &inv).unwrap();
    let state = dir.path().join("st");
    let run = |extra: &[&std::ffi::OsStr]| {
        std::process::Command::new(env!("CARGO_BIN_EXE_pgherd"))
            .args(["check", "--offline", "-i"])
            .arg(&inv)
            .arg("--state-dir")
            .arg(&state)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("playbook playbooks/deploy.yml: valid"),
        "{stdout}"
    );
    assert!(stdout.contains("check passed (offline"), "{stdout}");
    assert!(!state.exists(), "offline: no SSH state, no connection");

    let bad = tmp(
        "deploy.yml",
        move_step(DEPLOY, "start etcd", "etcd config").as_bytes(),
    );
    let out = run(&["--playbook".as_ref(), bad.as_os_str()]);
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{err}");
    assert!(
        err.contains("deploy.yml:") && err.contains("step \"start etcd\" starts etcd before"),
        "{err}"
    );
}

#[test]
fn a_render_step_with_an_operators_own_template_writes_that_file_at_that_step() {
    let tdir = tempfile::tempdir().unwrap();
    std::fs::write(
        tdir.path().join("motd.j2"),
        "welcome to {{ host.name }} of {{ cluster }}\n",
    )
    .unwrap();
    let text = format!(
        "{DEPLOY}\n  - name: message of the day\n    hosts: all\n    render:\n      template: motd.j2\n      dest: /etc/motd\n      mode: \"0644\"\n      owner: root\n"
    );
    let agent = tmp("agent", b"pgherd-agent test binary");
    let pb = tmp("deploy.yml", text.as_bytes());
    let s = spec::build_with(&example(), Some(&agent), Some(tdir.path()), Some(&pb))
        .unwrap_or_else(|e| panic!("{}", pgherd::provision::error_chain(&e)));
    let h = s.host("pg2").unwrap();
    let motd = h
        .files
        .iter()
        .find(|f| f.path == "/etc/motd")
        .expect("rendered");
    assert_eq!(
        String::from_utf8_lossy(&motd.content),
        "welcome to pg2 of demo\n"
    );
    assert_eq!((motd.mode, motd.owner.as_str()), (0o644, "root:root"));
    let i = schedule::slot(h, Item::File("/etc/motd"), false).unwrap();
    assert_eq!(s.playbook.steps[i].name, "message of the day");
}
