//! The Patroni-compatible REST API (patroni.md §2): health checks for HAProxy and load
//! balancers, `/patroni` for peers and patronictl, cluster views, metrics, and the mutating
//! verbs (switchover, failover, restart, reinitialize, reload, config).
//!
//! Handlers read the HA loop's [`AgentStatus`] snapshot from a `watch` channel and never touch
//! PostgreSQL, so a health check answers in microseconds even while PostgreSQL or the loop is
//! stuck. Mutations that only concern the DCS (`/config`, the `failover` key) are written here
//! directly, as Patroni does; everything that acts on PostgreSQL goes to the loop as a
//! [`Command`] and the loop's reply becomes the HTTP answer.
//!
//! Routing mirrors Patroni's: the first path segment picks a dedicated handler when there is one
//! (`/patroni`, `/cluster`, `/switchover`, ...), every other `GET` is a health check evaluated on
//! substrings of the path (`/primary`, `/replica?lag=16MB`, ...), and `HEAD`/`OPTIONS` on any path
//! return only the status code (HAProxy's `option httpchk OPTIONS /primary`).
//!
//! - [`health`]: the status JSON and every health rule.
//! - [`cluster`]: `/cluster`, `/history`, `/config` reads and `/metrics`.
//! - [`admin`]: the authenticated mutating verbs.
//! - [`docs`]: the documents pgherd's own client reads back, as types.
//!
//! pgherd extensions, invisible to Patroni clients: `/patroni` carries a `pgherd` object (what
//! the agent runs with, see [`health`]); `GET /config` sends `ETag: "<mod revision>"` and
//! `PATCH|PUT /config` honour `If-Match: "<rev>"` (412 when the config moved on, see
//! [`admin`]).

pub mod admin;
pub mod cluster;
pub mod docs;
pub mod failsafe;
pub mod health;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use axum::Router;
use axum::body::Body;
use axum::extract::{Request, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use base64::Engine;
use serde_json::{Map, Value};
use tokio::sync::{mpsc, watch};

use crate::config::Credentials;
use crate::config::access::AccessList;
use crate::dcs::{ClusterView, Dcs, Member};
use crate::status::{AgentStatus, Command, FailsafeBoard};

/// Largest request body we read (config patches are a few KiB).
const MAX_BODY: usize = 1 << 20;

/// How the switchover precheck asks a candidate for its status (`GET <api_url>`). Patroni
/// requires the candidate to answer, and to have neither `nofailover` nor `watchdog_failed`.
#[async_trait]
pub trait MemberProbe: Send + Sync {
    /// The member's `/patroni` JSON, or `None` when it does not answer in time.
    async fn fetch_status(&self, member: &Member) -> Option<Value>;
}

/// [`MemberProbe`] over HTTP with reqwest: 2 s timeout and no retry, like Patroni's
/// `fetch_nodes_statuses` (a candidate that cannot answer in 2 s is no candidate).
pub struct HttpMemberProbe {
    client: reqwest::Client,
}

impl HttpMemberProbe {
    pub fn new(timeout: Duration) -> Self {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .unwrap_or_else(|_| reqwest::Client::new());
        HttpMemberProbe { client }
    }
}

impl Default for HttpMemberProbe {
    fn default() -> Self {
        Self::new(Duration::from_secs(2))
    }
}

#[async_trait]
impl MemberProbe for HttpMemberProbe {
    async fn fetch_status(&self, member: &Member) -> Option<Value> {
        let url = format!("{}/patroni", member.data.api_base()?);
        let resp = self.client.get(url).send().await.ok()?;
        resp.json::<Value>().await.ok()
    }
}

/// The REST credentials in force, swappable while the server runs.
pub type SharedCredentials = Arc<std::sync::RwLock<Option<Credentials>>>;

/// Everything the handlers need. Cheap to clone (axum clones it per request).
#[derive(Clone)]
pub struct ApiState {
    /// Snapshot published by the HA loop every cycle.
    pub status: watch::Receiver<AgentStatus>,
    pub dcs: Arc<dyn Dcs>,
    /// Requests to the HA loop (restart, reinitialize, reload, wakeup).
    pub commands: mpsc::Sender<Command>,
    /// `restapi.authentication`: Basic auth required on mutating verbs when set. Shared so that
    /// a config reload swaps it for every later request ([`ApiState::auth_handle`]).
    pub auth: SharedCredentials,
    pub scope: String,
    pub name: String,
    pub probe: Arc<dyn MemberProbe>,
    /// How often `POST /switchover` re-reads the DCS while waiting for the outcome. Patroni
    /// polls every second; we poll every 100 ms because our switchover completes in < 1 s and
    /// the caller should learn it as soon as it happened.
    pub switchover_poll: Duration,
    /// Overrides the switchover wait (default `2 * max(10, loop_wait)` s, as Patroni).
    pub switchover_timeout: Option<Duration>,
    /// Where `POST /failsafe` records the leader's announcement for the HA loop.
    pub failsafe: FailsafeBoard,
    /// `restapi.allowlist` / `allowlist_include_members`: who may call the mutating verbs.
    /// Shared so that a config reload swaps it ([`ApiState::access_handle`]).
    pub access: Arc<std::sync::RwLock<AccessList>>,
}

impl ApiState {
    /// State with the HTTP probe and the default switchover polling.
    pub fn new(
        status: watch::Receiver<AgentStatus>,
        dcs: Arc<dyn Dcs>,
        commands: mpsc::Sender<Command>,
        auth: Option<Credentials>,
        scope: impl Into<String>,
        name: impl Into<String>,
    ) -> Self {
        ApiState {
            status,
            dcs,
            commands,
            auth: Arc::new(std::sync::RwLock::new(auth)),
            scope: scope.into(),
            name: name.into(),
            probe: Arc::new(HttpMemberProbe::default()),
            access: Arc::default(),
            switchover_poll: Duration::from_millis(100),
            switchover_timeout: None,
            failsafe: FailsafeBoard::default(),
        }
    }

    /// Shares the failsafe board with the HA loop ([`crate::ha::HaLoop::with_failsafe_board`]).
    pub fn with_failsafe_board(mut self, board: FailsafeBoard) -> Self {
        self.failsafe = board;
        self
    }

    /// The handle a reload writes new credentials through.
    pub fn auth_handle(&self) -> SharedCredentials {
        self.auth.clone()
    }

    /// The allowlist in force.
    pub fn with_access(self, access: AccessList) -> Self {
        *self.access.write().unwrap_or_else(|p| p.into_inner()) = access;
        self
    }

    /// The allowlist's handle, for a config reload to swap it.
    pub fn access_handle(&self) -> Arc<std::sync::RwLock<AccessList>> {
        self.access.clone()
    }

    pub fn with_probe(mut self, probe: Arc<dyn MemberProbe>) -> Self {
        self.probe = probe;
        self
    }

    /// The latest snapshot (cloned so no lock is held across awaits).
    pub(crate) fn snapshot(&self) -> AgentStatus {
        self.status.borrow().clone()
    }

    /// A fresh linearizable DCS read (bounded), falling back to the loop's last view when the
    /// DCS does not answer. Used by endpoints that Patroni serves from `dcs.get_cluster()`.
    pub(crate) async fn fresh_cluster(&self) -> Option<Arc<ClusterView>> {
        match tokio::time::timeout(Duration::from_secs(3), self.dcs.load()).await {
            Ok(Ok(v)) => Some(Arc::new(v)),
            _ => self.snapshot().cluster,
        }
    }

    /// Asks the HA loop to run a cycle now. Never waits: a full queue already holds work that
    /// will wake the loop.
    pub(crate) fn wakeup(&self) {
        let _ = self.commands.try_send(Command::Wakeup);
    }
}

/// The router. Every request goes through [`dispatch`] (Patroni-style routing by first segment)
/// inside its own task, so that a panic in a handler becomes a 500 instead of a dropped
/// connection.
pub fn router(state: ApiState) -> Router {
    Router::new().fallback(dispatch).with_state(state)
}

/// Serves the API on `listener` until `shutdown` completes.
pub async fn serve(
    listener: tokio::net::TcpListener,
    state: ApiState,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    // With the peer's address on every request, for the allowlist.
    axum::serve(
        listener,
        router(state).into_make_service_with_connect_info::<std::net::SocketAddr>(),
    )
    .with_graceful_shutdown(shutdown)
    .await
}

async fn dispatch(State(state): State<ApiState>, req: Request) -> Response {
    match tokio::spawn(handle(state, req)).await {
        Ok(resp) => resp,
        Err(e) => {
            tracing::error!(error = %e, "REST API handler failed");
            text(500, "internal error")
        }
    }
}

/// The decoded request as handlers see it.
pub(crate) struct Req {
    pub method: Method,
    pub path: String,
    pub query: Vec<(String, String)>,
    pub headers: HeaderMap,
    pub body: Body,
}

impl Req {
    pub fn query(&self, key: &str) -> Option<&str> {
        self.query
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }
}

async fn handle(state: ApiState, req: Request) -> Response {
    let (parts, body) = req.into_parts();
    // Absent when the router is driven without a socket (unit tests): unknown, so refused by
    // any allowlist.
    let peer = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let query = axum::extract::Query::<Vec<(String, String)>>::try_from_uri(&parts.uri)
        .map(|q| q.0)
        .unwrap_or_default();
    let req = Req {
        method: parts.method,
        path: parts.uri.path().to_string(),
        query,
        headers: parts.headers,
        body,
    };
    let segment = req
        .path
        .trim_start_matches('/')
        .split('/')
        .next()
        .unwrap_or("")
        .to_string();
    let m = req.method.clone();
    if m == Method::GET {
        return match segment.as_str() {
            "patroni" => health::get_patroni(&state),
            "liveness" => status_only(health::liveness_code(&state.snapshot())),
            "readiness" => status_only(health::readiness_code(&state.snapshot(), &req)),
            "cluster" => cluster::get_cluster(&state).await,
            "history" => cluster::get_history(&state).await,
            "config" => cluster::get_config(&state).await,
            "metrics" => cluster::get_metrics(&state),
            "failsafe" => failsafe::get_failsafe(&state),
            _ => health::get_health(&state, &req),
        };
    }
    if m == Method::HEAD || m == Method::OPTIONS {
        let st = state.snapshot();
        let code = match segment.as_str() {
            "liveness" => health::liveness_code(&st),
            "readiness" => health::readiness_code(&st, &req),
            _ => health::health_code(&st, &req),
        };
        return status_only(code);
    }
    let mutating = matches!(
        (m.as_str(), segment.as_str()),
        (
            "POST",
            "switchover" | "failover" | "restart" | "reinitialize" | "reload" | "failsafe"
        ) | ("DELETE", "switchover" | "restart")
            | ("PATCH" | "PUT", "config")
    );
    if !mutating {
        // What Python's BaseHTTPRequestHandler answers for a verb without a handler;
        // patronictl relies on it to fall back from /switchover to /failover.
        return text(501, "Unsupported method");
    }
    // Patroni's order: the address first (403), then the credentials (401).
    if !admitted(&state, peer, segment.as_str()) {
        return text(403, "Access is denied");
    }
    if let Some(resp) = check_auth(&state, &req.headers) {
        return resp;
    }
    match (m.as_str(), segment.as_str()) {
        ("POST", "switchover") => admin::post_switchover(&state, req, false).await,
        ("POST", "failover") => admin::post_switchover(&state, req, true).await,
        ("POST", "restart") => admin::post_restart(&state, req).await,
        ("POST", "reinitialize") => admin::post_reinitialize(&state, req).await,
        ("POST", "reload") => admin::post_reload(&state).await,
        ("POST", "failsafe") => failsafe::post_failsafe(&state, req).await,
        ("DELETE", "switchover") => admin::delete_switchover(&state).await,
        ("DELETE", "restart") => admin::delete_restart(&state).await,
        ("PATCH", "config") => admin::patch_config(&state, req).await,
        ("PUT", "config") => admin::put_config(&state, req).await,
        _ => text(501, "Unsupported method"),
    }
}

/// Whether `peer` may call a mutating verb. `POST /failsafe` is checked against the static
/// list only, as Patroni does (it arrives while the DCS is lost, so the members' addresses
/// cannot be trusted to be current).
fn admitted(state: &ApiState, peer: Option<std::net::IpAddr>, segment: &str) -> bool {
    let access = state
        .access
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    if !access.restricts() {
        return true;
    }
    let view = (segment != "failsafe")
        .then(|| state.snapshot().cluster.clone())
        .flatten();
    access.admits(peer, view.as_deref())
}

/// Basic auth on mutating verbs (Patroni `check_access`): 401 with the `Patroni` realm when the
/// header is missing or wrong. The configured password never appears in logs or bodies.
fn check_auth(state: &ApiState, headers: &HeaderMap) -> Option<Response> {
    let creds = state
        .auth
        .read()
        .unwrap_or_else(|p| p.into_inner())
        .clone()?;
    let unauthorized = |msg: &str| {
        let mut r = text(401, msg);
        r.headers_mut().insert(
            header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Basic realm=\"Patroni\""),
        );
        Some(r)
    };
    let Some(h) = headers.get(header::AUTHORIZATION) else {
        return unauthorized("no auth header received");
    };
    let given = h
        .to_str()
        .ok()
        .and_then(|s| s.strip_prefix("Basic "))
        .and_then(|b| {
            base64::engine::general_purpose::STANDARD
                .decode(b.trim())
                .ok()
        });
    let expected = format!("{}:{}", creds.username, creds.password);
    match given {
        Some(g) if constant_time_eq(&g, expected.as_bytes()) => None,
        _ => unauthorized("not authenticated"),
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Reads a JSON object body the way Patroni's `_read_json_content` does: no `Content-Length` →
/// 411 (or `{}` when the body is optional; a chunked body is read anyway since hyper can tell
/// it apart), unreadable / non-object / empty-when-required → 400.
pub(crate) async fn read_json(req: Req, optional: bool) -> Result<Map<String, Value>, Response> {
    let has_len = req.headers.contains_key(header::CONTENT_LENGTH);
    let chunked = req
        .headers
        .get(header::TRANSFER_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.to_ascii_lowercase().contains("chunked"));
    if !has_len && !chunked {
        return if optional {
            Ok(Map::new())
        } else {
            Err(text(411, "Length Required"))
        };
    }
    let bytes = axum::body::to_bytes(req.body, MAX_BODY)
        .await
        .map_err(|_| text(400, "Bad request: cannot read body"))?;
    if bytes.iter().all(u8::is_ascii_whitespace) && optional {
        return Ok(Map::new());
    }
    match serde_json::from_slice::<Value>(&bytes) {
        Ok(Value::Object(m)) if optional || !m.is_empty() => Ok(m),
        _ => Err(text(
            400,
            "Bad request: body must be a non-empty JSON object",
        )),
    }
}

/// A plain message, as Patroni's `write_response` sends it.
pub(crate) fn text(code: u16, msg: impl Into<String>) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (status, [(header::CONTENT_TYPE, "text/html")], msg.into()).into_response()
}

pub(crate) fn json(code: u16, v: &Value) -> Response {
    let status = StatusCode::from_u16(code).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    (
        status,
        [(header::CONTENT_TYPE, "application/json")],
        v.to_string(),
    )
        .into_response()
}

pub(crate) fn status_only(code: u16) -> Response {
    StatusCode::from_u16(code)
        .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
        .into_response()
}
