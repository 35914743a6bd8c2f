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

/// Rows per Arrow batch.
pub const BATCH_ROWS: usize = 4096;

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
                        Ok(if v.is_empty() {
                            Cell::Null
                        } else {
                            Cell::Str(v)
                        })
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
            DataType::Utf8 => str_cell(col.as_string::<i32>().value(i)),
            DataType::LargeUtf8 => str_cell(col.as_string::<i64>().value(i)),
            DataType::Utf8View => str_cell(col.as_string_view().value(i)),
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

fn str_cell(s: &str) -> Cell<'_> {
    if s.is_empty() {
        Cell::Null
    } else {
        Cell::Str(s)
    }
}

/// Rows of one Parquet part.
pub struct ParquetSource {
    reader: ParquetRecordBatchReader,
    source: String,
    header: Vec<String>,
    cells: BatchCells,
    row: u64,
}

impl ParquetSource {
    /// Opens a part (a spilled temp file) and reads its schema.
    pub fn open(file: File, source: &str) -> Result<Self, ReadError> {
        let err = |m: String| ReadError::Parquet {
            source_name: source.to_string(),
            message: m,
        };
        let builder = ParquetRecordBatchReaderBuilder::try_new(file)
            .map_err(|e| err(format!("cannot open the part: {e}")))?;
        let header = builder
            .schema()
            .fields()
            .iter()
            .map(|f| f.name().clone())
            .collect();
        let reader = builder
            .with_batch_size(BATCH_ROWS)
            .build()
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
            match self.reader.next() {
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
        Ok(Some(RowItem::Row(Row {
            row: self.row,
            line: None,
            cells: &self.cells,
        })))
    }
}
