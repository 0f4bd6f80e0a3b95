//! HA benchmark on a loopback cluster (real etcd ×3, real PostgreSQL 15, three pgherd-agents):
//! time from agents started to both replicas streaming, node-death failover, switchover
//! write-unavailability, and idle agent RSS / CPU. Not a test: it prints figures.
//!
//! Run: `cargo bench --bench ha` (as root; `PGHERD_BENCH_REPS=N` repetitions, default 3).
//! Timings: ttl 5, loop_wait 1, retry_timeout 2 (the "fast" profile).
//!
//! `cargo bench --bench ha -- etcd-soak` instead restarts etcd members one at a time
//! (`PGHERD_SOAK_RESTARTS=N`, default 20; every other one the etcd leader; SIGTERM, 1 s down,
//! start, wait until all three are healthy, 2 s to settle) with the write probe running, and
//! counts what must stay zero: demotions, failovers, PostgreSQL restarts on the primary.
//! `PGHERD_SOAK_FAULT=freeze` freezes the member instead (SIGSTOP for 3 s, then SIGCONT): its
//! sockets stay open, so calls to it hang until their own timeout rather than fail at once.
//!
//! Write probe: a new connection per attempt to all three nodes with
//! `target_session_attrs=read-write` (so it finds whoever is primary), one INSERT every 20 ms,
//! each attempt with a 1 s deadline. Write-unavailable window = from the start of the first
//! failed write to the end of the first successful one after the last failure.

#[path = "../tests/common/mod.rs"]
mod common;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use common::cluster::{Cluster, ClusterOpts, SUPERUSER_PW, eventually};
use serde_json::json;
use tokio::sync::Mutex;

struct Probe {
    log: Arc<Mutex<Vec<(Instant, Instant, bool)>>>,
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<()>,
}

fn start_probe(c: &Cluster) -> Probe {
    let ports: Vec<String> = c.nodes.iter().map(|n| n.pg_port.to_string()).collect();
    let conn = format!(
        "host={} port={} user=postgres password={SUPERUSER_PW} dbname=postgres target_session_attrs=read-write connect_timeout=1",
        vec!["127.0.0.1"; ports.len()].join(","),
        ports.join(",")
    );
    let log = Arc::new(Mutex::new(vec![]));
    let stop = Arc::new(AtomicBool::new(false));
    let (l2, s2) = (log.clone(), stop.clone());
    let task = tokio::spawn(async move {
        let mut seq = 0u64;
        while !s2.load(Ordering::Relaxed) {
            seq += 1;
            let t0 = Instant::now();
            let ok = tokio::time::timeout(Duration::from_secs(1), async {
                let (client, conn_task) = tokio_postgres::connect(&conn, tokio_postgres::NoTls)
                    .await
                    .ok()?;
                tokio::spawn(conn_task);
                client
                    .simple_query(&format!("INSERT INTO probe VALUES ({seq})"))
                    .await
                    .ok()
            })
            .await
            .ok()
            .flatten()
            .is_some();
            l2.lock().await.push((t0, Instant::now(), ok));
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    });
    Probe { log, stop, task }
}

impl Probe {
    /// Failed writes and the longest run of consecutive failures (first failure's start to
    /// the next success's end), without stopping the probe.
    async fn failures(&self) -> (usize, Duration) {
        let log = self.log.lock().await;
        let failed = log.iter().filter(|e| !e.2).count();
        let (mut longest, mut run_start) = (Duration::ZERO, None);
        for e in log.iter() {
            match (e.2, run_start) {
                (false, None) => run_start = Some(e.0),
                (true, Some(t0)) => {
                    longest = longest.max(e.1 - t0);
                    run_start = None;
                }
                _ => {}
            }
        }
        (failed, longest)
    }

    async fn finish(self) -> Option<Duration> {
        self.stop.store(true, Ordering::Relaxed);
        let _ = self.task.await;
        let log = self.log.lock().await;
        let first_fail = log.iter().position(|e| !e.2)?;
        let last_fail = log.iter().rposition(|e| !e.2)?;
        let recovered = log[last_fail..].iter().find(|e| e.2)?;
        Some(recovered.1 - log[first_fail].0)
    }
}

fn proc_rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1).and_then(|v| v.parse().ok()))
        })
        .unwrap_or(0)
}

fn proc_cpu_ticks(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .map(|s| {
            let after = s.rsplit(')').next().unwrap_or("");
            let f: Vec<&str> = after.split_whitespace().collect();
            f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
                + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
        })
        .unwrap_or(0)
}

fn median(mut v: Vec<f64>) -> String {
    if v.is_empty() {
        return "n/a".into();
    }
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    format!("{:.2} [{:.2}–{:.2}]", v[v.len() / 2], v[0], v[v.len() - 1])
}

/// Index of the etcd member that is the raft leader, by `etcdctl endpoint status`.
fn etcd_leader(c: &Cluster) -> usize {
    let out = c.etcd.etcdctl(&["endpoint", "status", "-w", "json"]);
    let v: serde_json::Value = serde_json::from_slice(&out).expect("endpoint status json");
    let rows = v.as_array().expect("endpoint status array");
    let leader = rows[0]["Status"]["leader"].as_u64().expect("leader id");
    let ep = rows
        .iter()
        .find(|r| r["Status"]["header"]["member_id"].as_u64() == Some(leader))
        .and_then(|r| r["Endpoint"].as_str())
        .expect("leader among the endpoints")
        .to_string();
    (0..c.etcd.len())
        .find(|&i| c.etcd.endpoint(i) == ep)
        .expect("leader endpoint is a member")
}

/// Lines of the agents' logs where a primary demoted itself.
fn demotions(c: &Cluster) -> usize {
    c.nodes
        .iter()
        .map(|n| {
            std::fs::read_to_string(n.log())
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains("demoted self") || l.contains("demoting self"))
                .count()
        })
        .sum()
}

/// How the soak takes an etcd member away: stopped (its clients see refused connections) or
/// frozen by SIGSTOP (its sockets stay open: calls hang until their own timeout, the harder
/// case for the agents' endpoint rotation).
#[derive(Clone, Copy, PartialEq)]
enum SoakFault {
    Restart,
    Freeze,
}

async fn etcd_soak(restarts: usize, fault: SoakFault) {
    let mut opts = ClusterOpts::new("soak", 31500);
    opts.ttl = 5;
    opts.loop_wait = 1;
    opts.retry_timeout = 2;
    let mut c = Cluster::new(opts);
    c.start_all();
    let p = c.wait_healthy(Duration::from_secs(90)).await;
    c.sql(p, "CREATE TABLE probe(id bigint)").await.unwrap();
    let postmaster = common::cluster::postmaster_pid(&c.nodes[p].data_dir());
    let demoted_before = demotions(&c);
    let probe = start_probe(&c);
    tokio::time::sleep(Duration::from_secs(2)).await;
    let mut leader_restarts = 0;
    for r in 0..restarts {
        let leader = etcd_leader(&c);
        let victim = if r % 2 == 0 {
            leader_restarts += 1;
            leader
        } else {
            (leader + 1 + (r / 2) % 2) % 3
        };
        match fault {
            SoakFault::Restart => {
                c.etcd.stop(victim);
                tokio::time::sleep(Duration::from_secs(1)).await;
                c.etcd.start_member(victim);
            }
            SoakFault::Freeze => {
                // Longer than an etcd election and a renewal attempt, shorter than the ttl.
                c.etcd.signal(victim, libc::SIGSTOP);
                tokio::time::sleep(Duration::from_secs(3)).await;
                c.etcd.signal(victim, libc::SIGCONT);
            }
        }
        c.etcd.wait_healthy(Duration::from_secs(30));
        tokio::time::sleep(Duration::from_secs(2)).await;
        let (failed, longest) = probe.failures().await;
        eprintln!(
            "{} {}: etcd{victim}{} — failed writes so far {failed}, longest {longest:?}",
            if fault == SoakFault::Freeze {
                "freeze"
            } else {
                "restart"
            },
            r + 1,
            if victim == leader { " (leader)" } else { "" },
        );
    }
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (failed, longest) = probe.failures().await;
    let now_primary = c.primary().await;
    let same_postmaster = common::cluster::postmaster_pid(&c.nodes[p].data_dir()) == postmaster;
    println!(
        "\n| etcd soak (ttl 5, loop_wait 1, retry_timeout 2): {restarts} member {}, {leader_restarts} of the leader | result |",
        if fault == SoakFault::Freeze {
            "freezes (SIGSTOP 3 s)"
        } else {
            "restarts"
        }
    );
    println!("|---|---|");
    println!("| demotions | {} |", demotions(&c) - demoted_before);
    println!(
        "| failovers | {} |",
        if now_primary == Some(p) { 0 } else { 1 }
    );
    println!(
        "| primary's PostgreSQL restarted | {} |",
        if same_postmaster { "no" } else { "yes" }
    );
    println!("| failed writes (one INSERT every 20 ms) | {failed} |");
    println!("| longest write outage | {:.2} s |", longest.as_secs_f64());
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    if std::env::args().any(|a| a == "etcd-soak") {
        let restarts = std::env::var("PGHERD_SOAK_RESTARTS")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or(20);
        let fault = if std::env::var("PGHERD_SOAK_FAULT").as_deref() == Ok("freeze") {
            SoakFault::Freeze
        } else {
            SoakFault::Restart
        };
        etcd_soak(restarts, fault).await;
        return;
    }
    let reps: usize = std::env::var("PGHERD_BENCH_REPS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let (mut boot, mut failover, mut failover_write, mut switchover, mut rss, mut cpu) =
        (vec![], vec![], vec![], vec![], vec![], vec![]);
    for rep in 0..reps {
        let mut opts = ClusterOpts::new("bench", 28000);
        opts.ttl = 5;
        opts.loop_wait = 1;
        opts.retry_timeout = 2;
        let mut c = Cluster::new(opts);
        let t0 = Instant::now();
        c.start_all();
        let p = c.wait_healthy(Duration::from_secs(90)).await;
        boot.push(t0.elapsed().as_secs_f64());
        c.sql(p, "CREATE TABLE probe(id bigint)").await.unwrap();

        // Idle footprint of each agent over 10 s.
        let pids: Vec<u32> = c
            .nodes
            .iter()
            .map(|n| n.agent.as_ref().unwrap().id())
            .collect();
        let before: Vec<u64> = pids.iter().map(|p| proc_cpu_ticks(*p)).collect();
        tokio::time::sleep(Duration::from_secs(10)).await;
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        for (i, pid) in pids.iter().enumerate() {
            rss.push(proc_rss_kib(*pid) as f64 / 1024.0);
            cpu.push((proc_cpu_ticks(*pid) - before[i]) as f64 / hz / 10.0 * 100.0);
        }

        // Switchover with the write probe running.
        let probe = start_probe(&c);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let cand = (p + 1) % 3;
        let (code, body) = c
            .call(
                p,
                "POST",
                "/switchover",
                Some(json!({"leader": c.nodes[p].name, "candidate": c.nodes[cand].name})),
            )
            .await;
        assert_eq!(code, 200, "{body}");
        tokio::time::sleep(Duration::from_secs(2)).await;
        if let Some(w) = probe.finish().await {
            switchover.push(w.as_secs_f64());
        } else {
            switchover.push(0.0);
        }
        let p = c.wait_healthy(Duration::from_secs(60)).await;

        // Node death: SIGKILL the primary's agent and postgres.
        let probe = start_probe(&c);
        tokio::time::sleep(Duration::from_millis(500)).await;
        let t_kill = Instant::now();
        c.kill_agent(p);
        c.kill_postgres(p);
        let newp = eventually(Duration::from_secs(60), "new primary", || async {
            c.primary().await.filter(|x| *x != p)
        })
        .await;
        failover.push(t_kill.elapsed().as_secs_f64());
        tokio::time::sleep(Duration::from_secs(1)).await;
        if let Some(w) = probe.finish().await {
            failover_write.push(w.as_secs_f64());
        }
        eprintln!("rep {rep}: new primary node{newp}");
    }
    println!("\n| measure (ttl 5, loop_wait 1, retry_timeout 2; {reps} reps) | median [min–max] |");
    println!("|---|---|");
    println!(
        "| agents started → primary + both replicas streaming (s) | {} |",
        median(boot)
    );
    println!(
        "| node death (SIGKILL agent+PG) → new primary's /primary 200 (s) | {} |",
        median(failover)
    );
    println!(
        "| node death: write-unavailable window (s) | {} |",
        median(failover_write)
    );
    println!(
        "| switchover: write-unavailable window (s) | {} |",
        median(switchover)
    );
    println!("| idle agent RSS (MiB) | {} |", median(rss));
    println!("| idle agent CPU (% of one core) | {} |", median(cpu));
}
