//! A 1,000,000-user route end to end over the local stack (moto S3, the Braze simulator) with
//! the real `braze-sync` binary held to a 512 MB peak RSS (what Lambda's `MemorySize` limits): the
//! route's state is built by `braze-sync adopt` (nothing sent), then a changed export (2% of
//! the users changed, 0.5% new, 0.5% gone) is synced by `braze-sync run`: the simulator gets
//! exactly the changed, new and departed users, the run's report is complete with the right
//! counts, and the state is committed as one delta per hash range on top of the adopted
//! bases. Each process's peak RSS is measured (GNU time) and printed.

use std::fmt::Write as _;
use std::path::Path;
use std::time::{Duration, Instant};

use harness::moto::{Moto, aws_env};
use harness::paths;
use serde_json::Value;

const USERS: u64 = 1_000_000;
const NEW: u64 = 5_000;
const PARTS: u64 = 4;
const LIMIT_BYTES: u64 = 512 << 20;
const BUCKET: &str = "acme-amperity-exports";
const STATE: &str = "acme-bridge-state";
const API_KEY: &str = "scale-test-key";

/// 20 columns: the identifier, 6 standard fields, 12 custom attributes and 1 audience.
const ROUTE: &str = r#"
name = "big"
prefix = "amperity/big/"
mode = "marker"
update_existing_only = false

[identifier]
kind = "external_id"
column = "id"

[fields]
given_name = "first_name"
surname = "last_name"
email = "email"
city = "home_city"
country = "country"
language = "language"

[attributes.ltv]
type = "Decimal"
round = 2

[attributes.orders]
type = "Integer"

[attributes.tier]
type = "String"

[attributes.score]
type = "Float"

[attributes.vip]
type = "Boolean"

[attributes.first_order]
type = "Date"

[attributes.points]
type = "Integer"

[attributes.visits]
type = "Integer"

[attributes.segment]
type = "String"

[attributes.channel]
type = "String"

[attributes.store]
type = "String"

[attributes.region]
type = "String"

[[audiences]]
attribute = "aud_winback"
column = "in_winback"
on_leave = "false"
"#;

const HEADER: &str = "id,given_name,surname,email,city,country,language,ltv,orders,tier,score,vip,first_order,points,visits,segment,channel,store,region,in_winback\n";
const GIVEN: [&str; 8] = [
    "Ada", "Grace", "Alan", "Edsger", "Barbara", "Donald", "Frances", "Ken",
];
const SURNAMES: [&str; 8] = [
    "Lovelace", "Hopper", "Turing", "Dijkstra", "Liskov", "Knuth", "Allen", "Thompson",
];
const CITIES: [(&str, &str, &str); 4] = [
    ("Seattle", "US", "en"),
    ("Berlin", "DE", "de"),
    ("Paris", "FR", "fr"),
    ("Tokyo", "JP", "ja"),
];
const TIERS: [&str; 3] = ["bronze", "silver", "gold"];
const SEGMENTS: [&str; 5] = ["new", "active", "lapsing", "lapsed", "loyal"];
const CHANNELS: [&str; 3] = ["email", "sms", "push"];
const REGIONS: [&str; 3] = ["na", "eu", "apac"];

/// Users whose values change in the second export.
fn changed(i: u64) -> bool {
    i.is_multiple_of(50)
}

/// Users absent from the second export.
fn gone(i: u64) -> bool {
    i % 200 == 7
}

/// Members of the audience.
fn member(i: u64) -> bool {
    i.is_multiple_of(3)
}

/// `orders` and `tier` of user `i` at `version`.
fn orders(i: u64, version: u64) -> u64 {
    i % 40 + version
}

fn tier(i: u64, version: u64) -> &'static str {
    TIERS[((i + version) % 3) as usize]
}

fn row(out: &mut String, i: u64, version: u64) {
    let (city, country, lang) = CITIES[(i % 4) as usize];
    let _ = writeln!(
        out,
        "U{i:07},{},{},u{i}@example.com,{city},{country},{lang},{}.{:02},{},{},0.{},{},20{}-{:02}-{:02},{},{},{},{},S{},{},{}",
        GIVEN[(i % 8) as usize],
        SURNAMES[((i / 8) % 8) as usize],
        i % 100_000,
        i % 100,
        orders(i, version),
        tier(i, version),
        i % 10,
        i.is_multiple_of(10),
        10 + i % 15,
        1 + i % 12,
        1 + i % 28,
        i % 1000,
        i % 77,
        SEGMENTS[(i % 5) as usize],
        CHANNELS[(i % 3) as usize],
        i % 300,
        REGIONS[(i % 3) as usize],
        member(i),
    );
}

/// The parts of an export of `users` (`(user, version)`), split in [`PARTS`] CSV parts.
fn parts(users: &[(u64, u64)]) -> Vec<Vec<u8>> {
    let per = users.len().div_ceil(PARTS as usize);
    users
        .chunks(per)
        .map(|chunk| {
            let mut s = String::with_capacity(chunk.len() * 200 + HEADER.len());
            s.push_str(HEADER);
            for &(i, v) in chunk {
                row(&mut s, i, v);
            }
            s.into_bytes()
        })
        .collect()
}

async fn upload(moto: &Moto, folder: &str, users: &[(u64, u64)]) -> anyhow::Result<String> {
    for (p, body) in parts(users).into_iter().enumerate() {
        moto.put(BUCKET, &format!("{folder}/part-{p:03}.csv"), body)
            .await?;
    }
    let marker = format!("{folder}/.DONE");
    moto.put(BUCKET, &marker, Vec::new()).await?;
    Ok(format!("s3://{BUCKET}/{marker}"))
}

/// What one `braze-sync` process did.
struct Ran {
    stdout: String,
    peak_rss_mb: f64,
    cpu_s: f64,
    wall_s: f64,
}

/// Runs `braze-sync <args>`, measuring its peak RSS with GNU time. No address-space limit: the
/// function's allocator (mimalloc) maps more address space than it touches, and Lambda limits
/// the memory a container uses, not its mappings; the peak RSS is asserted against the limit.
async fn braze_sync(
    args: &[&str],
    moto: &Moto,
    sim: &braze_sim::SimHandle,
    routes: &Path,
    tmp: &Path,
) -> anyhow::Result<Ran> {
    let rss_file = tmp.join("rss.txt");
    let started = Instant::now();
    let out = tokio::process::Command::new("/usr/bin/time")
        .arg("-f")
        .arg("%M %U %S")
        .arg("-o")
        .arg(&rss_file)
        .arg(paths::function_binary("braze-sync")?)
        .args(args)
        .envs(aws_env(&moto.endpoint))
        .env("ROUTES_LOCATION", routes)
        .env("STATE_BUCKET", STATE)
        .env("BRAZE_REST_ENDPOINT", sim.base_url())
        .env("BRAZE_API_KEY", API_KEY)
        .env("BRAZE_RATE_LIMIT_REQUESTS", "100000")
        .env("BRAZE_RATE_LIMIT_WINDOW_SECS", "1")
        // The function's memory and ephemeral storage as the sizing guide sets them for 1M.
        .env("AWS_LAMBDA_FUNCTION_MEMORY_SIZE", "512")
        .env("BRIDGE_EPHEMERAL_STORAGE_MB", "2048")
        .env("TMPDIR", tmp)
        .env(
            "RUST_LOG",
            std::env::var("BRIDGE_SCALE_LOG").unwrap_or_else(|_| "warn".into()),
        )
        .stdin(std::process::Stdio::null())
        .kill_on_drop(true)
        .output()
        .await?;
    let wall_s = started.elapsed().as_secs_f64();
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    anyhow::ensure!(
        out.status.success(),
        "braze-sync {args:?} failed (memory limit {} MB) ({}):\n{stdout}\n{}",
        LIMIT_BYTES >> 20,
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    if std::env::var_os("BRIDGE_SCALE_LOG").is_some() {
        eprintln!("{}", String::from_utf8_lossy(&out.stderr));
    }
    // GNU time's last line: peak RSS in KB, user and system CPU seconds.
    let measured = std::fs::read_to_string(&rss_file)?;
    let fields: Vec<f64> = measured
        .lines()
        .last()
        .unwrap_or_default()
        .split_whitespace()
        .filter_map(|f| f.parse().ok())
        .collect();
    anyhow::ensure!(fields.len() == 3, "GNU time wrote {measured:?}");
    Ok(Ran {
        stdout,
        peak_rss_mb: fields[0] / 1024.0,
        cpu_s: fields[1] + fields[2],
        wall_s,
    })
}

async fn json(moto: &Moto, key: &str) -> anyhow::Result<Value> {
    Ok(serde_json::from_slice(&moto.get(STATE, key).await?)?)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_million_user_route_adopts_then_syncs_its_changes_under_512_mb() -> anyhow::Result<()> {
    for tool in ["/usr/bin/time"] {
        if std::process::Command::new(tool)
            .arg("--version")
            .output()
            .is_err()
        {
            eprintln!("{tool} is not installed: skipped");
            return Ok(());
        }
    }
    let started = Instant::now();
    let tmp = tempfile_dir()?;
    let routes = tmp.join("routes");
    std::fs::create_dir_all(&routes)?;
    std::fs::write(routes.join("big.toml"), ROUTE)?;
    let moto = Moto::start(None).await?;
    moto.create_bucket(BUCKET).await?;
    moto.create_bucket(STATE).await?;
    let sim = braze_sim::start(braze_sim::SimConfig {
        api_key: API_KEY.into(),
        rate_limit_requests: 100_000,
        rate_limit_window: Duration::from_secs(1),
        ..Default::default()
    })
    .await?;

    // 1. Adopt the first export: the state records every user, nothing is sent.
    let first: Vec<(u64, u64)> = (0..USERS).map(|i| (i, 1)).collect();
    let marker1 = upload(&moto, "amperity/big/run-1", &first).await?;
    drop(first);
    let setup_s = started.elapsed().as_secs_f64();
    let adopted = braze_sync(&["adopt", &marker1], &moto, &sim, &routes, &tmp).await?;
    let adopt: Value = serde_json::from_str(&adopted.stdout)?;
    assert_eq!(adopt["status"], "adopted", "{adopt}");
    assert_eq!(adopt["state_users"], USERS, "{adopt}");
    assert_eq!(sim.stats().objects_applied, 0, "adoption sends nothing");
    let head_key = "bridge/state/big/head.json";
    let adopted_head = json(&moto, head_key).await?;
    assert_eq!(adopted_head["users"], USERS);

    // 2. A changed export: 2% changed, 0.5% new, 0.5% gone (a third of them audience
    // members, who get their removal).
    let second: Vec<(u64, u64)> = (0..USERS + NEW)
        .filter(|i| *i >= USERS || !gone(*i))
        .map(|i| (i, if changed(i) { 2 } else { 1 }))
        .collect();
    let rows = second.len() as u64;
    let marker2 = upload(&moto, "amperity/big/run-2", &second).await?;
    drop(second);
    let ran = braze_sync(&["run", &marker2], &moto, &sim, &routes, &tmp).await?;

    let n_changed = (0..USERS).filter(|i| changed(*i) && !gone(*i)).count() as u64;
    let n_departed = (0..USERS).filter(|i| gone(*i) && member(*i)).count() as u64;
    let users = sim.users();
    assert_eq!(
        users.len() as u64,
        n_changed + NEW + n_departed,
        "the simulator got exactly the changed, new and departed users"
    );
    assert_eq!(sim.stats().objects_applied, n_changed + NEW + n_departed);
    for (id, profile) in &users {
        let i: u64 = id.trim_start_matches('U').parse()?;
        if i >= USERS {
            assert_eq!(profile["first_name"], GIVEN[(i % 8) as usize], "{id}");
            assert_eq!(profile["aud_winback"], member(i), "{id}");
        } else if gone(i) {
            assert_eq!(profile["aud_winback"], false, "{id}: {profile}");
            assert!(profile.get("orders").is_none(), "{id}: {profile}");
        } else {
            assert!(changed(i), "{id} was sent but did not change: {profile}");
            assert_eq!(profile["orders"], orders(i, 2), "{id}");
            assert_eq!(profile["tier"], tier(i, 2), "{id}");
            assert!(
                profile.get("first_name").is_none(),
                "{id}: only changes are sent: {profile}"
            );
        }
    }

    // The run's report.
    let reports: Vec<String> = moto
        .list(STATE, "bridge/reports/big/")
        .await?
        .into_iter()
        .filter(|k| !k.contains("adopt-"))
        .collect();
    assert_eq!(reports.len(), 1, "{reports:?}");
    let report = json(&moto, &reports[0]).await?;
    assert_eq!(report["status"], "complete", "{report}");
    assert_eq!(report["rows_in"], rows, "{report}");
    assert_eq!(report["rejected"], 0, "{report}");
    assert_eq!(report["unchanged"], rows - n_changed - NEW, "{report}");
    assert_eq!(
        report["users_sent"],
        n_changed + NEW + n_departed,
        "{report}"
    );
    assert_eq!(report["departures_sent"], n_departed, "{report}");
    assert_eq!(report["users_unconfirmed"], 0, "{report}");

    // The state: every user, the adopted bases kept, one delta per range on top.
    let head = json(&moto, head_key).await?;
    assert_eq!(head["users"], USERS + NEW, "{head}");
    let ranges = head["ranges"].as_array().cloned().unwrap_or_default();
    assert!(ranges.len() >= 4, "{head}");
    for (r, (now, before)) in ranges
        .iter()
        .zip(adopted_head["ranges"].as_array().into_iter().flatten())
        .enumerate()
    {
        assert_eq!(now["base"], before["base"], "range {r}: base kept");
        assert_eq!(
            now["deltas"].as_array().map(Vec::len),
            Some(1),
            "range {r}: one delta"
        );
    }

    eprintln!(
        "1M-user route, memory limit {} MB: setup {setup_s:.1} s; adopt {:.1} s ({:.1} s CPU), peak RSS {:.0} MB; changed export ({rows} rows, {} users sent) {:.1} s ({:.1} s CPU), peak RSS {:.0} MB; total {:.1} s",
        LIMIT_BYTES >> 20,
        adopted.wall_s,
        adopted.cpu_s,
        adopted.peak_rss_mb,
        n_changed + NEW + n_departed,
        ran.wall_s,
        ran.cpu_s,
        ran.peak_rss_mb,
        started.elapsed().as_secs_f64()
    );
    assert!(adopted.peak_rss_mb < (LIMIT_BYTES >> 20) as f64);
    assert!(ran.peak_rss_mb < (LIMIT_BYTES >> 20) as f64);
    let _ = std::fs::remove_dir_all(&tmp);
    Ok(())
}

/// A fresh folder under the system temporary folder.
fn tempfile_dir() -> anyhow::Result<std::path::PathBuf> {
    let p = std::env::temp_dir().join(format!(
        "braze-sync-1m-{}-{:08x}",
        std::process::id(),
        rand::random::<u32>()
    ));
    std::fs::create_dir_all(&p)?;
    Ok(p)
}
