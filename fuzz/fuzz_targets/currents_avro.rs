//! The Avro path through the normalizer: any bytes, as a Currents object of a registered event
//! type (with array/JSON columns), of another registered type, or of an unknown type (generic
//! table), go through container decoding, the writer schema, the plan, every record and the
//! Parquet encoder. It must end in `Ok` or a clear error: never a panic, an abort or a
//! runaway allocation. The first byte picks the key; the rest is the object.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&pick, object)) = data.split_first() else {
        return;
    };
    let _ = currents_normalize::fuzzing::convert_object(pick, object);
});
