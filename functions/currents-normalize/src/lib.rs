//! currents-normalize: Braze Currents Avro object container files in S3 become stable,
//! deduplicated Parquet tables, one per event type, partitioned by delivery day and laid out
//! so Amperity's S3 courier finds them.
//!
//! From key to part: [`key`] (what the object key says) → [`decode`] + [`schema`] (Avro
//! container and writer schema) → [`normalize`] (records → rows of the table's columns, fixed
//! by [`registry`]) → [`encode`] (Parquet, Snappy) → [`partition`] (where the part goes).
//! [`convert`] runs that chain for one object; [`handler`] does the I/O around it.
//!
//! The `dev` feature (off by default, so the function binary does not link them or
//! `apache-avro`) adds `synth` (synthetic Currents files for tests and the benchmark) and
//! `registry_gen` (the registry generator behind `currents-registry`).

pub mod compact;
pub mod config;
pub mod convert;
pub mod decode;
pub mod encode;
pub mod fuzzing;
pub mod handler;
pub mod json;
pub mod key;
pub mod local_store;
pub mod normalize;
pub mod partition;
pub mod quarantine;
pub mod registry;
#[cfg(feature = "dev")]
pub mod registry_gen;
pub mod report;
pub mod schema;
#[cfg(feature = "dev")]
pub mod synth;
