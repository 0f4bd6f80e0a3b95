//! Helpers of the end-to-end provisioning tests on a namespace lab (`tests/deploy_lab.rs`,
//! `tests/deploy_systemd.rs`): the lab's lifetime, service PIDs from facts, SQL through
//! HAProxy, agent REST reads, building and applying an inventory, etcd membership.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::time::Duration;

use pgherd::inventory::{self, Inventory};
use pgherd::lab::{self, LabSpec};
use pgherd::provision::apply::{self, ApplyOptions, ApplyReport, Fleet};
use pgherd::provision::desired::DeploySpec;
use pgherd::provision::etcd_members::{Member, parse_endpoint_health, parse_member_list};
use pgherd::provision::services::Service;
use pgherd::provision::spec;
use pgherd::transport::Transport;

/// Tears the lab down (state purged) when the test ends, unless `PGHERD_KEEP_LAB` is set.
pub struct LabGuard(pub LabSpec);

impl Drop for LabGuard {
    fn drop(&mut self) {
        if std::env::var_os("PGHERD_KEEP_LAB").is_none() {
            let _ = lab::down(&self.0, true);
        }
    }
}

pub fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// (etcd, agent, haproxy, postgres) pids per host.
pub async fn pids(s: &DeploySpec, fleet: &Fleet) -> BTreeMap<String, [Option<u32>; 4]> {
    let facts = apply::gather_all(s, fleet).await.expect("facts");
    facts
        .into_iter()
        .map(|(h, f)| {
            (
                h,
                [
                    f.service(Service::Etcd).pid,
                    f.service(Service::Agent).pid,
                    f.service(Service::Haproxy).pid,
                    f.postgres_pid,
                ],
            )
        })
        .collect()
}

/// A superuser connection to `host:port` (HAProxy's ports or PostgreSQL's).
pub async fn pg(
    host: &str,
    port: u16,
    password: &str,
) -> Result<tokio_postgres::Client, tokio_postgres::Error> {
    let conf = format!("host={host} port={port} user=postgres dbname=postgres connect_timeout=3");
    let mut c: tokio_postgres::Config = conf.parse().unwrap();
    c.password(password);
    let (client, conn) = c.connect(tokio_postgres::NoTls).await?;
    tokio::spawn(conn);
    Ok(client)
}

/// GET `url` as JSON; `None` on any failure.
pub async fn get_json(url: &str) -> Option<serde_json::Value> {
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(2))
        .build()
        .ok()?;
    c.get(url).send().await.ok()?.json().await.ok()
}

/// Waits until the agent API at `api` (`http://addr:port`) shows one leader and `replicas`
/// streaming replicas; returns the leader's name.
pub async fn leader_with_streaming_replicas(api: &str, replicas: usize) -> String {
    let url = format!("{api}/cluster");
    let members = super::cluster::eventually(
        Duration::from_secs(60),
        "1 leader + all replicas streaming",
        || {
            let url = url.clone();
            async move {
                let v = get_json(&url).await?;
                let m = v["members"].as_array()?.clone();
                let leaders = m.iter().filter(|x| x["role"] == "leader").count();
                let streaming = m
                    .iter()
                    // (a synchronous standby is a replica too)
                    .filter(|x| {
                        matches!(x["role"].as_str(), Some("replica" | "sync_standby"))
                            && x["state"] == "streaming"
                    })
                    .count();
                (leaders == 1 && streaming == replicas).then_some(m)
            }
        },
    )
    .await;
    members.iter().find(|m| m["role"] == "leader").unwrap()["name"]
        .as_str()
        .unwrap()
        .to_string()
}

/// Waits until an INSERT into `t` through HAProxy's primary port on `addr` succeeds.
pub async fn writes_resume_through(addr: &str, port: u16, password: &str) {
    super::cluster::eventually(
        Duration::from_secs(90),
        "writes through HAProxy resume",
        || async move {
            let c = pg(addr, port, password).await.ok()?;
            c.batch_execute("INSERT INTO t VALUES (2)").await.ok()
        },
    )
    .await;
}

/// Waits until the agent API at `api` reports a streaming replica.
pub async fn rejoined_as_streaming_replica(api: &str) {
    let url = format!("{api}/patroni");
    super::cluster::eventually(
        Duration::from_secs(120),
        "the old primary rejoins as a streaming replica",
        || {
            let url = url.clone();
            async move {
                let v = get_json(&url).await?;
                (v["role"] == "replica" && v["replication_state"] == "streaming").then_some(())
            }
        },
    )
    .await;
}

/// A lab built fresh in a new directory under /tmp: `make` gets the lab's state directory.
/// Returns the directory (keep it alive), the guard that tears the lab down, and the lab.
pub fn fresh_lab(
    prefix: &str,
    make: impl FnOnce(std::path::PathBuf) -> LabSpec,
) -> (tempfile::TempDir, LabGuard, lab::LabInfo) {
    let tmp = tempfile::Builder::new()
        .prefix(prefix)
        .tempdir_in("/tmp")
        .unwrap();
    let spec = make(tmp.path().join("lab"));
    let _ = lab::down(&spec, true);
    let guard = LabGuard(spec.clone());
    let info = lab::up(&spec).expect("lab up");
    (tmp, guard, info)
}

/// `etcdctl member list` and `endpoint health --cluster` through the host `t`.
pub async fn members(t: &dyn Transport) -> (Vec<Member>, Vec<(String, bool)>) {
    let e = "ETCDCTL_API=3 etcdctl --endpoints=http://127.0.0.1:2379 --dial-timeout=2s --command-timeout=5s";
    let list = t
        .run_ok(&format!("{e} member list -w json"), Duration::from_secs(20))
        .await
        .expect("member list")
        .stdout_str();
    let health = t
        .run(
            &format!("{e} endpoint health --cluster -w json 2>/dev/null"),
            Duration::from_secs(30),
        )
        .await
        .expect("endpoint health")
        .stdout_str();
    (
        parse_member_list(&list).expect("member list json"),
        parse_endpoint_health(&health)
            .expect("health json")
            .into_iter()
            .collect(),
    )
}

/// Names of the started voters, sorted, once every one of them is healthy.
pub async fn healthy_voters(t: &dyn Transport) -> Vec<String> {
    let (m, health) = members(t).await;
    assert!(
        m.iter().all(|m| m.started() && !m.is_learner),
        "a learner or unstarted member is left: {m:?}"
    );
    assert_eq!(health.len(), m.len(), "{health:?}");
    assert!(health.iter().all(|(_, ok)| *ok), "{health:?}");
    let mut names: Vec<String> = m.into_iter().map(|m| m.name).collect();
    names.sort();
    names
}

/// The inventory at `inv_path` and its desired state, shipping this build's agent binary.
pub fn build_spec(inv_path: &std::path::Path) -> (Inventory, DeploySpec) {
    let inv = inventory::load(inv_path).expect("inventory");
    let agent = std::path::PathBuf::from(env!("CARGO_BIN_EXE_pgherd-agent"));
    let s = spec::build_with(&inv, Some(&agent), None, None).expect("desired state");
    (inv, s)
}

/// Connects to the inventory's hosts and applies it (SSH state in `state`); the error as the
/// CLI prints it.
pub async fn apply_inventory(
    inv_path: &std::path::Path,
    state: &std::path::Path,
) -> (Fleet, Result<ApplyReport, String>) {
    apply_inventory_within(inv_path, state, Duration::from_secs(180)).await
}

/// [`apply_inventory`] with `wait` bounding each of apply's waits.
pub async fn apply_inventory_within(
    inv_path: &std::path::Path,
    state: &std::path::Path,
    wait: Duration,
) -> (Fleet, Result<ApplyReport, String>) {
    let (inv, s) = build_spec(inv_path);
    let fleet = pgherd::cli::connect(&inv, state).await.expect("connect");
    let opts = ApplyOptions {
        wait_timeout: wait,
        progress: false,
        ssh_control_dir: Some(state.to_path_buf()),
        ..Default::default()
    };
    let r = apply::apply(&s, &fleet, &opts)
        .await
        .map_err(|e| pgherd::provision::error_chain(&e));
    (fleet, r)
}

/// Writes an inventory of cluster `cluster` for the lab hosts `hosts` (name, roles), with the
/// fast profile and no watchdog.
pub fn write_lab_inventory(
    info: &lab::LabInfo,
    cluster: &str,
    path: &std::path::Path,
    hosts: &[(&str, &str)],
) {
    let mut y = format!(
        "cluster: {cluster}\nssh:\n  user: root\n  port: 22\n  identity_file: {:?}\nhosts:\n",
        info.key_path.display().to_string()
    );
    for (name, roles) in hosts {
        let h = info.host(name).unwrap();
        y.push_str(&format!(
            "  - name: {name}\n    address: {}\n    roles: {roles}\n",
            h.address
        ));
    }
    y.push_str("profile: fast\nwatchdog:\n  mode: \"off\"\n");
    std::fs::write(path, y).unwrap();
}

/// Server names of `backend` in `host`'s HAProxy (`show servers state`), sorted.
pub async fn haproxy_servers(fleet: &Fleet, host: &str, backend: &str) -> Vec<String> {
    haproxy_servers_where(fleet, host, backend, |_| true).await
}

/// The servers of `backend` that `host`'s HAProxy routes to now (operational state 2,
/// running: its health check passes), sorted.
pub async fn haproxy_servers_up(fleet: &Fleet, host: &str, backend: &str) -> Vec<String> {
    // `show servers state` columns: be_id be_name srv_id srv_name srv_addr srv_op_state ...
    haproxy_servers_where(fleet, host, backend, |cols| cols.get(5) == Some(&"2")).await
}

async fn haproxy_servers_where(
    fleet: &Fleet,
    host: &str,
    backend: &str,
    keep: impl Fn(&[&str]) -> bool,
) -> Vec<String> {
    let cmd = pgherd::provision::rolling::haproxy::haproxy_admin_command(&format!(
        "show servers state {backend}"
    ));
    let out = fleet[host]
        .run_ok(&cmd, Duration::from_secs(20))
        .await
        .expect("HAProxy admin socket")
        .stdout_str();
    let mut v: Vec<String> = out
        .lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split_whitespace().collect::<Vec<_>>())
        .filter(|cols| keep(cols))
        .filter_map(|cols| cols.get(3).map(|s| s.to_string()))
        .collect();
    v.sort();
    v
}

/// Runs `pgherd --state-dir STATE ARGS` and SIGKILLs it as soon as its progress (stderr)
/// shows `at`; returns whether it was killed there (rather than finishing first) and its
/// output.
pub fn pgherd_killed_at(state: &std::path::Path, args: &[&str], at: &str) -> (bool, String) {
    use std::io::{BufRead, BufReader};
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_pgherd"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .stdin(std::process::Stdio::null())
        .spawn()
        .expect("pgherd");
    let mut seen = String::new();
    let mut killed = false;
    for line in BufReader::new(child.stderr.take().unwrap()).lines() {
        let Ok(line) = line else { break };
        seen.push_str(&line);
        seen.push('\n');
        if line.contains(at) {
            child.kill().expect("SIGKILL pgherd");
            killed = true;
            break;
        }
    }
    let _ = child.wait();
    (killed, seen)
}

/// Runs `pgherd --state-dir STATE ARGS` to its end: whether it exited 0, and its stdout and
/// stderr.
pub fn pgherd_run(state: &std::path::Path, args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_pgherd"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .stdin(std::process::Stdio::null())
        .output()
        .expect("pgherd");
    (
        out.status.success(),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

/// The result of SQL `q` run by psql on `host` (over its transport `t`), as text.
pub async fn sql_on(s: &DeploySpec, t: &dyn Transport, host: &str, q: &str) -> String {
    let cmd = pgherd::provision::remote::psql_command(s, host, q).expect("psql command");
    t.run_ok(&cmd, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("SQL on {host}: {e}"))
        .stdout_str()
}

/// A shell check printing `agent|no-agent sup|no-sup run|no-run`: whether pgherd-agent runs,
/// its supervisor loop runs, and its run file (start at boot) exists.
pub fn agent_state_check() -> String {
    format!(
        "pgrep -x pgherd-agent >/dev/null && echo agent || echo no-agent; \
         pgrep -f '[s]upervise pgherd-agent' >/dev/null && echo sup || echo no-sup; \
         [ -e {run} ] && echo run || echo no-run",
        run = Service::Agent.run_file()
    )
}

/// A fresh plan of `s` on `fleet` is empty (a converged cluster: the re-run changes nothing).
pub async fn assert_plan_empty(s: &DeploySpec, fleet: &Fleet) {
    let plan = apply::make_plan(s, fleet).await.expect("plan");
    assert!(
        plan.is_noop(),
        "{}",
        pgherd::provision::report::render_plan(&plan, Default::default())
    );
}

/// The words `cmd` prints on the host of `t` (a state check such as [`agent_state_check`]).
pub async fn words_of(t: &dyn Transport, cmd: &str) -> Vec<String> {
    t.run_ok(cmd, Duration::from_secs(20))
        .await
        .unwrap_or_else(|e| panic!("{cmd}: {e}"))
        .stdout_str()
        .split_whitespace()
        .map(str::to_string)
        .collect()
}

/// The end of every host's agent log, for a failure's message (read over plain ssh with the
/// lab's key, independent of any connection the test may have broken).
pub fn agent_logs(info: &pgherd::lab::LabInfo) -> String {
    let mut out = String::new();
    for h in &info.hosts {
        let o = std::process::Command::new("ssh")
            .args([
                "-o",
                "StrictHostKeyChecking=no",
                "-o",
                "UserKnownHostsFile=/dev/null",
            ])
            .args(["-o", "BatchMode=yes", "-o", "ConnectTimeout=5", "-i"])
            .arg(&info.key_path)
            .arg(format!("root@{}", h.address))
            .arg("tail -n 80 /var/log/pgherd/pgherd-agent.log")
            .output();
        let text = match o {
            Ok(o) => format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            ),
            Err(e) => format!("(cannot run ssh: {e})"),
        };
        out.push_str(&format!("===== {} agent log =====\n{text}\n", h.name));
    }
    out
}
