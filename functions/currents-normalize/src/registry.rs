//! The schema registry: which event types have a table, and each table's columns, fixed in the
//! project-owned `registry/tables.json` (generated from Braze's published Currents schemas by
//! the `currents-registry` binary, see [`crate::registry_gen`]). A table's columns never depend
//! on the file being read: the event's fields in registry order, then `event_time`, the lineage
//! columns and `extra`. Event types the registry does not know share the generic
//! [`OTHER_EVENTS_TABLE`].

use std::collections::HashMap;
use std::sync::Arc;

use arrow_schema::{DataType, Field, Schema, SchemaRef, TimeUnit};
use serde::{Deserialize, Serialize};

/// The registry file compiled into the binary.
pub const BUILTIN_REGISTRY: &str = include_str!("../registry/tables.json");

/// Table for event types the registry does not know: common fields plus the whole event as JSON.
pub const OTHER_EVENTS_TABLE: &str = "currents_other_events";

/// Version of the generic table's column layout.
pub const OTHER_EVENTS_VERSION: u32 = 1;

/// Column names the normalizer adds after the event's fields; no event field may use them.
pub const RESERVED_COLUMNS: [&str; 9] = [
    "event_time",
    "source_key",
    "delivery_hour",
    "schema_id",
    "schema_version",
    "registry_version",
    "extra",
    "event_type",
    "event",
];

/// A field's type as the registry records it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum FieldType {
    /// Avro `string` (or `enum`): a UTF-8 column.
    String,
    /// Avro `int`: an Int64 column (so `int` and `long` writers both fit).
    Int,
    /// Avro `long`: an Int64 column.
    Long,
    /// Avro `float`: a Float64 column (widened exactly).
    Float,
    /// Avro `double`: a Float64 column.
    Double,
    /// Avro `boolean`.
    Boolean,
    /// Arrays, maps and records: a UTF-8 column holding JSON text.
    Json,
}

impl FieldType {
    /// The Arrow type of the column.
    pub fn data_type(self) -> DataType {
        match self {
            FieldType::String | FieldType::Json => DataType::Utf8,
            FieldType::Int | FieldType::Long => DataType::Int64,
            FieldType::Float | FieldType::Double => DataType::Float64,
            FieldType::Boolean => DataType::Boolean,
        }
    }

    /// The registry's spelling.
    pub fn name(self) -> &'static str {
        match self {
            FieldType::String => "string",
            FieldType::Int => "int",
            FieldType::Long => "long",
            FieldType::Float => "float",
            FieldType::Double => "double",
            FieldType::Boolean => "boolean",
            FieldType::Json => "json",
        }
    }
}

/// One field of a table, as committed in the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FieldEntry {
    /// Field (and column) name.
    pub name: String,
    /// Column type.
    #[serde(rename = "type")]
    pub ty: FieldType,
    /// Whether the published schema allows null (`["null", T]`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub nullable: bool,
    /// The Avro shape for JSON columns (`array<string>`), for documentation.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avro: Option<String>,
}

/// One table of the registry.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TableEntry {
    /// Braze's event type (`users.messages.email.Send`).
    pub event_type: String,
    /// Table name (`users_messages_email_send`).
    pub table: String,
    /// Registry version of this table's columns; bumped whenever a field is added.
    pub version: u32,
    /// The event's fields in column order.
    pub fields: Vec<FieldEntry>,
}

/// The registry file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryFile {
    /// What this file is and how it is produced.
    pub about: String,
    /// Where the schemas it was derived from came from.
    pub source: String,
    /// Tables in event-type order.
    pub tables: Vec<TableEntry>,
}

/// Where a column's values come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnSource {
    /// The event field at this index of [`TableDef::fields`].
    Field(usize),
    /// `event_time`: UTC timestamp from `time` (seconds).
    EventTime,
    /// `source_key`: the Currents object key.
    SourceKey,
    /// `delivery_hour`: the hour from `date=` in the key (UTC).
    DeliveryHour,
    /// `schema_id`: the numeric `<schema-id>` key segment, when the key has one.
    SchemaId,
    /// `schema_version`: `version=<n>` from the key, when it has one.
    SchemaVersion,
    /// `registry_version`: the table's registry version.
    RegistryVersion,
    /// `event_type` (generic table only).
    EventType,
    /// `extra` (registered tables: fields the registry does not know, as a JSON object) or
    /// `event` (generic table: the whole event as a JSON object).
    Json,
}

/// One output column.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Column {
    /// Column name.
    pub name: String,
    /// Arrow type.
    pub data_type: DataType,
    /// Whether nulls are allowed.
    pub nullable: bool,
    /// Where its values come from.
    pub source: ColumnSource,
}

/// A table ready for writing: its registry entry, its columns and their Arrow schema.
#[derive(Debug, Clone)]
pub struct TableDef {
    /// Event type (for the generic table, empty: each file names its own).
    pub event_type: String,
    /// Table name.
    pub table: String,
    /// Registry version.
    pub version: u32,
    /// Event fields mapped to columns.
    pub fields: Vec<FieldEntry>,
    /// True for the generic table of unknown event types.
    pub generic: bool,
    /// Output columns in order.
    pub columns: Vec<Column>,
    /// Their Arrow schema.
    pub schema: SchemaRef,
}

fn timestamp() -> DataType {
    DataType::Timestamp(TimeUnit::Microsecond, Some("UTC".into()))
}

impl TableDef {
    /// Builds a registered table from its entry.
    pub fn registered(entry: &TableEntry) -> Self {
        let mut columns: Vec<Column> = entry
            .fields
            .iter()
            .enumerate()
            .map(|(i, f)| Column {
                name: f.name.clone(),
                data_type: f.ty.data_type(),
                nullable: f.nullable,
                source: ColumnSource::Field(i),
            })
            .collect();
        columns.extend(lineage_columns());
        columns.push(Column {
            name: "extra".into(),
            data_type: DataType::Utf8,
            nullable: true,
            source: ColumnSource::Json,
        });
        Self::build(
            entry.event_type.clone(),
            entry.table.clone(),
            entry.version,
            entry.fields.clone(),
            false,
            columns,
        )
    }

    /// The generic table for event types the registry does not know.
    pub fn other_events() -> Self {
        let field = |name: &str, ty: FieldType, nullable: bool| FieldEntry {
            name: name.into(),
            ty,
            nullable,
            avro: None,
        };
        let fields = vec![
            field("id", FieldType::String, false),
            field("user_id", FieldType::String, true),
            field("external_user_id", FieldType::String, true),
            field("time", FieldType::Long, false),
            field("timezone", FieldType::String, true),
            field("app_group_id", FieldType::String, true),
            field("app_id", FieldType::String, true),
        ];
        let mut columns = vec![Column {
            name: "event_type".into(),
            data_type: DataType::Utf8,
            nullable: false,
            source: ColumnSource::EventType,
        }];
        columns.extend(fields.iter().enumerate().map(|(i, f)| Column {
            name: f.name.clone(),
            data_type: f.ty.data_type(),
            // A file of an unknown type may lack any of these but `id` and `time`.
            nullable: f.nullable,
            source: ColumnSource::Field(i),
        }));
        columns.extend(lineage_columns());
        columns.push(Column {
            name: "event".into(),
            data_type: DataType::Utf8,
            nullable: false,
            source: ColumnSource::Json,
        });
        Self::build(
            String::new(),
            OTHER_EVENTS_TABLE.into(),
            OTHER_EVENTS_VERSION,
            fields,
            true,
            columns,
        )
    }

    fn build(
        event_type: String,
        table: String,
        version: u32,
        fields: Vec<FieldEntry>,
        generic: bool,
        columns: Vec<Column>,
    ) -> Self {
        let schema = Arc::new(Schema::new(
            columns
                .iter()
                .map(|c| Field::new(&c.name, c.data_type.clone(), c.nullable))
                .collect::<Vec<_>>(),
        ));
        Self {
            event_type,
            table,
            version,
            fields,
            generic,
            columns,
            schema,
        }
    }
}

fn lineage_columns() -> Vec<Column> {
    let col = |name: &str, data_type: DataType, nullable: bool, source| Column {
        name: name.into(),
        data_type,
        nullable,
        source,
    };
    vec![
        col("event_time", timestamp(), false, ColumnSource::EventTime),
        col("source_key", DataType::Utf8, false, ColumnSource::SourceKey),
        col(
            "delivery_hour",
            timestamp(),
            false,
            ColumnSource::DeliveryHour,
        ),
        col("schema_id", DataType::Int64, true, ColumnSource::SchemaId),
        col(
            "schema_version",
            DataType::Int64,
            true,
            ColumnSource::SchemaVersion,
        ),
        col(
            "registry_version",
            DataType::Int32,
            false,
            ColumnSource::RegistryVersion,
        ),
    ]
}

/// Why a registry cannot be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    /// The file is not valid registry JSON.
    #[error("registry is not valid: {0}")]
    Parse(#[from] serde_json::Error),
    /// The file is JSON but breaks a rule.
    #[error("registry table {table}: {reason}")]
    Invalid {
        /// Which table.
        table: String,
        /// Which rule.
        reason: String,
    },
}

/// The loaded registry: event type → table.
#[derive(Debug, Clone)]
pub struct Registry {
    by_event_type: HashMap<String, Arc<TableDef>>,
    other: Arc<TableDef>,
    file: RegistryFile,
}

/// The table name for an event type: lower case, anything but letters and digits becomes `_`
/// (`users.messages.email.Send` → `users_messages_email_send`).
pub fn table_name(event_type: &str) -> String {
    event_type
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect()
}

impl Registry {
    /// The registry compiled into the binary.
    pub fn builtin() -> Result<Self, RegistryError> {
        Self::from_json(BUILTIN_REGISTRY)
    }

    /// Loads and validates registry JSON.
    pub fn from_json(text: &str) -> Result<Self, RegistryError> {
        let file: RegistryFile = serde_json::from_str(text)?;
        Self::from_file(file)
    }

    /// Validates a parsed registry file.
    pub fn from_file(file: RegistryFile) -> Result<Self, RegistryError> {
        let mut by_event_type = HashMap::new();
        let mut tables = std::collections::HashSet::new();
        for t in &file.tables {
            let bad = |reason: String| RegistryError::Invalid {
                table: t.table.clone(),
                reason,
            };
            if t.table != table_name(&t.event_type) {
                return Err(bad(format!(
                    "name should be {} for event type {}",
                    table_name(&t.event_type),
                    t.event_type
                )));
            }
            if t.table == OTHER_EVENTS_TABLE || !tables.insert(t.table.clone()) {
                return Err(bad("table name is used twice".into()));
            }
            if t.version == 0 {
                return Err(bad("version starts at 1".into()));
            }
            let mut names = std::collections::HashSet::new();
            for f in &t.fields {
                if RESERVED_COLUMNS.contains(&f.name.as_str()) {
                    return Err(bad(format!("field {} uses a reserved column name", f.name)));
                }
                if !names.insert(f.name.as_str()) {
                    return Err(bad(format!("field {} appears twice", f.name)));
                }
            }
            match t.fields.iter().find(|f| f.name == "id") {
                Some(f) if f.ty == FieldType::String && !f.nullable => {}
                _ => return Err(bad("needs a required string field id".into())),
            }
            match t.fields.iter().find(|f| f.name == "time") {
                Some(f) if matches!(f.ty, FieldType::Int | FieldType::Long) && !f.nullable => {}
                _ => return Err(bad("needs a required int or long field time".into())),
            }
            by_event_type.insert(t.event_type.clone(), Arc::new(TableDef::registered(t)));
        }
        Ok(Self {
            by_event_type,
            other: Arc::new(TableDef::other_events()),
            file,
        })
    }

    /// The table of an event type, if the registry has one.
    pub fn get(&self, event_type: &str) -> Option<&Arc<TableDef>> {
        self.by_event_type.get(event_type)
    }

    /// The generic table for unknown event types.
    pub fn other_events(&self) -> &Arc<TableDef> {
        &self.other
    }

    /// Every registered table, in registry order.
    pub fn entries(&self) -> &[TableEntry] {
        &self.file.tables
    }

    /// The registry file as loaded.
    pub fn file(&self) -> &RegistryFile {
        &self.file
    }

    /// The Avro writer schema (JSON) a table's registry entry describes, in Braze's naming
    /// (`dataexport.S3.inner.<event type>`). Used to generate test and benchmark files.
    pub fn avro_schema(entry: &TableEntry) -> serde_json::Value {
        use serde_json::json;
        let (ns, name) = entry
            .event_type
            .rsplit_once('.')
            .unwrap_or(("", entry.event_type.as_str()));
        let fields: Vec<serde_json::Value> = entry
            .fields
            .iter()
            .map(|f| {
                let base = match (f.ty, f.avro.as_deref()) {
                    (FieldType::Json, Some("array<string?>")) => {
                        json!({"type": "array", "items": ["null", "string"]})
                    }
                    (FieldType::Json, _) => json!({"type": "array", "items": "string"}),
                    (t, _) => json!(t.name()),
                };
                if f.nullable {
                    json!({"name": f.name, "type": ["null", base], "default": null})
                } else {
                    json!({"name": f.name, "type": base})
                }
            })
            .collect();
        json!({
            "type": "record",
            "name": name,
            "namespace": format!("dataexport.S3.inner.{ns}"),
            "fields": fields,
        })
    }
}

/// The event type a Currents record name stands for:
/// `dataexport.S3.inner.users.messages.email.Send` → `users.messages.email.Send`.
pub fn event_type_of_record(full_name: &str) -> Option<&str> {
    let rest = full_name.strip_prefix("dataexport.")?;
    let (_, event_type) = rest.split_once(".inner.")?;
    (!event_type.is_empty()).then_some(event_type)
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;

    #[test]
    fn event_type_becomes_snake_table_name() {
        assert_eq!(
            table_name("users.messages.email.Send"),
            "users_messages_email_send"
        );
        assert_eq!(
            table_name("users.behaviors.app.FirstSession"),
            "users_behaviors_app_firstsession"
        );
    }

    #[test]
    fn builtin_registry_has_all_94_sample_types() {
        let r = Registry::builtin().unwrap();
        assert_eq!(r.entries().len(), 94);
        let send = r.get("users.messages.email.Send").unwrap();
        assert_eq!(send.table, "users_messages_email_send");
        let names: Vec<&str> = send.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names[0], "id");
        assert_eq!(
            &names[names.len() - 7..],
            [
                "event_time",
                "source_key",
                "delivery_hour",
                "schema_id",
                "schema_version",
                "registry_version",
                "extra"
            ]
        );
    }

    #[test]
    fn time_is_int_or_long_and_arrays_are_json() {
        let r = Registry::builtin().unwrap();
        let wa = r.get("users.messages.whatsapp.Send").unwrap();
        let time = wa.fields.iter().find(|f| f.name == "time").unwrap();
        assert_eq!(time.ty, FieldType::Long);
        let click = r.get("users.messages.email.Click").unwrap();
        let reason = click
            .fields
            .iter()
            .find(|f| f.name == "suspected_bot_click_reason")
            .unwrap();
        assert_eq!(reason.ty, FieldType::Json);
        assert!(reason.nullable);
        assert_eq!(reason.avro.as_deref(), Some("array<string>"));
    }

    #[test]
    fn reserved_column_names_are_refused() {
        let text = r#"{"about":"","source":"","tables":[{"event_type":"a.B","table":"a_b","version":1,
            "fields":[{"name":"id","type":"string"},{"name":"time","type":"int"},{"name":"extra","type":"string"}]}]}"#;
        let err = Registry::from_json(text).unwrap_err();
        assert!(err.to_string().contains("reserved"), "{err}");
    }

    #[test]
    fn generic_table_keeps_the_whole_event() {
        let t = TableDef::other_events();
        assert!(t.generic);
        let names: Vec<&str> = t.columns.iter().map(|c| c.name.as_str()).collect();
        assert_eq!(names[0], "event_type");
        assert_eq!(names.last(), Some(&"event"));
    }
}
