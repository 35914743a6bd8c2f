//! Arrow record batches → one Parquet part, Snappy-compressed (never zstd, which Amperity
//! cannot read), Parquet format 1.0 pages for the widest reader support, with the part's
//! lineage in the file's key-value metadata. Row groups are written out as they fill, to
//! memory while the part is small (a Braze-sized file's part never touches the disk) and to a
//! spool file once it outgrows [`MEMORY_PART_BYTES`] (so a large object's output is never held
//! in memory next to its input), or always to memory when no spool folder is given.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use arrow_array::RecordBatch;
use arrow_schema::{DataType, Schema, SchemaRef};
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use parquet::schema::types::ColumnPath;

/// Default rows per Parquet row group.
pub const ROW_GROUP_ROWS: usize = 128 * 1024;

/// A row group is closed early once its encoded data in memory reaches this size.
pub const MAX_ROW_GROUP_BYTES: usize = 128 << 20;

/// A part is kept in memory up to this size, then moved to its spool file.
pub const MEMORY_PART_BYTES: usize = 32 << 20;

/// Why a part cannot be encoded. Never the input's fault: the same object converts when
/// tried again (a full disk, a writer bug), so the handler retries instead of quarantining.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The Parquet writer failed.
    #[error("encoding Parquet failed: {0}")]
    Parquet(#[from] parquet::errors::ParquetError),
    /// The spool file could not be created, written or read back.
    #[error("spool file {path}: {source}")]
    Spool {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        source: std::io::Error,
    },
}

/// A spool file, removed when dropped.
#[derive(Debug)]
struct SpoolFile {
    path: PathBuf,
}

impl Drop for SpoolFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Where a part's bytes go while it is written.
enum Sink {
    /// In memory; moved to a spool file in `spill.dir` once it would exceed `spill.after`.
    Memory {
        bytes: Vec<u8>,
        spill: Option<Spill>,
    },
    File(BufWriter<File>, SpoolFile),
    /// Moving to the spool file failed: every further write fails with this.
    Failed {
        path: PathBuf,
        kind: std::io::ErrorKind,
        message: String,
    },
}

/// Where and when an in-memory part moves to a spool file.
struct Spill {
    dir: PathBuf,
    after: usize,
}

impl Sink {
    fn failure(&self) -> Option<std::io::Error> {
        match self {
            Sink::Failed { kind, message, .. } => Some(std::io::Error::new(*kind, message.clone())),
            _ => None,
        }
    }

    /// The spool error behind a failed write, when moving to the spool file was the cause.
    fn spool_error(&self) -> Option<EncodeError> {
        match self {
            Sink::Failed { path, .. } => Some(EncodeError::Spool {
                path: path.clone(),
                source: self.failure()?,
            }),
            _ => None,
        }
    }

    /// Moves the in-memory bytes to a new spool file (once, when they outgrow the memory).
    fn spill(&mut self, incoming: usize) {
        let Sink::Memory {
            bytes,
            spill: Some(spill),
        } = self
        else {
            return;
        };
        if bytes.len().saturating_add(incoming) <= spill.after {
            return;
        }
        let moved = spool_file(&spill.dir).and_then(|(mut w, f)| {
            w.write_all(bytes).map_err(|source| EncodeError::Spool {
                path: f.path.clone(),
                source,
            })?;
            Ok((w, f))
        });
        *self = match moved {
            Ok((w, f)) => Sink::File(w, f),
            Err(EncodeError::Spool { path, source }) => Sink::Failed {
                kind: source.kind(),
                message: format!("spool file {}: {source}", path.display()),
                path,
            },
            Err(other) => Sink::Failed {
                path: spill.dir.clone(),
                kind: std::io::ErrorKind::Other,
                message: other.to_string(),
            },
        };
    }
}

impl Write for Sink {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.spill(buf.len());
        match self {
            Sink::Memory { bytes, .. } => bytes.write(buf),
            Sink::File(f, _) => f.write(buf),
            Sink::Failed { kind, message, .. } => Err(std::io::Error::new(*kind, message.clone())),
        }
    }

    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Sink::Memory { .. } => Ok(()),
            Sink::File(f, _) => f.flush(),
            Sink::Failed { kind, message, .. } => Err(std::io::Error::new(*kind, message.clone())),
        }
    }
}

/// A finished part: its bytes in memory or in a spool file (removed when the part is dropped).
#[derive(Debug)]
pub struct Part {
    bytes: Option<Vec<u8>>,
    file: Option<SpoolFile>,
    len: u64,
}

impl Part {
    /// Size in bytes.
    pub fn len(&self) -> u64 {
        self.len
    }

    /// True when the part has no bytes (never, for a finished Parquet file).
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The part's bytes (read back from the spool file, which is then removed).
    pub fn into_bytes(mut self) -> Result<Vec<u8>, EncodeError> {
        if let Some(b) = self.bytes.take() {
            return Ok(b);
        }
        match self.file.take() {
            Some(f) => std::fs::read(&f.path).map_err(|source| EncodeError::Spool {
                path: f.path.clone(),
                source,
            }),
            None => Ok(Vec::new()),
        }
    }
}

static SPOOL_SEQ: AtomicU64 = AtomicU64::new(0);

fn spool_file(dir: &Path) -> Result<(BufWriter<File>, SpoolFile), EncodeError> {
    let path = dir.join(format!(
        "currents-part-{}-{}.parquet.tmp",
        std::process::id(),
        SPOOL_SEQ.fetch_add(1, Ordering::Relaxed)
    ));
    let file = File::create(&path).map_err(|source| EncodeError::Spool {
        path: path.clone(),
        source,
    })?;
    Ok((BufWriter::with_capacity(1 << 20, file), SpoolFile { path }))
}

/// A column's dictionary is given up (the rest of its row group written plain) once its
/// values reach this many bytes.
pub const DICTIONARY_PAGE_BYTES: usize = 64 * 1024;

/// The writer settings every part of `schema` uses.
///
/// - Snappy, Parquet 1.0 pages (the widest reader support; Amperity cannot read zstd).
/// - Dictionary encoding for every column but `id`, given up per column and row group at
///   [`DICTIONARY_PAGE_BYTES`]: low-cardinality text (campaign and canvas ids and names, time
///   zones, platforms, the lineage columns) stays far below it, and high-cardinality text
///   (user ids, emails, device ids) gives up after its first two write batches instead of
///   hashing thousands of values into a dictionary that is then abandoned.
/// - Chunk statistics (min, max, null count) on number, boolean and timestamp columns;
///   none on text columns, whose byte-wise min and max cost two comparisons per value and
///   prune nothing for ids, names and JSON (the null count is still in every page header).
pub fn writer_properties(
    schema: &Schema,
    metadata: Vec<(String, String)>,
    row_group_rows: usize,
) -> WriterProperties {
    let mut b = WriterProperties::builder()
        .set_writer_version(WriterVersion::PARQUET_1_0)
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(row_group_rows.max(1)))
        .set_statistics_enabled(EnabledStatistics::Chunk)
        .set_dictionary_page_size_limit(DICTIONARY_PAGE_BYTES)
        // `id` is unique within a part: a dictionary would only be built to be abandoned.
        .set_column_dictionary_enabled(ColumnPath::from("id"), false)
        .set_created_by(format!("currents-normalize {}", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(Some(
            metadata
                .into_iter()
                .map(|(k, v)| KeyValue::new(k, v))
                .collect(),
        ));
    for f in schema.fields() {
        if matches!(f.data_type(), DataType::Utf8 | DataType::LargeUtf8) {
            b = b.set_column_statistics_enabled(
                ColumnPath::from(f.name().as_str()),
                EnabledStatistics::None,
            );
        }
    }
    b.build()
}

/// Writes one part.
pub struct PartWriter {
    writer: ArrowWriter<Sink>,
}

impl PartWriter {
    /// Starts a part in memory with the table's schema, lineage metadata and row group size.
    pub fn new(
        schema: SchemaRef,
        metadata: Vec<(String, String)>,
        row_group_rows: usize,
    ) -> Result<Self, EncodeError> {
        Self::spooled(schema, metadata, row_group_rows, None)
    }

    /// Starts a part kept in memory up to [`MEMORY_PART_BYTES`], then moved to a new spool
    /// file in `dir` (always in memory when `None`).
    pub fn spooled(
        schema: SchemaRef,
        metadata: Vec<(String, String)>,
        row_group_rows: usize,
        dir: Option<&Path>,
    ) -> Result<Self, EncodeError> {
        Self::spooled_after(schema, metadata, row_group_rows, dir, MEMORY_PART_BYTES)
    }

    /// [`Self::spooled`], moving to the spool file once the part would exceed `memory_bytes`
    /// (0: the spool file is created right away).
    pub fn spooled_after(
        schema: SchemaRef,
        metadata: Vec<(String, String)>,
        row_group_rows: usize,
        dir: Option<&Path>,
        memory_bytes: usize,
    ) -> Result<Self, EncodeError> {
        let props = writer_properties(&schema, metadata, row_group_rows);
        let sink = match dir {
            Some(d) if memory_bytes == 0 => {
                let (w, f) = spool_file(d)?;
                Sink::File(w, f)
            }
            dir => Sink::Memory {
                bytes: Vec::new(),
                spill: dir.map(|d| Spill {
                    dir: d.to_path_buf(),
                    after: memory_bytes,
                }),
            },
        };
        let writer = ArrowWriter::try_new(sink, schema, Some(props))?;
        Ok(Self { writer })
    }

    /// Makes room for a part of about `bytes` while it is kept in memory (up to the size at
    /// which it moves to its spool file), so the part is not copied as it grows.
    pub fn reserve(&mut self, bytes: usize) {
        if let Sink::Memory { bytes: buf, spill } = self.writer.inner_mut() {
            let cap = spill.as_ref().map_or(bytes, |s| bytes.min(s.after));
            buf.reserve(cap.saturating_sub(buf.len()));
        }
    }

    /// A Parquet error, or the spool error behind it.
    fn error(&self, e: parquet::errors::ParquetError) -> EncodeError {
        self.writer
            .inner()
            .spool_error()
            .unwrap_or(EncodeError::Parquet(e))
    }

    /// Appends a batch; closes the row group early once it holds `MAX_ROW_GROUP_BYTES` of
    /// encoded data, so wide rows do not pile up in memory.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), EncodeError> {
        self.writer.write(batch).map_err(|e| self.error(e))?;
        if self.writer.in_progress_size() >= MAX_ROW_GROUP_BYTES {
            self.writer.flush().map_err(|e| self.error(e))?;
        }
        Ok(())
    }

    /// Finishes the file. (A spool file that cannot take the footer fails as a Parquet error
    /// naming the spool file.)
    pub fn finish(mut self) -> Result<Part, EncodeError> {
        self.writer.flush().map_err(|e| self.error(e))?;
        match self.writer.into_inner()? {
            Sink::Memory { bytes, .. } => Ok(Part {
                len: bytes.len() as u64,
                bytes: Some(bytes),
                file: None,
            }),
            Sink::Failed {
                path,
                kind,
                message,
            } => Err(EncodeError::Spool {
                path,
                source: std::io::Error::new(kind, message),
            }),
            Sink::File(w, f) => {
                let spool_err = |source| EncodeError::Spool {
                    path: f.path.clone(),
                    source,
                };
                let file = w.into_inner().map_err(|e| spool_err(e.into_error()))?;
                file.sync_data().map_err(spool_err)?;
                let len = file.metadata().map_err(spool_err)?.len();
                Ok(Part {
                    bytes: None,
                    file: Some(f),
                    len,
                })
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use arrow_array::{ArrayRef, Int64Array, StringArray};
    use arrow_schema::{DataType, Field, Schema};
    use parquet::file::reader::{FileReader, SerializedFileReader};
    use std::sync::Arc;

    #[test]
    fn parts_are_snappy_with_lineage_metadata() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("n", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["a", "b"])) as ArrayRef,
                Arc::new(Int64Array::from(vec![Some(1), None])),
            ],
        )
        .unwrap();
        let mut w = PartWriter::new(
            schema,
            vec![("currents.source_key".into(), "k".into())],
            ROW_GROUP_ROWS,
        )
        .unwrap();
        w.write(&batch).unwrap();
        let bytes = w.finish().unwrap().into_bytes().unwrap();
        let r = SerializedFileReader::new(bytes::Bytes::from(bytes)).unwrap();
        let md = r.metadata();
        assert_eq!(md.file_metadata().num_rows(), 2);
        let col = md.row_group(0).column(0);
        assert_eq!(col.compression(), Compression::SNAPPY);
        let kv = md.file_metadata().key_value_metadata().unwrap();
        assert!(
            kv.iter()
                .any(|k| k.key == "currents.source_key" && k.value.as_deref() == Some("k"))
        );
    }

    #[test]
    fn text_columns_have_no_statistics_and_id_no_dictionary() {
        let schema = Arc::new(Schema::new(vec![
            Field::new("id", DataType::Utf8, false),
            Field::new("name", DataType::Utf8, true),
            Field::new("n", DataType::Int64, true),
        ]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![
                Arc::new(StringArray::from(vec!["a", "b", "c"])) as ArrayRef,
                Arc::new(StringArray::from(vec![Some("x"), None, Some("x")])),
                Arc::new(Int64Array::from(vec![Some(1), None, Some(3)])),
            ],
        )
        .unwrap();
        let mut w = PartWriter::new(schema, vec![], ROW_GROUP_ROWS).unwrap();
        w.write(&batch).unwrap();
        let bytes = w.finish().unwrap().into_bytes().unwrap();
        let r = SerializedFileReader::new(bytes::Bytes::from(bytes)).unwrap();
        let rg = r.metadata().row_group(0);
        let (id, name, n) = (rg.column(0), rg.column(1), rg.column(2));
        assert!(id.statistics().is_none() && name.statistics().is_none());
        let stats = n.statistics().unwrap();
        assert_eq!(stats.null_count_opt(), Some(1));
        assert!(stats.min_bytes_opt().is_some() && stats.max_bytes_opt().is_some());
        assert!(id.dictionary_page_offset().is_none());
        assert!(name.dictionary_page_offset().is_some());
    }

    #[test]
    fn spooled_parts_are_the_same_bytes_and_their_file_is_removed() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, true)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from_iter_values(0..10_000)) as ArrayRef],
        )
        .unwrap();
        let dir = std::env::temp_dir();
        let mut mem = PartWriter::new(schema.clone(), vec![], 1000).unwrap();
        let mut spooled =
            PartWriter::spooled_after(schema, vec![], 1000, Some(&dir), 1024).unwrap();
        mem.write(&batch).unwrap();
        spooled.write(&batch).unwrap();
        let mem = mem.finish().unwrap();
        let spooled = spooled.finish().unwrap();
        assert_eq!(mem.len(), spooled.len());
        let path = spooled.file.as_ref().unwrap().path.clone();
        assert!(path.exists());
        assert_eq!(mem.into_bytes().unwrap(), spooled.into_bytes().unwrap());
        assert!(!path.exists(), "spool file removed");
    }

    #[test]
    fn a_small_part_stays_in_memory() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, true)]));
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from_iter_values(0..10_000)) as ArrayRef],
        )
        .unwrap();
        let dir = Path::new("/nonexistent/currents-spool");
        let mut w = PartWriter::spooled(schema, vec![], 1000, Some(dir)).unwrap();
        w.write(&batch).unwrap();
        let part = w.finish().unwrap();
        assert!(part.file.is_none());
        assert!(!part.is_empty());
    }

    #[test]
    fn an_unwritable_spool_folder_is_an_encode_error() {
        let schema = Arc::new(Schema::new(vec![Field::new("n", DataType::Int64, true)]));
        let dir = Path::new("/nonexistent/currents-spool");
        let err = PartWriter::spooled_after(schema.clone(), vec![], 1000, Some(dir), 0)
            .err()
            .unwrap();
        assert!(matches!(err, EncodeError::Spool { .. }), "{err}");
        // A part that outgrows the memory fails the same way when it moves to the folder.
        let batch = RecordBatch::try_new(
            schema.clone(),
            vec![Arc::new(Int64Array::from_iter_values(0..10_000)) as ArrayRef],
        )
        .unwrap();
        let mut w = PartWriter::spooled_after(schema, vec![], 1000, Some(dir), 1024).unwrap();
        let err = w
            .write(&batch)
            .and_then(|()| w.finish().map(|_| ()))
            .err()
            .unwrap();
        assert!(matches!(err, EncodeError::Spool { .. }), "{err}");
    }
}
