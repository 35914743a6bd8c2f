//! Rows copied out of a [`super::RowSource`] in batches, so one reader can hand them to other
//! threads (the bounded diff maps one big part on several cores this way, see
//! [`crate::diff::bounded`]). Only the columns a route reads are copied; each cell keeps the type
//! and the error its source gave it, so a copied row maps exactly as the original does.

use std::sync::Arc;

use chrono::{DateTime, Datelike, NaiveDate, Utc};

use super::{Cell, CellError, Cells, Row};

/// Which header columns a batch copies, and where each sits in a copied row.
#[derive(Debug, Clone)]
pub struct Columns {
    list: Vec<usize>,
    slot: Vec<Option<u32>>,
}

impl Columns {
    /// The columns `used` (header indexes, duplicates allowed) of a header of `width` columns.
    pub fn new(width: usize, used: impl IntoIterator<Item = usize>) -> Arc<Self> {
        let mut list: Vec<usize> = used.into_iter().filter(|&c| c < width).collect();
        list.sort_unstable();
        list.dedup();
        let mut slot = vec![None; width];
        for (d, &c) in list.iter().enumerate() {
            slot[c] = Some(d as u32);
        }
        Arc::new(Self { list, slot })
    }
}

#[derive(Debug, Clone, Copy)]
enum Owned {
    Null,
    Str(u32, u32),
    Bool(bool),
    Int(i64),
    Float(f64),
    Decimal { unscaled: i128, scale: i8 },
    Date(NaiveDate),
    Timestamp(DateTime<Utc>),
    Err(u32),
}

/// Copied rows: positions, cells (the [`Columns`] of each row, in order) and one text arena.
#[derive(Debug)]
pub struct RowBatch {
    columns: Arc<Columns>,
    width: usize,
    pos: Vec<(u64, Option<u64>)>,
    cells: Vec<Owned>,
    text: String,
    errors: Vec<CellError>,
}

impl RowBatch {
    /// An empty batch of rows of a `width`-column header, copying `columns`.
    pub fn new(columns: Arc<Columns>, width: usize, rows: usize) -> Self {
        let n = columns.list.len();
        Self {
            columns,
            width,
            pos: Vec::with_capacity(rows),
            cells: Vec::with_capacity(rows * n),
            text: String::with_capacity(rows * 16 * n.max(1)),
            errors: Vec::new(),
        }
    }

    /// Rows held.
    pub fn len(&self) -> usize {
        self.pos.len()
    }

    /// True when no row is held.
    pub fn is_empty(&self) -> bool {
        self.pos.is_empty()
    }

    /// Bytes of text held (to cap a batch's size).
    pub fn text_bytes(&self) -> usize {
        self.text.len()
    }

    /// Copies `row`'s columns.
    pub fn push(&mut self, row: &Row<'_>) {
        self.pos.push((row.row, row.line));
        for &c in &self.columns.list {
            let owned = match row.cells.cell(c) {
                Ok(Cell::Null) => Owned::Null,
                Ok(Cell::Str(s)) => {
                    let a = self.text.len() as u32;
                    self.text.push_str(s);
                    Owned::Str(a, self.text.len() as u32)
                }
                Ok(Cell::Bool(b)) => Owned::Bool(b),
                Ok(Cell::Int(i)) => Owned::Int(i),
                Ok(Cell::Float(f)) => Owned::Float(f),
                Ok(Cell::Decimal { unscaled, scale }) => Owned::Decimal { unscaled, scale },
                Ok(Cell::Date(d)) => Owned::Date(d),
                Ok(Cell::Timestamp(t)) => Owned::Timestamp(t),
                Err(e) => {
                    self.errors.push(e);
                    Owned::Err(self.errors.len() as u32 - 1)
                }
            };
            self.cells.push(owned);
        }
    }

    /// Row `i`: its number, line and cells (`None` past the end).
    pub fn row(&self, i: usize) -> Option<(u64, Option<u64>, BatchRow<'_>)> {
        let (row, line) = *self.pos.get(i)?;
        let n = self.columns.list.len();
        Some((
            row,
            line,
            BatchRow {
                batch: self,
                cells: self.cells.get(i * n..(i + 1) * n)?,
            },
        ))
    }
}

/// One copied row, readable as [`Cells`] by header index like the original.
pub struct BatchRow<'b> {
    batch: &'b RowBatch,
    cells: &'b [Owned],
}

impl Cells for BatchRow<'_> {
    fn len(&self) -> usize {
        self.batch.width
    }

    fn cell(&self, index: usize) -> Result<Cell<'_>, CellError> {
        let Some(Some(d)) = self.batch.columns.slot.get(index) else {
            return Ok(Cell::Null);
        };
        Ok(match self.cells.get(*d as usize) {
            None | Some(Owned::Null) => Cell::Null,
            Some(Owned::Str(a, b)) => {
                Cell::Str(self.batch.text.get(*a as usize..*b as usize).unwrap_or(""))
            }
            Some(Owned::Bool(b)) => Cell::Bool(*b),
            Some(Owned::Int(i)) => Cell::Int(*i),
            Some(Owned::Float(f)) => Cell::Float(*f),
            Some(Owned::Decimal { unscaled, scale }) => Cell::Decimal {
                unscaled: *unscaled,
                scale: *scale,
            },
            Some(Owned::Date(d)) => Cell::Date(*d),
            Some(Owned::Timestamp(t)) => Cell::Timestamp(*t),
            Some(Owned::Err(e)) => {
                return Err(self
                    .batch
                    .errors
                    .get(*e as usize)
                    .cloned()
                    .unwrap_or(CellError::Unsupported("lost".into())));
            }
        })
    }
}

impl Columns {
    /// Header columns copied, in the order [`encode_row`] writes them.
    pub fn list(&self) -> &[usize] {
        &self.list
    }

    /// Where header column `index` sits in a copied row.
    fn slot(&self, index: usize) -> Option<usize> {
        self.slot.get(index).copied().flatten().map(|d| d as usize)
    }
}

const T_NULL: u8 = 0;
const T_STR: u8 = 1;
const T_FALSE: u8 = 2;
const T_TRUE: u8 = 3;
const T_INT: u8 = 4;
const T_FLOAT: u8 = 5;
const T_DECIMAL: u8 = 6;
const T_DATE: u8 = 7;
const T_TIMESTAMP: u8 = 8;
const T_ERR_UTF8: u8 = 9;
const T_ERR_NUL: u8 = 10;
const T_ERR_OTHER: u8 = 11;

/// Appends `row`'s `columns` to `out` as tagged cells (the text as it was read, numbers in
/// fixed or varint form, a cell's read error as the error): the bounded diff spills an export
/// row this way and hashes these bytes into the row's digest, so two rows encode alike
/// exactly when their cells are equal. [`EncodedRow`] reads it back.
pub fn encode_row(columns: &Columns, cells: &dyn Cells, out: &mut Vec<u8>) {
    for &c in &columns.list {
        match cells.cell(c) {
            Ok(Cell::Null) => out.push(T_NULL),
            Ok(Cell::Str(s)) => {
                out.push(T_STR);
                put_varint(out, s.len() as u64);
                out.extend_from_slice(s.as_bytes());
            }
            Ok(Cell::Bool(b)) => out.push(if b { T_TRUE } else { T_FALSE }),
            Ok(Cell::Int(i)) => {
                out.push(T_INT);
                out.extend_from_slice(&i.to_le_bytes());
            }
            Ok(Cell::Float(f)) => {
                out.push(T_FLOAT);
                out.extend_from_slice(&f.to_bits().to_le_bytes());
            }
            Ok(Cell::Decimal { unscaled, scale }) => {
                out.push(T_DECIMAL);
                out.extend_from_slice(&unscaled.to_le_bytes());
                out.push(scale as u8);
            }
            Ok(Cell::Date(d)) => {
                out.push(T_DATE);
                out.extend_from_slice(&d.num_days_from_ce().to_le_bytes());
            }
            Ok(Cell::Timestamp(t)) => {
                out.push(T_TIMESTAMP);
                out.extend_from_slice(&t.timestamp().to_le_bytes());
                out.extend_from_slice(&t.timestamp_subsec_nanos().to_le_bytes());
            }
            Err(CellError::InvalidUtf8(at)) => {
                out.push(T_ERR_UTF8);
                put_varint(out, at as u64);
            }
            Err(CellError::Nul) => out.push(T_ERR_NUL),
            Err(CellError::Unsupported(what)) => {
                out.push(T_ERR_OTHER);
                put_varint(out, what.len() as u64);
                out.extend_from_slice(what.as_bytes());
            }
        }
    }
}

/// A row written by [`encode_row`], readable as [`Cells`] by header index like the original.
pub struct EncodedRow<'b> {
    columns: &'b Columns,
    width: usize,
    cells: Vec<Result<Cell<'b>, CellError>>,
}

impl<'b> EncodedRow<'b> {
    /// Reads the cells of `bytes` (the whole of what [`encode_row`] wrote for a header of
    /// `width` columns); `None` when they do not decode.
    pub fn decode(columns: &'b Columns, width: usize, bytes: &'b [u8]) -> Option<Self> {
        let mut at = 0usize;
        let mut take = |n: usize| -> Option<&'b [u8]> {
            let b = bytes.get(at..at.checked_add(n)?)?;
            at += n;
            Some(b)
        };
        fn arr<const N: usize>(b: &[u8]) -> Option<[u8; N]> {
            b.try_into().ok()
        }
        let mut cells = Vec::with_capacity(columns.list.len());
        for _ in &columns.list {
            let tag = *take(1)?.first()?;
            let cell = match tag {
                T_NULL => Ok(Cell::Null),
                T_STR | T_ERR_UTF8 | T_ERR_OTHER => {
                    let mut n = 0u64;
                    for shift in (0..64).step_by(7) {
                        let x = *take(1)?.first()?;
                        n |= u64::from(x & 0x7f) << shift;
                        if x & 0x80 == 0 {
                            break;
                        }
                    }
                    let n = usize::try_from(n).ok()?;
                    match tag {
                        T_STR => Ok(Cell::Str(std::str::from_utf8(take(n)?).ok()?)),
                        T_ERR_UTF8 => Err(CellError::InvalidUtf8(n)),
                        _ => Err(CellError::Unsupported(
                            String::from_utf8_lossy(take(n)?).into_owned(),
                        )),
                    }
                }
                T_FALSE => Ok(Cell::Bool(false)),
                T_TRUE => Ok(Cell::Bool(true)),
                T_INT => Ok(Cell::Int(i64::from_le_bytes(arr(take(8)?)?))),
                T_FLOAT => Ok(Cell::Float(f64::from_bits(u64::from_le_bytes(arr(take(
                    8,
                )?)?)))),
                T_DECIMAL => {
                    let unscaled = i128::from_le_bytes(arr(take(16)?)?);
                    let scale = *take(1)?.first()? as i8;
                    Ok(Cell::Decimal { unscaled, scale })
                }
                T_DATE => Ok(Cell::Date(NaiveDate::from_num_days_from_ce_opt(
                    i32::from_le_bytes(arr(take(4)?)?),
                )?)),
                T_TIMESTAMP => {
                    let secs = i64::from_le_bytes(arr(take(8)?)?);
                    let nanos = u32::from_le_bytes(arr(take(4)?)?);
                    Ok(Cell::Timestamp(DateTime::<Utc>::from_timestamp(
                        secs, nanos,
                    )?))
                }
                T_ERR_NUL => Err(CellError::Nul),
                _ => return None,
            };
            cells.push(cell);
        }
        (at == bytes.len()).then_some(Self {
            columns,
            width,
            cells,
        })
    }
}

impl Cells for EncodedRow<'_> {
    fn len(&self) -> usize {
        self.width
    }

    fn cell(&self, index: usize) -> Result<Cell<'_>, CellError> {
        match self.columns.slot(index).and_then(|d| self.cells.get(d)) {
            None => Ok(Cell::Null),
            Some(c) => c.clone(),
        }
    }
}

/// Appends `v` as a LEB128 varint.
pub fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    struct V(Vec<Result<Cell<'static>, CellError>>);
    impl Cells for V {
        fn len(&self) -> usize {
            self.0.len()
        }
        fn cell(&self, i: usize) -> Result<Cell<'_>, CellError> {
            self.0.get(i).cloned().unwrap_or(Ok(Cell::Null))
        }
    }

    #[test]
    fn a_copied_row_reads_as_the_original_for_the_columns_it_copies() {
        let d = NaiveDate::from_ymd_opt(2024, 2, 29).unwrap();
        let original = V(vec![
            Ok(Cell::Str("u1")),
            Ok(Cell::Str("skipped")),
            Ok(Cell::Int(-7)),
            Ok(Cell::Float(2.5)),
            Ok(Cell::Decimal {
                unscaled: 12345,
                scale: 2,
            }),
            Ok(Cell::Date(d)),
            Ok(Cell::Timestamp(d.and_hms_opt(1, 2, 3).unwrap().and_utc())),
            Ok(Cell::Bool(true)),
            Ok(Cell::Null),
            Err(CellError::InvalidUtf8(3)),
            Ok(Cell::Str("")),
        ]);
        let columns = Columns::new(11, [0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 0, 42]);
        let mut batch = RowBatch::new(columns, 11, 4);
        for n in 1..=3 {
            batch.push(&Row {
                row: n,
                line: Some(n + 1),
                cells: &original,
            });
        }
        assert_eq!(batch.len(), 3);
        let (row, line, copy) = batch.row(2).unwrap();
        assert_eq!((row, line), (3, Some(4)));
        assert_eq!(copy.len(), 11);
        for i in 0..11 {
            if i == 1 {
                assert_eq!(copy.cell(i), Ok(Cell::Null), "not copied");
            } else {
                assert_eq!(copy.cell(i), original.cell(i), "column {i}");
            }
        }
        assert!(batch.row(3).is_none());
    }

    #[test]
    fn an_encoded_row_reads_as_the_original_and_equal_rows_encode_alike() {
        let d = NaiveDate::from_ymd_opt(2024, 2, 29).unwrap();
        let original = V(vec![
            Ok(Cell::Str("u1")),
            Ok(Cell::Str("skipped")),
            Ok(Cell::Int(-7)),
            Ok(Cell::Float(2.5)),
            Ok(Cell::Decimal {
                unscaled: -12345,
                scale: 2,
            }),
            Ok(Cell::Date(d)),
            Ok(Cell::Timestamp(
                d.and_hms_nano_opt(1, 2, 3, 4).unwrap().and_utc(),
            )),
            Ok(Cell::Bool(true)),
            Ok(Cell::Null),
            Err(CellError::InvalidUtf8(3)),
            Ok(Cell::Str("")),
            Err(CellError::Nul),
            Err(CellError::Unsupported("list".into())),
            Ok(Cell::Bool(false)),
        ]);
        let columns = Columns::new(14, [0, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 0, 42]);
        let mut bytes = Vec::new();
        encode_row(&columns, &original, &mut bytes);
        let copy = EncodedRow::decode(&columns, 14, &bytes).unwrap();
        assert_eq!(copy.len(), 14);
        for i in 0..14 {
            if i == 1 {
                assert_eq!(copy.cell(i), Ok(Cell::Null), "not copied");
            } else {
                assert_eq!(copy.cell(i), original.cell(i), "column {i}");
            }
        }
        let mut again = Vec::new();
        encode_row(&columns, &copy, &mut again);
        assert_eq!(again, bytes, "a decoded row encodes to the same bytes");
        // A different value (or the same text as another type) encodes differently.
        let mut other = Vec::new();
        let changed = V(vec![
            Ok(Cell::Str("u1")),
            Ok(Cell::Null),
            Ok(Cell::Str("-7")),
        ]);
        encode_row(&columns, &changed, &mut other);
        assert_ne!(other, bytes);
        // Truncated or trailing bytes do not decode.
        assert!(EncodedRow::decode(&columns, 14, &bytes[..bytes.len() - 1]).is_none());
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(EncodedRow::decode(&columns, 14, &longer).is_none());
    }
}
