//! An export as both diffs see it: its [`Part`]s, the [`ProduceOptions`] a run plans with, a
//! request to [`Stop`], what the diff counted ([`Summary`]) and how it fails ([`SyncError`],
//! [`SpillOverflow`] when the bounded diff's spill outgrows the local storage). Both the
//! in-memory and the bounded diff speak these; neither imports the other.

use bridge_shared::StoreError;
use serde::Serialize;

use crate::config::route::Route;
use crate::diff::user::AudienceDepartures;
use crate::read::ReadError;

/// Counts of one run's planning.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Summary {
    /// Data rows read (good and bad).
    pub rows_read: u64,
    /// Rows rejected.
    pub rejected: u64,
    /// Rows whose user had nothing to change.
    pub unchanged: u64,
    /// Of those, users whose row digest the state records anew (same values from other
    /// cells, or a state written before digests): nothing is sent, the next run skips them
    /// without mapping.
    pub digests_recorded: u64,
    /// Users with at least one change (new users included, departures not).
    pub users_changed: u64,
    /// Of those, users the state had never confirmed.
    pub users_new: u64,
    /// Attribute changes in all deltas (departures included).
    pub attributes_changed: u64,
    /// Users who left an audience (absent from the export) and get its `on_leave` value.
    pub users_departed: u64,
    /// Departed members whose identifier the state does not hold.
    pub departures_unaddressable: u64,
    /// Rows whose identifier could not be read (unparseable rows, empty or invalid
    /// identifiers): when there are any, departures are held.
    pub rows_without_identifier: u64,
    /// Departures by absence per audience: members before, leaving, sent, held and why.
    pub departures: Vec<AudienceDepartures>,
    /// Tables read (parts, archive members).
    pub tables: u64,
    /// Header columns the route does not map (warned once per run).
    pub ignored_columns: Vec<String>,
}

/// The producer was asked to stop (the receiving side is gone or the run is out of time).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stop(pub String);

/// Why a run's planning failed: nothing of it may be committed.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    /// An object cannot be read (unknown format, truncated gzip, missing identifier column).
    #[error(transparent)]
    Read(#[from] ReadError),
    /// A part could not be opened.
    #[error("opening {uri}: {error}")]
    Open {
        /// The part.
        uri: String,
        /// Why.
        error: StoreError,
    },
    /// The delta callback asked to stop.
    #[error("stopped: {0}")]
    Stopped(String),
    /// The bounded diff's local spill failed (or would outgrow the local storage).
    #[error(transparent)]
    Spill(crate::state::spill::SpillError),
    /// The bounded diff's partition step outgrew the local storage before anything was
    /// diffed or sent, with what it measured so far (a run with a continuation queue fans
    /// the export out from these figures instead of failing).
    #[error(transparent)]
    SpillOverflow(SpillOverflow),
    /// A hash range of the confirmed state could not be loaded.
    #[error("loading state range {range}: {message}")]
    State {
        /// The range.
        range: usize,
        /// Why.
        message: String,
        /// Whether a retry can succeed.
        retryable: bool,
    },
}

impl SyncError {
    /// Whether a retry can succeed (a store hiccup or a stop), as opposed to a file that
    /// will never read.
    pub fn is_retryable(&self) -> bool {
        match self {
            SyncError::Read(ReadError::Io { error, .. }) => {
                error.kind() != std::io::ErrorKind::UnexpectedEof
                    && error.kind() != std::io::ErrorKind::InvalidData
                    && error.kind() != std::io::ErrorKind::InvalidInput
            }
            SyncError::Read(_) => false,
            SyncError::Open { error, .. } => error.is_retryable(),
            SyncError::Stopped(_) => true,
            SyncError::Spill(e) => !matches!(e, crate::state::spill::SpillError::Full { .. }),
            SyncError::SpillOverflow(_) => false,
            SyncError::State { retryable, .. } => *retryable,
        }
    }
}

/// One part of an export: its address and its bytes.
pub struct Part<R> {
    /// `s3://bucket/key` (or a local path).
    pub source: String,
    /// The bytes.
    pub reader: R,
}

/// How to plan a run.
#[derive(Debug, Clone, Default)]
pub struct ProduceOptions {
    /// Resend every non-empty value, ignoring confirmed state (route `full_resend` or a
    /// forced replay).
    pub full_resend: bool,
    /// Send audience removals (and `clear_fields` nulls) for confirmed users absent from this
    /// export, and guard mass unsubscribes, under the departure cap. Only for a complete
    /// export of everyone the route covers.
    pub departures: bool,
    /// The export's name, used as the source of departure deltas.
    pub export_name: String,
    /// Send departures the guard would hold (the operator's release).
    pub allow_departures: bool,
    /// A full resend that may take several invocations salts its row digests with this
    /// ([`crate::diff::digest::seed_for`]): a row whose state records the salted digest was
    /// resent by an earlier invocation of the same replay and is skipped, so a continuation
    /// goes on where the last one stopped instead of resending from the first row. `None`:
    /// a full resend resends every row.
    pub resend_salt: Option<u64>,
}

impl ProduceOptions {
    /// Whether a row whose state records its digest is skipped unmapped: always, unless a
    /// full resend without a salt resends every row.
    pub fn skips_recorded(&self) -> bool {
        !self.full_resend || self.resend_salt.is_some()
    }

    /// Options from the route: its `full_resend`, departures when it tracks them.
    pub fn for_route(route: &Route, export_name: &str) -> Self {
        Self {
            full_resend: route.config.full_resend,
            departures: route.tracks_departures() || route.guards_unsubscribes(),
            export_name: export_name.to_string(),
            allow_departures: false,
            resend_salt: None,
        }
    }
}

/// The partition step's spill outgrew the local storage it may use
/// ([`crate::diff::bounded::RangedSettings::disk_limit`]) before any range was diffed, so nothing was sent; with
/// what it had measured by then, from which the whole export's spill is extrapolated
/// ([`SpillOverflow::projected_spill`]).
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct SpillOverflow {
    /// The limit (bytes).
    pub limit_bytes: u64,
    /// Bytes written to disk when it was reached.
    pub written_bytes: u64,
    /// Rows read so far (every range's).
    pub rows_read: u64,
    /// Rows of this run's ranges spilled so far (all of them, unless `only_ranges`).
    pub rows_spilled: u64,
    /// Bytes of those rows' spill records (framing included, buffered ones too).
    pub record_bytes: u64,
    /// Bytes of the parts read so far, as stored (compressed or not).
    pub source_bytes_read: u64,
    /// The export's parts' bytes in all, as stored (filled by the caller, which knows the
    /// parts' sizes; 0: unknown, no projection).
    pub parts_bytes: u64,
}

impl SpillOverflow {
    /// Spill bytes per row kept, as measured.
    pub fn bytes_per_row(&self) -> f64 {
        self.record_bytes as f64 / self.rows_spilled.max(1) as f64
    }

    /// Rows per byte of the parts as stored, as measured (a compressed part gives more).
    pub fn rows_per_part_byte(&self) -> f64 {
        self.rows_read as f64 / self.source_bytes_read.max(1) as f64
    }

    /// The spill of the whole export (`parts_bytes`) at the measured rates: rows per part
    /// byte × share of rows kept × bytes per row; never less than what was already spilled.
    pub fn projected_spill(&self, parts_bytes: u64) -> u64 {
        let kept = self.rows_spilled as f64 / self.rows_read.max(1) as f64;
        let rows = parts_bytes as f64 * self.rows_per_part_byte();
        let spill = (rows * kept * self.bytes_per_row()) as u64;
        spill.max(self.record_bytes).max(self.written_bytes)
    }
}

impl std::fmt::Display for SpillOverflow {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the export's rows need more than the {} of local storage (/tmp) this function may spill to: {} rows read from {} of its parts spilled {} ({:.0} bytes per row, {:.4} rows per part byte)",
            size_text(self.limit_bytes),
            self.rows_read,
            size_text(self.source_bytes_read),
            size_text(self.record_bytes),
            self.bytes_per_row(),
            self.rows_per_part_byte(),
        )?;
        if self.parts_bytes > 0 {
            let whose = if self.rows_spilled < self.rows_read {
                "this run's ranges of the export"
            } else {
                "the whole export"
            };
            write!(
                f,
                ", about {} for {whose} ({} of parts)",
                size_text(self.projected_spill(self.parts_bytes)),
                size_text(self.parts_bytes)
            )?;
        }
        write!(
            f,
            "; nothing of it was sent. Raise the function's ephemeral storage (EphemeralStorage of BrazeSyncFunction in template.yaml, ephemeralStorageSize in the CDK construct, and BRIDGE_EPHEMERAL_STORAGE_MB with it), run it where a continuation queue (CONTINUATION_QUEUE_URL) lets it fan out, or split the export into smaller parts across runs"
        )
    }
}

/// Bytes as a short text: `812 KB`, `37 MB`, `3.6 GB` (binary units).
pub fn size_text(b: u64) -> String {
    if b >= 1 << 30 {
        format!("{:.1} GB", b as f64 / f64::from(1u32 << 30))
    } else if b >= 1 << 20 {
        format!("{} MB", b.div_ceil(1 << 20))
    } else {
        format!("{} KB", b.div_ceil(1 << 10))
    }
}

impl std::error::Error for SpillOverflow {}
