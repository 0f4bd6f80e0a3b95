//! `pgherd status`: the cluster as its agents report it (`GET /cluster`, Patroni's shape),
//! typed once ([`ClusterStatus`]) and shown either as the operator's table or, with `--json`,
//! as one JSON document for scripts (members, roles, states, timelines, lag, and the
//! connection strings through every HAProxy). Passwords are never part of either: the
//! connection strings name the user and say where the password file is.

use std::fmt;

use serde::Serialize;

use crate::api::docs::ClusterDoc;
use crate::inventory::{Inventory, Role};
use crate::provision::agent_client::AgentClient;

/// The cluster, as one status document.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterStatus {
    pub cluster: String,
    pub namespace: String,
    /// The member holding the leader key, when there is one.
    pub leader: Option<String>,
    /// Automatic failover off (`pgherd pause`).
    pub paused: bool,
    pub members: Vec<MemberStatus>,
    /// How clients connect: through each HAProxy.
    pub connect: Vec<Endpoint>,
    /// Where the password of `user` is kept.
    pub secrets_file: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemberStatus {
    pub name: String,
    pub host: String,
    pub port: Option<u64>,
    /// `leader`, `sync_standby`, `replica`, ... (Patroni's roles).
    pub role: String,
    /// `running`, `streaming`, `stopped`, `creating replica`, ...
    pub state: String,
    pub timeline: Option<u64>,
    /// Replication lag in bytes (replicas).
    pub lag: Option<u64>,
    pub api_url: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Endpoint {
    /// The HAProxy host.
    pub balancer: String,
    pub read_write: String,
    pub read_only: String,
}

impl ClusterStatus {
    /// From a `GET /cluster` answer (pure).
    pub fn from_cluster(inv: &Inventory, cluster: &ClusterDoc) -> ClusterStatus {
        let members: Vec<MemberStatus> = cluster
            .members
            .iter()
            .map(|m| MemberStatus {
                name: m.name.clone(),
                host: m.host.clone().unwrap_or_default(),
                port: m.port.map(u64::from),
                role: m.role.clone(),
                state: m.state.clone(),
                timeline: m.timeline.map(u64::from),
                lag: m.lag.as_ref().and_then(|l| l.bytes()),
                api_url: (!m.api_url.is_empty()).then(|| m.api_url.clone()),
            })
            .collect();
        let conninfo = |host: &str, port: u16| {
            format!("host={host} port={port} user=postgres dbname=postgres")
        };
        ClusterStatus {
            cluster: inv.cluster.clone(),
            namespace: inv.namespace.clone(),
            leader: members
                .iter()
                .find(|m| matches!(m.role.as_str(), "leader" | "standby_leader"))
                .map(|m| m.name.clone()),
            paused: cluster.pause,
            members,
            connect: inv
                .hosts_with(Role::Haproxy)
                .map(|h| Endpoint {
                    balancer: h.name.to_string(),
                    read_write: conninfo(&h.address, inv.haproxy.primary_port),
                    read_only: conninfo(&h.address, inv.haproxy.replica_port),
                })
                .collect(),
            secrets_file: inv.secrets_file.display().to_string(),
        }
    }
}

impl fmt::Display for ClusterStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "cluster {} (namespace {}){}",
            self.cluster,
            self.namespace,
            if self.paused {
                ", paused: automatic failover off"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "{:<12} {:<16} {:<12} {:<10} {:>3} {:>10}",
            "member", "host", "role", "state", "TL", "lag(B)"
        )?;
        let opt = |v: Option<u64>| v.map(|x| x.to_string()).unwrap_or_default();
        for m in &self.members {
            writeln!(
                f,
                "{:<12} {:<16} {:<12} {:<10} {:>3} {:>10}",
                m.name,
                format!("{}:{}", m.host, opt(m.port)),
                m.role,
                m.state,
                opt(m.timeline),
                opt(m.lag)
            )?;
        }
        writeln!(
            f,
            "connect through HAProxy (user postgres, password in {}):",
            self.secrets_file
        )?;
        for e in &self.connect {
            writeln!(f, "  read-write: psql \"{}\"", e.read_write)?;
            writeln!(f, "  read-only:  psql \"{}\"", e.read_only)?;
        }
        Ok(())
    }
}

/// Reads the cluster from the inventory's agents.
pub async fn cluster_status(inv: &Inventory) -> anyhow::Result<ClusterStatus> {
    let c = AgentClient::for_inventory(inv).cluster().await?;
    Ok(ClusterStatus::from_cluster(inv, &c))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn inv() -> Inventory {
        crate::inventory::parse(
            "cluster: demo\nhosts:\n  - name: n1\n    address: 10.0.0.1\n    roles: [postgres, etcd, haproxy]\n  - name: n2\n    address: 10.0.0.2\n    roles: [postgres, etcd, haproxy]\n  - name: n3\n    address: 10.0.0.3\n    roles: [postgres, etcd]\n",
            "t.yml",
        )
        .unwrap()
    }

    use serde_json::Value;

    fn cluster() -> ClusterDoc {
        serde_json::from_value(serde_json::json!({
            "members": [
                {"name": "n1", "role": "leader", "state": "running", "host": "10.0.0.1",
                 "port": 5432, "timeline": 3, "api_url": "http://10.0.0.1:8008/patroni"},
                {"name": "n2", "role": "sync_standby", "state": "streaming", "host": "10.0.0.2",
                 "port": 5432, "timeline": 3, "lag": 0},
                {"name": "n3", "role": "replica", "state": "streaming", "host": "10.0.0.3",
                 "port": 5432, "timeline": 3, "lag": 1024}
            ],
            "pause": true
        }))
        .unwrap()
    }

    #[test]
    fn the_json_carries_members_roles_lag_timeline_and_connection_strings() {
        let st = ClusterStatus::from_cluster(&inv(), &cluster());
        let v: Value = serde_json::from_str(&serde_json::to_string(&st).unwrap()).unwrap();
        assert_eq!(v["leader"], "n1");
        assert_eq!(v["paused"], true);
        assert_eq!(v["members"][1]["role"], "sync_standby");
        assert_eq!(v["members"][2]["lag"], 1024);
        assert_eq!(v["members"][0]["lag"], Value::Null);
        assert_eq!(v["members"][0]["timeline"], 3);
        // Only the two HAProxy hosts, with both ports; no password anywhere.
        assert_eq!(v["connect"].as_array().unwrap().len(), 2);
        assert_eq!(
            v["connect"][1]["read_write"],
            "host=10.0.0.2 port=5000 user=postgres dbname=postgres"
        );
        assert_eq!(
            v["connect"][1]["read_only"],
            "host=10.0.0.2 port=5001 user=postgres dbname=postgres"
        );
        let pw = inv().secrets.superuser.expose().to_string();
        assert!(!v.to_string().contains(&pw));
    }

    #[test]
    fn the_table_shows_every_member_and_the_pause() {
        let text = ClusterStatus::from_cluster(&inv(), &cluster()).to_string();
        assert!(text.contains("paused: automatic failover off"), "{text}");
        let row = text.lines().find(|l| l.starts_with("n3")).unwrap();
        assert!(
            row.contains("replica") && row.contains("streaming") && row.ends_with("1024"),
            "{row}"
        );
        assert!(
            text.contains("read-only:  psql \"host=10.0.0.1 port=5001"),
            "{text}"
        );
    }
}
