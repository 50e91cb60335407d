//! Settings: the defaults in `config/default.toml` (compiled in), then an optional file, then
//! environment variables (`INDUCTION__SECTION__KEY`, plus `DATABASE_URL` and `AMQP_URL`).
//!
//! Secrets (the URLs, which may carry passwords) are held as `SecretString` and are redacted
//! wherever settings are printed.

use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::Context;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};

const DEFAULTS: &str = include_str!("../config/default.toml");

/// Every setting of the worker.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct Settings {
    /// PostgreSQL.
    pub database: DatabaseSettings,
    /// RabbitMQ.
    pub amqp: AmqpSettings,
    /// Exchange, queue and routing-key names.
    pub topology: Topology,
    /// Message handling.
    pub worker: WorkerSettings,
    /// The outbox relay.
    pub relay: RelaySettings,
    /// The overdue sweep.
    pub sweep: SweepSettings,
    /// Logging.
    pub log: LogSettings,
    /// Traces.
    pub telemetry: TelemetrySettings,
    /// The metrics and health endpoint.
    pub http: HttpSettings,
    /// Which RabbitMQ users may publish which message type (CONTRACT.md section 2).
    pub publishers: PublisherSettings,
}

/// Which RabbitMQ users may publish each message type, and which are operators (whose replays
/// carry the original publisher in `x-original-user-id`). In the environment each is a
/// comma-separated list: `INDUCTION__PUBLISHERS__AB_CLAIM=ab-service,ab-bulk-loader`.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct PublisherSettings {
    /// Users allowed to publish `school_registration`.
    pub school_registration: Vec<String>,
    /// Users allowed to publish `ab_claim`.
    pub ab_claim: Vec<String>,
    /// Operator users.
    pub operators: Vec<String>,
}

/// Trace export settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct TelemetrySettings {
    /// OTLP/HTTP traces endpoint; tracing export is off when empty or absent.
    pub otlp_endpoint: Option<String>,
    /// `service.name` of exported spans.
    pub service_name: String,
}

/// The HTTP endpoint for metrics and health.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct HttpSettings {
    /// Serve `/metrics`, `/livez` and `/readyz`.
    pub enabled: bool,
    /// Address to listen on.
    pub listen: String,
    /// Seconds between refreshes of the gauges read from the database.
    pub gauge_refresh_seconds: u64,
}

/// PostgreSQL settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct DatabaseSettings {
    /// Connection URL; may contain a password.
    #[serde(serialize_with = "serialize_redacted")]
    pub url: SecretString,
    /// A file holding the password, used instead of one in the URL.
    pub password_file: Option<PathBuf>,
    /// Pool size.
    pub max_connections: u32,
    /// Run migrations when `run` starts.
    pub migrate_on_start: bool,
    /// Seconds to wait for a pooled connection.
    pub acquire_timeout_seconds: u64,
    /// Seconds one database operation (a query or a whole transaction) may take before its
    /// connection counts as lost; also the server's `idle_in_transaction_session_timeout`.
    pub operation_timeout_seconds: u64,
}

/// RabbitMQ settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct AmqpSettings {
    /// Connection URL (`amqp://` or `amqps://`); may contain a password. Several URLs,
    /// comma-separated, name the nodes of a cluster: the worker connects to the first that
    /// answers and moves on to the next when its node goes away.
    #[serde(serialize_with = "serialize_redacted_list")]
    pub url: SecretString,
    /// A file holding the password, used instead of one in the URL.
    pub password_file: Option<PathBuf>,
    /// PEM file of CA certificates to trust for `amqps://`, besides the system's roots.
    pub tls_ca_file: Option<PathBuf>,
    /// PEM file of the client certificate (and its chain), for brokers that require mutual TLS.
    pub tls_client_cert_file: Option<PathBuf>,
    /// PEM file of the client certificate's private key (PKCS#8, PKCS#1 or SEC1).
    pub tls_client_key_file: Option<PathBuf>,
    /// Consumer prefetch.
    pub prefetch: u16,
    /// Batches processed at once.
    pub concurrency: usize,
    /// Deliveries applied in one database transaction, at most.
    pub batch_size: usize,
    /// How long a batch waits for more deliveries after its first, in milliseconds, at most.
    pub batch_linger_millis: u64,
    /// Wait only while the batch and the lane's last one hold fewer than 16 deliveries and the
    /// lane's recent arrivals make its next delivery due within what is left of
    /// `batch_linger_millis`; off, a batch always waits that long unless it fills.
    pub batch_linger_adaptive: bool,
    /// How long a settled delivery may wait for the ones before it (held by other lanes) to be
    /// acknowledged with them in one range, in milliseconds; then it is acknowledged alone.
    pub ack_hold_millis: u64,
    /// Declare topology at start.
    pub declare_topology: bool,
    /// How long to wait for lapin's automatic recovery of a lost connection (or of a channel
    /// whose consumer stopped receiving) before building a new connection.
    pub recovery_timeout_seconds: u64,
}

/// With several broker URLs, how long lapin may try to bring a lost connection back to the same
/// node before the worker moves on to the next (unless `recovery_timeout_seconds` is shorter).
pub const FAILOVER_AFTER: Duration = Duration::from_secs(10);

impl AmqpSettings {
    /// `ack_hold_millis`.
    pub fn ack_hold(&self) -> Duration {
        Duration::from_millis(self.ack_hold_millis)
    }

    /// How long to wait for lapin to recover a lost connection before giving it up: the
    /// `recovery_timeout_seconds`, or [`FAILOVER_AFTER`] if shorter and there are other nodes to
    /// go to.
    pub fn recovery_timeout(&self) -> Duration {
        let configured = Duration::from_secs(self.recovery_timeout_seconds);
        if split_urls(self.url.expose_secret()).len() > 1 {
            configured.min(FAILOVER_AFTER)
        } else {
            configured
        }
    }
}

/// The URLs of a comma-separated list, trimmed, empty ones left out.
fn split_urls(list: &str) -> Vec<&str> {
    list.split(',')
        .map(str::trim)
        .filter(|u| !u.is_empty())
        .collect()
}

/// Names of exchanges, queues and routing keys (CONTRACT.md section 2).
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
pub struct Topology {
    /// Input exchange (topic).
    pub input_exchange: String,
    /// Routing key of school registrations.
    pub registration_routing_key: String,
    /// Routing key of AB claims.
    pub claim_routing_key: String,
    /// The worker's input queue (quorum).
    pub inbox_queue: String,
    /// Outcome exchange (topic).
    pub outcome_exchange: String,
    /// Parking queue (quorum).
    pub parking_queue: String,
    /// Alternate exchange of the outcome exchange.
    pub unrouted_exchange: String,
    /// Queue that keeps outcomes no consumer queue was bound for.
    pub unrouted_queue: String,
    /// Broker-side delivery limit of the inbox queue.
    pub delivery_limit: u32,
}

/// Message handling settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct WorkerSettings {
    /// Attempts before parking a message as `processing_failed`.
    pub max_attempts: u32,
    /// Shortest retry delay.
    pub retry_min_millis: u64,
    /// Longest retry delay.
    pub retry_max_millis: u64,
    /// Bound on a graceful shutdown.
    pub shutdown_timeout_seconds: u64,
    /// Seconds that work may wait with no delivery finishing before `/readyz` answers 503.
    pub readiness_stall_seconds: u64,
    /// Seconds that work may wait with no delivery finishing, while the database and the broker
    /// answer, before `/livez` answers 503 (a stuck process, for the orchestrator to restart).
    pub liveness_stall_seconds: u64,
}

/// Outbox relay settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct RelaySettings {
    /// Run the relay in this process.
    pub enabled: bool,
    /// Outcomes per round.
    pub batch_size: i64,
    /// Fallback poll interval.
    pub poll_interval_millis: u64,
    /// Lanes publish their batch's outcomes on the relay's connection right after the commit,
    /// instead of waiting for the relay's next round (`app::direct`).
    pub publish_after_commit: bool,
    /// How long outcomes a lane will publish itself are left alone by every relay: after that
    /// (the worker died before it marked them published) any relay publishes them.
    pub lease_seconds: u64,
}

/// Overdue sweep settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct SweepSettings {
    /// Run the sweep in this process.
    pub enabled: bool,
    /// Age of a provisional spell that makes it overdue.
    pub overdue_after_seconds: u64,
    /// How often the sweep runs.
    pub interval_seconds: u64,
    /// Teachers examined per round.
    pub batch_size: i64,
}

/// Logging settings.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct LogSettings {
    /// `compact` or `json`.
    pub format: LogFormat,
    /// A tracing filter directive.
    pub filter: String,
}

/// Log line format.
#[derive(Debug, Clone, Copy, Deserialize, Serialize, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable, one line per event.
    Compact,
    /// One JSON object per event.
    Json,
}

impl Settings {
    /// Loads the defaults, then `file` (or `config/local.toml` if present), then the environment.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Self> {
        let mut builder = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml));
        match file {
            Some(path) => {
                builder = builder.add_source(config::File::from(path).required(true));
            }
            None => {
                builder =
                    builder.add_source(config::File::with_name("config/local").required(false));
            }
        }
        builder = builder.add_source(
            config::Environment::with_prefix("INDUCTION")
                .prefix_separator("__")
                .separator("__")
                .try_parsing(true)
                .list_separator(",")
                .with_list_parse_key("publishers.school_registration")
                .with_list_parse_key("publishers.ab_claim")
                .with_list_parse_key("publishers.operators"),
        );
        if let Ok(url) = std::env::var("DATABASE_URL") {
            builder = builder.set_override("database.url", url)?;
        }
        if let Ok(url) = std::env::var("AMQP_URL") {
            builder = builder.set_override("amqp.url", url)?;
        }
        let settings: Settings = builder
            .build()
            .context("cannot read the settings")?
            .try_deserialize()
            .context("the settings are not valid")?;
        settings.check()?;
        Ok(settings)
    }

    fn check(&self) -> anyhow::Result<()> {
        anyhow::ensure!(
            self.database.operation_timeout_seconds >= 1,
            "database.operation_timeout_seconds must be at least 1"
        );
        anyhow::ensure!(
            self.worker.readiness_stall_seconds >= 1
                && self.worker.liveness_stall_seconds >= self.worker.readiness_stall_seconds,
            "worker.readiness_stall_seconds must be at least 1, and worker.liveness_stall_seconds at least as long"
        );
        anyhow::ensure!(
            self.amqp.recovery_timeout_seconds >= 1,
            "amqp.recovery_timeout_seconds must be at least 1"
        );
        anyhow::ensure!(
            self.amqp.concurrency >= 1,
            "amqp.concurrency must be at least 1"
        );
        anyhow::ensure!(self.amqp.prefetch >= 1, "amqp.prefetch must be at least 1");
        anyhow::ensure!(
            self.amqp.batch_size >= 1,
            "amqp.batch_size must be at least 1"
        );
        anyhow::ensure!(
            self.worker.max_attempts >= 1,
            "worker.max_attempts must be at least 1"
        );
        anyhow::ensure!(
            self.relay.batch_size >= 1,
            "relay.batch_size must be at least 1"
        );
        // Three times the 10 s a lane waits for its confirms (`app::direct::CONFIRM_BOUND`), so
        // that a lease does not run out while its lane still waits to mark it.
        anyhow::ensure!(
            self.relay.lease_seconds >= 30,
            "relay.lease_seconds must be at least 30"
        );
        anyhow::ensure!(
            self.sweep.interval_seconds >= 1,
            "sweep.interval_seconds must be at least 1"
        );
        anyhow::ensure!(
            self.database.max_connections as usize >= self.amqp.concurrency + 2,
            "database.max_connections must be at least amqp.concurrency + 2 (the relay and the sweep)"
        );
        Ok(())
    }

    /// The database URL with the password from `password_file` applied, if one is configured.
    pub fn database_url(&self) -> anyhow::Result<SecretString> {
        with_password_file(&self.database.url, self.database.password_file.as_deref())
    }

    /// The CA certificates to trust for `amqps://`, if configured. Fails on a file that holds
    /// no PEM certificate: a CA file that trusts nothing is a mistake, not a setting.
    pub fn amqp_tls_ca(&self) -> anyhow::Result<Option<String>> {
        let Some(path) = &self.amqp.tls_ca_file else {
            return Ok(None);
        };
        let pem = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read amqp.tls_ca_file {}", path.display()))?;
        anyhow::ensure!(
            pem.contains("-----BEGIN CERTIFICATE-----"),
            "amqp.tls_ca_file {} holds no PEM certificate",
            path.display()
        );
        Ok(Some(pem))
    }

    /// The client certificate chain and key (both PEM) for mutual TLS, if configured. Both
    /// files or neither.
    pub fn amqp_tls_identity(&self) -> anyhow::Result<Option<(Vec<u8>, Vec<u8>)>> {
        let read = |path: &Path, what: &str| {
            std::fs::read(path)
                .with_context(|| format!("cannot read amqp.{what} {}", path.display()))
        };
        match (
            &self.amqp.tls_client_cert_file,
            &self.amqp.tls_client_key_file,
        ) {
            (None, None) => Ok(None),
            (Some(cert), Some(key)) => {
                let cert_pem = read(cert, "tls_client_cert_file")?;
                anyhow::ensure!(
                    String::from_utf8_lossy(&cert_pem).contains("-----BEGIN CERTIFICATE-----"),
                    "amqp.tls_client_cert_file {} holds no PEM certificate",
                    cert.display()
                );
                Ok(Some((cert_pem, read(key, "tls_client_key_file")?)))
            }
            _ => anyhow::bail!(
                "set both amqp.tls_client_cert_file and amqp.tls_client_key_file, or neither"
            ),
        }
    }

    /// Warnings about settings that work but are unsafe, for `check-config` and the worker's
    /// start: one user allowed to publish both message types, on a broker that is not local (a
    /// development broker on loopback may use one user, as the defaults do).
    pub fn warnings(&self) -> Vec<String> {
        let p = &self.publishers;
        let both: Vec<&String> = p
            .school_registration
            .iter()
            .filter(|user| p.ab_claim.contains(user))
            .collect();
        let local = self.amqp_host().is_some_and(|host| {
            host == "localhost"
                || host
                    .parse::<std::net::IpAddr>()
                    .is_ok_and(|ip| ip.is_loopback())
        });
        if both.is_empty() || local {
            return Vec::new();
        }
        both.into_iter()
            .map(|user| {
                format!(
                    "user {user:?} may publish both school_registration and ab_claim: a school-side \
                     credential could then confirm any teacher; give each producer its own user"
                )
            })
            .collect()
    }

    /// The broker's host, from the (first) AMQP URL.
    fn amqp_host(&self) -> Option<String> {
        let first = *split_urls(self.amqp.url.expose_secret()).first()?;
        let uri: lapin::uri::AMQPUri = first.parse().ok()?;
        Some(uri.authority.host)
    }

    /// The AMQP URLs (one per node), each with the password from `password_file` applied if one
    /// is configured.
    pub fn amqp_urls(&self) -> anyhow::Result<Vec<SecretString>> {
        let urls = split_urls(self.amqp.url.expose_secret());
        anyhow::ensure!(!urls.is_empty(), "amqp.url names no broker");
        urls.into_iter()
            .map(|url| {
                let url = SecretString::from(url.to_owned());
                with_password_file(&url, self.amqp.password_file.as_deref())
            })
            .collect()
    }

    /// The effective settings as TOML with every password redacted, for `check-config`.
    pub fn redacted(&self) -> String {
        toml::to_string(self).unwrap_or_else(|e| format!("# cannot print the settings: {e}\n"))
    }
}

fn serialize_redacted<S: serde::Serializer>(
    url: &SecretString,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    serializer.serialize_str(&redact_url(url.expose_secret()))
}

fn serialize_redacted_list<S: serde::Serializer>(
    urls: &SecretString,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    let redacted: Vec<String> = split_urls(urls.expose_secret())
        .into_iter()
        .map(redact_url)
        .collect();
    serializer.serialize_str(&redacted.join(","))
}

impl WorkerSettings {
    /// Bound on a graceful shutdown.
    pub fn shutdown_timeout(&self) -> Duration {
        Duration::from_secs(self.shutdown_timeout_seconds)
    }
}

/// Replaces the password of a URL, if it has one, with `***`.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return "***".to_owned();
    };
    let (authority, path) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
    match authority.rsplit_once('@') {
        Some((userinfo, host)) => {
            let user = userinfo.split_once(':').map_or(userinfo, |(user, _)| user);
            let masked = if userinfo.contains(':') {
                format!("{user}:***")
            } else {
                user.to_owned()
            };
            format!("{scheme}://{masked}@{host}{path}")
        }
        None => url.to_owned(),
    }
}

fn with_password_file(url: &SecretString, file: Option<&Path>) -> anyhow::Result<SecretString> {
    let Some(file) = file else {
        return Ok(url.clone());
    };
    let password = std::fs::read_to_string(file)
        .with_context(|| format!("cannot read the password file {}", file.display()))?;
    let password = password.trim_end_matches(['\n', '\r']);
    let url = url.expose_secret();
    let (scheme, rest) = url
        .split_once("://")
        .context("a URL with a password file must have the form scheme://user@host/...")?;
    let at = rest
        .find('@')
        .context("a URL with a password file must name a user (scheme://user@host/...)")?;
    let user = rest[..at].split(':').next().unwrap_or_default();
    let encoded: String = password
        .bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect();
    Ok(SecretString::from(format!(
        "{scheme}://{user}:{encoded}@{}",
        &rest[at + 1..]
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn several_broker_urls_are_split_redacted_and_fail_over_sooner() {
        let mut settings = Settings::load(None).unwrap();
        settings.amqp.url = SecretString::from(
            "amqp://w:one@node1:5672/%2f, amqp://w:two@node2:5672/%2f,".to_owned(),
        );
        let urls = settings.amqp_urls().unwrap();
        let urls: Vec<&str> = urls.iter().map(|u| u.expose_secret()).collect();
        assert_eq!(
            urls,
            ["amqp://w:one@node1:5672/%2f", "amqp://w:two@node2:5672/%2f"]
        );
        let printed = settings.redacted();
        assert!(
            printed.contains(r#"url = "amqp://w:***@node1:5672/%2f,amqp://w:***@node2:5672/%2f""#),
            "{printed}"
        );
        assert_eq!(settings.amqp.recovery_timeout(), FAILOVER_AFTER);
        settings.amqp.url = SecretString::from("amqp://w:one@node1:5672/%2f".to_owned());
        assert_eq!(settings.amqp.recovery_timeout(), Duration::from_secs(60));
        settings.amqp.url = SecretString::from(" , ".to_owned());
        assert!(settings.amqp_urls().is_err());
    }

    #[test]
    fn redacts_passwords_only() {
        assert_eq!(
            redact_url("amqp://guest:secret@host:5672/%2f"),
            "amqp://guest:***@host:5672/%2f"
        );
        assert_eq!(
            redact_url("postgres://root@127.0.0.1/db"),
            "postgres://root@127.0.0.1/db"
        );
        assert_eq!(
            redact_url("postgres://u:p@ss@h/db"),
            "postgres://u:***@h/db"
        );
        assert_eq!(redact_url("garbage"), "***");
    }

    #[test]
    fn password_file_is_percent_encoded_into_the_url() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("pw");
        std::fs::write(&path, "p@ss word\n").unwrap();
        let url = with_password_file(&SecretString::from("postgres://app@db:5432/x"), Some(&path))
            .unwrap();
        assert_eq!(
            url.expose_secret(),
            "postgres://app:p%40ss%20word@db:5432/x"
        );
    }

    #[test]
    fn defaults_parse() {
        let settings: Settings = config::Config::builder()
            .add_source(config::File::from_str(DEFAULTS, config::FileFormat::Toml))
            .build()
            .unwrap()
            .try_deserialize()
            .unwrap();
        settings.check().unwrap();
        assert_eq!(settings.topology.inbox_queue, "induction-reconciler.inbox");
        assert!(!settings.redacted().contains("guest:guest"));
    }
}
