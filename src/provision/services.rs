//! Service supervision on target hosts: which services pgherd runs (etcd, the agent, HAProxy),
//! how each is started, restarted, reloaded and probed, under either of two modes:
//!
//! - **systemd** — used when the host's PID 1 is systemd and `systemctl` exists (detected as a
//!   fact). pgherd ships unit files (rendered from templates) and drives `systemctl`.
//! - **supervisor** — everything else (containers, the namespace lab). A tiny POSIX-shell loop,
//!   [`SUPERVISE_PATH`], runs `/etc/pgherd/services/<name>.run` and restarts it one second after
//!   it exits. It is started detached with `setsid -f` (so it outlives the SSH channel), keeps
//!   its own pid in `/run/pgherd/<name>.sup` and the service's pid in `/run/pgherd/<name>.pid`,
//!   and appends output to `/var/log/pgherd/<name>.log`. [`BOOT_PATH`] restarts every service
//!   after a reboot: the host's init runs it (the lab's init script does, before `sshd`).
//!
//! Everything here is pure: functions return shell text; `apply` runs it over a transport.

use std::fmt;

/// Where the supervisor loop is installed.
pub const SUPERVISE_PATH: &str = "/usr/local/lib/pgherd/supervise";
/// Boot hook: starts all supervised services (run by the host's init when present).
pub const BOOT_PATH: &str = "/etc/pgherd/boot.sh";
/// Directory of the per-service run files (`<name>.run`).
pub const RUN_DIR: &str = "/etc/pgherd/services";
/// Pid files (tmpfs: gone after a reboot, which is what we want).
pub const PID_DIR: &str = "/run/pgherd";
/// Service logs in supervisor mode.
pub const LOG_DIR: &str = "/var/log/pgherd";
/// Where the agent binary is installed.
pub const AGENT_BIN_PATH: &str = "/usr/local/bin/pgherd-agent";

/// How services are managed on a host (a fact, see [`crate::provision::facts`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceMode {
    Systemd,
    Supervisor,
}

impl fmt::Display for ServiceMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceMode::Systemd => "systemd",
            ServiceMode::Supervisor => "supervisor",
        })
    }
}

/// The long-running services pgherd deploys.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Service {
    Etcd,
    Agent,
    Haproxy,
}

/// What to do to a service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ServiceOp {
    Start,
    /// Stop then start: for binaries and run files (a new process image is needed).
    Restart,
    /// Re-read configuration in place (HAProxy: seamless reload; agent: SIGHUP).
    Reload,
}

impl fmt::Display for ServiceOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            ServiceOp::Start => "start",
            ServiceOp::Restart => "restart",
            ServiceOp::Reload => "reload",
        })
    }
}

impl Service {
    pub const ALL: [Service; 3] = [Service::Etcd, Service::Agent, Service::Haproxy];

    /// Name used for unit files, run files, pid files and logs.
    pub fn name(self) -> &'static str {
        match self {
            Service::Etcd => "etcd",
            Service::Agent => "pgherd-agent",
            Service::Haproxy => "haproxy",
        }
    }

    /// systemd unit name.
    pub fn unit(self) -> String {
        format!("{}.service", self.name())
    }

    pub fn pid_file(self) -> String {
        format!("{PID_DIR}/{}.pid", self.name())
    }

    pub fn sup_file(self) -> String {
        format!("{PID_DIR}/{}.sup", self.name())
    }

    pub fn run_file(self) -> String {
        format!("{RUN_DIR}/{}.run", self.name())
    }

    pub fn log_file(self) -> String {
        format!("{LOG_DIR}/{}.log", self.name())
    }

    /// Which operation a change of a configuration file of this service needs. HAProxy reloads
    /// seamlessly (master-worker, USR2), the agent re-reads its file on SIGHUP like Patroni;
    /// etcd has no reload, so its config change means a (rolling) restart.
    pub fn config_change_op(self) -> ServiceOp {
        match self {
            Service::Etcd => ServiceOp::Restart,
            Service::Agent | Service::Haproxy => ServiceOp::Reload,
        }
    }
}

impl fmt::Display for Service {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Which service a rendered file feeds (so a change notifies it), by its destination path.
/// Unit files only matter in systemd mode; the caller decides that.
pub fn service_for_path(path: &str) -> Option<Service> {
    let file = path.rsplit('/').next().unwrap_or(path);
    if file.starts_with("haproxy") {
        Some(Service::Haproxy)
    } else if file.starts_with("etcd") {
        Some(Service::Etcd)
    } else if file.starts_with("pgherd-agent") || file.starts_with("agent") || file == "pgherd.yml"
    {
        Some(Service::Agent)
    } else {
        None
    }
}

/// Whether `path` is a systemd unit or drop-in (only meaningful in systemd mode).
pub fn is_unit_file(path: &str) -> bool {
    path.starts_with("/etc/systemd/") || path.starts_with("/lib/systemd/")
}

/// The supervisor loop (installed at [`SUPERVISE_PATH`]). Why a loop in `sh`: lab hosts and
/// containers have no service manager, and anything heavier would be one more package. The
/// one-second pause before a restart keeps a crashing service from spinning a core.
pub fn supervise_script() -> String {
    format!(
        r#"#!/bin/sh
# pgherd supervisor (managed by pgherd, do not edit): runs {RUN_DIR}/NAME.run, restarts it
# one second after it exits; SIGTERM stops the service and the loop.
name="$1"
run="{RUN_DIR}/$name.run"
mkdir -p {PID_DIR} {LOG_DIR}
echo $$ > "{PID_DIR}/$name.sup"
child=""
stop() {{
  if [ -n "$child" ]; then
    kill -TERM "$child" 2>/dev/null
    wait "$child" 2>/dev/null
  fi
  rm -f "{PID_DIR}/$name.sup" "{PID_DIR}/$name.pid"
  exit 0
}}
trap stop TERM INT
while :; do
  sh "$run" &
  child=$!
  echo "$child" > "{PID_DIR}/$name.pid"
  wait "$child"
  echo "pgherd-supervise: $name exited with status $?; restarting in 1s" >&2
  child=""
  sleep 1
done
"#
    )
}

/// Boot hook: starts the supervised services present on the host, in dependency order
/// (DCS first, then the agent, then the proxy; each also copes with the others being late).
pub fn boot_script() -> String {
    let mut s = String::from(
        "#!/bin/sh\n# pgherd boot hook (managed by pgherd): started by the host's init; starts \
         every supervised service that has a run file.\n",
    );
    s.push_str(&format!("mkdir -p {PID_DIR} {LOG_DIR}\n"));
    for svc in Service::ALL {
        s.push_str(&format!(
            "[ -f {run} ] && setsid -f {SUPERVISE_PATH} {name} </dev/null >>{log} 2>&1\n",
            run = svc.run_file(),
            name = svc.name(),
            log = svc.log_file()
        ));
    }
    s.push_str("exit 0\n");
    s
}

/// The run file of `svc` in supervisor mode (`exec`s, so the pid the supervisor records is the
/// service's own). `config` is the service's main config file path on the host.
pub fn run_file(svc: Service, config: &str) -> String {
    let body = match svc {
        // etcd and the agent drop root: the data directories belong to their users, and
        // PostgreSQL refuses to run as root anyway.
        Service::Etcd => format!(
            "exec setpriv --reuid=etcd --regid=etcd --init-groups /usr/bin/etcd --config-file {config}"
        ),
        Service::Agent => format!(
            "cd /var/lib/postgresql\nexec setpriv --reuid=postgres --regid=postgres --init-groups \
             env HOME=/var/lib/postgresql {AGENT_BIN_PATH} {config}"
        ),
        // -W master-worker so that USR2 reloads seamlessly; -db stays in the foreground.
        Service::Haproxy => format!("exec /usr/sbin/haproxy -W -db -f {config}"),
    };
    format!(
        "# pgherd run file for {} (managed by pgherd)\n{body}\n",
        svc.name()
    )
}

/// Shell that performs `op` on `svc` in `mode`. Supervisor-mode commands wait (bounded) until
/// the new process is recorded, so the caller can read its pid right after.
pub fn op_command(svc: Service, op: ServiceOp, mode: ServiceMode) -> String {
    let unit = svc.unit();
    match mode {
        ServiceMode::Systemd => match op {
            ServiceOp::Start => format!("systemctl enable --now {unit}"),
            ServiceOp::Restart => format!("systemctl daemon-reload && systemctl restart {unit}"),
            ServiceOp::Reload => match svc {
                Service::Haproxy | Service::Agent => format!("systemctl reload {unit}"),
                Service::Etcd => format!("systemctl restart {unit}"),
            },
        },
        ServiceMode::Supervisor => {
            let start = format!(
                "mkdir -p {PID_DIR} {LOG_DIR}; setsid -f {SUPERVISE_PATH} {name} </dev/null >>{log} 2>&1; \
                 i=0; while [ $i -lt 50 ] && ! [ -s {pid} ]; do sleep 0.1; i=$((i+1)); done; [ -s {pid} ]",
                name = svc.name(),
                log = svc.log_file(),
                pid = svc.pid_file()
            );
            let stop = format!(
                "if s=$(cat {sup} 2>/dev/null) && kill -0 \"$s\" 2>/dev/null; then kill -TERM \"$s\"; \
                 i=0; while [ $i -lt 600 ] && kill -0 \"$s\" 2>/dev/null; do sleep 0.1; i=$((i+1)); done; fi; \
                 rm -f {sup} {pid}",
                sup = svc.sup_file(),
                pid = svc.pid_file()
            );
            match op {
                ServiceOp::Start => start,
                ServiceOp::Restart => format!("{stop}; {start}"),
                ServiceOp::Reload => {
                    let sig = match svc {
                        Service::Haproxy => "USR2",
                        _ => "HUP",
                    };
                    format!("kill -{sig} \"$(cat {})\"", svc.pid_file())
                }
            }
        }
    }
}

/// Shell printing `svc <name> <supervisor-or-main pid|-> <service pid|->` for every service.
/// A service counts as running when its supervisor (or systemd main pid) is alive.
pub fn probe_script() -> String {
    let mut s = String::new();
    for svc in Service::ALL {
        s.push_str(&format!(
            "if [ \"$mode\" = systemd ]; then m=$(systemctl show -p MainPID --value {unit} 2>/dev/null); \
             [ -n \"$m\" ] && [ \"$m\" != 0 ] && echo \"svc {name} $m $m\" || echo \"svc {name} - -\"; \
             else s=$(cat {sup} 2>/dev/null); if [ -n \"$s\" ] && kill -0 \"$s\" 2>/dev/null; then \
             p=$(cat {pid} 2>/dev/null); if [ -n \"$p\" ] && kill -0 \"$p\" 2>/dev/null; then echo \"svc {name} $s $p\"; \
             else echo \"svc {name} $s -\"; fi; else echo \"svc {name} - -\"; fi; fi\n",
            unit = svc.unit(),
            name = svc.name(),
            sup = svc.sup_file(),
            pid = svc.pid_file()
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_files_notify_their_service() {
        assert_eq!(
            service_for_path("/etc/haproxy/haproxy.cfg"),
            Some(Service::Haproxy)
        );
        assert_eq!(
            service_for_path("/etc/pgherd/etcd.yml"),
            Some(Service::Etcd)
        );
        assert_eq!(
            service_for_path("/etc/pgherd/pgherd-agent.yml"),
            Some(Service::Agent)
        );
        assert_eq!(service_for_path("/etc/pgherd/pg_hba.extra"), None);
    }

    #[test]
    fn supervisor_start_is_detached_and_waits_for_the_pid() {
        let c = op_command(Service::Agent, ServiceOp::Start, ServiceMode::Supervisor);
        assert!(c.contains("setsid -f /usr/local/lib/pgherd/supervise pgherd-agent </dev/null"));
        assert!(c.ends_with("[ -s /run/pgherd/pgherd-agent.pid ]"));
    }

    #[test]
    fn haproxy_reload_is_usr2_to_the_master() {
        let c = op_command(Service::Haproxy, ServiceOp::Reload, ServiceMode::Supervisor);
        assert_eq!(c, "kill -USR2 \"$(cat /run/pgherd/haproxy.pid)\"");
        assert_eq!(
            op_command(Service::Haproxy, ServiceOp::Reload, ServiceMode::Systemd),
            "systemctl reload haproxy.service"
        );
    }

    #[test]
    fn boot_hook_starts_services_in_dependency_order() {
        let b = boot_script();
        let e = b.find("supervise etcd").unwrap();
        let a = b.find("supervise pgherd-agent").unwrap();
        let h = b.find("supervise haproxy").unwrap();
        assert!(e < a && a < h, "{b}");
    }
}
