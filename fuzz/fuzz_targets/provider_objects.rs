//! The provider-object decoders (Stripe outbound transfers and batch jobs,
//! Juice bulk transfers) on arbitrary JSON: never a panic, and what decodes
//! has the id it was asked for.
#![no_main]

use cancelwatch::providers::{juice, stripe};
use libfuzzer_sys::fuzz_target;
use serde_json::Value;

fuzz_target!(|data: &[u8]| {
    let Ok(value) = serde_json::from_slice::<Value>(data) else {
        return;
    };
    for kind in ["stripe.outbound_transfer", "stripe.batch_job"] {
        if let Ok(obs) = stripe::objects::decode(kind, "obj_fuzz", value.clone()) {
            let _ = stripe::objects::rank(kind, &obs.status);
        }
    }
    let reversed = vec!["reversed".to_string()];
    let _ = juice::objects::decode_bulk("bulk-fuzz", value, &reversed);
});
