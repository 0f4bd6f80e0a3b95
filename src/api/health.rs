//! The status JSON (`GET /patroni` and the body of every health check, patroni.md §2.3) and the
//! health rules (§2.2): which node answers 200 on `/primary`, `/replica?lag=`, `/sync`, ...
//!
//! Everything here is computed from the HA loop's snapshot: no SQL, no DCS call, no waiting.
//!
//! pgherd extension (extra fields are ignored by patronictl and HAProxy): `/patroni` carries a
//! `pgherd` object saying what the agent runs with, so that `pgherd apply` can tell a written
//! config from a loaded one:
//! - `config_sha256`: hex sha256 of the config file bytes in force: those read at start-up or
//!   at the last successful reload (equal to the digest of the file written = loaded);
//! - `config_error` (absent when the last (re)load succeeded): why the last reload was refused
//!   and the previous config kept, e.g. `restart required: restapi.listen` or
//!   `pg_hba.conf line 7: invalid IP mask "33": ... (kept the previous pg_hba.conf)`;
//! - `dcs_config_revision` (absent until applied): the mod revision of the DCS `config` key
//!   whose content this agent has written into PostgreSQL's files and reloaded PostgreSQL for.
//!   It is published only together with a PostgreSQL observation taken after that reload was
//!   confirmed in force (the postmaster's `pg_conf_load_time()` moved), so `pending_restart` /
//!   `pending_restart_reason` in the same answer already reflect that config;
//! - `dcs_config_error` (absent unless refused): why PostgreSQL refused the DCS config (its
//!   `pg_hba`); that revision is then not reported as applied;
//! - `bootstrap_error` (absent unless the last bootstrap attempt of this node failed): the
//!   cause (initdb, start or post_bootstrap), also logged at error level once per attempt;
//! - `clone_error` (absent unless the last clone of this node failed): the cause (e.g. the
//!   pg_basebackup error: no pg_hba entry on the leader), until a clone succeeds.

use std::time::Instant;

use serde_json::{Map, Value, json};

use super::{ApiState, Req};
use crate::dcs::{ClusterView, DynamicConfig, PATRONI_COMPAT_VERSION};
use crate::pg::{PgState, Role};
use crate::status::AgentStatus;

/// Parses a size with Patroni's units (`16kB`, `64MB`, `1GB`, `2TB`, plain bytes; base 1024,
/// unit case-insensitive). `None` for garbage.
pub fn parse_size(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: f64 = num.parse().ok()?;
    let mult: f64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1.0,
        "kb" => 1024.0,
        "mb" => 1024.0 * 1024.0,
        "gb" => 1024.0 * 1024.0 * 1024.0,
        "tb" => 1024.0 * 1024.0 * 1024.0 * 1024.0,
        _ => return None,
    };
    let v = n * mult;
    (v.is_finite() && v >= 0.0).then_some(v as u64)
}

/// Role as reported over the API: `promoted` already runs as primary (PostgreSQL accepts
/// writes once `pg_ctl promote` returned), so health checks treat it as primary.
fn api_role(st: &AgentStatus) -> Role {
    match st.role {
        Role::Promoted => Role::Primary,
        r => r,
    }
}

/// The dynamic config as last seen (kept even when the DCS is unreachable, like Patroni's
/// global config).
fn dyn_config(st: &AgentStatus) -> DynamicConfig {
    st.cluster.as_ref().map(|c| c.config()).unwrap_or_default()
}

/// The cluster view only when the DCS answered on the last cycle (Patroni's `dcs.cluster`).
fn live_cluster(st: &AgentStatus) -> Option<&ClusterView> {
    st.cluster.as_deref().filter(|_| st.dcs_ok)
}

pub(crate) fn is_standby_cluster(c: &DynamicConfig) -> bool {
    c.0.get("standby_cluster")
        .is_some_and(|v| v.as_object().is_some_and(|o| !o.is_empty()))
}

pub(crate) fn is_quorum_mode(c: &DynamicConfig) -> bool {
    matches!(c.0.get("synchronous_mode"), Some(Value::String(s)) if s.eq_ignore_ascii_case("quorum"))
}

/// Synchronous mode proper (on, and not quorum).
pub(crate) fn is_sync_mode(c: &DynamicConfig) -> bool {
    c.synchronous_mode() && !is_quorum_mode(c)
}

/// Whether `name` is listed as a sync standby in the `sync` key (not as its leader).
pub(crate) fn is_listed_sync(cluster: Option<&ClusterView>, name: &str) -> bool {
    cluster
        .and_then(|c| c.sync_state())
        .is_some_and(|s| s.matches(name, false))
}

/// Builds the status JSON of this node.
pub fn status_json(st: &AgentStatus) -> Map<String, Value> {
    let pg = &st.pg;
    let role = api_role(st);
    let mut m = Map::new();
    if pg.accepting_connections {
        m.insert("state".into(), st.state.as_str().into());
        if let Some(t) = &pg.postmaster_start_time {
            m.insert("postmaster_start_time".into(), t.clone().into());
        }
        m.insert("role".into(), role.as_str().into());
        if let Some(v) = pg.server_version {
            m.insert("server_version".into(), v.into());
        }
        if pg.in_recovery == Some(false) {
            m.insert(
                "xlog".into(),
                json!({"location": pg.flush_lsn.unwrap_or_default().0}),
            );
        } else {
            let replayed = pg.replay_lsn.unwrap_or_default();
            let received = pg.receive_lsn.unwrap_or(replayed);
            m.insert(
                "xlog".into(),
                json!({
                    "received_location": received.0,
                    "replayed_location": replayed.0,
                    "replayed_timestamp": pg.replay_timestamp,
                    "paused": pg.replay_paused,
                }),
            );
        }
        if let Some(tl) = pg.timeline {
            m.insert("timeline".into(), tl.0.into());
        }
        if pg.in_recovery != Some(false)
            && let Some(rs) = &pg.replication_state
        {
            m.insert("replication_state".into(), rs.clone().into());
        }
        if pg.in_recovery == Some(false) && !pg.replication.is_empty() {
            let rows: Vec<Value> = pg
                .replication
                .iter()
                .map(|r| {
                    json!({
                        "usename": r.usename,
                        "application_name": r.application_name,
                        "client_addr": r.client_addr,
                        "state": r.state,
                        "sync_state": r.sync_state,
                        "sync_priority": r.sync_priority,
                    })
                })
                .collect();
            m.insert("replication".into(), Value::Array(rows));
        }
    } else {
        // Query failure shape: a node that believes PostgreSQL runs but cannot query it says
        // "unknown" rather than lying "running".
        let state = if st.state == PgState::Running {
            "unknown"
        } else {
            st.state.as_str()
        };
        m.insert("state".into(), state.into());
        m.insert("role".into(), role.as_str().into());
    }
    let cfg = dyn_config(st);
    if role == Role::Replica && is_sync_mode(&cfg) && is_listed_sync(live_cluster(st), &st.name) {
        m.insert("sync_standby".into(), true.into());
    }
    if role == Role::Replica && is_quorum_mode(&cfg) && is_listed_sync(live_cluster(st), &st.name) {
        m.insert("quorum_standby".into(), true.into());
    }
    if live_cluster(st).is_none_or(|c| c.leader.is_none()) {
        m.insert("cluster_unlocked".into(), true.into());
    }
    if st.paused {
        m.insert("pause".into(), true.into());
    }
    if st.failsafe_active {
        m.insert("failsafe_mode_is_active".into(), true.into());
    }
    if let Some(t) = st.dcs_last_seen {
        m.insert("dcs_last_seen".into(), t.into());
    }
    if !st.tags.is_empty() {
        m.insert("tags".into(), Value::Object(st.tags.clone()));
    }
    if let Some(sysid) = &pg.sysid {
        m.insert("database_system_identifier".into(), sysid.clone().into());
    }
    if st.pending_restart {
        m.insert("pending_restart".into(), true.into());
        if let Some(r) = &st.pending_restart_reason {
            m.insert("pending_restart_reason".into(), r.clone());
        }
    }
    if let Some(Value::Object(s)) = &st.scheduled_restart {
        let mut s = s.clone();
        s.remove("postmaster_start_time");
        m.insert("scheduled_restart".into(), Value::Object(s));
    }
    if st.watchdog_failed {
        m.insert("watchdog_failed".into(), true.into());
    }
    m.insert(
        "patroni".into(),
        json!({"version": PATRONI_COMPAT_VERSION, "scope": st.scope, "name": st.name}),
    );
    m.insert(
        "pgherd".into(),
        serde_json::to_value(&st.pgherd).unwrap_or_default(),
    );
    m
}

/// `GET /patroni`: always 200 with the status JSON.
pub(crate) fn get_patroni(state: &ApiState) -> axum::response::Response {
    let st = state.snapshot();
    super::json(200, &Value::Object(status_json(&st)))
}

/// Generic `GET <health path>`: the code of [`health_code`] with the status JSON as body.
pub(crate) fn get_health(state: &ApiState, req: &Req) -> axum::response::Response {
    let st = state.snapshot();
    let code = health_code(&st, req);
    super::json(code, &Value::Object(status_json(&st)))
}

/// Does the `tag_<k>=<v>` filter match our tags? A missing tag never matches; non-string values
/// compare as their lowercase text (`true`, `1`).
fn tags_match(st: &AgentStatus, req: &Req) -> bool {
    req.query
        .iter()
        .filter_map(|(k, v)| Some((k.strip_prefix("tag_")?, v)))
        .all(|(k, want)| match st.tags.get(k) {
            Some(Value::String(s)) => s == want,
            Some(Value::Null) | None => false,
            Some(other) => other.to_string().to_lowercase() == *want,
        })
}

/// Status code of a health path (patroni.md §2.2), also used for `HEAD`/`OPTIONS`.
pub(crate) fn health_code(st: &AgentStatus, req: &Req) -> u16 {
    let path = if req.path == "/" {
        "/primary"
    } else {
        req.path.as_str()
    };
    let now = Instant::now();
    let cluster = live_cluster(st);
    let cfg = dyn_config(st);
    let standby_cluster = is_standby_cluster(&cfg);
    let role = api_role(st);

    // Lag is measured against the leader's last published position; with the DCS unreachable
    // there is nothing trustworthy to measure against, so no node counts as lagging.
    let leader_optime = cluster.map(|c| c.status.optime).unwrap_or(0);
    let replayed = st.pg.replay_lsn.unwrap_or_default().0;
    let max_lag = req.query("lag").and_then(parse_size).unwrap_or(u64::MAX);
    let lagging = leader_optime > 0 && leader_optime > replayed.saturating_add(max_lag);
    let noloadbalance = crate::dcs::tag_is_true(st.tags.get("noloadbalance"));
    let replica_ok =
        !noloadbalance && !lagging && role == Role::Replica && st.state == PgState::Running;
    let leader_ok = if cluster.is_none() && st.paused {
        // Paused with the DCS unreachable: nobody can hold a fresh lock, and pause promises
        // that nothing changes, so trust what PostgreSQL runs as.
        matches!(role, Role::Primary | Role::StandbyLeader)
    } else {
        st.is_leader(now)
    };
    let code = |ok: bool| if ok { 200 } else { 503 };

    let mut leaderish = true;
    let status = if path.contains("standby_leader") || path.contains("standby-leader") {
        if standby_cluster {
            code(leader_ok)
        } else {
            503
        }
    } else if path.contains("primary") || path.contains("master") || path.contains("read-write") {
        if standby_cluster {
            503
        } else {
            code(leader_ok)
        }
    } else if path.contains("leader") {
        code(leader_ok)
    } else {
        leaderish = false;
        if path.contains("replica") {
            code(replica_ok)
        } else if path.contains("read-only") && !path.contains("sync") && !path.contains("quorum") {
            code(leader_ok || replica_ok)
        } else if path.contains("health") {
            code(st.state == PgState::Running)
        } else if let Some(c) = cluster {
            let listed = is_listed_sync(Some(c), &st.name);
            let is_sync = is_sync_mode(&cfg) && listed;
            let is_quorum = is_quorum_mode(&cfg) && listed;
            match path {
                "/sync" | "/synchronous" if is_sync => code(replica_ok),
                "/quorum" if is_quorum => code(replica_ok),
                "/async" | "/asynchronous" if !is_sync && !is_quorum => code(replica_ok),
                "/read-only-sync" | "/read-only-synchronous" => {
                    code(leader_ok || (is_sync && replica_ok))
                }
                "/read-only-quorum" => code(leader_ok || (is_quorum && replica_ok)),
                _ => 503,
            }
        } else {
            503
        }
    };
    if status == 200 && !leaderish && !tags_match(st, req) {
        return 503;
    }
    status
}

/// `/liveness`: the HA loop is alive. Paused nodes are always alive (nothing is supposed to
/// happen). Otherwise the next cycle (last cycle + loop_wait) must not be overdue by more than
/// ttl on a primary (after that its lock may be gone while it still thinks it leads) or 2·ttl
/// elsewhere.
pub fn liveness_code(st: &AgentStatus) -> u16 {
    if st.paused {
        return 200;
    }
    let factor = if api_role(st) == Role::Primary { 1 } else { 2 };
    let deadline = st.last_cycle
        + std::time::Duration::from_secs(st.loop_wait)
        + std::time::Duration::from_secs(st.ttl * factor);
    if Instant::now() < deadline { 200 } else { 503 }
}

/// `/readiness?lag=&mode=apply|write`: leaders are ready; replicas must be running, streaming
/// and within `lag` (default `maximum_lag_on_failover`) of the leader's optime. With the DCS
/// unreachable we cannot measure lag (no failsafe mode), so replicas are not ready.
pub(crate) fn readiness_code(st: &AgentStatus, req: &Req) -> u16 {
    if st.is_leader(Instant::now()) {
        return 200;
    }
    if st.state != PgState::Running || st.pg.replication_state.as_deref() != Some("streaming") {
        return 503;
    }
    let Some(cluster) = live_cluster(st) else {
        return 503;
    };
    let max_lag = req
        .query("lag")
        .and_then(parse_size)
        .unwrap_or_else(|| cluster.config().maximum_lag_on_failover());
    let loc = if req.query("mode") == Some("write") {
        st.pg.receive_lsn.or(st.pg.replay_lsn)
    } else {
        st.pg.replay_lsn
    }
    .unwrap_or_default()
    .0;
    if cluster.status.optime <= loc.saturating_add(max_lag) {
        200
    } else {
        503
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_size_understands_patroni_units() {
        assert_eq!(parse_size("16kB"), Some(16 * 1024));
        assert_eq!(parse_size("64MB"), Some(64 << 20));
        assert_eq!(parse_size("1GB"), Some(1 << 30));
        assert_eq!(parse_size("100"), Some(100));
        assert_eq!(parse_size("1mb"), Some(1 << 20));
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_size("5PB"), None);
    }
}
