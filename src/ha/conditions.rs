//! Persistent conditions of the agent (the DCS unreachable, the watchdog unusable, …) and the
//! rule for logging them: a condition is logged when it starts and when it ends, not on every
//! HA cycle that still sees it. With `loop_wait: 10` a condition that lasts an hour would
//! otherwise write 360 identical warnings and bury the lines an operator needs. (The per-cycle
//! decision sentence is logged every cycle on purpose, as Patroni does: it is the heartbeat.)
//!
//! [`Conditions`] is plain state; the HA loop calls [`Conditions::raise`] where it observes
//! a condition and [`Conditions::clear`] where it observes it gone.

use std::collections::BTreeMap;

use tracing::{error, info, warn};

/// A condition that can last many cycles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Condition {
    /// `load` of the cluster failed.
    DcsUnreachable,
    /// The leader could not renew its lock (DCS error or timeout).
    LeaderRenewalFailing,
    /// `watchdog.mode: automatic` and the device cannot be armed: leading without it.
    WatchdogUnusable,
    /// `watchdog.mode: required` and the device cannot be armed: refusing leadership.
    WatchdogRequiredUnusable,
    /// The armed watchdog refused a keepalive.
    WatchdogKeepaliveFailing,
}

impl Condition {
    fn started(self) -> &'static str {
        match self {
            Condition::DcsUnreachable => "failed to load the cluster from the DCS",
            Condition::LeaderRenewalFailing => "failed to update leader lock",
            Condition::WatchdogUnusable => "watchdog unusable, continuing without it",
            Condition::WatchdogRequiredUnusable => {
                "watchdog required but unusable: refusing leadership"
            }
            Condition::WatchdogKeepaliveFailing => "watchdog keepalive failed",
        }
    }

    fn ended(self) -> &'static str {
        match self {
            Condition::DcsUnreachable => "the DCS is reachable again",
            Condition::LeaderRenewalFailing => "leader lock updated again",
            Condition::WatchdogUnusable | Condition::WatchdogRequiredUnusable => {
                "watchdog usable again"
            }
            Condition::WatchdogKeepaliveFailing => "watchdog keepalives succeed again",
        }
    }

    /// Refusing leadership is an error an operator must act on; the others degrade.
    fn is_error(self) -> bool {
        self == Condition::WatchdogRequiredUnusable
    }
}

/// The conditions active now, each with the number of cycles it has been seen.
#[derive(Debug, Default)]
pub struct Conditions {
    active: BTreeMap<Condition, u64>,
}

impl Conditions {
    /// Records that `c` holds this cycle. Logs it (with `detail`, which must carry no secret)
    /// only when it was not active before. Returns whether it started now.
    pub fn raise(&mut self, c: Condition, detail: &dyn std::fmt::Display) -> bool {
        let seen = self.active.entry(c).or_insert(0);
        *seen += 1;
        if *seen > 1 {
            return false;
        }
        if c.is_error() {
            error!(error = %detail, "{}", c.started());
        } else {
            warn!(error = %detail, "{}", c.started());
        }
        true
    }

    /// Records that `c` no longer holds. Logs its end when it was active. Returns whether it
    /// was active.
    pub fn clear(&mut self, c: Condition) -> bool {
        match self.active.remove(&c) {
            Some(cycles) => {
                info!(cycles, "{}", c.ended());
                true
            }
            None => false,
        }
    }

    pub fn is_active(&self, c: Condition) -> bool {
        self.active.contains_key(&c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_condition_starts_once_and_ends_once() {
        let mut c = Conditions::default();
        assert!(c.raise(Condition::WatchdogUnusable, &"no device"));
        assert!(!c.raise(Condition::WatchdogUnusable, &"no device"));
        assert!(!c.raise(Condition::WatchdogUnusable, &"other detail"));
        assert!(c.is_active(Condition::WatchdogUnusable));
        assert!(c.clear(Condition::WatchdogUnusable));
        assert!(!c.clear(Condition::WatchdogUnusable));
        assert!(
            c.raise(Condition::WatchdogUnusable, &"again"),
            "a new episode"
        );
    }

    #[test]
    fn conditions_are_independent() {
        let mut c = Conditions::default();
        assert!(c.raise(Condition::DcsUnreachable, &"timeout"));
        assert!(c.raise(Condition::WatchdogUnusable, &"no device"));
        assert!(c.clear(Condition::DcsUnreachable));
        assert!(c.is_active(Condition::WatchdogUnusable));
    }
}
