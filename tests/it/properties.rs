//! Property tests over random and mutated input: the verifiers and decoders
//! never panic, and nothing verifies without the right key. Seeded, so a
//! failure names the seed that reproduces it.

use cancelwatch::providers::juice::{checksum, event as juice_event};
use cancelwatch::providers::stripe::{event::ThinEvent, signature};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde_json::{json, Map, Value};

use crate::support::webhooks::STRIPE_FIXTURE;

const ROUNDS: usize = 3_000;
const SECRET: &str = "whsec_property_secret";
const T: i64 = 1_761_825_600;

fn seeds() -> impl Iterator<Item = u64> {
    (0..ROUNDS as u64).map(|i| 0x5eed_0000 + i)
}

fn random_bytes(rng: &mut StdRng, max: usize) -> Vec<u8> {
    let len = rng.gen_range(0..=max);
    (0..len).map(|_| rng.gen()).collect()
}

/// Strings built from the characters a signature header is made of.
fn header_like(rng: &mut StdRng) -> String {
    const ALPHABET: &[u8] = b"tv01=,abcdef0123456789 -_xyzT=V";
    let len = rng.gen_range(0..120);
    (0..len)
        .map(|_| ALPHABET[rng.gen_range(0..ALPHABET.len())] as char)
        .collect()
}

fn mutate(rng: &mut StdRng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    match rng.gen_range(0..4) {
        0 if !out.is_empty() => {
            let i = rng.gen_range(0..out.len());
            out[i] ^= 1 << rng.gen_range(0..8);
        }
        1 if !out.is_empty() => {
            let i = rng.gen_range(0..out.len());
            out.remove(i);
        }
        2 => {
            let i = rng.gen_range(0..=out.len());
            out.insert(i, rng.gen());
        }
        _ => {
            out.push(b' ');
        }
    }
    out
}

fn random_json(rng: &mut StdRng, depth: u32) -> Value {
    let pick = if depth == 0 {
        rng.gen_range(0..5)
    } else {
        rng.gen_range(0..7)
    };
    match pick {
        0 => Value::Null,
        1 => Value::Bool(rng.gen()),
        2 => json!(rng.gen_range(-1_000_000i64..1_000_000)),
        3 => json!(rng.gen_range(-1000.0..1000.0f64)),
        4 => {
            let choices = [
                "",
                "a/b",
                "Zoë",
                "€",
                "\"q\"",
                "\\",
                "line\nbreak",
                "bulk_transfer",
                "\u{1F600}",
            ];
            Value::String(choices[rng.gen_range(0..choices.len())].to_string())
        }
        5 => Value::Array(
            (0..rng.gen_range(0..4))
                .map(|_| random_json(rng, depth - 1))
                .collect(),
        ),
        _ => {
            let mut m = Map::new();
            for _ in 0..rng.gen_range(0..5) {
                let keys = [
                    "id",
                    "bulk_transfer_id",
                    "bulk_transfer",
                    "Zz",
                    "a",
                    "é",
                    "b/c",
                    "10",
                    "2",
                ];
                m.insert(
                    keys[rng.gen_range(0..keys.len())].to_string(),
                    random_json(rng, depth - 1),
                );
            }
            Value::Object(m)
        }
    }
}

#[test]
fn stripe_random_headers_and_bodies_never_panic_or_verify_without_the_key() {
    let secrets = vec![SECRET.to_string()];
    for seed in seeds() {
        let mut rng = StdRng::seed_from_u64(seed);
        let body = random_bytes(&mut rng, 200);
        let header = header_like(&mut rng);
        // Random headers essentially never carry a valid MAC; a random one that
        // does would be a break of HMAC-SHA256.
        assert!(
            signature::verify(&header, &body, &secrets, 300, T).is_err(),
            "seed {seed}"
        );
        let _ = ThinEvent::decode(&body);

        // A genuine header made with another secret never verifies.
        let other = signature::sign_header("whsec_someone_else", T, &body);
        assert!(
            signature::verify(&other, &body, &secrets, 300, T).is_err(),
            "seed {seed}"
        );

        // A genuine header verifies, and any change to the body breaks it.
        let good = signature::sign_header(SECRET, T, &body);
        assert!(
            signature::verify(&good, &body, &secrets, 300, T).is_ok(),
            "seed {seed}"
        );
        let changed = mutate(&mut rng, &body);
        if changed != body {
            assert!(
                signature::verify(&good, &changed, &secrets, 300, T).is_err(),
                "seed {seed}"
            );
        }
        // Mangling the header never panics; it verifies only if the v1 survived intact.
        let mangled = String::from_utf8_lossy(&mutate(&mut rng, good.as_bytes())).into_owned();
        if signature::verify(&mangled, &body, &secrets, 300, T).is_ok() {
            assert!(
                mangled.contains(good.split_once(",v1=").unwrap().1),
                "seed {seed}: {mangled}"
            );
        }
    }
}

#[test]
fn juice_canonical_form_is_stable_and_checksums_need_the_key() {
    let keys = vec!["business-property".to_string()];
    for seed in seeds() {
        let mut rng = StdRng::seed_from_u64(seed);
        let data = random_json(&mut rng, 3);
        let canon = checksum::canonical(&data);
        // Canonical text is JSON for the same value, and canonical again.
        let reparsed: Value =
            serde_json::from_str(&canon).unwrap_or_else(|e| panic!("seed {seed}: {e}: {canon}"));
        assert_eq!(reparsed, data, "seed {seed}");
        assert_eq!(checksum::canonical(&reparsed), canon, "seed {seed}");
        assert!(
            !canon.contains("\\/"),
            "seed {seed}: `/` must not be escaped"
        );

        let event = "bulk_transfer.cancelled";
        let sum = checksum::sign(&keys[0], event, &data);
        assert!(checksum::verify(&sum, event, &data, &keys), "seed {seed}");
        assert!(
            !checksum::verify(&checksum::sign("other", event, &data), event, &data, &keys),
            "seed {seed}"
        );
        let other_data = random_json(&mut rng, 3);
        if checksum::canonical(&other_data) != canon {
            assert!(
                !checksum::verify(&sum, event, &other_data, &keys),
                "seed {seed}"
            );
        }
        let junk = String::from_utf8_lossy(&random_bytes(&mut rng, 70)).into_owned();
        assert!(!checksum::verify(&junk, event, &data, &keys), "seed {seed}");
        let _ = juice_event::bulk_transfer_id(event, &data);
        let _ = juice_event::transfer_id("bulk_transfer.transfer.cancelled", &data);
    }
}

#[test]
fn thin_event_decoder_survives_mutations_of_a_real_event() {
    let fixture = STRIPE_FIXTURE;
    for seed in seeds() {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut body = fixture.to_vec();
        for _ in 0..rng.gen_range(1..6) {
            body = mutate(&mut rng, &body);
        }
        if let Ok(e) = ThinEvent::decode(&body) {
            assert!(!e.id.is_empty() && !e.event_type.is_empty(), "seed {seed}");
        }
    }
}
