//! Paces requests to Braze's `/users/track` rate limit. The budget comes from configuration
//! (3,000 requests per 3 s per workspace by default, times this deployment's `RATE_LIMIT_SHARE`),
//! divided by the number of senders using the workspace right now (kept up to date by
//! [`crate::send::workspace_share`]), and is spent smoothly — one request every `window / budget`, with
//! a small burst allowance — rather than all at the start of a window. The server's view corrects
//! it: when `X-RateLimit-Remaining` is less than this sender's part of what is left before
//! `X-RateLimit-Reset`, sending slows to that part; when none remain, or on a 429, sending pauses
//! until the reset (or `Retry-After`, when the server sends one). A 429 also lowers the pace
//! multiplicatively (once per window), and the pace climbs back step by step while no 429
//! comes, so a workspace shared with senders we do not know about settles below its limit.
//!
//! Requests wait for their turn and only the first in line holds a slot, taken when it is due:
//! a slower or faster pace applies to the very next request. (Reserving a slot for every waiting
//! request at once, as before, let slots reserved under a brief throttle push the whole queue
//! seconds into the future: several senders on one limit stalled for tens of seconds.)
//!
//! [`LimiterCore`] is the pure scheduler (times are offsets from the limiter's start, so tests use
//! a fake clock); [`RateLimiter`] wraps it for async callers.

use std::sync::Mutex;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::watch;

use crate::send::braze::RateLimitInfo;

/// Braze's default `/users/track` limit: requests per window.
pub const BRAZE_REQUESTS_PER_WINDOW: u32 = 3_000;
/// Braze's `/users/track` window.
pub const BRAZE_WINDOW: Duration = Duration::from_secs(3);

/// The share of the workspace's rate limit this sender may use.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RateBudget {
    /// Requests the workspace may make per window (3,000 by default).
    pub requests_per_window: u32,
    /// The window (3 s).
    pub window: Duration,
    /// This sender's share of the workspace limit, in (0, 1] (e.g. 0.5 when two syncs share it).
    pub share: f64,
    /// Fraction of the share left unused to absorb network jitter (requests sent evenly still
    /// arrive unevenly), e.g. 0.03.
    pub headroom: f64,
    /// Requests that may go at once after an idle spell, as a fraction of the per-window budget
    /// (at least one).
    pub burst_fraction: f64,
    /// Resolution of `X-RateLimit-Reset` (whole seconds at Braze), allowed for when judging
    /// whether the server has fewer requests left than planned.
    pub reset_resolution: Duration,
    /// Longest pause a 429 or an exhausted window can impose at once.
    pub max_pause: Duration,
    /// Factor the pace is multiplied by after a 429 (at most once per window), in (0, 1].
    pub decrease_on_429: f64,
    /// Lowest the 429 factor can bring the pace, as a fraction of the planned pace.
    pub min_pace: f64,
    /// How much of the planned pace comes back per quarter window without a 429.
    pub recover_step: f64,
}

impl Default for RateBudget {
    fn default() -> Self {
        Self {
            requests_per_window: BRAZE_REQUESTS_PER_WINDOW,
            window: BRAZE_WINDOW,
            share: 1.0,
            headroom: 0.03,
            burst_fraction: 0.01,
            reset_resolution: Duration::from_secs(1),
            max_pause: Duration::from_secs(60),
            decrease_on_429: 0.8,
            min_pace: 0.25,
            recover_step: 0.05,
        }
    }
}

impl RateBudget {
    /// Requests this sender plans per window: `requests_per_window · share · (1 − headroom)`,
    /// at least one.
    pub fn planned_per_window(&self) -> f64 {
        let share = if self.share.is_finite() && self.share > 0.0 {
            self.share.min(1.0)
        } else {
            1.0
        };
        let headroom = if self.headroom.is_finite() {
            self.headroom.clamp(0.0, 0.9)
        } else {
            0.0
        };
        (f64::from(self.requests_per_window) * share * (1.0 - headroom)).max(1.0)
    }

    /// Time between two requests at the planned rate.
    pub fn interval(&self) -> Duration {
        self.window
            .max(Duration::from_millis(1))
            .div_f64(self.planned_per_window())
    }

    /// Planned requests per second.
    pub fn per_second(&self) -> f64 {
        self.planned_per_window() / self.window.as_secs_f64().max(0.001)
    }

    /// Requests allowed back to back.
    pub fn burst(&self) -> u32 {
        let f = if self.burst_fraction.is_finite() {
            self.burst_fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        ((self.planned_per_window() * f) as u32).max(1)
    }
}

#[derive(Debug, Clone, Copy, PartialEq)]
struct Throttle {
    interval: Duration,
    until: Duration,
}

/// The pure scheduler. All times are offsets from the limiter's start.
#[derive(Debug, Clone)]
pub struct LimiterCore {
    budget: RateBudget,
    /// Senders sharing the budget (this one included), at least one.
    peers: u32,
    /// The 429 factor on the pace, in `[min_pace, 1]`.
    pace: f64,
    /// No further 429 cut before this (the 429s of one window count once).
    no_cut_until: Duration,
    /// The pace climbs one step at this time, while below 1.
    next_raise: Duration,
    interval: Duration,
    tolerance: Duration,
    /// Theoretical arrival time of the next request (GCRA).
    tat: Duration,
    /// No request may start before this.
    hold_until: Duration,
    throttle: Option<Throttle>,
}

impl LimiterCore {
    /// A scheduler for `budget`, with no history.
    pub fn new(budget: RateBudget) -> Self {
        let mut core = Self {
            budget,
            peers: 1,
            pace: 1.0,
            no_cut_until: Duration::ZERO,
            next_raise: Duration::ZERO,
            interval: Duration::ZERO,
            tolerance: Duration::ZERO,
            tat: Duration::ZERO,
            hold_until: Duration::ZERO,
            throttle: None,
        };
        core.recompute();
        core
    }

    /// Interval and burst tolerance from the budget, the peers and the 429 factor.
    fn recompute(&mut self) {
        let b = &self.budget;
        let per_window =
            (b.planned_per_window() / f64::from(self.peers.max(1)) * self.pace).max(1.0);
        self.interval = b.window.max(Duration::from_millis(1)).div_f64(per_window);
        let f = if b.burst_fraction.is_finite() {
            b.burst_fraction.clamp(0.0, 1.0)
        } else {
            0.0
        };
        let burst = ((per_window * f) as u32).max(1);
        self.tolerance = self.interval.saturating_mul(burst.saturating_sub(1));
    }

    /// The budget.
    pub fn budget(&self) -> &RateBudget {
        &self.budget
    }

    /// Senders sharing the workspace limit, as last told.
    pub fn peers(&self) -> u32 {
        self.peers
    }

    /// The 429 factor on the pace (1 when no 429 came lately).
    pub fn pace(&self) -> f64 {
        self.pace
    }

    /// Tells how many senders (this one included) share the budget now; the pace becomes
    /// `1 / peers` of it from the next reservation on.
    pub fn set_peers(&mut self, peers: u32) {
        let peers = peers.max(1);
        if peers != self.peers {
            self.peers = peers;
            self.recompute();
        }
    }

    /// Planned requests per second right now (peers and the 429 factor included).
    pub fn per_second(&self) -> f64 {
        1.0 / self.interval.as_secs_f64().max(1e-9)
    }

    /// Climbs back towards the planned pace, one step per quarter window without a 429.
    fn recover(&mut self, now: Duration) {
        if self.pace >= 1.0 || now < self.next_raise {
            return;
        }
        let step = if self.budget.recover_step.is_finite() {
            self.budget.recover_step.clamp(0.001, 1.0)
        } else {
            0.05
        };
        let quarter = (self.budget.window / 4).max(Duration::from_millis(1));
        let steps = ((now - self.next_raise).as_secs_f64() / quarter.as_secs_f64()) as u32 + 1;
        self.pace = (self.pace + step * f64::from(steps)).min(1.0);
        self.next_raise = now + quarter;
        self.recompute();
    }

    /// Time between requests right now (slower while throttled).
    pub fn current_interval(&self, now: Duration) -> Duration {
        match self.throttle {
            Some(t) if now < t.until => t.interval.max(self.interval),
            _ => self.interval,
        }
    }

    /// Until when everything waits (a 429 or an exhausted window), if that is in the future.
    pub fn paused_until(&self, now: Duration) -> Option<Duration> {
        (self.hold_until > now).then_some(self.hold_until)
    }

    /// Reserves the next slot: the returned time (≥ `now`) is when the caller may send.
    pub fn reserve(&mut self, now: Duration) -> Duration {
        let slot = self.next_slot(now);
        self.take(slot);
        slot
    }

    /// When the next request may go (≥ `now`), without reserving it: the pace in force when it
    /// is taken ([`LimiterCore::take`]) sets the spacing of the one after.
    pub fn next_slot(&mut self, now: Duration) -> Duration {
        self.recover(now);
        let earliest = now.max(self.hold_until);
        earliest.max(self.tat.saturating_sub(self.tolerance))
    }

    /// A request goes at `at`.
    pub fn take(&mut self, at: Duration) {
        let interval = self.current_interval(at);
        self.tat = self.tat.max(at) + interval;
    }

    /// A slot reserved earlier is still good at `now` (no pause began that covers it).
    pub fn still_valid(&self, now: Duration) -> bool {
        now >= self.hold_until
    }

    /// Pauses every send until `until` (clamped to `max_pause` from now).
    fn hold(&mut self, now: Duration, until: Duration) {
        let until = until.min(now + self.budget.max_pause);
        if until > self.hold_until {
            self.hold_until = until;
        }
        self.tat = self.tat.max(self.hold_until);
    }

    /// A 429 arrived: pause until the server said to retry (`Retry-After`, else the reset; a
    /// third of a window when it said nothing), and lower the pace by `decrease_on_429` — once
    /// per window, since the 429s of requests already in flight tell nothing new.
    pub fn on_rate_limited(&mut self, now: Duration, retry_in: Option<Duration>) {
        let wait = retry_in
            .filter(|d| !d.is_zero())
            .unwrap_or(self.budget.window / 3);
        self.hold(now, now + wait);
        if now >= self.no_cut_until {
            let cut = if self.budget.decrease_on_429.is_finite() {
                self.budget.decrease_on_429.clamp(0.05, 1.0)
            } else {
                0.8
            };
            let floor = if self.budget.min_pace.is_finite() {
                self.budget.min_pace.clamp(0.01, 1.0)
            } else {
                0.25
            };
            self.pace = (self.pace * cut).max(floor);
            self.recompute();
            self.no_cut_until = self.hold_until + self.budget.window;
            self.next_raise = self.no_cut_until;
        }
    }

    /// A response told how many requests remain in the server's window and when it resets;
    /// `in_flight` is how many of ours are still unanswered (they may count against it).
    pub fn observe(
        &mut self,
        now: Duration,
        remaining: Option<u64>,
        reset_in: Option<Duration>,
        in_flight: u64,
    ) {
        let (Some(remaining), Some(reset_in)) = (remaining, reset_in) else {
            return;
        };
        if reset_in.is_zero() {
            // A stale answer from a window that is already over.
            return;
        }
        let until = now + reset_in;
        // Every sender has about as many requests in flight as we do; what is left after them
        // is shared equally.
        let peers = u64::from(self.peers.max(1));
        let available = remaining.saturating_sub(in_flight.saturating_mul(peers)) / peers;
        if available == 0 {
            self.hold(now, until);
            return;
        }
        // What we would send before the reset at the planned rate, allowing for the reset's
        // coarse resolution (the window may end up to `reset_resolution` before `until`).
        let sure_time = reset_in.saturating_sub(self.budget.reset_resolution);
        let planned = sure_time.as_secs_f64() / self.interval.as_secs_f64();
        if (available as f64) < planned {
            let interval = reset_in.div_f64(available as f64).max(self.interval);
            self.throttle = Some(Throttle { interval, until });
        } else if let Some(t) = self.throttle
            && (until > t.until || now >= t.until)
        {
            // A new window with enough room: back to the planned rate.
            self.throttle = None;
        }
    }
}

/// The async limiter shared by every in-flight request of a run. Callers queue for their turn
/// (first come, first served) and only the first in line waits for a slot, which it takes only
/// when it is due; so a pace that changes meanwhile (a throttle, a pause, senders joining or
/// leaving) applies to the very next request, instead of to slots reserved long before by every
/// waiting request.
#[derive(Debug)]
pub struct RateLimiter {
    core: Mutex<LimiterCore>,
    turn: tokio::sync::Mutex<()>,
    changed: tokio::sync::Notify,
    start: tokio::time::Instant,
    epoch_at_start: f64,
    in_flight: AtomicU64,
    waits: AtomicU64,
    /// How many senders share the workspace limit (from [`crate::send::workspace_share`]).
    peers: Option<watch::Receiver<u32>>,
    most_peers: AtomicU32,
}

impl RateLimiter {
    /// A limiter for `budget`, starting now, alone on the workspace limit.
    pub fn new(budget: RateBudget) -> Self {
        Self::shared(budget, None)
    }

    /// A limiter for `budget` that divides it by the number of senders `peers` says share the
    /// workspace limit (this one included), re-read before every slot.
    pub fn shared(budget: RateBudget, peers: Option<watch::Receiver<u32>>) -> Self {
        let epoch_at_start = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_secs_f64())
            .unwrap_or(0.0);
        Self {
            core: Mutex::new(LimiterCore::new(budget)),
            turn: tokio::sync::Mutex::new(()),
            changed: tokio::sync::Notify::new(),
            start: tokio::time::Instant::now(),
            epoch_at_start,
            in_flight: AtomicU64::new(0),
            waits: AtomicU64::new(0),
            peers,
            most_peers: AtomicU32::new(1),
        }
    }

    /// The most senders that shared the workspace limit with this one (itself included).
    pub fn most_peers(&self) -> u32 {
        self.most_peers.load(Ordering::Relaxed)
    }

    /// Planned requests per second right now.
    pub fn per_second(&self) -> f64 {
        self.with_core(|c| c.per_second())
    }

    fn peers_now(&self) -> Option<u32> {
        let n = (*self.peers.as_ref()?.borrow()).max(1);
        self.most_peers.fetch_max(n, Ordering::Relaxed);
        Some(n)
    }

    fn now(&self) -> Duration {
        tokio::time::Instant::now().saturating_duration_since(self.start)
    }

    /// The current UTC epoch time in seconds, derived from the monotonic clock (so a paused
    /// test clock and `X-RateLimit-Reset` stay consistent).
    pub fn epoch_now(&self) -> f64 {
        self.epoch_at_start + self.now().as_secs_f64()
    }

    fn with_core<T>(&self, f: impl FnOnce(&mut LimiterCore) -> T) -> T {
        match self.core.lock() {
            Ok(mut g) => f(&mut g),
            Err(poisoned) => f(&mut poisoned.into_inner()),
        }
    }

    /// Waits for a send slot. The returned permit counts the request as in flight until it is
    /// dropped; report the answer's headers through it.
    pub async fn acquire(&self) -> Permit<'_> {
        let _turn = self.turn.lock().await;
        let mut waited = false;
        loop {
            // Registered before the slot is computed, so no change is missed.
            let changed = self.changed.notified();
            tokio::pin!(changed);
            changed.as_mut().enable();
            let mut peers_rx = self.peers.clone();
            if let Some(rx) = peers_rx.as_mut() {
                // Only a change from now on wakes us.
                rx.borrow_and_update();
            }
            let now = self.now();
            let peers = self.peers_now();
            let slot = self.with_core(|c| {
                if let Some(n) = peers {
                    c.set_peers(n);
                }
                let slot = c.next_slot(now);
                if slot <= now {
                    c.take(now);
                }
                slot
            });
            if slot <= now {
                break;
            }
            if !waited {
                self.waits.fetch_add(1, Ordering::Relaxed);
                waited = true;
            }
            let peers_changed = async {
                match peers_rx.as_mut() {
                    Some(rx) => {
                        if rx.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            // Wait for the slot, or for a change of pace, then look again.
            tokio::select! {
                biased;
                () = tokio::time::sleep_until(self.start + slot) => {}
                () = &mut changed => {}
                () = peers_changed => {}
            }
        }
        self.in_flight.fetch_add(1, Ordering::Relaxed);
        Permit { limiter: self }
    }

    /// Requests sent and not yet answered.
    pub fn in_flight(&self) -> u64 {
        self.in_flight.load(Ordering::Relaxed)
    }

    /// How often a caller had to wait for a slot.
    pub fn waits(&self) -> u64 {
        self.waits.load(Ordering::Relaxed)
    }

    fn observe(&self, rate: &RateLimitInfo, rate_limited: bool) {
        let now = self.now();
        let epoch = self.epoch_now();
        // Our own request is answered: it no longer counts as in flight.
        let in_flight = self.in_flight().saturating_sub(1);
        let changed = self.with_core(|c| {
            let before = (c.current_interval(now), c.paused_until(now));
            if rate_limited {
                c.on_rate_limited(now, rate.retry_in(epoch));
            } else {
                c.observe(now, rate.remaining, rate.reset_in(epoch), in_flight);
            }
            before != (c.current_interval(now), c.paused_until(now))
        });
        if changed {
            // The request waiting for its slot looks again.
            self.changed.notify_waiters();
        }
    }
}

/// One request's slot; dropping it ends the request's in-flight count.
#[derive(Debug)]
pub struct Permit<'a> {
    limiter: &'a RateLimiter,
}

impl Permit<'_> {
    /// Reports a response's rate-limit headers; `rate_limited` for a 429.
    pub fn observe(&self, rate: &RateLimitInfo, rate_limited: bool) {
        self.limiter.observe(rate, rate_limited);
    }
}

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        self.limiter.in_flight.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests;
