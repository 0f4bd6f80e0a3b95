//! The `watchdog` section: the cluster-wide defaults and each host's overrides of them.

use std::path::PathBuf;

use serde_saphyr::Spanned;

use super::Checker;
use crate::config::WatchdogMode;
use crate::inventory::model::Watchdog;
use crate::inventory::raw::RawWatchdog;

/// The cluster-wide watchdog: `automatic` on `/dev/watchdog` with the profile's
/// `safety_margin`, overridden by the inventory's `watchdog` section.
pub(super) fn defaults(c: &mut Checker, raw: &RawWatchdog, safety_margin: i64) -> Watchdog {
    let base = Watchdog {
        mode: WatchdogMode::Automatic,
        device: PathBuf::from("/dev/watchdog"),
        safety_margin,
    };
    resolve(c, &base, raw, "watchdog")
}

/// `base` with the settings of `raw` (at `field`) applied; a bad value keeps the base's.
pub(super) fn resolve(
    c: &mut Checker,
    base: &Watchdog,
    raw: &RawWatchdog,
    field: &str,
) -> Watchdog {
    let mut w = base.clone();
    if let Some(m) = &raw.mode
        && let Some(mode) = mode(c, m, &format!("{field}.mode"))
    {
        w.mode = mode;
    }
    if let Some(d) = &raw.device {
        w.device = PathBuf::from(d);
    }
    if let Some(s) = &raw.safety_margin {
        if s.value < -1 {
            c.at(
                s,
                format!("{field}.safety_margin"),
                format!("must be -1 or >= 0 (got {})", s.value),
            );
        } else {
            w.safety_margin = s.value;
        }
    }
    w
}

fn mode(c: &mut Checker, s: &Spanned<String>, field: &str) -> Option<WatchdogMode> {
    match s.value.as_str() {
        "off" => Some(WatchdogMode::Off),
        "automatic" => Some(WatchdogMode::Automatic),
        "required" => Some(WatchdogMode::Required),
        other => {
            c.at(
                s,
                field,
                format!("bad watchdog mode {other:?} (expected off, automatic or required)"),
            );
            None
        }
    }
}
