//! Reading a playbook: the YAML as written (`Raw*`, strict: unknown keys are errors) and its
//! translation into the model ([`Playbook::parse`]), collecting every problem with its
//! `file:line:column` instead of stopping at the first.

use std::num::NonZeroUsize;

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::{
    Binary, DEFAULT_TIMEOUT_SECS, HostSelector, Notify, Parallelism, Playbook, PlaybookError,
    ServiceAction, Step, StepKind, WaitCondition,
};
use crate::inventory::{Pos, Problem, Role};
use crate::render;

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
}
