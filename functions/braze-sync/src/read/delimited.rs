//! Delimited text with a header row: CSV, TSV, PSV and custom single-byte delimiters, with
//! quoted fields, embedded newlines, doubled or escaped quotes, CRLF or LF line ends and a
//! UTF-8 byte-order mark. Built on the `csv` crate's byte records (no per-row allocation);
//! UTF-8 is checked once per record; a bad byte rejects its row, naming the column. A record
//! with the wrong number of fields is a bad row.

use std::io::Read;

use csv::{ByteRecord, StringRecord};

use super::limit::{RowGuarded, RowMark};
use super::{BadRow, Cell, CellError, Cells, ReadError, Row, RowItem, RowSource};

const BUFFER: usize = 64 * 1024;

/// Why a delimited file's quoting is broken (carried inside an [`std::io::Error`]).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct QuoteError {
    /// The line where the broken quoted field opened.
    pub line: u64,
    /// What is wrong.
    pub message: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Q {
    FieldStart,
    Unquoted,
    Quoted,
    QuotedEscape,
    /// A quote inside a quoted field: a doubled quote, or the closing one.
    QuoteSeen,
}

/// Checks RFC 4180 quoting on the bytes as the parser reads them. The `csv` crate is lenient:
/// a field that opens a quote and never closes it swallows every following row into one
/// cell (or, at the end of the file, yields the cut value), and text after a closing quote is
/// glued on. Here both are errors: a quoted field must end with a quote followed by the
/// delimiter, a line end or the end of the file; the file must not end inside a quote; and a
/// quoted field may not run past `max_row_bytes`.
struct QuoteCheck<R> {
    inner: R,
    delimiter: u8,
    escape: Option<u8>,
    state: Q,
    line: u64,
    open_line: u64,
    quoted_bytes: u64,
    max_row: u64,
    started: bool,
}

impl<R: Read> QuoteCheck<R> {
    fn fail(&self, message: String) -> std::io::Error {
        std::io::Error::other(QuoteError {
            line: self.open_line,
            message,
        })
    }

    /// Scans `bytes`: spans without a quote (the bulk of any export) in one `memchr` pass,
    /// the bytes around quotes one at a time.
    fn scan(&mut self, mut bytes: &[u8]) -> std::io::Result<()> {
        while !bytes.is_empty() {
            match self.state {
                Q::FieldStart | Q::Unquoted => {
                    // Up to the next quote the state only follows the last byte: a field
                    // boundary (delimiter or line end) or inside an unquoted field.
                    let end = memchr::memchr(b'"', bytes).unwrap_or(bytes.len());
                    if end > 0 {
                        let span = &bytes[..end];
                        self.line += memchr::memchr_iter(b'\n', span).count() as u64;
                        let last = span[end - 1];
                        self.state = if last == self.delimiter || last == b'\n' || last == b'\r' {
                            Q::FieldStart
                        } else {
                            Q::Unquoted
                        };
                    }
                    let quote = end.min(bytes.len());
                    let stop = (quote + 1).min(bytes.len());
                    self.scan_bytes(&bytes[quote..stop])?;
                    bytes = &bytes[stop..];
                }
                Q::Quoted => {
                    // Inside a quoted field nothing matters until a quote or the escape.
                    let end = match self.escape {
                        Some(e) => memchr::memchr2(b'"', e, bytes),
                        None => memchr::memchr(b'"', bytes),
                    }
                    .unwrap_or(bytes.len());
                    let span = &bytes[..end];
                    self.line += memchr::memchr_iter(b'\n', span).count() as u64;
                    self.quoted_bytes += end as u64;
                    if self.quoted_bytes > self.max_row {
                        return Err(self.fail(format!(
                            "the quoted field opened at line {} runs past max_row_bytes ({} bytes): an unterminated quote",
                            self.open_line, self.max_row
                        )));
                    }
                    let stop = (end + 1).min(bytes.len());
                    self.scan_bytes(&bytes[end..stop])?;
                    bytes = &bytes[stop..];
                }
                Q::QuotedEscape | Q::QuoteSeen => {
                    self.scan_bytes(&bytes[..1])?;
                    bytes = &bytes[1..];
                }
            }
        }
        Ok(())
    }

    /// The byte-at-a-time state machine [`QuoteCheck::scan`] runs around quotes.
    fn scan_bytes(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        for &b in bytes {
            if b == b'\n' {
                self.line += 1;
            }
            self.state = match self.state {
                Q::FieldStart | Q::Unquoted => {
                    if b == self.delimiter || b == b'\n' || b == b'\r' {
                        Q::FieldStart
                    } else if b == b'"' && self.state == Q::FieldStart {
                        self.open_line = self.line;
                        self.quoted_bytes = 0;
                        Q::Quoted
                    } else {
                        Q::Unquoted
                    }
                }
                Q::Quoted | Q::QuotedEscape => {
                    self.quoted_bytes += 1;
                    if self.quoted_bytes > self.max_row {
                        return Err(self.fail(format!(
                            "the quoted field opened at line {} runs past max_row_bytes ({} bytes): an unterminated quote",
                            self.open_line, self.max_row
                        )));
                    }
                    if self.state == Q::QuotedEscape {
                        Q::Quoted
                    } else if Some(b) == self.escape {
                        Q::QuotedEscape
                    } else if b == b'"' {
                        Q::QuoteSeen
                    } else {
                        Q::Quoted
                    }
                }
                Q::QuoteSeen => {
                    if b == b'"' {
                        Q::Quoted
                    } else if b == self.delimiter || b == b'\n' || b == b'\r' {
                        Q::FieldStart
                    } else {
                        return Err(self.fail(format!(
                            "the quoted field opened at line {} is followed by text after its closing quote at line {} (an unterminated or stray quote)",
                            self.open_line, self.line
                        )));
                    }
                }
            };
        }
        Ok(())
    }
}

impl<R: Read> Read for QuoteCheck<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        let n = match self.inner.read(buf) {
            Ok(n) => n,
            Err(e) => {
                if matches!(self.state, Q::Quoted | Q::QuotedEscape)
                    && let Some(hit) = e
                        .get_ref()
                        .and_then(|x| x.downcast_ref::<super::limit::LimitHit>())
                    && hit.limit == "max_row_bytes"
                {
                    return Err(self.fail(format!(
                        "the quoted field opened at line {} runs past max_row_bytes ({} bytes): an unterminated quote",
                        self.open_line, hit.bytes
                    )));
                }
                return Err(e);
            }
        };
        let mut bytes = &buf[..n];
        if !self.started && n > 0 {
            self.started = true;
            bytes = bytes.strip_prefix(&[0xef, 0xbb, 0xbf]).unwrap_or(bytes);
        }
        self.scan(bytes)?;
        if n == 0 && matches!(self.state, Q::Quoted | Q::QuotedEscape) {
            return Err(self.fail(format!(
                "the file ends inside the quoted field opened at line {} (an unterminated quote; truncated file?)",
                self.open_line
            )));
        }
        Ok(n)
    }
}

impl Cells for ByteRecord {
    fn len(&self) -> usize {
        ByteRecord::len(self)
    }

    fn cell(&self, index: usize) -> Result<Cell<'_>, CellError> {
        match self.get(index) {
            None | Some(b"") => Ok(Cell::Null),
            Some(bytes) => std::str::from_utf8(bytes)
                .map(Cell::Str)
                .map_err(|e| CellError::InvalidUtf8(e.valid_up_to())),
        }
    }
}

impl Cells for StringRecord {
    fn len(&self) -> usize {
        StringRecord::len(self)
    }

    fn cell(&self, index: usize) -> Result<Cell<'_>, CellError> {
        match self.get(index) {
            None | Some("") => Ok(Cell::Null),
            Some(s) => Ok(Cell::Str(s)),
        }
    }
}

/// One data row's text. `nul`: some value holds a NUL byte, and that value reads as
/// [`CellError::Nul`] (never as data).
struct TextRow {
    record: StringRecord,
    nul: bool,
}

impl Cells for TextRow {
    fn len(&self) -> usize {
        self.record.len()
    }

    fn cell(&self, index: usize) -> Result<Cell<'_>, CellError> {
        match self.record.get(index) {
            None | Some("") => Ok(Cell::Null),
            Some(s) if self.nul && s.contains('\0') => Err(CellError::Nul),
            Some(s) => Ok(Cell::Str(s)),
        }
    }
}

/// Rows of one delimited table.
pub struct DelimitedSource<'a> {
    rdr: csv::Reader<QuoteCheck<RowGuarded<Box<dyn Read + 'a>>>>,
    mark: RowMark,
    source: String,
    header: Vec<String>,
    record: Option<ByteRecord>,
    text: Option<TextRow>,
    row: u64,
    max_row: usize,
}

impl<'a> DelimitedSource<'a> {
    /// Reads the header row and returns the source positioned at the first data row. An empty
    /// object has an empty header (the route's identifier column is then missing).
    pub fn open(
        reader: Box<dyn Read + 'a>,
        source: &str,
        delimiter: u8,
        escape: Option<u8>,
        max_row: usize,
    ) -> Result<Self, ReadError> {
        let mark = RowMark::default();
        let guarded = RowGuarded::new(reader, mark.clone(), max_row, BUFFER).skipping(b"\r\n");
        let checked = QuoteCheck {
            inner: guarded,
            delimiter,
            escape,
            state: Q::FieldStart,
            line: 1,
            open_line: 1,
            quoted_bytes: 0,
            max_row: max_row as u64,
            started: false,
        };
        let mut b = csv::ReaderBuilder::new();
        b.has_headers(false)
            .flexible(true)
            .delimiter(delimiter)
            .buffer_capacity(BUFFER);
        if let Some(esc) = escape {
            b.double_quote(false).escape(Some(esc));
        }
        let mut src = Self {
            rdr: b.from_reader(checked),
            mark,
            source: source.to_string(),
            header: Vec::new(),
            record: Some(ByteRecord::new()),
            text: None,
            row: 0,
            max_row,
        };
        let mut head = ByteRecord::new();
        if src.read(&mut head)? {
            for (i, f) in head.iter().enumerate() {
                let f = if i == 0 {
                    f.strip_prefix(&[0xef, 0xbb, 0xbf]).unwrap_or(f)
                } else {
                    f
                };
                let name = std::str::from_utf8(f).map_err(|_| ReadError::Delimited {
                    source_name: source.to_string(),
                    line: 1,
                    message: format!("header field {} is not valid UTF-8", i + 1),
                })?;
                src.header.push(name.trim().to_string());
            }
        }
        Ok(src)
    }

    fn read(&mut self, into: &mut ByteRecord) -> Result<bool, ReadError> {
        match self.rdr.read_byte_record(into) {
            Ok(more) => {
                self.mark.row_done();
                Ok(more)
            }
            Err(e) => {
                let line = e.position().map(|p| p.line()).unwrap_or(0);
                match e.into_kind() {
                    csv::ErrorKind::Io(io) => {
                        if let Some(q) = io.get_ref().and_then(|x| x.downcast_ref::<QuoteError>()) {
                            return Err(ReadError::Delimited {
                                source_name: self.source.clone(),
                                line: q.line,
                                message: q.message.clone(),
                            });
                        }
                        let mut err = ReadError::io(&self.source, "reading delimited text", io);
                        if let ReadError::LimitExceeded { at, limit, .. } = &mut err
                            && *limit == "max_row_bytes"
                        {
                            *at = Some(self.row + 1);
                        }
                        Err(err)
                    }
                    other => Err(ReadError::Delimited {
                        source_name: self.source.clone(),
                        line,
                        message: format!("{other:?}"),
                    }),
                }
            }
        }
    }
}

impl RowSource for DelimitedSource<'_> {
    fn source(&self) -> &str {
        &self.source
    }

    fn header(&self) -> &[String] {
        &self.header
    }

    fn next_row(&mut self) -> Result<Option<RowItem<'_>>, ReadError> {
        // Reuse the buffers of the previous row's record (`Option::take`: a default record
        // would be a fresh allocation per row).
        let mut record = match (self.text.take(), self.record.take()) {
            (Some(text), _) => text.record.into_byte_record(),
            (None, Some(record)) => record,
            (None, None) => ByteRecord::new(),
        };
        let more = self.read(&mut record);
        if !more? {
            self.record = Some(record);
            return Ok(None);
        }
        self.row += 1;
        let line = record.position().map(|p| p.line());
        if record.as_slice().len() > self.max_row {
            return Err(ReadError::LimitExceeded {
                source_name: self.source.clone(),
                limit: "max_row_bytes",
                bytes: self.max_row as u64,
                at: Some(self.row),
            });
        }
        if record.len() != self.header.len() {
            let found = record.len();
            self.record = Some(record);
            return Ok(Some(RowItem::Bad(BadRow {
                row: self.row,
                line,
                column: None,
                reason: format!(
                    "wrong field count: expected {} fields (the header's), found {found}",
                    self.header.len(),
                ),
            })));
        }
        // A NUL byte is never data, but it does not make the row anonymous: the row is read,
        // its identifier first, and the value holding the byte reads as `CellError::Nul`, so
        // mapping rejects the row naming its user and column (the same rule as JSON and
        // Parquet values). One scan of the record.
        let nul = memchr::memchr(0, record.as_slice()).is_some();
        // One UTF-8 check per record; a bad byte rejects the row and names its column.
        match StringRecord::from_byte_record(record) {
            Ok(text) => Ok(Some(RowItem::Row(Row {
                row: self.row,
                line,
                cells: self.text.insert(TextRow { record: text, nul }),
            }))),
            Err(e) => {
                let (field, at) = (e.utf8_error().field(), e.utf8_error().valid_up_to());
                self.record = Some(e.into_byte_record());
                Ok(Some(RowItem::Bad(BadRow {
                    row: self.row,
                    line,
                    column: self.header.get(field).cloned(),
                    reason: format!("invalid UTF-8 at byte {at} of the value"),
                })))
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::read::{ReadOptions, read_all_text};

    fn rows(data: &[u8], name: &str) -> crate::read::TextTable {
        read_all_text(data, name, &ReadOptions::default())
            .unwrap()
            .remove(0)
    }

    fn checker(escape: Option<u8>, max_row: u64) -> QuoteCheck<std::io::Empty> {
        QuoteCheck {
            inner: std::io::empty(),
            delimiter: b',',
            escape,
            state: Q::FieldStart,
            line: 1,
            open_line: 1,
            quoted_bytes: 0,
            max_row,
            started: false,
        }
    }

    #[test]
    fn the_span_scan_ends_where_the_byte_scan_does() {
        // Random texts of quotes, delimiters, line ends, escapes and letters, fed in random
        // chunks: the memchr scan must reach the same state, line and error as the byte
        // scan it replaces.
        let alphabet = b"a,\"\n\r\\x";
        let mut seed = 7u64;
        let mut next = |n: u64| {
            seed = seed
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (seed >> 33) % n
        };
        for case in 0..3000 {
            let len = next(60) as usize;
            let text: Vec<u8> = (0..len)
                .map(|_| alphabet[next(alphabet.len() as u64) as usize])
                .collect();
            let escape = (case % 2 == 0).then_some(b'\\');
            let max_row = 5 + next(30);
            let mut fast = checker(escape, max_row);
            let mut slow = checker(escape, max_row);
            let mut rest = &text[..];
            let mut fast_err = None;
            while !rest.is_empty() && fast_err.is_none() {
                let n = 1 + next(rest.len() as u64) as usize;
                fast_err = fast.scan(&rest[..n]).err().map(|e| e.to_string());
                rest = &rest[n..];
            }
            let slow_err = slow.scan_bytes(&text).err().map(|e| e.to_string());
            let t = String::from_utf8_lossy(&text);
            assert_eq!(fast_err.is_some(), slow_err.is_some(), "{t:?}");
            if let (Some(f), Some(s)) = (&fast_err, &slow_err) {
                // The message names the line where the quote opened (the same), and for
                // stray text the line of the closing quote (the same byte).
                assert_eq!(f, s, "{t:?}");
                continue;
            }
            assert_eq!(fast.state, slow.state, "{t:?}");
            assert_eq!(fast.line, slow.line, "{t:?}");
            assert_eq!(fast.open_line, slow.open_line, "{t:?}");
            if matches!(fast.state, Q::Quoted | Q::QuotedEscape | Q::QuoteSeen) {
                assert_eq!(fast.quoted_bytes, slow.quoted_bytes, "{t:?}");
            }
        }
    }

    #[test]
    fn quoted_fields_embedded_newlines_bom_and_crlf() {
        let t = rows(
            b"\xef\xbb\xbfid,name,note\r\n1,\"Ada, Countess\",\"line1\r\nline2\"\r\n2,Bob,\"say \"\"hi\"\"\"\r\n",
            "x.csv",
        );
        assert_eq!(t.header, ["id", "name", "note"]);
        assert_eq!(
            t.rows,
            vec![
                vec![
                    Some("1".into()),
                    Some("Ada, Countess".into()),
                    Some("line1\r\nline2".into())
                ],
                vec![
                    Some("2".into()),
                    Some("Bob".into()),
                    Some("say \"hi\"".into())
                ]
            ]
        );
    }

    #[test]
    fn wrong_field_count_is_a_bad_row_with_its_line() {
        let t = rows(b"id,name\n1,a\n2\n3,c,extra\n4,d\n", "x.csv");
        assert_eq!(t.rows.len(), 2);
        assert_eq!(t.bad.len(), 2);
        assert_eq!(t.bad[0].row, 2);
        assert_eq!(t.bad[0].line, Some(3));
        assert!(t.bad[0].reason.contains("expected 2 fields"));
    }

    #[test]
    fn invalid_utf8_rejects_the_row_naming_the_column() {
        let mut src = DelimitedSource::open(
            Box::new(&b"id,name\n1,\xff\xfe\n2,ok\n"[..]),
            "x",
            b',',
            None,
            1024,
        )
        .unwrap();
        let Some(RowItem::Bad(b)) = src.next_row().unwrap() else {
            panic!()
        };
        assert_eq!(b.column.as_deref(), Some("name"));
        assert_eq!(b.reason, "invalid UTF-8 at byte 0 of the value");
        let Some(RowItem::Row(r)) = src.next_row().unwrap() else {
            panic!()
        };
        assert_eq!(r.cells.cell(1).unwrap(), Cell::Str("ok"));
        assert_eq!(ByteRecord::from(vec!["a"]).cell(0), Ok(Cell::Str("a")));
        let _ = CellError::InvalidUtf8(0);
    }

    #[test]
    fn a_row_over_the_limit_fails_the_read_naming_the_limit() {
        let mut data = b"id,name\n1,".to_vec();
        data.extend(std::iter::repeat_n(b'x', 300_000));
        data.extend(b"\n");
        let mut src =
            DelimitedSource::open(Box::new(std::io::Cursor::new(data)), "x", b',', None, 1000)
                .unwrap();
        let err = src.next_row().err().unwrap();
        assert!(err.to_string().contains("max_row_bytes"), "{err}");
    }

    #[test]
    fn escape_character_and_custom_delimiter() {
        let mut src = DelimitedSource::open(
            Box::new(&b"id;v\n1;\"a\\\"b\"\n"[..]),
            "x",
            b';',
            Some(b'\\'),
            1024,
        )
        .unwrap();
        let Some(RowItem::Row(r)) = src.next_row().unwrap() else {
            panic!()
        };
        assert_eq!(r.cells.cell(1).unwrap(), Cell::Str("a\"b"));
    }
}
