//! The desired state: what pgherd wants on every host ([`HostTarget`]: roles, rendered files,
//! directories, packages, users, the playbook's steps expanded for the host) and in the
//! cluster ([`DeploySpec`]: ports, secrets, the playbook, the managed DCS config, the etcd
//! membership). Plain data, built from the inventory by [`super::spec`]; the planner compares
//! it with the facts. Also what follows from it per host and service mode: the full file and
//! directory lists ([`DeploySpec::files_for`], [`DeploySpec::dirs_for`]) and the fact query.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::sync::Arc;

use super::facts::FactQuery;
use super::playbook::{HostStep, Playbook};
use super::services::{self, AGENT_BIN_PATH, BOOT_PATH, SUPERVISE_PATH, Service, ServiceMode};
use crate::transport::{HostSpec, sha256_hex};

/// Roles a host plays.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Roles {
    pub postgres: bool,
    pub etcd: bool,
    pub haproxy: bool,
}

/// A file pgherd wants on a host.
#[derive(Clone, PartialEq)]
pub struct DesiredFile {
    pub path: String,
    pub content: Arc<Vec<u8>>,
    pub mode: u32,
    /// `user` or `user:group`.
    pub owner: String,
    /// sha256 of `content`, computed once (the agent binary is large).
    pub sha: Arc<str>,
}

impl fmt::Debug for DesiredFile {
    // Content may hold secrets: never print it.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DesiredFile")
            .field("path", &self.path)
            .field("bytes", &self.content.len())
            .field("mode", &format_args!("{:o}", self.mode))
            .field("owner", &self.owner)
            .finish()
    }
}

impl DesiredFile {
    pub fn new(path: &str, content: impl Into<Vec<u8>>, mode: u32, owner: &str) -> DesiredFile {
        let content: Vec<u8> = content.into();
        DesiredFile {
            path: path.to_string(),
            sha: sha256_hex(&content).into(),
            content: Arc::new(content),
            mode,
            owner: owner.to_string(),
        }
    }

    pub fn sha256(&self) -> String {
        self.sha.to_string()
    }
}

/// A directory pgherd wants on a host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredDir {
    pub path: String,
    /// `user:group`.
    pub owner: String,
    pub mode: u32,
}

/// A user pgherd wants on a host (a playbook's `ensure_user` step).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredUser {
    pub name: String,
    pub system: bool,
    pub home: Option<String>,
    pub groups: Vec<String>,
}

/// Desired state of one host.
#[derive(Debug, Clone)]
pub struct HostTarget {
    pub name: String,
    pub address: String,
    pub roles: Roles,
    /// Rendered files (templates), uploaded in every mode.
    pub files: Vec<DesiredFile>,
    pub dirs: Vec<DesiredDir>,
    pub packages: Vec<String>,
    /// Users to create when absent (never modified once present).
    pub users: Vec<DesiredUser>,
    pub pg_data_dir: Option<String>,
    /// Main config file of each service (what its run file points at).
    pub service_configs: BTreeMap<Service, String>,
    /// Distribution units that must be stopped and disabled (systemd mode), e.g. Debian's
    /// `postgresql`, which would otherwise start a second PostgreSQL on the same port.
    pub stop_units: Vec<String>,
    /// The playbook's steps that select this host, arguments expanded for it (see
    /// [`super::schedule`]: which step executes which change).
    pub steps: Vec<HostStep>,
}

impl HostTarget {
    /// The services this host runs, in start order.
    pub fn services(&self) -> Vec<Service> {
        let mut v = Vec::new();
        if self.roles.etcd {
            v.push(Service::Etcd);
        }
        if self.roles.postgres {
            v.push(Service::Agent);
        }
        if self.roles.haproxy {
            v.push(Service::Haproxy);
        }
        v
    }
}

/// The agent binary to install on postgres hosts.
#[derive(Clone)]
pub struct AgentBinary {
    pub bytes: Arc<Vec<u8>>,
    pub sha256: String,
}

impl fmt::Debug for AgentBinary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "AgentBinary({} bytes, sha256 {})",
            self.bytes.len(),
            &self.sha256[..12]
        )
    }
}

impl AgentBinary {
    pub fn new(bytes: Vec<u8>) -> AgentBinary {
        let sha256 = sha256_hex(&bytes);
        AgentBinary {
            bytes: Arc::new(bytes),
            sha256,
        }
    }
}

/// Everything `plan`/`apply` needs, built from the inventory (see [`super::spec`]).
#[derive(Clone)]
pub struct DeploySpec {
    pub cluster: String,
    pub hosts: Vec<HostTarget>,
    pub agent_binary: Option<AgentBinary>,
    /// Values to redact from diffs, logs and errors.
    pub secrets: Vec<String>,
    pub restapi_port: u16,
    pub pg_port: u16,
    pub etcd_client_port: u16,
    pub primary_port: u16,
    pub replica_port: u16,
    /// HAProxy stats port (`/;csv` tells which servers each proxy routes to).
    pub stats_port: u16,
    /// The playbook `apply` walks (its steps order the run).
    pub playbook: Arc<Playbook>,
    /// Where the playbook came from, for errors (`playbooks/deploy.yml` when built in).
    pub playbook_origin: String,
    /// The cluster-wide settings pgherd manages in the DCS `config` key: the `bootstrap.dcs`
    /// section of the rendered agent config (so an operator's own template decides them too).
    /// `None` without postgres hosts.
    pub dcs_config: Option<serde_json::Map<String, serde_json::Value>>,
    /// REST API Basic-auth credentials for the agents' mutating endpoints (a secret: never
    /// printed; `Debug` leaves it out).
    pub restapi_auth: Option<(String, String)>,
    /// The inventory this was built from, for the cluster-level jobs that talk to the agents
    /// and hosts by member (the rolling restart). `None` in planner tests.
    pub inventory: Option<Arc<crate::inventory::Inventory>>,
    /// The etcd members pgherd runs (embedded etcd only): the membership the `etcd_members`
    /// step converges to (see [`super::etcd_members`]).
    pub etcd: Option<EtcdSpec>,
}

impl fmt::Debug for DeploySpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("DeploySpec")
            .field("cluster", &self.cluster)
            .field("hosts", &self.hosts)
            .field("agent_binary", &self.agent_binary)
            .field(
                "secrets",
                &format_args!("[{} redacted]", self.secrets.len()),
            )
            .finish_non_exhaustive()
    }
}

impl DeploySpec {
    pub fn host(&self, name: &str) -> Option<&HostTarget> {
        self.hosts.iter().find(|h| h.name == name)
    }

    /// The host bootstrapped as the first primary: the first postgres host in inventory order.
    pub fn first_primary(&self) -> Option<&HostTarget> {
        self.hosts.iter().find(|h| h.roles.postgres)
    }

    /// Every file a host should have in `mode`: rendered files, plus the agent binary and, in
    /// supervisor mode, the supervisor loop, the boot hook and the run files.
    pub fn files_for(&self, h: &HostTarget, mode: ServiceMode) -> Vec<DesiredFile> {
        let mut files: Vec<DesiredFile> = h
            .files
            .iter()
            .filter(|f| mode == ServiceMode::Systemd || !services::is_unit_file(&f.path))
            .cloned()
            .collect();
        if h.roles.postgres
            && let Some(bin) = &self.agent_binary
        {
            files.push(DesiredFile {
                path: AGENT_BIN_PATH.to_string(),
                content: bin.bytes.clone(),
                mode: 0o755,
                owner: "root:root".into(),
                sha: bin.sha256.as_str().into(),
            });
        }
        if h.roles.haproxy
            && let Some(cfg) = h.service_configs.get(&Service::Haproxy)
        {
            files.push(DesiredFile::new(
                services::HAPROXY_STATE_SCRIPT,
                services::haproxy_state_script(cfg),
                0o755,
                "root:root",
            ));
            if mode == ServiceMode::Systemd {
                files.push(DesiredFile::new(
                    services::HAPROXY_STATE_DROPIN,
                    services::haproxy_state_dropin(),
                    0o644,
                    "root:root",
                ));
            }
        }
        if mode == ServiceMode::Supervisor {
            files.push(DesiredFile::new(
                SUPERVISE_PATH,
                services::supervise_script(),
                0o755,
                "root:root",
            ));
            files.push(DesiredFile::new(
                BOOT_PATH,
                services::boot_script(),
                0o755,
                "root:root",
            ));
            for svc in h.services() {
                let cfg = h
                    .service_configs
                    .get(&svc)
                    .map(String::as_str)
                    .unwrap_or("");
                files.push(DesiredFile::new(
                    &svc.run_file(),
                    services::run_file(svc, cfg),
                    0o644,
                    "root:root",
                ));
            }
        }
        files
    }

    /// Directories a host needs (the host's own plus pgherd's).
    pub fn dirs_for(&self, h: &HostTarget, mode: ServiceMode) -> Vec<DesiredDir> {
        let mut dirs = vec![DesiredDir {
            path: "/etc/pgherd".into(),
            owner: "root:root".into(),
            mode: 0o755,
        }];
        if mode == ServiceMode::Supervisor {
            for p in [
                "/usr/local/lib/pgherd",
                services::RUN_DIR,
                services::LOG_DIR,
            ] {
                dirs.push(DesiredDir {
                    path: p.into(),
                    owner: "root:root".into(),
                    mode: 0o755,
                });
            }
        }
        for d in &h.dirs {
            if !dirs.iter().any(|x| x.path == d.path) {
                dirs.push(d.clone());
            }
        }
        // Parents of every file, so uploads never fail on a missing directory.
        for f in self.files_for(h, mode) {
            if let Some((parent, _)) = f.path.rsplit_once('/')
                && !parent.is_empty()
                && !dirs.iter().any(|x| x.path == parent)
            {
                dirs.push(DesiredDir {
                    path: parent.into(),
                    owner: "root:root".into(),
                    mode: 0o755,
                });
            }
        }
        dirs
    }

    /// The client URL of the etcd member on `h`.
    pub fn etcd_endpoint(&self, h: &HostTarget) -> String {
        format!("http://{}:{}", h.address, self.etcd_client_port)
    }

    /// The fact query for a host. Files of both modes are asked for, since the mode is itself
    /// a fact of the same round trip.
    pub fn fact_query(&self, h: &HostTarget) -> FactQuery {
        let mut files: BTreeSet<String> = BTreeSet::new();
        let mut dirs: BTreeSet<String> = BTreeSet::new();
        for mode in [ServiceMode::Systemd, ServiceMode::Supervisor] {
            files.extend(self.files_for(h, mode).into_iter().map(|f| f.path));
            dirs.extend(self.dirs_for(h, mode).into_iter().map(|d| d.path));
        }
        // Whether the etcd data directory is initialised (only asked, never planned).
        if h.roles.etcd
            && let Some(e) = &self.etcd
        {
            dirs.insert(e.member_dir());
        }
        FactQuery {
            files: files.into_iter().collect(),
            dirs: dirs.into_iter().collect(),
            packages: h.packages.clone(),
            pg_data_dir: h.pg_data_dir.clone().filter(|_| h.roles.postgres),
            etcd_endpoint: h.roles.etcd.then(|| self.etcd_endpoint(h)),
            units: h.stop_units.clone(),
            users: h.users.iter().map(|u| u.name.clone()).collect(),
        }
    }

    /// Wanted sha256 and size of every file of `h` (for fetching diffs of the differing ones).
    pub fn wanted_sha(&self, h: &HostTarget) -> BTreeMap<String, (String, usize)> {
        let mut m = BTreeMap::new();
        for mode in [ServiceMode::Systemd, ServiceMode::Supervisor] {
            for f in self.files_for(h, mode) {
                m.insert(f.path.clone(), (f.sha256(), f.content.len()));
            }
        }
        m
    }
}

/// The inventory's view of one etcd member.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DesiredMember {
    pub name: String,
    /// `http://addr:peer_port`.
    pub peer_url: String,
    /// `http://addr:client_port`.
    pub client_url: String,
}

/// The etcd side of the desired state (embedded etcd only), built from the inventory.
#[derive(Debug, Clone)]
pub struct EtcdSpec {
    /// The inventory's etcd hosts, in inventory order.
    pub members: Vec<DesiredMember>,
    pub data_dir: String,
    /// Where etcd.conf is written on a member.
    pub config_path: String,
    /// Mode and `user:group` of etcd.conf.
    pub config_mode: u32,
    pub config_owner: String,
    /// Per etcd host: its etcd.conf for joining a running cluster (`initial-cluster-state:
    /// existing`, the member list still
    /// [`crate::render::ETCD_INITIAL_CLUSTER_PLACEHOLDER`]).
    pub join_configs: BTreeMap<String, String>,
    /// How to reach a host that left the inventory (the inventory's SSH defaults; address
    /// filled in from the member's peer URL).
    pub ssh_defaults: HostSpec,
    /// Allow a final voter count below 3 or even.
    pub allow_degraded: bool,
}

impl EtcdSpec {
    /// The directory whose presence says a member's data directory is initialised.
    pub fn member_dir(&self) -> String {
        format!("{}/member", self.data_dir.trim_end_matches('/'))
    }
}
