//! The operator's log of a real agent (real etcd, real PostgreSQL 15): with the default log
//! settings and its stderr going to a file, the file holds plain text, and a condition that
//! lasts many cycles (an unusable watchdog) is logged once, not every cycle.

mod common;

use std::time::Duration;

use common::cluster::{Cluster, ClusterOpts, eventually};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn log_file_has_no_escape_codes_and_an_unusable_watchdog_is_logged_once() {
    let mut opts = ClusterOpts::new("logwd", 29000);
    opts.nodes = 1;
    // `automatic`: the leader keeps leading without a watchdog and retries the device every
    // cycle (loop_wait = 1 s), which used to log the same warning every cycle.
    opts.watchdog = vec![
        "watchdog:\n  mode: automatic\n  device: /dev/pgherd-no-such-watchdog\n  fence: false\n"
            .into(),
    ];
    let mut c = Cluster::new(opts);
    c.start_all();
    let log_path = c.nodes[0].log();
    let leader_cycles = || {
        std::fs::read_to_string(&log_path)
            .unwrap_or_default()
            .matches("the leader with the lock")
            .count()
    };
    // Several leader cycles, each of which tries (and fails) to arm the watchdog.
    eventually(Duration::from_secs(90), "six cycles as leader", || async {
        (leader_cycles() >= 6).then_some(())
    })
    .await;
    assert_eq!(c.code(0, "GET", "/leader").await, Some(200));
    let log = std::fs::read_to_string(&log_path).unwrap();
    if log.contains('\u{1b}') {
        c.dump_logs();
        panic!("ANSI escape codes in a log file");
    }
    let warnings = log
        .lines()
        .filter(|l| l.contains("watchdog unusable, continuing without it"))
        .count();
    if warnings != 1 {
        c.dump_logs();
        panic!("the watchdog warning appears {warnings} times, want once");
    }
    // The warning carries its reason (the device), so once is enough.
    assert!(log.contains("/dev/pgherd-no-such-watchdog"), "{log}");
}
