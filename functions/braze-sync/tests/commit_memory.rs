//! The ranged commit's memory is bounded by its range, not by what the run confirmed in it:
//! measured as the process's peak RSS over the commit (not time), a hand-over's commit of a
//! range whose every user this run changed holds the range's snapshot and the one delta
//! object it writes, not the run's records decoded as well (32 bytes a record, more than the
//! delta itself).
#![allow(clippy::unwrap_used)]

use std::sync::Arc;

use braze_sync::config::route::Route;
use braze_sync::model::{AttributeChange, Identifier, RowPos, UserDelta, fingerprint};
use braze_sync::state::confirmed::SegmentWriter;
use braze_sync::state::store::{HeadDoc, StateStore, memory_estimate};
use bridge_shared::object_store::{MemoryStore, ObjectStore};
use serde_json::json;

/// A field of `/proc/self/status`, in bytes.
fn status_bytes(field: &str) -> usize {
    std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|kb| kb.parse::<usize>().ok())
        .map_or(0, |kb| kb * 1024)
}

/// Resets the process's peak RSS to its current RSS (Linux: `clear_refs` 5); false where
/// that is not possible.
fn reset_peak_rss() -> bool {
    std::fs::write("/proc/self/clear_refs", "5").is_ok() && status_bytes("VmHWM:") > 0
}

const ATTRIBUTES: usize = 10;
const USERS: usize = 40_000;
/// Users per checkpoint segment (as the committer writes them every few seconds).
const CHECKPOINT: usize = 2_000;

fn route() -> Route {
    let mut toml = String::from(
        "name = \"r\"\nprefix = \"p/\"\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\n",
    );
    for a in 0..ATTRIBUTES {
        toml.push_str(&format!("[attributes.a{a}]\ntype = \"String\"\n"));
    }
    Route::from_toml(&toml, "t").unwrap()
}

/// User `i`'s confirmed values in version `v`.
fn delta(i: usize, v: usize) -> UserDelta {
    UserDelta {
        identifier: Identifier::ExternalId(format!("user-{i:08}")),
        pos: RowPos::default(),
        changes: (0..ATTRIBUTES)
            .map(|a| {
                let value = json!(format!("v{v}-{i}-{a}"));
                AttributeChange {
                    name: format!("a{a}"),
                    fingerprint: Some(fingerprint(&value)),
                    value,
                }
            })
            .collect(),
        update_existing_only: false,
        is_new: v == 0,
        row_digest: None,
    }
}

#[tokio::test(flavor = "current_thread")]
async fn a_hand_over_commit_holds_its_range_and_one_delta_not_the_runs_records() {
    if !reset_peak_rss() {
        eprintln!("no /proc/self/clear_refs here: skipped");
        return;
    }
    let route = route();
    let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    // One range for every user: the commit's unit is the whole route here.
    let state = StateStore::new(mem, "state", "s/", "r").with_range_users(1 << 20);
    let spill = tempfile::tempdir().unwrap();
    let mut head = state.read_head().await.unwrap();
    // A first run confirmed every user (version 0), committed without a watermark.
    for chunk in (0..USERS).collect::<Vec<_>>().chunks(CHECKPOINT) {
        let deltas: Vec<UserDelta> = chunk.iter().map(|i| delta(*i, 0)).collect();
        state.checkpoint(&mut head, &route, &deltas).await.unwrap();
    }
    state
        .commit_ranged(&mut head, &route, None, USERS as u64, spill.path())
        .await
        .unwrap();
    assert_eq!(head.doc.ranges.len(), 1);
    assert!(head.doc.ranges[0].base.is_some());
    // The next invocation changed every user (version 1) and hands over: its commit writes
    // the range's delta.
    for chunk in (0..USERS).collect::<Vec<_>>().chunks(CHECKPOINT) {
        let deltas: Vec<UserDelta> = chunk.iter().map(|i| delta(*i, 1)).collect();
        state.checkpoint(&mut head, &route, &deltas).await.unwrap();
    }
    let records = (USERS * ATTRIBUTES) as u64;
    let delta_len = SegmentWriter::encoded_len(&route.state_names(), records, Some(0));
    assert!(reset_peak_rss());
    let before = status_bytes("VmRSS:");
    let stats = state
        .commit_ranged(&mut head, &route, None, USERS as u64, spill.path())
        .await
        .unwrap();
    let grew = status_bytes("VmHWM:").saturating_sub(before);
    assert_eq!((stats.deltas, stats.shards), (1, 0), "{stats:?}");
    // The range loaded (its object and snapshot: twice the snapshot's estimate), its delta
    // (written to the in-memory store, so still resident after), and a few MB whatever the
    // range: the segment being partitioned (one checkpoint, raw and decoded), the spill's
    // buffers, the allocator's slack.
    let snapshot = memory_estimate(
        &HeadDoc {
            users: USERS as u64,
            ..HeadDoc::default()
        },
        &route,
    ) as usize;
    let budget = 2 * snapshot + delta_len * 5 / 4 + (8 << 20);
    let decoded = records as usize * 32;
    assert!(
        grew <= budget,
        "the commit grew the process by {grew} bytes, over its budget of {budget} (the range's \
         snapshot: {snapshot}, its delta: {delta_len}); the run's records decoded would be \
         {decoded} more"
    );
    // The state holds every user's latest values.
    let (_, snap) = state.load(&route).await.unwrap();
    assert_eq!(snap.len(), USERS);
}
