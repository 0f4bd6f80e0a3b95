//! Watchdog drivers: the file driver against a simulated "hardware" reader, open/keepalive/close
//! semantics, and the Linux driver on a missing device.

use std::path::PathBuf;
use std::time::Duration;

use pgherd::config::{WatchdogConfig, WatchdogMode};
use pgherd::watchdog::{
    FileWatchdog, FileWatchdogHardware, HardwareState, LinuxWatchdog, NullWatchdog, WatchdogDevice,
    WatchdogError, device_from_config,
};

#[test]
fn linux_driver_on_missing_device_is_unusable() {
    let mut wd = LinuxWatchdog::new("/nonexistent/watchdog");
    match wd.open(Duration::from_secs(25)) {
        Err(WatchdogError::Unusable(dev, _)) => assert_eq!(dev, "/nonexistent/watchdog"),
        other => panic!("expected Unusable, got {other:?}"),
    }
    assert!(!wd.is_open());
    assert!(matches!(wd.keepalive(), Err(WatchdogError::Keepalive(_))));
}

#[test]
fn linux_driver_on_a_non_watchdog_file_is_unusable_and_disarmed() {
    // A regular file accepts open but not the ioctl: the driver must refuse and write 'V'.
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fake");
    std::fs::write(&p, "").unwrap();
    let mut wd = LinuxWatchdog::new(&p);
    assert!(matches!(
        wd.open(Duration::from_secs(10)),
        Err(WatchdogError::Unusable(..))
    ));
    assert!(!wd.is_open());
    assert_eq!(std::fs::read_to_string(&p).unwrap(), "V");
}

#[test]
fn null_watchdog_never_opens() {
    let mut wd = NullWatchdog;
    assert!(matches!(
        wd.open(Duration::from_secs(10)),
        Err(WatchdogError::Unusable(..))
    ));
    assert!(!wd.is_open());
}

#[test]
fn device_from_config_picks_the_driver() {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("wd");
    let mut cfg = WatchdogConfig {
        mode: WatchdogMode::Required,
        device: PathBuf::from(format!("file:{}", file.display())),
        safety_margin: 5,
        fence: false,
    };
    let pgdata = dir.path().join("data");
    let mut wd = device_from_config(&cfg, &pgdata);
    wd.open(Duration::from_secs(3)).unwrap();
    assert!(wd.is_open() && file.exists());
    wd.close();
    cfg.mode = WatchdogMode::Off;
    assert!(
        device_from_config(&cfg, &pgdata)
            .open(Duration::from_secs(3))
            .is_err()
    );
    cfg.mode = WatchdogMode::Automatic;
    cfg.device = PathBuf::from("/nonexistent/watchdog0");
    assert!(matches!(
        device_from_config(&cfg, &pgdata).open(Duration::from_secs(3)),
        Err(WatchdogError::Unusable(..))
    ));
}

#[test]
fn file_watchdog_keeps_hardware_armed_while_pinged_and_disarms_on_close() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("wd");
    let mut wd = FileWatchdog::new(&p);
    let mut hw = FileWatchdogHardware::new(&p);
    assert_eq!(hw.poll(), HardwareState::Disarmed);
    wd.open(Duration::from_millis(300)).unwrap();
    for _ in 0..5 {
        std::thread::sleep(Duration::from_millis(100));
        wd.keepalive().unwrap();
        assert!(matches!(hw.poll(), HardwareState::Armed { .. }));
    }
    wd.close();
    assert!(!wd.is_open());
    assert_eq!(hw.poll(), HardwareState::Disarmed);
    std::thread::sleep(Duration::from_millis(400));
    assert_eq!(
        hw.poll(),
        HardwareState::Disarmed,
        "closed device must not fire"
    );
    let kinds: Vec<&str> = hw.events.iter().map(|e| e.0.as_str()).collect();
    assert_eq!(
        kinds,
        [
            "open",
            "keepalive",
            "keepalive",
            "keepalive",
            "keepalive",
            "keepalive",
            "close"
        ]
    );
    assert!(hw.events.iter().all(|e| e.2 == 300));
}

#[test]
fn file_watchdog_hardware_fires_when_keepalives_stop() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("wd");
    let mut wd = FileWatchdog::new(&p);
    // The "hardware" runs in its own thread, as a real device would, and reports the reset.
    let hw_path = p.clone();
    let hw = std::thread::spawn(move || {
        let mut hw = FileWatchdogHardware::new(&hw_path);
        for _ in 0..100 {
            if let HardwareState::Fired { .. } = hw.poll() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        false
    });
    wd.open(Duration::from_millis(200)).unwrap();
    wd.keepalive().unwrap();
    // The agent "hangs": no more keepalives and no close.
    assert!(
        hw.join().unwrap(),
        "hardware did not fire after keepalives stopped"
    );
}

#[test]
fn late_keepalive_does_not_rescue_a_fired_watchdog() {
    let mut hw = FileWatchdogHardware::new("/unused");
    hw.feed_line("open 1000 500");
    hw.feed_line("keepalive 1400 500");
    assert_eq!(hw.check(1800), HardwareState::Armed { deadline_ms: 1900 });
    hw.feed_line("keepalive 2000 500");
    assert_eq!(hw.check(2000), HardwareState::Fired { at_ms: 1900 });
}

#[test]
fn file_watchdog_on_fifo_without_reader_is_unusable() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("fifo");
    let c = std::ffi::CString::new(p.to_str().unwrap()).unwrap();
    // SAFETY: valid NUL-terminated path.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
    let mut wd = FileWatchdog::new(&p);
    assert!(matches!(
        wd.open(Duration::from_secs(1)),
        Err(WatchdogError::Unusable(..))
    ));
}
