//! Patroni 4's failsafe endpoints (patroni.md §3.7, §2.4): `GET /failsafe` shows the
//! `failsafe` key, `POST /failsafe` is the leader's announcement, received while the DCS is
//! lost. The receiving side only records the announcement on the shared
//! [`FailsafeBoard`](crate::status::FailsafeBoard) and answers from memory (no I/O), so the
//! leader's round stays well inside its 1 s bound; the HA loop acts on the board.

use axum::response::{IntoResponse, Response};
use serde_json::Value;

use super::{ApiState, Req, json, read_json, text};
use crate::status::{AgentStatus, FailsafeNotice};
use crate::types::MemberName;

fn failsafe_mode(st: &AgentStatus) -> bool {
    st.cluster
        .as_ref()
        .and_then(|c| c.config.as_ref())
        .is_some_and(|(c, _)| c.failsafe_mode())
}

/// `GET /failsafe`: 200 with the key's `member → api_url` object; 502 when failsafe is off.
pub(crate) fn get_failsafe(state: &ApiState) -> Response {
    let st = state.snapshot();
    if !failsafe_mode(&st) {
        return text(502, "Failsafe mode is not enabled");
    }
    let v = st
        .cluster
        .as_ref()
        .and_then(|c| c.failsafe.clone())
        .unwrap_or_else(|| Value::Object(Default::default()));
    json(200, &v)
}

/// `POST /failsafe` `{"name","conn_url","api_url"}` from the leader: 200 "Accepted" with the
/// header `lsn` (our received/replayed position), 500 "Running as a leader" when we ourselves
/// run as primary (two primaries must never accept each other), 502 when failsafe is off,
/// 400 without a `name`.
pub(crate) async fn post_failsafe(state: &ApiState, req: Req) -> Response {
    let st = state.snapshot();
    if !failsafe_mode(&st) {
        return text(502, "Failsafe mode is not enabled");
    }
    let body = match read_json(req, false).await {
        Ok(b) => b,
        Err(r) => return r,
    };
    if st.pg.is_running_primary() {
        return text(500, "Running as a leader");
    }
    let Some(name) = body
        .get("name")
        .and_then(Value::as_str)
        .filter(|n| !n.is_empty())
    else {
        return text(400, "name is required");
    };
    let field = |k: &str| {
        body.get(k)
            .and_then(Value::as_str)
            .unwrap_or_default()
            .to_string()
    };
    state.failsafe.record(FailsafeNotice {
        leader: MemberName::from(name),
        api_url: field("api_url"),
        conn_url: field("conn_url"),
        received: tokio::time::Instant::now(),
    });
    let lsn = st
        .pg
        .replay_lsn
        .max(st.pg.receive_lsn)
        .map(|l| l.0)
        .unwrap_or(0);
    let mut resp = text(200, "Accepted").into_response();
    if let Ok(v) = lsn.to_string().parse() {
        resp.headers_mut().insert("lsn", v);
    }
    resp
}
