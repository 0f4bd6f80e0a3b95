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
/// Script writing HAProxy's server-state file before every HAProxy start, restart and reload
/// (see [`haproxy_state_script`]).
pub const HAPROXY_STATE_SCRIPT: &str = "/usr/local/lib/pgherd/haproxy-state";
/// HAProxy's `server-state-file` (named in templates/haproxy.cfg.j2).
pub const HAPROXY_STATE_FILE: &str = "/var/lib/haproxy/pgherd-server-state";
/// systemd drop-in that runs [`HAPROXY_STATE_SCRIPT`] before every start of the distribution's
/// haproxy.service, including the starts systemd does on its own (crash restart, boot).
pub const HAPROXY_STATE_DROPIN: &str = "/etc/systemd/system/haproxy.service.d/pgherd-state.conf";

/// Content of [`HAPROXY_STATE_DROPIN`]. `ExecStartPre` lines add up, so Debian's own config
/// check in the unit still runs; the `-` prefix is deliberately absent: a HAProxy that could
/// route to a replica as if it were the primary must not start.
pub fn haproxy_state_dropin() -> String {
    format!(
        "# managed by pgherd: write HAProxy's server states before it starts, so that no server\n\
         # counts as UP before its first health checks (see {HAPROXY_STATE_SCRIPT}).\n\
         [Service]\nExecStartPre={HAPROXY_STATE_SCRIPT}\n"
    )
}
/// HAProxy's admin socket (named in templates/haproxy.cfg.j2), read for `show servers state`.
pub const HAPROXY_ADMIN_SOCK: &str = "/var/lib/haproxy/pgherd-admin.sock";

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

/// The script at [`HAPROXY_STATE_SCRIPT`] for a HAProxy whose config is `config`.
///
/// Why: HAProxy 2.6 starts every server UP and only marks it DOWN after a failed check
/// (`init-state` exists from 3.1 on), so right after a start or reload the primary port could
/// route to a replica. With `load-server-state-from-file`, HAProxy instead takes each server's
/// state from this file. The script writes one line per `server` of the config: the running
/// HAProxy's current line for it (kept across a reload) when HAProxy answers on its admin socket
/// and the server's address and port are unchanged, else a line "DOWN, health 0" — so a cold
/// start or a new/moved server only gets traffic after `rise` passing checks. perl (always on
/// Debian, `perl-base`) talks to the socket; no socat needed.
pub fn haproxy_state_script(config: &str) -> String {
    let cfg = crate::transport::shell_quote(config);
    format!(
        r#"#!/bin/sh
# pgherd (managed by pgherd, do not edit): writes {HAPROXY_STATE_FILE} before HAProxy
# starts or reloads: servers keep their current state across reloads, and start DOWN otherwise.
cfg={cfg}
state={HAPROXY_STATE_FILE}
mkdir -p "$(dirname "$state")"
cur=$(perl -MIO::Socket::UNIX -e '$s = IO::Socket::UNIX->new(Peer => $ARGV[0]) or exit 1; print $s "show servers state
"; print while <$s>' {HAPROXY_ADMIN_SOCK} 2>/dev/null)
tmp=$(mktemp "$state.XXXXXX") || exit 1
{{
  echo 1
  echo '# be_id be_name srv_id srv_name srv_addr srv_op_state srv_admin_state srv_uweight srv_iweight srv_time_since_last_change srv_check_status srv_check_result srv_check_health srv_check_state srv_agent_state bk_f_forced_id srv_f_forced_id srv_fqdn srv_port srvrecord srv_use_ssl srv_check_port srv_check_addr srv_agent_addr srv_agent_port'
  printf '%s
' "$cur" | awk '
    FNR == NR {{ if ($0 !~ /^#/ && NF >= 19) cur[$2 " " $4 " " $5 " " $19] = $0; next }}
    $1 == "listen" || $1 == "backend" {{ px = $2; next }}
    $1 == "global" || $1 == "defaults" || $1 == "frontend" || $1 == "resolvers" || $1 == "peers" {{ px = ""; next }}
    $1 == "server" && px != "" {{
      addr = $3; port = $3; sub(/:[^:]*$/, "", addr); sub(/^.*:/, "", port); gsub(/[][]/, "", addr)
      cport = port; for (i = 4; i < NF; i++) if ($i == "port") cport = $(i + 1)
      key = px " " $2 " " addr " " port
      if (key in cur) print cur[key]
      else print "0 " px " 0 " $2 " " addr " 0 0 1 1 0 8 2 0 6 0 0 0 - " port " - 0 " cport " - - " cport
    }}' - "$cfg"
}} > "$tmp" && mv -f "$tmp" "$state" || {{ rm -f "$tmp"; exit 1; }}
"#
    )
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
        // The state script first, so a (re)started HAProxy routes nothing before its checks.
        Service::Haproxy => {
            format!("{HAPROXY_STATE_SCRIPT}\nexec /usr/sbin/haproxy -W -db -f {config}")
        }
    };
    format!(
        "# pgherd run file for {} (managed by pgherd)\n{body}\n",
        svc.name()
    )
}

/// Shell that performs `op` on `svc` in `mode`. Supervisor-mode commands wait (bounded) until
/// the new process is recorded, so the caller can read its pid right after.
pub fn op_command(svc: Service, op: ServiceOp, mode: ServiceMode) -> String {
    let cmd = op_command_inner(svc, op, mode);
    // HAProxy reads its server states at start-up: write them first (see
    // [`haproxy_state_script`]). In supervisor mode the run file does it for starts.
    match (svc, mode, op) {
        (Service::Haproxy, ServiceMode::Systemd, _)
        | (Service::Haproxy, ServiceMode::Supervisor, ServiceOp::Reload) => {
            format!("{HAPROXY_STATE_SCRIPT} && {cmd}")
        }
        _ => cmd,
    }
}

/// Stops a service (the supervisor loop with it, so nothing restarts it) and leaves it down:
/// `systemctl stop`, or SIGTERM to pgherd's supervisor, which stops its child and waits.
pub fn stop_command(svc: Service, mode: ServiceMode) -> String {
    match mode {
        ServiceMode::Systemd => format!("systemctl stop {}", svc.unit()),
        ServiceMode::Supervisor => supervisor_stop(svc),
    }
}

fn supervisor_stop(svc: Service) -> String {
    format!(
        "if s=$(cat {sup} 2>/dev/null) && kill -0 \"$s\" 2>/dev/null; then kill -TERM \"$s\"; \
         i=0; while [ $i -lt 600 ] && kill -0 \"$s\" 2>/dev/null; do sleep 0.1; i=$((i+1)); done; fi; \
         rm -f {sup} {pid}",
        sup = svc.sup_file(),
        pid = svc.pid_file()
    )
}

fn op_command_inner(svc: Service, op: ServiceOp, mode: ServiceMode) -> String {
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
            let stop = supervisor_stop(svc);
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
        assert_eq!(
            c,
            "/usr/local/lib/pgherd/haproxy-state && kill -USR2 \"$(cat /run/pgherd/haproxy.pid)\""
        );
        assert_eq!(
            op_command(Service::Haproxy, ServiceOp::Reload, ServiceMode::Systemd),
            "/usr/local/lib/pgherd/haproxy-state && systemctl reload haproxy.service"
        );
    }

    #[test]
    fn haproxy_server_states_are_written_before_every_start() {
        let run = run_file(Service::Haproxy, "/etc/haproxy/haproxy.cfg");
        let state = run
            .find(HAPROXY_STATE_SCRIPT)
            .expect("state script in run file");
        assert!(state < run.find("exec /usr/sbin/haproxy").unwrap());
        for op in [ServiceOp::Start, ServiceOp::Restart, ServiceOp::Reload] {
            let c = op_command(Service::Haproxy, op, ServiceMode::Systemd);
            assert!(c.starts_with(HAPROXY_STATE_SCRIPT), "{c}");
        }
        let script = haproxy_state_script("/etc/haproxy/haproxy.cfg");
        assert!(script.contains("show servers state") && script.contains(HAPROXY_STATE_FILE));
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
