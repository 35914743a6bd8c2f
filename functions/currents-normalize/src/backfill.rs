//! Backfill: every Currents object already under a prefix (any key layout), normalized as if
//! it had just arrived, then the days it touched compacted.
//!
//! Part names derive from the source key, so an object whose part exists, or whose part was
//! already absorbed by compaction (listed in the day's compaction manifest), or that was
//! already quarantined, is skipped: a backfill can be interrupted and rerun at any point and
//! only does what is left. [`plan`] decides that from listings (pure); [`Backfill`] runs it
//! with bounded concurrency and a progress bar on a terminal.

use std::collections::{BTreeMap, BTreeSet};
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use bridge_shared::object_store::ObjectMeta;
use bridge_shared::trigger::ObjectRef;
use bridge_shared::{ObjectStore, S3Uri, StoreError};
use chrono::NaiveDate;
use futures::StreamExt;
use serde::Serialize;

use crate::compact::plan::{TableDay, parse_part_key};
use crate::compact::{CompactRequest, Compactor, DayResult};
use crate::config::Config;
use crate::handler::Handler;
use crate::key;
use crate::partition::{PartId, PartLocation};
use crate::registry::Registry;
use crate::report::{ObjectResult, Outcome};

/// What to backfill.
#[derive(Debug, Clone)]
pub struct BackfillRequest {
    /// Input bucket.
    pub bucket: String,
    /// Prefix listed (every Currents object below it).
    pub prefix: String,
    /// First delivery day, inclusive.
    pub from: Option<NaiveDate>,
    /// Last delivery day, inclusive.
    pub to: Option<NaiveDate>,
    /// Objects converted at once.
    pub concurrency: usize,
    /// Plan and convert, write nothing.
    pub dry_run: bool,
    /// Skip compacting the touched days.
    pub no_compact: bool,
    /// Show a progress bar (only when stderr is a terminal).
    pub progress: bool,
}

/// One object to convert.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Todo {
    /// The object.
    pub uri: S3Uri,
    /// Its size.
    pub size: u64,
    /// The table-day its part lands in.
    pub table_day: TableDay,
}

/// Why an object is not converted again.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Skip {
    /// Its part exists.
    PartExists,
    /// Compaction absorbed its part (the day's manifest lists it).
    Compacted,
    /// It was quarantined before.
    Quarantined,
}

/// The listing, sorted into work.
#[derive(Debug, Default)]
pub struct Plan {
    /// To convert.
    pub todo: Vec<Todo>,
    /// Skipped, with why.
    pub skipped: Vec<(String, Skip)>,
    /// Keys below the prefix that are not Currents objects (or outside the day range).
    pub not_selected: u64,
}

/// What is already in the output bucket.
#[derive(Debug, Default)]
pub struct Done {
    /// Part keys.
    pub parts: BTreeSet<String>,
    /// Quarantined source keys.
    pub quarantined: BTreeSet<String>,
    /// Source part ids absorbed by compaction, per table-day.
    pub compacted: BTreeMap<TableDay, BTreeSet<String>>,
}

/// Sorts a listing of the input prefix into work (pure).
pub fn plan(
    listing: &[ObjectMeta],
    bucket: &str,
    cfg: &Config,
    registry: &Registry,
    from: Option<NaiveDate>,
    to: Option<NaiveDate>,
    done: &Done,
) -> Plan {
    let mut out = Plan::default();
    for o in listing {
        let uri = S3Uri::new(bucket, &o.key);
        if !matches!(
            crate::handler::decide(cfg, &uri),
            crate::handler::Decision::Process
        ) {
            out.not_selected += 1;
            continue;
        }
        let Ok(k) = key::parse(&o.key) else {
            out.not_selected += 1;
            continue;
        };
        let day = k.delivery.day;
        if from.is_some_and(|f| day < f) || to.is_some_and(|t| day > t) {
            out.not_selected += 1;
            continue;
        }
        let table = match registry.get(&k.event_type) {
            Some(t) => t.table.clone(),
            None => registry.other_events().table.clone(),
        };
        let id = PartId::for_source(&o.key);
        let loc = PartLocation {
            table: table.clone(),
            day,
            id: id.clone(),
        };
        let table_day = TableDay { day, table };
        let skip = if done.parts.contains(&loc.key(&cfg.tables_prefix)) {
            Some(Skip::PartExists)
        } else if done
            .compacted
            .get(&table_day)
            .is_some_and(|s| s.contains(id.as_str()))
        {
            Some(Skip::Compacted)
        } else if done.quarantined.contains(&o.key) {
            Some(Skip::Quarantined)
        } else {
            None
        };
        match skip {
            Some(s) => out.skipped.push((uri.to_string(), s)),
            None => out.todo.push(Todo {
                uri,
                size: o.size,
                table_day,
            }),
        }
    }
    out
}

/// The outcome of a backfill.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BackfillSummary {
    /// Currents objects found in the day range.
    pub objects: u64,
    /// Converted (a part written, or nothing to write).
    pub normalized: u64,
    /// Skipped: already done.
    pub skipped: u64,
    /// Quarantined now.
    pub quarantined: u64,
    /// Failed with a retryable error (rerun the backfill).
    pub failed: u64,
    /// Events read.
    pub events: u64,
    /// Rows written.
    pub rows: u64,
    /// Bytes read.
    pub bytes: u64,
    /// Table-days compacted afterwards.
    pub days_compacted: u64,
    /// Table-days whose compaction failed.
    pub days_failed: u64,
    /// Nothing was written.
    pub dry_run: bool,
    /// Objects that failed or were quarantined, with the reason.
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<ObjectResult>,
}

/// Runs backfills.
pub struct Backfill {
    cfg: Config,
    store: Arc<dyn ObjectStore>,
    registry: Arc<Registry>,
    handler: Arc<Handler>,
}

impl Backfill {
    /// Builds a backfill over `store`.
    pub fn new(cfg: Config, store: Arc<dyn ObjectStore>, registry: Arc<Registry>) -> Self {
        let handler = Arc::new(Handler::new(cfg.clone(), store.clone(), registry.clone()));
        Self {
            cfg,
            store,
            registry,
            handler,
        }
    }

    /// What is already done in `out_bucket`, for the table-days of `listing`.
    async fn done(&self, out_bucket: &str) -> Result<Done, StoreError> {
        let mut done = Done::default();
        let parts = self.store.list(out_bucket, &self.cfg.tables_prefix).await?;
        let mut compacted_days = BTreeSet::new();
        for p in parts {
            if let Some((td, compacted)) = parse_part_key(&self.cfg.tables_prefix, &p.key) {
                if compacted {
                    compacted_days.insert(td);
                }
                done.parts.insert(p.key);
            }
        }
        let compactor = Compactor::new(self.cfg.clone(), self.store.clone(), self.registry.clone());
        for td in compacted_days {
            if let Some(m) = compactor.manifest(out_bucket, &td).await? {
                done.compacted.insert(td, m.sources);
            }
        }
        for q in self
            .store
            .list(out_bucket, &self.cfg.quarantine_prefix)
            .await?
        {
            if let Some(source) = q
                .key
                .strip_suffix(".reason.json")
                .and_then(|k| k.strip_prefix(&self.cfg.quarantine_prefix))
            {
                done.quarantined.insert(source.to_string());
            }
        }
        Ok(done)
    }

    /// Runs a backfill. `Err` only when a listing fails.
    pub async fn run(&self, req: &BackfillRequest) -> Result<BackfillSummary, StoreError> {
        let out_bucket = self.cfg.output_bucket(&req.bucket).to_string();
        let listing = self.store.list(&req.bucket, &req.prefix).await?;
        let done = self.done(&out_bucket).await?;
        let plan = plan(
            &listing,
            &req.bucket,
            &self.cfg,
            &self.registry,
            req.from,
            req.to,
            &done,
        );
        let mut summary = BackfillSummary {
            objects: (plan.todo.len() + plan.skipped.len()) as u64,
            skipped: plan.skipped.len() as u64,
            dry_run: req.dry_run,
            ..Default::default()
        };
        tracing::info!(bucket = %req.bucket, prefix = %req.prefix, todo = plan.todo.len(),
            skipped = plan.skipped.len(), "Backfill starts.");
        let bar = progress_bar(&plan.todo, req.progress);
        let mut touched = BTreeSet::new();
        let mut results = futures::stream::iter(plan.todo.iter().cloned())
            .map(|t| {
                let handler = self.handler.clone();
                let dry_run = req.dry_run;
                async move {
                    let obj = ObjectRef {
                        size: i64::try_from(t.size).ok(),
                        ..ObjectRef::named(t.uri.clone(), "backfill")
                    };
                    (t, handler.process(&obj, dry_run).await)
                }
            })
            .buffer_unordered(req.concurrency.max(1));
        let (mut objects_done, total) = (0u64, plan.todo.len() as u64);
        while let Some((t, r)) = results.next().await {
            objects_done += 1;
            summary.bytes += t.size;
            summary.events += r.events_in;
            summary.rows += r.rows_written;
            match r.outcome {
                Outcome::Written | Outcome::Empty | Outcome::DryRun => {
                    summary.normalized += 1;
                    if r.outcome == Outcome::Written {
                        touched.insert(t.table_day.clone());
                    }
                }
                Outcome::Ignored => summary.skipped += 1,
                Outcome::Quarantined => {
                    summary.quarantined += 1;
                    summary.problems.push(r);
                }
                Outcome::Retry => {
                    summary.failed += 1;
                    summary.problems.push(r);
                }
            }
            bar.inc(t.size);
            bar.set_message(format!(
                "{objects_done}/{total} objects, {} events",
                summary.events
            ));
        }
        bar.finish_and_clear();
        if !req.dry_run && !req.no_compact && !touched.is_empty() {
            let days = self.compact(&out_bucket, &touched).await?;
            for d in &days {
                match d.outcome {
                    crate::compact::DayOutcome::Compacted => summary.days_compacted += 1,
                    crate::compact::DayOutcome::Failed => summary.days_failed += 1,
                    _ => {}
                }
            }
        }
        Ok(summary)
    }

    async fn compact(
        &self,
        out_bucket: &str,
        touched: &BTreeSet<TableDay>,
    ) -> Result<Vec<DayResult>, StoreError> {
        let started = chrono::Utc::now();
        let req = CompactRequest {
            selection: Default::default(),
            dry_run: false,
            today: started.date_naive(),
            deadline: None,
            owner: format!("backfill-{}", started.timestamp_millis()),
        };
        let compactor = Compactor::new(self.cfg.clone(), self.store.clone(), self.registry.clone());
        let days = compactor.run_selected(out_bucket, touched, &req).await?;
        let report = crate::compact::job::finish_report(
            &self.cfg,
            self.store.as_ref(),
            out_bucket,
            &req,
            &req.owner,
            started,
            days,
        )
        .await?;
        Ok(report.table_days)
    }
}

fn progress_bar(todo: &[Todo], wanted: bool) -> indicatif::ProgressBar {
    if !wanted || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bytes: u64 = todo.iter().map(|t| t.size).sum();
    let bar = indicatif::ProgressBar::new(bytes);
    if let Ok(style) = indicatif::ProgressStyle::with_template(
        "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} {msg} (ETA {eta})",
    ) {
        bar.set_style(style);
    }
    bar.enable_steady_tick(Duration::from_millis(200));
    bar
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    fn meta(key: &str) -> ObjectMeta {
        ObjectMeta {
            key: key.into(),
            size: 100,
            ..ObjectMeta::default()
        }
    }

    #[test]
    fn plan_skips_done_parts_compacted_sources_and_quarantined_objects() {
        let cfg = Config::default();
        let registry = Registry::builtin().unwrap();
        let keys = [
            "currents/x/event_type=users.messages.email.Send/date=2026-11-28-10/421/zone-a/a.avro",
            "currents/x/event_type=users.messages.email.Send/date=2026-11-29-10/version=7/prod/b.avro",
            "currents/event_type=users.messages.email.Send/date=2026-11-29-11/c.avro",
            "currents/x/event_type=users.future.Thing/date=2026-11-29-12/d.avro",
            "currents/x/event_type=users.messages.email.Send/date=2026-11-30-00/e.avro",
            "currents/notes.txt",
        ];
        let listing: Vec<ObjectMeta> = keys.iter().map(|k| meta(k)).collect();
        let mut done = Done::default();
        let loc = PartLocation {
            table: "users_messages_email_send".into(),
            day: NaiveDate::from_ymd_opt(2026, 11, 29).unwrap(),
            id: PartId::for_source(keys[1]),
        };
        done.parts.insert(loc.key("tables/"));
        done.compacted.insert(
            TableDay {
                day: loc.day,
                table: "users_messages_email_send".into(),
            },
            [PartId::for_source(keys[2]).as_str().to_string()].into(),
        );
        done.quarantined.insert(keys[0].to_string());
        let p = plan(
            &listing,
            "raw",
            &cfg,
            &registry,
            None,
            NaiveDate::from_ymd_opt(2026, 11, 29),
            &done,
        );
        let skips: Vec<Skip> = p.skipped.iter().map(|(_, s)| *s).collect();
        assert_eq!(
            skips,
            [Skip::Quarantined, Skip::PartExists, Skip::Compacted]
        );
        assert_eq!(p.todo.len(), 1);
        assert_eq!(p.todo[0].table_day.table, "currents_other_events");
        assert_eq!(p.not_selected, 2, "out of range and not a Currents key");
    }
}
