//! Reading a sample of an export's users back from Braze, for [`adopt`](crate::ops::adopt)'s
//! verify sample and the drift [`audit`](crate::ops::audit): a uniform sample (reservoir) of
//! the export's users with every value, their profiles from `POST /users/export/ids` (50
//! identifiers a request, optionally paced under the endpoint's limit) keyed by every label
//! a profile answers to, and the JSON report both write.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use bridge_shared::{ObjectStore, PutCondition, S3Uri};
use serde::Serialize;
use serde_json::Value;

use crate::config::route::Route;
use crate::diff::export::{ProduceOptions, SyncError};
use crate::diff::in_memory::{open_s3_part, produce};
use crate::model::{Identifier, UserDelta};
use crate::send::braze::{EXPORT_IDS_BATCH, LookupError, UserLookup};
use crate::state::confirmed::Snapshot;

/// A user's identifier as shown in reports.
pub fn user_label(id: &Identifier) -> String {
    match id {
        Identifier::ExternalId(e) => format!("external_id:{e}"),
        Identifier::BrazeId(b) => format!("braze_id:{b}"),
        Identifier::UserAlias { name, label } => format!("alias:{label}:{name}"),
    }
}

fn splitmix(x: &mut u64) -> u64 {
    *x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *x;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// What to sample from: the export's parts, read with the route.
pub struct SampleSource<'a> {
    /// Where the parts are.
    pub store: &'a std::sync::Arc<dyn ObjectStore>,
    /// The runtime the parts are read on (sampling runs on a blocking thread).
    pub runtime: &'a crate::clock::Blocking,
    /// The route the export is read with.
    pub route: &'a Route,
    /// The export's parts, in order.
    pub parts: &'a [S3Uri],
}

/// A uniform sample (reservoir, seeded) of `n` of the export's users that `keep` accepts,
/// each with every non-empty value. Blocking: call it from `spawn_blocking`.
pub fn reservoir_sample(
    from: &SampleSource<'_>,
    n: usize,
    seed: u64,
    keep: &dyn Fn(&UserDelta) -> bool,
) -> Result<Vec<UserDelta>, SyncError> {
    let mut opts = ProduceOptions::for_route(from.route, "");
    opts.full_resend = true;
    opts.departures = false;
    let empty = Snapshot::for_route(from.route);
    let (mut rng, mut seen) = (seed, 0u64);
    let mut sample: Vec<UserDelta> = Vec::with_capacity(n.min(1 << 16));
    produce(
        from.parts
            .iter()
            .map(|u| open_s3_part(from.store, u, from.runtime).map(|(_, part)| part)),
        from.route,
        &empty,
        &opts,
        &mut |d| {
            if !keep(&d) {
                return Ok(());
            }
            seen += 1;
            if sample.len() < n {
                sample.push(d);
            } else {
                let j = (splitmix(&mut rng) % seen) as usize;
                if j < n {
                    sample[j] = d;
                }
            }
            Ok(())
        },
        &mut |_| {},
    )?;
    Ok(sample)
}

/// `/users/export/ids` requests a minute at most (Braze's limit for workspaces onboarded
/// since 2024-08-22; older ones have 2,500): adopt's verify sample and the audit both read
/// profiles back at this pace by default.
pub const EXPORT_IDS_PER_MINUTE: u32 = 250;

/// Whether the export's (or the state's) value `ours` and Braze's value `theirs` are the same
/// for Braze although their text may differ: numbers compared as numbers, dates and times as
/// instants (Braze may give `2024-01-05T00:00:00.000Z` back for `2024-01-05T00:00:00Z`).
/// Adopt's verify sample and the drift audit compare with it alike.
pub fn same_for_braze(ours: &Value, theirs: &Value) -> bool {
    match (ours, theirs) {
        (Value::Number(x), Value::Number(y)) => match (x.as_f64(), y.as_f64()) {
            (Some(x), Some(y)) => (x - y).abs() <= 1e-9 * x.abs().max(y.abs()).max(1.0),
            _ => x == y,
        },
        (Value::String(x), Value::String(y)) if x != y => {
            let t = |s: &str| chrono::DateTime::parse_from_rfc3339(s).ok();
            matches!((t(x), t(y)), (Some(p), Some(q)) if p == q)
        }
        _ => ours == theirs,
    }
}

/// How profiles are read back.
#[derive(Debug, Clone, Copy, Default)]
pub struct ReadBack<'a> {
    /// `fields_to_export` (`None`: every field).
    pub fields: Option<&'a [String]>,
    /// Requests a minute at most (`None`: as fast as Braze answers).
    pub per_minute: Option<u32>,
}

/// Braze's profiles of the sampled users, by every label a profile answers to
/// ([`user_label`] of its external id, Braze id and aliases), and the requests made.
pub async fn read_profiles(
    lookup: &dyn UserLookup,
    sample: &[UserDelta],
    how: ReadBack<'_>,
) -> Result<(HashMap<String, Value>, u64), LookupError> {
    let gap = how
        .per_minute
        .map(|n| Duration::from_secs_f64(60.0 / f64::from(n.max(1))));
    let mut profiles: HashMap<String, Value> = HashMap::new();
    let mut lookups = 0u64;
    let mut next = tokio::time::Instant::now();
    for chunk in sample.chunks(EXPORT_IDS_BATCH) {
        if let Some(gap) = gap {
            tokio::time::sleep_until(next).await;
            next = tokio::time::Instant::now() + gap;
        }
        let ids: Vec<Identifier> = chunk.iter().map(|d| d.identifier.clone()).collect();
        lookups += 1;
        let found = match how.fields {
            Some(fields) => lookup.export_fields(&ids, fields).await?,
            None => lookup.export_ids(&ids).await?,
        };
        for p in found {
            for label in profile_labels(&p) {
                profiles.insert(label, p.clone());
            }
        }
    }
    Ok((profiles, lookups))
}

/// Every label a profile answers to: its external id, Braze id and aliases.
fn profile_labels(p: &Value) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(e) = p.get("external_id").and_then(Value::as_str) {
        out.push(user_label(&Identifier::ExternalId(e.into())));
    }
    if let Some(b) = p.get("braze_id").and_then(Value::as_str) {
        out.push(user_label(&Identifier::BrazeId(b.into())));
    }
    for a in p
        .get("user_aliases")
        .and_then(Value::as_array)
        .into_iter()
        .flatten()
    {
        if let (Some(l), Some(n)) = (
            a.get("alias_label").and_then(Value::as_str),
            a.get("alias_name").and_then(Value::as_str),
        ) {
            out.push(user_label(&Identifier::UserAlias {
                name: n.into(),
                label: l.into(),
            }));
        }
    }
    out
}

/// Writes an operator report as JSON to `uri`; a failure is logged (`what` names the report),
/// the operation's result stands.
pub async fn write_report<T: Serialize>(
    store: &dyn ObjectStore,
    uri: &S3Uri,
    report: &T,
    what: &str,
) {
    let body = serde_json::to_vec_pretty(report).unwrap_or_default();
    let mut meta = BTreeMap::new();
    meta.insert("content-type".to_string(), "application/json".to_string());
    if let Err(e) = store
        .put(uri, bytes::Bytes::from(body), PutCondition::None, meta)
        .await
    {
        tracing::warn!(report = %uri, error = %e, "Could not write the {what} report.");
    }
}
