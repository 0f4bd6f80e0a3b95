//! The lease rules of `ha::timing`, row by row: until when a leader whose renewals fail may
//! keep PostgreSQL writable (the demotion deadline: last acknowledged send + min(ttl, fence
//! timeout) − STOP_RESERVE), and how long each renewal attempt may take so that none ends
//! after it.

use std::time::Duration;

use pgherd::ha::timing::{
    FAILSAFE_POST_TIMEOUT, RenewalBudget, STOP_RESERVE, demotion_deadline, renewal_budget,
};
use tokio::time::Instant;

const TTL: Duration = Duration::from_secs(30);
const RETRY: Duration = Duration::from_secs(10);

fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}

fn s(secs: u64) -> Duration {
    Duration::from_secs(secs)
}

#[test]
fn the_demotion_deadline_keeps_the_stop_reserve_before_the_lease_or_the_fence() {
    let t0 = Instant::now();
    // (what, ttl, fence timeout, expected deadline after the last acknowledged send)
    let rows: &[(&str, Duration, Option<Duration>, Duration)] = &[
        (
            "no fence: the lease less the stop reserve",
            TTL,
            None,
            TTL - STOP_RESERVE,
        ),
        (
            "a fence armed for ttl − safety_margin fires first: demote before it",
            TTL,
            Some(s(20)),
            s(20) - STOP_RESERVE,
        ),
        (
            "a fence longer than the lease does not extend it",
            TTL,
            Some(s(40)),
            TTL - STOP_RESERVE,
        ),
        (
            "ttl 5 without a fence: four seconds of lease to ride out a DCS hiccup",
            s(5),
            None,
            s(4),
        ),
        (
            "a window shorter than the reserve: demote at once",
            s(5),
            Some(ms(500)),
            Duration::ZERO,
        ),
    ];
    for (what, ttl, fence, want) in rows {
        assert_eq!(demotion_deadline(t0, *ttl, *fence), t0 + *want, "{what}");
    }
}

#[test]
fn renewal_attempts_use_the_lease_up_to_the_demotion_deadline() {
    let t0 = Instant::now();
    // (what, held_lock, last success sent at t0 + .. ms, attempt sent at t0 + .. ms, fence,
    //  expected)
    type Row = (
        &'static str,
        bool,
        Option<u64>,
        u64,
        Option<Duration>,
        RenewalBudget,
    );
    let rows: &[Row] = &[
        (
            "a fresh leader gets the full retry_timeout",
            true,
            Some(0),
            1_000,
            None,
            RenewalBudget::Attempt(RETRY),
        ),
        (
            "a non-leader (leader race / re-attach) gets retry_timeout",
            false,
            Some(0),
            25_000,
            None,
            RenewalBudget::Attempt(RETRY),
        ),
        (
            "no previous success: retry_timeout",
            true,
            None,
            0,
            None,
            RenewalBudget::Attempt(RETRY),
        ),
        (
            "exactly at the cap: deadline − sent = retry_timeout",
            true,
            Some(0),
            19_000,
            None,
            RenewalBudget::Attempt(RETRY),
        ),
        (
            "a retry after retry_timeout of failures still has lease left (Patroni demotes here)",
            true,
            Some(0),
            21_000,
            None,
            RenewalBudget::Attempt(s(8)),
        ),
        (
            "the last attempt gets only what is left before the deadline",
            true,
            Some(0),
            28_900,
            None,
            RenewalBudget::Attempt(ms(100)),
        ),
        (
            "at the demotion deadline: too late, the lease still lives",
            true,
            Some(0),
            29_000,
            None,
            RenewalBudget::TooLate {
                lock_expired: false,
            },
        ),
        (
            "between the deadline and the lease end: too late, not expired",
            true,
            Some(0),
            29_500,
            None,
            RenewalBudget::TooLate {
                lock_expired: false,
            },
        ),
        (
            "at the lease end: too late, and the lock may be someone else's",
            true,
            Some(0),
            30_000,
            None,
            RenewalBudget::TooLate { lock_expired: true },
        ),
        (
            "long after the lease end: expired",
            true,
            Some(0),
            300_000,
            None,
            RenewalBudget::TooLate { lock_expired: true },
        ),
        (
            "an armed fence (20 s) caps the attempt before it fires",
            true,
            Some(0),
            18_000,
            Some(s(20)),
            RenewalBudget::Attempt(s(1)),
        ),
        (
            "at the fence's deadline less the reserve: too late, the lease still lives",
            true,
            Some(0),
            19_000,
            Some(s(20)),
            RenewalBudget::TooLate {
                lock_expired: false,
            },
        ),
        (
            "a fence does not matter without a held lock",
            false,
            Some(0),
            25_000,
            Some(s(20)),
            RenewalBudget::Attempt(RETRY),
        ),
    ];
    for (what, held, last, sent, fence, want) in rows {
        let got = renewal_budget(
            *held,
            last.map(|l| t0 + ms(l)),
            t0 + ms(*sent),
            TTL,
            RETRY,
            *fence,
            false,
        );
        assert_eq!(got, *want, "{what}");
    }
}

#[test]
fn no_renewal_attempt_of_a_leader_can_end_after_the_demotion_deadline() {
    // The safety half of the rule over a grid of timings: whatever the attempt's send instant,
    // its budget ends at or before the deadline, which is at least STOP_RESERVE before the
    // lease (and the fence) can run out.
    let t0 = Instant::now();
    for ttl in [5u64, 10, 30] {
        for retry in [1u64, 2, 3, 10] {
            for fence in [None, Some(ttl - 2), Some(ttl / 2), Some(ttl + 5)] {
                let fence = fence.map(s);
                let deadline = demotion_deadline(t0, s(ttl), fence);
                assert!(deadline + STOP_RESERVE <= t0 + s(ttl));
                if let Some(f) = fence {
                    assert!(deadline + STOP_RESERVE <= t0 + f.max(STOP_RESERVE));
                }
                for failsafe in [false, true] {
                    // With failsafe_mode the round (≤ FAILSAFE_POST_TIMEOUT) follows a failed
                    // renewal and must also end by the deadline.
                    let round = if failsafe {
                        FAILSAFE_POST_TIMEOUT
                    } else {
                        Duration::ZERO
                    };
                    for sent in (0..=ttl * 1000 + 500).step_by(250) {
                        let at = t0 + ms(sent);
                        let b =
                            renewal_budget(true, Some(t0), at, s(ttl), s(retry), fence, failsafe);
                        match b {
                            RenewalBudget::Attempt(b) => assert!(
                                b <= s(retry) && at + b + round <= deadline,
                                "ttl {ttl} at {sent} failsafe {failsafe}"
                            ),
                            RenewalBudget::TooLate { lock_expired } => {
                                assert!(
                                    at + round >= deadline,
                                    "ttl {ttl} at {sent}: refused early"
                                );
                                assert_eq!(lock_expired, at >= t0 + s(ttl));
                            }
                        }
                    }
                }
            }
        }
    }
}

#[test]
fn with_failsafe_mode_the_renewal_stops_early_enough_for_the_failsafe_round() {
    let t0 = Instant::now();
    let b = |at_ms: u64| renewal_budget(true, Some(t0), t0 + ms(at_ms), TTL, RETRY, None, true);
    // Deadline 29 s; the round needs FAILSAFE_POST_TIMEOUT (1 s) before it.
    assert_eq!(b(27_000), RenewalBudget::Attempt(s(1)));
    assert_eq!(
        b(28_000),
        RenewalBudget::TooLate {
            lock_expired: false
        }
    );
    assert_eq!(b(1_000), RenewalBudget::Attempt(RETRY));
}

#[test]
fn renewal_budget_with_zero_retry_timeout_never_attempts() {
    let t0 = Instant::now();
    assert_eq!(
        renewal_budget(false, None, t0, TTL, Duration::ZERO, None, false),
        RenewalBudget::TooLate { lock_expired: true }
    );
}
