//! Playbooks as data: an ordered list of steps from a fixed vocabulary (documented in
//! `playbooks/README.md`), each with a host selector and a parallelism setting. This module
//! only parses and checks; planning and execution live elsewhere.
//!
//! Parsing is strict: unknown keys anywhere, an unknown step kind, two kinds in one step or a
//! typo in an enum value are errors with `file:line:column`. [`Playbook::check_against`] then
//! checks a playbook against an inventory (host names exist, templates fit the selected hosts'
//! roles, `{{ ... }}` expressions in arguments expand) before anything touches a host.
//!
//! The playbook's model (steps, selectors, the step vocabulary, a step expanded for a host)
//! and the check against an inventory are this file; reading the YAML is [`parse`].

use std::num::NonZeroUsize;
use std::path::Path;

use serde::Deserialize;

use crate::inventory::{Inventory, Pos, Problem, Role};
use crate::render::{self, Renderer};

mod parse;

/// The deploy playbook shipped with pgherd.
pub const DEPLOY: &str = include_str!("../../../playbooks/deploy.yml");

/// Seconds a `wait_for`/`bootstrap_primary`/`start_replicas` step waits by default.
pub const DEFAULT_TIMEOUT_SECS: u64 = 120;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Playbook {
    pub name: String,
    pub steps: Vec<Step>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Step {
    pub name: String,
    pub hosts: HostSelector,
    pub parallelism: Parallelism,
    pub kind: StepKind,
    /// Position of the step in the playbook file.
    pub pos: Option<Pos>,
}

/// Which hosts a step runs on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HostSelector {
    /// `all`
    All,
    /// `postgres`, `etcd`, `haproxy`: every host with the role.
    Role(Role),
    /// `first:<role>`: the first host with the role, in inventory order (the bootstrap host).
    First(Role),
    /// Any other word: the host with that name.
    Host(String),
}

impl HostSelector {
    pub fn parse(s: &str) -> Result<HostSelector, String> {
        let s = s.trim();
        if s == "all" {
            return Ok(HostSelector::All);
        }
        if let Some(r) = s.strip_prefix("first:") {
            return Role::parse(r).map(HostSelector::First).ok_or_else(|| {
                format!("unknown role {r:?} in {s:?} (expected postgres, etcd or haproxy)")
            });
        }
        if let Some(r) = Role::parse(s) {
            return Ok(HostSelector::Role(r));
        }
        if s.is_empty() || s.contains(char::is_whitespace) || s.contains(':') {
            return Err(format!(
                "bad host selector {s:?} (expected all, a role, first:<role> or a host name)"
            ));
        }
        Ok(HostSelector::Host(s.to_string()))
    }

    /// Whether the selector picks a host, given its name, its roles (`has`) and whether it is
    /// the first host of a role in inventory order (`first`). Same answer as [`Self::resolve`],
    /// for callers that have no [`Inventory`] (test fixtures).
    pub fn selects(
        &self,
        name: &str,
        has: impl Fn(Role) -> bool,
        first: impl Fn(Role) -> bool,
    ) -> bool {
        match self {
            HostSelector::All => true,
            HostSelector::Role(r) => has(*r),
            HostSelector::First(r) => has(*r) && first(*r),
            HostSelector::Host(n) => n == name,
        }
    }

    /// The selected hosts, in inventory order.
    pub fn resolve<'a>(&self, inv: &'a Inventory) -> Vec<&'a crate::inventory::Host> {
        match self {
            HostSelector::All => inv.hosts.iter().collect(),
            HostSelector::Role(r) => inv.hosts_with(*r).collect(),
            HostSelector::First(r) => inv.hosts_with(*r).take(1).collect(),
            HostSelector::Host(n) => inv.host(n).into_iter().collect(),
        }
    }
}

impl std::fmt::Display for HostSelector {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            HostSelector::All => f.write_str("all"),
            HostSelector::Role(r) => write!(f, "{r}"),
            HostSelector::First(r) => write!(f, "first:{r}"),
            HostSelector::Host(h) => f.write_str(h),
        }
    }
}

/// How many selected hosts run the step at once.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parallelism {
    /// All selected hosts at once (default).
    Parallel,
    /// At most N at a time, in inventory order (`serial: true` = 1).
    Serial(NonZeroUsize),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServiceAction {
    Start,
    Stop,
    Restart,
    Reload,
}

impl ServiceAction {
    pub fn as_str(self) -> &'static str {
        match self {
            ServiceAction::Start => "start",
            ServiceAction::Stop => "stop",
            ServiceAction::Restart => "restart",
            ServiceAction::Reload => "reload",
        }
    }
}

/// "When this step changes something, `action` `service` later" (`notify: restart etcd`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Notify {
    pub action: ServiceAction,
    pub service: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaitCondition {
    /// `etcdctl endpoint health` passes on the host's member.
    EtcdHealthy,
    /// The agent's REST API answers `GET /health` (any status) on the host.
    AgentApiUp,
    /// Some member holds the cluster's leader key.
    LeaderElected,
    /// Every selected replica streams from its upstream (`/replica` answers 200).
    ReplicasStreaming,
    /// HAProxy on the selected host routes its primary port to the leader only (and its
    /// replica port to at least one replica, when there are replicas).
    HaproxyRoutes,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Binary {
    /// The `pgherd-agent` binary (`agent.binary` in the inventory, or next to the CLI).
    PgherdAgent,
}

/// What a step does. String arguments may contain `{{ ... }}` expressions over the template
/// context (see [`crate::render::context`]); use [`StepKind::expand`] per host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StepKind {
    EnsurePackages {
        packages: Vec<String>,
    },
    EnsureDirectory {
        path: String,
        owner: String,
        group: String,
        mode: u32,
    },
    EnsureUser {
        name: String,
        system: bool,
        home: Option<String>,
        groups: Vec<String>,
    },
    Render {
        template: String,
        dest: String,
        mode: u32,
        owner: String,
        group: String,
        notify: Option<Notify>,
    },
    UploadBinary {
        binary: Binary,
        dest: String,
        mode: u32,
        notify: Option<Notify>,
    },
    Service {
        name: String,
        action: ServiceAction,
        /// Only when an earlier step notified this service on the host (and then consume it).
        only_if_changed: bool,
        /// Also enable (`true`) or disable (`false`) at boot.
        enabled: Option<bool>,
    },
    WaitFor {
        condition: WaitCondition,
        timeout_secs: u64,
    },
    /// Start the agent on the (single) selected host and wait until it holds the leader key;
    /// a no-op when the cluster already has a leader.
    BootstrapPrimary {
        timeout_secs: u64,
    },
    /// Start the agent on the selected hosts that are not the leader and wait until they stream.
    StartReplicas {
        timeout_secs: u64,
    },
    /// Write the inventory's cluster-wide settings into the live DCS `config` key (one
    /// compare-and-swap) and wait until every selected running agent has applied them; a no-op
    /// when the live config already matches (see [`super::dcs_config`]).
    DcsConfig {
        timeout_secs: u64,
    },
    /// Bring the live etcd membership to the inventory's etcd hosts, one change at a time
    /// (`member add --learner` → start → promote; `member remove`), refusing when a quorum
    /// gate fails (see [`super::etcd_members`]); a no-op on a fresh cluster or when the
    /// members match.
    EtcdMembers {
        timeout_secs: u64,
    },
    /// Restart the selected members that are pending restart, one at a time and each drained
    /// from HAProxy first, the primary last, or first for lowered hot-standby settings (see
    /// [`super::rolling`]); a no-op when no member is pending.
    RestartPending {
        timeout_secs: u64,
    },
    /// Remove the DCS members that are no longer postgres hosts of the inventory: drain from
    /// HAProxy, stop and disable the agent (best effort on its host), wait until its member key
    /// (bounded by `timeout_secs`) and its slot on the leader are gone; refused when unsafe
    /// (see [`super::departed`]); a no-op when every member is in the inventory.
    RemoveDeparted {
        timeout_secs: u64,
    },
}

impl StepKind {
    /// The vocabulary word of this kind.
    pub fn word(&self) -> &'static str {
        match self {
            StepKind::EnsurePackages { .. } => "ensure_packages",
            StepKind::EnsureDirectory { .. } => "ensure_directory",
            StepKind::EnsureUser { .. } => "ensure_user",
            StepKind::Render { .. } => "render",
            StepKind::UploadBinary { .. } => "upload_binary",
            StepKind::Service { .. } => "service",
            StepKind::WaitFor { .. } => "wait_for",
            StepKind::BootstrapPrimary { .. } => "bootstrap_primary",
            StepKind::StartReplicas { .. } => "start_replicas",
            StepKind::DcsConfig { .. } => "dcs_config",
            StepKind::RestartPending { .. } => "restart_pending",
            StepKind::EtcdMembers { .. } => "etcd_members",
            StepKind::RemoveDeparted { .. } => "remove_departed",
        }
    }

    /// A copy with every templated string argument passed through `f` (e.g.
    /// `|s| renderer.render_str(s, inv, host)`).
    pub fn expand<E>(&self, mut f: impl FnMut(&str) -> Result<String, E>) -> Result<StepKind, E> {
        let mut k = self.clone();
        match &mut k {
            StepKind::EnsurePackages { packages } => {
                for p in packages {
                    *p = f(p)?;
                }
            }
            StepKind::EnsureDirectory {
                path, owner, group, ..
            } => {
                *path = f(path)?;
                *owner = f(owner)?;
                *group = f(group)?;
            }
            StepKind::EnsureUser {
                name, home, groups, ..
            } => {
                *name = f(name)?;
                if let Some(h) = home {
                    *h = f(h)?;
                }
                for g in groups {
                    *g = f(g)?;
                }
            }
            StepKind::Render {
                dest, owner, group, ..
            } => {
                *dest = f(dest)?;
                *owner = f(owner)?;
                *group = f(group)?;
            }
            StepKind::UploadBinary { dest, .. } => *dest = f(dest)?,
            StepKind::Service { name, .. } => *name = f(name)?,
            StepKind::WaitFor { .. }
            | StepKind::BootstrapPrimary { .. }
            | StepKind::StartReplicas { .. }
            | StepKind::DcsConfig { .. }
            | StepKind::RestartPending { .. }
            | StepKind::EtcdMembers { .. }
            | StepKind::RemoveDeparted { .. } => {}
        }
        Ok(k)
    }

    fn notify(&self) -> Option<&Notify> {
        match self {
            StepKind::Render { notify, .. } | StepKind::UploadBinary { notify, .. } => {
                notify.as_ref()
            }
            _ => None,
        }
    }
}

/// A playbook step that selects a host, with its arguments expanded for that host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostStep {
    /// Index of the step in the playbook (0-based).
    pub index: usize,
    pub kind: StepKind,
}

#[derive(Debug, thiserror::Error)]
pub enum PlaybookError {
    #[error("{path}: cannot read playbook: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{}", problems.iter().map(|p| p.display_in(path).to_string()).collect::<Vec<_>>().join("\n"))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
    },
}

impl Playbook {
    pub fn load(path: &Path) -> Result<Playbook, PlaybookError> {
        let shown = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| PlaybookError::Read {
            path: shown.clone(),
            source,
        })?;
        Playbook::parse(&text, &shown)
    }

    /// The built-in deploy playbook.
    pub fn deploy() -> Playbook {
        Playbook::parse(DEPLOY, "playbooks/deploy.yml")
            .expect("the built-in deploy playbook is valid")
    }

    /// Checks the playbook against an inventory: named hosts exist, selectors select something
    /// where that matters, rendered built-in templates fit the selected hosts' roles, and every
    /// templated argument expands for every selected host. `origin` names the playbook.
    pub fn check_against(
        &self,
        inv: &Inventory,
        renderer: &Renderer,
        origin: &str,
    ) -> Result<(), PlaybookError> {
        let mut problems = Vec::new();
        for (i, step) in self.steps.iter().enumerate() {
            let f = format!("steps[{}]", i + 1);
            let at = |message: String| Problem {
                pos: step.pos,
                field: f.clone(),
                message,
            };
            if let HostSelector::Host(n) = &step.hosts
                && inv.host(n).is_none()
            {
                problems.push(at(format!("step {:?}: unknown host {n:?}", step.name)));
                continue;
            }
            let hosts = step.hosts.resolve(inv);
            if let StepKind::Render { template, .. } = &step.kind
                && let Some(spec) = render::template_spec(template)
            {
                for h in hosts.iter().filter(|h| !h.has(spec.role)) {
                    problems.push(at(format!(
                        "step {:?}: template {template} needs the {} role but host {} does not have it",
                        step.name, spec.role, h.name
                    )));
                }
            }
            if matches!(step.kind, StepKind::BootstrapPrimary { .. })
                && let Some(h) = hosts.iter().find(|h| !h.has(Role::Postgres))
            {
                problems.push(at(format!(
                    "step {:?}: bootstrap host {} has no postgres role",
                    step.name, h.name
                )));
            }
            for h in &hosts {
                if let Err(e) = step
                    .kind
                    .expand(|s| renderer.render_str(s, inv, h.name.as_str()))
                {
                    problems.push(at(format!("step {:?} on host {}: {e}", step.name, h.name)));
                    break;
                }
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(PlaybookError::Invalid {
                path: origin.to_string(),
                problems,
            })
        }
    }
}
