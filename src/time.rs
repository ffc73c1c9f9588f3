//! Time helpers: every time cancelwatch stores or prints is RFC 3339 UTC with
//! milliseconds (`2026-10-30T12:00:00.000Z`), a fixed width that sorts as text.

use chrono::{DateTime, NaiveDateTime, SecondsFormat, Utc};

pub type Timestamp = DateTime<Utc>;

pub fn now() -> Timestamp {
    Utc::now()
}

/// The one text form of a time in the database and in output.
pub fn fmt(t: Timestamp) -> String {
    t.to_rfc3339_opts(SecondsFormat::Millis, true)
}

pub fn now_str() -> String {
    fmt(now())
}

/// Parses an RFC 3339 time, or a zone-less ISO time read as UTC (Juice sends those).
pub fn parse_lenient(s: &str) -> Option<Timestamp> {
    if let Ok(t) = DateTime::parse_from_rfc3339(s) {
        return Some(t.with_timezone(&Utc));
    }
    for f in ["%Y-%m-%dT%H:%M:%S%.f", "%Y-%m-%d %H:%M:%S%.f"] {
        if let Ok(n) = NaiveDateTime::parse_from_str(s, f) {
            return Some(n.and_utc());
        }
    }
    None
}

/// A duration as people write it (`30d`, `12h`, `90m`, `2w`), with a unit;
/// one too large to be a duration is refused, never wrapped.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    if !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("duration {s:?} needs a unit (s, m, h, d or w)"));
    }
    humantime::parse_duration(s).map_err(|e| format!("duration {s:?}: {e}"))
}

/// A point in time as a command line takes it: RFC 3339
/// (`2026-12-02T10:00:00Z`), a date (`2026-12-02`, midnight UTC), or a
/// duration back from `now` (`2h`, `7d`).
pub fn parse_since(s: &str, now: Timestamp) -> Result<Timestamp, String> {
    let s = s.trim();
    if let Ok(t) = chrono::DateTime::parse_from_rfc3339(s) {
        return Ok(t.with_timezone(&chrono::Utc));
    }
    if let Ok(d) = chrono::NaiveDate::parse_from_str(s, "%Y-%m-%d") {
        return Ok(d.and_time(chrono::NaiveTime::MIN).and_utc());
    }
    let ago = parse_duration(s).map_err(|_| {
        format!("{s:?} is not a time: give RFC 3339 (2026-10-30T12:00:00Z), a date (2026-10-30) or a time back from now (2h, 7d)")
    })?;
    chrono::Duration::from_std(ago)
        .ok()
        .and_then(|ago| now.checked_sub_signed(ago))
        .ok_or_else(|| format!("{s:?} reaches back too far"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zone_less_times_are_utc() {
        let t = parse_lenient("2024-10-02T17:39:26.049258").unwrap();
        assert_eq!(fmt(t), "2024-10-02T17:39:26.049Z");
        let t = parse_lenient("2026-10-30T14:00:00+02:00").unwrap();
        assert_eq!(fmt(t), "2026-10-30T12:00:00.000Z");
        assert!(parse_lenient("yesterday").is_none());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("30d").unwrap().as_secs(), 30 * 86_400);
        assert_eq!(parse_duration("15m").unwrap().as_secs(), 900);
        assert!(parse_duration("30").is_err());
        assert!(parse_duration("d").is_err());
        assert_eq!(parse_duration("3w").unwrap().as_secs(), 21 * 86_400);
        assert!(parse_duration("213503982334602d").is_err());
        let now = parse_lenient("2026-12-07T12:00:00Z").unwrap();
        assert_eq!(
            fmt(parse_since("2h", now).unwrap()),
            "2026-12-07T10:00:00.000Z"
        );
        assert_eq!(
            fmt(parse_since("2026-12-02", now).unwrap()),
            "2026-12-02T00:00:00.000Z"
        );
        assert!(parse_since("last tuesday", now).is_err());
        assert!(parse_since("999999999999d", now).is_err());
    }
}
