//! The observe → decide → act loop: [`HaLoop`] owns the trait objects (DCS, PostgreSQL, hooks,
//! watchdog, peer probe), runs one HA cycle every `loop_wait` (or sooner when the DCS changes
//! or the REST API sends a [`Command`]), and publishes an [`AgentStatus`] after every cycle.
//!
//! One cycle:
//! 1. reap a finished long action; renew the leader lock first if we held it (so the renewal
//!    deadline argument in [`decide`](super::decide) holds), else refresh our lease;
//! 2. load the cluster view, renew if the key names us, observe PostgreSQL, ask the peers when
//!    a race or a switchover needs them;
//! 3. [`decide`](super::decide) (pure) and log the decision;
//! 4. execute it through the traits; long actions (initdb, basebackup, start, promote, restart,
//!    switchover stop) run in a named task while the loop keeps cycling and renewing;
//! 5. leader bookkeeping (initialize, config, status, history, slots, sync), apply the dynamic
//!    config, touch our member key, publish the status.
//!
//! The loop also owns the node config: a reload (`POST /reload`, SIGHUP) is refused whole when
//! [`crate::config::restart_required`] names a change or PostgreSQL rejects it, and is
//! otherwise pushed to every dependent (see `reload_config`).
//!
//! Every executor method works on the loop's carried state, so the executor is one
//! [`HaLoop`] with its `impl` split by concern: this file keeps the state, construction and the
//! cycle (`run`, `sleep_until`, `run_cycle`, `shutdown`); [`lease`] the lock and lease,
//! [`execute`] carrying out a decision, [`actions`] the long actions in their tasks,
//! [`bookkeeping`] the leader's keys and the dynamic config, [`commands`] the REST API's
//! commands, [`publish`] the member key and the status. The decisions themselves are pure and
//! live in `decide.rs` / `candidates.rs` / `timing.rs`.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::{Map, Value};
use tokio::sync::{Notify, mpsc, oneshot, watch};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, error, info, info_span, warn};

use crate::callbacks::{CallbackAction, Hooks};
use crate::config::{AgentConfig, WatchdogMode};
use crate::dcs::{
    ClusterView, Dcs, DcsError, DynamicConfig, Failover, MemberData, PATRONI_COMPAT_VERSION,
    SyncState,
};
use crate::peers::{DEFAULT_PEER_TIMEOUT, PeerProbe};
use crate::pg::{
    ControlState, PgError, PgState, PgStatus, Postgres, Role, StartAs, StopMode, Upstream,
};
use crate::status::{
    AgentStatus, Command, CommandReply, FailsafeBoard, PgherdStatus, RestartRequest,
};
use crate::types::{Lsn, MemberName, Timeline};
use crate::watchdog::WatchdogDevice;

use super::candidates::plan_sync;
use super::conditions::{Condition, Conditions};
use super::decide::decide;
use super::decision::Decision;
use super::inputs::{
    ActionKind, Finished, Inputs, LocalFacts, RejoinMark, Renewal, Tags, WatchdogFacts,
};
use super::leader_upkeep::{self, HistoryMark};
use super::restart;

mod actions;
mod bookkeeping;
mod commands;
mod execute;
mod lease;
mod publish;

/// How long a replica start (after a basebackup, a rejoin, following a new leader) may take
/// before it counts as failed: a replica replays WAL to a consistent point before it accepts
/// connections, which after a crash takes tens of seconds; the loop keeps cycling meanwhile.
const REPLICA_START_TIMEOUT: Duration = Duration::from_secs(60);
/// A fast stop (restart, rewind check, shutdown of a replica): it writes a shutdown
/// checkpoint, which on a busy server takes a while; past this the stop is reported failed.
const FAST_STOP_TIMEOUT: Duration = Duration::from_secs(60);
/// The immediate stop before `reinitialize` wipes the data directory: no checkpoint, only the
/// processes exiting, so half a minute is generous.
const IMMEDIATE_STOP_TIMEOUT: Duration = Duration::from_secs(30);
/// Floor of promote's wait (retry_timeout when longer): the end-of-recovery checkpoint of a
/// promotion can outlast a short retry_timeout, and a promote cut short leaves a half-done role.
const MIN_PROMOTE_TIMEOUT: Duration = Duration::from_secs(30);
/// Floor of `primary_start_timeout` (s) for starting or restarting a primary: the setting may
/// be 0 (Patroni: fail over at once), but `pg_ctl start` needs a few seconds to report at all.
const MIN_PRIMARY_START_SECS: u64 = 10;
/// Floor (s) of a bootstrap's initdb + first start: initdb with checksums on a slow disk takes
/// far longer than a normal start, whatever `primary_start_timeout` says.
const MIN_BOOTSTRAP_START_SECS: u64 = 60;
/// Floor (s) of a switchover's graceful stop of the old primary: its checkpoint must finish for
/// the candidate to get all WAL; `primary_stop_timeout` defaults to 0 (no limit in Patroni).
const MIN_SWITCHOVER_STOP_SECS: u64 = 60;

/// Result of a long action's task: `Err` carries a log-safe message.
type ActionResult = Result<(), String>;

/// A long action running in its own task.
struct RunningAction {
    kind: ActionKind,
    started_at: Instant,
    cancel: CancellationToken,
    handle: JoinHandle<ActionResult>,
    /// `POST /restart` waiting for the outcome.
    reply: Option<oneshot::Sender<CommandReply>>,
    /// The action ran the pg_rewind check: success clears `rewind_check_pending`.
    rewind_checked: bool,
    /// The leader this action's divergence check was run against: success records it as
    /// `rejoin_checked` so the check is not repeated for the same leader and timeline.
    rejoin_mark: Option<RejoinMark>,
}

/// Receives each config a reload put in force (see [`HaLoop::with_config_subscriber`]).
pub type ConfigSubscriber = Arc<dyn Fn(&AgentConfig) + Send + Sync>;

/// What one cycle did (returned by [`HaLoop::run_cycle`] for step-driven simulations).
#[derive(Debug, Clone)]
pub struct CycleReport {
    /// The decision, after the executor resolved two-phase ones (lock race, bootstrap race).
    pub decision: Decision,
    /// Whether the next cycle should run without waiting (a follow-up is due).
    pub rerun: bool,
}

/// The HA loop of one agent. Construct with [`HaLoop::new`], drive with [`HaLoop::run`] (or
/// [`HaLoop::run_cycle`] step by step in simulations).
pub struct HaLoop {
    cfg: AgentConfig,
    config_path: Option<PathBuf>,
    /// Told about every config a reload put in force (the REST API's credentials).
    config_subscriber: Option<ConfigSubscriber>,
    /// What `/patroni` reports under `pgherd` (config digest, refusals, applied revision).
    report: PgherdStatus,
    me: MemberName,
    dcs: Arc<dyn Dcs>,
    pg: Arc<dyn Postgres>,
    hooks: Arc<dyn Hooks>,
    /// Behind a mutex only so that the loop's future is `Send` (the device is `Send`, not
    /// `Sync`); the guard is never held across an await.
    watchdog: std::sync::Mutex<Box<dyn WatchdogDevice>>,
    peers: Arc<dyn PeerProbe>,
    status_tx: watch::Sender<AgentStatus>,
    commands: mpsc::Receiver<Command>,
    peer_timeout: Duration,

    // --- state carried between cycles ---
    held_lock: bool,
    /// When the last successful lease refresh (keepalive / update_leader / acquire) was sent,
    /// or the last failsafe round every member accepted.
    lease_ok_sent: Option<Instant>,
    /// Running as the leader without the DCS: the last failsafe round was accepted.
    failsafe_active: bool,
    /// Failsafe announcements received by our REST API (`POST /failsafe`).
    failsafe_board: FailsafeBoard,
    pre_promote_failed_at: Option<Instant>,
    /// (timeline, last line's parent, its switchpoint) of the `history` this node last wrote,
    /// so a history whose timelines skip numbers is not rewritten every cycle.
    history_written: Option<HistoryMark>,
    rewind_check_pending: bool,
    /// See [`LocalFacts::rejoin_checked`].
    rejoin_checked: Option<RejoinMark>,
    action: Option<RunningAction>,
    finished: Option<Finished>,
    action_done: Arc<Notify>,
    last_view: Option<Arc<ClusterView>>,
    config: DynamicConfig,
    applied_config: Option<String>,
    /// The DCS config (JSON) PostgreSQL last refused (a rejected pg_hba): not retried every
    /// cycle, only when the DCS config or the local file changes.
    refused_config: Option<String>,
    /// PostgreSQL's files changed but its reload failed: the next apply reloads even though
    /// the files are already current. `Some(true)` when the failed reload was a local config
    /// reload (its `config_error` is cleared once the retry succeeds).
    reload_owed: Option<bool>,
    watchdog_usable: bool,
    /// Persistent conditions, logged when they start and end (see [`Conditions`]).
    conditions: Conditions,
    dcs_last_seen: Option<i64>,
    scheduled_restart: Option<(DateTime<Utc>, RestartRequest)>,
    last_slots_wanted: Option<Vec<String>>,
    /// See [`LocalFacts::sync_catchup_lsn`]; cleared whenever we do not lead.
    sync_catchup_lsn: Option<Lsn>,
    last_member: Option<MemberData>,
    last_pg: PgStatus,
    last_decision: String,
    role_after_stop: Option<Role>,
    wake_now: bool,
}

impl HaLoop {
    /// Builds the loop. Nothing happens until [`HaLoop::run`]. `status_tx` is typically made
    /// with `watch::channel(HaLoop::initial_status(&cfg))`.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        cfg: AgentConfig,
        dcs: Arc<dyn Dcs>,
        pg: Arc<dyn Postgres>,
        hooks: Arc<dyn Hooks>,
        watchdog: Box<dyn WatchdogDevice>,
        peers: Arc<dyn PeerProbe>,
        status_tx: watch::Sender<AgentStatus>,
        commands: mpsc::Receiver<Command>,
    ) -> HaLoop {
        let me = MemberName::new(cfg.name.clone());
        let config = DynamicConfig(cfg.bootstrap.dcs.clone());
        HaLoop {
            me,
            dcs,
            pg,
            hooks,
            watchdog: std::sync::Mutex::new(watchdog),
            peers,
            status_tx,
            commands,
            peer_timeout: DEFAULT_PEER_TIMEOUT,
            config_path: None,
            config_subscriber: None,
            report: PgherdStatus::default(),
            refused_config: None,
            reload_owed: None,
            held_lock: false,
            lease_ok_sent: None,
            pre_promote_failed_at: None,
            history_written: None,
            rewind_check_pending: false,
            rejoin_checked: None,
            action: None,
            finished: None,
            action_done: Arc::new(Notify::new()),
            last_view: None,
            config,
            applied_config: None,
            watchdog_usable: true,
            conditions: Conditions::default(),
            dcs_last_seen: None,
            scheduled_restart: None,
            last_slots_wanted: None,
            sync_catchup_lsn: None,
            last_member: None,
            last_pg: PgStatus::default(),
            failsafe_active: false,
            failsafe_board: FailsafeBoard::default(),
            last_decision: String::new(),
            role_after_stop: None,
            wake_now: false,
            cfg,
        }
    }

    /// The file `POST /reload` / SIGHUP re-reads (the whole node config, see `reload_config`);
    /// without it a reload only re-applies the dynamic config.
    pub fn with_config_path(mut self, path: PathBuf) -> HaLoop {
        self.config_path = Some(path);
        self
    }

    /// The sha256 of the config file bytes the loop was started with (`/patroni`
    /// `pgherd.config_sha256`; a successful reload replaces it).
    pub fn with_config_sha256(mut self, sha256: String) -> HaLoop {
        self.report.config_sha256 = Some(sha256);
        self
    }

    /// Called with every config a reload puts in force, after PostgreSQL, the hooks and the DCS
    /// endpoints took it over: the agent wiring swaps the REST API's credentials there.
    pub fn with_config_subscriber(mut self, f: ConfigSubscriber) -> HaLoop {
        self.config_subscriber = Some(f);
        self
    }

    /// Shares the board on which the REST API records `POST /failsafe` announcements.
    pub fn with_failsafe_board(mut self, board: FailsafeBoard) -> HaLoop {
        self.failsafe_board = board;
        self
    }

    /// Overrides the peer probe timeout ([`DEFAULT_PEER_TIMEOUT`]).
    pub fn with_peer_timeout(mut self, t: Duration) -> HaLoop {
        self.peer_timeout = t;
        self
    }

    /// The status to seed the watch channel with before the first cycle.
    pub fn initial_status(cfg: &AgentConfig) -> AgentStatus {
        let c = DynamicConfig(cfg.bootstrap.dcs.clone());
        AgentStatus {
            scope: cfg.scope.clone(),
            name: cfg.name.clone(),
            role: Role::Uninitialized,
            state: PgState::Stopped,
            pg: PgStatus::default(),
            cluster: None,
            dcs_ok: false,
            dcs_last_seen: None,
            leader_until: None,
            paused: false,
            tags: cfg.tags.clone(),
            pending_restart: false,
            pending_restart_reason: None,
            scheduled_restart: None,
            watchdog_failed: false,
            last_decision: String::new(),
            action_in_progress: None,
            last_cycle: std::time::Instant::now(),
            ttl: c.ttl(),
            loop_wait: c.loop_wait(),
            updated_at: std::time::SystemTime::now(),
            pgherd: PgherdStatus::default(),
            failsafe_active: false,
        }
    }

    fn wd(&self) -> std::sync::MutexGuard<'_, Box<dyn WatchdogDevice>> {
        self.watchdog.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn ttl(&self) -> Duration {
        Duration::from_secs(self.config.ttl())
    }
    fn loop_wait(&self) -> Duration {
        Duration::from_secs(self.config.loop_wait())
    }
    fn retry_timeout(&self) -> Duration {
        Duration::from_secs(self.config.retry_timeout())
    }
    fn tags(&self) -> Tags {
        Tags::from_map(&self.cfg.tags)
    }

    /// Runs cycles until `shutdown` is cancelled, then shuts down like Patroni on SIGTERM:
    /// unless paused, stop PostgreSQL (fast), release the leader key, disarm the watchdog.
    pub async fn run(mut self, shutdown: CancellationToken) {
        info!(member = %self.me, "starting HA loop");
        let mut reran = false;
        loop {
            let started = Instant::now();
            let report = self.run_cycle().await;
            if shutdown.is_cancelled() {
                break;
            }
            // A follow-up cycle runs at once, but only one in a row: a decision that keeps
            // asking for a rerun must not spin (under paused test time it would never yield).
            if report.rerun && !reran {
                reran = true;
                continue;
            }
            reran = false;
            // Cycles are scheduled from their *start* (Patroni's next_run += loop_wait): this
            // bounds the gap between two lock renewals by loop_wait (plus an overrunning
            // cycle), which the demotion deadline relies on.
            let deadline = started + self.loop_wait();
            if !self.sleep_until(deadline, &shutdown).await {
                break;
            }
        }
        self.shutdown().await;
    }

    /// Sleeps until `deadline`, a relevant DCS change, a command, or a finished action.
    /// Returns `false` when shutdown was requested.
    async fn sleep_until(&mut self, deadline: Instant, shutdown: &CancellationToken) -> bool {
        let mut after = self.last_view.as_ref().map(|v| v.revision).unwrap_or(0);
        // Cleared when the watch returns early without a change (DCS trouble): we then nap on
        // the timer alone instead of spinning on a failing watch.
        let mut watching = true;
        loop {
            let now = Instant::now();
            if now >= deadline || self.wake_now {
                self.wake_now = false;
                return true;
            }
            let remaining = deadline - now;
            let dcs = self.dcs.clone();
            let done = self.action_done.clone();
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep_until(deadline) => return true,
                _ = done.notified() => {
                    tracing::trace!(member = %self.me, "woken by a finished action");
                    return true;
                }
                cmd = self.commands.recv() => {
                    match cmd {
                        Some(c) => {
                            if self.handle_command(c).await {
                                return true;
                            }
                        }
                        // The API is gone: keep cycling on the timer alone.
                        None => {
                            tokio::select! {
                                _ = shutdown.cancelled() => return false,
                                _ = tokio::time::sleep_until(deadline) => return true,
                            }
                        }
                    }
                }
                changed = dcs.wait_for_change(after, remaining), if watching => {
                    if !changed {
                        watching = false;
                        continue;
                    }
                    tracing::trace!(member = %self.me, after, "woken by a DCS change");
                    // Only changes that can alter a decision end the nap early (Patroni wakes
                    // on leader/config/failover changes); our own member writes would
                    // otherwise keep waking every agent.
                    match dcs.load().await {
                        Ok(v) => {
                            after = v.revision;
                            if self.interesting_change(&v) {
                                return true;
                            }
                        }
                        // The DCS woke us but cannot be read: nap on the timer alone (a
                        // cycle now would fail the same way; returning at once spun the loop).
                        Err(_) => watching = false,
                    }
                }
            }
        }
    }

    fn interesting_change(&self, v: &ClusterView) -> bool {
        let Some(old) = &self.last_view else {
            return true;
        };
        old.leader.as_ref().map(|l| (&l.name, l.revision))
            != v.leader.as_ref().map(|l| (&l.name, l.revision))
            || old.initialize != v.initialize
            || old.config.as_ref().map(|c| c.1) != v.config.as_ref().map(|c| c.1)
            || old.failover.as_ref().map(|c| c.1) != v.failover.as_ref().map(|c| c.1)
            || old.sync.as_ref().map(|c| c.1) != v.sync.as_ref().map(|c| c.1)
            || old.members.len() != v.members.len()
    }

    /// One full HA cycle. Public so that simulations can drive agents step by step.
    pub async fn run_cycle(&mut self) -> CycleReport {
        // Drain commands that arrived while we were busy.
        while let Ok(c) = self.commands.try_recv() {
            self.handle_command(c).await;
        }
        let now = Instant::now();
        self.reap_action().await;

        // 1. Renew first when we lead: see decide.rs `dcs_unreachable` for why the deadline
        //    argument needs the renewal at the top of the cycle.
        let mut renewal = Renewal::NotAttempted;
        let led = self.held_lock;
        if led {
            renewal = self.renew(now).await;
        } else {
            self.refresh_lease(now).await;
        }

        // 2. Observe. A failed renewal skips the load: we demote without spending another
        //    retry_timeout on a DCS that just failed us.
        let view = if renewal == Renewal::Failed {
            None
        } else {
            match self.bounded(self.dcs.load()).await {
                Ok(v) => Some(v),
                Err(e) => {
                    self.conditions.raise(Condition::DcsUnreachable, &e);
                    None
                }
            }
        };
        if let Some(v) = &view {
            self.conditions.clear(Condition::DcsUnreachable);
            self.dcs_last_seen = Some(Utc::now().timestamp());
            if let Some((c, _)) = &v.config {
                self.config = c.clone();
            }
            if !self.held_lock && v.leader_name() == Some(&self.me) {
                // A restarted agent whose key still names it re-attaches it (Patroni: "I am
                // the leader but not owner of the lease").
                renewal = self.renew(Instant::now()).await;
            }
        }
        // A failed renewal of a held lock reached its demotion deadline: the time left is
        // reserved for stopping PostgreSQL (`ha::timing::STOP_RESERVE`), so the decision runs on
        // the last cycle's observation instead of a fresh one (a hung server can take seconds to
        // answer it).
        let pg = if renewal == Renewal::Failed && led {
            self.last_pg.clone()
        } else {
            self.pg.observe().await
        };
        // The DCS is lost while we lead a running primary: with failsafe_mode, ask every
        // failsafe member to accept us before the decision (which keeps or demotes on it).
        let failsafe_round = if led
            && renewal != Renewal::Renewed
            && view.is_none()
            && self.config.failsafe_mode()
            && !self.config.pause()
            && pg.is_running_primary()
        {
            Some(self.failsafe_round().await)
        } else {
            None
        };
        let peers = match &view {
            Some(v) if self.needs_peers(v, &pg) => {
                let members: Vec<_> = v
                    .members
                    .values()
                    .filter(|m| m.name != self.me)
                    .cloned()
                    .collect();
                self.peers.fetch(&members, self.peer_timeout).await
            }
            _ => Vec::new(),
        };

        // 3. Decide.
        let inputs = Inputs {
            me: self.me.clone(),
            cluster: view.clone(),
            renewal,
            pg: pg.clone(),
            local: LocalFacts {
                tags: self.tags(),
                watchdog: WatchdogFacts {
                    mode: self.cfg.watchdog.mode,
                    usable: self.watchdog_usable,
                },
                held_lock: self.held_lock,
                pre_promote_failed_at: self.pre_promote_failed_at,
                action: self.action.as_ref().map(|a| a.kind),
                action_started_at: self.action.as_ref().map(|a| a.started_at),
                finished: self.finished.take(),
                rewind_check_pending: self.rewind_check_pending,
                rejoin_checked: self.rejoin_checked.clone(),
                failsafe_round,
                failsafe_leader: self
                    .failsafe_board
                    .current(now, self.ttl())
                    .map(|n| n.leader),
                sync_catchup_lsn: self.sync_catchup_lsn,
            },
            peers,
            config: self.config.clone(),
            now,
            wall_now: Utc::now(),
        };
        let decision = decide(&inputs);

        // PostgreSQL must know the DCS parameters before this cycle's action starts it (a clone
        // started with initdb defaults would otherwise run with them until a restart).
        let mut reloaded = false;
        if let Some(v) = &view {
            let rev = v.config.as_ref().map(|c| c.1.0);
            reloaded = self.apply_dynamic_config(&inputs.pg, rev).await;
        }

        // 4. Act.
        let (decision, rerun) = self.execute(decision, &inputs).await;
        let paused = inputs.paused();
        if paused {
            info!(member = %self.me, "PAUSE: {decision}");
        } else {
            info!(member = %self.me, "{decision}");
        }
        if let Decision::NotHealthiest { reason } = &decision {
            debug!(%reason, "not racing");
        }
        self.last_decision = decision.to_string();

        // 5. Bookkeeping.
        if !self.held_lock {
            // A later leadership captures its own catch-up point (see `apply_sync_plan`).
            self.sync_catchup_lsn = None;
        }
        if paused || !self.held_lock {
            // The watchdog protects a primary whose agent hangs; a non-leader or a paused
            // cluster must not be reset by it.
            self.watchdog_close();
        }
        // After a reload the status must show PostgreSQL as it runs with the new files
        // (pending_restart and the published dcs_config_revision go together).
        let pg_after = if decision.demotes() || rerun || reloaded {
            self.pg.observe().await
        } else {
            pg
        };
        if let Some(v) = &view {
            // (The DCS config was handed to PostgreSQL before acting, see above.)
            if self.held_lock && pg_after.is_running_primary() && self.action.is_none() {
                self.leader_bookkeeping(v, &inputs, &pg_after).await;
            }
            self.check_scheduled_restart(&pg_after).await;
            self.touch_member(&pg_after, paused).await;
        }
        self.last_view = view.map(Arc::new).or(self.last_view.take());
        self.last_pg = pg_after;
        self.publish(view_ok(&inputs), paused);
        CycleReport { decision, rerun }
    }

    /// Peers are needed to race (no leader) and, on the leader, to judge a switchover or a
    /// crash failover.
    fn needs_peers(&self, v: &ClusterView, pg: &PgStatus) -> bool {
        match v.leader_name() {
            None => true,
            Some(l) if *l == self.me => v.failover_request().is_some() || !pg.running,
            Some(_) => false,
        }
    }

    /// Patroni on SIGTERM: unless paused, stop PostgreSQL (fast), release the leader key and
    /// disarm the watchdog.
    async fn shutdown(&mut self) {
        info!(member = %self.me, "shutting down");
        self.cancel_action().await;
        let paused = self.config.pause();
        if !paused {
            self.stop_pg(StopMode::Fast, true).await;
            if self.held_lock {
                // Release only after the stop: a replica must not promote while we still
                // accept writes.
                self.lose_lock(true).await;
            }
            let pg = self.pg.observe().await;
            self.last_pg = pg.clone();
            self.touch_member(&pg, paused).await;
        }
        self.watchdog_close();
        self.publish(false, paused);
    }
}

/// The [`RejoinMark`] for following `leader` as the view shows it now.
fn rejoin_mark(v: &ClusterView, leader: &MemberName) -> RejoinMark {
    RejoinMark {
        leader: leader.clone(),
        leader_timeline: v
            .members
            .get(leader)
            .and_then(|m| m.data.timeline)
            .map(Timeline),
    }
}

fn view_ok(i: &Inputs) -> bool {
    i.cluster.is_some()
}

/// The PostgreSQL address of member `name`, from its `conn_url`.
pub fn upstream_of(v: &ClusterView, name: &MemberName) -> Option<Upstream> {
    let m = v.members.get(name)?;
    let (host, port) = m.data.conn_host_port()?;
    Some(Upstream {
        member: name.clone(),
        host,
        port,
    })
}
