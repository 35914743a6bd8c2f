//! The Braze Currents profile-change feed at the handler's entry point: after a first export
//! is synced, currents-normalize's feed objects (a delete of u1, an SDK update of u2's `tier`,
//! an update of u3 back to the value Braze confirmed) sit in the state bucket; the next,
//! unchanged export notification sends u1's whole profile and u2's `tier`, nothing else, and
//! counts them in its report; a third unchanged export sends nothing (the feed is applied once).
#![allow(clippy::unwrap_used)]

use crate::common;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use braze_sync::config::route::Route;
use braze_sync::run::handler::Handler;
use braze_sync::run::runner::RunnerSettings;
use braze_sync::send::braze::{BrazeApi, RateLimitInfo, TrackError, TrackResponse};
use bridge_shared::S3Uri;
use bridge_shared::object_store::{MemoryStore, ObjectStore, PutCondition};
use bridge_shared::profile_feed::{
    ChangeKind, FEED_FOLDER, FORMAT, FeedObject, ProfileChange, feed_key,
};
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
[attributes.store]
type = "String"
"#;

/// Braze accepting everything, keeping every attribute object it was sent.
#[derive(Default)]
struct Recording(Mutex<Vec<Value>>);

#[async_trait]
impl BrazeApi for Recording {
    async fn track(&self, body: Bytes) -> Result<TrackResponse, TrackError> {
        let v: Value = serde_json::from_slice(&body).unwrap();
        let mut sent = self.0.lock().unwrap();
        sent.extend(v["attributes"].as_array().unwrap().iter().cloned());
        Ok(TrackResponse {
            status: 201,
            message: "success".into(),
            errors: Vec::new(),
            rate: RateLimitInfo::default(),
        })
    }
}

impl Recording {
    /// The objects sent since the last call, by user, without the identifier and flags.
    fn take(&self) -> BTreeMap<String, Value> {
        std::mem::take(&mut *self.0.lock().unwrap())
            .into_iter()
            .map(|mut o| {
                let id = o["external_id"].as_str().unwrap().to_string();
                let m = o.as_object_mut().unwrap();
                m.remove("external_id");
                m.remove("_update_existing_only");
                (id, o)
            })
            .collect()
    }
}

fn csv() -> Bytes {
    let mut s = String::from("id,tier,store\n");
    for i in 0..5 {
        s.push_str(&format!("u{i},gold,Lyon\n"));
    }
    Bytes::from(s)
}

fn change(kind: ChangeKind, id: &str, attributes: Value) -> ProfileChange {
    ProfileChange {
        kind,
        external_id: Some(id.into()),
        braze_id: None,
        time_ms: 0,
        source: (kind == ChangeKind::Updated).then(|| "SDK".to_string()),
        attributes: serde_json::from_value(attributes).unwrap(),
    }
}

/// What currents-normalize writes for one Currents file of `event_type`.
async fn feed(store: &MemoryStore, event_type: &str, changes: Vec<ProfileChange>) {
    let hour = chrono::Utc::now().format("%Y-%m-%d-%H").to_string();
    let source = format!("currents/event_type={event_type}/date={hour}/file.avro");
    let key = feed_key(&format!("s/{FEED_FOLDER}"), &hour, event_type, &source);
    let body = FeedObject {
        format: FORMAT,
        source: format!("s3://currents/{source}"),
        event_type: event_type.into(),
        delivery_hour: hour,
        changes,
    };
    store
        .put(
            &S3Uri::new("state", key),
            Bytes::from(serde_json::to_vec(&body).unwrap()),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
}

async fn export(store: &MemoryStore, h: &Handler, key: &str) -> Value {
    store
        .put(
            &S3Uri::new("exports", key),
            csv(),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
    let event = json!({"Records": [{"eventSource": "aws:s3", "eventName": "ObjectCreated:Put",
        "s3": {"bucket": {"name": "exports"}, "object": {"key": key}}}]});
    let out = h.handle(&event, None).await.unwrap();
    assert_eq!(out["results"][0]["outcome"], "synced", "{out}");
    let uri: S3Uri = out["results"][0]["report"]
        .as_str()
        .unwrap()
        .parse()
        .unwrap();
    serde_json::from_slice(&store.get(&uri).await.unwrap().1).unwrap()
}

#[tokio::test]
async fn the_next_unchanged_export_resends_what_currents_says_braze_lost_and_nothing_else() {
    let store = Arc::new(MemoryStore::new());
    let braze = Arc::new(Recording::default());
    let route = Route::from_toml(ROUTE, "t").unwrap();
    let h = common::handler(
        store.clone(),
        &route,
        braze.clone(),
        RunnerSettings::new("state", "s/", "r/", "x/"),
        None,
    );

    export(&store, &h, "in/people_2026-12-01.csv").await;
    assert_eq!(braze.take().len(), 5, "the first export sends everyone");

    feed(
        &store,
        "users.UserDeleteRequest",
        vec![change(ChangeKind::Deleted, "u1", json!({}))],
    )
    .await;
    feed(
        &store,
        "users.profile.Update",
        vec![
            change(ChangeKind::Updated, "u2", json!({"tier": "silver"})),
            // Back to what Braze confirmed (this bridge's own write coming back): no resend.
            change(ChangeKind::Updated, "u3", json!({"tier": "gold"})),
        ],
    )
    .await;

    let report = export(&store, &h, "in/people_2026-12-02.csv").await;
    let sent = braze.take();
    assert_eq!(
        sent,
        BTreeMap::from([
            ("u1".to_string(), json!({"tier": "gold", "store": "Lyon"})),
            ("u2".to_string(), json!({"tier": "gold"})),
        ]),
        "u1's whole profile and u2's tier, nothing else"
    );
    assert_eq!(report["forgotten_by_currents"], 1, "{report}");
    assert_eq!(report["invalidated_by_currents"], 1, "{report}");

    let report = export(&store, &h, "in/people_2026-12-03.csv").await;
    assert!(braze.take().is_empty(), "the feed is applied once");
    assert_eq!(report["forgotten_by_currents"], 0);
}
