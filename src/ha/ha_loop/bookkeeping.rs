//! What the leader keeps up to date each cycle (`initialize`, `config`, `status`, slots,
//! `history`, `sync`), the dynamic configuration pushed to PostgreSQL, and a reload of the
//! node config.

use super::*;

impl HaLoop {
    pub(super) async fn leader_bookkeeping(&mut self, v: &ClusterView, i: &Inputs, pg: &PgStatus) {
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
        // failsafe: see `leader_upkeep::failsafe_update`.
        if self.config.failsafe_mode()
            && let Some(want) =
                leader_upkeep::failsafe_update(v, &self.me, self.member_data(pg, false).api_url)
            && let Err(e) = self.bounded(self.dcs.set_failsafe(&want)).await
        {
            warn!(error = %e, "failed to write the failsafe key");
        }
        // Replication slots: see `leader_upkeep::wanted_slots`.
        let use_slots = self
            .config
            .use_slots()
            .unwrap_or(self.cfg.postgresql.use_slots);
        let wanted = leader_upkeep::wanted_slots(v, &self.me);
        if use_slots
            && leader_upkeep::slots_need_sync(pg, &wanted, self.last_slots_wanted.as_deref())
        {
            match self.pg.sync_slots(&wanted, &[]).await {
                Ok(()) => self.last_slots_wanted = Some(wanted.clone()),
                Err(e) => warn!(error = %e, "failed to sync replication slots"),
            }
        }
        // status: optime and slot positions, written only when changed.
        let status = leader_upkeep::leader_status(&self.me, pg, wanted, self.history_written);
        if status != v.status {
            let _ = self.bounded(self.dcs.set_status(&status)).await;
        }
        // history after a promotion: the timeline history file, 5-field lines.
        self.update_history(v, pg).await;
        // synchronous replication.
        self.apply_sync_plan(v, i).await;
    }

    /// Rewrites the DCS `history` when [`leader_upkeep::history_needs_update`] says so, from
    /// PostgreSQL's timeline history file merged by [`leader_upkeep::merge_history`].
    pub(super) async fn update_history(&mut self, v: &ClusterView, pg: &PgStatus) {
        if !leader_upkeep::history_needs_update(pg.timeline, &v.history, self.history_written) {
            return;
        }
        let Some(tl) = pg.timeline else {
            return;
        };
        let Ok(lines) = self.pg.timeline_history().await else {
            return;
        };
        let now = Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, false);
        let (lines, mark) = leader_upkeep::merge_history(lines, &v.history, tl, &self.me, &now);
        if let Some(mark) = mark
            && self.bounded(self.dcs.set_history(&lines)).await.is_ok()
        {
            self.history_written = Some(mark);
        }
    }

    /// Applies the [`plan_sync`] steps in their safe order.
    pub(super) async fn apply_sync_plan(&mut self, v: &ClusterView, i: &Inputs) {
        let plan = plan_sync(i, v);
        // The first plan of a leadership measured catch-up against our position then: keep
        // that point until SSN changes (a moving target would never be reached under load).
        self.sync_catchup_lsn.get_or_insert(i.pg.wal_position());
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
        if let Some(ssn) = &plan.ssn {
            if let Err(e) = self.pg.set_synchronous_standby_names(ssn).await {
                warn!(error = %e, "failed to set synchronous_standby_names");
                return;
            }
            // Read *after* the change: every commit acknowledged under the old setting is
            // below this point, so a standby that reaches it holds them all.
            let pos = self.pg.observe().await.wal_position();
            self.sync_catchup_lsn = Some(pos.max(i.pg.wal_position()));
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
    pub(super) async fn apply_dynamic_config(&mut self, pg: &PgStatus, rev: Option<i64>) -> bool {
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
    pub(super) async fn reload_config(&mut self) {
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

    pub(super) fn refuse_reload(&mut self, why: String) {
        warn!("reload refused, keeping the previous configuration: {why}");
        self.report.config_error = Some(why);
    }
}
