//! End to end through the CLI's local-file path (`run-file`) and the library: generated Avro
//! files with each codec, a newer schema that adds a field, duplicates, both key layouts, an
//! old file name without the cluster, corrupt variants (which must land in quarantine with
//! nothing published), and every Braze sample when the shared copy is present. The output is
//! then read back by an independent reader, pyarrow from the project venv
//! (`tests/readback.py`), which checks the layout, compression, columns, types, row counts
//! and, for the samples, every value against Braze's decoded JSON.

#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;

use apache_avro::Codec;
use bridge_shared::dir_store::DirStore;
use bytes::Bytes;
use currents_normalize::config::Config;
use currents_normalize::handler::Handler;
use currents_normalize::key;
use currents_normalize::partition::{PartId, PartLocation};
use currents_normalize::quarantine::Keep;
use currents_normalize::registry::{FieldEntry, FieldType, Registry, table_name};
use currents_normalize::report::Outcome;
use currents_normalize::synth::{self, FileSpec};
use serde_json::{Value, json};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn venv_python() -> PathBuf {
    let p = workspace_root().join(".venv/bin/python");
    assert!(
        p.exists(),
        "{} not found: run `make venv` first (it installs testkit/requirements.txt, with pyarrow, into .venv)",
        p.display()
    );
    p
}

fn out_dir() -> PathBuf {
    let d = Path::new(env!("CARGO_TARGET_TMPDIR"))
        .join(format!("currents-readback-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}

fn entry(registry: &Registry, event_type: &str) -> currents_normalize::registry::TableEntry {
    registry
        .entries()
        .iter()
        .find(|e| e.event_type == event_type)
        .unwrap()
        .clone()
}

/// Runs `currents-normalize run-file`; returns the exit code.
fn run_file(out: &Path, input: &Path, key: &str) -> i32 {
    let o = Command::new(env!("CARGO_BIN_EXE_currents-normalize"))
        .args(["run-file"])
        .arg(input)
        .args(["--key", key, "--out"])
        .arg(out)
        .env_remove("AWS_LAMBDA_RUNTIME_API")
        .env("TABLES_PREFIX", "tables/")
        .env("QUARANTINE_PREFIX", "quarantine/")
        .env("REPORTS_PREFIX", "reports/currents/")
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    o.status.code().unwrap_or(-1)
}

fn part_key(event_type: &str, day: &str, key: &str) -> String {
    PartLocation {
        table: table_name(event_type),
        day: chrono::NaiveDate::parse_from_str(day, "%Y-%m-%d").unwrap(),
        id: PartId::for_source(key),
    }
    .key("tables/")
}

fn write_input(dir: &Path, name: &str, bytes: &[u8]) -> PathBuf {
    let p = dir.join("inputs").join(name);
    std::fs::create_dir_all(p.parent().unwrap()).unwrap();
    std::fs::write(&p, bytes).unwrap();
    p
}

#[test]
fn output_reads_back_in_pyarrow_with_the_right_layout_types_and_values() {
    let python = venv_python();
    let out = out_dir();
    let registry = Registry::builtin().unwrap();
    let mut parts: Vec<Value> = Vec::new();
    let mut quarantined: Vec<String> = Vec::new();
    let mut forbidden: Vec<String> = Vec::new();

    // Each codec, with duplicates, in the `<schema-id>/<zone>` layout.
    let send = entry(&registry, "users.messages.email.Send");
    for (i, codec) in [
        Codec::Null,
        Codec::Deflate(Default::default()),
        Codec::Snappy,
    ]
    .into_iter()
    .enumerate()
    {
        let bytes = synth::file(
            &send,
            &FileSpec {
                events: 30,
                duplicates: 3,
                seed: i as u64,
                codec,
            },
        )
        .unwrap();
        let k = synth::key("currents", &send.event_type, "2026-11-29-10", i as u64);
        let input = write_input(&out, &format!("send-{i}.avro"), &bytes);
        assert_eq!(run_file(&out, &input, &k), 0, "codec {codec:?}");
        parts.push(json!({"path": part_key(&send.event_type, "2026-11-29", &k), "table": "users_messages_email_send",
                          "event_type": send.event_type, "rows": 30, "day": "2026-11-29", "source_key": k}));
    }

    // A newer schema with a field the registry does not know, in the `version=<n>` layout.
    let open = entry(&registry, "users.messages.email.Open");
    let mut newer = open.clone();
    newer.fields.push(FieldEntry {
        name: "brand_new_field".into(),
        ty: FieldType::String,
        nullable: true,
        avro: None,
    });
    let bytes = synth::file_with_schema(
        &open,
        &Registry::avro_schema(&newer),
        &FileSpec {
            events: 12,
            duplicates: 0,
            seed: 5,
            codec: Codec::Snappy,
        },
    )
    .unwrap();
    let k = synth::key_versioned("currents", &open.event_type, "2026-11-30-23", 11, 4);
    let input = write_input(&out, "open-newer.avro", &bytes);
    assert_eq!(run_file(&out, &input, &k), 0);
    parts.push(json!({"path": part_key(&open.event_type, "2026-11-30", &k), "table": "users_messages_email_open",
                      "event_type": open.event_type, "rows": 12, "day": "2026-11-30", "source_key": k,
                      "extra_field": "brand_new_field"}));

    // `long` time, arrays, and an old file name without the cluster.
    let wa = entry(&registry, "users.messages.whatsapp.InboundReceive");
    let bytes = synth::file(
        &wa,
        &FileSpec {
            events: 8,
            duplicates: 2,
            seed: 9,
            codec: Codec::Deflate(Default::default()),
        },
    )
    .unwrap();
    let k = "currents/event_type=users.messages.whatsapp.InboundReceive/date=2026-12-01-00/dataexport.S3.integration.599f118afbe76a01c513c63c+2+0000035465.avro";
    let input = write_input(&out, "wa.avro", &bytes);
    assert_eq!(run_file(&out, &input, k), 0);
    parts.push(json!({"path": part_key(&wa.event_type, "2026-12-01", k), "table": "users_messages_whatsapp_inboundreceive",
                      "event_type": wa.event_type, "rows": 8, "day": "2026-12-01", "source_key": k}));

    // Corrupt variants: each is quarantined (exit code 3) and publishes nothing.
    let good = synth::file(
        &send,
        &FileSpec {
            events: 40,
            duplicates: 0,
            seed: 77,
            codec: Codec::Null,
        },
    )
    .unwrap();
    let sync = good[good.len() - 16..].to_vec();
    let header_end = good.windows(16).position(|w| w == sync.as_slice()).unwrap() + 16;
    let mut truncated = good.clone();
    truncated.truncate(good.len() - 50);
    let mut bad_sync = good.clone();
    let n = bad_sync.len();
    bad_sync[n - 3] ^= 0x5a;
    let mut absurd = good[..header_end].to_vec();
    absurd.push(2); // one record...
    absurd.extend_from_slice(&[0xfe, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0x7f]); // ...in ~2^62 bytes
    absurd.extend_from_slice(&[0u8; 64]);
    absurd.extend_from_slice(&sync);
    let variants: [(&str, Vec<u8>); 4] = [
        ("truncated", truncated),
        ("bad-sync", bad_sync),
        (
            "garbage",
            b"\x00\x01 definitely not an Avro container".to_vec(),
        ),
        ("absurd-block", absurd),
    ];
    for (i, (name, bytes)) in variants.into_iter().enumerate() {
        let k = synth::key(
            "currents",
            &send.event_type,
            "2026-11-29-11",
            100 + i as u64,
        );
        let input = write_input(&out, &format!("{name}.avro"), &bytes);
        assert_eq!(
            run_file(&out, &input, &k),
            3,
            "{name} should be quarantined"
        );
        quarantined.push(format!("quarantine/{k}"));
        forbidden.push(part_key(&send.event_type, "2026-11-29", &k));
    }

    // Every Braze sample (when the shared copy is present), through the library.
    let mut samples: Vec<Value> = Vec::new();
    let sample_dir = workspace_root().join("../shared/currents-schemas/sample-data");
    if sample_dir.join("Avro").exists() {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let handler = Handler::new(
            Config::default(),
            Arc::new(DirStore::one_bucket(&out)),
            Arc::new(Registry::builtin().unwrap()),
        );
        let mut files: Vec<PathBuf> = std::fs::read_dir(sample_dir.join("Avro"))
            .unwrap()
            .map(|e| e.unwrap().path())
            .collect();
        files.sort();
        for (i, f) in files.iter().enumerate() {
            let event_type = f.file_stem().unwrap().to_string_lossy().into_owned();
            let k = synth::key("currents", &event_type, "2026-11-29-12", 1000 + i as u64);
            key::parse(&k).unwrap();
            let body = Bytes::from(std::fs::read(f).unwrap());
            let r = rt.block_on(handler.process_bytes(
                &bridge_shared::S3Uri::new("local", &k),
                body.clone(),
                "local",
                Keep::Upload(body),
                false,
            ));
            assert_eq!(r.outcome, Outcome::Written, "{event_type}: {r:?}");
            assert!(
                r.extra_fields.is_empty(),
                "{event_type}: {:?}",
                r.extra_fields
            );
            samples.push(json!({
                "path": part_key(&event_type, "2026-11-29", &k), "table": table_name(&event_type),
                "event_type": event_type, "rows": 1, "day": "2026-11-29", "source_key": k,
                "json": sample_dir.join("JSON").join(format!("{event_type}.json")),
            }));
        }
        assert_eq!(samples.len(), 94);
    } else {
        eprintln!("note: {} absent; samples not checked", sample_dir.display());
    }

    let manifest = json!({
        "out": out,
        "registry": Path::new(env!("CARGO_MANIFEST_DIR")).join("registry/tables.json"),
        "parts": parts,
        "samples": samples,
        "quarantined": quarantined,
        "forbidden_prefixes": forbidden,
    });
    let manifest_path = out.join("manifest.json");
    std::fs::write(
        &manifest_path,
        serde_json::to_vec_pretty(&manifest).unwrap(),
    )
    .unwrap();
    let o = Command::new(&python)
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/readback.py"))
        .arg(&manifest_path)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&o.stdout);
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(
        o.status.success(),
        "pyarrow read-back failed:\n{stdout}\n{stderr}\n(check `{} -c 'import pyarrow'`; `make venv` installs it)",
        python.display()
    );
    eprintln!("{stdout}");
    let _ = std::fs::remove_dir_all(&out);
}
