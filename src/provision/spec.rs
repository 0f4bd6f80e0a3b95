//! Inventory → desired state: renders every host's files (templates via [`crate::render`]),
//! derives packages, directories, service configs and the agent binary, and builds the
//! [`DeploySpec`] the planner works on. Also the inventory-side helpers of the CLI (SSH host
//! specs, cluster status from the agents). Never touches a host.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::plan::{AgentBinary, DeploySpec, DesiredDir, DesiredFile, HostTarget, Roles};
use super::playbook::{Playbook, ServiceAction, StepKind};
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

/// Packages and directories the deploy playbook's `ensure_packages` / `ensure_directory` steps
/// ask for on `host` (arguments expanded for that host). The playbook is the data; the order
/// of the service phases lives in [`super::apply`] (it mirrors the playbook's later steps).
pub fn playbook_needs(
    pb: &Playbook,
    inv: &Inventory,
    renderer: &Renderer,
    host: &str,
) -> Result<PlaybookNeeds, SpecError> {
    let mut pkgs: Vec<String> = Vec::new();
    let mut stop_units: Vec<String> = Vec::new();
    let mut dirs: Vec<DesiredDir> = Vec::new();
    for step in &pb.steps {
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
        match kind {
            StepKind::EnsurePackages { packages } => {
                for p in packages {
                    if !pkgs.contains(&p) {
                        pkgs.push(p);
                    }
                }
            }
            StepKind::EnsureDirectory {
                path,
                owner,
                group,
                mode,
            } => {
                dirs.retain(|d| d.path != path);
                dirs.push(DesiredDir {
                    path,
                    owner: format!("{owner}:{group}"),
                    mode,
                });
            }
            // Units the playbook stops that pgherd does not itself run (the distribution's
            // postgresql): planned as "stop and disable" in systemd mode.
            StepKind::Service {
                name,
                action: ServiceAction::Stop,
                ..
            } if !Service::ALL.iter().any(|s| s.name() == name) && !stop_units.contains(&name) => {
                stop_units.push(name);
            }
            _ => {}
        }
    }
    Ok(PlaybookNeeds {
        packages: pkgs,
        dirs,
        stop_units,
    })
}

/// What the deploy playbook's data asks of one host (see [`playbook_needs`]).
#[derive(Debug, Clone, Default)]
pub struct PlaybookNeeds {
    pub packages: Vec<String>,
    pub dirs: Vec<DesiredDir>,
    pub stop_units: Vec<String>,
}

/// Builds the desired state of every host. `templates`: a user template directory.
pub fn build(
    inv: &Inventory,
    agent_binary: Option<&Path>,
    templates: Option<&Path>,
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
    let etcd_ports = match &inv.etcd {
        Etcd::Embedded(e) => Some((e.client_port, e.data_dir.display().to_string())),
        Etcd::External { .. } => None,
    };
    let renderer = match templates {
        Some(dir) => Renderer::with_dir(dir),
        None => Ok(Renderer::builtin()),
    }
    .map_err(|source| SpecError::Render {
        host: "-".into(),
        source,
    })?;
    let pb = Playbook::deploy();
    let mut hosts = Vec::new();
    for h in &inv.hosts {
        let roles = Roles {
            postgres: h.has(Role::Postgres),
            etcd: h.has(Role::Etcd) && etcd_ports.is_some(),
            haproxy: h.has(Role::Haproxy),
        };
        let rendered = render_host(inv, h.name.as_str(), &renderer)?;
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
            mut dirs,
            stop_units,
        } = playbook_needs(&pb, inv, &renderer, h.name.as_str())?;
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
            name: h.name.as_str().to_string(),
            address: h.address.clone(),
            roles,
            files: rendered,
            dirs,
            packages,
            pg_data_dir: roles
                .postgres
                .then(|| inv.postgresql.data_dir.display().to_string()),
            service_configs,
            stop_units,
        });
    }
    let mut secrets: Vec<String> = inv
        .secret_values()
        .into_iter()
        .map(str::to_string)
        .collect();
    // Longest first, so a secret containing another is replaced whole.
    secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
    Ok(DeploySpec {
        cluster: inv.cluster.clone(),
        hosts,
        agent_binary: binary,
        secrets,
        restapi_port: inv.agent.restapi_port,
        pg_port: inv.postgresql.port,
        etcd_client_port: etcd_ports.map(|(p, _)| p).unwrap_or(2379),
        primary_port: inv.haproxy.primary_port,
        replica_port: inv.haproxy.replica_port,
        stats_port: inv.haproxy.stats_port,
    })
}

fn render_host(
    inv: &Inventory,
    host: &str,
    renderer: &Renderer,
) -> Result<Vec<DesiredFile>, SpecError> {
    let files = renderer
        .render_all(inv, host)
        .map_err(|source| SpecError::Render {
            host: host.to_string(),
            source,
        })?;
    Ok(files
        .into_iter()
        .map(|f| {
            let owner = format!("{}:{}", f.owner, f.group);
            DesiredFile::new(
                &f.path.display().to_string(),
                f.content.into_bytes(),
                f.mode,
                &owner,
            )
        })
        .collect())
}

/// How to reach each inventory host.
pub fn host_specs(inv: &Inventory) -> Vec<HostSpec> {
    inv.hosts
        .iter()
        .map(|h| HostSpec {
            name: h.name.as_str().to_string(),
            address: h.address.clone(),
            port: h.ssh.port,
            user: h.ssh.user.clone(),
            identity_file: h.ssh.identity_file.clone(),
            r#become: h.ssh.become_,
            connect_timeout: Duration::from_secs(h.ssh.connect_timeout_secs),
            command_timeout: Duration::from_secs(h.ssh.command_timeout_secs),
        })
        .collect()
}

/// `pgherd status`: the cluster as the agents see it (`GET /cluster` from the first agent that
/// answers) plus how to connect through HAProxy.
pub async fn cluster_status(inv: &Inventory) -> anyhow::Result<String> {
    let c = reqwest::Client::builder()
        .timeout(Duration::from_secs(3))
        .build()?;
    let mut body: Option<serde_json::Value> = None;
    let mut tried = Vec::new();
    for h in inv.hosts_with(Role::Postgres) {
        let url = format!("http://{}/cluster", h.endpoint(inv.agent.restapi_port));
        match c.get(&url).send().await {
            Ok(r) if r.status().is_success() => {
                body = r.json().await.ok();
                if body.is_some() {
                    break;
                }
            }
            Ok(r) => tried.push(format!("{}: HTTP {}", h.name.as_str(), r.status())),
            Err(_) => tried.push(format!("{}: agent not reachable", h.name.as_str())),
        }
    }
    let Some(v) = body else {
        anyhow::bail!("no agent answered GET /cluster ({})", tried.join("; "));
    };
    let mut out = String::new();
    let _ = writeln!(out, "cluster {} (namespace {})", inv.cluster, inv.namespace);
    let _ = writeln!(
        out,
        "{:<12} {:<16} {:<8} {:<10} {:>3} {:>10}",
        "member", "host", "role", "state", "TL", "lag(B)"
    );
    for m in v["members"].as_array().into_iter().flatten() {
        let s = |k: &str| {
            m[k].as_str()
                .map(str::to_string)
                .unwrap_or_else(|| m[k].to_string())
        };
        let lag = if m["lag"].is_null() {
            String::new()
        } else {
            m["lag"].to_string()
        };
        let _ = writeln!(
            out,
            "{:<12} {:<16} {:<8} {:<10} {:>3} {:>10}",
            s("name"),
            format!("{}:{}", s("host"), m["port"]),
            s("role"),
            s("state"),
            m["timeline"],
            lag
        );
    }
    let _ = writeln!(
        out,
        "connect through HAProxy (user postgres, password in {}):",
        inv.secrets_file.display()
    );
    for h in inv.hosts_with(Role::Haproxy) {
        let _ = writeln!(
            out,
            "  read-write: psql \"host={} port={} user=postgres dbname=postgres\"",
            h.address, inv.haproxy.primary_port
        );
        let _ = writeln!(
            out,
            "  read-only:  psql \"host={} port={} user=postgres dbname=postgres\"",
            h.address, inv.haproxy.replica_port
        );
    }
    Ok(out)
}

/// Default ports used in fixtures (documentation of what the inventory defaults are).
pub fn service_config_path(spec: &DeploySpec, host: &str, svc: Service) -> Option<String> {
    spec.host(host)
        .and_then(|h| h.service_configs.get(&svc).cloned())
}
