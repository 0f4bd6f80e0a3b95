//! The inventory file exactly as written: serde structs with `deny_unknown_fields` at every
//! depth, so a typo is a located error rather than a silently ignored key. Values that later
//! get semantic checks are wrapped in [`Spanned`] so those errors can point at `line:column`.
//! Nothing here is validated; [`super::model`] turns a [`RawInventory`] into an `Inventory`.

use serde::Deserialize;
use serde_saphyr::Spanned;

use super::secrets::Secret;

/// Free-form `key: value` maps (PostgreSQL parameters, Patroni tags).
pub type Map = serde_json::Map<String, serde_json::Value>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawInventory {
    /// Patroni `scope`.
    pub cluster: Spanned<String>,
    #[serde(default)]
    pub namespace: Option<Spanned<String>>,
    #[serde(default)]
    pub profile: Option<Spanned<String>>,
    /// Overrides of the profile's timing.
    #[serde(default)]
    pub timing: Option<Spanned<RawTiming>>,
    #[serde(default)]
    pub synchronous_mode: bool,
    /// Path of the secrets file, relative to the inventory's directory.
    #[serde(default)]
    pub secrets_file: Option<String>,
    #[serde(default)]
    pub ssh: RawSsh,
    pub hosts: Spanned<Vec<RawHost>>,
    #[serde(default)]
    pub postgresql: RawPostgresql,
    #[serde(default)]
    pub etcd: RawEtcd,
    #[serde(default)]
    pub haproxy: RawHaproxy,
    #[serde(default)]
    pub agent: RawAgent,
    #[serde(default)]
    pub watchdog: RawWatchdog,
    #[serde(default)]
    pub callbacks: RawCallbacks,
    #[serde(default)]
    pub tls: RawTls,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTiming {
    #[serde(default)]
    pub ttl: Option<u64>,
    #[serde(default)]
    pub loop_wait: Option<u64>,
    #[serde(default)]
    pub retry_timeout: Option<u64>,
    #[serde(default)]
    pub primary_start_timeout: Option<u64>,
    #[serde(default)]
    pub maximum_lag_on_failover: Option<u64>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawSsh {
    #[serde(default)]
    pub user: Option<Spanned<String>>,
    #[serde(default)]
    pub port: Option<Spanned<u16>>,
    #[serde(default)]
    pub identity_file: Option<String>,
    /// Run remote commands through `sudo` (default: when `user` is not root).
    #[serde(default, rename = "become")]
    pub become_: Option<bool>,
    /// Seconds.
    #[serde(default)]
    pub connect_timeout: Option<Spanned<u64>>,
    /// Seconds.
    #[serde(default)]
    pub command_timeout: Option<Spanned<u64>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHost {
    pub name: Spanned<String>,
    #[serde(default)]
    pub address: Option<Spanned<String>>,
    #[serde(default)]
    pub roles: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub ssh: Option<RawSsh>,
    /// Patroni tags (`nofailover`, `noloadbalance`, `clonefrom`, `nosync`, `replicatefrom`, ...).
    #[serde(default)]
    pub tags: Option<Spanned<Map>>,
    /// Local `postgresql.parameters` for this host only.
    #[serde(default)]
    pub parameters: Option<Spanned<Map>>,
    #[serde(default)]
    pub watchdog: Option<RawWatchdog>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawPostgresql {
    #[serde(default)]
    pub version: Option<Spanned<u32>>,
    #[serde(default)]
    pub bin_dir: Option<Spanned<String>>,
    #[serde(default)]
    pub data_dir: Option<Spanned<String>>,
    #[serde(default)]
    pub port: Option<Spanned<u16>>,
    /// Cluster-wide parameters (go to the DCS `config` at bootstrap).
    #[serde(default)]
    pub parameters: Option<Spanned<Map>>,
    /// Extra pg_hba lines, appended after pgherd's own.
    #[serde(default)]
    pub pg_hba: Vec<String>,
    #[serde(default)]
    pub users: Vec<RawUser>,
    #[serde(default)]
    pub databases: Vec<RawDatabase>,
    #[serde(default)]
    pub use_pg_rewind: Option<bool>,
    #[serde(default)]
    pub use_slots: Option<bool>,
    /// `restart` (default) or `switchover`: how a rolling restart restarts the primary.
    #[serde(default)]
    pub primary_update_method: Option<super::model::PrimaryUpdateMethod>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawUser {
    pub name: Spanned<String>,
    /// Inline password (discouraged: prefer the secrets file, where it is generated if absent).
    #[serde(default)]
    pub password: Option<Secret>,
    /// Role options such as `LOGIN`, `CREATEDB`.
    #[serde(default)]
    pub options: Vec<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawDatabase {
    pub name: Spanned<String>,
    #[serde(default)]
    pub owner: Option<Spanned<String>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawEtcd {
    #[serde(default)]
    pub data_dir: Option<Spanned<String>>,
    #[serde(default)]
    pub client_port: Option<Spanned<u16>>,
    #[serde(default)]
    pub peer_port: Option<Spanned<u16>>,
    /// External etcd (`host:port` list); excludes hosts with the `etcd` role.
    #[serde(default)]
    pub endpoints: Option<Spanned<Vec<Spanned<String>>>>,
    #[serde(default)]
    pub token: Option<String>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawHaproxy {
    #[serde(default)]
    pub primary_port: Option<Spanned<u16>>,
    #[serde(default)]
    pub replica_port: Option<Spanned<u16>>,
    #[serde(default)]
    pub stats_port: Option<Spanned<u16>>,
    #[serde(default)]
    pub maxconn: Option<Spanned<u32>>,
    /// Overrides of the profile's check timing.
    #[serde(default)]
    pub check: Option<RawCheck>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCheck {
    #[serde(default)]
    pub inter: Option<Spanned<String>>,
    #[serde(default)]
    pub fastinter: Option<Spanned<String>>,
    #[serde(default)]
    pub downinter: Option<Spanned<String>>,
    #[serde(default)]
    pub rise: Option<Spanned<u32>>,
    #[serde(default)]
    pub fall: Option<Spanned<u32>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawAgent {
    #[serde(default)]
    pub restapi_port: Option<Spanned<u16>>,
    /// Local path of the `pgherd-agent` binary to upload (default: next to the CLI).
    #[serde(default)]
    pub binary: Option<String>,
    #[serde(default)]
    pub log_level: Option<Spanned<String>>,
    /// REST API user for unsafe endpoints (default `pgherd`).
    #[serde(default)]
    pub restapi_username: Option<Spanned<String>>,
    /// Addresses / CIDR networks that may call the REST API's mutating verbs, besides the
    /// cluster's own hosts.
    #[serde(default)]
    pub restapi_allowlist: Option<Vec<Spanned<String>>>,
}

#[derive(Debug, Default, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawWatchdog {
    #[serde(default)]
    pub mode: Option<Spanned<String>>,
    #[serde(default)]
    pub device: Option<String>,
    #[serde(default)]
    pub safety_margin: Option<Spanned<i64>>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawCallbacks {
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
    #[serde(default)]
    pub pre_promote: Option<String>,
    #[serde(default)]
    pub before_stop: Option<String>,
}

/// `tls`: the operator's CA as two paths relative to the inventory's directory.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawTls {
    #[serde(default)]
    pub enabled: Option<Spanned<bool>>,
    #[serde(default)]
    pub ca_cert: Option<Spanned<String>>,
    #[serde(default)]
    pub ca_key: Option<Spanned<String>>,
    #[serde(default)]
    pub cert_days: Option<Spanned<u32>>,
    /// `required`, `optional` or `none`.
    #[serde(default)]
    pub verify_client: Option<Spanned<String>>,
}
