//! Domain newtypes shared by every layer: WAL positions, timelines, member names, lease ids.
//!
//! They exist so that an LSN can never be passed where a timeline is expected, and so that the
//! Patroni spelling rules (slot names derived from member names, `X/X` LSN text) live in one place.

use std::fmt;

use serde::{Deserialize, Serialize};

/// A PostgreSQL WAL position in bytes (what Patroni writes as `xlog_location`).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Lsn(pub u64);

impl Lsn {
    /// Parses PostgreSQL's `XXXXXXXX/XXXXXXXX` text form.
    pub fn parse_pg(s: &str) -> Option<Lsn> {
        let (hi, lo) = s.trim().split_once('/')?;
        let hi = u64::from_str_radix(hi, 16).ok()?;
        let lo = u64::from_str_radix(lo, 16).ok()?;
        if hi > u32::MAX as u64 || lo > u32::MAX as u64 {
            return None;
        }
        Some(Lsn((hi << 32) | lo))
    }

    /// How many bytes `self` is behind `ahead` (0 when not behind).
    pub fn lag_behind(self, ahead: Lsn) -> u64 {
        ahead.0.saturating_sub(self.0)
    }
}

impl fmt::Display for Lsn {
    /// PostgreSQL's text form, as `GET /cluster` shows it (`0/4000060`).
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:X}/{:X}", self.0 >> 32, self.0 & 0xffff_ffff)
    }
}

/// A PostgreSQL timeline id.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
#[serde(transparent)]
pub struct Timeline(pub u32);

impl fmt::Display for Timeline {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)
    }
}

/// A cluster member's name (`name:` in the agent config, `members/<name>` in etcd).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(transparent)]
pub struct MemberName(pub String);

impl MemberName {
    pub fn new(s: impl Into<String>) -> Self {
        MemberName(s.into())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The physical replication slot name Patroni derives from a member name: lowercase, `-` and
    /// `.` become `_`, any other character outside `[a-z0-9_]` becomes `u%04x`... (Patroni uses
    /// the decimal code point zero-padded to 4), truncated to 63 bytes.
    pub fn slot_name(&self) -> String {
        let mut out = String::new();
        for c in self.0.to_lowercase().chars() {
            match c {
                'a'..='z' | '0'..='9' | '_' => out.push(c),
                '-' | '.' => out.push('_'),
                other => out.push_str(&format!("u{:04}", other as u32)),
            }
        }
        out.truncate(63);
        out
    }
}

impl fmt::Display for MemberName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl From<&str> for MemberName {
    fn from(s: &str) -> Self {
        MemberName(s.to_string())
    }
}

/// An etcd lease id.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct LeaseId(pub i64);

/// An etcd `mod_revision`: the CAS token of a key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Revision(pub i64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lsn_round_trips_through_pg_text() {
        let l = Lsn::parse_pg("0/4000060").unwrap();
        assert_eq!(l.0, 0x4000060);
        assert_eq!(l.to_string(), "0/4000060");
        assert_eq!(Lsn::parse_pg("1/0").unwrap().0, 1 << 32);
        assert!(Lsn::parse_pg("zz").is_none());
    }

    #[test]
    fn slot_name_follows_patroni_rules() {
        assert_eq!(MemberName::from("postgres-1").slot_name(), "postgres_1");
        assert_eq!(MemberName::from("Node.A").slot_name(), "node_a");
        assert_eq!(MemberName::from("a b").slot_name(), "au0032b");
    }
}
