//! Lambda invocation payloads (S3 notifications, SQS-wrapped S3/EventBridge, EventBridge
//! `Object Created`, custom payloads) → `bridge_shared::trigger::parse_invocation`.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(data) {
        let _ = bridge_shared::trigger::parse_invocation(&v);
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = bridge_shared::trigger::decode_s3_key(s);
    }
});
