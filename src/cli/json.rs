//! The documents `--json` prints for the provisioning verbs (`plan`, `apply`, `replace`,
//! `remove`, `restart --pending`): one typed, serde-serialised value per run, built from the
//! same plan and results the human text shows. `check`, `status`, `drill` and `lab` type
//! theirs beside their verbs ([`super::check::CheckDoc`], [`super::status::ClusterStatus`],
//! [`super::drill::DrillReport`], [`super::lab`]); what this comment says holds for them too.
//!
//! The field names are part of pgherd's interface (scripts parse them): each type's doc says
//! what its fields are, a field is added rather than renamed, and every field is always present
//! (`null` or `[]` when it has nothing to say). Sentences (`summary`, `what`, `reason`) are the
//! human text's, for people reading the JSON; scripts branch on the other fields. Durations are
//! seconds, as floats, in fields ending in `_s`. Secrets are never part of a document: diffs
//! are redacted by the planner, as in the text.
//!
//! With `--json`, stdout carries the document alone: the human report is not printed (except
//! on stderr when the operator is asked to confirm it, see [`Out::report`]), running notes go
//! to stderr, and an error is still an `error: …` line on stderr with a non-zero exit and no
//! document.

use std::io::IsTerminal;
use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::provision::dcs_config::{ConfigPlan, Effect};
use crate::provision::departed::{self, DeparturePlan};
use crate::provision::etcd_members::{self, MemberChange, MemberPlan};
use crate::provision::plan::{ClusterPlan, HostPlan, Plan, Planned};
use crate::provision::playbook::Parallelism;
use crate::provision::rolling::{PhaseKind, RestartPlan, StepAction};
use crate::provision::schedule::Stage;

/// Prints `doc` on stdout as one pretty-printed JSON document.
pub fn print<T: Serialize>(doc: &T) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(doc)?);
    Ok(())
}

/// Where a verb's human output goes: stdout without `--json`; with it, stdout is kept for the
/// document.
#[derive(Debug, Clone, Copy)]
pub struct Out {
    pub json: bool,
}

impl Out {
    /// A line of the human report (the document carries it under `--json`).
    pub fn line(&self, text: impl std::fmt::Display) {
        if !self.json {
            println!("{text}");
        }
    }

    /// A running note (what a verb found or did on the way, which the document need not
    /// repeat): stdout, or stderr under `--json`.
    pub fn note(&self, text: impl std::fmt::Display) {
        if self.json {
            eprintln!("{text}");
        } else {
            println!("{text}");
        }
    }

    /// A multi-line part of the human report that the operator may be asked to confirm
    /// (`yes`: no question). Under `--json` it still goes to stderr when a question follows:
    /// nobody should confirm a plan they were not shown.
    pub fn report(&self, text: &str, yes: bool) {
        if !self.json {
            print!("{text}");
        } else if !yes && std::io::stdin().is_terminal() {
            eprint!("{text}");
        }
    }
}

/// Seconds as the documents carry them.
pub fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// `(what, why nothing changes)`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NoChange {
    pub what: String,
    pub why: String,
}

fn no_changes(noops: &[(String, String)]) -> Vec<NoChange> {
    noops
        .iter()
        .map(|(what, why)| NoChange {
            what: what.clone(),
            why: why.clone(),
        })
        .collect()
}

/// `pgherd plan --json`, and the `plan` of `apply --json`: every host's steps (no-change steps
/// included, with their reason), the cluster-level part, and the run order.
///
/// - `hosts`: [`HostPlanDoc`] per host, in inventory order.
/// - `cluster`: [`ClusterPlanDoc`].
/// - `run_order`: [`RunOrderDoc`], the playbook steps that have work.
/// - `changes`: the number of changes in all of it (0: a run would change nothing).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PlanDoc {
    pub hosts: Vec<HostPlanDoc>,
    pub cluster: ClusterPlanDoc,
    pub run_order: RunOrderDoc,
    pub changes: usize,
}

/// One host's plan: `host`, its service `mode` (`systemd` or `supervisor`), its number of
/// `changes` and its `steps` ([`StepDoc`]) in plan order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct HostPlanDoc {
    pub host: String,
    pub mode: String,
    pub changes: usize,
    pub steps: Vec<StepDoc>,
}

/// One step of a host: `step` (`packages`, `file /etc/haproxy/haproxy.cfg`, `service etcd`,
/// ...) and `outcome`: `"change"` with its one-line `summary` and, for files, `diff` (a unified
/// diff with secrets redacted; `null` for other steps and with `--no-diff`), or `"no_change"`
/// with its `reason`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepDoc {
    pub step: String,
    #[serde(flatten)]
    pub outcome: Outcome,
}

/// See [`StepDoc`].
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum Outcome {
    Change {
        summary: String,
        diff: Option<String>,
    },
    NoChange {
        reason: String,
    },
}

/// The cluster-level part of a plan.
///
/// - `dcs_config`: [`DcsConfigDoc`]; `null` when no agent answered (nothing to plan against).
/// - `etcd_members`: [`EtcdMembersDoc`]; `null` without etcd run by pgherd.
/// - `departed`: [`DepartedDoc`]; `null` when no agent answered.
/// - `pending_restart`: members whose agents report a pending restart now.
/// - `drained`: `{haproxy, member}` left drained in a replica backend by an interrupted run.
/// - `leader`, `replicas`: as the agents report them (`null`, `[]` before a first deploy).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClusterPlanDoc {
    pub dcs_config: Option<DcsConfigDoc>,
    pub etcd_members: Option<EtcdMembersDoc>,
    pub departed: Option<DepartedDoc>,
    pub pending_restart: Vec<String>,
    pub drained: Vec<Drained>,
    pub leader: Option<String>,
    pub replicas: Vec<String>,
}

/// A member left drained in `haproxy`'s replica backend.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Drained {
    pub haproxy: String,
    pub member: String,
}

/// The DCS `config` change: the `revision` the write is conditioned on, the `changes` (each
/// `{key, old, new, effect}`: the dotted key, its values as JSON — `old` `null` when unset,
/// `new` `null` when deleted — and `effect`: `reload`, `new_sessions`, `restart` or `agents`),
/// and the keys that stay (`no_change`).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DcsConfigDoc {
    pub revision: Option<i64>,
    pub changes: Vec<KeyChangeDoc>,
    pub no_change: Vec<NoChange>,
}

/// See [`DcsConfigDoc`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct KeyChangeDoc {
    pub key: String,
    pub old: Option<Value>,
    pub new: Value,
    pub effect: &'static str,
}

/// A member-level change: the `member` it is about and `what` is done (the plan's sentence).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemberChangeDoc {
    pub member: String,
    pub what: String,
}

/// The etcd membership part: `refused` (why no membership change may be made, `null` when
/// none is refused; then `changes` is empty), the `changes` in execution order, `no_change`,
/// and `final_voters` (the voters after every change; `null` when refused).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EtcdMembersDoc {
    pub refused: Option<String>,
    pub changes: Vec<MemberChangeDoc>,
    pub no_change: Vec<NoChange>,
    pub final_voters: Option<usize>,
}

/// The removal of members that left the inventory: `refused` as in [`EtcdMembersDoc`], the
/// `departing` members, the `steps` in execution order (each a [`MemberChangeDoc`]), and
/// `no_change`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DepartedDoc {
    pub refused: Option<String>,
    pub departing: Vec<String>,
    pub steps: Vec<MemberChangeDoc>,
    pub no_change: Vec<NoChange>,
}

/// The run order: the `playbook` it comes from and its `steps` that have work, each
/// `{step, name, serial, hosts}`: the step's 1-based position in the playbook, its name,
/// `serial` (how many hosts at a time; `null` for all at once) and the hosts it changes.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunOrderDoc {
    pub playbook: String,
    pub steps: Vec<StageDoc>,
}

/// See [`RunOrderDoc`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StageDoc {
    pub step: usize,
    pub name: String,
    pub serial: Option<usize>,
    pub hosts: Vec<String>,
}

impl PlanDoc {
    /// `diffs`: include the file diffs (off with `--no-diff`, as in the text).
    pub fn new(plan: &Plan, stages: &[Stage], playbook: &str, diffs: bool) -> PlanDoc {
        PlanDoc {
            hosts: plan
                .hosts
                .iter()
                .map(|h| HostPlanDoc::new(h, diffs))
                .collect(),
            cluster: ClusterPlanDoc::new(&plan.cluster),
            run_order: RunOrderDoc::new(stages, playbook),
            changes: plan.change_count(),
        }
    }
}

impl HostPlanDoc {
    fn new(h: &HostPlan, diffs: bool) -> HostPlanDoc {
        HostPlanDoc {
            host: h.host.clone(),
            mode: h.mode.to_string(),
            changes: h.changes().count(),
            steps: h
                .steps
                .iter()
                .map(|s| StepDoc {
                    step: s.name.clone(),
                    outcome: match &s.planned {
                        Planned::Change { summary, diff, .. } => Outcome::Change {
                            summary: summary.clone(),
                            diff: diff.clone().filter(|d| diffs && !d.is_empty()),
                        },
                        Planned::Noop(why) => Outcome::NoChange {
                            reason: why.clone(),
                        },
                    },
                })
                .collect(),
        }
    }
}

impl ClusterPlanDoc {
    fn new(c: &ClusterPlan) -> ClusterPlanDoc {
        ClusterPlanDoc {
            dcs_config: c.config.as_ref().map(DcsConfigDoc::new),
            etcd_members: c.etcd.as_ref().map(EtcdMembersDoc::new),
            departed: c.departed.as_ref().map(DepartedDoc::new),
            pending_restart: c.pending_restart.clone(),
            drained: c
                .drained
                .iter()
                .map(|(haproxy, member)| Drained {
                    haproxy: haproxy.clone(),
                    member: member.clone(),
                })
                .collect(),
            leader: c.leader.clone(),
            replicas: c.replicas.clone(),
        }
    }
}

impl DcsConfigDoc {
    fn new(p: &ConfigPlan) -> DcsConfigDoc {
        DcsConfigDoc {
            revision: p.revision,
            changes: p
                .changes
                .iter()
                .map(|c| KeyChangeDoc {
                    key: c.key.clone(),
                    old: c.old.clone(),
                    new: c.new.clone(),
                    effect: match c.effect {
                        Effect::Reload => "reload",
                        Effect::NewSessions => "new_sessions",
                        Effect::Restart => "restart",
                        Effect::Agents => "agents",
                    },
                })
                .collect(),
            no_change: no_changes(&p.noops),
        }
    }
}

impl EtcdMembersDoc {
    fn new(p: &Result<MemberPlan, etcd_members::Refusal>) -> EtcdMembersDoc {
        let member = |c: &MemberChange| match c {
            MemberChange::Add { name, .. }
            | MemberChange::StartJoined { name, .. }
            | MemberChange::Promote { name, .. }
            | MemberChange::Remove { name, .. } => name.clone(),
        };
        match p {
            Err(r) => EtcdMembersDoc {
                refused: Some(r.to_string()),
                changes: Vec::new(),
                no_change: Vec::new(),
                final_voters: None,
            },
            Ok(p) => EtcdMembersDoc {
                refused: None,
                changes: p
                    .changes
                    .iter()
                    .map(|c| MemberChangeDoc {
                        member: member(c),
                        what: c.to_string(),
                    })
                    .collect(),
                no_change: no_changes(&p.noops),
                final_voters: Some(p.final_voters),
            },
        }
    }
}

impl DepartedDoc {
    pub fn new(p: &Result<DeparturePlan, departed::Refusal>) -> DepartedDoc {
        match p {
            Err(r) => DepartedDoc {
                refused: Some(r.to_string()),
                departing: Vec::new(),
                steps: Vec::new(),
                no_change: Vec::new(),
            },
            Ok(p) => DepartedDoc {
                refused: None,
                departing: p.departing.clone(),
                steps: p
                    .steps
                    .iter()
                    .map(|s| MemberChangeDoc {
                        member: s.member().to_string(),
                        what: s.to_string(),
                    })
                    .collect(),
                no_change: no_changes(&p.noops),
            },
        }
    }
}

impl RunOrderDoc {
    fn new(stages: &[Stage], playbook: &str) -> RunOrderDoc {
        RunOrderDoc {
            playbook: playbook.to_string(),
            steps: stages
                .iter()
                .filter(|s| s.has_work())
                .map(|s| StageDoc {
                    step: s.index + 1,
                    name: s.step.name.clone(),
                    serial: match s.step.parallelism {
                        Parallelism::Parallel => None,
                        Parallelism::Serial(n) => Some(n.get()),
                    },
                    hosts: s
                        .hosts
                        .iter()
                        .filter(|(_, _, w)| !w.is_empty())
                        .map(|(h, _, _)| h.clone())
                        .collect(),
                })
                .collect(),
        }
    }
}

/// A change made on a host: `host`, the plan's `step` and `what` was done.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Done {
    pub host: String,
    pub step: String,
    pub what: String,
}

/// `pgherd apply --json`: the `plan` ([`PlanDoc`]) it ran, the changes `done` in order
/// ([`Done`]; `[]` when there was nothing to do), and `elapsed_s` (the whole run).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ApplyDoc {
    pub plan: PlanDoc,
    pub done: Vec<Done>,
    pub elapsed_s: f64,
}

impl ApplyDoc {
    pub fn new(plan: PlanDoc, done: &[(String, String, String)], elapsed: Duration) -> ApplyDoc {
        ApplyDoc {
            plan,
            done: done
                .iter()
                .map(|(host, step, what)| Done {
                    host: host.clone(),
                    step: step.clone(),
                    what: what.clone(),
                })
                .collect(),
            elapsed_s: secs(elapsed),
        }
    }
}

/// `pgherd replace --json`: the `host` replaced, its `old_address` and `new_address`,
/// `inventory_edited` (false when a re-run found the inventory already edited), and the
/// `apply` ([`ApplyDoc`]) of the edited inventory.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ReplaceDoc {
    pub host: String,
    pub old_address: String,
    pub new_address: String,
    pub inventory_edited: bool,
    pub apply: ApplyDoc,
}

/// What was done to one member: `member` and `what`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct MemberDone {
    pub member: String,
    pub what: String,
}

/// `pgherd remove NAME --json`: the `member`; `in_dcs` (false: it was no member in the DCS,
/// nothing was removed, `plan` is `null`); the removal `plan` ([`DepartedDoc`]); and the steps
/// `done`, each `{member, step, what}`.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RemoveDoc {
    pub member: String,
    pub in_dcs: bool,
    pub plan: Option<DepartedDoc>,
    pub done: Vec<RemovedStep>,
}

/// See [`RemoveDoc`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RemovedStep {
    pub member: String,
    pub step: String,
    pub what: String,
}

/// `pgherd restart --pending --json`: the `plan` ([`RestartPlanDoc`]; no phases when nothing
/// was pending), the servers put back that an interrupted run had left drained (`undrained`,
/// [`MemberDone`]), the restarts `done` ([`MemberDone`]), and `elapsed_s` (the restarts, from
/// the confirmation on, as the text's "done in"; 0 when nothing was pending).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RestartPendingDoc {
    pub plan: RestartPlanDoc,
    pub undrained: Vec<MemberDone>,
    pub done: Vec<MemberDone>,
    pub elapsed_s: f64,
}

/// The restart order: `phases`, each `{kind, steps}` (`kind`: `raise` — replicas first, the
/// primary last — or `lower` — the primary first), each step `{member, action, candidate,
/// reason}` (`action`: `restart_replica`, `restart_primary` or `switchover`, whose `candidate`
/// is named; `null` otherwise), and the expected `write_outage` (a sentence; `null` when only
/// replicas restart).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RestartPlanDoc {
    pub phases: Vec<PhaseDoc>,
    pub write_outage: Option<String>,
}

/// See [`RestartPlanDoc`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct PhaseDoc {
    pub kind: &'static str,
    pub steps: Vec<RestartStepDoc>,
}

/// See [`RestartPlanDoc`].
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RestartStepDoc {
    pub member: String,
    pub action: &'static str,
    pub candidate: Option<String>,
    pub reason: String,
}

/// `(member, what)` pairs as [`MemberDone`]s.
pub fn member_done(done: &[(String, String)]) -> Vec<MemberDone> {
    done.iter()
        .map(|(member, what)| MemberDone {
            member: member.clone(),
            what: what.clone(),
        })
        .collect()
}

impl RestartPlanDoc {
    pub fn new(p: &RestartPlan) -> RestartPlanDoc {
        RestartPlanDoc {
            phases: p
                .phases
                .iter()
                .map(|ph| PhaseDoc {
                    kind: match ph.kind {
                        PhaseKind::Raise => "raise",
                        PhaseKind::Lower => "lower",
                    },
                    steps: ph
                        .steps
                        .iter()
                        .map(|s| {
                            let (action, candidate) = match &s.action {
                                StepAction::RestartReplica { .. } => ("restart_replica", None),
                                StepAction::RestartPrimary => ("restart_primary", None),
                                StepAction::Switchover { candidate } => {
                                    ("switchover", Some(candidate.clone()))
                                }
                            };
                            RestartStepDoc {
                                member: s.member.clone(),
                                action,
                                candidate,
                                reason: s.reason.clone(),
                            }
                        })
                        .collect(),
                })
                .collect(),
            write_outage: p.write_outage.as_ref().map(ToString::to_string),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::provision::dcs_config::KeyChange;
    use crate::provision::plan::{Action, PlannedStep};
    use crate::provision::playbook::Playbook;
    use crate::provision::rolling::{Phase, RestartStep, WriteOutage};
    use crate::provision::services::ServiceMode;
    use serde_json::json;

    fn plan() -> Plan {
        let file = "file /etc/haproxy/haproxy.cfg";
        Plan {
            hosts: vec![HostPlan {
                host: "pg1".into(),
                mode: ServiceMode::Supervisor,
                steps: vec![
                    PlannedStep {
                        name: "packages".into(),
                        planned: Planned::Noop("all present".into()),
                    },
                    PlannedStep {
                        name: file.into(),
                        planned: Planned::Change {
                            action: Action::DaemonReload,
                            summary: "content differs".into(),
                            diff: Some("-a\n+b\n".into()),
                        },
                    },
                ],
            }],
            cluster: ClusterPlan {
                config: Some(ConfigPlan {
                    revision: Some(7),
                    changes: vec![KeyChange {
                        key: "postgresql.parameters.shared_buffers".into(),
                        old: Some(json!("32MB")),
                        new: json!("64MB"),
                        effect: Effect::Restart,
                    }],
                    noops: vec![("ttl".into(), "same".into())],
                    patch: Default::default(),
                }),
                etcd: Some(Err(etcd_members::Refusal::NoLeader)),
                leader: Some("pg1".into()),
                ..Default::default()
            },
        }
    }

    fn stages(p: &Plan) -> Vec<Stage> {
        let step = Playbook::deploy().steps[0].clone();
        vec![Stage {
            index: 0,
            step,
            hosts: vec![(
                "pg1".into(),
                ServiceMode::Supervisor,
                p.hosts[0].changes().cloned().collect(),
            )],
        }]
    }

    #[test]
    fn a_plan_document_names_every_step_with_its_outcome_and_the_cluster_part() {
        let p = plan();
        let v = serde_json::to_value(PlanDoc::new(&p, &stages(&p), "playbooks/deploy.yml", true))
            .unwrap();
        let h = &v["hosts"][0];
        assert_eq!(h["host"], "pg1");
        assert_eq!(h["mode"], "supervisor");
        assert_eq!(h["changes"], 1);
        assert_eq!(
            h["steps"][0],
            json!({"step": "packages", "outcome": "no_change", "reason": "all present"})
        );
        assert_eq!(h["steps"][1]["outcome"], "change");
        assert_eq!(h["steps"][1]["diff"], "-a\n+b\n");
        let c = &v["cluster"];
        assert_eq!(c["dcs_config"]["revision"], 7);
        assert_eq!(
            c["dcs_config"]["changes"][0],
            json!({"key": "postgresql.parameters.shared_buffers", "old": "32MB", "new": "64MB", "effect": "restart"})
        );
        assert_eq!(c["dcs_config"]["no_change"][0]["what"], "ttl");
        assert!(
            c["etcd_members"]["refused"]
                .as_str()
                .unwrap()
                .contains("no leader")
        );
        assert_eq!(c["etcd_members"]["final_voters"], Value::Null);
        assert_eq!(c["departed"], Value::Null);
        assert_eq!(c["leader"], "pg1");
        assert_eq!(v["run_order"]["playbook"], "playbooks/deploy.yml");
        assert_eq!(v["run_order"]["steps"][0]["step"], 1);
        assert_eq!(v["run_order"]["steps"][0]["hosts"], json!(["pg1"]));
        // The file change, the DCS key and the etcd refusal.
        assert_eq!(v["changes"], 3);
    }

    #[test]
    fn no_diff_leaves_the_diff_null_but_keeps_the_change() {
        let p = plan();
        let v = serde_json::to_value(PlanDoc::new(&p, &[], "x", false)).unwrap();
        assert_eq!(v["hosts"][0]["steps"][1]["outcome"], "change");
        assert_eq!(v["hosts"][0]["steps"][1]["diff"], Value::Null);
        assert_eq!(v["run_order"]["steps"], json!([]));
    }

    #[test]
    fn a_restart_plan_document_names_each_phase_action_and_the_outage() {
        let p = RestartPlan {
            phases: vec![Phase {
                kind: PhaseKind::Raise,
                steps: vec![
                    RestartStep {
                        member: "pg2".into(),
                        action: StepAction::RestartReplica {
                            gate: Default::default(),
                        },
                        reason: "pending".into(),
                    },
                    RestartStep {
                        member: "pg1".into(),
                        action: StepAction::Switchover {
                            candidate: "pg2".into(),
                        },
                        reason: "the primary last".into(),
                    },
                ],
            }],
            write_outage: Some(WriteOutage::Switchover {
                from: "pg1".into(),
                to: "pg2".into(),
            }),
        };
        let v = serde_json::to_value(RestartPlanDoc::new(&p)).unwrap();
        assert_eq!(v["phases"][0]["kind"], "raise");
        assert_eq!(v["phases"][0]["steps"][0]["action"], "restart_replica");
        assert_eq!(v["phases"][0]["steps"][0]["candidate"], Value::Null);
        assert_eq!(
            v["phases"][0]["steps"][1],
            json!({"member": "pg1", "action": "switchover", "candidate": "pg2", "reason": "the primary last"})
        );
        assert!(
            v["write_outage"]
                .as_str()
                .unwrap()
                .contains("switchover pg1 → pg2")
        );
    }
}
