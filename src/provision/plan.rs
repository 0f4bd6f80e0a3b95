//! The planner: desired state ([`DeploySpec`]) + facts ([`HostFacts`]) → [`Plan`], a list of
//! per-host steps, each either a change (with the exact action and, for files, a unified diff)
//! or "no change" with the reason. It is pure and synchronous — no transport, no clock — so
//! every branch is tested with fixture facts (tests/provision_plan.rs), and `plan` shows exactly
//! what `apply` would do: apply executes the same [`Plan`] value.
//!
//! Notify rule: a service is restarted or reloaded only when one of its inputs changed in this
//! plan (its config file, its run file / unit, or the agent binary), never "just in case". That
//! is what makes a second `apply` with an unchanged inventory leave every pid alone.

use std::collections::{BTreeMap, BTreeSet};

use super::cluster_facts::ClusterFacts;
use super::dcs_config::{ConfigPlan, ConfigRefusal};
use super::desired::{DeploySpec, DesiredDir, DesiredFile, DesiredUser, EtcdSpec, HostTarget};
use super::facts::HostFacts;
use super::services::{
    self, AGENT_BIN_PATH, BOOT_PATH, SUPERVISE_PATH, Service, ServiceMode, ServiceOp,
};
use crate::transport::REDACTED;

/// What executing a step does.
#[derive(Debug, Clone)]
pub enum Action {
    InstallPackages(Vec<String>),
    /// Create a missing user.
    CreateUser(DesiredUser),
    MakeDirs(Vec<DesiredDir>),
    /// Write the file (content differs or it is missing).
    Upload(DesiredFile),
    /// Same content: only mode/owner differ.
    FixMetadata(DesiredFile),
    /// systemd only: unit files changed.
    DaemonReload,
    /// systemd only: stop and disable a distribution unit.
    StopUnit(String),
    Service(Service, ServiceOp),
}

/// A step's outcome in the plan.
#[derive(Debug, Clone)]
pub enum Planned {
    Change {
        action: Action,
        /// One line for the change table.
        summary: String,
        /// Unified diff (files only; secrets redacted).
        diff: Option<String>,
    },
    Noop(String),
}

/// One step of a host's plan.
#[derive(Debug, Clone)]
pub struct PlannedStep {
    /// `packages`, `directories`, `file /etc/...`, `service etcd`, ...
    pub name: String,
    pub planned: Planned,
}

impl PlannedStep {
    pub fn is_change(&self) -> bool {
        matches!(self.planned, Planned::Change { .. })
    }
}

/// The plan of one host.
#[derive(Debug, Clone)]
pub struct HostPlan {
    pub host: String,
    pub mode: ServiceMode,
    pub steps: Vec<PlannedStep>,
}

impl HostPlan {
    pub fn changes(&self) -> impl Iterator<Item = &PlannedStep> {
        self.steps.iter().filter(|s| s.is_change())
    }

    /// The service operation planned for `svc`, if any.
    pub fn service_op(&self, svc: Service) -> Option<ServiceOp> {
        self.steps.iter().find_map(|s| match &s.planned {
            Planned::Change {
                action: Action::Service(x, op),
                ..
            } if *x == svc => Some(*op),
            _ => None,
        })
    }
}

/// The cluster-level part of a plan: what the live cluster (DCS, agents) needs, beside the
/// hosts' files and services.
#[derive(Debug, Clone, Default)]
pub struct ClusterPlan {
    /// The DCS `config` change; `None` when no agent answered (nothing to plan against yet).
    pub config: Option<ConfigPlan>,
    /// The etcd membership changes, or why they are refused; `None` without embedded etcd.
    pub etcd: Option<Result<super::etcd_members::MemberPlan, super::etcd_members::Refusal>>,
    /// The removal of DCS members that left the inventory, or why it is refused; `None` when
    /// no agent answered.
    pub departed: Option<Result<super::departed::DeparturePlan, super::departed::Refusal>>,
    /// Members whose agents report `pending_restart` now (a restart step will restart them).
    pub pending_restart: Vec<String>,
    /// `(HAProxy host, member)` left drained in the replica backend by an interrupted run.
    pub drained: Vec<(String, String)>,
    /// The leader and the other running members, as the agents report them.
    pub leader: Option<String>,
    pub replicas: Vec<String>,
}

impl ClusterPlan {
    /// Whether the `restart_pending` step has work: members pending now, or a config change
    /// that needs restarts.
    pub fn restarts_expected(&self) -> bool {
        !self.pending_restart.is_empty()
            || !self.drained.is_empty()
            || self.config.as_ref().is_some_and(|c| c.needs_restart())
    }

    pub fn change_count(&self) -> usize {
        let etcd = match &self.etcd {
            Some(Ok(p)) => p.changes.len(),
            Some(Err(_)) => 1,
            None => 0,
        };
        let departed = match &self.departed {
            Some(Ok(p)) => p.steps.len(),
            Some(Err(_)) => 1,
            None => 0,
        };
        self.config.as_ref().map_or(0, |c| c.changes.len())
            + self.pending_restart.len()
            + self.drained.len()
            + etcd
            + departed
    }
}

/// The whole plan.
#[derive(Debug, Clone)]
pub struct Plan {
    pub hosts: Vec<HostPlan>,
    pub cluster: ClusterPlan,
}

impl Plan {
    pub fn change_count(&self) -> usize {
        self.hosts
            .iter()
            .map(|h| h.changes().count())
            .sum::<usize>()
            + self.cluster.change_count()
    }

    pub fn is_noop(&self) -> bool {
        self.change_count() == 0
    }

    pub fn host(&self, name: &str) -> Option<&HostPlan> {
        self.hosts.iter().find(|h| h.host == name)
    }
}

/// Replaces every secret in `text`.
pub fn redact_all(text: &str, secrets: &[String]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s.as_str(), REDACTED);
    }
    out
}

/// Unified diff old → new of a text file, secrets redacted on both sides; when only secret
/// values differ, a note says so instead of an (empty) diff.
pub fn file_diff(path: &str, old: Option<&[u8]>, new: &[u8], secrets: &[String]) -> Option<String> {
    let new_s = std::str::from_utf8(new).ok()?;
    let old_s = match old {
        Some(b) => std::str::from_utf8(b).ok()?.to_string(),
        None => String::new(),
    };
    let old_r = redact_all(&old_s, secrets);
    let new_r = redact_all(new_s, secrets);
    if old.is_some() && old_r == new_r {
        // The only differences are secret values: say so without showing either.
        return Some(format!(
            "--- a{path}\n+++ b{path}\n(only secret values differ; both redacted)\n"
        ));
    }
    let d = similar::TextDiff::from_lines(&old_r, &new_r);
    let from = if old.is_some() {
        format!("a{path}")
    } else {
        "/dev/null".to_string()
    };
    let text = d
        .unified_diff()
        .context_radius(3)
        .header(&from, &format!("b{path}"))
        .to_string();
    Some(text)
}

fn file_mode_differs(want: u32, have: &str) -> bool {
    u32::from_str_radix(have, 8)
        .map(|m| m != want)
        .unwrap_or(true)
}

fn owner_differs(want: &str, have: &str) -> bool {
    if want.contains(':') {
        want != have
    } else {
        have.split(':').next() != Some(want)
    }
}

/// Whether `f` is the etcd config of an initialised member of `h` and differs from what is on
/// the host only in settings etcd reads at its first start.
fn etcd_initial_only(
    spec: &DeploySpec,
    h: &HostTarget,
    facts: &HostFacts,
    f: &DesiredFile,
) -> bool {
    let Some(e) = &spec.etcd else {
        return false;
    };
    if !h.roles.etcd || f.path != e.config_path {
        return false;
    }
    if !matches!(facts.dirs.get(&e.member_dir()), Some(Some(_))) {
        return false;
    }
    let (Some(old), Ok(new)) = (
        facts.old_contents.get(&f.path),
        std::str::from_utf8(&f.content),
    ) else {
        return false;
    };
    super::etcd_members::differs_only_in_initial_settings(&String::from_utf8_lossy(old), new)
}

/// Plans one host (pure).
pub fn plan_host(spec: &DeploySpec, h: &HostTarget, facts: &HostFacts) -> HostPlan {
    let mode = facts.mode;
    let mut steps = Vec::new();
    let change =
        |name: String, action: Action, summary: String, diff: Option<String>| PlannedStep {
            name,
            planned: Planned::Change {
                action,
                summary,
                diff,
            },
        };
    let noop = |name: String, why: String| PlannedStep {
        name,
        planned: Planned::Noop(why),
    };

    // Packages: only the missing ones are installed (in the lab they all come from /usr).
    if !h.packages.is_empty() {
        let missing: Vec<String> = h
            .packages
            .iter()
            .filter(|p| !facts.packages.get(*p).copied().unwrap_or(false))
            .cloned()
            .collect();
        if missing.is_empty() {
            steps.push(noop(
                "packages".into(),
                format!("all {} packages installed", h.packages.len()),
            ));
        } else {
            let s = format!("install {}", missing.join(" "));
            steps.push(change(
                "packages".into(),
                Action::InstallPackages(missing),
                s,
                None,
            ));
        }
    }

    // Users: created when absent, never modified (an existing account is the operator's).
    for u in &h.users {
        let name = format!("user {}", u.name);
        if facts.users.get(&u.name).copied().unwrap_or(false) {
            steps.push(noop(name, "present".into()));
        } else {
            let what = format!(
                "create{}{}",
                if u.system { " (system)" } else { "" },
                if u.groups.is_empty() {
                    String::new()
                } else {
                    format!(" in {}", u.groups.join(","))
                }
            );
            steps.push(change(name, Action::CreateUser(u.clone()), what, None));
        }
    }

    // Directories.
    let dirs = spec.dirs_for(h, mode);
    let missing: Vec<DesiredDir> = dirs
        .iter()
        .filter(|d| match facts.dirs.get(&d.path) {
            Some(Some(owner)) => owner_differs(&d.owner, owner),
            _ => true,
        })
        .cloned()
        .collect();
    if missing.is_empty() {
        steps.push(noop(
            "directories".into(),
            format!("all {} directories present", dirs.len()),
        ));
    } else {
        let s = format!(
            "create/fix {}",
            missing
                .iter()
                .map(|d| d.path.as_str())
                .collect::<Vec<_>>()
                .join(" ")
        );
        steps.push(change(
            "directories".into(),
            Action::MakeDirs(missing),
            s,
            None,
        ));
    }

    // Files; remember which service each change notifies.
    let mut notify: BTreeMap<Service, ServiceOp> = BTreeMap::new();
    let mut bump = |svc: Service, op: ServiceOp| {
        let e = notify.entry(svc).or_insert(op);
        // A restart subsumes a reload.
        if op == ServiceOp::Restart {
            *e = ServiceOp::Restart;
        }
    };
    let mut units_changed = false;
    let mut agent_restart_why: Option<String> = None;
    for f in spec.files_for(h, mode) {
        let name = format!("file {}", f.path);
        let want = f.sha256();
        let content_changed = match facts.file(&f.path) {
            None => {
                let diff = if f.path == AGENT_BIN_PATH {
                    None
                } else {
                    file_diff(&f.path, None, &f.content, &spec.secrets)
                };
                steps.push(change(
                    name,
                    Action::Upload(f.clone()),
                    format!("create ({} bytes, mode {:o})", f.content.len(), f.mode),
                    diff,
                ));
                true
            }
            // etcd reads initial-* only when its data directory is empty: rewriting (and
            // restarting) an initialised member for them would change nothing.
            Some(cur) if cur.sha256 != want && etcd_initial_only(spec, h, facts, &f) => {
                steps.push(noop(
                    name,
                    "differs only in initial-* settings, which etcd reads only when it first starts"
                        .into(),
                ));
                false
            }
            Some(cur) if cur.sha256 != want => {
                let diff = facts
                    .old_contents
                    .get(&f.path)
                    .filter(|_| f.path != AGENT_BIN_PATH)
                    .and_then(|old| file_diff(&f.path, Some(old), &f.content, &spec.secrets));
                let what = if f.path == AGENT_BIN_PATH {
                    format!(
                        "replace binary (sha256 {} → {})",
                        &cur.sha256[..12],
                        &want[..12]
                    )
                } else {
                    "update content".to_string()
                };
                steps.push(change(name, Action::Upload(f.clone()), what, diff));
                true
            }
            Some(cur)
                if file_mode_differs(f.mode, &cur.mode) || owner_differs(&f.owner, &cur.owner) =>
            {
                steps.push(change(
                    name,
                    Action::FixMetadata(f.clone()),
                    format!(
                        "fix mode/owner ({} {} → {:o} {})",
                        cur.mode, cur.owner, f.mode, f.owner
                    ),
                    None,
                ));
                false
            }
            Some(_) => {
                steps.push(noop(name, format!("up to date (sha256 {})", &want[..12])));
                false
            }
        };
        if !content_changed {
            continue;
        }
        // Who must notice this change, and how.
        if f.path == AGENT_BIN_PATH {
            bump(Service::Agent, ServiceOp::Restart);
        } else if f.path == SUPERVISE_PATH {
            // A new supervisor loop only takes effect for loops started afterwards; running
            // services keep their (equivalent) old loop until their next restart. Restarting
            // PostgreSQL's agent for a comment change would be worse.
        } else if f.path == BOOT_PATH {
            // Read only at boot.
        } else if let Some(svc) = Service::ALL.into_iter().find(|s| s.run_file() == f.path) {
            bump(svc, ServiceOp::Restart);
        } else if services::is_unit_file(&f.path) {
            units_changed = true;
            if let Some(svc) = services::service_for_path(&f.path) {
                bump(svc, ServiceOp::Restart);
            }
        } else if f.path == crate::render::AGENT_CONFIG_PATH {
            // A running agent takes most of its config on reload; what it cannot take (its
            // name, listen address, data directory, ...) needs an agent restart.
            match agent_restart_keys(facts.old_contents.get(&f.path), &f.content) {
                Some(keys) if !keys.is_empty() => {
                    bump(Service::Agent, ServiceOp::Restart);
                    agent_restart_why = Some(format!(
                        "restart (agent.yml changes {}, which a running agent cannot take on reload)",
                        keys.join(", ")
                    ));
                }
                _ => bump(Service::Agent, ServiceOp::Reload),
            }
        } else if let Some(svc) = services::service_for_path(&f.path) {
            bump(svc, svc.config_change_op());
        }
    }
    if mode == ServiceMode::Systemd {
        for u in &h.stop_units {
            let name = format!("unit {u}");
            if facts.units.get(u).copied().unwrap_or(false) {
                steps.push(change(
                    name,
                    Action::StopUnit(u.clone()),
                    "stop and disable (pgherd runs this service itself)".into(),
                    None,
                ));
            } else {
                steps.push(noop(name, "inactive and disabled".into()));
            }
        }
        if units_changed {
            steps.push(change(
                "systemd".into(),
                Action::DaemonReload,
                "daemon-reload".into(),
                None,
            ));
        } else {
            steps.push(noop("systemd".into(), "unit files unchanged".into()));
        }
    }

    // The agent reports which config file it runs with: one that is on disk but not loaded (an
    // apply cut between writing agent.yml and the reload, or a reload the agent refused) is
    // reloaded again, so an interrupted run converges.
    let mut reasons: BTreeMap<Service, String> = BTreeMap::new();
    if let Some(why) = agent_restart_why {
        reasons.insert(Service::Agent, why);
    }
    if let (Some(agent), Some(want)) = (
        &facts.agent,
        spec.files_for(h, mode)
            .into_iter()
            .find(|f| f.path == crate::render::AGENT_CONFIG_PATH),
    ) && facts.service(Service::Agent).running()
        && !notify.contains_key(&Service::Agent)
        && facts
            .file(&want.path)
            .is_some_and(|f| f.sha256 == want.sha256())
        && let Some(have) = &agent.config_sha256
        && *have != want.sha256()
    {
        notify.insert(Service::Agent, ServiceOp::Reload);
        let why = match &agent.config_error {
            Some(e) => {
                format!("reload (agent.yml written but not in force: the agent refused it: {e})")
            }
            None => format!(
                "reload (agent.yml written but not loaded yet: the agent runs sha256 {})",
                &have[..have.len().min(12)]
            ),
        };
        reasons.insert(Service::Agent, why);
    }

    // Services: start what is not running; otherwise act only on notified changes.
    for svc in h.services() {
        let name = format!("service {svc}");
        let fact = facts.service(svc);
        if !fact.running() {
            steps.push(change(
                name,
                Action::Service(svc, ServiceOp::Start),
                "start (not running)".into(),
                None,
            ));
        } else if let Some(op) = notify.get(&svc) {
            let why = match (reasons.remove(&svc), op) {
                (Some(why), _) => why,
                (None, ServiceOp::Restart) => "restart (binary, run file or unit changed)".into(),
                (None, _) => "reload (configuration changed)".into(),
            };
            steps.push(change(name, Action::Service(svc, *op), why, None));
        } else {
            let pid = fact
                .pid
                .or(fact.manager_pid)
                .map(|p| p.to_string())
                .unwrap_or_else(|| "?".into());
            steps.push(noop(name, format!("running (pid {pid}), inputs unchanged")));
        }
    }
    HostPlan {
        host: h.name.clone(),
        mode,
        steps,
    }
}

/// The settings whose change needs an agent restart, from the old and new agent.yml; `None`
/// when either does not parse (then the reload reports the agent's own verdict).
fn agent_restart_keys(old: Option<&Vec<u8>>, new: &[u8]) -> Option<Vec<&'static str>> {
    let parse = |b: &[u8]| {
        crate::config::AgentConfig::parse(
            &String::from_utf8_lossy(b),
            crate::render::AGENT_CONFIG_PATH,
        )
        .ok()
    };
    Some(crate::config::restart_required(&parse(old?)?, &parse(new)?))
}

/// Plans every host that has facts (pure). Hosts are in inventory order.
pub fn plan(spec: &DeploySpec, facts: &BTreeMap<String, HostFacts>) -> Plan {
    let hosts = spec
        .hosts
        .iter()
        .filter_map(|h| facts.get(&h.name).map(|f| plan_host(spec, h, f)))
        .collect();
    Plan {
        hosts,
        cluster: ClusterPlan::default(),
    }
}

/// [`plan`] plus the cluster-level part from the live cluster's facts (pure). Refuses (nothing
/// is run) when the DCS config change cannot be planned, e.g. an unknown parameter.
pub fn plan_with_cluster(
    spec: &DeploySpec,
    facts: &BTreeMap<String, HostFacts>,
    cluster: &ClusterFacts,
) -> Result<Plan, ConfigRefusal> {
    let mut p = plan(spec, facts);
    // Members about to be added: inventory postgres hosts whose agent does not answer yet.
    let members: Vec<&HostTarget> = spec.hosts.iter().filter(|h| h.roles.postgres).collect();
    let adding = members
        .iter()
        .filter(|h| !cluster.dcs.agents.contains_key(&h.name))
        .count();
    super::dcs_config::add_headroom(
        &cluster.dcs.settings,
        cluster.dcs.leader.as_deref(),
        members.len(),
        adding,
    )?;
    if let Some(desired) = &spec.dcs_config
        && cluster.dcs.config.is_some()
    {
        p.cluster.config = Some(super::dcs_config::plan_config(
            desired,
            cluster.dcs.config.as_ref(),
            cluster.dcs.leader.as_deref(),
            &cluster.dcs.settings,
        )?);
    }
    if let Some(e) = &spec.etcd {
        let opts = super::etcd_members::PlanOptions {
            allow_degraded_etcd: e.allow_degraded,
        };
        let members = super::etcd_members::plan_members(&e.members, cluster.etcd.as_ref(), opts);
        if let Ok(mp) = &members {
            hand_joins_to_members_step(&mut p, e, &mp.joining_hosts());
        }
        p.cluster.etcd = Some(members);
    }
    p.cluster.departed = cluster.departed.as_ref().map(|d| {
        super::departed::plan_departures(
            d,
            &spec
                .hosts
                .iter()
                .filter(|h| h.roles.postgres)
                .map(|h| h.name.clone())
                .collect(),
            &super::departed::PlanOptions::default(),
        )
    });
    p.cluster.leader = cluster.dcs.leader.clone();
    p.cluster.drained = cluster.drained.clone();
    p.cluster.replicas = cluster
        .dcs
        .agents
        .iter()
        .filter(|(n, a)| Some(n.as_str()) != cluster.dcs.leader.as_deref() && a.state == "running")
        .map(|(n, _)| n.clone())
        .collect();
    p.cluster.pending_restart = cluster
        .dcs
        .agents
        .iter()
        .filter(|(_, a)| a.pending_restart)
        .map(|(n, _)| n.clone())
        .collect();
    Ok(p)
}

/// A host joining a running etcd cluster gets its etcd.conf (`initial-cluster-state:
/// existing`, the member list etcd returns) and its start from the `etcd_members` step, after
/// `member add`: the render and start steps must not write the fresh-cluster config or start
/// it first (it would try to form a cluster of its own).
fn hand_joins_to_members_step(p: &mut Plan, e: &EtcdSpec, joining: &BTreeSet<String>) {
    for hp in p.hosts.iter_mut().filter(|hp| joining.contains(&hp.host)) {
        let cfg = format!("file {}", e.config_path);
        for s in &mut hp.steps {
            let why = match &s.planned {
                Planned::Change { .. } if s.name == cfg => {
                    "written by the etcd_members step after `member add` (joins the running cluster: initial-cluster-state existing)"
                }
                Planned::Change {
                    action: Action::Service(Service::Etcd, _),
                    ..
                } => {
                    "started by the etcd_members step once it is a member (as a learner, then promoted)"
                }
                _ => continue,
            };
            s.planned = Planned::Noop(why.into());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::agent_restart_keys;

    const VALID: &str = include_str!("../../tests/fixtures/agent/valid.yml");

    #[test]
    fn an_agent_yml_change_a_running_agent_cannot_take_needs_a_restart() {
        let new = VALID.replace("listen: 127.0.0.1:8008", "listen: 127.0.0.1:8018");
        assert_eq!(
            agent_restart_keys(Some(&VALID.as_bytes().to_vec()), new.as_bytes()),
            Some(vec!["restapi.listen"])
        );
    }

    #[test]
    fn a_password_change_is_taken_on_reload() {
        let new = VALID.replace("password: s3cret", "password: n3w-s3cret");
        assert_ne!(new, VALID);
        assert_eq!(
            agent_restart_keys(Some(&VALID.as_bytes().to_vec()), new.as_bytes()),
            Some(vec![])
        );
    }
}
