//! The generated workload of the benchmark and the reliability suite is what they say it is: the
//! documented mix of invalid messages and duplicates, judged by the real decoder, and the same
//! stream for the same seed. And their clean-up leaves nothing behind on the shared broker, where
//! a stray queue would hold a run's messages and a stray worker would take the next run's. And the
//! benchmark's count of CPU by process agrees with what a process says it used.

mod common;

use common::app::amqp_url;
use common::workload::generate;
use induction_reconciler::broker::Broker;
use induction_reconciler::messages::decode;
use lapin::options::{ExchangeDeclareOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use secrecy::SecretString;
use time::OffsetDateTime;

#[test]
fn the_mix_is_as_documented() {
    let stream = generate(20_000, 3_000, 1_000_000, 7);
    let now = OffsetDateTime::now_utc();
    let invalid = stream.iter().filter(|m| !m.valid).count();
    let duplicates = stream.iter().filter(|m| m.duplicate).count();
    assert!(
        (300..=500).contains(&invalid),
        "about 2% invalid: {invalid}"
    );
    assert!(
        (700..=1300).contains(&duplicates),
        "about 5% duplicates: {duplicates}"
    );
    for m in &stream {
        assert_eq!(
            decode(&m.body, now).is_ok(),
            m.valid,
            "{}",
            String::from_utf8_lossy(&m.body)
        );
    }
    let again = generate(20_000, 3_000, 1_000_000, 7);
    assert!(
        stream.iter().zip(&again).all(|(a, b)| a.body == b.body),
        "deterministic"
    );
}

#[tokio::test]
async fn the_clean_up_removes_the_rest_of_a_topology_when_the_broker_refuses_one_delete() {
    let url = SecretString::from(amqp_url());
    let prefix = format!("it-clean-up-{}", uuid::Uuid::new_v4().simple());
    let (locked, queue, exchange) = (
        format!("{prefix}.locked"),
        format!("{prefix}.queue"),
        format!("{prefix}.events"),
    );
    // Another connection holds `locked` exclusively: the broker refuses to delete it
    // (RESOURCE_LOCKED) and closes the channel that asked. The queue goes with that connection.
    let holder = Broker::connect(&url, "clean-up test holder").await.unwrap();
    let holding = holder.channel().await.unwrap();
    let exclusive = QueueDeclareOptions {
        exclusive: true,
        ..Default::default()
    };
    let declaring = holding.queue_declare(locked.as_str().into(), exclusive, FieldTable::default());
    declaring.await.unwrap();
    // The others would expire unused within a minute if this test failed before deleting them.
    let mut expiring = FieldTable::default();
    expiring.insert("x-expires".into(), AMQPValue::LongInt(60_000));
    let durable = QueueDeclareOptions {
        durable: true,
        ..Default::default()
    };
    let declaring = holding.queue_declare(queue.as_str().into(), durable, expiring);
    declaring.await.unwrap();
    let kind = lapin::ExchangeKind::Topic;
    let options = ExchangeDeclareOptions::default();
    let declaring = holding.exchange_declare(
        exchange.as_str().into(),
        kind,
        options,
        FieldTable::default(),
    );
    declaring.await.unwrap();

    // The refused delete comes first, as a failed delete did in a benchmark that left its queues.
    let left = common::remove_topology(&[&locked, &queue], &[&exchange]).await;

    let looking = Broker::connect(&url, "clean-up test").await.unwrap();
    let queue_exists = common::exists(&looking, &queue, true).await;
    let exchange_exists = common::exists(&looking, &exchange, false).await;
    looking.close().await;
    holder.close().await;
    assert_eq!(
        left,
        [locked],
        "the refused delete is reported, and only that one"
    );
    assert!(!queue_exists, "the queue after the refused one is deleted");
    assert!(!exchange_exists, "the exchange is deleted");
}

#[tokio::test]
async fn the_cpu_count_gives_a_process_the_time_it_used_and_finds_postgresql() {
    use sqlx::Connection;
    use std::io::Write;
    // A shell that waits for a line, burns CPU, then says what it used (`times`: user and system
    // seconds). It is counted as the worker, from before its loop until it has ended (a zombie
    // still has its times), then reaped.
    let mut shell = std::process::Command::new("bash")
        .args([
            "-c",
            "read -r _; i=0; while ((i < 400000)); do ((i++)); done; times",
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .expect("bash");
    let pid = shell.id();
    let before = common::cpu::Snapshot::take(&[pid]).expect("/proc is readable");
    let mut admin = sqlx::PgConnection::connect(&common::admin_url())
        .await
        .unwrap();
    let counted: i64 = sqlx::query_scalar("select count(*) from generate_series(1, 3000000)")
        .fetch_one(&mut admin)
        .await
        .unwrap();
    assert_eq!(counted, 3_000_000);
    writeln!(shell.stdin.take().unwrap()).unwrap();
    let ended_by = std::time::Instant::now() + std::time::Duration::from_secs(60);
    while !std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .unwrap()
        .contains(") Z ")
    {
        assert!(
            std::time::Instant::now() < ended_by,
            "the shell's loop ended"
        );
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    let after = common::cpu::Snapshot::take(&[pid]).unwrap();
    let output = shell.wait_with_output().unwrap();
    admin.close().await.unwrap();
    let split = before.until(&after);

    // "0m0.412s 0m0.004s": the shell's own user and system time.
    let said = String::from_utf8(output.stdout).unwrap();
    let seconds = |field: &str| {
        let (minutes, rest) = field.split_once('m').unwrap();
        minutes.parse::<f64>().unwrap() * 60.0 + rest.trim_end_matches('s').parse::<f64>().unwrap()
    };
    let used: f64 = said
        .lines()
        .next()
        .unwrap()
        .split_whitespace()
        .map(seconds)
        .sum();
    assert!(used > 0.2, "the loop used some CPU: {said}");
    assert!(
        (split.worker_seconds - used).abs() <= 0.05,
        "counted {split:?}; the shell said {used} s"
    );
    // Counting three million rows takes PostgreSQL well over 50 ms of CPU.
    assert!(split.postgres_seconds >= 0.05, "{split:?}");
    assert!((0.0..=1.0).contains(&split.machine_idle_share), "{split:?}");
}
