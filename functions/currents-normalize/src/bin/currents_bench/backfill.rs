//! The backfill listing figure of `currents-bench`: a backfill over 1,008,000 Currents keys
//! (10 event types × 420 days × 24 hours × 10 files), every one already done (quarantined
//! before), so the figure is the listing and planning alone. The keys come from a store that
//! makes each page on demand (it holds none), in a separate process whose peak RSS
//! (`VmHWM`) is the figure; the same-run baseline is the same process holding the whole
//! listing at once and planning it in one go (what a backfill did before it streamed by day).

use std::collections::BTreeMap;
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;

use async_trait::async_trait;
use bridge_shared::object_store::{ObjectMeta, ObjectReader};
use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use currents_normalize::backfill::{self, Backfill, BackfillRequest, Done};
use currents_normalize::config::Config;
use currents_normalize::registry::Registry;
use serde_json::{Value, json};

const RAW: &str = "raw";
const INTEGRATION: &str = "dataexport.prod-01.S3.integration.5f0c1e2d3b4a";
const TYPES: [&str; 10] = [
    "users.behaviors.CustomEvent",
    "users.behaviors.Purchase",
    "users.behaviors.app.SessionStart",
    "users.messages.email.Click",
    "users.messages.email.Delivery",
    "users.messages.email.Open",
    "users.messages.email.Send",
    "users.messages.pushnotification.Send",
    "users.messages.sms.Send",
    "users.profile.Update",
];
const DAYS: u64 = 420;
const HOURS: u64 = 24;
const FILES: u64 = 10;
const KEYS: u64 = TYPES.len() as u64 * DAYS * HOURS * FILES;

/// Key number `i`, in key order.
fn key(i: u64) -> String {
    let file = i % FILES;
    let hour = (i / FILES) % HOURS;
    let day = (i / FILES / HOURS) % DAYS;
    let t = TYPES[(i / FILES / HOURS / DAYS) as usize % TYPES.len()];
    let date = chrono::NaiveDate::from_ymd_opt(2025, 1, 1).unwrap_or_default()
        + chrono::Duration::days(day as i64);
    format!(
        "currents/{INTEGRATION}/event_type={t}/date={}-{hour:02}/421/zone-a/{INTEGRATION}+0+{file:010}.avro",
        date.format("%Y-%m-%d")
    )
}

/// The first key number whose key sorts after `s` (keys are in key order).
fn first_after(s: &str) -> u64 {
    let (mut lo, mut hi) = (0u64, KEYS);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        if key(mid).as_str() <= s {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    lo
}

fn meta(key: String) -> ObjectMeta {
    ObjectMeta {
        key,
        etag: "e".into(),
        size: 100_000,
        ..ObjectMeta::default()
    }
}

/// A store whose input bucket lists [`KEYS`] keys made on demand, each already quarantined.
struct SyntheticHistory;

#[async_trait]
impl ObjectStore for SyntheticHistory {
    async fn get(&self, uri: &S3Uri) -> Result<(ObjectMeta, Bytes), StoreError> {
        Err(StoreError::NotFound { uri: uri.clone() })
    }
    async fn get_reader(&self, uri: &S3Uri) -> Result<(ObjectMeta, ObjectReader), StoreError> {
        Err(StoreError::NotFound { uri: uri.clone() })
    }
    async fn head(&self, _: &S3Uri) -> Result<Option<ObjectMeta>, StoreError> {
        Ok(None)
    }
    async fn list(&self, bucket: &str, prefix: &str) -> Result<Vec<ObjectMeta>, StoreError> {
        if bucket != RAW {
            return Ok(Vec::new());
        }
        // The quarantine below a day prefix: a reason object for each of its keys.
        let (inner, wrap) = match prefix.strip_prefix("quarantine/") {
            Some(p) => (p, true),
            None => (prefix, false),
        };
        let mut i = first_after(inner).saturating_sub(1);
        if i < KEYS && !key(i).starts_with(inner) {
            i += 1;
        }
        let mut out = Vec::new();
        while i < KEYS {
            let k = key(i);
            if !k.starts_with(inner) {
                break;
            }
            out.push(meta(if wrap {
                format!("quarantine/{k}.reason.json")
            } else {
                k
            }));
            i += 1;
        }
        Ok(out)
    }
    async fn list_page(
        &self,
        bucket: &str,
        _prefix: &str,
        start_after: Option<&str>,
        max: usize,
    ) -> Result<Vec<ObjectMeta>, StoreError> {
        if bucket != RAW {
            return Ok(Vec::new());
        }
        let from = start_after.map_or(0, first_after);
        Ok((from..KEYS.min(from + max as u64))
            .map(|i| meta(key(i)))
            .collect())
    }
    async fn put(
        &self,
        uri: &S3Uri,
        _: Bytes,
        _: PutCondition,
        _: BTreeMap<String, String>,
    ) -> Result<ObjectMeta, StoreError> {
        Ok(meta(uri.key.clone()))
    }
    async fn copy(&self, _: &S3Uri, _: &S3Uri) -> Result<(), StoreError> {
        Ok(())
    }
    async fn delete(&self, _: &S3Uri) -> Result<(), StoreError> {
        Ok(())
    }
}

/// Internal (`--backfill-list-probe streamed|whole`): plans the history in this process and
/// prints the counts with this process's peak RSS.
pub fn probe(mode: &str, peak_rss_mb: fn() -> Option<f64>) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let registry = Arc::new(Registry::builtin()?);
    let cfg = Config::default();
    let before = peak_rss_mb();
    let started = Instant::now();
    let (objects, skipped) = match mode {
        "streamed" => {
            let b = Backfill::new(cfg, Arc::new(SyntheticHistory), registry);
            let req = BackfillRequest {
                bucket: RAW.into(),
                prefix: "currents/".into(),
                from: None,
                to: None,
                concurrency: 4,
                dry_run: true,
                no_compact: true,
                progress: false,
            };
            let s = rt.block_on(b.run(&req))?;
            (s.objects, s.skipped)
        }
        _ => {
            // The whole listing held at once, then planned against everything quarantined.
            let store = SyntheticHistory;
            let listing = rt.block_on(store.list(RAW, "currents/"))?;
            let done = Done {
                quarantined: listing.iter().map(|o| o.key.clone()).collect(),
                ..Done::default()
            };
            let p = backfill::plan(&listing, RAW, &cfg, &registry, None, None, &done);
            (
                (p.todo.len() + p.skipped.len()) as u64,
                p.skipped.len() as u64,
            )
        }
    };
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "{}",
        json!({"mode": mode, "objects": objects, "skipped": skipped, "seconds": seconds,
               "rss_mb_before": before, "peak_rss_mb": peak_rss_mb()})
    );
    Ok(())
}

fn child(mode: &str) -> anyhow::Result<Value> {
    let o = Command::new(std::env::current_exe()?)
        .arg("--backfill-list-probe")
        .arg(mode)
        .output()?;
    let v: Value = serde_json::from_slice(&o.stdout).map_err(|e| {
        anyhow::anyhow!(
            "backfill probe failed: {e}: {}",
            String::from_utf8_lossy(&o.stderr)
        )
    })?;
    eprintln!("backfill listing probe: {v}");
    anyhow::ensure!(
        v["objects"].as_u64() == Some(KEYS) && v["skipped"].as_u64() == Some(KEYS),
        "the probe did not plan every key: {v}"
    );
    Ok(v)
}

/// Runs the backfill listing figure; returns the fields to merge into `currents.json`.
pub fn run() -> anyhow::Result<Value> {
    eprintln!("backfill: planning a listing of {KEYS} keys, streamed and whole…");
    let streamed = child("streamed")?;
    let whole = child("whole")?;
    let peak = streamed["peak_rss_mb"].as_f64().unwrap_or(f64::NAN);
    let whole_peak = whole["peak_rss_mb"].as_f64().unwrap_or(f64::NAN);
    let seconds = streamed["seconds"].as_f64().unwrap_or(f64::NAN);
    Ok(json!({
        "backfill_list_peak_rss_mb": peak,
        "backfill_list": {
            "keys": KEYS,
            "keys_per_s": KEYS as f64 / seconds,
            "seconds": seconds,
            "rss_mb_before_listing": streamed["rss_mb_before"],
            "baseline_whole_listing_peak_rss_mb": whole_peak,
            "ratio_to_whole_listing": peak / whole_peak,
            "method": "a backfill (dry run, no compaction) over 1,008,000 Currents keys (10 event types x 420 days x 24 hours x 10 files) made page by page by a store that holds none, every key already quarantined, in a separate process with one worker thread; peak RSS is its VmHWM; baseline: the same keys listed whole into memory and planned at once, in another such process",
        },
    }))
}
