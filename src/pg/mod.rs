//! Control of the local PostgreSQL instance: the [`Postgres`] trait the HA loop acts through,
//! and the plain-data [`PgStatus`] observation the pure core decides on.
//!
//! - `local`: the real implementation (pg_ctl, initdb, pg_basebackup, pg_rewind via
//!   `tokio::process`; SQL via tokio-postgres; generated postgresql.conf / pg_hba.conf).
//! - `fake`: an in-memory PostgreSQL (role, LSN, timeline) for unit tests and the simulation
//!   (compiled for tests and with the `testing` feature).

pub mod conf;
#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod local;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};

use crate::types::{Lsn, MemberName, Timeline};

/// Patroni's PostgreSQL `state` strings (member key `state`, REST `state`); the discriminant is
/// the `patroni_postgres_state` metric value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum PgState {
    InitializingNewCluster = 0,
    InitdbFailed = 1,
    RunningCustomBootstrap = 2,
    CustomBootstrapFailed = 3,
    CreatingReplica = 4,
    Running = 5,
    Starting = 6,
    StartingAfterCustomBootstrap = 7,
    StartFailed = 8,
    Restarting = 9,
    RestartFailed = 10,
    Stopping = 11,
    Stopped = 12,
    StopFailed = 13,
    Crashed = 14,
}

impl PgState {
    pub fn as_str(self) -> &'static str {
        match self {
            PgState::InitializingNewCluster => "initializing new cluster",
            PgState::InitdbFailed => "initdb failed",
            PgState::RunningCustomBootstrap => "running custom bootstrap script",
            PgState::CustomBootstrapFailed => "custom bootstrap failed",
            PgState::CreatingReplica => "creating replica",
            PgState::Running => "running",
            PgState::Starting => "starting",
            PgState::StartingAfterCustomBootstrap => "starting after custom bootstrap",
            PgState::StartFailed => "start failed",
            PgState::Restarting => "restarting",
            PgState::RestartFailed => "restart failed",
            PgState::Stopping => "stopping",
            PgState::Stopped => "stopped",
            PgState::StopFailed => "stop failed",
            PgState::Crashed => "crashed",
        }
    }
}

/// Patroni role strings.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Role {
    Primary,
    Replica,
    StandbyLeader,
    Demoted,
    Uninitialized,
    /// Transient: between `pg_ctl promote` and "in production".
    Promoted,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Replica => "replica",
            Role::StandbyLeader => "standby_leader",
            Role::Demoted => "demoted",
            Role::Uninitialized => "uninitialized",
            Role::Promoted => "promoted",
        }
    }
}

/// `pg_controldata`'s "Database cluster state".
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ControlState {
    InProduction,
    ShutDown,
    ShutDownInRecovery,
    InCrashRecovery,
    InArchiveRecovery,
    ShuttingDown,
    Other(String),
}

/// One row of `pg_stat_replication` on a primary.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ReplicationRow {
    pub usename: String,
    pub application_name: String,
    pub client_addr: Option<String>,
    pub state: String,
    pub sync_state: String,
    pub sync_priority: i32,
    pub write_lsn: Option<Lsn>,
    pub flush_lsn: Option<Lsn>,
    pub replay_lsn: Option<Lsn>,
}

/// A replication slot present on the local instance.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SlotInfo {
    pub name: String,
    pub physical: bool,
    pub active: bool,
    pub restart_lsn: Option<Lsn>,
}

/// A snapshot of the local instance, gathered at the start of each HA cycle. Plain data: the
/// pure core decides on it. Gathering it never blocks longer than a short SQL timeout; when SQL
/// fails, `running` reflects the postmaster pid check and the SQL-derived fields are `None`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PgStatus {
    /// Data directory holds a cluster (PG_VERSION exists).
    pub data_dir_initialized: bool,
    /// Database system identifier from pg_controldata, when initialized.
    pub sysid: Option<String>,
    /// pg_controldata cluster state, when initialized.
    pub control_state: Option<ControlState>,
    /// Timeline of the latest checkpoint per pg_controldata.
    pub control_timeline: Option<Timeline>,
    /// A postmaster runs for this data directory.
    pub running: bool,
    /// SQL answered (accepting connections).
    pub accepting_connections: bool,
    /// `pg_is_in_recovery()`.
    pub in_recovery: Option<bool>,
    /// Current timeline (primary: from WAL file name; replica: received tli or control).
    pub timeline: Option<Timeline>,
    /// Primary: `pg_current_wal_flush_lsn()`.
    pub flush_lsn: Option<Lsn>,
    /// Replica: max(`pg_last_wal_receive_lsn()`, written lsn of the wal receiver).
    pub receive_lsn: Option<Lsn>,
    /// Replica: `pg_last_wal_replay_lsn()`.
    pub replay_lsn: Option<Lsn>,
    /// Replica: `pg_last_xact_replay_timestamp()` as text.
    pub replay_timestamp: Option<String>,
    pub replay_paused: bool,
    /// Replica: `Some("streaming")` when a wal receiver is streaming, `Some("in archive
    /// recovery")` otherwise.
    pub replication_state: Option<String>,
    /// Replica: the `application_name`-less host:port it streams from, when known.
    pub upstream: Option<String>,
    /// Primary: `pg_stat_replication`.
    pub replication: Vec<ReplicationRow>,
    pub slots: Vec<SlotInfo>,
    /// `server_version_num`.
    pub server_version: Option<u32>,
    pub postmaster_start_time: Option<String>,
    /// Parameters whose change needs a restart: name → (running value, configured value).
    pub pending_restart: BTreeMap<String, (String, String)>,
    /// Current `synchronous_standby_names`.
    pub synchronous_standby_names: Option<String>,
}

impl PgStatus {
    /// WAL position as Patroni compares it: primary flush LSN, else max(receive, replay).
    pub fn wal_position(&self) -> Lsn {
        self.flush_lsn
            .unwrap_or_default()
            .max(self.receive_lsn.unwrap_or_default())
            .max(self.replay_lsn.unwrap_or_default())
    }

    pub fn is_running_primary(&self) -> bool {
        self.running && self.in_recovery == Some(false)
    }
}

/// Where to stream from / clone from: a member's PostgreSQL address.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Upstream {
    pub member: MemberName,
    pub host: String,
    pub port: u16,
}

/// How to stop PostgreSQL (`pg_ctl stop -m`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum StopMode {
    Smart,
    Fast,
    Immediate,
}

/// What to start PostgreSQL as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum StartAs {
    /// No standby.signal.
    Primary,
    /// standby.signal with `primary_conninfo` pointing at `upstream` (none: no streaming source
    /// yet) and `primary_slot_name` = our slot when slots are used.
    Replica { upstream: Option<Upstream> },
}

/// Errors from acting on PostgreSQL. Callers branch on the cause only to pick log wording and
/// whether to retry next cycle.
#[derive(Debug, thiserror::Error)]
pub enum PgError {
    #[error("{what} failed: {detail}")]
    CommandFailed { what: String, detail: String },
    #[error("timed out after {0:?} while {1}")]
    Timeout(Duration, String),
    #[error("sql error: {0}")]
    Sql(String),
    #[error("io error: {0}")]
    Io(#[from] std::io::Error),
    /// PostgreSQL rejected a new `pg_hba.conf` (`pg_hba_file_rules` error rows); the previous
    /// file was put back and the server was not reloaded. The text names the lines and says so.
    #[error("{0}")]
    HbaRejected(String),
}

/// Contract of the local PostgreSQL controller.
///
/// Every method is bounded in time (start/stop by their timeouts, SQL by a short statement
/// timeout) so the HA loop — and with it lease renewal — is never stuck behind PostgreSQL.
/// Configuration (postgresql.conf, pg_hba.conf, standby settings) is generated by the
/// implementation from the local config merged with the DCS `config` last given to
/// [`Postgres::apply_dynamic_config`].
#[async_trait]
pub trait Postgres: Send + Sync {
    /// Observes the instance (see [`PgStatus`]). Never fails: unknowns are `None`.
    async fn observe(&self) -> PgStatus;

    /// Records the DCS dynamic config (parameters, pg_hba, use_slots, ...) and rewrites the
    /// config files if they changed. Returns `true` when the running server needs a reload
    /// (the caller decides when to reload). Restart-only changes show up in
    /// `PgStatus::pending_restart`.
    async fn apply_dynamic_config(
        &self,
        config: &crate::dcs::DynamicConfig,
    ) -> Result<bool, PgError>;

    /// Takes over a reloaded node config (local parameters, `postgresql.pg_hba`, credentials and
    /// pgpass, connect addresses, use_slots, ...) and rewrites the files that derive from it.
    /// Settings [`crate::config::restart_required`] names are never passed changed. Returns
    /// `true` when the running server needs a reload (the caller reloads). Either the whole
    /// config is taken over or none of it: on `Err` the previous config stays in force.
    ///
    /// Both this and [`Postgres::apply_dynamic_config`] check a rewritten `pg_hba.conf` while
    /// PostgreSQL runs: rejected lines put the previous file back and yield
    /// [`PgError::HbaRejected`] (nothing of the new config is kept).
    async fn set_local_config(&self, cfg: &crate::config::AgentConfig) -> Result<bool, PgError>;

    /// `initdb` into the (empty) data directory with the configured options (checksums on by
    /// default) and superuser credentials, then appends `bootstrap.pg_hba`.
    async fn initdb(&self) -> Result<(), PgError>;

    /// Creates the superuser / replication / rewind roles and runs `post_bootstrap` on a freshly
    /// initialised primary.
    async fn post_bootstrap(&self) -> Result<(), PgError>;

    /// Clones the data directory from `from` with pg_basebackup (replication credentials),
    /// wiping a partial copy on failure.
    async fn basebackup(&self, from: &Upstream) -> Result<(), PgError>;

    /// Removes the data directory contents (reinitialize, failed clone).
    async fn wipe_data_dir(&self) -> Result<(), PgError>;

    /// Writes config and standby settings for `start_as`, starts and waits until it accepts
    /// connections or `timeout` passes.
    async fn start(&self, start_as: &StartAs, timeout: Duration) -> Result<(), PgError>;

    /// Stops; `Ok` also when it was not running. Runs nothing else (callbacks are the caller's).
    async fn stop(&self, mode: StopMode, timeout: Duration) -> Result<(), PgError>;

    /// `pg_ctl promote -w`, onto a timeline numbered above `used`: the newest timeline the
    /// cluster is known to have used (DCS `history`, member keys). PostgreSQL takes one more
    /// than the newest timeline whose history file it can see, so a replica that never
    /// received another node's promotion would reuse that number, and two sibling timelines
    /// with one number look alike to streaming, to the divergence check and to pg_rewind: the
    /// node on the losing branch could never rejoin. So history files for the used timelines
    /// the node lacks are written first (content from `history`, the cluster's lines).
    async fn promote(
        &self,
        used: Timeline,
        history: &[crate::dcs::HistoryLine],
        timeout: Duration,
    ) -> Result<(), PgError>;

    /// Rewrites standby settings to follow `upstream` (a running replica is reloaded, since
    /// primary_conninfo is reloadable on PG ≥ 13).
    async fn follow(&self, upstream: Option<&Upstream>) -> Result<(), PgError>;

    /// `pg_ctl reload`, returning once the postmaster has re-read its files (bounded), so an
    /// observation taken after it reflects the reloaded configuration. No-op when stopped.
    async fn reload(&self) -> Result<(), PgError>;

    /// `CHECKPOINT` (after promotion, before a graceful demote).
    async fn checkpoint(&self) -> Result<(), PgError>;

    /// Decides whether the (stopped) local data diverged from `leader`'s timeline so that a
    /// pg_rewind is needed before following it.
    async fn needs_rewind(&self, leader: &Upstream) -> Result<bool, PgError>;

    /// Runs crash recovery if needed, then `pg_rewind --source-server` from `leader`. Data must
    /// be stopped.
    async fn rewind(&self, leader: &Upstream) -> Result<(), PgError>;

    /// Makes the physical slots on this (primary) instance exactly `wanted` (creates missing,
    /// drops unknown inactive physical slots not in `keep`).
    async fn sync_slots(&self, wanted: &[String], keep: &[String]) -> Result<(), PgError>;

    /// Sets `synchronous_standby_names` (ALTER SYSTEM + reload); "" clears it.
    async fn set_synchronous_standby_names(&self, value: &str) -> Result<(), PgError>;

    /// Timeline history of the local primary (the `.history` file of the current timeline),
    /// for the DCS `history` key.
    async fn timeline_history(&self) -> Result<Vec<crate::dcs::HistoryLine>, PgError>;
}
