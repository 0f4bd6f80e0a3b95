//! `pgherd check`: the inventory, the playbook and every rendered file validated without
//! changing anything, then (unless `--offline`) every host reached and its packages checked.
//! What it found is one [`CheckDoc`], printed as lines or, with `--json`, as one document.

use std::path::Path;

use clap::Args;
use serde::Serialize;

use super::{DeployArgs, connect, load_spec};
use crate::provision::apply;

#[derive(Args, Debug, Clone)]
pub struct CheckArgs {
    #[command(flatten)]
    pub deploy: DeployArgs,
    /// Do not contact the hosts: validate the inventory, the playbook and the templates only
    /// (e.g. in CI, before a change is merged).
    #[arg(long)]
    pub offline: bool,
}

/// `pgherd check --json` (field names stable, see [`super::json`]): the `inventory` file and
/// its number of `hosts`; the `playbook` ([`PlaybookDoc`]); `rendered` ([`RenderedDoc`] per
/// host); `agent_binary` ([`AgentBinaryDoc`], or `null` when none was found: postgres hosts
/// then get no agent); `offline`; and `reached` ([`ReachedDoc`] per host contacted, `[]` with
/// `--offline`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CheckDoc {
    pub inventory: String,
    pub hosts: usize,
    pub playbook: PlaybookDoc,
    pub rendered: Vec<RenderedDoc>,
    pub agent_binary: Option<AgentBinaryDoc>,
    pub offline: bool,
    pub reached: Vec<ReachedDoc>,
}

/// The playbook checked: where it came from (`origin`, `playbooks/deploy.yml` when built in)
/// and its number of `steps`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlaybookDoc {
    pub origin: String,
    pub steps: usize,
}

/// A host's rendering: `host`, `address`, and how many `files` were rendered for it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RenderedDoc {
    pub host: String,
    pub address: String,
    pub files: usize,
}

/// The agent binary that would be installed: its size in `bytes` and its `sha256` (hex).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AgentBinaryDoc {
    pub bytes: usize,
    pub sha256: String,
}

/// A host reached: `host`, its service `mode` (`systemd` or `supervisor`) and the
/// `missing_packages` (`[]`: all present).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReachedDoc {
    pub host: String,
    pub mode: String,
    pub missing_packages: Vec<String>,
}

impl CheckDoc {
    /// The lines of the validation part (before any host is contacted).
    fn validated_lines(&self) -> Vec<String> {
        let mut l = vec![
            format!("inventory {}: valid ({} hosts)", self.inventory, self.hosts),
            format!(
                "playbook {}: valid ({} steps, order checked)",
                self.playbook.origin, self.playbook.steps
            ),
        ];
        for h in &self.rendered {
            l.push(format!(
                "  {:<10} {:<15} {} file(s) rendered",
                h.host, h.address, h.files
            ));
        }
        l.push(match &self.agent_binary {
            Some(b) => format!(
                "agent binary: {} bytes (sha256 {})",
                b.bytes,
                &b.sha256[..12]
            ),
            None => "agent binary: none found (postgres hosts will not get an agent)".into(),
        });
        l
    }
}

impl ReachedDoc {
    fn line(&self) -> String {
        format!(
            "  {}: reachable, {} mode, {}",
            self.host,
            self.mode,
            if self.missing_packages.is_empty() {
                "packages present".to_string()
            } else {
                format!("missing packages: {:?}", self.missing_packages)
            }
        )
    }
}

pub(super) async fn check_cmd(c: &CheckArgs, state_dir: &Path) -> anyhow::Result<()> {
    let a = &c.deploy;
    let out = a.out();
    let (inv, spec) = load_spec(a)?;
    let mut doc = CheckDoc {
        inventory: a.inv.inventory.display().to_string(),
        hosts: inv.hosts.len(),
        playbook: PlaybookDoc {
            origin: spec.playbook_origin.clone(),
            steps: spec.playbook.steps.len(),
        },
        rendered: spec
            .hosts
            .iter()
            .map(|h| RenderedDoc {
                host: h.name.clone(),
                address: h.address.clone(),
                files: h.files.len(),
            })
            .collect(),
        agent_binary: spec.agent_binary.as_ref().map(|b| AgentBinaryDoc {
            bytes: b.bytes.len(),
            sha256: b.sha256.clone(),
        }),
        offline: c.offline,
        reached: Vec::new(),
    };
    // Shown before any host is contacted: an unreachable host's error follows what was valid.
    for l in doc.validated_lines() {
        out.line(l);
    }
    if c.offline {
        out.line("check passed (offline: no host contacted)");
        return super::json_if(out, || doc);
    }
    let fleet = connect(&inv, state_dir).await?;
    let facts = apply::gather_all(&spec, &fleet).await?;
    for (name, f) in &facts {
        let reached = ReachedDoc {
            host: name.clone(),
            mode: f.mode.to_string(),
            missing_packages: f
                .packages
                .iter()
                .filter(|(_, ok)| !**ok)
                .map(|(p, _)| p.clone())
                .collect(),
        };
        out.line(reached.line());
        doc.reached.push(reached);
    }
    out.line("check passed");
    super::json_if(out, || doc)
}
