//! Walking the playbook: each stage runs its scheduled changes on its hosts, in the batches
//! its `serial` setting allows (the leader last for the agent's service steps), with a
//! `systemctl daemon-reload` before a host's next service action after a unit changed, and
//! the waits its kind asks for; the cluster-level steps (`dcs_config`, `etcd_members`,
//! `remove_departed`, `restart_pending`) hand over to their modules. The run stops after a
//! stage in which any host failed.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Semaphore;
use tokio::task::JoinSet;

use super::commands::run_action;
use super::probes::{find_leader, wait_condition, wait_service_healthy, wait_until};
use super::{ApplyOptions, Fleet, Progress, ProvisionError, stages};
use crate::provision::dcs_config;
use crate::provision::desired::DeploySpec;
use crate::provision::facts::HostFacts;
use crate::provision::plan::{Action, Plan, Planned, PlannedStep};
use crate::provision::playbook::{Parallelism, StepKind, WaitCondition};
use crate::provision::remote::agent_client;
use crate::provision::schedule::Stage;
use crate::provision::services::{self, Service, ServiceMode, ServiceOp};
use crate::provision::{departed, etcd_members, rolling};

fn summary(s: &PlannedStep) -> String {
    match &s.planned {
        Planned::Change { summary, .. } => summary.clone(),
        Planned::Noop(r) => r.clone(),
    }
}

/// Runs `steps` of each host (host name → steps), hosts in parallel (at most `limit`'s permits
/// at once), steps in order. All hosts run to the end of their list; errors are collected.
async fn run_parallel(
    fleet: &Fleet,
    work: Vec<(String, ServiceMode, Vec<PlannedStep>)>,
    progress: &Progress,
    limit: &Arc<Semaphore>,
    done: &mut Vec<(String, String, String)>,
) -> Result<(), ProvisionError> {
    let mut set = JoinSet::new();
    for (host, mode, steps) in work {
        if steps.is_empty() {
            continue;
        }
        let t = fleet.get(&host).cloned().expect("fleet covers the plan");
        let p = progress.clone();
        let limit = limit.clone();
        set.spawn(async move {
            let _permit = limit.acquire_owned().await.expect("semaphore never closed");
            let mut ok = Vec::new();
            for s in steps {
                let Planned::Change { action, .. } = &s.planned else {
                    continue;
                };
                p.msg(&host, &format!("{}: {}", s.name, summary(&s)));
                if let Err(source) = run_action(t.as_ref(), mode, action).await {
                    return (
                        ok,
                        Some(ProvisionError::Step {
                            host: host.clone(),
                            step: s.name.clone(),
                            source,
                        }),
                    );
                }
                ok.push((host.clone(), s.name.clone(), summary(&s)));
            }
            (ok, None)
        });
    }
    let mut errs = Vec::new();
    while let Some(j) = set.join_next().await {
        let (ok, err) = j.expect("apply task panicked");
        done.extend(ok);
        errs.extend(err);
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(ProvisionError::from_many(errs))
    }
}

/// Hosts with work in `stage`, in the order they run: inventory order, except that for the
/// agent's `service` steps the current leader goes last (a rolling restart moves the leader
/// once, when every replica already runs the new inputs).
fn run_order(
    stage: &Stage,
    svc: Option<Service>,
    leader: Option<&str>,
) -> Vec<(String, ServiceMode, Vec<PlannedStep>)> {
    let mut hosts: Vec<_> = stage
        .hosts
        .iter()
        .filter(|(_, _, s)| !s.is_empty())
        .cloned()
        .collect();
    if svc == Some(Service::Agent) {
        hosts.sort_by_key(|(h, _, _)| Some(h.as_str()) == leader);
    }
    hosts
}

/// Splits hosts into the batches a step's `serial` setting allows at once.
fn batches<T>(hosts: Vec<T>, p: Parallelism) -> Vec<Vec<T>> {
    let n = match p {
        Parallelism::Parallel => usize::MAX,
        Parallelism::Serial(n) => n.get(),
    };
    let mut out: Vec<Vec<T>> = Vec::new();
    for h in hosts {
        match out.last_mut() {
            Some(b) if b.len() < n => b.push(h),
            _ => out.push(vec![h]),
        }
    }
    out
}

fn is_unit_upload(s: &PlannedStep) -> bool {
    matches!(&s.planned, Planned::Change { action: Action::Upload(f) | Action::FixMetadata(f), .. } if services::is_unit_file(&f.path))
}

fn is_service_action(s: &PlannedStep) -> bool {
    matches!(
        &s.planned,
        Planned::Change {
            action: Action::Service(..) | Action::StopUnit(_),
            ..
        }
    )
}

fn daemon_reload_step() -> PlannedStep {
    PlannedStep {
        name: "systemd".into(),
        planned: Planned::Change {
            action: Action::DaemonReload,
            summary: "daemon-reload (unit files changed)".into(),
            diff: None,
        },
    }
}

/// systemd mode: a changed unit takes effect at the host's next service action only after
/// `systemctl daemon-reload`, so one is inserted before that action (after the uploads of the
/// same batch). `dirty` holds the hosts with units written since their last daemon-reload.
fn insert_daemon_reloads(
    batch: &mut [(String, ServiceMode, Vec<PlannedStep>)],
    dirty: &mut BTreeSet<String>,
) {
    for (host, mode, steps) in batch.iter_mut() {
        if *mode != ServiceMode::Systemd {
            continue;
        }
        let wrote_units = dirty.contains(host.as_str()) || steps.iter().any(is_unit_upload);
        if wrote_units && steps.iter().any(is_service_action) {
            let at = steps
                .iter()
                .position(is_service_action)
                .unwrap_or(steps.len());
            steps.insert(at, daemon_reload_step());
            dirty.remove(host.as_str());
        } else if wrote_units {
            dirty.insert(host.clone());
        }
    }
}

/// Runs one batch of a step: daemon-reloads inserted where units changed, then the hosts'
/// changes in parallel (bounded by `limit`).
async fn run_batch(
    fleet: &Fleet,
    mut batch: Vec<(String, ServiceMode, Vec<PlannedStep>)>,
    dirty: &mut BTreeSet<String>,
    progress: &Progress,
    limit: &Arc<Semaphore>,
    done: &mut Vec<(String, String, String)>,
) -> Result<(), ProvisionError> {
    insert_daemon_reloads(&mut batch, dirty);
    run_parallel(fleet, batch, progress, limit, done).await
}

/// Walks the playbook: each step runs its scheduled changes (see
/// [`crate::provision::schedule`]) on its hosts, in the batches its `serial` setting allows,
/// and the run stops after a step in which any host failed.
pub(super) async fn execute_stages(
    spec: &DeploySpec,
    fleet: &Fleet,
    plan: &Plan,
    facts: &BTreeMap<String, HostFacts>,
    opts: &ApplyOptions,
    progress: &Progress,
    done: &mut Vec<(String, String, String)>,
) -> Result<(), ProvisionError> {
    let stages = stages(spec, plan, facts)?;
    let limit = Arc::new(Semaphore::new(opts.max_parallel.max(1)));
    let agents = agent_client(spec);
    let mut dirty_units: BTreeSet<String> = BTreeSet::new();
    for stage in &stages {
        let step = &stage.step;
        let before = done.len();
        match &step.kind {
            StepKind::WaitFor {
                condition,
                timeout_secs,
            } => {
                // Nothing changed yet in this run: the state the facts showed stands, and a
                // wait would only cost round trips.
                if done.is_empty() {
                    continue;
                }
                let hosts = stage.hosts.iter().map(|(h, _, _)| h.clone()).collect();
                wait_condition(
                    spec,
                    fleet,
                    hosts,
                    *condition,
                    Duration::from_secs(*timeout_secs),
                    progress,
                )
                .await?;
            }
            StepKind::BootstrapPrimary { timeout_secs } => {
                let work = run_order(stage, None, None);
                let hosts: Vec<String> = work.iter().map(|(h, _, _)| h.clone()).collect();
                run_batch(fleet, work, &mut dirty_units, progress, &limit, done).await?;
                for h in hosts {
                    progress.msg(&h, "waiting until it leads");
                    wait_until(
                        &h,
                        "its agent leads the cluster (GET /primary = 200)",
                        Duration::from_secs(*timeout_secs),
                        || {
                            let (agents, h) = (agents.clone(), h.clone());
                            async move { agents.is_primary(&h).await }
                        },
                    )
                    .await?;
                }
            }
            StepKind::StartReplicas { timeout_secs } => {
                let work = run_order(stage, None, None);
                let hosts: Vec<String> = work.iter().map(|(h, _, _)| h.clone()).collect();
                for batch in batches(work, step.parallelism) {
                    run_batch(fleet, batch, &mut dirty_units, progress, &limit, done).await?;
                }
                // Newly started members must stream before the proxy routes to them.
                wait_condition(
                    spec,
                    fleet,
                    hosts,
                    WaitCondition::ReplicasStreaming,
                    Duration::from_secs(*timeout_secs),
                    progress,
                )
                .await?;
            }
            StepKind::Service { name, .. } => {
                let svc = Service::ALL.into_iter().find(|s| s.name() == name);
                let leader = if svc == Some(Service::Agent) && stage.has_work() {
                    find_leader(spec).await
                } else {
                    None
                };
                let work = run_order(stage, svc, leader.as_deref());
                let serial = matches!(step.parallelism, Parallelism::Serial(_));
                for batch in batches(work, step.parallelism) {
                    let hosts: Vec<String> = batch.iter().map(|(h, _, _)| h.clone()).collect();
                    let signalled = agents_signalled(&batch);
                    run_batch(fleet, batch, &mut dirty_units, progress, &limit, done).await?;
                    // A reload is done when the agent says it runs the new file, not when the
                    // signal was sent; one that refused it fails the run with its reason.
                    for h in signalled {
                        if let Some(sha) = spec.host(&h).and_then(|t| {
                            t.files
                                .iter()
                                .find(|f| f.path == crate::render::AGENT_CONFIG_PATH)
                                .map(|f| f.sha256())
                        }) {
                            progress.msg(&h, "waiting until the agent runs the new agent.yml");
                            dcs_config::wait_config_loaded(spec, &h, &sha, opts.wait_timeout)
                                .await?;
                        }
                    }
                    // Rolling: the next batch only when this one is healthy again.
                    if let (true, Some(svc)) = (serial, svc) {
                        for h in hosts {
                            wait_service_healthy(spec, fleet, &h, svc, opts.wait_timeout, progress)
                                .await?;
                        }
                    }
                }
            }
            StepKind::DcsConfig { timeout_secs } => {
                // Nothing planned and nothing changed in this run: the live config matched.
                let planned = plan.cluster.config.as_ref().is_some_and(|c| !c.is_noop());
                if !planned && done.is_empty() {
                    continue;
                }
                let hosts: Vec<String> = stage.hosts.iter().map(|(h, _, _)| h.clone()).collect();
                run_dcs_config(spec, fleet, plan, &hosts, *timeout_secs, progress, done).await?;
            }
            StepKind::EtcdMembers { timeout_secs } => {
                // Planned against the facts of this run: nothing to change, nothing to re-read.
                let planned = matches!(&plan.cluster.etcd, Some(Ok(p)) if !p.changes.is_empty());
                if planned {
                    let report = |h: &str, m: &str| progress.msg(h, m);
                    etcd_members::run(
                        spec,
                        fleet,
                        Duration::from_secs(*timeout_secs),
                        opts.ssh_control_dir.clone(),
                        &report,
                        done,
                    )
                    .await?;
                }
            }
            StepKind::RemoveDeparted { timeout_secs } => {
                // Planned against the facts of this run; a re-run re-plans from fresh facts.
                if let Some(Ok(p)) = &plan.cluster.departed
                    && !p.is_empty()
                {
                    let report = |h: &str, m: &str| progress.msg(h, m);
                    departed::run(
                        spec,
                        fleet,
                        p,
                        Duration::from_secs(*timeout_secs),
                        opts.ssh_control_dir.clone(),
                        &report,
                        done,
                    )
                    .await?;
                }
            }
            StepKind::RestartPending { .. } => {
                run_restart_pending(spec, fleet, plan, progress, done).await?;
            }
            StepKind::EnsurePackages { .. }
            | StepKind::EnsureDirectory { .. }
            | StepKind::EnsureUser { .. }
            | StepKind::Render { .. }
            | StepKind::UploadBinary { .. } => {
                let work = run_order(stage, None, None);
                for batch in batches(work, step.parallelism) {
                    run_batch(fleet, batch, &mut dirty_units, progress, &limit, done).await?;
                }
            }
        }
        // Report what this step did under the step's name.
        for d in done.iter_mut().skip(before) {
            d.1 = format!("{}: {}", step.name, d.1);
        }
    }
    // Units written but no service action after them on the host: reload systemd anyway, so
    // the next start (boot, operator) sees them.
    if !dirty_units.is_empty() {
        let work = plan
            .hosts
            .iter()
            .filter(|hp| dirty_units.contains(&hp.host))
            .map(|hp| (hp.host.clone(), hp.mode, vec![daemon_reload_step()]))
            .collect();
        run_parallel(fleet, work, progress, &limit, done).await?;
    }
    for h in &plan.hosts {
        progress.msg(&h.host, "done");
    }
    Ok(())
}

/// Hosts of `batch` whose agent is reloaded or restarted.
fn agents_signalled(batch: &[(String, ServiceMode, Vec<PlannedStep>)]) -> Vec<String> {
    batch
        .iter()
        .filter(|(_, _, steps)| {
            steps.iter().any(|s| {
                matches!(
                    s.planned,
                    Planned::Change {
                        action: Action::Service(
                            Service::Agent,
                            ServiceOp::Reload | ServiceOp::Restart
                        ),
                        ..
                    }
                )
            })
        })
        .map(|(h, _, _)| h.clone())
        .collect()
}

/// How the `dcs_config` step labels what it did (the restart step looks for it).
const DCS_CONFIG_STEP: &str = "DCS config";

/// The `dcs_config` step: re-reads the live config (the run may have bootstrapped or changed
/// the cluster), refuses when it moved since the plan was shown (an operator's concurrent
/// edit), writes the inventory's keys with a compare-and-swap and waits until every running
/// selected agent applied them.
async fn run_dcs_config(
    spec: &DeploySpec,
    fleet: &Fleet,
    plan: &Plan,
    hosts: &[String],
    timeout_secs: u64,
    progress: &Progress,
    done: &mut Vec<(String, String, String)>,
) -> Result<(), ProvisionError> {
    let Some(desired) = &spec.dcs_config else {
        return Ok(());
    };
    let cluster = dcs_config::gather(spec, fleet).await?;
    let Some(live) = &cluster.config else {
        return Ok(());
    };
    if let Some(shown) = plan.cluster.config.as_ref().and_then(|c| c.revision)
        && live.revision != Some(shown)
    {
        return Err(dcs_config::ClusterConfigError::Conflict { revision: shown }.into());
    }
    let cp = dcs_config::plan_config(
        desired,
        Some(live),
        cluster.leader.as_deref(),
        &cluster.settings,
    )
    .map_err(dcs_config::ClusterConfigError::from)?;
    if cp.is_noop() {
        return Ok(());
    }
    let running: Vec<String> = hosts
        .iter()
        .filter(|h| cluster.agents.get(*h).is_some_and(|a| a.state == "running"))
        .cloned()
        .collect();
    for h in &running {
        progress.msg(h, "applying the cluster configuration");
    }
    dcs_config::write_and_wait(spec, &cp, &running, Duration::from_secs(timeout_secs)).await?;
    let who = cluster.leader.clone().unwrap_or_else(|| "cluster".into());
    for c in &cp.changes {
        done.push((who.clone(), DCS_CONFIG_STEP.into(), c.to_string()));
    }
    Ok(())
}

/// The `restart_pending` step: the rolling restart of the members pending restart (see
/// [`super::rolling`]). Runs when the plan expected restarts (a restart-needing config change,
/// members pending already, servers left drained) or when this run wrote the DCS config.
async fn run_restart_pending(
    spec: &DeploySpec,
    fleet: &Fleet,
    plan: &Plan,
    progress: &Progress,
    done: &mut Vec<(String, String, String)>,
) -> Result<(), ProvisionError> {
    let wrote_config = done.iter().any(|d| d.1 == DCS_CONFIG_STEP);
    if !plan.cluster.restarts_expected() && !wrote_config {
        return Ok(());
    }
    let Some(inv) = &spec.inventory else {
        return Ok(());
    };
    let say = |line: &str| progress.msg("cluster", line);
    let opts = rolling::RollingOptions {
        primary_update_method: inv.postgresql.primary_update_method,
    };
    let report = rolling::run_pending_restarts(inv, fleet, &opts, &say).await?;
    for (member, what) in report.done {
        done.push((member, "rolling restart".into(), what));
    }
    Ok(())
}
