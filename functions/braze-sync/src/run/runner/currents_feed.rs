//! Before a run diffs, the route applies the Braze Currents profile-change feed it has not
//! applied yet ([`crate::state::profile_feed`]): read the pending feed objects, look up the
//! users they name (the loaded snapshot, or only their hash ranges for the bounded diff),
//! and write what Braze no longer holds as unknown, with the feed cursor, in one head write.
//! A feed that cannot be read is noted in the report and left for the next run; the export
//! syncs anyway.

use std::collections::BTreeMap;

use tracing::{info, warn};

use super::SyncRunner;
use super::conclude::RunRecord;
use crate::config::route::Route;
use crate::run::handler::RunError;
use crate::state::confirmed::{Snapshot, range_of};
use crate::state::profile_feed::{self, FeedEffect};
use crate::state::store::{Head, StateStore};

/// The cursor is rewritten without pending objects only once it lags this many hours, so a
/// run with nothing to apply costs no head write.
const CURSOR_LAG_HOURS: i64 = 48;

impl SyncRunner {
    /// Applies the pending profile-change feed to the route's state (and to `snapshot`, the
    /// in-memory diff's loaded state, when there is one).
    pub(super) async fn apply_currents_feed(
        &self,
        route: &Route,
        state: &StateStore,
        head: &mut Head,
        snapshot: Option<&mut Snapshot>,
        record: &mut RunRecord,
    ) -> Result<(), RunError> {
        if head.etag.is_none() {
            // No state yet: nothing confirmed to forget.
            return Ok(());
        }
        let s = &self.settings;
        let folder = format!(
            "{}{}",
            s.state_prefix,
            bridge_shared::profile_feed::FEED_FOLDER
        );
        let now = crate::clock::now();
        let cursor = head.doc.currents_feed.clone();
        let (feeds, next) = match profile_feed::read_pending(
            self.store.as_ref(),
            &s.state_bucket,
            &folder,
            cursor.as_ref(),
            now,
        )
        .await
        {
            Ok(x) => x,
            Err(e) => {
                warn!(route = route.name(), error = %e, "Could not read the profile-change feed; the next run applies it.");
                record
                    .report
                    .notes
                    .push(format!("profile-change feed not applied this run: {e}"));
                return Ok(());
            }
        };
        let lag_mark = (now - chrono::Duration::hours(CURSOR_LAG_HOURS))
            .format("%Y-%m-%d-%H")
            .to_string();
        // A route without a cursor starts from the lookback window whether or not one is
        // written, so a run with nothing to apply leaves the head as it is.
        let lagging = cursor.as_ref().is_some_and(|c| c.through < lag_mark);
        let same = cursor
            .as_ref()
            .map_or(next.applied.is_empty(), |c| c.applied == next.applied);
        if feeds.is_empty() && !lagging && same {
            return Ok(());
        }
        let effect = match snapshot.as_deref() {
            Some(snap) => profile_feed::effect(route, &feeds, |k| snap.get(k)),
            None => self.bounded_effect(route, state, head, &feeds).await?,
        };
        let written = match state.apply_feed(head, route, &effect.deltas, next).await {
            Ok(w) => w,
            Err(e) if e.is_retryable() => return Err(RunError::Retryable(e.to_string())),
            Err(e) => {
                let message = format!("applying the profile-change feed: {e}");
                return Err(record.failed(self.store.as_ref(), message, false).await);
            }
        };
        if let (Some(bytes), Some(snap)) = (written, snapshot) {
            let what = "profile-change feed segment";
            if let Err(e) = snap.apply_segment(&bytes, what) {
                return Err(RunError::Retryable(e.to_string()));
            }
            snap.compact();
            head.loaded_segments = head.doc.segments.len();
        }
        record.report.forgotten_by_currents += effect.forgotten;
        record.report.invalidated_by_currents += effect.invalidated;
        if !feeds.is_empty() {
            info!(
                route = route.name(),
                feed_objects = feeds.len(),
                forgotten = effect.forgotten,
                invalidated = effect.invalidated,
                "Applied the profile-change feed."
            );
        }
        Ok(())
    }

    /// The feed's effect for the bounded diff: only the hash ranges of the users it names are
    /// loaded.
    async fn bounded_effect(
        &self,
        route: &Route,
        state: &StateStore,
        head: &Head,
        feeds: &[bridge_shared::profile_feed::FeedObject],
    ) -> Result<FeedEffect, RunError> {
        let bits = head.doc.range_bits;
        let mut ranges: BTreeMap<usize, Snapshot> = BTreeMap::new();
        for key in profile_feed::named_users(route, feeds) {
            let r = range_of(key.0, bits);
            if ranges.contains_key(&r) || r >= head.doc.ranges.len() {
                continue;
            }
            let snap = state
                .load_range(&head.doc, r, route)
                .await
                .map_err(|e| RunError::Retryable(e.to_string()))?;
            ranges.insert(r, snap);
        }
        Ok(profile_feed::effect(route, feeds, |k| {
            ranges.get(&range_of(k.0, bits))?.get(k)
        }))
    }
}
