//! The peer probes' test doubles: [`FakePeerProbe`] (fixed answers) and [`StatusPeerProbe`]
//! (answers derived from other in-process agents' published [`AgentStatus`], for the
//! multi-agent simulation). Compiled only for tests and with the `testing` feature.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;

use super::{PeerProbe, PeerStatus};
use crate::dcs::{Member, Tags};
use crate::status::AgentStatus;
use crate::types::MemberName;

/// Test double: answers from a table set by the test; unknown members are unreachable.
#[derive(Default, Clone)]
pub struct FakePeerProbe {
    answers: Arc<Mutex<BTreeMap<MemberName, PeerStatus>>>,
}

impl FakePeerProbe {
    pub fn new() -> FakePeerProbe {
        FakePeerProbe::default()
    }

    pub fn set(&self, status: PeerStatus) {
        self.answers
            .lock()
            .expect("peer table")
            .insert(status.name.clone(), status);
    }

    pub fn remove(&self, name: &MemberName) {
        self.answers.lock().expect("peer table").remove(name);
    }
}

#[async_trait]
impl PeerProbe for FakePeerProbe {
    async fn fetch(&self, members: &[Member], _timeout: Duration) -> Vec<PeerStatus> {
        let t = self.answers.lock().expect("peer table");
        members
            .iter()
            .map(|m| {
                t.get(&m.name)
                    .cloned()
                    .unwrap_or_else(|| PeerStatus::unreachable(m.name.clone()))
            })
            .collect()
    }
}

/// What `GET /patroni` would report for an agent, reduced to a [`PeerStatus`] (used by
/// [`StatusPeerProbe`]; the REST API builds the full JSON itself).
pub fn peer_status_from_agent(name: &MemberName, s: &AgentStatus) -> PeerStatus {
    if !s.pg.running || !s.pg.accepting_connections {
        // No SQL answer → no xlog section → Patroni counts the member as unreachable.
        return PeerStatus::unreachable(name.clone());
    }
    let t = Tags::from_map(&s.tags);
    PeerStatus {
        name: name.clone(),
        reachable: true,
        is_primary: s.pg.is_running_primary(),
        wal_position: s.pg.wal_position(),
        timeline: s.pg.timeline,
        nofailover: t.nofailover,
        failover_priority: t.failover_priority,
        watchdog_failed: s.watchdog_failed,
    }
}

/// Each agent's status channel and whether it is reachable.
type AgentTable = BTreeMap<MemberName, (watch::Receiver<AgentStatus>, bool)>;

/// Test double for multi-agent simulations: each member's answer is derived from that
/// agent's latest published [`AgentStatus`]; a member can be made unreachable (partition,
/// crashed agent).
#[derive(Default, Clone)]
pub struct StatusPeerProbe {
    agents: Arc<Mutex<AgentTable>>,
}

impl StatusPeerProbe {
    pub fn new() -> StatusPeerProbe {
        StatusPeerProbe::default()
    }

    /// Registers (or replaces) an agent's status channel; it starts reachable.
    pub fn register(&self, name: MemberName, rx: watch::Receiver<AgentStatus>) {
        self.agents.lock().expect("agents").insert(name, (rx, true));
    }

    pub fn set_reachable(&self, name: &MemberName, reachable: bool) {
        if let Some(e) = self.agents.lock().expect("agents").get_mut(name) {
            e.1 = reachable;
        }
    }
}

#[async_trait]
impl PeerProbe for StatusPeerProbe {
    async fn fetch(&self, members: &[Member], _timeout: Duration) -> Vec<PeerStatus> {
        let a = self.agents.lock().expect("agents");
        members
            .iter()
            .map(|m| match a.get(&m.name) {
                Some((rx, true)) => peer_status_from_agent(&m.name, &rx.borrow()),
                _ => PeerStatus::unreachable(m.name.clone()),
            })
            .collect()
    }
}
