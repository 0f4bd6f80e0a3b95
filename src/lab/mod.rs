//! The local multi-host lab: N "hosts" on this machine, each a network namespace on a bridge,
//! a private mount namespace whose /etc, /var, /root, /usr/local, /opt, /home and /srv are
//! overlays kept in the lab's state directory (its "disk"), its own PID namespace with `tini`
//! as PID 1, and `sshd` as its only service. The controller (this process, root namespace)
//! reaches every host over SSH with a lab key, exactly like real servers.
//!
//! With [`HostInit::Systemd`] a host boots systemd as its PID 1 instead (container mode: its
//! own cgroup namespace and hierarchy, a private /dev, read-only /sys, gettys/udev/timers
//! masked), and sshd is a unit of it, so pgherd's systemd mode runs against a real systemd.
//!
//! Faults: [`crash`] kills a host's PID 1 (power cut; the disk survives), [`boot`] starts it
//! again, [`partition`] cuts a host off from the other hosts (not from the controller), [`heal`]
//! undoes that. See `/work/shared/reference/lab.md` for the verified recipe this follows.
//!
//! Everything here is synchronous (it only runs local commands), needs root, and is
//! idempotent: [`up`] on a half-built or partly crashed lab creates or boots only what is
//! missing. Host processes are detached (`setsid --fork`), so the lab outlives the process that
//! built it.

mod host;
mod net;

use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::transport::HostSpec;

/// Marker file that identifies a directory as a lab state directory (guards `down --purge`).
const MARKER: &str = ".pgherd-lab";

/// Directories overlaid per host. Their contents on this machine are the lower layer; each
/// host writes to its own upper layer under `<state_dir>/<host>/`.
pub const OVERLAID_DIRS: &[&str] = &["etc", "var", "root", "usr/local", "opt", "home", "srv"];

/// What to build.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabSpec {
    /// Lab name; hosts are named `<name>1`, `<name>2`, ... (also their netns and hostname).
    /// Lowercase letters, digits and `-`, at most 8 characters (interface names are limited).
    pub name: String,
    /// Number of hosts (1..=99).
    pub hosts: usize,
    /// The first three octets of the /24 the lab uses, e.g. `"10.230.0"`: the controller gets
    /// `.1` on the bridge, host *i* gets `.(10 + i)`.
    pub subnet: String,
    /// Bridge name in the root namespace (at most 15 characters).
    pub bridge: String,
    /// Where keys, overlay layers, logs and pid files live. Must be an absolute path outside the
    /// overlaid directories (overlayfs refuses layers nested in their own lower directory).
    pub state_dir: PathBuf,
    /// What runs as each host's PID 1.
    pub init: HostInit,
}

/// A lab host's PID 1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum HostInit {
    /// `tini` reaping children and running sshd: no service manager (pgherd's supervisor mode).
    #[default]
    Tini,
    /// systemd, booted in container mode (pgherd's systemd mode).
    Systemd,
}

impl HostInit {
    pub fn as_str(self) -> &'static str {
        match self {
            HostInit::Tini => "tini",
            HostInit::Systemd => "systemd",
        }
    }
}

/// File in the state directory recording the lab's [`HostInit`] (so `boot` of an existing lab
/// uses the same PID 1 as `up` did).
pub const INIT_FILE: &str = "init";

/// File in the state directory recording what `up` built (name, hosts, subnet, bridge, init),
/// so that every later verb given only the lab directory acts on *that* lab, never on the
/// defaults (which may name another running lab).
pub const LAB_FILE: &str = "lab.json";

/// The content of [`LAB_FILE`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
struct RecordedLab {
    name: String,
    hosts: usize,
    subnet: String,
    bridge: String,
    init: String,
}

/// A host of the lab.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabHost {
    /// Host name, network namespace name and hostname.
    pub name: String,
    pub address: String,
    /// Outer end of the host's veth pair (on the bridge).
    pub veth: String,
}

/// Where the built lab is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabInfo {
    pub name: String,
    /// The controller's address on the bridge.
    pub controller_address: String,
    pub hosts: Vec<LabHost>,
    /// Private key (ed25519, no passphrase) accepted by every host for root.
    pub key_path: PathBuf,
    /// A known_hosts file holding every host's key (for strict host key checking).
    pub known_hosts: PathBuf,
    pub state_dir: PathBuf,
}

impl LabInfo {
    /// The host named `host`.
    pub fn host(&self, host: &str) -> Option<&LabHost> {
        self.hosts.iter().find(|h| h.name == host)
    }

    /// The first host (in order) that is not `host`.
    pub fn other_than(&self, host: &str) -> Option<&LabHost> {
        self.hosts.iter().find(|h| h.name != host)
    }

    /// How to reach `host` with [`crate::transport::SshTransport`]: root, the lab key.
    pub fn host_spec(&self, host: &str) -> Option<HostSpec> {
        let h = self.hosts.iter().find(|h| h.name == host)?;
        let mut s = HostSpec::new(&h.name, &h.address);
        s.identity_file = Some(self.key_path.clone());
        s.connect_timeout = Duration::from_secs(5);
        Some(s)
    }

    /// The host's console log (boot script and sshd output): the first place to look when a
    /// host does not come up.
    pub fn console_log(&self, host: &str) -> PathBuf {
        self.state_dir.join(host).join("console.log")
    }

    /// [`LabInfo::host_spec`] for every host, in order.
    pub fn host_specs(&self) -> Vec<HostSpec> {
        self.hosts
            .iter()
            .filter_map(|h| self.host_spec(&h.name))
            .collect()
    }
}

/// One host's state as seen from the controller.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HostStatus {
    pub name: String,
    pub address: String,
    /// Whether the host's PID 1 (`tini`) is running.
    pub up: bool,
    /// PID of the host's `tini` in the root PID namespace.
    pub pid: Option<u32>,
    /// Whether partition rules are installed in the host's netns.
    pub partitioned: bool,
}

impl fmt::Display for HostStatus {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{:<12} {:<15} {}",
            self.name,
            self.address,
            if self.up { "up" } else { "down" }
        )?;
        if let Some(pid) = self.pid {
            write!(f, " (pid {pid})")?;
        }
        if self.partitioned {
            write!(f, " partitioned")?;
        }
        Ok(())
    }
}

/// Why a lab operation failed.
#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error("the lab needs root (it creates network namespaces and mounts)")]
    NotRoot,
    #[error("invalid lab spec: {0}")]
    InvalidSpec(String),
    #[error("lab has no host named {0}")]
    UnknownHost(String),
    #[error("lab host {0} is not running")]
    NotRunning(String),
    #[error("lab host {host}: {what} did not happen within {timeout:?} (see {log})")]
    BootTimeout {
        host: String,
        what: String,
        timeout: Duration,
        log: String,
    },
    #[error("`{cmd}` failed (status {status}): {stderr}")]
    Command {
        cmd: String,
        status: i32,
        stderr: String,
    },
    #[error("i/o error while {what}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
}

pub(crate) fn io_err(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> LabError {
    let what = what.into();
    move |source| LabError::Io { what, source }
}

impl LabSpec {
    pub fn new(
        name: impl Into<String>,
        hosts: usize,
        subnet: impl Into<String>,
        bridge: impl Into<String>,
        state_dir: impl Into<PathBuf>,
    ) -> LabSpec {
        LabSpec {
            name: name.into(),
            hosts,
            subnet: subnet.into(),
            bridge: bridge.into(),
            state_dir: state_dir.into(),
            init: HostInit::Tini,
        }
    }

    /// The same lab with `init` as every host's PID 1.
    pub fn with_init(mut self, init: HostInit) -> LabSpec {
        self.init = init;
        self
    }

    /// The [`HostInit`] an existing lab was brought up with (its state directory says), if any.
    pub fn recorded_init(state_dir: &Path) -> Option<HostInit> {
        match std::fs::read_to_string(state_dir.join(INIT_FILE))
            .ok()?
            .trim()
        {
            "systemd" => Some(HostInit::Systemd),
            "tini" => Some(HostInit::Tini),
            _ => None,
        }
    }

    /// The lab that [`up`] recorded in `state_dir`; `Ok(None)` when there is none (not a lab
    /// directory yet, or made by a pgherd that did not record it). A record that cannot be
    /// read or parsed is an error, not "no lab": guessing could tear down a different lab.
    pub fn recorded(state_dir: &Path) -> Result<Option<LabSpec>, LabError> {
        let path = state_dir.join(LAB_FILE);
        let text = match std::fs::read_to_string(&path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(format!("reading {}", path.display()))(e)),
        };
        let r: RecordedLab = serde_json::from_str(&text).map_err(|e| {
            LabError::InvalidSpec(format!("{}: not a lab record: {e}", path.display()))
        })?;
        let init = match r.init.as_str() {
            "systemd" => HostInit::Systemd,
            "tini" => HostInit::Tini,
            other => {
                return Err(LabError::InvalidSpec(format!(
                    "{}: unknown init {other:?}",
                    path.display()
                )));
            }
        };
        let spec = LabSpec::new(r.name, r.hosts, r.subnet, r.bridge, state_dir).with_init(init);
        spec.validate()?;
        Ok(Some(spec))
    }

    fn record(&self) -> Result<(), LabError> {
        let r = RecordedLab {
            name: self.name.clone(),
            hosts: self.hosts,
            subnet: self.subnet.clone(),
            bridge: self.bridge.clone(),
            init: self.init.as_str().to_string(),
        };
        let text = serde_json::to_string_pretty(&r).expect("plain data serializes") + "\n";
        std::fs::write(self.state_dir.join(LAB_FILE), text).map_err(io_err("recording the lab"))
    }

    /// The demo lab: hosts `pg1..pg3` on bridge `pgherd0`, 10.230.0.0/24. `state_dir` must lie
    /// outside the overlaid directories (e.g. `<repo>/.lab`, which .gitignore already ignores).
    pub fn demo(state_dir: impl Into<PathBuf>) -> LabSpec {
        LabSpec::new("pg", 3, "10.230.0", "pgherd0", state_dir)
    }

    /// Host names in order (`<name>1` ...).
    pub fn host_names(&self) -> Vec<String> {
        (1..=self.hosts)
            .map(|i| format!("{}{i}", self.name))
            .collect()
    }

    pub fn controller_address(&self) -> String {
        format!("{}.1", self.subnet)
    }

    /// Static description of the lab (no side effects).
    pub fn info(&self) -> LabInfo {
        LabInfo {
            name: self.name.clone(),
            controller_address: self.controller_address(),
            hosts: (1..=self.hosts)
                .map(|i| {
                    let name = format!("{}{i}", self.name);
                    LabHost {
                        address: format!("{}.{}", self.subnet, 10 + i),
                        veth: format!("veth-{name}"),
                        name,
                    }
                })
                .collect(),
            key_path: self.state_dir.join("id_ed25519"),
            known_hosts: self.state_dir.join("known_hosts"),
            state_dir: self.state_dir.clone(),
        }
    }

    fn host(&self, name: &str) -> Result<LabHost, LabError> {
        self.info()
            .hosts
            .into_iter()
            .find(|h| h.name == name)
            .ok_or_else(|| LabError::UnknownHost(name.to_string()))
    }

    /// Checks names, subnet and state directory before anything is touched.
    pub fn validate(&self) -> Result<(), LabError> {
        let bad = |m: String| Err(LabError::InvalidSpec(m));
        let name_ok = |s: &str| {
            !s.is_empty()
                && s.bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
                && s.as_bytes()[0].is_ascii_lowercase()
        };
        if !name_ok(&self.name) || self.name.len() > 8 {
            return bad(format!(
                "name {:?}: use 1-8 lowercase letters, digits or '-', starting with a letter",
                self.name
            ));
        }
        if !(1..=99).contains(&self.hosts) {
            return bad(format!("hosts must be 1..=99 (got {})", self.hosts));
        }
        if !name_ok(&self.bridge) || self.bridge.len() > 15 {
            return bad(format!(
                "bridge {:?}: use 1-15 lowercase letters, digits or '-'",
                self.bridge
            ));
        }
        let octets: Vec<&str> = self.subnet.split('.').collect();
        if octets.len() != 3 || octets.iter().any(|o| o.parse::<u8>().is_err()) {
            return bad(format!(
                "subnet {:?}: give the first three octets, e.g. 10.230.0",
                self.subnet
            ));
        }
        if !self.state_dir.is_absolute() {
            return bad(format!(
                "state_dir {} must be absolute",
                self.state_dir.display()
            ));
        }
        for d in OVERLAID_DIRS {
            if self.state_dir.starts_with(Path::new("/").join(d)) {
                return bad(format!(
                    "state_dir {} is inside /{d}, which every host overlays",
                    self.state_dir.display()
                ));
            }
        }
        Ok(())
    }
}

fn require_root() -> Result<(), LabError> {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } != 0 {
        return Err(LabError::NotRoot);
    }
    Ok(())
}

/// Runs a local command, returning its stdout; a non-zero exit is [`LabError::Command`].
pub(crate) fn sh(program: &str, args: &[&str]) -> Result<String, LabError> {
    let out = Command::new(program)
        .args(args)
        .output()
        .map_err(io_err(format!("running {program}")))?;
    if !out.status.success() {
        return Err(LabError::Command {
            cmd: format!("{program} {}", args.join(" ")),
            status: out.status.code().unwrap_or(-1),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Builds the lab, or repairs it: creates the bridge, namespaces, links, keys and state
/// directories that are missing, boots every host that is not running, and waits until every
/// host's sshd answers.
pub fn up(spec: &LabSpec) -> Result<LabInfo, LabError> {
    spec.validate()?;
    require_root()?;
    let info = spec.info();
    std::fs::create_dir_all(&spec.state_dir).map_err(io_err("creating the state directory"))?;
    std::fs::write(spec.state_dir.join(MARKER), format!("{}\n", spec.name))
        .map_err(io_err("writing the lab marker"))?;
    std::fs::write(
        spec.state_dir.join(INIT_FILE),
        format!("{}\n", spec.init.as_str()),
    )
    .map_err(io_err("writing the lab's init kind"))?;
    spec.record()?;
    host::ensure_keypair(&info.key_path, &format!("pgherd-lab-{}", spec.name))?;
    net::ensure_bridge(spec)?;
    for h in &info.hosts {
        net::ensure_host_net(spec, h)?;
        host::prepare(spec, h)?;
    }
    host::write_known_hosts(spec, &info)?;
    // Boot everything first, then wait: hosts start in parallel.
    for h in &info.hosts {
        if host::find_pid1(&h.name)?.is_none() {
            host::spawn(spec, h)?;
        }
    }
    for h in &info.hosts {
        host::wait_booted(spec, h)?;
    }
    Ok(info)
}

/// Stops every host (SIGKILL of its PID 1) and removes the namespaces, veth pairs and the
/// bridge. With `purge`, also deletes the state directory (disks, keys) — only if it carries
/// the lab marker, so a mistyped path is never wiped.
pub fn down(spec: &LabSpec, purge: bool) -> Result<(), LabError> {
    spec.validate()?;
    require_root()?;
    let info = spec.info();
    for h in &info.hosts {
        host::kill(&h.name)?;
        host::remove_cgroups(&h.name);
        net::remove_host_net(h)?;
    }
    net::remove_bridge(spec)?;
    if purge && spec.state_dir.join(MARKER).exists() {
        std::fs::remove_dir_all(&spec.state_dir).map_err(io_err("removing the state directory"))?;
    }
    Ok(())
}

/// Lists the hosts with their addresses and whether they are up.
pub fn status(spec: &LabSpec) -> Result<Vec<HostStatus>, LabError> {
    spec.validate()?;
    require_root()?;
    spec.info()
        .hosts
        .iter()
        .map(|h| {
            let pid = host::find_pid1(&h.name)?;
            Ok(HostStatus {
                name: h.name.clone(),
                address: h.address.clone(),
                up: pid.is_some(),
                pid,
                partitioned: net::is_partitioned(&h.name),
            })
        })
        .collect()
}

/// Power-cuts `host`: SIGKILL to its PID 1, so every process of the host dies at once. Its
/// disk (overlay upper layers) is kept; [`boot`] starts it again.
pub fn crash(spec: &LabSpec, host: &str) -> Result<(), LabError> {
    spec.validate()?;
    require_root()?;
    let h = spec.host(host)?;
    if !host::kill(&h.name)? {
        return Err(LabError::NotRunning(h.name));
    }
    Ok(())
}

/// Starts a stopped host again with its disk intact and waits for its sshd (no-op when it is
/// already running).
pub fn boot(spec: &LabSpec, host: &str) -> Result<(), LabError> {
    spec.validate()?;
    require_root()?;
    let h = spec.host(host)?;
    if host::find_pid1(&h.name)?.is_none() {
        net::ensure_host_net(spec, &h)?;
        host::prepare(spec, &h)?;
        host::spawn(spec, &h)?;
    }
    host::wait_booted(spec, &h)
}

/// Cuts `host` off from the other lab hosts while the controller still reaches it.
pub fn partition(spec: &LabSpec, host: &str) -> Result<(), LabError> {
    spec.validate()?;
    require_root()?;
    let h = spec.host(host)?;
    net::partition(spec, &h.name)
}

/// Removes the partition rules of `host`.
pub fn heal(spec: &LabSpec, host: &str) -> Result<(), LabError> {
    spec.validate()?;
    require_root()?;
    let h = spec.host(host)?;
    net::heal(&h.name)
}

/// The inventory YAML describing the lab: every host has all roles (postgres, etcd, haproxy)
/// and is reached as root with the lab key. Field names follow the inventory schema
/// (`src/inventory/`); this is the one place to adjust if that schema moves.
pub fn inventory_yaml(spec: &LabSpec) -> String {
    let info = spec.info();
    let mut y = String::new();
    y.push_str(&format!(
        "# Inventory of the pgherd lab {:?} (generated by pgherd; edit freely).\n",
        spec.name
    ));
    y.push_str(&format!("cluster: {}\n", spec.name));
    y.push_str("ssh:\n  user: root\n  port: 22\n");
    y.push_str(&format!(
        "  identity_file: {}\n",
        yaml_str(&info.key_path.display().to_string())
    ));
    y.push_str("hosts:\n");
    for h in &info.hosts {
        y.push_str(&format!(
            "  - name: {}\n    address: {}\n    roles: [postgres, etcd, haproxy]\n",
            h.name, h.address
        ));
    }
    y
}

/// Writes [`inventory_yaml`] to `path`.
pub fn write_inventory(spec: &LabSpec, path: &Path) -> Result<(), LabError> {
    spec.validate()?;
    std::fs::write(path, inventory_yaml(spec)).map_err(io_err(format!(
        "writing the lab inventory {}",
        path.display()
    )))
}

/// A YAML double-quoted scalar (paths may contain anything).
fn yaml_str(s: &str) -> String {
    serde_json::to_string(s).expect("strings always serialize")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec() -> LabSpec {
        LabSpec::new("pg", 3, "10.230.0", "pgbr0", "/tmp/lab")
    }

    #[test]
    fn hosts_are_numbered_from_eleven() {
        let info = spec().info();
        let names: Vec<_> = info.hosts.iter().map(|h| h.name.as_str()).collect();
        assert_eq!(names, ["pg1", "pg2", "pg3"]);
        assert_eq!(info.hosts[0].address, "10.230.0.11");
        assert_eq!(info.hosts[2].veth, "veth-pg3");
        assert_eq!(info.controller_address, "10.230.0.1");
    }

    #[test]
    fn rejects_state_dir_inside_an_overlaid_dir() {
        let mut s = spec();
        s.state_dir = "/var/lib/pgherd/lab".into();
        assert!(matches!(s.validate(), Err(LabError::InvalidSpec(m)) if m.contains("/var")));
        s.state_dir = "/srv2/lab".into();
        assert!(s.validate().is_ok());
    }

    #[test]
    fn rejects_bad_names_and_subnets() {
        let mut s = spec();
        s.name = "TooLongName".into();
        assert!(s.validate().is_err());
        let mut s = spec();
        s.subnet = "10.230.0.0/24".into();
        assert!(s.validate().is_err());
        let mut s = spec();
        s.hosts = 0;
        assert!(s.validate().is_err());
    }

    #[test]
    fn a_recorded_lab_reads_back_as_the_same_spec() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(LabSpec::recorded(dir.path()).unwrap(), None);
        let s = LabSpec::new("bd", 2, "10.240.3", "bdbr0", dir.path()).with_init(HostInit::Systemd);
        s.record().unwrap();
        assert_eq!(LabSpec::recorded(dir.path()).unwrap(), Some(s));
        std::fs::write(dir.path().join(LAB_FILE), "{").unwrap();
        assert!(matches!(
            LabSpec::recorded(dir.path()),
            Err(LabError::InvalidSpec(m)) if m.contains("lab.json")
        ));
    }

    #[test]
    fn inventory_lists_every_host_with_all_roles() {
        let y = inventory_yaml(&spec());
        assert!(y.contains("  - name: pg2\n    address: 10.230.0.12\n"));
        assert_eq!(y.matches("roles: [postgres, etcd, haproxy]").count(), 3);
        assert!(y.contains("identity_file: \"/tmp/lab/id_ed25519\""));
        let v: serde_json::Value = crate::yaml::from_str(&y).unwrap();
        assert_eq!(v["hosts"][0]["address"], "10.230.0.11");
    }
}
