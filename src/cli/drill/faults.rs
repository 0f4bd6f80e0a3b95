//! The faults of `pgherd drill` (issue 9's seed failure model) and the shell commands that
//! inject and undo each on a host over SSH. The commands are pure functions of the host's
//! service mode (systemd or pgherd's supervisor) and the addresses involved, tested below
//! against the exact strings.

use crate::provision::services::{Service, ServiceMode};

/// A fault. Command line and JSON spell them in kebab case (`kill-pg`, `isolate-primary`, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum Fault {
    /// Planned hand-over through the REST API.
    Switchover,
    /// SIGKILL of the leader's PostgreSQL, its agent left running (it restarts or fails over).
    KillPg,
    /// SIGKILL of the leader's agent and its supervisor, PostgreSQL left running: the fence (or
    /// watchdog) must stop it before a replica is promoted.
    KillAgent,
    /// SIGSTOP of the leader's agent, PostgreSQL left running; SIGCONT once a new leader leads.
    FreezeAgent,
    /// The leader host's crash: SIGKILL of its agent and PostgreSQL, nothing restarted until a
    /// new leader leads.
    KillPrimary,
    /// The same crash of a replica.
    ReplicaCrash,
    /// The leader's host cut off from every other cluster host (not from the admin host),
    /// healed once a new leader leads.
    IsolatePrimary,
    /// One etcd member stopped (not on the leader's host) for the hold time: nothing may fail
    /// over.
    EtcdMinority,
    /// A majority of the etcd members stopped for the hold time: the leader demotes (or, with
    /// failsafe_mode, keeps running).
    EtcdMajority,
    /// The crash of the synchronous standby (synchronous_mode only): writes go on once the
    /// leader names another one.
    SyncStandbyCrash,
}

impl Fault {
    /// The faults `--rounds` picks from when no fault is named: the random set.
    pub const RANDOM: [Fault; 4] = [
        Fault::KillPg,
        Fault::KillPrimary,
        Fault::IsolatePrimary,
        Fault::FreezeAgent,
    ];

    /// Whether the leader is expected to change (the drill waits for it before undoing).
    pub fn moves_leader(self) -> bool {
        matches!(
            self,
            Fault::Switchover
                | Fault::KillAgent
                | Fault::FreezeAgent
                | Fault::KillPrimary
                | Fault::IsolatePrimary
        )
    }
}

/// SIGKILL of the agent and PostgreSQL with no restart by the service manager: under systemd
/// the unit is killed and then stopped (it stays down), in supervisor mode the supervisor loop
/// dies first.
pub fn crash_command(mode: ServiceMode) -> String {
    match mode {
        ServiceMode::Systemd => "systemctl kill --signal=KILL pgherd-agent; \
             pkill -KILL -x postgres; systemctl stop pgherd-agent; exit 0"
            .to_string(),
        ServiceMode::Supervisor => format!(
            "{}; pkill -KILL -x postgres; exit 0",
            kill_agent_and_supervisor(),
        ),
    }
}

fn kill_agent_and_supervisor() -> String {
    format!(
        "s=$(cat {sup} 2>/dev/null); [ -n \"$s\" ] && kill -KILL \"$s\"; \
         p=$(cat {pid} 2>/dev/null); [ -n \"$p\" ] && kill -KILL \"$p\"; rm -f {sup} {pid}",
        sup = Service::Agent.sup_file(),
        pid = Service::Agent.pid_file(),
    )
}

/// SIGKILL of PostgreSQL only (every `postgres` process of the host: the postmaster and its
/// children), the agent left running.
pub fn kill_pg_command() -> String {
    "pkill -KILL -x postgres; exit 0".to_string()
}

/// SIGKILL of the agent and whatever would restart it, PostgreSQL (and the fence, which runs
/// in its own session) left running. Under systemd the unit runs with `KillMode=process`, so
/// the stop after the kill leaves the agent's children alone.
pub fn kill_agent_command(mode: ServiceMode) -> String {
    match mode {
        ServiceMode::Systemd => "systemctl kill --kill-whom=main --signal=KILL pgherd-agent; \
             systemctl stop pgherd-agent; exit 0"
            .to_string(),
        ServiceMode::Supervisor => format!("{}; exit 0", kill_agent_and_supervisor()),
    }
}

/// SIGSTOP (`freeze`) or SIGCONT of the agent's main process.
pub fn signal_agent_command(mode: ServiceMode, signal: &str) -> String {
    match mode {
        ServiceMode::Systemd => {
            format!("systemctl kill --kill-whom=main --signal={signal} pgherd-agent")
        }
        ServiceMode::Supervisor => format!(
            "p=$(cat {pid}) && kill -{signal} \"$p\"",
            pid = Service::Agent.pid_file()
        ),
    }
}

/// The chain the isolation rules live in, so that healing removes exactly them.
const CHAIN: &str = "PGHERD_DRILL";

/// Drops all traffic between this host and `peers` (the other cluster hosts' addresses),
/// leaving the admin host (and everything else) reachable. Idempotent: an earlier isolation
/// is replaced.
pub fn isolate_command(peers: &[String]) -> String {
    let mut s = format!(
        "{heal}; iptables -w -N {CHAIN} && iptables -w -I INPUT -j {CHAIN} && \
         iptables -w -I OUTPUT -j {CHAIN}",
        heal = heal_command()
    );
    for p in peers {
        s.push_str(&format!(
            " && iptables -w -A {CHAIN} -s {p} -j DROP && iptables -w -A {CHAIN} -d {p} -j DROP"
        ));
    }
    s
}

/// Removes the isolation (a no-op without one).
pub fn heal_command() -> String {
    format!(
        "iptables -w -D INPUT -j {CHAIN} 2>/dev/null; iptables -w -D OUTPUT -j {CHAIN} \
         2>/dev/null; iptables -w -F {CHAIN} 2>/dev/null; iptables -w -X {CHAIN} 2>/dev/null; \
         true"
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn isolation_drops_each_peer_both_ways_in_its_own_chain_and_heals_first() {
        let got = isolate_command(&["10.0.0.2".into(), "10.0.0.3".into()]);
        assert_eq!(
            got,
            "iptables -w -D INPUT -j PGHERD_DRILL 2>/dev/null; iptables -w -D OUTPUT -j \
             PGHERD_DRILL 2>/dev/null; iptables -w -F PGHERD_DRILL 2>/dev/null; iptables -w -X \
             PGHERD_DRILL 2>/dev/null; true; iptables -w -N PGHERD_DRILL && iptables -w -I INPUT \
             -j PGHERD_DRILL && iptables -w -I OUTPUT -j PGHERD_DRILL && iptables -w -A \
             PGHERD_DRILL -s 10.0.0.2 -j DROP && iptables -w -A PGHERD_DRILL -d 10.0.0.2 -j DROP \
             && iptables -w -A PGHERD_DRILL -s 10.0.0.3 -j DROP && iptables -w -A PGHERD_DRILL \
             -d 10.0.0.3 -j DROP"
        );
    }

    #[test]
    fn killing_the_agent_leaves_postgres_and_freezing_signals_only_the_main_process() {
        let sup = kill_agent_command(ServiceMode::Supervisor);
        assert!(!sup.contains("postgres"), "{sup}");
        assert!(sup.contains("kill -KILL \"$s\"") && sup.contains("kill -KILL \"$p\""));
        assert_eq!(
            kill_agent_command(ServiceMode::Systemd),
            "systemctl kill --kill-whom=main --signal=KILL pgherd-agent; systemctl stop \
             pgherd-agent; exit 0"
        );
        assert_eq!(
            signal_agent_command(ServiceMode::Systemd, "STOP"),
            "systemctl kill --kill-whom=main --signal=STOP pgherd-agent"
        );
        assert!(signal_agent_command(ServiceMode::Supervisor, "CONT").contains("kill -CONT"));
        assert!(crash_command(ServiceMode::Supervisor).contains("pkill -KILL -x postgres"));
    }
}
