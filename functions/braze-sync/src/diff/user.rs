//! Mapped rows vs confirmed state → what must change in Braze. Per user and attribute:
//!
//! - a user the state has never seen is sent whole (every non-empty attribute; no nulls);
//! - a known user is sent only the attributes whose fingerprint differs from the confirmed
//!   one, with `null` (and no fingerprint) for an attribute that became empty;
//! - a user whose values did not change produces nothing;
//! - with `full_resend`, every non-empty attribute is sent again (and `null` for confirmed
//!   attributes that became empty);
//! - a user the state knows as a member of an audience, who is absent from a complete export,
//!   gets that audience's `on_leave` value ([`departures`]).
//!
//! [`Seen`] tracks which users an export contained — one bit per known user plus a set of
//! the new ones — and catches the same identifier twice in one export.

use std::collections::HashSet;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::config::route::{OnLeave, Route, SlotKind};
use crate::map::{MappedRow, MappedUser, Norm};
use crate::model::{AttributeChange, Fingerprint, RowPos, UserDelta, UserKey, fingerprint};
use crate::state::confirmed::{Snapshot, UserState, stored_fp};

/// One slot's new value as the diff sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotFp {
    /// Not to be sent or compared.
    Skip,
    /// Empty.
    Null,
    /// A value with this fingerprint.
    Value(Fingerprint),
}

/// Values a diff can read: a [`MappedRow`] (hot path) or a [`MappedUser`].
pub trait Attrs {
    /// The fingerprint of `slot` (`buf` is scratch).
    fn slot_fp(&self, slot: usize, buf: &mut Vec<u8>) -> SlotFp;
    /// The value of `slot` as sent.
    fn slot_value(&self, slot: usize) -> Value;
}

impl Attrs for MappedRow {
    fn slot_fp(&self, slot: usize, buf: &mut Vec<u8>) -> SlotFp {
        match self.values.get(slot) {
            None | Some(Norm::Skip) => SlotFp::Skip,
            Some(_) => match self.fingerprint(slot, buf) {
                Some(fp) => SlotFp::Value(fp),
                None => SlotFp::Null,
            },
        }
    }

    fn slot_value(&self, slot: usize) -> Value {
        self.value(slot)
    }
}

impl Attrs for MappedUser {
    fn slot_fp(&self, slot: usize, _buf: &mut Vec<u8>) -> SlotFp {
        match self.attrs.iter().find(|(s, _)| *s as usize == slot) {
            None => SlotFp::Skip,
            Some((_, Value::Null)) => SlotFp::Null,
            Some((_, v)) => SlotFp::Value(fingerprint(v)),
        }
    }

    fn slot_value(&self, slot: usize) -> Value {
        self.attrs
            .iter()
            .find(|(s, _)| *s as usize == slot)
            .map_or(Value::Null, |(_, v)| v.clone())
    }
}

/// The changes for one user, in slot order (empty when nothing changed).
pub fn changes<A: Attrs>(
    state: Option<UserState<'_>>,
    attrs: &A,
    route: &Route,
    full_resend: bool,
    buf: &mut Vec<u8>,
) -> Vec<AttributeChange> {
    let mut out = Vec::new();
    for (slot, s) in route.slots.iter().enumerate() {
        let old = state.and_then(|st| st.fp(slot));
        match attrs.slot_fp(slot, buf) {
            SlotFp::Skip => {}
            SlotFp::Null => {
                if old.is_some() {
                    out.push(AttributeChange {
                        name: s.name.clone(),
                        value: Value::Null,
                        fingerprint: None,
                    });
                }
            }
            SlotFp::Value(fp) => {
                if full_resend || old != Some(stored_fp(fp)) {
                    out.push(AttributeChange {
                        name: s.name.clone(),
                        value: attrs.slot_value(slot),
                        fingerprint: Some(fp),
                    });
                }
            }
        }
    }
    out
}

/// The delta of one mapped user (the owned form), `None` when nothing changed.
pub fn diff(snapshot: &Snapshot, user: &MappedUser, route: &Route) -> Option<UserDelta> {
    let state = snapshot.get(user.identifier.user_key());
    let changes = changes(
        state,
        user,
        route,
        route.config.full_resend,
        &mut Vec::new(),
    );
    if changes.is_empty() {
        return None;
    }
    Some(UserDelta {
        identifier: user.identifier.clone(),
        pos: user.pos.clone(),
        changes,
        update_existing_only: route.config.update_existing_only,
        is_new: state.is_none(),
        row_digest: None,
    })
}

/// Which users an export contained.
#[derive(Debug, Clone)]
pub struct Seen {
    base: Vec<u64>,
    others: HashSet<u128>,
}

impl Seen {
    /// Nobody seen yet, sized for `snapshot`'s base (one bit per user).
    pub fn new(snapshot: &Snapshot) -> Self {
        Self {
            base: vec![0; snapshot.base_len().div_ceil(64)],
            others: HashSet::new(),
        }
    }

    /// Marks a user seen; false when it already was (a duplicate identifier).
    pub fn insert(&mut self, key: UserKey, state: Option<UserState<'_>>) -> bool {
        match state.and_then(|s| s.index) {
            Some(i) => {
                let (w, b) = (i / 64, 1u64 << (i % 64));
                match self.base.get_mut(w) {
                    Some(word) if *word & b != 0 => false,
                    Some(word) => {
                        *word |= b;
                        true
                    }
                    None => self.others.insert(key.0),
                }
            }
            None => self.others.insert(key.0),
        }
    }

    /// Forgets the users outside the base (the bounded diff's next hash range holds none of
    /// them: keys of different ranges never collide).
    pub fn clear_others(&mut self) {
        self.others.clear();
    }

    /// Whether a base user was seen.
    pub fn has_base(&self, index: usize) -> bool {
        self.base
            .get(index / 64)
            .is_some_and(|w| w & (1 << (index % 64)) != 0)
    }

    /// Whether a user outside the base was seen.
    pub fn has_other(&self, key: UserKey) -> bool {
        self.others.contains(&key.0)
    }

    /// Heap bytes held.
    pub fn memory_bytes(&self) -> usize {
        self.base.capacity() * 8 + self.others.capacity() * 24
    }
}

/// One audience's departures by absence in one run: what the state had, who would leave,
/// what was sent and what was held by the guard ([`guard_departures`]).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AudienceDepartures {
    /// The audience's Braze attribute.
    pub audience: String,
    /// Members the state had before the run.
    pub members_before: u64,
    /// Of those, members absent from this export.
    pub leaving: u64,
    /// `leaving / members_before` (0 when the audience had no members).
    pub share: f64,
    /// The audience's `max_departure_share`.
    pub cap: f64,
    /// Departures handed to the sender.
    pub sent: u64,
    /// Departures held back (not sent; the users stay members in the state).
    pub held: u64,
    /// Why they were held.
    pub held_because: Option<String>,
    /// The guard would have held them, but the operator released them.
    pub released: bool,
}

/// The result of scanning for users who left.
#[derive(Debug, Default)]
pub struct Departures {
    /// Audience removals to send.
    pub deltas: Vec<UserDelta>,
    /// Departed members whose identifier the state does not hold (state written before the
    /// route tracked departures): they cannot be addressed.
    pub unaddressable: u64,
    /// Per audience that sends something on leave, in slot order.
    pub audiences: Vec<AudienceDepartures>,
}

/// The audiences of `route` that send something on leave, in slot order, nothing counted
/// yet: the list [`departures`] fills (and the index space of departure records).
pub fn departure_audiences(route: &Route) -> Vec<AudienceDepartures> {
    route
        .slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s.kind {
            SlotKind::Audience { on_leave } if on_leave != OnLeave::Keep => {
                Some(AudienceDepartures {
                    audience: s.name.clone(),
                    cap: route.departure_cap(i),
                    ..Default::default()
                })
            }
            _ => None,
        })
        .collect()
}

/// Audience removals for users the state knows as members but `seen` did not contain, with
/// each audience's member and leaver counts. Only call this after a complete, successfully
/// read export. `source` names the export in the deltas' positions (row 0).
pub fn departures(snapshot: &Snapshot, route: &Route, seen: &Seen, source: &str) -> Departures {
    let member = stored_fp(fingerprint(&Value::Bool(true)));
    let leaving: Vec<(usize, &str, OnLeave)> = route
        .slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s.kind {
            SlotKind::Audience { on_leave } if on_leave != OnLeave::Keep => {
                Some((i, s.name.as_str(), on_leave))
            }
            _ => None,
        })
        .collect();
    let mut out = Departures {
        audiences: departure_audiences(route),
        ..Default::default()
    };
    if leaving.is_empty() {
        return out;
    }
    let mut visit = |key: UserKey, state: UserState<'_>, present: bool| {
        let mut changes = Vec::new();
        for (j, (slot, name, on_leave)) in leaving.iter().enumerate() {
            if state.fp(*slot) != Some(member) {
                continue;
            }
            out.audiences[j].members_before += 1;
            if present {
                continue;
            }
            out.audiences[j].leaving += 1;
            let value = match on_leave {
                OnLeave::Null => Value::Null,
                _ => Value::Bool(false),
            };
            changes.push(AttributeChange {
                name: (*name).to_string(),
                fingerprint: (!value.is_null()).then(|| fingerprint(&value)),
                value,
            });
        }
        if changes.is_empty() {
            return;
        }
        match snapshot.identifier(key) {
            Some(identifier) => out.deltas.push(UserDelta {
                identifier,
                pos: RowPos {
                    source: source.to_string(),
                    row: 0,
                    line: None,
                },
                changes,
                update_existing_only: route.config.update_existing_only,
                is_new: false,
                row_digest: None,
            }),
            None => out.unaddressable += 1,
        }
    };
    for i in 0..snapshot.base_len() {
        if let Some((key, state)) = snapshot.base_user(i) {
            visit(key, state, seen.has_base(i));
        }
    }
    for (key, state) in snapshot.overlay_users() {
        visit(key, state, seen.has_other(key));
    }
    for a in &mut out.audiences {
        if a.members_before > 0 {
            a.share = a.leaving as f64 / a.members_before as f64;
        }
    }
    out
}

/// The departure guard. An audience whose leavers exceed its cap (`max_departure_share` of
/// its members before the run) has all its departures held; when any row of the export had no
/// readable identifier (`rows_without_identifier`), absence proves nothing and every
/// audience's departures are held. Held changes are removed from the deltas (users leaving
/// nothing else are dropped), so they are never sent and the state keeps those users as
/// members. `allow` (the operator's release) sends them anyway and marks them released.
pub fn guard_departures(d: &mut Departures, rows_without_identifier: u64, allow: bool) {
    let held = decide_departures(&mut d.audiences, rows_without_identifier, allow);
    for delta in &mut d.deltas {
        hold_departure(delta, &mut d.audiences, &held);
    }
    d.deltas.retain(|delta| !delta.changes.is_empty());
}

/// The guard's verdict per audience (see [`guard_departures`]), from the audiences' totals:
/// which audiences' departures are held. Sets `held_because` / `released`.
pub fn decide_departures(
    audiences: &mut [AudienceDepartures],
    rows_without_identifier: u64,
    allow: bool,
) -> Vec<bool> {
    for a in audiences.iter_mut() {
        let reason = if rows_without_identifier > 0 && a.leaving > 0 {
            Some(format!(
                "{rows_without_identifier} rows of the export have no readable identifier, so absence does not prove departure"
            ))
        } else if a.leaving as f64 > a.cap * a.members_before as f64 {
            Some(format!(
                "{} of {} members ({:.1}%) would leave, more than max_departure_share {:.1}%",
                a.leaving,
                a.members_before,
                a.share * 100.0,
                a.cap * 100.0
            ))
        } else {
            None
        };
        match (reason, allow) {
            (Some(_), true) => a.released = true,
            (reason, _) => a.held_because = reason,
        }
    }
    audiences.iter().map(|a| a.held_because.is_some()).collect()
}

/// Removes the held audiences' changes from one departure delta, counting what is sent and
/// held; the delta is to be sent only if changes remain.
pub fn hold_departure(delta: &mut UserDelta, audiences: &mut [AudienceDepartures], held: &[bool]) {
    delta.changes.retain(|c| {
        let Some(j) = audiences.iter().position(|a| a.audience == c.name) else {
            return true;
        };
        if held[j] {
            audiences[j].held += 1;
        } else {
            audiences[j].sent += 1;
        }
        !held[j]
    });
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::Identifier;
    use serde_json::json;

    fn route(extra: &str) -> Route {
        Route::from_toml(
            &format!(
                "name = \"r\"\nprefix = \"p/\"\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\n[fields]\nfname = \"first_name\"\n[attributes.tier]\ntype = \"String\"\n{extra}"
            ),
            "t",
        )
        .unwrap()
    }

    fn user(id: &str, attrs: Vec<(u16, Value)>) -> MappedUser {
        MappedUser {
            identifier: Identifier::ExternalId(id.into()),
            pos: RowPos {
                source: "s3://b/k".into(),
                row: 3,
                line: Some(4),
            },
            attrs,
        }
    }

    #[test]
    fn new_user_is_sent_whole_without_nulls() {
        let r = route("");
        let s = Snapshot::for_route(&r);
        let d = diff(
            &s,
            &user("1", vec![(0, json!("Ada")), (1, Value::Null)]),
            &r,
        )
        .unwrap();
        assert!(d.is_new);
        assert_eq!(
            d.to_attribute_object(),
            json!({"external_id": "1", "_update_existing_only": true, "first_name": "Ada"})
        );
    }

    #[test]
    fn known_user_gets_only_changes_and_null_for_emptied() {
        let r = route("");
        let mut s = Snapshot::for_route(&r);
        let first = diff(
            &s,
            &user("1", vec![(0, json!("Ada")), (1, json!("gold"))]),
            &r,
        )
        .unwrap();
        s.apply_confirmed(&first);
        assert_eq!(
            diff(
                &s,
                &user("1", vec![(0, json!("Ada")), (1, json!("gold"))]),
                &r
            ),
            None
        );
        let d = diff(
            &s,
            &user("1", vec![(0, json!("Ada")), (1, Value::Null)]),
            &r,
        )
        .unwrap();
        assert!(!d.is_new);
        assert_eq!(
            d.to_attribute_object(),
            json!({"external_id": "1", "_update_existing_only": true, "tier": null})
        );
        assert_eq!(d.changes[0].fingerprint, None);
    }

    #[test]
    fn departed_members_get_the_on_leave_value() {
        let r = route(
            "[[audiences]]\nattribute = \"aud_vip\"\n[[audiences]]\nattribute = \"aud_x\"\non_leave = \"null\"\n",
        );
        let mut s = Snapshot::for_route(&r);
        for id in ["stay", "go"] {
            let d = diff(&s, &user(id, vec![(2, json!(true)), (3, json!(true))]), &r).unwrap();
            s.apply_confirmed(&d);
        }
        s.compact();
        let mut seen = Seen::new(&s);
        let k = Identifier::ExternalId("stay".into()).user_key();
        assert!(seen.insert(k, s.get(k)));
        assert!(!seen.insert(k, s.get(k)), "second sighting is a duplicate");
        let out = departures(&s, &r, &seen, "s3://b/k");
        assert_eq!(out.deltas.len(), 1);
        assert_eq!(
            out.deltas[0].to_attribute_object(),
            json!({"external_id": "go", "_update_existing_only": true, "aud_vip": false, "aud_x": null})
        );
    }

    #[test]
    fn the_guard_holds_per_audience_with_its_own_cap_and_unreadable_rows_hold_all() {
        let r = Route::from_toml(
            "name = \"r\"\nprefix = \"p/\"\nmax_departure_share = 0.5\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\n[fields]\nfname = \"first_name\"\n[attributes.tier]\ntype = \"String\"\n[[audiences]]\nattribute = \"aud_a\"\n[[audiences]]\nattribute = \"aud_b\"\nmax_departure_share = 0.25\n",
            "t",
        )
        .unwrap();
        let mut s = Snapshot::for_route(&r);
        for id in ["1", "2", "3", "4"] {
            let d = diff(&s, &user(id, vec![(2, json!(true)), (3, json!(true))]), &r).unwrap();
            s.apply_confirmed(&d);
        }
        s.compact();
        assert_eq!(r.departure_cap(2), 0.5);
        assert_eq!(r.departure_cap(3), 0.25);
        let mut seen = Seen::new(&s);
        for id in ["1", "2", "3"] {
            let k = Identifier::ExternalId(id.into()).user_key();
            seen.insert(k, s.get(k));
        }
        // One of four leaves (25%): within aud_a's 50%, and exactly aud_b's 25% (not more).
        let mut d = departures(&s, &r, &seen, "x");
        guard_departures(&mut d, 0, false);
        assert_eq!(d.deltas.len(), 1);
        assert!(d.audiences.iter().all(|a| a.sent == 1 && a.held == 0));
        // Two of four leave (50%): aud_b (25%) is held, aud_a (50%) is sent.
        let mut seen = Seen::new(&s);
        for id in ["1", "2"] {
            let k = Identifier::ExternalId(id.into()).user_key();
            seen.insert(k, s.get(k));
        }
        let mut d = departures(&s, &r, &seen, "x");
        guard_departures(&mut d, 0, false);
        let (a, b) = (&d.audiences[0], &d.audiences[1]);
        assert_eq!((a.sent, a.held, b.sent, b.held), (2, 0, 0, 2));
        assert!(
            d.deltas
                .iter()
                .all(|x| x.changes.len() == 1 && x.changes[0].name == "aud_a")
        );
        // A row without a readable identifier holds every audience's departures.
        let mut d = departures(&s, &r, &seen, "x");
        guard_departures(&mut d, 1, false);
        assert!(d.deltas.is_empty());
        assert!(
            d.audiences
                .iter()
                .all(|a| a.held == 2 && a.held_because.is_some())
        );
    }
}
