//! Timelines: the divergence check against the leader (after a local crash recovery, so
//! pg_controldata shows the true end of WAL), pg_rewind, the history files reserved before a
//! promotion, and the local history read back for the DCS.

use std::ffi::OsString;
use std::path::Path;
use std::time::Duration;

use super::sql::{REMOTE_CONNECT_TIMEOUT, SQL_TIMEOUT, bounded, connect};
use super::{LocalPostgres, failed};
use crate::dcs::HistoryLine;
use crate::pg::conf;
use crate::pg::{ControlState, PgError, Upstream};
use crate::types::Timeline;

const REWIND_TIMEOUT: Duration = Duration::from_secs(3600);
const CRASH_RECOVERY_TIMEOUT: Duration = Duration::from_secs(3600);

/// File mtime as ISO 8601 in UTC with an explicit `+00:00`, as Patroni writes history stamps.
fn mtime_iso(path: &Path) -> Option<String> {
    let t = std::fs::metadata(path).ok()?.modified().ok()?;
    let dt: chrono::DateTime<chrono::Utc> = t.into();
    Some(dt.format("%Y-%m-%dT%H:%M:%S%.6f+00:00").to_string())
}

impl LocalPostgres {
    /// Single-user crash recovery, so that pg_controldata shows a clean shutdown whose
    /// checkpoint is the true end of the local WAL (the divergence check and pg_rewind both need
    /// that). archive_mode=on + a failing archive_command keep every WAL segment, which pg_rewind
    /// may need to read back to the common checkpoint. Signal files are removed: single-user
    /// mode cannot run as a standby.
    async fn crash_recovery(&self) -> Result<(), PgError> {
        self.write_signals(false)?;
        let args: Vec<OsString> = [
            "--single",
            "-D",
            &self.data_dir.to_string_lossy(),
            "-c",
            "archive_mode=on",
            "-c",
            "archive_command=false",
            "-c",
            "listen_addresses=",
            "template1",
        ]
        .iter()
        .map(OsString::from)
        .collect();
        self.run_tool(
            "crash recovery (postgres --single)",
            "postgres",
            args,
            CRASH_RECOVERY_TIMEOUT,
            &[],
        )
        .await?;
        Ok(())
    }

    /// Writes `pg_wal/<tl>.history` for every timeline up to `used` that has none, so that
    /// the next promotion picks a number above `used` (see [`Postgres::promote`]). Each file
    /// holds the cluster's history lines leading to that timeline, as a replica on it would
    /// have fetched them, after a comment saying why it is there.
    pub(super) fn reserve_timelines(
        &self,
        used: Timeline,
        history: &[HistoryLine],
    ) -> Result<(), PgError> {
        let wal = self.data_dir.join("pg_wal");
        for tl in 2..=used.0 {
            let path = wal.join(format!("{tl:08X}.history"));
            if path.exists() {
                continue;
            }
            let text = conf::reserved_history(Timeline(tl), history);
            std::fs::write(&path, text)?;
            tracing::info!(
                timeline = tl,
                "reserved a timeline the cluster already used"
            );
        }
        Ok(())
    }

    /// Leader facts for the divergence check: current timeline and its history file.
    async fn leader_timeline(
        &self,
        leader: &Upstream,
    ) -> Result<(Timeline, Vec<conf::HistoryEntry>), PgError> {
        let c = connect(&self.remote_sql_config(leader), REMOTE_CONNECT_TIMEOUT).await?;
        let row = bounded(
            SQL_TIMEOUT,
            "reading the leader's timeline",
            c.query_one(
                "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN NULL \
                 ELSE pg_walfile_name(pg_current_wal_lsn()) END",
                &[],
            ),
        )
        .await?;
        let in_recovery: bool = row.get(0);
        if in_recovery {
            // A standby's timeline and history can still move: deciding now could be wrong.
            return Err(failed(
                "checking the leader's timeline",
                "leader is in recovery",
            ));
        }
        let walfile: String = row.get(1);
        let tl = conf::timeline_from_walfile(&walfile)
            .ok_or_else(|| failed("checking the leader's timeline", "bad WAL file name"))?;
        if tl.0 <= 1 {
            return Ok((tl, Vec::new()));
        }
        let path = format!("pg_wal/{:08X}.history", tl.0);
        let row = bounded(
            SQL_TIMEOUT,
            "reading the leader's timeline history",
            c.query_one("SELECT pg_read_binary_file($1)", &[&path]),
        )
        .await?;
        let bytes: Vec<u8> = row.get(0);
        Ok((tl, conf::parse_history(&String::from_utf8_lossy(&bytes))))
    }

    /// pg_rewind takes the source's timeline from its control file, which a promoted server
    /// only updates at its first checkpoint. Rewinding before that would find "same timeline,
    /// nothing to do" and leave the diverged data in place, so refuse until it happened (the
    /// HA loop checkpoints right after promoting; the caller retries next cycle).
    async fn ensure_leader_checkpointed(&self, leader: &Upstream) -> Result<(), PgError> {
        let c = connect(&self.remote_sql_config(leader), REMOTE_CONNECT_TIMEOUT).await?;
        let row = bounded(
            SQL_TIMEOUT,
            "checking the leader's checkpoint",
            c.query_one(
                "SELECT pg_is_in_recovery(), CASE WHEN pg_is_in_recovery() THEN NULL \
                 ELSE pg_walfile_name(pg_current_wal_lsn()) END, \
                 (SELECT timeline_id FROM pg_control_checkpoint())::int4",
                &[],
            ),
        )
        .await?;
        let in_recovery: bool = row.get(0);
        let current = row
            .get::<_, Option<String>>(1)
            .as_deref()
            .and_then(conf::timeline_from_walfile);
        let checkpoint: Option<i32> = row.get(2);
        if in_recovery {
            return Err(failed("pg_rewind", "the source is in recovery"));
        }
        if current.map(|t| t.0 as i32) != checkpoint {
            return Err(failed(
                "pg_rewind",
                "the leader has not checkpointed since its promotion yet; retry later",
            ));
        }
        Ok(())
    }

    /// Local timeline for timeline_history(): SQL on a running primary, else pg_controldata.
    async fn current_timeline(&self) -> Result<Timeline, PgError> {
        if self.postmaster_pid().is_some()
            && let Ok(Some(tl)) = self
                .with_client(|c| async move {
                    let row = bounded(
                        SQL_TIMEOUT,
                        "reading the timeline",
                        c.query_one(
                            "SELECT CASE WHEN pg_is_in_recovery() THEN NULL \
                             ELSE pg_walfile_name(pg_current_wal_lsn()) END",
                            &[],
                        ),
                    )
                    .await?;
                    Ok(row
                        .get::<_, Option<String>>(0)
                        .as_deref()
                        .and_then(conf::timeline_from_walfile))
                })
                .await
        {
            return Ok(tl);
        }
        self.controldata()
            .await?
            .checkpoint_timeline()
            .ok_or_else(|| failed("reading the timeline", "pg_controldata has no timeline"))
    }

    /// [`Postgres::needs_rewind`](crate::pg::Postgres::needs_rewind).
    pub(super) async fn diverged_from(&self, leader: &Upstream) -> Result<bool, PgError> {
        self.require_stopped("checking for divergence")?;
        let mut cd = self.controldata().await?;
        if matches!(
            cd.state(),
            Some(
                ControlState::InProduction
                    | ControlState::InCrashRecovery
                    | ControlState::ShuttingDown
            )
        ) {
            // A crashed/killed primary: its checkpoint says nothing about how far its WAL goes.
            // Recover locally first so the shutdown checkpoint marks the real end of WAL.
            self.crash_recovery().await?;
            cd = self.controldata().await?;
        }
        let clean_primary = cd.state() == Some(ControlState::ShutDown);
        let local = cd
            .reached()
            .ok_or_else(|| failed("checking for divergence", "pg_controldata lacks positions"))?;
        let (leader_tl, history) = self.leader_timeline(leader).await?;
        let need = conf::rewind_needed(local, leader_tl, &history, clean_primary);
        tracing::info!(
            local_timeline = %local.0, local_lsn = %local.1, leader_timeline = %leader_tl, need,
            "divergence check"
        );
        Ok(need)
    }

    /// [`Postgres::rewind`](crate::pg::Postgres::rewind).
    pub(super) async fn rewind_from(&self, leader: &Upstream) -> Result<(), PgError> {
        self.require_stopped("pg_rewind")?;
        let cd = self.controldata().await?;
        if !matches!(
            cd.state(),
            Some(ControlState::ShutDown | ControlState::ShutDownInRecovery)
        ) {
            // pg_rewind refuses a target that was not shut down cleanly.
            self.crash_recovery().await?;
        }
        self.ensure_leader_checkpointed(leader).await?;
        self.write_pgpass()?;
        let cfg = self.cfg();
        let auth = &cfg.postgresql.authentication;
        let user = &auth.rewind.as_ref().unwrap_or(&auth.superuser).username;
        let dsn = self.connstring_for(leader, user, Some(&self.cfg().postgresql.database));
        let args: Vec<OsString> = vec![
            "-D".into(),
            self.data_dir.clone().into(),
            format!("--source-server={dsn}").into(),
        ];
        self.run_tool(
            "pg_rewind",
            "pg_rewind",
            args,
            REWIND_TIMEOUT,
            &[
                ("PGPASSFILE", self.pgpass.clone().into()),
                // Copying big relations must not hit a statement_timeout set on the source.
                ("PGOPTIONS", "-c statement_timeout=0".into()),
            ],
        )
        .await?;
        // pg_rewind copied the leader's config files: put ours back, as a standby of the leader.
        self.shared().standby = Some(self.standby_settings(Some(leader)));
        self.write_config()?;
        self.write_signals(true)?;
        Ok(())
    }

    /// [`Postgres::timeline_history`](crate::pg::Postgres::timeline_history): the history file of the
    /// current timeline, each line stamped with the mtime of the file of the timeline it began.
    pub(super) async fn read_timeline_history(&self) -> Result<Vec<HistoryLine>, PgError> {
        let tl = self.current_timeline().await?;
        if tl.0 <= 1 {
            return Ok(Vec::new());
        }
        let wal = self.data_dir.join("pg_wal");
        let path = wal.join(format!("{:08X}.history", tl.0));
        let entries = conf::parse_history(&std::fs::read_to_string(&path)?);
        // Each line records the birth of the next timeline; its `.history` file was written
        // then, so that file's mtime stamps the line.
        let lines = entries
            .iter()
            .enumerate()
            .map(|(i, e)| {
                let child = entries.get(i + 1).map(|n| n.parent).unwrap_or(tl);
                HistoryLine {
                    parent_timeline: e.parent.0,
                    switchpoint: e.switchpoint.0,
                    reason: e.reason.clone(),
                    timestamp: mtime_iso(&wal.join(format!("{:08X}.history", child.0))),
                    new_leader: None,
                }
            })
            .collect();
        Ok(lines)
    }
}
