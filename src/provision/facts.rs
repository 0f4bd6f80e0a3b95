//! Facts: what is currently true on a host, read in one batched, read-only shell command
//! ([`facts_script`]) and parsed by a pure function ([`parse_facts`]), pyinfra-style. The
//! planner compares facts with the desired state; nothing here changes a host.
//!
//! Output protocol of the script (one fact per line, space-separated, paths without spaces):
//! `mode systemd|supervisor`, `file <path> <sha256> <mode> <user:group>` or `file <path> -`,
//! `dir <path> <owner>|-`, `pkg <name> 0|1`, `svc <name> <sup pid|-> <pid|->`,
//! `pg <initialized 0|1> <postmaster pid|->`, `etcd 0|1` (local member healthy),
//! `unit <name> 0|1` (another systemd unit active or enabled; systemd mode only),
//! `user <name> 0|1` (a user exists).

use crate::api::docs::PatroniDoc;
use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use super::services::{Service, ServiceMode, probe_script};
use crate::transport::{Transport, TransportError, shell_quote};

/// What is asked of a host's facts (derived from the desired state).
#[derive(Debug, Clone, Default)]
pub struct FactQuery {
    pub files: Vec<String>,
    pub dirs: Vec<String>,
    pub packages: Vec<String>,
    /// PostgreSQL data directory (postgres hosts only).
    pub pg_data_dir: Option<String>,
    /// `http://addr:port` of the local etcd member (etcd hosts only).
    pub etcd_endpoint: Option<String>,
    /// Other systemd units whose state matters (e.g. the distribution's `postgresql`, which
    /// must not run next to the agent). Only probed in systemd mode.
    pub units: Vec<String>,
    /// Users a playbook's `ensure_user` steps want.
    pub users: Vec<String>,
}

/// A file as it is on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FileFact {
    pub sha256: String,
    /// Octal permission bits as `stat -c %a` prints them.
    pub mode: String,
    /// `user:group`.
    pub owner: String,
}

/// A supervised (or systemd) service as it is on the host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ServiceFact {
    /// Supervisor loop pid (supervisor mode) or systemd MainPID: `Some` means "running".
    pub manager_pid: Option<u32>,
    /// The service process itself (may briefly be `None` while the supervisor restarts it).
    pub pid: Option<u32>,
}

impl ServiceFact {
    pub fn running(&self) -> bool {
        self.manager_pid.is_some()
    }
}

/// Everything the planner knows about one host.
#[derive(Debug, Clone)]
pub struct HostFacts {
    pub mode: ServiceMode,
    /// `None`: absent.
    pub files: BTreeMap<String, Option<FileFact>>,
    /// `Some(user:group)` when the directory exists.
    pub dirs: BTreeMap<String, Option<String>>,
    pub packages: BTreeMap<String, bool>,
    pub services: BTreeMap<Service, ServiceFact>,
    pub pg_initialized: bool,
    pub postgres_pid: Option<u32>,
    /// `None` when not asked (not an etcd host).
    pub etcd_healthy: Option<bool>,
    /// Other units asked about (systemd mode): active or enabled?
    pub units: BTreeMap<String, bool>,
    /// Users asked about: present?
    pub users: BTreeMap<String, bool>,
    /// Current content of files that differ from the desired ones (for diffs), filled by
    /// [`gather`] only for text files below [`DIFF_MAX_BYTES`].
    pub old_contents: BTreeMap<String, Vec<u8>>,
    /// What the host's agent reports over its REST API (`GET /patroni`), when it answered:
    /// filled from the cluster facts ([`super::dcs_config::gather`]), not over SSH.
    pub agent: Option<AgentFact>,
}

/// What an agent reports in `GET /patroni` (its `pgherd` object and pending-restart state).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AgentFact {
    pub role: String,
    pub state: String,
    /// sha256 of the config file the agent runs with.
    pub config_sha256: Option<String>,
    /// Why its last reload was refused.
    pub config_error: Option<String>,
    /// The DCS config revision it has applied.
    pub dcs_config_revision: Option<i64>,
    /// Why it refused the DCS config (PostgreSQL rejected its pg_hba).
    pub dcs_config_error: Option<String>,
    pub pending_restart: bool,
}

impl AgentFact {
    /// Decodes a `GET /patroni` body (through the API's own type; an unreadable body gives
    /// an empty fact).
    pub fn from_patroni(v: &Value) -> AgentFact {
        serde_json::from_value::<PatroniDoc>(v.clone())
            .unwrap_or_default()
            .into()
    }
}

impl From<PatroniDoc> for AgentFact {
    fn from(d: PatroniDoc) -> AgentFact {
        AgentFact {
            role: d.role,
            state: d.state,
            config_sha256: d.pgherd.config_sha256,
            config_error: d.pgherd.config_error,
            dcs_config_revision: d.pgherd.dcs_config_revision,
            dcs_config_error: d.pgherd.dcs_config_error,
            pending_restart: d.pending_restart,
        }
    }
}

/// Files larger than this are not fetched for diffs (binaries, mostly).
pub const DIFF_MAX_BYTES: usize = 256 * 1024;

impl HostFacts {
    /// Facts of a blank host (nothing installed, nothing running): what a plan looks like on a
    /// fresh machine.
    pub fn blank(mode: ServiceMode) -> HostFacts {
        HostFacts {
            mode,
            files: BTreeMap::new(),
            dirs: BTreeMap::new(),
            packages: BTreeMap::new(),
            services: BTreeMap::new(),
            pg_initialized: false,
            postgres_pid: None,
            etcd_healthy: None,
            units: BTreeMap::new(),
            users: BTreeMap::new(),
            old_contents: BTreeMap::new(),
            agent: None,
        }
    }

    pub fn service(&self, svc: Service) -> ServiceFact {
        self.services.get(&svc).copied().unwrap_or_default()
    }

    pub fn file(&self, path: &str) -> Option<&FileFact> {
        self.files.get(path).and_then(|f| f.as_ref())
    }
}

/// A fact line that could not be understood (a bug or a very unusual host).
#[derive(Debug, thiserror::Error)]
#[error("host {host}: cannot parse facts line {line:?}")]
pub struct FactParseError {
    pub host: String,
    pub line: String,
}

/// Suffix of a file's checksum sidecar: `<path>.sha256` holds `<sha256> <stat identity>`.
pub const SIDECAR_SUFFIX: &str = ".sha256";

/// The `stat -c` format of the identity a sidecar records: inode, size, mtime and ctime in
/// nanoseconds. Any write, truncation, `touch`, chmod/chown or replacement of the file changes
/// at least one of them (ctime cannot be set from user space), so a sidecar whose identity
/// matches describes the current content, and a mismatch just means "hash it".
pub const SIDECAR_STAT: &str = "%i %s %.9Y %.9Z";

/// Files at least this large get a checksum sidecar when pgherd writes them (the agent binary,
/// ~180 MB in a debug build): hashing it on every host made a no-op `plan` take seconds.
pub const SIDECAR_MIN_BYTES: usize = 1024 * 1024;

/// Shell fragment recording `sha` (the content pgherd just wrote or verified) as the sidecar of
/// `path`, written to a temporary file and renamed, so readers see a whole sidecar or none.
/// `expect_inode`: a shell expression; when non-empty, the sidecar is only written if the
/// file's inode is still that one (the file pgherd itself renamed into place).
pub fn checksum_sidecar(path: &str, sha: &str, expect_inode: &str) -> String {
    let q = shell_quote(path);
    let side = shell_quote(&format!("{path}{SIDECAR_SUFFIX}"));
    let guard = if expect_inode.is_empty() {
        String::new()
    } else {
        format!("[ \"$(stat -L -c %i -- {q})\" = \"{expect_inode}\" ] && ")
    };
    // The sleep: file timestamps advance in coarse clock ticks (a few ms). Taking the identity
    // a tick after pgherd's own write means any later write to the file lands in a later tick
    // and so changes its ctime, i.e. cannot go unnoticed by a sidecar taken in the same tick.
    format!(
        "sleep 0.02; {guard}{{ st=$(stat -L -c '{SIDECAR_STAT}' -- {q}) && s=$(mktemp {side}.XXXXXX) && \
         printf '%s %s\\n' {sha} \"$st\" > \"$s\" && mv -f \"$s\" {side}; }}",
        sha = shell_quote(sha)
    )
}

/// The read-only shell command that prints the facts for `q`.
pub fn facts_script(q: &FactQuery) -> String {
    let mut s = String::from(
        "mode=supervisor; if [ -d /run/systemd/system ] && [ \"$(cat /proc/1/comm 2>/dev/null)\" = systemd ] \
         && command -v systemctl >/dev/null 2>&1; then mode=systemd; fi; echo \"mode $mode\"\n",
    );
    if !q.files.is_empty() {
        let list: Vec<String> = q.files.iter().map(|p| shell_quote(p)).collect();
        // The checksum comes from the file's sidecar (see [`checksum_sidecar`]) when the
        // sidecar's recorded identity still matches `stat`; otherwise the file is hashed.
        s.push_str(&format!(
            "for f in {}; do if [ -f \"$f\" ]; then h=; \
             if [ -f \"$f{SIDECAR_SUFFIX}\" ]; then cs=; cst=; read -r cs cst < \"$f{SIDECAR_SUFFIX}\" 2>/dev/null; \
             case $cs in *[!0-9a-f]*) cs=;; esac; \
             if [ ${{#cs}} -eq 64 ] && [ \"$cst\" = \"$(stat -L -c '{SIDECAR_STAT}' \"$f\")\" ]; then h=$cs; fi; fi; \
             [ -n \"$h\" ] || h=$(sha256sum < \"$f\" | cut -d' ' -f1); \
             echo \"file $f $h $(stat -L -c '%a %U:%G' \"$f\")\"; \
             else echo \"file $f -\"; fi; done\n",
            list.join(" ")
        ));
    }
    if !q.dirs.is_empty() {
        let list: Vec<String> = q.dirs.iter().map(|p| shell_quote(p)).collect();
        s.push_str(&format!(
            "for d in {}; do if [ -d \"$d\" ]; then echo \"dir $d $(stat -c '%U:%G' \"$d\")\"; else echo \"dir $d -\"; fi; done\n",
            list.join(" ")
        ));
    }
    if !q.packages.is_empty() {
        let list: Vec<String> = q.packages.iter().map(|p| shell_quote(p)).collect();
        s.push_str(&format!(
            "for p in {}; do if dpkg-query -W -f='${{Status}}' \"$p\" 2>/dev/null | grep -q 'install ok installed'; \
             then echo \"pkg $p 1\"; else echo \"pkg $p 0\"; fi; done\n",
            list.join(" ")
        ));
    }
    if !q.users.is_empty() {
        let list: Vec<String> = q.users.iter().map(|u| shell_quote(u)).collect();
        s.push_str(&format!(
            "for u in {}; do if id -u \"$u\" >/dev/null 2>&1; then echo \"user $u 1\"; else echo \"user $u 0\"; fi; done\n",
            list.join(" ")
        ));
    }
    s.push_str(&probe_script());
    if let Some(d) = &q.pg_data_dir {
        let d = shell_quote(d);
        s.push_str(&format!(
            "i=0; [ -f {d}/PG_VERSION ] && i=1; p=$(head -n1 {d}/postmaster.pid 2>/dev/null); \
             if [ -n \"$p\" ] && kill -0 \"$p\" 2>/dev/null; then echo \"pg $i $p\"; else echo \"pg $i -\"; fi\n"
        ));
    }
    if let Some(e) = &q.etcd_endpoint {
        s.push_str(&format!(
            "if ETCDCTL_API=3 etcdctl --endpoints={} --dial-timeout=1s --command-timeout=2s endpoint health >/dev/null 2>&1; \
             then echo 'etcd 1'; else echo 'etcd 0'; fi\n",
            shell_quote(e)
        ));
    }
    for u in &q.units {
        let u = shell_quote(u);
        s.push_str(&format!(
            "if [ \"$mode\" = systemd ]; then if systemctl is-active --quiet {u} || systemctl is-enabled --quiet {u}; \
             then echo 'unit {u} 1'; else echo 'unit {u} 0'; fi; fi\n"
        ));
    }
    s.push_str("exit 0\n");
    s
}

fn pid(s: &str) -> Option<u32> {
    s.parse().ok()
}

/// Parses the output of [`facts_script`] (pure; tested with fixtures).
pub fn parse_facts(host: &str, stdout: &str) -> Result<HostFacts, FactParseError> {
    let mut f = HostFacts::blank(ServiceMode::Supervisor);
    let bad = |line: &str| FactParseError {
        host: host.to_string(),
        line: line.to_string(),
    };
    for line in stdout.lines().map(str::trim).filter(|l| !l.is_empty()) {
        let w: Vec<&str> = line.split_whitespace().collect();
        match w.as_slice() {
            ["mode", "systemd"] => f.mode = ServiceMode::Systemd,
            ["mode", "supervisor"] => f.mode = ServiceMode::Supervisor,
            ["file", path, "-"] => {
                f.files.insert(path.to_string(), None);
            }
            ["file", path, sha, mode, owner] if sha.len() == 64 => {
                f.files.insert(
                    path.to_string(),
                    Some(FileFact {
                        sha256: sha.to_string(),
                        mode: mode.to_string(),
                        owner: owner.to_string(),
                    }),
                );
            }
            ["dir", path, "-"] => {
                f.dirs.insert(path.to_string(), None);
            }
            ["dir", path, owner] => {
                f.dirs.insert(path.to_string(), Some(owner.to_string()));
            }
            ["pkg", name, v @ ("0" | "1")] => {
                f.packages.insert(name.to_string(), *v == "1");
            }
            ["svc", name, mgr, p] => {
                let svc = Service::ALL
                    .into_iter()
                    .find(|s| s.name() == *name)
                    .ok_or_else(|| bad(line))?;
                f.services.insert(
                    svc,
                    ServiceFact {
                        manager_pid: pid(mgr),
                        pid: pid(p),
                    },
                );
            }
            ["pg", init @ ("0" | "1"), p] => {
                f.pg_initialized = *init == "1";
                f.postgres_pid = pid(p);
            }
            ["etcd", v @ ("0" | "1")] => f.etcd_healthy = Some(*v == "1"),
            ["unit", name, v @ ("0" | "1")] => {
                f.units.insert(name.to_string(), *v == "1");
            }
            ["user", name, v @ ("0" | "1")] => {
                f.users.insert(name.to_string(), *v == "1");
            }
            _ => return Err(bad(line)),
        }
    }
    Ok(f)
}

/// Why facts could not be gathered.
#[derive(Debug, thiserror::Error)]
pub enum FactsError {
    #[error(transparent)]
    Transport(#[from] TransportError),
    #[error(transparent)]
    Parse(#[from] FactParseError),
}

/// Reads the facts of one host: the batched script, then (for diffs) the current content of
/// the files in `diff_candidates` whose checksum differs from the wanted one.
pub async fn gather(
    t: &dyn Transport,
    q: &FactQuery,
    wanted_sha: &BTreeMap<String, (String, usize)>,
) -> Result<HostFacts, FactsError> {
    let out = t.run_ok(&facts_script(q), Duration::from_secs(30)).await?;
    let mut facts = parse_facts(t.host(), &out.stdout_str())?;
    for (path, (sha, len)) in wanted_sha {
        let Some(Some(cur)) = facts.files.get(path) else {
            continue;
        };
        if &cur.sha256 != sha
            && *len <= DIFF_MAX_BYTES
            && let Some(bytes) = t.read_file(path).await?
            && bytes.len() <= DIFF_MAX_BYTES
        {
            facts.old_contents.insert(path.clone(), bytes);
        }
    }
    Ok(facts)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHA: &str = "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03";

    #[test]
    fn parses_every_kind_of_fact_line() {
        let out = format!(
            "mode supervisor\nfile /etc/a {SHA} 644 root:root\nfile /etc/b -\ndir /var/lib/x postgres:postgres\n\
             dir /y -\npkg haproxy 1\npkg etcd-server 0\nsvc etcd 10 11\nsvc haproxy 12 -\nsvc pgherd-agent - -\n\
             pg 1 99\netcd 1\n"
        );
        let f = parse_facts("n1", &out).unwrap();
        assert_eq!(f.mode, ServiceMode::Supervisor);
        assert_eq!(f.file("/etc/a").unwrap().mode, "644");
        assert!(f.files["/etc/b"].is_none());
        assert_eq!(f.dirs["/var/lib/x"].as_deref(), Some("postgres:postgres"));
        assert!(f.packages["haproxy"] && !f.packages["etcd-server"]);
        assert_eq!(f.service(Service::Etcd).pid, Some(11));
        assert!(f.service(Service::Haproxy).running());
        assert!(!f.service(Service::Agent).running());
        assert!(f.pg_initialized);
        assert_eq!(f.postgres_pid, Some(99));
        assert_eq!(f.etcd_healthy, Some(true));
    }

    #[test]
    fn garbage_line_is_an_error_naming_the_host() {
        let e = parse_facts("n2", "mode supervisor\nwhat is this\n").unwrap_err();
        assert!(e.to_string().contains("host n2"), "{e}");
    }

    fn local_facts(q: &FactQuery) -> HostFacts {
        let out = std::process::Command::new("sh")
            .arg("-c")
            .arg(facts_script(q))
            .output()
            .unwrap();
        parse_facts("local", &String::from_utf8_lossy(&out.stdout)).unwrap()
    }

    #[test]
    fn checksum_comes_from_the_sidecar_only_while_the_file_is_unchanged() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("bin");
        let path = path.to_str().unwrap();
        std::fs::write(path, b"agent v1").unwrap();
        let real = crate::transport::sha256_hex(b"agent v1");
        // A sidecar claiming another checksum proves which source the fact came from.
        let claimed = "ab".repeat(32);
        let rec = std::process::Command::new("sh")
            .arg("-c")
            .arg(checksum_sidecar(path, &claimed, ""))
            .status()
            .unwrap();
        assert!(rec.success());
        let q = FactQuery {
            files: vec![path.to_string()],
            ..Default::default()
        };
        assert_eq!(local_facts(&q).file(path).unwrap().sha256, claimed);
        // Same size, new content: ctime/mtime move on, so the file is hashed again.
        std::fs::write(path, b"agent v2").unwrap();
        assert_eq!(
            local_facts(&q).file(path).unwrap().sha256,
            crate::transport::sha256_hex(b"agent v2")
        );
        assert_ne!(real, claimed);
    }

    #[test]
    fn script_asks_only_for_what_the_query_names() {
        let q = FactQuery {
            packages: vec!["haproxy".into()],
            ..Default::default()
        };
        let s = facts_script(&q);
        assert!(s.contains("dpkg-query"));
        assert!(!s.contains("PG_VERSION"));
        assert!(!s.contains("etcdctl"));
    }
}
