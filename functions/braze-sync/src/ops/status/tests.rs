use super::*;
use crate::state::store::RangeDoc;

fn report(run_id: &str, status: RunStatus, export: &str) -> (String, Bytes) {
    let mut r = RunReport::new(run_id, "customers");
    r.status = status;
    r.export_id = Some(export.to_string());
    r.started_at = Some("2026-11-30T10:00:00+00:00".into());
    r.rows_in = 100;
    r.users_sent = 7;
    r.unchanged = 90;
    r.rejected = 3;
    r.duration_s = 1.25;
    if status == RunStatus::DeparturesHeld {
        r.departures_held = 80;
        r.notes
            .push("departures_held: 80 departures from aud_vip".into());
    }
    (
        format!("s3://state/bridge/reports/customers/{run_id}.json"),
        r.to_json(),
    )
}

fn entry(export: &str, status: LedgerStatus) -> (String, LedgerEntry) {
    (
        export.to_string(),
        LedgerEntry {
            status,
            export_id: export.to_string(),
            lease_until: 0,
            report: None,
            fan_out: None,
            stalled: 0,
            budget_wait_since: None,
            route_waits: 0,
            forced: None,
            requeue: 0,
        },
    )
}

fn reading() -> RouteReading {
    let head = HeadDoc {
        format: 2,
        route: "customers".into(),
        generation: 4,
        range_bits: 0,
        ranges: vec![RangeDoc {
            base: Some("base-0-3-aa.bin".into()),
            users: 1000,
            bytes: 9000,
            deltas: vec!["delta-0-4-bb.bin".into()],
            delta_bytes: 100,
        }],
        users: 1000,
        segments: vec!["seg-5-0-cc.bin".into()],
        watermark: Some(Watermark {
            export_id: "s3://x/a/2.csv#e2".into(),
            exported_at: Some("2026-11-30T10:00:00Z".into()),
        }),
        updated_at: "2026-11-30T10:05:00Z".into(),
        ..HeadDoc::default()
    };
    let obj = |name: &str, size| ObjectMeta {
        key: format!("bridge/state/customers/{name}"),
        size,
        ..ObjectMeta::default()
    };
    RouteReading {
        route: "customers".into(),
        attributes_tracked: 12,
        head_uri: "s3://state/bridge/state/customers/head.json".into(),
        head: Some(head),
        state_objects: vec![
            obj("base-0-3-aa.bin", 9000),
            obj("delta-0-4-bb.bin", 100),
            obj("seg-5-0-cc.bin", 24),
            obj("base-0-2-old.bin", 5000), // no longer in the head
            obj("ledger/abc.json", 80),
        ],
        reports: (0..12)
            .map(|i| {
                report(
                    &format!("20261130T1000{i:02}.000Z-0000000{}", i % 10),
                    RunStatus::Complete,
                    &format!("s3://x/a/old{i}.csv#e"),
                )
            })
            .chain([
                report(
                    "20261130T110000.000Z-00000001",
                    RunStatus::DeparturesHeld,
                    "s3://x/a/2.csv#e2",
                ),
                report(
                    "20261130T120000.000Z-00000002",
                    RunStatus::SkippedStale,
                    "s3://x/a/1.csv#e1",
                ),
            ])
            .collect(),
        ledger: [
            entry("s3://x/a/2.csv#e2", LedgerStatus::Incomplete),
            entry("s3://x/a/1.csv#e1", LedgerStatus::SkippedStale),
        ]
        .into(),
        lock: Some(LockDoc {
            holder: "20261130T130000.000Z-deadbeef".into(),
            lease_until_ms: 1_000_060_000,
            released: false,
        }),
    }
}

#[test]
fn status_counts_state_objects_in_the_head_only_and_keeps_the_last_ten_runs() {
    let s = RouteStatus::build(reading(), 1_000_000_000);
    assert_eq!(s.state.users, 1000);
    assert_eq!(s.state.attributes_tracked, 12);
    assert_eq!(s.state.generation, 4);
    assert_eq!((s.state.objects, s.state.bytes), (3, 9124));
    assert_eq!(s.runs.len(), RUNS_SHOWN);
    assert_eq!(s.runs[0].status, "skipped_stale");
    assert_eq!(s.runs[1].status, "departures_held");
    assert_eq!(s.runs[1].departures_held, 80);
    assert_eq!(s.runs[2].run_id, "20261130T100011.000Z-00000001");
    let last = s.last_export.unwrap();
    assert_eq!(last.key, "s3://x/a/1.csv");
    assert_eq!(
        (last.status.as_str(), last.ledger_status.as_deref()),
        ("skipped_stale", Some("skipped_stale"))
    );
    let statuses: Vec<&str> = s.attention.iter().map(|a| a.status.as_str()).collect();
    assert_eq!(statuses, ["skipped_stale", "departures_held"]);
    assert!(s.attention[1].detail.starts_with("departures_held: 80"));
    let lease = s.lease.unwrap();
    assert_eq!(lease.holder, "20261130T130000.000Z-deadbeef");
    assert_eq!(lease.expires_in_s, 60);
}

#[test]
fn an_expired_or_released_lock_is_no_run_in_progress_and_a_completed_export_needs_nothing() {
    let mut r = reading();
    r.ledger = [entry("s3://x/a/2.csv#e2", LedgerStatus::Complete)].into();
    let s = RouteStatus::build(r.clone(), 1_000_060_001);
    assert!(s.lease.is_none());
    let statuses: Vec<&str> = s.attention.iter().map(|a| a.status.as_str()).collect();
    assert_eq!(
        statuses,
        ["skipped_stale"],
        "the released export is settled"
    );
    r.lock.as_mut().unwrap().released = true;
    assert!(RouteStatus::build(r, 0).lease.is_none());
}

#[test]
fn a_route_that_never_ran_shows_empty_state() {
    let s = RouteStatus::build(
        RouteReading {
            route: "new".into(),
            attributes_tracked: 3,
            ..RouteReading::default()
        },
        0,
    );
    assert_eq!(
        (s.state.users, s.state.generation, s.state.bytes),
        (0, 0, 0)
    );
    assert!(s.runs.is_empty() && s.last_export.is_none() && s.lease.is_none());
    let text = render(&[s]);
    assert!(text.contains("Runs       none yet"), "{text}");
    assert!(text.contains("no run in progress"), "{text}");
}

#[test]
fn the_table_shows_state_runs_held_and_the_lease_holder() {
    let text = render(&[RouteStatus::build(reading(), 1_000_000_000)]);
    assert!(text.contains("Route customers"), "{text}");
    assert!(
        text.contains("1000 users, 12 attributes tracked, generation 4, 8.9 KiB in 3 objects"),
        "{text}"
    );
    assert!(text.contains("Reflects   s3://x/a/2.csv (exported 2026-11-30 10:00:00Z)"));
    assert!(text.contains("Last export s3://x/a/1.csv"), "{text}");
    assert!(text.contains("20261130T130000.000Z-deadbeef holds the route lock"));
    assert!(text.contains("Last 10 runs (newest first)"));
    let held = text
        .lines()
        .find(|l| l.contains("departures_held") && l.contains("1.2s"))
        .unwrap();
    assert!(held.contains(" 100 ") && held.contains(" 80 "), "{held}");
    assert!(
        text.contains("Held/skipped:\n    skipped_stale s3://x/a/1.csv (ledger skipped_stale)")
    );
}

#[test]
fn json_field_names_are_the_documented_ones() {
    let v = serde_json::to_value(RouteStatus::build(reading(), 1_000_000_000)).unwrap();
    for f in [
        "route",
        "state",
        "watermark",
        "last_export",
        "runs",
        "attention",
        "lease",
        "fan_outs",
    ] {
        assert!(v.get(f).is_some(), "{f}");
    }
    for f in [
        "users",
        "attributes_tracked",
        "generation",
        "objects",
        "bytes",
        "head",
    ] {
        assert!(v["state"].get(f).is_some(), "state.{f}");
    }
    for f in [
        "run_id",
        "started_at",
        "status",
        "rows_in",
        "users_sent",
        "unchanged",
        "rejected",
        "braze_rejected",
        "departures_held",
        "duration_s",
    ] {
        assert!(v["runs"][0].get(f).is_some(), "runs[].{f}");
    }
    assert_eq!(v["lease"]["holder"], "20261130T130000.000Z-deadbeef");
    assert_eq!(v["last_export"]["exported_at"], serde_json::Value::Null);
}

#[test]
fn an_adoption_report_is_a_run_with_its_own_status() {
    let mut r = reading();
    r.reports = vec![(
        "s3://state/bridge/reports/customers/adopt-20261130T140000.000Z.json".into(),
        Bytes::from(
            r#"{"route":"customers","export_id":"s3://x/a/3.csv#e3","status":"adopted","rows_read":5,"rejected":1}"#,
        ),
    )];
    let s = RouteStatus::build(r, 0);
    assert_eq!(s.runs[0].status, "adopted");
    assert_eq!((s.runs[0].rows_in, s.runs[0].rejected), (5, 1));
    assert_eq!(s.last_export.unwrap().key, "s3://x/a/3.csv");
}

#[test]
fn fan_outs_in_progress_are_shown_and_merged_fork_objects_are_counted() {
    let mut r = reading();
    let obj = |name: &str, size| ObjectMeta {
        key: format!("bridge/state/customers/{name}"),
        size,
        ..ObjectMeta::default()
    };
    // A merged fan-out's delta, now referenced by the head; and a fan-out at work.
    let merged = "_fan_out/run0/p001/delta-00000-00000005-aa.bin";
    if let Some(h) = r.head.as_mut() {
        h.ranges[0].deltas.push(merged.into());
    }
    r.state_objects.extend([
        obj(merged, 50),
        obj("_fan_out/run1/manifest.json", 10),
        obj("_fan_out/run1/p000/head.json", 10),
        obj("_fan_out/run1/p001/head.json", 10),
        obj("_fan_out/run1/p002/head.json", 10),
        obj("_fan_out/run1/p000/done.json", 10),
        obj("_fan_out/run1/p000/departures.bin", 10),
        obj("_fan_out/run1/p002/done.json", 10),
        obj("_fan_out/run1/p002/delta-00001-00000006-bb.bin", 10),
    ]);
    let s = RouteStatus::build(r, 0);
    assert_eq!(s.state.bytes, 9000 + 100 + 24 + 50);
    assert_eq!(
        s.fan_outs,
        vec![FanOutProgress {
            run_id: "run1".into(),
            pieces: 3,
            pieces_done: 2,
            finalizing: false,
        }]
    );
    let text = render(std::slice::from_ref(&s));
    assert!(
        text.contains("Fan-out    run1: 2 of 3 pieces done"),
        "{text}"
    );
}
