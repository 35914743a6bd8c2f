//! The ranged commit: folding a big run's confirmed changes (spilled by hash range) into
//! the state range by range, re-laying the ranges out when they have grown.

use super::record_spill::SpilledRecords;
use super::*;

impl StateStore {
    /// [`StateStore::commit`] in bounded memory, for format-2 heads: the segments' records are
    /// partitioned by hash range into local files under `spill` (one segment in memory at a
    /// time), then each range they touch is loaded alone, updated and written (a delta, or a
    /// new base on the same rules as [`StateStore::commit`]), [`COMMIT_RANGES_AT_ONCE`] ranges
    /// at a time. `expected_users` (the state's users plus this run's new ones) sizes the
    /// ranges of a first layout and decides when they double; a re-layout also goes range by
    /// range (an old range splits into its sub-ranges). Nothing needs the whole state.
    pub async fn commit_ranged(
        &self,
        head: &mut Head,
        route: &Route,
        export: Option<Watermark>,
        expected_users: u64,
        spill: &std::path::Path,
    ) -> Result<CommitStats, StateError> {
        self.commit_ranged_bits(head, route, export, expected_users, spill, None, None)
            .await
    }

    /// [`StateStore::commit_ranged`] of records confirmed without checkpoints (an adoption,
    /// which sends nothing, so a killed one loses nothing and simply runs again): `records`
    /// were spilled by hash range while the export was diffed ([`RecordSpill`]), and are
    /// applied range by range after the head's own segments. Laid out as
    /// [`StateStore::commit_ranged`] would, with at most `records`' range bits.
    pub async fn commit_ranged_with(
        &self,
        head: &mut Head,
        route: &Route,
        export: Option<Watermark>,
        expected_users: u64,
        spill: &std::path::Path,
        records: &SpilledRecords,
    ) -> Result<CommitStats, StateError> {
        self.commit_ranged_bits(
            head,
            route,
            export,
            expected_users,
            spill,
            None,
            Some(records),
        )
        .await
    }

    /// Makes sure the state has a hash-range layout of at least `min_ranges` ranges (the
    /// fan-out lays the route out before forking it): when `head` has no layout or fewer
    /// ranges, it is rewritten with `max(bits_for(expected_users), ceil(log2(min_ranges)))`
    /// range bits (at most [`MAX_RANGE_BITS`]): an empty state gets empty ranges and no
    /// object; an existing one is re-laid out range by range (its checkpoint segments folded
    /// in), as [`StateStore::commit_ranged`] does, spilling to the system temporary folder.
    /// One conditional head write; nothing to do leaves the head as it is. The watermark is
    /// kept. A format-1 head is an error (it migrates through a normal run first), and so is
    /// a fork (its layout is the route's).
    pub async fn ensure_layout(
        &self,
        head: &mut Head,
        route: &Route,
        expected_users: u64,
        min_ranges: usize,
    ) -> Result<(), StateError> {
        if self.is_fork() {
            return Err(self.unusable("a fork keeps the layout of the route it was forked from"));
        }
        if head.doc.format == LEGACY_HEAD_FORMAT {
            return Err(self.unusable(
                "a format-1 head is rewritten into ranges by a normal run first; it cannot be laid out for a fan-out",
            ));
        }
        let has = !head.doc.ranges.is_empty();
        if has && head.doc.ranges.len() >= min_ranges.max(1) {
            return Ok(());
        }
        let min_bits = match min_ranges {
            0 | 1 => 0,
            n => (n - 1).ilog2() + 1,
        };
        let bits = bits_for(expected_users.max(head.doc.users), self.range_users)
            .max(min_bits)
            .min(MAX_RANGE_BITS);
        if has && bits <= head.doc.range_bits {
            return Ok(());
        }
        let spill = crate::state::spill::SpillDir::create(&std::env::temp_dir(), "layout")?;
        self.commit_ranged_bits(
            head,
            route,
            None,
            expected_users,
            spill.path(),
            Some(bits),
            None,
        )
        .await
        .map(|_| ())
    }

    /// [`StateStore::commit_ranged`], laid out with `force_bits` range bits when given, with
    /// `extra` records after the segments'.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn commit_ranged_bits(
        &self,
        head: &mut Head,
        route: &Route,
        export: Option<Watermark>,
        expected_users: u64,
        spill: &std::path::Path,
        force_bits: Option<u32>,
        extra: Option<&SpilledRecords>,
    ) -> Result<CommitStats, StateError> {
        if head.doc.format == LEGACY_HEAD_FORMAT {
            return Err(StateError::BadHead {
                uri: self.head_uri(),
                reason: "a format-1 head is rewritten by the in-memory commit, not the ranged one"
                    .into(),
            });
        }
        let complete = export.is_some();
        let names = route.state_names();
        let keep_ids = route.tracks_departures();
        let doc0 = head.doc.clone();
        let fresh = doc0.ranges.is_empty();
        let b = doc0.range_bits;
        if self.is_fork() && fresh {
            return Err(self.unusable(
                "a fork commits into the route's range layout, and this state has none: lay it out first (ensure_layout)",
            ));
        }
        let wanted = bits_for(doc0.users.max(expected_users), self.range_users);
        let nb = if let Some(f) = force_bits {
            f
        } else if self.is_fork() {
            b
        } else if fresh || (complete && wanted > b + 1) {
            wanted
        } else {
            b
        };
        // Extra records are spilled at their own (finer) bits: a new range reads its share.
        let nb = match extra {
            Some(x) if x.bits < nb => {
                if x.bits < b {
                    return Err(self.unusable(format!(
                        "records spilled in {} range bits cannot be committed into a state of {b}",
                        x.bits
                    )));
                }
                x.bits
            }
            _ => nb,
        };
        let relayout = !fresh && nb != b;
        // 1. The segments' records, by range of the new layout, in the order they apply.
        let mut part = crate::state::spill::Partitioner::new(spill, nb, 16 << 20, None);
        let mut rec = Vec::with_capacity(64);
        for name in &doc0.segments {
            let (bytes, what) = self.get(name).await?;
            let mut seg = SegmentData::default();
            seg.extend_from(&bytes, &what, &names)?;
            drop(bytes);
            for (key, slot, fp) in seg.records {
                rec.clear();
                rec.push(0);
                rec.extend_from_slice(&key.to_le_bytes());
                rec.extend_from_slice(&slot.to_le_bytes());
                rec.extend_from_slice(&fp.to_le_bytes());
                part.push(crate::state::confirmed::range_of(key, nb), &rec)?;
            }
            for (key, id) in seg.ids {
                rec.clear();
                rec.push(1);
                rec.extend_from_slice(&key.to_le_bytes());
                rec.extend_from_slice(id.as_bytes());
                part.push(crate::state::confirmed::range_of(key, nb), &rec)?;
            }
        }
        let sizes = part.finish()?;
        let touched = |r: usize| {
            sizes.get(r).is_some_and(|s| *s > 0)
                || extra.is_some_and(|x| {
                    let sub = x.bits - nb;
                    x.sizes
                        .get(r << sub..(r + 1) << sub)
                        .is_some_and(|s| s.iter().any(|n| *n > 0))
                })
        };
        // 2. The units of work: (old range to load, new ranges it becomes).
        let units: Vec<(Option<usize>, std::ops::Range<usize>)> = if fresh {
            (0..1usize << nb)
                .filter(|r| touched(*r))
                .map(|r| (None, r..r + 1))
                .collect()
        } else if relayout {
            let k = nb - b;
            (0..1usize << b)
                .map(|r| (Some(r), (r << k)..((r + 1) << k)))
                .collect()
        } else {
            (0..1usize << b)
                .filter(|r| touched(*r))
                .map(|r| (Some(r), r..r + 1))
                .collect()
        };
        let generation = doc0.generation + 1;
        let tag = nonce();
        let work = units.into_iter().map(|(old, new)| {
            let this = self.clone();
            let doc0 = &doc0;
            let names = &names;
            let tag = &tag;
            async move {
                this.commit_unit(
                    doc0,
                    route,
                    old,
                    new,
                    nb,
                    relayout || fresh,
                    complete,
                    generation,
                    tag,
                    names,
                    keep_ids,
                    spill,
                    extra,
                )
                .await
            }
        });
        use futures::StreamExt;
        let outs: Vec<Result<UnitOut, StateError>> = futures::stream::iter(work)
            .buffer_unordered(COMMIT_RANGES_AT_ONCE)
            .collect()
            .await;
        let mut doc = doc0.clone();
        if relayout || fresh {
            doc.range_bits = nb;
            doc.ranges = vec![RangeDoc::default(); 1usize << nb];
        }
        let mut written = Vec::new();
        let mut old: Vec<String> = doc0.segments.clone();
        let mut stats = CommitStats {
            segments_folded: doc0.segments.len(),
            ..CommitStats::default()
        };
        let mut first_error = None;
        for out in outs {
            match out {
                Ok(u) => {
                    written.extend(u.written);
                    old.extend(u.old);
                    for (r, d) in u.docs {
                        if let Some(slot) = doc.ranges.get_mut(r) {
                            *slot = d;
                        }
                    }
                    stats.shards += u.shards;
                    stats.deltas += u.deltas;
                    stats.bytes += u.bytes;
                }
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        if let Some(e) = first_error {
            self.delete_all(&written).await;
            return Err(e);
        }
        let users: u64 = doc.ranges.iter().map(|r| r.users).sum();
        stats.users = users;
        self.publish(head, doc, generation, users, export, stats, &written, &old)
            .await
    }

    /// One unit of [`StateStore::commit_ranged`]: loads old range `old` (none: empty),
    /// applies the spilled records of the new ranges `new`, and writes them.
    #[allow(clippy::too_many_arguments)]
    pub(super) async fn commit_unit(
        &self,
        doc0: &HeadDoc,
        route: &Route,
        old: Option<usize>,
        new: std::ops::Range<usize>,
        nb: u32,
        rebase_all: bool,
        complete: bool,
        generation: u64,
        tag: &str,
        names: &[String],
        keep_ids: bool,
        spill: &std::path::Path,
        extra: Option<&SpilledRecords>,
    ) -> Result<UnitOut, StateError> {
        let mut out = UnitOut::default();
        let mut snap = match old {
            Some(r) => self.load_range(doc0, r, route).await?,
            None => Snapshot::for_route(route),
        };
        // Records are applied as they are read; only a range that may get a delta object
        // keeps them (to encode it), so a first layout or a re-layout holds none.
        let mut records = SegmentData::default();
        let mut set = |key: u128, slot: u16, fp: u64, records: &mut SegmentData| {
            snap.set(crate::model::UserKey(key), slot as usize, fp);
            if !rebase_all {
                records.records.push((key, slot, fp));
            }
        };
        let mut ids: Vec<(u128, String)> = Vec::new();
        // Each new range's records: the segments', then its share of the extra ones.
        let mut sources: Vec<(&std::path::Path, usize)> = Vec::new();
        for s in new.clone() {
            sources.push((spill, s));
            if let Some(x) = extra {
                let sub = x.bits - nb;
                sources.extend(((s << sub)..((s + 1) << sub)).map(|t| (x.dir.as_path(), t)));
            }
        }
        for (spill, s) in sources {
            crate::state::spill::read_range::<StateError>(spill, s, &mut |b| {
                let key = b
                    .get(1..17)
                    .map(|k| u128::from_le_bytes(read16(k)))
                    .ok_or_else(|| corrupt_spill(spill, s))?;
                match b.first() {
                    Some(0) if b.len() == 27 => {
                        let slot = u16::from_le_bytes([b[17], b[18]]);
                        let mut fp = [0u8; 8];
                        fp.copy_from_slice(&b[19..27]);
                        set(key, slot, u64::from_le_bytes(fp), &mut records);
                    }
                    Some(1) => {
                        let id =
                            std::str::from_utf8(&b[17..]).map_err(|_| corrupt_spill(spill, s))?;
                        ids.push((key, id.to_string()));
                    }
                    _ => return Err(corrupt_spill(spill, s)),
                }
                Ok(())
            })?;
        }
        // Identifiers after the fingerprints: a user new to the state exists once its
        // first fingerprint is set.
        for (key, id) in &ids {
            snap.set_identifier(crate::model::UserKey(*key), id);
        }
        if rebase_all {
            drop(ids);
        } else {
            records.ids = ids;
        }
        snap.compact();
        let range = old
            .and_then(|r| doc0.ranges.get(r))
            .cloned()
            .unwrap_or_default();
        if !rebase_all {
            let delta = records.encode(names, keep_ids);
            records = SegmentData::default();
            let rebase = (range.base.is_none()
                || (complete && (range.delta_bytes + delta.len() as u64) * 4 > range.bytes))
                && self.may_rebase(&range);
            if !rebase {
                let r = new.start;
                let name = self.named(format!("delta-{r:05}-{generation:08}-{tag}.bin"));
                let bytes = delta.len() as u64;
                self.put_new(&name, delta).await?;
                out.written.push(name.clone());
                let mut d = range.clone();
                d.deltas.push(name);
                d.delta_bytes += bytes;
                d.users = snap.len() as u64;
                out.docs.push((r, d));
                out.deltas += 1;
                out.bytes += bytes;
                return Ok(out);
            }
        }
        drop(records);
        out.old.extend(range.base.iter().cloned());
        out.old.extend(range.deltas.iter().cloned());
        for r in new {
            let (shard, users) = snap.encode_hash_range(r, nb);
            if users == 0 {
                out.docs.push((r, RangeDoc::default()));
                continue;
            }
            let name = self.named(format!("base-{r:05}-{generation:08}-{tag}.bin"));
            let bytes = shard.len() as u64;
            self.put_new(&name, shard).await?;
            out.written.push(name.clone());
            out.docs.push((
                r,
                RangeDoc {
                    base: Some(name),
                    users,
                    bytes,
                    deltas: Vec::new(),
                    delta_bytes: 0,
                },
            ));
            out.shards += 1;
            out.bytes += bytes;
        }
        Ok(out)
    }
}
