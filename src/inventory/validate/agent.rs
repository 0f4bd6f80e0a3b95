//! The `agent` section (REST API user and allowlist, log level, the binary to upload) and the
//! `callbacks`
//! the agent runs.

use std::path::PathBuf;

use super::{Checker, is_simple_name};
use crate::config::access::Cidr;
use crate::inventory::model::{Agent, Callbacks, DEFAULT_RESTAPI_USERNAME};
use crate::inventory::raw::{RawAgent, RawCallbacks};

pub(super) fn agent(c: &mut Checker, raw: &RawAgent, restapi_port: u16) -> Agent {
    let log_level = match &raw.log_level {
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
    let restapi_username = match &raw.restapi_username {
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
    let mut restapi_allowlist = Vec::new();
    for e in raw.restapi_allowlist.iter().flatten() {
        if Cidr::parse(&e.value).is_some() {
            restapi_allowlist.push(e.value.trim().to_string());
        } else {
            c.at(
                e,
                "agent.restapi_allowlist",
                format!(
                    "{:?} is not an IP address or CIDR network (host names are not resolved)",
                    e.value
                ),
            );
        }
    }
    Agent {
        restapi_port,
        restapi_username,
        binary: raw.binary.as_ref().map(PathBuf::from),
        log_level,
        restapi_allowlist,
    }
}

/// The hook commands, as written (they run on the hosts; nothing to check here).
pub(super) fn callbacks(rc: &RawCallbacks) -> Callbacks {
    Callbacks {
        on_start: rc.on_start.clone(),
        on_stop: rc.on_stop.clone(),
        on_restart: rc.on_restart.clone(),
        on_reload: rc.on_reload.clone(),
        on_role_change: rc.on_role_change.clone(),
        pre_promote: rc.pre_promote.clone(),
        before_stop: rc.before_stop.clone(),
    }
}
