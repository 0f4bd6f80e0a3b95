//! The etcd v3 implementation of [`Dcs`]: Patroni's key layout and values (patroni.md §1.1–1.6)
//! over etcd-client's native gRPC, with our own endpoint rotation, one lease per agent, and a
//! background prefix watch that makes [`Dcs::wait_for_change`] wake within milliseconds.
//!
//! Connection model: we keep one single-endpoint [`Client`] at a time and rotate to the next
//! endpoint whenever a call times out or fails at the transport level. We deliberately do not
//! use the client's multi-endpoint balanced channel: with a dead member in the set it keeps
//! routing to it, and a call can sit waiting for a ready endpoint for the whole budget.
//! Every public call is bounded by `retry_timeout` in total, split per attempt the way Patroni
//! splits it across nodes (§1.3), so a dead member costs one attempt, not the whole budget.
//!
//! Why one file: every call (CAS writes, the lease, the prefix watch) goes through the same
//! rotating single-endpoint connection and the same per-call `retry_timeout` budget; split
//! across files those internals would have to become crate-visible.

use std::collections::BTreeMap;
use std::future::Future;
use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::time::Duration;

use async_trait::async_trait;
use etcd_client::{
    Client, Compare, CompareOp, ConnectOptions, DeleteOptions, GetOptions, KeyValue, PutOptions,
    Txn, TxnOp, TxnOpResponse, WatchOptions,
};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{Instrument, debug, info_span, warn};

use super::{
    ClusterView, Dcs, DcsError, DynamicConfig, Failover, HistoryLine, KEY_CONFIG, KEY_FAILOVER,
    KEY_FAILSAFE, KEY_HISTORY, KEY_INITIALIZE, KEY_LEADER, KEY_STATUS, KEY_SYNC, MEMBERS_DIR,
    MemberData, Status, SyncState, failsafe_to_json, history_to_json, view_from_kvs,
};
use crate::types::{LeaseId, MemberName, Revision};

/// Settings shared by the request path and the watch task (they own separate connections).
#[derive(Clone)]
struct ConnSettings {
    /// Swapped by [`Dcs::set_endpoints`] (clones share it with the watch task).
    endpoints: Arc<std::sync::RwLock<Arc<Vec<String>>>>,
    /// Wakes the watch task to reconnect after the endpoint list changed.
    endpoints_changed: Arc<tokio::sync::Notify>,
    credentials: Option<(String, String)>,
    retry_timeout: Duration,
}

impl ConnSettings {
    fn endpoints(&self) -> Arc<Vec<String>> {
        self.endpoints
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Time allowed for one attempt against one endpoint. Patroni's split (§1.3): one node gets
    /// three tries, two nodes two tries each, three or more one try each; never below 1 s,
    /// because a healthy etcd under load can take a few hundred ms.
    fn per_attempt(&self) -> Duration {
        let n = self.endpoints().len().max(1) as u32;
        let tries = match n {
            1 => 3,
            2 => 4,
            _ => n,
        };
        (self.retry_timeout / tries).max(Duration::from_secs(1))
    }

    fn options(&self, for_watch: bool) -> ConnectOptions {
        let mut o = ConnectOptions::new()
            .with_connect_timeout(self.per_attempt())
            .with_keep_alive_while_idle(false);
        if for_watch {
            // A member cut off from the raft leader keeps a watch open but never delivers
            // events; require-leader makes etcd cancel it so we move to another member.
            o = o.with_require_leader(true);
            // A long-lived watch on a half-open TCP connection would never report an error;
            // HTTP/2 pings detect that. Interval >= 5 s because etcd's default
            // --grpc-keepalive-min-time is 5 s and it answers faster pings with GOAWAY.
            o = o.with_keep_alive(
                Duration::from_secs(10),
                self.retry_timeout.max(Duration::from_secs(1)),
            );
        }
        if let Some((user, password)) = &self.credentials {
            o = o
                .with_user(user.clone(), password.clone())
                .with_auto_token_refresh(true);
        }
        o
    }

    /// Opens a client on one endpoint. Without credentials this does no I/O (the channel
    /// connects lazily); with credentials it authenticates, so callers bound it with a timeout.
    async fn connect_one(
        &self,
        index: usize,
        for_watch: bool,
    ) -> Result<Client, etcd_client::Error> {
        let eps = self.endpoints();
        let ep = &eps[index % eps.len()];
        Client::connect([ep.as_str()], Some(self.options(for_watch))).await
    }
}

/// The request-path connection: which endpoint we are on and the client for it. `generation`
/// lets a failing call rotate only once even when several calls fail concurrently.
struct Conn {
    index: usize,
    generation: u64,
    client: Option<Client>,
}

/// Our lease and the TTL (seconds) it was requested with.
#[derive(Default)]
struct LeaseState {
    id: Option<i64>,
    ttl_secs: Option<i64>,
}

/// What we last successfully wrote to our member key, so unchanged cycles skip the write.
#[derive(Clone, PartialEq)]
struct TouchCache {
    name: MemberName,
    value: String,
    lease: i64,
}

/// How an etcd error is handled by the retry loop.
enum ErrClass {
    /// Transport-level or "try another node" failure: rotate endpoints and retry in budget.
    Retry(String),
    /// A definite answer from a working etcd.
    Fatal(DcsError),
}

/// The etcd v3 [`Dcs`] backend. Cheap to share behind an `Arc`; dropping it cancels the
/// background watch task.
pub struct EtcdDcs {
    settings: ConnSettings,
    /// Cluster prefix with trailing slash, e.g. `/service/batman/`.
    base: String,
    conn: Mutex<Conn>,
    lease: Mutex<LeaseState>,
    touch_cache: Mutex<Option<TouchCache>>,
    /// Highest `mod_revision` the watch task has seen under the prefix.
    seen_rx: watch::Receiver<i64>,
    seen_tx: Arc<watch::Sender<i64>>,
    /// Lowest revision the watch must start from (bumped by `wait_for_change` callers) so a
    /// change between their `load()` and the watch's creation is still delivered.
    watch_floor: Arc<AtomicI64>,
    watch_started: AtomicBool,
    cancel: CancellationToken,
}

impl Drop for EtcdDcs {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Normalises a base path to `/a/b/`: leading slash, single slashes, trailing slash.
fn normalize_base(base: &str) -> String {
    let parts: Vec<&str> = base.split('/').filter(|s| !s.is_empty()).collect();
    if parts.is_empty() {
        "/".to_string()
    } else {
        format!("/{}/", parts.join("/"))
    }
}

/// gRPC status codes we branch on (numeric, so we need not depend on tonic directly).
mod grpc_code {
    pub const CANCELLED: i32 = 1;
    pub const UNKNOWN: i32 = 2;
    pub const INVALID_ARGUMENT: i32 = 3;
    pub const DEADLINE_EXCEEDED: i32 = 4;
    pub const NOT_FOUND: i32 = 5;
    pub const RESOURCE_EXHAUSTED: i32 = 8;
    pub const ABORTED: i32 = 10;
    pub const UNAVAILABLE: i32 = 14;
    pub const UNAUTHENTICATED: i32 = 16;
}

fn classify(e: &etcd_client::Error) -> ErrClass {
    use etcd_client::Error as E;
    use grpc_code::*;
    match e {
        E::GRpcStatus(s) => {
            let msg = s.message();
            let code = s.code() as i32;
            match code {
                NOT_FOUND if msg.contains("lease not found") => {
                    ErrClass::Fatal(DcsError::LeaseNotFound)
                }
                // No leader, leader changed, request timed out, connection refused, "not a
                // primary lessor"...: this node cannot answer now, another one might.
                UNAVAILABLE | DEADLINE_EXCEEDED | CANCELLED | ABORTED | RESOURCE_EXHAUSTED
                | UNKNOWN => ErrClass::Retry(format!("grpc code {code}: {msg}")),
                // Expired or revision-stale auth tokens: a fresh client re-authenticates.
                UNAUTHENTICATED | INVALID_ARGUMENT
                    if msg.contains("auth token") || msg.contains("auth revision") =>
                {
                    ErrClass::Retry(format!("grpc code {code}: {msg}"))
                }
                _ => ErrClass::Fatal(DcsError::Other(format!("grpc code {code}: {msg}"))),
            }
        }
        E::LeaseKeepAliveError(m) if m.contains("lease not found") => {
            ErrClass::Fatal(DcsError::LeaseNotFound)
        }
        E::TransportError(_)
        | E::IoError(_)
        | E::LeaseKeepAliveError(_)
        | E::WatchError(_)
        | E::Internal(_) => ErrClass::Retry(e.to_string()),
        other => ErrClass::Fatal(DcsError::Other(other.to_string())),
    }
}

/// Every value we read is UTF-8 text (plain strings or JSON); invalid bytes are replaced
/// rather than failing the whole load, as garbage in one key must not blind the agent.
fn value_string(kv: &KeyValue) -> String {
    String::from_utf8_lossy(kv.value()).into_owned()
}

fn lease_of(kv: &KeyValue) -> Option<LeaseId> {
    (kv.lease() != 0).then_some(LeaseId(kv.lease()))
}

impl EtcdDcs {
    /// Builds the backend without any I/O, so the agent can start while etcd is down: every
    /// call then fails with `Unavailable` (bounded by `retry_timeout`) until etcd answers.
    /// Does no I/O and spawns nothing, so it may run outside a tokio runtime; the watch task
    /// starts on the first `wait_for_change`.
    pub fn new_lazy(
        endpoints: Vec<String>,
        base_path: String,
        retry_timeout: Duration,
        credentials: Option<(String, String)>,
    ) -> Result<EtcdDcs, DcsError> {
        if endpoints.is_empty() {
            return Err(DcsError::Other("no etcd endpoints configured".into()));
        }
        let endpoints = normalize_endpoints(endpoints);
        let (tx, rx) = watch::channel(0i64);
        Ok(EtcdDcs {
            settings: ConnSettings {
                endpoints: Arc::new(std::sync::RwLock::new(Arc::new(endpoints))),
                endpoints_changed: Arc::new(tokio::sync::Notify::new()),
                credentials,
                retry_timeout: retry_timeout.max(Duration::from_millis(100)),
            },
            base: normalize_base(&base_path),
            conn: Mutex::new(Conn {
                index: 0,
                generation: 0,
                client: None,
            }),
            lease: Mutex::new(LeaseState::default()),
            touch_cache: Mutex::new(None),
            seen_rx: rx,
            seen_tx: Arc::new(tx),
            watch_floor: Arc::new(AtomicI64::new(0)),
            watch_started: AtomicBool::new(false),
            cancel: CancellationToken::new(),
        })
    }

    /// Builds the backend and proves etcd answers (one read of the prefix), all within
    /// `retry_timeout`. `Err(Unavailable)` when no endpoint answers in time.
    pub async fn connect(
        endpoints: Vec<String>,
        base_path: String,
        retry_timeout: Duration,
        credentials: Option<(String, String)>,
    ) -> Result<EtcdDcs, DcsError> {
        let dcs = EtcdDcs::new_lazy(endpoints, base_path, retry_timeout, credentials)?;
        let key = dcs.base.clone();
        dcs.run("connect", move |mut c| {
            let key = key.clone();
            async move {
                c.get(key, Some(GetOptions::new().with_prefix().with_count_only()))
                    .await
            }
        })
        .await?;
        Ok(dcs)
    }

    /// The normalised cluster prefix (`/service/batman/`).
    pub fn base_path(&self) -> &str {
        &self.base
    }

    /// The lease currently held, if any (for logs and tests).
    pub fn current_lease(&self) -> Option<LeaseId> {
        self.lease.lock().unwrap().id.map(LeaseId)
    }

    fn key(&self, rel: &str) -> String {
        format!("{}{}", self.base, rel)
    }

    /// Returns the current client (opening one on the current endpoint if needed) and the
    /// connection generation it belongs to.
    async fn client(&self) -> Result<(Client, u64), etcd_client::Error> {
        let (index, generation) = {
            let c = self.conn.lock().unwrap();
            if let Some(cl) = &c.client {
                return Ok((cl.clone(), c.generation));
            }
            (c.index, c.generation)
        };
        let client = self.settings.connect_one(index, false).await?;
        let mut c = self.conn.lock().unwrap();
        if c.generation == generation && c.client.is_none() {
            c.client = Some(client.clone());
        }
        Ok((client, generation))
    }

    /// Drops the client of `generation` and moves to the next endpoint, so a dead etcd member
    /// costs one attempt per call rather than sticking.
    fn rotate(&self, generation: u64) {
        let mut c = self.conn.lock().unwrap();
        if c.generation == generation {
            c.client = None;
            let eps = self.settings.endpoints();
            c.index = (c.index + 1) % eps.len();
            c.generation += 1;
            debug!(endpoint = %eps[c.index], "etcd: switching endpoint");
        }
    }

    /// Runs one etcd operation with retries across endpoints inside the `retry_timeout`
    /// budget. `op` must be safe to re-send (callers make non-idempotent writes tolerant of a
    /// first attempt that applied but whose answer was lost).
    async fn run<T, F, Fut>(&self, what: &str, mut op: F) -> Result<T, DcsError>
    where
        F: FnMut(Client) -> Fut,
        Fut: Future<Output = Result<T, etcd_client::Error>>,
    {
        let deadline = Instant::now() + self.settings.retry_timeout;
        let per_attempt = self.settings.per_attempt();
        let mut last = String::from("no attempt made");
        loop {
            let now = Instant::now();
            if now >= deadline {
                return Err(DcsError::Unavailable(format!(
                    "{what}: no etcd endpoint answered within {:?}: {last}",
                    self.settings.retry_timeout
                )));
            }
            let attempt_end = (now + per_attempt).min(deadline);
            let started = Instant::now();
            let generation;
            let res = match tokio::time::timeout_at(attempt_end, self.client()).await {
                Err(_) => {
                    let g = self.conn.lock().unwrap().generation;
                    generation = g;
                    Err(ErrClass::Retry("connect timed out".into()))
                }
                Ok(Err(e)) => {
                    generation = self.conn.lock().unwrap().generation;
                    Err(classify(&e))
                }
                Ok(Ok((client, g))) => {
                    generation = g;
                    match tokio::time::timeout_at(attempt_end, op(client)).await {
                        Err(_) => Err(ErrClass::Retry("request timed out".into())),
                        Ok(Ok(v)) => Ok(v),
                        Ok(Err(e)) => Err(classify(&e)),
                    }
                }
            };
            match res {
                Ok(v) => return Ok(v),
                Err(ErrClass::Fatal(e)) => return Err(e),
                Err(ErrClass::Retry(msg)) => {
                    debug!(what, error = %msg, "etcd call failed, rotating endpoint");
                    last = msg;
                    self.rotate(generation);
                    // Refused connections fail instantly; pause briefly so a fully down etcd
                    // is not hammered in a tight loop for the whole budget.
                    if started.elapsed() < Duration::from_millis(50) {
                        let pause = Instant::now() + Duration::from_millis(50);
                        tokio::time::sleep_until(pause.min(deadline)).await;
                    }
                }
            }
        }
    }

    /// Plain put (no lease).
    async fn put_plain(&self, rel: &str, value: String) -> Result<(), DcsError> {
        let key = self.key(rel);
        self.run("put", move |mut c| {
            let (k, v) = (key.clone(), value.clone());
            async move { c.put(k, v, None).await }
        })
        .await
        .map(|_| ())
    }

    async fn delete_key(&self, rel: &str) -> Result<(), DcsError> {
        let key = self.key(rel);
        self.run("delete", move |mut c| {
            let k = key.clone();
            async move { c.delete(k, None).await }
        })
        .await
        .map(|_| ())
    }

    /// Put, as compare-and-swap on `mod_revision` when `expected` is given.
    async fn cas_put(
        &self,
        rel: &str,
        value: String,
        expected: Option<Revision>,
    ) -> Result<bool, DcsError> {
        let Some(rev) = expected else {
            self.put_plain(rel, value).await?;
            return Ok(true);
        };
        let key = self.key(rel);
        self.run("cas put", move |mut c| {
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev.0)])
                .and_then([TxnOp::put(key.clone(), value.clone(), None)]);
            async move { c.txn(txn).await.map(|r| r.succeeded()) }
        })
        .await
    }

    /// Delete, as compare-and-swap on `mod_revision` when `expected` is given.
    async fn cas_delete(&self, rel: &str, expected: Option<Revision>) -> Result<bool, DcsError> {
        let Some(rev) = expected else {
            self.delete_key(rel).await?;
            return Ok(true);
        };
        let key = self.key(rel);
        self.run("cas delete", move |mut c| {
            let txn = Txn::new()
                .when([Compare::mod_revision(key.clone(), CompareOp::Equal, rev.0)])
                .and_then([TxnOp::delete(key.clone(), None)]);
            async move { c.txn(txn).await.map(|r| r.succeeded()) }
        })
        .await
    }

    async fn grant(&self, ttl_secs: i64) -> Result<i64, DcsError> {
        let id = self
            .run("lease grant", move |mut c| async move {
                c.lease_grant(ttl_secs, None).await.map(|r| r.id())
            })
            .await?;
        let mut l = self.lease.lock().unwrap();
        l.id = Some(id);
        l.ttl_secs = Some(ttl_secs);
        debug!(lease = id, ttl_secs, "etcd: granted lease");
        Ok(id)
    }

    /// Our lease id; grants a new one when it was lost and we know the TTL to use.
    async fn lease_or_grant(&self) -> Result<i64, DcsError> {
        let (id, ttl) = {
            let l = self.lease.lock().unwrap();
            (l.id, l.ttl_secs)
        };
        match (id, ttl) {
            (Some(id), _) => Ok(id),
            (None, Some(ttl)) => self.grant(ttl).await,
            // ensure_lease was never called: we do not know which TTL the agent wants.
            (None, None) => Err(DcsError::LeaseNotFound),
        }
    }

    /// Forgets `id` if it is still our lease (etcd said it is gone).
    fn drop_lease(&self, id: i64) {
        let mut l = self.lease.lock().unwrap();
        if l.id == Some(id) {
            l.id = None;
        }
    }

    /// Runs a write that attaches a key to our lease; if etcd says the lease is gone, grants a
    /// new one and tries once more (Patroni does the same for `LeaseNotFound` on put).
    async fn with_lease<T, F, Fut>(&self, mut write: F) -> Result<T, DcsError>
    where
        F: FnMut(i64) -> Fut,
        Fut: Future<Output = Result<T, DcsError>>,
    {
        let id = self.lease_or_grant().await?;
        match write(id).await {
            Err(DcsError::LeaseNotFound) => {
                self.drop_lease(id);
                let id = self.lease_or_grant().await?;
                write(id).await
            }
            other => other,
        }
    }

    async fn keepalive_id(&self, id: i64) -> Result<(), DcsError> {
        let res = self
            .run("lease keepalive", move |mut c| async move {
                // One keepalive round trip on a fresh stream: the crate sends the request and
                // waits for the first answer, reporting ttl 0 as "lease not found".
                c.lease_keep_alive(id).await.map(|_| ())
            })
            .await;
        if let Err(DcsError::LeaseNotFound) = res {
            self.drop_lease(id);
        }
        res
    }

    async fn get_leader_kv(&self) -> Result<Option<KeyValue>, DcsError> {
        let key = self.key(KEY_LEADER);
        self.run("get leader", move |mut c| {
            let k = key.clone();
            async move { c.get(k, None).await.map(|r| r.kvs().first().cloned()) }
        })
        .await
    }

    /// Starts the background watch task once (on first `wait_for_change`).
    fn ensure_watch(&self) {
        if self.watch_started.swap(true, Ordering::SeqCst) {
            return;
        }
        let task = WatchTask {
            settings: self.settings.clone(),
            prefix: self.base.clone(),
            seen: self.seen_tx.clone(),
            floor: self.watch_floor.clone(),
            cancel: self.cancel.clone(),
        };
        let span = info_span!("etcd_watch", prefix = %self.base);
        tokio::spawn(task.run().instrument(span));
    }
}

/// The background prefix watch. It owns its own connection (separate from request traffic)
/// and publishes the highest `mod_revision` seen under the prefix.
struct WatchTask {
    settings: ConnSettings,
    prefix: String,
    seen: Arc<watch::Sender<i64>>,
    floor: Arc<AtomicI64>,
    cancel: CancellationToken,
}

impl WatchTask {
    async fn run(self) {
        let mut index = 0usize;
        let mut backoff = Duration::from_millis(50);
        loop {
            // Resume right after the last event seen (or the callers' snapshot). With neither
            // known, 0 means "from now": never replay the whole history from revision 1.
            let seen = *self.seen.borrow();
            let floor = self.floor.load(Ordering::SeqCst);
            let start = if seen > 0 { floor.max(seen + 1) } else { floor };
            let res = tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.settings.endpoints_changed.notified() => {
                    // New endpoint list: reconnect from its first member, resuming after the
                    // last revision seen, so no event is lost.
                    index = 0;
                    continue;
                }
                r = self.watch_once(index, start) => r,
            };
            match res {
                Ok(()) => backoff = Duration::from_millis(50),
                Err(msg) => {
                    debug!(error = %msg, "etcd watch broke, reconnecting");
                    index = (index + 1) % self.settings.endpoints().len();
                    tokio::select! {
                        _ = self.cancel.cancelled() => return,
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    // Grow to 1 s at most: the watch is what makes failover fast, so it must
                    // come back quickly once etcd does.
                    backoff = (backoff * 2).min(Duration::from_secs(1));
                }
            }
        }
    }

    fn publish(&self, rev: i64) {
        self.seen.send_if_modified(|cur| {
            if rev > *cur {
                *cur = rev;
                true
            } else {
                false
            }
        });
    }

    /// One watch stream from `start` until it breaks. `Ok` = ended in a way worth an immediate
    /// restart (e.g. compaction), `Err` = connection trouble.
    async fn watch_once(&self, index: usize, start: i64) -> Result<(), String> {
        let per = self.settings.per_attempt();
        let mut client = tokio::time::timeout(per, self.settings.connect_one(index, true))
            .await
            .map_err(|_| "connect timed out".to_string())?
            .map_err(|e| e.to_string())?;
        let mut opts = WatchOptions::new().with_prefix();
        if start > 0 {
            opts = opts.with_start_revision(start);
        }
        let mut stream = tokio::time::timeout(per, client.watch(self.prefix.clone(), Some(opts)))
            .await
            .map_err(|_| "watch create timed out".to_string())?
            .map_err(|e| e.to_string())?;
        loop {
            let msg = stream.message().await.map_err(|e| e.to_string())?;
            let Some(resp) = msg else {
                return Err("watch stream closed".into());
            };
            if resp.canceled() {
                let compact = resp.compact_revision();
                if compact > 0 {
                    // Our start revision was compacted away: events were missed, so report a
                    // change (wake every waiter) and restart from the oldest kept revision.
                    warn!(compact, "etcd watch start revision compacted");
                    self.floor.fetch_max(compact, Ordering::SeqCst);
                    if let Some(h) = resp.header() {
                        self.publish(h.revision());
                    }
                    return Ok(());
                }
                return Err(format!("watch canceled: {}", resp.cancel_reason()));
            }
            let max = resp
                .events()
                .iter()
                .filter_map(|e| e.kv())
                .map(|kv| kv.mod_revision())
                .max();
            if let Some(rev) = max {
                self.publish(rev);
            }
        }
    }
}

/// URLs as the client wants them (`http://` added when no scheme is given).
fn normalize_endpoints(endpoints: Vec<String>) -> Vec<String> {
    endpoints
        .into_iter()
        .map(|e| {
            if e.contains("://") {
                e
            } else {
                format!("http://{e}")
            }
        })
        .collect()
}

#[async_trait]
impl Dcs for EtcdDcs {
    fn set_endpoints(&self, endpoints: Vec<String>) -> Result<(), DcsError> {
        if endpoints.is_empty() {
            return Err(DcsError::Other("no etcd endpoints configured".into()));
        }
        let endpoints = normalize_endpoints(endpoints);
        if *self.settings.endpoints() == endpoints {
            return Ok(());
        }
        *self
            .settings
            .endpoints
            .write()
            .unwrap_or_else(|p| p.into_inner()) = Arc::new(endpoints);
        // Drop the request client so the next call connects to the new list's first member.
        // The lease (and the member / leader keys on it) is an etcd object, not a connection:
        // it survives, and the next keepalive refreshes it through the new endpoint.
        {
            let mut c = self.conn.lock().unwrap();
            c.client = None;
            c.index = 0;
            c.generation += 1;
        }
        self.settings.endpoints_changed.notify_waiters();
        Ok(())
    }

    async fn load(&self) -> Result<ClusterView, DcsError> {
        let prefix = self.base.clone();
        // Linearizable (etcd-client's default): patronictl semantics, never a stale follower.
        let resp = self
            .run("load", move |mut c| {
                let p = prefix.clone();
                async move { c.get(p, Some(GetOptions::new().with_prefix())).await }
            })
            .await?;
        let revision = resp.header().map(|h| h.revision()).unwrap_or(0);
        let base = self.base.as_bytes();
        let rel: Vec<(&str, &KeyValue)> = resp
            .kvs()
            .iter()
            .filter_map(|kv| {
                let k = kv.key().strip_prefix(base)?;
                Some((std::str::from_utf8(k).ok()?, kv))
            })
            .collect();
        // Forget the touch cache when our member key is no longer what we wrote (deleted by
        // `patronictl remove`, overwritten by someone): the next touch must rewrite it.
        {
            let mut cache = self.touch_cache.lock().unwrap();
            if let Some(c) = cache.as_ref() {
                let want = format!("{MEMBERS_DIR}{}", c.name);
                let intact = rel.iter().any(|(k, kv)| {
                    *k == want && kv.value() == c.value.as_bytes() && kv.lease() == c.lease
                });
                if !intact {
                    *cache = None;
                }
            }
        }
        Ok(view_from_kvs(
            rel.iter()
                .map(|(k, kv)| (*k, value_string(kv), kv.mod_revision(), lease_of(kv))),
            revision,
        ))
    }

    async fn ensure_lease(&self, ttl: Duration) -> Result<LeaseId, DcsError> {
        let ttl_secs = (ttl.as_millis().div_ceil(1000) as i64).max(1);
        let (id, cur_ttl) = {
            let l = self.lease.lock().unwrap();
            (l.id, l.ttl_secs)
        };
        if let Some(id) = id
            && cur_ttl == Some(ttl_secs)
        {
            match self.keepalive_id(id).await {
                Ok(()) => return Ok(LeaseId(id)),
                Err(DcsError::LeaseNotFound) => {}
                Err(e) => return Err(e),
            }
        }
        // No lease, expired, or TTL changed. The old lease is not revoked: that would delete
        // our member and leader keys at once; they move to the new lease on the next
        // touch_member / update_leader and the old lease lapses on its own.
        self.grant(ttl_secs).await.map(LeaseId)
    }

    async fn keepalive(&self) -> Result<(), DcsError> {
        let id = self
            .lease
            .lock()
            .unwrap()
            .id
            .ok_or(DcsError::LeaseNotFound)?;
        self.keepalive_id(id).await
    }

    async fn touch_member(&self, name: &MemberName, data: &MemberData) -> Result<(), DcsError> {
        let value = serde_json::to_string(data).map_err(|e| DcsError::Other(e.to_string()))?;
        let id = self.lease_or_grant().await?;
        let candidate = TouchCache {
            name: name.clone(),
            value: value.clone(),
            lease: id,
        };
        if self.touch_cache.lock().unwrap().as_ref() == Some(&candidate) {
            return Ok(());
        }
        let key = self.key(&format!("{MEMBERS_DIR}{name}"));
        let used = self
            .with_lease(|lease| {
                let (key, value) = (key.clone(), value.clone());
                async move {
                    self.run("touch member", move |mut c| {
                        let (k, v) = (key.clone(), value.clone());
                        async move {
                            c.put(k, v, Some(PutOptions::new().with_lease(lease)))
                                .await
                                .map(|_| lease)
                        }
                    })
                    .await
                }
            })
            .await;
        match used {
            Ok(lease) => {
                *self.touch_cache.lock().unwrap() = Some(TouchCache {
                    name: name.clone(),
                    value,
                    lease,
                });
                Ok(())
            }
            Err(e) => {
                *self.touch_cache.lock().unwrap() = None;
                Err(e)
            }
        }
    }

    async fn acquire_leader(&self, name: &MemberName) -> Result<bool, DcsError> {
        let key = self.key(KEY_LEADER);
        let me = name.as_str().to_string();
        self.with_lease(|lease| {
            let (key, me) = (key.clone(), me.clone());
            async move {
                self.run("acquire leader", move |mut c| {
                    let txn = Txn::new()
                        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                        .and_then([TxnOp::put(
                            key.clone(),
                            me.clone(),
                            Some(PutOptions::new().with_lease(lease)),
                        )])
                        .or_else([TxnOp::get(key.clone(), None)]);
                    let me = me.clone();
                    async move {
                        let r = c.txn(txn).await?;
                        if r.succeeded() {
                            return Ok(true);
                        }
                        // A retried attempt may find the key our own lost-answer attempt
                        // created: that is a win, not a conflict.
                        Ok(r.op_responses().iter().any(|op| match op {
                            TxnOpResponse::Get(g) => g.kvs().first().is_some_and(|kv| {
                                kv.value() == me.as_bytes() && kv.lease() == lease
                            }),
                            _ => false,
                        }))
                    }
                })
                .await
            }
        })
        .await
    }

    async fn update_leader(&self, name: &MemberName) -> Result<bool, DcsError> {
        // Renewing the leader lock is keeping our lease alive (§1.4). If the lease is gone,
        // a new one is granted and the leader key is re-attached below.
        match self.keepalive().await {
            Ok(()) => {}
            Err(DcsError::LeaseNotFound) => {
                self.lease_or_grant().await?;
            }
            Err(e) => return Err(e),
        }
        let current = self.get_leader_kv().await?;
        let me = name.as_str().to_string();
        let lease = self.lease_or_grant().await?;
        match &current {
            // Somebody else holds the lock: leadership is lost.
            Some(kv) if kv.value() != me.as_bytes() => return Ok(false),
            // Ours, on our live lease: nothing to write.
            Some(kv) if kv.lease() == lease => return Ok(true),
            // Ours on an old lease, or gone: re-attach / re-create below.
            _ => {}
        }
        let key = self.key(KEY_LEADER);
        self.with_lease(|lease| {
            let (key, me) = (key.clone(), me.clone());
            async move {
                self.run("update leader", move |mut c| {
                    let put = || {
                        TxnOp::put(
                            key.clone(),
                            me.clone(),
                            Some(PutOptions::new().with_lease(lease)),
                        )
                    };
                    // Take over the key if it still names us, else re-create it only if absent.
                    let recreate = Txn::new()
                        .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                        .and_then([put()]);
                    let txn = Txn::new()
                        .when([Compare::value(key.clone(), CompareOp::Equal, me.clone())])
                        .and_then([put()])
                        .or_else([TxnOp::txn(recreate)]);
                    async move {
                        let r = c.txn(txn).await?;
                        if r.succeeded() {
                            return Ok(true);
                        }
                        Ok(r.op_responses().iter().any(|op| match op {
                            TxnOpResponse::Txn(t) => t.succeeded(),
                            _ => false,
                        }))
                    }
                })
                .await
            }
        })
        .await
    }

    async fn take_leader(&self, name: &MemberName) -> Result<(), DcsError> {
        let key = self.key(KEY_LEADER);
        let me = name.as_str().to_string();
        self.with_lease(|lease| {
            let (key, me) = (key.clone(), me.clone());
            async move {
                self.run("take leader", move |mut c| {
                    let (k, v) = (key.clone(), me.clone());
                    async move { c.put(k, v, Some(PutOptions::new().with_lease(lease))).await }
                })
                .await
            }
        })
        .await
        .map(|_| ())
    }

    async fn release_leader(&self, name: &MemberName) -> Result<bool, DcsError> {
        let key = self.key(KEY_LEADER);
        let me = name.as_str().to_string();
        self.run("release leader", move |mut c| {
            let txn = Txn::new()
                .when([Compare::value(key.clone(), CompareOp::Equal, me.clone())])
                .and_then([TxnOp::delete(key.clone(), None)]);
            async move { c.txn(txn).await.map(|r| r.succeeded()) }
        })
        .await
    }

    async fn race_initialize(&self) -> Result<bool, DcsError> {
        let key = self.key(KEY_INITIALIZE);
        self.run("race initialize", move |mut c| {
            let txn = Txn::new()
                .when([Compare::create_revision(key.clone(), CompareOp::Equal, 0)])
                .and_then([TxnOp::put(key.clone(), "", None)]);
            async move { c.txn(txn).await.map(|r| r.succeeded()) }
        })
        .await
    }

    async fn set_initialize(&self, sysid: &str) -> Result<(), DcsError> {
        self.put_plain(KEY_INITIALIZE, sysid.to_string()).await
    }

    async fn delete_initialize(&self) -> Result<(), DcsError> {
        self.delete_key(KEY_INITIALIZE).await
    }

    async fn set_config(
        &self,
        config: &DynamicConfig,
        expected: Option<Revision>,
    ) -> Result<bool, DcsError> {
        self.cas_put(KEY_CONFIG, config.to_json(), expected).await
    }

    async fn set_failover(
        &self,
        failover: &Failover,
        expected: Option<Revision>,
    ) -> Result<bool, DcsError> {
        let v = serde_json::to_string(failover).map_err(|e| DcsError::Other(e.to_string()))?;
        self.cas_put(KEY_FAILOVER, v, expected).await
    }

    async fn set_sync(
        &self,
        sync: Option<&SyncState>,
        expected: Option<Revision>,
    ) -> Result<bool, DcsError> {
        match sync {
            Some(s) => {
                let v = serde_json::to_string(s).map_err(|e| DcsError::Other(e.to_string()))?;
                self.cas_put(KEY_SYNC, v, expected).await
            }
            None => self.cas_delete(KEY_SYNC, expected).await,
        }
    }

    async fn set_status(&self, status: &Status) -> Result<(), DcsError> {
        let v = serde_json::to_string(status).map_err(|e| DcsError::Other(e.to_string()))?;
        self.put_plain(KEY_STATUS, v).await
    }

    async fn set_history(&self, history: &[HistoryLine]) -> Result<(), DcsError> {
        self.put_plain(KEY_HISTORY, history_to_json(history)).await
    }

    async fn set_failsafe(&self, members: &BTreeMap<MemberName, String>) -> Result<(), DcsError> {
        self.put_plain(KEY_FAILSAFE, failsafe_to_json(members))
            .await
    }

    async fn delete_cluster(&self) -> Result<(), DcsError> {
        let prefix = self.base.clone();
        self.run("delete cluster", move |mut c| {
            let p = prefix.clone();
            async move { c.delete(p, Some(DeleteOptions::new().with_prefix())).await }
        })
        .await?;
        *self.touch_cache.lock().unwrap() = None;
        Ok(())
    }

    async fn wait_for_change(&self, after_revision: i64, timeout: Duration) -> bool {
        // Anything after the caller's snapshot must be delivered, even if the watch (re)starts
        // later than that snapshot was taken.
        if after_revision > 0 {
            self.watch_floor
                .fetch_max(after_revision + 1, Ordering::SeqCst);
        }
        self.ensure_watch();
        let mut rx = self.seen_rx.clone();
        let waited = tokio::time::timeout(timeout, rx.wait_for(|rev| *rev > after_revision)).await;
        matches!(waited, Ok(Ok(_)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn base_path_is_normalised_with_single_slashes() {
        assert_eq!(normalize_base("/service/batman/"), "/service/batman/");
        assert_eq!(normalize_base("service//batman"), "/service/batman/");
    }
}
