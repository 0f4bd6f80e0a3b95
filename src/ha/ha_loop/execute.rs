//! Carrying out a [`Decision`]: the short steps run inline (promote while holding the lock,
//! stop PostgreSQL, finish a bootstrap), the watchdog armed before leading and closed after.
//! Every branch that stops, demotes or promotes PostgreSQL says why next to it.

use super::*;

impl HaLoop {
    /// Carries out a decision. Returns the decision to report (two-phase decisions resolve to
    /// their outcome) and whether to run the next cycle at once.
    pub(super) async fn execute(&mut self, d: Decision, i: &Inputs) -> (Decision, bool) {
        let view = i.cluster.as_ref();
        match &d {
            Decision::DemoteDcsUnreachable
            | Decision::DemoteRenewalFailed
            | Decision::DemoteFailsafeRefused { .. } => {
                // Emergency: the lease may lapse STOP_RESERVE from now. No before_stop and no
                // fresh observation (either could eat the time reserved to stop): SIGQUIT
                // first, bookkeeping after.
                self.emergency_stop(&i.pg).await;
                if self.action.is_some() {
                    // A promotion or primary start in flight could have started the
                    // postmaster after the stop above: cancel it, then stop again.
                    self.cancel_action().await;
                    self.emergency_stop(&PgStatus::default()).await;
                }
                self.lose_lock(false).await;
            }
            Decision::DcsUnreachablePaused | Decision::DcsUnreachableSecondary => {}
            Decision::PausedRenewalFailed
            | Decision::PrimaryOnRenewedLease
            | Decision::FailsafeKeepPrimary
            | Decision::FailsafeLeaderAnnounced { .. } => {}
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
                let timeout = Duration::from_secs(
                    self.config
                        .primary_start_timeout()
                        .max(MIN_PRIMARY_START_SECS),
                );
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
                    REPLICA_START_TIMEOUT,
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
                    REPLICA_START_TIMEOUT,
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

    /// Promotion while holding the lock: watchdog, pre_promote, sync pre-promote, then the
    /// async `pg_ctl promote`.
    pub(super) async fn promote(&mut self, i: &Inputs) {
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
        let timeout = self.retry_timeout().max(MIN_PROMOTE_TIMEOUT);
        self.spawn_action(ActionKind::Promote, None, async move {
            pg.promote(used, &history, timeout)
                .await
                .map_err(|e| e.to_string())?;
            hooks.callback(CallbackAction::OnRoleChange, Role::Primary);
            // A checkpoint right after promotion lets ex-primaries pg_rewind from us. It runs
            // beside the action, not in it: the action's end is what makes this node report
            // itself primary (`/primary` 200, so HAProxy routes writes here), and PostgreSQL
            // accepts writes as soon as `pg_ctl promote` returned; waiting for the checkpoint
            // kept every switchover's writes out a checkpoint longer. Bounded by the pg
            // layer's own timeout; nothing waits for it.
            tokio::spawn(
                async move {
                    if let Err(e) = pg.checkpoint().await {
                        warn!(error = %e, "checkpoint after promote failed");
                    }
                }
                .instrument(tracing::info_span!("post-promote-checkpoint")),
            );
            Ok(())
        });
    }

    /// The demotion of a leader whose lease is running out: an immediate stop straight away,
    /// without observing PostgreSQL first (`pg` is the cycle's observation, used only for the
    /// on_stop callback). `Postgres::stop` is a no-op on a stopped server.
    async fn emergency_stop(&mut self, pg: &PgStatus) {
        if let Err(e) = self
            .pg
            .stop(StopMode::Immediate, self.retry_timeout())
            .await
        {
            error!(error = %e, "emergency stop of postgres failed");
        }
        if pg.running {
            self.role_after_stop = Some(Role::Demoted);
            self.hooks.callback(CallbackAction::OnStop, Role::Demoted);
        }
    }

    /// Stops PostgreSQL (bounded by retry_timeout for immediate stops) and fires on_stop.
    pub(super) async fn stop_pg(&mut self, mode: StopMode, run_before_stop: bool) {
        let observed = self.pg.observe().await;
        if !observed.running {
            return;
        }
        if run_before_stop {
            self.hooks.before_stop().await;
        }
        let timeout = match mode {
            StopMode::Immediate => self.retry_timeout(),
            _ => FAST_STOP_TIMEOUT,
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
    pub(super) fn watchdog_activate(&mut self) -> bool {
        let mode = self.cfg.watchdog.mode;
        if mode == WatchdogMode::Off || self.wd().is_open() {
            return true;
        }
        let secs = self.watchdog_timeout_secs();
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

    /// The watchdog's (or fence's) timeout: ttl − safety_margin (ttl/2 when −1), so the host
    /// resets (or PostgreSQL is fenced) before, or as, the lease expires if the loop stops
    /// petting it. May be ≤ 0 for a bad configuration; `watchdog_activate` refuses that.
    fn watchdog_timeout_secs(&self) -> i64 {
        let ttl = self.config.ttl() as i64;
        let margin = self.cfg.watchdog.safety_margin;
        if margin == -1 { ttl / 2 } else { ttl - margin }
    }

    /// The armed fence's (or watchdog's) timeout, counted from the send instant of the last
    /// successful renewal; `None` while nothing is armed. The renewal stops retrying before it.
    pub(super) fn fence_timeout(&self) -> Option<Duration> {
        if !self.wd().is_open() {
            return None;
        }
        u64::try_from(self.watchdog_timeout_secs())
            .ok()
            .map(Duration::from_secs)
    }

    pub(super) fn watchdog_close(&mut self) {
        let mut wd = self.wd();
        if wd.is_open() {
            wd.close();
        }
    }

    /// After a successful bootstrap task: watchdog, `initialize`, `config`, the lock.
    pub(super) async fn finish_bootstrap(&mut self, i: &Inputs) -> bool {
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
}
