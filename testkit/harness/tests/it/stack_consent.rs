//! Consent on the local stack (moto + runtime emulator + Braze simulator): a route mapping
//! `email_subscribe` and two subscription groups, one of which the workspace does not have.
//! A consent change is sent once (an unchanged export sends nothing again), Braze's
//! `BAD_SUBSCRIPTION_GROUP_ID` puts that user's row in the rejects object with its reason,
//! and a mass unsubscribe (half the group's users in one export) is held with the report
//! saying so, while the export's other changes go.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use harness::stack::{BRAZE_KEY, EXPORTS_BUCKET, STATE_BUCKET, Stack, StackOptions};
use serde_json::{Map, Value, json};

const WAIT: Duration = Duration::from_secs(90);

const ROUTE: &str = r#"
name = "consent"
prefix = "amperity/consent/"
update_existing_only = false
max_departure_share = 0.2
[identifier]
kind = "external_id"
column = "id"
[fields]
given_name = "first_name"
mail = "email_subscribe"
[subscription_groups]
news = "sg-news"
sms = "sg-gone"
"#;

fn routes_dir() -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("bridge-routes-{}-consent", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("consent.toml"), ROUTE)?;
    Ok(dir)
}

/// Ten users; `row(i)` gives user `i`'s `(given_name, mail, news, sms)`.
fn export(row: impl Fn(usize) -> [&'static str; 4]) -> Vec<u8> {
    let mut s = String::from("id,given_name,mail,news,sms\n");
    for i in 0..10 {
        let [name, mail, news, sms] = row(i);
        s.push_str(&format!("u{i},{name},{mail},{news},{sms}\n"));
    }
    s.into_bytes()
}

/// The attribute objects Braze accepted after request `after`, by external id, without the
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

fn last_seq(stack: &Stack) -> u64 {
    stack
        .sim
        .as_ref()
        .and_then(|s| s.requests().last().map(|r| r.seq))
        .unwrap_or(0)
}

async fn objects(stack: &Stack, prefix: &str) -> anyhow::Result<Vec<Value>> {
    let mut out = Vec::new();
    for k in stack.moto.list(STATE_BUCKET, prefix).await? {
        let body = stack.moto.get(STATE_BUCKET, &k).await?;
        if let Ok(v) = serde_json::from_slice::<Value>(&body) {
            out.push(v);
            continue;
        }
        for line in String::from_utf8_lossy(&body).lines() {
            if let Ok(v) = serde_json::from_str::<Value>(line) {
                out.push(v);
            }
        }
    }
    Ok(out)
}

async fn put(stack: &Stack, n: usize, body: Vec<u8>) -> anyhow::Result<()> {
    let key = format!("amperity/consent/consent_{n}.csv");
    stack.moto.put(EXPORTS_BUCKET, &key, body).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consent_is_sent_once_bad_groups_are_rejected_and_a_mass_unsubscribe_is_held()
-> anyhow::Result<()> {
    let stack = Stack::start(StackOptions {
        currents: false,
        routes_dir: routes_dir()?,
        sim: braze_sim::SimConfig {
            api_key: BRAZE_KEY.to_string(),
            log_bodies: true,
            subscription_groups: vec!["sg-news".into()],
            ..Default::default()
        },
        log_dir: std::env::var_os("BRIDGE_TEST_LOGS").map(Into::into),
        ..Default::default()
    })
    .await?;
    let sim = stack.sim.as_ref().expect("sim");

    // 1. Everyone opted in and subscribed to the newsletter; u9 also names the SMS group
    // the workspace does not have: Braze refuses u9's object, which goes to rejects.
    put(
        &stack,
        1,
        export(|i| ["Ann", "Opted-In", "yes", if i == 9 { "yes" } else { "" }]),
    )
    .await?;
    stack.wait_idle(WAIT).await?;
    assert_eq!(sim.users().len(), 9, "u9 was refused");
    let u0 = sim.user("u0").expect("u0");
    assert_eq!(u0["email_subscribe"], "opted_in");
    assert_eq!(u0["subscription_groups"], json!({"sg-news": "subscribed"}));
    let rejects = objects(&stack, "bridge/rejects/consent/").await?;
    println!("rejects after export 1: {rejects:#?}");
    assert_eq!(rejects.len(), 1, "{rejects:#?}");
    let reason = rejects[0]["reason"].as_str().unwrap_or_default();
    assert!(reason.contains("BAD_SUBSCRIPTION_GROUP_ID"), "{reason}");
    assert!(reason.contains("subscription_groups"), "{reason}");

    // 2. u1 unsubscribes from email (1 of 9: within the cap) and u9's SMS column is
    // emptied: u1's change and u9's whole profile are sent, nothing else.
    let second = |i: usize| {
        [
            "Ann",
            if i == 1 { "unsubscribed" } else { "opted_in" },
            "Y",
            "",
        ]
    };
    let before = last_seq(&stack);
    put(&stack, 2, export(second)).await?;
    stack.wait_idle(WAIT).await?;
    let sent = sent_since(&stack, before);
    assert_eq!(sent.keys().collect::<Vec<_>>(), ["u1", "u9"], "{sent:#?}");
    assert_eq!(
        Value::Object(sent["u1"].clone()),
        json!({"email_subscribe": "unsubscribed"})
    );
    assert_eq!(
        sim.user("u1").expect("u1")["email_subscribe"],
        "unsubscribed"
    );
    assert_eq!(
        sim.user("u9").expect("u9")["subscription_groups"],
        json!({"sg-news": "subscribed"})
    );

    // 3. The same export again: the consent change is not sent twice.
    let before = last_seq(&stack);
    put(&stack, 3, export(second)).await?;
    stack.wait_idle(WAIT).await?;
    assert!(sent_since(&stack, before).is_empty(), "nothing changed");

    // 4. Half the newsletter's users unsubscribe in one export (5 of 10, over the 20% cap)
    // while u0 changes their name: the name goes, the unsubscribes are held.
    let before = last_seq(&stack);
    let fourth = |i: usize| {
        let news = if (2..7).contains(&i) {
            "unsubscribed"
        } else {
            "subscribed"
        };
        [
            if i == 0 { "Bea" } else { "Ann" },
            if i == 1 { "unsubscribed" } else { "opted_in" },
            news,
            "",
        ]
    };
    put(&stack, 4, export(fourth)).await?;
    stack.wait_idle(WAIT).await?;
    let sent = sent_since(&stack, before);
    assert_eq!(sent.keys().collect::<Vec<_>>(), ["u0"], "{sent:#?}");
    assert_eq!(
        Value::Object(sent["u0"].clone()),
        json!({"first_name": "Bea"})
    );
    for i in 2..7 {
        let u = sim.user(&format!("u{i}")).expect("user");
        assert_eq!(
            u["subscription_groups"],
            json!({"sg-news": "subscribed"}),
            "u{i}"
        );
    }
    let reports = objects(&stack, "bridge/reports/").await?;
    let held = reports
        .iter()
        .filter_map(|r| r["departures"].as_array())
        .flatten()
        .find(|d| d["audience"] == "subscription_group:sg-news" && d["held"] == 5)
        .cloned()
        .unwrap_or(Value::Null);
    println!("held mass unsubscribe: {held:#}");
    assert_eq!(held["kind"], "unsubscribe");
    assert_eq!(
        (held["members_before"].as_u64(), held["leaving"].as_u64()),
        (Some(10), Some(5))
    );
    let why = held["held_because"].as_str().unwrap_or_default();
    assert!(
        why.contains("5 of 10") && why.contains("to unsubscribed"),
        "{why}"
    );
    assert!(
        reports
            .iter()
            .any(|r| r["departures_held"] == 5
                && r["notes"].to_string().contains("a mass unsubscribe")),
        "the report says so"
    );
    Ok(())
}
