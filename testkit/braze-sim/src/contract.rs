//! The `/users/track` contract as a pure function: parse one request body, enforce the object
//! limits, validate every attribute/event/purchase object (see [`crate::validate`]), apply the
//! valid ones to the [`ProfileStore`], and build Braze's response (status and JSON body). No
//! HTTP types here.

use serde::Serialize;
use serde_json::{Map, Value, json};
use thiserror::Error;

use crate::profile::ProfileStore;
use crate::validate::{
    Activity, AttributesUpdate, validate_attributes, validate_event, validate_purchase,
};
pub use crate::validate::{MAX_STRING_CHARS, ObjectError};

/// Message Braze returns when nothing in the request is usable.
pub const NO_VALID_DATA: &str =
    "Valid data must be provided in the 'attributes', 'events', or 'purchases' fields.";

/// Object-count limits of the account's plan.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Objects allowed in each of `attributes`, `events`, `purchases` (Braze: 75).
    pub max_objects_per_array: usize,
    /// "Monthly Active Users – CY 24-25" plans: objects allowed across all three arrays
    /// together (Braze: 50). `None` for the standard plan.
    pub combined_limit: Option<usize>,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_objects_per_array: 75,
            combined_limit: None,
        }
    }
}

/// The three object arrays of a `/users/track` body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum InputArray {
    /// `attributes`.
    Attributes,
    /// `events`.
    Events,
    /// `purchases`.
    Purchases,
}

impl InputArray {
    /// All arrays, in Braze's processing order.
    pub const ALL: [InputArray; 3] = [
        InputArray::Attributes,
        InputArray::Events,
        InputArray::Purchases,
    ];

    /// Field name in the request body.
    pub fn as_str(self) -> &'static str {
        match self {
            InputArray::Attributes => "attributes",
            InputArray::Events => "events",
            InputArray::Purchases => "purchases",
        }
    }
}

/// Why a whole request is refused (HTTP 400, nothing applied).
#[derive(Debug, Clone, PartialEq, Error)]
pub enum RequestError {
    /// The body is not JSON.
    #[error("Invalid JSON: {0}")]
    InvalidJson(String),
    /// The body is JSON but not an object.
    #[error("The request body must be a JSON object")]
    NotAnObject,
    /// `attributes`/`events`/`purchases` is present but not an array.
    #[error("'{}' must be an array", .0.as_str())]
    NotAnArray(InputArray),
    /// No array has any object.
    #[error("{}", NO_VALID_DATA)]
    NoData,
    /// One array has more objects than allowed.
    #[error("Max Input Length Exceeded")]
    ArrayTooLong {
        /// Which array.
        array: InputArray,
        /// Objects sent.
        count: usize,
        /// Objects allowed.
        max: usize,
    },
    /// All arrays together have more objects than the combined limit.
    #[error("Max Input Length Exceeded")]
    CombinedTooLong {
        /// Objects sent.
        count: usize,
        /// Objects allowed.
        max: usize,
    },
}

impl RequestError {
    /// The JSON body Braze-style: `{"message": ..., "errors": [...]}` where useful.
    pub fn body(&self) -> Value {
        match self {
            RequestError::ArrayTooLong { array, count, max } => json!({
                "message": self.to_string(),
                "errors": [{
                    "type": format!("'{}' has {count} objects; at most {max} are allowed", array.as_str()),
                    "input_array": array.as_str(),
                }],
            }),
            RequestError::CombinedTooLong { count, max } => json!({
                "message": self.to_string(),
                "errors": [{
                    "type": format!(
                        "{count} objects across 'attributes', 'events' and 'purchases'; at most {max} combined are allowed"
                    ),
                }],
            }),
            _ => json!({ "message": self.to_string() }),
        }
    }
}

/// One `errors[]` entry of the response.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ObjectErrorEntry {
    /// The error text.
    #[serde(rename = "type")]
    pub kind: String,
    /// Which array the object came from.
    pub input_array: InputArray,
    /// 0-based position in that array.
    pub index: usize,
}

/// Per-array object counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct ObjectCounts {
    /// `attributes` objects.
    pub attributes: usize,
    /// `events` objects.
    pub events: usize,
    /// `purchases` objects.
    pub purchases: usize,
}

impl ObjectCounts {
    /// Sum over the three arrays.
    pub fn total(&self) -> usize {
        self.attributes + self.events + self.purchases
    }
    /// Largest single array.
    pub fn max_array(&self) -> usize {
        self.attributes.max(self.events).max(self.purchases)
    }
    fn slot(&mut self, a: InputArray) -> &mut usize {
        match a {
            InputArray::Attributes => &mut self.attributes,
            InputArray::Events => &mut self.events,
            InputArray::Purchases => &mut self.purchases,
        }
    }
}

/// Result of one `/users/track` body.
#[derive(Debug, Clone, PartialEq)]
pub struct TrackOutcome {
    /// HTTP status: 201 when at least one object was valid, else 400.
    pub status: u16,
    /// Response JSON.
    pub body: Value,
    /// Objects in the request (zero when the body could not be read as arrays).
    pub received: ObjectCounts,
    /// Valid objects (processed; includes update-only objects that matched no profile).
    pub processed: ObjectCounts,
    /// Valid objects that changed nothing because update-only mode found no profile.
    pub skipped_update_only: usize,
    /// Errors listed in `errors[]` (one per invalid object).
    pub errors: Vec<ObjectErrorEntry>,
}

enum Valid {
    Attributes(AttributesUpdate),
    Event(Activity),
    Purchase(Activity),
}

/// How strictly answers are given (the simulator's bad-day modes, see [`crate::Faults`]).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AnswerMode {
    /// `errors[]` entries carry no `index` nor `input_array`.
    pub errors_without_index: bool,
    /// Any invalid object refuses the whole request (400, nothing applied).
    pub strict_batch_400: bool,
}

/// [`track`] with the bad-day answer modes.
pub fn track_with(
    store: &mut ProfileStore,
    body: &[u8],
    limits: &Limits,
    mode: AnswerMode,
) -> TrackOutcome {
    let mut outcome = match parse(body, limits, store.subscription_groups()) {
        Err(e) => return track_error(e),
        Ok(parsed) if mode.strict_batch_400 && parsed.results.iter().any(|r| r.2.is_err()) => {
            refuse_whole(parsed)
        }
        Ok(parsed) => apply(store, parsed),
    };
    if mode.errors_without_index
        && let Some(Value::Array(entries)) = outcome.body.get_mut("errors")
    {
        for e in entries.iter_mut() {
            if let Value::Object(m) = e {
                m.remove("index");
                m.remove("input_array");
            }
        }
    }
    outcome
}

fn track_error((err, received): (RequestError, ObjectCounts)) -> TrackOutcome {
    TrackOutcome {
        status: 400,
        body: err.body(),
        received,
        processed: ObjectCounts::default(),
        skipped_update_only: 0,
        errors: Vec::new(),
    }
}

/// Strict mode: one invalid object refuses the whole request; nothing is applied.
fn refuse_whole(parsed: Parsed) -> TrackOutcome {
    let errors: Vec<ObjectErrorEntry> = parsed
        .results
        .into_iter()
        .filter_map(|(a, index, r)| {
            r.err().map(|e| ObjectErrorEntry {
                kind: e.to_string(),
                input_array: a,
                index,
            })
        })
        .collect();
    let message = errors.first().map(|e| e.kind.clone()).unwrap_or_default();
    TrackOutcome {
        status: 400,
        body: json!({ "message": message, "errors": errors }),
        received: parsed.received,
        processed: ObjectCounts::default(),
        skipped_update_only: 0,
        errors,
    }
}

/// Handles one `/users/track` body against `store`.
///
/// Fatal problems (bad JSON, wrong shapes, too many objects, nothing to do) give 400 and change
/// nothing. Otherwise each object is validated on its own: invalid ones are reported in
/// `errors[]` with their array and index, valid ones are applied in Braze's order
/// (attributes, events, purchases) and the response is 201. When *every* object is invalid the
/// response is 400 with `message` [`NO_VALID_DATA`] and the `errors[]` list, as observed from
/// Braze.
pub fn track(store: &mut ProfileStore, body: &[u8], limits: &Limits) -> TrackOutcome {
    track_with(store, body, limits, AnswerMode::default())
}

struct Parsed {
    present: Vec<InputArray>,
    received: ObjectCounts,
    results: Vec<(InputArray, usize, Result<Valid, ObjectError>)>,
}

fn parse(
    body: &[u8],
    limits: &Limits,
    groups: &std::collections::BTreeSet<String>,
) -> Result<Parsed, (RequestError, ObjectCounts)> {
    let none = ObjectCounts::default();
    let value: Value = serde_json::from_slice(body)
        .map_err(|e| (RequestError::InvalidJson(e.to_string()), none))?;
    let Value::Object(root) = value else {
        return Err((RequestError::NotAnObject, none));
    };
    let mut arrays: Vec<(InputArray, &Vec<Value>)> = Vec::new();
    let mut received = ObjectCounts::default();
    for a in InputArray::ALL {
        match root.get(a.as_str()) {
            None | Some(Value::Null) => {}
            Some(Value::Array(items)) => {
                *received.slot(a) = items.len();
                arrays.push((a, items));
            }
            Some(_) => return Err((RequestError::NotAnArray(a), none)),
        }
    }
    for (a, items) in &arrays {
        if items.len() > limits.max_objects_per_array {
            return Err((
                RequestError::ArrayTooLong {
                    array: *a,
                    count: items.len(),
                    max: limits.max_objects_per_array,
                },
                received,
            ));
        }
    }
    if let Some(max) = limits.combined_limit
        && received.total() > max
    {
        return Err((
            RequestError::CombinedTooLong {
                count: received.total(),
                max,
            },
            received,
        ));
    }
    if received.total() == 0 {
        return Err((RequestError::NoData, received));
    }
    let mut results = Vec::with_capacity(received.total());
    for (a, items) in &arrays {
        for (i, item) in items.iter().enumerate() {
            let r = match a {
                InputArray::Attributes => validate_attributes(item, groups).map(Valid::Attributes),
                InputArray::Events => validate_event(item).map(Valid::Event),
                InputArray::Purchases => validate_purchase(item).map(Valid::Purchase),
            };
            results.push((*a, i, r));
        }
    }
    Ok(Parsed {
        present: arrays.iter().map(|(a, _)| *a).collect(),
        received,
        results,
    })
}

fn apply(store: &mut ProfileStore, parsed: Parsed) -> TrackOutcome {
    let mut processed = ObjectCounts::default();
    let mut errors = Vec::new();
    let mut valid = Vec::new();
    for (a, index, r) in parsed.results {
        match r {
            Ok(v) => {
                *processed.slot(a) += 1;
                valid.push(v);
            }
            Err(e) => errors.push(ObjectErrorEntry {
                kind: e.to_string(),
                input_array: a,
                index,
            }),
        }
    }
    if processed.total() == 0 {
        return TrackOutcome {
            status: 400,
            body: json!({ "message": NO_VALID_DATA, "errors": errors }),
            received: parsed.received,
            processed,
            skipped_update_only: 0,
            errors,
        };
    }
    let mut skipped = 0;
    for v in &valid {
        let applied = match v {
            Valid::Attributes(u) => match store.resolve(&u.id, u.update_only) {
                Some(p) => {
                    for (name, op) in &u.ops {
                        p.apply(name, op);
                    }
                    true
                }
                None => false,
            },
            Valid::Event(act) => match store.resolve(&act.id, act.update_only) {
                Some(p) => {
                    p.events.push(act.object.clone());
                    true
                }
                None => false,
            },
            Valid::Purchase(act) => match store.resolve(&act.id, act.update_only) {
                Some(p) => {
                    p.purchases.push(act.object.clone());
                    true
                }
                None => false,
            },
        };
        if !applied {
            skipped += 1;
        }
    }
    let mut body = Map::new();
    body.insert("message".into(), json!("success"));
    for a in parsed.present {
        let n = *processed.slot(a);
        body.insert(format!("{}_processed", a.as_str()), json!(n));
    }
    if !errors.is_empty() {
        body.insert("errors".into(), json!(errors));
    }
    TrackOutcome {
        status: 201,
        body: Value::Object(body),
        received: parsed.received,
        processed,
        skipped_update_only: skipped,
        errors,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::profile::UserKey;

    fn run(store: &mut ProfileStore, body: Value) -> TrackOutcome {
        track(store, body.to_string().as_bytes(), &Limits::default())
    }

    fn attrs(store: &ProfileStore, key: &str) -> Map<String, Value> {
        store.get(&UserKey::raw(key)).unwrap().attributes.clone()
    }

    #[test]
    fn valid_attributes_are_applied_and_counted() {
        let mut s = ProfileStore::new();
        let out = run(
            &mut s,
            json!({"attributes": [{"external_id": "u1", "first_name": "Ada", "dob": "1980-12-21",
                   "gender": "F", "country": "US", "language": "en", "time_zone": "America/New_York",
                   "email": "ada@example.com", "email_subscribe": "opted_in", "loyalty": "gold"}]}),
        );
        assert_eq!(out.status, 201);
        assert_eq!(
            out.body,
            json!({"message": "success", "attributes_processed": 1})
        );
        let a = attrs(&s, "u1");
        assert_eq!(a["first_name"], json!("Ada"));
        assert_eq!(a["loyalty"], json!("gold"));
        assert_eq!(a["external_id"], json!("u1"));
    }

    #[test]
    fn invalid_object_is_listed_with_index_while_others_apply() {
        let mut s = ProfileStore::new();
        let out = run(
            &mut s,
            json!({"attributes": [
                {"external_id": "u1", "dob": "1980-13-01"},
                {"external_id": "u2", "gender": "X"},
                {"external_id": "u3", "country": "usa"},
                {"external_id": "u4", "email_subscribe": "yes"},
                {"external_id": "u5", "first_name": "ok"}
            ]}),
        );
        assert_eq!(out.status, 201);
        assert_eq!(out.body["attributes_processed"], json!(1));
        let idx: Vec<usize> = out.errors.iter().map(|e| e.index).collect();
        assert_eq!(idx, vec![0, 1, 2, 3]);
        assert_eq!(out.body["errors"][2]["input_array"], json!("attributes"));
        assert_eq!(s.len(), 1);
        assert!(s.get(&UserKey::external("u5")).is_some());
    }

    #[test]
    fn missing_or_double_identifier_is_an_object_error() {
        let mut s = ProfileStore::new();
        let out = run(
            &mut s,
            json!({"attributes": [
                {"first_name": "nobody"},
                {"external_id": "u1", "braze_id": "b1", "first_name": "two"},
                {"external_id": 42, "first_name": "numeric"},
                {"external_id": "ok", "first_name": "fine"}
            ]}),
        );
        assert_eq!(out.status, 201);
        assert_eq!(out.errors.len(), 3);
        assert_eq!(
            out.errors[0].kind,
            ObjectError::MissingIdentifier.to_string()
        );
        assert_eq!(
            out.errors[1].kind,
            ObjectError::MultipleIdentifiers.to_string()
        );
        assert_eq!(
            out.errors[2].kind,
            ObjectError::IdentifierNotString("external_id").to_string()
        );
    }

    #[test]
    fn every_object_invalid_gives_400_with_errors_and_changes_nothing() {
        let mut s = ProfileStore::new();
        let out = run(&mut s, json!({"attributes": [{"first_name": "x"}]}));
        assert_eq!(out.status, 400);
        assert_eq!(out.body["message"], json!(NO_VALID_DATA));
        assert_eq!(out.body["errors"][0]["index"], json!(0));
        assert!(s.is_empty());
    }

    #[test]
    fn email_alone_identifies_and_creates_email_profile() {
        let mut s = ProfileStore::new();
        let out = run(
            &mut s,
            json!({"attributes": [{"email": "a@x.io", "first_name": "A"}]}),
        );
        assert_eq!(out.status, 201);
        assert_eq!(attrs(&s, "email:a@x.io")["first_name"], json!("A"));
    }

    #[test]
    fn alias_defaults_to_update_only_and_creates_when_flag_false() {
        let mut s = ProfileStore::new();
        let alias = json!({"alias_name": "n1", "alias_label": "amperity"});
        let out = run(
            &mut s,
            json!({"attributes": [{"user_alias": alias, "first_name": "A"}]}),
        );
        assert_eq!(out.status, 201);
        assert_eq!(out.skipped_update_only, 1);
        assert!(s.is_empty());
        run(
            &mut s,
            json!({"attributes": [{"user_alias": alias, "_update_existing_only": false, "first_name": "A"}]}),
        );
        assert_eq!(attrs(&s, "alias:amperity:n1")["first_name"], json!("A"));
    }

    #[test]
    fn external_id_update_only_true_creates_nothing() {
        let mut s = ProfileStore::new();
        let out = run(
            &mut s,
            json!({"attributes": [{"external_id": "u1", "_update_existing_only": true, "a": 1}]}),
        );
        assert_eq!(out.status, 201);
        assert_eq!(out.body["attributes_processed"], json!(1));
        assert!(s.is_empty());
    }

    #[test]
    fn null_removes_and_operations_apply() {
        let mut s = ProfileStore::new();
        run(
            &mut s,
            json!({"attributes": [{"external_id": "u", "a": "x", "tags": ["p", "q"], "n": 1}]}),
        );
        run(
            &mut s,
            json!({"attributes": [{"external_id": "u", "a": null,
                    "tags": {"add": ["p", "r"], "remove": ["q"]}, "n": {"inc": 2}}]}),
        );
        let a = attrs(&s, "u");
        assert!(!a.contains_key("a"));
        assert_eq!(a["tags"], json!(["p", "r"]));
        assert_eq!(a["n"], json!(3));
    }

    #[test]
    fn long_string_and_long_key_are_rejected() {
        let mut s = ProfileStore::new();
        let long = "x".repeat(256);
        let out = run(
            &mut s,
            json!({"attributes": [
                {"external_id": "u", "c": long},
                {"external_id": "u", long.clone(): 1},
                {"external_id": "u", "c": "x".repeat(255)}
            ]}),
        );
        assert_eq!(out.errors.len(), 2);
        assert_eq!(out.processed.attributes, 1);
    }

    #[test]
    fn seventy_six_objects_in_one_array_is_fatal() {
        let mut s = ProfileStore::new();
        let objs: Vec<Value> = (0..76)
            .map(|i| json!({"external_id": format!("u{i}")}))
            .collect();
        let out = run(&mut s, json!({"attributes": objs}));
        assert_eq!(out.status, 400);
        assert_eq!(out.body["message"], json!("Max Input Length Exceeded"));
        assert!(s.is_empty());
    }

    #[test]
    fn seventy_five_per_array_is_allowed_on_standard_plan() {
        let mut s = ProfileStore::new();
        let objs: Vec<Value> = (0..75)
            .map(|i| json!({"external_id": format!("u{i}"), "a": 1}))
            .collect();
        let ev: Vec<Value> = (0..75)
            .map(|i| json!({"external_id": format!("u{i}"), "name": "e", "time": "2024-01-01T00:00:00Z"}))
            .collect();
        let out = run(&mut s, json!({"attributes": objs, "events": ev}));
        assert_eq!(out.status, 201);
        assert_eq!(out.body["events_processed"], json!(75));
    }

    #[test]
    fn combined_limit_counts_across_arrays() {
        let mut s = ProfileStore::new();
        let limits = Limits {
            combined_limit: Some(50),
            ..Limits::default()
        };
        let a: Vec<Value> = (0..30)
            .map(|i| json!({"external_id": format!("u{i}")}))
            .collect();
        let e: Vec<Value> = (0..21)
            .map(|i| json!({"external_id": format!("u{i}"), "name": "e", "time": "2024-01-01"}))
            .collect();
        let body = json!({"attributes": a, "events": e}).to_string();
        let out = track(&mut s, body.as_bytes(), &limits);
        assert_eq!(out.status, 400);
        assert_eq!(out.body["message"], json!("Max Input Length Exceeded"));
    }

    #[test]
    fn empty_body_and_non_array_are_fatal() {
        let mut s = ProfileStore::new();
        assert_eq!(run(&mut s, json!({})).body["message"], json!(NO_VALID_DATA));
        assert_eq!(run(&mut s, json!({"attributes": []})).status, 400);
        assert_eq!(run(&mut s, json!({"attributes": {}})).status, 400);
        assert_eq!(track(&mut s, b"{not json", &Limits::default()).status, 400);
    }

    #[test]
    fn events_and_purchases_are_validated_and_stored() {
        let mut s = ProfileStore::new();
        let out = run(
            &mut s,
            json!({
                "events": [
                    {"external_id": "u", "name": "login", "time": "2024-05-01T10:00:00Z"},
                    {"external_id": "u", "name": "nameless-time"}
                ],
                "purchases": [
                    {"external_id": "u", "product_id": "p1", "currency": "USD", "price": 9.5,
                     "time": "2024-05-01T10:00:00Z"},
                    {"external_id": "u", "product_id": "p1", "currency": "usd", "price": 1,
                     "time": "2024-05-01T10:00:00Z"}
                ]
            }),
        );
        assert_eq!(out.status, 201);
        assert_eq!(out.body["events_processed"], json!(1));
        assert_eq!(out.body["purchases_processed"], json!(1));
        assert_eq!(out.errors[0].input_array, InputArray::Events);
        assert_eq!(out.errors[1].input_array, InputArray::Purchases);
        let p = s.get(&UserKey::external("u")).unwrap();
        assert_eq!(p.events.len(), 1);
        assert_eq!(p.purchases.len(), 1);
    }

    #[test]
    fn events_for_alias_never_create_profiles() {
        let mut s = ProfileStore::new();
        let out = run(
            &mut s,
            json!({"events": [{"user_alias": {"alias_name": "n", "alias_label": "l"},
                   "_update_existing_only": false, "name": "e", "time": "2024-01-01"}]}),
        );
        assert_eq!(out.status, 201);
        assert!(s.is_empty());
    }

    #[test]
    fn nested_object_keys_are_checked_and_merge_is_deep() {
        let mut s = ProfileStore::new();
        let out = run(
            &mut s,
            json!({"attributes": [{"external_id": "u", "o": {"bad key": 1}}]}),
        );
        assert_eq!(out.status, 400);
        run(
            &mut s,
            json!({"attributes": [{"external_id": "u", "o": {"a": 1, "b": {"c": 1}}}]}),
        );
        run(
            &mut s,
            json!({"attributes": [{"external_id": "u", "_merge_objects": true, "o": {"b": {"d": 2}}}]}),
        );
        assert_eq!(attrs(&s, "u")["o"], json!({"a": 1, "b": {"c": 1, "d": 2}}));
    }
}
