//! Test helper: a real etcd cluster (1 or 3 members, `/usr/bin/etcd`) on loopback ports in a
//! temporary directory. Members can be stopped, killed and restarted; everything is killed on
//! Drop so a failing test leaves no process behind.
//!
//! Ports: member `i` listens for clients on `base_port + 2*i` and for peers on
//! `base_port + 2*i + 1`, so an `n`-member cluster uses `2*n` ports from `base_port`.
//!
//! Use from a test file with `#[path = "common/etcd.rs"] mod etcd_cluster;` (or from a
//! `common/mod.rs` with `pub mod etcd;`).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const ETCD: &str = "/usr/bin/etcd";
const ETCDCTL: &str = "/usr/bin/etcdctl";

/// A running (or partly stopped) etcd cluster owned by a test.
pub struct EtcdCluster {
    dir: tempfile::TempDir,
    base_port: u16,
    procs: Vec<Option<Child>>,
}

impl EtcdCluster {
    /// Starts `n` members and waits (up to 20 s) until every one reports healthy.
    /// Panics on failure: this is test scaffolding.
    pub fn start(n: usize, base_port: u16) -> EtcdCluster {
        assert!(n >= 1, "an etcd cluster needs at least one member");
        // Data on tmpfs when available: etcd fsyncs every write and the box is shared.
        let dir = if std::path::Path::new("/dev/shm").is_dir() {
            tempfile::Builder::new()
                .prefix("pgherd-etcd-")
                .tempdir_in("/dev/shm")
        } else {
            tempfile::Builder::new().prefix("pgherd-etcd-").tempdir()
        }
        .expect("create etcd temp dir");
        let mut c = EtcdCluster {
            dir,
            base_port,
            procs: (0..n).map(|_| None).collect(),
        };
        for i in 0..n {
            c.spawn(i);
        }
        c.wait_healthy(Duration::from_secs(20));
        c
    }

    pub fn len(&self) -> usize {
        self.procs.len()
    }

    fn client_port(&self, i: usize) -> u16 {
        self.base_port + 2 * i as u16
    }

    fn peer_port(&self, i: usize) -> u16 {
        self.base_port + 2 * i as u16 + 1
    }

    fn name(i: usize) -> String {
        format!("etcd{i}")
    }

    /// Client URL of member `i` (`http://127.0.0.1:<port>`).
    pub fn endpoint(&self, i: usize) -> String {
        format!("http://127.0.0.1:{}", self.client_port(i))
    }

    /// Client URLs of every member, running or not.
    pub fn endpoints(&self) -> Vec<String> {
        (0..self.len()).map(|i| self.endpoint(i)).collect()
    }

    fn data_dir(&self, i: usize) -> PathBuf {
        self.dir.path().join(Self::name(i))
    }

    fn spawn(&mut self, i: usize) {
        assert!(self.procs[i].is_none(), "etcd member {i} already running");
        let initial_cluster: Vec<String> = (0..self.len())
            .map(|j| format!("{}=http://127.0.0.1:{}", Self::name(j), self.peer_port(j)))
            .collect();
        let log = std::fs::File::create(self.dir.path().join(format!("{}.log", Self::name(i))))
            .expect("create etcd log");
        let child = Command::new(ETCD)
            .arg("--name")
            .arg(Self::name(i))
            .arg("--data-dir")
            .arg(self.data_dir(i))
            .arg("--listen-client-urls")
            .arg(self.endpoint(i))
            .arg("--advertise-client-urls")
            .arg(self.endpoint(i))
            .arg("--listen-peer-urls")
            .arg(format!("http://127.0.0.1:{}", self.peer_port(i)))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("http://127.0.0.1:{}", self.peer_port(i)))
            .arg("--initial-cluster")
            .arg(initial_cluster.join(","))
            .arg("--initial-cluster-token")
            .arg(format!("pgherd-test-{}", self.base_port))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--log-level")
            .arg("warn")
            .arg("--logger")
            .arg("zap")
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup log"))
            .stderr(log)
            .spawn()
            .expect("spawn /usr/bin/etcd");
        self.procs[i] = Some(child);
    }

    /// Asks member `i` for `/health` (true only when it sees a raft leader).
    pub fn is_healthy(&self, i: usize) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(
            &format!("127.0.0.1:{}", self.client_port(i))
                .parse()
                .unwrap(),
            Duration::from_millis(300),
        ) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(1000)));
        if s.write_all(b"GET /health HTTP/1.0\r\nHost: 127.0.0.1\r\n\r\n")
            .is_err()
        {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// Waits until every running member is healthy. Panics after `timeout`.
    pub fn wait_healthy(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        loop {
            let running: Vec<usize> = (0..self.len())
                .filter(|&i| self.procs[i].is_some())
                .collect();
            if running.iter().all(|&i| self.is_healthy(i)) {
                return;
            }
            if Instant::now() > deadline {
                let logs: Vec<String> = running
                    .iter()
                    .map(|&i| {
                        std::fs::read_to_string(
                            self.dir.path().join(format!("{}.log", Self::name(i))),
                        )
                        .unwrap_or_default()
                    })
                    .collect();
                panic!(
                    "etcd cluster not healthy after {timeout:?}; logs:\n{}",
                    logs.join("\n")
                );
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// SIGKILLs member `i` (a crash: no graceful leader transfer).
    pub fn kill(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// SIGSTOPs member `i`: it keeps its sockets open but answers nothing (a hung node or a
    /// silent network partition). Undo with [`EtcdCluster::thaw`]; Drop kills it anyway.
    pub fn freeze(&self, i: usize) {
        if let Some(c) = &self.procs[i] {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGSTOP);
            }
        }
    }

    /// SIGCONTs a member frozen by [`EtcdCluster::freeze`].
    pub fn thaw(&self, i: usize) {
        if let Some(c) = &self.procs[i] {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGCONT);
            }
        }
    }

    /// SIGTERMs member `i` and waits for it to exit (SIGKILL after 5 s).
    /// Sends `sig` to member `i`'s process (SIGSTOP freezes it with its sockets open: clients
    /// see hanging calls, not refused ones; SIGCONT resumes it).
    pub fn signal(&self, i: usize, sig: i32) {
        if let Some(c) = &self.procs[i] {
            unsafe {
                libc::kill(c.id() as i32, sig);
            }
        }
    }

    pub fn stop(&mut self, i: usize) {
        if let Some(mut c) = self.procs[i].take() {
            unsafe {
                libc::kill(c.id() as i32, libc::SIGTERM);
            }
            let deadline = Instant::now() + Duration::from_secs(5);
            loop {
                if let Ok(Some(_)) = c.try_wait() {
                    break;
                }
                if Instant::now() > deadline {
                    let _ = c.kill();
                    let _ = c.wait();
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    /// Restarts member `i` from its existing data dir (does not wait for health).
    pub fn start_member(&mut self, i: usize) {
        self.spawn(i);
    }

    /// Stops every member.
    pub fn stop_all(&mut self) {
        for i in 0..self.len() {
            self.stop(i);
        }
    }

    /// Starts every stopped member and waits until the cluster is healthy again.
    pub fn start_all(&mut self) {
        for i in 0..self.len() {
            if self.procs[i].is_none() {
                self.spawn(i);
            }
        }
        self.wait_healthy(Duration::from_secs(20));
    }

    /// Runs `etcdctl` (API v3) against the running members; returns stdout. Panics on failure.
    pub fn etcdctl(&self, args: &[&str]) -> Vec<u8> {
        let eps: Vec<String> = (0..self.len())
            .filter(|&i| self.procs[i].is_some())
            .map(|i| self.endpoint(i))
            .collect();
        let out = Command::new(ETCDCTL)
            .env("ETCDCTL_API", "3")
            .arg(format!("--endpoints={}", eps.join(",")))
            .args(args)
            .output()
            .expect("run etcdctl");
        assert!(
            out.status.success(),
            "etcdctl {args:?} failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// Raw value of `key` as `etcdctl get --print-value-only` prints it (None if absent).
    pub fn raw_get(&self, key: &str) -> Option<Vec<u8>> {
        let mut out = self.etcdctl(&["get", "--print-value-only", key]);
        if out.is_empty() {
            return None;
        }
        // etcdctl terminates the value with one newline.
        if out.last() == Some(&b'\n') {
            out.pop();
        }
        Some(out)
    }
}

impl Drop for EtcdCluster {
    fn drop(&mut self) {
        for c in self.procs.iter_mut().filter_map(Option::take) {
            let mut c = c;
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}
