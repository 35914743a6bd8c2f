//! The ranged commit: folding a big run's confirmed changes (spilled by hash range) into
//! the state range by range, re-laying the ranges out when they have grown.

use super::record_spill::SpilledRecords;
use super::unit_records::{Counted, UnitRecords};
use super::*;
use crate::state::confirmed::SegmentWriter;

impl StateStore {
    /// [`StateStore::commit`] in bounded memory, for format-2 heads: the segments' records are
    /// partitioned by hash range into local files under `spill` (one segment in memory at a
    /// time), then each range they touch is loaded alone, updated and written (a delta, or a
    /// new base on the same rules as [`StateStore::commit`]), [`COMMIT_RANGES_AT_ONCE`] ranges
    /// at a time at most, fewer when the commit memory
    /// ([`StateStore::with_commit_memory`]) holds fewer. `expected_users` (the state's users plus this run's new ones) sizes the
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
        let request = RangedRequest {
            export,
            expected_users,
            spill,
            force_bits: None,
            extra: None,
        };
        self.commit_ranged_bits(head, route, request).await
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
        let request = RangedRequest {
            export,
            expected_users,
            spill,
            force_bits: None,
            extra: Some(records),
        };
        self.commit_ranged_bits(head, route, request).await
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
        let request = RangedRequest {
            export: None,
            expected_users,
            spill: spill.path(),
            force_bits: Some(bits),
            extra: None,
        };
        self.commit_ranged_bits(head, route, request)
            .await
            .map(|_| ())
    }

    /// Units a ranged commit into an `nb`-bit layout works on at once: as many of its widest
    /// unit (an old range's users, or the expected users' share of a new range) as the
    /// commit memory holds ([`commit_ranges_at_once`]).
    fn units_at_once(
        &self,
        doc0: &HeadDoc,
        route: &Route,
        request: &RangedRequest<'_>,
        nb: u32,
    ) -> usize {
        let widest = doc0.ranges.iter().map(|r| r.users).max().unwrap_or(0);
        let share = doc0.users.max(request.expected_users) >> nb;
        let unit = commit_unit_memory(widest.max(share), route);
        commit_ranges_at_once(self.commit_memory, unit)
    }

    /// [`StateStore::commit_ranged`] as `request` says: laid out with its `force_bits` range
    /// bits when given, with its `extra` records after the segments'.
    pub(super) async fn commit_ranged_bits(
        &self,
        head: &mut Head,
        route: &Route,
        request: RangedRequest<'_>,
    ) -> Result<CommitStats, StateError> {
        if head.doc.format == LEGACY_HEAD_FORMAT {
            return Err(StateError::BadHead {
                uri: self.head_uri(),
                reason: "a format-1 head is rewritten by the in-memory commit, not the ranged one"
                    .into(),
            });
        }
        let doc0 = head.doc.clone();
        let fresh = doc0.ranges.is_empty();
        if self.is_fork() && fresh {
            return Err(self.unusable(
                "a fork commits into the route's range layout, and this state has none: lay it out first (ensure_layout)",
            ));
        }
        let b = doc0.range_bits;
        let nb = self.new_range_bits(&doc0, &request)?;
        let relayout = !fresh && nb != b;
        let names = route.state_names();
        let spill = request.spill;
        let extra = request.extra;
        // 1. The segments' records, by range of the new layout, in the order they apply.
        let sizes = self
            .spill_segments(&doc0.segments, &names, spill, nb)
            .await?;
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
        let units = units_of(fresh, relayout, b, nb, &touched);
        // 3. Each unit loaded, updated and written, a few at a time.
        let tag = nonce();
        let plan = UnitPlan {
            doc0: &doc0,
            route,
            names: &names,
            keep_ids: route.tracks_departures(),
            nb,
            rebase_all: relayout || fresh,
            complete: request.export.is_some(),
            generation: doc0.generation + 1,
            tag: &tag,
            spill,
            extra,
        };
        let work = units.into_iter().map(|(old, new)| {
            let this = self.clone();
            let plan = &plan;
            async move { this.commit_unit(plan, old, new).await }
        });
        let at_once = self.units_at_once(&doc0, route, &request, nb);
        use futures::StreamExt;
        let outs: Vec<Result<UnitOut, StateError>> = futures::stream::iter(work)
            .buffer_unordered(at_once)
            .collect()
            .await;
        // 4. The new head: the units' ranges over the old layout (or a fresh one).
        let mut doc = doc0.clone();
        if plan.rebase_all {
            doc.range_bits = nb;
            doc.ranges = vec![RangeDoc::default(); 1usize << nb];
        }
        let mut objects = CommitObjects {
            written: Vec::new(),
            replaced: doc0.segments.clone(),
            stats: CommitStats {
                segments_folded: doc0.segments.len(),
                ..CommitStats::default()
            },
        };
        let mut first_error = None;
        for out in outs {
            match out {
                Ok(u) => {
                    objects.absorb(u.objects);
                    for (r, d) in u.docs {
                        if let Some(slot) = doc.ranges.get_mut(r) {
                            *slot = d;
                        }
                    }
                }
                Err(e) => first_error = first_error.or(Some(e)),
            }
        }
        if let Some(e) = first_error {
            self.delete_all(&objects.written).await;
            return Err(e);
        }
        objects.stats.users = doc.ranges.iter().map(|r| r.users).sum();
        self.publish(head, doc, plan.generation, request.export, objects)
            .await
    }

    /// The range bits of the new layout: `force_bits` when given; a fork keeps the route's;
    /// a first layout, or a complete run whose users outgrew the ranges twice over, sizes them
    /// for its expected users; else the current ones. Extra records spilled at finer bits
    /// raise it to theirs (a new range reads its share); coarser than the state is an error.
    fn new_range_bits(
        &self,
        doc0: &HeadDoc,
        request: &RangedRequest<'_>,
    ) -> Result<u32, StateError> {
        let b = doc0.range_bits;
        let fresh = doc0.ranges.is_empty();
        let complete = request.export.is_some();
        let wanted = bits_for(doc0.users.max(request.expected_users), self.range_users);
        let nb = if let Some(f) = request.force_bits {
            f
        } else if self.is_fork() {
            b
        } else if fresh || (complete && wanted > b + 1) {
            wanted
        } else {
            b
        };
        match request.extra {
            Some(x) if x.bits < nb => {
                if x.bits < b {
                    return Err(self.unusable(format!(
                        "records spilled in {} range bits cannot be committed into a state of {b}",
                        x.bits
                    )));
                }
                Ok(x.bits)
            }
            _ => Ok(nb),
        }
    }

    /// Partitions the records of the checkpoint `segments` by range of an `nb`-bit layout
    /// into files under `spill`, one segment in memory at a time; returns the bytes per range.
    async fn spill_segments(
        &self,
        segments: &[String],
        names: &[String],
        spill: &std::path::Path,
        nb: u32,
    ) -> Result<Vec<u64>, StateError> {
        let mut part = crate::state::spill::Partitioner::new(spill, nb, 16 << 20, None);
        let mut rec = Vec::with_capacity(64);
        for name in segments {
            let (bytes, what) = self.get(name).await?;
            let mut seg = SegmentData::default();
            seg.extend_from(&bytes, &what, names)?;
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
        Ok(part.finish()?)
    }

    /// One unit of [`StateStore::commit_ranged`]: loads old range `old` (none: empty),
    /// applies the spilled records of the new ranges `new`, and writes them: one delta object
    /// when the range keeps its layout and its deltas stay small, else new bases.
    async fn commit_unit(
        &self,
        plan: &UnitPlan<'_>,
        old: Option<usize>,
        new: std::ops::Range<usize>,
    ) -> Result<UnitOut, StateError> {
        let mut snap = match old {
            Some(r) => self.load_range(plan.doc0, r, plan.route).await?,
            None => Snapshot::for_route(plan.route),
        };
        // The records are read from the spill again for each step, never held decoded
        // ([`UnitRecords`]): the unit holds the range's snapshot and one encoded object.
        let records = UnitRecords::of(plan.spill, new.clone(), plan.nb, plan.extra);
        let counted = records.apply_fingerprints(&mut snap)?;
        let range = old
            .and_then(|r| plan.doc0.ranges.get(r))
            .cloned()
            .unwrap_or_default();
        let mut delta = match plan.rebase_all {
            true => None,
            false => self.unit_delta(plan, &range, &records, counted)?,
        };
        records.apply_ids(&mut snap, delta.as_mut())?;
        snap.compact();
        if let Some(delta) = delta {
            return self
                .write_unit_delta(plan, new.start, range, &snap, delta.finish())
                .await;
        }
        let mut out = UnitOut::default();
        out.objects.replaced.extend(range.base.iter().cloned());
        out.objects.replaced.extend(range.deltas.iter().cloned());
        for r in new {
            let (shard, users) = snap.encode_hash_range(r, plan.nb);
            if users == 0 {
                out.docs.push((r, RangeDoc::default()));
                continue;
            }
            let name = self.named(format!(
                "base-{r:05}-{:08}-{}.bin",
                plan.generation, plan.tag
            ));
            let bytes = shard.len() as u64;
            self.put_new(&name, shard).await?;
            out.objects.wrote(name.clone(), bytes, true);
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
        }
        Ok(out)
    }

    /// The delta object of a unit that keeps its range: its records written, its identifiers
    /// to follow ([`UnitRecords::apply_ids`]); `None` when the range gets a new base instead
    /// (it has none yet, or, for a complete commit, its deltas would outgrow a quarter of it).
    fn unit_delta(
        &self,
        plan: &UnitPlan<'_>,
        range: &RangeDoc,
        records: &UnitRecords<'_>,
        counted: Counted,
    ) -> Result<Option<SegmentWriter>, StateError> {
        let id_bytes = plan.keep_ids.then_some(counted.id_bytes);
        let len = SegmentWriter::encoded_len(plan.names, counted.records, id_bytes) as u64;
        let rebase = (range.base.is_none()
            || (plan.complete && (range.delta_bytes + len) * 4 > range.bytes))
            && self.may_rebase(range);
        if rebase {
            return Ok(None);
        }
        let ids = plan.keep_ids.then_some(counted.ids);
        let mut w = SegmentWriter::new(plan.names, counted.records, ids, counted.id_bytes);
        records.write_records(&mut w)?;
        Ok(Some(w))
    }

    /// Writes range `r`'s new records as one more delta object of `range`.
    async fn write_unit_delta(
        &self,
        plan: &UnitPlan<'_>,
        r: usize,
        range: RangeDoc,
        snap: &Snapshot,
        delta: Vec<u8>,
    ) -> Result<UnitOut, StateError> {
        let mut out = UnitOut::default();
        let name = self.named(format!(
            "delta-{r:05}-{:08}-{}.bin",
            plan.generation, plan.tag
        ));
        let bytes = delta.len() as u64;
        self.put_new(&name, delta).await?;
        out.objects.wrote(name.clone(), bytes, false);
        let mut d = range;
        d.deltas.push(name);
        d.delta_bytes += bytes;
        d.users = snap.len() as u64;
        out.docs.push((r, d));
        Ok(out)
    }
}

/// The units of a ranged commit: `(old range to load, new ranges it becomes)`. A first
/// layout builds each touched new range from nothing, a re-layout splits every old range
/// into its sub-ranges, else each touched range is updated in place.
fn units_of(
    fresh: bool,
    relayout: bool,
    b: u32,
    nb: u32,
    touched: &dyn Fn(usize) -> bool,
) -> Vec<(Option<usize>, std::ops::Range<usize>)> {
    if fresh {
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
    }
}

/// What a ranged commit is asked to do.
pub(super) struct RangedRequest<'a> {
    /// The export this commit finishes (`None`: a hand-over or a layout; never a rebase for
    /// size).
    pub(super) export: Option<Watermark>,
    /// The state's users plus this run's new ones: sizes a first layout's ranges.
    pub(super) expected_users: u64,
    /// Local folder the segments' records are spilled to by range.
    pub(super) spill: &'a std::path::Path,
    /// Lay the state out with exactly these range bits.
    pub(super) force_bits: Option<u32>,
    /// Records confirmed without checkpoints, spilled by range, applied after the segments'.
    pub(super) extra: Option<&'a SpilledRecords>,
}

/// What every unit of one ranged commit shares.
struct UnitPlan<'a> {
    /// The head as it was when the commit began.
    doc0: &'a HeadDoc,
    route: &'a Route,
    /// The state's attribute names, and whether it keeps identifiers (departures).
    names: &'a [String],
    keep_ids: bool,
    /// Range bits of the new layout.
    nb: u32,
    /// Every range is rewritten whole (a first layout or a re-layout): no deltas.
    rebase_all: bool,
    /// The commit finishes its export (a range may be rebased for size).
    complete: bool,
    /// The new head's generation and this commit's tag, in the new objects' names.
    generation: u64,
    tag: &'a str,
    /// Where the segments' records were spilled, and the extra records.
    spill: &'a std::path::Path,
    extra: Option<&'a SpilledRecords>,
}
