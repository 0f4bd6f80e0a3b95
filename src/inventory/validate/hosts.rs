//! The `ssh` defaults and the `hosts` list: each host's name (unique, and unique as a
//! replication slot name), address, roles, SSH and watchdog overrides, local parameters, the
//! ports its roles bind, and its Patroni tags; then the checks on the list as a whole (a
//! PostgreSQL host that may become primary).

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;

use super::{Checker, Ports, address_problem, is_simple_name, postgresql, watchdog};
use crate::inventory::model::{Host, Role, Ssh, Watchdog};
use crate::inventory::raw::{RawHost, RawInventory, RawSsh};
use crate::types::MemberName;

pub(super) fn hosts(
    c: &mut Checker,
    raw: &RawInventory,
    ports: &Ports,
    watchdog: &Watchdog,
) -> Vec<Host> {
    let ssh = resolve_ssh(c, None, &raw.ssh, "ssh");
    if raw.hosts.value.is_empty() {
        c.at(&raw.hosts, "hosts", "at least one host is required");
    }
    let cluster = ClusterWide {
        ssh: &ssh,
        watchdog,
        ports,
        embedded_etcd: raw.etcd.endpoints.is_none(),
    };
    let mut seen = Seen::default();
    let hosts: Vec<Host> = raw
        .hosts
        .value
        .iter()
        .enumerate()
        .map(|(i, rh)| host(c, i, rh, &cluster, &mut seen))
        .collect();
    // Tags may name other hosts: checked once every host is known.
    for (rh, h) in raw.hosts.value.iter().zip(&hosts) {
        check_tags(c, rh, h, &hosts);
    }
    check_postgres_hosts(c, raw, &hosts);
    hosts
}

/// What a host inherits or must agree with.
struct ClusterWide<'a> {
    ssh: &'a Ssh,
    watchdog: &'a Watchdog,
    ports: &'a Ports,
    /// etcd runs on the hosts with the etcd role (no `etcd.endpoints`), so they bind its ports.
    embedded_etcd: bool,
}

/// Names, slot names and addresses of the hosts before this one.
#[derive(Default)]
struct Seen {
    /// Host name → index of its entry.
    names: BTreeMap<String, usize>,
    /// Replication slot name → host name.
    slots: BTreeMap<String, String>,
    /// Lowercased address → host name.
    addrs: BTreeMap<String, String>,
}

/// Entry `i` of `hosts`.
fn host(c: &mut Checker, i: usize, rh: &RawHost, cluster: &ClusterWide, seen: &mut Seen) -> Host {
    let name = rh.name.value.clone();
    let f = if name.is_empty() {
        format!("hosts[{i}]")
    } else {
        format!("hosts[{name}]")
    };
    check_name(c, i, rh, &f, seen);
    let address = address(c, rh, &f, seen);
    let roles = roles(c, rh, &f);
    let ssh = match &rh.ssh {
        Some(o) => resolve_ssh(c, Some(cluster.ssh), o, &format!("{f}.ssh")),
        None => cluster.ssh.clone(),
    };
    let wd = match &rh.watchdog {
        Some(o) => watchdog::resolve(c, cluster.watchdog, o, &format!("{f}.watchdog")),
        None => cluster.watchdog.clone(),
    };
    let parameters = rh
        .parameters
        .as_ref()
        .map(|p| p.value.clone())
        .unwrap_or_default();
    if let Some(p) = &rh.parameters {
        postgresql::check_parameters(c, p, &format!("{f}.parameters"));
        postgresql::check_local_parameters(c, p, &format!("{f}.parameters"));
    }
    check_ports(c, rh, &f, &roles, cluster);
    Host {
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
    }
}

fn check_name(c: &mut Checker, i: usize, rh: &RawHost, f: &str, seen: &mut Seen) {
    let name = &rh.name.value;
    if name.trim().is_empty() {
        c.at(&rh.name, format!("{f}.name"), "host name must not be empty");
    } else if !is_simple_name(name) {
        c.at(
            &rh.name,
            format!("{f}.name"),
            format!("host name {name:?} may only contain letters, digits, '-', '_' and '.'"),
        );
    } else if name == "all" || Role::parse(name).is_some() {
        // Playbook selectors use these words; a host with such a name would be ambiguous.
        c.at(
            &rh.name,
            format!("{f}.name"),
            format!("host name {name:?} is reserved (it is a playbook host selector)"),
        );
    } else if let Some(prev) = seen.names.insert(name.clone(), i) {
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
        if let Some(other) = seen.slots.insert(slot.clone(), name.clone()) {
            c.at(
                &rh.name,
                format!("{f}.name"),
                format!(
                    "hosts {other:?} and {name:?} map to the same replication slot name {slot:?}"
                ),
            );
        }
    }
}

fn address(c: &mut Checker, rh: &RawHost, f: &str, seen: &mut Seen) -> String {
    let name = &rh.name.value;
    match &rh.address {
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
            } else if let Some(other) = seen.addrs.insert(a.value.to_lowercase(), name.clone()) {
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
    }
}

fn roles(c: &mut Checker, rh: &RawHost, f: &str) -> BTreeSet<Role> {
    let name = &rh.name.value;
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
    roles
}

/// Ports used on this host must not collide (they all bind the same address).
fn check_ports(
    c: &mut Checker,
    rh: &RawHost,
    f: &str,
    roles: &BTreeSet<Role>,
    cluster: &ClusterWide,
) {
    let p = cluster.ports;
    let mut used: Vec<(u16, &str)> = Vec::new();
    if roles.contains(&Role::Postgres) {
        used.extend([(p.pg, "postgresql.port"), (p.restapi, "agent.restapi_port")]);
    }
    if roles.contains(&Role::Etcd) && cluster.embedded_etcd {
        used.extend([
            (p.etcd_client, "etcd.client_port"),
            (p.etcd_peer, "etcd.peer_port"),
        ]);
    }
    if roles.contains(&Role::Haproxy) {
        used.extend([
            (p.haproxy_primary, "haproxy.primary_port"),
            (p.haproxy_replica, "haproxy.replica_port"),
            (p.haproxy_stats, "haproxy.stats_port"),
        ]);
    }
    for (k, (port, a)) in used.iter().enumerate() {
        if let Some((_, b)) = used[..k].iter().find(|(q, _)| q == port) {
            c.at(
                &rh.name,
                format!("{f}.roles"),
                format!(
                    "host {:?}: port {port} is used by both {b} and {a}",
                    rh.name.value
                ),
            );
        }
    }
}

/// Patroni's tags of `h` (as written in `rh`): the booleans are booleans, `replicatefrom`
/// names another PostgreSQL host, `failover_priority` is an integer. Other tags are free-form.
fn check_tags(c: &mut Checker, rh: &RawHost, h: &Host, hosts: &[Host]) {
    let Some(tags) = &rh.tags else { return };
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

/// At least one PostgreSQL host, and one that may become primary.
fn check_postgres_hosts(c: &mut Checker, raw: &RawInventory, hosts: &[Host]) {
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
}

/// SSH settings: `base` (the cluster's `ssh`, or the built-in defaults for it) with `raw`'s
/// settings at `field` applied.
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
