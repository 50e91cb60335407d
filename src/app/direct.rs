//! Outcomes published by the lane that committed them, right after the commit (issue 15), on
//! the relay's connection. The relay stays for everything else: outcomes written while no
//! publisher was usable, those a lane could not publish, other workers' leftovers, the sweep's.
//!
//! The rules that keep each teacher's versions in order and lose nothing:
//! - a lane's write leases its new outcomes to it (`outbox.lease_until`) only while the relay's
//!   publisher is usable, and only for a teacher whose earlier outcomes are all published or
//!   confirmed to this lane; the relay leaves leased rows, and a teacher's later versions, alone;
//! - before its next write statement the lane waits for the confirms of what it sent (beside
//!   its next batch's first statement, which takes the locks and reads; ARCHITECTURE decision
//!   47): the confirmed rows are marked published by that write's statement, the others (and
//!   the later versions of their teacher) are handed back to the relay;
//! - a lane with nothing more to write marks what it has after [`MARK_IDLE`];
//! - a lease that runs out (the worker died between the commit and the mark) makes the rows the
//!   relay's: they may then be published twice, which consumers de-duplicate by `outcome_id`
//!   and version.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use time::OffsetDateTime;

use super::relay::outcome_properties;
use crate::broker::{Outgoing, PendingConfirm, Publisher};
use crate::config::Settings;
use crate::store::{LeasedOutcome, Publishing, Store, Written};

pub use super::relay::MARK_IDLE;

/// How long a lane waits for the broker to confirm what it sent, before handing it back to the
/// relay. Shorter than any lease (the settings require a lease of at least three times this).
pub const CONFIRM_BOUND: Duration = Duration::from_secs(10);

/// The relay's current publisher, offered to the lanes.
pub struct DirectPublisher {
    current: Mutex<Option<Publisher>>,
    exchange: String,
    lease: Option<Duration>,
}

impl DirectPublisher {
    /// Lanes publish their own outcomes when `relay.enabled` and `relay.publish_after_commit`.
    pub fn new(settings: &Settings) -> Arc<Self> {
        let on = settings.relay.enabled && settings.relay.publish_after_commit;
        Arc::new(Self {
            current: Mutex::new(None),
            exchange: settings.topology.outcome_exchange.clone(),
            lease: on.then(|| Duration::from_secs(settings.relay.lease_seconds)),
        })
    }

    /// The relay's publisher (its own channel on its connection), or `None` once it failed.
    pub fn offer(&self, publisher: Option<Publisher>) {
        // Nothing of lapin's runs under the lock, not even the drop of the old publisher: lapin
        // takes locks of its own there that its I/O thread also takes, and every lane waiting
        // on this lock behind one stuck there would hold a runtime thread (docs/RELIABILITY.md,
        // the consumer_timeout hang).
        let old = std::mem::replace(&mut *self.current.lock().expect("not poisoned"), publisher);
        drop(old);
    }

    /// The publisher, if lanes may publish on it now: offered, open, not blocked.
    fn usable(&self) -> Option<Publisher> {
        self.lease?;
        // Cloned under the lock, judged after it (see `offer`).
        let current = self.current.lock().expect("not poisoned").clone();
        current.filter(|p| p.is_open() && !p.is_blocked())
    }
}

/// One outcome sent by a lane, waiting for its confirm.
struct Sent {
    id: i64,
    trn: String,
    confirm: Result<PendingConfirm, ()>,
}

/// What one lane has published itself and not yet marked.
pub struct LaneOutbox {
    direct: Arc<DirectPublisher>,
    sent: Vec<Sent>,
    confirmed: Vec<i64>,
}

impl LaneOutbox {
    /// An empty lane outbox publishing through `direct`.
    pub fn new(direct: Arc<DirectPublisher>) -> Self {
        Self {
            direct,
            sent: Vec::new(),
            confirmed: Vec::new(),
        }
    }

    /// True when nothing waits for a confirm or a mark.
    pub fn is_idle(&self) -> bool {
        self.sent.is_empty() && self.confirmed.is_empty()
    }

    /// Before a write: waits for the confirms of what was sent, hands what failed back to the
    /// relay (a failure to do that only delays it to the end of its lease), and says what the
    /// write is to mark and whether it may lease its new outcomes. The wait runs inside the
    /// write's transaction (ARCHITECTURE decision 47), so it is bounded by half the operation
    /// bound as well as by [`CONFIRM_BOUND`]: an outcome not confirmed by then is handed back,
    /// and the transaction keeps the other half for its statements.
    pub async fn before_write(&mut self, store: &Store, now: OffsetDateTime) -> Publishing<'_> {
        self.settle(store, CONFIRM_BOUND.min(store.operation_timeout() / 2))
            .await;
        let lease_until = self
            .direct
            .usable()
            .and(self.direct.lease)
            .map(|lease| now + lease);
        Publishing {
            confirmed: &self.confirmed,
            lease_until,
        }
    }

    /// After a commit: the marks are done; sends what the write leased to this lane. What cannot
    /// be sent goes back to the relay at once.
    pub async fn committed(&mut self, store: &Store, written: Written) {
        if written.marked > 0 {
            crate::telemetry::metrics::metrics().published_by("lane", written.marked);
        }
        self.confirmed.clear();
        if written.leased.is_empty() {
            return;
        }
        let Some(publisher) = self.direct.usable() else {
            let ids: Vec<i64> = written.leased.iter().map(|l| l.row.id).collect();
            release(store, &ids).await;
            return;
        };
        let messages = written
            .leased
            .iter()
            .map(|LeasedOutcome { row, .. }| Outgoing {
                exchange: &self.direct.exchange,
                routing_key: &row.routing_key,
                body: &row.body,
                properties: outcome_properties(row),
            });
        let sent = publisher.send_all(messages).await;
        for (LeasedOutcome { row, trn }, confirm) in written.leased.into_iter().zip(sent) {
            let confirm = confirm.map_err(|error| {
                tracing::debug!(error = %error, "could not publish an outcome after its commit; the relay will");
            });
            self.sent.push(Sent {
                id: row.id,
                trn,
                confirm,
            });
        }
    }

    /// With nothing more to write: waits for the confirms and marks what was confirmed (at
    /// `now`), in a transaction of its own. What cannot be marked stays leased, and goes to the relay when
    /// its lease runs out (it may then be published twice).
    pub async fn flush(&mut self, store: &Store, now: OffsetDateTime) {
        self.settle(store, CONFIRM_BOUND).await;
        if self.confirmed.is_empty() {
            return;
        }
        match store.mark_published(&self.confirmed, now).await {
            Ok(marked) => crate::telemetry::metrics::metrics().published_by("lane", marked),
            Err(error) => {
                tracing::warn!(error = %error, outcomes = self.confirmed.len(), "could not mark published outcomes; the relay will publish them again once their lease runs out");
            }
        }
        self.confirmed.clear();
    }

    /// Waits for every confirm (within `bound` for them all) and sorts the rows into confirmed
    /// and handed back: a teacher's versions after one that failed are handed back too, so that
    /// the relay sends them in order again.
    async fn settle(&mut self, store: &Store, bound: Duration) {
        if self.sent.is_empty() {
            return;
        }
        let deadline = tokio::time::Instant::now() + bound;
        let mut failed_teachers: Vec<String> = Vec::new();
        let mut handed_back = Vec::new();
        for sent in std::mem::take(&mut self.sent) {
            let confirmed = match sent.confirm {
                Ok(confirm) => confirm.wait_until(deadline).await.is_ok(),
                Err(()) => false,
            };
            if confirmed && !failed_teachers.contains(&sent.trn) {
                self.confirmed.push(sent.id);
            } else {
                failed_teachers.push(sent.trn);
                handed_back.push(sent.id);
            }
        }
        if !handed_back.is_empty() {
            tracing::debug!(
                outcomes = handed_back.len(),
                "outcomes not confirmed after their commit; handing them to the relay"
            );
            release(store, &handed_back).await;
        }
    }
}

/// Hands leased rows back to the relay; a failure only delays them to the end of their lease.
async fn release(store: &Store, ids: &[i64]) {
    if let Err(error) = store.release_leases(ids).await {
        tracing::warn!(error = %error, outcomes = ids.len(), "could not hand outcomes back to the relay; it will publish them once their lease runs out");
    }
}
