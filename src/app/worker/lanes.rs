//! Lanes: each teacher's messages go to one lane (by TRN), and each lane applies one batch at a
//! time, so that concurrent transactions rarely wait for each other's teacher locks.

use std::sync::Arc;
use std::time::Duration;

use lapin::message::Delivery;
use tokio::sync::mpsc;
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::app::direct::{LaneOutbox, MARK_IDLE};
use crate::app::handler::{Carried, Handler};
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
        let linger = Linger {
            max: Duration::from_millis(settings.amqp.batch_linger_millis),
            adaptive: settings.amqp.batch_linger_adaptive,
        };
        let mut senders = Vec::with_capacity(lanes);
        for _ in 0..lanes {
            let (tx, rx) = mpsc::channel(batch_size);
            senders.push(tx);
            let batching = Batching::new(batch_size, linger);
            let lane = lane(handler.clone(), rx, batching, progress.clone());
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

/// How long a lane's batch waits for more deliveries after its first.
#[derive(Clone, Copy, Debug)]
struct Linger {
    /// The longest wait (`amqp.batch_linger_millis`).
    max: Duration,
    /// Wait only while the batch and the lane's last one are small and the lane's recent
    /// arrivals make the next delivery due within the wait (`amqp.batch_linger_adaptive`).
    adaptive: bool,
}

impl Linger {
    /// An adaptive linger waits only for a batch smaller than this. Measured on the bench's
    /// machine (docs/PERFORMANCE.md, "Nineteenth round"), a batch cost about 4.7 ms and each
    /// message in it about 0.35 ms more: up to about this size the batch's own cost is most of
    /// what each message waits for, so gathering more pays; beyond it a batch is mostly its
    /// messages' work, and waiting for more only adds the wait (at 3,000 msg/s batches held 30
    /// by themselves, and a 5 ms linger with no such bound raised p50 from 24–43 ms to 34–64).
    const SMALL_BATCH: usize = 16;
}

/// How many deliveries reached a lane lately: a count that decays by `e` every [`Self::TAU`],
/// so that it reads as the rate of the last fifth of a second or so. Pure, so that it is
/// tested with explicit instants.
#[derive(Clone, Copy, Debug)]
struct Arrivals {
    count: f64,
    at: Instant,
}

impl Arrivals {
    /// The decay's time constant: long enough to span many batches, short enough that a lane
    /// that has just drained a burst stops lingering within half a second of it (with 500 ms,
    /// lanes still lingered in the first second or so of 100 msg/s after a burst, and p99 there
    /// went from 9 to 15–20 ms).
    const TAU: Duration = Duration::from_millis(200);

    fn new(now: Instant) -> Self {
        Self {
            count: 0.0,
            at: now,
        }
    }

    fn decayed(&self, now: Instant) -> f64 {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.count * (-elapsed / Self::TAU.as_secs_f64()).exp()
    }

    /// Counts `n` deliveries taken at `now`.
    fn record(&mut self, n: usize, now: Instant) {
        self.count = self.decayed(now) + n as f64;
        self.at = self.at.max(now);
    }

    /// Deliveries a second, lately.
    fn per_second(&self, now: Instant) -> f64 {
        self.decayed(now) / Self::TAU.as_secs_f64()
    }

    /// Whether, at the recent rate, the next delivery is due before `deadline`: the mean gap
    /// between deliveries is shorter than what is left of the wait.
    fn next_due_before(&self, now: Instant, deadline: Instant) -> bool {
        let left = deadline.saturating_duration_since(now).as_secs_f64();
        left > 0.0 && self.per_second(now) * left >= 1.0
    }
}

/// A lane: takes what is waiting (up to the batch size, after lingering if configured) and
/// applies it as one batch, one batch at a time, until its sender is dropped and it is empty.
/// A batch that carries messages its last one deferred ([`Carried`]) comes at once, with what
/// is waiting then. The outcomes a batch committed and published are marked by the next
/// batch's write, or after [`MARK_IDLE`] with no next batch, and before the lane ends.
async fn lane(
    handler: Handler,
    mut deliveries: mpsc::Receiver<Delivery>,
    mut batching: Batching,
    progress: Arc<Progress>,
) {
    let mut outbox = LaneOutbox::new(handler.direct.clone());
    let mut carried = Carried::default();
    loop {
        // A batch that carries deferred messages comes at once, with whatever is waiting.
        let batch = if carried.is_empty() {
            let unmarked = !outbox.is_idle();
            let first = tokio::select! {
                first = deliveries.recv() => first,
                () = tokio::time::sleep(MARK_IDLE), if unmarked => {
                    outbox.flush(&handler.store, crate::app::handler::now()).await;
                    continue;
                }
            };
            let Some(first) = first else { break };
            batching.take(first, &mut deliveries).await
        } else {
            batching.take_waiting(carried.len(), &mut deliveries)
        };
        let finished = handler.handle_batch(batch, &mut carried, &mut outbox).await;
        progress.finished(finished.len());
    }
    outbox
        .flush(&handler.store, crate::app::handler::now())
        .await;
}

/// How a lane takes its batches: their largest size, the linger, and what it has seen lately.
struct Batching {
    batch_size: usize,
    linger: Linger,
    arrivals: Arrivals,
    /// The size of the lane's last batch.
    previous: usize,
}

impl Batching {
    fn new(batch_size: usize, linger: Linger) -> Self {
        Self {
            batch_size,
            linger,
            arrivals: Arrivals::new(Instant::now()),
            previous: 0,
        }
    }

    /// Whether a batch of `taken` deliveries should wait at `now` for another before
    /// `deadline`. A lane whose last batch was large is behind (draining a backlog, or at a
    /// rate whose batches are large by themselves): it takes what is there, as waiting would
    /// only idle it (a drain with the linger on whatever the last batch was about 7% slower).
    fn waits(&self, taken: usize, now: Instant, deadline: Instant) -> bool {
        if !self.linger.adaptive {
            return now < deadline;
        }
        self.previous < Linger::SMALL_BATCH
            && taken < Linger::SMALL_BATCH
            && self.arrivals.next_due_before(now, deadline)
    }

    /// Whatever is waiting now, up to the batch size less the `carried` messages that go first,
    /// without lingering: a batch that carries deferred messages does not keep them waiting.
    fn take_waiting(
        &mut self,
        carried: usize,
        deliveries: &mut mpsc::Receiver<Delivery>,
    ) -> Vec<Delivery> {
        let mut batch = Vec::new();
        while carried + batch.len() < self.batch_size {
            let Ok(next) = deliveries.try_recv() else {
                break;
            };
            batch.push(next);
        }
        self.arrivals.record(batch.len(), Instant::now());
        self.previous = carried + batch.len();
        batch
    }

    /// `first` and whatever else is waiting, up to the batch size, waiting at most the
    /// linger's length for more; with an adaptive linger only while this batch and the
    /// previous one are small and the recent arrivals make the next delivery due within what
    /// is left of that wait. So a quiet lane does not wait for deliveries that will not come, a
    /// lane at an everyday rate gathers a batch worth its cost, and a busy one, whose batches
    /// are large by themselves, does not wait at all (docs/PERFORMANCE.md, "Nineteenth round").
    async fn take(
        &mut self,
        first: Delivery,
        deliveries: &mut mpsc::Receiver<Delivery>,
    ) -> Vec<Delivery> {
        let mut batch = vec![first];
        let deadline = Instant::now() + self.linger.max;
        while batch.len() < self.batch_size {
            let next = match deliveries.try_recv() {
                Ok(delivery) => delivery,
                Err(mpsc::error::TryRecvError::Disconnected) => break,
                Err(mpsc::error::TryRecvError::Empty) => {
                    if !self.waits(batch.len(), Instant::now(), deadline) {
                        break;
                    }
                    match tokio::time::timeout_at(deadline, deliveries.recv()).await {
                        Ok(Some(delivery)) => delivery,
                        Ok(None) | Err(_) => break,
                    }
                }
            };
            self.arrivals.record(1, Instant::now());
            batch.push(next);
        }
        // The first counts only now, so that a lone delivery after a quiet spell finds no
        // recent rate and does not wait for a second.
        self.arrivals.record(1, Instant::now());
        self.previous = batch.len();
        batch
    }
}

#[cfg(test)]
mod tests {
    use super::{Arrivals, Batching, Instant, Linger, lane_of};
    use std::time::Duration;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    /// `per_second` deliveries a second, evenly, for `for_` from `start`; returns the last
    /// delivery's instant.
    fn steady(arrivals: &mut Arrivals, start: Instant, per_second: u64, for_: Duration) -> Instant {
        let gap = Duration::from_secs(1) / per_second as u32;
        let mut at = start;
        while at < start + for_ {
            arrivals.record(1, at);
            at += gap;
        }
        at - gap
    }

    #[test]
    fn the_rate_reads_what_arrived_lately() {
        let start = Instant::now();
        let mut arrivals = Arrivals::new(start);
        assert_eq!(arrivals.per_second(start), 0.0, "nothing yet");
        let last = steady(&mut arrivals, start, 500, Duration::from_secs(5));
        let rate = arrivals.per_second(last);
        assert!((450.0..=550.0).contains(&rate), "{rate} for 500 a second");
        // Gone quiet: after two seconds the rate has fallen below a fiftieth.
        let later = arrivals.per_second(last + Duration::from_secs(2));
        assert!(later < 10.0, "{later} two seconds after the last");
        // Counted in bursts (a lane takes several at once), the same rate reads the same.
        let mut bursts = Arrivals::new(start);
        let mut at = start;
        while at < start + Duration::from_secs(5) {
            bursts.record(10, at);
            at += ms(20);
        }
        let rate = bursts.per_second(at - ms(20));
        assert!((450.0..=600.0).contains(&rate), "{rate} for 10 every 20 ms");
    }

    #[test]
    fn a_busy_lane_lingers_and_a_quiet_one_does_not() {
        let start = Instant::now();
        let linger = ms(5);
        // 500 a second: one every 2 ms, due within a 5 ms linger.
        let mut busy = Arrivals::new(start);
        let now = steady(&mut busy, start, 500, Duration::from_secs(3));
        assert!(busy.next_due_before(now, now + linger));
        // But not within the last millisecond of it.
        assert!(!busy.next_due_before(now + ms(4), now + linger));
        // 150 a second (300 msg/s over two lanes): one every 6.7 ms, not due within 5 ms.
        let mut quiet = Arrivals::new(start);
        let now = steady(&mut quiet, start, 150, Duration::from_secs(3));
        assert!(!quiet.next_due_before(now, now + linger));
        assert!(quiet.next_due_before(now, now + ms(10)), "due within 10 ms");
        // A new lane has seen nothing, and a linger of 0 never waits.
        assert!(!Arrivals::new(start).next_due_before(start, start + linger));
        assert!(!busy.next_due_before(now, now));
    }

    #[test]
    fn an_adaptive_linger_waits_only_for_a_small_batch_that_more_will_soon_join() {
        let start = Instant::now();
        let adaptive = Linger {
            max: ms(5),
            adaptive: true,
        };
        let mut busy = Arrivals::new(start);
        let now = steady(&mut busy, start, 500, Duration::from_secs(3));
        let deadline = now + adaptive.max;
        // A lane with `arrivals` whose last batch held `previous`.
        let lane = |linger: Linger, arrivals: Arrivals, previous: usize| Batching {
            batch_size: 500,
            linger,
            arrivals,
            previous,
        };
        let small = Linger::SMALL_BATCH - 1;
        assert!(lane(adaptive, busy, 1).waits(1, now, deadline));
        assert!(lane(adaptive, busy, small).waits(small, now, deadline));
        assert!(
            !lane(adaptive, busy, 1).waits(Linger::SMALL_BATCH, now, deadline),
            "a batch large by itself does not wait"
        );
        assert!(
            !lane(adaptive, busy, Linger::SMALL_BATCH).waits(1, now, deadline),
            "a lane behind (its last batch large) does not wait"
        );
        let quiet = Arrivals::new(start);
        assert!(!lane(adaptive, quiet, 1).waits(1, now, deadline));
        // A fixed linger waits until its deadline, whatever the batch and the rate.
        let fixed = Linger {
            adaptive: false,
            ..adaptive
        };
        assert!(lane(fixed, quiet, 1).waits(1, now, deadline));
        assert!(lane(fixed, busy, 500).waits(500, now, deadline));
        assert!(!lane(fixed, busy, 1).waits(1, deadline, deadline));
    }

    #[test]
    fn an_instant_before_the_last_counts_as_the_last() {
        let start = Instant::now();
        let mut arrivals = Arrivals::new(start + ms(100));
        arrivals.record(5, start);
        assert!(arrivals.per_second(start) > 0.0);
        assert_eq!(arrivals.at, start + ms(100));
    }

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
