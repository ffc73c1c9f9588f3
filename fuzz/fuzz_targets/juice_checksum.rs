//! The Juice canonicaliser and checksum verifier on arbitrary JSON.
#![no_main]

use cancelwatch::providers::juice::{checksum, event};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    let canon = checksum::canonical(&value);
    let again: Value = serde_json::from_str(&canon).expect("canonical text is JSON");
    assert_eq!(checksum::canonical(&again), canon, "canonical form is stable");

    let keys = vec!["fuzz-business".to_string()];
    let name = value.get("event").and_then(Value::as_str).unwrap_or("bulk_transfer.cancelled");
    let payload = value.get("data").unwrap_or(&value);
    if let Some(sum) = value.get("checksum").and_then(Value::as_str) {
        if checksum::verify(sum, name, payload, &keys) {
            assert!(sum.eq_ignore_ascii_case(&checksum::sign(&keys[0], name, payload)));
        }
    }
    let _ = event::bulk_transfer_id(name, payload);
    let _ = event::transfer_id(name, payload);
});
