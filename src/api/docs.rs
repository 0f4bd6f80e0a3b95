//! The REST API's JSON documents that pgherd's own client reads back, as types: the handlers
//! serialise them and `provision::agent_client` deserialises the same types, so the CLI can
//! never drift from what the agent sends (one decoder per wire format).
//!
//! - [`ClusterDoc`]: `GET /cluster` (patroni.md §2.3), built by [`super::cluster::cluster_json`].
//! - [`PatroniDoc`]: the parts of `GET /patroni` (and of every health answer's body) the CLI
//!   reads: state, role, replication state and the `pgherd` object ([`PgherdStatus`], which
//!   [`super::health::status_json`] serialises from the same type).
//!
//! Field order follows Patroni's documents (serde keeps declaration order), and optional
//! fields are left out when absent, as Patroni does.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::status::PgherdStatus;

/// `GET /cluster`: the members sorted by name, the scope, pause and a scheduled switchover.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterDoc {
    #[serde(default)]
    pub members: Vec<ClusterMember>,
    #[serde(default)]
    pub scope: String,
    /// Present (and true) only while automatic failover is paused.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub pause: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_switchover: Option<ScheduledSwitchover>,
}

/// One member of [`ClusterDoc`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ClusterMember {
    pub name: String,
    /// `leader`, `standby_leader`, `sync_standby`, `quorum_standby` or `replica`.
    #[serde(default)]
    pub role: String,
    /// A replica's replication state (`streaming`, `in archive recovery`) when it has one,
    /// else the PostgreSQL state (`running`, `stopped`, `starting`, ...).
    #[serde(default)]
    pub state: String,
    #[serde(default)]
    pub api_url: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub port: Option<u16>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub timeline: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_restart: Option<bool>,
    /// Parameter → `{old_value, new_value}` of the settings that wait for a restart.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub pending_restart_reason: Option<Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduled_restart: Option<Value>,
    #[serde(default, skip_serializing_if = "Map::is_empty")]
    pub tags: Map<String, Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_lag: Option<Lag>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub receive_lsn: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_lag: Option<Lag>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replay_lsn: Option<String>,
    /// Bytes behind the leader's published optime; the leader has none.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lag: Option<Lag>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lsn: Option<String>,
}

/// A lag in bytes, or Patroni's `"unknown"` for a member that never reported a position.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Lag {
    Bytes(u64),
    Text(String),
}

impl Lag {
    /// Patroni's marker for a member without a known position.
    pub fn unknown() -> Lag {
        Lag::Text("unknown".into())
    }

    pub fn bytes(&self) -> Option<u64> {
        match self {
            Lag::Bytes(b) => Some(*b),
            Lag::Text(_) => None,
        }
    }
}

impl std::fmt::Display for Lag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Lag::Bytes(b) => write!(f, "{b}"),
            Lag::Text(t) => f.write_str(t),
        }
    }
}

/// `scheduled_switchover` of [`ClusterDoc`].
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScheduledSwitchover {
    pub at: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub to: Option<String>,
}

impl ClusterMember {
    /// Holds the leader key (`leader`, or `standby_leader` of a standby cluster).
    pub fn is_leader(&self) -> bool {
        matches!(self.role.as_str(), "leader" | "standby_leader")
    }

    /// A replica (also a synchronous or quorum one) streaming from its upstream.
    pub fn is_streaming(&self) -> bool {
        matches!(
            self.role.as_str(),
            "replica" | "sync_standby" | "quorum_standby"
        ) && self.state == "streaming"
    }

    /// A tag set to true (`nofailover: true`; also the strings Patroni accepts as true).
    pub fn tag(&self, name: &str) -> bool {
        crate::dcs::tag_is_true(self.tags.get(name))
    }
}

impl ClusterDoc {
    pub fn member(&self, name: &str) -> Option<&ClusterMember> {
        self.members.iter().find(|m| m.name == name)
    }

    pub fn is_member(&self, name: &str) -> bool {
        self.member(name).is_some()
    }

    /// The member holding the leader key.
    pub fn leader(&self) -> Option<&ClusterMember> {
        self.members.iter().find(|m| m.is_leader())
    }

    pub fn leader_name(&self) -> Option<String> {
        self.leader().map(|m| m.name.clone())
    }

    /// `name` is a replica streaming from its upstream.
    pub fn streaming(&self, name: &str) -> bool {
        self.member(name).is_some_and(ClusterMember::is_streaming)
    }

    /// How many replicas stream.
    pub fn streaming_count(&self) -> usize {
        self.members.iter().filter(|m| m.is_streaming()).count()
    }
}

/// What the CLI reads of `GET /patroni` (the rest of the document is for Patroni's clients).
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
pub struct PatroniDoc {
    /// `running`, `stopped`, `starting`, ... (`unknown` when the agent cannot query PostgreSQL).
    #[serde(default)]
    pub state: String,
    /// `primary`, `replica`, `standby_leader`, ...
    #[serde(default)]
    pub role: String,
    /// A replica's `streaming` / `in archive recovery`.
    #[serde(default)]
    pub replication_state: Option<String>,
    /// A parameter change waits for a restart.
    #[serde(default)]
    pub pending_restart: bool,
    /// The pgherd extension: what the agent runs with and why its last job failed.
    #[serde(default)]
    pub pgherd: PgherdStatus,
}

impl PatroniDoc {
    /// A replica whose PostgreSQL runs and streams from its upstream.
    pub fn streaming_replica(&self) -> bool {
        self.role == "replica"
            && self.state == "running"
            && self.replication_state.as_deref() == Some("streaming")
    }

    /// The agent's account for an error message: role, state and the last clone / bootstrap /
    /// config error it reports.
    pub fn reason(&self) -> String {
        let mut out = format!(
            "role {}, state {}",
            or_unknown(&self.role),
            or_unknown(&self.state)
        );
        let p = &self.pgherd;
        for (e, what) in [
            (&p.clone_error, "clone failed"),
            (&p.bootstrap_error, "bootstrap failed"),
            (&p.config_error, "config refused"),
            (&p.dcs_config_error, "DCS config refused"),
        ] {
            if let Some(e) = e {
                out.push_str(&format!("; {what}: {e}"));
            }
        }
        out
    }
}

fn or_unknown(s: &str) -> &str {
    if s.is_empty() { "?" } else { s }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_cluster_document_round_trips_and_leaves_absent_fields_out() {
        let v = json!({
            "members": [
                {"name": "n1", "role": "leader", "state": "running", "api_url": "http://a/patroni",
                 "host": "10.0.0.1", "port": 5432, "timeline": 3},
                {"name": "n2", "role": "sync_standby", "state": "streaming", "api_url": "",
                 "tags": {"nofailover": true}, "lag": 0, "lsn": "0/3000060"},
                {"name": "n3", "role": "replica", "state": "stopped", "api_url": "",
                 "lag": "unknown", "lsn": "unknown"}
            ],
            "scope": "demo"
        });
        let doc: ClusterDoc = serde_json::from_value(v.clone()).unwrap();
        assert_eq!(serde_json::to_value(&doc).unwrap(), v);
        assert_eq!(doc.leader_name().as_deref(), Some("n1"));
        assert!(doc.streaming("n2") && !doc.streaming("n3") && !doc.streaming("n1"));
        assert_eq!(doc.streaming_count(), 1);
        assert!(doc.member("n2").unwrap().tag("nofailover"));
        assert_eq!(doc.member("n3").unwrap().lag, Some(Lag::unknown()));
        assert_eq!(
            doc.member("n2").unwrap().lag.as_ref().unwrap().bytes(),
            Some(0)
        );
    }

    #[test]
    fn the_agents_reason_names_its_last_failure() {
        let d: PatroniDoc = serde_json::from_value(json!({
            "state": "stopped", "role": "replica",
            "pgherd": {"clone_error": "pg_basebackup: connection refused"}
        }))
        .unwrap();
        assert_eq!(
            d.reason(),
            "role replica, state stopped; clone failed: pg_basebackup: connection refused"
        );
        assert!(!d.streaming_replica());
    }
}
