//! Adoption: the first sync of a route whose values Braze already has (a team moving from
//! another sync or a CSV import). [`adopt`] records an export as confirmed **without sending
//! it**, so the next export sends only what changed since. With a verify sample it first
//! fetches that many random users of the export from Braze (`POST /users/export/ids`, 50
//! identifiers per call, paced under that endpoint's limit as the audit is) and refuses to
//! adopt, listing the differences, when more than `max_differ_share` of them differ (values
//! compared as the audit compares them, [`same_for_braze`]).
//!
//! Adoption holds the route lock (no sync of the route runs meanwhile), writes the state
//! range by range in bounded memory like a bounded run (the export diffed one hash range at a
//! time, what it records spilled by range and committed range by range; no checkpoints,
//! since nothing is sent: a killed adoption simply runs again; a format-1 state is adopted
//! in memory, its migration), and writes a report (`<REPORTS_PREFIX><route>/adopt-<time>.json`)
//! whether it adopts or refuses.

use std::sync::Arc;

use bridge_shared::{ObjectStore, S3Uri};
use serde::Serialize;
use serde_json::Value;
use tracing::info;

use crate::config::route::Route;
use crate::diff::bounded::{RangedSettings, StoreRanges, produce_ranged};
use crate::diff::export::{ProduceOptions, Stop, Summary, SyncError};
use crate::diff::in_memory::{open_s3_part, produce};
use crate::model::UserDelta;
use crate::ops::read_back::{
    EXPORT_IDS_PER_MINUTE, ReadBack, SampleSource, read_profiles, reservoir_sample, same_for_braze,
    user_label, write_report,
};
use crate::send::braze::{LookupError, UserLookup};
use crate::state::route_lock::{RouteLock, lock_uri};
use crate::state::spill::SpillDir;
use crate::state::store::record_spill::{RecordSpill, record_spill_bits};
use crate::state::store::{
    CommitStats, Head, LEGACY_HEAD_FORMAT, StateError, StateStore, Watermark,
};

/// Default largest share of sampled users that may differ from Braze.
pub const DEFAULT_MAX_DIFFER_SHARE: f64 = 0.02;
/// Differences listed in the report and the refusal message at most.
pub const DIFFERENCES_LISTED: usize = 100;

/// One attribute whose Braze value differs from the export's.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Difference {
    /// The user (`external_id:…`, `braze_id:…`, `alias:label:name`).
    pub user: String,
    /// Braze attribute name (`*` when Braze has no such user).
    pub attribute: String,
    /// The export's value.
    pub export: Value,
    /// Braze's value (`null` when absent).
    pub braze: Value,
}

/// The verify sample's result.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Verification {
    /// Users sampled.
    pub sampled: usize,
    /// Of those, users with at least one difference.
    pub differing_users: usize,
    /// `differing_users / sampled`.
    pub differing_share: f64,
    /// The allowed share.
    pub max_differ_share: f64,
    /// The first [`DIFFERENCES_LISTED`] differences.
    pub differences: Vec<Difference>,
}

/// How to adopt.
#[derive(Debug, Clone)]
pub struct AdoptOptions {
    /// Users to check against Braze first (`None`: no check).
    pub verify_sample: Option<usize>,
    /// Refuse when more than this share of the sample differs.
    pub max_differ_share: f64,
    /// Confirmed users per checkpoint segment (a format-1 state's in-memory adoption).
    pub checkpoint_users: usize,
    /// Seed of the sample.
    pub seed: u64,
    /// How long the route lock is held at most.
    pub lease_s: i64,
    /// Verify lookups (`/users/export/ids`) a minute at most, as the audit paces them.
    pub lookups_per_minute: u32,
}

impl Default for AdoptOptions {
    fn default() -> Self {
        Self {
            verify_sample: None,
            max_differ_share: DEFAULT_MAX_DIFFER_SHARE,
            checkpoint_users: 50_000,
            seed: rand::random(),
            lease_s: 3_600,
            lookups_per_minute: EXPORT_IDS_PER_MINUTE,
        }
    }
}

/// Where the route's state and reports live.
#[derive(Debug, Clone)]
pub struct AdoptTarget {
    /// State bucket.
    pub state_bucket: String,
    /// State prefix.
    pub state_prefix: String,
    /// Reports prefix.
    pub reports_prefix: String,
}

/// What adoption did (also the report object's body).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct AdoptReport {
    /// Route.
    pub route: String,
    /// The export adopted.
    pub export_id: String,
    /// `adopted` or `refused`.
    pub status: String,
    /// Rows read.
    pub rows_read: u64,
    /// Rows rejected (not recorded).
    pub rejected: u64,
    /// Users recorded as confirmed.
    pub users_recorded: u64,
    /// Attributes recorded as confirmed.
    pub attributes_recorded: u64,
    /// Users in the state afterwards.
    pub state_users: u64,
    /// The verify sample, when asked for.
    pub verification: Option<Verification>,
    /// The report's address.
    pub report: String,
}

/// Why adoption did not happen.
#[derive(Debug, thiserror::Error)]
pub enum AdoptError {
    /// Too many sampled users differ from Braze.
    #[error(
        "refusing to adopt {export}: {differing} of {sampled} sampled users differ from Braze ({share:.1}% > {max:.1}% allowed); report {report}; differences: {list}"
    )]
    Refused {
        /// The export.
        export: String,
        /// Users differing.
        differing: usize,
        /// Users sampled.
        sampled: usize,
        /// Share in percent.
        share: f64,
        /// Allowed share in percent.
        max: f64,
        /// `user attribute: export=… braze=…`, `; `-separated.
        list: String,
        /// The report object.
        report: String,
    },
    /// Reading or mapping the export failed.
    #[error("adopting: {0}")]
    Sync(#[from] SyncError),
    /// The state could not be read or written.
    #[error("adopting: {0}")]
    State(#[from] StateError),
    /// Braze could not be asked.
    #[error("adopting: {0}")]
    Lookup(#[from] LookupError),
    /// Another run holds the route.
    #[error("adopting: {0}")]
    Busy(String),
}

fn braze_value<'v>(profile: &'v Value, name: &str) -> Option<&'v Value> {
    profile
        .get("custom_attributes")
        .and_then(|c| c.get(name))
        .or_else(|| profile.get(name).filter(|_| name != "custom_attributes"))
}

/// Compares sampled users (every non-empty attribute the export has for them) with Braze,
/// reading them back at most `lookups_per_minute` requests a minute.
pub async fn verify(
    sample: &[UserDelta],
    lookup: &dyn UserLookup,
    max_differ_share: f64,
    lookups_per_minute: u32,
) -> Result<Verification, LookupError> {
    let how = ReadBack {
        fields: None,
        per_minute: Some(lookups_per_minute),
    };
    let (profiles, _) = read_profiles(lookup, sample, how).await?;
    let mut differences = Vec::new();
    let mut differing_users = 0usize;
    for d in sample {
        let user = user_label(&d.identifier);
        let Some(p) = profiles.get(&user) else {
            differing_users += 1;
            differences.push(Difference {
                user,
                attribute: "*".into(),
                export: Value::String("user in the export".into()),
                braze: Value::String("no such user in Braze".into()),
            });
            continue;
        };
        let mut differs = false;
        for c in &d.changes {
            let theirs = braze_value(p, &c.name).cloned().unwrap_or(Value::Null);
            if !same_for_braze(&c.value, &theirs) {
                differs = true;
                differences.push(Difference {
                    user: user.clone(),
                    attribute: c.name.clone(),
                    export: c.value.clone(),
                    braze: theirs,
                });
            }
        }
        differing_users += usize::from(differs);
    }
    differences.truncate(DIFFERENCES_LISTED);
    Ok(Verification {
        sampled: sample.len(),
        differing_users,
        differing_share: if sample.is_empty() {
            0.0
        } else {
            differing_users as f64 / sample.len() as f64
        },
        max_differ_share,
        differences,
    })
}

/// Adopts the export whose parts are `parts` (see the module docs). `export` is its id and
/// date, as a run would record them.
pub async fn adopt(
    store: Arc<dyn ObjectStore>,
    target: &AdoptTarget,
    route: Arc<Route>,
    parts: Vec<S3Uri>,
    export: Watermark,
    lookup: Option<&dyn UserLookup>,
    opts: &AdoptOptions,
) -> Result<AdoptReport, AdoptError> {
    let run_id = format!("adopt-{}", crate::clock::now().format("%Y%m%dT%H%M%S%.3fZ"));
    let lock = RouteLock::acquire(
        store.clone(),
        lock_uri(&target.state_bucket, &target.state_prefix, route.name()),
        &run_id,
        crate::clock::now_ms(),
        opts.lease_s,
    )
    .await
    .map_err(|e| AdoptError::Busy(e.to_string()))?
    .ok_or_else(|| {
        AdoptError::Busy(format!(
            "another run holds route {}; adopt when it has finished",
            route.name()
        ))
    })?;
    let job = Adoption {
        store,
        target,
        route,
        parts,
        export,
        opts,
        run_id,
    };
    let result = job.adopt_locked(lookup).await;
    if let Err(e) = lock.release().await {
        tracing::warn!(route = job.route.name(), error = %e, "Could not release the route lock; it expires by itself.");
    }
    result
}

/// One adoption: the export it records, for which route, where, how, and the run's id.
struct Adoption<'a> {
    store: Arc<dyn ObjectStore>,
    target: &'a AdoptTarget,
    route: Arc<Route>,
    parts: Vec<S3Uri>,
    export: Watermark,
    opts: &'a AdoptOptions,
    run_id: String,
}

/// What pass 2 recorded: the diff's counts, `(users, attributes)` recorded, the commit.
type Recorded = (Summary, (u64, u64), CommitStats);

impl Adoption<'_> {
    /// Verifies a sample against Braze (pass 1, when asked for), then records the export as
    /// confirmed (pass 2); writes the report either way.
    async fn adopt_locked(
        &self,
        lookup: Option<&dyn UserLookup>,
    ) -> Result<AdoptReport, AdoptError> {
        let (store, route, opts) = (&self.store, &self.route, self.opts);
        let report_uri = S3Uri::new(
            &self.target.state_bucket,
            format!(
                "{}{}/{}.json",
                self.target.reports_prefix,
                route.name(),
                self.run_id
            ),
        );
        let mut report = AdoptReport {
            route: route.name().to_string(),
            export_id: self.export.export_id.clone(),
            status: "refused".into(),
            rows_read: 0,
            rejected: 0,
            users_recorded: 0,
            attributes_recorded: 0,
            state_users: 0,
            verification: None,
            report: report_uri.to_string(),
        };

        if let (Some(n), Some(lookup)) = (opts.verify_sample, lookup) {
            let sample = self.sample(n).await?;
            let v = verify(
                &sample,
                lookup,
                opts.max_differ_share,
                opts.lookups_per_minute,
            )
            .await?;
            info!(
                route = route.name(),
                sampled = v.sampled,
                differing = v.differing_users,
                "Verify sample checked against Braze."
            );
            let refused = v.differing_share > opts.max_differ_share;
            report.verification = Some(v.clone());
            if refused {
                write_report(store.as_ref(), &report_uri, &report, "adoption").await;
                return Err(self.refusal(&v, &report_uri));
            }
        }

        // Pass 2: record every change against the current state as confirmed, in checkpoints.
        let state = StateStore::new(
            store.clone(),
            &self.target.state_bucket,
            &self.target.state_prefix,
            route.name(),
        );
        let head = state.read_head().await?;
        let (summary, recorded, stats) = if head.doc.format == LEGACY_HEAD_FORMAT {
            self.in_memory(&state).await?
        } else {
            self.bounded(&state, head).await?
        };
        report.status = "adopted".into();
        report.rows_read = summary.rows_read;
        report.rejected = summary.rejected;
        report.users_recorded = recorded.0;
        report.attributes_recorded = recorded.1;
        report.state_users = stats.users;
        write_report(store.as_ref(), &report_uri, &report, "adoption").await;
        info!(
            route = route.name(),
            users = recorded.0,
            "Export adopted as confirmed without sending."
        );
        Ok(report)
    }

    /// Pass 1: a uniform sample (reservoir) of `n` of the export's users, every attribute.
    async fn sample(&self, n: usize) -> Result<Vec<UserDelta>, AdoptError> {
        let (st, rt, r, p, seed) = (
            self.store.clone(),
            crate::clock::Blocking::new(tokio::runtime::Handle::current()),
            self.route.clone(),
            self.parts.clone(),
            self.opts.seed,
        );
        let sample = tokio::task::spawn_blocking(move || {
            let from = SampleSource {
                store: &st,
                runtime: &rt,
                route: &r,
                parts: &p,
            };
            reservoir_sample(&from, n, seed, &|_| true)
        })
        .await
        .map_err(|e| AdoptError::Busy(format!("the sampling task failed: {e}")))??;
        Ok(sample)
    }

    /// The refusal of a sample that differs from Braze too much, listing the differences.
    fn refusal(&self, v: &Verification, report_uri: &S3Uri) -> AdoptError {
        let list = v
            .differences
            .iter()
            .map(|d| {
                format!(
                    "{} {}: export={} braze={}",
                    d.user, d.attribute, d.export, d.braze
                )
            })
            .collect::<Vec<_>>()
            .join("; ");
        AdoptError::Refused {
            export: self.export.export_id.clone(),
            differing: v.differing_users,
            sampled: v.sampled,
            share: v.differing_share * 100.0,
            max: self.opts.max_differ_share * 100.0,
            list,
            report: report_uri.to_string(),
        }
    }

    /// Pass 2 for a format-1 state (its migration goes through the in-memory commit): the whole
    /// snapshot in memory.
    async fn in_memory(&self, state: &StateStore) -> Result<Recorded, AdoptError> {
        let (store, route, parts) = (&self.store, &self.route, self.parts.clone());
        let handle = crate::clock::Blocking::new(tokio::runtime::Handle::current());
        let (head, snapshot) = state.load(route).await?;
        let (st, r, every) = (
            store.clone(),
            route.clone(),
            self.opts.checkpoint_users.max(1),
        );
        let state2 = state.clone();
        let (summary, head, snapshot, recorded) = tokio::task::spawn_blocking(move || {
            let mut head = head;
            let mut pending: Vec<UserDelta> = Vec::new();
            let mut recorded = (0u64, 0u64);
            let mut failed: Option<StateError> = None;
            let mut opts = ProduceOptions::for_route(&r, "");
            opts.departures = false;
            let flush = |pending: &mut Vec<UserDelta>, head: &mut _| -> Result<(), StateError> {
                handle.block_on(state2.checkpoint(head, &r, pending))?;
                pending.clear();
                Ok(())
            };
            let summary = produce(
                parts
                    .iter()
                    .map(|u| open_s3_part(&st, u, &handle).map(|(_, part)| part)),
                &r,
                &snapshot,
                &opts,
                &mut |d| {
                    recorded.0 += u64::from(!d.records_only());
                    recorded.1 += d.changes.len() as u64;
                    pending.push(d);
                    if pending.len() >= every
                        && let Err(e) = flush(&mut pending, &mut head)
                    {
                        let msg = e.to_string();
                        failed = Some(e);
                        return Err(Stop(msg));
                    }
                    Ok(())
                },
                &mut |_| {},
            );
            let summary = match (summary, failed) {
                (_, Some(e)) => Err(AdoptError::State(e)),
                (Err(e), None) => Err(AdoptError::Sync(e)),
                (Ok(s), None) => flush(&mut pending, &mut head)
                    .map(|()| s)
                    .map_err(AdoptError::State),
            };
            (summary, head, snapshot, recorded)
        })
        .await
        .map_err(|e| AdoptError::Busy(format!("the adoption task failed: {e}")))?;
        let summary = summary?;
        let mut head = head;
        let stats = state
            .commit(&mut head, snapshot, Some(self.export.clone()))
            .await?;
        Ok((summary, recorded, stats))
    }

    /// Pass 2 for a format-2 (or new) state, in memory bounded by one hash range whatever the
    /// route's size, as a bounded run ([`crate::diff::bounded`]): checkpoints a killed run left are
    /// folded first, the export is diffed range by range against the state, and what differs is
    /// spilled by hash range ([`RecordSpill`]) and committed range by range
    /// ([`StateStore::commit_ranged_with`]). No checkpoints: nothing is sent, so a killed
    /// adoption loses nothing and is simply run again (checkpoints would write and read back
    /// ~24 bytes per attribute of every user through S3). Spills to the system temporary
    /// folder.
    async fn bounded(&self, state: &StateStore, mut head: Head) -> Result<Recorded, AdoptError> {
        let (store, route, parts, run_id) =
            (&self.store, &self.route, self.parts.clone(), &self.run_id);
        let base = std::env::temp_dir();
        if !head.doc.segments.is_empty() {
            let dir =
                SpillDir::create(&base, &format!("{run_id}-fold")).map_err(StateError::from)?;
            let users = head.doc.users;
            state
                .commit_ranged(&mut head, route, None, users, dir.path())
                .await?;
        }
        let handle = crate::clock::Blocking::new(tokio::runtime::Handle::current());
        let ranges = StoreRanges::new(
            state.clone(),
            head.doc.clone(),
            route.clone(),
            handle.clone(),
        );
        let records_dir =
            SpillDir::create(&base, &format!("{run_id}-records")).map_err(StateError::from)?;
        let bits = record_spill_bits(head.doc.range_bits);
        let spill = RecordSpill::new(records_dir.path(), bits, route, 16 << 20, None);
        let (st, r, dir) = (
            store.clone(),
            route.clone(),
            records_dir.path().to_path_buf(),
        );
        let settings = RangedSettings::new(run_id);
        let (summary, recorded, records) = tokio::task::spawn_blocking(move || {
            let spill = std::sync::Mutex::new((spill, (0u64, 0u64)));
            let mut popts = ProduceOptions::for_route(&r, "");
            popts.departures = false;
            let summary = produce_ranged(
                parts
                    .iter()
                    .map(|u| open_s3_part(&st, u, &handle).map(|(_, part)| part)),
                &r,
                &ranges,
                &popts,
                &settings,
                &|d| {
                    let mut g = spill
                        .lock()
                        .map_err(|_| Stop("a diff worker panicked".into()))?;
                    let (sp, recorded) = &mut *g;
                    recorded.0 += u64::from(!d.records_only());
                    recorded.1 += d.changes.len() as u64;
                    sp.push(&d).map_err(|e| Stop(e.to_string()))
                },
                &mut |_| {},
            );
            let (sp, recorded) = match spill.into_inner() {
                Ok(x) => x,
                Err(poisoned) => poisoned.into_inner(),
            };
            let records = sp
                .finish()
                .map_err(|e| AdoptError::State(StateError::Spill(e)));
            (summary, recorded, records)
        })
        .await
        .map_err(|e| AdoptError::Busy(format!("the adoption task failed: {e}")))?;
        let summary = summary?;
        let records = records?;
        info!(
            route = route.name(),
            users = recorded.0,
            spilled_mb = records.bytes() >> 20,
            records = %dir.display(),
            "Adoption diffed; committing range by range."
        );
        let expected = head.doc.users.saturating_add(summary.users_new);
        let commit_dir =
            SpillDir::create(&base, &format!("{run_id}-commit")).map_err(StateError::from)?;
        let stats = state
            .commit_ranged_with(
                &mut head,
                route,
                Some(self.export.clone()),
                expected,
                commit_dir.path(),
                &records,
            )
            .await?;
        drop(records_dir);
        Ok((summary, recorded, stats))
    }
}
