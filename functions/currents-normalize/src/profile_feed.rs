//! The profile-change feed braze-sync reads ([`bridge_shared::profile_feed`]): while an object
//! of `users.UserDeleteRequest`, `users.UserOrphan` or `users.profile.Update` is converted, its
//! table rows (already deduplicated by `id`) are read back into [`ProfileChange`]s. Pure; the
//! handler writes the object next to braze-sync's state.
//!
//! `users.profile.Update` names standard fields by Currents' column names; they become the
//! `/users/track` names (`email_address` → `email`, `phone_number` → `phone`, `timezone` →
//! `time_zone`). A standard field that is null is left out (Currents does not say whether it
//! was cleared or untouched); `custom_attributes` (a JSON object) is taken whole, nulls
//! included. Identifiers: `external_user_id` when the record has it (also from the `extra`
//! column of a newer schema), and `user_id` (the Braze id).

use std::collections::BTreeMap;

use arrow_array::{Array, RecordBatch, StringArray};
use arrow_schema::DataType;
use bridge_shared::profile_feed::{ChangeKind, FORMAT, FeedObject, ProfileChange};
use serde_json::Value;

/// Standard fields of `users.profile.Update`: Currents column → `/users/track` name.
pub const STANDARD_FIELDS: [(&str, &str); 10] = [
    ("first_name", "first_name"),
    ("last_name", "last_name"),
    ("email_address", "email"),
    ("gender", "gender"),
    ("phone_number", "phone"),
    ("dob", "dob"),
    ("timezone", "time_zone"),
    ("home_city", "home_city"),
    ("country", "country"),
    ("language", "language"),
];

/// Collects the profile changes of one object's table rows.
#[derive(Debug, Clone)]
pub struct FeedCollector {
    kind: ChangeKind,
    changes: Vec<ProfileChange>,
}

/// The change kind of a Currents event type, `None` for types that feed nothing.
pub fn kind_of(event_type: &str) -> Option<ChangeKind> {
    match event_type {
        "users.UserDeleteRequest" => Some(ChangeKind::Deleted),
        "users.UserOrphan" => Some(ChangeKind::Orphaned),
        "users.profile.Update" => Some(ChangeKind::Updated),
        _ => None,
    }
}

fn strings(batch: &RecordBatch, name: &str) -> Option<StringArray> {
    let col = batch.column_by_name(name)?;
    let cast = arrow_cast::cast(col, &DataType::Utf8).ok()?;
    cast.as_any().downcast_ref::<StringArray>().cloned()
}

fn at(a: &Option<StringArray>, row: usize) -> Option<String> {
    let a = a.as_ref()?;
    (!a.is_null(row)).then(|| a.value(row).to_string())
}

impl FeedCollector {
    /// A collector for `event_type`, `None` for types that feed nothing.
    pub fn for_event_type(event_type: &str) -> Option<Self> {
        kind_of(event_type).map(|kind| Self {
            kind,
            changes: Vec::new(),
        })
    }

    /// Reads the changes of one table batch.
    pub fn observe(&mut self, batch: &RecordBatch) {
        let external = strings(batch, "external_user_id");
        let braze = strings(batch, "user_id");
        let extra = strings(batch, "extra");
        let source = strings(batch, "update_source");
        let custom = strings(batch, "custom_attributes");
        let time_ms = batch
            .column_by_name("time_ms")
            .or_else(|| batch.column_by_name("time"))
            .and_then(|c| arrow_cast::cast(c, &DataType::Int64).ok());
        let time_ms = time_ms
            .as_ref()
            .and_then(|c| c.as_any().downcast_ref::<arrow_array::Int64Array>());
        let scale = if batch.column_by_name("time_ms").is_some() {
            1
        } else {
            1000
        };
        let standard: Vec<(&str, Option<StringArray>)> = match self.kind {
            ChangeKind::Updated => STANDARD_FIELDS
                .iter()
                .map(|(col, name)| (*name, strings(batch, col)))
                .collect(),
            _ => Vec::new(),
        };
        for row in 0..batch.num_rows() {
            let extra_json: Option<Value> =
                at(&extra, row).and_then(|t| serde_json::from_str(&t).ok());
            let from_extra = |k: &str| {
                extra_json
                    .as_ref()
                    .and_then(|v| v.get(k))
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            let external_id = at(&external, row).or_else(|| from_extra("external_user_id"));
            let braze_id = at(&braze, row);
            if external_id.is_none() && braze_id.is_none() {
                continue;
            }
            let mut attributes = BTreeMap::new();
            for (name, col) in &standard {
                if let Some(v) = at(col, row) {
                    attributes.insert((*name).to_string(), Value::String(v));
                }
            }
            if let Some(Value::Object(m)) =
                at(&custom, row).and_then(|t| serde_json::from_str::<Value>(&t).ok())
            {
                attributes.extend(m);
            }
            if self.kind == ChangeKind::Updated && attributes.is_empty() {
                continue;
            }
            self.changes.push(ProfileChange {
                kind: self.kind,
                external_id,
                braze_id,
                time_ms: time_ms
                    .filter(|c| !c.is_null(row))
                    .map_or(0, |c| c.value(row).saturating_mul(scale)),
                source: at(&source, row),
                attributes,
            });
        }
    }

    /// Changes collected so far.
    pub fn len(&self) -> usize {
        self.changes.len()
    }

    /// True when nothing was collected.
    pub fn is_empty(&self) -> bool {
        self.changes.is_empty()
    }

    /// The feed object of the source `source` (`s3://bucket/key`).
    pub fn finish(self, source: &str, event_type: &str, delivery_hour: &str) -> FeedObject {
        FeedObject {
            format: FORMAT,
            source: source.to_string(),
            event_type: event_type.to_string(),
            delivery_hour: delivery_hour.to_string(),
            changes: self.changes,
        }
    }
}

/// `YYYY-MM-DD-HH` of a delivery hour.
pub fn hour_text(d: &crate::key::DeliveryHour) -> String {
    format!("{}-{:02}", d.day.format("%Y-%m-%d"), d.hour)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use std::sync::Arc;

    use arrow_array::Int64Array;
    use arrow_schema::{Field, Schema};

    use super::*;

    fn batch(cols: Vec<(&str, Arc<dyn Array>)>) -> RecordBatch {
        let fields: Vec<Field> = cols
            .iter()
            .map(|(n, a)| Field::new(*n, a.data_type().clone(), true))
            .collect();
        RecordBatch::try_new(
            Arc::new(Schema::new(fields)),
            cols.into_iter().map(|(_, a)| a).collect(),
        )
        .unwrap()
    }

    fn s(v: Vec<Option<&str>>) -> Arc<dyn Array> {
        Arc::new(StringArray::from(v))
    }

    #[test]
    fn a_profile_update_becomes_braze_names_and_values() {
        let mut c = FeedCollector::for_event_type("users.profile.Update").unwrap();
        c.observe(&batch(vec![
            ("external_user_id", s(vec![Some("u2"), None])),
            ("user_id", s(vec![Some("b2"), Some("b3")])),
            ("time_ms", Arc::new(Int64Array::from(vec![5, 6]))),
            ("update_source", s(vec![Some("SDK"), Some("REST")])),
            ("email_address", s(vec![Some("a@b.c"), None])),
            ("first_name", s(vec![None, None])),
            (
                "custom_attributes",
                s(vec![Some(r#"{"tier":"silver","x":null}"#), None]),
            ),
        ]));
        assert_eq!(c.len(), 1, "a row that changed nothing is left out");
        let o = c.finish("s3://b/k", "users.profile.Update", "2026-12-06-23");
        let ch = &o.changes[0];
        assert_eq!(ch.external_id.as_deref(), Some("u2"));
        assert_eq!(ch.braze_id.as_deref(), Some("b2"));
        assert_eq!(ch.source.as_deref(), Some("SDK"));
        assert_eq!(ch.time_ms, 5);
        assert_eq!(
            serde_json::to_value(&ch.attributes).unwrap(),
            serde_json::json!({"email": "a@b.c", "tier": "silver", "x": null})
        );
    }

    #[test]
    fn a_delete_takes_the_external_id_from_a_newer_schemas_extra_column() {
        let mut c = FeedCollector::for_event_type("users.UserDeleteRequest").unwrap();
        c.observe(&batch(vec![
            ("user_id", s(vec![Some("b1"), Some("b9")])),
            ("time", Arc::new(Int64Array::from(vec![7, 8]))),
            ("extra", s(vec![Some(r#"{"external_user_id":"u1"}"#), None])),
        ]));
        let o = c.finish("s3://b/k", "users.UserDeleteRequest", "2026-12-06-23");
        assert_eq!(o.changes.len(), 2);
        assert_eq!(o.changes[0].kind, ChangeKind::Deleted);
        assert_eq!(o.changes[0].external_id.as_deref(), Some("u1"));
        assert_eq!(o.changes[0].time_ms, 7000);
        assert_eq!(o.changes[1].external_id, None);
        assert_eq!(o.changes[1].braze_id.as_deref(), Some("b9"));
    }

    #[test]
    fn other_event_types_feed_nothing() {
        assert!(FeedCollector::for_event_type("users.messages.email.Send").is_none());
    }
}
