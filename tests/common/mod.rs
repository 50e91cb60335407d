//! Builders of valid input messages for tests, and a fixed clock.
#![allow(dead_code)]

pub mod app;
pub mod cluster;
pub mod cpu;
pub mod ecf1;
pub mod observe;
pub mod proxy;
pub mod rabbit;
pub mod tools;
pub mod workload;

use serde_json::{Value, json};
use time::OffsetDateTime;
use time::macros::datetime;

/// The clock every decoding test runs at.
pub const NOW: OffsetDateTime = datetime!(2026-01-15 12:00 UTC);

/// A message id made from a number, so that tests can control the tie-break order.
pub fn mid(n: u64) -> String {
    format!("00000000-0000-4000-8000-{n:012x}")
}

/// Another transaction's hold on the teacher `trn`, as a worker's batch, the sweep or `verify
/// --emit` takes it (`store::locks`: advisory lock class 2, keyed by the TRN as a number), until
/// the returned transaction commits or rolls back.
pub async fn hold_teacher(
    pool: &sqlx::PgPool,
    trn: &str,
) -> sqlx::Transaction<'static, sqlx::Postgres> {
    let mut holder = pool.begin().await.unwrap();
    sqlx::query("select pg_advisory_xact_lock(2, $1)")
        .bind(trn.parse::<i32>().expect("a TRN is seven digits"))
        .execute(&mut *holder)
        .await
        .unwrap();
    holder
}

/// SQL that makes the database refuse every registration with this id (a trigger raises an
/// error): a processing failure that is not an outage, for the poison-message tests.
pub fn poison_trigger_sql(registration_id: &str) -> String {
    assert!(
        registration_id
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-')
    );
    format!(
        "create function poison() returns trigger language plpgsql as $$ begin
           if new.registration_id = '{registration_id}' then raise exception 'poisoned record'; end if;
           return new; end $$;
         create trigger poison before insert or update on registrations
           for each row execute function poison();"
    )
}

/// A valid, open, provider-led school registration.
pub fn registration(n: u64, registration_id: &str, trn: &str) -> Value {
    json!({
        "message_id": mid(n),
        "message_type": "school_registration",
        "schema_version": 1,
        "occurred_at": "2025-09-01T09:00:00Z",
        "payload": {
            "registration_id": registration_id,
            "trn": trn,
            "school_urn": 123456,
            "started_on": "2025-09-01",
            "appropriate_body_id": "AB-1",
            "training_programme": "provider_led",
            "lead_provider_id": "LP-1"
        }
    })
}

/// A valid, open AB claim that reports no programme.
pub fn claim(n: u64, induction_period_id: &str, trn: &str) -> Value {
    json!({
        "message_id": mid(n),
        "message_type": "ab_claim",
        "schema_version": 1,
        "occurred_at": "2025-09-10T09:00:00Z",
        "payload": {
            "induction_period_id": induction_period_id,
            "trn": trn,
            "appropriate_body_id": "AB-1",
            "started_on": "2025-09-01"
        }
    })
}

/// Sets a field by a dotted path (`payload.trn`, `occurred_at`).
pub fn set(mut message: Value, path: &str, value: Value) -> Value {
    let (object, name) = locate(&mut message, path);
    object.insert(name.to_owned(), value);
    message
}

/// Removes a field by a dotted path.
pub fn without(mut message: Value, path: &str) -> Value {
    let (object, name) = locate(&mut message, path);
    object.remove(name);
    message
}

fn locate<'a>(
    message: &'a mut Value,
    path: &'a str,
) -> (&'a mut serde_json::Map<String, Value>, &'a str) {
    match path.split_once('.') {
        Some((parent, name)) => (message[parent].as_object_mut().expect("object"), name),
        None => (message.as_object_mut().expect("object"), path),
    }
}

/// A loopback port nothing listens on right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The administrative database URL the tests and the benchmark create and drop databases with.
pub fn admin_url() -> String {
    std::env::var("TEST_ADMIN_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://root@127.0.0.1:5432/postgres".into())
}

/// The URL of database `name` on the administrative URL's server.
pub fn database_url(name: &str) -> String {
    let base = admin_url();
    let server = base
        .rsplit_once('/')
        .map(|(server, _)| server)
        .unwrap_or(&base);
    format!("{server}/{name}")
}

/// Creates an empty database (drop it with [`drop_database`]).
pub async fn create_database(name: &str) {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(&admin_url())
        .await
        .expect("an administrative connection to PostgreSQL (TEST_ADMIN_DATABASE_URL)");
    sqlx::query(sqlx::AssertSqlSafe(format!("create database \"{name}\"")))
        .execute(&mut admin)
        .await
        .expect("create the database");
    let _ = admin.close().await;
}

/// Drops a database made by [`create_database`], whoever is still connected to it.
pub async fn drop_database(name: &str) {
    use sqlx::Connection;
    if let Ok(mut admin) = sqlx::PgConnection::connect(&admin_url()).await {
        let _ = sqlx::query(sqlx::AssertSqlSafe(format!(
            "drop database if exists \"{name}\" with (force)"
        )))
        .execute(&mut admin)
        .await;
    }
}

/// Whether the database `name` exists on the administrative URL's server.
pub async fn database_exists(name: &str) -> bool {
    use sqlx::Connection;
    let mut admin = sqlx::PgConnection::connect(&admin_url())
        .await
        .expect("an administrative connection to PostgreSQL (TEST_ADMIN_DATABASE_URL)");
    let found: Option<i32> = sqlx::query_scalar("select 1 from pg_database where datname = $1")
        .bind(name)
        .fetch_optional(&mut admin)
        .await
        .expect("read pg_database");
    let _ = admin.close().await;
    found.is_some()
}

/// Whether `queue` (or, when `is_queue` is false, the exchange) exists, asked on a fresh channel:
/// a passive declare of one that does not closes the channel with 404.
pub async fn exists(
    broker: &induction_reconciler::broker::Broker,
    name: &str,
    is_queue: bool,
) -> bool {
    let channel = broker.channel().await.expect("a channel");
    if is_queue {
        return induction_reconciler::broker::ready(&channel, name)
            .await
            .is_ok();
    }
    let options = lapin::options::ExchangeDeclareOptions {
        passive: true,
        ..Default::default()
    };
    let kind = lapin::ExchangeKind::Topic;
    let declaring = channel.exchange_declare(
        name.into(),
        kind,
        options,
        lapin::types::FieldTable::default(),
    );
    declaring.await.is_ok()
}

/// Deletes `queues`, then `exchanges`, from the broker the tests and the benchmark share; says on
/// standard error what it could not delete and why, and returns those names.
///
/// A delete the broker refuses closes its channel (an AMQP channel exception), and on a shared
/// channel every later delete would then fail as well, unseen. So each attempt here has a channel
/// of its own, on a connection of its own (the caller's may be the one that failed), and a refused
/// or unanswered delete is tried three times: deleting a quorum queue that holds many messages can
/// time out on a busy broker and succeed a moment later.
pub async fn remove_topology(queues: &[&str], exchanges: &[&str]) -> Vec<String> {
    use backon::{ExponentialBuilder, Retryable};
    use lapin::options::{ExchangeDeleteOptions, QueueDeleteOptions};
    use std::time::Duration;

    let retries = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(200))
        .with_max_times(2);
    let url = secrecy::SecretString::from(app::amqp_url());
    let connecting = || induction_reconciler::broker::Broker::connect(&url, "test-clean-up");
    let broker = match connecting.retry(retries).await {
        Ok(broker) => broker,
        Err(error) => {
            eprintln!(
                "cannot connect to the broker to delete {queues:?} and {exchanges:?}: {error}"
            );
            return queues
                .iter()
                .chain(exchanges)
                .map(|&name| name.to_owned())
                .collect();
        }
    };
    let mut left = Vec::new();
    let entities = (queues.iter().map(|&name| (true, name)))
        .chain(exchanges.iter().map(|&name| (false, name)));
    for (is_queue, name) in entities {
        let deleting = || async {
            let channel = broker.channel().await.map_err(|e| e.to_string())?;
            let deleted = async {
                match is_queue {
                    true => channel
                        .queue_delete(name.into(), QueueDeleteOptions::default())
                        .await
                        .map(drop),
                    false => {
                        let options = ExchangeDeleteOptions::default();
                        channel.exchange_delete(name.into(), options).await
                    }
                }
            };
            let answer = tokio::time::timeout(Duration::from_secs(15), deleted).await;
            // A refused delete has already closed the channel; closing it again only fails.
            let closing = channel.close(200, "deleted".into());
            let _ = tokio::time::timeout(Duration::from_secs(5), closing).await;
            match answer {
                Ok(Ok(())) => Ok(()),
                Ok(Err(error)) => Err(error.to_string()),
                Err(_) => Err("no answer within 15 s".to_owned()),
            }
        };
        if let Err(why) = deleting.retry(retries).await {
            let kind = if is_queue { "queue" } else { "exchange" };
            eprintln!("could not delete the {kind} {name} from the broker: {why}");
            left.push(name.to_owned());
        }
    }
    broker.close().await;
    left
}

/// What a test made on the shared PostgreSQL and RabbitMQ: a database, queues, exchanges. The
/// test removes them with [`Leftovers::remove`] when it ends well; if it panics first (or returns
/// without it), dropping the guard removes them on a thread of its own, with a runtime of its
/// own, since the test's runtime is unwinding and cannot run them. So a failed test leaves no
/// database and no queue behind for the next run.
pub struct Leftovers {
    database: Option<String>,
    queues: Vec<String>,
    exchanges: Vec<String>,
}

impl Leftovers {
    /// A database made by [`create_database`].
    pub fn database(name: &str) -> Self {
        Self {
            database: Some(name.to_owned()),
            queues: Vec::new(),
            exchanges: Vec::new(),
        }
    }

    /// Nothing to remove.
    pub fn none() -> Self {
        Self {
            database: None,
            queues: Vec::new(),
            exchanges: Vec::new(),
        }
    }

    /// Adds queues and exchanges (deleted in that order, before the database is dropped).
    pub fn with_topology(mut self, queues: &[&str], exchanges: &[&str]) -> Self {
        self.queues.extend(queues.iter().map(|&q| q.to_owned()));
        self.exchanges
            .extend(exchanges.iter().map(|&e| e.to_owned()));
        self
    }

    /// Removes everything now; the guard is then spent.
    pub async fn remove(mut self) {
        remove_leftovers(self.take()).await;
    }

    fn take(&mut self) -> (Option<String>, Vec<String>, Vec<String>) {
        (
            self.database.take(),
            std::mem::take(&mut self.queues),
            std::mem::take(&mut self.exchanges),
        )
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let leftovers = self.take();
        if leftovers == (None, Vec::new(), Vec::new()) {
            return;
        }
        // Never panic here: a panic while unwinding aborts the test binary.
        let removing =
            std::thread::spawn(move || {
                match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(runtime) => runtime.block_on(remove_leftovers(leftovers)),
                    Err(error) => eprintln!("cannot remove a failed test's leftovers: {error}"),
                }
            });
        let _ = removing.join();
    }
}

async fn remove_leftovers(
    (database, queues, exchanges): (Option<String>, Vec<String>, Vec<String>),
) {
    if !(queues.is_empty() && exchanges.is_empty()) {
        let queues: Vec<&str> = queues.iter().map(String::as_str).collect();
        let exchanges: Vec<&str> = exchanges.iter().map(String::as_str).collect();
        remove_topology(&queues, &exchanges).await;
    }
    if let Some(name) = database {
        drop_database(&name).await;
    }
}

/// The contract's topology with every exchange and queue name under `prefix`, so that runs on a
/// shared broker do not meet.
pub fn prefixed_topology(prefix: &str) -> induction_reconciler::config::Topology {
    induction_reconciler::config::Topology {
        input_exchange: format!("{prefix}.events"),
        registration_routing_key: "school.registration".into(),
        claim_routing_key: "ab.claim".into(),
        inbox_queue: format!("{prefix}.inbox"),
        outcome_exchange: format!("{prefix}.outcomes"),
        parking_queue: format!("{prefix}.parked"),
        unrouted_exchange: format!("{prefix}.unrouted"),
        unrouted_queue: format!("{prefix}.unrouted"),
        delivery_limit: 20,
    }
}

/// A field of `/proc/PID/status` in KiB (`VmRSS:` now, `VmHWM:` the peak); 0 if unreadable.
pub fn rss_kib(pid: u32, field: &str) -> usize {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

/// The value of a sample line such as `name{labels} 3` in the Prometheus text `metrics`.
pub fn sample(metrics: &str, prefix: &str) -> f64 {
    find_sample(metrics, prefix).unwrap_or_else(|| panic!("no sample {prefix} in:\n{metrics}"))
}

/// [`sample`], or `None` when `metrics` has no such line.
pub fn find_sample(metrics: &str, prefix: &str) -> Option<f64> {
    metrics
        .lines()
        .find(|l| l.starts_with(prefix))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

/// A plain HTTP/1.0 GET on loopback; returns the status code and the body.
pub async fn http_get(port: u16, path: &str) -> Option<(u16, String)> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    let status = response.split_whitespace().nth(1)?.parse().ok()?;
    let body = response
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    Some((status, body))
}

/// A worker run in-process on a fresh database of its own, for tests against a throwaway broker
/// node (TLS, permissions); `stop` shuts it down and drops the database.
pub struct LoneWorker {
    /// The worker's database.
    pub store: induction_reconciler::store::Store,
    leftovers: Leftovers,
    stop: tokio::sync::oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl LoneWorker {
    /// Creates and migrates a database, points `settings` at it (no HTTP endpoint, no sweep)
    /// and starts the worker.
    pub async fn start(mut settings: induction_reconciler::config::Settings) -> Self {
        let db_name = format!("lw_{}", uuid::Uuid::new_v4().simple());
        create_database(&db_name).await;
        let leftovers = Leftovers::database(&db_name);
        settings.database.url = secrecy::SecretString::from(database_url(&db_name));
        settings.http.enabled = false;
        settings.sweep.enabled = false;
        let store = induction_reconciler::store::Store::connect(
            &settings.database.url,
            induction_reconciler::app::connect::store_limits(&settings, 2),
        )
        .await
        .expect("connect to the worker's database");
        store.migrate().await.expect("migrate");
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let handle = tokio::spawn(induction_reconciler::app::worker::run(settings, async {
            let _ = stopped.await;
        }));
        Self {
            store,
            leftovers,
            stop,
            handle,
        }
    }

    /// Stops the worker (within 30 s, without error) and drops its database.
    pub async fn stop(self) {
        let _ = self.stop.send(());
        tokio::time::timeout(std::time::Duration::from_secs(30), self.handle)
            .await
            .expect("the worker stops within 30 s")
            .expect("the worker task did not panic")
            .expect("the worker stops without error");
        self.store.pool().close().await;
        self.leftovers.remove().await;
    }
}

/// True when the tests run as root (server binaries must then run as their service users).
pub fn is_root() -> bool {
    std::process::Command::new("id")
        .arg("-u")
        .output()
        .map(|o| o.stdout.starts_with(b"0"))
        .unwrap_or(false)
}

/// The message's bytes as a producer would send them.
pub fn bytes(message: &Value) -> Vec<u8> {
    serde_json::to_vec(message).expect("serialisable")
}

/// The worker binary.
pub const BIN: &str = env!("CARGO_BIN_EXE_induction-reconciler");

/// The binary as an operator runs it, pointed at the test's database, broker and names.
pub fn cli(
    settings: &induction_reconciler::config::Settings,
    subcommand: &[&str],
) -> std::process::Command {
    let t = &settings.topology;
    let mut cmd = std::process::Command::new(BIN);
    cmd.args(subcommand)
        .env_remove("RUST_LOG")
        .env(
            "DATABASE_URL",
            secrecy::ExposeSecret::expose_secret(&settings.database.url),
        )
        .env(
            "AMQP_URL",
            secrecy::ExposeSecret::expose_secret(&settings.amqp.url),
        )
        .env("INDUCTION__TOPOLOGY__INPUT_EXCHANGE", &t.input_exchange)
        .env("INDUCTION__TOPOLOGY__INBOX_QUEUE", &t.inbox_queue)
        .env("INDUCTION__TOPOLOGY__OUTCOME_EXCHANGE", &t.outcome_exchange)
        .env("INDUCTION__TOPOLOGY__PARKING_QUEUE", &t.parking_queue)
        .env(
            "INDUCTION__TOPOLOGY__UNROUTED_EXCHANGE",
            &t.unrouted_exchange,
        )
        .env("INDUCTION__TOPOLOGY__UNROUTED_QUEUE", &t.unrouted_queue)
        .env("INDUCTION__WORKER__SHUTDOWN_TIMEOUT_SECONDS", "15")
        .env("INDUCTION__LOG__FORMAT", "json")
        .env("INDUCTION__LOG__FILTER", "debug")
        .env("INDUCTION__HTTP__ENABLED", "false")
        .stdin(std::process::Stdio::null());
    cmd
}

/// Every teacher's stored last outcome by TRN, as the worker reads it: the outbox row of the
/// teacher's version, or `teachers.last_outcome` where a release before ARCHITECTURE decision
/// 33 stored it and that row is missing.
pub async fn stored_last_outcomes(
    conn: &mut sqlx::PgConnection,
) -> std::collections::HashMap<String, induction_reconciler::messages::OutcomeMessage> {
    let rows: Vec<(String, Vec<u8>)> = sqlx::query_as(
        "select t.trn, coalesce(o.body, convert_to(t.last_outcome::text, 'UTF8'))
         from teachers t left join outbox o on o.trn = t.trn and o.version = t.version",
    )
    .fetch_all(conn)
    .await
    .expect("the teachers' last outcomes");
    rows.into_iter()
        .map(|(trn, body)| {
            let message = serde_json::from_slice(&body)
                .unwrap_or_else(|e| panic!("teacher {trn}'s last outcome does not parse: {e}"));
            (trn, message)
        })
        .collect()
}

/// Checks every teacher `ledger` knows against the stored last outcomes (by TRN): equal
/// reconciliations, or no outcome where the model gives `closed`; `label` names the run in a
/// failure. Returns how many it compared.
pub fn assert_matches(
    ledger: &induction_reconciler::domain::Ledger,
    stored: &std::collections::HashMap<String, induction_reconciler::messages::OutcomeMessage>,
    label: &str,
) -> usize {
    let mut compared = 0;
    for trn in ledger.teachers() {
        let expected = ledger.reconcile(trn);
        match stored.get(trn.as_str()) {
            Some(m) => assert_eq!(
                m.to_domain().unwrap().reconciliation,
                expected,
                "{label}: teacher {}",
                trn.as_str()
            ),
            None => assert_eq!(
                expected.status.as_str(),
                "closed",
                "{label}: teacher {}",
                trn.as_str()
            ),
        }
        compared += 1;
    }
    compared
}
