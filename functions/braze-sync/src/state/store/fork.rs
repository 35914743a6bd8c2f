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
}
