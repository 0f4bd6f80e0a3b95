//! Stage two of the inventory: [`build`] turns a [`RawInventory`] into the validated
//! [`Inventory`]. Every semantic check runs here, before anything else happens, so a bad
//! inventory never reaches a host. All problems are collected (not just the first), each
//! located at its YAML position where one is known, and reported in file order.
//!
//! One module per inventory section: `cluster` (identity, profile and timing, the timing
//! rule), `watchdog`, `hosts` (names, addresses, roles, SSH, tags), `postgresql`, `etcd`,
//! `haproxy`, `agent` (with the callbacks) and `tls`. This file holds the `Checker` that collects
//! problems, the ports every section shares, and [`build`], which calls the sections in a fixed
//! order: problems at the same position (and unlocated ones) are reported in that order.

mod agent;
mod cluster;
mod etcd;
mod haproxy;
mod hosts;
mod postgresql;
mod tls;
mod watchdog;

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use serde_saphyr::Spanned;

use super::error::{InventoryError, Pos, Problem};
use super::model::Inventory;
use super::raw::RawInventory;
use super::secrets::ClusterSecrets;

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

    let (cluster, namespace) = cluster::identity(&mut c, &raw);
    let cluster::Timing {
        profile,
        mut timing,
        maximum_lag_on_failover,
    } = cluster::profile_and_timing(&mut c, &raw);
    let watchdog = watchdog::defaults(&mut c, &raw.watchdog, timing.safety_margin);
    timing.safety_margin = watchdog.safety_margin;
    let ports = Ports::check(&mut c, &raw);
    let hosts = hosts::hosts(&mut c, &raw, &ports, &watchdog);
    cluster::check_timing_rule(&mut c, &raw, &timing, &hosts);
    let mut postgresql = postgresql::postgresql(&mut c, &raw.postgresql, &cluster, ports.pg);
    let etcd = etcd::etcd(&mut c, &raw, &hosts, &ports, &cluster);
    let haproxy = haproxy::haproxy(&mut c, &raw.haproxy, &profile, &ports);
    let agent = agent::agent(&mut c, &raw.agent, ports.restapi);
    let tls = tls::tls(
        &mut c,
        &raw.tls,
        Path::new(origin).parent().unwrap_or(Path::new("")),
    );

    if !c.problems.is_empty() {
        // File order reads best; unlocated problems go last.
        c.problems
            .sort_by_key(|p| p.pos.map_or((usize::MAX, 0), |p| (p.line, p.column)));
        return Err(InventoryError::Invalid {
            path: origin.to_string(),
            problems: c.problems,
        });
    }

    // Secrets only once everything else is valid: a bad inventory must not create or change
    // the secrets file.
    let secrets = secrets(&postgresql::users_without_password(&raw.postgresql))?;
    postgresql.users = postgresql::users(&raw.postgresql, &secrets);

    Ok(Inventory {
        origin: origin.to_string(),
        cluster,
        namespace,
        profile,
        timing,
        maximum_lag_on_failover,
        synchronous_mode: raw.synchronous_mode,
        hosts,
        postgresql,
        etcd,
        haproxy,
        agent,
        watchdog,
        callbacks: agent::callbacks(&raw.callbacks),
        tls,
        secrets_file,
        secrets,
    })
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

/// Every port the inventory sets, with its default. Checked before the sections that use them:
/// the hosts section needs them all to find two services of one host on the same port.
struct Ports {
    pg: u16,
    restapi: u16,
    etcd_client: u16,
    etcd_peer: u16,
    haproxy_primary: u16,
    haproxy_replica: u16,
    haproxy_stats: u16,
}

impl Ports {
    fn check(c: &mut Checker, raw: &RawInventory) -> Ports {
        Ports {
            pg: c.port(&raw.postgresql.port, 5432, "postgresql.port"),
            restapi: c.port(&raw.agent.restapi_port, 8008, "agent.restapi_port"),
            etcd_client: c.port(&raw.etcd.client_port, 2379, "etcd.client_port"),
            etcd_peer: c.port(&raw.etcd.peer_port, 2380, "etcd.peer_port"),
            haproxy_primary: c.port(&raw.haproxy.primary_port, 5000, "haproxy.primary_port"),
            haproxy_replica: c.port(&raw.haproxy.replica_port, 5001, "haproxy.replica_port"),
            haproxy_stats: c.port(&raw.haproxy.stats_port, 7000, "haproxy.stats_port"),
        }
    }
}

fn is_simple_name(s: &str) -> bool {
    !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
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
