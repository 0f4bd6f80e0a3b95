//! Executing a [`Plan`] over transports by walking the playbook (`playbooks/deploy.yml`):
//!
//! 1. **facts** on every host (read-only; a host that cannot be read stops the run before any
//!    host is changed);
//! 2. the plan is split into the playbook's steps ([`schedule`](super::schedule)): the
//!    playbook decides *when*, the planner decides *what*;
//! 3. each step runs on its hosts — all at once, or in batches with `serial` — and waits where
//!    its kind says: `bootstrap_primary` until the first primary leads, `start_replicas` until
//!    each started member streams, `wait_for` until its condition holds (skipped while nothing
//!    has changed in the run), a `serial` service step until the service is healthy on each
//!    batch before the next (rolling: never two etcd members or two PostgreSQL members in
//!    transition). For the agent's service steps the current leader goes last.
//!
//! With the built-in deploy playbook this is: packages and files everywhere; etcd members
//! started together (a new etcd cluster only forms when a quorum starts), changed members
//! restarted one at a time; the first primary alone, then the replicas; changed agents
//! restarted or reloaded replicas first; HAProxy started or reloaded (seamless), then waited
//! on until it routes the primary port to the leader only.
//!
//! A step runs on all its hosts to the end even when one host fails, and the run stops before
//! the next step: every host is left either done with a step or not started on it, and a
//! re-run (facts → plan again) converges from there.
//!
//! The run's parts: [`observe`] (host and cluster facts, then the pure planner: the read-only
//! half, also what `plan` shows), [`steps`] (walking the playbook's stages), [`commands`]
//! (what one planned action runs on a host), [`probes`] (the readiness waits) and
//! [`progress`] (per-host progress lines).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use super::desired::DeploySpec;
use super::facts::{FactsError, HostFacts};
use super::plan::Plan;
use super::playbook::{PlaybookError, StepKind};
use super::services::{Service, ServiceOp};
use crate::transport::TransportError;

mod commands;
mod observe;
mod probes;
mod progress;
mod steps;

pub use super::remote::Fleet;
pub use observe::{
    facts_and_plan, fresh_cluster, gather_all, gather_all_timed, gather_cluster, make_plan,
    refusal, stages,
};
pub use probes::{find_leader, haproxy_settled, postgres_answers};
pub use progress::Progress;

/// Why a run stopped. Every variant names the host(s) involved.
#[derive(Debug, thiserror::Error)]
pub enum ProvisionError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Facts(#[from] FactsError),
    #[error(transparent)]
    Playbook(#[from] PlaybookError),
    #[error("host {host}: step `{step}` failed")]
    Step {
        host: String,
        step: String,
        #[source]
        source: TransportError,
    },
    #[error("host {host}: timed out after {timeout:?} waiting until {what}")]
    Wait {
        host: String,
        what: String,
        timeout: Duration,
    },
    #[error("{}", join_errors(.0))]
    Several(Vec<ProvisionError>),
    #[error("cluster configuration")]
    Cluster(#[from] super::dcs_config::ClusterConfigError),
    #[error("rolling restart")]
    Rolling(#[from] super::rolling::executor::RollingError),
    #[error("etcd membership")]
    EtcdMembers(#[from] super::etcd_members::EtcdMembersError),
    #[error("departed members")]
    Departed(#[from] super::departed::DepartedError),
}

fn join_errors(errs: &[ProvisionError]) -> String {
    let mut s = format!("{} host(s) failed:", errs.len());
    for e in errs {
        s.push_str("\n  - ");
        s.push_str(&crate::provision::error_chain(e));
    }
    s
}

impl ProvisionError {
    /// One error, or [`ProvisionError::Several`].
    pub fn from_many(mut errs: Vec<ProvisionError>) -> ProvisionError {
        if errs.len() == 1 {
            errs.remove(0)
        } else {
            ProvisionError::Several(errs)
        }
    }
}

/// Tuning of `apply`.
#[derive(Debug, Clone)]
pub struct ApplyOptions {
    /// How long a `serial` service step waits for the service to be healthy again on each
    /// host before the next (the playbook's `wait_for`, `bootstrap_primary` and
    /// `start_replicas` steps carry their own timeouts).
    pub wait_timeout: Duration,
    /// Draw indicatif bars (only effective on a TTY); otherwise plain log lines on stderr.
    pub progress: bool,
    /// At most this many hosts work at once within a step (uploads of the agent binary to a
    /// large fleet would otherwise all start together).
    pub max_parallel: usize,
    /// Where SSH control sockets to hosts that left the inventory go (the `etcd_members` step
    /// cleans up removed etcd members there); `None`: a directory under the system temp dir.
    pub ssh_control_dir: Option<std::path::PathBuf>,
}

/// Default of [`ApplyOptions::max_parallel`].
pub const DEFAULT_MAX_PARALLEL: usize = 16;

impl Default for ApplyOptions {
    fn default() -> Self {
        ApplyOptions {
            wait_timeout: Duration::from_secs(120),
            progress: true,
            max_parallel: DEFAULT_MAX_PARALLEL,
            ssh_control_dir: None,
        }
    }
}

/// What `apply` did.
#[derive(Debug, Clone)]
pub struct ApplyReport {
    /// The plan that was executed.
    pub plan: Plan,
    /// `(host, step, summary)` of every change made, in order.
    pub done: Vec<(String, String, String)>,
    pub elapsed: Duration,
}

impl ApplyReport {
    /// Service operations performed on `host`.
    pub fn service_ops(&self, host: &str) -> Vec<(Service, ServiceOp)> {
        self.plan
            .host(host)
            .map(|h| {
                Service::ALL
                    .into_iter()
                    .filter_map(|s| h.service_op(s).map(|op| (s, op)))
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// Executes `plan` (normally fresh from [`make_plan`]).
pub async fn execute(
    spec: &DeploySpec,
    fleet: &Fleet,
    plan: Plan,
    facts: &BTreeMap<String, HostFacts>,
    opts: &ApplyOptions,
) -> Result<ApplyReport, ProvisionError> {
    let started = Instant::now();
    if let Some(e) = refusal(spec, &plan) {
        return Err(e);
    }
    // Planned membership changes need the step that makes them (a joining host's etcd.conf
    // and start are left to it), or the run would report success for what it did not do.
    if matches!(&plan.cluster.etcd, Some(Ok(p)) if !p.changes.is_empty())
        && !spec
            .playbook
            .steps
            .iter()
            .any(|s| matches!(s.kind, StepKind::EtcdMembers { .. }))
    {
        return Err(PlaybookError::Invalid {
            path: spec.playbook_origin.clone(),
            problems: vec![crate::inventory::Problem {
                pos: None,
                field: "steps".into(),
                message: "etcd membership must change (see the plan) but no step of the playbook is an etcd_members step (put one after the etcd config and unit steps, before the step starting etcd)".into(),
            }],
        }
        .into());
    }
    let names: Vec<String> = plan.hosts.iter().map(|h| h.host.clone()).collect();
    let progress = Progress::new(&names, opts.progress);
    let mut done = Vec::new();
    let r = steps::execute_stages(spec, fleet, &plan, facts, opts, &progress, &mut done).await;
    progress.finish();
    r?;
    Ok(ApplyReport {
        plan,
        done,
        elapsed: started.elapsed(),
    })
}

/// facts → plan → execute.
pub async fn apply(
    spec: &DeploySpec,
    fleet: &Fleet,
    opts: &ApplyOptions,
) -> Result<ApplyReport, ProvisionError> {
    let started = Instant::now();
    let (facts, plan) = facts_and_plan(spec, fleet).await?;
    let mut report = execute(spec, fleet, plan, &facts, opts).await?;
    report.elapsed = started.elapsed();
    Ok(report)
}
