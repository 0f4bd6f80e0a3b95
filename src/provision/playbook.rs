//! Playbooks as data: an ordered list of steps from a fixed vocabulary (documented in
//! `playbooks/README.md`), each with a host selector and a parallelism setting. This module
//! only parses and checks; planning and execution live elsewhere.
//!
//! Parsing is strict: unknown keys anywhere, an unknown step kind, two kinds in one step or a
//! typo in an enum value are errors with `file:line:column`. [`Playbook::check_against`] then
//! checks a playbook against an inventory (host names exist, templates fit the selected hosts'
//! roles, `{{ ... }}` expressions in arguments expand) before anything touches a host.

use std::num::NonZeroUsize;
use std::path::Path;

use serde::Deserialize;
use serde_saphyr::Spanned;

use crate::inventory::{Inventory, Pos, Problem, Role};
use crate::render::{self, Renderer};

/// The deploy playbook shipped with pgherd.
pub const DEPLOY: &str = include_str!("../../playbooks/deploy.yml");

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

// ---- raw (as written) -----------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPlaybook {
    name: String,
    #[serde(default)]
    #[allow(dead_code)]
    description: Option<String>,
    steps: Vec<Spanned<RawStep>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: Spanned<String>,
    hosts: Spanned<String>,
    #[serde(default)]
    serial: Option<Spanned<RawSerial>>,
    #[serde(default)]
    ensure_packages: Option<RawPackages>,
    #[serde(default)]
    ensure_directory: Option<RawDirectory>,
    #[serde(default)]
    ensure_user: Option<RawUser>,
    #[serde(default)]
    render: Option<RawRender>,
    #[serde(default)]
    upload_binary: Option<RawUpload>,
    #[serde(default)]
    service: Option<RawService>,
    #[serde(default)]
    wait_for: Option<RawWait>,
    #[serde(default)]
    bootstrap_primary: Option<RawTimeout>,
    #[serde(default)]
    start_replicas: Option<RawTimeout>,
    #[serde(default)]
    dcs_config: Option<RawTimeout>,
    #[serde(default)]
    restart_pending: Option<RawTimeout>,
    #[serde(default)]
    etcd_members: Option<RawTimeout>,
    #[serde(default)]
    remove_departed: Option<RawTimeout>,
}

/// `serial: true | false | N`.
#[derive(Debug, Clone, Copy)]
enum RawSerial {
    Flag(bool),
    Count(u64),
}

impl<'de> Deserialize<'de> for RawSerial {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = RawSerial;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("true, false or a number of hosts at a time")
            }
            fn visit_bool<E>(self, v: bool) -> Result<RawSerial, E> {
                Ok(RawSerial::Flag(v))
            }
            fn visit_u64<E>(self, v: u64) -> Result<RawSerial, E> {
                Ok(RawSerial::Count(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawSerial, E> {
                u64::try_from(v)
                    .map(RawSerial::Count)
                    .map_err(|_| E::custom("serial must be true, false or a positive number"))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPackages {
    packages: Spanned<Vec<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawDirectory {
    path: Spanned<String>,
    owner: String,
    #[serde(default)]
    group: Option<String>,
    mode: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUser {
    name: String,
    #[serde(default = "yes")]
    system: bool,
    #[serde(default)]
    home: Option<String>,
    #[serde(default)]
    groups: Vec<String>,
}

fn yes() -> bool {
    true
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRender {
    template: Spanned<String>,
    #[serde(default)]
    dest: Option<String>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    owner: Option<String>,
    #[serde(default)]
    group: Option<String>,
    #[serde(default)]
    notify: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawUpload {
    binary: Binary,
    #[serde(default)]
    dest: Option<String>,
    #[serde(default)]
    mode: Option<Spanned<String>>,
    #[serde(default)]
    notify: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawService {
    name: String,
    action: ServiceAction,
    #[serde(default)]
    only_if_changed: bool,
    #[serde(default)]
    enabled: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawWait {
    condition: WaitCondition,
    #[serde(default)]
    timeout: Option<Spanned<u64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTimeout {
    #[serde(default)]
    timeout: Option<Spanned<u64>>,
}

// ---- parsing ---------------------------------------------------------------------------------

fn pos<T>(s: &Spanned<T>) -> Option<Pos> {
    Pos::of(&s.referenced)
}

fn problem<T>(s: &Spanned<T>, field: impl Into<String>, message: impl Into<String>) -> Problem {
    Problem {
        pos: pos(s),
        field: field.into(),
        message: message.into(),
    }
}

fn parse_mode(s: &Spanned<String>, field: &str, problems: &mut Vec<Problem>) -> u32 {
    match u32::from_str_radix(s.value.trim_start_matches("0o"), 8) {
        Ok(m) if m <= 0o7777 => m,
        _ => {
            problems.push(problem(
                s,
                field,
                format!("bad mode {:?} (expected octal, e.g. \"0750\")", s.value),
            ));
            0
        }
    }
}

fn parse_notify(s: &Spanned<String>, field: &str, problems: &mut Vec<Problem>) -> Option<Notify> {
    let mut words = s.value.split_whitespace();
    let (Some(a), Some(svc), None) = (words.next(), words.next(), words.next()) else {
        problems.push(problem(
            s,
            field,
            format!(
                "bad notify {:?} (expected \"<restart|reload> <service>\")",
                s.value
            ),
        ));
        return None;
    };
    let action = match a {
        "restart" => ServiceAction::Restart,
        "reload" => ServiceAction::Reload,
        _ => {
            problems.push(problem(
                s,
                field,
                format!("notify action must be restart or reload (got {a:?})"),
            ));
            return None;
        }
    };
    Some(Notify {
        action,
        service: svc.to_string(),
    })
}

fn timeout(t: &Option<Spanned<u64>>, field: &str, problems: &mut Vec<Problem>) -> u64 {
    match t {
        Some(s) if s.value == 0 => {
            problems.push(problem(s, field, "timeout must be at least 1 second"));
            DEFAULT_TIMEOUT_SECS
        }
        Some(s) => s.value,
        None => DEFAULT_TIMEOUT_SECS,
    }
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

    pub fn parse(text: &str, origin: &str) -> Result<Playbook, PlaybookError> {
        let raw: RawPlaybook = crate::yaml::from_str(text).map_err(|e| PlaybookError::Syntax {
            path: origin.to_string(),
            line: e.line,
            column: e.column,
            message: e.message,
        })?;
        let mut problems = Vec::new();
        let mut steps = Vec::new();
        // Services some earlier step notifies, for the only_if_changed check.
        let mut notified: Vec<String> = Vec::new();
        for (i, s) in raw.steps.iter().enumerate() {
            let r = &s.value;
            let f = format!("steps[{}]", i + 1);
            let hosts = HostSelector::parse(&r.hosts.value).unwrap_or_else(|m| {
                problems.push(problem(&r.hosts, format!("{f}.hosts"), m));
                HostSelector::All
            });
            let parallelism = match &r.serial {
                None
                | Some(Spanned {
                    value: RawSerial::Flag(false),
                    ..
                }) => Parallelism::Parallel,
                Some(Spanned {
                    value: RawSerial::Flag(true),
                    ..
                }) => Parallelism::Serial(NonZeroUsize::MIN),
                Some(
                    sp @ Spanned {
                        value: RawSerial::Count(n),
                        ..
                    },
                ) => match usize::try_from(*n).ok().and_then(NonZeroUsize::new) {
                    Some(n) => Parallelism::Serial(n),
                    None => {
                        problems.push(problem(
                            sp,
                            format!("{f}.serial"),
                            "serial must be true, false or at least 1",
                        ));
                        Parallelism::Parallel
                    }
                },
            };
            let mut kinds: Vec<StepKind> = Vec::new();
            if let Some(p) = &r.ensure_packages {
                if p.packages.value.is_empty() {
                    problems.push(problem(
                        &p.packages,
                        format!("{f}.ensure_packages.packages"),
                        "list at least one package",
                    ));
                }
                kinds.push(StepKind::EnsurePackages {
                    packages: p.packages.value.clone(),
                });
            }
            if let Some(d) = &r.ensure_directory {
                if !d.path.value.starts_with('/') && !d.path.value.starts_with("{{") {
                    problems.push(problem(
                        &d.path,
                        format!("{f}.ensure_directory.path"),
                        "must be an absolute path",
                    ));
                }
                kinds.push(StepKind::EnsureDirectory {
                    path: d.path.value.clone(),
                    owner: d.owner.clone(),
                    group: d.group.clone().unwrap_or_else(|| d.owner.clone()),
                    mode: parse_mode(
                        &d.mode,
                        &format!("{f}.ensure_directory.mode"),
                        &mut problems,
                    ),
                });
            }
            if let Some(u) = &r.ensure_user {
                kinds.push(StepKind::EnsureUser {
                    name: u.name.clone(),
                    system: u.system,
                    home: u.home.clone(),
                    groups: u.groups.clone(),
                });
            }
            if let Some(rr) = &r.render {
                let field = format!("{f}.render");
                let spec = render::template_spec(&rr.template.value);
                let dest = rr.dest.clone().or_else(|| spec.map(|s| s.dest.to_string()));
                let Some(dest) = dest else {
                    problems.push(problem(&rr.template, format!("{field}.template"), format!(
                        "unknown template {:?} (built-ins: {}); give dest (and mode/owner) for your own template",
                        rr.template.value,
                        render::TEMPLATES.iter().map(|t| t.name).collect::<Vec<_>>().join(", ")
                    )));
                    continue;
                };
                let mode = match &rr.mode {
                    Some(m) => parse_mode(m, &format!("{field}.mode"), &mut problems),
                    None => spec.map_or(0o644, |s| s.mode),
                };
                let notify = rr
                    .notify
                    .as_ref()
                    .and_then(|n| parse_notify(n, &format!("{field}.notify"), &mut problems));
                kinds.push(StepKind::Render {
                    template: rr.template.value.clone(),
                    dest,
                    mode,
                    owner: rr
                        .owner
                        .clone()
                        .unwrap_or_else(|| spec.map_or("root", |s| s.owner).to_string()),
                    group: rr
                        .group
                        .clone()
                        .unwrap_or_else(|| spec.map_or("root", |s| s.group).to_string()),
                    notify,
                });
            }
            if let Some(u) = &r.upload_binary {
                let mode = match &u.mode {
                    Some(m) => parse_mode(m, &format!("{f}.upload_binary.mode"), &mut problems),
                    None => 0o755,
                };
                let notify = u.notify.as_ref().and_then(|n| {
                    parse_notify(n, &format!("{f}.upload_binary.notify"), &mut problems)
                });
                kinds.push(StepKind::UploadBinary {
                    binary: u.binary,
                    dest: u
                        .dest
                        .clone()
                        .unwrap_or_else(|| render::AGENT_BINARY_PATH.to_string()),
                    mode,
                    notify,
                });
            }
            if let Some(sv) = &r.service {
                if sv.only_if_changed && !notified.contains(&sv.name) {
                    problems.push(problem(
                        s,
                        format!("{f}.service.only_if_changed"),
                        format!(
                            "no earlier step notifies service {:?}, so this step would never run",
                            sv.name
                        ),
                    ));
                }
                kinds.push(StepKind::Service {
                    name: sv.name.clone(),
                    action: sv.action,
                    only_if_changed: sv.only_if_changed,
                    enabled: sv.enabled,
                });
            }
            if let Some(w) = &r.wait_for {
                kinds.push(StepKind::WaitFor {
                    condition: w.condition,
                    timeout_secs: timeout(
                        &w.timeout,
                        &format!("{f}.wait_for.timeout"),
                        &mut problems,
                    ),
                });
            }
            if let Some(b) = &r.bootstrap_primary {
                if !matches!(
                    hosts,
                    HostSelector::First(Role::Postgres) | HostSelector::Host(_)
                ) {
                    problems.push(problem(&r.hosts, format!("{f}.hosts"), "bootstrap_primary needs exactly one host: use first:postgres or a host name"));
                }
                kinds.push(StepKind::BootstrapPrimary {
                    timeout_secs: timeout(
                        &b.timeout,
                        &format!("{f}.bootstrap_primary.timeout"),
                        &mut problems,
                    ),
                });
            }
            if let Some(b) = &r.start_replicas {
                kinds.push(StepKind::StartReplicas {
                    timeout_secs: timeout(
                        &b.timeout,
                        &format!("{f}.start_replicas.timeout"),
                        &mut problems,
                    ),
                });
            }
            if let Some(b) = &r.dcs_config {
                kinds.push(StepKind::DcsConfig {
                    timeout_secs: timeout(
                        &b.timeout,
                        &format!("{f}.dcs_config.timeout"),
                        &mut problems,
                    ),
                });
            }
            if let Some(b) = &r.restart_pending {
                kinds.push(StepKind::RestartPending {
                    timeout_secs: timeout(
                        &b.timeout,
                        &format!("{f}.restart_pending.timeout"),
                        &mut problems,
                    ),
                });
            }
            if let Some(b) = &r.etcd_members {
                kinds.push(StepKind::EtcdMembers {
                    timeout_secs: timeout(
                        &b.timeout,
                        &format!("{f}.etcd_members.timeout"),
                        &mut problems,
                    ),
                });
            }
            if let Some(b) = &r.remove_departed {
                kinds.push(StepKind::RemoveDeparted {
                    timeout_secs: timeout(
                        &b.timeout,
                        &format!("{f}.remove_departed.timeout"),
                        &mut problems,
                    ),
                });
            }
            let kind = match kinds.len() {
                1 => kinds.pop().expect("one"),
                0 => {
                    problems.push(problem(s, f.clone(), format!(
                        "step {:?} has no action (expected one of ensure_packages, ensure_directory, ensure_user, render, upload_binary, service, wait_for, bootstrap_primary, start_replicas, dcs_config, restart_pending, etcd_members, remove_departed)",
                        r.name.value
                    )));
                    continue;
                }
                _ => {
                    problems.push(problem(
                        s,
                        f.clone(),
                        format!(
                            "step {:?} has several actions ({}); split it into one step per action",
                            r.name.value,
                            kinds
                                .iter()
                                .map(StepKind::word)
                                .collect::<Vec<_>>()
                                .join(", ")
                        ),
                    ));
                    continue;
                }
            };
            if let Some(n) = kind.notify() {
                notified.push(n.service.clone());
            }
            steps.push(Step {
                name: r.name.value.clone(),
                hosts,
                parallelism,
                kind,
                pos: pos(s),
            });
        }
        if raw.steps.is_empty() {
            problems.push(Problem {
                pos: None,
                field: "steps".into(),
                message: "a playbook needs at least one step".into(),
            });
        }
        if !problems.is_empty() {
            return Err(PlaybookError::Invalid {
                path: origin.to_string(),
                problems,
            });
        }
        Ok(Playbook {
            name: raw.name,
            steps,
        })
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
