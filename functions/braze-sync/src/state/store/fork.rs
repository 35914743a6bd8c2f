//! Forks of a route's state for fan-out pieces, and merging the pieces' forks back.

use super::*;

impl StateStore {
    /// Creates the head of fork `name` (see [`StateStore::fork`]): a copy of the route head's
    /// document (ranges, `range_bits`, users, watermark, applied exports) without checkpoint
    /// segments, written with a conditional create. When it already exists (a coordinator
    /// retried), it is read and returned as it is. The route head must have a range layout
    /// ([`StateStore::ensure_layout`]) and no unfolded checkpoint segments.
    pub async fn create_fork(
        &self,
        route_head: &Head,
        name: &str,
    ) -> Result<(StateStore, Head), StateError> {
        if self.is_fork() {
            return Err(self.unusable("a fork cannot be forked again; fork the route's state"));
        }
        let d = &route_head.doc;
        if d.format != HEAD_FORMAT || d.ranges.is_empty() {
            return Err(self.unusable(
                "the state has no range layout to fork: lay it out first (ensure_layout)",
            ));
        }
        if !d.segments.is_empty() {
            return Err(self.unusable(format!(
                "the state has {} unfolded checkpoint segments: commit them before forking",
                d.segments.len()
            )));
        }
        let fork = self.fork(name);
        let mut doc = d.clone();
        doc.segments.clear();
        doc.updated_at = crate::clock::now().to_rfc3339();
        let mut head = Head {
            doc: HeadDoc::default(),
            etag: None,
            loaded_segments: 0,
        };
        match fork.put_head(&mut head, doc).await {
            Ok(()) => Ok((fork, head)),
            Err(StateError::Conflict { .. }) => {
                let head = fork.read_head().await?;
                if head.doc.range_bits != d.range_bits || head.doc.ranges.len() != d.ranges.len() {
                    return Err(fork.unusable(format!(
                        "the fork exists with {} ranges, the route has {}",
                        head.doc.ranges.len(),
                        d.ranges.len()
                    )));
                }
                Ok((fork, head))
            }
            Err(e) => Err(e),
        }
    }

    /// Takes the forks' work into the route head: `ranges[r]` from the fork whose span holds
    /// `r` (ranges no span holds stay as they are), users recomputed from the ranges,
    /// generation + 1, watermark and applied exports unchanged. One conditional write
    /// (`If-Match` the route head: [`StateError::Conflict`] when it moved). Idempotent by
    /// content: merging the same forks again gives the same ranges and users. Deletes
    /// nothing. The forks must share the route's layout, have no checkpoint segments (pieces
    /// commit before they finish), and their spans must not overlap.
    pub async fn merge_forks(
        &self,
        head: &mut Head,
        forks: &[(std::ops::Range<usize>, HeadDoc)],
    ) -> Result<CommitStats, StateError> {
        if self.is_fork() {
            return Err(self.unusable("forks merge into the route's head, not into a fork"));
        }
        let n = head.doc.ranges.len();
        if head.doc.format != HEAD_FORMAT || n == 0 {
            return Err(self.unusable("the state has no range layout to merge forks into"));
        }
        if !head.doc.segments.is_empty() {
            return Err(self.unusable(format!(
                "the route head has {} unfolded checkpoint segments: commit them before merging forks",
                head.doc.segments.len()
            )));
        }
        let mut doc = head.doc.clone();
        let mut taken = vec![false; n];
        for (span, f) in forks {
            if span.start > span.end || span.end > n {
                return Err(self.unusable(format!(
                    "fork span {}..{} is outside the state's {n} ranges",
                    span.start, span.end
                )));
            }
            if f.range_bits != doc.range_bits || f.ranges.len() != n {
                return Err(self.unusable(format!(
                    "a fork has {} ranges (range_bits {}), the route has {n} (range_bits {})",
                    f.ranges.len(),
                    f.range_bits,
                    doc.range_bits
                )));
            }
            if !f.segments.is_empty() {
                return Err(self.unusable(format!(
                    "the fork of ranges {}..{} has {} uncommitted checkpoint segments: its piece must commit first",
                    span.start,
                    span.end,
                    f.segments.len()
                )));
            }
            for r in span.clone() {
                if std::mem::replace(&mut taken[r], true) {
                    return Err(self.unusable(format!("two forks both hold range {r}")));
                }
                doc.ranges[r] = f.ranges[r].clone();
            }
        }
        let users: u64 = doc.ranges.iter().map(|r| r.users).sum();
        doc.users = users;
        doc.generation = head.doc.generation + 1;
        doc.updated_at = crate::clock::now().to_rfc3339();
        let stats = CommitStats {
            users,
            ranges: n,
            state_bytes: doc.state_bytes(),
            ..CommitStats::default()
        };
        self.put_head(head, doc).await?;
        head.loaded_segments = 0;
        Ok(stats)
    }

    /// Takes over into the route head what fork `fork` (read as `fork_doc`) had Braze
    /// confirm, for a fan-out that ends without its finalizer's merge (its lease ran out,
    /// a piece failed): what Braze confirmed is never discarded. A range the fork added
    /// objects to is taken as the fork has it when the route head still holds the range the
    /// fork started from (the fork's inherited base and deltas, or an empty range for a base
    /// the fork wrote); a range that moved since gets what the fork added as records instead
    /// (its deltas' records, or every user of a range it started empty),
    /// and so do the fork's checkpoint segments and `orphans` (segments the fork wrote that
    /// its head does not name: a piece killed between a checkpoint's segment and its head
    /// write; Braze confirmed what they hold), all in one segment appended to the route head.
    /// One conditional head write, nothing when the fork added nothing; deletes nothing.
    /// Returns whether the head changed.
    pub async fn absorb_fork(
        &self,
        head: &mut Head,
        fork: &StateStore,
        fork_doc: &HeadDoc,
        orphans: &[String],
        route: &Route,
    ) -> Result<bool, StateError> {
        if self.is_fork() || !fork.is_fork() {
            return Err(self.unusable("a fork is absorbed into the route's head"));
        }
        let names = route.state_names();
        let same_layout = fork_doc.range_bits == head.doc.range_bits
            && fork_doc.ranges.len() == head.doc.ranges.len();
        let mut doc = head.doc.clone();
        let mut records = SegmentData::default();
        for (r, fr) in fork_doc.ranges.iter().enumerate() {
            let base_owned = fr.base.as_deref().is_some_and(|b| fork.owns(b));
            let inherited: Vec<String> = fr
                .deltas
                .iter()
                .filter(|d| !fork.owns(d))
                .cloned()
                .collect();
            if !base_owned && inherited.len() == fr.deltas.len() {
                continue;
            }
            let current = head.doc.ranges.get(r).filter(|_| same_layout);
            if current == Some(fr) {
                continue;
            }
            let started_from = |c: &RangeDoc| match base_owned {
                true => c.base.is_none() && c.deltas.is_empty(),
                false => c.base == fr.base && c.deltas == inherited,
            };
            if let Some(c) = current
                && started_from(c)
            {
                doc.ranges[r] = fr.clone();
                continue;
            }
            // The range moved: only what the fork added, never the values it inherited.
            if base_owned {
                let snap = fork.load_range(fork_doc, r, route).await?;
                snapshot_records(&snap, &mut records);
            } else {
                let owned: Vec<String> =
                    fr.deltas.iter().filter(|d| fork.owns(d)).cloned().collect();
                for (bytes, what) in fork.get_all(&owned).await? {
                    records.extend_from(&bytes, &what, &names)?;
                }
            }
        }
        let mut segments = fork_doc.segments.clone();
        segments.extend(orphans.iter().filter(|o| fork.owns(o)).cloned());
        for name in &segments {
            match fork.get(name).await {
                Ok((bytes, what)) => records.extend_from(&bytes, &what, &names)?,
                // An orphan deleted since (its fold finished): nothing to take.
                Err(StateError::Store(StoreError::NotFound { .. })) => {}
                Err(e) => return Err(e),
            }
        }
        if doc.ranges == head.doc.ranges && records.records.is_empty() {
            return Ok(false);
        }
        if !records.records.is_empty() {
            let name = self.named(format!(
                "seg-{:08}-{:06}-{}.bin",
                head.doc.generation,
                head.doc.segments.len(),
                nonce()
            ));
            self.put_new(&name, records.encode(&names, route.tracks_departures()))
                .await?;
            doc.segments.push(name);
        }
        doc.users = doc
            .ranges
            .iter()
            .map(|r| r.users)
            .sum::<u64>()
            .max(doc.users);
        doc.generation = head.doc.generation + 1;
        doc.updated_at = crate::clock::now().to_rfc3339();
        self.put_head(head, doc).await?;
        Ok(true)
    }
}

/// Every user of a loaded range as segment records (a range the fork started empty: all its
/// users are the fork's): each value it holds and its identifier.
fn snapshot_records(snap: &Snapshot, out: &mut SegmentData) {
    let slots = snap.slots();
    let base = (0..snap.base_len()).filter_map(|i| snap.base_user(i));
    for (key, st) in base.chain(snap.overlay_users()) {
        for slot in 0..slots {
            if let Some(fp) = st.fp(slot) {
                out.records.push((key.0, slot as u16, fp));
            }
        }
        if let Some(id) = snap.identifier(key) {
            out.ids
                .push((key.0, crate::state::confirmed::identifier_text(&id)));
        }
    }
}
