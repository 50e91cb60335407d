//! Lanes: each teacher's messages go to one lane (by TRN), and each lane applies one batch at a
//! time, so that concurrent transactions rarely wait for each other's teacher locks.

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::app::direct::{LaneOutbox, MARK_IDLE};
use crate::app::handler::Handler;
use crate::app::http::Progress;
use crate::config::Settings;
use crate::messages::peek;

/// The senders of `amqp.concurrency` lanes, and the progress of what they hold.
pub(super) struct Lanes {
    senders: Vec<mpsc::Sender<Delivery>>,
    progress: Arc<Progress>,
}

impl Lanes {
    /// Starts the lanes as tasks of `tasks`; each ends once its sender is dropped and it is
    /// empty.
    pub(super) fn start(
        handler: &Handler,
        settings: &Settings,
        progress: Arc<Progress>,
        tasks: &mut JoinSet<()>,
    ) -> Self {
        let lanes = settings.amqp.concurrency.max(1);
        let batch_size = settings.amqp.batch_size.max(1);
        let linger = Duration::from_millis(settings.amqp.batch_linger_millis);
        let mut senders = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            let (tx, rx) = mpsc::channel(batch_size);
            senders.push(tx);
            let lane = lane(handler.clone(), rx, batch_size, linger, progress.clone());
            tasks.spawn(lane);
        }
        Self { senders, progress }
    }

    /// Waits for room in the lane `delivery` belongs to. `None` if that lane has ended.
    pub(super) async fn reserve(&self, delivery: &Delivery) -> Option<mpsc::Permit<'_, Delivery>> {
        let lane = lane_of(&delivery.data, self.senders.len());
        let permit = self.senders[lane].reserve().await.ok()?;
        self.progress.taken();
        Some(permit)
    }
}

/// The lane a delivery belongs to: by the TRN in its payload, so that one teacher's messages
/// are applied by one lane. Messages without a readable TRN go to lane 0 (they will be parked).
fn lane_of(body: &[u8], lanes: usize) -> usize {
    let trn = peek(body).trn.and_then(|t| t.parse::<u64>().ok());
    trn.map_or(0, |t| (t % lanes as u64) as usize)
}

/// A lane: takes what is waiting (up to the batch size, after lingering if configured) and
/// applies it as one batch, one batch at a time, until its sender is dropped and it is empty.
/// The outcomes a batch committed and published are marked by the next batch's write, or after
/// [`MARK_IDLE`] with no next batch, and before the lane ends.
async fn lane(
    handler: Handler,
    mut deliveries: mpsc::Receiver<Delivery>,
    batch_size: usize,
    linger: Duration,
    progress: Arc<Progress>,
) {
    let mut outbox = LaneOutbox::new(handler.direct.clone());
    loop {
        let unmarked = !outbox.is_idle();
        let first = tokio::select! {
            first = deliveries.recv() => first,
            () = tokio::time::sleep(MARK_IDLE), if unmarked => {
                outbox.flush(&handler.store, crate::app::handler::now()).await;
                continue;
            }
        };
        let Some(first) = first else { break };
        let batch = take_batch(first, &mut deliveries, batch_size, linger).await;
        let taken = batch.len();
        handler.handle_batch(batch, &mut outbox).await;
        progress.finished(taken);
    }
    outbox
        .flush(&handler.store, crate::app::handler::now())
        .await;
}

/// `first` and whatever else is waiting, up to `batch_size`, waiting at most `linger` for more.
async fn take_batch(
    first: Delivery,
    deliveries: &mut mpsc::Receiver<Delivery>,
    batch_size: usize,
    linger: Duration,
) -> Vec<Delivery> {
    let mut batch = vec![first];
    let deadline = tokio::time::Instant::now() + linger;
    while batch.len() < batch_size {
        match deliveries.try_recv() {
            Ok(delivery) => batch.push(delivery),
            Err(mpsc::error::TryRecvError::Disconnected) => break,
            Err(mpsc::error::TryRecvError::Empty) => {
                match tokio::time::timeout_at(deadline, deliveries.recv()).await {
                    Ok(Some(delivery)) => batch.push(delivery),
                    Ok(None) | Err(_) => break,
                }
            }
        }
    }
    batch
}

#[cfg(test)]
mod tests {
    use super::lane_of;

    #[test]
    fn one_teacher_always_goes_to_one_lane_and_unreadable_bodies_to_lane_zero() {
        let body = |trn: &str| format!(r#"{{"payload":{{"trn":"{trn}"}}}}"#).into_bytes();
        assert_eq!(lane_of(&body("1000003"), 4), 3);
        assert_eq!(lane_of(&body("1000003"), 4), lane_of(&body("1000003"), 4));
        assert_eq!(lane_of(&body("1000006"), 4), 2);
        assert_eq!(lane_of(&body("not a trn"), 4), 0);
        assert_eq!(lane_of(b"{", 4), 0);
    }
}
