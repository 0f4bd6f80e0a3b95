//! The test side of a [`FileWatchdog`](super::FileWatchdog): [`FileWatchdogHardware`] reads
//! its lines and plays the device's timer. A test double, compiled only for tests and with the
//! `testing` feature.

use std::fs::File;
use std::path::{Path, PathBuf};

use super::unix_millis;

/// What the simulated hardware concluded so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HardwareState {
    /// Never opened, or closed with the magic character.
    Disarmed,
    /// Armed and pinged in time; `deadline_ms` is the unix-ms instant of the reset.
    Armed { deadline_ms: u128 },
    /// The timer ran out: a real device would have reset the host.
    Fired { at_ms: u128 },
}

/// The reading side of a [`FileWatchdog`](super::FileWatchdog): follows the file and tracks
/// the timer. Tests poll it; a lab "hardware" process can loop on [`poll`](Self::poll) and
/// kill the host's processes once it returns [`HardwareState::Fired`].
#[derive(Debug)]
pub struct FileWatchdogHardware {
    path: PathBuf,
    offset: u64,
    pending: String,
    state: HardwareState,
    /// Every event seen: (event, unix_ms, timeout_ms).
    pub events: Vec<(String, u128, u128)>,
}

impl FileWatchdogHardware {
    pub fn new(path: impl AsRef<Path>) -> Self {
        FileWatchdogHardware {
            path: path.as_ref().to_path_buf(),
            offset: 0,
            pending: String::new(),
            state: HardwareState::Disarmed,
            events: Vec::new(),
        }
    }

    /// Reads new lines (regular file: from the last offset) and evaluates the timer at the
    /// current wall-clock time. Once fired, the state stays fired.
    pub fn poll(&mut self) -> HardwareState {
        use std::io::{Read, Seek, SeekFrom};
        if let Ok(mut f) = File::open(&self.path)
            && f.seek(SeekFrom::Start(self.offset)).is_ok()
        {
            let mut buf = String::new();
            if let Ok(n) = f.read_to_string(&mut buf) {
                self.offset += n as u64;
                self.pending.push_str(&buf);
            }
        }
        while let Some(i) = self.pending.find('\n') {
            let line: String = self.pending.drain(..=i).collect();
            self.feed_line(line.trim());
        }
        self.check(unix_millis())
    }

    /// Applies one line (also usable by a reader of a FIFO).
    pub fn feed_line(&mut self, line: &str) {
        let mut it = line.split_whitespace();
        let (Some(ev), Some(ts), Some(to)) = (it.next(), it.next(), it.next()) else {
            return;
        };
        let (Ok(ts), Ok(to)) = (ts.parse::<u128>(), to.parse::<u128>()) else {
            return;
        };
        self.events.push((ev.to_string(), ts, to));
        if matches!(self.state, HardwareState::Fired { .. }) {
            return;
        }
        // A ping that arrives after the deadline is too late: the reset already happened.
        self.check(ts);
        if matches!(self.state, HardwareState::Fired { .. }) {
            return;
        }
        self.state = match ev {
            "open" | "keepalive" => HardwareState::Armed {
                deadline_ms: ts + to,
            },
            "close" => HardwareState::Disarmed,
            _ => self.state,
        };
    }

    /// Evaluates the timer at `now_ms`.
    pub fn check(&mut self, now_ms: u128) -> HardwareState {
        if let HardwareState::Armed { deadline_ms } = self.state
            && now_ms > deadline_ms
        {
            self.state = HardwareState::Fired { at_ms: deadline_ms };
        }
        self.state
    }
}
