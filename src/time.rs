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

/// Parses a user-supplied duration such as `30d`, `12h`, `15m`, `90s`.
pub fn parse_duration(s: &str) -> Result<std::time::Duration, String> {
    let s = s.trim();
    let split = s
        .find(|c: char| !c.is_ascii_digit())
        .ok_or_else(|| format!("duration {s:?} needs a unit (s, m, h or d)"))?;
    let (num, unit) = s.split_at(split);
    let n: u64 = num
        .parse()
        .map_err(|_| format!("duration {s:?} must start with a whole number"))?;
    let secs = match unit {
        "s" => n,
        "m" => n * 60,
        "h" => n * 3600,
        "d" => n * 86_400,
        _ => return Err(format!("duration {s:?}: unit must be s, m, h or d")),
    };
    Ok(std::time::Duration::from_secs(secs))
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
        assert!(parse_duration("3w").is_err());
    }
}
