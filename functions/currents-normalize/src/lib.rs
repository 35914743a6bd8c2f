//! currents-normalize: Braze Currents Avro object container files in S3 become stable,
//! deduplicated Parquet tables, one per event type, partitioned by delivery day and laid out
//! so Amperity's S3 courier finds them.
//!
//! From key to part: [`key`] (what the object key says) → [`container`] + [`schema`] (Avro
//! container framing and writer schema) → [`normalize`] (records decoded by `arrow-avro` →
//! rows of the table's columns, fixed by [`registry`]) → [`encode`] (Parquet, Snappy) →
//! [`partition`] (where the part goes). [`convert`] runs that chain for one object;
//! [`handler`] does the I/O around it.
//!
//! The `dev` feature (off by default, so the function binary does not link them or
//! `apache-avro`) adds `synth` (synthetic Currents files for tests and the benchmark) and
//! `registry_gen` (the registry generator behind `currents-registry`); the `fuzzing` feature
//! adds `fuzzing`, the entry point the fuzz target drives.

pub mod backfill;
pub mod compact;
pub mod config;
pub mod container;
pub mod convert;
pub mod datum;
pub mod encode;
#[cfg(feature = "fuzzing")]
pub mod fuzzing;
pub mod handler;
pub mod json;
pub mod key;
pub mod normalize;
pub mod partition;
pub mod profile_feed;
pub mod quarantine;
pub mod registry;
#[cfg(feature = "dev")]
pub mod registry_gen;
pub mod report;
pub mod schema;
pub mod status;
#[cfg(feature = "dev")]
pub mod synth;

#[cfg(test)]
mod tests {
    /// The function binary must not link the test and tooling code: `apache-avro`, `synth`
    /// and `registry_gen` come only with the `dev` feature, which nothing enables by default.
    #[test]
    fn apache_avro_is_only_in_the_dev_feature() {
        let manifest = include_str!("../Cargo.toml");
        let deps = manifest
            .split("[dependencies]")
            .nth(1)
            .and_then(|s| s.split("\n[").next())
            .unwrap_or_default();
        let avro = deps
            .lines()
            .find(|l| l.starts_with("apache-avro"))
            .unwrap_or_default();
        assert!(avro.contains("optional = true"), "{avro:?}");
        assert!(
            manifest.contains("dev = [\"dep:apache-avro\""),
            "the dev feature enables it"
        );
        assert!(!manifest.contains("default = ["), "no default features");
        let lib = include_str!("lib.rs");
        for m in [
            "pub mod synth;",
            "pub mod registry_gen;",
            "pub mod fuzzing;",
        ] {
            let at = lib.find(m).unwrap_or(0);
            assert!(
                lib[..at].ends_with("#[cfg(feature = \"dev\")]\n")
                    || lib[..at].ends_with("#[cfg(feature = \"fuzzing\")]\n"),
                "{m} is behind a feature"
            );
        }
    }
}
