//! The bounded diff ([`braze_sync::diff::bounded`]) against the in-memory one ([`in_memory::plan`]): on
//! exports with changed, new, departed, duplicate, unmappable and unidentifiable rows, with
//! and without a state layout, one or several workers, the departure guard holding or not,
//! and full resends, both find the same deltas, rejects and counts (only the order differs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;

use braze_sync::config::route::Route;
use braze_sync::diff::bounded::{
    RangedSettings, RangedTimes, SplitSnapshot, add_piece, produce_ranged, release_departures,
};
use braze_sync::diff::export::{Part, ProduceOptions, Summary, SyncError};
use braze_sync::diff::in_memory;
use braze_sync::diff::rejects::RowReject;
use braze_sync::model::UserDelta;
use braze_sync::state::confirmed::Snapshot;

const ROUTE: &str = r#"
name = "big"
prefix = "amperity/big/"
update_existing_only = false
max_departure_share = 0.3

[identifier]
kind = "external_id"
column = "id"

[fields]
given_name = "first_name"

[attributes.orders]
type = "Integer"

[attributes.tier]
type = "String"

[[audiences]]
attribute = "aud_a"
column = "in_a"

[[audiences]]
attribute = "aud_b"
column = "in_b"
on_leave = "null"
max_departure_share = 0.02
"#;

fn route() -> Route {
    Route::from_toml(ROUTE, "test").unwrap()
}

struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// An export of users `0..n` (minus `gone`), values varied by `round`, with some duplicates,
/// unmappable and (when `bad`) unidentifiable rows.
fn export(n: u64, round: u64, seed: u64, bad: bool) -> String {
    let mut rng = Rng(seed);
    let mut s = String::from("id,given_name,orders,tier,in_a,in_b\n");
    for i in 0..n {
        let r = rng.next();
        if round > 0 && r % 100 < 3 {
            continue; // gone
        }
        let v = if round > 0 && r % 100 < 10 { round } else { 0 };
        let orders = if r % 997 == 5 {
            "notanumber".to_string()
        } else {
            (i % 50 + v).to_string()
        };
        let tier = if r.is_multiple_of(13) { "" } else { "gold" };
        let a = (i + v) % 3 == 0;
        let b = i % 2 == 0;
        s.push_str(&format!("u{i},N{},{orders},{tier},{a},{b}\n", i % 7));
        if r % 211 == 3 {
            s.push_str(&format!("u{i},Dup,1,x,true,true\n"));
        }
    }
    for i in 0..(round * 40) {
        s.push_str(&format!("new{round}-{i},Z,1,t,true,false\n"));
    }
    if bad {
        s.push_str(",NoId,1,t,true,true\n");
    }
    s
}

fn parts(csv: &str) -> Vec<Result<Part<&[u8]>, SyncError>> {
    let half = csv[..csv.len() / 2].rfind('\n').unwrap() + 1;
    let header = "id,given_name,orders,tier,in_a,in_b\n";
    // Two parts, so "first row wins" spans parts.
    // It opens with a later row of a user of the first part (a duplicate across parts: the
    // first part's row wins, even though parts are read in parallel).
    let second = format!("{header}u1,Late,9,late,true,true\n{}", &csv[half..]);
    let second: &'static str = Box::leak(second.into_boxed_str());
    vec![
        Ok(Part {
            source: "s3://in/amperity/big/part-0.csv".into(),
            reader: &csv.as_bytes()[..half],
        }),
        Ok(Part {
            source: "s3://in/amperity/big/part-1.csv".into(),
            reader: second.as_bytes(),
        }),
    ]
}

fn key(d: &UserDelta) -> String {
    format!("{:?}|{:?}", d.identifier, d.pos)
}

fn reject_key(r: &RowReject) -> String {
    format!("{:?}|{}|{:?}|{:?}", r.pos, r.reason, r.column, r.identifier)
}

type Found = (Vec<UserDelta>, Vec<String>, Summary);

/// The whole export as one part, with a late duplicate of `u1` at its end: a big single file,
/// which the bounded diff maps on several threads.
fn one_part(csv: &str) -> Vec<Result<Part<&[u8]>, SyncError>> {
    let whole = format!("{csv}u1,Late,9,late,true,true\n");
    let whole: &'static str = Box::leak(whole.into_boxed_str());
    vec![Ok(Part {
        source: "s3://in/amperity/big/part-0.csv".into(),
        reader: whole.as_bytes(),
    })]
}

fn in_memory(csv: &str, snap: &Snapshot, opts: &ProduceOptions) -> Found {
    in_memory_parts(parts(csv), snap, opts)
}

fn in_memory_parts(
    parts: Vec<Result<Part<&[u8]>, SyncError>>,
    snap: &Snapshot,
    opts: &ProduceOptions,
) -> Found {
    let p = in_memory::plan(parts, &route(), snap, opts).unwrap();
    let mut d = p.deltas;
    d.sort_by_key(key);
    let mut r: Vec<String> = p.rejects.iter().map(reject_key).collect();
    r.sort();
    (d, r, p.summary)
}

fn ranged(
    csv: &str,
    snap: &Snapshot,
    bits: Option<u32>,
    opts: &ProduceOptions,
    workers: usize,
) -> Found {
    ranged_with(parts(csv), snap, bits, opts, workers, |_| {})
}

fn ranged_parts(
    parts: Vec<Result<Part<&[u8]>, SyncError>>,
    snap: &Snapshot,
    bits: Option<u32>,
    opts: &ProduceOptions,
    workers: usize,
) -> Found {
    ranged_with(parts, snap, bits, opts, workers, |_| {})
}

fn ranged_with(
    parts: Vec<Result<Part<&[u8]>, SyncError>>,
    snap: &Snapshot,
    bits: Option<u32>,
    opts: &ProduceOptions,
    workers: usize,
    tune: impl FnOnce(&mut RangedSettings),
) -> Found {
    let base = tempfile::tempdir().unwrap();
    let mut settings = RangedSettings::new("test");
    settings.spill_base = base.path().to_path_buf();
    settings.min_spill_bits = 3;
    settings.workers = workers;
    settings.buffer_budget = 4096;
    tune(&mut settings);
    let deltas = Mutex::new(Vec::new());
    let mut rejects = Vec::new();
    let summary = produce_ranged(
        parts,
        &route(),
        &SplitSnapshot::new(snap, bits),
        opts,
        &settings,
        &|d| {
            deltas.lock().unwrap().push(d);
            Ok(())
        },
        &mut |r| rejects.push(reject_key(&r)),
    )
    .unwrap();
    assert_eq!(
        std::fs::read_dir(base.path()).unwrap().count(),
        0,
        "the spill folder is removed"
    );
    let mut d = deltas.into_inner().unwrap();
    d.sort_by_key(key);
    rejects.sort();
    (d, rejects, summary)
}

fn confirm(snap: &mut Snapshot, deltas: &[UserDelta]) {
    for d in deltas {
        snap.apply_confirmed(d);
    }
    snap.compact();
}

fn assert_same(a: &Found, b: &Found, what: &str) {
    assert_eq!(a.0.len(), b.0.len(), "{what}: delta count");
    for (x, y) in a.0.iter().zip(&b.0) {
        assert_eq!(x, y, "{what}");
    }
    assert_eq!(a.1, b.1, "{what}: rejects");
    assert_eq!(a.2, b.2, "{what}: summary");
}

#[test]
fn the_bounded_diff_finds_what_the_in_memory_diff_finds() {
    let r = route();
    let opts = ProduceOptions::for_route(&r, "s3://in/amperity/big/export");
    // First run: an empty state, no layout.
    let first = export(3000, 0, 7, false);
    let empty = Snapshot::for_route(&r);
    let a = in_memory(&first, &empty, &opts);
    let b = ranged(&first, &empty, None, &opts, 2);
    assert_same(&a, &b, "first run");
    assert!(a.2.users_new > 2900 && a.1.len() > 5, "{:?}", a.2);
    let mut snap = Snapshot::for_route(&r);
    confirm(&mut snap, &a.0);
    // Later runs against a state laid out in ranges: changes, new users, departures (aud_b
    // held by its 2% cap, aud_a sent), duplicates, unmappable rows.
    for (round, seed) in [(1u64, 11u64), (2, 12)] {
        let next = export(3000, round, seed, false);
        let a = in_memory(&next, &snap, &opts);
        for (bits, workers) in [(0, 1), (2, 2), (3, 3)] {
            let b = ranged(&next, &snap, Some(bits), &opts, workers);
            assert_same(&a, &b, &format!("round {round} bits {bits}"));
        }
        assert!(a.2.users_departed > 0, "{:?}", a.2.departures);
        assert!(
            a.2.departures.iter().any(|d| d.held > 0) && a.2.departures.iter().any(|d| d.sent > 0),
            "{:?}",
            a.2.departures
        );
        confirm(&mut snap, &a.0);
    }
    // A row without an identifier holds every departure; a forced full resend sends all.
    let bad = export(3000, 3, 13, true);
    let mut forced = opts.clone();
    forced.full_resend = true;
    for o in [&opts, &forced] {
        let a = in_memory(&bad, &snap, o);
        let b = ranged(&bad, &snap, Some(2), o, 2);
        assert_same(&a, &b, "unidentifiable row / full resend");
        assert_eq!(a.2.users_departed, 0);
    }
    // The operator's release sends what the guard held.
    let mut release = opts.clone();
    release.allow_departures = true;
    let next = export(3000, 4, 14, false);
    let a = in_memory(&next, &snap, &release);
    let b = ranged(&next, &snap, Some(1), &release, 2);
    assert_same(&a, &b, "released");
    assert!(a.2.departures.iter().any(|d| d.released));
}

/// A fan-out: the same export diffed as pieces, each restricted to a span of the state's
/// ranges (`only_ranges`) and handing its removals over (`defer_departures`); the pieces'
/// deltas, rejects and summaries (departure counts included) add up to one full run's, and
/// the removals released on the summed counts are the full run's.
#[test]
fn pieces_over_disjoint_spans_add_up_to_one_full_run() {
    let r = route();
    let opts = ProduceOptions::for_route(&r, "s3://in/amperity/big/export");
    let first = export(3000, 0, 7, false);
    let mut snap = Snapshot::for_route(&r);
    let (d, _, _) = in_memory(&first, &snap, &opts);
    confirm(&mut snap, &d);
    let mut release = opts.clone();
    release.allow_departures = true;
    let next = export(3000, 1, 11, false);
    let unidentifiable = export(3000, 2, 12, true);
    let cases: [(&str, &String, &ProduceOptions); 3] = [
        ("guard", &next, &opts),
        ("released", &next, &release),
        ("unidentifiable", &unidentifiable, &opts),
    ];
    // Parts read in parallel, and one big part mapped on several threads.
    type Split = fn(&str) -> Vec<Result<Part<&[u8]>, SyncError>>;
    for (split, (what, csv, o)) in [parts as Split, one_part]
        .into_iter()
        .flat_map(|split| cases.map(|c| (split, c)))
    {
        let bits = 3u32;
        let full = ranged_parts(split(csv), &snap, Some(bits), o, 2);
        assert!(full.2.departures.iter().any(|a| a.leaving > 0), "{what}");
        for ends in [&[3usize, 5, 8][..], &[1, 8], &[8]] {
            let spans: Vec<std::ops::Range<usize>> = ends
                .iter()
                .scan(0, |start, &end| Some(std::mem::replace(start, end)..end))
                .collect();
            let dir = tempfile::tempdir().unwrap();
            let mut deltas = Vec::new();
            let mut rejects = Vec::new();
            let mut total = Summary::default();
            let mut files = Vec::new();
            for (i, span) in spans.iter().enumerate() {
                let file = dir.path().join(format!("p{i}.bin"));
                let (d, rj, summary) = ranged_with(split(csv), &snap, Some(bits), o, 3, |s| {
                    s.only_ranges = Some(span.clone());
                    s.defer_departures = true;
                    s.departures_file = Some(file.clone());
                });
                // A piece sends no removal and judges nothing.
                assert!(
                    d.iter().all(|x| x.pos.source != o.export_name),
                    "{what}: a piece sent a removal"
                );
                assert_eq!(summary.users_departed, 0, "{what}");
                assert!(
                    summary
                        .departures
                        .iter()
                        .all(|a| a.held_because.is_none() && a.sent == 0),
                    "{what}: {:?}",
                    summary.departures
                );
                deltas.extend(d);
                rejects.extend(rj);
                add_piece(&mut total, &summary);
                files.push((
                    file.display().to_string(),
                    std::fs::File::open(&file).unwrap(),
                ));
            }
            let sent = Mutex::new(Vec::new());
            release_departures(&mut total, &r, o, files, &|d| {
                sent.lock().unwrap().push(d);
                Ok(())
            })
            .unwrap();
            deltas.extend(sent.into_inner().unwrap());
            deltas.sort_by_key(key);
            rejects.sort();
            assert_same(
                &full,
                &(deltas, rejects, total),
                &format!("{what}: pieces {spans:?}"),
            );
        }
    }
}

/// `only_ranges` needs a state laid out in ranges and a span inside it; `defer_departures`
/// needs a file to write the removals to.
#[test]
fn a_piece_without_a_layout_or_a_file_is_refused() {
    let r = route();
    let opts = ProduceOptions::for_route(&r, "s3://in/amperity/big/export");
    let csv = export(100, 0, 7, false);
    let snap = Snapshot::for_route(&r);
    let run = |bits: Option<u32>, tune: &dyn Fn(&mut RangedSettings)| {
        let base = tempfile::tempdir().unwrap();
        let mut settings = RangedSettings::new("test");
        settings.spill_base = base.path().to_path_buf();
        tune(&mut settings);
        produce_ranged(
            parts(&csv),
            &r,
            &SplitSnapshot::new(&snap, bits),
            &opts,
            &settings,
            &|_| Ok(()),
            &mut |_| {},
        )
        .map(|_| ())
    };
    let no_layout = run(None, &|s| s.only_ranges = Some(0..1)).unwrap_err();
    assert!(
        no_layout.to_string().contains("only_ranges 0..1"),
        "{no_layout}"
    );
    let outside = run(Some(2), &|s| s.only_ranges = Some(2..5)).unwrap_err();
    assert!(outside.to_string().contains("4 hash ranges"), "{outside}");
    let no_file = run(Some(2), &|s| s.defer_departures = true).unwrap_err();
    assert!(no_file.to_string().contains("departures_file"), "{no_file}");
    run(Some(2), &|s| s.only_ranges = Some(1..3)).unwrap();
}

#[test]
fn one_big_part_mapped_on_several_threads_finds_what_one_thread_finds() {
    // One part and more workers than parts: the reader hands rows to mapping threads by
    // range. Duplicates (in a row, and `u1` again at the very end) keep the first row;
    // rejects (unmappable values, a row without an identifier) and counts are those of
    // the in-memory diff and of one thread.
    let r = route();
    let opts = ProduceOptions::for_route(&r, "s3://in/amperity/big/export");
    let first = export(3000, 0, 7, true);
    let empty = Snapshot::for_route(&r);
    let a = in_memory_parts(one_part(&first), &empty, &opts);
    for workers in [1, 2, 3] {
        let b = ranged_parts(one_part(&first), &empty, None, &opts, workers);
        assert_same(&a, &b, &format!("first run, {workers} workers"));
    }
    assert!(
        a.1.iter()
            .any(|r| r.contains("duplicate identifier") && r.contains("ExternalId(\"u1\")"))
    );
    assert!(
        a.1.iter().any(|r| r.contains("missing identifier")),
        "{:?}",
        a.1
    );
    let mut snap = Snapshot::for_route(&r);
    confirm(&mut snap, &a.0);
    let next = export(3000, 1, 11, false);
    let a = in_memory_parts(one_part(&next), &snap, &opts);
    for (bits, workers) in [(0, 2), (2, 3)] {
        let b = ranged_parts(one_part(&next), &snap, Some(bits), &opts, workers);
        assert_same(
            &a,
            &b,
            &format!("second run, bits {bits}, {workers} workers"),
        );
    }
    assert!(a.2.users_changed > 0 && a.2.rejected > 0, "{:?}", a.2);
    // And it did map on several threads.
    let base = tempfile::tempdir().unwrap();
    let mut settings = RangedSettings::new("test");
    settings.spill_base = base.path().to_path_buf();
    settings.workers = 3;
    let times = std::sync::Arc::new(Mutex::new(RangedTimes::default()));
    settings.times = Some(times.clone());
    produce_ranged(
        one_part(&next),
        &r,
        &SplitSnapshot::new(&snap, Some(2)),
        &opts,
        &settings,
        &|_| Ok(()),
        &mut |_| {},
    )
    .unwrap();
    assert_eq!(times.lock().unwrap().mappers, 3);
}

/// Every delta `produce` hands over (records-only ones included), sorted.
fn in_memory_all(csv: &str, snap: &Snapshot, opts: &ProduceOptions) -> Found {
    let mut deltas = Vec::new();
    let mut rejects = Vec::new();
    let summary = in_memory::produce(
        parts(csv),
        &route(),
        snap,
        opts,
        &mut |d| {
            deltas.push(d);
            Ok(())
        },
        &mut |r| rejects.push(reject_key(&r)),
    )
    .unwrap();
    deltas.sort_by_key(key);
    rejects.sort();
    (deltas, rejects, summary)
}

/// Row digests: a state written before them (no digest slot values) is diffed by mapping
/// every row, as before; its unchanged users come back as records-only deltas (nothing to
/// send) that record their digests; once confirmed, the same export is unchanged without a
/// delta, with the same rejects (duplicates, unmappable rows), in both diffs. A full resend
/// still sends every user.
#[test]
fn a_state_without_digests_records_them_once_then_rows_are_skipped() {
    let r = route();
    let opts = ProduceOptions::for_route(&r, "s3://in/amperity/big/export");
    let csv = export(3000, 0, 7, false);
    let first = in_memory_all(&csv, &Snapshot::for_route(&r), &opts);
    assert!(first.0.iter().all(|d| d.row_digest.is_some()));
    // The state as an older version wrote it: the same values, no digests.
    let mut old = Snapshot::for_route(&r);
    let stripped: Vec<UserDelta> = first
        .0
        .iter()
        .cloned()
        .map(|mut d| {
            d.row_digest = None;
            d
        })
        .collect();
    confirm(&mut old, &stripped);
    let a = in_memory_all(&csv, &old, &opts);
    for (bits, workers) in [(0, 1), (2, 2)] {
        let b = ranged(&csv, &old, Some(bits), &opts, workers);
        assert_same(&a, &b, &format!("records-only, bits {bits}"));
    }
    assert_eq!(a.2.users_changed, 0, "{:?}", a.2);
    assert!(a.0.iter().all(UserDelta::records_only));
    assert_eq!(a.2.digests_recorded, a.0.len() as u64);
    assert_eq!(a.2.digests_recorded, first.0.len() as u64, "every user");
    assert_eq!(a.1, first.1, "the same rejects");
    assert!(
        in_memory::plan(parts(&csv), &r, &old, &opts)
            .unwrap()
            .deltas
            .is_empty(),
        "nothing to send"
    );
    // Recorded: the export again is unchanged without mapping, nothing handed over.
    confirm(&mut old, &a.0);
    let again = in_memory_all(&csv, &old, &opts);
    let b = ranged(&csv, &old, Some(2), &opts, 2);
    assert_same(&again, &b, "skipped");
    assert!(again.0.is_empty(), "{:?}", again.0.first());
    assert_eq!(again.2.digests_recorded, 0);
    assert_eq!(again.2.unchanged, a.2.unchanged);
    assert_eq!(again.1, first.1, "the same rejects");
    // A full resend ignores digests.
    let mut forced = opts.clone();
    forced.full_resend = true;
    let f = ranged(&csv, &old, Some(2), &forced, 2);
    assert_eq!(f.0.len(), first.0.len());
    assert!(f.0.iter().all(|d| !d.records_only()));
}

/// A departure clears the user's digest: a member who left and comes back with the very row
/// the state recorded before is sent again (audience membership restored), in both diffs.
#[test]
fn a_member_who_left_and_returns_with_the_same_row_is_sent_again() {
    let r = route();
    let mut opts = ProduceOptions::for_route(&r, "s3://in/amperity/big/export");
    opts.allow_departures = true;
    let header = "id,given_name,orders,tier,in_a,in_b\n";
    let rows: Vec<String> = (0..200)
        .map(|i| format!("u{i},N,{i},gold,true,true\n"))
        .collect();
    let all = format!("{header}{}", rows.concat());
    let without = format!(
        "{header}{}",
        rows.iter()
            .enumerate()
            .filter(|(i, _)| *i != 5)
            .map(|(_, r)| r.as_str())
            .collect::<String>()
    );
    let mut snap = Snapshot::for_route(&r);
    let (d, _, _) = in_memory(&all, &snap, &opts);
    confirm(&mut snap, &d);
    let (d, _, s) = in_memory(&without, &snap, &opts);
    assert_eq!(s.users_departed, 1, "{s:?}");
    assert!(d.iter().all(|x| x.row_digest.is_none()));
    confirm(&mut snap, &d);
    let a = in_memory(&all, &snap, &opts);
    let b = ranged(&all, &snap, Some(2), &opts, 2);
    assert_same(&a, &b, "return");
    assert_eq!(a.0.len(), 1, "{:?}", a.0);
    let back = &a.0[0];
    assert_eq!(format!("{:?}", back.identifier), "ExternalId(\"u5\")");
    assert!(
        back.changes
            .iter()
            .any(|c| c.name == "aud_a" && c.value == serde_json::json!(true)),
        "{back:?}"
    );
}
