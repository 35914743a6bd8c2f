//! Packs [`UserDelta`]s into `/users/track` request bodies `{"attributes":[...]}`: at most 75
//! objects (`BRAZE_MAX_OBJECTS_PER_REQUEST`; 50 on the combined-limit plan) across the three
//! arrays together, since a body carries only attribute objects, and never over the 4 MB
//! payload limit, measured in bytes as objects are appended. A [`Batch`] remembers which
//! delta sits at which index, so Braze's `errors[].index` maps back to a user and a row, and
//! splits in two when Braze answers 413. Pure: no I/O, no clock.

use bytes::{BufMut, Bytes, BytesMut};

use crate::model::UserDelta;

/// Braze's limit of attribute objects per request.
pub const MAX_OBJECTS: usize = 75;
/// The limit of combined updates per request on "Monthly Active Users – CY 24-25" contracts.
pub const COMBINED_MAX_OBJECTS: usize = 50;
/// Braze's payload limit is "4 MB"; we stay under the smaller reading (4,000,000 bytes).
pub const MAX_BODY_BYTES: usize = 4_000_000;

const PREFIX: &[u8] = b"{\"attributes\":[";
const SUFFIX: &[u8] = b"]}";

/// How big a request may be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchLimits {
    /// Attribute objects per request (1..=75).
    pub max_objects: usize,
    /// Serialized body size, bytes.
    pub max_bytes: usize,
}

impl Default for BatchLimits {
    fn default() -> Self {
        Self {
            max_objects: MAX_OBJECTS,
            max_bytes: MAX_BODY_BYTES,
        }
    }
}

impl BatchLimits {
    /// Limits from configuration: `max_objects` (clamped to 1..=75), lowered to 50 when the
    /// workspace has the combined-limit rule, and `max_bytes` (clamped to the 4 MB limit).
    pub fn new(max_objects: usize, combined_limit: bool, max_bytes: usize) -> Self {
        let cap = if combined_limit {
            COMBINED_MAX_OBJECTS
        } else {
            MAX_OBJECTS
        };
        Self {
            max_objects: max_objects.clamp(1, cap),
            max_bytes: max_bytes.clamp(PREFIX.len() + SUFFIX.len() + 2, MAX_BODY_BYTES),
        }
    }

    /// The largest single attribute object that fits in a request.
    pub fn max_object_bytes(&self) -> usize {
        self.max_bytes - PREFIX.len() - SUFFIX.len()
    }
}

/// One delta and its serialized attribute object.
#[derive(Debug, Clone)]
struct Entry {
    delta: UserDelta,
    json: Vec<u8>,
}

/// The deltas of one request, in request order (index `i` of `attributes` is `deltas()[i]`).
#[derive(Debug, Clone)]
pub struct Batch {
    entries: Vec<Entry>,
    body: Bytes,
}

impl Batch {
    fn seal(entries: Vec<Entry>) -> Self {
        let len = body_len(&entries);
        let mut buf = BytesMut::with_capacity(len);
        buf.put_slice(PREFIX);
        for (i, e) in entries.iter().enumerate() {
            if i > 0 {
                buf.put_u8(b',');
            }
            buf.put_slice(&e.json);
        }
        buf.put_slice(SUFFIX);
        Self {
            entries,
            body: buf.freeze(),
        }
    }

    /// The request body, `{"attributes":[...]}` (cheap to clone for a retry).
    pub fn body(&self) -> Bytes {
        self.body.clone()
    }

    /// Body size in bytes.
    pub fn body_len(&self) -> usize {
        self.body.len()
    }

    /// Number of attribute objects.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when the batch holds no object (never produced by [`Batcher`]).
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    #[cfg(test)]
    /// The delta at `errors[].index`.
    pub fn delta_at(&self, index: usize) -> Option<&UserDelta> {
        self.entries.get(index).map(|e| &e.delta)
    }

    /// The deltas in request order.
    pub fn deltas(&self) -> impl Iterator<Item = &UserDelta> {
        self.entries.iter().map(|e| &e.delta)
    }

    /// Attributes carried by the batch (sum over its deltas).
    pub fn attribute_count(&self) -> usize {
        self.entries.iter().map(|e| e.delta.changes.len()).sum()
    }

    /// Gives the deltas back, in request order.
    pub fn into_deltas(self) -> Vec<UserDelta> {
        self.entries.into_iter().map(|e| e.delta).collect()
    }

    /// Takes out the objects whose `out[i]` is true: returns the rest as a new batch (`None`
    /// when nothing is left) and the taken deltas, both in request order. Used after a 400
    /// that named its offending objects, so the valid ones can be sent again on their own.
    pub fn take_out(self, out: &[bool]) -> (Option<Batch>, Vec<UserDelta>) {
        let mut kept = Vec::with_capacity(self.entries.len());
        let mut taken = Vec::new();
        for (i, e) in self.entries.into_iter().enumerate() {
            if out.get(i).copied().unwrap_or(false) {
                taken.push(e.delta);
            } else {
                kept.push(e);
            }
        }
        ((!kept.is_empty()).then(|| Batch::seal(kept)), taken)
    }

    /// Splits into two halves (for a 413). `None` for a batch of one object, which cannot be
    /// made smaller.
    pub fn split(self) -> Option<(Batch, Batch)> {
        if self.entries.len() < 2 {
            return None;
        }
        let mut first = self.entries;
        let second = first.split_off(first.len() / 2);
        Some((Batch::seal(first), Batch::seal(second)))
    }
}

fn body_len(entries: &[Entry]) -> usize {
    PREFIX.len()
        + SUFFIX.len()
        + entries.iter().map(|e| e.json.len()).sum::<usize>()
        + entries.len().saturating_sub(1)
}

/// A single attribute object larger than a whole request may be.
#[derive(Debug, Clone, thiserror::Error)]
#[error("attribute object is {bytes} bytes, over the {limit}-byte request limit")]
pub struct Oversized {
    /// The delta that cannot be sent.
    pub delta: UserDelta,
    /// Its serialized size.
    pub bytes: usize,
    /// The most an object may take.
    pub limit: usize,
}

/// Accumulates deltas and hands out full batches.
#[derive(Debug)]
pub struct Batcher {
    limits: BatchLimits,
    open: Vec<Entry>,
    open_bytes: usize,
}

impl Batcher {
    /// An empty batcher.
    pub fn new(limits: BatchLimits) -> Self {
        Self {
            limits,
            open: Vec::with_capacity(limits.max_objects),
            open_bytes: PREFIX.len() + SUFFIX.len(),
        }
    }

    /// The limits in force.
    pub fn limits(&self) -> BatchLimits {
        self.limits
    }

    /// Adds a delta. Returns the batches that became full (usually none, at most two), or the
    /// delta back when its object alone is over the size limit.
    pub fn push(&mut self, delta: UserDelta) -> Result<Vec<Batch>, Box<Oversized>> {
        let json = serde_json::to_vec(&delta.to_attribute_object()).unwrap_or_default();
        if json.len() > self.limits.max_object_bytes() {
            return Err(Box::new(Oversized {
                bytes: json.len(),
                limit: self.limits.max_object_bytes(),
                delta,
            }));
        }
        let mut out = Vec::new();
        let added = json.len() + usize::from(!self.open.is_empty());
        if !self.open.is_empty() && self.open_bytes + added > self.limits.max_bytes {
            out.extend(self.flush());
        }
        self.open_bytes += json.len() + usize::from(!self.open.is_empty());
        self.open.push(Entry { delta, json });
        if self.open.len() >= self.limits.max_objects {
            out.extend(self.flush());
        }
        Ok(out)
    }

    /// Seals whatever is open (the last, partial batch).
    pub fn flush(&mut self) -> Option<Batch> {
        if self.open.is_empty() {
            return None;
        }
        let entries =
            std::mem::replace(&mut self.open, Vec::with_capacity(self.limits.max_objects));
        self.open_bytes = PREFIX.len() + SUFFIX.len();
        Some(Batch::seal(entries))
    }

    /// Deltas waiting in the open batch.
    pub fn pending(&self) -> usize {
        self.open.len()
    }

    /// Gives back the open deltas without sending them (when a run stops).
    pub fn take_pending(&mut self) -> Vec<UserDelta> {
        self.open_bytes = PREFIX.len() + SUFFIX.len();
        std::mem::take(&mut self.open)
            .into_iter()
            .map(|e| e.delta)
            .collect()
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::model::{AttributeChange, Identifier, RowPos};
    use serde_json::{Value, json};

    fn delta(i: usize, payload: usize) -> UserDelta {
        UserDelta {
            identifier: Identifier::ExternalId(format!("u{i}")),
            pos: RowPos {
                source: "s3://b/k.csv".into(),
                row: i as u64 + 1,
                line: Some(i as u64 + 2),
            },
            changes: vec![AttributeChange {
                name: "note".into(),
                value: json!("x".repeat(payload)),
                fingerprint: None,
            }],
            update_existing_only: true,
            is_new: false,
            row_digest: None,
        }
    }

    fn pack(limits: BatchLimits, deltas: impl IntoIterator<Item = UserDelta>) -> Vec<Batch> {
        let mut b = Batcher::new(limits);
        let mut out = Vec::new();
        for d in deltas {
            out.extend(b.push(d).unwrap());
        }
        out.extend(b.flush());
        out
    }

    #[test]
    fn batches_hold_at_most_75_objects() {
        let batches = pack(BatchLimits::default(), (0..200).map(|i| delta(i, 3)));
        let sizes: Vec<_> = batches.iter().map(Batch::len).collect();
        assert_eq!(sizes, [75, 75, 50]);
    }

    #[test]
    fn objects_across_all_three_arrays_stay_within_the_configured_size() {
        // Braze counts attributes, events and purchases of a request together on current
        // contracts: a body carries only attribute objects, so the configured size (75 by
        // default, lower per deployment) bounds the three arrays together.
        for max in [75, 60, 1] {
            let limits = BatchLimits::new(max, false, MAX_BODY_BYTES);
            for b in pack(limits, (0..160).map(|i| delta(i, 3))) {
                let v: Value = serde_json::from_slice(&b.body()).unwrap();
                let len = |k: &str| v.get(k).and_then(Value::as_array).map_or(0, Vec::len);
                assert!(len("attributes") + len("events") + len("purchases") <= max);
                assert_eq!(len("events") + len("purchases"), 0);
            }
        }
    }

    #[test]
    fn combined_limit_plan_caps_batches_at_50() {
        let limits = BatchLimits::new(75, true, MAX_BODY_BYTES);
        assert_eq!(limits.max_objects, 50);
        let batches = pack(limits, (0..120).map(|i| delta(i, 3)));
        let sizes: Vec<_> = batches.iter().map(Batch::len).collect();
        assert_eq!(sizes, [50, 50, 20]);
        assert_eq!(
            BatchLimits::new(500, false, usize::MAX),
            BatchLimits::default()
        );
    }

    #[test]
    fn body_is_valid_json_and_index_maps_back_to_the_delta() {
        let batches = pack(BatchLimits::default(), (0..3).map(|i| delta(i, 2)));
        let b = &batches[0];
        let v: Value = serde_json::from_slice(&b.body()).unwrap();
        let attrs = v["attributes"].as_array().unwrap();
        assert_eq!(attrs.len(), 3);
        for (i, a) in attrs.iter().enumerate() {
            assert_eq!(a, &b.delta_at(i).unwrap().to_attribute_object());
        }
        assert_eq!(b.delta_at(2).unwrap().pos.row, 3);
        assert!(b.delta_at(3).is_none());
    }

    #[test]
    fn bodies_never_exceed_the_byte_limit_and_the_measure_is_exact() {
        let limits = BatchLimits::new(75, false, 2_000);
        let batches = pack(limits, (0..100).map(|i| delta(i, 37 + i % 50)));
        assert!(batches.len() > 2);
        let mut total = 0;
        for b in &batches {
            assert!(b.body_len() <= 2_000, "{}", b.body_len());
            let v: Value = serde_json::from_slice(&b.body()).unwrap();
            total += v["attributes"].as_array().unwrap().len();
            // The next object would not have fitted (except in the last batch).
        }
        assert_eq!(total, 100);
    }

    #[test]
    fn four_megabyte_limit_splits_large_objects() {
        // 75 objects of ~100 KB would be ~7.5 MB: two requests, both under 4 MB.
        let batches = pack(BatchLimits::default(), (0..75).map(|i| delta(i, 100_000)));
        assert_eq!(batches.len(), 2);
        assert!(batches.iter().all(|b| b.body_len() <= MAX_BODY_BYTES));
        assert_eq!(batches.iter().map(Batch::len).sum::<usize>(), 75);
    }

    #[test]
    fn an_object_over_the_limit_alone_is_handed_back() {
        let mut b = Batcher::new(BatchLimits::new(75, false, 1_000));
        let err = b.push(delta(7, 2_000)).unwrap_err();
        assert_eq!(err.delta.pos.row, 8);
        assert!(err.bytes > err.limit);
        assert_eq!(b.pending(), 0);
    }

    #[test]
    fn split_halves_keep_order_and_every_delta() {
        let batches = pack(BatchLimits::default(), (0..75).map(|i| delta(i, 1)));
        let (a, b) = batches.into_iter().next().unwrap().split().unwrap();
        assert_eq!(a.len(), 37);
        assert_eq!(b.len(), 38);
        assert_eq!(a.delta_at(0).unwrap().pos.row, 1);
        assert_eq!(b.delta_at(0).unwrap().pos.row, 38);
        let v: Value = serde_json::from_slice(&b.body()).unwrap();
        assert_eq!(v["attributes"].as_array().unwrap().len(), 38);
        let single = pack(BatchLimits::default(), [delta(0, 1)]);
        assert!(single.into_iter().next().unwrap().split().is_none());
    }

    #[test]
    fn take_out_keeps_the_rest_as_a_batch_in_order() {
        let batch = pack(BatchLimits::default(), (0..4).map(|i| delta(i, 1)))
            .into_iter()
            .next()
            .unwrap();
        let (rest, taken) = batch.take_out(&[false, true, false, true]);
        let rest = rest.unwrap();
        assert_eq!(rest.len(), 2);
        assert_eq!(rest.delta_at(1).unwrap().pos.row, 3);
        let v: Value = serde_json::from_slice(&rest.body()).unwrap();
        assert_eq!(v["attributes"].as_array().unwrap().len(), 2);
        assert_eq!(taken.iter().map(|d| d.pos.row).collect::<Vec<_>>(), [2, 4]);
        let one = pack(BatchLimits::default(), [delta(0, 1)]);
        let (rest, taken) = one.into_iter().next().unwrap().take_out(&[true]);
        assert!(rest.is_none());
        assert_eq!(taken.len(), 1);
    }

    #[test]
    fn pending_deltas_can_be_taken_back() {
        let mut b = Batcher::new(BatchLimits::default());
        for i in 0..5 {
            assert!(b.push(delta(i, 1)).unwrap().is_empty());
        }
        assert_eq!(b.take_pending().len(), 5);
        assert!(b.flush().is_none());
    }
}
