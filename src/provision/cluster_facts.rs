//! The cluster facts: what the live cluster says beside each host's facts ([`super::facts`]),
//! read once per run (`apply::gather_cluster`) and planned against by
//! [`super::plan::plan_with_cluster`]: the DCS config key with the leader and what each agent
//! reports ([`super::dcs_config`]), the etcd membership ([`super::etcd_members`]), the DCS
//! members for the departed-member planner ([`super::departed`]) and the HAProxy servers an
//! interrupted run left drained. Plain data: each part is gathered by its own module.

use super::dcs_config::ConfigFacts;
use super::departed::DepartedFacts;
use super::etcd_members::EtcdFacts;

/// Cluster facts: what the live cluster says, next to the per-host facts.
#[derive(Debug, Clone, Default)]
pub struct ClusterFacts {
    /// The DCS `config` key, the leader, its `pg_settings` and each agent's report
    /// ([`super::dcs_config::gather`]).
    pub dcs: ConfigFacts,
    /// `(HAProxy host, member)` left drained in the replica backend (filled by the caller
    /// from HAProxy's admin socket).
    pub drained: Vec<(String, String)>,
    /// The live etcd membership (`None`: embedded etcd not running anywhere yet, or external;
    /// [`super::etcd_members::gather`]).
    pub etcd: Option<EtcdFacts>,
    /// The DCS members (`GET /cluster`) for the departed-member planner (`None`: no agent
    /// answered; [`super::departed::gather`]).
    pub departed: Option<DepartedFacts>,
}
