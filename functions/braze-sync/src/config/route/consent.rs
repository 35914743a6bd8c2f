//! A route's consent and departure settings: the departure caps, the `[subscription_groups]`
//! table (a column per Braze subscription group), the route's `on_leave` (what a user absent
//! from a complete export gets), and the questions the diff asks about them: which slots hold
//! consent, which are cleared when a user leaves, and whether the route has departures or
//! unsubscribes to guard.

use serde::Deserialize;

use super::{Route, RouteConfig, RouteError, Slot};
use crate::model::SUBSCRIPTION_GROUP_PREFIX;
use crate::vocab::{OnLeave, SlotKind};

/// What a user absent from a complete export gets, for the route's own attributes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RouteOnLeave {
    /// Nothing (audiences still send their own `on_leave`).
    #[default]
    Keep,
    /// Every standard field and custom attribute the state has confirmed for them is set to
    /// `null` (consent states are never cleared), under the departure cap.
    ClearFields,
}

/// Longest subscription group id accepted (Braze's ids are UUIDs).
const MAX_GROUP_ID_CHARS: usize = 255;

/// One slot per `[subscription_groups]` entry: a column holding the state of one group.
pub(super) fn subscription_group_slots(
    config: &RouteConfig,
    origin: &str,
) -> Result<Vec<Slot>, RouteError> {
    let mut slots = Vec::new();
    for (column, id) in &config.subscription_groups {
        let bad = id.is_empty()
            || id.chars().count() > MAX_GROUP_ID_CHARS
            || id.chars().any(|c| c.is_whitespace() || c.is_control());
        if bad {
            return Err(RouteError::Invalid {
                origin: origin.to_string(),
                message: format!(
                    "subscription_groups.{column} = {id:?} is not a subscription group id (the group's id from Braze's dashboard: 1 to {MAX_GROUP_ID_CHARS} characters, no spaces)"
                ),
            });
        }
        slots.push(Slot {
            name: format!("{SUBSCRIPTION_GROUP_PREFIX}{id}"),
            column: Some(column.clone()),
            kind: SlotKind::SubscriptionGroup,
        });
    }
    Ok(slots)
}

/// Every departure cap (the route's and each audience's) is a share between 0 and 1.
pub(super) fn check_departure_shares(config: &RouteConfig, origin: &str) -> Result<(), RouteError> {
    let invalid = |message| RouteError::Invalid {
        origin: origin.to_string(),
        message,
    };
    let shares = std::iter::once((
        "max_departure_share".to_string(),
        Some(config.max_departure_share),
    ))
    .chain(config.audiences.iter().map(|a| {
        (
            format!("audiences {:?} max_departure_share", a.attribute),
            a.max_departure_share,
        )
    }));
    for (key, share) in shares {
        if let Some(v) = share
            && !(0.0..=1.0).contains(&v)
        {
            return Err(invalid(format!("{key} = {v} must be between 0.0 and 1.0")));
        }
    }
    Ok(())
}

/// Whether a custom attribute name would be read as a subscription group's.
pub(super) fn names_a_group(name: &str) -> bool {
    name.get(..SUBSCRIPTION_GROUP_PREFIX.len())
        .is_some_and(|p| p.eq_ignore_ascii_case(SUBSCRIPTION_GROUP_PREFIX))
}

impl Route {
    /// The departure cap of the audience in `slot` (its own `max_departure_share`, else the
    /// route's).
    pub fn departure_cap(&self, slot: usize) -> f64 {
        let name = self.slots.get(slot).map(|s| s.name.as_str());
        self.config
            .audiences
            .iter()
            .find(|a| Some(a.attribute.as_str()) == name)
            .and_then(|a| a.max_departure_share)
            .unwrap_or(self.config.max_departure_share)
    }

    /// True when a user absent from a complete export gets something: an audience that sends
    /// its `on_leave`, or the route's `on_leave = "clear_fields"`. Such a route keeps its
    /// users' identifiers in the state (an absent user has no row to take them from).
    pub fn tracks_departures(&self) -> bool {
        self.config.on_leave == RouteOnLeave::ClearFields
            || self.slots.iter().any(|s| {
                matches!(
                    s.kind,
                    SlotKind::Audience {
                        on_leave: OnLeave::False | OnLeave::Null
                    }
                )
            })
    }

    /// True when the route maps a consent state, whose mass changes to `unsubscribed` are
    /// held like departures.
    pub fn guards_unsubscribes(&self) -> bool {
        self.slots.iter().any(|s| s.kind.is_consent())
    }

    /// The slots `on_leave = "clear_fields"` sets to `null` for a user who left: every
    /// standard field and custom attribute except consent states (empty otherwise).
    pub fn cleared_on_leave(&self) -> Vec<usize> {
        if self.config.on_leave != RouteOnLeave::ClearFields {
            return Vec::new();
        }
        (0..self.slots.len())
            .filter(|&i| match self.slots[i].kind {
                SlotKind::Standard(f) => !f.is_subscription(),
                SlotKind::Custom { .. } => true,
                _ => false,
            })
            .collect()
    }

    /// The consent slots (`email_subscribe`, `push_subscribe`, subscription groups).
    pub fn consent_slots(&self) -> Vec<usize> {
        (0..self.slots.len())
            .filter(|&i| self.slots[i].kind.is_consent())
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BASE: &str =
        "name = \"c\"\nprefix = \"p/\"\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\n";

    #[test]
    fn subscription_groups_become_slots_after_the_audiences() {
        let r = Route::from_toml(
            &format!(
                "on_leave = \"clear_fields\"\n{BASE}[fields]\nmail_optin = \"email_subscribe\"\nfname = \"first_name\"\n[attributes.tier]\ntype = \"String\"\n[subscription_groups]\nnews = \"sg-news-1\"\n[[audiences]]\nattribute = \"aud_vip\"\n"
            ),
            "t",
        )
        .unwrap();
        assert_eq!(
            r.slot_names(),
            [
                "first_name",
                "email_subscribe",
                "tier",
                "aud_vip",
                "subscription_group:sg-news-1"
            ]
        );
        assert_eq!(r.slots[4].column.as_deref(), Some("news"));
        assert_eq!(r.consent_slots(), [1, 4]);
        assert_eq!(r.cleared_on_leave(), [0, 2]);
        assert!(r.tracks_departures() && r.guards_unsubscribes());
    }

    #[test]
    fn bad_group_ids_and_names_that_look_like_groups_are_refused() {
        let err = Route::from_toml(
            &format!("{BASE}[subscription_groups]\nnews = \"a b\"\n"),
            "t",
        )
        .unwrap_err();
        assert!(
            err.to_string().contains("subscription_groups.news"),
            "{err}"
        );
        let err = Route::from_toml(
            &format!(
                "{BASE}[attributes.x]\nname = \"Subscription_Group:abc\"\ntype = \"String\"\n"
            ),
            "t",
        )
        .unwrap_err();
        assert!(err.to_string().contains("subscription group"), "{err}");
        let plain = Route::from_toml(BASE, "t").unwrap();
        assert!(!plain.tracks_departures() && !plain.guards_unsubscribes());
        assert!(plain.cleared_on_leave().is_empty());
    }
}
