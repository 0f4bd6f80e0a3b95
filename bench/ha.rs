//! HA benchmark on a loopback cluster (real etcd ×3, real PostgreSQL 15, three pgherd-agents):
//! time from agents started to both replicas streaming, node-death failover, switchover
//! write-unavailability, and idle agent RSS / CPU. Not a test: it prints figures.
//!
//! Run: `cargo bench --bench ha` (as root; `PGHERD_BENCH_REPS=N` repetitions, default 3).
//! Timings: ttl 5, loop_wait 1, retry_timeout 2 (the "fast" profile).
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
                let (client, conn_task) =
                    tokio_postgres::connect(&conn, tokio_postgres::NoTls).await.ok()?;
                tokio::spawn(conn_task);
                client.simple_query(&format!("INSERT INTO probe VALUES ({seq})")).await.ok()
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

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let reps: usize = std::env::var("PGHERD_BENCH_REPS").ok().and_then(|s| s.parse().ok()).unwrap_or(3);
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
        let pids: Vec<u32> = c.nodes.iter().map(|n| n.agent.as_ref().unwrap().id()).collect();
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
            .call(p, "POST", "/switchover", Some(json!({"leader": c.nodes[p].name, "candidate": c.nodes[cand].name})))
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
    println!("| agents started → primary + both replicas streaming (s) | {} |", median(boot));
    println!("| node death (SIGKILL agent+PG) → new primary's /primary 200 (s) | {} |", median(failover));
    println!("| node death: write-unavailable window (s) | {} |", median(failover_write));
    println!("| switchover: write-unavailable window (s) | {} |", median(switchover));
    println!("| idle agent RSS (MiB) | {} |", median(rss));
    println!("| idle agent CPU (% of one core) | {} |", median(cpu));
}
