//! Rows copied out of a [`super::RowSource`] in batches, so one reader can hand them to other
//! threads (the bounded diff maps one big part on several cores this way, see
//! [`crate::ranged`]). Only the columns a route reads are copied; each cell keeps the type
//! and the error its source gave it, so a copied row maps exactly as the original does.

use std::sync::Arc;

use chrono::{DateTime, NaiveDate, Utc};

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
}
