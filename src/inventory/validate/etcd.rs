//! The `etcd` section: an external etcd (`etcd.endpoints`) or the embedded one on the hosts
//! with the etcd role, never both.

use serde_saphyr::Spanned;

use super::{Checker, Ports, address_problem};
use crate::inventory::model::{EmbeddedEtcd, Etcd, Host, Role};
use crate::inventory::raw::RawInventory;

pub(super) fn etcd(
    c: &mut Checker,
    raw: &RawInventory,
    hosts: &[Host],
    ports: &Ports,
    cluster: &str,
) -> Etcd {
    let etcd_hosts: Vec<&Host> = hosts.iter().filter(|h| h.has(Role::Etcd)).collect();
    match &raw.etcd.endpoints {
        Some(eps) => external(c, eps, &etcd_hosts),
        None => embedded(c, raw, &etcd_hosts, ports, cluster),
    }
}

fn names(hosts: &[&Host]) -> String {
    hosts
        .iter()
        .map(|h| h.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// `etcd.endpoints`: at least one `host:port`, and no host with the etcd role.
fn external(c: &mut Checker, eps: &Spanned<Vec<Spanned<String>>>, etcd_hosts: &[&Host]) -> Etcd {
    if !etcd_hosts.is_empty() {
        c.at(
            eps,
            "etcd.endpoints",
            format!(
                "external etcd endpoints and hosts with the etcd role ({}) are mutually exclusive",
                names(etcd_hosts)
            ),
        );
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

/// etcd on the hosts with the etcd role: an odd number of them.
fn embedded(
    c: &mut Checker,
    raw: &RawInventory,
    etcd_hosts: &[&Host],
    ports: &Ports,
    cluster: &str,
) -> Etcd {
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
                names(etcd_hosts)
            ),
        );
    }
    Etcd::Embedded(EmbeddedEtcd {
        members: etcd_hosts.iter().map(|h| h.name.clone()).collect(),
        client_port: ports.etcd_client,
        peer_port: ports.etcd_peer,
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
