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

/// Decodes one datum of type `node` and appends it as JSON.
pub fn write_value(
    schema: &WriterSchema,
    node: NodeId,
    c: &mut Cursor<'_>,
    out: &mut String,
) -> Result<(), DatumError> {
    write_depth(schema, node, c, out, 0)
}

fn write_depth(
    schema: &WriterSchema,
    node: NodeId,
    c: &mut Cursor<'_>,
    out: &mut String,
    depth: usize,
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
        Node::Bytes => push_latin1(out, c.read_bytes()?),
        Node::String => push_str(out, c.read_str()?),
        Node::Fixed { size, .. } => push_latin1(out, c.take(*size)?),
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
            write_depth(schema, *b, c, out, depth + 1)?;
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
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    write_depth(schema, *item, c, out, depth + 1)?;
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
                    if !first {
                        out.push(',');
                    }
                    first = false;
                    push_str(out, c.read_str()?);
                    out.push(':');
                    write_depth(schema, *value, c, out, depth + 1)?;
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
                write_depth(schema, *f, c, out, depth + 1)?;
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
        write_value(&ours, ours.root(), &mut c, &mut out).unwrap();
        assert_eq!(c.remaining(), 0);
        out
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
