//! The `haproxy` section: the profile's check cadence with the inventory's overrides, and
//! `maxconn`.

use super::{Checker, Ports};
use crate::inventory::model::Haproxy;
use crate::inventory::profile::{HaproxyCheck, Profile, parse_haproxy_duration};
use crate::inventory::raw::{RawCheck, RawHaproxy};

pub(super) fn haproxy(
    c: &mut Checker,
    raw: &RawHaproxy,
    profile: &Profile,
    ports: &Ports,
) -> Haproxy {
    let mut check = profile.haproxy_check();
    // `haproxy.check` set: the operator took control of both pools' cadence.
    let primary_check = match &raw.check {
        Some(_) => None,
        None => Some(profile.haproxy_primary_check()),
    };
    if let Some(rc) = &raw.check {
        apply_check(c, rc, &mut check);
    }
    let maxconn = match &raw.maxconn {
        Some(m) if m.value == 0 => {
            c.at(m, "haproxy.maxconn", "must be at least 1");
            1000
        }
        Some(m) => m.value,
        None => 1000,
    };
    Haproxy {
        primary_port: ports.haproxy_primary,
        replica_port: ports.haproxy_replica,
        stats_port: ports.haproxy_stats,
        maxconn,
        check,
        primary_check: primary_check.unwrap_or(check),
    }
}

/// `haproxy.check`'s overrides applied to `check`; a bad value keeps the profile's.
fn apply_check(c: &mut Checker, rc: &RawCheck, check: &mut HaproxyCheck) {
    for (v, slot, name) in [
        (&rc.inter, &mut check.inter_ms, "inter"),
        (&rc.fastinter, &mut check.fastinter_ms, "fastinter"),
        (&rc.downinter, &mut check.downinter_ms, "downinter"),
    ] {
        if let Some(s) = v {
            match parse_haproxy_duration(&s.value) {
                Some(ms) => *slot = ms,
                None => c.at(
                    s,
                    format!("haproxy.check.{name}"),
                    format!("bad duration {:?} (expected e.g. 500ms, 2s)", s.value),
                ),
            }
        }
    }
    for (v, slot, name) in [
        (&rc.rise, &mut check.rise, "rise"),
        (&rc.fall, &mut check.fall, "fall"),
    ] {
        if let Some(s) = v {
            if s.value == 0 {
                c.at(s, format!("haproxy.check.{name}"), "must be at least 1");
            } else {
                *slot = s.value;
            }
        }
    }
}
