//! Fan-out: one export too big for one invocation, run as pieces by several invocations
//! through the function's own queue (Lambda's event source mapping is the engine).
//!
//! - **Coordinator** (the triggered run, holding the route lock): lays the state out in at
//!   least as many hash ranges as pieces ([`StateStore::ensure_layout`]), writes the plan to
//!   `<state prefix><route>/_fan_out/<run id>/manifest.json`, forks the state once per piece
//!   ([`StateStore::create_fork`]) and, once its run is over, queues one
//!   [`PieceMessage`] per piece. It keeps the route lock (holder = its run id) and the
//!   export's ledger entry open ([`crate::state::ledger::LedgerStatus::FannedOut`]).
//! - **Piece** `k`: joins the route lock ([`RouteLock::join`]), claims the piece for this
//!   delivery ([`attempt`]: one attempt at a piece at a time; a duplicate delivery leaves it to
//!   a live attempt), reads every part of the export
//!   but diffs only its span of the state's ranges (`only_ranges`), sends (one of the
//!   workspace's senders as `<run id>-p<k>`), checkpoints and commits into its own fork head,
//!   never the route head; a killed piece resumes from its own checkpoints alone, and one cut
//!   by its deadline queues itself again. Departures are not sent by pieces: each writes its
//!   removals (`p<k>/departures.bin`) and its figures (`p<k>/done.json`).
//! - **Finalizer**: the piece that finds every `done.json` and wins the conditional create
//!   of `final.json`. It merges the forks into the route head ([`StateStore::merge_forks`]),
//!   judges departures on the export's totals and sends the removals the guard lets through,
//!   commits with the export's watermark, writes one combined report, completes the ledger
//!   entry, releases the route lock and deletes the control objects. A finalizer killed
//!   midway is retried by the next attempt that claims its piece (merging twice gives the
//!   same head; re-sending a removal is harmless). Checkpoint segments a fork still names
//!   are waited for while an attempt of the piece lives, and folded into the fork once none
//!   does.
//!
//! One role a file: [`coordinator`] (the triggered run's split), [`piece`] (a piece message:
//! its diff, send and fork commit), [`attempt`] (a piece's attempt claim: duplicates, dead
//! attempts' checkpoints), [`finalizer`] (the merge, departures, combined report),
//! [`failure`] (ending a fan-out that cannot finish) and [`control`] (the `_fan_out/<run id>/`
//! control objects and their documents).
//!
//! [`StateStore::ensure_layout`]: crate::state::store::StateStore::ensure_layout
//! [`StateStore::create_fork`]: crate::state::store::StateStore::create_fork
//! [`StateStore::merge_forks`]: crate::state::store::StateStore::merge_forks
//! [`PieceMessage`]: crate::run::runner::hand_over::PieceMessage
//! [`RouteLock::join`]: crate::state::route_lock::RouteLock::join

mod attempt;
mod control;
mod coordinator;
mod failure;
mod finalizer;
mod piece;

use std::ops::Range;

use bridge_shared::StoreError;

use super::EST_ROW_BYTES;
use crate::diff::export::SpillOverflow;
use crate::run::handler::RunError;

pub use control::{FinalDoc, Manifest, PieceDone};
pub(super) use coordinator::Split;

/// Bytes the bounded diff spills per export row, used to tell whether an export's spill fits
/// the ephemeral storage: a margin over what `sync-scale-bench` measures at 20 attributes
/// (`docs/benchmarks.md`), since the estimate's rows are themselves guessed from bytes (a spill
/// the estimate still misses fans out from what was measured, [`pieces_measured`]).
pub const SPILL_BYTES_PER_ROW: u64 = 360;
/// How long a fan-out's route lock holds without a renewal (pieces renew it while they
/// run): long enough for queued pieces to start, short enough that a dead fan-out frees
/// the route within one Lambda timeout.
pub const FAN_OUT_LEASE_S: i64 = 900;

/// The number of pieces to split an export into: `forced` (`BRIDGE_FAN_OUT_PIECES`), else
/// enough that each piece's spill (the export's rows estimated from its parts' sizes as text,
/// [`super::text_bytes`], times
/// [`SPILL_BYTES_PER_ROW`]) fits `spill_limit` with a quarter to spare; `None`: one
/// invocation does (pure).
pub fn pieces_for(
    parts_bytes: u64,
    spill_limit: Option<u64>,
    forced: Option<usize>,
) -> Option<usize> {
    if let Some(n) = forced {
        return (n >= 2).then_some(n);
    }
    let limit = spill_limit?.max(1);
    let spill = (parts_bytes / EST_ROW_BYTES).saturating_mul(SPILL_BYTES_PER_ROW);
    if spill <= limit {
        return None;
    }
    let want = spill.saturating_mul(5) / 4;
    Some((want.div_ceil(limit) as usize).max(2))
}

/// Consecutive invocations of a piece that hand over without Braze confirming a user before
/// the fan-out ends (the next would start where they did).
pub const STALLED_LIMIT: u32 = 3;

/// Most pieces a fan-out splits into (a span holds at least one of the state's ranges, and a
/// state has at most `2^16`).
pub const MAX_PIECES: usize = 1 << 16;

/// The number of pieces for an export whose bounded run's spill overflowed `limit` although
/// the estimate from its parts' sizes said it would fit (compressed parts, wide rows): its
/// spill extrapolated from what the partition step measured
/// ([`SpillOverflow::projected_spill`] of the parts' bytes), half again for margin (the
/// parts' read-ahead counts bytes before their rows, spans of ranges are not all even), per
/// `limit` (pure).
pub fn pieces_measured(o: &SpillOverflow, parts_bytes: u64, limit: u64) -> usize {
    let spill = o.projected_spill(parts_bytes);
    let want = spill.saturating_mul(3) / 2;
    (want.div_ceil(limit.max(1)) as usize).clamp(2, MAX_PIECES)
}

fn forced_setting(setting: Option<usize>) -> bool {
    setting.is_some_and(|n| n >= 2)
}

/// The fewest pieces, at least `pieces`, whose even spans of `ranges` ranges ([`spans`]) each
/// hold at most `ranges / pieces` (rounded down, at least 1) ranges, so no piece gets more
/// than its `1/pieces` share of the export: e.g. 8 ranges in 3 pieces would give a span of 3
/// (37.5%); 4 pieces of 2 do not (pure).
pub fn even_pieces(ranges: usize, pieces: usize) -> usize {
    let ranges = ranges.max(1);
    let width = (ranges / pieces.max(1)).max(1);
    ranges.div_ceil(width).max(pieces.min(ranges))
}

/// Splits ranges `0..ranges` into `pieces` contiguous spans as even as possible (pure).
pub fn spans(ranges: usize, pieces: usize) -> Vec<Range<usize>> {
    let pieces = pieces.clamp(1, ranges.max(1));
    (0..pieces)
        .map(|k| (k * ranges / pieces)..((k + 1) * ranges / pieces))
        .collect()
}

fn store_err(e: StoreError) -> RunError {
    RunError::Retryable(e.to_string())
}

/// A state error as the piece's answer: retried when it may pass, else the fan-out ends.
fn state_err(e: crate::state::store::StateError) -> RunError {
    if e.is_retryable() {
        RunError::Retryable(e.to_string())
    } else {
        RunError::Permanent {
            message: e.to_string(),
            report: None,
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::collections::BTreeMap;

    use bridge_shared::object_store::ObjectMeta;
    use serde_json::json;

    use super::*;

    #[test]
    fn pieces_follow_the_estimated_spill_or_the_setting() {
        // 10 GB of parts ≈ 100M rows ≈ 36 GB of spill: 5 pieces of a 9 GB limit (+25%).
        let limit = 9 << 30;
        assert_eq!(pieces_for(10_000_000_000, Some(limit), None), Some(5));
        assert_eq!(pieces_for(1_000_000, Some(limit), None), None);
        assert_eq!(pieces_for(1_000_000, None, None), None);
        assert_eq!(pieces_for(1_000, Some(limit), Some(4)), Some(4));
        assert_eq!(pieces_for(1_000, Some(limit), Some(1)), None);
    }

    #[test]
    fn compressed_parts_are_estimated_as_text() {
        use super::super::{GZIP_EXPANSION, PARQUET_EXPANSION, text_bytes};
        assert_eq!(text_bytes("in/a.csv", 1_000), 1_000);
        assert_eq!(text_bytes("in/a.csv.gz", 1_000), 1_000 * GZIP_EXPANSION);
        assert_eq!(text_bytes("in/a.CSV.GZIP", 1_000), 5_000);
        assert_eq!(text_bytes("in/a.tar.gz", 1_000), 5_000);
        assert_eq!(text_bytes("in/a.zip", 1_000), 5_000);
        assert_eq!(text_bytes("in/a.csv.bz2", 1_000), 6_000);
        assert_eq!(text_bytes("in/a.csv.zst", 1_000), 6_000);
        assert_eq!(text_bytes("in/a.parquet", 1_000), 1_000 * PARQUET_EXPANSION);
        assert_eq!(text_bytes("in/gz/a.json", 1_000), 1_000);
        // 2 GB of gzip parts: as stored they would seem to fit a 9 GB spill (7.2 GB); as
        // text (~10 GB, ~100M rows) they need 5 pieces.
        let limit = 9 << 30;
        assert_eq!(pieces_for(2_000_000_000, Some(limit), None), None);
        let text = text_bytes("e.csv.gz", 2_000_000_000);
        assert_eq!(pieces_for(text, Some(limit), None), Some(5));
    }

    #[test]
    fn an_overflow_splits_by_what_was_measured() {
        // Stopped at a 1 GiB limit after 1M rows from 100 MB of gzip parts (0.01 rows per
        // part byte), 1,100 bytes per row spilled: 5 GB of parts → 50M rows → 55 GB of
        // spill, half again → 77 pieces of 1 GiB.
        let o = SpillOverflow {
            limit_bytes: 1 << 30,
            written_bytes: 1 << 30,
            rows_read: 1_000_000,
            rows_spilled: 1_000_000,
            record_bytes: 1_100_000_000,
            source_bytes_read: 100_000_000,
            parts_bytes: 5_000_000_000,
        };
        assert_eq!(o.projected_spill(o.parts_bytes), 55_000_000_000);
        assert_eq!(pieces_measured(&o, o.parts_bytes, 1 << 30), 77);
        // A piece keeping a quarter of the rows projects a quarter of the spill.
        let piece = SpillOverflow {
            rows_spilled: 250_000,
            record_bytes: 275_000_000,
            ..o
        };
        assert_eq!(piece.projected_spill(o.parts_bytes), 13_750_000_000);
        let text = SpillOverflow {
            parts_bytes: o.parts_bytes,
            ..piece
        }
        .to_string();
        assert!(
            text.contains("for this run's ranges of the export"),
            "{text}"
        );
        // Never fewer than 2, never more than the ranges a state can have.
        let tiny = SpillOverflow {
            record_bytes: 10,
            written_bytes: 10,
            ..o
        };
        assert_eq!(pieces_measured(&tiny, 0, 1 << 30), 2);
        assert_eq!(pieces_measured(&o, u64::MAX / 2, 1), MAX_PIECES);
        assert!(o.to_string().contains("more than the 1.0 GB"), "{o}");
        assert!(
            o.to_string().contains("about 51.2 GB for the whole export"),
            "{o}"
        );
        assert!(o.to_string().contains("EphemeralStorage"), "{o}");
    }

    #[test]
    fn estimated_pieces_get_even_spans() {
        for (ranges, pieces, want) in [(8, 3, 4), (4, 3, 4), (16, 5, 6), (16, 4, 4), (2, 4, 2)] {
            let n = even_pieces(ranges, pieces);
            assert_eq!(n, want, "{ranges} ranges, {pieces} pieces");
            let widest = spans(ranges, n).iter().map(|s| s.len()).max().unwrap();
            assert!(
                widest * pieces.min(ranges) <= ranges,
                "{ranges}/{pieces}: {widest}"
            );
        }
        for ranges in [1usize, 7, 64, 1024, 65_536] {
            for pieces in 2..40 {
                let n = even_pieces(ranges, pieces);
                let widest = spans(ranges, n).iter().map(|s| s.len()).max().unwrap();
                assert!(widest <= (ranges / pieces).max(1), "{ranges}/{pieces}");
            }
        }
    }

    #[test]
    fn the_manifest_keeps_the_parts_as_object_metadata() {
        let parts = vec![ObjectMeta {
            key: "in/a.csv".into(),
            etag: "e1".into(),
            size: 10,
            version_id: Some("v1".into()),
            last_modified: Some("2026-12-01T00:00:00Z".into()),
            metadata: BTreeMap::from([("k".to_string(), "v".to_string())]),
        }];
        let m = Manifest {
            bucket: "exports".into(),
            trigger_key: "in/a.csv".into(),
            trigger_meta: parts[0].clone(),
            parts: parts.clone(),
            ..Manifest::default()
        };
        let back: Manifest = serde_json::from_slice(&serde_json::to_vec(&m).unwrap()).unwrap();
        assert_eq!(back, m);
        assert_eq!(back.plan().parts, parts);
        // A part written with fewer fields reads with the rest empty.
        let v = json!({"parts": [{"key": "in/b.csv", "etag": "e2", "size": 3}]});
        let m: Manifest = serde_json::from_value(v).unwrap();
        assert_eq!((m.parts[0].key.as_str(), m.parts[0].size), ("in/b.csv", 3));
        assert_eq!(m.parts[0].version_id, None);
    }

    #[test]
    fn spans_cover_every_range_once() {
        let s = spans(16, 4);
        assert_eq!(s, vec![0..4, 4..8, 8..12, 12..16]);
        let s = spans(8, 3);
        assert_eq!(s, vec![0..2, 2..5, 5..8]);
        assert_eq!(spans(2, 4), vec![0..1, 1..2]);
    }
}
