//! Pure rules of the leader's upkeep: what the leader wants in the DCS and in PostgreSQL each
//! cycle — the physical replication slots, the `status` record, the `history` lines after a
//! promotion, and the `failsafe` member map. The executor (`ha_loop/bookkeeping.rs`) only
//! compares, writes and remembers what these functions return.
//!
//! No I/O and no clock: the wall time for a new history line is an input.

use std::collections::BTreeMap;

use crate::dcs::{ClusterView, HistoryLine, Status};
use crate::pg::PgStatus;
use crate::types::{Lsn, MemberName, Timeline};

/// What the `history` this node last wrote ends with: our timeline then, and the parent
/// timeline and switchpoint of its last line. Remembered so that a history whose timelines skip
/// numbers (its last parent is not `timeline − 1`) counts as current and is not rewritten every
/// cycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HistoryMark {
    pub timeline: Timeline,
    pub parent: Timeline,
    pub switchpoint: Lsn,
}

/// The physical slots the leader keeps: one per other member, named by
/// [`MemberName::slot_name`], except members tagged `nostream` (they never stream from us, so a
/// slot would only retain WAL forever); sorted so it compares with what PostgreSQL has.
///
/// Why every member and at once: a slot created the cycle a member appears means a new replica
/// never streams without WAL retention (Patroni's `use_slots`).
pub fn wanted_slots(view: &ClusterView, me: &MemberName) -> Vec<String> {
    let mut wanted: Vec<String> = view
        .members
        .values()
        .filter(|m| m.name != *me && !m.data.tag_bool("nostream"))
        .map(|m| m.name.slot_name())
        .collect();
    wanted.sort();
    wanted
}

/// Whether `sync_slots` must run: the physical slots PostgreSQL has differ from `wanted`, or
/// this agent has not applied exactly `wanted` yet (`last_applied`: the list of the last
/// successful call; `None` on a new leader or after a failed call). The second arm makes a new
/// leader apply its list once through PostgreSQL even when the names already match, instead of
/// trusting slots an earlier leader of this node left behind; afterwards the call runs only
/// when something changed, so a steady leader does no slot work.
pub fn slots_need_sync(pg: &PgStatus, wanted: &[String], last_applied: Option<&[String]>) -> bool {
    let mut have: Vec<&str> = pg
        .slots
        .iter()
        .filter(|s| s.physical)
        .map(|s| s.name.as_str())
        .collect();
    have.sort_unstable();
    have != wanted.iter().map(String::as_str).collect::<Vec<_>>() || last_applied != Some(wanted)
}

/// The `status` record the leader writes (and writes only when it differs from the view's):
///
/// - `optime`: our WAL position — what replicas' lag (`maximum_lag_on_failover`) is measured
///   against after we are gone;
/// - `slots`: each slot's `restart_lsn`, plus our own slot name at our optime, so the member
///   that promotes next keeps a slot for us with a position (Patroni's permanent slots);
/// - `retain_slots`: the slots we want (see [`wanted_slots`]), so a new leader keeps them;
/// - `timeline`: ours, but only when the history we wrote cannot show it — its last line's
///   parent is not our timeline − 1 (the promotion skipped numbers other nodes had used).
///   Otherwise `history` already implies the timeline and the field stays empty, as Patroni
///   writes it.
pub fn leader_status(
    me: &MemberName,
    pg: &PgStatus,
    wanted: Vec<String>,
    history_written: Option<HistoryMark>,
) -> Status {
    let optime = pg.wal_position().0;
    let mut slots: BTreeMap<String, u64> = pg
        .slots
        .iter()
        .filter_map(|s| s.restart_lsn.map(|l| (s.name.clone(), l.0)))
        .collect();
    slots.insert(me.slot_name(), optime);
    let timeline = pg
        .timeline
        .map(|t| t.0)
        .filter(|tl| history_written.is_some_and(|m| m.timeline.0 == *tl && m.parent.0 + 1 != *tl));
    Status {
        optime,
        slots,
        retain_slots: wanted,
        timeline,
    }
}

/// Whether the DCS `history` must be (re)written for a primary on `timeline`: never on
/// timeline 1 or unknown (no promotion happened); otherwise unless its last line is complete
/// (leader and timestamp set) and leads to our timeline — directly (parent = timeline − 1) or,
/// after a promotion that skipped numbers, exactly as we last wrote it for this timeline
/// (`written`). Without the second case a skipping history would be rewritten every cycle.
pub fn history_needs_update(
    timeline: Option<Timeline>,
    history: &[HistoryLine],
    written: Option<HistoryMark>,
) -> bool {
    let Some(Timeline(tl)) = timeline else {
        return false;
    };
    if tl <= 1 {
        return false;
    }
    let current = history.last().is_some_and(|h| {
        h.new_leader.is_some()
            && h.timestamp.is_some()
            && (h.parent_timeline + 1 == tl
                || written
                    == Some(HistoryMark {
                        timeline: Timeline(tl),
                        parent: Timeline(h.parent_timeline),
                        switchpoint: Lsn(h.switchpoint),
                    }))
    });
    !current
}

/// The history to write: PostgreSQL's timeline history file (`lines`, 3 fields each) completed
/// to Patroni's 5-field lines. Older lines keep the timestamp and new leader the DCS copy
/// (`dcs`) had for the same parent timeline — they were written by earlier leaders and the file
/// does not carry them; the last line (our promotion) gets `now` and `me` when still empty.
/// Returns the lines and the [`HistoryMark`] to remember once they are written (`None` for an
/// empty file: nothing to write).
pub fn merge_history(
    mut lines: Vec<HistoryLine>,
    dcs: &[HistoryLine],
    timeline: Timeline,
    me: &MemberName,
    now: &str,
) -> (Vec<HistoryLine>, Option<HistoryMark>) {
    let n = lines.len();
    for (idx, l) in lines.iter_mut().enumerate() {
        if let Some(old) = dcs.iter().find(|h| h.parent_timeline == l.parent_timeline) {
            l.timestamp = l.timestamp.clone().or(old.timestamp.clone());
            l.new_leader = l.new_leader.clone().or(old.new_leader.clone());
        }
        if idx + 1 == n {
            l.timestamp.get_or_insert_with(|| now.to_string());
            l.new_leader.get_or_insert_with(|| me.to_string());
        }
    }
    let mark = lines.last().map(|last| HistoryMark {
        timeline,
        parent: Timeline(last.parent_timeline),
        switchpoint: Lsn(last.switchpoint),
    });
    (lines, mark)
}

/// The `failsafe` map the leader wants (Patroni's `_failsafe_config`): every member with a REST
/// API, and us at `my_api_url` — the members whose acceptance keeps this primary running if
/// the DCS is lost. A member without an API could never answer the failsafe round, so listing
/// it would make every round fail. Returns `Some(map)` only when it differs from the key in
/// the view (the write is skipped otherwise).
pub fn failsafe_update(
    view: &ClusterView,
    me: &MemberName,
    my_api_url: String,
) -> Option<BTreeMap<MemberName, String>> {
    let mut want: BTreeMap<MemberName, String> = view
        .members
        .values()
        .filter(|m| !m.data.api_url.is_empty())
        .map(|m| (m.name.clone(), m.data.api_url.clone()))
        .collect();
    want.insert(me.clone(), my_api_url);
    (view.failsafe_members().as_ref() != Some(&want)).then_some(want)
}
