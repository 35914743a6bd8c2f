//! Backfill: every Currents object already under a prefix (any key layout), normalized as if
//! it had just arrived, then the days it touched compacted.
//!
//! Part names derive from the source key, so an object whose part exists, or whose part was
//! already absorbed by compaction (listed in the day's compaction manifest), or that was
//! already quarantined, is skipped: a backfill can be interrupted and rerun at any point and
//! only does what is left. [`plan`] decides that from listings (pure); [`Backfill`] runs it
//! with bounded concurrency and a progress bar on a terminal.
//!
//! Memory does not grow with the history: the input is listed a page at a time, in key order,
//! where one event type's objects of one delivery day are adjacent (`…/date=YYYY-MM-DD-HH/…`);
//! each such day (at most [`MAX_GROUP`] objects at a time) is planned against what its own
//! table-day already holds (that day's parts, its manifest when it has compacted parts, the
//! quarantine below that day's prefix), converted, and let go. Days outside `--from`/`--to`
//! are skipped by listing on after the range (`StartAfter`), not by reading them.

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
    /// Keys listed below the prefix that are not Currents objects (days outside the range are
    /// listed past, not read, so they are not counted).
    pub not_selected: u64,
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
    /// Objects that failed or were quarantined, with the reason (the first 1,000).
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

    /// What is already done in `out_bucket` for one day of input: `table_day`'s parts, the
    /// sources its compacted parts hold, and the quarantined objects below `input_prefix`.
    async fn done_for(
        &self,
        out_bucket: &str,
        table_day: &TableDay,
        input_prefix: &str,
    ) -> Result<Done, StoreError> {
        let mut done = Done::default();
        let folder = PartLocation {
            table: table_day.table.clone(),
            day: table_day.day,
            id: PartId::for_source(""),
        }
        .partition_folder(&self.cfg.tables_prefix);
        let mut compacted = false;
        for p in self.store.list(out_bucket, &folder).await? {
            if let Some((_, c)) = parse_part_key(&self.cfg.tables_prefix, &p.key) {
                compacted |= c;
                done.parts.insert(p.key);
            }
        }
        if compacted {
            let compactor =
                Compactor::new(self.cfg.clone(), self.store.clone(), self.registry.clone());
            if let Some(m) = compactor.manifest(out_bucket, table_day).await? {
                done.compacted.insert(table_day.clone(), m.sources);
            }
        }
        let quarantine = format!("{}{input_prefix}", self.cfg.quarantine_prefix);
        for q in self.store.list(out_bucket, &quarantine).await? {
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
        let mut run = Run {
            req,
            out_bucket: &out_bucket,
            summary: BackfillSummary {
                dry_run: req.dry_run,
                ..Default::default()
            },
            touched: BTreeSet::new(),
            bar: progress_bar(req.progress),
        };
        tracing::info!(bucket = %req.bucket, prefix = %req.prefix, "Backfill starts.");
        let mut group: Option<(DayPrefix, Vec<ObjectMeta>)> = None;
        let mut start_after: Option<String> = None;
        'listing: loop {
            let page = self
                .store
                .list_page(&req.bucket, &req.prefix, start_after.as_deref(), LIST_PAGE)
                .await?;
            let Some(last) = page.last() else { break };
            start_after = Some(last.key.clone());
            for o in page {
                let Some(dp) = day_prefix(&o.key) else {
                    run.summary.not_selected += 1;
                    continue;
                };
                if let Some(skip_to) = dp.skip_to(req.from, req.to) {
                    // Outside the range: list on after it instead of reading the rest.
                    start_after = Some(skip_to);
                    continue 'listing;
                }
                match &mut group {
                    Some((p, keys)) if *p == dp && keys.len() < MAX_GROUP => keys.push(o),
                    _ => {
                        if let Some((p, keys)) = group.replace((dp, vec![o])) {
                            self.day(&mut run, &p, &keys).await?;
                        }
                    }
                }
            }
        }
        if let Some((p, keys)) = group.take() {
            self.day(&mut run, &p, &keys).await?;
        }
        run.bar.finish_and_clear();
        let Run {
            mut summary,
            touched,
            ..
        } = run;
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

    /// Plans and converts one day of one event type's objects (`keys`, all below `prefix`).
    async fn day(
        &self,
        run: &mut Run<'_>,
        prefix: &DayPrefix,
        keys: &[ObjectMeta],
    ) -> Result<(), StoreError> {
        let req = run.req;
        let Some(first) = keys.first() else {
            return Ok(());
        };
        let table_day = match key::parse(&first.key) {
            Ok(k) => TableDay {
                day: k.delivery.day,
                table: match self.registry.get(&k.event_type) {
                    Some(t) => t.table.clone(),
                    None => self.registry.other_events().table.clone(),
                },
            },
            Err(_) => {
                run.summary.not_selected += keys.len() as u64;
                return Ok(());
            }
        };
        let done = self
            .done_for(run.out_bucket, &table_day, &prefix.prefix)
            .await?;
        let plan = plan(
            keys,
            &req.bucket,
            &self.cfg,
            &self.registry,
            req.from,
            req.to,
            &done,
        );
        let s = &mut run.summary;
        s.objects += (plan.todo.len() + plan.skipped.len()) as u64;
        s.skipped += plan.skipped.len() as u64;
        s.not_selected += plan.not_selected;
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
        while let Some((t, r)) = results.next().await {
            run.record(t, r);
        }
        Ok(())
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

/// Objects listed per page.
const LIST_PAGE: usize = 1000;

/// Most objects of one day planned and converted at once (a larger day goes in several).
pub const MAX_GROUP: usize = 10_000;

/// Where one event type's objects of one delivery day sit in the input: the key up to and
/// including `date=YYYY-MM-DD` (every hour of that day, and only those, below it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DayPrefix {
    /// The key's text up to and including the day.
    pub prefix: String,
    /// Where `date=` starts in it.
    date_at: usize,
    /// The day.
    pub day: NaiveDate,
}

impl DayPrefix {
    /// When `day` is outside `from..=to`: the key to list on after (the range's first day,
    /// or past every day, of this same event type's folder).
    pub fn skip_to(&self, from: Option<NaiveDate>, to: Option<NaiveDate>) -> Option<String> {
        let folder = &self.prefix[..self.date_at + "date=".len()];
        if let Some(f) = from
            && self.day < f
        {
            return Some(format!("{folder}{}", f.format("%Y-%m-%d")));
        }
        if let Some(t) = to
            && self.day > t
        {
            // `~` sorts after every digit: past this folder's last day.
            return Some(format!("{folder}~"));
        }
        None
    }
}

/// The day prefix of a Currents key (`…/date=YYYY-MM-DD-HH/…`), `None` for other keys.
pub fn day_prefix(key: &str) -> Option<DayPrefix> {
    let date_at = if key.starts_with("date=") {
        0
    } else {
        key.find("/date=")? + 1
    };
    let day_text = key.get(date_at + 5..date_at + 15)?;
    let day = NaiveDate::parse_from_str(day_text, "%Y-%m-%d").ok()?;
    Some(DayPrefix {
        prefix: key[..date_at + 15].to_string(),
        date_at,
        day,
    })
}

/// A backfill under way: what it has counted and which table-days it wrote to.
struct Run<'a> {
    req: &'a BackfillRequest,
    out_bucket: &'a str,
    summary: BackfillSummary,
    touched: BTreeSet<TableDay>,
    bar: indicatif::ProgressBar,
}

/// Objects whose problems the summary lists; the rest are counted only (their reasons are in
/// the quarantine and the logs).
const MAX_PROBLEMS_LISTED: usize = 1000;

impl Run<'_> {
    fn record(&mut self, t: Todo, r: ObjectResult) {
        let summary = &mut self.summary;
        summary.bytes += t.size;
        summary.events += r.events_in;
        summary.rows += r.rows_written;
        let problem = match r.outcome {
            Outcome::Written | Outcome::Empty | Outcome::DryRun => {
                summary.normalized += 1;
                if r.outcome == Outcome::Written {
                    self.touched.insert(t.table_day.clone());
                }
                false
            }
            Outcome::Ignored => {
                summary.skipped += 1;
                false
            }
            Outcome::Quarantined => {
                summary.quarantined += 1;
                true
            }
            Outcome::Retry => {
                summary.failed += 1;
                true
            }
        };
        if problem && summary.problems.len() < MAX_PROBLEMS_LISTED {
            summary.problems.push(r);
        }
        self.bar.inc(t.size);
        self.bar.set_message(format!(
            "{} objects, {} events",
            summary.normalized + summary.quarantined + summary.failed,
            summary.events
        ));
    }
}

fn progress_bar(wanted: bool) -> indicatif::ProgressBar {
    if !wanted || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = indicatif::ProgressBar::new_spinner();
    if let Ok(style) =
        indicatif::ProgressStyle::with_template("{spinner} [{elapsed_precise}] {bytes} {msg}")
    {
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
