//! Table tests of the pure rules the HA executor carries out besides `decide` (which
//! tests/ha_decide.rs covers): the leader's upkeep (`ha::leader_upkeep`: slots, `status`,
//! `history`, `failsafe`) and the restart rules (`ha::restart`). One row per rule or boundary,
//! named after the behaviour it pins down.

use std::collections::BTreeMap;

use chrono::{DateTime, TimeZone, Utc};
use pgherd::dcs::{ClusterView, HistoryLine, Member, MemberData};
use pgherd::ha::leader_upkeep::{
    HistoryMark, failsafe_update, history_needs_update, leader_status, merge_history,
    slots_need_sync, wanted_slots,
};
use pgherd::ha::restart::{parse_pg_version, restart_conditions_ok, scheduled_restart_due};
use pgherd::pg::{PgStatus, Role, SlotInfo};
use pgherd::status::RestartRequest;
use pgherd::types::{Lsn, MemberName, Revision, Timeline};
use serde_json::{Value, json};

fn name(s: &str) -> MemberName {
    MemberName::from(s)
}

/// A view with the given members: `(name, api_url, tags)`.
fn view(members: &[(&str, &str, Value)]) -> ClusterView {
    let mut v = ClusterView::default();
    for (n, api, tags) in members {
        v.members.insert(
            name(n),
            Member {
                name: name(n),
                data: MemberData {
                    api_url: api.to_string(),
                    tags: tags.as_object().cloned().unwrap_or_default(),
                    ..Default::default()
                },
                lease: None,
                revision: Revision(1),
            },
        );
    }
    v
}

fn slot(n: &str, physical: bool, restart_lsn: Option<u64>) -> SlotInfo {
    SlotInfo {
        name: n.into(),
        physical,
        active: true,
        restart_lsn: restart_lsn.map(Lsn),
    }
}

fn primary(flush: u64, tl: u32, slots: Vec<SlotInfo>) -> PgStatus {
    PgStatus {
        data_dir_initialized: true,
        running: true,
        in_recovery: Some(false),
        flush_lsn: Some(Lsn(flush)),
        timeline: Some(Timeline(tl)),
        slots,
        ..Default::default()
    }
}

fn strings(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| s.to_string()).collect()
}

fn line(parent: u32, switchpoint: u64, ts: Option<&str>, leader: Option<&str>) -> HistoryLine {
    HistoryLine {
        parent_timeline: parent,
        switchpoint,
        reason: "no recovery target specified".into(),
        timestamp: ts.map(str::to_string),
        new_leader: leader.map(str::to_string),
    }
}

fn mark(timeline: u32, parent: u32, switchpoint: u64) -> HistoryMark {
    HistoryMark {
        timeline: Timeline(timeline),
        parent: Timeline(parent),
        switchpoint: Lsn(switchpoint),
    }
}

// ------------------------------------------------------------------------------ slots

#[test]
fn wanted_slots_rows() {
    let none = json!({});
    let rows: &[(&str, ClusterView, &[&str])] = &[
        (
            "one slot per other member, not for the leader itself",
            view(&[("n1", "", none.clone()), ("n2", "", none.clone())]),
            &["n2"],
        ),
        (
            "a member tagged nostream gets no slot (it never streams from us)",
            view(&[
                ("n1", "", none.clone()),
                ("n2", "", json!({"nostream": true})),
                ("n3", "", none.clone()),
            ]),
            &["n3"],
        ),
        (
            "nostream as a string is read leniently like every Patroni tag",
            view(&[
                ("n1", "", none.clone()),
                ("n2", "", json!({"nostream": "on"})),
            ]),
            &[],
        ),
        (
            "slot names follow Patroni's slot naming and are sorted",
            view(&[
                ("n1", "", none.clone()),
                ("pg-b", "", none.clone()),
                ("Pg.A", "", none.clone()),
            ]),
            &["pg_a", "pg_b"],
        ),
        (
            "a lone leader wants no slot",
            view(&[("n1", "", none.clone())]),
            &[],
        ),
    ];
    for (what, v, want) in rows {
        assert_eq!(wanted_slots(v, &name("n1")), strings(want), "{what}");
    }
}

#[test]
fn slots_need_sync_rows() {
    let w = strings(&["n2", "n3"]);
    type Row = (&'static str, Vec<SlotInfo>, Option<Vec<String>>, bool);
    let rows: &[Row] = &[
        (
            "same slots and the list was applied: nothing to do",
            vec![slot("n3", true, None), slot("n2", true, None)],
            Some(w.clone()),
            false,
        ),
        (
            "a wanted slot is missing: sync",
            vec![slot("n2", true, None)],
            Some(w.clone()),
            true,
        ),
        (
            "an extra physical slot (departed member): sync drops it",
            vec![
                slot("n2", true, None),
                slot("n3", true, None),
                slot("n4", true, None),
            ],
            Some(w.clone()),
            true,
        ),
        (
            "a logical slot of a wanted name does not count as the physical slot",
            vec![slot("n2", true, None), slot("n3", false, None)],
            Some(w.clone()),
            true,
        ),
        (
            "logical slots are not this rule's business",
            vec![
                slot("n2", true, None),
                slot("n3", true, None),
                slot("cdc", false, None),
            ],
            Some(w.clone()),
            false,
        ),
        (
            "a new leader applies its list once even when the names match",
            vec![slot("n2", true, None), slot("n3", true, None)],
            None,
            true,
        ),
        (
            "the list changed since the last apply: sync",
            vec![slot("n2", true, None), slot("n3", true, None)],
            Some(strings(&["n2"])),
            true,
        ),
    ];
    for (what, have, applied, want) in rows {
        let pg = primary(100, 1, have.clone());
        assert_eq!(
            slots_need_sync(&pg, &w, applied.as_deref()),
            *want,
            "{what}"
        );
    }
}

// ------------------------------------------------------------------------------ status

#[test]
fn leader_status_rows() {
    struct Row {
        what: &'static str,
        pg: PgStatus,
        written: Option<HistoryMark>,
        optime: u64,
        slots: &'static [(&'static str, u64)],
        timeline: Option<u32>,
    }
    let rows = [
        Row {
            what: "optime is our WAL position and our own slot sits at it",
            pg: primary(500, 1, vec![]),
            written: None,
            optime: 500,
            slots: &[("n1", 500)],
            timeline: None,
        },
        Row {
            what: "slot positions are the restart_lsn of each slot; slots without one are left out",
            pg: primary(
                900,
                2,
                vec![slot("n2", true, Some(800)), slot("n3", true, None)],
            ),
            written: None,
            optime: 900,
            slots: &[("n1", 900), ("n2", 800)],
            timeline: None,
        },
        Row {
            what: "no timeline when the history we wrote leads to ours directly (parent = tl - 1)",
            pg: primary(900, 3, vec![]),
            written: Some(mark(3, 2, 700)),
            optime: 900,
            slots: &[("n1", 900)],
            timeline: None,
        },
        Row {
            what: "the timeline is written when our promotion skipped numbers (parent 2, tl 5)",
            pg: primary(900, 5, vec![]),
            written: Some(mark(5, 2, 700)),
            optime: 900,
            slots: &[("n1", 900)],
            timeline: Some(5),
        },
        Row {
            what: "a mark of another timeline (written before a later promotion) writes none",
            pg: primary(900, 6, vec![]),
            written: Some(mark(5, 2, 700)),
            optime: 900,
            slots: &[("n1", 900)],
            timeline: None,
        },
        Row {
            what: "no timeline before any history was written",
            pg: primary(900, 5, vec![]),
            written: None,
            optime: 900,
            slots: &[("n1", 900)],
            timeline: None,
        },
    ];
    for r in rows {
        let s = leader_status(&name("n1"), &r.pg, strings(&["n2"]), r.written);
        assert_eq!(s.optime, r.optime, "{}", r.what);
        let slots: BTreeMap<String, u64> =
            r.slots.iter().map(|(n, l)| (n.to_string(), *l)).collect();
        assert_eq!(s.slots, slots, "{}", r.what);
        assert_eq!(s.retain_slots, strings(&["n2"]), "{}: retain_slots", r.what);
        assert_eq!(s.timeline, r.timeline, "{}", r.what);
    }
}

// ------------------------------------------------------------------------------ history

#[test]
fn history_needs_update_rows() {
    let done = |p: u32| line(p, 700, Some("2025-01-01T00:00:00+00:00"), Some("n1"));
    type Row = (
        &'static str,
        Option<u32>,
        Vec<HistoryLine>,
        Option<HistoryMark>,
        bool,
    );
    let rows: &[Row] = &[
        (
            "unknown timeline: nothing to write",
            None,
            vec![],
            None,
            false,
        ),
        (
            "timeline 1: no promotion ever happened",
            Some(1),
            vec![],
            None,
            false,
        ),
        (
            "timeline 2 with an empty history: write it",
            Some(2),
            vec![],
            None,
            true,
        ),
        (
            "last line leads to our timeline and is complete: current",
            Some(3),
            vec![done(1), done(2)],
            None,
            false,
        ),
        (
            "last line leads to an older timeline: a promotion since, write it",
            Some(3),
            vec![done(1)],
            None,
            true,
        ),
        (
            "last line without a timestamp (written by PostgreSQL's file alone): complete it",
            Some(2),
            vec![line(1, 700, None, Some("n1"))],
            None,
            true,
        ),
        (
            "last line without a new leader: complete it",
            Some(2),
            vec![line(1, 700, Some("2025-01-01T00:00:00+00:00"), None)],
            None,
            true,
        ),
        (
            "a skipping history (parent 2, tl 5) exactly as we wrote it is current",
            Some(5),
            vec![done(1), done(2)],
            Some(mark(5, 2, 700)),
            false,
        ),
        (
            "a skipping history we did not write (other switchpoint) is rewritten",
            Some(5),
            vec![done(1), done(2)],
            Some(mark(5, 2, 600)),
            true,
        ),
        (
            "a skipping history written for another timeline is rewritten",
            Some(6),
            vec![done(1), done(2)],
            Some(mark(5, 2, 700)),
            true,
        ),
    ];
    for (what, tl, history, written, want) in rows {
        assert_eq!(
            history_needs_update(tl.map(Timeline), history, *written),
            *want,
            "{what}"
        );
    }
}

#[test]
fn merge_history_rows() {
    const NOW: &str = "2025-06-01T12:00:00+00:00";
    const OLD: &str = "2025-01-01T00:00:00+00:00";
    struct Row {
        what: &'static str,
        file: Vec<HistoryLine>,
        dcs: Vec<HistoryLine>,
        want: Vec<HistoryLine>,
        mark: Option<HistoryMark>,
    }
    let rows = [
        Row {
            what: "the first promotion: the last line gets now and us",
            file: vec![line(1, 700, None, None)],
            dcs: vec![],
            want: vec![line(1, 700, Some(NOW), Some("n2"))],
            mark: Some(mark(2, 1, 700)),
        },
        Row {
            what: "older lines keep the timestamp and leader the DCS copy had",
            file: vec![line(1, 700, None, None), line(2, 900, None, None)],
            dcs: vec![line(1, 700, Some(OLD), Some("n1"))],
            want: vec![
                line(1, 700, Some(OLD), Some("n1")),
                line(2, 900, Some(NOW), Some("n2")),
            ],
            mark: Some(mark(3, 2, 900)),
        },
        Row {
            what: "an older line the DCS never had stays without timestamp and leader",
            file: vec![line(1, 700, None, None), line(2, 900, None, None)],
            dcs: vec![],
            want: vec![
                line(1, 700, None, None),
                line(2, 900, Some(NOW), Some("n2")),
            ],
            mark: Some(mark(3, 2, 900)),
        },
        Row {
            what: "a last line the DCS already completed keeps its timestamp and leader",
            file: vec![line(1, 700, None, None)],
            dcs: vec![line(1, 700, Some(OLD), Some("n1"))],
            want: vec![line(1, 700, Some(OLD), Some("n1"))],
            mark: Some(mark(2, 1, 700)),
        },
        Row {
            what: "an empty history file: nothing to write, no mark",
            file: vec![],
            dcs: vec![line(1, 700, Some(OLD), Some("n1"))],
            want: vec![],
            mark: None,
        },
    ];
    for r in rows {
        let tl = Timeline(r.file.len() as u32 + 1);
        let (lines, m) = merge_history(r.file, &r.dcs, tl, &name("n2"), NOW);
        assert_eq!(lines, r.want, "{}", r.what);
        assert_eq!(m, r.mark, "{}", r.what);
    }
}

#[test]
fn merge_history_marks_the_timeline_we_run_on_not_the_line_count() {
    // A promotion that skipped numbers: the file's last parent is 2, we run on 5.
    let (_, m) = merge_history(
        vec![line(1, 700, None, None), line(2, 900, None, None)],
        &[],
        Timeline(5),
        &name("n2"),
        "now",
    );
    assert_eq!(m, Some(mark(5, 2, 900)));
}

// ------------------------------------------------------------------------------ failsafe

#[test]
fn failsafe_update_rows() {
    let none = json!({});
    let api = |n: &str| format!("http://{n}:8008/patroni");
    let members = view(&[
        ("n1", &api("n1"), none.clone()),
        ("n2", &api("n2"), none.clone()),
        ("n3", "", none.clone()),
    ]);
    let want: BTreeMap<MemberName, String> =
        [(name("n1"), api("n1")), (name("n2"), api("n2"))].into();
    let with_key = |m: &BTreeMap<MemberName, String>| {
        let mut v = members.clone();
        v.failsafe = Some(json!(
            m.iter()
                .map(|(k, v)| (k.to_string(), Value::from(v.clone())))
                .collect::<serde_json::Map<_, _>>()
        ));
        v
    };
    let mut stale = want.clone();
    stale.insert(name("n9"), api("n9"));
    let mut old_url = want.clone();
    old_url.insert(name("n1"), "http://old:8008/patroni".into());
    type Row = (
        &'static str,
        ClusterView,
        Option<BTreeMap<MemberName, String>>,
    );
    let rows: &[Row] = &[
        (
            "no key yet: write every member with a REST API (n3 has none) and us",
            members.clone(),
            Some(want.clone()),
        ),
        (
            "the key already says exactly that: no write",
            with_key(&want),
            None,
        ),
        (
            "a departed member is still listed: rewrite without it",
            with_key(&stale),
            Some(want.clone()),
        ),
        (
            "our own url changed: rewrite with the new one",
            with_key(&old_url),
            Some(want.clone()),
        ),
    ];
    for (what, v, expect) in rows {
        assert_eq!(
            failsafe_update(v, &name("n1"), api("n1")),
            *expect,
            "{what}"
        );
    }
}

#[test]
fn failsafe_update_lists_the_leader_even_before_its_member_key_exists() {
    let v = view(&[("n2", "http://n2:8008/patroni", json!({}))]);
    let got = failsafe_update(&v, &name("n1"), "http://n1:8008/patroni".into()).unwrap();
    assert_eq!(
        got.get(&name("n1")).map(String::as_str),
        Some("http://n1:8008/patroni")
    );
}

// ------------------------------------------------------------------------------ restart

fn req(role: Option<&str>, restart_pending: Option<bool>, version: Option<&str>) -> RestartRequest {
    RestartRequest {
        role: role.map(str::to_string),
        restart_pending,
        postgres_version: version.map(str::to_string),
        ..Default::default()
    }
}

#[test]
fn restart_conditions_rows() {
    type Row = (&'static str, RestartRequest, Role, bool, Option<u32>, bool);
    let rows: &[Row] = &[
        (
            "no condition: restart",
            req(None, None, None),
            Role::Replica,
            false,
            Some(150_004),
            true,
        ),
        (
            "role matches",
            req(Some("replica"), None, None),
            Role::Replica,
            false,
            None,
            true,
        ),
        (
            "role differs: refused",
            req(Some("primary"), None, None),
            Role::Replica,
            false,
            None,
            false,
        ),
        (
            "master is the old name of primary",
            req(Some("master"), None, None),
            Role::Primary,
            false,
            None,
            true,
        ),
        (
            "master does not match a replica",
            req(Some("master"), None, None),
            Role::Replica,
            false,
            None,
            false,
        ),
        (
            "restart_pending with settings pending: restart",
            req(None, Some(true), None),
            Role::Replica,
            true,
            None,
            true,
        ),
        (
            "restart_pending with nothing pending: refused",
            req(None, Some(true), None),
            Role::Replica,
            false,
            None,
            false,
        ),
        (
            "restart_pending false is no condition",
            req(None, Some(false), None),
            Role::Replica,
            false,
            None,
            true,
        ),
        (
            "server older than the given version: restart",
            req(None, None, Some("15.5")),
            Role::Replica,
            false,
            Some(150_004),
            true,
        ),
        (
            "server already at the given version: refused (boundary)",
            req(None, None, Some("15.4")),
            Role::Replica,
            false,
            Some(150_004),
            false,
        ),
        (
            "server newer than the given version: refused",
            req(None, None, Some("15")),
            Role::Replica,
            false,
            Some(150_004),
            false,
        ),
        (
            "unknown server version does not block",
            req(None, None, Some("15.5")),
            Role::Replica,
            false,
            None,
            true,
        ),
        (
            "an unparsable version does not block",
            req(None, None, Some("fifteen")),
            Role::Replica,
            false,
            Some(150_004),
            true,
        ),
        (
            "every set condition must hold: role ok but nothing pending",
            req(Some("replica"), Some(true), None),
            Role::Replica,
            false,
            None,
            false,
        ),
    ];
    for (what, r, role, pending, version, want) in rows {
        assert_eq!(
            restart_conditions_ok(r, *role, *pending, *version),
            *want,
            "{what}"
        );
    }
}

#[test]
fn parse_pg_version_rows() {
    let rows: &[(&str, &str, Option<u32>)] = &[
        ("a major since 10", "15", Some(150_000)),
        ("major.minor since 10", "15.4", Some(150_004)),
        ("three parts before 10", "9.6.24", Some(90_624)),
        ("two parts before 10 are major.major", "9.6", Some(90_600)),
        ("a bare major below 10 is ambiguous", "9", None),
        ("not a number", "fifteen", None),
        ("too many parts", "15.4.1.2", None),
    ];
    for (what, s, want) in rows {
        assert_eq!(parse_pg_version(s), *want, "{what}");
    }
}

#[test]
fn scheduled_restart_due_rows() {
    let now: DateTime<Utc> = Utc.with_ymd_and_hms(2025, 6, 1, 12, 0, 0).unwrap();
    let s = chrono::Duration::seconds(1);
    let rows: &[(&str, Option<DateTime<Utc>>, bool, bool)] = &[
        ("nothing scheduled", None, false, false),
        (
            "scheduled in the future: not yet",
            Some(now + s),
            false,
            false,
        ),
        (
            "scheduled for exactly now: due (boundary)",
            Some(now),
            false,
            true,
        ),
        ("scheduled in the past: due", Some(now - s), false, true),
        (
            "due but a long action runs: wait for it",
            Some(now - s),
            true,
            false,
        ),
    ];
    for (what, at, action, want) in rows {
        assert_eq!(scheduled_restart_due(*at, now, *action), *want, "{what}");
    }
}
