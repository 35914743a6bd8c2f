//! The simulated user store: profiles keyed by a stable user key, identifier lookup, and the
//! attribute operations Braze documents (set, `null` removes, array `add`/`remove`, `inc`,
//! nested objects, arrays of objects).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;

use serde::Serialize;
use serde_json::{Map, Value};

/// Stable key of a simulated profile: the `external_id` itself, `alias:<label>:<name>`,
/// `braze:<id>`, `email:<address>` or `phone:<number>` (the last two for profiles Braze creates
/// from an email or phone identifier alone).
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize)]
#[serde(transparent)]
pub struct UserKey(String);

impl UserKey {
    /// Key of a profile identified by `external_id`.
    pub fn external(id: &str) -> Self {
        Self(id.to_string())
    }
    /// Key of an alias-only profile.
    pub fn alias(label: &str, name: &str) -> Self {
        Self(format!("alias:{label}:{name}"))
    }
    /// Key of a profile known only by its Braze id.
    pub fn braze(id: &str) -> Self {
        Self(format!("braze:{id}"))
    }
    /// Key of an email-only profile.
    pub fn email(address: &str) -> Self {
        Self(format!("email:{address}"))
    }
    /// Key of a phone-only profile.
    pub fn phone(number: &str) -> Self {
        Self(format!("phone:{number}"))
    }
    /// Wraps a key as shown by `/_sim/users` (no interpretation).
    pub fn raw(key: &str) -> Self {
        Self(key.to_string())
    }
    /// The key as text.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for UserKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// How an object names its user.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Identifier {
    /// `external_id`.
    External(String),
    /// `user_alias` `{alias_name, alias_label}`.
    Alias {
        /// `alias_name`.
        name: String,
        /// `alias_label`.
        label: String,
    },
    /// `braze_id`.
    Braze(String),
    /// `email` used as the identifier (no other identifier present).
    Email(String),
    /// `phone` used as the identifier (no other identifier and no email present).
    Phone(String),
}

impl Identifier {
    /// Whether "update only" applies when the object does not say: true for aliases, false
    /// otherwise (Braze creates profiles for unknown external ids, emails and phones).
    pub fn default_update_only(&self) -> bool {
        matches!(self, Identifier::Alias { .. })
    }

    /// The key a new profile for this identifier gets; `None` when Braze cannot create a profile
    /// from it (a `braze_id` is assigned by Braze, never by the caller).
    fn new_key(&self) -> Option<UserKey> {
        match self {
            Identifier::External(id) => Some(UserKey::external(id)),
            Identifier::Alias { name, label } => Some(UserKey::alias(label, name)),
            Identifier::Braze(_) => None,
            Identifier::Email(e) => Some(UserKey::email(e)),
            Identifier::Phone(p) => Some(UserKey::phone(p)),
        }
    }

    /// Identifier fields written onto a profile created from this identifier.
    fn seed_attributes(&self) -> Map<String, Value> {
        let mut m = Map::new();
        match self {
            Identifier::External(id) => {
                m.insert("external_id".into(), Value::String(id.clone()));
            }
            Identifier::Alias { name, label } => {
                m.insert(
                    "user_alias".into(),
                    serde_json::json!({"alias_name": name, "alias_label": label}),
                );
            }
            Identifier::Braze(id) => {
                m.insert("braze_id".into(), Value::String(id.clone()));
            }
            Identifier::Email(e) => {
                m.insert("email".into(), Value::String(e.clone()));
            }
            Identifier::Phone(p) => {
                m.insert("phone".into(), Value::String(p.clone()));
            }
        }
        m
    }
}

/// One simulated profile.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Profile {
    /// Standard fields and custom attributes in one map keyed by attribute name (identifier
    /// fields included: `external_id`, `user_alias`, `braze_id`).
    pub attributes: Map<String, Value>,
    /// Event objects as received, in order.
    pub events: Vec<Value>,
    /// Purchase objects as received, in order.
    pub purchases: Vec<Value>,
    /// Store sequence number of the last change (for "most recently updated" lookups).
    #[serde(skip)]
    updated_seq: u64,
}

/// All simulated profiles, and the workspace's subscription groups.
#[derive(Debug, Clone, Default)]
pub struct ProfileStore {
    profiles: BTreeMap<UserKey, Profile>,
    seq: u64,
    subscription_groups: BTreeSet<String>,
}

impl ProfileStore {
    /// An empty store.
    pub fn new() -> Self {
        Self::default()
    }

    /// Sets the ids of the workspace's subscription groups: a `subscription_groups` entry
    /// naming any other id is refused with `BAD_SUBSCRIPTION_GROUP_ID`.
    pub fn set_subscription_groups(&mut self, ids: impl IntoIterator<Item = String>) {
        self.subscription_groups = ids.into_iter().collect();
    }

    /// The ids of the workspace's subscription groups.
    pub fn subscription_groups(&self) -> &BTreeSet<String> {
        &self.subscription_groups
    }

    /// The profile under `key`.
    pub fn get(&self, key: &UserKey) -> Option<&Profile> {
        self.profiles.get(key)
    }

    /// All profiles by key.
    pub fn iter(&self) -> impl Iterator<Item = (&UserKey, &Profile)> {
        self.profiles.iter()
    }

    /// Number of profiles.
    pub fn len(&self) -> usize {
        self.profiles.len()
    }

    /// Whether there are no profiles.
    pub fn is_empty(&self) -> bool {
        self.profiles.is_empty()
    }

    /// Removes every profile.
    pub fn clear(&mut self) {
        self.profiles.clear();
    }

    /// Puts a profile in place as-is (test fixtures, e.g. a profile only reachable by
    /// `braze_id`). Replaces any profile under the same key.
    pub fn insert(&mut self, key: UserKey, attributes: Map<String, Value>) {
        self.seq += 1;
        self.profiles.insert(
            key,
            Profile {
                attributes,
                updated_seq: self.seq,
                ..Profile::default()
            },
        );
    }

    /// Changes one profile as another writer would (an SDK, a campaign, another
    /// integration): each key of `changes` is set, `null` removes it. `false` when there is
    /// no such profile.
    pub fn write_as_other(&mut self, key: &UserKey, changes: &Map<String, Value>) -> bool {
        self.seq += 1;
        let seq = self.seq;
        let Some(p) = self.profiles.get_mut(key) else {
            return false;
        };
        for (k, v) in changes {
            if v.is_null() {
                p.attributes.remove(k);
            } else {
                p.attributes.insert(k.clone(), v.clone());
            }
        }
        p.updated_seq = seq;
        true
    }

    /// Deletes a profile (a privacy request, a merge). `false` when there was none.
    pub fn remove(&mut self, key: &UserKey) -> bool {
        self.profiles.remove(key).is_some()
    }

    /// Finds the existing profile an identifier names.
    ///
    /// Email/phone: among profiles whose `email`/`phone` attribute equals the value, the most
    /// recently updated one that has an `external_id`, else the most recently updated one.
    pub fn find(&self, id: &Identifier) -> Option<UserKey> {
        match id {
            Identifier::External(_) | Identifier::Alias { .. } => {
                id.new_key().filter(|k| self.profiles.contains_key(k))
            }
            Identifier::Braze(b) => {
                let k = UserKey::braze(b);
                if self.profiles.contains_key(&k) {
                    return Some(k);
                }
                self.profiles
                    .iter()
                    .find(|(_, p)| p.attributes.get("braze_id").and_then(Value::as_str) == Some(b))
                    .map(|(k, _)| k.clone())
            }
            Identifier::Email(e) => self.find_by_attribute("email", e),
            Identifier::Phone(p) => self.find_by_attribute("phone", p),
        }
    }

    fn find_by_attribute(&self, field: &str, value: &str) -> Option<UserKey> {
        self.profiles
            .iter()
            .filter(|(_, p)| p.attributes.get(field).and_then(Value::as_str) == Some(value))
            .max_by_key(|(_, p)| (p.attributes.contains_key("external_id"), p.updated_seq))
            .map(|(k, _)| k.clone())
    }

    /// The profile an identifier names, created when absent unless `update_only` (or the
    /// identifier cannot create profiles). `None` means "nothing to do" — Braze reports such
    /// objects as processed without error.
    pub fn resolve(&mut self, id: &Identifier, update_only: bool) -> Option<&mut Profile> {
        self.seq += 1;
        let seq = self.seq;
        let key = match self.find(id) {
            Some(k) => k,
            None if update_only => return None,
            None => {
                let k = id.new_key()?;
                self.profiles.insert(
                    k.clone(),
                    Profile {
                        attributes: id.seed_attributes(),
                        ..Profile::default()
                    },
                );
                k
            }
        };
        let p = self.profiles.get_mut(&key)?;
        p.updated_seq = seq;
        Some(p)
    }
}

/// One validated change to one attribute.
#[derive(Debug, Clone, PartialEq)]
pub enum AttrOp {
    /// Set the value (scalars, whole arrays, objects without `_merge_objects`).
    Set(Value),
    /// Remove the attribute (`null`).
    Remove,
    /// Add the integer to the current value (absent or non-integer counts as 0).
    Inc(i64),
    /// Array `add` then `remove`; values are unique and an added existing value moves to the end.
    Array {
        /// Values to add.
        add: Vec<Value>,
        /// Values to remove.
        remove: Vec<Value>,
    },
    /// Deep-merge an object into the current object (`_merge_objects: true`).
    Merge(Map<String, Value>),
    /// Array-of-objects operations.
    Objects(ObjectsOp),
}

/// Array-of-objects operation (`$add`, `$remove`, `$update`).
#[derive(Debug, Clone, PartialEq)]
pub enum ObjectsOp {
    /// Append the objects.
    Add(Vec<Value>),
    /// Remove every object whose `key` field equals `value`.
    Remove(Vec<(String, Value)>),
    /// Shallow-merge `new_object` into every object whose `key` field equals `value`.
    Update(Vec<(String, Value, Map<String, Value>)>),
}

impl Profile {
    /// Applies one attribute change.
    pub fn apply(&mut self, name: &str, op: &AttrOp) {
        let attrs = &mut self.attributes;
        match op {
            AttrOp::Set(v) => {
                attrs.insert(name.to_string(), v.clone());
            }
            AttrOp::Remove => {
                attrs.remove(name);
            }
            AttrOp::Inc(n) => {
                let cur = attrs.get(name).and_then(Value::as_i64).unwrap_or(0);
                attrs.insert(name.to_string(), Value::from(cur.saturating_add(*n)));
            }
            AttrOp::Array { add, remove } => {
                let mut arr = match attrs.remove(name) {
                    Some(Value::Array(a)) => a,
                    _ => Vec::new(),
                };
                for v in add {
                    arr.retain(|x| x != v);
                    arr.push(v.clone());
                }
                arr.retain(|x| !remove.contains(x));
                attrs.insert(name.to_string(), Value::Array(arr));
            }
            AttrOp::Merge(obj) => match attrs.get_mut(name) {
                Some(Value::Object(cur)) => deep_merge(cur, obj),
                _ => {
                    attrs.insert(name.to_string(), Value::Object(obj.clone()));
                }
            },
            AttrOp::Objects(ops) => {
                let mut arr = match attrs.remove(name) {
                    Some(Value::Array(a)) => a,
                    _ => Vec::new(),
                };
                match ops {
                    ObjectsOp::Add(objs) => arr.extend(objs.iter().cloned()),
                    ObjectsOp::Remove(ids) => {
                        arr.retain(|o| !ids.iter().any(|(k, v)| o.get(k.as_str()) == Some(v)))
                    }
                    ObjectsOp::Update(ups) => {
                        for (k, v, new) in ups {
                            for o in arr.iter_mut() {
                                if o.get(k.as_str()) == Some(v)
                                    && let Value::Object(m) = o
                                {
                                    deep_merge(m, new);
                                }
                            }
                        }
                    }
                }
                attrs.insert(name.to_string(), Value::Array(arr));
            }
        }
    }
}

fn deep_merge(into: &mut Map<String, Value>, from: &Map<String, Value>) {
    for (k, v) in from {
        match (into.get_mut(k), v) {
            (Some(Value::Object(a)), Value::Object(b)) => deep_merge(a, b),
            _ => {
                into.insert(k.clone(), v.clone());
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn ext(id: &str) -> Identifier {
        Identifier::External(id.into())
    }

    #[test]
    fn unknown_external_id_is_created_unless_update_only() {
        let mut s = ProfileStore::new();
        assert!(s.resolve(&ext("u1"), true).is_none());
        assert!(s.is_empty());
        let p = s.resolve(&ext("u1"), false).unwrap();
        assert_eq!(p.attributes["external_id"], json!("u1"));
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn braze_id_never_creates_a_profile() {
        let mut s = ProfileStore::new();
        assert!(s.resolve(&Identifier::Braze("b1".into()), false).is_none());
        s.insert(UserKey::braze("b1"), Map::new());
        assert!(s.resolve(&Identifier::Braze("b1".into()), false).is_some());
    }

    #[test]
    fn email_lookup_prefers_most_recent_profile_with_external_id() {
        let mut s = ProfileStore::new();
        let mut with_ext = Map::new();
        with_ext.insert("email".into(), json!("a@x.io"));
        with_ext.insert("external_id".into(), json!("e1"));
        s.insert(UserKey::external("e1"), with_ext);
        let mut only_email = Map::new();
        only_email.insert("email".into(), json!("a@x.io"));
        s.insert(UserKey::email("a@x.io"), only_email);
        assert_eq!(
            s.find(&Identifier::Email("a@x.io".into())),
            Some(UserKey::external("e1"))
        );
    }

    #[test]
    fn array_add_moves_existing_value_to_end_and_remove_drops_it() {
        let mut p = Profile::default();
        p.apply("a", &AttrOp::Set(json!(["x", "y", "z"])));
        p.apply(
            "a",
            &AttrOp::Array {
                add: vec![json!("x"), json!("w")],
                remove: vec![json!("y")],
            },
        );
        assert_eq!(p.attributes["a"], json!(["z", "x", "w"]));
    }

    #[test]
    fn inc_starts_from_zero_and_accumulates() {
        let mut p = Profile::default();
        p.apply("n", &AttrOp::Inc(3));
        p.apply("n", &AttrOp::Inc(-1));
        assert_eq!(p.attributes["n"], json!(2));
    }

    #[test]
    fn merge_deep_merges_nested_objects() {
        let mut p = Profile::default();
        p.apply("o", &AttrOp::Set(json!({"a": {"b": 1, "c": 2}})));
        let m = json!({"a": {"c": 3}, "d": 4}).as_object().unwrap().clone();
        p.apply("o", &AttrOp::Merge(m));
        assert_eq!(p.attributes["o"], json!({"a": {"b": 1, "c": 3}, "d": 4}));
    }

    #[test]
    fn array_of_objects_add_update_remove() {
        let mut p = Profile::default();
        p.apply(
            "pets",
            &AttrOp::Objects(ObjectsOp::Add(vec![
                json!({"id": 1, "n": "a"}),
                json!({"id": 2, "n": "b"}),
            ])),
        );
        let new = json!({"n": "B"}).as_object().unwrap().clone();
        p.apply(
            "pets",
            &AttrOp::Objects(ObjectsOp::Update(vec![("id".into(), json!(2), new)])),
        );
        p.apply(
            "pets",
            &AttrOp::Objects(ObjectsOp::Remove(vec![("id".into(), json!(1))])),
        );
        assert_eq!(p.attributes["pets"], json!([{"id": 2, "n": "B"}]));
    }
}
