//! Juice event payloads are undocumented: the bulk transfer a delivery is
//! about is found defensively (Juice's webhook documentation).

use serde_json::Value;

use crate::providers::ResourceRef;

pub const BULK_TRANSFER: &str = "juice.bulk_transfer";
pub const TRANSFER: &str = "juice.transfer";

fn str_at<'a>(data: &'a Value, path: &[&str]) -> Option<&'a str> {
    let mut v = data;
    for p in path {
        v = v.get(p)?;
    }
    v.as_str().filter(|s| !s.is_empty())
}

/// The bulk transfer id named by a delivery, if any.
pub fn bulk_transfer_id(event: &str, data: &Value) -> Option<String> {
    let nested = [
        &["bulk_transfer_id"][..],
        &["bulk_transfer", "id"][..],
        &["bulk_transfer_uuid"][..],
    ];
    let found = nested.iter().find_map(|p| str_at(data, p));
    if let Some(id) = found {
        return Some(id.to_string());
    }
    // In `bulk_transfer.transfer.*` events `data.id` is the transfer itself.
    if event.starts_with("bulk_transfer.") && !event.starts_with("bulk_transfer.transfer.") {
        return str_at(data, &["id"]).map(str::to_string);
    }
    None
}

/// The transfer (item) named by a per-transfer event. Its reference within
/// its bulk transfer (`<bulk id>:<reference>`) comes first: an item answered
/// with a reference is known by that key whether or not the answers carry
/// its id (see `objects::item_keys`); then its id.
pub fn transfer_id(event: &str, data: &Value) -> Option<String> {
    if event.starts_with("bulk_transfer.transfer.") {
        let by_reference = bulk_transfer_id(event, data)
            .zip(str_at(data, &["reference"]))
            .map(|(bulk, reference)| format!("{bulk}:{reference}"));
        by_reference
            .or_else(|| str_at(data, &["id"]).map(str::to_string))
            .or_else(|| str_at(data, &["transfer_id"]).map(str::to_string))
            .or_else(|| str_at(data, &["transfer", "id"]).map(str::to_string))
    } else {
        str_at(data, &["transfer_id"]).map(str::to_string)
    }
}

/// What to fetch: the bulk transfer (items come with it).
pub fn resource(event: &str, data: &Value) -> Option<ResourceRef> {
    bulk_transfer_id(event, data).map(|id| ResourceRef {
        kind: BULK_TRANSFER.into(),
        id,
        context: None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn finds_the_bulk_transfer() {
        let bt = "6f1c1e9a-0000-4000-8000-000000000001";
        assert_eq!(
            bulk_transfer_id("bulk_transfer.cancelled", &json!({"id": bt})).as_deref(),
            Some(bt)
        );
        assert_eq!(
            bulk_transfer_id(
                "bulk_transfer.transfer.cancelled",
                &json!({"id": "tr_1", "bulk_transfer_id": bt})
            )
            .as_deref(),
            Some(bt)
        );
        assert_eq!(
            bulk_transfer_id(
                "bulk_transfer.transfer.cancelled",
                &json!({"id": "tr_1", "bulk_transfer": {"id": bt}})
            )
            .as_deref(),
            Some(bt)
        );
        // A transfer event without its parent: the transfer id is not mistaken for it.
        assert_eq!(
            bulk_transfer_id("bulk_transfer.transfer.cancelled", &json!({"id": "tr_1"})),
            None
        );
        assert_eq!(
            transfer_id("bulk_transfer.transfer.cancelled", &json!({"id": "tr_1"})).as_deref(),
            Some("tr_1")
        );
        assert_eq!(
            transfer_id(
                "bulk_transfer.transfer.reversed",
                &json!({"id": "tr_1", "reference": "r1", "bulk_transfer_id": bt})
            ),
            Some(format!("{bt}:r1"))
        );
        assert_eq!(
            transfer_id(
                "bulk_transfer.transfer.reversed",
                &json!({"reference": "r1"})
            ),
            None,
            "a reference alone names no item: it is unique only within its bulk transfer"
        );
        assert_eq!(
            bulk_transfer_id("card.transaction", &json!({"id": "x"})),
            None
        );
        assert_eq!(
            bulk_transfer_id("bulk_transfer.cancelled", &json!({"id": 5})),
            None
        );
    }
}
