//! Rows that were not sent, and why: one NDJSON line per rejected row,
//! `{"source","row","line","column","reason","identifier"}`, for the rejects object the run
//! writes to `s3://<state bucket>/<REJECTS_PREFIX><route>/<run id>.ndjson`. A [`RejectLog`]
//! keeps the encoded lines under a byte bound and counts what it had to drop, so a file of
//! nothing but bad rows cannot exhaust memory.

use bytes::Bytes;
use serde_json::{Map, Value, json};

use crate::model::{Identifier, RowPos, UserDelta};

/// One rejected row.
#[derive(Debug, Clone, PartialEq)]
pub struct RowReject {
    /// Where the row is.
    pub pos: RowPos,
    /// The column at fault, when one is.
    pub column: Option<String>,
    /// Why it was rejected.
    pub reason: String,
    /// The user, when the identifier could be read.
    pub identifier: Option<Identifier>,
}

impl RowReject {
    /// A row the reader could not turn into cells (its identifier unread), at `source`.
    pub fn unreadable(source: &str, bad: crate::read::BadRow) -> Self {
        Self {
            pos: RowPos {
                source: source.to_string(),
                row: bad.row,
                line: bad.line,
            },
            column: bad.column,
            reason: bad.reason,
            identifier: None,
        }
    }

    /// A row the mapper refused (`e`), at `source`; `identifier` when it was read.
    pub fn unmapped(
        source: &str,
        row: &crate::read::Row<'_>,
        e: crate::map::MapError,
        identifier: Option<Identifier>,
    ) -> Self {
        Self {
            pos: RowPos {
                source: source.to_string(),
                row: row.row,
                line: row.line,
            },
            column: e.column,
            reason: e.reason,
            identifier,
        }
    }

    /// A row Braze refused (a [`crate::model::DeliveryOutcome::Rejected`]).
    pub fn from_braze(delta: &UserDelta, reason: &str) -> Self {
        Self {
            pos: delta.pos.clone(),
            column: None,
            reason: format!("Braze refused the attribute object: {reason}"),
            identifier: Some(delta.identifier.clone()),
        }
    }

    /// The NDJSON object.
    pub fn to_json(&self) -> Value {
        let mut o = json!({
            "source": self.pos.source,
            "row": self.pos.row,
            "line": self.pos.line,
            "column": self.column,
            "reason": self.reason,
        });
        if let (Some(id), Some(obj)) = (&self.identifier, o.as_object_mut()) {
            let mut idm = Map::new();
            id.write_to(&mut idm);
            obj.insert("identifier".into(), Value::Object(idm));
        }
        o
    }

    /// Appends the NDJSON line (with its newline).
    pub fn write_line(&self, out: &mut Vec<u8>) {
        let _ = serde_json::to_writer(&mut *out, &self.to_json());
        out.push(b'\n');
    }
}

/// The key of a run's rejects object.
pub fn rejects_key(rejects_prefix: &str, route: &str, run_id: &str) -> String {
    let sep = if rejects_prefix.is_empty() || rejects_prefix.ends_with('/') {
        ""
    } else {
        "/"
    };
    format!("{rejects_prefix}{sep}{route}/{run_id}.ndjson")
}

/// Default bound on the encoded rejects of one run.
pub const DEFAULT_MAX_BYTES: usize = 64 * 1024 * 1024;

/// The rejects of one run, encoded as they come.
#[derive(Debug, Clone)]
pub struct RejectLog {
    buf: Vec<u8>,
    max_bytes: usize,
    total: u64,
    dropped: u64,
}

impl Default for RejectLog {
    fn default() -> Self {
        Self::new(DEFAULT_MAX_BYTES)
    }
}

impl RejectLog {
    /// A log keeping at most `max_bytes` of lines.
    pub fn new(max_bytes: usize) -> Self {
        Self {
            buf: Vec::new(),
            max_bytes,
            total: 0,
            dropped: 0,
        }
    }

    /// Records a reject (counted even when the line no longer fits).
    pub fn push(&mut self, r: &RowReject) {
        self.total += 1;
        let before = self.buf.len();
        r.write_line(&mut self.buf);
        if self.buf.len() > self.max_bytes {
            self.buf.truncate(before);
            self.dropped += 1;
        }
    }

    /// Rejects recorded.
    pub fn total(&self) -> u64 {
        self.total
    }

    /// Rejects counted but not kept (over the byte bound).
    pub fn dropped(&self) -> u64 {
        self.dropped
    }

    /// True when nothing was rejected.
    pub fn is_empty(&self) -> bool {
        self.total == 0
    }

    /// Bytes of lines kept.
    pub fn len_bytes(&self) -> usize {
        self.buf.len()
    }

    /// Appends another log's lines (as many as fit) and counts.
    pub fn absorb(&mut self, other: &RejectLog) {
        self.total += other.total;
        self.dropped += other.dropped;
        if self.buf.len() + other.buf.len() <= self.max_bytes {
            self.buf.extend_from_slice(&other.buf);
            return;
        }
        for line in other.buf.split_inclusive(|b| *b == b'\n') {
            if self.buf.len() + line.len() <= self.max_bytes {
                self.buf.extend_from_slice(line);
            } else {
                self.dropped += 1;
            }
        }
    }

    /// The NDJSON body.
    pub fn into_body(self) -> Bytes {
        Bytes::from(self.buf)
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn a_reject_is_one_ndjson_line_with_position_column_and_reason() {
        let r = RowReject {
            pos: RowPos {
                source: "s3://b/k.csv".into(),
                row: 7,
                line: Some(9),
            },
            column: Some("visits".into()),
            reason: "\"x\" is not an integer".into(),
            identifier: Some(Identifier::ExternalId("42".into())),
        };
        let mut out = Vec::new();
        r.write_line(&mut out);
        let text = String::from_utf8(out).unwrap();
        assert!(text.ends_with('\n'));
        let v: Value = serde_json::from_str(text.trim()).unwrap();
        assert_eq!(
            v,
            json!({"source":"s3://b/k.csv","row":7,"line":9,"column":"visits",
                   "reason":"\"x\" is not an integer","identifier":{"external_id":"42"}})
        );
    }

    #[test]
    fn absorbing_a_log_keeps_the_bound_and_every_count() {
        let r = RowReject {
            pos: RowPos::default(),
            column: None,
            reason: "x".repeat(100),
            identifier: None,
        };
        let mut a = RejectLog::new(1_000);
        let mut b = RejectLog::new(100_000);
        for _ in 0..5 {
            a.push(&r);
        }
        for _ in 0..20 {
            b.push(&r);
        }
        a.absorb(&b);
        assert_eq!(a.total(), 25);
        assert!(a.len_bytes() <= 1_000);
        let kept = a.total() - a.dropped();
        let body = a.into_body();
        assert_eq!(body.iter().filter(|b| **b == b'\n').count() as u64, kept);
    }

    #[test]
    fn the_log_is_bounded_but_counts_everything() {
        let r = RowReject {
            pos: RowPos::default(),
            column: None,
            reason: "x".repeat(100),
            identifier: None,
        };
        let mut log = RejectLog::new(300);
        for _ in 0..10 {
            log.push(&r);
        }
        assert_eq!(log.total(), 10);
        assert!(log.dropped() >= 8);
        assert!(log.into_body().len() <= 300);
        assert_eq!(
            rejects_key("bridge/rejects/", "c", "run1"),
            "bridge/rejects/c/run1.ndjson"
        );
    }
}
