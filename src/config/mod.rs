//! The agent's per-node configuration file: patroni.yml's sections and names, parsed strictly
//! (unknown keys and bad values are errors with file:line:column) and validated.
//!
//! `bootstrap.dcs` is free-form JSON-compatible data: it seeds the DCS `config` key on the first
//! bootstrap and is otherwise ignored (the DCS copy wins afterwards, as in Patroni).
//!
//! This file holds the sections (one type each, with their Patroni defaults) and what the
//! agent derives from them (URLs, the DCS prefix, local parameters as text). Beside it:
//! `load.rs` reads and validates a file (and digests it, [`LoadedConfig`]), `reload.rs` holds
//! the pure rules of a reload ([`restart_required`], [`changed_settings`]), `timing.rs` the HA
//! timing rule ([`Timing`]).

pub mod access;
mod load;
mod reload;
mod timing;

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use serde_json::Value;

pub use load::{ConfigError, LoadedConfig, sha256_hex};
pub use reload::{changed_settings, restart_required};
pub use timing::{MIN_TTL, Timing};

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
    /// IP addresses and CIDR networks allowed to call the mutating verbs (Patroni's
    /// `restapi.allowlist`; see [`access`]). Empty: no address restriction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub allowlist: Vec<String>,
    /// Also allow the members registered in the DCS (Patroni's `allowlist_include_members`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allowlist_include_members: bool,
}

impl RestApiConfig {
    /// The validated allowlist (checked at load, so this cannot fail on a loaded config).
    pub fn access_list(&self) -> crate::config::access::AccessList {
        crate::config::access::AccessList::parse(&self.allowlist, self.allowlist_include_members)
            .unwrap_or_default()
    }
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

impl AgentConfig {
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

/// The agent fixture the tests of this module and its children mutate.
#[cfg(test)]
const VALID: &str = include_str!("../../tests/fixtures/agent/valid.yml");

#[cfg(test)]
mod tests {
    use super::*;

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
    fn the_allowlist_takes_addresses_and_networks_and_refuses_a_host_name() {
        let with = |entries: &str| {
            VALID.replacen(
                "restapi:\n",
                &format!("restapi:\n  allowlist: [{entries}]\n  allowlist_include_members: true\n"),
                1,
            )
        };
        let c = AgentConfig::parse(&with("10.0.0.0/24, \"fd00::1\""), "a.yml").unwrap();
        let a = c.restapi.access_list();
        assert_eq!(a.nets.len(), 2);
        assert!(a.include_members);
        let e = AgentConfig::parse(&with("admin.example.com"), "a.yml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("a.yml")
                && e.contains("restapi.allowlist")
                && e.contains("admin.example.com"),
            "{e}"
        );
    }
}
