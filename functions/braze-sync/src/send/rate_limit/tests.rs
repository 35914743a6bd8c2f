use super::*;

fn ms(v: u64) -> Duration {
    Duration::from_millis(v)
}

fn budget(per_window: u32) -> RateBudget {
    RateBudget {
        requests_per_window: per_window,
        headroom: 0.0,
        ..Default::default()
    }
}

/// Sends as fast as the core allows from `from` for `span`; returns the send times.
fn drain(core: &mut LimiterCore, from: Duration, span: Duration) -> Vec<Duration> {
    let mut out = Vec::new();
    let mut now = from;
    loop {
        let slot = core.reserve(now);
        if slot >= from + span {
            return out;
        }
        out.push(slot);
        now = slot;
    }
}

#[test]
fn budget_is_share_of_the_workspace_limit_minus_headroom() {
    let b = RateBudget {
        share: 0.5,
        headroom: 0.1,
        ..Default::default()
    };
    assert!((b.planned_per_window() - 1350.0).abs() < 1e-9);
    assert!((b.per_second() - 450.0).abs() < 1e-9);
    assert_eq!(budget(3000).interval(), ms(1));
}

#[test]
fn sends_are_spread_over_the_window_not_bunched_at_its_start() {
    let mut core = LimiterCore::new(budget(3000));
    let sends = drain(&mut core, Duration::ZERO, Duration::from_secs(3));
    // 3,000 per 3 s plus the small burst allowance.
    assert!(sends.len() <= 3000 + core.budget().burst() as usize);
    assert!(sends.len() >= 2990);
    // In the first 100 ms only about a thirtieth of the window's budget goes out.
    let early = sends.iter().filter(|t| **t < ms(100)).count();
    assert!(early <= 100 + core.budget().burst() as usize, "{early}");
    // Every 3 s span (not only aligned windows) stays within budget + burst.
    let mut core = LimiterCore::new(budget(300));
    let sends = drain(&mut core, Duration::ZERO, Duration::from_secs(12));
    for (i, t) in sends.iter().enumerate() {
        let in_window = sends[i..]
            .iter()
            .take_while(|u| **u < *t + Duration::from_secs(3))
            .count();
        assert!(in_window <= 300 + core.budget().burst() as usize);
    }
}

#[test]
fn a_429_pauses_everything_until_the_reset() {
    let mut core = LimiterCore::new(budget(3000));
    core.reserve(ms(10));
    core.on_rate_limited(ms(20), Some(ms(1500)));
    assert_eq!(core.paused_until(ms(20)), Some(ms(1520)));
    assert!(!core.still_valid(ms(100)));
    assert!(core.reserve(ms(30)) >= ms(1520));
    assert!(core.still_valid(ms(1520)));
}

#[test]
fn a_429_without_reset_pauses_a_third_of_a_window() {
    let mut core = LimiterCore::new(budget(3000));
    core.on_rate_limited(ms(0), None);
    assert_eq!(core.paused_until(ms(0)), Some(ms(1000)));
}

#[test]
fn pauses_are_bounded() {
    let mut core = LimiterCore::new(budget(3000));
    core.on_rate_limited(ms(0), Some(Duration::from_secs(3600)));
    assert_eq!(core.paused_until(ms(0)), Some(Duration::from_secs(60)));
}

#[test]
fn exhausted_window_pauses_until_reset() {
    let mut core = LimiterCore::new(budget(3000));
    // 5 remain but 5 of ours are still in flight: nothing is left for new requests.
    core.observe(ms(500), Some(5), Some(ms(700)), 5);
    assert_eq!(core.paused_until(ms(500)), Some(ms(1200)));
    assert!(core.reserve(ms(510)) >= ms(1200));
}

#[test]
fn fewer_remaining_than_planned_slows_down_until_the_reset() {
    // Another sync is using the same workspace: 100 left for the next 2.5 s, while we
    // planned ~1,500 in the 1.5 s we are sure of.
    let mut core = LimiterCore::new(budget(3000));
    core.observe(ms(500), Some(100), Some(ms(2500)), 0);
    let sends = drain(&mut core, ms(500), ms(2500));
    assert!(
        sends.len() <= 101 + core.budget().burst() as usize,
        "{}",
        sends.len()
    );
    assert!(sends.len() >= 90);
    // After the reset the planned rate is back.
    let after = drain(&mut core, ms(3100), ms(1000));
    assert!(after.len() >= 990, "{}", after.len());
}

#[test]
fn normal_remaining_counts_do_not_slow_a_lone_sender() {
    // Alone at the planned rate, the server's count matches ours (up to the reset's
    // one-second resolution): no throttle.
    let mut core = LimiterCore::new(budget(3000));
    core.observe(ms(1500), Some(1500), Some(ms(1500)), 40);
    core.observe(ms(2900), Some(150), Some(ms(1100)), 40);
    assert_eq!(core.current_interval(ms(2950)), ms(1));
    let sends = drain(&mut core, ms(3000), ms(1000));
    assert!(sends.len() >= 990);
}

#[test]
fn peers_divide_the_budget_and_a_leaver_gives_its_part_back() {
    let mut core = LimiterCore::new(budget(3000));
    core.set_peers(5);
    // 3,000 per 3 s shared by five: 200/s each.
    let sends = drain(&mut core, Duration::ZERO, ms(3000));
    assert!((598..=610).contains(&sends.len()), "{}", sends.len());
    core.set_peers(2);
    let sends = drain(&mut core, ms(3000), ms(3000));
    assert!((1495..=1510).contains(&sends.len()), "{}", sends.len());
    // Zero is read as alone.
    core.set_peers(0);
    assert_eq!(core.peers(), 1);
}

#[test]
fn a_429_lowers_the_pace_once_per_window_then_it_climbs_back() {
    let mut core = LimiterCore::new(budget(3000));
    assert_eq!(core.current_interval(ms(0)), ms(1));
    // Three 429s from requests that were in flight together: one cut.
    core.on_rate_limited(ms(100), Some(ms(900)));
    core.on_rate_limited(ms(110), Some(ms(890)));
    core.on_rate_limited(ms(120), Some(ms(880)));
    assert!((core.pace() - 0.8).abs() < 1e-9, "{}", core.pace());
    assert!((core.per_second() - 800.0).abs() < 1.0);
    // Another 429 in a later window cuts again.
    core.on_rate_limited(ms(4_100), Some(ms(900)));
    assert!((core.pace() - 0.64).abs() < 1e-9, "{}", core.pace());
    // Quiet from then on: a step per quarter window once a window has passed since the
    // pause, back to the planned pace.
    core.reserve(ms(7_000));
    assert!(core.pace() > 0.64 && core.pace() < 1.0, "{}", core.pace());
    core.reserve(ms(20_000));
    assert!((core.pace() - 1.0).abs() < 1e-9, "{}", core.pace());
    assert_eq!(core.current_interval(ms(20_000)), ms(1));
}

#[test]
fn the_pace_never_falls_below_its_floor() {
    let mut core = LimiterCore::new(budget(3000));
    for w in 0..40 {
        core.on_rate_limited(Duration::from_secs(10 * w), Some(ms(100)));
    }
    assert!((core.pace() - 0.25).abs() < 1e-9, "{}", core.pace());
}

#[test]
fn what_the_server_has_left_is_shared_among_the_peers() {
    // 600 left for the next 2.5 s; five senders with 10 in flight each: 110 for us.
    let mut core = LimiterCore::new(budget(3000));
    core.set_peers(5);
    core.observe(ms(500), Some(600), Some(ms(2500)), 10);
    let sends = drain(&mut core, ms(500), ms(2500));
    assert!(
        (100..=112 + core.budget().burst() as usize).contains(&sends.len()),
        "{}",
        sends.len()
    );
    // Alone, the same answer would not slow us below the planned pace for long.
    let mut alone = LimiterCore::new(budget(3000));
    alone.observe(ms(500), Some(600), Some(ms(2500)), 10);
    assert!(drain(&mut alone, ms(500), ms(2500)).len() > 500);
}

#[test]
fn stale_answers_from_a_past_window_are_ignored() {
    let mut core = LimiterCore::new(budget(3000));
    core.observe(ms(500), Some(0), Some(Duration::ZERO), 0);
    assert_eq!(core.paused_until(ms(500)), None);
}

#[tokio::test(start_paused = true)]
async fn async_limiter_paces_and_counts_in_flight() {
    let limiter = RateLimiter::new(RateBudget {
        requests_per_window: 30,
        headroom: 0.0,
        burst_fraction: 0.0,
        ..Default::default()
    });
    let start = tokio::time::Instant::now();
    let mut permits = Vec::new();
    for _ in 0..11 {
        permits.push(limiter.acquire().await);
    }
    // 30 per 3 s: one every 100 ms; the 11th goes at 1 s.
    assert_eq!(start.elapsed(), ms(1000));
    assert_eq!(limiter.in_flight(), 11);
    drop(permits);
    assert_eq!(limiter.in_flight(), 0);
}

#[tokio::test(start_paused = true)]
async fn async_limiter_follows_the_peer_count() {
    let (tx, rx) = watch::channel(3u32);
    let limiter = RateLimiter::shared(
        RateBudget {
            requests_per_window: 30,
            headroom: 0.0,
            burst_fraction: 0.0,
            ..Default::default()
        },
        Some(rx),
    );
    let start = tokio::time::Instant::now();
    for _ in 0..4 {
        drop(limiter.acquire().await);
    }
    // A third of 10/s: one every 300 ms; the 4th at 900 ms.
    assert_eq!(start.elapsed(), ms(900));
    tx.send_replace(1);
    let start = tokio::time::Instant::now();
    for _ in 0..4 {
        drop(limiter.acquire().await);
    }
    // The slot reserved before the change still waits 300 ms, the next ones 100 ms each.
    assert_eq!(start.elapsed(), ms(600));
    assert_eq!(limiter.most_peers(), 3);
}

#[tokio::test(start_paused = true)]
async fn waiting_requests_follow_a_pace_that_changes_while_they_wait() {
    use std::sync::Arc;
    let limiter = Arc::new(RateLimiter::new(RateBudget {
        requests_per_window: 30,
        headroom: 0.0,
        burst_fraction: 0.0,
        ..Default::default()
    }));
    let info = |remaining: u64, l: &RateLimiter| RateLimitInfo {
        remaining: Some(remaining),
        reset: Some(l.epoch_now() + 3.0),
        ..Default::default()
    };
    // Two requests in flight (at 0 and 100 ms); the first answer says 2 are left for 3 s:
    // one every 1.5 s.
    let first = limiter.acquire().await;
    let second = limiter.acquire().await;
    first.observe(&info(2, &limiter), false);
    drop(first);
    let start = tokio::time::Instant::now();
    let mut waiting = Vec::new();
    for _ in 0..10 {
        let l = limiter.clone();
        waiting.push(tokio::spawn(async move {
            drop(l.acquire().await);
            start.elapsed()
        }));
    }
    tokio::time::sleep(ms(50)).await;
    // The second answer comes from a new window with room: the planned 100 ms pace is back
    // for every waiting request (slots reserved at the slow pace would have spread them
    // over 13 s).
    second.observe(&info(30, &limiter), false);
    drop(second);
    let mut last = Duration::ZERO;
    for w in waiting {
        last = last.max(w.await.unwrap());
    }
    assert!(last <= ms(1_100), "{last:?}");
}

#[tokio::test(start_paused = true)]
async fn async_limiter_honours_retry_after_over_the_reset() {
    let limiter = RateLimiter::new(budget(3000));
    let p = limiter.acquire().await;
    p.observe(
        &RateLimitInfo {
            remaining: Some(0),
            reset: Some(limiter.epoch_now() + 3.0),
            retry_after_s: Some(0.5),
            ..Default::default()
        },
        true,
    );
    drop(p);
    let start = tokio::time::Instant::now();
    let _p = limiter.acquire().await;
    let waited = start.elapsed();
    assert!(waited >= ms(490) && waited <= ms(510), "{waited:?}");
}

#[tokio::test(start_paused = true)]
async fn async_limiter_waits_out_a_429() {
    let limiter = RateLimiter::new(budget(3000));
    let p = limiter.acquire().await;
    let reset = limiter.epoch_now() + 2.0;
    p.observe(
        &RateLimitInfo {
            remaining: Some(0),
            reset: Some(reset),
            ..Default::default()
        },
        true,
    );
    drop(p);
    let start = tokio::time::Instant::now();
    let _p = limiter.acquire().await;
    let waited = start.elapsed();
    assert!(waited >= ms(1990) && waited <= ms(2010), "{waited:?}");
}
