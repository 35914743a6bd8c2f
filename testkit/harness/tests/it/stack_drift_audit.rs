//! `braze-sync audit` on the local stack (moto + runtime emulator + Braze simulator): after a
//! first export reaches Braze, drift is planted in the simulator as other writers would
//! (a changed value, a removed one, a deleted user); the audit finds exactly that drift,
//! `--heal` marks it in the state, and the next unchanged export resends exactly the drifted
//! values (and the deleted user's whole profile), nothing else.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use harness::stack::{BRAZE_KEY, EXPORTS_BUCKET, Stack, StackOptions};
use serde_json::{Map, Value, json};

const WAIT: Duration = Duration::from_secs(90);

const ROUTE: &str = r#"
name = "drift"
prefix = "amperity/drift/"
update_existing_only = false
[identifier]
kind = "external_id"
column = "id"
[fields]
given_name = "first_name"
[attributes.tier]
type = "String"
[attributes.orders]
type = "Integer"
"#;

fn routes_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("bridge-routes-{}-drift", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("drift.toml"), ROUTE)?;
    Ok(dir)
}

fn export(n: usize) -> Vec<u8> {
    let mut s = String::from("id,given_name,tier,orders\n");
    for i in 0..n {
        s.push_str(&format!("u{i},Name{i},gold,{}\n", i % 5));
    }
    s.into_bytes()
}

async fn audit(stack: &Stack, args: &[&str]) -> anyhow::Result<Value> {
    let mut all = vec!["audit", "drift", "--json"];
    all.extend_from_slice(args);
    let out = stack.cli("braze-sync", &all).await?;
    anyhow::ensure!(
        out.status.success(),
        "audit failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

fn attribute<'a>(report: &'a Value, name: &str) -> &'a Value {
    report["attributes"]
        .as_array()
        .and_then(|a| a.iter().find(|x| x["attribute"] == name))
        .unwrap_or(&Value::Null)
}

/// The attribute objects Braze received after request `after`, by external id, without the
/// identifier and `_update_existing_only`.
fn sent_since(stack: &Stack, after: u64) -> BTreeMap<String, Map<String, Value>> {
    let mut out = BTreeMap::new();
    let Some(sim) = stack.sim.as_ref() else {
        return out;
    };
    for r in sim.requests() {
        if r.seq <= after || r.status != Some(201) {
            continue;
        }
        let objects = r
            .body
            .as_ref()
            .and_then(|b| b["attributes"].as_array().cloned())
            .unwrap_or_default();
        for o in objects {
            let Value::Object(mut m) = o else { continue };
            let id = m
                .remove("external_id")
                .and_then(|v| v.as_str().map(str::to_string))
                .unwrap_or_default();
            m.remove("_update_existing_only");
            out.insert(id, m);
        }
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn audit_finds_planted_drift_and_heal_resends_exactly_the_drifted_values()
-> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        currents: false,
        routes_dir: routes_dir()?,
        sim: braze_sim::SimConfig {
            api_key: BRAZE_KEY.to_string(),
            log_bodies: true,
            ..Default::default()
        },
        log_dir: std::env::var_os("BRIDGE_TEST_LOGS").map(Into::into),
        ..Default::default()
    })
    .await?;
    let sim = stack.sim.as_ref().expect("sim");

    // 1. The first export reaches Braze; Braze holds exactly the state.
    stack
        .moto
        .put(EXPORTS_BUCKET, "amperity/drift/drift_1.csv", export(100))
        .await?;
    stack.wait_idle(WAIT).await?;
    assert_eq!(sim.users().len(), 100);
    let clean = audit(&stack, &[]).await?;
    assert_eq!(clean["sampled"], 100);
    assert_eq!(clean["drifted_users"], 0, "{clean:#}");
    assert_eq!(clean["missing_in_braze"], 0);

    // 2. Other writers: an SDK changes u3's tier, a campaign u7's orders, u11's tier is
    // removed, and a privacy request deletes u20.
    assert!(sim.write_as_other("u3", json!({"tier": "platinum"})));
    assert!(sim.write_as_other("u7", json!({"orders": 99})));
    assert!(sim.write_as_other("u11", json!({"tier": null})));
    assert!(sim.delete_user("u20"));

    // 3. The audit finds exactly that, and alone changes nothing.
    let found = audit(&stack, &["--sample", "1000"]).await?;
    println!("audit on planted drift:\n{found:#}");
    assert_eq!(found["sampled"], 100);
    assert_eq!(found["state_users"], 100);
    assert_eq!(found["drifted_users"], 4);
    assert_eq!(found["drift_share"], 0.04);
    assert_eq!(found["estimated_drifted_users"], 4);
    assert_eq!(found["missing_in_braze"], 1);
    assert_eq!(found["missing_examples"], json!(["external_id:u20"]));
    let tier = attribute(&found, "tier");
    assert_eq!(tier["drifted"], 2);
    assert_eq!(tier["checked"], 99);
    let mut examples: Vec<(String, Value, Value)> = tier["examples"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| {
            (
                e["user"].as_str().unwrap().to_string(),
                e["braze"].clone(),
                e["state"].clone(),
            )
        })
        .collect();
    examples.sort_by(|a, b| a.0.cmp(&b.0));
    assert_eq!(
        examples,
        vec![
            ("external_id:u11".into(), Value::Null, json!("gold")),
            ("external_id:u3".into(), json!("platinum"), json!("gold")),
        ]
    );
    let orders = attribute(&found, "orders");
    assert_eq!(orders["drifted"], 1);
    assert_eq!(orders["examples"][0]["braze"], 99);
    assert_eq!(orders["examples"][0]["state"], 2);
    assert_eq!(attribute(&found, "first_name")["drifted"], 0);
    assert!(found["healed"].is_null());
    let again = audit(&stack, &[]).await?;
    assert_eq!(
        again["drifted_users"], 4,
        "an audit without --heal changes nothing"
    );

    // 4. Heal, then the next (unchanged) export resends exactly the drifted values.
    let healed = audit(&stack, &["--heal"]).await?;
    assert_eq!(
        healed["healed"],
        json!({"users": 4, "attributes": 3, "missing_users": 1})
    );
    let before = sim.requests().last().map_or(0, |r| r.seq);
    stack
        .moto
        .put(EXPORTS_BUCKET, "amperity/drift/drift_2.csv", export(100))
        .await?;
    stack.wait_idle(WAIT).await?;
    let sent = sent_since(&stack, before);
    let want: BTreeMap<String, Map<String, Value>> = [
        ("u3", json!({"tier": "gold"})),
        ("u7", json!({"orders": 2})),
        ("u11", json!({"tier": "gold"})),
        (
            "u20",
            json!({"first_name": "Name20", "tier": "gold", "orders": 0}),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.as_object().cloned().unwrap_or_default()))
    .collect();
    assert_eq!(sent, want, "exactly the drifted values are resent");
    assert_eq!(sim.user("u3").expect("u3")["tier"], "gold");
    assert_eq!(sim.user("u20").expect("u20")["first_name"], "Name20");

    // 5. Braze and the state agree again.
    let after = audit(&stack, &[]).await?;
    assert_eq!(after["drifted_users"], 0, "{after:#}");
    assert_eq!(after["missing_in_braze"], 0);
    Ok(())
}
