//! Reading an agent config: the file's bytes and their digest ([`LoadedConfig`]), strict YAML
//! parsing with located errors, and the checks on values that parsed ([`ConfigError`]).

use std::path::Path;

use super::AgentConfig;

/// A config problem, located in the source file.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// YAML syntax or type error; `message` carries the line:column and a snippet.
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// A value that parsed but is not acceptable.
    #[error("{path}: {field}: {message}")]
    Invalid {
        path: String,
        field: String,
        message: String,
    },
}

/// A config as loaded from its file, with the digest of the exact bytes it was parsed from.
#[derive(Debug, Clone)]
pub struct LoadedConfig {
    pub config: AgentConfig,
    /// Lowercase hex sha256 of the file's bytes (what `sha256sum` prints): the CLI compares it
    /// with the digest of the file it wrote to learn whether the agent runs with that file.
    pub sha256: String,
}

/// Lowercase hex sha256 of `bytes`.
pub fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    let d = Sha256::digest(bytes);
    let mut s = String::with_capacity(64);
    for b in d {
        s.push_str(&format!("{b:02x}"));
    }
    s
}

impl AgentConfig {
    /// Reads, parses and validates `path`, keeping the digest of the bytes read.
    pub fn load_file(path: &Path) -> Result<LoadedConfig, ConfigError> {
        let bytes = std::fs::read(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        let text = String::from_utf8(bytes).map_err(|e| ConfigError::Read {
            path: path.display().to_string(),
            source: std::io::Error::new(std::io::ErrorKind::InvalidData, e.utf8_error()),
        })?;
        let config = Self::parse(&text, &path.display().to_string())?;
        Ok(LoadedConfig {
            sha256: sha256_hex(text.as_bytes()),
            config,
        })
    }

    pub fn load(path: &Path) -> Result<AgentConfig, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and validates. `origin` names the source in errors.
    pub fn parse(text: &str, origin: &str) -> Result<AgentConfig, ConfigError> {
        let cfg: AgentConfig = crate::yaml::from_str(text).map_err(|e| ConfigError::Syntax {
            path: origin.to_string(),
            line: e.line,
            column: e.column,
            message: e.message,
        })?;
        cfg.validate(origin)?;
        Ok(cfg)
    }

    fn validate(&self, origin: &str) -> Result<(), ConfigError> {
        let bad = |field: &str, message: String| ConfigError::Invalid {
            path: origin.to_string(),
            field: field.to_string(),
            message,
        };
        if self.scope.trim().is_empty() {
            return Err(bad("scope", "must not be empty".into()));
        }
        if self.name.trim().is_empty() || self.name.contains('/') {
            return Err(bad("name", "must be non-empty and contain no '/'".into()));
        }
        for (field, v) in [
            ("restapi.listen", &self.restapi.listen),
            ("restapi.connect_address", &self.restapi.connect_address),
            ("postgresql.listen", &self.postgresql.listen),
            (
                "postgresql.connect_address",
                &self.postgresql.connect_address,
            ),
        ] {
            let Some((h, p)) = v.rsplit_once(':') else {
                return Err(bad(field, format!("expected host:port, got {v:?}")));
            };
            if h.is_empty() || p.parse::<u16>().is_err() {
                return Err(bad(field, format!("expected host:port, got {v:?}")));
            }
        }
        if let Err(entry) = crate::config::access::AccessList::parse(
            &self.restapi.allowlist,
            self.restapi.allowlist_include_members,
        ) {
            return Err(bad(
                "restapi.allowlist",
                format!(
                    "{entry:?} is not an IP address or CIDR network (host names are not resolved)"
                ),
            ));
        }
        if self.etcd3.endpoints().is_empty() {
            return Err(bad(
                "etcd3.hosts",
                "at least one etcd endpoint is required".into(),
            ));
        }
        if !self.postgresql.data_dir.is_absolute() {
            return Err(bad(
                "postgresql.data_dir",
                "must be an absolute path".into(),
            ));
        }
        let timing = crate::config::Timing::from_dcs(&self.bootstrap.dcs);
        timing.check().map_err(|m| bad("bootstrap.dcs", m))?;
        if let Some(l) = &self.log
            && let (Some(f), Some(t)) = (l.format_shorthand(), l.log_type)
            && f != t
        {
            return Err(bad(
                "log.format",
                format!("{f:?} disagrees with log.type {t:?}; give one of them"),
            ));
        }
        if self.watchdog.safety_margin < -1 {
            return Err(bad("watchdog.safety_margin", "must be -1 or >= 0".into()));
        }
        for m in &self.postgresql.create_replica_methods {
            if m != "basebackup" {
                return Err(bad(
                    "postgresql.create_replica_methods",
                    format!("unsupported method {m:?} (only basebackup)"),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::VALID;
    use super::*;

    #[test]
    fn unknown_key_is_an_error_with_line_and_column() {
        let bad = VALID.replace("  use_slots: true", "  use_slotz: true");
        let e = AgentConfig::parse(&bad, "node.yml")
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("node.yml:"), "{e}");
        assert!(e.contains("use_slotz"), "{e}");
        let line = bad.lines().position(|l| l.contains("use_slotz")).unwrap() + 1;
        assert!(
            e.contains(&format!(":{line}:")),
            "expected line {line} in {e}"
        );
    }

    #[test]
    fn wrong_type_is_located() {
        let bad = VALID.replace("safety_margin: 5", "safety_margin: lots");
        let e = AgentConfig::parse(&bad, "node.yml")
            .unwrap_err()
            .to_string();
        let line = bad
            .lines()
            .position(|l| l.contains("safety_margin: lots"))
            .unwrap()
            + 1;
        assert!(e.contains(&format!("node.yml:{line}:")), "{e}");
    }

    #[test]
    fn timing_rule_violation_is_rejected() {
        let bad = VALID.replace("retry_timeout: 3", "retry_timeout: 5");
        let e = AgentConfig::parse(&bad, "node.yml")
            .unwrap_err()
            .to_string();
        assert!(
            e.contains("loop_wait + 2*retry_timeout must be <= ttl"),
            "{e}"
        );
    }

    #[test]
    fn ttl_below_minimum_is_rejected() {
        let bad = VALID
            .replace("ttl: 10", "ttl: 4")
            .replace("loop_wait: 2", "loop_wait: 1")
            .replace("retry_timeout: 3", "retry_timeout: 1");
        let e = AgentConfig::parse(&bad, "node.yml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("below the minimum"), "{e}");
    }

    #[test]
    fn bad_watchdog_mode_and_address_are_rejected() {
        let bad = VALID.replace("mode: automatic", "mode: sometimes");
        assert!(AgentConfig::parse(&bad, "n").is_err());
        let bad = VALID.replace("listen: 127.0.0.1:5432", "listen: nowhere");
        let e = AgentConfig::parse(&bad, "n").unwrap_err().to_string();
        assert!(e.contains("postgresql.listen"), "{e}");
    }

    #[test]
    fn load_file_digests_the_exact_bytes_read() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("agent.yml");
        std::fs::write(&p, VALID).unwrap();
        let l = AgentConfig::load_file(&p).unwrap();
        assert_eq!(l.config.scope, "batman");
        assert_eq!(l.sha256, sha256_hex(VALID.as_bytes()));
        assert_eq!(
            sha256_hex(b"abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn duplicate_keys_are_rejected() {
        let bad = VALID.replace("scope: batman", "scope: batman\nscope: robin");
        assert!(AgentConfig::parse(&bad, "n").is_err());
    }
}
