//! Synthetic Currents files for tests and the benchmark: for any registry table, Avro container
//! files written with Braze's naming (`dataexport.S3.inner.<event type>`) and a realistic
//! fill (UUID ids, pooled campaign/canvas ids and names, ~70% of optional fields set, JSON
//! `properties`, arrays), plus Currents-style keys. Deterministic per seed.

use apache_avro::types::Value as AvroValue;
use apache_avro::{Codec, Schema, Writer};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::registry::{FieldType, Registry, TableEntry};

const TIMEZONES: [&str; 6] = [
    "America/New_York",
    "America/Los_Angeles",
    "Europe/Berlin",
    "Europe/London",
    "Asia/Tokyo",
    "Australia/Sydney",
];
const NAMES: [&str; 8] = [
    "Winback November",
    "Welcome Series Day 1",
    "Cart Abandonment 2h",
    "Black Friday Early Access",
    "Loyalty Tier Upgrade",
    "Price Drop Alert",
    "Re-engagement 30d",
    "Birthday Offer",
];
const USER_AGENTS: [&str; 3] = [
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_6_1 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Mobile/15E148",
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Safari/537.36",
    "Mozilla/5.0 (Linux; Android 14; Pixel 8) AppleWebKit/537.36 (KHTML, like Gecko) Chrome/126.0.0.0 Mobile Safari/537.36",
];
const PLATFORMS: [&str; 3] = ["ios", "android", "web"];

/// A file-generation recipe.
#[derive(Debug, Clone, Copy)]
pub struct FileSpec {
    /// Events written (before duplicates).
    pub events: u64,
    /// How many of them are written a second time (at-least-once delivery).
    pub duplicates: u64,
    /// Seed (ids and values derive from it).
    pub seed: u64,
    /// Block codec.
    pub codec: Codec,
}

fn uuid(rng: &mut StdRng) -> String {
    let a: u128 = rng.random();
    let h = format!("{a:032x}");
    format!(
        "{}-{}-4{}-a{}-{}",
        &h[0..8],
        &h[8..12],
        &h[13..16],
        &h[17..20],
        &h[20..32]
    )
}

fn pooled_uuid(pool: u64, n: u64) -> String {
    let mut r = StdRng::seed_from_u64(pool.wrapping_mul(1_000_003).wrapping_add(n));
    uuid(&mut r)
}

fn string_value(field: &str, rng: &mut StdRng, i: u64, user: u64) -> String {
    let camp = rng.random_range(0..40u64);
    match field {
        "user_id" => format!(
            "{:024x}",
            0x639a_35d1_92b0_df00_4d06_u128 + u128::from(user)
        ),
        "external_user_id" => format!("AMP-{user:08}"),
        "timezone" => TIMEZONES[(user % 6) as usize].into(),
        "email_address" => format!("customer.{user}@example.com"),
        "phone_number"
        | "to_phone_number"
        | "user_phone_number"
        | "from_phone_number"
        | "inbound_phone_number" => format!("+1206555{:04}", user % 10_000),
        "url" | "endpoint_url" => format!(
            "https://shop.example.com/p/{}?utm_source=braze&utm_campaign=c{camp}",
            i % 997
        ),
        "short_url" => format!("https://brz.ai/{:x}", i % 65_536),
        "user_agent" => USER_AGENTS[(user % 3) as usize].into(),
        "platform" => PLATFORMS[(user % 3) as usize].into(),
        "os_version" => format!("{}.{}", 14 + user % 4, user % 7),
        "device_model" => ["iPhone15,2", "Pixel 8", "SM-S918B"][(user % 3) as usize].into(),
        "sdk_version" => "5.3.0".into(),
        "properties"
        | "custom_attributes"
        | "message_extras"
        | "flow_response_json"
        | "activity_attributes_type" => format!(
            r#"{{"sku":"SKU-{}","price":{}.99,"category":"{}","in_stock":true}}"#,
            i % 500,
            i % 90,
            ["shoes", "outerwear", "bags", "denim"][(i % 4) as usize]
        ),
        "name" => ["viewed_product", "added_to_cart", "started_checkout"][(i % 3) as usize].into(),
        "currency" => "USD".into(),
        "gender" => ["M", "F", "O", "N"][(user % 4) as usize].into(),
        "country" => ["US", "DE", "FR", "JP"][(user % 4) as usize].into(),
        "language" => ["en", "de", "fr", "ja"][(user % 4) as usize].into(),
        f if f.ends_with("_name") => NAMES[(camp % 8) as usize].into(),
        f if f == "id" || f.ends_with("_id") || f == "dispatch_id" => pooled_uuid(
            u64::from(field.len() as u32) * 31 + u64::from(field.as_bytes()[0]),
            camp,
        ),
        f => format!("{f}-{}", i % 20),
    }
}

struct Row {
    i: u64,
    user: u64,
    time: i64,
}

fn value(name: &str, ty: FieldType, avro: Option<&str>, rng: &mut StdRng, row: &Row) -> AvroValue {
    let Row { i, user, time } = *row;
    match (name, ty) {
        ("time", FieldType::Int) => AvroValue::Int(time as i32),
        ("time", _) => AvroValue::Long(time),
        ("time_ms", _) => AvroValue::Long(time * 1000 + rng.random_range(0..1000)),
        (_, FieldType::String) => AvroValue::String(string_value(name, rng, i, user)),
        (_, FieldType::Int) => AvroValue::Int(rng.random_range(0..5000)),
        (_, FieldType::Long) => AvroValue::Long(rng.random_range(0..5_000_000)),
        (_, FieldType::Float) => AvroValue::Float(rng.random_range(-90.0..90.0)),
        (_, FieldType::Double) => AvroValue::Double(rng.random_range(0.0..1000.0)),
        (_, FieldType::Boolean) => AvroValue::Boolean(rng.random_bool(0.5)),
        (_, FieldType::Json) => {
            let n = rng.random_range(1..3);
            let items = (0..n)
                .map(|k| {
                    let s = AvroValue::String(format!("{name}-{k}"));
                    if avro == Some("array<string?>") {
                        AvroValue::Union(1, Box::new(s))
                    } else {
                        s
                    }
                })
                .collect();
            AvroValue::Array(items)
        }
    }
}

/// One event of `entry` as Avro record fields (optional fields filled with probability 0.7).
pub fn event(entry: &TableEntry, rng: &mut StdRng, i: u64) -> Vec<(String, AvroValue)> {
    let row = Row {
        i,
        user: rng.random_range(0..250_000u64),
        time: 1_795_000_000 + (i % 86_400) as i64,
    };
    let id = uuid(rng);
    entry
        .fields
        .iter()
        .map(|f| {
            let v = if f.name == "id" {
                AvroValue::String(id.clone())
            } else {
                value(&f.name, f.ty, f.avro.as_deref(), rng, &row)
            };
            let v = if f.nullable {
                if f.name == "time_ms" || rng.random_bool(0.7) {
                    AvroValue::Union(1, Box::new(v))
                } else {
                    AvroValue::Union(0, Box::new(AvroValue::Null))
                }
            } else {
                v
            };
            (f.name.clone(), v)
        })
        .collect()
}

/// Writes a container file of `entry`'s events with the given writer schema (JSON); the
/// schema may have fields beyond the registry's (filled with strings) — that is how tests
/// stand in for a newer Currents schema.
pub fn file_with_schema(
    entry: &TableEntry,
    schema_json: &serde_json::Value,
    spec: &FileSpec,
) -> Result<Vec<u8>, apache_avro::Error> {
    let schema = Schema::parse(schema_json)?;
    let extra: Vec<String> = schema_json["fields"]
        .as_array()
        .map(|fs| {
            fs.iter()
                .filter_map(|f| f["name"].as_str())
                .filter(|n| !entry.fields.iter().any(|e| e.name == *n))
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    let mut w = Writer::with_codec(&schema, Vec::new(), spec.codec)?;
    let mut rng = StdRng::seed_from_u64(spec.seed);
    let mut firsts = Vec::new();
    for i in 0..spec.events {
        let mut fields = event(entry, &mut rng, i);
        for name in &extra {
            fields.push((
                name.clone(),
                AvroValue::Union(1, Box::new(AvroValue::String(format!("{name}-{i}")))),
            ));
        }
        if (i as usize) < spec.duplicates as usize {
            firsts.push(fields.clone());
        }
        w.append_value(AvroValue::Record(fields))?;
    }
    for fields in firsts {
        w.append_value(AvroValue::Record(fields))?;
    }
    w.into_inner()
}

/// Writes a container file of `entry`'s events with the registry's own schema.
pub fn file(entry: &TableEntry, spec: &FileSpec) -> Result<Vec<u8>, apache_avro::Error> {
    file_with_schema(entry, &Registry::avro_schema(entry), spec)
}

/// A Currents key in the `<schema-id>/<zone>` layout.
pub fn key(prefix: &str, event_type: &str, hour: &str, offset: u64) -> String {
    let integration = "dataexport.prod-01.S3.integration.5f0c1e2d3b4a";
    format!(
        "{}/{integration}/event_type={event_type}/date={hour}/421/zone-a/{integration}+0+{offset:010}.avro",
        prefix.trim_end_matches('/')
    )
}

/// A Currents key in the `version=<n>/<env>` layout.
pub fn key_versioned(
    prefix: &str,
    event_type: &str,
    hour: &str,
    version: u32,
    offset: u64,
) -> String {
    let integration = "dataexport.prod-03.S3.integration.61a2b3c4d5e6";
    format!(
        "{}/{integration}/event_type={event_type}/date={hour}/version={version}/prod/{integration}+2+{offset:010}.avro",
        prefix.trim_end_matches('/')
    )
}
