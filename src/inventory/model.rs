//! The validated inventory: what the renderer and the planner consume. Built from a
//! [`RawInventory`](super::raw::RawInventory) by [`build`] (see [`super::validate`]), which runs
//! every semantic check (collecting all problems, each located where the YAML position is known)
//! before anything else happens: a bad inventory never reaches a host.

use std::collections::BTreeSet;
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Serialize;

use super::profile::{HaTiming, HaproxyCheck, Profile};
use super::raw::Map;
use super::secrets::{ClusterSecrets, Secret};
use crate::config::WatchdogMode;
use crate::pki::CaFiles;
use crate::types::MemberName;

pub use super::validate::build;

/// The only PostgreSQL major version this release provisions.
pub const SUPPORTED_PG_VERSION: u32 = 15;
/// Role names pgherd creates itself (applications may not declare them).
pub const SUPERUSER_NAME: &str = "postgres";
pub const REPLICATION_USER_NAME: &str = "replicator";
pub const REWIND_USER_NAME: &str = "rewind_user";
pub const DEFAULT_RESTAPI_USERNAME: &str = "pgherd";

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    Postgres,
    Etcd,
    Haproxy,
}

impl Role {
    pub const ALL: [Role; 3] = [Role::Postgres, Role::Etcd, Role::Haproxy];

    pub fn parse(s: &str) -> Option<Role> {
        Role::ALL.into_iter().find(|r| r.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Postgres => "postgres",
            Role::Etcd => "etcd",
            Role::Haproxy => "haproxy",
        }
    }
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// How to reach one host over SSH (cluster defaults with the host's overrides applied).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Ssh {
    pub user: String,
    pub port: u16,
    pub identity_file: Option<PathBuf>,
    /// Prefix remote commands with `sudo` (non-root users).
    pub become_: bool,
    pub connect_timeout_secs: u64,
    pub command_timeout_secs: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Watchdog {
    pub mode: WatchdogMode,
    pub device: PathBuf,
    pub safety_margin: i64,
}

#[derive(Debug, Clone, Serialize)]
pub struct Host {
    pub name: MemberName,
    /// IP address or DNS name, as written.
    pub address: String,
    pub roles: BTreeSet<Role>,
    pub ssh: Ssh,
    pub tags: Map,
    /// Local PostgreSQL parameters (this host only).
    pub parameters: Map,
    pub watchdog: Watchdog,
}

/// `address:port` for a host name or IP literal, an IPv6 literal in brackets (only IPv6
/// literals contain a `:`; a zone id such as `fe80::1%eth0` is bracketed too).
pub fn endpoint(address: &str, port: u16) -> String {
    if address.contains(':') {
        format!("[{address}]:{port}")
    } else {
        format!("{address}:{port}")
    }
}

impl Host {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// `address:port`, bracketing IPv6 literals.
    pub fn endpoint(&self, port: u16) -> String {
        endpoint(&self.address, port)
    }

    /// The address as used in pg_hba (`/32` or `/128` for IPs, the name otherwise).
    pub fn hba_address(&self) -> String {
        match self.address.parse::<IpAddr>() {
            Ok(IpAddr::V4(_)) => format!("{}/32", self.address),
            Ok(IpAddr::V6(_)) => format!("{}/128", self.address),
            Err(_) => self.address.clone(),
        }
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct User {
    pub name: String,
    pub password: Secret,
    pub options: Vec<String>,
}

#[derive(Debug, Clone, Serialize)]
pub struct Database {
    pub name: String,
    pub owner: Option<String>,
}

/// How the primary gets its restart in the restart phase (never for a decrease of the five:
/// that is always in place).
///
/// The default is [`PrimaryUpdateMethod::Restart`], in place after a `CHECKPOINT`, as CNPG
/// (its default), PGO and Zalando do for configuration changes: the cluster keeps its leader,
/// the writes stop for one restart of a freshly checkpointed server (seconds), no client sees
/// its primary become a read-only replica, and no timeline is added. A switchover moves the
/// write outage to a shorter blip but demotes the primary (its sessions are cut all the same)
/// and depends on a healthy, caught-up target; choose it with the inventory's
/// `postgresql.primary_update_method: switchover` (or `--primary-update-method switchover`) where the primary's restart time is long (large `shared_buffers`, slow
/// storage).
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum PrimaryUpdateMethod {
    #[default]
    Restart,
    Switchover,
}

#[derive(Debug, Clone, Serialize)]
pub struct Postgresql {
    pub version: u32,
    pub bin_dir: PathBuf,
    pub data_dir: PathBuf,
    pub port: u16,
    /// Cluster-wide parameters (seed the DCS config).
    pub parameters: Map,
    /// Extra pg_hba lines from the inventory.
    pub pg_hba: Vec<String>,
    pub users: Vec<User>,
    pub databases: Vec<Database>,
    pub use_pg_rewind: bool,
    pub use_slots: bool,
    /// How a rolling restart restarts the primary (see [`PrimaryUpdateMethod`]).
    pub primary_update_method: PrimaryUpdateMethod,
}

#[derive(Debug, Clone, Serialize)]
pub enum Etcd {
    /// etcd runs on the inventory's hosts with the `etcd` role.
    Embedded(EmbeddedEtcd),
    /// An etcd the operator runs; pgherd only points the agents at it.
    External { endpoints: Vec<String> },
}

#[derive(Debug, Clone, Serialize)]
pub struct EmbeddedEtcd {
    pub members: Vec<MemberName>,
    pub client_port: u16,
    pub peer_port: u16,
    pub data_dir: PathBuf,
    pub token: String,
}

#[derive(Debug, Clone, Serialize)]
pub struct Haproxy {
    pub primary_port: u16,
    pub replica_port: u16,
    pub stats_port: u16,
    pub maxconn: u32,
    /// The replicas' pool.
    pub check: HaproxyCheck,
    /// The primary's pool: the profile's faster cadence, or `check` when the inventory sets
    /// `haproxy.check` (the operator took control of both).
    pub primary_check: HaproxyCheck,
}

#[derive(Debug, Clone, Serialize)]
pub struct Agent {
    pub restapi_port: u16,
    pub restapi_username: String,
    /// Local path of the agent binary to upload, when not the default.
    pub binary: Option<PathBuf>,
    pub log_level: String,
    /// `agent.restapi_allowlist`: who besides the cluster's hosts may call the REST API's
    /// mutating verbs (the operator's machine, an automation host). Empty: no address
    /// restriction (Basic auth alone, Patroni's default). When given, each agent's
    /// `restapi.allowlist` is these plus every inventory host's address, with
    /// `allowlist_include_members` (the agents call each other's `POST /failsafe`, which
    /// Patroni checks against the static list only).
    pub restapi_allowlist: Vec<String>,
}

#[derive(Debug, Clone, Default, Serialize)]
pub struct Callbacks {
    pub on_start: Option<String>,
    pub on_stop: Option<String>,
    pub on_restart: Option<String>,
    pub on_reload: Option<String>,
    pub on_role_change: Option<String>,
    pub pre_promote: Option<String>,
    pub before_stop: Option<String>,
}

/// What `tls.enabled: false` makes the CLI say (see [`Tls::warning`]).
pub const TLS_OFF_WARNING: &str =
    "TLS is off: etcd, the REST API and PostgreSQL replication travel in the clear";

/// The `tls` section: TLS everywhere from a cluster CA (see [`crate::pki`]).
///
/// Meant to be on by default (a new cluster gets certificates for etcd, the REST API and
/// PostgreSQL without asking; `tls.enabled: false` turns it off and [`Tls::warning`] says so on
/// every run). Until the services are deployed with certificates it is off and
/// `tls.enabled: true` is refused (see `validate/tls.rs`).
/// Whether turning it on for a cluster that already runs in the clear needs a migration is
/// the provisioning's concern, not the inventory's. The other settings are kept (and
/// checked) while TLS is off, so turning it back on is a one-line edit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Tls {
    pub enabled: bool,
    /// The CA that issues the node certificates.
    pub ca: TlsCa,
    /// Lifetime of a node certificate in days (default [`crate::pki::NODE_CERT_DAYS`]).
    pub cert_days: u32,
    pub verify_client: VerifyClient,
}

impl Tls {
    /// The warning to print when TLS is off; `None` when it is on.
    pub fn warning(&self) -> Option<&'static str> {
        (!self.enabled).then_some(TLS_OFF_WARNING)
    }
}

/// Which CA issues the node certificates.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub enum TlsCa {
    /// pgherd's own, created on first use beside the secrets file (see
    /// [`crate::pki::store`]).
    Generated,
    /// The operator's (`tls.ca_cert` and `tls.ca_key`, resolved against the inventory's
    /// directory; the key PKCS#8 PEM, mode 0600); pgherd only loads it.
    Operator { cert: PathBuf, key: PathBuf },
}

/// Whether the REST API asks clients for a certificate (Patroni's `restapi.verify_client`).
///
/// The default is [`VerifyClient::Optional`]: a client that presents a certificate must
/// present one of the cluster CA's, and the unsafe endpoints (switchover, restart, reload,
/// config changes, ...) answer 403 "client certificate required" without one, while the
/// health endpoints stay open to clients without a certificate, so HAProxy checks, load
/// balancers and monitoring keep working unchanged. `required` refuses the TLS handshake to
/// any client without a certificate (every health checker then needs one); `none` (Patroni's
/// default) never asks, leaving the unsafe endpoints to Basic auth alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum VerifyClient {
    Required,
    #[default]
    Optional,
    None,
}

impl VerifyClient {
    pub const ALL: [VerifyClient; 3] = [
        VerifyClient::Required,
        VerifyClient::Optional,
        VerifyClient::None,
    ];

    /// The inventory's (and Patroni's) spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            VerifyClient::Required => "required",
            VerifyClient::Optional => "optional",
            VerifyClient::None => "none",
        }
    }

    pub fn parse(s: &str) -> Option<VerifyClient> {
        VerifyClient::ALL.into_iter().find(|v| v.as_str() == s)
    }
}

/// A validated inventory. `Debug` never shows a password (they are [`Secret`]s).
#[derive(Debug, Clone)]
pub struct Inventory {
    /// Where it came from (file path or test origin), for messages.
    pub origin: String,
    /// Patroni scope.
    pub cluster: String,
    pub namespace: String,
    pub profile: Profile,
    /// The profile's timing with the inventory's overrides applied (already checked).
    pub timing: HaTiming,
    pub maximum_lag_on_failover: u64,
    pub synchronous_mode: bool,
    pub hosts: Vec<Host>,
    pub postgresql: Postgresql,
    pub etcd: Etcd,
    pub haproxy: Haproxy,
    pub agent: Agent,
    /// Cluster-wide watchdog defaults (each host carries its resolved copy).
    pub watchdog: Watchdog,
    pub callbacks: Callbacks,
    pub tls: Tls,
    pub secrets_file: PathBuf,
    pub secrets: ClusterSecrets,
}

impl Inventory {
    pub fn host(&self, name: &str) -> Option<&Host> {
        self.hosts.iter().find(|h| h.name.as_str() == name)
    }

    pub fn hosts_with(&self, role: Role) -> impl Iterator<Item = &Host> {
        self.hosts.iter().filter(move |h| h.has(role))
    }

    /// The host that bootstraps the cluster (first `postgres` host in file order). Validation
    /// guarantees there is one.
    pub fn first_postgres(&self) -> &Host {
        self.hosts_with(Role::Postgres)
            .next()
            .expect("validated: at least one postgres host")
    }

    /// etcd client endpoints as `host:port` (what agents and etcdctl use).
    pub fn etcd_endpoints(&self) -> Vec<String> {
        match &self.etcd {
            Etcd::External { endpoints } => endpoints.clone(),
            Etcd::Embedded(e) => self
                .hosts_with(Role::Etcd)
                .map(|h| h.endpoint(e.client_port))
                .collect(),
        }
    }

    /// `name=http://addr:peer,...` for embedded etcd.
    pub fn etcd_initial_cluster(&self) -> Option<String> {
        let Etcd::Embedded(e) = &self.etcd else {
            return None;
        };
        Some(
            self.hosts_with(Role::Etcd)
                .map(|h| format!("{}=http://{}", h.name, h.endpoint(e.peer_port)))
                .collect::<Vec<_>>()
                .join(","),
        )
    }

    /// Where the cluster's CA is: the operator's files, or pgherd's beside the secrets file.
    pub fn ca_files(&self) -> CaFiles {
        match &self.tls.ca {
            TlsCa::Operator { cert, key } => CaFiles {
                cert: cert.clone(),
                key: key.clone(),
            },
            TlsCa::Generated => CaFiles::beside(&self.secrets_file, &self.cluster),
        }
    }

    /// Every secret value of the cluster (cluster roles, REST API, application users).
    pub fn secret_values(&self) -> Vec<&str> {
        let mut v: Vec<&str> = self.secrets.all().into_iter().map(Secret::expose).collect();
        v.extend(self.postgresql.users.iter().map(|u| u.password.expose()));
        v.retain(|s| !s.is_empty());
        v
    }

    /// `text` with every secret of this cluster replaced by `********`: use it before showing
    /// rendered files (diffs, `--dry-run`) to an operator.
    pub fn redact(&self, text: &str) -> String {
        let mut secrets = self.secret_values();
        // Longest first, so a secret that contains another is replaced whole.
        secrets.sort_by_key(|s| std::cmp::Reverse(s.len()));
        let mut out = text.to_string();
        for s in secrets {
            out = out.replace(s, "********");
        }
        out
    }
}
