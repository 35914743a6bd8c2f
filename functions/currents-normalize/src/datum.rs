//! One Avro datum's bytes: the cursor that reads its varints, lengths and strings within the
//! bytes that are there, what can go wrong reading it ([`DatumError`]), and [`check`], our
//! own walk over a record by its writer schema that names the fault and the field where
//! `arrow-avro`'s message is vague, and counts a record's array items before they are built.
use crate::json;
use crate::schema::{Node, NodeId, WriterSchema};

/// What went wrong reading one datum.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DatumError {
    /// The bytes end mid-value.
    #[error("the data ends inside this value")]
    Eof,
    /// A varint runs over 10 bytes or overflows.
    #[error("malformed variable-length integer")]
    BadVarint,
    /// An `int` value does not fit 32 bits.
    #[error("int value out of range")]
    IntRange,
    /// A length is negative.
    #[error("length {0} is negative")]
    NegativeLength(i64),
    /// A length runs past the end of the data.
    #[error("length {len} runs past the end of the data ({left} bytes left)")]
    PastEnd {
        /// The length read.
        len: i64,
        /// Bytes left after it.
        left: usize,
    },
    /// A string is not UTF-8.
    #[error("string is not valid UTF-8 (invalid byte at position {at} of its {len} bytes)")]
    BadUtf8 {
        /// Where in the string the first invalid byte is.
        at: usize,
        /// The string's length in bytes.
        len: usize,
    },
    /// A boolean byte is neither 0 nor 1.
    #[error("boolean byte {0} is neither 0 nor 1")]
    BadBool(u8),
    /// A dictionary index is out of range.
    #[error("index {0} is out of range")]
    BadIndex(i64),
    /// A union's branch index is out of range.
    #[error("union branch index {index} is out of range (the union has {branches} branches)")]
    UnionIndex {
        /// The index read.
        index: i64,
        /// Branches of the union.
        branches: usize,
    },
    /// An enum's symbol index is out of range.
    #[error("enum index {index} is out of range (the enum has {symbols} symbols)")]
    EnumIndex {
        /// The index read.
        index: i64,
        /// Symbols of the enum.
        symbols: usize,
    },
    /// Nested deeper than the decoder allows.
    #[error("value nested too deep")]
    TooDeep,
    /// A decoded value has a shape the JSON rendering does not know (the file's schema uses
    /// a type Currents does not).
    #[error("{0} cannot be rendered as JSON")]
    Unsupported(&'static str),
    /// A value does not fit the column its plan chose (an internal error, never data).
    #[error("value does not fit its column")]
    Mismatch,
    /// A record or the file goes over a size guard that the input bytes alone do not bound
    /// (array items and map entries, rendered JSON text).
    #[error("{what} over the limit of {limit}")]
    OverLimit {
        /// What was counted (`array/map items in one record`, ...).
        what: &'static str,
        /// The limit.
        limit: u64,
    },
}

/// A read position over bytes.
#[derive(Debug, Clone)]
pub struct Cursor<'a> {
    buf: &'a [u8],
    /// Current position.
    pub pos: usize,
}

impl<'a> Cursor<'a> {
    /// A cursor at the start of `buf`.
    pub fn new(buf: &'a [u8]) -> Self {
        Self { buf, pos: 0 }
    }

    /// A cursor at `pos`.
    pub fn at(buf: &'a [u8], pos: usize) -> Self {
        Self { buf, pos }
    }

    /// Bytes left.
    #[inline]
    pub fn remaining(&self) -> usize {
        self.buf.len().saturating_sub(self.pos)
    }

    /// Takes the next `n` bytes.
    #[inline]
    pub fn take(&mut self, n: usize) -> Result<&'a [u8], DatumError> {
        let end = self.pos.checked_add(n).ok_or(DatumError::Eof)?;
        let s = self.buf.get(self.pos..end).ok_or(DatumError::Eof)?;
        self.pos = end;
        Ok(s)
    }

    /// Reads a zig-zag varint `long`.
    #[inline]
    pub fn read_long(&mut self) -> Result<i64, DatumError> {
        let mut value: u64 = 0;
        let mut shift = 0u32;
        loop {
            let b = *self.buf.get(self.pos).ok_or(DatumError::Eof)?;
            self.pos += 1;
            if shift == 63 && b > 1 {
                return Err(DatumError::BadVarint);
            }
            value |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                break;
            }
            shift += 7;
            if shift > 63 {
                return Err(DatumError::BadVarint);
            }
        }
        Ok(((value >> 1) as i64) ^ -((value & 1) as i64))
    }

    /// Reads an `int` (a varint that must fit 32 bits).
    #[inline]
    pub fn read_int(&mut self) -> Result<i32, DatumError> {
        i32::try_from(self.read_long()?).map_err(|_| DatumError::IntRange)
    }

    /// Reads a non-negative length that fits the remaining data.
    #[inline]
    pub fn read_len(&mut self) -> Result<usize, DatumError> {
        let n = self.read_long()?;
        if n < 0 {
            return Err(DatumError::NegativeLength(n));
        }
        if n as u64 > self.remaining() as u64 {
            return Err(DatumError::PastEnd {
                len: n,
                left: self.remaining(),
            });
        }
        Ok(n as usize)
    }

    /// Reads length-prefixed bytes.
    #[inline]
    pub fn read_bytes(&mut self) -> Result<&'a [u8], DatumError> {
        let n = self.read_len()?;
        self.take(n)
    }

    /// Reads a length-prefixed UTF-8 string.
    #[inline]
    pub fn read_str(&mut self) -> Result<&'a str, DatumError> {
        let b = self.read_bytes()?;
        std::str::from_utf8(b).map_err(|e| DatumError::BadUtf8 {
            at: e.valid_up_to(),
            len: b.len(),
        })
    }
}

/// A fault found in one record: where (the field path: `id`, `tags[2]` for an array's item 2,
/// `props{1}` for a map's entry 1) and what.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    /// The field path (`$` for the record itself).
    pub field: String,
    /// What is wrong there.
    pub error: DatumError,
}

/// The deepest nesting [`check`] follows (a recursive schema's values included).
pub const MAX_DEPTH: usize = 64;

/// Walks one record of `schema` at the start of `data`: `Ok(bytes used)`, or the first fault
/// with its field. At most `max_items` array items and map entries are accepted (`over` is
/// the error then); items that cost no input bytes (`null`) are counted a block at a time,
/// so the walk costs what the input's bytes cost, however many items a block claims.
pub fn check(
    schema: &WriterSchema,
    data: &[u8],
    max_items: u64,
    over: DatumError,
) -> Result<usize, Fault> {
    let mut w = Walk::new(schema, data, max_items, over);
    let r = w.value(schema.root(), 0);
    w.finish(r)
}

/// Limits of one record's rendered JSON ([`rewrite`]).
#[derive(Debug, Clone, Copy)]
pub struct RenderLimits {
    /// Array items and map entries.
    pub max_items: u64,
    /// The error when they run out.
    pub items_over: DatumError,
    /// Bytes of JSON text.
    pub max_bytes: u64,
    /// The error when they run out.
    pub bytes_over: DatumError,
}

/// Rewrites one record of a schema with rendered fields ([`WriterSchema::is_rendered`]: a
/// recursive type, which `arrow-avro` cannot decode) into the record `arrow-avro` decodes
/// with [`WriterSchema::arrow_avro_json`]: every other field's bytes as they are, each
/// rendered field as a `string` holding its value as JSON (nested at most [`MAX_DEPTH`]
/// deep). Appends to `out`; `Ok(bytes of data used)`.
pub fn rewrite(
    schema: &WriterSchema,
    data: &[u8],
    out: &mut Vec<u8>,
    limits: RenderLimits,
) -> Result<usize, Fault> {
    let mut w = Walk::new(schema, data, limits.max_items, limits.items_over);
    let r = w.rewrite_root(out, limits);
    w.finish(r)
}

fn zigzag(out: &mut Vec<u8>, v: i64) {
    let mut z = ((v << 1) ^ (v >> 63)) as u64;
    loop {
        let b = (z & 0x7f) as u8;
        z >>= 7;
        if z == 0 {
            out.push(b);
            return;
        }
        out.push(b | 0x80);
    }
}

struct Walk<'s, 'a> {
    schema: &'s WriterSchema,
    cur: Cursor<'a>,
    items_left: u64,
    over: DatumError,
    /// The field being read; left as it is when a fault returns, so it names the field.
    path: String,
    /// The value rendered as JSON, when rendering.
    json: Option<String>,
}

impl<'s, 'a> Walk<'s, 'a> {
    fn new(schema: &'s WriterSchema, data: &'a [u8], max_items: u64, over: DatumError) -> Self {
        Self {
            schema,
            cur: Cursor::new(data),
            items_left: max_items,
            over,
            path: String::new(),
            json: None,
        }
    }

    fn finish(self, r: Result<(), DatumError>) -> Result<usize, Fault> {
        match r {
            Ok(()) => Ok(self.cur.pos),
            Err(error) => Err(Fault {
                field: if self.path.is_empty() {
                    "$".into()
                } else {
                    self.path
                },
                error,
            }),
        }
    }

    fn rewrite_root(&mut self, out: &mut Vec<u8>, limits: RenderLimits) -> Result<(), DatumError> {
        let schema = self.schema;
        let Node::Record { fields, .. } = schema.node(schema.root()) else {
            return self.value(schema.root(), 0);
        };
        let mut bytes_left = limits.max_bytes;
        for (i, (name, f)) in fields.iter().enumerate() {
            self.path.clear();
            self.path.push_str(name);
            let start = self.cur.pos;
            if !schema.is_rendered(i) {
                self.value(*f, 1)?;
                out.extend_from_slice(self.cur.buf.get(start..self.cur.pos).unwrap_or_default());
                continue;
            }
            self.json = Some(String::new());
            self.value(*f, 1)?;
            let text = self.json.take().unwrap_or_default();
            bytes_left = bytes_left
                .checked_sub(text.len() as u64)
                .ok_or(limits.bytes_over)?;
            zigzag(out, text.len() as i64);
            out.extend_from_slice(text.as_bytes());
        }
        self.path.clear();
        Ok(())
    }

    /// Appends to the rendering, when rendering.
    fn emit(&mut self, f: impl FnOnce(&mut String)) {
        if let Some(j) = self.json.as_mut() {
            f(j);
        }
    }

    fn value(&mut self, id: NodeId, depth: usize) -> Result<(), DatumError> {
        use std::fmt::Write;
        if depth > MAX_DEPTH {
            return Err(DatumError::TooDeep);
        }
        match self.schema.node(id) {
            Node::Null => self.emit(|j| j.push_str("null")),
            Node::Boolean => {
                let b = self.cur.take(1)?[0];
                if b > 1 {
                    return Err(DatumError::BadBool(b));
                }
                self.emit(|j| j.push_str(if b == 1 { "true" } else { "false" }));
            }
            Node::Int => {
                let v = self.cur.read_int()?;
                self.emit(|j| {
                    let _ = write!(j, "{v}");
                });
            }
            Node::Long => {
                let v = self.cur.read_long()?;
                self.emit(|j| {
                    let _ = write!(j, "{v}");
                });
            }
            Node::Float => {
                let b = self.cur.take(4)?;
                let v = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
                self.emit(|j| json::push_f32(j, v));
            }
            Node::Double => {
                let b = self.cur.take(8)?;
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                self.emit(|j| json::push_f64(j, f64::from_le_bytes(a)));
            }
            Node::Bytes => {
                let b = self.cur.read_bytes()?;
                self.emit(|j| json::push_latin1(j, b));
            }
            Node::String => {
                let s = self.cur.read_str()?;
                self.emit(|j| json::push_str(j, s));
            }
            Node::Enum { symbols, .. } => {
                let index = self.cur.read_long()?;
                let Some(symbol) = usize::try_from(index).ok().and_then(|i| symbols.get(i)) else {
                    return Err(DatumError::EnumIndex {
                        index,
                        symbols: symbols.len(),
                    });
                };
                self.emit(|j| json::push_str(j, symbol));
            }
            Node::Fixed { size, .. } => {
                let b = self.cur.take(*size)?;
                self.emit(|j| json::push_latin1(j, b));
            }
            Node::Union(branches) => {
                let index = self.cur.read_long()?;
                let Some(branch) = usize::try_from(index).ok().and_then(|i| branches.get(i)) else {
                    return Err(DatumError::UnionIndex {
                        index,
                        branches: branches.len(),
                    });
                };
                self.value(*branch, depth + 1)?;
            }
            Node::Record { fields, .. } => {
                self.emit(|j| j.push('{'));
                for (n, (name, f)) in fields.iter().enumerate() {
                    self.emit(|j| {
                        if n > 0 {
                            j.push(',');
                        }
                        json::push_str(j, name);
                        j.push(':');
                    });
                    let len = self.path.len();
                    if len > 0 {
                        self.path.push('.');
                    }
                    self.path.push_str(name);
                    self.value(*f, depth + 1)?;
                    self.path.truncate(len);
                }
                self.emit(|j| j.push('}'));
            }
            Node::Array(item) => self.items(*item, false, depth)?,
            Node::Map(value) => self.items(*value, true, depth)?,
        }
        Ok(())
    }

    /// The blocks of an array or a map: a count (negative: followed by the block's byte
    /// size), that many items, until a count of 0.
    fn items(&mut self, item: NodeId, map: bool, depth: usize) -> Result<(), DatumError> {
        use std::fmt::Write;
        let free = !map && self.json.is_none() && self.schema.costs_nothing(item);
        let mut index = 0u64;
        self.emit(|j| j.push(if map { '{' } else { '[' }));
        loop {
            let mut count = self.cur.read_long()?;
            if count == 0 {
                break;
            }
            if count < 0 {
                count = count.checked_neg().ok_or(DatumError::BadVarint)?;
                self.cur.read_long()?;
            }
            let count = count as u64;
            if count > self.items_left {
                self.items_left = 0;
                return Err(self.over);
            }
            self.items_left -= count;
            if free {
                index += count;
                continue;
            }
            let len = self.path.len();
            for _ in 0..count {
                let _ = write!(
                    self.path,
                    "{}{index}{}",
                    if map { '{' } else { '[' },
                    if map { '}' } else { ']' }
                );
                self.emit(|j| {
                    if index > 0 {
                        j.push(',');
                    }
                });
                if map {
                    let k = self.cur.read_str()?;
                    self.emit(|j| {
                        json::push_str(j, k);
                        j.push(':');
                    });
                }
                self.value(item, depth + 1)?;
                self.path.truncate(len);
                index += 1;
            }
        }
        self.emit(|j| j.push(if map { '}' } else { ']' }));
        Ok(())
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn varints_decode_zigzag_and_reject_overflow() {
        let mut c = Cursor::new(&[0x00, 0x01, 0x02, 0x7f, 0x80, 0x01]);
        assert_eq!(c.read_long().unwrap(), 0);
        assert_eq!(c.read_long().unwrap(), -1);
        assert_eq!(c.read_long().unwrap(), 1);
        assert_eq!(c.read_long().unwrap(), -64);
        assert_eq!(c.read_long().unwrap(), 64);
        let mut c = Cursor::new(&[0xff; 11]);
        assert_eq!(c.read_long(), Err(DatumError::BadVarint));
        let mut c = Cursor::new(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0x01]);
        assert_eq!(c.read_int(), Err(DatumError::IntRange));
    }

    #[test]
    fn string_length_beyond_data_is_an_error() {
        let mut c = Cursor::new(&[0x10, b'a']);
        assert_eq!(c.read_str(), Err(DatumError::PastEnd { len: 8, left: 1 }));
    }
}
