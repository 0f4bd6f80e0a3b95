//! What one planned [`Action`] runs on a host, over its transport: `apt-get install`,
//! `useradd`, `install -d`, an atomic upload (with the checksum sidecar for large files),
//! `systemctl daemon-reload` / `disable --now`, and the service operation of the host's mode.
//! Which command is a pure function ([`host_command`]); [`run_action`] only runs it.

use std::time::Duration;

use crate::provision::desired::DesiredFile;
use crate::provision::facts;
use crate::provision::plan::Action;
use crate::provision::services::{self, ServiceMode};
use crate::transport::{Transport, TransportError, shell_quote};

/// `apt-get install`, after an index update when the first try fails: downloads from a slow
/// mirror take minutes.
const PACKAGES_TIMEOUT: Duration = Duration::from_secs(600);
/// A command that only changes the host's own accounts, directories or systemd's unit cache
/// (`useradd`, `install -d`, `systemctl daemon-reload`): seconds, unless the host is stuck.
const LOCAL_TIMEOUT: Duration = Duration::from_secs(60);
/// Recording a checksum sidecar again: one `stat` and a small write.
const SIDECAR_TIMEOUT: Duration = Duration::from_secs(30);
/// A service start, stop, restart or reload (and `systemctl disable --now`): systemd's own
/// default stop timeout is 90 s, after which it kills the service itself.
const SERVICE_TIMEOUT: Duration = Duration::from_secs(90);
/// The upload of a large file (the agent binary, tens of MB) through the sidecar script.
const LARGE_UPLOAD_TIMEOUT: Duration = Duration::from_secs(600);

/// What one [`Action`] does on a host, decided purely from the action and the host's service
/// mode (so every command `apply` runs is tested against its expected text): a shell script
/// with its bound, or the transport's atomic upload.
#[derive(Debug, Clone, PartialEq)]
pub enum HostCommand<'a> {
    /// Run `script`; a non-zero exit fails the step.
    Shell { script: String, timeout: Duration },
    /// The transport's atomic upload of `file` (temporary file, mode and owner, rename), then
    /// `then` when given (re-recording a checksum sidecar).
    Upload {
        file: &'a DesiredFile,
        then: Option<String>,
    },
    /// `script` with the file's content on its stdin (a large file uploaded and its checksum
    /// sidecar recorded in one round trip).
    Piped {
        script: String,
        file: &'a DesiredFile,
        timeout: Duration,
    },
}

fn shell(script: String, timeout: Duration) -> HostCommand<'static> {
    HostCommand::Shell { script, timeout }
}

/// The command for `action` on a host in service `mode` (pure).
pub fn host_command(action: &Action, mode: ServiceMode) -> HostCommand<'_> {
    match action {
        Action::InstallPackages(pkgs) => {
            let list: Vec<String> = pkgs.iter().map(|p| shell_quote(p)).collect();
            shell(
                format!(
                    "export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q {l} || {{ apt-get update -q && apt-get install -y -q {l}; }}",
                    l = list.join(" ")
                ),
                PACKAGES_TIMEOUT,
            )
        }
        Action::CreateUser(u) => {
            let mut cmd = String::from("useradd");
            if u.system {
                cmd.push_str(" --system --shell /usr/sbin/nologin");
            }
            if let Some(h) = &u.home {
                cmd.push_str(&format!(" --home-dir {} --create-home", shell_quote(h)));
            }
            if !u.groups.is_empty() {
                cmd.push_str(&format!(" --groups {}", shell_quote(&u.groups.join(","))));
            }
            // Only when still absent: a concurrent creation is not an error.
            let q = shell_quote(&u.name);
            shell(
                format!("id -u {q} >/dev/null 2>&1 || {cmd} {q}"),
                LOCAL_TIMEOUT,
            )
        }
        Action::MakeDirs(dirs) => {
            let cmd: Vec<String> = dirs
                .iter()
                .map(|d| {
                    let (u, g) = d.owner.split_once(':').unwrap_or((&d.owner, &d.owner));
                    format!(
                        "install -d -m {:o} -o {} -g {} {}",
                        d.mode,
                        shell_quote(u),
                        shell_quote(g),
                        shell_quote(&d.path)
                    )
                })
                .collect();
            shell(cmd.join(" && "), LOCAL_TIMEOUT)
        }
        Action::Upload(f) if f.content.len() >= facts::SIDECAR_MIN_BYTES => HostCommand::Piped {
            script: upload_with_sidecar_script(f),
            file: f,
            timeout: LARGE_UPLOAD_TIMEOUT,
        },
        // chmod/chown changed the file's ctime: record its checksum again, or every later
        // `plan` would hash it.
        Action::FixMetadata(f) if f.content.len() >= facts::SIDECAR_MIN_BYTES => {
            HostCommand::Upload {
                file: f,
                then: Some(format!(
                    "{}; exit 0",
                    facts::checksum_sidecar(&f.path, &f.sha, "")
                )),
            }
        }
        Action::Upload(f) | Action::FixMetadata(f) => HostCommand::Upload {
            file: f,
            then: None,
        },
        Action::DaemonReload => shell("systemctl daemon-reload".into(), LOCAL_TIMEOUT),
        Action::StopUnit(u) => shell(
            format!("systemctl disable --now {}", shell_quote(u)),
            SERVICE_TIMEOUT,
        ),
        Action::Service(svc, op) => shell(services::op_command(*svc, *op, mode), SERVICE_TIMEOUT),
    }
}

/// Runs `action` on the host of `t`, in the host's service `mode`.
pub(super) async fn run_action(
    t: &dyn Transport,
    mode: ServiceMode,
    action: &Action,
) -> Result<(), TransportError> {
    match host_command(action, mode) {
        HostCommand::Shell { script, timeout } => {
            t.run_ok(&script, timeout).await?;
        }
        HostCommand::Upload { file: f, then } => {
            t.upload(&f.path, &f.content, f.mode, Some(&f.owner))
                .await?;
            if let Some(script) = then {
                t.run_ok(&script, SIDECAR_TIMEOUT).await?;
            }
        }
        HostCommand::Piped {
            script,
            file,
            timeout,
        } => {
            let exec = crate::transport::Exec {
                script: &script,
                stdin: Some(&file.content),
                secrets: &[],
                timeout,
            };
            t.exec(exec).await?.check(t.host(), &script)?;
        }
    }
    Ok(())
}

/// The script that uploads a large file (the agent binary) from stdin and records its checksum
/// sidecar in the same command, so the next `plan` reads the checksum instead of hashing the
/// file on the host. Like [`Transport::upload`]: a temporary file in the target directory, mode
/// and owner set, then renamed over the target (atomic). Unlike it, no checksum of the old file
/// is taken first — the plan already knows the content differs. The sidecar is only written
/// while the file is still the inode pgherd renamed into place.
fn upload_with_sidecar_script(f: &DesiredFile) -> String {
    let q = shell_quote(&f.path);
    let (u, g) = f.owner.split_once(':').unwrap_or((&f.owner, &f.owner));
    format!(
        "set -e; d=$(dirname -- {q}); b=$(basename -- {q}); \
         t=$(mktemp \"$d/.$b.pgherd-XXXXXX\"); trap 'rm -f \"$t\"' EXIT; \
         cat > \"$t\"; chmod {mode:o} \"$t\"; chown {owner} \"$t\"; i=$(stat -c %i \"$t\"); \
         mv -f \"$t\" {q}; trap - EXIT; set +e; {side}; exit 0",
        mode = f.mode,
        owner = shell_quote(&format!("{u}:{g}")),
        side = facts::checksum_sidecar(&f.path, &f.sha, "$i"),
    )
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::provision::desired::{DesiredDir, DesiredUser};
    use crate::provision::services::{Service, ServiceOp};

    fn script(a: &Action, mode: ServiceMode) -> String {
        match host_command(a, mode) {
            HostCommand::Shell { script, .. } => script,
            other => panic!("not a shell command: {other:?}"),
        }
    }

    fn file(path: &str, len: usize) -> DesiredFile {
        DesiredFile {
            path: path.into(),
            content: Arc::new(vec![b'x'; len]),
            mode: 0o640,
            owner: "postgres:postgres".into(),
            sha: Arc::from("ab12"),
        }
    }

    #[test]
    fn each_action_runs_its_expected_command() {
        let sd = ServiceMode::Systemd;
        let rows: Vec<(Action, ServiceMode, &str)> = vec![
            (
                Action::InstallPackages(vec!["etcd-server".into(), "haproxy".into()]),
                sd,
                "export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q etcd-server haproxy || { apt-get update -q && apt-get install -y -q etcd-server haproxy; }",
            ),
            (
                Action::CreateUser(DesiredUser {
                    name: "etcd".into(),
                    system: true,
                    home: Some("/var/lib/etcd".into()),
                    groups: vec!["a".into(), "b".into()],
                }),
                sd,
                "id -u etcd >/dev/null 2>&1 || useradd --system --shell /usr/sbin/nologin --home-dir /var/lib/etcd --create-home --groups a,b etcd",
            ),
            (
                Action::CreateUser(DesiredUser {
                    name: "o'neil".into(),
                    system: false,
                    home: None,
                    groups: vec![],
                }),
                sd,
                r"id -u 'o'\''neil' >/dev/null 2>&1 || useradd 'o'\''neil'",
            ),
            (
                Action::MakeDirs(vec![
                    DesiredDir {
                        path: "/var/lib/postgresql/15/main".into(),
                        owner: "postgres:postgres".into(),
                        mode: 0o700,
                    },
                    DesiredDir {
                        path: "/etc/pgherd dir".into(),
                        owner: "root".into(),
                        mode: 0o755,
                    },
                ]),
                sd,
                "install -d -m 700 -o postgres -g postgres /var/lib/postgresql/15/main && install -d -m 755 -o root -g root '/etc/pgherd dir'",
            ),
            (Action::DaemonReload, sd, "systemctl daemon-reload"),
            (
                Action::StopUnit("etcd.service".into()),
                sd,
                "systemctl disable --now etcd.service",
            ),
            (
                Action::Service(Service::Agent, ServiceOp::Reload),
                sd,
                "systemctl reload pgherd-agent.service",
            ),
            (
                Action::Service(Service::Etcd, ServiceOp::Reload),
                sd,
                // etcd cannot re-read its configuration: a reload is a restart.
                "systemctl restart etcd.service",
            ),
            (
                Action::Service(Service::Agent, ServiceOp::Restart),
                sd,
                "systemctl daemon-reload && systemctl restart pgherd-agent.service",
            ),
        ];
        for (action, mode, want) in rows {
            assert_eq!(script(&action, mode), want, "{action:?}");
        }
    }

    #[test]
    fn a_small_file_is_uploaded_atomically_and_a_large_one_records_its_checksum() {
        let small = file("/etc/pgherd/agent.yml", 10);
        assert_eq!(
            host_command(&Action::Upload(small.clone()), ServiceMode::Systemd),
            HostCommand::Upload {
                file: &small,
                then: None
            }
        );
        let big = file("/usr/local/bin/pgherd-agent", facts::SIDECAR_MIN_BYTES);
        match host_command(&Action::Upload(big.clone()), ServiceMode::Systemd) {
            HostCommand::Piped { script, file, .. } => {
                assert_eq!(file, &big);
                assert!(
                    script.starts_with(
                        "set -e; d=$(dirname -- /usr/local/bin/pgherd-agent); b=$(basename -- /usr/local/bin/pgherd-agent); "
                    ),
                    "{script}"
                );
                assert!(script.contains("chmod 640 \"$t\"; chown postgres:postgres \"$t\""));
                // The sidecar only for the inode renamed into place.
                assert!(script.contains("mv -f \"$t\" /usr/local/bin/pgherd-agent; trap - EXIT"));
                assert!(script.contains("= \"$i\" ]"), "{script}");
            }
            other => panic!("{other:?}"),
        }
        match host_command(&Action::FixMetadata(big.clone()), ServiceMode::Systemd) {
            HostCommand::Upload {
                then: Some(then), ..
            } => assert!(
                then.ends_with("; exit 0") && then.contains("ab12"),
                "{then}"
            ),
            other => panic!("{other:?}"),
        }
    }
}
