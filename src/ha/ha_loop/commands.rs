//! Commands from the REST API (`POST /restart`, `/reload`, `/reinitialize`, ...) and the
//! rules for when a requested or scheduled restart may run.

use super::*;

impl HaLoop {
    /// Handles an API command. Returns `true` when a cycle should run now.
    pub(super) async fn handle_command(&mut self, c: Command) -> bool {
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
                    crate::ha::candidates::clone_source(&dummy, &v).map(|(n, _)| n)
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

    /// [`restart::restart_conditions_ok`] on this node now.
    pub(super) fn restart_conditions_ok(&self, req: &RestartRequest, pg: &PgStatus) -> bool {
        restart::restart_conditions_ok(
            req,
            self.role_of(pg),
            !pg.pending_restart.is_empty(),
            pg.server_version,
        )
    }

    pub(super) async fn check_scheduled_restart(&mut self, pg: &PgStatus) {
        let at = self.scheduled_restart.as_ref().map(|(t, _)| *t);
        if !restart::scheduled_restart_due(at, Utc::now(), self.action.is_some()) {
            return;
        }
        let (_, req) = self.scheduled_restart.take().expect("checked");
        if self.restart_conditions_ok(&req, pg) {
            self.spawn_restart(&req, None);
        } else {
            info!("scheduled restart skipped: restart conditions are not satisfied");
        }
    }
}
