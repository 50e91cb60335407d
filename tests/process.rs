//! The binary as operators run it: `run` stopped by SIGTERM under load, `publish` and `watch`,
//! and `migrate`. Each test has its own database and topology.

mod common;

use std::process::{Child, Stdio};
use std::time::Duration;

use common::app::{PATIENCE, TestApp};
use common::{bytes, claim, registration, set};
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use serde_json::json;

use common::cli as command;

fn wait_with_timeout(child: &mut Child, limit: Duration) -> std::process::ExitStatus {
    let deadline = std::time::Instant::now() + limit;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if std::time::Instant::now() > deadline {
            child.kill().ok();
            panic!("the process did not exit within {limit:?}");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_under_load_finishes_in_flight_work_and_exits_zero() {
    let mut app = TestApp::prepare(|_| {}).await;
    let mut worker = Running(
        command(&app.settings, &["run"])
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Read the logs as they come, so that a full pipe never blocks the worker.
    let mut stderr = worker.0.stderr.take().unwrap();
    let log_reader = std::thread::spawn(move || {
        let mut logs = String::new();
        std::io::Read::read_to_string(&mut stderr, &mut logs).unwrap();
        logs
    });
    let total = 400u64;
    for n in 0..total {
        let trn = format!("{}", 3_000_000 + n % 97);
        let m = if n % 2 == 0 {
            registration(n, &format!("r{n}"), &trn)
        } else {
            claim(n, &format!("ip{n}"), &trn)
        };
        app.publish(&m).await;
    }
    // Mid-burst: some messages are done, others are in flight or queued.
    app.wait_for_inbox(50).await;
    let pid = worker.0.id() as i32;
    assert_eq!(unsafe { libc_kill(pid, 15) }, 0);
    let status = tokio::task::spawn_blocking(move || {
        let status = wait_with_timeout(&mut worker.0, PATIENCE);
        (status, log_reader.join().unwrap())
    })
    .await
    .unwrap();
    let (status, logs) = status;
    assert_eq!(status.code(), Some(0), "exit status; logs:\n{logs}");
    assert!(
        logs.contains("shutdown requested") && logs.contains("worker stopped"),
        "{logs}"
    );

    // Everything committed was published before exit.
    let pending: i64 = sqlx::query_scalar("select count(*) from outbox where published_at is null")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    assert_eq!(pending, 0, "outcomes left unpublished at exit");
    // Nothing lost: each message is either processed (in the inbox) or back in the queue.
    let processed: i64 = sqlx::query_scalar("select count(*) from inbox")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    let channel = lapin::Connection::connect(&common::app::amqp_url(), Default::default())
        .await
        .unwrap()
        .create_channel()
        .await
        .unwrap();
    let queue = channel
        .queue_declare(
            app.settings.topology.inbox_queue.as_str().into(),
            QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    assert_eq!(
        processed as u64 + u64::from(queue.message_count()),
        total,
        "processed {processed}, queued {}",
        queue.message_count()
    );
    // Every processed message's outcome reached the consumer.
    let published: i64 = sqlx::query_scalar("select count(*) from outbox")
        .fetch_one(app.store.pool())
        .await
        .unwrap();
    let received = app.outcomes_until_quiet(Duration::from_millis(500)).await;
    assert_eq!(received.len() as i64, published);

    // Logs carry no TRN and no password.
    // A TRN counts as leaked when it stands as a number of its own (not inside a longer run of
    // digits, such as a timestamp's nanoseconds).
    let numbers: std::collections::HashSet<&str> = logs
        .split(|c: char| !c.is_ascii_digit())
        .filter(|token| token.len() == 7)
        .collect();
    for n in 0..97 {
        let trn = format!("{}", 3_000_000 + n);
        assert!(
            !numbers.contains(trn.as_str()),
            "TRN {trn} appears in the logs: {}",
            logs.lines().find(|l| l.contains(&trn)).unwrap_or_default()
        );
    }
    assert!(!logs.contains("guest:guest"));
    // A restarted worker finishes the rest.
    app.start_worker().await;
    app.wait_for_inbox(total as i64).await;
    app.teardown().await;
}

unsafe extern "C" {
    #[link_name = "kill"]
    fn libc_kill(pid: i32, signal: i32) -> i32;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn publish_and_watch_show_a_newcomer_the_outcomes() {
    let mut app = TestApp::spawn().await;
    let mut watch = Running(
        command(&app.settings, &["watch", "--count", "2"])
            .env("INDUCTION__LOG__FORMAT", "compact")
            .env("INDUCTION__LOG__FILTER", "info")
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // Wait until watch says its queue is bound.
    let stderr = watch.0.stderr.take().unwrap();
    tokio::task::spawn_blocking(move || {
        let mut lines = std::io::BufRead::lines(std::io::BufReader::new(stderr));
        assert!(lines.any(|l| l.unwrap().contains("watching outcomes")));
    })
    .await
    .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("messages.jsonl");
    let log = [
        bytes(&registration(1, "r1", "1000001")),
        bytes(&set(
            claim(2, "ip1", "1000001"),
            "payload.appropriate_body_id",
            json!("AB-X"),
        )),
    ]
    .join(&b'\n');
    std::fs::write(&file, log).unwrap();
    let output = command(&app.settings, &["publish", file.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let summary = String::from_utf8_lossy(&output.stdout);
    assert!(
        summary.trim().starts_with("published 2 messages in "),
        "{summary}"
    );
    let out = tokio::task::spawn_blocking(move || {
        let status = wait_with_timeout(&mut watch.0, PATIENCE);
        let mut text = String::new();
        std::io::Read::read_to_string(watch.0.stdout.as_mut().unwrap(), &mut text).unwrap();
        (status, text)
    })
    .await
    .unwrap();
    assert!(out.0.success());
    // The two may be processed in either order; the versions and the final status may not vary.
    let outcomes: Vec<serde_json::Value> = out
        .1
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let versions: Vec<u64> = outcomes
        .iter()
        .map(|o| o["version"].as_u64().unwrap())
        .collect();
    assert_eq!(versions, [1, 2]);
    assert_eq!(outcomes[1]["status"], "conflict");
    app.next_outcome().await;
    app.teardown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_is_idempotent_and_run_reports_a_bad_setting() {
    let app = TestApp::prepare(|_| {}).await;
    for _ in 0..2 {
        let output = command(&app.settings, &["migrate"]).output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&output.stdout).trim(),
            "migrations applied"
        );
    }
    let output = command(&app.settings, &["run"])
        .env("INDUCTION__AMQP__CONCURRENCY", "0")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(1));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("amqp.concurrency must be at least 1")
    );
    app.teardown().await;
}

/// A consumer that fails for good (here its queue does not exist and the worker may not declare
/// it) ends the process with the error, even with the health endpoint serving: a process that
/// answers `/livez` with nothing consuming is an outage nobody sees.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_consumer_that_fails_for_good_ends_the_process() {
    let app = TestApp::prepare(|_| {}).await;
    let port = common::free_port();
    let mut child = command(&app.settings, &["run"])
        .env("INDUCTION__AMQP__DECLARE_TOPOLOGY", "false")
        .env(
            "INDUCTION__TOPOLOGY__INBOX_QUEUE",
            format!("{}.missing", app.settings.topology.inbox_queue),
        )
        .env("INDUCTION__HTTP__ENABLED", "true")
        .env("INDUCTION__HTTP__LISTEN", format!("127.0.0.1:{port}"))
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let status = wait_with_timeout(&mut child, Duration::from_secs(60));
    assert_eq!(status.code(), Some(1));
    let mut stderr = String::new();
    std::io::Read::read_to_string(child.stderr.as_mut().unwrap(), &mut stderr).unwrap();
    assert!(stderr.contains("cannot consume"), "{stderr}");
    app.teardown().await;
}

/// A worker (or `watch`) process that is killed when the test ends, however it ends: a stray
/// worker on the shared broker would consume the next run's messages, and declare the queues
/// its failed test's clean-up deleted.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Ready and unacknowledged messages of a queue on the local broker, from `rabbitmqctl`.
fn queue_counts(queue: &str) -> (u64, u64) {
    let output = std::process::Command::new("timeout")
        .args([
            "60",
            "rabbitmqctl",
            "-q",
            "list_queues",
            "name",
            "messages_ready",
        ])
        .arg("messages_unacknowledged")
        .output()
        .expect("rabbitmqctl");
    assert!(output.status.success(), "rabbitmqctl list_queues failed");
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .find_map(|line| {
            let fields: Vec<&str> = line.split_whitespace().collect();
            match fields[..] {
                [name, ready, unacked] if name == queue => {
                    Some((ready.parse().ok()?, unacked.parse().ok()?))
                }
                _ => None,
            }
        })
        .unwrap_or_else(|| panic!("rabbitmqctl does not list {queue}"))
}

/// A backlog taken by three lanes at once is acknowledged in ranges (one `basic.ack` with
/// `multiple` for a run of settled deliveries, ARCHITECTURE decision 29) while the worker runs,
/// not only when it stops; nothing is left unacknowledged, and nothing comes back after a stop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backlog_is_acknowledged_in_ranges_while_the_worker_runs() {
    let app = TestApp::prepare(|_| {}).await;
    let total = 900_u64;
    for n in 0..total {
        let trn = format!("{}", 3_100_000 + n % 300);
        app.publish(&registration(n, &format!("r{n}"), &trn)).await;
    }
    let port = common::free_port();
    let mut worker = Running(
        command(&app.settings, &["run"])
            .env("INDUCTION__AMQP__CONCURRENCY", "3")
            // Long enough that no delivery goes alone however slowly this machine runs the
            // lanes while other tests run; the last settlement moves the range over the rest.
            .env("INDUCTION__AMQP__ACK_HOLD_MILLIS", "5000")
            .env("INDUCTION__HTTP__ENABLED", "true")
            .env("INDUCTION__HTTP__LISTEN", format!("127.0.0.1:{port}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    app.wait_for_inbox(total as i64).await;

    let queue = app.settings.topology.inbox_queue.as_str().to_owned();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    loop {
        let (ready, unacked) = queue_counts(&queue);
        if ready == 0 && unacked == 0 {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{ready} ready and {unacked} unacknowledged 10 s after every message was processed"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let (_, metrics) = common::http_get(port, "/metrics")
        .await
        .expect("the worker serves /metrics");
    let frames = |kind: &str| {
        common::sample(
            &metrics,
            &format!("induction_reconciler_acknowledgements_sent_total{{kind=\"{kind}\"}}"),
        )
    };
    let (ranges, single) = (frames("range"), frames("single"));
    assert!(ranges >= 1.0, "no range acknowledgement");
    // One frame a delivery would be 900; three lanes with batches of hundreds need a few dozen
    // (with the 5 s hold, a delivery goes alone only when no range reaches it).
    assert!(
        ranges + single <= (total / 10) as f64,
        "{ranges} range and {single} single acknowledgement frames for {total} deliveries"
    );
    // A tag acknowledged twice, or one the broker no longer holds, closes the channel, and the
    // broker redelivers what it held: the worker would see those again as duplicates.
    let redelivered: f64 = metrics
        .lines()
        .filter(|line| {
            line.starts_with("induction_reconciler_messages_consumed_total{")
                && line.contains("result=\"duplicate\"")
        })
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(redelivered, 0.0, "deliveries seen twice");

    // A graceful stop sends nothing back: every delivery was acknowledged once, none twice
    // (a second acknowledgement of a tag would have closed the channel and redelivered).
    assert_eq!(unsafe { libc_kill(worker.0.id() as i32, 15) }, 0);
    let status = tokio::task::spawn_blocking(move || {
        let status = wait_with_timeout(&mut worker.0, PATIENCE);
        (status, worker)
    })
    .await
    .unwrap()
    .0;
    assert_eq!(status.code(), Some(0));
    assert_eq!(queue_counts(&queue), (0, 0));
    app.teardown().await;
}

/// A proxy to the test broker, and a worker given two addresses: the proxy's (with `query`
/// added to its URL) and then the broker's own, with `recovery` as its
/// `amqp.recovery_timeout_seconds`. Returns once the worker has applied a message.
async fn worker_behind_a_proxy_and_direct(
    app: &TestApp,
    query: &str,
    recovery: Duration,
) -> (common::proxy::Proxy, Running) {
    let direct = common::app::amqp_url();
    let uri: lapin::uri::AMQPUri = direct.parse().expect("the test broker's URL");
    let proxy = common::proxy::Proxy::start(uri.authority.port).await;
    let through_proxy = direct.replacen(
        &format!(":{}/", uri.authority.port),
        &format!(":{}/", proxy.port),
        1,
    );
    assert_ne!(
        through_proxy, direct,
        "no port to replace in the test broker's URL"
    );
    let worker = Running(
        command(&app.settings, &["run"])
            .env("AMQP_URL", format!("{through_proxy}{query},{direct}"))
            .env(
                "INDUCTION__AMQP__RECOVERY_TIMEOUT_SECONDS",
                recovery.as_secs().to_string(),
            )
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    app.publish(&registration(1, "r1", "3200001")).await;
    app.wait_for_inbox(1).await;
    (proxy, worker)
}

/// A worker given two broker addresses, whose first goes away (every connection closed, each
/// new one closed as soon as it is accepted), moves to the second within its recovery timeout;
/// then the connections it gave up stop knocking at the first: lapin's recovery of a connection
/// the worker has replaced ends with the worker's wait for it, and with it the connection's
/// thread and its buffers (8 MiB each: docs/RELIABILITY.md). Without that bound lapin's 60
/// attempts would knock for about five minutes; measured, still knocking 45.8 s after the loss.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_that_moved_to_another_broker_node_stops_knocking_at_the_one_it_left() {
    let app = TestApp::prepare(|_| {}).await;
    let recovery = Duration::from_secs(3);
    let (first, worker) = worker_behind_a_proxy_and_direct(&app, "", recovery).await;

    let gone = std::time::Instant::now();
    first.go_away();
    app.publish(&registration(2, "r2", "3200002")).await;
    app.wait_for_inbox(2).await;
    let moved = gone.elapsed();
    // lapin's recovery pauses for at most `recovery` in all, then gives up; its attempts, and
    // a loaded machine, add some seconds. It used to go on for minutes, with pauses of at most
    // 10 s (5 s and its jitter): a quarter of a minute with no knock is the end of it.
    let quiet = Duration::from_secs(15);
    let deadline = gone + recovery + Duration::from_secs(45);
    let since = |knocks: &[std::time::Instant]| {
        knocks
            .iter()
            .map(|knock| format!("{:.1}", knock.duration_since(gone).as_secs_f64()))
            .collect::<Vec<_>>()
            .join(" ")
    };
    loop {
        let knocks = first.knocks();
        let last = knocks.last().copied().unwrap_or(gone);
        if last.elapsed() >= quiet {
            // It did try to bring the lost connections back first, for a while.
            assert!(
                !knocks.is_empty(),
                "no attempt to recover the lost connections"
            );
            println!(
                "moved to the second address in {moved:?}; knocks at the first, seconds after \
                 it went: {}",
                since(&knocks)
            );
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the connections the worker gave up still knock at the address that went away \
             {:?} after it went (moved to the second in {moved:?}); knocks at seconds: {}",
            gone.elapsed(),
            since(&knocks)
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // And the worker still works, on the second address.
    app.publish(&registration(3, "r3", "3200003")).await;
    app.wait_for_inbox(3).await;
    stop_then_teardown(worker, app).await;
}

/// A worker whose broker node goes silent (its connections black-holed, each new one accepted and
/// never answered, as a hung node) notices by the heartbeat, gives the connections up after its
/// recovery timeout and carries on at the next node, without first waiting out a connection
/// attempt at the silent one (30 s): the node after the one given up is tried first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_worker_whose_broker_node_goes_silent_carries_on_at_the_next_without_waiting_on_it() {
    let app = TestApp::prepare(|_| {}).await;
    // Heartbeats every 2 s on the first address: its silence is noticed in about 4 s.
    let (first, worker) =
        worker_behind_a_proxy_and_direct(&app, "?heartbeat=2", Duration::from_secs(3)).await;
    let silent = std::time::Instant::now();
    first.go_silent();
    app.publish(&registration(2, "r2", "3200002")).await;
    // About 4 s to notice, 3 s of recovery, then a connection to the second: well within the
    // 20 s this waits, which a 30 s attempt at the silent node would not be.
    app.wait_for_inbox(2).await;
    println!(
        "applied at the second address {:?} after the first went silent",
        silent.elapsed()
    );
    stop_then_teardown(worker, app).await;
}

/// Stops the worker process, then removes the test's database and topology. The other way
/// round, the worker sees its queue deleted, starts consuming again and declares its queues
/// anew, which then stay on the shared broker (found: the two tests above left an inbox, a
/// parked and an unrouted queue each, on every run of the suite).
async fn stop_then_teardown(worker: Running, app: TestApp) {
    drop(worker);
    app.teardown().await;
}

/// glibc's malloc heaps in a process: one or more for each arena but the main one (which grows
/// with `brk`). glibc reserves a heap as 64 MiB of address space on a 64 MiB boundary and makes
/// the part in use readable and writable, so a heap is an anonymous read-write mapping on that
/// boundary, alone or followed by the inaccessible rest of its 64 MiB.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn malloc_heaps(pid: u32) -> usize {
    const HEAP: u64 = 64 << 20;
    let maps = std::fs::read_to_string(format!("/proc/{pid}/maps")).unwrap();
    // (start, end, permissions) of each anonymous mapping: inode 0 and no path.
    let anonymous: Vec<(u64, u64, &str)> = maps
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_whitespace();
            let (start, end) = fields.next()?.split_once('-')?;
            let perms = fields.next()?;
            let inode = fields.nth(2)?;
            (inode == "0" && fields.next().is_none()).then(|| {
                let address = |hex| u64::from_str_radix(hex, 16).unwrap();
                (address(start), address(end), perms)
            })
        })
        .collect();
    anonymous
        .iter()
        .enumerate()
        .filter(|(i, (start, end, perms))| {
            if start % HEAP != 0 || !perms.starts_with("rw") {
                return false;
            }
            let rest = match anonymous.get(i + 1) {
                Some((next, next_end, "---p")) if next == end => next_end - next,
                _ => 0,
            };
            end - start + rest == HEAP
        })
        .count()
}

/// The worker caps glibc's malloc arenas at start (ARCHITECTURE decision 42): without the cap
/// each thread that allocates gets an arena of its own, and memory one frees is not reused by
/// the others. An operator's `MALLOC_ARENA_MAX` still wins.
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_caps_its_malloc_arenas_unless_the_operator_chose() {
    let app = TestApp::prepare(|_| {}).await;
    let mut applied = 0;
    let mut heaps = Vec::new();
    for arena_max in [None, Some("8")] {
        let mut worker = command(&app.settings, &["run"]);
        match arena_max {
            Some(max) => worker.env("MALLOC_ARENA_MAX", max),
            None => worker.env_remove("MALLOC_ARENA_MAX"),
        };
        let worker = Running(
            worker
                .env_remove("GLIBC_TUNABLES")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .unwrap(),
        );
        // Work for every thread: two lanes, the relay, the acknowledgements.
        for n in applied..applied + 400 {
            let trn = format!("{}", 3_200_000 + n % 100);
            app.publish(&registration(n, &format!("r{n}"), &trn)).await;
        }
        applied += 400;
        app.wait_for_inbox(applied as i64).await;
        heaps.push(malloc_heaps(worker.0.id()));
    }
    assert!(
        heaps[0] <= 1,
        "{} malloc heaps with the worker's cap of 2 arenas (the main one has none)",
        heaps[0]
    );
    assert!(
        heaps[1] >= 2,
        "{} malloc heaps with MALLOC_ARENA_MAX=8: the operator's setting should win",
        heaps[1]
    );
    app.teardown().await;
}
