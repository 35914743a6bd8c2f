//! Decoded records (Arrow arrays of the writer schema) → one record batch of the table's
//! columns: fields cast to their columns, arrays/maps/records and the row's `extra`/`event`
//! object rendered as JSON within the budget, `event_time`, lineage constants, and records
//! whose `id` was already seen dropped.

use std::sync::Arc;

use arrow_array::builder::{StringBuilder, TimestampMicrosecondBuilder};
use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Int64Type};
use arrow_array::{
    Array, ArrayRef, BooleanArray, Int32Array, Int64Array, RecordBatch, StringArray,
    TimestampMicrosecondArray,
};
use arrow_schema::DataType;

use super::budget::FileBudget;
use super::{NormalizeError, Normalizer};
use crate::datum::DatumError;
use crate::json::{self, Budget};
use crate::registry::{Column, ColumnSource, TableDef};

/// True for values that become JSON text with the size budget (as opposed to a top-level
/// string, number or boolean, which the input's bytes bound).
fn json_kind(dt: &DataType) -> bool {
    matches!(
        dt,
        DataType::List(_)
            | DataType::Map(_, _)
            | DataType::Struct(_)
            | DataType::Binary
            | DataType::FixedSizeBinary(_)
    )
}

/// Appends a top-level scalar (a field's own value, through its union) to the row's JSON
/// object: a `float` as the double it widens to, like its column would hold it.
fn push_scalar(out: &mut String, a: &dyn Array, row: usize) -> Result<(), DatumError> {
    if let Some(f) = a.as_primitive_opt::<Float32Type>() {
        json::push_f64(out, f64::from(f.value(row)));
        return Ok(());
    }
    json::write_value(a, row, out, &mut Budget::unlimited())
}

/// The columns of a batch each row reads: ids (to drop duplicates) and times, cast to the
/// table's types, and whether the table has an `extra`/`event` column.
struct RowKeys<'a> {
    ids: Option<&'a StringArray>,
    times: Option<&'a Int64Array>,
    has_json: bool,
}

/// What a batch's rows built besides the decoded fields.
struct Built<'a> {
    /// The writer field filling each table field, if any.
    filled_by: &'a [Option<usize>],
    /// JSON columns, by writer field.
    json_columns: Vec<(usize, StringBuilder)>,
    /// The `extra`/`event` column.
    row_json: StringBuilder,
    /// `event_time`.
    event_time: TimestampMicrosecondBuilder,
}

impl Normalizer<'_> {
    /// One batch of decoded records (the writer schema's columns) as rows of the table.
    pub(super) fn table_batch(
        &mut self,
        decoded: &RecordBatch,
        file_budget: &mut FileBudget,
    ) -> Result<Option<RecordBatch>, NormalizeError> {
        let plan = self.plan;
        let table = plan.table.clone();
        let n = decoded.num_rows();
        let sink_err = |e: arrow_schema::ArrowError| NormalizeError::Sink(e.to_string());
        let has_json = table
            .columns
            .iter()
            .any(|c| matches!(c.source, ColumnSource::Json));
        // Writer field filling each table field, if any.
        let mut filled_by: Vec<Option<usize>> = vec![None; table.fields.len()];
        for (fi, f) in plan.fields.iter().enumerate() {
            if let Some(s) = f.slot
                && let Some(slot) = filled_by.get_mut(s)
            {
                *slot = Some(fi);
            }
        }
        let column_of = |slot: usize| -> Result<Option<ArrayRef>, NormalizeError> {
            let Some(fi) = filled_by.get(slot).copied().flatten() else {
                return Ok(None);
            };
            let ty = table.fields[slot].ty.data_type();
            arrow_cast::cast(decoded.column(fi), &ty)
                .map(Some)
                .map_err(sink_err)
        };
        let ids = column_of(plan.id_slot)?;
        let times = column_of(plan.time_slot)?;
        let keys = RowKeys {
            ids: ids.as_ref().and_then(|a| a.as_string_opt::<i32>()),
            times: times
                .as_ref()
                .and_then(|a| a.as_primitive_opt::<Int64Type>()),
            has_json,
        };
        let mut built = Built {
            filled_by: &filled_by,
            json_columns: plan
                .fields
                .iter()
                .enumerate()
                .filter(|(_, f)| f.json_column && f.slot.is_some())
                .map(|(fi, _)| (fi, StringBuilder::with_capacity(n, n * 64)))
                .collect(),
            row_json: StringBuilder::with_capacity(n, if has_json { n * 64 } else { 0 }),
            event_time: TimestampMicrosecondBuilder::with_capacity(n),
        };
        let mut keep = Vec::with_capacity(n);
        for r in 0..n {
            keep.push(self.table_row(decoded, r, file_budget, &keys, &mut built)?);
        }
        let arrays = self.columns(decoded, built)?;
        let batch = RecordBatch::try_new(table.schema.clone(), arrays).map_err(sink_err)?;
        if keep.iter().all(|k| *k) {
            return Ok(Some(batch));
        }
        if keep.iter().all(|k| !k) {
            return Ok(None);
        }
        let mask = BooleanArray::from(keep);
        arrow_select::filter::filter_record_batch(&batch, &mask)
            .map(Some)
            .map_err(sink_err)
    }

    /// Builds row `r` of a batch: its JSON (checked against the record limit), its
    /// `event_time`, and whether it is kept (`false`: its `id` was already seen).
    fn table_row(
        &mut self,
        decoded: &RecordBatch,
        r: usize,
        file_budget: &mut FileBudget,
        keys: &RowKeys<'_>,
        built: &mut Built<'_>,
    ) -> Result<bool, NormalizeError> {
        let generic = self.plan.table.generic;
        let limits = file_budget.limits;
        let record = self.batch_first_record + r as u64;
        let block = self.row_blocks.get(r).copied().unwrap_or_default();
        let start_budget = file_budget.record();
        let mut budget = start_budget;
        self.row_json.clear();
        let json_fields = self.render_row(
            decoded,
            r,
            (block, record),
            &mut budget,
            &mut built.json_columns,
        )?;
        file_budget.charge(&start_budget, &budget);
        if self.row_json.len() as u64 > limits.max_record_json_bytes {
            return Err(NormalizeError::Datum {
                block,
                record,
                field: if generic { "event" } else { "extra" }.to_string(),
                error: DatumError::OverLimit {
                    what: "rendered JSON bytes of one record",
                    limit: limits.max_record_json_bytes,
                },
            });
        }
        if keys.has_json {
            if json_fields > 0 {
                self.row_json.push('}');
                built.row_json.append_value(&self.row_json);
            } else if generic {
                built.row_json.append_value("{}");
            } else {
                built.row_json.append_null();
            }
        }
        match keys.times {
            Some(t) if !t.is_null(r) => {
                let time = t.value(r);
                let micros = time
                    .checked_mul(1_000_000)
                    .ok_or(NormalizeError::TimeOutOfRange { record, time })?;
                built.event_time.append_value(micros);
            }
            _ => built.event_time.append_null(),
        }
        let duplicate = match keys.ids {
            Some(ids) if !ids.is_null(r) => !self
                .seen_ids
                .insert(xxhash_rust::xxh3::xxh3_128(ids.value(r).as_bytes())),
            _ => false,
        };
        if duplicate {
            self.stats.duplicates_dropped += 1;
        } else {
            self.stats.rows_out += 1;
        }
        Ok(!duplicate)
    }

    /// Renders row `r`'s JSON: its JSON columns (appended to `json_columns`) and its
    /// `extra`/`event` object (left in `self.row_json`, unclosed). Returns the fields written
    /// into that object.
    fn render_row(
        &mut self,
        decoded: &RecordBatch,
        r: usize,
        (block, record): (usize, u64),
        budget: &mut Budget,
        json_columns: &mut [(usize, StringBuilder)],
    ) -> Result<usize, NormalizeError> {
        let plan = self.plan;
        let mut json_fields = 0usize;
        let mut next_json_column = 0usize;
        for (fi, fp) in plan.fields.iter().enumerate() {
            let in_column = fp.json_column && fp.slot.is_some();
            if !in_column && !fp.to_json {
                continue;
            }
            let err = |error| NormalizeError::Datum {
                block,
                record,
                field: fp.name.clone(),
                error,
            };
            let col = decoded.column(fi).as_ref();
            let null = json::is_null_value(col, r);
            let (value, at) = json::resolve_union(col, r);
            let budgeted = !null && (fp.rendered || json_kind(value.data_type()));
            if budgeted {
                self.json_buf.clear();
                match value.as_string_opt::<i32>() {
                    // Rendered already, and charged to the record's budget then.
                    Some(text) if fp.rendered => {
                        let text = text.value(at);
                        budget.bytes_left = budget.bytes_left.saturating_sub(text.len() as u64);
                        self.json_buf.push_str(text);
                    }
                    _ => json::write_value(col, r, &mut self.json_buf, budget).map_err(err)?,
                }
            }
            if in_column {
                if let Some((_, b)) = json_columns.get_mut(next_json_column) {
                    if null {
                        b.append_null();
                    } else if budgeted {
                        b.append_value(&self.json_buf);
                    } else {
                        return Err(err(DatumError::Mismatch));
                    }
                }
                next_json_column += 1;
            }
            if fp.to_json {
                self.row_json.push(if json_fields == 0 { '{' } else { ',' });
                self.row_json.push_str(&fp.json_key);
                if null {
                    self.row_json.push_str("null");
                } else if budgeted {
                    self.row_json.push_str(&self.json_buf);
                } else {
                    push_scalar(&mut self.row_json, value, at).map_err(err)?;
                }
                json_fields += 1;
            }
        }
        Ok(json_fields)
    }

    /// The table's columns of a batch, from the decoded fields and what was built per row.
    fn columns(
        &mut self,
        decoded: &RecordBatch,
        built: Built<'_>,
    ) -> Result<Vec<ArrayRef>, NormalizeError> {
        let Built {
            filled_by,
            mut json_columns,
            row_json: mut row_json_column,
            mut event_time,
        } = built;
        let plan = self.plan;
        let table = &plan.table;
        let n = decoded.num_rows();
        let sink_err = |e: arrow_schema::ArrowError| NormalizeError::Sink(e.to_string());
        let mut arrays: Vec<ArrayRef> = Vec::with_capacity(table.columns.len());
        for (ci, col) in table.columns.iter().enumerate() {
            let array: ArrayRef = match col.source {
                ColumnSource::Field(slot) => match filled_by.get(slot).copied().flatten() {
                    None => arrow_array::new_null_array(&col.data_type, n),
                    Some(fi) if plan.fields[fi].json_column => {
                        match json_columns.iter_mut().find(|(f, _)| *f == fi) {
                            Some((_, b)) => Arc::new(b.finish()),
                            None => arrow_array::new_null_array(&col.data_type, n),
                        }
                    }
                    Some(fi) => {
                        arrow_cast::cast(decoded.column(fi), &col.data_type).map_err(sink_err)?
                    }
                },
                ColumnSource::EventTime => Arc::new(event_time.finish().with_timezone("UTC")),
                ColumnSource::Json => Arc::new(row_json_column.finish()),
                _ => self.constant(ci, table, col, n)?,
            };
            arrays.push(array);
        }
        Ok(arrays)
    }

    /// Column `ci` (a lineage column: the same value on every row) of a batch of `n` rows,
    /// built once per file at the largest batch's length and sliced for shorter ones.
    fn constant(
        &mut self,
        ci: usize,
        table: &TableDef,
        col: &Column,
        n: usize,
    ) -> Result<ArrayRef, NormalizeError> {
        if let Some(Some(a)) = self.constants.get(ci)
            && a.len() >= n
        {
            return Ok(a.slice(0, n));
        }
        let a = self.build_constant(table, col, n)?;
        if self.constants.len() <= ci {
            self.constants.resize(ci + 1, None);
        }
        self.constants[ci] = Some(a.clone());
        Ok(a)
    }

    fn build_constant(
        &self,
        table: &TableDef,
        col: &Column,
        n: usize,
    ) -> Result<ArrayRef, NormalizeError> {
        let ctx = &self.ctx;
        Ok(match col.source {
            ColumnSource::SourceKey => Arc::new(StringArray::from_iter_values(
                std::iter::repeat_n(ctx.source_key.as_str(), n),
            )),
            ColumnSource::EventType => Arc::new(StringArray::from_iter_values(
                std::iter::repeat_n(ctx.event_type.as_str(), n),
            )),
            ColumnSource::DeliveryHour => Arc::new(
                TimestampMicrosecondArray::from(vec![ctx.delivery_hour_micros; n])
                    .with_timezone("UTC"),
            ),
            ColumnSource::SchemaId => Arc::new(Int64Array::from(vec![ctx.schema_id; n])),
            ColumnSource::SchemaVersion => Arc::new(Int64Array::from(vec![ctx.schema_version; n])),
            ColumnSource::RegistryVersion => {
                Arc::new(Int32Array::from(vec![table.version as i32; n]))
            }
            ColumnSource::Field(_) | ColumnSource::EventTime | ColumnSource::Json => {
                return Err(NormalizeError::Sink(format!(
                    "column {} has no builder",
                    col.name
                )));
            }
        })
    }
}
