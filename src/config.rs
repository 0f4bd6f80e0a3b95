//! The agent's per-node configuration file: patroni.yml's sections and names, parsed strictly
//! (unknown keys and bad values are errors with file:line:column) and validated.
//!
//! `bootstrap.dcs` is free-form JSON-compatible data: it seeds the DCS `config` key on the first
//! bootstrap and is otherwise ignored (the DCS copy wins afterwards, as in Patroni).
//!
//! Also the pure rules of a reload: [`restart_required`] (what a running agent cannot take
//! over), [`changed_settings`] (what a reload changed, for its log line) and the digest of the
//! file in force ([`LoadedConfig`]). Past 800 lines only because of the table tests below.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use serde_json::Value;

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    pub scope: String,
    #[serde(default = "default_namespace")]
    pub namespace: String,
    pub name: String,
    pub restapi: RestApiConfig,
    pub etcd3: EtcdConfig,
    #[serde(default)]
    pub bootstrap: BootstrapConfig,
    pub postgresql: PostgresqlConfig,
    #[serde(default)]
    pub watchdog: WatchdogConfig,
    #[serde(default)]
    pub tags: serde_json::Map<String, Value>,
    /// Where the agent logs (stderr when absent).
    #[serde(default)]
    pub log: Option<LogConfig>,
}

fn default_namespace() -> String {
    "/service/".to_string()
}

/// Patroni's `log` section (the keys pgherd supports).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LogConfig {
    #[serde(default)]
    pub level: Option<String>,
    /// Log to this file (appending) instead of stderr.
    #[serde(default)]
    pub file: Option<PathBuf>,
    /// Patroni's Python format string for plain lines (e.g. `%(asctime)s %(levelname)s:
    /// %(message)s`): accepted so that a patroni.yml loads unchanged, but not interpreted (pgherd
    /// writes its own line layout). The values `plain` and `json` are a pgherd shorthand for
    /// `type`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub format: Option<String>,
    /// Patroni's `type`: `plain` (default) or `json` (one JSON object per line).
    #[serde(default, rename = "type", skip_serializing_if = "Option::is_none")]
    pub log_type: Option<LogFormat>,
}

/// How log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines; ANSI colour only when writing to a terminal.
    #[default]
    Plain,
    /// JSON lines: `{"time":…,"level":…,"message":…,<fields>…}`.
    Json,
}

impl LogConfig {
    /// `format` when it is the shorthand `plain` / `json`.
    fn format_shorthand(&self) -> Option<LogFormat> {
        match self.format.as_deref().map(str::trim) {
            Some("plain") => Some(LogFormat::Plain),
            Some("json") => Some(LogFormat::Json),
            _ => None,
        }
    }

    /// The format in force (the `format` shorthand, else Patroni's `type`, else plain).
    pub fn effective_format(&self) -> LogFormat {
        self.format_shorthand()
            .or(self.log_type)
            .unwrap_or_default()
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestApiConfig {
    /// `host:port` to bind.
    pub listen: String,
    /// `host:port` others use to reach us (goes into `api_url`).
    pub connect_address: String,
    #[serde(default)]
    pub authentication: Option<Credentials>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Credentials {
    pub username: String,
    pub password: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EtcdConfig {
    /// `host:port` endpoints (Patroni also accepts a comma-separated string; we take a list).
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default)]
    pub host: Option<String>,
    #[serde(default = "default_protocol")]
    pub protocol: String,
    #[serde(default)]
    pub username: Option<String>,
    #[serde(default)]
    pub password: Option<String>,
}

fn default_protocol() -> String {
    "http".to_string()
}

impl EtcdConfig {
    /// Endpoints as URLs (`http://host:port`).
    pub fn endpoints(&self) -> Vec<String> {
        let mut hosts: Vec<String> = self.hosts.clone();
        if let Some(h) = &self.host {
            hosts.extend(
                h.split(',')
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty()),
            );
        }
        hosts
            .into_iter()
            .map(|h| {
                if h.contains("://") {
                    h
                } else {
                    format!("{}://{}", self.protocol, h)
                }
            })
            .collect()
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BootstrapConfig {
    /// Seeds the DCS `config` key (ttl, loop_wait, retry_timeout, postgresql.parameters, ...).
    #[serde(default)]
    pub dcs: serde_json::Map<String, Value>,
    /// initdb options: `"flag"` or `{key: value}` items, as Patroni.
    #[serde(default)]
    pub initdb: Vec<Value>,
    #[serde(default)]
    pub pg_hba: Vec<String>,
    #[serde(default, alias = "post_init")]
    pub post_bootstrap: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PostgresqlConfig {
    /// `host:port` (host may be a comma list) PostgreSQL listens on.
    pub listen: String,
    /// `host:port` others use (goes into `conn_url`).
    pub connect_address: String,
    pub data_dir: PathBuf,
    #[serde(default = "default_bin_dir")]
    pub bin_dir: PathBuf,
    /// Directory for the unix socket (defaults to the data directory's parent).
    #[serde(default)]
    pub socket_dir: Option<PathBuf>,
    #[serde(default)]
    pub pgpass: Option<PathBuf>,
    pub authentication: PgAuthentication,
    #[serde(default)]
    pub parameters: serde_json::Map<String, Value>,
    #[serde(default)]
    pub pg_hba: Vec<String>,
    #[serde(default)]
    pub callbacks: Callbacks,
    #[serde(default)]
    pub pre_promote: Option<String>,
    #[serde(default)]
    pub before_stop: Option<String>,
    #[serde(default = "default_replica_methods")]
    pub create_replica_methods: Vec<String>,
    /// pg_basebackup options: a list of `"flag"` / `{k: v}` or a map.
    #[serde(default)]
    pub basebackup: Option<Value>,
    #[serde(default = "yes")]
    pub use_pg_rewind: bool,
    #[serde(default = "yes")]
    pub use_slots: bool,
    /// Name of the database in `conn_url` (Patroni: `postgres`).
    #[serde(default = "default_database")]
    pub database: String,
}

fn default_bin_dir() -> PathBuf {
    PathBuf::from("/usr/lib/postgresql/15/bin")
}
fn default_replica_methods() -> Vec<String> {
    vec!["basebackup".to_string()]
}
fn default_database() -> String {
    "postgres".to_string()
}
fn yes() -> bool {
    true
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PgAuthentication {
    pub superuser: Credentials,
    pub replication: Credentials,
    #[serde(default)]
    pub rewind: Option<Credentials>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Callbacks {
    #[serde(default)]
    pub on_start: Option<String>,
    #[serde(default)]
    pub on_stop: Option<String>,
    #[serde(default)]
    pub on_restart: Option<String>,
    #[serde(default)]
    pub on_reload: Option<String>,
    #[serde(default)]
    pub on_role_change: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum WatchdogMode {
    Off,
    #[default]
    Automatic,
    Required,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WatchdogConfig {
    #[serde(default)]
    pub mode: WatchdogMode,
    #[serde(default = "default_wd_device")]
    pub device: PathBuf,
    #[serde(default = "default_safety_margin")]
    pub safety_margin: i64,
    /// pgherd's extension: without a usable `device`, guard the leader with the fence process
    /// (see [`crate::watchdog::fence`]); default on.
    #[serde(default = "default_true")]
    pub fence: bool,
}

fn default_true() -> bool {
    true
}

impl Default for WatchdogConfig {
    fn default() -> Self {
        WatchdogConfig {
            mode: WatchdogMode::Automatic,
            device: default_wd_device(),
            safety_margin: default_safety_margin(),
            fence: true,
        }
    }
}

fn default_wd_device() -> PathBuf {
    PathBuf::from("/dev/watchdog")
}
fn default_safety_margin() -> i64 {
    5
}

/// A config problem, located in the source file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// YAML syntax or type error; `message` carries the line:column and a snippet.
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A value that parsed but is not acceptable.
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: String,
        field: String,
        message: String,
    },
}

/// A config as loaded from its file, with the digest of the exact bytes it was parsed from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: AgentConfig,
    /// Lowercase hex sha256 of the file's bytes (what `sha256sum` prints): the CLI compares it
    /// with the digest of the file it wrote to learn whether the agent runs with that file.
    pub sha256: String,
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

/// The dotted names of changed settings that a running agent cannot take over, so a reload
/// with any of them changed must be refused as a whole (pure; table-tested). Everything not
/// listed here is applied in place by a reload; `bootstrap.*` only matters for the very first
/// bootstrap of the cluster and is ignored afterwards, so its changes are neither.
///
/// Why each one needs a restart:
/// - `scope`, `namespace`: they make the DCS prefix; the lease, member and leader keys live
///   under the old one, so changing them in place would move the node into another cluster.
/// - `name`: the member key, the replication slot and `application_name` are named after it.
/// - `restapi.listen`: the REST socket is bound once at start-up.
/// - `postgresql.data_dir`, `postgresql.bin_dir`: they select the instance (and the binaries
///   of the running postmaster) the controller acts on.
/// - `postgresql.listen`: `listen_addresses` and `port` are restart-only PostgreSQL settings,
///   and the agent's own connections use the port.
/// - `postgresql.socket_dir`: `unix_socket_directories` is restart-only; the agent connects
///   through the socket.
/// - `postgresql.pgpass`: the running walreceiver's `primary_conninfo` names the file, and
///   moving it would leave the old file (with passwords) behind.
/// - `etcd3.username`, `etcd3.password`: the etcd client authenticates once per connection;
///   only the endpoint list is swapped in place.
/// - `watchdog`: a leader may hold the device armed; switching device or mode in place would
///   either leave the old one armed (a host reset) or drop the fencing guarantee.
/// - `log`: the log subscriber (level, file) is installed once per process.
pub fn restart_required(old: &AgentConfig, new: &AgentConfig) -> Vec<&'static str> {
    fn v<T: Serialize>(x: &T) -> Value {
        serde_json::to_value(x).unwrap_or(Value::Null)
    }
    let checks: Vec<(&'static str, Value, Value)> = vec![
        ("scope", v(&old.scope), v(&new.scope)),
        ("namespace", v(&old.namespace), v(&new.namespace)),
        ("name", v(&old.name), v(&new.name)),
        (
            "restapi.listen",
            v(&old.restapi.listen),
            v(&new.restapi.listen),
        ),
        (
            "postgresql.data_dir",
            v(&old.postgresql.data_dir),
            v(&new.postgresql.data_dir),
        ),
        (
            "postgresql.bin_dir",
            v(&old.postgresql.bin_dir),
            v(&new.postgresql.bin_dir),
        ),
        (
            "postgresql.listen",
            v(&old.postgresql.listen),
            v(&new.postgresql.listen),
        ),
        (
            "postgresql.socket_dir",
            v(&old.postgresql.socket_dir),
            v(&new.postgresql.socket_dir),
        ),
        (
            "postgresql.pgpass",
            v(&old.postgresql.pgpass),
            v(&new.postgresql.pgpass),
        ),
        (
            "etcd3.username",
            v(&old.etcd3.username),
            v(&new.etcd3.username),
        ),
        (
            "etcd3.password",
            v(&old.etcd3.password),
            v(&new.etcd3.password),
        ),
        ("watchdog", v(&old.watchdog), v(&new.watchdog)),
        ("log", v(&old.log), v(&new.log)),
    ];
    checks
        .into_iter()
        .filter(|(_, a, b)| a != b)
        .map(|(name, _, _)| name)
        .collect()
}

/// Dotted names of every setting that differs between `old` and `new` (sections `restapi`,
/// `etcd3`, `postgresql` and `bootstrap` by their keys, the others whole), for the log line of
/// a reload. Names only: values (passwords) never appear.
pub fn changed_settings(old: &AgentConfig, new: &AgentConfig) -> Vec<String> {
    let (Ok(Value::Object(a)), Ok(Value::Object(b))) =
        (serde_json::to_value(old), serde_json::to_value(new))
    else {
        return Vec::new();
    };
    let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
    keys.sort();
    keys.dedup();
    let mut out = Vec::new();
    for k in keys {
        let (x, y) = (a.get(k), b.get(k));
        if x == y {
            continue;
        }
        match (x, y) {
            (Some(Value::Object(x)), Some(Value::Object(y)))
                if matches!(k.as_str(), "restapi" | "etcd3" | "postgresql" | "bootstrap") =>
            {
                let mut sub: Vec<&String> = x.keys().chain(y.keys()).collect();
                sub.sort();
                sub.dedup();
                for s in sub {
                    if x.get(s) != y.get(s) {
                        out.push(format!("{k}.{s}"));
                    }
                }
            }
            _ => out.push(k.clone()),
        }
    }
    out
}

impl AgentConfig {
    /// Reads, parses and validates `path`, keeping the digest of the bytes read.
    pub fn load_file(path: &Path) -> Result<LoadedConfig, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
        })?;
        let config = Self::parse(&text, &path.display().to_string())?;
        Ok(LoadedConfig {
            sha256: sha256_hex(text.as_bytes()),
            config,
        })
    }

    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates. `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<AgentConfig, ConfigError> {
        let cfg: AgentConfig = crate::yaml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: origin.to_string(),
            line: e.line,
            column: e.column,
            message: e.message,
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |field: &str, message: String| ConfigError::Invalid {
            path: origin.to_string(),
            field: field.to_string(),
            message,
        };
        if self.scope.trim().is_empty() {
            return Err(bad("scope", "must not be empty".into()));
        }
        if self.name.trim().is_empty() || self.name.contains('/') {
            return Err(bad("name", "must be non-empty and contain no '/'".into()));
        }
        for (field, v) in [
            ("restapi.listen", &self.restapi.listen),
            ("restapi.connect_address", &self.restapi.connect_address),
            ("postgresql.listen", &self.postgresql.listen),
            (
                "postgresql.connect_address",
                &self.postgresql.connect_address,
            ),
        ] {
            let Some((h, p)) = v.rsplit_once(':') else {
                return Err(bad(field, format!("expected host:port, got {v:?}")));
            };
            if h.is_empty() || p.parse::<u16>().is_err() {
                return Err(bad(field, format!("expected host:port, got {v:?}")));
            }
        }
        if self.etcd3.endpoints().is_empty() {
            return Err(bad(
                "etcd3.hosts",
                "at least one etcd endpoint is required".into(),
            ));
        }
        if !self.postgresql.data_dir.is_absolute() {
            return Err(bad(
                "postgresql.data_dir",
                "must be an absolute path".into(),
            ));
        }
        let timing = crate::config::Timing::from_dcs(&self.bootstrap.dcs);
        timing.check().map_err(|m| bad("bootstrap.dcs", m))?;
        if let Some(l) = &self.log
            && let (Some(f), Some(t)) = (l.format_shorthand(), l.log_type)
            && f != t
        {
            return Err(bad(
                "log.format",
                format!("{f:?} disagrees with log.type {t:?}; give one of them"),
            ));
        }
        if self.watchdog.safety_margin < -1 {
            return Err(bad("watchdog.safety_margin", "must be -1 or >= 0".into()));
        }
        for m in &self.postgresql.create_replica_methods {
            if m != "basebackup" {
                return Err(bad(
                    "postgresql.create_replica_methods",
                    format!("unsupported method {m:?} (only basebackup)"),
                ));
            }
        }
        Ok(())
    }

    /// `host` part of `postgresql.connect_address`.
    pub fn pg_connect_host_port(&self) -> (String, u16) {
        split_host_port(&self.postgresql.connect_address)
    }

    pub fn pg_listen_host_port(&self) -> (String, u16) {
        split_host_port(&self.postgresql.listen)
    }

    /// `postgres://host:port/<database>` as written in the member key.
    pub fn conn_url(&self) -> String {
        format!(
            "postgres://{}/{}",
            self.postgresql.connect_address, self.postgresql.database
        )
    }

    /// `http://host:port/patroni` as written in the member key.
    pub fn api_url(&self) -> String {
        format!("http://{}/patroni", self.restapi.connect_address)
    }

    /// DCS base path `/<namespace>/<scope>/`, with repeated slashes collapsed.
    pub fn base_path(&self) -> String {
        let raw = format!("/{}/{}/", self.namespace, self.scope);
        let mut out = String::new();
        for c in raw.chars() {
            if !(c == '/' && out.ends_with('/')) {
                out.push(c);
            }
        }
        out
    }

    /// Free-form local parameters as PostgreSQL text values.
    pub fn local_parameters(&self) -> BTreeMap<String, String> {
        self.postgresql
            .parameters
            .iter()
            .filter(|(_, v)| !v.is_null())
            .map(|(k, v)| {
                let s = match v {
                    Value::String(s) => s.clone(),
                    Value::Bool(b) => if *b { "on" } else { "off" }.to_string(),
                    other => other.to_string(),
                };
                (k.clone(), s)
            })
            .collect()
    }
}

pub fn split_host_port(s: &str) -> (String, u16) {
    match s.rsplit_once(':') {
        Some((h, p)) => (
            h.trim_matches(['[', ']']).to_string(),
            p.parse().unwrap_or(5432),
        ),
        None => (s.to_string(), 5432),
    }
}

/// The HA timing triple and its safety rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub ttl: u64,
    pub loop_wait: u64,
    pub retry_timeout: u64,
}

/// Smallest supported lease TTL. Patroni refuses anything under 20 s; pgherd's renewals are
/// cheap (one gRPC keepalive on an open HTTP/2 channel) so 5 s leases are safe on a LAN.
pub const MIN_TTL: u64 = 5;

impl Timing {
    pub fn from_dcs(dcs: &serde_json::Map<String, Value>) -> Timing {
        let c = crate::dcs::DynamicConfig(dcs.clone());
        Timing {
            ttl: c.ttl(),
            loop_wait: c.loop_wait(),
            retry_timeout: c.retry_timeout(),
        }
    }

    /// `loop_wait + 2·retry_timeout ≤ ttl`: a leader whose renewal starts failing at the top of
    /// a cycle has spent at most `loop_wait + retry_timeout` before it demotes, leaving at least
    /// `retry_timeout` for the demotion itself before its lease can expire and another node can
    /// take the lock. Unlike Patroni we refuse bad values instead of silently adjusting them.
    pub fn check(&self) -> Result<(), String> {
        if self.ttl < MIN_TTL {
            return Err(format!(
                "ttl {} is below the minimum of {MIN_TTL}",
                self.ttl
            ));
        }
        if self.loop_wait < 1 {
            return Err("loop_wait must be at least 1".into());
        }
        if self.retry_timeout < 1 {
            return Err("retry_timeout must be at least 1".into());
        }
        if self.loop_wait + 2 * self.retry_timeout > self.ttl {
            return Err(format!(
                "loop_wait + 2*retry_timeout must be <= ttl (got {} + 2*{} > {})",
                self.loop_wait, self.retry_timeout, self.ttl
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {

    #[test]
    fn a_patroni_log_format_string_is_accepted_and_type_picks_json() {
        let l: LogConfig = serde_json::from_value(serde_json::json!({
            "format": "%(asctime)s %(levelname)s: %(message)s",
            "type": "json"
        }))
        .unwrap();
        assert_eq!(l.effective_format(), LogFormat::Json);
        let l: LogConfig = serde_json::from_value(serde_json::json!({"format": "json"})).unwrap();
        assert_eq!(l.effective_format(), LogFormat::Json);
        let l: LogConfig = serde_json::from_value(serde_json::json!({})).unwrap();
        assert_eq!(l.effective_format(), LogFormat::Plain);
    }

    use super::*;

    const VALID: &str = include_str!("../tests/fixtures/agent/valid.yml");

    #[test]
    fn valid_config_parses_with_patroni_section_names() {
        let c = AgentConfig::parse(VALID, "valid.yml").unwrap();
        assert_eq!(c.scope, "batman");
        assert_eq!(c.base_path(), "/service/batman/");
        assert_eq!(c.etcd3.endpoints()[0], "http://127.0.0.1:2379");
        assert_eq!(c.conn_url(), "postgres://127.0.0.1:5432/postgres");
        assert_eq!(c.api_url(), "http://127.0.0.1:8008/patroni");
        // strict booleans: a quoted "off" stays text, not a YAML boolean
        assert_eq!(c.local_parameters()["log_min_messages"], "off");
        assert_eq!(c.watchdog.mode, WatchdogMode::Automatic);
    }

    #[test]
    fn unknown_key_is_an_error_with_line_and_column() {
        let bad = VALID.replace("  use_slots: true", "  use_slotz: true");
        let e = AgentConfig::parse(&bad, "node.yml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("node.yml:"), "{e}");
        assert!(e.contains("use_slotz"), "{e}");
        let line = bad.lines().position(|l| l.contains("use_slotz")).unwrap() + 1;
        assert!(
            e.contains(&format!(":{line}:")),
            "expected line {line} in {e}"
        );
    }

    #[test]
    fn wrong_type_is_located() {
        let bad = VALID.replace("safety_margin: 5", "safety_margin: lots");
        let e = AgentConfig::parse(&bad, "node.yml")
            .unwrap_err()
            .to_string();
        let line = bad
            .lines()
            .position(|l| l.contains("safety_margin: lots"))
            .unwrap()
            + 1;
        assert!(e.contains(&format!("node.yml:{line}:")), "{e}");
    }

    #[test]
    fn timing_rule_violation_is_rejected() {
        let bad = VALID.replace("retry_timeout: 3", "retry_timeout: 5");
        let e = AgentConfig::parse(&bad, "node.yml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("loop_wait + 2*retry_timeout must be <= ttl"),
            "{e}"
        );
    }

    #[test]
    fn ttl_below_minimum_is_rejected() {
        let bad = VALID
            .replace("ttl: 10", "ttl: 4")
            .replace("loop_wait: 2", "loop_wait: 1")
            .replace("retry_timeout: 3", "retry_timeout: 1");
        let e = AgentConfig::parse(&bad, "node.yml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("below the minimum"), "{e}");
    }

    #[test]
    fn bad_watchdog_mode_and_address_are_rejected() {
        let bad = VALID.replace("mode: automatic", "mode: sometimes");
        assert!(AgentConfig::parse(&bad, "n").is_err());
        let bad = VALID.replace("listen: 127.0.0.1:5432", "listen: nowhere");
        let e = AgentConfig::parse(&bad, "n").unwrap_err().to_string();
        assert!(e.contains("postgresql.listen"), "{e}");
    }

    #[test]
    fn restart_required_names_only_settings_a_running_agent_cannot_change() {
        let old = AgentConfig::parse(VALID, "v").unwrap();
        let with = |from: &str, to: &str| {
            assert!(VALID.contains(from), "fixture lacks {from:?}");
            AgentConfig::parse(&VALID.replacen(from, to, 1), "v").unwrap()
        };
        let none: Vec<&str> = vec![];
        let table: Vec<(&str, AgentConfig, Vec<&str>)> = vec![
            ("identical", old.clone(), none.clone()),
            (
                "scope",
                with("scope: batman", "scope: robin"),
                vec!["scope"],
            ),
            (
                "namespace",
                with("namespace: /service/", "namespace: /other/"),
                vec!["namespace"],
            ),
            ("name", with("name: node1", "name: node9"), vec!["name"]),
            (
                "rest listen",
                with("listen: 127.0.0.1:8008", "listen: 0.0.0.0:8008"),
                vec!["restapi.listen"],
            ),
            (
                "pg listen",
                with("listen: 127.0.0.1:5432", "listen: 127.0.0.1:5433"),
                vec!["postgresql.listen"],
            ),
            (
                "data_dir",
                with("data_dir: /var/lib/pgherd/node1", "data_dir: /srv/pg"),
                vec!["postgresql.data_dir"],
            ),
            (
                "bin_dir",
                with(
                    "bin_dir: /usr/lib/postgresql/15/bin",
                    "bin_dir: /opt/pg/bin",
                ),
                vec!["postgresql.bin_dir"],
            ),
            (
                "watchdog mode",
                with("mode: automatic", "mode: off"),
                vec!["watchdog"],
            ),
            (
                "watchdog margin",
                with("safety_margin: 5", "safety_margin: 2"),
                vec!["watchdog"],
            ),
            (
                "socket_dir",
                with(
                    "  use_slots: true",
                    "  use_slots: true\n  socket_dir: /run/pg",
                ),
                vec!["postgresql.socket_dir"],
            ),
            (
                "log",
                with("tags:\n", "log: {level: debug}\ntags:\n"),
                vec!["log"],
            ),
            (
                "two at once",
                with("scope: batman", "scope: robin").with_name("node9"),
                vec!["scope", "name"],
            ),
            // Applied in place by a reload:
            (
                "rest password",
                with("password: s3cret", "password: other"),
                none.clone(),
            ),
            (
                "rest connect_address",
                with(
                    "connect_address: 127.0.0.1:8008",
                    "connect_address: 10.0.0.1:8008",
                ),
                none.clone(),
            ),
            (
                "etcd hosts",
                with("127.0.0.1:2383]", "127.0.0.1:2385]"),
                none.clone(),
            ),
            (
                "pg parameters",
                with("shared_buffers: 32MB", "shared_buffers: 64MB"),
                none.clone(),
            ),
            (
                "pg_hba",
                with("- local all all trust", "- local all all peer"),
                none.clone(),
            ),
            (
                "callbacks",
                with("/usr/local/bin/cb.sh", "/usr/local/bin/other.sh"),
                none.clone(),
            ),
            (
                "superuser password",
                with("password: pw1", "password: pw9"),
                none.clone(),
            ),
            (
                "tags",
                with("nofailover: false", "nofailover: true"),
                none.clone(),
            ),
            // bootstrap.* only matters for the first bootstrap: no restart, nothing to apply.
            (
                "bootstrap.dcs",
                with(
                    "maximum_lag_on_failover: 1048576",
                    "maximum_lag_on_failover: 1",
                ),
                none.clone(),
            ),
            (
                "bootstrap.pg_hba",
                with(
                    "host replication replicator 127.0.0.1/32 md5",
                    "host replication replicator 10.0.0.0/8 md5",
                ),
                none.clone(),
            ),
        ];
        for (case, new, want) in table {
            assert_eq!(restart_required(&old, &new), want, "case {case}");
        }
    }

    #[test]
    fn changed_settings_names_what_differs_without_values() {
        let old = AgentConfig::parse(VALID, "v").unwrap();
        let new = AgentConfig::parse(
            &VALID
                .replace("password: s3cret", "password: other")
                .replace("shared_buffers: 32MB", "shared_buffers: 64MB")
                .replace("clonefrom: true", "clonefrom: false"),
            "v",
        )
        .unwrap();
        let c = changed_settings(&old, &new);
        assert_eq!(
            c,
            ["postgresql.parameters", "restapi.authentication", "tags"]
        );
        assert!(changed_settings(&old, &old).is_empty());
    }

    impl AgentConfig {
        fn with_name(mut self, n: &str) -> AgentConfig {
            self.name = n.into();
            self
        }
    }

    #[test]
    fn load_file_digests_the_exact_bytes_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.yml");
        std::fs::write(&p, VALID).unwrap();
        let l = AgentConfig::load_file(&p).unwrap();
        assert_eq!(l.config.scope, "batman");
        assert_eq!(l.sha256, sha256_hex(VALID.as_bytes()));
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let bad = VALID.replace("scope: batman", "scope: batman\nscope: robin");
        assert!(AgentConfig::parse(&bad, "n").is_err());
    }
}
