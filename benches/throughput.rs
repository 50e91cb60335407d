//! The end-to-end benchmark: throughput and latency of the worker against the running PostgreSQL
//! and RabbitMQ, next to the machine's raw limit for the same messages without a database.
//!
//! It makes a throwaway database and topology, starts the worker binary as a child process,
//! publishes a generated stream with confirms, and times every outcome a consumer of the outcome
//! exchange receives. Then it relays the same messages broker-to-broker with no database
//! (publish with confirms, consume, republish with confirms, acknowledge) and prints the
//! worker's ratio to it. Run it with `deploy/dev bench [OPTIONS]` (`cargo bench --bench
//! throughput -- [OPTIONS]`); it prints a summary and one JSON line.

#[path = "../tests/common/mod.rs"]
mod common;

use std::collections::HashSet;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::Context;
use clap::Parser;
use common::workload::{Generated, generate, seed_registrations};
use figures::{AckFrames, Round, RunFigures, figures, report};
use futures_lite::StreamExt;
use induction_reconciler::broker::{
    Broker, Publisher, declare_topology, json_properties, subscribe,
};
use induction_reconciler::config::Topology;
use induction_reconciler::messages::{decode, peek};
use induction_reconciler::store::{BatchItem, Limits, Store};
use lapin::types::FieldTable;
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use time::format_description::well_known::Rfc3339;

#[path = "throughput/figures.rs"]
mod figures;
#[path = "throughput/go_live.rs"]
mod go_live;
#[path = "throughput/raw.rs"]
mod raw;

const WORKER: &str = env!("CARGO_BIN_EXE_induction-reconciler");
const FIRST_TRN: u32 = 3_000_000;

/// What to measure.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "throughput",
    about = "End-to-end throughput and latency of the worker"
)]
struct BenchOptions {
    /// Messages in the full-speed run.
    #[arg(long, default_value_t = 20_000)]
    messages: usize,
    /// Distinct teachers the messages are about.
    #[arg(long, default_value_t = 5_000)]
    teachers: u32,
    /// Offered rate of the fixed-rate run, messages per second (0 skips it).
    #[arg(long, default_value_t = 1_000)]
    rate: u32,
    /// Messages in the fixed-rate run.
    #[arg(long, default_value_t = 10_000)]
    rate_messages: usize,
    /// Teachers already in the database before the run (the stream's are among them).
    #[arg(long, default_value_t = 0)]
    seed_teachers: u32,
    /// Instead of the throughput runs, time `verify` and `resync` over the seeded teachers
    /// (1,000,000 unless --seed-teachers says otherwise) and the load of a migrated backlog.
    #[arg(long)]
    go_live: bool,
    /// Snapshots in the migrated backlog of --go-live.
    #[arg(long, default_value_t = 50_000)]
    backlog: usize,
    /// Worker processes on the same database and queues, as the replicas of a deployment.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    workers: u32,
    /// Skip the raw broker-only relay.
    #[arg(long)]
    no_raw: bool,
    /// Time the full-speed run as the drain of a backlog: publish the whole stream while no
    /// worker runs, then start the workers and time them from their start to the last outcome
    /// (and the raw relay likewise, from its start). Without it the stream is published while
    /// the worker consumes, and timed from the first publish.
    #[arg(long)]
    drain: bool,
    /// Rounds of the full-speed run and the raw relay, one after the other, each on a new
    /// database, topology and worker; the throughput and the ratio to the raw relay are then
    /// also given as the median of the rounds, which the drift of a shared machine moves less
    /// than it moves one pair. The fixed-rate run is made in the first round only.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..))]
    rounds: u32,
    /// Keep the throwaway database and queues.
    #[arg(long)]
    keep: bool,
    /// The worker binary to measure instead of this build's (say, an earlier commit's, copied
    /// aside), so that two builds can be alternated in the same hour with one target folder.
    /// Its migrations must be this build's.
    #[arg(long, value_name = "PATH")]
    worker: Option<std::path::PathBuf>,
    /// Passed by `cargo bench`; ignored.
    #[arg(long, hide = true)]
    bench: bool,
}

/// Every outcome received, with when, by the input message that caused it.
/// Each outcome's cause (the input's `message_id`), when it arrived, and when the worker decided
/// it (its `decided_at`, on this machine's clock, as an `Instant`).
type Arrivals = Arc<Mutex<Vec<(String, Instant, Option<Instant>)>>>;

fn main() -> anyhow::Result<()> {
    let options = BenchOptions::parse();
    if !options.bench {
        // `cargo test --all-targets` runs bench targets too; the benchmark is not a test.
        println!("the throughput benchmark runs with `deploy/dev bench` (cargo bench)");
        return Ok(());
    }
    induction_reconciler::telemetry::install_crypto_provider();
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(bench(options))
}

/// The throwaway database and topology, and the worker running on them.
struct Rig {
    id: String,
    db_name: String,
    store: Store,
    topology: Topology,
    broker: Broker,
    channel: lapin::Channel,
    publisher: Publisher,
    /// A connection of its own for the outcomes, as a consuming team has (not the one that
    /// publishes the stream).
    outcome_broker: Broker,
    /// The worker processes (`--workers`), each with its HTTP port (metrics).
    workers: Vec<(tokio::process::Child, u16)>,
}

async fn bench(mut options: BenchOptions) -> anyhow::Result<()> {
    if options.go_live {
        if options.seed_teachers == 0 {
            options.seed_teachers = 1_000_000;
        }
        let rig = Rig::start(&options).await?;
        let result = go_live::run(&rig, options.seed_teachers, options.backlog).await;
        rig.finish(options.keep).await;
        return result;
    }
    let mut rig = Rig::start(&options).await?;
    // Whether the runs succeed or not, the worker stops and the database and topology go.
    let measured = measure(&mut rig, &options, true).await;
    rig.finish(options.keep).await;
    let (full, rated, raw, mut rss_kib, ack_frames) = measured?;
    let mut rounds = vec![Round {
        messages_per_second: full.messages_per_second,
        raw,
    }];
    for round in 2..=options.rounds {
        let mut rig = Rig::start(&options).await?;
        let measured = measure(&mut rig, &options, false).await;
        rig.finish(options.keep).await;
        let (again, _, raw, rss, _) = measured?;
        eprintln!(
            "round {round} of {}: {:.0} msg/s{}",
            options.rounds,
            again.messages_per_second,
            raw.map(|r| format!(", raw relay {r:.0} msg/s"))
                .unwrap_or_default()
        );
        rounds.push(Round {
            messages_per_second: again.messages_per_second,
            raw,
        });
        rss_kib = rss_kib.max(rss);
    }
    report(
        &options,
        &full,
        rated.as_ref(),
        rss_kib,
        ack_frames,
        &rounds,
    );
    Ok(())
}

/// What one bench measures, in the order `report` prints it.
type Measured = (
    RunFigures,
    Option<RunFigures>,
    Option<f64>,
    Option<usize>,
    Option<AckFrames>,
);

/// The full-speed run, the fixed-rate run (in the `first` round), the worker's peak memory and
/// the raw relay.
async fn measure(rig: &mut Rig, options: &BenchOptions, first: bool) -> anyhow::Result<Measured> {
    let arrivals = rig.collect_outcomes().await?;
    let full_stream = generate(options.messages, options.teachers, FIRST_TRN, 1);
    let drain = options.drain.then_some(options);
    let full = rig.timed_run(&full_stream, None, &arrivals, drain).await?;
    let ack_frames = rig.ack_frames().await;
    let rated = match options.rate {
        0 => None,
        _ if !first => None,
        rate => {
            let stream = generate(options.rate_messages, options.teachers, FIRST_TRN, 2);
            Some(rig.timed_run(&stream, Some(rate), &arrivals, None).await?)
        }
    };
    // The largest worker's peak.
    let rss_kib = rig
        .worker_pids()
        .into_iter()
        .map(|pid| common::rss_kib(pid, "VmHWM:"))
        .max();
    let raw = match options.no_raw {
        true => None,
        false => Some(
            raw::relay(
                &rig.broker,
                &format!("bench-{}", rig.id),
                &full_stream,
                options.drain,
            )
            .await
            .context("the raw relay failed")?,
        ),
    };
    Ok((full, rated, raw, rss_kib, ack_frames))
}

impl Rig {
    async fn start(options: &BenchOptions) -> anyhow::Result<Self> {
        let id = uuid::Uuid::new_v4().simple().to_string()[..10].to_owned();
        let db_name = format!("bench_{id}");
        common::create_database(&db_name).await;
        let store = Store::connect(
            &SecretString::from(common::database_url(&db_name)),
            Limits::new(4, Duration::from_secs(10)),
        )
        .await?;
        store.migrate().await?;
        if options.seed_teachers > 0 {
            let started = Instant::now();
            seed(&store, FIRST_TRN, options.seed_teachers).await?;
            eprintln!(
                "seeded {} teachers in {:.1}s",
                options.seed_teachers,
                started.elapsed().as_secs_f64()
            );
        }
        let topology = common::prefixed_topology(&format!("bench-{id}"));
        let amqp_url = SecretString::from(common::app::amqp_url());
        let broker = Broker::connect(&amqp_url, "induction-reconciler bench").await?;
        let channel = broker.channel().await?;
        declare_topology(&channel, &topology).await?;
        let publisher = broker.publisher().await?;
        let outcome_broker =
            Broker::connect(&amqp_url, "induction-reconciler bench outcomes").await?;
        let binary = options
            .worker
            .clone()
            .unwrap_or_else(|| std::path::PathBuf::from(WORKER));
        // A worker that cannot start ends the bench; those already started stop with their
        // handles (`kill_on_drop`).
        // With `--drain` they start when the backlog is waiting (`Rig::timed_run`).
        let mut workers = Vec::new();
        if !options.drain {
            for _ in 0..options.workers {
                workers.push(start_worker(&binary, &db_name, &topology).await?);
            }
        }
        Ok(Self {
            id,
            db_name,
            store,
            topology,
            broker,
            channel,
            publisher,
            outcome_broker,
            workers,
        })
    }

    /// Subscribes to every outcome and times each on arrival.
    async fn collect_outcomes(&self) -> anyhow::Result<Arrivals> {
        let channel = self.outcome_broker.channel().await?;
        let mut outcomes = subscribe(
            &channel,
            &format!("bench-{}.capture", self.id),
            &self.topology.outcome_exchange,
            "outcome.#",
        )
        .await?;
        let arrivals: Arrivals = Arc::default();
        let sink = arrivals.clone();
        tokio::spawn(async move {
            while let Some(Ok(delivery)) = outcomes.next().await {
                let at = Instant::now();
                let body = serde_json::from_slice::<serde_json::Value>(&delivery.data).ok();
                let field = |path: [&str; 2]| {
                    body.as_ref()
                        .and_then(|v| v[path[0]][path[1]].as_str().map(str::to_owned))
                };
                let cause = field(["caused_by", "message_id"]).unwrap_or_default();
                // The worker and the bench share this machine's clock.
                let decided = body
                    .as_ref()
                    .and_then(|v| v["decided_at"].as_str())
                    .and_then(|d| time::OffsetDateTime::parse(d, &Rfc3339).ok())
                    .and_then(|d| {
                        let ago = time::OffsetDateTime::now_utc() - d;
                        at.checked_sub(Duration::try_from(ago).unwrap_or_default())
                    });
                sink.lock()
                    .expect("not poisoned")
                    .push((cause, at, decided));
            }
        });
        Ok(arrivals)
    }

    /// The worker processes' ids.
    fn worker_pids(&self) -> Vec<u32> {
        self.workers.iter().filter_map(|(w, _)| w.id()).collect()
    }

    /// Stops the workers and, unless `keep`, drops the database and the topology.
    async fn finish(mut self, keep: bool) {
        for pid in self.worker_pids() {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &pid.to_string()])
                .status();
        }
        for (worker, _) in &mut self.workers {
            if tokio::time::timeout(Duration::from_secs(60), worker.wait())
                .await
                .is_err()
            {
                let _ = worker.kill().await;
            }
        }
        if !keep {
            let t = &self.topology;
            let queues = [t.inbox_queue.as_str(), &t.parking_queue, &t.unrouted_queue];
            let exchanges = [
                t.input_exchange.as_str(),
                &t.outcome_exchange,
                &t.unrouted_exchange,
            ];
            common::remove_topology(&queues, &exchanges).await;
            self.store.pool().close().await;
            common::drop_database(&self.db_name).await;
        }
        self.outcome_broker.close().await;
        self.broker.close().await;
    }
}

/// The worker, as operators run it, on the rig's database and topology; once it is ready.
async fn start_worker(
    binary: &std::path::Path,
    db_name: &str,
    t: &Topology,
) -> anyhow::Result<(tokio::process::Child, u16)> {
    let port = common::free_port();
    let worker = tokio::process::Command::new(binary)
        .args(["run", "--no-declare"])
        .env("DATABASE_URL", common::database_url(db_name))
        .env("AMQP_URL", common::app::amqp_url())
        .env("INDUCTION__TOPOLOGY__INPUT_EXCHANGE", &t.input_exchange)
        .env("INDUCTION__TOPOLOGY__INBOX_QUEUE", &t.inbox_queue)
        .env("INDUCTION__TOPOLOGY__OUTCOME_EXCHANGE", &t.outcome_exchange)
        .env("INDUCTION__TOPOLOGY__PARKING_QUEUE", &t.parking_queue)
        .env("INDUCTION__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .env("INDUCTION__SWEEP__ENABLED", "false")
        // BENCH_WORKER_LOG (a log filter, such as `induction_reconciler=debug`) shows where the
        // worker's time goes; its log goes to the bench's standard error.
        .env(
            "INDUCTION__LOG__FILTER",
            std::env::var("BENCH_WORKER_LOG").unwrap_or_else(|_| "error".into()),
        )
        .stdin(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start the worker {}", binary.display()))?;
    let ready_by = Instant::now() + Duration::from_secs(60);
    while common::http_get(port, "/readyz")
        .await
        .map(|(status, _)| status)
        != Some(200)
    {
        anyhow::ensure!(Instant::now() < ready_by, "the worker did not become ready");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((worker, port))
}

impl Rig {
    /// The acknowledgement frames the workers have sent so far, from their metrics, summed:
    /// ranges and single ones (none from a worker older than the metric).
    async fn ack_frames(&self) -> Option<AckFrames> {
        let mut frames = AckFrames::default();
        for (_, port) in &self.workers {
            let (_, text) = common::http_get(*port, "/metrics").await?;
            let count = |kind: &str| {
                common::find_sample(
                    &text,
                    &format!(
                        "induction_reconciler_acknowledgements_sent_total{{kind=\"{kind}\"}} "
                    ),
                )
            };
            frames.ranges += count("range")?;
            frames.single += count("single")?;
        }
        Some(frames)
    }

    /// Publishes a stream (at `rate` per second, or as fast as confirms allow) and waits until
    /// every valid message is in the inbox, every outcome is published, and the consumer has them
    /// all; timed from the first publish. With `drain` (the options of `--drain`), the stream is
    /// published while no worker runs, then the workers start, and the run is timed from their
    /// start, which it includes.
    async fn timed_run(
        &mut self,
        stream: &[Generated],
        rate: Option<u32>,
        arrivals: &Arrivals,
        drain: Option<&BenchOptions>,
    ) -> anyhow::Result<RunFigures> {
        let inbox_before = self.count("select count(*) from inbox").await?;
        let outbox_before = self.count("select count(*) from outbox").await?;
        let arrived_before = arrivals.lock().expect("not poisoned").len();
        let (cpu_before, started, published_at) = match drain {
            None => {
                let cpu_before = common::cpu::Snapshot::take(&self.worker_pids());
                let started = Instant::now();
                let published_at = self.publish(stream, rate, started).await?;
                (cpu_before, started, published_at)
            }
            Some(options) => {
                anyhow::ensure!(self.workers.is_empty(), "a worker was already running");
                let published_at = self.publish(stream, None, Instant::now()).await?;
                let binary = options
                    .worker
                    .clone()
                    .unwrap_or_else(|| std::path::PathBuf::from(WORKER));
                // No worker yet: the broker's and the database's times from here on.
                let cpu_before = common::cpu::Snapshot::take(&[]);
                let started = Instant::now();
                for _ in 0..options.workers {
                    let worker = start_worker(&binary, &self.db_name, &self.topology).await?;
                    self.workers.push(worker);
                }
                (cpu_before, started, published_at)
            }
        };
        let unique_valid: HashSet<&str> = stream
            .iter()
            .zip(&published_at)
            .filter(|(m, _)| m.valid)
            .map(|(_, (id, _))| id.as_str())
            .collect();
        let target_inbox = inbox_before + unique_valid.len() as i64;
        let outcomes = self
            .wait_for_outcomes(target_inbox, outbox_before, arrivals, arrived_before)
            .await?;
        let cpu_after = common::cpu::Snapshot::take(&self.worker_pids());
        let arrived = arrivals.lock().expect("not poisoned")[arrived_before..].to_vec();
        let mut figures = figures(stream.len(), outcomes, started, &published_at, &arrived);
        figures.cpu = cpu_before.zip(cpu_after).map(|(b, a)| b.until(&a));
        Ok(figures)
    }

    /// Publishes the stream with confirms, each message when due at `rate` or at once; returns
    /// each message's id and when it was sent. Confirms are awaited in windows (small ones when
    /// paced, so that pacing stays exact).
    async fn publish(
        &self,
        stream: &[Generated],
        rate: Option<u32>,
        started: Instant,
    ) -> anyhow::Result<Vec<(String, Instant)>> {
        let window = if rate.is_some() { 64 } else { 1000 };
        let mut sent = Vec::with_capacity(stream.len());
        let mut pending = Vec::with_capacity(window);
        for (i, message) in stream.iter().enumerate() {
            if let Some(rate) = rate {
                let due = started + Duration::from_secs_f64(i as f64 / f64::from(rate));
                tokio::time::sleep_until(due.into()).await;
            }
            let id = peek(&message.body).message_id.unwrap_or_default();
            sent.push((id.clone(), Instant::now()));
            let properties = json_properties(&id, FieldTable::default());
            let exchange = &self.topology.input_exchange;
            let confirm =
                self.publisher
                    .send(exchange, message.routing_key, &message.body, properties);
            pending.push(confirm.await?);
            if pending.len() >= window {
                for confirm in pending.drain(..) {
                    confirm.wait().await?;
                }
            }
        }
        for confirm in pending {
            confirm.wait().await?;
        }
        Ok(sent)
    }

    /// Waits until the inbox holds `target_inbox` rows, the outbox is published and every
    /// outcome has arrived; returns how many outcomes the run caused.
    async fn wait_for_outcomes(
        &self,
        target_inbox: i64,
        outbox_before: i64,
        arrivals: &Arrivals,
        arrived_before: usize,
    ) -> anyhow::Result<usize> {
        let deadline = Instant::now() + Duration::from_secs(600);
        loop {
            let inbox = self.count("select count(*) from inbox").await?;
            let pending = self
                .count("select count(*) from outbox where published_at is null")
                .await?;
            if inbox >= target_inbox && pending == 0 {
                let caused = self.count("select count(*) from outbox").await? - outbox_before;
                let arrived = arrivals.lock().expect("not poisoned").len() - arrived_before;
                if arrived as i64 >= caused {
                    return Ok(caused as usize);
                }
            }
            anyhow::ensure!(
                Instant::now() < deadline,
                "the run did not complete within 10 minutes"
            );
            // Polling is only for noticing the end; the end time is the last outcome's arrival.
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
    }

    async fn count(&self, sql: &'static str) -> anyhow::Result<i64> {
        Ok(sqlx::query_scalar(sql).fetch_one(self.store.pool()).await?)
    }
}

/// Seeds `count` teachers, each with an open registration and a provisional outcome, through the
/// worker's own write path (`apply_batch`), then removes the inbox, history and outbox rows of
/// the seeding, so that the timed runs measure only their own messages.
async fn seed(store: &Store, first_trn: u32, count: u32) -> anyhow::Result<()> {
    let now = time::OffsetDateTime::now_utc();
    let bodies: Vec<Vec<u8>> = seed_registrations(first_trn, count).collect();
    for chunk in bodies.chunks(1000) {
        let inputs = chunk
            .iter()
            .map(|body| {
                decode(body, now).map_err(|r| anyhow::anyhow!("seed message: {}", r.detail))
            })
            .collect::<anyhow::Result<Vec<_>>>()?;
        let items: Vec<BatchItem<'_>> = inputs
            .iter()
            .zip(chunk)
            .map(|(input, body)| BatchItem {
                input,
                digest: Sha256::digest(body).into(),
                traceparent: None,
            })
            .collect();
        store.apply_batch(&items, now).await?;
    }
    // Keep only what a bulk load of historic records leaves: the records and each teacher's last
    // outcome, published (since ARCHITECTURE decision 33 that is the outbox row of the teacher's
    // version: before it, the outbox was emptied too). Seeded inbox rows in particular change the
    // planner's choices for the inbox statements (a sequential scan of a mid-sized inbox per
    // batch) and would make the figures incomparable with runs before 2026-12-01.
    for statement in [
        "truncate history, inbox",
        "update outbox set published_at = now(), lease_until = null where published_at is null",
        // The marks' dead rows, which the first claims would otherwise walk.
        "vacuum outbox",
    ] {
        sqlx::raw_sql(statement).execute(store.pool()).await?;
    }
    sqlx::query("analyze").execute(store.pool()).await?;
    // Write the seeding's dirty pages out now. Without it the checkpointer, paced over minutes,
    // is still writing a million teachers' pages while the timed run commits, and the run
    // measures that writeback as well as its own messages (docs/PERFORMANCE.md, fifteenth round).
    sqlx::query("checkpoint").execute(store.pool()).await?;
    Ok(())
}
