//! The watchdog: a device that resets the host unless pinged, so that a primary whose agent
//! hangs cannot outlive its leader lease — or, where the host has no device, the [`fence`]
//! process that stops PostgreSQL instead.
//!
//! [`WatchdogDevice`] is the narrow driver trait (Linux `/dev/watchdog` ioctls, the fence, or a
//! test device); the mode logic (off / automatic / required, timeout = ttl − safety_margin)
//! sits on top of it, in the HA loop.

pub mod fence;
#[cfg(any(test, feature = "testing"))]
mod hardware;

#[cfg(any(test, feature = "testing"))]
pub use hardware::{FileWatchdogHardware, HardwareState};

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
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
/// - `keepalive_since(sent)` is a keepalive for a renewal sent at `sent`: a driver that can
///   count its timeout from then (the fence) does; a device counts from the call.
pub trait WatchdogDevice: Send {
    fn open(&mut self, timeout: Duration) -> Result<(), WatchdogError>;
    fn keepalive(&mut self) -> Result<(), WatchdogError>;
    fn keepalive_since(&mut self, _sent: std::time::Instant) -> Result<(), WatchdogError> {
        self.keepalive()
    }
    fn close(&mut self);
    fn is_open(&self) -> bool;
}

// ---------------------------------------------------------------------------------------------
// Drivers.
// ---------------------------------------------------------------------------------------------

use crate::config::{WatchdogConfig, WatchdogMode};

/// `_IOWR('W', 6, int)`: set the timeout (seconds, in/out).
const WDIOC_SETTIMEOUT: u32 = (3 << 30) | (4 << 16) | ((b'W' as u32) << 8) | 6;
/// `_IOR('W', 5, int)`: ping.
const WDIOC_KEEPALIVE: u32 = (2 << 30) | (4 << 16) | ((b'W' as u32) << 8) | 5;

/// Builds the driver for `watchdog:` in the agent config:
/// - `mode: off` → [`NullWatchdog`] (never usable);
/// - `device` starting with `file:` → [`FileWatchdog`] writing to the rest of the path (a
///   regular file or a FIFO read by a test "hardware" process, see `FileWatchdogHardware`);
/// - otherwise → [`LinuxWatchdog`] on that device (default `/dev/watchdog`).
///
/// - `device: fence` → the [`fence`] only;
/// - otherwise → [`LinuxWatchdog`] on that device (default `/dev/watchdog`), falling back to the
///   [`fence`] when the device cannot be opened (unless `fence: false`).
///
/// The mode logic (automatic vs required, timeout = ttl − safety_margin) is the HA loop's.
pub fn device_from_config(cfg: &WatchdogConfig, pgdata: &Path) -> Box<dyn WatchdogDevice> {
    if cfg.mode == WatchdogMode::Off {
        return Box::new(NullWatchdog);
    }
    let fence = || fence::FenceWatchdog::new(fence::FenceWatchdog::default_state(pgdata), pgdata);
    let dev = cfg.device.to_string_lossy();
    if dev == "fence" {
        return Box::new(fence());
    }
    match dev.strip_prefix("file:") {
        Some(path) => Box::new(FileWatchdog::new(path)),
        None => Box::new(DeviceOrFence {
            device: LinuxWatchdog::new(&cfg.device),
            fence: cfg.fence.then(fence),
            on_fence: false,
        }),
    }
}

/// A watchdog device when it can be opened, else the fence (see [`device_from_config`]).
pub struct DeviceOrFence {
    device: LinuxWatchdog,
    fence: Option<fence::FenceWatchdog>,
    on_fence: bool,
}

impl DeviceOrFence {
    fn active(&mut self) -> &mut dyn WatchdogDevice {
        match (&mut self.fence, self.on_fence) {
            (Some(f), true) => f,
            _ => &mut self.device,
        }
    }
}

impl WatchdogDevice for DeviceOrFence {
    fn open(&mut self, timeout: Duration) -> Result<(), WatchdogError> {
        let device_err = match self.device.open(timeout) {
            Ok(()) => {
                self.on_fence = false;
                return Ok(());
            }
            Err(e) => e,
        };
        let Some(f) = &mut self.fence else {
            return Err(device_err);
        };
        match f.open(timeout) {
            Ok(()) => {
                self.on_fence = true;
                tracing::info!(
                    device = %device_err,
                    "no watchdog device: the fence process guards this leader (it stops PostgreSQL if the agent stops renewing)"
                );
                Ok(())
            }
            Err(e) => Err(WatchdogError::Unusable(
                "device and fence".into(),
                format!("{device_err}; {e}"),
            )),
        }
    }
    fn keepalive(&mut self) -> Result<(), WatchdogError> {
        self.active().keepalive()
    }
    fn keepalive_since(&mut self, sent: std::time::Instant) -> Result<(), WatchdogError> {
        self.active().keepalive_since(sent)
    }
    fn close(&mut self) {
        self.active().close();
    }
    fn is_open(&self) -> bool {
        match (&self.fence, self.on_fence) {
            (Some(f), true) => f.is_open(),
            _ => self.device.is_open(),
        }
    }
}

/// A driver that is never usable (`watchdog.mode: off`, or no watchdog at all).
#[derive(Debug, Default, Clone, Copy)]
pub struct NullWatchdog;

impl WatchdogDevice for NullWatchdog {
    fn open(&mut self, _timeout: Duration) -> Result<(), WatchdogError> {
        Err(WatchdogError::Unusable(
            "none".into(),
            "watchdog is disabled".into(),
        ))
    }
    fn keepalive(&mut self) -> Result<(), WatchdogError> {
        Err(WatchdogError::Keepalive("watchdog is disabled".into()))
    }
    fn close(&mut self) {}
    fn is_open(&self) -> bool {
        false
    }
}

/// The Linux watchdog API (`/dev/watchdog`, softdog or hardware): opened write-only, timeout set
/// with `WDIOC_SETTIMEOUT`, pinged with `WDIOC_KEEPALIVE` (or a written byte when the driver lacks
/// the ioctl), disarmed by writing the magic close character `V` before closing.
///
/// Dropping an open device without [`close`](WatchdogDevice::close) leaves it armed on purpose:
/// if the agent dies while leading, the host must reset before another node promotes.
#[derive(Debug)]
pub struct LinuxWatchdog {
    path: PathBuf,
    file: Option<File>,
    keepalive_by_write: bool,
}

impl LinuxWatchdog {
    pub fn new(path: impl AsRef<Path>) -> Self {
        LinuxWatchdog {
            path: path.as_ref().to_path_buf(),
            file: None,
            keepalive_by_write: false,
        }
    }

    fn unusable(&self, why: impl std::fmt::Display) -> WatchdogError {
        WatchdogError::Unusable(self.path.display().to_string(), why.to_string())
    }
}

fn ioctl_int(file: &File, request: u32, value: &mut libc::c_int) -> std::io::Result<()> {
    // SAFETY: the fd is open for the duration of the call and `value` points to a live c_int,
    // which is what both watchdog ioctls used here expect.
    let rc = unsafe { libc::ioctl(file.as_raw_fd(), request as _, value as *mut libc::c_int) };
    if rc < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(())
    }
}

impl WatchdogDevice for LinuxWatchdog {
    fn open(&mut self, timeout: Duration) -> Result<(), WatchdogError> {
        if self.file.is_some() {
            self.close();
        }
        let file = OpenOptions::new()
            .write(true)
            .open(&self.path)
            .map_err(|e| self.unusable(e))?;
        let mut secs = timeout.as_secs().clamp(1, i32::MAX as u64) as libc::c_int;
        if let Err(e) = ioctl_int(&file, WDIOC_SETTIMEOUT, &mut secs) {
            // The device is armed by open: disarm it before giving up, or the host resets on
            // the driver's default timeout while we believe there is no watchdog.
            let mut f = file;
            let _ = f.write_all(b"V");
            return Err(self.unusable(format!("cannot set timeout: {e}")));
        }
        if secs as u64 != timeout.as_secs() {
            tracing::warn!(
                requested = timeout.as_secs(),
                actual = secs,
                "watchdog timeout adjusted by the driver"
            );
        }
        self.file = Some(file);
        self.keepalive_by_write = false;
        Ok(())
    }

    fn keepalive(&mut self) -> Result<(), WatchdogError> {
        let file = self
            .file
            .as_mut()
            .ok_or_else(|| WatchdogError::Keepalive("device not open".into()))?;
        if !self.keepalive_by_write {
            let mut dummy: libc::c_int = 0;
            match ioctl_int(file, WDIOC_KEEPALIVE, &mut dummy) {
                Ok(()) => return Ok(()),
                Err(e)
                    if e.raw_os_error() == Some(libc::ENOTTY)
                        || e.raw_os_error() == Some(libc::EINVAL) =>
                {
                    // Driver without the ioctl: any write pings it.
                    self.keepalive_by_write = true;
                }
                Err(e) => return Err(WatchdogError::Keepalive(e.to_string())),
            }
        }
        file.write_all(b"1")
            .map_err(|e| WatchdogError::Keepalive(e.to_string()))
    }

    fn close(&mut self) {
        if let Some(mut f) = self.file.take() {
            // Magic close: without it the kernel keeps the timer running after close.
            if let Err(e) = f.write_all(b"V") {
                tracing::error!(error = %e, "cannot write the magic close character to the watchdog");
            }
        }
    }

    fn is_open(&self) -> bool {
        self.file.is_some()
    }
}

fn unix_millis() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0)
}

/// A software stand-in for the watchdog hardware, for tests and the lab: every operation appends
/// one line `<event> <unix_ms> <timeout_ms>` to a regular file or FIFO, where `event` is `open`,
/// `keepalive` or `close` (the close line stands for the magic `V`). A reader (see
/// `FileWatchdogHardware`, a test double) plays the device: it "resets the host" when, after an `open`, no
/// `keepalive` arrives within the timeout and no `close` came.
///
/// A FIFO without a reader makes `open` fail with `Unusable` (no hardware present).
#[derive(Debug)]
pub struct FileWatchdog {
    path: PathBuf,
    file: Option<File>,
    timeout: Duration,
}

impl FileWatchdog {
    pub fn new(path: impl AsRef<Path>) -> Self {
        FileWatchdog {
            path: path.as_ref().to_path_buf(),
            file: None,
            timeout: Duration::ZERO,
        }
    }

    fn line(&mut self, event: &str) -> std::io::Result<()> {
        let line = format!("{event} {} {}\n", unix_millis(), self.timeout.as_millis());
        match self.file.as_mut() {
            Some(f) => f.write_all(line.as_bytes()),
            None => Err(std::io::Error::other("device not open")),
        }
    }
}

impl WatchdogDevice for FileWatchdog {
    fn open(&mut self, timeout: Duration) -> Result<(), WatchdogError> {
        if self.file.is_some() {
            self.close();
        }
        // O_NONBLOCK: opening a FIFO nobody reads fails with ENXIO instead of hanging the loop.
        let file = OpenOptions::new()
            .append(true)
            .create(true)
            .custom_flags(libc::O_NONBLOCK)
            .open(&self.path)
            .map_err(|e| WatchdogError::Unusable(self.path.display().to_string(), e.to_string()))?;
        self.file = Some(file);
        self.timeout = timeout;
        self.line("open").map_err(|e| {
            self.file = None;
            WatchdogError::Unusable(self.path.display().to_string(), e.to_string())
        })
    }

    fn keepalive(&mut self) -> Result<(), WatchdogError> {
        self.line("keepalive")
            .map_err(|e| WatchdogError::Keepalive(e.to_string()))
    }

    fn close(&mut self) {
        if self.file.is_some() {
            if let Err(e) = self.line("close") {
                tracing::error!(error = %e, "cannot write close to the file watchdog");
            }
            self.file = None;
        }
    }

    fn is_open(&self) -> bool {
        self.file.is_some()
    }
}
