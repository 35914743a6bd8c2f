//! The boundary with `arrow-avro`: its decoder of single records, built for a writer schema,
//! and the guard that turns a panic inside it into an error for the file.

use arrow_avro::reader::{Decoder, DecoderMode, ReaderBuilder};
use arrow_avro::schema::{AvroSchema, SchemaStore};

use crate::schema::WriterSchema;

/// Runs a call into `arrow-avro` so that a panic inside it (a third-party decoder reading
/// untrusted bytes) becomes an error for this file instead of taking the function down (the
/// release profile unwinds).
pub(super) fn contained<T>(f: impl FnOnce() -> Result<T, String>) -> Result<T, String> {
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(f)) {
        Ok(r) => r,
        Err(panic) => {
            let msg = panic
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_default();
            Err(format!("the Avro decoder panicked: {msg}"))
        }
    }
}

/// An `arrow-avro` decoder of single records (datums) written with `schema`, `batch_rows`
/// records per Arrow batch. The container's framing (blocks, codecs, sync markers and the
/// size guards on them) is [`crate::container`]'s; each record's bytes go to this decoder.
pub fn datum_decoder(schema: &WriterSchema, batch_rows: usize) -> Result<Decoder, String> {
    contained(|| {
        let mut store = SchemaStore::new();
        let fingerprint = store
            .register(AvroSchema::new(schema.arrow_avro_json().to_string()))
            .map_err(|e| e.to_string())?;
        ReaderBuilder::new()
            .with_batch_size(batch_rows.max(1))
            .with_decoder_mode(DecoderMode::UnframedDatum)
            .with_writer_schema_store(store)
            .with_active_fingerprint(fingerprint)
            .build_decoder()
            .map_err(|e| e.to_string())
    })
}
