//! The real PostgreSQL controller: [`LocalPostgres`] implements [`Postgres`] by running the
//! PostgreSQL 15 binaries (`initdb`, `pg_ctl`, `pg_controldata`, `pg_basebackup`, `pg_rewind`,
//! single-user `postgres`) through `tokio::process`, and by SQL over the unix socket with
//! tokio-postgres. It owns the generated files in the data directory (see [`super::conf`] for
//! their content and the parameter precedence) and the pgpass file next to it.
//!
//! Process rules:
//! - When the agent runs as root, every PostgreSQL binary runs as the owner of the data
//!   directory (or of its parent before it exists; falling back to the `postgres` user), since
//!   PostgreSQL refuses to run as root. Otherwise binaries run as the agent's user.
//! - Every call is bounded in time (see the `*_TIMEOUT` constants) so the HA loop, which renews
//!   the leader lease between calls, is never stuck behind PostgreSQL.
//! - The postmaster is started detached (own session, output to a log file next to the data
//!   directory), so it survives agent restarts and never writes into the agent's pipes.
//! - Passwords travel only through the pgpass file (mode 0600, `PGPASSFILE` / `passfile=`), the
//!   initdb pwfile (0600, removed afterwards) and tokio-postgres' in-memory config; they are
//!   never put on a command line, in postgresql.conf, or in error messages.
//! - Every generated file is replaced atomically (temp file in the same directory, fsync,
//!   rename, owned by the PostgreSQL user, 0600); a changed pg_hba.conf is checked against
//!   `pg_hba_file_rules` while the server runs and put back when PostgreSQL rejects it.
//! - `synchronous_standby_names` is managed in the generated postgresql.conf (not ALTER SYSTEM):
//!   `postgresql.auto.conf` is copied by pg_basebackup and pg_rewind, so a value stored there
//!   would follow a clone and could make a freshly promoted replica wait for itself.
//!
//! Files, one concern each (this one holds the controller's state and the [`Postgres`] impl,
//! which hands every longer verb to its file):
//! - `process.rs`: running the binaries (run-as user, scrubbed environment, time bounds) and the
//!   postmaster's life: pg_ctl start, stop, promote, reload, and [`live_postmaster`];
//! - `sql.rs`: connections (the persistent local one, remote members, libpq strings) and the
//!   short statements (slots, checkpoint, pg_hba check, configuration load time);
//! - `observe.rs`: the observation of the instance for each HA cycle;
//! - `files.rs`: the generated files in the data directory (postgresql.conf, pg_hba.conf, the
//!   signal files, pgpass) and the standby settings they carry;
//! - `bootstrap.rs`: a new data directory: initdb and its roles, or a clone by pg_basebackup;
//! - `rewind.rs`: timelines: the divergence check, pg_rewind, reserved and read history files.

mod bootstrap;
mod files;
mod observe;
mod process;
mod rewind;
mod sql;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio_postgres::Client;

use crate::config::AgentConfig;
use crate::dcs::{DynamicConfig, HistoryLine};
use crate::pg::conf::{self, StandbySettings};
use crate::pg::{PgError, PgStatus, Postgres, StartAs, StopMode, Upstream};
use crate::types::{MemberName, Timeline};

pub use process::live_postmaster;

/// Mutable state shared by the methods (they take `&self`).
#[derive(Debug, Default)]
struct Shared {
    /// Last DCS `config` given to apply_dynamic_config.
    dynamic: DynamicConfig,
    /// `None`: run as primary; `Some`: standby settings written into postgresql.conf.
    standby: Option<StandbySettings>,
    /// `synchronous_standby_names` once the HA loop set it.
    synchronous_standby_names: Option<String>,
    /// Standby only: hot-standby parameters raised to the values recorded in pg_control (see
    /// [`conf::hot_standby_minimums`]).
    standby_minimums: BTreeMap<String, String>,
}

/// The real PostgreSQL controller for one node (see module docs).
pub struct LocalPostgres {
    /// The node config in force; swapped whole by [`Postgres::set_local_config`] (readers take
    /// the `Arc`, never hold the lock).
    cfg: std::sync::RwLock<Arc<AgentConfig>>,
    name: MemberName,
    data_dir: PathBuf,
    bin_dir: PathBuf,
    socket_dir: PathBuf,
    pgpass: PathBuf,
    log_file: PathBuf,
    /// uid/gid to run PostgreSQL binaries as (only when the agent is root).
    run_as: Option<(u32, u32)>,
    shared: Mutex<Shared>,
    /// Serialises config-file generation: the loop's `apply_dynamic_config` and an action's
    /// `start` may both write; unserialised, both could move the initdb postgresql.conf aside
    /// and the second would move our generated file onto postgresql.base.conf (which then
    /// includes itself).
    config_write: Mutex<()>,
    /// Persistent superuser connection for observe(); dropped and re-made on any error.
    client: tokio::sync::Mutex<Option<Arc<Client>>>,
}

impl std::fmt::Debug for LocalPostgres {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LocalPostgres")
            .field("name", &self.name)
            .field("data_dir", &self.data_dir)
            .field("run_as", &self.run_as)
            .finish_non_exhaustive()
    }
}

fn failed(what: &str, detail: impl Into<String>) -> PgError {
    PgError::CommandFailed {
        what: what.to_string(),
        detail: detail.into(),
    }
}

impl LocalPostgres {
    /// Builds the controller from the node config. Touches nothing but reads the current
    /// standby settings back from a generated postgresql.conf when `standby.signal` exists, so an
    /// agent restart does not cut a running replica off its upstream.
    pub fn new(cfg: &AgentConfig) -> Result<LocalPostgres, PgError> {
        let data_dir = cfg.postgresql.data_dir.clone();
        let parent = data_dir
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| data_dir.clone());
        let dir_name = data_dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_else(|| "pgdata".into());
        let socket_dir = cfg
            .postgresql
            .socket_dir
            .clone()
            .unwrap_or_else(|| parent.clone());
        let pgpass = cfg
            .postgresql
            .pgpass
            .clone()
            .unwrap_or_else(|| parent.join(format!(".pgpass.pgherd.{}", cfg.name)));
        let log_file = parent.join(format!("{dir_name}.log"));
        let run_as = process::resolve_run_as(&data_dir)?;
        let mut shared = Shared::default();
        if data_dir.join("standby.signal").exists() {
            let text =
                std::fs::read_to_string(data_dir.join("postgresql.conf")).unwrap_or_default();
            shared.standby = Some(conf::parse_standby_settings(&text));
        }
        Ok(LocalPostgres {
            cfg: std::sync::RwLock::new(Arc::new(cfg.clone())),
            name: MemberName::new(cfg.name.clone()),
            data_dir,
            bin_dir: cfg.postgresql.bin_dir.clone(),
            socket_dir,
            pgpass,
            log_file,
            run_as,
            shared: Mutex::new(shared),
            config_write: Mutex::new(()),
            client: tokio::sync::Mutex::new(None),
        })
    }

    /// The node config in force.
    fn cfg(&self) -> Arc<AgentConfig> {
        self.cfg.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn data_dir(&self) -> &Path {
        &self.data_dir
    }

    /// Where pg_ctl writes the postmaster's output.
    pub fn log_file(&self) -> &Path {
        &self.log_file
    }

    fn shared(&self) -> std::sync::MutexGuard<'_, Shared> {
        self.shared.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn port(&self) -> u16 {
        self.cfg().pg_listen_host_port().1
    }

    fn use_slots(&self) -> bool {
        self.shared()
            .dynamic
            .use_slots()
            .unwrap_or(self.cfg().postgresql.use_slots)
    }

    fn initialized(&self) -> bool {
        self.data_dir.join("PG_VERSION").exists()
    }
}

#[async_trait]
impl Postgres for LocalPostgres {
    async fn observe(&self) -> PgStatus {
        self.observe_now().await
    }

    async fn apply_dynamic_config(&self, config: &DynamicConfig) -> Result<bool, PgError> {
        let cfg = self.cfg();
        self.write_config_checked(&cfg, config).await
    }

    async fn set_local_config(&self, cfg: &AgentConfig) -> Result<bool, PgError> {
        let dynamic = self.shared().dynamic.clone();
        let needs_reload = self.write_config_checked(cfg, &dynamic).await?;
        // Credentials may have changed: the next observation connects with the new ones.
        self.drop_client().await;
        Ok(needs_reload)
    }

    async fn initdb(&self) -> Result<(), PgError> {
        self.run_initdb().await
    }

    async fn post_bootstrap(&self) -> Result<(), PgError> {
        self.create_roles_and_run_post_bootstrap().await
    }

    async fn basebackup(&self, from: &Upstream) -> Result<(), PgError> {
        self.clone_from(from).await
    }

    async fn wipe_data_dir(&self) -> Result<(), PgError> {
        self.require_stopped("wiping the data directory")?;
        self.drop_client().await;
        self.wipe_contents()
    }

    async fn start(&self, start_as: &StartAs, timeout: Duration) -> Result<(), PgError> {
        self.start_postmaster(start_as, timeout).await
    }

    async fn stop(&self, mode: StopMode, timeout: Duration) -> Result<(), PgError> {
        self.stop_postmaster(mode, timeout).await
    }

    async fn promote(
        &self,
        used: Timeline,
        history: &[HistoryLine],
        timeout: Duration,
    ) -> Result<(), PgError> {
        self.promote_and_wait(used, history, timeout).await
    }

    async fn follow(&self, upstream: Option<&Upstream>) -> Result<(), PgError> {
        self.follow_upstream(upstream).await
    }

    async fn reload(&self) -> Result<(), PgError> {
        self.reload_and_confirm().await
    }

    async fn checkpoint(&self) -> Result<(), PgError> {
        self.run_checkpoint().await
    }

    async fn needs_rewind(&self, leader: &Upstream) -> Result<bool, PgError> {
        self.diverged_from(leader).await
    }

    async fn rewind(&self, leader: &Upstream) -> Result<(), PgError> {
        self.rewind_from(leader).await
    }

    async fn sync_slots(&self, wanted: &[String], keep: &[String]) -> Result<(), PgError> {
        self.sync_physical_slots(wanted, keep).await
    }

    async fn set_synchronous_standby_names(&self, value: &str) -> Result<(), PgError> {
        self.write_synchronous_standby_names(value).await
    }

    async fn timeline_history(&self) -> Result<Vec<HistoryLine>, PgError> {
        self.read_timeline_history().await
    }
}
