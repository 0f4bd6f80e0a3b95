//! The observation of the instance for each HA cycle ([`Postgres::observe`]): pg_controldata
//! for a data directory, the postmaster check, then one round of SQL on the persistent
//! connection (recovery state, positions, the WAL receiver, replication, slots, pending
//! restarts). Never an error: what could not be read stays unknown.
//!
//! [`Postgres::observe`]: crate::pg::Postgres::observe

use std::sync::Arc;

use tokio_postgres::Client;

use super::LocalPostgres;
use super::sql::{SQL_TIMEOUT, bounded};
use crate::pg::conf;
use crate::pg::{PgError, PgStatus, ReplicationRow, SlotInfo};
use crate::types::{Lsn, Timeline};

fn lsn(s: Option<String>) -> Option<Lsn> {
    s.as_deref().and_then(Lsn::parse_pg)
}

impl LocalPostgres {
    /// [`Postgres::observe`](crate::pg::Postgres::observe).
    pub(super) async fn observe_now(&self) -> PgStatus {
        let mut st = PgStatus {
            data_dir_initialized: self.initialized(),
            ..Default::default()
        };
        if st.data_dir_initialized
            && let Ok(cd) = self.controldata().await
        {
            st.sysid = cd.sysid();
            st.control_state = cd.state();
            st.control_timeline = cd.checkpoint_timeline();
        }
        st.running = self.postmaster_pid().is_some();
        if st.running {
            let mut sql = st.clone();
            let mut r = self
                .with_client(|c| async { self.observe_sql(c, &mut sql).await })
                .await;
            if matches!(r, Err(PgError::Sql(_))) {
                // The cached connection may predate a server restart: one fresh attempt, so a
                // healthy server is not reported as "not accepting connections" for a cycle.
                // Timeouts are not retried (observe must stay short).
                sql = st.clone();
                r = self
                    .with_client(|c| async { self.observe_sql(c, &mut sql).await })
                    .await;
            }
            if r.is_ok() {
                st = sql;
            }
        } else {
            self.drop_client().await;
        }
        st
    }

    /// Gathers the SQL part of observe() into `st`.
    async fn observe_sql(&self, c: Arc<Client>, st: &mut PgStatus) -> Result<(), PgError> {
        let row = bounded(
            SQL_TIMEOUT,
            "observing postgres",
            c.query_one(
                "SELECT pg_is_in_recovery(), \
                 current_setting('server_version_num')::int4, \
                 pg_postmaster_start_time()::text, \
                 current_setting('synchronous_standby_names'), \
                 CASE WHEN pg_is_in_recovery() THEN NULL ELSE pg_current_wal_flush_lsn()::text END, \
                 CASE WHEN pg_is_in_recovery() THEN NULL \
                      ELSE pg_walfile_name(pg_current_wal_lsn()) END, \
                 CASE WHEN pg_is_in_recovery() THEN pg_last_wal_receive_lsn()::text END, \
                 CASE WHEN pg_is_in_recovery() THEN pg_last_wal_replay_lsn()::text END, \
                 CASE WHEN pg_is_in_recovery() THEN pg_last_xact_replay_timestamp()::text END, \
                 CASE WHEN pg_is_in_recovery() THEN pg_is_wal_replay_paused() ELSE false END, \
                 (SELECT timeline_id FROM pg_control_checkpoint())::int4",
                &[],
            ),
        )
        .await?;
        let in_recovery: bool = row.get(0);
        st.accepting_connections = true;
        st.in_recovery = Some(in_recovery);
        st.server_version = row.get::<_, Option<i32>>(1).map(|v| v as u32);
        st.postmaster_start_time = row.get(2);
        st.synchronous_standby_names = row.get(3);
        st.flush_lsn = lsn(row.get(4));
        let walfile: Option<String> = row.get(5);
        st.receive_lsn = lsn(row.get(6));
        st.replay_lsn = lsn(row.get(7));
        st.replay_timestamp = row.get(8);
        st.replay_paused = row.get::<_, Option<bool>>(9).unwrap_or(false);
        let checkpoint_tl: Option<i32> = row.get(10);

        if in_recovery {
            let rows = bounded(
                SQL_TIMEOUT,
                "reading pg_stat_wal_receiver",
                c.query(
                    "SELECT status, received_tli::int4, written_lsn::text, sender_host, \
                     sender_port::int4 FROM pg_stat_wal_receiver",
                    &[],
                ),
            )
            .await?;
            let receiver = rows.first();
            let status: Option<String> = receiver.and_then(|r| r.get(0));
            let received_tli: Option<i32> = receiver.and_then(|r| r.get(1));
            let written = lsn(receiver.and_then(|r| r.get(2)));
            st.receive_lsn = match (st.receive_lsn, written) {
                (Some(a), Some(b)) => Some(a.max(b)),
                (a, b) => a.or(b),
            };
            st.replication_state = Some(if status.as_deref() == Some("streaming") {
                "streaming".to_string()
            } else {
                "in archive recovery".to_string()
            });
            if let Some(r) = receiver {
                let host: Option<String> = r.get(3);
                let port: Option<i32> = r.get(4);
                if let (Some(h), Some(p)) = (host, port) {
                    st.upstream = Some(format!("{h}:{p}"));
                }
            }
            st.timeline = received_tli
                .filter(|t| *t > 0)
                .or(checkpoint_tl)
                .map(|t| Timeline(t as u32))
                .or(st.control_timeline);
        } else {
            st.timeline = walfile.as_deref().and_then(conf::timeline_from_walfile);
        }

        let rows = bounded(
            SQL_TIMEOUT,
            "reading pg_stat_replication",
            c.query(
                "SELECT usename::text, application_name, client_addr::text, state, sync_state, \
                 sync_priority, write_lsn::text, flush_lsn::text, replay_lsn::text \
                 FROM pg_stat_replication",
                &[],
            ),
        )
        .await?;
        st.replication = rows
            .iter()
            .map(|r| ReplicationRow {
                usename: r.get::<_, Option<String>>(0).unwrap_or_default(),
                application_name: r.get::<_, Option<String>>(1).unwrap_or_default(),
                client_addr: r.get(2),
                state: r.get::<_, Option<String>>(3).unwrap_or_default(),
                sync_state: r.get::<_, Option<String>>(4).unwrap_or_default(),
                sync_priority: r.get::<_, Option<i32>>(5).unwrap_or_default(),
                write_lsn: lsn(r.get(6)),
                flush_lsn: lsn(r.get(7)),
                replay_lsn: lsn(r.get(8)),
            })
            .collect();

        let rows = bounded(
            SQL_TIMEOUT,
            "reading pg_replication_slots",
            c.query(
                "SELECT slot_name::text, slot_type, active, restart_lsn::text \
                 FROM pg_replication_slots ORDER BY slot_name",
                &[],
            ),
        )
        .await?;
        st.slots = rows
            .iter()
            .map(|r| SlotInfo {
                name: r.get(0),
                physical: r.get::<_, String>(1) == "physical",
                active: r.get(2),
                restart_lsn: lsn(r.get(3)),
            })
            .collect();

        // Restart-only parameters changed in the files: running value vs. the last value in
        // the config files (what a restart would apply), else what we generated.
        let rows = bounded(
            SQL_TIMEOUT,
            "reading pending restarts",
            c.query(
                "SELECT s.name, s.setting, (SELECT f.setting FROM pg_file_settings f \
                 WHERE f.name = s.name ORDER BY f.seqno DESC LIMIT 1) \
                 FROM pg_settings s WHERE s.pending_restart",
                &[],
            ),
        )
        .await?;
        let configured = self.merged_parameters();
        st.pending_restart = rows
            .iter()
            .map(|r| {
                let name: String = r.get(0);
                let old: Option<String> = r.get(1);
                let new: Option<String> = r
                    .get::<_, Option<String>>(2)
                    .or_else(|| configured.get(&name).cloned());
                (name, (old.unwrap_or_default(), new.unwrap_or_default()))
            })
            .collect();
        Ok(())
    }
}
