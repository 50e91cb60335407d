//! The one retry schedule: exponential back-off with jitter (`backon`) between
//! `worker.retry_min_millis` and `worker.retry_max_millis`, without a limit on attempts, and a
//! pause that a cancellation cuts short.

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tokio_util::sync::CancellationToken;

use crate::config::Settings;

/// The delays between attempts of one retried operation.
pub struct Backoff {
    delays: backon::ExponentialBackoff,
}

impl Backoff {
    /// A fresh schedule from the worker's retry settings.
    pub fn new(settings: &Settings) -> Self {
        Self {
            delays: ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(settings.worker.retry_min_millis))
                .with_max_delay(Duration::from_millis(settings.worker.retry_max_millis))
                .with_jitter()
                .without_max_times()
                .build(),
        }
    }

    /// Sleeps for the next delay. False when `cancel` fired first: the caller gives up.
    pub async fn pause(&mut self, cancel: &CancellationToken) -> bool {
        let delay = self.delays.next().unwrap_or(Duration::from_secs(30));
        tokio::select! {
            () = tokio::time::sleep(delay) => true,
            () = cancel.cancelled() => false,
        }
    }
}
