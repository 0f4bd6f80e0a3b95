//! An in-memory [`Transport`] for planner tests: it records every command (redacted), answers
//! commands from a script of canned outputs, and serves the file primitives from a map, so a
//! planner can be tested for "what would it run / upload" without a host.

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use async_trait::async_trait;

use super::{Exec, Output, RemoteFileState, Transport, TransportError, redact_output, sha256_hex};

/// A file held by a [`FakeTransport`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FakeFile {
    pub bytes: Vec<u8>,
    /// Permission bits (e.g. `0o644`).
    pub mode: u32,
    /// `user:group`.
    pub owner: String,
}

/// One thing the fake was asked to do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FakeCall {
    /// A command (as shown: secrets redacted).
    Run(String),
    /// An upload that changed something.
    Upload {
        path: String,
        sha256: String,
        mode: u32,
        owner: Option<String>,
    },
}

#[derive(Default)]
struct State {
    files: BTreeMap<String, FakeFile>,
    responses: Vec<(String, Output)>,
    calls: Vec<FakeCall>,
    unreachable: bool,
}

/// See the module doc. Cheap to build; all methods take `&self`.
pub struct FakeTransport {
    host: String,
    state: Mutex<State>,
}

impl FakeTransport {
    pub fn new(host: impl Into<String>) -> FakeTransport {
        FakeTransport {
            host: host.into(),
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Puts a file on the fake host (mode 0644, owner root:root).
    pub fn with_file(self, path: &str, bytes: impl Into<Vec<u8>>) -> FakeTransport {
        self.set_file(path, bytes, 0o644, "root:root");
        self
    }

    pub fn set_file(&self, path: &str, bytes: impl Into<Vec<u8>>, mode: u32, owner: &str) {
        self.lock().files.insert(
            path.to_string(),
            FakeFile {
                bytes: bytes.into(),
                mode,
                owner: owner.to_string(),
            },
        );
    }

    /// The file at `path`, if any.
    pub fn file(&self, path: &str) -> Option<FakeFile> {
        self.lock().files.get(path).cloned()
    }

    /// Commands whose text contains `pattern` answer `status`/`stdout` (first matching rule
    /// wins; unmatched commands succeed with empty output).
    pub fn on(self, pattern: &str, status: i32, stdout: &str) -> FakeTransport {
        self.lock().responses.push((
            pattern.to_string(),
            Output {
                status,
                stdout: stdout.as_bytes().to_vec(),
                stderr: Vec::new(),
            },
        ));
        self
    }

    /// Like [`FakeTransport::on`] with a full [`Output`].
    pub fn on_output(&self, pattern: &str, out: Output) {
        self.lock().responses.push((pattern.to_string(), out));
    }

    /// Makes every call fail with [`TransportError::Unreachable`] (or work again).
    pub fn set_unreachable(&self, yes: bool) {
        self.lock().unreachable = yes;
    }

    /// Everything asked so far, in order.
    pub fn calls(&self) -> Vec<FakeCall> {
        self.lock().calls.clone()
    }

    /// The commands run so far (redacted), in order.
    pub fn commands(&self) -> Vec<String> {
        self.lock()
            .calls
            .iter()
            .filter_map(|c| match c {
                FakeCall::Run(s) => Some(s.clone()),
                FakeCall::Upload { .. } => None,
            })
            .collect()
    }

    fn check_reachable(&self, st: &State) -> Result<(), TransportError> {
        if st.unreachable {
            return Err(TransportError::Unreachable {
                host: self.host.clone(),
                reason: "fake host marked unreachable".into(),
            });
        }
        Ok(())
    }
}

#[async_trait]
impl Transport for FakeTransport {
    fn host(&self) -> &str {
        &self.host
    }

    fn default_timeout(&self) -> Duration {
        Duration::from_secs(1)
    }

    async fn exec(&self, exec: Exec<'_>) -> Result<Output, TransportError> {
        let mut st = self.lock();
        self.check_reachable(&st)?;
        st.calls.push(FakeCall::Run(exec.shown()));
        let out = st
            .responses
            .iter()
            .find(|(p, _)| exec.script.contains(p.as_str()))
            .map(|(_, o)| o.clone())
            .unwrap_or(Output {
                status: 0,
                stdout: Vec::new(),
                stderr: Vec::new(),
            });
        Ok(redact_output(out, exec.secrets))
    }

    async fn read_file(&self, path: &str) -> Result<Option<Vec<u8>>, TransportError> {
        let st = self.lock();
        self.check_reachable(&st)?;
        Ok(st.files.get(path).map(|f| f.bytes.clone()))
    }

    async fn stat_file(&self, path: &str) -> Result<Option<RemoteFileState>, TransportError> {
        let st = self.lock();
        self.check_reachable(&st)?;
        Ok(st.files.get(path).map(|f| RemoteFileState {
            sha256: sha256_hex(&f.bytes),
            mode: format!("{:o}", f.mode),
            owner: f.owner.clone(),
        }))
    }

    async fn upload(
        &self,
        path: &str,
        bytes: &[u8],
        mode: u32,
        owner: Option<&str>,
    ) -> Result<bool, TransportError> {
        let mut st = self.lock();
        self.check_reachable(&st)?;
        let old = st.files.get(path).cloned();
        let owner_now = match (owner, &old) {
            (Some(o), _) if o.contains(':') => o.to_string(),
            (Some(o), _) => format!("{o}:{o}"),
            (None, Some(f)) => f.owner.clone(),
            (None, None) => "root:root".to_string(),
        };
        let new = FakeFile {
            bytes: bytes.to_vec(),
            mode,
            owner: owner_now,
        };
        if old.as_ref() == Some(&new) {
            return Ok(false);
        }
        st.calls.push(FakeCall::Upload {
            path: path.to_string(),
            sha256: sha256_hex(bytes),
            mode,
            owner: owner.map(str::to_string),
        });
        st.files.insert(path.to_string(), new);
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn second_identical_upload_reports_no_change() {
        let t = FakeTransport::new("n1");
        assert!(
            t.upload("/etc/a", b"x", 0o600, Some("postgres"))
                .await
                .unwrap()
        );
        assert!(
            !t.upload("/etc/a", b"x", 0o600, Some("postgres"))
                .await
                .unwrap()
        );
        assert!(
            t.upload("/etc/a", b"x", 0o644, Some("postgres"))
                .await
                .unwrap()
        );
        assert_eq!(t.sha256("/etc/a").await.unwrap(), Some(sha256_hex(b"x")));
        assert_eq!(t.calls().len(), 2);
    }

    #[tokio::test]
    async fn records_commands_redacted_and_answers_from_script() {
        let t = FakeTransport::new("n1").on("pg_isready", 2, "no response");
        let out = t
            .run("pg_isready -q", Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(out.status, 2);
        t.run_secret(
            "psql -c \"PASSWORD 's3cret'\"",
            None,
            &["s3cret"],
            Duration::from_secs(1),
        )
        .await
        .unwrap();
        let cmds = t.commands();
        assert_eq!(cmds[0], "pg_isready -q");
        assert!(!cmds[1].contains("s3cret"));
    }

    #[tokio::test]
    async fn run_ok_turns_failure_into_command_failed() {
        let t = FakeTransport::new("n2").on("false", 1, "");
        let err = t.run_ok("false", Duration::from_secs(1)).await.unwrap_err();
        assert!(
            matches!(err, TransportError::CommandFailed { ref host, status: 1, .. } if host == "n2")
        );
    }

    #[tokio::test]
    async fn unreachable_fake_fails_every_call() {
        let t = FakeTransport::new("n3").with_file("/x", "1");
        t.set_unreachable(true);
        assert!(matches!(
            t.read_file("/x").await,
            Err(TransportError::Unreachable { .. })
        ));
    }
}
