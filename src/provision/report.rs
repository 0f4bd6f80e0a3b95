//! Human-readable output of plans and applies: per host and step, "change: …" (with the
//! unified diff of files) or "no change: <reason>", and a one-line summary. Secrets never reach
//! this module unredacted (diffs are redacted by the planner).

use std::fmt::Write as _;

use super::plan::{Plan, Planned};
use super::schedule::Stage;

/// Options for [`render_plan`].
#[derive(Debug, Clone, Copy, Default)]
pub struct ReportOptions {
    /// Also list the no-change steps with their reasons (always shown by `pgherd plan`).
    pub show_noops: bool,
    /// Include file diffs.
    pub diffs: bool,
}

/// The plan as text.
pub fn render_plan(plan: &Plan, opts: ReportOptions) -> String {
    let mut out = String::new();
    for h in &plan.hosts {
        let n = h.changes().count();
        let _ = writeln!(out, "host {} ({} mode): {} change(s)", h.host, h.mode, n);
        for s in &h.steps {
            match &s.planned {
                Planned::Change { summary, diff, .. } => {
                    let _ = writeln!(out, "  change     {}: {}", s.name, summary);
                    if opts.diffs
                        && let Some(d) = diff
                        && !d.is_empty()
                    {
                        for line in d.lines() {
                            let _ = writeln!(out, "      {line}");
                        }
                    }
                }
                Planned::Noop(why) if opts.show_noops => {
                    let _ = writeln!(out, "  no change  {}: {}", s.name, why);
                }
                Planned::Noop(_) => {}
            }
        }
    }
    render_cluster(&mut out, plan, opts);
    let _ = writeln!(out, "{}", summary_line(plan));
    out
}

/// The cluster-level part: the DCS config diff with each key's effect, and the restarts.
fn render_cluster(out: &mut String, plan: &Plan, opts: ReportOptions) {
    let c = &plan.cluster;
    if let Some(m) = &c.etcd {
        out.push_str(&super::etcd_members::render(m, opts.show_noops));
    }
    if let Some(d) = &c.departed {
        out.push_str(&super::departed::render(d, opts.show_noops));
    }
    if let Some(cp) = &c.config {
        let rev = cp
            .revision
            .map(|r| format!(" (revision {r})"))
            .unwrap_or_default();
        let _ = writeln!(
            out,
            "cluster: DCS config{rev}: {} change(s)",
            cp.changes.len()
        );
        for ch in &cp.changes {
            let _ = writeln!(out, "  change     {ch}");
        }
        if opts.show_noops {
            for (key, why) in &cp.noops {
                let _ = writeln!(out, "  no change  {key}: {why}");
            }
        }
    }
    if !c.pending_restart.is_empty() {
        let _ = writeln!(
            out,
            "  change     pending restart now: {} (restarted one at a time by the restart_pending step)",
            c.pending_restart.join(", ")
        );
    }
    for (host, member) in &c.drained {
        let _ = writeln!(
            out,
            "  change     HAProxy on {host}: put {member} back into the replica backend (left drained by an interrupted run)"
        );
    }
    if c.config.as_ref().is_some_and(|cp| cp.needs_restart()) {
        let _ = writeln!(out, "  then       restart: {}", restart_preview(plan));
    }
}

/// `plan: 3 host(s), 12 change(s)` or `plan: 3 host(s), no changes`.
pub fn summary_line(plan: &Plan) -> String {
    match plan.change_count() {
        0 => format!("plan: {} host(s), no changes", plan.hosts.len()),
        n => format!("plan: {} host(s), {} change(s)", plan.hosts.len(), n),
    }
}

/// The order a run would take: the playbook's steps that have work, with their hosts
/// (`serial` steps go host by host, in the order listed except that the agent's rolling steps
/// move the leader last).
pub fn render_order(stages: &[Stage], origin: &str) -> String {
    let mut out = String::new();
    let busy: Vec<&Stage> = stages.iter().filter(|s| s.has_work()).collect();
    if busy.is_empty() {
        return out;
    }
    let _ = writeln!(out, "run order ({origin}):");
    for s in busy {
        let hosts: Vec<&str> = s
            .hosts
            .iter()
            .filter(|(_, _, w)| !w.is_empty())
            .map(|(h, _, _)| h.as_str())
            .collect();
        let serial = match s.step.parallelism {
            super::playbook::Parallelism::Parallel => "",
            super::playbook::Parallelism::Serial(_) => " (serial)",
        };
        let _ = writeln!(
            out,
            "  {:>3}. {:<36} {}{serial}",
            s.index + 1,
            s.step.name,
            hosts.join(" ")
        );
    }
    out
}

/// The restart order a restart-needing config change will take, and its write outage.
fn restart_preview(plan: &Plan) -> String {
    let c = &plan.cluster;
    let leader = c.leader.as_deref().unwrap_or("the primary");
    let replicas = if c.replicas.is_empty() {
        "no replicas".to_string()
    } else {
        format!(
            "replicas one at a time, each drained from HAProxy first ({})",
            c.replicas.join(", ")
        )
    };
    let lowered: Vec<&str> = c
        .config
        .iter()
        .flat_map(|cp| &cp.changes)
        .filter_map(|ch| {
            let name = ch.key.strip_prefix("postgresql.parameters.")?;
            let old = ch.old.as_ref().and_then(num)?;
            let new = num(&ch.new)?;
            (super::rolling::HotParam::from_guc(name).is_some() && new < old).then_some(name)
        })
        .collect();
    let order = if lowered.is_empty() {
        format!("{replicas}, then {leader} in place after a CHECKPOINT")
    } else {
        format!(
            "{leader} first, in place ({} lowered: a standby must never run below the primary), then {replicas}, each once its pg_controldata shows the new value",
            lowered.join(", ")
        )
    };
    format!("{order}; expected write outage: one PostgreSQL restart of {leader}")
}

fn num(v: &serde_json::Value) -> Option<f64> {
    match v {
        serde_json::Value::Number(n) => n.as_f64(),
        serde_json::Value::String(s) => s.trim().parse().ok(),
        _ => None,
    }
}
