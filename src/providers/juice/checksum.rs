//! Juice webhook checksum (Juice's webhook documentation):
//! `hex(HMAC_SHA256(business id, event + "|" + canonical(data)))`, compared
//! case-insensitively and in constant time against every configured key.

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

/// Compact JSON with object keys sorted at every depth, `/` unescaped and
/// non-ASCII text as raw UTF-8. Written out explicitly so it never depends on
/// serde_json's map ordering features.
pub fn canonical(value: &Value) -> String {
    let mut out = String::new();
    write_canonical(value, &mut out);
    out
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut keys: Vec<&String> = map.keys().collect();
            keys.sort();
            out.push('{');
            for (i, k) in keys.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                // serde_json escapes only what JSON requires: quotes, backslash and
                // control characters; `/` and non-ASCII stay as they are.
                out.push_str(&Value::String(k.clone()).to_string());
                out.push(':');
                write_canonical(&map[k], out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        scalar => out.push_str(&scalar.to_string()),
    }
}

/// Deepest nesting of `data` that is canonicalised: a real event's object
/// nests a few levels.
pub const MAX_DEPTH: usize = 32;
/// Most values (objects, arrays, scalars; keys not counted) in `data` that
/// are canonicalised: about 10 MB of canonical text at the most at real
/// items' sizes, and well above a bulk transfer's items in one event.
pub const MAX_VALUES: usize = 200_000;

/// Checks that canonicalising `data` is bounded work: at most
/// [`MAX_DEPTH`] deep and [`MAX_VALUES`] values. Counting is a walk without
/// allocation, far cheaper than the sort and copy of [`canonical`], so a
/// forged body that would cost much is refused before that work.
pub fn within_bounds(data: &Value) -> Result<(), String> {
    let mut values = 0usize;
    let mut stack = vec![(data, 1usize)];
    while let Some((value, depth)) = stack.pop() {
        values += 1;
        if values > MAX_VALUES {
            return Err(format!("`data` holds more than {MAX_VALUES} values"));
        }
        if depth > MAX_DEPTH {
            return Err(format!("`data` nests deeper than {MAX_DEPTH} levels"));
        }
        match value {
            Value::Object(map) => stack.extend(map.values().map(|v| (v, depth + 1))),
            Value::Array(items) => stack.extend(items.iter().map(|v| (v, depth + 1))),
            _ => {}
        }
    }
    Ok(())
}

pub fn message(event: &str, data: &Value) -> String {
    format!("{event}|{}", canonical(data))
}

pub fn compute(key: &str, event: &str, data: &Value) -> [u8; 32] {
    mac_of(key, &message(event, data))
}

fn mac_of(key: &str, message: &str) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(key.as_bytes()).expect("HMAC takes any key length");
    mac.update(message.as_bytes());
    mac.finalize().into_bytes().into()
}

/// The checksum as Juice shows it: uppercase hex.
pub fn sign(key: &str, event: &str, data: &Value) -> String {
    hex::encode_upper(compute(key, event, data))
}

/// True when `checksum` (hex, either case) matches under any of `keys`.
pub fn verify(checksum: &str, event: &str, data: &Value, keys: &[String]) -> bool {
    let Ok(given) = hex::decode(checksum) else {
        return false;
    };
    // Canonicalised once, whatever the number of keys: it is the costly part.
    let message = message(event, data);
    let mut matched = subtle::Choice::from(0u8);
    for key in keys {
        matched |= mac_of(key, &message).as_slice().ct_eq(given.as_slice());
    }
    bool::from(matched)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Canonicalising is bounded: nesting past [`MAX_DEPTH`] and more than
    /// [`MAX_VALUES`] values are refused before any of that work, a real
    /// event's data passes.
    #[test]
    fn canonicalising_is_bounded() {
        let real = serde_json::json!({"id": "b1", "items": [{"amount": 1, "status": "cancelled"}]});
        assert!(within_bounds(&real).is_ok());
        let mut deep = serde_json::json!(1);
        for _ in 0..MAX_DEPTH {
            deep = serde_json::json!({ "a": deep });
        }
        assert!(within_bounds(&deep).unwrap_err().contains("deeper"));
        let many = Value::Array(vec![serde_json::json!({}); MAX_VALUES]);
        assert!(within_bounds(&many).unwrap_err().contains("more than"));
    }
    use serde_json::json;

    #[test]
    fn documented_vector() {
        let data: Value = serde_json::from_str(
            r#"{"reference":"b070b0d2-0000","currency":"USD","card_id":"81817411-0000","amount":1000}"#,
        )
        .unwrap();
        assert_eq!(
            message("card.transaction", &data),
            r#"card.transaction|{"amount":1000,"card_id":"81817411-0000","currency":"USD","reference":"b070b0d2-0000"}"#
        );
        let want = "E2C2CA42B4D6A900144E2FA9A321409D70DBBEEBE82BF45B04D5C50C97733970";
        assert_eq!(sign("test-business-id", "card.transaction", &data), want);
        let keys = vec!["test-business-id".to_string()];
        assert!(verify(want, "card.transaction", &data, &keys));
        assert!(verify(
            &want.to_lowercase(),
            "card.transaction",
            &data,
            &keys
        ));
        assert!(!verify(want, "card.transactions", &data, &keys));
        assert!(!verify(
            want,
            "card.transaction",
            &data,
            &["other".to_string()]
        ));
        assert!(!verify("not hex", "card.transaction", &data, &keys));
        assert!(!verify("", "card.transaction", &data, &keys));
    }

    /// Canonical form of nested objects, arrays, `/` and non-ASCII text, written
    /// out by hand so the test does not reuse the code under test.
    #[test]
    fn nested_and_non_ascii() {
        let data = json!({
            "z": {"b": [3, {"y": 1, "x": "a/b"}], "a": null},
            "name": "Zoë – €5",
            "amount": -12,
            "ok": true,
            "ratio": 1.5
        });
        let expected = "{\"amount\":-12,\"name\":\"Zoë – €5\",\"ok\":true,\"ratio\":1.5,\"z\":{\"a\":null,\"b\":[3,{\"x\":\"a/b\",\"y\":1}]}}";
        assert_eq!(canonical(&data), expected);

        // Independent HMAC: the hmac crate's generic API over the hand-written message.
        let msg = format!("bulk_transfer.cancelled|{expected}");
        let mut mac = <Hmac<Sha256> as Mac>::new_from_slice(b"biz-42").unwrap();
        mac.update(msg.as_bytes());
        let want = hex::encode_upper(mac.finalize().into_bytes());
        assert_eq!(sign("biz-42", "bulk_transfer.cancelled", &data), want);
        let keys = vec!["old".to_string(), "biz-42".to_string()];
        assert!(verify(&want, "bulk_transfer.cancelled", &data, &keys));
    }

    #[test]
    fn control_characters_and_quotes_are_escaped() {
        let data = json!({"k\"ey": "line\nbreak\\"});
        assert_eq!(canonical(&data), r#"{"k\"ey":"line\nbreak\\"}"#);
    }
}
