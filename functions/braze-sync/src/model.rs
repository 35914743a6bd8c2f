//! The values that flow from an export row to a Braze request, shared by every stage:
//! where a row came from ([`RowPos`]), who it is about ([`Identifier`], [`UserKey`]), and what
//! must change in Braze for that user ([`UserDelta`]), which the sender sends and then hands
//! back as confirmed or rejected so the snapshot can advance for exactly what Braze accepted.

use serde_json::{Map, Value};

/// How a route names the attribute of a Braze subscription group: this prefix and the group
/// id. Such an attribute is sent in the object's `subscription_groups` array as
/// `{"subscription_group_id": id, "subscription_state": value}`, not as a key of its own.
pub const SUBSCRIPTION_GROUP_PREFIX: &str = "subscription_group:";

/// The group id of a subscription group attribute's name, `None` for any other attribute.
pub fn subscription_group_id(name: &str) -> Option<&str> {
    name.strip_prefix(SUBSCRIPTION_GROUP_PREFIX)
}

/// Where a row sits in an export, for rejects and reports.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RowPos {
    /// The object (part) the row came from, `s3://bucket/key` (or a member inside an archive,
    /// `s3://bucket/key!member`).
    pub source: String,
    /// 1-based data row number within that source (header not counted).
    pub row: u64,
    /// 1-based physical line where the row starts, for delimited and NDJSON inputs.
    pub line: Option<u64>,
}

/// How a user is identified in Braze; exactly one per attribute object.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Identifier {
    /// `external_id`, always sent as a string.
    ExternalId(String),
    /// `braze_id`.
    BrazeId(String),
    /// `user_alias` `{alias_name, alias_label}`.
    UserAlias {
        /// `alias_name`.
        name: String,
        /// `alias_label`.
        label: String,
    },
}

impl Identifier {
    /// Adds this identifier to a Braze attribute object.
    pub fn write_to(&self, obj: &mut Map<String, Value>) {
        match self {
            Identifier::ExternalId(id) => {
                obj.insert("external_id".into(), Value::String(id.clone()));
            }
            Identifier::BrazeId(id) => {
                obj.insert("braze_id".into(), Value::String(id.clone()));
            }
            Identifier::UserAlias { name, label } => {
                obj.insert(
                    "user_alias".into(),
                    serde_json::json!({"alias_name": name, "alias_label": label}),
                );
            }
        }
    }

    /// The stable, non-reversible key the snapshot stores for this user (no raw PII).
    pub fn user_key(&self) -> UserKey {
        let canonical = match self {
            Identifier::ExternalId(id) => format!("e\u{1f}{id}"),
            Identifier::BrazeId(id) => format!("b\u{1f}{id}"),
            Identifier::UserAlias { name, label } => format!("a\u{1f}{label}\u{1f}{name}"),
        };
        UserKey(xxhash_rust::xxh3::xxh3_128(canonical.as_bytes()))
    }
}

/// A user as the snapshot knows them: a 128-bit hash of the identifier.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct UserKey(pub u128);

/// A compact hash of an attribute's normalized value as sent to Braze.
pub type Fingerprint = u64;

/// Fingerprint of a JSON value as it would be sent (canonical JSON text).
pub fn fingerprint(value: &Value) -> Fingerprint {
    xxhash_rust::xxh3::xxh3_64(value.to_string().as_bytes())
}

/// One attribute to set (or remove with `null`) for one user.
#[derive(Debug, Clone, PartialEq)]
pub struct AttributeChange {
    /// Braze attribute name (standard field or custom attribute).
    pub name: String,
    /// Value to send; `Value::Null` removes the attribute.
    pub value: Value,
    /// What the snapshot records once Braze confirms: `Some(fp)` for a value, `None` when the
    /// attribute is removed.
    pub fingerprint: Option<Fingerprint>,
}

/// What must change in Braze for one user: one attribute object of `/users/track`.
#[derive(Debug, Clone, PartialEq)]
pub struct UserDelta {
    /// Who.
    pub identifier: Identifier,
    /// Where the row came from (for rejects when Braze refuses this object).
    pub pos: RowPos,
    /// The attributes that changed, in a stable order.
    pub changes: Vec<AttributeChange>,
    /// `_update_existing_only` for this object.
    pub update_existing_only: bool,
    /// True when the snapshot had never seen this user (the whole profile is sent).
    pub is_new: bool,
    /// The digest of the export row this delta came from ([`crate::diff::digest`]): once Braze
    /// confirms the delta, the state records it, and a later row with the same digest is
    /// unchanged without being mapped. `None` (departures, hand-built deltas) clears it.
    pub row_digest: Option<u64>,
}

impl UserDelta {
    /// True for a delta with nothing to send: the row's values equal the confirmed state, only
    /// its digest is new ([`DeliveryOutcome::Recorded`]).
    pub fn records_only(&self) -> bool {
        self.changes.is_empty()
    }

    /// What the state records of a confirmed delta: its user, attribute names, fingerprints
    /// and row digest, without the values sent or the row's position (a committer holds
    /// thousands between checkpoints).
    pub fn into_confirmed(mut self) -> Self {
        for c in &mut self.changes {
            c.value = Value::Null;
        }
        self.pos = RowPos::default();
        self
    }

    /// The Braze attribute object for this delta.
    pub fn to_attribute_object(&self) -> Value {
        debug_assert!(
            !self.records_only(),
            "a delta without changes is never sent"
        );
        let mut obj = Map::with_capacity(self.changes.len() + 2);
        self.identifier.write_to(&mut obj);
        obj.insert(
            "_update_existing_only".into(),
            Value::Bool(self.update_existing_only),
        );
        let mut groups = Vec::new();
        for c in &self.changes {
            match subscription_group_id(&c.name) {
                // A group state is never removed: a null (never produced) is not sent.
                Some(_) if c.value.is_null() => {}
                Some(id) => groups.push(serde_json::json!({
                    "subscription_group_id": id,
                    "subscription_state": c.value,
                })),
                None => {
                    obj.insert(c.name.clone(), c.value.clone());
                }
            }
        }
        if !groups.is_empty() {
            obj.insert("subscription_groups".into(), Value::Array(groups));
        }
        Value::Object(obj)
    }

    /// The snapshot key of this user.
    pub fn user_key(&self) -> UserKey {
        self.identifier.user_key()
    }
}

/// How the sender finished with one [`UserDelta`]: every delta handed to
/// [`deliver`](crate::send::deliver::deliver) comes back as exactly one outcome.
#[derive(Debug, Clone, PartialEq)]
pub enum DeliveryOutcome {
    /// Braze accepted the attribute object (a 2xx that did not list it in `errors[]`): the
    /// snapshot may advance for it.
    Confirmed(UserDelta),
    /// Braze refused this object (listed in a 2xx `errors[]`, a permanent 4xx for its request,
    /// or the object alone is over the request size limit). Sending it again unchanged will
    /// fail the same way: it belongs in the rejects object with `reason`.
    Rejected {
        /// The refused delta.
        delta: UserDelta,
        /// Braze's message (or ours, when it never left), never containing the API key.
        reason: String,
    },
    /// Not sent, or not known to be applied: the deadline came, the run was stopped (refused
    /// key), or transient failures outlasted the retry budget. The snapshot must not advance;
    /// the next run or a replay sends it again.
    Unsent(UserDelta),
    /// Nothing to send (the row's values equal the confirmed state; only its digest is new):
    /// never sent, never counted as confirmed, recorded in the state with the confirmed.
    Recorded(UserDelta),
}

impl DeliveryOutcome {
    /// The delta this outcome is about.
    pub fn delta(&self) -> &UserDelta {
        match self {
            DeliveryOutcome::Confirmed(d)
            | DeliveryOutcome::Unsent(d)
            | DeliveryOutcome::Recorded(d) => d,
            DeliveryOutcome::Rejected { delta, .. } => delta,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn subscription_group_states_go_in_the_subscription_groups_array() {
        let change = |name: &str, value: Value| AttributeChange {
            name: name.into(),
            fingerprint: Some(fingerprint(&value)),
            value,
        };
        let d = UserDelta {
            identifier: Identifier::ExternalId("42".into()),
            pos: RowPos::default(),
            changes: vec![
                change("email_subscribe", json!("opted_in")),
                change("subscription_group:sg-1", json!("unsubscribed")),
                change("subscription_group:sg-2", json!("subscribed")),
            ],
            update_existing_only: true,
            is_new: false,
            row_digest: None,
        };
        assert_eq!(
            d.to_attribute_object(),
            json!({"external_id": "42", "_update_existing_only": true,
                   "email_subscribe": "opted_in",
                   "subscription_groups": [
                       {"subscription_group_id": "sg-1", "subscription_state": "unsubscribed"},
                       {"subscription_group_id": "sg-2", "subscription_state": "subscribed"}]})
        );
    }

    #[test]
    fn attribute_object_has_one_identifier_and_the_changes() {
        let d = UserDelta {
            identifier: Identifier::ExternalId("42".into()),
            pos: RowPos::default(),
            changes: vec![AttributeChange {
                name: "first_name".into(),
                value: json!("Ada"),
                fingerprint: Some(fingerprint(&json!("Ada"))),
            }],
            update_existing_only: true,
            is_new: false,
            row_digest: None,
        };
        assert_eq!(
            d.to_attribute_object(),
            json!({"external_id": "42", "_update_existing_only": true, "first_name": "Ada"})
        );
    }

    #[test]
    fn user_keys_differ_by_identifier_kind() {
        assert_ne!(
            Identifier::ExternalId("1".into()).user_key(),
            Identifier::BrazeId("1".into()).user_key()
        );
    }
}
