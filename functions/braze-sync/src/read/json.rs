//! JSON exports: newline-delimited objects (NDJSON) and one array of objects, both streamed
//! one object at a time. JSON has no header row, so a source's header is the first object's
//! keys followed by the route's columns it lacked; a key missing from a later object is null.
//! An NDJSON line that does not parse is a bad row; a JSON array cannot be followed past a
//! broken element, so that fails the read.

use std::io::{BufRead, BufReader, Read};

use serde::Deserialize;
use serde_json::{Map, Value};

use super::limit::{RowGuarded, RowMark};
use super::{BadRow, Cell, CellError, Cells, ReadError, ReadOptions, Row, RowItem, RowSource};

/// One JSON object as parsed, with the keys it repeats (serde_json's map keeps the last
/// copy silently; a repeated key the route reads makes the row ambiguous).
struct Obj {
    map: Map<String, Value>,
    dups: Vec<String>,
}

struct ObjVisitor;

impl<'de> serde::de::Visitor<'de> for ObjVisitor {
    type Value = Obj;

    fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("a JSON object")
    }

    fn visit_map<A: serde::de::MapAccess<'de>>(self, mut access: A) -> Result<Obj, A::Error> {
        let mut map = Map::new();
        let mut dups = Vec::new();
        while let Some(k) = access.next_key::<String>()? {
            let v: Value = access.next_value()?;
            if map.contains_key(&k) && !dups.contains(&k) {
                dups.push(k.clone());
            }
            map.insert(k, v);
        }
        Ok(Obj { map, dups })
    }
}

impl<'de> Deserialize<'de> for Obj {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Obj, D::Error> {
        d.deserialize_map(ObjVisitor)
    }
}

/// Why an object is refused as a row: a key the route reads appears more than once.
fn ambiguous(obj: &Obj, columns: &[String]) -> Option<(String, String)> {
    obj.dups.iter().find(|k| columns.contains(k)).map(|k| {
        (
            k.clone(),
            format!(
                "key {k:?} appears more than once in the object: which value is meant is ambiguous"
            ),
        )
    })
}

/// The current object and the header it is read through.
struct JsonCells {
    header: Vec<String>,
    obj: Map<String, Value>,
}

impl Cells for JsonCells {
    fn len(&self) -> usize {
        self.header.len()
    }

    fn cell(&self, index: usize) -> Result<Cell<'_>, CellError> {
        let Some(v) = self.header.get(index).and_then(|k| self.obj.get(k)) else {
            return Ok(Cell::Null);
        };
        json_cell(v)
    }
}

/// A JSON value as a cell: numbers keep their integer-ness, `""` is null, nested values are
/// refused.
pub fn json_cell(v: &Value) -> Result<Cell<'_>, CellError> {
    Ok(match v {
        Value::Null => Cell::Null,
        Value::Bool(b) => Cell::Bool(*b),
        Value::Number(n) => match n.as_i64() {
            Some(i) => Cell::Int(i),
            None => Cell::Float(n.as_f64().unwrap_or(f64::NAN)),
        },
        Value::String(s) if s.is_empty() => Cell::Null,
        Value::String(s) if s.contains('\0') => return Err(CellError::Nul),
        Value::String(s) => Cell::Str(s),
        Value::Array(_) => return Err(CellError::Unsupported("array".into())),
        Value::Object(_) => return Err(CellError::Unsupported("object".into())),
    })
}

fn header_from(first: Option<&Map<String, Value>>, opts: &ReadOptions) -> Vec<String> {
    let mut header: Vec<String> = first
        .map(|o| o.keys().cloned().collect())
        .unwrap_or_default();
    for c in &opts.columns {
        if !header.contains(c) {
            header.push(c.clone());
        }
    }
    header
}

fn check_required(
    first: &Map<String, Value>,
    opts: &ReadOptions,
    source: &str,
) -> Result<(), ReadError> {
    for c in &opts.required_columns {
        if !first.contains_key(c) {
            return Err(ReadError::MissingColumn {
                source_name: source.to_string(),
                column: c.clone(),
            });
        }
    }
    Ok(())
}

/// Newline-delimited JSON objects.
pub struct NdJsonSource<'a> {
    reader: BufReader<Box<dyn Read + 'a>>,
    source: String,
    cells: JsonCells,
    line_buf: Vec<u8>,
    line_no: u64,
    row: u64,
    max_row: usize,
    pending: Option<Pending>,
    columns: Vec<String>,
}

enum Pending {
    Obj(u64, Map<String, Value>),
    Bad(BadRow),
}

enum Line {
    Obj(Map<String, Value>),
    Bad(Option<String>, String),
}

impl<'a> NdJsonSource<'a> {
    /// Reads up to the first object to learn the header.
    pub fn open(
        reader: Box<dyn Read + 'a>,
        source: &str,
        opts: &ReadOptions,
    ) -> Result<Self, ReadError> {
        let mut src = Self {
            reader: BufReader::with_capacity(64 * 1024, reader),
            source: source.to_string(),
            cells: JsonCells {
                header: Vec::new(),
                obj: Map::new(),
            },
            line_buf: Vec::new(),
            line_no: 0,
            row: 0,
            max_row: opts.limits.max_row_bytes,
            pending: None,
            columns: opts.columns.clone(),
        };
        let first = src.next_line()?;
        let first_obj = match &first {
            Some((_, Line::Obj(o))) => {
                check_required(o, opts, source)?;
                Some(o)
            }
            _ => None,
        };
        src.cells.header = header_from(first_obj, opts);
        src.pending = first.map(|(line, l)| match l {
            Line::Obj(o) => Pending::Obj(line, o),
            Line::Bad(column, reason) => Pending::Bad(BadRow {
                row: 1,
                line: Some(line),
                column,
                reason,
            }),
        });
        Ok(src)
    }

    /// Reads the next non-blank line (bounded), returning its line number and content.
    fn next_line(&mut self) -> Result<Option<(u64, Line)>, ReadError> {
        loop {
            self.line_buf.clear();
            let mut eof = false;
            loop {
                let buf = self
                    .reader
                    .fill_buf()
                    .map_err(|e| ReadError::io(&self.source, "reading NDJSON", e))?;
                if buf.is_empty() {
                    eof = true;
                    break;
                }
                let (take, done) = match buf.iter().position(|&b| b == b'\n') {
                    Some(i) => (i + 1, true),
                    None => (buf.len(), false),
                };
                if self.line_buf.len() + take > self.max_row + 1 {
                    return Err(ReadError::LimitExceeded {
                        source_name: self.source.clone(),
                        limit: "max_row_bytes",
                        bytes: self.max_row as u64,
                        at: Some(self.row + 1),
                    });
                }
                self.line_buf.extend_from_slice(&buf[..take]);
                self.reader.consume(take);
                if done {
                    break;
                }
            }
            if self.line_buf.is_empty() && eof {
                return Ok(None);
            }
            self.line_no += 1;
            let mut bytes = self.line_buf.as_slice();
            if self.line_no == 1 {
                bytes = bytes.strip_prefix(&[0xef, 0xbb, 0xbf]).unwrap_or(bytes);
            }
            if bytes.iter().all(u8::is_ascii_whitespace) {
                if eof {
                    return Ok(None);
                }
                continue;
            }
            let line = match std::str::from_utf8(bytes) {
                Err(e) => Line::Bad(None, format!("invalid UTF-8 at byte {}", e.valid_up_to())),
                Ok(text) => match serde_json::from_str::<Value>(text) {
                    Ok(Value::Object(_)) => match serde_json::from_str::<Obj>(text) {
                        Ok(o) => match ambiguous(&o, &self.columns) {
                            Some((k, reason)) => Line::Bad(Some(k), reason),
                            None => Line::Obj(o.map),
                        },
                        Err(e) => Line::Bad(None, format!("not valid JSON: {e}")),
                    },
                    Ok(_) => Line::Bad(None, "the line is JSON but not an object".into()),
                    Err(e) => Line::Bad(None, format!("not valid JSON: {e}")),
                },
            };
            return Ok(Some((self.line_no, line)));
        }
    }
}

impl RowSource for NdJsonSource<'_> {
    fn source(&self) -> &str {
        &self.source
    }

    fn header(&self) -> &[String] {
        &self.cells.header
    }

    fn next_row(&mut self) -> Result<Option<RowItem<'_>>, ReadError> {
        let (line, item) = match self.pending.take() {
            Some(Pending::Obj(line, o)) => (line, Line::Obj(o)),
            Some(Pending::Bad(b)) => {
                self.row += 1;
                return Ok(Some(RowItem::Bad(b)));
            }
            None => match self.next_line()? {
                Some(x) => x,
                None => return Ok(None),
            },
        };
        self.row += 1;
        match item {
            Line::Obj(o) => {
                self.cells.obj = o;
                Ok(Some(RowItem::Row(Row {
                    row: self.row,
                    line: Some(line),
                    cells: &self.cells,
                })))
            }
            Line::Bad(column, reason) => Ok(Some(RowItem::Bad(BadRow {
                row: self.row,
                line: Some(line),
                column,
                reason,
            }))),
        }
    }
}

/// One JSON array of objects, streamed element by element.
pub struct JsonArraySource<'a> {
    reader: BufReader<RowGuarded<Box<dyn Read + 'a>>>,
    mark: RowMark,
    source: String,
    cells: JsonCells,
    row: u64,
    done: bool,
    pending: Option<Obj>,
    columns: Vec<String>,
}

impl<'a> JsonArraySource<'a> {
    /// Reads up to the first element to learn the header.
    pub fn open(
        reader: Box<dyn Read + 'a>,
        source: &str,
        opts: &ReadOptions,
    ) -> Result<Self, ReadError> {
        let mark = RowMark::default();
        let mut src = Self {
            reader: BufReader::with_capacity(
                64 * 1024,
                RowGuarded::new(reader, mark.clone(), opts.limits.max_row_bytes, 64 * 1024),
            ),
            mark,
            source: source.to_string(),
            cells: JsonCells {
                header: Vec::new(),
                obj: Map::new(),
            },
            row: 0,
            done: false,
            pending: None,
            columns: opts.columns.clone(),
        };
        match src.skip_ws()? {
            None => src.done = true,
            Some(b'[') => src.reader.consume(1),
            Some(b) => {
                return Err(src.err(0, format!("expected '[' but found {:?}", b as char)));
            }
        }
        let first = src.next_element(0)?;
        if let Some(o) = &first {
            check_required(&o.map, opts, source)?;
        }
        src.cells.header = header_from(first.as_ref().map(|o| &o.map), opts);
        src.pending = first;
        Ok(src)
    }

    fn err(&self, row: u64, message: String) -> ReadError {
        ReadError::Json {
            source_name: self.source.clone(),
            row,
            message,
        }
    }

    /// Peeks the next non-whitespace byte (skipping a BOM).
    fn skip_ws(&mut self) -> Result<Option<u8>, ReadError> {
        loop {
            let buf = self
                .reader
                .fill_buf()
                .map_err(|e| ReadError::io(&self.source, "reading JSON", e))?;
            if buf.is_empty() {
                return Ok(None);
            }
            if buf.starts_with(&[0xef, 0xbb, 0xbf]) {
                self.reader.consume(3);
                continue;
            }
            match buf.iter().position(|b| !b.is_ascii_whitespace()) {
                Some(i) => {
                    let b = buf[i];
                    self.reader.consume(i);
                    return Ok(Some(b));
                }
                None => {
                    let n = buf.len();
                    self.reader.consume(n);
                    // Whitespace between elements belongs to no row.
                    self.mark.row_done();
                }
            }
        }
    }

    fn next_element(&mut self, index: u64) -> Result<Option<Obj>, ReadError> {
        if self.done {
            return Ok(None);
        }
        let row = index + 1;
        match self.skip_ws()? {
            None => return Err(self.err(row, "the array is not closed (truncated?)".into())),
            Some(b']') => {
                self.reader.consume(1);
                self.done = true;
                return Ok(None);
            }
            Some(b',') if index > 0 => {
                self.reader.consume(1);
            }
            Some(_) if index == 0 => {}
            Some(b) => {
                return Err(self.err(
                    row,
                    format!("expected ',' or ']' but found {:?}", b as char),
                ));
            }
        }
        match self.skip_ws()? {
            Some(b'{') => {}
            Some(b) => {
                return Err(self.err(
                    row,
                    format!("array elements must be objects, found {:?}", b as char),
                ));
            }
            None => return Err(self.err(row, "the array is not closed (truncated?)".into())),
        }
        self.mark.row_done();
        let mut de = serde_json::Deserializer::from_reader(&mut self.reader);
        let obj = Obj::deserialize(&mut de).map_err(|e| match e.io_error_kind() {
            Some(_) => {
                let io: std::io::Error = e.into();
                ReadError::io(&self.source, "reading JSON", io)
            }
            None => self.err(row, format!("not valid JSON: {e}")),
        })?;
        Ok(Some(obj))
    }
}

impl RowSource for JsonArraySource<'_> {
    fn source(&self) -> &str {
        &self.source
    }

    fn header(&self) -> &[String] {
        &self.cells.header
    }

    fn next_row(&mut self) -> Result<Option<RowItem<'_>>, ReadError> {
        let obj = match self.pending.take() {
            Some(o) => o,
            None => match self.next_element(self.row)? {
                Some(o) => o,
                None => return Ok(None),
            },
        };
        self.row += 1;
        if let Some((column, reason)) = ambiguous(&obj, &self.columns) {
            return Ok(Some(RowItem::Bad(BadRow {
                row: self.row,
                line: None,
                column: Some(column),
                reason,
            })));
        }
        self.cells.obj = obj.map;
        Ok(Some(RowItem::Row(Row {
            row: self.row,
            line: None,
            cells: &self.cells,
        })))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::read::read_all_text;

    fn opts() -> ReadOptions {
        ReadOptions {
            columns: vec!["id".into(), "score".into()],
            ..Default::default()
        }
    }

    #[test]
    fn ndjson_rows_keep_line_numbers_and_bad_lines_are_rejected() {
        let data = b"{\"id\":\"1\",\"name\":\"a\"}\n\n{broken\n{\"id\":2,\"score\":1.5}\n[1]\n";
        let t = read_all_text(&data[..], "x.ndjson", &opts())
            .unwrap()
            .remove(0);
        assert_eq!(t.header, ["id", "name", "score"]);
        assert_eq!(
            t.rows,
            vec![
                vec![Some("1".into()), Some("a".into()), None],
                vec![Some("2".into()), None, Some("1.5".into())]
            ]
        );
        assert_eq!(t.bad.len(), 2);
        assert_eq!((t.bad[0].row, t.bad[0].line), (2, Some(3)));
        assert_eq!((t.bad[1].row, t.bad[1].line), (4, Some(5)));
    }

    #[test]
    fn json_array_is_streamed_element_by_element() {
        let data = b"\xef\xbb\xbf [ {\"id\":\"1\"} ,\n {\"id\":\"2\",\"score\":3} ]\n";
        let t = read_all_text(&data[..], "x.json", &opts())
            .unwrap()
            .remove(0);
        assert_eq!(
            t.rows,
            vec![
                vec![Some("1".into()), None],
                vec![Some("2".into()), Some("3".into())]
            ]
        );
    }

    #[test]
    fn truncated_json_array_fails_the_read() {
        let err = read_all_text(&b"[{\"id\":\"1\"},{\"id\""[..], "x.json", &opts()).unwrap_err();
        assert!(
            matches!(err, ReadError::Json { .. } | ReadError::Io { .. }),
            "{err}"
        );
    }

    #[test]
    fn missing_required_column_in_the_first_object_fails() {
        let o = ReadOptions {
            required_columns: vec!["id".into()],
            ..opts()
        };
        let err = read_all_text(&b"{\"x\":1}\n"[..], "x.ndjson", &o).unwrap_err();
        assert!(matches!(err, ReadError::MissingColumn { .. }));
    }
}
