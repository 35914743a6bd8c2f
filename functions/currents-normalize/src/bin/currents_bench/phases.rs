//! `--phases DIR`: where the time of converting the `.avro` files under DIR (each path below
//! DIR a Currents key) goes, step by step: the steps `convert` takes, timed from outside with
//! the library's public pieces and the default options, `passes` times over the files.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use currents_normalize::container::Container;
use currents_normalize::convert::ConvertOptions;
use currents_normalize::encode::PartWriter;
use currents_normalize::key;
use currents_normalize::normalize::{FileContext, Normalizer, Plan};
use currents_normalize::registry::Registry;
use currents_normalize::schema::WriterSchema;

const STEPS: [&str; 9] = [
    "read", "open", "schema", "plan", "decoder", "writer", "rows", "parquet", "finish",
];

fn files(dir: &Path, out: &mut Vec<PathBuf>) -> std::io::Result<()> {
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            files(&p, out)?;
        } else if p.extension().is_some_and(|x| x == "avro") {
            out.push(p);
        }
    }
    Ok(())
}

/// Times of one file's steps, added to `t`; returns its events.
fn one(
    path: &Path,
    dir: &Path,
    registry: &Registry,
    opts: &ConvertOptions,
    t: &mut [Duration; 9],
) -> anyhow::Result<u64> {
    let k = path.strip_prefix(dir)?.to_string_lossy().to_string();
    let mut lap = Instant::now();
    let mut step = |i: usize, t: &mut [Duration; 9]| {
        let now = Instant::now();
        t[i] += now - lap;
        lap = now;
    };
    let mut bytes = Vec::new();
    std::fs::File::open(path)?.read_to_end(&mut bytes)?;
    let parsed = key::parse(&k)?;
    step(0, t);
    let c = Container::open(&bytes, opts.limits)?;
    step(1, t);
    let schema = WriterSchema::parse(c.schema_json)?;
    step(2, t);
    let plan = Plan::new(schema, &parsed.event_type, registry)?;
    step(3, t);
    let mut decoder = plan.decoder(opts.batch_rows)?;
    step(4, t);
    let mut w = PartWriter::spooled_after(
        plan.table().schema.clone(),
        vec![],
        opts.row_group_rows,
        opts.spool_dir.as_deref(),
        opts.part_memory_bytes,
    )?;
    step(5, t);
    let ctx = FileContext {
        event_type: parsed.event_type.clone(),
        source_key: k.clone(),
        delivery_hour_micros: parsed.delivery.timestamp_micros(),
        schema_id: parsed.schema_id,
        schema_version: parsed.schema_version,
    };
    let n = Normalizer::new(&plan, ctx, opts.batch_rows, bytes.len() / 256);
    let mut writing = Duration::ZERO;
    let stats = n.run_with(&c, &mut decoder, |b| {
        let at = Instant::now();
        let r = w.write(&b).map_err(|e| e.to_string());
        writing += at.elapsed();
        r
    })?;
    step(6, t);
    t[6] = t[6].saturating_sub(writing);
    t[7] += writing;
    let part = w.finish()?.into_bytes()?;
    std::hint::black_box(part);
    step(8, t);
    Ok(stats.events_in)
}

pub fn probe(dir: &Path, passes: usize) -> anyhow::Result<()> {
    let registry = Registry::builtin()?;
    let opts = ConvertOptions::default();
    let mut inputs = Vec::new();
    files(dir, &mut inputs)?;
    inputs.sort();
    let mut t = [Duration::ZERO; 9];
    let mut events = 0;
    for _ in 0..passes.max(1) {
        for path in &inputs {
            events += one(path, dir, &registry, &opts, &mut t)?;
        }
    }
    let total: Duration = t.iter().sum();
    let files = (inputs.len() * passes.max(1)) as f64;
    println!(
        "{files} files, {events} events, {:.3}s = {:.0} events/s",
        total.as_secs_f64(),
        events as f64 / total.as_secs_f64()
    );
    for (name, d) in STEPS.iter().zip(t) {
        println!(
            "{name:>8}: {:8.2} ms/file {:5.1}%",
            d.as_secs_f64() * 1000.0 / files,
            100.0 * d.as_secs_f64() / total.as_secs_f64()
        );
    }
    Ok(())
}
