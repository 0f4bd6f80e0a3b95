//! A lab host's life: its state directory (overlay layers, host key, boot scripts, console
//! log), starting it detached in its namespaces, finding its PID 1, and killing it.
//!
//! Boot chain: `setsid --fork ip netns exec <h> unshare --mount --uts --ipc --pid --fork
//! --propagation private /bin/sh <state>/<h>/boot.sh`. `boot.sh` runs as PID 1 of the new PID
//! namespace: it mounts the overlays, /proc and the tmpfs, installs keys and the init script
//! into the host's own /etc and /root, then `exec tini -s -- /bin/sh /etc/pgherd-lab/init.sh`,
//! which creates /run/sshd and /run/postgresql and `exec`s sshd in the foreground. `setsid
//! --fork` detaches the chain from the caller, so the lab outlives `pgherd lab up`.

use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{LabError, LabHost, LabInfo, LabSpec, OVERLAID_DIRS, io_err, sh};
use crate::transport::shell_quote;

/// How long a booting host may take until its PID 1 shows up (a fork and a few mounts).
const PID1_TIMEOUT: Duration = Duration::from_secs(10);
/// How long until its sshd accepts connections (key loading; slower under load).
const SSHD_TIMEOUT: Duration = Duration::from_secs(20);
/// How long a killed host may take to disappear (the kernel kills the whole PID namespace).
const KILL_TIMEOUT: Duration = Duration::from_secs(10);

fn host_dir(spec: &LabSpec, h: &LabHost) -> PathBuf {
    spec.state_dir.join(&h.name)
}

fn console_log(spec: &LabSpec, h: &LabHost) -> PathBuf {
    host_dir(spec, h).join("console.log")
}

/// Creates an ed25519 keypair without passphrase at `path` (and `path.pub`) unless present.
pub(super) fn ensure_keypair(path: &Path, comment: &str) -> Result<(), LabError> {
    if path.exists() && path.with_extension("pub").exists() {
        return Ok(());
    }
    let _ = fs::remove_file(path);
    let p = path.display().to_string();
    sh(
        "ssh-keygen",
        &["-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", &p],
    )?;
    Ok(())
}

/// Prepares the host's state directory: overlay layer directories, its own sshd host key, and
/// the boot/init scripts (rewritten every time so they follow the current code).
pub(super) fn prepare(spec: &LabSpec, h: &LabHost) -> Result<(), LabError> {
    let dir = host_dir(spec, h);
    for d in OVERLAID_DIRS {
        let n = d.replace('/', "_");
        for suffix in ["up", "work"] {
            fs::create_dir_all(dir.join(format!("{n}-{suffix}")))
                .map_err(io_err("creating overlay directories"))?;
        }
    }
    ensure_keypair(&dir.join("ssh_host_ed25519_key"), &h.name)?;
    let boot = boot_script(spec, h);
    let init = init_script();
    for (name, text) in [("boot.sh", boot), ("init.sh", init)] {
        let p = dir.join(name);
        fs::write(&p, text).map_err(io_err(format!("writing {}", p.display())))?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755))
            .map_err(io_err("chmod of a boot script"))?;
    }
    Ok(())
}

/// Stage 1, PID 1 of the host's fresh PID namespace, in its private mount namespace.
fn boot_script(spec: &LabSpec, h: &LabHost) -> String {
    let dir = shell_quote(&host_dir(spec, h).display().to_string());
    let pubkey = shell_quote(&spec.state_dir.join("id_ed25519.pub").display().to_string());
    let dirs = OVERLAID_DIRS.join(" ");
    let name = &h.name;
    let hosts_lines: String = spec
        .info()
        .hosts
        .iter()
        .map(|o| {
            format!(
                "echo '{} {} # pgherd-lab' >> /etc/hosts\n",
                o.address, o.name
            )
        })
        .collect();
    format!(
        r#"#!/bin/sh
# pgherd lab host {name}: mounts its filesystems, then hands over to tini. Generated; do not edit.
set -eu
S={dir}
echo "boot {name} at $(date -u +%FT%TZ)"
for d in {dirs}; do
  [ -d "/$d" ] || continue
  n=$(echo "$d" | tr / _)
  mount -t overlay overlay -o "lowerdir=/$d,upperdir=$S/$n-up,workdir=$S/$n-work" "/$d"
done
# Never touch the machine's own files: stop unless /etc and /root are this host's overlays.
mountpoint -q /etc && mountpoint -q /root || {{ echo "overlays missing" >&2; exit 1; }}
mount -t proc proc /proc
mount -t tmpfs -o mode=0755 tmpfs /run
# Copy what the host needs out of the state directory before /tmp is covered (it may live there).
mkdir -p /etc/pgherd-lab /root/.ssh
install -m 0600 "$S/ssh_host_ed25519_key" /etc/pgherd-lab/ssh_host_ed25519_key
install -m 0755 "$S/init.sh" /etc/pgherd-lab/init.sh
chmod 0700 /root/.ssh
install -m 0600 {pubkey} /root/.ssh/authorized_keys
# A lean root shell: sshd runs every command through it, and root's bash profile here costs
# ~70 ms per command.
[ "$(getent passwd root | cut -d: -f7)" = /bin/sh ] || usermod -s /bin/sh root
mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
hostname {name}
# Every lab host resolves the others by name (a managed block, rewritten at each boot).
sed -i '/# pgherd-lab$/d' /etc/hosts
{hosts_lines}# No DNS: the lab network has no route to the machine's resolver, and every lookup that
# misses /etc/hosts would hang for the resolver timeout (seconds) instead of failing at once.
rm -f /etc/resolv.conf
printf '# pgherd lab: no DNS, names come from /etc/hosts\nnameserver 127.0.0.1\noptions timeout:1 attempts:1\n' > /etc/resolv.conf
exec tini -s -- /bin/sh /etc/pgherd-lab/init.sh
"#
    )
}

/// Stage 2, run by tini: the host's services (sshd only; everything else arrives over SSH).
fn init_script() -> String {
    r#"#!/bin/sh
# pgherd lab host init (under tini). Generated; do not edit.
set -eu
install -d -m 0755 /run/sshd
install -d -o postgres -g postgres -m 2775 /run/postgresql
# pgherd's boot hook (supervisor mode): brings deployed services back after a "reboot".
if [ -x /etc/pgherd/boot.sh ]; then /etc/pgherd/boot.sh || true; fi
exec /usr/sbin/sshd -D -e -h /etc/pgherd-lab/ssh_host_ed25519_key \
  -o PidFile=/run/sshd.pid \
  -o PermitRootLogin=prohibit-password \
  -o PasswordAuthentication=no \
  -o KbdInteractiveAuthentication=no \
  -o UsePAM=no \
  -o StrictModes=no \
  -o MaxSessions=64 \
  -o MaxStartups=64:30:128 \
  -o AuthorizedKeysFile=.ssh/authorized_keys \
  -o UseDNS=no
"#
    .to_string()
}

/// Writes `<state>/known_hosts` with every host's key, for strict host key checking.
pub(super) fn write_known_hosts(spec: &LabSpec, info: &LabInfo) -> Result<(), LabError> {
    let mut text = String::new();
    for h in &info.hosts {
        let p = host_dir(spec, h).join("ssh_host_ed25519_key.pub");
        let key = fs::read_to_string(&p).map_err(io_err(format!("reading {}", p.display())))?;
        let mut parts = key.split_whitespace();
        let (Some(kind), Some(body)) = (parts.next(), parts.next()) else {
            continue;
        };
        text.push_str(&format!("{} {kind} {body}\n", h.address));
    }
    fs::write(&info.known_hosts, text).map_err(io_err("writing the lab known_hosts"))
}

/// Starts the host detached (see the module doc); does not wait for it.
pub(super) fn spawn(spec: &LabSpec, h: &LabHost) -> Result<(), LabError> {
    let log = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(console_log(spec, h))
        .map_err(io_err("opening the console log"))?;
    let log2 = log.try_clone().map_err(io_err("opening the console log"))?;
    let boot = host_dir(spec, h).join("boot.sh");
    let status = Command::new("setsid")
        .arg("--fork")
        .args(["ip", "netns", "exec", &h.name])
        .args(["unshare", "--mount", "--uts", "--ipc", "--pid", "--fork"])
        .args(["--propagation", "private", "/bin/sh"])
        .arg(&boot)
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log2)
        .status()
        .map_err(io_err("starting a lab host"))?;
    if !status.success() {
        return Err(LabError::Command {
            cmd: format!("setsid --fork ip netns exec {} unshare ...", h.name),
            status: status.code().unwrap_or(-1),
            stderr: "see the console log".into(),
        });
    }
    Ok(())
}

/// Waits for the host's PID 1 and its sshd; records the PID in `<state>/<host>/pid`.
pub(super) fn wait_booted(spec: &LabSpec, h: &LabHost) -> Result<(), LabError> {
    let log = console_log(spec, h).display().to_string();
    let timeout = |what: &str, t| LabError::BootTimeout {
        host: h.name.clone(),
        what: what.into(),
        timeout: t,
        log: log.clone(),
    };
    let start = Instant::now();
    let pid = loop {
        if let Some(pid) = find_pid1(&h.name)? {
            break pid;
        }
        if start.elapsed() > PID1_TIMEOUT {
            return Err(timeout("start of its PID 1 (tini)", PID1_TIMEOUT));
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    fs::write(host_dir(spec, h).join("pid"), format!("{pid}\n"))
        .map_err(io_err("writing the host pid file"))?;
    let addr: SocketAddr = format!("{}:22", h.address)
        .parse()
        .map_err(|_| LabError::InvalidSpec(format!("bad address {}", h.address)))?;
    let start = Instant::now();
    while !sshd_answers(&addr) {
        if start.elapsed() > SSHD_TIMEOUT {
            return Err(timeout("sshd answering on port 22", SSHD_TIMEOUT));
        }
        if find_pid1(&h.name)?.is_none() {
            return Err(timeout("boot (the host exited)", start.elapsed()));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

/// Whether an SSH server greets us at `addr`.
fn sshd_answers(addr: &SocketAddr) -> bool {
    let Ok(mut s) = TcpStream::connect_timeout(addr, Duration::from_millis(500)) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    let mut buf = [0u8; 4];
    s.read_exact(&mut buf).is_ok() && &buf == b"SSH-"
}

/// The PID (root namespace) of the host's `tini`: the live process named `tini` that is PID 1
/// of its PID namespace and sits in the host's network namespace. Matching by command line
/// would also find `ip netns exec`/`unshare`, which carry the same arguments (lab.md).
pub(super) fn find_pid1(host: &str) -> Result<Option<u32>, LabError> {
    let Ok(meta) = fs::metadata(Path::new("/run/netns").join(host)) else {
        return Ok(None);
    };
    let want_ns = format!("net:[{}]", meta.ino());
    let entries = fs::read_dir("/proc").map_err(io_err("listing /proc"))?;
    for e in entries.flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else {
            continue;
        };
        let p = e.path();
        if !fs::read_to_string(p.join("comm")).is_ok_and(|c| c.trim() == "tini") {
            continue;
        }
        let in_ns = fs::read_link(p.join("ns/net"))
            .map(|l| l.to_string_lossy() == want_ns)
            .unwrap_or(false);
        if !in_ns {
            continue;
        }
        let Ok(status) = fs::read_to_string(p.join("status")) else {
            continue;
        };
        let zombie = status
            .lines()
            .any(|l| l.starts_with("State:") && l.contains('Z'));
        let is_ns_init = status
            .lines()
            .find(|l| l.starts_with("NSpid:"))
            .and_then(|l| l.split_whitespace().last())
            == Some("1");
        if !zombie && is_ns_init {
            return Ok(Some(pid));
        }
    }
    Ok(None)
}

/// SIGKILLs the host's PID 1 and waits until it is gone (the kernel then kills every other
/// process of the host). Returns whether the host was running.
pub(super) fn kill(host: &str) -> Result<bool, LabError> {
    let Some(pid) = find_pid1(host)? else {
        return Ok(false);
    };
    // SAFETY: kill(2) with a pid we just identified; a stale pid only yields ESRCH.
    unsafe {
        libc::kill(pid as libc::pid_t, libc::SIGKILL);
    }
    let start = Instant::now();
    while find_pid1(host)? == Some(pid) {
        if start.elapsed() > KILL_TIMEOUT {
            return Err(LabError::BootTimeout {
                host: host.to_string(),
                what: "exit after SIGKILL".into(),
                timeout: KILL_TIMEOUT,
                log: format!("/proc/{pid}"),
            });
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    // PID 1 is gone once the namespace's other processes have been reaped by the kernel, but
    // tini stays a zombie until `unshare` collects it: wait for that too, so that a following
    // boot never races with the old host's sockets.
    let start = Instant::now();
    while Path::new(&format!("/proc/{pid}")).exists() && start.elapsed() < KILL_TIMEOUT {
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(true)
}
