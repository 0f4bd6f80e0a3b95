//! A lab host's life: its state directory (overlay layers, host key, boot scripts, console
//! log), starting it detached in its namespaces, finding its PID 1, and killing it.
//!
//! Boot chain: `setsid --fork ip netns exec <h> unshare --mount --uts --ipc --pid --fork
//! --propagation private /bin/sh <state>/<h>/boot.sh`. `boot.sh` runs as PID 1 of the new PID
//! namespace: it mounts the overlays, /proc and the tmpfs, installs keys and the init script
//! into the host's own /etc and /root, then `exec tini -s -- /bin/sh /etc/pgherd-lab/init.sh`,
//! which creates /run/sshd and /run/postgresql and `exec`s sshd in the foreground. `setsid
//! --fork` detaches the chain from the caller, so the lab outlives `pgherd lab up`.
//! A systemd host (`HostInit::Systemd`) also gets a cgroup namespace; `boot.sh` then prepares
//! /sys, the cgroup hierarchy and a private /dev, masks the units a container must not run,
//! installs sshd as a unit, and `exec`s systemd.

use std::fs;
use std::io::Read;
use std::net::{SocketAddr, TcpStream};
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use super::{HostInit, LabError, LabHost, LabInfo, LabSpec, OVERLAID_DIRS, io_err, sh};
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
    let (systemd_setup, exec_init) = match spec.init {
        HostInit::Tini => (
            String::new(),
            "exec tini -s -- /bin/sh /etc/pgherd-lab/init.sh".to_string(),
        ),
        HostInit::Systemd => (
            systemd_setup(name),
            "export container=pgherd-lab\nexec /lib/systemd/systemd --system --unit=multi-user.target"
                .to_string(),
        ),
    };
    format!(
        r#"#!/bin/sh
# pgherd lab host {name}: mounts its filesystems, then hands over to its PID 1 ({init}). Generated; do not edit.
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
{systemd_setup}mount -t tmpfs -o mode=1777 tmpfs /tmp
mount -t tmpfs -o mode=1777 tmpfs /dev/shm
hostname {name}
# Every lab host resolves the others by name (a managed block, rewritten at each boot).
sed -i '/# pgherd-lab$/d' /etc/hosts
{hosts_lines}# No DNS: the lab network has no route to the machine's resolver, and every lookup that
# misses /etc/hosts would hang for the resolver timeout (seconds) instead of failing at once.
rm -f /etc/resolv.conf
printf '# pgherd lab: no DNS, names come from /etc/hosts\nnameserver 127.0.0.1\noptions timeout:1 attempts:1\n' > /etc/resolv.conf
{exec_init}
"#,
        init = spec.init.as_str(),
    )
}

/// The sshd command line of a lab host (the same under tini and under systemd).
fn sshd_command() -> &'static str {
    "/usr/sbin/sshd -D -e -h /etc/pgherd-lab/ssh_host_ed25519_key \\
  -o PidFile=/run/sshd.pid \\
  -o PermitRootLogin=prohibit-password \\
  -o PasswordAuthentication=no \\
  -o KbdInteractiveAuthentication=no \\
  -o UsePAM=no \\
  -o StrictModes=no \\
  -o MaxSessions=64 \\
  -o MaxStartups=64:30:128 \\
  -o AuthorizedKeysFile=.ssh/authorized_keys \\
  -o UseDNS=no"
}

/// Units a systemd lab host must not run: gettys (the machine's console), udev and friends
/// (the machine's devices), timers (apt and cron jobs against the shared /usr), the machine's
/// own sshd (it would take port 22 with the machine's host keys), and e2scrub (the machine's
/// block devices).
const MASKED_UNITS: &[&str] = &[
    "getty.target",
    "console-getty.service",
    "getty@.service",
    "serial-getty@.service",
    "systemd-udevd.service",
    "systemd-udevd-control.socket",
    "systemd-udevd-kernel.socket",
    "systemd-udev-trigger.service",
    "systemd-udev-settle.service",
    "timers.target",
    "cron.service",
    "e2scrub_reap.service",
    // Kernel-wide state (superblocks, sysctls, modules, binfmt): never from a lab host.
    "systemd-remount-fs.service",
    "systemd-sysctl.service",
    "systemd-modules-load.service",
    "systemd-binfmt.service",
    "proc-sys-fs-binfmt_misc.automount",
    "proc-sys-fs-binfmt_misc.mount",
    "sys-kernel-config.mount",
    "sys-kernel-debug.mount",
    "sys-kernel-tracing.mount",
    "sys-fs-fuse-connections.mount",
    "dev-hugepages.mount",
    "systemd-pstore.service",
    "swap.target",
    "ssh.service",
    "ssh.socket",
    "systemd-networkd.service",
    "systemd-resolved.service",
    "systemd-timesyncd.service",
];

/// Stage 1 additions for a systemd host, run before /tmp and /dev/shm are mounted.
fn systemd_setup(name: &str) -> String {
    let masks: String = MASKED_UNITS
        .iter()
        .map(|u| format!("ln -sf /dev/null /etc/systemd/system/{u}\n"))
        .collect();
    format!(
        r#"# systemd as PID 1, container style (like systemd-nspawn): /sys read-only so udev and
# friends stay away from the machine's devices, a cgroup hierarchy of its own (the host was
# started in a new cgroup namespace), and a private /dev with only the usual nodes.
mount -o remount,bind,ro /sys
if [ "$(stat -fc %T /sys/fs/cgroup)" = cgroup2fs ]; then
  mount -t cgroup2 cgroup2 /sys/fs/cgroup
else
  mount -t tmpfs -o mode=0755 tmpfs /sys/fs/cgroup
  mkdir -p /sys/fs/cgroup/systemd /sys/fs/cgroup/unified
  mount -t cgroup -o none,name=systemd cgroup /sys/fs/cgroup/systemd
  mount -t cgroup2 cgroup2 /sys/fs/cgroup/unified 2>/dev/null || rmdir /sys/fs/cgroup/unified
fi
mount -t tmpfs -o mode=0755,nosuid tmpfs /dev
mknod -m 0666 /dev/null c 1 3
mknod -m 0666 /dev/zero c 1 5
mknod -m 0666 /dev/full c 1 7
mknod -m 0666 /dev/random c 1 8
mknod -m 0666 /dev/urandom c 1 9
mknod -m 0666 /dev/tty c 5 0
mkdir -m 0755 /dev/pts /dev/shm
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
echo {name} > /etc/hostname
# The machine's fstab is not this host's: no mounts, swaps or remounts from it.
: > /etc/fstab
mkdir -p /etc/systemd/system/multi-user.target.wants
{masks}cat > /etc/systemd/system/pgherd-lab-sshd.service <<'UNIT'
[Unit]
Description=pgherd lab sshd (the controller's way in)

[Service]
ExecStartPre=/usr/bin/install -d -m 0755 /run/sshd
ExecStartPre=/usr/bin/install -d -o postgres -g postgres -m 2775 /run/postgresql
ExecStart={sshd}
Restart=always

[Install]
WantedBy=multi-user.target
UNIT
ln -sf /etc/systemd/system/pgherd-lab-sshd.service /etc/systemd/system/multi-user.target.wants/pgherd-lab-sshd.service
"#,
        sshd = sshd_command(),
    )
}

/// Stage 2, run by tini: the host's services (sshd only; everything else arrives over SSH).
fn init_script() -> String {
    format!(
        r#"#!/bin/sh
# pgherd lab host init (under tini). Generated; do not edit.
set -eu
install -d -m 0755 /run/sshd
install -d -o postgres -g postgres -m 2775 /run/postgresql
# pgherd's boot hook (supervisor mode): brings deployed services back after a "reboot".
if [ -x /etc/pgherd/boot.sh ]; then /etc/pgherd/boot.sh || true; fi
exec {}
"#,
        sshd_command()
    )
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

/// The cgroup hierarchies a systemd host gets a cgroup of its own in: systemd's named v1
/// hierarchy and the unified one on hybrid machines, the root on pure cgroup v2 machines.
const CGROUP_ROOTS: &[&str] = &[
    "/sys/fs/cgroup/systemd",
    "/sys/fs/cgroup/unified",
    "/sys/fs/cgroup",
];

/// `sh -c` prologue (`$1` = host): moves the shell into `pgherd-lab/<host>` of every cgroup
/// hierarchy in [`CGROUP_ROOTS`], emptied of a previous boot's cgroups, then runs the rest of
/// its arguments.
const CGROUP_ENTER: &str = r#"set -e
h=$1; shift
for root in /sys/fs/cgroup/systemd /sys/fs/cgroup/unified /sys/fs/cgroup; do
  [ -f "$root/cgroup.procs" ] || continue
  d=$root/pgherd-lab/$h
  mkdir -p "$d"
  find "$d" -mindepth 1 -depth -type d -exec rmdir {} + 2>/dev/null || true
  echo $$ > "$d/cgroup.procs"
done
exec "$@""#;

/// Removes a systemd host's cgroups (after it is dead: empty cgroups only).
pub(super) fn remove_cgroups(host: &str) {
    fn rm_tree(p: &Path) {
        if let Ok(entries) = fs::read_dir(p) {
            for e in entries.flatten() {
                if e.file_type().is_ok_and(|t| t.is_dir()) {
                    rm_tree(&e.path());
                }
            }
        }
        let _ = fs::remove_dir(p);
    }
    for root in CGROUP_ROOTS {
        let d = Path::new(root).join("pgherd-lab").join(host);
        if d.is_dir() {
            rm_tree(&d);
        }
    }
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
    let mut cmd = Command::new("setsid");
    cmd.arg("--fork");
    if spec.init == HostInit::Systemd {
        // Each systemd host gets a cgroup of its own before its cgroup namespace is made, so the
        // namespace's root is that cgroup: hosts started from the same caller would otherwise
        // share one root, and their systemds would manage (and kill) each other's units.
        // Leftovers of a previous boot (a crash leaves the dead systemd's empty cgroups) go.
        cmd.args(["sh", "-c", CGROUP_ENTER, "sh", &h.name]);
    }
    let status = cmd
        .args(["ip", "netns", "exec", &h.name])
        .args(["unshare", "--mount", "--uts", "--ipc", "--pid", "--fork"])
        .args(match spec.init {
            // systemd manages cgroups: give it a namespace whose root is its own.
            HostInit::Systemd => &["--cgroup"][..],
            HostInit::Tini => &[][..],
        })
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
            return Err(timeout("start of its PID 1", PID1_TIMEOUT));
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
        if !fs::read_to_string(p.join("comm")).is_ok_and(|c| matches!(c.trim(), "tini" | "systemd"))
        {
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

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(init: HostInit) -> LabSpec {
        LabSpec::new("pg", 1, "10.230.0", "pgbr0", "/tmp/lab").with_init(init)
    }

    #[test]
    fn a_systemd_host_boots_systemd_with_the_machine_touching_units_masked() {
        let s = spec(HostInit::Systemd);
        let h = &s.info().hosts[0];
        let script = boot_script(&s, h);
        assert!(
            script
                .trim_end()
                .ends_with("exec /lib/systemd/systemd --system --unit=multi-user.target")
        );
        for u in [
            "getty.target",
            "systemd-udevd.service",
            "timers.target",
            "ssh.service",
            "systemd-remount-fs.service",
        ] {
            assert!(
                script.contains(&format!("ln -sf /dev/null /etc/systemd/system/{u}\n")),
                "{u}"
            );
        }
        assert!(script.contains("mount -o remount,bind,ro /sys"));
        assert!(script.contains(": > /etc/fstab"));
        assert!(script.contains("ExecStart=/usr/sbin/sshd -D -e"));
        // The private /dev comes before /dev/shm is mounted into it.
        assert!(script.find("tmpfs /dev\n").unwrap() < script.find("tmpfs /dev/shm").unwrap());
    }

    #[test]
    fn a_tini_host_keeps_the_machines_dev_and_runs_sshd_under_tini() {
        let s = spec(HostInit::Tini);
        let script = boot_script(&s, &s.info().hosts[0]);
        assert!(script.contains("exec tini -s -- /bin/sh /etc/pgherd-lab/init.sh"));
        assert!(!script.contains("systemd"));
        assert!(init_script().contains("exec /usr/sbin/sshd -D -e"));
    }
}
