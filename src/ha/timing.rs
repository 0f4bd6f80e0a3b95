//! Pure timing rules of the leader lock, kept out of the executor so they can be
//! table-tested (`tests/ha_timing.rs`) and read in one place. No clock is read here: the
//! caller passes every instant.
//!
//! # The rule: a leader keeps renewing for as long as its lease can only be its own
//!
//! A renewal whose keepalive etcd acknowledged keeps our lease — and with it the leader key,
//! which is attached to the lease — alive until at least `sent + ttl`, where `sent` is when the
//! agent *sent* it: etcd counts the TTL from when it received the keepalive, which is later,
//! and an etcd leader change extends every lease by a full TTL rather than shortening one. No
//! other node can create the leader key while the lease lives. So a leader whose renewals fail
//! may keep PostgreSQL writable until the **demotion deadline**
//! `last acknowledged send + min(ttl, fence timeout) − STOP_RESERVE`, retrying the renewal the
//! whole time, and must start stopping PostgreSQL at that instant at the latest:
//!
//! - `STOP_RESERVE` covers the stop itself (see its doc), so PostgreSQL is down before the
//!   lease can lapse and before another node can be promoted;
//! - the fence (or watchdog device), when armed, fires `ttl − safety_margin` after the same
//!   send instant; demoting before it keeps a clean demotion from turning into a fenced
//!   immediate stop (or a host reset) when the DCS comes back a moment too late.
//!
//! Patroni demotes as soon as one `update_leader` fails (after `retry_timeout`), however much
//! of the lease is left; at ttl 5 / loop_wait 1 / retry_timeout 2 that turned an etcd leader
//! election (1–2 s of failed keepalives) into a false demotion. Using the whole lease gives the
//! DCS `ttl − STOP_RESERVE − loop_wait` of outage, at worst, before a demotion instead of
//! `retry_timeout`.

use std::time::Duration;

use tokio::time::Instant;

/// Time kept at the end of the lease to stop PostgreSQL after the renewals ran out.
///
/// Why 1 s: the demotion on a lost DCS is an immediate stop, a SIGQUIT that ends every backend
/// (no checkpoint, nothing flushed) within milliseconds; 1 s also covers a loaded host's
/// scheduling delay between the deadline and the signal. A host too stalled to manage that is
/// the fence's (or watchdog's) job, which fires independently of the agent.
pub const STOP_RESERVE: Duration = Duration::from_secs(1);

/// Bound of one `POST /failsafe` to each failsafe member (all in parallel). Why 1 s, not
/// Patroni's 2 s with one retry: a member answers from memory (the API records the announcement
/// and replies, no I/O), so 1 s is a round trip plus a loaded host's scheduling delay; and with
/// `failsafe_mode` on, the renewal stops this much before the demotion deadline so that a
/// refused round still demotes in time — at ttl 5 a 4 s round would leave no lease to renew in.
pub const FAILSAFE_POST_TIMEOUT: Duration = Duration::from_secs(1);

/// Pause between two renewal attempts inside the lease. Why: a refused connection fails at
/// once, and a fully down etcd must not be hammered in a tight loop; 100 ms costs at most a
/// tenth of a second of the remaining lease.
pub const RENEWAL_RETRY_PAUSE: Duration = Duration::from_millis(100);

/// The instant by which a leader whose renewals keep failing must start stopping PostgreSQL:
/// `last_ok_sent + min(ttl, fence_timeout) − STOP_RESERVE` (see the module doc for the proof).
/// `fence_timeout` is the armed fence's (or watchdog's) timeout, counted from the same send
/// instant; `None` when nothing is armed.
pub fn demotion_deadline(
    last_ok_sent: Instant,
    ttl: Duration,
    fence_timeout: Option<Duration>,
) -> Instant {
    let window = fence_timeout.map_or(ttl, |f| f.min(ttl));
    last_ok_sent + window.saturating_sub(STOP_RESERVE)
}

/// What the leader may spend on renewing its lock this cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RenewalBudget {
    /// Try, and give up on this attempt after this long.
    Attempt(Duration),
    /// Do not try: the demotion deadline has passed. `lock_expired` says the lease deadline
    /// itself has passed, so the lock may already be somebody else's.
    TooLate { lock_expired: bool },
}

/// The budget of one renewal attempt sent at `now` by an agent whose last successful renewal
/// was sent at `last_ok_sent`: at most `retry_timeout` (the bound of every DCS call), and never
/// past the [`demotion_deadline`] — an attempt that succeeded after it would come too late to
/// matter, one that failed would leave no time to stop PostgreSQL. The loop calls this again
/// after every failed attempt, so together the attempts use the lease up to the deadline.
/// Without a held lock or a previous success the budget is simply `retry_timeout`.
///
/// With `failsafe` (failsafe_mode on), the attempts stop [`FAILSAFE_POST_TIMEOUT`] earlier:
/// the failsafe round that follows a failed renewal must end by the demotion deadline.
pub fn renewal_budget(
    held_lock: bool,
    last_ok_sent: Option<Instant>,
    now: Instant,
    ttl: Duration,
    retry_timeout: Duration,
    fence_timeout: Option<Duration>,
    failsafe: bool,
) -> RenewalBudget {
    let Some(t) = last_ok_sent.filter(|_| held_lock) else {
        return if retry_timeout.is_zero() {
            RenewalBudget::TooLate { lock_expired: true }
        } else {
            RenewalBudget::Attempt(retry_timeout)
        };
    };
    let mut stop_at = demotion_deadline(t, ttl, fence_timeout);
    if failsafe {
        stop_at = stop_at
            .checked_sub(FAILSAFE_POST_TIMEOUT)
            .unwrap_or(stop_at)
            .max(t);
    }
    let left = stop_at.saturating_duration_since(now);
    if left.is_zero() {
        RenewalBudget::TooLate {
            lock_expired: now >= t + ttl,
        }
    } else {
        RenewalBudget::Attempt(left.min(retry_timeout))
    }
}
