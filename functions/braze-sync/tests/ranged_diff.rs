//! The bounded diff ([`braze_sync::ranged`]) against the in-memory one ([`sync::plan`]): on
//! exports with changed, new, departed, duplicate, unmappable and unidentifiable rows, with
//! and without a state layout, one or several workers, the departure guard holding or not,
//! and full resends, both find the same deltas, rejects and counts (only the order differs).

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Mutex;

use braze_sync::model::UserDelta;
use braze_sync::ranged::{RangedSettings, SplitSnapshot, produce_ranged};
use braze_sync::rejects::RowReject;
use braze_sync::route::Route;
use braze_sync::snapshot::Snapshot;
use braze_sync::sync::{self, Part, ProduceOptions, Summary, SyncError};

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

fn in_memory(csv: &str, snap: &Snapshot, opts: &ProduceOptions) -> Found {
    let p = sync::plan(parts(csv), &route(), snap, opts).unwrap();
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
    let base = tempfile::tempdir().unwrap();
    let mut settings = RangedSettings::new("test");
    settings.spill_base = base.path().to_path_buf();
    settings.min_spill_bits = 3;
    settings.workers = workers;
    settings.buffer_budget = 4096;
    let deltas = Mutex::new(Vec::new());
    let mut rejects = Vec::new();
    let summary = produce_ranged(
        parts(csv),
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
