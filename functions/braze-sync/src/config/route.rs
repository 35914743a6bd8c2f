//! Route configs: one TOML file per configured export stream, naming the key prefix it owns,
//! how its objects are read, which column identifies the user, and which columns become Braze
//! standard profile fields, custom attributes (with Amperity types) and audience memberships.
//! [`RouteConfig`] is the file as written (unknown keys refused); [`Route`] is the validated,
//! compiled form the pipeline uses, with one numbered *slot* per Braze attribute.
//!
//! The departure caps, the `[subscription_groups]` table and the route's `on_leave` are
//! checked, and asked about, in [`consent`].
//!
//! The format is documented field by field in `functions/braze-sync/routes/README.md`; a test
//! keeps that reference in step with the doc comments here.

use std::collections::{BTreeMap, HashMap};

use bridge_shared::S3Uri;
use serde::Deserialize;

use crate::config::export_order::{ExportOrder, OrderBy};
use crate::read;
use crate::vocab::{self, AmperityType, Compression, Format, StandardField};
pub use crate::vocab::{IdentifierKind, OnLeave, SlotKind, StringPolicy};

mod consent;
pub use consent::RouteOnLeave;

/// One route file, as written.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// Route name: names this route's state, reports and rejects folders. Lowercase letters,
    /// digits, `-` and `_`.
    pub name: String,
    /// Bucket the route reads; omit to accept objects from any bucket.
    #[serde(default)]
    pub bucket: Option<String>,
    /// Key prefix the route owns, e.g. `amperity/customers/`. The first route whose prefix
    /// matches a new object's key syncs it.
    pub prefix: String,
    /// `single`: each object is one export. `marker`: an export is every object in a folder,
    /// synced when the marker (`marker_suffix`) lands in it; parts never sync alone.
    #[serde(default)]
    pub mode: Mode,
    /// Marker file suffix in `marker` mode (default `.DONE`).
    #[serde(default = "default_marker")]
    pub marker_suffix: String,
    /// Table format: `csv`, `tsv`, `psv`, `delimited` (with `delimiter`), `json` (array or
    /// NDJSON), `ndjson` or `parquet`. Omit to use the key's suffix, then the bytes.
    #[serde(default)]
    pub format: Option<FormatName>,
    /// Field delimiter for `format = "delimited"` (one ASCII character).
    #[serde(default)]
    pub delimiter: Option<String>,
    /// Escape character for quotes inside quoted fields (e.g. `\`), when the export does not
    /// double them.
    #[serde(default)]
    pub escape: Option<String>,
    /// Compression or archive: `none`, `gzip`, `zip`, `tar` or `tgz`. Omit to take it from
    /// the bytes. A declared value the bytes contradict fails the run.
    #[serde(default)]
    pub compression: Option<CompressionName>,
    /// Which column identifies the Braze user.
    pub identifier: IdentifierConfig,
    /// `_update_existing_only` on every attribute object: `true` (the default, as Amperity
    /// does) updates only users Braze already has; `false` creates missing users.
    #[serde(default = "default_true")]
    pub update_existing_only: bool,
    /// What to do with a string over Braze's 255-character limit: `truncate` (default) cuts
    /// it to 255 characters, `reject` rejects the row.
    #[serde(default)]
    pub string_policy: StringPolicy,
    /// Column → Braze standard profile field (`first_name`, `email`, `dob`, `gender`,
    /// `country`, `language`, `time_zone`, `email_subscribe`, ...).
    #[serde(default)]
    pub fields: BTreeMap<String, String>,
    /// Column → custom attribute, keyed by column name.
    #[serde(default)]
    pub attributes: BTreeMap<String, AttributeConfig>,
    /// Audience memberships, each written as a boolean custom attribute.
    #[serde(default)]
    pub audiences: Vec<AudienceConfig>,
    /// Column → Braze subscription group id: the column holds the user's state in that group
    /// (`subscribed` or `unsubscribed`; also `true`/`false`, `yes`/`no`, `opt-in`/`opt-out`),
    /// sent in the attribute object's `subscription_groups` array. An empty cell sends nothing.
    #[serde(default)]
    pub subscription_groups: BTreeMap<String, String>,
    /// What a user absent from a complete export gets: `keep` (default: nothing, audiences
    /// aside) or `clear_fields` (every standard field and custom attribute the state has
    /// confirmed for them is set to `null`; consent states are kept), under
    /// `max_departure_share`, held and released as audience departures are.
    #[serde(default)]
    pub on_leave: RouteOnLeave,
    /// Send every value on every run, ignoring the confirmed state (the state still advances).
    #[serde(default)]
    pub full_resend: bool,
    /// Accept an export that has a header but no rows (default `false`: such an export is
    /// refused, since an empty audience would read as everyone leaving it). An export with
    /// no table at all (an empty archive, a marker folder without parts) is always refused.
    #[serde(default)]
    pub allow_empty: bool,
    /// Size bounds for reading this route's exports.
    #[serde(default)]
    pub limits: LimitsConfig,
    /// What orders this route's exports (an export dated before the one the state reflects
    /// is skipped and reported `skipped_stale`): `last_modified` (default: the trigger
    /// object's S3 LastModified, i.e. arrival order), `metadata` (its
    /// `x-amz-meta-exported-at`, RFC 3339; required) or `key` (the key after `prefix`,
    /// parsed whole with `key_time_format`). Never guessed from digits in the name.
    #[serde(default)]
    pub order_by: OrderBy,
    /// `order_by = "key"` only: the `strftime` format of the key after `prefix`, matched
    /// exactly, e.g. `customers_%Y%m%d.csv`, `customers_%Y-%m-%dT%H%M%S.csv` or
    /// `run-%Y-%m-%d/.DONE` (UTC unless it has `%z`); a key that does not match is refused.
    #[serde(default)]
    pub key_time_format: Option<String>,
    /// How far ahead of now an export may be dated (default `1h`; e.g. `30m`, `6h`): a later
    /// one is refused with its reason, so a mistyped date cannot pin the route's watermark.
    #[serde(default = "default_max_future_skew")]
    pub max_future_skew: String,
    /// The share of an audience's members (as the state had them before the run) that one
    /// export may remove by absence (default `0.2`): when more would leave, none of that
    /// audience's departures are sent (`departures_held` in the report) while every other
    /// change is, until an operator releases them (`bridge-allow-departures=true` or
    /// `--allow-departures`). Each `[[audiences]]` entry may set its own.
    #[serde(default = "default_max_departure_share")]
    pub max_departure_share: f64,
    /// What a user Braze Currents reports deleted or orphaned (the profile-change feed
    /// currents-normalize writes when both functions are deployed together) does to this
    /// route's confirmed state: `forget` (default) marks every value of theirs unknown, so the
    /// next export sends their whole profile; `keep` leaves the state as it is.
    #[serde(default)]
    pub on_braze_delete: OnBrazeDelete,
}

/// What a profile Braze deleted or orphaned does to a route's confirmed state.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnBrazeDelete {
    /// Every confirmed value of the user becomes unknown (sent again by the next export).
    #[default]
    Forget,
    /// The state is left as it is.
    Keep,
}

fn default_max_departure_share() -> f64 {
    DEFAULT_MAX_DEPARTURE_SHARE
}

/// The default `max_departure_share`.
pub const DEFAULT_MAX_DEPARTURE_SHARE: f64 = 0.2;

fn default_max_future_skew() -> String {
    crate::config::export_order::DEFAULT_MAX_FUTURE_SKEW.to_string()
}

fn default_marker() -> String {
    ".DONE".into()
}

fn default_true() -> bool {
    true
}

/// How objects make up an export.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One object is one export.
    #[default]
    Single,
    /// A folder of parts, complete when its marker lands.
    Marker,
}

/// Format names a route may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FormatName {
    /// Comma-separated.
    Csv,
    /// Tab-separated.
    Tsv,
    /// Pipe-separated.
    Psv,
    /// Custom single-character delimiter (`delimiter`).
    Delimited,
    /// JSON array or NDJSON.
    Json,
    /// Newline-delimited JSON.
    Ndjson,
    /// Apache Parquet (a single file or a folder of parts in marker mode).
    Parquet,
}

/// Compression names a route may declare.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CompressionName {
    /// Plain.
    None,
    /// gzip.
    Gzip,
    /// zip archive.
    Zip,
    /// tar archive.
    Tar,
    /// gzip-compressed tar.
    Tgz,
}

/// Which column identifies the user, and as what.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct IdentifierConfig {
    /// `external_id`, `braze_id` or `user_alias`.
    pub kind: IdentifierKind,
    /// Column holding the identifier (for `user_alias`, the alias name).
    pub column: String,
    /// `user_alias` only: the alias label, the same for every row.
    #[serde(default)]
    pub alias_label: Option<String>,
    /// `user_alias` only: a column holding each row's alias label (instead of `alias_label`).
    #[serde(default)]
    pub alias_label_column: Option<String>,
}

/// One custom attribute.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttributeConfig {
    /// Braze custom attribute name (defaults to the column name).
    #[serde(default)]
    pub name: Option<String>,
    /// Amperity type of the column: `Boolean`, `Date`, `Datetime`, `Decimal`, `Float`,
    /// `Integer`, `String` or `Varchar`.
    #[serde(rename = "type")]
    pub ty: AmperityType,
    /// `Decimal`/`Float` only: round to this many digits after the point (0–12) before
    /// diffing and sending, so volatile numbers do not change on every run.
    #[serde(default)]
    pub round: Option<u8>,
}

/// One audience membership, written as a boolean custom attribute.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudienceConfig {
    /// Braze custom attribute that holds membership (`true` for members).
    pub attribute: String,
    /// Boolean column saying whether the row's user is a member. Omit when the export lists
    /// only members (every row is a member).
    #[serde(default)]
    pub column: Option<String>,
    /// What to send when a user leaves (the column turns false, or a user confirmed as a
    /// member is absent from a later export): `false` (default), `null` (remove the attribute)
    /// or `keep` (send nothing).
    #[serde(default)]
    pub on_leave: OnLeave,
    /// This audience's cap on departures by absence, as a share of its members before the run
    /// (0.0–1.0; default: the route's `max_departure_share`).
    #[serde(default)]
    pub max_departure_share: Option<f64>,
}

/// Reading bounds of a route.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest single row, bytes (default 1 MiB).
    #[serde(default = "default_max_row")]
    pub max_row_bytes: usize,
    /// Largest decompressed export object, bytes (default: the function's ephemeral storage,
    /// env `BRIDGE_EPHEMERAL_STORAGE_MB`, else 512 MiB; zip members and Parquet parts are
    /// spilled to `/tmp` whole).
    #[serde(default = "default_max_decompressed")]
    pub max_decompressed_bytes: u64,
}

fn default_max_row() -> usize {
    read::DEFAULT_MAX_ROW_BYTES
}

fn default_max_decompressed() -> u64 {
    read::default_max_decompressed_bytes()
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            max_row_bytes: default_max_row(),
            max_decompressed_bytes: default_max_decompressed(),
        }
    }
}

/// Why a route config is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RouteError {
    /// The TOML does not parse or has unknown or ill-typed keys.
    #[error("route config {origin}: {message}")]
    Parse {
        /// File or object the config came from.
        origin: String,
        /// The parser's message (names the key).
        message: String,
    },
    /// A custom attribute duplicates a Braze standard profile field under another name.
    #[error(
        "route config {origin}: custom attribute {attribute:?} (column {column:?}) duplicates the Braze standard profile field `{standard}`; map the column under [fields] as `{column} = \"{standard}\"` instead"
    )]
    DuplicatesStandardField {
        /// Where.
        origin: String,
        /// The column.
        column: String,
        /// The custom attribute name.
        attribute: String,
        /// The standard field it duplicates.
        standard: String,
    },
    /// Anything else that is wrong, with the key at fault.
    #[error("route config {origin}: {message}")]
    Invalid {
        /// Where.
        origin: String,
        /// What and which key.
        message: String,
    },
}

/// One Braze attribute of a route, with the column it is read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    /// Braze attribute name.
    pub name: String,
    /// Source column (`None` for an audience whose every row is a member).
    pub column: Option<String>,
    /// What it holds.
    pub kind: SlotKind,
}

/// A validated route, ready to map rows.
#[derive(Debug, Clone)]
pub struct Route {
    /// The config as written.
    pub config: RouteConfig,
    /// Braze attributes, in slot order: standard fields (by column), custom attributes (by
    /// column), audiences (as listed), subscription groups (by column).
    pub slots: Vec<Slot>,
    by_name: HashMap<String, u16>,
}

/// Most slots one route may have.
pub const MAX_SLOTS: usize = 1000;

fn valid_name(name: &str) -> bool {
    // A leading '_' is reserved for the bridge's own folders beside the routes' state
    // (`_workspace/`, see `crate::send::workspace_share`).
    !name.is_empty()
        && !name.starts_with('_')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'_')
}

impl Route {
    /// Parses and validates a route file. `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Route, RouteError> {
        let config: RouteConfig = toml::from_str(text).map_err(|e| RouteError::Parse {
            origin: origin.to_string(),
            message: e.to_string().trim().replace('\n', " "),
        })?;
        Route::new(config, origin)
    }

    /// Validates a parsed config: how its exports are read, the identifier, the export order
    /// and limits, then its Braze attributes (slots) in slot order.
    pub fn new(config: RouteConfig, origin: &str) -> Result<Route, RouteError> {
        check_reading(&config, origin)?;
        check_identifier(&config.identifier, origin)?;
        check_order_and_limits(&config, origin)?;
        let mut slots = standard_slots(&config, origin)?;
        slots.extend(custom_slots(&config, origin)?);
        consent::check_departure_shares(&config, origin)?;
        slots.extend(audience_slots(&config, origin)?);
        slots.extend(consent::subscription_group_slots(&config, origin)?);
        let by_name = index_slots(&slots, origin)?;
        Ok(Route {
            config,
            slots,
            by_name,
        })
    }

    /// Route name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    /// How this route's exports are ordered (validated when the route was loaded).
    pub fn export_order(&self) -> ExportOrder {
        ExportOrder {
            by: self.config.order_by,
            key_time_format: self.config.key_time_format.clone(),
            max_future_skew: crate::config::export_order::parse_skew(&self.config.max_future_skew)
                .unwrap_or(std::time::Duration::from_secs(3600)),
            prefix: self.config.prefix.clone(),
        }
    }

    /// The slot of a Braze attribute name.
    pub fn slot_of(&self, name: &str) -> Option<u16> {
        self.by_name.get(name).copied()
    }

    /// Braze attribute names in slot order (the snapshot's layout).
    pub fn slot_names(&self) -> Vec<String> {
        self.slots.iter().map(|s| s.name.clone()).collect()
    }

    /// The state's slot layout: the attributes' names, then [`crate::vocab::ROW_DIGEST`].
    pub fn state_names(&self) -> Vec<String> {
        let mut names = self.slot_names();
        names.push(crate::vocab::ROW_DIGEST.to_string());
        names
    }

    /// Every column the route reads: identifier columns first, then slot columns.
    pub fn columns(&self) -> Vec<String> {
        let mut cols = self.identifier_columns();
        for s in &self.slots {
            if let Some(c) = &s.column
                && !cols.contains(c)
            {
                cols.push(c.clone());
            }
        }
        cols
    }

    /// The identifier column and, for aliases, the label column.
    pub fn identifier_columns(&self) -> Vec<String> {
        let mut cols = vec![self.config.identifier.column.clone()];
        if let Some(c) = &self.config.identifier.alias_label_column {
            cols.push(c.clone());
        }
        cols
    }

    /// How to read this route's objects.
    pub fn read_options(&self) -> read::ReadOptions {
        let escape = self.config.escape.as_ref().map(|e| e.as_bytes()[0]);
        let format = self.config.format.map(|f| match f {
            FormatName::Csv => Format::Delimited {
                delimiter: b',',
                escape,
            },
            FormatName::Tsv => Format::Delimited {
                delimiter: b'\t',
                escape,
            },
            FormatName::Psv => Format::Delimited {
                delimiter: b'|',
                escape,
            },
            FormatName::Delimited => Format::Delimited {
                delimiter: self
                    .config
                    .delimiter
                    .as_ref()
                    .map_or(b',', |d| d.as_bytes()[0]),
                escape,
            },
            FormatName::Json => Format::Json,
            FormatName::Ndjson => Format::NdJson,
            FormatName::Parquet => Format::Parquet,
        });
        // An escape character without a declared format still applies to sniffed CSV.
        let format = match (format, escape) {
            (None, Some(_)) => Some(Format::Delimited {
                delimiter: b',',
                escape,
            }),
            (f, _) => f,
        };
        read::ReadOptions {
            format,
            compression: self.config.compression.map(|c| match c {
                CompressionName::None => Compression::None,
                CompressionName::Gzip => Compression::Gzip,
                CompressionName::Zip => Compression::Zip,
                CompressionName::Tar => Compression::Tar,
                CompressionName::Tgz => Compression::Tgz,
            }),
            limits: read::Limits {
                max_decompressed_bytes: self.config.limits.max_decompressed_bytes,
                max_row_bytes: self.config.limits.max_row_bytes,
            },
            temp_dir: std::env::temp_dir(),
            columns: self.columns(),
            required_columns: self.identifier_columns(),
        }
    }

    /// The handler's view of this route (which objects it claims).
    pub fn binding(&self) -> RouteBinding {
        RouteBinding {
            name: self.config.name.clone(),
            bucket: self.config.bucket.clone(),
            prefix: self.config.prefix.clone(),
            marker_suffix: match self.config.mode {
                Mode::Single => None,
                Mode::Marker => Some(self.config.marker_suffix.clone()),
            },
        }
    }
}

fn invalid(origin: &str, message: String) -> RouteError {
    RouteError::Invalid {
        origin: origin.to_string(),
        message,
    }
}

/// The name, prefix, trigger mode and file format of a route.
fn check_reading(config: &RouteConfig, origin: &str) -> Result<(), RouteError> {
    let invalid = |message| invalid(origin, message);
    if !valid_name(&config.name) {
        return Err(invalid(format!(
            "name {:?} must be lowercase letters, digits, '-' or '_', not starting with '_'",
            config.name
        )));
    }
    if config.prefix.is_empty() {
        return Err(invalid("prefix must not be empty".into()));
    }
    if config.mode == Mode::Marker && config.marker_suffix.is_empty() {
        return Err(invalid(
            "marker_suffix must not be empty in marker mode".into(),
        ));
    }
    match (config.format, &config.delimiter) {
        (Some(FormatName::Delimited), None) => {
            return Err(invalid(
                "format = \"delimited\" needs a one-character delimiter".into(),
            ));
        }
        (Some(FormatName::Delimited), Some(d)) if !(d.len() == 1 && d.is_ascii()) => {
            return Err(invalid(format!(
                "delimiter {d:?} must be one ASCII character"
            )));
        }
        (Some(FormatName::Delimited), Some(_)) => {}
        (_, Some(_)) => {
            return Err(invalid(
                "delimiter is only used with format = \"delimited\"".into(),
            ));
        }
        _ => {}
    }
    if let Some(e) = &config.escape
        && !(e.len() == 1 && e.is_ascii())
    {
        return Err(invalid(format!("escape {e:?} must be one ASCII character")));
    }
    Ok(())
}

/// The identifier column and, for user aliases, where the alias label comes from.
fn check_identifier(id: &IdentifierConfig, origin: &str) -> Result<(), RouteError> {
    let invalid = |message| invalid(origin, message);
    if id.column.trim().is_empty() {
        return Err(invalid("identifier.column must not be empty".into()));
    }
    match id.kind {
        IdentifierKind::UserAlias => match (&id.alias_label, &id.alias_label_column) {
            (Some(l), None) if !l.is_empty() => {}
            (None, Some(c)) if !c.is_empty() => {}
            _ => {
                return Err(invalid(
                    "identifier.kind = \"user_alias\" needs exactly one of alias_label or alias_label_column".into(),
                ));
            }
        },
        _ => {
            if id.alias_label.is_some() || id.alias_label_column.is_some() {
                return Err(invalid(
                    "identifier.alias_label and alias_label_column are only for kind = \"user_alias\"".into(),
                ));
            }
        }
    }
    Ok(())
}

/// How exports are dated and ordered, and the row size limit.
fn check_order_and_limits(config: &RouteConfig, origin: &str) -> Result<(), RouteError> {
    let invalid = |message| invalid(origin, message);
    match (config.order_by, &config.key_time_format) {
        (OrderBy::Key, None) => {
            return Err(invalid(
                "order_by = \"key\" needs key_time_format (e.g. \"customers_%Y%m%d.csv\")".into(),
            ));
        }
        (OrderBy::Key, Some(f)) => crate::config::export_order::validate_key_time_format(f)
            .map_err(|e| invalid(format!("key_time_format: {e}")))?,
        (_, Some(_)) => {
            return Err(invalid(
                "key_time_format is only used with order_by = \"key\"".into(),
            ));
        }
        (_, None) => {}
    }
    crate::config::export_order::parse_skew(&config.max_future_skew)
        .map_err(|e| invalid(format!("max_future_skew: {e}")))?;
    if config.limits.max_row_bytes < 64 {
        return Err(invalid("limits.max_row_bytes must be at least 64".into()));
    }

    Ok(())
}

/// One slot per `[fields]` entry: a column mapped to a Braze standard profile field.
fn standard_slots(config: &RouteConfig, origin: &str) -> Result<Vec<Slot>, RouteError> {
    let invalid = |message| invalid(origin, message);
    let mut slots = Vec::new();
    for (column, field) in &config.fields {
        let Some(std) = StandardField::from_name(field) else {
            return Err(invalid(format!(
                "fields.{column} = {field:?} is not a Braze standard profile field we map (one of {})",
                StandardField::ALL
                    .iter()
                    .map(|f| f.name())
                    .collect::<Vec<_>>()
                    .join(", ")
            )));
        };
        slots.push(Slot {
            name: std.name().to_string(),
            column: Some(column.clone()),
            kind: SlotKind::Standard(std),
        });
    }
    Ok(slots)
}

/// One slot per `[attributes]` entry: a column sent as a custom attribute.
fn custom_slots(config: &RouteConfig, origin: &str) -> Result<Vec<Slot>, RouteError> {
    let invalid = |message| invalid(origin, message);
    let mut slots = Vec::new();
    for (column, attr) in &config.attributes {
        let name = attr.name.clone().unwrap_or_else(|| column.clone());
        check_custom_name(&name, column, origin)?;
        if let Some(r) = attr.round {
            if !matches!(attr.ty, AmperityType::Decimal | AmperityType::Float) {
                return Err(invalid(format!(
                    "attributes.{column}.round applies only to Decimal and Float, not {:?}",
                    attr.ty
                )));
            }
            if r > 12 {
                return Err(invalid(format!(
                    "attributes.{column}.round = {r} is out of range 0..=12"
                )));
            }
        }
        slots.push(Slot {
            name,
            column: Some(column.clone()),
            kind: SlotKind::Custom {
                ty: attr.ty,
                round: attr.round,
            },
        });
    }
    Ok(slots)
}

/// One slot per audience, in the order listed.
fn audience_slots(config: &RouteConfig, origin: &str) -> Result<Vec<Slot>, RouteError> {
    let mut slots = Vec::new();
    for (i, aud) in config.audiences.iter().enumerate() {
        let column = aud
            .column
            .clone()
            .unwrap_or_else(|| format!("audiences[{i}]"));
        check_custom_name(&aud.attribute, &column, origin)?;
        slots.push(Slot {
            name: aud.attribute.clone(),
            column: aud.column.clone(),
            kind: SlotKind::Audience {
                on_leave: aud.on_leave,
            },
        });
    }
    Ok(slots)
}

/// Slot numbers by Braze attribute name; each attribute is written by one column only, and
/// a route has at most [`MAX_SLOTS`].
fn index_slots(slots: &[Slot], origin: &str) -> Result<HashMap<String, u16>, RouteError> {
    let invalid = |message| invalid(origin, message);
    if slots.len() > MAX_SLOTS {
        return Err(invalid(format!(
            "{} attributes is more than the {MAX_SLOTS} a route may map",
            slots.len()
        )));
    }
    let mut by_name = HashMap::new();
    for (i, s) in slots.iter().enumerate() {
        if by_name.insert(s.name.clone(), i as u16).is_some() {
            return Err(invalid(format!(
                "Braze attribute {:?} is written by more than one column",
                s.name
            )));
        }
    }
    Ok(by_name)
}

/// How one route claims objects.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteBinding {
    /// Route name (state, reports and rejects live under it).
    pub name: String,
    /// Bucket the route reads, or `None` for any bucket.
    pub bucket: Option<String>,
    /// Key prefix the route owns.
    pub prefix: String,
    /// Marker mode: sync the whole folder when a key ending in `marker_suffix` lands.
    pub marker_suffix: Option<String>,
}

impl RouteBinding {
    /// Whether this route owns an object (its bucket, if set, and its prefix).
    pub fn owns(&self, obj: &S3Uri) -> bool {
        self.bucket.as_deref().is_none_or(|b| b == obj.bucket) && obj.key.starts_with(&self.prefix)
    }
}

fn check_custom_name(name: &str, column: &str, origin: &str) -> Result<(), RouteError> {
    let invalid = |message: String| RouteError::Invalid {
        origin: origin.to_string(),
        message,
    };
    if name.trim().is_empty() {
        return Err(invalid(format!(
            "the custom attribute of column {column:?} has an empty name"
        )));
    }
    if name.chars().count() > 255 {
        return Err(invalid(format!(
            "custom attribute name {name:?} is longer than 255 characters"
        )));
    }
    if name.starts_with('$') {
        return Err(invalid(format!(
            "custom attribute name {name:?} must not start with '$'"
        )));
    }
    if consent::names_a_group(name) {
        return Err(invalid(format!(
            "custom attribute name {name:?} would be read as a subscription group's; map the column under [subscription_groups] instead"
        )));
    }
    if let Some(reserved) = vocab::reserved_key(name) {
        return Err(invalid(format!(
            "custom attribute name {name:?} is Braze's reserved key `{reserved}`"
        )));
    }
    if let Some(std) = vocab::standard_synonym(name) {
        return Err(RouteError::DuplicatesStandardField {
            origin: origin.to_string(),
            column: column.to_string(),
            attribute: name.to_string(),
            standard: std.name().to_string(),
        });
    }
    Ok(())
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const BASE: &str = r#"
name = "customers"
prefix = "amperity/customers/"
[identifier]
kind = "external_id"
column = "amperity_id"
"#;

    #[test]
    fn minimal_route_has_defaults() {
        let r = Route::from_toml(BASE, "t.toml").unwrap();
        assert!(r.config.update_existing_only);
        assert_eq!(r.config.mode, Mode::Single);
        assert_eq!(r.config.string_policy, StringPolicy::Truncate);
        assert!(r.slots.is_empty());
    }

    #[test]
    fn slots_are_fields_then_attributes_then_audiences() {
        let text = format!(
            "{BASE}\n[fields]\ngiven_name = \"first_name\"\nbirthdate = \"dob\"\n[attributes.ltv]\ntype = \"Decimal\"\nround = 2\n[[audiences]]\nattribute = \"aud_vip\"\n"
        );
        let r = Route::from_toml(&text, "t").unwrap();
        assert_eq!(r.slot_names(), ["dob", "first_name", "ltv", "aud_vip"]);
        assert_eq!(r.slot_of("ltv"), Some(2));
        assert!(r.tracks_departures());
    }

    #[test]
    fn names_starting_with_underscore_are_reserved() {
        let text = BASE.replace("\"customers\"", "\"_workspace\"");
        let err = Route::from_toml(&text, "t").unwrap_err();
        assert!(err.to_string().contains("not starting with '_'"), "{err}");
        assert!(Route::from_toml(&BASE.replace("customers\"", "cust_omers\""), "t").is_ok());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_name() {
        let err = Route::from_toml(&format!("{BASE}\ncolour = 1\n"), "t").unwrap_err();
        assert!(err.to_string().contains("colour"), "{err}");
    }
}
