//! The namespace lab behaves like separate machines: own hostname and address, own /etc, a
//! crash + boot keeps the disk, a partition cuts host↔host traffic but not the controller, and
//! `down` leaves nothing behind.
//!
//! Needs root (netns, mounts); skipped with a message otherwise. Uses bridge `phtest0` and
//! 10.231.7.0/24 (shared with tests/transport.rs: cargo runs test binaries one at a time).

use std::path::Path;
use std::time::{Duration, Instant};

use pgherd::lab::{self, LabInfo, LabSpec};
use pgherd::transport::{SshOptions, SshTransport, Transport};

const T: Duration = Duration::from_secs(20);

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// Tears the lab down even when a step panics.
struct LabGuard(LabSpec);
impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Err(e) = lab::down(&self.0, true) {
            eprintln!("lab teardown failed: {e}");
        }
    }
}

fn ppid(pid: u32) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("PPid:")).unwrap();
    line[5..].trim().parse().unwrap()
}

async fn connect(info: &LabInfo, ctl: &Path, host: &str) -> SshTransport {
    let opts = SshOptions {
        known_hosts: info.known_hosts.clone(),
        ..SshOptions::new(ctl)
    };
    SshTransport::connect_with(&info.host_spec(host).unwrap(), &opts)
        .await
        .unwrap_or_else(|e| panic!("connect to {host}: {e}"))
}

async fn out(t: &SshTransport, cmd: &str) -> String {
    t.run_ok(cmd, T)
        .await
        .unwrap()
        .stdout_str()
        .trim()
        .to_string()
}

/// Whether `from` opens a TCP connection to `to`:22 within 1 s (a dropped SYN never answers).
async fn tcp_reaches(from: &SshTransport, to: &str) -> bool {
    let cmd = format!("timeout 1 bash -c 'exec 3<>/dev/tcp/{to}/22' 2>/dev/null");
    from.run(&cmd, T).await.unwrap().success()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lab_hosts_behave_like_separate_machines() {
    if !is_root() {
        eprintln!("SKIP lab test: needs root (network namespaces, mounts)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let spec = LabSpec::new("phl", 3, "10.231.7", "phtest0", tmp.path().join("lab"));
    // Leftovers of an aborted earlier run (this file's or the other lab test's, which uses the
    // same bridge and addresses) would clash with the new hosts.
    lab::down(
        &LabSpec::new("pht", 2, "10.231.7", "phtest0", tmp.path().join("other")),
        false,
    )
    .unwrap();
    lab::down(&spec, false).unwrap();
    let guard = LabGuard(spec.clone());

    let started = Instant::now();
    let info = tokio::task::block_in_place(|| lab::up(&spec)).unwrap();
    eprintln!("lab up (3 hosts) in {:?}", started.elapsed());
    // `up` is idempotent: a second call on a running lab changes nothing and succeeds.
    let st_before = lab::status(&spec).unwrap();
    tokio::task::block_in_place(|| lab::up(&spec)).unwrap();
    eprintln!("{:>6.1?} up again", started.elapsed());
    assert_eq!(lab::status(&spec).unwrap(), st_before);
    assert!(st_before.iter().all(|h| h.up && !h.partitioned));
    // The hosts are detached from the process that built them (`pgherd lab up` may exit).
    for h in &st_before {
        let unshare = ppid(h.pid.unwrap());
        assert_ne!(ppid(unshare), std::process::id(), "{} is our child", h.name);
    }

    let ctl = tmp.path().join("ctl");
    let h1 = connect(&info, &ctl, "phl1").await;
    let h2 = connect(&info, &ctl, "phl2").await;
    let h3 = connect(&info, &ctl, "phl3").await;
    eprintln!("{:>6.1?} connected", started.elapsed());

    hosts_have_own_hostname_and_address(&h1, &h2).await;
    eprintln!(
        "{:>6.1?} hosts_have_own_hostname_and_address",
        started.elapsed()
    );
    hosts_have_separate_etc(&h1, &h2).await;
    eprintln!("{:>6.1?} hosts_have_separate_etc", started.elapsed());
    root_commands_use_a_lean_shell(&h1).await;
    eprintln!("{:>6.1?} root_commands_use_a_lean_shell", started.elapsed());
    crash_and_boot_keep_the_disk(&spec, &h2).await;
    eprintln!("{:>6.1?} crash_and_boot_keep_the_disk", started.elapsed());
    partition_blocks_hosts_but_not_controller(&spec, &h1, &h3).await;
    eprintln!(
        "{:>6.1?} partition_blocks_hosts_but_not_controller",
        started.elapsed()
    );

    drop((h1, h2, h3));
    let pids: Vec<u32> = lab::status(&spec)
        .unwrap()
        .iter()
        .filter_map(|h| h.pid)
        .collect();
    assert_eq!(pids.len(), 3);
    down_removes_namespaces_and_bridge(&spec, &pids);
    std::mem::forget(guard);
}

async fn hosts_have_own_hostname_and_address(h1: &SshTransport, h2: &SshTransport) {
    assert_eq!(out(h1, "hostname").await, "phl1");
    assert_eq!(out(h2, "hostname").await, "phl2");
    let addr = out(h2, "ip -4 -o addr show dev eth0").await;
    assert!(addr.contains("10.231.7.12/24"), "{addr}");
    // Lab hosts resolve each other by name, and a name that is not a lab host fails at once
    // instead of waiting for an unreachable DNS server.
    assert_eq!(
        out(h1, "getent hosts phl2 | cut -d' ' -f1").await,
        "10.231.7.12"
    );
    let start = Instant::now();
    assert!(
        !h1.run("getent hosts no-such-host", T)
            .await
            .unwrap()
            .success()
    );
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
    // Each host is PID 1 = tini in its own PID namespace, with sshd under it.
    assert_eq!(out(h1, "cat /proc/1/comm").await, "tini");
    // /run/postgresql is ready for PostgreSQL (owned by postgres).
    assert_eq!(out(h1, "stat -c %U /run/postgresql").await, "postgres");
}

async fn hosts_have_separate_etc(h1: &SshTransport, h2: &SshTransport) {
    h1.run_ok("echo only-on-1 > /etc/pgherd-lab-test", T)
        .await
        .unwrap();
    assert_eq!(out(h1, "cat /etc/pgherd-lab-test").await, "only-on-1");
    let on2 = h2.run("test -e /etc/pgherd-lab-test", T).await.unwrap();
    assert!(!on2.success(), "file written on phl1 is visible on phl2");
    assert!(
        !Path::new("/etc/pgherd-lab-test").exists(),
        "a host wrote to the machine's /etc"
    );
}

async fn root_commands_use_a_lean_shell(h1: &SshTransport) {
    // sshd runs commands through root's login shell; the host's passwd says /bin/sh so root's
    // slow bash profile is not sourced (measured: ~70 ms per command with bash).
    assert_eq!(out(h1, "getent passwd root | cut -d: -f7").await, "/bin/sh");
    let start = Instant::now();
    for _ in 0..20 {
        h1.run_ok("true", T).await.unwrap();
    }
    let per = start.elapsed() / 20;
    eprintln!("ssh round trip per command: {per:?}");
    // Loose bound: the machine is shared with parallel builds (quiet: ~2-5 ms per command).
    assert!(per < Duration::from_millis(1000), "{per:?} per command");
}

async fn crash_and_boot_keep_the_disk(spec: &LabSpec, h2: &SshTransport) {
    h2.run_ok("echo survives > /var/lib/pgherd-disk-test", T)
        .await
        .unwrap();
    let spec2 = spec.clone();
    tokio::task::block_in_place(|| lab::crash(&spec2, "phl2")).unwrap();
    let st = lab::status(spec).unwrap();
    assert!(!st[1].up && st[0].up && st[2].up, "{st:?}");
    // A second crash of a stopped host is an error, not a silent success.
    assert!(matches!(
        lab::crash(spec, "phl2"),
        Err(lab::LabError::NotRunning(_))
    ));
    // The old connection is dead; the transport reconnects after the reboot.
    assert!(h2.run("true", T).await.is_err());
    tokio::task::block_in_place(|| lab::boot(spec, "phl2")).unwrap();
    assert_eq!(out(h2, "cat /var/lib/pgherd-disk-test").await, "survives");
    assert_eq!(out(h2, "hostname").await, "phl2");
    // `up` on a lab with a crashed host boots just that host.
    let before = lab::status(spec).unwrap();
    tokio::task::block_in_place(|| lab::crash(spec, "phl2")).unwrap();
    tokio::task::block_in_place(|| lab::up(spec)).unwrap();
    let after = lab::status(spec).unwrap();
    assert!(after.iter().all(|h| h.up), "{after:?}");
    assert_eq!(after[0].pid, before[0].pid, "a running host was rebooted");
    assert_ne!(after[1].pid, before[1].pid);
    assert_eq!(out(h2, "cat /var/lib/pgherd-disk-test").await, "survives");
}

async fn partition_blocks_hosts_but_not_controller(
    spec: &LabSpec,
    h1: &SshTransport,
    h3: &SshTransport,
) {
    assert!(tcp_reaches(h1, "10.231.7.13").await, "before partition");
    lab::partition(spec, "phl3").unwrap();
    assert!(lab::status(spec).unwrap()[2].partitioned);
    assert!(!tcp_reaches(h1, "10.231.7.13").await, "phl1 -> phl3");
    assert!(!tcp_reaches(h3, "10.231.7.11").await, "phl3 -> phl1");
    // The controller still reaches the partitioned host.
    assert_eq!(out(h3, "hostname").await, "phl3");
    lab::heal(spec, "phl3").unwrap();
    assert!(tcp_reaches(h1, "10.231.7.13").await, "after heal");
}

fn down_removes_namespaces_and_bridge(spec: &LabSpec, pids: &[u32]) {
    lab::down(spec, true).unwrap();
    for h in spec.host_names() {
        assert!(!Path::new("/run/netns").join(&h).exists(), "netns {h} left");
        assert!(
            !Path::new("/sys/class/net")
                .join(format!("veth-{h}"))
                .exists(),
            "veth of {h} left"
        );
    }
    assert!(!Path::new("/sys/class/net/phtest0").exists(), "bridge left");
    assert!(!spec.state_dir.exists(), "state left");
    for pid in pids {
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        assert_ne!(
            comm.trim(),
            "tini",
            "a host's tini (pid {pid}) survived down"
        );
    }
    // down on a lab that is gone is fine.
    lab::down(spec, true).unwrap();
}

/// Runs the `pgherd` binary with pgherd's own state (known_hosts) under `state`.
fn pgherd(state: &Path, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_pgherd"))
        .arg("--state-dir")
        .arg(state)
        .args(args)
        .output()
        .unwrap()
}

fn ok(o: std::process::Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}{}",
        String::from_utf8_lossy(&o.stdout),
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// `pgherd lab` verbs given only `--lab-dir` act on the lab recorded there: `down` of one lab
/// leaves a second, differently named lab on another bridge running (it used to fall back to
/// the default name and bridge, i.e. to another lab).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn down_by_lab_dir_tears_down_that_lab_and_leaves_another_running() {
    if !is_root() {
        eprintln!("SKIP lab test: needs root (network namespaces, mounts)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let state = tmp.path().join("state");
    let dir_a = tmp.path().join("lab-a");
    let dir_b = tmp.path().join("lab-b");
    let a = LabSpec::new("lba", 1, "10.233.1", "phlaba0", &dir_a);
    let b = LabSpec::new("lbb", 1, "10.233.2", "phlabb0", &dir_b);
    for s in [&a, &b] {
        lab::down(s, false).unwrap();
    }
    let _guards = (LabGuard(a.clone()), LabGuard(b.clone()));
    let (da, db) = (dir_a.to_str().unwrap(), dir_b.to_str().unwrap());
    let up = |name: &str, subnet: &str, bridge: &str, dir: &str| {
        pgherd(
            &state,
            &[
                "lab",
                "up",
                "--name",
                name,
                "--subnet",
                subnet,
                "--bridge",
                bridge,
                "--hosts",
                "1",
                "--lab-dir",
                dir,
            ],
        )
    };
    tokio::task::block_in_place(|| {
        ok(up("lba", "10.233.1", "phlaba0", da), "up a");
        ok(up("lbb", "10.233.2", "phlabb0", db), "up b");
    });

    // Every verb finds the lab from its directory alone.
    let st = ok(
        pgherd(&state, &["lab", "status", "--lab-dir", db]),
        "status b",
    );
    assert!(
        st.contains("lbb1") && st.contains("10.233.2.11") && st.contains("up"),
        "{st}"
    );
    let name = ok(
        pgherd(
            &state,
            &["lab", "ssh", "--lab-dir", db, "lbb1", "--", "hostname"],
        ),
        "ssh b",
    );
    assert_eq!(name.trim(), "lbb1");
    // A flag that contradicts the record is refused, not obeyed.
    let wrong = pgherd(
        &state,
        &["lab", "down", "--lab-dir", da, "--bridge", "pgherd0"],
    );
    assert!(!wrong.status.success());
    assert!(
        String::from_utf8_lossy(&wrong.stderr).contains("phlaba0"),
        "{}",
        String::from_utf8_lossy(&wrong.stderr)
    );

    tokio::task::block_in_place(|| {
        ok(
            pgherd(&state, &["lab", "down", "--purge", "--lab-dir", da]),
            "down a",
        )
    });
    assert!(!Path::new("/run/netns/lba1").exists(), "lab a's host left");
    assert!(
        !Path::new("/sys/class/net/phlaba0").exists(),
        "lab a's bridge left"
    );
    assert!(!dir_a.exists(), "lab a's state left");
    let st_b = lab::status(&b).unwrap();
    assert!(st_b[0].up, "lab b's host went down with lab a: {st_b:?}");
    assert!(
        Path::new("/sys/class/net/phlabb0").exists(),
        "lab b's bridge removed"
    );
    let name = ok(
        pgherd(
            &state,
            &["lab", "ssh", "--lab-dir", db, "lbb1", "--", "hostname"],
        ),
        "ssh b after down a",
    );
    assert_eq!(name.trim(), "lbb1");
}
