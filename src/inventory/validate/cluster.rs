//! The cluster-wide top-level keys: `cluster` and `namespace` (the DCS prefix), `profile` with
//! the `timing` overrides, and the timing rule that checks the result against every host's
//! watchdog.

use super::{Checker, is_simple_name};
use crate::config::WatchdogMode;
use crate::inventory::model::{Host, Role};
use crate::inventory::profile::{HaTiming, Profile};
use crate::inventory::raw::RawInventory;

/// `cluster` (Patroni's scope) and `namespace`, both part of every DCS key.
pub(super) fn identity(c: &mut Checker, raw: &RawInventory) -> (String, String) {
    let cluster = raw.cluster.value.clone();
    if cluster.trim().is_empty() {
        c.at(&raw.cluster, "cluster", "cluster name must not be empty");
    } else if !is_simple_name(&cluster) {
        c.at(
            &raw.cluster,
            "cluster",
            format!("{cluster:?} may only contain letters, digits, '-', '_' and '.'"),
        );
    }
    let namespace = match &raw.namespace {
        Some(n) if n.value.trim().is_empty() || n.value.contains(char::is_whitespace) => {
            c.at(
                n,
                "namespace",
                "must be non-empty and contain no whitespace",
            );
            "/service/".to_string()
        }
        Some(n) => n.value.clone(),
        None => "/service/".to_string(),
    };
    (cluster, namespace)
}

/// The profile and its timing with the inventory's `timing` overrides applied (not yet
/// checked: see [`check_timing_rule`]).
pub(super) struct Timing {
    pub(super) profile: Profile,
    pub(super) timing: HaTiming,
    pub(super) maximum_lag_on_failover: u64,
}

pub(super) fn profile_and_timing(c: &mut Checker, raw: &RawInventory) -> Timing {
    let profile = match &raw.profile {
        Some(p) => Profile::parse(&p.value).unwrap_or_else(|| {
            c.at(
                p,
                "profile",
                format!(
                    "bad profile {:?} (expected fast, norm, safe or wide)",
                    p.value
                ),
            );
            Profile::default()
        }),
        None => Profile::default(),
    };
    let mut timing = profile.ha_timing();
    let mut maximum_lag_on_failover = 1_048_576;
    if let Some(t) = &raw.timing {
        let v = &t.value;
        timing.ttl = v.ttl.unwrap_or(timing.ttl);
        timing.loop_wait = v.loop_wait.unwrap_or(timing.loop_wait);
        timing.retry_timeout = v.retry_timeout.unwrap_or(timing.retry_timeout);
        timing.primary_start_timeout = v
            .primary_start_timeout
            .unwrap_or(timing.primary_start_timeout);
        maximum_lag_on_failover = v.maximum_lag_on_failover.unwrap_or(maximum_lag_on_failover);
    }
    Timing {
        profile,
        timing,
        maximum_lag_on_failover,
    }
}

/// The timing rule on the profile with its overrides, then, when that holds, with the
/// watchdog's safety margin of each PostgreSQL host that arms one (the first host that breaks
/// it is reported, located at the margin or the timing that set it).
pub(super) fn check_timing_rule(
    c: &mut Checker,
    raw: &RawInventory,
    timing: &HaTiming,
    hosts: &[Host],
) {
    if let Err(m) = timing.check(false) {
        match &raw.timing {
            Some(t) => c.at(t, "timing", format!("timing rule violated: {m}")),
            None => c.nowhere("timing", format!("timing rule violated: {m}")),
        }
        return;
    }
    for h in hosts
        .iter()
        .filter(|h| h.has(Role::Postgres) && h.watchdog.mode != WatchdogMode::Off)
    {
        let t = HaTiming {
            safety_margin: h.watchdog.safety_margin,
            ..*timing
        };
        if let Err(m) = t.check(true) {
            let field = format!("hosts[{}].watchdog", h.name);
            let message = format!("timing rule violated: {m}");
            match (&raw.timing, &raw.watchdog.safety_margin) {
                (_, Some(s)) => c.at(s, field, message),
                (Some(t), None) => c.at(t, field, message),
                (None, None) => c.nowhere(field, message),
            }
            break;
        }
    }
}
