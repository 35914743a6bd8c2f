//! Apache Parquet parts (Snappy, gzip or uncompressed pages), read through Arrow one record
//! batch at a time from a spilled temp file, so memory is bounded by one batch whatever the
//! part's size. A Parquet *folder* is several parts; the caller reads each part in key order
//! as its own source. Scalars keep their types (integers, decimals, dates, timestamps);
//! nested columns are refused per cell.

use std::fs::File;

use arrow_array::cast::AsArray;
use arrow_array::types::{
    Date32Type, Date64Type, Decimal128Type, Float32Type, Float64Type, Int8Type, Int16Type,
    Int32Type, Int64Type, TimestampMicrosecondType, TimestampMillisecondType,
    TimestampNanosecondType, TimestampSecondType, UInt8Type, UInt16Type, UInt32Type, UInt64Type,
};
use arrow_array::{Array, ArrayRef, RecordBatch};
use arrow_schema::{DataType, TimeUnit};
use chrono::{DateTime, NaiveDate, Utc};
use parquet::arrow::arrow_reader::{ParquetRecordBatchReader, ParquetRecordBatchReaderBuilder};

use super::{Cell, CellError, Cells, ReadError, Row, RowItem, RowSource};

/// Most rows per Arrow batch.
pub const BATCH_ROWS: usize = 4096;
/// Most decoded bytes one batch may hold; the batch's row count is chosen so rows within
/// `max_row_bytes` fit, and a batch that decodes larger fails the part.
pub const MAX_BATCH_BYTES: usize = 256 * 1024 * 1024;

/// Runs a call into the parquet crate, turning a panic inside it (a malformed page can make
/// its decoders panic) into an error for this part: the function keeps running and reports
/// the file. Needs `panic = "unwind"` (the release profile sets it).
fn contained<T>(source: &str, f: impl FnOnce() -> T) -> Result<T, ReadError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)).map_err(|payload| {
        let message = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_string())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "panic".into());
        ReadError::DecoderPanic {
            source_name: source.to_string(),
            decoder: "Parquet",
            message,
        }
    })
}

/// Bytes of row `i` of `batch` (text and binary values by length, other values 8).
fn row_bytes(batch: &RecordBatch, i: usize) -> usize {
    batch
        .columns()
        .iter()
        .map(|c| match c.data_type() {
            DataType::Utf8 => c.as_string::<i32>().value(i).len(),
            DataType::LargeUtf8 => c.as_string::<i64>().value(i).len(),
            DataType::Utf8View => c.as_string_view().value(i).len(),
            DataType::Binary => c.as_binary::<i32>().value(i).len(),
            DataType::LargeBinary => c.as_binary::<i64>().value(i).len(),
            _ => 8,
        })
        .sum()
}

/// One row of the current batch.
struct BatchCells {
    batch: Option<RecordBatch>,
    idx: usize,
}

fn date_from_days(days: i64) -> Option<NaiveDate> {
    NaiveDate::from_ymd_opt(1970, 1, 1)?.checked_add_signed(chrono::Duration::try_days(days)?)
}

fn dict_str(col: &ArrayRef, idx: usize) -> Option<Result<Cell<'_>, CellError>> {
    macro_rules! try_key {
        ($k:ty) => {
            if let Some(d) = col.as_dictionary_opt::<$k>() {
                let key = d.keys().value(idx);
                let key = usize::try_from(key).ok()?;
                let values = d.values();
                return Some(match values.as_string_opt::<i32>() {
                    Some(s) if key < s.len() && !s.is_null(key) => {
                        let v = s.value(key);
                        str_cell(v)
                    }
                    Some(_) => Ok(Cell::Null),
                    None => Err(CellError::Unsupported(format!(
                        "dictionary of {}",
                        values.data_type()
                    ))),
                });
            }
        };
    }
    try_key!(Int8Type);
    try_key!(Int16Type);
    try_key!(Int32Type);
    try_key!(Int64Type);
    None
}

impl Cells for BatchCells {
    fn len(&self) -> usize {
        self.batch.as_ref().map_or(0, |b| b.num_columns())
    }

    fn cell(&self, index: usize) -> Result<Cell<'_>, CellError> {
        let Some(batch) = &self.batch else {
            return Ok(Cell::Null);
        };
        if index >= batch.num_columns() {
            return Ok(Cell::Null);
        }
        let col = batch.column(index);
        let i = self.idx;
        if col.is_null(i) {
            return Ok(Cell::Null);
        }
        let unsupported = || CellError::Unsupported(col.data_type().to_string());
        Ok(match col.data_type() {
            DataType::Null => Cell::Null,
            DataType::Utf8 => str_cell(col.as_string::<i32>().value(i))?,
            DataType::LargeUtf8 => str_cell(col.as_string::<i64>().value(i))?,
            DataType::Utf8View => str_cell(col.as_string_view().value(i))?,
            DataType::Boolean => Cell::Bool(col.as_boolean().value(i)),
            DataType::Int8 => Cell::Int(col.as_primitive::<Int8Type>().value(i).into()),
            DataType::Int16 => Cell::Int(col.as_primitive::<Int16Type>().value(i).into()),
            DataType::Int32 => Cell::Int(col.as_primitive::<Int32Type>().value(i).into()),
            DataType::Int64 => Cell::Int(col.as_primitive::<Int64Type>().value(i)),
            DataType::UInt8 => Cell::Int(col.as_primitive::<UInt8Type>().value(i).into()),
            DataType::UInt16 => Cell::Int(col.as_primitive::<UInt16Type>().value(i).into()),
            DataType::UInt32 => Cell::Int(col.as_primitive::<UInt32Type>().value(i).into()),
            DataType::UInt64 => {
                let v = col.as_primitive::<UInt64Type>().value(i);
                match i64::try_from(v) {
                    Ok(v) => Cell::Int(v),
                    Err(_) => Cell::Float(v as f64),
                }
            }
            DataType::Float32 => Cell::Float(col.as_primitive::<Float32Type>().value(i).into()),
            DataType::Float64 => Cell::Float(col.as_primitive::<Float64Type>().value(i)),
            DataType::Decimal128(_, scale) => Cell::Decimal {
                unscaled: col.as_primitive::<Decimal128Type>().value(i),
                scale: *scale,
            },
            DataType::Date32 => {
                let days = col.as_primitive::<Date32Type>().value(i);
                Cell::Date(date_from_days(days.into()).ok_or_else(unsupported)?)
            }
            DataType::Date64 => {
                let ms = col.as_primitive::<Date64Type>().value(i);
                Cell::Date(
                    DateTime::<Utc>::from_timestamp_millis(ms)
                        .ok_or_else(unsupported)?
                        .date_naive(),
                )
            }
            DataType::Timestamp(unit, _) => {
                let t = match unit {
                    TimeUnit::Second => DateTime::<Utc>::from_timestamp(
                        col.as_primitive::<TimestampSecondType>().value(i),
                        0,
                    ),
                    TimeUnit::Millisecond => DateTime::<Utc>::from_timestamp_millis(
                        col.as_primitive::<TimestampMillisecondType>().value(i),
                    ),
                    TimeUnit::Microsecond => DateTime::<Utc>::from_timestamp_micros(
                        col.as_primitive::<TimestampMicrosecondType>().value(i),
                    ),
                    TimeUnit::Nanosecond => Some(DateTime::<Utc>::from_timestamp_nanos(
                        col.as_primitive::<TimestampNanosecondType>().value(i),
                    )),
                };
                Cell::Timestamp(t.ok_or_else(unsupported)?)
            }
            DataType::Dictionary(_, _) => match dict_str(col, i) {
                Some(r) => r?,
                None => return Err(unsupported()),
            },
            _ => return Err(unsupported()),
        })
    }
}

fn str_cell(s: &str) -> Result<Cell<'_>, CellError> {
    if s.is_empty() {
        Ok(Cell::Null)
    } else if s.contains('\0') {
        Err(CellError::Nul)
    } else {
        Ok(Cell::Str(s))
    }
}

/// Rows of one Parquet part.
pub struct ParquetSource {
    reader: ParquetRecordBatchReader,
    source: String,
    header: Vec<String>,
    cells: BatchCells,
    row: u64,
    max_row: usize,
}

impl ParquetSource {
    /// Opens a part (a spilled temp file): reads its schema and checks every page header
    /// (see [`super::parquet_pages`]) before anything is decoded.
    pub fn open(file: File, source: &str, max_row: usize) -> Result<Self, ReadError> {
        let err = |m: String| ReadError::Parquet {
            source_name: source.to_string(),
            message: m,
        };
        let mut scan = file
            .try_clone()
            .map_err(|e| ReadError::io(source, "reopening the Parquet part", e))?;
        let builder = contained(source, || ParquetRecordBatchReaderBuilder::try_new(file))?
            .map_err(|e| err(format!("cannot open the part: {e}")))?;
        let dictionary_row =
            super::parquet_pages::check_pages(&mut scan, builder.metadata(), max_row)
                .map_err(|m| err(format!("refused before decoding: {m}")))?;
        let header = builder
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        // Rows within `max_row_bytes` fit a batch, and so do rows that each take the largest
        // value of every column's dictionary (decoding copies them into each row).
        let widest = (max_row as u64).max(dictionary_row).max(1);
        let rows = usize::try_from(MAX_BATCH_BYTES as u64 / widest)
            .unwrap_or(BATCH_ROWS)
            .clamp(1, BATCH_ROWS);
        let reader = contained(source, || builder.with_batch_size(rows).build())?
            .map_err(|e| err(format!("cannot read the part: {e}")))?;
        Ok(Self {
            reader,
            source: source.to_string(),
            header,
            cells: BatchCells {
                batch: None,
                idx: 0,
            },
            row: 0,
            max_row,
        })
    }
}

impl RowSource for ParquetSource {
    fn source(&self) -> &str {
        &self.source
    }

    fn header(&self) -> &[String] {
        &self.header
    }

    fn next_row(&mut self) -> Result<Option<RowItem<'_>>, ReadError> {
        loop {
            let have = self
                .cells
                .batch
                .as_ref()
                .is_some_and(|b| self.cells.idx + 1 < b.num_rows());
            if have {
                self.cells.idx += 1;
                break;
            }
            let next = {
                let reader = &mut self.reader;
                contained(&self.source, || reader.next())
            };
            let next = match next {
                Ok(n) => n,
                Err(e) => {
                    self.cells.batch = None;
                    return Err(e);
                }
            };
            match next {
                None => {
                    self.cells.batch = None;
                    return Ok(None);
                }
                Some(Err(e)) => {
                    return Err(ReadError::Parquet {
                        source_name: self.source.clone(),
                        message: format!("after row {}: {e}", self.row),
                    });
                }
                Some(Ok(b)) => {
                    if b.get_array_memory_size() > MAX_BATCH_BYTES {
                        return Err(ReadError::LimitExceeded {
                            source_name: self.source.clone(),
                            limit: "Parquet batch bytes",
                            bytes: MAX_BATCH_BYTES as u64,
                            at: Some(self.row + 1),
                        });
                    }
                    let empty = b.num_rows() == 0;
                    self.cells.batch = Some(b);
                    self.cells.idx = 0;
                    if !empty {
                        break;
                    }
                }
            }
        }
        self.row += 1;
        if let Some(b) = &self.cells.batch
            && row_bytes(b, self.cells.idx) > self.max_row
        {
            return Err(ReadError::LimitExceeded {
                source_name: self.source.clone(),
                limit: "max_row_bytes",
                bytes: self.max_row as u64,
                at: Some(self.row),
            });
        }
        Ok(Some(RowItem::Row(Row {
            row: self.row,
            line: None,
            cells: &self.cells,
        })))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panic_in_the_decoder_becomes_a_permanent_error_for_the_file() {
        let r: Result<(), ReadError> = contained("s3://b/x.parquet", || {
            panic!("attempt to shift left with overflow")
        });
        match r {
            Err(ReadError::DecoderPanic {
                source_name,
                message,
                ..
            }) => {
                assert_eq!(source_name, "s3://b/x.parquet");
                assert!(message.contains("shift left"));
            }
            other => panic!("{other:?}"),
        }
        let e = crate::diff::export::SyncError::Read(ReadError::DecoderPanic {
            source_name: "s".into(),
            decoder: "Parquet",
            message: "m".into(),
        });
        assert!(!e.is_retryable());
    }
}
