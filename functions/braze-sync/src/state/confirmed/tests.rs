use super::*;
use crate::model::{AttributeChange, RowPos, fingerprint};
use serde_json::{Value, json};

fn delta(id: &str, changes: &[(&str, Value)]) -> UserDelta {
    UserDelta {
        identifier: Identifier::ExternalId(id.into()),
        pos: RowPos::default(),
        changes: changes
            .iter()
            .map(|(n, v)| AttributeChange {
                name: (*n).into(),
                value: v.clone(),
                fingerprint: (!v.is_null()).then(|| fingerprint(v)),
            })
            .collect(),
        update_existing_only: true,
        is_new: false,
        row_digest: None,
    }
}

fn names() -> Vec<String> {
    vec!["a".into(), "b".into()]
}

#[test]
fn confirmed_values_are_found_after_compaction_and_round_trip_through_bytes() {
    for keep_ids in [false, true] {
        let mut s = Snapshot::empty(names(), keep_ids);
        for i in 0..1000 {
            s.apply_confirmed(&delta(
                &i.to_string(),
                &[("a", json!(i)), ("b", json!("x"))],
            ));
        }
        s.apply_confirmed(&delta("7", &[("b", Value::Null)]));
        s.compact();
        assert_eq!(s.len(), 1000);
        let k = Identifier::ExternalId("7".into()).user_key();
        let st = s.get(k).unwrap();
        assert_eq!(st.fp(0), Some(stored_fp(fingerprint(&json!(7)))));
        assert_eq!(st.fp(1), None);
        let shards = s.encode_base(10_000);
        assert!(shards.len() > 1);
        let mut back = Snapshot::empty(names(), keep_ids);
        for (i, sh) in shards.iter().enumerate() {
            back.load_base_shard(sh, &format!("shard {i}")).unwrap();
        }
        assert_eq!(back.keys, s.keys);
        assert_eq!(back.fps, s.fps);
        for i in 0..1000 {
            let id = Identifier::ExternalId(i.to_string());
            assert!(back.get(id.user_key()).is_some());
            let expect = keep_ids.then(|| id.clone());
            assert_eq!(back.identifier(id.user_key()), expect);
        }
        assert!(
            back.get(Identifier::ExternalId("nope".into()).user_key())
                .is_none()
        );
    }
}

/// A reader handing out at most `step` bytes per call.
struct Trickle<'b>(&'b [u8], usize);
impl std::io::Read for Trickle<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        let n = self.0.len().min(out.len()).min(self.1);
        out[..n].copy_from_slice(&self.0[..n]);
        self.0 = &self.0[n..];
        Ok(n)
    }
}

#[test]
fn a_shard_streamed_in_any_pieces_loads_as_from_bytes_and_a_bad_one_is_refused() {
    for keep_ids in [false, true] {
        let mut s = Snapshot::empty(names(), keep_ids);
        for i in 0..3000 {
            s.apply_confirmed(&delta(
                &i.to_string(),
                &[("a", json!(i)), ("b", json!("x"))],
            ));
        }
        s.compact();
        let shard = s.encode_base(1 << 30).remove(0);
        // Read as written, with a slot added since (new layouts end in new slots), and
        // without identifiers kept.
        for (layout, ids) in [
            (names(), keep_ids),
            (vec!["a".into(), "b".into(), "c".into()], keep_ids),
            (vec!["b".into(), "a".into()], false),
        ] {
            let mut want = Snapshot::empty(layout.clone(), ids);
            want.load_base_shard(&shard, "shard").unwrap();
            for step in [1usize, 7, 4096, usize::MAX] {
                let mut got = Snapshot::empty(layout.clone(), ids);
                got.load_base_shard_stream(&mut Trickle(&shard, step), shard.len() as u64, "shard")
                    .unwrap();
                assert_eq!(got.keys, want.keys, "step {step}");
                assert_eq!(got.fps, want.fps, "step {step}");
                let id = Identifier::ExternalId("17".into());
                assert_eq!(
                    got.identifier(id.user_key()),
                    want.identifier(id.user_key())
                );
            }
        }
        // A flipped byte, a cut, a trailing byte, a count past the object: refused.
        let mut flipped = shard.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 1;
        let cut = &shard[..shard.len() - 10];
        let mut longer = shard.clone();
        longer.push(0);
        for (bad, what) in [
            (&flipped[..], "flipped"),
            (cut, "cut"),
            (&longer[..], "longer"),
        ] {
            let mut got = Snapshot::empty(names(), keep_ids);
            let err = got.load_base_shard_stream(&mut Trickle(bad, 999), bad.len() as u64, "shard");
            assert!(err.is_err(), "{what}");
        }
        let mut got = Snapshot::empty(names(), keep_ids);
        assert!(
            got.load_base_shard_stream(&mut Trickle(&shard, 999), 100, "shard")
                .is_err(),
            "a record count past the object's size"
        );
    }
}

#[test]
fn in_place_compaction_matches_a_simple_model() {
    use std::collections::BTreeMap;
    let mut model: BTreeMap<u128, (u64, Identifier)> = BTreeMap::new();
    let mut s = Snapshot::empty(names(), true);
    let mut x = 12345u64;
    let mut next = || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    for round in 0..5 {
        for _ in 0..300 {
            let id = Identifier::ExternalId(format!("u{}", next() % 700));
            let v = json!(next() % 5 + round);
            let d = delta_for(&id, &[("a", v.clone())]);
            s.apply_confirmed(&d);
            model.insert(id.user_key().0, (stored_fp(fingerprint(&v)), id));
        }
        s.compact();
        assert_eq!(s.len(), model.len());
        assert!(s.keys.windows(2).all(|w| w[0] < w[1]));
        for (k, (fp, id)) in &model {
            let st = s.get(UserKey(*k)).unwrap();
            assert_eq!(st.fp(0), Some(*fp));
            assert_eq!(s.identifier(UserKey(*k)).as_ref(), Some(id));
        }
    }
}

fn delta_for(id: &Identifier, changes: &[(&str, Value)]) -> UserDelta {
    let mut d = delta("x", changes);
    d.identifier = id.clone();
    d
}

#[test]
fn a_flipped_byte_fails_the_checksum() {
    let mut s = Snapshot::empty(names(), false);
    s.apply_confirmed(&delta("1", &[("a", json!(1))]));
    s.compact();
    let mut b = s.encode_base(1 << 20).remove(0);
    let mid = b.len() / 2;
    b[mid] ^= 1;
    let err = Snapshot::empty(names(), false)
        .load_base_shard(&b, "x")
        .unwrap_err();
    assert!(matches!(err, SnapshotError::Checksum { .. }));
}

#[test]
fn segments_apply_in_order_and_remap_by_name() {
    let seg1 = encode_segment(
        &names(),
        &[delta("1", &[("a", json!(1)), ("b", json!(2))])],
        true,
    );
    let seg2 = encode_segment(&names(), &[delta("1", &[("a", Value::Null)])], true);
    // A new layout: "b" kept, "a" dropped, "c" added.
    let mut s = Snapshot::empty(vec!["c".into(), "b".into()], true);
    s.apply_segment(&seg1, "s1").unwrap();
    s.apply_segment(&seg2, "s2").unwrap();
    s.compact();
    let id = Identifier::ExternalId("1".into());
    let st = s.get(id.user_key()).unwrap();
    assert_eq!(st.fp(0), None);
    assert_eq!(st.fp(1), Some(stored_fp(fingerprint(&json!(2)))));
    assert_eq!(s.identifier(id.user_key()), Some(id));
}

#[test]
fn an_empty_state_encodes_to_one_empty_shard() {
    let s = Snapshot::empty(names(), false);
    let shards = s.encode_base(1 << 20);
    assert_eq!(shards.len(), 1);
    let mut back = Snapshot::empty(names(), false);
    back.load_base_shard(&shards[0], "x").unwrap();
    assert!(back.is_empty());
}

#[test]
fn identifier_text_round_trips_and_matches_the_user_key() {
    for id in [
        Identifier::ExternalId("x".into()),
        Identifier::BrazeId("y".into()),
        Identifier::UserAlias {
            name: "n".into(),
            label: "l".into(),
        },
    ] {
        let t = identifier_text(&id);
        assert_eq!(parse_identifier(&t), Some(id.clone()));
        assert_eq!(
            UserKey(xxhash_rust::xxh3::xxh3_128(t.as_bytes())),
            id.user_key()
        );
    }
}

#[test]
fn a_compacted_state_holds_its_users_and_no_growth_room() {
    // A range loaded whole, then a tenth more users confirmed on top (a hand-over's delta):
    // the merged arrays take what the users need, not twice the range.
    let mut snap = Snapshot::empty(names(), true);
    let add = |snap: &mut Snapshot, from: u64, n: u64| {
        for i in from..from + n {
            let id = Identifier::ExternalId(format!("user-{i:08}"));
            snap.apply_confirmed(&delta_for(&id, &[("a", json!(i)), ("b", json!(true))]));
        }
        snap.compact();
    };
    add(&mut snap, 0, 20_000);
    add(&mut snap, 20_000, 2_000);
    let users = snap.len();
    assert_eq!(users, 22_000);
    // Per user: its key, its fingerprints, its identifier and its end; a quarter of a
    // bucket slot.
    let id_len = "user-00000000".len();
    let need = users * (16 + snap.names().len() * FP_BYTES + id_len + 8) + users;
    let held = snap.memory_bytes();
    assert!(
        held <= need + need / 8,
        "{users} users hold {held} bytes, over their {need} and an eighth"
    );
}
