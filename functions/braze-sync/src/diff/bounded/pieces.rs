//! A fan-out's pieces added up: each piece diffs a span of the state's ranges with its
//! departures deferred; their summaries add up to a single run's before the finalizer
//! releases the departures.

use super::departures::share;
use crate::diff::export::Summary;

/// Adds one fan-out piece's summary (a run with `only_ranges` and `defer_departures`) to
/// `total`: counts summed, departures summed per audience (members, leavers, sent, held),
/// ignored columns joined. The pieces of one export add up to a single run's summary before
/// its departures are released ([`super::release_departures`]).
pub fn add_piece(total: &mut Summary, piece: &Summary) {
    total.rows_read += piece.rows_read;
    total.rejected += piece.rejected;
    total.unchanged += piece.unchanged;
    total.digests_recorded += piece.digests_recorded;
    total.users_changed += piece.users_changed;
    total.users_new += piece.users_new;
    total.attributes_changed += piece.attributes_changed;
    total.users_departed += piece.users_departed;
    total.departures_unaddressable += piece.departures_unaddressable;
    total.rows_without_identifier += piece.rows_without_identifier;
    total.tables += piece.tables;
    for c in &piece.ignored_columns {
        if !total.ignored_columns.contains(c) {
            total.ignored_columns.push(c.clone());
        }
    }
    total.ignored_columns.sort();
    for a in &piece.departures {
        match total
            .departures
            .iter_mut()
            .find(|t| t.audience == a.audience)
        {
            Some(t) => {
                t.members_before += a.members_before;
                t.leaving += a.leaving;
                t.sent += a.sent;
                t.held += a.held;
                t.share = share(t);
            }
            None => total.departures.push(a.clone()),
        }
    }
}
