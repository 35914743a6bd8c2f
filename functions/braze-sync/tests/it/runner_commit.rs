//! The real runner over an in-memory store and a scripted Braze: only what Braze confirmed
//! moves the state; users Braze refused land in the rejects object with its message and are
//! sent again by the next run; a run that reaches its deadline hands the rest on and a second
//! run finishes the export without resending what was confirmed.
#![allow(clippy::unwrap_used)]

use crate::common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use braze_sync::config::route::Route;
use braze_sync::run::handler::{ExportPlan, ExportRunner, RunError};
use braze_sync::run::runner::{Continuation, RunnerSettings, SyncRunner};
use braze_sync::send::braze::{BrazeApi, ItemError, TrackError, TrackResponse};
use braze_sync::state::store::StateStore;
use bridge_shared::S3Uri;
use bridge_shared::object_store::{MemoryStore, ObjectStore, PutCondition};
use bytes::Bytes;
use serde_json::Value;

const ROUTE: &str = common::PEOPLE_ROUTE;

/// Braze as scripted: refuses the ids in `refuse`, answers after `delay`, records every id sent.
struct ScriptedBraze {
    refuse: Mutex<Vec<String>>,
    delay: Duration,
    sent: Mutex<Vec<String>>,
}

#[async_trait]
impl BrazeApi for ScriptedBraze {
    async fn track(&self, body: Bytes) -> Result<TrackResponse, TrackError> {
        tokio::time::sleep(self.delay).await;
        let v: Value = serde_json::from_slice(&body).unwrap();
        let refuse = self.refuse.lock().unwrap().clone();
        let mut errors = Vec::new();
        for (i, o) in v["attributes"].as_array().unwrap().iter().enumerate() {
            let id = o["external_id"].as_str().unwrap().to_string();
            if refuse.contains(&id) {
                errors.push(ItemError {
                    index: Some(i),
                    input_array: Some("attributes".into()),
                    message: "The value provided for 'tier' is not valid.".into(),
                });
            }
            self.sent.lock().unwrap().push(id);
        }
        Ok(common::accepted(errors))
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

fn csv(n: u32, tier: &str) -> Bytes {
    let mut s = String::from("id,tier\n");
    for i in 0..n {
        s.push_str(&format!("u{i},{tier}\n"));
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
    braze: &Arc<ScriptedBraze>,
    max_run: Option<Duration>,
    handovers: &Arc<Handovers>,
) -> SyncRunner {
    let mut settings = RunnerSettings::new("state", "s/", "r/", "x/");
    settings.max_run = max_run;
    settings.checkpoint_every = Duration::from_millis(20);
    settings.deliver.max_objects = 10;
    settings.deliver.in_flight_grace = Duration::from_millis(0);
    settings.deliver.max_in_flight = 1;
    let route = Route::from_toml(ROUTE, "test").unwrap();
    SyncRunner::new(
        store.clone(),
        vec![route],
        braze.clone(),
        settings,
        Some(handovers.clone() as Arc<dyn Continuation>),
    )
}

async fn confirmed_users(store: &Arc<MemoryStore>) -> usize {
    let route = Route::from_toml(ROUTE, "test").unwrap();
    let (_, snap) = StateStore::new(store.clone(), "state", "s/", "people")
        .load(&route)
        .await
        .unwrap();
    snap.len()
}

#[tokio::test]
async fn braze_rejected_users_go_to_rejects_do_not_advance_state_and_are_resent() {
    let store = Arc::new(MemoryStore::new());
    let braze = Arc::new(ScriptedBraze {
        refuse: Mutex::new(vec!["u3".into(), "u7".into()]),
        delay: Duration::ZERO,
        sent: Mutex::new(Vec::new()),
    });
    let handovers = Arc::new(Handovers::default());
    let r = runner(&store, &braze, None, &handovers);

    let p1 = plan(&store, "in/a.csv", csv(20, "gold")).await;
    let out = r.run(&p1, None).await.unwrap();
    assert!(
        !out.complete(),
        "Braze refusals leave the export incomplete (replayable)"
    );
    assert_eq!(
        confirmed_users(&store).await,
        18,
        "the state holds only confirmed users"
    );
    let rejects_key = store
        .keys("state")
        .into_iter()
        .find(|k| k.starts_with("x/people/"))
        .unwrap();
    let (_, body) = store.get(&S3Uri::new("state", &rejects_key)).await.unwrap();
    let text = String::from_utf8(body.to_vec()).unwrap();
    assert_eq!(text.lines().count(), 2);
    assert!(
        text.contains("\"row\":4") && text.contains("not valid"),
        "{text}"
    );

    // Braze accepts them next time: the next run sends exactly the two refused users.
    braze.refuse.lock().unwrap().clear();
    braze.sent.lock().unwrap().clear();
    let p2 = plan(&store, "in/b.csv", csv(20, "gold")).await;
    let out = r.run(&p2, None).await.unwrap();
    assert!(out.complete());
    let mut resent = braze.sent.lock().unwrap().clone();
    resent.sort();
    assert_eq!(resent, ["u3", "u7"]);
    assert_eq!(confirmed_users(&store).await, 20);
}

#[tokio::test]
async fn a_run_cut_by_its_deadline_hands_over_and_the_next_run_finishes_without_resending() {
    let store = Arc::new(MemoryStore::new());
    let braze = Arc::new(ScriptedBraze {
        refuse: Mutex::new(Vec::new()),
        delay: Duration::from_millis(60),
        sent: Mutex::new(Vec::new()),
    });
    let handovers = Arc::new(Handovers::default());
    let p = plan(&store, "in/big.csv", csv(400, "silver")).await;

    // 40 requests of 60 ms one at a time need ~2.4 s; the run may send for 0.5 s.
    let short = runner(&store, &braze, Some(Duration::from_millis(500)), &handovers);
    let out = short.run(&p, None).await.unwrap();
    assert!(!out.complete());
    assert!(out.hand_over, "the run asks for a hand-over");
    // The handler hands over once the run's claims are released.
    short.hand_over(&p).await.unwrap();
    assert_eq!(*handovers.0.lock().unwrap(), 1, "the rest was handed on");
    let first = braze.sent.lock().unwrap().len();
    assert!(first > 0 && first < 400, "sent {first}");
    assert_eq!(
        confirmed_users(&store).await,
        first,
        "everything sent was committed"
    );

    let full = runner(&store, &braze, None, &handovers);
    let out = full.run(&p, None).await.unwrap();
    assert!(out.complete());
    let sent = braze.sent.lock().unwrap().clone();
    assert_eq!(sent.len(), 400, "no user sent twice across the hand-over");
    assert_eq!(confirmed_users(&store).await, 400);
}

#[tokio::test]
async fn a_state_too_big_for_the_functions_memory_fails_before_sending_and_releases_the_route() {
    let store = Arc::new(MemoryStore::new());
    let braze = Arc::new(ScriptedBraze {
        refuse: Mutex::new(Vec::new()),
        delay: Duration::ZERO,
        sent: Mutex::new(Vec::new()),
    });
    let handovers = Arc::new(Handovers::default());
    let p1 = plan(&store, "in/a.csv", csv(1000, "gold")).await;
    assert!(
        runner(&store, &braze, None, &handovers)
            .run(&p1, None)
            .await
            .unwrap()
            .complete()
    );
    braze.sent.lock().unwrap().clear();

    // 1,000 users x (16 + 6 + 2) bytes x 1.25 = 30 KB; 60% of a 20 KB function is 12 KB.
    let mut settings = RunnerSettings::new("state", "s/", "r/", "x/");
    settings.memory_limit_bytes = Some(20_000);
    let small = SyncRunner::new(
        store.clone(),
        vec![Route::from_toml(ROUTE, "test").unwrap()],
        braze.clone(),
        settings,
        None,
    );
    let p2 = plan(&store, "in/b.csv", csv(1000, "platinum")).await;
    let err = small.run(&p2, None).await.unwrap_err();
    let text = err.to_string();
    assert!(matches!(err, RunError::Permanent { .. }), "{text}");
    assert!(
        text.contains("1000 users")
            && text.contains("MemorySize")
            && text.contains("nothing was sent"),
        "{text}"
    );
    assert!(braze.sent.lock().unwrap().is_empty(), "nothing was sent");
    // The route lock was released: a run with enough memory proceeds at once.
    let out = runner(&store, &braze, None, &handovers)
        .run(&p2, None)
        .await
        .unwrap();
    assert!(out.complete());
    assert_eq!(braze.sent.lock().unwrap().len(), 1000);
}

fn state_objects(store: &Arc<MemoryStore>, prefix: &str) -> Vec<String> {
    let mut v: Vec<String> = store
        .keys("state")
        .into_iter()
        .filter(|k| k.starts_with(&format!("s/people/{prefix}")))
        .collect();
    v.sort();
    v
}

#[tokio::test]
async fn a_hand_over_appends_deltas_and_never_rewrites_a_base() {
    let store = Arc::new(MemoryStore::new());
    let braze = Arc::new(ScriptedBraze {
        refuse: Mutex::new(Vec::new()),
        delay: Duration::ZERO,
        sent: Mutex::new(Vec::new()),
    });
    let handovers = Arc::new(Handovers::default());
    let p1 = plan(&store, "in/a.csv", csv(400, "gold")).await;
    assert!(
        runner(&store, &braze, None, &handovers)
            .run(&p1, None)
            .await
            .unwrap()
            .complete()
    );
    let bases = state_objects(&store, "base-");
    assert!(!bases.is_empty());

    // Every user changes; the run may send for 0.5 s of the ~2.4 s needed, then hands over.
    let slow = Arc::new(ScriptedBraze {
        refuse: Mutex::new(Vec::new()),
        delay: Duration::from_millis(60),
        sent: Mutex::new(Vec::new()),
    });
    let p2 = plan(&store, "in/b.csv", csv(400, "platinum")).await;
    let short = runner(&store, &slow, Some(Duration::from_millis(500)), &handovers);
    let out = short.run(&p2, None).await.unwrap();
    assert!(out.hand_over);
    assert_eq!(
        state_objects(&store, "base-"),
        bases,
        "no base was rewritten"
    );
    assert!(
        !state_objects(&store, "delta-").is_empty(),
        "the confirmed part went to deltas"
    );
    let first = slow.sent.lock().unwrap().len();

    // The next run finishes without resending, and its complete commit may fold the deltas.
    let out = runner(&store, &slow, None, &handovers)
        .run(&p2, None)
        .await
        .unwrap();
    assert!(out.complete());
    assert_eq!(
        slow.sent.lock().unwrap().len(),
        400,
        "sent {first} then the rest, once each"
    );
    assert_eq!(confirmed_users(&store).await, 400);
}

#[tokio::test]
async fn a_forced_replay_cut_by_its_deadline_goes_on_where_it_stopped() {
    let store = Arc::new(MemoryStore::new());
    let braze = Arc::new(ScriptedBraze {
        refuse: Mutex::new(Vec::new()),
        delay: Duration::from_millis(60),
        sent: Mutex::new(Vec::new()),
    });
    let handovers = Arc::new(Handovers::default());
    let p = plan(&store, "in/big.csv", csv(400, "silver")).await;
    let out = runner(&store, &braze, None, &handovers)
        .run(&p, None)
        .await
        .unwrap();
    assert!(out.complete());
    braze.sent.lock().unwrap().clear();

    // The same export replayed by force (object metadata): every user is resent, but a run
    // may send for 0.5 s only, so it hands over.
    let forced = ExportPlan {
        force_full: true,
        forced_salt: Some(7),
        ..p.clone()
    };
    let short = runner(&store, &braze, Some(Duration::from_millis(500)), &handovers);
    let out = short.run(&forced, None).await.unwrap();
    assert!(out.hand_over && !out.complete());
    let first = braze.sent.lock().unwrap().len();
    assert!(first > 0 && first < 400, "sent {first}");
    // Its continuation (the same replay) goes on where it stopped: each user is resent once.
    let out = runner(&store, &braze, None, &handovers)
        .run(&forced, None)
        .await
        .unwrap();
    assert!(out.complete(), "{:?}", out.summary);
    let sent = braze.sent.lock().unwrap().clone();
    let once: std::collections::BTreeSet<&String> = sent.iter().collect();
    assert_eq!(
        (sent.len(), once.len()),
        (400, 400),
        "every user resent exactly once across the hand-over"
    );
    // A later forced upload of the export (another replay) resends everyone again.
    braze.sent.lock().unwrap().clear();
    let again = ExportPlan {
        forced_salt: Some(8),
        ..forced
    };
    let out = runner(&store, &braze, None, &handovers)
        .run(&again, None)
        .await
        .unwrap();
    assert!(out.complete());
    assert_eq!(braze.sent.lock().unwrap().len(), 400);
}
