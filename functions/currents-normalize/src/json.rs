//! Avro datums as JSON text: what arrays, maps, records, and fields the registry does not know
//! become in the tables. Unions are unwrapped to their value (no `{"string": ...}` wrapper),
//! bytes become strings of code points U+0000..U+00FF (Avro's JSON convention), and
//! non-finite floats become `null`.

use std::fmt::Write as _;

use crate::decode::{Cursor, DatumError};
use crate::schema::{Node, NodeId, WriterSchema};

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

fn push_f32(out: &mut String, v: f32) {
    if v.is_finite() {
        let _ = write!(out, "{v}");
    } else {
        out.push_str("null");
    }
}

fn push_latin1(out: &mut String, bytes: &[u8]) {
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

/// Decodes one datum of type `node`, appends it as JSON and charges it to `budget`.
pub fn write_value(
    schema: &WriterSchema,
    node: NodeId,
    c: &mut Cursor<'_>,
    out: &mut String,
    budget: &mut Budget,
) -> Result<(), DatumError> {
    budget.base = out.len();
    write_depth(schema, node, c, out, 0, budget)?;
    budget.room(out, 0)?;
    let used = out.len().saturating_sub(budget.base) as u64;
    budget.bytes_left = budget.bytes_left.saturating_sub(used);
    Ok(())
}

fn write_depth(
    schema: &WriterSchema,
    node: NodeId,
    c: &mut Cursor<'_>,
    out: &mut String,
    depth: usize,
    budget: &mut Budget,
) -> Result<(), DatumError> {
    if depth > MAX_DEPTH {
        return Err(DatumError::TooDeep);
    }
    match schema.node(node) {
        Node::Null => out.push_str("null"),
        Node::Boolean => out.push_str(if c.read_bool()? { "true" } else { "false" }),
        Node::Int | Node::Long => {
            let _ = write!(out, "{}", c.read_long()?);
        }
        Node::Float => push_f32(out, c.read_f32()?),
        Node::Double => push_f64(out, c.read_f64()?),
        Node::Bytes => {
            let b = c.read_bytes()?;
            budget.room(out, b.len())?;
            push_latin1(out, b)
        }
        Node::String => {
            let s = c.read_str()?;
            budget.room(out, s.len())?;
            push_str(out, s)
        }
        Node::Fixed { size, .. } => {
            let b = c.take(*size)?;
            budget.room(out, b.len())?;
            push_latin1(out, b)
        }
        Node::Enum { symbols, .. } => {
            let i = c.read_long()?;
            let s = usize::try_from(i)
                .ok()
                .and_then(|i| symbols.get(i))
                .ok_or(DatumError::BadIndex(i))?;
            push_str(out, s);
        }
        Node::Union(branches) => {
            let i = c.read_long()?;
            let b = usize::try_from(i)
                .ok()
                .and_then(|i| branches.get(i))
                .ok_or(DatumError::BadIndex(i))?;
            write_depth(schema, *b, c, out, depth + 1, budget)?;
        }
        Node::Array(item) => {
            out.push('[');
            let mut first = true;
            loop {
                let n = c.read_block_count()?;
                if n == 0 {
                    break;
                }
                for _ in 0..n {
                    budget.item()?;
                    budget.room(out, 1)?;
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    write_depth(schema, *item, c, out, depth + 1, budget)?;
                }
            }
            out.push(']');
        }
        Node::Map(value) => {
            out.push('{');
            let mut first = true;
            loop {
                let n = c.read_block_count()?;
                if n == 0 {
                    break;
                }
                for _ in 0..n {
                    budget.item()?;
                    let k = c.read_str()?;
                    budget.room(out, k.len() + 2)?;
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    push_str(out, k);
                    out.push(':');
                    write_depth(schema, *value, c, out, depth + 1, budget)?;
                }
            }
            out.push('}');
        }
        Node::Record { fields, .. } => {
            out.push('{');
            for (i, (name, f)) in fields.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                push_str(out, name);
                out.push(':');
                budget.room(out, name.len() + 3)?;
                write_depth(schema, *f, c, out, depth + 1, budget)?;
            }
            out.push('}');
        }
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use apache_avro::Schema;
    use apache_avro::types::Value as AvroValue;
    use apache_avro::writer::datum::GenericDatumWriter;

    fn render(schema_json: &str, value: AvroValue) -> String {
        let avro = Schema::parse_str(schema_json).unwrap();
        let bytes = GenericDatumWriter::builder(&avro)
            .build()
            .unwrap()
            .write_value_to_vec(value)
            .unwrap();
        let ours = WriterSchema::parse(schema_json).unwrap();
        let mut c = Cursor::new(&bytes);
        let mut out = String::new();
        write_value(
            &ours,
            ours.root(),
            &mut c,
            &mut out,
            &mut Budget::unlimited(),
        )
        .unwrap();
        assert_eq!(c.remaining(), 0);
        out
    }

    /// An array of `n` nulls written as `blocks` blocks of `n / blocks` items: one byte of
    /// input per block whatever `n` is.
    fn null_array(n: u64, blocks: u64) -> Vec<u8> {
        let mut bytes = Vec::new();
        let per = n / blocks;
        for _ in 0..blocks {
            let mut z = per << 1; // zig-zag of a positive count
            loop {
                let b = (z & 0x7f) as u8;
                z >>= 7;
                if z == 0 {
                    bytes.push(b);
                    break;
                }
                bytes.push(b | 0x80);
            }
        }
        bytes.push(0);
        bytes
    }

    #[test]
    fn null_items_are_bounded_by_the_item_budget_not_the_input() {
        let schema = WriterSchema::parse(r#"{"type":"array","items":"null"}"#).unwrap();
        // 2,000 bytes of input claim 2,000,000 null items (1,000 per block).
        let bytes = null_array(2_000_000, 2_000);
        assert!(bytes.len() < 4_100, "{}", bytes.len());
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
        let err = write_value(
            &schema,
            schema.root(),
            &mut Cursor::new(&bytes),
            &mut out,
            &mut budget,
        )
        .unwrap_err();
        assert_eq!(err, items_err);
        assert!(out.len() < 6_000, "stopped at the limit: {}", out.len());
        // The byte budget stops it too, before the text grows past it.
        let mut budget = Budget::new(u64::MAX, items_err, 4096, bytes_err);
        let mut out = String::new();
        let err = write_value(
            &schema,
            schema.root(),
            &mut Cursor::new(&bytes),
            &mut out,
            &mut budget,
        )
        .unwrap_err();
        assert_eq!(err, bytes_err);
        assert!(out.len() <= 4096 + 8, "{}", out.len());
    }

    #[test]
    fn a_budget_is_charged_across_values() {
        let schema = WriterSchema::parse(r#"{"type":"array","items":"null"}"#).unwrap();
        let bytes = null_array(10, 1);
        let err = DatumError::OverLimit {
            what: "array/map items in the file",
            limit: 25,
        };
        let mut budget = Budget::new(25, err, u64::MAX, err);
        for round in 0..3 {
            let mut out = String::new();
            let r = write_value(
                &schema,
                schema.root(),
                &mut Cursor::new(&bytes),
                &mut out,
                &mut budget,
            );
            if round < 2 {
                assert_eq!(out, "[null,null,null,null,null,null,null,null,null,null]");
            } else {
                assert_eq!(r, Err(err));
            }
        }
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
