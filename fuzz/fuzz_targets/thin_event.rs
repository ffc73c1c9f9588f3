//! The thin-event decoder on arbitrary bytes.
#![no_main]

use cancelwatch::providers::stripe::event::ThinEvent;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = ThinEvent::decode(data) {
        assert!(!e.id.is_empty());
        let _ = e.resource();
    }
});
