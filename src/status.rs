//! What the HA loop publishes for the REST API (a [`watch`](tokio::sync::watch) snapshot, so
//! health checks never wait on PostgreSQL or the DCS) and the commands the API sends back to
//! the loop (restart, reinitialize, reload), each with a reply channel.

use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use serde_json::{Map, Value};
use tokio::sync::oneshot;

use crate::dcs::ClusterView;
use crate::pg::{PgState, PgStatus, Role};
use crate::types::MemberName;

/// Snapshot published by the HA loop after every cycle (and after state changes inside one).
#[derive(Debug, Clone)]
pub struct AgentStatus {
    pub scope: String,
    pub name: String,
    /// Agent-level role (what Patroni reports as `role`).
    pub role: Role,
    /// Agent-level PostgreSQL state (what Patroni reports as `state`).
    pub state: PgState,
    /// Raw observation of the local instance from the last cycle.
    pub pg: PgStatus,
    /// Last cluster view read from the DCS (kept when the DCS becomes unreachable).
    pub cluster: Option<Arc<ClusterView>>,
    /// Whether the last DCS read succeeded.
    pub dcs_ok: bool,
    /// Unix seconds of the last successful DCS read.
    pub dcs_last_seen: Option<i64>,
    /// We hold the leader lock until this instant (last successful renewal sent + ttl); `None`
    /// when we do not lead. `is_leader` = `now < leader_until`.
    pub leader_until: Option<Instant>,
    pub paused: bool,
    /// Effective tags (config tags, plus nosync while asking to leave sync duty).
    pub tags: Map<String, Value>,
    pub pending_restart: bool,
    pub pending_restart_reason: Option<Value>,
    pub scheduled_restart: Option<Value>,
    pub watchdog_failed: bool,
    /// Display of the last [`Decision`](crate::ha::Decision), logged each cycle.
    pub last_decision: String,
    /// Name of the long action in progress (e.g. "restart", "reinitialize"), if any.
    pub action_in_progress: Option<String>,
    /// When the loop last completed a cycle (for `/liveness`).
    pub last_cycle: Instant,
    pub ttl: u64,
    pub loop_wait: u64,
    pub updated_at: SystemTime,
    /// What the agent runs with (the `pgherd` object of `/patroni`).
    pub pgherd: PgherdStatus,
    /// The primary keeps running on DCS loss because every failsafe member accepted it
    /// (`/patroni`'s `failsafe_mode_is_active`).
    pub failsafe_active: bool,
}

/// A leader's failsafe announcement (`POST /failsafe`) as this node received it.
#[derive(Debug, Clone, PartialEq)]
pub struct FailsafeNotice {
    pub leader: MemberName,
    pub api_url: String,
    pub conn_url: String,
    pub received: tokio::time::Instant,
}

/// The last failsafe announcement, shared by the REST API (which records it) and the HA loop
/// (which, for `ttl` after it arrived, treats its sender as the leader and does not race).
#[derive(Debug, Clone, Default)]
pub struct FailsafeBoard(Arc<std::sync::Mutex<Option<FailsafeNotice>>>);

impl FailsafeBoard {
    pub fn record(&self, notice: FailsafeNotice) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = Some(notice);
    }

    /// The announcement if it arrived less than `ttl` before `now`.
    pub fn current(&self, now: tokio::time::Instant, ttl: Duration) -> Option<FailsafeNotice> {
        self.0
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
            .filter(|n| now.saturating_duration_since(n.received) < ttl)
    }

    pub fn clear(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
}

/// The agent's own account of its configuration, published as `/patroni`'s `pgherd` object
/// (see `api::health`): serialised by the agent and read back by the CLI's agent client as
/// this same type; absent values are left out, not `null`.
#[derive(Debug, Clone, Default, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct PgherdStatus {
    /// sha256 of the config file bytes in force (read at start-up or at the last successful
    /// reload).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_sha256: Option<String>,
    /// Why the last reload of the config file was refused; `None` when it succeeded.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub config_error: Option<String>,
    /// Mod revision of the DCS `config` key whose content is applied to PostgreSQL's files and
    /// in force (reloaded) as of the PostgreSQL observation in the same status.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dcs_config_revision: Option<i64>,
    /// Why the DCS `config` last given to PostgreSQL was not applied (e.g. its `pg_hba` was
    /// rejected by PostgreSQL); `None` when it applied.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dcs_config_error: Option<String>,
    /// Why the last bootstrap attempt (initdb, start, post_bootstrap) of this node failed;
    /// cleared once a bootstrap succeeds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bootstrap_error: Option<String>,
    /// Why the last clone (pg_basebackup of a new replica, reinitialize) of this node failed;
    /// cleared once a clone succeeds.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub clone_error: Option<String>,
}

impl AgentStatus {
    pub fn is_leader(&self, now: Instant) -> bool {
        self.leader_until.is_some_and(|t| now < t)
    }
}

/// Body of `POST /restart`, validated by the API.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RestartRequest {
    /// ISO 8601 with timezone; `None` = now.
    pub schedule: Option<String>,
    pub role: Option<String>,
    pub postgres_version: Option<String>,
    pub timeout: Option<f64>,
    pub restart_pending: Option<bool>,
}

/// Outcome of a command: HTTP status code and the plain-text (or JSON) body to send.
#[derive(Debug, Clone, PartialEq)]
pub struct CommandReply {
    pub code: u16,
    pub body: String,
}

impl CommandReply {
    pub fn new(code: u16, body: impl Into<String>) -> Self {
        CommandReply {
            code,
            body: body.into(),
        }
    }
}

/// Requests from the REST API that need the HA loop to act. The loop answers each through its
/// `reply` channel with Patroni's status code and message.
#[derive(Debug)]
pub enum Command {
    /// `POST /restart`: immediate (waits for the outcome) or scheduled.
    Restart {
        req: RestartRequest,
        reply: oneshot::Sender<CommandReply>,
    },
    /// `DELETE /restart`.
    CancelScheduledRestart {
        reply: oneshot::Sender<CommandReply>,
    },
    /// `POST /reinitialize`.
    Reinitialize {
        force: bool,
        from_leader: bool,
        reply: oneshot::Sender<CommandReply>,
    },
    /// `POST /reload` (and SIGHUP): re-read the local config file and put it in force, or
    /// refuse it whole (reply 409, reason in `PgherdStatus::config_error`).
    Reload {
        reply: oneshot::Sender<CommandReply>,
    },
    /// Run a cycle now (after the API wrote the DCS, e.g. PATCH /config or a switchover).
    Wakeup,
}
