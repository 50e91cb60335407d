//! `bench --go-live`: the operator commands of going live, timed over the seeded teachers
//! (`--seed-teachers`, default 1,000,000 in this mode): `verify` and `resync` (time and peak
//! memory of each process) and the load rate of a migrated ECF1 backlog (`--backlog`) published
//! with `publish --origin migration` while the worker runs.

use std::process::Stdio;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use futures_lite::StreamExt;
use lapin::options::{BasicConsumeOptions, QueueDeclareOptions, QueueDeleteOptions};
use lapin::types::FieldTable;

use super::{FIRST_TRN, Rig, WORKER, common};

/// What one command cost.
struct Cost {
    seconds: f64,
    peak_rss_mib: f64,
    stdout: String,
}

/// Runs the worker binary's `args` on the rig, sampling its peak memory until it exits.
async fn timed(rig: &Rig, args: &[&str]) -> anyhow::Result<Cost> {
    let t = &rig.topology;
    let started = Instant::now();
    let mut child = tokio::process::Command::new(WORKER)
        .args(args)
        .env("DATABASE_URL", common::database_url(&rig.db_name))
        .env("AMQP_URL", common::app::amqp_url())
        .env("INDUCTION__TOPOLOGY__INPUT_EXCHANGE", &t.input_exchange)
        .env("INDUCTION__TOPOLOGY__INBOX_QUEUE", &t.inbox_queue)
        .env("INDUCTION__TOPOLOGY__OUTCOME_EXCHANGE", &t.outcome_exchange)
        .env("INDUCTION__TOPOLOGY__PARKING_QUEUE", &t.parking_queue)
        .env("INDUCTION__LOG__FILTER", "error")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .kill_on_drop(true)
        .spawn()
        .with_context(|| format!("cannot start {args:?}"))?;
    let pid = child.id().context("no pid")?;
    let mut stdout = child.stdout.take().context("no stdout")?;
    let reading = tokio::spawn(async move {
        let mut text = String::new();
        let _ = tokio::io::AsyncReadExt::read_to_string(&mut stdout, &mut text).await;
        text
    });
    let mut peak = 0usize;
    let status = loop {
        peak = peak.max(common::rss_kib(pid, "VmHWM:"));
        match tokio::time::timeout(Duration::from_millis(20), child.wait()).await {
            Ok(status) => break status?,
            Err(_) if started.elapsed() > Duration::from_secs(3_600) => {
                anyhow::bail!("{args:?} ran for over an hour")
            }
            Err(_) => {}
        }
    };
    let stdout = reading.await.unwrap_or_default();
    anyhow::ensure!(status.success(), "{args:?} failed: {stdout}");
    Ok(Cost {
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_mib: peak as f64 / 1024.0,
        stdout: stdout.trim().to_owned(),
    })
}

/// Times `verify`, `resync` and a migration load, and prints the figures.
pub async fn run(rig: &Rig, teachers: u32, backlog: usize) -> anyhow::Result<()> {
    let differences = std::env::temp_dir().join(format!("bench-{}-differences.txt", rig.id));
    let verify = timed(
        rig,
        &[
            "verify",
            "--differences",
            differences.to_str().unwrap_or("x"),
        ],
    )
    .await?;
    let _ = std::fs::remove_file(&differences);
    eprintln!(
        "verify: {} in {:.1} s, peak RSS {:.1} MiB",
        verify.stdout, verify.seconds, verify.peak_rss_mib
    );

    // A consumer of its own queue that counts what the resync sends, as fast as it comes.
    let queue = format!("bench-{}.resync", rig.id);
    rig.channel
        .queue_declare(
            queue.as_str().into(),
            QueueDeclareOptions::default(),
            FieldTable::default(),
        )
        .await?;
    let counting = rig.broker.channel().await?;
    let mut consumer = counting
        .basic_consume(
            queue.as_str().into(),
            "bench-resync".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await?;
    let received = Arc::new(AtomicU64::new(0));
    let count = received.clone();
    let counter = tokio::spawn(async move {
        while let Some(Ok(_)) = consumer.next().await {
            count.fetch_add(1, Ordering::Relaxed);
        }
    });
    let resync = timed(rig, &["resync", "--queue", &queue]).await?;
    let wait_until = Instant::now() + Duration::from_secs(120);
    while received.load(Ordering::Relaxed) < u64::from(teachers) && Instant::now() < wait_until {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    counter.abort();
    let _ = rig
        .channel
        .queue_delete(queue.as_str().into(), QueueDeleteOptions::default())
        .await;
    eprintln!(
        "resync: {} in {:.1} s ({:.0} outcomes per second), peak RSS {:.1} MiB; the consumer received {}",
        resync.stdout,
        resync.seconds,
        f64::from(teachers) / resync.seconds,
        resync.peak_rss_mib,
        received.load(Ordering::Relaxed)
    );

    // A migrated backlog about teachers beyond the seeded ones, loaded while the worker runs.
    let lines = common::ecf1::backlog(backlog, (backlog / 4) as u32, FIRST_TRN + teachers, 3);
    let file = std::env::temp_dir().join(format!("bench-{}-ecf1.jsonl", rig.id));
    let mut contents = Vec::new();
    for line in &lines.lines {
        contents.extend_from_slice(line);
        contents.push(b'\n');
    }
    std::fs::write(&file, contents)?;
    let inbox_before: i64 = sqlx::query_scalar("select count(*) from inbox")
        .fetch_one(rig.store.pool())
        .await?;
    let valid = (lines.lines.len() - lines.without_trn) as i64;
    let started = Instant::now();
    let load = timed(
        rig,
        &[
            "publish",
            "--origin",
            "migration",
            file.to_str().unwrap_or("x"),
        ],
    )
    .await?;
    let _ = std::fs::remove_file(&file);
    loop {
        let (inbox, pending): (i64, i64) = sqlx::query_as(
            "select (select count(*) from inbox), (select count(*) from outbox where published_at is null)",
        )
        .fetch_one(rig.store.pool())
        .await?;
        if inbox - inbox_before >= valid && pending == 0 {
            break;
        }
        anyhow::ensure!(
            started.elapsed() < Duration::from_secs(1_800),
            "the backlog did not drain"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let drained = started.elapsed().as_secs_f64();
    eprintln!(
        "migration: {} snapshots ({} TRN-less, parked) published in {:.1} s by `publish`; \
         all applied and their outcomes published {drained:.1} s after the start: {:.0} snapshots per second",
        lines.lines.len(),
        lines.without_trn,
        load.seconds,
        lines.lines.len() as f64 / drained
    );
    println!(
        "{}",
        serde_json::json!({
            "seeded_teachers": teachers,
            "verify_seconds": verify.seconds,
            "verify_peak_rss_mib": verify.peak_rss_mib,
            "resync_seconds": resync.seconds,
            "resync_peak_rss_mib": resync.peak_rss_mib,
            "migration_snapshots": lines.lines.len(),
            "migration_publish_seconds": load.seconds,
            "migration_drained_seconds": drained,
        })
    );
    Ok(())
}
