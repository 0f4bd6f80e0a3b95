//! `pgherd drill`: fault drills on a running cluster that measure what clients see and check
//! what must never happen. Each round injects one fault ([`faults::Fault`]: the seed failure
//! model — kill-pg, kill-agent, freeze-agent, the leader host's crash, replica-crash,
//! isolate-primary, etcd-minority, etcd-majority, sync-standby-crash, or a switchover) while
//! [`probes`] write through HAProxy and directly to every node, undoes it once it has had its
//! effect, waits until the cluster has a leader with every replica streaming again, and
//! reports ([`verdict`]):
//! - the write-unavailable window through HAProxy (a benchmark figure: nothing asserts on it);
//! - acknowledged writes the final leader does not have (a failure in synchronous mode);
//! - any instant two nodes took writes (always a failure);
//! - the time to reconverge (a failure when it does not within the bound).
//!
//! `--rounds N --seed S` repeats it with faults drawn from [`Fault::RANDOM`] (or the named
//! fault N times); the same seed draws the same faults and targets. The command exits
//! non-zero when a round failed. Direct writers connect from the admin host, so every node's
//! pg_hba must admit it (the lab inventories do).

pub mod faults;
pub mod probes;
pub mod verdict;

use std::collections::BTreeSet;
use std::sync::Arc;
use std::sync::atomic::AtomicI64;
use std::time::{Duration, Instant};

use anyhow::{Context, bail};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::Value;

pub use faults::Fault;

use super::ctl;
use crate::api::docs::ClusterDoc;
use crate::inventory::{Inventory, Role};
use crate::provision::agent_client::AgentClient;
use crate::provision::facts;
use crate::provision::services::{self, Service, ServiceMode, ServiceOp};
use crate::transport::Transport;
use verdict::Overlap;

/// How long a fault that does not move the leader (a replica's crash, etcd members down) is
/// left in place before it is undone, unless `--hold` says otherwise. Why 15 s: longer than
/// the fast profile's ttl (10 s) and every profile's retry_timeout, so a leader that wrongly
/// depended on the lost part would have demoted by then, yet short enough for CI.
pub const DEFAULT_HOLD: Duration = Duration::from_secs(15);
/// How long writes through HAProxy may take to resume after the cluster reconverged.
const RESUME_TIMEOUT: Duration = Duration::from_secs(60);
/// Writes before the fault, so the window has a "before".
const BASELINE: Duration = Duration::from_secs(1);
/// Writes after reconvergence, so rows acknowledged at the very end are checked too.
const TAIL: Duration = Duration::from_secs(1);

/// What to run.
#[derive(Debug, Clone)]
pub struct DrillOptions {
    /// The fault of every round; `None`: drawn from [`Fault::RANDOM`].
    pub fault: Option<Fault>,
    pub rounds: u32,
    pub seed: u64,
    pub hold: Duration,
    pub yes: bool,
}

/// One round; `pgherd drill --json` prints these under `rounds` (field names stable, see
/// [`super::json`]). `target` is the host the fault hit (several for etcd-majority, comma
/// separated); `lost` lists up to 20 of the lost ids, `lost_count` counts them all.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RoundReport {
    pub round: u32,
    pub fault: Fault,
    pub target: String,
    pub old_leader: String,
    pub new_leader: Option<String>,
    /// Longest gap between acknowledged writes through HAProxy, from the fault on.
    pub write_unavailable_s: Option<f64>,
    pub writes_ok: u64,
    pub writes_failed: u64,
    pub acknowledged: u64,
    pub lost_count: u64,
    pub lost: Vec<i64>,
    pub two_primaries: Option<Overlap>,
    /// Fault injected → leader with every replica streaming (and writes flowing) again.
    pub reconverged_after_s: Option<f64>,
    /// Why the round could not finish (the cluster did not reconverge, a command failed).
    pub error: Option<String>,
}

/// The whole drill: `seed`, `synchronous_mode`, `rounds`, and `ok` (no round failed).
#[derive(Debug, Clone, serde::Serialize)]
pub struct DrillReport {
    pub seed: u64,
    pub synchronous_mode: bool,
    pub rounds: Vec<RoundReport>,
    pub ok: bool,
}

impl RoundReport {
    /// Why this round failed, if it did: lost writes count only where synchronous mode
    /// promises none (an asynchronous failover may lose up to maximum_lag_on_failover).
    pub fn failure(&self, synchronous_mode: bool) -> Option<String> {
        if let Some(e) = &self.error {
            return Some(e.clone());
        }
        if let Some(o) = &self.two_primaries {
            return Some(format!(
                "two writable primaries: {} took a write at {:.3} after {} had",
                o.again, o.at, o.other
            ));
        }
        if synchronous_mode && self.lost_count > 0 {
            return Some(format!(
                "{} acknowledged writes lost in synchronous mode",
                self.lost_count
            ));
        }
        None
    }
}

impl std::fmt::Display for DrillReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for r in &self.rounds {
            let fault = serde_json::to_value(r.fault).unwrap_or(Value::Null);
            writeln!(
                f,
                "round {} {} on {}: {} → {}",
                r.round,
                fault.as_str().unwrap_or("?"),
                r.target,
                r.old_leader,
                r.new_leader.as_deref().unwrap_or("(none)")
            )?;
            match r.write_unavailable_s {
                Some(w) => writeln!(
                    f,
                    "  write-unavailable window: {w:.2} s ({} writes ok, {} failed)",
                    r.writes_ok, r.writes_failed
                )?,
                None => writeln!(f, "  no write through HAProxy succeeded after the fault")?,
            }
            writeln!(
                f,
                "  acknowledged writes lost: {} of {}{}",
                r.lost_count,
                r.acknowledged,
                if r.lost.is_empty() {
                    String::new()
                } else {
                    format!(" (ids {:?})", r.lost)
                }
            )?;
            match &r.two_primaries {
                None => writeln!(f, "  two writable primaries: never")?,
                Some(o) => writeln!(
                    f,
                    "  TWO WRITABLE PRIMARIES: {} took a write at {:.3} after {} had",
                    o.again, o.at, o.other
                )?,
            }
            match (r.reconverged_after_s, &r.error) {
                (Some(s), _) => writeln!(f, "  fault → reconverged: {s:.2} s")?,
                (None, Some(e)) => writeln!(f, "  did not finish: {e}")?,
                (None, None) => {}
            }
        }
        write!(
            f,
            "{} round(s), seed {}, synchronous_mode {}: {}",
            self.rounds.len(),
            self.seed,
            self.synchronous_mode,
            if self.ok { "passed" } else { "FAILED" }
        )
    }
}

/// The connections of a drill: through HAProxy, and to each node directly.
struct Conns {
    probe: tokio_postgres::Config,
    direct: Vec<probes::Target>,
}

fn conns(inv: &Inventory) -> anyhow::Result<Conns> {
    let password = inv.secrets.superuser.expose();
    let mut probe = tokio_postgres::Config::new();
    let mut any = false;
    for h in inv.hosts_with(Role::Haproxy) {
        probe.host(&h.address);
        any = true;
    }
    if !any {
        bail!("the inventory has no haproxy host to measure through");
    }
    probe
        .port(inv.haproxy.primary_port)
        .user("postgres")
        .password(password)
        .dbname("postgres")
        .target_session_attrs(tokio_postgres::config::TargetSessionAttrs::ReadWrite)
        .connect_timeout(Duration::from_secs(1));
    let direct = inv
        .hosts_with(Role::Postgres)
        .map(|h| {
            let mut c = tokio_postgres::Config::new();
            c.host(&h.address)
                .port(inv.postgresql.port)
                .user("postgres")
                .password(password)
                .dbname("postgres")
                .connect_timeout(Duration::from_secs(1));
            (h.name.as_str().to_string(), c)
        })
        .collect();
    Ok(Conns { probe, direct })
}

/// Runs the drill against the cluster of `inv` (`state_dir`: SSH state).
pub async fn run(
    inv: &Inventory,
    state_dir: &std::path::Path,
    opts: &DrillOptions,
) -> anyhow::Result<DrillReport> {
    let agents = AgentClient::for_inventory(inv);
    let cluster = agents.cluster().await?;
    let leader = cluster.leader_name().context("the cluster has no leader")?;
    let c = conns(inv)?;
    {
        let (client, conn) = c
            .probe
            .connect(tokio_postgres::NoTls)
            .await
            .context("connecting through HAProxy's primary port")?;
        tokio::spawn(conn);
        client.batch_execute(probes::TABLE_DDL).await?;
    }
    let what = match opts.fault {
        Some(f) => format!("{} round(s) of {f:?}", opts.rounds),
        None => format!(
            "{} round(s) of random faults (seed {})",
            opts.rounds, opts.seed
        ),
    };
    ctl::confirm(
        &format!("drill: {what} on the cluster led by {leader} (clients see real outages)"),
        opts.yes,
    )?;
    let needs_ssh = opts.fault != Some(Fault::Switchover);
    let fleet = if needs_ssh {
        Some(super::connect(inv, state_dir).await?)
    } else {
        None
    };
    // Unique ids for this run: the millisecond clock, shifted past any earlier run's ids.
    let base = (std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0))
        << 20;
    let next_id = Arc::new(AtomicI64::new(base));
    let mut rng = StdRng::seed_from_u64(opts.seed);
    let mut rounds = Vec::new();
    for round in 1..=opts.rounds {
        let fault = opts
            .fault
            .unwrap_or_else(|| Fault::RANDOM[rng.random_range(0..Fault::RANDOM.len())]);
        let ctx = RoundCtx {
            inv,
            agents: &agents,
            fleet: fleet.as_ref(),
            conns: &c,
            next_id: next_id.clone(),
            hold: opts.hold,
        };
        let r = ctx.run(round, fault, &mut rng).await;
        let stop = r.error.is_some();
        rounds.push(r);
        if stop {
            // The cluster is in an unknown state: another fault would prove nothing.
            break;
        }
    }
    let ok = rounds.len() == opts.rounds as usize
        && rounds
            .iter()
            .all(|r| r.failure(inv.synchronous_mode).is_none());
    Ok(DrillReport {
        seed: opts.seed,
        synchronous_mode: inv.synchronous_mode,
        rounds,
        ok,
    })
}

struct RoundCtx<'a> {
    inv: &'a Inventory,
    agents: &'a AgentClient,
    fleet: Option<&'a super::Fleet>,
    conns: &'a Conns,
    next_id: Arc<AtomicI64>,
    hold: Duration,
}

/// How to undo a fault on a host.
struct Undo {
    host: String,
    command: String,
}

impl RoundCtx<'_> {
    fn host(&self, name: &str) -> anyhow::Result<Arc<dyn Transport>> {
        self.fleet
            .and_then(|f| f.get(name).cloned())
            .with_context(|| format!("no SSH connection to {name}"))
    }

    async fn mode(&self, name: &str) -> anyhow::Result<ServiceMode> {
        let t = self.host(name)?;
        Ok(
            facts::gather(t.as_ref(), &Default::default(), &Default::default())
                .await
                .with_context(|| format!("reading the service mode of {name}"))?
                .mode,
        )
    }

    async fn on(&self, host: &str, cmd: &str, what: &str) -> anyhow::Result<()> {
        self.host(host)?
            .run_ok(cmd, Duration::from_secs(60))
            .await
            .with_context(|| format!("{what} on {host}"))?;
        Ok(())
    }

    async fn run(&self, round: u32, fault: Fault, rng: &mut StdRng) -> RoundReport {
        let mut report = RoundReport {
            round,
            fault,
            target: String::new(),
            old_leader: String::new(),
            new_leader: None,
            write_unavailable_s: None,
            writes_ok: 0,
            writes_failed: 0,
            acknowledged: 0,
            lost_count: 0,
            lost: vec![],
            two_primaries: None,
            reconverged_after_s: None,
            error: None,
        };
        let writers = probes::Writers::start(
            self.conns.probe.clone(),
            self.conns.direct.clone(),
            self.next_id.clone(),
        );
        let outcome = self.fault_and_recover(fault, rng, &mut report).await;
        tokio::time::sleep(TAIL).await;
        let rec = writers.stop().await;
        let rec = std::mem::take(&mut *rec.lock().unwrap_or_else(|p| p.into_inner()));
        report.writes_ok = rec.probe_ok.len() as u64;
        report.writes_failed = rec.probe_failed;
        report.acknowledged = rec.acked.len() as u64;
        report.two_primaries = verdict::two_primaries(&rec.direct);
        match outcome {
            Ok(t0) => {
                report.write_unavailable_s =
                    verdict::write_unavailable(&rec.probe_ok, t0).map(|d| d.as_secs_f64());
                match self.present(&rec.acked).await {
                    Ok(present) => {
                        let lost = verdict::lost(&rec.acked, &present);
                        report.lost_count = lost.len() as u64;
                        report.lost = lost.into_iter().take(20).collect();
                    }
                    Err(e) => report.error = Some(format!("reading back the writes: {e:#}")),
                }
            }
            Err(e) => report.error = Some(format!("{e:#}")),
        }
        report
    }

    /// The acknowledged ids the leader has (read through HAProxy, i.e. from the leader).
    async fn present(&self, acked: &[i64]) -> anyhow::Result<BTreeSet<i64>> {
        let (Some(lo), Some(hi)) = (acked.iter().min(), acked.iter().max()) else {
            return Ok(BTreeSet::new());
        };
        let (client, conn) = self.conns.probe.connect(tokio_postgres::NoTls).await?;
        tokio::spawn(conn);
        let rows = client
            .query(
                "SELECT id FROM pgherd_drill_writes WHERE id BETWEEN $1 AND $2",
                &[lo, hi],
            )
            .await?;
        Ok(rows.iter().map(|r| r.get::<_, i64>(0)).collect())
    }

    /// Injects `fault`, waits for its effect, undoes it and waits until the cluster
    /// reconverged. Returns when the fault was injected.
    async fn fault_and_recover(
        &self,
        fault: Fault,
        rng: &mut StdRng,
        report: &mut RoundReport,
    ) -> anyhow::Result<Instant> {
        let sync = self.inv.synchronous_mode;
        // Start from a settled cluster: in synchronous mode that includes a named synchronous
        // standby — without one, no replica may be promoted (it could lack acknowledged
        // commits), so a leader fault right after the previous round would find none.
        let replicas = member_names(&self.agents.cluster().await?)
            .len()
            .saturating_sub(1);
        let cluster = ctl::wait_until(self.agents, "the cluster is settled", |c| {
            settled(c, replicas, sync)
        })
        .await?;
        let leader = cluster.leader_name().context("the cluster has no leader")?;
        let members = member_names(&cluster);
        report.old_leader = leader.clone();
        tokio::time::sleep(BASELINE).await;
        let mut undo: Vec<Undo> = Vec::new();
        let t0;
        match fault {
            Fault::Switchover => {
                report.target = leader.clone();
                t0 = Instant::now();
                ctl::switchover(self.inv, None, false, true).await?;
            }
            Fault::KillPg => {
                report.target = leader.clone();
                t0 = Instant::now();
                self.on(&leader, &faults::kill_pg_command(), "killing PostgreSQL")
                    .await?;
            }
            Fault::KillAgent | Fault::FreezeAgent | Fault::KillPrimary => {
                report.target = leader.clone();
                let mode = self.mode(&leader).await?;
                let (cmd, back) = match fault {
                    Fault::KillAgent => (
                        faults::kill_agent_command(mode),
                        services::op_command(Service::Agent, ServiceOp::Start, mode),
                    ),
                    Fault::FreezeAgent => (
                        faults::signal_agent_command(mode, "STOP"),
                        faults::signal_agent_command(mode, "CONT"),
                    ),
                    _ => (
                        faults::crash_command(mode),
                        services::op_command(Service::Agent, ServiceOp::Start, mode),
                    ),
                };
                t0 = Instant::now();
                self.on(&leader, &cmd, "injecting the fault").await?;
                undo.push(Undo {
                    host: leader.clone(),
                    command: back,
                });
            }
            Fault::ReplicaCrash | Fault::SyncStandbyCrash => {
                let target = if fault == Fault::SyncStandbyCrash {
                    // Right after a reconvergence the leader may not have named its standby
                    // yet (it does so a cycle after the replica streams): wait for it.
                    let c = ctl::wait_until(self.agents, "a synchronous standby is listed", |c| {
                        role_member(c, "sync_standby").is_some()
                    })
                    .await
                    .context("no synchronous standby (is synchronous_mode on?)")?;
                    role_member(&c, "sync_standby").unwrap_or_default()
                } else {
                    let others: Vec<&String> = members.iter().filter(|m| **m != leader).collect();
                    if others.is_empty() {
                        bail!("the cluster has no replica to crash");
                    }
                    others[rng.random_range(0..others.len())].clone()
                };
                report.target = target.clone();
                let mode = self.mode(&target).await?;
                t0 = Instant::now();
                self.on(
                    &target,
                    &faults::crash_command(mode),
                    "crashing the replica",
                )
                .await?;
                undo.push(Undo {
                    host: target,
                    command: services::op_command(Service::Agent, ServiceOp::Start, mode),
                });
            }
            Fault::IsolatePrimary => {
                report.target = leader.clone();
                let peers: Vec<String> = self
                    .inv
                    .hosts
                    .iter()
                    .filter(|h| h.name.as_str() != leader)
                    .map(|h| h.address.clone())
                    .collect();
                t0 = Instant::now();
                self.on(
                    &leader,
                    &faults::isolate_command(&peers),
                    "isolating the host (needs iptables)",
                )
                .await?;
                undo.push(Undo {
                    host: leader.clone(),
                    command: faults::heal_command(),
                });
            }
            Fault::EtcdMinority | Fault::EtcdMajority => {
                let mut etcd: Vec<String> = self
                    .inv
                    .hosts_with(Role::Etcd)
                    .map(|h| h.name.as_str().to_string())
                    .collect();
                let n = if fault == Fault::EtcdMinority {
                    // One member, never the leader's own (that is isolate-primary's case).
                    etcd.retain(|h| *h != leader);
                    1
                } else {
                    etcd.len() / 2 + 1
                };
                if etcd.len() < n || n == 0 {
                    bail!("not enough etcd members for {fault:?}");
                }
                let mut chosen = Vec::new();
                for _ in 0..n {
                    chosen.push(etcd.remove(rng.random_range(0..etcd.len())));
                }
                report.target = chosen.join(",");
                let mut cmds = Vec::new();
                for h in &chosen {
                    let mode = self.mode(h).await?;
                    cmds.push((
                        h.clone(),
                        services::stop_command(Service::Etcd, mode),
                        services::op_command(Service::Etcd, ServiceOp::Start, mode),
                    ));
                }
                t0 = Instant::now();
                for (h, stop, start) in cmds {
                    self.on(&h, &stop, "stopping etcd").await?;
                    undo.push(Undo {
                        host: h,
                        command: start,
                    });
                }
            }
        }
        // The fault's effect: a new leader for the faults that must move it; otherwise the
        // fault stays for the hold time.
        let waited = if fault.moves_leader() {
            ctl::wait_until(self.agents, "a new leader leads", |c| {
                c.leader_name().is_some_and(|l| l != leader)
            })
            .await
            .map(|_| ())
        } else if fault == Fault::KillPg {
            ctl::wait_until(self.agents, "a leader leads again", |c| {
                c.leader_name().is_some()
            })
            .await
            .map(|_| ())
        } else {
            tokio::time::sleep(self.hold).await;
            Ok(())
        };
        // Undo in every case (a failed wait must not leave a host cut off or frozen).
        for u in &undo {
            self.on(&u.host, &u.command, "undoing the fault").await?;
        }
        waited?;
        let c = ctl::wait_until(self.agents, "every replica streams again", |c| {
            settled(c, replicas, sync)
        })
        .await?;
        report.new_leader = c.leader_name();
        self.writes_resume(t0).await?;
        report.reconverged_after_s = Some(t0.elapsed().as_secs_f64());
        Ok(t0)
    }

    /// Waits (bounded) until a write through HAProxy succeeds after `t0`.
    async fn writes_resume(&self, t0: Instant) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            let id = self
                .next_id
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let ok = async {
                let (c, conn) = self.conns.probe.connect(tokio_postgres::NoTls).await.ok()?;
                tokio::spawn(conn);
                c.execute(
                    "INSERT INTO pgherd_drill_writes(id, node) VALUES ($1, 'resume-check')",
                    &[&id],
                )
                .await
                .ok()
            };
            if tokio::time::timeout(Duration::from_secs(2), ok)
                .await
                .ok()
                .flatten()
                .is_some()
            {
                return Ok(());
            }
            if start.elapsed() > RESUME_TIMEOUT {
                bail!(
                    "writes through HAProxy did not resume within {RESUME_TIMEOUT:?} of \
                     reconverging ({:.1} s after the fault)",
                    t0.elapsed().as_secs_f64()
                );
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }
}

/// A leader, every replica streaming, and in synchronous mode a synchronous standby named.
fn settled(c: &ClusterDoc, replicas: usize, synchronous_mode: bool) -> bool {
    c.leader().is_some()
        && c.streaming_count() == replicas
        && (!synchronous_mode || role_member(c, "sync_standby").is_some())
}

fn member_names(cluster: &ClusterDoc) -> Vec<String> {
    cluster.members.iter().map(|m| m.name.clone()).collect()
}

fn role_member(cluster: &ClusterDoc, role: &str) -> Option<String> {
    cluster
        .members
        .iter()
        .find(|m| m.role == role)
        .map(|m| m.name.clone())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn round() -> RoundReport {
        RoundReport {
            round: 1,
            fault: Fault::KillPrimary,
            target: "pg1".into(),
            old_leader: "pg1".into(),
            new_leader: Some("pg2".into()),
            write_unavailable_s: Some(8.8),
            writes_ok: 300,
            writes_failed: 4,
            acknowledged: 900,
            lost_count: 0,
            lost: vec![],
            two_primaries: None,
            reconverged_after_s: Some(12.7),
            error: None,
        }
    }

    #[test]
    fn the_drill_document_has_seconds_and_the_fault_as_typed() {
        let r = DrillReport {
            seed: 7,
            synchronous_mode: true,
            rounds: vec![round()],
            ok: true,
        };
        assert_eq!(
            serde_json::to_value(&r).unwrap(),
            serde_json::json!({
                "seed": 7, "synchronous_mode": true, "ok": true,
                "rounds": [{
                    "round": 1, "fault": "kill-primary", "target": "pg1",
                    "old_leader": "pg1", "new_leader": "pg2",
                    "write_unavailable_s": 8.8, "writes_ok": 300, "writes_failed": 4,
                    "acknowledged": 900, "lost_count": 0, "lost": [],
                    "two_primaries": null, "reconverged_after_s": 12.7, "error": null
                }]
            })
        );
    }

    #[test]
    fn a_round_fails_on_two_primaries_always_and_on_lost_writes_only_in_synchronous_mode() {
        let mut r = round();
        assert_eq!(r.failure(true), None);
        r.lost_count = 3;
        assert_eq!(
            r.failure(false),
            None,
            "asynchronous failover may lose writes"
        );
        assert!(
            r.failure(true)
                .unwrap()
                .contains("3 acknowledged writes lost")
        );
        r.lost_count = 0;
        r.two_primaries = Some(Overlap {
            again: "pg1".into(),
            other: "pg2".into(),
            at: 1.5,
        });
        assert!(r.failure(false).unwrap().contains("two writable primaries"));
    }
}
