//! What the loop tells the world: our member key (role, state, LSNs, tags) and the
//! [`AgentStatus`] the REST API serves.

use super::*;

impl HaLoop {
    pub(super) fn role_of(&self, pg: &PgStatus) -> Role {
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

    pub(super) fn state_of(&self, pg: &PgStatus) -> PgState {
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

    pub(super) fn pending_reason(pg: &PgStatus) -> Option<Value> {
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

    pub(super) fn member_data(&self, pg: &PgStatus, paused: bool) -> MemberData {
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

    pub(super) async fn touch_member(&mut self, pg: &PgStatus, paused: bool) {
        let data = self.member_data(pg, paused);
        if let Err(e) = self.bounded(self.dcs.touch_member(&self.me, &data)).await {
            debug!(error = %e, "failed to update the member key");
        } else {
            self.last_member = Some(data);
        }
    }

    pub(super) fn publish(&mut self, dcs_ok: bool, paused: bool) {
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
            failsafe_active: self.failsafe_active,
            pg,
        };
        self.status_tx.send_replace(s);
    }
}
