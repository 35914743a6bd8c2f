"""Independent read-back of currents-normalize output with pyarrow (run by tests/readback.rs).

Usage: python readback.py <manifest.json>

The manifest lists the parts the Rust side wrote (path, table, expected rows, whether `extra`
must be set), the registry, the quarantine objects that must exist, and the Braze samples with
their decoded JSON. Checks: the Amperity layout of each path, Snappy on every column chunk,
row counts, column names and types, unique ids, and for the samples that every value equals
the value in Braze's decoded JSON (Avro JSON encoding, unions unwrapped).
"""

import json
import math
import os
import re
import sys

import pyarrow as pa
import pyarrow.parquet as pq

ARROW = {
    "string": pa.string(),
    "json": pa.string(),
    "int": pa.int64(),
    "long": pa.int64(),
    "float": pa.float64(),
    "double": pa.float64(),
    "boolean": pa.bool_(),
}
TS = pa.timestamp("us", tz="UTC")
LINEAGE = [
    ("event_time", TS),
    ("source_key", pa.string()),
    ("delivery_hour", TS),
    ("schema_id", pa.int64()),
    ("schema_version", pa.int64()),
    ("registry_version", pa.int32()),
]
PART = re.compile(r"^tables/([a-z0-9_]+)/\1_(\d{4}-\d{2}-\d{2})\.parquet/part-[0-9a-f]{16}\.parquet$")
AVRO_BRANCHES = {"string", "int", "long", "float", "double", "boolean", "bytes", "array", "map"}

failures = []


def fail(msg):
    failures.append(msg)


def expected_columns(entry):
    if entry is None:
        return None
    cols = [(f["name"], ARROW[f["type"]]) for f in entry["fields"]]
    return cols + LINEAGE + [("extra", pa.string())]


def unwrap(v):
    """Avro JSON encoding -> plain value: {"string": "x"} -> "x", recursively."""
    if isinstance(v, dict) and len(v) == 1 and next(iter(v)) in AVRO_BRANCHES:
        return unwrap(next(iter(v.values())))
    if isinstance(v, list):
        return [unwrap(x) for x in v]
    if isinstance(v, dict):
        return {k: unwrap(x) for k, x in v.items()}
    return v


def check_part(out, part, registry):
    path = part["path"]
    m = PART.match(path)
    if not m:
        fail(f"{path}: not in the Amperity layout tables/<t>/<t>_<yyyy-MM-dd>.parquet/part-<id>.parquet")
        return None
    if m.group(1) != part["table"]:
        fail(f"{path}: table folder {m.group(1)} != {part['table']}")
    if part.get("day") and m.group(2) != part["day"]:
        fail(f"{path}: partition day {m.group(2)} != {part['day']}")
    full = os.path.join(out, path)
    if not os.path.isfile(full):
        fail(f"{path}: missing")
        return None
    meta = pq.ParquetFile(full).metadata
    for rg in range(meta.num_row_groups):
        for c in range(meta.num_columns):
            comp = meta.row_group(rg).column(c).compression
            if comp != "SNAPPY":
                fail(f"{path}: column {c} is {comp}, not SNAPPY")
    table = pq.read_table(full)
    if table.num_rows != part["rows"]:
        fail(f"{path}: {table.num_rows} rows, expected {part['rows']}")
    entry = registry.get(part.get("event_type"))
    want = expected_columns(entry)
    if want is not None:
        got = [(f.name, f.type) for f in table.schema]
        if got != want:
            fail(f"{path}: columns differ:\n got  {got}\n want {want}")
        for f in entry["fields"]:
            if not f.get("nullable") and table.schema.field(f["name"]).nullable:
                fail(f"{path}: {f['name']} should be required")
    ids = table.column("id").to_pylist()
    if len(set(ids)) != len(ids):
        fail(f"{path}: duplicate ids")
    if part.get("extra_field"):
        extras = table.column("extra").to_pylist()
        if any(e is None for e in extras):
            fail(f"{path}: extra is null on some rows")
        elif not all(part["extra_field"] in json.loads(e) for e in extras):
            fail(f"{path}: extra lacks {part['extra_field']}")
    elif "extra" in table.column_names and table.column("extra").null_count != table.num_rows:
        fail(f"{path}: extra should be null")
    times = table.column("time").to_pylist()
    event_times = table.column("event_time").cast(pa.int64()).to_pylist()
    if [t * 1_000_000 for t in times] != event_times:
        fail(f"{path}: event_time is not time in seconds")
    if set(table.column("source_key").to_pylist()) != {part["source_key"]}:
        fail(f"{path}: source_key is not the source key")
    return table


def same(a, b):
    if isinstance(a, float) and isinstance(b, float):
        return a == b or (math.isnan(a) and math.isnan(b))
    return a == b


def check_sample(out, sample, registry):
    table = check_part(out, sample, registry)
    if table is None:
        return
    entry = registry[sample["event_type"]]
    with open(sample["json"]) as fh:
        record = {k: unwrap(v) for k, v in json.load(fh).items()}
    row = table.to_pylist()[0]
    for f in entry["fields"]:
        want = record.get(f["name"])
        got = row[f["name"]]
        if f["type"] == "json" and got is not None:
            got = json.loads(got)
        if not same(got, want):
            fail(f"{sample['event_type']}.{f['name']}: parquet {got!r} != sample {want!r}")
    unknown = set(record) - {f["name"] for f in entry["fields"]}
    if unknown:
        fail(f"{sample['event_type']}: sample fields not in the registry: {sorted(unknown)}")


def main():
    with open(sys.argv[1]) as fh:
        manifest = json.load(fh)
    out = manifest["out"]
    with open(manifest["registry"]) as fh:
        registry = {t["event_type"]: t for t in json.load(fh)["tables"]}
    for part in manifest["parts"]:
        check_part(out, part, registry)
    for sample in manifest["samples"]:
        check_sample(out, sample, registry)
    for q in manifest["quarantined"]:
        for suffix in ("", ".reason.json"):
            if not os.path.isfile(os.path.join(out, q + suffix)):
                fail(f"quarantine object {q + suffix} missing")
        with open(os.path.join(out, q + ".reason.json")) as fh:
            reason = json.load(fh)
        if not reason.get("reason") or not reason.get("step"):
            fail(f"{q}: reason has no step or reason")
    tables = [p for p in manifest.get("forbidden_prefixes", []) if os.path.exists(os.path.join(out, p))]
    for p in tables:
        fail(f"{p} exists but nothing may be published for a quarantined file")
    if failures:
        print("\n".join(failures))
        return 1
    print(f"ok: {len(manifest['parts'])} parts, {len(manifest['samples'])} samples, "
          f"{len(manifest['quarantined'])} quarantined (pyarrow {pa.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
