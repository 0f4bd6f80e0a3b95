//! The heart of the agent: [`decide`], a pure function from one cycle's observations
//! ([`Inputs`]) to one [`Decision`].
//!
//! The order of the checks follows Patroni's `_run_cycle` (patroni.md §3.2): DCS reachability
//! and lock renewal first (safety), then long actions in flight, bootstrap/clone of an empty
//! data directory, system-id checks, crash recovery, and finally the steady state with or
//! without a leader. This file must stay free of I/O: a test greps it for network and
//! database crates.

use chrono::DateTime;

use crate::dcs::ClusterView;

use super::candidates::{clone_source, race_eligibility, switchover_target};
use super::decision::Decision;
use super::inputs::{ActionKind, FailsafeRound, Inputs, RejoinMark, Renewal};
use crate::types::Timeline;

/// Decides what this node does this cycle. Pure: same inputs, same decision.
pub fn decide(i: &Inputs) -> Decision {
    let paused = i.paused();
    let Some(view) = i.cluster.as_ref() else {
        if i.renewal == Renewal::Renewed
            && i.pg.is_running_primary()
            && i.local.action.is_none()
            && !paused
        {
            // The renewal etcd just acknowledged keeps our lease, and the leader key on it,
            // alive for ttl from its send: no other node can lead meanwhile, so a read that
            // failed after the write succeeded is no reason to stop taking writes. The next
            // cycle renews (or demotes at the deadline) as usual.
            return Decision::PrimaryOnRenewedLease;
        }
        return dcs_unreachable(i);
    };
    let named_leader = view.leader_name() == Some(&i.me);
    let holds = i.holds_lock();

    // Lock renewal failed for lack of DCS: the same deadline argument as an unreachable DCS
    // applies, so the same demotion.
    if i.renewal == Renewal::Failed {
        return dcs_unreachable(i);
    }

    // A finished long action may need a follow-up that only makes sense right now.
    if let Some(done) = i.local.finished {
        match (done.kind, done.ok) {
            (ActionKind::Bootstrap, true) if i.pg.is_running_primary() => {
                return Decision::FinishBootstrap;
            }
            (ActionKind::Bootstrap, _) => return Decision::AbortBootstrap,
            // The stop of a switchover finished while we still hold the lock: hand it over.
            (ActionKind::SwitchoverDemote, _) if holds => return Decision::ReleaseAfterSwitchover,
            // Restarting the crashed primary in place failed: do not keep a lock over a dead
            // primary, let a replica take over (Patroni's post_recover).
            (ActionKind::StartPrimary, false) if holds && !paused => {
                return Decision::ReleaseAfterFailedStart;
            }
            _ => {}
        }
    }

    if let Some(action) = i.local.action {
        return action_in_progress(i, view, action, holds);
    }

    if !i.pg.data_dir_initialized {
        if holds || named_leader {
            // We cannot lead without data; keeping the key would block failover.
            return Decision::ReleaseLockDataDirEmpty;
        }
        if paused {
            return Decision::PausedUninitialized;
        }
        return bootstrap_or_clone(i, view);
    }

    // Our data must belong to this cluster before anything else touches it.
    if let (Some(cluster), Some(mine)) = (view.initialize.as_deref(), i.pg.sysid.as_deref())
        && !cluster.is_empty()
        && cluster != mine
    {
        return Decision::SysidMismatch {
            mine: mine.to_string(),
            cluster: cluster.to_string(),
        };
    }
    if view.initialize.is_none() && view.leader.is_none() && !paused {
        if i.pg.running && i.pg.in_recovery == Some(true) {
            // A replica without any cluster record could be following anything: refuse.
            return Decision::NoInitializeRunningReplica;
        }
        if let Some(sysid) = &i.pg.sysid {
            // Existing data, no cluster record: adopt it (Patroni's existing_data.rst).
            return Decision::AdoptExistingData {
                sysid: sysid.clone(),
            };
        }
    }

    if !i.pg.running {
        if paused {
            // Paused: never start PostgreSQL behind the operator's back; a lock over a stopped
            // server would only block a manual failover.
            return Decision::PausedStopped {
                release_lock: holds,
            };
        }
        return recover(i, view, holds);
    }

    match view.leader_name() {
        Some(l) if *l == i.me => {
            if i.renewal == Renewal::Renewed {
                leader(i, view)
            } else {
                // The key names us but renewal said it now names somebody else (or we did not
                // attempt it): behave as if another node leads.
                if i.pg.is_running_primary() && !paused {
                    Decision::DemoteRenewalFailed
                } else {
                    follow(i, view)
                }
            }
        }
        Some(_) => follow(i, view),
        None => unhealthy_cluster(i, view),
    }
}

/// The DCS could not be read, or the lock could not be renewed before the demotion deadline.
///
/// Why demoting now is early enough, and not too early: a successful keepalive keeps our lease
/// alive for at least `ttl` from the moment it was *sent*. A leader's renewal is retried (see
/// `ha_loop::lease`) until it succeeds or the demotion deadline of `ha::timing` passes —
/// `last acknowledged send + min(ttl, fence timeout) − STOP_RESERVE` — and only then does it
/// report `Renewal::Failed`; the executor's immediate stop then has `STOP_RESERVE` left before
/// any other node can create the leader key. A leader whose cycle starts after the deadline
/// (a stalled loop) is refused the renewal and lands here at once. A node that did not lead
/// (the view read failed without a renewal) has nothing to protect.
fn dcs_unreachable(i: &Inputs) -> Decision {
    let was_leader = i.local.held_lock || i.pg.is_running_primary();
    if i.paused() {
        // Pause means "hands off": no demotion on DCS loss (patroni.md §3.7).
        return Decision::DcsUnreachablePaused;
    }
    if i.local.action == Some(ActionKind::Bootstrap) {
        // A bootstrapping primary holds no lock yet; nobody else can lead this new cluster.
        return Decision::ActionInProgress {
            action: ActionKind::Bootstrap,
        };
    }
    if was_leader
        && (i.pg.is_running_primary()
            || matches!(
                i.local.action,
                Some(ActionKind::Promote | ActionKind::StartPrimary)
            ))
    {
        match &i.local.failsafe_round {
            // Every failsafe member answered our POST /failsafe just now and will not race for
            // ttl from receiving it: no other node can be promoted, so the primary may keep
            // taking writes without the DCS (Patroni's failsafe_mode, patroni.md §3.7). The
            // loop counts our lease from the round's send instant and pets the fence with it.
            Some(FailsafeRound::Accepted) => return Decision::FailsafeKeepPrimary,
            Some(FailsafeRound::Refused { member, reason }) => {
                return Decision::DemoteFailsafeRefused {
                    member: member.clone(),
                    reason: reason.clone(),
                };
            }
            None => {}
        }
        if i.cluster.is_some() {
            return Decision::DemoteRenewalFailed;
        }
        return Decision::DemoteDcsUnreachable;
    }
    if let Some(action) = i.local.action {
        return Decision::ActionInProgress { action };
    }
    if i.pg.data_dir_initialized && !i.pg.running && !i.local.held_lock {
        // A read-only replica without upstream is safe to run without the DCS, and keeps
        // serving reads (Patroni's offline demote restarts as such a replica).
        return Decision::StartAsReplica {
            leader: None,
            rewind_check: false,
        };
    }
    Decision::DcsUnreachableSecondary
}

/// A long action is running in its task (patroni.md §3.2 step 5).
fn action_in_progress(i: &Inputs, view: &ClusterView, action: ActionKind, holds: bool) -> Decision {
    if holds {
        if action == ActionKind::StartPrimary && !i.paused() {
            // A crash restart may take at most primary_start_timeout; after that a replica is
            // a better primary than one still replaying WAL.
            let limit = i.config.primary_start_timeout();
            if let Some(t) = i.local.action_started_at
                && i.now.saturating_duration_since(t).as_secs() >= limit
            {
                return Decision::ReleaseAfterStartTimeout;
            }
        }
        return Decision::LeaderDuringAction { action };
    }
    if matches!(action, ActionKind::Promote | ActionKind::StartPrimary) {
        // The promotion (or the in-place primary restart) was started under a lock we no
        // longer have: abort it, or we would become a second primary.
        return Decision::CancelPromoteLostLock;
    }
    if i.pg.is_running_primary()
        && !i.paused()
        && !matches!(action, ActionKind::Bootstrap | ActionKind::SwitchoverDemote)
        && let Some(l) = view.leader_name()
    {
        return Decision::DemoteNotLeader { leader: l.clone() };
    }
    Decision::ActionInProgress { action }
}

/// Empty data directory (patroni.md §3.15, §3.16).
fn bootstrap_or_clone(i: &Inputs, view: &ClusterView) -> Decision {
    if view.leader.is_none() && view.initialize.is_none() {
        if !i.local.tags.may_promote() || i.local.watchdog.blocks_leadership() {
            // A nofailover node, or one whose required watchdog proved unusable, never creates
            // the cluster: it could never lead it.
            return Decision::WaitForLeaderToBootstrap;
        }
        return Decision::RaceBootstrap;
    }
    match clone_source(i, view) {
        Some((source, from_leader)) => Decision::CloneFrom {
            source,
            from_leader,
        },
        None => Decision::WaitForLeaderToBootstrap,
    }
}

/// PostgreSQL is not running and we are not paused (patroni.md §3.8).
fn recover(i: &Inputs, view: &ClusterView, holds: bool) -> Decision {
    if holds {
        if i.config.primary_start_timeout() == 0 {
            let candidate = i
                .peers
                .iter()
                .any(|p| p.name != i.me && p.is_healthy_candidate());
            if candidate {
                // The operator prefers a fast failover over an in-place restart.
                return Decision::FailoverAfterCrash;
            }
        }
        return Decision::StartPrimaryAfterFailure;
    }
    let leader = view.leader_name().filter(|l| **l != i.me).cloned();
    // A node that was primary (its control file says it shut down or crashed in production)
    // may hold WAL the new leader never saw: check for pg_rewind before streaming.
    let was_primary = matches!(
        i.pg.control_state,
        Some(
            crate::pg::ControlState::InProduction
                | crate::pg::ControlState::ShutDown
                | crate::pg::ControlState::InCrashRecovery
                | crate::pg::ControlState::ShuttingDown
        )
    );
    let rewind_check = leader.is_some() && (i.local.rewind_check_pending || was_primary);
    Decision::StartAsReplica {
        leader,
        rewind_check,
    }
}

/// We hold the lock and PostgreSQL runs (patroni.md §3.3, §3.5).
fn leader(i: &Inputs, view: &ClusterView) -> Decision {
    let paused = i.paused();
    if !i.pg.is_running_primary() {
        if paused {
            if let Some(f) = view.failover_request()
                && f.member.as_deref() == Some(i.me.as_str())
            {
                return Decision::PromoteWithLock;
            }
            return Decision::PausedReleaseNotPrimary;
        }
        if i.local.watchdog.blocks_leadership() {
            // The watchdog is what guarantees a hung primary cannot outlive its lease; without
            // it in `required` mode we must not become primary at all.
            return Decision::ReleaseLockWatchdog;
        }
        return Decision::PromoteWithLock;
    }
    if let Some(f) = view.failover_request() {
        if let Some(at) = &f.scheduled_at {
            if paused {
                return Decision::ClearFailover {
                    reason: "can't schedule switchover in the paused state".into(),
                };
            }
            match DateTime::parse_from_rfc3339(at) {
                Ok(t) => {
                    let delta = t.signed_duration_since(i.wall_now).num_seconds();
                    let loop_wait = i.config.loop_wait() as i64;
                    if delta > 0 {
                        // Not yet: Patroni sleeps the last bit; we simply wake up in time.
                        return Decision::AwaitScheduledSwitchover {
                            at: at.clone(),
                            in_secs: delta,
                        };
                    }
                    // A request far in the past was missed (agent down): doing it now would
                    // surprise the operator.
                    if -delta > loop_wait * 3 / 2 {
                        return Decision::ClearFailover {
                            reason: "Found a stale failover value, cleaning up".into(),
                        };
                    }
                }
                Err(_) => {
                    return Decision::ClearFailover {
                        reason: "invalid scheduled_at".into(),
                    };
                }
            }
        }
        if f.leader.as_deref().is_some_and(|l| l != i.me.as_str()) {
            return Decision::ClearFailover {
                reason: "leader name does not match".into(),
            };
        }
        if f.member.as_deref() == Some(i.me.as_str()) {
            return Decision::ClearFailover {
                reason: "I am already the leader, no need to failover".into(),
            };
        }
        return match switchover_target(i, view, f) {
            Ok(candidate) => Decision::SwitchoverDemote { candidate },
            Err(reason) => Decision::ClearFailover { reason },
        };
    }
    Decision::LeaderRenewed { me: i.me.clone() }
}

/// Someone else holds the lock (patroni.md §3.3 `follow`).
fn follow(i: &Inputs, view: &ClusterView) -> Decision {
    let leader = view.leader_name().cloned().unwrap_or_else(|| i.me.clone());
    if i.pg.is_running_primary() {
        if i.paused() {
            return Decision::PausedPrimaryWithoutLock { leader };
        }
        // Two writable primaries must never coexist: the lock holder is the primary.
        return Decision::DemoteNotLeader { leader };
    }
    let want = view
        .members
        .get(&leader)
        .and_then(|m| m.data.conn_host_port());
    let reconfigure = match (&want, &i.pg.upstream) {
        (Some((h, p)), Some(up)) => up != &format!("{h}:{p}"),
        (Some(_), None) => true,
        (None, _) => false,
    };
    if reconfigure && i.local.rewind_check_pending {
        // We were primary (switchover, demotion) and started without an upstream: our WAL may
        // have diverged from the new leader's timeline, so restart through the rewind check
        // instead of merely repointing primary_conninfo.
        return Decision::StartAsReplica {
            leader: Some(leader),
            rewind_check: true,
        };
    }
    if !reconfigure && !i.paused() && needs_rejoin_check(i, view, &leader) {
        // Streaming stopped and our timeline is not the leader's: we may have received WAL
        // past the leader's switchpoint (asynchronous replication) or sit on a sibling
        // timeline. PostgreSQL will never stream again on its own, so stop it and let
        // pg_rewind decide (patroni.md §3.9).
        return Decision::RejoinCheck { leader };
    }
    Decision::FollowLeader {
        me: i.me.clone(),
        leader,
        reconfigure,
    }
}

/// Whether a running replica already pointed at `leader` must be restarted through a
/// divergence check. Only a replica that does *not* stream qualifies (PostgreSQL refuses to
/// stream from a timeline that forked before its replay position, so streaming proves it is
/// fine), and only once per leader and leader timeline ([`RejoinMark`]): a check that found
/// nothing to rewind is not repeated every cycle.
///
/// [`RejoinMark`]: super::inputs::RejoinMark
fn needs_rejoin_check(i: &Inputs, view: &ClusterView, leader: &crate::types::MemberName) -> bool {
    if !(i.pg.running && i.pg.in_recovery == Some(true)) {
        return false;
    }
    if i.pg.replication_state.as_deref() == Some("streaming") {
        return false;
    }
    let Some(lm) = view.members.get(leader) else {
        return false;
    };
    // Like Patroni, judge only against a leader whose PostgreSQL runs as primary: during its
    // promotion the timeline is not final yet and a check would compare against the old one.
    if !matches!(lm.data.role.as_str(), "primary" | "master") || lm.data.state != "running" {
        return false;
    }
    let (Some(mine), Some(theirs)) = (i.pg.timeline, lm.data.timeline.map(Timeline)) else {
        return false;
    };
    let mark = RejoinMark {
        leader: leader.clone(),
        leader_timeline: Some(theirs),
    };
    if i.local.rejoin_checked.as_ref() == Some(&mark) {
        return false;
    }
    if mine == theirs {
        // Same timeline: the histories cannot have forked; not streaming is a connection
        // problem that restarting PostgreSQL would not fix.
        return false;
    }
    // Ahead of the leader's timeline (a sibling branch), or behind it without streaming
    // although we were already pointed at the leader for a cycle: we may have replayed past
    // the switchpoint. The DCS `history` cannot settle it (two nodes promoted from the same
    // timeline get the same timeline number, so its switchpoint may describe a sibling):
    // only the check against the leader itself can. The mark keeps it to once per leader
    // timeline.
    true
}

/// No leader key: the race (patroni.md §3.4).
fn unhealthy_cluster(i: &Inputs, view: &ClusterView) -> Decision {
    if i.config.failsafe_mode()
        && !i.pg.is_running_primary()
        && let Some(l) = &i.local.failsafe_leader
        && *l != i.me
    {
        // The leader's key expired, but the leader told us less than ttl ago that it keeps
        // running as primary in failsafe mode (it cannot reach the DCS, we can): racing now
        // would make a second primary (Patroni injects it into the view instead).
        return Decision::FailsafeLeaderAnnounced { leader: l.clone() };
    }
    if !i.local.tags.may_promote() && !i.pg.is_running_primary() {
        return Decision::NotAllowedToPromote;
    }
    match race_eligibility(i, view) {
        Ok(()) => Decision::AcquireLock,
        Err(reason) => Decision::NotHealthiest { reason },
    }
}
