//! The plan of one file: how its writer schema maps onto its table (each writer field to its
//! column or to the row's JSON object), checked against the registry before any record is read.

use std::sync::Arc;

use arrow_avro::reader::Decoder;

use super::flat::FlatLayout;
use super::{NormalizeError, datum_decoder};
use crate::json;
use crate::registry::{FieldType, Registry, TableDef, event_type_of_record};
use crate::schema::{Node, NodeId, SchemaError, WriterSchema};

/// One writer field, as the plan maps it.
#[derive(Debug)]
pub(super) struct FieldPlan {
    pub(super) name: String,
    /// `"name":` as JSON, for the extra/event object.
    pub(super) json_key: String,
    /// Index into the table's fields when the field fills a column.
    pub(super) slot: Option<usize>,
    /// That column holds JSON text (arrays, maps, records).
    pub(super) json_column: bool,
    /// Also (or only) written into the row's JSON object (`extra` / `event`).
    pub(super) to_json: bool,
    /// Its value arrives as JSON text already (a recursive type, rendered by
    /// [`crate::datum::rewrite`]).
    pub(super) rendered: bool,
}

/// How one file's writer schema maps onto its table.
#[derive(Debug)]
pub struct Plan {
    pub(super) schema: WriterSchema,
    pub(super) table: Arc<TableDef>,
    pub(super) fields: Vec<FieldPlan>,
    pub(super) id_slot: usize,
    pub(super) time_slot: usize,
    pub(super) extra_fields: Vec<String>,
    /// The layout of flat records, read by [`super::flat::FlatDecoder`] instead of
    /// `arrow-avro` (`None`: the schema has other types, or fields that need the item and
    /// rendering limits checked record by record).
    pub(super) flat: Option<FlatLayout>,
}

impl Plan {
    /// The table rows go to.
    pub fn table(&self) -> &Arc<TableDef> {
        &self.table
    }

    /// Writer fields the registry does not know.
    pub fn extra_fields(&self) -> &[String] {
        &self.extra_fields
    }

    /// The writer schema.
    pub fn schema(&self) -> &WriterSchema {
        &self.schema
    }

    /// An `arrow-avro` decoder of this plan's records, `batch_rows` to a batch. Array items
    /// of type `null` cost no input, and the decoder counts each one (up to 2^31 per array):
    /// such files, and those with fields rendered as JSON, go one record per batch, so the
    /// item limit stops the first record that goes over. Otherwise every item costs at least
    /// one input byte and what a batch decodes is bounded by the bytes it consumes.
    pub fn decoder(&self, batch_rows: usize) -> Result<Decoder, NormalizeError> {
        let batch_rows = if self.schema.has_free_array_items() || self.schema.has_rendered_fields()
        {
            1
        } else {
            batch_rows
        };
        datum_decoder(&self.schema, batch_rows).map_err(|reason| {
            NormalizeError::Schema(SchemaError::Invalid {
                path: "$".into(),
                reason: format!("arrow-avro cannot decode it: {reason}"),
            })
        })
    }
}

/// Whether a writer field can fill a column of type `ty`, or why it cannot.
fn column_fits(
    schema: &WriterSchema,
    node: NodeId,
    ty: FieldType,
    nullable: bool,
) -> Result<(), String> {
    let (branches, writer_nullable) = schema.branches(node);
    let desc = schema.describe(node);
    if writer_nullable && !nullable {
        return Err(format!(
            "the file allows null ({desc}) but the registry column is required"
        ));
    }
    let contradiction = || format!("registry type {}, file type {desc}", ty.name());
    if branches.is_empty() || (branches.len() > 1 && ty != FieldType::Json) {
        return Err(contradiction());
    }
    for b in branches {
        let ok = match (ty, schema.node(b)) {
            (FieldType::String, n) => matches!(n, Node::String | Node::Enum { .. }),
            (FieldType::Int | FieldType::Long, n) => matches!(n, Node::Int | Node::Long),
            (FieldType::Float | FieldType::Double, n) => matches!(n, Node::Float | Node::Double),
            (FieldType::Boolean, n) => matches!(n, Node::Boolean),
            (FieldType::Json, n) => {
                matches!(n, Node::Array(_) | Node::Map(_) | Node::Record { .. })
            }
        };
        if !ok {
            return Err(contradiction());
        }
    }
    Ok(())
}

impl Plan {
    /// Compiles the plan for a file of `event_type` written with `schema`.
    pub fn new(
        schema: WriterSchema,
        event_type: &str,
        registry: &Registry,
    ) -> Result<Self, NormalizeError> {
        let (record_name, writer_fields) = schema.record()?;
        if schema.has_free_array_items_other_than_null() {
            return Err(NormalizeError::Schema(SchemaError::Invalid {
                path: "$".into(),
                reason: "an array's items cost no input bytes (a fixed of size 0 or a record of \
                         only such fields): refused"
                    .into(),
            }));
        }
        if let Some(record_type) = event_type_of_record(record_name)
            && record_type != event_type
        {
            return Err(NormalizeError::EventTypeMismatch {
                key: event_type.into(),
                record: record_type.into(),
            });
        }
        let (table, generic) = match registry.get(event_type) {
            Some(t) => (t.clone(), false),
            None => (registry.other_events().clone(), true),
        };
        let contradiction = |field: &str, reason: String| NormalizeError::Contradiction {
            table: table.table.clone(),
            version: table.version,
            field: field.into(),
            reason,
        };
        let mut fields = Vec::with_capacity(writer_fields.len());
        let mut extra_fields = Vec::new();
        let mut seen = vec![false; table.fields.len()];
        for (index, (name, node)) in writer_fields.iter().enumerate() {
            let rendered = schema.is_rendered(index);
            let slot = table.fields.iter().position(|f| &f.name == name);
            let mut json_key = String::with_capacity(name.len() + 3);
            json::push_str(&mut json_key, name);
            json_key.push(':');
            let plan = match slot {
                Some(i) => {
                    let f = &table.fields[i];
                    match column_fits(&schema, *node, f.ty, f.nullable) {
                        Ok(()) => {
                            seen[i] = true;
                            FieldPlan {
                                name: name.clone(),
                                json_key,
                                slot: Some(i),
                                json_column: f.ty == FieldType::Json,
                                to_json: generic,
                                rendered,
                            }
                        }
                        // The generic table takes its common columns only when they fit;
                        // the whole event is in its JSON column either way.
                        Err(_) if generic && f.nullable => FieldPlan {
                            name: name.clone(),
                            json_key,
                            slot: None,
                            json_column: false,
                            to_json: true,
                            rendered,
                        },
                        Err(reason) => return Err(contradiction(name, reason)),
                    }
                }
                None => {
                    if !generic {
                        extra_fields.push(name.clone());
                    }
                    FieldPlan {
                        name: name.clone(),
                        json_key,
                        slot: None,
                        json_column: false,
                        to_json: true,
                        rendered,
                    }
                }
            };
            fields.push(plan);
        }
        for (i, f) in table.fields.iter().enumerate() {
            if !seen[i] && !f.nullable {
                return Err(contradiction(
                    &f.name,
                    "required by the registry but absent from the file".into(),
                ));
            }
        }
        let slot_of = |name: &str| table.fields.iter().position(|f| f.name == name);
        let (Some(id_slot), Some(time_slot)) = (slot_of("id"), slot_of("time")) else {
            return Err(contradiction("id", "table has no id or time field".into()));
        };
        let flat = if schema.has_free_array_items() || schema.has_rendered_fields() {
            None
        } else {
            datum_decoder(&schema, 1)
                .ok()
                .and_then(|d| FlatLayout::of(&schema, d.schema()))
        };
        Ok(Self {
            schema,
            table,
            fields,
            id_slot,
            time_slot,
            extra_fields,
            flat,
        })
    }
}
