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
//! Hosts removed from the inventory are not in the fleet: [`run`] reaches them best effort with
//! the inventory's SSH defaults at the address in their peer URL (a dead host is never waited
//! on), to stop etcd there and wipe its data directory, so it cannot come back as a zombie.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde_json::Value;

use super::apply::Fleet;
use super::plan::DeploySpec;
use super::services::{Service, ServiceMode, ServiceOp, op_command};
use crate::transport::{HostSpec, SshTransport, Transport, TransportError, shell_quote};

/// Reading the member list and the members' status: a few etcdctl calls, each bounded by its
/// own 1 s dial / 3 s command timeouts, so a dead member costs seconds, not the whole bound.
pub const FACTS_TIMEOUT: Duration = Duration::from_secs(30);
/// One `member add` / `promote` / `remove` call: a raft proposal the leader commits at once
/// when a quorum is up (etcdctl's own command timeout is set lower, to 5 s).
pub const MEMBER_CALL_TIMEOUT: Duration = Duration::from_secs(20);
/// A joining member must fetch the leader's snapshot and log before it can be promoted; the
/// DCS of one PostgreSQL cluster is a few MB, so this is generous.
pub const JOIN_TIMEOUT: Duration = Duration::from_secs(120);
/// How long `member promote` is retried while etcd says the learner is not in sync yet.
pub const PROMOTE_TIMEOUT: Duration = Duration::from_secs(60);
/// A host removed from the inventory may be dead: its cleanup never waits longer than this to
/// connect.
pub const REMOVED_HOST_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Poll interval of the join and promote waits.
const POLL: Duration = Duration::from_millis(500);
/// A learner is "near the leader" when its raft index reached this share of the leader's
/// (in per cent): etcd's own promote check uses 90 % of the leader's progress.
const SYNC_PERCENT: u64 = 90;

/// Stands for the member list etcd returns in a joining member's pre-rendered etcd.conf (see
/// [`crate::render::Renderer::render_etcd_join`]): replaced at `member add` time.
pub const INITIAL_CLUSTER_PLACEHOLDER: &str = "@@pgherd-initial-cluster@@";

/// What a member's etcd.conf holds that etcd reads only when its data directory is empty.
pub const INITIAL_ONLY_KEYS: [&str; 4] = [
    "initial-cluster",
    "initial-cluster-state",
    "initial-cluster-token",
    "initial-advertise-peer-urls",
];

/// The inventory's view of one etcd member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredMember {
    pub name: String,
    /// `http://addr:peer_port`.
    pub peer_url: String,
    /// `http://addr:client_port`.
    pub client_url: String,
}

/// The etcd side of the desired state (embedded etcd only), built from the inventory.
#[derive(Debug, Clone)]
pub struct EtcdSpec {
    /// The inventory's etcd hosts, in inventory order.
    pub members: Vec<DesiredMember>,
    pub data_dir: String,
    /// Where etcd.conf is written on a member.
    pub config_path: String,
    /// Mode and `user:group` of etcd.conf.
    pub config_mode: u32,
    pub config_owner: String,
    /// Per etcd host: its etcd.conf for joining a running cluster (`initial-cluster-state:
    /// existing`, the member list still [`INITIAL_CLUSTER_PLACEHOLDER`]).
    pub join_configs: BTreeMap<String, String>,
    /// How to reach a host that left the inventory (the inventory's SSH defaults; address
    /// filled in from the member's peer URL).
    pub ssh_defaults: HostSpec,
    /// Allow a final voter count below 3 or even.
    pub allow_degraded: bool,
}

impl EtcdSpec {
    /// The directory whose presence says a member's data directory is initialised.
    pub fn member_dir(&self) -> String {
        format!("{}/member", self.data_dir.trim_end_matches('/'))
    }
}

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

    fn label(&self) -> String {
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
        let by_url = desired
            .iter()
            .find(|d| m.peer_urls.iter().any(|u| *u == d.peer_url));
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

// ---- facts (I/O) -------------------------------------------------------------------------------

/// Why the membership step failed.
#[derive(Debug, thiserror::Error)]
pub enum EtcdMembersError {
    #[error("etcd membership change refused, nothing was changed")]
    Refused(#[from] Refusal),
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error("host {host}: etcd membership facts")]
    Decode {
        host: String,
        #[source]
        source: DecodeError,
    },
    #[error("host {host}: `{what}` failed: {stderr}")]
    Etcdctl {
        host: String,
        what: String,
        stderr: String,
    },
    #[error("etcd member {name}: timed out after {timeout:?} waiting until {what}")]
    Wait {
        name: String,
        what: String,
        timeout: Duration,
    },
    #[error("no etcd member answers any more (the cluster lost its quorum?)")]
    NoCluster,
    #[error("host {host}: no etcd.conf to join the cluster with (is it an etcd host?)")]
    NoJoinConfig { host: String },
    #[error("host {host} is not connected")]
    NotConnected { host: String },
}

const ETCDCTL: &str = "ETCDCTL_API=3 etcdctl --dial-timeout=1s --command-timeout=5s";

/// Reads the membership through `t` (an etcd host) asking `endpoint` first. `Ok(None)`: that
/// member does not answer.
async fn gather_via(
    t: &dyn Transport,
    endpoint: &str,
) -> Result<Option<EtcdFacts>, EtcdMembersError> {
    let cmd = format!(
        "{ETCDCTL} --endpoints={} member list -w json 2>/dev/null",
        shell_quote(endpoint)
    );
    let out = t.run(&cmd, FACTS_TIMEOUT).await?;
    if !out.success() {
        return Ok(None);
    }
    let list = out.stdout_str();
    let members = parse_member_list(&list).map_err(|source| EtcdMembersError::Decode {
        host: t.host().into(),
        source,
    })?;
    let all: Vec<String> = members
        .iter()
        .flat_map(|m| m.client_urls.iter().take(1).cloned())
        .collect();
    let voters: Vec<String> = members
        .iter()
        .filter(|m| !m.is_learner)
        .flat_map(|m| m.client_urls.iter().take(1).cloned())
        .collect();
    let (mut status, mut health) = (String::new(), String::new());
    if !all.is_empty() {
        // Unreachable endpoints are left out of the JSON (and the exit status is 1): fine.
        let cmd = format!(
            "{ETCDCTL} --endpoints={} endpoint status -w json 2>/dev/null; echo; echo @@pgherd@@; \
             {ETCDCTL} --endpoints={} endpoint health -w json 2>/dev/null; exit 0",
            shell_quote(&all.join(",")),
            shell_quote(&voters.join(","))
        );
        let out = t.run(&cmd, FACTS_TIMEOUT).await?.stdout_str();
        let (s, h) = out.split_once("@@pgherd@@").unwrap_or((&out, ""));
        status = s.to_string();
        health = h.to_string();
    }
    decode_facts(t.host(), &list, &status, &health)
        .map(Some)
        .map_err(|source| EtcdMembersError::Decode {
            host: t.host().into(),
            source,
        })
}

/// The live membership, read through the first etcd host of the inventory whose member
/// answers. `Ok(None)`: no member answers (a fresh cluster, or every member down).
pub async fn gather(
    spec: &DeploySpec,
    fleet: &Fleet,
) -> Result<Option<EtcdFacts>, EtcdMembersError> {
    let Some(es) = &spec.etcd else {
        return Ok(None);
    };
    for d in &es.members {
        let Some(t) = fleet.get(&d.name) else {
            continue;
        };
        match gather_via(t.as_ref(), &d.client_url).await {
            Ok(Some(f)) => return Ok(Some(f)),
            Ok(None) => continue,
            // An unreachable host: another one may answer.
            Err(EtcdMembersError::Transport(e)) => {
                tracing::debug!(host = %d.name, error = %e, "etcd facts: host unreachable");
                continue;
            }
            Err(e) => return Err(e),
        }
    }
    Ok(None)
}

// ---- the step (I/O) ----------------------------------------------------------------------------

/// Where `run` reports progress: `(host, message)`.
pub type ProgressFn<'a> = &'a (dyn Fn(&str, &str) + Sync);

/// Shell deciding the service mode like the facts script does, into `$mode`.
const MODE: &str = "mode=supervisor; if [ -d /run/systemd/system ] && [ \"$(cat /proc/1/comm 2>/dev/null)\" = systemd ] \
                    && command -v systemctl >/dev/null 2>&1; then mode=systemd; fi";

fn stop_etcd_script() -> String {
    let sup = Service::Etcd.sup_file();
    let pid = Service::Etcd.pid_file();
    format!(
        "{MODE}; if [ \"$mode\" = systemd ]; then systemctl stop {unit} 2>/dev/null; \
         else if s=$(cat {sup} 2>/dev/null) && kill -0 \"$s\" 2>/dev/null; then kill -TERM \"$s\"; \
         i=0; while [ $i -lt 300 ] && kill -0 \"$s\" 2>/dev/null; do sleep 0.1; i=$((i+1)); done; fi; \
         rm -f {sup} {pid}; fi",
        unit = Service::Etcd.unit(),
    )
}

fn start_etcd_script() -> String {
    format!(
        "{MODE}; if [ \"$mode\" = systemd ]; then systemctl daemon-reload && {}; else {}; fi",
        op_command(Service::Etcd, ServiceOp::Start, ServiceMode::Systemd),
        op_command(Service::Etcd, ServiceOp::Start, ServiceMode::Supervisor)
    )
}

/// Empties a data directory, keeping the directory itself (its owner and mode).
fn wipe_script(data_dir: &str) -> String {
    format!(
        "if [ -d {d} ]; then find {d} -mindepth 1 -delete; fi",
        d = shell_quote(data_dir)
    )
}

/// Runs an etcdctl member command through `t`; `Ok(Err(stderr))` when etcdctl refused.
async fn etcdctl(
    t: &dyn Transport,
    endpoints: &[String],
    args: &str,
) -> Result<Result<String, String>, TransportError> {
    let cmd = format!(
        "{ETCDCTL} --endpoints={} {args}",
        shell_quote(&endpoints.join(","))
    );
    let out = t.run(&cmd, MEMBER_CALL_TIMEOUT).await?;
    if out.success() {
        Ok(Ok(out.stdout_str()))
    } else {
        let err = String::from_utf8_lossy(&out.stderr).to_string();
        // etcdctl logs JSON retry lines before its final `Error: ...` line.
        let last = err
            .lines()
            .rev()
            .find(|l| l.starts_with("Error:"))
            .unwrap_or_else(|| err.lines().last().unwrap_or(""))
            .to_string();
        Ok(Err(last))
    }
}

fn via_transport(fleet: &Fleet, f: &EtcdFacts) -> Result<Arc<dyn Transport>, EtcdMembersError> {
    fleet
        .get(&f.via)
        .cloned()
        .ok_or_else(|| EtcdMembersError::NotConnected {
            host: f.via.clone(),
        })
}

async fn regather(spec: &DeploySpec, fleet: &Fleet) -> Result<EtcdFacts, EtcdMembersError> {
    gather(spec, fleet)
        .await?
        .ok_or(EtcdMembersError::NoCluster)
}

/// The `etcd_members` step: until the membership matches the inventory, re-read the facts,
/// plan, and execute the first change. `control_dir`: where SSH control sockets to hosts that
/// left the inventory go (the CLI's state directory). Each change done is pushed to `done` as
/// `(host, what, summary)`.
pub async fn run(
    spec: &DeploySpec,
    fleet: &Fleet,
    control_dir: Option<PathBuf>,
    progress: ProgressFn<'_>,
    done: &mut Vec<(String, String, String)>,
) -> Result<(), EtcdMembersError> {
    let Some(es) = &spec.etcd else {
        return Ok(());
    };
    let opts = PlanOptions {
        allow_degraded_etcd: es.allow_degraded,
    };
    // Every change shrinks the difference by one; the bound only guards against a loop.
    let bound = 2 * es.members.len() + 8;
    for _ in 0..bound {
        let Some(f) = gather(spec, fleet).await? else {
            return Ok(());
        };
        let plan = plan_members(&es.members, Some(&f), opts)?;
        let Some(change) = plan.changes.first().cloned() else {
            return Ok(());
        };
        let who = match &change {
            MemberChange::Add { name, .. }
            | MemberChange::StartJoined { name, .. }
            | MemberChange::Promote { name, .. } => name.clone(),
            MemberChange::Remove { name, .. } => name.clone(),
        };
        progress(&f.via, &change.to_string());
        match &change {
            MemberChange::Add { name, peer_url, .. } => {
                add(spec, es, fleet, &f, name, peer_url, progress).await?;
            }
            MemberChange::StartJoined { name, peer_url, .. } => {
                let members = f.members.clone();
                start_joining(es, fleet, name, peer_url, &members, progress).await?;
                promote(spec, fleet, name, peer_url, progress).await?;
            }
            MemberChange::Promote { name, peer_url, .. } => {
                promote(spec, fleet, name, peer_url, progress).await?;
            }
            MemberChange::Remove { id, peer_url, .. } => {
                let note = remove(spec, es, fleet, &f, *id, peer_url, control_dir.clone()).await?;
                if let Some(note) = note {
                    progress(&f.via, &note);
                    done.push((who.clone(), "etcd membership".into(), note));
                }
            }
        }
        done.push((who, "etcd membership".into(), change.to_string()));
    }
    Err(EtcdMembersError::Wait {
        name: "-".into(),
        what: "the membership matches the inventory".into(),
        timeout: Duration::ZERO,
    })
}

async fn add(
    spec: &DeploySpec,
    es: &EtcdSpec,
    fleet: &Fleet,
    f: &EtcdFacts,
    name: &str,
    peer_url: &str,
    progress: ProgressFn<'_>,
) -> Result<(), EtcdMembersError> {
    let t = via_transport(fleet, f)?;
    let endpoints = f.up_voter_endpoints(None);
    let args = format!(
        "member add {} --peer-urls={} --learner -w json",
        shell_quote(name),
        shell_quote(peer_url)
    );
    let members = match etcdctl(t.as_ref(), &endpoints, &args).await? {
        Ok(json) => parse_member_list(&json).map_err(|source| EtcdMembersError::Decode {
            host: t.host().into(),
            source,
        })?,
        // A re-run after a cut between our `member add` and the facts: the URL is listed.
        Err(e) if e.contains("Peer URLs already exists") => regather(spec, fleet).await?.members,
        Err(stderr) => {
            return Err(EtcdMembersError::Etcdctl {
                host: t.host().into(),
                what: format!("member add {name}"),
                stderr,
            });
        }
    };
    start_joining(es, fleet, name, peer_url, &members, progress).await?;
    promote(spec, fleet, name, peer_url, progress).await
}

/// Writes the joining host's etcd.conf (`initial-cluster` = the listed members,
/// `initial-cluster-state: existing`), empties its data directory and starts etcd there.
async fn start_joining(
    es: &EtcdSpec,
    fleet: &Fleet,
    name: &str,
    peer_url: &str,
    members: &[Member],
    progress: ProgressFn<'_>,
) -> Result<(), EtcdMembersError> {
    let t = fleet
        .get(name)
        .cloned()
        .ok_or_else(|| EtcdMembersError::NotConnected { host: name.into() })?;
    let template = es
        .join_configs
        .get(name)
        .ok_or_else(|| EtcdMembersError::NoJoinConfig { host: name.into() })?;
    let initial = join_initial_cluster(members, name, peer_url);
    let quoted = serde_json::to_string(&initial).expect("strings serialize");
    let content = template.replace(
        INITIAL_CLUSTER_PLACEHOLDER,
        quoted.trim_start_matches('"').trim_end_matches('"'),
    );
    progress(
        name,
        "joining the etcd cluster (initial-cluster-state: existing)",
    );
    // Our member is listed but not started: whatever data directory the host has belongs to
    // no started member (a failed earlier start, an old cluster), and a joining member must
    // start empty, or it would come up with another cluster's identity.
    let prep = format!("{}; {}", stop_etcd_script(), wipe_script(&es.data_dir));
    t.run_ok(&prep, MEMBER_CALL_TIMEOUT + Duration::from_secs(30))
        .await?;
    t.upload(
        &es.config_path,
        content.as_bytes(),
        es.config_mode,
        Some(&es.config_owner),
    )
    .await?;
    t.run_ok(&start_etcd_script(), MEMBER_CALL_TIMEOUT).await?;
    Ok(())
}

/// Waits until the member with `peer_url` is started and near the leader's raft index, then
/// promotes it, retrying while etcd says it is not in sync yet.
async fn promote(
    spec: &DeploySpec,
    fleet: &Fleet,
    name: &str,
    peer_url: &str,
    progress: ProgressFn<'_>,
) -> Result<(), EtcdMembersError> {
    progress(name, "waiting until the learner is started and in sync");
    let start = Instant::now();
    let (id, f) = loop {
        let f = regather(spec, fleet).await?;
        if let Some(m) = f.member_by_url(peer_url) {
            if !m.is_learner {
                return Ok(());
            }
            if m.started() && f.in_sync(m) {
                break (m.id, f);
            }
        }
        if start.elapsed() > JOIN_TIMEOUT {
            return Err(EtcdMembersError::Wait {
                name: name.into(),
                what: "it is started and its raft index is near the leader's".into(),
                timeout: JOIN_TIMEOUT,
            });
        }
        tokio::time::sleep(POLL).await;
    };
    let t = via_transport(fleet, &f)?;
    let endpoints = f.up_voter_endpoints(None);
    let start = Instant::now();
    loop {
        match etcdctl(t.as_ref(), &endpoints, &format!("member promote {id:x}")).await? {
            Ok(_) => return Ok(()),
            // Promoted already (a re-run after a cut).
            Err(e) if e.contains("can only promote a learner member") && !e.contains("in sync") => {
                return Ok(());
            }
            Err(e) if e.contains("in sync") && start.elapsed() < PROMOTE_TIMEOUT => {
                tokio::time::sleep(POLL).await;
            }
            Err(stderr) => {
                return Err(EtcdMembersError::Etcdctl {
                    host: t.host().into(),
                    what: format!("member promote {id:x} ({name})"),
                    stderr,
                });
            }
        }
    }
}

/// `member remove` through a healthy member other than the removed one, then the best-effort
/// cleanup of the removed host. Returns a note when the host could not be cleaned up.
async fn remove(
    spec: &DeploySpec,
    es: &EtcdSpec,
    fleet: &Fleet,
    f: &EtcdFacts,
    id: u64,
    peer_url: &str,
    control_dir: Option<PathBuf>,
) -> Result<Option<String>, EtcdMembersError> {
    let t = via_transport(fleet, f)?;
    let endpoints = f.up_voter_endpoints(Some(id));
    match etcdctl(t.as_ref(), &endpoints, &format!("member remove {id:x}")).await? {
        Ok(_) => {}
        Err(e) if e.contains("member not found") => {}
        Err(stderr) => {
            return Err(EtcdMembersError::Etcdctl {
                host: t.host().into(),
                what: format!("member remove {id:x}"),
                stderr,
            });
        }
    }
    let Some(addr) = url_host(peer_url) else {
        return Ok(Some(format!(
            "removed member {id:x}: no address in its peer URL {peer_url}; its host was not cleaned up"
        )));
    };
    // A host still in the inventory (it lost the etcd role) is in the fleet; one that left
    // the inventory is reached with the inventory's SSH defaults. Never a host that is still
    // a desired member at that address (a replacement reusing the address).
    if es
        .members
        .iter()
        .any(|d| url_host(&d.peer_url).as_deref() == Some(&addr))
    {
        return Ok(None);
    }
    let in_fleet = spec
        .hosts
        .iter()
        .find(|h| h.address == addr)
        .and_then(|h| fleet.get(&h.name).cloned());
    let target: Arc<dyn Transport> = match in_fleet {
        Some(t) => t,
        None => {
            let mut hs = es.ssh_defaults.clone();
            hs.name = format!("{addr} (removed etcd member {id:x})");
            hs.address = addr.clone();
            hs.connect_timeout = REMOVED_HOST_CONNECT_TIMEOUT;
            let dir = control_dir.unwrap_or_else(|| std::env::temp_dir().join("pgherd-ssh"));
            let _ = std::fs::create_dir_all(&dir);
            match tokio::time::timeout(
                REMOVED_HOST_CONNECT_TIMEOUT + Duration::from_secs(2),
                SshTransport::connect(&hs, &dir),
            )
            .await
            {
                Ok(Ok(t)) => Arc::new(t),
                Ok(Err(e)) => {
                    return Ok(Some(format!(
                        "removed member {id:x}; its host {addr} is unreachable ({e}): etcd there was not stopped, and it refuses to rejoin if it comes back"
                    )));
                }
                Err(_) => {
                    return Ok(Some(format!(
                        "removed member {id:x}; its host {addr} did not answer within {REMOVED_HOST_CONNECT_TIMEOUT:?}: etcd there was not stopped"
                    )));
                }
            }
        }
    };
    // Stopped and disabled (no boot start), then its data directory emptied: a removed member
    // restarted on its old data would try to rejoin as a zombie.
    let script = format!(
        "{}; {MODE}; if [ \"$mode\" = systemd ]; then systemctl disable {unit} 2>/dev/null; fi; rm -f {run}; {}",
        stop_etcd_script(),
        wipe_script(&es.data_dir),
        unit = Service::Etcd.unit(),
        run = Service::Etcd.run_file(),
    );
    match target
        .run_ok(&script, MEMBER_CALL_TIMEOUT + Duration::from_secs(30))
        .await
    {
        Ok(_) => Ok(Some(format!(
            "removed member {id:x}: etcd stopped and disabled on {addr}, data directory {} wiped",
            es.data_dir
        ))),
        Err(e) => Ok(Some(format!(
            "removed member {id:x}; cleaning up {addr} failed ({e})"
        ))),
    }
}
