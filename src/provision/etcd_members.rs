//! etcd membership from the inventory: which members the live etcd cluster has, which it should
//! have (the inventory's hosts with the `etcd` role), and the one-at-a-time changes between the
//! two (`member add --learner` → start → `member promote`, `member remove`), with the quorum
//! gates of day2.md §5.1. etcd reads `initial-cluster*` only when a member first starts, so
//! once the cluster exists, membership is changed through its API, never through etcd.conf.
//!
//! Observe → decide → act:
//! - facts ([`EtcdFacts`], [`gather`]): `etcdctl member list -w json` from one running etcd host
//!   of the inventory, then `endpoint status -w json` (raft index, leader, learner flag) and
//!   `endpoint health -w json` over every started member; decoded purely
//!   ([`decode_facts`]). A fresh cluster (no etcd answers anywhere) has no facts;
//! - the pure planner [`plan_members`]: adds, removals and replacements in a safe order, or a
//!   [`Refusal`] (nothing is done) when a gate fails;
//! - the step ([`run`]): re-reads the facts, plans, executes the first change, and repeats, so
//!   every change is a postcondition a re-run re-checks (a run cut after `member add` finds the
//!   peer URL listed but unstarted and only renders and starts the member).
//!
//! The pure part (types, decoders, planner) is this file; the I/O (gathering over SSH, the
//! step) is [`step`].
//!
//! Hosts removed from the inventory are not in the fleet: [`run`] reaches them best effort with
//! the inventory's SSH defaults at the address in their peer URL (a dead host is never waited
//! on), to stop etcd there and wipe its data directory, so it cannot come back as a zombie.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Duration;

use serde_json::Value;

use super::desired::DesiredMember;

mod step;
pub use step::{EtcdMembersError, ProgressFn, gather, run};

/// Reading the member list and the members' status: a few etcdctl calls, each bounded by its
/// own 1 s dial / 3 s command timeouts, so a dead member costs seconds, not the whole bound.
pub const FACTS_TIMEOUT: Duration = Duration::from_secs(30);
/// One `member add` / `promote` / `remove` call: a raft proposal the leader commits at once
/// when a quorum is up (etcdctl's own command timeout is set lower, to 5 s).
pub const MEMBER_CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// How long `member promote` is retried while etcd says the learner is not in sync yet.
pub const PROMOTE_TIMEOUT: Duration = Duration::from_secs(60);
/// etcd's strict reconfiguration check answers "unhealthy cluster" until the leader has been
/// connected to every voter for 5 s (its `HealthInterval`), e.g. right after a promotion: a
/// membership call is retried that long, and some more.
pub const RECONFIG_RETRY: Duration = Duration::from_secs(30);
/// Poll interval of the join and promote waits.
const POLL: Duration = Duration::from_millis(500);
/// A learner is "near the leader" when its raft index reached this share of the leader's
/// (in per cent): etcd's own promote check uses 90 % of the leader's progress.
const SYNC_PERCENT: u64 = 90;

pub use crate::render::ETCD_INITIAL_CLUSTER_PLACEHOLDER as INITIAL_CLUSTER_PLACEHOLDER;

/// What a member's etcd.conf holds that etcd reads only when its data directory is empty.
pub const INITIAL_ONLY_KEYS: [&str; 4] = [
    "initial-cluster",
    "initial-cluster-state",
    "initial-cluster-token",
    "initial-advertise-peer-urls",
];

/// One member as `member list` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub id: u64,
    /// Empty while the member was added but has not started yet.
    pub name: String,
    pub peer_urls: Vec<String>,
    pub client_urls: Vec<String>,
    pub is_learner: bool,
}

impl Member {
    pub fn started(&self) -> bool {
        !self.name.is_empty()
    }

    /// The ID as etcdctl prints it (hex).
    pub fn hex_id(&self) -> String {
        format!("{:x}", self.id)
    }

    pub fn label(&self) -> String {
        if self.name.is_empty() {
            format!("(unstarted) {}", self.peer_urls.join(","))
        } else {
            self.name.clone()
        }
    }
}

/// What one member answered to `endpoint status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct EndpointStatus {
    pub member_id: u64,
    /// The leader this member follows (0: none).
    pub leader: u64,
    pub raft_index: u64,
    pub is_learner: bool,
}

/// The live etcd cluster's membership.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EtcdFacts {
    /// The inventory host the facts were read through.
    pub via: String,
    pub members: Vec<Member>,
    /// By member ID: the members that answered `endpoint status`.
    pub status: BTreeMap<u64, EndpointStatus>,
    /// Member IDs whose `endpoint health` passed (a learner never passes: it serves no reads).
    pub healthy: BTreeSet<u64>,
}

impl EtcdFacts {
    /// The leader's ID, as the members that answered report it.
    pub fn leader(&self) -> Option<u64> {
        self.status
            .values()
            .map(|s| s.leader)
            .find(|l| *l != 0 && self.members.iter().any(|m| m.id == *l))
    }

    /// Whether the member is up: a voter that passes `endpoint health`, or a started learner
    /// that answers `endpoint status`.
    pub fn is_up(&self, m: &Member) -> bool {
        if m.is_learner {
            m.started() && self.status.contains_key(&m.id)
        } else {
            self.healthy.contains(&m.id)
        }
    }

    /// Whether the learner `m` caught up with the leader (see [`SYNC_PERCENT`]).
    pub fn in_sync(&self, m: &Member) -> bool {
        let (Some(l), Some(s)) = (
            self.leader().and_then(|l| self.status.get(&l)),
            self.status.get(&m.id),
        ) else {
            return false;
        };
        s.raft_index.saturating_mul(100) >= l.raft_index.saturating_mul(SYNC_PERCENT)
    }

    pub fn member_by_url(&self, url: &str) -> Option<&Member> {
        self.members
            .iter()
            .find(|m| m.peer_urls.iter().any(|u| u == url))
    }

    /// Client URLs of the voters that are up, except `except`.
    pub fn up_voter_endpoints(&self, except: Option<u64>) -> Vec<String> {
        self.members
            .iter()
            .filter(|m| !m.is_learner && Some(m.id) != except && self.is_up(m))
            .flat_map(|m| m.client_urls.iter().take(1).cloned())
            .collect()
    }
}

/// Output of etcdctl that could not be decoded.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("cannot decode `etcdctl {what}` output: {message}")]
pub struct DecodeError {
    pub what: &'static str,
    pub message: String,
}

fn decode_err(what: &'static str, message: impl Into<String>) -> DecodeError {
    DecodeError {
        what,
        message: message.into(),
    }
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|s| s.as_str().map(str::to_string))
        .collect()
}

/// Decodes `etcdctl member list -w json` (also the `members` of `member add -w json`). IDs are
/// JSON numbers up to 2^64: serde_json keeps them exact as `u64`.
pub fn parse_member_list(json: &str) -> Result<Vec<Member>, DecodeError> {
    let v: Value = serde_json::from_str(json.trim())
        .map_err(|e| decode_err("member list -w json", e.to_string()))?;
    let members = v["members"]
        .as_array()
        .ok_or_else(|| decode_err("member list -w json", "no members array"))?;
    members
        .iter()
        .map(|m| {
            Ok(Member {
                id: m["ID"]
                    .as_u64()
                    .ok_or_else(|| decode_err("member list -w json", "a member without an ID"))?,
                name: m["name"].as_str().unwrap_or_default().to_string(),
                peer_urls: strings(&m["peerURLs"]),
                client_urls: strings(&m["clientURLs"]),
                is_learner: m["isLearner"].as_bool().unwrap_or(false),
            })
        })
        .collect()
}

/// Decodes `etcdctl endpoint status -w json` (only the endpoints that answered are listed).
pub fn parse_endpoint_status(json: &str) -> Result<Vec<EndpointStatus>, DecodeError> {
    let t = json.trim();
    if t.is_empty() {
        return Ok(Vec::new());
    }
    let v: Value = serde_json::from_str(t)
        .map_err(|e| decode_err("endpoint status -w json", e.to_string()))?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            let s = &e["Status"];
            Some(EndpointStatus {
                member_id: s["header"]["member_id"].as_u64()?,
                leader: s["leader"].as_u64().unwrap_or(0),
                raft_index: s["raftIndex"].as_u64().unwrap_or(0),
                is_learner: s["isLearner"].as_bool().unwrap_or(false),
            })
        })
        .collect())
}

/// Decodes `etcdctl endpoint health -w json`: endpoint URL → healthy.
pub fn parse_endpoint_health(json: &str) -> Result<BTreeMap<String, bool>, DecodeError> {
    let t = json.trim();
    if t.is_empty() {
        return Ok(BTreeMap::new());
    }
    let v: Value = serde_json::from_str(t)
        .map_err(|e| decode_err("endpoint health -w json", e.to_string()))?;
    Ok(v.as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| {
            Some((
                e["endpoint"].as_str()?.to_string(),
                e["health"].as_bool().unwrap_or(false),
            ))
        })
        .collect())
}

/// The facts from the three etcdctl outputs (pure).
pub fn decode_facts(
    via: &str,
    member_list: &str,
    status: &str,
    health: &str,
) -> Result<EtcdFacts, DecodeError> {
    let members = parse_member_list(member_list)?;
    let status = parse_endpoint_status(status)?
        .into_iter()
        .map(|s| (s.member_id, s))
        .collect();
    let health = parse_endpoint_health(health)?;
    let healthy = members
        .iter()
        .filter(|m| m.client_urls.iter().any(|u| health.get(u) == Some(&true)))
        .map(|m| m.id)
        .collect();
    Ok(EtcdFacts {
        via: via.to_string(),
        members,
        status,
        healthy,
    })
}

// ---- the planner -------------------------------------------------------------------------------

/// Planner settings.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PlanOptions {
    /// Accept a final voter count below 3 or even (no or no extra fault tolerance).
    pub allow_degraded_etcd: bool,
}

/// Why a member is removed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RemoveReason {
    /// Matched neither by name nor by peer URL.
    NotInInventory,
    /// Its name is in the inventory with another peer URL (a replaced host).
    Replaced { new_peer_url: String },
}

/// One membership change, in execution order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MemberChange {
    /// `member add --learner`, render etcd.conf from the returned list, start, promote.
    Add {
        name: String,
        peer_url: String,
        client_url: String,
    },
    /// Our peer URL is listed but the member never started (a run was cut after `member
    /// add`): render etcd.conf, start, promote.
    StartJoined {
        id: u64,
        name: String,
        peer_url: String,
    },
    /// A started learner with our peer URL: wait until it is in sync, then promote it.
    Promote {
        id: u64,
        name: String,
        peer_url: String,
    },
    /// `member remove`, then stop etcd on the host and wipe its data directory (best effort).
    Remove {
        id: u64,
        name: String,
        peer_url: String,
        reason: RemoveReason,
        /// Down (not healthy): removed before anything else, since it counts against quorum.
        dead: bool,
    },
}

impl MemberChange {
    /// The inventory host the change starts etcd on (adds and resumed joins).
    pub fn joining_host(&self) -> Option<&str> {
        match self {
            MemberChange::Add { name, .. } | MemberChange::StartJoined { name, .. } => Some(name),
            _ => None,
        }
    }
}

impl fmt::Display for MemberChange {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MemberChange::Add { name, peer_url, .. } => write!(
                f,
                "add etcd member {name} ({peer_url}) as a learner, then promote it"
            ),
            MemberChange::StartJoined { id, name, peer_url } => write!(
                f,
                "start etcd member {name} ({peer_url}, id {id:x}): already added by an earlier run but never started; then promote it"
            ),
            MemberChange::Promote { id, name, peer_url } => write!(
                f,
                "promote etcd learner {name} ({peer_url}, id {id:x}) once it is in sync with the leader"
            ),
            MemberChange::Remove {
                id,
                name,
                peer_url,
                reason,
                dead,
            } => {
                let who = if name.is_empty() {
                    format!("etcd member (unstarted, {peer_url})")
                } else {
                    format!("etcd member {name}")
                };
                write!(f, "remove {who} (id {id:x}): ")?;
                match reason {
                    RemoveReason::NotInInventory => f.write_str("not in the inventory")?,
                    RemoveReason::Replaced { new_peer_url } => write!(
                        f,
                        "replaced: the inventory has it at {new_peer_url} (removed before the new one is added)"
                    )?,
                }
                if *dead {
                    f.write_str(
                        "; it is down, so it goes first (a dead member counts against quorum)",
                    )?;
                }
                Ok(())
            }
        }
    }
}

/// The membership part of a plan.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MemberPlan {
    pub changes: Vec<MemberChange>,
    /// `(what, why nothing changes)`.
    pub noops: Vec<(String, String)>,
    /// Voters after every change.
    pub final_voters: usize,
}

impl MemberPlan {
    /// Inventory hosts whose etcd the membership step starts (their etcd.conf and start belong
    /// to that step, not to the render and start steps).
    pub fn joining_hosts(&self) -> BTreeSet<String> {
        self.changes
            .iter()
            .filter_map(|c| c.joining_host().map(str::to_string))
            .collect()
    }
}

/// Why the planner refuses to change membership (nothing is done).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error(
        "etcd members {} are not healthy: a membership change needs every remaining member up (fix or remove them first)",
        .0.join(", ")
    )]
    Unhealthy(Vec<String>),
    #[error("the etcd cluster has no leader: no membership change without one")]
    NoLeader,
    #[error(
        "etcd learner {name} (id {id:x}) is already pending and is not in the inventory: promote or remove it first (one learner at a time)"
    )]
    LearnerPending { name: String, id: u64 },
    #[error(
        "`{change}` would leave {up} started member(s) of {voters} voters, below the quorum of {needed}"
    )]
    Quorum {
        change: String,
        up: usize,
        voters: usize,
        needed: usize,
    },
    #[error(
        "the etcd cluster would end with {voters} voter(s): fewer than 3 or an even number tolerates no more failures than one member fewer (allow_degraded_etcd overrides)"
    )]
    Degraded { voters: usize },
}

fn quorum(voters: usize) -> usize {
    voters / 2 + 1
}

/// Plans membership changes from the inventory's etcd hosts and the live members (pure; see
/// the module doc). `None` facts: a fresh cluster, nothing to change (the members form the
/// cluster from `initial-cluster` when they first start).
pub fn plan_members(
    desired: &[DesiredMember],
    facts: Option<&EtcdFacts>,
    opts: PlanOptions,
) -> Result<MemberPlan, Refusal> {
    let Some(f) = facts else {
        return Ok(MemberPlan {
            changes: Vec::new(),
            noops: vec![(
                "etcd membership".into(),
                "fresh cluster: no etcd member runs yet; the members form the cluster from initial-cluster when they first start".into(),
            )],
            final_voters: desired.len(),
        });
    };
    let mut noops = Vec::new();
    let mut first_removals = Vec::new();
    let mut resumes = Vec::new();
    let mut adds = Vec::new();
    let mut live_removals = Vec::new();
    let mut removed: BTreeSet<u64> = BTreeSet::new();
    let mut pending: BTreeSet<u64> = BTreeSet::new();
    for m in &f.members {
        let by_url = desired.iter().find(|d| m.peer_urls.contains(&d.peer_url));
        let by_name = desired.iter().find(|d| m.started() && d.name == m.name);
        let url = m.peer_urls.first().cloned().unwrap_or_default();
        match (by_url, by_name) {
            (Some(d), _) if !m.started() => {
                pending.insert(m.id);
                resumes.push(MemberChange::StartJoined {
                    id: m.id,
                    name: d.name.clone(),
                    peer_url: d.peer_url.clone(),
                });
            }
            (Some(d), _) if m.is_learner => {
                pending.insert(m.id);
                resumes.push(MemberChange::Promote {
                    id: m.id,
                    name: d.name.clone(),
                    peer_url: d.peer_url.clone(),
                });
            }
            (Some(d), _) => {
                let state = if f.is_up(m) { "healthy" } else { "NOT healthy" };
                let renamed = if d.name != m.name {
                    format!(
                        " (runs as {:?}; etcd keeps the name it started with)",
                        m.name
                    )
                } else {
                    String::new()
                };
                noops.push((
                    format!("etcd member {}", d.name),
                    format!(
                        "a started voter at {} (id {:x}), {state}, in the inventory{renamed}",
                        d.peer_url, m.id
                    ),
                ));
            }
            (None, by_name) => {
                let dead = !f.is_up(m);
                let reason = match by_name {
                    Some(d) => RemoveReason::Replaced {
                        new_peer_url: d.peer_url.clone(),
                    },
                    None => RemoveReason::NotInInventory,
                };
                if m.is_learner && m.started() && by_name.is_none() {
                    return Err(Refusal::LearnerPending {
                        name: m.label(),
                        id: m.id,
                    });
                }
                removed.insert(m.id);
                let replaced = matches!(reason, RemoveReason::Replaced { .. });
                let c = MemberChange::Remove {
                    id: m.id,
                    name: m.name.clone(),
                    peer_url: url,
                    reason,
                    dead,
                };
                // etcd FAQ: replace a member by removing it first, then adding the new one.
                if dead || replaced {
                    first_removals.push(c);
                } else {
                    live_removals.push(c);
                }
            }
        }
    }
    for d in desired {
        if f.member_by_url(&d.peer_url).is_none() {
            adds.push(MemberChange::Add {
                name: d.name.clone(),
                peer_url: d.peer_url.clone(),
                client_url: d.client_url.clone(),
            });
        }
    }
    // Dead members first, then the interrupted join (one learner at a time), then adds one at
    // a time, then live removals.
    first_removals.sort_by_key(|c| !matches!(c, MemberChange::Remove { dead: true, .. }));
    let changes: Vec<MemberChange> = first_removals
        .into_iter()
        .chain(resumes)
        .chain(adds)
        .chain(live_removals)
        .collect();

    // Simulate the sequence: voters and voters up after each change.
    let mut voters = f.members.iter().filter(|m| !m.is_learner).count();
    let mut up = f
        .members
        .iter()
        .filter(|m| !m.is_learner && f.is_up(m))
        .count();
    if !changes.is_empty() {
        let unhealthy: Vec<String> = f
            .members
            .iter()
            .filter(|m| !removed.contains(&m.id) && !pending.contains(&m.id) && !f.is_up(m))
            .map(Member::label)
            .collect();
        if !unhealthy.is_empty() {
            return Err(Refusal::Unhealthy(unhealthy));
        }
        if f.leader().is_none() {
            return Err(Refusal::NoLeader);
        }
    }
    for c in &changes {
        match c {
            MemberChange::Remove { id, dead, .. } => {
                let was_voter = f.members.iter().any(|m| m.id == *id && !m.is_learner);
                if was_voter {
                    voters -= 1;
                    if !dead {
                        up -= 1;
                    }
                }
            }
            MemberChange::Add { .. } | MemberChange::Promote { .. } => {
                voters += 1;
                up += 1;
            }
            MemberChange::StartJoined { id, .. } => {
                let learner = f.members.iter().any(|m| m.id == *id && m.is_learner);
                if learner {
                    voters += 1;
                }
                up += 1;
            }
        }
        if up < quorum(voters) || voters == 0 {
            return Err(Refusal::Quorum {
                change: c.to_string(),
                up,
                voters,
                needed: quorum(voters),
            });
        }
    }
    if !changes.is_empty() && (voters < 3 || voters % 2 == 0) && !opts.allow_degraded_etcd {
        return Err(Refusal::Degraded { voters });
    }
    Ok(MemberPlan {
        changes,
        noops,
        final_voters: voters,
    })
}

/// Whether two etcd.conf texts differ only in the `initial-*` settings etcd reads when it first
/// starts (pure; line-based, as pgherd renders one `key: value` per line).
pub fn differs_only_in_initial_settings(old: &str, new: &str) -> bool {
    let keep = |t: &str| -> Vec<String> {
        t.lines()
            .filter(|l| {
                let key = l.split(':').next().unwrap_or("").trim();
                !INITIAL_ONLY_KEYS.contains(&key)
            })
            .map(|l| l.trim_end().to_string())
            .collect()
    };
    old != new && keep(old) == keep(new)
}

/// `name=peer_url,...` for a joining member's `initial-cluster`: every member etcd lists, the
/// unstarted one under `joining` (its name is empty until it starts).
pub fn join_initial_cluster(members: &[Member], joining: &str, joining_url: &str) -> String {
    members
        .iter()
        .filter_map(|m| {
            let url = m.peer_urls.first()?;
            let name = if m.peer_urls.iter().any(|u| u == joining_url) {
                joining
            } else {
                m.name.as_str()
            };
            Some(format!("{name}={url}"))
        })
        .collect::<Vec<_>>()
        .join(",")
}

/// `name` (a member) and its address from a peer URL `http://addr:port`.
fn url_host(url: &str) -> Option<String> {
    let rest = url.split("://").nth(1)?;
    let hostport = rest.split('/').next()?;
    let host = match hostport.rsplit_once(':') {
        Some((h, _)) => h,
        None => hostport,
    };
    Some(host.trim_matches(['[', ']']).to_string())
}

/// The membership plan as text (for `pgherd plan`).
pub fn render(plan: &Result<MemberPlan, Refusal>, show_noops: bool) -> String {
    let mut out = String::new();
    match plan {
        Err(r) => {
            out.push_str(&format!("cluster: etcd membership: refused: {r}\n"));
        }
        Ok(p) => {
            if p.changes.is_empty() && !show_noops {
                return out;
            }
            out.push_str(&format!(
                "cluster: etcd membership: {} change(s)\n",
                p.changes.len()
            ));
            for c in &p.changes {
                out.push_str(&format!("  change     {c}\n"));
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
