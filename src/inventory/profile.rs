//! Timing profiles: one knob (`profile: fast|norm|safe|wide`) that derives both the agent's HA
//! timing (ttl, loop_wait, retry_timeout, primary_start_timeout, watchdog safety_margin) and
//! HAProxy's health-check cadence (inter, fastinter, downinter, rise, fall), so the two can
//! never drift apart (the idea comes from pigsty's `pg_rto`; the numbers are ours).
//!
//! | profile | ttl | loop_wait | retry_timeout | primary_start_timeout | safety_margin | inter / fastinter / downinter | rise / fall |
//! |---------|-----|-----------|---------------|-----------------------|---------------|-------------------------------|-------------|
//! | fast    | 10  | 2         | 3             | 15                    | 3             | 1s / 500ms / 1s               | 1 / 2       |
//! | norm    | 20  | 3         | 5             | 30                    | 5             | 2s / 1s / 2s                  | 2 / 2       |
//! | safe    | 30  | 10        | 10            | 60                    | 10            | 3s / 1500ms / 3s              | 3 / 3       |
//! | wide    | 60  | 10        | 20            | 120                   | 15            | 4s / 2s / 4s                  | 3 / 3       |
//!
//! Every row obeys `loop_wait + 2·retry_timeout ≤ ttl` (see [`crate::config::Timing::check`])
//! and `ttl − safety_margin ≥ loop_wait + retry_timeout`: the watchdog (armed for
//! `ttl − safety_margin`) must outlast the slowest healthy cycle (a sleep plus a full DCS retry),
//! otherwise it would reset a healthy primary. HAProxy's `fall × fastinter` is kept below
//! `loop_wait` so that a demoted primary leaves the write pool within about one agent cycle;
//! the write pool itself checks far faster (see [`Profile::haproxy_primary_check`]).

use crate::config::Timing;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Profile {
    /// LAN, low-latency DCS: fastest failover, least tolerance for hiccups.
    Fast,
    /// Default: tolerates a few seconds of DCS or network trouble.
    #[default]
    Norm,
    /// Busy or virtualised hosts: fewer spurious failovers, slower recovery.
    Safe,
    /// Stretched clusters (WAN between members).
    Wide,
}

impl Profile {
    pub const ALL: [Profile; 4] = [Profile::Fast, Profile::Norm, Profile::Safe, Profile::Wide];

    pub fn parse(s: &str) -> Option<Profile> {
        Profile::ALL.into_iter().find(|p| p.as_str() == s)
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Profile::Fast => "fast",
            Profile::Norm => "norm",
            Profile::Safe => "safe",
            Profile::Wide => "wide",
        }
    }

    /// The agent's timing for this profile.
    pub fn ha_timing(self) -> HaTiming {
        let (ttl, loop_wait, retry_timeout, primary_start_timeout, safety_margin) = match self {
            Profile::Fast => (10, 2, 3, 15, 3),
            Profile::Norm => (20, 3, 5, 30, 5),
            Profile::Safe => (30, 10, 10, 60, 10),
            Profile::Wide => (60, 10, 20, 120, 15),
        };
        HaTiming {
            ttl,
            loop_wait,
            retry_timeout,
            primary_start_timeout,
            safety_margin,
        }
    }

    /// HAProxy's health-check cadence for this profile (the replicas' pool).
    pub fn haproxy_check(self) -> HaproxyCheck {
        HaproxyCheck::from_row(match self {
            Profile::Fast => (1000, 500, 1000, 1, 2, 5000, 4000),
            Profile::Norm => (2000, 1000, 2000, 2, 2, 5000, 4000),
            Profile::Safe => (3000, 1500, 3000, 3, 3, 5000, 4000),
            Profile::Wide => (4000, 2000, 4000, 3, 3, 5000, 4000),
        })
    }

    /// The primary pool's cadence: much faster, because it alone decides how long writes stop
    /// after a switchover or failover (the agents hand over in a fraction of a second; with the
    /// replicas' cadence HAProxy needed up to a second more to notice). Why these numbers:
    /// - `rise 1`: only the agent holding the leader key answers 200 on `/primary`, so one
    ///   success is proof enough, and the new primary joins within one `downinter`;
    /// - `fall 2` (3 for the slower profiles): one lost check must not drop the primary, since
    ///   `on-marked-down shutdown-sessions` then cuts every client session;
    /// - `timeout check` 1–3 s instead of 5 s: an agent answers `/primary` from its published
    ///   snapshot in milliseconds; a frozen one (its PostgreSQL fenced) must leave the pool in
    ///   seconds, not after two 5 s timeouts;
    /// - `timeout connect` 50 ms (`fast`, one LAN, where the kernel completes a TCP handshake in
    ///   well under a millisecond whatever the server process is doing) to 2 s (`wide`) with
    ///   `option redispatch`: a connection to the old primary, refused once it stopped, is
    ///   retried after HAProxy's turn-around pause of min(timeout connect, 1 s) and the last
    ///   retry goes to another server, the new primary once it is up. With the default 4 s that
    ///   pause alone was a whole second of the switchover's write outage; at 200 ms a client
    ///   that hit the refusal still waited 0.2 s. Measured with release agents on the lab
    ///   (`pgherd drill switchover`): 1.15–1.25 s at 4 s, 0.27–0.53 s at 200 ms (bimodal: the
    ///   slow runs are the ones whose probe met the refusal), 0.24–0.36 s at 50 ms. The check
    ///   connections use min(timeout connect, inter) as well: a lost SYN costs a check either
    ///   way (its retransmission takes 1 s), so 50 ms drops no primary that 200 ms kept.
    ///
    /// Cost: each balancer sends about 1000 / inter checks a second to each agent (10 for
    /// `fast`): a new TCP connection and one `OPTIONS` answered from memory, negligible for
    /// HAProxy and the agent alike.
    pub fn haproxy_primary_check(self) -> HaproxyCheck {
        HaproxyCheck::from_row(match self {
            Profile::Fast => (100, 100, 100, 1, 2, 1000, 50),
            Profile::Norm => (200, 100, 200, 1, 2, 1000, 500),
            Profile::Safe => (500, 250, 500, 1, 3, 2000, 1000),
            Profile::Wide => (1000, 500, 1000, 1, 3, 3000, 2000),
        })
    }
}

impl std::fmt::Display for Profile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The agent's HA timing, in seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HaTiming {
    pub ttl: u64,
    pub loop_wait: u64,
    pub retry_timeout: u64,
    pub primary_start_timeout: u64,
    /// Watchdog fires `ttl − safety_margin` seconds after the last keepalive (`-1`: at ttl/2).
    pub safety_margin: i64,
}

impl HaTiming {
    pub fn triple(&self) -> Timing {
        Timing {
            ttl: self.ttl,
            loop_wait: self.loop_wait,
            retry_timeout: self.retry_timeout,
        }
    }

    /// Seconds the watchdog waits for a keepalive before resetting the host.
    pub fn watchdog_timeout(&self) -> i64 {
        if self.safety_margin < 0 {
            (self.ttl / 2) as i64
        } else {
            self.ttl as i64 - self.safety_margin
        }
    }

    /// The timing rules, as messages naming the numbers. The watchdog rule only matters when a
    /// watchdog is used, hence the flag.
    pub fn check(&self, watchdog_used: bool) -> Result<(), String> {
        self.triple().check()?;
        if self.safety_margin < -1 {
            return Err(format!(
                "safety_margin must be -1 or >= 0 (got {})",
                self.safety_margin
            ));
        }
        let slowest_cycle = (self.loop_wait + self.retry_timeout) as i64;
        if watchdog_used && self.watchdog_timeout() < slowest_cycle {
            // Why: the agent pings the watchdog once per cycle and a healthy cycle can take a full
            // sleep plus a full DCS retry; a shorter watchdog would reset a healthy primary.
            return Err(format!(
                "watchdog timeout ttl - safety_margin = {} is shorter than loop_wait + \
                 retry_timeout = {slowest_cycle}; lower safety_margin or raise ttl",
                self.watchdog_timeout()
            ));
        }
        Ok(())
    }
}

/// HAProxy `default-server` check timing (and the listen's `timeout check`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct HaproxyCheck {
    pub inter_ms: u64,
    pub fastinter_ms: u64,
    pub downinter_ms: u64,
    pub rise: u32,
    pub fall: u32,
    /// How long one check may take before it counts as failed.
    pub timeout_ms: u64,
    /// The pool's `timeout connect` to a server, which also sets HAProxy's pause before it
    /// retries a failed connection (min(timeout connect, 1 s)).
    pub connect_ms: u64,
}

impl HaproxyCheck {
    /// From a profile table row: (inter, fastinter, downinter, rise, fall, timeout, connect),
    /// in ms.
    fn from_row(
        (inter_ms, fastinter_ms, downinter_ms, rise, fall, timeout_ms, connect_ms): CheckRow,
    ) -> Self {
        HaproxyCheck {
            inter_ms,
            fastinter_ms,
            downinter_ms,
            rise,
            fall,
            timeout_ms,
            connect_ms,
        }
    }
}

type CheckRow = (u64, u64, u64, u32, u32, u64, u64);

/// Parses an HAProxy time (`500ms`, `2s`, `1m`, bare number = ms) into milliseconds.
pub fn parse_haproxy_duration(s: &str) -> Option<u64> {
    let s = s.trim();
    let split = s.find(|c: char| !c.is_ascii_digit()).unwrap_or(s.len());
    let (num, unit) = s.split_at(split);
    let n: u64 = num.parse().ok()?;
    let mult = match unit {
        "" | "ms" => 1,
        "s" => 1000,
        "m" => 60_000,
        _ => return None,
    };
    let ms = n.checked_mul(mult)?;
    (ms > 0).then_some(ms)
}

/// Formats milliseconds the way an operator would write them in haproxy.cfg.
pub fn format_haproxy_duration(ms: u64) -> String {
    if ms.is_multiple_of(1000) {
        format!("{}s", ms / 1000)
    } else {
        format!("{ms}ms")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_profile_obeys_the_timing_rules_with_a_watchdog() {
        for p in Profile::ALL {
            p.ha_timing()
                .check(true)
                .unwrap_or_else(|e| panic!("{p}: {e}"));
        }
    }

    #[test]
    fn haproxy_marks_a_demoted_primary_down_within_one_agent_cycle() {
        for p in Profile::ALL {
            let c = p.haproxy_check();
            let t = p.ha_timing();
            assert!(
                u64::from(c.fall) * c.fastinter_ms <= t.loop_wait * 1000,
                "{p}"
            );
        }
    }

    #[test]
    fn the_primary_pool_learns_a_new_primary_faster_than_the_replicas_pool() {
        for p in Profile::ALL {
            let (pc, rc) = (p.haproxy_primary_check(), p.haproxy_check());
            assert!(
                pc.downinter_ms * u64::from(pc.rise) < rc.downinter_ms,
                "{p}"
            );
            assert!(
                pc.inter_ms + pc.fastinter_ms * u64::from(pc.fall - 1)
                    <= rc.inter_ms + rc.fastinter_ms * u64::from(rc.fall - 1),
                "{p}"
            );
            assert!(
                pc.fall >= 2,
                "{p}: one lost check must not drop the primary"
            );
            assert!(pc.timeout_ms < rc.timeout_ms, "{p}");
        }
    }

    #[test]
    fn parses_haproxy_durations() {
        assert_eq!(parse_haproxy_duration("500ms"), Some(500));
        assert_eq!(parse_haproxy_duration("2s"), Some(2000));
        assert_eq!(parse_haproxy_duration("1m"), Some(60_000));
        assert_eq!(parse_haproxy_duration("750"), Some(750));
        assert_eq!(parse_haproxy_duration("0s"), None);
        assert_eq!(parse_haproxy_duration("2h"), None);
        assert_eq!(parse_haproxy_duration("fast"), None);
        assert_eq!(format_haproxy_duration(1500), "1500ms");
        assert_eq!(format_haproxy_duration(2000), "2s");
    }
}
