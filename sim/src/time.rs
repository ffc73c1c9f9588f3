//! Times as the simulated providers write and read them.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};

/// RFC 3339 in UTC with milliseconds (`2026-10-30T12:00:00.000Z`), the form
/// Stripe's v2 API uses.
pub fn fmt(t: DateTime<Utc>) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

/// An RFC 3339 time, or an ISO time without a zone read as UTC (the form
/// Juice uses).
pub fn parse(s: &str) -> Option<DateTime<Utc>> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"]
        .into_iter()
        .find_map(|f| NaiveDateTime::parse_from_str(s, f).ok())
        .map(|t| t.and_utc())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn formats_and_parses() {
        let t = parse("2026-10-30T14:00:00+02:00").unwrap();
        assert_eq!(fmt(t), "2026-10-30T12:00:00.000Z");
        let t = parse("2024-10-02T17:39:26.049258").unwrap();
        assert_eq!(fmt(t), "2024-10-02T17:39:26.049Z");
        assert!(parse("yesterday").is_none());
    }
}
