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

/// Who published an outcome.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ByLabel {
    /// `lane` or `relay`.
    pub by: String,
}

/// A single label.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct KindLabel {
    /// `range` (one frame for a run of deliveries) or `single`.
    pub kind: String,
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
    /// Outcomes published with a confirm, by who published them: `lane` (right after the
    /// commit) or `relay`.
    pub published: Family<ByLabel, Counter>,
    /// Messages parked, by reason.
    pub parked: Family<ReasonLabel, Counter>,
    /// Messages a batch left for a later transaction because another transaction held a lock
    /// they needed, counted at each deferral (ARCHITECTURE decisions 44 and 46).
    pub deferred: Counter,
    /// Acknowledgement frames sent for input deliveries, by kind: `range` (`multiple`, for a
    /// run of deliveries) or `single`.
    pub acknowledgements: Family<KindLabel, Counter>,
    /// Seconds from a batch's start to each delivery's settlement (its acknowledgement follows
    /// from the channel's window, at once or in a range).
    pub processing_seconds: Histogram,
    /// Outcomes not yet published.
    pub outbox_backlog: Gauge,
    /// Age in seconds of the oldest unpublished outcome (0 when none).
    pub outbox_oldest_age_seconds: Gauge<f64, AtomicU64>,
    /// Teachers whose last outcome is a conflict.
    pub open_conflicts: Gauge,
    /// Teachers in an overdue provisional spell.
    pub overdue_provisionals: Gauge,
    /// Teachers whose stored outcome differed from the rules at the last `verify` (absent
    /// until one has run).
    pub audit_differing: Gauge,
    /// When the last `verify` finished, in Unix seconds (absent until one has run).
    pub audit_last_run: Gauge<f64, AtomicU64>,
    /// Reconnections after a broker failure, by component.
    pub reconnects: Family<ComponentLabel, Counter>,
    /// 1 for each reason the worker is not ready now (`database_unreachable`,
    /// `broker_unreachable`, `broker_blocked`, `not_progressing`), else 0.
    pub not_ready: Family<ReasonLabel, Gauge>,
    /// 1 while RabbitMQ blocks one of the worker's connections (flow control), else 0.
    pub broker_blocked: Gauge,
    /// Seconds that deliveries have waited with none finishing (0 when none wait).
    pub stalled_seconds: Gauge<f64, AtomicU64>,
}

impl Metrics {
    fn new() -> Self {
        let mut r = Registry::with_prefix("induction_reconciler");
        let reconnects = Family::<ComponentLabel, Counter>::default();
        // Present from the start, so that alerts on their rate see a zero, not an absent series.
        for component in ["consumer", "relay"] {
            let _ = reconnects.get_or_create(&ComponentLabel {
                component: component.into(),
            });
        }
        let published = Family::<ByLabel, Counter>::default();
        for by in ["lane", "relay"] {
            let _ = published.get_or_create(&ByLabel { by: by.into() });
        }
        let acknowledgements = Family::<KindLabel, Counter>::default();
        for kind in ["range", "single"] {
            let _ = acknowledgements.get_or_create(&KindLabel { kind: kind.into() });
        }
        let not_ready = Family::<ReasonLabel, Gauge>::default();
        for reason in [
            "database_unreachable",
            "broker_unreachable",
            "broker_blocked",
            "not_progressing",
        ] {
            let _ = not_ready.get_or_create(&ReasonLabel {
                reason: reason.into(),
            });
        }
        Self {
            consumed: register(
                &mut r,
                "messages_consumed",
                "Input messages consumed, by type and result",
                Family::default(),
            ),
            emitted: register(
                &mut r,
                "outcomes_emitted",
                "Outcomes written to the outbox, by status",
                Family::default(),
            ),
            published: register(
                &mut r,
                "outcomes_published",
                "Outcomes published and confirmed by the broker, by who published them (lane or relay)",
                published,
            ),
            parked: register(
                &mut r,
                "messages_parked",
                "Input messages parked, by reason code",
                Family::default(),
            ),
            deferred: register(
                &mut r,
                "messages_deferred",
                "Input messages a batch left for a later transaction because another transaction held a lock they needed, counted at each deferral",
                Counter::default(),
            ),
            acknowledgements: register(
                &mut r,
                "acknowledgements_sent",
                "Acknowledgement frames sent for input deliveries: range (one for a run of deliveries) or single",
                acknowledgements,
            ),
            processing_seconds: register(
                &mut r,
                "message_processing_seconds",
                "Seconds from a batch's start to each delivery's settlement (committed or parked, handed to the acknowledgement window)",
                Histogram::new(exponential_buckets(0.0005, 2.0, 16)),
            ),
            outbox_backlog: register(
                &mut r,
                "outbox_backlog",
                "Outcomes committed but not yet published",
                Gauge::default(),
            ),
            outbox_oldest_age_seconds: register(
                &mut r,
                "outbox_oldest_age_seconds",
                "Age of the oldest unpublished outcome",
                Gauge::<f64, AtomicU64>::default(),
            ),
            open_conflicts: register(
                &mut r,
                "open_conflicts",
                "Teachers whose current outcome is a conflict",
                Gauge::default(),
            ),
            overdue_provisionals: register(
                &mut r,
                "overdue_provisionals",
                "Teachers in an overdue provisional spell",
                Gauge::default(),
            ),
            audit_differing: register(
                &mut r,
                "audit_differing_teachers",
                "Teachers whose stored outcome differed from the rules at the last verify",
                Gauge::default(),
            ),
            audit_last_run: register(
                &mut r,
                "audit_last_run_timestamp_seconds",
                "When the last verify finished (Unix seconds)",
                Gauge::<f64, AtomicU64>::default(),
            ),
            reconnects: register(
                &mut r,
                "broker_reconnects",
                "Reconnections after a broker failure",
                reconnects,
            ),
            not_ready: register(
                &mut r,
                "not_ready",
                "1 for each reason the worker cannot make progress now (see /readyz)",
                not_ready,
            ),
            broker_blocked: register(
                &mut r,
                "broker_blocked",
                "1 while RabbitMQ blocks one of the worker's connections (a memory or disk alarm: connection.blocked), else 0",
                Gauge::default(),
            ),
            stalled_seconds: register(
                &mut r,
                "stalled_seconds",
                "Seconds that deliveries have waited with none finishing",
                Gauge::<f64, AtomicU64>::default(),
            ),
            registry: r,
        }
    }

    /// Counts outcomes published by `by` (`lane` or `relay`).
    pub fn published_by(&self, by: &str, outcomes: u64) {
        self.published
            .get_or_create(&ByLabel { by: by.into() })
            .inc_by(outcomes);
    }

    /// Counts acknowledgement frames of `kind` (`range` or `single`).
    pub fn acknowledgements_sent(&self, kind: &str, frames: u64) {
        self.acknowledgements
            .get_or_create(&KindLabel { kind: kind.into() })
            .inc_by(frames);
    }

    /// The metrics in the Prometheus text format.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        let _ = prometheus_client::encoding::text::encode(&mut text, &self.registry);
        text
    }
}

/// Registers `metric` under `name` and returns it (a handle on the registered one).
fn register<M>(registry: &mut Registry, name: &str, help: &str, metric: M) -> M
where
    M: prometheus_client::registry::Metric + Clone,
{
    registry.register(name, help, metric.clone());
    metric
}

/// The process-wide metrics.
pub fn metrics() -> &'static Metrics {
    static METRICS: OnceLock<Metrics> = OnceLock::new();
    METRICS.get_or_init(Metrics::new)
}
