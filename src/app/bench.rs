//! `bench`: end-to-end throughput and latency of the worker against the running PostgreSQL and
//! RabbitMQ, next to the machine's raw limit for the same messages without a database.
//!
//! It makes a throwaway database and topology, starts the worker as a child process, publishes a
//! generated stream with confirms, and times every outcome a consumer of the outcome exchange
//! receives. Then it relays the same messages broker-to-broker with no database (publish with
//! confirms, consume, republish with confirms, acknowledge) and prints the worker's ratio to it.

use std::collections::HashMap;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_lite::StreamExt;
use lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, ExchangeDeclareOptions,
    ExchangeDeleteOptions, QueueBindOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use lapin::types::FieldTable;
use secrecy::{ExposeSecret, SecretString};
use serde_json::json;
use sqlx::{Connection, PgConnection};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::workload::{Generated, generate};
use crate::broker::{Broker, Publisher, declare_topology, json_properties, subscribe};
use crate::config::Settings;
use crate::store::Store;

/// What to measure (the `bench` command's options).
#[derive(Debug, Clone, clap::Args)]
pub struct BenchOptions {
    /// Messages in the full-speed run.
    #[arg(long, default_value_t = 20_000)]
    pub messages: usize,
    /// Distinct teachers the messages are about.
    #[arg(long, default_value_t = 5_000)]
    pub teachers: u32,
    /// Offered rate of the fixed-rate run, messages per second (0 skips it).
    #[arg(long, default_value_t = 1_000)]
    pub rate: u32,
    /// Messages in the fixed-rate run.
    #[arg(long, default_value_t = 10_000)]
    pub rate_messages: usize,
    /// Teachers already in the database before the run (the stream's are among them).
    #[arg(long, default_value_t = 0)]
    pub seed_teachers: u32,
    /// Skip the raw broker-only relay.
    #[arg(long)]
    pub no_raw: bool,
    /// Keep the throwaway database and queues.
    #[arg(long)]
    pub keep: bool,
}

/// Figures of one timed run.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct RunFigures {
    /// Messages published.
    pub published: usize,
    /// Outcomes received by the consumer.
    pub outcomes: usize,
    /// Seconds from the first publish to the last outcome.
    pub seconds: f64,
    /// Input messages per second over that time.
    pub messages_per_second: f64,
    /// Publish-to-outcome latency in milliseconds.
    pub latency_p50_ms: f64,
    /// 99th percentile.
    pub latency_p99_ms: f64,
    /// Maximum.
    pub latency_max_ms: f64,
}

fn with_database(url: &str, db: &str) -> String {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let server = base.rsplit_once('/').map_or(base, |(server, _)| server);
    match query {
        Some(q) => format!("{server}/{db}?{q}"),
        None => format!("{server}/{db}"),
    }
}

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

async fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    stream
        .write_all(format!("GET {path} HTTP/1.0\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.ok()?;
    response.split_whitespace().nth(1)?.parse().ok()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

fn peak_rss_kib(pid: u32) -> Option<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find(|l| l.starts_with("VmHWM:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// Runs the benchmark and prints a summary and one JSON line.
pub async fn bench(settings: &Settings, options: BenchOptions) -> anyhow::Result<()> {
    let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
    let db_name = format!("bench_{id}");
    let base_url = settings.database_url()?;
    let admin_url = with_database(base_url.expose_secret(), "postgres");
    let db_url = with_database(base_url.expose_secret(), &db_name);
    let mut admin = PgConnection::connect(&admin_url)
        .await
        .context("cannot connect to PostgreSQL as an administrator")?;
    sqlx::query(sqlx::AssertSqlSafe(format!(
        "create database \"{db_name}\""
    )))
    .execute(&mut admin)
    .await?;
    let store = Store::connect(
        &SecretString::from(db_url.clone()),
        4,
        Duration::from_secs(10),
    )
    .await?;
    store.migrate().await?;
    let first_trn = 3_000_000u32;
    if options.seed_teachers > 0 {
        let started = Instant::now();
        seed(&store, first_trn, options.seed_teachers).await?;
        eprintln!(
            "seeded {} teachers in {:.1}s",
            options.seed_teachers,
            started.elapsed().as_secs_f64()
        );
    }

    let prefix = format!("bench-{id}");
    let mut topology = settings.topology.clone();
    topology.input_exchange = format!("{prefix}.events");
    topology.inbox_queue = format!("{prefix}.inbox");
    topology.outcome_exchange = format!("{prefix}.outcomes");
    topology.parking_queue = format!("{prefix}.parked");
    topology.unrouted_exchange = format!("{prefix}.unrouted");
    topology.unrouted_queue = format!("{prefix}.unrouted");
    let broker = settings
        .connect_broker("induction-reconciler bench")
        .await?;
    let channel = broker.channel().await?;
    declare_topology(&channel, &topology).await?;
    // Every outcome, timed on arrival (collected below, once the worker runs).
    let mut outcomes = subscribe(
        &channel,
        &format!("{prefix}.capture"),
        &topology.outcome_exchange,
        "outcome.#",
    )
    .await?;
    let publisher = broker.publisher().await?;

    // The worker, as operators run it.
    let port = free_port()?;
    let mut worker = tokio::process::Command::new(std::env::current_exe()?)
        .args(["run", "--no-declare"])
        .env("DATABASE_URL", &db_url)
        .env("AMQP_URL", settings.amqp_url()?.expose_secret())
        .env(
            "INDUCTION__TOPOLOGY__INPUT_EXCHANGE",
            &topology.input_exchange,
        )
        .env("INDUCTION__TOPOLOGY__INBOX_QUEUE", &topology.inbox_queue)
        .env(
            "INDUCTION__TOPOLOGY__OUTCOME_EXCHANGE",
            &topology.outcome_exchange,
        )
        .env(
            "INDUCTION__TOPOLOGY__PARKING_QUEUE",
            &topology.parking_queue,
        )
        .env("INDUCTION__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("INDUCTION__SWEEP__ENABLED", "false")
        .env("INDUCTION__LOG__FILTER", "error")
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("cannot start the worker")?;
    let worker_pid = worker.id().context("the worker has a pid")?;
    let ready_by = Instant::now() + Duration::from_secs(60);
    while http_status(port, "/readyz").await != Some(200) {
        anyhow::ensure!(Instant::now() < ready_by, "the worker did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every outcome, timed on arrival, by the input that caused it.
    let arrivals: Arc<Mutex<Vec<(String, Instant)>>> = Arc::default();
    let sink = arrivals.clone();
    let collector = tokio::spawn(async move {
        while let Some(Ok(delivery)) = outcomes.next().await {
            let at = Instant::now();
            let cause = serde_json::from_slice::<serde_json::Value>(&delivery.data)
                .ok()
                .and_then(|v| v["caused_by"]["message_id"].as_str().map(str::to_owned))
                .unwrap_or_default();
            sink.lock().expect("not poisoned").push((cause, at));
        }
    });

    let full_stream = generate(options.messages, options.teachers, first_trn, 1);
    let full = timed_run(
        &store,
        &publisher,
        &topology.input_exchange,
        &full_stream,
        None,
        &arrivals,
    )
    .await?;
    let rated = if options.rate > 0 {
        let stream = generate(options.rate_messages, options.teachers, first_trn, 2);
        Some(
            timed_run(
                &store,
                &publisher,
                &topology.input_exchange,
                &stream,
                Some(options.rate),
                &arrivals,
            )
            .await?,
        )
    } else {
        None
    };
    let rss_kib = peak_rss_kib(worker_pid);
    if let Some(pid) = worker.id() {
        let _ = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status();
    }
    let _ = tokio::time::timeout(Duration::from_secs(60), worker.wait()).await;
    collector.abort();

    let raw = if options.no_raw {
        None
    } else {
        Some(
            raw_relay(&broker, &prefix, &full_stream)
                .await
                .context("the raw relay failed")?,
        )
    };

    if !options.keep {
        for queue in [
            &topology.inbox_queue,
            &topology.parking_queue,
            &topology.unrouted_queue,
        ] {
            let _ = channel
                .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
                .await;
        }
        for exchange in [
            &topology.input_exchange,
            &topology.outcome_exchange,
            &topology.unrouted_exchange,
        ] {
            let _ = channel
                .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
                .await;
        }
        store.pool().close().await;
        sqlx::query(sqlx::AssertSqlSafe(format!(
            "drop database \"{db_name}\" with (force)"
        )))
        .execute(&mut admin)
        .await?;
    }
    broker.close().await;

    let ratio = raw.as_ref().map(|r| full.messages_per_second / r);
    println!(
        "induction-reconciler bench: {} messages over {} teachers ({} already in the database)",
        options.messages, options.teachers, options.seed_teachers
    );
    println!(
        "  full speed : {:>8.0} msg/s end to end ({} published, {} outcomes, {:.2}s); latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms",
        full.messages_per_second,
        full.published,
        full.outcomes,
        full.seconds,
        full.latency_p50_ms,
        full.latency_p99_ms,
        full.latency_max_ms
    );
    if let Some(r) = &rated {
        println!(
            "  at {:>5}/s : latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} published, achieved {:.0} msg/s)",
            options.rate,
            r.latency_p50_ms,
            r.latency_p99_ms,
            r.latency_max_ms,
            r.published,
            r.messages_per_second
        );
    }
    if let Some(raw) = raw {
        println!(
            "  raw relay  : {:>8.0} msg/s (no database); worker/raw = {:.2}",
            raw,
            ratio.unwrap_or_default()
        );
    }
    if let Some(kib) = rss_kib {
        println!(
            "  worker peak resident memory: {:.1} MiB",
            kib as f64 / 1024.0
        );
    }
    println!(
        "{}",
        json!({
            "messages": options.messages, "teachers": options.teachers, "seeded_teachers": options.seed_teachers,
            "full_speed": full, "fixed_rate": rated.map(|r| json!({"offered_per_second": options.rate, "figures": r})),
            "raw_relay_messages_per_second": raw, "ratio_to_raw": ratio,
            "worker_peak_rss_mib": rss_kib.map(|k| k as f64 / 1024.0),
        })
    );
    Ok(())
}

/// Publishes a stream (at `rate` per second, or as fast as confirms allow) and waits until every
/// valid message is in the inbox, every outcome is published, and the consumer has them all.
async fn timed_run(
    store: &Store,
    publisher: &Publisher,
    exchange: &str,
    stream: &[Generated],
    rate: Option<u32>,
    arrivals: &Arc<Mutex<Vec<(String, Instant)>>>,
) -> anyhow::Result<RunFigures> {
    let inbox_before: i64 = sqlx::query_scalar("select count(*) from inbox")
        .fetch_one(store.pool())
        .await?;
    let outbox_before: i64 = sqlx::query_scalar("select count(*) from outbox")
        .fetch_one(store.pool())
        .await?;
    let arrived_before = arrivals.lock().expect("not poisoned").len();
    let mut published_at: HashMap<String, Instant> = HashMap::new();
    let mut unique_valid = std::collections::HashSet::new();
    let started = Instant::now();
    let mut pending = Vec::new();
    for (i, message) in stream.iter().enumerate() {
        if let Some(rate) = rate {
            let due = started + Duration::from_secs_f64(i as f64 / f64::from(rate));
            tokio::time::sleep_until(due.into()).await;
        }
        let id = serde_json::from_slice::<serde_json::Value>(&message.body)
            .ok()
            .and_then(|v| v["message_id"].as_str().map(str::to_owned))
            .unwrap_or_default();
        if message.valid {
            unique_valid.insert(id.clone());
        }
        published_at.entry(id.clone()).or_insert_with(Instant::now);
        let confirm = publisher
            .send(
                exchange,
                message.routing_key,
                &message.body,
                json_properties(&id, FieldTable::default()),
            )
            .await?;
        if rate.is_some() {
            // Confirms are awaited in the background so that pacing stays exact.
            pending.push(confirm);
            if pending.len() >= 64 {
                for c in pending.drain(..) {
                    c.wait().await?;
                }
            }
        } else {
            pending.push(confirm);
            if pending.len() >= 1000 {
                for c in pending.drain(..) {
                    c.wait().await?;
                }
            }
        }
    }
    for c in pending {
        c.wait().await?;
    }
    let target_inbox = inbox_before + unique_valid.len() as i64;
    let deadline = Instant::now() + Duration::from_secs(600);
    let outbox_total = loop {
        let inbox: i64 = sqlx::query_scalar("select count(*) from inbox")
            .fetch_one(store.pool())
            .await?;
        let pending: i64 =
            sqlx::query_scalar("select count(*) from outbox where published_at is null")
                .fetch_one(store.pool())
                .await?;
        if inbox >= target_inbox && pending == 0 {
            let total: i64 = sqlx::query_scalar("select count(*) from outbox")
                .fetch_one(store.pool())
                .await?;
            let arrived = arrivals.lock().expect("not poisoned").len();
            if (arrived - arrived_before) as i64 >= total - outbox_before {
                break total - outbox_before;
            }
        }
        anyhow::ensure!(
            Instant::now() < deadline,
            "the run did not complete within 10 minutes"
        );
        // Polling is only for noticing the end; the end time is the last outcome's arrival.
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let arrived: Vec<(String, Instant)> =
        arrivals.lock().expect("not poisoned")[arrived_before..].to_vec();
    let last = arrived
        .iter()
        .map(|(_, at)| *at)
        .max()
        .unwrap_or_else(Instant::now);
    let seconds = (last - started).as_secs_f64();
    let mut first_outcome: HashMap<&str, Instant> = HashMap::new();
    for (cause, at) in &arrived {
        first_outcome.entry(cause.as_str()).or_insert(*at);
    }
    let mut latencies: Vec<f64> = first_outcome
        .iter()
        .filter_map(|(cause, at)| {
            published_at
                .get(*cause)
                .map(|p| (*at - *p).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    Ok(RunFigures {
        published: stream.len(),
        outcomes: outbox_total as usize,
        seconds,
        messages_per_second: stream.len() as f64 / seconds,
        latency_p50_ms: percentile(&latencies, 50.0),
        latency_p99_ms: percentile(&latencies, 99.0),
        latency_max_ms: latencies.last().copied().unwrap_or_default(),
    })
}

/// The raw limit: the same messages published with confirms to a quorum queue, consumed,
/// republished with confirms, and acknowledged, with no database. Returns messages per second.
async fn raw_relay(broker: &Broker, prefix: &str, stream: &[Generated]) -> anyhow::Result<f64> {
    let channel = broker.channel().await?;
    let input = format!("{prefix}.raw-in");
    let output = format!("{prefix}.raw-out");
    let quorum = {
        let mut args = FieldTable::default();
        args.insert(
            "x-queue-type".into(),
            lapin::types::AMQPValue::LongString("quorum".into()),
        );
        args
    };
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    channel
        .queue_declare(input.as_str().into(), durable, quorum.clone())
        .await?;
    channel
        .queue_declare(output.as_str().into(), durable, quorum)
        .await?;
    channel
        .exchange_declare(
            output.as_str().into(),
            lapin::ExchangeKind::Fanout,
            ExchangeDeclareOptions {
                durable: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    channel
        .queue_bind(
            output.as_str().into(),
            output.as_str().into(),
            "".into(),
            QueueBindOptions::default(),
            FieldTable::default(),
        )
        .await?;

    let relay_channel = broker.channel().await?;
    relay_channel
        .basic_qos(600, BasicQosOptions::default())
        .await?;
    let republisher = broker.publisher().await?;
    let mut consumer = relay_channel
        .basic_consume(
            input.as_str().into(),
            "raw".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let total = stream.len();
    let exchange = output.clone();
    let (tx, mut rx) = tokio::sync::mpsc::channel(1024);
    // The republishing channel must outlive the last confirm: the acker keeps a handle on it.
    let keep_open = republisher.clone();
    let forwarder = tokio::spawn(async move {
        let mut forwarded = 0;
        while forwarded < total {
            let Some(Ok(delivery)) = consumer.next().await else {
                break;
            };
            let confirm = republisher
                .send(&exchange, "", &delivery.data, delivery.properties.clone())
                .await?;
            if tx.send((delivery.acker, confirm)).await.is_err() {
                break;
            }
            forwarded += 1;
        }
        Ok::<_, anyhow::Error>(())
    });
    let acker = tokio::spawn(async move {
        let _keep_open = keep_open;
        let mut done = 0;
        while let Some((acker, confirm)) = rx.recv().await {
            confirm.wait().await?;
            acker.ack(BasicAckOptions::default()).await?;
            done += 1;
            if done == total {
                break;
            }
        }
        Ok::<_, anyhow::Error>(Instant::now())
    });

    let publisher = broker.publisher().await?;
    let started = Instant::now();
    let mut pending = Vec::new();
    for message in stream {
        pending.push(
            publisher
                .send(
                    "",
                    &input,
                    &message.body,
                    json_properties("", FieldTable::default()),
                )
                .await?,
        );
        if pending.len() >= 1000 {
            for c in pending.drain(..) {
                c.wait().await?;
            }
        }
    }
    for c in pending {
        c.wait().await?;
    }
    let finished = acker.await??;
    forwarder.await??;
    let rate = total as f64 / (finished - started).as_secs_f64();
    let _ = channel
        .queue_delete(input.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = channel
        .queue_delete(output.as_str().into(), QueueDeleteOptions::default())
        .await;
    let _ = channel
        .exchange_delete(output.as_str().into(), ExchangeDeleteOptions::default())
        .await;
    Ok(rate)
}

/// Seeds `count` teachers, each with an open registration and a provisional outcome, with
/// set-based SQL (the same shape a bulk load of historic records would take).
async fn seed(store: &Store, first_trn: u32, count: u32) -> anyhow::Result<()> {
    sqlx::query(
        "insert into registrations (registration_id, trn, school_urn, started_on, finished_on, appropriate_body_id,
             training_programme, lead_provider_id, deleted, occurred_at, occurred_at_ns, message_id)
         select 'SEED-' || g, (($1 + g)::int)::text, 100000 + g % 899999, date '2024-09-01', null, 'AB-TSH-1',
             'provider_led', 'LP-AMBITION', false, timestamptz '2024-09-01 00:00:00+00', 0, gen_random_uuid()
         from generate_series(0, $2 - 1) as g",
    )
    .bind(first_trn as i32)
    .bind(count as i32)
    .execute(store.pool())
    .await?;
    sqlx::query(
        "insert into teachers (trn, version, status, provisional_since, overdue, last_outcome, updated_at)
         select r.trn, 1, 'provisional', timestamptz '2024-09-01 00:00:00+00', false,
           jsonb_build_object(
             'outcome_id', gen_random_uuid(), 'schema_version', 1, 'trn', r.trn, 'version', 1,
             'status', 'provisional', 'reason', 'awaiting_claim', 'discrepancies', '[]'::jsonb, 'overdue', false,
             'provisional_since', '2024-09-01T00:00:00Z',
             'resolved', jsonb_build_object('appropriate_body_id', 'AB-TSH-1', 'appropriate_body_source', 'school',
                 'training_programme', 'provider_led', 'training_programme_source', 'school', 'lead_provider_id', 'LP-AMBITION'),
             'school_registration', jsonb_build_object('registration_id', r.registration_id, 'school_urn', r.school_urn,
                 'started_on', '2024-09-01', 'finished_on', null, 'appropriate_body_id', 'AB-TSH-1',
                 'training_programme', 'provider_led', 'lead_provider_id', 'LP-AMBITION'),
             'induction_period', null, 'caused_by', null, 'correlation_id', null, 'decided_at', '2024-09-01T00:00:00Z'),
           now()
         from registrations r where r.registration_id like 'SEED-%'",
    )
    .execute(store.pool())
    .await?;
    sqlx::query("analyze").execute(store.pool()).await?;
    Ok(())
}
