//! Departed PostgreSQL members: members the DCS still lists (`GET /cluster`) that are no
//! longer postgres hosts of the inventory, and how they are removed cleanly.
//!
//! Observe → decide → act:
//! - facts ([`DepartedFacts`], gathered by [`step::gather`]): the DCS members with their
//!   `host` / `api_url`, role, state, lag and tags, whether the cluster is paused, and the
//!   live synchronous-mode settings;
//! - the pure planner [`plan_departures`]: per departed member, drain from HAProxy → stop and
//!   disable its agent → its member key gone from the DCS → its slot gone from the leader; or a
//!   [`Refusal`] (nothing done) when removing it now is unsafe;
//! - the executor [`step::run`] (the `remove_departed` playbook step, and `pgherd remove`):
//!   every step is a postcondition a re-run re-checks from fresh facts (a member whose key is
//!   gone is no longer departed; the leader itself drops slots of members gone from the DCS).
//!
//! Its pg_hba lines go with the normal agent.yml re-render, its HAProxy server with the
//! HAProxy config re-render, its etcd member (if any) with the `etcd_members` step: the
//! playbook check puts `remove_departed` before those (the agent stops before its etcd member
//! is removed, HAProxy is re-rendered without it afterwards).

pub mod step;

use std::collections::BTreeSet;
use std::fmt;

use serde_json::Value;

use crate::api::docs::{ClusterDoc, Lag};
use crate::types::MemberName;

pub use step::{DepartedError, gather, run, still_answers};

/// One member as `GET /cluster` lists it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DcsMember {
    pub name: String,
    /// `leader`, `standby_leader`, `replica`, `sync_standby`, `quorum_standby`.
    pub role: String,
    /// `running`, `streaming`, `stopped`, ...
    pub state: String,
    /// The address PostgreSQL listens on (`host`), else the host of `api_url`.
    pub address: Option<String>,
    /// Replication lag in bytes (`lag`; `None` when unknown).
    pub lag: Option<u64>,
    pub nofailover: bool,
    pub nosync: bool,
    /// Its REST API (`api_url`), when the DCS gives one.
    pub api_url: Option<String>,
}

impl DcsMember {
    fn holds_leader_key(&self) -> bool {
        matches!(self.role.as_str(), "leader" | "standby_leader")
    }

    fn streaming(&self) -> bool {
        self.state == "streaming"
    }

    /// Could serve as a synchronous standby: a streaming replica without `nosync`.
    fn sync_eligible(&self) -> bool {
        !self.holds_leader_key() && self.streaming() && !self.nosync
    }
}

/// The synchronous-replication settings of the live DCS config.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SyncSettings {
    pub mode: bool,
    pub strict: bool,
    /// `synchronous_node_count` (Patroni's default 1).
    pub node_count: u64,
}

/// What the planner needs from the live cluster.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DepartedFacts {
    pub members: Vec<DcsMember>,
    /// Automatic failover off (`pause` in `/cluster` or the DCS config).
    pub paused: bool,
    pub sync: SyncSettings,
    /// The live `ttl` (how long a stopped member's key can outlive it), when known.
    pub ttl_secs: Option<u64>,
    /// Members the inventory moved to another address (a host replaced under the same name),
    /// with what still answers at the old one.
    pub moved: Vec<Moved>,
}

/// A member the inventory moved: the DCS lists it at `old`, the inventory at `new` (a failed
/// host replaced under the same name: `pgherd replace NAME --address NEW`, or the inventory
/// edited by hand).
///
/// Why it matters: the replacement runs an agent under the same name. If the old host were
/// still alive, two agents would share one member key, one slot and one etcd name: the
/// cluster could no longer tell them apart. So a move proceeds only once the old host is
/// proven silent.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Moved {
    pub member: String,
    pub old: String,
    pub new: String,
    /// What still answers at `old` (REST API, SSH port, a healthy etcd peer); empty = silent.
    pub alive: Vec<String>,
}

/// The members whose DCS address differs from the inventory's (`inventory`: postgres host
/// name → address). Pure; `alive` is left empty for the caller's probes.
pub fn moved_members(
    members: &[DcsMember],
    inventory: &std::collections::BTreeMap<String, String>,
) -> Vec<Moved> {
    members
        .iter()
        .filter_map(|m| {
            let new = inventory.get(&m.name)?;
            let old = m.address.as_ref()?;
            (old != new).then(|| Moved {
                member: m.name.clone(),
                old: old.clone(),
                new: new.clone(),
                alive: Vec::new(),
            })
        })
        .collect()
}

fn truthy(v: &Value) -> bool {
    match v {
        Value::Bool(b) => *b,
        Value::String(s) => matches!(s.to_ascii_lowercase().as_str(), "on" | "true" | "yes" | "1"),
        Value::Number(n) => n.as_u64().is_some_and(|n| n != 0),
        _ => false,
    }
}

/// `http://10.0.0.1:8008/patroni` → `10.0.0.1` (brackets of IPv6 literals removed; see
/// [`crate::dcs::url_host`]).
pub fn url_host(url: &str) -> Option<String> {
    crate::dcs::url_host(url).map(str::to_string)
}

impl DepartedFacts {
    /// Decodes a `GET /cluster` body and the live DCS config (`None` when unknown).
    pub fn from_cluster(
        cluster: &ClusterDoc,
        config: Option<&serde_json::Map<String, Value>>,
    ) -> Self {
        let members = cluster
            .members
            .iter()
            .map(|m| DcsMember {
                name: m.name.clone(),
                role: m.role.clone(),
                state: m.state.clone(),
                address: m
                    .host
                    .clone()
                    .filter(|h| !h.is_empty())
                    .or_else(|| url_host(&m.api_url)),
                lag: m.lag.as_ref().and_then(Lag::bytes),
                nofailover: m.tag("nofailover"),
                nosync: m.tag("nosync"),
                api_url: (!m.api_url.is_empty()).then(|| m.api_url.clone()),
            })
            .collect();
        let cfg = |k: &str| {
            config
                .and_then(|c| c.get(k))
                .cloned()
                .unwrap_or(Value::Null)
        };
        DepartedFacts {
            members,
            paused: cluster.pause || truthy(&cfg("pause")),
            sync: SyncSettings {
                mode: truthy(&cfg("synchronous_mode")),
                strict: truthy(&cfg("synchronous_mode_strict")),
                node_count: cfg("synchronous_node_count").as_u64().unwrap_or(1),
            },
            ttl_secs: cfg("ttl").as_u64(),
            moved: Vec::new(),
        }
    }
}

/// Options of [`plan_departures`].
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// A departing leader: switch over to the healthiest remaining replica first (instead of
    /// refusing).
    pub switchover_first: bool,
    /// Only this member (`pgherd remove NAME`); `None`: every departed member.
    pub only: Option<String>,
}

/// One step of a removal, each a postcondition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Hand the leader key from a departing member to a remaining replica.
    Switchover { from: String, to: String },
    /// Put the member's server into maintenance in every HAProxy's replica backend.
    Drain { member: String },
    /// Stop its agent (which stops PostgreSQL with a checkpoint) and disable it at boot, on
    /// its host at `address` (best effort: an unreachable host is skipped).
    StopAgent {
        member: String,
        address: Option<String>,
    },
    /// Wait until its member key is gone from the DCS.
    KeyGone { member: String },
    /// Wait until the leader has no slot `slot`, dropping it if still there and inactive.
    SlotGone { member: String, slot: String },
    /// A moved member whose old host is silent: wait until the DCS no longer lists it at
    /// `old` (its key expires with the dead agent's lease), so that the replacement at `new`
    /// starts under the same name without a stale key (the slot of the name is kept).
    MovedAway {
        member: String,
        old: String,
        new: String,
    },
}

impl Step {
    pub fn member(&self) -> &str {
        match self {
            Step::Switchover { from, .. } => from,
            Step::Drain { member }
            | Step::StopAgent { member, .. }
            | Step::KeyGone { member }
            | Step::SlotGone { member, .. }
            | Step::MovedAway { member, .. } => member,
        }
    }
}

impl fmt::Display for Step {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Step::Switchover { from, to } => write!(
                f,
                "switch over from {from} (leaving the inventory) to {to}, the healthiest remaining replica"
            ),
            Step::Drain { member } => write!(
                f,
                "{member}: put into maintenance in the replica backend of every HAProxy (no new read-only sessions)"
            ),
            Step::StopAgent {
                member,
                address: Some(a),
            } => write!(
                f,
                "{member}: stop its agent on {a} (PostgreSQL stops with a checkpoint) and disable it at boot (skipped if {a} does not answer)"
            ),
            Step::StopAgent {
                member,
                address: None,
            } => write!(
                f,
                "{member}: its agent cannot be stopped (the DCS gives no address for it); its key must expire on its own"
            ),
            Step::KeyGone { member } => write!(
                f,
                "{member}: wait until its member key is gone from the DCS (it expires with its lease)"
            ),
            Step::SlotGone { member, slot } => write!(
                f,
                "{member}: wait until the leader has no replication slot {slot} (dropped if still there and inactive), report the WAL it held"
            ),
            Step::MovedAway { member, old, new } => write!(
                f,
                "{member}: moves from {old} to {new}; {old} is silent (REST API, SSH, etcd peer): wait until the DCS no longer lists {member} at {old} (its key expires with the dead agent's lease), then {new} is provisioned under the same name (its slot kept)"
            ),
        }
    }
}

/// What a run removes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeparturePlan {
    /// The departing members, in DCS order.
    pub departing: Vec<String>,
    pub steps: Vec<Step>,
    /// `(what, why nothing to do)`.
    pub noops: Vec<(String, String)>,
}

impl DeparturePlan {
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }
}

/// Why a removal is refused (nothing is done).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "member {member} holds the leader key and is no longer in the inventory: switch over first (`pgherd switchover --candidate M`, or `pgherd remove {member} --switchover-first`), then re-run"
    )]
    Leader { member: String },
    #[error(
        "member {member} holds the leader key and no remaining member is a streaming replica without nofailover to switch over to"
    )]
    NoCandidate { member: String },
    #[error(
        "synchronous mode needs {needed} synchronous standby(s) (synchronous_node_count) but removing {departing} leaves {left} sync-eligible streaming replica(s)"
    )]
    SyncCapacity {
        departing: String,
        needed: u64,
        left: usize,
    },
    #[error(
        "synchronous_mode_strict is on and removing {departing} leaves no sync-eligible streaming replica (writes would block)"
    )]
    StrictNoStandby { departing: String },
    #[error(
        "the cluster is paused (automatic failover off): resume it (`pgherd resume`) before removing {departing}"
    )]
    Paused { departing: String },
    #[error(
        "member {member}: the inventory moves it from {old} to {new}, but {old} still answers ({evidence}): a second node would run under the same name. Stop it there first, or remove it (`pgherd remove`) and add the new host under a new name"
    )]
    MovedAlive {
        member: String,
        old: String,
        new: String,
        evidence: String,
    },
    #[error(
        "member {member} holds the leader key at {old}, and the inventory moves it to {new}: the agents fail over once its leader lease expires (ttl{ttl}); re-run then, or switch over first if {old} is alive"
    )]
    MovedLeader {
        member: String,
        old: String,
        new: String,
        ttl: String,
    },
    #[error(
        "{departing} leave in one run while {not_streaming} is not streaming: remove one member at a time until every remaining replica streams"
    )]
    SeveralWhileNotStreaming {
        departing: String,
        not_streaming: String,
    },
}

/// Plans the removal of the DCS members that are not postgres hosts of the inventory
/// (`inventory`: their names). Pure.
pub fn plan_departures(
    facts: &DepartedFacts,
    inventory: &BTreeSet<String>,
    opts: &PlanOptions,
) -> Result<DeparturePlan, Refusal> {
    let departing: Vec<&DcsMember> = facts
        .members
        .iter()
        .filter(|m| !inventory.contains(&m.name))
        .filter(|m| opts.only.as_ref().is_none_or(|o| o == &m.name))
        .collect();
    let mut plan = DeparturePlan::default();
    for mv in &facts.moved {
        if opts.only.is_some() {
            break;
        }
        if !mv.alive.is_empty() {
            return Err(Refusal::MovedAlive {
                member: mv.member.clone(),
                old: mv.old.clone(),
                new: mv.new.clone(),
                evidence: mv.alive.join("; "),
            });
        }
        // A silent old host that still holds the leader key: the agents promote a replica
        // once its lease lapses. pgherd never takes the key away itself (that would be a
        // promotion without the HA loop's checks).
        if facts
            .members
            .iter()
            .any(|m| m.name == mv.member && m.holds_leader_key())
        {
            return Err(Refusal::MovedLeader {
                member: mv.member.clone(),
                old: mv.old.clone(),
                new: mv.new.clone(),
                ttl: facts
                    .ttl_secs
                    .map(|t| format!(" {t} s"))
                    .unwrap_or_default(),
            });
        }
        plan.steps.push(Step::MovedAway {
            member: mv.member.clone(),
            old: mv.old.clone(),
            new: mv.new.clone(),
        });
    }
    if departing.is_empty() {
        if plan.steps.is_empty() {
            plan.noops.push((
                "departed members".into(),
                "every member in the DCS is a postgres host of the inventory".into(),
            ));
        }
        return Ok(plan);
    }
    let names: Vec<String> = departing.iter().map(|m| m.name.clone()).collect();
    let list = names.join(", ");
    let gone = |m: &DcsMember| names.contains(&m.name);
    // Paused: the agents do not fail over, so a stopped member cannot be replaced by the HA
    // loop; and the operator paused for a reason.
    if facts.paused {
        return Err(Refusal::Paused { departing: list });
    }
    let remaining: Vec<&DcsMember> = facts.members.iter().filter(|m| !gone(m)).collect();
    // One at a time unless every remaining replica streams: two members away at once while a
    // third lags leaves no safe failover target.
    if departing.len() > 1
        && let Some(ns) = remaining
            .iter()
            .filter(|m| !m.holds_leader_key() && !m.streaming())
            .map(|m| m.name.clone())
            .reduce(|a, b| format!("{a}, {b}"))
    {
        return Err(Refusal::SeveralWhileNotStreaming {
            departing: list,
            not_streaming: ns,
        });
    }
    // The departing leader: never stopped while it holds the key (the stop would be an
    // unplanned failover); a planned switchover to the best remaining replica when asked.
    let mut new_leader: Option<String> = None;
    if let Some(l) = departing.iter().find(|m| m.holds_leader_key()) {
        if !opts.switchover_first {
            return Err(Refusal::Leader {
                member: l.name.clone(),
            });
        }
        let candidates = remaining
            .iter()
            .filter(|m| m.streaming() && !m.nofailover && !m.holds_leader_key());
        // In synchronous mode only a synchronous standby may take over without data loss.
        let best = candidates
            .filter(|m| !facts.sync.mode || m.role == "sync_standby")
            .min_by_key(|m| (m.lag.unwrap_or(u64::MAX), m.name.clone()));
        let Some(c) = best else {
            return Err(Refusal::NoCandidate {
                member: l.name.clone(),
            });
        };
        new_leader = Some(c.name.clone());
        plan.steps.push(Step::Switchover {
            from: l.name.clone(),
            to: c.name.clone(),
        });
    }
    if facts.sync.mode && departing.iter().any(|m| m.sync_eligible()) {
        let left = remaining
            .iter()
            .filter(|m| m.sync_eligible() && new_leader.as_deref() != Some(m.name.as_str()))
            .count();
        if facts.sync.strict && left == 0 {
            return Err(Refusal::StrictNoStandby { departing: list });
        }
        if (left as u64) < facts.sync.node_count {
            return Err(Refusal::SyncCapacity {
                departing: list,
                needed: facts.sync.node_count,
                left,
            });
        }
    }
    for m in departing {
        plan.departing.push(m.name.clone());
        plan.steps.push(Step::Drain {
            member: m.name.clone(),
        });
        plan.steps.push(Step::StopAgent {
            member: m.name.clone(),
            address: m.address.clone(),
        });
        plan.steps.push(Step::KeyGone {
            member: m.name.clone(),
        });
        plan.steps.push(Step::SlotGone {
            member: m.name.clone(),
            slot: MemberName::new(m.name.clone()).slot_name(),
        });
    }
    Ok(plan)
}

/// The plan section for `pgherd plan` / `apply`.
pub fn render(plan: &Result<DeparturePlan, Refusal>, show_noops: bool) -> String {
    let mut out = String::new();
    match plan {
        Err(r) => out.push_str(&format!("cluster: departed members: refused: {r}\n")),
        Ok(p) => {
            if p.steps.is_empty() && !show_noops {
                return out;
            }
            out.push_str(&format!(
                "cluster: departed members: {} step(s){}\n",
                p.steps.len(),
                if p.departing.is_empty() {
                    String::new()
                } else {
                    format!(" removing {}", p.departing.join(", "))
                }
            ));
            for s in &p.steps {
                out.push_str(&format!("  change     {s}\n"));
            }
            if show_noops {
                for (what, why) in &p.noops {
                    out.push_str(&format!("  no change  {what}: {why}\n"));
                }
            }
        }
    }
    out
}
