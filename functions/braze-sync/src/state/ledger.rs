//! The run ledger: one small object per export (`<state prefix><route>/ledger/<export id>.json`)
//! that makes duplicate notifications and unchanged re-uploads no-ops. An invocation claims an
//! export with a create-only write (a lease); a second invocation for the same export sees the
//! claim and stands back; a finished run records how it ended. Only a *final* entry
//! ([`LedgerStatus::is_final`]: `complete`) blocks a later run of the same export, so an export
//! whose run was cut short, left rejects or failed can be replayed by a redelivered or re-copied
//! notification (same object, same ETag). The route lock lives in [`crate::state::route_lock`].

use std::collections::BTreeMap;

use bridge_shared::lease::{Lease, LeaseDoc, LeaseError};
use bridge_shared::object_store::ObjectMeta;
use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};

/// What the ledger says of an export.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LedgerStatus {
    /// An invocation is syncing it until `lease_until`.
    Running,
    /// Everything was confirmed or found unchanged; a duplicate trigger is a no-op.
    Complete,
    /// The run ended with work left (unsent users, transient failure); a replay continues it.
    Incomplete,
    /// The run failed permanently (unreadable file, bad config); see the report. Not final:
    /// a re-copy after fixing the route config runs again.
    Failed,
    /// The run failed for a reason an operator or time fixes without touching the export
    /// (e.g. Braze refused the API key): the notification may be acknowledged, yet a
    /// redelivered or re-copied notification for the same object and ETag runs it again.
    FailedRetryable,
    /// The export is dated before the one the route's state reflects: nothing was applied
    /// (see the report). Not final: a forced replay runs it.
    SkippedStale,
    /// The export was split into pieces run by later invocations (`fan_out` names the
    /// run); the last piece records how it ended. While that run holds the route lock, a
    /// replay of the export waits ([`Claim::FannedOut`]); once it is gone, a replay runs it.
    FannedOut,
}

impl LedgerStatus {
    /// Whether this entry ends the export for good: a later claim without `force` is
    /// answered [`Claim::AlreadyComplete`] instead of running again.
    pub fn is_final(&self) -> bool {
        matches!(self, LedgerStatus::Complete)
    }
}

/// One ledger entry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LedgerEntry {
    /// Status.
    pub status: LedgerStatus,
    /// The export id (`s3://bucket/key` + ETag/version).
    pub export_id: String,
    /// Lease expiry, epoch seconds (only meaningful while `running`).
    pub lease_until: i64,
    /// The report of the last run, when there is one.
    pub report: Option<String>,
    /// The fan-out run the export was split into ([`LedgerStatus::FannedOut`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub fan_out: Option<String>,
    /// Runs of this export in a row that handed over without Braze confirming a user (a
    /// claim carries it from the entry it replaces); see [`STALLED_LIMIT`].
    #[serde(default, skip_serializing_if = "is_zero")]
    pub stalled: u32,
    /// When (epoch ms) the runs of this export began waiting for the workspace's hourly
    /// request budget without a request sent since (a claim carries it like `stalled`); past
    /// the longest wait the run fails instead of waiting again.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub budget_wait_since: Option<i64>,
    /// Runs of this export in a row that found its route held by another run and handed
    /// the export over with a delay instead of running (a claim carries it like `stalled`);
    /// past the limit the run fails retryably instead of waiting again.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub route_waits: u32,
    /// The upload (its last-modified time) a forced replay by object metadata was for: a
    /// `complete` entry with it answers further notifications of that same upload as
    /// duplicates instead of resending everything again ([`Ledger::forced_upload`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub forced: Option<String>,
    /// The number of pieces of the fan-out (`fan_out`) its coordinator could not queue them
    /// all: the export's retry queues them again ([`Claim::FannedOut`]); 0 once queued.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub requeue: u32,
}

fn is_zero(n: &u32) -> bool {
    *n == 0
}

impl LeaseDoc for LedgerEntry {
    /// Entries name no holder: a claim is recognised as ours only by its ETag or its bytes.
    fn holder(&self) -> &str {
        ""
    }

    fn keeps_out(&self, now_ms: i64) -> bool {
        self.status == LedgerStatus::Running && self.lease_until * 1000 > now_ms
    }
}

/// What a run that handed over leaves in the ledger for the next run of its export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct HandOverCounts {
    /// Runs in a row that handed over without Braze confirming a user (0: this one made
    /// progress).
    pub stalled: u32,
    /// When the export began waiting for the hourly request budget without sending (`None`:
    /// this run did not wait).
    pub budget_wait_since: Option<i64>,
    /// Runs in a row that found the route held by another run and handed over with a delay
    /// (0: this run took the route).
    pub route_waits: u32,
}

/// Runs of one export in a row that may hand over without Braze confirming a user; the next
/// such run fails with its reason instead of handing over forever.
pub const STALLED_LIMIT: u32 = 3;

impl LedgerEntry {
    /// A running claim on `export_id`, leased until `lease_until` (epoch seconds).
    fn running(export_id: &str, lease_until: i64) -> Self {
        Self {
            status: LedgerStatus::Running,
            export_id: export_id.to_string(),
            lease_until,
            report: None,
            fan_out: None,
            stalled: 0,
            budget_wait_since: None,
            route_waits: 0,
            forced: None,
            requeue: 0,
        }
    }

    /// An entry that holds no lease: `status` with its `report`, and the fan-out run it
    /// belongs to.
    fn ended(
        status: LedgerStatus,
        export_id: &str,
        report: Option<String>,
        fan_out: Option<&str>,
    ) -> Self {
        Self {
            status,
            export_id: export_id.to_string(),
            lease_until: 0,
            report,
            fan_out: fan_out.map(str::to_string),
            stalled: 0,
            budget_wait_since: None,
            route_waits: 0,
            forced: None,
            requeue: 0,
        }
    }
}

/// The outcome of trying to claim an export.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// We own the run; keep the ETag to finish it.
    Acquired {
        /// ETag of our claim.
        etag: String,
    },
    /// A complete run already exists: nothing to do.
    AlreadyComplete {
        /// Its report.
        report: Option<String>,
    },
    /// Another invocation holds a live lease.
    Busy,
    /// The export was split into the pieces of fan-out run `run_id`: it is running while
    /// that run holds the route lock; otherwise [`Ledger::take_over_fan_out`] claims it.
    FannedOut {
        /// The fan-out's run id.
        run_id: String,
        /// Its pieces to queue again (its coordinator could not queue them all), else 0.
        requeue: u32,
    },
}

/// Ledger errors.
#[derive(Debug, thiserror::Error)]
pub enum LedgerError {
    /// The store failed.
    #[error("ledger: {0}")]
    Store(#[from] StoreError),
    /// An entry does not parse.
    #[error("ledger entry {uri} is not valid: {reason}")]
    Corrupt {
        /// The entry.
        uri: S3Uri,
        /// Why.
        reason: String,
    },
}

/// The ledger of one route.
pub struct Ledger<'a> {
    store: &'a dyn ObjectStore,
    bucket: String,
    prefix: String,
    /// The upload this ledger's forced claims are for ([`Ledger::forced_upload`]).
    forced: Option<String>,
}

/// A file-name-safe id for an export: a hash of bucket, key and ETag/version.
pub fn entry_name(export_id: &str) -> String {
    format!(
        "{:032x}.json",
        xxhash_rust::xxh3::xxh3_128(export_id.as_bytes())
    )
}

impl<'a> Ledger<'a> {
    /// The ledger under `s3://bucket/<prefix>` (prefix ends with `/`).
    pub fn new(store: &'a dyn ObjectStore, bucket: &str, prefix: String) -> Self {
        Self {
            store,
            bucket: bucket.to_string(),
            prefix,
            forced: None,
        }
    }

    /// Forced claims of this ledger are for one upload of the trigger (`upload`: its
    /// last-modified time, as a replay forced by object metadata is): such a claim takes a
    /// `complete` entry over only when that entry is not already this upload's forced run,
    /// so a duplicate notification of the forced upload is a no-op rather than a second full
    /// resend. Every entry this ledger writes records it. `None` (an operator's `--force-full`):
    /// a forced claim always takes over.
    pub fn forced_upload(mut self, upload: Option<String>) -> Self {
        self.forced = upload;
        self
    }

    /// `entry` as this ledger writes it (with the forced upload it is for).
    fn stamped(&self, mut entry: LedgerEntry) -> LedgerEntry {
        if entry.forced.is_none() {
            entry.forced = self.forced.clone();
        }
        entry
    }

    fn uri(&self, export_id: &str) -> S3Uri {
        S3Uri::new(
            &self.bucket,
            format!("{}{}", self.prefix, entry_name(export_id)),
        )
    }

    /// The ledger of `route` under `s3://bucket/<state_prefix><route>/ledger/`.
    pub fn for_route(
        store: &'a dyn ObjectStore,
        bucket: &str,
        state_prefix: &str,
        route: &str,
    ) -> Self {
        Self::new(store, bucket, format!("{state_prefix}{route}/ledger/"))
    }

    /// The entry of `export_id`, if the ledger has one (read-only; for `status`).
    pub async fn entry(&self, export_id: &str) -> Result<Option<LedgerEntry>, LedgerError> {
        let uri = self.uri(export_id);
        match self.store.get(&uri).await {
            Ok((_, bytes)) => {
                serde_json::from_slice(&bytes)
                    .map(Some)
                    .map_err(|e| LedgerError::Corrupt {
                        uri,
                        reason: e.to_string(),
                    })
            }
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Claims `export_id` for `lease_s` seconds from `now`. `force` takes over any entry that
    /// is not running (a forced replay).
    pub async fn claim(
        &self,
        export_id: &str,
        now: i64,
        lease_s: i64,
        force: bool,
    ) -> Result<Claim, LedgerError> {
        let uri = self.uri(export_id);
        let entry = self.stamped(LedgerEntry::running(export_id, now + lease_s));
        let body = Bytes::from(serde_json::to_vec(&entry).unwrap_or_default());
        match self
            .store
            .put(&uri, body.clone(), PutCondition::IfAbsent, BTreeMap::new())
            .await
        {
            Ok(meta) => return Ok(Claim::Acquired { etag: meta.etag }),
            Err(StoreError::PreconditionFailed { .. }) => {}
            Err(e) => return Err(e.into()),
        }
        let (meta, bytes) = self.store.get(&uri).await?;
        let current: LedgerEntry =
            serde_json::from_slice(&bytes).map_err(|e| LedgerError::Corrupt {
                uri: uri.clone(),
                reason: e.to_string(),
            })?;
        match current.status {
            LedgerStatus::Running if current.lease_until > now => return Ok(Claim::Busy),
            LedgerStatus::FannedOut => {
                return Ok(Claim::FannedOut {
                    run_id: current.fan_out.unwrap_or_default(),
                    requeue: current.requeue,
                });
            }
            ref s
                if s.is_final()
                    && (!force || (self.forced.is_some() && current.forced == self.forced)) =>
            {
                return Ok(Claim::AlreadyComplete {
                    report: current.report,
                });
            }
            _ => {}
        }
        let body = match (
            current.stalled,
            current.budget_wait_since,
            current.route_waits,
        ) {
            (0, None, 0) => body,
            (stalled, budget_wait_since, route_waits) => {
                let entry = self.stamped(LedgerEntry {
                    stalled,
                    budget_wait_since,
                    route_waits,
                    ..LedgerEntry::running(export_id, now + lease_s)
                });
                Bytes::from(serde_json::to_vec(&entry).unwrap_or_default())
            }
        };
        self.replace_claim(&uri, body, meta.etag).await
    }

    /// Writes `entry` over our claim `claim_etag` on `export_id` (only if it is still the
    /// current entry); returns the new ETag. Written through the shared lease
    /// ([`bridge_shared::lease`]): a 412 reads the entry back, and a write of ours whose
    /// answer was lost (the entry is already `entry`) is not taken for another writer's.
    async fn write_over(
        &self,
        export_id: &str,
        claim_etag: &str,
        entry: &LedgerEntry,
    ) -> Result<String, LedgerError> {
        let mut claim = Lease::held(self.uri(export_id), claim_etag.to_string());
        self.write_claim(&mut claim, entry).await?;
        Ok(claim.etag().to_string())
    }

    /// Writes `entry` (stamped) over the claim `claim` holds.
    async fn write_claim(&self, claim: &mut Lease, entry: &LedgerEntry) -> Result<(), LedgerError> {
        let entry = self.stamped(entry.clone());
        claim.write(self.store, &entry).await.map_err(|e| match e {
            LeaseError::Store { error, .. } => LedgerError::Store(error),
            LeaseError::Lost { uri, .. } | LeaseError::Changed { uri, .. } => {
                LedgerError::Store(StoreError::PreconditionFailed { uri })
            }
        })
    }

    /// Replaces the entry at `uri` (ETag `etag`) by a running claim: [`Claim::Busy`] when
    /// another writer got there first.
    async fn replace_claim(
        &self,
        uri: &S3Uri,
        body: Bytes,
        etag: String,
    ) -> Result<Claim, LedgerError> {
        match self
            .store
            .put(uri, body, PutCondition::IfMatch(etag), BTreeMap::new())
            .await
        {
            Ok(meta) => Ok(Claim::Acquired { etag: meta.etag }),
            Err(StoreError::PreconditionFailed { .. }) => Ok(Claim::Busy),
            Err(e) => Err(e.into()),
        }
    }

    /// Extends our running claim to `now + lease_s` (only if it is still the current entry);
    /// returns the claim's new ETag, to renew or finish with next.
    pub async fn renew(
        &self,
        export_id: &str,
        claim_etag: &str,
        now: i64,
        lease_s: i64,
    ) -> Result<String, LedgerError> {
        let entry = LedgerEntry::running(export_id, now + lease_s);
        self.write_over(export_id, claim_etag, &entry).await
    }

    /// Runs `work` to its end while renewing our claim on `export_id` every third of
    /// `lease_s`, so a long run keeps its claim and a dead one frees it within a lease.
    /// `etag` is the claim's current ETag before and after.
    pub async fn renewing<F: std::future::Future>(
        &self,
        work: F,
        export_id: &str,
        etag: &mut String,
        lease_s: i64,
    ) -> F::Output {
        tokio::pin!(work);
        let every = crate::state::lease::renew_every(lease_s);
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // One lease across renewals, so a renewal whose answer was lost is recognised by the
        // next one.
        let mut claim = Lease::held(self.uri(export_id), etag.clone());
        loop {
            tokio::select! {
                biased;
                out = &mut work => {
                    self.settle_claim(&mut claim, export_id, etag).await;
                    return out;
                }
                _ = tick.tick() => {
                    let now = crate::clock::now().timestamp();
                    let entry = LedgerEntry::running(export_id, now + lease_s);
                    match self.write_claim(&mut claim, &entry).await {
                        Ok(()) => *etag = claim.etag().to_string(),
                        Err(e) => tracing::warn!(export = export_id, error = %e, "Could not renew the export claim; trying again."),
                    }
                }
            }
        }
    }

    /// After the work: when our last renewal went unanswered, finds out whether it landed,
    /// so the write that ends the run goes over the claim as it is rather than meeting a
    /// 412 on the ETag before it.
    async fn settle_claim(&self, claim: &mut Lease, export_id: &str, etag: &mut String) {
        if !claim.has_unanswered() {
            return;
        }
        match claim.settle::<LedgerEntry>(self.store).await {
            Ok(()) => *etag = claim.etag().to_string(),
            Err(e) => {
                tracing::warn!(export = export_id, error = %e, "Could not tell whether the last renewal of the export claim landed.")
            }
        }
    }

    /// Claims an export left [`LedgerStatus::FannedOut`] by fan-out run `run_id` once that
    /// run is gone (it no longer holds the route lock): [`Claim::Busy`] if the entry changed.
    pub async fn take_over_fan_out(
        &self,
        export_id: &str,
        run_id: &str,
        now: i64,
        lease_s: i64,
    ) -> Result<Claim, LedgerError> {
        let uri = self.uri(export_id);
        let (meta, current) = self.read(&uri).await?;
        if current.status != LedgerStatus::FannedOut || current.fan_out.as_deref() != Some(run_id) {
            return Ok(Claim::Busy);
        }
        let entry = self.stamped(LedgerEntry::running(export_id, now + lease_s));
        let body = Bytes::from(serde_json::to_vec(&entry).unwrap_or_default());
        self.replace_claim(&uri, body, meta.etag).await
    }

    async fn read(&self, uri: &S3Uri) -> Result<(ObjectMeta, LedgerEntry), LedgerError> {
        let (meta, bytes) = self.store.get(uri).await?;
        let entry = serde_json::from_slice(&bytes).map_err(|e| LedgerError::Corrupt {
            uri: uri.clone(),
            reason: e.to_string(),
        })?;
        Ok((meta, entry))
    }

    /// Records that the export was split into fan-out run `run_id` (only if our claim is
    /// still the current entry: the fan-out's last piece may have finished it already), with
    /// `requeue` pieces for the export's retry to queue again when not all could be queued.
    pub async fn finish_fanned_out(
        &self,
        export_id: &str,
        claim_etag: &str,
        run_id: &str,
        report: Option<String>,
        requeue: u32,
    ) -> Result<(), LedgerError> {
        let entry = LedgerEntry {
            requeue,
            ..LedgerEntry::ended(LedgerStatus::FannedOut, export_id, report, Some(run_id))
        };
        self.write_over(export_id, claim_etag, &entry).await?;
        Ok(())
    }

    /// Records that fan-out run `run_id`'s pieces were queued again: its entry no longer asks
    /// for it. Nothing to do when the entry is no longer that fan-out's (its last piece
    /// finished it); a 412 reads it again.
    pub async fn pieces_queued(&self, export_id: &str, run_id: &str) -> Result<(), LedgerError> {
        self.rewrite(export_id, |current| match current {
            Some(c)
                if c.status == LedgerStatus::FannedOut
                    && c.fan_out.as_deref() == Some(run_id)
                    && c.requeue > 0 =>
            {
                Some(LedgerEntry {
                    requeue: 0,
                    ..c.clone()
                })
            }
            _ => None,
        })
        .await
    }

    /// Reads `export_id`'s entry (`None`: there is none) and writes what `decide` makes of it
    /// over exactly that entry (or creates it); `decide` returning `None` writes nothing. A
    /// 412 (another writer came first) reads the entry again, 5 times in all.
    async fn rewrite(
        &self,
        export_id: &str,
        mut decide: impl FnMut(Option<&LedgerEntry>) -> Option<LedgerEntry>,
    ) -> Result<(), LedgerError> {
        let uri = self.uri(export_id);
        for _ in 0..5 {
            let (condition, entry) = match self.read(&uri).await {
                Ok((meta, current)) => (PutCondition::IfMatch(meta.etag), decide(Some(&current))),
                Err(LedgerError::Store(StoreError::NotFound { .. })) => {
                    (PutCondition::IfAbsent, decide(None))
                }
                Err(e) => return Err(e),
            };
            let Some(entry) = entry else {
                return Ok(());
            };
            let body = Bytes::from(serde_json::to_vec(&entry).unwrap_or_default());
            match self.store.put(&uri, body, condition, BTreeMap::new()).await {
                Ok(_) => return Ok(()),
                Err(StoreError::PreconditionFailed { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(LedgerError::Store(StoreError::PreconditionFailed { uri }))
    }

    /// How fan-out run `run_id` ended, recorded by its last piece: over the fan-out's entry,
    /// or over the coordinator's own running claim when its invocation has not recorded the
    /// fan-out yet; never over a `complete` entry or another run's. Re-reads and retries when
    /// the entry changes under it.
    pub async fn finish_fan_out(
        &self,
        export_id: &str,
        run_id: &str,
        status: LedgerStatus,
        report: Option<String>,
    ) -> Result<(), LedgerError> {
        let entry = self.stamped(LedgerEntry::ended(status, export_id, report, Some(run_id)));
        self.rewrite(export_id, |current| match current {
            // Another run's entry since (a later replay's): not ours to write.
            Some(c)
                if c.status.is_final()
                    || (c.status != LedgerStatus::Running
                        && c.fan_out.as_deref() != Some(run_id)) =>
            {
                None
            }
            // The forced upload the fan-out's export was for stays recorded.
            Some(c) => Some(LedgerEntry {
                forced: entry.forced.clone().or(c.forced.clone()),
                ..entry.clone()
            }),
            None => Some(entry.clone()),
        })
        .await
    }

    /// Records how the run ended (only if our claim is still the current entry).
    pub async fn finish(
        &self,
        export_id: &str,
        claim_etag: &str,
        status: LedgerStatus,
        report: Option<String>,
    ) -> Result<(), LedgerError> {
        self.finish_stalled(
            export_id,
            claim_etag,
            status,
            report,
            HandOverCounts::default(),
        )
        .await
    }

    /// [`Ledger::finish`] for a run that handed over, with the counts the next run of the
    /// export carries on ([`HandOverCounts`]).
    pub async fn finish_stalled(
        &self,
        export_id: &str,
        claim_etag: &str,
        status: LedgerStatus,
        report: Option<String>,
        counts: HandOverCounts,
    ) -> Result<(), LedgerError> {
        let entry = LedgerEntry {
            stalled: counts.stalled,
            budget_wait_since: counts.budget_wait_since,
            route_waits: counts.route_waits,
            ..LedgerEntry::ended(status, export_id, report, None)
        };
        self.write_over(export_id, claim_etag, &entry).await?;
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use bridge_shared::lossy_store::LossyStore;
    use bridge_shared::object_store::MemoryStore;

    #[tokio::test]
    async fn a_forced_upload_replays_once_and_its_duplicate_notifications_are_no_ops() {
        let store = MemoryStore::new();
        let plain = Ledger::new(&store, "state", "s/r/ledger/".into());
        let Claim::Acquired { etag } = plain.claim("x", 100, 60, false).await.unwrap() else {
            panic!("first claim must acquire")
        };
        plain
            .finish("x", &etag, LedgerStatus::Complete, None)
            .await
            .unwrap();
        // The same object copied over itself with bridge-force-full: replayed once.
        let upload1 = Ledger::new(&store, "state", "s/r/ledger/".into())
            .forced_upload(Some("2026-01-01T01:00:00Z".into()));
        let Claim::Acquired { etag } = upload1.claim("x", 200, 60, true).await.unwrap() else {
            panic!("a forced upload takes the complete entry over")
        };
        upload1
            .finish(
                "x",
                &etag,
                LedgerStatus::Complete,
                Some("forced.json".into()),
            )
            .await
            .unwrap();
        assert_eq!(
            upload1.claim("x", 210, 60, true).await.unwrap(),
            Claim::AlreadyComplete {
                report: Some("forced.json".into())
            },
            "a duplicate notification of the forced upload is a no-op"
        );
        // A new forced upload, and the operator's --force-full, replay again.
        let upload2 = Ledger::new(&store, "state", "s/r/ledger/".into())
            .forced_upload(Some("2026-01-01T02:00:00Z".into()));
        assert!(matches!(
            upload2.claim("x", 220, 60, true).await.unwrap(),
            Claim::Acquired { .. }
        ));
        let entry = plain.entry("x").await.unwrap().unwrap();
        assert_eq!(entry.forced.as_deref(), Some("2026-01-01T02:00:00Z"));
    }

    #[tokio::test]
    async fn second_claim_of_a_complete_export_is_a_no_op() {
        let store = MemoryStore::new();
        let l = Ledger::new(&store, "state", "s/r/ledger/".into());
        let Claim::Acquired { etag } = l.claim("x", 100, 60, false).await.unwrap() else {
            panic!("first claim must acquire")
        };
        assert_eq!(l.claim("x", 110, 60, false).await.unwrap(), Claim::Busy);
        l.finish("x", &etag, LedgerStatus::Complete, Some("r.json".into()))
            .await
            .unwrap();
        assert_eq!(
            l.claim("x", 120, 60, false).await.unwrap(),
            Claim::AlreadyComplete {
                report: Some("r.json".into())
            }
        );
        assert!(matches!(
            l.claim("x", 120, 60, true).await.unwrap(),
            Claim::Acquired { .. }
        ));
    }

    #[tokio::test]
    async fn a_retryable_failure_is_not_final_so_the_same_etag_runs_again() {
        let store = MemoryStore::new();
        let l = Ledger::new(&store, "state", "p/".into());
        let Claim::Acquired { etag } = l.claim("k#etag1", 100, 60, false).await.unwrap() else {
            panic!()
        };
        l.finish(
            "k#etag1",
            &etag,
            LedgerStatus::FailedRetryable,
            Some("r.json".into()),
        )
        .await
        .unwrap();
        assert!(!LedgerStatus::FailedRetryable.is_final());
        let Claim::Acquired { etag } = l.claim("k#etag1", 101, 60, false).await.unwrap() else {
            panic!("a redelivery of a retryably failed export must run again")
        };
        let (_, body) = store
            .get(&S3Uri::new("state", format!("p/{}", entry_name("k#etag1"))))
            .await
            .unwrap();
        let entry: LedgerEntry = serde_json::from_slice(&body).unwrap();
        assert_eq!(entry.status, LedgerStatus::Running);
        l.finish("k#etag1", &etag, LedgerStatus::Complete, None)
            .await
            .unwrap();
        assert!(matches!(
            l.claim("k#etag1", 102, 60, false).await.unwrap(),
            Claim::AlreadyComplete { .. }
        ));
    }

    #[tokio::test]
    async fn a_renewed_claim_stays_busy_past_its_first_lease() {
        let store = MemoryStore::new();
        let l = Ledger::new(&store, "state", "p/".into());
        let Claim::Acquired { etag } = l.claim("z", 100, 60, false).await.unwrap() else {
            panic!()
        };
        let etag = l.renew("z", &etag, 150, 60).await.unwrap();
        assert_eq!(l.claim("z", 170, 60, false).await.unwrap(), Claim::Busy);
        l.finish("z", &etag, LedgerStatus::Complete, None)
            .await
            .unwrap();
    }

    /// The claim's renewals while a run works: one lands with its answer lost.
    async fn renewing_with_a_lost_answer(renewals: u32) -> (LossyStore, String) {
        let store = LossyStore::new();
        let l = Ledger::new(&store, "state", "p/".into());
        let Claim::Acquired { mut etag } = l.claim("w", 100, 60, false).await.unwrap() else {
            panic!()
        };
        let every = crate::state::lease::renew_every(60);
        store.lose_puts(1);
        let work = tokio::time::sleep(every * renewals + std::time::Duration::from_millis(1));
        l.renewing(work, "w", &mut etag, 60).await;
        (store, etag)
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_whose_answer_was_lost_is_recognised_and_the_run_still_ends_its_claim() {
        // The lost renewal is the last before the work ends: settled after it.
        let (store, etag) = renewing_with_a_lost_answer(1).await;
        let l = Ledger::new(&store, "state", "p/".into());
        l.finish("w", &etag, LedgerStatus::Complete, None)
            .await
            .unwrap();
        assert_eq!(
            l.entry("w").await.unwrap().unwrap().status,
            LedgerStatus::Complete
        );
        // The next renewal carries on from the lost one.
        let (store, etag) = renewing_with_a_lost_answer(2).await;
        let l = Ledger::new(&store, "state", "p/".into());
        l.finish("w", &etag, LedgerStatus::Incomplete, None)
            .await
            .unwrap();
    }

    #[tokio::test]
    async fn an_expired_lease_or_incomplete_run_can_be_taken_over() {
        let store = MemoryStore::new();
        let l = Ledger::new(&store, "state", "p/".into());
        let Claim::Acquired { etag } = l.claim("y", 100, 60, false).await.unwrap() else {
            panic!()
        };
        assert!(matches!(
            l.claim("y", 200, 60, false).await.unwrap(),
            Claim::Acquired { .. }
        ));
        // Our old claim lost its place: finishing with it fails.
        assert!(
            l.finish("y", &etag, LedgerStatus::Complete, None)
                .await
                .is_err()
        );
    }

    #[tokio::test]
    async fn a_fanned_out_export_stays_open_until_its_last_piece_finishes_it() {
        let store = MemoryStore::new();
        let l = Ledger::new(&store, "state", "p/".into());
        let Claim::Acquired { etag } = l.claim("f", 100, 60, false).await.unwrap() else {
            panic!()
        };
        l.finish_fanned_out("f", &etag, "run1", Some("r.json".into()), 0)
            .await
            .unwrap();
        for force in [false, true] {
            assert_eq!(
                l.claim("f", 200, 60, force).await.unwrap(),
                Claim::FannedOut {
                    run_id: "run1".into(),
                    requeue: 0,
                }
            );
        }
        // Another run's ending is not recorded over it; the fan-out's own is.
        l.finish_fan_out("f", "run0", LedgerStatus::Failed, None)
            .await
            .unwrap();
        assert_eq!(
            l.entry("f").await.unwrap().unwrap().status,
            LedgerStatus::FannedOut
        );
        l.finish_fan_out("f", "run1", LedgerStatus::Complete, None)
            .await
            .unwrap();
        assert!(matches!(
            l.claim("f", 300, 60, false).await.unwrap(),
            Claim::AlreadyComplete { .. }
        ));
        // Never over a complete entry.
        l.finish_fan_out("f", "run1", LedgerStatus::Failed, None)
            .await
            .unwrap();
        assert_eq!(
            l.entry("f").await.unwrap().unwrap().status,
            LedgerStatus::Complete
        );
        // A dead fan-out's export is taken over only under its run id.
        let Claim::Acquired { etag } = l.claim("g", 100, 60, false).await.unwrap() else {
            panic!()
        };
        l.finish_fanned_out("g", &etag, "run2", None, 0)
            .await
            .unwrap();
        assert_eq!(
            l.take_over_fan_out("g", "other", 200, 60).await.unwrap(),
            Claim::Busy
        );
        assert!(matches!(
            l.take_over_fan_out("g", "run2", 200, 60).await.unwrap(),
            Claim::Acquired { .. }
        ));
        // A last piece finishing before its coordinator recorded the fan-out writes over the
        // coordinator's running claim.
        let Claim::Acquired { etag } = l.claim("h", 100, 60, false).await.unwrap() else {
            panic!()
        };
        l.finish_fan_out("h", "run3", LedgerStatus::Complete, None)
            .await
            .unwrap();
        assert!(
            l.finish_fanned_out("h", &etag, "run3", None, 0)
                .await
                .is_err(),
            "the coordinator's late record loses"
        );
        assert_eq!(
            l.entry("h").await.unwrap().unwrap().status,
            LedgerStatus::Complete
        );
    }
}
