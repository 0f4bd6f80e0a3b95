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
//! This file is the pure planner (no I/O); [`executor`] runs its plans, [`haproxy`] drains.

use std::collections::BTreeMap;
use std::fmt;

use crate::pg::conf::{ControlData, hot_standby_minimums};

pub mod executor;
pub mod haproxy;
pub use executor::{
    CHECKPOINT_TIMEOUT, CONTROLDATA_TIMEOUT, DRAIN_TIMEOUT, PENDING_CLEAR_TIMEOUT,
    PRIMARY_BACK_TIMEOUT, ProgressFn, RESTART_CALL_TIMEOUT, RollingError, RollingReport,
    STREAM_TIMEOUT, gather_input, members_from_cluster, run_pending_restarts,
};
pub use haproxy::{current_sessions, drained_servers, haproxy_admin_command, undrain_leftovers};

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
    /// Never a switchover target.
    pub nofailover: bool,
    /// Never the sync standby, so it is ordered with the async replicas (its role says so
    /// already; kept for the plan's readers and future gates).
    pub nosync: bool,
    /// The five as recorded in its `pg_control` (on a standby: the primary's values replayed).
    pub controldata: HotValues,
    /// The five it runs with now (`SHOW`); the leader's entry gives the leader's current
    /// running values, against which a pending value counts as a decrease.
    pub running: HotValues,
}

impl MemberInput {
    fn is_running(&self) -> bool {
        // A replica replaying archived WAL runs too (it streams again once it reconnects).
        matches!(
            self.state.as_str(),
            "running" | "streaming" | "in archive recovery"
        )
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

pub use crate::inventory::PrimaryUpdateMethod;

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
                PhaseKind::Lower => {
                    "decreases of hot-standby parameters (the primary first, each replica once its pg_controldata shows them)"
                }
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

pub(crate) fn show_values(v: &HotValues, op: &str) -> String {
    v.iter()
        .map(|(p, x)| format!("{} {op} {x}", p.guc()))
        .collect::<Vec<_>>()
        .join(", ")
}

pub(crate) fn show_reason(m: &MemberInput) -> String {
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
            let why = if leader_lowers.is_empty() {
                "in place: replicas still run above it until phase 2".to_string()
            } else {
                format!(
                    "in place because it also applies the decrease of {lowered_text} (never a switchover for a decrease)"
                )
            };
            steps.push(in_place(format!(
                "{}; after every replica runs the increases, {why}",
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
