//! The time braze-sync reads for leases, claims, reports and export dates, and the nonces that
//! make its object names unique: the wall clock and the OS's randomness, or, on a thread that
//! set them, a virtual clock that runs with tokio's (paused) time and a seeded nonce stream, so
//! a simulated world expires leases, passes hours in milliseconds and replays the same names
//! from the same seed (`testkit/sim`); or a fixed instant, so a test's steps read the time it
//! set however long they take.

use std::cell::Cell;

use chrono::{DateTime, Utc};

thread_local! {
    /// `(wall time at anchor, tokio instant at anchor)` when this thread runs a virtual clock.
    static VIRTUAL: Cell<Option<(DateTime<Utc>, tokio::time::Instant)>> = const { Cell::new(None) };
    /// The seeded nonce stream's state, when this thread runs one.
    static NONCES: Cell<Option<u64>> = const { Cell::new(None) };
    /// The instant [`now`] reads on this thread while the clock is held still.
    static FIXED: Cell<Option<DateTime<Utc>>> = const { Cell::new(None) };
}

/// A nonce for an object name: random, or the next of this thread's seeded stream.
pub fn nonce() -> u32 {
    match NONCES.with(Cell::get) {
        Some(state) => {
            let next = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
            NONCES.with(|n| n.set(Some(next)));
            let mut z = next;
            z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
            (z ^ (z >> 31)) as u32
        }
        None => rand::random(),
    }
}

/// Makes [`nonce`] on this thread a stream seeded by `seed`.
pub fn set_nonce_seed(seed: u64) {
    NONCES.with(|n| n.set(Some(seed)));
}

/// The current time: the wall clock, or this thread's virtual or fixed clock.
pub fn now() -> DateTime<Utc> {
    if let Some(at) = FIXED.with(Cell::get) {
        return at;
    }
    match VIRTUAL.with(Cell::get) {
        Some((base, at)) => {
            let elapsed = tokio::time::Instant::now().saturating_duration_since(at);
            base + chrono::Duration::from_std(elapsed).unwrap_or_default()
        }
        None => Utc::now(),
    }
}

/// Milliseconds since the Unix epoch of [`now`].
pub fn now_ms() -> i64 {
    now().timestamp_millis()
}

/// Makes [`now`] on this thread read `base` plus the tokio time elapsed from this call (a
/// simulation on a current-thread runtime with paused time). Call inside the runtime.
pub fn set_virtual(base: DateTime<Utc>) {
    FIXED.with(|f| f.set(None));
    VIRTUAL.with(|v| v.set(Some((base, tokio::time::Instant::now()))));
}

/// Makes [`now`] on this thread read `at`, and nothing else, until the clock is set again or
/// cleared: a test whose assertions name instants holds the clock still, so a loaded machine
/// (or the wall clock's place in its hour) cannot move them.
pub fn set_fixed(at: DateTime<Utc>) {
    VIRTUAL.with(|v| v.set(None));
    FIXED.with(|f| f.set(Some(at)));
}

/// Back to the wall clock on this thread.
pub fn clear_virtual() {
    VIRTUAL.with(|v| v.set(None));
    FIXED.with(|f| f.set(None));
    NONCES.with(|n| n.set(None));
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn virtual_time_follows_tokio_time() {
        let base = DateTime::parse_from_rfc3339("2026-01-01T00:00:00Z")
            .unwrap()
            .with_timezone(&Utc);
        set_virtual(base);
        tokio::time::sleep(std::time::Duration::from_secs(3600)).await;
        assert_eq!(now(), base + chrono::Duration::hours(1));
        clear_virtual();
        assert!(now() > base + chrono::Duration::days(300));
    }

    #[tokio::test]
    async fn a_fixed_clock_holds_still_until_set_again() {
        let at = DateTime::parse_from_rfc3339("2026-01-01T00:59:59.999Z")
            .unwrap()
            .with_timezone(&Utc);
        set_fixed(at);
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        assert_eq!(now(), at);
        assert_eq!(now_ms(), at.timestamp_millis());
        set_fixed(at + chrono::Duration::hours(1));
        assert_eq!(now(), at + chrono::Duration::hours(1));
        clear_virtual();
        assert!(now() > at + chrono::Duration::days(300));
    }
}
