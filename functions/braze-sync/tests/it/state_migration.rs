//! A route whose state was written by the format-1 store (one list of byte-sized base
//! shards; fixture in `tests/fixtures/state-v1`, produced by that code) is read as it is,
//! nothing is resent, and the next complete commit rewrites it into hash ranges.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;

use braze_sync::config::route::Route;
use braze_sync::diff::export::{Part, ProduceOptions};
use braze_sync::diff::in_memory::{self, Plan};
use braze_sync::state::confirmed::Snapshot;
use braze_sync::state::store::{HEAD_FORMAT, StateStore, Watermark};
use bridge_shared::object_store::MemoryStore;
use bridge_shared::{ObjectStore, PutCondition, S3Uri};
use bytes::Bytes;

const SOURCE: &str = "s3://in/amperity/customers/export.csv";

fn fixture() -> &'static Path {
    Path::new(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/fixtures/state-v1"
    ))
}

fn route() -> Route {
    let text = std::fs::read_to_string(fixture().join("route.toml")).unwrap();
    Route::from_toml(&text, "fixture").unwrap()
}

async fn store_with_fixture() -> Arc<dyn ObjectStore> {
    let mem: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    for e in std::fs::read_dir(fixture().join("objects")).unwrap() {
        let e = e.unwrap();
        let key = format!("bridge/state/customers/{}", e.file_name().to_string_lossy());
        mem.put(
            &S3Uri::new("state", key),
            Bytes::from(std::fs::read(e.path()).unwrap()),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
    }
    mem
}

fn plan(csv: &str, snap: &Snapshot) -> Plan {
    let r = route();
    let parts = vec![Ok(Part {
        source: SOURCE.to_string(),
        reader: csv.as_bytes(),
    })];
    in_memory::plan(parts, &r, snap, &ProduceOptions::for_route(&r, SOURCE)).unwrap()
}

async fn keys(mem: &Arc<dyn ObjectStore>) -> Vec<String> {
    let mut v: Vec<String> = mem
        .list("state", "bridge/state/customers/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| {
            o.key
                .trim_start_matches("bridge/state/customers/")
                .to_string()
        })
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn format_1_state_is_read_without_a_resend_and_rewritten_into_ranges() {
    let mem = store_with_fixture().await;
    let csv = std::fs::read_to_string(fixture().join("export.csv")).unwrap();
    let st =
        StateStore::new(mem.clone(), "state", "bridge/state/", "customers").with_range_users(8);
    let r = route();

    let (mut head, snap) = st.load(&r).await.unwrap();
    assert_eq!(head.doc.format, 1, "the fixture is a format-1 head");
    assert_eq!(
        snap.len(),
        40,
        "30 users in the base + 10 in the uncommitted segment"
    );
    let p = plan(&csv, &snap);
    assert!(
        p.deltas.is_empty(),
        "nothing resent: {:?}",
        p.deltas.first()
    );
    assert_eq!(p.summary.unchanged, 40);
    assert_eq!(
        p.summary.digests_recorded, 40,
        "a state written before row digests records them, sending nothing"
    );

    // A hand-over (no watermark) leaves the format-1 state as it is.
    let before = keys(&mem).await;
    st.commit(&mut head, snap, None).await.unwrap();
    assert_eq!(keys(&mem).await, before);

    // The complete commit rewrites it into ranges and removes the old objects.
    let (mut head, snap) = st.load(&r).await.unwrap();
    let stats = st
        .commit(
            &mut head,
            snap,
            Some(Watermark {
                export_id: format!("{SOURCE}#e2"),
                exported_at: Some("2024-05-02T00:00:00Z".into()),
            }),
        )
        .await
        .unwrap();
    assert_eq!(stats.users, 40);
    assert_eq!(stats.ranges, 8, "40 users at 8 per range");
    let now = keys(&mem).await;
    assert!(
        now.iter()
            .all(|k| k == "head.json" || k.starts_with("base-")),
        "only the head and range bases remain: {now:?}"
    );
    let (head, snap) = st.load(&r).await.unwrap();
    assert_eq!(head.doc.format, HEAD_FORMAT);
    assert!(head.doc.base.is_empty() && head.doc.segments.is_empty());
    assert_eq!(head.doc.ranges.iter().map(|r| r.users).sum::<u64>(), 40);
    assert!(head.was_applied(&format!("{SOURCE}#e1")));
    assert!(head.is_stale(Some("2024-05-01T12:00:00Z")));

    // Still nothing to resend; a changed user sends only its change; a departed member of
    // the audience is still addressable (identifiers survived the rewrite).
    assert!(plan(&csv, &snap).deltas.is_empty());
    let changed: String = csv
        .lines()
        .filter(|l| !l.starts_with("u038,"))
        .map(|l| {
            if l.starts_with("u005,") {
                "u005,Renamed,15.5,5,false".to_string()
            } else {
                l.to_string()
            }
        })
        .map(|l| l + "\n")
        .collect();
    let p = plan(&changed, &snap);
    let objects: Vec<serde_json::Value> =
        p.deltas.iter().map(|d| d.to_attribute_object()).collect();
    assert_eq!(
        objects,
        vec![
            serde_json::json!({"external_id": "u005", "_update_existing_only": false, "first_name": "Renamed"}),
            serde_json::json!({"external_id": "u038", "_update_existing_only": false, "aud_winback": false}),
        ],
    );
}
