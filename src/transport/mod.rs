//! How the provisioning side reaches a host: the [`Transport`] trait (run a shell command, read a
//! file, hash a file, upload a file atomically), its error type, and its implementations —
//! [`ssh::SshTransport`] (OpenSSH, one multiplexed connection per host) and
//! `fake::FakeTransport` (in-memory, for planner tests; compiled for tests and with the
//! `testing` feature).
//!
//! The trait is deliberately narrow: everything a planner needs is "run `sh -c` on the host" plus
//! three file primitives that have shell-based default implementations, so a new transport only
//! has to implement [`Transport::exec`].

#[cfg(any(test, feature = "testing"))]
pub mod fake;
pub mod ssh;

use std::fmt;
use std::time::Duration;

use async_trait::async_trait;
use sha2::{Digest, Sha256};

#[cfg(any(test, feature = "testing"))]
pub use fake::FakeTransport;
pub use ssh::{HostSpec, SshOptions, SshTransport, connect_all};

/// The text that replaces a secret wherever a command or its output is shown.
pub const REDACTED: &str = "******";

/// How many bytes of stderr a [`TransportError::CommandFailed`] keeps (the end of it, where
/// shells and tools put the reason).
pub const STDERR_TAIL_BYTES: usize = 2048;

/// Why a transport operation failed. Every message names the host; none contains a secret
/// (commands run through [`Transport::run_secret`] are shown redacted).
#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    /// The host could not be reached (no route, refused, connect timeout, connection lost).
    /// Retrying later may help; the host may be down.
    #[error("host {host}: unreachable ({reason})")]
    Unreachable { host: String, reason: String },
    /// The host answered but refused our key: a configuration problem, retrying will not help.
    #[error("host {host}: ssh authentication refused ({reason})")]
    AuthRefused { host: String, reason: String },
    /// The host presented a key different from the one recorded in the known_hosts file
    /// (a reinstalled host, or someone in the middle). Never accepted silently.
    #[error(
        "host {host}: host key does not match {known_hosts} (remove the stale entry if the host was reinstalled)"
    )]
    HostKeyMismatch { host: String, known_hosts: String },
    /// The command did not finish within its timeout; it was killed on the host.
    #[error("host {host}: command timed out after {timeout:?}: {cmd}")]
    Timeout {
        host: String,
        cmd: String,
        timeout: Duration,
    },
    /// The command ran and exited non-zero (only from the `*_ok` helpers and file primitives;
    /// [`Transport::run`] returns non-zero exits as a normal [`Output`]).
    #[error("host {host}: command failed with status {status}: {cmd}: {stderr_tail}")]
    CommandFailed {
        host: String,
        cmd: String,
        status: i32,
        stderr_tail: String,
    },
    /// A local or channel I/O failure while talking to the host.
    #[error("host {host}: i/o error while {what}")]
    Io {
        host: String,
        what: String,
        #[source]
        source: std::io::Error,
    },
}

impl TransportError {
    /// The host the error is about.
    pub fn host(&self) -> &str {
        match self {
            TransportError::Unreachable { host, .. }
            | TransportError::AuthRefused { host, .. }
            | TransportError::HostKeyMismatch { host, .. }
            | TransportError::Timeout { host, .. }
            | TransportError::CommandFailed { host, .. }
            | TransportError::Io { host, .. } => host,
        }
    }
}

/// What a finished command produced.
#[derive(Clone, PartialEq, Eq)]
pub struct Output {
    /// Exit status; `-1` when the process was killed by a signal (no exit code).
    pub status: i32,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == 0
    }

    /// stdout as (lossy) UTF-8.
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }

    /// The last [`STDERR_TAIL_BYTES`] of stderr as trimmed (lossy) UTF-8.
    pub fn stderr_tail(&self) -> String {
        let start = self.stderr.len().saturating_sub(STDERR_TAIL_BYTES);
        String::from_utf8_lossy(&self.stderr[start..])
            .trim()
            .to_string()
    }

    /// `Ok(self)` when the status is 0, else [`TransportError::CommandFailed`] naming `host` and
    /// the (already redacted) command text `shown`.
    pub fn check(self, host: &str, shown: &str) -> Result<Output, TransportError> {
        if self.success() {
            Ok(self)
        } else {
            Err(TransportError::CommandFailed {
                host: host.to_string(),
                cmd: shown.to_string(),
                status: self.status,
                stderr_tail: self.stderr_tail(),
            })
        }
    }
}

impl fmt::Debug for Output {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Output")
            .field("status", &self.status)
            .field("stdout", &String::from_utf8_lossy(&self.stdout))
            .field("stderr", &String::from_utf8_lossy(&self.stderr))
            .finish()
    }
}

/// One command to run: the `sh -c` script, optional stdin, the secrets to hide, the timeout.
#[derive(Clone, Copy)]
pub struct Exec<'a> {
    /// Shell script run with `sh -c` on the host (through `sudo -n` when the transport
    /// "becomes" root).
    pub script: &'a str,
    /// Bytes fed to the command's stdin (stdin is empty when `None`). Passing secrets here keeps
    /// them out of the host's process list.
    pub stdin: Option<&'a [u8]>,
    /// Substrings replaced by [`REDACTED`] in every error, log line and recorded command, and in
    /// the returned stdout/stderr.
    pub secrets: &'a [&'a str],
    /// The command is killed on the host when it runs longer than this.
    pub timeout: Duration,
}

impl<'a> Exec<'a> {
    pub fn new(script: &'a str, timeout: Duration) -> Exec<'a> {
        Exec {
            script,
            stdin: None,
            secrets: &[],
            timeout,
        }
    }

    /// The script as it may be shown to an operator (secrets replaced).
    pub fn shown(&self) -> String {
        redact(self.script, self.secrets)
    }
}

/// Replaces every occurrence of each (non-empty) secret in `text` with [`REDACTED`].
pub fn redact(text: &str, secrets: &[&str]) -> String {
    let mut out = text.to_string();
    for s in secrets.iter().filter(|s| !s.is_empty()) {
        out = out.replace(s, REDACTED);
    }
    out
}

fn redact_bytes(bytes: Vec<u8>, secrets: &[&str]) -> Vec<u8> {
    if secrets.iter().all(|s| s.is_empty()) {
        return bytes;
    }
    redact(&String::from_utf8_lossy(&bytes), secrets).into_bytes()
}

/// Applies the redaction of `exec` to a command's output.
pub fn redact_output(out: Output, secrets: &[&str]) -> Output {
    Output {
        status: out.status,
        stdout: redact_bytes(out.stdout, secrets),
        stderr: redact_bytes(out.stderr, secrets),
    }
}

/// Quotes `s` for a POSIX shell (single quotes; embedded single quotes closed and escaped).
pub fn shell_quote(s: &str) -> String {
    if !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"/._-+:=@,".contains(&b))
    {
        return s.to_string();
    }
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// Lowercase hex sha256 of `bytes` (the form `sha256sum` prints).
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Exit status the file primitives use to say "the path does not exist" (chosen outside the
/// range `cat`/`sha256sum`/`stat` use, so it cannot be confused with their failures).
const ABSENT_STATUS: i32 = 44;

/// What is known about a remote file before an upload: its checksum, octal mode and owner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteFileState {
    pub sha256: String,
    /// Octal permission bits as `stat -c %a` prints them (`644`, `600`, `2775`).
    pub mode: String,
    /// `user:group`.
    pub owner: String,
}

/// A host reachable for provisioning.
///
/// Contract:
/// - `exec` runs `script` with `sh -c` on the host as the transport's user, or as root through
///   `sudo -n` when the host is configured to "become" and the user is not root. It returns the
///   exit status and output whatever the status is (a non-zero exit is **not** an error). It
///   fails only when the command could not be run to completion: the host is unreachable
///   ([`TransportError::Unreachable`]), authentication was refused, the command exceeded its
///   timeout ([`TransportError::Timeout`]; the remote command is killed), or a channel broke
///   ([`TransportError::Io`]).
/// - Commands on one host may run concurrently; implementations bound the concurrency per host
///   (the SSH one to 8 channels) and queue the excess rather than failing.
/// - Nothing is retried: commands are not assumed idempotent.
/// - Errors and logs never show a secret passed in [`Exec::secrets`].
/// - The file primitives act on absolute paths and are run with the same privileges as `exec`.
#[async_trait]
pub trait Transport: Send + Sync {
    /// The inventory name of the host (used in every error and log line).
    fn host(&self) -> &str;

    /// The timeout used by the file primitives and the `*_ok` convenience helpers without an
    /// explicit timeout.
    fn default_timeout(&self) -> Duration {
        Duration::from_secs(60)
    }

    /// Runs one command (see the trait contract).
    async fn exec(&self, exec: Exec<'_>) -> Result<Output, TransportError>;

    /// Runs `cmd` with `sh -c`; a non-zero exit is returned in [`Output::status`].
    async fn run(&self, cmd: &str, timeout: Duration) -> Result<Output, TransportError> {
        self.exec(Exec::new(cmd, timeout)).await
    }

    /// Runs `cmd` and turns a non-zero exit into [`TransportError::CommandFailed`] (with the
    /// tail of stderr).
    async fn run_ok(&self, cmd: &str, timeout: Duration) -> Result<Output, TransportError> {
        let out = self.exec(Exec::new(cmd, timeout)).await?;
        out.check(self.host(), cmd)
    }

    /// Runs a command that carries secrets: every occurrence of each of `secrets` is replaced
    /// by [`REDACTED`] in errors, logs and the returned output. Prefer feeding secrets through
    /// `stdin` (they then never appear in the host's process list either). Non-zero exits
    /// become [`TransportError::CommandFailed`].
    async fn run_secret(
        &self,
        cmd: &str,
        stdin: Option<&[u8]>,
        secrets: &[&str],
        timeout: Duration,
    ) -> Result<Output, TransportError> {
        let exec = Exec {
            script: cmd,
            stdin,
            secrets,
            timeout,
        };
        let out = self.exec(exec).await?;
        out.check(self.host(), &exec.shown())
    }

    /// The content of the file at `path`, or `None` when nothing exists there.
    async fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, TransportError> {
        let q = shell_quote(path);
        let script = format!("[ -e {q} ] || exit {ABSENT_STATUS}; exec cat -- {q}");
        let out = self
            .exec(Exec::new(&script, self.default_timeout()))
            .await?;
        if out.status == ABSENT_STATUS {
            return Ok(None);
        }
        Ok(Some(out.check(self.host(), &script)?.stdout))
    }

    /// The lowercase hex sha256 of the file at `path`, or `None` when nothing exists there.
    async fn sha256(&self, path: &str) -> Result<Option<String>, TransportError> {
        Ok(self.stat_file(path).await?.map(|s| s.sha256))
    }

    /// Checksum, mode and owner of the file at `path` in one round trip (`None` when absent).
    async fn stat_file(&self, path: &str) -> Result<Option<RemoteFileState>, TransportError> {
        let q = shell_quote(path);
        let script = format!(
            "[ -e {q} ] || exit {ABSENT_STATUS}; stat -L -c '%a %U:%G' -- {q} && sha256sum -- {q}"
        );
        let out = self
            .exec(Exec::new(&script, self.default_timeout()))
            .await?;
        if out.status == ABSENT_STATUS {
            return Ok(None);
        }
        let out = out.check(self.host(), &script)?;
        let text = out.stdout_str();
        let mut lines = text.lines();
        let parsed = (|| {
            let (mode, owner) = lines.next()?.split_once(' ')?;
            let sum = lines.next()?.split_whitespace().next()?;
            (sum.len() == 64).then(|| RemoteFileState {
                sha256: sum.to_string(),
                mode: mode.to_string(),
                owner: owner.to_string(),
            })
        })();
        parsed
            .map(Some)
            .ok_or_else(|| TransportError::CommandFailed {
                host: self.host().to_string(),
                cmd: script.clone(),
                status: 0,
                stderr_tail: format!("unexpected output: {}", text.trim()),
            })
    }

    /// Makes the file at `path` hold `bytes` with permission bits `mode` and, when given,
    /// `owner` (`user` or `user:group`). Returns whether anything changed.
    ///
    /// The checksum, mode and owner are compared first, so uploading identical content again
    /// changes nothing and returns `false`. New content is written to a temporary file in the
    /// same directory, given its mode and owner, then renamed over `path`: readers see the old
    /// or the new file, never a partial one. The parent directory must exist.
    async fn upload(
        &self,
        path: &str,
        bytes: &[u8],
        mode: u32,
        owner: Option<&str>,
    ) -> Result<bool, TransportError> {
        let want_mode = format!("{mode:o}");
        let current = self.stat_file(path).await?;
        let q = shell_quote(path);
        if let Some(cur) = &current
            && cur.sha256 == sha256_hex(bytes)
        {
            // Same content: only fix metadata that differs.
            let mut fixes = Vec::new();
            if cur.mode != want_mode {
                fixes.push(format!("chmod {want_mode} -- {q}"));
            }
            if let Some(o) = owner
                && !owner_matches(&cur.owner, o)
            {
                fixes.push(format!("chown {} -- {q}", shell_quote(o)));
            }
            if fixes.is_empty() {
                return Ok(false);
            }
            let script = fixes.join(" && ");
            self.exec(Exec::new(&script, self.default_timeout()))
                .await?
                .check(self.host(), &script)?;
            return Ok(true);
        }
        let chown = owner
            .map(|o| format!("chown {} \"$t\" && ", shell_quote(o)))
            .unwrap_or_default();
        // mktemp in the target's directory so that the final mv is a rename within one
        // filesystem (atomic); the trap removes the temporary file if anything fails.
        let script = format!(
            "set -e; d=$(dirname -- {q}); b=$(basename -- {q}); \
             t=$(mktemp \"$d/.$b.pgherd-XXXXXX\"); trap 'rm -f \"$t\"' EXIT; \
             cat > \"$t\"; chmod {want_mode} \"$t\" && {chown}mv -f \"$t\" {q}; trap - EXIT"
        );
        let exec = Exec {
            script: &script,
            stdin: Some(bytes),
            secrets: &[],
            timeout: self.default_timeout(),
        };
        self.exec(exec).await?.check(self.host(), &script)?;
        Ok(true)
    }
}

/// Whether `stat`'s `user:group` satisfies a wanted `user` or `user:group`.
fn owner_matches(current: &str, wanted: &str) -> bool {
    if wanted.contains(':') {
        current == wanted
    } else {
        current.split(':').next() == Some(wanted)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_leaves_plain_words_and_escapes_quotes() {
        assert_eq!(shell_quote("/etc/x.conf"), "/etc/x.conf");
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
    }

    #[test]
    fn redacts_every_secret_occurrence() {
        let s = redact("psql -c \"PASSWORD 'hunter2'\" # hunter2", &["hunter2", ""]);
        assert!(!s.contains("hunter2"));
        assert_eq!(s.matches(REDACTED).count(), 2);
    }

    #[test]
    fn command_failed_keeps_only_the_stderr_tail() {
        let out = Output {
            status: 3,
            stdout: vec![],
            stderr: [vec![b'x'; 5000], b"the reason\n".to_vec()].concat(),
        };
        let err = out.check("n1", "false").unwrap_err();
        match &err {
            TransportError::CommandFailed {
                stderr_tail,
                status,
                ..
            } => {
                assert_eq!(*status, 3);
                assert!(stderr_tail.ends_with("the reason"));
                assert!(stderr_tail.len() <= STDERR_TAIL_BYTES);
            }
            other => panic!("unexpected {other:?}"),
        }
        assert!(err.to_string().contains("host n1"));
    }

    #[test]
    fn owner_matches_user_or_user_and_group() {
        assert!(owner_matches("postgres:postgres", "postgres"));
        assert!(owner_matches("postgres:postgres", "postgres:postgres"));
        assert!(!owner_matches("root:root", "postgres"));
        assert!(!owner_matches("postgres:root", "postgres:postgres"));
    }

    #[test]
    fn sha256_hex_matches_sha256sum() {
        assert_eq!(
            sha256_hex(b"hello\n"),
            "5891b5b522d5df086d0ff0b110fbd9d21bb4fc7163af34d08286a2e846f6be03"
        );
    }
}
