//! Deriving the registry from Braze's published Currents schemas (`.avsc` files, or the schema
//! embedded in `.avro` files) and merging it into the committed registry under explicit rules:
//! a new event type gets a table at version 1; fields Braze adds are appended to the table's
//! columns only when the caller asks for a version bump; a removed field or a changed type or
//! nullability is a breaking change the generator refuses (it needs a human decision).

use std::collections::BTreeMap;
use std::path::Path;

use crate::container::{Container, Limits};
use crate::registry::{FieldEntry, FieldType, RegistryFile, TableEntry, table_name};
use crate::schema::{Node, WriterSchema};

/// Why the registry cannot be derived or merged.
#[derive(Debug, thiserror::Error)]
pub enum GenError {
    /// A schema file cannot be read.
    #[error("{path}: {reason}")]
    Read {
        /// The file.
        path: String,
        /// Why.
        reason: String,
    },
    /// A field's type has no column mapping.
    #[error("{event_type}.{field}: type {avro} has no column mapping")]
    Unsupported {
        /// Event type.
        event_type: String,
        /// Field name.
        field: String,
        /// The Avro type.
        avro: String,
    },
    /// A published schema changes a table incompatibly, or adds fields without `--bump`.
    #[error("{0}")]
    Change(String),
}

/// What merging found for one event type.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A table the registry did not have (version 1).
    NewTable(String),
    /// Fields appended to a table, with its new version.
    FieldsAdded {
        /// Event type.
        event_type: String,
        /// The added fields, in order.
        fields: Vec<String>,
        /// The table's new version.
        version: u32,
    },
}

pub use crate::registry::event_type_of_record;

/// Maps one writer field to its registry entry.
pub fn field_entry(
    schema: &WriterSchema,
    event_type: &str,
    name: &str,
    node: usize,
) -> Result<FieldEntry, GenError> {
    let (branches, nullable) = schema.branches(node);
    let unsupported = || GenError::Unsupported {
        event_type: event_type.into(),
        field: name.into(),
        avro: schema.describe(node),
    };
    let (ty, avro) = match branches.as_slice() {
        [one] => match schema.node(*one) {
            Node::String | Node::Enum { .. } => (FieldType::String, None),
            Node::Int => (FieldType::Int, None),
            Node::Long => (FieldType::Long, None),
            Node::Float => (FieldType::Float, None),
            Node::Double => (FieldType::Double, None),
            Node::Boolean => (FieldType::Boolean, None),
            Node::Array(_) | Node::Map(_) | Node::Record { .. } => {
                (FieldType::Json, Some(schema.describe(*one)))
            }
            Node::Null | Node::Bytes | Node::Fixed { .. } | Node::Union(_) => {
                return Err(unsupported());
            }
        },
        [] => return Err(unsupported()),
        _ => (FieldType::Json, Some(schema.describe(node))),
    };
    Ok(FieldEntry {
        name: name.into(),
        ty,
        nullable,
        avro,
    })
}

/// Derives an event type and its fields from a writer schema.
pub fn derive(
    schema: &WriterSchema,
    fallback_event_type: &str,
) -> Result<(String, Vec<FieldEntry>), GenError> {
    let (record_name, fields) = schema.record().map_err(|e| GenError::Read {
        path: fallback_event_type.into(),
        reason: e.to_string(),
    })?;
    let event_type = event_type_of_record(record_name)
        .unwrap_or(fallback_event_type)
        .to_string();
    let entries = fields
        .iter()
        .map(|(name, node)| field_entry(schema, &event_type, name, *node))
        .collect::<Result<Vec<_>, _>>()?;
    Ok((event_type, entries))
}

/// Reads every `.avsc` and `.avro` file in a folder (sorted by name).
pub fn derive_dir(dir: &Path) -> Result<Vec<(String, Vec<FieldEntry>)>, GenError> {
    let read_err = |path: &Path, reason: String| GenError::Read {
        path: path.display().to_string(),
        reason,
    };
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .map_err(|e| read_err(dir, e.to_string()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|x| x == "avsc" || x == "avro"))
        .collect();
    paths.sort();
    let mut out = Vec::with_capacity(paths.len());
    for p in paths {
        let bytes = std::fs::read(&p).map_err(|e| read_err(&p, e.to_string()))?;
        let text = if p.extension().is_some_and(|x| x == "avro") {
            let c = Container::open(&bytes, Limits::default())
                .map_err(|e| read_err(&p, e.to_string()))?;
            c.schema_json.to_string()
        } else {
            String::from_utf8(bytes).map_err(|e| read_err(&p, e.to_string()))?
        };
        let schema = WriterSchema::parse(&text).map_err(|e| read_err(&p, e.to_string()))?;
        let stem = p
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_default();
        out.push(derive(&schema, &stem)?);
    }
    Ok(out)
}

/// Merges derived tables into an existing registry. With `bump`, fields Braze added are
/// appended and the table's version goes up by one; without it, added fields are an error
/// listing them. Removed fields and changed types are always an error.
pub fn merge(
    existing: &RegistryFile,
    derived: &[(String, Vec<FieldEntry>)],
    bump: bool,
) -> Result<(RegistryFile, Vec<Change>), GenError> {
    let mut tables: BTreeMap<String, TableEntry> = existing
        .tables
        .iter()
        .map(|t| (t.event_type.clone(), t.clone()))
        .collect();
    let mut changes = Vec::new();
    let mut problems = Vec::new();
    for (event_type, fields) in derived {
        let Some(current) = tables.get_mut(event_type) else {
            tables.insert(
                event_type.clone(),
                TableEntry {
                    event_type: event_type.clone(),
                    table: table_name(event_type),
                    version: 1,
                    fields: fields.clone(),
                },
            );
            changes.push(Change::NewTable(event_type.clone()));
            continue;
        };
        for old in &current.fields {
            match fields.iter().find(|f| f.name == old.name) {
                None => problems.push(format!(
                    "{event_type}: field {} was removed (breaking; edit the registry by hand)",
                    old.name
                )),
                Some(new) if new.ty != old.ty || new.nullable != old.nullable => {
                    problems.push(format!(
                        "{event_type}: field {} changed from {}{} to {}{} (breaking; edit the registry by hand)",
                        old.name,
                        old.ty.name(),
                        if old.nullable { "?" } else { "" },
                        new.ty.name(),
                        if new.nullable { "?" } else { "" },
                    ))
                }
                Some(_) => {}
            }
        }
        let added: Vec<&FieldEntry> = fields
            .iter()
            .filter(|f| !current.fields.iter().any(|o| o.name == f.name))
            .collect();
        if added.is_empty() {
            continue;
        }
        let names: Vec<String> = added.iter().map(|f| f.name.clone()).collect();
        if !bump {
            problems.push(format!(
                "{event_type}: Braze added {} (rerun with --bump to append them and raise the table's version to {})",
                names.join(", "),
                current.version + 1
            ));
            continue;
        }
        current.version += 1;
        current.fields.extend(added.into_iter().cloned());
        changes.push(Change::FieldsAdded {
            event_type: event_type.clone(),
            fields: names,
            version: current.version,
        });
    }
    if !problems.is_empty() {
        return Err(GenError::Change(problems.join("\n")));
    }
    Ok((
        RegistryFile {
            about: existing.about.clone(),
            source: existing.source.clone(),
            tables: tables.into_values().collect(),
        },
        changes,
    ))
}

/// The registry as committed: one table header line and one line per field, so a diff shows
/// exactly which columns changed.
pub fn to_pretty_json(file: &RegistryFile) -> String {
    let q = |s: &str| serde_json::Value::String(s.into()).to_string();
    let mut out = String::new();
    out.push_str("{\n");
    out.push_str(&format!("  \"about\": {},\n", q(&file.about)));
    out.push_str(&format!("  \"source\": {},\n", q(&file.source)));
    out.push_str("  \"tables\": [\n");
    for (ti, t) in file.tables.iter().enumerate() {
        out.push_str(&format!(
            "    {{\"event_type\": {}, \"table\": {}, \"version\": {}, \"fields\": [\n",
            q(&t.event_type),
            q(&t.table),
            t.version
        ));
        for (fi, f) in t.fields.iter().enumerate() {
            let line = serde_json::to_string(f).unwrap_or_default();
            out.push_str("      ");
            out.push_str(&line);
            out.push_str(if fi + 1 < t.fields.len() { ",\n" } else { "\n" });
        }
        out.push_str(if ti + 1 < file.tables.len() {
            "    ]},\n"
        } else {
            "    ]}\n"
        });
    }
    out.push_str("  ]\n}\n");
    out
}

#[cfg(test)]
#[allow(clippy::unwrap_used, clippy::expect_used)]
mod tests {
    use super::*;
    use crate::registry::Registry;

    fn schema(fields: &str) -> WriterSchema {
        WriterSchema::parse(&format!(
            r#"{{"type":"record","name":"Send","namespace":"dataexport.S3.inner.users.messages.email","fields":[{fields}]}}"#
        ))
        .unwrap()
    }

    const BASE: &str = r#"{"name":"id","type":"string"},{"name":"time","type":"int"},{"name":"x","type":["null","string"]}"#;

    fn empty() -> RegistryFile {
        RegistryFile {
            about: "a".into(),
            source: "s".into(),
            tables: vec![],
        }
    }

    #[test]
    fn record_name_gives_the_event_type() {
        assert_eq!(
            event_type_of_record("dataexport.S3.inner.users.messages.email.Send"),
            Some("users.messages.email.Send")
        );
        assert_eq!(event_type_of_record("other.Thing"), None);
    }

    #[test]
    fn new_event_type_starts_at_version_one() {
        let d = vec![derive(&schema(BASE), "x").unwrap()];
        let (file, changes) = merge(&empty(), &d, false).unwrap();
        assert_eq!(file.tables[0].version, 1);
        assert_eq!(file.tables[0].table, "users_messages_email_send");
        assert_eq!(
            changes,
            [Change::NewTable("users.messages.email.Send".into())]
        );
    }

    #[test]
    fn added_field_needs_an_explicit_bump_and_is_appended() {
        let (v1, _) = merge(&empty(), &[derive(&schema(BASE), "x").unwrap()], false).unwrap();
        let newer = vec![
            derive(
                &schema(&format!(
                    r#"{{"name":"from_domain","type":["null","string"]}},{BASE}"#
                )),
                "x",
            )
            .unwrap(),
        ];
        let err = merge(&v1, &newer, false).unwrap_err();
        assert!(err.to_string().contains("--bump"), "{err}");
        let (v2, _) = merge(&v1, &newer, true).unwrap();
        assert_eq!(v2.tables[0].version, 2);
        let names: Vec<&str> = v2.tables[0]
            .fields
            .iter()
            .map(|f| f.name.as_str())
            .collect();
        assert_eq!(names, ["id", "time", "x", "from_domain"]);
    }

    #[test]
    fn type_change_is_refused_even_with_bump() {
        let (v1, _) = merge(&empty(), &[derive(&schema(BASE), "x").unwrap()], false).unwrap();
        let changed = vec![
            derive(
                &schema(r#"{"name":"id","type":"string"},{"name":"time","type":"int"},{"name":"x","type":["null","long"]}"#),
                "x",
            )
            .unwrap(),
        ];
        let err = merge(&v1, &changed, true).unwrap_err();
        assert!(err.to_string().contains("breaking"), "{err}");
    }

    #[test]
    fn pretty_json_round_trips() {
        let r = Registry::builtin().unwrap();
        let text = to_pretty_json(r.file());
        assert_eq!(Registry::from_json(&text).unwrap().file(), r.file());
    }

    /// The committed registry matches Braze's published schemas (when the copy is present):
    /// a drift means someone must regenerate it, bumping versions explicitly.
    #[test]
    fn committed_registry_matches_the_published_schemas() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../../../shared/currents-schemas/extracted-avsc");
        if !dir.exists() {
            eprintln!("skipped: {} not present", dir.display());
            return;
        }
        let derived = derive_dir(&dir).unwrap();
        assert_eq!(derived.len(), 94);
        let r = Registry::builtin().unwrap();
        let (merged, changes) = merge(r.file(), &derived, false).unwrap();
        assert!(changes.is_empty(), "{changes:?}");
        assert_eq!(&merged, r.file());
        for (event_type, fields) in &derived {
            let t = r.get(event_type).unwrap();
            assert_eq!(&t.fields, fields, "{event_type}: field order differs");
        }
    }
}
