//! One Currents object, end to end: key → container → plan → rows → Parquet part (row groups
//! in memory while the part is small, spooled to a file past that), with where the part goes. Synchronous; the handler does
//! the object I/O. An error about the input is permanent for that object (the same bytes fail
//! the same way) and sends it to quarantine; an internal error (Parquet/Arrow, the spool file)
//! is not the input's fault and is retried ([`ConvertError::is_internal`]). Nothing is written
//! for a failed object.

use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use arrow_avro::reader::Decoder;

use crate::container::{Container, DecodeError, Limits};
use crate::datum::DatumError;
use crate::encode::{EncodeError, Part, PartWriter};
use crate::key::{CurrentsKey, KeyError};
use crate::normalize::{FileContext, NormalizeError, NormalizeStats, Normalizer, Plan};
use crate::partition::{PartId, PartLocation};
use crate::profile_feed::FeedCollector;
use crate::registry::Registry;
use crate::schema::{SchemaError, WriterSchema};

/// Settings for converting objects.
#[derive(Debug, Clone)]
pub struct ConvertOptions {
    /// Size guards.
    pub limits: Limits,
    /// Rows per Arrow batch handed to the Parquet writer.
    pub batch_rows: usize,
    /// Rows per Parquet row group.
    pub row_group_rows: usize,
    /// Folder a part moves to once it outgrows `part_memory_bytes` while it is written
    /// (`None`: always in memory). Default: the system temp folder (`/tmp` under Lambda,
    /// whose ephemeral storage must hold the largest part).
    pub spool_dir: Option<PathBuf>,
    /// Bytes of a part kept in memory before it moves to `spool_dir` (0: straight to the
    /// spool file). Default [`crate::encode::MEMORY_PART_BYTES`].
    pub part_memory_bytes: usize,
}

impl Default for ConvertOptions {
    fn default() -> Self {
        Self {
            limits: Limits::default(),
            batch_rows: 2048,
            row_group_rows: crate::encode::ROW_GROUP_ROWS,
            spool_dir: Some(std::env::temp_dir()),
            part_memory_bytes: crate::encode::MEMORY_PART_BYTES,
        }
    }
}

/// A converted object.
#[derive(Debug)]
pub struct Converted {
    /// Event type.
    pub event_type: String,
    /// Where the part goes.
    pub location: PartLocation,
    /// True when the event type is not in the registry (generic table).
    pub unregistered: bool,
    /// The table's registry version.
    pub registry_version: u32,
    /// The block codec of the source.
    pub codec: &'static str,
    /// The Parquet part; `None` when the file held no rows.
    pub parquet: Option<Part>,
    /// Counts.
    pub stats: NormalizeStats,
    /// The profile changes of a `users.UserDeleteRequest`, `users.UserOrphan` or
    /// `users.profile.Update` object ([`crate::profile_feed`]); `None` for other types.
    pub feed: Option<FeedCollector>,
}

/// Why an object cannot be converted: permanent for the input's faults, retryable for internal
/// ones (see [`ConvertError::is_internal`]).
#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    /// The key is not a Currents key.
    #[error("key: {0}")]
    Key(#[from] KeyError),
    /// The bytes are not a readable container.
    #[error("decode: {0}")]
    Decode(#[from] DecodeError),
    /// The writer schema is not usable.
    #[error("schema: {0}")]
    Schema(#[from] SchemaError),
    /// Records do not fit the table.
    #[error("normalize: {0}")]
    Normalize(NormalizeError),
    /// Parquet encoding failed.
    #[error("encode: {0}")]
    Encode(#[from] EncodeError),
}

impl ConvertError {
    /// True when the failure is not the input's fault (the Parquet/Arrow writer, the spool
    /// file, a value that does not fit the column its plan chose): the object is retried, not
    /// quarantined.
    pub fn is_internal(&self) -> bool {
        matches!(
            self,
            ConvertError::Encode(_)
                | ConvertError::Normalize(NormalizeError::Sink(_))
                | ConvertError::Normalize(NormalizeError::Datum {
                    error: DatumError::Mismatch,
                    ..
                })
        )
    }

    /// The step that failed, for quarantine reasons and metrics.
    pub fn step(&self) -> &'static str {
        match self {
            ConvertError::Key(_) => "key",
            ConvertError::Decode(_) => "decode",
            ConvertError::Schema(_) => "schema",
            ConvertError::Normalize(NormalizeError::Container(_)) => "decode",
            ConvertError::Normalize(NormalizeError::Schema(_)) => "schema",
            ConvertError::Normalize(NormalizeError::Contradiction { .. })
            | ConvertError::Normalize(NormalizeError::EventTypeMismatch { .. }) => "registry",
            ConvertError::Normalize(_) => "normalize",
            ConvertError::Encode(_) => "encode",
        }
    }
}

impl From<NormalizeError> for ConvertError {
    fn from(e: NormalizeError) -> Self {
        match e {
            NormalizeError::Container(d) => ConvertError::Decode(d),
            NormalizeError::Schema(s) => ConvertError::Schema(s),
            other => ConvertError::Normalize(other),
        }
    }
}

/// A writer schema compiled for one event type: its plan and an `arrow-avro` decoder. Braze
/// writes the same schema into every file of an event type, so parsing it, planning it
/// against the registry and building the decoder are done once per thread and schema, not
/// once per file (a 15,000-event file is small enough for that set-up to show).
struct Compiled {
    key: CompiledKey,
    plan: Arc<Plan>,
    decoder: Decoder,
}

/// What a compiled schema is looked up by: the schema text (hash), the event type and the
/// batch size. It is used only while the registry still holds the very table it was planned
/// against (the plan keeps that table alive, so its address cannot be reused meanwhile).
type CompiledKey = (u128, String, usize);

/// Idle compiled schemas of this thread, at most [`MAX_COMPILED`].
const MAX_COMPILED: usize = 64;

/// Idle compiled schemas by key.
type Idle = HashMap<CompiledKey, Vec<(Arc<Plan>, Decoder)>>;

thread_local! {
    static COMPILED: RefCell<Idle> = RefCell::new(HashMap::new());
}

impl Compiled {
    /// An idle compiled schema of this thread, or a new one.
    fn take(
        schema_json: &str,
        event_type: &str,
        registry: &Registry,
        opts: &ConvertOptions,
    ) -> Result<Self, ConvertError> {
        let key: CompiledKey = (
            xxhash_rust::xxh3::xxh3_128(schema_json.as_bytes()),
            event_type.to_string(),
            opts.batch_rows,
        );
        let table = registry
            .get(event_type)
            .unwrap_or_else(|| registry.other_events());
        let idle = COMPILED.with(|c| c.borrow_mut().get_mut(&key).and_then(Vec::pop));
        if let Some((plan, decoder)) = idle
            && Arc::ptr_eq(plan.table(), table)
        {
            return Ok(Self { key, plan, decoder });
        }
        let schema = WriterSchema::parse(schema_json)?;
        let plan = Arc::new(Plan::new(schema, event_type, registry)?);
        let decoder = plan.decoder(opts.batch_rows)?;
        Ok(Self { key, plan, decoder })
    }

    /// Keeps this compiled schema for the next file of this thread.
    fn give_back(self) {
        COMPILED.with(|c| {
            let mut c = c.borrow_mut();
            if c.values().map(Vec::len).sum::<usize>() >= MAX_COMPILED {
                c.clear();
            }
            c.entry(self.key)
                .or_default()
                .push((self.plan, self.decoder));
        });
    }
}

/// Converts one object's bytes. `source_key` is the object key (lineage and part id).
pub fn convert(
    bytes: &[u8],
    source_key: &str,
    key: &CurrentsKey,
    registry: &Registry,
    opts: &ConvertOptions,
) -> Result<Converted, ConvertError> {
    let container = Container::open(bytes, opts.limits)?;
    let compiled = Compiled::take(container.schema_json, &key.event_type, registry, opts)?;
    let plan = compiled.plan.clone();
    let table = plan.table().clone();
    let ctx = FileContext {
        event_type: key.event_type.clone(),
        source_key: source_key.to_string(),
        delivery_hour_micros: key.delivery.timestamp_micros(),
        schema_id: key.schema_id,
        schema_version: key.schema_version,
    };
    let metadata = vec![
        ("currents.source_key".to_string(), source_key.to_string()),
        ("currents.event_type".to_string(), key.event_type.clone()),
        ("currents.table".to_string(), table.table.clone()),
        (
            "currents.registry_version".to_string(),
            table.version.to_string(),
        ),
    ];
    let mut writer = PartWriter::spooled_after(
        table.schema.clone(),
        metadata,
        opts.row_group_rows,
        opts.spool_dir.as_deref(),
        opts.part_memory_bytes,
    )?;
    // A part is a fraction of its object (a fifth of an uncompressed one): room for a quarter
    // spares copying it as it grows.
    writer.reserve(bytes.len() / 4);
    // A rough row estimate (Currents events are a few hundred bytes) sizes the id set.
    let expected_rows = (bytes.len() / 256).clamp(16, 200_000);
    let normalizer = Normalizer::new(&plan, ctx, opts.batch_rows, expected_rows);
    let mut feed = FeedCollector::for_event_type(&key.event_type);
    let mut compiled = compiled;
    let stats = normalizer.run_with(&container, &mut compiled.decoder, |batch| {
        if let Some(f) = feed.as_mut() {
            f.observe(&batch);
        }
        writer.write(&batch).map_err(|e| e.to_string())
    })?;
    // Only a decoder that finished its file cleanly is kept for the next one.
    compiled.give_back();
    let parquet = if stats.rows_out > 0 {
        Some(writer.finish()?)
    } else {
        None
    };
    Ok(Converted {
        event_type: key.event_type.clone(),
        location: PartLocation {
            table: table.table.clone(),
            day: key.delivery.day,
            id: PartId::for_source(source_key),
        },
        unregistered: table.generic,
        registry_version: table.version,
        codec: container.codec.name(),
        parquet,
        stats,
        feed,
    })
}
