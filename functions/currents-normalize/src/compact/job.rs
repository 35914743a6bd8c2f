//! A compaction run over the store: list the tables prefix, pick the table-days, and for each
//! take its lease, copy its parts to local disk, merge them ([`super::merge`]), upload the
//! compacted part(s), renew the lease, record the day's manifest (conditionally on the version
//! read, so a run that lost the day never overwrites the winner's), and only then delete the
//! parts that were read (compacted ones first, normalizer parts last, each only if it is
//! still the version that was read). A crash at any point leaves every row readable and a
//! rerun converges; a part that lands meanwhile is never deleted.

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use tracing::{info, warn};

use super::lease;
use super::merge::{MergeInput, MergeOptions, MergeOutput, merge, table_for};
use super::plan::{DayParts, PartRef, Selection, TableDay, group, select};
use super::report::{DayOutcome, DayResult};
use crate::config::Config;
use crate::registry::Registry;

/// Time kept in hand before a Lambda deadline: no new table-day starts later than this.
pub const DEADLINE_MARGIN: Duration = Duration::from_secs(120);

/// What a run does.
#[derive(Debug, Clone)]
pub struct CompactRequest {
    /// Which table-days.
    pub selection: Selection,
    /// Count only: read the parts, write and delete nothing, take no lease.
    pub dry_run: bool,
    /// Today (UTC); days before it are eligible without `--day`.
    pub today: NaiveDate,
    /// When the run must be done by (Lambda deadline).
    pub deadline: Option<Instant>,
    /// Who holds the leases (request id).
    pub owner: String,
}

/// The sources a compacted table-day holds, kept beside the tables (never inside them).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
pub struct Manifest {
    /// Table.
    pub table: String,
    /// Day.
    pub day: String,
    /// The compacted parts' file names.
    pub outputs: Vec<String>,
    /// Source part ids (`part-<id>.parquet` of the normalizer) whose rows the compacted parts
    /// hold; backfill skips their sources.
    pub sources: BTreeSet<String>,
}

/// Runs compactions.
pub struct Compactor {
    cfg: Config,
    store: Arc<dyn ObjectStore>,
    registry: Arc<Registry>,
    opts: MergeOptions,
    progress: indicatif::ProgressBar,
}

fn fail(mut r: DayResult, reason: String, retryable: bool) -> DayResult {
    warn!(table = %r.table, day = %r.day, reason = %reason, retryable, "Compaction of a table-day failed.");
    r.outcome = DayOutcome::Failed;
    r.reason = Some(reason);
    r.retryable = retryable;
    r
}

impl Compactor {
    /// Builds a compactor.
    pub fn new(cfg: Config, store: Arc<dyn ObjectStore>, registry: Arc<Registry>) -> Self {
        Self {
            cfg,
            store,
            registry,
            opts: MergeOptions::default(),
            progress: indicatif::ProgressBar::hidden(),
        }
    }

    /// Advances `bar` by the bytes of each table-day as it is done (the CLI's progress on a
    /// terminal; hidden by default).
    pub fn with_progress(mut self, bar: indicatif::ProgressBar) -> Self {
        self.progress = bar;
        self
    }

    /// Replaces the merge options (size limit, batch sizes).
    pub fn with_options(mut self, opts: MergeOptions) -> Self {
        self.opts = opts;
        self
    }

    fn lease_uri(&self, bucket: &str, td: &TableDay) -> S3Uri {
        S3Uri::new(
            bucket,
            bridge_shared::s3_uri::join_key(
                &self.cfg.state_prefix,
                &format!("compaction/leases/{}/{}.json", td.table, td.day),
            ),
        )
    }

    /// Where a table-day's manifest lives.
    pub fn manifest_uri(&self, bucket: &str, td: &TableDay) -> S3Uri {
        S3Uri::new(
            bucket,
            bridge_shared::s3_uri::join_key(
                &self.cfg.state_prefix,
                &format!("compaction/manifests/{}/{}.json", td.table, td.day),
            ),
        )
    }

    /// Reads a table-day's manifest (`None` when the day was never compacted).
    pub async fn manifest(
        &self,
        bucket: &str,
        td: &TableDay,
    ) -> Result<Option<Manifest>, StoreError> {
        let uri = self.manifest_uri(bucket, td);
        match self.store.get(&uri).await {
            Ok((_, body)) => Ok(serde_json::from_slice(&body).ok()),
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The table-days of `bucket` a request selects, in the order they would run.
    pub async fn plan(
        &self,
        bucket: &str,
        req: &CompactRequest,
    ) -> Result<Vec<DayParts>, StoreError> {
        let listing = self.store.list(bucket, &self.cfg.tables_prefix).await?;
        Ok(select(
            group(&self.cfg.tables_prefix, &listing),
            &req.selection,
            req.today,
        ))
    }

    /// Runs a request over `bucket`. `Err` only when the tables cannot be listed.
    pub async fn run(
        &self,
        bucket: &str,
        req: &CompactRequest,
    ) -> Result<Vec<DayResult>, StoreError> {
        let days = self.plan(bucket, req).await?;
        self.run_days(bucket, &days, req).await
    }

    /// Compacts exactly these table-days (those that need it), whatever their day (backfill
    /// compacts the days it touched). Each day's folder is listed on its own, so the tables
    /// prefix is never listed whole. `Err` only when a listing fails.
    pub async fn run_selected(
        &self,
        bucket: &str,
        wanted: &BTreeSet<TableDay>,
        req: &CompactRequest,
    ) -> Result<Vec<DayResult>, StoreError> {
        let mut results = Vec::with_capacity(wanted.len());
        for td in wanted {
            let folder = crate::partition::PartLocation {
                table: td.table.clone(),
                day: td.day,
                id: crate::partition::PartId::for_source(""),
            }
            .partition_folder(&self.cfg.tables_prefix);
            let listing = self.store.list(bucket, &folder).await?;
            let days: Vec<DayParts> = group(&self.cfg.tables_prefix, &listing)
                .into_iter()
                .filter(|d| d.table_day == *td && d.needs_compaction())
                .collect();
            results.extend(self.run_days(bucket, &days, req).await?);
        }
        Ok(results)
    }

    async fn run_days(
        &self,
        bucket: &str,
        days: &[DayParts],
        req: &CompactRequest,
    ) -> Result<Vec<DayResult>, StoreError> {
        info!(
            bucket,
            table_days = days.len(),
            dry_run = req.dry_run,
            "Compaction run starts."
        );
        let mut results = Vec::with_capacity(days.len());
        self.progress
            .set_length(days.iter().map(DayParts::bytes).sum());
        for day in days {
            self.progress.set_message(day.table_day.to_string());
            let out_of_time = req
                .deadline
                .is_some_and(|d| d.saturating_duration_since(Instant::now()) < DEADLINE_MARGIN);
            if out_of_time {
                let mut r = DayResult::new(
                    &day.table_day.table,
                    day.table_day.day,
                    DayOutcome::Deferred,
                );
                r.reason = Some("run deadline near; the next run continues".into());
                results.push(r);
                continue;
            }
            results.push(self.compact_day(bucket, day, req).await);
            self.progress.inc(day.bytes());
        }
        self.progress.finish_and_clear();
        Ok(results)
    }

    /// Compacts one table-day.
    pub async fn compact_day(
        &self,
        bucket: &str,
        day: &DayParts,
        req: &CompactRequest,
    ) -> DayResult {
        let td = &day.table_day;
        let mut r = DayResult::new(&td.table, td.day, DayOutcome::Compacted);
        let Some(table) = table_for(&self.registry, &td.table) else {
            return fail(
                r,
                format!(
                    "table {} is not in the registry; its parts are left as they are",
                    td.table
                ),
                false,
            );
        };
        let mut held = None;
        if !req.dry_run {
            match lease::acquire(
                self.store.as_ref(),
                &self.lease_uri(bucket, td),
                &req.owner,
                chrono::Utc::now(),
            )
            .await
            {
                Ok(Some(l)) => held = Some(l),
                Ok(None) => {
                    r.outcome = DayOutcome::Busy;
                    r.reason = Some("another compaction holds this day's lease".into());
                    info!(table_day = %td, "Table-day busy; left to the other compaction.");
                    return r;
                }
                Err(e) => {
                    let retry = e.is_retryable();
                    return fail(r, format!("taking the lease: {e}"), retry);
                }
            }
        }
        let result = self
            .compact_held(bucket, day, &table, req, r, held.as_mut())
            .await;
        if let Some(l) = held
            && let Err(e) = l.release(self.store.as_ref(), chrono::Utc::now()).await
        {
            warn!(table_day = %td, error = %e, "Releasing the lease failed; it expires on its own.");
        }
        result
    }

    async fn compact_held(
        &self,
        bucket: &str,
        day: &DayParts,
        table: &Arc<crate::registry::TableDef>,
        req: &CompactRequest,
        mut r: DayResult,
        lease: Option<&mut lease::Lease>,
    ) -> DayResult {
        let td = &day.table_day;
        let tmp = match tempfile::Builder::new()
            .prefix("currents-compact-")
            .tempdir()
        {
            Ok(t) => t,
            Err(e) => return fail(r, format!("creating a temporary folder: {e}"), true),
        };
        if let Some(free) = free_bytes(tmp.path())
            && let Err(reason) = local_disk_fits(day.bytes(), free, tmp.path())
        {
            return fail(r, reason, false);
        }
        let (inputs, read) = match self.download_parts(bucket, day, tmp.path(), &mut r).await {
            Ok(x) => x,
            Err((reason, retry)) => return fail(r, reason, retry),
        };
        r.parts_in = inputs.len() as u64;
        let out_dir = tmp.path().join("out");
        if let Err(e) = std::fs::create_dir_all(&out_dir) {
            return fail(r, format!("creating a temporary folder: {e}"), true);
        }
        let opts = self.opts.clone();
        let table_def = table.clone();
        let merge_inputs = inputs.clone();
        let merge_dir = out_dir.clone();
        let merged = tokio::task::spawn_blocking(move || {
            merge(&merge_inputs, &table_def, &merge_dir, &opts)
        })
        .await;
        let (outputs, stats) = match merged {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                let retry = e.is_retryable();
                return fail(r, e.to_string(), retry);
            }
            Err(join) => return fail(r, format!("merge task failed: {join}"), true),
        };
        r.rows_in = stats.rows_in;
        r.rows_out = stats.rows_out;
        r.duplicates_removed = stats.duplicates;
        r.parts_out = outputs.len() as u64;
        r.bytes_out = outputs.iter().map(|o| o.bytes).sum();
        let folder = folder_of(&day.parts[0].key);
        r.outputs = outputs
            .iter()
            .map(|o| S3Uri::new(bucket, format!("{folder}{}", o.name)).to_string())
            .collect();
        if req.dry_run {
            r.outcome = DayOutcome::DryRun;
            return r;
        }
        if let Err(e) = self.upload(bucket, &folder, table, &outputs).await {
            let retry = e.is_retryable();
            return fail(r, format!("writing the compacted part: {e}"), retry);
        }
        // The manifest: what the compacted parts hold, for backfill's skip test. Written
        // only while the lease is still ours, and only over the version read here, so a run
        // that lost the day can never overwrite the winner's record.
        if let Some(outcome) = self
            .record_manifest(bucket, td, &outputs, &read, lease)
            .await
        {
            return match outcome {
                Err((reason, retry)) => fail(r, reason, retry),
                Ok(reason) => {
                    r.outcome = DayOutcome::LeaseLost;
                    r.reason = Some(reason);
                    r
                }
            };
        }
        let written: BTreeSet<String> = outputs
            .iter()
            .map(|o| format!("{folder}{}", o.name))
            .collect();
        // `read` is in read order: compacted parts first, normalizer parts last. Deleting in
        // that order means a crash part-way leaves a normalizer part behind, which marks the
        // day for the next run (until the last delete, the day still "needs compaction").
        for (part, etag) in &read {
            if written.contains(&part.key) {
                continue;
            }
            let uri = S3Uri::new(bucket, &part.key);
            match self.store.head(&uri).await {
                Ok(Some(now)) if now.etag == *etag => {}
                Ok(Some(_)) => {
                    info!(part = %uri, "Part was rewritten after it was read (a replay); kept for the next run.");
                    r.parts_kept += 1;
                    continue;
                }
                Ok(None) => continue,
                Err(e) => {
                    let retry = e.is_retryable();
                    return fail(r, format!("checking {uri} before deleting it: {e}"), retry);
                }
            }
            if let Err(e) = self.store.delete(&uri).await {
                let retry = e.is_retryable();
                return fail(r, format!("deleting {uri}: {e}"), retry);
            }
            r.parts_deleted += 1;
        }
        info!(table_day = %td, parts_in = r.parts_in, parts_out = r.parts_out,
            rows_in = r.rows_in, rows_out = r.rows_out, duplicates = r.duplicates_removed,
            "Compacted table-day.");
        r
    }

    /// Copies the day's parts to `dir` (streamed), skipping any that vanished since listing:
    /// the local copies to merge, and each part read with the ETag it had.
    async fn download_parts(
        &self,
        bucket: &str,
        day: &DayParts,
        dir: &Path,
        r: &mut DayResult,
    ) -> Result<(Vec<MergeInput>, Vec<(PartRef, String)>), (String, bool)> {
        let mut inputs = Vec::with_capacity(day.parts.len());
        let mut read = Vec::with_capacity(day.parts.len());
        for (i, part) in day.parts.iter().enumerate() {
            let uri = S3Uri::new(bucket, &part.key);
            let path = dir.join(format!("in-{i}.parquet"));
            match download(self.store.as_ref(), &uri, &path).await {
                Ok(etag) => {
                    inputs.push(MergeInput {
                        key: uri.to_string(),
                        path,
                    });
                    read.push((part.clone(), etag));
                    r.bytes_in += part.size;
                }
                Err(DownloadError::Store(StoreError::NotFound { .. })) => {
                    info!(part = %uri, "Part vanished since listing; skipped.");
                }
                Err(DownloadError::Store(e)) => {
                    return Err((format!("reading {uri}: {e}"), e.is_retryable()));
                }
                Err(DownloadError::Local(e)) => {
                    return Err((format!("copying {uri} to local disk: {e}"), true));
                }
            }
        }
        Ok((inputs, read))
    }

    /// Renews the lease, then writes the day's manifest conditionally on the version it
    /// read. `None` when the manifest was recorded and the lease is held for the deletes;
    /// `Some(Ok(reason))` when the day was lost to another run (nothing may be deleted);
    /// `Some(Err((reason, retryable)))` when the store failed.
    async fn record_manifest(
        &self,
        bucket: &str,
        td: &TableDay,
        outputs: &[MergeOutput],
        read: &[(PartRef, String)],
        lease: Option<&mut lease::Lease>,
    ) -> Option<Result<String, (String, bool)>> {
        const LOST: &str =
            "lease expired and was taken by another run; compacted part written, nothing deleted";
        if let Some(lease) = lease {
            match lease.renew(self.store.as_ref(), chrono::Utc::now()).await {
                Ok(true) => {}
                Ok(false) => return Some(Ok(LOST.into())),
                Err(e) => {
                    let retry = e.is_retryable();
                    return Some(Err((format!("renewing the lease: {e}"), retry)));
                }
            }
        }
        let uri = self.manifest_uri(bucket, td);
        let (condition, previous) = match self.store.get(&uri).await {
            Ok((meta, body)) => (
                PutCondition::IfMatch(meta.etag),
                serde_json::from_slice::<Manifest>(&body).ok(),
            ),
            Err(StoreError::NotFound { .. }) => (PutCondition::IfAbsent, None),
            Err(e) => {
                let retry = e.is_retryable();
                return Some(Err((format!("reading the manifest: {e}"), retry)));
            }
        };
        let mut manifest = Manifest {
            table: td.table.clone(),
            day: td.day.format("%Y-%m-%d").to_string(),
            outputs: outputs.iter().map(|o| o.name.clone()).collect(),
            sources: BTreeSet::new(),
        };
        // The earlier sources stay only while a compacted part that holds them was read.
        if read.iter().any(|(p, _)| p.compacted)
            && let Some(m) = previous
        {
            manifest.sources = m.sources;
        }
        manifest.sources.extend(
            read.iter()
                .filter_map(|(p, _)| p.source_id().map(str::to_string)),
        );
        let body = Bytes::from(serde_json::to_vec_pretty(&manifest).unwrap_or_default());
        match self.store.put(&uri, body, condition, BTreeMap::new()).await {
            Ok(_) => None,
            Err(StoreError::PreconditionFailed { .. }) => {
                // Either another run wrote it, or our own write landed and its answer was
                // lost (the client retried): re-read and decide.
                match self.store.get(&uri).await {
                    Ok((_, now)) if serde_json::from_slice::<Manifest>(&now).ok() == Some(manifest) => {
                        None
                    }
                    Ok(_) | Err(StoreError::NotFound { .. }) => Some(Ok(
                        "the manifest was rewritten by another run meanwhile; compacted part written, nothing deleted"
                            .into(),
                    )),
                    Err(e) => {
                        let retry = e.is_retryable();
                        Some(Err((format!("re-reading the manifest: {e}"), retry)))
                    }
                }
            }
            Err(e) => {
                let retry = e.is_retryable();
                Some(Err((format!("writing the manifest: {e}"), retry)))
            }
        }
    }

    async fn upload(
        &self,
        bucket: &str,
        folder: &str,
        table: &crate::registry::TableDef,
        outputs: &[MergeOutput],
    ) -> Result<(), StoreError> {
        for o in outputs {
            let uri = S3Uri::new(bucket, format!("{folder}{}", o.name));
            let mut metadata = BTreeMap::new();
            metadata.insert("currents-table".to_string(), table.table.clone());
            metadata.insert(
                "currents-registry-version".to_string(),
                table.version.to_string(),
            );
            metadata.insert("currents-compacted".to_string(), "true".to_string());
            self.store
                .put_file(&uri, &o.path, PutCondition::None, metadata)
                .await?;
        }
        Ok(())
    }
}

/// Runs a request, emits its EMF lines and writes its report (unless a dry run) under
/// `REPORTS_PREFIX` in `bucket`. `Err` only when the tables cannot be listed.
pub async fn run_and_report(
    compactor: &Compactor,
    cfg: &Config,
    store: &dyn ObjectStore,
    bucket: &str,
    req: CompactRequest,
    request_id: &str,
) -> Result<super::CompactReport, StoreError> {
    let started = chrono::Utc::now();
    let days = compactor.run(bucket, &req).await?;
    finish_report(cfg, store, bucket, &req, request_id, started, days).await
}

/// Builds, emits and writes the report of a run that produced `days`.
pub async fn finish_report(
    cfg: &Config,
    store: &dyn ObjectStore,
    bucket: &str,
    req: &CompactRequest,
    request_id: &str,
    started: chrono::DateTime<chrono::Utc>,
    days: Vec<DayResult>,
) -> Result<super::CompactReport, StoreError> {
    let report =
        super::CompactReport::new(request_id, started, chrono::Utc::now(), req.dry_run, days);
    for line in report.metric_lines(
        &cfg.metrics_namespace,
        chrono::Utc::now().timestamp_millis(),
    ) {
        println!("{line}");
    }
    if !req.dry_run {
        let uri = S3Uri::new(bucket, report.key(&cfg.reports_prefix));
        let body = Bytes::from(serde_json::to_vec_pretty(&report).unwrap_or_default());
        match store
            .put(&uri, body, PutCondition::None, BTreeMap::new())
            .await
        {
            Ok(_) => info!(report = %uri, compacted = report.totals.compacted,
                failed = report.totals.failed, "Wrote compaction report."),
            Err(e) => warn!(error = %e, "Could not write the compaction report."),
        }
    }
    Ok(report)
}

/// Bytes free for this process in the file system holding `dir` (`None` when unknown).
fn free_bytes(dir: &Path) -> Option<u64> {
    let s = rustix::fs::statvfs(dir).ok()?;
    Some(s.f_bavail.saturating_mul(s.f_frsize))
}

/// Room a table-day needs on local disk beyond its parts' bytes: the compacted output (at
/// most about the parts' size again) and a margin.
const LOCAL_DISK_MARGIN: u64 = 64 << 20;

/// Whether a table-day whose parts hold `parts_bytes` can be compacted with `free` bytes of
/// local disk (its parts are copied there, and the output is written beside them). The error
/// names the sizes and what to change; retrying cannot help.
pub fn local_disk_fits(parts_bytes: u64, free: u64, dir: &Path) -> Result<(), String> {
    let need = parts_bytes
        .saturating_mul(2)
        .saturating_add(LOCAL_DISK_MARGIN);
    if need <= free {
        return Ok(());
    }
    Err(format!(
        "the table-day's parts hold {parts_bytes} bytes; compacting it needs about {need} bytes \
         of local disk (the parts, the compacted output and a margin) but {free} are free in {}: \
         raise the compaction function's ephemeral storage (EphemeralStorage, up to 10240 MB)",
        dir.display()
    ))
}

fn folder_of(key: &str) -> String {
    match key.rfind('/') {
        Some(i) => key[..=i].to_string(),
        None => String::new(),
    }
}

#[derive(Debug)]
enum DownloadError {
    Store(StoreError),
    Local(std::io::Error),
}

async fn download(
    store: &dyn ObjectStore,
    uri: &S3Uri,
    path: &Path,
) -> Result<String, DownloadError> {
    let (meta, mut reader) = store.get_reader(uri).await.map_err(DownloadError::Store)?;
    let mut file = tokio::fs::File::create(path)
        .await
        .map_err(DownloadError::Local)?;
    tokio::io::copy(&mut reader, &mut file).await.map_err(|e| {
        // A broken stream is the store's (retryable) failure, not the disk's.
        DownloadError::Store(StoreError::Other {
            op: "GetObject",
            uri: uri.clone(),
            message: e.to_string(),
            retryable: true,
        })
    })?;
    use tokio::io::AsyncWriteExt;
    file.flush().await.map_err(DownloadError::Local)?;
    Ok(meta.etag)
}

/// Parses a scheduled compaction payload: `{"compact": {}}` or
/// `{"compact": {"day": "YYYY-MM-DD", "table": "...", "dry_run": false}}`. `None` when the
/// payload is not a compaction request (an object event).
pub fn parse_payload(payload: &serde_json::Value) -> Option<Result<(Selection, bool), String>> {
    let c = payload.as_object()?.get("compact")?;
    let Some(obj) = c.as_object() else {
        return Some(Err("\"compact\" must be an object".into()));
    };
    let mut sel = Selection::default();
    let mut dry_run = false;
    for (k, v) in obj {
        match (k.as_str(), v) {
            ("day", serde_json::Value::String(s)) => match NaiveDate::parse_from_str(s, "%Y-%m-%d")
            {
                Ok(d) => sel.day = Some(d),
                Err(_) => return Some(Err(format!("compact.day {s:?} is not YYYY-MM-DD"))),
            },
            ("table", serde_json::Value::String(s)) if !s.is_empty() => sel.table = Some(s.clone()),
            ("dry_run", serde_json::Value::Bool(b)) => dry_run = *b,
            (_, serde_json::Value::Null) => {}
            (k, v) => return Some(Err(format!("compact.{k} = {v} is not understood"))),
        }
    }
    Some(Ok((sel, dry_run)))
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn a_day_larger_than_the_local_disk_fails_naming_the_sizes() {
        let dir = Path::new("/tmp/x");
        assert!(local_disk_fits(1 << 30, 3 << 30, dir).is_ok());
        let err = local_disk_fits(3 << 30, 4 << 30, dir).unwrap_err();
        assert!(
            err.starts_with("the table-day's parts hold 3221225472 bytes; compacting it needs about 6509559808 bytes"),
            "{err}"
        );
        assert!(
            err.contains("but 4294967296 are free in /tmp/x: raise the compaction function's ephemeral storage"),
            "{err}"
        );
    }

    #[test]
    fn compaction_payloads_are_told_apart_from_object_events() {
        assert_eq!(
            parse_payload(&json!({"compact": {}})).unwrap().unwrap(),
            (Selection::default(), false)
        );
        let (sel, dry) = parse_payload(
            &json!({"compact": {"day": "2026-11-29", "table": "t", "dry_run": true}}),
        )
        .unwrap()
        .unwrap();
        assert_eq!(sel.day, NaiveDate::from_ymd_opt(2026, 11, 29));
        assert_eq!(sel.table.as_deref(), Some("t"));
        assert!(dry);
        assert!(
            parse_payload(&json!({"compact": {"day": "29/11/2026"}}))
                .unwrap()
                .is_err()
        );
        assert!(
            parse_payload(&json!({"compact": {"bogus": 1}}))
                .unwrap()
                .is_err()
        );
        assert!(parse_payload(&json!({"Records": [{"s3": {}}]})).is_none());
        assert!(parse_payload(&json!({"detail-type": "Object Created", "detail": {}})).is_none());
    }
}
