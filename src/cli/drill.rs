//! `pgherd drill`: a fault drill on a running cluster that measures what clients see. A write
//! probe opens a new connection through HAProxy's primary port and inserts one row every 50 ms
//! (a new connection each time, as a client after a failover would); the drill injects the
//! fault, waits until the cluster has a leader with every replica streaming again, and reports
//! the longest window in which no write succeeded, the new leader, and how long full recovery
//! took. A benchmark, not a test: nothing here asserts on time.
//!
//! Faults: `switchover` (planned hand-over through the REST API) and `kill-primary`: SIGKILL of
//! the leader's agent and PostgreSQL over SSH with the service manager told not to restart
//! the agent (`systemctl stop` after the kill, or the supervisor loop killed first), so the
//! leader key must expire and a replica takes over; the drill then starts the agent again and
//! waits until the old leader rejoins.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use tokio::sync::Mutex;

use super::ctl::{self, Agents};
use crate::inventory::{Inventory, Role};
use crate::provision::facts;
use crate::provision::services::{self, Service, ServiceMode, ServiceOp};
use crate::transport::Transport;

/// Which fault to inject (in JSON as on the command line: `switchover`, `kill-primary`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    Switchover,
    KillPrimary,
}

/// What the drill measured; `pgherd drill --json` prints it as one document with these
/// fields (names stable, see [`super::json`]): `fault`, `old_leader`, `new_leader`,
/// `write_unavailable_s` and `recovered_after_s` (seconds, floats), `writes_ok`,
/// `writes_failed`.
#[derive(Debug, Clone, serde::Serialize)]
pub struct DrillReport {
    pub fault: Fault,
    pub old_leader: String,
    pub new_leader: String,
    /// Longest gap between two successful writes around the fault.
    #[serde(rename = "write_unavailable_s", serialize_with = "seconds")]
    pub write_unavailable: Duration,
    /// Fault injected → leader + every replica streaming again.
    #[serde(rename = "recovered_after_s", serialize_with = "seconds")]
    pub recovered_after: Duration,
    pub writes_ok: u64,
    pub writes_failed: u64,
}

fn seconds<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(super::json::secs(*d))
}

impl std::fmt::Display for DrillReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "drill {:?}: {} → {}",
            self.fault, self.old_leader, self.new_leader
        )?;
        writeln!(
            f,
            "  write-unavailable window: {:.2} s ({} writes ok, {} failed)",
            self.write_unavailable.as_secs_f64(),
            self.writes_ok,
            self.writes_failed
        )?;
        write!(
            f,
            "  fault → leader with all replicas streaming: {:.2} s",
            self.recovered_after.as_secs_f64()
        )
    }
}

#[derive(Default)]
struct Probe {
    last_ok: Option<Instant>,
    longest_gap: Duration,
    ok: u64,
    failed: u64,
}

async fn write_once(conf: &tokio_postgres::Config) -> bool {
    let attempt = async {
        let (c, conn) = conf.connect(tokio_postgres::NoTls).await.ok()?;
        tokio::spawn(conn);
        c.batch_execute("INSERT INTO pgherd_drill(at) VALUES (clock_timestamp())")
            .await
            .ok()
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(2), attempt).await,
        Ok(Some(()))
    )
}

/// Runs `fault` against the cluster of `inv` (`state_dir`: SSH state, for `kill-primary`).
pub async fn run(
    inv: &Inventory,
    state_dir: &std::path::Path,
    fault: Fault,
    yes: bool,
) -> anyhow::Result<DrillReport> {
    let agents = Agents::new(inv)?;
    let cluster = agents.cluster().await?;
    let old_leader = ctl::leader_of(&cluster).context("the cluster has no leader")?;
    let replicas = ctl::member_count(&cluster).saturating_sub(1);
    let proxy = inv
        .hosts_with(Role::Haproxy)
        .next()
        .context("the inventory has no haproxy host to measure through")?;
    let mut conf = tokio_postgres::Config::new();
    conf.host(&proxy.address)
        .port(inv.haproxy.primary_port)
        .user("postgres")
        .password(inv.secrets.superuser.expose())
        .dbname("postgres")
        .connect_timeout(Duration::from_secs(1));
    {
        let (c, conn) = conf
            .connect(tokio_postgres::NoTls)
            .await
            .context("connecting through HAProxy's primary port")?;
        tokio::spawn(conn);
        c.batch_execute("CREATE TABLE IF NOT EXISTS pgherd_drill(at timestamptz)")
            .await?;
    }
    super::ctl::confirm(
        &format!("drill {fault:?} on leader {old_leader} (clients see a real outage)"),
        yes,
    )?;

    let probe = Arc::new(Mutex::new(Probe::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let task = {
        let probe = probe.clone();
        let stop = stop.clone();
        let conf = conf.clone();
        tokio::spawn(async move {
            while !stop.load(Ordering::Relaxed) {
                let ok = write_once(&conf).await;
                let now = Instant::now();
                let mut p = probe.lock().await;
                if ok {
                    if let Some(last) = p.last_ok {
                        p.longest_gap = p.longest_gap.max(now - last);
                    }
                    p.last_ok = Some(now);
                    p.ok += 1;
                } else {
                    p.failed += 1;
                }
                drop(p);
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        })
    };
    // A baseline of successful writes before the fault.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let t0 = Instant::now();
    // Kill-primary: the old leader's host and service mode, to start its agent again.
    let mut restore: Option<(Arc<dyn Transport>, ServiceMode)> = None;
    match fault {
        Fault::Switchover => {
            ctl::switchover(inv, None, false, true).await?;
        }
        Fault::KillPrimary => {
            let fleet = super::connect(inv, state_dir).await?;
            let t = fleet
                .get(&old_leader)
                .cloned()
                .with_context(|| format!("no SSH connection to {old_leader}"))?;
            let mode = facts::gather(t.as_ref(), &Default::default(), &Default::default())
                .await?
                .mode;
            t.run_ok(&kill_command(mode), Duration::from_secs(30))
                .await
                .with_context(|| format!("killing the agent and PostgreSQL on {old_leader}"))?;
            restore = Some((t, mode));
        }
    }
    // A leader other than the old one (switchover, or the failover after the lease expired)
    // with writes flowing again.
    let c = ctl::wait_until(&agents, "a new leader leads", |c| {
        ctl::leader_of(c).is_some_and(|l| l != old_leader)
    })
    .await?;
    let new_leader = ctl::leader_of(&c).unwrap_or_default();
    if let Some((t, mode)) = restore {
        t.run_ok(
            &services::op_command(Service::Agent, ServiceOp::Start, mode),
            Duration::from_secs(60),
        )
        .await
        .with_context(|| format!("starting the agent on {old_leader} again"))?;
    }
    ctl::wait_until(&agents, "every replica streams again", |c| {
        ctl::leader_of(c).is_some() && ctl::streaming_count(c) == replicas
    })
    .await?;
    let recovered_after = t0.elapsed();
    // Writes must have resumed before the probe stops.
    let resumed = Instant::now();
    loop {
        if probe.lock().await.last_ok.is_some_and(|l| l > t0) {
            break;
        }
        if resumed.elapsed() > Duration::from_secs(60) {
            stop.store(true, Ordering::Relaxed);
            bail!("writes through HAProxy did not resume within 60 s of recovery");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = task.await;
    let p = probe.lock().await;
    Ok(DrillReport {
        fault,
        old_leader,
        new_leader,
        write_unavailable: p.longest_gap,
        recovered_after,
        writes_ok: p.ok,
        writes_failed: p.failed,
    })
}

/// SIGKILL of the agent and PostgreSQL with no restart by the service manager: under systemd
/// the unit is killed and then stopped (it stays down), in supervisor mode the supervisor loop
/// dies first.
fn kill_command(mode: ServiceMode) -> String {
    match mode {
        ServiceMode::Systemd => "systemctl kill --signal=KILL pgherd-agent; \
             pkill -KILL -x postgres; systemctl stop pgherd-agent; exit 0"
            .to_string(),
        ServiceMode::Supervisor => format!(
            "s=$(cat {sup} 2>/dev/null); [ -n \"$s\" ] && kill -KILL \"$s\"; \
             p=$(cat {pid} 2>/dev/null); [ -n \"$p\" ] && kill -KILL \"$p\"; \
             pkill -KILL -x postgres; rm -f {sup} {pid}; exit 0",
            sup = Service::Agent.sup_file(),
            pid = Service::Agent.pid_file(),
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_drill_document_has_seconds_and_the_fault_as_typed() {
        let r = DrillReport {
            fault: Fault::KillPrimary,
            old_leader: "pg1".into(),
            new_leader: "pg2".into(),
            write_unavailable: Duration::from_millis(8_800),
            recovered_after: Duration::from_millis(12_700),
            writes_ok: 300,
            writes_failed: 4,
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({
                "fault": "kill-primary", "old_leader": "pg1", "new_leader": "pg2",
                "write_unavailable_s": 8.8, "recovered_after_s": 12.7,
                "writes_ok": 300, "writes_failed": 4
            })
        );
    }
}
