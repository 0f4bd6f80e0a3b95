//! The distributed configuration store: the one trait through which the agent (and the REST
//! API) reads and writes cluster state, plus its implementations.
//!
//! - [`model`]: Patroni's key layout and JSON values, and the [`ClusterView`] snapshot.
//! - `etcd`: the real implementation on etcd v3 (etcd-client, native gRPC; same data model as
//!   the gRPC gateway patronictl uses).
//! - `memory`: an in-memory fake with leases and a controllable clock, for unit tests and the
//!   multi-agent simulation only (compiled for tests and with the `testing` feature).

pub mod etcd;
#[cfg(any(test, feature = "testing"))]
pub mod memory;
pub mod model;

use std::collections::BTreeMap;
use std::time::Duration;

use async_trait::async_trait;

pub use model::*;

use crate::types::{LeaseId, MemberName, Revision};

/// Why a DCS call failed. Callers branch on this: `Unavailable` means "the DCS cannot be
/// reached within retry_timeout" (a leader must demote before its lease can lapse), the others
/// are answers from a working DCS.
#[derive(Debug, thiserror::Error)]
pub enum DcsError {
    #[error("dcs unavailable: {0}")]
    Unavailable(String),
    /// Our lease is gone (expired or revoked); a new one must be granted.
    #[error("lease expired or not found")]
    LeaseNotFound,
    #[error("dcs error: {0}")]
    Other(String),
}

/// Contract of a DCS backend. All keys are relative to `/<namespace>/<scope>/`.
///
/// Every method must return within the backend's configured `retry_timeout` (it may retry
/// internally across endpoints inside that budget) and report a failure to reach the store as
/// [`DcsError::Unavailable`]. Methods that take an expected [`Revision`] are compare-and-swap on
/// the key's `mod_revision` and return `Ok(false)` when the comparison fails.
///
/// Each agent holds exactly one lease (TTL = `ttl` seconds). Its member key and, while it
/// leads, the `leader` key are attached to that lease, so both vanish at most `ttl` after the
/// last successful keepalive.
#[async_trait]
pub trait Dcs: Send + Sync {
    /// One linearizable read of every key under the cluster prefix.
    async fn load(&self) -> Result<ClusterView, DcsError>;

    /// Makes sure this agent holds a live lease with the given TTL, granting a new one when there
    /// is none, it expired, or the TTL changed. Returns the lease in use.
    async fn ensure_lease(&self, ttl: Duration) -> Result<LeaseId, DcsError>;

    /// Refreshes our lease once. `Err(LeaseNotFound)` when etcd says it is gone. A success
    /// means every key on the lease lives at least `ttl` from the moment this call was *sent*.
    async fn keepalive(&self) -> Result<(), DcsError>;

    /// Writes `members/<name>` on our lease (skips the write when unchanged and the lease is the
    /// same).
    async fn touch_member(&self, name: &MemberName, data: &MemberData) -> Result<(), DcsError>;

    /// Creates `leader` = `name` on our lease only if the key does not exist (create-only txn).
    /// `Ok(false)` when another holder exists.
    async fn acquire_leader(&self, name: &MemberName) -> Result<bool, DcsError>;

    /// Renews leadership: refreshes the lease; if the `leader` key still names us but sits on an
    /// old lease, re-attaches it to the current one (VALUE == name txn), and re-creates it if it
    /// is gone. `Ok(false)` when the key now names somebody else (leadership lost).
    async fn update_leader(&self, name: &MemberName) -> Result<bool, DcsError>;

    /// Unconditionally writes `leader` = `name` on our lease (after bootstrap).
    async fn take_leader(&self, name: &MemberName) -> Result<(), DcsError>;

    /// Deletes `leader` only if its value is `name` (VALUE == name txn). `Ok(false)` if it was
    /// not ours.
    async fn release_leader(&self, name: &MemberName) -> Result<bool, DcsError>;

    /// Bootstrap race: creates `initialize` = "" only if absent. `Ok(true)` = we won.
    async fn race_initialize(&self) -> Result<bool, DcsError>;

    /// Plain put of `initialize` = sysid.
    async fn set_initialize(&self, sysid: &str) -> Result<(), DcsError>;

    /// Deletes `initialize` (a failed bootstrap gives up its claim).
    async fn delete_initialize(&self) -> Result<(), DcsError>;

    /// Writes `config`; CAS on `expected` when given.
    async fn set_config(
        &self,
        config: &DynamicConfig,
        expected: Option<Revision>,
    ) -> Result<bool, DcsError>;

    /// Writes `failover` (`{}` clears it); CAS on `expected` when given.
    async fn set_failover(
        &self,
        failover: &Failover,
        expected: Option<Revision>,
    ) -> Result<bool, DcsError>;

    /// Writes `sync`, or deletes it when `None`; CAS on `expected` when given.
    async fn set_sync(
        &self,
        sync: Option<&SyncState>,
        expected: Option<Revision>,
    ) -> Result<bool, DcsError>;

    /// Plain put of `status`.
    async fn set_status(&self, status: &Status) -> Result<(), DcsError>;

    /// Plain put of `history`.
    async fn set_history(&self, history: &[HistoryLine]) -> Result<(), DcsError>;

    /// Plain put of `failsafe` (`{"member": "api_url", ...}`), written by the leader while
    /// `failsafe_mode` is on.
    async fn set_failsafe(&self, members: &BTreeMap<MemberName, String>) -> Result<(), DcsError>;

    /// Switches to a new endpoint list (a reloaded config): later calls and the change watch
    /// use it. Our lease is an etcd object, not a connection, so it — and the member and
    /// leader keys on it — survives the switch (as long as the new list reaches the same etcd
    /// cluster). Stores without endpoints (the in-memory fake) ignore it.
    fn set_endpoints(&self, endpoints: Vec<String>) -> Result<(), DcsError> {
        let _ = endpoints;
        Ok(())
    }

    /// Deletes every key of the cluster (`patronictl remove`).
    async fn delete_cluster(&self) -> Result<(), DcsError>;

    /// Waits until something under the cluster prefix changes after `after_revision`, or until
    /// `timeout` passes. Returns `true` when woken by a change. Must wake within a few
    /// milliseconds of the change (a watch, not polling): this is what lets a replica start its
    /// leader race ~immediately after the leader key expires.
    async fn wait_for_change(&self, after_revision: i64, timeout: Duration) -> bool;
}
