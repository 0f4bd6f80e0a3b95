//! `pgherd replace NAME --address A`: a failed host replaced under the same name. It is the
//! inventory edit an operator would make (NAME's `address:` set to A), followed by the `apply`
//! of the edited inventory, with one more gate in front: the old address must be dead.
//!
//! Why the gate: the replacement runs an agent, an etcd member and a replication slot under
//! NAME. If the old host still ran, two nodes would share one identity and the cluster could
//! not tell them apart (two agents racing for one member key; a second etcd member under the
//! same name). So the old address is probed directly (REST API, SSH port), and the apply's
//! own move gate adds the DCS and etcd evidence (see [`crate::provision::departed::Moved`]).
//!
//! Order, so that a refusal leaves nothing behind: the edited text is loaded and planned in
//! memory; the inventory file is written (atomically, [`inventory::replace_file`]) only once every gate passed and the
//! operator confirmed, right before the first host is changed. A re-run with the same address
//! finds the inventory already edited and converges like `apply` (an interrupted replace).

use std::path::Path;
use std::time::Instant;

use anyhow::Context;

use super::{ApplyArgs, Timings, apply_loaded, json, json_if, spec_for};
use crate::inventory::{self, edit};
use crate::provision::departed;

#[derive(clap::Args, Debug, Clone)]
pub struct ReplaceArgs {
    #[command(flatten)]
    pub apply: ApplyArgs,
    /// The host to replace (its name, kept: the same member, slot and etcd name).
    pub name: String,
    /// The replacement's address (the old host at the inventory's address must be dead).
    #[arg(long)]
    pub address: String,
}

pub async fn replace_cmd(a: &ReplaceArgs, state_dir: &Path) -> anyhow::Result<()> {
    let t0 = Instant::now();
    let out = a.apply.deploy.out();
    let mut tm = Timings::new(a.apply.deploy.timings);
    let path = &a.apply.deploy.inv.inventory;
    let origin = path.display().to_string();
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {origin}"))?;
    let current = inventory::load_text(path, &text)?;
    let Some(host) = current.host(&a.name) else {
        anyhow::bail!(
            "{} is not a host of {origin}: `pgherd replace` keeps a host's name; to add a host under a new name, add it to the inventory and run `pgherd apply`; nothing changed",
            a.name
        );
    };
    let old = host.address.clone();
    let edited = edit::set_host_address(&text, &origin, &a.name, &a.address)?;
    if old == a.address {
        out.note(format_args!(
            "{origin} already has {} at {}: converging (a re-run of an interrupted replace)",
            a.name, a.address
        ));
    } else {
        let api = format!(
            "http://{}/patroni",
            host.endpoint(current.agent.restapi_port)
        );
        let alive = departed::still_answers(&old, Some(&api), host.ssh.port).await;
        if !alive.is_empty() {
            anyhow::bail!(
                "{}: {old} still answers ({}): pgherd replaces only a dead host, or two nodes would run as {}. Stop it there first (or remove it with `pgherd remove` and add the new host under a new name); {origin} unchanged, nothing changed",
                a.name,
                alive.join("; "),
                a.name
            );
        }
        out.note(format_args!(
            "{}: {old} is silent (REST API, SSH port): replacing it with {}",
            a.name, a.address
        ));
    }
    let inv = inventory::load_text(path, &edited)?;
    let spec = spec_for(&a.apply.deploy, &inv)?;
    tm.mark("inventory, templates, agent binary");
    let write = || -> anyhow::Result<()> {
        if edited == text {
            return Ok(());
        }
        // The operator's file keeps its permissions.
        let mode = std::fs::metadata(path).map_or(0o644, |m| {
            std::os::unix::fs::PermissionsExt::mode(&m.permissions()) & 0o7777
        });
        inventory::replace_file(path, &edited, mode)
            .with_context(|| format!("writing {origin}"))?;
        out.note(format_args!(
            "{origin}: {} address {old} -> {}",
            a.name, a.address
        ));
        Ok(())
    };
    let r = apply_loaded(&a.apply, state_dir, &inv, &spec, (t0, tm), write).await;
    if r.is_err() && std::fs::read_to_string(path).ok().as_deref() == Some(&text) {
        eprintln!("{origin} unchanged");
    }
    let apply = r?;
    json_if(out, || json::ReplaceDoc {
        host: a.name.clone(),
        old_address: old.clone(),
        new_address: a.address.clone(),
        inventory_edited: edited != text,
        apply,
    })
}
