//! The mutating verbs (patroni.md §2.4), all behind Basic auth when configured:
//! `POST /switchover|/failover` and `DELETE /switchover` (write the DCS `failover` key directly,
//! then wake the loop), `POST /restart`, `DELETE /restart`, `POST /reinitialize`, `POST /reload`
//! (forwarded to the HA loop as [`Command`]s), `PATCH|PUT /config` (DCS writes).

use std::time::Duration;

use axum::response::Response;
use chrono::{DateTime, FixedOffset, NaiveDateTime, Utc};
use serde_json::{Map, Value};
use tokio::sync::oneshot;
use tokio::task::JoinSet;

use super::health::{is_quorum_mode, is_sync_mode};
use super::{ApiState, Req, json, read_json, text};
use crate::dcs::{ClusterView, DynamicConfig, Failover, Member, tag_is_true};
use crate::status::{Command, CommandReply, RestartRequest};
use crate::types::Revision;

/// How long we wait to hand a command to the HA loop before answering 503: a loop that cannot
/// take a message in 5 s is stuck, and the client should learn that rather than hang.
const COMMAND_SEND_TIMEOUT: Duration = Duration::from_secs(5);

/// Why a schedule was refused: (HTTP code, message).
type ScheduleError = (u16, String);

/// Parses `scheduled_at` / `schedule` like Patroni: a timezone is mandatory (400), unparsable or
/// past times are 422.
pub fn parse_schedule(raw: &Value, action: &str) -> Result<DateTime<FixedOffset>, ScheduleError> {
    let unparsable = || {
        (
            422,
            "Unable to parse scheduled timestamp. It should be in an unambiguous format, e.g. ISO 8601"
                .to_string(),
        )
    };
    let s = raw.as_str().ok_or_else(unparsable)?.trim();
    let with_tz = DateTime::parse_from_rfc3339(s)
        .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%dT%H:%M:%S%.f%z"))
        .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%:z"))
        .or_else(|_| DateTime::parse_from_str(s, "%Y-%m-%d %H:%M:%S%.f%z"));
    match with_tz {
        Ok(t) if t < Utc::now() => Err((422, format!("Cannot schedule {action} in the past"))),
        Ok(t) => Ok(t),
        Err(_) => {
            let naive = [
                "%Y-%m-%dT%H:%M:%S%.f",
                "%Y-%m-%d %H:%M:%S%.f",
                "%Y-%m-%dT%H:%M",
                "%Y-%m-%d %H:%M",
            ]
            .iter()
            .any(|f| NaiveDateTime::parse_from_str(s, f).is_ok());
            if naive {
                Err((
                    400,
                    format!("Timezone information is mandatory for the scheduled {action}"),
                ))
            } else {
                Err(unparsable())
            }
        }
    }
}

fn str_field(req: &Map<String, Value>, key: &str) -> Option<String> {
    match req.get(key)? {
        Value::String(s) if !s.is_empty() => Some(s.clone()),
        Value::Null => None,
        Value::String(_) => None,
        other => Some(other.to_string()),
    }
}

/// `POST /switchover` and `POST /failover` (Patroni `do_POST_failover`): the checks run in
/// Patroni's order so that clients see the same message for the same mistake.
pub(crate) async fn post_switchover(state: &ApiState, req: Req, failover: bool) -> Response {
    let body = match read_json(req, false).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let leader = str_field(&body, "leader");
    let candidate = str_field(&body, "candidate").or_else(|| str_field(&body, "member"));
    let scheduled_raw = body.get("scheduled_at").filter(|v| !v.is_null());
    let cluster = state.fresh_cluster().await.unwrap_or_default();
    let paused = cluster.is_paused();
    let mut action = if failover { "failover" } else { "switchover" };

    if failover && candidate.is_none() {
        return text(
            400,
            "Failover could be performed only to a specific candidate",
        );
    }
    if !failover && leader.is_none() {
        return text(
            400,
            "Switchover could be performed only from a specific leader",
        );
    }
    let mut scheduled_at = None;
    if let Some(raw) = scheduled_raw {
        if failover {
            return text(400, "Failover can't be scheduled");
        }
        if paused {
            return text(400, "Can't schedule switchover in the paused state");
        }
        match parse_schedule(raw, action) {
            Ok(t) => scheduled_at = Some(t),
            Err((code, msg)) => return text(code, msg),
        }
    }
    if paused && candidate.is_none() {
        return text(
            400,
            "Switchover is possible only to a specific candidate in a paused state",
        );
    }
    if failover && leader.is_some() {
        // A failover naming the leader is a switchover (Patroni logs and converts it).
        action = "switchover";
    }
    if leader.is_some() && leader == candidate {
        return text(400, "Switchover target and source are the same");
    }
    if scheduled_at.is_none()
        && let Some(why) = failover_impossible(
            state,
            &cluster,
            leader.as_deref(),
            candidate.as_deref(),
            action,
        )
        .await
    {
        return text(412, why);
    }
    let request = Failover {
        leader: leader.clone(),
        member: candidate.clone(),
        scheduled_at: scheduled_at.map(|t| t.to_rfc3339()),
    };
    match state.dcs.set_failover(&request, None).await {
        Ok(true) => {}
        _ => return text(503, "failed to write failover key into DCS"),
    }
    state.wakeup();
    if scheduled_at.is_some() {
        let mut a = action.to_string();
        a[..1].make_ascii_uppercase();
        return text(202, format!("{a} scheduled"));
    }
    let old_leader = cluster.leader_name().map(|n| n.as_str().to_string());
    let (code, msg) = poll_result(state, &cluster, old_leader, candidate, action).await;
    text(code, msg)
}

/// Patroni's `is_failover_possible`: `Some(reason)` when the request cannot succeed.
async fn failover_impossible(
    state: &ApiState,
    cluster: &ClusterView,
    leader: Option<&str>,
    candidate: Option<&str>,
    action: &str,
) -> Option<String> {
    let cfg = cluster.config();
    let cur_leader = cluster.leader_name().map(|n| n.as_str());
    if let Some(l) = leader
        && cur_leader != Some(l)
    {
        return Some("leader name does not match".into());
    }
    let sync_only = is_sync_mode(&cfg) && !is_quorum_mode(&cfg);
    let listed = |n: &str| {
        cluster
            .sync
            .as_ref()
            .is_some_and(|(s, _)| s.matches(n, false))
    };
    let members: Vec<&Member> = if let Some(c) = candidate {
        if action == "switchover" && sync_only && !listed(c) {
            return Some("candidate name does not match with sync_standby".into());
        }
        let m: Vec<&Member> = cluster
            .members
            .values()
            .filter(|m| m.name.as_str() == c)
            .collect();
        if m.is_empty() {
            return Some("candidate does not exists".into());
        }
        m
    } else if sync_only {
        let m: Vec<&Member> = cluster
            .members
            .values()
            .filter(|m| listed(m.name.as_str()))
            .collect();
        if m.is_empty() {
            return Some(format!(
                "{action} is not possible: can not find sync_standby"
            ));
        }
        m
    } else {
        let m: Vec<&Member> = cluster
            .members
            .values()
            .filter(|m| Some(m.name.as_str()) != cur_leader && !m.data.api_url.is_empty())
            .collect();
        if m.is_empty() {
            return Some(format!(
                "{action} is not possible: cluster does not have members except leader"
            ));
        }
        m
    };
    // Ask every possible candidate at once; one healthy answer is enough.
    let mut probes = JoinSet::new();
    for m in members {
        let probe = state.probe.clone();
        let m = m.clone();
        probes.spawn(async move { probe.fetch_status(&m).await });
    }
    while let Some(res) = probes.join_next().await {
        if let Ok(Some(status)) = res
            && candidate_ok(&status)
        {
            return None;
        }
    }
    Some(format!(
        "{action} is not possible: no good candidates have been found"
    ))
}

/// A probed member can take over unless it may not promote (`nofailover`, or a
/// `failover_priority` ≤ 0) or its watchdog is required but broken.
fn candidate_ok(status: &Value) -> bool {
    let tags = status.get("tags");
    let nofailover = tags.and_then(|t| t.get("nofailover"));
    let no = if nofailover.is_some_and(|v| !v.is_null()) {
        tag_is_true(nofailover)
    } else {
        tags.and_then(|t| t.get("failover_priority"))
            .and_then(|v| v.as_i64().or_else(|| v.as_str()?.parse().ok()))
            .is_some_and(|p| p <= 0)
    };
    !no && !tag_is_true(status.get("watchdog_failed"))
}

/// Waits for the outcome like Patroni's `poll_failover_result`, but polling every
/// `switchover_poll` (100 ms) instead of every second, for up to `2 * max(10, loop_wait)` s.
async fn poll_result(
    state: &ApiState,
    cluster: &ClusterView,
    old_leader: Option<String>,
    candidate: Option<String>,
    action: &str,
) -> (u16, String) {
    let loop_wait = cluster.config().loop_wait().max(state.snapshot().loop_wait);
    let timeout = state
        .switchover_timeout
        .unwrap_or_else(|| Duration::from_secs(2 * loop_wait.max(10)));
    let stem = &action[..action.len() - 4]; // "switch" / "fail"
    let mut title = action.to_string();
    title[..1].make_ascii_uppercase();
    let mut title_stem = stem.to_string();
    title_stem[..1].make_ascii_uppercase();
    let deadline = tokio::time::Instant::now() + timeout;
    while tokio::time::Instant::now() < deadline {
        tokio::time::sleep(state.switchover_poll).await;
        let Ok(Ok(view)) = tokio::time::timeout(Duration::from_secs(2), state.dcs.load()).await
        else {
            continue;
        };
        if let Some(new) = view.leader_name().map(|n| n.as_str().to_string())
            && Some(&new) != old_leader.as_ref()
        {
            return match &candidate {
                Some(c) if *c != new => (
                    200,
                    format!("{title_stem}ed over to \"{new}\" instead of \"{c}\""),
                ),
                _ => (200, format!("Successfully {stem}ed over to \"{new}\"")),
            };
        }
        if view.failover_request().is_none() {
            return (503, format!("{title} failed"));
        }
    }
    (503, format!("{title} status unknown"))
}

/// `DELETE /switchover`: clears a *scheduled* switchover with CAS on the key's revision.
pub(crate) async fn delete_switchover(state: &ApiState) -> Response {
    let Ok(Ok(view)) = tokio::time::timeout(Duration::from_secs(3), state.dcs.load()).await else {
        return text(503, "DCS is not available");
    };
    match &view.failover {
        Some((f, rev)) if f.scheduled_at.is_some() => {
            match state
                .dcs
                .set_failover(&Failover::default(), Some(*rev))
                .await
            {
                Ok(true) => {
                    state.wakeup();
                    text(200, "scheduled switchover deleted")
                }
                _ => text(409, "Conflict"),
            }
        }
        _ => text(404, "no switchover is scheduled"),
    }
}

/// Sends a command to the HA loop and waits for its reply.
async fn ask_loop(
    state: &ApiState,
    make: impl FnOnce(oneshot::Sender<CommandReply>) -> Command,
    what: &str,
) -> CommandReply {
    let (tx, rx) = oneshot::channel();
    match tokio::time::timeout(COMMAND_SEND_TIMEOUT, state.commands.send(make(tx))).await {
        Ok(Ok(())) => {}
        _ => {
            return CommandReply::new(503, format!("{what} failed: the HA loop is not responding"));
        }
    }
    rx.await.unwrap_or_else(|_| {
        CommandReply::new(
            503,
            format!("{what} failed: the HA loop dropped the request"),
        )
    })
}

fn reply(r: CommandReply) -> Response {
    let trimmed = r.body.trim_start();
    if (trimmed.starts_with('{') || trimmed.starts_with('['))
        && let Ok(v) = serde_json::from_str::<Value>(trimmed)
    {
        return json(r.code, &v);
    }
    text(r.code, r.body)
}

/// Timeout with Patroni's `parse_int(value, 's')` units.
fn parse_seconds(v: &Value) -> Option<f64> {
    match v {
        Value::Number(n) => n.as_f64(),
        Value::String(s) => {
            let s = s.trim();
            let split = s
                .find(|c: char| !c.is_ascii_digit() && c != '.')
                .unwrap_or(s.len());
            let (num, unit) = s.split_at(split);
            let n: f64 = num.parse().ok()?;
            let mult = match unit.trim() {
                "" | "s" => 1.0,
                "ms" => 0.001,
                "min" => 60.0,
                "h" => 3600.0,
                "d" => 86400.0,
                _ => return None,
            };
            Some(n * mult)
        }
        _ => None,
    }
}

fn valid_pg_version(v: &Value) -> bool {
    let Some(s) = v.as_str() else { return false };
    let parts: Vec<&str> = s.split('.').collect();
    (2..=3).contains(&parts.len())
        && parts
            .iter()
            .all(|p| !p.is_empty() && p.chars().all(|c| c.is_ascii_digit()))
}

/// `POST /restart`: validation here (400/422/500 exactly as Patroni), the restart itself —
/// immediate or scheduled, with its 200/202/409/503 — is decided by the HA loop.
pub(crate) async fn post_restart(state: &ApiState, req: Req) -> Response {
    let body = match read_json(req, true).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let mut r = RestartRequest::default();
    for (k, v) in &body {
        match k.as_str() {
            "schedule" => {
                if state.snapshot().paused {
                    return text(500, "Can't schedule restart in the paused state");
                }
                match parse_schedule(v, "restart") {
                    Ok(t) => r.schedule = Some(t.to_rfc3339()),
                    Err((code, msg)) => return text(code, msg),
                }
            }
            "role" => match v.as_str() {
                Some(role @ ("primary" | "standby_leader" | "replica")) => {
                    r.role = Some(role.into())
                }
                _ => {
                    return text(
                        400,
                        "PostgreSQL role should be either primary, standby_leader, or replica",
                    );
                }
            },
            "postgres_version" => {
                if !valid_pg_version(v) {
                    let shown = v
                        .as_str()
                        .map(str::to_string)
                        .unwrap_or_else(|| v.to_string());
                    return text(
                        400,
                        format!(
                            "Invalid PostgreSQL version format: X.Y or X.Y.Z is accepted: {shown}"
                        ),
                    );
                }
                r.postgres_version = v.as_str().map(str::to_string);
            }
            "timeout" => match parse_seconds(v) {
                Some(t) if t > 0.0 => r.timeout = Some(t),
                _ => return text(400, "Timeout should be a positive number of seconds"),
            },
            "restart_pending" => r.restart_pending = Some(tag_is_true(Some(v))),
            other => {
                return text(
                    400,
                    format!("Unknown filter for the scheduled restart: {other}"),
                );
            }
        }
    }
    reply(ask_loop(state, |reply| Command::Restart { req: r, reply }, "restart").await)
}

pub(crate) async fn delete_restart(state: &ApiState) -> Response {
    reply(
        ask_loop(
            state,
            |reply| Command::CancelScheduledRestart { reply },
            "cancel restart",
        )
        .await,
    )
}

/// `POST /reinitialize {force, from_leader}`. The two refusals that only need the snapshot are
/// answered here (in Patroni's order); the rest is the loop's.
pub(crate) async fn post_reinitialize(state: &ApiState, req: Req) -> Response {
    let body = match read_json(req, true).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let force = tag_is_true(body.get("force"));
    let from_leader = tag_is_true(body.get("from_leader"));
    let st = state.snapshot();
    if st.dcs_ok && st.cluster.as_ref().is_some_and(|c| c.leader.is_none()) {
        return text(503, "Cluster has no leader, can not reinitialize");
    }
    if st.is_leader(std::time::Instant::now()) {
        return text(503, "I am the leader, can not reinitialize");
    }
    reply(
        ask_loop(
            state,
            |reply| Command::Reinitialize {
                force,
                from_leader,
                reply,
            },
            "reinitialize",
        )
        .await,
    )
}

/// `POST /reload`: always 202 (as a SIGHUP); the loop's reply is only logged.
pub(crate) async fn post_reload(state: &ApiState) -> Response {
    let (tx, rx) = oneshot::channel();
    match state.commands.try_send(Command::Reload { reply: tx }) {
        Ok(()) => {
            tokio::spawn(async move {
                if let Ok(r) = rx.await {
                    tracing::info!(code = r.code, body = %r.body, "reload processed");
                }
            });
        }
        Err(e) => tracing::warn!(error = %e, "cannot queue reload for the HA loop"),
    }
    text(202, "reload scheduled")
}

/// pgherd extension: `If-Match: "<rev>"` on `PATCH|PUT /config` (the `ETag` of `GET /config`)
/// makes the write conditional on the DCS `config` key still being at that mod revision.
/// `Ok(None)` without the header; `Err` = the message of a 400 for a malformed one.
fn if_match(req: &Req) -> Result<Option<Revision>, String> {
    let Some(h) = req.headers.get(axum::http::header::IF_MATCH) else {
        return Ok(None);
    };
    let raw = h.to_str().unwrap_or("").trim();
    let inner = raw
        .strip_prefix("W/")
        .unwrap_or(raw)
        .trim_matches('"')
        .trim();
    match inner.parse::<i64>() {
        Ok(r) if r > 0 => Ok(Some(Revision(r))),
        _ => Err(format!(
            "Bad request: If-Match must be a quoted config revision such as \"42\", got {raw:?}"
        )),
    }
}

/// The 412 answer when the config moved on since the revision the caller read.
fn changed_since(expected: Revision, now: Option<Revision>) -> Response {
    let now = now.map_or("none".to_string(), |r| r.0.to_string());
    text(
        412,
        format!(
            "Precondition Failed: the config changed since revision {} (now at {now})",
            expected.0
        ),
    )
}

/// `PATCH /config`: JSON merge patch on the current config, written with CAS on its revision
/// (a concurrent edit → 409, never a lost update). With `If-Match`, the CAS is on the caller's
/// revision instead, and a mismatch is 412.
pub(crate) async fn patch_config(state: &ApiState, req: Req) -> Response {
    let expected = match if_match(&req) {
        Ok(e) => e,
        Err(msg) => return text(400, msg),
    };
    let patch = match read_json(req, false).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let Ok(Ok(view)) = tokio::time::timeout(Duration::from_secs(3), state.dcs.load()).await else {
        return text(503, "DCS is not available");
    };
    let current = view.config.as_ref().filter(|(_, r)| r.0 > 0);
    if let Some(want) = expected
        && current.map(|(_, r)| *r) != Some(want)
    {
        return changed_since(want, current.map(|(_, r)| *r));
    }
    let Some((cfg, rev)) = current else {
        return text(503, "No valid config in DCS");
    };
    let new = cfg.patched(&patch);
    match state.dcs.set_config(&new, Some(*rev)).await {
        Ok(true) => {
            state.wakeup();
            json(200, &Value::Object(new.0))
        }
        Ok(false) if expected.is_some() => changed_since(*rev, None),
        Ok(false) => text(409, "Conflict"),
        Err(_) => text(503, "failed to write config into DCS"),
    }
}

/// `PUT /config`: unconditional replace (skipped when identical); 502 when the write fails.
/// With `If-Match`, only while the config is still at that revision (else 412).
pub(crate) async fn put_config(state: &ApiState, req: Req) -> Response {
    let expected = match if_match(&req) {
        Ok(e) => e,
        Err(msg) => return text(400, msg),
    };
    let body = match read_json(req, false).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    let current = if expected.is_some() {
        // The precondition needs the truth, not the loop's last view.
        match tokio::time::timeout(Duration::from_secs(3), state.dcs.load()).await {
            Ok(Ok(v)) => v.config.clone(),
            _ => return text(503, "DCS is not available"),
        }
    } else {
        state.fresh_cluster().await.and_then(|v| v.config.clone())
    };
    if let Some(want) = expected
        && current.as_ref().map(|(_, r)| *r) != Some(want)
    {
        return changed_since(want, current.as_ref().map(|(_, r)| *r));
    }
    let new = DynamicConfig(body);
    if current.as_ref().map(|(c, _)| c) != Some(&new) {
        match state.dcs.set_config(&new, expected).await {
            Ok(true) => state.wakeup(),
            Ok(false) if let Some(want) = expected => return changed_since(want, None),
            _ => return text(502, "failed to write config into DCS"),
        }
    }
    json(200, &Value::Object(new.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn schedule_needs_timezone_and_future() {
        assert_eq!(
            parse_schedule(&Value::from("2999-01-01T10:00:00"), "switchover")
                .unwrap_err()
                .0,
            400
        );
        assert_eq!(
            parse_schedule(&Value::from("2000-01-01T10:00:00+00:00"), "switchover")
                .unwrap_err()
                .0,
            422
        );
        assert_eq!(
            parse_schedule(&Value::from("tomorrow"), "switchover")
                .unwrap_err()
                .0,
            422
        );
        assert!(parse_schedule(&Value::from("2999-01-01T10:00:00+02:00"), "switchover").is_ok());
        assert!(parse_schedule(&Value::from("2999-01-01 10:00:00+0200"), "switchover").is_ok());
    }

    #[test]
    fn candidates_with_nofailover_or_broken_watchdog_are_refused() {
        assert!(candidate_ok(&serde_json::json!({"role": "replica"})));
        assert!(!candidate_ok(
            &serde_json::json!({"tags": {"nofailover": true}})
        ));
        assert!(!candidate_ok(
            &serde_json::json!({"tags": {"failover_priority": 0}})
        ));
        assert!(!candidate_ok(&serde_json::json!({"watchdog_failed": true})));
    }
}
