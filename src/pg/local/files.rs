//! The files the controller generates in and next to the data directory: postgresql.conf
//! (with the standby settings, see [`super::conf`] for the text), pg_hba.conf (checked against
//! the running server before it is taken over), the signal files and the pgpass file. Each is
//! replaced atomically and owned by the PostgreSQL user, mode 0600; one lock serialises the
//! writers.

use std::collections::BTreeMap;
use std::io::Write;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use super::LocalPostgres;
use crate::config::AgentConfig;
use crate::dcs::DynamicConfig;
use crate::pg::conf::{self, StandbySettings};
use crate::pg::{PgError, Upstream};

/// Replaces `path` atomically with `content` when it differs: a temp file in the same
/// directory (mode 0600, owned by `owner` when given), fsynced, renamed over the target, then
/// the directory fsynced. A reader (PostgreSQL on SIGHUP) sees the old or the new file, never
/// a partial one. `true` when the content changed.
fn write_if_changed(
    path: &Path,
    content: &[u8],
    owner: Option<(u32, u32)>,
) -> std::io::Result<bool> {
    if std::fs::read(path).is_ok_and(|old| old == content) {
        return Ok(false);
    }
    let tmp = path.with_extension("pgherd-tmp");
    {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(0o600)
            .open(&tmp)?;
        f.set_permissions(std::fs::Permissions::from_mode(0o600))?;
        f.write_all(content)?;
        f.sync_all()?;
    }
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::lchown(&tmp, Some(uid), Some(gid))?;
    }
    std::fs::rename(&tmp, path)?;
    if let Some(dir) = path.parent()
        && let Ok(d) = std::fs::File::open(dir)
    {
        let _ = d.sync_all();
    }
    Ok(true)
}

impl LocalPostgres {
    pub(super) fn chown(&self, path: &Path) -> std::io::Result<()> {
        if let Some((uid, gid)) = self.run_as {
            std::os::unix::fs::lchown(path, Some(uid), Some(gid))?;
        }
        Ok(())
    }

    /// Writes a file owned by the PostgreSQL user, mode 0600; `true` when the content changed.
    fn write_owned(&self, path: &Path, content: &str) -> Result<bool, PgError> {
        self.write_owned_bytes_changed(path, content.as_bytes())
    }

    fn write_owned_bytes_changed(&self, path: &Path, content: &[u8]) -> Result<bool, PgError> {
        Ok(write_if_changed(path, content, self.run_as)?)
    }

    /// Puts `content` back into `path` (atomically, see [`write_if_changed`]).
    fn write_owned_bytes(&self, path: &Path, content: &[u8]) -> Result<(), PgError> {
        self.write_owned_bytes_changed(path, content).map(|_| ())
    }

    fn passfile_str(&self) -> String {
        self.pgpass.to_string_lossy().into_owned()
    }

    /// The pgpass file: replication, rewind and superuser credentials, owned by the PostgreSQL
    /// user (the walreceiver, pg_basebackup and pg_rewind read it), mode 0600.
    pub(super) fn write_pgpass(&self) -> Result<(), PgError> {
        let cfg = self.cfg();
        let a = &cfg.postgresql.authentication;
        let mut entries = vec![(
            a.replication.username.as_str(),
            a.replication.password.as_str(),
        )];
        if let Some(r) = &a.rewind {
            entries.push((r.username.as_str(), r.password.as_str()));
        }
        entries.push((a.superuser.username.as_str(), a.superuser.password.as_str()));
        self.write_owned(&self.pgpass, &conf::render_pgpass(&entries))?;
        Ok(())
    }

    pub(super) fn standby_settings(&self, upstream: Option<&Upstream>) -> StandbySettings {
        let cfg = self.cfg();
        let repl = &cfg.postgresql.authentication.replication.username;
        StandbySettings {
            primary_conninfo: upstream
                .map(|u| conf::primary_conninfo(u, repl, self.name.as_str(), &self.passfile_str())),
            primary_slot_name: (upstream.is_some() && self.use_slots())
                .then(|| self.name.slot_name()),
        }
    }

    /// pg_hba lines we manage: local config, else DCS, else built-in defaults. `None` when
    /// only `bootstrap.pg_hba` is set: Patroni then appends those lines to initdb's file at
    /// bootstrap and leaves the file alone afterwards (initdb's `local` lines, which the
    /// superuser's socket connection needs, stay), and so do we.
    fn hba_lines(cfg: &AgentConfig, dynamic: &DynamicConfig) -> Option<Vec<String>> {
        if !cfg.postgresql.pg_hba.is_empty() {
            return Some(cfg.postgresql.pg_hba.clone());
        }
        if let Some(l) = dynamic.pg_hba().filter(|l| !l.is_empty()) {
            return Some(l);
        }
        if !cfg.bootstrap.pg_hba.is_empty() {
            return None;
        }
        Some(Vec::new())
    }

    /// The pg_hba.conf we would write for `cfg` + `dynamic` (`None`: leave the file alone).
    fn render_hba(cfg: &AgentConfig, dynamic: &DynamicConfig) -> Option<String> {
        let repl = &cfg.postgresql.authentication.replication.username;
        Self::hba_lines(cfg, dynamic).map(|l| conf::render_pg_hba(&l, repl))
    }

    /// The parameters we would write now (also the "configured value" of pending_restart).
    pub(super) fn merged_parameters(&self) -> BTreeMap<String, String> {
        let cfg = self.cfg();
        let sh = self.shared();
        let (listen_host, port) = cfg.pg_listen_host_port();
        let owned = conf::OwnedParameters {
            listen_addresses: listen_host,
            port,
            socket_dir: self.socket_dir.to_string_lossy().into_owned(),
            hba_file: self
                .data_dir
                .join("pg_hba.conf")
                .to_string_lossy()
                .into_owned(),
            synchronous_standby_names: sh.synchronous_standby_names.clone(),
        };
        let mut params = conf::merged_parameters(
            &cfg.scope,
            &sh.dynamic.parameters(),
            &cfg.local_parameters(),
            &owned,
        );
        // Every standby start (a clone, a restart, a demoted primary's restart) recomputes the
        // minimums from pg_control in `start`; a standby below them refuses to start.
        if sh.standby.is_some() {
            conf::raise_to_minimums(&mut params, &sh.standby_minimums);
        }
        params
    }

    /// Regenerates postgresql.conf, pg_hba.conf (when we manage it, see [`Self::hba_lines`])
    /// and the pgpass file; `true` when postgresql.conf or pg_hba.conf changed (the server
    /// needs a reload). Before the first write the initdb postgresql.conf is kept as
    /// postgresql.base.conf. Unchecked: config changes that may alter pg_hba.conf go through
    /// [`Self::write_config_checked`] first.
    pub(super) fn write_config(&self) -> Result<bool, PgError> {
        let _serial = self.config_write.lock().unwrap_or_else(|e| e.into_inner());
        if !self.initialized() {
            // Nothing to configure yet (the parent directory may not even exist before the
            // first initdb/clone); initdb/basebackup/start write everything when it exists.
            return Ok(false);
        }
        self.write_pgpass()?;
        let conf_path = self.data_dir.join("postgresql.conf");
        let base = self.data_dir.join(conf::BASE_CONF);
        if let Ok(text) = std::fs::read_to_string(&conf_path)
            && !text.starts_with(conf::GENERATED_HEADER)
            && !base.exists()
        {
            std::fs::rename(&conf_path, &base)?;
        }
        let params = self.merged_parameters();
        let cfg = self.cfg();
        let (standby, hba) = {
            let sh = self.shared();
            (sh.standby.clone(), Self::render_hba(&cfg, &sh.dynamic))
        };
        let text = conf::render_postgresql_conf(&params, standby.as_ref());
        let mut changed = self.write_owned(&conf_path, &text)?;
        if let Some(hba) = hba {
            changed |= self.write_owned(&self.data_dir.join("pg_hba.conf"), &hba)?;
        }
        Ok(changed)
    }

    /// Takes over `cfg` and `dynamic` as the config in force and writes the files, checking a
    /// changed pg_hba.conf first while PostgreSQL runs: the candidate file is put in place
    /// (atomically), `pg_hba_file_rules` is asked for error rows, and on any the previous file
    /// goes back (atomically, byte-identical) and nothing is taken over. Returns whether the
    /// running server needs a reload.
    ///
    /// Known window: a concurrent unchecked [`Self::write_config`] (an action's start) during
    /// the check would put the previous file back early; the check then passes on it and the
    /// new file is written right after, unchecked. Both writers run only around starts.
    pub(super) async fn write_config_checked(
        &self,
        cfg: &AgentConfig,
        dynamic: &DynamicConfig,
    ) -> Result<bool, PgError> {
        let hba_path = self.data_dir.join("pg_hba.conf");
        let candidate = Self::render_hba(cfg, dynamic);
        let previous = std::fs::read(&hba_path).ok();
        let hba_changes = self.initialized()
            && candidate
                .as_ref()
                .is_some_and(|c| previous.as_deref() != Some(c.as_bytes()));
        if hba_changes && self.postmaster_pid().is_some() {
            let text = candidate.as_deref().unwrap_or_default();
            {
                let _serial = self.config_write.lock().unwrap_or_else(|e| e.into_inner());
                self.write_owned(&hba_path, text)?;
            }
            let rejected = match self.hba_errors().await {
                Ok(errors) if errors.is_empty() => None,
                Ok(errors) => Some(PgError::HbaRejected(format!(
                    "{} (kept the previous pg_hba.conf)",
                    errors.join("; ")
                ))),
                Err(e) => Some(PgError::HbaRejected(format!(
                    "cannot check the new pg_hba.conf: {e} (kept the previous pg_hba.conf)"
                ))),
            };
            if let Some(e) = rejected {
                let _serial = self.config_write.lock().unwrap_or_else(|e| e.into_inner());
                match &previous {
                    Some(old) => self.write_owned_bytes(&hba_path, old)?,
                    None => {
                        let _ = std::fs::remove_file(&hba_path);
                    }
                }
                return Err(e);
            }
        }
        *self.cfg.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(cfg.clone());
        self.shared().dynamic = dynamic.clone();
        let changed = self.write_config()? || hba_changes;
        Ok(changed && self.postmaster_pid().is_some())
    }

    /// standby.signal present iff we start as a standby; recovery.signal never (we do not do
    /// targeted recovery, and a leftover one would make a primary start in recovery).
    pub(super) fn write_signals(&self, standby: bool) -> Result<(), PgError> {
        let sig = self.data_dir.join("standby.signal");
        if standby {
            if !sig.exists() {
                self.write_owned(&sig, "")?;
            }
        } else if sig.exists() {
            std::fs::remove_file(&sig)?;
        }
        let rec = self.data_dir.join("recovery.signal");
        if rec.exists() {
            std::fs::remove_file(rec)?;
        }
        Ok(())
    }

    /// [`Postgres::follow`](crate::pg::Postgres::follow): the standby settings for `upstream`, in
    /// force at the next start or by a reload.
    pub(super) async fn follow_upstream(&self, upstream: Option<&Upstream>) -> Result<(), PgError> {
        let settings = self.standby_settings(upstream);
        self.shared().standby = Some(settings);
        let changed = self.write_config()?;
        if !self.initialized() {
            // Remembered for the first start after a clone.
        } else if self.postmaster_pid().is_none() {
            // Next start comes up as a standby of `upstream`.
            self.write_signals(true)?;
        } else if changed {
            // primary_conninfo / primary_slot_name are reloadable since PG 13: the walreceiver
            // restarts with the new source without a server restart.
            self.reload_and_confirm().await?;
        }
        Ok(())
    }

    /// [`Postgres::set_synchronous_standby_names`](crate::pg::Postgres::set_synchronous_standby_names):
    /// in the generated postgresql.conf (see the module docs of [`super`]), then a reload.
    pub(super) async fn write_synchronous_standby_names(&self, value: &str) -> Result<(), PgError> {
        self.shared().synchronous_standby_names = Some(value.to_string());
        if self.write_config()? {
            self.reload_and_confirm().await?;
        }
        Ok(())
    }
}
