//! How provisioning reaches a cluster: the connected hosts of a run ([`Fleet`]), the SSH
//! specs of the inventory's hosts (and the bound on reaching one that left it), the agents'
//! REST API (base URLs from the desired state, the [`AgentClient`] with the inventory's Basic
//! auth) and
//! `psql` on a host's local socket. No decisions: the day-2 jobs and `apply` use these.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use super::agent_client::AgentClient;
use super::desired::DeploySpec;
use crate::inventory::{Inventory, Secret};
use crate::transport::{HostSpec, Transport};

/// Connected hosts by inventory name.
pub type Fleet = BTreeMap<String, Arc<dyn Transport>>;

/// A host removed from the inventory may be dead: its cleanup never waits longer than this to
/// connect.
pub const REMOVED_HOST_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How to reach each inventory host.
pub fn host_specs(inv: &Inventory) -> Vec<HostSpec> {
    inv.hosts
        .iter()
        .map(|h| HostSpec {
            name: h.name.as_str().to_string(),
            address: h.address.clone(),
            port: h.ssh.port,
            user: h.ssh.user.clone(),
            identity_file: h.ssh.identity_file.clone(),
            r#become: h.ssh.become_,
            connect_timeout: Duration::from_secs(h.ssh.connect_timeout_secs),
            command_timeout: Duration::from_secs(h.ssh.command_timeout_secs),
        })
        .collect()
}

/// `http://addr:port` of `host`'s agent REST API (an IPv6 address in brackets).
pub fn api_base(spec: &DeploySpec, host: &str) -> String {
    let addr = spec.host(host).map(|h| h.address.as_str()).unwrap_or(host);
    format!(
        "http://{}",
        crate::inventory::endpoint(addr, spec.restapi_port)
    )
}

/// The agents of `spec`'s postgres hosts, with its REST credentials.
pub fn agent_client(spec: &DeploySpec) -> AgentClient {
    AgentClient::new(
        agent_bases(spec),
        spec.restapi_auth
            .clone()
            .map(|(user, password)| (user, Secret::new(password))),
    )
}

/// `http://addr:port` of each postgres host's agent, in inventory order.
pub fn agent_bases(spec: &DeploySpec) -> Vec<(String, String)> {
    spec.hosts
        .iter()
        .filter(|h| h.roles.postgres)
        .map(|h| (h.name.clone(), api_base(spec, &h.name)))
        .collect()
}

/// `psql` on `host`'s local socket as `postgres` (peer authentication, no password anywhere).
pub fn psql_command(spec: &DeploySpec, host: &str, sql: &str) -> Option<String> {
    let h = spec.host(host)?;
    let data_dir = h.pg_data_dir.as_deref()?;
    let socket_dir = std::path::Path::new(data_dir)
        .parent()
        .map(|p| p.display().to_string())
        .unwrap_or_else(|| "/var/run/postgresql".into());
    Some(format!(
        "runuser -u postgres -- psql -XAtq -h {} -p {} -d postgres -F \"$(printf '\\037')\" -c {}",
        crate::transport::shell_quote(&socket_dir),
        spec.pg_port,
        crate::transport::shell_quote(sql)
    ))
}
