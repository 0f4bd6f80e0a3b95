//! Long actions (initdb, basebackup, start, restart, switchover demote): each runs in its own
//! named, cancellable task while the loop keeps cycling and renewing; one at a time.

use super::*;

impl HaLoop {
    pub(super) fn spawn_action(
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
    pub(super) async fn reap_action(&mut self) {
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
        // A replica that cannot clone (no pg_hba entry on the leader, a full disk) retries for
        // ever; the cause in the status lets `pgherd apply` say why it is stuck.
        if matches!(a.kind, ActionKind::Clone | ActionKind::Reinitialize) {
            self.report.clone_error = r.as_ref().err().cloned();
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

    pub(super) async fn cancel_action(&mut self) {
        if let Some(a) = self.action.take() {
            a.cancel.cancel();
            let _ = a.handle.await;
            if let Some(reply) = a.reply {
                let _ = reply.send(CommandReply::new(503, format!("{} cancelled", a.kind)));
            }
        }
    }

    pub(super) fn spawn_bootstrap(&mut self) {
        let pg = self.pg.clone();
        let timeout = Duration::from_secs(
            self.config
                .primary_start_timeout()
                .max(MIN_BOOTSTRAP_START_SECS),
        );
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
    pub(super) async fn abort_bootstrap(&mut self) {
        let _ = self.bounded(self.dcs.delete_initialize()).await;
        self.stop_pg(StopMode::Immediate, false).await;
        if let Err(e) = self.pg.wipe_data_dir().await {
            error!(error = %e, "failed to wipe the data directory after a failed bootstrap");
        }
    }

    pub(super) fn spawn_clone(
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
                let _ = pg.stop(StopMode::Immediate, IMMEDIATE_STOP_TIMEOUT).await;
                pg.wipe_data_dir().await.map_err(|e| e.to_string())?;
            }
            pg.basebackup(&from).await.map_err(|e| e.to_string())?;
            pg.start(
                &StartAs::Replica { upstream: follow },
                REPLICA_START_TIMEOUT,
            )
            .await
            .map_err(|e| e.to_string())?;
            hooks.callback(CallbackAction::OnStart, Role::Replica);
            Ok(())
        });
    }

    pub(super) fn spawn_start(
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
                pg.stop(StopMode::Fast, FAST_STOP_TIMEOUT)
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

    pub(super) fn spawn_switchover_demote(&mut self) {
        let pg = self.pg.clone();
        let hooks = self.hooks.clone();
        let stop_timeout = Duration::from_secs(
            self.config
                .primary_stop_timeout()
                .max(MIN_SWITCHOVER_STOP_SECS),
        );
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

    pub(super) fn spawn_restart(
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
            req.timeout.unwrap_or(
                self.config
                    .primary_start_timeout()
                    .max(MIN_PRIMARY_START_SECS) as f64,
            ),
        );
        self.spawn_action(ActionKind::Restart, reply, async move {
            hooks.before_stop().await;
            pg.stop(StopMode::Fast, FAST_STOP_TIMEOUT)
                .await
                .map_err(|e| e.to_string())?;
            pg.start(&start_as, timeout)
                .await
                .map_err(|e| e.to_string())?;
            hooks.callback(CallbackAction::OnRestart, role);
            Ok(())
        });
    }
}
