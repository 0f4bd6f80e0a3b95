//! The pure verdicts of a drill round, from what the writers recorded: the longest window
//! without an acknowledged write, the acknowledged writes the final leader does not have, and
//! the first instant two nodes took writes at once. No I/O: table-tested below.

use std::collections::BTreeSet;
use std::time::{Duration, Instant};

/// One write a node acknowledged to a direct writer, at the node's own clock
/// (`clock_timestamp()`, seconds since the epoch).
#[derive(Debug, Clone, PartialEq)]
pub struct Ack {
    pub node: String,
    pub at: f64,
}

/// Two nodes took writes in overlapping periods: `again` acknowledged a write at `at`, after
/// `other` had already taken one while `again` had taken writes before it too.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Overlap {
    pub again: String,
    pub other: String,
    pub at: f64,
}

/// Two writable primaries, judged from direct writes to every node. A round has at most one
/// hand-over, so the acknowledged writes, in server-clock order, must form one contiguous run
/// per node (`a a a b b b`); a node that acknowledges again after another node's run began
/// (`a b a`) was writable at the same time as it. Comparing server clocks is exact on the
/// namespace lab (one kernel clock) and as good as the hosts' clock sync elsewhere.
pub fn two_primaries(acks: &[Ack]) -> Option<Overlap> {
    let mut sorted: Vec<&Ack> = acks.iter().collect();
    sorted.sort_by(|a, b| a.at.total_cmp(&b.at));
    let mut finished: BTreeSet<&str> = BTreeSet::new();
    let mut current: Option<&str> = None;
    for a in sorted {
        match current {
            Some(c) if c == a.node => {}
            Some(c) => {
                if finished.contains(a.node.as_str()) {
                    return Some(Overlap {
                        again: a.node.clone(),
                        other: c.to_string(),
                        at: a.at,
                    });
                }
                finished.insert(c);
                current = Some(&a.node);
            }
            None => current = Some(&a.node),
        }
    }
    None
}

/// The acknowledged ids missing from `present` (what the final leader has), sorted.
pub fn lost(acked: &[i64], present: &BTreeSet<i64>) -> Vec<i64> {
    let mut v: Vec<i64> = acked
        .iter()
        .copied()
        .filter(|id| !present.contains(id))
        .collect();
    v.sort_unstable();
    v.dedup();
    v
}

/// The longest gap between consecutive acknowledged writes (client clock), counting from
/// `from` (the fault) to the first write after it as well; `None` when nothing was
/// acknowledged after `from`.
pub fn write_unavailable(oks: &[Instant], from: Instant) -> Option<Duration> {
    let mut sorted: Vec<Instant> = oks.to_vec();
    sorted.sort();
    let before = sorted.iter().rev().find(|t| **t <= from).copied();
    let after: Vec<Instant> = sorted.into_iter().filter(|t| *t > from).collect();
    let first = *after.first()?;
    let mut longest = first - before.unwrap_or(from);
    for w in after.windows(2) {
        longest = longest.max(w[1] - w[0]);
    }
    Some(longest)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acks(seq: &[(&str, f64)]) -> Vec<Ack> {
        seq.iter()
            .map(|(n, t)| Ack {
                node: n.to_string(),
                at: *t,
            })
            .collect()
    }

    #[test]
    fn two_primaries_is_found_only_where_the_runs_of_two_nodes_interleave() {
        type Row<'a> = (&'a str, Vec<Ack>, Option<(&'a str, &'a str)>);
        let rows: &[Row] = &[
            ("no writes", acks(&[]), None),
            ("one node throughout", acks(&[("a", 1.0), ("a", 2.0)]), None),
            (
                "a clean hand-over",
                acks(&[("a", 1.0), ("a", 2.0), ("b", 5.0), ("b", 6.0)]),
                None,
            ),
            (
                "the order of the input does not matter",
                acks(&[("b", 6.0), ("a", 1.0), ("b", 5.0), ("a", 2.0)]),
                None,
            ),
            (
                "the old primary acknowledges after the new one took a write",
                acks(&[("a", 1.0), ("b", 2.0), ("a", 2.5), ("b", 3.0)]),
                Some(("a", "b")),
            ),
            (
                "a third node writable in between",
                acks(&[("a", 1.0), ("b", 2.0), ("c", 3.0), ("b", 4.0)]),
                Some(("b", "c")),
            ),
        ];
        for (what, a, want) in rows {
            let got = two_primaries(a).map(|o| (o.again, o.other));
            let want = want.map(|(x, y)| (x.to_string(), y.to_string()));
            assert_eq!(got, want, "{what}");
        }
    }

    #[test]
    fn lost_writes_are_the_acknowledged_ids_the_final_leader_lacks() {
        let present: BTreeSet<i64> = [1, 2, 4].into_iter().collect();
        assert_eq!(lost(&[1, 2, 3, 4, 5, 3], &present), vec![3, 5]);
        assert!(lost(&[1, 2], &present).is_empty());
    }

    #[test]
    fn the_write_unavailable_window_counts_from_the_last_write_before_the_fault() {
        let t = Instant::now();
        let ms = |n: u64| t + Duration::from_millis(n);
        // writes at 0, 50, then the fault at 60, then 900, 950, 1400
        let oks = [ms(0), ms(50), ms(900), ms(950), ms(1400)];
        assert_eq!(
            write_unavailable(&oks, ms(60)),
            Some(Duration::from_millis(850))
        );
        // a longer gap after the first write back counts too
        let oks = [ms(0), ms(100), ms(200), ms(2200)];
        assert_eq!(
            write_unavailable(&oks, ms(50)),
            Some(Duration::from_millis(2000))
        );
        // nothing after the fault: no window to report
        assert_eq!(write_unavailable(&[ms(0)], ms(10)), None);
    }
}
