//! One export, read → map → diff, as a blocking producer: every part is read in order, each
//! row mapped and diffed against the confirmed [`Snapshot`], and each resulting
//! [`UserDelta`] handed to a callback as soon as it exists (the Lambda path sends it into a
//! bounded channel to the sender while reading goes on). Rejected rows go to another
//! callback. After the last part, users who left an audience get their removals (when the
//! route asks). The snapshot is only read here: nothing in this module advances state.
//!
//! [`dry_run`] prints the attribute objects that would be sent and a summary, without
//! sending or committing. [`blocking_reader`] and [`open_s3_part`] bridge S3's async streams
//! into the synchronous reader (run the producer in [`crate::clock::spawn_blocking`]).

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use bridge_shared::object_store::{ObjectMeta, ObjectReader};
use bridge_shared::{ObjectStore, S3Uri};
use tracing::warn;

use crate::clock::{Blocking, BlockingReader};
use crate::config::route::Route;
use crate::diff::digest::TableDigest;
use crate::diff::export::{Part, ProduceOptions, Stop, Summary, SyncError};
use crate::diff::rejects::RowReject;
use crate::diff::user::{self, Seen};
use crate::map::{Binding, MapOutcome, MappedRow, Mapper};
use crate::model::{RowPos, UserDelta};
use crate::read::{self, ReadError, Row, RowItem, RowSource};
use crate::state::confirmed::{Snapshot, stored_digest};

struct Planner<'a> {
    route: &'a Route,
    snapshot: &'a Snapshot,
    opts: &'a ProduceOptions,
    mapper: Mapper<'a>,
    seen: Seen,
    mapped: MappedRow,
    buf: Vec<u8>,
    summary: Summary,
    ignored: BTreeSet<String>,
    /// [`crate::diff::digest::route_seed`] of the route.
    route_seed: u64,
    /// The snapshot's [`crate::vocab::ROW_DIGEST`] slot.
    digest_slot: Option<usize>,
    encoded: Vec<u8>,
    /// The mass-unsubscribe guard (with departures on and consent slots mapped).
    guard: Option<user::UnsubscribeGuard>,
    /// Unsubscribes taken out of the rows' deltas, and their counts per guard entry: judged
    /// and sent (or held) with the departures.
    held: Vec<UserDelta>,
    held_counts: Vec<user::AudienceDepartures>,
}

impl Planner<'_> {
    fn table(
        &mut self,
        src: &mut dyn RowSource,
        on_delta: &mut dyn FnMut(UserDelta) -> Result<(), Stop>,
        on_reject: &mut dyn FnMut(RowReject),
    ) -> Result<(), SyncError> {
        self.summary.tables += 1;
        let header = src.header().to_vec();
        let source = src.source().to_string();
        let binding = Binding::new(self.route, &header, &source)?;
        self.ignored.extend(binding.unknown_columns.iter().cloned());
        let table = Table {
            digest: TableDigest::new(self.route_seed, &binding, header.len()),
            header,
            source,
            binding,
        };
        while let Some(item) = src.next_row()? {
            self.summary.rows_read += 1;
            crate::progress::LIVE.row_read();
            match item {
                RowItem::Bad(b) => {
                    self.summary.rejected += 1;
                    self.summary.rows_without_identifier += 1;
                    on_reject(RowReject::unreadable(&table.source, b));
                }
                RowItem::Row(row) => self.row(&table, &row, on_delta, on_reject)?,
            }
        }
        Ok(())
    }

    /// The reject of a row whose user already appeared earlier in the export.
    fn duplicate(&self, pos: RowPos) -> RowReject {
        RowReject {
            pos,
            column: Some(self.route.config.identifier.column.clone()),
            reason: "duplicate identifier: the user already appeared earlier in this export; the earlier row is kept and this one is not sent".into(),
            identifier: Some(self.mapped.identifier()),
        }
    }

    /// One readable row: unchanged, rejected, or a delta handed to `on_delta`.
    fn row(
        &mut self,
        table: &Table,
        row: &Row<'_>,
        on_delta: &mut dyn FnMut(UserDelta) -> Result<(), Stop>,
        on_reject: &mut dyn FnMut(RowReject),
    ) -> Result<(), SyncError> {
        let Table {
            header,
            source,
            binding,
            digest: table,
        } = table;
        let pos = || RowPos {
            source: source.clone(),
            row: row.row,
            line: row.line,
        };
        // The user's state is looked up as soon as the key is known, before the values
        // are mapped, so the memory accesses overlap with the mapping work.
        let mapped = self.mapper.map_key(binding, header, row, &mut self.mapped);
        let state = match mapped {
            Ok(()) => self.snapshot.get(self.mapped.key),
            Err(_) => None,
        };
        // The row the state's values came from, again: unchanged without mapping (see
        // `crate::diff::digest`).
        let mut digest = None;
        let mut recorded = false;
        if mapped.is_ok() {
            self.encoded.clear();
            let d = table.encode(row.cells, &mut self.encoded);
            digest = Some(d);
            recorded = self
                .digest_slot
                .and_then(|slot| state.and_then(|st| st.fp(slot)))
                == Some(stored_digest(d));
            if recorded && self.opts.skips_recorded() && self.seen.insert(self.mapped.key, state) {
                self.summary.unchanged += 1;
                return Ok(());
            }
        }
        if let Some(st) = &state {
            std::hint::black_box(st.touch());
        }
        let mapped = mapped.and_then(|()| {
            self.mapper
                .map_values(binding, header, row, &mut self.mapped)
        });
        if let Err((outcome, e)) = mapped {
            self.summary.rejected += 1;
            let identifier = match outcome {
                MapOutcome::Identified => {
                    // The user is in the export: never treat them as departed.
                    self.seen.insert(self.mapped.key, state);
                    Some(self.mapped.identifier())
                }
                MapOutcome::NoIdentifier => {
                    self.summary.rows_without_identifier += 1;
                    None
                }
            };
            on_reject(RowReject::unmapped(source, row, e, identifier));
            return Ok(());
        }
        let first = !recorded || !self.opts.skips_recorded();
        if !first || !self.seen.insert(self.mapped.key, state) {
            self.summary.rejected += 1;
            on_reject(self.duplicate(pos()));
            return Ok(());
        }
        let mut changes = user::changes(
            state,
            &self.mapped,
            self.route,
            self.opts.full_resend,
            &mut self.buf,
        );
        let held = self.guard.as_ref().is_some_and(|g| {
            let at = (&self.mapped, pos());
            g.hold(
                state,
                &mut changes,
                &mut self.held_counts,
                at,
                &mut self.held,
            )
        });
        if held {
            // The row is mapped again next run (the held change is not in the state).
            digest = None;
            if changes.is_empty() {
                return Ok(());
            }
        }
        if changes.is_empty() {
            self.summary.unchanged += 1;
            // Same values from other cells: a records-only delta (nothing is sent).
            if state.is_none() || self.digest_slot.is_none() || recorded {
                return Ok(());
            }
            self.summary.digests_recorded += 1;
        } else {
            self.summary.users_changed += 1;
            self.summary.attributes_changed += changes.len() as u64;
            self.summary.users_new += u64::from(state.is_none());
        }
        on_delta(UserDelta {
            identifier: self.mapped.identifier(),
            pos: pos(),
            changes,
            update_existing_only: self.route.config.update_existing_only,
            is_new: state.is_none(),
            row_digest: digest,
        })
        .map_err(|s| SyncError::Stopped(s.0))
    }
}

/// One table of the export: its header, where it came from, how the route binds it and how
/// its rows are digested.
struct Table {
    header: Vec<String>,
    source: String,
    binding: Binding,
    digest: TableDigest,
}

/// Reads, maps and diffs every part of one export, calling `on_delta` for each user to send
/// and `on_reject` for each rejected row, then (when asked) sends departures. Blocking: run it
/// in `spawn_blocking`. An `Err` means the export is not fully planned and nothing of it may
/// be committed (deltas already handed over may have been sent; the state does not move, so
/// a replay sends them again).
pub fn produce<I, R>(
    parts: I,
    route: &Route,
    snapshot: &Snapshot,
    opts: &ProduceOptions,
    on_delta: &mut dyn FnMut(UserDelta) -> Result<(), Stop>,
    on_reject: &mut dyn FnMut(RowReject),
) -> Result<Summary, SyncError>
where
    I: IntoIterator<Item = Result<Part<R>, SyncError>>,
    R: Read,
{
    let read_opts = route.read_options();
    let mut p = Planner {
        route,
        snapshot,
        opts,
        mapper: Mapper::new(route),
        seen: Seen::new(snapshot),
        mapped: MappedRow::default(),
        buf: Vec::with_capacity(256),
        summary: Summary::default(),
        ignored: BTreeSet::new(),
        route_seed: crate::diff::digest::seed_for(route, opts),
        digest_slot: snapshot.slot_of_name(crate::vocab::ROW_DIGEST),
        encoded: Vec::with_capacity(256),
        guard: user::UnsubscribeGuard::new(route).filter(|_| opts.departures),
        held: Vec::new(),
        held_counts: user::departure_audiences(route),
    };
    for part in parts {
        let part = part?;
        read::read_export(
            part.reader,
            &part.source,
            &read_opts,
            &mut |src: &mut dyn RowSource| p.table(src, on_delta, on_reject),
        )?;
    }
    // An export must hold a table, and rows unless the route expects empty ones: an empty
    // export would otherwise read as every member leaving every audience.
    if p.summary.tables == 0 {
        return Err(ReadError::NoTable {
            source_name: opts.export_name.clone(),
            detail: "no part, or only folders, links or hidden files in its archives".into(),
        }
        .into());
    }
    if p.summary.rows_read == 0 && !route.config.allow_empty {
        return Err(ReadError::EmptyExport {
            source_name: opts.export_name.clone(),
        }
        .into());
    }
    if !p.ignored.is_empty() {
        warn!(route = route.name(), columns = ?p.ignored, "Export columns not mapped by the route are ignored.");
    }
    let mut summary = std::mem::take(&mut p.summary);
    summary.ignored_columns = p.ignored.into_iter().collect();
    if opts.departures {
        let mut d = user::departures(snapshot, route, &p.seen, &opts.export_name);
        for (a, h) in d.audiences.iter_mut().zip(&p.held_counts) {
            a.leaving += h.leaving;
            if a.members_before > 0 {
                a.share = a.leaving as f64 / a.members_before as f64;
            }
        }
        d.deltas.append(&mut p.held);
        user::guard_departures(
            &mut d,
            summary.rows_without_identifier,
            opts.allow_departures,
        );
        summary.departures_unaddressable = d.unaddressable;
        for a in &d.audiences {
            if let Some(reason) = &a.held_because {
                warn!(route = route.name(), audience = %a.audience, held = a.held, reason = %reason,
                      "Departures held: not sent until an operator releases them.");
            }
        }
        summary.departures = d.audiences;
        for delta in d.deltas {
            summary.users_departed += u64::from(user::is_departure(&delta, &summary.departures));
            summary.attributes_changed += delta.changes.len() as u64;
            on_delta(delta).map_err(|s| SyncError::Stopped(s.0))?;
        }
    }
    Ok(summary)
}

/// Everything [`plan`] found.
#[derive(Debug, Clone, Default)]
pub struct Plan {
    /// Deltas in the order they would be sent.
    pub deltas: Vec<UserDelta>,
    /// Rejected rows.
    pub rejects: Vec<RowReject>,
    /// Counts.
    pub summary: Summary,
}

/// [`produce`] into memory (tests, small exports): the deltas to send (not the ones that only
/// record a row digest, [`UserDelta::records_only`]).
pub fn plan<I, R>(
    parts: I,
    route: &Route,
    snapshot: &Snapshot,
    opts: &ProduceOptions,
) -> Result<Plan, SyncError>
where
    I: IntoIterator<Item = Result<Part<R>, SyncError>>,
    R: Read,
{
    let mut deltas = Vec::new();
    let mut rejects = Vec::new();
    let summary = produce_unsent(
        parts,
        route,
        snapshot,
        opts,
        &mut |d| {
            deltas.push(d);
            Ok(())
        },
        &mut |r| rejects.push(r),
    )?;
    Ok(Plan {
        deltas,
        rejects,
        summary,
    })
}

/// The dry run: writes each attribute object that would be sent as one JSON line to
/// `payloads`, each reject as one NDJSON line to `rejects`, and finally
/// `{"summary": {...}}` to `payloads`. Sends nothing and commits nothing.
pub fn dry_run<I, R>(
    parts: I,
    route: &Route,
    snapshot: &Snapshot,
    opts: &ProduceOptions,
    payloads: &mut dyn Write,
    rejects: &mut dyn Write,
) -> Result<Summary, SyncError>
where
    I: IntoIterator<Item = Result<Part<R>, SyncError>>,
    R: Read,
{
    let mut write_err: Option<std::io::Error> = None;
    let mut line = Vec::with_capacity(512);
    let summary = produce_unsent(
        parts,
        route,
        snapshot,
        opts,
        &mut |d| {
            line.clear();
            let _ = serde_json::to_writer(&mut line, &d.to_attribute_object());
            line.push(b'\n');
            payloads.write_all(&line).map_err(|e| {
                let stop = Stop(format!("writing the dry-run output: {e}"));
                write_err = Some(e);
                stop
            })
        },
        &mut ndjson_rejects(rejects),
    )?;
    if let Some(e) = write_err {
        return Err(SyncError::Stopped(e.to_string()));
    }
    let _ = writeln!(payloads, "{}", serde_json::json!({ "summary": summary }));
    Ok(summary)
}

/// [`produce`] for a caller that sends nothing (a plan, a dry run): `on_delta` sees only the
/// deltas that would be sent, not the ones that only record a row digest
/// ([`UserDelta::records_only`]).
pub fn produce_unsent<I, R>(
    parts: I,
    route: &Route,
    snapshot: &Snapshot,
    opts: &ProduceOptions,
    on_delta: &mut dyn FnMut(UserDelta) -> Result<(), Stop>,
    on_reject: &mut dyn FnMut(RowReject),
) -> Result<Summary, SyncError>
where
    I: IntoIterator<Item = Result<Part<R>, SyncError>>,
    R: Read,
{
    produce(
        parts,
        route,
        snapshot,
        opts,
        &mut |d| {
            if d.records_only() {
                return Ok(());
            }
            on_delta(d)
        },
        on_reject,
    )
}

/// Writes each reject as one NDJSON line to `out`, as a dry run does.
pub fn ndjson_rejects(out: &mut dyn Write) -> impl FnMut(RowReject) + '_ {
    move |r| {
        let mut l = Vec::new();
        r.write_line(&mut l);
        let _ = out.write_all(&l);
    }
}

/// Wraps an S3 stream as a blocking reader for the producer (call from blocking work, e.g.
/// [`crate::clock::spawn_blocking`]'s).
pub fn blocking_reader(reader: ObjectReader, blocking: &Blocking) -> BlockingReader<ObjectReader> {
    blocking.reader(reader)
}

/// Opens one S3 part for the producer, from a blocking thread.
pub fn open_s3_part(
    store: &Arc<dyn ObjectStore>,
    uri: &S3Uri,
    blocking: &Blocking,
) -> Result<(ObjectMeta, Part<BlockingReader<ObjectReader>>), SyncError> {
    let (meta, reader) =
        blocking
            .block_on(store.get_reader(uri))
            .map_err(|error| SyncError::Open {
                uri: uri.to_string(),
                error,
            })?;
    Ok((
        meta,
        Part {
            source: uri.to_string(),
            reader: blocking_reader(reader, blocking),
        },
    ))
}

/// The parts of a local export: the file itself, or the files of a folder (a Parquet folder,
/// split parts) in name order without markers and hidden files.
pub fn local_parts(path: &Path, marker_suffix: &str) -> std::io::Result<Vec<PathBuf>> {
    if path.is_file() {
        return Ok(vec![path.to_path_buf()]);
    }
    let mut parts: Vec<PathBuf> = std::fs::read_dir(path)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.is_file())
        .filter(|p| {
            let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
            !name.starts_with('.') && !name.starts_with('_') && !name.ends_with(marker_suffix)
        })
        .collect();
    parts.sort();
    Ok(parts)
}

/// Opens local parts lazily, for [`produce`].
pub fn open_local_parts(
    paths: Vec<PathBuf>,
) -> impl Iterator<Item = Result<Part<std::fs::File>, SyncError>> {
    paths.into_iter().map(|p| {
        let source = p.display().to_string();
        std::fs::File::open(&p)
            .map(|reader| Part {
                source: source.clone(),
                reader,
            })
            .map_err(|e| SyncError::Read(ReadError::io(&source, "opening the file", e)))
    })
}
