//! Loading the confirmed state: whole (small routes) or one hash range at a time (the
//! bounded diff), bases with their deltas and the checkpoint segments on top.

use super::*;

impl StateStore {
    /// Loads the head and the snapshot it points to (ranges, then segments), laid out for
    /// `route`.
    pub async fn load(&self, route: &Route) -> Result<(Head, Snapshot), StateError> {
        let mut head = self.read_head().await?;
        let mut snap = Snapshot::for_route(route);
        // Fetched GET_CONCURRENCY at a time, applied in key order.
        let bases: Vec<String> = head
            .doc
            .base
            .iter()
            .chain(head.doc.ranges.iter().filter_map(|r| r.base.as_ref()))
            .cloned()
            .collect();
        for chunk in bases.chunks(GET_CONCURRENCY) {
            for (bytes, what) in self.get_all(chunk).await? {
                snap.load_base_shard(&bytes, &what)?;
            }
        }
        let deltas: Vec<String> = head
            .doc
            .ranges
            .iter()
            .flat_map(|r| r.deltas.iter().cloned())
            .collect();
        for chunk in deltas.chunks(GET_CONCURRENCY) {
            for (bytes, what) in self.get_all(chunk).await? {
                snap.apply_segment(&bytes, &what)?;
            }
        }
        for name in &head.doc.segments {
            let (bytes, what) = self.get(name).await?;
            snap.apply_segment(&bytes, &what)?;
        }
        snap.compact();
        head.loaded_segments = head.doc.segments.len();
        Ok((head, snap))
    }

    /// The confirmed state of hash range `r` alone (its base and deltas), laid out for
    /// `route`: what the bounded diff holds in memory per range. A head with checkpoint
    /// segments must be folded first ([`StateStore::commit_ranged`] without a watermark).
    pub async fn load_range(
        &self,
        doc: &HeadDoc,
        r: usize,
        route: &Route,
    ) -> Result<Snapshot, StateError> {
        let mut snap = Snapshot::for_route(route);
        let Some(range) = doc.ranges.get(r) else {
            return Ok(snap);
        };
        if let Some(b) = &range.base {
            let (bytes, what) = self.get(b).await?;
            snap.load_base_shard(&bytes, &what)?;
        }
        self.apply_range_deltas(&mut snap, &range.deltas).await?;
        Ok(snap)
    }

    /// Applies a range's deltas (fetched [`GET_CONCURRENCY`] at a time, applied in order) on
    /// top of its loaded base, then compacts.
    pub(super) async fn apply_range_deltas(
        &self,
        snap: &mut Snapshot,
        deltas: &[String],
    ) -> Result<(), StateError> {
        for chunk in deltas.chunks(GET_CONCURRENCY) {
            for (bytes, what) in self.get_all(chunk).await? {
                snap.apply_segment(&bytes, &what)?;
            }
        }
        snap.compact();
        Ok(())
    }

    /// [`StateStore::load_range`] on a blocking thread (a diff worker, waiting through `blocking`), the base
    /// shard decoded as it streams from the store ([`Snapshot::load_base_shard_stream`]): the
    /// range's memory is its decoded arrays, without a second copy of its shard.
    pub fn load_range_blocking(
        &self,
        doc: &HeadDoc,
        r: usize,
        route: &Route,
        blocking: &crate::clock::Blocking,
    ) -> Result<Snapshot, StateError> {
        let mut snap = Snapshot::for_route(route);
        let Some(range) = doc.ranges.get(r) else {
            return Ok(snap);
        };
        if let Some(b) = &range.base {
            let uri = self.uri(b);
            let (meta, reader) = blocking.block_on(self.store.get_reader(&uri))?;
            let mut body = blocking.reader(reader);
            snap.load_base_shard_stream(&mut body, meta.size, &uri.to_string())?;
        }
        blocking.block_on(self.apply_range_deltas(&mut snap, &range.deltas))?;
        Ok(snap)
    }
}
