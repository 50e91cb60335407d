//! `verify`: recomputes every teacher from the stored records with the pure core and compares
//! the result with the stored last outcome; with `--emit`, writes the corrected outcome of each
//! teacher that differs (after a deliberate rule change) as a new version with no cause.
//!
//! Safe with workers running: pages are read in consistent snapshots, and a correction is made
//! under the teacher's lock, re-checked there, like live traffic.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use time::OffsetDateTime;

use super::connect::store;
use super::progress::{Progress, WhenPiped};
use crate::config::Settings;
use crate::domain::{Status, Trn, reconcile};
use crate::store::{AuditRecord, TeacherState};

/// Teachers read per page.
pub const PAGE: i64 = 2_000;

/// What `verify` found.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Verified {
    /// Teachers checked.
    pub checked: u64,
    /// Teachers whose stored outcome differs from what the rules give.
    pub differing: u64,
    /// Corrected outcomes written (with `--emit`).
    pub emitted: u64,
}

/// True when the stored outcome is not what the rules give for the stored records: the
/// reconciliation differs, or there is no outcome where the rules give one (a teacher whose
/// first outcome would be `closed` rightly has none).
pub fn differs(state: &TeacherState) -> bool {
    let expected = reconcile(&state.records);
    match &state.last {
        Some(last) => last.reconciliation != expected,
        None => expected.status != Status::Closed,
    }
}

/// Runs `verify`: prints the counts, writes the differing TRNs (one per line) to `differences`,
/// keeps the result for the worker's metrics, and returns it.
pub async fn verify(
    settings: &Settings,
    differences: &Path,
    emit: bool,
) -> anyhow::Result<Verified> {
    let store = store(settings).await?;
    let started_at = OffsetDateTime::now_utc();
    let mut out = std::io::BufWriter::new(
        std::fs::File::create(differences)
            .with_context(|| format!("cannot create {}", differences.display()))?,
    );
    let mut progress = Progress::new("teachers verified", None, WhenPiped::Log);
    let mut found = Verified::default();
    let mut after: Option<Trn> = None;
    loop {
        let page = store
            .teachers_page(after.as_ref(), PAGE)
            .await
            .context("cannot read a page of teachers")?;
        let Some(last) = page.last() else { break };
        after = Some(last.trn.clone());
        for state in page.iter().filter(|s| differs(s)) {
            found.differing += 1;
            writeln!(out, "{}", state.trn.as_str())?;
            if emit
                && store
                    .re_reconcile(&state.trn, OffsetDateTime::now_utc())
                    .await
                    .context("cannot write a corrected outcome")?
                    .is_some()
            {
                found.emitted += 1;
            }
        }
        found.checked += page.len() as u64;
        progress.advance(page.len() as u64);
    }
    out.flush()?;
    progress.finish();
    let record = AuditRecord {
        started_at,
        checked: found.checked,
        differing: found.differing,
        emitted: found.emitted,
    };
    store
        .record_audit(&record, OffsetDateTime::now_utc())
        .await
        .context("cannot record the audit's result")?;
    tracing::info!(
        checked = found.checked,
        differing = found.differing,
        emitted = found.emitted,
        seconds = format!("{:.1}", progress.elapsed().as_secs_f64()),
        "verify finished"
    );
    Ok(found)
}
