//! Route TOML → parse, validate, compile (slots, read options, binding).
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data)
        && let Ok(route) = braze_sync::config::route::Route::from_toml(text, "fuzz.toml")
    {
        let _ = route.read_options();
        let _ = route.columns();
        let _ = route.binding();
        let _ = route.slot_names();
    }
});
