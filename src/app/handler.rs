//! Handling deliveries in batches: decode each, apply the batch in one transaction, park what
//! cannot be processed, and acknowledge each delivery only after its effects are committed or it
//! is parked with a broker confirm.

use std::time::{Duration, Instant};

use backon::{BackoffBuilder, ExponentialBuilder};
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicNackOptions};
use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;
use tokio_util::sync::CancellationToken;

use crate::broker::{PendingConfirm, Publisher};
use crate::config::Settings;
use crate::domain::{Admission, Status};
use crate::messages::{Input, ReasonCode, Rejection, decode};
use crate::store::{BatchItem, Handled, Store, StoreError};
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

/// Everything a batch needs, shared by all batches in flight.
#[derive(Clone)]
pub struct Handler {
    pub(crate) store: Store,
    pub(crate) parking: Publisher,
    pub(crate) settings: Settings,
    /// Fires near the shutdown deadline: retries give up and leave their deliveries
    /// unacknowledged.
    pub(crate) abandon: CancellationToken,
}

/// One delivery on its way through a batch.
struct Job {
    delivery: Delivery,
    span: tracing::Span,
    kind: &'static str,
    decoded: Result<Input, Rejection>,
    digest: [u8; 32],
    traceparent: Option<String>,
    disposition: Option<Disposition>,
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

    /// Waits for the next back-off delay; false when shutting down has given up on retries.
    async fn pause(&self, delays: &mut impl Iterator<Item = Duration>) -> bool {
        let delay = delays.next().unwrap_or(Duration::from_secs(30));
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = self.abandon.cancelled() => false,
        }
    }

    /// Handles a batch of deliveries to the end and acknowledges each (or leaves it for
    /// redelivery). Returns how each ended, in order.
    pub async fn handle_batch(&self, deliveries: Vec<Delivery>) -> Vec<Disposition> {
        let started = Instant::now();
        let clock = now();
        let mut jobs: Vec<Job> = deliveries
            .into_iter()
            .map(|d| self.prepare(d, clock))
            .collect();

        // Apply what decoded; park what did not (and, below, what the store refused).
        let accepted: Vec<usize> = (0..jobs.len())
            .filter(|&i| jobs[i].decoded.is_ok())
            .collect();
        if !accepted.is_empty() {
            self.apply(&mut jobs, &accepted).await;
        }
        let to_park: Vec<usize> = (0..jobs.len())
            .filter(|&i| jobs[i].disposition.is_none())
            .collect();
        if !to_park.is_empty() {
            self.park(&mut jobs, &to_park).await;
        }

        let decided = started.elapsed();
        let count = jobs.len();
        let mut results = Vec::with_capacity(jobs.len());
        let mut unacknowledged = 0_usize;
        for job in jobs {
            let disposition = job.disposition.expect("every delivery was decided");
            let acked = match disposition {
                Disposition::Abandoned => false,
                _ => matches!(
                    job.delivery.acker.ack(BasicAckOptions::default()).await,
                    Ok(true)
                ),
            };
            let _entered = job.span.enter();
            job.span.record("message.result", disposition.as_str());
            if !acked && disposition != Disposition::Abandoned {
                unacknowledged += 1;
                tracing::debug!("could not acknowledge (channel closed)");
            }
            record_metrics(job.kind, &disposition, started);
            tracing::trace!(
                elapsed_ms = started.elapsed().as_millis() as u64,
                "message handled"
            );
            results.push(disposition);
        }
        if unacknowledged > 0 {
            tracing::warn!(
                messages = unacknowledged,
                "could not acknowledge messages (channel closed); the broker will redeliver them and the inbox will de-duplicate"
            );
        }
        tracing::debug!(
            messages = count,
            decided_ms = decided.as_millis() as u64,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "batch handled"
        );
        results
    }

    fn prepare(&self, delivery: Delivery, clock: OffsetDateTime) -> Job {
        let span = tracing::info_span!(
            "message",
            message.id = tracing::field::Empty,
            message.r#type = tracing::field::Empty,
            message.result = tracing::field::Empty,
            message.bytes = delivery.data.len(),
        );
        let incoming = header_text(&delivery, "traceparent");
        continue_trace(
            &span,
            incoming.as_deref(),
            header_text(&delivery, "tracestate").as_deref(),
        );
        let decoded = decode(&delivery.data, clock);
        let mut kind = "unknown";
        if let Ok(input) = &decoded {
            kind = input.cause.message_type.as_str();
            span.record("message.id", tracing::field::display(input.message_id()));
            span.record("message.type", kind);
        }
        let digest: [u8; 32] = Sha256::digest(&delivery.data).into();
        let traceparent = outgoing_traceparent(&span, incoming.as_deref());
        Job {
            delivery,
            span,
            kind,
            decoded,
            digest,
            traceparent,
            disposition: None,
        }
    }

    /// Applies the accepted jobs in one transaction, retrying while the database is unavailable.
    /// If the batch fails for another reason, each job is retried alone, so that one message that
    /// cannot be processed is parked and the others go through.
    async fn apply(&self, jobs: &mut [Job], accepted: &[usize]) {
        match self
            .apply_with_retries(jobs, accepted, accepted.len() == 1)
            .await
        {
            Ok(()) => {}
            Err(_) if accepted.len() > 1 => {
                tracing::warn!(
                    messages = accepted.len(),
                    "batch failed; retrying its messages one by one"
                );
                for &i in accepted {
                    if let Err(error) = self.apply_with_retries(jobs, &[i], true).await {
                        self.give_up(&mut jobs[i], &error);
                    }
                }
            }
            Err(error) => self.give_up(&mut jobs[accepted[0]], &error),
        }
    }

    /// Runs one batch until it commits. Transient failures are retried without limit (unless
    /// shutting down gives up, which abandons the batch); other failures up to `max_attempts`
    /// when `count_failures`, else once.
    async fn apply_with_retries(
        &self,
        jobs: &mut [Job],
        which: &[usize],
        count_failures: bool,
    ) -> Result<(), StoreError> {
        let mut delays = self.delays();
        let mut failures = 0;
        let mut outage_logged = false;
        loop {
            let items: Vec<BatchItem<'_>> = which
                .iter()
                .map(|&i| BatchItem {
                    input: jobs[i]
                        .decoded
                        .as_ref()
                        .expect("only decoded jobs are applied"),
                    digest: jobs[i].digest,
                    traceparent: jobs[i].traceparent.clone(),
                })
                .collect();
            let attempt = Instant::now();
            let error = match self.store.apply_batch(&items, now()).await {
                Ok(results) => {
                    tracing::debug!(
                        messages = items.len(),
                        elapsed_ms = attempt.elapsed().as_millis() as u64,
                        "batch committed"
                    );
                    if outage_logged {
                        tracing::info!("database available again");
                    }
                    for (&i, handled) in which.iter().zip(results) {
                        jobs[i].disposition = match handled {
                            Handled::Applied {
                                admission: Admission::Latest { .. },
                                emitted,
                            } => Some(Disposition::Applied(emitted)),
                            Handled::Applied { .. } => Some(Disposition::Stale),
                            Handled::Duplicate => Some(Disposition::Duplicate),
                            Handled::Reused => {
                                jobs[i].decoded = Err(Rejection::new(
                                    ReasonCode::MessageIdReused,
                                    "message_id was already accepted with a different body",
                                ));
                                None
                            }
                        };
                    }
                    return Ok(());
                }
                Err(error) => error,
            };
            if error.is_transient() {
                if !outage_logged {
                    tracing::warn!(error = %error, "database unavailable; holding the messages and retrying");
                    outage_logged = true;
                }
            } else {
                failures += 1;
                if !count_failures || failures >= self.settings.worker.max_attempts {
                    return Err(error);
                }
            }
            if !self.pause(&mut delays).await {
                for &i in which {
                    jobs[i].disposition = Some(Disposition::Abandoned);
                }
                return Ok(());
            }
        }
    }

    /// Republishes each job's message unchanged to the parking queue with the reason headers,
    /// and waits for the broker's confirms. Retries while the broker is unavailable.
    async fn park(&self, jobs: &mut [Job], which: &[usize]) {
        let parked_at = now();
        for &i in which {
            let job = &jobs[i];
            let rejection = job
                .decoded
                .as_ref()
                .expect_err("only rejected jobs are parked");
            let _entered = job.span.enter();
            tracing::warn!(reason = rejection.reason.as_str(), detail = %rejection.detail, "parking message");
        }
        // A redelivery of a body parked before (the worker stopped between the parking confirm and
        // the acknowledgement) is already in the parking queue: acknowledge it without parking
        // it twice. If the database cannot say, park it: a duplicate beats a loss.
        let redelivered: Vec<[u8; 32]> = which
            .iter()
            .filter(|&&i| jobs[i].delivery.redelivered)
            .map(|&i| jobs[i].digest)
            .collect();
        let already = if redelivered.is_empty() {
            Default::default()
        } else {
            self.store
                .parked_before(&redelivered)
                .await
                .unwrap_or_default()
        };
        let mut remaining: Vec<usize> = Vec::new();
        for &i in which {
            if jobs[i].delivery.redelivered && already.contains(&jobs[i].digest) {
                let reason = jobs[i].decoded.as_ref().expect_err("rejected").reason;
                let _entered = jobs[i].span.enter();
                tracing::info!(
                    "already parked before an interruption; acknowledging the redelivery"
                );
                jobs[i].disposition = Some(Disposition::Parked(reason));
            } else {
                remaining.push(i);
            }
        }
        let mut delays = self.delays();
        let mut newly_parked: Vec<([u8; 32], &'static str)> = Vec::new();
        let mut handed_back = 0_usize;
        let mut last_error = None;
        while !remaining.is_empty() {
            let mut pending: Vec<(usize, Result<PendingConfirm, _>)> = Vec::new();
            for &i in &remaining {
                let job = &jobs[i];
                let rejection = job
                    .decoded
                    .as_ref()
                    .expect_err("only rejected jobs are parked");
                let properties = parked_properties(&job.delivery, rejection, parked_at);
                let sent = self
                    .parking
                    .send(
                        "",
                        &self.settings.topology.parking_queue,
                        &job.delivery.data,
                        properties,
                    )
                    .await;
                pending.push((i, sent));
            }
            let mut failed = Vec::new();
            for (i, sent) in pending {
                let confirmed = match sent {
                    Ok(confirm) => confirm.wait().await,
                    Err(error) => Err(error),
                };
                match confirmed {
                    Ok(()) => {
                        let reason = jobs[i].decoded.as_ref().expect_err("rejected").reason;
                        jobs[i].disposition = Some(Disposition::Parked(reason));
                        newly_parked.push((jobs[i].digest, reason.as_str()));
                    }
                    Err(error) => {
                        if jobs[i].delivery.acker.usable() && !error.is_transient() {
                            tracing::error!(parent: &jobs[i].span, error = %error, "cannot park the message; will try again");
                            failed.push(i);
                        } else {
                            tracing::debug!(parent: &jobs[i].span, error = %error, "cannot park the message; handing it back");
                            handed_back += 1;
                            last_error = Some(error);
                            // The connection is broken or recovering: hand the message back (the
                            // broker requeues it when the channel goes, if the nack cannot be
                            // sent) rather than hold the lane while the connection is rebuilt.
                            hand_back(&mut jobs[i]).await;
                        }
                    }
                }
            }
            // Record what this round parked before anything else can happen: a redelivery of it
            // (the channel may already be gone) must find it.
            self.remember_parked(&newly_parked).await;
            newly_parked.clear();
            if let Some(error) = last_error.take() {
                tracing::warn!(messages = handed_back, error = %error, "cannot park messages while the broker connection is down; handed them back for redelivery");
                handed_back = 0;
            }
            remaining = failed;
            if !remaining.is_empty() && !self.pause(&mut delays).await {
                for &i in &remaining {
                    hand_back(&mut jobs[i]).await;
                }
                break;
            }
        }
    }
}

impl Handler {
    /// Marks a job that kept failing for parking as `processing_failed`.
    fn give_up(&self, job: &mut Job, error: &StoreError) {
        let _entered = job.span.enter();
        tracing::error!(error = %error, "processing failed repeatedly; parking");
        job.decoded = Err(Rejection::new(
            ReasonCode::ProcessingFailed,
            format!(
                "processing failed {} times; last error: {error}",
                self.settings.worker.max_attempts
            ),
        ));
    }

    async fn remember_parked(&self, parked: &[([u8; 32], &str)]) {
        if parked.is_empty() {
            return;
        }
        if let Err(error) = self.store.record_parked(parked, now()).await {
            tracing::warn!(error = %error, "could not record parked messages; a redelivery may be parked twice");
        }
    }
}

/// Returns a delivery to the queue (or lets the broker requeue it when its channel goes) and
/// marks it abandoned.
async fn hand_back(job: &mut Job) {
    let requeue = BasicNackOptions {
        multiple: false,
        requeue: true,
    };
    let _ = job.delivery.acker.nack(requeue).await;
    job.disposition = Some(Disposition::Abandoned);
}

fn record_metrics(kind: &str, disposition: &Disposition, started: Instant) {
    let m = metrics();
    m.consumed
        .get_or_create(&ConsumedLabels {
            r#type: kind.to_owned(),
            result: disposition.as_str().to_owned(),
        })
        .inc();
    match disposition {
        Disposition::Parked(reason) => {
            m.parked
                .get_or_create(&ReasonLabel {
                    reason: reason.as_str().to_owned(),
                })
                .inc();
        }
        Disposition::Applied(statuses) => {
            for status in statuses {
                m.emitted
                    .get_or_create(&StatusLabel {
                        status: status.as_str().to_owned(),
                    })
                    .inc();
            }
        }
        _ => {}
    }
    m.processing_seconds
        .observe(started.elapsed().as_secs_f64());
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
