//! End to end on a real 3-host namespace lab (subnet 10.232.9.0/24, bridge `phprov0`):
//! `apply` builds etcd + PostgreSQL/agents + HAProxy; a second `apply` changes nothing and
//! restarts nothing; a HAProxy setting change touches only haproxy.cfg and reloads only HAProxy;
//! a crashed primary host fails over (writes through HAProxy resume) and rejoins as a replica
//! when booted; an unreachable host and a wrong key give errors naming the host.
//! Needs root (namespaces); skipped with a message otherwise. Prints the apply wall times.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use pgherd::inventory::{self, Inventory};
use pgherd::lab::{self, LabSpec};
use pgherd::provision::apply::{self, ApplyOptions, Fleet};
use pgherd::provision::desired::DeploySpec;
use pgherd::provision::plan::Planned;
use pgherd::provision::services::{Service, ServiceOp};
use pgherd::provision::spec;

mod common;
use common::deploy::{
    fresh_lab, is_root, leader_with_streaming_replicas, pg, pids, rejoined_as_streaming_replica,
    writes_resume_through,
};

const SUBNET: &str = "10.232.9";

/// The lab inventory plus the settings this test checks end up in the agents' config.
fn write_inventory(spec: &LabSpec, path: &Path, maxconn: u32, on_role_change: &str) {
    let mut y = lab::inventory_yaml(spec);
    y.push_str(&format!(
        "profile: fast\n\
         haproxy:\n  maxconn: {maxconn}\n\
         watchdog:\n  mode: \"off\"\n\
         callbacks:\n  on_role_change: {on_role_change}\n"
    ));
    std::fs::write(path, y).unwrap();
}

/// The shipped deploy playbook plus an `ensure_user` step (run through `--playbook` like an
/// operator's edited copy), so the lab also shows a user created for real and left alone on
/// re-runs.
fn playbook(dir: &Path) -> PathBuf {
    let text = include_str!("../playbooks/deploy.yml").replace(
        "  - name: install etcd\n",
        "  - name: drill user\n    hosts: postgres\n    ensure_user:\n      name: pgherd-drill\n      groups: [postgres]\n\n  - name: install etcd\n",
    );
    let p = dir.join("deploy.yml");
    std::fs::write(&p, text).unwrap();
    p
}

fn build(inv_path: &Path) -> (Inventory, DeploySpec) {
    let inv = inventory::load(inv_path).expect("inventory");
    let agent = PathBuf::from(env!("CARGO_BIN_EXE_pgherd-agent"));
    let pb = playbook(inv_path.parent().unwrap());
    let s = spec::build_with(&inv, Some(&agent), None, Some(&pb)).expect("desired state");
    (inv, s)
}

async fn connect(inv: &Inventory, state: &Path) -> Fleet {
    pgherd::cli::connect(inv, state).await.expect("connect")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deploys_converges_reloads_fails_over_and_names_bad_hosts() {
    if !is_root() {
        eprintln!("skipped: deploy_lab needs root (network namespaces)");
        return;
    }
    let (tmp, guard, info) = fresh_lab("pgprov", |dir| {
        LabSpec::new("prv", 3, SUBNET, "phprov0", dir)
    });
    let lab_spec = guard.0.clone();
    let state = tmp.path().join("st");
    let inv_path = tmp.path().join("lab.yml");
    write_inventory(&lab_spec, &inv_path, 100, "/bin/true");

    // First apply.
    let (inv, s) = build(&inv_path);
    let password = inv.secrets.superuser.expose().to_string();
    // Every password of the cluster, for the checks that none leaks.
    let secrets: Vec<String> = inv
        .secrets
        .all()
        .iter()
        .map(|s| s.expose().to_string())
        .collect();
    let fleet = connect(&inv, &state).await;
    let opts = ApplyOptions {
        wait_timeout: Duration::from_secs(120),
        progress: false,
        ..Default::default()
    };
    let t0 = Instant::now();
    let report = apply::apply(&s, &fleet, &opts)
        .await
        .unwrap_or_else(|e| panic!("first apply: {}", pgherd::provision::error_chain(&e)));
    let first_apply = t0.elapsed();
    assert!(!report.done.is_empty());

    // The playbook's ensure_user step created the user, in its group, on every postgres host.
    for h in &info.hosts {
        let out = fleet[&h.name]
            .run_ok("id pgherd-drill", Duration::from_secs(10))
            .await
            .expect("id pgherd-drill");
        assert!(
            out.stdout_str().contains("(postgres)"),
            "{}",
            out.stdout_str()
        );
    }

    // etcd: 3 healthy members.
    let t1 = fleet[&info.hosts[0].name].clone();
    let out = t1
        .run_ok(
            "ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 member list",
            Duration::from_secs(10),
        )
        .await
        .expect("etcdctl member list");
    assert_eq!(
        out.stdout_str()
            .lines()
            .filter(|l| l.contains("started"))
            .count(),
        3,
        "{}",
        out.stdout_str()
    );

    // One leader, two streaming replicas.
    let api = |addr: &str| format!("http://{addr}:{}", s.restapi_port);
    let a0 = api(&info.hosts[0].address);
    let leader = leader_with_streaming_replicas(&a0, 2).await;

    // Writes through HAProxy's primary port, reads from a replica through the replica port.
    let hp = &info.hosts[1].address;
    let c = pg(hp, s.primary_port, &password)
        .await
        .expect("connect through haproxy primary port");
    c.batch_execute("CREATE TABLE IF NOT EXISTS t(x int); INSERT INTO t VALUES (1)")
        .await
        .unwrap();
    let r = pg(hp, s.replica_port, &password)
        .await
        .expect("connect through haproxy replica port");
    let in_recovery: bool = r
        .query_one("SELECT pg_is_in_recovery()", &[])
        .await
        .unwrap()
        .get(0);
    assert!(in_recovery, "the replica port must reach a replica");

    // Inventory callbacks/watchdog reached the agents' config.
    let cfg_path = spec::service_config_path(&s, &info.hosts[0].name, Service::Agent)
        .expect("agent config path");
    let cfg = String::from_utf8(t1.read_file(&cfg_path).await.unwrap().unwrap()).unwrap();
    let parsed = pgherd::config::AgentConfig::parse(&cfg, &cfg_path).expect("agent config parses");
    assert_eq!(
        parsed.postgresql.callbacks.on_role_change.as_deref(),
        Some("/bin/true")
    );
    assert_eq!(parsed.watchdog.mode, pgherd::config::WatchdogMode::Off);

    // Second apply: no changes, no restarts.
    let before = pids(&s, &fleet).await;
    let t0 = Instant::now();
    let plan = apply::make_plan(&s, &fleet).await.unwrap();
    assert!(
        plan.is_noop(),
        "{}",
        pgherd::provision::report::render_plan(&plan, Default::default())
    );
    let report = apply::apply(&s, &fleet, &opts).await.unwrap();
    let noop_apply = t0.elapsed();
    assert!(report.done.is_empty(), "{:?}", report.done);
    assert_eq!(
        pids(&s, &fleet).await,
        before,
        "a no-op apply must not restart anything"
    );
    println!(
        "MEASURED first apply: {:.1}s, no-op re-run (plan + apply): {:.1}s",
        first_apply.as_secs_f64(),
        noop_apply.as_secs_f64()
    );

    // The CLI says the same: `pgherd plan` has no changes, `pgherd status` shows the leader.
    let cli = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgherd"))
            .arg("--state-dir")
            .arg(&state)
            .args(args)
            .arg("-i")
            .arg(&inv_path)
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        assert!(
            out.status.success(),
            "pgherd {args:?}: {text}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let stderr = String::from_utf8_lossy(&out.stderr);
        for secret in &secrets {
            assert!(
                !text.contains(secret.as_str()) && !stderr.contains(secret.as_str()),
                "pgherd {args:?} printed a password"
            );
        }
        text
    };
    let text = cli(&["plan", "--agent-binary", env!("CARGO_BIN_EXE_pgherd-agent")]);
    assert!(text.contains("plan: 3 host(s), no changes"), "{text}");
    assert!(
        text.contains("no change  service pgherd-agent: running (pid"),
        "{text}"
    );
    let text = cli(&[
        "check",
        "--agent-binary",
        env!("CARGO_BIN_EXE_pgherd-agent"),
    ]);
    assert!(text.contains("check passed"), "{text}");
    let text = cli(&["status"]);
    assert!(
        text.contains(&format!("{leader:<12}"))
            && text.contains("leader")
            && text.contains("port=5000"),
        "{text}"
    );
    let v: serde_json::Value = serde_json::from_str(&cli(&["status", "--json"]))
        .expect("pgherd status --json is one JSON document");
    assert_eq!(v["leader"], leader.as_str(), "{v}");
    let members = v["members"].as_array().expect("members");
    assert_eq!(members.len(), 3, "{v}");
    for m in members {
        assert!(m["timeline"].as_u64().is_some_and(|t| t >= 1), "{m}");
        if m["name"] != leader.as_str() {
            assert_eq!(m["state"], "streaming", "{m}");
            assert!(m["lag"].as_u64().is_some(), "{m}");
        }
    }
    assert_eq!(v["connect"].as_array().map(Vec::len), Some(3), "{v}");
    assert!(
        v["connect"][0]["read_write"]
            .as_str()
            .is_some_and(|c| c.contains("port=5000")),
        "{v}"
    );

    // One HAProxy setting: only haproxy.cfg changes, only HAProxy reloads.
    write_inventory(&lab_spec, &inv_path, 150, "/bin/true");
    let (_, s2) = build(&inv_path);
    let plan = apply::make_plan(&s2, &fleet).await.unwrap();
    for hp in &plan.hosts {
        let names: Vec<&str> = hp.changes().map(|st| st.name.as_str()).collect();
        assert_eq!(names.len(), 2, "{}: {names:?}", hp.host);
        assert!(
            names[0].starts_with("file ") && names[0].contains("haproxy"),
            "{names:?}"
        );
        assert_eq!(names[1], "service haproxy");
        let Planned::Change { diff: Some(d), .. } = &hp.changes().next().unwrap().planned else {
            panic!("no diff")
        };
        assert!(
            d.contains("150")
                && d.lines()
                    .filter(|l| l.starts_with('+') && !l.starts_with("+++"))
                    .count()
                    >= 1,
            "{d}"
        );
    }
    let before = pids(&s2, &fleet).await;
    let report = apply::apply(&s2, &fleet, &opts).await.unwrap();
    for h in &info.hosts {
        assert_eq!(
            report.service_ops(&h.name),
            vec![(Service::Haproxy, ServiceOp::Reload)]
        );
    }
    let after = pids(&s2, &fleet).await;
    for (h, p) in &before {
        assert_eq!(p[..2], after[h][..2], "{h}: etcd/agent restarted");
        assert_eq!(p[3], after[h][3], "{h}: postgres restarted");
    }

    // An agent setting (a callback): only the agent configs change, and the agents reload
    // (SIGHUP) in place: no process restarts anywhere.
    write_inventory(&lab_spec, &inv_path, 150, "/bin/echo");
    let (_, s3) = build(&inv_path);
    let plan = apply::make_plan(&s3, &fleet).await.unwrap();
    for hp in &plan.hosts {
        let names: Vec<&str> = hp.changes().map(|st| st.name.as_str()).collect();
        assert_eq!(
            names,
            vec![
                format!("file {}", pgherd::render::AGENT_CONFIG_PATH).as_str(),
                "service pgherd-agent"
            ],
            "{}",
            hp.host
        );
    }
    let before = pids(&s3, &fleet).await;
    let report = apply::apply(&s3, &fleet, &opts).await.unwrap();
    for h in &info.hosts {
        assert_eq!(
            report.service_ops(&h.name),
            vec![(Service::Agent, ServiceOp::Reload)]
        );
    }
    assert_eq!(
        pids(&s3, &fleet).await,
        before,
        "a reload must not restart anything"
    );
    let cfg = String::from_utf8(t1.read_file(&cfg_path).await.unwrap().unwrap()).unwrap();
    assert!(cfg.contains("/bin/echo"), "{cfg}");

    // Fault drills (`pgherd drill`): a switchover, then SIGKILL of the leader's agent and
    // PostgreSQL over SSH; each reports the write-unavailable window and ends with every
    // replica streaming again.
    for fault in ["switchover", "kill-primary"] {
        let text = cli(&["drill", fault, "--yes"]);
        assert!(
            text.starts_with(&format!("round 1 {fault} on "))
                && text.contains("write-unavailable window: ")
                && text.contains("two writable primaries: never"),
            "{text}"
        );
    }
    let leader = leader_with_streaming_replicas(&api(&info.hosts[0].address), 2).await;

    // After bring-up, two rolling changes, a switchover and a failover: no password in any log
    // on any host (the agents', etcd's, HAProxy's and the supervisor's under /var/log/pgherd,
    // PostgreSQL's). The passwords go to grep on stdin, never on its command line.
    let patterns = format!("{}\n", secrets.join("\n"));
    for h in &info.hosts {
        // PostgreSQL logs beside its data directory (`<data_dir>.log`, see pg::local).
        let script = "grep -rlF -f - /var/log/pgherd /var/log/postgresql \
                      $(find /var/lib/postgresql -maxdepth 3 -name '*.log' 2>/dev/null) \
                      2>/dev/null; exit 0";
        let grep = |stdin: String| {
            let t = fleet[&h.name].clone();
            async move {
                t.exec(pgherd::transport::Exec {
                    script,
                    stdin: Some(stdin.as_bytes()),
                    secrets: &[],
                    timeout: Duration::from_secs(30),
                })
                .await
                .unwrap()
                .stdout_str()
            }
        };
        // The search itself works: the pattern "pgherd-agent" is in the agent's own log.
        let canary = grep("pgherd-agent\n".to_string()).await;
        assert!(
            canary.contains("/var/log/pgherd/"),
            "{}: {canary:?}",
            h.name
        );
        let hits = grep(patterns.clone()).await;
        assert!(
            hits.trim().is_empty(),
            "{}: a password appears in {}",
            h.name,
            hits.trim()
        );
    }

    // Crash the primary's host: writes through HAProxy resume on a new primary.
    lab::crash(&lab_spec, &leader).unwrap();
    let survivor = info.other_than(&leader).unwrap().address.clone();
    let t0 = Instant::now();
    writes_resume_through(&survivor, 5000, &password).await;
    println!(
        "MEASURED writes resumed {:.1}s after crashing {leader}",
        t0.elapsed().as_secs_f64()
    );

    // Boot it: its agent comes back (boot hook) and rejoins as a replica.
    lab::boot(&lab_spec, &leader).unwrap();
    let old = info.host(&leader).unwrap().address.clone();
    rejoined_as_streaming_replica(&api(&old)).await;

    // The REST allowlist: `agent.restapi_allowlist` naming an address that is not this admin
    // host. The agents take it by a reload (nothing restarts); then the admin host's mutating
    // call gets 403, before any credential is looked at, while a cluster host (always on the
    // list) gets past the address check to the Basic-auth 401, and reads stay open to all.
    let mut y = std::fs::read_to_string(&inv_path).unwrap();
    y.push_str("agent:\n  restapi_allowlist: [192.0.2.1]\n");
    std::fs::write(&inv_path, y).unwrap();
    let (_, s4) = build(&inv_path);
    let report = apply::apply(&s4, &fleet, &opts).await.unwrap();
    for h in &info.hosts {
        assert_eq!(
            report.service_ops(&h.name),
            vec![(Service::Agent, ServiceOp::Reload)],
            "{}",
            h.name
        );
    }
    let target = api(&info.hosts[0].address);
    let http = reqwest::Client::new();
    let mut code = 0;
    for _ in 0..50 {
        // The reload lands within an agent cycle; poll (bounded) until it is in force.
        code = http
            .post(format!("{target}/reload"))
            .basic_auth(
                &inv.agent.restapi_username,
                Some(inv.secrets.restapi.expose()),
            )
            .send()
            .await
            .unwrap()
            .status()
            .as_u16();
        if code == 403 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert_eq!(code, 403, "the admin host is outside the allowlist");
    let from_member = fleet[info.hosts[1].name.as_str()]
        .run_ok(
            &format!("curl -s -o /dev/null -w '%{{http_code}}' -X POST {target}/reload"),
            Duration::from_secs(20),
        )
        .await
        .unwrap()
        .stdout_str();
    assert_eq!(
        from_member.trim(),
        "401",
        "a member passes the address check"
    );
    let r = http.get(format!("{target}/cluster")).send().await.unwrap();
    assert_eq!(r.status().as_u16(), 200, "reads stay open");

    // Unreachable host and wrong key: errors name the host, nothing else is attempted.
    let mut bad = inv.clone();
    bad.hosts[2].address = format!("{SUBNET}.99");
    for h in &mut bad.hosts {
        h.ssh.connect_timeout_secs = 3;
    }
    let t0 = Instant::now();
    let e = pgherd::cli::connect(&bad, &state)
        .await
        .err()
        .expect("unreachable host must fail");
    let msg = format!("{e:#}");
    assert!(
        msg.contains(bad.hosts[2].name.as_str()) && msg.contains("unreachable"),
        "{msg}"
    );
    assert!(t0.elapsed() < Duration::from_secs(15));
    let mut bad = inv.clone();
    let other_key = tmp.path().join("other_key");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&other_key)
        .status()
        .unwrap();
    assert!(st.success());
    bad.hosts[1].ssh.identity_file = Some(other_key);
    let e = pgherd::cli::connect(&bad, &state)
        .await
        .err()
        .expect("wrong key must fail");
    let msg = format!("{e:#}");
    assert!(
        msg.contains(bad.hosts[1].name.as_str()) && msg.contains("authentication refused"),
        "{msg}"
    );
}
