//! `pgherd lab`: the local namespace lab's verbs (up, down, status, crash, boot, ssh), the
//! flags that pick a lab (resolved against what the lab directory recorded), pgherd's
//! known_hosts kept in step with the lab's generated host keys, and the documents of
//! `lab up --json` ([`LabUpDoc`]) and `lab status --json` ([`LabStatusDoc`]).

use std::path::{Path, PathBuf};

use anyhow::Context;
use clap::{Args, Subcommand};
use serde::Serialize;

use crate::lab::{self, LabSpec};

/// Which lab a `pgherd lab` verb acts on. The lab directory records what `up` built
/// (`lab.json`): with `--lab-dir` (or the default directory of `--name`) every verb acts on
/// that recorded lab, and a flag that contradicts the record is an error rather than a way to
/// reach a different lab.
#[derive(Args, Debug, Clone)]
pub struct LabArgs {
    /// Lab name (host names are NAME1, NAME2, ...) [default: pg, or the lab directory's].
    #[arg(long)]
    pub name: Option<String>,
    /// First three octets of the lab's /24 [default: 10.230.0, or the lab directory's].
    #[arg(long)]
    pub subnet: Option<String>,
    /// Bridge in the root namespace [default: pgherd0, or the lab directory's].
    #[arg(long)]
    pub bridge: Option<String>,
    /// Lab state (keys, host disks); default /tmp/pgherd-lab-NAME (must be outside the
    /// directories every lab host overlays: /etc /var /root /usr/local /opt /home /srv).
    #[arg(long)]
    pub lab_dir: Option<PathBuf>,
}

const DEFAULT_LAB_NAME: &str = "pg";
const DEFAULT_LAB_SUBNET: &str = "10.230.0";
const DEFAULT_LAB_BRIDGE: &str = "pgherd0";
const DEFAULT_LAB_HOSTS: usize = 3;

impl LabArgs {
    fn dir(&self) -> PathBuf {
        self.lab_dir.clone().unwrap_or_else(|| {
            let name = self.name.as_deref().unwrap_or(DEFAULT_LAB_NAME);
            PathBuf::from(format!("/tmp/pgherd-lab-{name}"))
        })
    }

    /// The lab these arguments name, with `hosts` hosts when given. A recorded lab wins over
    /// the defaults; a flag given explicitly must agree with the record.
    fn resolve(&self, hosts: Option<usize>) -> anyhow::Result<LabSpec> {
        let dir = self.dir();
        if let Some(mut rec) = LabSpec::recorded(&dir)? {
            for (flag, given, recorded) in [
                ("--name", &self.name, &rec.name),
                ("--subnet", &self.subnet, &rec.subnet),
                ("--bridge", &self.bridge, &rec.bridge),
            ] {
                if let Some(g) = given
                    && g != recorded
                {
                    anyhow::bail!(
                        "the lab in {} was made with {flag} {recorded}, not {g} (take it down \
                         first, or use another --lab-dir)",
                        dir.display()
                    );
                }
            }
            if let Some(h) = hosts {
                rec.hosts = h;
            }
            return Ok(rec);
        }
        // No record (a new lab, or one made before labs recorded themselves).
        let name = self.name.as_deref().unwrap_or(DEFAULT_LAB_NAME);
        let hosts = hosts.unwrap_or_else(|| {
            (1..=99)
                .take_while(|i| dir.join(format!("{name}{i}")).exists())
                .count()
                .max(1)
        });
        let init = LabSpec::recorded_init(&dir).unwrap_or_default();
        Ok(LabSpec::new(
            name,
            hosts,
            self.subnet.as_deref().unwrap_or(DEFAULT_LAB_SUBNET),
            self.bridge.as_deref().unwrap_or(DEFAULT_LAB_BRIDGE),
            dir,
        )
        .with_init(init))
    }
}

#[derive(Subcommand, Debug)]
pub enum LabCommand {
    /// Create (or repair) the lab and write its inventory.
    Up {
        #[command(flatten)]
        lab: LabArgs,
        /// Number of hosts [default: 3, or as many as the lab directory records].
        #[arg(long)]
        hosts: Option<usize>,
        /// Where to write the lab inventory (default: <lab dir>/inventory.yml).
        #[arg(long)]
        inventory: Option<PathBuf>,
        /// Boot systemd as each host's PID 1 (pgherd then runs services as systemd units)
        /// instead of tini (pgherd's supervisor mode). Remembered for `boot`.
        #[arg(long)]
        systemd: bool,
        /// Print the lab (hosts, inventory, key) as one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Stop every lab host and remove its network.
    Down {
        #[command(flatten)]
        lab: LabArgs,
        /// Also delete the hosts' disks and keys.
        #[arg(long)]
        purge: bool,
    },
    /// List lab hosts.
    Status {
        #[command(flatten)]
        lab: LabArgs,
        /// Print the hosts as one JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Power-cut a lab host (disk kept).
    Crash {
        #[command(flatten)]
        lab: LabArgs,
        host: String,
    },
    /// Boot a crashed lab host.
    Boot {
        #[command(flatten)]
        lab: LabArgs,
        host: String,
    },
    /// Open a root shell on a lab host over SSH (with the lab key and its known_hosts), or
    /// run COMMAND there: `pgherd lab ssh pg1 -- systemctl status`.
    Ssh {
        #[command(flatten)]
        lab: LabArgs,
        host: String,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        command: Vec<String>,
    },
}

/// `pgherd lab up --json` (field names stable, see [`super::json`]): the `lab` name, the
/// `controller`'s address on the bridge, the `hosts` (`{name, address}`), the `inventory`
/// written for it, and the `ssh_key` every host accepts for root.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabUpDoc {
    pub lab: String,
    pub controller: String,
    pub hosts: Vec<LabHostDoc>,
    pub inventory: String,
    pub ssh_key: String,
}

/// See [`LabUpDoc`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabHostDoc {
    pub name: String,
    pub address: String,
}

/// `pgherd lab status --json`: the `lab` name and its `hosts`, each `{name, address, up,
/// partitioned}` (`up`: its PID 1 runs; `partitioned`: partition rules are installed).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabStatusDoc {
    pub lab: String,
    pub hosts: Vec<LabHostStatusDoc>,
}

/// See [`LabStatusDoc`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct LabHostStatusDoc {
    pub name: String,
    pub address: String,
    pub up: bool,
    pub partitioned: bool,
}

/// Makes pgherd's known_hosts (in `state_dir`) trust exactly the lab hosts' current keys: a lab
/// rebuilt after `down --purge` has new host keys, and the stale entries would otherwise make
/// every connection fail as a possible man in the middle. The lab is trusted here because
/// pgherd generated those keys itself (`<lab dir>/known_hosts`).
fn trust_lab_keys(state_dir: &Path, info: &lab::LabInfo, add: bool) -> anyhow::Result<()> {
    let path = state_dir.join("known_hosts");
    let old = std::fs::read_to_string(&path).unwrap_or_default();
    // Host fields: `addr`, `[addr]:port`, comma-separated lists of either.
    let host_of = |field: &str| -> String {
        match field.strip_prefix('[') {
            Some(rest) => rest.split(']').next().unwrap_or(rest).to_string(),
            None => field.to_string(),
        }
    };
    let is_lab = |line: &str| {
        line.split_whitespace().next().is_some_and(|h| {
            h.split(',')
                .any(|a| info.hosts.iter().any(|x| x.address == host_of(a)))
        })
    };
    let mut text: String = old
        .lines()
        .filter(|l| !is_lab(l))
        .map(|l| format!("{l}\n"))
        .collect();
    if add {
        let lab_keys = std::fs::read_to_string(&info.known_hosts)
            .with_context(|| format!("reading {}", info.known_hosts.display()))?;
        text.push_str(&lab_keys);
    }
    if text != old {
        std::fs::create_dir_all(state_dir)
            .with_context(|| format!("creating {}", state_dir.display()))?;
        std::fs::write(&path, text).with_context(|| format!("writing {}", path.display()))?;
    }
    Ok(())
}

pub(super) fn lab_cmd(c: LabCommand, state_dir: &Path) -> anyhow::Result<()> {
    match c {
        LabCommand::Up {
            lab: l,
            hosts,
            inventory,
            systemd,
            json,
        } => {
            // `--hosts`, else as many as the recorded lab has, else the default.
            let recorded = LabSpec::recorded(&l.dir())?;
            let hosts = hosts
                .or(recorded.map(|r| r.hosts))
                .unwrap_or(DEFAULT_LAB_HOSTS);
            let mut spec = l.resolve(Some(hosts))?;
            if systemd {
                spec.init = lab::HostInit::Systemd;
            }
            let info = lab::up(&spec)?;
            trust_lab_keys(state_dir, &info, true)?;
            let inv = inventory.unwrap_or_else(|| spec.state_dir.join("inventory.yml"));
            if !inv.exists() {
                lab::write_inventory(&spec, &inv)?;
            }
            if json {
                return super::json::print(&LabUpDoc {
                    lab: spec.name.clone(),
                    controller: info.controller_address.clone(),
                    hosts: info
                        .hosts
                        .iter()
                        .map(|h| LabHostDoc {
                            name: h.name.clone(),
                            address: h.address.clone(),
                        })
                        .collect(),
                    inventory: inv.display().to_string(),
                    ssh_key: info.key_path.display().to_string(),
                });
            }
            println!(
                "lab {} is up ({} hosts, controller {}):",
                spec.name,
                info.hosts.len(),
                info.controller_address
            );
            for h in &info.hosts {
                println!("  {:<10} {}", h.name, h.address);
            }
            println!("inventory: {}", inv.display());
            println!(
                "ssh:       ssh -i {} root@{}",
                info.key_path.display(),
                info.hosts[0].address
            );
            println!("next:      pgherd apply -i {}", inv.display());
            Ok(())
        }
        LabCommand::Down { lab: l, purge } => {
            let spec = l.resolve(None)?;
            lab::down(&spec, purge)?;
            if purge {
                // The hosts' keys are gone with the state; so must pgherd's trust in them.
                trust_lab_keys(state_dir, &spec.info(), false)?;
            }
            println!(
                "lab {} is down{}",
                spec.name,
                if purge { " (state purged)" } else { "" }
            );
            Ok(())
        }
        LabCommand::Status { lab: l, json } => {
            let spec = l.resolve(None)?;
            let hosts = lab::status(&spec)?;
            if json {
                return super::json::print(&LabStatusDoc {
                    lab: spec.name.clone(),
                    hosts: hosts
                        .iter()
                        .map(|h| LabHostStatusDoc {
                            name: h.name.clone(),
                            address: h.address.clone(),
                            up: h.up,
                            partitioned: h.partitioned,
                        })
                        .collect(),
                });
            }
            for h in hosts {
                println!(
                    "{:<10} {:<15} {}{}",
                    h.name,
                    h.address,
                    if h.up { "up" } else { "down" },
                    if h.partitioned { " (partitioned)" } else { "" }
                );
            }
            Ok(())
        }
        LabCommand::Crash { lab: l, host } => {
            lab::crash(&l.resolve(None)?, &host)?;
            println!("{host} crashed");
            Ok(())
        }
        LabCommand::Boot { lab: l, host } => {
            lab::boot(&l.resolve(None)?, &host)?;
            println!("{host} booted");
            Ok(())
        }
        LabCommand::Ssh {
            lab: l,
            host,
            command,
        } => {
            let info = l.resolve(None)?.info();
            let h = info
                .host(&host)
                .ok_or_else(|| lab::LabError::UnknownHost(host.clone()))?;
            let mut ssh = std::process::Command::new("ssh");
            ssh.arg("-i")
                .arg(&info.key_path)
                .args([
                    "-o",
                    "IdentitiesOnly=yes",
                    "-o",
                    "StrictHostKeyChecking=yes",
                ])
                .arg("-o")
                .arg(format!("UserKnownHostsFile={}", info.known_hosts.display()))
                .args(["-o", "ConnectTimeout=5"])
                .arg(format!("root@{}", h.address))
                .args(&command);
            // Replace this process: the shell gets the terminal, and ssh's exit status is ours.
            let e = std::os::unix::process::CommandExt::exec(&mut ssh);
            Err(anyhow::anyhow!("cannot run ssh: {e}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_rebuilt_lab_replaces_only_its_own_host_keys_in_pgherds_known_hosts() {
        let dir = tempfile::tempdir().unwrap();
        let spec = LabSpec::new("pg", 2, "10.230.0", "pgbr0", dir.path().join("lab"));
        let info = spec.info();
        std::fs::create_dir_all(&spec.state_dir).unwrap();
        std::fs::write(
            &info.known_hosts,
            "10.230.0.11 ssh-ed25519 NEW1\n10.230.0.12 ssh-ed25519 NEW2\n",
        )
        .unwrap();
        let state = dir.path().join("state");
        std::fs::create_dir_all(&state).unwrap();
        std::fs::write(
            state.join("known_hosts"),
            "10.230.0.11 ssh-ed25519 OLD1\ndb.example ssh-ed25519 KEEP\n[10.230.0.12]:22 ssh-ed25519 OLD2\n",
        )
        .unwrap();
        trust_lab_keys(&state, &info, true).unwrap();
        let text = std::fs::read_to_string(state.join("known_hosts")).unwrap();
        assert_eq!(
            text,
            "db.example ssh-ed25519 KEEP\n10.230.0.11 ssh-ed25519 NEW1\n10.230.0.12 ssh-ed25519 NEW2\n"
        );
        // `lab down --purge`: the lab's entries go, the rest stays.
        trust_lab_keys(&state, &info, false).unwrap();
        let text = std::fs::read_to_string(state.join("known_hosts")).unwrap();
        assert_eq!(text, "db.example ssh-ed25519 KEEP\n");
    }
}
