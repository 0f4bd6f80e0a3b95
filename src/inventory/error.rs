//! Inventory errors. Every variant names the inventory file; YAML, type and unknown-key errors
//! and (where a position is known) semantic errors carry `line:column`, so the message reads
//! like a compiler diagnostic: `inventories/prod.yml:14:14: hosts[db2].address: ...`.

use std::fmt;

use super::secrets::SecretsError;

/// A 1-based position in the inventory file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pos {
    pub line: usize,
    pub column: usize,
}

impl Pos {
    pub fn of(loc: &serde_saphyr::Location) -> Option<Pos> {
        // serde-saphyr reports line 0 for values it could not locate (flatten/untagged buffering).
        (loc.line() > 0).then(|| Pos {
            line: loc.line() as usize,
            column: loc.column() as usize,
        })
    }
}

/// One semantic problem found by validation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub pos: Option<Pos>,
    /// Dotted path of the offending field, with host names: `hosts[db2].address`.
    pub field: String,
    pub message: String,
}

impl Problem {
    /// Formats the problem as one diagnostic line for `path`.
    pub fn display_in<'a>(&'a self, path: &'a str) -> impl fmt::Display + 'a {
        struct D<'a>(&'a Problem, &'a str);
        impl fmt::Display for D<'_> {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                let p = self.0;
                match p.pos {
                    Some(pos) => write!(f, "{}:{}:{}: ", self.1, pos.line, pos.column)?,
                    None => write!(f, "{}: ", self.1)?,
                }
                write!(f, "{}: {}", p.field, p.message)
            }
        }
        D(self, path)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum InventoryError {
    #[error("{path}: cannot read inventory: {source}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    /// YAML syntax, wrong type, unknown or missing key; `message` is the parser's (it includes
    /// a source snippet).
    #[error("{path}:{line}:{column}: {message}")]
    Syntax {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    /// The file parsed but is not a usable inventory. All problems are reported at once, one per
    /// line, in file order.
    #[error("{}", render_problems(path, problems))]
    Invalid {
        path: String,
        problems: Vec<Problem>,
    },
    #[error(transparent)]
    Secrets(#[from] SecretsError),
}

fn render_problems(path: &str, problems: &[Problem]) -> String {
    let mut lines: Vec<String> = problems
        .iter()
        .map(|p| p.display_in(path).to_string())
        .collect();
    if lines.len() > 1 {
        lines.insert(
            0,
            format!("{path}: {} problems in the inventory:", problems.len()),
        );
    }
    lines.join("\n")
}

impl InventoryError {
    /// The semantic problems, if this is a validation error.
    pub fn problems(&self) -> &[Problem] {
        match self {
            InventoryError::Invalid { problems, .. } => problems,
            _ => &[],
        }
    }
}
