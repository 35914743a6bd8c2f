//! When a run stops sending: the margin it keeps before the Lambda deadline, scaled to the
//! invocation's time, and the shortest function timeout worth starting a run in (pure).
//!
//! The margin pays for what a run does after its sender stops: the requests still in flight
//! get their grace ([`crate::send::deliver::DeliverConfig::in_flight_grace`], 10 s), then the
//! committer commits what Braze confirmed, the report, the ledger entry, the lock release and
//! the continuation message are written. The last of those are a few S3/SQS calls; the commit
//! grows with what the run confirmed, so with the run's length.

use std::time::Duration;

/// Part of the invocation's time kept back before the deadline: a fifth, so a run's
/// conclusion always gets at least a quarter of its sending time, growing with the work it
/// has to commit.
pub const MARGIN_DIVISOR: u32 = 5;

/// The least margin: the 10 s in-flight grace plus 10 s for the commit, report, ledger
/// entry, lock release and continuation message (single calls that take well under a second
/// each, with room for the SDK's retries).
pub const MARGIN_FLOOR: Duration = Duration::from_secs(20);

/// The most margin: 45 s, what every run kept before the margin scaled, enough at the 900 s
/// timeout the template deploys (reached from 225 s up); more would only shorten long runs.
pub const MARGIN_CEILING: Duration = Duration::from_secs(45);

/// The shortest function timeout a run starts in: the floor margin plus twice as long again
/// (40 s) to take the lock, load the state, read the export and send. Below it each
/// invocation spends most of its time loading and hands over with little or nothing sent, so
/// the export fails at once with [`too_short`]'s reason instead.
pub const MIN_TIMEOUT: Duration = Duration::from_secs(60);

/// The time kept back before the deadline of an invocation that had `invocation` left when it
/// started: a [`MARGIN_DIVISOR`]th of it, within [`MARGIN_FLOOR`]..=[`MARGIN_CEILING`].
pub fn deadline_margin(invocation: Duration) -> Duration {
    (invocation / MARGIN_DIVISOR).clamp(MARGIN_FLOOR, MARGIN_CEILING)
}

/// The function's configured timeout as the invocation's time left at its start shows it:
/// rounded up to whole seconds (Lambda timeouts are whole seconds, and a few milliseconds pass
/// before the handler reads the clock).
pub fn configured_timeout(remaining: Duration) -> Duration {
    Duration::from_secs(remaining.as_millis().div_ceil(1000) as u64)
}

/// Why an invocation that started with `remaining` left is too short for a run (its function's
/// timeout is under [`MIN_TIMEOUT`]), naming the timeout, the minimum and what to change;
/// `None` when it is long enough.
pub fn too_short(remaining: Duration) -> Option<String> {
    let timeout = configured_timeout(remaining);
    if timeout >= MIN_TIMEOUT {
        return None;
    }
    Some(format!(
        "the function's timeout ({} s, as this invocation started with {} ms left) is shorter than the {} s a run needs: {} s are kept before the deadline to commit what Braze confirmed and hand over, which leaves too little to load the state, read the export and send, so every run would hand over with nothing sent. Nothing was sent and the route lock was not taken. Raise the function's Timeout (Timeout of BrazeSyncFunction in template.yaml, timeout in the CDK construct) to at least {} s (900 s recommended), then replay the export",
        timeout.as_secs(),
        remaining.as_millis(),
        MIN_TIMEOUT.as_secs(),
        deadline_margin(remaining).as_secs(),
        MIN_TIMEOUT.as_secs(),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(secs: u64) -> Duration {
        Duration::from_secs(secs)
    }

    #[test]
    fn short_invocations_keep_the_floor() {
        assert_eq!(deadline_margin(s(20)), MARGIN_FLOOR);
        assert_eq!(deadline_margin(s(60)), MARGIN_FLOOR);
        assert_eq!(deadline_margin(s(100)), MARGIN_FLOOR);
        assert_eq!(deadline_margin(Duration::ZERO), MARGIN_FLOOR);
    }

    #[test]
    fn the_margin_is_a_fifth_of_the_invocation_between_floor_and_ceiling() {
        assert_eq!(deadline_margin(s(120)), s(24));
        assert_eq!(deadline_margin(s(180)), s(36));
        assert_eq!(deadline_margin(s(225)), MARGIN_CEILING);
    }

    #[test]
    fn long_invocations_keep_the_ceiling() {
        assert_eq!(deadline_margin(s(300)), MARGIN_CEILING);
        assert_eq!(deadline_margin(s(900)), MARGIN_CEILING);
        assert_eq!(deadline_margin(s(u64::MAX / 2)), MARGIN_CEILING);
    }

    #[test]
    fn the_margin_never_grows_when_the_invocation_shrinks() {
        let mut last = Duration::ZERO;
        for secs in 0..1_000 {
            let m = deadline_margin(s(secs));
            assert!(m >= last, "{secs} s");
            last = m;
        }
    }

    #[test]
    fn the_minimum_timeout_leaves_twice_the_margin_to_work() {
        let work = MIN_TIMEOUT - deadline_margin(MIN_TIMEOUT);
        assert!(work >= 2 * deadline_margin(MIN_TIMEOUT), "{work:?}");
    }

    #[test]
    fn a_timeout_is_read_from_the_time_left_rounded_up_to_seconds() {
        assert_eq!(configured_timeout(Duration::from_millis(59_950)), s(60));
        assert_eq!(configured_timeout(Duration::from_millis(60_000)), s(60));
        assert_eq!(configured_timeout(Duration::from_millis(19_990)), s(20));
    }

    #[test]
    fn a_timeout_under_the_minimum_is_refused_naming_both() {
        let why = too_short(Duration::from_millis(19_990)).unwrap();
        assert!(why.contains("timeout (20 s"), "{why}");
        assert!(why.contains("at least 60 s"), "{why}");
        assert!(why.contains("Nothing was sent"), "{why}");
        assert!(too_short(Duration::from_millis(59_000)).is_some());
    }

    #[test]
    fn a_timeout_at_or_over_the_minimum_runs() {
        assert_eq!(too_short(Duration::from_millis(59_950)), None);
        assert_eq!(too_short(s(60)), None);
        assert_eq!(too_short(s(900)), None);
    }
}
