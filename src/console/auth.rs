//! The console's sign-in: a cookie the daemon signs and checks itself, and
//! the anti-forgery token its forms carry.
//!
//! The cookie holds an expiry and a random nonce under an HMAC keyed with a
//! key drawn at start: it never holds the admin token, a restart signs
//! everyone out, and nothing is stored server-side. Forms carry a second
//! value derived from the nonce (the CSRF token), so a POST needs both the
//! cookie and a value only a page of this console shows; `SameSite=Strict`
//! and a check of `Origin` against `Host` stand before that.

use axum::http::{header, HeaderMap};
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// The cookie's name; it is sent back only under `/ui`.
pub const COOKIE: &str = "cancelwatch_console";
/// How long one sign-in lasts.
pub const SIGN_IN_SECS: i64 = 8 * 3600;

type HmacSha256 = Hmac<Sha256>;

/// The key sign-ins are signed with, one per process.
pub struct Keys {
    key: [u8; 32],
}

/// A valid sign-in, as read from its cookie.
#[derive(Debug, Clone)]
pub struct SignedIn {
    /// What this sign-in's forms must carry.
    pub csrf: String,
    /// Unix seconds at which the sign-in ends.
    pub expires: i64,
}

impl Keys {
    pub fn random() -> Keys {
        let mut key = [0u8; 32];
        rand::thread_rng().fill_bytes(&mut key);
        Keys { key }
    }

    fn mac(&self, parts: &[&str]) -> String {
        let mut m = HmacSha256::new_from_slice(&self.key).expect("HMAC takes any key length");
        for p in parts {
            m.update(p.as_bytes());
            m.update(b"\x1f");
        }
        hex::encode(m.finalize().into_bytes())
    }

    /// A new sign-in from `now` (Unix seconds): the cookie's value.
    pub fn sign_in(&self, now: i64) -> String {
        let mut nonce = [0u8; 16];
        rand::thread_rng().fill_bytes(&mut nonce);
        let nonce = hex::encode(nonce);
        let expires = (now + SIGN_IN_SECS).to_string();
        let mac = self.mac(&["sign-in", &expires, &nonce]);
        format!("{expires}.{nonce}.{mac}")
    }

    /// The sign-in a cookie value stands for, when it was signed here and
    /// has not expired at `now`.
    pub fn check(&self, value: &str, now: i64) -> Option<SignedIn> {
        let mut parts = value.split('.');
        let (expires, nonce, mac) = (parts.next()?, parts.next()?, parts.next()?);
        if parts.next().is_some() {
            return None;
        }
        let want = self.mac(&["sign-in", expires, nonce]);
        if !bool::from(want.as_bytes().ct_eq(mac.as_bytes())) {
            return None;
        }
        let expires: i64 = expires.parse().ok()?;
        if expires <= now {
            return None;
        }
        Some(SignedIn {
            csrf: self.mac(&["csrf", nonce]),
            expires,
        })
    }
}

impl SignedIn {
    /// True when a form's token is this sign-in's.
    pub fn csrf_matches(&self, given: &str) -> bool {
        self.csrf.as_bytes().ct_eq(given.as_bytes()).into()
    }
}

/// The value of the console's cookie in a request, if it has one.
pub fn cookie_value(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|pair| pair.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
}

/// The `Set-Cookie` value that keeps a sign-in.
pub fn set_cookie(value: &str) -> String {
    format!("{COOKIE}={value}; Path=/ui; Max-Age={SIGN_IN_SECS}; HttpOnly; SameSite=Strict")
}

/// The `Set-Cookie` value that ends one.
pub fn clear_cookie() -> String {
    format!("{COOKIE}=; Path=/ui; Max-Age=0; HttpOnly; SameSite=Strict")
}

/// False when the browser says the request comes from another site: an
/// `Origin` that is not this host, or a `Sec-Fetch-Site` other than
/// same-origin (or none: typed or bookmarked). Requests without either
/// header (not from a browser) pass; the CSRF token still applies.
pub fn same_origin(headers: &HeaderMap) -> bool {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        if site != "same-origin" && site != "none" {
            return false;
        }
    }
    match (text(header::ORIGIN.as_str()), text(header::HOST.as_str())) {
        (Some(origin), Some(host)) => {
            let origin_host = origin
                .strip_prefix("http://")
                .or_else(|| origin.strip_prefix("https://"));
            origin_host == Some(host)
        }
        (Some(_), None) => false,
        (None, _) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    #[test]
    fn a_sign_in_checks_until_it_expires() {
        let keys = Keys::random();
        let cookie = keys.sign_in(1_000);
        let signed = keys.check(&cookie, 1_001).unwrap();
        assert_eq!(signed.expires, 1_000 + SIGN_IN_SECS);
        assert!(keys.check(&cookie, 1_000 + SIGN_IN_SECS).is_none());
        assert!(signed.csrf_matches(&keys.check(&cookie, 2_000).unwrap().csrf));
        assert!(!signed.csrf_matches("0000"));
    }

    #[test]
    fn a_changed_or_foreign_cookie_is_refused() {
        let keys = Keys::random();
        let cookie = keys.sign_in(1_000);
        let (expires, rest) = cookie.split_once('.').unwrap();
        let longer = format!("{}.{rest}", expires.parse::<i64>().unwrap() + 3600);
        assert!(keys.check(&longer, 1_001).is_none());
        assert!(Keys::random().check(&cookie, 1_001).is_none());
        assert!(keys.check("", 1_001).is_none());
        assert!(keys.check(&format!("{cookie}.x"), 1_001).is_none());
    }

    #[test]
    fn another_site_is_refused() {
        let mut h = HeaderMap::new();
        h.insert(header::HOST, HeaderValue::from_static("127.0.0.1:8080"));
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        assert!(same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://evil.example"),
        );
        assert!(!same_origin(&h));
        h.insert(
            header::ORIGIN,
            HeaderValue::from_static("http://127.0.0.1:8080"),
        );
        h.insert("sec-fetch-site", HeaderValue::from_static("cross-site"));
        assert!(!same_origin(&h));
    }

    #[test]
    fn the_cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; cancelwatch_console=v.n.m; b=2"),
        );
        assert_eq!(cookie_value(&h), Some("v.n.m"));
    }
}
