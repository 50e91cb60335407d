//! Handling deliveries in batches: decode each, apply the batch in one transaction, park what
//! cannot be processed (`app::parking`), and settle each delivery only after its effects are
//! committed or it is parked with a broker confirm: the channel's acknowledgement window
//! (`broker::Acks`) then acknowledges it, in a range with its neighbours when it can.

use std::time::Instant;

use lapin::message::Delivery;
use sha2::{Digest, Sha256};
use time::OffsetDateTime;
use tokio_util::sync::CancellationToken;

use super::direct::{DirectPublisher, LaneOutbox};
use super::retry::Backoff;
use crate::broker::parking::{ORIGINAL_USER_ID, header_text};
use crate::broker::{Acks, Publisher, Settled};
use crate::config::Settings;
use crate::domain::{Admission, Status};
use crate::messages::{Input, Provenance, Publishers, ReasonCode, Rejection, decode_delivery};
use crate::store::{BatchItem, Contention, Handled, Store, StoreError};
use crate::telemetry::events::MessageHandled;
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
    /// Recorded, nothing emitted: an older snapshot than the record's latest, or the very
    /// snapshot the record already holds.
    Stale,
    /// The same message (same `message_id`, same body) was processed before.
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
    /// Who may publish what (`publishers` settings and the routing keys).
    pub(crate) publishers: std::sync::Arc<Publishers>,
    /// The relay's publisher, on which lanes publish their own outcomes after each commit.
    pub(crate) direct: std::sync::Arc<DirectPublisher>,
    /// The acknowledgement window of the consumer's channel. Its task ends when the last
    /// handler holding it is dropped.
    pub(crate) acks: Acks,
}

/// The publisher rules of the settings.
pub fn publishers(settings: &Settings) -> Publishers {
    let p = &settings.publishers;
    Publishers {
        school_registration: p.school_registration.clone(),
        ab_claim: p.ab_claim.clone(),
        operators: p.operators.clone(),
        registration_routing_key: settings.topology.registration_routing_key.clone(),
        claim_routing_key: settings.topology.claim_routing_key.clone(),
    }
}

/// One delivery on its way through a batch.
pub(super) struct Job {
    pub(super) delivery: Delivery,
    pub(super) span: tracing::Span,
    kind: &'static str,
    pub(super) decoded: Result<Input, Rejection>,
    pub(super) digest: [u8; 32],
    /// The RabbitMQ user the message is judged to come from, kept as `x-original-user-id` if
    /// it is parked.
    pub(super) publisher: Option<String>,
    traceparent: Option<String>,
    pub(super) disposition: Option<Disposition>,
    /// Deferred once already, by an earlier batch of the lane or by this one.
    deferred: bool,
}

/// The messages a lane's batch deferred to a lock another transaction held, carried into the
/// lane's next batch, which comes at once (ARCHITECTURE decision 46): there they are applied
/// with the messages that arrived meanwhile, or, deferred a second time, in a transaction that
/// waits for the lock.
#[derive(Default)]
pub struct Carried(Vec<Job>);

impl Carried {
    /// True when the lane's next batch need not come at once.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// How many messages are carried.
    pub fn len(&self) -> usize {
        self.0.len()
    }
}

impl Job {
    /// The rejection of a job that is to be parked.
    pub(super) fn rejection(&self) -> Option<&Rejection> {
        self.decoded.as_ref().err()
    }
}

impl Handler {
    /// Handles the messages `carried` from the lane's last batch and then `deliveries` as one
    /// batch, and settles each: to be acknowledged, or left for redelivery; the outcomes it
    /// commits are published through `outbox` right after the commit when they can be
    /// (`app::direct`). What it defers for the first time is left in `carried`, for the lane's
    /// next batch. Returns how each of the others ended, in order.
    pub async fn handle_batch(
        &self,
        deliveries: Vec<Delivery>,
        carried: &mut Carried,
        outbox: &mut LaneOutbox,
    ) -> Vec<Disposition> {
        let started = Instant::now();
        let clock = now();
        let mut jobs: Vec<Job> = std::mem::take(&mut carried.0);
        jobs.extend(
            deliveries
                .into_iter()
                .map(|d| prepare(d, clock, &self.publishers)),
        );
        let prepared = started.elapsed();
        // What did not decode is parked while what did is applied: the parking queue's
        // confirms and the record of what was parked are waited for beside the transaction,
        // not after it (ARCHITECTURE decision 48). Then what the store refused is parked too.
        let (mut accepted, mut rejected): (Vec<&mut Job>, Vec<&mut Job>) =
            jobs.iter_mut().partition(|job| job.decoded.is_ok());
        let mut parked = rejected.len();
        let (park_us, ()) = tokio::join!(
            async {
                let parking = Instant::now();
                self.park(&mut rejected).await;
                parking.elapsed().as_micros() as u64
            },
            async {
                if !accepted.is_empty() {
                    self.apply(&mut accepted, outbox).await;
                }
            },
        );
        let applied = started.elapsed();
        // Left undecided and still accepted: deferred for the first time, for the next batch.
        let mut jobs = carry(jobs, carried);
        let mut refused: Vec<&mut Job> = jobs
            .iter_mut()
            .filter(|job| job.disposition.is_none())
            .collect();
        parked += refused.len();
        if !refused.is_empty() {
            self.park(&mut refused).await;
        }
        let decided = started.elapsed();
        let count = jobs.len();
        let results = settle(jobs, started, &self.acks);
        // Where the batch's time went: decoding, the transaction (`batch committed` splits it),
        // parking (the parking queue's confirms, then `parked_log`; what did not decode beside
        // the transaction, `park_us`, and what the store refused after it, `refused_us`).
        tracing::debug!(
            messages = count,
            parked,
            prepare_us = prepared.as_micros() as u64,
            park_us,
            refused_us = (decided - applied).as_micros() as u64,
            decided_ms = decided.as_millis() as u64,
            elapsed_ms = started.elapsed().as_millis() as u64,
            "batch handled"
        );
        results
    }

    /// Applies the accepted jobs in one transaction, retrying while the database is unavailable,
    /// without waiting for a lock another transaction holds (another lane's batch, another
    /// worker's); the jobs that need one are left undecided for the lane's next batch
    /// ([`Carried`]), unless one of them was deferred before: then they are all applied next,
    /// in a transaction that waits for it (ARCHITECTURE decisions 44 and 46). If a transaction
    /// fails for another reason, each of its jobs is retried alone, so that one message that
    /// cannot be processed is parked and the others go through.
    async fn apply(&self, jobs: &mut [&mut Job], outbox: &mut LaneOutbox) {
        let accepted: Vec<usize> = (0..jobs.len())
            .filter(|&i| jobs[i].decoded.is_ok())
            .collect();
        let deferred = self
            .apply_some(jobs, &accepted, Contention::Defer, outbox)
            .await;
        if deferred.is_empty() {
            return;
        }
        let again = deferred.iter().any(|&i| jobs[i].deferred);
        for &i in &deferred {
            jobs[i].deferred = true;
        }
        if again {
            tracing::debug!(
                messages = deferred.len(),
                "applying the messages that waited for another transaction's locks"
            );
            self.apply_some(jobs, &deferred, Contention::Wait, outbox)
                .await;
        } else {
            tracing::debug!(
                messages = deferred.len(),
                "carrying the messages that wait for another transaction's locks to the next batch"
            );
        }
    }

    /// Applies the jobs `which` in one transaction (see [`Handler::apply`]); returns those it
    /// deferred.
    async fn apply_some(
        &self,
        jobs: &mut [&mut Job],
        which: &[usize],
        contention: Contention,
        outbox: &mut LaneOutbox,
    ) -> Vec<usize> {
        let alone = which.len() == 1;
        match self
            .apply_with_retries(jobs, which, alone, outbox, contention)
            .await
        {
            Ok(deferred) => deferred,
            Err(error) if alone => {
                self.give_up(jobs[which[0]], &error);
                Vec::new()
            }
            Err(_) => {
                tracing::warn!(
                    messages = which.len(),
                    "batch failed; retrying its messages one by one"
                );
                for &i in which {
                    if let Err(error) = self
                        .apply_with_retries(jobs, &[i], true, outbox, Contention::Wait)
                        .await
                    {
                        self.give_up(jobs[i], &error);
                    }
                }
                Vec::new()
            }
        }
    }

    /// Runs one batch until it commits. Transient failures are retried without limit (unless
    /// shutting down gives up, which abandons the batch); other failures up to `max_attempts`
    /// when `count_failures`, else once. Returns the jobs it deferred.
    async fn apply_with_retries(
        &self,
        jobs: &mut [&mut Job],
        which: &[usize],
        count_failures: bool,
        outbox: &mut LaneOutbox,
        contention: Contention,
    ) -> Result<Vec<usize>, StoreError> {
        let mut backoff = Backoff::new(&self.settings);
        let mut failures = 0;
        let mut outage_logged = false;
        loop {
            // Deliveries of a channel that has closed since (the broker closed it, or the
            // connection was lost) can no longer be acknowledged, and the broker has put them
            // back in the queue for another consumer: applying them now would only race the
            // lanes of the channel that replaced this one, holding a second copy of the batch
            // (ARCHITECTURE decision 41).
            if !which.is_empty() && which.iter().all(|&i| jobs[i].delivery.acker.poisoned()) {
                for &i in which {
                    abandoned_with_its_channel(jobs[i]);
                }
                if outage_logged {
                    tracing::info!(messages = which.len(), "{}", CHANNEL_CLOSED);
                }
                return Ok(Vec::new());
            }
            let error = match self.apply_once(jobs, which, outbox, contention).await {
                Ok(deferred) => {
                    if outage_logged {
                        tracing::info!("database available again");
                    }
                    return Ok(deferred);
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
            if !backoff.pause(&self.abandon).await {
                for &i in which {
                    jobs[i].disposition = Some(Disposition::Abandoned);
                }
                return Ok(Vec::new());
            }
        }
    }

    /// One attempt at the batch `which`; on commit, records how each job ended, and returns
    /// those it deferred (no disposition yet).
    async fn apply_once(
        &self,
        jobs: &mut [&mut Job],
        which: &[usize],
        outbox: &mut LaneOutbox,
        contention: Contention,
    ) -> Result<Vec<usize>, StoreError> {
        let items: Vec<BatchItem<'_>> = which
            .iter()
            .filter_map(|&i| {
                let job = &jobs[i];
                Some(BatchItem {
                    input: job.decoded.as_ref().ok()?,
                    digest: job.digest,
                    traceparent: job.traceparent.clone(),
                })
            })
            .collect();
        let attempt = Instant::now();
        let clock = now();
        // The confirms of what the lane published last are waited for beside the batch's first
        // statement: only its write needs them. The wait starts once the transaction has begun
        // (a pool connection taken, `BEGIN` answered).
        let (mut begun, mut confirmed) = (std::time::Duration::ZERO, std::time::Duration::ZERO);
        let publishing = async {
            begun = attempt.elapsed();
            let publishing = outbox.before_write(&self.store, clock).await;
            confirmed = attempt.elapsed();
            publishing
        };
        let applied = self
            .store
            .apply_batch_publishing(&items, clock, publishing, contention);
        let (results, written) = applied.await?;
        outbox.committed(&self.store, written).await;
        let messages = items.len();
        let mut deferred = Vec::new();
        for (&i, handled) in which.iter().zip(results) {
            let job = &mut *jobs[i];
            job.disposition = match handled {
                Handled::Applied {
                    admission: Admission::Latest { .. },
                    emitted,
                } => Some(Disposition::Applied(emitted)),
                Handled::Applied { .. } => Some(Disposition::Stale),
                Handled::Duplicate => Some(Disposition::Duplicate),
                Handled::Reused => {
                    job.decoded = Err(Rejection::reused_id());
                    None
                }
                // Applied by the transaction that waits, next.
                Handled::Deferred => {
                    deferred.push(i);
                    None
                }
            };
        }
        if !deferred.is_empty() {
            crate::telemetry::metrics::metrics()
                .deferred
                .inc_by(deferred.len() as u64);
        }
        tracing::debug!(
            messages,
            deferred = deferred.len(),
            begun_us = begun.as_micros() as u64,
            confirms_us = confirmed.as_micros() as u64,
            elapsed_ms = attempt.elapsed().as_millis() as u64,
            "batch committed"
        );
        Ok(deferred)
    }

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
}

/// What a lane logs when it lets messages go because their channel has closed.
pub(super) const CHANNEL_CLOSED: &str =
    "the channel of these messages has closed; leaving them to their redelivery";

/// True, and the job marked abandoned, when the channel of its delivery has closed since it
/// arrived (the broker has put it back in the queue; an acknowledgement could not go out).
pub(super) fn abandoned_with_its_channel(job: &mut Job) -> bool {
    let gone = job.delivery.acker.poisoned();
    if gone {
        job.disposition = Some(Disposition::Abandoned);
    }
    gone
}

/// Moves the jobs left undecided that are still accepted (deferred for the first time) into
/// `carried`, in order, and returns the others, in order.
fn carry(jobs: Vec<Job>, carried: &mut Carried) -> Vec<Job> {
    let (deferred, kept) = jobs
        .into_iter()
        .partition(|job| job.disposition.is_none() && job.decoded.is_ok());
    carried.0 = deferred;
    kept
}

/// Decodes a delivery with the batch's clock and opens its span (continuing the publisher's
/// trace).
fn prepare(delivery: Delivery, clock: OffsetDateTime, publishers: &Publishers) -> Job {
    let span = tracing::info_span!(
        "message",
        message.id = tracing::field::Empty,
        message.r#type = tracing::field::Empty,
        message.result = tracing::field::Empty,
        message.bytes = delivery.data.len(),
    );
    let incoming = header_text(&delivery.properties, "traceparent");
    continue_trace(
        &span,
        incoming.as_deref(),
        header_text(&delivery.properties, "tracestate").as_deref(),
    );
    let original_user_id = header_text(&delivery.properties, ORIGINAL_USER_ID);
    let provenance = Provenance {
        user_id: delivery.properties.user_id().as_ref().map(|u| u.as_str()),
        routing_key: delivery.routing_key.as_str(),
        original_user_id: original_user_id.as_deref(),
    };
    let decoded = decode_delivery(&delivery.data, clock, publishers, &provenance);
    let publisher = publishers.publisher(&provenance).map(str::to_owned);
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
        publisher,
        traceparent,
        disposition: None,
        deferred: false,
    }
}

/// Settles every decided job (an abandoned one is left unacknowledged) and reports it.
///
/// The acknowledgements go to the channel's window, which sends them without the lane waiting:
/// one frame with `multiple` for the run of settled deliveries it can cover, the others alone
/// (`broker::Acks`; ARCHITECTURE decision 29).
fn settle(jobs: Vec<Job>, started: Instant, acks: &Acks) -> Vec<Disposition> {
    let mut results = Vec::with_capacity(jobs.len());
    let mut settled = Vec::with_capacity(jobs.len());
    for job in jobs {
        let disposition = job.disposition.unwrap_or(Disposition::Abandoned);
        let _entered = job.span.enter();
        job.span.record("message.result", disposition.as_str());
        report(job.kind, &disposition, started);
        settled.push(Settled {
            tag: job.delivery.delivery_tag,
            acker: job.delivery.acker.clone(),
            ack: disposition != Disposition::Abandoned,
        });
        results.push(disposition);
    }
    acks.settle(settled);
    results
}

fn report(kind: &str, disposition: &Disposition, started: Instant) {
    let statuses: Vec<&'static str> = match disposition {
        Disposition::Applied(statuses) => statuses.iter().map(|s| s.as_str()).collect(),
        _ => Vec::new(),
    };
    MessageHandled {
        kind,
        result: disposition.as_str(),
        parked: match disposition {
            Disposition::Parked(reason) => Some(reason.as_str()),
            _ => None,
        },
        emitted: &statuses,
        elapsed: started.elapsed(),
    }
    .emit();
}

#[cfg(test)]
mod tests {
    use super::{Carried, Disposition, Job, carry, now};
    use crate::messages::{Rejection, decode};
    use lapin::message::Delivery;

    /// A job for delivery `tag`: accepted (a valid registration) or not (a body that does not
    /// parse), and decided or not.
    fn job(tag: u64, accepted: bool, disposition: Option<Disposition>) -> Job {
        let body = if accepted {
            format!(
                r#"{{"message_id":"00000000-0000-4000-8000-{tag:012}","message_type":"school_registration",
                "schema_version":1,"occurred_at":"2025-09-01T09:00:00Z","payload":{{"registration_id":"r-{tag}",
                "trn":"100000{tag}","school_urn":123456,"started_on":"2025-09-01","appropriate_body_id":"AB-1",
                "training_programme":"provider_led","lead_provider_id":"LP-1"}}}}"#
            )
            .into_bytes()
        } else {
            b"{".to_vec()
        };
        let decoded = decode(&body, now());
        assert_eq!(decoded.is_ok(), accepted, "{decoded:?}");
        Job {
            delivery: Delivery::mock(tag, "".into(), "school.registration".into(), false, body),
            span: tracing::Span::none(),
            kind: "test",
            decoded,
            digest: [0; 32],
            publisher: None,
            traceparent: None,
            disposition,
            deferred: false,
        }
    }

    fn tags(jobs: &[Job]) -> Vec<u64> {
        jobs.iter().map(|job| job.delivery.delivery_tag).collect()
    }

    #[test]
    fn only_the_accepted_jobs_left_undecided_are_carried_in_their_order() {
        let applied = || Some(Disposition::Applied(Vec::new()));
        let mut jobs = vec![
            job(1, true, None),
            job(2, false, None),
            job(3, true, applied()),
            job(4, true, None),
            job(5, true, Some(Disposition::Abandoned)),
            job(6, true, None),
        ];
        // Refused by the store (a reused id): no longer accepted, to be parked, not carried.
        jobs[3].decoded = Err(Rejection::reused_id());
        let mut carried = Carried::default();
        let kept = carry(jobs, &mut carried);
        assert_eq!(tags(&carried.0), [1, 6], "the deferred jobs, in order");
        assert_eq!(carried.len(), 2);
        assert_eq!(tags(&kept), [2, 3, 4, 5], "the others, in delivery order");
    }
}
