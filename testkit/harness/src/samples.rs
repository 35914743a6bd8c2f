//! Sample data written by the project for tests, the demo and benchmarks: Amperity-style
//! customer exports (CSV) and Braze Currents Avro container files. Deterministic per seed.

use apache_avro::types::Value as AvroValue;
use apache_avro::{Codec, Schema, Writer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// The columns of the generated customer export, in order.
pub const CUSTOMER_COLUMNS: [&str; 20] = [
    "amperity_id",
    "email",
    "given_name",
    "surname",
    "birthdate",
    "gender",
    "city",
    "country",
    "language",
    "time_zone",
    "phone",
    "email_opt_in",
    "loyalty_tier",
    "lifetime_value",
    "order_count",
    "last_order_at",
    "is_vip",
    "churn_score",
    "first_order_date",
    "in_winback",
];

const GIVEN: [&str; 8] = [
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken",
];
const SURNAMES: [&str; 8] = [
    "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson",
];
const CITIES: [(&str, &str, &str, &str); 4] = [
    ("Seattle", "US", "en", "America/Los_Angeles"),
    ("Berlin", "DE", "de", "Europe/Berlin"),
    ("Paris", "FR", "fr", "Europe/Paris"),
    ("Tokyo", "JP", "ja", "Asia/Tokyo"),
];
const TIERS: [&str; 3] = ["bronze", "silver", "gold"];

/// One customer row of the generated export, as strings in [`CUSTOMER_COLUMNS`] order.
pub fn customer_row(i: u64, version: u32) -> Vec<String> {
    let mut rng = StdRng::seed_from_u64(i);
    let (city, country, lang, tz) = CITIES[(i % 4) as usize];
    let given = GIVEN[rng.random_range(0..GIVEN.len())];
    let surname = SURNAMES[rng.random_range(0..SURNAMES.len())];
    let ltv_cents: u64 = rng.random_range(0..500_000) + u64::from(version) * 1_250;
    vec![
        format!("AMP-{i:08}"),
        format!(
            "{}.{}{i}@example.com",
            given.to_lowercase(),
            surname.to_lowercase()
        ),
        given.to_string(),
        surname.to_string(),
        format!("19{:02}-{:02}-{:02}", 50 + i % 50, 1 + i % 12, 1 + i % 28),
        ["F", "M", "female", "Other"][(i % 4) as usize].to_string(),
        city.to_string(),
        country.to_string(),
        lang.to_string(),
        tz.to_string(),
        format!("+1206555{:04}", i % 10_000),
        ["true", "false", "Y", "N"][(i % 4) as usize].to_string(),
        TIERS[((i + u64::from(version)) % 3) as usize].to_string(),
        format!("{}.{:02}", ltv_cents / 100, ltv_cents % 100),
        (rng.random_range(0..40) + version).to_string(),
        format!(
            "2026-{:02}-{:02}T{:02}:15:00Z",
            1 + i % 11,
            1 + i % 28,
            i % 24
        ),
        if i.is_multiple_of(10) {
            "true"
        } else {
            "false"
        }
        .to_string(),
        format!("{:.6}", rng.random_range(0.0..1.0_f64)),
        format!("20{:02}-{:02}-{:02}", 10 + i % 15, 1 + i % 12, 1 + i % 28),
        if (i + u64::from(version)).is_multiple_of(5) {
            "true"
        } else {
            "false"
        }
        .to_string(),
    ]
}

/// A CSV export of users `ids` at `version` (a later version changes some values).
pub fn customers_csv(ids: impl IntoIterator<Item = u64>, version: u32) -> Vec<u8> {
    customers_csv_versions(ids.into_iter().map(|i| (i, version)))
}

/// A CSV export where each user has its own version.
pub fn customers_csv_versions(users: impl IntoIterator<Item = (u64, u32)>) -> Vec<u8> {
    let mut w = csv::WriterBuilder::new().from_writer(Vec::new());
    let _ = w.write_record(CUSTOMER_COLUMNS);
    for (i, version) in users {
        let _ = w.write_record(customer_row(i, version));
    }
    w.into_inner().unwrap_or_default()
}

/// The Currents event types the generator can write (a project-written subset of each schema).
pub const CURRENTS_TYPES: [&str; 3] = [
    "users.messages.email.Send",
    "users.messages.email.Open",
    "users.behaviors.CustomEvent",
];

fn schema_json(event_type: &str) -> String {
    let (ns, name) = event_type.rsplit_once('.').unwrap_or(("users", event_type));
    let extra = match event_type {
        "users.behaviors.CustomEvent" => {
            r#"{"name":"name","type":"string"},{"name":"properties","type":"string"},{"name":"app_id","type":["null","string"],"default":null}"#
        }
        "users.messages.email.Open" => {
            r#"{"name":"email_address","type":"string"},{"name":"campaign_id","type":["null","string"],"default":null},{"name":"user_agent","type":["null","string"],"default":null},{"name":"machine_open","type":["null","string"],"default":null}"#
        }
        _ => {
            r#"{"name":"email_address","type":"string"},{"name":"campaign_id","type":["null","string"],"default":null},{"name":"campaign_name","type":["null","string"],"default":null},{"name":"ip_pool","type":["null","string"],"default":null}"#
        }
    };
    format!(
        r#"{{"type":"record","name":"{name}","namespace":"dataexport.S3.inner.{ns}","fields":[
            {{"name":"id","type":"string"}},
            {{"name":"user_id","type":"string"}},
            {{"name":"external_user_id","type":["null","string"],"default":null}},
            {{"name":"time","type":"int"}},
            {{"name":"timezone","type":["null","string"],"default":null}},
            {extra}]}}"#
    )
}

/// An Avro container file of `n` events of `event_type` (first id `first`), with `dups`
/// of them repeated (Currents delivers at least once).
pub fn currents_avro(event_type: &str, first: u64, n: u64, dups: u64) -> anyhow::Result<Vec<u8>> {
    let schema = Schema::parse_str(&schema_json(event_type))?;
    let mut w = Writer::with_codec(&schema, Vec::new(), Codec::Null)?;
    let some = |s: String| AvroValue::Union(1, Box::new(AvroValue::String(s)));
    for i in (first..first + n).chain(first..first + dups.min(n)) {
        let mut fields = vec![
            (
                "id".to_string(),
                AvroValue::String(format!("evt-{event_type}-{i:08}")),
            ),
            (
                "user_id".to_string(),
                AvroValue::String(format!("braze-{:06}", i % 997)),
            ),
            (
                "external_user_id".to_string(),
                some(format!("AMP-{:08}", i % 997)),
            ),
            (
                "time".to_string(),
                AvroValue::Int(1_795_000_000 + (i % 3600) as i32),
            ),
            ("timezone".to_string(), some("America/Los_Angeles".into())),
        ];
        match event_type {
            "users.behaviors.CustomEvent" => {
                fields.push(("name".into(), AvroValue::String("viewed_product".into())));
                fields.push((
                    "properties".into(),
                    AvroValue::String(format!(
                        r#"{{"sku":"SKU-{}","price":{}.5}}"#,
                        i % 50,
                        i % 90
                    )),
                ));
                fields.push((
                    "app_id".into(),
                    AvroValue::Union(0, Box::new(AvroValue::Null)),
                ));
            }
            "users.messages.email.Open" => {
                fields.push((
                    "email_address".into(),
                    AvroValue::String(format!("u{}@example.com", i % 997)),
                ));
                fields.push(("campaign_id".into(), some("camp-winback".into())));
                fields.push(("user_agent".into(), some("Mozilla/5.0".into())));
                fields.push((
                    "machine_open".into(),
                    AvroValue::Union(0, Box::new(AvroValue::Null)),
                ));
            }
            _ => {
                fields.push((
                    "email_address".into(),
                    AvroValue::String(format!("u{}@example.com", i % 997)),
                ));
                fields.push(("campaign_id".into(), some("camp-winback".into())));
                fields.push(("campaign_name".into(), some("Winback November".into())));
                fields.push((
                    "ip_pool".into(),
                    AvroValue::Union(0, Box::new(AvroValue::Null)),
                ));
            }
        }
        w.append_value(AvroValue::Record(fields))?;
    }
    Ok(w.into_inner()?)
}

/// A Currents key in today's layout:
/// `<prefix>/dataexport.prod-01.S3.integration.<id>/event_type=<t>/date=<YYYY-MM-DD-HH>/<schema-id>/<zone>/<file>.avro`.
pub fn currents_key(prefix: &str, event_type: &str, hour: &str, offset: u64) -> String {
    let integration = "dataexport.prod-01.S3.integration.5f0c1e2d3b4a";
    format!(
        "{}/{integration}/event_type={event_type}/date={hour}/421/zone-a/{integration}+0+{offset:010}.avro",
        prefix.trim_end_matches('/')
    )
}

/// A Parquet file (Snappy) of users `ids` at `version`, every column a string as Amperity's
/// Parquet exports of text columns are.
pub fn customers_parquet(
    ids: impl IntoIterator<Item = u64>,
    version: u32,
) -> anyhow::Result<Vec<u8>> {
    use arrow_array::{ArrayRef, RecordBatch, StringArray};
    use arrow_schema::{DataType, Field, Schema as ArrowSchema};
    use std::sync::Arc;
    let rows: Vec<Vec<String>> = ids.into_iter().map(|i| customer_row(i, version)).collect();
    let fields: Vec<Field> = CUSTOMER_COLUMNS
        .iter()
        .map(|c| Field::new(*c, DataType::Utf8, true))
        .collect();
    let schema = Arc::new(ArrowSchema::new(fields));
    let columns: Vec<ArrayRef> = (0..CUSTOMER_COLUMNS.len())
        .map(|c| {
            Arc::new(StringArray::from_iter_values(
                rows.iter().map(|r| r[c].as_str()),
            )) as ArrayRef
        })
        .collect();
    let batch = RecordBatch::try_new(schema.clone(), columns)?;
    let props = parquet::file::properties::WriterProperties::builder()
        .set_compression(parquet::basic::Compression::SNAPPY)
        .build();
    let mut w = parquet::arrow::ArrowWriter::try_new(Vec::new(), schema, Some(props))?;
    w.write(&batch)?;
    Ok(w.into_inner()?)
}
