//! Telemetry: logs (compact or JSON), traces (OpenTelemetry over OTLP/HTTP when an endpoint is
//! configured) and Prometheus metrics. See docs/LOGGING.md for the field names and rules.

pub mod events;
pub mod metrics;
pub mod propagation;

use anyhow::Context;
use opentelemetry::trace::TracerProvider as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

use crate::config::{LogFormat, LogSettings, TelemetrySettings};

/// Keeps the trace exporter alive; flushes it when dropped.
pub struct Guard {
    provider: Option<SdkTracerProvider>,
}

impl Drop for Guard {
    fn drop(&mut self) {
        if let Some(provider) = self.provider.take() {
            let _ = provider.shutdown();
        }
    }
}

/// Builds the tracer provider for an OTLP/HTTP endpoint.
pub fn tracer_provider(endpoint: &str, service_name: &str) -> anyhow::Result<SdkTracerProvider> {
    use opentelemetry_otlp::WithExportConfig;
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_http()
        .with_endpoint(endpoint)
        .build()
        .context("cannot build the OTLP exporter")?;
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(
            opentelemetry_sdk::Resource::builder()
                .with_service_name(service_name.to_owned())
                .build(),
        )
        .build())
}

/// Installs the global subscriber: logs to standard error (so that standard output stays free
/// for commands that print data), and spans to OpenTelemetry when an endpoint is configured.
pub fn init(log: &LogSettings, telemetry: &TelemetrySettings) -> anyhow::Result<Guard> {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&log.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let provider = match telemetry.otlp_endpoint.as_deref().filter(|e| !e.is_empty()) {
        Some(endpoint) => Some(tracer_provider(endpoint, &telemetry.service_name)?),
        None => None,
    };
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("induction-reconciler")));
    let fmt = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let _ = match log.format {
        LogFormat::Json => registry
            .with(
                fmt.json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .try_init(),
        LogFormat::Compact => registry.with(fmt.compact()).try_init(),
    };
    Ok(Guard { provider })
}

/// Makes rustls use the *ring* provider for every TLS connection (lapin's and sqlx's alike).
/// Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
