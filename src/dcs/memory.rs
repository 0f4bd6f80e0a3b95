//! An in-memory DCS with etcd semantics, for unit tests and the multi-agent simulation only
//! (a test double: production code never constructs it).
//!
//! It owns one shared store ([`MemoryStore`]) and hands out per-agent handles
//! ([`MemoryStore::handle`] → [`MemoryDcs`], which implements [`Dcs`]). What it reproduces from
//! etcd, because the HA core's safety argument rests on it:
//!
//! - one global revision, incremented by every write transaction (a lease expiry that deletes
//!   several keys is one revision); every key keeps its create and mod revision, so
//!   create-only (`create_revision == 0`) and CAS (`mod_revision == expected`) txns behave as on
//!   etcd;
//! - leases with a TTL measured on [`tokio::time::Instant`], so `#[tokio::test(start_paused =
//!   true)]` drives expiry deterministically. Expired leases delete their keys lazily on every
//!   access *and* from a reaper task that sleeps until the next expiry, so a watcher is woken
//!   when the leader key expires even if nobody touches the store;
//! - `wait_for_change` is woken by a `watch` channel carrying the revision (a watch, not polling);
//! - a per-member network partition switch: while partitioned, every call of that member's
//!   handles sleeps `retry_timeout` then fails with [`DcsError::Unavailable`] — exactly the
//!   worst case the real backend is allowed by the [`Dcs`] contract.
//!
//! - the view is decoded by [`super::model::view_from_kvs`], the decoder the etcd backend
//!   uses, so the simulation runs production's reading of the keys (malformed values included).
//!
//! It also keeps a little bookkeeping that only the simulation's invariant checkers need
//! (every lease a member was granted, the history of `status` writes).
//!
//! Past 800 lines only because of the contract tests at the bottom (the code is ~740).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard, Weak};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::{Notify, watch};
use tokio::time::Instant;

use super::{
    ClusterView, Dcs, DcsError, DynamicConfig, Failover, HistoryLine, MemberData, Status,
    SyncState, failsafe_to_json, history_to_json, view_from_kvs,
};
use crate::types::{LeaseId, MemberName, Revision};

/// Key names (re-exported from [`super::model`], the one place they are defined).
pub use super::model::{
    KEY_CONFIG, KEY_FAILOVER, KEY_FAILSAFE, KEY_HISTORY, KEY_INITIALIZE, KEY_LEADER,
    KEY_LEGACY_OPTIME, KEY_STATUS, KEY_SYNC, MEMBERS_DIR,
};

/// One stored key, as etcd keeps it.
#[derive(Debug, Clone, PartialEq)]
pub struct KeyValue {
    pub value: String,
    pub lease: Option<LeaseId>,
    pub create_revision: i64,
    pub mod_revision: i64,
}

/// A lease as the store sees it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LeaseInfo {
    pub id: LeaseId,
    pub ttl: Duration,
    /// The lease (and every key on it) is gone at this instant unless refreshed before.
    pub expires_at: Instant,
}

#[derive(Debug)]
struct LeaseEntry {
    owner: String,
    info: LeaseInfo,
}

#[derive(Debug, Default)]
struct StoreState {
    revision: i64,
    kv: BTreeMap<String, KeyValue>,
    leases: BTreeMap<i64, LeaseEntry>,
    next_lease: i64,
    /// Members whose handles cannot reach the store.
    partitioned: BTreeSet<String>,
    /// Latest lease granted to each member (kept after expiry, for invariant checks).
    last_lease: BTreeMap<String, LeaseInfo>,
    /// Every `status` write: when, and the optime written.
    status_log: Vec<(Instant, u64)>,
    /// Bumped whenever a lease deadline moves (grant, refresh, removal): the reaper re-plans.
    lease_epoch: u64,
}

impl StoreState {
    /// Drops every lease whose TTL has run out, deleting its keys in a single revision (as
    /// etcd's lessor does). Returns whether the key space changed.
    fn reap(&mut self, now: Instant) -> bool {
        let expired: Vec<i64> = self
            .leases
            .iter()
            .filter(|(_, l)| l.info.expires_at <= now)
            .map(|(id, _)| *id)
            .collect();
        if expired.is_empty() {
            return false;
        }
        for id in &expired {
            self.leases.remove(id);
        }
        self.lease_epoch += 1;
        let before = self.kv.len();
        self.kv
            .retain(|_, v| !v.lease.is_some_and(|l| expired.contains(&l.0)));
        if self.kv.len() != before {
            self.revision += 1;
            true
        } else {
            false
        }
    }

    fn next_expiry(&self) -> Option<Instant> {
        self.leases.values().map(|l| l.info.expires_at).min()
    }

    fn lease_alive(&self, id: i64) -> bool {
        self.leases.contains_key(&id)
    }

    /// One write txn: bumps the revision and stores the key.
    fn put(&mut self, key: &str, value: String, lease: Option<i64>) {
        self.revision += 1;
        let rev = self.revision;
        let create_revision = self.kv.get(key).map(|k| k.create_revision).unwrap_or(rev);
        self.kv.insert(
            key.to_string(),
            KeyValue {
                value,
                lease: lease.map(LeaseId),
                create_revision,
                mod_revision: rev,
            },
        );
    }

    fn delete(&mut self, key: &str) -> bool {
        if self.kv.remove(key).is_some() {
            self.revision += 1;
            true
        } else {
            false
        }
    }

    /// etcd's `mod_revision` compare: a missing key has mod_revision 0.
    fn mod_revision_is(&self, key: &str, expected: Option<Revision>) -> bool {
        match expected {
            None => true,
            Some(Revision(r)) => self.kv.get(key).map(|k| k.mod_revision).unwrap_or(0) == r,
        }
    }

    fn grant(&mut self, owner: &str, ttl: Duration, now: Instant) -> LeaseInfo {
        self.next_lease += 1;
        let info = LeaseInfo {
            id: LeaseId(self.next_lease),
            ttl,
            expires_at: now + ttl,
        };
        self.leases.insert(
            self.next_lease,
            LeaseEntry {
                owner: owner.to_string(),
                info,
            },
        );
        self.lease_epoch += 1;
        self.last_lease.insert(owner.to_string(), info);
        info
    }

    fn refresh(&mut self, id: i64, now: Instant) -> Option<LeaseInfo> {
        let entry = self.leases.get_mut(&id)?;
        entry.info.expires_at = now + entry.info.ttl;
        let info = entry.info;
        self.lease_epoch += 1;
        let owner = entry.owner.clone();
        if self.last_lease.get(&owner).is_some_and(|l| l.id.0 == id) {
            self.last_lease.insert(owner, info);
        }
        Some(info)
    }

    /// Decodes the store with the same decoder the etcd backend uses.
    fn view(&self) -> ClusterView {
        view_from_kvs(
            self.kv
                .iter()
                .map(|(k, kv)| (k.as_str(), kv.value.as_str(), kv.mod_revision, kv.lease)),
            self.revision,
        )
    }
}

struct Shared {
    state: Mutex<StoreState>,
    revision_tx: watch::Sender<i64>,
    /// Pokes the reaper when a lease deadline moved.
    lease_changed: Arc<Notify>,
    retry_timeout: Duration,
}

impl Drop for Shared {
    fn drop(&mut self) {
        // Lets the reaper notice the store is gone and exit.
        self.lease_changed.notify_one();
    }
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, StoreState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the state after reaping expired leases, then publishes the revision so
    /// watchers wake up if anything changed.
    fn with<R>(&self, f: impl FnOnce(&mut StoreState, Instant) -> R) -> R {
        let now = Instant::now();
        let (out, rev, leases_moved) = {
            let mut st = self.lock();
            let epoch = st.lease_epoch;
            st.reap(now);
            let out = f(&mut st, now);
            (out, st.revision, st.lease_epoch != epoch)
        };
        self.revision_tx.send_if_modified(|r| {
            if *r != rev {
                *r = rev;
                true
            } else {
                false
            }
        });
        if leases_moved {
            self.lease_changed.notify_one();
        }
        out
    }
}

/// The shared in-memory store: one per simulated cluster. Cheap to clone.
#[derive(Clone)]
pub struct MemoryStore {
    shared: Arc<Shared>,
}

impl MemoryStore {
    /// A fresh, empty store. `retry_timeout` is how long a partitioned handle's calls take
    /// before failing (the real backend's worst case, see the [`Dcs`] contract). Must be called
    /// inside a tokio runtime: it spawns the lease reaper.
    pub fn new(retry_timeout: Duration) -> MemoryStore {
        let (revision_tx, _) = watch::channel(0);
        let lease_changed = Arc::new(Notify::new());
        let shared = Arc::new(Shared {
            state: Mutex::new(StoreState::default()),
            revision_tx,
            lease_changed: lease_changed.clone(),
            retry_timeout,
        });
        spawn_reaper(Arc::downgrade(&shared), lease_changed);
        MemoryStore { shared }
    }

    /// A new agent's view of the store: no lease yet, as a freshly started agent.
    pub fn handle(&self, agent_name: impl Into<String>) -> MemoryDcs {
        MemoryDcs {
            shared: self.shared.clone(),
            name: agent_name.into(),
            local: Mutex::new(HandleState::default()),
        }
    }

    /// Cuts (or heals) the member's link to the store; affects all its handles, present and
    /// future (a restarted agent stays partitioned).
    pub fn set_partitioned(&self, agent_name: &str, partitioned: bool) {
        let mut st = self.shared.lock();
        if partitioned {
            st.partitioned.insert(agent_name.to_string());
        } else {
            st.partitioned.remove(agent_name);
        }
    }

    pub fn is_partitioned(&self, agent_name: &str) -> bool {
        self.shared.lock().partitioned.contains(agent_name)
    }

    pub fn retry_timeout(&self) -> Duration {
        self.shared.retry_timeout
    }

    /// Current revision (after reaping expired leases).
    pub fn revision(&self) -> i64 {
        self.shared.with(|st, _| st.revision)
    }

    /// The cluster as a linearizable read would see it now, ignoring partitions.
    pub fn view(&self) -> ClusterView {
        self.shared.with(|st, _| st.view())
    }

    /// Raw key (relative path, e.g. `"leader"`, `"members/n1"`), ignoring partitions.
    pub fn get(&self, key: &str) -> Option<KeyValue> {
        self.shared.with(|st, _| st.kv.get(key).cloned())
    }

    /// Plain put without a lease, as an operator (patronictl) would do.
    pub fn put(&self, key: &str, value: &str) {
        self.shared.with(|st, now| {
            if key == KEY_STATUS {
                st.status_log.push((now, Status::parse(value).optime));
            }
            st.put(key, value.to_string(), None)
        })
    }

    /// Plain delete, as an operator would do.
    pub fn delete(&self, key: &str) -> bool {
        self.shared.with(|st, _| st.delete(key))
    }

    /// The current leader key holder and its lease (after reaping).
    pub fn leader(&self) -> Option<(MemberName, Option<LeaseId>)> {
        self.shared.with(|st, _| {
            st.kv
                .get(KEY_LEADER)
                .map(|k| (MemberName::new(k.value.clone()), k.lease))
        })
    }

    /// A live lease by id.
    pub fn lease(&self, id: LeaseId) -> Option<LeaseInfo> {
        self.shared
            .with(|st, _| st.leases.get(&id.0).map(|l| l.info))
    }

    /// The latest lease granted to `agent_name`, whether or not it is still alive (compare
    /// `expires_at` with `Instant::now()`).
    pub fn last_lease_of(&self, agent_name: &str) -> Option<LeaseInfo> {
        self.shared
            .with(|st, _| st.last_lease.get(agent_name).copied())
    }

    /// Whether `agent_name` owns at least one live lease right now.
    pub fn has_live_lease(&self, agent_name: &str) -> bool {
        self.shared
            .with(|st, _| st.leases.values().any(|l| l.owner == agent_name))
    }

    /// The optime of the last `status` write at or before `at` (0 when none).
    pub fn status_optime_at(&self, at: Instant) -> u64 {
        self.shared.with(|st, _| {
            st.status_log
                .iter()
                .rev()
                .find(|(t, _)| *t <= at)
                .map(|(_, o)| *o)
                .unwrap_or(0)
        })
    }

    /// Revokes a lease now (deleting its keys), as `etcdctl lease revoke` would.
    pub fn revoke(&self, id: LeaseId) {
        self.shared.with(|st, _| {
            if st.leases.remove(&id.0).is_some() {
                st.lease_epoch += 1;
                let before = st.kv.len();
                st.kv.retain(|_, v| v.lease != Some(id));
                if st.kv.len() != before {
                    st.revision += 1;
                }
            }
        })
    }
}

/// Sleeps until the earliest lease deadline (or until a deadline moves) and reaps, so that an
/// expiry wakes `wait_for_change` watchers without anyone touching the store. Holds only a weak
/// reference: it ends once the store is dropped.
fn spawn_reaper(weak: Weak<Shared>, poke: Arc<Notify>) {
    tokio::spawn(async move {
        loop {
            let next = match weak.upgrade() {
                Some(shared) => shared.lock().next_expiry(),
                None => return,
            };
            match next {
                Some(at) => tokio::select! {
                    _ = tokio::time::sleep_until(at) => {}
                    _ = poke.notified() => {}
                },
                None => poke.notified().await,
            }
            match weak.upgrade() {
                Some(shared) => {
                    // `with` reaps and publishes the new revision.
                    shared.with(|_, _| ());
                }
                None => return,
            }
        }
    });
}

#[derive(Debug, Default)]
struct HandleState {
    lease: Option<i64>,
    /// TTL of the last `ensure_lease`; `update_leader` re-grants with it after an expiry.
    ttl: Option<Duration>,
    /// Last member value written and the lease it went on (skip unchanged writes).
    last_member: Option<(MemberData, i64)>,
}

/// One agent's connection to a [`MemoryStore`]. Implements [`Dcs`].
pub struct MemoryDcs {
    shared: Arc<Shared>,
    name: String,
    local: Mutex<HandleState>,
}

impl MemoryDcs {
    /// The store this handle talks to.
    pub fn store(&self) -> MemoryStore {
        MemoryStore {
            shared: self.shared.clone(),
        }
    }

    /// Cuts (or heals) this agent's link to the store (see [`MemoryStore::set_partitioned`]).
    pub fn set_partitioned(&self, partitioned: bool) {
        self.store().set_partitioned(&self.name, partitioned)
    }

    /// The lease this handle currently uses, if any (it may have expired meanwhile).
    pub fn current_lease(&self) -> Option<LeaseId> {
        self.local().lease.map(LeaseId)
    }

    fn local(&self) -> MutexGuard<'_, HandleState> {
        self.local.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The partition gate every call goes through: a cut link costs the whole retry budget and
    /// then fails, the slowest answer the [`Dcs`] contract allows.
    async fn reach(&self) -> Result<(), DcsError> {
        if self.shared.lock().partitioned.contains(&self.name) {
            tokio::time::sleep(self.shared.retry_timeout).await;
            return Err(DcsError::Unavailable(format!(
                "{} is partitioned from the dcs (simulated)",
                self.name
            )));
        }
        Ok(())
    }

    /// Our lease if it is still alive; forgets it (and reports `LeaseNotFound`) otherwise.
    fn live_lease(&self, st: &StoreState) -> Result<i64, DcsError> {
        let mut local = self.local();
        match local.lease {
            Some(id) if st.lease_alive(id) => Ok(id),
            _ => {
                local.lease = None;
                Err(DcsError::LeaseNotFound)
            }
        }
    }
}

#[async_trait]
impl Dcs for MemoryDcs {
    async fn load(&self) -> Result<ClusterView, DcsError> {
        self.reach().await?;
        Ok(self.shared.with(|st, _| st.view()))
    }

    async fn ensure_lease(&self, ttl: Duration) -> Result<LeaseId, DcsError> {
        self.reach().await?;
        self.shared.with(|st, now| {
            let mut local = self.local();
            if let Some(id) = local.lease
                && st.lease_alive(id)
                && local.ttl == Some(ttl)
            {
                return Ok(LeaseId(id));
            }
            // None, expired, or a TTL change: a new grant (an old lease with another TTL is
            // simply abandoned and expires on its own, as Patroni's set_ttl does).
            let info = st.grant(&self.name, ttl, now);
            local.lease = Some(info.id.0);
            local.ttl = Some(ttl);
            Ok(info.id)
        })
    }

    async fn keepalive(&self) -> Result<(), DcsError> {
        self.reach().await?;
        self.shared.with(|st, now| {
            let id = self.live_lease(st)?;
            st.refresh(id, now)
                .map(|_| ())
                .ok_or(DcsError::LeaseNotFound)
        })
    }

    async fn touch_member(&self, name: &MemberName, data: &MemberData) -> Result<(), DcsError> {
        self.reach().await?;
        self.shared.with(|st, _| {
            // etcd refuses a put on an unknown lease ("requested lease not found").
            let id = self.live_lease(st)?;
            let key = format!("{MEMBERS_DIR}{}", name.as_str());
            let mut local = self.local();
            let unchanged = local
                .last_member
                .as_ref()
                .is_some_and(|(d, l)| d == data && *l == id)
                && st
                    .kv
                    .get(&key)
                    .is_some_and(|k| k.lease == Some(LeaseId(id)));
            if !unchanged {
                let json = serde_json::to_string(data)
                    .map_err(|e| DcsError::Other(format!("encoding member key: {e}")))?;
                st.put(&key, json, Some(id));
                local.last_member = Some((data.clone(), id));
            }
            Ok(())
        })
    }

    async fn acquire_leader(&self, name: &MemberName) -> Result<bool, DcsError> {
        self.reach().await?;
        self.shared.with(|st, _| {
            let id = self.live_lease(st)?;
            // Create-only txn: compare create_revision(leader) == 0.
            if st.kv.contains_key(KEY_LEADER) {
                return Ok(false);
            }
            st.put(KEY_LEADER, name.as_str().to_string(), Some(id));
            Ok(true)
        })
    }

    async fn update_leader(&self, name: &MemberName) -> Result<bool, DcsError> {
        self.reach().await?;
        self.shared.with(|st, now| {
            // Refresh the lease; if it is gone, grant a new one with the last TTL (Patroni's
            // `_update_leader` after a LeaseNotFound).
            let id = match self.live_lease(st) {
                Ok(id) => {
                    st.refresh(id, now);
                    id
                }
                Err(_) => {
                    let mut local = self.local();
                    let ttl = local.ttl.ok_or(DcsError::LeaseNotFound)?;
                    let info = st.grant(&self.name, ttl, now);
                    local.lease = Some(info.id.0);
                    info.id.0
                }
            };
            match st.kv.get(KEY_LEADER) {
                // Still ours on our lease: the keepalive was the renewal.
                Some(k) if k.value == name.as_str() && k.lease == Some(LeaseId(id)) => Ok(true),
                // Ours but on an old lease: VALUE == name txn re-attaches it.
                Some(k) if k.value == name.as_str() => {
                    st.put(KEY_LEADER, name.as_str().to_string(), Some(id));
                    Ok(true)
                }
                Some(_) => Ok(false),
                // Gone: the failure branch re-creates it (CREATE == 0).
                None => {
                    st.put(KEY_LEADER, name.as_str().to_string(), Some(id));
                    Ok(true)
                }
            }
        })
    }

    async fn take_leader(&self, name: &MemberName) -> Result<(), DcsError> {
        self.reach().await?;
        self.shared.with(|st, _| {
            let id = self.live_lease(st)?;
            st.put(KEY_LEADER, name.as_str().to_string(), Some(id));
            Ok(())
        })
    }

    async fn release_leader(&self, name: &MemberName) -> Result<bool, DcsError> {
        self.reach().await?;
        self.shared.with(|st, _| {
            if st
                .kv
                .get(KEY_LEADER)
                .is_some_and(|k| k.value == name.as_str())
            {
                st.delete(KEY_LEADER);
                Ok(true)
            } else {
                Ok(false)
            }
        })
    }

    async fn race_initialize(&self) -> Result<bool, DcsError> {
        self.reach().await?;
        self.shared.with(|st, _| {
            if st.kv.contains_key(KEY_INITIALIZE) {
                return Ok(false);
            }
            st.put(KEY_INITIALIZE, String::new(), None);
            Ok(true)
        })
    }

    async fn set_initialize(&self, sysid: &str) -> Result<(), DcsError> {
        self.reach().await?;
        self.shared
            .with(|st, _| st.put(KEY_INITIALIZE, sysid.to_string(), None));
        Ok(())
    }

    async fn delete_initialize(&self) -> Result<(), DcsError> {
        self.reach().await?;
        self.shared.with(|st, _| st.delete(KEY_INITIALIZE));
        Ok(())
    }

    async fn set_config(
        &self,
        config: &DynamicConfig,
        expected: Option<Revision>,
    ) -> Result<bool, DcsError> {
        self.reach().await?;
        Ok(self.shared.with(|st, _| {
            if !st.mod_revision_is(KEY_CONFIG, expected) {
                return false;
            }
            st.put(KEY_CONFIG, config.to_json(), None);
            true
        }))
    }

    async fn set_failover(
        &self,
        failover: &Failover,
        expected: Option<Revision>,
    ) -> Result<bool, DcsError> {
        self.reach().await?;
        let json = serde_json::to_string(failover)
            .map_err(|e| DcsError::Other(format!("encoding failover key: {e}")))?;
        Ok(self.shared.with(|st, _| {
            if !st.mod_revision_is(KEY_FAILOVER, expected) {
                return false;
            }
            st.put(KEY_FAILOVER, json, None);
            true
        }))
    }

    async fn set_sync(
        &self,
        sync: Option<&SyncState>,
        expected: Option<Revision>,
    ) -> Result<bool, DcsError> {
        self.reach().await?;
        let json = match sync {
            Some(s) => Some(
                serde_json::to_string(s)
                    .map_err(|e| DcsError::Other(format!("encoding sync key: {e}")))?,
            ),
            None => None,
        };
        Ok(self.shared.with(|st, _| {
            if !st.mod_revision_is(KEY_SYNC, expected) {
                return false;
            }
            match json {
                Some(j) => st.put(KEY_SYNC, j, None),
                None => {
                    st.delete(KEY_SYNC);
                }
            }
            true
        }))
    }

    async fn set_status(&self, status: &Status) -> Result<(), DcsError> {
        self.reach().await?;
        let json = serde_json::to_string(status)
            .map_err(|e| DcsError::Other(format!("encoding status key: {e}")))?;
        self.shared.with(|st, now| {
            st.status_log.push((now, status.optime));
            st.put(KEY_STATUS, json, None)
        });
        Ok(())
    }

    async fn set_history(&self, history: &[HistoryLine]) -> Result<(), DcsError> {
        self.reach().await?;
        self.shared
            .with(|st, _| st.put(KEY_HISTORY, history_to_json(history), None));
        Ok(())
    }

    async fn set_failsafe(&self, members: &BTreeMap<MemberName, String>) -> Result<(), DcsError> {
        self.reach().await?;
        self.shared
            .with(|st, _| st.put(KEY_FAILSAFE, failsafe_to_json(members), None));
        Ok(())
    }

    async fn delete_cluster(&self) -> Result<(), DcsError> {
        self.reach().await?;
        self.shared.with(|st, _| {
            // One deleterange = one revision.
            if !st.kv.is_empty() {
                st.kv.clear();
                st.revision += 1;
            }
        });
        Ok(())
    }

    async fn wait_for_change(&self, after_revision: i64, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        if self.shared.lock().partitioned.contains(&self.name) {
            // A cut watch never fires; the caller just naps.
            tokio::time::sleep_until(deadline).await;
            return false;
        }
        let mut rx = self.shared.revision_tx.subscribe();
        // Reap first so an already-expired leader key counts as a change.
        if self.shared.with(|st, _| st.revision) > after_revision {
            return true;
        }
        loop {
            if *rx.borrow_and_update() > after_revision {
                return true;
            }
            match tokio::time::timeout_at(deadline, rx.changed()).await {
                Ok(Ok(())) => continue,
                _ => return false,
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TTL: Duration = Duration::from_secs(30);

    fn name(s: &str) -> MemberName {
        MemberName::new(s)
    }

    fn member(role: &str) -> MemberData {
        MemberData {
            role: role.into(),
            state: "running".into(),
            ..Default::default()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn create_only_leader_race_has_one_winner() {
        let store = MemoryStore::new(Duration::from_secs(10));
        let a = store.handle("a");
        let b = store.handle("b");
        a.ensure_lease(TTL).await.unwrap();
        b.ensure_lease(TTL).await.unwrap();
        let (na, nb) = (name("a"), name("b"));
        let (ra, rb) = tokio::join!(a.acquire_leader(&na), b.acquire_leader(&nb));
        assert!(ra.unwrap() ^ rb.unwrap(), "exactly one acquire must win");
    }

    #[tokio::test(start_paused = true)]
    async fn initialize_race_is_create_only() {
        let store = MemoryStore::new(Duration::from_secs(10));
        let a = store.handle("a");
        let b = store.handle("b");
        assert!(a.race_initialize().await.unwrap());
        assert!(!b.race_initialize().await.unwrap());
        a.set_initialize("7000000000000000001").await.unwrap();
        assert_eq!(
            a.load().await.unwrap().initialize.as_deref(),
            Some("7000000000000000001")
        );
        a.delete_initialize().await.unwrap();
        assert!(b.race_initialize().await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn acquire_without_lease_is_lease_not_found() {
        let store = MemoryStore::new(Duration::from_secs(10));
        let a = store.handle("a");
        assert!(matches!(
            a.acquire_leader(&name("a")).await,
            Err(DcsError::LeaseNotFound)
        ));
        assert!(matches!(a.keepalive().await, Err(DcsError::LeaseNotFound)));
    }

    #[tokio::test(start_paused = true)]
    async fn cas_on_mod_revision_rejects_stale_writers() {
        let store = MemoryStore::new(Duration::from_secs(10));
        let a = store.handle("a");
        let f = Failover {
            leader: Some("a".into()),
            member: Some("b".into()),
            scheduled_at: None,
        };
        // Revision 0 = "must not exist".
        assert!(a.set_failover(&f, Some(Revision(0))).await.unwrap());
        assert!(!a.set_failover(&f, Some(Revision(0))).await.unwrap());
        let rev = a.load().await.unwrap().failover.unwrap().1;
        assert!(
            a.set_failover(&Failover::default(), Some(rev))
                .await
                .unwrap()
        );
        assert!(
            !a.set_failover(&f, Some(rev)).await.unwrap(),
            "stale revision must fail"
        );
        assert!(a.load().await.unwrap().failover_request().is_none());

        let cfg = DynamicConfig::parse(r#"{"ttl":30}"#).unwrap();
        assert!(a.set_config(&cfg, None).await.unwrap());
        let rev = a.load().await.unwrap().config.unwrap().1;
        assert!(a.set_config(&cfg, Some(rev)).await.unwrap());
        assert!(!a.set_config(&cfg, Some(rev)).await.unwrap());

        let s = SyncState {
            leader: Some("a".into()),
            quorum: 0,
            sync_standby: Some("b".into()),
        };
        assert!(a.set_sync(Some(&s), None).await.unwrap());
        let rev = a.load().await.unwrap().sync.unwrap().1;
        assert!(!a.set_sync(None, Some(Revision(rev.0 - 1))).await.unwrap());
        assert!(a.set_sync(None, Some(rev)).await.unwrap());
        assert!(a.load().await.unwrap().sync.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn every_write_bumps_the_revision_and_unchanged_member_writes_are_skipped() {
        let store = MemoryStore::new(Duration::from_secs(10));
        let a = store.handle("a");
        a.ensure_lease(TTL).await.unwrap();
        let r0 = store.revision();
        a.touch_member(&name("a"), &member("replica"))
            .await
            .unwrap();
        assert_eq!(store.revision(), r0 + 1);
        a.touch_member(&name("a"), &member("replica"))
            .await
            .unwrap();
        assert_eq!(
            store.revision(),
            r0 + 1,
            "unchanged member write is skipped"
        );
        a.touch_member(&name("a"), &member("primary"))
            .await
            .unwrap();
        assert_eq!(store.revision(), r0 + 2);
        a.set_status(&Status {
            optime: 5,
            ..Default::default()
        })
        .await
        .unwrap();
        assert_eq!(store.revision(), r0 + 3);
        let view = a.load().await.unwrap();
        assert_eq!(view.revision, r0 + 3);
        assert_eq!(view.members[&name("a")].data.role, "primary");
        assert_eq!(view.status.optime, 5);
    }

    #[tokio::test(start_paused = true)]
    async fn lease_expiry_removes_member_and_leader_keys() {
        let store = MemoryStore::new(Duration::from_secs(10));
        let a = store.handle("a");
        let b = store.handle("b");
        a.ensure_lease(TTL).await.unwrap();
        a.touch_member(&name("a"), &member("primary"))
            .await
            .unwrap();
        assert!(a.acquire_leader(&name("a")).await.unwrap());

        tokio::time::advance(TTL - Duration::from_secs(1)).await;
        a.keepalive().await.unwrap();
        tokio::time::advance(TTL - Duration::from_secs(1)).await;
        let view = b.load().await.unwrap();
        assert!(view.leader.is_some(), "keepalive extended the lease");

        tokio::time::advance(Duration::from_secs(1)).await;
        let view = b.load().await.unwrap();
        assert!(view.leader.is_none());
        assert!(view.members.is_empty());
        assert!(!store.has_live_lease("a"));
        assert!(store.last_lease_of("a").unwrap().expires_at <= Instant::now());
    }

    #[tokio::test(start_paused = true)]
    async fn expiry_wakes_a_watcher_without_other_traffic() {
        let store = MemoryStore::new(Duration::from_secs(10));
        let a = store.handle("a");
        let b = store.handle("b");
        a.ensure_lease(TTL).await.unwrap();
        assert!(a.acquire_leader(&name("a")).await.unwrap());
        let rev = b.load().await.unwrap().revision;
        let start = Instant::now();
        assert!(b.wait_for_change(rev, Duration::from_secs(100)).await);
        assert_eq!(Instant::now() - start, TTL, "woken exactly at lease expiry");
        assert!(b.load().await.unwrap().leader.is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn wait_for_change_times_out_without_changes_and_wakes_on_writes() {
        let store = MemoryStore::new(Duration::from_secs(10));
        let a = store.handle("a");
        let rev = a.load().await.unwrap().revision;
        assert!(!a.wait_for_change(rev, Duration::from_secs(5)).await);
        let b = store.handle("b");
        let waiter =
            tokio::spawn(async move { b.wait_for_change(rev, Duration::from_secs(60)).await });
        tokio::time::sleep(Duration::from_secs(1)).await;
        a.set_status(&Status::default()).await.unwrap();
        assert!(waiter.await.unwrap());
    }

    #[tokio::test(start_paused = true)]
    async fn keepalive_after_expiry_is_lease_not_found() {
        let store = MemoryStore::new(Duration::from_secs(10));
        let a = store.handle("a");
        let l1 = a.ensure_lease(TTL).await.unwrap();
        tokio::time::advance(TTL).await;
        assert!(matches!(a.keepalive().await, Err(DcsError::LeaseNotFound)));
        assert!(matches!(
            a.touch_member(&name("a"), &member("replica")).await,
            Err(DcsError::LeaseNotFound)
        ));
        let l2 = a.ensure_lease(TTL).await.unwrap();
        assert_ne!(l1, l2);
        a.keepalive().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn ensure_lease_reuses_a_live_lease_and_regrants_on_ttl_change() {
        let store = MemoryStore::new(Duration::from_secs(10));
        let a = store.handle("a");
        let l1 = a.ensure_lease(TTL).await.unwrap();
        assert_eq!(a.ensure_lease(TTL).await.unwrap(), l1);
        let l2 = a.ensure_lease(Duration::from_secs(20)).await.unwrap();
        assert_ne!(l1, l2);
        assert_eq!(store.lease(l2).unwrap().ttl, Duration::from_secs(20));
    }

    #[tokio::test(start_paused = true)]
    async fn update_leader_reattaches_own_key_to_the_new_lease() {
        let store = MemoryStore::new(Duration::from_secs(10));
        let old = store.handle("a");
        old.ensure_lease(TTL).await.unwrap();
        assert!(old.acquire_leader(&name("a")).await.unwrap());
        // The agent restarts: a new handle with a new lease finds its name in the key.
        let new = store.handle("a");
        let l2 = new.ensure_lease(TTL).await.unwrap();
        assert!(new.update_leader(&name("a")).await.unwrap());
        assert_eq!(store.leader(), Some((name("a"), Some(l2))));
        // The old lease lapsing no longer removes the key.
        tokio::time::advance(TTL - Duration::from_secs(1)).await;
        new.keepalive().await.unwrap();
        tokio::time::advance(Duration::from_secs(2)).await;
        assert_eq!(store.leader(), Some((name("a"), Some(l2))));
    }

    #[tokio::test(start_paused = true)]
    async fn update_leader_recreates_a_vanished_key_and_reports_a_stolen_one() {
        let store = MemoryStore::new(Duration::from_secs(10));
        let a = store.handle("a");
        let b = store.handle("b");
        a.ensure_lease(TTL).await.unwrap();
        b.ensure_lease(TTL).await.unwrap();
        assert!(
            a.update_leader(&name("a")).await.unwrap(),
            "gone key is re-created"
        );
        assert_eq!(store.leader().unwrap().0, name("a"));
        assert!(a.release_leader(&name("a")).await.unwrap());
        assert!(b.acquire_leader(&name("b")).await.unwrap());
        assert!(
            !a.update_leader(&name("a")).await.unwrap(),
            "someone else holds it"
        );
        assert_eq!(store.leader().unwrap().0, name("b"));
    }

    #[tokio::test(start_paused = true)]
    async fn update_leader_after_own_lease_expired_grants_a_new_lease() {
        let store = MemoryStore::new(Duration::from_secs(10));
        let a = store.handle("a");
        let l1 = a.ensure_lease(TTL).await.unwrap();
        assert!(a.acquire_leader(&name("a")).await.unwrap());
        tokio::time::advance(TTL).await;
        assert!(store.leader().is_none());
        assert!(a.update_leader(&name("a")).await.unwrap());
        let (holder, lease) = store.leader().unwrap();
        assert_eq!(holder, name("a"));
        assert_ne!(lease, Some(l1));
    }

    #[tokio::test(start_paused = true)]
    async fn release_only_when_ours() {
        let store = MemoryStore::new(Duration::from_secs(10));
        let a = store.handle("a");
        let b = store.handle("b");
        a.ensure_lease(TTL).await.unwrap();
        assert!(
            !a.release_leader(&name("a")).await.unwrap(),
            "nothing to release"
        );
        assert!(a.acquire_leader(&name("a")).await.unwrap());
        assert!(!b.release_leader(&name("b")).await.unwrap());
        assert_eq!(store.leader().unwrap().0, name("a"));
        assert!(a.release_leader(&name("a")).await.unwrap());
        assert!(store.leader().is_none());
    }

    #[tokio::test(start_paused = true)]
    async fn partitioned_handle_fails_after_retry_timeout_and_heals() {
        let retry = Duration::from_secs(10);
        let store = MemoryStore::new(retry);
        let a = store.handle("a");
        // Long enough to outlive the three failed calls below.
        a.ensure_lease(Duration::from_secs(60)).await.unwrap();
        a.set_partitioned(true);
        let start = Instant::now();
        assert!(matches!(a.keepalive().await, Err(DcsError::Unavailable(_))));
        assert_eq!(Instant::now() - start, retry);
        assert!(matches!(a.load().await, Err(DcsError::Unavailable(_))));
        // Others are not affected, and a restarted agent stays cut off.
        store.handle("b").load().await.unwrap();
        assert!(store.handle("a").load().await.is_err());
        a.set_partitioned(false);
        a.keepalive().await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn delete_cluster_removes_everything_in_one_revision() {
        let store = MemoryStore::new(Duration::from_secs(10));
        let a = store.handle("a");
        a.ensure_lease(TTL).await.unwrap();
        a.touch_member(&name("a"), &member("primary"))
            .await
            .unwrap();
        a.race_initialize().await.unwrap();
        let r = store.revision();
        a.delete_cluster().await.unwrap();
        assert_eq!(store.revision(), r + 1);
        assert_eq!(
            store.view(),
            ClusterView {
                revision: r + 1,
                ..Default::default()
            }
        );
    }

    #[tokio::test(start_paused = true)]
    async fn history_and_status_round_trip_and_status_is_logged() {
        let store = MemoryStore::new(Duration::from_secs(10));
        let a = store.handle("a");
        let h = vec![HistoryLine {
            parent_timeline: 1,
            switchpoint: 100,
            reason: "no recovery target specified".into(),
            timestamp: Some("2024-01-01T00:00:00+00:00".into()),
            new_leader: Some("a".into()),
        }];
        a.set_history(&h).await.unwrap();
        let t0 = Instant::now();
        a.set_status(&Status {
            optime: 7,
            ..Default::default()
        })
        .await
        .unwrap();
        tokio::time::advance(Duration::from_secs(1)).await;
        a.set_status(&Status {
            optime: 9,
            ..Default::default()
        })
        .await
        .unwrap();
        let v = a.load().await.unwrap();
        assert_eq!(v.history, h);
        assert_eq!(v.timeline().0, 2);
        assert_eq!(store.status_optime_at(t0), 7);
        assert_eq!(store.status_optime_at(Instant::now()), 9);
    }
}
