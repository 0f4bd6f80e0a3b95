//! Read-only cluster endpoints built from the DCS: `GET /cluster` (patronictl-style member
//! table), `/history`, `/config`, and `GET /metrics` (Patroni's Prometheus names, labels
//! `scope` and `name`).

use axum::response::{IntoResponse, Response};
use serde_json::Value;
use std::fmt::Write as _;

use super::ApiState;
use super::docs::{ClusterDoc, ClusterMember, Lag, ScheduledSwitchover};
use super::health::{is_listed_sync, is_quorum_mode, is_standby_cluster, is_sync_mode};
use crate::dcs::{ClusterView, PATRONI_COMPAT_VERSION};
use crate::pg::{PgState, Role};
use crate::status::AgentStatus;
use crate::types::Lsn;

/// The `/cluster` document (patroni.md §2.3): members sorted by name with role, state,
/// addresses and lag against `status.optime`, plus pause and a scheduled switchover.
pub fn cluster_json(view: &ClusterView, scope: &str) -> Value {
    serde_json::to_value(cluster_doc(view, scope)).unwrap_or_default()
}

/// [`cluster_json`] as its type (what `provision::agent_client` reads back).
pub fn cluster_doc(view: &ClusterView, scope: &str) -> ClusterDoc {
    let cfg = view.config();
    let leader = view.leader_name().map(|n| n.as_str().to_string());
    let optime = view.status.optime;
    let mut members = Vec::new();
    // `members` is a BTreeMap keyed by name: already sorted.
    for (name, m) in &view.members {
        let is_leader = leader.as_deref() == Some(name.as_str());
        let role = if is_leader {
            if is_standby_cluster(&cfg) {
                "standby_leader"
            } else {
                "leader"
            }
        } else if is_quorum_mode(&cfg) && is_listed_sync(Some(view), name.as_str()) {
            "quorum_standby"
        } else if is_sync_mode(&cfg) && is_listed_sync(Some(view), name.as_str()) {
            "sync_standby"
        } else {
            "replica"
        };
        let d = &m.data;
        let state = match (&d.replication_state, is_leader) {
            (Some(rs), false) if !rs.is_empty() => rs.clone(),
            _ => d.state.clone(),
        };
        let (host, port) = d.conn_host_port().unzip();
        let mut doc = ClusterMember {
            name: name.as_str().to_string(),
            role: role.into(),
            state,
            api_url: d.api_url.clone(),
            host,
            port,
            timeline: d.timeline,
            pending_restart: d.pending_restart,
            pending_restart_reason: d.pending_restart_reason.clone(),
            scheduled_restart: d.scheduled_restart.clone(),
            tags: d.tags.clone(),
            ..ClusterMember::default()
        };
        if !is_leader {
            let lag = |lsn: Option<u64>| {
                lsn.map(|l| (Lag::Bytes(optime.saturating_sub(l)), Lsn(l).to_string()))
            };
            (doc.receive_lag, doc.receive_lsn) = lag(d.receive_lsn).unzip();
            (doc.replay_lag, doc.replay_lsn) = lag(d.replay_lsn).unzip();
            // A replica that never reported a position: Patroni's "unknown", never absent.
            let (l, lsn) =
                lag(d.xlog_location).unwrap_or_else(|| (Lag::unknown(), "unknown".to_string()));
            (doc.lag, doc.lsn) = (Some(l), Some(lsn));
        }
        members.push(doc);
    }
    let scheduled_switchover = view.failover_request().and_then(|f| {
        Some(ScheduledSwitchover {
            at: f.scheduled_at.clone()?,
            from: f.leader.clone(),
            to: f.member.clone(),
        })
    });
    ClusterDoc {
        members,
        scope: scope.into(),
        pause: cfg.pause(),
        scheduled_switchover,
    }
}

pub(crate) async fn get_cluster(state: &ApiState) -> Response {
    match state.fresh_cluster().await {
        Some(v) => super::json(200, &cluster_json(&v, &state.scope)),
        None => super::text(502, "DCS is not available"),
    }
}

pub(crate) async fn get_history(state: &ApiState) -> Response {
    let lines = state
        .fresh_cluster()
        .await
        .map(|v| v.history.clone())
        .unwrap_or_default();
    super::json(
        200,
        &Value::Array(lines.iter().map(|l| l.to_json()).collect()),
    )
}

/// `GET /config`: 502 when there is no valid config (Patroni treats a missing config or one
/// with revision 0 as invalid).
pub(crate) async fn get_config(state: &ApiState) -> Response {
    match state.fresh_cluster().await.and_then(|v| v.config.clone()) {
        Some((c, rev)) if rev.0 > 0 => {
            let mut r = super::json(200, &Value::Object(c.0));
            // pgherd extension: the key's mod revision, for `If-Match` on PATCH/PUT.
            if let Ok(v) = axum::http::HeaderValue::from_str(&format!("\"{}\"", rev.0)) {
                r.headers_mut().insert(axum::http::header::ETAG, v);
            }
            r
        }
        _ => super::text(502, "No valid config in DCS"),
    }
}

/// Patroni's version metric: each dotted part zero-padded to two digits (`4.1.5` → `040105`).
fn version_metric(v: &str) -> String {
    v.split('.').map(|p| format!("{:0>2}", p)).collect()
}

/// Seconds since the epoch of a PostgreSQL timestamp text (`2024-08-28 19:39:26.352526+00`).
pub fn pg_timestamp_epoch(s: &str) -> Option<f64> {
    let s = s.trim();
    let fixed = if s.len() > 3
        && (s.as_bytes()[s.len() - 3] == b'+' || s.as_bytes()[s.len() - 3] == b'-')
    {
        format!("{s}:00")
    } else {
        s.to_string()
    };
    for f in [
        "%Y-%m-%d %H:%M:%S%.f%:z",
        "%Y-%m-%dT%H:%M:%S%.f%:z",
        "%Y-%m-%d %H:%M:%S%.f%z",
    ] {
        if let Ok(t) = chrono::DateTime::parse_from_str(&fixed, f) {
            return Some(t.timestamp_micros() as f64 / 1e6);
        }
    }
    None
}

/// Renders the Prometheus text for this node.
pub fn metrics_text(st: &AgentStatus, scope: &str, name: &str) -> String {
    let esc = |s: &str| {
        s.replace('\\', "\\\\")
            .replace('"', "\\\"")
            .replace('\n', "\\n")
    };
    let labels = format!("{{scope=\"{}\",name=\"{}\"}}", esc(scope), esc(name));
    let pg = &st.pg;
    let role = if st.role == Role::Promoted {
        Role::Primary
    } else {
        st.role
    };
    let running = st.state == PgState::Running;
    let primary_side = pg.in_recovery == Some(false);
    let cfg = st.cluster.as_ref().map(|c| c.config()).unwrap_or_default();
    let live = st.cluster.as_deref().filter(|_| st.dcs_ok);
    let listed = is_listed_sync(live, &st.name);
    let b = |x: bool| if x { "1".to_string() } else { "0".to_string() };
    let ts = |t: &Option<String>| {
        t.as_deref()
            .and_then(pg_timestamp_epoch)
            .map(|e| e.to_string())
            .unwrap_or_else(|| "0".into())
    };
    let unlocked = live.is_none_or(|c| c.leader.is_none());
    let rows: Vec<(&str, &str, &str, String)> = vec![
        (
            "patroni_version",
            "gauge",
            "Patroni semver without periods.",
            version_metric(PATRONI_COMPAT_VERSION),
        ),
        (
            "patroni_postgres_running",
            "gauge",
            "Value is 1 if Postgres is running, 0 otherwise.",
            b(running),
        ),
        (
            "patroni_postmaster_start_time",
            "gauge",
            "Epoch seconds since Postgres started.",
            ts(&pg.postmaster_start_time),
        ),
        (
            "patroni_primary",
            "gauge",
            "Value is 1 if this node is the leader, 0 otherwise.",
            b(role == Role::Primary),
        ),
        (
            "patroni_xlog_location",
            "counter",
            "Current location of the Postgres transaction log, 0 if this node is not the leader.",
            if primary_side {
                pg.flush_lsn.unwrap_or_default().0.to_string()
            } else {
                "0".into()
            },
        ),
        (
            "patroni_standby_leader",
            "gauge",
            "Value is 1 if standby leader, 0 otherwise.",
            b(role == Role::StandbyLeader),
        ),
        (
            "patroni_replica",
            "gauge",
            "Value is 1 if this node is a replica, 0 otherwise.",
            b(role == Role::Replica),
        ),
        (
            "patroni_sync_standby",
            "gauge",
            "Value is 1 if this node is a sync standby, 0 otherwise.",
            b(role == Role::Replica && is_sync_mode(&cfg) && listed),
        ),
        (
            "patroni_quorum_standby",
            "gauge",
            "Value is 1 if this node is a quorum standby, 0 otherwise.",
            b(role == Role::Replica && is_quorum_mode(&cfg) && listed),
        ),
        (
            "patroni_xlog_received_location",
            "counter",
            "Current location of the received Postgres transaction log, 0 if this node is not a replica.",
            if primary_side {
                "0".into()
            } else {
                pg.receive_lsn
                    .or(pg.replay_lsn)
                    .unwrap_or_default()
                    .0
                    .to_string()
            },
        ),
        (
            "patroni_xlog_replayed_location",
            "counter",
            "Current location of the replayed Postgres transaction log, 0 if this node is not a replica.",
            if primary_side {
                "0".into()
            } else {
                pg.replay_lsn.unwrap_or_default().0.to_string()
            },
        ),
        (
            "patroni_xlog_replayed_timestamp",
            "gauge",
            "Current timestamp of the replayed Postgres transaction log, 0 if null.",
            ts(&pg.replay_timestamp),
        ),
        (
            "patroni_xlog_paused",
            "gauge",
            "Value is 1 if the Postgres xlog is paused, 0 otherwise.",
            b(pg.replay_paused),
        ),
        (
            "patroni_postgres_streaming",
            "gauge",
            "Value is 1 if Postgres is streaming, 0 otherwise.",
            b(pg.replication_state.as_deref() == Some("streaming")),
        ),
        (
            "patroni_postgres_in_archive_recovery",
            "gauge",
            "Value is 1 if Postgres is replicating from archive, 0 otherwise.",
            b(pg.replication_state.as_deref() == Some("in archive recovery")),
        ),
        (
            "patroni_postgres_server_version",
            "gauge",
            "Version of Postgres (if running), 0 otherwise.",
            if running {
                pg.server_version.unwrap_or(0).to_string()
            } else {
                "0".into()
            },
        ),
        (
            "patroni_cluster_unlocked",
            "gauge",
            "Value is 1 if the cluster is unlocked, 0 if locked.",
            b(unlocked),
        ),
        (
            "patroni_failsafe_mode_is_active",
            "gauge",
            "Value is 1 if failsafe mode is active, 0 if inactive.",
            b(st.failsafe_active),
        ),
        (
            "patroni_postgres_timeline",
            "gauge",
            "Postgres timeline of this node (if running), 0 otherwise.",
            if running {
                pg.timeline.map(|t| t.0).unwrap_or(0).to_string()
            } else {
                "0".into()
            },
        ),
        (
            "patroni_dcs_last_seen",
            "gauge",
            "Epoch timestamp when DCS was last contacted successfully by Patroni.",
            st.dcs_last_seen.unwrap_or(0).to_string(),
        ),
        (
            "patroni_pending_restart",
            "gauge",
            "Value is 1 if the node needs a restart, 0 otherwise.",
            b(st.pending_restart),
        ),
        (
            "patroni_is_paused",
            "gauge",
            "Value is 1 if auto failover is disabled, 0 otherwise.",
            b(st.paused),
        ),
    ];
    let mut out = String::new();
    for (metric, kind, help, value) in rows {
        let _ = writeln!(out, "# HELP {metric} {help}");
        let _ = writeln!(out, "# TYPE {metric} {kind}");
        let _ = writeln!(out, "{metric}{labels} {value}");
    }
    let _ = writeln!(
        out,
        "# HELP patroni_postgres_state Numeric representation of Postgres state."
    );
    let values: Vec<String> = (0..=14)
        .filter_map(state_from_index)
        .map(|s| format!("{}={}", s as u8, s.as_str().replace(' ', "_")))
        .collect();
    let _ = writeln!(out, "# Values: {}", values.join(", "));
    let _ = writeln!(out, "# TYPE patroni_postgres_state gauge");
    let _ = writeln!(out, "patroni_postgres_state{labels} {}", st.state as u8);
    out
}

fn state_from_index(i: u8) -> Option<PgState> {
    use PgState::*;
    [
        InitializingNewCluster,
        InitdbFailed,
        RunningCustomBootstrap,
        CustomBootstrapFailed,
        CreatingReplica,
        Running,
        Starting,
        StartingAfterCustomBootstrap,
        StartFailed,
        Restarting,
        RestartFailed,
        Stopping,
        Stopped,
        StopFailed,
        Crashed,
    ]
    .get(i as usize)
    .copied()
}

pub(crate) fn get_metrics(state: &ApiState) -> Response {
    let st = state.snapshot();
    let body = metrics_text(&st, &state.scope, &state.name);
    (
        axum::http::StatusCode::OK,
        [(
            axum::http::header::CONTENT_TYPE,
            "text/plain; charset=utf-8",
        )],
        body,
    )
        .into_response()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn version_metric_pads_each_part() {
        assert_eq!(version_metric("4.1.5"), "040105");
    }

    #[test]
    fn pg_timestamps_parse_with_short_and_long_offsets() {
        assert_eq!(pg_timestamp_epoch("1970-01-01 00:00:10+00"), Some(10.0));
        assert_eq!(
            pg_timestamp_epoch("1970-01-01 00:00:10.5+00:00"),
            Some(10.5)
        );
        assert_eq!(pg_timestamp_epoch("1970-01-01 01:00:10+01"), Some(10.0));
        assert_eq!(pg_timestamp_epoch("garbage"), None);
    }
}
