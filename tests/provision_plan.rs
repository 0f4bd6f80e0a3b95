//! The planner, pure: fixture facts (served by a `FakeTransport` answering the facts command)
//! → plan, and the apply layer's choice of service operations, without any real host.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use pgherd::provision::apply::{self, ApplyOptions, Fleet};
use pgherd::provision::desired::{
    AgentBinary, DeploySpec, DesiredDir, DesiredFile, DesiredUser, HostTarget, Roles,
};
use pgherd::provision::plan::{self, Action, Planned};
use pgherd::provision::playbook::{HostStep, Playbook};
use pgherd::provision::report::{self, ReportOptions};
use pgherd::provision::services::{self, Service, ServiceMode, ServiceOp};
use pgherd::transport::fake::FakeCall;
use pgherd::transport::{FakeTransport, Transport, sha256_hex};

const SECRET: &str = "s3cr3t-Passw0rd-abcdefghijkl";
const OLD_SECRET: &str = "old-Passw0rd-zyxwvutsrqpo";
const AGENT_CFG: &str = "/etc/pgherd/agent.yml";
const ETCD_CFG: &str = "/etc/pgherd/etcd.yml";
const HAPROXY_CFG: &str = "/etc/haproxy/haproxy.cfg";
const UNIT: &str = "/etc/systemd/system/pgherd-agent.service";

fn agent_yml(password: &str) -> String {
    format!(
        "scope: demo\nname: n1\npostgresql:\n  authentication:\n    superuser:\n      password: {password}\n"
    )
}

fn haproxy_cfg(inter: &str) -> String {
    format!(
        "global\n  maxconn 100\ndefaults\n  mode tcp\nlisten primary\n  bind *:5000\n  default-server inter {inter} fall 2\n"
    )
}

fn spec_with(haproxy_inter: &str, password: &str, binary: &[u8], primary_port: u16) -> DeploySpec {
    let host = |name: &str| HostTarget {
        name: name.to_string(),
        address: "127.0.0.1".to_string(),
        roles: Roles {
            postgres: true,
            etcd: true,
            haproxy: true,
        },
        files: vec![
            DesiredFile::new(AGENT_CFG, agent_yml(password), 0o600, "postgres:postgres"),
            DesiredFile::new(
                ETCD_CFG,
                "name: n1\ndata-dir: /var/lib/etcd/demo\n",
                0o644,
                "root:root",
            ),
            DesiredFile::new(HAPROXY_CFG, haproxy_cfg(haproxy_inter), 0o644, "root:root"),
            DesiredFile::new(
                UNIT,
                "[Service]\nExecStart=/usr/local/bin/pgherd-agent\n",
                0o644,
                "root:root",
            ),
        ],
        dirs: vec![DesiredDir {
            path: "/var/lib/pgherd/data".into(),
            owner: "postgres:postgres".into(),
            mode: 0o700,
        }],
        packages: vec![
            "postgresql-15".into(),
            "etcd-server".into(),
            "haproxy".into(),
        ],
        pg_data_dir: Some("/var/lib/pgherd/data".into()),
        service_configs: [
            (Service::Agent, AGENT_CFG),
            (Service::Etcd, ETCD_CFG),
            (Service::Haproxy, HAPROXY_CFG),
        ]
        .into_iter()
        .map(|(s, p)| (s, p.to_string()))
        .collect(),
        stop_units: vec!["postgresql".into()],
        users: vec![],
        steps: deploy_steps(),
    };
    DeploySpec {
        etcd: None,
        cluster: "demo".into(),
        hosts: vec![host("n1")],
        agent_binary: Some(AgentBinary::new(binary.to_vec())),
        secrets: vec![SECRET.to_string(), OLD_SECRET.to_string()],
        restapi_port: 1, // nothing listens: no agent wait is expected in these tests
        pg_port: 5432,
        etcd_client_port: 2379,
        primary_port,
        replica_port: 5001,
        stats_port: 0, // 0: not checked (no HAProxy stats in these tests)
        playbook: Arc::new(Playbook::deploy()),
        playbook_origin: "playbooks/deploy.yml".into(),
        dcs_config: None,
        restapi_auth: None,
        inventory: None,
    }
}

/// The built-in deploy playbook's steps for the fixture host `n1` (every role, first of each),
/// arguments expanded with the fixture's values.
fn deploy_steps() -> Vec<HostStep> {
    let pb = Playbook::deploy();
    pb.steps
        .iter()
        .enumerate()
        .filter(|(_, s)| s.hosts.selects("n1", |_| true, |_| true))
        .map(|(index, s)| HostStep {
            index,
            kind: s
                .kind
                .expand(|t| {
                    Ok::<_, ()>(
                        t.replace("{{ postgresql.version }}", "15")
                            .replace("{{ postgresql.data_dir }}", "/var/lib/pgherd/data")
                            .replace("{{ etcd.data_dir }}", "/var/lib/etcd/demo"),
                    )
                })
                .expect("expand"),
        })
        .collect()
}

fn spec() -> DeploySpec {
    spec_with("1s", SECRET, b"agent-v1", 5000)
}

/// What the facts command prints for a host that has exactly `installed` (path → content) and
/// runs the given services.
fn facts_stdout(
    spec: &DeploySpec,
    installed: &BTreeMap<String, (Vec<u8>, u32, String)>,
    running: bool,
    pkgs: bool,
) -> String {
    let h = &spec.hosts[0];
    let q = spec.fact_query(h);
    let mut s = String::from("mode supervisor\n");
    for f in &q.files {
        match installed.get(f) {
            Some((bytes, mode, owner)) => s.push_str(&format!(
                "file {f} {} {:o} {owner}\n",
                sha256_hex(bytes),
                mode
            )),
            None => s.push_str(&format!("file {f} -\n")),
        }
    }
    for d in &q.dirs {
        let owner = spec
            .dirs_for(h, ServiceMode::Supervisor)
            .into_iter()
            .find(|x| &x.path == d)
            .map(|x| x.owner);
        match (running, owner) {
            (true, Some(o)) => s.push_str(&format!("dir {d} {o}\n")),
            _ => s.push_str(&format!("dir {d} -\n")),
        }
    }
    for p in &q.packages {
        s.push_str(&format!("pkg {p} {}\n", u8::from(pkgs)));
    }
    for (i, svc) in Service::ALL.iter().enumerate() {
        if running {
            s.push_str(&format!("svc {} {} {}\n", svc.name(), 100 + i, 200 + i));
        } else {
            s.push_str(&format!("svc {} - -\n", svc.name()));
        }
    }
    s.push_str(if running {
        "pg 1 300\netcd 1\n"
    } else {
        "pg 0 -\netcd 0\n"
    });
    s
}

/// Files of a host converged to `spec` (supervisor mode).
fn converged(spec: &DeploySpec) -> BTreeMap<String, (Vec<u8>, u32, String)> {
    spec.files_for(&spec.hosts[0], ServiceMode::Supervisor)
        .into_iter()
        .map(|f| {
            (
                f.path.clone(),
                (f.content.to_vec(), f.mode, f.owner.clone()),
            )
        })
        .collect()
}

/// A fake host holding `files` and answering the facts command with `stdout`.
fn fake(stdout: &str, files: &BTreeMap<String, (Vec<u8>, u32, String)>) -> Arc<FakeTransport> {
    let t = FakeTransport::new("n1").on("echo \"mode $mode\"", 0, stdout);
    for (p, (b, m, o)) in files {
        t.set_file(p, b.clone(), *m, o);
    }
    Arc::new(t)
}

fn fleet(t: &Arc<FakeTransport>) -> Fleet {
    let mut f = Fleet::new();
    f.insert("n1".into(), t.clone() as Arc<dyn Transport>);
    f
}

async fn plan_for(spec: &DeploySpec, t: &Arc<FakeTransport>) -> plan::Plan {
    apply::make_plan(spec, &fleet(t)).await.expect("plan")
}

fn step<'a>(p: &'a plan::Plan, name: &str) -> &'a Planned {
    &p.hosts[0]
        .steps
        .iter()
        .find(|s| s.name == name)
        .unwrap_or_else(|| panic!("no step {name}"))
        .planned
}

#[tokio::test]
async fn fresh_host_plans_files_directories_and_service_starts() {
    let s = spec();
    let t = fake(
        &facts_stdout(&s, &BTreeMap::new(), false, true),
        &BTreeMap::new(),
    );
    let p = plan_for(&s, &t).await;
    assert!(!p.is_noop());
    assert!(matches!(step(&p, "packages"), Planned::Noop(r) if r.contains("all 3 packages")));
    assert!(matches!(
        step(&p, "directories"),
        Planned::Change {
            action: Action::MakeDirs(_),
            ..
        }
    ));
    for f in [
        AGENT_CFG,
        HAPROXY_CFG,
        services::SUPERVISE_PATH,
        services::BOOT_PATH,
        services::AGENT_BIN_PATH,
    ] {
        assert!(
            matches!(
                step(&p, &format!("file {f}")),
                Planned::Change {
                    action: Action::Upload(_),
                    ..
                }
            ),
            "{f}"
        );
    }
    for svc in Service::ALL {
        assert_eq!(p.hosts[0].service_op(svc), Some(ServiceOp::Start), "{svc}");
    }
    // Supervisor mode: unit files are not uploaded (no systemd to read them).
    assert!(
        !p.hosts[0]
            .steps
            .iter()
            .any(|s| s.name == format!("file {UNIT}"))
    );
}

#[tokio::test]
async fn converged_host_plans_no_change_and_names_the_running_pids() {
    let s = spec();
    let files = converged(&s);
    let t = fake(&facts_stdout(&s, &files, true, true), &files);
    let p = plan_for(&s, &t).await;
    let text = report::render_plan(
        &p,
        ReportOptions {
            show_noops: true,
            diffs: true,
        },
    );
    assert!(p.is_noop(), "{text}");
    assert!(
        text.contains("no change  service pgherd-agent: running (pid 201), inputs unchanged"),
        "{text}"
    );
    assert!(text.ends_with("plan: 1 host(s), no changes\n"), "{text}");
}

#[tokio::test]
async fn haproxy_setting_change_shows_only_its_diff_and_reloads_only_haproxy() {
    let old = spec();
    let files = converged(&old);
    let new = spec_with("2s", SECRET, b"agent-v1", 5000);
    let t = fake(&facts_stdout(&new, &files, true, true), &files);
    let p = plan_for(&new, &t).await;
    let changes: Vec<&str> = p.hosts[0].changes().map(|s| s.name.as_str()).collect();
    assert_eq!(
        changes,
        vec![format!("file {HAPROXY_CFG}").as_str(), "service haproxy"]
    );
    assert_eq!(
        p.hosts[0].service_op(Service::Haproxy),
        Some(ServiceOp::Reload)
    );
    let Planned::Change { diff: Some(d), .. } = step(&p, &format!("file {HAPROXY_CFG}")) else {
        panic!()
    };
    assert!(
        d.contains("-  default-server inter 1s fall 2")
            && d.contains("+  default-server inter 2s fall 2"),
        "{d}"
    );
}

#[tokio::test]
async fn agent_config_change_reloads_the_agent_and_the_diff_hides_both_passwords() {
    let old = spec_with("1s", OLD_SECRET, b"agent-v1", 5000);
    let files = converged(&old);
    let new = spec();
    let t = fake(&facts_stdout(&new, &files, true, true), &files);
    let p = plan_for(&new, &t).await;
    assert_eq!(
        p.hosts[0].service_op(Service::Agent),
        Some(ServiceOp::Reload)
    );
    assert_eq!(p.hosts[0].service_op(Service::Haproxy), None);
    assert_eq!(p.hosts[0].service_op(Service::Etcd), None);
    let text = report::render_plan(
        &p,
        ReportOptions {
            show_noops: true,
            diffs: true,
        },
    );
    assert!(text.contains("only secret values differ"), "{text}");
    assert!(
        !text.contains(SECRET) && !text.contains(OLD_SECRET),
        "{text}"
    );
    assert!(
        !format!("{p:?}").contains(SECRET),
        "Debug of a plan must not show file contents"
    );
}

#[tokio::test]
async fn new_agent_binary_restarts_only_the_agent() {
    let files = converged(&spec());
    let new = spec_with("1s", SECRET, b"agent-v2", 5000);
    let t = fake(&facts_stdout(&new, &files, true, true), &files);
    let p = plan_for(&new, &t).await;
    assert_eq!(
        p.hosts[0].service_op(Service::Agent),
        Some(ServiceOp::Restart)
    );
    assert_eq!(p.hosts[0].service_op(Service::Etcd), None);
    assert!(
        matches!(step(&p, &format!("file {}", services::AGENT_BIN_PATH)),
        Planned::Change { summary, diff: None, .. } if summary.starts_with("replace binary"))
    );
}

#[tokio::test]
async fn etcd_config_change_restarts_etcd() {
    let s = spec();
    let mut files = converged(&s);
    files.insert(
        ETCD_CFG.into(),
        (b"name: n1\n".to_vec(), 0o644, "root:root".into()),
    );
    let t = fake(&facts_stdout(&s, &files, true, true), &files);
    let p = plan_for(&s, &t).await;
    assert_eq!(
        p.hosts[0].service_op(Service::Etcd),
        Some(ServiceOp::Restart)
    );
}

#[tokio::test]
async fn only_missing_packages_are_installed() {
    let s = spec();
    let t = fake(
        &facts_stdout(&s, &BTreeMap::new(), false, false),
        &BTreeMap::new(),
    );
    let p = plan_for(&s, &t).await;
    let Planned::Change {
        action: Action::InstallPackages(pk),
        ..
    } = step(&p, "packages")
    else {
        panic!()
    };
    assert_eq!(
        pk,
        &vec![
            "postgresql-15".to_string(),
            "etcd-server".into(),
            "haproxy".into()
        ]
    );
}

#[tokio::test]
async fn wrong_mode_only_fixes_metadata_without_notifying() {
    let s = spec();
    let mut files = converged(&s);
    files.get_mut(AGENT_CFG).unwrap().1 = 0o644;
    let t = fake(&facts_stdout(&s, &files, true, true), &files);
    let p = plan_for(&s, &t).await;
    assert!(matches!(
        step(&p, &format!("file {AGENT_CFG}")),
        Planned::Change {
            action: Action::FixMetadata(_),
            ..
        }
    ));
    assert_eq!(p.hosts[0].service_op(Service::Agent), None);
}

#[tokio::test]
async fn unreachable_host_fails_fact_gathering_naming_the_host() {
    let s = spec();
    let t = fake("", &BTreeMap::new());
    t.set_unreachable(true);
    let e = apply::make_plan(&s, &fleet(&t)).await.unwrap_err();
    let msg = pgherd::provision::error_chain(&e);
    assert!(
        msg.contains("host n1") && msg.contains("unreachable"),
        "{msg}"
    );
}

#[tokio::test]
async fn applying_a_haproxy_change_uploads_the_file_and_reloads_only_haproxy() {
    // A listener stands in for HAProxy's primary port (apply waits until it routes).
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    // It answers PostgreSQL's SSLRequest with "N" (no TLS), as a server behind HAProxy would.
    tokio::spawn(async move {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        while let Ok((mut c, _)) = listener.accept().await {
            let mut req = [0u8; 8];
            if c.read_exact(&mut req).await.is_ok() {
                let _ = c.write_all(b"N").await;
            }
        }
    });
    let old = spec_with("1s", SECRET, b"agent-v1", port);
    let files = converged(&old);
    let new = spec_with("2s", SECRET, b"agent-v1", port);
    let t = fake(&facts_stdout(&new, &files, true, true), &files);
    let opts = ApplyOptions {
        wait_timeout: Duration::from_secs(5),
        progress: false,
        ..Default::default()
    };
    let r = apply::apply(&new, &fleet(&t), &opts).await.expect("apply");
    assert_eq!(
        r.service_ops("n1"),
        vec![(Service::Haproxy, ServiceOp::Reload)]
    );
    let cmds = t.commands();
    assert!(cmds.iter().any(|c| c.contains("kill -USR2")), "{cmds:#?}");
    assert!(
        !cmds.iter().any(|c| c.contains("setsid -f")
            || c.contains("kill -HUP")
            || c.contains("kill -TERM")),
        "{cmds:#?}"
    );
    let uploads: Vec<String> = t
        .calls()
        .into_iter()
        .filter_map(|c| match c {
            FakeCall::Upload { path, .. } => Some(path),
            _ => None,
        })
        .collect();
    assert_eq!(uploads, vec![HAPROXY_CFG.to_string()]);
    assert_eq!(
        t.file(HAPROXY_CFG).unwrap().bytes,
        haproxy_cfg("2s").into_bytes()
    );
}

#[test]
fn bad_inventory_is_a_located_error_with_exit_code_2_before_any_host_is_touched() {
    let dir = tempfile::tempdir().unwrap();
    let inv = dir.path().join("bad.yml");
    // A typo'd key: no host could even be named, let alone contacted.
    std::fs::write(
        &inv,
        "cluster: demo\nhosts:\n  - name: n1\n    adress: 10.0.0.1\n",
    )
    .unwrap();
    for verb in ["plan", "apply", "check"] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgherd"))
            .args([verb, "-i"])
            .arg(&inv)
            .args(["--state-dir"])
            .arg(dir.path().join("st"))
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{verb}: {err}");
        assert!(
            err.contains("bad.yml:4:") && err.contains("adress"),
            "{verb}: {err}"
        );
        assert!(
            !dir.path().join("st").exists(),
            "{verb}: nothing may be set up before validation"
        );
    }
}

#[tokio::test]
async fn systemd_host_gets_units_daemon_reload_and_the_distribution_postgresql_stopped() {
    let s = spec();
    let out = facts_stdout(&s, &BTreeMap::new(), false, true)
        .replace("mode supervisor", "mode systemd")
        + "unit postgresql 1\n";
    let t = fake(&out, &BTreeMap::new());
    let p = plan_for(&s, &t).await;
    assert_eq!(p.hosts[0].mode, ServiceMode::Systemd);
    assert!(
        matches!(step(&p, "unit postgresql"), Planned::Change { action: Action::StopUnit(u), .. } if u == "postgresql")
    );
    assert!(matches!(
        step(&p, "systemd"),
        Planned::Change {
            action: Action::DaemonReload,
            ..
        }
    ));
    assert!(matches!(
        step(&p, &format!("file {UNIT}")),
        Planned::Change {
            action: Action::Upload(_),
            ..
        }
    ));
    // No supervisor machinery on a systemd host.
    assert!(
        !p.hosts[0]
            .steps
            .iter()
            .any(|st| st.name.contains("supervise") || st.name.ends_with(".run"))
    );
    assert_eq!(
        services::op_command(Service::Agent, ServiceOp::Start, p.hosts[0].mode),
        "systemctl enable --now pgherd-agent.service"
    );
}

#[tokio::test]
async fn systemd_haproxy_writes_server_states_before_every_start_via_a_drop_in() {
    // Under systemd, HAProxy is also (re)started by systemd itself (crash restart, boot): the
    // server-state script must run then too, or HAProxy would count every server UP at start.
    let s = spec();
    let out =
        facts_stdout(&s, &BTreeMap::new(), false, true).replace("mode supervisor", "mode systemd");
    let p = plan_for(&s, &fake(&out, &BTreeMap::new())).await;
    let Planned::Change {
        action: Action::Upload(f),
        ..
    } = step(&p, &format!("file {}", services::HAPROXY_STATE_DROPIN))
    else {
        panic!("no drop-in upload planned");
    };
    let text = String::from_utf8(f.content.to_vec()).unwrap();
    assert!(
        text.contains(&format!("ExecStartPre={}", services::HAPROXY_STATE_SCRIPT)),
        "{text}"
    );
    // A drop-in is a unit file: it triggers daemon-reload, and is not written in supervisor mode.
    assert!(matches!(
        step(&p, "systemd"),
        Planned::Change {
            action: Action::DaemonReload,
            ..
        }
    ));
    let sup = plan_for(
        &s,
        &fake(
            &facts_stdout(&s, &BTreeMap::new(), false, true),
            &BTreeMap::new(),
        ),
    )
    .await;
    assert!(
        !sup.hosts[0]
            .steps
            .iter()
            .any(|st| st.name.ends_with("pgherd-state.conf"))
    );
}

#[tokio::test]
async fn a_host_failing_in_a_step_stops_the_run_before_the_next_step_on_any_host() {
    let mut s = spec();
    let mut n2 = s.hosts[0].clone();
    n2.name = "n2".into();
    s.hosts.push(n2);
    let blank = facts_stdout(&s, &BTreeMap::new(), false, true);
    let t1 = fake(&blank, &BTreeMap::new());
    // n2 cannot create directories (e.g. a read-only filesystem).
    let t2 = Arc::new(
        FakeTransport::new("n2")
            .on("echo \"mode $mode\"", 0, &blank)
            .on("install -d", 1, ""),
    );
    let mut f = fleet(&t1);
    f.insert("n2".into(), t2.clone() as Arc<dyn Transport>);
    let opts = ApplyOptions {
        wait_timeout: Duration::from_secs(1),
        progress: false,
        ..Default::default()
    };
    let e = apply::apply(&s, &f, &opts).await.unwrap_err();
    let msg = pgherd::provision::error_chain(&e);
    assert!(
        msg.contains("host n2") && msg.contains("step `directories`"),
        "{msg}"
    );
    // n1 finished the failing step (its directories exist) ...
    assert!(t1.commands().iter().any(|c| c.contains("install -d")));
    // ... but no host went on to the next steps: no file written, no service started.
    assert!(t1.file(AGENT_CFG).is_none() && t1.file(services::AGENT_BIN_PATH).is_none());
    for t in [&t1, &t2] {
        assert!(
            !t.commands().iter().any(|c| c.contains("setsid -f")),
            "{:#?}",
            t.commands()
        );
    }
}

#[tokio::test]
async fn ensure_user_creates_a_missing_user_and_leaves_a_present_one_alone() {
    let mut s = spec();
    s.hosts[0].users.push(DesiredUser {
        name: "drill".into(),
        system: true,
        home: None,
        groups: vec!["postgres".into()],
    });
    let conv = converged(&s);
    let base = facts_stdout(&s, &conv, true, true);
    let p = plan_for(&s, &fake(&base, &conv)).await;
    match step(&p, "user drill") {
        Planned::Change {
            action: Action::CreateUser(u),
            summary,
            ..
        } => {
            assert_eq!(u.name, "drill");
            assert_eq!(summary, "create (system) in postgres");
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(p.change_count(), 1, "only the user");
    // The fact line says the account exists: nothing to do, whatever its groups are now.
    let p = plan_for(&s, &fake(&format!("{base}user drill 1\n"), &conv)).await;
    assert!(p.is_noop());
    assert!(matches!(step(&p, "user drill"), Planned::Noop(r) if r == "present"));
}
