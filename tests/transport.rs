//! The SSH transport against real sshd's in a 2-host namespace lab: commands, timeouts,
//! uploads (checksum-first, atomic), parallelism beyond sshd's session limit, and the error
//! classification (unreachable, auth refused, host key mismatch, command failed).
//!
//! Needs root (the lab); skipped with a message otherwise. Uses bridge `phtest0` and
//! 10.231.7.0/24 (shared with tests/lab.rs: cargo runs test binaries one at a time).

use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use pgherd::lab::{self, LabInfo, LabSpec};
use pgherd::transport::{
    HostSpec, SshOptions, SshTransport, Transport, TransportError, connect_all, sha256_hex,
};

const T: Duration = Duration::from_secs(20);

fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

struct LabGuard(LabSpec);
impl Drop for LabGuard {
    fn drop(&mut self) {
        if let Err(e) = lab::down(&self.0, true) {
            eprintln!("lab teardown failed: {e}");
        }
    }
}

fn opts(info: &LabInfo, ctl: &Path) -> SshOptions {
    SshOptions {
        known_hosts: info.known_hosts.clone(),
        ..SshOptions::new(ctl)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ssh_transport_against_lab_hosts() {
    if !is_root() {
        eprintln!("SKIP transport test: needs root (it builds a namespace lab)");
        return;
    }
    let tmp = tempfile::tempdir().unwrap();
    let spec = LabSpec::new("pht", 2, "10.231.7", "phtest0", tmp.path().join("lab"));
    // Leftovers of an aborted earlier run (this file's or the other lab test's, which uses the
    // same bridge and addresses) would clash with the new hosts.
    lab::down(
        &LabSpec::new("phl", 3, "10.231.7", "phtest0", tmp.path().join("other")),
        false,
    )
    .unwrap();
    lab::down(&spec, false).unwrap();
    let _guard = LabGuard(spec.clone());
    let info = tokio::task::block_in_place(|| lab::up(&spec)).unwrap();
    let ctl = tmp.path().join("ctl");
    let opts = opts(&info, &ctl);

    // connect_all: every lab host plus one address nobody answers, results in input order.
    let mut specs = info.host_specs();
    let mut ghost = HostSpec::new("ghost", "10.231.7.99");
    ghost.connect_timeout = Duration::from_secs(2);
    specs.push(ghost.clone());
    let mut all = connect_all(&specs, &opts, 4).await;
    assert_eq!(
        all.iter().map(|(n, _)| n.as_str()).collect::<Vec<_>>(),
        ["pht1", "pht2", "ghost"]
    );
    assert!(matches!(&all[2].1, Err(TransportError::Unreachable { host, .. }) if host == "ghost"));
    let (_, t2) = all.remove(1);
    let (_, t1) = all.remove(0);
    let (t1, t2) = (Arc::new(t1.unwrap()), t2.unwrap());

    runs_commands_with_status_and_output(&t1).await;
    failing_command_gives_command_failed_with_stderr_tail(&t1).await;
    secrets_never_appear_in_errors(&t1).await;
    timeout_kills_the_remote_command(&t1).await;
    upload_compares_checksum_then_renames_atomically(&t1).await;
    read_file_and_sha256_report_absent_files(&t2).await;
    many_parallel_commands_on_one_host_succeed(&t1).await;
    unreachable_address_fails_fast(&opts, ghost).await;
    wrong_key_is_auth_refused(&info, &opts, tmp.path()).await;
    changed_host_key_is_refused(&info, &ctl, tmp.path()).await;
    non_root_user_becomes_root_through_sudo(&t1, &info, &opts).await;

    drop(t2);
    Arc::try_unwrap(t1).ok().unwrap().close().await.unwrap();
}

async fn runs_commands_with_status_and_output(t: &SshTransport) {
    let out = t.run("echo out; echo err >&2; exit 3", T).await.unwrap();
    assert_eq!(out.status, 3);
    assert_eq!(out.stdout, b"out\n");
    assert_eq!(out.stderr, b"err\n");
    // Quoting survives: the script reaches sh -c intact.
    let out = t
        .run_ok(r#"printf '%s|' "a b" 'c'"'"'d'"#, T)
        .await
        .unwrap();
    assert_eq!(out.stdout_str(), "a b|c'd|");
    // A script exiting 124 by itself is not mistaken for our timeout.
    assert_eq!(t.run("exit 124", T).await.unwrap().status, 124);
}

async fn failing_command_gives_command_failed_with_stderr_tail(t: &SshTransport) {
    let err = t
        .run_ok("echo noise >&2; ls /nonexistent-dir", T)
        .await
        .unwrap_err();
    match &err {
        TransportError::CommandFailed {
            host,
            status,
            stderr_tail,
            cmd,
        } => {
            assert_eq!(host, "pht1");
            assert_eq!(*status, 2);
            assert!(stderr_tail.contains("nonexistent-dir"), "{stderr_tail}");
            assert!(cmd.contains("ls /nonexistent-dir"));
        }
        other => panic!("unexpected {other:?}"),
    }
    assert!(err.to_string().starts_with("host pht1:"), "{err}");
}

async fn secrets_never_appear_in_errors(t: &SshTransport) {
    let secret = "s3cr3t-Pa55";
    let err = t
        .run_secret(
            &format!("echo 'password {secret} rejected' >&2; exit 1"),
            None,
            &[secret],
            T,
        )
        .await
        .unwrap_err();
    let shown = format!("{err} {err:?}");
    assert!(!shown.contains(secret), "{shown}");
    // Through stdin the secret never reaches the command line at all.
    let out = t
        .run_secret(
            "read p; [ \"$p\" = s3cr3t-Pa55 ] && echo ok",
            Some(b"s3cr3t-Pa55\n"),
            &[secret],
            T,
        )
        .await
        .unwrap();
    assert_eq!(out.stdout_str().trim(), "ok");
}

async fn timeout_kills_the_remote_command(t: &SshTransport) {
    let start = Instant::now();
    let err = t
        .run("sleep 37; echo never", Duration::from_secs(1))
        .await
        .unwrap_err();
    let took = start.elapsed();
    assert!(
        matches!(&err, TransportError::Timeout { host, cmd, .. } if host == "pht1" && cmd.contains("sleep 37")),
        "{err:?}"
    );
    assert!(took < Duration::from_secs(6), "took {took:?}");
    let left = t.run("pgrep -x sleep", T).await.unwrap();
    assert_ne!(left.status, 0, "sleep still running: {}", left.stdout_str());
}

async fn upload_compares_checksum_then_renames_atomically(t: &SshTransport) {
    let path = "/etc/pgherd-upload-test.conf";
    let v1 = b"setting = 1\n".repeat(1000);
    assert!(
        t.upload(path, &v1, 0o640, Some("postgres:postgres"))
            .await
            .unwrap()
    );
    assert_eq!(t.read_file(path).await.unwrap().as_deref(), Some(&v1[..]));
    let meta = t
        .run_ok(&format!("stat -c '%a %U:%G %i' {path}"), T)
        .await
        .unwrap()
        .stdout_str();
    let mut f = meta.split_whitespace();
    assert_eq!(f.next(), Some("640"));
    assert_eq!(f.next(), Some("postgres:postgres"));
    let inode1 = f.next().unwrap().to_string();

    // Same bytes, mode and owner: nothing to do.
    assert!(!t.upload(path, &v1, 0o640, Some("postgres")).await.unwrap());
    // Same bytes, other mode: only the mode changes.
    assert!(t.upload(path, &v1, 0o600, Some("postgres")).await.unwrap());
    assert!(!t.upload(path, &v1, 0o600, Some("postgres")).await.unwrap());

    // New content while a reader holds the old file open: the reader still sees the complete
    // old version (the file was replaced by rename, not rewritten in place).
    t.run_ok(
        &format!("(exec 3< {path}; sleep 1; sha256sum <&3 > /tmp/reader.sum) </dev/null >/dev/null 2>&1 &"),
        T,
    )
    .await
    .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let v2 = b"setting = 2\n".repeat(1000);
    assert!(t.upload(path, &v2, 0o600, Some("postgres")).await.unwrap());
    tokio::time::sleep(Duration::from_millis(1200)).await;
    let reader = t
        .run_ok("cat /tmp/reader.sum", T)
        .await
        .unwrap()
        .stdout_str();
    assert!(reader.starts_with(&sha256_hex(&v1)), "reader saw {reader}");
    assert_eq!(t.sha256(path).await.unwrap(), Some(sha256_hex(&v2)));
    let inode2 = t
        .run_ok(&format!("stat -c %i {path}"), T)
        .await
        .unwrap()
        .stdout_str();
    assert_ne!(inode1, inode2.trim(), "file was rewritten in place");
    // No temporary files left next to it.
    let leftovers = t
        .run_ok("ls -a /etc | grep -c pgherd-upload-test || true", T)
        .await
        .unwrap()
        .stdout_str();
    assert_eq!(leftovers.trim(), "1");
    // A missing parent directory is a CommandFailed, not a half-written file.
    let err = t
        .upload("/nonexistent-dir/x", b"x", 0o644, None)
        .await
        .unwrap_err();
    assert!(
        matches!(err, TransportError::CommandFailed { .. }),
        "{err:?}"
    );
}

async fn read_file_and_sha256_report_absent_files(t: &SshTransport) {
    assert_eq!(t.read_file("/etc/does-not-exist").await.unwrap(), None);
    assert_eq!(t.sha256("/etc/does-not-exist").await.unwrap(), None);
    let hostname = t.read_file("/etc/hostname").await.unwrap().unwrap();
    assert_eq!(
        t.sha256("/etc/hostname").await.unwrap(),
        Some(sha256_hex(&hostname))
    );
    // Binary content round-trips.
    let bytes: Vec<u8> = (0..=255u8).cycle().take(70_000).collect();
    assert!(t.upload("/root/blob", &bytes, 0o600, None).await.unwrap());
    assert_eq!(t.read_file("/root/blob").await.unwrap(), Some(bytes));
}

async fn many_parallel_commands_on_one_host_succeed(t: &Arc<SshTransport>) {
    // More than sshd's default MaxSessions (10) and our channel cap (8): excess commands queue.
    let mut set = tokio::task::JoinSet::new();
    for i in 0..24 {
        let t = t.clone();
        set.spawn(async move { (i, t.run_ok(&format!("sleep 0.2; echo {i}"), T).await) });
    }
    let mut n = 0;
    while let Some(r) = set.join_next().await {
        let (i, out) = r.unwrap();
        assert_eq!(out.unwrap().stdout_str().trim(), i.to_string());
        n += 1;
    }
    assert_eq!(n, 24);
}

async fn unreachable_address_fails_fast(opts: &SshOptions, ghost: HostSpec) {
    let start = Instant::now();
    let err = SshTransport::connect_with(&ghost, opts)
        .await
        .err()
        .expect("nobody lives at .99");
    assert!(
        matches!(&err, TransportError::Unreachable { host, .. } if host == "ghost"),
        "{err:?}"
    );
    assert!(
        start.elapsed() < ghost.connect_timeout + Duration::from_secs(1),
        "took {:?}",
        start.elapsed()
    );
}

async fn wrong_key_is_auth_refused(info: &LabInfo, opts: &SshOptions, tmp: &Path) {
    let key = tmp.join("wrong_key");
    let st = std::process::Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(&key)
        .status()
        .unwrap();
    assert!(st.success());
    let mut spec = info.host_spec("pht2").unwrap();
    spec.identity_file = Some(key);
    let err = SshTransport::connect_with(&spec, opts)
        .await
        .err()
        .expect("wrong key accepted");
    assert!(
        matches!(&err, TransportError::AuthRefused { host, .. } if host == "pht2"),
        "{err:?}"
    );
}

async fn changed_host_key_is_refused(info: &LabInfo, ctl: &Path, tmp: &Path) {
    // A known_hosts that records pht2's key for pht1's address: pht1 now looks like an impostor.
    let kh = std::fs::read_to_string(&info.known_hosts).unwrap();
    let key2 = kh.lines().nth(1).unwrap().split_once(' ').unwrap().1;
    let forged = tmp.join("forged_known_hosts");
    std::fs::write(&forged, format!("{} {key2}\n", info.hosts[0].address)).unwrap();
    let o = SshOptions {
        known_hosts: forged,
        ..SshOptions::new(ctl)
    };
    let err = SshTransport::connect_with(&info.host_spec("pht1").unwrap(), &o)
        .await
        .err()
        .expect("changed host key accepted");
    assert!(
        matches!(&err, TransportError::HostKeyMismatch { host, .. } if host == "pht1"),
        "{err:?}"
    );
}

/// `become`: a non-root SSH user with passwordless sudo runs every command (and upload) as
/// root; the same user without `become` does not.
async fn non_root_user_becomes_root_through_sudo(
    root: &SshTransport,
    info: &LabInfo,
    opts: &SshOptions,
) {
    if root.run("command -v sudo", T).await.unwrap().status != 0 {
        eprintln!("SKIP become: sudo is not installed (scripts/install-deps.sh installs it)");
        return;
    }
    // sshd (UsePAM no) refuses accounts with a locked password: `-p '*'` unlocks key logins.
    root.run_ok(
        "id deployer >/dev/null 2>&1 || useradd -m -s /bin/sh deployer; usermod -p '*' deployer; \
         install -d -o deployer -m 700 /home/deployer/.ssh; \
         install -o deployer -m 600 /root/.ssh/authorized_keys /home/deployer/.ssh/authorized_keys; \
         echo 'deployer ALL=(ALL) NOPASSWD:ALL' > /etc/sudoers.d/deployer; chmod 440 /etc/sudoers.d/deployer",
        T,
    )
    .await
    .unwrap();
    let mut spec = info.host_spec("pht1").unwrap();
    spec.user = "deployer".into();

    let plain = SshTransport::connect_with(&spec, opts).await.unwrap();
    assert_ne!(
        plain.run_ok("id -u", T).await.unwrap().stdout_str().trim(),
        "0",
        "without become the command must run as the SSH user"
    );
    plain.close().await.unwrap();

    spec.r#become = true;
    let t = SshTransport::connect_with(&spec, opts).await.unwrap();
    assert_eq!(t.run_ok("id -u", T).await.unwrap().stdout_str().trim(), "0");
    let changed = t
        .upload(
            "/etc/pgherd-become-test",
            b"root only\n",
            0o600,
            Some("root"),
        )
        .await
        .unwrap();
    assert!(changed);
    let st = root
        .run_ok("stat -c '%U %a' /etc/pgherd-become-test", T)
        .await
        .unwrap();
    assert_eq!(st.stdout_str().trim(), "root 600");
    t.close().await.unwrap();
}
