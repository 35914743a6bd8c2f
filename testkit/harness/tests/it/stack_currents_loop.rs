//! Braze Currents closes the loop on the local stack: braze-sync syncs three users; Braze then
//! deletes u1 and an SDK changes u2's `loyalty_tier` (and u0's update is this bridge's own
//! write coming back); the Currents files of those changes reach currents-normalize, which
//! writes the profile-change feed into the state bucket; the next, unchanged export sends u1's
//! whole profile and u2's `loyalty_tier`, nothing else. A replayed Currents file changes
//! nothing.

use std::time::Duration;

use apache_avro::types::Value as AvroValue;
use apache_avro::{Codec, Schema, Writer};
use harness::samples;
use harness::stack::{CURRENTS_BUCKET, EXPORTS_BUCKET, STATE_BUCKET, Stack, StackOptions};
use serde_json::{Value, json};

const WAIT: Duration = Duration::from_secs(90);
const HOUR: &str = "2026-12-06-23";

fn some(s: &str) -> AvroValue {
    AvroValue::Union(1, Box::new(AvroValue::String(s.to_string())))
}

fn null() -> AvroValue {
    AvroValue::Union(0, Box::new(AvroValue::Null))
}

/// `users.UserDeleteRequest` as Currents v10 writes it, plus the `external_user_id` a newer
/// schema carries (it lands in the table's `extra` column).
fn delete_file(braze_id: &str, external_id: &str) -> anyhow::Result<Vec<u8>> {
    let schema = Schema::parse_str(
        r#"{"type":"record","name":"UserDeleteRequest","namespace":"dataexport.S3.inner.users","fields":[
            {"name":"id","type":"string"},
            {"name":"user_id","type":"string"},
            {"name":"app_group_id","type":["null","string"],"default":null},
            {"name":"time","type":"int"},
            {"name":"external_user_id","type":["null","string"],"default":null}]}"#,
    )?;
    let mut w = Writer::with_codec(&schema, Vec::new(), Codec::Null)?;
    w.append_value(AvroValue::Record(vec![
        ("id".into(), AvroValue::String("evt-delete-1".into())),
        ("user_id".into(), AvroValue::String(braze_id.into())),
        ("app_group_id".into(), null()),
        ("time".into(), AvroValue::Int(1_796_000_000)),
        ("external_user_id".into(), some(external_id)),
    ]))?;
    Ok(w.into_inner()?)
}

/// `users.profile.Update` (Currents v10 schema): `(external id, source, custom attributes)`.
fn update_file(updates: &[(&str, &str, Value)]) -> anyhow::Result<Vec<u8>> {
    let strings = [
        "first_name",
        "last_name",
        "email_address",
        "gender",
        "phone_number",
        "dob",
        "timezone",
        "home_city",
        "country",
        "language",
        "custom_attributes",
    ];
    let mut fields = String::from(
        r#"{"name":"app_group_id","type":["null","string"],"default":null},
           {"name":"external_user_id","type":["null","string"],"default":null},
           {"name":"id","type":"string"},{"name":"time","type":"int"},{"name":"time_ms","type":"long"},
           {"name":"user_id","type":"string"},{"name":"app_id","type":["null","string"],"default":null},
           {"name":"update_source","type":"string"},
           {"name":"archived","type":["null","boolean"],"default":null}"#,
    );
    for f in strings {
        fields.push_str(&format!(
            r#",{{"name":"{f}","type":["null","string"],"default":null}}"#
        ));
    }
    let schema = Schema::parse_str(&format!(
        r#"{{"type":"record","name":"Update","namespace":"dataexport.S3.inner.users.profile","fields":[{fields}]}}"#
    ))?;
    let mut w = Writer::with_codec(&schema, Vec::new(), Codec::Null)?;
    for (i, (external, source, custom)) in updates.iter().enumerate() {
        let mut rec = vec![
            ("app_group_id".to_string(), null()),
            ("external_user_id".to_string(), some(external)),
            (
                "id".to_string(),
                AvroValue::String(format!("evt-update-{i}")),
            ),
            ("time".to_string(), AvroValue::Int(1_796_000_100)),
            (
                "time_ms".to_string(),
                AvroValue::Long(1_796_000_100_000 + i as i64),
            ),
            (
                "user_id".to_string(),
                AvroValue::String(format!("braze-{external}")),
            ),
            ("app_id".to_string(), null()),
            (
                "update_source".to_string(),
                AvroValue::String(source.to_string()),
            ),
            ("archived".to_string(), null()),
        ];
        for f in strings {
            let v = match f {
                "custom_attributes" => some(&custom.to_string()),
                _ => null(),
            };
            rec.push((f.to_string(), v));
        }
        w.append_value(AvroValue::Record(rec))?;
    }
    Ok(w.into_inner()?)
}

async fn reports(stack: &Stack) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for k in stack.moto.list(STATE_BUCKET, "bridge/reports/").await? {
        out.push(serde_json::from_slice(
            &stack.moto.get(STATE_BUCKET, &k).await?,
        )?);
    }
    out.sort_by_key(|r: &Value| r["started_at"].as_str().unwrap_or("").to_string());
    Ok(out)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_braze_delete_and_an_sdk_update_are_resent_by_the_next_unchanged_export()
-> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        log_dir: std::env::var_os("BRIDGE_TEST_LOGS").map(Into::into),
        ..Default::default()
    })
    .await?;
    let sim = stack.sim.as_ref().expect("sim");
    let (u0, u1, u2) = ("AMP-00000000", "AMP-00000001", "AMP-00000002");

    // 1. Three users reach Braze.
    let export = samples::customers_csv(0..3, 1);
    stack
        .moto
        .put(
            EXPORTS_BUCKET,
            "amperity/customers/customers_1.csv",
            export.clone(),
        )
        .await?;
    stack.wait_idle(WAIT).await?;
    let whole_u1 = sim.user(u1).expect("u1");
    let tier_u2 = sim.user(u2).expect("u2")["loyalty_tier"].clone();
    let tier_u0 = sim.user(u0).expect("u0")["loyalty_tier"].clone();
    assert!(tier_u2.is_string());

    // 2. In Braze: u1 is deleted, an SDK sets u2's tier; u0's update is our own value back.
    sim.seed_user(u1, json!({"external_id": u1}));
    let mut changed = sim.user(u2).expect("u2");
    changed["loyalty_tier"] = json!("platinum");
    sim.seed_user(u2, changed);
    let delete_key = samples::currents_key("currents", "users.UserDeleteRequest", HOUR, 1);
    stack
        .moto
        .put(CURRENTS_BUCKET, &delete_key, delete_file("braze-u1", u1)?)
        .await?;
    let update_key = samples::currents_key("currents", "users.profile.Update", HOUR, 2);
    let update = update_file(&[
        (u2, "SDK", json!({"loyalty_tier": "platinum"})),
        (u0, "REST", json!({"loyalty_tier": tier_u0})),
    ])?;
    stack
        .moto
        .put(CURRENTS_BUCKET, &update_key, update.clone())
        .await?;
    stack.wait_idle(WAIT).await?;
    let feed = stack
        .moto
        .list(STATE_BUCKET, "bridge/state/_currents/feed/")
        .await?;
    assert_eq!(feed.len(), 2, "one feed object per Currents file: {feed:?}");
    for k in &feed {
        println!(
            "feed {k}: {}",
            String::from_utf8_lossy(&stack.moto.get(STATE_BUCKET, k).await?)
        );
    }

    // 3. The same export again: only u1 whole and u2's tier are sent.
    let applied = sim.stats().objects_applied;
    stack
        .moto
        .put(
            EXPORTS_BUCKET,
            "amperity/customers/customers_2.csv",
            export.clone(),
        )
        .await?;
    stack.wait_idle(WAIT).await?;
    let rep = reports(&stack).await?;
    let last = rep.last().expect("a report");
    println!(
        "run 2: status={} forgotten_by_currents={} invalidated_by_currents={} users_sent={} attributes_sent={} unchanged={}",
        last["status"],
        last["forgotten_by_currents"],
        last["invalidated_by_currents"],
        last["users_sent"],
        last["attributes_sent"],
        last["unchanged"]
    );
    assert_eq!(last["status"], "complete", "{last}");
    assert_eq!(last["forgotten_by_currents"], 1, "{last}");
    assert_eq!(last["invalidated_by_currents"], 1, "{last}");
    assert_eq!(last["users_sent"], 2, "{last}");
    let u1_values = whole_u1
        .as_object()
        .expect("object")
        .iter()
        .filter(|(k, v)| *k != "external_id" && !v.is_null())
        .count() as u64;
    assert_eq!(
        last["attributes_sent"],
        json!(u1_values + 1),
        "u1's whole profile and u2's tier: {last}"
    );
    assert_eq!(sim.stats().objects_applied - applied, 2);
    assert_eq!(sim.user(u1).expect("u1"), whole_u1, "u1 is whole again");
    assert_eq!(sim.user(u2).expect("u2")["loyalty_tier"], tier_u2);

    // 4. A replayed Currents file and a third unchanged export: nothing more.
    stack.moto.put(CURRENTS_BUCKET, &update_key, update).await?;
    stack.wait_idle(WAIT).await?;
    let applied = sim.stats().objects_applied;
    stack
        .moto
        .put(EXPORTS_BUCKET, "amperity/customers/customers_3.csv", export)
        .await?;
    stack.wait_idle(WAIT).await?;
    let rep = reports(&stack).await?;
    let last = rep.last().expect("a report");
    println!(
        "run 3 (after a replayed Currents file): forgotten_by_currents={} invalidated_by_currents={} users_sent={}",
        last["forgotten_by_currents"], last["invalidated_by_currents"], last["users_sent"]
    );
    assert_eq!(last["users_sent"], 0, "{last}");
    assert_eq!(last["invalidated_by_currents"], 0, "{last}");
    assert_eq!(sim.stats().objects_applied, applied);
    Ok(())
}
