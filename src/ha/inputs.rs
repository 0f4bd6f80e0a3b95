//! Everything [`decide`](super::decide) looks at, as plain data: the cluster view (or the fact
//! that the DCS could not be read), the local PostgreSQL observation, the outcome of this
//! cycle's lock renewal, facts the loop remembers between cycles, the peers' `/patroni`
//! answers, the effective dynamic config, and the clock.
//!
//! Nothing here performs I/O or reads a clock: the loop gathers all of it first ("observe"),
//! so the decision is a pure function that table tests can drive row by row.

use chrono::{DateTime, Utc};

use tokio::time::Instant;

use crate::config::WatchdogMode;
pub use crate::dcs::Tags;
use crate::dcs::{ClusterView, DynamicConfig};
pub use crate::peers::PeerStatus;
use crate::pg::PgStatus;
use crate::types::{Lsn, MemberName, Timeline};

/// What the loop learnt when it tried to renew the leader lock this cycle.
///
/// Renewal is attempted *before* deciding, whenever we held the lock last cycle or the `leader`
/// key names us, so that the decision already knows whether we still lead.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Renewal {
    /// We had no reason to renew (the key does not name us and we did not hold it).
    #[default]
    NotAttempted,
    /// `update_leader` succeeded: the key names us and lives ≥ ttl from when it was sent.
    Renewed,
    /// The DCS answered that the key names somebody else.
    Lost,
    /// The DCS could not be reached (or our lease could not be refreshed) within retry_timeout.
    Failed,
}

/// Long-running actions the loop runs as a spawned task while it keeps cycling (and, as
/// leader, keeps renewing the lock): Patroni's async executor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ActionKind {
    /// initdb + start + post_bootstrap of a brand-new cluster.
    Bootstrap,
    /// pg_basebackup from a member, then start as a replica.
    Clone,
    /// Start a crashed primary in place while we hold the lock.
    StartPrimary,
    /// Start as a replica (with a pg_rewind check/run first when asked).
    StartReplica,
    /// pg_ctl promote after winning the lock.
    Promote,
    /// Switchover: stop fast while holding the lock; the loop releases the lock afterwards.
    SwitchoverDemote,
    /// `POST /restart`.
    Restart,
    /// `POST /reinitialize`: wipe and clone again.
    Reinitialize,
}

impl ActionKind {
    /// The name Patroni uses in "<action> already in progress" / "<action> in progress".
    pub fn as_str(self) -> &'static str {
        match self {
            ActionKind::Bootstrap => "bootstrap",
            ActionKind::Clone => "creating replica",
            ActionKind::StartPrimary => "starting primary after failure",
            ActionKind::StartReplica => "starting as a secondary",
            ActionKind::Promote => "promote",
            ActionKind::SwitchoverDemote => "demote",
            ActionKind::Restart => "restart",
            ActionKind::Reinitialize => "reinitialize",
        }
    }
}

impl std::fmt::Display for ActionKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The watchdog as the decision needs to see it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WatchdogFacts {
    pub mode: WatchdogMode,
    /// Whether the device could be opened (probed at start-up / on the last activation).
    pub usable: bool,
}

impl Default for WatchdogFacts {
    fn default() -> Self {
        WatchdogFacts {
            mode: WatchdogMode::Off,
            usable: false,
        }
    }
}

impl WatchdogFacts {
    /// `required` + unusable: the node must never lead (patroni.md §3.13).
    pub fn blocks_leadership(&self) -> bool {
        self.mode == WatchdogMode::Required && !self.usable
    }
}

/// A long action that finished since the last cycle, with its outcome.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Finished {
    pub kind: ActionKind,
    pub ok: bool,
}

/// What the loop remembers between cycles (and static local facts).
#[derive(Debug, Clone, Default)]
pub struct LocalFacts {
    pub tags: Tags,
    pub watchdog: WatchdogFacts,
    /// We held the lock at the end of the previous cycle.
    pub held_lock: bool,
    /// When a `pre_promote` script last refused a promotion: no racing for `ttl` afterwards.
    pub pre_promote_failed_at: Option<Instant>,
    /// A long action currently running in its own task.
    pub action: Option<ActionKind>,
    /// When the running action started.
    pub action_started_at: Option<Instant>,
    /// A long action finished since the last decision (consumed by it).
    pub finished: Option<Finished>,
    /// We demoted ourselves (or were a primary that crashed): the next start as a replica must
    /// first check whether a pg_rewind is needed.
    pub rewind_check_pending: bool,
    /// The leader (at the timeline its member key published) against which this node's data
    /// last passed a divergence check: a running replica that does not stream is checked again
    /// only once the leader or its timeline changes, never every cycle.
    pub rejoin_checked: Option<RejoinMark>,
    /// This cycle's failsafe round (`failsafe_mode` on, the DCS lost while we led a running
    /// primary): whether every member of the `failsafe` key accepted us.
    pub failsafe_round: Option<FailsafeRound>,
    /// A leader's failsafe announcement (`POST /failsafe`) received less than `ttl` ago.
    pub failsafe_leader: Option<MemberName>,
    /// On the leader in synchronous mode: our WAL position right after we last changed
    /// `synchronous_standby_names` (Patroni's `_primary_flush_lsn`). A standby not yet in
    /// `/sync` is published only once it has flushed this far (see
    /// [`plan_sync`](super::candidates::plan_sync)); `None` = not captured yet, our current
    /// position stands in.
    pub sync_catchup_lsn: Option<Lsn>,
}

/// Outcome of the leader's failsafe round (Patroni's `check_failsafe_topology`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailsafeRound {
    /// Every other member listed in the `failsafe` key answered 200: none of them will race
    /// for `ttl`, so the primary may keep running without the DCS.
    Accepted,
    /// A listed member did not accept (or we are not listed): the normal DCS-loss demotion.
    Refused { member: MemberName, reason: String },
}

/// Whom a divergence check (pg_rewind check, or a rewind) last cleared us to follow.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RejoinMark {
    pub leader: MemberName,
    /// The leader's timeline as its member key showed it when the check was decided.
    pub leader_timeline: Option<Timeline>,
}

/// Input of [`decide`](super::decide).
#[derive(Debug, Clone)]
pub struct Inputs {
    pub me: MemberName,
    /// The cluster as read this cycle; `None` when the DCS could not be read within
    /// retry_timeout.
    pub cluster: Option<ClusterView>,
    pub renewal: Renewal,
    pub pg: PgStatus,
    pub local: LocalFacts,
    /// `/patroni` answers of the other members, fetched before deciding when a race or a
    /// switchover needs them (empty otherwise).
    pub peers: Vec<PeerStatus>,
    /// Effective dynamic config (the DCS `config`, else the last one seen, else bootstrap.dcs).
    pub config: DynamicConfig,
    pub now: Instant,
    /// Wall clock, for `scheduled_at` of a scheduled switchover.
    pub wall_now: DateTime<Utc>,
}

impl Inputs {
    pub fn paused(&self) -> bool {
        self.config.pause()
    }

    /// Do we hold the lock this cycle: the key names us and we renewed it.
    pub fn holds_lock(&self) -> bool {
        self.renewal == Renewal::Renewed
            && self.cluster.as_ref().and_then(|c| c.leader_name()) == Some(&self.me)
    }
}
