//! Test doubles for the hook runner and the watchdog driver: [`RecordingHooks`] and
//! [`FakeWatchdog`]. Used by unit tests and the multi-agent simulation; production code never
//! constructs them. (The DCS and PostgreSQL fakes live next to their traits:
//! [`crate::dcs::memory`], [`crate::pg::fake`].)

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use async_trait::async_trait;
use tokio::sync::watch;
use tokio::time::Instant;

use crate::callbacks::{CallbackAction, Hooks};
use crate::pg::Role;
use crate::watchdog::{WatchdogDevice, WatchdogError};

/// One call the HA loop made on [`Hooks`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HookEvent {
    Callback(CallbackAction, Role),
    /// `pre_promote` ran and answered this.
    PrePromote(bool),
    BeforeStop,
}

/// Records every hook call; `pre_promote` answers what [`RecordingHooks::set_pre_promote`] set
/// (true by default). Cheap to clone: clones share the record.
#[derive(Clone)]
pub struct RecordingHooks {
    events: Arc<Mutex<Vec<HookEvent>>>,
    pre_promote_ok: Arc<AtomicBool>,
}

impl Default for RecordingHooks {
    fn default() -> Self {
        RecordingHooks {
            events: Arc::new(Mutex::new(Vec::new())),
            pre_promote_ok: Arc::new(AtomicBool::new(true)),
        }
    }
}

impl RecordingHooks {
    pub fn new() -> RecordingHooks {
        RecordingHooks::default()
    }

    fn lock(&self) -> MutexGuard<'_, Vec<HookEvent>> {
        self.events.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// What `pre_promote` answers from now on.
    pub fn set_pre_promote(&self, ok: bool) {
        self.pre_promote_ok.store(ok, Ordering::SeqCst);
    }

    /// Every call so far, in order.
    pub fn events(&self) -> Vec<HookEvent> {
        self.lock().clone()
    }

    /// Only the callbacks, in order.
    pub fn callbacks(&self) -> Vec<(CallbackAction, Role)> {
        self.lock()
            .iter()
            .filter_map(|e| match e {
                HookEvent::Callback(a, r) => Some((*a, *r)),
                _ => None,
            })
            .collect()
    }

    pub fn clear(&self) {
        self.lock().clear();
    }
}

#[async_trait]
impl Hooks for RecordingHooks {
    fn callback(&self, action: CallbackAction, role: Role) {
        self.lock().push(HookEvent::Callback(action, role));
    }

    /// The recorder has no commands: a reload changes nothing it records.
    fn reconfigure(&self, _cfg: &crate::config::AgentConfig) {}

    async fn pre_promote(&self) -> bool {
        let ok = self.pre_promote_ok.load(Ordering::SeqCst);
        self.lock().push(HookEvent::PrePromote(ok));
        ok
    }

    async fn before_stop(&self) {
        self.lock().push(HookEvent::BeforeStop);
    }
}

/// One call on the fake watchdog device.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WatchdogEvent {
    Open(Duration),
    /// `open` was refused because the device is unusable.
    OpenRefused,
    Keepalive,
    Close,
}

#[derive(Debug, Default)]
struct WdState {
    timeout: Duration,
    usable: bool,
    events: Vec<WatchdogEvent>,
    /// Times the armed deadline passed without a keepalive (the host would have reset).
    fired: u32,
}

/// A watchdog device on the tokio clock.
///
/// Clones share the *device* (deadline, event record) but each value is its own *file
/// descriptor*: a clone starts closed, whatever the original's state. A harness keeps one
/// value to watch the device and hands clones to agents; an agent that crashes drops its
/// handle without the magic close, so the device stays armed (as a real `/dev/watchdog`), and a
/// restarted agent gets a fresh, closed handle that must `open` again to pet it.
///
/// [`FakeWatchdog::deadline`] publishes when the host would be reset; the simulation uses
/// [`FakeWatchdog::spawn_enforcer`] to kill the node's PostgreSQL at that moment.
pub struct FakeWatchdog {
    state: Arc<Mutex<WdState>>,
    deadline_tx: Arc<watch::Sender<Option<Instant>>>,
    /// This handle opened the device (and has not closed it).
    open: bool,
}

impl Clone for FakeWatchdog {
    /// Another handle on the same device, initially closed.
    fn clone(&self) -> Self {
        FakeWatchdog {
            state: self.state.clone(),
            deadline_tx: self.deadline_tx.clone(),
            open: false,
        }
    }
}

impl Default for FakeWatchdog {
    fn default() -> Self {
        FakeWatchdog::new()
    }
}

impl FakeWatchdog {
    /// A usable device.
    pub fn new() -> FakeWatchdog {
        FakeWatchdog {
            state: Arc::new(Mutex::new(WdState {
                usable: true,
                ..Default::default()
            })),
            deadline_tx: Arc::new(watch::channel(None).0),
            open: false,
        }
    }

    /// A device whose `open` fails (no /dev/watchdog, or no permission).
    pub fn unusable() -> FakeWatchdog {
        let wd = FakeWatchdog::new();
        wd.set_usable(false);
        wd
    }

    fn lock(&self) -> MutexGuard<'_, WdState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn set_usable(&self, usable: bool) {
        self.lock().usable = usable;
    }

    pub fn events(&self) -> Vec<WatchdogEvent> {
        self.lock().events.clone()
    }

    /// When the device resets the host unless pinged first; `None` while disarmed.
    pub fn deadline(&self) -> Option<Instant> {
        *self.deadline_tx.borrow()
    }

    /// How many times an armed deadline passed (as observed by [`Self::check_fired`] or the
    /// enforcer): each one is a simulated host reset.
    pub fn fired(&self) -> u32 {
        self.lock().fired
    }

    /// Fires (disarms, counts) the device if its armed deadline has passed; returns whether it
    /// fired now.
    pub fn check_fired(&self) -> bool {
        let fired = self.deadline().is_some_and(|d| d <= Instant::now());
        if fired {
            self.lock().fired += 1;
            self.deadline_tx.send_replace(None);
        }
        fired
    }

    /// Spawns a task that runs `reset` when an armed deadline passes without a keepalive (the
    /// simulated host reset: typically crash the node's PostgreSQL), then keeps watching (the
    /// rebooted host may arm it again). It runs until the returned handle is aborted or the
    /// runtime ends.
    pub fn spawn_enforcer(
        &self,
        reset: impl Fn() + Send + Sync + 'static,
    ) -> tokio::task::JoinHandle<()> {
        let wd = self.clone();
        let mut rx = self.deadline_tx.subscribe();
        tokio::spawn(async move {
            loop {
                let deadline = *rx.borrow_and_update();
                match deadline {
                    Some(at) => {
                        tokio::select! {
                            _ = tokio::time::sleep_until(at) => {
                                if wd.check_fired() {
                                    reset();
                                }
                            }
                            r = rx.changed() => if r.is_err() { return },
                        }
                    }
                    None => {
                        if rx.changed().await.is_err() {
                            return;
                        }
                    }
                }
            }
        })
    }

    fn arm(&self, timeout: Duration) {
        self.deadline_tx
            .send_replace(Some(Instant::now() + timeout));
    }
}

impl WatchdogDevice for FakeWatchdog {
    fn open(&mut self, timeout: Duration) -> Result<(), WatchdogError> {
        let mut st = self.lock();
        if !st.usable {
            st.events.push(WatchdogEvent::OpenRefused);
            return Err(WatchdogError::Unusable(
                "/dev/watchdog (fake)".into(),
                "device made unusable by the test".into(),
            ));
        }
        st.timeout = timeout;
        st.events.push(WatchdogEvent::Open(timeout));
        drop(st);
        self.open = true;
        self.arm(timeout);
        Ok(())
    }

    fn keepalive(&mut self) -> Result<(), WatchdogError> {
        if !self.open {
            return Err(WatchdogError::Keepalive("device is not open".into()));
        }
        let mut st = self.lock();
        st.events.push(WatchdogEvent::Keepalive);
        let timeout = st.timeout;
        drop(st);
        self.arm(timeout);
        Ok(())
    }

    /// Only a handle that opened the device can disarm it (the magic `V` goes through the fd).
    fn close(&mut self) {
        if self.open {
            self.open = false;
            self.lock().events.push(WatchdogEvent::Close);
            self.deadline_tx.send_replace(None);
        }
    }

    fn is_open(&self) -> bool {
        self.open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn hooks_record_calls_and_pre_promote_answers_as_set() {
        let h = RecordingHooks::new();
        h.callback(CallbackAction::OnStart, Role::Replica);
        assert!(h.pre_promote().await);
        h.set_pre_promote(false);
        assert!(!h.pre_promote().await);
        h.before_stop().await;
        assert_eq!(
            h.events(),
            vec![
                HookEvent::Callback(CallbackAction::OnStart, Role::Replica),
                HookEvent::PrePromote(true),
                HookEvent::PrePromote(false),
                HookEvent::BeforeStop,
            ]
        );
        assert_eq!(
            h.callbacks(),
            vec![(CallbackAction::OnStart, Role::Replica)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn watchdog_fires_when_not_pinged_and_close_disarms() {
        let probe = FakeWatchdog::new();
        let mut wd = probe.clone();
        let fired = Arc::new(AtomicBool::new(false));
        let f2 = fired.clone();
        let task = probe.spawn_enforcer(move || f2.store(true, Ordering::SeqCst));
        wd.open(Duration::from_secs(25)).unwrap();
        tokio::time::sleep(Duration::from_secs(20)).await;
        wd.keepalive().unwrap();
        tokio::time::sleep(Duration::from_secs(20)).await;
        assert!(
            !fired.load(Ordering::SeqCst),
            "keepalive pushed the deadline"
        );
        wd.close();
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert!(!fired.load(Ordering::SeqCst), "magic close disarms");
        wd.open(Duration::from_secs(10)).unwrap();
        drop(wd); // an agent crash does not disarm the device
        let mut restarted = probe.clone();
        assert!(!restarted.is_open(), "a new handle starts closed");
        restarted.close();
        tokio::time::sleep(Duration::from_secs(11)).await;
        assert!(fired.load(Ordering::SeqCst));
        assert_eq!(probe.fired(), 1);
        task.abort();
        assert_eq!(
            probe.events(),
            vec![
                WatchdogEvent::Open(Duration::from_secs(25)),
                WatchdogEvent::Keepalive,
                WatchdogEvent::Close,
                WatchdogEvent::Open(Duration::from_secs(10)),
            ]
        );
    }

    #[test]
    fn unusable_watchdog_refuses_open() {
        let mut wd = FakeWatchdog::unusable();
        assert!(wd.open(Duration::from_secs(10)).is_err());
        assert!(!wd.is_open());
        assert!(wd.keepalive().is_err());
        assert_eq!(wd.events(), vec![WatchdogEvent::OpenRefused]);
    }
}
