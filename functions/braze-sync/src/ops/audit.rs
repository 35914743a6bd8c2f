//! Drift audit: does Braze still hold what the route's confirmed state says it confirmed?
//! Another writer (an SDK, a campaign, another integration) can change a route-owned
//! attribute, and a privacy request or a merge can delete a user; the state then believes
//! Braze holds a value it does not and the next export "has no change".
//!
//! [`audit`] picks a uniform sample of the users of the route's confirmed state (the state
//! keeps no identifiers, so they are read from the export its watermark names, keeping only
//! users the state holds), reads them back with `POST /users/export/ids` (50 identifiers a
//! request, paced under the endpoint's 250 requests a minute, `fields_to_export` listing the
//! route's fields), and compares every attribute the state has a confirmed fingerprint for
//! with the fingerprint of Braze's value. It reports drift per attribute (share, count, five
//! examples with Braze's value and the state's), users missing in Braze, and an estimate for
//! the whole route.
//!
//! With `heal`, under the route lock, it writes one checkpoint segment through the state's
//! conditional head write ([`StateStore::checkpoint`]): a drifted attribute gets
//! [`UNKNOWN_FP`] (a fingerprint no value has, so the next export resends it whatever its
//! value, `null` included), a missing user's confirmed attributes are forgotten (the next
//! export sends every non-empty value), and the user's row digest is cleared so the row is
//! mapped again. Nothing else in the state changes: the segment names only those slots.

use std::collections::HashMap;
use std::sync::Arc;

use bridge_shared::metrics::{Metric, emf_line, emit};
use bridge_shared::{ObjectStore, S3Uri};
use serde::Serialize;
use serde_json::Value;
use tracing::info;

use crate::config::route::{Route, SlotKind};
use crate::diff::export::SyncError;
use crate::model::{AttributeChange, UserDelta, fingerprint};
use crate::ops::read_back::{
    ReadBack, SampleSource, read_profiles, reservoir_sample, same_for_braze, user_label,
    write_report,
};
use crate::ops::report::METRICS_NAMESPACE;
use crate::send::braze::{LookupError, UserLookup};
use crate::state::confirmed::{Snapshot, UNKNOWN_FP, stored_fp};
use crate::state::route_lock::{RouteLock, lock_uri};
use crate::state::store::{StateError, StateStore};

/// Users sampled by default.
pub const DEFAULT_SAMPLE: usize = 1_000;
/// Examples listed per attribute.
pub const EXAMPLES: usize = 5;
pub use crate::ops::read_back::EXPORT_IDS_PER_MINUTE;
/// Conflicting head writes retried by `--heal` before giving up.
const HEAL_ATTEMPTS: usize = 5;

/// How to audit.
#[derive(Debug, Clone)]
pub struct AuditOptions {
    /// Users to sample.
    pub sample: usize,
    /// Forget what drifted so the next export resends it.
    pub heal: bool,
    /// Seed of the sample.
    pub seed: u64,
    /// Lookups a minute at most.
    pub lookups_per_minute: u32,
    /// How long the route lock is held at most (`heal`).
    pub lease_s: i64,
}

impl Default for AuditOptions {
    fn default() -> Self {
        Self {
            sample: DEFAULT_SAMPLE,
            heal: false,
            seed: rand::random(),
            lookups_per_minute: EXPORT_IDS_PER_MINUTE,
            lease_s: 3_600,
        }
    }
}

/// Where the route's state and reports live.
#[derive(Debug, Clone)]
pub struct AuditTarget {
    /// State bucket.
    pub state_bucket: String,
    /// State prefix.
    pub state_prefix: String,
    /// Reports prefix.
    pub reports_prefix: String,
}

/// One drifted value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct DriftExample {
    /// The user (`external_id:…`).
    pub user: String,
    /// Braze's value (`null` when Braze has none).
    pub braze: Value,
    /// The value the state confirmed: the last export's value when its fingerprint is the
    /// state's, else the stored fingerprint (`fingerprint:…`).
    pub state: Value,
}

/// Drift of one attribute over the sample.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AttributeDrift {
    /// Braze attribute name.
    pub attribute: String,
    /// Sampled users found in Braze whose state has a confirmed value for it.
    pub checked: u64,
    /// Of those, users whose Braze value differs.
    pub drifted: u64,
    /// `drifted / checked`.
    pub share: f64,
    /// `share` × the route's users: drifted values expected in the whole route.
    pub estimated_in_route: u64,
    /// Up to [`EXAMPLES`] drifted values.
    pub examples: Vec<DriftExample>,
}

/// What `--heal` wrote.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Healed {
    /// Users whose state was changed.
    pub users: u64,
    /// Drifted attributes marked for resending.
    pub attributes: u64,
    /// Missing users whose confirmed values were forgotten.
    pub missing_users: u64,
}

/// The audit's result (also the report object's body).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AuditReport {
    /// Route.
    pub route: String,
    /// The export the sample's identifiers came from (the state's watermark).
    pub export_id: String,
    /// Users in the route's state.
    pub state_users: u64,
    /// Users sampled and read from Braze.
    pub sampled: u64,
    /// Sampled users Braze does not know.
    pub missing_in_braze: u64,
    /// Up to [`EXAMPLES`] of them.
    pub missing_examples: Vec<String>,
    /// Sampled users with at least one drifted attribute, or missing.
    pub drifted_users: u64,
    /// `drifted_users / sampled`: the `drift_share` metric.
    pub drift_share: f64,
    /// `drift_share` × the route's users.
    pub estimated_drifted_users: u64,
    /// Per route attribute, in route order.
    pub attributes: Vec<AttributeDrift>,
    /// `/users/export/ids` requests made.
    pub lookups: u64,
    /// What `--heal` wrote (`None` without it).
    pub healed: Option<Healed>,
    /// The report's address.
    pub report: String,
}

impl AuditReport {
    /// The EMF line (dimension `Route`): `drift_share` and `missing_in_braze`.
    pub fn emf_line(&self, timestamp_ms: i64) -> String {
        emf_line(
            METRICS_NAMESPACE,
            &[("Route", self.route.as_str())],
            &[
                ("drift_share", Metric::Count(self.drift_share)),
                (
                    "missing_in_braze",
                    Metric::Count(self.missing_in_braze as f64),
                ),
            ],
            timestamp_ms,
        )
    }

    /// The metrics alarms watch, without dimensions so one alarm covers every route:
    /// `drift_share`.
    pub fn alarm_metrics(&self) -> Vec<(&'static str, Metric)> {
        vec![("drift_share", Metric::Count(self.drift_share))]
    }

    /// Prints the EMF lines (a scheduled audit in the Lambda): per route, and the alarm
    /// metrics across routes.
    pub fn emit_metrics(&self) {
        emit(
            METRICS_NAMESPACE,
            &[("Route", self.route.as_str())],
            &[
                ("drift_share", Metric::Count(self.drift_share)),
                (
                    "missing_in_braze",
                    Metric::Count(self.missing_in_braze as f64),
                ),
            ],
        );
        emit(METRICS_NAMESPACE, &[], &self.alarm_metrics());
    }

    /// A few lines for a terminal.
    pub fn render(&self) -> String {
        let mut s = format!(
            "route {}: {} of {} sampled users drifted ({:.1}%; about {} of {} in the route); {} missing in Braze\n",
            self.route,
            self.drifted_users,
            self.sampled,
            self.drift_share * 100.0,
            self.estimated_drifted_users,
            self.state_users,
            self.missing_in_braze,
        );
        for a in &self.attributes {
            s.push_str(&format!(
                "  {:<24} {:>6} of {:>6} drifted ({:.1}%, about {} in the route)\n",
                a.attribute,
                a.drifted,
                a.checked,
                a.share * 100.0,
                a.estimated_in_route
            ));
            for e in &a.examples {
                s.push_str(&format!(
                    "      {}: braze={} state={}\n",
                    e.user, e.braze, e.state
                ));
            }
        }
        for m in &self.missing_examples {
            s.push_str(&format!("  missing in Braze: {m}\n"));
        }
        if let Some(h) = &self.healed {
            s.push_str(&format!(
                "healed: {} attributes of {} users marked for resending, {} missing users forgotten\n",
                h.attributes, h.users, h.missing_users
            ));
        }
        s.push_str(&format!("report: {}\n", self.report));
        s
    }
}

/// The export the sample's identifiers are read from: the one the state's watermark names.
#[derive(Debug, Clone)]
pub struct AuditExport {
    /// Its id as the watermark has it (`s3://bucket/key#version`).
    pub export_id: String,
    /// Its parts (the object itself, or the parts its marker names).
    pub parts: Vec<S3Uri>,
}

/// Why the audit could not finish.
#[derive(Debug, thiserror::Error)]
pub enum AuditError {
    /// The state names another export than the one given (a run landed meanwhile).
    #[error("auditing: the state now names export {now}, not {given}; audit again")]
    ExportMoved {
        /// The export given.
        given: String,
        /// The state's watermark now.
        now: String,
    },
    /// Reading the export failed.
    #[error("auditing: reading {export}: {error}")]
    Export {
        /// The export.
        export: String,
        /// What failed.
        error: SyncError,
    },
    /// The state could not be read or written.
    #[error("auditing: {0}")]
    State(#[from] StateError),
    /// Braze could not be asked.
    #[error("auditing: {0}")]
    Lookup(#[from] LookupError),
    /// Another run holds the route (`--heal`).
    #[error("auditing: {0}")]
    Busy(String),
}

/// `fields_to_export` for the route: the identifiers, its standard fields by name, and
/// `custom_attributes` when it has custom attributes or audiences.
pub fn fields_to_export(route: &Route) -> Vec<String> {
    let mut out: Vec<String> = ["external_id", "braze_id", "user_aliases"]
        .map(String::from)
        .to_vec();
    let mut custom = false;
    for s in &route.slots {
        match s.kind {
            SlotKind::Standard(f) => out.push(f.name().to_string()),
            // Group states are not among the exported profile's fields.
            SlotKind::SubscriptionGroup => {}
            _ => custom = true,
        }
    }
    if custom {
        out.push("custom_attributes".into());
    }
    out.dedup();
    out
}

fn braze_value<'v>(profile: &'v Value, route: &Route, slot: usize) -> Option<&'v Value> {
    let s = route.slots.get(slot)?;
    match s.kind {
        SlotKind::Standard(_) => profile.get(&s.name),
        _ => profile.get("custom_attributes")?.get(&s.name),
    }
    .filter(|v| !v.is_null())
}

/// What one sampled user's comparison found.
#[derive(Debug, Default)]
struct UserFinding {
    /// `(slot, Braze's value, the state's value)` per drifted attribute.
    drifted: Vec<(usize, Value, Value)>,
    /// Slots with a confirmed value (compared).
    checked: Vec<usize>,
}

/// Compares one user present in Braze with the state. `export` is the user's delta from the
/// state's export (every non-empty value).
fn compare(route: &Route, snapshot: &Snapshot, export: &UserDelta, profile: &Value) -> UserFinding {
    let mut f = UserFinding::default();
    let Some(state) = snapshot.get(export.user_key()) else {
        return f;
    };
    for (slot, s) in route.slots.iter().enumerate() {
        let Some(confirmed) = state
            .fp(slot)
            .filter(|_| s.kind != SlotKind::SubscriptionGroup)
        else {
            continue;
        };
        f.checked.push(slot);
        let theirs = braze_value(profile, route, slot);
        let exported = export
            .changes
            .iter()
            .find(|c| c.name == s.name)
            .map(|c| &c.value);
        let export_is_state = exported.is_some_and(|v| stored_fp(fingerprint(v)) == confirmed);
        let agrees = match theirs {
            None => false,
            Some(v) => {
                stored_fp(fingerprint(v)) == confirmed
                    || (export_is_state && exported.is_some_and(|e| same_for_braze(e, v)))
            }
        };
        if !agrees {
            let state_value = match exported {
                Some(v) if export_is_state => v.clone(),
                _ => Value::String(format!("fingerprint:{confirmed:012x}")),
            };
            f.drifted
                .push((slot, theirs.cloned().unwrap_or(Value::Null), state_value));
        }
    }
    f
}

/// Audits `route` (see the module docs).
pub async fn audit(
    store: Arc<dyn ObjectStore>,
    target: &AuditTarget,
    route: Arc<Route>,
    export: AuditExport,
    lookup: &dyn UserLookup,
    opts: &AuditOptions,
) -> Result<AuditReport, AuditError> {
    let run_id = format!("audit-{}", chrono::Utc::now().format("%Y%m%dT%H%M%S%.3fZ"));
    // Healing holds the route lock from the first read of the state to its write, so no run
    // confirms values in between that the heal would then mark.
    let lock = if opts.heal {
        Some(
            RouteLock::acquire(
                store.clone(),
                lock_uri(&target.state_bucket, &target.state_prefix, route.name()),
                &run_id,
                crate::clock::now_ms(),
                opts.lease_s,
            )
            .await
            .map_err(|e| AuditError::Busy(e.to_string()))?
            .ok_or_else(|| {
                AuditError::Busy(format!(
                    "another run holds route {}; heal when it has finished",
                    route.name()
                ))
            })?,
        )
    } else {
        None
    };
    let result = audit_with(store, target, route.clone(), export, lookup, opts, &run_id).await;
    if let Some(lock) = lock
        && let Err(e) = lock.release().await
    {
        tracing::warn!(route = route.name(), error = %e, "Could not release the route lock; it expires by itself.");
    }
    result
}

async fn audit_with(
    store: Arc<dyn ObjectStore>,
    target: &AuditTarget,
    route: Arc<Route>,
    export: AuditExport,
    lookup: &dyn UserLookup,
    opts: &AuditOptions,
    run_id: &str,
) -> Result<AuditReport, AuditError> {
    let state = StateStore::new(
        store.clone(),
        &target.state_bucket,
        &target.state_prefix,
        route.name(),
    );
    let (head, snapshot) = state.load(&route).await?;
    let AuditExport { export_id, parts } = export;
    let now = head.doc.watermark.as_ref().map(|w| w.export_id.clone());
    if now.as_deref() != Some(export_id.as_str()) {
        return Err(AuditError::ExportMoved {
            given: export_id,
            now: now.unwrap_or_else(|| "none".into()),
        });
    }
    let state_users = snapshot.len() as u64;
    let (sample, snapshot) =
        sample_in_state(&store, &route, (&export_id, parts), snapshot, opts).await?;
    // Braze's profiles, paced under the endpoint's limit.
    let fields = fields_to_export(&route);
    let how = ReadBack {
        fields: Some(&fields),
        per_minute: Some(opts.lookups_per_minute),
    };
    let (profiles, lookups) = read_profiles(lookup, &sample, how).await?;
    let report_uri = S3Uri::new(
        &target.state_bucket,
        format!("{}{}/{run_id}.json", target.reports_prefix, route.name()),
    );
    let tally = Tally::of(&route, &snapshot, &sample, &profiles);
    let (mut report, heal) =
        tally.into_report(&route, export_id, state_users, lookups, &report_uri);
    if opts.heal {
        let Heal {
            records,
            mut healed,
        } = heal;
        healed.users = records.len() as u64;
        write_heal(&state, &route, &records).await?;
        info!(
            route = route.name(),
            users = healed.users,
            attributes = healed.attributes,
            missing = healed.missing_users,
            "Drift healed: the next export resends what drifted."
        );
        report.healed = Some(healed);
    }
    write_report(store.as_ref(), &report_uri, &report, "audit").await;
    info!(
        route = route.name(),
        sampled = report.sampled,
        drifted_users = report.drifted_users,
        missing = report.missing_in_braze,
        "Drift audit done."
    );
    Ok(report)
}

/// A uniform sample (reservoir) of the export's users the state holds, every value, read on
/// a blocking thread; the snapshot comes back with it. `export` is the export's id and parts.
async fn sample_in_state(
    store: &Arc<dyn ObjectStore>,
    route: &Arc<Route>,
    export: (&str, Vec<S3Uri>),
    snapshot: Snapshot,
    opts: &AuditOptions,
) -> Result<(Vec<UserDelta>, Snapshot), AuditError> {
    let (export_id, parts) = export;
    let handle = crate::clock::Blocking::new(tokio::runtime::Handle::current());
    let (st, r, n, seed) = (store.clone(), route.clone(), opts.sample, opts.seed);
    let (sample, snapshot) = tokio::task::spawn_blocking(move || {
        let from = SampleSource {
            store: &st,
            runtime: &handle,
            route: &r,
            parts: &parts,
        };
        let sample = reservoir_sample(&from, n, seed, &|d| snapshot.get(d.user_key()).is_some());
        (sample, snapshot)
    })
    .await
    .map_err(|e| AuditError::Busy(format!("the sampling task failed: {e}")))?;
    let sample = sample.map_err(|error| AuditError::Export {
        export: export_id.to_string(),
        error,
    })?;
    Ok((sample, snapshot))
}

/// What comparing the sample with Braze found, and what a heal writes.
struct Tally {
    /// Per route attribute, in route order (shares not yet computed).
    attrs: Vec<AttributeDrift>,
    /// Sampled users Braze does not know.
    missing: Vec<String>,
    /// Sampled users with at least one drifted attribute, or missing.
    drifted_users: u64,
    /// Users sampled.
    sampled: u64,
    /// What `--heal` writes.
    heal: Heal,
}

/// What `--heal` writes: one record per drifted or missing user.
struct Heal {
    /// The records.
    records: Vec<UserDelta>,
    /// What they change (`users` is set when they are written).
    healed: Healed,
}

impl Tally {
    fn of(
        route: &Route,
        snapshot: &Snapshot,
        sample: &[UserDelta],
        profiles: &HashMap<String, Value>,
    ) -> Tally {
        let mut t = Tally {
            attrs: route
                .slots
                .iter()
                .map(|s| AttributeDrift {
                    attribute: s.name.clone(),
                    checked: 0,
                    drifted: 0,
                    share: 0.0,
                    estimated_in_route: 0,
                    examples: Vec::new(),
                })
                .collect(),
            missing: Vec::new(),
            drifted_users: 0,
            sampled: sample.len() as u64,
            heal: Heal {
                records: Vec::new(),
                healed: Healed {
                    users: 0,
                    attributes: 0,
                    missing_users: 0,
                },
            },
        };
        for d in sample {
            let user = user_label(&d.identifier);
            match profiles.get(&user) {
                None => t.missing_user(route, snapshot, d, user),
                Some(profile) => t.present_user(route, snapshot, d, user, profile),
            }
        }
        t
    }

    /// A user Braze does not know: every confirmed value is forgotten, so the next export
    /// sends the user's whole profile.
    fn missing_user(&mut self, route: &Route, snapshot: &Snapshot, d: &UserDelta, user: String) {
        self.drifted_users += 1;
        self.missing.push(user);
        let changes = forget_all(route, snapshot, d);
        self.heal.healed.missing_users += 1;
        self.heal.records.push(heal_delta(d, changes));
    }

    /// A user Braze knows: each drifted attribute is counted, listed among the examples and
    /// marked unknown.
    fn present_user(
        &mut self,
        route: &Route,
        snapshot: &Snapshot,
        d: &UserDelta,
        user: String,
        profile: &Value,
    ) {
        let f = compare(route, snapshot, d, profile);
        for slot in &f.checked {
            self.attrs[*slot].checked += 1;
        }
        if f.drifted.is_empty() {
            return;
        }
        self.drifted_users += 1;
        let mut changes = Vec::new();
        for (slot, braze, state) in f.drifted {
            let a = &mut self.attrs[slot];
            a.drifted += 1;
            if a.examples.len() < EXAMPLES {
                a.examples.push(DriftExample {
                    user: user.clone(),
                    braze,
                    state,
                });
            }
            changes.push(AttributeChange {
                name: a.attribute.clone(),
                value: Value::Null,
                fingerprint: Some(UNKNOWN_FP),
            });
        }
        self.heal.healed.attributes += changes.len() as u64;
        self.heal.records.push(heal_delta(d, changes));
    }

    /// The report (without `healed`; shares over the sample, estimates for the route's
    /// `state_users`) and what a heal writes.
    fn into_report(
        self,
        route: &Route,
        export_id: String,
        state_users: u64,
        lookups: u64,
        report_uri: &S3Uri,
    ) -> (AuditReport, Heal) {
        let users_f = state_users as f64;
        let share = |part: u64, whole: u64| {
            if whole == 0 {
                0.0
            } else {
                part as f64 / whole as f64
            }
        };
        let mut attrs = self.attrs;
        for a in &mut attrs {
            a.share = share(a.drifted, a.checked);
            a.estimated_in_route = (a.share * users_f).round() as u64;
        }
        let drift_share = share(self.drifted_users, self.sampled);
        let mut missing = self.missing;
        let missing_in_braze = missing.len() as u64;
        missing.truncate(EXAMPLES);
        let report = AuditReport {
            route: route.name().to_string(),
            export_id,
            state_users,
            sampled: self.sampled,
            missing_in_braze,
            missing_examples: missing,
            drifted_users: self.drifted_users,
            drift_share,
            estimated_drifted_users: (drift_share * users_f).round() as u64,
            attributes: attrs,
            lookups,
            healed: None,
            report: report_uri.to_string(),
        };
        (report, self.heal)
    }
}

/// The changes that forget every confirmed value of a user.
fn forget_all(route: &Route, snapshot: &Snapshot, d: &UserDelta) -> Vec<AttributeChange> {
    let Some(state) = snapshot.get(d.user_key()) else {
        return Vec::new();
    };
    route
        .slots
        .iter()
        .enumerate()
        .filter(|(slot, _)| state.fp(*slot).is_some())
        .map(|(_, s)| AttributeChange {
            name: s.name.clone(),
            value: Value::Null,
            fingerprint: None,
        })
        .collect()
}

/// The record a heal writes for one user: `changes`, and no row digest (so the next export's
/// row is mapped and diffed instead of being skipped as unchanged).
fn heal_delta(d: &UserDelta, changes: Vec<AttributeChange>) -> UserDelta {
    UserDelta {
        identifier: d.identifier.clone(),
        pos: d.pos.clone(),
        changes,
        update_existing_only: d.update_existing_only,
        is_new: false,
        row_digest: None,
    }
}

/// One checkpoint segment through the head's conditional write; a conflict (another writer
/// moved the head) re-reads the head and tries again.
async fn write_heal(
    state: &StateStore,
    route: &Route,
    heal: &[UserDelta],
) -> Result<(), AuditError> {
    if heal.is_empty() {
        return Ok(());
    }
    let mut attempt = 0;
    loop {
        attempt += 1;
        let mut head = state.read_head().await?;
        match state.checkpoint(&mut head, route, heal).await {
            Ok(()) => return Ok(()),
            Err(StateError::Conflict { .. }) if attempt < HEAL_ATTEMPTS => continue,
            Err(e) => return Err(e.into()),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::{Identifier, RowPos};
    use serde_json::json;

    fn route() -> Route {
        Route::from_toml(
            r#"
name = "r"
prefix = "p/"
[identifier]
kind = "external_id"
column = "id"
[fields]
given_name = "first_name"
[attributes.tier]
type = "String"
[attributes.ltv]
type = "Decimal"
"#,
            "t",
        )
        .unwrap()
    }

    fn delta(values: &[(&str, Value)]) -> UserDelta {
        UserDelta {
            identifier: Identifier::ExternalId("u1".into()),
            pos: RowPos::default(),
            changes: values
                .iter()
                .map(|(n, v)| AttributeChange {
                    name: (*n).into(),
                    value: v.clone(),
                    fingerprint: Some(fingerprint(v)),
                })
                .collect(),
            update_existing_only: true,
            is_new: false,
            row_digest: None,
        }
    }

    #[test]
    fn only_confirmed_attributes_are_compared_and_text_differences_are_not_drift() {
        let r = route();
        let confirmed = delta(&[("tier", json!("gold")), ("ltv", json!(12.5))]);
        let mut snap = Snapshot::for_route(&r);
        snap.apply_confirmed(&confirmed);
        let export = delta(&[
            ("first_name", json!("Ada")),
            ("tier", json!("gold")),
            ("ltv", json!(12.5)),
        ]);
        // first_name has no confirmed value: not compared. 12.50 is 12.5.
        let profile = json!({"external_id": "u1", "first_name": "Other",
            "custom_attributes": {"tier": "gold", "ltv": 12.50}});
        let f = compare(&r, &snap, &export, &profile);
        assert!(f.drifted.is_empty(), "{:?}", f.drifted);
        assert_eq!(f.checked.len(), 2);
        // A changed tier and a removed ltv are drift, with the state's value beside Braze's.
        let profile = json!({"external_id": "u1", "custom_attributes": {"tier": "silver"}});
        let f = compare(&r, &snap, &export, &profile);
        let tier = r.slot_of("tier").unwrap() as usize;
        let ltv = r.slot_of("ltv").unwrap() as usize;
        let mut want = vec![
            (tier, json!("silver"), json!("gold")),
            (ltv, Value::Null, json!(12.5)),
        ];
        want.sort_by_key(|w| w.0);
        assert_eq!(f.drifted, want);
        // An export whose value is not the confirmed one shows the fingerprint instead.
        let newer = delta(&[("tier", json!("bronze"))]);
        let f = compare(&r, &snap, &newer, &profile);
        let shown = f.drifted.iter().find(|d| d.0 == tier).unwrap();
        assert!(shown.2.as_str().unwrap().starts_with("fingerprint:"));
    }

    #[test]
    fn times_compare_as_instants() {
        assert!(same_for_braze(
            &json!("2024-01-05T00:00:00Z"),
            &json!("2024-01-05T00:00:00.000Z")
        ));
        assert!(!same_for_braze(
            &json!("2024-01-05T00:00:00Z"),
            &json!("2024-01-06T00:00:00Z")
        ));
        assert!(same_for_braze(&json!(3), &json!(3.0)));
    }

    #[test]
    fn a_healed_attribute_is_resent_whatever_its_value() {
        let r = route();
        let mut snap = Snapshot::for_route(&r);
        snap.apply_confirmed(&delta(&[("tier", json!("gold"))]));
        let heal = heal_delta(
            &delta(&[]),
            vec![AttributeChange {
                name: "tier".into(),
                value: Value::Null,
                fingerprint: Some(UNKNOWN_FP),
            }],
        );
        snap.apply_confirmed(&heal);
        let st = snap.get(heal.user_key()).unwrap();
        let tier = r.slot_of("tier").unwrap() as usize;
        assert_eq!(st.fp(tier), Some(UNKNOWN_FP));
        assert_ne!(st.fp(tier), Some(stored_fp(fingerprint(&json!("gold")))));
        assert_eq!(
            fields_to_export(&r),
            [
                "external_id",
                "braze_id",
                "user_aliases",
                "first_name",
                "custom_attributes"
            ]
        );
    }
}
