//! `Stripe-Signature` verification, byte-compatible with the official SDKs
//! (Stripe's webhook signing documentation): HMAC-SHA256 over `t + "." + body`, keyed with the whole
//! secret string, lowercase hex; any `v1` may match any configured secret.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

type HmacSha256 = Hmac<Sha256>;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("the Stripe-Signature header is missing")]
    Missing,
    #[error("the Stripe-Signature header is malformed: {0}")]
    Malformed(&'static str),
    #[error("no v1 signature matches any configured secret")]
    NoMatch,
    #[error("the signature timestamp is {age} s old, over the {tolerance} s tolerance")]
    TooOld { age: i64, tolerance: i64 },
}

/// A parsed header: the timestamp and every `v1` signature as raw bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedHeader {
    pub timestamp: i64,
    pub v1: Vec<Vec<u8>>,
}

/// Parses the header the way the SDKs do: split on `,`, each item at its first
/// `=`. Unknown schemes (and `v0`) are ignored. A `v1` that is not lowercase hex
/// can never match (the SDKs compare the hex text), so it is dropped here. Of
/// several `t=`, the first counts, as in the official SDK: a later one
/// cannot move the time a signature is judged by.
pub fn parse_header(header: &str) -> Result<ParsedHeader, SignatureError> {
    if header.is_empty() {
        return Err(SignatureError::Missing);
    }
    let mut timestamp = None;
    let mut v1 = Vec::new();
    for item in header.split(',') {
        let Some((key, value)) = item.split_once('=') else {
            continue;
        };
        match key {
            "t" if timestamp.is_none() => {
                timestamp = Some(
                    value
                        .parse::<i64>()
                        .map_err(|_| SignatureError::Malformed("t is not a whole number"))?,
                )
            }
            "v1" if is_lower_hex(value) => {
                if let Ok(bytes) = hex::decode(value) {
                    v1.push(bytes);
                }
            }
            _ => {}
        }
    }
    let timestamp = timestamp.ok_or(SignatureError::Malformed("no t= timestamp"))?;
    if v1.is_empty() {
        return Err(SignatureError::NoMatch);
    }
    Ok(ParsedHeader { timestamp, v1 })
}

fn is_lower_hex(s: &str) -> bool {
    !s.is_empty()
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// The raw MAC of one signed payload.
pub fn compute(secret: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
    let mut mac = HmacSha256::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// Verifies a header against every configured secret: signature first, then
/// age (the SDKs' order). Timestamps in the future are accepted, as the SDKs do.
pub fn verify(
    header: &str,
    body: &[u8],
    secrets: &[String],
    tolerance_secs: i64,
    now_unix: i64,
) -> Result<i64, SignatureError> {
    let parsed = parse_header(header)?;
    let mut matched = subtle::Choice::from(0u8);
    for secret in secrets {
        let expected = compute(secret, parsed.timestamp, body);
        for sig in &parsed.v1 {
            matched |= expected.as_slice().ct_eq(sig.as_slice());
        }
    }
    if !bool::from(matched) {
        return Err(SignatureError::NoMatch);
    }
    // Saturating: a timestamp far in the past (down to i64::MIN) is as old
    // as can be, never wrapped round into the future.
    let age = now_unix.saturating_sub(parsed.timestamp);
    if age > tolerance_secs {
        return Err(SignatureError::TooOld {
            age,
            tolerance: tolerance_secs,
        });
    }
    Ok(parsed.timestamp)
}

/// Builds a header as Stripe would send it (used by `sign` and tests).
pub fn sign_header(secret: &str, timestamp: i64, body: &[u8]) -> String {
    format!(
        "t={timestamp},v1={}",
        hex::encode(compute(secret, timestamp, body))
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_timestamp_far_in_the_past_never_wraps_into_tolerance() {
        let body = b"{}";
        let t = i64::MIN;
        let header = format!("t={t},v1={}", hex::encode(compute("whsec_x", t, body)));
        let verdict = verify(&header, body, &["whsec_x".into()], 300, 1_765_000_000);
        assert!(
            matches!(verdict, Err(SignatureError::TooOld { .. })),
            "{verdict:?}"
        );
    }

    #[test]
    fn the_first_timestamp_counts() {
        let body = b"{}";
        let (old, now) = (1_000_000_000, 1_765_000_000);
        let sig = hex::encode(compute("whsec_x", old, body));
        // Signed long ago; a second t= with the current time must not rescue it.
        let header = format!("t={old},v1={sig},t={now}");
        let verdict = verify(&header, body, &["whsec_x".into()], 300, now);
        assert!(
            matches!(verdict, Err(SignatureError::TooOld { .. })),
            "{verdict:?}"
        );
    }

    const FIXTURE: &[u8] =
        include_bytes!("../../../tests/fixtures/stripe/thin_outbound_transfer_posted.json");
    const T: i64 = 1_761_825_600;

    fn secrets(s: &[&str]) -> Vec<String> {
        s.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn vector_a() {
        assert_eq!(FIXTURE.len(), 460);
        let header =
            "t=1761825600,v1=3f4dbda4ce8759293d420063f421a69267d83d5035bb66ccd406716c19c8e163";
        assert_eq!(sign_header("whsec_test_secret", T, FIXTURE), header);
        assert_eq!(
            verify(header, FIXTURE, &secrets(&["whsec_test_secret"]), 300, T),
            Ok(T)
        );
    }

    #[test]
    fn vector_b_utf8_body() {
        let body = "{\"id\":\"evt_1\",\"description\":\"café €\"}".as_bytes();
        let header =
            "t=1700000000,v1=1cdbd8443495e5b4da55e868cdd4ddbb50f13e212331b12958807917a74dc102";
        assert_eq!(sign_header("whsec_abc", 1_700_000_000, body), header);
        assert!(verify(header, body, &secrets(&["whsec_abc"]), 300, 1_700_000_000).is_ok());
    }

    const VECTOR_C: &str = "t=1761825600,v1=a0769562e028f1bcb1fef3ee119f9b329e43c91de702a5e419ea767324f7d153,v1=4ca6d138a15b14a3573a8b3030b7c41b7fb3f3c57578dc10345945dbca8dca57,v0=6ffbb59b2300aae63f272406069a9788598b792a944a07aba816edb039989a39";

    #[test]
    fn vector_c_rotation() {
        for s in ["whsec_new_secret", "whsec_old_secret"] {
            assert!(
                verify(VECTOR_C, FIXTURE, &secrets(&[s]), 300, T).is_ok(),
                "{s}"
            );
        }
        // Configured secrets rotate too: the matching one may be anywhere in the list.
        assert!(verify(
            VECTOR_C,
            FIXTURE,
            &secrets(&["whsec_other", "whsec_old_secret"]),
            300,
            T
        )
        .is_ok());
        assert_eq!(
            verify(VECTOR_C, FIXTURE, &secrets(&["whsec_other"]), 300, T),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn only_v0_fails() {
        let v0 = hex::encode(compute("whsec_test_secret", T, FIXTURE));
        let header = format!("t={T},v0={v0}");
        assert_eq!(
            verify(&header, FIXTURE, &secrets(&["whsec_test_secret"]), 300, T),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn space_after_comma_fails() {
        let good = sign_header("whsec_test_secret", T, FIXTURE);
        let spaced = good.replace(",", ", ");
        assert!(verify(&spaced, FIXTURE, &secrets(&["whsec_test_secret"]), 300, T).is_err());
    }

    #[test]
    fn uppercase_hex_fails() {
        let good = sign_header("whsec_test_secret", T, FIXTURE);
        let (t, v) = good.split_once(",v1=").unwrap();
        let upper = format!("{t},v1={}", v.to_uppercase());
        assert!(verify(&upper, FIXTURE, &secrets(&["whsec_test_secret"]), 300, T).is_err());
    }

    #[test]
    fn tolerance_edges() {
        let header = sign_header("whsec_test_secret", T, FIXTURE);
        let s = secrets(&["whsec_test_secret"]);
        assert!(verify(&header, FIXTURE, &s, 300, T + 300).is_ok());
        assert_eq!(
            verify(&header, FIXTURE, &s, 300, T + 301),
            Err(SignatureError::TooOld {
                age: 301,
                tolerance: 300
            })
        );
        // Future timestamps pass, as in the SDKs.
        assert!(verify(&header, FIXTURE, &s, 300, T - 10_000).is_ok());
        // Signature is checked before age: a bad signature on an old request says so.
        assert_eq!(
            verify(&header, b"{}", &s, 300, T + 1000),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn malformed_headers() {
        let s = secrets(&["whsec_test_secret"]);
        let v1 = hex::encode(compute("whsec_test_secret", T, FIXTURE));
        for (header, want) in [
            ("", SignatureError::Missing),
            (
                &format!("v1={v1}")[..],
                SignatureError::Malformed("no t= timestamp"),
            ),
            (
                &format!("t=abc,v1={v1}")[..],
                SignatureError::Malformed("t is not a whole number"),
            ),
            (&format!("t={T}")[..], SignatureError::NoMatch),
            (&format!("t={T},v1=")[..], SignatureError::NoMatch),
            (
                &format!("t={T},v1=zz{}", &v1[2..])[..],
                SignatureError::NoMatch,
            ),
            (
                &format!("t={T},v1={}", &v1[1..])[..],
                SignatureError::NoMatch,
            ),
            ("garbage", SignatureError::Malformed("no t= timestamp")),
            (",,,", SignatureError::Malformed("no t= timestamp")),
        ] {
            assert_eq!(verify(header, FIXTURE, &s, 300, T), Err(want), "{header:?}");
        }
    }

    #[test]
    fn pretty_printed_body_fails() {
        let header = sign_header("whsec_test_secret", T, FIXTURE);
        let v: serde_json::Value = serde_json::from_slice(FIXTURE).unwrap();
        let pretty = serde_json::to_vec_pretty(&v).unwrap();
        assert_eq!(
            verify(&header, &pretty, &secrets(&["whsec_test_secret"]), 300, T),
            Err(SignatureError::NoMatch)
        );
    }

    #[test]
    fn no_secrets_never_verifies() {
        let header = sign_header("whsec_test_secret", T, FIXTURE);
        assert_eq!(
            verify(&header, FIXTURE, &[], 300, T),
            Err(SignatureError::NoMatch)
        );
    }
}
