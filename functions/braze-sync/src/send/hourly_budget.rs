//! The workspace's hourly request budget (`BRAZE_HOURLY_REQUEST_LIMIT`): the `/users/track`
//! requests this deployment's senders may make together per clock hour (UTC), so one big sync
//! cannot spend the hour other integrations need. The senders share it beside the sender
//! registry's leases ([`crate::send::workspace_share`]), through one counter object per hour,
//! `<STATE_PREFIX>_workspace/budget/<YYYY-MM-DDTHH>.json`, claimed in blocks by conditional
//! writes: a sender claims a block of requests (at most what is left), spends it, and claims
//! again; when the hour's counter has nothing left, the sender stops and its run hands over
//! until the next hour.
//!
//! A request goes out only with a token of its own hour's counter, so the senders together
//! never exceed the limit: a sender that dies loses its unspent block for the hour, and a
//! claim whose answer was lost is claimed again, so the count errs high, never low. No request
//! goes out within [`EDGE`] of the turn of an hour, so a clock a little off Braze's never
//! counts a request in the wrong hour. A sender that ends gives its unspent tokens back.
//!
//! [`BudgetCore`] is one sender's accounting (pure; fake clock in tests); [`HourlyBudget`] is
//! the shared counter in the state bucket; [`Spender`] runs the two beside a delivery.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bridge_shared::{ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tracing::{debug, info, warn};

/// The folder, under the state prefix, of the hourly counters (beside the senders' leases).
pub const BUDGET_FOLDER: &str = "_workspace/budget/";

/// One hour, in milliseconds.
pub const HOUR_MS: i64 = 3_600_000;

/// No request goes out this close to the turn of an hour (either side).
pub const EDGE: Duration = Duration::from_secs(1);

/// The longest an export waits for the hourly request budget without sending a request
/// (through consecutive hours whose budget other runs spent): the run that finds it waited
/// this long fails (`stopped: hourly_budget_starved`) instead of waiting again.
pub const MAX_BUDGET_WAIT: Duration = Duration::from_secs(24 * 3600);

/// Whether an export that began waiting for the budget at `since_ms` without sending has
/// waited [`MAX_BUDGET_WAIT`] by `now_ms` (epoch milliseconds).
pub fn starved(since_ms: i64, now_ms: i64) -> bool {
    now_ms.saturating_sub(since_ms) >= MAX_BUDGET_WAIT.as_millis() as i64
}

/// Conditional writes one claim tries before giving up (other senders kept winning).
const CLAIM_ATTEMPTS: u32 = 32;

/// The clock hour of `ms` (epoch milliseconds): hours since the epoch.
pub fn hour_of(ms: i64) -> i64 {
    ms.div_euclid(HOUR_MS)
}

/// When the hour after `hour` opens for sending (epoch ms): its start plus [`EDGE`].
pub fn next_opening(hour: i64) -> i64 {
    (hour + 1) * HOUR_MS + EDGE.as_millis() as i64
}

/// The hour as its counter is named: `2026-12-07T02`.
pub fn hour_name(hour: i64) -> String {
    chrono::DateTime::from_timestamp(hour * 3600, 0)
        .map(|t| t.format("%Y-%m-%dT%H").to_string())
        .unwrap_or_else(|| hour.to_string())
}

/// The time of an epoch-ms instant as `HH:MM:SS` UTC, for notes and logs.
pub fn clock_time(ms: i64) -> String {
    chrono::DateTime::from_timestamp_millis(ms)
        .map(|t| t.format("%H:%M:%S UTC").to_string())
        .unwrap_or_else(|| ms.to_string())
}

/// What a sender does before its next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Take {
    /// Send it (one token spent).
    Go,
    /// Claim up to `want` tokens of `hour` from the shared counter first.
    Claim {
        /// The hour (see [`hour_of`]).
        hour: i64,
        /// Tokens wanted.
        want: u64,
    },
    /// Too close to the turn of the hour: wait until `until_ms`.
    Wait {
        /// Epoch ms.
        until_ms: i64,
    },
    /// The hour's budget is spent: stop sending; the next hour opens at `until_ms`.
    Spent {
        /// Epoch ms.
        until_ms: i64,
    },
}

/// One sender's accounting: the tokens it holds for the current hour. Times are epoch ms.
#[derive(Debug, Clone)]
pub struct BudgetCore {
    block: u64,
    edge_ms: i64,
    hour: i64,
    held: u64,
    spent: bool,
}

impl BudgetCore {
    /// A sender of a workspace allowed `limit` requests an hour: it claims a fiftieth of the
    /// limit at a time (1 to 250 tokens), so several senders share the hour closely.
    pub fn new(limit: u64) -> Self {
        Self {
            block: (limit / 50).clamp(1, 250),
            edge_ms: EDGE.as_millis() as i64,
            hour: i64::MIN,
            held: 0,
            spent: false,
        }
    }

    /// Tokens held for the current hour, not yet spent.
    pub fn held(&self) -> u64 {
        self.held
    }

    /// What to do before a request at `now_ms`. Tokens of a past hour are dropped.
    pub fn take(&mut self, now_ms: i64) -> Take {
        let hour = hour_of(now_ms);
        let into = now_ms - hour * HOUR_MS;
        if into < self.edge_ms {
            return Take::Wait {
                until_ms: hour * HOUR_MS + self.edge_ms,
            };
        }
        if into >= HOUR_MS - self.edge_ms {
            return Take::Wait {
                until_ms: next_opening(hour),
            };
        }
        if hour != self.hour {
            self.hour = hour;
            self.held = 0;
            self.spent = false;
        }
        if self.held > 0 {
            self.held -= 1;
            return Take::Go;
        }
        if self.spent {
            return Take::Spent {
                until_ms: next_opening(hour),
            };
        }
        Take::Claim {
            hour,
            want: self.block,
        }
    }

    /// The shared counter granted `granted` tokens of `hour` (0: the hour is spent). A grant
    /// for an hour that has passed meanwhile is dropped.
    pub fn claimed(&mut self, hour: i64, granted: u64) {
        if hour != self.hour {
            return;
        }
        if granted == 0 {
            self.spent = true;
        }
        self.held += granted;
    }

    /// The tokens still held and their hour, to give back when the sender ends.
    pub fn leftover(&mut self) -> Option<(i64, u64)> {
        let n = std::mem::take(&mut self.held);
        (n > 0).then_some((self.hour, n))
    }
}

/// One hour's counter, as stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CounterDoc {
    /// The hour, `YYYY-MM-DDTHH` (UTC).
    pub hour: String,
    /// The limit when last written.
    pub limit: u64,
    /// Tokens claimed by senders this hour (requests made or about to be).
    pub spent: u64,
}

/// The counter could not be claimed from.
#[derive(Debug, thiserror::Error)]
pub enum BudgetError {
    /// The store failed.
    #[error("hourly request budget: {0}")]
    Store(#[from] StoreError),
    /// The counter does not parse.
    #[error("hourly request budget: {uri} is not a counter: {reason}")]
    Corrupt {
        /// The counter object.
        uri: S3Uri,
        /// Why.
        reason: String,
    },
    /// Other senders won every conditional write.
    #[error("hourly request budget: {uri} kept changing under {attempts} claims")]
    Contended {
        /// The counter object.
        uri: S3Uri,
        /// Claims tried.
        attempts: u32,
    },
}

/// The workspace's shared hourly counters in the state bucket.
#[derive(Clone)]
pub struct HourlyBudget {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    folder: String,
    limit: u64,
}

impl std::fmt::Debug for HourlyBudget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "HourlyBudget({} an hour, s3://{}/{})",
            self.limit, self.bucket, self.folder
        )
    }
}

impl HourlyBudget {
    /// `limit` requests an hour, counted under `state_prefix` in `bucket`.
    pub fn new(store: Arc<dyn ObjectStore>, bucket: &str, state_prefix: &str, limit: u64) -> Self {
        let mut folder = state_prefix.to_string();
        if !folder.is_empty() && !folder.ends_with('/') {
            folder.push('/');
        }
        folder.push_str(BUDGET_FOLDER);
        Self {
            store,
            bucket: bucket.to_string(),
            folder,
            limit,
        }
    }

    /// Requests allowed per clock hour.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// The counter object of `hour`.
    pub fn uri(&self, hour: i64) -> S3Uri {
        S3Uri::new(
            &self.bucket,
            format!("{}{}.json", self.folder, hour_name(hour)),
        )
    }

    /// The counter of `hour` and its ETag (`None`: nothing claimed yet).
    pub async fn read(&self, hour: i64) -> Result<Option<(String, CounterDoc)>, BudgetError> {
        let uri = self.uri(hour);
        match self.store.get(&uri).await {
            Ok((meta, body)) => match serde_json::from_slice::<CounterDoc>(&body) {
                Ok(doc) => Ok(Some((meta.etag, doc))),
                Err(e) => Err(BudgetError::Corrupt {
                    uri,
                    reason: e.to_string(),
                }),
            },
            Err(StoreError::NotFound { .. }) => Ok(None),
            Err(e) => Err(e.into()),
        }
    }

    /// Adds `delta` (negative: gives back) to `hour`'s counter, bounded by the limit when
    /// claiming; returns what was added (0: nothing left).
    async fn add(&self, hour: i64, delta: i64) -> Result<u64, BudgetError> {
        let uri = self.uri(hour);
        for _ in 0..CLAIM_ATTEMPTS {
            let current = self.read(hour).await?;
            let (cond, mut doc) = match current {
                Some((etag, doc)) => (PutCondition::IfMatch(etag), doc),
                None => (PutCondition::IfAbsent, CounterDoc::default()),
            };
            let moved = if delta >= 0 {
                (delta as u64).min(self.limit.saturating_sub(doc.spent))
            } else {
                delta.unsigned_abs().min(doc.spent)
            };
            if moved == 0 {
                return Ok(0);
            }
            doc.hour = hour_name(hour);
            doc.limit = self.limit;
            doc.spent = match delta >= 0 {
                true => doc.spent + moved,
                false => doc.spent - moved,
            };
            let body = Bytes::from(serde_json::to_vec(&doc).unwrap_or_default());
            let mut meta = BTreeMap::new();
            meta.insert("content-type".to_string(), "application/json".to_string());
            match self.store.put(&uri, body, cond, meta).await {
                Ok(_) => return Ok(moved),
                Err(StoreError::PreconditionFailed { .. }) => continue,
                Err(e) => return Err(e.into()),
            }
        }
        Err(BudgetError::Contended {
            uri,
            attempts: CLAIM_ATTEMPTS,
        })
    }

    /// Claims up to `want` tokens of `hour`; 0 when the hour's budget is spent.
    pub async fn claim(&self, hour: i64, want: u64) -> Result<u64, BudgetError> {
        self.add(hour, i64::try_from(want).unwrap_or(i64::MAX))
            .await
    }

    /// Gives `n` unspent tokens of `hour` back.
    pub async fn give_back(&self, hour: i64, n: u64) -> Result<u64, BudgetError> {
        self.add(hour, -i64::try_from(n).unwrap_or(i64::MAX)).await
    }

    /// When sending may resume if the hour of `now_ms` has nothing left (epoch ms); `None`
    /// while tokens are left (or the counter cannot be read: the run finds out by sending).
    pub async fn spent_until(&self, now_ms: i64) -> Option<i64> {
        let hour = hour_of(now_ms);
        match self.read(hour).await {
            Ok(Some((_, doc))) if doc.spent >= self.limit => Some(next_opening(hour)),
            Ok(_) => None,
            Err(e) => {
                warn!(error = %e, "Could not read the hourly request budget; not waiting for it.");
                None
            }
        }
    }
}

/// Why a sender may not send now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    /// When sending may resume (epoch ms): the next hour's opening.
    pub until_ms: i64,
    /// What happened, for the batch's unsent reason.
    pub reason: String,
}

/// One sender's spending of the hourly budget: a token per request, claimed in blocks.
pub struct Spender {
    budget: HourlyBudget,
    core: tokio::sync::Mutex<BudgetCore>,
}

impl std::fmt::Debug for Spender {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Spender({:?})", self.budget)
    }
}

impl Spender {
    /// A sender's account of `budget`.
    pub fn new(budget: HourlyBudget) -> Self {
        let core = BudgetCore::new(budget.limit());
        Self {
            budget,
            core: tokio::sync::Mutex::new(core),
        }
    }

    /// A token for one request now: waits through the turn of an hour, claims a block when
    /// none is held. `Err` when the hour's budget is spent (or the counter cannot be claimed
    /// from): the sender stops and its run hands over.
    pub async fn take(&self) -> Result<(), Refusal> {
        loop {
            let mut core = self.core.lock().await;
            let now = crate::clock::now_ms();
            match core.take(now) {
                Take::Go => return Ok(()),
                Take::Wait { until_ms } => {
                    drop(core);
                    let wait = u64::try_from(until_ms.saturating_sub(now)).unwrap_or(0);
                    debug!(wait_ms = wait, "Waiting out the turn of the hour.");
                    tokio::time::sleep(Duration::from_millis(wait)).await;
                }
                Take::Spent { until_ms } => {
                    return Err(Refusal {
                        until_ms,
                        reason: format!(
                            "the workspace's hourly request budget ({} requests) is spent until {}",
                            self.budget.limit(),
                            clock_time(until_ms)
                        ),
                    });
                }
                Take::Claim { hour, want } => match self.budget.claim(hour, want).await {
                    Ok(granted) => {
                        if granted == 0 {
                            info!(
                                limit = self.budget.limit(),
                                hour = %hour_name(hour),
                                "The workspace's hourly request budget is spent; stopping until the next hour."
                            );
                        }
                        core.claimed(hour, granted);
                    }
                    Err(e) => {
                        warn!(error = %e, "Could not claim from the hourly request budget; stopping the sender.");
                        return Err(Refusal {
                            until_ms: now,
                            reason: e.to_string(),
                        });
                    }
                },
            }
        }
    }

    /// Gives the tokens this sender still holds back to the hour's counter (best effort).
    pub async fn finish(&self) {
        let leftover = self.core.lock().await.leftover();
        if let Some((hour, n)) = leftover
            && let Err(e) = self.budget.give_back(hour, n).await
        {
            debug!(error = %e, tokens = n, "Could not give unspent hourly tokens back.");
        }
    }
}

#[cfg(test)]
#[path = "hourly_budget_tests.rs"]
mod tests;
