//! Export bytes → every reader (each format and compression layer, declared or sniffed) →
//! mapper → delta, as the producer runs them. The first input byte picks how the route
//! declares the object (format / compression / key suffix); the rest is the object.
//! Any outcome but a panic, an abort or unbounded memory is fine.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&selector, body)) = data.split_first() else {
        return;
    };
    braze_sync::fuzzing::export_through_mapper(selector, body);
});
