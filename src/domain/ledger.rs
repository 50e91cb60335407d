//! An in-memory ledger: the latest snapshot of every record, the records that count for each
//! teacher and the last outcome emitted for each. `simulate` and the property tests run on it;
//! the worker keeps the same state in Postgres and applies the same functions.

use std::collections::{BTreeMap, BTreeSet};

use time::{Duration, OffsetDateTime};

use super::emission::{Cause, Outcome, emit, sweep};
use super::reconcile::{Reconciliation, reconcile};
use super::records::{Admission, RecordKey, Snapshot, admit};
use super::types::Trn;

/// State held in memory for every record and teacher seen.
#[derive(Debug, Default, Clone)]
pub struct Ledger {
    records: BTreeMap<RecordKey, Snapshot>,
    by_teacher: BTreeMap<Trn, BTreeSet<RecordKey>>,
    last: BTreeMap<Trn, Outcome>,
}

/// What applying one snapshot did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Applied {
    /// How the snapshot was admitted.
    pub admission: Admission,
    /// The outcomes emitted, in TRN order.
    pub outcomes: Vec<Outcome>,
}

impl Ledger {
    /// An empty ledger.
    pub fn new() -> Self {
        Self::default()
    }

    /// A ledger holding part of a larger state: the latest snapshots of some records and the
    /// last outcomes of some teachers. The worker seeds one per batch with everything the batch
    /// can touch (under the teachers' locks) and applies the batch's messages to it.
    pub fn seeded(
        records: impl IntoIterator<Item = Snapshot>,
        last: impl IntoIterator<Item = Outcome>,
    ) -> Self {
        let mut ledger = Self::new();
        for snapshot in records {
            let key = snapshot.record.key();
            ledger
                .by_teacher
                .entry(snapshot.record.trn().clone())
                .or_default()
                .insert(key.clone());
            ledger.records.insert(key, snapshot);
        }
        for outcome in last {
            ledger.last.insert(outcome.trn.clone(), outcome);
        }
        ledger
    }

    /// The latest snapshot held for a record.
    pub fn record(&self, key: &RecordKey) -> Option<&Snapshot> {
        self.records.get(key)
    }

    /// Applies one accepted snapshot and returns what it emitted.
    pub fn apply(&mut self, snapshot: Snapshot, cause: Cause, now: OffsetDateTime) -> Applied {
        let key = snapshot.record.key();
        let held = self.records.get(&key);
        let admission = admit(held, &snapshot);
        let Admission::Latest { affected } = &admission else {
            return Applied {
                admission,
                outcomes: vec![],
            };
        };
        if let Some(previous) = held {
            let previous_trn = previous.record.trn().clone();
            if let Some(keys) = self.by_teacher.get_mut(&previous_trn) {
                keys.remove(&key);
            }
        }
        self.by_teacher
            .entry(snapshot.record.trn().clone())
            .or_default()
            .insert(key.clone());
        self.records.insert(key, snapshot);

        let mut outcomes = Vec::new();
        for trn in affected {
            let reconciliation = self.reconcile(trn);
            if let Some(outcome) = emit(trn, self.last.get(trn), reconciliation, cause.clone(), now)
            {
                self.last.insert(trn.clone(), outcome.clone());
                outcomes.push(outcome);
            }
        }
        Applied {
            admission,
            outcomes,
        }
    }

    /// Runs the overdue sweep over every teacher and returns the re-emissions, in TRN order.
    pub fn sweep(&mut self, now: OffsetDateTime, max_age: Duration) -> Vec<Outcome> {
        let mut due = Vec::new();
        for last in self.last.values_mut() {
            if let Some(outcome) = sweep(last, now, max_age) {
                *last = outcome.clone();
                due.push(outcome);
            }
        }
        due
    }

    /// The teacher's status as it stands now, whether or not it was emitted.
    pub fn reconcile(&self, trn: &Trn) -> Reconciliation {
        let keys = self.by_teacher.get(trn);
        reconcile(
            keys.into_iter()
                .flatten()
                .filter_map(|key| self.records.get(key)),
        )
    }

    /// The last outcome emitted for a teacher.
    pub fn last_outcome(&self, trn: &Trn) -> Option<&Outcome> {
        self.last.get(trn)
    }

    /// Every teacher any record has ever counted for.
    pub fn teachers(&self) -> impl Iterator<Item = &Trn> {
        self.by_teacher.keys()
    }
}
