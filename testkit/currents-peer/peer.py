#!/usr/bin/env python3
"""Python peer of currents-normalize for `make bench`: the same job done the way a data engineer
would with fastavro + pyarrow, on one core.

For every Currents Avro file under --input (the path below --input is the Currents key):
parse event_type= and date= (and the schema id / version=) from the key, read the records with
fastavro (writer schema from the file), drop records whose `id` was already seen in the file,
lay the fields out in the registry's columns (arrays as JSON text, unknown fields in a JSON
`extra` column), add event_time and the lineage columns, and write
<out>/tables/<table>/<table>_<yyyy-MM-dd>.parquet/part-<id>.parquet with Snappy.
Registered event types only (the benchmark uses no others).

Prints one JSON line: {"events", "rows_written", "files", "seconds", "cpu_seconds", "events_per_s"};
the timers (wall clock, and the process's CPU time over all its threads) cover reading, decoding,
normalizing, encoding and writing, not the interpreter start-up.
"""

import argparse
import hashlib
import json
import os
import re
import sys
import time
from datetime import datetime, timezone

import fastavro
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

EVENT_TYPE = re.compile(r"(?:^|/)event_type=([^/]+)/")
DATE = re.compile(r"(?:^|/)date=(\d{4})-(\d{2})-(\d{2})(?:-(\d{2}))?/")
VERSION = re.compile(r"(?:^|/)version=(\d+)/")
SCHEMA_ID = re.compile(r"/date=[^/]+/(\d+)/[^/]+/")

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


def parse_key(key):
    et = EVENT_TYPE.search(key)
    d = DATE.search(key)
    if not et or not d:
        raise ValueError(f"not a Currents key: {key}")
    y, m, day, hour = d.groups()
    delivery = datetime(int(y), int(m), int(day), int(hour or 0), tzinfo=timezone.utc)
    v = VERSION.search(key)
    s = SCHEMA_ID.search(key)
    return et.group(1), delivery, int(s.group(1)) if s else None, int(v.group(1)) if v else None


def table_schema(entry):
    fields = [pa.field(f["name"], ARROW[f["type"]], nullable=f.get("nullable", False)) for f in entry["fields"]]
    fields += [
        pa.field("event_time", TS, nullable=False),
        pa.field("source_key", pa.string(), nullable=False),
        pa.field("delivery_hour", TS, nullable=False),
        pa.field("schema_id", pa.int64()),
        pa.field("schema_version", pa.int64()),
        pa.field("registry_version", pa.int32(), nullable=False),
        pa.field("extra", pa.string()),
    ]
    return pa.schema(fields)


def normalize(path, key, registry, schemas, out_root):
    event_type, delivery, schema_id, schema_version = parse_key(key)
    entry = registry[event_type]
    schema = schemas[event_type]
    names = [f["name"] for f in entry["fields"]]
    json_fields = [f["name"] for f in entry["fields"] if f["type"] == "json"]
    known = set(names)
    rows = []
    seen = set()
    events = 0
    with open(path, "rb") as fh:
        reader = fastavro.reader(fh)
        unknown = [f["name"] for f in reader.writer_schema["fields"] if f["name"] not in known]
        for rec in reader:
            events += 1
            rid = rec["id"]
            if rid in seen:
                continue
            seen.add(rid)
            for name in json_fields:
                v = rec.get(name)
                if v is not None:
                    rec[name] = json.dumps(v)
            rec["extra"] = json.dumps({n: rec[n] for n in unknown}) if unknown else None
            rows.append(rec)
    n = len(rows)
    body = pa.Table.from_pylist(rows, schema=pa.schema([schema.field(x) for x in names] + [schema.field("extra")]))
    seconds = body.column("time").combine_chunks()
    event_time = pc.multiply(seconds, 1_000_000).cast(pa.int64()).cast(TS)
    table = pa.Table.from_arrays(
        [body.column(x) for x in names]
        + [
            event_time,
            pa.array([key] * n, pa.string()),
            pa.array([delivery] * n, TS),
            pa.array([schema_id] * n, pa.int64()),
            pa.array([schema_version] * n, pa.int64()),
            pa.array([entry["version"]] * n, pa.int32()),
            body.column("extra"),
        ],
        schema=schema,
    )
    part = hashlib.blake2b(key.encode(), digest_size=8).hexdigest()
    t = entry["table"]
    folder = os.path.join(out_root, "tables", t, f"{t}_{delivery:%Y-%m-%d}.parquet")
    os.makedirs(folder, exist_ok=True)
    pq.write_table(table, os.path.join(folder, f"part-{part}.parquet"), compression="snappy")
    return events, n


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--input", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--registry", required=True)
    args = ap.parse_args()
    pa.set_cpu_count(1)
    pa.set_io_thread_count(1)
    with open(args.registry) as fh:
        registry = {t["event_type"]: t for t in json.load(fh)["tables"]}
    schemas = {et: table_schema(e) for et, e in registry.items()}
    files = []
    for dirpath, _, names in os.walk(args.input):
        for name in names:
            if name.endswith(".avro"):
                full = os.path.join(dirpath, name)
                files.append((full, os.path.relpath(full, args.input).replace(os.sep, "/")))
    files.sort()
    start = time.perf_counter()
    cpu_start = time.process_time()
    events = rows = 0
    for path, key in files:
        e, r = normalize(path, key, registry, schemas, args.out)
        events += e
        rows += r
    seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    print(json.dumps({"events": events, "rows_written": rows, "files": len(files),
                      "seconds": seconds, "cpu_seconds": cpu_seconds,
                      "events_per_s": events / seconds if seconds else None}))


if __name__ == "__main__":
    sys.exit(main())
