//! The validated inventory: what the renderer and the planner consume. Built from a
//! [`RawInventory`] by [`build`], which runs every semantic check (collecting all problems, each
//! located where the YAML position is known) before anything else happens: a bad inventory never
//! reaches a host.

use std::collections::{BTreeMap, BTreeSet};
use std::net::IpAddr;
use std::path::PathBuf;

use serde::Serialize;
use serde_saphyr::Spanned;

use super::error::{InventoryError, Pos, Problem};
use super::profile::{HaTiming, HaproxyCheck, Profile, parse_haproxy_duration};
use super::raw::{Map, RawInventory, RawSsh, RawWatchdog};
use super::secrets::{ClusterSecrets, Secret};
use crate::config::WatchdogMode;
use crate::types::MemberName;

/// The only PostgreSQL major version this release provisions.
pub const SUPPORTED_PG_VERSION: u32 = 15;
/// Role names pgherd creates itself (applications may not declare them).
pub const SUPERUSER_NAME: &str = "postgres";
pub const REPLICATION_USER_NAME: &str = "replicator";
pub const REWIND_USER_NAME: &str = "rewind_user";
pub const DEFAULT_RESTAPI_USERNAME: &str = "pgherd";
/// Parameters pgherd derives from the inventory; setting them by hand would desynchronise the
/// agent's view (connect addresses, ports) from PostgreSQL's.
const MANAGED_PARAMETERS: [&str; 6] = [
    "listen_addresses",
    "port",
    "data_directory",
    "hba_file",
    "ident_file",
    "config_file",
];

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

/// Collects problems during validation.
#[derive(Default)]
struct Checker {
    problems: Vec<Problem>,
}

impl Checker {
    fn at<T>(&mut self, s: &Spanned<T>, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            pos: Pos::of(&s.referenced),
            field: field.into(),
            message: message.into(),
        });
    }

    fn nowhere(&mut self, field: impl Into<String>, message: impl Into<String>) {
        self.problems.push(Problem {
            pos: None,
            field: field.into(),
            message: message.into(),
        });
    }

    /// A port with its default; 0 is refused (it would mean "any port" to most daemons).
    fn port(&mut self, v: &Option<Spanned<u16>>, default: u16, field: &str) -> u16 {
        match v {
            Some(s) if s.value == 0 => {
                self.at(s, field, "port 0 is out of range (1-65535)");
                default
            }
            Some(s) => s.value,
            None => default,
        }
    }

    fn abs_path(&mut self, v: &Option<Spanned<String>>, default: String, field: &str) -> PathBuf {
        match v {
            Some(s) if !s.value.starts_with('/') => {
                self.at(
                    s,
                    field,
                    format!("must be an absolute path (got {:?})", s.value),
                );
                PathBuf::from(default)
            }
            Some(s) => PathBuf::from(&s.value),
            None => PathBuf::from(default),
        }
    }
}

fn is_simple_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

fn is_sql_identifier(s: &str) -> bool {
    let mut chars = s.chars();
    matches!(chars.next(), Some(c) if c.is_ascii_lowercase() || c == '_')
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        && s.len() <= 63
}

/// Why an address is unusable, if it is.
fn address_problem(a: &str) -> Option<String> {
    if a.is_empty() {
        return Some("address must not be empty".into());
    }
    if let Ok(ip) = a.parse::<IpAddr>() {
        if ip.is_unspecified() {
            return Some(format!(
                "{a} is the unspecified address; give the host's own address"
            ));
        }
        return None;
    }
    // Not an IP: must be a DNS name. All-numeric labels would be a mistyped IPv4.
    let bad = || {
        Some(format!(
            "{a:?} is neither an IP address nor a valid host name"
        ))
    };
    if a.len() > 253 || a.split('.').all(|l| l.chars().all(|c| c.is_ascii_digit())) {
        return bad();
    }
    for label in a.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        if !ok {
            return bad();
        }
    }
    None
}

fn watchdog_mode(c: &mut Checker, s: &Spanned<String>, field: &str) -> Option<WatchdogMode> {
    match s.value.as_str() {
        "off" => Some(WatchdogMode::Off),
        "automatic" => Some(WatchdogMode::Automatic),
        "required" => Some(WatchdogMode::Required),
        other => {
            c.at(
                s,
                field,
                format!("bad watchdog mode {other:?} (expected off, automatic or required)"),
            );
            None
        }
    }
}

fn resolve_watchdog(c: &mut Checker, base: &Watchdog, raw: &RawWatchdog, field: &str) -> Watchdog {
    let mut w = base.clone();
    if let Some(m) = &raw.mode
        && let Some(mode) = watchdog_mode(c, m, &format!("{field}.mode"))
    {
        w.mode = mode;
    }
    if let Some(d) = &raw.device {
        w.device = PathBuf::from(d);
    }
    if let Some(s) = &raw.safety_margin {
        if s.value < -1 {
            c.at(
                s,
                format!("{field}.safety_margin"),
                format!("must be -1 or >= 0 (got {})", s.value),
            );
        } else {
            w.safety_margin = s.value;
        }
    }
    w
}

fn resolve_ssh(c: &mut Checker, base: Option<&Ssh>, raw: &RawSsh, field: &str) -> Ssh {
    let mut s = base.cloned().unwrap_or(Ssh {
        user: "root".into(),
        port: 22,
        identity_file: None,
        become_: false,
        connect_timeout_secs: 10,
        command_timeout_secs: 600,
    });
    let user_set = raw.user.is_some();
    if let Some(u) = &raw.user {
        if u.value.trim().is_empty() {
            c.at(u, format!("{field}.user"), "must not be empty");
        }
        s.user = u.value.clone();
    }
    s.port = c.port(&raw.port, s.port, &format!("{field}.port"));
    if let Some(i) = &raw.identity_file {
        s.identity_file = Some(PathBuf::from(i));
    }
    // `become` defaults to "sudo when not root", re-derived when the user changes.
    s.become_ = match raw.become_ {
        Some(b) => b,
        None if user_set || base.is_none() => s.user != "root",
        None => s.become_,
    };
    for (v, slot, name) in [
        (
            &raw.connect_timeout,
            &mut s.connect_timeout_secs,
            "connect_timeout",
        ),
        (
            &raw.command_timeout,
            &mut s.command_timeout_secs,
            "command_timeout",
        ),
    ] {
        if let Some(t) = v {
            if t.value == 0 {
                c.at(t, format!("{field}.{name}"), "must be at least 1 second");
            } else {
                *slot = t.value;
            }
        }
    }
    s
}

/// Validates `raw` and builds the inventory. `secrets` is called only once validation passed,
/// with the names of application users that have no inline password, and must supply the
/// cluster's secrets (from the secrets file, generating what is missing).
pub fn build(
    raw: RawInventory,
    origin: &str,
    secrets_file: PathBuf,
    secrets: impl FnOnce(&[&str]) -> Result<ClusterSecrets, InventoryError>,
) -> Result<Inventory, InventoryError> {
    let mut c = Checker::default();

    // --- cluster identity -------------------------------------------------------------------
    let cluster = raw.cluster.value.clone();
    if cluster.trim().is_empty() {
        c.at(&raw.cluster, "cluster", "cluster name must not be empty");
    } else if !is_simple_name(&cluster) {
        c.at(
            &raw.cluster,
            "cluster",
            format!("{cluster:?} may only contain letters, digits, '-', '_' and '.'"),
        );
    }
    let namespace = match &raw.namespace {
        Some(n) if n.value.trim().is_empty() || n.value.contains(char::is_whitespace) => {
            c.at(
                n,
                "namespace",
                "must be non-empty and contain no whitespace",
            );
            "/service/".to_string()
        }
        Some(n) => n.value.clone(),
        None => "/service/".to_string(),
    };

    // --- profile and timing -----------------------------------------------------------------
    let profile = match &raw.profile {
        Some(p) => Profile::parse(&p.value).unwrap_or_else(|| {
            c.at(
                p,
                "profile",
                format!(
                    "bad profile {:?} (expected fast, norm, safe or wide)",
                    p.value
                ),
            );
            Profile::default()
        }),
        None => Profile::default(),
    };
    let mut timing = profile.ha_timing();
    let mut maximum_lag_on_failover = 1_048_576;
    if let Some(t) = &raw.timing {
        let v = &t.value;
        timing.ttl = v.ttl.unwrap_or(timing.ttl);
        timing.loop_wait = v.loop_wait.unwrap_or(timing.loop_wait);
        timing.retry_timeout = v.retry_timeout.unwrap_or(timing.retry_timeout);
        timing.primary_start_timeout = v
            .primary_start_timeout
            .unwrap_or(timing.primary_start_timeout);
        maximum_lag_on_failover = v.maximum_lag_on_failover.unwrap_or(maximum_lag_on_failover);
    }

    // --- watchdog defaults --------------------------------------------------------------------
    let base_wd = Watchdog {
        mode: WatchdogMode::Automatic,
        device: PathBuf::from("/dev/watchdog"),
        safety_margin: timing.safety_margin,
    };
    let watchdog = resolve_watchdog(&mut c, &base_wd, &raw.watchdog, "watchdog");
    timing.safety_margin = watchdog.safety_margin;

    // --- ports ---------------------------------------------------------------------------------
    let pg_port = c.port(&raw.postgresql.port, 5432, "postgresql.port");
    let restapi_port = c.port(&raw.agent.restapi_port, 8008, "agent.restapi_port");
    let client_port = c.port(&raw.etcd.client_port, 2379, "etcd.client_port");
    let peer_port = c.port(&raw.etcd.peer_port, 2380, "etcd.peer_port");
    let primary_port = c.port(&raw.haproxy.primary_port, 5000, "haproxy.primary_port");
    let replica_port = c.port(&raw.haproxy.replica_port, 5001, "haproxy.replica_port");
    let stats_port = c.port(&raw.haproxy.stats_port, 7000, "haproxy.stats_port");

    // --- hosts ---------------------------------------------------------------------------------
    let ssh_defaults = resolve_ssh(&mut c, None, &raw.ssh, "ssh");
    if raw.hosts.value.is_empty() {
        c.at(&raw.hosts, "hosts", "at least one host is required");
    }
    let mut hosts: Vec<Host> = Vec::new();
    let mut seen_names: BTreeMap<String, usize> = BTreeMap::new();
    let mut seen_slots: BTreeMap<String, String> = BTreeMap::new();
    let mut seen_addrs: BTreeMap<String, String> = BTreeMap::new();
    for (i, rh) in raw.hosts.value.iter().enumerate() {
        let name = rh.name.value.clone();
        let f = if name.is_empty() {
            format!("hosts[{i}]")
        } else {
            format!("hosts[{name}]")
        };
        if name.trim().is_empty() {
            c.at(&rh.name, format!("{f}.name"), "host name must not be empty");
        } else if !is_simple_name(&name) {
            c.at(
                &rh.name,
                format!("{f}.name"),
                format!("host name {name:?} may only contain letters, digits, '-', '_' and '.'"),
            );
        } else if name == "all" || Role::parse(&name).is_some() {
            // Playbook selectors use these words; a host with such a name would be ambiguous.
            c.at(
                &rh.name,
                format!("{f}.name"),
                format!("host name {name:?} is reserved (it is a playbook host selector)"),
            );
        } else if let Some(prev) = seen_names.insert(name.clone(), i) {
            c.at(
                &rh.name,
                format!("{f}.name"),
                format!(
                    "duplicate host name {name:?} (also hosts entry #{})",
                    prev + 1
                ),
            );
        } else {
            let slot = MemberName::new(name.clone()).slot_name();
            if let Some(other) = seen_slots.insert(slot.clone(), name.clone()) {
                c.at(&rh.name, format!("{f}.name"), format!("hosts {other:?} and {name:?} map to the same replication slot name {slot:?}"));
            }
        }
        let address = match &rh.address {
            None => {
                c.at(
                    &rh.name,
                    format!("{f}.address"),
                    format!("host {name:?} has no address"),
                );
                String::new()
            }
            Some(a) => {
                if let Some(msg) = address_problem(&a.value) {
                    c.at(a, format!("{f}.address"), format!("host {name:?}: {msg}"));
                } else if let Some(other) = seen_addrs.insert(a.value.to_lowercase(), name.clone())
                {
                    c.at(
                        a,
                        format!("{f}.address"),
                        format!(
                            "duplicate address {} (hosts {other:?} and {name:?})",
                            a.value
                        ),
                    );
                }
                a.value.clone()
            }
        };
        let mut roles = BTreeSet::new();
        match &rh.roles {
            None => c.at(
                &rh.name,
                format!("{f}.roles"),
                format!("host {name:?} has no roles (expected some of postgres, etcd, haproxy)"),
            ),
            Some(list) if list.value.is_empty() => c.at(
                list,
                format!("{f}.roles"),
                format!("host {name:?} has no roles (expected some of postgres, etcd, haproxy)"),
            ),
            Some(list) => {
                for r in &list.value {
                    match Role::parse(&r.value) {
                        Some(role) => {
                            if !roles.insert(role) {
                                c.at(r, format!("{f}.roles"), format!("role {role} listed twice"));
                            }
                        }
                        None => c.at(
                            r,
                            format!("{f}.roles"),
                            format!(
                                "unknown role {:?} (expected postgres, etcd or haproxy)",
                                r.value
                            ),
                        ),
                    }
                }
            }
        }
        let ssh = match &rh.ssh {
            Some(o) => resolve_ssh(&mut c, Some(&ssh_defaults), o, &format!("{f}.ssh")),
            None => ssh_defaults.clone(),
        };
        let wd = match &rh.watchdog {
            Some(o) => resolve_watchdog(&mut c, &watchdog, o, &format!("{f}.watchdog")),
            None => watchdog.clone(),
        };
        let parameters = rh
            .parameters
            .as_ref()
            .map(|p| p.value.clone())
            .unwrap_or_default();
        if let Some(p) = &rh.parameters {
            check_parameters(&mut c, p, &format!("{f}.parameters"));
            check_local_parameters(&mut c, p, &format!("{f}.parameters"));
        }
        // Ports used on this host must not collide (they all bind the same address).
        let mut used: Vec<(u16, &str)> = Vec::new();
        if roles.contains(&Role::Postgres) {
            used.extend([
                (pg_port, "postgresql.port"),
                (restapi_port, "agent.restapi_port"),
            ]);
        }
        if roles.contains(&Role::Etcd) && raw.etcd.endpoints.is_none() {
            used.extend([
                (client_port, "etcd.client_port"),
                (peer_port, "etcd.peer_port"),
            ]);
        }
        if roles.contains(&Role::Haproxy) {
            used.extend([
                (primary_port, "haproxy.primary_port"),
                (replica_port, "haproxy.replica_port"),
                (stats_port, "haproxy.stats_port"),
            ]);
        }
        for (k, (p, a)) in used.iter().enumerate() {
            if let Some((_, b)) = used[..k].iter().find(|(q, _)| q == p) {
                c.at(
                    &rh.name,
                    format!("{f}.roles"),
                    format!("host {name:?}: port {p} is used by both {b} and {a}"),
                );
            }
        }
        hosts.push(Host {
            name: MemberName::new(name),
            address,
            roles,
            ssh,
            tags: rh
                .tags
                .as_ref()
                .map(|t| t.value.clone())
                .unwrap_or_default(),
            parameters,
            watchdog: wd,
        });
    }

    // --- tags (need every host name first) -------------------------------------------------
    for (rh, h) in raw.hosts.value.iter().zip(&hosts) {
        let Some(tags) = &rh.tags else { continue };
        let f = format!("hosts[{}].tags", h.name);
        for (k, v) in &tags.value {
            match k.as_str() {
                "nofailover" | "noloadbalance" | "clonefrom" | "nosync" | "nostream"
                    if !v.is_boolean() =>
                {
                    c.at(
                        tags,
                        format!("{f}.{k}"),
                        format!("tag {k} must be true or false (got {v})"),
                    );
                }
                "replicatefrom" => match v.as_str() {
                    None => c.at(
                        tags,
                        format!("{f}.{k}"),
                        "replicatefrom must be a host name",
                    ),
                    Some(t) if t == h.name.as_str() => c.at(
                        tags,
                        format!("{f}.{k}"),
                        format!("host {:?} cannot replicate from itself", t),
                    ),
                    Some(t) => match hosts.iter().find(|o| o.name.as_str() == t) {
                        None => c.at(
                            tags,
                            format!("{f}.{k}"),
                            format!("unknown host {t:?} referenced in replicatefrom"),
                        ),
                        Some(o) if !o.has(Role::Postgres) => c.at(
                            tags,
                            format!("{f}.{k}"),
                            format!("replicatefrom host {t:?} has no postgres role"),
                        ),
                        Some(_) => {}
                    },
                },
                "failover_priority" if !v.is_i64() => {
                    c.at(
                        tags,
                        format!("{f}.{k}"),
                        format!("failover_priority must be an integer (got {v})"),
                    );
                }
                _ => {}
            }
        }
    }

    let pg_hosts: Vec<&Host> = hosts.iter().filter(|h| h.has(Role::Postgres)).collect();
    if !raw.hosts.value.is_empty() && pg_hosts.is_empty() {
        c.at(&raw.hosts, "hosts", "no host has the postgres role");
    }
    if !pg_hosts.is_empty()
        && pg_hosts
            .iter()
            .all(|h| h.tags.get("nofailover") == Some(&serde_json::Value::Bool(true)))
    {
        c.at(
            &raw.hosts,
            "hosts",
            "every postgres host is tagged nofailover: no host could ever become primary",
        );
    }

    // --- timing rule (profile + overrides, and the watchdog) ------------------------------------
    if let Err(m) = timing.check(false) {
        match &raw.timing {
            Some(t) => c.at(t, "timing", format!("timing rule violated: {m}")),
            None => c.nowhere("timing", format!("timing rule violated: {m}")),
        }
    } else {
        for h in hosts
            .iter()
            .filter(|h| h.has(Role::Postgres) && h.watchdog.mode != WatchdogMode::Off)
        {
            let t = HaTiming {
                safety_margin: h.watchdog.safety_margin,
                ..timing
            };
            if let Err(m) = t.check(true) {
                match (&raw.timing, &raw.watchdog.safety_margin) {
                    (_, Some(s)) => c.at(
                        s,
                        format!("hosts[{}].watchdog", h.name),
                        format!("timing rule violated: {m}"),
                    ),
                    (Some(t), None) => c.at(
                        t,
                        format!("hosts[{}].watchdog", h.name),
                        format!("timing rule violated: {m}"),
                    ),
                    (None, None) => c.nowhere(
                        format!("hosts[{}].watchdog", h.name),
                        format!("timing rule violated: {m}"),
                    ),
                }
                break;
            }
        }
    }

    // --- postgresql ----------------------------------------------------------------------------
    let rp = &raw.postgresql;
    let version = match &rp.version {
        Some(v) if v.value != SUPPORTED_PG_VERSION => {
            c.at(
                v,
                "postgresql.version",
                format!(
                    "PostgreSQL {} is not supported (only {SUPPORTED_PG_VERSION})",
                    v.value
                ),
            );
            SUPPORTED_PG_VERSION
        }
        _ => SUPPORTED_PG_VERSION,
    };
    let bin_dir = c.abs_path(
        &rp.bin_dir,
        format!("/usr/lib/postgresql/{version}/bin"),
        "postgresql.bin_dir",
    );
    let data_dir = c.abs_path(
        &rp.data_dir,
        format!("/var/lib/postgresql/{version}/{cluster}"),
        "postgresql.data_dir",
    );
    if let Some(p) = &rp.parameters {
        check_parameters(&mut c, p, "postgresql.parameters");
    }
    let reserved_users = [SUPERUSER_NAME, REPLICATION_USER_NAME, REWIND_USER_NAME];
    let mut user_names = BTreeSet::new();
    for u in &rp.users {
        let n = &u.name.value;
        let f = format!("postgresql.users[{n}]");
        if !is_sql_identifier(n) {
            c.at(
                &u.name,
                f,
                format!("user name {n:?} must be a lowercase SQL identifier ([a-z_][a-z0-9_]*)"),
            );
        } else if reserved_users.contains(&n.as_str()) {
            c.at(&u.name, f, format!("user {n:?} is managed by pgherd"));
        } else if !user_names.insert(n.clone()) {
            c.at(&u.name, f, format!("duplicate user {n:?}"));
        }
    }
    let mut db_names = BTreeSet::new();
    for d in &rp.databases {
        let n = &d.name.value;
        let f = format!("postgresql.databases[{n}]");
        if !is_sql_identifier(n) {
            c.at(
                &d.name,
                f.clone(),
                format!("database name {n:?} must be a lowercase SQL identifier"),
            );
        } else if ["postgres", "template0", "template1"].contains(&n.as_str()) {
            c.at(&d.name, f.clone(), format!("database {n:?} always exists"));
        } else if !db_names.insert(n.clone()) {
            c.at(&d.name, f.clone(), format!("duplicate database {n:?}"));
        }
        if let Some(o) = &d.owner
            && o.value != SUPERUSER_NAME
            && !user_names.contains(&o.value)
        {
            c.at(
                o,
                format!("{f}.owner"),
                format!("owner {:?} is not a declared user", o.value),
            );
        }
    }

    // --- etcd ----------------------------------------------------------------------------------
    let etcd_hosts: Vec<&Host> = hosts.iter().filter(|h| h.has(Role::Etcd)).collect();
    let etcd = match &raw.etcd.endpoints {
        Some(eps) => {
            if !etcd_hosts.is_empty() {
                c.at(eps, "etcd.endpoints", format!(
                    "external etcd endpoints and hosts with the etcd role ({}) are mutually exclusive",
                    etcd_hosts.iter().map(|h| h.name.as_str()).collect::<Vec<_>>().join(", ")
                ));
            }
            if eps.value.is_empty() {
                c.at(eps, "etcd.endpoints", "at least one endpoint is required");
            }
            for e in &eps.value {
                let ok = e.value.rsplit_once(':').is_some_and(|(h, p)| {
                    !h.is_empty()
                        && p.parse::<u16>().is_ok_and(|p| p > 0)
                        && address_problem(h.trim_start_matches("http://").trim_matches(['[', ']']))
                            .is_none()
                });
                if !ok {
                    c.at(
                        e,
                        "etcd.endpoints",
                        format!("expected host:port, got {:?}", e.value),
                    );
                }
            }
            Etcd::External {
                endpoints: eps.value.iter().map(|e| e.value.clone()).collect(),
            }
        }
        None => {
            if etcd_hosts.is_empty() {
                c.at(
                    &raw.hosts,
                    "etcd",
                    "no etcd: give some hosts the etcd role or list etcd.endpoints",
                );
            } else if etcd_hosts.len().is_multiple_of(2) {
                // Why: an even member count tolerates no more failures than one member fewer,
                // and a 2-way split leaves no majority at all.
                c.at(
                    &raw.hosts,
                    "etcd",
                    format!(
                        "etcd needs an odd number of members (got {}: {})",
                        etcd_hosts.len(),
                        etcd_hosts
                            .iter()
                            .map(|h| h.name.as_str())
                            .collect::<Vec<_>>()
                            .join(", ")
                    ),
                );
            }
            Etcd::Embedded(EmbeddedEtcd {
                members: etcd_hosts.iter().map(|h| h.name.clone()).collect(),
                client_port,
                peer_port,
                data_dir: c.abs_path(
                    &raw.etcd.data_dir,
                    format!("/var/lib/etcd/{cluster}"),
                    "etcd.data_dir",
                ),
                token: raw
                    .etcd
                    .token
                    .clone()
                    .unwrap_or_else(|| format!("{cluster}-etcd")),
            })
        }
    };

    // --- haproxy -------------------------------------------------------------------------------
    let mut check = profile.haproxy_check();
    let primary_check = match &raw.haproxy.check {
        Some(_) => None,
        None => Some(profile.haproxy_primary_check()),
    };
    if let Some(rc) = &raw.haproxy.check {
        for (v, slot, name) in [
            (&rc.inter, &mut check.inter_ms, "inter"),
            (&rc.fastinter, &mut check.fastinter_ms, "fastinter"),
            (&rc.downinter, &mut check.downinter_ms, "downinter"),
        ] {
            if let Some(s) = v {
                match parse_haproxy_duration(&s.value) {
                    Some(ms) => *slot = ms,
                    None => c.at(
                        s,
                        format!("haproxy.check.{name}"),
                        format!("bad duration {:?} (expected e.g. 500ms, 2s)", s.value),
                    ),
                }
            }
        }
        for (v, slot, name) in [
            (&rc.rise, &mut check.rise, "rise"),
            (&rc.fall, &mut check.fall, "fall"),
        ] {
            if let Some(s) = v {
                if s.value == 0 {
                    c.at(s, format!("haproxy.check.{name}"), "must be at least 1");
                } else {
                    *slot = s.value;
                }
            }
        }
    }
    let maxconn = match &raw.haproxy.maxconn {
        Some(m) if m.value == 0 => {
            c.at(m, "haproxy.maxconn", "must be at least 1");
            1000
        }
        Some(m) => m.value,
        None => 1000,
    };

    // --- agent ---------------------------------------------------------------------------------
    let log_level = match &raw.agent.log_level {
        Some(l) if !["error", "warn", "info", "debug", "trace"].contains(&l.value.as_str()) => {
            c.at(
                l,
                "agent.log_level",
                format!(
                    "bad log level {:?} (expected error, warn, info, debug or trace)",
                    l.value
                ),
            );
            "info".to_string()
        }
        Some(l) => l.value.clone(),
        None => "info".to_string(),
    };
    let restapi_username = match &raw.agent.restapi_username {
        Some(u) if !is_simple_name(&u.value) => {
            c.at(
                u,
                "agent.restapi_username",
                "must be non-empty letters, digits, '-', '_' or '.'",
            );
            DEFAULT_RESTAPI_USERNAME.to_string()
        }
        Some(u) => u.value.clone(),
        None => DEFAULT_RESTAPI_USERNAME.to_string(),
    };

    if !c.problems.is_empty() {
        // File order reads best; unlocated problems go last.
        c.problems
            .sort_by_key(|p| p.pos.map_or((usize::MAX, 0), |p| (p.line, p.column)));
        return Err(InventoryError::Invalid {
            path: origin.to_string(),
            problems: c.problems,
        });
    }

    // --- secrets (only once everything else is valid) --------------------------------------------
    let without_pw: Vec<&str> = rp
        .users
        .iter()
        .filter(|u| u.password.is_none())
        .map(|u| u.name.value.as_str())
        .collect();
    let secrets = secrets(&without_pw)?;
    let users = rp
        .users
        .iter()
        .map(|u| User {
            name: u.name.value.clone(),
            password: u.password.clone().unwrap_or_else(|| {
                secrets
                    .users
                    .get(&u.name.value)
                    .cloned()
                    .expect("secrets resolved every user")
            }),
            options: u.options.clone(),
        })
        .collect();

    let rc = &raw.callbacks;
    Ok(Inventory {
        origin: origin.to_string(),
        cluster,
        namespace,
        profile,
        timing,
        maximum_lag_on_failover,
        synchronous_mode: raw.synchronous_mode,
        hosts,
        postgresql: Postgresql {
            version,
            bin_dir,
            data_dir,
            port: pg_port,
            parameters: rp
                .parameters
                .as_ref()
                .map(|p| p.value.clone())
                .unwrap_or_default(),
            pg_hba: rp.pg_hba.clone(),
            users,
            databases: rp
                .databases
                .iter()
                .map(|d| Database {
                    name: d.name.value.clone(),
                    owner: d.owner.as_ref().map(|o| o.value.clone()),
                })
                .collect(),
            use_pg_rewind: rp.use_pg_rewind.unwrap_or(true),
            use_slots: rp.use_slots.unwrap_or(true),
            primary_update_method: rp.primary_update_method.unwrap_or_default(),
        },
        etcd,
        haproxy: Haproxy {
            primary_port,
            replica_port,
            stats_port,
            maxconn,
            check,
            primary_check: primary_check.unwrap_or(check),
        },
        agent: Agent {
            restapi_port,
            restapi_username,
            binary: raw.agent.binary.as_ref().map(PathBuf::from),
            log_level,
        },
        watchdog,
        callbacks: Callbacks {
            on_start: rc.on_start.clone(),
            on_stop: rc.on_stop.clone(),
            on_restart: rc.on_restart.clone(),
            on_reload: rc.on_reload.clone(),
            on_role_change: rc.on_role_change.clone(),
            pre_promote: rc.pre_promote.clone(),
            before_stop: rc.before_stop.clone(),
        },
        secrets_file,
        secrets,
    })
}

/// Patroni's `CMDLINE_OPTIONS`: settings that must be the same on every member (a standby needs
/// the hot-standby ones at least at the primary's value, the rest define the cluster's WAL), so
/// Patroni takes them from the DCS only and drops local values. A per-host value here would be
/// silently ignored: refuse it instead.
const CLUSTER_ONLY_PARAMETERS: [&str; 12] = [
    "max_connections",
    "max_wal_senders",
    "max_prepared_transactions",
    "max_locks_per_transaction",
    "max_replication_slots",
    "max_worker_processes",
    "wal_level",
    "hot_standby",
    "wal_keep_size",
    "track_commit_timestamp",
    "wal_log_hints",
    "cluster_name",
];

fn check_local_parameters(c: &mut Checker, p: &Spanned<Map>, field: &str) {
    for k in p.value.keys() {
        if CLUSTER_ONLY_PARAMETERS.contains(&k.as_str()) {
            c.at(p, format!("{field}.{k}"), format!("parameter {k} must be the same on every member: set it in postgresql.parameters (cluster-wide), not per host"));
        }
    }
}

fn check_parameters(c: &mut Checker, p: &Spanned<Map>, field: &str) {
    for k in p.value.keys() {
        if MANAGED_PARAMETERS.contains(&k.as_str()) {
            c.at(p, format!("{field}.{k}"), format!("parameter {k} is managed by pgherd (derived from the inventory's addresses and ports)"));
        }
    }
}
