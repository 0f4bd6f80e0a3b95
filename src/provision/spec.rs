//! Inventory → desired state: renders every host's files (templates via [`crate::render`]),
//! derives packages, directories, service configs and the agent binary, and builds the
//! [`DeploySpec`] (see [`super::desired`]) the planner works on; the playbook is checked
//! against it ([`schedule::check`]) before any host is contacted. Never touches a host.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use super::desired::{
    AgentBinary, DeploySpec, DesiredDir, DesiredFile, DesiredMember, DesiredUser, EtcdSpec,
    HostTarget, Roles,
};
use super::playbook::{HostStep, Playbook, PlaybookError, ServiceAction, StepKind};
use super::remote::{REMOVED_HOST_CONNECT_TIMEOUT, host_specs};
use super::schedule;
use super::services::{self, Service};
use crate::inventory::{Etcd, Inventory, InventoryError, Role};
use crate::render::Renderer;
use crate::transport::HostSpec;

/// Why the desired state could not be built.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error(transparent)]
    Inventory(#[from] InventoryError),
    #[error("host {host}: rendering templates failed")]
    Render {
        host: String,
        #[source]
        source: crate::render::RenderError,
    },
    #[error(transparent)]
    Playbook(#[from] PlaybookError),
    #[error("host {host}: the rendered agent config does not parse")]
    AgentConfig {
        host: String,
        #[source]
        source: crate::config::ConfigError,
    },
    #[error("cannot read the agent binary {path}")]
    AgentBinary {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

impl SpecError {
    /// Errors in what the operator wrote (inventory, templates, paths): exit code 2.
    pub fn is_input_error(&self) -> bool {
        true
    }
}

/// The agent binary to ship: `--agent-binary`, else the inventory's `agent.binary`, else
/// `pgherd-agent` next to the running `pgherd` executable. `None` when none exists (then
/// postgres hosts get no agent and the plan says so).
pub fn agent_binary_path(inv: &Inventory, cli: Option<&Path>) -> Option<PathBuf> {
    if let Some(p) = cli {
        return Some(p.to_path_buf());
    }
    if let Some(p) = &inv.agent.binary {
        return Some(p.clone());
    }
    let exe = std::env::current_exe().ok()?;
    let p = exe.parent()?.join("pgherd-agent");
    p.exists().then_some(p)
}

/// The playbook's steps that select `host`, with their templated arguments expanded for it.
pub fn host_steps(
    pb: &Playbook,
    inv: &Inventory,
    renderer: &Renderer,
    host: &str,
) -> Result<Vec<HostStep>, SpecError> {
    let mut out = Vec::new();
    for (index, step) in pb.steps.iter().enumerate() {
        if !step
            .hosts
            .resolve(inv)
            .iter()
            .any(|h| h.name.as_str() == host)
        {
            continue;
        }
        let kind = step
            .kind
            .expand(|t| renderer.render_str(t, inv, host))
            .map_err(|source| SpecError::Render {
                host: host.to_string(),
                source,
            })?;
        out.push(HostStep { index, kind });
    }
    Ok(out)
}

/// Packages, users, directories and distribution units the playbook's `ensure_packages` /
/// `ensure_user` / `ensure_directory` / `service: stop` steps ask for on one host.
pub fn playbook_needs(steps: &[HostStep]) -> PlaybookNeeds {
    let mut needs = PlaybookNeeds::default();
    for step in steps {
        match &step.kind {
            StepKind::EnsurePackages { packages } => {
                for p in packages {
                    if !needs.packages.contains(p) {
                        needs.packages.push(p.clone());
                    }
                }
            }
            StepKind::EnsureUser {
                name,
                system,
                home,
                groups,
            } => {
                needs.users.retain(|u| &u.name != name);
                needs.users.push(DesiredUser {
                    name: name.clone(),
                    system: *system,
                    home: home.clone(),
                    groups: groups.clone(),
                });
            }
            StepKind::EnsureDirectory {
                path,
                owner,
                group,
                mode,
            } => {
                needs.dirs.retain(|d| &d.path != path);
                needs.dirs.push(DesiredDir {
                    path: path.clone(),
                    owner: format!("{owner}:{group}"),
                    mode: *mode,
                });
            }
            // Units the playbook stops that pgherd does not itself run (the distribution's
            // postgresql): planned as "stop and disable" in systemd mode.
            StepKind::Service {
                name,
                action: ServiceAction::Stop,
                ..
            } if !Service::ALL.iter().any(|s| s.name() == name)
                && !needs.stop_units.contains(name) =>
            {
                needs.stop_units.push(name.clone());
            }
            _ => {}
        }
    }
    needs
}

/// What the playbook's data asks of one host (see [`playbook_needs`]).
#[derive(Debug, Clone, Default)]
pub struct PlaybookNeeds {
    pub packages: Vec<String>,
    pub users: Vec<DesiredUser>,
    pub dirs: Vec<DesiredDir>,
    pub stop_units: Vec<String>,
}

/// Builds the desired state of every host with the built-in deploy playbook.
/// `templates`: a user template directory.
pub fn build(
    inv: &Inventory,
    agent_binary: Option<&Path>,
    templates: Option<&Path>,
) -> Result<DeploySpec, SpecError> {
    build_with(inv, agent_binary, templates, None)
}

/// [`build`] with the playbook read from `playbook` (a file) instead of the built-in one. The
/// playbook is checked against the inventory and the desired state (located errors) here,
/// before any host is contacted.
pub fn build_with(
    inv: &Inventory,
    agent_binary: Option<&Path>,
    templates: Option<&Path>,
    playbook: Option<&Path>,
) -> Result<DeploySpec, SpecError> {
    let binary = match agent_binary_path(inv, agent_binary) {
        Some(path) => {
            let bytes = std::fs::read(&path).map_err(|source| SpecError::AgentBinary {
                path: path.display().to_string(),
                source,
            })?;
            Some(AgentBinary::new(bytes))
        }
        None => None,
    };
    let embedded = matches!(inv.etcd, Etcd::Embedded(_));
    let etcd_client_port = match &inv.etcd {
        Etcd::Embedded(e) => e.client_port,
        Etcd::External { .. } => 2379,
    };
    let renderer = match templates {
        Some(dir) => Renderer::with_dir(dir),
        None => Ok(Renderer::builtin()),
    }
    .map_err(|source| SpecError::Render {
        host: "-".into(),
        source,
    })?;
    let (pb, origin) = match playbook {
        Some(p) => (Playbook::load(p)?, p.display().to_string()),
        None => (Playbook::deploy(), "playbooks/deploy.yml".to_string()),
    };
    pb.check_against(inv, &renderer, &origin)?;
    let mut hosts = Vec::new();
    for h in &inv.hosts {
        let name = h.name.as_str();
        let roles = Roles {
            postgres: h.has(Role::Postgres),
            etcd: h.has(Role::Etcd) && embedded,
            haproxy: h.has(Role::Haproxy),
        };
        let steps = host_steps(&pb, inv, &renderer, name)?;
        let rendered = render_steps(inv, name, &renderer, &steps)?;
        let mut service_configs = BTreeMap::new();
        for f in &rendered {
            if !services::is_unit_file(&f.path)
                && let Some(svc) = services::service_for_path(&f.path)
            {
                service_configs.entry(svc).or_insert_with(|| f.path.clone());
            }
        }
        let PlaybookNeeds {
            packages,
            users,
            mut dirs,
            stop_units,
        } = playbook_needs(&steps);
        if roles.postgres {
            // The agent runs initdb / pg_basebackup into the data directory, whose parent must
            // exist (the playbook creates the data directory itself, 0700 postgres).
            let data = inv.postgresql.data_dir.display().to_string();
            if let Some((parent, _)) = data.rsplit_once('/')
                && !parent.is_empty()
                && !dirs.iter().any(|d| d.path == parent)
            {
                dirs.insert(
                    0,
                    DesiredDir {
                        path: parent.into(),
                        owner: "postgres:postgres".into(),
                        mode: 0o755,
                    },
                );
            }
        }
        hosts.push(HostTarget {
            name: name.to_string(),
            address: h.address.clone(),
            roles,
            files: rendered,
            dirs,
            packages,
            users,
            pg_data_dir: roles
                .postgres
                .then(|| inv.postgresql.data_dir.display().to_string()),
            service_configs,
            stop_units,
            steps,
        });
    }
    let mut secrets: Vec<String> = inv
        .secret_values()
        .into_iter()
        .map(str::to_string)
        .collect();
    // Longest first, so a secret containing another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    let dcs_config = managed_dcs_config(&hosts)?;
    let etcd = etcd_spec(inv, &renderer, &hosts)?;
    let spec = DeploySpec {
        cluster: inv.cluster.clone(),
        hosts,
        agent_binary: binary,
        secrets,
        restapi_port: inv.agent.restapi_port,
        pg_port: inv.postgresql.port,
        etcd_client_port,
        primary_port: inv.haproxy.primary_port,
        replica_port: inv.haproxy.replica_port,
        stats_port: inv.haproxy.stats_port,
        playbook: Arc::new(pb),
        playbook_origin: origin,
        dcs_config,
        restapi_auth: Some((
            inv.agent.restapi_username.clone(),
            inv.secrets.restapi.expose().to_string(),
        )),
        inventory: Some(Arc::new(inv.clone())),
        etcd,
    };
    schedule::check(&spec)?;
    Ok(spec)
}

/// The files the host's `render` steps produce. Built-in templates are checked (the agent
/// config must parse, the etcd config must be YAML); etcd's templates are skipped when etcd
/// is external.
fn render_steps(
    inv: &Inventory,
    host: &str,
    renderer: &Renderer,
    steps: &[HostStep],
) -> Result<Vec<DesiredFile>, SpecError> {
    let embedded = matches!(inv.etcd, Etcd::Embedded(_));
    let mut out: Vec<DesiredFile> = Vec::new();
    for s in steps {
        let StepKind::Render {
            template,
            dest,
            mode,
            owner,
            group,
            ..
        } = &s.kind
        else {
            continue;
        };
        if crate::render::template_spec(template).is_some_and(|t| t.embedded_etcd_only) && !embedded
        {
            continue;
        }
        let content = renderer
            .render_checked(template, inv, host)
            .map_err(|source| SpecError::Render {
                host: host.to_string(),
                source,
            })?;
        out.retain(|f| &f.path != dest);
        out.push(DesiredFile::new(
            dest,
            content.into_bytes(),
            *mode,
            &format!("{owner}:{group}"),
        ));
    }
    Ok(out)
}

/// The main config file of `svc` on `host` (what its run file points at).
pub fn service_config_path(spec: &DeploySpec, host: &str, svc: Service) -> Option<String> {
    spec.host(host)
        .and_then(|h| h.service_configs.get(&svc).cloned())
}

/// The `bootstrap.dcs` section of the first postgres host's rendered agent config: what the
/// cluster's DCS `config` key should hold (see [`super::dcs_config`]).
fn managed_dcs_config(
    hosts: &[HostTarget],
) -> Result<Option<serde_json::Map<String, serde_json::Value>>, SpecError> {
    let Some(h) = hosts.iter().find(|h| h.roles.postgres) else {
        return Ok(None);
    };
    let Some(f) = h
        .files
        .iter()
        .find(|f| f.path == crate::render::AGENT_CONFIG_PATH)
    else {
        return Ok(None);
    };
    let text = String::from_utf8_lossy(&f.content);
    let cfg = crate::config::AgentConfig::parse(&text, crate::render::AGENT_CONFIG_PATH).map_err(
        |source| SpecError::AgentConfig {
            host: h.name.clone(),
            source,
        },
    )?;
    Ok(Some(cfg.bootstrap.dcs))
}

/// The etcd membership pgherd manages (embedded etcd only): the inventory's etcd hosts, where
/// etcd.conf goes, and each host's etcd.conf for joining a running cluster, rendered from the
/// same template as its normal one (so an operator's own template decides it too).
fn etcd_spec(
    inv: &Inventory,
    renderer: &Renderer,
    hosts: &[HostTarget],
) -> Result<Option<EtcdSpec>, SpecError> {
    let Etcd::Embedded(e) = &inv.etcd else {
        return Ok(None);
    };
    let mut members = Vec::new();
    let mut join_configs = BTreeMap::new();
    let mut config: Option<(String, u32, String)> = None;
    for h in inv.hosts_with(Role::Etcd) {
        let name = h.name.as_str();
        members.push(DesiredMember {
            name: name.to_string(),
            peer_url: format!("http://{}", h.endpoint(e.peer_port)),
            client_url: format!("http://{}", h.endpoint(e.client_port)),
        });
        let Some(t) = hosts.iter().find(|t| t.name == name) else {
            continue;
        };
        let Some(path) = t.service_configs.get(&Service::Etcd) else {
            continue;
        };
        let Some(template) = t.steps.iter().find_map(|s| match &s.kind {
            StepKind::Render { template, dest, .. } if dest == path => Some(template.clone()),
            _ => None,
        }) else {
            continue;
        };
        let content = renderer
            .render_etcd_join(&template, inv, name)
            .map_err(|source| SpecError::Render {
                host: name.to_string(),
                source,
            })?;
        join_configs.insert(name.to_string(), content);
        if config.is_none()
            && let Some(f) = t.files.iter().find(|f| &f.path == path)
        {
            config = Some((f.path.clone(), f.mode, f.owner.clone()));
        }
    }
    let (config_path, config_mode, config_owner) = config.unwrap_or_else(|| {
        (
            crate::render::ETCD_CONFIG_PATH.to_string(),
            0o644,
            "root:root".to_string(),
        )
    });
    let mut ssh_defaults = host_specs(inv)
        .into_iter()
        .find(|s| inv.host(&s.name).is_some_and(|h| h.has(Role::Etcd)))
        .unwrap_or_else(|| HostSpec::new("-", "-"));
    ssh_defaults.connect_timeout = REMOVED_HOST_CONNECT_TIMEOUT;
    Ok(Some(EtcdSpec {
        members,
        data_dir: e.data_dir.display().to_string(),
        config_path,
        config_mode,
        config_owner,
        join_configs,
        ssh_defaults,
        allow_degraded: false,
    }))
}
