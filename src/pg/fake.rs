//! An in-memory PostgreSQL, for unit tests and the multi-agent simulation only (a test double:
//! production code never constructs it).
//!
//! [`FakePgNetwork`] is the registry of every simulated instance (keyed by member name and by
//! `host:port`, because basebackup, rewind and streaming need to look at other nodes);
//! [`FakePostgres`] is one node's handle and implements [`Postgres`]. What it models, because
//! the HA decisions depend on it:
//!
//! - data directory: absent / present with a system identifier, a timeline *lineage* and the end
//!   of its WAL (one LSN; a replica's receive = replay = that LSN);
//! - running as primary (writable) or as replica of an upstream; stopped cleanly or crashed;
//! - promotion starts a new timeline branch. Branches carry a hidden unique id, so two nodes that
//!   both promoted from timeline 1 to "timeline 2" are still told apart — exactly the situation
//!   pg_rewind exists for;
//! - streaming happens only when the harness calls [`FakePgNetwork::replicate`] (or a per-node
//!   variant), so tests control replication lag; a replica can only stream from an upstream
//!   whose lineage contains its own position (otherwise it needs a rewind);
//! - fault switches (start/promote/basebackup/rewind fail) and optional delays for the long
//!   actions (so "action in progress" paths run under paused time).
//!
//! - synchronous commit: every [`FakePostgres::write`] on a primary is one transaction commit
//!   at the new end of WAL. With `synchronous_standby_names` empty it is acknowledged at once
//!   (local flush); otherwise only once the standbys PostgreSQL waits for have flushed it —
//!   priority `N (a,b)` / a plain list: the N highest-priority listed standbys that stream
//!   from this primary, `ANY N (a,b)`: any N of them, `*` matches every standby. A commit
//!   waiting when the setting is cleared is released (acknowledged) like PostgreSQL does; one
//!   waiting when the server stops or crashes is never acknowledged (the client sees an
//!   error). A walsender counts as `streaming` from the moment it connects (the fake has no
//!   catch-up phase), so a listed standby may be `sync` while still behind.
//!
//! Every promotion is recorded ([`PromotionRecord`], with a snapshot of the promoted node's
//! WAL history) and every acknowledged commit too ([`AckedCommit`]), for the simulation's
//! `no_promotion_beyond_max_lag` and `acknowledged_commits_survive_promotion` invariants.
//!
//! Why one file: it is one state machine (data directories, timeline branches, streaming,
//! crash and recovery) whose invariants the simulation relies on; split, the invariants would
//! span files that each see half of the state.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::time::Instant;

use super::{
    ControlState, PgError, PgStatus, Postgres, ReplicationRow, SlotInfo, StartAs, StopMode,
    Upstream,
};
use crate::dcs::{DynamicConfig, HistoryLine};
use crate::types::{Lsn, MemberName, Timeline};

/// Where `initdb` starts the WAL (PostgreSQL's first record sits a little after 0/1000000).
pub const INITIAL_LSN: u64 = 0x0100_0028;

/// A timeline branch: PostgreSQL's number plus a hidden id that makes same-numbered branches
/// created by different promotions distinct.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Branch {
    tl: u32,
    uid: u64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct DataDir {
    sysid: String,
    /// Ancestor branches and the LSN where each was left (the switchpoint).
    ancestors: Vec<(Branch, u64)>,
    current: Branch,
    /// End of local WAL.
    lsn: u64,
    /// Last shutdown was clean (checkpointed).
    clean: bool,
    /// The last run was (or the clone came from) a standby.
    standby: bool,
}

impl DataDir {
    /// Where this data's history leaves `branch`, or its own end if `branch` is current.
    fn end_on(&self, branch: Branch) -> Option<u64> {
        if self.current == branch {
            return Some(self.lsn);
        }
        self.ancestors
            .iter()
            .find(|(b, _)| *b == branch)
            .map(|(_, s)| *s)
    }

    /// Can `self` (a replica's data) continue by streaming from `source` without a rewind?
    /// Yes when our current branch is on the source's history and we are not past the point
    /// where the source left it (or past its end).
    fn can_follow(&self, source: &DataDir) -> bool {
        self.sysid == source.sysid
            && source
                .end_on(self.current)
                .is_some_and(|end| self.lsn <= end)
    }

    /// The last LSN both histories share.
    fn common_point(&self, other: &DataDir) -> u64 {
        let mine = self
            .ancestors
            .iter()
            .map(|(b, _)| *b)
            .chain(std::iter::once(self.current));
        let mut point = 0;
        for b in mine {
            if let (Some(a), Some(o)) = (self.end_on(b), other.end_on(b)) {
                point = a.min(o);
            }
        }
        point
    }
}

/// How PostgreSQL reads `synchronous_standby_names`.
#[derive(Debug, Clone, PartialEq, Eq)]
enum SyncRule {
    /// Empty: commits are acknowledged on the local flush.
    Off,
    /// `N (a,b)`, `FIRST N (a,b)`, or a plain list (N = 1): wait for the N highest-priority
    /// (earliest listed) standbys that are connected.
    First(usize, Vec<String>),
    /// `ANY N (a,b)`: wait for any N of the listed standbys.
    Any(usize, Vec<String>),
}

impl SyncRule {
    fn parse(value: &str) -> SyncRule {
        let v = value.trim();
        if v.is_empty() {
            return SyncRule::Off;
        }
        let word = |p: &str| {
            v.get(..p.len())
                .filter(|h| h.eq_ignore_ascii_case(p))
                .map(|_| &v[p.len()..])
        };
        let (any, rest) = match (word("ANY "), word("FIRST ")) {
            (Some(r), _) => (true, r.trim()),
            (None, Some(r)) => (false, r.trim()),
            _ => (false, v),
        };
        let (n, list) = match rest.find('(') {
            Some(open) if rest.ends_with(')') => (
                rest[..open].trim().parse().unwrap_or(1),
                &rest[open + 1..rest.len() - 1],
            ),
            _ => (1, rest),
        };
        let names = list
            .split(',')
            .map(|x| x.trim().trim_matches('"').to_string())
            .filter(|x| !x.is_empty())
            .collect();
        if any {
            SyncRule::Any(n, names)
        } else {
            SyncRule::First(n, names)
        }
    }

    /// The priority (0 = highest) of standby `name`, when listed (`*` lists every standby).
    fn priority(names: &[String], name: &str) -> Option<usize> {
        names
            .iter()
            .position(|s| s == "*" || s.eq_ignore_ascii_case(name))
    }
}

/// What a primary's synchronous replication looks like right now.
#[derive(Debug, Default)]
struct SyncView {
    /// `pg_stat_replication.sync_state` per streaming standby: sync / potential / quorum /
    /// async.
    states: BTreeMap<String, (&'static str, i32)>,
    /// Commits up to here are confirmed by the standbys PostgreSQL waits for (`u64::MAX`: no
    /// standby is waited for; `None`: too few standbys are connected, commits wait).
    confirmed: Option<u64>,
}

/// What an instance runs as.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Run {
    Primary,
    Replica { upstream: Option<Upstream> },
}

/// Fault switches for one node; each makes the matching operation fail until cleared.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FakeFaults {
    pub fail_start: bool,
    pub fail_promote: bool,
    pub fail_basebackup: bool,
    pub fail_rewind: bool,
    pub fail_initdb: bool,
}

/// Simulated durations of the long actions (zero by default: instant).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FakeDelays {
    pub start: Duration,
    pub stop: Duration,
    pub promote: Duration,
    pub basebackup: Duration,
    pub rewind: Duration,
}

/// Coarse state of a fake node, for assertions.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeRole {
    NoData,
    /// Data present, not running; `clean` = last shutdown checkpointed.
    Stopped {
        clean: bool,
    },
    Primary,
    Replica {
        upstream: Option<String>,
    },
}

/// One recorded promotion.
#[derive(Debug, Clone, PartialEq)]
pub struct PromotionRecord {
    pub member: String,
    pub at: Instant,
    /// WAL end at the moment of promotion (= the switchpoint).
    pub lsn: Lsn,
    pub new_timeline: Timeline,
    /// The promoted node's WAL history at that moment: what it can still serve.
    pub wal: WalHistory,
}

/// A node's WAL history (its timeline branches and how far it has each), opaque: it answers
/// whether it holds a given commit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WalHistory(DataDir);

impl WalHistory {
    /// Whether this history contains `c`: it has WAL on the commit's timeline branch up to at
    /// least the commit's LSN. (An LSN comparison alone is not enough: a sibling branch of the
    /// same or a higher LSN does not contain the commit.)
    pub fn holds(&self, c: &AckedCommit) -> bool {
        self.0.end_on(c.branch).is_some_and(|end| end >= c.lsn.0)
    }
}

/// One commit PostgreSQL acknowledged to its client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AckedCommit {
    /// The primary that acknowledged it.
    pub member: String,
    /// Its commit record's end (the WAL end after the write).
    pub lsn: Lsn,
    pub timeline: Timeline,
    /// When it was acknowledged.
    pub at: Instant,
    /// Acknowledged only after standbys confirmed the flush (`synchronous_standby_names` was
    /// set); `false`: acknowledged on the local flush alone.
    pub synchronous: bool,
    branch: Branch,
}

#[derive(Debug)]
struct Node {
    addr: String,
    data: Option<DataDir>,
    run: Option<Run>,
    faults: FakeFaults,
    delays: FakeDelays,
    slots: BTreeSet<String>,
    synchronous_standby_names: String,
    /// Commits (LSNs on the current branch) written but waiting for standbys to confirm them.
    waiting_commits: Vec<u64>,
    config: Option<DynamicConfig>,
    /// Names of the trait methods called, in order (`observe` excluded).
    calls: Vec<String>,
}

#[derive(Debug, Default)]
struct NetState {
    nodes: BTreeMap<String, Node>,
    next_sysid: u64,
    next_branch: u64,
    promotions: Vec<PromotionRecord>,
    acked: Vec<AckedCommit>,
}

impl NetState {
    fn node(&self, name: &str) -> &Node {
        self.nodes.get(name).expect("fake node is registered")
    }

    fn node_mut(&mut self, name: &str) -> &mut Node {
        self.nodes.get_mut(name).expect("fake node is registered")
    }

    fn by_addr(&self, host: &str, port: u16) -> Option<(&String, &Node)> {
        let addr = format!("{host}:{port}");
        self.nodes.iter().find(|(_, n)| n.addr == addr)
    }

    /// The running node `up` names, if any.
    fn running_source(&self, up: &Upstream) -> Option<(&String, &Node)> {
        self.by_addr(&up.host, up.port)
            .filter(|(_, n)| n.run.is_some() && n.data.is_some())
    }

    /// Whether `name` is a running replica whose upstream runs and shares its history.
    fn is_streaming(&self, name: &str) -> bool {
        let node = self.node(name);
        let (Some(Run::Replica { upstream: Some(up) }), Some(data)) = (&node.run, &node.data)
        else {
            return false;
        };
        self.running_source(up)
            .and_then(|(_, src)| src.data.as_ref())
            .is_some_and(|src| data.can_follow(src))
    }

    /// Streams up to `max_bytes` of WAL into replica `name` from its upstream. Returns whether
    /// anything moved.
    fn replicate_one(&mut self, name: &str, max_bytes: u64) -> bool {
        if !self.is_streaming(name) {
            return false;
        }
        let Some(Run::Replica { upstream: Some(up) }) = self.node(name).run.clone() else {
            return false;
        };
        let Some((src_name, src)) = self
            .running_source(&up)
            .and_then(|(k, n)| Some((k.clone(), n.data.clone()?)))
        else {
            return false;
        };
        let data = self
            .node_mut(name)
            .data
            .as_mut()
            .expect("streaming node has data");
        // A standby follows the upstream's timeline switches: adopt its lineage.
        let before = (data.lsn, data.current);
        data.ancestors = src.ancestors.clone();
        data.current = src.current;
        let target = src.lsn.min(data.lsn.saturating_add(max_bytes));
        data.lsn = data.lsn.max(target);
        let moved = before != (data.lsn, data.current);
        // The flush is reported to the upstream, which may be waiting for it to acknowledge
        // commits (also when nothing moved: the standby may just have connected).
        self.release_commits(&src_name);
        moved
    }

    /// The standbys streaming from primary `name`, with their flushed LSN (name order).
    fn walsenders(&self, name: &str) -> Vec<(String, u64)> {
        let addr = &self.node(name).addr;
        self.nodes
            .iter()
            .filter(|(n, _)| self.is_streaming(n))
            .filter(|(_, r)| {
                matches!(&r.run, Some(Run::Replica { upstream: Some(u) })
                    if format!("{}:{}", u.host, u.port) == *addr)
            })
            .map(|(n, r)| (n.clone(), r.data.as_ref().map_or(0, |d| d.lsn)))
            .collect()
    }

    /// Synchronous replication of primary `name` as PostgreSQL evaluates it (see the module
    /// comment).
    fn sync_view(&self, name: &str) -> SyncView {
        let senders = self.walsenders(name);
        let mut view = SyncView::default();
        for (n, _) in &senders {
            view.states.insert(n.clone(), ("async", 0));
        }
        match SyncRule::parse(&self.node(name).synchronous_standby_names) {
            SyncRule::Off => view.confirmed = Some(u64::MAX),
            SyncRule::First(want, names) => {
                let mut listed: Vec<(usize, &String, u64)> = senders
                    .iter()
                    .filter_map(|(n, l)| SyncRule::priority(&names, n).map(|p| (p, n, *l)))
                    .collect();
                listed.sort();
                for (i, (p, n, _)) in listed.iter().enumerate() {
                    let state = if i < want { "sync" } else { "potential" };
                    view.states.insert((*n).clone(), (state, *p as i32 + 1));
                }
                if want > 0 && listed.len() >= want {
                    view.confirmed = listed[..want].iter().map(|(_, _, l)| *l).min();
                }
            }
            SyncRule::Any(want, names) => {
                let mut flushed: Vec<u64> = Vec::new();
                for (n, l) in &senders {
                    if SyncRule::priority(&names, n).is_some() {
                        view.states.insert(n.clone(), ("quorum", 1));
                        flushed.push(*l);
                    }
                }
                flushed.sort_unstable_by(|a, b| b.cmp(a));
                if want > 0 && flushed.len() >= want {
                    view.confirmed = Some(flushed[want - 1]);
                }
            }
        }
        view
    }

    /// Acknowledges the waiting commits of primary `name` that its synchronous standbys have
    /// confirmed (all of them when none is waited for).
    fn release_commits(&mut self, name: &str) {
        let node = self.node(name);
        if node.run != Some(Run::Primary) || node.waiting_commits.is_empty() {
            return;
        }
        let Some(data) = node.data.as_ref() else {
            return;
        };
        let branch = data.current;
        let view = self.sync_view(name);
        let Some(upto) = view.confirmed else {
            return;
        };
        let synchronous = upto != u64::MAX;
        let now = Instant::now();
        let node = self.node_mut(name);
        let (done, waiting): (Vec<u64>, Vec<u64>) =
            node.waiting_commits.iter().partition(|l| **l <= upto);
        node.waiting_commits = waiting;
        for lsn in done {
            self.acked.push(AckedCommit {
                member: name.to_string(),
                lsn: Lsn(lsn),
                timeline: Timeline(branch.tl),
                at: now,
                synchronous,
                branch,
            });
        }
    }

    fn status_of(&self, name: &str) -> PgStatus {
        let node = self.node(name);
        let Some(data) = &node.data else {
            return PgStatus::default();
        };
        let running = node.run.is_some();
        let control_state = match (&node.run, data.clean, data.standby) {
            (Some(Run::Primary), _, _) | (None, false, false) => ControlState::InProduction,
            (Some(Run::Replica { .. }), _, _) | (None, false, true) => {
                ControlState::InArchiveRecovery
            }
            (None, true, false) => ControlState::ShutDown,
            (None, true, true) => ControlState::ShutDownInRecovery,
        };
        let mut st = PgStatus {
            data_dir_initialized: true,
            sysid: Some(data.sysid.clone()),
            control_state: Some(control_state),
            control_timeline: Some(Timeline(data.current.tl)),
            running,
            accepting_connections: running,
            server_version: running.then_some(150_000),
            ..Default::default()
        };
        if !running {
            return st;
        }
        st.timeline = Some(Timeline(data.current.tl));
        st.synchronous_standby_names = Some(node.synchronous_standby_names.clone());
        st.slots = node
            .slots
            .iter()
            .map(|s| {
                let user = self
                    .nodes
                    .iter()
                    .find(|(n, _)| MemberName::new(n.as_str()).slot_name() == *s);
                SlotInfo {
                    name: s.clone(),
                    physical: true,
                    active: user.is_some_and(|(n, _)| self.is_streaming(n)),
                    restart_lsn: user.and_then(|(_, u)| u.data.as_ref()).map(|d| Lsn(d.lsn)),
                }
            })
            .collect();
        match &node.run {
            Some(Run::Primary) => {
                st.in_recovery = Some(false);
                st.flush_lsn = Some(Lsn(data.lsn));
                let sync = self.sync_view(name);
                st.replication = self
                    .walsenders(name)
                    .into_iter()
                    .map(|(n, l)| {
                        let r = self.node(&n);
                        let lsn = Some(Lsn(l));
                        let (sync_state, sync_priority) =
                            sync.states.get(&n).copied().unwrap_or(("async", 0));
                        ReplicationRow {
                            usename: "replicator".into(),
                            application_name: n.clone(),
                            client_addr: Some(r.addr.split(':').next().unwrap_or("").to_string()),
                            state: "streaming".into(),
                            sync_state: sync_state.into(),
                            sync_priority,
                            write_lsn: lsn,
                            flush_lsn: lsn,
                            replay_lsn: lsn,
                        }
                    })
                    .collect();
            }
            Some(Run::Replica { upstream }) => {
                st.in_recovery = Some(true);
                st.receive_lsn = Some(Lsn(data.lsn));
                st.replay_lsn = Some(Lsn(data.lsn));
                st.replication_state = Some(
                    if self.is_streaming(name) {
                        "streaming"
                    } else {
                        "in archive recovery"
                    }
                    .to_string(),
                );
                st.upstream = upstream.as_ref().map(|u| format!("{}:{}", u.host, u.port));
            }
            None => {}
        }
        st
    }
}

/// The registry of simulated PostgreSQL instances. Cheap to clone.
#[derive(Clone, Default)]
pub struct FakePgNetwork {
    inner: Arc<Mutex<NetState>>,
}

impl FakePgNetwork {
    pub fn new() -> FakePgNetwork {
        FakePgNetwork::default()
    }

    fn lock(&self) -> MutexGuard<'_, NetState> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Registers a node with an empty data directory reachable at `host:port` and returns its
    /// handle. Registering an existing name returns a new handle to the same node.
    pub fn add_node(&self, member: &str, host: &str, port: u16) -> FakePostgres {
        self.lock()
            .nodes
            .entry(member.to_string())
            .or_insert_with(|| Node {
                addr: format!("{host}:{port}"),
                data: None,
                run: None,
                faults: FakeFaults::default(),
                delays: FakeDelays::default(),
                slots: BTreeSet::new(),
                synchronous_standby_names: String::new(),
                waiting_commits: Vec::new(),
                config: None,
                calls: Vec::new(),
            });
        FakePostgres {
            net: self.clone(),
            name: member.to_string(),
        }
    }

    /// A handle to an already registered node.
    pub fn node(&self, member: &str) -> FakePostgres {
        assert!(
            self.lock().nodes.contains_key(member),
            "unknown fake node {member}"
        );
        FakePostgres {
            net: self.clone(),
            name: member.to_string(),
        }
    }

    pub fn members(&self) -> Vec<String> {
        self.lock().nodes.keys().cloned().collect()
    }

    /// Every streaming replica catches up fully with its upstream (repeated so cascades settle).
    pub fn replicate(&self) {
        let mut st = self.lock();
        let names: Vec<String> = st.nodes.keys().cloned().collect();
        for _ in 0..=names.len() {
            let mut moved = false;
            for n in &names {
                moved |= st.replicate_one(n, u64::MAX);
            }
            if !moved {
                break;
            }
        }
    }

    /// Replica `member` receives up to `max_bytes` from its upstream, if streaming.
    pub fn replicate_node(&self, member: &str, max_bytes: u64) -> bool {
        self.lock().replicate_one(member, max_bytes)
    }

    /// Every commit acknowledged to its client so far, in order.
    pub fn acked(&self) -> Vec<AckedCommit> {
        self.lock().acked.clone()
    }

    /// Every promotion so far, in order.
    pub fn promotions(&self) -> Vec<PromotionRecord> {
        self.lock().promotions.clone()
    }

    /// Members whose instance currently accepts writes.
    pub fn writable(&self) -> Vec<String> {
        self.lock()
            .nodes
            .iter()
            .filter(|(_, n)| n.run == Some(Run::Primary))
            .map(|(k, _)| k.clone())
            .collect()
    }
}

/// One simulated instance; implements [`Postgres`], plus harness controls. Cheap to clone.
#[derive(Clone)]
pub struct FakePostgres {
    net: FakePgNetwork,
    name: String,
}

impl FakePostgres {
    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn network(&self) -> FakePgNetwork {
        self.net.clone()
    }

    fn with<R>(&self, f: impl FnOnce(&mut NetState) -> R) -> R {
        f(&mut self.net.lock())
    }

    fn record(&self, call: &str) {
        self.with(|st| st.node_mut(&self.name).calls.push(call.to_string()));
    }

    /// Sleeps the configured delay for an action (cancellation before the end = no effect).
    async fn delay(&self, pick: impl FnOnce(&FakeDelays) -> Duration) {
        let d = self.with(|st| pick(&st.node(&self.name).delays));
        if !d.is_zero() {
            tokio::time::sleep(d).await;
        }
    }

    fn fail(&self, what: &str, detail: &str) -> PgError {
        PgError::CommandFailed {
            what: what.to_string(),
            detail: detail.to_string(),
        }
    }

    /// Writes `bytes` of WAL as one transaction commit if this is a running primary. Returns
    /// whether it was accepted (written locally); whether and when it is *acknowledged* follows
    /// `synchronous_standby_names` (see the module comment and [`FakePgNetwork::acked`]).
    pub fn write(&self, bytes: u64) -> bool {
        self.with(|st| {
            let node = st.node_mut(&self.name);
            match (&node.run, node.data.as_mut()) {
                (Some(Run::Primary), Some(d)) => {
                    d.lsn += bytes;
                    let commit = d.lsn;
                    node.waiting_commits.push(commit);
                    st.release_commits(&self.name);
                    true
                }
                _ => false,
            }
        })
    }

    /// The commits of this primary still waiting for synchronous standbys.
    pub fn waiting_commits(&self) -> Vec<Lsn> {
        self.with(|st| {
            st.node(&self.name)
                .waiting_commits
                .iter()
                .map(|l| Lsn(*l))
                .collect()
        })
    }

    /// This node's WAL history now (see [`WalHistory::holds`]); `None` without data.
    pub fn wal_history(&self) -> Option<WalHistory> {
        self.with(|st| st.node(&self.name).data.clone().map(WalHistory))
    }

    /// Kills the postmaster without a shutdown checkpoint (commits still waiting for
    /// standbys are never acknowledged).
    pub fn crash(&self) {
        self.with(|st| {
            let node = st.node_mut(&self.name);
            node.waiting_commits.clear();
            if node.run.take().is_some()
                && let Some(d) = node.data.as_mut()
            {
                d.clean = false;
            }
        })
    }

    /// Writable = running and not in recovery.
    pub fn is_writable(&self) -> bool {
        self.with(|st| st.node(&self.name).run == Some(Run::Primary))
    }

    pub fn is_running(&self) -> bool {
        self.with(|st| st.node(&self.name).run.is_some())
    }

    pub fn role(&self) -> FakeRole {
        self.with(|st| {
            let node = st.node(&self.name);
            match (&node.data, &node.run) {
                (None, _) => FakeRole::NoData,
                (Some(d), None) => FakeRole::Stopped { clean: d.clean },
                (Some(_), Some(Run::Primary)) => FakeRole::Primary,
                (Some(_), Some(Run::Replica { upstream })) => FakeRole::Replica {
                    upstream: upstream.as_ref().map(|u| u.member.as_str().to_string()),
                },
            }
        })
    }

    /// End of local WAL (0 without data).
    pub fn lsn(&self) -> Lsn {
        self.with(|st| {
            Lsn(st
                .node(&self.name)
                .data
                .as_ref()
                .map(|d| d.lsn)
                .unwrap_or(0))
        })
    }

    pub fn timeline(&self) -> Option<Timeline> {
        self.with(|st| {
            st.node(&self.name)
                .data
                .as_ref()
                .map(|d| Timeline(d.current.tl))
        })
    }

    pub fn sysid(&self) -> Option<String> {
        self.with(|st| st.node(&self.name).data.as_ref().map(|d| d.sysid.clone()))
    }

    /// Whether this running replica currently streams from a compatible upstream.
    pub fn is_streaming(&self) -> bool {
        self.with(|st| st.is_streaming(&self.name))
    }

    pub fn set_faults(&self, faults: FakeFaults) {
        self.with(|st| st.node_mut(&self.name).faults = faults);
    }

    pub fn faults(&self) -> FakeFaults {
        self.with(|st| st.node(&self.name).faults)
    }

    pub fn set_delays(&self, delays: FakeDelays) {
        self.with(|st| st.node_mut(&self.name).delays = delays);
    }

    /// Trait methods called so far (`observe` excluded), e.g. `["initdb", "start primary"]`.
    pub fn calls(&self) -> Vec<String> {
        self.with(|st| st.node(&self.name).calls.clone())
    }

    /// The last config given to `apply_dynamic_config`.
    pub fn dynamic_config(&self) -> Option<DynamicConfig> {
        self.with(|st| st.node(&self.name).config.clone())
    }

    pub fn synchronous_standby_names(&self) -> String {
        self.with(|st| st.node(&self.name).synchronous_standby_names.clone())
    }

    pub fn slots(&self) -> Vec<String> {
        self.with(|st| st.node(&self.name).slots.iter().cloned().collect())
    }

    /// Would our data need a rewind to follow the node at `leader` (sync helper for tests)?
    fn diverged_from(&self, leader: &Upstream) -> Result<bool, PgError> {
        self.with(|st| {
            let mine = st
                .node(&self.name)
                .data
                .clone()
                .ok_or_else(|| self.fail("pg_rewind", "data directory is empty"))?;
            let src = st
                .running_source(leader)
                .and_then(|(_, n)| n.data.clone())
                .ok_or_else(|| self.fail("pg_rewind", "source server is not reachable"))?;
            Ok(!mine.can_follow(&src))
        })
    }
}

#[async_trait]
impl Postgres for FakePostgres {
    async fn observe(&self) -> PgStatus {
        self.with(|st| st.status_of(&self.name))
    }

    async fn apply_dynamic_config(&self, config: &DynamicConfig) -> Result<bool, PgError> {
        self.record("apply_dynamic_config");
        self.with(|st| {
            let node = st.node_mut(&self.name);
            let changed = node.config.as_ref() != Some(config);
            node.config = Some(config.clone());
            // Parameter changes are reloadable in the fake.
            Ok(changed && node.run.is_some())
        })
    }

    async fn set_local_config(&self, _cfg: &crate::config::AgentConfig) -> Result<bool, PgError> {
        self.record("set_local_config");
        // The fake has no files: a running server "needs" the reload that applies them.
        Ok(self.is_running())
    }

    async fn initdb(&self) -> Result<(), PgError> {
        self.record("initdb");
        self.with(|st| {
            if st.node(&self.name).faults.fail_initdb {
                return Err(self.fail("initdb", "simulated failure"));
            }
            if st.node(&self.name).data.is_some() {
                return Err(self.fail("initdb", "data directory is not empty"));
            }
            st.next_sysid += 1;
            st.next_branch += 1;
            let sysid = format!("{}", 7_000_000_000_000_000_000u64 + st.next_sysid);
            let branch = Branch {
                tl: 1,
                uid: st.next_branch,
            };
            st.node_mut(&self.name).data = Some(DataDir {
                sysid,
                ancestors: Vec::new(),
                current: branch,
                lsn: INITIAL_LSN,
                clean: true,
                standby: false,
            });
            Ok(())
        })
    }

    async fn post_bootstrap(&self) -> Result<(), PgError> {
        self.record("post_bootstrap");
        if self.is_writable() {
            Ok(())
        } else {
            Err(self.fail("post_bootstrap", "postgres is not running as primary"))
        }
    }

    async fn basebackup(&self, from: &Upstream) -> Result<(), PgError> {
        self.record(&format!("basebackup from {}", from.member));
        self.delay(|d| d.basebackup).await;
        self.with(|st| {
            let node = st.node(&self.name);
            if node.faults.fail_basebackup {
                return Err(self.fail("pg_basebackup", "simulated failure"));
            }
            if node.data.is_some() {
                return Err(self.fail("pg_basebackup", "data directory is not empty"));
            }
            let src = st
                .running_source(from)
                .and_then(|(_, n)| n.data.clone())
                .ok_or_else(|| self.fail("pg_basebackup", "could not connect to server"))?;
            st.node_mut(&self.name).data = Some(DataDir {
                clean: false,
                standby: true,
                ..src
            });
            Ok(())
        })
    }

    async fn wipe_data_dir(&self) -> Result<(), PgError> {
        self.record("wipe_data_dir");
        self.with(|st| {
            let node = st.node_mut(&self.name);
            if node.run.is_some() {
                return Err(self.fail("wipe data directory", "postgres is running"));
            }
            node.data = None;
            node.slots.clear();
            Ok(())
        })
    }

    async fn start(&self, start_as: &StartAs, _timeout: Duration) -> Result<(), PgError> {
        let label = match start_as {
            StartAs::Primary => "start primary".to_string(),
            StartAs::Replica { upstream: Some(u) } => format!("start replica of {}", u.member),
            StartAs::Replica { upstream: None } => "start replica".to_string(),
        };
        self.record(&label);
        self.delay(|d| d.start).await;
        self.with(|st| {
            let node = st.node_mut(&self.name);
            if node.faults.fail_start {
                return Err(self.fail("pg_ctl start", "simulated failure"));
            }
            let want = match start_as {
                StartAs::Primary => Run::Primary,
                StartAs::Replica { upstream } => Run::Replica {
                    upstream: upstream.clone(),
                },
            };
            match (&node.run, node.data.as_mut()) {
                (_, None) => Err(self.fail("pg_ctl start", "data directory is empty")),
                // pg_ctl start on a running server: fine only if it runs the way asked.
                (Some(r), Some(_)) if *r == want => Ok(()),
                (Some(_), Some(_)) => {
                    Err(self.fail("pg_ctl start", "another server might be running"))
                }
                (None, Some(d)) => {
                    d.clean = false;
                    d.standby = matches!(want, Run::Replica { .. });
                    node.run = Some(want);
                    Ok(())
                }
            }
        })
    }

    async fn stop(&self, mode: StopMode, _timeout: Duration) -> Result<(), PgError> {
        self.record(&format!("stop {mode:?}").to_lowercase());
        self.delay(|d| d.stop).await;
        self.with(|st| {
            if mode != StopMode::Immediate && st.node(&self.name).run == Some(Run::Primary) {
                // A clean primary shutdown waits for its walsenders to ship everything up to
                // the shutdown checkpoint to the connected standbys (what makes a switchover
                // lossless).
                let addr = st.node(&self.name).addr.clone();
                let followers: Vec<String> = st
                    .nodes
                    .iter()
                    .filter(|(_, n)| {
                        matches!(&n.run, Some(Run::Replica { upstream: Some(u) })
                            if format!("{}:{}", u.host, u.port) == addr)
                    })
                    .map(|(k, _)| k.clone())
                    .collect();
                for f in followers {
                    st.replicate_one(&f, u64::MAX);
                }
            }
            // Backends still waiting for standbys are terminated: those commits are never
            // acknowledged.
            let node = st.node_mut(&self.name);
            node.waiting_commits.clear();
            if node.run.take().is_some()
                && let Some(d) = node.data.as_mut()
            {
                // Immediate mode skips the shutdown checkpoint: crash recovery on next start.
                d.clean = mode != StopMode::Immediate;
            }
            Ok(())
        })
    }

    async fn promote(
        &self,
        used: Timeline,
        _history: &[crate::dcs::HistoryLine],
        _timeout: Duration,
    ) -> Result<(), PgError> {
        self.record("promote");
        self.delay(|d| d.promote).await;
        self.with(|st| {
            let node = st.node(&self.name);
            if node.faults.fail_promote {
                return Err(self.fail("pg_ctl promote", "simulated failure"));
            }
            match node.run {
                Some(Run::Primary) => return Ok(()),
                None => return Err(self.fail("pg_ctl promote", "server is not running")),
                Some(Run::Replica { .. }) => {}
            }
            st.next_branch += 1;
            let uid = st.next_branch;
            let node = st.node_mut(&self.name);
            let d = node.data.as_mut().expect("a running node has data");
            d.ancestors.push((d.current, d.lsn));
            // Like PostgreSQL with the reserved history files: above every used timeline.
            d.current = Branch {
                tl: d.current.tl.max(used.0) + 1,
                uid,
            };
            d.standby = false;
            node.run = Some(Run::Primary);
            let rec = PromotionRecord {
                member: self.name.clone(),
                at: Instant::now(),
                lsn: Lsn(d.lsn),
                new_timeline: Timeline(d.current.tl),
                wal: WalHistory(d.clone()),
            };
            st.promotions.push(rec);
            Ok(())
        })
    }

    async fn follow(&self, upstream: Option<&Upstream>) -> Result<(), PgError> {
        self.record(&match upstream {
            Some(u) => format!("follow {}", u.member),
            None => "follow none".to_string(),
        });
        self.with(|st| {
            let node = st.node_mut(&self.name);
            match &mut node.run {
                Some(Run::Replica { upstream: cur }) => {
                    *cur = upstream.cloned();
                    Ok(())
                }
                // Standby settings are written for the next start.
                None => Ok(()),
                Some(Run::Primary) => Err(self.fail(
                    "follow",
                    "postgres runs as primary; it must be demoted (stopped) first",
                )),
            }
        })
    }

    async fn reload(&self) -> Result<(), PgError> {
        self.record("reload");
        if self.is_running() {
            Ok(())
        } else {
            Err(self.fail("pg_ctl reload", "server is not running"))
        }
    }

    async fn checkpoint(&self) -> Result<(), PgError> {
        self.record("checkpoint");
        if self.is_running() {
            Ok(())
        } else {
            Err(PgError::Sql("server is not running".into()))
        }
    }

    async fn needs_rewind(&self, leader: &Upstream) -> Result<bool, PgError> {
        self.record(&format!("needs_rewind {}", leader.member));
        self.diverged_from(leader)
    }

    async fn rewind(&self, leader: &Upstream) -> Result<(), PgError> {
        self.record(&format!("rewind from {}", leader.member));
        self.delay(|d| d.rewind).await;
        self.with(|st| {
            let node = st.node(&self.name);
            if node.faults.fail_rewind {
                return Err(self.fail("pg_rewind", "simulated failure"));
            }
            if node.run.is_some() {
                return Err(self.fail("pg_rewind", "target server must be shut down cleanly"));
            }
            let mine = node
                .data
                .clone()
                .ok_or_else(|| self.fail("pg_rewind", "no data"))?;
            let src = st
                .running_source(leader)
                .and_then(|(_, n)| n.data.clone())
                .ok_or_else(|| self.fail("pg_rewind", "source server is not reachable"))?;
            if mine.sysid != src.sysid {
                return Err(self.fail(
                    "pg_rewind",
                    "source and target clusters are from different systems",
                ));
            }
            let point = mine.common_point(&src);
            st.node_mut(&self.name).data = Some(DataDir {
                lsn: point,
                clean: true,
                standby: true,
                ..src
            });
            Ok(())
        })
    }

    async fn sync_slots(&self, wanted: &[String], keep: &[String]) -> Result<(), PgError> {
        self.with(|st| {
            let node = st.node_mut(&self.name);
            if node.run.is_none() {
                return Err(PgError::Sql("server is not running".into()));
            }
            node.slots
                .retain(|s| wanted.contains(s) || keep.contains(s));
            node.slots.extend(wanted.iter().cloned());
            Ok(())
        })
    }

    async fn set_synchronous_standby_names(&self, value: &str) -> Result<(), PgError> {
        self.record(&format!("set synchronous_standby_names '{value}'"));
        self.with(|st| {
            let node = st.node_mut(&self.name);
            if node.run.is_none() {
                return Err(PgError::Sql("server is not running".into()));
            }
            node.synchronous_standby_names = value.to_string();
            // A changed setting is evaluated at once: cleared, it releases every waiting
            // commit (PostgreSQL wakes the waiters when no standby is required any more).
            st.release_commits(&self.name);
            Ok(())
        })
    }

    async fn timeline_history(&self) -> Result<Vec<HistoryLine>, PgError> {
        self.with(|st| {
            let d = st
                .node(&self.name)
                .data
                .as_ref()
                .ok_or_else(|| self.fail("timeline history", "no data"))?;
            Ok(d.ancestors
                .iter()
                .map(|(b, switchpoint)| HistoryLine {
                    parent_timeline: b.tl,
                    switchpoint: *switchpoint,
                    reason: "no recovery target specified".into(),
                    timestamp: None,
                    new_leader: None,
                })
                .collect())
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T: Duration = Duration::from_secs(5);

    fn up(name: &str, port: u16) -> Upstream {
        Upstream {
            member: MemberName::new(name),
            host: "127.0.0.1".into(),
            port,
        }
    }

    /// n1 primary with n2, n3 streaming from it.
    async fn three_nodes() -> (FakePgNetwork, FakePostgres, FakePostgres, FakePostgres) {
        let net = FakePgNetwork::new();
        let n1 = net.add_node("n1", "127.0.0.1", 5001);
        let n2 = net.add_node("n2", "127.0.0.1", 5002);
        let n3 = net.add_node("n3", "127.0.0.1", 5003);
        n1.initdb().await.unwrap();
        n1.start(&StartAs::Primary, T).await.unwrap();
        for n in [&n2, &n3] {
            n.basebackup(&up("n1", 5001)).await.unwrap();
            n.start(
                &StartAs::Replica {
                    upstream: Some(up("n1", 5001)),
                },
                T,
            )
            .await
            .unwrap();
        }
        (net, n1, n2, n3)
    }

    #[tokio::test]
    async fn initdb_then_start_gives_a_writable_primary() {
        let net = FakePgNetwork::new();
        let n1 = net.add_node("n1", "127.0.0.1", 5001);
        assert!(!n1.observe().await.data_dir_initialized);
        n1.initdb().await.unwrap();
        assert!(
            n1.initdb().await.is_err(),
            "initdb refuses a non-empty data dir"
        );
        let st = n1.observe().await;
        assert_eq!(st.control_state, Some(ControlState::ShutDown));
        assert!(!st.running);
        n1.start(&StartAs::Primary, T).await.unwrap();
        let st = n1.observe().await;
        assert!(st.is_running_primary());
        assert_eq!(st.timeline, Some(Timeline(1)));
        assert!(n1.write(100));
        assert_eq!(n1.observe().await.flush_lsn, Some(Lsn(INITIAL_LSN + 100)));
        assert_eq!(net.writable(), vec!["n1".to_string()]);
    }

    #[tokio::test]
    async fn replicas_lag_until_replicated() {
        let (net, n1, n2, n3) = three_nodes().await;
        assert_eq!(n2.sysid(), n1.sysid());
        n1.write(1000);
        assert_eq!(n2.lsn(), Lsn(INITIAL_LSN));
        assert!(net.replicate_node("n2", 400));
        assert_eq!(n2.lsn(), Lsn(INITIAL_LSN + 400));
        net.replicate();
        assert_eq!(n2.lsn(), n1.lsn());
        assert_eq!(n3.lsn(), n1.lsn());
        let st = n2.observe().await;
        assert_eq!(st.in_recovery, Some(true));
        assert_eq!(st.replication_state.as_deref(), Some("streaming"));
        assert_eq!(st.upstream.as_deref(), Some("127.0.0.1:5001"));
        let p = n1.observe().await;
        assert_eq!(p.replication.len(), 2);
        assert!(!n2.write(1), "a replica is not writable");
    }

    #[tokio::test]
    async fn promote_starts_a_new_timeline_and_is_recorded() {
        let (net, n1, n2, _n3) = three_nodes().await;
        n1.write(500);
        net.replicate();
        n1.crash();
        assert_eq!(n1.role(), FakeRole::Stopped { clean: false });
        n2.promote(Timeline(1), &[], T).await.unwrap();
        assert!(n2.is_writable());
        assert_eq!(n2.timeline(), Some(Timeline(2)));
        let h = n2.timeline_history().await.unwrap();
        assert_eq!(h.len(), 1);
        assert_eq!(h[0].parent_timeline, 1);
        assert_eq!(h[0].switchpoint, INITIAL_LSN + 500);
        let p = net.promotions();
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].member, "n2");
        assert_eq!(p[0].lsn, Lsn(INITIAL_LSN + 500));
    }

    #[tokio::test]
    async fn replica_follows_timeline_switch_of_new_leader() {
        let (net, n1, n2, n3) = three_nodes().await;
        n1.crash();
        n2.promote(Timeline(1), &[], T).await.unwrap();
        n3.follow(Some(&up("n2", 5002))).await.unwrap();
        n2.write(10);
        net.replicate();
        assert!(n3.is_streaming());
        assert_eq!(n3.timeline(), Some(Timeline(2)));
        assert_eq!(n3.lsn(), n2.lsn());
    }

    #[tokio::test]
    async fn diverged_old_primary_needs_rewind_and_rewind_fixes_it() {
        let (net, n1, n2, _n3) = three_nodes().await;
        n1.write(100);
        net.replicate();
        // n1 writes more that n2 never receives, then dies; n2 is promoted.
        n1.write(50);
        n1.crash();
        n2.promote(Timeline(1), &[], T).await.unwrap();
        n2.write(10);
        assert!(n1.needs_rewind(&up("n2", 5002)).await.unwrap());
        assert!(n1.rewind(&up("n2", 5002)).await.is_ok());
        assert!(!n1.needs_rewind(&up("n2", 5002)).await.unwrap());
        n1.start(
            &StartAs::Replica {
                upstream: Some(up("n2", 5002)),
            },
            T,
        )
        .await
        .unwrap();
        net.replicate();
        assert!(n1.is_streaming());
        assert_eq!(n1.lsn(), n2.lsn());
    }

    #[tokio::test]
    async fn two_promotions_to_the_same_timeline_number_still_diverge() {
        let (_net, n1, n2, n3) = three_nodes().await;
        n1.crash();
        n2.promote(Timeline(1), &[], T).await.unwrap();
        n3.promote(Timeline(1), &[], T).await.unwrap();
        assert_eq!(n2.timeline(), n3.timeline());
        n3.stop(StopMode::Fast, T).await.unwrap();
        assert!(n3.needs_rewind(&up("n2", 5002)).await.unwrap());
    }

    #[tokio::test]
    async fn promotion_takes_a_timeline_above_every_one_the_cluster_used() {
        let (_net, n1, n2, n3) = three_nodes().await;
        n1.crash();
        n2.promote(Timeline(1), &[], T).await.unwrap();
        assert_eq!(n2.timeline(), Some(Timeline(2)));
        // n3 missed n2's promotion; the DCS says timeline 2 is taken.
        n3.promote(Timeline(2), &[], T).await.unwrap();
        assert_eq!(n3.timeline(), Some(Timeline(3)));
    }

    #[tokio::test]
    async fn lagging_replica_of_old_timeline_can_follow_without_rewind() {
        let (net, n1, n2, n3) = three_nodes().await;
        n1.write(100);
        net.replicate_node("n2", 100);
        n1.crash();
        n2.promote(Timeline(1), &[], T).await.unwrap();
        n3.stop(StopMode::Fast, T).await.unwrap();
        assert!(
            !n3.needs_rewind(&up("n2", 5002)).await.unwrap(),
            "n3 is behind the switchpoint"
        );
    }

    #[tokio::test]
    async fn clean_primary_shutdown_ships_all_wal_to_streaming_replicas() {
        let (_net, n1, n2, n3) = three_nodes().await;
        n1.write(5000);
        n1.stop(StopMode::Fast, T).await.unwrap();
        assert_eq!(n2.lsn(), n1.lsn());
        assert_eq!(n3.lsn(), n1.lsn());
    }

    #[tokio::test]
    async fn crash_and_immediate_stop_are_unclean_fast_stop_is_clean() {
        let (_net, n1, n2, _n3) = three_nodes().await;
        n1.stop(StopMode::Immediate, T).await.unwrap();
        assert_eq!(
            n1.observe().await.control_state,
            Some(ControlState::InProduction)
        );
        n2.stop(StopMode::Fast, T).await.unwrap();
        assert_eq!(
            n2.observe().await.control_state,
            Some(ControlState::ShutDownInRecovery)
        );
        assert!(
            n2.stop(StopMode::Fast, T).await.is_ok(),
            "stopping a stopped server is ok"
        );
    }

    #[tokio::test]
    async fn basebackup_needs_a_running_source_and_an_empty_dir() {
        let net = FakePgNetwork::new();
        let n1 = net.add_node("n1", "127.0.0.1", 5001);
        let n2 = net.add_node("n2", "127.0.0.1", 5002);
        assert!(n2.basebackup(&up("n1", 5001)).await.is_err());
        n1.initdb().await.unwrap();
        assert!(
            n2.basebackup(&up("n1", 5001)).await.is_err(),
            "source is stopped"
        );
        n1.start(&StartAs::Primary, T).await.unwrap();
        n2.basebackup(&up("n1", 5001)).await.unwrap();
        assert!(n2.basebackup(&up("n1", 5001)).await.is_err());
        n2.wipe_data_dir().await.unwrap();
        assert_eq!(n2.role(), FakeRole::NoData);
    }

    #[tokio::test]
    async fn faults_make_operations_fail() {
        let (_net, _n1, n2, _n3) = three_nodes().await;
        n2.set_faults(FakeFaults {
            fail_promote: true,
            ..Default::default()
        });
        assert!(n2.promote(Timeline(1), &[], T).await.is_err());
        assert!(!n2.is_writable());
        n2.stop(StopMode::Fast, T).await.unwrap();
        n2.set_faults(FakeFaults {
            fail_start: true,
            ..Default::default()
        });
        assert!(n2.start(&StartAs::Primary, T).await.is_err());
        assert!(!n2.is_running());
    }

    #[tokio::test(start_paused = true)]
    async fn delayed_start_cancelled_midway_has_no_effect() {
        let net = FakePgNetwork::new();
        let n1 = net.add_node("n1", "127.0.0.1", 5001);
        n1.initdb().await.unwrap();
        n1.set_delays(FakeDelays {
            start: Duration::from_secs(10),
            ..Default::default()
        });
        let r = tokio::time::timeout(Duration::from_secs(5), n1.start(&StartAs::Primary, T)).await;
        assert!(r.is_err());
        assert!(!n1.is_running());
        n1.start(&StartAs::Primary, T).await.unwrap();
        assert!(n1.is_writable());
    }

    #[tokio::test]
    async fn follow_on_a_running_primary_is_refused() {
        let (_net, n1, _n2, _n3) = three_nodes().await;
        assert!(n1.follow(Some(&up("n2", 5002))).await.is_err());
        n1.sync_slots(&["n2".into(), "n3".into()], &[])
            .await
            .unwrap();
        n1.sync_slots(&["n2".into()], &[]).await.unwrap();
        assert_eq!(n1.slots(), vec!["n2".to_string()]);
        n1.set_synchronous_standby_names("n2").await.unwrap();
        let st = n1.observe().await;
        let sync: Vec<_> = st
            .replication
            .iter()
            .filter(|r| r.sync_state == "sync")
            .map(|r| r.application_name.clone())
            .collect();
        assert_eq!(sync, vec!["n2".to_string()]);
    }

    #[tokio::test]
    async fn without_synchronous_standbys_a_commit_is_acknowledged_on_the_local_flush() {
        let (net, n1, _n2, _n3) = three_nodes().await;
        assert!(n1.write(100));
        let acked = net.acked();
        assert_eq!(acked.len(), 1);
        assert_eq!(acked[0].lsn, n1.lsn());
        assert!(!acked[0].synchronous);
    }

    #[tokio::test]
    async fn a_synchronous_commit_waits_for_the_named_standby_to_flush_it() {
        let (net, n1, n2, _n3) = three_nodes().await;
        n1.set_synchronous_standby_names("n2").await.unwrap();
        n1.write(100);
        assert!(net.acked().is_empty(), "n2 has not flushed it");
        assert_eq!(n1.waiting_commits(), vec![n1.lsn()]);
        net.replicate_node("n3", u64::MAX);
        assert!(net.acked().is_empty(), "n3 is not the synchronous standby");
        net.replicate_node("n2", 50);
        assert!(net.acked().is_empty(), "half flushed is not flushed");
        net.replicate_node("n2", u64::MAX);
        let acked = net.acked();
        assert_eq!(acked.len(), 1);
        assert!(acked[0].synchronous);
        assert!(n2.wal_history().unwrap().holds(&acked[0]));
    }

    #[tokio::test]
    async fn a_commit_waiting_when_the_primary_stops_or_crashes_is_never_acknowledged() {
        let (net, n1, n2, _n3) = three_nodes().await;
        n1.set_synchronous_standby_names("n2").await.unwrap();
        n2.stop(StopMode::Fast, T).await.unwrap();
        n1.write(100);
        n1.crash();
        assert!(n1.waiting_commits().is_empty());
        assert!(net.acked().is_empty());
    }

    #[tokio::test]
    async fn clearing_synchronous_standby_names_releases_the_waiting_commits() {
        let (net, n1, n2, _n3) = three_nodes().await;
        n1.set_synchronous_standby_names("n2").await.unwrap();
        n2.stop(StopMode::Fast, T).await.unwrap();
        n1.write(100);
        assert!(net.acked().is_empty());
        n1.set_synchronous_standby_names("").await.unwrap();
        let acked = net.acked();
        assert_eq!(acked.len(), 1);
        assert!(!acked[0].synchronous, "released without a standby");
    }

    #[tokio::test]
    async fn priority_and_quorum_rules_pick_the_standbys_commits_wait_for() {
        let (net, n1, _n2, _n3) = three_nodes().await;
        // Priority: n3 listed first is the one waited for; n2 is only a potential.
        n1.set_synchronous_standby_names("1 (n3,n2)").await.unwrap();
        let states: Vec<(String, String)> = n1
            .observe()
            .await
            .replication
            .iter()
            .map(|r| (r.application_name.clone(), r.sync_state.clone()))
            .collect();
        assert_eq!(
            states,
            vec![
                ("n2".into(), "potential".into()),
                ("n3".into(), "sync".into())
            ]
        );
        n1.write(100);
        net.replicate_node("n2", u64::MAX);
        assert!(net.acked().is_empty());
        net.replicate_node("n3", u64::MAX);
        assert_eq!(net.acked().len(), 1);
        // Two required: both must flush.
        n1.set_synchronous_standby_names("2 (n2,n3)").await.unwrap();
        n1.write(100);
        net.replicate_node("n2", u64::MAX);
        assert_eq!(net.acked().len(), 1);
        net.replicate_node("n3", u64::MAX);
        assert_eq!(net.acked().len(), 2);
        // Quorum: any one of the two.
        n1.set_synchronous_standby_names("ANY 1 (n2,n3)")
            .await
            .unwrap();
        n1.write(100);
        net.replicate_node("n3", u64::MAX);
        assert_eq!(net.acked().len(), 3);
    }

    #[tokio::test]
    async fn a_sibling_branch_past_the_commit_does_not_hold_it() {
        let (net, n1, n2, n3) = three_nodes().await;
        n1.write(100);
        net.replicate_node("n2", u64::MAX);
        let acked = net.acked();
        let c = acked.last().unwrap();
        n1.crash();
        // n3 never got the commit; promoted, it writes past the commit's LSN on its own branch.
        n3.promote(Timeline(1), &[], T).await.unwrap();
        n3.write(1000);
        assert!(n3.lsn() > c.lsn);
        assert!(!n3.wal_history().unwrap().holds(c));
        assert!(n2.wal_history().unwrap().holds(c));
        let p = net.promotions();
        assert!(!p[0].wal.holds(c), "the promotion record saw the loss");
    }
}
