//! The crate's shared vocabulary: the small value types that the reader ([`crate::read`]), the
//! mapper ([`crate::map`]) and the route config ([`crate::config::route`]) all speak — a typed
//! [`Cell`], the table [`Format`] and [`Compression`], Amperity's column types, Braze's
//! standard profile fields and identifier kinds, and what a route slot holds.
//!
//! This module is a leaf: it imports nothing from the crate, so the reader, the route config
//! and the mapper can all depend on it (`tests/import_graph.rs` holds every module to the
//! layering of `lib.rs`: `read` < `config` < `map`, with no loop).

use chrono::{DateTime, NaiveDate, Utc};
use serde::Deserialize;

/// The state's last slot: not a Braze attribute but the digest of the export row whose
/// values the user's fingerprints hold (the diff's row digest), written with every
/// confirmed delta (cleared by one without a digest: departures). A row with the same
/// digest is unchanged without being mapped. The name cannot be an attribute's (it starts
/// with a control character); a state written before it existed has no such slot, so every
/// user reads as "no digest" and is mapped as before.
pub const ROW_DIGEST: &str = "\u{1}row_digest";

/// Braze identifier kinds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum IdentifierKind {
    /// `external_id`.
    ExternalId,
    /// `braze_id`.
    BrazeId,
    /// `user_alias` `{alias_name, alias_label}`.
    UserAlias,
}

/// Strings longer than Braze's 255-character limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StringPolicy {
    /// Cut to 255 characters.
    #[default]
    Truncate,
    /// Reject the row.
    Reject,
}

/// What leaving an audience sends.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLeave {
    /// Set the attribute to `false`.
    #[default]
    False,
    /// Remove the attribute (`null`).
    Null,
    /// Leave Braze as it is.
    Keep,
}

/// What a slot holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SlotKind {
    /// A standard profile field.
    Standard(StandardField),
    /// A custom attribute with its Amperity type and rounding.
    Custom {
        /// The type.
        ty: AmperityType,
        /// Digits to round to.
        round: Option<u8>,
    },
    /// An audience membership flag.
    Audience {
        /// What leaving sends.
        on_leave: OnLeave,
    },
    /// A Braze subscription group's state (`subscribed` / `unsubscribed`), sent in the
    /// attribute object's `subscription_groups` array.
    SubscriptionGroup,
}

impl SlotKind {
    /// A consent state (`email_subscribe`, `push_subscribe` or a subscription group): never
    /// sent as `null` (an empty cell says nothing), never cleared on leave, and a mass change
    /// to `unsubscribed` is held like departures.
    pub fn is_consent(self) -> bool {
        match self {
            SlotKind::Standard(f) => f.is_subscription(),
            SlotKind::SubscriptionGroup => true,
            _ => false,
        }
    }
}

/// An Amperity column type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum AmperityType {
    /// true/false.
    #[serde(alias = "boolean", alias = "BOOLEAN")]
    Boolean,
    /// A calendar date, sent as `YYYY-MM-DDT00:00:00Z`.
    #[serde(alias = "date", alias = "DATE")]
    Date,
    /// An instant, sent as ISO 8601 UTC.
    #[serde(
        alias = "datetime",
        alias = "DATETIME",
        alias = "Timestamp",
        alias = "timestamp"
    )]
    Datetime,
    /// An exact decimal number, sent as a JSON number without float noise.
    #[serde(alias = "decimal", alias = "DECIMAL")]
    Decimal,
    /// A floating-point number.
    #[serde(alias = "float", alias = "FLOAT", alias = "Double", alias = "double")]
    Float,
    /// A 64-bit integer.
    #[serde(alias = "integer", alias = "INTEGER", alias = "Int", alias = "int")]
    Integer,
    /// Text.
    #[serde(alias = "string", alias = "STRING")]
    String,
    /// Text (Amperity's name for bounded strings).
    #[serde(alias = "varchar", alias = "VARCHAR")]
    Varchar,
}

/// The text of `unscaled × 10^-scale`.
pub fn decimal_text(unscaled: i128, scale: i8) -> String {
    if scale <= 0 {
        let mut s = unscaled.to_string();
        if unscaled != 0 {
            s.extend(std::iter::repeat_n('0', (-scale) as usize));
        }
        return s;
    }
    let scale = scale as usize;
    let neg = unscaled < 0;
    let digits = unscaled.unsigned_abs().to_string();
    let padded = if digits.len() <= scale {
        format!("{}{digits}", "0".repeat(scale + 1 - digits.len()))
    } else {
        digits
    };
    let (i, f) = padded.split_at(padded.len() - scale);
    format!("{}{i}.{f}", if neg { "-" } else { "" })
}

/// One cell as the source typed it. Delimited and JSON text arrive as [`Cell::Str`]; Parquet
/// and JSON carry their native types. Empty delimited fields and JSON/Parquet nulls are
/// [`Cell::Null`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Cell<'a> {
    /// No value.
    Null,
    /// Text.
    Str(&'a str),
    /// A boolean.
    Bool(bool),
    /// An integer.
    Int(i64),
    /// A floating-point number.
    Float(f64),
    /// An exact decimal `unscaled × 10^-scale` (Parquet DECIMAL).
    Decimal {
        /// The unscaled integer.
        unscaled: i128,
        /// Digits after the point.
        scale: i8,
    },
    /// A calendar date.
    Date(NaiveDate),
    /// An instant.
    Timestamp(DateTime<Utc>),
}

/// The table format of an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Delimited text with a header row (CSV `,`, TSV `\t`, PSV `|`, or a custom delimiter).
    Delimited {
        /// The field delimiter.
        delimiter: u8,
        /// An escape character for quotes inside quoted fields, when not doubled quotes.
        escape: Option<u8>,
    },
    /// JSON: an array of objects or newline-delimited objects, told apart by the first byte.
    Json,
    /// Newline-delimited JSON objects.
    NdJson,
    /// One JSON array of objects.
    JsonArray,
    /// Apache Parquet.
    Parquet,
}

impl Format {
    /// Comma-separated values.
    pub const CSV: Format = Format::Delimited {
        delimiter: b',',
        escape: None,
    };
    /// Tab-separated values.
    pub const TSV: Format = Format::Delimited {
        delimiter: b'\t',
        escape: None,
    };
    /// Pipe-separated values.
    pub const PSV: Format = Format::Delimited {
        delimiter: b'|',
        escape: None,
    };

    pub fn describe(&self) -> String {
        match self {
            Format::Delimited { delimiter, .. } => {
                format!("delimited text ({:?})", *delimiter as char)
            }
            Format::Json => "JSON".into(),
            Format::NdJson => "NDJSON".into(),
            Format::JsonArray => "a JSON array".into(),
            Format::Parquet => "Parquet".into(),
        }
    }
}

/// The compression or archive around an object.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compression {
    /// Plain bytes.
    None,
    /// gzip (one or more members).
    Gzip,
    /// A zip archive (each member is a table).
    Zip,
    /// A tar archive (each regular file is a table).
    Tar,
    /// A gzip-compressed tar archive.
    Tgz,
}

impl Compression {
    pub fn describe(&self) -> &'static str {
        match self {
            Compression::None => "no compression",
            Compression::Gzip => "gzip",
            Compression::Zip => "zip",
            Compression::Tar => "tar",
            Compression::Tgz => "tgz",
        }
    }
}

/// A standard profile field a route may map.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum StandardField {
    /// `first_name`.
    FirstName,
    /// `last_name`.
    LastName,
    /// `email`.
    Email,
    /// `phone`.
    Phone,
    /// `dob`.
    Dob,
    /// `gender`.
    Gender,
    /// `country`.
    Country,
    /// `home_city`.
    HomeCity,
    /// `language`.
    Language,
    /// `time_zone`.
    TimeZone,
    /// `email_subscribe`.
    EmailSubscribe,
    /// `push_subscribe`.
    PushSubscribe,
    /// `email_open_tracking_disabled`.
    EmailOpenTrackingDisabled,
    /// `email_click_tracking_disabled`.
    EmailClickTrackingDisabled,
    /// `date_of_first_session`.
    DateOfFirstSession,
    /// `date_of_last_session`.
    DateOfLastSession,
    /// `marked_email_as_spam_at`.
    MarkedEmailAsSpamAt,
}

impl StandardField {
    /// Every field, in documentation order.
    pub const ALL: [StandardField; 17] = [
        StandardField::FirstName,
        StandardField::LastName,
        StandardField::Email,
        StandardField::Phone,
        StandardField::Dob,
        StandardField::Gender,
        StandardField::Country,
        StandardField::HomeCity,
        StandardField::Language,
        StandardField::TimeZone,
        StandardField::EmailSubscribe,
        StandardField::PushSubscribe,
        StandardField::EmailOpenTrackingDisabled,
        StandardField::EmailClickTrackingDisabled,
        StandardField::DateOfFirstSession,
        StandardField::DateOfLastSession,
        StandardField::MarkedEmailAsSpamAt,
    ];

    /// Braze's name for the field.
    pub fn name(self) -> &'static str {
        match self {
            StandardField::FirstName => "first_name",
            StandardField::LastName => "last_name",
            StandardField::Email => "email",
            StandardField::Phone => "phone",
            StandardField::Dob => "dob",
            StandardField::Gender => "gender",
            StandardField::Country => "country",
            StandardField::HomeCity => "home_city",
            StandardField::Language => "language",
            StandardField::TimeZone => "time_zone",
            StandardField::EmailSubscribe => "email_subscribe",
            StandardField::PushSubscribe => "push_subscribe",
            StandardField::EmailOpenTrackingDisabled => "email_open_tracking_disabled",
            StandardField::EmailClickTrackingDisabled => "email_click_tracking_disabled",
            StandardField::DateOfFirstSession => "date_of_first_session",
            StandardField::DateOfLastSession => "date_of_last_session",
            StandardField::MarkedEmailAsSpamAt => "marked_email_as_spam_at",
        }
    }

    /// `email_subscribe` or `push_subscribe`.
    pub fn is_subscription(self) -> bool {
        matches!(
            self,
            StandardField::EmailSubscribe | StandardField::PushSubscribe
        )
    }

    /// The field with this exact Braze name.
    pub fn from_name(name: &str) -> Option<StandardField> {
        StandardField::ALL.into_iter().find(|f| f.name() == name)
    }
}

/// Lowercase letters and digits of `s` (how synonyms are compared).
pub fn squash(s: &str) -> String {
    s.chars()
        .filter(|c| c.is_alphanumeric())
        .flat_map(char::to_lowercase)
        .collect()
}

/// Other names of standard fields, squashed (lowercase, letters and digits only).
const SYNONYMS: &[(&str, StandardField)] = &[
    ("firstname", StandardField::FirstName),
    ("givenname", StandardField::FirstName),
    ("forename", StandardField::FirstName),
    ("fname", StandardField::FirstName),
    ("lastname", StandardField::LastName),
    ("surname", StandardField::LastName),
    ("familyname", StandardField::LastName),
    ("lname", StandardField::LastName),
    ("email", StandardField::Email),
    ("emailaddress", StandardField::Email),
    ("phone", StandardField::Phone),
    ("phonenumber", StandardField::Phone),
    ("mobilephone", StandardField::Phone),
    ("mobilenumber", StandardField::Phone),
    ("cellphone", StandardField::Phone),
    ("telephone", StandardField::Phone),
    ("dob", StandardField::Dob),
    ("birthday", StandardField::Dob),
    ("birthdate", StandardField::Dob),
    ("dateofbirth", StandardField::Dob),
    ("gender", StandardField::Gender),
    ("sex", StandardField::Gender),
    ("country", StandardField::Country),
    ("countrycode", StandardField::Country),
    ("homecity", StandardField::HomeCity),
    ("city", StandardField::HomeCity),
    ("language", StandardField::Language),
    ("languagecode", StandardField::Language),
    ("timezone", StandardField::TimeZone),
    ("emailsubscribe", StandardField::EmailSubscribe),
    ("emailsubscription", StandardField::EmailSubscribe),
    ("emailoptin", StandardField::EmailSubscribe),
    ("pushsubscribe", StandardField::PushSubscribe),
    ("pushsubscription", StandardField::PushSubscribe),
    ("pushoptin", StandardField::PushSubscribe),
    (
        "emailopentrackingdisabled",
        StandardField::EmailOpenTrackingDisabled,
    ),
    (
        "emailclicktrackingdisabled",
        StandardField::EmailClickTrackingDisabled,
    ),
    ("dateoffirstsession", StandardField::DateOfFirstSession),
    ("dateoflastsession", StandardField::DateOfLastSession),
    ("markedemailasspamat", StandardField::MarkedEmailAsSpamAt),
];

/// The standard field a custom attribute name duplicates, if any (`birthday` → `dob`,
/// `e-mail` → `email`, `First Name` → `first_name`, `phone_number` → `phone`, ...).
pub fn standard_synonym(name: &str) -> Option<StandardField> {
    let key = squash(name);
    SYNONYMS.iter().find(|(s, _)| *s == key).map(|(_, f)| *f)
}

/// Keys of an attribute object that are not attributes at all.
pub fn reserved_key(name: &str) -> Option<&'static str> {
    [
        "external_id",
        "braze_id",
        "user_alias",
        "alias_name",
        "alias_label",
        "_update_existing_only",
        "_merge_objects",
        "push_token_import",
        "push_tokens",
        "subscription_groups",
        "current_location",
        "facebook",
        "twitter",
    ]
    .into_iter()
    .find(|k| k.eq_ignore_ascii_case(name))
}
