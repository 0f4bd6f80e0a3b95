//! Asking the other members how they are, before the HA core decides on a leader race or a
//! switchover: Patroni's parallel `GET <api_url>` (= `/patroni`) calls, reduced to
//! [`PeerStatus`].
//!
//! - [`PeerProbe`]: the contract the loop uses.
//! - [`HttpPeerProbe`]: the real one (reqwest, all members in parallel, one short timeout).
//! - `FakePeerProbe`, `StatusPeerProbe` (in `fake`, for tests and the `testing` feature): test
//!   doubles (fixed answers / answers derived from other in-process agents' published status).

use std::time::Duration;

use async_trait::async_trait;
use serde_json::Value;

use crate::dcs::Tags;
use crate::dcs::{Member, tag_is_true};
use crate::types::{Lsn, MemberName, Timeline};

pub use PeerStatus as Peer;

#[cfg(any(test, feature = "testing"))]
mod fake;
#[cfg(any(test, feature = "testing"))]
pub use fake::{FakePeerProbe, StatusPeerProbe, peer_status_from_agent};

/// One peer's answer to `GET /patroni`, reduced to what the leader race compares
/// (Patroni's `_MemberStatus`).
#[derive(Debug, Clone, PartialEq)]
pub struct PeerStatus {
    pub name: MemberName,
    /// Answered within the timeout with a usable body (an `xlog` section).
    pub reachable: bool,
    /// `role` primary or `xlog.location` present: PostgreSQL runs read-write there.
    pub is_primary: bool,
    /// Replica: max(received, replayed); primary: its location.
    pub wal_position: Lsn,
    pub timeline: Option<Timeline>,
    pub nofailover: bool,
    pub failover_priority: i64,
    pub watchdog_failed: bool,
}

impl PeerStatus {
    /// A peer that did not answer (it is ignored by the race, never counted against us).
    pub fn unreachable(name: MemberName) -> PeerStatus {
        PeerStatus {
            name,
            reachable: false,
            is_primary: false,
            wal_position: Lsn(0),
            timeline: None,
            nofailover: false,
            failover_priority: 1,
            watchdog_failed: false,
        }
    }

    /// Reachable and allowed to become leader (Patroni's "without limitation").
    pub fn is_healthy_candidate(&self) -> bool {
        self.reachable && !self.nofailover && self.failover_priority > 0 && !self.watchdog_failed
    }
}

/// How long the loop waits for peers. Patroni uses 2 s. pgherd's REST API answers `/patroni`
/// from the HA loop's published snapshot without running SQL, so a live peer answers in
/// milliseconds even when its PostgreSQL is busy; 1 s is ample for a LAN and caps what a
/// dead host (whose packets vanish) adds to a failover, since all calls run in parallel.
pub const DEFAULT_PEER_TIMEOUT: Duration = Duration::from_secs(1);

/// Contract of a peer prober.
///
/// `fetch` queries every given member (callers exclude themselves) concurrently and returns
/// exactly one [`PeerStatus`] per member, in input order, within about `timeout` overall.
/// A member that does not answer in time, answers with an error status, or whose body lacks
/// an `xlog` section is reported with `reachable: false` — the race ignores such members
/// rather than counting them against us (Patroni semantics). It never fails as a whole.
#[async_trait]
pub trait PeerProbe: Send + Sync {
    async fn fetch(&self, members: &[Member], timeout: Duration) -> Vec<PeerStatus>;

    /// The leader's failsafe round (Patroni's `check_failsafe_topology`): `POST /failsafe`
    /// with `body` to every `(member, api_url)`, all in parallel, each bounded by `timeout`.
    /// One answer per member, in order: `Ok` only for a 200 (Patroni's "Accepted"); `Err` says
    /// why not (unreachable, or the member's own answer, e.g. 500 "Running as a leader").
    /// The default refuses every member: a probe that cannot announce never keeps a primary
    /// running without the DCS.
    async fn announce_failsafe(
        &self,
        members: &[(MemberName, String)],
        _body: &Value,
        _timeout: Duration,
    ) -> Vec<(MemberName, Result<(), String>)> {
        members
            .iter()
            .map(|(m, _)| (m.clone(), Err("this probe cannot announce failsafe".into())))
            .collect()
    }
}

/// The `POST /failsafe` address of a member whose failsafe entry is `api_url` (Patroni
/// stores `http://host:port/patroni`; a bare base is accepted too).
pub fn failsafe_url(api_url: &str) -> String {
    let base = api_url.trim_end_matches('/');
    let base = base.strip_suffix("/patroni").unwrap_or(base);
    format!("{base}/failsafe")
}

/// Parses a `GET /patroni` body the way Patroni's `_MemberStatus.from_api_response` does.
pub fn parse_patroni_status(name: &MemberName, body: &Value) -> PeerStatus {
    let Some(xlog) = body.get("xlog").and_then(Value::as_object) else {
        return PeerStatus::unreachable(name.clone());
    };
    let role = body.get("role").and_then(Value::as_str).unwrap_or("");
    let u = |k: &str| xlog.get(k).and_then(Value::as_u64);
    let location = u("location");
    let is_primary = location.is_some() || matches!(role, "primary" | "master");
    let wal = match location {
        Some(l) => l,
        None => u("received_location")
            .unwrap_or(0)
            .max(u("replayed_location").unwrap_or(0)),
    };
    let tags = body
        .get("tags")
        .and_then(Value::as_object)
        .cloned()
        .unwrap_or_default();
    let t = Tags::from_map(&tags);
    PeerStatus {
        name: name.clone(),
        reachable: true,
        is_primary,
        wal_position: Lsn(wal),
        timeline: body
            .get("timeline")
            .and_then(Value::as_u64)
            .map(|t| Timeline(t as u32)),
        nofailover: t.nofailover,
        failover_priority: t.failover_priority,
        watchdog_failed: tag_is_true(body.get("watchdog_failed")),
    }
}

/// The real prober: plain HTTP (reqwest, no TLS), no retries.
#[derive(Clone)]
pub struct HttpPeerProbe {
    client: reqwest::Client,
    /// Optional basic-auth credentials (GET endpoints are unauthenticated in Patroni, but a
    /// proxy may require them).
    auth: Option<(String, String)>,
}

impl HttpPeerProbe {
    pub fn new() -> HttpPeerProbe {
        HttpPeerProbe {
            client: reqwest::Client::new(),
            auth: None,
        }
    }

    pub fn with_auth(mut self, user: String, password: String) -> HttpPeerProbe {
        self.auth = Some((user, password));
        self
    }

    async fn one(&self, m: &Member, timeout: Duration) -> PeerStatus {
        let url = if m.data.api_url.is_empty() {
            return PeerStatus::unreachable(m.name.clone());
        } else {
            m.data.api_url.clone()
        };
        let mut req = self.client.get(&url).timeout(timeout);
        if let Some((u, p)) = &self.auth {
            req = req.basic_auth(u, Some(p));
        }
        // Health endpoints answer 503 with the same body on replicas of unhealthy clusters;
        // `/patroni` itself always answers 200, but accept any body that parses.
        let body = match req.send().await {
            Ok(r) => r.json::<Value>().await.ok(),
            Err(_) => None,
        };
        match body {
            Some(b) => parse_patroni_status(&m.name, &b),
            None => PeerStatus::unreachable(m.name.clone()),
        }
    }
}

impl Default for HttpPeerProbe {
    fn default() -> Self {
        Self::new()
    }
}

#[async_trait]
impl PeerProbe for HttpPeerProbe {
    async fn fetch(&self, members: &[Member], timeout: Duration) -> Vec<PeerStatus> {
        let futs = members.iter().map(|m| self.one(m, timeout));
        // All in parallel: the race costs one timeout, not one per dead member.
        let all = futures_join_all(futs);
        match tokio::time::timeout(timeout + Duration::from_millis(200), all).await {
            Ok(v) => v,
            Err(_) => members
                .iter()
                .map(|m| PeerStatus::unreachable(m.name.clone()))
                .collect(),
        }
    }

    async fn announce_failsafe(
        &self,
        members: &[(MemberName, String)],
        body: &Value,
        timeout: Duration,
    ) -> Vec<(MemberName, Result<(), String>)> {
        let one = |name: MemberName, url: String| async move {
            let mut req = self
                .client
                .post(failsafe_url(&url))
                .json(body)
                .timeout(timeout);
            if let Some((u, p)) = &self.auth {
                req = req.basic_auth(u, Some(p));
            }
            let r = match req.send().await {
                Ok(r) if r.status().as_u16() == 200 => Ok(()),
                Ok(r) => {
                    let code = r.status().as_u16();
                    let text = r.text().await.unwrap_or_default();
                    Err(format!("answered {code} {}", text.trim()))
                }
                // (reqwest's error names the url, never the credentials)
                Err(e) => Err(format!("unreachable: {e}")),
            };
            (name, r)
        };
        let all = futures_join_all(members.iter().map(|(n, u)| one(n.clone(), u.clone())));
        match tokio::time::timeout(timeout + Duration::from_millis(200), all).await {
            Ok(v) => v,
            Err(_) => members
                .iter()
                .map(|(n, _)| (n.clone(), Err("timed out".to_string())))
                .collect(),
        }
    }
}

/// Minimal join_all over tokio (no futures crate dependency): polls all futures concurrently.
async fn futures_join_all<F, T>(futs: impl Iterator<Item = F>) -> Vec<T>
where
    F: std::future::Future<Output = T>,
{
    let futs: Vec<_> = futs.map(Box::pin).collect();
    let mut results: Vec<Option<T>> = futs.iter().map(|_| None).collect();
    let mut futs: Vec<Option<_>> = futs.into_iter().map(Some).collect();
    std::future::poll_fn(|cx| {
        let mut pending = false;
        for (i, slot) in futs.iter_mut().enumerate() {
            if let Some(f) = slot {
                match f.as_mut().poll(cx) {
                    std::task::Poll::Ready(v) => {
                        results[i] = Some(v);
                        *slot = None;
                    }
                    std::task::Poll::Pending => pending = true,
                }
            }
        }
        if pending {
            std::task::Poll::Pending
        } else {
            std::task::Poll::Ready(())
        }
    })
    .await;
    results
        .into_iter()
        .map(|r| r.expect("all futures completed"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replica_body_reports_max_of_received_and_replayed() {
        let b: Value = serde_json::from_str(
            r#"{"state":"running","role":"replica","xlog":{"received_location":200,"replayed_location":150},"timeline":3,"tags":{"failover_priority":2}}"#,
        )
        .unwrap();
        let p = parse_patroni_status(&"n2".into(), &b);
        assert!(p.reachable && !p.is_primary);
        assert_eq!(p.wal_position, Lsn(200));
        assert_eq!(p.timeline, Some(Timeline(3)));
        assert_eq!(p.failover_priority, 2);
    }

    #[test]
    fn primary_body_is_primary_and_missing_xlog_is_unreachable() {
        let b: Value =
            serde_json::from_str(r#"{"role":"primary","xlog":{"location":500}}"#).unwrap();
        assert!(parse_patroni_status(&"n1".into(), &b).is_primary);
        let b: Value = serde_json::from_str(r#"{"state":"stopped","role":"replica"}"#).unwrap();
        assert!(!parse_patroni_status(&"n1".into(), &b).reachable);
    }

    #[test]
    fn nofailover_tag_and_watchdog_failed_are_parsed() {
        let b: Value = serde_json::from_str(
            r#"{"role":"replica","xlog":{"received_location":1},"tags":{"nofailover":true},"watchdog_failed":true}"#,
        )
        .unwrap();
        let p = parse_patroni_status(&"n3".into(), &b);
        assert!(p.nofailover && p.watchdog_failed && !p.is_healthy_candidate());
    }
}
