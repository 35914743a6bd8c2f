//! Braze Currents closes the loop: the profile-change feed currents-normalize writes into the
//! state bucket ([`bridge_shared::profile_feed`]) says which profiles Braze deleted or
//! orphaned and which attributes another source (an SDK, a campaign, another integration)
//! changed. Before a run diffs, its route applies the feed objects it has not applied yet:
//!
//! - a deleted or orphaned user is forgotten (`on_braze_delete = "forget"`, the default):
//!   every value of theirs becomes unknown, so the next export sends their whole profile;
//! - an attribute another source changed becomes unknown unless the new value's fingerprint,
//!   mapped as the route maps its column, equals the confirmed one (this bridge's own writes
//!   come back through Currents too), so the next export sends it again.
//!
//! Both are ordinary confirmed-state changes (fingerprint 0, "nothing confirmed", and the row
//! digest cleared so the row is mapped again), written as one checkpoint segment in the same
//! head write as the route's [`FeedCursor`]: a feed object is applied once, and nothing
//! else Braze confirmed is touched. The feed is read from the delivery hour the cursor
//! reached; objects of the last [`GRACE_HOURS`] stay listed, so one written late is still
//! applied, and a route applying the feed for the first time starts [`FIRST_LOOKBACK_HOURS`]
//! back.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use bridge_shared::profile_feed::{ChangeKind, FeedObject, day_prefix, hour_of_key};
use bridge_shared::{ObjectStore, S3Uri, StoreError};
use chrono::{DateTime, Duration, Utc};
use serde_json::Value;

use crate::config::route::{OnBrazeDelete, Route};
use crate::map::Mapper;
use crate::model::{AttributeChange, Identifier, RowPos, UserDelta, UserKey};
use crate::state::confirmed::{UserState, stored_fp};
use crate::state::store::FeedCursor;
use crate::vocab::IdentifierKind;

/// Hours a route applying the feed for the first time looks back.
pub const FIRST_LOOKBACK_HOURS: i64 = 7 * 24;
/// Hours of feed objects that stay listed after their delivery hour, so a late one is applied.
pub const GRACE_HOURS: i64 = 24;
/// Most delivery days one run lists (a route idle longer starts from the newest of them).
pub const MAX_DAYS: i64 = 60;

fn hour(t: DateTime<Utc>) -> String {
    t.format("%Y-%m-%d-%H").to_string()
}

fn parse_hour(h: &str) -> Option<DateTime<Utc>> {
    chrono::NaiveDateTime::parse_from_str(&format!("{h}:00"), "%Y-%m-%d-%H:%M")
        .ok()
        .map(|t| t.and_utc())
}

/// The delivery hour the feed is read from.
fn start(cursor: Option<&FeedCursor>, now: DateTime<Utc>) -> String {
    let earliest = now - Duration::days(MAX_DAYS);
    let from = cursor
        .and_then(|c| parse_hour(&c.through))
        .unwrap_or(now - Duration::hours(FIRST_LOOKBACK_HOURS));
    hour(from.max(earliest))
}

/// The days (`YYYY-MM-DD`) to list, oldest first: from the cursor's hour to the next hour.
pub fn days_to_list(cursor: Option<&FeedCursor>, now: DateTime<Utc>) -> Vec<String> {
    let Some(from) = parse_hour(&start(cursor, now)) else {
        return Vec::new();
    };
    let last = (now + Duration::hours(1)).date_naive();
    from.date_naive()
        .iter_days()
        .take_while(|d| *d <= last)
        .map(|d| d.format("%Y-%m-%d").to_string())
        .collect()
}

/// Of the listed feed object names (relative to the feed folder), those to apply (in delivery
/// hour order), and the cursor once they are applied.
pub fn pending(
    cursor: Option<&FeedCursor>,
    listed: &[String],
    now: DateTime<Utc>,
) -> (Vec<String>, FeedCursor) {
    let through = start(cursor, now);
    let applied: BTreeSet<&str> = cursor
        .map(|c| c.applied.iter().map(String::as_str).collect())
        .unwrap_or_default();
    let mut todo: Vec<(&str, &String)> = listed
        .iter()
        .filter_map(|k| Some((hour_of_key(k)?, k)))
        .filter(|(h, k)| *h >= through.as_str() && !applied.contains(k.as_str()))
        .collect();
    todo.sort();
    let todo: Vec<String> = todo.into_iter().map(|(_, k)| k.clone()).collect();
    let next = hour(now - Duration::hours(GRACE_HOURS)).max(through);
    let mut kept: Vec<String> = applied
        .iter()
        .map(|s| s.to_string())
        .chain(todo.iter().cloned())
        .filter(|k| hour_of_key(k).is_some_and(|h| h >= next.as_str()))
        .collect();
    kept.sort();
    kept.dedup();
    (
        todo,
        FeedCursor {
            through: next,
            applied: kept,
        },
    )
}

/// Why the feed could not be read.
#[derive(Debug, thiserror::Error)]
pub enum FeedError {
    /// The store failed.
    #[error("profile feed: {0}")]
    Store(#[from] StoreError),
}

impl FeedError {
    /// Whether trying again can succeed.
    pub fn is_retryable(&self) -> bool {
        match self {
            FeedError::Store(e) => e.is_retryable(),
        }
    }
}

/// The feed objects `cursor` has not applied (those that do not parse are skipped with a
/// warning: they will not parse later either), and the cursor once they are.
pub async fn read_pending(
    store: &dyn ObjectStore,
    bucket: &str,
    folder: &str,
    cursor: Option<&FeedCursor>,
    now: DateTime<Utc>,
) -> Result<(Vec<FeedObject>, FeedCursor), FeedError> {
    let mut listed = Vec::new();
    for day in days_to_list(cursor, now) {
        for meta in store.list(bucket, &day_prefix(folder, &day)).await? {
            if let Some(name) = meta.key.strip_prefix(folder) {
                listed.push(name.to_string());
            }
        }
    }
    let (todo, next) = pending(cursor, &listed, now);
    let mut feeds = Vec::with_capacity(todo.len());
    for name in todo {
        let uri = S3Uri::new(bucket, format!("{folder}{name}"));
        let bytes = match store.get(&uri).await {
            Ok((_, b)) => b,
            Err(StoreError::NotFound { .. }) => continue,
            Err(e) => return Err(e.into()),
        };
        match serde_json::from_slice::<FeedObject>(&bytes) {
            Ok(f) => feeds.push(f),
            Err(e) => {
                tracing::warn!(feed = %uri, error = %e, "Skipping a profile-change feed object that does not parse.");
            }
        }
    }
    Ok((feeds, next))
}

/// What the feed does to one route's state.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct FeedEffect {
    /// Confirmed-state changes: fingerprints cleared (never sent to Braze).
    pub deltas: Vec<UserDelta>,
    /// Users forgotten (deleted or orphaned in Braze).
    pub forgotten: u64,
    /// Attributes marked unknown because another source changed them.
    pub invalidated: u64,
}

/// The user a change names, in the route's identifier kind (`None`: it names none the route
/// can match; alias routes match nothing, Currents names no aliases).
fn identifier(
    route: &Route,
    external_id: Option<&str>,
    braze_id: Option<&str>,
) -> Option<Identifier> {
    match route.config.identifier.kind {
        IdentifierKind::ExternalId => external_id.map(|i| Identifier::ExternalId(i.to_string())),
        IdentifierKind::BrazeId => braze_id.map(|i| Identifier::BrazeId(i.to_string())),
        IdentifierKind::UserAlias => None,
    }
}

/// The keys of the users `feeds` name, in `route`'s identifier kind.
pub fn named_users(route: &Route, feeds: &[FeedObject]) -> Vec<UserKey> {
    let mut keys: Vec<UserKey> = feeds
        .iter()
        .flat_map(|f| &f.changes)
        .filter_map(|c| identifier(route, c.external_id.as_deref(), c.braze_id.as_deref()))
        .map(|i| i.user_key())
        .collect();
    keys.sort();
    keys.dedup();
    keys
}

#[derive(Default)]
struct UserNews {
    forget: bool,
    source: String,
    /// Attribute → (time, new value): the latest wins.
    latest: BTreeMap<String, (i64, Value)>,
}

/// The effect of `feeds` on `route`'s state, read through `state` (a user's confirmed
/// fingerprints, `None` for a user the state does not hold, who is left alone).
pub fn effect<'s>(
    route: &Route,
    feeds: &[FeedObject],
    state: impl Fn(UserKey) -> Option<UserState<'s>>,
) -> FeedEffect {
    let forget_deleted = route.config.on_braze_delete == OnBrazeDelete::Forget;
    let mut news: HashMap<Identifier, UserNews> = HashMap::new();
    for feed in feeds {
        for c in &feed.changes {
            let Some(id) = identifier(route, c.external_id.as_deref(), c.braze_id.as_deref())
            else {
                continue;
            };
            let n = news.entry(id).or_default();
            if n.source.is_empty() {
                n.source = feed.source.clone();
            }
            match c.kind {
                ChangeKind::Deleted | ChangeKind::Orphaned => n.forget |= forget_deleted,
                ChangeKind::Updated => {
                    for (name, v) in &c.attributes {
                        let newer = n.latest.get(name).is_none_or(|(t, _)| c.time_ms >= *t);
                        if newer && route.slot_of(name).is_some() {
                            n.latest.insert(name.clone(), (c.time_ms, v.clone()));
                        }
                    }
                }
            }
        }
    }
    let mapper = Mapper::new(route);
    let mut out = FeedEffect::default();
    let mut users: Vec<(Identifier, UserNews)> = news.into_iter().collect();
    users.sort_by(|a, b| a.0.cmp(&b.0));
    for (id, n) in users {
        let Some(st) = state(id.user_key()) else {
            continue;
        };
        let known = |slot: usize| st.fp(slot).is_some();
        let mut changes = Vec::new();
        if n.forget {
            changes.extend(
                route
                    .slots
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| known(*i))
                    .map(|(_, s)| unknown(&s.name)),
            );
            out.forgotten += 1;
        } else {
            for (name, (_, value)) in &n.latest {
                let Some(slot) = route.slot_of(name).map(usize::from) else {
                    continue;
                };
                let new = match mapper.value_fingerprint(slot, value) {
                    Ok(fp) => fp.map(stored_fp),
                    // A value the route would refuse is not the confirmed one.
                    Err(_) => Some(0),
                };
                if known(slot) && st.fp(slot) != new {
                    changes.push(unknown(name));
                }
            }
            out.invalidated += changes.len() as u64;
            if changes.is_empty() {
                continue;
            }
        }
        out.deltas.push(UserDelta {
            identifier: id,
            pos: RowPos {
                source: n.source,
                row: 0,
                line: None,
            },
            changes,
            update_existing_only: route.config.update_existing_only,
            is_new: false,
            row_digest: None,
        });
    }
    out
}

fn unknown(name: &str) -> AttributeChange {
    AttributeChange {
        name: name.to_string(),
        value: Value::Null,
        fingerprint: None,
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use bridge_shared::profile_feed::{FORMAT, ProfileChange};
    use serde_json::json;

    use super::*;
    use crate::model::fingerprint;
    use crate::state::confirmed::Snapshot;

    fn route(extra: &str) -> Route {
        Route::from_toml(
            &format!(
                r#"
name = "r"
prefix = "p/"
{extra}
[identifier]
kind = "external_id"
column = "id"
[fields]
first_name = "first_name"
[attributes.tier]
type = "String"
"#
            ),
            "test",
        )
        .unwrap()
    }

    fn confirmed(route: &Route, users: &[(&str, &str, &str)]) -> Snapshot {
        let mut s = Snapshot::for_route(route);
        for (id, first, tier) in users {
            s.apply_confirmed(&UserDelta {
                identifier: Identifier::ExternalId((*id).into()),
                pos: RowPos::default(),
                changes: vec![
                    AttributeChange {
                        name: "first_name".into(),
                        value: json!(first),
                        fingerprint: Some(fingerprint(&json!(first))),
                    },
                    AttributeChange {
                        name: "tier".into(),
                        value: json!(tier),
                        fingerprint: Some(fingerprint(&json!(tier))),
                    },
                ],
                update_existing_only: true,
                is_new: true,
                row_digest: Some(7),
            });
        }
        s.compact();
        s
    }

    fn feed(changes: Vec<ProfileChange>) -> FeedObject {
        FeedObject {
            format: FORMAT,
            source: "s3://c/k.avro".into(),
            event_type: "x".into(),
            delivery_hour: "2026-12-06-23".into(),
            changes,
        }
    }

    fn change(kind: ChangeKind, id: &str, attrs: serde_json::Value) -> ProfileChange {
        ProfileChange {
            kind,
            external_id: Some(id.into()),
            braze_id: Some(format!("b-{id}")),
            time_ms: 1,
            source: Some("SDK".into()),
            attributes: serde_json::from_value(attrs).unwrap(),
        }
    }

    #[test]
    fn a_deleted_user_is_forgotten_and_a_changed_attribute_is_unknown_but_our_own_write_is_not() {
        let r = route("");
        let snap = confirmed(
            &r,
            &[
                ("u1", "Ada", "gold"),
                ("u2", "Bo", "gold"),
                ("u3", "Cy", "gold"),
            ],
        );
        let f = feed(vec![
            change(ChangeKind::Deleted, "u1", json!({})),
            change(
                ChangeKind::Updated,
                "u2",
                json!({"tier": "silver", "unmapped": 1}),
            ),
            // Our own write coming back: the same value as confirmed.
            change(
                ChangeKind::Updated,
                "u3",
                json!({"tier": "gold", "first_name": "Cy"}),
            ),
            // Someone the route never confirmed.
            change(ChangeKind::Deleted, "u9", json!({})),
        ]);
        let e = effect(&r, &[f], |k| snap.get(k));
        assert_eq!((e.forgotten, e.invalidated), (1, 1));
        assert_eq!(e.deltas.len(), 2);
        let names = |d: &UserDelta| d.changes.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        assert_eq!(e.deltas[0].identifier, Identifier::ExternalId("u1".into()));
        assert_eq!(names(&e.deltas[0]), ["first_name", "tier"]);
        assert_eq!(e.deltas[1].identifier, Identifier::ExternalId("u2".into()));
        assert_eq!(names(&e.deltas[1]), ["tier"]);
        assert!(
            e.deltas.iter().all(
                |d| d.row_digest.is_none() && d.changes.iter().all(|c| c.fingerprint.is_none())
            )
        );

        // Applied, u1 holds nothing confirmed, u2 only its first name; u3 is untouched.
        let mut after = snap.clone();
        for d in &e.deltas {
            after.apply_confirmed(d);
        }
        let fp = |id: &str, slot| {
            after
                .get(Identifier::ExternalId(id.into()).user_key())
                .and_then(|s| s.fp(slot))
        };
        let slot = |n| r.slot_of(n).map(usize::from).unwrap();
        assert_eq!(fp("u1", slot("first_name")), None);
        assert_eq!(fp("u2", slot("tier")), None);
        assert!(fp("u2", slot("first_name")).is_some());
        assert!(fp("u3", slot("tier")).is_some());
    }

    #[test]
    fn keep_leaves_deleted_users_alone_and_the_latest_update_wins() {
        let r = route("on_braze_delete = \"keep\"");
        let snap = confirmed(&r, &[("u1", "Ada", "gold"), ("u2", "Bo", "gold")]);
        let mut late = change(ChangeKind::Updated, "u2", json!({"tier": "gold"}));
        late.time_ms = 9;
        let f = feed(vec![
            change(ChangeKind::Orphaned, "u1", json!({})),
            late,
            change(ChangeKind::Updated, "u2", json!({"tier": "silver"})),
        ]);
        let e = effect(&r, &[f], |k| snap.get(k));
        assert_eq!(
            e,
            FeedEffect::default(),
            "gold at 9 is the latest and confirmed"
        );
    }

    #[test]
    fn a_feed_object_is_applied_once_and_the_cursor_moves_on() {
        let now = parse_hour("2026-12-07-10").unwrap();
        let k = |h: &str, n: &str| format!("date={h}/users.UserDeleteRequest-{n}.json");
        let listed = vec![
            k("2026-11-20-00", "old"),
            k("2026-12-06-09", "a"),
            k("2026-12-07-09", "b"),
        ];
        let (todo, c1) = pending(None, &listed, now);
        assert_eq!(
            todo,
            [k("2026-12-06-09", "a"), k("2026-12-07-09", "b")],
            "7 days back"
        );
        assert_eq!(c1.through, "2026-12-06-10");
        assert_eq!(c1.applied, [k("2026-12-07-09", "b")]);
        let (again, c2) = pending(Some(&c1), &listed, now);
        assert!(again.is_empty());
        assert_eq!(c2, c1);
        let mut more = listed.clone();
        more.push(k("2026-12-07-08", "late"));
        let (late, _) = pending(Some(&c1), &more, now);
        assert_eq!(
            late,
            [k("2026-12-07-08", "late")],
            "written late, within the grace"
        );
        assert_eq!(days_to_list(Some(&c1), now), ["2026-12-06", "2026-12-07"]);
    }
}
