//! YAML parsing with located errors, shared by the agent config and the inventory.
//!
//! Wraps serde-saphyr (maintained, no unsafe, rejects duplicate keys) and turns its errors into
//! `line:column: message`. Untyped values use strict booleans so `off`/`no` stay strings.

use serde::de::DeserializeOwned;

/// A YAML error with its 1-based position (0 when the parser gave none).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{line}:{column}: {message}")]
pub struct YamlError {
    pub line: usize,
    pub column: usize,
    pub message: String,
}

pub fn from_str<T: DeserializeOwned>(text: &str) -> Result<T, YamlError> {
    let mut opts = serde_saphyr::Options::default();
    opts.strict_booleans = true;
    serde_saphyr::from_str_with_options::<T>(text, opts).map_err(|e| {
        let (line, column) = match e.location() {
            Some(loc) => (loc.line() as usize, loc.column() as usize),
            None => (0, 0),
        };
        YamlError {
            line,
            column,
            message: tidy_message(&e.to_string(), line, column),
        }
    })
}

/// serde-saphyr prefixes its message with `error: line L column C: ` and follows it with a
/// source snippet; we print `file:L:C:` ourselves, so drop the duplicate prefix and keep the
/// snippet (it shows the operator the offending line).
fn tidy_message(raw: &str, line: usize, column: usize) -> String {
    let prefix = format!("error: line {line} column {column}: ");
    raw.strip_prefix(&prefix)
        .unwrap_or(raw)
        .replace("<input>", "here")
        .trim_end()
        .to_string()
}
