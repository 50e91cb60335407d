//! The benchmark's figures: latency percentiles and throughput of a run, and the printed
//! summary and JSON line.

use std::collections::HashMap;
use std::time::Instant;

use serde_json::json;

use super::BenchOptions;

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

/// The figures of a run: the end is the last outcome's arrival; a message's latency runs from
/// its first publish to the first outcome it caused.
pub fn figures(
    published: usize,
    outcomes: usize,
    started: Instant,
    published_at: &[(String, Instant)],
    arrived: &[(String, Instant)],
) -> RunFigures {
    let last = arrived
        .iter()
        .map(|(_, at)| *at)
        .max()
        .unwrap_or_else(Instant::now);
    let seconds = (last - started).as_secs_f64();
    let mut first_publish: HashMap<&str, Instant> = HashMap::new();
    for (id, at) in published_at {
        first_publish.entry(id.as_str()).or_insert(*at);
    }
    let mut first_outcome: HashMap<&str, Instant> = HashMap::new();
    for (cause, at) in arrived {
        first_outcome.entry(cause.as_str()).or_insert(*at);
    }
    let mut latencies: Vec<f64> = first_outcome
        .iter()
        .filter_map(|(cause, at)| {
            let sent = first_publish.get(cause)?;
            Some((*at - *sent).as_secs_f64() * 1000.0)
        })
        .collect();
    latencies.sort_by(f64::total_cmp);
    RunFigures {
        published,
        outcomes,
        seconds,
        messages_per_second: published as f64 / seconds,
        latency_p50_ms: percentile(&latencies, 50.0),
        latency_p99_ms: percentile(&latencies, 99.0),
        latency_max_ms: latencies.last().copied().unwrap_or_default(),
    }
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((p / 100.0) * (sorted.len() as f64 - 1.0)).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Prints the summary and the JSON line.
pub fn report(
    options: &BenchOptions,
    full: &RunFigures,
    rated: Option<&RunFigures>,
    raw: Option<f64>,
    rss_kib: Option<usize>,
) {
    let ratio = raw.map(|r| full.messages_per_second / r);
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
}
