//! Pure rules about *who* may lead: the leader race (Patroni's `is_healthiest_node`), whether a
//! switchover/failover requested through the `failover` key can be carried out, the clone
//! source for a new replica, and the synchronous-replication plan of the leader.
//!
//! No I/O: the peers' `/patroni` answers are fetched by the loop before deciding and arrive
//! here as [`PeerStatus`] values.

use std::collections::BTreeSet;

use crate::dcs::{ClusterView, Failover};
use crate::types::{Lsn, MemberName};

use super::decision::NotHealthiest;
use super::inputs::{Inputs, PeerStatus};

/// The total order of failover candidates (architecture.md §9.7): reachable before
/// unreachable, allowed before excluded, then more WAL, then higher `failover_priority`, then
/// the name as the final tie-breaker so every node computes the same ranking.
pub fn rank(peers: &[PeerStatus]) -> Vec<&PeerStatus> {
    let mut v: Vec<&PeerStatus> = peers.iter().collect();
    v.sort_by(|a, b| {
        b.is_healthy_candidate()
            .cmp(&a.is_healthy_candidate())
            .then(b.wal_position.cmp(&a.wal_position))
            .then(b.failover_priority.cmp(&a.failover_priority))
            .then(a.name.cmp(&b.name))
    });
    v
}

/// Members named in an active `/sync` key (leader and standbys), when sync mode is on.
fn sync_members(i: &Inputs, view: &ClusterView) -> Option<BTreeSet<String>> {
    if !i.config.synchronous_mode() {
        return None;
    }
    let s = view.sync_state()?;
    let mut set: BTreeSet<String> = s.standbys().into_iter().map(|n| n.to_lowercase()).collect();
    if let Some(l) = &s.leader {
        set.insert(l.to_lowercase());
    }
    Some(set)
}

fn in_set(set: &Option<BTreeSet<String>>, name: &MemberName) -> bool {
    set.as_ref()
        .is_none_or(|s| s.contains(&name.as_str().to_lowercase()))
}

/// Patroni's `is_healthiest_node` for a node whose PostgreSQL runs (as a replica, or as a
/// primary that lost its lock to expiry) while no leader key exists. `Ok(())` means "race".
///
/// Checked in Patroni's order (patroni.md §3.4); several nodes may conclude they are the
/// healthiest — the create-only leader-key transaction picks exactly one winner.
pub fn race_eligibility(i: &Inputs, view: &ClusterView) -> Result<(), NotHealthiest> {
    let cfg = &i.config;
    // A refused pre_promote means the operator's hook vetoed us: stay out of the race for a
    // full ttl so that another member gets the chance (patroni.md §3.12).
    if let Some(t) = i.local.pre_promote_failed_at
        && i.now.saturating_duration_since(t).as_secs() < cfg.ttl()
    {
        return Err(NotHealthiest::PrePromoteBackoff);
    }
    let failover = view.failover_request().filter(|f| f.scheduled_at.is_none());
    if i.paused() {
        // Paused: a running primary may (re)take a free lock — first come wins — and a named
        // failover candidate may be promoted; nothing else is automatic (§3.11).
        if i.pg.is_running_primary() {
            return Ok(());
        }
        if let Some(f) = failover {
            return manual_failover_no_leader(i, view, f);
        }
        return Err(NotHealthiest::Paused);
    }
    // Stricter than Patroni, which lets a running primary retake the lock and only demotes it
    // once watchdog activation fails: in `required` mode without a usable watchdog nothing
    // guarantees a hung primary cannot outlive its lease, so we never take the lock at all.
    if i.local.watchdog.blocks_leadership() {
        return Err(NotHealthiest::WatchdogUnusable);
    }
    if i.pg.is_running_primary() {
        // A primary that lost its key (e.g. the agent restarted) may take it back, but never
        // a stale ex-primary from an older timeline: that would resurrect a diverged history.
        let mine = i.pg.timeline.unwrap_or_default();
        if mine < view.timeline() {
            return Err(NotHealthiest::TimelineBehind);
        }
        return Ok(());
    }
    if !i.local.tags.may_promote() {
        // Handled by the caller (NotAllowedToPromote); kept here for completeness.
        return Err(NotHealthiest::Paused);
    }
    if cfg.failsafe_mode()
        && let Some(fs) = view.failsafe_members()
        && !fs.is_empty()
        && !fs.contains_key(&i.me)
    {
        // A member the last leader did not list was never asked to stay out of a race while
        // it ran in failsafe mode; letting it win could promote beside a failsafe primary.
        return Err(NotHealthiest::NotInFailsafe);
    }
    if i.local.watchdog.blocks_leadership() {
        return Err(NotHealthiest::WatchdogUnusable);
    }
    let sync = sync_members(i, view);
    if let Some(f) = view.failover_request()
        && (f.scheduled_at.is_none() || view.leader.is_none())
    {
        // Synchronous mode: a switchover (it names the old leader) must land on a sync
        // standby; only a manual failover may pick an async node (§3.5).
        if f.leader.is_some() && !in_set(&sync, &i.me) {
            return Err(NotHealthiest::NotSyncStandby);
        }
        return manual_failover_no_leader(i, view, f);
    }
    if !in_set(&sync, &i.me) {
        // Only a node that PostgreSQL acknowledged commits from can be promoted without
        // losing acknowledged transactions (§3.10).
        return Err(NotHealthiest::NotSyncStandby);
    }
    healthiest_among_peers(i, view, true, None, &sync)
}

/// Patroni's `_is_healthiest_node`: lag, timeline, then compare with every reachable peer.
fn healthiest_among_peers(
    i: &Inputs,
    view: &ClusterView,
    check_lag: bool,
    exclude: Option<&str>,
    sync: &Option<BTreeSet<String>>,
) -> Result<(), NotHealthiest> {
    let my_wal = i.pg.wal_position();
    if check_lag {
        // Promoting a node further behind than maximum_lag_on_failover would throw away more
        // acknowledged data than the operator accepted; better no leader than that.
        let max = i.config.maximum_lag_on_failover();
        let lag = my_wal.lag_behind(Lsn(view.status.optime));
        if lag > max {
            return Err(NotHealthiest::Lagging { lag, max });
        }
    }
    if i.config.check_timeline() {
        match i.pg.timeline {
            Some(t) if t >= view.timeline() => {}
            _ => return Err(NotHealthiest::TimelineBehind),
        }
    }
    let sync_leader = view
        .sync_state()
        .and_then(|s| s.leader.clone())
        .map(|s| s.to_lowercase());
    for p in &i.peers {
        if p.name == i.me || !p.reachable || p.nofailover || p.watchdog_failed {
            continue;
        }
        if exclude.is_some_and(|x| x == p.name.as_str()) {
            continue;
        }
        if !in_set(sync, &p.name) {
            continue;
        }
        if p.is_primary {
            return Err(NotHealthiest::PrimaryAlive(p.name.clone()));
        }
        let former_sync_leader = sync_leader.as_deref() == Some(&p.name.as_str().to_lowercase());
        if p.wal_position > my_wal && !former_sync_leader {
            return Err(NotHealthiest::Ahead(p.name.clone()));
        }
        if p.wal_position == my_wal
            && p.failover_priority > i.local.tags.failover_priority
            && !former_sync_leader
        {
            return Err(NotHealthiest::HigherPriority(p.name.clone()));
        }
    }
    Ok(())
}

/// Patroni's `manual_failover_process_no_leader`: the leader key is gone and a `failover`
/// request exists.
fn manual_failover_no_leader(
    i: &Inputs,
    view: &ClusterView,
    f: &Failover,
) -> Result<(), NotHealthiest> {
    if f.member.as_deref() == Some(i.me.as_str()) {
        // The operator chose us: race without the lag check (they accepted the loss).
        return Ok(());
    }
    // A switchover (it names the old leader) in synchronous mode must land on a `/sync` member;
    // a manual failover may pick any node.
    let sync = if f.leader.is_some() {
        sync_members(i, view)
    } else {
        None
    };
    if let Some(c) = &f.member {
        let candidate = MemberName::new(c.clone());
        let healthy = i
            .peers
            .iter()
            .any(|p| p.name.as_str() == c && p.is_healthy_candidate());
        // Defer only to a candidate that may promote: a switchover candidate outside `/sync`
        // is refused by its own race (NotSyncStandby), so deferring to it would leave the
        // cluster leaderless for as long as the failover key stays (Patroni checks the
        // candidate against `/sync` the same way).
        if healthy && in_set(&sync, &candidate) {
            return Err(NotHealthiest::DeferToCandidate(candidate));
        }
    }
    if i.paused() {
        // Paused: only the named candidate may take the lock.
        return Err(NotHealthiest::Paused);
    }
    if f.leader.as_deref() == Some(i.me.as_str()) {
        // The old leader of a switchover takes the lock back only if nobody else can.
        let other_healthy = i
            .peers
            .iter()
            .any(|p| p.name != i.me && p.is_healthy_candidate() && in_set(&sync, &p.name));
        return if other_healthy {
            Err(NotHealthiest::FormerLeader)
        } else {
            Ok(())
        };
    }
    healthiest_among_peers(i, view, false, f.leader.as_deref(), &sync)
}

/// Leader side of a switchover/failover (Patroni's `is_failover_possible`). `Ok(candidate)`:
/// the named candidate, or `None` for "any healthy member"; `Err(reason)`: clear the request.
pub fn switchover_target(
    i: &Inputs,
    view: &ClusterView,
    f: &Failover,
) -> Result<Option<MemberName>, String> {
    let sync = if f.leader.is_some() {
        sync_members(i, view)
    } else {
        None
    };
    let leader_pos = Lsn(view.status.optime).max(i.pg.wal_position());
    let max_lag = i.config.maximum_lag_on_failover();
    let ok = |p: &&PeerStatus| {
        p.name != i.me
            && p.is_healthy_candidate()
            && !p.is_primary
            && p.wal_position.lag_behind(leader_pos) <= max_lag
            && (!i.config.check_timeline() || p.timeline.is_some_and(|t| t >= view.timeline()))
            && in_set(&sync, &p.name)
    };
    let good: Vec<&PeerStatus> = i.peers.iter().filter(ok).collect();
    match &f.member {
        Some(c) => {
            if !view.members.contains_key(&MemberName::new(c.clone())) {
                return Err(format!("candidate {c} does not exist"));
            }
            if good.iter().any(|p| p.name.as_str() == c) {
                Ok(Some(MemberName::new(c.clone())))
            } else {
                Err(format!(
                    "candidate {c} is not healthy, failover is not possible"
                ))
            }
        }
        None if i.paused() => {
            Err("switchover is possible only to a specific candidate in a paused state".into())
        }
        None if good.is_empty() => Err("no healthy members found, failover is not possible".into()),
        None => Ok(None),
    }
}

/// Where to clone a new replica from (Patroni's `get_clone_member`): a running member tagged
/// `clonefrom` (not me, not the leader) keeps load off the primary; otherwise the leader.
pub fn clone_source(i: &Inputs, view: &ClusterView) -> Option<(MemberName, bool)> {
    let leader = view.leader_name()?;
    let preferred = view.members.values().find(|m| {
        m.name != i.me
            && &m.name != leader
            && m.data.tag_bool("clonefrom")
            && m.data.state == "running"
            && m.data.conn_host_port().is_some()
    });
    if let Some(m) = preferred {
        return Some((m.name.clone(), false));
    }
    view.leader_member()
        .filter(|m| m.data.conn_host_port().is_some())
        .map(|m| (m.name.clone(), true))
}

/// What the leader must change this cycle to keep synchronous replication consistent.
///
/// Ordering invariant (patroni.md §3.10): a standby is *added* to `synchronous_standby_names`
/// first and published in `/sync` only once PostgreSQL reports it `sync` (a later cycle) and
/// it has flushed up to our position when SSN last changed ([`LocalFacts::sync_catchup_lsn`](super::inputs::LocalFacts::sync_catchup_lsn));
/// it is *removed* from `/sync` first and from `synchronous_standby_names` afterwards. So
/// `/sync` never names a node that PostgreSQL did not wait for, and only `/sync` members may
/// auto-promote — no acknowledged commit can be lost by a failover.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct SyncPlan {
    /// Write `/sync = {leader: me, sync_standby: <shrunk>}` first (None: unchanged).
    pub shrink: Option<Vec<String>>,
    /// New `synchronous_standby_names` (None: unchanged).
    pub ssn: Option<String>,
    /// Then write `/sync` with the confirmed standbys (None: unchanged).
    pub publish: Option<Vec<String>>,
    /// Sync mode is off but a `/sync` key exists: delete it (and clear SSN).
    pub disable: bool,
}

/// `synchronous_standby_names` for the picked standbys (Patroni's format: sorted, quoted when
/// not a plain identifier, `N (a,b)` for several, `*` for strict mode with none).
pub fn format_ssn(names: &[String], strict: bool) -> String {
    if names.is_empty() {
        return if strict { "*".into() } else { String::new() };
    }
    let mut v: Vec<String> = names
        .iter()
        .map(|n| {
            let plain = n
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
                && !n.starts_with(|c: char| c.is_ascii_digit());
            if plain {
                n.clone()
            } else {
                format!("\"{}\"", n.replace('"', "\"\""))
            }
        })
        .collect();
    v.sort();
    if v.len() == 1 {
        v.remove(0)
    } else {
        format!("{} ({})", v.len(), v.join(","))
    }
}

/// Computes the [`SyncPlan`] for a leader whose PostgreSQL is a running primary.
pub fn plan_sync(i: &Inputs, view: &ClusterView) -> SyncPlan {
    let cfg = &i.config;
    let current = view.sync.as_ref().map(|(s, _)| s);
    if !cfg.synchronous_mode() {
        let has_key = current.is_some_and(|s| s.leader.is_some());
        let ssn_set =
            i.pg.synchronous_standby_names
                .as_deref()
                .is_some_and(|s| !s.is_empty());
        return SyncPlan {
            disable: has_key,
            ssn: (has_key && ssn_set).then(String::new),
            ..Default::default()
        };
    }
    let strict = cfg.synchronous_mode_strict();
    let count = cfg.synchronous_node_count() as usize;
    // Candidates: streaming walsenders of members that may be sync (no nosync tag).
    let mut rows: Vec<_> =
        i.pg.replication
            .iter()
            .filter(|r| r.state == "streaming" && r.flush_lsn.is_some())
            .filter(|r| {
                view.members
                    .get(&MemberName::new(r.application_name.clone()))
                    .is_some_and(|m| {
                        !m.data.tag_bool("nosync")
                            && m.data
                                .tags
                                .get("sync_priority")
                                .and_then(|v| v.as_i64())
                                .is_none_or(|p| p > 0)
                    })
            })
            .collect();
    rows.sort_by(|a, b| {
        (b.sync_state == "sync")
            .cmp(&(a.sync_state == "sync"))
            .then(b.flush_lsn.cmp(&a.flush_lsn))
            .then(a.application_name.cmp(&b.application_name))
    });
    let picks: Vec<String> = rows
        .iter()
        .take(count)
        .map(|r| r.application_name.clone())
        .collect();
    let mine = current.filter(|s| s.leader.as_deref() == Some(i.me.as_str()));
    let cur: Vec<String> = mine.map(|s| s.standbys()).unwrap_or_default();
    // Confirmed = PostgreSQL waits for it (`sync`/`quorum`) and, unless `/sync` already names
    // it, it has flushed everything we had when SSN last changed (Patroni's
    // `_process_replica_readiness`). PostgreSQL calls a standby `sync` as soon as it streams
    // and is listed, however far behind it is; the commits acknowledged before it was listed
    // (asynchronously, or by the standby it replaces) are on it only once it caught up to
    // that point. Publishing it earlier would let it promote without them.
    let catchup = i
        .local
        .sync_catchup_lsn
        .unwrap_or_else(|| i.pg.wal_position());
    let confirmed: BTreeSet<String> = rows
        .iter()
        .filter(|r| r.sync_state == "sync" || r.sync_state == "quorum")
        .filter(|r| cur.contains(&r.application_name) || r.flush_lsn >= Some(catchup))
        .map(|r| r.application_name.clone())
        .collect();
    let mut plan = SyncPlan::default();
    let keep: Vec<String> = cur
        .iter()
        .filter(|n| picks.contains(n) && confirmed.contains(*n))
        .cloned()
        .collect();
    if mine.is_none() || keep != cur {
        plan.shrink = Some(keep.clone());
    }
    let want_ssn = format_ssn(&picks, strict);
    if i.pg.synchronous_standby_names.as_deref().unwrap_or("") != want_ssn {
        plan.ssn = Some(want_ssn);
    }
    let mut publish: Vec<String> = picks
        .iter()
        .filter(|n| confirmed.contains(*n))
        .cloned()
        .collect();
    publish.sort();
    let mut keep_sorted = keep;
    keep_sorted.sort();
    // Publishing a new standby is only safe when SSN already lists it: `confirmed` comes from
    // pg_stat_replication observed *before* this cycle changes SSN, so that holds.
    if publish != keep_sorted {
        plan.publish = Some(publish);
    }
    plan
}
