//! Pure timing rules of the leader lock, kept out of the executor so they can be
//! table-tested (`tests/ha_timing.rs`) and read in one place. No clock is read here: the
//! caller passes every instant.

use std::time::Duration;

use tokio::time::Instant;

/// What the leader may spend on renewing its lock this cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalBudget {
    /// Try, and give up after this long.
    Attempt(Duration),
    /// Do not try: the lease is too close to expiry (or past it). `lock_expired` says the
    /// lease deadline itself has passed, so the lock may already be somebody else's.
    TooLate { lock_expired: bool },
}

/// The time budget of a renewal sent at `sent` by an agent whose last successful renewal was
/// sent at `last_ok_sent` (the lease then lives until `last_ok_sent + ttl`).
///
/// Why the cap: if this renewal fails, at least `retry_timeout` must remain before the lease
/// can lapse, because that is the time reserved to stop PostgreSQL before another node may
/// take the lock (see `decide.rs` `dcs_unreachable`). So the budget is
/// `min(retry_timeout, lease_end − sent − retry_timeout)`; when that is zero the renewal is
/// not attempted at all (a renewal that succeeds after the deadline would be worthless, one
/// that fails would leave no time to demote). Without a held lock or a previous success the
/// budget is simply `retry_timeout`, the bound of every DCS call.
pub fn renewal_budget(
    held_lock: bool,
    last_ok_sent: Option<Instant>,
    sent: Instant,
    ttl: Duration,
    retry_timeout: Duration,
) -> RenewalBudget {
    let budget = match last_ok_sent {
        Some(t) if held_lock => (t + ttl)
            .saturating_duration_since(sent)
            .saturating_sub(retry_timeout)
            .min(retry_timeout),
        _ => retry_timeout,
    };
    if budget.is_zero() {
        RenewalBudget::TooLate {
            lock_expired: last_ok_sent.is_none_or(|t| sent >= t + ttl),
        }
    } else {
        RenewalBudget::Attempt(budget)
    }
}
