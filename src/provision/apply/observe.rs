//! The read-only half of a run: every host's facts in parallel, the cluster facts (through
//! the agents, etcd and HAProxy), then the pure planner on them, and the refusals checked
//! before any host is touched. What `plan` shows is exactly what `apply` then executes.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use tokio::task::JoinSet;

use super::{Fleet, ProvisionError};
use crate::provision::cluster_facts::ClusterFacts;
use crate::provision::dcs_config;
use crate::provision::desired::DeploySpec;
use crate::provision::facts::{self, HostFacts};
use crate::provision::plan::{self, Plan};
use crate::provision::playbook::{PlaybookError, StepKind};
use crate::provision::schedule::{self, Stage};
use crate::provision::services::Service;
use crate::provision::{departed, etcd_members, rolling};

/// Reads facts of all hosts in parallel. Any failure is returned (naming the hosts) before
/// anything is changed.
pub async fn gather_all(
    spec: &DeploySpec,
    fleet: &Fleet,
) -> Result<BTreeMap<String, HostFacts>, ProvisionError> {
    Ok(gather_all_timed(spec, fleet).await?.0)
}

/// [`gather_all`], also returning how long each host took (for `--timings`).
pub async fn gather_all_timed(
    spec: &DeploySpec,
    fleet: &Fleet,
) -> Result<(BTreeMap<String, HostFacts>, BTreeMap<String, Duration>), ProvisionError> {
    let mut set = JoinSet::new();
    for h in &spec.hosts {
        let Some(t) = fleet.get(&h.name).cloned() else {
            continue;
        };
        let q = spec.fact_query(h);
        let wanted = spec.wanted_sha(h);
        let name = h.name.clone();
        set.spawn(async move {
            let t0 = Instant::now();
            let r = facts::gather(t.as_ref(), &q, &wanted).await;
            (name, r, t0.elapsed())
        });
    }
    let mut out = BTreeMap::new();
    let mut took = BTreeMap::new();
    let mut errs = Vec::new();
    while let Some(j) = set.join_next().await {
        let (name, r, elapsed) = j.expect("facts task panicked");
        tracing::debug!(host = %name, ms = elapsed.as_millis() as u64, "facts gathered");
        took.insert(name.clone(), elapsed);
        match r {
            Ok(f) => {
                out.insert(name, f);
            }
            Err(e) => errs.push(ProvisionError::Facts(e)),
        }
    }
    if errs.is_empty() {
        Ok((out, took))
    } else {
        Err(ProvisionError::from_many(errs))
    }
}

/// Reads the cluster facts (live DCS config, leader, the leader's pg_settings, what each agent
/// reports) and records each agent's report in its host's facts.
pub async fn gather_cluster(
    spec: &DeploySpec,
    fleet: &Fleet,
    facts: &mut BTreeMap<String, HostFacts>,
) -> Result<ClusterFacts, ProvisionError> {
    let mut cluster = ClusterFacts {
        dcs: dcs_config::gather(spec, fleet).await?,
        ..ClusterFacts::default()
    };
    cluster.etcd = etcd_members::gather(spec, fleet).await?;
    cluster.departed = departed::gather(spec, cluster.dcs.config.as_ref().map(|c| &c.value)).await;
    // A moved member's old etcd peer still healthy is life at the old address, too.
    if let (Some(d), Some(e)) = (&mut cluster.departed, &cluster.etcd) {
        for mv in &mut d.moved {
            for m in e.members.iter().filter(|m| e.is_up(m)) {
                if m.peer_urls
                    .iter()
                    .any(|u| departed::url_host(u).as_deref() == Some(mv.old.as_str()))
                {
                    mv.alive
                        .push(format!("its etcd member {} is healthy", m.label()));
                }
            }
        }
    }
    for (host, a) in &cluster.dcs.agents {
        if let Some(f) = facts.get_mut(host) {
            f.agent = Some(a.clone());
        }
    }
    if let Some(inv) = &spec.inventory {
        cluster.drained = rolling::haproxy::drained_now(inv, fleet).await;
    }
    Ok(cluster)
}

/// Host facts, cluster facts, then the pure planner: what `plan` shows and `apply` runs.
pub async fn facts_and_plan(
    spec: &DeploySpec,
    fleet: &Fleet,
) -> Result<(BTreeMap<String, HostFacts>, Plan), ProvisionError> {
    let mut facts = gather_all(spec, fleet).await?;
    let cluster = gather_cluster(spec, fleet, &mut facts).await?;
    let plan = plan::plan_with_cluster(spec, &facts, &cluster)
        .map_err(dcs_config::ClusterConfigError::from)?;
    if let Some(e) = refusal(spec, &plan) {
        return Err(e);
    }
    Ok((facts, plan))
}

/// Why `plan` must not run, checked before any host is touched: a refused departure or move
/// (see [`departure_refusal`]), or a refused etcd membership change.
pub fn refusal(spec: &DeploySpec, plan: &Plan) -> Option<ProvisionError> {
    if let Some(e) = departure_refusal(spec, plan) {
        return Some(e);
    }
    match &plan.cluster.etcd {
        Some(Err(r)) => Some(etcd_members::EtcdMembersError::Refused(r.clone()).into()),
        _ => None,
    }
}

/// A refused departure (the departing member leads, sync capacity, paused, several at once)
/// stops the run before any host is touched; planned departures need the step that makes them.
fn departure_refusal(spec: &DeploySpec, plan: &Plan) -> Option<ProvisionError> {
    match &plan.cluster.departed {
        Some(Err(r)) => Some(departed::DepartedError::Refused(r.clone()).into()),
        Some(Ok(p))
            if !p.is_empty()
                && !spec
                    .playbook
                    .steps
                    .iter()
                    .any(|s| matches!(s.kind, StepKind::RemoveDeparted { .. })) =>
        {
            Some(PlaybookError::Invalid {
                path: spec.playbook_origin.clone(),
                problems: vec![crate::inventory::Problem {
                    pos: None,
                    field: "steps".into(),
                    message: format!(
                        "members left the inventory or moved ({}) but no step of the playbook is a remove_departed step (put one before the etcd membership and HAProxy config steps)",
                        {
                            let mut who: Vec<&str> = p.steps.iter().map(|s| s.member()).collect();
                            who.dedup();
                            who.join(", ")
                        }
                    ),
                }],
            }
            .into())
        }
        _ => None,
    }
}

/// facts → plan (pure planner).
pub async fn make_plan(spec: &DeploySpec, fleet: &Fleet) -> Result<Plan, ProvisionError> {
    Ok(facts_and_plan(spec, fleet).await?.1)
}

/// Whether no agent runs on any postgres host: then the bootstrap step starts the first
/// primary alone (it, not a racing replica with an empty data dir, runs initdb and takes the
/// leader key).
pub fn fresh_cluster(spec: &DeploySpec, facts: &BTreeMap<String, HostFacts>) -> bool {
    !spec.hosts.iter().filter(|h| h.roles.postgres).any(|h| {
        facts
            .get(&h.name)
            .is_some_and(|f| f.service(Service::Agent).running())
    })
}

/// The stages a run of `plan` would execute (for `plan`'s run-order listing).
pub fn stages(
    spec: &DeploySpec,
    plan: &Plan,
    facts: &BTreeMap<String, HostFacts>,
) -> Result<Vec<Stage>, PlaybookError> {
    schedule::build(spec, plan, fresh_cluster(spec, facts))
}
