//! The Lambda edge: an invocation (direct S3 notification, SQS batch, or EventBridge event)
//! names Currents objects; each is read, converted and written through an [`ObjectStore`],
//! and the outcome is mapped to Lambda's retry semantics. Unreadable objects go to quarantine
//! and are acknowledged (never retried forever); storage errors are retried (the SQS message
//! is listed in `batchItemFailures`, other shapes fail the invocation). Every invocation that
//! touched an object writes one run report and emits EMF metrics.

use std::collections::BTreeMap;
use std::sync::Arc;

use bridge_shared::trigger::{ObjectRef, TriggerShape, parse_invocation};
use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use serde_json::{Value, json};
use tracing::{info, warn};

use crate::config::Config;
use crate::convert::{ConvertOptions, Converted, convert};
use crate::key;
use crate::quarantine::{self, Keep};
use crate::registry::Registry;
use crate::report::{ObjectResult, Outcome, RunReport};

/// Whether an object is ours to process.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Not ours; the reason is logged.
    Ignore(String),
    /// Process it.
    Process,
}

/// Decides whether an object starts a conversion (pure).
pub fn decide(cfg: &Config, uri: &S3Uri) -> Decision {
    if uri.key.ends_with('/') {
        return Decision::Ignore("folder placeholder".into());
    }
    if cfg.is_own_output(&uri.bucket, &uri.key) {
        return Decision::Ignore("object is one of this function's outputs".into());
    }
    if !uri.key.starts_with(&cfg.currents_prefix) {
        return Decision::Ignore(format!(
            "object is outside CURRENTS_PREFIX {:?}",
            cfg.currents_prefix
        ));
    }
    Decision::Process
}

/// An invocation that must be retried as a whole (non-SQS shapes).
#[derive(Debug, thiserror::Error)]
#[error("retry: {0}")]
pub struct RetryInvocation(pub String);

impl From<RetryInvocation> for lambda_runtime::Diagnostic {
    fn from(e: RetryInvocation) -> Self {
        lambda_runtime::Diagnostic {
            error_type: "RetryInvocation".into(),
            error_message: e.to_string(),
        }
    }
}

/// The function's handler: configuration, store and registry, built once per container.
pub struct Handler {
    cfg: Config,
    store: Arc<dyn ObjectStore>,
    registry: Arc<Registry>,
    opts: ConvertOptions,
}

impl Handler {
    /// Builds the handler.
    pub fn new(cfg: Config, store: Arc<dyn ObjectStore>, registry: Arc<Registry>) -> Self {
        Self {
            cfg,
            store,
            registry,
            opts: ConvertOptions::default(),
        }
    }

    /// Replaces the conversion options (size guards, batch size).
    pub fn with_options(mut self, opts: ConvertOptions) -> Self {
        self.opts = opts;
        self
    }

    /// The configuration.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// Handles one invocation payload. SQS: `{"batchItemFailures": [...], "results": [...]}`
    /// listing messages whose objects hit a retryable error. Other shapes: `{"results": [...]}`,
    /// or `Err` when an object must be retried (Lambda retries the invocation).
    pub async fn handle(
        &self,
        payload: &Value,
        request_id: &str,
    ) -> Result<Value, RetryInvocation> {
        self.handle_invocation(payload, request_id, None).await
    }

    /// [`Handler::handle`], knowing the invocation's deadline. A scheduled compaction payload
    /// (`{"compact": {...}}`, see [`crate::compact::parse_payload`]) runs a compaction;
    /// anything else names Currents objects.
    pub async fn handle_invocation(
        &self,
        payload: &Value,
        request_id: &str,
        deadline: Option<std::time::Instant>,
    ) -> Result<Value, RetryInvocation> {
        if let Some(request) = crate::compact::parse_payload(payload) {
            return self.handle_compact(request, request_id, deadline).await;
        }
        let started = chrono::Utc::now();
        let invocation = match parse_invocation(payload) {
            Ok(i) => i,
            Err(e) => {
                // A payload we cannot read will not become readable: acknowledge it.
                warn!(error = %e, "Ignoring an invocation payload that names no S3 object.");
                return Ok(json!({"ignored": e.to_string()}));
            }
        };
        let mut failures = Vec::new();
        let mut results: Vec<ObjectResult> = Vec::new();
        let mut report_bucket: Option<String> = None;
        let mut retry_reason = None;
        for item in &invocation.items {
            let objects = match &item.objects {
                Ok(o) => o,
                Err(e) => {
                    warn!(message_id = ?item.message_id, error = %e, "Message names no S3 object; acknowledged.");
                    results.push(
                        ObjectResult::new(
                            format!("message:{}", item.message_id.as_deref().unwrap_or("-")),
                            Outcome::Ignored,
                        )
                        .with_reason(e.to_string()),
                    );
                    continue;
                }
            };
            let mut retry = false;
            for obj in objects {
                let r = self.process(obj, false).await;
                if r.outcome != Outcome::Ignored && report_bucket.is_none() {
                    report_bucket = Some(self.cfg.output_bucket(&obj.uri.bucket).to_string());
                }
                if r.outcome == Outcome::Retry {
                    retry = true;
                    retry_reason = r.reason.clone();
                }
                results.push(r);
            }
            if retry && let (TriggerShape::Sqs, Some(id)) = (&invocation.shape, &item.message_id) {
                failures.push(json!({"itemIdentifier": id}));
            }
        }
        let report = RunReport::new(request_id, started, chrono::Utc::now(), results);
        self.emit_metrics(&report);
        if let Some(bucket) = report_bucket
            && let Err(e) = self.write_report(&bucket, &report).await
        {
            warn!(error = %e, "Could not write the run report.");
        }
        let results_json = serde_json::to_value(&report.objects).unwrap_or(Value::Null);
        match invocation.shape {
            TriggerShape::Sqs => {
                Ok(json!({"batchItemFailures": failures, "results": results_json}))
            }
            _ => match retry_reason {
                Some(reason) => Err(RetryInvocation(reason)),
                None => Ok(json!({"results": results_json})),
            },
        }
    }

    async fn handle_compact(
        &self,
        request: Result<(crate::compact::Selection, bool), String>,
        request_id: &str,
        deadline: Option<std::time::Instant>,
    ) -> Result<Value, RetryInvocation> {
        let (selection, dry_run) = match request {
            Ok(r) => r,
            Err(e) => {
                // A malformed schedule payload will not get better by retrying.
                tracing::error!(error = %e, "Compaction payload refused.");
                return Ok(json!({"compact": {"error": e}}));
            }
        };
        let Some(bucket) = self.cfg.tables_bucket.clone() else {
            tracing::error!("Compaction needs TABLES_BUCKET.");
            return Ok(json!({"compact": {"error": "compaction needs TABLES_BUCKET"}}));
        };
        let compactor = crate::compact::Compactor::new(
            self.cfg.clone(),
            self.store.clone(),
            self.registry.clone(),
        );
        let report = crate::compact::job::run_and_report(
            &compactor,
            &self.cfg,
            self.store.as_ref(),
            &bucket,
            crate::compact::CompactRequest {
                selection,
                dry_run,
                today: chrono::Utc::now().date_naive(),
                deadline,
                owner: request_id.to_string(),
            },
            request_id,
        )
        .await
        .map_err(|e| RetryInvocation(e.to_string()))?;
        let summary = json!({"compact": &report.totals});
        match report
            .table_days
            .iter()
            .find(|d| d.outcome == crate::compact::DayOutcome::Failed && d.retryable)
        {
            Some(d) => Err(RetryInvocation(format!(
                "compaction of {}/{} failed: {}",
                d.table,
                d.day,
                d.reason.as_deref().unwrap_or("-")
            ))),
            None => Ok(summary),
        }
    }

    /// Processes one object named by a trigger (or the CLI): decide, read, convert, write.
    pub async fn process(&self, obj: &ObjectRef, dry_run: bool) -> ObjectResult {
        let uri = &obj.uri;
        if let Decision::Ignore(reason) = decide(&self.cfg, uri) {
            info!(object = %uri, reason = %reason, "Object ignored.");
            return ObjectResult::new(uri.to_string(), Outcome::Ignored).with_reason(reason);
        }
        let out_bucket = self.cfg.output_bucket(&uri.bucket).to_string();
        if let Some(size) = obj.size.and_then(|s| u64::try_from(s).ok())
            && size > self.cfg.max_object_bytes
        {
            return self
                .quarantined(
                    uri,
                    &out_bucket,
                    Keep::Copy,
                    Rejection::new("size", &self.too_large(size), None),
                    dry_run,
                )
                .await;
        }
        let body = match self.read_object(uri, obj.size).await {
            Ok(body) => body,
            Err(StoreError::NotFound { .. }) => {
                info!(object = %uri, "Object no longer exists; nothing to do.");
                return ObjectResult::new(uri.to_string(), Outcome::Ignored)
                    .with_reason("object no longer exists");
            }
            Err(e) => {
                warn!(object = %uri, error = %e, "Reading the object failed; it will be retried.");
                return ObjectResult::new(uri.to_string(), Outcome::Retry)
                    .with_reason(e.to_string());
            }
        };
        if body.len() as u64 > self.cfg.max_object_bytes {
            return self
                .quarantined(
                    uri,
                    &out_bucket,
                    Keep::Copy,
                    Rejection::new(
                        "size",
                        &format!(
                            "object is larger than MAX_OBJECT_BYTES {} (reading stopped there)",
                            self.cfg.max_object_bytes
                        ),
                        None,
                    ),
                    dry_run,
                )
                .await;
        }
        self.process_bytes(uri, body, &out_bucket, Keep::Copy, dry_run)
            .await
    }

    /// Reads an object into one buffer sized from its length, so a large object is held
    /// once (collecting the SDK's chunks and then joining them would hold it twice), and
    /// never past `MAX_OBJECT_BYTES` + 1 bytes whatever the object turns out to be.
    async fn read_object(&self, uri: &S3Uri, size: Option<i64>) -> Result<Bytes, StoreError> {
        use tokio::io::AsyncReadExt as _;
        let (meta, reader) = self.store.get_reader(uri).await?;
        let cap = self.cfg.max_object_bytes.saturating_add(1);
        let expected = size
            .and_then(|s| u64::try_from(s).ok())
            .unwrap_or(meta.size)
            .max(meta.size)
            .min(cap);
        let mut buf = Vec::with_capacity(usize::try_from(expected).unwrap_or(0));
        reader
            .take(cap)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| StoreError::Other {
                op: "GetObject",
                uri: uri.clone(),
                message: e.to_string(),
                retryable: true,
            })?;
        Ok(Bytes::from(buf))
    }

    fn too_large(&self, size: u64) -> String {
        format!(
            "object is {size} bytes, over MAX_OBJECT_BYTES {}",
            self.cfg.max_object_bytes
        )
    }

    /// Converts bytes already in memory whose source is `source` and writes the part (or the
    /// quarantine) into `out_bucket`. `keep` says how a quarantined source is preserved
    /// (server-side copy for S3, upload for local files).
    pub async fn process_bytes(
        &self,
        source: &S3Uri,
        body: Bytes,
        out_bucket: &str,
        keep: Keep,
        dry_run: bool,
    ) -> ObjectResult {
        let (delivery, mut converted) = match self
            .convert_object(source, &body, out_bucket, keep, dry_run)
            .await
        {
            Ok(c) => c,
            Err(result) => return result,
        };
        let part_uri = S3Uri::new(out_bucket, converted.location.key(&self.cfg.tables_prefix));
        let mut result = written_result(source, &converted, &part_uri);
        if dry_run {
            result.outcome = Outcome::DryRun;
            return result;
        }
        let feed = converted.feed.take().filter(|f| !f.is_empty());
        let Some(part) = converted.parquet.take() else {
            return self.clear_earlier_part(source, &part_uri, result).await;
        };
        // The input is no longer needed: let it go before the part is read back for upload.
        drop(body);
        let parquet = match tokio::task::spawn_blocking(move || part.into_bytes()).await {
            Ok(Ok(b)) => b,
            Ok(Err(e)) => {
                warn!(object = %source, error = %e, "Reading the spooled part failed; it will be retried.");
                return not_written(result, format!("internal error at encode: {e}"));
            }
            Err(join) => {
                return not_written(result, format!("reading the spooled part failed: {join}"));
            }
        };
        if let Err(e) = self.put_part(&part_uri, parquet, &converted).await {
            warn!(object = %source, part = %part_uri, error = %e, "Writing the part failed; it will be retried.");
            return not_written(result, e.to_string());
        }
        if let Some(feed) = feed {
            let event_type = converted.event_type.clone();
            result = self
                .write_feed(source, &event_type, &delivery, feed, result)
                .await;
            if result.outcome == Outcome::Retry {
                return result;
            }
        }
        result.delivery_lag_s = Some(delivery.lag_seconds(chrono::Utc::now()));
        info!(object = %source, part = %part_uri, events_in = result.events_in,
            rows = result.rows_written, duplicates = result.duplicates_dropped,
            "Wrote table part.");
        result
    }

    /// Parses the key and converts the bytes off the async threads. An input that cannot be
    /// converted is quarantined (kept as `keep` says); an internal error or a failed task is
    /// retried. Returns the object's delivery hour with what it converted to.
    async fn convert_object(
        &self,
        source: &S3Uri,
        body: &Bytes,
        out_bucket: &str,
        keep: Keep,
        dry_run: bool,
    ) -> Result<(crate::key::DeliveryHour, Converted), ObjectResult> {
        let keep = match keep {
            Keep::Upload(_) => Keep::Upload(body.clone()),
            other => other,
        };
        let parsed = match key::parse(&source.key) {
            Ok(k) => k,
            Err(e) => {
                return Err(self
                    .quarantined(
                        source,
                        out_bucket,
                        keep,
                        Rejection::new("key", &e.to_string(), None),
                        dry_run,
                    )
                    .await);
            }
        };
        let delivery = parsed.delivery;
        let registry = self.registry.clone();
        let opts = self.opts.clone();
        let source_key = source.key.clone();
        let task_body = body.clone();
        let task_key = parsed.clone();
        let converted = tokio::task::spawn_blocking(move || {
            convert(&task_body, &source_key, &task_key, &registry, &opts)
        })
        .await;
        match converted {
            Ok(Ok(c)) => Ok((delivery, c)),
            Ok(Err(e)) if e.is_internal() => {
                warn!(object = %source, step = e.step(), error = %e,
                    "Internal error converting the object (not the input's fault); it will be retried.");
                Err(ObjectResult::new(source.to_string(), Outcome::Retry)
                    .with_reason(format!("internal error at {}: {e}", e.step())))
            }
            Ok(Err(e)) => Err(self
                .quarantined(
                    source,
                    out_bucket,
                    keep,
                    Rejection::new(e.step(), &e.to_string(), Some(parsed.event_type)),
                    dry_run,
                )
                .await),
            Err(join) => Err(ObjectResult::new(source.to_string(), Outcome::Retry)
                .with_reason(format!("conversion task failed: {join}"))),
        }
    }

    /// A replay of an object that now yields no rows: the part an earlier run wrote for it
    /// (same deterministic name) must not keep serving the old rows.
    async fn clear_earlier_part(
        &self,
        source: &S3Uri,
        part_uri: &S3Uri,
        mut result: ObjectResult,
    ) -> ObjectResult {
        result.outcome = Outcome::Empty;
        result.part = None;
        result.rows_written = 0;
        if let Err(e) = self.store.delete(part_uri).await
            && !matches!(e, StoreError::NotFound { .. })
        {
            warn!(object = %source, part = %part_uri, error = %e,
                "Removing the earlier part of an object that now has no rows failed; it will be retried.");
            result.outcome = Outcome::Retry;
            result.reason = Some(format!("removing earlier part {part_uri}: {e}"));
        }
        result
    }

    /// Uploads the part, tagged with its table and the registry version it was written with.
    async fn put_part(
        &self,
        part_uri: &S3Uri,
        parquet: Vec<u8>,
        converted: &Converted,
    ) -> Result<(), StoreError> {
        let mut metadata = BTreeMap::new();
        metadata.insert(
            "currents-table".to_string(),
            converted.location.table.clone(),
        );
        metadata.insert(
            "currents-registry-version".to_string(),
            converted.registry_version.to_string(),
        );
        self.store
            .put(part_uri, Bytes::from(parquet), PutCondition::None, metadata)
            .await
            .map(|_| ())
    }

    /// Writes the profile-change feed object of `source` for braze-sync (when
    /// `PROFILE_FEED_BUCKET` is set). Its key derives from the source, so a replay rewrites
    /// the same object. A failed write retries the whole object (its part is rewritten in
    /// place).
    async fn write_feed(
        &self,
        source: &S3Uri,
        event_type: &str,
        delivery: &crate::key::DeliveryHour,
        feed: crate::profile_feed::FeedCollector,
        mut result: ObjectResult,
    ) -> ObjectResult {
        let Some(bucket) = &self.cfg.profile_feed_bucket else {
            return result;
        };
        let hour = crate::profile_feed::hour_text(delivery);
        let uri = S3Uri::new(
            bucket,
            bridge_shared::profile_feed::feed_key(
                &self.cfg.profile_feed_prefix,
                &hour,
                event_type,
                &source.key,
            ),
        );
        let changes = feed.len() as u64;
        let object = feed.finish(&source.to_string(), event_type, &hour);
        let body = serde_json::to_vec(&object).unwrap_or_default();
        match self
            .store
            .put(&uri, Bytes::from(body), PutCondition::None, BTreeMap::new())
            .await
        {
            Ok(_) => {
                info!(object = %source, feed = %uri, changes, "Wrote profile-change feed.");
                result.profile_feed = Some(uri.to_string());
                result.profile_changes = Some(changes);
                result
            }
            Err(e) => {
                warn!(object = %source, feed = %uri, error = %e, "Writing the profile-change feed failed; it will be retried.");
                result.outcome = Outcome::Retry;
                result.reason = Some(format!("writing profile feed {uri}: {e}"));
                result
            }
        }
    }

    /// Quarantines `source` into `out_bucket` (kept as `keep` says) for `why`; in a dry run
    /// only says it would. A failed quarantine is retried.
    async fn quarantined(
        &self,
        source: &S3Uri,
        out_bucket: &str,
        keep: Keep,
        why: Rejection<'_>,
        dry_run: bool,
    ) -> ObjectResult {
        let Rejection {
            step,
            reason,
            event_type,
        } = why;
        if dry_run {
            warn!(object = %source, step, reason, "Would quarantine object (dry run).");
            return ObjectResult {
                event_type,
                step: Some(step),
                ..ObjectResult::new(source.to_string(), Outcome::Quarantined).with_reason(reason)
            };
        }
        warn!(object = %source, step, reason, "Quarantining object.");
        match quarantine::quarantine(
            self.store.as_ref(),
            out_bucket,
            &self.cfg.quarantine_prefix,
            source,
            keep,
            step,
            reason,
        )
        .await
        {
            Ok(reason_uri) => ObjectResult {
                event_type,
                step: Some(step),
                quarantine: Some(reason_uri.to_string()),
                ..ObjectResult::new(source.to_string(), Outcome::Quarantined).with_reason(reason)
            },
            Err(e) => {
                warn!(object = %source, error = %e, "Quarantining failed; it will be retried.");
                ObjectResult::new(source.to_string(), Outcome::Retry)
                    .with_reason(format!("quarantine failed: {e} (after {step}: {reason})"))
            }
        }
    }

    /// Writes a run report into `bucket`; returns its address.
    pub async fn write_report(
        &self,
        bucket: &str,
        report: &RunReport,
    ) -> Result<S3Uri, StoreError> {
        let uri = S3Uri::new(bucket, report.key(&self.cfg.reports_prefix));
        let body = serde_json::to_vec_pretty(report).unwrap_or_default();
        self.store
            .put(&uri, Bytes::from(body), PutCondition::None, BTreeMap::new())
            .await?;
        info!(report = %uri, events_in = report.totals.events_in,
            rows = report.totals.rows_written, quarantined = report.totals.quarantined,
            "Wrote run report.");
        Ok(uri)
    }

    /// Prints the run's EMF metric lines to stdout.
    pub fn emit_metrics(&self, report: &RunReport) {
        for line in report.metric_lines(
            &self.cfg.metrics_namespace,
            chrono::Utc::now().timestamp_millis(),
        ) {
            println!("{line}");
        }
    }
}

/// The result of a converted object, as if its part `part_uri` were written; warns about an
/// unregistered event type and fields the registry does not know.
fn written_result(source: &S3Uri, converted: &Converted, part_uri: &S3Uri) -> ObjectResult {
    if converted.unregistered {
        warn!(object = %source, event_type = %converted.event_type,
            "Event type is not in the registry; events go to the generic table. Add it with currents-registry.");
    }
    if !converted.stats.extra_fields.is_empty() {
        warn!(object = %source, table = %converted.location.table,
            fields = %converted.stats.extra_fields.join(","),
            "Fields the registry does not know were kept in the extra column; bump the table with currents-registry --bump.");
    }
    ObjectResult {
        event_type: Some(converted.event_type.clone()),
        table: Some(converted.location.table.clone()),
        part: Some(part_uri.to_string()),
        events_in: converted.stats.events_in,
        rows_written: converted.stats.rows_out,
        duplicates_dropped: converted.stats.duplicates_dropped,
        extra_fields: converted.stats.extra_fields.clone(),
        unregistered: converted.unregistered,
        codec: Some(converted.codec),
        ..ObjectResult::new(source.to_string(), Outcome::Written)
    }
}

/// Why an object is quarantined: the step that refused it, the reason, and its event type
/// when the key named one.
struct Rejection<'a> {
    step: &'static str,
    reason: &'a str,
    event_type: Option<String>,
}

impl<'a> Rejection<'a> {
    fn new(step: &'static str, reason: &'a str, event_type: Option<String>) -> Self {
        Self {
            step,
            reason,
            event_type,
        }
    }
}

/// The part was not written: the object is retried for `reason`.
fn not_written(result: ObjectResult, reason: String) -> ObjectResult {
    ObjectResult {
        outcome: Outcome::Retry,
        reason: Some(reason),
        part: None,
        rows_written: 0,
        ..result
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn objects_outside_the_input_prefix_or_our_outputs_are_ignored() {
        let cfg = Config::default();
        assert_eq!(
            decide(
                &cfg,
                &S3Uri::new("b", "currents/event_type=a/date=2026-01-01-00/f.avro")
            ),
            Decision::Process
        );
        assert!(matches!(
            decide(&cfg, &S3Uri::new("b", "other/f.avro")),
            Decision::Ignore(_)
        ));
        assert!(matches!(
            decide(
                &cfg,
                &S3Uri::new("b", "tables/t/t_2026-01-01.parquet/part-1.parquet")
            ),
            Decision::Ignore(_)
        ));
        assert!(matches!(
            decide(&cfg, &S3Uri::new("b", "currents/")),
            Decision::Ignore(_)
        ));
    }
}
