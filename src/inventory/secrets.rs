//! Cluster secrets: the passwords pgherd needs (PostgreSQL superuser, replication and rewind
//! roles, the agent's REST API) plus passwords of application users declared without one.
//!
//! They live in a separate YAML file next to the inventory (`<inventory stem>.secrets.yml`,
//! mode 0600) so the inventory itself can be committed. Missing entries are generated (random,
//! 32 alphanumeric characters) and written back. [`Secret`] never prints its value: `Debug`
//! shows `<redacted>` and there is no `Display`, so a secret cannot leak through a log line or an
//! error message by accident; code that really needs the value calls [`Secret::expose`].

use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use rand::Rng;
use rand::distr::Alphanumeric;
use serde::{Deserialize, Serialize};

/// Length of generated passwords: 32 alphanumeric characters is ~190 bits of entropy and needs
/// no quoting in YAML, libpq connection strings or HAProxy configs.
pub const GENERATED_LEN: usize = 32;

/// A password. Deliberately without `Display`; `Debug` is redacted.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(transparent)]
pub struct Secret(String);

impl Secret {
    pub fn new(s: impl Into<String>) -> Secret {
        Secret(s.into())
    }

    /// A fresh random password.
    pub fn generate() -> Secret {
        let s: String = rand::rng()
            .sample_iter(&Alphanumeric)
            .take(GENERATED_LEN)
            .map(char::from)
            .collect();
        Secret(s)
    }

    /// The clear-text value, for rendering config files. Never log it.
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<redacted>")
    }
}

/// All passwords of one cluster, resolved.
#[derive(Debug, Clone)]
pub struct ClusterSecrets {
    pub superuser: Secret,
    pub replication: Secret,
    pub rewind: Secret,
    pub restapi: Secret,
    /// Application users declared in the inventory without an inline password.
    pub users: BTreeMap<String, Secret>,
}

impl ClusterSecrets {
    /// Every secret value, for redaction of text that might contain one.
    pub fn all(&self) -> Vec<&Secret> {
        let mut v = vec![
            &self.superuser,
            &self.replication,
            &self.rewind,
            &self.restapi,
        ];
        v.extend(self.users.values());
        v
    }
}

/// Secrets given from outside the secrets file, for operators whose passwords live in a vault
/// or a CI secret store: `PGHERD_SECRET_<ROLE>` holds the value, or `PGHERD_SECRET_<ROLE>_FILE`
/// names a file holding it (one trailing newline dropped; the file must not be readable by
/// group or others, like the secrets file). Roles: `SUPERUSER`, `REPLICATION`, `REWIND`,
/// `RESTAPI`, and `USER_<NAME>` for an application user (its name upper-cased, every other
/// character than a letter or digit as `_`). An overridden secret wins over the file and is
/// never written to it; both forms for one role, or an empty value, are errors naming the
/// variable (never the value).
#[derive(Debug, Default, Clone)]
pub struct Overrides(BTreeMap<String, Secret>);

/// The environment-variable prefix of [`Overrides`].
pub const OVERRIDE_PREFIX: &str = "PGHERD_SECRET_";

impl Overrides {
    /// Reads the overrides for the cluster roles and `users` through `env` (the process
    /// environment in real runs, a map in tests).
    pub fn from_env<'a>(
        env: &dyn Fn(&str) -> Option<String>,
        users: impl IntoIterator<Item = &'a str>,
    ) -> Result<Overrides, SecretsError> {
        let mut out = BTreeMap::new();
        let mut roles: Vec<(String, String)> = ["superuser", "replication", "rewind", "restapi"]
            .iter()
            .map(|r| (r.to_string(), r.to_ascii_uppercase()))
            .collect();
        for u in users {
            let var: String = u
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() {
                        c.to_ascii_uppercase()
                    } else {
                        '_'
                    }
                })
                .collect();
            roles.push((format!("user:{u}"), format!("USER_{var}")));
        }
        for (key, role) in roles {
            let var = format!("{OVERRIDE_PREFIX}{role}");
            let file_var = format!("{var}_FILE");
            let value = match (env(&var), env(&file_var)) {
                (Some(_), Some(_)) => {
                    return Err(SecretsError::Override {
                        var,
                        why: format!("and {file_var} are both set: give one"),
                    });
                }
                (Some(v), None) => v,
                (None, Some(path)) => read_secret_file(&file_var, &path)?,
                (None, None) => continue,
            };
            if value.is_empty() {
                return Err(SecretsError::Override {
                    var,
                    why: "is empty".into(),
                });
            }
            out.insert(key, Secret::new(value));
        }
        Ok(Overrides(out))
    }

    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

fn read_secret_file(var: &str, path: &str) -> Result<String, SecretsError> {
    let ferr = |source| SecretsError::OverrideFile {
        var: var.into(),
        path: path.into(),
        source,
    };
    let meta = std::fs::metadata(path).map_err(ferr)?;
    let mode = meta.permissions().mode() & 0o777;
    if mode & 0o077 != 0 {
        return Err(SecretsError::Override {
            var: var.into(),
            why: format!(
                "{path} is accessible by group/others (mode {mode:04o}); run `chmod 600 {path}`"
            ),
        });
    }
    let text = std::fs::read_to_string(path).map_err(ferr)?;
    Ok(text
        .strip_suffix('\n')
        .map(|t| t.strip_suffix('\r').unwrap_or(t))
        .unwrap_or(&text)
        .to_string())
}

/// The on-disk shape of the secrets file; every entry optional (absent = generate).
#[derive(Debug, Default, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SecretsFile {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superuser: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub replication: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rewind: Option<Secret>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub restapi: Option<Secret>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub users: BTreeMap<String, Secret>,
}

/// Why the secrets file could not be used. Messages never contain a secret.
#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("{path}: cannot read secrets file: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{path}: cannot write secrets file: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// The file is readable by group or others: refuse rather than keep using leaked passwords.
    #[error(
        "{path}: secrets file is accessible by group/others (mode {mode:04o}); run `chmod 600 {path}`"
    )]
    Permissions { path: String, mode: u32 },
    /// A `PGHERD_SECRET_*` override that cannot be used (the message names the variable and
    /// the file, never a value).
    #[error("{var}: {why}")]
    Override { var: String, why: String },
    #[error("{var}: cannot read {path}")]
    OverrideFile {
        var: String,
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// YAML error; serde-saphyr only quotes the offending token for syntax errors, and secret
    /// values are strings so type errors cannot quote one.
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
}

impl SecretsFile {
    pub fn parse(text: &str, origin: &str) -> Result<SecretsFile, SecretsError> {
        if text.trim().is_empty() {
            return Ok(SecretsFile::default());
        }
        crate::yaml::from_str(text).map_err(|e| SecretsError::Syntax {
            path: origin.to_string(),
            line: e.line,
            column: e.column,
            message: e.message,
        })
    }

    /// Fills every missing entry (cluster roles and the given application `users`), returning
    /// the resolved secrets and whether anything was generated (= the file must be rewritten).
    pub fn resolve<'a>(
        &mut self,
        users: impl IntoIterator<Item = &'a str>,
    ) -> (ClusterSecrets, bool) {
        self.resolve_with(users, &Overrides::default())
    }

    /// [`SecretsFile::resolve`] with `overrides` (from the environment) taking precedence: an
    /// overridden secret is neither generated nor stored in the file.
    pub fn resolve_with<'a>(
        &mut self,
        users: impl IntoIterator<Item = &'a str>,
        overrides: &Overrides,
    ) -> (ClusterSecrets, bool) {
        let mut generated = false;
        let mut fill = |role: &str, slot: &mut Option<Secret>| -> Secret {
            if let Some(s) = overrides.0.get(role) {
                return s.clone();
            }
            if slot.is_none() {
                *slot = Some(Secret::generate());
                generated = true;
            }
            slot.clone().expect("just filled")
        };
        let superuser = fill("superuser", &mut self.superuser);
        let replication = fill("replication", &mut self.replication);
        let rewind = fill("rewind", &mut self.rewind);
        let restapi = fill("restapi", &mut self.restapi);
        let mut resolved_users = BTreeMap::new();
        for u in users {
            if let Some(s) = overrides.0.get(&format!("user:{u}")) {
                resolved_users.insert(u.to_string(), s.clone());
                continue;
            }
            let s = self.users.entry(u.to_string()).or_insert_with(|| {
                generated = true;
                Secret::generate()
            });
            resolved_users.insert(u.to_string(), s.clone());
        }
        (
            ClusterSecrets {
                superuser,
                replication,
                rewind,
                restapi,
                users: resolved_users,
            },
            generated,
        )
    }

    /// Reads `path` (absent = empty), refusing group/world-accessible files.
    pub fn read(path: &Path) -> Result<SecretsFile, SecretsError> {
        let shown = path.display().to_string();
        match std::fs::metadata(path) {
            Ok(meta) => {
                let mode = meta.permissions().mode() & 0o777;
                if mode & 0o077 != 0 {
                    return Err(SecretsError::Permissions { path: shown, mode });
                }
                let text = std::fs::read_to_string(path).map_err(|source| SecretsError::Read {
                    path: shown.clone(),
                    source,
                })?;
                SecretsFile::parse(&text, &shown)
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(SecretsFile::default()),
            Err(source) => Err(SecretsError::Read {
                path: shown,
                source,
            }),
        }
    }

    /// Writes atomically (temp file created 0600 in the same directory, then renamed), so a
    /// crash never leaves a truncated file and the passwords are never briefly world-readable.
    pub fn write(&self, path: &Path) -> Result<(), SecretsError> {
        let shown = path.display().to_string();
        let werr = |source| SecretsError::Write {
            path: shown.clone(),
            source,
        };
        let body = serde_saphyr::to_string(self)
            .map_err(|e| werr(std::io::Error::other(e.to_string())))?;
        let text = format!(
            "# pgherd cluster secrets: generated, keep private (mode 0600), do not commit.\n{body}"
        );
        super::replace_file(path, &text, 0o600).map_err(werr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn debug_of_secret_is_redacted() {
        let s = Secret::new("hunter2hunter2");
        assert_eq!(format!("{s:?}"), "<redacted>");
    }

    #[test]
    fn generated_passwords_are_long_and_distinct() {
        let a = Secret::generate();
        let b = Secret::generate();
        assert_eq!(a.expose().len(), GENERATED_LEN);
        assert!(a.expose().chars().all(|c| c.is_ascii_alphanumeric()));
        assert_ne!(a, b);
    }

    #[test]
    fn resolve_keeps_existing_and_generates_missing() {
        let mut f = SecretsFile {
            superuser: Some(Secret::new("keepme")),
            ..Default::default()
        };
        let (s, generated) = f.resolve(["app"]);
        assert!(generated);
        assert_eq!(s.superuser.expose(), "keepme");
        assert!(f.users.contains_key("app"));
        let (_, again) = f.resolve(["app"]);
        assert!(!again, "second resolve must not generate anything");
    }

    #[test]
    fn write_creates_private_file_and_read_refuses_public_one() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("c.secrets.yml");
        let mut f = SecretsFile::default();
        let (s, _) = f.resolve(["app"]);
        f.write(&p).unwrap();
        let mode = std::fs::metadata(&p).unwrap().permissions().mode() & 0o777;
        assert_eq!(mode, 0o600);
        let back = SecretsFile::read(&p).unwrap();
        assert_eq!(back.superuser.as_ref().unwrap(), &s.superuser);
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o644)).unwrap();
        let err = SecretsFile::read(&p).unwrap_err().to_string();
        assert!(err.contains("chmod 600"), "{err}");
        assert!(!err.contains(s.superuser.expose()));
    }
}
