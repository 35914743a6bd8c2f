//! Step 3 of the bounded diff and the departure files. Per range, the diff writes the
//! removals of members absent from the export to a departure file ([`encode_departure`]
//! records); after the last range the departure guard judges each audience on the export's
//! totals ([`release_departures`]) and the removals it lets through are sent. A fan-out piece
//! hands its counts and file over instead (`defer_departures`), for its finalizer to judge.

use std::io::Read;
use std::path::{Path, PathBuf};

use serde_json::Value;
use tracing::warn;

use super::Job;
use crate::config::route::Route;
use crate::diff::export::{ProduceOptions, Stop, Summary, SyncError};
use crate::diff::user::{self, AudienceDepartures, DepartureKind};
use crate::model::{AttributeChange, RowPos, UserDelta, fingerprint};
use crate::state::confirmed::{identifier_text, parse_identifier};
use crate::state::spill::SpillError;

/// Step 3 of [`super::produce_ranged`], after the diff of every range: with departures on,
/// either hands the audiences' counts (in `summary.departures`) and the workers' removals
/// (concatenated into `departures_file`) over (`defer_departures`), or judges and sends them
/// ([`release_departures`]). Whether it ran (departures on, and counted).
pub(super) fn after_diff(
    job: &Job<'_, '_>,
    summary: &mut Summary,
    audiences: Option<Vec<AudienceDepartures>>,
    dep_dir: &Path,
    workers: usize,
) -> Result<bool, SyncError> {
    let Some(mut audiences) = audiences.filter(|_| job.opts.departures) else {
        return Ok(false);
    };
    let files: Vec<PathBuf> = (0..workers)
        .map(|w| crate::state::spill::range_path(&dep_dir.join(format!("w{w}")), 0))
        .collect();
    if job.settings.defer_departures {
        // Step 3 is the finalizer's: hand the counts and the removals over.
        for a in &mut audiences {
            a.share = share(a);
        }
        summary.departures = audiences;
        if let Some(path) = &job.settings.departures_file {
            concat_files(&files, path)?;
        }
        return Ok(true);
    }
    // Step 3: the guard on the export's totals, then the removals it lets through.
    summary.departures = audiences;
    let mut readers = Vec::with_capacity(files.len());
    for f in &files {
        match std::fs::File::open(f) {
            Ok(file) => readers.push((f.display().to_string(), file)),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                return Err(SyncError::Spill(SpillError::Io {
                    path: f.display().to_string(),
                    error,
                }));
            }
        }
    }
    release_departures(summary, job.route, job.opts, readers, job.on_delta)?;
    Ok(true)
}

/// The share of an audience's members that leave.
pub(super) fn share(a: &AudienceDepartures) -> f64 {
    if a.members_before > 0 {
        a.leaving as f64 / a.members_before as f64
    } else {
        0.0
    }
}

/// Writes the departure files `files` (those that exist) one after the other into `out`.
fn concat_files(files: &[PathBuf], out: &Path) -> Result<(), SyncError> {
    let err = |path: &Path, error: std::io::Error| {
        SyncError::Spill(SpillError::Io {
            path: path.display().to_string(),
            error,
        })
    };
    let mut w = std::fs::File::create(out).map_err(|e| err(out, e))?;
    for f in files {
        let mut r = match std::fs::File::open(f) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => return Err(err(f, e)),
        };
        std::io::copy(&mut r, &mut w).map_err(|e| err(out, e))?;
    }
    std::io::Write::flush(&mut w).map_err(|e| err(out, e))
}

/// Step 3 of [`super::produce_ranged`] on the export's totals, also a fan-out finalizer's: judges
/// each audience of `summary.departures` (members and leavers summed over every range of
/// the export; `summary.rows_without_identifier` likewise) with the departure guard, then
/// reads the removals from the departure files `files` (`(name for errors, bytes)`, as
/// written with `defer_departures`), sends those it lets through with `on_delta` and counts
/// them (`users_departed`, `attributes_changed`, per audience `sent` / `held`). Does
/// nothing when `opts.departures` is off.
pub fn release_departures<R: Read>(
    summary: &mut Summary,
    route: &Route,
    opts: &ProduceOptions,
    files: impl IntoIterator<Item = (String, R)>,
    on_delta: &(dyn Fn(UserDelta) -> Result<(), Stop> + Sync),
) -> Result<(), SyncError> {
    if !opts.departures {
        return Ok(());
    }
    let mut audiences = std::mem::take(&mut summary.departures);
    if audiences.is_empty() {
        audiences = user::departure_audiences(route);
    }
    for a in &mut audiences {
        a.share = share(a);
        a.held_because = None;
        a.released = false;
        a.sent = 0;
        a.held = 0;
    }
    let held = user::decide_departures(
        &mut audiences,
        summary.rows_without_identifier,
        opts.allow_departures,
    );
    for a in &audiences {
        if let Some(reason) = &a.held_because {
            warn!(route = route.name(), audience = %a.audience, held = a.leaving, reason = %reason,
                  "Departures held: not sent until an operator releases them.");
        }
    }
    for (what, r) in files {
        read_departure_file::<SyncError>(r, &what, &mut |b| {
            let mut d =
                decode_departure(b, route, &audiences, &opts.export_name).ok_or_else(|| {
                    SyncError::Spill(SpillError::Corrupt {
                        path: what.clone(),
                        offset: 0,
                    })
                })?;
            user::hold_departure(&mut d, &mut audiences, &held);
            if d.changes.is_empty() {
                return Ok(());
            }
            summary.users_departed += u64::from(user::is_departure(&d, &audiences));
            summary.attributes_changed += d.changes.len() as u64;
            on_delta(d).map_err(|s| SyncError::Stopped(s.0))
        })?;
    }
    summary.departures = audiences;
    Ok(())
}

/// Calls `f` with each record of a departure file (length-framed records of
/// [`encode_departure`], the spill format), in order; `what` names it in errors.
pub fn read_departure_file<E: From<SpillError>>(
    r: impl Read,
    what: &str,
    f: &mut dyn FnMut(&[u8]) -> Result<(), E>,
) -> Result<(), E> {
    crate::state::spill::read_records(r, what, f)
}

/// change count, per change (`u16` entry, `u8` value: 0 null, 1 false, 2 `"unsubscribed"`),
/// then the identifier's canonical text. The entry is an index into `audiences` (the route's
/// list in slot order, [`user::departure_audiences`], or a summary's `departures` of the same
/// route), or [`CLEARED`] plus the attribute's place in the `clear_fields` entry's list.
pub fn encode_departure(d: &UserDelta, audiences: &[AudienceDepartures], out: &mut Vec<u8>) {
    out.clear();
    let changes: Vec<(u16, u8)> = d
        .changes
        .iter()
        .filter_map(|c| {
            let j = user::entry_of(audiences, &c.name)?;
            let j = match audiences[j].kind {
                DepartureKind::ClearFields => {
                    CLEARED + audiences[j].attributes.iter().position(|n| *n == c.name)? as u16
                }
                _ => j as u16,
            };
            let v = match &c.value {
                Value::Null => 0,
                Value::Bool(_) => 1,
                _ => 2,
            };
            Some((j, v))
        })
        .collect();
    out.extend_from_slice(&(changes.len() as u16).to_le_bytes());
    for (j, v) in changes {
        out.extend_from_slice(&j.to_le_bytes());
        out.push(v);
    }
    out.extend_from_slice(identifier_text(&d.identifier).as_bytes());
}

/// Entries of a departure record at or above this name an attribute of the `clear_fields`
/// entry (by its place in that entry's list), not an entry.
const CLEARED: u16 = 0x8000;

/// One record of [`encode_departure`] back as the change to send (`None` when it does not
/// decode); `source` names the export in its position.
pub fn decode_departure(
    b: &[u8],
    route: &Route,
    audiences: &[AudienceDepartures],
    source: &str,
) -> Option<UserDelta> {
    let n = u16::from_le_bytes(b.get(..2)?.try_into().ok()?) as usize;
    let mut changes = Vec::with_capacity(n);
    for i in 0..n {
        let at = 2 + i * 3;
        let j = u16::from_le_bytes(b.get(at..at + 2)?.try_into().ok()?);
        let name = if j >= CLEARED {
            let clear = audiences
                .iter()
                .find(|a| a.kind == DepartureKind::ClearFields)?;
            clear.attributes.get(usize::from(j - CLEARED))?.clone()
        } else {
            audiences.get(usize::from(j))?.audience.clone()
        };
        let value = match b.get(at + 2)? {
            0 => Value::Null,
            1 => Value::Bool(false),
            _ => Value::String("unsubscribed".into()),
        };
        changes.push(AttributeChange {
            name,
            fingerprint: (!value.is_null()).then(|| fingerprint(&value)),
            value,
        });
    }
    let identifier = parse_identifier(std::str::from_utf8(b.get(2 + n * 3..)?).ok()?)?;
    Some(UserDelta {
        identifier,
        pos: RowPos {
            source: source.to_string(),
            row: 0,
            line: None,
        },
        changes,
        update_existing_only: route.config.update_existing_only,
        is_new: false,
        row_digest: None,
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::Identifier;

    #[test]
    fn consent_and_cleared_changes_survive_the_departure_record() {
        let route = Route::from_toml(
            "name = \"r\"\nprefix = \"p/\"\non_leave = \"clear_fields\"\n[identifier]\nkind = \"external_id\"\ncolumn = \"id\"\n[fields]\noptin = \"email_subscribe\"\n[attributes.tier]\ntype = \"String\"\n[attributes.ltv]\ntype = \"Float\"\n[[audiences]]\nattribute = \"aud_vip\"\n",
            "t",
        )
        .unwrap();
        let audiences = user::departure_audiences(&route);
        let change = |name: &str, value: Value| AttributeChange {
            name: name.into(),
            fingerprint: (!value.is_null()).then(|| fingerprint(&value)),
            value,
        };
        let d = UserDelta {
            identifier: Identifier::ExternalId("u 1".into()),
            pos: RowPos {
                source: "s3://b/k".into(),
                row: 0,
                line: None,
            },
            changes: vec![
                change("aud_vip", Value::Bool(false)),
                change("email_subscribe", Value::String("unsubscribed".into())),
                change("tier", Value::Null),
                change("ltv", Value::Null),
            ],
            update_existing_only: true,
            is_new: false,
            row_digest: None,
        };
        let mut rec = Vec::new();
        encode_departure(&d, &audiences, &mut rec);
        assert_eq!(
            decode_departure(&rec, &route, &audiences, "s3://b/k"),
            Some(d)
        );
    }
}
