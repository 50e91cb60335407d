//! Logging set-up: compact lines for people or JSON for machines, filtered by the configured
//! directive (`RUST_LOG` wins when set). See docs/LOGGING.md for the field names and rules.

use tracing_subscriber::EnvFilter;

use crate::config::{LogFormat, LogSettings};

/// Installs the global subscriber. Logs go to standard error, so that standard output stays
/// free for commands that print data.
pub fn init(settings: &LogSettings) {
    let filter = EnvFilter::try_from_default_env()
        .or_else(|_| EnvFilter::try_new(&settings.filter))
        .unwrap_or_else(|_| EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    let _ = match settings.format {
        LogFormat::Json => builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .with_span_list(false)
            .try_init(),
        LogFormat::Compact => builder.compact().try_init(),
    };
}

/// Makes rustls use the *ring* provider for every TLS connection (lapin's and sqlx's alike).
/// Safe to call more than once.
pub fn install_crypto_provider() {
    let _ = rustls::crypto::ring::default_provider().install_default();
}
