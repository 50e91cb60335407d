//! The overdue sweep: every `sweep.interval_seconds`, re-emits provisional spells older than
//! `sweep.overdue_after_seconds` once with `overdue: true`.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::app::handler::now;
use crate::config::Settings;
use crate::store::Store;

/// Sweeps until `stop`.
pub(super) async fn sweep_task(settings: Settings, store: Store, stop: CancellationToken) {
    let interval = Duration::from_secs(settings.sweep.interval_seconds);
    loop {
        sweep_all_due(&settings, &store).await;
        tokio::select! {
            () = tokio::time::sleep(interval) => {}
            () = stop.cancelled() => return,
        }
    }
}

/// Sweeps in batches of `sweep.batch_size` until a batch is not full or one fails.
async fn sweep_all_due(settings: &Settings, store: &Store) {
    let max_age = time::Duration::seconds(settings.sweep.overdue_after_seconds as i64);
    loop {
        match store
            .sweep_overdue(now(), max_age, settings.sweep.batch_size)
            .await
        {
            Ok(swept) if swept as i64 >= settings.sweep.batch_size => continue,
            Ok(swept) => {
                if swept > 0 {
                    tracing::info!(outcomes = swept, "re-emitted overdue provisional outcomes");
                }
                return;
            }
            Err(error) => {
                tracing::warn!(error = %error, "overdue sweep failed; will try again");
                return;
            }
        }
    }
}
