//! Arrow record batches → one Parquet part in memory, Snappy-compressed (never zstd, which
//! Amperity cannot read), Parquet format 1.0 pages for the widest reader support, with the
//! part's lineage in the file's key-value metadata.

use arrow_array::RecordBatch;
use arrow_schema::SchemaRef;
use parquet::arrow::ArrowWriter;
use parquet::basic::Compression;
use parquet::file::metadata::KeyValue;
use parquet::file::properties::{EnabledStatistics, WriterProperties, WriterVersion};
use parquet::schema::types::ColumnPath;

/// Default rows per Parquet row group.
pub const ROW_GROUP_ROWS: usize = 128 * 1024;

/// Why a part cannot be encoded.
#[derive(Debug, thiserror::Error)]
#[error("encoding Parquet failed: {0}")]
pub struct EncodeError(#[from] parquet::errors::ParquetError);

/// The writer settings every part uses.
pub fn writer_properties(
    metadata: Vec<(String, String)>,
    row_group_rows: usize,
) -> WriterProperties {
    WriterProperties::builder()
        .set_writer_version(WriterVersion::PARQUET_1_0)
        .set_compression(Compression::SNAPPY)
        .set_max_row_group_row_count(Some(row_group_rows.max(1)))
        .set_statistics_enabled(EnabledStatistics::Chunk)
        // High-cardinality columns (user ids, emails) give up on a dictionary sooner; the
        // low-cardinality ones (campaigns, names, time zones) stay well under this.
        .set_dictionary_page_size_limit(256 * 1024)
        // `id` is unique within a part: a dictionary would only be built to be abandoned.
        .set_column_dictionary_enabled(ColumnPath::from("id"), false)
        .set_created_by(format!("currents-normalize {}", env!("CARGO_PKG_VERSION")))
        .set_key_value_metadata(Some(
            metadata
                .into_iter()
                .map(|(k, v)| KeyValue::new(k, v))
                .collect(),
        ))
        .build()
}

/// Writes one part.
pub struct PartWriter {
    writer: ArrowWriter<Vec<u8>>,
}

impl PartWriter {
    /// Starts a part with the table's schema, lineage metadata and row group size.
    pub fn new(
        schema: SchemaRef,
        metadata: Vec<(String, String)>,
        row_group_rows: usize,
    ) -> Result<Self, EncodeError> {
        let props = writer_properties(metadata, row_group_rows);
        let writer = ArrowWriter::try_new(Vec::new(), schema, Some(props))?;
        Ok(Self { writer })
    }

    /// Appends a batch.
    pub fn write(&mut self, batch: &RecordBatch) -> Result<(), EncodeError> {
        self.writer.write(batch)?;
        Ok(())
    }

    /// Finishes the file and returns its bytes.
    pub fn finish(self) -> Result<Vec<u8>, EncodeError> {
        Ok(self.writer.into_inner()?)
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
        let bytes = w.finish().unwrap();
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
}
