//! [`Decision`]: what one HA cycle decided, as data the executor carries out, and as the
//! operator-facing sentence (its `Display`) that is logged every cycle, published at
//! `GET /patroni`-adjacent status and asserted in tests. Wording follows Patroni where Patroni
//! has a sentence for the situation, because operators grep their logs for it.

use std::fmt;

use crate::types::MemberName;

use super::inputs::ActionKind;

/// Why this node does not race for the lock (Patroni's `is_healthiest_node` returning False).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum NotHealthiest {
    /// A `pre_promote` script refused less than `ttl` ago.
    PrePromoteBackoff,
    /// Paused: no automatic promotion.
    Paused,
    /// `status.optime - my_wal > maximum_lag_on_failover`.
    Lagging { lag: u64, max: u64 },
    /// `check_timeline` (or a running ex-primary): my timeline is behind the cluster's.
    TimelineBehind,
    /// A reachable member still runs as primary.
    PrimaryAlive(MemberName),
    /// A reachable candidate has received more WAL.
    Ahead(MemberName),
    /// Same WAL position, higher `failover_priority`.
    HigherPriority(MemberName),
    /// Synchronous mode: only the `/sync` leader or a listed sync standby may promote.
    NotSyncStandby,
    /// A switchover/failover names a healthy candidate that is not me.
    DeferToCandidate(MemberName),
    /// I am the former leader of a switchover and another member is healthy.
    FormerLeader,
    /// `watchdog.mode: required` and the device is unusable.
    WatchdogUnusable,
    /// `failsafe_mode` on and the `failsafe` key does not list me (Patroni: only its members
    /// may win the race).
    NotInFailsafe,
}

impl fmt::Display for NotHealthiest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            NotHealthiest::PrePromoteBackoff => f.write_str("pre_promote failed less than ttl ago"),
            NotHealthiest::Paused => f.write_str("cluster is paused"),
            NotHealthiest::Lagging { lag, max } => {
                write!(
                    f,
                    "my wal position exceeds maximum replication lag ({lag} > {max})"
                )
            }
            NotHealthiest::TimelineBehind => {
                f.write_str("my timeline is behind the cluster timeline")
            }
            NotHealthiest::PrimaryAlive(n) => write!(f, "primary ({n}) is still alive"),
            NotHealthiest::Ahead(n) => write!(f, "wal position of {n} is ahead of my wal position"),
            NotHealthiest::HigherPriority(n) => {
                write!(f, "{n} has equal wal position and higher failover priority")
            }
            NotHealthiest::NotSyncStandby => {
                f.write_str("synchronous mode: I am not a synchronous standby")
            }
            NotHealthiest::DeferToCandidate(n) => {
                write!(f, "manual failover candidate {n} is healthy")
            }
            NotHealthiest::FormerLeader => {
                f.write_str("I am the former leader and other members are healthy")
            }
            NotHealthiest::WatchdogUnusable => f.write_str("watchdog is required but unusable"),
            NotHealthiest::NotInFailsafe => {
                f.write_str("failsafe mode is enabled and I am not in the failsafe key")
            }
        }
    }
}

/// What a cycle decided. Variants carry what the executor needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    // --- the DCS could not be reached (patroni.md §3.7) ---
    /// Running primary, not paused, DCS unreachable: stop PostgreSQL before our lease can lapse.
    DemoteDcsUnreachable,
    /// DCS unreachable while paused: nothing is touched.
    DcsUnreachablePaused,
    /// DCS unreachable on a secondary: keep replicating, do not race.
    DcsUnreachableSecondary,
    /// The leader-lock renewal failed (DCS error) on a running primary: demote.
    DemoteRenewalFailed,
    /// Paused leader whose renewal failed: PostgreSQL keeps running.
    PausedRenewalFailed,
    /// The lock was renewed this cycle but the cluster could not be read: stay primary.
    PrimaryOnRenewedLease,
    /// DCS lost, `failsafe_mode` on, and every failsafe member accepted us: stay primary.
    FailsafeKeepPrimary,
    /// DCS lost, `failsafe_mode` on, but a failsafe member did not accept: demote.
    DemoteFailsafeRefused { member: MemberName, reason: String },
    /// No leader key, but a leader announced itself by `POST /failsafe` less than ttl ago:
    /// keep following it, do not race.
    FailsafeLeaderAnnounced { leader: MemberName },

    // --- long actions (patroni.md §3.2 step 5) ---
    /// We lead and renewed the lock while a long action runs.
    LeaderDuringAction { action: ActionKind },
    /// A long action runs; nothing else to do.
    ActionInProgress { action: ActionKind },
    /// A promotion is running but the lock is no longer ours: cancel it and stop PostgreSQL.
    CancelPromoteLostLock,
    /// A crash restart of the primary exceeded `primary_start_timeout`: cancel, stop, release.
    ReleaseAfterStartTimeout,

    // --- bootstrap and cloning (patroni.md §3.15, §3.16) ---
    /// Empty data directory, no `initialize` key: race for it, initdb on a win.
    RaceBootstrap,
    /// Our bootstrap task finished: publish `initialize`, `config`, take the lock.
    FinishBootstrap,
    /// Our bootstrap task failed: give the `initialize` claim back.
    AbortBootstrap,
    /// Someone else is bootstrapping (or there is no leader to clone from yet).
    WaitForLeaderToBootstrap,
    /// Clone with pg_basebackup from `source`.
    CloneFrom {
        source: MemberName,
        from_leader: bool,
    },
    /// We hold the lock but our data directory is empty.
    ReleaseLockDataDirEmpty,
    /// Paused with an empty data directory: do nothing.
    PausedUninitialized,

    // --- existing data (patroni.md §3.2 step 10) ---
    /// Our data belongs to another cluster: never race, never follow.
    SysidMismatch { mine: String, cluster: String },
    /// No `initialize` key but PostgreSQL runs as a replica: refuse to guess.
    NoInitializeRunningReplica,
    /// No `initialize` key and we have a usable data directory: claim it for our sysid.
    AdoptExistingData { sysid: String },

    // --- PostgreSQL not running (patroni.md §3.8) ---
    /// We hold the lock and PostgreSQL is down: restart it in place as primary.
    StartPrimaryAfterFailure,
    /// The in-place restart failed: release the lock so a replica can take over.
    ReleaseAfterFailedStart,
    /// `primary_start_timeout: 0`: do not restart, hand over at once.
    FailoverAfterCrash,
    /// Start PostgreSQL as a replica of `leader` (none: no upstream yet).
    StartAsReplica {
        leader: Option<MemberName>,
        rewind_check: bool,
    },
    /// Paused and PostgreSQL is stopped: it is not started; the lock is released if we held it.
    PausedStopped { release_lock: bool },

    // --- we hold the lock (patroni.md §3.3) ---
    /// Lock renewed, PostgreSQL is primary.
    LeaderRenewed { me: MemberName },
    /// Lock renewed but PostgreSQL is a replica: promote it.
    PromoteWithLock,
    /// Paused leader whose PostgreSQL is not primary: release the lock.
    PausedReleaseNotPrimary,
    /// We hold the lock but the watchdog is required and unusable: release it.
    ReleaseLockWatchdog,
    /// Switchover/failover requested: graceful demote (stop fast while holding the lock).
    SwitchoverDemote { candidate: Option<MemberName> },
    /// Our switchover stop finished: release the lock so the candidate can take it.
    ReleaseAfterSwitchover,
    /// The `failover` key cannot or need not be honoured: clear it (`{}`).
    ClearFailover { reason: String },
    /// A scheduled switchover is still in the future.
    AwaitScheduledSwitchover { at: String, in_secs: i64 },

    // --- someone else holds the lock ---
    /// We run as primary without the lock: stop now (another node leads or will).
    DemoteNotLeader { leader: MemberName },
    /// Paused primary without the lock: keep running.
    PausedPrimaryWithoutLock { leader: MemberName },
    /// A running replica that does not stream from `leader` while its timeline differs from
    /// the leader's may hold WAL the leader never had (patroni.md §3.9): stop it, check for
    /// divergence, pg_rewind when needed, and start it again following `leader`.
    RejoinCheck { leader: MemberName },
    /// Replicate from the leader. `reconfigure`: our upstream is not the leader yet.
    FollowLeader {
        me: MemberName,
        leader: MemberName,
        reconfigure: bool,
    },

    // --- no leader: the race (patroni.md §3.4) ---
    /// We are the healthiest: try to create the leader key, promote on success.
    AcquireLock,
    /// Executor outcome of [`Decision::AcquireLock`] on success.
    PromotedByLock,
    /// Executor outcome of [`Decision::AcquireLock`] when someone else was faster.
    FollowAfterFailedRace,
    /// Somebody else is healthier.
    NotHealthiest { reason: NotHealthiest },
    /// nofailover / failover_priority ≤ 0.
    NotAllowedToPromote,
}

impl Decision {
    /// Whether this decision stops (or keeps stopped) a PostgreSQL that ran as primary.
    pub fn demotes(&self) -> bool {
        matches!(
            self,
            Decision::DemoteDcsUnreachable
                | Decision::DemoteRenewalFailed
                | Decision::CancelPromoteLostLock
                | Decision::ReleaseAfterStartTimeout
                | Decision::DemoteNotLeader { .. }
                | Decision::SwitchoverDemote { .. }
                | Decision::FailoverAfterCrash
        )
    }
}

impl fmt::Display for Decision {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Decision::DemoteDcsUnreachable => {
                f.write_str("demoted self because DCS is not accessible and I was a leader")
            }
            Decision::DcsUnreachablePaused => {
                f.write_str("DCS is not accessible, the cluster is paused: no action")
            }
            Decision::DcsUnreachableSecondary => {
                f.write_str("DCS is not accessible: no action as a secondary")
            }
            Decision::DemoteRenewalFailed => {
                f.write_str("demoted self because failed to update leader lock in DCS")
            }
            Decision::FailsafeKeepPrimary => f.write_str(
                "continue to run as a leader because failsafe mode is enabled and all members \
                 are accessible",
            ),
            Decision::DemoteFailsafeRefused { member, reason } => write!(
                f,
                "demoted self because DCS is not accessible and I was a leader (failsafe: \
                 {member} {reason})"
            ),
            Decision::FailsafeLeaderAnnounced { leader } => write!(
                f,
                "no action. {leader} announced itself as the leader in failsafe mode less than \
                 ttl ago"
            ),
            Decision::PrimaryOnRenewedLease => f.write_str(
                "renewed the leader lock but could not read the cluster: staying primary on the \
                 renewed lease",
            ),
            Decision::PausedRenewalFailed => f.write_str(
                "failed to update leader lock in DCS, cluster is paused: postgres keeps running",
            ),
            Decision::LeaderDuringAction { action } => {
                write!(f, "updated leader lock during {action}")
            }
            Decision::ActionInProgress { action } => write!(f, "{action} in progress"),
            Decision::CancelPromoteLostLock => f.write_str("lost leader before promote"),
            Decision::ReleaseAfterStartTimeout => f.write_str(
                "released leader key because postgres did not start within primary_start_timeout",
            ),
            Decision::RaceBootstrap => f.write_str("trying to bootstrap a new cluster"),
            Decision::FinishBootstrap => f.write_str("initialized a new cluster"),
            Decision::AbortBootstrap => {
                f.write_str("removing initialize key after failed attempt to bootstrap the cluster")
            }
            Decision::WaitForLeaderToBootstrap => f.write_str("waiting for leader to bootstrap"),
            Decision::CloneFrom { source, from_leader: true } => {
                write!(f, "trying to bootstrap from leader '{source}'")
            }
            Decision::CloneFrom { source, from_leader: false } => {
                write!(f, "trying to bootstrap from replica '{source}'")
            }
            Decision::ReleaseLockDataDirEmpty => {
                f.write_str("released leader lock because the data directory is empty")
            }
            Decision::PausedUninitialized => {
                f.write_str("data directory is empty and the cluster is paused: no action")
            }
            Decision::SysidMismatch { mine, cluster } => write!(
                f,
                "system ID mismatch, node belongs to a different cluster: {mine} != {cluster}"
            ),
            Decision::NoInitializeRunningReplica => {
                f.write_str("No initialize key in DCS and PostgreSQL is running as replica")
            }
            Decision::AdoptExistingData { sysid } => {
                write!(f, "acquired initialize key for existing data (system ID {sysid})")
            }
            Decision::StartPrimaryAfterFailure => f.write_str("starting primary after failure"),
            Decision::ReleaseAfterFailedStart => {
                f.write_str("removed leader key after trying and failing to start postgres")
            }
            Decision::FailoverAfterCrash => f.write_str(
                "released leader key for failover because postgres crashed and primary_start_timeout is 0",
            ),
            Decision::StartAsReplica { leader: Some(l), .. } => {
                write!(f, "starting as a secondary following {l}")
            }
            Decision::StartAsReplica { leader: None, .. } => {
                f.write_str("starting as a secondary without a leader")
            }
            Decision::PausedStopped { release_lock: true } => {
                f.write_str("removed leader lock because postgres is not running")
            }
            Decision::PausedStopped { release_lock: false } => {
                f.write_str("postgres is not running and the cluster is paused: not starting it")
            }
            Decision::LeaderRenewed { me } => {
                write!(f, "no action. I am ({me}), the leader with the lock")
            }
            Decision::PromoteWithLock => {
                f.write_str("promoted self to leader because I had the session lock")
            }
            Decision::PausedReleaseNotPrimary => {
                f.write_str("removed leader lock because postgres is not running as primary")
            }
            Decision::ReleaseLockWatchdog => f.write_str(
                "released leader lock because the watchdog is required but unusable",
            ),
            Decision::SwitchoverDemote { .. } => f.write_str("manual failover: demoting myself"),
            Decision::ReleaseAfterSwitchover => {
                f.write_str("released leader key after manual failover")
            }
            Decision::ClearFailover { reason } => write!(f, "manual failover: {reason}"),
            Decision::AwaitScheduledSwitchover { at, in_secs } => {
                write!(f, "Awaiting failover at {at} (in {in_secs} seconds)")
            }
            Decision::DemoteNotLeader { .. } => {
                f.write_str("demoting self because i do not have the lock and i was a leader")
            }
            Decision::PausedPrimaryWithoutLock { .. } => {
                f.write_str("continue to run as primary without lock")
            }
            Decision::RejoinCheck { leader } => write!(
                f,
                "not streaming from leader ({leader}) on its timeline: restarting through a \
                 pg_rewind check before following it"
            ),
            Decision::FollowLeader { me, leader, reconfigure: false } => {
                write!(f, "no action. I am ({me}), a secondary, and following a leader ({leader})")
            }
            Decision::FollowLeader { leader, reconfigure: true, .. } => {
                write!(f, "following new leader ({leader})")
            }
            Decision::AcquireLock => f.write_str("trying to acquire the leader lock"),
            Decision::PromotedByLock => {
                f.write_str("promoted self to leader by acquiring session lock")
            }
            Decision::FollowAfterFailedRace => {
                f.write_str("following new leader after trying and failing to obtain lock")
            }
            Decision::NotHealthiest { .. } => {
                f.write_str("following a different leader because i am not the healthiest node")
            }
            Decision::NotAllowedToPromote => {
                f.write_str("following a different leader because I am not allowed to promote")
            }
        }
    }
}
