//! Rolling restarts of members that are `pending_restart` (a `postmaster`-context parameter
//! changed in the DCS `config`): the pure planner [`plan_restarts`] and the executor
//! [`run_pending_restarts`] (called by `pgherd restart --pending` and by `apply`).
//!
//! This module owns the *order* and the *gates* of those restarts (day2.md §1.4 steps 5–7):
//! replicas one at a time (async before the sync standby, most lag first), the primary last —
//! except when one of the five hot-standby parameters is lowered, then the primary goes first,
//! in place, and each replica only once its `pg_controldata` shows the lowered value (a standby
//! started below its primary's values stops recovery). The executor re-reads the cluster and
//! re-plans before every step: a re-run after an interruption continues from what the cluster
//! shows (postconditions, not a journal), and first puts back any HAProxy server an interrupted
//! run left drained.
//!
//! Longer than ~800 lines on purpose: planner, its sentences and the executor's per-step
//! procedures change together (a new gate needs all three); the planner stays free of I/O.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use tokio::task::JoinSet;

use super::apply::Fleet;
use crate::cli::ctl::{self, Agents};
use crate::inventory::{Inventory, Role};
use crate::pg::conf::{ControlData, hot_standby_minimums};
use crate::transport::{Transport, TransportError, shell_quote};

// ------------------------------------------------------------------------------ input

/// The five parameters a hot standby must run with at least its primary's values
/// (PostgreSQL records the primary's values in the standby's `pg_control` on replay).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum HotParam {
    MaxConnections,
    MaxPreparedTransactions,
    MaxLocksPerTransaction,
    MaxWalSenders,
    MaxWorkerProcesses,
}

impl HotParam {
    pub const ALL: [HotParam; 5] = [
        HotParam::MaxConnections,
        HotParam::MaxPreparedTransactions,
        HotParam::MaxLocksPerTransaction,
        HotParam::MaxWalSenders,
        HotParam::MaxWorkerProcesses,
    ];

    /// The GUC name (as in `pg_settings` and `pending_restart_reason`).
    pub fn guc(self) -> &'static str {
        match self {
            HotParam::MaxConnections => "max_connections",
            HotParam::MaxPreparedTransactions => "max_prepared_transactions",
            HotParam::MaxLocksPerTransaction => "max_locks_per_transaction",
            HotParam::MaxWalSenders => "max_wal_senders",
            HotParam::MaxWorkerProcesses => "max_worker_processes",
        }
    }

    pub fn from_guc(name: &str) -> Option<HotParam> {
        HotParam::ALL.into_iter().find(|p| p.guc() == name)
    }
}

/// Values of the five, by parameter (missing = unknown).
pub type HotValues = BTreeMap<HotParam, u64>;

/// The five from `pg_controldata` output (one decoder: [`crate::pg::conf`]).
pub fn hot_values_from_controldata(text: &str) -> HotValues {
    hot_standby_minimums(&ControlData::parse(text))
        .into_iter()
        .filter_map(|(k, v)| Some((HotParam::from_guc(&k)?, v.parse().ok()?)))
        .collect()
}

/// A member's role as `GET /cluster` reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MemberRole {
    Leader,
    Replica,
    SyncStandby,
}

/// One member, as the agents and its host report it.
#[derive(Debug, Clone)]
pub struct MemberInput {
    pub name: String,
    pub role: MemberRole,
    /// The `/cluster` state: `streaming` for a replica receiving WAL, `running`, `restarting`,
    /// `stopped`...
    pub state: String,
    /// Bytes behind the leader (`None`: unknown).
    pub lag_bytes: Option<u64>,
    pub pending_restart: bool,
    /// `pending_restart_reason`: parameter → (running value, value a restart applies).
    pub pending_reason: BTreeMap<String, (String, String)>,
    pub nofailover: bool,
    pub nosync: bool,
    /// The five as recorded in its `pg_control` (on a standby: the primary's values replayed).
    pub controldata: HotValues,
    /// The five it runs with now (`SHOW`); the leader's entry gives the leader's current
    /// running values, against which a pending value counts as a decrease.
    pub running: HotValues,
}

impl MemberInput {
    fn is_running(&self) -> bool {
        matches!(self.state.as_str(), "running" | "streaming")
    }
}

/// The live cluster the planner decides on.
#[derive(Debug, Clone)]
pub struct RollingInput {
    pub members: Vec<MemberInput>,
    /// The DCS `config` has `pause: true` (no automatic failover: nobody would take over a
    /// primary that does not come back).
    pub paused: bool,
    /// From the DCS `config` (Patroni's default 1 MiB): a restarted replica is back once its
    /// lag is at most this; a switchover target must be within it.
    pub maximum_lag_on_failover: u64,
}

/// How the primary gets its restart in the restart phase (never for a decrease of the five:
/// that is always in place).
///
/// The default is [`PrimaryUpdateMethod::Restart`], in place after a `CHECKPOINT`, as CNPG
/// (its default), PGO and Zalando do for configuration changes: the cluster keeps its leader,
/// the writes stop for one restart of a freshly checkpointed server (seconds), no client sees
/// its primary become a read-only replica, and no timeline is added. A switchover moves the
/// write outage to a shorter blip but demotes the primary (its sessions are cut all the same)
/// and depends on a healthy, caught-up target; choose it with `--primary-update-method
/// switchover` where the primary's restart time is long (large `shared_buffers`, slow
/// storage).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum PrimaryUpdateMethod {
    #[default]
    Restart,
    Switchover,
}

#[derive(Debug, Clone, Default)]
pub struct RollingOptions {
    pub primary_update_method: PrimaryUpdateMethod,
}

// ------------------------------------------------------------------------------ plan

/// What one step does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepAction {
    /// Drain from HAProxy's replica backend, `POST /restart`, wait until it streams with the
    /// pending flag cleared, undrain. `gate`: first wait until its `pg_controldata` shows each
    /// of these at most this value (after a decrease on the primary).
    RestartReplica { gate: HotValues },
    /// `CHECKPOINT`, then `POST /restart` on the leader: writes stop until it is back.
    RestartPrimary,
    /// Hand the leader role to `candidate` (restarted, streaming); the old primary restarts
    /// as a replica with the new configuration during its demotion.
    Switchover { candidate: String },
}

/// One restart step and why it comes where it does.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestartStep {
    pub member: String,
    pub action: StepAction,
    /// Why this member, why now (the operator-facing sentence).
    pub reason: String,
}

impl RestartStep {
    /// The write outage this step causes (`None`: replica restarts, reads move elsewhere).
    pub fn write_outage(&self) -> Option<WriteOutage> {
        match &self.action {
            StepAction::RestartReplica { .. } => None,
            StepAction::RestartPrimary => Some(WriteOutage::InPlaceRestart {
                member: self.member.clone(),
            }),
            StepAction::Switchover { candidate } => Some(WriteOutage::Switchover {
                from: self.member.clone(),
                to: candidate.clone(),
            }),
        }
    }
}

impl fmt::Display for RestartStep {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.action {
            StepAction::RestartReplica { gate } if gate.is_empty() => {
                write!(f, "restart replica {}: {}", self.member, self.reason)
            }
            StepAction::RestartReplica { gate } => write!(
                f,
                "restart replica {} once its pg_controldata shows {}: {}",
                self.member,
                show_values(gate, "≤"),
                self.reason
            ),
            StepAction::RestartPrimary => write!(
                f,
                "restart primary {} in place after a CHECKPOINT: {}",
                self.member, self.reason
            ),
            StepAction::Switchover { candidate } => write!(
                f,
                "switch over {} → {candidate}, the old primary restarts as a replica: {}",
                self.member, self.reason
            ),
        }
    }
}

/// The write outage a plan causes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteOutage {
    InPlaceRestart { member: String },
    Switchover { from: String, to: String },
}

impl fmt::Display for WriteOutage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WriteOutage::InPlaceRestart { member } => write!(
                f,
                "writes stop while {member} restarts in place (one PostgreSQL restart after a CHECKPOINT)"
            ),
            WriteOutage::Switchover { from, to } => write!(
                f,
                "writes stop during the switchover {from} → {to} (until {to} is promoted)"
            ),
        }
    }
}

/// Why the steps of a phase run in their order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhaseKind {
    /// Increases of the five and other restart-needing parameters: replicas first (a primary
    /// running above a standby's values would pause the standby's recovery), the primary last.
    Raise,
    /// Decreases of the five: the primary first, in place; each replica once its
    /// `pg_controldata` shows the lower value (else it would keep, or fail to start with, a
    /// value below what its primary's WAL announced).
    Lower,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Phase {
    pub kind: PhaseKind,
    pub steps: Vec<RestartStep>,
}

/// The ordered restarts, plus the expected write outage.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RestartPlan {
    pub phases: Vec<Phase>,
    /// `None` when only replicas restart.
    pub write_outage: Option<WriteOutage>,
}

impl RestartPlan {
    pub fn is_empty(&self) -> bool {
        self.phases.iter().all(|p| p.steps.is_empty())
    }

    /// Every step in execution order.
    pub fn steps(&self) -> impl Iterator<Item = &RestartStep> {
        self.phases.iter().flat_map(|p| p.steps.iter())
    }
}

impl fmt::Display for RestartPlan {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.is_empty() {
            return writeln!(f, "no member is pending restart");
        }
        let mut n = 0;
        for (i, p) in self.phases.iter().enumerate() {
            let what = match p.kind {
                PhaseKind::Raise => {
                    "increases and other restart-needing changes (replicas first, the primary last)"
                }
                PhaseKind::Lower => "decreases of hot-standby parameters (the primary first)",
            };
            writeln!(f, "phase {}: {what}", i + 1)?;
            for s in &p.steps {
                n += 1;
                writeln!(f, "  {n}. {s}")?;
            }
        }
        match &self.write_outage {
            Some(o) => writeln!(f, "expected write outage: {o}"),
            None => writeln!(
                f,
                "expected write outage: none (only replicas restart, one at a time)"
            ),
        }
    }
}

/// Why nothing may be restarted now (checked before anything is done).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RollingRefusal {
    #[error("the cluster has no leader: no restart without a primary to return to")]
    NoLeader,
    #[error(
        "the cluster is paused: no restart while automatic failover is off (`pgherd resume` first)"
    )]
    Paused,
    #[error("{member} would be restarted but is not running (its agent reports state {state:?})")]
    NotRunning { member: String, state: String },
}

fn show_values(v: &HotValues, op: &str) -> String {
    v.iter()
        .map(|(p, x)| format!("{} {op} {x}", p.guc()))
        .collect::<Vec<_>>()
        .join(", ")
}

fn show_reason(m: &MemberInput) -> String {
    if m.pending_reason.is_empty() {
        return "pending restart".into();
    }
    let parts: Vec<String> = m
        .pending_reason
        .iter()
        .map(|(k, (old, new))| format!("{k} {old} → {new}"))
        .collect();
    format!("pending {}", parts.join(", "))
}

/// `(param, old, new)` of a reason that lowers one of the five.
fn lowered_in(m: &MemberInput) -> impl Iterator<Item = (HotParam, u64, u64)> + '_ {
    m.pending_reason.iter().filter_map(|(k, (old, new))| {
        let p = HotParam::from_guc(k)?;
        let new: u64 = new.trim().parse().ok()?;
        let old: u64 = m
            .running
            .get(&p)
            .copied()
            .or_else(|| old.trim().parse().ok())?;
        (new < old).then_some((p, old, new))
    })
}

fn raised_five_in(m: &MemberInput) -> bool {
    m.pending_reason.iter().any(|(k, (old, new))| {
        HotParam::from_guc(k).is_some()
            && matches!((old.trim().parse::<u64>(), new.trim().parse::<u64>()), (Ok(o), Ok(n)) if n > o)
    })
}

/// Whether a replica's pending restart includes anything other than decreases of the five
/// (those are the lower phase's).
fn pending_other_than_lowers(m: &MemberInput) -> bool {
    if !m.pending_restart {
        return false;
    }
    if m.pending_reason.is_empty() {
        return true;
    }
    m.pending_reason
        .keys()
        .any(|k| !lowered_in(m).any(|(p, _, _)| p.guc() == k))
}

/// The order of replicas within a phase: async before the sync standby, most lag first, then
/// by name (deterministic).
fn replica_order(a: &&MemberInput, b: &&MemberInput) -> std::cmp::Ordering {
    let sync = |m: &MemberInput| m.role == MemberRole::SyncStandby;
    sync(a)
        .cmp(&sync(b))
        .then(b.lag_bytes.unwrap_or(0).cmp(&a.lag_bytes.unwrap_or(0)))
        .then(a.name.cmp(&b.name))
}

fn replica_kind(m: &MemberInput) -> &'static str {
    if m.role == MemberRole::SyncStandby {
        "the sync standby, last among replicas"
    } else {
        "async replica"
    }
}

fn lag_text(m: &MemberInput) -> String {
    match m.lag_bytes {
        Some(l) => format!("lag {l} B"),
        None => "lag unknown".into(),
    }
}

/// Plans the restarts of every member that needs one (see the module doc for the rules).
///
/// A member needs a restart when its agent reports `pending_restart`, or (a replica) when it
/// runs one of the five above the value the leader runs or is about to run after a decrease
/// (pgherd's agent starts a standby with at least its `pg_control` values, so after a decrease
/// such a replica is not flagged pending: it keeps the old value until restarted once its
/// control file shows the new one).
pub fn plan_restarts(
    input: &RollingInput,
    opts: &RollingOptions,
) -> Result<RestartPlan, RollingRefusal> {
    let leader = input.members.iter().find(|m| m.role == MemberRole::Leader);
    let replicas: Vec<&MemberInput> = input
        .members
        .iter()
        .filter(|m| m.role != MemberRole::Leader)
        .collect();

    // The five as the leader will run them after its restart: its pending values (raises
    // too: a replica already restarted with a raise is not "above" the leader), else what it
    // runs now.
    let mut target: HotValues = leader.map(|l| l.running.clone()).unwrap_or_default();
    if let Some(l) = leader {
        for (k, (_, new)) in &l.pending_reason {
            if let (Some(p), Ok(v)) = (HotParam::from_guc(k), new.trim().parse::<u64>()) {
                target.insert(p, v);
            }
        }
    }
    let leader_lowers: Vec<(HotParam, u64, u64)> =
        leader.map(|l| lowered_in(l).collect()).unwrap_or_default();
    // Per replica: the five it must come down to (the lower phase's gate).
    let lower_need = |m: &MemberInput| -> HotValues {
        let mut need: HotValues = target
            .iter()
            .filter(|(p, t)| m.running.get(p).is_some_and(|r| r > t))
            .map(|(p, t)| (*p, *t))
            .collect();
        for (p, _, new) in lowered_in(m) {
            need.entry(p).or_insert(new);
        }
        need
    };
    let leader_pending = leader.is_some_and(|l| l.pending_restart);
    let any_lower = !leader_lowers.is_empty() || replicas.iter().any(|m| !lower_need(m).is_empty());
    let any_five_raise = input.members.iter().any(raised_five_in);

    let mut raise_replicas: Vec<&MemberInput> = replicas
        .iter()
        .copied()
        .filter(|m| pending_other_than_lowers(m))
        .collect();
    raise_replicas.sort_by(replica_order);
    let mut lower_replicas: Vec<&MemberInput> = replicas
        .iter()
        .copied()
        .filter(|m| !lower_need(m).is_empty())
        .collect();
    lower_replicas.sort_by(replica_order);

    if !leader_pending && raise_replicas.is_empty() && lower_replicas.is_empty() {
        return Ok(RestartPlan::default());
    }
    let Some(leader) = leader else {
        return Err(RollingRefusal::NoLeader);
    };
    if input.paused {
        return Err(RollingRefusal::Paused);
    }
    let restarted = std::iter::once(leader)
        .filter(|_| leader_pending)
        .chain(raise_replicas.iter().copied())
        .chain(lower_replicas.iter().copied());
    for m in restarted {
        if !m.is_running() {
            return Err(RollingRefusal::NotRunning {
                member: m.name.clone(),
                state: m.state.clone(),
            });
        }
    }

    let lowered_text = show_values(
        &leader_lowers.iter().map(|(p, _, n)| (*p, *n)).collect(),
        "→",
    );
    let replica_step = |m: &MemberInput, gate: HotValues, why: String| RestartStep {
        member: m.name.clone(),
        action: StepAction::RestartReplica { gate },
        reason: format!("{why}; {}, {}", replica_kind(m), lag_text(m)),
    };
    let in_place = |why: String| RestartStep {
        member: leader.name.clone(),
        action: StepAction::RestartPrimary,
        reason: why,
    };
    let mut plan = RestartPlan::default();

    if !any_lower {
        // Only increases / other parameters: replicas, then the primary by the chosen method.
        let mut steps: Vec<RestartStep> = raise_replicas
            .iter()
            .map(|m| replica_step(m, HotValues::new(), show_reason(m)))
            .collect();
        if leader_pending {
            steps.push(primary_last(input, opts, leader, &raise_replicas));
        }
        plan.phases.push(Phase {
            kind: PhaseKind::Raise,
            steps,
        });
    } else if any_five_raise && (!raise_replicas.is_empty() || leader_pending) {
        // Raises and decreases of the five: raises first (replicas, then the primary, in
        // place: its restart applies the decreases too, one config, one restart), then the
        // replicas come down once their control files show the primary's new values.
        let mut steps: Vec<RestartStep> = raise_replicas
            .iter()
            .map(|m| {
                replica_step(
                    m,
                    HotValues::new(),
                    format!(
                        "{} (increases first; decreases stay at the pg_control value until phase 2)",
                        show_reason(m)
                    ),
                )
            })
            .collect();
        if leader_pending {
            steps.push(in_place(format!(
                "{}; after every replica runs the increases, in place because it also applies the decrease of {lowered_text} (never a switchover for a decrease)",
                show_reason(leader)
            )));
        }
        plan.phases.push(Phase {
            kind: PhaseKind::Raise,
            steps,
        });
        let steps = replicas_to_lower(&replicas, &target, &lower_need);
        plan.phases.push(Phase {
            kind: PhaseKind::Lower,
            steps,
        });
    } else {
        // Decreases (other parameters ride along): the primary first, in place, then each
        // replica once its control file shows the new values.
        let mut steps = Vec::new();
        if leader_pending {
            steps.push(in_place(format!(
                "{}; first, in place: a decrease of {lowered_text} must reach the standbys through the primary's WAL (a switchover would start the old primary as a standby below its pg_control values)",
                show_reason(leader)
            )));
        }
        let mut all: Vec<&MemberInput> = raise_replicas.clone();
        for m in &lower_replicas {
            if !all.iter().any(|x| x.name == m.name) {
                all.push(m);
            }
        }
        all.sort_by(replica_order);
        for m in all {
            let need = lower_need(m);
            let why = if m.pending_restart {
                show_reason(m)
            } else {
                format!(
                    "runs {} above the leader's {}",
                    show_values(
                        &m.running
                            .iter()
                            .filter(|(p, _)| need.contains_key(p))
                            .map(|(p, v)| (*p, *v))
                            .collect(),
                        "="
                    ),
                    show_values(&need, "=")
                )
            };
            let gate: HotValues = target
                .iter()
                .filter(|(p, _)| {
                    leader_lowers.iter().any(|(q, _, _)| q == *p) || need.contains_key(p)
                })
                .map(|(p, t)| (*p, *t))
                .collect();
            steps.push(replica_step(m, gate, why));
        }
        plan.phases.push(Phase {
            kind: PhaseKind::Lower,
            steps,
        });
    }
    plan.phases.retain(|p| !p.steps.is_empty());
    let outage = plan.steps().find_map(RestartStep::write_outage);
    plan.write_outage = outage;
    Ok(plan)
}

/// Phase-2 replicas of a mixed change: every replica running one of the five above the target.
fn replicas_to_lower(
    replicas: &[&MemberInput],
    target: &HotValues,
    lower_need: &dyn Fn(&MemberInput) -> HotValues,
) -> Vec<RestartStep> {
    let mut v: Vec<&MemberInput> = replicas
        .iter()
        .copied()
        .filter(|m| {
            !lower_need(m).is_empty()
                || target
                    .iter()
                    .any(|(p, t)| m.controldata.get(p).is_some_and(|c| c > t))
        })
        .collect();
    v.sort_by(replica_order);
    v.into_iter()
        .map(|m| {
            let need = lower_need(m);
            let gate = if need.is_empty() {
                target.clone()
            } else {
                need
            };
            RestartStep {
                member: m.name.clone(),
                action: StepAction::RestartReplica { gate: gate.clone() },
                reason: format!(
                    "comes down to the primary's {} after phase 1; {}, {}",
                    show_values(&gate, "="),
                    replica_kind(m),
                    lag_text(m)
                ),
            }
        })
        .collect()
}

/// The primary's step of a phase without decreases, by `primary_update_method`.
fn primary_last(
    input: &RollingInput,
    opts: &RollingOptions,
    leader: &MemberInput,
    restarted_before: &[&MemberInput],
) -> RestartStep {
    let in_place = |why: &str| RestartStep {
        member: leader.name.clone(),
        action: StepAction::RestartPrimary,
        reason: format!("{}; last, {why}", show_reason(leader)),
    };
    if opts.primary_update_method == PrimaryUpdateMethod::Restart {
        return in_place("in place (primary_update_method restart)");
    }
    // A target must stream within maximum_lag_on_failover and run the new config by then
    // (not pending, or restarted in this phase before the primary).
    let mut candidates: Vec<&MemberInput> = input
        .members
        .iter()
        .filter(|m| m.role != MemberRole::Leader && !m.nofailover && m.state == "streaming")
        .filter(|m| {
            m.lag_bytes
                .is_some_and(|l| l <= input.maximum_lag_on_failover)
        })
        .filter(|m| !m.pending_restart || restarted_before.iter().any(|r| r.name == m.name))
        .collect();
    candidates.sort_by(|a, b| {
        let sync = |m: &MemberInput| m.role != MemberRole::SyncStandby;
        sync(a)
            .cmp(&sync(b))
            .then(a.lag_bytes.cmp(&b.lag_bytes))
            .then(a.name.cmp(&b.name))
    });
    match candidates.first() {
        Some(c) => RestartStep {
            member: leader.name.clone(),
            action: StepAction::Switchover {
                candidate: c.name.clone(),
            },
            reason: format!(
                "{}; last, by switchover to {} ({}, {})",
                show_reason(leader),
                c.name,
                if c.role == MemberRole::SyncStandby {
                    "the sync standby"
                } else {
                    "the least-lagged streaming replica"
                },
                lag_text(c)
            ),
        },
        None => in_place(
            "in place: no replica can take over (none streams within maximum_lag_on_failover without nofailover)",
        ),
    }
}

// ------------------------------------------------------------------------------ executor

/// HAProxy gives a drained replica's client sessions this long to end on their own before the
/// restart closes them (a fast shutdown disconnects them anyway; this only spares idle pools).
pub const DRAIN_TIMEOUT: Duration = Duration::from_secs(30);
/// The agent answers `POST /restart` once PostgreSQL is back: its stop (≤ 60 s) plus its start
/// (≤ `primary_start_timeout`, 300 s by default), plus margin for the HTTP round trip.
pub const RESTART_CALL_TIMEOUT: Duration = Duration::from_secs(420);
/// A restarted replica reconnects to the primary and replays the WAL written meanwhile.
pub const STREAM_TIMEOUT: Duration = Duration::from_secs(180);
/// An agent refreshes its member key (and `pending_restart`) once per `loop_wait` (≤ 10 s in
/// every profile), so a cleared flag shows within a few cycles.
pub const PENDING_CLEAR_TIMEOUT: Duration = Duration::from_secs(30);
/// A replica's control file takes the primary's lowered values when it replays the restarted
/// primary's parameter-change record: right after it reconnects.
pub const CONTROLDATA_TIMEOUT: Duration = Duration::from_secs(120);
/// The restarted primary is leader and running again and every replica streams from it.
pub const PRIMARY_BACK_TIMEOUT: Duration = Duration::from_secs(180);
/// A `CHECKPOINT` writes every dirty buffer: minutes on a large `shared_buffers`.
pub const CHECKPOINT_TIMEOUT: Duration = Duration::from_secs(600);
/// One SSH read of a host's control data and settings, or one HAProxy admin command.
const SSH_READ_TIMEOUT: Duration = Duration::from_secs(20);
/// Cadence of every poll here.
const POLL: Duration = Duration::from_millis(500);
/// Restarts of one member within one phase: the planned one, plus one more when a decrease
/// had not replayed yet (day2.md §1.4 step 7).
const MAX_ATTEMPTS: u32 = 2;

/// Why a run stopped. Each variant names the member and what its agent reported.
#[derive(Debug, thiserror::Error)]
pub enum RollingError {
    #[error("refused, nothing restarted: {0}")]
    Refused(#[from] RollingRefusal),
    #[error("stopped after {steps} step(s), the cluster is left as they made it: {refusal}")]
    RefusedMidway {
        steps: usize,
        #[source]
        refusal: RollingRefusal,
    },
    #[error("reading the cluster: {0}")]
    Gather(String),
    #[error(
        "{member}: timed out after {timeout:?} waiting until {what} (its agent reports {reported})"
    )]
    Wait {
        member: String,
        what: String,
        timeout: Duration,
        reported: String,
    },
    #[error("{member}: {what}: {message}")]
    Call {
        member: String,
        what: String,
        message: String,
    },
    #[error("{member} still needs a restart after {attempts} restart(s): {reason}")]
    StillPending {
        member: String,
        attempts: u32,
        reason: String,
    },
    #[error(transparent)]
    Transport(#[from] TransportError),
}

/// What a run did, in order: `(member, what)`.
#[derive(Debug, Clone, Default)]
pub struct RollingReport {
    /// The plan as it stood before the first step.
    pub plan: RestartPlan,
    pub done: Vec<(String, String)>,
}

/// Progress lines (what is being waited for); `apply` and the CLI print them.
pub type ProgressFn<'a> = &'a (dyn Fn(&str) + Send + Sync);

fn call_err(member: &str, what: &str, e: anyhow::Error) -> RollingError {
    RollingError::Call {
        member: member.into(),
        what: what.into(),
        message: format!("{e:#}"),
    }
}

fn member_json<'a>(c: &'a Value, name: &str) -> Option<&'a Value> {
    c["members"].as_array()?.iter().find(|m| m["name"] == name)
}

/// What `name`'s entry in `/cluster` says, for error messages.
fn reported(c: Option<&Value>, name: &str) -> String {
    let Some(m) = c.and_then(|c| member_json(c, name)) else {
        return "nothing: it is not listed in /cluster".into();
    };
    let mut s = format!(
        "role {}, state {}, lag {}",
        m["role"].as_str().unwrap_or("?"),
        m["state"].as_str().unwrap_or("?"),
        m["lag"]
    );
    if m["pending_restart"] == true {
        s.push_str(&format!(
            ", pending_restart {}",
            m.get("pending_restart_reason").unwrap_or(&Value::Null)
        ));
    }
    s
}

fn reason_map(v: &Value) -> BTreeMap<String, (String, String)> {
    let text = |x: &Value| match x {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    };
    v.as_object()
        .map(|o| {
            o.iter()
                .map(|(k, e)| (k.clone(), (text(&e["old_value"]), text(&e["new_value"]))))
                .collect()
        })
        .unwrap_or_default()
}

/// The parts of `GET /cluster` the planner needs (without the per-host values).
pub fn members_from_cluster(c: &Value) -> Vec<MemberInput> {
    c["members"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|m| {
                    let role = match m["role"].as_str()? {
                        "leader" | "standby_leader" => MemberRole::Leader,
                        "sync_standby" | "quorum_standby" => MemberRole::SyncStandby,
                        _ => MemberRole::Replica,
                    };
                    let tag = |t: &str| m["tags"][t] == true;
                    Some(MemberInput {
                        name: m["name"].as_str()?.to_string(),
                        role,
                        state: m["state"].as_str().unwrap_or("unknown").to_string(),
                        lag_bytes: m["lag"].as_u64(),
                        pending_restart: m["pending_restart"] == true,
                        pending_reason: reason_map(&m["pending_restart_reason"]),
                        nofailover: tag("nofailover"),
                        nosync: tag("nosync"),
                        controldata: HotValues::new(),
                        running: HotValues::new(),
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// `psql` as the `postgres` OS user over the local socket (peer authentication: no password
/// anywhere), on `inv`'s PostgreSQL.
fn psql(inv: &Inventory, sql: &str) -> String {
    let pg = &inv.postgresql;
    let sock = pg
        .data_dir
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_else(|| "/var/run/postgresql".into());
    format!(
        "cd / && runuser -u postgres -- {} -X -A -t -q -F '=' -h {} -p {} -d postgres -c {}",
        shell_quote(&pg.bin_dir.join("psql").to_string_lossy()),
        shell_quote(&sock),
        pg.port,
        shell_quote(sql)
    )
}

const SETTINGS_MARK: &str = "@@pgherd-settings";

/// The five from `pg_controldata` and from `pg_settings` on one host (unknown when unreadable).
async fn host_values(inv: &Inventory, t: &dyn Transport) -> (HotValues, HotValues) {
    let names: Vec<String> = HotParam::ALL
        .iter()
        .map(|p| format!("'{}'", p.guc()))
        .collect();
    let sql = format!(
        "SELECT name, setting FROM pg_settings WHERE name IN ({})",
        names.join(",")
    );
    let cmd = format!(
        "LANG=C LC_ALL=C {} -D {} 2>/dev/null; echo {SETTINGS_MARK}; {} 2>/dev/null; exit 0",
        shell_quote(
            &inv.postgresql
                .bin_dir
                .join("pg_controldata")
                .to_string_lossy()
        ),
        shell_quote(&inv.postgresql.data_dir.to_string_lossy()),
        psql(inv, &sql)
    );
    let Ok(out) = t.run(&cmd, SSH_READ_TIMEOUT).await else {
        return Default::default();
    };
    let text = out.stdout_str();
    let (cd, settings) = text.split_once(SETTINGS_MARK).unwrap_or((&text, ""));
    let running = settings
        .lines()
        .filter_map(|l| l.split_once('='))
        .filter_map(|(k, v)| Some((HotParam::from_guc(k.trim())?, v.trim().parse().ok()?)))
        .collect();
    (hot_values_from_controldata(cd), running)
}

/// The live input: `GET /cluster` and `/config` from the agents, `pg_controldata` and the
/// running values of the five from every member's host over SSH.
pub async fn gather_input(
    inv: &Inventory,
    agents: &Agents<'_>,
    fleet: &Fleet,
) -> Result<RollingInput, RollingError> {
    let c = agents
        .cluster()
        .await
        .map_err(|e| RollingError::Gather(format!("{e:#}")))?;
    let mut members = members_from_cluster(&c);
    let mut lag_limit = None;
    for m in &members {
        if let Ok(cfg) = agents.get_json(&m.name, "/config").await {
            lag_limit = Some(cfg["maximum_lag_on_failover"].as_u64());
            break;
        }
    }
    let mut set = JoinSet::new();
    for m in &members {
        let Some(t) = fleet.get(&m.name).cloned() else {
            continue;
        };
        let inv = inv.clone();
        let name = m.name.clone();
        set.spawn(async move { (name, host_values(&inv, t.as_ref()).await) });
    }
    let mut values = BTreeMap::new();
    while let Some(j) = set.join_next().await {
        if let Ok((name, v)) = j {
            values.insert(name, v);
        }
    }
    for m in &mut members {
        if let Some((cd, running)) = values.remove(&m.name) {
            m.controldata = cd;
            m.running = running;
        }
    }
    Ok(RollingInput {
        members,
        paused: c["pause"] == true,
        maximum_lag_on_failover: lag_limit.flatten().unwrap_or(inv.maximum_lag_on_failover),
    })
}

// ---- HAProxy admin socket (perl talks to it: always on Debian as perl-base, no socat needed)

fn haproxy_cmd(cmd: &str) -> String {
    format!(
        "perl -MIO::Socket::UNIX -e '$s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die \"cannot connect to $ARGV[0]: $!\\n\"; print $s \"$ARGV[1]\\n\"; print while <$s>' {} {}",
        shell_quote(super::services::HAPROXY_ADMIN_SOCK),
        shell_quote(cmd)
    )
}

async fn haproxy(t: &dyn Transport, cmd: &str) -> Result<String, TransportError> {
    Ok(t.run_ok(&haproxy_cmd(cmd), SSH_READ_TIMEOUT)
        .await?
        .stdout_str())
}

/// `set server` answers nothing on success, a message otherwise.
async fn haproxy_set(t: &dyn Transport, cmd: &str) -> Result<(), RollingError> {
    let out = haproxy(t, cmd).await?;
    if out.trim().is_empty() {
        Ok(())
    } else {
        Err(RollingError::Call {
            member: t.host().into(),
            what: format!("HAProxy `{cmd}`"),
            message: out.trim().to_string(),
        })
    }
}

/// HAProxy admin flags set by `state maint` (FMAINT) and `state drain` (FDRAIN).
const ADMIN_FORCED_MAINT_OR_DRAIN: u32 = 0x01 | 0x08;

/// Servers of `backend` whose admin state (`show servers state`, 7th column) is forced
/// drain or maintenance.
pub fn drained_servers(state: &str, backend: &str) -> Vec<String> {
    state
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let admin: u32 = f.get(6)?.parse().ok()?;
            (f.get(1) == Some(&backend) && admin & ADMIN_FORCED_MAINT_OR_DRAIN != 0)
                .then(|| f[3].to_string())
        })
        .collect()
}

/// Current sessions (`scur`, 5th column of `show stat`) of `backend/server`.
pub fn current_sessions(csv: &str, backend: &str, server: &str) -> Option<u64> {
    csv.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&backend) && f.get(1) == Some(&server))
        .and_then(|f| f.get(4)?.parse().ok())
}

fn haproxy_hosts(inv: &Inventory, fleet: &Fleet) -> Vec<Arc<dyn Transport>> {
    inv.hosts_with(Role::Haproxy)
        .filter_map(|h| fleet.get(h.name.as_str()).cloned())
        .collect()
}

fn replica_backend(inv: &Inventory) -> String {
    format!("{}_replicas", inv.cluster)
}

/// Puts back every member server an interrupted run left in drain or maintenance in the
/// replica backend, on every HAProxy host; returns what it did.
pub async fn undrain_leftovers(
    inv: &Inventory,
    fleet: &Fleet,
) -> Result<Vec<(String, String)>, RollingError> {
    let backend = replica_backend(inv);
    let mut done = Vec::new();
    for t in haproxy_hosts(inv, fleet) {
        let state = haproxy(t.as_ref(), &format!("show servers state {backend}")).await?;
        for srv in drained_servers(&state, &backend) {
            if inv.host(&srv).is_none_or(|h| !h.has(Role::Postgres)) {
                continue;
            }
            haproxy_set(
                t.as_ref(),
                &format!("set server {backend}/{srv} state ready"),
            )
            .await?;
            done.push((
                srv.clone(),
                format!(
                    "put back into {backend} on {} (left drained by an interrupted run)",
                    t.host()
                ),
            ));
        }
    }
    Ok(done)
}

async fn set_state_everywhere(
    inv: &Inventory,
    fleet: &Fleet,
    member: &str,
    state: &str,
) -> Result<(), RollingError> {
    let backend = replica_backend(inv);
    let mut errs = Vec::new();
    for t in haproxy_hosts(inv, fleet) {
        if let Err(e) = haproxy_set(
            t.as_ref(),
            &format!("set server {backend}/{member} state {state}"),
        )
        .await
        {
            errs.push(e.to_string());
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(RollingError::Call {
            member: member.into(),
            what: format!("setting it to {state} in HAProxy"),
            message: errs.join("; "),
        })
    }
}

/// Polls `/cluster` until `done` holds for it, bounded by `timeout`.
async fn wait_cluster(
    agents: &Agents<'_>,
    member: &str,
    what: &str,
    timeout: Duration,
    done: impl Fn(&Value) -> bool,
) -> Result<Value, RollingError> {
    let start = Instant::now();
    let mut last = None;
    loop {
        if let Ok(c) = agents.cluster().await {
            if done(&c) {
                return Ok(c);
            }
            last = Some(c);
        }
        if start.elapsed() > timeout {
            return Err(RollingError::Wait {
                member: member.into(),
                what: what.into(),
                timeout,
                reported: reported(last.as_ref(), member),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

fn streams_within(c: &Value, name: &str, max_lag: u64) -> bool {
    member_json(c, name).is_some_and(|m| {
        m["role"] != "leader"
            && m["state"] == "streaming"
            && m["lag"].as_u64().is_some_and(|l| l <= max_lag)
    })
}

fn pending(c: &Value, name: &str) -> bool {
    member_json(c, name).is_some_and(|m| m["pending_restart"] == true)
}

struct Exec<'a> {
    inv: &'a Inventory,
    fleet: &'a Fleet,
    agents: Agents<'a>,
    progress: ProgressFn<'a>,
    done: Vec<(String, String)>,
}

impl Exec<'_> {
    fn say(&self, msg: &str) {
        (self.progress)(msg);
    }

    fn did(&mut self, member: &str, what: String) {
        self.say(&format!("{member}: {what}"));
        self.done.push((member.to_string(), what));
    }

    fn transport(&self, member: &str) -> Result<Arc<dyn Transport>, RollingError> {
        self.fleet
            .get(member)
            .cloned()
            .ok_or_else(|| RollingError::Gather(format!("no SSH connection to {member}")))
    }

    /// Waits until `member`'s control file shows every value of `gate` at most.
    async fn wait_gate(&self, member: &str, gate: &HotValues) -> Result<(), RollingError> {
        if gate.is_empty() {
            return Ok(());
        }
        let t = self.transport(member)?;
        let what = format!("its pg_controldata shows {}", show_values(gate, "≤"));
        self.say(&format!("{member}: waiting until {what}"));
        let start = Instant::now();
        loop {
            let (cd, _) = host_values(self.inv, t.as_ref()).await;
            if gate.iter().all(|(p, v)| cd.get(p).is_some_and(|c| c <= v)) {
                return Ok(());
            }
            if start.elapsed() > CONTROLDATA_TIMEOUT {
                return Err(RollingError::Wait {
                    member: member.into(),
                    what,
                    timeout: CONTROLDATA_TIMEOUT,
                    reported: format!("pg_controldata {}", show_values(&cd, "=")),
                });
            }
            tokio::time::sleep(POLL).await;
        }
    }

    async fn restart_call(&self, member: &str, body: Value) -> Result<(), RollingError> {
        self.agents
            .send_with_timeout(
                reqwest::Method::POST,
                member,
                "/restart",
                body,
                RESTART_CALL_TIMEOUT,
            )
            .await
            .map(|_| ())
            .map_err(|e| call_err(member, "POST /restart", e))
    }

    async fn restart_replica(
        &mut self,
        m: &MemberInput,
        gate: &HotValues,
        max_lag: u64,
    ) -> Result<(), RollingError> {
        self.wait_gate(&m.name, gate).await?;
        let backend = replica_backend(self.inv);
        set_state_everywhere(self.inv, self.fleet, &m.name, "drain").await?;
        self.did(&m.name, format!("drained from {backend}"));
        let r = self.restart_drained(m, max_lag).await;
        // Undrained also when the restart or a wait failed: a replica that is back serves
        // reads again, one that is not fails HAProxy's /replica check anyway.
        let u = set_state_everywhere(self.inv, self.fleet, &m.name, "ready").await;
        if u.is_ok() {
            self.did(&m.name, format!("put back into {backend}"));
        }
        r.and(u)
    }

    async fn restart_drained(&mut self, m: &MemberInput, max_lag: u64) -> Result<(), RollingError> {
        let backend = replica_backend(self.inv);
        self.say(&format!(
            "{}: waiting until its client sessions through HAProxy end (at most {DRAIN_TIMEOUT:?})",
            m.name
        ));
        let start = Instant::now();
        loop {
            let mut total = 0;
            for t in haproxy_hosts(self.inv, self.fleet) {
                let csv = haproxy(t.as_ref(), "show stat").await.unwrap_or_default();
                total += current_sessions(&csv, &backend, &m.name).unwrap_or(0);
            }
            if total == 0 {
                break;
            }
            if start.elapsed() > DRAIN_TIMEOUT {
                self.did(
                    &m.name,
                    format!("{total} client session(s) still open after {DRAIN_TIMEOUT:?}: the restart closes them"),
                );
                break;
            }
            tokio::time::sleep(POLL).await;
        }
        // `restart_pending` when flagged (the agent skips a member that no longer is);
        // a replica that only runs above the leader's values is not flagged by pgherd's agent.
        let mut body = json!({ "role": "replica" });
        if m.pending_restart {
            body["restart_pending"] = json!(true);
        }
        self.say(&format!(
            "{}: restarting PostgreSQL (POST /restart)",
            m.name
        ));
        self.restart_call(&m.name, body).await?;
        self.did(&m.name, "PostgreSQL restarted".into());
        let name = m.name.clone();
        self.say(&format!(
            "{name}: waiting until it streams with lag ≤ {max_lag} B"
        ));
        wait_cluster(
            &self.agents,
            &name,
            &format!("it streams again with lag ≤ {max_lag} B"),
            STREAM_TIMEOUT,
            |c| streams_within(c, &name, max_lag),
        )
        .await?;
        if m.pending_restart {
            self.say(&format!("{name}: waiting until its pending_restart clears"));
            let r = wait_cluster(
                &self.agents,
                &name,
                "its pending_restart clears",
                PENDING_CLEAR_TIMEOUT,
                |c| !pending(c, &name),
            )
            .await;
            if let Err(e) = r {
                // Still pending only for the five (its control file had not replayed the
                // primary's values yet): the next round waits for replay and restarts it once
                // more. Anything else a restart did not apply is an error.
                let c = self.agents.cluster().await.ok();
                let still = c
                    .as_ref()
                    .map(members_from_cluster)
                    .and_then(|v| v.into_iter().find(|x| x.name == name));
                let only_five = still.as_ref().is_some_and(|x| {
                    !x.pending_reason.is_empty()
                        && x.pending_reason
                            .keys()
                            .all(|k| HotParam::from_guc(k).is_some())
                });
                if !only_five {
                    return Err(match still {
                        Some(x) => RollingError::StillPending {
                            member: name.clone(),
                            attempts: 1,
                            reason: show_reason(&x),
                        },
                        None => e,
                    });
                }
            }
        }
        self.did(&name, format!("streams again (lag ≤ {max_lag} B)"));
        Ok(())
    }

    async fn restart_primary(&mut self, m: &MemberInput) -> Result<(), RollingError> {
        let t = self.transport(&m.name)?;
        self.say(&format!("{}: CHECKPOINT (shortens the shutdown)", m.name));
        t.run_ok(&psql(self.inv, "CHECKPOINT"), CHECKPOINT_TIMEOUT)
            .await?;
        self.did(&m.name, "CHECKPOINT done".into());
        let streaming_before: Vec<String> = self
            .agents
            .cluster()
            .await
            .ok()
            .map(|c| {
                members_from_cluster(&c)
                    .into_iter()
                    .filter(|x| x.state == "streaming")
                    .map(|x| x.name)
                    .collect()
            })
            .unwrap_or_default();
        self.say(&format!(
            "{}: restarting the primary in place (POST /restart; writes stop until it is back)",
            m.name
        ));
        let mut body = json!({ "role": "primary" });
        if m.pending_restart {
            body["restart_pending"] = json!(true);
        }
        self.restart_call(&m.name, body).await?;
        self.did(&m.name, "primary restarted in place".into());
        let name = m.name.clone();
        let what = format!(
            "{name} leads and runs again and {} stream",
            if streaming_before.is_empty() {
                "its replicas".to_string()
            } else {
                streaming_before.join(", ")
            }
        );
        self.say(&format!("{name}: waiting until {what}"));
        wait_cluster(&self.agents, &name, &what, PRIMARY_BACK_TIMEOUT, |c| {
            member_json(c, &name).is_some_and(|x| x["role"] == "leader" && x["state"] == "running")
                && streaming_before
                    .iter()
                    .all(|r| member_json(c, r).is_some_and(|x| x["state"] == "streaming"))
        })
        .await?;
        self.did(&name, "leads again, every replica streams".into());
        Ok(())
    }

    async fn switchover(&mut self, m: &MemberInput, candidate: &str) -> Result<(), RollingError> {
        self.say(&format!(
            "{}: switching over to {candidate} (waits until {candidate} leads)",
            m.name
        ));
        ctl::switchover(self.inv, Some(candidate), false, true)
            .await
            .map_err(|e| call_err(&m.name, "switchover", e))?;
        self.did(&m.name, format!("switched over to {candidate}"));
        let name = m.name.clone();
        self.say(&format!("{name}: waiting until it streams as a replica"));
        wait_cluster(
            &self.agents,
            &name,
            "the old primary streams as a replica",
            STREAM_TIMEOUT,
            |c| member_json(c, &name).is_some_and(|x| x["state"] == "streaming"),
        )
        .await?;
        self.did(&name, format!("streams from {candidate}"));
        Ok(())
    }
}

/// Gathers the live input, plans, and executes the plan step by step, re-reading the cluster
/// and re-planning before each step (a re-run after an interruption continues where the
/// cluster is). First puts back any server an interrupted run left drained. Returns what it
/// did; with nothing pending, the plan is empty and nothing is touched.
pub async fn run_pending_restarts(
    inv: &Inventory,
    fleet: &Fleet,
    opts: &RollingOptions,
    progress: ProgressFn<'_>,
) -> Result<RollingReport, RollingError> {
    let agents = Agents::new(inv).map_err(|e| RollingError::Gather(format!("{e:#}")))?;
    let mut x = Exec {
        inv,
        fleet,
        agents,
        progress,
        done: Vec::new(),
    };
    for (m, what) in undrain_leftovers(inv, fleet).await? {
        x.did(&m, what);
    }
    let mut first_plan = None;
    let mut attempts: BTreeMap<(String, bool), u32> = BTreeMap::new();
    let mut steps_done = 0;
    loop {
        let input = gather_input(inv, &x.agents, fleet).await?;
        let plan = match plan_restarts(&input, opts) {
            Ok(p) => p,
            Err(refusal) if first_plan.is_some() => {
                return Err(RollingError::RefusedMidway {
                    steps: steps_done,
                    refusal,
                });
            }
            Err(r) => return Err(r.into()),
        };
        if first_plan.is_none() {
            first_plan = Some(plan.clone());
        }
        let Some((kind, step)) = plan
            .phases
            .iter()
            .find_map(|p| p.steps.first().map(|s| (p.kind, s.clone())))
        else {
            break;
        };
        let m = input
            .members
            .iter()
            .find(|m| m.name == step.member)
            .cloned()
            .expect("the planner names members of its input");
        let n = attempts
            .entry((step.member.clone(), kind == PhaseKind::Lower))
            .or_insert(0);
        if *n >= MAX_ATTEMPTS {
            let reason = if m.pending_restart {
                show_reason(&m)
            } else {
                format!("runs {}", show_values(&m.running, "="))
            };
            return Err(RollingError::StillPending {
                member: step.member,
                attempts: *n,
                reason,
            });
        }
        *n += 1;
        steps_done += 1;
        x.say(&format!("next: {step}"));
        match &step.action {
            StepAction::RestartReplica { gate } => {
                x.restart_replica(&m, gate, input.maximum_lag_on_failover)
                    .await?
            }
            StepAction::RestartPrimary => x.restart_primary(&m).await?,
            StepAction::Switchover { candidate } => x.switchover(&m, candidate).await?,
        }
    }
    Ok(RollingReport {
        plan: first_plan.unwrap_or_default(),
        done: x.done,
    })
}
