//! Bytes → rows: opens one export object (any format and compression Amperity sends to S3),
//! peels compression and archive layers, and hands each contained table to a visitor as a
//! [`RowSource`] that yields rows one at a time.
//!
//! Reading is a synchronous pull API over [`std::io::Read`]; memory does not grow with the
//! file, only with one row (bounded by [`Limits::max_row_bytes`]) or one Parquet batch.
//! Layers:
//! - **gzip** (multi-member, [`flate2::read::MultiGzDecoder`]) and **tar** / **tgz** are
//!   streamed.
//! - **zip** and **Parquet** need random access: the member or part is *spilled to a temp file*
//!   (under [`ReadOptions::temp_dir`], `/tmp` on Lambda, unlinked as soon as it is opened), so
//!   memory stays bounded by one Parquet row group batch, not the part size. Disk use is bounded
//!   by [`Limits::max_decompressed_bytes`].
//!
//! The format and compression come from the route config or the key's suffixes and are
//! confirmed by sniffing the first bytes (see [`format`]); a route that declares one thing while
//! the bytes say another fails with [`ReadError::Mismatch`].

pub mod delimited;
pub mod format;
pub mod json;
pub mod limit;
pub mod parquet;
pub mod parquet_pages;
pub mod row_codec;

use std::io::Read;
use std::path::PathBuf;

pub use crate::vocab::{Cell, Compression, Format};

/// Lambda's default `/tmp` size, MiB: the ephemeral storage assumed when
/// [`EPHEMERAL_STORAGE_ENV`] is not set.
pub const DEFAULT_EPHEMERAL_STORAGE_MB: u64 = 512;
/// Environment variable naming the function's configured ephemeral storage (`/tmp`), MiB.
pub const EPHEMERAL_STORAGE_ENV: &str = "BRIDGE_EPHEMERAL_STORAGE_MB";

/// Default bound on the decompressed bytes of one export object (all layers together): the
/// function's ephemeral storage (`BRIDGE_EPHEMERAL_STORAGE_MB`, else 512 MiB), since a zip
/// member or Parquet part is spilled there whole. A route may set its own
/// `limits.max_decompressed_bytes`.
pub fn default_max_decompressed_bytes() -> u64 {
    std::env::var(EPHEMERAL_STORAGE_ENV)
        .ok()
        .and_then(|v| v.trim().parse::<u64>().ok())
        .filter(|&mb| mb > 0)
        .unwrap_or(DEFAULT_EPHEMERAL_STORAGE_MB)
        .saturating_mul(1024 * 1024)
}
/// Default bound on one row (a delimited record, an NDJSON line, a JSON array element).
pub const DEFAULT_MAX_ROW_BYTES: usize = 1024 * 1024;
/// Archives nested deeper than this (a zip in a tar in a gzip ...) are refused.
pub const MAX_NESTING: usize = 4;

/// Size bounds, so a hostile or broken file cannot exhaust memory or disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Total decompressed bytes of one object, across every layer and member.
    pub max_decompressed_bytes: u64,
    /// Largest single row in bytes.
    pub max_row_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Self {
            max_decompressed_bytes: default_max_decompressed_bytes(),
            max_row_bytes: DEFAULT_MAX_ROW_BYTES,
        }
    }
}

/// How to read one object.
#[derive(Debug, Clone)]
pub struct ReadOptions {
    /// Format declared by the route; `None` = from the key's suffix, then sniffed.
    pub format: Option<Format>,
    /// Compression declared by the route; `None` = from the bytes.
    pub compression: Option<Compression>,
    /// Size bounds.
    pub limits: Limits,
    /// Where zip members and Parquet parts are spilled.
    pub temp_dir: PathBuf,
    /// Column names the route reads: JSON sources (which have no header row) list these in
    /// their header even when the first object omits them.
    pub columns: Vec<String>,
    /// Columns that must be present: a JSON source whose first object lacks one fails, like a
    /// delimited file whose header lacks it.
    pub required_columns: Vec<String>,
}

impl Default for ReadOptions {
    fn default() -> Self {
        Self {
            format: None,
            compression: None,
            limits: Limits::default(),
            temp_dir: std::env::temp_dir(),
            columns: Vec::new(),
            required_columns: Vec::new(),
        }
    }
}

/// Why one cell cannot be read (the row is rejected, the export goes on).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CellError {
    /// The field's bytes are not UTF-8.
    #[error("invalid UTF-8 at byte {0} of the value")]
    InvalidUtf8(usize),
    /// A NUL byte in a value: never data, the row is rejected wherever it is.
    #[error("a NUL byte in the value (binary data is never sent)")]
    Nul,
    /// A nested or unsupported value where a scalar was expected.
    #[error("unsupported value type {0}")]
    Unsupported(String),
}

/// Random access to the cells of the current row, in header order.
pub trait Cells {
    /// Number of cells.
    fn len(&self) -> usize;
    /// True when the row has no cells.
    fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The cell at `index` (a missing index is [`Cell::Null`]).
    fn cell(&self, index: usize) -> Result<Cell<'_>, CellError>;
}

/// One data row, borrowed from its source until the next call to [`RowSource::next_row`].
pub struct Row<'a> {
    /// 1-based data row number within the source (header not counted).
    pub row: u64,
    /// 1-based physical line where the row starts (delimited and NDJSON inputs).
    pub line: Option<u64>,
    /// The cells.
    pub cells: &'a dyn Cells,
}

/// A row that could not be split into cells (wrong field count, unparsable JSON line).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRow {
    /// 1-based data row number.
    pub row: u64,
    /// 1-based line, where known.
    pub line: Option<u64>,
    /// The column at fault, where one is.
    pub column: Option<String>,
    /// Why.
    pub reason: String,
}

/// What [`RowSource::next_row`] yields.
pub enum RowItem<'a> {
    /// A row to map.
    Row(Row<'a>),
    /// A row to reject.
    Bad(BadRow),
}

/// A table inside an export: a header and rows, pulled one at a time.
pub trait RowSource {
    /// Where the rows come from: `s3://bucket/key`, or `s3://bucket/key!member` inside an
    /// archive.
    fn source(&self) -> &str;
    /// Column names in cell order.
    fn header(&self) -> &[String];
    /// The next row, `Ok(None)` at the end. An `Err` means the rest of the object cannot be
    /// read (I/O failure, truncated gzip, a row over the size limit): the run fails.
    fn next_row(&mut self) -> Result<Option<RowItem<'_>>, ReadError>;
}

/// Why an export cannot be read at all (the run fails and changes no state).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// The bytes match no format we read.
    #[error("{source_name}: unknown format: {detail}")]
    UnknownFormat {
        /// The object.
        source_name: String,
        /// What was seen.
        detail: String,
    },
    /// The route (or a suffix) declares one format or compression and the bytes say another.
    #[error("{source_name}: the route declares {declared} but the object is {found}")]
    Mismatch {
        /// The object.
        source_name: String,
        /// What was declared.
        declared: String,
        /// What the bytes are.
        found: String,
    },
    /// Reading or decompressing failed (a truncated gzip ends here).
    #[error("{source_name}: {step} failed: {error}")]
    Io {
        /// The object.
        source_name: String,
        /// The step (`gzip decompression`, `reading`, `spilling to a temp file`, ...).
        step: &'static str,
        /// The cause.
        error: std::io::Error,
    },
    /// A size bound was hit.
    #[error("{source_name}: {limit} of {bytes} bytes exceeded{}", at.map(|r| format!(" at row {r}")).unwrap_or_default())]
    LimitExceeded {
        /// The object.
        source_name: String,
        /// The limit's name (`max_row_bytes`, `max_decompressed_bytes`).
        limit: &'static str,
        /// Its value.
        bytes: u64,
        /// The row being read, when known.
        at: Option<u64>,
    },
    /// A column the route reads appears more than once in the header.
    #[error(
        "{source_name}: column {column:?} appears {count} times in the header: which one the route means is ambiguous"
    )]
    AmbiguousColumn {
        /// The object.
        source_name: String,
        /// The column.
        column: String,
        /// How many header fields match it.
        count: usize,
    },
    /// The export holds no table at all (an empty archive, an archive of only links or
    /// folders, a marker folder without parts).
    #[error("{source_name}: the export holds no table ({detail})")]
    NoTable {
        /// The object or folder.
        source_name: String,
        /// What was found instead.
        detail: String,
    },
    /// A table has a header and no rows, and the route does not say `allow_empty = true`.
    #[error(
        "{source_name}: the export has a header but no rows; set allow_empty = true on the route if an empty export is expected"
    )]
    EmptyExport {
        /// The export.
        source_name: String,
    },
    /// A third-party decoder panicked on this file (a malformed page, say): the file is
    /// corrupt and will not read on a retry.
    #[error("{source_name}: the {decoder} decoder failed on malformed data: {message}")]
    DecoderPanic {
        /// The object.
        source_name: String,
        /// Which decoder.
        decoder: &'static str,
        /// The panic message.
        message: String,
    },
    /// A required column is not in the header.
    #[error("{source_name}: column {column:?} is missing from the header")]
    MissingColumn {
        /// The object.
        source_name: String,
        /// The column.
        column: String,
    },
    /// The delimited reader failed.
    #[error("{source_name}: line {line}: {message}")]
    Delimited {
        /// The object.
        source_name: String,
        /// The line.
        line: u64,
        /// What failed.
        message: String,
    },
    /// A JSON array cannot be followed past this element.
    #[error("{source_name}: row {row}: {message}")]
    Json {
        /// The object.
        source_name: String,
        /// The element.
        row: u64,
        /// What failed.
        message: String,
    },
    /// A Parquet part cannot be read.
    #[error("{source_name}: Parquet: {message}")]
    Parquet {
        /// The object.
        source_name: String,
        /// What failed.
        message: String,
    },
    /// A zip or tar archive cannot be read.
    #[error("{source_name}: archive: {message}")]
    Archive {
        /// The object.
        source_name: String,
        /// What failed.
        message: String,
    },
}

impl ReadError {
    pub(crate) fn io(source_name: &str, step: &'static str, error: std::io::Error) -> Self {
        // Our own limit errors travel through io::Error; surface them as such.
        if let Some(limit) = error
            .get_ref()
            .and_then(|e| e.downcast_ref::<limit::LimitHit>())
        {
            return ReadError::LimitExceeded {
                source_name: source_name.to_string(),
                limit: limit.limit,
                bytes: limit.bytes,
                at: None,
            };
        }
        ReadError::Io {
            source_name: source_name.to_string(),
            step,
            error,
        }
    }
}

/// Reads one export object and calls `visit` once for each table in it (one for a plain
/// file; one per member of a zip or tar). `name` is the object's address, used for suffixes
/// and in every error and reject. The visitor's own error type must absorb [`ReadError`].
pub fn read_export<R, E>(
    reader: R,
    name: &str,
    opts: &ReadOptions,
    visit: &mut dyn FnMut(&mut dyn RowSource) -> Result<(), E>,
) -> Result<(), E>
where
    R: Read,
    E: From<ReadError>,
{
    let budget = limit::Budget::new(opts.limits.max_decompressed_bytes);
    let mut layers = format::Layers {
        opts,
        budget: &budget,
        visit,
    };
    layers.open(format::Layer {
        reader: Box::new(reader),
        name,
        source: name,
        expect: opts.compression,
        depth: 0,
    })
}

#[cfg(any(test, feature = "test-util"))]
/// Collects every row of an object as text (`None` for null), for tests and debugging: not
/// for large inputs.
pub fn read_all_text(
    reader: impl Read,
    name: &str,
    opts: &ReadOptions,
) -> Result<Vec<TextTable>, ReadError> {
    let mut tables = Vec::new();
    read_export(reader, name, opts, &mut |src: &mut dyn RowSource| {
        let mut t = TextTable {
            source: src.source().to_string(),
            header: src.header().to_vec(),
            rows: Vec::new(),
            bad: Vec::new(),
        };
        while let Some(item) = src.next_row()? {
            match item {
                RowItem::Row(r) => {
                    let mut vals = Vec::with_capacity(r.cells.len());
                    for i in 0..r.cells.len() {
                        vals.push(match r.cells.cell(i) {
                            Ok(c) => cell_text(&c),
                            Err(e) => Some(format!("<{e}>")),
                        });
                    }
                    t.rows.push(vals);
                }
                RowItem::Bad(b) => t.bad.push(b),
            }
        }
        tables.push(t);
        Ok::<(), ReadError>(())
    })?;
    Ok(tables)
}

#[cfg(any(test, feature = "test-util"))]
/// A table read whole as text, see [`read_all_text`].
#[derive(Debug, Clone, PartialEq)]
pub struct TextTable {
    /// The source.
    pub source: String,
    /// The header.
    pub header: Vec<String>,
    /// The rows, `None` for null.
    pub rows: Vec<Vec<Option<String>>>,
    /// Rows that could not be split.
    pub bad: Vec<BadRow>,
}

/// A cell as display text (`None` for null).
pub fn cell_text(c: &Cell<'_>) -> Option<String> {
    match c {
        Cell::Null => None,
        Cell::Str(s) => Some((*s).to_string()),
        Cell::Bool(b) => Some(b.to_string()),
        Cell::Int(i) => Some(i.to_string()),
        Cell::Float(f) => Some(f.to_string()),
        Cell::Decimal { unscaled, scale } => Some(crate::vocab::decimal_text(*unscaled, *scale)),
        Cell::Date(d) => Some(d.format("%Y-%m-%d").to_string()),
        Cell::Timestamp(t) => Some(t.to_rfc3339_opts(chrono::SecondsFormat::AutoSi, true)),
    }
}
