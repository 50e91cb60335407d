//! Acknowledging in ranges: one `basic.ack` with `multiple` for a run of settled deliveries
//! instead of one frame per delivery (issue 15; ARCHITECTURE decision 29).
//!
//! On a quorum queue every acknowledgement frame becomes a Raft command of its own, so a batch of
//! 500 single acknowledgements cost the broker 500 commands. The lanes settle their deliveries out
//! of order (each lane holds the deliveries of its own teachers, interleaved on one channel), so
//! the range that can be acknowledged at once is the run of settled deliveries from the lowest
//! one not yet settled: the *frontier*. [`Window`] keeps that frontier; [`Acks`] is the task
//! that owns one window per consumer channel and sends what it says is due.
//!
//! The rules that keep it safe:
//!
//! - A range acknowledgement covers every delivery up to its tag on its channel, so the window
//!   only ever sends one for a tag below which every delivery was settled to be acknowledged
//!   (or already acknowledged alone). A delivery left unacknowledged on purpose (abandoned at
//!   shutdown, handed back) stops the frontier for good: from then on, each delivery of that
//!   channel is acknowledged alone.
//! - A settled delivery that waits behind an unsettled one for longer than `hold` (a lane slow
//!   on its batch, a database retry) is acknowledged alone, so that no lane holds the others'
//!   acknowledgements, nor their share of the prefetch, for long.
//! - Delivery tags start again at 1 when lapin recovers the channel. lapin poisons every acker of
//!   the channel before it does, so the window starts again when the ackers it holds are
//!   poisoned, and it ignores a delivery whose acker is: the broker redelivers that one.
//! - A tag is never sent twice: acknowledging a tag the broker no longer holds closes the channel.

use std::collections::BTreeMap;
use std::future::Future;
use std::time::{Duration, Instant};

use lapin::Acker;
use lapin::options::BasicAckOptions;
use tokio::sync::mpsc;

use super::Broker;
use super::consumer::SETTLE_TIMEOUT;
use super::publisher::STATUS_CHECK;

/// Settled markers a window keeps above a frontier that does not move; past this, it gives the
/// frontier up and acknowledges each delivery alone (bounded memory if a tag never settles).
const MAX_HELD: usize = 65_536;

/// An acker, as the window sees it: whether the channel generation it belongs to has ended.
pub trait Generation: Clone {
    /// True once the channel of this delivery is closed or being recovered.
    fn ended(&self) -> bool;
}

impl Generation for Acker {
    fn ended(&self) -> bool {
        self.poisoned()
    }
}

/// One delivery the window holds above its frontier.
enum Entry<A> {
    /// To be acknowledged; settled at `since`.
    Waiting { acker: A, since: Instant },
    /// Already acknowledged alone.
    Sent,
    /// Left unacknowledged on purpose: the broker redelivers it when the channel closes.
    Left,
}

/// What is due now: one range acknowledgement and the deliveries to acknowledge alone.
pub struct Due<A> {
    /// The acker of the highest tag of the range, with `multiple`.
    pub range: Option<A>,
    /// How many deliveries that range settles (for the log, when it fails).
    pub in_range: usize,
    /// Acknowledged one by one.
    pub alone: Vec<A>,
}

impl<A> Due<A> {
    fn none() -> Self {
        Self {
            range: None,
            in_range: 0,
            alone: Vec::new(),
        }
    }

    /// True when nothing is to be sent.
    pub fn is_empty(&self) -> bool {
        self.range.is_none() && self.alone.is_empty()
    }
}

/// The acknowledgement window of one consumer channel (pure: no IO, the clock is given).
pub struct Window<A> {
    /// The lowest tag not yet passed: every tag below it is settled and acknowledged (or sent).
    next: u64,
    /// Settled deliveries at or above `next`.
    held: BTreeMap<u64, Entry<A>>,
    /// The frontier stopped at a delivery left unacknowledged, or was given up: everything of
    /// this generation is acknowledged alone, at once.
    alone_only: bool,
    /// Due alone at the next [`Window::due`], whatever the frontier.
    now_alone: Vec<A>,
    /// An acker of the channel's current generation.
    current: Option<A>,
    hold: Duration,
}

impl<A: Generation> Window<A> {
    /// A window for a new channel, whose first delivery has tag 1.
    pub fn new(hold: Duration) -> Self {
        Self {
            next: 1,
            held: BTreeMap::new(),
            alone_only: false,
            now_alone: Vec::new(),
            current: None,
            hold,
        }
    }

    /// Records that delivery `tag` is settled: to be acknowledged with `acker` (`ack`), or left
    /// unacknowledged. False when ignored because its channel has ended (the broker redelivers
    /// it; an acknowledgement could not go out anyway).
    pub fn settle(&mut self, tag: u64, acker: A, ack: bool, now: Instant) -> bool {
        if acker.ended() {
            return false;
        }
        if self.current.as_ref().is_some_and(Generation::ended) {
            // lapin recovered the channel: what the window holds is of the old one (it cannot be
            // acknowledged any more), and tags start again at 1.
            self.held.clear();
            self.now_alone.clear();
            self.next = 1;
            self.alone_only = false;
        }
        self.current = Some(acker.clone());
        if self.held.contains_key(&tag) {
            // Settled twice: cannot happen on one channel generation. Sending it again could
            // close the channel; left, it is redelivered at worst.
            return true;
        }
        if self.alone_only || tag < self.next {
            // The second cannot happen on one channel generation either (the frontier passes
            // only settled tags): acknowledged alone rather than covered by a range.
            if ack {
                self.now_alone.push(acker);
            }
            return true;
        }
        let entry = if ack {
            Entry::Waiting { acker, since: now }
        } else {
            Entry::Left
        };
        self.held.insert(tag, entry);
        true
    }

    /// What is due at `now`: the range from the frontier over every settled delivery, and alone
    /// those that have waited `hold` behind an unsettled one.
    pub fn due(&mut self, now: Instant) -> Due<A> {
        let mut due = Due::none();
        due.alone = std::mem::take(&mut self.now_alone);
        self.advance(&mut due);
        if self.held.len() > MAX_HELD {
            self.alone_only = true;
        }
        let hold = self.hold;
        let alone_only = self.alone_only;
        for entry in self.held.values_mut() {
            let late = match entry {
                Entry::Waiting { since, .. } => alone_only || now.duration_since(*since) >= hold,
                Entry::Sent | Entry::Left => false,
            };
            if late && let Entry::Waiting { acker, .. } = std::mem::replace(entry, Entry::Sent) {
                due.alone.push(acker);
            }
        }
        if self.alone_only {
            // Nothing held matters any more: every acknowledgement of this generation goes
            // alone, and the frontier never moves again.
            self.held.clear();
        }
        due
    }

    /// Everything still to acknowledge, at once (the channel's deliveries are all settled, or
    /// the worker is stopping).
    pub fn drain(&mut self) -> Due<A> {
        // The range as far as it goes, and every other waiting delivery alone, whatever its age.
        self.alone_only = true;
        self.due(Instant::now())
    }

    /// When [`Window::due`] next has something to acknowledge alone, if nothing else settles.
    pub fn deadline(&self) -> Option<Instant> {
        if !self.now_alone.is_empty() {
            return Some(Instant::now());
        }
        self.held
            .values()
            .filter_map(|entry| match entry {
                Entry::Waiting { since, .. } => Some(*since + self.hold),
                Entry::Sent | Entry::Left => None,
            })
            .min()
    }

    /// Moves the frontier over the settled run at it; the highest to acknowledge becomes the
    /// range. Stops for good at a delivery left unacknowledged.
    fn advance(&mut self, due: &mut Due<A>) {
        while let Some(entry) = self.held.get(&self.next) {
            if matches!(entry, Entry::Left) {
                self.alone_only = true;
                break;
            }
            if let Some(Entry::Waiting { acker, .. }) = self.held.remove(&self.next) {
                due.range = Some(acker);
                due.in_range += 1;
            }
            self.next += 1;
        }
    }
}

/// A settled delivery, handed to the window of its channel.
pub struct Settled {
    /// Its delivery tag on the channel.
    pub tag: u64,
    /// Its acker.
    pub acker: Acker,
    /// True to acknowledge it; false to leave it for redelivery.
    pub ack: bool,
}

/// Counts acknowledgement frames as they are sent: `range` (one with `multiple`) or `single`, and
/// how many (the caller's metrics; `broker` does not name them).
pub type CountFrames = fn(&'static str, u64);

/// The handle on one consumer channel's acknowledgement task. Cloned by the lanes; the task
/// acknowledges what is still due and ends once every handle is dropped.
#[derive(Clone)]
pub struct Acks {
    settled: mpsc::UnboundedSender<Vec<Settled>>,
}

impl Acks {
    /// The handle and the task (to be spawned) of the window of a new consumer channel on
    /// `broker`; a delivery settled behind an unsettled one is acknowledged alone after `hold`.
    /// Every frame sent is counted with `count`.
    pub fn start(
        broker: &Broker,
        hold: Duration,
        count: CountFrames,
    ) -> (Self, impl Future<Output = ()> + Send + 'static) {
        let (settled, receiver) = mpsc::unbounded_channel();
        let flow = broker.connection.status().clone();
        (
            Self { settled },
            acknowledge(receiver, Window::new(hold), count, flow),
        )
    }

    /// Hands settled deliveries to the window; it sends their acknowledgements without the
    /// caller waiting. (Unbounded: each delivery is settled once, and the prefetch bounds how
    /// many a channel has.)
    pub fn settle(&self, settled: Vec<Settled>) {
        if self.settled.send(settled).is_err() {
            // The task is gone only when aborted at the shutdown deadline: the broker
            // redelivers these and the inbox de-duplicates them.
            tracing::debug!("acknowledgements dropped: the window's task has ended");
        }
    }
}

/// The task of one window: records what lanes settle, sends what is due, and at the end what is
/// left.
async fn acknowledge(
    mut receiver: mpsc::UnboundedReceiver<Vec<Settled>>,
    mut window: Window<Acker>,
    count: CountFrames,
    flow: lapin::ConnectionStatus,
) {
    let record = |window: &mut Window<Acker>, settled: Vec<Settled>| {
        let now = Instant::now();
        let mut ended = 0_usize;
        for s in settled {
            let ack = s.ack;
            // An acker of an ended channel is not recorded: nothing could go out for it.
            if !window.settle(s.tag, s.acker, ack, now) && ack {
                ended += 1;
            }
        }
        if ended > 0 {
            unacknowledged(ended);
        }
    };
    loop {
        let deadline = window.deadline().map(tokio::time::Instant::from_std);
        tokio::select! {
            settled = receiver.recv() => match settled {
                Some(settled) => record(&mut window, settled),
                None => break,
            },
            () = sleep_until(deadline), if deadline.is_some() => {}
        }
        // Whatever else is waiting joins this round, so that one range covers it too.
        while let Ok(settled) = receiver.try_recv() {
            record(&mut window, settled);
        }
        send(window.due(Instant::now()), count, &flow).await;
    }
    send(window.drain(), count, &flow).await;
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    if let Some(deadline) = deadline {
        tokio::time::sleep_until(deadline).await;
    }
}

/// Sends a round's acknowledgements, each bounded; counts them and warns about those that could
/// not go out.
async fn send(due: Due<Acker>, count: CountFrames, flow: &lapin::ConnectionStatus) {
    if due.is_empty() {
        return;
    }
    let range = async {
        let Some(acker) = &due.range else { return 0 };
        count("range", 1);
        let multiple = BasicAckOptions { multiple: true };
        if written(flow, acker.ack(multiple)).await {
            0
        } else {
            due.in_range
        }
    };
    let alone = due.alone.iter().map(|acker| async move {
        count("single", 1);
        usize::from(!written(flow, acker.ack(BasicAckOptions::default())).await)
    });
    let (failed_range, failed_alone) = tokio::join!(range, futures_util::future::join_all(alone));
    let failed = failed_range + failed_alone.iter().sum::<usize>();
    if failed > 0 {
        unacknowledged(failed);
    }
}

/// Waits for an acknowledgement to be written, for at most [`SETTLE_TIMEOUT`] of the time the
/// connection is not blocked. While the broker blocks it (a memory or disk alarm, once the
/// consumer has parked a message) lapin holds every frame and writes it at the unblock, so an
/// acknowledgement is late then, not lost: waited for, rather than reported as lost.
async fn written(
    flow: &lapin::ConnectionStatus,
    sending: impl Future<Output = lapin::Result<bool>>,
) -> bool {
    let mut sending = std::pin::pin!(sending);
    let mut left = SETTLE_TIMEOUT;
    loop {
        let step = STATUS_CHECK.min(left);
        match tokio::time::timeout(step, &mut sending).await {
            Ok(sent) => return matches!(sent, Ok(true)),
            Err(_) if flow.blocked() => {}
            Err(_) => {
                left = left.saturating_sub(step);
                if left.is_zero() {
                    return false;
                }
            }
        }
    }
}

fn unacknowledged(messages: usize) {
    tracing::warn!(
        messages,
        "could not acknowledge messages (channel closed); the broker will redeliver them and the inbox will de-duplicate"
    );
}

#[cfg(test)]
mod tests {
    use std::cell::Cell;
    use std::collections::BTreeSet;
    use std::rc::Rc;
    use std::time::{Duration, Instant};

    use proptest::prelude::*;

    use super::{Due, Generation, Window};

    const HOLD: Duration = Duration::from_millis(250);

    /// A delivery's acker on a channel generation that a test can end.
    #[derive(Clone, Debug)]
    struct Fake {
        tag: u64,
        generation: Rc<Cell<bool>>,
    }

    impl Generation for Fake {
        fn ended(&self) -> bool {
            self.generation.get()
        }
    }

    fn generation() -> Rc<Cell<bool>> {
        Rc::new(Cell::new(false))
    }

    fn fake(tag: u64, generation: &Rc<Cell<bool>>) -> Fake {
        Fake {
            tag,
            generation: generation.clone(),
        }
    }

    fn tags(due: &Due<Fake>) -> (Option<u64>, Vec<u64>) {
        (
            due.range.as_ref().map(|a| a.tag),
            due.alone.iter().map(|a| a.tag).collect(),
        )
    }

    #[test]
    fn a_run_settled_in_any_order_goes_out_as_one_range_once_the_lowest_is_settled() {
        let g = generation();
        let mut window = Window::new(HOLD);
        let at = Instant::now();
        for tag in [3, 2, 5] {
            assert!(window.settle(tag, fake(tag, &g), true, at));
        }
        assert!(window.due(at).is_empty(), "tag 1 is not settled yet");
        window.settle(1, fake(1, &g), true, at);
        let due = window.due(at);
        assert_eq!(tags(&due), (Some(3), vec![]));
        assert_eq!(due.in_range, 3);
        window.settle(4, fake(4, &g), true, at);
        assert_eq!(tags(&window.due(at)), (Some(5), vec![]));
    }

    #[test]
    fn deliveries_held_up_longer_than_the_hold_are_acknowledged_alone_and_never_again() {
        let g = generation();
        let mut window = Window::new(HOLD);
        let at = Instant::now();
        window.settle(2, fake(2, &g), true, at);
        window.settle(3, fake(3, &g), true, at);
        assert_eq!(window.deadline(), Some(at + HOLD));
        assert!(window.due(at + HOLD / 2).is_empty());
        assert_eq!(tags(&window.due(at + HOLD)), (None, vec![2, 3]));
        assert_eq!(window.deadline(), None);
        window.settle(1, fake(1, &g), true, at + HOLD);
        // The range is tag 1 alone: 2 and 3 are already acknowledged, and a range ending on
        // them would name a tag the broker no longer holds.
        let due = window.due(at + HOLD);
        assert_eq!(tags(&due), (Some(1), vec![]));
        assert_eq!(due.in_range, 1);
        window.settle(4, fake(4, &g), true, at + HOLD);
        assert_eq!(tags(&window.due(at + HOLD)), (Some(4), vec![]));
    }

    #[test]
    fn a_delivery_left_unacknowledged_stops_ranges_for_the_rest_of_the_channel() {
        let g = generation();
        let mut window = Window::new(HOLD);
        let at = Instant::now();
        window.settle(1, fake(1, &g), true, at);
        window.settle(2, fake(2, &g), false, at);
        window.settle(3, fake(3, &g), true, at);
        assert_eq!(tags(&window.due(at)), (Some(1), vec![3]));
        window.settle(4, fake(4, &g), true, at);
        assert_eq!(window.deadline().map(|d| d <= Instant::now()), Some(true));
        assert_eq!(tags(&window.due(at)), (None, vec![4]));
    }

    #[test]
    fn after_a_recovery_the_old_channel_is_forgotten_and_tags_start_again_at_one() {
        let old = generation();
        let mut window = Window::new(HOLD);
        let at = Instant::now();
        window.settle(2, fake(2, &old), true, at);
        window.settle(3, fake(3, &old), true, at);
        old.set(true);
        // A late settlement of the old channel is ignored: its acker cannot send.
        assert!(!window.settle(1, fake(1, &old), true, at));
        let new = generation();
        window.settle(2, fake(2, &new), true, at);
        assert!(window.due(at).is_empty(), "new tag 1 is not settled");
        window.settle(1, fake(1, &new), true, at);
        let due = window.due(at);
        assert_eq!(tags(&due), (Some(2), vec![]));
        assert!(
            !due.range.unwrap().ended(),
            "the range is on the new channel"
        );
        // Nothing of the old channel is ever sent, even at the end.
        assert!(window.drain().is_empty());
    }

    #[test]
    fn drain_sends_everything_settled_and_nothing_else() {
        let g = generation();
        let mut window = Window::new(HOLD);
        let at = Instant::now();
        window.settle(1, fake(1, &g), true, at);
        window.settle(3, fake(3, &g), true, at);
        window.settle(4, fake(4, &g), false, at);
        window.settle(5, fake(5, &g), true, at);
        assert_eq!(tags(&window.drain()), (Some(1), vec![3, 5]));
    }

    /// What the broker does with the acknowledgements of one channel: every tag up to `n` is
    /// delivered; a tag acknowledged twice, or a range over an unsettled tag, is a failure.
    struct Broker {
        outstanding: BTreeSet<u64>,
        to_ack: BTreeSet<u64>,
    }

    impl Broker {
        fn apply(&mut self, due: Due<Fake>) -> Result<(), String> {
            if let Some(range) = due.range {
                if !self.outstanding.contains(&range.tag) {
                    return Err(format!(
                        "range on tag {} the broker no longer holds",
                        range.tag
                    ));
                }
                let covered: Vec<u64> = self.outstanding.range(..=range.tag).copied().collect();
                for tag in covered {
                    if !self.to_ack.contains(&tag) {
                        return Err(format!("range {} covers unsettled tag {tag}", range.tag));
                    }
                    self.outstanding.remove(&tag);
                }
            }
            for alone in due.alone {
                if !self.outstanding.remove(&alone.tag) || !self.to_ack.contains(&alone.tag) {
                    return Err(format!("tag {} acknowledged twice or unsettled", alone.tag));
                }
            }
            Ok(())
        }
    }

    proptest! {
        /// Whatever the order of settlements, the holds and the deliveries left: never a tag
        /// acknowledged that was not settled, never one twice, and at the end every settled one
        /// acknowledged.
        #[test]
        fn never_acknowledges_an_unsettled_delivery_and_in_the_end_acknowledges_every_settled_one(
            order in Just((1..=60_u64).collect::<Vec<_>>()).prop_shuffle(),
            left in proptest::collection::btree_set(1..=60_u64, 0..3),
            unsettled in proptest::collection::btree_set(1..=60_u64, 0..3),
            steps in proptest::collection::vec(0..400_u64, 60),
        ) {
            let g = generation();
            let mut window = Window::new(HOLD);
            let start = Instant::now();
            let mut broker = Broker {
                outstanding: (1..=60).collect(),
                to_ack: BTreeSet::new(),
            };
            let mut elapsed = 0;
            for (tag, step) in order.iter().zip(&steps) {
                elapsed += step;
                let now = start + Duration::from_millis(elapsed);
                if unsettled.contains(tag) {
                    continue;
                }
                let ack = !left.contains(tag);
                if ack {
                    broker.to_ack.insert(*tag);
                }
                window.settle(*tag, fake(*tag, &g), ack, now);
                if step % 3 == 0 {
                    broker.apply(window.due(now)).map_err(TestCaseError::fail)?;
                }
            }
            broker.apply(window.drain()).map_err(TestCaseError::fail)?;
            let missed: Vec<_> = broker.to_ack.intersection(&broker.outstanding).collect();
            prop_assert!(missed.is_empty(), "settled but never acknowledged: {missed:?}");
        }
    }
}
