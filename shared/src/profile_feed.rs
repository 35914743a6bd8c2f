//! The profile-change feed: what Braze Currents reports about profiles changed by someone other
//! than this bridge, handed from currents-normalize to braze-sync through the state bucket.
//!
//! currents-normalize writes one small JSON object per Currents source object of
//! `users.UserDeleteRequest`, `users.UserOrphan` or `users.profile.Update`, at
//! `<prefix>date=<YYYY-MM-DD-HH>/<event type>-<source hash>.json` (the Currents delivery hour
//! from the source key). The name derives from the source object, so a replayed Currents file
//! rewrites the same object with the same content and never doubles anything. braze-sync lists
//! the hours its routes have not applied yet ([`FeedObject`] names are recorded per route in the
//! state's head) and applies each object once.
//!
//! Only identifiers, attribute names and new values travel; the objects live in the state
//! bucket beside the confirmed state, under a folder no route can be named (`_currents/`).

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

/// The feed's folder under braze-sync's `STATE_PREFIX`.
pub const FEED_FOLDER: &str = "_currents/feed/";

/// The feed object format written.
pub const FORMAT: u32 = 1;

/// Currents event types that feed profile changes.
pub const EVENT_TYPES: [&str; 3] = [
    "users.UserDeleteRequest",
    "users.UserOrphan",
    "users.profile.Update",
];

/// What happened to a profile.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ChangeKind {
    /// The profile was deleted (`users.UserDeleteRequest`).
    Deleted,
    /// The profile was merged into another and orphaned (`users.UserOrphan`).
    Orphaned,
    /// Attributes changed (`users.profile.Update`).
    Updated,
}

/// One profile change.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProfileChange {
    /// What happened.
    pub kind: ChangeKind,
    /// The profile's `external_id`, when the event names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub external_id: Option<String>,
    /// The profile's Braze id (`user_id`), when the event names it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub braze_id: Option<String>,
    /// When it happened, milliseconds since the epoch.
    #[serde(default)]
    pub time_ms: i64,
    /// `users.profile.Update` only: who changed it (`update_source`: `REST`, `SDK`, ...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// `users.profile.Update` only: Braze attribute names (standard fields under their
    /// `/users/track` names) and their new values.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub attributes: BTreeMap<String, Value>,
}

/// One feed object: the profile changes of one Currents source object.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedObject {
    /// [`FORMAT`].
    pub format: u32,
    /// The Currents object the changes come from (`s3://bucket/key`).
    pub source: String,
    /// Its event type.
    pub event_type: String,
    /// Its delivery hour, `YYYY-MM-DD-HH`.
    pub delivery_hour: String,
    /// The changes, in the source's order.
    pub changes: Vec<ProfileChange>,
}

/// The key of the feed object for a source object (`prefix` ends with `/`).
pub fn feed_key(prefix: &str, delivery_hour: &str, event_type: &str, source_key: &str) -> String {
    format!(
        "{prefix}date={delivery_hour}/{event_type}-{:016x}.json",
        fnv1a(source_key.as_bytes())
    )
}

/// The listing prefix of one delivery day (`day` is `YYYY-MM-DD`).
pub fn day_prefix(prefix: &str, day: &str) -> String {
    format!("{prefix}date={day}-")
}

/// The delivery hour (`YYYY-MM-DD-HH`) of a feed key, `None` for a key that is not one.
pub fn hour_of_key(key: &str) -> Option<&str> {
    let rest = &key[key.find("date=")? + 5..];
    let hour = rest.get(..13)?;
    let ok = hour.len() == 13
        && hour.bytes().enumerate().all(|(i, b)| match i {
            4 | 7 | 10 => b == b'-',
            _ => b.is_ascii_digit(),
        })
        && rest.as_bytes().get(13) == Some(&b'/');
    ok.then_some(hour)
}

/// 64-bit FNV-1a: a stable name for a source key (not a security hash).
fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_source_has_one_stable_key_and_its_hour_reads_back() {
        let k = feed_key(
            "s/_currents/feed/",
            "2026-12-06-23",
            "users.UserOrphan",
            "c/a.avro",
        );
        assert_eq!(
            k,
            feed_key(
                "s/_currents/feed/",
                "2026-12-06-23",
                "users.UserOrphan",
                "c/a.avro"
            )
        );
        assert_ne!(
            k,
            feed_key(
                "s/_currents/feed/",
                "2026-12-06-23",
                "users.UserOrphan",
                "c/b.avro"
            )
        );
        assert!(k.starts_with(&day_prefix("s/_currents/feed/", "2026-12-06")));
        assert_eq!(hour_of_key(&k), Some("2026-12-06-23"));
        assert_eq!(hour_of_key("s/_currents/feed/date=2026-12-06/x.json"), None);
    }

    #[test]
    fn an_object_round_trips_without_empty_fields() {
        let o = FeedObject {
            format: FORMAT,
            source: "s3://b/k".into(),
            event_type: "users.UserDeleteRequest".into(),
            delivery_hour: "2026-12-06-23".into(),
            changes: vec![ProfileChange {
                kind: ChangeKind::Deleted,
                external_id: None,
                braze_id: Some("b1".into()),
                time_ms: 1,
                source: None,
                attributes: BTreeMap::new(),
            }],
        };
        let text = serde_json::to_string(&o).unwrap_or_default();
        assert!(
            !text.contains("attributes") && !text.contains("external_id"),
            "{text}"
        );
        let back: FeedObject = serde_json::from_str(&text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(back, o);
    }
}
