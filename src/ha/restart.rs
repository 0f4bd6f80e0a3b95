//! Pure rules of `POST /restart` (now or scheduled): whether the request's conditions hold on
//! this node, and whether a scheduled restart is due. The executor (`ha_loop/commands.rs`)
//! observes PostgreSQL, asks these functions and starts the restart.
//!
//! No I/O and no clock: `now` is an input.

use chrono::{DateTime, Utc};

use crate::pg::Role;
use crate::status::RestartRequest;

/// Whether a restart request's conditions hold (Patroni's `restart_conditions`): every field
/// the request sets must match, an absent field matches anything.
///
/// - `role`: our role now; `master` is Patroni's old name of `primary` and matches it, so
///   old `patronictl restart --role master` calls keep working;
/// - `restart_pending: true`: only when PostgreSQL reports settings waiting for a restart
///   (`pending_restart`) — a rolling "apply pending changes" restart must not bounce nodes
///   that have nothing to apply;
/// - `postgres_version`: only when the running server is *older* than the given version (the
///   point of a restart after a minor upgrade); an unparsable version or an unknown server
///   version does not block the restart.
pub fn restart_conditions_ok(
    req: &RestartRequest,
    role: Role,
    pending_restart: bool,
    server_version: Option<u32>,
) -> bool {
    if let Some(want) = &req.role {
        let mine = role.as_str();
        if !(want == mine || (want == "master" && mine == "primary")) {
            return false;
        }
    }
    if req.restart_pending == Some(true) && !pending_restart {
        return false;
    }
    if let (Some(want), Some(have)) = (&req.postgres_version, server_version)
        && let Some(w) = parse_pg_version(want)
        && have >= w
    {
        return false;
    }
    true
}

/// Whether a scheduled restart runs this cycle: one is scheduled, its time has come
/// (`at <= now`, so a restart scheduled for exactly now runs now), and no long action is
/// running — a restart started beside a basebackup or a promotion would fight it for the data
/// directory; it stays scheduled and runs on a later cycle.
pub fn scheduled_restart_due(
    scheduled_at: Option<DateTime<Utc>>,
    now: DateTime<Utc>,
    action_running: bool,
) -> bool {
    scheduled_at.is_some_and(|t| t <= now) && !action_running
}

/// `"15"`, `"15.4"`, `"9.6.24"` → `server_version_num` (`150000`, `150004`, `90624`). Since
/// PostgreSQL 10 the version has two parts (major.minor), before it three; a bare major below
/// 10 is ambiguous (`9` = 9.0? 9.6?) and yields `None`.
pub fn parse_pg_version(s: &str) -> Option<u32> {
    let parts: Vec<u32> = s
        .split('.')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    match parts.as_slice() {
        [major] if *major >= 10 => Some(major * 10000),
        [major, minor] if *major >= 10 => Some(major * 10000 + minor),
        [major, minor] => Some(major * 10000 + minor * 100),
        [major, minor, patch] => Some(major * 10000 + minor * 100 + patch),
        _ => None,
    }
}
