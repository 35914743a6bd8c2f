//! Simulated Braze: `POST /users/track` through braze-sim's contract in process (validation,
//! object limits, update-only mode, `errors[]`), with the seed's faults: 429 and 5xx before
//! applying, applied-then-500, objects refused in `errors[]`, latency, and a crash of the
//! calling invocation while its request is in flight.

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use async_trait::async_trait;
use braze_sim::contract::{AnswerMode, Limits, track_with};
use braze_sim::profile::ProfileStore;
use braze_sync::send::braze::{BrazeApi, RateLimitInfo, TrackError, TrackResponse};
use bytes::Bytes;
use serde_json::{Value, json};

use crate::rng::keyed;
use crate::world::{Gate, World};

/// Braze's side: profiles and what it refused last.
#[derive(Default)]
pub struct Braze {
    /// Profiles.
    pub profiles: Mutex<ProfileStore>,
    /// Users whose last object Braze refused (their values may lag the export).
    pub refused: Mutex<BTreeSet<String>>,
}

/// The [`BrazeApi`] one container sees.
#[derive(Clone)]
pub struct SimBraze {
    world: Arc<World>,
    braze: Arc<Braze>,
    gate: Arc<Mutex<Arc<Gate>>>,
}

fn ids(v: &Value) -> Vec<String> {
    v["attributes"]
        .as_array()
        .map(|a| {
            a.iter()
                .map(|o| o["external_id"].as_str().unwrap_or("?").to_string())
                .collect()
        })
        .unwrap_or_default()
}

impl SimBraze {
    /// Braze for the invocation behind `gate`.
    pub fn new(world: Arc<World>, braze: Arc<Braze>, gate: Arc<Mutex<Arc<Gate>>>) -> Self {
        Self { world, braze, gate }
    }

    fn gate(&self) -> Arc<Gate> {
        self.gate.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Applies `body` (less the objects the seed refuses) and builds Braze's answer.
    fn apply(&self, gate: &Gate, body: &[u8]) -> (u16, Value) {
        let Ok(mut v) = serde_json::from_slice::<Value>(body) else {
            return (400, json!({"message": "invalid JSON"}));
        };
        let f = &self.world.faults;
        let mut refused = Vec::new();
        if let Some(objs) = v.get_mut("attributes").and_then(Value::as_array_mut) {
            let all = std::mem::take(objs);
            for (i, o) in all.into_iter().enumerate() {
                let id = o["external_id"].as_str().unwrap_or("?").to_string();
                let draw = keyed(
                    self.world.seed,
                    &[
                        b"refuse",
                        &gate.inv.to_le_bytes(),
                        id.as_bytes(),
                        &o.to_string().into_bytes(),
                    ],
                );
                if draw < f.braze_refuse {
                    refused.push((i, id));
                } else {
                    objs.push(o);
                }
            }
        }
        let kept: Vec<usize> = {
            let n = ids(&v).len() + refused.len();
            let r: BTreeSet<usize> = refused.iter().map(|(i, _)| *i).collect();
            (0..n).filter(|i| !r.contains(i)).collect()
        };
        let mut errors: Vec<Value> = refused
            .iter()
            .map(|(i, _)| json!({"type": "simulated refusal", "input_array": "attributes", "index": i}))
            .collect();
        let applied_ids = ids(&v);
        let mut status = 400;
        let mut message = json!("no valid data");
        if !applied_ids.is_empty() {
            let mut profiles = self
                .braze
                .profiles
                .lock()
                .unwrap_or_else(|e| e.into_inner());
            let out = track_with(
                &mut profiles,
                &serde_json::to_vec(&v).unwrap_or_default(),
                &Limits::default(),
                AnswerMode::default(),
            );
            status = out.status;
            if let Some(m) = out.body.get("message") {
                message = m.clone();
            }
            let mut invalid = BTreeSet::new();
            for e in &out.errors {
                invalid.insert(e.index);
                errors.push(json!({"type": e.kind, "input_array": "attributes", "index": kept.get(e.index).copied().unwrap_or(e.index)}));
            }
            let mut refused_set = self.braze.refused.lock().unwrap_or_else(|e| e.into_inner());
            let attrs: u64 = v["attributes"]
                .as_array()
                .map(|a| {
                    a.iter()
                        .enumerate()
                        .filter(|(i, _)| !invalid.contains(i))
                        .map(|(_, o)| {
                            o.as_object().map_or(0, |m| {
                                m.keys()
                                    .filter(|k| *k != "external_id" && !k.starts_with('_'))
                                    .count() as u64
                            })
                        })
                        .sum()
                })
                .unwrap_or(0);
            for (i, id) in applied_ids.iter().enumerate() {
                if invalid.contains(&i) {
                    refused_set.insert(id.clone());
                } else {
                    refused_set.remove(id);
                }
            }
            self.world.stat(|s| s.attributes_applied += attrs);
        }
        {
            let mut refused_set = self.braze.refused.lock().unwrap_or_else(|e| e.into_inner());
            for (_, id) in &refused {
                refused_set.insert(id.clone());
            }
        }
        (status, json!({"message": message, "errors": errors}))
    }
}

#[async_trait]
impl BrazeApi for SimBraze {
    async fn track(&self, body: Bytes) -> Result<TrackResponse, TrackError> {
        let gate = self.gate();
        let gone = || TrackError::Connection {
            detail: "the invocation's container is gone".into(),
        };
        if gate.crashed() {
            return Err(gone());
        }
        let f = &self.world.faults;
        let key = format!("{:016x}", xxhash_rust::xxh3::xxh3_64(&body));
        let fate = self.world.fate(
            &gate,
            "track",
            &key,
            f.braze_429 + f.braze_5xx,
            f.braze_applied_500,
            f.braze_latency_ms,
        );
        if !fate.latency.is_zero() {
            tokio::time::sleep(fate.latency).await;
            if gate.crashed() {
                return Err(gone());
            }
        }
        self.world.stat(|s| s.braze_requests += 1);
        if fate.crash {
            self.world
                .trace(|| format!("inv {} crash at braze track {key}", gate.inv));
            gate.crash();
            std::future::pending::<()>().await;
        }
        let rate = RateLimitInfo::default();
        if fate.fail {
            self.world.stat(|s| s.failed_calls += 1);
            let draw = keyed(
                self.world.seed,
                &[b"which", &gate.inv.to_le_bytes(), key.as_bytes()],
            );
            self.world
                .trace(|| format!("inv {} braze {key} failed before applying", gate.inv));
            return Err(if draw * (f.braze_429 + f.braze_5xx) < 1000 * f.braze_429 {
                TrackError::RateLimited {
                    message: "rate limited".into(),
                    rate: RateLimitInfo {
                        retry_after_s: Some(1.0),
                        ..rate
                    },
                }
            } else if draw.is_multiple_of(2) {
                TrackError::Server {
                    status: 503,
                    message: "unavailable".into(),
                    rate,
                }
            } else {
                TrackError::Timeout {
                    detail: "no answer in time".into(),
                }
            });
        }
        let (status, answer) = self.apply(&gate, &body);
        self.world.trace(|| {
            format!(
                "inv {} braze {key} applied {:?} -> {status} {answer}",
                gate.inv,
                ids(&serde_json::from_slice(&body).unwrap_or(Value::Null))
            )
        });
        if fate.lose {
            self.world.stat(|s| s.lost_answers += 1);
            return Err(TrackError::Server {
                status: 500,
                message: "internal error (applied)".into(),
                rate,
            });
        }
        let code = reqwest::StatusCode::from_u16(status).unwrap_or(reqwest::StatusCode::OK);
        braze_sync::send::braze::client::classify(
            code,
            rate,
            &serde_json::to_vec(&answer).unwrap_or_default(),
            |s| s.to_string(),
            "braze-sim",
        )
    }
}
