//! Fan-out across invocations, in process: the real handler and runner over an in-memory
//! store and a fake Braze that applies every attribute object to per-user profiles. An export
//! forced into 4 pieces (`fan_out_pieces`), whose piece messages the test delivers itself
//! (one piece killed midway and redelivered, one delivered twice), ends with exactly the
//! profiles a single-invocation run of the same export gives on the same starting state (its
//! finalizer killed midway and redelivered too); the
//! route head holds the same users and the export's watermark, no control object is left,
//! the route lock is released, the export's ledger entry is complete, a replay while the
//! pieces run is a duplicate, and departures are judged on the export's totals (a share one piece
//! alone would hold is sent).
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use braze_sync::config::route::Route;
use braze_sync::model::Identifier;
use braze_sync::run::handler::{ExportPlan, Handler, HandlerConfig};
use braze_sync::run::runner::fan_out::spans;
use braze_sync::run::runner::{Continuation, PieceMessage, RunnerSettings, SyncRunner};
use braze_sync::send::braze::{BrazeApi, TrackError, TrackResponse};
use braze_sync::state::confirmed::range_of;
use braze_sync::state::route_lock::{lock_uri, read_lock};
use braze_sync::state::store::StateStore;
use bridge_shared::S3Uri;
use bridge_shared::lossy_store::LossyStore;
use bridge_shared::object_store::{MemoryStore, ObjectStore, PutCondition};
use bytes::Bytes;
use serde_json::{Map, Value, json};

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
max_departure_share = 0.1
"#;

type Profiles = BTreeMap<String, Map<String, Value>>;

/// Applies every attribute object to its user's profile. Armed, it hangs every request after
/// `budget` more (a Lambda that dies mid-piece).
#[derive(Default)]
struct Braze {
    profiles: Mutex<Profiles>,
    requests: AtomicU64,
    /// Attribute objects received (one per user sent).
    objects: AtomicU64,
    armed: AtomicBool,
    budget: AtomicU64,
    /// Hang at the first departure (an object with `aud_vip` and no `tier`: only the
    /// finalizer sends those).
    hang_on_departure: AtomicBool,
    /// Milliseconds each request takes.
    delay_ms: AtomicU64,
    /// Holds the next departure request until `release` (a finalizer alive but slow),
    /// telling `holding` once it is held.
    hold_departure: AtomicBool,
    holding: tokio::sync::Notify,
    release: tokio::sync::Notify,
}

#[async_trait]
impl BrazeApi for Braze {
    async fn track(&self, body: Bytes) -> Result<TrackResponse, TrackError> {
        if self.armed.load(Ordering::SeqCst) {
            if self.budget.load(Ordering::SeqCst) == 0 {
                std::future::pending::<()>().await;
            }
            self.budget.fetch_sub(1, Ordering::SeqCst);
        }
        let delay = self.delay_ms.load(Ordering::SeqCst);
        if delay > 0 {
            tokio::time::sleep(Duration::from_millis(delay)).await;
        }
        let v: Value = serde_json::from_slice(&body).unwrap();
        let departure = v["attributes"]
            .as_array()
            .unwrap()
            .iter()
            .any(|o| o.get("aud_vip").is_some() && o.get("tier").is_none());
        if departure && self.hang_on_departure.load(Ordering::SeqCst) {
            std::future::pending::<()>().await;
        }
        if departure && self.hold_departure.swap(false, Ordering::SeqCst) {
            self.holding.notify_one();
            self.release.notified().await;
        }
        self.requests.fetch_add(1, Ordering::SeqCst);
        let mut profiles = self.profiles.lock().unwrap();
        for o in v["attributes"].as_array().unwrap() {
            self.objects.fetch_add(1, Ordering::SeqCst);
            let id = o["external_id"].as_str().unwrap().to_string();
            let p = profiles.entry(id).or_default();
            for (k, val) in o.as_object().unwrap() {
                if k == "external_id" || k.starts_with('_') {
                    continue;
                }
                if val.is_null() {
                    p.remove(k);
                } else {
                    p.insert(k.clone(), val.clone());
                }
            }
        }
        Ok(common::success())
    }
}

/// A store, a fake Braze and the function's queue: one deployment.
#[derive(Default)]
struct Bed {
    store: Arc<MemoryStore>,
    braze: Arc<Braze>,
    queue: Arc<Queue>,
}

/// The function's own queue: collects what the runner queues.
#[derive(Default)]
struct Queue {
    pieces: Mutex<Vec<PieceMessage>>,
    handovers: Mutex<u32>,
    /// Refuses every piece message once it holds this many (SQS unavailable).
    full_at: Mutex<Option<usize>>,
}

#[async_trait]
impl Continuation for Queue {
    async fn hand_over(&self, _: &ExportPlan) -> Result<(), String> {
        *self.handovers.lock().unwrap() += 1;
        Ok(())
    }

    async fn queue_piece(&self, piece: &PieceMessage) -> Result<(), String> {
        let mut pieces = self.pieces.lock().unwrap();
        if Some(pieces.len()) == *self.full_at.lock().unwrap() {
            return Err("ServiceUnavailable".into());
        }
        pieces.push(piece.clone());
        Ok(())
    }
}

fn route() -> Route {
    Route::from_toml(ROUTE, "test").unwrap()
}

const N: u32 = 400;

/// Users `0..N` except `gone`; tier `changed` for even ids in `changed_evens`, else `t<i>`;
/// every user a vip member.
fn csv(changed_evens: bool, gone: &BTreeSet<u32>, new: u32) -> Bytes {
    let mut s = String::from("id,tier,vip\n");
    for i in 0..N {
        if gone.contains(&i) {
            continue;
        }
        let tier = if changed_evens && i % 2 == 0 {
            "changed".to_string()
        } else {
            format!("t{i}")
        };
        s.push_str(&format!("u{i},{tier},true\n"));
    }
    for j in 0..new {
        s.push_str(&format!("n{j},fresh,false\n"));
    }
    Bytes::from(s)
}

fn handler(
    store: &Arc<MemoryStore>,
    braze: &Arc<Braze>,
    queue: &Arc<Queue>,
    spill: &std::path::Path,
    pieces: Option<usize>,
) -> Handler {
    handler_limited(store, braze, Some(queue), spill, pieces, None)
}

/// [`handler`] with a spill limit (`None`: the default) and an optional queue (`None`: the
/// CLI, which cannot fan out).
fn handler_limited(
    store: &Arc<MemoryStore>,
    braze: &Arc<Braze>,
    queue: Option<&Arc<Queue>>,
    spill: &std::path::Path,
    pieces: Option<usize>,
    spill_limit: Option<u64>,
) -> Handler {
    handler_on(store.clone(), braze, queue, spill, pieces, spill_limit)
}

/// [`handler_limited`] over any store (a faulty one).
fn handler_on(
    store: Arc<dyn ObjectStore>,
    braze: &Arc<Braze>,
    queue: Option<&Arc<Queue>>,
    spill: &std::path::Path,
    pieces: Option<usize>,
    spill_limit: Option<u64>,
) -> Handler {
    let mut settings = RunnerSettings::new("state", "s/", "r/", "x/");
    settings.checkpoint_every = Duration::from_millis(20);
    settings.deliver.max_objects = 5;
    settings.deliver.in_flight_grace = Duration::from_millis(0);
    settings.deliver.max_in_flight = 1;
    settings.bounded_min_users = 0;
    settings.state_range_users = 64;
    settings.diff_workers = 2;
    settings.spill_dir = spill.to_path_buf();
    settings.fan_out_pieces = pieces;
    if spill_limit.is_some() {
        settings.spill_limit_bytes = spill_limit;
    }
    let runner = SyncRunner::new(
        store.clone(),
        vec![route()],
        braze.clone(),
        settings,
        queue.map(|q| q.clone() as Arc<dyn Continuation>),
    );
    let cfg = HandlerConfig {
        state_bucket: "state".into(),
        output_prefixes: vec!["s/".into(), "r/".into(), "x/".into()],
        state_prefix: "s/".into(),
        reports_prefix: "r/".into(),
        routes: vec![route().binding()],
        lease_s: 60,
    };
    Handler::new(cfg, store, Arc::new(runner))
}

async fn put(store: &MemoryStore, key: &str, body: Bytes) {
    store
        .put(
            &S3Uri::new("exports", key),
            body,
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
}

fn s3_event(key: &str) -> Value {
    json!({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": "exports"}, "object": {"key": key}}}]})
}

fn sqs(msg: &PieceMessage, id: &str) -> Value {
    json!({"Records": [{"messageId": id, "receiptHandle": "r", "body": msg.body(),
        "eventSource": "aws:sqs", "eventSourceARN": "arn:aws:sqs:us-east-1:1:q", "awsRegion": "us-east-1"}]})
}

fn state(store: &Arc<MemoryStore>) -> StateStore {
    StateStore::new(store.clone(), "state", "s/", "people").with_range_users(64)
}

/// Time left (ms) that puts an invocation at its deadline margin from the start.
fn at_deadline() -> u64 {
    braze_sync::run::runner::deadline::MARGIN_FLOOR.as_millis() as u64
}

async fn sync(h: &Handler, key: &str) -> Value {
    h.handle(&s3_event(key), None).await.unwrap()
}

/// The outcome word of a one-object result.
fn outcome(v: &Value) -> String {
    v["results"][0]["outcome"]
        .as_str()
        .unwrap_or("")
        .to_string()
}

#[tokio::test]
async fn an_export_in_four_pieces_ends_as_a_single_run_with_one_piece_killed_and_retried() {
    // The reference: a single invocation per export, on its own store.
    let one_store = Arc::new(MemoryStore::new());
    let one_braze = Arc::new(Braze::default());
    let one_queue = Arc::new(Queue::default());
    let spill = tempfile::tempdir().unwrap();
    let one = handler(&one_store, &one_braze, &one_queue, spill.path(), None);
    put(&one_store, "in/e1.csv", csv(false, &BTreeSet::new(), 0)).await;
    assert_eq!(outcome(&sync(&one, "in/e1.csv").await), "synced");

    // The same starting state on the fan-out's store.
    let Bed {
        store,
        braze,
        queue,
    } = Bed::default();
    let single = first_synced(&store, &braze, &queue, spill.path()).await;
    let head = state(&store).read_head().await.unwrap();
    assert_eq!(head.doc.users, u64::from(N));

    // The second export: half the users changed, 8 new, and 7% of the audience gone, all of
    // it from the first piece's ranges (so that piece alone would see a share above the
    // audience's 10% cap; on the export's totals it is below).
    let bits = head.doc.range_bits;
    let first_span = spans(head.doc.ranges.len(), 4)[0].clone();
    let gone: BTreeSet<u32> = (0..N)
        .filter(|i| {
            let k = Identifier::ExternalId(format!("u{i}")).user_key();
            first_span.contains(&range_of(k.0, bits))
        })
        .take((N as usize) * 7 / 100)
        .collect();
    assert_eq!(gone.len(), 28, "enough users in the first piece's ranges");
    let e2 = csv(true, &gone, 8);
    put(&one_store, "in/e2.csv", e2.clone()).await;
    assert_eq!(outcome(&sync(&one, "in/e2.csv").await), "synced");
    put(&store, "in/e2.csv", e2).await;

    // The coordinator: forced into 4 pieces, queued on the function's own queue.
    let fan = handler(&store, &braze, &queue, spill.path(), Some(4));
    let before = braze.requests.load(Ordering::SeqCst);
    let out = sync(&fan, "in/e2.csv").await;
    assert_eq!(outcome(&out), "fanned_out", "{out}");
    assert_eq!(
        braze.requests.load(Ordering::SeqCst),
        before,
        "the coordinator sends nothing"
    );
    let msgs = queue.pieces.lock().unwrap().clone();
    assert_eq!(msgs.len(), 4);
    let run_id = msgs[0].run_id.clone();
    assert!(
        msgs.iter()
            .enumerate()
            .all(|(k, m)| m.piece == k && m.run_id == run_id)
    );
    let coordinated = head_etag(&store).await;
    let lock = lock_uri("state", "s/", "people");
    let held = read_lock(store.as_ref(), &lock).await.unwrap().unwrap();
    assert!(
        held.holder == run_id && !held.released,
        "the fan-out keeps the route lock"
    );

    // A replay of the same export while the pieces run is a duplicate: the fan-out owns the
    // export (no second fan-out).
    let replay = sync(&fan, "in/e2.csv").await;
    assert_eq!(outcome(&replay), "duplicate_while_running", "{replay}");
    assert_eq!(queue.pieces.lock().unwrap().len(), 4);

    // Piece 1 dies after 3 requests (its Lambda is gone: the invocation never returns).
    braze.budget.store(3, Ordering::SeqCst);
    braze.armed.store(true, Ordering::SeqCst);
    let killed = tokio::time::timeout(
        Duration::from_secs(3),
        fan.handle(&sqs(&msgs[1], "m1"), None),
    )
    .await;
    assert!(killed.is_err(), "the killed piece never finished");
    braze.armed.store(false, Ordering::SeqCst);
    // Its checkpoints are on its fork: the route head has not moved.
    assert_eq!(head_etag(&store).await, coordinated);
    let fork = state(&store).fork(&format!("_fan_out/{run_id}/p001"));
    let fork_head = fork.read_head().await.unwrap();
    assert!(
        !fork_head.doc.segments.is_empty(),
        "the killed piece checkpointed what Braze confirmed"
    );

    // Pieces 0 and 2 run; piece 2 is delivered twice (the duplicate is a no-op).
    for k in [0, 2] {
        let r = fan.handle(&sqs(&msgs[k], "m"), None).await.unwrap();
        assert_eq!(r["batchItemFailures"], json!([]), "{r}");
        assert_eq!(r["results"][0]["outcome"], "piece_done", "{r}");
    }
    let sent = braze.requests.load(Ordering::SeqCst);
    let dup = fan.handle(&sqs(&msgs[2], "m2b"), None).await.unwrap();
    assert_eq!(dup["results"][0]["outcome"], "piece_done", "{dup}");
    assert_eq!(
        braze.requests.load(Ordering::SeqCst),
        sent,
        "a duplicate piece sends nothing"
    );

    // `status` shows the fan-out at work: 2 of 4 pieces done.
    let at = braze_sync::ops::status::StatusLocation {
        bucket: "state".into(),
        state_prefix: "s/".into(),
        reports_prefix: "r/".into(),
    };
    let now = chrono::Utc::now().timestamp_millis();
    let st = braze_sync::ops::status::read_route_status(store.clone(), &at, &route(), now)
        .await
        .unwrap();
    assert_eq!(st.fan_outs.len(), 1, "{:?}", st.fan_outs);
    assert_eq!((st.fan_outs[0].pieces, st.fan_outs[0].pieces_done), (4, 2));
    assert_eq!(st.lease.unwrap().holder, run_id);

    // Piece 1 redelivered once the killed attempt's claim ran out: it resumes from its own
    // checkpoints. Then piece 3, the last one, finalizes.
    expire_attempt(&store, &run_id, 1).await;
    let r = fan.handle(&sqs(&msgs[1], "m1b"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "piece_done", "{r}");
    // The finalizer dies while sending the departures, after merging the forks.
    braze.hang_on_departure.store(true, Ordering::SeqCst);
    let killed = tokio::time::timeout(
        Duration::from_secs(3),
        fan.handle(&sqs(&msgs[3], "m3"), None),
    )
    .await;
    assert!(killed.is_err(), "the killed finalizer never finished");
    braze.hang_on_departure.store(false, Ordering::SeqCst);
    let fin = S3Uri::new("state", format!("s/people/_fan_out/{run_id}/final.json"));
    let (_, body) = store.get(&fin).await.unwrap();
    let fin: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(
        fin,
        json!({"finalizer": 3, "merged": true, "concluded": false})
    );
    let held = read_lock(store.as_ref(), &lock).await.unwrap().unwrap();
    assert!(
        held.holder == run_id && !held.released,
        "still the fan-out's"
    );
    // Its message, redelivered once the killed attempt's claim ran out, finishes the fan-out
    // (the merge is not redone).
    expire_attempt(&store, &run_id, 3).await;
    let r = fan.handle(&sqs(&msgs[3], "m3b"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "fan_out_finished", "{r}");
    assert_eq!(r["results"][0]["status"], "complete", "{r}");

    // Exactly the profiles of the single-invocation run.
    let got = braze.profiles.lock().unwrap().clone();
    let want = one_braze.profiles.lock().unwrap().clone();
    assert_eq!(got.len(), want.len());
    assert_eq!(got, want);
    for i in &gone {
        assert_eq!(
            got[&format!("u{i}")]["aud_vip"],
            json!(false),
            "u{i} departed"
        );
    }
    // The route head: the same users, the export's watermark.
    let h = state(&store).read_head().await.unwrap();
    let h1 = state(&one_store).read_head().await.unwrap();
    assert_eq!(h.doc.users, h1.doc.users);
    assert_eq!(h.doc.users, u64::from(N) + 8);
    let w = h.doc.watermark.clone().unwrap();
    assert!(w.export_id.starts_with("s3://exports/in/e2.csv#"), "{w:?}");
    assert!(h.doc.segments.is_empty());
    // Departures judged on the totals: all 28 sent, none held.
    let report_uri = r["results"][0]["report"].as_str().unwrap();
    let (_, body) = store
        .get(&report_uri.parse::<S3Uri>().unwrap())
        .await
        .unwrap();
    let report: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(report["departures_sent"], 28, "{report}");
    assert_eq!(report["departures_held"], 0, "{report}");
    assert_eq!(report["fan_out"]["pieces"], 4);
    assert!(report["duration_s"].as_f64().unwrap() > 0.0, "{report}");
    assert_eq!(report["rows_in"], u64::from(N) - 28 + 8, "{report}");
    // No control object left; what is left under _fan_out/ is state the head references.
    let referenced: BTreeSet<String> = h
        .doc
        .ranges
        .iter()
        .flat_map(|r| r.base.iter().chain(r.deltas.iter()).cloned())
        .collect();
    let left = store.list("state", "s/people/_fan_out/").await.unwrap();
    for o in &left {
        let name = o.key.strip_prefix("s/people/").unwrap();
        assert!(referenced.contains(name), "{name} is left over");
    }
    // The route lock is released, the ledger says complete, a late piece is a no-op.
    let l = read_lock(store.as_ref(), &lock).await.unwrap().unwrap();
    assert!(l.released);
    let st = braze_sync::ops::status::read_route_status(store.clone(), &at, &route(), now)
        .await
        .unwrap();
    assert!(st.fan_outs.is_empty(), "{:?}", st.fan_outs);
    assert_eq!(outcome(&sync(&fan, "in/e2.csv").await), "duplicate_no_op");
    let late = fan.handle(&sqs(&msgs[0], "late"), None).await.unwrap();
    assert_eq!(late["results"][0]["outcome"], "fan_out_over", "{late}");
    assert_eq!(*queue.handovers.lock().unwrap(), 0);
    // And the state reads back like the single run's: a third identical export sends nothing.
    let sent = braze.requests.load(Ordering::SeqCst);
    put(&store, "in/e3.csv", csv(true, &gone, 8)).await;
    assert_eq!(outcome(&sync(&single, "in/e3.csv").await), "synced");
    assert_eq!(braze.requests.load(Ordering::SeqCst), sent);
}

/// Makes the route lock `holder`'s with its lease run out (its invocations died); returns
/// the lock's address.
async fn expire_lock(store: &MemoryStore, holder: &str) -> S3Uri {
    let lock = lock_uri("state", "s/", "people");
    let dead = json!({"holder": holder, "lease_until_ms": 0, "released": false});
    store
        .put(
            &lock,
            Bytes::from(dead.to_string()),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
    lock
}

/// Makes the attempt claim of `piece` of fan-out `run_id` run out (its attempt was killed, and
/// its lease ended before SQS delivered the message again).
async fn expire_attempt(store: &MemoryStore, run_id: &str, piece: usize) {
    let uri = S3Uri::new(
        "state",
        format!("s/people/_fan_out/{run_id}/p{piece:03}/attempt.json"),
    );
    let (_, body) = store.get(&uri).await.unwrap();
    let mut doc: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(doc["released"], json!(false), "{doc}");
    doc["lease_until_ms"] = json!(0);
    store
        .put(
            &uri,
            Bytes::from(doc.to_string()),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
}

async fn head_etag(store: &Arc<MemoryStore>) -> Option<String> {
    state(store).read_head().await.unwrap().etag
}

/// A 2-piece fan-out of a changed export (8 new users) whose finalizer merged the forks into
/// the route head but failed to record it (a 5xx on `final.json`): the state, the handlers
/// (single, fan-out), the pieces' messages.
struct MergedUnmarked {
    store: Arc<MemoryStore>,
    braze: Arc<Braze>,
    single: Handler,
    fan: Handler,
    msgs: Vec<PieceMessage>,
    _spill: tempfile::TempDir,
}

async fn merged_unmarked() -> MergedUnmarked {
    let store = Arc::new(MemoryStore::new());
    // The finalizer's write of its `merged` mark fails with a 5xx on every attempt the
    // retrying store makes while armed (S3 throttling right after the merge's head write).
    let armed = Arc::new(std::sync::atomic::AtomicU32::new(0));
    let arm = armed.clone();
    let flaky = Arc::new(common::failing_puts(store.clone(), move |uri, body| {
        uri.key.ends_with("/final.json")
            && String::from_utf8_lossy(body).contains("\"merged\":true")
            && arm
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1))
                .is_ok()
    }));
    let braze = Arc::new(Braze::default());
    let queue = Arc::new(Queue::default());
    let spill = tempfile::tempdir().unwrap();
    let single = handler_on(
        flaky.clone(),
        &braze,
        Some(&queue),
        spill.path(),
        None,
        None,
    );
    put(&store, "in/e1.csv", csv(false, &BTreeSet::new(), 0)).await;
    assert_eq!(outcome(&sync(&single, "in/e1.csv").await), "synced");

    let fan = handler_on(
        flaky.clone(),
        &braze,
        Some(&queue),
        spill.path(),
        Some(2),
        None,
    );
    put(&store, "in/e2.csv", csv(true, &BTreeSet::new(), 8)).await;
    assert_eq!(outcome(&sync(&fan, "in/e2.csv").await), "fanned_out");
    let msgs = queue.pieces.lock().unwrap().clone();
    let r = fan.handle(&sqs(&msgs[0], "m0"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "piece_done", "{r}");
    // The last piece merges the forks into the route head, then its write of the `merged`
    // mark meets a 5xx: the message is retried.
    armed.store(braze_sync::state::retrying::ATTEMPTS, Ordering::SeqCst);
    let r = fan.handle(&sqs(&msgs[1], "m1"), None).await.unwrap();
    assert_eq!(r["batchItemFailures"].as_array().unwrap().len(), 1, "{r}");
    assert_eq!(armed.load(Ordering::SeqCst), 0, "the mark's write failed");
    MergedUnmarked {
        store,
        braze,
        single,
        fan,
        msgs,
        _spill: spill,
    }
}

/// Every object the route head references exists.
async fn assert_head_objects_exist(store: &Arc<MemoryStore>) {
    let h = state(store).read_head().await.unwrap();
    for name in h
        .doc
        .ranges
        .iter()
        .flat_map(|r| r.base.iter().chain(r.deltas.iter()))
    {
        let uri = S3Uri::new("state", format!("s/people/{name}"));
        assert!(
            store.head(&uri).await.unwrap().is_some(),
            "{name} was deleted"
        );
    }
}

#[tokio::test]
async fn a_finalizer_that_fails_after_merging_finishes_on_redelivery_without_losing_the_merge() {
    let MergedUnmarked {
        store,
        braze,
        single,
        fan,
        msgs,
        _spill,
    } = merged_unmarked().await;
    let run_id = msgs[0].run_id.clone();
    // Redelivered, it sees the route head already is the merge and finishes the fan-out.
    let r = fan.handle(&sqs(&msgs[1], "m1b"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "fan_out_finished", "{r}");
    assert_eq!(r["results"][0]["status"], "complete", "{r}");
    // Every object the route head references exists, and it holds the export.
    let h = state(&store).read_head().await.unwrap();
    assert_eq!(h.doc.users, u64::from(N) + 8);
    assert!(
        h.doc
            .watermark
            .unwrap()
            .export_id
            .starts_with("s3://exports/in/e2.csv#")
    );
    assert_head_objects_exist(&store).await;
    assert!(
        h.doc.ranges.iter().any(|r| r
            .deltas
            .iter()
            .any(|d| d.starts_with(&format!("_fan_out/{run_id}/")))),
        "the merged head takes the forks' objects"
    );
    // The state reads back: the same export again sends nothing.
    let sent = braze.requests.load(Ordering::SeqCst);
    put(&store, "in/e3.csv", csv(true, &BTreeSet::new(), 8)).await;
    assert_eq!(outcome(&sync(&single, "in/e3.csv").await), "synced");
    assert_eq!(braze.requests.load(Ordering::SeqCst), sent);
}

#[tokio::test]
async fn a_piece_that_fails_for_good_ends_the_fan_out_and_frees_the_route() {
    let Bed {
        store,
        braze,
        queue,
    } = Bed::default();
    let spill = tempfile::tempdir().unwrap();
    first_synced(&store, &braze, &queue, spill.path()).await;
    let before = state(&store).read_head().await.unwrap();

    let fan = handler(&store, &braze, &queue, spill.path(), Some(2));
    put(&store, "in/e2.csv", csv(true, &BTreeSet::new(), 0)).await;
    assert_eq!(outcome(&sync(&fan, "in/e2.csv").await), "fanned_out");
    let msgs = queue.pieces.lock().unwrap().clone();
    assert_eq!(msgs.len(), 2);
    let run_id = msgs[0].run_id.clone();
    // Piece 1's fork head is corrupt: it cannot run, ever.
    let fork_head = S3Uri::new(
        "state",
        format!("s/people/_fan_out/{run_id}/p001/head.json"),
    );
    store
        .put(
            &fork_head,
            Bytes::from_static(b"not json"),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
    let r = fan.handle(&sqs(&msgs[1], "m1"), None).await.unwrap();
    assert_eq!(
        r["batchItemFailures"],
        json!([]),
        "acknowledged, not retried: {r}"
    );
    assert_eq!(r["results"][0]["outcome"], "failed", "{r}");
    let report_uri = r["results"][0]["report"].as_str().unwrap();
    assert_eq!(report_uri, format!("s3://state/r/people/{run_id}.json"));
    let (_, body) = store
        .get(&report_uri.parse::<S3Uri>().unwrap())
        .await
        .unwrap();
    let report: Value = serde_json::from_slice(&body).unwrap();
    assert_eq!(report["status"], "failed");
    assert!(
        report["error"].as_str().unwrap().contains("piece 1"),
        "{report}"
    );
    // The route is free, nothing is left of the fan-out, the route head never moved.
    let l = read_lock(store.as_ref(), &lock_uri("state", "s/", "people"))
        .await
        .unwrap()
        .unwrap();
    assert!(l.released);
    let left = store
        .list("state", &format!("s/people/_fan_out/{run_id}/"))
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    assert_eq!(state(&store).read_head().await.unwrap(), before);
    // The other piece, delivered later, ends at once.
    let late = fan.handle(&sqs(&msgs[0], "m0"), None).await.unwrap();
    assert_eq!(late["results"][0]["outcome"], "fan_out_over", "{late}");
    // The ledger says failed (not final): a replay of the export runs again.
    let export_id = report["export_id"].as_str().unwrap().to_string();
    let entry =
        braze_sync::state::ledger::Ledger::for_route(store.as_ref(), "state", "s/", "people")
            .entry(&export_id)
            .await
            .unwrap()
            .unwrap();
    assert_eq!(
        entry.status,
        braze_sync::state::ledger::LedgerStatus::Failed
    );
    assert_eq!(outcome(&sync(&fan, "in/e2.csv").await), "fanned_out");
    assert_eq!(queue.pieces.lock().unwrap().len(), 4);
    assert_ne!(queue.pieces.lock().unwrap()[2].run_id, run_id);
}

#[tokio::test]
async fn a_replay_takes_over_an_export_whose_fan_out_died() {
    let Bed {
        store,
        braze,
        queue,
    } = Bed::default();
    let spill = tempfile::tempdir().unwrap();
    let fan = handler(&store, &braze, &queue, spill.path(), Some(2));
    put(&store, "in/e1.csv", csv(false, &BTreeSet::new(), 0)).await;
    assert_eq!(outcome(&sync(&fan, "in/e1.csv").await), "fanned_out");
    let first = queue.pieces.lock().unwrap()[0].run_id.clone();
    // While its pieces may run, a replay is a duplicate.
    let replay = sync(&fan, "in/e1.csv").await;
    assert_eq!(outcome(&replay), "duplicate_while_running", "{replay}");
    // Its pieces never ran (lost in a DLQ) and its lease ran out.
    let lock = expire_lock(&store, &first).await;
    let out = sync(&fan, "in/e1.csv").await;
    assert_eq!(outcome(&out), "fanned_out", "{out}");
    let msgs = queue.pieces.lock().unwrap().clone();
    assert_eq!(msgs.len(), 4);
    let second = msgs[2].run_id.clone();
    assert_ne!(second, first);
    // The replay ended the dead run's fan-out before it diffed: its pieces, delivered late,
    // end at once.
    let r = fan.handle(&sqs(&msgs[0], "old"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "fan_out_over", "{r}");
    // The new run's pieces finish the export.
    for m in &msgs[2..] {
        fan.handle(&sqs(m, "new"), None).await.unwrap();
    }
    assert_eq!(braze.profiles.lock().unwrap().len(), N as usize);
    assert_eq!(outcome(&sync(&fan, "in/e1.csv").await), "duplicate_no_op");
    // The dead run's piece, redriven now the route is free: its fan-out is over, and it
    // sends nothing.
    let sent = braze.requests.load(Ordering::SeqCst);
    let r = fan.handle(&sqs(&msgs[0], "old2"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "fan_out_over", "{r}");
    assert_eq!(braze.requests.load(Ordering::SeqCst), sent);
    let left = store
        .list("state", &format!("s/people/_fan_out/{first}/"))
        .await
        .unwrap();
    assert!(left.is_empty(), "{left:?}");
    assert!(
        read_lock(store.as_ref(), &lock)
            .await
            .unwrap()
            .unwrap()
            .released
    );
    assert_eq!(outcome(&sync(&fan, "in/e1.csv").await), "duplicate_no_op");
}

/// The pieces of one export sending at once against the Braze simulator's rate limit: they
/// share the workspace limit through the sender registry, so almost no request meets a 429,
/// and the simulator ends with the profiles a single run gives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pieces_sending_at_once_share_the_workspace_limit() {
    use braze_sync::config::api_key::ApiKey;
    use braze_sync::config::braze_endpoint::Endpoint;
    use braze_sync::send::braze::{BrazeClient, ClientOptions};
    const KEY: &str = "fan-out-key";
    const LIMIT: u64 = 40;
    let limited = braze_sim::start(braze_sim::SimConfig {
        api_key: KEY.into(),
        rate_limit_requests: LIMIT,
        rate_limit_window: Duration::from_secs(1),
        ..Default::default()
    })
    .await
    .unwrap();
    let free = braze_sim::start(braze_sim::SimConfig {
        api_key: KEY.into(),
        ..Default::default()
    })
    .await
    .unwrap();
    let client = |sim: &braze_sim::SimHandle| -> Arc<dyn BrazeApi> {
        Arc::new(
            BrazeClient::new(
                Endpoint::parse(&sim.base_url()).unwrap(),
                ApiKey::new(KEY).unwrap(),
                &ClientOptions::default(),
            )
            .unwrap(),
        )
    };
    let spill = tempfile::tempdir().unwrap();
    let run = |api: Arc<dyn BrazeApi>, store: Arc<MemoryStore>, queue: Arc<Queue>, pieces| {
        let mut settings = RunnerSettings::new("state", "s/", "r/", "x/");
        settings.checkpoint_every = Duration::from_millis(200);
        settings.deliver.max_objects = 10;
        settings.deliver.rate.requests_per_window = LIMIT as u32;
        settings.deliver.rate.window = Duration::from_secs(1);
        settings.bounded_min_users = 0;
        settings.state_range_users = 64;
        settings.diff_workers = 2;
        settings.spill_dir = spill.path().to_path_buf();
        settings.fan_out_pieces = pieces;
        let runner = SyncRunner::new(store.clone(), vec![route()], api, settings, Some(queue));
        let cfg = HandlerConfig {
            state_bucket: "state".into(),
            output_prefixes: vec!["s/".into(), "r/".into(), "x/".into()],
            state_prefix: "s/".into(),
            reports_prefix: "r/".into(),
            routes: vec![route().binding()],
            lease_s: 60,
        };
        Handler::new(cfg, store, Arc::new(runner))
    };
    let mut body = String::from("id,tier,vip\n");
    for i in 0..1_200 {
        body.push_str(&format!("u{i},t{i},{}\n", i % 2 == 0));
    }
    // The single run, on a simulator without a limit.
    let one_store = Arc::new(MemoryStore::new());
    let one = run(
        client(&free),
        one_store.clone(),
        Arc::new(Queue::default()),
        None,
    );
    put(&one_store, "in/e1.csv", Bytes::from(body.clone())).await;
    assert_eq!(outcome(&sync(&one, "in/e1.csv").await), "synced");

    // The fan-out: 3 pieces delivered at once.
    let store = Arc::new(MemoryStore::new());
    let queue = Arc::new(Queue::default());
    let fan = run(client(&limited), store.clone(), queue.clone(), Some(3));
    put(&store, "in/e1.csv", Bytes::from(body)).await;
    assert_eq!(outcome(&sync(&fan, "in/e1.csv").await), "fanned_out");
    let msgs = queue.pieces.lock().unwrap().clone();
    let results = futures::future::join_all(msgs.iter().enumerate().map(|(k, m)| {
        let id = format!("m{k}");
        let fan = &fan;
        async move { fan.handle(&sqs(m, &id), None).await.unwrap() }
    }))
    .await;
    let finished: Vec<&Value> = results
        .iter()
        .filter(|r| r["results"][0]["outcome"] == "fan_out_finished")
        .collect();
    assert_eq!(finished.len(), 1, "{results:?}");
    assert_eq!(limited.users(), free.users());
    let report_uri = finished[0]["results"][0]["report"].as_str().unwrap();
    let (_, body) = store
        .get(&report_uri.parse::<S3Uri>().unwrap())
        .await
        .unwrap();
    let report: Value = serde_json::from_slice(&body).unwrap();
    assert!(
        report["workspace_senders"].as_u64().unwrap() >= 2,
        "the pieces sent at the same time, as registered senders: {report}"
    );
    let stats = limited.stats();
    let http_429 = stats.by_status.get("429").copied().unwrap_or(0);
    let share = http_429 as f64 / stats.requests_total.max(1) as f64;
    eprintln!(
        "3 pieces at once: {} requests, {http_429} answered 429 ({:.2}%)",
        stats.requests_total,
        share * 100.0
    );
    assert!(
        share <= 0.01,
        "{http_429} of {} requests met a 429",
        stats.requests_total
    );
}

#[tokio::test]
async fn an_unreadable_control_object_ends_the_fan_out_instead_of_holding_the_route() {
    let Bed {
        store,
        braze,
        queue,
    } = Bed::default();
    let spill = tempfile::tempdir().unwrap();
    let fan = handler(&store, &braze, &queue, spill.path(), Some(2));
    put(&store, "in/e1.csv", csv(false, &BTreeSet::new(), 0)).await;
    assert_eq!(outcome(&sync(&fan, "in/e1.csv").await), "fanned_out");
    let msgs = queue.pieces.lock().unwrap().clone();
    let r = fan.handle(&sqs(&msgs[0], "m0"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "piece_done", "{r}");
    let run_id = &msgs[0].run_id;
    let done = S3Uri::new(
        "state",
        format!("s/people/_fan_out/{run_id}/p000/done.json"),
    );
    store
        .put(
            &done,
            Bytes::from_static(b"{"),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
    let r = fan.handle(&sqs(&msgs[0], "m0b"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "failed", "{r}");
    assert_eq!(r["batchItemFailures"], json!([]));
    let l = read_lock(store.as_ref(), &lock_uri("state", "s/", "people"))
        .await
        .unwrap()
        .unwrap();
    assert!(l.released, "the route is free again");
    let late = fan.handle(&sqs(&msgs[1], "m1"), None).await.unwrap();
    assert_eq!(late["results"][0]["outcome"], "fan_out_over", "{late}");
}

/// 2,000 users with a 250-character tier that gzip shrinks ~85×: the parts' size says about
/// 110 KB of spill (even as text, [`braze_sync::run::runner::text_bytes`]), the rows spill ~540 KB.
fn wide_gz() -> Bytes {
    wide_gz_without(|_| false)
}

/// [`wide_gz`] without the users `gone` picks.
fn wide_gz_without(gone: impl Fn(u32) -> bool) -> Bytes {
    use std::io::Write;
    let mut s = String::from("id,tier,vip\n");
    let tier = "x".repeat(250);
    for i in 0..2_000 {
        if gone(i) {
            continue;
        }
        s.push_str(&format!("u{i},{tier},{}\n", i % 3 == 0));
    }
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
    gz.write_all(s.as_bytes()).unwrap();
    Bytes::from(gz.finish().unwrap())
}

/// The spill limit of the overflow tests: above the parts' estimate, below the real spill.
const TIGHT: u64 = 256 << 10;

/// A single-invocation handler, after it synced the first export (`in/e1.csv`: every user
/// `t<i>`): the starting state of the fan-out tests.
async fn first_synced(
    store: &Arc<MemoryStore>,
    braze: &Arc<Braze>,
    queue: &Arc<Queue>,
    spill: &std::path::Path,
) -> Handler {
    let single = handler(store, braze, queue, spill, None);
    put(store, "in/e1.csv", csv(false, &BTreeSet::new(), 0)).await;
    assert_eq!(outcome(&sync(&single, "in/e1.csv").await), "synced");
    single
}

/// The reference deployment: every export in one invocation (a store and Braze of its own).
fn reference(spill: &std::path::Path) -> (Arc<MemoryStore>, Arc<Braze>, Handler) {
    let bed = Bed::default();
    let one = handler(&bed.store, &bed.braze, &bed.queue, spill, None);
    (bed.store, bed.braze, one)
}

async fn report_of(store: &MemoryStore, r: &Value) -> Value {
    let uri = r["results"][0]["report"].as_str().unwrap();
    let (_, body) = store.get(&uri.parse::<S3Uri>().unwrap()).await.unwrap();
    serde_json::from_slice(&body).unwrap()
}

#[tokio::test]
async fn a_spill_the_estimate_missed_fans_out_from_what_was_measured() {
    let spill = tempfile::tempdir().unwrap();
    // The reference: one invocation with room to spill.
    let (one_store, one_braze, one) = reference(spill.path());
    put(&one_store, "in/e1.csv.gz", wide_gz()).await;
    assert_eq!(outcome(&sync(&one, "in/e1.csv.gz").await), "synced");

    // A 256 KB spill limit: the estimate says one invocation fits, the partition step
    // overflows; with a queue the run fans out from what it measured instead of failing.
    let Bed {
        store,
        braze,
        queue,
    } = Bed::default();
    let fan = handler_limited(
        &store,
        &braze,
        Some(&queue),
        spill.path(),
        None,
        Some(TIGHT),
    );
    put(&store, "in/e1.csv.gz", wide_gz()).await;
    let out = sync(&fan, "in/e1.csv.gz").await;
    assert_eq!(outcome(&out), "fanned_out", "{out}");
    assert_eq!(braze.requests.load(Ordering::SeqCst), 0, "nothing was sent");
    let msgs = queue.pieces.lock().unwrap().clone();
    assert!(
        (3..=6).contains(&msgs.len()),
        "~540 KB of spill, half again, per 256 KB: {} pieces",
        msgs.len()
    );
    let mut last = Value::Null;
    for (k, m) in msgs.iter().enumerate() {
        last = fan.handle(&sqs(m, &format!("m{k}")), None).await.unwrap();
        assert_eq!(last["batchItemFailures"], json!([]), "{last}");
    }
    assert_eq!(last["results"][0]["outcome"], "fan_out_finished", "{last}");
    assert_eq!(last["results"][0]["status"], "complete", "{last}");
    // The same profiles as the single run, every user sent exactly once.
    assert_eq!(
        *braze.profiles.lock().unwrap(),
        *one_braze.profiles.lock().unwrap()
    );
    assert_eq!(braze.objects.load(Ordering::SeqCst), 2_000);
    assert_eq!(state(&store).read_head().await.unwrap().doc.users, 2_000);
    // The report says why it fanned out, with the measured figures.
    let report = report_of(&store, &last).await;
    let notes = report["notes"].to_string();
    eprintln!("{} pieces; notes: {notes}", msgs.len());
    assert!(notes.contains("fans out into"), "{notes}");
    assert!(notes.contains("bytes per row"), "{notes}");
    assert_eq!(report["rows_in"], 2_000, "{report}");
    let l = read_lock(store.as_ref(), &lock_uri("state", "s/", "people"))
        .await
        .unwrap()
        .unwrap();
    assert!(l.released);

    // A second export with every 25th user gone (members of every piece's ranges): it
    // overflows and fans out again; the finalizer streams each piece's removals in turn and
    // the profiles again equal the single run's.
    let e2 = wide_gz_without(|i| i % 25 == 0);
    put(&one_store, "in/e2.csv.gz", e2.clone()).await;
    assert_eq!(outcome(&sync(&one, "in/e2.csv.gz").await), "synced");
    put(&store, "in/e2.csv.gz", e2).await;
    let out = sync(&fan, "in/e2.csv.gz").await;
    assert_eq!(outcome(&out), "fanned_out", "{out}");
    let msgs: Vec<PieceMessage> = queue.pieces.lock().unwrap()[msgs.len()..].to_vec();
    let run_id = msgs[0].run_id.clone();
    let mut files = 0;
    for (k, m) in msgs.iter().enumerate() {
        last = fan.handle(&sqs(m, &format!("n{k}")), None).await.unwrap();
        assert_eq!(last["batchItemFailures"], json!([]), "{last}");
        let dep = S3Uri::new(
            "state",
            format!("s/people/_fan_out/{run_id}/p{k:03}/departures.bin"),
        );
        files += usize::from(store.head(&dep).await.unwrap().is_some());
    }
    assert!(files >= 2, "removals in several pieces: {files}");
    assert_eq!(last["results"][0]["outcome"], "fan_out_finished", "{last}");
    assert_eq!(
        *braze.profiles.lock().unwrap(),
        *one_braze.profiles.lock().unwrap()
    );
    let report = report_of(&store, &last).await;
    // 80 users gone, of whom the members (every 3rd id) are removed from the audience.
    let members_gone = (0..2_000).filter(|i| i % 25 == 0 && i % 3 == 0).count();
    assert_eq!(report["departures_sent"], members_gone, "{report}");
}

#[tokio::test]
async fn without_a_queue_an_overflow_fails_naming_the_sizes() {
    let spill = tempfile::tempdir().unwrap();
    let store = Arc::new(MemoryStore::new());
    let braze = Arc::new(Braze::default());
    let cli = handler_limited(&store, &braze, None, spill.path(), None, Some(TIGHT));
    put(&store, "in/e1.csv.gz", wide_gz()).await;
    let out = cli.handle(&s3_event("in/e1.csv.gz"), None).await;
    let text = format!("{out:?}");
    eprintln!("{text}");
    assert!(
        text.contains("more than the 256 KB of local storage"),
        "{text}"
    );
    assert!(text.contains("bytes per row"), "{text}");
    assert!(text.contains("EphemeralStorage"), "{text}");
    assert_eq!(braze.requests.load(Ordering::SeqCst), 0);
    let l = read_lock(store.as_ref(), &lock_uri("state", "s/", "people"))
        .await
        .unwrap()
        .unwrap();
    assert!(l.released, "the route is free");
}

#[tokio::test]
async fn a_piece_whose_own_spill_overflows_ends_the_fan_out_instead_of_looping() {
    let spill = tempfile::tempdir().unwrap();
    let Bed {
        store,
        braze,
        queue,
    } = Bed::default();
    // Forced into 2 pieces of ~270 KB of spill each, with 64 KB allowed.
    let fan = handler_limited(
        &store,
        &braze,
        Some(&queue),
        spill.path(),
        Some(2),
        Some(64 << 10),
    );
    put(&store, "in/e1.csv.gz", wide_gz()).await;
    assert_eq!(outcome(&sync(&fan, "in/e1.csv.gz").await), "fanned_out");
    let msgs = queue.pieces.lock().unwrap().clone();
    assert_eq!(msgs.len(), 2);
    let r = fan.handle(&sqs(&msgs[0], "m0"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "failed", "{r}");
    assert_eq!(r["batchItemFailures"], json!([]), "not redelivered: {r}");
    let report = report_of(&store, &r).await;
    let error = report["error"].as_str().unwrap();
    eprintln!("{error}");
    assert!(error.contains("piece 0"), "{error}");
    assert!(error.contains("still overflows"), "{error}");
    assert!(error.contains("BRIDGE_FAN_OUT_PIECES="), "{error}");
    assert!(error.contains("bytes per row"), "{error}");
    assert_eq!(braze.requests.load(Ordering::SeqCst), 0, "nothing was sent");
    assert_eq!(
        queue.pieces.lock().unwrap().len(),
        2,
        "nothing was re-queued"
    );
    let late = fan.handle(&sqs(&msgs[1], "m1"), None).await.unwrap();
    assert_eq!(late["results"][0]["outcome"], "fan_out_over", "{late}");
}

#[tokio::test]
async fn a_failing_fan_out_never_deletes_objects_the_route_head_references() {
    let MergedUnmarked {
        store,
        single,
        fan,
        msgs,
        ..
    } = merged_unmarked().await;
    let run_id = msgs[0].run_id.clone();
    // The fan-out's lease runs out before its finalizer is redelivered; a newer export takes
    // the route and commits on top of the merged head (changing one user only, so most
    // ranges still reference the forks' objects).
    expire_lock(&store, &run_id).await;
    let e3 = String::from_utf8(csv(true, &BTreeSet::new(), 8).to_vec()).unwrap();
    let e3 = e3.replace("u1,t1,", "u1,newer,");
    put(&store, "in/e3.csv", Bytes::from(e3)).await;
    assert_eq!(outcome(&sync(&single, "in/e3.csv").await), "synced");
    let h = state(&store).read_head().await.unwrap();
    assert!(
        h.doc.ranges.iter().any(|r| r
            .deltas
            .iter()
            .any(|d| d.starts_with(&format!("_fan_out/{run_id}/")))),
        "the head still references the forks' objects"
    );
    // The newer export's run ended the fan-out before it diffed, deleting only its control
    // objects, not the state the head references; the old finalizer, redelivered, ends at once.
    only_fork_objects_left(&store, &run_id).await;
    let r = fan.handle(&sqs(&msgs[1], "m1c"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "fan_out_over", "{r}");
    assert_head_objects_exist(&store).await;
    assert_eq!(state(&store).read_head().await.unwrap(), h);
}

/// A fan-out whose lease runs out after one piece sent (the other waits to be redelivered):
/// the next export's run takes the route and first takes in what that piece had Braze
/// confirm, so it resends the values the next export reverts (Gold → Silver by the piece,
/// back to Gold by the next export, never left at Silver); the void fan-out's export is
/// queued again, its control objects are gone, and its late piece ends at once.
/// Users whose tier in Braze is `changed` (what `csv(true, ..)` gives the even ids).
fn changed(b: &Braze) -> usize {
    b.profiles
        .lock()
        .unwrap()
        .values()
        .filter(|p| p.get("tier") == Some(&json!("changed")))
        .count()
}

/// e1 synced by one invocation, then e2 (the even ids `changed`) fanned out into 2 pieces of
/// which only piece 0 ran: its users hold their new values in Braze. Returns the
/// single-invocation handler, the fan-out handler and the piece messages.
async fn piece_zero_sent(
    store: &Arc<MemoryStore>,
    braze: &Arc<Braze>,
    queue: &Arc<Queue>,
    spill: &std::path::Path,
) -> (Handler, Handler, Vec<PieceMessage>) {
    let single = first_synced(store, braze, queue, spill).await;
    let fan = handler(store, braze, queue, spill, Some(2));
    put(store, "in/e2.csv", csv(true, &BTreeSet::new(), 0)).await;
    assert_eq!(outcome(&sync(&fan, "in/e2.csv").await), "fanned_out");
    let msgs = queue.pieces.lock().unwrap().clone();
    let r = fan.handle(&sqs(&msgs[0], "m0"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "piece_done", "{r}");
    assert!(changed(braze) > 0, "piece 0 sent its users' new values");
    (single, fan, msgs)
}

/// Only objects of the forks of fan-out `run_id` are left (the route head names them).
async fn only_fork_objects_left(store: &MemoryStore, run_id: &str) {
    let left = store
        .list("state", &format!("s/people/_fan_out/{run_id}/"))
        .await
        .unwrap();
    assert!(left.iter().all(|o| o.key.ends_with(".bin")), "{left:?}");
}

/// e1 synced by one invocation, then e2 fanned out into 2 pieces through a store whose deletes
/// a test can refuse. Returns the single-invocation handler, that store, the fan-out handler
/// (over it) and the piece messages.
async fn fanned_out_on_lossy(
    store: &Arc<MemoryStore>,
    braze: &Arc<Braze>,
    queue: &Arc<Queue>,
    spill: &std::path::Path,
) -> (Handler, Arc<LossyStore>, Handler, Vec<PieceMessage>) {
    let single = first_synced(store, braze, queue, spill).await;
    let lossy = Arc::new(LossyStore::over(store.clone()));
    let fan = handler_on(lossy.clone(), braze, Some(queue), spill, Some(2), None);
    put(store, "in/e2.csv", csv(true, &BTreeSet::new(), 0)).await;
    assert_eq!(outcome(&sync(&fan, "in/e2.csv").await), "fanned_out");
    let msgs = queue.pieces.lock().unwrap().clone();
    (single, lossy, fan, msgs)
}

#[tokio::test]
async fn a_fan_out_whose_lease_ran_out_keeps_what_its_pieces_confirmed() {
    let Bed {
        store,
        braze,
        queue,
    } = Bed::default();
    let spill = tempfile::tempdir().unwrap();
    let (single, fan, msgs) = piece_zero_sent(&store, &braze, &queue, spill.path()).await;
    let run_id = msgs[0].run_id.clone();
    let handovers = *queue.handovers.lock().unwrap();
    expire_lock(&store, &run_id).await;
    put(&store, "in/e3.csv", csv(false, &BTreeSet::new(), 0)).await;
    assert_eq!(outcome(&sync(&single, "in/e3.csv").await), "synced");
    assert_eq!(changed(&braze), 0, "every value piece 0 sent was reverted");
    assert_eq!(
        *queue.handovers.lock().unwrap(),
        handovers + 1,
        "e2 queued again"
    );
    only_fork_objects_left(&store, &run_id).await;
    let late = fan.handle(&sqs(&msgs[1], "m1"), None).await.unwrap();
    assert_eq!(late["results"][0]["outcome"], "fan_out_over", "{late}");
}

/// A run that ended a fan-out left behind took its forks' work into the route head, then could
/// not delete a fork's head, and went on to sync its own export: the next run must not take the
/// same fork over again, over the newer values the run in between had Braze confirm.
#[tokio::test]
async fn a_left_fan_out_whose_clean_was_cut_short_is_not_taken_over_twice() {
    let Bed {
        store,
        braze,
        queue,
    } = Bed::default();
    let spill = tempfile::tempdir().unwrap();
    let (single, _, msgs) = piece_zero_sent(&store, &braze, &queue, spill.path()).await;
    let run_id = msgs[0].run_id.clone();
    expire_lock(&store, &run_id).await;
    // The next run ends the fan-out, but the store refuses to delete piece 0's fork head.
    let lossy = Arc::new(LossyStore::over(store.clone()));
    lossy.refuse_deletes(Some(&format!("_fan_out/{run_id}/p000/head.json")));
    let faulty = handler_on(
        lossy.clone(),
        &braze,
        Some(&queue),
        spill.path(),
        None,
        None,
    );
    put(&store, "in/e3.csv", csv(false, &BTreeSet::new(), 0)).await;
    assert_eq!(outcome(&sync(&faulty, "in/e3.csv").await), "synced");
    assert_eq!(changed(&braze), 0, "every value piece 0 sent was reverted");
    lossy.refuse_deletes(None);
    // Piece 0's values again: every even user is sent them, none is taken for unchanged.
    put(&store, "in/e4.csv", csv(true, &BTreeSet::new(), 0)).await;
    assert_eq!(outcome(&sync(&single, "in/e4.csv").await), "synced");
    assert_eq!(changed(&braze), N as usize / 2);
    only_fork_objects_left(&store, &run_id).await;
}

/// A finalizer recorded how its fan-out ended and could not delete the manifest: the next run
/// deletes what is left without writing over that ending.
#[tokio::test]
async fn a_finished_fan_out_whose_clean_was_cut_short_keeps_its_report() {
    let Bed {
        store,
        braze,
        queue,
    } = Bed::default();
    let spill = tempfile::tempdir().unwrap();
    let (single, lossy, fan, msgs) =
        fanned_out_on_lossy(&store, &braze, &queue, spill.path()).await;
    let run_id = msgs[0].run_id.clone();
    lossy.refuse_deletes(Some("manifest.json"));
    fan.handle(&sqs(&msgs[0], "m0"), None).await.unwrap();
    let r = fan.handle(&sqs(&msgs[1], "m1"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "fan_out_finished", "{r}");
    lossy.refuse_deletes(None);
    let report = S3Uri::new("state", format!("r/people/{run_id}.json"));
    let (_, before) = store.get(&report).await.unwrap();
    let status = |b: &[u8]| serde_json::from_slice::<Value>(b).unwrap()["status"].clone();
    assert_eq!(status(&before), "complete");
    put(&store, "in/e3.csv", csv(false, &BTreeSet::new(), 0)).await;
    assert_eq!(outcome(&sync(&single, "in/e3.csv").await), "synced");
    let (_, after) = store.get(&report).await.unwrap();
    assert_eq!(after, before, "the fan-out's ending stands");
    assert_eq!(
        outcome(&sync(&single, "in/e2.csv").await),
        "duplicate_no_op"
    );
    only_fork_objects_left(&store, &run_id).await;
}

/// A duplicate delivery of a piece joined the route lock and read the manifest just before the
/// finalizer's clean deleted them and the piece's `done.json`: it runs the piece, finds the
/// route head moved, and fails the fan-out, which must not write over the ending the
/// finalizer recorded.
#[tokio::test]
async fn a_piece_that_read_the_manifest_before_the_finalizers_clean_leaves_its_ending_standing() {
    let Bed {
        store,
        braze,
        queue,
    } = Bed::default();
    let spill = tempfile::tempdir().unwrap();
    let (_, lossy, fan, msgs) = fanned_out_on_lossy(&store, &braze, &queue, spill.path()).await;
    let run_id = msgs[0].run_id.clone();
    let manifest = S3Uri::new("state", format!("s/people/_fan_out/{run_id}/manifest.json"));
    let (_, manifest_body) = store.get(&manifest).await.unwrap();
    // The clean stops at final.json, the last object it deletes.
    lossy.refuse_deletes(Some("final.json"));
    fan.handle(&sqs(&msgs[0], "m0"), None).await.unwrap();
    let r = fan.handle(&sqs(&msgs[1], "m1"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "fan_out_finished", "{r}");
    lossy.refuse_deletes(None);
    let report = S3Uri::new("state", format!("r/people/{run_id}.json"));
    let (_, before) = store.get(&report).await.unwrap();
    // What the duplicate saw: the lock still the fan-out's, and the manifest.
    store
        .put(
            &manifest,
            manifest_body,
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
    let lock = lock_uri("state", "s/", "people");
    let held = json!({"holder": run_id, "lease_until_ms": i64::MAX / 2, "released": false});
    store
        .put(
            &lock,
            Bytes::from(held.to_string()),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
    let r = fan.handle(&sqs(&msgs[1], "m1-dup"), None).await.unwrap();
    assert_eq!(r["results"][0]["report"], report.to_string(), "{r}");
    let (_, after) = store.get(&report).await.unwrap();
    assert_eq!(after, before, "the fan-out's ending stands");
    assert_eq!(outcome(&sync(&fan, "in/e2.csv").await), "duplicate_no_op");
}

#[tokio::test]
async fn a_piece_handed_over_before_its_deadline_counts_what_it_sent_in_the_combined_report() {
    // The reference: one invocation per export.
    let spill = tempfile::tempdir().unwrap();
    let (one_store, one_braze, one) = reference(spill.path());
    let e1 = csv(false, &BTreeSet::new(), 0);
    let e2 = csv(true, &BTreeSet::new(), 8);
    put(&one_store, "in/e1.csv", e1.clone()).await;
    assert_eq!(outcome(&sync(&one, "in/e1.csv").await), "synced");
    put(&one_store, "in/e2.csv", e2.clone()).await;
    let r = sync(&one, "in/e2.csv").await;
    let want = report_of(&one_store, &r).await;

    let Bed {
        store,
        braze,
        queue,
    } = Bed::default();
    let single = handler(&store, &braze, &queue, spill.path(), None);
    put(&store, "in/e1.csv", e1).await;
    assert_eq!(outcome(&sync(&single, "in/e1.csv").await), "synced");
    let fan = handler(&store, &braze, &queue, spill.path(), Some(2));
    put(&store, "in/e2.csv", e2).await;
    assert_eq!(outcome(&sync(&fan, "in/e2.csv").await), "fanned_out");
    let msgs = queue.pieces.lock().unwrap().clone();
    // Piece 0 meets its deadline midway (Braze is slow): it hands itself over.
    braze.delay_ms.store(30, Ordering::SeqCst);
    let r = fan
        .handle(&sqs(&msgs[0], "m0"), Some(at_deadline() + 200))
        .await
        .unwrap();
    assert_eq!(r["results"][0]["outcome"], "piece_handed_over", "{r}");
    let sent_before = braze.objects.load(Ordering::SeqCst);
    assert!(sent_before > 0, "it sent some users before its deadline");
    braze.delay_ms.store(0, Ordering::SeqCst);
    let again = queue.pieces.lock().unwrap().last().unwrap().clone();
    assert_eq!((again.piece, &again.run_id), (0, &msgs[0].run_id));
    let r = fan.handle(&sqs(&again, "m0b"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "piece_done", "{r}");
    let r = fan.handle(&sqs(&msgs[1], "m1"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "fan_out_finished", "{r}");
    assert_eq!(
        *braze.profiles.lock().unwrap(),
        *one_braze.profiles.lock().unwrap()
    );
    // The combined report counts the users the first invocation sent, as a single run does.
    let got = report_of(&store, &r).await;
    for field in [
        "rows_in",
        "users_sent",
        "users_confirmed",
        "unchanged",
        "rejected",
        "departures_sent",
    ] {
        assert_eq!(got[field], want[field], "{field}: {got} vs {want}");
    }
}

#[tokio::test]
async fn a_fan_out_whose_pieces_cannot_all_be_queued_keeps_what_a_queued_piece_sent_and_its_retry_queues_the_rest()
 {
    let Bed {
        store,
        braze,
        queue,
    } = Bed::default();
    let spill = tempfile::tempdir().unwrap();
    let fan = handler(&store, &braze, &queue, spill.path(), Some(2));
    put(&store, "in/e1.csv", csv(false, &BTreeSet::new(), 0)).await;
    // SQS takes the first piece's message, then refuses the second: the trigger is retried.
    *queue.full_at.lock().unwrap() = Some(1);
    let r = fan.handle(&s3_event("in/e1.csv"), None).await;
    assert!(r.is_err(), "{r:?}");
    let first = queue.pieces.lock().unwrap()[0].clone();
    // The queued piece runs meanwhile (it may have started before the refusal): what it sends
    // is confirmed in its fork, not thrown away with the fan-out.
    let r = fan.handle(&sqs(&first, "p0"), None).await.unwrap();
    assert_ne!(r["results"][0]["outcome"], "fan_out_over", "{r}");
    let sent = braze.profiles.lock().unwrap().len();
    assert!(sent > 0 && sent < N as usize, "{sent}");
    // The trigger's retry queues every piece again and is acknowledged: the fan-out owns the
    // export (its ledger entry), and no second fan-out starts.
    *queue.full_at.lock().unwrap() = None;
    let r = sync(&fan, "in/e1.csv").await;
    assert_eq!(outcome(&r), "fan_out_queued", "{r}");
    assert_eq!(r["results"][0]["pieces"], 2, "{r}");
    let msgs = queue.pieces.lock().unwrap().clone();
    assert_eq!(msgs.len(), 3);
    assert!(msgs.iter().all(|m| m.run_id == first.run_id));
    // A further duplicate of the trigger is acknowledged as one instead of queueing again.
    let r = sync(&fan, "in/e1.csv").await;
    assert_eq!(outcome(&r), "duplicate_while_running", "{r}");
    assert_eq!(queue.pieces.lock().unwrap().len(), 3);
    // Piece 0 again is a no-op; piece 1 finishes the fan-out.
    let requests = braze.requests.load(Ordering::SeqCst);
    let r = fan.handle(&sqs(&msgs[1], "p0-again"), None).await.unwrap();
    assert_eq!(braze.requests.load(Ordering::SeqCst), requests, "{r}");
    fan.handle(&sqs(&msgs[2], "p1"), None).await.unwrap();
    assert_eq!(braze.profiles.lock().unwrap().len(), N as usize);
    assert_eq!(state(&store).read_head().await.unwrap().doc.users, N as u64);
    assert_eq!(outcome(&sync(&fan, "in/e1.csv").await), "duplicate_no_op");
    let lock = read_lock(store.as_ref(), &lock_uri("state", "s/", "people"))
        .await
        .unwrap()
        .unwrap();
    assert!(lock.released);
    // Every user sent once: the same export again sends nothing.
    put(&store, "in/e2.csv", csv(false, &BTreeSet::new(), 0)).await;
    let objects = braze.objects.load(Ordering::SeqCst);
    assert_eq!(objects, N as u64);
    sync(&fan, "in/e2.csv").await;
    let later = queue.pieces.lock().unwrap().clone();
    for m in later.iter().skip(3) {
        fan.handle(&sqs(m, &format!("e2-{}", m.piece)), None)
            .await
            .unwrap();
    }
    assert_eq!(braze.objects.load(Ordering::SeqCst), objects);
}

#[tokio::test]
async fn a_piece_that_never_gets_through_its_deadline_ends_the_fan_out_instead_of_looping() {
    let Bed {
        store,
        braze,
        queue,
    } = Bed::default();
    let spill = tempfile::tempdir().unwrap();
    first_synced(&store, &braze, &queue, spill.path()).await;
    let fan = handler(&store, &braze, &queue, spill.path(), Some(2));
    put(&store, "in/e2.csv", csv(true, &BTreeSet::new(), 0)).await;
    assert_eq!(outcome(&sync(&fan, "in/e2.csv").await), "fanned_out");
    // Every invocation of piece 0 is at its deadline from the start: nothing is confirmed.
    let mut msg = queue.pieces.lock().unwrap()[0].clone();
    let sent = braze.requests.load(Ordering::SeqCst);
    let mut outcomes = Vec::new();
    for k in 0..5 {
        let r = fan
            .handle(&sqs(&msg, &format!("m{k}")), Some(at_deadline()))
            .await
            .unwrap();
        let o = r["results"][0]["outcome"].as_str().unwrap().to_string();
        outcomes.push(o.clone());
        if o != "piece_handed_over" {
            assert!(
                r["results"][0]["error"]
                    .as_str()
                    .unwrap()
                    .contains("BRIDGE_FAN_OUT_PIECES"),
                "{r}"
            );
            break;
        }
        msg = queue.pieces.lock().unwrap().last().unwrap().clone();
    }
    assert_eq!(
        outcomes,
        ["piece_handed_over", "piece_handed_over", "failed"],
        "ended on the third stalled invocation"
    );
    assert_eq!(braze.requests.load(Ordering::SeqCst), sent);
    let l = read_lock(store.as_ref(), &lock_uri("state", "s/", "people"))
        .await
        .unwrap()
        .unwrap();
    assert!(l.released);
}

#[tokio::test]
async fn a_timeout_too_short_to_send_fails_once_naming_it_instead_of_handing_over() {
    let Bed {
        store,
        braze,
        queue,
    } = Bed::default();
    let spill = tempfile::tempdir().unwrap();
    let single = handler(&store, &braze, &queue, spill.path(), None);
    put(&store, "in/e1.csv", csv(false, &BTreeSet::new(), 0)).await;
    // A function deployed with a 20 s timeout.
    let r = single
        .handle(&s3_event("in/e1.csv"), Some(19_990))
        .await
        .unwrap();
    assert_eq!(outcome(&r), "failed", "{r}");
    let error = r["results"][0]["error"].as_str().unwrap();
    assert!(error.contains("timeout (20 s"), "{error}");
    assert!(error.contains("at least 60 s"), "{error}");
    // Nothing sent, nothing handed over, the route free.
    assert_eq!(braze.requests.load(Ordering::SeqCst), 0);
    assert_eq!(*queue.handovers.lock().unwrap(), 0);
    let lock = read_lock(store.as_ref(), &lock_uri("state", "s/", "people")).await;
    assert!(lock.unwrap().is_none_or(|l| l.released));
    // The report and the ledger entry say so.
    let report = report_of(&store, &r).await;
    assert_eq!(report["status"], "failed", "{report}");
    assert_eq!(report["error"].as_str().unwrap(), error);
    let export_id = report["export_id"].as_str().unwrap().to_string();
    let entry =
        braze_sync::state::ledger::Ledger::for_route(store.as_ref(), "state", "s/", "people")
            .entry(&export_id)
            .await
            .unwrap()
            .unwrap();
    assert_eq!(
        entry.status,
        braze_sync::state::ledger::LedgerStatus::Failed
    );
    // Once the timeout is long enough, the same export syncs.
    let r = single
        .handle(&s3_event("in/e1.csv"), Some(59_950))
        .await
        .unwrap();
    assert_eq!(outcome(&r), "synced", "{r}");
    assert_eq!(braze.profiles.lock().unwrap().len(), N as usize);
}

/// Two deliveries of the last piece at once: the first finalizes (alive, its departures in
/// flight) when SQS delivers the same message again. The duplicate finds the piece's attempt
/// alive and comes back later, instead of taking `final.json` for its own and finalizing a
/// second time (merge, departures, watermark, ledger, lock) beside the first.
#[tokio::test]
async fn a_duplicate_of_the_finalizing_piece_comes_back_later_instead_of_finalizing_too() {
    let Bed {
        store,
        braze,
        queue,
    } = Bed::default();
    let spill = tempfile::tempdir().unwrap();
    first_synced(&store, &braze, &queue, spill.path()).await;
    let fan = handler(&store, &braze, &queue, spill.path(), Some(2));
    // 20 of 400 users leave the audience (under its 10% cap): the finalizer sends departures.
    let gone: BTreeSet<u32> = (0..20).collect();
    put(&store, "in/e2.csv", csv(true, &gone, 0)).await;
    assert_eq!(outcome(&sync(&fan, "in/e2.csv").await), "fanned_out");
    let msgs = queue.pieces.lock().unwrap().clone();
    let r = fan.handle(&sqs(&msgs[0], "m0"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "piece_done", "{r}");

    // Piece 1, the last, finalizes; it is held alive in its first departure request.
    braze.hold_departure.store(true, Ordering::SeqCst);
    let m1 = sqs(&msgs[1], "m1");
    let mut first = Box::pin(fan.handle(&m1, None));
    tokio::select! {
        r = &mut first => panic!("the finalizer ended before its departures: {r:?}"),
        () = braze.holding.notified() => {}
    }
    let objects = braze.objects.load(Ordering::SeqCst);
    // The same message again, while that attempt lives: it does nothing and comes back later.
    let dup = fan.handle(&sqs(&msgs[1], "m1-dup"), None).await.unwrap();
    assert_eq!(
        dup["batchItemFailures"].as_array().map(Vec::len),
        Some(1),
        "the duplicate comes back later: {dup}"
    );
    assert_eq!(
        braze.objects.load(Ordering::SeqCst),
        objects,
        "the duplicate sends nothing"
    );
    let lock = lock_uri("state", "s/", "people");
    let held = read_lock(store.as_ref(), &lock).await.unwrap().unwrap();
    assert!(!held.released, "the route stays the fan-out's: {held:?}");

    // The first attempt finishes the fan-out; the duplicate, back later, finds it over.
    braze.release.notify_one();
    let r = first.await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "fan_out_finished", "{r}");
    assert_eq!(r["results"][0]["summary"]["departures_sent"], 20, "{r}");
    let late = fan.handle(&sqs(&msgs[1], "m1-dup"), None).await.unwrap();
    assert_eq!(late["results"][0]["outcome"], "fan_out_over", "{late}");
    let left = store.list("state", "s/people/_fan_out/").await.unwrap();
    let control = [
        "manifest.json",
        "final.json",
        "done.json",
        "head.json",
        "attempt.json",
    ];
    assert!(
        !left
            .iter()
            .any(|o| control.iter().any(|c| o.key.ends_with(c))),
        "{left:?}"
    );
}

/// A duplicate delivery of a piece that died after the piece was done left a checkpoint in
/// the piece's fork (its intent: a user it was resending, marked unknown). Nobody will ever
/// commit it, so the finalizer does not wait for it: with no live attempt on the piece, it
/// takes the segment into the fork and merges, and the route head keeps what it says (the
/// user is resent by the next export).
#[tokio::test]
async fn the_finalizer_takes_in_a_dead_attempts_leftover_checkpoint_instead_of_waiting_forever() {
    let Bed {
        store,
        braze,
        queue,
    } = Bed::default();
    let spill = tempfile::tempdir().unwrap();
    let single = first_synced(&store, &braze, &queue, spill.path()).await;
    let fan = handler(&store, &braze, &queue, spill.path(), Some(2));
    put(&store, "in/e2.csv", csv(true, &BTreeSet::new(), 0)).await;
    assert_eq!(outcome(&sync(&fan, "in/e2.csv").await), "fanned_out");
    let msgs = queue.pieces.lock().unwrap().clone();
    let run_id = msgs[0].run_id.clone();
    let r = fan.handle(&sqs(&msgs[1], "m1"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "piece_done", "{r}");

    // The dead duplicate's intent, in piece 1's fork: u<i> of piece 1's ranges, tier unknown.
    let route_head = state(&store).read_head().await.unwrap();
    let span = spans(route_head.doc.ranges.len(), 2)[1].clone();
    let bits = route_head.doc.range_bits;
    let user = (0..N)
        .map(|i| format!("u{i}"))
        .find(|u| {
            let k = Identifier::ExternalId(u.clone()).user_key();
            span.contains(&range_of(k.0, bits))
        })
        .unwrap();
    let fork = state(&store).fork(&format!("_fan_out/{run_id}/p001"));
    let mut fork_head = fork.read_head().await.unwrap();
    let intent = braze_sync::model::UserDelta {
        identifier: Identifier::ExternalId(user.clone()),
        pos: Default::default(),
        changes: vec![braze_sync::model::AttributeChange {
            name: "tier".into(),
            value: Value::Null,
            fingerprint: Some(braze_sync::state::confirmed::UNKNOWN_FP),
        }],
        update_existing_only: false,
        is_new: false,
        row_digest: None,
    };
    fork.checkpoint(&mut fork_head, &route(), &[intent])
        .await
        .unwrap();

    // The last piece finalizes at once: the dead attempt's checkpoint is taken in.
    let r = fan.handle(&sqs(&msgs[0], "m0"), None).await.unwrap();
    assert_eq!(r["results"][0]["outcome"], "fan_out_finished", "{r}");
    assert_head_objects_exist(&store).await;
    // What it said reached the route head: the same export again resends that user alone.
    let objects = braze.objects.load(Ordering::SeqCst);
    put(&store, "in/e3.csv", csv(true, &BTreeSet::new(), 0)).await;
    assert_eq!(outcome(&sync(&single, "in/e3.csv").await), "synced");
    assert_eq!(
        braze.objects.load(Ordering::SeqCst),
        objects + 1,
        "{user} resent"
    );
}
