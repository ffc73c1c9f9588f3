//! The Stripe-Signature parser and verifier: first line = header, rest = body.
#![no_main]

use cancelwatch::providers::stripe::signature;
use libfuzzer_sys::fuzz_target;

const SECRETS: [&str; 2] = ["whsec_fuzz_a", "whsec_fuzz_b"];

fuzz_target!(|data: &[u8]| {
    let split = data.iter().position(|&b| b == b'\n').unwrap_or(data.len());
    let Ok(header) = std::str::from_utf8(&data[..split]) else {
        return;
    };
    let body = data.get(split + 1..).unwrap_or_default();
    let secrets: Vec<String> = SECRETS.iter().map(|s| s.to_string()).collect();
    let _ = signature::parse_header(header);
    if signature::verify(header, body, &secrets, 300, 1_761_825_600).is_ok() {
        // Only a header carrying the genuine MAC of this body may verify.
        let genuine: Vec<String> = secrets
            .iter()
            .map(|s| hex_v1(&signature::sign_header(s, ts(header), body)))
            .collect();
        assert!(genuine.iter().any(|v1| header.contains(v1.as_str())));
    }
});

fn ts(header: &str) -> i64 {
    signature::parse_header(header).map(|p| p.timestamp).unwrap_or_default()
}

fn hex_v1(header: &str) -> String {
    header.split_once(",v1=").map(|(_, v)| v.to_string()).unwrap_or_default()
}
