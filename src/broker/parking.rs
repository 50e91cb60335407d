//! The parking queue's headers (CONTRACT.md section 3): the one place that names them, writes
//! them onto a parked message and reads them back for `parked list` and `replay`.

use lapin::BasicProperties;
use lapin::message::Delivery;
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};

/// Why the message was parked: a reason code.
pub const REASON: &str = "x-parked-reason";
/// Which rule failed, in words that echo no message data.
pub const DETAIL: &str = "x-parked-detail";
/// When it was parked (RFC 3339).
pub const PARKED_AT: &str = "x-parked-at";
/// The exchange it was first published to.
pub const ORIGINAL_EXCHANGE: &str = "x-original-exchange";
/// The routing key it was first published with.
pub const ORIGINAL_ROUTING_KEY: &str = "x-original-routing-key";

/// Header prefixes that describe a parking or a dead-lettering, not the message itself: a
/// replay drops them.
const PARKING_PREFIXES: [&str; 5] = [
    "x-parked-",
    "x-original-",
    "x-death",
    "x-first-death",
    "x-last-death",
];

/// A header's text, whether sent as a long or a short string.
pub fn header_text(properties: &BasicProperties, name: &str) -> Option<String> {
    let headers = properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The delivery's properties plus the parking headers, persistent.
pub fn parked_properties(
    delivery: &Delivery,
    reason: &str,
    detail: &str,
    parked_at: &str,
) -> BasicProperties {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    let mut put = |key: &str, value: &str| {
        headers.insert(
            ShortString::from(key),
            AMQPValue::LongString(LongString::from(value)),
        );
    };
    put(REASON, reason);
    put(DETAIL, detail);
    put(PARKED_AT, parked_at);
    put(ORIGINAL_EXCHANGE, delivery.exchange.as_str());
    put(ORIGINAL_ROUTING_KEY, delivery.routing_key.as_str());
    delivery
        .properties
        .clone()
        .with_headers(FieldTable::from(headers.inner().clone()))
        .with_delivery_mode(2)
}

/// What the parking headers (or, for a message the broker dead-lettered, its `x-death` headers)
/// say about a parked message.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ParkedHeaders {
    /// The reason code, or the broker's dead-letter reason (`delivery_limit`).
    pub reason: Option<String>,
    /// The detail.
    pub detail: Option<String>,
    /// When it was parked.
    pub parked_at: Option<String>,
    /// Where it was first published.
    pub original_exchange: Option<String>,
    /// Its first routing key.
    pub original_routing_key: Option<String>,
}

impl ParkedHeaders {
    /// Reads a parked delivery's headers. `exchange` and `routing_key` are the delivery's own,
    /// used when no header names the original ones.
    pub fn read(properties: &BasicProperties, exchange: &str, routing_key: &str) -> Self {
        let get = |name: &str| header_text(properties, name);
        Self {
            reason: get(REASON).or_else(|| get("x-first-death-reason")),
            detail: get(DETAIL),
            parked_at: get(PARKED_AT),
            original_exchange: get(ORIGINAL_EXCHANGE)
                .or_else(|| get("x-first-death-exchange"))
                .or_else(|| (!exchange.is_empty()).then(|| exchange.to_owned())),
            original_routing_key: get(ORIGINAL_ROUTING_KEY)
                .or_else(|| Some(routing_key.to_owned())),
        }
    }
}

/// The properties a replay publishes with: the parked message's own, without the parking and
/// dead-lettering headers.
pub fn replay_properties(properties: &BasicProperties) -> BasicProperties {
    let headers = properties.headers().clone().unwrap_or_default();
    let kept: std::collections::BTreeMap<_, _> = headers
        .inner()
        .iter()
        .filter(|(key, _)| {
            !PARKING_PREFIXES
                .iter()
                .any(|prefix| key.as_str().starts_with(prefix))
        })
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    properties.clone().with_headers(FieldTable::from(kept))
}
