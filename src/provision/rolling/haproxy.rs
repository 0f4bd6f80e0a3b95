//! HAProxy's admin socket on the HAProxy hosts, over SSH: drain / undrain a member in the
//! replica backend, its current sessions, servers an interrupted run left drained. perl talks
//! to the socket (always on Debian, `perl-base`, as in the haproxy-state script): no socat.

use std::sync::Arc;

use super::executor::RollingError;
use crate::inventory::{Inventory, Role};
use crate::provision::remote::Fleet;
use crate::transport::{Transport, TransportError, shell_quote};

/// One HAProxy admin command.
const ADMIN_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(20);

/// The shell command sending `cmd` to HAProxy's admin socket on its host.
pub fn haproxy_admin_command(cmd: &str) -> String {
    format!(
        "perl -MIO::Socket::UNIX -e '$s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or die \"cannot connect to $ARGV[0]: $!\\n\"; print $s \"$ARGV[1]\\n\"; print while <$s>' {} {}",
        shell_quote(crate::provision::services::HAPROXY_ADMIN_SOCK),
        shell_quote(cmd)
    )
}

pub(super) async fn haproxy(t: &dyn Transport, cmd: &str) -> Result<String, TransportError> {
    Ok(t.run_ok(&haproxy_admin_command(cmd), ADMIN_TIMEOUT)
        .await?
        .stdout_str())
}

/// `set server` answers nothing on success, a message otherwise.
async fn haproxy_set(t: &dyn Transport, cmd: &str) -> Result<(), RollingError> {
    let out = haproxy(t, cmd).await?;
    if out.trim().is_empty() {
        Ok(())
    } else {
        Err(RollingError::Call {
            member: t.host().into(),
            what: format!("HAProxy `{cmd}`"),
            message: out.trim().to_string(),
        })
    }
}

/// HAProxy admin flags set by `state maint` (FMAINT) and `state drain` (FDRAIN).
const ADMIN_FORCED_MAINT_OR_DRAIN: u32 = 0x01 | 0x08;

/// Servers of `backend` whose admin state (`show servers state`, 7th column) is forced
/// drain or maintenance.
pub fn drained_servers(state: &str, backend: &str) -> Vec<String> {
    state
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            let admin: u32 = f.get(6)?.parse().ok()?;
            (f.get(1) == Some(&backend) && admin & ADMIN_FORCED_MAINT_OR_DRAIN != 0)
                .then(|| f[3].to_string())
        })
        .collect()
}

/// Current sessions (`scur`, 5th column of `show stat`) of `backend/server`.
pub fn current_sessions(csv: &str, backend: &str, server: &str) -> Option<u64> {
    csv.lines()
        .filter(|l| !l.starts_with('#'))
        .map(|l| l.split(',').collect::<Vec<_>>())
        .find(|f| f.first() == Some(&backend) && f.get(1) == Some(&server))
        .and_then(|f| f.get(4)?.parse().ok())
}

pub(super) fn haproxy_hosts(inv: &Inventory, fleet: &Fleet) -> Vec<Arc<dyn Transport>> {
    inv.hosts_with(Role::Haproxy)
        .filter_map(|h| fleet.get(h.name.as_str()).cloned())
        .collect()
}

pub(super) fn replica_backend(inv: &Inventory) -> String {
    format!("{}_replicas", inv.cluster)
}

/// `(HAProxy host, member)` for every member server left in drain or maintenance in the
/// replica backend (an interrupted run's leftovers; `plan` shows them, the restart step puts
/// them back). A HAProxy host whose socket does not answer is skipped (not running yet).
pub async fn drained_now(inv: &Inventory, fleet: &Fleet) -> Vec<(String, String)> {
    let backend = replica_backend(inv);
    let mut out = Vec::new();
    for t in haproxy_hosts(inv, fleet) {
        let Ok(state) = haproxy(t.as_ref(), &format!("show servers state {backend}")).await else {
            continue;
        };
        for srv in drained_servers(&state, &backend) {
            if inv.host(&srv).is_some_and(|h| h.has(Role::Postgres)) {
                out.push((t.host().to_string(), srv));
            }
        }
    }
    out
}

/// Puts back every member server an interrupted run left in drain or maintenance in the
/// replica backend, on every HAProxy host; returns what it did.
pub async fn undrain_leftovers(
    inv: &Inventory,
    fleet: &Fleet,
) -> Result<Vec<(String, String)>, RollingError> {
    let backend = replica_backend(inv);
    let mut done = Vec::new();
    for (host, srv) in drained_now(inv, fleet).await {
        let Some(t) = fleet.get(&host) else { continue };
        haproxy_set(
            t.as_ref(),
            &format!("set server {backend}/{srv} state ready"),
        )
        .await?;
        done.push((
            srv.clone(),
            format!("put back into {backend} on {host} (left drained by an interrupted run)"),
        ));
    }
    Ok(done)
}

pub(super) async fn set_state_everywhere(
    inv: &Inventory,
    fleet: &Fleet,
    member: &str,
    state: &str,
) -> Result<(), RollingError> {
    let backend = replica_backend(inv);
    let mut errs = Vec::new();
    for t in haproxy_hosts(inv, fleet) {
        if let Err(e) = haproxy_set(
            t.as_ref(),
            &format!("set server {backend}/{member} state {state}"),
        )
        .await
        {
            errs.push(e.to_string());
        }
    }
    if errs.is_empty() {
        Ok(())
    } else {
        Err(RollingError::Call {
            member: member.into(),
            what: format!("setting it to {state} in HAProxy"),
            message: errs.join("; "),
        })
    }
}
