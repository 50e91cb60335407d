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
/// The RabbitMQ user it was first published by (its `user_id` then). Set when parking, kept by a
/// replay, so that a replayed message is judged by its first publisher; believed by the worker
/// only on messages published by an operator (CONTRACT.md section 2).
pub const ORIGINAL_USER_ID: &str = "x-original-user-id";

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

/// The delivery's properties plus the parking headers, persistent. `original_user` (the
/// publisher the message was judged by) goes to `x-original-user-id`, replacing any such header
/// the publisher set itself; the parked copy's `user_id` becomes the parking connection's own
/// (`Publisher` sets it), never a foreign one.
pub fn parked_properties(
    delivery: &Delivery,
    reason: &str,
    detail: &str,
    parked_at: &str,
    original_user: Option<&str>,
) -> BasicProperties {
    let mut headers = delivery
        .properties
        .headers()
        .as_ref()
        .map(|h| h.inner().clone())
        .unwrap_or_default();
    let text = |value: &str| AMQPValue::LongString(LongString::from(value));
    headers.insert(ShortString::from(REASON), text(reason));
    headers.insert(ShortString::from(DETAIL), text(detail));
    headers.insert(ShortString::from(PARKED_AT), text(parked_at));
    headers.insert(
        ShortString::from(ORIGINAL_EXCHANGE),
        text(delivery.exchange.as_str()),
    );
    headers.insert(
        ShortString::from(ORIGINAL_ROUTING_KEY),
        text(delivery.routing_key.as_str()),
    );
    match original_user {
        Some(user) => headers.insert(ShortString::from(ORIGINAL_USER_ID), text(user)),
        None => headers.remove(ORIGINAL_USER_ID),
    };
    delivery
        .properties
        .clone()
        .with_headers(FieldTable::from(headers))
        .with_delivery_mode(2)
}

/// What the parking headers (or, for a message the broker dead-lettered, its `x-death` headers)
/// say about a parked message.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
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
/// dead-lettering headers but with `x-original-user-id` (the replaying `Publisher` sets its own
/// user as `user_id`).
pub fn replay_properties(properties: &BasicProperties) -> BasicProperties {
    let headers = properties.headers().clone().unwrap_or_default();
    let kept: std::collections::BTreeMap<_, _> = headers
        .inner()
        .iter()
        .filter(|(key, _)| {
            key.as_str() == ORIGINAL_USER_ID
                || !PARKING_PREFIXES
                    .iter()
                    .any(|prefix| key.as_str().starts_with(prefix))
        })
        .map(|(key, value)| (key.clone(), value.clone()))
        .collect();
    properties.clone().with_headers(FieldTable::from(kept))
}
