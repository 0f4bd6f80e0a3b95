//! What one planned [`Action`] runs on a host, over its transport: `apt-get install`,
//! `useradd`, `install -d`, an atomic upload (with the checksum sidecar for large files),
//! `systemctl daemon-reload` / `disable --now`, and the service operation of the host's mode.

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

/// Runs `action` on the host of `t`, in the host's service `mode`.
pub(super) async fn run_action(
    t: &dyn Transport,
    mode: ServiceMode,
    action: &Action,
) -> Result<(), TransportError> {
    match action {
        Action::InstallPackages(pkgs) => {
            let list: Vec<String> = pkgs.iter().map(|p| shell_quote(p)).collect();
            let cmd = format!(
                "export DEBIAN_FRONTEND=noninteractive; apt-get install -y -q {l} || {{ apt-get update -q && apt-get install -y -q {l}; }}",
                l = list.join(" ")
            );
            t.run_ok(&cmd, PACKAGES_TIMEOUT).await?;
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
            let cmd = format!("id -u {q} >/dev/null 2>&1 || {cmd} {q}");
            t.run_ok(&cmd, LOCAL_TIMEOUT).await?;
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
            t.run_ok(&cmd.join(" && "), LOCAL_TIMEOUT).await?;
        }
        Action::Upload(f) if f.content.len() >= facts::SIDECAR_MIN_BYTES => {
            upload_with_sidecar(t, f).await?;
        }
        Action::FixMetadata(f) if f.content.len() >= facts::SIDECAR_MIN_BYTES => {
            t.upload(&f.path, &f.content, f.mode, Some(&f.owner))
                .await?;
            // chmod/chown changed the file's ctime: record its checksum again, or every later
            // `plan` would hash it.
            let cmd = format!("{}; exit 0", facts::checksum_sidecar(&f.path, &f.sha, ""));
            t.run_ok(&cmd, SIDECAR_TIMEOUT).await?;
        }
        Action::Upload(f) | Action::FixMetadata(f) => {
            t.upload(&f.path, &f.content, f.mode, Some(&f.owner))
                .await?;
        }
        Action::DaemonReload => {
            t.run_ok("systemctl daemon-reload", LOCAL_TIMEOUT).await?;
        }
        Action::StopUnit(u) => {
            let cmd = format!("systemctl disable --now {}", shell_quote(u));
            t.run_ok(&cmd, SERVICE_TIMEOUT).await?;
        }
        Action::Service(svc, op) => {
            t.run_ok(&services::op_command(*svc, *op, mode), SERVICE_TIMEOUT)
                .await?;
        }
    }
    Ok(())
}

/// Uploads a large file (the agent binary) and records its checksum sidecar in the same
/// command, so the next `plan` reads the checksum instead of hashing the file on the host.
/// Like [`Transport::upload`]: a temporary file in the target directory, mode and owner set,
/// then renamed over the target (atomic). Unlike it, no checksum of the old file is taken first
/// — the plan already knows the content differs. The sidecar is only written while the file
/// is still the inode pgherd renamed into place.
async fn upload_with_sidecar(t: &dyn Transport, f: &DesiredFile) -> Result<(), TransportError> {
    let q = shell_quote(&f.path);
    let (u, g) = f.owner.split_once(':').unwrap_or((&f.owner, &f.owner));
    let script = format!(
        "set -e; d=$(dirname -- {q}); b=$(basename -- {q}); \
         t=$(mktemp \"$d/.$b.pgherd-XXXXXX\"); trap 'rm -f \"$t\"' EXIT; \
         cat > \"$t\"; chmod {mode:o} \"$t\"; chown {owner} \"$t\"; i=$(stat -c %i \"$t\"); \
         mv -f \"$t\" {q}; trap - EXIT; set +e; {side}; exit 0",
        mode = f.mode,
        owner = shell_quote(&format!("{u}:{g}")),
        side = facts::checksum_sidecar(&f.path, &f.sha, "$i"),
    );
    let exec = crate::transport::Exec {
        script: &script,
        stdin: Some(&f.content),
        secrets: &[],
        timeout: LARGE_UPLOAD_TIMEOUT,
    };
    t.exec(exec).await?.check(t.host(), &script)?;
    Ok(())
}
