//! Moving the state: checkpoint segments written during a run, and the incremental commit
//! that folds them into the ranges they touch.

use super::*;
use crate::state::retrying::{ATTEMPTS, transient};

impl StateStore {
    /// Persists confirmed deltas as one segment and appends it to the head. Call it every few
    /// seconds with what Braze confirmed since the last call; an empty slice is a no-op.
    pub async fn checkpoint(
        &self,
        head: &mut Head,
        route: &Route,
        confirmed: &[UserDelta],
    ) -> Result<(), StateError> {
        if confirmed
            .iter()
            .all(|d| d.changes.is_empty() && d.row_digest.is_none())
        {
            return Ok(());
        }
        let name = self.named(format!(
            "seg-{:08}-{:06}-{}.bin",
            head.doc.generation,
            head.doc.segments.len(),
            nonce()
        ));
        let uri = self.uri(&name);
        let body = encode_segment(&route.state_names(), confirmed, route.tracks_departures());
        self.create(&uri, Bytes::from(body)).await?;
        let mut doc = head.doc.clone();
        doc.segments.push(name.clone());
        doc.updated_at = crate::clock::now().to_rfc3339();
        if let Err(e) = self.put_head(head, doc).await {
            self.delete_unnamed(&[name]).await;
            return Err(e);
        }
        Ok(())
    }

    pub(super) async fn put_new(&self, name: &str, body: Vec<u8>) -> Result<(), StoreError> {
        self.create(&self.uri(name), Bytes::from(body)).await
    }

    /// Writes a new object, create-only, under a name that carries this run's nonce (no other
    /// writer uses it). A transient failure is tried again ([`ATTEMPTS`] in all); a retry that
    /// meets 412 reads the object back, and the very bytes written mean an earlier attempt
    /// landed with its answer lost.
    async fn create(&self, uri: &S3Uri, body: Bytes) -> Result<(), StoreError> {
        let mut attempt = 1;
        loop {
            let put = self
                .store
                .put(uri, body.clone(), PutCondition::IfAbsent, BTreeMap::new())
                .await;
            match put {
                Err(e) if transient(&e) && attempt < ATTEMPTS => attempt += 1,
                Err(e @ StoreError::PreconditionFailed { .. }) if attempt > 1 => {
                    return match self.store.get(uri).await {
                        Ok((_, bytes)) if bytes == body => Ok(()),
                        _ => Err(e),
                    };
                }
                r => return r.map(|_| ()),
            }
        }
    }

    /// Ends a run: folds the segments into the hash ranges they touch (see the module docs:
    /// only touched ranges are written, as deltas or, for a complete run, as a new base when
    /// their deltas have grown), and points the head at the result with the export's
    /// watermark. `export` is `Some` only for a run that finished its export; `None` (hand-over,
    /// failure) never rewrites a base. Replaced objects are deleted afterwards (best effort).
    pub async fn commit(
        &self,
        head: &mut Head,
        mut snapshot: Snapshot,
        export: Option<Watermark>,
    ) -> Result<CommitStats, StateError> {
        let complete = export.is_some();
        let names = snapshot.names().to_vec();
        let mut folded = SegmentData::default();
        // A state without ranges (or a format-1 one) is laid out anew from the snapshot: its
        // records are not held decoded for deltas it will not write (a first sync confirms
        // every attribute of every user).
        let fold = head.doc.format != LEGACY_HEAD_FORMAT && !head.doc.ranges.is_empty();
        let loaded = head.loaded_segments.min(head.doc.segments.len());
        for (i, name) in head.doc.segments.iter().enumerate() {
            let (bytes, what) = self.get(name).await?;
            if fold {
                folded.extend_from(&bytes, &what, &names)?;
            }
            if i >= loaded {
                snapshot.apply_segment(&bytes, &what)?;
            }
        }
        snapshot.compact();
        let users = snapshot.len() as u64;
        let legacy = head.doc.format == LEGACY_HEAD_FORMAT;
        if legacy && !complete {
            // Left for the next complete commit to rewrite; the segments stay in the head.
            return Ok(CommitStats {
                users,
                ..CommitStats::default()
            });
        }
        let generation = head.doc.generation + 1;
        let mut doc = head.doc.clone();
        let mut objects = CommitObjects {
            written: Vec::new(),
            replaced: head.doc.segments.clone(),
            stats: CommitStats {
                users,
                segments_folded: head.doc.segments.len(),
                ..CommitStats::default()
            },
        };
        let wanted_bits = bits_for(users, self.range_users);
        if self.is_fork() && (legacy || doc.ranges.is_empty()) {
            return Err(self.unusable(
                "a fork commits into the route's range layout, and this state has none: lay it out first (ensure_layout)",
            ));
        }
        let relayout = legacy
            || doc.ranges.is_empty()
            || (complete && !self.is_fork() && wanted_bits > doc.range_bits + 1);
        let result = if relayout {
            drop(folded);
            let bits = if doc.ranges.is_empty() || complete {
                wanted_bits
            } else {
                doc.range_bits
            };
            objects.replaced.append(&mut doc.base);
            for r in &doc.ranges {
                objects.replaced.extend(r.base.iter().cloned());
                objects.replaced.extend(r.deltas.iter().cloned());
            }
            doc.range_bits = bits;
            doc.ranges = vec![RangeDoc::default(); 1usize << bits];
            self.write_bases(
                &snapshot,
                &mut doc,
                0..1usize << bits,
                generation,
                &mut objects,
            )
            .await
        } else {
            self.write_touched(
                &snapshot,
                &mut doc,
                folded,
                complete,
                generation,
                &mut objects,
            )
            .await
        };
        if let Err(e) = result {
            self.delete_all(&objects.written).await;
            return Err(e.into());
        }
        self.publish(head, doc, generation, export, objects).await
    }

    /// Writes a fresh base for each range in `ranges` (empty ranges get none).
    pub(super) async fn write_bases(
        &self,
        snapshot: &Snapshot,
        doc: &mut HeadDoc,
        ranges: std::ops::Range<usize>,
        generation: u64,
        objects: &mut CommitObjects,
    ) -> Result<(), StoreError> {
        let tag = nonce();
        let bits = doc.range_bits;
        // Encoded PUT_CONCURRENCY ranges at a time and uploaded together: at most that many
        // encoded shards are held at once.
        let ranges: Vec<usize> = ranges.collect();
        let mut results: Vec<(usize, PutResult)> = Vec::new();
        for chunk in ranges.chunks(PUT_CONCURRENCY) {
            let mut futs = Vec::new();
            for &r in chunk {
                let (shard, users) = snapshot.encode_hash_range(r, bits);
                if users == 0 {
                    results.push((r, Ok(None)));
                    continue;
                }
                let name = self.named(format!("base-{r:05}-{generation:08}-{tag}.bin"));
                let this = self.clone();
                futs.push(async move {
                    let bytes = shard.len() as u64;
                    let put = this.put_new(&name, shard).await;
                    (r, put.map(|()| Some((name, users, bytes))))
                });
            }
            results.extend(futures::future::join_all(futs).await);
        }
        let mut first_error = None;
        for (r, result) in results {
            let slot = &mut doc.ranges[r];
            *slot = RangeDoc::default();
            match result {
                Ok(Some((name, users, bytes))) => {
                    objects.wrote(name.clone(), bytes, true);
                    *slot = RangeDoc {
                        base: Some(name),
                        users,
                        bytes,
                        deltas: Vec::new(),
                        delta_bytes: 0,
                    };
                }
                Ok(None) => {}
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }

    /// Per range the folded records touch: one delta object, or a new base when the range
    /// has none yet or (complete runs only) its deltas outgrow a quarter of its base.
    pub(super) async fn write_touched(
        &self,
        snapshot: &Snapshot,
        doc: &mut HeadDoc,
        folded: SegmentData,
        complete: bool,
        generation: u64,
        objects: &mut CommitObjects,
    ) -> Result<(), StoreError> {
        let bits = doc.range_bits;
        let names = snapshot.names().to_vec();
        let keep_ids = snapshot.keeps_ids();
        let tag = nonce();
        for (r, part) in folded.split(bits) {
            let Some(range) = doc.ranges.get(r).cloned() else {
                continue;
            };
            let delta = part.encode(&names, keep_ids);
            let rebase = (range.base.is_none()
                || (complete && (range.delta_bytes + delta.len() as u64) * 4 > range.bytes))
                && self.may_rebase(&range);
            if rebase {
                objects.replaced.extend(range.base.iter().cloned());
                objects.replaced.extend(range.deltas.iter().cloned());
                self.write_bases(snapshot, doc, r..r + 1, generation, objects)
                    .await?;
                continue;
            }
            let name = self.named(format!("delta-{r:05}-{generation:08}-{tag}.bin"));
            let bytes = delta.len() as u64;
            self.put_new(&name, delta).await?;
            objects.wrote(name.clone(), bytes, false);
            let slot = &mut doc.ranges[r];
            slot.deltas.push(name);
            slot.delta_bytes += bytes;
            slot.users = snapshot.range_span(r, bits).len() as u64;
        }
        Ok(())
    }
}
