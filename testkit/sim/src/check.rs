//! The invariants, checked when the world is quiet (no message left, no invocation running):
//! 1. Braze holds, for every user of the newest applicable export, that export's values
//!    (users Braze refused aside); departures are sent unless the run's report says held.
//! 2. The confirmed state agrees with Braze: an export made of exactly what Braze holds,
//!    diffed against the state by the real diff, sends nothing (no value in Braze the state
//!    does not know, no confirmed value Braze never received). An attribute the state marks
//!    unknown claims nothing (the next export resends it), so it agrees with any value.
//! 3. No route lock, running export claim or `_fan_out/` object is left behind (a route lock
//!    whose holder crashed counts once its lease has run out: it keeps no run out).
//! 4. Every export's notification ended with a ledger entry and the report it names (or the
//!    DLQ with a report): nothing acknowledged without a durable record. A message that moves
//!    to the DLQ is checked as it moves ([`dead_letter_reported`]): when its last receive was
//!    answered, a report says why the function gave up on it.
//! 5. In a schedule without faults, attribute updates applied <= 1.1 x the minimal set.

use std::collections::BTreeMap;
use std::sync::Arc;

use braze_sync::config::route::Route;
use braze_sync::diff::export::{Part, ProduceOptions};
use braze_sync::diff::in_memory::produce;
use braze_sync::model::UserDelta;
use braze_sync::state::confirmed::{Snapshot, UNKNOWN_FP};
use braze_sync::state::ledger::{Ledger, LedgerStatus};
use braze_sync::state::route_lock::{lock_uri, read_lock};
use braze_sync::state::store::StateStore;
use bridge_shared::lease::LeaseDoc;
use bridge_shared::{ObjectStore, S3Uri};
use serde_json::Value;

use crate::lambda::{Env, REPORTS_PREFIX, STATE_BUCKET, STATE_PREFIX};
use crate::workload::{Export, Kind, expected, minimal_updates};

/// Bucket the exports land in.
pub const EXPORTS_BUCKET: &str = "exports";

/// The attribute names of a route: (tier, score, audience).
fn names(route: &str) -> (&'static str, &'static str, &'static str) {
    match route {
        "people" => ("tier", "score", "vip"),
        _ => ("level", "points", "club"),
    }
}

/// Braze's profiles of a route's users: id -> attributes.
fn profiles(env: &Env, route: &str) -> BTreeMap<String, serde_json::Map<String, Value>> {
    let prefix = if route == "people" { "u" } else { "m" };
    let p = env.braze.profiles.lock().unwrap_or_else(|e| e.into_inner());
    p.iter()
        .filter(|(k, _)| k.as_str().starts_with(prefix))
        .map(|(k, prof)| (k.as_str().to_string(), prof.attributes.clone()))
        .collect()
}

fn as_bool(v: Option<&Value>) -> Option<bool> {
    v.and_then(Value::as_bool)
}

/// The export id the handler gives an export's trigger.
pub fn export_id(env: &Env, e: &Export) -> Option<String> {
    let key = e.trigger_key();
    let body = env.s3.body(EXPORTS_BUCKET, &key)?;
    Some(format!(
        "s3://{EXPORTS_BUCKET}/{key}#{:016x}",
        xxhash_rust::xxh3::xxh3_64(&body)
    ))
}

/// Checks every invariant; returns the violations.
pub async fn check(
    env: &Env,
    store: &Arc<dyn ObjectStore>,
    exports: &BTreeMap<&'static str, Vec<Export>>,
    clean: bool,
) -> Vec<String> {
    let mut v = Vec::new();
    for (route_name, list) in exports {
        let Some(route) = env.routes.iter().find(|r| r.name() == *route_name) else {
            continue;
        };
        v.extend(braze_holds_newest(env, store, route, list).await);
        v.extend(state_agrees_with_braze(env, store, route).await);
        v.extend(nothing_left_behind(env, store, route).await);
        v.extend(every_export_recorded(env, store, route, list).await);
    }
    if clean {
        let minimal: u64 = exports.values().map(|l| minimal_updates(l)).sum();
        let applied = env
            .world
            .stats
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .attributes_applied;
        if applied as f64 > 1.1 * minimal as f64 + 1.0 {
            v.push(format!(
                "invariant 5: {applied} attribute updates applied in a schedule without faults, more than 1.1 x the minimal {minimal}"
            ));
        }
    }
    v
}

async fn report_of(
    store: &Arc<dyn ObjectStore>,
    route: &Route,
    id: &str,
) -> Option<(LedgerStatus, Option<Value>)> {
    let ledger = Ledger::new(
        store.as_ref(),
        STATE_BUCKET,
        format!("{STATE_PREFIX}{}/ledger/", route.name()),
    );
    let entry = ledger.entry(id).await.ok().flatten()?;
    let report = match &entry.report {
        Some(uri) => match uri.parse::<S3Uri>() {
            Ok(u) => store
                .get(&u)
                .await
                .ok()
                .and_then(|(_, b)| serde_json::from_slice::<Value>(&b).ok()),
            Err(_) => None,
        },
        None => None,
    };
    Some((entry.status, report))
}

async fn braze_holds_newest(
    env: &Env,
    store: &Arc<dyn ObjectStore>,
    route: &Route,
    list: &[Export],
) -> Vec<String> {
    let mut v = Vec::new();
    let Some(newest) = expected(list) else {
        return v;
    };
    let (tier, score, aud) = names(route.name());
    let profiles = profiles(env, route.name());
    let refused = env
        .braze
        .refused
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .clone();
    for (id, row) in &newest.rows {
        if refused.contains(id) {
            continue;
        }
        let p = profiles.get(id);
        let got_tier = p.and_then(|p| p.get(tier)).and_then(Value::as_str);
        let got_score = p.and_then(|p| p.get(score)).and_then(Value::as_i64);
        let got_aud = as_bool(p.and_then(|p| p.get(aud))).unwrap_or(false);
        if got_tier != Some(row.tier.as_str()) || got_score != Some(row.score) || got_aud != row.vip
        {
            v.push(format!(
                "invariant 1: route {} user {id}: Braze holds {tier}={got_tier:?} {score}={got_score:?} {aud}={got_aud}, the newest export ({} #{}) says {}/{}/{}",
                route.name(),
                newest.trigger_key(),
                newest.seq,
                row.tier,
                row.score,
                row.vip
            ));
        }
    }
    // Departures: when the run that applied the newest export held none, nobody absent from
    // it is still a member.
    let held = match export_id(env, newest) {
        Some(id) => match report_of(store, route, &id).await {
            Some((_, Some(r))) => r["departures_held"].as_u64().unwrap_or(0),
            _ => 1,
        },
        None => 1,
    };
    if held == 0 {
        for (id, p) in &profiles {
            if !newest.rows.contains_key(id)
                && !refused.contains(id)
                && as_bool(p.get(aud)) == Some(true)
            {
                v.push(format!(
                    "invariant 1: route {} user {id} left the audience in the newest export ({}), whose run held no departures, yet Braze still has {aud}=true",
                    route.name(),
                    newest.trigger_key()
                ));
            }
        }
    }
    v.truncate(10);
    v
}

/// The CSV of what Braze holds for a route's users, in the route's columns.
fn braze_as_export(env: &Env, route: &Route) -> String {
    let (tier, score, aud) = names(route.name());
    let people = route.name() == "people";
    let mut s = if people {
        String::from("id,tier,score,vip\n")
    } else {
        String::from("id,level,points\n")
    };
    for (id, p) in profiles(env, route.name()) {
        let t = p.get(tier).and_then(Value::as_str).unwrap_or("");
        let sc = p.get(score).map(|x| x.to_string()).unwrap_or_default();
        let member = as_bool(p.get(aud));
        if people {
            let vip = member.map(|b| b.to_string()).unwrap_or_default();
            s.push_str(&format!("{id},{t},{sc},{vip}\n"));
        } else if member == Some(true) {
            s.push_str(&format!("{id},{t},{sc}\n"));
        } else if member.is_none() {
            // Known to Braze with values but never a member: the state cannot have sent it.
            s.push_str(&format!("{id},{t},{sc}\n"));
        }
    }
    s
}

async fn state_agrees_with_braze(
    env: &Env,
    store: &Arc<dyn ObjectStore>,
    route: &Route,
) -> Vec<String> {
    let state = StateStore::new(store.clone(), STATE_BUCKET, STATE_PREFIX, route.name())
        .with_range_users(env.deployment.range_users);
    let snapshot = match state.load(route).await {
        Ok((_, s)) => s,
        Err(e) => {
            return vec![format!(
                "invariant 2: route {}: the state does not load: {e}",
                route.name()
            )];
        }
    };
    let csv = braze_as_export(env, route);
    let parts = vec![Ok(Part {
        source: "braze".to_string(),
        reader: std::io::Cursor::new(csv.into_bytes()),
    })];
    let mut opts = ProduceOptions::for_route(route, "braze");
    opts.full_resend = false;
    opts.allow_departures = true;
    let mut out = Vec::new();
    let result = produce(
        parts,
        route,
        &snapshot,
        &opts,
        &mut |d| {
            if !d.records_only() && !only_unknown(&snapshot, &d) && out.len() < 10 {
                out.push(format!(
                    "invariant 2: route {}: the state and Braze disagree on {:?}{}: an export of what Braze holds would send {}",
                    route.name(),
                    d.identifier,
                    if d.is_new { " (a user the state does not track)" } else { "" },
                    d.to_attribute_object()
                ));
            }
            Ok(())
        },
        &mut |_| {},
    );
    if let Err(e) = result {
        out.push(format!(
            "invariant 2: route {}: diffing Braze against the state failed: {e}",
            route.name()
        ));
    }
    out
}

/// Whether every attribute `d` would send is one the state marks unknown: the state claims no
/// value there (a run that may have sent it, or Braze refused it, left it to be resent), so it
/// cannot disagree with Braze.
fn only_unknown(snapshot: &Snapshot, d: &UserDelta) -> bool {
    if d.is_new {
        return false;
    }
    let Some(user) = snapshot.get(d.identifier.user_key()) else {
        return false;
    };
    d.changes.iter().all(|c| {
        snapshot
            .slot_of_name(&c.name)
            .and_then(|slot| user.fp(slot))
            == Some(UNKNOWN_FP)
    })
}

async fn nothing_left_behind(
    env: &Env,
    store: &Arc<dyn ObjectStore>,
    route: &Route,
) -> Vec<String> {
    let mut v = Vec::new();
    let lock = lock_uri(STATE_BUCKET, STATE_PREFIX, route.name());
    // A holder that crashed leaves its lease to expire by itself (nothing renews it once no
    // invocation runs), and `status` shows an expired lease as no run: only a lease that still
    // keeps the next run out when the world is quiet is left behind.
    let now_ms = braze_sync::clock::now().timestamp_millis();
    if let Ok(Some(doc)) = read_lock(store.as_ref(), &lock).await
        && doc.keeps_out(now_ms)
    {
        v.push(format!(
            "invariant 3: route {}: the route lock is left held by {} until {} ({} ms from now)",
            route.name(),
            doc.holder,
            doc.lease_until_ms,
            doc.lease_until_ms - now_ms
        ));
    }
    let prefix = format!("{STATE_PREFIX}{}/", route.name());
    for key in env.s3.keys(STATE_BUCKET, &prefix) {
        // A merged fork's state objects stay (the route head names them); the fan-out's
        // control objects must not.
        let control = [
            "manifest.json",
            "final.json",
            "done.json",
            "head.json",
            "departures.bin",
            "attempt.json",
        ];
        if key.contains("/_fan_out/") && control.iter().any(|c| key.ends_with(c)) {
            v.push(format!(
                "invariant 3: route {}: fan-out control object {key} is left behind",
                route.name()
            ));
            break;
        }
    }
    let ledger = format!("{prefix}ledger/");
    for key in env.s3.keys(STATE_BUCKET, &ledger) {
        if let Some(body) = env.s3.body(STATE_BUCKET, &key)
            && let Ok(entry) =
                serde_json::from_slice::<braze_sync::state::ledger::LedgerEntry>(&body)
            && matches!(
                entry.status,
                LedgerStatus::Running | LedgerStatus::FannedOut
            )
        {
            v.push(format!(
                "invariant 3: route {}: export {} is left {:?} in the ledger",
                route.name(),
                entry.export_id,
                entry.status
            ));
        }
    }
    v
}

async fn every_export_recorded(
    env: &Env,
    store: &Arc<dyn ObjectStore>,
    route: &Route,
    list: &[Export],
) -> Vec<String> {
    let mut v = Vec::new();
    for e in list {
        let Some(id) = export_id(env, e) else {
            v.push(format!(
                "invariant 4: route {}: export {} was never uploaded",
                route.name(),
                e.trigger_key()
            ));
            continue;
        };
        match report_of(store, route, &id).await {
            None => v.push(format!(
                "invariant 4: route {}: export {} ({:?}) has no ledger entry: its notification was acknowledged without a record",
                route.name(),
                e.trigger_key(),
                e.kind
            )),
            Some((status, report)) => {
                if report.is_none() {
                    v.push(format!(
                        "invariant 4: route {}: export {} ended {status:?} without the report its ledger entry names",
                        route.name(),
                        e.trigger_key()
                    ));
                }
                let want_applied = e.kind == Kind::Regular || e.kind == Kind::ForcedReplay;
                let why = report
                    .as_ref()
                    .map(|r| format!("{} {}", r["status"], r["error"]))
                    .unwrap_or_default();
                if want_applied && !matches!(status, LedgerStatus::Complete | LedgerStatus::SkippedStale | LedgerStatus::Incomplete) {
                    v.push(format!(
                        "invariant 4: route {}: export {} ended {status:?}: {why}",
                        route.name(),
                        e.trigger_key()
                    ));
                }
            }
        }
    }
    let _ = REPORTS_PREFIX;
    v
}

/// Invariant 4 when a message moves to the DLQ: if the invocation of its last receive
/// answered (it neither crashed nor timed out), a `failed` report names the message's object
/// and says why it gave up. A crash on the last receive leaves nothing to say it.
pub fn dead_letter_reported(env: &Env, m: &crate::queue::Message) -> Option<String> {
    if !m.answered {
        return None;
    }
    let body: Value = serde_json::from_str(&m.body).ok()?;
    let gave_up = |names: &dyn Fn(&Value) -> bool| {
        env.s3.keys(STATE_BUCKET, REPORTS_PREFIX).iter().any(|k| {
            env.s3
                .body(STATE_BUCKET, k)
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .is_some_and(|r| {
                    r["status"] == "failed"
                        && r["error"]
                            .as_str()
                            .is_some_and(|e| e.starts_with("gave up after"))
                        && names(&r)
                })
        })
    };
    if let Some(piece) = body.get("bridge_fan_out") {
        let run_id = format!(
            "{}-p{:03}-gave-up",
            piece["run_id"].as_str().unwrap_or_default(),
            piece["piece"].as_u64().unwrap_or_default()
        );
        let reported = gave_up(&|r| r["run_id"] == run_id.as_str());
        return (!reported).then(|| {
            format!(
                "invariant 4: fan-out piece message {} ({piece}) went to the DLQ after {} receives, the last one answered, with no report saying why",
                m.id, m.receives
            )
        });
    }
    let s3 = &body["Records"][0]["s3"];
    let bucket = s3["bucket"]["name"].as_str()?;
    let key = bridge_shared::trigger::decode_s3_key(s3["object"]["key"].as_str()?).ok()?;
    let object = format!("s3://{bucket}/{key}");
    let reported = gave_up(&|r| {
        r["sources"]
            .as_array()
            .is_some_and(|s| s.iter().any(|s| s.as_str() == Some(object.as_str())))
    });
    (!reported).then(|| {
        format!(
            "invariant 4: message {} ({object}) went to the DLQ after {} receives, the last one answered, with no report saying why",
            m.id, m.receives
        )
    })
}
