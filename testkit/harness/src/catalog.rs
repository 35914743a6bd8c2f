//! The catalog of the Currents tables, generated from the registry
//! (`functions/currents-normalize/registry/tables.json`): the Glue tables of `template.yaml`
//! (between its `BEGIN/END GENERATED GLUE TABLES` markers), the same tables as JSON for the CDK
//! construct (`infra/lib/glue-tables.generated.json`), and `functions/currents-normalize/AMPERITY.md`
//! (one Amperity feed per table). `cargo run -p harness --bin currents-catalog` rewrites them;
//! the `catalog_generated` test fails when any is out of date.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use arrow_schema::DataType;
use currents_normalize::registry::{Registry, TableDef};
use serde::Serialize;

/// The line opening the generated block in `template.yaml`.
pub const SAM_BEGIN: &str =
    "  # BEGIN GENERATED GLUE TABLES: cargo run -p harness --bin currents-catalog (do not edit)";
/// The line closing it.
pub const SAM_END: &str = "  # END GENERATED GLUE TABLES";

/// One column of a table.
#[derive(Debug, Clone, Serialize)]
pub struct CatalogColumn {
    /// Column name.
    pub name: String,
    /// Glue/Hive type (`string`, `bigint`, `int`, `double`, `boolean`, `timestamp`).
    pub glue_type: String,
    /// Amperity field type (`String`, `Integer`, `Float`, `Boolean`, `Datetime`).
    #[serde(skip)]
    pub amperity_type: &'static str,
    /// Whether it may be null.
    #[serde(skip)]
    pub nullable: bool,
}

/// One table.
#[derive(Debug, Clone, Serialize)]
pub struct CatalogTable {
    /// CloudFormation logical id.
    pub logical_id: String,
    /// Table (and Glue table) name.
    pub name: String,
    /// Braze event type (empty for the generic table).
    pub event_type: String,
    /// Registry version.
    pub version: u32,
    /// Columns in file order.
    pub columns: Vec<CatalogColumn>,
}

fn types(dt: &DataType) -> (&'static str, &'static str) {
    match dt {
        DataType::Int64 => ("bigint", "Integer"),
        DataType::Int32 => ("int", "Integer"),
        DataType::Float64 => ("double", "Float"),
        DataType::Boolean => ("boolean", "Boolean"),
        DataType::Timestamp(_, _) => ("timestamp", "Datetime"),
        _ => ("string", "String"),
    }
}

fn camel(table: &str) -> String {
    table
        .split('_')
        .map(|w| {
            let mut c = w.chars();
            match c.next() {
                Some(f) => f.to_ascii_uppercase().to_string() + c.as_str(),
                None => String::new(),
            }
        })
        .collect()
}

fn table(def: &TableDef) -> CatalogTable {
    CatalogTable {
        logical_id: format!("CurrentsGlueTable{}", camel(&def.table)),
        name: def.table.clone(),
        event_type: def.event_type.clone(),
        version: def.version,
        columns: def
            .columns
            .iter()
            .map(|c| {
                let (glue, amperity) = types(&c.data_type);
                CatalogColumn {
                    name: c.name.clone(),
                    glue_type: glue.into(),
                    amperity_type: amperity,
                    nullable: c.nullable,
                }
            })
            .collect(),
    }
}

/// Every table of the registry, then the generic table, sorted by name.
pub fn tables(registry: &Registry) -> Vec<CatalogTable> {
    let mut out: Vec<CatalogTable> = registry
        .entries()
        .iter()
        .map(|e| table(&TableDef::registered(e)))
        .collect();
    out.push(table(registry.other_events()));
    out.sort_by(|a, b| a.name.cmp(&b.name));
    out
}

/// The Glue table resources for `template.yaml` (without the markers).
pub fn sam_block(tables: &[CatalogTable]) -> String {
    let mut s = String::new();
    for t in tables {
        let _ = writeln!(s, "  {}:", t.logical_id);
        let _ = writeln!(s, "    Type: AWS::Glue::Table");
        let _ = writeln!(s, "    Properties:");
        let _ = writeln!(s, "      CatalogId: !Ref AWS::AccountId");
        let _ = writeln!(s, "      DatabaseName: !Ref CurrentsGlueDatabase");
        let _ = writeln!(s, "      TableInput:");
        let _ = writeln!(s, "        Name: {}", t.name);
        let _ = writeln!(s, "        Description: {}", description(t));
        let _ = writeln!(s, "        TableType: EXTERNAL_TABLE");
        let _ = writeln!(s, "        Parameters:");
        let _ = writeln!(s, "          classification: parquet");
        let _ = writeln!(s, "          parquet.compression: SNAPPY");
        let _ = writeln!(s, "          projection.enabled: \"true\"");
        let _ = writeln!(s, "          projection.day.type: date");
        let _ = writeln!(s, "          projection.day.format: yyyy-MM-dd");
        let _ = writeln!(s, "          projection.day.range: \"{PROJECTION_RANGE}\"");
        let _ = writeln!(s, "          projection.day.interval: \"1\"");
        let _ = writeln!(s, "          projection.day.interval.unit: DAYS");
        let _ = writeln!(s, "          storage.location.template: !Sub");
        let _ = writeln!(
            s,
            "            - \"s3://${{Bucket}}/${{TablesPrefix}}{t}/{t}_${{!day}}.parquet/\"",
            t = t.name
        );
        let _ = writeln!(s, "            - Bucket: {TABLES_BUCKET}");
        let _ = writeln!(s, "        PartitionKeys: [{{Name: day, Type: string}}]");
        let _ = writeln!(s, "        StorageDescriptor:");
        let _ = writeln!(s, "          Location: !Sub");
        let _ = writeln!(
            s,
            "            - \"s3://${{Bucket}}/${{TablesPrefix}}{}/\"",
            t.name
        );
        let _ = writeln!(s, "            - Bucket: {TABLES_BUCKET}");
        let _ = writeln!(s, "          InputFormat: {INPUT_FORMAT}");
        let _ = writeln!(s, "          OutputFormat: {OUTPUT_FORMAT}");
        let _ = writeln!(s, "          SerdeInfo: {{SerializationLibrary: {SERDE}}}");
        let _ = writeln!(s, "          Columns:");
        for c in &t.columns {
            let _ = writeln!(
                s,
                "            - {{Name: \"{}\", Type: {}}}",
                c.name, c.glue_type
            );
        }
        s.push('\n');
    }
    s
}

const TABLES_BUCKET: &str = "!If [CreateTablesBucket, !Ref TablesBucket, !Ref TablesBucketName]";
/// Days Athena's partition projection covers (Currents began in 2019).
pub const PROJECTION_RANGE: &str = "2019-01-01,NOW";
const INPUT_FORMAT: &str = "org.apache.hadoop.hive.ql.io.parquet.MapredParquetInputFormat";
const OUTPUT_FORMAT: &str = "org.apache.hadoop.hive.ql.io.parquet.MapredParquetOutputFormat";
const SERDE: &str = "org.apache.hadoop.hive.ql.io.parquet.serde.ParquetHiveSerDe";

fn description(t: &CatalogTable) -> String {
    if t.event_type.is_empty() {
        format!(
            "\"Braze Currents events of types the registry does not know (registry v{}), partitioned by delivery day.\"",
            t.version
        )
    } else {
        format!(
            "\"Braze Currents {} events (registry v{}), partitioned by delivery day.\"",
            t.event_type, t.version
        )
    }
}

/// The tables as JSON for the CDK construct.
pub fn cdk_json(tables: &[CatalogTable]) -> String {
    #[derive(Serialize)]
    struct Doc<'a> {
        about: &'static str,
        #[serde(rename = "projectionRange")]
        projection_range: &'static str,
        tables: Vec<CdkTable<'a>>,
    }
    #[derive(Serialize)]
    struct CdkTable<'a> {
        #[serde(rename = "logicalId")]
        logical_id: &'a str,
        name: &'a str,
        description: String,
        columns: Vec<CdkColumn<'a>>,
    }
    #[derive(Serialize)]
    struct CdkColumn<'a> {
        name: &'a str,
        #[serde(rename = "type")]
        ty: &'a str,
    }
    let doc = Doc {
        about: "Generated from functions/currents-normalize/registry/tables.json by `cargo run -p harness --bin currents-catalog`; do not edit.",
        projection_range: PROJECTION_RANGE,
        tables: tables
            .iter()
            .map(|t| CdkTable {
                logical_id: &t.logical_id,
                name: &t.name,
                description: description(t).trim_matches('"').to_string(),
                columns: t
                    .columns
                    .iter()
                    .map(|c| CdkColumn {
                        name: &c.name,
                        ty: &c.glue_type,
                    })
                    .collect(),
            })
            .collect(),
    };
    serde_json::to_string_pretty(&doc).unwrap_or_default() + "\n"
}

/// `AMPERITY.md`: one feed per table.
pub fn amperity_md(tables: &[CatalogTable]) -> String {
    let mut s = String::new();
    s.push_str("# Amperity feeds for the Currents tables\n\n");
    s.push_str(
        "Generated from `registry/tables.json` by `cargo run -p harness --bin currents-catalog`; do not edit\n\
         (a test fails when it is out of date).\n\n\
         Create one S3 courier and one feed per table. Each file pattern below assumes the default\n\
         `TABLES_PREFIX` (`tables/`); put your prefix in front otherwise. The pattern names the day's\n\
         folder: Amperity reads the Parquet parts one directory below it (`part-*.parquet`, Snappy),\n\
         and a courier run for a day finds that day's folder. The day is the Currents delivery day.\n\n\
         Every feed: primary key `id`, load type **Load** (upsert on `id`), so an event delivered\n\
         twice, or read from a part and from the compacted part that replaces it, is one row.\n\
         Timestamps are UTC. `extra` (or `event` in the generic table) is a JSON object as text.\n\n",
    );
    s.push_str("| table | event type | courier file pattern |\n|---|---|---|\n");
    for t in tables {
        let _ = writeln!(
            s,
            "| [`{n}`](#{n}) | {et} | `{p}` |",
            n = t.name,
            et = if t.event_type.is_empty() {
                "(any unregistered)".to_string()
            } else {
                format!("`{}`", t.event_type)
            },
            p = pattern(&t.name)
        );
    }
    for t in tables {
        let _ = writeln!(s, "\n## {}\n", t.name);
        if !t.event_type.is_empty() {
            let _ = writeln!(
                s,
                "Event type `{}`, registry version {}.\n",
                t.event_type, t.version
            );
        } else {
            let _ = writeln!(
                s,
                "Events of types the registry does not know, registry version {}.\n",
                t.version
            );
        }
        let _ = writeln!(s, "- File pattern: `{}`", pattern(&t.name));
        let _ = writeln!(s, "- Primary key: `id`");
        let _ = writeln!(s, "- Load type: Load (upsert)\n");
        s.push_str("| column | Amperity type | nullable |\n|---|---|---|\n");
        for c in &t.columns {
            let _ = writeln!(
                s,
                "| `{}` | {} | {} |",
                c.name,
                c.amperity_type,
                if c.nullable { "yes" } else { "no" }
            );
        }
    }
    s
}

/// The courier file pattern of a table (Joda-style date).
pub fn pattern(table: &str) -> String {
    format!("'tables/{table}/{table}_'yyyy-MM-dd'.parquet'")
}

/// Replaces the generated block of `template` (between the markers).
pub fn splice(template: &str, block: &str) -> Result<String, String> {
    let start = template
        .find(SAM_BEGIN)
        .ok_or_else(|| format!("template.yaml lacks the line {SAM_BEGIN:?}"))?;
    let end = template
        .find(SAM_END)
        .ok_or_else(|| format!("template.yaml lacks the line {SAM_END:?}"))?;
    if end < start {
        return Err("the generated block's markers are out of order".into());
    }
    Ok(format!(
        "{}{SAM_BEGIN}\n{block}{}",
        &template[..start],
        &template[end..]
    ))
}

/// The repository root (from this crate's folder).
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../..")
        .canonicalize()
        .unwrap_or_else(|_| Path::new(env!("CARGO_MANIFEST_DIR")).join("../.."))
}

/// Every generated file with its expected contents, from the committed registry and template.
pub fn generated(root: &Path) -> Result<Vec<(PathBuf, String)>, String> {
    let registry = Registry::builtin().map_err(|e| e.to_string())?;
    let tables = tables(&registry);
    let template_path = root.join("template.yaml");
    let template = std::fs::read_to_string(&template_path)
        .map_err(|e| format!("{}: {e}", template_path.display()))?;
    Ok(vec![
        (template_path, splice(&template, &sam_block(&tables))?),
        (
            root.join("infra/lib/glue-tables.generated.json"),
            cdk_json(&tables),
        ),
        (
            root.join("functions/currents-normalize/AMPERITY.md"),
            amperity_md(&tables),
        ),
    ])
}
