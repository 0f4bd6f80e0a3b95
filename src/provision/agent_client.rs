//! The one client of the agents' REST API on the CLI side: every verb (`switchover`,
//! `restart`, `status`, ...), `apply`'s readiness waits, the day-2 jobs and `drill` reach the
//! agents through [`AgentClient`]. It knows each member's base URL, the Basic-auth credentials
//! for the mutating verbs, the timeouts, and decodes answers into the types the API serialises
//! ([`crate::api::docs`]), so a change of the wire format breaks the build, not a run.
//!
//! Errors say which member, which call and why ([`AgentError`]), with the transport error as
//! `source`; the password is sent as a header and never appears in a URL, a log or an error.

use std::time::Duration;

use serde::Serialize;
use serde_json::{Map, Value};

use crate::api::docs::{ClusterDoc, PatroniDoc};
use crate::inventory::{Inventory, Role, Secret};

/// A read (`GET /cluster`, `/patroni`, `/config`, a health path): an agent that does not answer
/// within this is treated as down and the next one is asked, so one dead host cannot stall a
/// verb or `plan`. The agent answers reads from its last snapshot in microseconds; 3 s covers
/// a loaded host and a slow ARP resolution.
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);
/// A mutating call the agent answers once it has written the DCS (`POST /switchover`,
/// `PATCH /config`): bounded by its retry_timeout plus the round trip.
pub const CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// The agent answers `POST /restart` once PostgreSQL is back: its stop (≤ 60 s) plus its start
/// (≤ `primary_start_timeout`, 300 s by default), plus margin for the HTTP round trip. With
/// [`CALL_TIMEOUT`] a restart slower than 10 s was reported as failed although it went on.
pub const RESTART_CALL_TIMEOUT: Duration = Duration::from_secs(420);

/// Why a call to an agent failed. Callers branch on it: an unreachable agent is skipped for the
/// next, a refusal is reported with the agent's own words, a 412 is a config conflict.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("{member:?} is not a postgres host of the inventory")]
    UnknownMember { member: String },
    #[error("{method} {path} on {member}: agent not reachable")]
    Unreachable {
        member: String,
        method: &'static str,
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{method} {path} on {member}: HTTP {status}: {body}")]
    Refused {
        member: String,
        method: &'static str,
        path: String,
        status: u16,
        /// The agent's answer (plain text or JSON), trimmed.
        body: String,
    },
    #[error("{method} {path} on {member}: the answer is not the expected JSON")]
    Decode {
        member: String,
        method: &'static str,
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("no agent answered GET /cluster ({})", tried.join("; "))]
    NoAgentAnswered {
        /// `member: why` for each agent asked.
        tried: Vec<String>,
    },
}

impl AgentError {
    /// The HTTP status of a refusal.
    pub fn status(&self) -> Option<u16> {
        match self {
            AgentError::Refused { status, .. } => Some(*status),
            _ => None,
        }
    }
}

/// The live `config` key as `GET /config` returns it, with its mod revision (the `ETag`, for
/// `If-Match` on a later `PATCH`).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct LiveConfig {
    pub value: Map<String, Value>,
    pub revision: Option<i64>,
}

/// The agents of one cluster: member name → REST base URL (`http://addr:port`), in inventory
/// order, and the credentials of the mutating verbs.
#[derive(Clone)]
pub struct AgentClient {
    http: reqwest::Client,
    agents: Vec<(String, String)>,
    auth: Option<(String, Secret)>,
}

impl AgentClient {
    /// `agents`: (member, base URL) in the order to ask them.
    pub fn new(agents: Vec<(String, String)>, auth: Option<(String, Secret)>) -> AgentClient {
        AgentClient {
            // Per-request timeouts below; the builder fails only without a TLS backend, which
            // this build does not use.
            http: reqwest::Client::builder()
                .build()
                .expect("reqwest client builds"),
            agents,
            auth,
        }
    }

    /// The postgres hosts of `inv` with the inventory's REST credentials.
    pub fn for_inventory(inv: &Inventory) -> AgentClient {
        let agents = inv
            .hosts_with(Role::Postgres)
            .map(|h| {
                (
                    h.name.as_str().to_string(),
                    format!("http://{}", h.endpoint(inv.agent.restapi_port)),
                )
            })
            .collect();
        AgentClient::new(
            agents,
            Some((
                inv.agent.restapi_username.clone(),
                inv.secrets.restapi.clone(),
            )),
        )
    }

    /// The members, in the order they are asked.
    pub fn members(&self) -> impl Iterator<Item = &str> {
        self.agents.iter().map(|(m, _)| m.as_str())
    }

    /// `member`'s base URL.
    pub fn base(&self, member: &str) -> Result<&str, AgentError> {
        self.agents
            .iter()
            .find(|(m, _)| m == member)
            .map(|(_, b)| b.as_str())
            .ok_or_else(|| AgentError::UnknownMember {
                member: member.into(),
            })
    }

    async fn get(
        &self,
        member: &str,
        path: &str,
        timeout: Duration,
    ) -> Result<reqwest::Response, AgentError> {
        let url = format!("{}{path}", self.base(member)?);
        self.http
            .get(url)
            .timeout(timeout)
            .send()
            .await
            .map_err(|source| AgentError::Unreachable {
                member: member.into(),
                method: "GET",
                path: path.into(),
                source,
            })
    }

    async fn decode<T: serde::de::DeserializeOwned>(
        member: &str,
        method: &'static str,
        path: &str,
        r: reqwest::Response,
    ) -> Result<T, AgentError> {
        r.json::<T>().await.map_err(|source| AgentError::Decode {
            member: member.into(),
            method,
            path: path.into(),
            source,
        })
    }

    async fn refused(
        member: &str,
        method: &'static str,
        path: &str,
        r: reqwest::Response,
    ) -> AgentError {
        let status = r.status().as_u16();
        let body = r.text().await.unwrap_or_default().trim().to_string();
        AgentError::Refused {
            member: member.into(),
            method,
            path: path.into(),
            status,
            body,
        }
    }

    /// The status code `member`'s agent answers on a health path (`/health`, `/primary`,
    /// `/replica?lag=…`): any code is an answer; `Err` only when it does not answer.
    pub async fn health(&self, member: &str, path: &str) -> Result<u16, AgentError> {
        Ok(self
            .get(member, path, READ_TIMEOUT)
            .await?
            .status()
            .as_u16())
    }

    /// `member`'s agent leads the cluster (`GET /primary` = 200).
    pub async fn is_primary(&self, member: &str) -> bool {
        matches!(self.health(member, "/primary").await, Ok(200))
    }

    /// The first member whose agent says it leads (`GET /primary` = 200), asked in order.
    pub async fn find_primary(&self) -> Option<String> {
        for m in self.members() {
            if self.is_primary(m).await {
                return Some(m.to_string());
            }
        }
        None
    }

    /// `GET /patroni` on `member` (what its agent says about itself).
    pub async fn patroni(&self, member: &str) -> Result<PatroniDoc, AgentError> {
        let r = self.get(member, "/patroni", READ_TIMEOUT).await?;
        // 503 carries the same document on health paths; `/patroni` itself answers 200.
        if !(r.status().is_success() || r.status().as_u16() == 503) {
            return Err(Self::refused(member, "GET", "/patroni", r).await);
        }
        Self::decode(member, "GET", "/patroni", r).await
    }

    /// `GET /cluster` on `member`.
    pub async fn cluster_from(&self, member: &str) -> Result<ClusterDoc, AgentError> {
        let r = self.get(member, "/cluster", READ_TIMEOUT).await?;
        if !r.status().is_success() {
            return Err(Self::refused(member, "GET", "/cluster", r).await);
        }
        Self::decode(member, "GET", "/cluster", r).await
    }

    /// `GET /cluster` from the first agent that answers.
    pub async fn cluster(&self) -> Result<ClusterDoc, AgentError> {
        let mut tried = Vec::new();
        for m in self.members() {
            match self.cluster_from(m).await {
                Ok(c) => return Ok(c),
                Err(AgentError::Refused { status, .. }) => {
                    tried.push(format!("{m}: HTTP {status}"))
                }
                Err(AgentError::Decode { .. }) => tried.push(format!("{m}: unreadable answer")),
                Err(_) => tried.push(format!("{m}: agent not reachable")),
            }
        }
        Err(AgentError::NoAgentAnswered { tried })
    }

    /// `GET /config` on `member`: the live `config` key and its revision. The agent answers
    /// 502 while there is no valid config in the DCS.
    pub async fn config(&self, member: &str) -> Result<LiveConfig, AgentError> {
        let r = self.get(member, "/config", READ_TIMEOUT).await?;
        if !r.status().is_success() {
            return Err(Self::refused(member, "GET", "/config", r).await);
        }
        let revision = r
            .headers()
            .get(reqwest::header::ETAG)
            .and_then(|v| v.to_str().ok())
            .and_then(|s| s.trim_matches('"').parse().ok());
        let value = Self::decode(member, "GET", "/config", r).await?;
        Ok(LiveConfig { value, revision })
    }

    /// A mutating call with Basic auth; the body of a 2xx answer.
    async fn send(
        &self,
        method: reqwest::Method,
        member: &str,
        path: &str,
        body: &impl Serialize,
        timeout: Duration,
        if_match: Option<i64>,
    ) -> Result<String, AgentError> {
        let verb: &'static str = match method {
            reqwest::Method::POST => "POST",
            reqwest::Method::PATCH => "PATCH",
            reqwest::Method::PUT => "PUT",
            reqwest::Method::DELETE => "DELETE",
            _ => "GET",
        };
        let url = format!("{}{path}", self.base(member)?);
        let mut req = self.http.request(method, url).timeout(timeout).json(body);
        if let Some((user, password)) = &self.auth {
            req = req.basic_auth(user, Some(password.expose()));
        }
        if let Some(rev) = if_match {
            req = req.header(reqwest::header::IF_MATCH, format!("\"{rev}\""));
        }
        let r = req.send().await.map_err(|source| AgentError::Unreachable {
            member: member.into(),
            method: verb,
            path: path.into(),
            source,
        })?;
        if !r.status().is_success() {
            return Err(Self::refused(member, verb, path, r).await);
        }
        Ok(r.text().await.unwrap_or_default())
    }

    /// `POST /switchover` (or `/failover` with `force`) on `member`: `leader` hands over to
    /// `candidate` (any healthy replica when `None`). The agent answers once the request is in
    /// the DCS; the caller waits for the new leader.
    pub async fn switchover(
        &self,
        member: &str,
        leader: Option<&str>,
        candidate: Option<&str>,
        force: bool,
    ) -> Result<String, AgentError> {
        let mut body = Map::new();
        if let Some(l) = leader {
            body.insert("leader".into(), l.into());
        }
        if let Some(c) = candidate {
            body.insert("candidate".into(), c.into());
        }
        let path = if force { "/failover" } else { "/switchover" };
        self.send(
            reqwest::Method::POST,
            member,
            path,
            &body,
            CALL_TIMEOUT,
            None,
        )
        .await
    }

    /// `POST /restart` on `member` with Patroni's restart body (`role`, `restart_pending`,
    /// `schedule`, ...); answered once PostgreSQL runs again.
    pub async fn restart(&self, member: &str, body: &Value) -> Result<String, AgentError> {
        self.send(
            reqwest::Method::POST,
            member,
            "/restart",
            body,
            RESTART_CALL_TIMEOUT,
            None,
        )
        .await
    }

    /// `POST /reinitialize` on `member` (its data directory is discarded and cloned again).
    pub async fn reinitialize(&self, member: &str, force: bool) -> Result<String, AgentError> {
        self.send(
            reqwest::Method::POST,
            member,
            "/reinitialize",
            &serde_json::json!({ "force": force }),
            CALL_TIMEOUT,
            None,
        )
        .await
    }

    /// `PATCH /config` on `member`, with `If-Match: revision` when one is given (a 412
    /// [`AgentError::Refused`] when the config moved on since).
    pub async fn patch_config(
        &self,
        member: &str,
        patch: &Map<String, Value>,
        revision: Option<i64>,
    ) -> Result<String, AgentError> {
        self.send(
            reqwest::Method::PATCH,
            member,
            "/config",
            patch,
            CALL_TIMEOUT,
            revision,
        )
        .await
    }
}

impl std::fmt::Debug for AgentClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AgentClient")
            .field("agents", &self.agents)
            .field("auth", &self.auth.as_ref().map(|(u, _)| u))
            .finish()
    }
}
