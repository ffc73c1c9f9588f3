//! Thin event notifications (Stripe's v2 API reference): ids only, no `data`.

use serde_json::Value;

use crate::providers::{
    json_object, optional_str, required_str, Refused, Resolved, ResourceRef, Target,
};

pub const OUTBOUND_TRANSFER: &str = "stripe.outbound_transfer";
pub const BATCH_JOB: &str = "stripe.batch_job";
/// Stripe says it failed to generate an event, once it can again; the event
/// (fetched) names in `data.impact` the object the lost one was about.
pub const EVENT_GENERATION_FAILURE_RESOLVED: &str =
    "v2.core.health.event_generation_failure.resolved";
/// A target that is a Stripe event to look up before anything is fetched
/// ([`impacted`]).
pub const EVENT_LOOKUP: &str = "stripe.event";

#[derive(Debug, Clone, PartialEq)]
pub struct RelatedObject {
    /// None in the singleton form `{type, url}`: the object is known by its URL.
    pub id: Option<String>,
    pub object_type: String,
    pub url: String,
}

#[derive(Debug, Clone, PartialEq)]
pub struct ThinEvent {
    pub id: String,
    pub event_type: String,
    pub created: String,
    pub livemode: Option<bool>,
    pub context: Option<String>,
    pub related_object: Option<RelatedObject>,
}

impl ThinEvent {
    /// Decodes a notification strictly enough to refuse what is not one.
    pub fn decode(body: &[u8]) -> Result<ThinEvent, Refused> {
        let map = json_object(body)?;
        let object = required_str(&map, "object")?;
        if object == "event" {
            return Err(Refused {
                kind: super::super::RefusalKind::Malformed,
                code: "unexpected_object",
                message: "this is a v1 snapshot event (object \"event\"); this endpoint takes v2 thin events (object \"v2.core.event\")".into(),
            });
        }
        if object != "v2.core.event" {
            return Err(Refused {
                kind: super::super::RefusalKind::Malformed,
                code: "unexpected_object",
                message: format!("object is {object:?}, expected \"v2.core.event\""),
            });
        }
        let id = required_str(&map, "id")?.to_string();
        let event_type = required_str(&map, "type")?.to_string();
        let created = required_str(&map, "created")?;
        if chrono::DateTime::parse_from_rfc3339(created).is_err() {
            return Err(Refused::malformed(
                "field `created` is not an RFC 3339 time",
            ));
        }
        let livemode = match map.get("livemode") {
            None | Some(Value::Null) => None,
            Some(Value::Bool(b)) => Some(*b),
            Some(_) => return Err(Refused::malformed("field `livemode` must be a boolean")),
        };
        let context = optional_str(&map, "context")?.map(str::to_string);
        let related_object = match map.get("related_object") {
            None | Some(Value::Null) => None,
            Some(Value::Object(ro)) => Some(RelatedObject {
                id: optional_str(ro, "id")
                    .map_err(|e| Refused::malformed(format!("related_object: {}", e.message)))?
                    .filter(|id| !id.is_empty())
                    .map(str::to_string),
                object_type: required_str(ro, "type")
                    .map_err(|e| Refused::malformed(format!("related_object: {}", e.message)))?
                    .to_string(),
                url: required_str(ro, "url")
                    .map_err(|e| Refused::malformed(format!("related_object: {}", e.message)))?
                    .to_string(),
            }),
            Some(_) => {
                return Err(Refused::malformed(
                    "field `related_object` must be an object",
                ))
            }
        };
        Ok(ThinEvent {
            id,
            event_type,
            created: created.to_string(),
            livemode,
            context,
            related_object,
        })
    }

    /// The tracked resource: `stripe.<last segment of the object type>`;
    /// none for an object named without an id.
    pub fn resource(&self) -> Option<ResourceRef> {
        let ro = self.related_object.as_ref()?;
        Some(ResourceRef {
            kind: kind_of(&ro.object_type),
            id: ro.id.clone()?,
            context: self.context.clone(),
        })
    }
}

/// What an event-generation failure was about, from the fetched event's
/// `data.impact`: its related object in its account context, to fetch when
/// the lost event's type is `followed`. `lookup` is the target the event
/// was fetched by.
pub fn impacted(event: &Value, lookup: &Target, followed: impl Fn(&str) -> bool) -> Resolved {
    let impact = event.pointer("/data/impact");
    let field = |path: &str| impact.and_then(|i| i.pointer(path)).and_then(Value::as_str);
    let event_type = field("/event_type").unwrap_or("unknown");
    if !followed(event_type) {
        return Resolved::Nothing(format!(
            "the event Stripe failed to generate ({event_type}) is not followed"
        ));
    }
    let (Some(object_type), Some(url)) =
        (field("/related_object/type"), field("/related_object/url"))
    else {
        return Resolved::Nothing(format!(
            "the event Stripe failed to generate ({event_type}) names no related object"
        ));
    };
    Resolved::Fetch(Target {
        kind: kind_of(object_type),
        // The singleton form has no id: its URL names it.
        id: field("/related_object/id").unwrap_or(url).to_string(),
        context: field("/context").map(str::to_string),
        url: Some(url.to_string()),
        trigger_event: lookup.trigger_event.clone(),
        trigger_created: None,
    })
}

/// `v2.money_management.outbound_transfer` → `stripe.outbound_transfer`.
pub fn kind_of(object_type: &str) -> String {
    let last = object_type.rsplit('.').next().unwrap_or(object_type);
    format!("stripe.{last}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const FIXTURE: &[u8] =
        include_bytes!("../../../tests/fixtures/stripe/thin_outbound_transfer_posted.json");

    #[test]
    fn decodes_the_fixture() {
        let e = ThinEvent::decode(FIXTURE).unwrap();
        assert_eq!(e.id, "evt_test_65R9Ijk8zWs5ZqJ2Wnv16R9Ijk8zWs5ZqJ2W");
        assert_eq!(e.event_type, "v2.money_management.outbound_transfer.posted");
        assert_eq!(e.livemode, Some(false));
        let r = e.resource().unwrap();
        assert_eq!(r.kind, OUTBOUND_TRANSFER);
        assert_eq!(r.id, "obt_test_61R9Ijk");
        assert_eq!(r.context.as_deref(), Some("acct_1Nv0FGQ9RKHgCVdK"));
    }

    #[test]
    fn refuses_what_is_not_a_thin_event() {
        let cases: [(&[u8], &str); 9] = [
            (br#"{"id":"evt_1","object":"event","type":"x","created":1}"#, "unexpected_object"),
            (br#"{"id":"evt_1","object":"v2.core.thing","type":"x","created":"2026-10-30T12:00:00Z"}"#, "unexpected_object"),
            (br#"{"object":"v2.core.event","type":"x","created":"2026-10-30T12:00:00Z"}"#, "malformed_payload"),
            (br#"{"id":5,"object":"v2.core.event","type":"x","created":"2026-10-30T12:00:00Z"}"#, "malformed_payload"),
            (br#"{"id":"evt_1","object":"v2.core.event","type":"x","created":"yesterday"}"#, "malformed_payload"),
            (br#"{"id":"evt_1","object":"v2.core.event","type":"x","created":"2026-10-30T12:00:00Z","livemode":"no"}"#, "malformed_payload"),
            (br#"[1,2]"#, "malformed_payload"),
            (b"", "malformed_payload"),
            (b"\xff\xfe", "malformed_payload"),
        ];
        for (body, code) in cases {
            let err = ThinEvent::decode(body).unwrap_err();
            assert_eq!(err.code, code, "{}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn a_related_object_without_id_is_a_singleton() {
        let e = ThinEvent::decode(br#"{"id":"evt_1","object":"v2.core.event","type":"v2.core.workspace.updated","created":"2026-10-30T12:00:00Z","related_object":{"type":"v2.core.workspace","url":"/v2/core/workspace"}}"#).unwrap();
        let ro = e.related_object.as_ref().unwrap();
        assert_eq!(
            (ro.id.as_deref(), ro.url.as_str()),
            (None, "/v2/core/workspace")
        );
        assert!(e.resource().is_none());
        let bad = ThinEvent::decode(br#"{"id":"evt_1","object":"v2.core.event","type":"x","created":"2026-10-30T12:00:00Z","related_object":{"id":7,"type":"t","url":"/v2/x"}}"#);
        assert_eq!(bad.unwrap_err().code, "malformed_payload");
    }

    #[test]
    fn an_event_generation_failure_names_the_object_to_fetch() {
        let lookup = Target {
            kind: EVENT_LOOKUP.into(),
            id: "evt_h".into(),
            trigger_event: Some("evt_h".into()),
            ..Target::default()
        };
        let event = serde_json::json!({"id": "evt_h", "type": EVENT_GENERATION_FAILURE_RESOLVED,
            "data": {"impact": {"context": "acct_1", "event_type": "v2.core.batch_job.canceled",
                "related_object": {"id": "batchv2_1", "type": "v2.core.batch_job",
                                   "url": "/v2/core/batch_jobs/batchv2_1"}}}});
        let Resolved::Fetch(target) = impacted(&event, &lookup, |_| true) else {
            panic!("the impacted object is fetched");
        };
        assert_eq!(
            (target.kind.as_str(), target.id.as_str()),
            (BATCH_JOB, "batchv2_1")
        );
        assert_eq!(target.context.as_deref(), Some("acct_1"));
        assert_eq!(target.url.as_deref(), Some("/v2/core/batch_jobs/batchv2_1"));
        assert_eq!(target.trigger_event.as_deref(), Some("evt_h"));
        assert!(matches!(
            impacted(&event, &lookup, |_| false),
            Resolved::Nothing(_)
        ));
        let bare =
            serde_json::json!({"data": {"impact": {"event_type": "v2.core.batch_job.canceled"}}});
        assert!(matches!(
            impacted(&bare, &lookup, |_| true),
            Resolved::Nothing(_)
        ));
    }

    #[test]
    fn created_without_fraction_is_fine() {
        let e = ThinEvent::decode(br#"{"id":"evt_1","object":"v2.core.event","type":"x","created":"2026-10-30T12:00:00Z"}"#).unwrap();
        assert!(e.resource().is_none());
    }
}
