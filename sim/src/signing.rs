//! How the providers sign what they send, written from their documentation
//! (Stripe's and Juice's webhook documentation) and not from cancelwatch's verifiers: a mistake
//! in the daemon's verification then fails against the simulator instead of
//! being repeated by it.

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;

/// The header Stripe puts its signature in.
pub const STRIPE_SIGNATURE_HEADER: &str = "Stripe-Signature";

/// `HMAC-SHA256(key, message)`.
fn hmac_sha256(key: &[u8], message: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts keys of any length");
    mac.update(message);
    mac.finalize().into_bytes().to_vec()
}

fn hex(bytes: &[u8], upper: bool) -> String {
    bytes
        .iter()
        .map(|b| {
            if upper {
                format!("{b:02X}")
            } else {
                format!("{b:02x}")
            }
        })
        .collect()
}

/// The `Stripe-Signature` value Stripe sends for `body` at unix time `t`:
/// `t=<t>,v1=<lowercase hex of HMAC-SHA256(secret, "<t>.<body>")>`. The key
/// is the whole secret string, `whsec_` prefix included, as bytes.
pub fn stripe_signature(secret: &str, t: i64, body: &[u8]) -> String {
    let mut signed = format!("{t}.").into_bytes();
    signed.extend_from_slice(body);
    format!(
        "t={t},v1={}",
        hex(&hmac_sha256(secret.as_bytes(), &signed), false)
    )
}

/// What Juice's checksum covers: `event + "|" + canonical(data)`.
pub fn juice_message(event: &str, data: &Value) -> String {
    let mut message = format!("{event}|");
    canonical_json(data, &mut message);
    message
}

/// Juice's checksum as Juice shows it: uppercase hex of
/// `HMAC-SHA256(business id, juice_message(event, data))`.
pub fn juice_checksum(business_id: &str, event: &str, data: &Value) -> String {
    let message = juice_message(event, data);
    hex(
        &hmac_sha256(business_id.as_bytes(), message.as_bytes()),
        true,
    )
}

/// Compact JSON, object keys sorted at every depth, `/` not escaped and
/// non-ASCII text as raw UTF-8. Keys are sorted here rather than left to
/// the map type, whose order depends on serde_json's features.
fn canonical_json(value: &Value, out: &mut String) {
    match value {
        Value::Null => out.push_str("null"),
        Value::Bool(b) => out.push_str(if *b { "true" } else { "false" }),
        Value::Number(n) => out.push_str(&n.to_string()),
        Value::String(s) => json_string(s, out),
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                canonical_json(item, out);
            }
            out.push(']');
        }
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, item)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                json_string(key, out);
                out.push(':');
                canonical_json(item, out);
            }
            out.push('}');
        }
    }
}

/// A JSON string literal escaping only what JSON requires: the quote, the
/// backslash and control characters.
fn json_string(s: &str, out: &mut String) {
    out.push('"');
    for c in s.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            '\r' => out.push_str("\\r"),
            '\t' => out.push_str("\\t"),
            '\u{08}' => out.push_str("\\b"),
            '\u{0c}' => out.push_str("\\f"),
            c if (c as u32) < 0x20 => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// The 460 bytes of Stripe test vector A (no trailing newline).
    const BODY_A: &[u8] =
        include_bytes!("../../tests/fixtures/stripe/thin_outbound_transfer_posted.json");

    #[test]
    fn stripe_vector_a() {
        assert_eq!(BODY_A.len(), 460);
        assert_eq!(
            stripe_signature("whsec_test_secret", 1_761_825_600, BODY_A),
            "t=1761825600,v1=3f4dbda4ce8759293d420063f421a69267d83d5035bb66ccd406716c19c8e163"
        );
    }

    #[test]
    fn stripe_vector_b_utf8_body() {
        let body = "{\"id\":\"evt_1\",\"description\":\"café €\"}";
        assert_eq!(
            stripe_signature("whsec_abc", 1_700_000_000, body.as_bytes()),
            "t=1700000000,v1=1cdbd8443495e5b4da55e868cdd4ddbb50f13e212331b12958807917a74dc102"
        );
    }

    /// Vector C holds two `v1` signatures of body A, one for each secret of
    /// a rotation.
    #[test]
    fn stripe_vector_c_rotation() {
        for (secret, v1) in [
            (
                "whsec_new_secret",
                "a0769562e028f1bcb1fef3ee119f9b329e43c91de702a5e419ea767324f7d153",
            ),
            (
                "whsec_old_secret",
                "4ca6d138a15b14a3573a8b3030b7c41b7fb3f3c57578dc10345945dbca8dca57",
            ),
        ] {
            assert_eq!(
                stripe_signature(secret, 1_761_825_600, BODY_A),
                format!("t=1761825600,v1={v1}"),
                "{secret}"
            );
        }
    }

    #[test]
    fn juice_documented_vector() {
        let data: Value = serde_json::from_str(
            r#"{"reference":"b070b0d2-0000","currency":"USD","card_id":"81817411-0000","amount":1000}"#,
        )
        .unwrap();
        assert_eq!(
            juice_message("card.transaction", &data),
            r#"card.transaction|{"amount":1000,"card_id":"81817411-0000","currency":"USD","reference":"b070b0d2-0000"}"#
        );
        assert_eq!(
            juice_checksum("test-business-id", "card.transaction", &data),
            "E2C2CA42B4D6A900144E2FA9A321409D70DBBEEBE82BF45B04D5C50C97733970"
        );
    }

    #[test]
    fn juice_canonical_form_sorts_nested_keys_and_keeps_text_raw() {
        let data = json!({
            "z": {"b": [3, {"y": 1, "x": "a/b"}], "a": null},
            "name": "Zoë – €5",
            "amount": -12,
            "ok": true,
            "ratio": 1.5,
            "k\"ey": "line\nbreak\\\u{1}"
        });
        assert_eq!(
            juice_message("e", &data),
            "e|{\"amount\":-12,\"k\\\"ey\":\"line\\nbreak\\\\\\u0001\",\"name\":\"Zoë – €5\",\"ok\":true,\"ratio\":1.5,\"z\":{\"a\":null,\"b\":[3,{\"x\":\"a/b\",\"y\":1}]}}"
        );
    }
}
