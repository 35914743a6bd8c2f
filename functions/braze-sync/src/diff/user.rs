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
use crate::state::confirmed::{Snapshot, UNKNOWN_FP, UserState, stored_fp};

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
    /// What the entry guards (an audience's departures by default).
    pub kind: DepartureKind,
    /// `clear_fields` only: the attributes set to `null` for a user who left.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub attributes: Vec<String>,
}

/// What one entry of the departure guard counts.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DepartureKind {
    /// Members of an audience absent from the export (`members_before`: its members).
    #[default]
    Audience,
    /// Users changing a consent state (`email_subscribe`, `push_subscribe`, a subscription
    /// group) to `unsubscribed` from another confirmed state (`members_before`: users with a
    /// confirmed state for it).
    Unsubscribe,
    /// Users absent from the export whose fields `on_leave = "clear_fields"` sets to `null`
    /// (`members_before`: users with a confirmed value in any of those fields).
    ClearFields,
}

/// The name of the route's `on_leave = "clear_fields"` entry among the departures.
pub const CLEAR_FIELDS_ENTRY: &str = "on_leave=clear_fields";

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

/// The departure guard's entries for `route`, nothing counted yet: the audiences that send
/// something on leave (in slot order), then each consent slot (its unsubscribes), then the
/// route's `clear_fields`. The list [`departures`] fills, and the index space of departure
/// records.
pub fn departure_audiences(route: &Route) -> Vec<AudienceDepartures> {
    let cap = route.config.max_departure_share;
    let entry = |audience: &str, cap: f64, kind: DepartureKind| AudienceDepartures {
        audience: audience.to_string(),
        cap,
        kind,
        ..Default::default()
    };
    let mut out: Vec<AudienceDepartures> = route
        .slots
        .iter()
        .enumerate()
        .filter_map(|(i, s)| match s.kind {
            SlotKind::Audience { on_leave } if on_leave != OnLeave::Keep => Some(entry(
                &s.name,
                route.departure_cap(i),
                DepartureKind::Audience,
            )),
            _ => None,
        })
        .collect();
    for i in route.consent_slots() {
        out.push(entry(&route.slots[i].name, cap, DepartureKind::Unsubscribe));
    }
    let cleared = route.cleared_on_leave();
    if !cleared.is_empty() {
        let mut e = entry(CLEAR_FIELDS_ENTRY, cap, DepartureKind::ClearFields);
        e.attributes = cleared
            .iter()
            .map(|&i| route.slots[i].name.clone())
            .collect();
        out.push(e);
    }
    out
}

/// Where each guarded slot counts among the entries of [`departure_audiences`].
struct LeavePlan<'r> {
    route: &'r Route,
    /// `(slot, entry, on_leave)` per audience that sends something on leave.
    audiences: Vec<(usize, usize, OnLeave)>,
    /// `(slot, entry)` per consent slot.
    consent: Vec<(usize, usize)>,
    /// The `clear_fields` entry and the slots it clears.
    clear: Option<(usize, Vec<usize>)>,
    member: u64,
}

impl<'r> LeavePlan<'r> {
    fn new(route: &'r Route, entries: &[AudienceDepartures]) -> Self {
        let entry = |name: &str, kind| {
            entries
                .iter()
                .position(|a| a.audience == name && a.kind == kind)
        };
        let mut plan = LeavePlan {
            route,
            audiences: Vec::new(),
            consent: Vec::new(),
            clear: None,
            member: stored_fp(fingerprint(&Value::Bool(true))),
        };
        for (i, s) in route.slots.iter().enumerate() {
            match s.kind {
                SlotKind::Audience { on_leave } => {
                    if let Some(j) = entry(&s.name, DepartureKind::Audience) {
                        plan.audiences.push((i, j, on_leave));
                    }
                }
                k if k.is_consent() => {
                    if let Some(j) = entry(&s.name, DepartureKind::Unsubscribe) {
                        plan.consent.push((i, j));
                    }
                }
                _ => {}
            }
        }
        plan.clear = entry(CLEAR_FIELDS_ENTRY, DepartureKind::ClearFields)
            .map(|j| (j, route.cleared_on_leave()));
        plan
    }

    fn is_empty(&self) -> bool {
        self.audiences.is_empty() && self.consent.is_empty() && self.clear.is_none()
    }

    /// Counts one user of the state in `entries`; for a user absent from the export
    /// (`!present`), the changes leaving sends.
    fn visit(
        &self,
        state: UserState<'_>,
        present: bool,
        entries: &mut [AudienceDepartures],
    ) -> Vec<AttributeChange> {
        let change = |slot: usize, value: Value| AttributeChange {
            name: self.route.slots[slot].name.clone(),
            fingerprint: (!value.is_null()).then(|| fingerprint(&value)),
            value,
        };
        let mut changes = Vec::new();
        for &(slot, j, on_leave) in &self.audiences {
            // A membership marked unknown (a heal, a crash's intent, the Currents feed) may be
            // a membership Braze holds: it counts as one, so leaving still sends the removal.
            let fp = state.fp(slot);
            if fp != Some(self.member) && fp != Some(UNKNOWN_FP) {
                continue;
            }
            entries[j].members_before += 1;
            if present {
                continue;
            }
            entries[j].leaving += 1;
            changes.push(change(
                slot,
                match on_leave {
                    OnLeave::Null => Value::Null,
                    _ => Value::Bool(false),
                },
            ));
        }
        for &(slot, j) in &self.consent {
            entries[j].members_before += u64::from(state.fp(slot).is_some());
        }
        if let Some((j, slots)) = &self.clear {
            let set: Vec<usize> = slots
                .iter()
                .copied()
                .filter(|&s| state.fp(s).is_some())
                .collect();
            if !set.is_empty() {
                entries[*j].members_before += 1;
                if !present {
                    entries[*j].leaving += 1;
                    changes.extend(set.into_iter().map(|s| change(s, Value::Null)));
                }
            }
        }
        changes
    }
}

/// Departure changes for users the state knows but `seen` did not contain (an audience's
/// `on_leave` value for its members, `null` for the fields `clear_fields` clears), with each
/// entry's counts (members before the run, leavers; for a consent slot, the users with a
/// confirmed state). Only call this after a complete, successfully read export. `source` names
/// the export in the deltas' positions (row 0).
pub fn departures(snapshot: &Snapshot, route: &Route, seen: &Seen, source: &str) -> Departures {
    let mut out = Departures {
        audiences: departure_audiences(route),
        ..Default::default()
    };
    let plan = LeavePlan::new(route, &out.audiences);
    if plan.is_empty() {
        return out;
    }
    let mut visit = |key: UserKey, state: UserState<'_>, present: bool| {
        let changes = plan.visit(state, present, &mut out.audiences);
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

/// Finds, in one user's changes, the consent states that change to `unsubscribed` from
/// another state the route confirmed: the mass-unsubscribe guard holds these like departures
/// (counted in the [`DepartureKind::Unsubscribe`] entries, judged on the export's totals,
/// sent at the end or held). A user new to the state, or whose state for the field is
/// unknown, is not guarded.
#[derive(Debug, Clone)]
pub struct UnsubscribeGuard {
    /// `(slot, name, entry)` per consent slot.
    slots: Vec<(usize, String, usize)>,
    unsubscribed: Fingerprint,
    update_existing_only: bool,
}

impl UnsubscribeGuard {
    /// The guard of `route`'s consent slots (`None` when it maps none).
    pub fn new(route: &Route) -> Option<Self> {
        let entries = departure_audiences(route);
        let slots: Vec<(usize, String, usize)> = route
            .consent_slots()
            .into_iter()
            .filter_map(|i| {
                let name = route.slots[i].name.clone();
                let j = entries
                    .iter()
                    .position(|a| a.audience == name && a.kind == DepartureKind::Unsubscribe)?;
                Some((i, name, j))
            })
            .collect();
        (!slots.is_empty()).then(|| UnsubscribeGuard {
            slots,
            unsubscribed: fingerprint(&Value::String("unsubscribed".into())),
            update_existing_only: route.config.update_existing_only,
        })
    }

    /// Takes the guarded changes out of `changes` (as [`take`](Self::take)) and keeps them as
    /// one delta of `row`'s user at `pos` in `held`, for the departure guard; whether there
    /// were any.
    pub fn hold(
        &self,
        state: Option<UserState<'_>>,
        changes: &mut Vec<AttributeChange>,
        entries: &mut [AudienceDepartures],
        (row, pos): (&MappedRow, RowPos),
        held: &mut Vec<UserDelta>,
    ) -> bool {
        let taken = self.take(state, changes, entries);
        if taken.is_empty() {
            return false;
        }
        held.push(UserDelta {
            identifier: row.identifier(),
            pos,
            changes: taken,
            update_existing_only: self.update_existing_only,
            is_new: false,
            row_digest: None,
        });
        true
    }

    /// Takes the guarded changes out of `changes` and counts them as leaving in `entries`
    /// (the route's [`departure_audiences`]).
    pub fn take(
        &self,
        state: Option<UserState<'_>>,
        changes: &mut Vec<AttributeChange>,
        entries: &mut [AudienceDepartures],
    ) -> Vec<AttributeChange> {
        let Some(state) = state else {
            return Vec::new();
        };
        let mut taken = Vec::new();
        changes.retain(|c| {
            let Some((slot, _, j)) = self.slots.iter().find(|(_, n, _)| *n == c.name) else {
                return true;
            };
            // An unknown state (a run that died with the user in flight) is no confirmed
            // subscription: the user's consent goes as it would for a new user.
            let guarded = c.fingerprint == Some(self.unsubscribed)
                && state
                    .fp(*slot)
                    .is_some_and(|old| old != stored_fp(self.unsubscribed) && old != UNKNOWN_FP);
            if guarded {
                if let Some(e) = entries.get_mut(*j) {
                    e.leaving += 1;
                }
                taken.push(c.clone());
            }
            !guarded
        });
        taken
    }
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
        let absence = a.kind != DepartureKind::Unsubscribe;
        let reason = if absence && rows_without_identifier > 0 && a.leaving > 0 {
            Some(format!(
                "{rows_without_identifier} rows of the export have no readable identifier, so absence does not prove departure"
            ))
        } else if a.leaving as f64 > a.cap * a.members_before as f64 {
            let what = match a.kind {
                DepartureKind::Audience => "members",
                DepartureKind::Unsubscribe => "users with a confirmed state",
                DepartureKind::ClearFields => "users with confirmed fields",
            };
            let verb = match a.kind {
                DepartureKind::Audience => "would leave".to_string(),
                DepartureKind::Unsubscribe => {
                    format!("would change {} to unsubscribed", a.audience)
                }
                DepartureKind::ClearFields => "would leave and have their fields cleared".into(),
            };
            Some(format!(
                "{} of {} {what} ({:.1}%) {verb}, more than max_departure_share {:.1}%",
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

/// The entry of `audiences` a departure change counts in: its audience or consent slot by
/// name, or the `clear_fields` entry that lists it.
pub fn entry_of(audiences: &[AudienceDepartures], name: &str) -> Option<usize> {
    audiences
        .iter()
        .position(|a| a.audience == name && a.kind != DepartureKind::ClearFields)
        .or_else(|| {
            audiences
                .iter()
                .position(|a| a.attributes.iter().any(|n| n == name))
        })
}

/// Removes the held entries' changes from one departure delta, counting what is sent and
/// held (once per user and entry); the delta is to be sent only if changes remain.
pub fn hold_departure(delta: &mut UserDelta, audiences: &mut [AudienceDepartures], held: &[bool]) {
    let mut counted = vec![false; audiences.len()];
    delta.changes.retain(|c| {
        let Some(j) = entry_of(audiences, &c.name) else {
            return true;
        };
        let hold = held.get(j).copied().unwrap_or(false);
        if !std::mem::replace(&mut counted[j], true) {
            if hold {
                audiences[j].held += 1;
            } else {
                audiences[j].sent += 1;
            }
        }
        !hold
    });
}

/// Whether a departure delta (after [`hold_departure`]) is about a user who left, rather than
/// only a held-back unsubscribe of a user who is in the export.
pub fn is_departure(delta: &UserDelta, audiences: &[AudienceDepartures]) -> bool {
    delta.changes.iter().any(|c| {
        entry_of(audiences, &c.name).is_none_or(|j| audiences[j].kind != DepartureKind::Unsubscribe)
    })
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
    fn a_membership_marked_unknown_still_gets_its_removal_on_leaving() {
        let r = route("[[audiences]]\nattribute = \"aud_vip\"\n");
        let mut s = Snapshot::for_route(&r);
        for id in ["stay", "go"] {
            let d = diff(&s, &user(id, vec![(2, json!(true))]), &r).unwrap();
            s.apply_confirmed(&d);
        }
        // A heal (or a crash's intent) marks "go"'s membership unknown.
        let go = Identifier::ExternalId("go".into());
        s.apply_confirmed(&UserDelta {
            identifier: go.clone(),
            pos: RowPos {
                source: "heal".into(),
                row: 0,
                line: None,
            },
            changes: vec![AttributeChange {
                name: "aud_vip".into(),
                value: Value::Null,
                fingerprint: Some(UNKNOWN_FP),
            }],
            update_existing_only: false,
            is_new: false,
            row_digest: None,
        });
        s.compact();
        assert_eq!(s.get(go.user_key()).and_then(|u| u.fp(2)), Some(UNKNOWN_FP));
        let mut seen = Seen::new(&s);
        let k = Identifier::ExternalId("stay".into()).user_key();
        assert!(seen.insert(k, s.get(k)));
        let out = departures(&s, &r, &seen, "s3://b/k");
        assert_eq!(
            (out.audiences[0].members_before, out.audiences[0].leaving),
            (2, 1)
        );
        assert_eq!(out.deltas.len(), 1);
        assert_eq!(
            out.deltas[0].to_attribute_object(),
            json!({"external_id": "go", "_update_existing_only": true, "aud_vip": false})
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

    fn consent_route(share: &str) -> Route {
        Route::from_toml(
            &format!(
                "name = \"r\"\nprefix = \"p/\"\non_leave = \"clear_fields\"\nmax_departure_share = {share}\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\n[fields]\nfname = \"first_name\"\noptin = \"email_subscribe\"\n[attributes.tier]\ntype = \"String\"\n[subscription_groups]\nnews = \"sg-news\"\n"
            ),
            "t",
        )
        .unwrap()
    }

    /// Slots of [`consent_route`]: first_name 0, email_subscribe 1, tier 2, sg-news 3.
    fn confirmed(r: &Route, ids: &[&str], mail: &str, group: &str) -> Snapshot {
        let mut s = Snapshot::for_route(r);
        for id in ids {
            let u = user(
                id,
                vec![
                    (0, json!("Ada")),
                    (1, json!(mail)),
                    (2, json!("gold")),
                    (3, json!(group)),
                ],
            );
            s.apply_confirmed(&diff(&s, &u, r).unwrap());
        }
        s.compact();
        s
    }

    #[test]
    fn the_unsubscribe_guard_takes_only_changes_from_another_confirmed_state() {
        let r = consent_route("0.2");
        assert_eq!(r.slot_names()[3], "subscription_group:sg-news");
        let s = confirmed(&r, &["1", "2"], "opted_in", "subscribed");
        let g = UnsubscribeGuard::new(&r).unwrap();
        let mut entries = departure_audiences(&r);
        let kinds: Vec<_> = entries
            .iter()
            .map(|a| (a.audience.as_str(), a.kind))
            .collect();
        assert_eq!(
            kinds,
            [
                ("email_subscribe", DepartureKind::Unsubscribe),
                ("subscription_group:sg-news", DepartureKind::Unsubscribe),
                (CLEAR_FIELDS_ENTRY, DepartureKind::ClearFields),
            ]
        );
        assert_eq!(entries[2].attributes, ["first_name", "tier"]);
        let row = user(
            "1",
            vec![
                (0, json!("Ada")),
                (1, json!("unsubscribed")),
                (2, json!("silver")),
                (3, json!("unsubscribed")),
            ],
        );
        let k = row.identifier.user_key();
        let mut changes = changes(s.get(k), &row, &r, false, &mut Vec::new());
        let held = g.take(s.get(k), &mut changes, &mut entries);
        let names = |c: &[AttributeChange]| c.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        assert_eq!(
            names(&held),
            ["email_subscribe", "subscription_group:sg-news"]
        );
        assert_eq!(names(&changes), ["tier"]);
        assert_eq!((entries[0].leaving, entries[1].leaving), (1, 1));
        // A user new to the state, and a change to another state, are not guarded.
        let mut changes = changes_of_new(&r, "9");
        assert!(g.take(None, &mut changes, &mut entries).is_empty());
        let row = user(
            "2",
            vec![(1, json!("subscribed")), (3, json!("subscribed"))],
        );
        let k = row.identifier.user_key();
        let mut changes = super::changes(s.get(k), &row, &r, false, &mut Vec::new());
        assert!(g.take(s.get(k), &mut changes, &mut entries).is_empty());
        assert_eq!(names(&changes), ["email_subscribe"]);
    }

    #[test]
    fn the_unsubscribe_guard_leaves_a_state_marked_unknown_alone() {
        let r = consent_route("0.2");
        let mut s = confirmed(&r, &["1"], "opted_in", "subscribed");
        // A run that died with user 1 in flight marked its consent unknown.
        let id = Identifier::ExternalId("1".into());
        s.apply_confirmed(&UserDelta {
            identifier: id.clone(),
            pos: RowPos {
                source: "intent".into(),
                row: 0,
                line: None,
            },
            changes: vec![AttributeChange {
                name: "email_subscribe".into(),
                value: Value::Null,
                fingerprint: Some(UNKNOWN_FP),
            }],
            update_existing_only: false,
            is_new: false,
            row_digest: None,
        });
        s.compact();
        let g = UnsubscribeGuard::new(&r).unwrap();
        let mut entries = departure_audiences(&r);
        let row = user(
            "1",
            vec![(1, json!("unsubscribed")), (3, json!("unsubscribed"))],
        );
        let k = id.user_key();
        let mut changes = changes(s.get(k), &row, &r, false, &mut Vec::new());
        let held = g.take(s.get(k), &mut changes, &mut entries);
        // The group's confirmed subscription is guarded; the unknown email consent is sent.
        let names = |c: &[AttributeChange]| c.iter().map(|c| c.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&held), ["subscription_group:sg-news"]);
        assert_eq!(names(&changes), ["email_subscribe"]);
        assert_eq!((entries[0].leaving, entries[1].leaving), (0, 1));
    }

    fn changes_of_new(r: &Route, id: &str) -> Vec<AttributeChange> {
        let row = user(id, vec![(1, json!("unsubscribed"))]);
        changes(None, &row, r, false, &mut Vec::new())
    }

    #[test]
    fn a_mass_unsubscribe_is_held_and_released_like_departures() {
        let r = consent_route("0.5");
        let s = confirmed(&r, &["1", "2", "3", "4"], "opted_in", "subscribed");
        let g = UnsubscribeGuard::new(&r).unwrap();
        let run = |unsubscribing: &[&str], allow: bool| {
            let mut seen = Seen::new(&s);
            for id in ["1", "2", "3", "4"] {
                let k = Identifier::ExternalId(id.into()).user_key();
                seen.insert(k, s.get(k));
            }
            let mut d = departures(&s, &r, &seen, "x");
            for id in unsubscribing {
                let row = user(id, vec![(1, json!("unsubscribed"))]);
                let k = row.identifier.user_key();
                let mut c = changes(s.get(k), &row, &r, false, &mut Vec::new());
                let held = g.take(s.get(k), &mut c, &mut d.audiences);
                d.deltas.push(UserDelta {
                    identifier: row.identifier.clone(),
                    pos: row.pos.clone(),
                    changes: held,
                    update_existing_only: true,
                    is_new: false,
                    row_digest: None,
                });
            }
            for a in &mut d.audiences {
                a.share = a.leaving as f64 / a.members_before.max(1) as f64;
            }
            guard_departures(&mut d, 1, allow);
            d
        };
        // Two of four (50%): within the cap; a row without an identifier proves nothing
        // about unsubscribes, so they are sent.
        let d = run(&["1", "2"], false);
        assert_eq!((d.audiences[0].members_before, d.audiences[0].sent), (4, 2));
        assert_eq!(d.deltas.len(), 2);
        assert!(d.deltas.iter().all(|x| !is_departure(x, &d.audiences)));
        // Three of four (75%): held, with the reason.
        let d = run(&["1", "2", "3"], false);
        assert!(d.deltas.is_empty());
        assert_eq!(d.audiences[0].held, 3);
        let why = d.audiences[0].held_because.clone().unwrap();
        assert!(
            why.contains("3 of 4") && why.contains("email_subscribe to unsubscribed"),
            "{why}"
        );
        // Released by the operator.
        let d = run(&["1", "2", "3"], true);
        assert_eq!(d.deltas.len(), 3);
        assert!(d.audiences[0].released);
    }

    #[test]
    fn clear_fields_nulls_the_confirmed_fields_of_users_who_left_but_not_their_consent() {
        let r = consent_route("0.5");
        let s = confirmed(&r, &["1", "2", "3", "4"], "opted_in", "subscribed");
        let mut seen = Seen::new(&s);
        for id in ["1", "2", "3"] {
            let k = Identifier::ExternalId(id.into()).user_key();
            seen.insert(k, s.get(k));
        }
        let mut d = departures(&s, &r, &seen, "x");
        guard_departures(&mut d, 0, false);
        assert_eq!(d.deltas.len(), 1);
        assert_eq!(
            d.deltas[0].to_attribute_object(),
            json!({"external_id": "4", "_update_existing_only": true, "first_name": null, "tier": null})
        );
        assert!(is_departure(&d.deltas[0], &d.audiences));
        let clear = &d.audiences[2];
        assert_eq!((clear.members_before, clear.leaving, clear.sent), (4, 1, 1));
        // Three of four leaving is over the cap: held, with the reason.
        let mut seen = Seen::new(&s);
        let k = Identifier::ExternalId("1".into()).user_key();
        seen.insert(k, s.get(k));
        let mut d = departures(&s, &r, &seen, "x");
        guard_departures(&mut d, 0, false);
        assert!(d.deltas.is_empty());
        assert_eq!(d.audiences[2].held, 3);
        assert!(
            d.audiences[2]
                .held_because
                .as_ref()
                .unwrap()
                .contains("fields cleared")
        );
    }
}
