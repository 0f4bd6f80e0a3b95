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
    let _ = writeln!(out, "{}", summary_line(plan));
    out
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
