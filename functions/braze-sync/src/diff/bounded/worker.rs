//! Step 2 of the bounded diff: workers (one per core) take one unit at a time (a state
//! range, or a spill range of an empty state), load only that range of the state, stream its
//! spilled rows in export order and diff each against it; deltas go to the sender in bursts.
//! Per range, the members absent from the export are counted per audience and their removals
//! written to the worker's departure file ([`super::departures`]).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};

use super::partition::{NO_LINE, Partitioned, REC_ROW, Table, get_varint};
use super::{Job, RangeState, RejectSink, encode_departure};
use crate::config::route::Route;
use crate::diff::export::{ProduceOptions, Stop, Summary, SyncError};
use crate::diff::rejects::RowReject;
use crate::diff::user::{self, AudienceDepartures, Seen};
use crate::map::{MapOutcome, MappedRow, Mapper};
use crate::model::{RowPos, UserDelta, UserKey};
use crate::read::Row;
use crate::read::row_codec::EncodedRow;
use crate::state::confirmed::{Snapshot, stored_digest};
use crate::state::spill::{Partitioner, SpillError, read_range};
use crate::vocab::ROW_DIGEST;

/// What one worker found.
#[derive(Default)]
struct Found {
    unchanged: u64,
    /// Of the unchanged, users whose row digest is recorded anew.
    digests_recorded: u64,
    /// Rows whose values could not be mapped.
    unmapped: u64,
    users_changed: u64,
    users_new: u64,
    attributes_changed: u64,
    duplicates: u64,
    audiences: Vec<AudienceDepartures>,
    unaddressable: u64,
}

/// Step 2 of [`super::produce_ranged`]: diffs every unit of this run's span on
/// `settings.workers` threads and adds what they found to `summary`. Returns the audiences'
/// departures summed over every range (`None` when no worker ran) and the workers used.
pub(super) fn diff(
    job: &Job<'_, '_>,
    partitioned: &Partitioned,
    state_bits: Option<u32>,
    dep_dir: &Path,
    summary: &mut Summary,
) -> Result<(Option<Vec<AudienceDepartures>>, usize), SyncError> {
    let bits = partitioned.bits;
    let unit_bits = state_bits.unwrap_or(bits);
    let span = job
        .settings
        .only_ranges
        .clone()
        .unwrap_or(0..1usize << unit_bits);
    let workers = job.settings.workers.max(1).min(span.len().max(1));
    let ctx = DiffCtx {
        route: job.route,
        state: job.state,
        opts: job.opts,
        part_dirs: &partitioned.part_dirs,
        sources: &partitioned.sources,
        on_delta: job.on_delta,
        rejects: &job.rejects,
        stop: &job.stop,
        next: AtomicUsize::new(span.start),
        span,
        per_unit: bits - unit_bits,
        has_state: state_bits.is_some(),
        dep_dir,
        disk_limit: job.settings.disk_limit,
        guard: user::UnsubscribeGuard::new(job.route).filter(|_| job.opts.departures),
    };
    let results: Vec<Result<Found, SyncError>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|w| {
                let ctx = &ctx;
                scope.spawn(move || ctx.work(w))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(SyncError::Stopped("a diff worker panicked".into())))
            })
            .collect()
    });
    let mut audiences: Option<Vec<AudienceDepartures>> = None;
    for r in results {
        let f = r?;
        summary.unchanged += f.unchanged;
        summary.digests_recorded += f.digests_recorded;
        summary.rejected += f.unmapped;
        summary.users_changed += f.users_changed;
        summary.users_new += f.users_new;
        summary.attributes_changed += f.attributes_changed;
        summary.rejected += f.duplicates;
        summary.departures_unaddressable += f.unaddressable;
        match &mut audiences {
            None => audiences = Some(f.audiences),
            Some(all) => {
                for (a, b) in all.iter_mut().zip(f.audiences) {
                    a.members_before += b.members_before;
                    a.leaving += b.leaving;
                }
            }
        }
    }
    Ok((audiences, workers))
}

/// What every diff worker reads.
struct DiffCtx<'a, 'r> {
    route: &'a Route,
    state: &'a dyn RangeState,
    opts: &'a ProduceOptions,
    part_dirs: &'a [PathBuf],
    sources: &'a [Vec<Table>],
    on_delta: &'a (dyn Fn(UserDelta) -> Result<(), Stop> + Sync),
    rejects: &'a RejectSink<'r>,
    stop: &'a AtomicBool,
    /// The next unit to take.
    next: AtomicUsize,
    /// This run's units (state ranges, or spill ranges of an empty state).
    span: std::ops::Range<usize>,
    /// Spill ranges per unit: `1 << per_unit`.
    per_unit: u32,
    has_state: bool,
    /// Where each worker writes its departure file (`w<worker>/`).
    dep_dir: &'a Path,
    disk_limit: Option<u64>,
    /// The mass-unsubscribe guard (with departures on and consent slots mapped).
    guard: Option<user::UnsubscribeGuard>,
}

impl DiffCtx<'_, '_> {
    /// Worker `w`: diffs units until none is left (or another worker failed).
    fn work(&self, w: usize) -> Result<Found, SyncError> {
        let mine = self.dep_dir.join(format!("w{w}"));
        std::fs::create_dir_all(&mine).map_err(|error| {
            SyncError::Spill(SpillError::Io {
                path: mine.display().to_string(),
                error,
            })
        })?;
        let mut deps = Partitioner::new(&mine, 0, 1 << 20, self.disk_limit);
        let mut found = Found::default();
        if self.opts.departures {
            // Every worker sums into the route's full list, even one that
            // diffed no range.
            found.audiences = user::departure_audiences(self.route);
        }
        loop {
            let u = self.next.fetch_add(1, Ordering::Relaxed);
            if u >= self.span.end || self.stop.load(Ordering::Relaxed) {
                break;
            }
            let subs = (u << self.per_unit)..((u + 1) << self.per_unit);
            if let Err(e) = self.unit(u, self.has_state, subs, &mut found, &mut deps) {
                self.stop.store(true, Ordering::Relaxed);
                return Err(e);
            }
        }
        deps.finish()?;
        Ok(found)
    }

    /// Diffs the spill ranges `subs` against state range `u`, then finds its departures.
    fn unit(
        &self,
        u: usize,
        has_state: bool,
        subs: std::ops::Range<usize>,
        found: &mut Found,
        deps: &mut Partitioner,
    ) -> Result<(), SyncError> {
        let snap = if has_state {
            self.state.load(u)?
        } else {
            Snapshot::for_route(self.route)
        };
        let mut seen = Seen::new(&snap);
        let mut w = Worker {
            mapper: Mapper::new(self.route),
            mapped: MappedRow::default(),
            buf: Vec::with_capacity(256),
            digest_slot: snap.slot_of_name(ROW_DIGEST),
            pending: Vec::with_capacity(HAND_DELTAS),
            held: Vec::new(),
            digests: DIGESTS.take(),
        };
        if let Some(slot) = w.digest_slot {
            snap.base_column_into(slot, &mut w.digests);
        }
        for s in subs {
            // A range's rows, part after part: export order, so a user's first row wins.
            seen.clear_others();
            for (part, dir) in self.part_dirs.iter().enumerate() {
                read_range::<SyncError>(dir, s, &mut |rec| {
                    if self.stop.load(Ordering::Relaxed) {
                        return Err(SyncError::Stopped("another range failed".into()));
                    }
                    self.row(part, rec, &snap, &mut seen, &mut w, found)
                        .ok_or_else(|| {
                            SyncError::Spill(SpillError::Corrupt {
                                path: crate::state::spill::range_path(dir, s)
                                    .display()
                                    .to_string(),
                                offset: 0,
                            })
                        })?
                })?;
            }
        }
        self.flush(&mut w)?;
        DIGESTS.set(std::mem::take(&mut w.digests));
        if !self.opts.departures {
            drop(seen);
            snap.recycle();
            return Ok(());
        }
        let d = user::departures(&snap, self.route, &seen, &self.opts.export_name);
        drop(seen);
        snap.recycle();
        for (a, b) in found.audiences.iter_mut().zip(&d.audiences) {
            a.members_before += b.members_before;
            a.leaving += b.leaving;
        }
        found.unaddressable += d.unaddressable;
        let mut rec = Vec::with_capacity(64);
        for delta in d.deltas.iter().chain(&w.held) {
            encode_departure(delta, &d.audiences, &mut rec);
            deps.push(0, &rec)?;
        }
        Ok(())
    }

    /// One spilled record; `None` when it does not decode.
    fn row(
        &self,
        part: usize,
        rec: &[u8],
        snap: &Snapshot,
        seen: &mut Seen,
        w: &mut Worker<'_>,
        found: &mut Found,
    ) -> Option<Result<(), SyncError>> {
        match *rec.first()? {
            REC_ROW => {
                let mut at = 1;
                let src = usize::try_from(get_varint(rec, &mut at)?).ok()?;
                let row = get_varint(rec, &mut at)?;
                let line = get_varint(rec, &mut at)?;
                let key = UserKey(u128::from_le_bytes(rec.get(at..at + 16)?.try_into().ok()?));
                let digest = u64::from_le_bytes(rec.get(at + 16..at + 24)?.try_into().ok()?);
                let cells = rec.get(at + 24..)?;
                let table = self.sources.get(part)?.get(src)?;
                let state = snap.get(key);
                let full_resend = self.opts.full_resend;
                let skips_recorded = self.opts.skips_recorded();
                let recorded = match state {
                    Some(st) => match st.index {
                        Some(i) => w.digests.get(i).copied(),
                        None => w.digest_slot.and_then(|slot| st.fp(slot)),
                    },
                    None => None,
                } == Some(stored_digest(digest));
                // The row the state's values came from, again: unchanged, nothing to map.
                // (A second row of the user is a duplicate: mapped below, as its reject
                // depends on whether its values map.)
                if recorded && skips_recorded && seen.insert(key, state) {
                    found.unchanged += 1;
                    return Some(Ok(()));
                }
                let first = !recorded || !skips_recorded;
                let line = (line != NO_LINE).then_some(line);
                let pos = || RowPos {
                    source: table.source.clone(),
                    row,
                    line,
                };
                let cells =
                    EncodedRow::decode(table.digest.columns(), table.digest.width(), cells)?;
                let r = Row {
                    row,
                    line,
                    cells: &cells,
                };
                let mapped = w
                    .mapper
                    .map_key(&table.binding, &table.header, &r, &mut w.mapped)
                    .and_then(|()| {
                        w.mapper
                            .map_values(&table.binding, &table.header, &r, &mut w.mapped)
                    });
                if let Err((outcome, e)) = mapped {
                    // The user is in the export: never treat them as departed.
                    seen.insert(key, state);
                    found.unmapped += 1;
                    let identifier =
                        matches!(outcome, MapOutcome::Identified).then(|| w.mapped.identifier());
                    self.reject(RowReject::unmapped(&table.source, &r, e, identifier));
                    return Some(Ok(()));
                }
                if !first || !seen.insert(key, state) {
                    found.duplicates += 1;
                    self.reject(RowReject {
                        pos: pos(),
                        column: Some(self.route.config.identifier.column.clone()),
                        reason: "duplicate identifier: the user already appeared earlier in this export; the earlier row is kept and this one is not sent".into(),
                        identifier: Some(w.mapped.identifier()),
                    });
                    return Some(Ok(()));
                }
                let mut changes =
                    user::changes(state, &w.mapped, self.route, full_resend, &mut w.buf);
                let mut row_digest = Some(digest);
                let held = self.guard.as_ref().is_some_and(|g| {
                    let at = (&w.mapped, pos());
                    g.hold(state, &mut changes, &mut found.audiences, at, &mut w.held)
                });
                if held {
                    // Mapped again next run: the held change is not in the state.
                    row_digest = None;
                    if changes.is_empty() {
                        return Some(Ok(()));
                    }
                }
                if changes.is_empty() {
                    found.unchanged += 1;
                    // Same values from other cells (a new digest, or a state written before
                    // digests): a records-only delta, so the next run skips this row.
                    if state.is_none() || w.digest_slot.is_none() || recorded {
                        return Some(Ok(()));
                    }
                    found.digests_recorded += 1;
                } else {
                    found.users_changed += 1;
                    found.attributes_changed += changes.len() as u64;
                    found.users_new += u64::from(state.is_none());
                }
                let d = UserDelta {
                    identifier: w.mapped.identifier(),
                    pos: pos(),
                    changes,
                    update_existing_only: self.route.config.update_existing_only,
                    is_new: state.is_none(),
                    row_digest,
                };
                Some(self.hand(w, d))
            }
            _ => None,
        }
    }

    /// Queues `d` for the sender, handing the queue over once it holds [`HAND_DELTAS`]: in
    /// bursts, so the consumer is woken once per burst, not per delta (a wake-up per delta was
    /// ~4% of the diff's CPU).
    fn hand(&self, w: &mut Worker<'_>, d: UserDelta) -> Result<(), SyncError> {
        w.pending.push(d);
        if w.pending.len() >= HAND_DELTAS {
            return self.flush(w);
        }
        Ok(())
    }

    /// Hands every queued delta to the sender.
    fn flush(&self, w: &mut Worker<'_>) -> Result<(), SyncError> {
        for d in w.pending.drain(..) {
            (self.on_delta)(d).map_err(|s| SyncError::Stopped(s.0))?;
        }
        Ok(())
    }

    fn reject(&self, r: RowReject) {
        if let Ok(mut sink) = self.rejects.lock() {
            (*sink)(r);
        }
    }
}

thread_local! {
    /// A diff worker's digest column, kept from one range to the next (its memory reused).
    static DIGESTS: std::cell::Cell<Vec<u64>> = const { std::cell::Cell::new(Vec::new()) };
}

/// Deltas a diff worker hands to the sender at once.
const HAND_DELTAS: usize = 64;

/// One diff worker's mapping tools.
struct Worker<'a> {
    /// Deltas not yet handed to the sender (at most [`HAND_DELTAS`]; all at the end of a
    /// range).
    pending: Vec<UserDelta>,
    /// Unsubscribes the guard holds, for the range's departure file.
    held: Vec<UserDelta>,
    mapper: Mapper<'a>,
    mapped: MappedRow,
    buf: Vec<u8>,
    /// The state's [`ROW_DIGEST`] slot (`None`: a layout without one).
    digest_slot: Option<usize>,
    /// That slot of the range's base users, as one column ([`Snapshot::base_column_into`]).
    digests: Vec<u64>,
}
