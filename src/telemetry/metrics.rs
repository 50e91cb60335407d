//! Prometheus metrics. One process-wide set, registered once; the HTTP endpoint in
//! `app::http` encodes it in the Prometheus text format.

use std::sync::OnceLock;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;

/// Labels of consumed messages.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ConsumedLabels {
    /// `school_registration`, `ab_claim` or `unknown` (undecodable).
    pub r#type: String,
    /// `applied`, `stale`, `duplicate`, `parked` or `abandoned`.
    pub result: String,
}

/// A single label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StatusLabel {
    /// The outcome status.
    pub status: String,
}

/// A single label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    /// The parking reason code.
    pub reason: String,
}

/// A single label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ComponentLabel {
    /// `consumer` or `relay`.
    pub component: String,
}

/// Every metric the worker exports.
pub struct Metrics {
    registry: Registry,
    /// Messages consumed, by type and result.
    pub consumed: Family<ConsumedLabels, Counter>,
    /// Outcomes written to the outbox, by status.
    pub emitted: Family<StatusLabel, Counter>,
    /// Outcomes published with a confirm.
    pub published: Counter,
    /// Messages parked, by reason.
    pub parked: Family<ReasonLabel, Counter>,
    /// Seconds from delivery to acknowledgement.
    pub processing_seconds: Histogram,
    /// Outcomes not yet published.
    pub outbox_backlog: Gauge,
    /// Age in seconds of the oldest unpublished outcome (0 when none).
    pub outbox_oldest_age_seconds: Gauge<f64, AtomicU64>,
    /// Teachers whose last outcome is a conflict.
    pub open_conflicts: Gauge,
    /// Teachers in an overdue provisional spell.
    pub overdue_provisionals: Gauge,
    /// Reconnections after a broker failure, by component.
    pub reconnects: Family<ComponentLabel, Counter>,
}

impl Metrics {
    fn new() -> Self {
        let mut registry = Registry::with_prefix("induction_reconciler");
        let consumed = Family::<ConsumedLabels, Counter>::default();
        registry.register(
            "messages_consumed",
            "Input messages consumed, by type and result",
            consumed.clone(),
        );
        let emitted = Family::<StatusLabel, Counter>::default();
        registry.register(
            "outcomes_emitted",
            "Outcomes written to the outbox, by status",
            emitted.clone(),
        );
        let published = Counter::default();
        registry.register(
            "outcomes_published",
            "Outcomes published and confirmed by the broker",
            published.clone(),
        );
        let parked = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "messages_parked",
            "Input messages parked, by reason code",
            parked.clone(),
        );
        let processing_seconds = Histogram::new(exponential_buckets(0.0005, 2.0, 16));
        registry.register(
            "message_processing_seconds",
            "Seconds from delivery to acknowledgement",
            processing_seconds.clone(),
        );
        let outbox_backlog = Gauge::default();
        registry.register(
            "outbox_backlog",
            "Outcomes committed but not yet published",
            outbox_backlog.clone(),
        );
        let outbox_oldest_age_seconds = Gauge::<f64, AtomicU64>::default();
        registry.register(
            "outbox_oldest_age_seconds",
            "Age of the oldest unpublished outcome",
            outbox_oldest_age_seconds.clone(),
        );
        let open_conflicts = Gauge::default();
        registry.register(
            "open_conflicts",
            "Teachers whose current outcome is a conflict",
            open_conflicts.clone(),
        );
        let overdue_provisionals = Gauge::default();
        registry.register(
            "overdue_provisionals",
            "Teachers in an overdue provisional spell",
            overdue_provisionals.clone(),
        );
        let reconnects = Family::<ComponentLabel, Counter>::default();
        // Present from the start, so that alerts on their rate see a zero, not an absent series.
        for component in ["consumer", "relay"] {
            let _ = reconnects.get_or_create(&ComponentLabel {
                component: component.into(),
            });
        }
        registry.register(
            "broker_reconnects",
            "Reconnections after a broker failure",
            reconnects.clone(),
        );
        Self {
            registry,
            consumed,
            emitted,
            published,
            parked,
            processing_seconds,
            outbox_backlog,
            outbox_oldest_age_seconds,
            open_conflicts,
            overdue_provisionals,
            reconnects,
        }
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}
