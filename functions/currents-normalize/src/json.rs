//! Avro datums (as `arrow-avro` decodes them into Arrow arrays) as JSON text: what arrays, maps, records, and fields the registry does not know
//! become in the tables. Unions are unwrapped to their value (no `{"string": ...}` wrapper),
//! bytes become strings of code points U+0000..U+00FF (Avro's JSON convention), and
//! non-finite floats become `null`.

use std::fmt::Write as _;

use arrow_array::cast::AsArray;
use arrow_array::types::{Float32Type, Float64Type, Int32Type, Int64Type};
use arrow_array::{Array, UnionArray};
use arrow_schema::{DataType, Field};
use std::sync::Arc;

use crate::datum::DatumError;

const MAX_DEPTH: usize = 64;

/// Appends `s` as a JSON string literal.
pub fn push_str(out: &mut String, s: &str) {
    out.push('"');
    let bytes = s.as_bytes();
    let mut start = 0;
    for (i, &b) in bytes.iter().enumerate() {
        let esc: Option<&str> = match b {
            b'"' => Some("\\\""),
            b'\\' => Some("\\\\"),
            b'\n' => Some("\\n"),
            b'\r' => Some("\\r"),
            b'\t' => Some("\\t"),
            0..=0x1f => None,
            _ => continue,
        };
        out.push_str(&s[start..i]);
        match esc {
            Some(e) => out.push_str(e),
            None => {
                let _ = write!(out, "\\u{:04x}", b);
            }
        }
        start = i + 1;
    }
    out.push_str(&s[start..]);
    out.push('"');
}

/// Appends a float as JSON (`null` when not finite).
pub fn push_f64(out: &mut String, v: f64) {
    if v.is_finite() {
        let _ = write!(out, "{v}");
    } else {
        out.push_str("null");
    }
}

/// Appends a `float` as JSON (`null` when not finite).
pub fn push_f32(out: &mut String, v: f32) {
    if v.is_finite() {
        let _ = write!(out, "{v}");
    } else {
        out.push_str("null");
    }
}

/// Appends `bytes`/`fixed` as a JSON string of one character per byte (Latin-1).
pub fn push_latin1(out: &mut String, bytes: &[u8]) {
    let s: String = bytes.iter().map(|&b| char::from(b)).collect();
    push_str(out, &s);
}

/// What rendering may still use: array items and map entries (which, being `null`, can cost
/// no input bytes at all), and bytes of JSON text. Each value rendered is charged to it; a
/// value that would go over stops with the budget's error, before the text grows further.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    /// Items left.
    pub items_left: u64,
    /// The error when they run out.
    pub items_error: DatumError,
    /// JSON bytes left.
    pub bytes_left: u64,
    /// The error when they run out.
    pub bytes_error: DatumError,
    base: usize,
}

impl Budget {
    /// A budget of `items` items and `bytes` bytes, failing with the given errors.
    pub fn new(items: u64, items_error: DatumError, bytes: u64, bytes_error: DatumError) -> Self {
        Self {
            items_left: items,
            items_error,
            bytes_left: bytes,
            bytes_error,
            base: 0,
        }
    }

    /// No limit (tests, tools).
    pub fn unlimited() -> Self {
        Self::new(
            u64::MAX,
            DatumError::Mismatch,
            u64::MAX,
            DatumError::Mismatch,
        )
    }

    #[inline]
    fn item(&mut self) -> Result<(), DatumError> {
        self.items_left = self.items_left.checked_sub(1).ok_or(self.items_error)?;
        Ok(())
    }

    /// Fails when the text rendered so far, plus `more` bytes about to be added, goes over.
    #[inline]
    fn room(&self, out: &str, more: usize) -> Result<(), DatumError> {
        let used = out.len().saturating_sub(self.base) as u64;
        if used.saturating_add(more as u64) > self.bytes_left {
            return Err(self.bytes_error);
        }
        Ok(())
    }
}

/// Appends row `row` of `array` (a value `arrow-avro` decoded) as JSON and charges it to
/// `budget`: array items and map entries, and the text's bytes.
pub fn write_value(
    array: &dyn Array,
    row: usize,
    out: &mut String,
    budget: &mut Budget,
) -> Result<(), DatumError> {
    budget.base = out.len();
    write_depth(array, row, out, 0, budget)?;
    budget.room(out, 0)?;
    let used = out.len().saturating_sub(budget.base) as u64;
    budget.bytes_left = budget.bytes_left.saturating_sub(used);
    Ok(())
}

/// True when row `row` of `array` (through unions) is null, so it has no JSON of its own.
pub fn is_null_value(array: &dyn Array, row: usize) -> bool {
    if matches!(array.data_type(), DataType::Null) || array.is_null(row) {
        return true;
    }
    if let Some(u) = array.as_any().downcast_ref::<UnionArray>() {
        let child = u.child(u.type_id(row));
        return is_null_value(child.as_ref(), u.value_offset(row));
    }
    false
}

/// The value at `row` through any unions: the array holding it and its row there.
pub fn resolve_union(array: &dyn Array, row: usize) -> (&dyn Array, usize) {
    let (mut a, mut r) = (array, row);
    for _ in 0..MAX_DEPTH {
        match a.as_any().downcast_ref::<UnionArray>() {
            Some(u) => {
                let id = u.type_id(r);
                r = u.value_offset(r);
                a = u.child(id).as_ref();
            }
            None => break,
        }
    }
    (a, r)
}

/// True for the empty records that stand for `null` items and values in the schema
/// `arrow-avro` decodes with ([`crate::schema::NULL_ITEM`]).
fn stands_for_null(field: &Arc<Field>) -> bool {
    matches!(field.data_type(), DataType::Struct(f) if f.is_empty())
        && field
            .metadata()
            .get("avro.name")
            .is_some_and(|n| n.contains(crate::schema::NULL_ITEM))
}

fn write_depth(
    a: &dyn Array,
    i: usize,
    out: &mut String,
    depth: usize,
    budget: &mut Budget,
) -> Result<(), DatumError> {
    if depth > MAX_DEPTH {
        return Err(DatumError::TooDeep);
    }
    if matches!(a.data_type(), DataType::Null) || a.is_null(i) {
        out.push_str("null");
        return Ok(());
    }
    match a.data_type() {
        DataType::Boolean => out.push_str(if a.as_boolean().value(i) {
            "true"
        } else {
            "false"
        }),
        DataType::Int32 => {
            let _ = write!(out, "{}", a.as_primitive::<Int32Type>().value(i));
        }
        DataType::Int64 => {
            let _ = write!(out, "{}", a.as_primitive::<Int64Type>().value(i));
        }
        DataType::Float32 => push_f32(out, a.as_primitive::<Float32Type>().value(i)),
        DataType::Float64 => push_f64(out, a.as_primitive::<Float64Type>().value(i)),
        DataType::Binary => {
            let b = a.as_binary::<i32>().value(i);
            budget.room(out, b.len())?;
            push_latin1(out, b)
        }
        DataType::FixedSizeBinary(_) => {
            let b = a.as_fixed_size_binary().value(i);
            budget.room(out, b.len())?;
            push_latin1(out, b)
        }
        DataType::Utf8 => {
            let s = a.as_string::<i32>().value(i);
            budget.room(out, s.len())?;
            push_str(out, s)
        }
        DataType::Dictionary(_, _) => write_symbol(a, i, out)?,
        DataType::Union(_, _) => {
            let (v, r) = resolve_union(a, i);
            write_depth(v, r, out, depth + 1, budget)?;
        }
        DataType::List(item) => write_list(a, i, stands_for_null(item), out, depth, budget)?,
        DataType::Map(_, _) => write_map(a, i, out, depth, budget)?,
        DataType::Struct(fields) => {
            let s = a.as_struct();
            out.push('{');
            for (n, (field, column)) in fields.iter().zip(s.columns()).enumerate() {
                if n > 0 {
                    out.push(',');
                }
                push_str(out, field.name());
                out.push(':');
                budget.room(out, field.name().len() + 3)?;
                write_depth(column.as_ref(), i, out, depth + 1, budget)?;
            }
            out.push('}');
        }
        _ => {
            return Err(DatumError::Unsupported(
                "an Arrow type without a JSON rendering",
            ));
        }
    }
    Ok(())
}

/// An enum symbol: an int32-keyed dictionary of strings.
fn write_symbol(a: &dyn Array, i: usize, out: &mut String) -> Result<(), DatumError> {
    let d = a
        .as_dictionary_opt::<Int32Type>()
        .ok_or(DatumError::Unsupported("a dictionary not keyed by int32"))?;
    let k = d.keys().value(i);
    let symbols = d
        .values()
        .as_string_opt::<i32>()
        .ok_or(DatumError::Unsupported("a dictionary of non-strings"))?;
    let s = usize::try_from(k)
        .ok()
        .filter(|k| *k < symbols.len())
        .map(|k| symbols.value(k))
        .ok_or(DatumError::BadIndex(i64::from(k)))?;
    push_str(out, s);
    Ok(())
}

/// An array's items at row `i`; `nulls`: the items are of the empty record that stands for
/// `null`.
fn write_list(
    a: &dyn Array,
    i: usize,
    nulls: bool,
    out: &mut String,
    depth: usize,
    budget: &mut Budget,
) -> Result<(), DatumError> {
    let list = a.as_list::<i32>();
    let offsets = list.value_offsets();
    let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
    let items = list.values();
    out.push('[');
    for j in start..end {
        budget.item()?;
        budget.room(out, 1)?;
        if j > start {
            out.push(',');
        }
        if nulls {
            out.push_str("null");
            continue;
        }
        write_depth(items.as_ref(), j, out, depth + 1, budget)?;
    }
    out.push(']');
    Ok(())
}

/// A map's entries at row `i`, keys as JSON object keys.
fn write_map(
    a: &dyn Array,
    i: usize,
    out: &mut String,
    depth: usize,
    budget: &mut Budget,
) -> Result<(), DatumError> {
    let map = a.as_map();
    let offsets = map.value_offsets();
    let (start, end) = (offsets[i] as usize, offsets[i + 1] as usize);
    let keys = map
        .keys()
        .as_string_opt::<i32>()
        .ok_or(DatumError::Unsupported("a map with non-string keys"))?;
    let values = map.values();
    let nulls = map.entries().fields().get(1).is_some_and(stands_for_null);
    out.push('{');
    for j in start..end {
        budget.item()?;
        let k = keys.value(j);
        budget.room(out, k.len() + 2)?;
        if j > start {
            out.push(',');
        }
        push_str(out, k);
        out.push(':');
        if nulls {
            out.push_str("null");
            continue;
        }
        write_depth(values.as_ref(), j, out, depth + 1, budget)?;
    }
    out.push('}');
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use apache_avro::Schema;
    use apache_avro::types::Value as AvroValue;
    use apache_avro::writer::datum::GenericDatumWriter;

    /// Decodes `bytes`, one datum of `schema_json`, with `arrow-avro` (as a record's only
    /// field, which encodes the same) and returns the Arrow array holding it.
    fn decode(schema_json: &str, bytes: &[u8]) -> arrow_array::ArrayRef {
        let record = format!(
            r#"{{"type":"record","name":"W","fields":[{{"name":"v","type":{schema_json}}}]}}"#
        );
        let schema = crate::schema::WriterSchema::parse(&record).unwrap();
        let mut d = crate::normalize::datum_decoder(&schema, 1).unwrap();
        assert_eq!(d.decode(bytes).unwrap(), bytes.len());
        d.flush().unwrap().unwrap().column(0).clone()
    }

    fn render(schema_json: &str, value: AvroValue) -> String {
        let avro = Schema::parse_str(schema_json).unwrap();
        let bytes = GenericDatumWriter::builder(&avro)
            .build()
            .unwrap()
            .write_value_to_vec(value)
            .unwrap();
        let array = decode(schema_json, &bytes);
        let mut out = String::new();
        write_value(array.as_ref(), 0, &mut out, &mut Budget::unlimited()).unwrap();
        out
    }

    /// A list of one row holding `n` nulls.
    fn null_list(n: usize) -> arrow_array::ArrayRef {
        use arrow_array::builder::{ListBuilder, NullBuilder};
        let mut b = ListBuilder::new(NullBuilder::new());
        b.values().append_nulls(n);
        b.append(true);
        std::sync::Arc::new(b.finish())
    }

    #[test]
    fn null_items_are_bounded_by_the_item_budget_not_the_input() {
        // An array of 2,000,000 nulls (as `arrow-avro` would hold one: a few bytes).
        let array = null_list(2_000_000);
        let items_err = DatumError::OverLimit {
            what: "array/map items in one record",
            limit: 1000,
        };
        let bytes_err = DatumError::OverLimit {
            what: "rendered JSON bytes of one record",
            limit: 1 << 30,
        };
        let mut budget = Budget::new(1000, items_err, 1 << 30, bytes_err);
        let mut out = String::new();
        let err = write_value(array.as_ref(), 0, &mut out, &mut budget).unwrap_err();
        assert_eq!(err, items_err);
        assert!(out.len() < 6_000, "stopped at the limit: {}", out.len());
        // The byte budget stops it too, before the text grows past it.
        let mut budget = Budget::new(u64::MAX, items_err, 4096, bytes_err);
        let mut out = String::new();
        let err = write_value(array.as_ref(), 0, &mut out, &mut budget).unwrap_err();
        assert_eq!(err, bytes_err);
        assert!(out.len() <= 4096 + 8, "{}", out.len());
    }

    #[test]
    fn a_budget_is_charged_across_values() {
        let array = null_list(10);
        let err = DatumError::OverLimit {
            what: "array/map items in the file",
            limit: 25,
        };
        let mut budget = Budget::new(25, err, u64::MAX, err);
        for round in 0..3 {
            let mut out = String::new();
            let r = write_value(array.as_ref(), 0, &mut out, &mut budget);
            if round < 2 {
                assert_eq!(out, "[null,null,null,null,null,null,null,null,null,null]");
            } else {
                assert_eq!(r, Err(err));
            }
        }
    }

    #[test]
    fn null_items_and_map_values_render_as_null() {
        let out = render(
            r#"{"type":"array","items":"null"}"#,
            AvroValue::Array(vec![AvroValue::Null, AvroValue::Null]),
        );
        assert_eq!(out, "[null,null]");
        let out = render(
            r#"{"type":"map","values":"null"}"#,
            AvroValue::Map([("k".to_string(), AvroValue::Null)].into()),
        );
        assert_eq!(out, r#"{"k":null}"#);
        let out = render(
            r#"{"type":"array","items":{"type":"array","items":"null"}}"#,
            AvroValue::Array(vec![
                AvroValue::Array(vec![AvroValue::Null]),
                AvroValue::Array(vec![]),
            ]),
        );
        assert_eq!(out, "[[null],[]]");
    }

    #[test]
    fn strings_are_escaped() {
        let mut s = String::new();
        push_str(&mut s, "a\"b\\c\nd\u{1}é");
        assert_eq!(s, r#""a\"b\\c\nd\u0001é""#);
    }

    #[test]
    fn arrays_of_nullable_strings_unwrap_their_unions() {
        let out = render(
            r#"{"type":"array","items":["null","string"]}"#,
            AvroValue::Array(vec![
                AvroValue::Union(1, Box::new(AvroValue::String("x".into()))),
                AvroValue::Union(0, Box::new(AvroValue::Null)),
            ]),
        );
        assert_eq!(out, r#"["x",null]"#);
    }

    #[test]
    fn records_and_maps_become_objects() {
        let out = render(
            r#"{"type":"record","name":"R","fields":[{"name":"m","type":{"type":"map","values":"long"}},{"name":"f","type":"float"}]}"#,
            AvroValue::Record(vec![
                (
                    "m".into(),
                    AvroValue::Map([("k".to_string(), AvroValue::Long(-3))].into()),
                ),
                ("f".into(), AvroValue::Float(1.5)),
            ]),
        );
        assert_eq!(out, r#"{"m":{"k":-3},"f":1.5}"#);
        let parsed: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(parsed["m"]["k"], -3);
    }
}
