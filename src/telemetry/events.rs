//! Typed events: each thing the worker both logs and counts is one value here, so that the log
//! line and the metric cannot drift apart. Log lines follow docs/LOGGING.md (no message data).

use std::fmt::Display;
use std::time::Duration;

use super::metrics::{ComponentLabel, ConsumedLabels, ReasonLabel, StatusLabel, metrics};

/// Rate-limits a repeated warning: the first, then at most one a minute (the rest at debug), so
/// that an outage is logged when it starts and while it lasts, not on every retry.
#[derive(Debug, Default)]
pub struct Quiet {
    last: Option<tokio::time::Instant>,
}

impl Quiet {
    /// True when the warning should be logged at `warn` now.
    fn due(&mut self) -> bool {
        let now = tokio::time::Instant::now();
        let due = self
            .last
            .is_none_or(|last| now.duration_since(last) >= Duration::from_secs(60));
        if due {
            self.last = Some(now);
        }
        due
    }

    /// True when a warning was logged.
    pub fn any(&self) -> bool {
        self.last.is_some()
    }

    /// Logs `message` with `error` at `warn` when due, at `debug` otherwise.
    pub fn log(&mut self, error: &dyn Display, message: &'static str) {
        if self.due() {
            tracing::warn!(error = %error, "{message}");
        } else {
            tracing::debug!(error = %error, "{message}");
        }
    }
}

/// The part of the worker that holds a broker connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Component {
    /// Consumes the inbox queue.
    Consumer,
    /// Publishes the outbox.
    Relay,
}

impl Component {
    /// The `component` label.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Consumer => "consumer",
            Self::Relay => "relay",
        }
    }
}

/// A component's broker work stopped and starts again (`broker_reconnects` counts it).
pub struct BrokerInterrupted<'a> {
    /// Which component.
    pub component: Component,
    /// What stopped it.
    pub error: &'a dyn Display,
}

impl BrokerInterrupted<'_> {
    /// Counts it and logs it: every time, or rate-limited by `quiet`.
    pub fn emit(self, quiet: Option<&mut Quiet>) {
        count_reconnect(self.component);
        let message = match self.component {
            Component::Consumer => "consuming stopped; starting again",
            Component::Relay => "outbox relay interrupted; retrying",
        };
        match quiet {
            Some(quiet) => quiet.log(self.error, message),
            None => tracing::warn!(error = %self.error, "{message}"),
        }
    }
}

/// lapin's automatic recovery brought a component's connection back (counted as a reconnect).
pub struct BrokerRecovered {
    /// Which component.
    pub component: Component,
}

impl BrokerRecovered {
    /// Logs and counts it.
    pub fn emit(self) {
        count_reconnect(self.component);
        let message = match self.component {
            Component::Consumer => "the broker connection is back; consuming again",
            Component::Relay => "the broker connection is back; relaying again",
        };
        tracing::info!("{message}");
    }
}

/// RabbitMQ blocked a component's connection (`connection.blocked`: a memory or disk alarm).
/// Logged once per transition; the `broker_blocked` gauge is set by `Health`.
pub struct BrokerBlocked<'a> {
    /// Which component.
    pub component: Component,
    /// The broker's reason (`low on memory`, `low on disk`), when it gave one.
    pub reason: Option<&'a str>,
}

impl BrokerBlocked<'_> {
    /// Logs it.
    pub fn emit(self) {
        tracing::warn!(
            component = self.component.as_str(),
            reason = self.reason.unwrap_or("not given"),
            "the broker is blocking this connection (a resource alarm); nothing is published or acknowledged on it until the alarm clears"
        );
    }
}

/// RabbitMQ unblocked a component's connection.
pub struct BrokerUnblocked {
    /// Which component.
    pub component: Component,
    /// How long it was blocked.
    pub blocked_for: Duration,
}

impl BrokerUnblocked {
    /// Logs it.
    pub fn emit(self) {
        tracing::info!(
            component = self.component.as_str(),
            blocked_s = self.blocked_for.as_secs_f64(),
            "the broker unblocked this connection; resuming"
        );
    }
}

fn count_reconnect(component: Component) {
    metrics()
        .reconnects
        .get_or_create(&ComponentLabel {
            component: component.as_str().into(),
        })
        .inc();
}

/// One input message handled to the end (`messages_consumed`, `messages_parked`,
/// `outcomes_emitted` and `message_processing_seconds`).
pub struct MessageHandled<'a> {
    /// `school_registration`, `ab_claim` or `unknown`.
    pub kind: &'a str,
    /// `applied`, `stale`, `duplicate`, `parked` or `abandoned`.
    pub result: &'static str,
    /// The reason code, when parked.
    pub parked: Option<&'static str>,
    /// The status of each outcome it caused.
    pub emitted: &'a [&'static str],
    /// From delivery to acknowledgement.
    pub elapsed: Duration,
}

impl MessageHandled<'_> {
    /// Counts it and logs it at `trace` (inside the message's span, which carries its id).
    pub fn emit(self) {
        let m = metrics();
        m.consumed
            .get_or_create(&ConsumedLabels {
                r#type: self.kind.to_owned(),
                result: self.result.to_owned(),
            })
            .inc();
        if let Some(reason) = self.parked {
            m.parked
                .get_or_create(&ReasonLabel {
                    reason: reason.to_owned(),
                })
                .inc();
        }
        for status in self.emitted {
            m.emitted
                .get_or_create(&StatusLabel {
                    status: (*status).to_owned(),
                })
                .inc();
        }
        m.processing_seconds.observe(self.elapsed.as_secs_f64());
        tracing::trace!(
            elapsed_ms = self.elapsed.as_millis() as u64,
            "message handled"
        );
    }
}
