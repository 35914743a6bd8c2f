//! Shares one Braze workspace's `/users/track` limit among the senders running at once
//! (separate Lambda invocations for different routes, a shell `braze-sync run`), with no server
//! of its own: every live sender keeps a small lease object,
//! `<STATE_PREFIX>_workspace/senders/<route>--<run-id>.json`, in the state bucket, rewritten every
//! `renew_every`; every `poll_every` it lists that folder and counts the leases written within
//! `lease_ttl` (its own included). A sender counts only while it sends: it joins when its first
//! request is ready ([`Activity::sending`]), and leaves once it had nothing to send for
//! `idle_after` (a run still diffing, a piece waiting for its deltas), so idle senders take no
//! share of the limit ([`WorkspaceShare::while_sending`]). Its rate limiter then paces at `1 / senders` of the budget
//! ([`crate::send::rate_limit::LimiterCore::set_peers`]), so the senders together stay at the
//! workspace limit, and re-balance within one poll as senders come and go. A sender deletes its
//! lease when it ends; one that dies stops counting after `lease_ttl`, and its lease is deleted
//! by the next sender that lists it after `forget_after`.
//!
//! Only the listing is read (one LIST per poll, no GETs): a lease is live by its
//! `LastModified`, judged against the `LastModified` of this sender's own lease in the same
//! listing, so the clocks of S3 and of the function are never compared. Each sender writes only
//! its own key, so plain puts suffice. The registry is advisory: when S3 fails, the sender keeps
//! the last count it knew (one, at first) and the server's `X-RateLimit-*` headers still pace
//! it; a sync never fails because of it.
//!
//! [`ShareCore`] is the pure part (what to do when, and what a listing means; fake clock in
//! tests); [`SenderRegistry`] is its S3 I/O; [`WorkspaceShare`] runs the two beside a sender.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use bridge_shared::{ObjectMeta, ObjectStore, PutCondition, S3Uri, StoreError};
use bytes::Bytes;
use serde::Serialize;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// The folder, under the state prefix, that holds the senders' leases. Route names cannot start
/// with `_`, so no route's state can sit there.
pub const SENDERS_FOLDER: &str = "_workspace/senders/";

/// How often leases are written and read.
#[derive(Debug, Clone, PartialEq)]
pub struct ShareSettings {
    /// A lease not rewritten for this long no longer counts (its sender died or stalled).
    pub lease_ttl: Duration,
    /// How often a sender rewrites its lease (well under `lease_ttl`).
    pub renew_every: Duration,
    /// How often a sender lists the leases and re-balances.
    pub poll_every: Duration,
    /// Quick extra polls right after joining, so senders that start together see each other
    /// before a full `poll_every` has passed.
    pub first_polls: Vec<Duration>,
    /// A lease expired for this long is deleted by whoever lists it.
    pub forget_after: Duration,
    /// Longest a sender waits for the first registration before sending anyway.
    pub join_timeout: Duration,
    /// A sender with nothing to send for this long leaves the registry (and joins again when
    /// it has requests to send).
    pub idle_after: Duration,
}

impl Default for ShareSettings {
    fn default() -> Self {
        Self {
            lease_ttl: Duration::from_secs(15),
            renew_every: Duration::from_secs(3),
            poll_every: Duration::from_secs(1),
            first_polls: vec![Duration::from_millis(150), Duration::from_millis(400)],
            forget_after: Duration::from_secs(600),
            join_timeout: Duration::from_secs(3),
            idle_after: Duration::from_secs(5),
        }
    }
}

/// One lease as a listing shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LeaseSeen {
    /// The object key.
    pub key: String,
    /// Its `LastModified`, epoch milliseconds (S3's clock, whole seconds at S3).
    pub written_ms: i64,
}

impl LeaseSeen {
    /// From a listing entry; `None` when it carries no readable `LastModified`.
    pub fn from_meta(meta: &ObjectMeta) -> Option<Self> {
        let at = meta.last_modified.as_deref()?;
        let written = chrono::DateTime::parse_from_rfc3339(at).ok()?;
        Some(Self {
            key: meta.key.clone(),
            written_ms: written.timestamp_millis(),
        })
    }
}

/// What is due next.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Step {
    /// Write our lease again.
    Renew,
    /// List the leases.
    Poll,
}

/// What a listing says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// Live senders, this one included (at least one).
    pub senders: u32,
    /// Leases of senders long dead, to delete.
    pub forget: Vec<String>,
}

/// The pure core of one sender's membership. Times are epoch milliseconds of the local clock.
#[derive(Debug, Clone)]
pub struct ShareCore {
    settings: ShareSettings,
    me: String,
    joined_ms: Option<i64>,
    renewed_ms: Option<i64>,
    polled_ms: Option<i64>,
    polls: usize,
    senders: u32,
}

impl ShareCore {
    /// The core of the sender whose lease key is `me`.
    pub fn new(settings: ShareSettings, me: impl Into<String>) -> Self {
        Self {
            settings,
            me: me.into(),
            joined_ms: None,
            renewed_ms: None,
            polled_ms: None,
            polls: 0,
            senders: 1,
        }
    }

    /// Live senders as of the last listing (this one included).
    pub fn senders(&self) -> u32 {
        self.senders
    }

    /// This sender's lease key.
    pub fn me(&self) -> &str {
        &self.me
    }

    fn ms(d: Duration) -> i64 {
        i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
    }

    fn poll_gap(&self) -> Duration {
        // The quick polls after joining count from the join, the rest from the last poll.
        self.settings
            .first_polls
            .get(self.polls.saturating_sub(1))
            .copied()
            .unwrap_or(self.settings.poll_every)
    }

    /// When the next step is due (epoch ms), and which; the renewal wins a tie.
    pub fn next(&self) -> (i64, Step) {
        let renew_at = match self.renewed_ms {
            None => i64::MIN,
            Some(t) => t.saturating_add(Self::ms(self.settings.renew_every)),
        };
        let poll_at = match (self.polled_ms, self.joined_ms) {
            (None, _) => i64::MIN,
            (Some(_), Some(joined)) if self.polls <= self.settings.first_polls.len() => {
                joined.saturating_add(Self::ms(self.poll_gap()))
            }
            (Some(t), _) => t.saturating_add(Self::ms(self.settings.poll_every)),
        };
        if renew_at <= poll_at {
            (renew_at, Step::Renew)
        } else {
            (poll_at, Step::Poll)
        }
    }

    /// Our lease was written at `now_ms`.
    pub fn renewed(&mut self, now_ms: i64) {
        self.joined_ms.get_or_insert(now_ms);
        self.renewed_ms = Some(now_ms);
    }

    /// A renewal failed at `now_ms`: try again at the next poll's pace rather than at once.
    pub fn renew_failed(&mut self, now_ms: i64) {
        let back = Self::ms(self.settings.renew_every) - Self::ms(self.settings.poll_every);
        self.renewed_ms = Some(now_ms.saturating_sub(back.max(0)));
    }

    /// A poll failed at `now_ms`: keep the last count, try again at the next poll.
    pub fn poll_failed(&mut self, now_ms: i64) {
        self.polled_ms = Some(now_ms);
        self.polls += 1;
    }

    /// The leases listed at `now_ms`: how many senders are live, and which leases to forget.
    pub fn listed(&mut self, now_ms: i64, leases: &[LeaseSeen]) -> Listing {
        self.polled_ms = Some(now_ms);
        self.polls += 1;
        // S3's clock now: our own lease's LastModified plus the local time since we wrote it
        // (S3 truncates to the second, so this errs towards counting a sender a little longer).
        let mine = leases.iter().find(|l| l.key == self.me);
        let s3_now = match (mine, self.renewed_ms) {
            (Some(m), Some(renewed)) => m.written_ms.saturating_add(now_ms - renewed),
            _ => now_ms,
        };
        let ttl = Self::ms(self.settings.lease_ttl);
        let forget_after = Self::ms(self.settings.forget_after).max(ttl);
        let mut senders: u32 = 1;
        let mut forget = Vec::new();
        for l in leases.iter().filter(|l| l.key != self.me) {
            let age = s3_now.saturating_sub(l.written_ms);
            if age <= ttl {
                senders = senders.saturating_add(1);
            } else if age > forget_after {
                forget.push(l.key.clone());
            }
        }
        self.senders = senders;
        Listing { senders, forget }
    }
}

/// The lease's content, for operators looking at the folder (liveness comes from the listing).
#[derive(Debug, Clone, Serialize)]
struct LeaseDoc<'a> {
    route: &'a str,
    run_id: &'a str,
    renewed_at: String,
    lease_ttl_s: u64,
}

/// The senders' folder in the state bucket.
#[derive(Clone)]
pub struct SenderRegistry {
    store: Arc<dyn ObjectStore>,
    bucket: String,
    folder: String,
}

impl std::fmt::Debug for SenderRegistry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "SenderRegistry(s3://{}/{})", self.bucket, self.folder)
    }
}

impl SenderRegistry {
    /// The registry under `state_prefix` in `bucket`.
    pub fn new(store: Arc<dyn ObjectStore>, bucket: &str, state_prefix: &str) -> Self {
        let mut folder = state_prefix.to_string();
        if !folder.is_empty() && !folder.ends_with('/') {
            folder.push('/');
        }
        folder.push_str(SENDERS_FOLDER);
        Self {
            store,
            bucket: bucket.to_string(),
            folder,
        }
    }

    /// The lease key of a run of `route`.
    pub fn key_of(&self, route: &str, run_id: &str) -> String {
        format!("{}{route}--{run_id}.json", self.folder)
    }

    fn uri(&self, key: &str) -> S3Uri {
        S3Uri::new(&self.bucket, key)
    }

    /// Writes (or rewrites) a lease.
    pub async fn renew(
        &self,
        key: &str,
        route: &str,
        run_id: &str,
        ttl: Duration,
    ) -> Result<(), StoreError> {
        let doc = LeaseDoc {
            route,
            run_id,
            renewed_at: crate::clock::now().to_rfc3339(),
            lease_ttl_s: ttl.as_secs(),
        };
        let body = Bytes::from(serde_json::to_vec(&doc).unwrap_or_default());
        let mut meta = BTreeMap::new();
        meta.insert("content-type".to_string(), "application/json".to_string());
        self.store
            .put(&self.uri(key), body, PutCondition::None, meta)
            .await
            .map(|_| ())
    }

    /// Every lease in the folder.
    pub async fn list(&self) -> Result<Vec<LeaseSeen>, StoreError> {
        let metas = self.store.list(&self.bucket, &self.folder).await?;
        Ok(metas
            .iter()
            .filter(|m| m.key.ends_with(".json"))
            .filter_map(LeaseSeen::from_meta)
            .collect())
    }

    /// Deletes a lease (ours at the end, or a dead sender's).
    pub async fn delete(&self, key: &str) -> Result<(), StoreError> {
        self.store.delete(&self.uri(key)).await
    }
}

/// One sender's membership, run beside its delivery.
pub struct WorkspaceShare {
    registry: SenderRegistry,
    core: ShareCore,
    route: String,
    run_id: String,
    peers: watch::Sender<u32>,
    warned: bool,
}

fn now_ms() -> i64 {
    crate::clock::now().timestamp_millis()
}

impl WorkspaceShare {
    /// The membership of run `run_id` of `route`; the returned receiver carries the number of
    /// live senders (this one included) for [`crate::send::rate_limit::RateLimiter::shared`].
    pub fn new(
        registry: SenderRegistry,
        settings: ShareSettings,
        route: &str,
        run_id: &str,
    ) -> (Self, watch::Receiver<u32>) {
        let key = registry.key_of(route, run_id);
        let (tx, rx) = watch::channel(1);
        (
            Self {
                registry,
                core: ShareCore::new(settings, key),
                route: route.to_string(),
                run_id: run_id.to_string(),
                peers: tx,
                warned: false,
            },
            rx,
        )
    }

    /// Live senders as last counted.
    pub fn senders(&self) -> u32 {
        self.core.senders()
    }

    fn warn_once(&mut self, what: &str, e: &StoreError) {
        if !self.warned {
            warn!(error = %e, registry = ?self.registry, "Could not {what} the workspace's sender registry; pacing by the last count and Braze's rate-limit headers.");
            self.warned = true;
        } else {
            debug!(error = %e, "Sender registry: could not {what}.");
        }
    }

    async fn step(&mut self, step: Step) {
        let now = now_ms();
        match step {
            Step::Renew => {
                let ttl = self.core.settings.lease_ttl;
                match self
                    .registry
                    .renew(self.core.me(), &self.route, &self.run_id, ttl)
                    .await
                {
                    Ok(()) => self.core.renewed(now),
                    Err(e) => {
                        self.core.renew_failed(now);
                        self.warn_once("write our lease in", &e);
                    }
                }
            }
            Step::Poll => match self.registry.list().await {
                Ok(leases) => {
                    let before = self.core.senders();
                    let listing = self.core.listed(now_ms(), &leases);
                    if listing.senders != before {
                        info!(
                            senders = listing.senders,
                            "Senders sharing the workspace rate limit changed; re-balancing."
                        );
                    }
                    self.peers.send_replace(listing.senders);
                    for key in listing.forget {
                        if let Err(e) = self.registry.delete(&key).await {
                            debug!(key, error = %e, "Could not delete a dead sender's lease.");
                        }
                    }
                }
                Err(e) => {
                    self.core.poll_failed(now);
                    self.warn_once("list", &e);
                }
            },
        }
    }

    /// Registers and takes the first count (bounded by `join_timeout`: a slow store never
    /// holds the sender back for long).
    pub async fn join(&mut self) {
        let timeout = self.core.settings.join_timeout;
        let first = async {
            self.step(Step::Renew).await;
            self.step(Step::Poll).await;
        };
        if tokio::time::timeout(timeout, first).await.is_err() {
            warn!("The workspace's sender registry did not answer in time; sending meanwhile.");
        }
    }

    /// Joins, runs `work` (a delivery paced by this membership's peer count) while renewing and
    /// polling, then leaves. `work` is not polled before the join is done.
    pub async fn around<F: std::future::Future>(mut self, work: F) -> F::Output {
        self.join().await;
        tokio::pin!(work);
        let out = tokio::select! {
            biased;
            out = &mut work => out,
            // `keep` never ends; the work does.
            () = self.keep() => work.await,
        };
        self.leave().await;
        out
    }

    /// Runs the delivery `work` builds, counting among the workspace's senders only while it
    /// sends: the membership joins when the delivery's first request is ready (the request
    /// waits for the join, bounded by `join_timeout`), renews and polls while it sends, and
    /// leaves once the delivery had nothing to send for `idle_after`, joining again when it
    /// has. It leaves for good when the work ends.
    pub async fn while_sending<W, F>(mut self, work: W) -> F::Output
    where
        W: FnOnce(Activity) -> F,
        F: std::future::Future,
    {
        let (active_tx, mut active) = watch::channel(false);
        let (joined_tx, joined_rx) = watch::channel(false);
        let work = work(Activity {
            active: Arc::new(active_tx),
            joined: joined_rx,
        });
        tokio::pin!(work);
        let mut member = Member::default();
        let out = loop {
            tokio::select! {
                biased;
                out = &mut work => break out,
                () = self.follow(&mut active, &joined_tx, &mut member) => {}
            }
        };
        if member.tried {
            self.leave().await;
        }
        out
    }

    /// One step of a membership that follows its delivery's activity: join when it becomes
    /// active, renew and poll on schedule, leave when it was idle for `idle_after`.
    async fn follow(
        &mut self,
        active: &mut watch::Receiver<bool>,
        joined: &watch::Sender<bool>,
        m: &mut Member,
    ) {
        if !m.joined {
            if active.wait_for(|a| *a).await.is_err() {
                // The delivery no longer reports; it is ending.
                return std::future::pending().await;
            }
            m.tried = true;
            m.idle_since = None;
            self.join().await;
            m.joined = true;
            joined.send_replace(true);
            return;
        }
        let now = tokio::time::Instant::now();
        if *active.borrow_and_update() {
            m.idle_since = None;
        } else {
            m.idle_since.get_or_insert(now);
        }
        let idle_until = m.idle_since.map(|t| t + self.core.settings.idle_after);
        if idle_until.is_some_and(|t| t <= now) {
            // Idle long enough: the others take this sender's share at their next poll. A
            // request that becomes ready meanwhile waits for the next join.
            joined.send_replace(false);
            m.joined = false;
            self.leave().await;
            return;
        }
        let (at, step) = self.core.next();
        let due = Duration::from_millis(at.saturating_sub(now_ms()).max(0) as u64);
        tokio::select! {
            biased;
            () = tokio::time::sleep(due) => self.step(step).await,
            () = tokio::time::sleep_until(idle_until.unwrap_or(now)), if idle_until.is_some() => {}
            changed = active.changed() => {
                if changed.is_err() {
                    // The delivery no longer reports; it is ending.
                    std::future::pending::<()>().await;
                }
            }
        }
    }

    /// Renews and polls on schedule, forever; run it beside the delivery and drop it when the
    /// delivery ends, then call [`WorkspaceShare::leave`].
    pub async fn keep(&mut self) {
        loop {
            let (at, step) = self.core.next();
            let wait = at.saturating_sub(now_ms()).max(0) as u64;
            if wait > 0 {
                tokio::time::sleep(Duration::from_millis(wait)).await;
            }
            self.step(step).await;
        }
    }

    /// Deletes our lease, so the other senders take our share at their next poll.
    pub async fn leave(&self) {
        if let Err(e) = self.registry.delete(self.core.me()).await {
            warn!(error = %e, "Could not delete our sender lease; it stops counting by itself.");
        }
    }
}

/// Where a membership that follows its delivery stands.
#[derive(Debug, Default)]
struct Member {
    /// Its lease may be in the registry (a join was started since it last left).
    tried: bool,
    /// It counts among the senders.
    joined: bool,
    /// Since when its delivery has had nothing to send.
    idle_since: Option<tokio::time::Instant>,
}

/// A delivery's side of its membership ([`WorkspaceShare::while_sending`]): it says when it
/// has requests to send and when it has none.
#[derive(Clone)]
pub struct Activity {
    active: Arc<watch::Sender<bool>>,
    joined: watch::Receiver<bool>,
}

impl std::fmt::Debug for Activity {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "Activity(active: {}, joined: {})",
            *self.active.borrow(),
            *self.joined.borrow()
        )
    }
}

impl Activity {
    /// Requests are ready to go out: the sender is active, and this waits until it counts
    /// among the workspace's senders (at once while it does).
    pub async fn sending(&self) {
        self.active
            .send_if_modified(|a| !std::mem::replace(a, true));
        let mut joined = self.joined.clone();
        // The membership ended (its work is ending): nothing to wait for.
        let _ = joined.wait_for(|j| *j).await;
    }

    /// Nothing to send for now (waiting for deltas, or done).
    pub fn idle(&self) {
        self.active
            .send_if_modified(|a| std::mem::replace(a, false));
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::send::rate_limit::{LimiterCore, RateBudget};
    use bridge_shared::hooked_store::{Before, Call, Hooked};
    use bridge_shared::object_store::MemoryStore;

    fn settings() -> ShareSettings {
        ShareSettings::default()
    }

    fn lease(key: &str, written_ms: i64) -> LeaseSeen {
        LeaseSeen {
            key: key.into(),
            written_ms,
        }
    }

    #[test]
    fn a_new_sender_renews_then_polls_quickly_then_every_second() {
        let mut c = ShareCore::new(settings(), "me");
        assert_eq!(c.next().1, Step::Renew);
        c.renewed(10_000);
        assert_eq!(c.next(), (i64::MIN, Step::Poll));
        c.listed(10_020, &[lease("me", 10_000)]);
        // The quick polls after joining, then one per poll_every; renewals every 3 s.
        assert_eq!(c.next(), (10_150, Step::Poll));
        c.listed(10_150, &[]);
        assert_eq!(c.next(), (10_400, Step::Poll));
        c.listed(10_400, &[]);
        assert_eq!(c.next(), (11_400, Step::Poll));
        c.listed(11_400, &[]);
        assert_eq!(c.next(), (12_400, Step::Poll));
        c.listed(12_400, &[]);
        assert_eq!(c.next(), (13_000, Step::Renew));
    }

    #[test]
    fn live_leases_count_and_expired_ones_do_not() {
        let mut c = ShareCore::new(settings(), "me");
        c.renewed(100_000);
        let l = c.listed(
            100_500,
            &[
                lease("me", 100_000),
                lease("a", 99_000),
                lease("b", 86_000),           // 14.5 s old: still live
                lease("dead", 84_000),        // 16.5 s: expired
                lease("long-dead", -600_000), // expired 11 min ago: forgotten
            ],
        );
        assert_eq!(l.senders, 3);
        assert_eq!(l.forget, vec!["long-dead".to_string()]);
        // Alone: one sender, never zero.
        assert_eq!(c.listed(101_000, &[]).senders, 1);
    }

    #[test]
    fn liveness_is_judged_on_the_stores_clock_not_ours() {
        // Our clock runs 40 s ahead of S3's: compared with our clock, every lease would look
        // expired; compared with our own lease's LastModified, the other one is fresh.
        let mut c = ShareCore::new(settings(), "me");
        c.renewed(140_000);
        let l = c.listed(140_200, &[lease("me", 100_000), lease("other", 99_000)]);
        assert_eq!(l.senders, 2);
    }

    #[test]
    fn failures_keep_the_last_count_and_retry_later() {
        let mut c = ShareCore::new(settings(), "me");
        c.renewed(0);
        c.listed(10, &[lease("me", 0), lease("x", 0)]);
        c.poll_failed(160);
        assert_eq!(c.senders(), 2);
        c.listed(400, &[lease("me", 0), lease("x", 0)]);
        c.renew_failed(3_000);
        c.listed(3_000, &[lease("me", 0), lease("x", 0)]);
        // The renewal is tried again after a poll interval, not at once nor 3 s later.
        assert_eq!(c.next(), (4_000, Step::Renew));
    }

    /// One sender in the simulation: its membership, its limiter and what it sent.
    struct Sim {
        core: ShareCore,
        limiter: LimiterCore,
        joined: i64,
        left: Option<i64>,
        next_send: Option<Duration>,
        sent: Vec<i64>,
    }

    /// Senders joining and leaving one workspace over a shared registry, on a fake clock (1 ms
    /// steps): returns every sender's send times (ms).
    fn simulate(senders: &[(i64, Option<i64>)], until_ms: i64) -> Vec<Vec<i64>> {
        let budget = RateBudget {
            requests_per_window: 3_000,
            ..Default::default()
        };
        let mut registry: BTreeMap<String, i64> = BTreeMap::new();
        let mut sims: Vec<Sim> = senders
            .iter()
            .enumerate()
            .map(|(i, (joined, left))| Sim {
                core: ShareCore::new(settings(), format!("s{i}")),
                limiter: LimiterCore::new(budget),
                joined: *joined,
                left: *left,
                next_send: None,
                sent: Vec::new(),
            })
            .collect();
        for now in 0..until_ms {
            for s in sims.iter_mut() {
                if now < s.joined {
                    continue;
                }
                if s.left.is_some_and(|l| now >= l) {
                    registry.remove(s.core.me());
                    continue;
                }
                // Membership steps due now (a join registers and lists at once).
                while s.core.next().0 <= now {
                    match s.core.next().1 {
                        Step::Renew => {
                            registry.insert(s.core.me().to_string(), now);
                            s.core.renewed(now);
                        }
                        Step::Poll => {
                            let seen: Vec<LeaseSeen> =
                                registry.iter().map(|(k, t)| lease(k, *t)).collect();
                            let n = s.core.listed(now, &seen).senders;
                            s.limiter.set_peers(n);
                        }
                    }
                }
                // Sends as fast as its limiter allows.
                let t = Duration::from_millis((now - s.joined) as u64);
                loop {
                    let slot = match s.next_send {
                        Some(slot) => slot,
                        None => s.limiter.reserve(t),
                    };
                    if slot > t {
                        s.next_send = Some(slot);
                        break;
                    }
                    s.next_send = None;
                    s.sent.push(now);
                }
            }
        }
        sims.into_iter().map(|s| s.sent).collect()
    }

    fn in_span(sent: &[i64], from: i64, to: i64) -> usize {
        sent.iter().filter(|t| **t >= from && **t < to).count()
    }

    #[test]
    fn senders_joining_and_leaving_converge_to_the_shared_rate() {
        // Three senders: A from 0 s, B from 3 s, C from 6 s; B leaves at 9 s; until 12 s.
        let sent = simulate(&[(0, None), (3_000, Some(9_000)), (6_000, None)], 12_000);
        let total = |from: i64, to: i64| sent.iter().map(|s| in_span(s, from, to)).sum::<usize>();
        // Planned pace: 3,000 × 0.97 per 3 s = 970/s for the whole workspace.
        for (from, to, who) in [
            (1_000, 3_000, vec![0]),
            (4_500, 6_000, vec![0, 1]),
            (7_500, 9_000, vec![0, 1, 2]),
            (10_500, 12_000, vec![0, 2]),
        ] {
            let secs = (to - from) as f64 / 1000.0;
            let per_s = total(from, to) as f64 / secs;
            assert!(
                (900.0..=990.0).contains(&per_s),
                "{from}..{to}: the senders together sent {per_s}/s"
            );
            // Each live sender has an equal part.
            let each = 970.0 / who.len() as f64;
            for i in who {
                let mine = in_span(&sent[i], from, to) as f64 / secs;
                assert!(
                    (mine - each).abs() <= each * 0.08,
                    "{from}..{to}: sender {i} sent {mine}/s, expected ~{each}/s"
                );
            }
        }
        // No span of 3 s, even across a join, carries much more than the workspace limit: the
        // others take in a joiner at their next poll, so its extra share lasts one poll at
        // most (the server's Remaining/Reset headers absorb that rest in a real run).
        let mut all: Vec<i64> = sent.concat();
        all.sort_unstable();
        for (i, t) in all.iter().enumerate() {
            let n = all[i..].iter().take_while(|u| **u < *t + 3_000).count();
            assert!(n <= 3_150, "{n} requests in the 3 s from {t} ms");
        }
    }

    #[tokio::test]
    async fn registry_over_a_store_counts_joins_and_leaves() {
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let registry = SenderRegistry::new(store.clone(), "state", "bridge/state");
        let (mut a, a_peers) = WorkspaceShare::new(registry.clone(), settings(), "r1", "run-a");
        let (mut b, b_peers) = WorkspaceShare::new(registry.clone(), settings(), "r2", "run-b");
        a.join().await;
        assert_eq!(*a_peers.borrow(), 1);
        b.join().await;
        assert_eq!(*b_peers.borrow(), 2);
        let keys = registry.list().await.unwrap();
        assert_eq!(
            keys.iter().map(|l| l.key.as_str()).collect::<Vec<_>>(),
            vec![
                "bridge/state/_workspace/senders/r1--run-a.json",
                "bridge/state/_workspace/senders/r2--run-b.json"
            ]
        );
        a.step(Step::Poll).await;
        assert_eq!(*a_peers.borrow(), 2);
        b.leave().await;
        a.step(Step::Poll).await;
        assert_eq!(*a_peers.borrow(), 1);
        a.leave().await;
        assert!(registry.list().await.unwrap().is_empty());
    }

    /// A Braze that accepts everything.
    struct Accepting;

    #[async_trait::async_trait]
    impl crate::send::braze::BrazeApi for Accepting {
        async fn track(
            &self,
            _: Bytes,
        ) -> Result<crate::send::braze::TrackResponse, crate::send::braze::TrackError> {
            Ok(crate::send::braze::TrackResponse {
                status: 201,
                message: "success".into(),
                errors: Vec::new(),
                rate: Default::default(),
            })
        }
    }

    fn delta(i: u64) -> crate::model::UserDelta {
        crate::model::UserDelta {
            identifier: crate::model::Identifier::ExternalId(format!("u{i}")),
            pos: crate::model::RowPos {
                source: "s3://exports/a.csv".into(),
                row: i + 1,
                line: None,
            },
            changes: vec![crate::model::AttributeChange {
                name: "tier".into(),
                value: serde_json::json!("gold"),
                fingerprint: None,
            }],
            update_existing_only: false,
            is_new: true,
            row_digest: None,
        }
    }

    async fn members(registry: &SenderRegistry) -> Vec<String> {
        let mut keys: Vec<String> = registry
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.key.rsplit('/').next().unwrap().to_string())
            .collect();
        keys.sort();
        keys
    }

    #[tokio::test(start_paused = true)]
    async fn a_sender_counts_among_the_senders_only_while_it_has_requests_to_send() {
        use crate::send::deliver::{DeliverConfig, deliver};
        let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
        let registry = SenderRegistry::new(store, "state", "bridge/state");
        // A busy sender, and a piece whose producer has not handed it anything yet.
        let (busy, busy_peers) = WorkspaceShare::new(registry.clone(), settings(), "r1", "busy");
        let (piece, _) = WorkspaceShare::new(registry.clone(), settings(), "r2", "piece");
        let (stop_busy, stopped) = tokio::sync::oneshot::channel::<()>();
        let busy = tokio::spawn(busy.while_sending(|a| async move {
            a.sending().await;
            let _ = stopped.await;
        }));
        let (tx, rx) = tokio::sync::mpsc::channel(16);
        let (out_tx, mut out_rx) = tokio::sync::mpsc::channel(64);
        let sender = tokio::spawn(piece.while_sending(|activity| {
            let cfg = DeliverConfig {
                activity: Some(activity),
                ..DeliverConfig::default()
            };
            async move { deliver(rx, &Accepting, cfg, out_tx).await }
        }));
        tokio::spawn(async move { while out_rx.recv().await.is_some() {} });
        // While it waits for deltas, the piece takes no share: the busy sender paces alone.
        tokio::time::sleep(Duration::from_secs(10)).await;
        assert_eq!(members(&registry).await, vec!["r1--busy.json"]);
        assert_eq!(*busy_peers.borrow(), 1);
        // It joins when it has requests to send, and the busy sender makes room.
        for i in 0..3 {
            tx.send(delta(i)).await.unwrap();
        }
        tokio::time::sleep(Duration::from_millis(1_500)).await;
        assert_eq!(
            members(&registry).await,
            vec!["r1--busy.json", "r2--piece.json"]
        );
        assert_eq!(*busy_peers.borrow(), 2);
        // Idle again (its requests answered, nothing new): it leaves after `idle_after`.
        tokio::time::sleep(settings().idle_after + Duration::from_secs(2)).await;
        assert_eq!(members(&registry).await, vec!["r1--busy.json"]);
        assert_eq!(*busy_peers.borrow(), 1);
        // More work: it joins again; at the end it leaves for good.
        tx.send(delta(3)).await.unwrap();
        tokio::time::sleep(Duration::from_millis(500)).await;
        assert_eq!(members(&registry).await.len(), 2);
        drop(tx);
        let stats = sender.await.unwrap().unwrap();
        assert_eq!(stats.users_confirmed, 4);
        let _ = stop_busy.send(());
        busy.await.unwrap();
        assert!(members(&registry).await.is_empty());
    }

    #[tokio::test]
    async fn a_dead_senders_lease_stops_counting_and_is_forgotten() {
        let store = Arc::new(MemoryStore::new());
        let registry = SenderRegistry::new(store.clone(), "state", "s/");
        // A lease written 20 minutes ago by a sender that died.
        let old = (crate::clock::now() - chrono::Duration::minutes(20)).to_rfc3339();
        let dead = registry.key_of("r0", "dead");
        let (mut a, peers) = WorkspaceShare::new(registry.clone(), settings(), "r1", "run-a");
        // Write the dead lease with an old LastModified through the fake's own put, then age it.
        registry
            .renew(&dead, "r0", "dead", Duration::from_secs(15))
            .await
            .unwrap();
        store.set_last_modified("state", &dead, &old);
        a.join().await;
        assert_eq!(*peers.borrow(), 1);
        let left: Vec<String> = registry
            .list()
            .await
            .unwrap()
            .into_iter()
            .map(|l| l.key)
            .collect();
        assert_eq!(left, vec![registry.key_of("r1", "run-a")]);
    }

    #[tokio::test]
    async fn a_store_that_fails_leaves_the_sender_alone_and_sending() {
        let registry = SenderRegistry::new(failing(), "state", "s/");
        let (mut a, peers) = WorkspaceShare::new(registry, settings(), "r1", "run-a");
        a.join().await;
        assert_eq!(*peers.borrow(), 1);
        a.leave().await;
    }

    /// A store that refuses every call.
    fn failing() -> Arc<dyn ObjectStore> {
        let refuse = |call: Call<'_>| Err(call.failed("access denied", false));
        Arc::new(Hooked::new(Arc::new(MemoryStore::new()), Before(refuse)))
    }
}
