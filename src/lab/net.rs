//! The lab's network: one bridge in the root namespace carrying the controller's address, and
//! per host a network namespace joined to it by a veth pair; plus the iptables rules that
//! partition a host. Every function is idempotent.

use std::path::Path;

use super::{LabError, LabHost, LabSpec, sh};

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

fn netns_exists(name: &str) -> bool {
    Path::new("/run/netns").join(name).exists()
}

/// Creates the bridge with the controller address `<subnet>.1/24` and brings it up.
pub(super) fn ensure_bridge(spec: &LabSpec) -> Result<(), LabError> {
    let br = spec.bridge.as_str();
    if !link_exists(br) {
        sh("ip", &["link", "add", "name", br, "type", "bridge"])?;
    }
    let cidr = format!("{}/24", spec.controller_address());
    sh("ip", &["addr", "replace", &cidr, "dev", br])?;
    sh("ip", &["link", "set", br, "up"])?;
    Ok(())
}

pub(super) fn remove_bridge(spec: &LabSpec) -> Result<(), LabError> {
    if link_exists(&spec.bridge) {
        sh("ip", &["link", "del", &spec.bridge])?;
    }
    Ok(())
}

/// Creates the host's netns and veth pair (outer end on the bridge, `eth0` inside), gives the
/// host its address and a default route via the controller.
pub(super) fn ensure_host_net(spec: &LabSpec, h: &LabHost) -> Result<(), LabError> {
    let ns = h.name.as_str();
    if !netns_exists(ns) {
        sh("ip", &["netns", "add", ns])?;
        // A veth left from an earlier netns would have no peer in the new one.
        if link_exists(&h.veth) {
            sh("ip", &["link", "del", &h.veth])?;
        }
    }
    if !link_exists(&h.veth) {
        sh(
            "ip",
            &[
                "link", "add", &h.veth, "type", "veth", "peer", "name", "eth0", "netns", ns,
            ],
        )?;
    }
    sh(
        "ip",
        &["link", "set", &h.veth, "master", &spec.bridge, "up"],
    )?;
    let cidr = format!("{}/24", h.address);
    sh("ip", &["-n", ns, "link", "set", "lo", "up"])?;
    sh("ip", &["-n", ns, "addr", "replace", &cidr, "dev", "eth0"])?;
    sh("ip", &["-n", ns, "link", "set", "eth0", "up"])?;
    sh(
        "ip",
        &[
            "-n",
            ns,
            "route",
            "replace",
            "default",
            "via",
            &spec.controller_address(),
        ],
    )?;
    Ok(())
}

/// Deletes the host's netns (which destroys the veth pair) and any leftover outer veth.
pub(super) fn remove_host_net(h: &LabHost) -> Result<(), LabError> {
    if netns_exists(&h.name) {
        sh("ip", &["netns", "del", &h.name])?;
    }
    // Deleting the netns destroys the pair asynchronously: the outer end may vanish between the
    // check and the delete, which is the outcome we want anyway.
    if link_exists(&h.veth)
        && let Err(e) = sh("ip", &["link", "del", &h.veth])
        && link_exists(&h.veth)
    {
        return Err(e);
    }
    Ok(())
}

fn iptables(ns: &str, args: &[&str]) -> Result<String, LabError> {
    let mut all = vec!["netns", "exec", ns, "iptables", "-w"];
    all.extend_from_slice(args);
    sh("ip", &all)
}

/// Drops traffic between the host and the rest of the lab subnet, except the controller
/// (`<subnet>.1`): tests and the operator must still reach a partitioned host, as a real
/// partition between database hosts leaves the admin network working. One address per rule:
/// iptables-nft refuses several `-s` in one rule.
pub(super) fn partition(spec: &LabSpec, ns: &str) -> Result<(), LabError> {
    heal(ns)?;
    let ctl = spec.controller_address();
    let net = format!("{}.0/24", spec.subnet);
    iptables(ns, &["-A", "INPUT", "-s", &ctl, "-j", "ACCEPT"])?;
    iptables(ns, &["-A", "INPUT", "-s", &net, "-j", "DROP"])?;
    iptables(ns, &["-A", "OUTPUT", "-d", &ctl, "-j", "ACCEPT"])?;
    iptables(ns, &["-A", "OUTPUT", "-d", &net, "-j", "DROP"])?;
    Ok(())
}

pub(super) fn heal(ns: &str) -> Result<(), LabError> {
    iptables(ns, &["-F", "INPUT"])?;
    iptables(ns, &["-F", "OUTPUT"])?;
    Ok(())
}

pub(super) fn is_partitioned(ns: &str) -> bool {
    netns_exists(ns) && iptables(ns, &["-S", "INPUT"]).is_ok_and(|rules| rules.contains("-j DROP"))
}
