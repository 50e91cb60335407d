//! The benchmark's figures: latency percentiles and throughput of a run, and the printed
//! summary and JSON line.

use std::collections::HashMap;
use std::time::Instant;

use serde_json::json;

use super::BenchOptions;
use crate::common::cpu::CpuSplit;

/// Acknowledgement frames the workers sent for the full-speed run's deliveries (its metric
/// `induction_reconciler_acknowledgements_sent_total`).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct AckFrames {
    /// `basic.ack` frames with `multiple`, each for a run of deliveries.
    pub ranges: f64,
    /// Frames for one delivery each.
    pub single: f64,
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
    /// Where the latency goes: publish to the worker's decision (`decided_at`: consumed,
    /// applied and about to commit), median and 99th percentile, in milliseconds.
    pub to_decision_p50_ms: f64,
    /// 99th percentile.
    pub to_decision_p99_ms: f64,
    /// The worker's decision to the outcome's arrival (commit, relay, broker), median.
    pub to_arrival_p50_ms: f64,
    /// 99th percentile.
    pub to_arrival_p99_ms: f64,
    /// The slowest message, to tell a spike's kind: where its time went, and when it was
    /// published (to find it in the worker's debug log).
    pub slowest: Option<Slowest>,
    /// CPU by process from the first publish until the bench saw the end (up to 250 ms after
    /// the last outcome), from `/proc`; none where that cannot be read.
    pub cpu: Option<CpuSplit>,
}

/// The run's slowest message (its first outcome's latency is the run's maximum).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Slowest {
    /// Publish to the worker's decision, in milliseconds (none for an outcome without one).
    pub to_decision_ms: Option<f64>,
    /// The decision to the outcome's arrival.
    pub to_arrival_ms: Option<f64>,
    /// When it was published, by this host's clock (RFC 3339, to the microsecond).
    pub published_at: String,
}

/// The figures of a run: the end is the last outcome's arrival; a message's latency runs from
/// its first publish to the first outcome it caused.
pub fn figures(
    published: usize,
    outcomes: usize,
    started: Instant,
    published_at: &[(String, Instant)],
    arrived: &[(String, Instant, Option<Instant>)],
) -> RunFigures {
    let last = arrived
        .iter()
        .map(|(_, at, _)| *at)
        .max()
        .unwrap_or_else(Instant::now);
    let seconds = (last - started).as_secs_f64();
    let mut first_publish: HashMap<&str, Instant> = HashMap::new();
    for (id, at) in published_at {
        first_publish.entry(id.as_str()).or_insert(*at);
    }
    let mut first_outcome: HashMap<&str, (Instant, Option<Instant>)> = HashMap::new();
    for (cause, at, decided) in arrived {
        first_outcome
            .entry(cause.as_str())
            .or_insert((*at, *decided));
    }
    let ms = |from: Instant, to: Instant| to.saturating_duration_since(from).as_secs_f64() * 1000.0;
    let mut latencies = Vec::new();
    let mut to_decision = Vec::new();
    let mut to_arrival = Vec::new();
    let mut slowest: Option<(f64, Instant, Instant, Option<Instant>)> = None;
    for (cause, (at, decided)) in &first_outcome {
        let Some(sent) = first_publish.get(cause) else {
            continue;
        };
        let latency = ms(*sent, *at);
        latencies.push(latency);
        if slowest.is_none_or(|(max, ..)| latency > max) {
            slowest = Some((latency, *sent, *at, *decided));
        }
        if let Some(decided) = decided {
            to_decision.push(ms(*sent, *decided));
            to_arrival.push(ms(*decided, *at));
        }
    }
    let slowest = slowest.map(|(_, sent, at, decided)| Slowest {
        to_decision_ms: decided.map(|decided| ms(sent, decided)),
        to_arrival_ms: decided.map(|decided| ms(decided, at)),
        published_at: wall_clock(sent),
    });
    for series in [&mut latencies, &mut to_decision, &mut to_arrival] {
        series.sort_by(f64::total_cmp);
    }
    RunFigures {
        published,
        outcomes,
        seconds,
        messages_per_second: published as f64 / seconds,
        latency_p50_ms: percentile(&latencies, 50.0),
        latency_p99_ms: percentile(&latencies, 99.0),
        latency_max_ms: latencies.last().copied().unwrap_or_default(),
        to_decision_p50_ms: percentile(&to_decision, 50.0),
        to_decision_p99_ms: percentile(&to_decision, 99.0),
        to_arrival_p50_ms: percentile(&to_arrival, 50.0),
        to_arrival_p99_ms: percentile(&to_arrival, 99.0),
        slowest,
        cpu: None,
    }
}

/// `at` by the wall clock, as the worker's log prints it.
fn wall_clock(at: Instant) -> String {
    let ago =
        time::Duration::try_from(Instant::now().saturating_duration_since(at)).unwrap_or_default();
    let format = time::macros::format_description!(
        "[year]-[month]-[day]T[hour]:[minute]:[second].[subsecond digits:6]Z"
    );
    (time::OffsetDateTime::now_utc() - ago)
        .format(&format)
        .unwrap_or_default()
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// One round of `--rounds`: the full-speed run's throughput and the raw relay's after it.
#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct Round {
    pub messages_per_second: f64,
    #[serde(rename = "raw_relay_messages_per_second")]
    pub raw: Option<f64>,
}

impl Round {
    fn ratio(&self) -> Option<f64> {
        self.raw.map(|raw| self.messages_per_second / raw)
    }
}

/// The median of `values` (the mean of the middle two of an even count); `None` if empty.
fn median(values: &[f64]) -> Option<f64> {
    let mut values = values.to_vec();
    values.sort_by(f64::total_cmp);
    let n = values.len();
    match n {
        0 => None,
        _ if n % 2 == 1 => Some(values[n / 2]),
        _ => Some((values[n / 2 - 1] + values[n / 2]) / 2.0),
    }
}

/// Prints the summary and the JSON line.
pub fn report(
    options: &BenchOptions,
    full: &RunFigures,
    rated: Option<&RunFigures>,
    rss_kib: Option<usize>,
    ack_frames: Option<AckFrames>,
    rounds: &[Round],
) {
    // The first round is `full`'s, with the raw relay after it.
    let raw = rounds.first().and_then(|r| r.raw);
    let ratio = rounds.first().and_then(Round::ratio);
    println!(
        "induction-reconciler bench: {} messages over {} teachers ({} already in the database){}",
        options.messages,
        options.teachers,
        options.seed_teachers,
        match options.workers {
            1 => String::new(),
            n => format!(", {n} workers"),
        }
    );
    if options.drain {
        // Every message waited in the queue before the worker started: no latency to speak of.
        println!(
            "  drain      : {:>8.0} msg/s from the worker's start ({} waiting, {} outcomes, {:.2}s)",
            full.messages_per_second, full.published, full.outcomes, full.seconds
        );
    } else {
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
    }
    if let Some(cpu) = &full.cpu {
        let per_message = |seconds: f64| seconds * 1e6 / full.published.max(1) as f64;
        println!(
            "               CPU a message: PostgreSQL {:.0} µs, RabbitMQ {:.0} µs, worker {:.0} µs, bench {:.0} µs; machine idle {:.0}%",
            per_message(cpu.postgres_seconds),
            per_message(cpu.rabbitmq_seconds),
            per_message(cpu.worker_seconds),
            per_message(cpu.bench_seconds),
            cpu.machine_idle_share * 100.0
        );
    }
    if let Some(r) = rated {
        println!(
            "  at {:>5}/s : latency p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms ({} published, achieved {:.0} msg/s)",
            options.rate,
            r.latency_p50_ms,
            r.latency_p99_ms,
            r.latency_max_ms,
            r.published,
            r.messages_per_second
        );
        println!(
            "               publish to decision p50 {:.1} ms, p99 {:.1} ms; decision to arrival p50 {:.1} ms, p99 {:.1} ms",
            r.to_decision_p50_ms, r.to_decision_p99_ms, r.to_arrival_p50_ms, r.to_arrival_p99_ms
        );
        if let Some(slowest) = &r.slowest {
            let split = |ms: Option<f64>| ms.map_or("-".to_owned(), |ms| format!("{ms:.1} ms"));
            println!(
                "               slowest: published {}, to decision {}, to arrival {}",
                slowest.published_at,
                split(slowest.to_decision_ms),
                split(slowest.to_arrival_ms)
            );
        }
    }
    if let Some(raw) = raw {
        println!(
            "  raw relay  : {:>8.0} msg/s (no database); worker/raw = {:.2}",
            raw,
            ratio.unwrap_or_default()
        );
    }
    let speeds: Vec<f64> = rounds.iter().map(|r| r.messages_per_second).collect();
    let ratios: Vec<f64> = rounds.iter().filter_map(Round::ratio).collect();
    let median_speed = median(&speeds);
    let median_ratio = median(&ratios);
    if rounds.len() > 1 {
        let list = |values: &[f64], digits: usize| {
            values
                .iter()
                .map(|v| format!("{v:.digits$}"))
                .collect::<Vec<_>>()
                .join(" / ")
        };
        println!(
            "  {} rounds  : full speed {} msg/s, median {:.0}",
            rounds.len(),
            list(&speeds, 0),
            median_speed.unwrap_or_default()
        );
        if !ratios.is_empty() {
            println!(
                "               worker/raw {}, median {:.2}",
                list(&ratios, 2),
                median_ratio.unwrap_or_default()
            );
        }
    }
    if let Some(frames) = ack_frames {
        println!(
            "  acknowledgements after the full-speed run: {:.0} range and {:.0} single frames ({:.1} deliveries a frame)",
            frames.ranges,
            frames.single,
            options.messages as f64 / (frames.ranges + frames.single).max(1.0)
        );
    }
    if let Some(kib) = rss_kib {
        println!(
            "  {} peak resident memory: {:.1} MiB",
            if options.workers > 1 {
                "the largest worker's"
            } else {
                "worker"
            },
            kib as f64 / 1024.0
        );
    }
    println!(
        "{}",
        json!({
            "messages": options.messages, "teachers": options.teachers, "seeded_teachers": options.seed_teachers,
            "workers": options.workers, "drain": options.drain,
            "full_speed": full, "fixed_rate": rated.map(|r| json!({"offered_per_second": options.rate, "figures": r})),
            "raw_relay_messages_per_second": raw, "ratio_to_raw": ratio,
            "worker_peak_rss_mib": rss_kib.map(|k| k as f64 / 1024.0),
            "ack_frames": ack_frames,
            "rounds": rounds,
            "median_messages_per_second": median_speed, "median_ratio_to_raw": median_ratio,
        })
    );
}
