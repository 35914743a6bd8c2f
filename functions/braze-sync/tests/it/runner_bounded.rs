//! The real runner taking the bounded diff ([`braze_sync::diff::bounded`]) over an in-memory store and
//! a recording Braze: a first run lays the state out in hash ranges, a later export sends
//! exactly its changed, new and departed users and writes only range deltas, a run cut by
//! its deadline hands over without resending, and checkpoints left by a killed run are folded
//! and not resent.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use braze_sync::config::route::Route;
use braze_sync::model::{AttributeChange, Identifier, RowPos, UserDelta, fingerprint};
use braze_sync::run::handler::{ExportPlan, ExportRunner};
use braze_sync::run::runner::{Continuation, RunnerSettings, SyncRunner};
use braze_sync::send::braze::{BrazeApi, TrackError, TrackResponse};
use braze_sync::state::confirmed::stored_fp;
use braze_sync::state::store::StateStore;
use bridge_shared::S3Uri;
use bridge_shared::object_store::{MemoryStore, ObjectStore, PutCondition};
use bytes::Bytes;
use serde_json::{Value, json};

const ROUTE: &str = r#"
name = "people"
prefix = "in/"
update_existing_only = false
[identifier]
kind = "external_id"
column = "id"
[attributes.tier]
type = "String"
[[audiences]]
attribute = "aud_vip"
column = "vip"
"#;

/// Records every attribute object sent, after `delay`.
struct Recorder {
    delay: Duration,
    sent: Mutex<Vec<Value>>,
}

#[async_trait]
impl BrazeApi for Recorder {
    async fn track(&self, body: Bytes) -> Result<TrackResponse, TrackError> {
        tokio::time::sleep(self.delay).await;
        let v: Value = serde_json::from_slice(&body).unwrap();
        for o in v["attributes"].as_array().unwrap() {
            self.sent.lock().unwrap().push(o.clone());
        }
        Ok(common::success())
    }
}

#[derive(Default)]
struct Handovers(Mutex<u32>);

#[async_trait]
impl Continuation for Handovers {
    async fn hand_over(&self, _: &ExportPlan) -> Result<(), String> {
        *self.0.lock().unwrap() += 1;
        Ok(())
    }
}

fn route() -> Route {
    Route::from_toml(ROUTE, "test").unwrap()
}

/// Users `0..n` except `gone`, tier `t<i>` (or `changed` for ids in `changed`), vip for every
/// third, plus `new` new users.
fn csv(n: u32, changed: &[u32], gone: &[u32], new: u32) -> Bytes {
    let mut s = String::from("id,tier,vip\n");
    for i in 0..n {
        if gone.contains(&i) {
            continue;
        }
        let tier = if changed.contains(&i) {
            "changed".to_string()
        } else {
            format!("t{i}")
        };
        s.push_str(&format!("u{i},{tier},{}\n", i % 3 == 0));
    }
    for j in 0..new {
        s.push_str(&format!("n{j},fresh,false\n"));
    }
    Bytes::from(s)
}

async fn plan(store: &MemoryStore, key: &str, body: Bytes) -> ExportPlan {
    let uri = S3Uri::new("exports", key);
    let meta = store
        .put(&uri, body, PutCondition::None, BTreeMap::new())
        .await
        .unwrap();
    ExportPlan {
        route: "people".into(),
        trigger: uri.clone(),
        export_id: format!("{uri}#{}", meta.etag),
        trigger_meta: meta.clone(),
        parts: vec![meta],
        force_full: false,
        allow_departures: false,
        forced_salt: None,
    }
}

fn runner(
    store: &Arc<MemoryStore>,
    braze: &Arc<Recorder>,
    max_run: Option<Duration>,
    handovers: &Arc<Handovers>,
    spill: &std::path::Path,
) -> SyncRunner {
    runner_with(store, braze, max_run, handovers, spill, |_| {})
}

fn runner_with(
    store: &Arc<MemoryStore>,
    braze: &Arc<Recorder>,
    max_run: Option<Duration>,
    handovers: &Arc<Handovers>,
    spill: &std::path::Path,
    tune: impl FnOnce(&mut RunnerSettings),
) -> SyncRunner {
    let mut settings = RunnerSettings::new("state", "s/", "r/", "x/");
    settings.max_run = max_run;
    settings.checkpoint_every = Duration::from_millis(20);
    settings.deliver.max_objects = 50;
    settings.deliver.in_flight_grace = Duration::from_millis(0);
    settings.deliver.max_in_flight = 1;
    settings.bounded_min_users = 0;
    settings.state_range_users = 64;
    settings.diff_workers = 2;
    settings.spill_dir = spill.to_path_buf();
    tune(&mut settings);
    SyncRunner::new(
        store.clone(),
        vec![route()],
        braze.clone(),
        settings,
        Some(handovers.clone() as Arc<dyn Continuation>),
    )
}

fn state(store: &Arc<MemoryStore>) -> StateStore {
    StateStore::new(store.clone(), "state", "s/", "people").with_range_users(64)
}

fn ids(sent: &[Value]) -> BTreeSet<String> {
    sent.iter()
        .map(|o| o["external_id"].as_str().unwrap().to_string())
        .collect()
}

fn tier_fp(v: &str) -> Option<u64> {
    Some(stored_fp(fingerprint(&json!(v))))
}

#[tokio::test]
async fn a_big_route_diffs_range_by_range_and_commits_only_range_deltas() {
    let store = Arc::new(MemoryStore::new());
    let spill = tempfile::tempdir().unwrap();
    let braze = Arc::new(Recorder {
        delay: Duration::ZERO,
        sent: Mutex::new(Vec::new()),
    });
    let h = Arc::new(Handovers::default());
    let r = runner(&store, &braze, None, &h, spill.path());
    let p1 = plan(&store, "in/a.csv", csv(2000, &[], &[], 0)).await;
    assert!(r.run(&p1, None).await.unwrap().complete());
    assert_eq!(braze.sent.lock().unwrap().len(), 2000);
    let (head, snap) = state(&store).load(&route()).await.unwrap();
    assert_eq!(snap.len(), 2000);
    assert_eq!(head.doc.ranges.len(), 32, "2,000 users at 64 per range");
    let bases: Vec<Option<String>> = head.doc.ranges.iter().map(|r| r.base.clone()).collect();
    braze.sent.lock().unwrap().clear();

    // 2% changed, 0.5% gone (vip members among them leave the audience), 10 new.
    let changed: Vec<u32> = (0..40).map(|i| i * 50 + 1).collect();
    let gone: Vec<u32> = (0..10).map(|i| i * 200 + 3).collect();
    let p2 = plan(&store, "in/b.csv", csv(2000, &changed, &gone, 10)).await;
    assert!(r.run(&p2, None).await.unwrap().complete());
    let sent = braze.sent.lock().unwrap().clone();
    let mut want: BTreeSet<String> = changed.iter().map(|i| format!("u{i}")).collect();
    want.extend((0..10).map(|j| format!("n{j}")));
    want.extend(gone.iter().filter(|i| *i % 3 == 0).map(|i| format!("u{i}")));
    assert_eq!(
        ids(&sent),
        want,
        "exactly the changed, new and departed users"
    );
    let departed: Vec<&Value> = sent.iter().filter(|o| o.get("aud_vip").is_some()).collect();
    assert!(departed.iter().all(|o| o["aud_vip"] == json!(false)));
    let (head, snap) = state(&store).load(&route()).await.unwrap();
    assert_eq!(snap.len(), 2010);
    assert_eq!(head.doc.users, 2010);
    let k = |id: &str| Identifier::ExternalId(id.into()).user_key();
    assert_eq!(snap.get(k("u1")).unwrap().fp(0), tier_fp("changed"));
    assert_eq!(snap.get(k("n3")).unwrap().fp(0), tier_fp("fresh"));
    // Every base kept: the commit wrote range deltas only (each under a quarter of its base).
    let now: Vec<Option<String>> = head.doc.ranges.iter().map(|r| r.base.clone()).collect();
    assert_eq!(now, bases);
    assert!(head.doc.ranges.iter().any(|r| !r.deltas.is_empty()));
    // The same export again sends nothing.
    braze.sent.lock().unwrap().clear();
    let p3 = plan(&store, "in/c.csv", csv(2000, &changed, &gone, 10)).await;
    assert!(r.run(&p3, None).await.unwrap().complete());
    assert!(braze.sent.lock().unwrap().is_empty());
    assert_eq!(
        std::fs::read_dir(spill.path()).unwrap().count(),
        0,
        "spill folders removed"
    );
}

#[tokio::test]
async fn a_cut_run_hands_over_and_a_killed_runs_checkpoints_are_not_resent() {
    let store = Arc::new(MemoryStore::new());
    let spill = tempfile::tempdir().unwrap();
    let h = Arc::new(Handovers::default());
    let slow = Arc::new(Recorder {
        delay: Duration::from_millis(150),
        sent: Mutex::new(Vec::new()),
    });
    // Cut by its deadline: some users confirmed, the rest handed over.
    let p1 = plan(&store, "in/a.csv", csv(1000, &[], &[], 0)).await;
    let out = runner(
        &store,
        &slow,
        Some(Duration::from_millis(1500)),
        &h,
        spill.path(),
    )
    .run(&p1, None)
    .await
    .unwrap();
    assert!(!out.complete() && out.hand_over, "{:?}", out.status);
    let first = ids(&slow.sent.lock().unwrap());
    assert!(!first.is_empty() && first.len() < 1000, "{}", first.len());
    // A killed run left checkpoint segments (confirmed, never committed): u990..u999.
    let st = state(&store);
    let (mut head, _) = st.load(&route()).await.unwrap();
    let confirmed: Vec<UserDelta> = (990..1000)
        .map(|i| UserDelta {
            identifier: Identifier::ExternalId(format!("u{i}")),
            pos: RowPos::default(),
            changes: vec![
                AttributeChange {
                    name: "tier".into(),
                    value: json!(format!("t{i}")),
                    fingerprint: Some(fingerprint(&json!(format!("t{i}")))),
                },
                AttributeChange {
                    name: "aud_vip".into(),
                    value: json!(i % 3 == 0),
                    fingerprint: Some(fingerprint(&json!(i % 3 == 0))),
                },
            ],
            update_existing_only: false,
            is_new: true,
            row_digest: None,
        })
        .collect();
    st.checkpoint(&mut head, &route(), &confirmed)
        .await
        .unwrap();
    assert_eq!(head.doc.segments.len(), 1);
    // The next run finishes the export without resending either.
    let fast = Arc::new(Recorder {
        delay: Duration::ZERO,
        sent: Mutex::new(Vec::new()),
    });
    let out = runner(&store, &fast, None, &h, spill.path())
        .run(&p1, None)
        .await
        .unwrap();
    assert!(out.complete(), "{:?}", out.status);
    let second = ids(&fast.sent.lock().unwrap());
    assert!(first.is_disjoint(&second), "nothing confirmed is resent");
    assert!((990..1000).all(|i| !second.contains(&format!("u{i}"))));
    let mut all = first.clone();
    all.extend(second.iter().cloned());
    all.extend((990..1000).map(|i| format!("u{i}")));
    assert_eq!(all.len(), 1000, "every user confirmed once");
    let (head, snap) = st.load(&route()).await.unwrap();
    assert_eq!(snap.len(), 1000);
    assert!(head.doc.segments.is_empty());
    assert!(head.doc.watermark.is_some());
}

/// A head of `users` users in `1 << bits` ranges (no objects: only the sizes matter here).
async fn big_head(store: &MemoryStore, users: u64, bits: u32) {
    let per = users >> bits;
    let ranges: Vec<Value> = (0..1u64 << bits)
        .map(|_| json!({"users": per, "bytes": 0, "delta_bytes": 0}))
        .collect();
    let head = json!({"format": 2, "route": "people", "generation": 3, "users": users,
        "range_bits": bits, "ranges": ranges,
        "segments": [], "applied_exports": [], "updated_at": "2026-11-30T00:00:00Z"});
    store
        .put(
            &S3Uri::new("state", "s/people/head.json"),
            Bytes::from(head.to_string()),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
}

#[tokio::test]
async fn the_memory_check_of_a_bounded_run_counts_one_range_per_worker_not_the_route() {
    use braze_sync::run::handler::RunError;
    let spill = tempfile::tempdir().unwrap();
    let h = Arc::new(Handovers::default());
    let braze = Arc::new(Recorder {
        delay: Duration::ZERO,
        sent: Mutex::new(Vec::new()),
    });
    // 50M users in 256 ranges: the whole state would need ~7 GB, one range ~27 MB.
    let store = Arc::new(MemoryStore::new());
    big_head(&store, 50_000_000, 8).await;
    let mut settings = RunnerSettings::new("state", "s/", "r/", "x/");
    settings.memory_limit_bytes = Some(1024 << 20);
    settings.spill_dir = spill.path().to_path_buf();
    let r = SyncRunner::new(
        store.clone(),
        vec![route()],
        braze.clone(),
        settings,
        Some(h.clone() as Arc<dyn Continuation>),
    );
    let p = plan(&store, "in/a.csv", csv(10, &[], &[], 0)).await;
    let out = r.run(&p, None).await.unwrap();
    assert!(out.complete(), "{:?}", out.status);
    assert_eq!(braze.sent.lock().unwrap().len(), 10);
    // The same route in one range does not fit: refused before sending, naming the sizes.
    let store = Arc::new(MemoryStore::new());
    big_head(&store, 50_000_000, 0).await;
    let mut settings = RunnerSettings::new("state", "s/", "r/", "x/");
    settings.memory_limit_bytes = Some(1024 << 20);
    settings.spill_dir = spill.path().to_path_buf();
    let r = SyncRunner::new(store.clone(), vec![route()], braze.clone(), settings, None);
    let p = plan(&store, "in/a.csv", csv(10, &[], &[], 0)).await;
    let err = r.run(&p, None).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RunError::Permanent { .. }), "{text}");
    assert!(
        text.contains("50000000 users")
            && text.contains("largest state range")
            && text.contains("MemorySize"),
        "{text}"
    );
}

async fn report(store: &MemoryStore, uri: &str) -> Value {
    let uri: S3Uri = uri.parse().unwrap();
    let (_, body) = store.get(&uri).await.unwrap();
    serde_json::from_slice(&body).unwrap()
}

/// Row digests through the real runner: an export whose cells changed but whose values did
/// not (`TRUE` for `true`) sends nothing, and its users' new row digests are recorded with
/// the checkpoints (`digests_recorded`); the same export again records none.
#[tokio::test]
async fn rows_with_the_same_values_in_other_cells_send_nothing_and_record_their_digest() {
    let store = Arc::new(MemoryStore::new());
    let spill = tempfile::tempdir().unwrap();
    let braze = Arc::new(Recorder {
        delay: Duration::ZERO,
        sent: Mutex::new(Vec::new()),
    });
    let h = Arc::new(Handovers::default());
    // Checkpoints by count, not time: recorded digests are not paced by Braze, so the
    // committer persists every 100 of them instead of holding them all until its timer.
    let r = runner_with(&store, &braze, None, &h, spill.path(), |s| {
        s.checkpoint_every = Duration::from_secs(3600);
        s.checkpoint_max_users = 100;
    });
    let p1 = plan(&store, "in/a.csv", csv(600, &[], &[], 0)).await;
    assert!(r.run(&p1, None).await.unwrap().complete());
    assert_eq!(braze.sent.lock().unwrap().len(), 600);
    braze.sent.lock().unwrap().clear();
    let shouted = String::from_utf8(csv(600, &[], &[], 0).to_vec())
        .unwrap()
        .replace(",true", ",TRUE")
        .replace(",false", ",FALSE");
    // Every row's cells changed ("true" → "TRUE", "false" → "FALSE"), no value did.
    for (key, recorded) in [("in/b.csv", 600), ("in/c.csv", 0)] {
        let p = plan(&store, key, Bytes::from(shouted.clone())).await;
        let out = r.run(&p, None).await.unwrap();
        assert!(out.complete(), "{:?}", out.summary);
        assert!(braze.sent.lock().unwrap().is_empty(), "nothing sent");
        let rep = report(&store, out.report.as_deref().unwrap()).await;
        assert_eq!(rep["unchanged"], json!(600), "{rep}");
        assert_eq!(rep["users_sent"], json!(0), "{rep}");
        assert_eq!(rep["users_confirmed"], json!(0), "{rep}");
        assert_eq!(rep["digests_recorded"], json!(recorded), "{key}: {rep}");
        let checkpoints = out.summary["checkpoints"].as_u64().unwrap();
        assert!(
            checkpoints >= recorded / 100,
            "{key}: {checkpoints} checkpoints for {recorded} recorded"
        );
    }
}

#[tokio::test]
async fn a_forced_replay_cut_by_its_deadline_goes_on_where_it_stopped() {
    let store = Arc::new(MemoryStore::new());
    let spill = tempfile::tempdir().unwrap();
    let h = Arc::new(Handovers::default());
    let fast = Arc::new(Recorder {
        delay: Duration::ZERO,
        sent: Mutex::new(Vec::new()),
    });
    let p = plan(&store, "in/a.csv", csv(1000, &[], &[], 0)).await;
    let out = runner(&store, &fast, None, &h, spill.path())
        .run(&p, None)
        .await
        .unwrap();
    assert!(out.complete(), "{:?}", out.status);
    // Replayed by force (object metadata), cut by its deadline: it hands over.
    let forced = ExportPlan {
        force_full: true,
        forced_salt: Some(7),
        ..p
    };
    let slow = Arc::new(Recorder {
        delay: Duration::from_millis(150),
        sent: Mutex::new(Vec::new()),
    });
    let out = runner(
        &store,
        &slow,
        Some(Duration::from_millis(1500)),
        &h,
        spill.path(),
    )
    .run(&forced, None)
    .await
    .unwrap();
    assert!(!out.complete() && out.hand_over, "{:?}", out.status);
    let first = slow.sent.lock().unwrap().len();
    assert!(first > 0 && first < 1000, "{first}");
    // Its continuation resends only the users the first run did not.
    let again = Arc::new(Recorder {
        delay: Duration::ZERO,
        sent: Mutex::new(Vec::new()),
    });
    let out = runner(&store, &again, None, &h, spill.path())
        .run(&forced, None)
        .await
        .unwrap();
    assert!(out.complete(), "{:?}", out.status);
    let (a, b) = (
        ids(&slow.sent.lock().unwrap()),
        ids(&again.sent.lock().unwrap()),
    );
    assert!(a.is_disjoint(&b), "nothing the first run resent is resent");
    assert_eq!(
        first + again.sent.lock().unwrap().len(),
        1000,
        "every user resent once"
    );
}
