//! Handling one delivery: decode, apply in one transaction, park what cannot be processed, and
//! acknowledge only after the effects are committed or the message is parked with a confirm.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::broker::{BrokerError, Publisher};
use crate::config::Settings;
use crate::domain::{Admission, Status};
use crate::messages::{ReasonCode, Rejection, decode};
use crate::store::{Handled, Store};
use crate::telemetry::metrics::{ConsumedLabels, ReasonLabel, StatusLabel, metrics};
use crate::telemetry::propagation::{continue_trace, outgoing_traceparent};

/// The worker's clock, to the millisecond (what Postgres and the outcome JSON both keep).
pub fn now() -> OffsetDateTime {
    let now = OffsetDateTime::now_utc();
    now.replace_nanosecond(now.nanosecond() / 1_000_000 * 1_000_000)
        .unwrap_or(now)
}

/// How one delivery ended, for logs, metrics and tests.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Disposition {
    /// Applied; the statuses of the outcomes written to the outbox.
    Applied(Vec<Status>),
    /// An older snapshot than the record's latest: recorded, nothing emitted.
    Stale,
    /// Processed before.
    Duplicate,
    /// Parked with this reason.
    Parked(ReasonCode),
    /// Not acknowledged: shutting down, or the channel broke; the broker will redeliver it.
    Abandoned,
}

impl Disposition {
    /// A short word for the `result` log field.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Applied(_) => "applied",
            Self::Stale => "stale",
            Self::Duplicate => "duplicate",
            Self::Parked(_) => "parked",
            Self::Abandoned => "abandoned",
        }
    }
}

/// Everything a delivery needs, shared by all in-flight deliveries.
#[derive(Clone)]
pub struct Handler {
    pub(crate) store: Store,
    pub(crate) parking: Publisher,
    pub(crate) settings: Settings,
    pub(crate) stop: CancellationToken,
}

impl Handler {
    fn delays(&self) -> impl Iterator<Item = Duration> {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(self.settings.worker.retry_min_millis))
            .with_max_delay(Duration::from_millis(self.settings.worker.retry_max_millis))
            .with_jitter()
            .without_max_times()
            .build()
    }

    /// Handles one delivery to the end and acknowledges it (or leaves it for redelivery).
    pub async fn handle(&self, delivery: Delivery) -> Disposition {
        let span = tracing::info_span!(
            "message",
            message.id = tracing::field::Empty,
            message.r#type = tracing::field::Empty,
            message.result = tracing::field::Empty,
            message.bytes = delivery.data.len(),
        );
        continue_trace(
            &span,
            header_text(&delivery, "traceparent").as_deref(),
            header_text(&delivery, "tracestate").as_deref(),
        );
        async {
            let started = std::time::Instant::now();
            let (kind, disposition) = self.process(&delivery).await;
            let acked = match disposition {
                Disposition::Abandoned => false,
                _ => matches!(delivery.acker.ack(BasicAckOptions::default()).await, Ok(true)),
            };
            let span = tracing::Span::current();
            span.record("message.result", disposition.as_str());
            if !acked && disposition != Disposition::Abandoned {
                tracing::warn!("could not acknowledge (channel closed); the broker will redeliver and the inbox will de-duplicate");
            }
            let m = metrics();
            m.consumed
                .get_or_create(&ConsumedLabels {
                    r#type: kind.to_owned(),
                    result: disposition.as_str().to_owned(),
                })
                .inc();
            match &disposition {
                Disposition::Parked(reason) => {
                    m.parked.get_or_create(&ReasonLabel { reason: reason.as_str().to_owned() }).inc();
                }
                Disposition::Applied(statuses) => {
                    for status in statuses {
                        m.emitted.get_or_create(&StatusLabel { status: status.as_str().to_owned() }).inc();
                    }
                }
                _ => {}
            }
            m.processing_seconds.observe(started.elapsed().as_secs_f64());
            tracing::debug!(elapsed_ms = started.elapsed().as_millis() as u64, "message handled");
            disposition
        }
        .instrument(span)
        .await
    }

    /// Processes a delivery; returns the message type (for metrics) and how it ended.
    async fn process(&self, delivery: &Delivery) -> (&'static str, Disposition) {
        let span = tracing::Span::current();
        let input = match decode(&delivery.data, now()) {
            Ok(input) => input,
            Err(rejection) => return ("unknown", self.park(delivery, &rejection).await),
        };
        let kind = input.cause.message_type.as_str();
        (kind, self.apply(delivery, &span, input).await)
    }

    async fn apply(
        &self,
        delivery: &Delivery,
        span: &tracing::Span,
        input: crate::messages::Input,
    ) -> Disposition {
        span.record("message.id", tracing::field::display(input.message_id()));
        span.record("message.type", input.cause.message_type.as_str());
        let digest: [u8; 32] = Sha256::digest(&delivery.data).into();
        let traceparent =
            outgoing_traceparent(span, header_text(delivery, "traceparent").as_deref());
        let mut delays = self.delays();
        let mut failures = 0;
        let mut outage_logged = false;
        loop {
            match self
                .store
                .apply(&input, &digest, now(), traceparent.as_deref())
                .await
            {
                Ok(Handled::Applied {
                    admission: Admission::Latest { .. },
                    emitted,
                }) => {
                    if outage_logged {
                        tracing::info!("database available again");
                    }
                    return Disposition::Applied(emitted);
                }
                Ok(Handled::Applied { .. }) => return Disposition::Stale,
                Ok(Handled::Duplicate) => return Disposition::Duplicate,
                Ok(Handled::Reused) => {
                    let rejection = Rejection::new(
                        ReasonCode::MessageIdReused,
                        "message_id was already accepted with a different body",
                    );
                    return self.park(delivery, &rejection).await;
                }
                Err(error) if error.is_transient() => {
                    if !outage_logged {
                        tracing::warn!(error = %error, "database unavailable; holding the message and retrying");
                        outage_logged = true;
                    }
                }
                Err(error) => {
                    failures += 1;
                    if failures >= self.settings.worker.max_attempts {
                        tracing::error!(error = %error, attempts = failures, "processing failed repeatedly; parking");
                        let rejection = Rejection::new(
                            ReasonCode::ProcessingFailed,
                            format!("processing failed {failures} times; last error: {error}"),
                        );
                        return self.park(delivery, &rejection).await;
                    }
                }
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(30));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.stop.cancelled() => return Disposition::Abandoned,
            }
        }
    }

    /// Republishes the message unchanged to the parking queue with the reason headers, waiting
    /// for the broker's confirm. Retries while the broker is unavailable.
    async fn park(&self, delivery: &Delivery, rejection: &Rejection) -> Disposition {
        tracing::warn!(reason = rejection.reason.as_str(), detail = %rejection.detail, "parking message");
        let properties = parked_properties(delivery, rejection, now());
        let mut delays = self.delays();
        loop {
            let result: Result<(), BrokerError> = self
                .parking
                .publish(
                    "",
                    &self.settings.topology.parking_queue,
                    &delivery.data,
                    properties.clone(),
                )
                .await;
            match result {
                Ok(()) => return Disposition::Parked(rejection.reason),
                Err(error) => {
                    tracing::error!(error = %error, "cannot park the message; it stays unacknowledged");
                    if !delivery.acker.usable() {
                        // The channel broke: the broker requeues the message for us.
                        return Disposition::Abandoned;
                    }
                }
            }
            let delay = delays.next().unwrap_or(Duration::from_secs(30));
            tokio::select! {
                () = tokio::time::sleep(delay) => {}
                () = self.stop.cancelled() => {
                    let _ = delivery.acker.nack(BasicNackOptions { multiple: false, requeue: true }).await;
                    return Disposition::Abandoned;
                }
            }
        }
    }
}

fn header_text(delivery: &Delivery, name: &str) -> Option<String> {
    let headers = delivery.properties.headers().as_ref()?;
    match headers.inner().get(name)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// The original properties plus the parking headers of CONTRACT.md section 3.
pub(crate) fn parked_properties(
    delivery: &Delivery,
    rejection: &Rejection,
    at: OffsetDateTime,
) -> lapin::BasicProperties {
    let mut headers = delivery.properties.headers().clone().unwrap_or_default();
    let mut put = |key: &str, value: &str| {
        headers.insert(
            ShortString::from(key),
            AMQPValue::LongString(LongString::from(value)),
        );
    };
    put("x-parked-reason", rejection.reason.as_str());
    put("x-parked-detail", &rejection.detail);
    put("x-parked-at", &at.format(&Rfc3339).unwrap_or_default());
    put("x-original-exchange", delivery.exchange.as_str());
    put("x-original-routing-key", delivery.routing_key.as_str());
    delivery
        .properties
        .clone()
        .with_headers(FieldTable::from(headers.inner().clone()))
        .with_delivery_mode(2)
}
