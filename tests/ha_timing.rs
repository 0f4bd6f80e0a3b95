//! The renewal budget (`ha::timing::renewal_budget`), row by row: how long a leader may spend
//! renewing its lock so that a failed renewal still leaves retry_timeout to stop PostgreSQL
//! before the lease (last successful renewal sent + ttl) can lapse.

use std::time::Duration;

use pgherd::ha::timing::{RenewalBudget, renewal_budget};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(30);
const RETRY: Duration = Duration::from_secs(10);

fn s(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

#[test]
fn renewal_budget_leaves_retry_timeout_before_the_lease_lapses() {
    let t0 = Instant::now();
    // (what, held_lock, last success sent at t0 + .., renewal sent at t0 + .., expected)
    let rows: &[(&str, bool, Option<u64>, u64, RenewalBudget)] = &[
        (
            "a fresh leader gets the full retry_timeout",
            true,
            Some(0),
            1,
            RenewalBudget::Attempt(RETRY),
        ),
        (
            "a non-leader (leader race / re-attach) gets retry_timeout",
            false,
            Some(0),
            25,
            RenewalBudget::Attempt(RETRY),
        ),
        (
            "no previous success: retry_timeout",
            true,
            None,
            0,
            RenewalBudget::Attempt(RETRY),
        ),
        (
            "exactly at the cap: lease end − sent − retry = retry",
            true,
            Some(0),
            10,
            RenewalBudget::Attempt(RETRY),
        ),
        (
            "late renewal: the budget shrinks to lease end − sent − retry",
            true,
            Some(0),
            15,
            RenewalBudget::Attempt(s(5)),
        ),
        (
            "retry_timeout before the lease end: too late, lease not yet expired",
            true,
            Some(0),
            20,
            RenewalBudget::TooLate {
                lock_expired: false,
            },
        ),
        (
            "between the reserve and the lease end: too late, not expired",
            true,
            Some(0),
            29,
            RenewalBudget::TooLate {
                lock_expired: false,
            },
        ),
        (
            "at the lease end: too late, and the lock may be someone else's",
            true,
            Some(0),
            30,
            RenewalBudget::TooLate { lock_expired: true },
        ),
        (
            "long after the lease end: expired",
            true,
            Some(0),
            300,
            RenewalBudget::TooLate { lock_expired: true },
        ),
    ];
    for (what, held, last, sent, want) in rows {
        let got = renewal_budget(*held, last.map(|l| t0 + s(l)), t0 + s(*sent), TTL, RETRY);
        assert_eq!(got, *want, "{what}");
    }
}

#[test]
fn renewal_budget_with_zero_retry_timeout_never_attempts() {
    let t0 = Instant::now();
    assert_eq!(
        renewal_budget(false, None, t0, TTL, Duration::ZERO),
        RenewalBudget::TooLate { lock_expired: true }
    );
}
