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
//! otherwise pushed to every dependent (see `reload_config`). One long file because every
//! executor method works on the loop's carried state; the decisions themselves are pure and
//! live in `decide.rs` / `candidates.rs`.

use std::collections::BTreeMap;
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
    Status, SyncState,
};
use crate::peers::{DEFAULT_PEER_TIMEOUT, PeerProbe};
use crate::pg::{
    ControlState, PgError, PgState, PgStatus, Postgres, Role, StartAs, StopMode, Upstream,
};
use crate::status::{AgentStatus, Command, CommandReply, PgherdStatus, RestartRequest};
use crate::types::{MemberName, Timeline};
use crate::watchdog::WatchdogDevice;

use super::candidates::plan_sync;
use super::conditions::{Condition, Conditions};
use super::decide::decide;
use super::decision::Decision;
use super::inputs::{
    ActionKind, Finished, Inputs, LocalFacts, RejoinMark, Renewal, Tags, WatchdogFacts,
};

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
    /// When the last successful lease refresh (keepalive / update_leader / acquire) was sent.
    lease_ok_sent: Option<Instant>,
    pre_promote_failed_at: Option<Instant>,
    /// (timeline, last line's parent, its switchpoint) of the `history` this node last wrote,
    /// so a history whose timelines skip numbers is not rewritten every cycle.
    history_written: Option<(u32, u32, u64)>,
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
            last_member: None,
            last_pg: PgStatus::default(),
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
        if self.held_lock {
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
        let pg = self.pg.observe().await;
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
            last_renewal_sent: self.lease_ok_sent,
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

    /// Wraps a DCS call in a retry_timeout deadline (belt and braces: the trait promises it).
    async fn bounded<T>(
        &self,
        fut: impl std::future::Future<Output = Result<T, DcsError>>,
    ) -> Result<T, DcsError> {
        match tokio::time::timeout(self.retry_timeout(), fut).await {
            Ok(r) => r,
            Err(_) => Err(DcsError::Unavailable("timed out".into())),
        }
    }

    /// Renews the leader lock. The time budget is capped so that, if renewal fails, at least
    /// retry_timeout remains before the lease (last success + ttl) can lapse: that is the time
    /// reserved to stop PostgreSQL.
    async fn renew(&mut self, sent: Instant) -> Renewal {
        let ttl = self.ttl();
        let retry = self.retry_timeout();
        let budget = match self.lease_ok_sent {
            Some(t) if self.held_lock => (t + ttl)
                .saturating_duration_since(sent)
                .saturating_sub(retry)
                .min(retry),
            _ => retry,
        };
        if budget.is_zero() {
            warn!("leader lease too close to expiry to risk a renewal");
            // Past the lease deadline the lock may already belong to someone else: stop
            // counting it as ours (the decision demotes a primary on this failed renewal), so
            // later cycles go through the normal, time-consuming lease refresh instead of
            // retrying this instant refusal in a hot loop.
            if self.lease_ok_sent.is_none_or(|t| sent >= t + ttl) {
                self.held_lock = false;
            }
            return Renewal::Failed;
        }
        let dcs = self.dcs.clone();
        let me = self.me.clone();
        let attempt = async {
            match dcs.update_leader(&me).await {
                Err(DcsError::LeaseNotFound) => {
                    // Our lease expired (e.g. a long pause of the process): take a new one; the
                    // update re-attaches the key if it still names us.
                    dcs.ensure_lease(ttl).await?;
                    dcs.update_leader(&me).await
                }
                r => r,
            }
        };
        let r = match tokio::time::timeout(budget, attempt).await {
            Ok(r) => r,
            Err(_) => Err(DcsError::Unavailable("renewal timed out".into())),
        };
        match r {
            Ok(true) => {
                self.lease_ok_sent = Some(sent);
                self.held_lock = true;
                // Pet the watchdog only after a successful renewal: a hung loop then cannot
                // keep the host alive past its lease.
                let pet = {
                    let mut wd = self.wd();
                    if wd.is_open() {
                        Some(wd.keepalive())
                    } else {
                        None
                    }
                };
                match pet {
                    Some(Err(e)) => {
                        self.conditions
                            .raise(Condition::WatchdogKeepaliveFailing, &e);
                    }
                    Some(Ok(())) => {
                        self.conditions.clear(Condition::WatchdogKeepaliveFailing);
                    }
                    None => {}
                }
                self.conditions.clear(Condition::LeaderRenewalFailing);
                Renewal::Renewed
            }
            Ok(false) => {
                self.held_lock = false;
                Renewal::Lost
            }
            Err(e) => {
                self.conditions.raise(Condition::LeaderRenewalFailing, &e);
                Renewal::Failed
            }
        }
    }

    /// Keeps a non-leader's lease (and with it the member key) alive.
    async fn refresh_lease(&mut self, sent: Instant) {
        let ttl = self.ttl();
        let dcs = self.dcs.clone();
        let r = self
            .bounded(async {
                dcs.ensure_lease(ttl).await?;
                match dcs.keepalive().await {
                    Err(DcsError::LeaseNotFound) => {
                        dcs.ensure_lease(ttl).await?;
                        Ok(())
                    }
                    r => r,
                }
            })
            .await;
        match r {
            Ok(()) => self.lease_ok_sent = Some(sent),
            Err(e) => debug!(error = %e, "lease refresh failed"),
        }
    }

    // ------------------------------------------------------------------ execution

    /// Carries out a decision. Returns the decision to report (two-phase decisions resolve to
    /// their outcome) and whether to run the next cycle at once.
    async fn execute(&mut self, d: Decision, i: &Inputs) -> (Decision, bool) {
        let view = i.cluster.as_ref();
        match &d {
            Decision::DemoteDcsUnreachable | Decision::DemoteRenewalFailed => {
                // Emergency: before_stop is skipped (it could eat the time reserved to stop).
                self.cancel_action().await;
                self.stop_pg(StopMode::Immediate, false).await;
                self.lose_lock(false).await;
            }
            Decision::DcsUnreachablePaused | Decision::DcsUnreachableSecondary => {}
            Decision::PausedRenewalFailed => {}
            Decision::LeaderDuringAction { .. } | Decision::ActionInProgress { .. } => {}
            Decision::CancelPromoteLostLock => {
                self.cancel_action().await;
                self.stop_pg(StopMode::Immediate, false).await;
                self.lose_lock(false).await;
            }
            Decision::ReleaseAfterStartTimeout => {
                self.cancel_action().await;
                self.stop_pg(StopMode::Immediate, false).await;
                self.lose_lock(true).await;
                return (d, true);
            }
            Decision::RaceBootstrap => match self.bounded(self.dcs.race_initialize()).await {
                Ok(true) => {
                    self.spawn_bootstrap();
                }
                Ok(false) => {
                    info!("failed to acquire initialize lock");
                    return (Decision::WaitForLeaderToBootstrap, false);
                }
                Err(e) => {
                    warn!(error = %e, "bootstrap race failed");
                    return (Decision::WaitForLeaderToBootstrap, false);
                }
            },
            Decision::FinishBootstrap => {
                if !self.finish_bootstrap(i).await {
                    // The abort must happen now: left running, the fresh primary would be
                    // adopted (and the lock taken) on the next cycle.
                    self.abort_bootstrap().await;
                    return (Decision::AbortBootstrap, true);
                }
            }
            Decision::AbortBootstrap => self.abort_bootstrap().await,
            Decision::WaitForLeaderToBootstrap => {}
            Decision::CloneFrom { source, .. } => {
                if let Some(v) = view {
                    self.spawn_clone(v, source, ActionKind::Clone, None);
                }
            }
            Decision::ReleaseLockDataDirEmpty
            | Decision::PausedReleaseNotPrimary
            | Decision::ReleaseLockWatchdog => {
                self.lose_lock(true).await;
            }
            Decision::PausedUninitialized => {}
            Decision::SysidMismatch { .. } => {
                error!(
                    "refusing to act on a data directory of another cluster; consider reinitialize"
                );
            }
            Decision::NoInitializeRunningReplica => {
                error!("refusing to adopt a running replica without an initialize key");
            }
            Decision::AdoptExistingData { sysid } => {
                if let Err(e) = self.bounded(self.dcs.set_initialize(sysid)).await {
                    warn!(error = %e, "failed to write initialize");
                }
                return (d, true);
            }
            Decision::StartPrimaryAfterFailure => {
                let timeout = Duration::from_secs(self.config.primary_start_timeout().max(10));
                self.spawn_start(ActionKind::StartPrimary, StartAs::Primary, None, timeout);
            }
            Decision::ReleaseAfterFailedStart | Decision::FailoverAfterCrash => {
                self.stop_pg(StopMode::Immediate, false).await;
                self.lose_lock(true).await;
                self.rewind_check_pending = true;
            }
            Decision::StartAsReplica {
                leader,
                rewind_check,
            } => {
                let up = leader
                    .as_ref()
                    .and_then(|l| view.and_then(|v| upstream_of(v, l)));
                let rewind = if *rewind_check { up.clone() } else { None };
                let mark = match (leader, &rewind) {
                    (Some(l), Some(_)) => view.map(|v| rejoin_mark(v, l)),
                    _ => None,
                };
                self.spawn_start(
                    ActionKind::StartReplica,
                    StartAs::Replica { upstream: up },
                    rewind,
                    Duration::from_secs(60),
                );
                if let Some(a) = self.action.as_mut() {
                    a.rejoin_mark = mark;
                }
            }
            Decision::PausedStopped { release_lock } => {
                if *release_lock {
                    self.lose_lock(true).await;
                }
            }
            Decision::LeaderRenewed { .. } => {
                // The watchdog must fence a leader's primary every cycle, also after this agent
                // restarted and re-attached a lock it still held (Patroni re-activates it in
                // enforce_primary_role each cycle): otherwise a second crash of the agent would
                // leave a primary that nothing stops once its lease lapses.
                if !i.paused() && !self.watchdog_activate() {
                    // `required` and unusable: we may not lead, so stop being primary now.
                    self.stop_pg(StopMode::Immediate, false).await;
                    self.lose_lock(true).await;
                    self.rewind_check_pending = true;
                    self.hooks
                        .callback(CallbackAction::OnRoleChange, Role::Demoted);
                    return (d, true);
                }
            }
            Decision::PromoteWithLock => {
                self.promote(i).await;
            }
            Decision::SwitchoverDemote { .. } => {
                self.spawn_switchover_demote();
            }
            Decision::ReleaseAfterSwitchover => {
                self.role_after_stop = Some(Role::Demoted);
                self.lose_lock(true).await;
                self.rewind_check_pending = true;
                self.hooks
                    .callback(CallbackAction::OnRoleChange, Role::Demoted);
                // Give the candidate a moment (Patroni sleeps 2 s) — we simply wake on the DCS
                // change that its new leader key causes.
            }
            Decision::ClearFailover { .. } => {
                let rev = view.and_then(|v| v.failover.as_ref().map(|f| f.1));
                let _ = self
                    .bounded(self.dcs.set_failover(&Failover::default(), rev))
                    .await;
            }
            Decision::AwaitScheduledSwitchover { .. } => {}
            Decision::DemoteNotLeader { .. } => {
                // Another node holds the lock: two writable primaries must not coexist, so
                // stop at once (immediate, like Patroni's immediate-nolock).
                self.cancel_action().await;
                self.stop_pg(StopMode::Immediate, false).await;
                self.lose_lock(false).await;
                self.rewind_check_pending = true;
                self.hooks
                    .callback(CallbackAction::OnRoleChange, Role::Demoted);
                return (d, true);
            }
            Decision::PausedPrimaryWithoutLock { .. } => {}
            Decision::RejoinCheck { leader } => {
                let Some(v) = view else {
                    return (d, false);
                };
                let Some(up) = upstream_of(v, leader) else {
                    warn!(%leader, "leader has no usable conn_url: cannot check for divergence");
                    return (d, false);
                };
                // The replica is stopped inside the action (pg_rewind and the divergence check
                // need a shut-down data directory); it is not streaming anyway, so no reader
                // loses anything it could still get. Should the action fail after the stop,
                // the next start must go through the check again rather than start the
                // possibly diverged data as is.
                self.rewind_check_pending = true;
                self.spawn_start(
                    ActionKind::StartReplica,
                    StartAs::Replica {
                        upstream: Some(up.clone()),
                    },
                    Some(up),
                    Duration::from_secs(60),
                );
                if let Some(a) = self.action.as_mut() {
                    a.rejoin_mark = Some(rejoin_mark(v, leader));
                }
            }
            Decision::FollowLeader {
                leader,
                reconfigure,
                ..
            } => {
                if *reconfigure
                    && let Some(up) = view.and_then(|v| upstream_of(v, leader))
                    && let Err(e) = self.pg.follow(Some(&up)).await
                {
                    warn!(error = %e, "failed to point the replica at the new leader");
                }
            }
            Decision::AcquireLock => {
                return self.acquire(i).await;
            }
            Decision::PromotedByLock | Decision::FollowAfterFailedRace => {}
            Decision::NotHealthiest { .. } | Decision::NotAllowedToPromote => {}
        }
        (d, false)
    }

    /// The race: create the leader key; on success clear the failover request and promote.
    async fn acquire(&mut self, i: &Inputs) -> (Decision, bool) {
        let ttl = self.ttl();
        let dcs = self.dcs.clone();
        let me = self.me.clone();
        let sent = Instant::now();
        let r = self
            .bounded(async {
                dcs.ensure_lease(ttl).await?;
                dcs.acquire_leader(&me).await
            })
            .await;
        match r {
            Ok(true) => {
                self.held_lock = true;
                self.lease_ok_sent = Some(sent);
                if let Some(v) = &i.cluster
                    && let Some((f, rev)) = &v.failover
                    && !f.is_empty()
                {
                    // Paused with leader+candidate: keep the candidate request alive as
                    // a plain failover (Patroni).
                    let next = if i.paused() && f.leader.is_some() && f.member.is_some() {
                        Failover {
                            member: f.member.clone(),
                            ..Default::default()
                        }
                    } else {
                        Failover::default()
                    };
                    let _ = self.bounded(self.dcs.set_failover(&next, Some(*rev))).await;
                }
                if !i.pg.is_running_primary() {
                    self.promote(i).await;
                }
                (Decision::PromotedByLock, false)
            }
            Ok(false) => (Decision::FollowAfterFailedRace, true),
            Err(e) => {
                warn!(error = %e, "leader race failed");
                (Decision::FollowAfterFailedRace, false)
            }
        }
    }

    /// Promotion while holding the lock: watchdog, pre_promote, sync pre-promote, then the
    /// async `pg_ctl promote`.
    async fn promote(&mut self, i: &Inputs) {
        if !self.watchdog_activate() {
            // required + unusable: never become primary without the reset guarantee.
            self.lose_lock(true).await;
            return;
        }
        if !self.hooks.pre_promote().await {
            warn!("pre_promote script failed: releasing the lock and not racing for ttl");
            self.pre_promote_failed_at = Some(Instant::now());
            self.lose_lock(true).await;
            return;
        }
        if self.config.synchronous_mode() {
            // Before promoting in sync mode publish ourselves as the sync leader with no
            // standby: from now on only nodes we confirm may take over (§3.10).
            let rev = i
                .cluster
                .as_ref()
                .and_then(|v| v.sync.as_ref().map(|s| s.1));
            let s = SyncState {
                leader: Some(self.me.to_string()),
                quorum: 0,
                sync_standby: None,
            };
            match self.bounded(self.dcs.set_sync(Some(&s), rev)).await {
                Ok(true) => {}
                _ => {
                    warn!("failed to write /sync before promotion; postponing promotion");
                    return;
                }
            }
            let ssn = if self.config.synchronous_mode_strict() {
                "*"
            } else {
                ""
            };
            let _ = self.pg.set_synchronous_standby_names(ssn).await;
        }
        // The newest timeline anyone in the cluster used (history, member keys): a node that
        // missed another node's promotion must still not reuse its timeline number.
        let (used, history) = i.cluster.as_ref().map_or((Timeline(1), Vec::new()), |v| {
            let members = v.members.values().filter_map(|m| m.data.timeline).max();
            let used = Timeline(v.timeline().0.max(members.unwrap_or(1)));
            (used, v.history.clone())
        });
        let pg = self.pg.clone();
        let hooks = self.hooks.clone();
        let timeout = self.retry_timeout().max(Duration::from_secs(30));
        self.spawn_action(ActionKind::Promote, None, async move {
            pg.promote(used, &history, timeout)
                .await
                .map_err(|e| e.to_string())?;
            hooks.callback(CallbackAction::OnRoleChange, Role::Primary);
            // A checkpoint right after promotion lets ex-primaries pg_rewind from us.
            if let Err(e) = pg.checkpoint().await {
                warn!(error = %e, "checkpoint after promote failed");
            }
            Ok(())
        });
    }

    /// Gives up the lock. `release`: delete the key (CAS on our name); otherwise it is left to
    /// expire or is already someone else's.
    async fn lose_lock(&mut self, release: bool) {
        if release
            && (self.held_lock
                || self.last_view.as_ref().and_then(|v| v.leader_name()) == Some(&self.me))
            && let Err(e) = self.bounded(self.dcs.release_leader(&self.me)).await
        {
            warn!(error = %e, "failed to release the leader key");
        }
        self.held_lock = false;
        self.watchdog_close();
    }

    /// Stops PostgreSQL (bounded by retry_timeout for immediate stops) and fires on_stop.
    async fn stop_pg(&mut self, mode: StopMode, run_before_stop: bool) {
        let observed = self.pg.observe().await;
        if !observed.running {
            return;
        }
        if run_before_stop {
            self.hooks.before_stop().await;
        }
        let timeout = match mode {
            StopMode::Immediate => self.retry_timeout(),
            _ => Duration::from_secs(60),
        };
        if let Err(e) = self.pg.stop(mode, timeout).await {
            error!(error = %e, "failed to stop postgres");
            // Last resort: an immediate stop must not be skipped when safety depends on it.
            let _ = self
                .pg
                .stop(StopMode::Immediate, self.retry_timeout())
                .await;
        }
        self.role_after_stop = Some(Role::Demoted);
        self.hooks.callback(CallbackAction::OnStop, Role::Demoted);
    }

    /// Opens the watchdog per mode before becoming primary. `false` when leadership must be
    /// refused (required mode and unusable).
    fn watchdog_activate(&mut self) -> bool {
        let mode = self.cfg.watchdog.mode;
        if mode == WatchdogMode::Off || self.wd().is_open() {
            return true;
        }
        let ttl = self.config.ttl() as i64;
        let margin = self.cfg.watchdog.safety_margin;
        // Timeout = ttl − safety_margin (ttl/2 when −1): the host resets before (or as) the
        // lease expires if the loop stops petting it.
        let secs = if margin == -1 { ttl / 2 } else { ttl - margin };
        let supported = secs >= self.config.loop_wait() as i64 && secs > 0;
        let r = if supported {
            self.wd()
                .open(Duration::from_secs(secs as u64))
                .map_err(|e| e.to_string())
        } else {
            Err(format!("watchdog timeout {secs}s shorter than loop_wait"))
        };
        match r {
            Ok(()) => {
                self.watchdog_usable = true;
                self.conditions.clear(Condition::WatchdogUnusable);
                self.conditions.clear(Condition::WatchdogRequiredUnusable);
                true
            }
            // Tried again every cycle (a device can appear, e.g. a module loaded late), but
            // logged once per episode.
            Err(e) => {
                self.watchdog_usable = false;
                if mode == WatchdogMode::Required {
                    self.conditions
                        .raise(Condition::WatchdogRequiredUnusable, &e);
                    false
                } else {
                    self.conditions.raise(Condition::WatchdogUnusable, &e);
                    true
                }
            }
        }
    }

    fn watchdog_close(&mut self) {
        let mut wd = self.wd();
        if wd.is_open() {
            wd.close();
        }
    }

    // ------------------------------------------------------------------ long actions

    fn spawn_action(
        &mut self,
        kind: ActionKind,
        reply: Option<oneshot::Sender<CommandReply>>,
        fut: impl std::future::Future<Output = ActionResult> + Send + 'static,
    ) {
        let cancel = CancellationToken::new();
        let c = cancel.clone();
        let done = self.action_done.clone();
        let span = info_span!("ha_action", action = kind.as_str(), member = %self.me);
        let handle = tokio::spawn(
            async move {
                let r = tokio::select! {
                    _ = c.cancelled() => Err("cancelled".to_string()),
                    r = fut => r,
                };
                debug!(ok = r.is_ok(), "action task ended");
                // Only a success cuts the nap short (its follow-up, e.g. taking the lock after a
                // bootstrap, should not wait): a failure is retried on the normal cadence, or an
                // action that fails at once (pg_rewind with the source unreachable) would be
                // re-run in a hot loop.
                if r.is_ok() {
                    done.notify_one();
                }
                r
            }
            .instrument(span),
        );
        self.action = Some(RunningAction {
            kind,
            started_at: Instant::now(),
            cancel,
            handle,
            reply,
            rewind_checked: false,
            rejoin_mark: None,
        });
    }

    /// Collects a finished action's outcome for the next decision.
    async fn reap_action(&mut self) {
        let finished = self.action.as_ref().is_some_and(|a| a.handle.is_finished());
        if !finished {
            return;
        }
        let a = self.action.take().expect("checked");
        let r = match a.handle.await {
            Ok(r) => r,
            Err(e) => Err(format!("task failed: {e}")),
        };
        match &r {
            Ok(()) => info!(action = a.kind.as_str(), "action finished"),
            // A failing bootstrap is retried by the next race; without its cause at error
            // level (and in the status) a cluster that cannot bootstrap loops silently.
            Err(e) if a.kind == ActionKind::Bootstrap => {
                error!(error = %e, "bootstrap failed")
            }
            Err(e) => warn!(action = a.kind.as_str(), error = %e, "action failed"),
        }
        if a.kind == ActionKind::Bootstrap {
            self.report.bootstrap_error = r.as_ref().err().cloned();
        }
        if (a.rewind_checked || matches!(a.kind, ActionKind::Clone | ActionKind::Reinitialize))
            && r.is_ok()
        {
            self.rewind_check_pending = false;
        }
        if r.is_ok()
            && let Some(mark) = a.rejoin_mark
        {
            self.rejoin_checked = Some(mark);
        }
        if let Some(reply) = a.reply {
            let msg = match (&r, a.kind) {
                (Ok(()), ActionKind::Restart) => CommandReply::new(200, "restarted successfully"),
                (Err(_), ActionKind::Restart) => CommandReply::new(503, "restart failed"),
                (Ok(()), k) => CommandReply::new(200, format!("{k} finished")),
                (Err(_), k) => CommandReply::new(503, format!("{k} failed")),
            };
            let _ = reply.send(msg);
        }
        self.finished = Some(Finished {
            kind: a.kind,
            ok: r.is_ok(),
        });
    }

    async fn cancel_action(&mut self) {
        if let Some(a) = self.action.take() {
            a.cancel.cancel();
            let _ = a.handle.await;
            if let Some(reply) = a.reply {
                let _ = reply.send(CommandReply::new(503, format!("{} cancelled", a.kind)));
            }
        }
    }

    fn spawn_bootstrap(&mut self) {
        let pg = self.pg.clone();
        let timeout = Duration::from_secs(self.config.primary_start_timeout().max(60));
        self.spawn_action(ActionKind::Bootstrap, None, async move {
            pg.initdb().await.map_err(|e| e.to_string())?;
            pg.start(&StartAs::Primary, timeout)
                .await
                .map_err(|e| e.to_string())?;
            // (initdb's and pg_ctl's errors name themselves; a bare SQL error would not)
            pg.post_bootstrap()
                .await
                .map_err(|e| format!("post_bootstrap: {e}"))?;
            Ok(())
        });
    }

    /// Gives up a bootstrap: frees `initialize` for another node, stops and wipes the new
    /// cluster (it never had a leader, so no data is lost).
    async fn abort_bootstrap(&mut self) {
        let _ = self.bounded(self.dcs.delete_initialize()).await;
        self.stop_pg(StopMode::Immediate, false).await;
        if let Err(e) = self.pg.wipe_data_dir().await {
            error!(error = %e, "failed to wipe the data directory after a failed bootstrap");
        }
    }

    /// After a successful bootstrap task: watchdog, `initialize`, `config`, the lock.
    async fn finish_bootstrap(&mut self, i: &Inputs) -> bool {
        if !self.watchdog_activate() {
            return false;
        }
        let Some(sysid) = i.pg.sysid.clone() else {
            error!("bootstrapped cluster has no system identifier");
            return false;
        };
        if let Err(e) = self.bounded(self.dcs.set_initialize(&sysid)).await {
            warn!(error = %e, "failed to publish initialize");
            return false;
        }
        if i.cluster.as_ref().is_some_and(|v| v.config.is_none()) {
            let c = DynamicConfig(self.cfg.bootstrap.dcs.clone());
            let _ = self.bounded(self.dcs.set_config(&c, None)).await;
        }
        let sent = Instant::now();
        let me = self.me.clone();
        let ttl = self.ttl();
        let dcs = self.dcs.clone();
        if let Err(e) = self
            .bounded(async {
                dcs.ensure_lease(ttl).await?;
                dcs.take_leader(&me).await
            })
            .await
        {
            warn!(error = %e, "failed to take the leader key after bootstrap");
            return false;
        }
        self.held_lock = true;
        self.lease_ok_sent = Some(sent);
        if self.config.synchronous_mode() && self.config.synchronous_mode_strict() {
            let _ = self.pg.set_synchronous_standby_names("*").await;
        }
        self.hooks.callback(CallbackAction::OnStart, Role::Primary);
        true
    }

    fn spawn_clone(
        &mut self,
        v: &ClusterView,
        source: &MemberName,
        kind: ActionKind,
        reply: Option<oneshot::Sender<CommandReply>>,
    ) {
        let Some(from) = upstream_of(v, source) else {
            warn!(%source, "clone source has no usable conn_url");
            return;
        };
        let follow = v.leader_name().and_then(|l| upstream_of(v, l));
        let pg = self.pg.clone();
        let hooks = self.hooks.clone();
        self.spawn_action(kind, reply, async move {
            if kind == ActionKind::Reinitialize {
                let _ = pg.stop(StopMode::Immediate, Duration::from_secs(30)).await;
                pg.wipe_data_dir().await.map_err(|e| e.to_string())?;
            }
            pg.basebackup(&from).await.map_err(|e| e.to_string())?;
            pg.start(
                &StartAs::Replica { upstream: follow },
                Duration::from_secs(60),
            )
            .await
            .map_err(|e| e.to_string())?;
            hooks.callback(CallbackAction::OnStart, Role::Replica);
            Ok(())
        });
    }

    fn spawn_start(
        &mut self,
        kind: ActionKind,
        start_as: StartAs,
        rewind_from: Option<Upstream>,
        timeout: Duration,
    ) {
        let pg = self.pg.clone();
        let hooks = self.hooks.clone();
        let rewind_allowed = self
            .config
            .use_pg_rewind()
            .unwrap_or(self.cfg.postgresql.use_pg_rewind);
        let role = if start_as == StartAs::Primary {
            Role::Primary
        } else {
            Role::Replica
        };
        let rewind_checked = rewind_from.is_some();
        // Patroni semantics: a node coming back as a replica after it was demoted changed
        // role, so it fires on_role_change (and not on_start); a plain (re)start fires on_start.
        let callback = if role == Role::Replica && self.role_after_stop == Some(Role::Demoted) {
            CallbackAction::OnRoleChange
        } else {
            CallbackAction::OnStart
        };
        self.role_after_stop = None;
        self.spawn_action(kind, None, async move {
            if let Some(leader) = rewind_from {
                // The check needs a stopped cluster (we may be a running replica without an
                // upstream); stopping a stopped server is a no-op.
                pg.stop(StopMode::Fast, Duration::from_secs(60))
                    .await
                    .map_err(|e| e.to_string())?;
                // Our WAL may contain changes the new leader never received (we were primary):
                // streaming would then fail or, worse, silently diverge.
                if pg.needs_rewind(&leader).await.map_err(|e| e.to_string())? {
                    if !rewind_allowed {
                        return Err(
                            "timeline diverged and use_pg_rewind is off: reinitialize required"
                                .into(),
                        );
                    }
                    tracing::info!("running pg_rewind from {}", leader.member);
                    pg.rewind(&leader).await.map_err(|e| e.to_string())?;
                    tracing::info!("pg_rewind from {} finished", leader.member);
                } else {
                    tracing::info!("no rewind required to follow {}", leader.member);
                }
            }
            pg.start(&start_as, timeout)
                .await
                .map_err(|e| e.to_string())?;
            hooks.callback(callback, role);
            Ok(())
        });
        if let Some(a) = self.action.as_mut() {
            a.rewind_checked = rewind_checked;
        }
    }

    fn spawn_switchover_demote(&mut self) {
        let pg = self.pg.clone();
        let hooks = self.hooks.clone();
        let stop_timeout = Duration::from_secs(self.config.primary_stop_timeout().max(60));
        self.spawn_action(ActionKind::SwitchoverDemote, None, async move {
            // Graceful demote, simplest safe form: checkpoint (shortens the shutdown), stop
            // fast while still holding the lock so no candidate promotes while we accept
            // writes; the loop releases the lock once the stop finished.
            if let Err(e) = pg.checkpoint().await {
                warn!(error = %e, "checkpoint before switchover failed");
            }
            hooks.before_stop().await;
            pg.stop(StopMode::Fast, stop_timeout)
                .await
                .map_err(|e| e.to_string())?;
            hooks.callback(CallbackAction::OnStop, Role::Demoted);
            Ok(())
        });
    }

    // ------------------------------------------------------------------ leader bookkeeping

    async fn leader_bookkeeping(&mut self, v: &ClusterView, i: &Inputs, pg: &PgStatus) {
        // initialize / config: the leader repairs missing cluster records.
        if let Some(sysid) = &pg.sysid
            && v.initialize.as_deref().is_none_or(|s| s.is_empty())
        {
            let _ = self.bounded(self.dcs.set_initialize(sysid)).await;
        }
        if v.config.is_none() {
            let c = DynamicConfig(self.cfg.bootstrap.dcs.clone());
            let _ = self.bounded(self.dcs.set_config(&c, None)).await;
        }
        // Replication slots: one per member, created the cycle the member appears so a new
        // replica never streams without WAL retention.
        let use_slots = self
            .config
            .use_slots()
            .unwrap_or(self.cfg.postgresql.use_slots);
        let mut wanted: Vec<String> = v
            .members
            .values()
            .filter(|m| m.name != self.me && !m.data.tag_bool("nostream"))
            .map(|m| m.name.slot_name())
            .collect();
        wanted.sort();
        if use_slots {
            let have: Vec<String> = {
                let mut h: Vec<String> = pg
                    .slots
                    .iter()
                    .filter(|s| s.physical)
                    .map(|s| s.name.clone())
                    .collect();
                h.sort();
                h
            };
            if have != wanted || self.last_slots_wanted.as_ref() != Some(&wanted) {
                match self.pg.sync_slots(&wanted, &[]).await {
                    Ok(()) => self.last_slots_wanted = Some(wanted.clone()),
                    Err(e) => warn!(error = %e, "failed to sync replication slots"),
                }
            }
        }
        // status: optime and slot positions, written only when changed.
        let optime = pg.wal_position().0;
        let mut slots: BTreeMap<String, u64> = pg
            .slots
            .iter()
            .filter_map(|s| s.restart_lsn.map(|l| (s.name.clone(), l.0)))
            .collect();
        slots.insert(self.me.slot_name(), optime);
        // Our timeline, when the history we wrote cannot show it (its last line's parent is
        // not our timeline − 1: the promotion skipped numbers other nodes had used).
        let timeline = pg.timeline.map(|t| t.0).filter(|tl| {
            self.history_written
                .is_some_and(|(t, parent, _)| t == *tl && parent + 1 != *tl)
        });
        let status = Status {
            optime,
            slots,
            retain_slots: wanted,
            timeline,
        };
        if status != v.status {
            let _ = self.bounded(self.dcs.set_status(&status)).await;
        }
        // history after a promotion: the timeline history file, 5-field lines.
        self.update_history(v, pg).await;
        // synchronous replication.
        self.apply_sync_plan(v, i).await;
    }

    async fn update_history(&mut self, v: &ClusterView, pg: &PgStatus) {
        let Some(Timeline(tl)) = pg.timeline else {
            return;
        };
        if tl <= 1 {
            return;
        }
        // Current when the last line leads to our timeline: directly, or (a promotion that
        // skipped numbers) exactly as we last wrote it for this timeline.
        let last_ok = v.history.last().is_some_and(|h| {
            h.new_leader.is_some()
                && h.timestamp.is_some()
                && (h.parent_timeline + 1 == tl
                    || self.history_written == Some((tl, h.parent_timeline, h.switchpoint)))
        });
        if last_ok {
            return;
        }
        let Ok(mut lines) = self.pg.timeline_history().await else {
            return;
        };
        let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false);
        let n = lines.len();
        for (idx, l) in lines.iter_mut().enumerate() {
            // Keep timestamps/leaders the DCS copy already had for older lines.
            if let Some(old) = v
                .history
                .iter()
                .find(|h| h.parent_timeline == l.parent_timeline)
            {
                l.timestamp = l.timestamp.clone().or(old.timestamp.clone());
                l.new_leader = l.new_leader.clone().or(old.new_leader.clone());
            }
            if idx + 1 == n {
                l.timestamp.get_or_insert(now.clone());
                l.new_leader.get_or_insert(self.me.to_string());
            }
        }
        if let Some(last) = lines.last() {
            let mark = (tl, last.parent_timeline, last.switchpoint);
            if self.bounded(self.dcs.set_history(&lines)).await.is_ok() {
                self.history_written = Some(mark);
            }
        }
    }

    /// Applies the [`plan_sync`] steps in their safe order.
    async fn apply_sync_plan(&mut self, v: &ClusterView, i: &Inputs) {
        let plan = plan_sync(i, v);
        let mut rev = v.sync.as_ref().map(|s| s.1);
        if plan.disable {
            if let Some(ssn) = &plan.ssn {
                let _ = self.pg.set_synchronous_standby_names(ssn).await;
            }
            let _ = self.bounded(self.dcs.set_sync(None, rev)).await;
            return;
        }
        let state = |names: &[String]| SyncState {
            leader: Some(self.me.to_string()),
            quorum: 0,
            sync_standby: if names.is_empty() {
                None
            } else {
                Some(names.join(","))
            },
        };
        if let Some(shrunk) = &plan.shrink {
            // Remove from /sync first, then from PostgreSQL.
            match self
                .bounded(self.dcs.set_sync(Some(&state(shrunk)), rev))
                .await
            {
                Ok(true) => {
                    if let Ok(nv) = self.bounded(self.dcs.load()).await {
                        rev = nv.sync.as_ref().map(|s| s.1);
                    }
                }
                _ => return,
            }
        }
        if let Some(ssn) = &plan.ssn
            && let Err(e) = self.pg.set_synchronous_standby_names(ssn).await
        {
            warn!(error = %e, "failed to set synchronous_standby_names");
            return;
        }
        if let Some(publish) = &plan.publish {
            let _ = self
                .bounded(self.dcs.set_sync(Some(&state(publish)), rev))
                .await;
        }
    }

    /// Hands the DCS config to PostgreSQL and reloads it when its files changed. `rev` is the
    /// `config` key's mod revision: it becomes `pgherd.dcs_config_revision` once that content is
    /// in force (files written and, when running, the reload confirmed). Returns whether
    /// PostgreSQL was reloaded, i.e. whether the caller must observe it again before
    /// publishing.
    async fn apply_dynamic_config(&mut self, pg: &PgStatus, rev: Option<i64>) -> bool {
        // Also with an empty data directory: the controller records the config and writes it
        // into the files that initdb / basebackup create before the first start.
        let json = self.config.to_json();
        if self.applied_config.as_deref() == Some(json.as_str()) {
            // Same content under a new revision (a rewrite with equal content): already in
            // force.
            self.report.dcs_config_revision = rev.or(self.report.dcs_config_revision);
            return false;
        }
        if self.refused_config.as_deref() == Some(json.as_str()) {
            return false;
        }
        match self.pg.apply_dynamic_config(&self.config).await {
            Ok(needs_reload) => {
                let mut reloaded = false;
                if (needs_reload || self.reload_owed.is_some()) && pg.running {
                    if let Err(e) = self.pg.reload().await {
                        // Not in force: retried next cycle (the files are already written,
                        // so the retry reloads unconditionally).
                        warn!(error = %e, "failed to reload postgres after a config change");
                        self.reload_owed.get_or_insert(false);
                        self.applied_config = None;
                        return false;
                    }
                    if self.reload_owed.take() == Some(true) {
                        self.report.config_error = None;
                    }
                    reloaded = true;
                    self.hooks
                        .callback(CallbackAction::OnReload, self.role_of(pg));
                } else if !pg.running && self.reload_owed.take() == Some(true) {
                    // Stopped: its next start reads the files, which already hold the config.
                    self.report.config_error = None;
                }
                self.applied_config = Some(json);
                self.refused_config = None;
                self.report.dcs_config_error = None;
                self.report.dcs_config_revision = rev;
                reloaded
            }
            Err(e @ PgError::HbaRejected(_)) => {
                error!(error = %e, "DCS config refused: PostgreSQL rejects its pg_hba");
                self.refused_config = Some(json);
                self.report.dcs_config_error = Some(e.to_string());
                false
            }
            Err(e) => {
                warn!(error = %e, "failed to apply the dynamic configuration");
                false
            }
        }
    }

    /// `POST /reload` / SIGHUP: re-reads the config file and, unless something in it cannot
    /// change in a running agent or PostgreSQL refuses it, puts all of it in force — in
    /// PostgreSQL's files (reloaded, never restarted), the hooks, the DCS endpoints, the REST
    /// credentials (through the subscriber), and the member key (tags, connect addresses) on
    /// the next cycle. A refusal keeps the old config whole and says why in
    /// `pgherd.config_error`.
    async fn reload_config(&mut self) {
        // The DCS config is re-applied whatever happens to the file (Patroni's reload does both).
        self.applied_config = None;
        self.refused_config = None;
        let Some(path) = self.config_path.clone() else {
            return;
        };
        let loaded = match AgentConfig::load_file(&path) {
            Ok(l) => l,
            Err(e) => return self.refuse_reload(e.to_string()),
        };
        let mut new = loaded.config;
        let restart = crate::config::restart_required(&self.cfg, &new);
        if !restart.is_empty() {
            return self.refuse_reload(format!("restart required: {}", restart.join(", ")));
        }
        // `bootstrap.*` only shapes the first bootstrap: once this node has data, a changed
        // bootstrap section must change nothing (e.g. a removed `bootstrap.pg_hba` must not
        // make the controller start managing pg_hba.conf), so the old one stays in force.
        let bootstrapped = self.last_pg.data_dir_initialized;
        let bootstrap_ignored = bootstrapped
            && serde_json::to_value(&new.bootstrap).ok()
                != serde_json::to_value(&self.cfg.bootstrap).ok();
        if bootstrapped {
            new.bootstrap = self.cfg.bootstrap.clone();
        }
        // PostgreSQL first: it is the only dependent that can refuse (a rejected pg_hba), and
        // a refusal must leave everything on the old config.
        let needs_reload = match self.pg.set_local_config(&new).await {
            Ok(r) => r,
            Err(e) => return self.refuse_reload(e.to_string()),
        };
        if let Err(e) = self.dcs.set_endpoints(new.etcd3.endpoints()) {
            warn!(error = %e, "reload: cannot switch etcd endpoints");
        }
        self.hooks.reconfigure(&new);
        if let Some(f) = &self.config_subscriber {
            f(&new);
        }
        let mut changed = crate::config::changed_settings(&self.cfg, &new);
        if bootstrap_ignored {
            changed.push("bootstrap (ignored: this node is already bootstrapped)".into());
        }
        self.cfg = new;
        self.report.config_sha256 = Some(loaded.sha256);
        self.report.config_error = None;
        let mut pg_note = "";
        if needs_reload {
            match self.pg.reload().await {
                Ok(()) => {
                    pg_note = ", PostgreSQL reloaded";
                    self.hooks
                        .callback(CallbackAction::OnReload, self.role_of(&self.last_pg));
                }
                Err(e) => {
                    // The files hold the new config but the server did not take it: say so
                    // rather than report a clean reload; the next cycle retries the reload.
                    let msg =
                        format!("the new config is written but PostgreSQL did not reload: {e}");
                    error!("reload: {msg}");
                    self.report.config_error = Some(msg);
                    self.reload_owed = Some(true);
                }
            }
        }
        let what = if changed.is_empty() {
            "nothing changed".to_string()
        } else {
            changed.join(", ")
        };
        info!("reload: new configuration in force ({what}){pg_note}");
    }

    fn refuse_reload(&mut self, why: String) {
        warn!("reload refused, keeping the previous configuration: {why}");
        self.report.config_error = Some(why);
    }

    // ------------------------------------------------------------------ commands

    /// Handles an API command. Returns `true` when a cycle should run now.
    async fn handle_command(&mut self, c: Command) -> bool {
        match c {
            Command::Wakeup => true,
            Command::Reload { reply } => {
                self.reload_config().await;
                let r = match &self.report.config_error {
                    Some(e) => CommandReply::new(409, format!("reload refused: {e}")),
                    None => CommandReply::new(202, "reload scheduled"),
                };
                let _ = reply.send(r);
                true
            }
            Command::CancelScheduledRestart { reply } => {
                let r = if self.scheduled_restart.take().is_some() {
                    CommandReply::new(200, "scheduled restart deleted")
                } else {
                    CommandReply::new(404, "no restarts are scheduled")
                };
                let _ = reply.send(r);
                false
            }
            Command::Restart { req, reply } => {
                let paused = self.config.pause();
                if let Some(s) = &req.schedule {
                    if paused {
                        let _ = reply.send(CommandReply::new(
                            500,
                            "Can't schedule restart in the paused state",
                        ));
                        return false;
                    }
                    if self.scheduled_restart.is_some() {
                        let _ = reply.send(CommandReply::new(
                            409,
                            "Another restart is already scheduled",
                        ));
                        return false;
                    }
                    match DateTime::parse_from_rfc3339(s) {
                        Ok(t) => {
                            self.scheduled_restart = Some((t.with_timezone(&Utc), req));
                            let _ = reply.send(CommandReply::new(202, "Restart scheduled"));
                        }
                        Err(_) => {
                            let _ = reply.send(CommandReply::new(
                                422,
                                "Unable to parse scheduled timestamp",
                            ));
                        }
                    }
                    return false;
                }
                let pg = self.pg.observe().await;
                if let Some(a) = &self.action {
                    let _ = reply.send(CommandReply::new(
                        503,
                        format!("{} already in progress", a.kind),
                    ));
                    return false;
                }
                if !self.restart_conditions_ok(&req, &pg) {
                    let _ = reply.send(CommandReply::new(
                        503,
                        "restart conditions are not satisfied",
                    ));
                    return false;
                }
                self.spawn_restart(&req, Some(reply));
                false
            }
            Command::Reinitialize {
                force,
                from_leader,
                reply,
            } => {
                let view = self.last_view.clone();
                let Some(v) = view.filter(|v| v.leader.is_some()) else {
                    let _ = reply.send(CommandReply::new(
                        503,
                        "Cluster has no leader, can not reinitialize",
                    ));
                    return false;
                };
                if v.leader_name() == Some(&self.me) || self.held_lock {
                    let _ = reply.send(CommandReply::new(
                        503,
                        "I am the leader, can not reinitialize",
                    ));
                    return false;
                }
                if let Some(a) = &self.action {
                    if !force {
                        let _ = reply.send(CommandReply::new(
                            503,
                            format!("{} already in progress", a.kind),
                        ));
                        return false;
                    }
                    self.cancel_action().await;
                }
                let dummy = Inputs {
                    me: self.me.clone(),
                    cluster: Some((*v).clone()),
                    renewal: Renewal::NotAttempted,
                    last_renewal_sent: None,
                    pg: PgStatus::default(),
                    local: LocalFacts {
                        tags: self.tags(),
                        ..Default::default()
                    },
                    peers: Vec::new(),
                    config: self.config.clone(),
                    now: Instant::now(),
                    wall_now: Utc::now(),
                };
                let source = if from_leader {
                    v.leader_name().cloned()
                } else {
                    super::candidates::clone_source(&dummy, &v).map(|(n, _)| n)
                };
                match source {
                    Some(s) => {
                        self.spawn_clone(&v, &s, ActionKind::Reinitialize, None);
                        let _ = reply.send(CommandReply::new(200, "reinitialize started"));
                    }
                    None => {
                        let _ = reply.send(CommandReply::new(
                            503,
                            "Cluster has no leader, can not reinitialize",
                        ));
                    }
                }
                false
            }
        }
    }

    fn restart_conditions_ok(&self, req: &RestartRequest, pg: &PgStatus) -> bool {
        if let Some(role) = &req.role {
            let mine = self.role_of(pg).as_str();
            let matches = role == mine || (role == "master" && mine == "primary");
            if !matches {
                return false;
            }
        }
        if req.restart_pending == Some(true) && pg.pending_restart.is_empty() {
            return false;
        }
        if let (Some(want), Some(have)) = (&req.postgres_version, pg.server_version)
            && let Some(w) = parse_pg_version(want)
            && have >= w
        {
            return false;
        }
        true
    }

    fn spawn_restart(
        &mut self,
        req: &RestartRequest,
        reply: Option<oneshot::Sender<CommandReply>>,
    ) {
        let pg = self.pg.clone();
        let hooks = self.hooks.clone();
        let start_as = if self.held_lock {
            StartAs::Primary
        } else {
            let up = self
                .last_view
                .as_ref()
                .and_then(|v| v.leader_name().and_then(|l| upstream_of(v, l)));
            StartAs::Replica { upstream: up }
        };
        let role = if self.held_lock {
            Role::Primary
        } else {
            Role::Replica
        };
        let timeout = Duration::from_secs_f64(
            req.timeout
                .unwrap_or(self.config.primary_start_timeout().max(10) as f64),
        );
        self.spawn_action(ActionKind::Restart, reply, async move {
            hooks.before_stop().await;
            pg.stop(StopMode::Fast, Duration::from_secs(60))
                .await
                .map_err(|e| e.to_string())?;
            pg.start(&start_as, timeout)
                .await
                .map_err(|e| e.to_string())?;
            hooks.callback(CallbackAction::OnRestart, role);
            Ok(())
        });
    }

    async fn check_scheduled_restart(&mut self, pg: &PgStatus) {
        let due = self
            .scheduled_restart
            .as_ref()
            .is_some_and(|(t, _)| *t <= Utc::now());
        if !due || self.action.is_some() {
            return;
        }
        let (_, req) = self.scheduled_restart.take().expect("checked");
        if self.restart_conditions_ok(&req, pg) {
            self.spawn_restart(&req, None);
        } else {
            info!("scheduled restart skipped: restart conditions are not satisfied");
        }
    }

    // ------------------------------------------------------------------ member key / status

    fn role_of(&self, pg: &PgStatus) -> Role {
        if self
            .action
            .as_ref()
            .is_some_and(|a| a.kind == ActionKind::Promote)
        {
            return Role::Promoted;
        }
        if !pg.data_dir_initialized {
            return Role::Uninitialized;
        }
        if pg.is_running_primary() {
            return Role::Primary;
        }
        if !pg.running
            && let Some(r) = self.role_after_stop
        {
            return r;
        }
        Role::Replica
    }

    fn state_of(&self, pg: &PgStatus) -> PgState {
        match self.action.as_ref().map(|a| a.kind) {
            Some(ActionKind::Bootstrap) if !pg.running => PgState::InitializingNewCluster,
            Some(ActionKind::Clone | ActionKind::Reinitialize) => PgState::CreatingReplica,
            Some(ActionKind::StartPrimary | ActionKind::StartReplica) if !pg.running => {
                PgState::Starting
            }
            Some(ActionKind::Restart) => PgState::Restarting,
            Some(ActionKind::SwitchoverDemote) if pg.running => PgState::Stopping,
            _ if pg.running => PgState::Running,
            _ if matches!(pg.control_state, Some(ControlState::InProduction)) => PgState::Crashed,
            _ => PgState::Stopped,
        }
    }

    fn pending_reason(pg: &PgStatus) -> Option<Value> {
        if pg.pending_restart.is_empty() {
            return None;
        }
        let mut m = Map::new();
        for (k, (old, new)) in &pg.pending_restart {
            let mut e = Map::new();
            e.insert("old_value".into(), Value::from(old.clone()));
            e.insert("new_value".into(), Value::from(new.clone()));
            m.insert(k.clone(), Value::Object(e));
        }
        Some(Value::Object(m))
    }

    fn member_data(&self, pg: &PgStatus, paused: bool) -> MemberData {
        let state = self.state_of(pg);
        let role = self.role_of(pg);
        let running = matches!(
            state,
            PgState::Running | PgState::Restarting | PgState::Starting
        );
        let replica = pg.running && pg.in_recovery == Some(true);
        MemberData {
            conn_url: self.cfg.conn_url(),
            api_url: self.cfg.api_url(),
            state: state.as_str().to_string(),
            role: if role == Role::Promoted {
                "primary".into()
            } else {
                role.as_str().to_string()
            },
            version: PATRONI_COMPAT_VERSION.to_string(),
            xlog_location: (running && pg.running).then(|| pg.wal_position().0),
            replay_lsn: if replica {
                pg.replay_lsn.map(|l| l.0)
            } else {
                None
            },
            receive_lsn: if replica {
                pg.receive_lsn.map(|l| l.0)
            } else {
                None
            },
            replication_state: if replica {
                pg.replication_state.clone()
            } else {
                None
            },
            timeline: pg.timeline.map(|t| t.0),
            tags: self.cfg.tags.clone(),
            pending_restart: (!pg.pending_restart.is_empty()).then_some(true),
            pending_restart_reason: Self::pending_reason(pg),
            scheduled_restart: self
                .scheduled_restart
                .as_ref()
                .map(|(t, _)| serde_json::json!({"schedule": t.to_rfc3339()})),
            pause: paused.then_some(true),
            checkpoint_after_promote: None,
            extra: Map::new(),
        }
    }

    async fn touch_member(&mut self, pg: &PgStatus, paused: bool) {
        let data = self.member_data(pg, paused);
        if let Err(e) = self.bounded(self.dcs.touch_member(&self.me, &data)).await {
            debug!(error = %e, "failed to update the member key");
        } else {
            self.last_member = Some(data);
        }
    }

    fn publish(&mut self, dcs_ok: bool, paused: bool) {
        let pg = self.last_pg.clone();
        let leader_until = if self.held_lock {
            self.lease_ok_sent.map(|t| (t + self.ttl()).into_std())
        } else {
            None
        };
        let watchdog_failed =
            self.cfg.watchdog.mode == WatchdogMode::Required && !self.watchdog_usable;
        let s = AgentStatus {
            scope: self.cfg.scope.clone(),
            name: self.cfg.name.clone(),
            role: self.role_of(&pg),
            state: self.state_of(&pg),
            cluster: self.last_view.clone(),
            dcs_ok,
            dcs_last_seen: self.dcs_last_seen,
            leader_until,
            paused,
            tags: self.cfg.tags.clone(),
            pending_restart: !pg.pending_restart.is_empty(),
            pending_restart_reason: Self::pending_reason(&pg),
            scheduled_restart: self
                .scheduled_restart
                .as_ref()
                .map(|(t, _)| serde_json::json!({"schedule": t.to_rfc3339()})),
            watchdog_failed,
            last_decision: self.last_decision.clone(),
            action_in_progress: self.action.as_ref().map(|a| a.kind.as_str().to_string()),
            last_cycle: Instant::now().into_std(),
            ttl: self.config.ttl(),
            loop_wait: self.config.loop_wait(),
            updated_at: std::time::SystemTime::now(),
            pgherd: self.report.clone(),
            pg,
        };
        self.status_tx.send_replace(s);
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

/// `"15"`, `"15.4"`, `"9.6.24"` → server_version_num.
fn parse_pg_version(s: &str) -> Option<u32> {
    let parts: Vec<u32> = s
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [major] if *major >= 10 => Some(major * 10000),
        [major, minor] if *major >= 10 => Some(major * 10000 + minor),
        [major, minor] => Some(major * 10000 + minor * 100),
        [major, minor, patch] => Some(major * 10000 + minor * 100 + patch),
        _ => None,
    }
}
