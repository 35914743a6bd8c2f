#![allow(clippy::unwrap_used)]

use super::*;
use bridge_shared::object_store::MemoryStore;

/// 2026-01-01T10:00:00Z in epoch ms.
const TEN: i64 = 1_767_261_600_000;

fn at(h: i64, m: i64, s: i64) -> i64 {
    TEN + h * HOUR_MS + (m * 60 + s) * 1000
}

#[test]
fn a_sender_claims_in_blocks_and_spends_a_token_per_request() {
    let mut c = BudgetCore::new(1_000);
    let now = at(0, 10, 0);
    let hour = hour_of(now);
    assert_eq!(c.take(now), Take::Claim { hour, want: 20 });
    c.claimed(hour, 20);
    for _ in 0..20 {
        assert_eq!(c.take(now), Take::Go);
    }
    assert_eq!(c.take(now), Take::Claim { hour, want: 20 });
    // The counter had 3 left: they are spent, then the hour is over for this sender.
    c.claimed(hour, 3);
    for _ in 0..3 {
        assert_eq!(c.take(now), Take::Go);
    }
    assert_eq!(c.take(now), Take::Claim { hour, want: 20 });
    c.claimed(hour, 0);
    assert_eq!(
        c.take(now + 1),
        Take::Spent {
            until_ms: at(1, 0, 1)
        }
    );
}

#[test]
fn blocks_are_a_fiftieth_of_the_limit_between_1_and_250() {
    let want = |limit| match BudgetCore::new(limit).take(at(0, 30, 0)) {
        Take::Claim { want, .. } => want,
        other => panic!("{other:?}"),
    };
    assert_eq!(want(10), 1);
    assert_eq!(want(5_000), 100);
    assert_eq!(want(10_000_000), 250);
}

#[test]
fn a_new_hour_drops_the_last_hours_tokens_and_its_spent_mark() {
    let mut c = BudgetCore::new(100);
    let h0 = hour_of(at(0, 20, 0));
    assert!(matches!(c.take(at(0, 20, 0)), Take::Claim { .. }));
    c.claimed(h0, 2);
    assert_eq!(c.take(at(0, 20, 0)), Take::Go);
    assert!(matches!(c.take(at(0, 59, 0)), Take::Go));
    assert!(matches!(c.take(at(0, 59, 0)), Take::Claim { .. }));
    c.claimed(h0, 0);
    assert!(matches!(c.take(at(0, 59, 30)), Take::Spent { .. }));
    // The next hour claims from its own counter.
    assert_eq!(
        c.take(at(1, 0, 5)),
        Take::Claim {
            hour: h0 + 1,
            want: 2
        }
    );
    c.claimed(h0 + 1, 2);
    assert_eq!(c.held(), 2);
    // Tokens held when the hour turns are not spent in the next one.
    assert_eq!(
        c.take(at(2, 0, 5)),
        Take::Claim {
            hour: h0 + 2,
            want: 2
        }
    );
    assert_eq!(c.held(), 0);
}

#[test]
fn no_request_goes_out_at_the_turn_of_the_hour() {
    let mut c = BudgetCore::new(100);
    assert_eq!(
        c.take(at(0, 59, 59) + 500),
        Take::Wait {
            until_ms: at(1, 0, 1)
        }
    );
    assert_eq!(
        c.take(at(1, 0, 0) + 200),
        Take::Wait {
            until_ms: at(1, 0, 1)
        }
    );
    assert!(matches!(c.take(at(1, 0, 1)), Take::Claim { .. }));
}

#[test]
fn a_grant_for_an_hour_gone_by_is_dropped() {
    let mut c = BudgetCore::new(100);
    let h0 = hour_of(at(0, 30, 0));
    assert!(matches!(c.take(at(0, 30, 0)), Take::Claim { .. }));
    assert!(matches!(c.take(at(1, 0, 2)), Take::Claim { .. }));
    c.claimed(h0, 2);
    assert_eq!(c.held(), 0);
    assert_eq!(c.leftover(), None);
}

fn budget(store: Arc<dyn ObjectStore>, limit: u64) -> HourlyBudget {
    HourlyBudget::new(store, "state", "bridge/state", limit)
}

#[tokio::test]
async fn claims_never_grant_more_than_the_limit_and_tokens_come_back() {
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let b = budget(store, 10);
    let h = hour_of(at(0, 10, 0));
    assert_eq!(b.claim(h, 4).await.unwrap(), 4);
    assert_eq!(b.claim(h, 4).await.unwrap(), 4);
    assert_eq!(b.claim(h, 4).await.unwrap(), 2);
    assert_eq!(b.claim(h, 4).await.unwrap(), 0);
    assert_eq!(b.spent_until(at(0, 10, 0)).await, Some(at(1, 0, 1)));
    // The next hour has its own counter.
    assert_eq!(b.claim(h + 1, 4).await.unwrap(), 4);
    assert_eq!(b.give_back(h, 3).await.unwrap(), 3);
    assert_eq!(b.spent_until(at(0, 10, 0)).await, None);
    let (_, doc) = b.read(h).await.unwrap().unwrap();
    assert_eq!(
        doc,
        CounterDoc {
            hour: "2026-01-01T10".into(),
            limit: 10,
            spent: 7
        }
    );
    assert_eq!(
        b.uri(h).to_string(),
        "s3://state/bridge/state/_workspace/budget/2026-01-01T10.json"
    );
}

#[tokio::test(start_paused = true)]
async fn senders_at_once_spend_exactly_the_hours_budget_between_them() {
    let base = chrono::DateTime::from_timestamp_millis(at(0, 20, 0)).unwrap();
    crate::clock::set_virtual(base);
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let b = budget(store, 500);
    let spenders: Vec<Arc<Spender>> = (0..4).map(|_| Arc::new(Spender::new(b.clone()))).collect();
    let mut tasks = Vec::new();
    for s in &spenders {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while s.take().await.is_ok() {
                sent += 1;
                tokio::task::yield_now().await;
            }
            sent
        }));
    }
    let mut sent = Vec::new();
    for t in tasks {
        sent.push(t.await.unwrap());
    }
    crate::clock::clear_virtual();
    assert_eq!(sent.iter().sum::<u64>(), 500, "{sent:?}");
    assert!(
        sent.iter().all(|n| *n > 0),
        "each sender had a part: {sent:?}"
    );
}

#[tokio::test(start_paused = true)]
async fn a_sender_gives_back_what_it_did_not_spend() {
    let base = chrono::DateTime::from_timestamp_millis(at(0, 20, 0)).unwrap();
    crate::clock::set_virtual(base);
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let b = budget(store, 1_000);
    let s = Spender::new(b.clone());
    for _ in 0..3 {
        s.take().await.unwrap();
    }
    s.finish().await;
    let (_, doc) = b.read(hour_of(at(0, 20, 0))).await.unwrap().unwrap();
    crate::clock::clear_virtual();
    assert_eq!(doc.spent, 3);
}

#[tokio::test(start_paused = true)]
async fn a_sender_at_the_turn_of_the_hour_waits_then_spends_the_new_hours_budget() {
    let base = chrono::DateTime::from_timestamp_millis(at(0, 59, 59) + 400).unwrap();
    crate::clock::set_virtual(base);
    let store: Arc<dyn ObjectStore> = Arc::new(MemoryStore::new());
    let b = budget(store, 10);
    let s = Spender::new(b.clone());
    s.take().await.unwrap();
    let now = crate::clock::now_ms();
    crate::clock::clear_virtual();
    assert_eq!(now, at(1, 0, 1), "waited out the edge on both sides");
    assert!(b.read(hour_of(at(0, 59, 0))).await.unwrap().is_none());
    assert_eq!(
        b.read(hour_of(now)).await.unwrap().unwrap().1.spent,
        1,
        "the new hour's counter"
    );
}

#[tokio::test(start_paused = true)]
async fn an_unreadable_counter_stops_the_sender_instead_of_sending_uncounted() {
    let base = chrono::DateTime::from_timestamp_millis(at(0, 20, 0)).unwrap();
    crate::clock::set_virtual(base);
    let store = Arc::new(MemoryStore::new());
    let b = budget(store.clone(), 10);
    let h = hour_of(at(0, 20, 0));
    store
        .put(
            &b.uri(h),
            Bytes::from_static(b"not json"),
            PutCondition::None,
            BTreeMap::new(),
        )
        .await
        .unwrap();
    let s = Spender::new(b.clone());
    let refused = s.take().await.unwrap_err();
    crate::clock::clear_virtual();
    assert!(refused.reason.contains("is not a counter"), "{refused:?}");
    // Whoever only asks whether the hour is spent is not held up by it.
    assert_eq!(b.spent_until(at(0, 20, 0)).await, None);
}

#[test]
fn an_export_is_starved_only_after_a_whole_day_of_waiting_without_sending() {
    let since = at(0, 20, 0);
    assert!(!starved(since, since));
    assert!(!starved(since, since + 23 * HOUR_MS + 59 * 60_000));
    assert!(starved(since, since + 24 * HOUR_MS));
    assert!(starved(since, since + 30 * HOUR_MS));
    // A clock that went back never starves an export.
    assert!(!starved(since, since - HOUR_MS));
}
