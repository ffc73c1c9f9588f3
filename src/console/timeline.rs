//! A resource's life drawn on one time axis: one lane for the resource and
//! one per item of a bulk transfer, a mark for each thing recorded. Pure:
//! rows in, positions and labels out; the template draws them as SVG.

use chrono::{DateTime, Utc};
use serde::Serialize;

use crate::store::model::ResourceHistory;

/// Where the lanes' names end and the axis begins, in pixels.
const LABEL_WIDTH: f64 = 230.0;
/// The width of the axis itself.
const AXIS_WIDTH: f64 = 900.0;
/// Room kept free at both ends of the axis for the labels of the first and
/// the last marks.
const END_ROOM: f64 = 60.0;
/// Characters a lane's name keeps (its full id is in the link's title).
const LANE_CHARS: usize = 34;
const LANE_HEIGHT: f64 = 40.0;
const TOP: f64 = 34.0;
/// Room a label needs per character, at the font size the stylesheet sets.
const CHAR_WIDTH: f64 = 6.2;

/// What the template draws.
#[derive(Debug, Serialize)]
pub struct Timeline {
    pub width: f64,
    pub height: f64,
    pub axis_x: f64,
    pub axis_end: f64,
    pub lanes: Vec<Lane>,
    pub marks: Vec<Mark>,
    pub ticks: Vec<Tick>,
    /// Every mark, oldest first, for the table under the drawing.
    pub rows: Vec<Row>,
}

#[derive(Debug, Serialize)]
pub struct Lane {
    pub y: f64,
    /// The lane's name, shortened to fit.
    pub label: String,
    /// The resource id of the lane.
    pub resource: String,
    pub status: String,
}

/// One thing recorded, at its time.
#[derive(Debug, Serialize)]
pub struct Mark {
    /// `transition`, `cancel-request`, `cancel-answer`, `refund-opened`,
    /// `refund-completed`, `refund-failed`, `alert-raised`, `alert-updated`,
    /// `alert-resolved`.
    pub kind: &'static str,
    pub x: f64,
    pub y: f64,
    /// Drawn beside the mark, when there is room (`None`: no room).
    pub label: Option<String>,
    pub label_y: f64,
    /// The whole story of the mark (its tooltip).
    pub title: String,
    pub resource: String,
    /// For a transition, the status reached.
    pub status: String,
}

#[derive(Debug, Serialize)]
pub struct Tick {
    pub x: f64,
    pub time: String,
}

#[derive(Debug, Serialize)]
pub struct Row {
    pub time: String,
    pub kind: &'static str,
    pub resource: String,
    pub what: String,
    pub trigger: String,
}

struct Event {
    at: DateTime<Utc>,
    time: String,
    lane: usize,
    kind: &'static str,
    label: String,
    title: String,
    status: String,
    trigger: String,
}

/// At most [`LANE_CHARS`] characters, the middle left out.
fn shorten(s: &str) -> String {
    let n = s.chars().count();
    if n <= LANE_CHARS {
        return s.to_string();
    }
    let keep = (LANE_CHARS - 1) / 2;
    let head: String = s.chars().take(keep).collect();
    let tail: String = s.chars().skip(n - keep).collect();
    format!("{head}…{tail}")
}

fn parse(t: &str) -> Option<DateTime<Utc>> {
    DateTime::parse_from_rfc3339(t)
        .ok()
        .map(|d| d.with_timezone(&Utc))
}

fn trigger_text(kind: &str, id: Option<&str>) -> String {
    match id {
        Some(id) => format!("{kind} {id}"),
        None => kind.to_string(),
    }
}

/// An amount in the currency's major unit with its code: `12.50 EUR`.
pub fn money(amount: Option<i64>, currency: Option<&str>) -> String {
    let Some(amount) = amount else {
        return "-".into();
    };
    let code = currency.unwrap_or("???").to_uppercase();
    // Stripe's lists of currencies without minor units and with three.
    let decimals = match code.to_lowercase().as_str() {
        "bif" | "clp" | "djf" | "gnf" | "jpy" | "kmf" | "krw" | "mga" | "pyg" | "rwf" | "ugx"
        | "vnd" | "vuv" | "xaf" | "xof" | "xpf" => 0,
        "bhd" | "jod" | "kwd" | "omr" | "tnd" => 3,
        _ => 2,
    };
    if decimals == 0 {
        return format!("{amount} {code}");
    }
    let unit = 10i64.pow(decimals);
    let sign = if amount < 0 { "-" } else { "" };
    let a = amount.unsigned_abs();
    format!(
        "{sign}{}.{:0width$} {code}",
        a / unit as u64,
        a % unit as u64,
        width = decimals as usize
    )
}

/// Lays out everything recorded about `history`.
pub fn layout(history: &ResourceHistory) -> Timeline {
    let r = &history.resource;
    let mut lanes = vec![Lane {
        y: 0.0,
        label: shorten(&r.id),
        resource: r.id.clone(),
        status: r.status.clone().unwrap_or_default(),
    }];
    for c in &history.children {
        // An item's id often starts with its parent's: the rest says which.
        let own = c
            .resource
            .id
            .strip_prefix(r.id.as_str())
            .map(|rest| rest.trim_start_matches([':', '_', '-']))
            .filter(|rest| !rest.is_empty())
            .unwrap_or(&c.resource.id);
        lanes.push(Lane {
            y: 0.0,
            label: shorten(own),
            resource: c.resource.id.clone(),
            status: c.resource.status.clone().unwrap_or_default(),
        });
    }
    let mut events = Vec::new();
    let mut push = |lane: usize,
                    time: &str,
                    kind: &'static str,
                    label: String,
                    title: String,
                    status: String,
                    trigger: String| {
        if let Some(at) = parse(time) {
            events.push(Event {
                at,
                time: time.to_string(),
                lane,
                kind,
                label,
                title,
                status,
                trigger,
            });
        }
    };
    let mut transitions = |lane: usize, list: &[crate::store::model::TransitionView]| {
        for t in list {
            let from = t.from_status.as_deref().unwrap_or("(first seen)");
            let trigger = trigger_text(&t.trigger.kind, t.trigger.id.as_deref());
            push(
                lane,
                &t.observed_at,
                "transition",
                t.to_status.clone(),
                format!("{from} → {}", t.to_status),
                t.to_status.clone(),
                trigger,
            );
        }
    };
    transitions(0, &history.transitions);
    for (i, c) in history.children.iter().enumerate() {
        transitions(i + 1, &c.transitions);
    }
    let lane_of = |id: &str| {
        history
            .children
            .iter()
            .position(|c| c.resource.id == id)
            .map_or(0, |i| i + 1)
    };
    let refunds = history
        .refunds
        .iter()
        .chain(history.children.iter().flat_map(|c| c.refunds.iter()));
    for f in refunds {
        let lane = lane_of(&f.resource_id);
        let amount = money(f.amount, f.currency.as_deref());
        let trigger = trigger_text(&f.trigger.kind, f.trigger.id.as_deref());
        push(
            lane,
            &f.opened_at,
            "refund-opened",
            format!("refund {amount}"),
            format!("refund of {amount} opened ({})", f.reason),
            f.status.clone(),
            trigger.clone(),
        );
        if let Some(done) = &f.completed_at {
            let kind = if f.status == "failed" {
                "refund-failed"
            } else {
                "refund-completed"
            };
            push(
                lane,
                done,
                kind,
                format!("refund {}", f.status),
                format!("refund of {amount} {}", f.status),
                f.status.clone(),
                trigger,
            );
        }
    }
    for c in &history.cancel_requests {
        push(
            0,
            &c.requested_at,
            "cancel-request",
            format!("cancel asked ({})", c.requested_by),
            format!(
                "cancel asked by {} with key {}",
                c.requested_by, c.idempotency_key
            ),
            String::new(),
            format!("cancel {}", c.id),
        );
        if let Some(at) = &c.answered_at {
            let outcome = c.outcome.as_deref().unwrap_or("no answer");
            let status = c
                .http_status
                .map(|s| format!(" (HTTP {s})"))
                .unwrap_or_default();
            push(
                0,
                at,
                "cancel-answer",
                format!("answer: {outcome}"),
                format!(
                    "the provider answered {outcome}{status}{}",
                    c.error_code
                        .as_deref()
                        .map(|e| format!(", {e}"))
                        .unwrap_or_default()
                ),
                outcome.to_string(),
                format!("cancel {}", c.id),
            );
        }
    }
    for a in &history.alerts {
        push(
            0,
            &a.created_at,
            "alert-raised",
            format!("alert {}", a.rule),
            format!("{} alert raised: {}", a.severity, a.summary),
            a.state.clone(),
            format!("alert {}", a.id),
        );
        if a.version > 1 && a.updated_at != a.created_at {
            push(
                0,
                &a.updated_at,
                "alert-updated",
                format!("alert updated (v{})", a.version),
                format!(
                    "alert {} updated to version {}: {}",
                    a.rule, a.version, a.summary
                ),
                a.state.clone(),
                format!("alert {}", a.id),
            );
        }
        if let Some(at) = &a.resolved_at {
            push(
                0,
                at,
                "alert-resolved",
                format!("alert {} resolved", a.rule),
                format!("alert {} resolved", a.rule),
                a.state.clone(),
                format!("alert {}", a.id),
            );
        }
    }
    events.sort_by_key(|e| e.at);
    place(lanes, events)
}

/// The x of each event: half by its time, half by its rank among the
/// distinct times, so that a burst of events within a second stays
/// readable beside a wait of days, while the order and the ticks stay true.
fn place(mut lanes: Vec<Lane>, events: Vec<Event>) -> Timeline {
    let mut distinct: Vec<DateTime<Utc>> = events.iter().map(|e| e.at).collect();
    distinct.dedup();
    let (first, last) = (
        distinct.first().copied().unwrap_or_else(Utc::now),
        distinct.last().copied().unwrap_or_else(Utc::now),
    );
    let span = (last - first).num_milliseconds().max(1) as f64;
    let steps = (distinct.len().max(2) - 1) as f64;
    let x_of = |at: DateTime<Utc>| {
        let linear = (at - first).num_milliseconds() as f64 / span;
        let rank = distinct.partition_point(|d| *d < at) as f64 / steps;
        LABEL_WIDTH + END_ROOM + (linear + rank) / 2.0 * (AXIS_WIDTH - 2.0 * END_ROOM)
    };
    for (i, lane) in lanes.iter_mut().enumerate() {
        lane.y = TOP + LANE_HEIGHT * i as f64 + LANE_HEIGHT / 2.0;
    }
    let tick_count = distinct.len().min(6);
    let ticks = (0..tick_count)
        .map(|i| {
            let at = distinct[i * (distinct.len() - 1) / (tick_count - 1).max(1)];
            Tick {
                x: x_of(at),
                time: at.format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
            }
        })
        .collect();
    // Labels go above or below their mark, where the last label of that
    // row in the lane ends before this one starts; else only the tooltip.
    let mut ends = vec![[f64::MIN; 2]; lanes.len()];
    let mut marks = Vec::with_capacity(events.len());
    let mut rows = Vec::with_capacity(events.len());
    for e in events {
        let x = x_of(e.at);
        let y = lanes[e.lane].y;
        let width = e.label.chars().count() as f64 * CHAR_WIDTH;
        let start = x - width / 2.0;
        let row = (0..2).find(|&r| ends[e.lane][r] + 4.0 < start);
        let (label, label_y) = match row {
            Some(r) => {
                ends[e.lane][r] = x + width / 2.0;
                (
                    Some(e.label.clone()),
                    if r == 0 { y - 9.0 } else { y + 17.0 },
                )
            }
            None => (None, y),
        };
        let resource = lanes[e.lane].resource.clone();
        rows.push(Row {
            time: e.time.clone(),
            kind: e.kind,
            resource: resource.clone(),
            what: e.title.clone(),
            trigger: e.trigger.clone(),
        });
        marks.push(Mark {
            kind: e.kind,
            x,
            y,
            label,
            label_y,
            title: format!("{} · {} · by {}", e.time, e.title, e.trigger),
            resource,
            status: e.status,
        });
    }
    Timeline {
        width: LABEL_WIDTH + AXIS_WIDTH + 10.0,
        height: TOP + LANE_HEIGHT * lanes.len() as f64 + 10.0,
        axis_x: LABEL_WIDTH,
        axis_end: LABEL_WIDTH + AXIS_WIDTH,
        lanes,
        marks,
        ticks,
        rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn long_lane_names_keep_both_ends() {
        assert_eq!(shorten("obt_123"), "obt_123");
        let long = "936949ba-bd6c-45f0-afb0-3f8cc2bda447:sim-item-1-801770f5";
        let short = shorten(long);
        assert!(short.chars().count() <= LANE_CHARS, "{short}");
        assert!(
            short.starts_with("936949ba") && short.ends_with("801770f5"),
            "{short}"
        );
    }

    #[test]
    fn amounts_read_in_major_units() {
        assert_eq!(money(Some(1250), Some("eur")), "12.50 EUR");
        assert_eq!(money(Some(5), Some("usd")), "0.05 USD");
        assert_eq!(money(Some(-1250), Some("usd")), "-12.50 USD");
        assert_eq!(money(Some(1250), Some("jpy")), "1250 JPY");
        assert_eq!(money(Some(1250), Some("kwd")), "1.250 KWD");
        assert_eq!(money(None, Some("eur")), "-");
    }

    fn event(at: &str, lane: usize, label: &str) -> Event {
        Event {
            at: parse(at).unwrap(),
            time: at.into(),
            lane,
            kind: "transition",
            label: label.into(),
            title: label.into(),
            status: label.into(),
            trigger: "event".into(),
        }
    }

    fn lane(id: &str) -> Lane {
        Lane {
            y: 0.0,
            label: id.into(),
            resource: id.into(),
            status: String::new(),
        }
    }

    #[test]
    fn marks_keep_their_order_and_lanes() {
        let t = place(
            vec![lane("a"), lane("b")],
            vec![
                event("2026-01-01T00:00:00.000Z", 0, "processing"),
                event("2026-01-01T00:00:00.100Z", 1, "pending"),
                event("2026-01-03T00:00:00.000Z", 0, "canceled"),
            ],
        );
        let xs: Vec<f64> = t.marks.iter().map(|m| m.x).collect();
        assert!(xs[0] < xs[1] && xs[1] < xs[2], "{xs:?}");
        assert!(xs[0] >= t.axis_x && xs[2] <= t.axis_end, "{xs:?}");
        assert_eq!(t.marks[1].y, t.lanes[1].y);
        assert_eq!(t.ticks.len(), 3);
        // The burst within 100 ms is not drawn on one spot.
        assert!(xs[1] - xs[0] > 100.0, "{xs:?}");
    }

    #[test]
    fn crowded_labels_fall_back_to_the_tooltip() {
        let t = place(
            vec![lane("a")],
            (0..5)
                .map(|_| event("2026-01-01T00:00:00.000Z", 0, "processing"))
                .collect(),
        );
        let shown = t.marks.iter().filter(|m| m.label.is_some()).count();
        assert_eq!(shown, 2, "one above and one below the mark");
        assert!(t.marks.iter().all(|m| !m.title.is_empty()));
        assert_eq!(t.rows.len(), 5);
    }
}
