//! The entry point the `currents_avro` fuzz target (`fuzz/`) drives, kept in the library so the
//! inputs it once crashed on are replayed by `tests/it/fuzz_regressions.rs` on stable.

use std::sync::OnceLock;

use crate::convert::{ConvertError, ConvertOptions, Converted, convert};
use crate::key;
use crate::registry::Registry;

/// Keys the first input byte picks from: a registered type whose files carry arrays (JSON
/// columns), a registered type with many columns, and an unknown type (generic table).
pub const KEYS: [&str; 3] = [
    "currents/dataexport.prod-01.S3.integration.5f0c/event_type=users.behaviors.Location/date=2026-11-29-10/421/zone-a/x+0+0000000001.avro",
    "currents/dataexport.prod-01.S3.integration.5f0c/event_type=users.messages.email.Send/date=2026-11-29-10/421/zone-a/x+0+0000000002.avro",
    "currents/dataexport.prod-01.S3.integration.5f0c/event_type=users.future.Thing/date=2026-11-29-10/421/zone-a/x+0+0000000003.avro",
];

fn registry() -> &'static Registry {
    static R: OnceLock<Registry> = OnceLock::new();
    R.get_or_init(|| match Registry::builtin() {
        Ok(r) => r,
        Err(e) => panic!("the builtin registry does not load: {e}"),
    })
}

/// Converts `object` as the Currents object named by `KEYS[pick % 3]`, in memory, with the
/// default limits. The part's bytes are produced (and dropped) like the handler's.
pub fn convert_object(pick: u8, object: &[u8]) -> Result<Option<usize>, ConvertError> {
    let source = KEYS[usize::from(pick) % KEYS.len()];
    let parsed = key::parse(source)?;
    let opts = ConvertOptions {
        spool_dir: None,
        ..Default::default()
    };
    let c: Converted = convert(object, source, &parsed, registry(), &opts)?;
    match c.parquet {
        Some(p) => Ok(Some(p.into_bytes()?.len())),
        None => Ok(None),
    }
}
