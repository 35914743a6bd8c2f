//! What a file's records may still spend of the limits their bytes alone do not bound (array
//! items and rendered JSON), per record and for the whole file.

use crate::container::Limits;
use crate::datum::DatumError;
use crate::json::Budget;

/// What the rest of a file may still use of the limits that its bytes alone do not bound.
pub(super) struct FileBudget {
    pub(super) limits: Limits,
    items_left: u64,
    bytes_left: u64,
}

impl FileBudget {
    pub(super) fn new(limits: Limits) -> Self {
        Self {
            limits,
            items_left: limits.max_file_items,
            bytes_left: limits.max_file_json_bytes,
        }
    }

    /// The budget of the next record: the record's limits, or what the file has left when
    /// that is less (and then the file's limit is the one named).
    pub(super) fn record(&self) -> Budget {
        let l = &self.limits;
        let (items, items_error) = if l.max_record_items <= self.items_left {
            (
                l.max_record_items,
                DatumError::OverLimit {
                    what: "array/map items in one record",
                    limit: l.max_record_items,
                },
            )
        } else {
            (
                self.items_left,
                DatumError::OverLimit {
                    what: "array/map items in the file",
                    limit: l.max_file_items,
                },
            )
        };
        let (bytes, bytes_error) = if l.max_record_json_bytes <= self.bytes_left {
            (
                l.max_record_json_bytes,
                DatumError::OverLimit {
                    what: "rendered JSON bytes of one record",
                    limit: l.max_record_json_bytes,
                },
            )
        } else {
            (
                self.bytes_left,
                DatumError::OverLimit {
                    what: "rendered JSON bytes in the file",
                    limit: l.max_file_json_bytes,
                },
            )
        };
        Budget::new(items, items_error, bytes, bytes_error)
    }

    /// Charges what a record used.
    pub(super) fn charge(&mut self, start: &Budget, end: &Budget) {
        self.items_left = self
            .items_left
            .saturating_sub(start.items_left.saturating_sub(end.items_left));
        self.bytes_left = self
            .bytes_left
            .saturating_sub(start.bytes_left.saturating_sub(end.bytes_left));
    }
}
