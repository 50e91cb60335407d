//! Parking: republishing a message that cannot be processed, unchanged, to the parking queue
//! with the reason headers of CONTRACT.md section 3 (`broker::parking` writes them), and
//! remembering its body so that a redelivery is not parked twice.

use time::format_description::well_known::Rfc3339;

use super::handler::{CHANNEL_CLOSED, Disposition, Handler, Job, abandoned_with_its_channel, now};
use super::retry::Backoff;
use crate::broker::parking::parked_properties;
use crate::broker::{BrokerError, Outgoing, WhenBlocked, requeue};

impl Handler {
    /// Parks each job and waits for the broker's confirms. Retries a refusal while the channel
    /// works; hands a message back for redelivery when the connection is down.
    pub(super) async fn park(&self, jobs: &mut [&mut Job]) {
        for job in jobs.iter() {
            if let Some(rejection) = job.rejection() {
                let _entered = job.span.enter();
                tracing::warn!(reason = rejection.reason.as_str(), detail = %rejection.detail, "parking message");
            }
        }
        let mut remaining = self.not_parked_before(jobs).await;
        let mut backoff = Backoff::new(&self.settings);
        while !remaining.is_empty() {
            // A message whose channel has closed since (its acknowledgement cannot go out) is
            // back in the queue: parked now, it would be parked again on its redelivery when
            // the database cannot record it (ARCHITECTURE decision 41).
            let before = remaining.len();
            remaining.retain(|&i| !abandoned_with_its_channel(jobs[i]));
            if remaining.len() < before {
                tracing::info!(messages = before - remaining.len(), "{CHANNEL_CLOSED}");
            }
            if remaining.is_empty() {
                break;
            }
            // While the broker blocks the connection (a resource alarm) nothing can be parked;
            // the lane waits for the unblock (or the shutdown deadline) instead of retrying.
            if self.parking.is_blocked() && !self.parking.until_unblocked(&self.abandon).await {
                for &i in &remaining {
                    hand_back(jobs[i]).await;
                }
                break;
            }
            remaining = self.park_round(jobs, &remaining).await;
            if !remaining.is_empty() && !backoff.pause(&self.abandon).await {
                for &i in &remaining {
                    hand_back(jobs[i]).await;
                }
                break;
            }
        }
    }

    /// A redelivery of a body parked before (the worker stopped between the parking confirm and
    /// the acknowledgement) is already in the parking queue: it is marked parked without being
    /// parked twice. If the database cannot say, it is parked again: a duplicate beats a loss.
    /// Returns the indexes still to park.
    async fn not_parked_before(&self, jobs: &mut [&mut Job]) -> Vec<usize> {
        let redelivered: Vec<[u8; 32]> = jobs
            .iter()
            .filter(|job| job.delivery.redelivered)
            .map(|job| job.digest)
            .collect();
        let already = if redelivered.is_empty() {
            Default::default()
        } else {
            self.store
                .parked_before(&redelivered)
                .await
                .unwrap_or_default()
        };
        let mut remaining = Vec::new();
        for (i, job) in jobs.iter_mut().enumerate() {
            let reason = job.rejection().map(|r| r.reason);
            match reason {
                Some(reason) if job.delivery.redelivered && already.contains(&job.digest) => {
                    let _entered = job.span.enter();
                    tracing::info!(
                        "already parked before an interruption; acknowledging the redelivery"
                    );
                    job.disposition = Some(Disposition::Parked(reason));
                }
                Some(_) => remaining.push(i),
                None => {}
            }
        }
        remaining
    }

    /// Publishes the jobs `which` to the parking queue, all sent and then all confirmed, and
    /// records what was parked. Returns the indexes to try again.
    async fn park_round(&self, jobs: &mut [&mut Job], which: &[usize]) -> Vec<usize> {
        let parked_at = now().format(&Rfc3339).unwrap_or_default();
        let queue = self.settings.topology.parking_queue.as_str();
        let messages: Vec<Outgoing<'_>> = which
            .iter()
            .filter_map(|&i| {
                let job = &*jobs[i];
                let rejection = job.rejection()?;
                Some(Outgoing {
                    exchange: "",
                    routing_key: queue,
                    body: &job.delivery.data,
                    properties: parked_properties(
                        &job.delivery,
                        rejection.reason.as_str(),
                        &rejection.detail,
                        &parked_at,
                        job.publisher.as_deref(),
                    ),
                })
            })
            .collect();
        // A lane that parks waits for the end of an alarm anyway, and a message the broker had
        // begun to read when it blocked the connection is confirmed after the unblock: waited
        // for, it is parked once rather than sent again.
        let results = self
            .parking
            .publish_all_with(messages, WhenBlocked::WaitThrough)
            .await;
        let mut parked: Vec<([u8; 32], &'static str)> = Vec::new();
        let mut again = Vec::new();
        let mut handed_back: Option<(usize, BrokerError)> = None;
        for (&i, result) in which.iter().zip(results) {
            let job = &mut *jobs[i];
            let Some(reason) = job.rejection().map(|r| r.reason) else {
                continue;
            };
            match result {
                Ok(()) => {
                    job.disposition = Some(Disposition::Parked(reason));
                    parked.push((job.digest, reason.as_str()));
                }
                Err(error) if job.delivery.acker.usable() && error.is_blocked() => {
                    // Sent again once the broker unblocks the connection (see `park`).
                    tracing::debug!(parent: &job.span, error = %error, "cannot park the message yet");
                    again.push(i);
                }
                Err(error) if job.delivery.acker.usable() && !error.is_transient() => {
                    tracing::error!(parent: &job.span, error = %error, "cannot park the message; will try again");
                    again.push(i);
                }
                Err(error) => {
                    // The connection is broken or recovering: hand the message back (the broker
                    // requeues it when the channel goes, if the nack cannot be sent) rather than
                    // hold the lane while the connection is rebuilt.
                    tracing::debug!(parent: &job.span, error = %error, "cannot park the message; handing it back");
                    hand_back(job).await;
                    let count = handed_back.as_ref().map_or(0, |(n, _)| *n);
                    handed_back = Some((count + 1, error));
                }
            }
        }
        // Record what this round parked before anything else can happen: a redelivery of it
        // (the channel may already be gone) must find it.
        self.remember_parked(&parked).await;
        if let Some((messages, error)) = handed_back {
            tracing::warn!(messages, error = %error, "cannot park messages while the broker connection is down; handed them back for redelivery");
        }
        again
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
    requeue(&job.delivery.acker).await;
    job.disposition = Some(Disposition::Abandoned);
}
