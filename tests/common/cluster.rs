//! End-to-end test harness: a real 3-member etcd, and N `pgherd-agent` processes (run as the
//! `postgres` user) managing real PostgreSQL 15 instances on loopback ports.
//!
//! Everything lives under one temp directory; dropping the [`Cluster`] kills agents,
//! postmasters and etcd. Ports come from `base_port`: etcd uses base+1.., PostgreSQL
//! base+101.., REST base+201...

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

use super::etcd::EtcdCluster;

pub const SUPERUSER_PW: &str = "su-pass-e2e";
pub const REPL_PW: &str = "repl-pass-e2e";
pub const API_USER: &str = "admin";
pub const API_PW: &str = "api-pass-e2e";

pub struct ClusterOpts {
    pub scope: String,
    pub nodes: usize,
    pub base_port: u16,
    pub ttl: u64,
    pub loop_wait: u64,
    pub retry_timeout: u64,
    pub synchronous_mode: bool,
    /// Extra YAML appended under `bootstrap.dcs`.
    pub extra_dcs: String,
    /// Watchdog section per node (YAML, indented at top level), e.g. "watchdog:\n  mode: off\n".
    pub watchdog: Vec<String>,
    /// Patroni-style: only `bootstrap.pg_hba` (appended to initdb's file), no
    /// `postgresql.pg_hba`.
    pub bootstrap_pg_hba_only: bool,
    /// `tags:` per node (a YAML flow map, e.g. "{nofailover: true}"); default `{}`.
    pub tags: Vec<String>,
    /// Extra lines under `postgresql:` for every node (2-space indented YAML, each line ending
    /// in a newline); `{dir}` stands for the node's directory.
    pub pg_extra: String,
}

impl ClusterOpts {
    pub fn new(scope: &str, base_port: u16) -> Self {
        ClusterOpts {
            scope: scope.to_string(),
            nodes: 3,
            base_port,
            ttl: 6,
            loop_wait: 1,
            retry_timeout: 2,
            synchronous_mode: false,
            extra_dcs: String::new(),
            watchdog: vec![],
            bootstrap_pg_hba_only: false,
            tags: vec![],
            pg_extra: String::new(),
        }
    }
}

pub struct Node {
    pub name: String,
    pub dir: PathBuf,
    pub config: PathBuf,
    pub pg_port: u16,
    pub api_port: u16,
    pub agent: Option<Child>,
}

impl Node {
    pub fn data_dir(&self) -> PathBuf {
        self.dir.join("data")
    }
    pub fn api(&self) -> String {
        format!("http://127.0.0.1:{}", self.api_port)
    }
    pub fn log(&self) -> PathBuf {
        self.dir.join("agent.log")
    }
    pub fn callback_log(&self) -> PathBuf {
        self.dir.join("callbacks.log")
    }
}

pub struct Cluster {
    pub root: tempfile::TempDir,
    pub etcd: EtcdCluster,
    pub nodes: Vec<Node>,
    pub opts: ClusterOpts,
    pub http: reqwest::Client,
}

pub fn agent_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_pgherd-agent"))
}

fn postgres_ids() -> (u32, u32) {
    let out = Command::new("id")
        .args(["-u", "postgres"])
        .output()
        .unwrap();
    let uid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    let out = Command::new("id")
        .args(["-g", "postgres"])
        .output()
        .unwrap();
    let gid = String::from_utf8_lossy(&out.stdout).trim().parse().unwrap();
    (uid, gid)
}

pub fn chown_postgres(p: &Path) {
    let st = Command::new("chown")
        .args(["-R", "postgres:postgres"])
        .arg(p)
        .status()
        .unwrap();
    assert!(st.success());
}

impl Cluster {
    /// Starts etcd and writes the node configs; agents are started with [`Cluster::start_agent`].
    pub fn new(opts: ClusterOpts) -> Cluster {
        let root = tempfile::Builder::new()
            .prefix("pgherd-e2e-")
            .tempdir_in("/tmp")
            .unwrap();
        std::fs::set_permissions(
            root.path(),
            std::os::unix::fs::PermissionsExt::from_mode(0o755),
        )
        .unwrap();
        let etcd = EtcdCluster::start(3, opts.base_port);
        let hosts: Vec<String> = etcd
            .endpoints()
            .iter()
            .map(|e| e.trim_start_matches("http://").to_string())
            .collect();
        let mut nodes = vec![];
        for i in 0..opts.nodes {
            let name = format!("node{i}");
            let dir = root.path().join(&name);
            std::fs::create_dir_all(&dir).unwrap();
            let pg_port = opts.base_port + 101 + i as u16;
            let api_port = opts.base_port + 201 + i as u16;
            let cb = dir.join("callbacks.log");
            let script = dir.join("callback.sh");
            std::fs::write(
                &script,
                format!(
                    "#!/bin/sh\necho \"$0 $*\" | sed 's|^.*/callback.sh|callback.sh|' >> {}\n",
                    cb.display()
                ),
            )
            .unwrap();
            std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
                .unwrap();
            let watchdog = opts
                .watchdog
                .get(i)
                .cloned()
                .unwrap_or_else(|| "watchdog:\n  mode: off\n".to_string());
            let config = format!(
                r#"scope: {scope}
namespace: /service/
name: {name}
restapi:
  listen: 127.0.0.1:{api_port}
  connect_address: 127.0.0.1:{api_port}
  authentication:
    username: {API_USER}
    password: {API_PW}
etcd3:
  hosts: [{hosts}]
log:
  level: info
bootstrap:
  dcs:
    ttl: {ttl}
    loop_wait: {loop_wait}
    retry_timeout: {retry}
    maximum_lag_on_failover: 1048576
    synchronous_mode: {sync}
    postgresql:
      use_pg_rewind: true
      use_slots: true
      parameters:
        max_connections: 50
        shared_buffers: 16MB
        wal_keep_size: 64MB
{extra_dcs}  initdb:
    - encoding: UTF8
    - data-checksums
{bootstrap_hba}postgresql:
  listen: 127.0.0.1:{pg_port}
  connect_address: 127.0.0.1:{pg_port}
  data_dir: {data}
  bin_dir: /usr/lib/postgresql/15/bin
  socket_dir: {dir}
  authentication:
    superuser: {{username: postgres, password: {SUPERUSER_PW}}}
    replication: {{username: replicator, password: {REPL_PW}}}
    rewind: {{username: rewind_user, password: rewind-pass-e2e}}
{local_hba}  callbacks:
    on_start: {script}
    on_stop: {script}
    on_restart: {script}
    on_reload: {script}
    on_role_change: {script}
  use_pg_rewind: true
  use_slots: true
{pg_extra}{watchdog}tags: {tags}
"#,
                pg_extra = opts.pg_extra.replace("{dir}", &dir.display().to_string()),
                tags = opts.tags.get(i).map(String::as_str).unwrap_or("{}"),
                scope = opts.scope,
                hosts = hosts.join(", "),
                ttl = opts.ttl,
                loop_wait = opts.loop_wait,
                retry = opts.retry_timeout,
                sync = opts.synchronous_mode,
                extra_dcs = opts.extra_dcs,
                data = dir.join("data").display(),
                dir = dir.display(),
                script = script.display(),
                bootstrap_hba = if opts.bootstrap_pg_hba_only {
                    "  pg_hba:\n    - host replication replicator 127.0.0.1/32 md5\n    - host all all 127.0.0.1/32 md5\n"
                } else {
                    ""
                },
                local_hba = if opts.bootstrap_pg_hba_only {
                    ""
                } else {
                    "  pg_hba:\n    - local all all trust\n    - host all all 127.0.0.1/32 md5\n    - host replication replicator 127.0.0.1/32 md5\n"
                },
            );
            let config_path = dir.join("agent.yml");
            std::fs::write(&config_path, config).unwrap();
            nodes.push(Node {
                name,
                dir,
                config: config_path,
                pg_port,
                api_port,
                agent: None,
            });
        }
        chown_postgres(root.path());
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .unwrap();
        Cluster {
            root,
            etcd,
            nodes,
            opts,
            http,
        }
    }

    /// Starts node `i`'s agent as the postgres user, logging to `<dir>/agent.log`.
    pub fn start_agent(&mut self, i: usize) {
        let (uid, gid) = postgres_ids();
        let node = &mut self.nodes[i];
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(node.log())
            .unwrap();
        let child = std::os::unix::process::CommandExt::uid(
            std::os::unix::process::CommandExt::gid(
                Command::new(agent_bin())
                    .arg(&node.config)
                    .env("RUST_LOG", "info,pgherd=debug")
                    .stdin(Stdio::null())
                    .stdout(log.try_clone().unwrap())
                    .stderr(log),
                gid,
            ),
            uid,
        )
        .spawn()
        .unwrap();
        node.agent = Some(child);
    }

    pub fn start_all(&mut self) {
        for i in 0..self.nodes.len() {
            self.start_agent(i);
        }
    }

    /// SIGKILLs node `i`'s agent (PostgreSQL keeps running).
    pub fn kill_agent(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].agent.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGTERMs node `i`'s agent and waits for it to exit.
    pub fn stop_agent(&mut self, i: usize) {
        if let Some(mut c) = self.nodes[i].agent.take() {
            unsafe { libc::kill(c.id() as i32, libc::SIGTERM) };
            let deadline = Instant::now() + Duration::from_secs(30);
            while Instant::now() < deadline {
                if let Ok(Some(_)) = c.try_wait() {
                    return;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGKILLs the postmaster of node `i` and all its children.
    pub fn kill_postgres(&self, i: usize) {
        if let Some(pid) = postmaster_pid(&self.nodes[i].data_dir()) {
            let _ = Command::new("pkill")
                .args(["-9", "-P", &pid.to_string()])
                .status();
            unsafe { libc::kill(pid, libc::SIGKILL) };
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && unsafe { libc::kill(pid, 0) } == 0 {
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub async fn get(&self, i: usize, path: &str) -> Option<(u16, Value)> {
        let r = self
            .http
            .get(format!("{}{}", self.nodes[i].api(), path))
            .send()
            .await
            .ok()?;
        let code = r.status().as_u16();
        let text = r.text().await.ok()?;
        Some((
            code,
            serde_json::from_str(&text).unwrap_or(Value::String(text)),
        ))
    }

    pub async fn code(&self, i: usize, method: &str, path: &str) -> Option<u16> {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let r = self
            .http
            .request(m, format!("{}{}", self.nodes[i].api(), path))
            .send()
            .await
            .ok()?;
        Some(r.status().as_u16())
    }

    /// An authenticated mutating request; returns (code, body text).
    pub async fn call(
        &self,
        i: usize,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> (u16, String) {
        let m = reqwest::Method::from_bytes(method.as_bytes()).unwrap();
        let mut rq = self
            .http
            .request(m, format!("{}{}", self.nodes[i].api(), path))
            .basic_auth(API_USER, Some(API_PW))
            .timeout(Duration::from_secs(40));
        if let Some(b) = body {
            rq = rq.json(&b);
        }
        match rq.send().await {
            Ok(r) => {
                let c = r.status().as_u16();
                (c, r.text().await.unwrap_or_default())
            }
            Err(e) => (0, e.to_string()),
        }
    }

    /// Index of the node whose `/primary` answers 200, if exactly one does.
    pub async fn primary(&self) -> Option<usize> {
        let mut found = vec![];
        for i in 0..self.nodes.len() {
            if self.nodes[i].agent.is_some() && self.code(i, "GET", "/primary").await == Some(200) {
                found.push(i);
            }
        }
        (found.len() == 1).then(|| found[0])
    }

    /// Nodes streaming from the primary per its `/patroni` `replication` list. Only the
    /// cluster's own members count: a clone in progress shows up there too, as a streaming
    /// `pg_basebackup` WAL sender, and counting it would call a cluster healthy whose replicas
    /// have no data yet.
    pub async fn streaming_replicas(&self, primary: usize) -> Vec<String> {
        let Some((200, v)) = self.get(primary, "/patroni").await else {
            return vec![];
        };
        v["replication"]
            .as_array()
            .map(|a| {
                a.iter()
                    .filter(|r| r["state"] == "streaming")
                    .filter_map(|r| r["application_name"].as_str().map(str::to_string))
                    .filter(|n| self.nodes.iter().any(|node| node.name == *n))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Waits until one primary and all other running agents stream from it.
    pub async fn wait_healthy(&self, timeout: Duration) -> usize {
        let t0 = Instant::now();
        loop {
            if let Some(p) = self.primary().await {
                let want = self.nodes.iter().filter(|n| n.agent.is_some()).count() - 1;
                if self.streaming_replicas(p).await.len() >= want {
                    return p;
                }
            }
            if t0.elapsed() > timeout {
                self.dump_logs();
                panic!("cluster not healthy after {timeout:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub async fn sql(&self, i: usize, query: &str) -> Result<Vec<tokio_postgres::Row>, String> {
        let conn = format!(
            "host=127.0.0.1 port={} user=postgres password={SUPERUSER_PW} dbname=postgres connect_timeout=3",
            self.nodes[i].pg_port
        );
        let (client, c) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(c);
        client
            .simple_query(query)
            .await
            .map_err(|e| e.to_string())?;
        let _ = &client;
        Ok(vec![])
    }

    pub async fn query_one_i64(&self, i: usize, query: &str) -> Result<i64, String> {
        let conn = format!(
            "host=127.0.0.1 port={} user=postgres password={SUPERUSER_PW} dbname=postgres connect_timeout=3",
            self.nodes[i].pg_port
        );
        let (client, c) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(c);
        let row = client
            .query_one(query, &[])
            .await
            .map_err(|e| e.to_string())?;
        Ok(row.get::<_, i64>(0))
    }

    pub fn dump_logs(&self) {
        for n in &self.nodes {
            let log = std::fs::read_to_string(n.log()).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(60).collect();
            eprintln!("===== {} agent log (last 60 lines) =====", n.name);
            for l in tail.iter().rev() {
                eprintln!("{l}");
            }
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for i in 0..self.nodes.len() {
            self.kill_agent(i);
            self.kill_postgres(i);
            // The agents' fence processes (their own sessions: they outlive the agents on
            // purpose) go too, before the directory they write in is removed.
            let mut pid_file = self.nodes[i].data_dir().into_os_string();
            pid_file.push(".fence.pid");
            if let Some(pid) = std::fs::read_to_string(pid_file)
                .ok()
                .and_then(|p| p.trim().parse::<i32>().ok())
            {
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

/// Runs PostgreSQL 15's `pg_ctl -D <node i's data dir> <args>` as the postgres user, bypassing
/// the agent (to stage faults such as a divergent write); `true` on success.
pub fn pg_ctl_as_postgres(node: &Node, args: &[&str]) -> bool {
    Command::new("runuser")
        .args([
            "-u",
            "postgres",
            "--",
            "/usr/lib/postgresql/15/bin/pg_ctl",
            "-D",
        ])
        .arg(node.data_dir())
        .args(args)
        .status()
        .is_ok_and(|s| s.success())
}

pub fn postmaster_pid(data_dir: &Path) -> Option<i32> {
    let s = std::fs::read_to_string(data_dir.join("postmaster.pid")).ok()?;
    let pid: i32 = s.lines().next()?.trim().parse().ok()?;
    (unsafe { libc::kill(pid, 0) } == 0).then_some(pid)
}

/// Polls `f` every 100 ms until it returns `Some`, or panics after `timeout` with `what`.
pub async fn eventually<T, F, Fut>(timeout: Duration, what: &str, mut f: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let t0 = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        if t0.elapsed() > timeout {
            panic!("timed out after {timeout:?} waiting for: {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}
