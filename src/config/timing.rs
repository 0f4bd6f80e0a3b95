//! The HA timing triple (`ttl`, `loop_wait`, `retry_timeout`) and the rule it must keep.

use serde_json::Value;

/// The HA timing triple and its safety rule.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Timing {
    pub ttl: u64,
    pub loop_wait: u64,
    pub retry_timeout: u64,
}

/// Smallest supported lease TTL. Patroni refuses anything under 20 s; pgherd's renewals are
/// cheap (one gRPC keepalive on an open HTTP/2 channel) so 5 s leases are safe on a LAN.
pub const MIN_TTL: u64 = 5;

impl Timing {
    pub fn from_dcs(dcs: &serde_json::Map<String, Value>) -> Timing {
        let c = crate::dcs::DynamicConfig(dcs.clone());
        Timing {
            ttl: c.ttl(),
            loop_wait: c.loop_wait(),
            retry_timeout: c.retry_timeout(),
        }
    }

    /// `loop_wait + 2·retry_timeout ≤ ttl`: a leader whose renewal starts failing at the top of
    /// a cycle has spent at most `loop_wait + retry_timeout` before it demotes, leaving at least
    /// `retry_timeout` for the demotion itself before its lease can expire and another node can
    /// take the lock. Unlike Patroni we refuse bad values instead of silently adjusting them.
    pub fn check(&self) -> Result<(), String> {
        if self.ttl < MIN_TTL {
            return Err(format!(
                "ttl {} is below the minimum of {MIN_TTL}",
                self.ttl
            ));
        }
        if self.loop_wait < 1 {
            return Err("loop_wait must be at least 1".into());
        }
        if self.retry_timeout < 1 {
            return Err("retry_timeout must be at least 1".into());
        }
        if self.loop_wait + 2 * self.retry_timeout > self.ttl {
            return Err(format!(
                "loop_wait + 2*retry_timeout must be <= ttl (got {} + 2*{} > {})",
                self.loop_wait, self.retry_timeout, self.ttl
            ));
        }
        Ok(())
    }
}
