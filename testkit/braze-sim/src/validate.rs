//! Validation of single `/users/track` objects: identifiers, standard profile fields, custom
//! attributes and their operations, events, purchases, and the date formats Braze accepts. Each
//! valid object becomes a typed change; each invalid one an [`ObjectError`] whose text is the
//! `type` of its `errors[]` entry.

use std::collections::BTreeSet;

use serde_json::{Map, Value};
use thiserror::Error;

use crate::profile::{AttrOp, Identifier, ObjectsOp};

/// Longest string value / key Braze accepts.
pub const MAX_STRING_CHARS: usize = 255;

/// Why one object is refused; the `Display` text is the `type` of its `errors[]` entry.
#[derive(Debug, Clone, PartialEq, Error)]
pub enum ObjectError {
    /// The array element is not a JSON object.
    #[error("Each element of '{0}' must be a JSON object")]
    NotAnObject(&'static str),
    /// No identifier at all.
    #[error("'external_id', 'braze_id', 'user_alias', 'email' or 'phone' is required")]
    MissingIdentifier,
    /// More than one of `external_id`, `braze_id`, `user_alias`.
    #[error("Only one of 'external_id', 'braze_id' or 'user_alias' may be provided")]
    MultipleIdentifiers,
    /// An identifier that is not a non-empty string (e.g. a numeric `external_id`).
    #[error("'{0}' must be a non-empty string")]
    IdentifierNotString(&'static str),
    /// `user_alias` is not `{alias_name, alias_label}` with non-empty strings.
    #[error("'user_alias' must be an object with non-empty string 'alias_name' and 'alias_label'")]
    InvalidAlias,
    /// A control flag that is not a boolean.
    #[error("'{0}' must be a boolean")]
    FlagNotBoolean(&'static str),
    /// `email` is not an address.
    #[error("The value provided for the 'email' field is not a valid email.")]
    InvalidEmail,
    /// A field with a value outside its documented format.
    #[error("The value provided for the '{field}' field is not valid: expected {expected}.")]
    InvalidField {
        /// Field name.
        field: String,
        /// What the documentation allows.
        expected: &'static str,
    },
    /// A required field is absent.
    #[error("'{0}' is required")]
    MissingField(&'static str),
    /// A string value longer than 255 characters.
    #[error("The value provided for the '{field}' field is longer than 255 characters ({chars}).")]
    StringTooLong {
        /// Field name (nested: `outer.inner`).
        field: String,
        /// Its length in characters.
        chars: usize,
    },
    /// A custom attribute or property key that is empty or longer than 255 characters.
    #[error(
        "Attribute or property key of {chars} characters is not valid: keys must have 1 to 255 characters."
    )]
    InvalidKey {
        /// Key length in characters.
        chars: usize,
    },
    /// A `subscription_groups` entry naming a group the workspace does not have (or no
    /// `subscription_group_id` string at all).
    #[error("BAD_SUBSCRIPTION_GROUP_ID")]
    BadSubscriptionGroupId,
    /// A `subscription_groups` entry whose `subscription_state` is not `subscribed` or
    /// `unsubscribed`.
    #[error("BAD_SUBSCRIPTION_GROUP_STATE")]
    BadSubscriptionGroupState,
    /// `email_subscribe` other than `opted_in`, `subscribed` or `unsubscribed` (`null`
    /// included: a subscription state cannot be removed).
    #[error("BAD_EMAIL_SUBSCRIPTION_STATE")]
    BadEmailSubscriptionState,
    /// A nested-object key with a space, a `.` or a leading `$`.
    #[error("Nested key '{key}' in '{field}' is not valid: no spaces, '.' or '$' allowed.")]
    InvalidNestedKey {
        /// Attribute name.
        field: String,
        /// Offending key.
        key: String,
    },
}

/// A validated change to one profile's attributes.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct AttributesUpdate {
    pub(crate) id: Identifier,
    pub(crate) update_only: bool,
    pub(crate) ops: Vec<(String, AttrOp)>,
}

/// A validated event or purchase.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Activity {
    pub(crate) id: Identifier,
    pub(crate) update_only: bool,
    pub(crate) object: Value,
}

/// Keys that steer processing instead of naming an attribute.
const CONTROL_KEYS: [&str; 5] = [
    "external_id",
    "user_alias",
    "braze_id",
    "_update_existing_only",
    "_merge_objects",
];

fn as_object<'a>(
    item: &'a Value,
    array: &'static str,
) -> Result<&'a Map<String, Value>, ObjectError> {
    item.as_object().ok_or(ObjectError::NotAnObject(array))
}

/// Finds the one identifier of an object.
fn identify(obj: &Map<String, Value>) -> Result<Identifier, ObjectError> {
    let named: Vec<&str> = ["external_id", "braze_id", "user_alias"]
        .into_iter()
        .filter(|k| obj.contains_key(*k))
        .collect();
    let non_empty_string = |field: &'static str| -> Result<String, ObjectError> {
        match obj.get(field) {
            Some(Value::String(s)) if !s.is_empty() => Ok(s.clone()),
            _ => Err(ObjectError::IdentifierNotString(field)),
        }
    };
    match named.as_slice() {
        [] => {
            if obj.contains_key("email") {
                let e = obj.get("email").and_then(Value::as_str).unwrap_or_default();
                if is_email(e) {
                    Ok(Identifier::Email(e.to_string()))
                } else {
                    Err(ObjectError::InvalidEmail)
                }
            } else if obj.contains_key("phone") {
                Ok(Identifier::Phone(non_empty_string("phone")?))
            } else {
                Err(ObjectError::MissingIdentifier)
            }
        }
        ["external_id"] => Ok(Identifier::External(non_empty_string("external_id")?)),
        ["braze_id"] => Ok(Identifier::Braze(non_empty_string("braze_id")?)),
        ["user_alias"] => {
            let alias = obj.get("user_alias").and_then(Value::as_object);
            let part = |k: &str| {
                alias
                    .and_then(|a| a.get(k))
                    .and_then(Value::as_str)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
            };
            match (part("alias_name"), part("alias_label")) {
                (Some(name), Some(label)) => Ok(Identifier::Alias { name, label }),
                _ => Err(ObjectError::InvalidAlias),
            }
        }
        _ => Err(ObjectError::MultipleIdentifiers),
    }
}

fn flag(obj: &Map<String, Value>, name: &'static str) -> Result<Option<bool>, ObjectError> {
    match obj.get(name) {
        None | Some(Value::Null) => Ok(None),
        Some(Value::Bool(b)) => Ok(Some(*b)),
        Some(_) => Err(ObjectError::FlagNotBoolean(name)),
    }
}

/// Validates one attribute object; `groups` are the workspace's subscription group ids.
pub(crate) fn validate_attributes(
    item: &Value,
    groups: &BTreeSet<String>,
) -> Result<AttributesUpdate, ObjectError> {
    let obj = as_object(item, "attributes")?;
    let id = identify(obj)?;
    let update_only = flag(obj, "_update_existing_only")?.unwrap_or(id.default_update_only());
    let merge = flag(obj, "_merge_objects")?.unwrap_or(false);
    let mut ops = Vec::new();
    for (name, value) in obj {
        if CONTROL_KEYS.contains(&name.as_str()) {
            continue;
        }
        if name == "subscription_groups" {
            ops.push((name.clone(), subscription_groups_op(value, groups)?));
            continue;
        }
        if let Some(op) = attribute_op(name, value, merge)? {
            ops.push((name.clone(), op));
        }
    }
    Ok(AttributesUpdate {
        id,
        update_only,
        ops,
    })
}

/// `subscription_groups: [{subscription_group_id, subscription_state}]`, kept on the profile
/// as one object of group id → state (later states of a group replace earlier ones).
fn subscription_groups_op(value: &Value, groups: &BTreeSet<String>) -> Result<AttrOp, ObjectError> {
    let items = value
        .as_array()
        .ok_or_else(|| invalid("subscription_groups", "an array of objects"))?;
    let mut states = Map::new();
    for item in items {
        let id = item
            .get("subscription_group_id")
            .and_then(Value::as_str)
            .filter(|id| groups.contains(*id))
            .ok_or(ObjectError::BadSubscriptionGroupId)?;
        let state = match item.get("subscription_state").and_then(Value::as_str) {
            Some(s @ ("subscribed" | "unsubscribed")) => s,
            _ => return Err(ObjectError::BadSubscriptionGroupState),
        };
        states.insert(id.to_string(), Value::String(state.to_string()));
    }
    Ok(AttrOp::Merge(states))
}

fn invalid(field: &str, expected: &'static str) -> ObjectError {
    ObjectError::InvalidField {
        field: field.to_string(),
        expected,
    }
}

fn short_string(field: &str, s: &str) -> Result<(), ObjectError> {
    let chars = s.chars().count();
    if chars > MAX_STRING_CHARS {
        return Err(ObjectError::StringTooLong {
            field: field.to_string(),
            chars,
        });
    }
    Ok(())
}

/// Validates one attribute and turns it into an operation (`None`: ignored, e.g. `bio`).
fn attribute_op(name: &str, value: &Value, merge: bool) -> Result<Option<AttrOp>, ObjectError> {
    if name == "email_subscribe" {
        return match value.as_str() {
            Some("opted_in" | "unsubscribed" | "subscribed") => {
                Ok(Some(AttrOp::Set(value.clone())))
            }
            _ => Err(ObjectError::BadEmailSubscriptionState),
        };
    }
    if value.is_null() {
        return Ok(Some(AttrOp::Remove));
    }
    let string = || value.as_str().ok_or_else(|| invalid(name, "a string"));
    let set = || Ok(Some(AttrOp::Set(value.clone())));
    match name {
        "bio" => Ok(None),
        "dob" => {
            if is_dob(string()?) {
                set()
            } else {
                Err(invalid(name, "a date as YYYY-MM-DD"))
            }
        }
        "gender" => match string()? {
            "M" | "F" | "O" | "N" | "P" => set(),
            _ => Err(invalid(name, "one of M, F, O, N, P or null")),
        },
        "push_subscribe" => match string()? {
            "opted_in" | "unsubscribed" | "subscribed" => set(),
            _ => Err(invalid(name, "one of opted_in, unsubscribed, subscribed")),
        },
        "country" => {
            let s = string()?;
            let upper = s.len() == 2 && s.bytes().all(|b| b.is_ascii_uppercase());
            if upper && celes::Country::from_alpha2(s).is_ok() {
                set()
            } else {
                Err(invalid(name, "an ISO-3166-1 alpha-2 code such as US"))
            }
        }
        "language" => {
            let s = string()?;
            let lower = s.len() == 2 && s.bytes().all(|b| b.is_ascii_lowercase());
            if lower && isolang::Language::from_639_1(s).is_some() {
                set()
            } else {
                Err(invalid(name, "an ISO-639-1 code such as en"))
            }
        }
        "time_zone" => {
            if string()?.parse::<chrono_tz::Tz>().is_ok() {
                set()
            } else {
                Err(invalid(name, "an IANA time zone such as America/New_York"))
            }
        }
        "email" => {
            let s = value.as_str().ok_or(ObjectError::InvalidEmail)?;
            if is_email(s) {
                short_string(name, s)?;
                set()
            } else {
                Err(ObjectError::InvalidEmail)
            }
        }
        "phone" => {
            let s = string()?;
            if s.is_empty() {
                return Err(invalid(name, "a non-empty string"));
            }
            short_string(name, s)?;
            set()
        }
        "first_name" | "last_name" | "home_city" => {
            short_string(name, string()?)?;
            set()
        }
        "date_of_first_session" | "date_of_last_session" | "marked_email_as_spam_at" => {
            if is_datetime(string()?) {
                set()
            } else {
                Err(invalid(name, "an ISO 8601 date or time"))
            }
        }
        "email_open_tracking_disabled" | "email_click_tracking_disabled" => {
            if value.is_boolean() {
                set()
            } else {
                Err(invalid(name, "a boolean"))
            }
        }
        "current_location" => {
            let coord = |k: &str, lim: f64| {
                value
                    .get(k)
                    .and_then(Value::as_f64)
                    .is_some_and(|v| (-lim..=lim).contains(&v))
            };
            if coord("longitude", 180.0) && coord("latitude", 90.0) {
                set()
            } else {
                Err(invalid(
                    name,
                    "{\"longitude\": number, \"latitude\": number}",
                ))
            }
        }
        "push_tokens" => {
            if value.is_array() {
                set()
            } else {
                Err(invalid(name, "an array of objects"))
            }
        }
        "facebook" | "twitter" => {
            if value.is_object() {
                set()
            } else {
                Err(invalid(name, "an object"))
            }
        }
        _ => custom_attribute_op(name, value, merge).map(Some),
    }
}

fn custom_attribute_op(name: &str, value: &Value, merge: bool) -> Result<AttrOp, ObjectError> {
    let chars = name.chars().count();
    if chars == 0 || chars > MAX_STRING_CHARS {
        return Err(ObjectError::InvalidKey { chars });
    }
    match value {
        Value::Null => Ok(AttrOp::Remove),
        Value::String(s) => {
            short_string(name, s)?;
            Ok(AttrOp::Set(value.clone()))
        }
        Value::Bool(_) | Value::Number(_) => Ok(AttrOp::Set(value.clone())),
        Value::Array(items) => {
            check_array_items(name, items)?;
            Ok(AttrOp::Set(value.clone()))
        }
        Value::Object(obj) => object_op(name, obj, merge),
    }
}

fn check_array_items(name: &str, items: &[Value]) -> Result<(), ObjectError> {
    for v in items {
        match v {
            Value::String(s) => short_string(name, s)?,
            Value::Object(o) => check_nested(name, o)?,
            _ => {}
        }
    }
    Ok(())
}

/// Operation objects (`add`/`remove`, `inc`, `$add`/`$remove`/`$update`) or a nested object.
fn object_op(name: &str, obj: &Map<String, Value>, merge: bool) -> Result<AttrOp, ObjectError> {
    let keys: Vec<&str> = obj.keys().map(String::as_str).collect();
    if keys == ["inc"] {
        return match obj.get("inc").and_then(Value::as_i64) {
            Some(n) => Ok(AttrOp::Inc(n)),
            None => Err(invalid(name, "{\"inc\": integer}")),
        };
    }
    if !keys.is_empty() && keys.iter().all(|k| *k == "add" || *k == "remove") {
        let list = |k: &str| -> Result<Vec<Value>, ObjectError> {
            match obj.get(k) {
                None => Ok(Vec::new()),
                Some(Value::Array(a)) => {
                    check_array_items(name, a)?;
                    Ok(a.clone())
                }
                Some(_) => Err(invalid(
                    name,
                    "{\"add\": [..], \"remove\": [..]} with arrays",
                )),
            }
        };
        return Ok(AttrOp::Array {
            add: list("add")?,
            remove: list("remove")?,
        });
    }
    if let [op] = keys.as_slice()
        && matches!(*op, "$add" | "$remove" | "$update")
    {
        return objects_op(name, op, obj.get(*op), merge).map(AttrOp::Objects);
    }
    check_nested(name, obj)?;
    if merge {
        Ok(AttrOp::Merge(obj.clone()))
    } else {
        Ok(AttrOp::Set(Value::Object(obj.clone())))
    }
}

fn objects_op(
    name: &str,
    op: &str,
    arg: Option<&Value>,
    merge: bool,
) -> Result<ObjectsOp, ObjectError> {
    let items = arg
        .and_then(Value::as_array)
        .ok_or_else(|| invalid(name, "an array after $add/$remove/$update"))?;
    let ident = |o: &Value| -> Result<(String, Value), ObjectError> {
        let key = o.get("$identifier_key").and_then(Value::as_str);
        let val = o.get("$identifier_value");
        match (key, val) {
            (Some(k), Some(v)) if !k.is_empty() => Ok((k.to_string(), v.clone())),
            _ => Err(invalid(
                name,
                "objects with $identifier_key and $identifier_value",
            )),
        }
    };
    match op {
        "$add" => {
            let mut out = Vec::new();
            for o in items {
                let m = o
                    .as_object()
                    .ok_or_else(|| invalid(name, "an array of objects after $add"))?;
                check_nested(name, m)?;
                out.push(o.clone());
            }
            Ok(ObjectsOp::Add(out))
        }
        "$remove" => items
            .iter()
            .map(ident)
            .collect::<Result<_, _>>()
            .map(ObjectsOp::Remove),
        _ => {
            if !merge {
                return Err(invalid(name, "'_merge_objects': true with $update"));
            }
            let mut out = Vec::new();
            for o in items {
                let (k, v) = ident(o)?;
                let new = o
                    .get("$new_object")
                    .and_then(Value::as_object)
                    .ok_or_else(|| invalid(name, "$new_object in each $update"))?;
                check_nested(name, new)?;
                out.push((k, v, new.clone()));
            }
            Ok(ObjectsOp::Update(out))
        }
    }
}

/// Nested keys: 1–255 characters, no spaces, no `.`, no leading `$` (except a `{"$time": ..}`
/// date object); nested string values ≤ 255 characters.
fn check_nested(field: &str, obj: &Map<String, Value>) -> Result<(), ObjectError> {
    if obj.len() == 1
        && let Some(t) = obj.get("$time")
    {
        return match t.as_str() {
            Some(s) if is_datetime(s) => Ok(()),
            _ => Err(invalid(field, "{\"$time\": ISO 8601 date}")),
        };
    }
    for (k, v) in obj {
        let chars = k.chars().count();
        if chars == 0 || chars > MAX_STRING_CHARS {
            return Err(ObjectError::InvalidKey { chars });
        }
        if k.contains(' ') || k.contains('.') || k.starts_with('$') {
            return Err(ObjectError::InvalidNestedKey {
                field: field.to_string(),
                key: k.clone(),
            });
        }
        let path = format!("{field}.{k}");
        match v {
            Value::String(s) => short_string(&path, s)?,
            Value::Object(o) => check_nested(&path, o)?,
            Value::Array(a) => check_array_items(&path, a)?,
            _ => {}
        }
    }
    Ok(())
}

fn validate_activity(obj: &Map<String, Value>) -> Result<(Identifier, bool), ObjectError> {
    let id = identify(obj)?;
    let flag_value = flag(obj, "_update_existing_only")?;
    // Braze: for aliases, update-only is always true on events and purchases.
    let update_only = match id {
        Identifier::Alias { .. } => true,
        _ => flag_value.unwrap_or(false),
    };
    Ok((id, update_only))
}

fn required_time(obj: &Map<String, Value>) -> Result<(), ObjectError> {
    match obj.get("time") {
        None | Some(Value::Null) => Err(ObjectError::MissingField("time")),
        Some(Value::String(s)) if is_datetime(s) => Ok(()),
        Some(_) => Err(invalid("time", "an ISO 8601 date-time")),
    }
}

fn check_properties(obj: &Map<String, Value>) -> Result<(), ObjectError> {
    match obj.get("properties") {
        None | Some(Value::Null) => Ok(()),
        Some(Value::Object(props)) => {
            for (k, v) in props {
                let chars = k.chars().count();
                if chars == 0 || chars > MAX_STRING_CHARS || k.starts_with('$') {
                    return Err(invalid(
                        "properties",
                        "keys of 1-255 characters without a leading '$'",
                    ));
                }
                if let Value::String(s) = v {
                    short_string(&format!("properties.{k}"), s)?;
                }
            }
            Ok(())
        }
        Some(_) => Err(invalid("properties", "an object")),
    }
}

pub(crate) fn validate_event(item: &Value) -> Result<Activity, ObjectError> {
    let obj = as_object(item, "events")?;
    let (id, update_only) = validate_activity(obj)?;
    match obj.get("name") {
        None | Some(Value::Null) => return Err(ObjectError::MissingField("name")),
        Some(Value::String(s)) if !s.is_empty() => short_string("name", s)?,
        Some(_) => return Err(invalid("name", "a non-empty string")),
    }
    required_time(obj)?;
    check_properties(obj)?;
    Ok(Activity {
        id,
        update_only,
        object: item.clone(),
    })
}

pub(crate) fn validate_purchase(item: &Value) -> Result<Activity, ObjectError> {
    let obj = as_object(item, "purchases")?;
    let (id, update_only) = validate_activity(obj)?;
    match obj.get("product_id") {
        None | Some(Value::Null) => return Err(ObjectError::MissingField("product_id")),
        Some(Value::String(s)) if !s.is_empty() => short_string("product_id", s)?,
        Some(_) => return Err(invalid("product_id", "a non-empty string")),
    }
    match obj.get("currency") {
        None | Some(Value::Null) => return Err(ObjectError::MissingField("currency")),
        Some(Value::String(s)) if s.len() == 3 && s.bytes().all(|b| b.is_ascii_uppercase()) => {}
        Some(_) => return Err(invalid("currency", "an ISO 4217 code such as USD")),
    }
    match obj.get("price") {
        None | Some(Value::Null) => return Err(ObjectError::MissingField("price")),
        Some(Value::Number(_)) => {}
        Some(_) => return Err(invalid("price", "a number")),
    }
    required_time(obj)?;
    match obj.get("quantity") {
        None | Some(Value::Null) => {}
        Some(q) if q.as_u64().is_some_and(|n| (1..=100).contains(&n)) => {}
        Some(_) => return Err(invalid("quantity", "an integer from 1 to 100")),
    }
    check_properties(obj)?;
    Ok(Activity {
        id,
        update_only,
        object: item.clone(),
    })
}

/// `local@domain` with non-empty parts and no whitespace.
fn is_email(s: &str) -> bool {
    match s.split_once('@') {
        Some((local, domain)) => {
            !local.is_empty()
                && !domain.is_empty()
                && !domain.contains('@')
                && !s.chars().any(char::is_whitespace)
        }
        None => false,
    }
}

/// Exactly `YYYY-MM-DD` and a real calendar date.
fn is_dob(s: &str) -> bool {
    s.len() == 10 && chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d").is_ok()
}

/// ISO 8601 date or date-time, Braze's `yyyy-MM-ddTHH:mm:ss:SSSZ`, or `MM/dd/yyyy`.
fn is_datetime(s: &str) -> bool {
    use chrono::{DateTime, NaiveDate, NaiveDateTime};
    DateTime::parse_from_rfc3339(s).is_ok()
        || ["%Y-%m-%dT%H:%M:%S%.f%z", "%Y-%m-%dT%H:%M:%S:%3f%z"]
            .iter()
            .any(|f| DateTime::parse_from_str(s, f).is_ok())
        || [
            "%Y-%m-%dT%H:%M:%S%.f",
            "%Y-%m-%d %H:%M:%S%.f",
            "%Y-%m-%dT%H:%M:%S:%3f",
            "%Y-%m-%dT%H:%M:%S:%3fZ",
        ]
        .iter()
        .any(|f| NaiveDateTime::parse_from_str(s, f).is_ok())
        || ["%Y-%m-%d", "%m/%d/%Y"]
            .iter()
            .any(|f| NaiveDate::parse_from_str(s, f).is_ok())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn datetime_formats_from_the_docs_are_accepted() {
        for s in [
            "2024-01-02",
            "2024-01-02T03:04:05Z",
            "2024-01-02T03:04:05.123+02:00",
            "2024-01-02T03:04:05",
            "2024-01-02 03:04:05",
            "2024-01-02T03:04:05:123Z",
            "01/02/2024",
        ] {
            assert!(is_datetime(s), "{s}");
        }
        assert!(!is_datetime("yesterday"));
        assert!(is_dob("1980-12-21"));
        assert!(!is_dob("1980-2-1"));
        assert!(!is_dob("21/12/1980"));
    }

    fn check(field: &str, value: Value) -> bool {
        attribute_op(field, &value, false).is_ok()
    }

    #[test]
    fn codes_are_checked_against_real_lists() {
        assert!(check("time_zone", json!("America/New_York")));
        assert!(check("time_zone", json!("UTC")));
        assert!(!check("time_zone", json!("Eastern Time")));
        assert!(!check("time_zone", json!("")));
        assert!(check("country", json!("AU")));
        assert!(!check("country", json!("au")));
        assert!(!check("country", json!("XX")));
        assert!(check("language", json!("fr")));
        assert!(!check("language", json!("FR")));
        assert!(!check("language", json!("xx")));
    }

    #[test]
    fn any_field_may_be_null_to_remove_it() {
        for f in ["dob", "gender", "country", "email", "custom_thing"] {
            assert_eq!(
                attribute_op(f, &Value::Null, false),
                Ok(Some(AttrOp::Remove))
            );
        }
    }

    #[test]
    fn subscription_groups_need_a_known_id_and_a_group_state() {
        let groups: BTreeSet<String> = ["g1".to_string()].into();
        let obj = |v: Value| json!({"external_id": "u", "subscription_groups": v});
        let ok = validate_attributes(
            &obj(json!([{"subscription_group_id": "g1", "subscription_state": "unsubscribed"}])),
            &groups,
        )
        .unwrap();
        let mut states = Map::new();
        states.insert("g1".into(), json!("unsubscribed"));
        assert_eq!(
            ok.ops,
            vec![("subscription_groups".into(), AttrOp::Merge(states))]
        );
        let err = |v: Value| {
            validate_attributes(&obj(v), &groups)
                .unwrap_err()
                .to_string()
        };
        assert_eq!(
            err(json!([{"subscription_group_id": "g2", "subscription_state": "subscribed"}])),
            "BAD_SUBSCRIPTION_GROUP_ID"
        );
        assert_eq!(
            err(json!([{"subscription_group_id": "g1", "subscription_state": "opted_in"}])),
            "BAD_SUBSCRIPTION_GROUP_STATE"
        );
        assert_eq!(
            attribute_op("email_subscribe", &Value::Null, false)
                .unwrap_err()
                .to_string(),
            "BAD_EMAIL_SUBSCRIPTION_STATE"
        );
        assert!(!check("email_subscribe", json!("yes")));
        assert!(check("email_subscribe", json!("opted_in")));
    }

    #[test]
    fn inc_needs_an_integer_and_array_ops_need_arrays() {
        assert!(!check("n", json!({"inc": 1.5})));
        assert!(!check("n", json!({"add": "x"})));
        assert!(check("n", json!({"remove": ["x"]})));
    }
}
