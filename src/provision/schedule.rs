//! The schedule: which step of the playbook executes each change of a [`Plan`]. `apply` walks
//! the playbook's steps in file order and runs, at each step, exactly the planned changes this
//! module assigns to it, so the playbook (data) decides the order of a run and the planner
//! (facts) decides what is needed. Pure: no transport, no clock.
//!
//! Assignment, per host (the step must select the host):
//! - a package → the first `ensure_packages` step that lists it;
//! - a directory → the `ensure_directory` step with that path; directories pgherd needs on
//!   its own (`/etc/pgherd`, parents of files, the supervisor's directories) → the host's first
//!   `ensure_directory` / `render` / `upload_binary` step, before that step's own work;
//! - a file → the `render` / `upload_binary` step writing that path; pgherd's support files
//!   of a service (run file, HAProxy server-state script and drop-in) → the first step writing
//!   a file of that service; the supervisor loop and boot hook → the first preparing step;
//! - a distribution unit to stop → the `service` step stopping it;
//! - starting a service → its first `service` step with `action: start` or `restart`; for
//!   the agent on a fresh cluster (no agent runs anywhere) the `bootstrap_primary` step that
//!   selects the host, otherwise `start_replicas`;
//! - restart / reload of a running service → its `service` step with that action (a reload
//!   may also run at a `restart` step).
//!
//! [`check`] verifies the playbook against the whole desired state before any host is touched:
//! every change that could be planned has a step, and no step would act too early (a service
//! started before its files are written or its packages installed, an agent started before
//! etcd, replicas before the bootstrap). Each problem is a located playbook error.

use std::collections::{BTreeMap, BTreeSet};

use super::desired::{DeploySpec, HostTarget};
use super::plan::{Action, Plan, Planned, PlannedStep};
use super::playbook::{PlaybookError, ServiceAction, Step, StepKind};
use super::services::{self, Service, ServiceMode, ServiceOp};
use crate::inventory::Problem;

/// One thing the planner may change on a host.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Item<'a> {
    Package(&'a str),
    User(&'a str),
    Dir(&'a str),
    File(&'a str),
    StopUnit(&'a str),
    Service(Service, ServiceOp),
}

impl std::fmt::Display for Item<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Item::Package(p) => write!(f, "installs package {p}"),
            Item::User(u) => write!(f, "creates user {u}"),
            Item::Dir(d) => write!(f, "creates directory {d}"),
            Item::File(p) => write!(f, "writes {p}"),
            Item::StopUnit(u) => write!(f, "stops the distribution's {u} service"),
            Item::Service(s, ServiceOp::Start) => write!(f, "starts {s}"),
            Item::Service(s, ServiceOp::Restart) => write!(f, "restarts {s}"),
            Item::Service(s, ServiceOp::Reload) => write!(f, "reloads {s}"),
        }
    }
}

/// The service a file feeds (its config, unit, run file, binary or support file).
pub fn file_service(path: &str) -> Option<Service> {
    if path == services::AGENT_BIN_PATH {
        return Some(Service::Agent);
    }
    if path == services::HAPROXY_STATE_SCRIPT || path == services::HAPROXY_STATE_DROPIN {
        return Some(Service::Haproxy);
    }
    if let Some(s) = Service::ALL.into_iter().find(|s| s.run_file() == path) {
        return Some(s);
    }
    if path == services::SUPERVISE_PATH || path == services::BOOT_PATH {
        return None;
    }
    services::service_for_path(path)
}

fn writes(kind: &StepKind) -> Option<&str> {
    match kind {
        StepKind::Render { dest, .. } | StepKind::UploadBinary { dest, .. } => Some(dest),
        _ => None,
    }
}

fn is_preparing(kind: &StepKind) -> bool {
    matches!(
        kind,
        StepKind::EnsureDirectory { .. } | StepKind::Render { .. } | StepKind::UploadBinary { .. }
    )
}

fn service_step(
    h: &HostTarget,
    svc: Service,
    accept: impl Fn(ServiceAction) -> bool,
) -> Option<usize> {
    h.steps.iter().find_map(|s| match &s.kind {
        StepKind::Service { name, action, .. } if name == svc.name() && accept(*action) => {
            Some(s.index)
        }
        _ => None,
    })
}

/// The step executing `item` on host `h`. `fresh`: no agent runs on any host yet (the
/// bootstrap step starts the first primary).
pub fn slot(h: &HostTarget, item: Item<'_>, fresh: bool) -> Option<usize> {
    let first_preparing = || {
        h.steps
            .iter()
            .find(|s| is_preparing(&s.kind))
            .map(|s| s.index)
    };
    match item {
        Item::Package(p) => h.steps.iter().find_map(|s| match &s.kind {
            StepKind::EnsurePackages { packages } if packages.iter().any(|x| x == p) => {
                Some(s.index)
            }
            _ => None,
        }),
        Item::User(u) => h.steps.iter().find_map(|s| match &s.kind {
            StepKind::EnsureUser { name, .. } if name == u => Some(s.index),
            _ => None,
        }),
        Item::Dir(d) => h
            .steps
            .iter()
            .find_map(|s| match &s.kind {
                StepKind::EnsureDirectory { path, .. } if path == d => Some(s.index),
                _ => None,
            })
            .or_else(first_preparing),
        Item::File(p) => {
            if let Some(s) = h.steps.iter().find(|s| writes(&s.kind) == Some(p)) {
                return Some(s.index);
            }
            let support = p == services::SUPERVISE_PATH
                || p == services::BOOT_PATH
                || p == services::HAPROXY_STATE_SCRIPT
                || p == services::HAPROXY_STATE_DROPIN
                || Service::ALL.iter().any(|s| s.run_file() == p);
            if !support {
                return None;
            }
            match file_service(p) {
                Some(svc) => h.steps.iter().find_map(|s| {
                    writes(&s.kind)
                        .filter(|w| file_service(w) == Some(svc))
                        .map(|_| s.index)
                }),
                None => first_preparing(),
            }
        }
        Item::StopUnit(u) => h.steps.iter().find_map(|s| match &s.kind {
            StepKind::Service {
                name,
                action: ServiceAction::Stop,
                ..
            } if name == u => Some(s.index),
            _ => None,
        }),
        Item::Service(Service::Agent, ServiceOp::Start) => {
            let bootstrap = h
                .steps
                .iter()
                .find(|s| matches!(s.kind, StepKind::BootstrapPrimary { .. }));
            let replicas = h
                .steps
                .iter()
                .find(|s| matches!(s.kind, StepKind::StartReplicas { .. }));
            match (fresh, bootstrap, replicas) {
                (true, Some(b), _) => Some(b.index),
                (_, _, Some(r)) => Some(r.index),
                _ => service_step(h, Service::Agent, |a| {
                    matches!(a, ServiceAction::Start | ServiceAction::Restart)
                }),
            }
        }
        Item::Service(svc, ServiceOp::Start) => service_step(h, svc, |a| {
            matches!(a, ServiceAction::Start | ServiceAction::Restart)
        }),
        Item::Service(svc, ServiceOp::Restart) => {
            service_step(h, svc, |a| a == ServiceAction::Restart)
        }
        Item::Service(svc, ServiceOp::Reload) => {
            service_step(h, svc, |a| a == ServiceAction::Reload)
                .or_else(|| service_step(h, svc, |a| a == ServiceAction::Restart))
        }
    }
}

/// The items a planned change consists of (several for the batched package and directory
/// changes). `DaemonReload` has none: `apply` runs it before a host's next service action
/// after a unit file was written.
pub fn items(action: &Action) -> Vec<Item<'_>> {
    match action {
        Action::InstallPackages(p) => p.iter().map(|p| Item::Package(p)).collect(),
        Action::CreateUser(u) => vec![Item::User(&u.name)],
        Action::MakeDirs(d) => d.iter().map(|d| Item::Dir(&d.path)).collect(),
        Action::Upload(f) | Action::FixMetadata(f) => vec![Item::File(&f.path)],
        Action::StopUnit(u) => vec![Item::StopUnit(u)],
        Action::Service(s, op) => vec![Item::Service(*s, *op)],
        Action::DaemonReload => vec![],
    }
}

/// One playbook step with the planned changes it executes on each selected host.
#[derive(Debug, Clone)]
pub struct Stage {
    pub index: usize,
    pub step: Step,
    /// Selected hosts in inventory order, each with its changes in execution order
    /// (packages and users, directories, files, services); possibly empty.
    pub hosts: Vec<(String, ServiceMode, Vec<PlannedStep>)>,
}

impl Stage {
    pub fn has_work(&self) -> bool {
        self.hosts.iter().any(|(_, _, s)| !s.is_empty())
    }
}

fn order_key(s: &PlannedStep) -> u8 {
    match &s.planned {
        Planned::Change { action, .. } => match action {
            Action::InstallPackages(_) | Action::CreateUser(_) => 0,
            Action::MakeDirs(_) => 1,
            Action::Upload(_) | Action::FixMetadata(_) => 2,
            Action::DaemonReload => 3,
            Action::StopUnit(_) => 4,
            Action::Service(..) => 5,
        },
        Planned::Noop(_) => 9,
    }
}

fn unscheduled(spec: &DeploySpec, host: &str, what: String) -> PlaybookError {
    PlaybookError::Invalid {
        path: spec.playbook_origin.clone(),
        problems: vec![Problem {
            pos: None,
            field: "steps".into(),
            message: format!("no step of the playbook {what} on host {host}"),
        }],
    }
}

/// Splits `plan` into the playbook's stages (one per step, in file order). Fails, naming the
/// host and the change, when a planned change has no step ([`check`] makes that impossible
/// for plans of the same spec).
pub fn build(spec: &DeploySpec, plan: &Plan, fresh: bool) -> Result<Vec<Stage>, PlaybookError> {
    let mut per: BTreeMap<(usize, String), Vec<PlannedStep>> = BTreeMap::new();
    for hp in &plan.hosts {
        let Some(h) = spec.host(&hp.host) else {
            continue;
        };
        for ps in &hp.steps {
            let Planned::Change {
                action,
                summary,
                diff,
            } = &ps.planned
            else {
                continue;
            };
            let mut push = |at: usize, step: PlannedStep| {
                per.entry((at, hp.host.clone())).or_default().push(step);
            };
            match action {
                Action::DaemonReload => {}
                Action::InstallPackages(pkgs) => {
                    let mut by: BTreeMap<usize, Vec<String>> = BTreeMap::new();
                    for p in pkgs {
                        let at = slot(h, Item::Package(p), fresh).ok_or_else(|| {
                            unscheduled(spec, &hp.host, Item::Package(p).to_string())
                        })?;
                        by.entry(at).or_default().push(p.clone());
                    }
                    for (at, pkgs) in by {
                        let summary = format!("install {}", pkgs.join(" "));
                        push(
                            at,
                            PlannedStep {
                                name: ps.name.clone(),
                                planned: Planned::Change {
                                    action: Action::InstallPackages(pkgs),
                                    summary,
                                    diff: None,
                                },
                            },
                        );
                    }
                }
                Action::MakeDirs(dirs) => {
                    let mut by: BTreeMap<usize, Vec<_>> = BTreeMap::new();
                    for d in dirs {
                        let at = slot(h, Item::Dir(&d.path), fresh).ok_or_else(|| {
                            unscheduled(spec, &hp.host, Item::Dir(&d.path).to_string())
                        })?;
                        by.entry(at).or_default().push(d.clone());
                    }
                    for (at, dirs) in by {
                        let summary = format!(
                            "create/fix {}",
                            dirs.iter()
                                .map(|d| d.path.as_str())
                                .collect::<Vec<_>>()
                                .join(" ")
                        );
                        push(
                            at,
                            PlannedStep {
                                name: ps.name.clone(),
                                planned: Planned::Change {
                                    action: Action::MakeDirs(dirs),
                                    summary,
                                    diff: None,
                                },
                            },
                        );
                    }
                }
                _ => {
                    let item = items(action)[0];
                    let at = slot(h, item, fresh)
                        .ok_or_else(|| unscheduled(spec, &hp.host, item.to_string()))?;
                    push(
                        at,
                        PlannedStep {
                            name: ps.name.clone(),
                            planned: Planned::Change {
                                action: action.clone(),
                                summary: summary.clone(),
                                diff: diff.clone(),
                            },
                        },
                    );
                }
            }
        }
    }
    let mut stages = Vec::new();
    for (i, step) in spec.playbook.steps.iter().enumerate() {
        let mut hosts = Vec::new();
        for h in &spec.hosts {
            if !h.steps.iter().any(|s| s.index == i) {
                continue;
            }
            let Some(hp) = plan.host(&h.name) else {
                continue;
            };
            let mut work = per.remove(&(i, h.name.clone())).unwrap_or_default();
            work.sort_by_key(order_key);
            hosts.push((h.name.clone(), hp.mode, work));
        }
        stages.push(Stage {
            index: i,
            step: step.clone(),
            hosts,
        });
    }
    Ok(stages)
}

/// Checks the playbook against the desired state (see the module doc). Run before any host is
/// contacted; the errors point at the offending step's line in the playbook.
pub fn check(spec: &DeploySpec) -> Result<(), PlaybookError> {
    let steps = &spec.playbook.steps;
    // (step, message) → hosts it applies to (one line per problem, not per host).
    let mut problems: BTreeMap<(usize, String), BTreeSet<String>> = BTreeMap::new();
    let mut missing: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    let at = |i: usize| -> String {
        let s = &steps[i];
        match s.pos {
            Some(p) => format!("step {} {:?} (line {})", i + 1, s.name, p.line),
            None => format!("step {} {:?}", i + 1, s.name),
        }
    };
    // Hosts that start the agent on a fresh cluster via bootstrap, and etcd start steps.
    let mut etcd_starts: Vec<usize> = Vec::new();
    let mut bootstrap_steps: Vec<usize> = Vec::new();
    for h in &spec.hosts {
        if h.roles.etcd
            && let Some(i) = slot(h, Item::Service(Service::Etcd, ServiceOp::Start), true)
        {
            etcd_starts.push(i);
        }
        if h.roles.postgres
            && let Some(i) = slot(h, Item::Service(Service::Agent, ServiceOp::Start), true)
            && matches!(steps[i].kind, StepKind::BootstrapPrimary { .. })
        {
            bootstrap_steps.push(i);
        }
    }
    for h in &spec.hosts {
        for mode in [ServiceMode::Systemd, ServiceMode::Supervisor] {
            // Everything that could be planned on the host in this mode (a plan is a subset).
            let files = spec.files_for(h, mode);
            let dirs = spec.dirs_for(h, mode);
            let mut all: Vec<Item<'_>> = h.packages.iter().map(|p| Item::Package(p)).collect();
            all.extend(h.users.iter().map(|u| Item::User(&u.name)));
            all.extend(dirs.iter().map(|d| Item::Dir(&d.path)));
            all.extend(files.iter().map(|f| Item::File(&f.path)));
            if mode == ServiceMode::Systemd {
                all.extend(h.stop_units.iter().map(|u| Item::StopUnit(u)));
            }
            for svc in h.services() {
                all.push(Item::Service(svc, ServiceOp::Start));
                all.push(Item::Service(svc, ServiceOp::Restart));
                if svc.config_change_op() == ServiceOp::Reload {
                    all.push(Item::Service(svc, ServiceOp::Reload));
                }
            }
            for item in &all {
                for fresh in [true, false] {
                    if slot(h, *item, fresh).is_none() {
                        missing
                            .entry(item.to_string())
                            .or_default()
                            .insert(h.name.clone());
                    }
                }
            }
            // Service actions must come after every file of the service and, for starts,
            // after the host's packages and directories.
            let prepared: Vec<(usize, Item<'_>)> = all
                .iter()
                .filter(|i| matches!(i, Item::Package(_) | Item::User(_) | Item::Dir(_)))
                .filter_map(|i| slot(h, *i, true).map(|s| (s, *i)))
                .collect();
            for svc in h.services() {
                let mut ops = Vec::new();
                for op in [ServiceOp::Start, ServiceOp::Restart, ServiceOp::Reload] {
                    for fresh in [true, false] {
                        if let Some(i) = slot(h, Item::Service(svc, op), fresh) {
                            ops.push((i, op));
                        }
                    }
                }
                for f in files.iter().filter(|f| file_service(&f.path) == Some(svc)) {
                    let Some(fi) = slot(h, Item::File(&f.path), true) else {
                        continue;
                    };
                    for (oi, op) in &ops {
                        if fi > *oi {
                            problems
                                .entry((
                                    *oi,
                                    format!(
                                        "step {:?} {} before {} writes {}",
                                        steps[*oi].name,
                                        Item::Service(svc, *op),
                                        at(fi),
                                        f.path
                                    ),
                                ))
                                .or_default()
                                .insert(h.name.clone());
                        }
                    }
                }
                for (oi, op) in ops.iter().filter(|(_, op)| *op == ServiceOp::Start) {
                    for (pi, item) in &prepared {
                        if pi > oi {
                            problems
                                .entry((
                                    *oi,
                                    format!(
                                        "step {:?} {} before {} {item}",
                                        steps[*oi].name,
                                        Item::Service(svc, *op),
                                        at(*pi)
                                    ),
                                ))
                                .or_default()
                                .insert(h.name.clone());
                        }
                    }
                }
                if svc == Service::Agent {
                    for (oi, _) in ops.iter().filter(|(_, op)| *op == ServiceOp::Start) {
                        for ei in etcd_starts.iter().filter(|ei| *ei > oi) {
                            problems
                                .entry((*oi, format!(
                                    "step {:?} starts pgherd-agent before {} starts etcd (the agents need the DCS)",
                                    steps[*oi].name,
                                    at(*ei)
                                )))
                                .or_default()
                                .insert(h.name.clone());
                        }
                    }
                    if let Some(ri) = slot(h, Item::Service(svc, ServiceOp::Start), true)
                        && !matches!(steps[ri].kind, StepKind::BootstrapPrimary { .. })
                    {
                        for bi in bootstrap_steps.iter().filter(|bi| *bi > &ri) {
                            problems
                                .entry((ri, format!(
                                    "step {:?} starts pgherd-agent before {} bootstraps the first primary (replicas clone from it)",
                                    steps[ri].name,
                                    at(*bi)
                                )))
                                .or_default()
                                .insert(h.name.clone());
                        }
                    }
                }
            }
        }
    }
    // The membership step writes a joining member's etcd.conf and starts it: after every etcd
    // file (the unit, the run file) is in place, and before the step that starts etcd (which
    // would otherwise start a joining member with the fresh-cluster config first).
    for h in spec.hosts.iter().filter(|h| h.roles.etcd) {
        let Some(mi) = h
            .steps
            .iter()
            .find(|s| matches!(s.kind, StepKind::EtcdMembers { .. }))
            .map(|s| s.index)
        else {
            continue;
        };
        for mode in [ServiceMode::Systemd, ServiceMode::Supervisor] {
            for f in spec.files_for(h, mode) {
                if file_service(&f.path) != Some(Service::Etcd) {
                    continue;
                }
                if let Some(fi) = slot(h, Item::File(&f.path), false)
                    && fi > mi
                {
                    problems
                        .entry((
                            mi,
                            format!(
                                "step {:?} changes etcd membership before {} writes {}",
                                steps[mi].name,
                                at(fi),
                                f.path
                            ),
                        ))
                        .or_default()
                        .insert(h.name.clone());
                }
            }
        }
        if let Some(si) = slot(h, Item::Service(Service::Etcd, ServiceOp::Start), false)
            && si < mi
        {
            problems
                .entry((
                    si,
                    format!(
                        "step {:?} starts etcd before {} changes etcd membership (a joining member must be added first)",
                        steps[si].name,
                        at(mi)
                    ),
                ))
                .or_default()
                .insert(h.name.clone());
        }
    }
    // Departed members: their agents stop before their etcd members are removed (an agent
    // whose etcd vanishes under it retries), and HAProxy is re-rendered without them only
    // after they are drained and gone.
    if let Some(di) = steps
        .iter()
        .position(|s| matches!(s.kind, StepKind::RemoveDeparted { .. }))
    {
        for (i, s) in steps.iter().enumerate().take(di) {
            if matches!(s.kind, StepKind::EtcdMembers { .. }) {
                problems
                    .entry((
                        i,
                        format!(
                            "step {:?} changes etcd membership before {} stops the departed members' agents",
                            s.name,
                            at(di)
                        ),
                    ))
                    .or_default()
                    .extend(
                        spec.hosts
                            .iter()
                            .filter(|h| h.roles.etcd)
                            .map(|h| h.name.clone()),
                    );
            }
        }
        for h in spec.hosts.iter().filter(|h| h.roles.haproxy) {
            for mode in [ServiceMode::Systemd, ServiceMode::Supervisor] {
                for f in spec.files_for(h, mode) {
                    if file_service(&f.path) == Some(Service::Haproxy)
                        && let Some(fi) = slot(h, Item::File(&f.path), false)
                        && fi < di
                    {
                        problems
                            .entry((
                                fi,
                                format!(
                                    "step {:?} re-renders HAProxy before {} drains and removes the departed members",
                                    steps[fi].name,
                                    at(di)
                                ),
                            ))
                            .or_default()
                            .insert(h.name.clone());
                    }
                }
            }
        }
    }
    if problems.is_empty() && missing.is_empty() {
        return Ok(());
    }
    let mut out: Vec<Problem> = missing
        .into_iter()
        .map(|(what, hosts)| Problem {
            pos: None,
            field: "steps".into(),
            message: format!(
                "no step of the playbook {what} on host{} {}",
                if hosts.len() == 1 { "" } else { "s" },
                hosts.into_iter().collect::<Vec<_>>().join(", ")
            ),
        })
        .collect();
    out.extend(problems.into_iter().map(|((i, message), hosts)| Problem {
        pos: steps[i].pos,
        field: format!("steps[{}]", i + 1),
        message: format!(
            "{message} on host{} {} (move the step after it)",
            if hosts.len() == 1 { "" } else { "s" },
            hosts.into_iter().collect::<Vec<_>>().join(", ")
        ),
    }));
    Err(PlaybookError::Invalid {
        path: spec.playbook_origin.clone(),
        problems: out,
    })
}
