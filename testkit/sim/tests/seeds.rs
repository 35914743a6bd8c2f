//! Simulation seeds as tests: a fixed list of fast seeds that must hold every invariant (run
//! by `make test`), a replay that must be byte for byte the same, and every seed that ever
//! failed, named for the bug it found (ignored while the bug is open).
#![allow(clippy::unwrap_used)]

use sim::{Options, SeedOutcome, replay_command, run_seed};

/// Seeds that run in well under a second each in debug and cover both diffs, fan-out,
/// hand-overs, crashes and lost answers.
const FAST_SEEDS: &[u64] = &[
    0, 3, 4, 5, 6, 14, 16, 17, 18, 19, 22, 23, 24, 26, 27, 28, 30, 31, 34, 35, 36, 37, 38, 39, 42,
    47, 50, 52, 54, 55, 56, 20, 182, 205, 323, 454, 2, 15, 21, 110,
];

fn violations(o: &SeedOutcome) -> String {
    format!(
        "seed {}: {} violation(s):\n{}\nreplay: {}",
        o.seed,
        o.violations.len(),
        o.violations.join("\n"),
        replay_command(o.seed)
    )
}

fn holds(seed: u64) {
    let o = run_seed(seed, &Options::default());
    assert!(o.violations.is_empty(), "{}", violations(&o));
}

#[test]
fn fast_seeds_hold_every_invariant() {
    let mut failed = Vec::new();
    let mut faults = 0;
    for &seed in FAST_SEEDS {
        let o = run_seed(seed, &Options::default());
        faults += u32::from(o.with_faults());
        if !o.violations.is_empty() {
            failed.push(violations(&o));
        }
    }
    assert!(failed.is_empty(), "{}", failed.join("\n\n"));
    assert!(
        faults as usize * 2 > FAST_SEEDS.len(),
        "most fast seeds inject faults"
    );
}

/// One seed, run twice: the same trace line for line, the same figures and violations.
fn replays_byte_for_byte(seed: u64) {
    let opts = Options {
        trace: true,
        ..Options::default()
    };
    let (a, b) = (run_seed(seed, &opts), run_seed(seed, &opts));
    assert!(
        a.trace.len() > 100,
        "seed {seed}: a trace of {} lines",
        a.trace.len()
    );
    if let Some(i) =
        (0..a.trace.len().max(b.trace.len())).find(|&i| a.trace.get(i) != b.trace.get(i))
    {
        panic!(
            "seed {seed}: the replays part at line {i}:\n{:?}\n{:?}",
            a.trace.get(i),
            b.trace.get(i)
        );
    }
    assert_eq!(a.trace_digest, b.trace_digest, "seed {seed}");
    assert_eq!(
        serde_json::to_string(&a.stats).unwrap(),
        serde_json::to_string(&b.stats).unwrap(),
        "seed {seed}"
    );
    assert_eq!(a.violations, b.violations, "seed {seed}");
}

/// Two seeds whose runs do blocking work (the producer and the bounded diff's readers and
/// workers) beside crashes, lost answers and fan-out replay byte for byte.
#[test]
fn seeds_replay_byte_for_byte() {
    replays_byte_for_byte(9);
    replays_byte_for_byte(15);
}

#[test]
fn seed_1_ambiguous_head_write_deletes_what_the_head_names() {
    holds(1);
}

#[test]
fn seed_7_ambiguous_head_write_deletes_a_range_delta() {
    holds(7);
}

#[test]
fn seed_33_ambiguous_head_write_deletes_a_base_shard() {
    holds(33);
}

#[test]
fn seed_8_ledger_names_a_report_that_was_never_written() {
    holds(8);
}

#[test]
fn seed_13_export_acknowledged_while_its_claim_stays_running() {
    holds(13);
}

#[test]
fn seed_12_crashed_runs_unconfirmed_sends_are_never_resent() {
    holds(12);
}

#[test]
fn seed_29_crashed_runs_unconfirmed_sends_are_never_resent() {
    holds(29);
}

#[test]
fn seed_15_failed_fan_out_discards_confirmed_pieces() {
    holds(15);
}

#[test]
fn seed_25_failed_fan_out_discards_confirmed_pieces() {
    holds(25);
}

#[test]
fn seed_32_failed_fan_out_discards_confirmed_pieces() {
    holds(32);
}

#[test]
fn seed_21_fork_segment_deleted_after_a_lost_answer() {
    holds(21);
}

#[test]
fn seed_9_message_stays_in_the_dlq() {
    holds(9);
}

#[test]
fn seed_2_fan_out_leaves_its_control_objects() {
    holds(2);
}

#[test]
fn seed_205_duplicate_notification_of_a_forced_upload_resends_everything_again() {
    holds(205);
}

#[test]
fn seed_323_duplicate_notification_of_a_forced_upload_resends_everything_again() {
    holds(323);
}

#[test]
fn seed_454_duplicate_notification_of_a_forced_upload_resends_everything_again() {
    holds(454);
}

/// `SEED=n cargo test -p sim --test seeds first_divergence_of_two_replays -- --ignored`: where
/// two runs of a seed part ways, if they do (for finding a new source of nondeterminism).
#[test]
#[ignore = "a diagnostic, run on demand"]
fn first_divergence_of_two_replays() {
    let seed: u64 = std::env::var("SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(9);
    let a = run_seed(
        seed,
        &Options {
            trace: true,
            ..Options::default()
        },
    );
    let b = run_seed(
        seed,
        &Options {
            trace: true,
            ..Options::default()
        },
    );
    for (i, (x, y)) in a.trace.iter().zip(b.trace.iter()).enumerate() {
        if x != y {
            panic!(
                "line {i}:\n{}\n{x}\n{y}",
                a.trace[i.saturating_sub(5)..i].join("\n")
            );
        }
    }
}

#[test]
fn a_timeout_too_short_to_send_ends_with_its_reason_instead_of_handing_over_forever() {
    // 30 s: under the shortest timeout a run starts in, so every export fails at once.
    let o = run_seed(
        3,
        &Options {
            timeout_ms: Some(30_000),
            ..Options::default()
        },
    );
    let all = o.violations.join("\n");
    assert!(!all.contains("never became quiet"), "{all}");
    assert!(
        all.contains("is shorter than the 60 s a run needs"),
        "{all}"
    );
}

#[test]
fn seed_110_fan_out_manifest_left_behind() {
    holds(110);
}

#[test]
fn seed_44_crashed_runs_unconfirmed_sends_are_never_resent() {
    holds(44);
}

#[test]
fn seed_182_route_lock_left_held() {
    holds(182);
}

#[test]
fn seed_115_message_stays_in_the_dlq() {
    holds(115);
}

/// A route lock left held after the world is quiet: its release met an unavailable store once.
#[test]
fn seed_20_route_lock_left_held() {
    holds(20);
}

/// A fan-out voided by a moved head left its pieces' confirmed values unknown to the state,
/// so Braze kept values the newest export reverted.
#[test]
fn seed_57_voided_fan_out_discards_confirmed_values() {
    holds(57);
}

/// Found while the producer's blocking thread raced the paused clock (so not on every replay);
/// holds since blocking work runs in turns with the runtime.
#[test]
fn seed_199_braze_keeps_an_older_exports_values() {
    holds(199);
}

/// A fan-out piece sent before any intent covered its users: when it died (or its
/// checkpoint failed) after Braze applied a request, and its fan-out was ended, Braze kept
/// the piece's values while the state still held the older export's, so the newest export
/// diffed as unchanged.
#[test]
fn seed_75_fan_out_leaves_older_values_in_braze() {
    holds(75);
}

/// Named open for a fan-out of members that left an older value in Braze; its schedule
/// has changed since and it holds, before pieces' intents and with them.
#[test]
fn seed_129_fan_out_leaves_an_older_value_in_braze() {
    holds(129);
}

/// A piece's first sends of new users, applied by Braze, then its checkpoint failed and its
/// fan-out was ended: without an intent in its fork the state never tracked them.
#[test]
fn seed_173_fan_out_users_the_state_does_not_track() {
    holds(173);
}

/// A piece applied a user's new value, died, and its redelivery's resend was refused:
/// without the first attempt's intent the state kept the old value as confirmed.
#[test]
fn seed_955_piece_resend_refused_after_an_applied_attempt() {
    holds(955);
}

/// The finalizer's departures reached Braze, then it failed before their checkpoint: the
/// state kept the departed users as members.
#[test]
fn seed_211_finalizer_departures_sent_before_an_intent() {
    holds(211);
}

/// Pieces that died or failed after Braze applied their requests, their fan-outs ended
/// unmerged: Braze kept their values (or an older export's) without the state knowing.
#[test]
fn seed_296_piece_sends_before_an_intent() {
    holds(296);
}

#[test]
fn seed_322_piece_sends_before_an_intent() {
    holds(322);
}

#[test]
fn seed_376_piece_sends_before_an_intent() {
    holds(376);
}

#[test]
fn seed_482_piece_sends_before_an_intent() {
    holds(482);
}

#[test]
fn seed_509_piece_sends_before_an_intent() {
    holds(509);
}

#[test]
fn seed_512_piece_sends_before_an_intent() {
    holds(512);
}

#[test]
fn seed_675_piece_sends_before_an_intent() {
    holds(675);
}

#[test]
fn seed_686_piece_sends_before_an_intent() {
    holds(686);
}

/// A duplicate delivery of a piece, while its first delivery ran, folded the fork's
/// checkpoints that attempt then folded and deleted itself: the missing segment failed the
/// fan-out for good, voiding the finalizer's merge.
#[test]
fn seed_228_duplicate_piece_delivery_folds_a_live_attempts_checkpoints() {
    holds(228);
}

/// A fan-out piece's first sends of new users were applied by Braze, then its checkpoint
/// failed (or it crashed) and the next export ended its fan-out before the piece's retry: the
/// state never tracked those users, so when they left the audience no departure was sent and
/// Braze kept them members (and users the state does not track).
#[test]
fn seed_220_departed_piece_user_keeps_club() {
    holds(220);
}

#[test]
fn seed_336_departed_piece_users_keep_club() {
    holds(336);
}

#[test]
fn seed_536_departed_piece_user_keeps_club() {
    holds(536);
}

#[test]
fn seed_752_departed_users_of_a_crashed_piece_keep_club() {
    holds(752);
}

#[test]
fn seed_914_departed_piece_users_keep_club() {
    holds(914);
}

/// The same without a departure since: Braze holds the users a piece sent (its checkpoint
/// failed or it crashed, then its fan-out was ended before its retry), and the state does not
/// track them.
#[test]
fn seed_394_piece_users_the_state_does_not_track() {
    holds(394);
}

#[test]
fn seed_416_piece_users_the_state_does_not_track() {
    holds(416);
}

#[test]
fn seed_474_piece_users_the_state_does_not_track() {
    holds(474);
}

#[test]
fn seed_523_piece_users_the_state_does_not_track() {
    holds(523);
}

#[test]
fn seed_649_piece_users_the_state_does_not_track() {
    holds(649);
}

#[test]
fn seed_781_piece_users_the_state_does_not_track() {
    holds(781);
}

/// A notification stayed in the DLQ after every receive failed, some of them at the route
/// lock: a lock write that failed once (or landed with its answer lost) ended the run, and a
/// route another export held sent the message back for a whole visibility timeout.
#[test]
fn seed_294_message_dead_lettered_by_route_lock_failures_and_a_busy_route() {
    holds(294);
}

#[test]
fn seed_489_message_dead_lettered_by_route_lock_failures_and_a_busy_route() {
    holds(489);
}

#[test]
fn seed_498_message_dead_lettered_by_route_lock_failures() {
    holds(498);
}

/// Notifications stayed in the DLQ after every receive failed on one transient failure of a
/// state write (a checkpoint segment, a range delta or base, the head), each of which ended
/// its run.
#[test]
fn seed_731_message_dead_lettered_by_transient_state_write_failures() {
    holds(731);
}

/// A duplicate of an export waited for the route inside its invocation while the export's
/// fan-out finished, took the lock and crashed at once; the redelivery found the export
/// complete and never touched the lock. The crashed holder's lease ran out by itself: no run
/// is kept out, so no lock is left behind.
#[test]
fn seed_7698_crashed_holders_lease_expires_by_itself() {
    holds(7698);
}

/// A duplicate delivery of a fan-out piece resent what Braze had refused the done attempt and
/// was still checkpointing into the piece's fork when the last piece claimed the finalizer:
/// the merge met the fork's segments and failed the export for good instead of waiting for
/// the duplicate's commit.
#[test]
fn seed_8967_finalizer_waits_for_a_duplicate_piece_attempts_checkpoints() {
    holds(8967);
}

/// A piece lost its route lock to a transient error and came back after its fan-out's lease
/// ran out; the next run ended the fan-out as void, could not queue its export again, deleted
/// the control objects anyway and went on: the newest export was never synced, and older
/// ones replayed over it.
#[test]
fn seed_2981_void_fan_out_export_dropped_when_it_cannot_be_queued_again() {
    holds(2981);
}

/// A fan-out's clean, cut short, left a fork head naming objects its merge had replaced:
/// the clean deleted the folder in listing order, `final.json` (which says the forks were
/// merged) first, so every later run of the route tried to take the fork over again, met the
/// missing object and was retried until its messages went to the DLQ.
#[test]
fn seed_12790_cut_short_fan_out_clean_leaves_a_fork_head_naming_deleted_objects() {
    holds(12790);
}

#[test]
fn seed_13866_cut_short_fan_out_clean_leaves_a_fork_head_naming_deleted_objects() {
    holds(13866);
}

/// Exports that found their route held by another run failed their messages back to the
/// queue, which brought them back only after a whole visibility timeout and spent a receive
/// each time: four went to the DLQ. They now wait on the queue with a delay; the one left
/// is a message whose receives went to injected faults (ledger writes, crashes, SQS sends).
#[test]
fn seed_13866_exports_waiting_for_a_busy_route_go_to_the_dlq() {
    let o = run_seed(13866, &Options::default());
    assert!(o.violations.is_empty(), "{}", violations(&o));
    assert!(o.stats.dlq <= 1, "seed 13866: {} DLQ messages", o.stats.dlq);
}

/// The same, and a piece redelivered while the manifest was still there claimed the
/// finalizer afresh (`final.json` gone) and tried to merge forks whose objects were deleted.
#[test]
fn seed_18255_cut_short_fan_out_clean_lets_a_piece_finalize_again() {
    holds(18255);
}

/// A redelivered trigger took over the claim its crashed first delivery left (that delivery had
/// fanned the export out but not recorded it); the fan-out's finalizer completed the export
/// over that claim while the redelivery waited for the route, and the redelivery then fanned
/// the same export out again and crashed: its next delivery found the export complete and
/// ended as a duplicate, and no run of the route came to end the second fan-out's manifest.
#[test]
fn seed_4762_redelivery_fans_out_an_export_its_first_delivery_completed() {
    holds(4762);
}

/// A coordinator queued two of its three pieces, then SQS refused the third: it released the
/// route lock and deleted the fan-out while a queued piece, already past its checks, sent to
/// Braze; the piece's checkpoint then found its fork gone, and Braze kept values (and a user)
/// the route's state never recorded.
#[test]
fn seed_11167_unqueued_fan_out_voided_under_a_sending_piece() {
    holds(11167);
}

/// Duplicate notifications of an export whose runs keep holding departures (so it is never
/// complete and every notification runs it again) met another live run of it: its claim
/// running in another invocation, or its fan-out holding the route lock. Each such receive
/// failed the message back to the queue; after a redrive they came back together, one ran and
/// the rest spent a receive each, every visibility timeout, until three stayed in the DLQ
/// after both redrives. A notification of an export a live run owns is now answered as a
/// duplicate: no receive goes to waiting for one.
#[test]
fn seed_13354_duplicates_of_an_export_a_live_run_owns_go_to_the_dlq() {
    let opts = Options {
        trace: true,
        ..Options::default()
    };
    let o = run_seed(13354, &opts);
    assert!(o.violations.is_empty(), "{}", violations(&o));
    let spent: Vec<&String> = o
        .trace
        .iter()
        .filter(|l| {
            l.contains(" retries: ")
                && (l.ends_with(" right now") || l.ends_with("the replay waits"))
        })
        .collect();
    assert!(
        spent.is_empty(),
        "seed 13354: receives spent waiting for a live run of the export:\n{spent:#?}"
    );
}
