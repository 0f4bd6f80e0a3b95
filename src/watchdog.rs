//! The watchdog: a device that resets the host unless pinged, so that a primary whose agent
//! hangs cannot outlive its leader lease.
//!
//! [`WatchdogDevice`] is the narrow driver trait (Linux `/dev/watchdog` ioctls, or a test
//! device); the mode logic (off / automatic / required, timeout = ttl − safety_margin) sits on
//! top of it.

use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum WatchdogError {
    #[error("watchdog device {0} unusable: {1}")]
    Unusable(String, String),
    #[error("watchdog keepalive failed: {0}")]
    Keepalive(String),
}

/// Contract of a watchdog driver.
///
/// - `open` opens the device and sets its timeout; after it returns `Ok`, the device resets the
///   host unless `keepalive` is called within `timeout`.
/// - `close` writes the magic close character `V` and closes, disarming it.
pub trait WatchdogDevice: Send {
    fn open(&mut self, timeout: Duration) -> Result<(), WatchdogError>;
    fn keepalive(&mut self) -> Result<(), WatchdogError>;
    fn close(&mut self);
    fn is_open(&self) -> bool;
}
