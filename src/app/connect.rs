//! Connecting to PostgreSQL and RabbitMQ with the settings: once (operator commands), or waiting
//! with back-off while the service is unavailable (the worker).

use std::time::Duration;

use anyhow::Context;
use tokio_util::sync::CancellationToken;

use super::retry::Backoff;
use crate::broker::{Broker, BrokerError, Tls};
use crate::config::Settings;
use crate::store::{Limits, Store};
use crate::telemetry::events::Quiet;

/// How long one connection attempt to the broker may take (a broker still starting can hang).
const BROKER_CONNECT_TIMEOUT: Duration = Duration::from_secs(30);

/// Connects to RabbitMQ once (URL, password file, CA file), naming the connection.
pub async fn broker(settings: &Settings, name: &str) -> anyhow::Result<Broker> {
    let target = BrokerTarget::from_settings(settings)?;
    target
        .attempt(name)
        .await
        .context("cannot connect to the broker")
}

/// The pool bounds of the settings, for a pool of `max_connections`.
pub fn store_limits(settings: &Settings, max_connections: u32) -> Limits {
    let database = &settings.database;
    Limits {
        max_connections,
        acquire_timeout: Duration::from_secs(database.acquire_timeout_seconds),
        operation_timeout: Duration::from_secs(database.operation_timeout_seconds),
    }
}

/// Connects a small pool to PostgreSQL once, for an operator command.
pub async fn store(settings: &Settings) -> anyhow::Result<Store> {
    Store::connect(&settings.database_url()?, store_limits(settings, 2))
        .await
        .context("cannot connect to the database")
}

/// Where and how to connect to RabbitMQ: the URLs (with the password file applied) and the TLS
/// files, read once, not on every retry. A worker's consumer and relay each keep theirs for the
/// life of the process, so that the node they start with after giving a connection up is the one
/// after the node of that connection.
pub struct BrokerTarget {
    urls: Vec<secrecy::SecretString>,
    tls: Tls,
    /// How long lapin may try to bring a lost connection back: as long as the worker waits for
    /// it (`amqp.recovery_timeout_seconds`, shorter with several nodes), after which it gives the
    /// connection up and opens another.
    recovery: Duration,
    /// The URL the next attempt starts with: the one after the last that answered, so that a
    /// connection given up moves on to another node rather than knocking first at one that may
    /// have gone silent (each such attempt waits out [`BROKER_CONNECT_TIMEOUT`]).
    next: std::sync::atomic::AtomicUsize,
}

impl BrokerTarget {
    /// Reads the URLs, the password file and the TLS files of the settings.
    pub fn from_settings(settings: &Settings) -> anyhow::Result<Self> {
        Ok(Self {
            urls: settings.amqp_urls()?,
            tls: Tls {
                ca_pem: settings.amqp_tls_ca()?,
                client: settings.amqp_tls_identity()?,
            },
            recovery: settings.amqp.recovery_timeout(),
            next: std::sync::atomic::AtomicUsize::new(0),
        })
    }

    /// Tries each URL once, in turn from [`BrokerTarget::next`]: the first that answers, or the
    /// last failure (a permanent one, such as a certificate that cannot be verified, at once).
    async fn attempt(&self, name: &str) -> Result<Broker, BrokerError> {
        use std::sync::atomic::Ordering;
        let start = self.next.load(Ordering::Relaxed);
        let mut failure = None;
        for i in 0..self.urls.len() {
            let index = (start + i) % self.urls.len();
            let connecting =
                Broker::connect_with_tls(&self.urls[index], name, &self.tls, self.recovery);
            let attempt = tokio::time::timeout(BROKER_CONNECT_TIMEOUT, connecting)
                .await
                .unwrap_or_else(|_| Err(BrokerError::timed_out("a connection (30 s)")));
            match attempt {
                Ok(broker) => {
                    self.next.store(index + 1, Ordering::Relaxed);
                    if self.urls.len() > 1 {
                        tracing::info!(
                            node = index + 1,
                            of = self.urls.len(),
                            "connected to a broker node"
                        );
                    }
                    return Ok(broker);
                }
                Err(error) if !error.is_transient() => return Err(error),
                Err(error) => failure = Some(error),
            }
        }
        Err(failure.unwrap_or_else(|| BrokerError::lost("no broker URL")))
    }
}

/// Connects the worker's pool to PostgreSQL, waiting with back-off while it is unavailable.
/// `None` if `stop` fired first.
pub async fn store_waiting(
    settings: &Settings,
    stop: &CancellationToken,
) -> anyhow::Result<Option<Store>> {
    let url = settings.database_url()?;
    let mut backoff = Backoff::new(settings);
    let mut warned = Quiet::default();
    loop {
        let limits = store_limits(settings, settings.database.max_connections);
        let connecting = Store::connect(&url, limits);
        match connecting.await {
            Ok(store) => return Ok(Some(store)),
            Err(error) if error.is_transient() => {
                warned.log(&error, "cannot reach the database yet; retrying");
            }
            Err(error) => return Err(error).context("cannot connect to the database"),
        }
        if !backoff.pause(stop).await {
            return Ok(None);
        }
    }
}

/// Connects to RabbitMQ through `target`, waiting with back-off while it is unavailable. `None`
/// if `stop` fired first.
pub async fn broker_waiting(
    settings: &Settings,
    target: &BrokerTarget,
    name: &str,
    stop: &CancellationToken,
) -> anyhow::Result<Option<Broker>> {
    let mut backoff = Backoff::new(settings);
    let mut warned = Quiet::default();
    loop {
        let attempt = tokio::select! {
            attempt = target.attempt(name) => attempt,
            () = stop.cancelled() => return Ok(None),
        };
        match attempt {
            Ok(broker) => {
                if warned.any() {
                    tracing::info!("reached the broker");
                }
                return Ok(Some(broker));
            }
            Err(error) if error.is_transient() => {
                warned.log(&error, "cannot reach the broker yet; retrying");
            }
            Err(error) => return Err(error).context("cannot connect to the broker"),
        }
        if !backoff.pause(stop).await {
            return Ok(None);
        }
    }
}
