//! The command line: one binary, one subcommand per job.

use std::fs::File;
use std::io::{self, BufRead, BufReader};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::app::parked::{Action, Selection};
use crate::app::simulate::simulate;
use crate::config::Settings;
use crate::domain::Origin;

/// `verify` found teachers whose stored outcome is not what the rules give.
#[derive(Debug, thiserror::Error)]
#[error("{0} teachers differ from what the rules give")]
pub struct VerifyFailed(pub u64);

/// Reconciles ECT induction reports from schools and appropriate bodies.
#[derive(Debug, Parser)]
#[command(name = "induction-reconciler", version, about)]
pub struct Cli {
    /// A settings file layered over the defaults (default: config/local.toml if it exists).
    #[arg(long, global = true, value_name = "FILE")]
    pub config: Option<PathBuf>,
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the worker: migrate, declare the topology, then consume, relay the outbox and sweep
    /// overdue provisionals until SIGTERM or SIGINT.
    Run {
        /// Do not run database migrations at start.
        #[arg(long)]
        no_migrate: bool,
        /// Do not declare exchanges and queues (they are managed elsewhere).
        #[arg(long)]
        no_declare: bool,
    },
    /// Apply pending database migrations and exit.
    Migrate,
    /// Publish input messages (JSON lines) to the input exchange, with publisher confirms.
    /// The routing key follows each message's `message_type`.
    Publish {
        /// The file of messages; `-` or nothing reads standard input.
        file: Option<PathBuf>,
        /// Stamp this `origin` on every message that does not give one: `migration` when
        /// loading history from the ECF1 service or the AB portal (docs/MIGRATION.md).
        #[arg(long, value_parser = parse_origin, value_name = "live|migration")]
        origin: Option<Origin>,
    },
    /// Send a consumer that joins late (or lost its state) the latest outcome of every selected
    /// teacher, exactly as first published (same outcome_id, version and fields), on its own
    /// queue through the default exchange, with confirms. Bind the queue to the outcome exchange
    /// first, so that nothing falls between the resync and the live stream.
    Resync {
        /// The consumer's queue (it must exist).
        #[arg(long, value_name = "NAME")]
        queue: String,
        /// Only this teacher (repeatable).
        #[arg(long = "trn", value_name = "TRN")]
        trns: Vec<String>,
        /// Only teachers whose latest outcome has this status (repeatable).
        #[arg(long = "status", value_name = "STATUS")]
        statuses: Vec<String>,
    },
    /// Audit: recompute every teacher from the stored records with the reconciliation rules and
    /// compare with the stored last outcome. Prints how many were checked and how many differ,
    /// writes the differing TRNs to a file, and exits 1 when any differs.
    Verify {
        /// Where to write the differing TRNs, one per line.
        #[arg(long, value_name = "FILE", default_value = "verify-differences.txt")]
        differences: PathBuf,
        /// Also write, as new versions with no cause, the corrected outcome of every teacher that
        /// differs (after a deliberate rule change); running workers publish them.
        #[arg(long)]
        emit: bool,
    },
    /// Show what is held for one teacher: the records, the current outcome and the history of
    /// what was applied and emitted. For answering a school's or an AB's question.
    Explain {
        /// The teacher reference number (7 digits).
        trn: String,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// List, replay or purge parked messages.
    Parked {
        /// What to do.
        #[command(subcommand)]
        action: ParkedCommand,
    },
    /// The transactional outbox.
    Outbox {
        /// What to show.
        #[command(subcommand)]
        action: OutboxCommand,
    },
    /// Print the effective settings, with secrets redacted, and exit.
    CheckConfig,
    /// Print outcomes as they are published (JSON lines), from a temporary queue bound to the
    /// outcome exchange. Stops after --count outcomes, or on SIGINT/SIGTERM.
    Watch {
        /// Stop after this many outcomes.
        #[arg(long)]
        count: Option<u64>,
        /// Only outcomes with this status (confirmed, provisional, conflict, closed).
        #[arg(long)]
        status: Option<String>,
    },
    /// Run input messages (JSON lines) through the reconciler in memory and print every outcome
    /// and parked message as JSON lines, without a broker or database.
    Simulate {
        /// The file of messages, one JSON object per line; `-` or nothing reads standard input.
        file: Option<PathBuf>,
        /// Fix the clock (RFC 3339), so that output is reproducible.
        #[arg(long, value_parser = parse_now)]
        now: Option<OffsetDateTime>,
    },
}

/// `parked` subcommands.
#[derive(Debug, Subcommand)]
pub enum ParkedCommand {
    /// List parked messages (they stay parked). Prints no message bodies.
    List {
        #[command(flatten)]
        selection: SelectionArgs,
        /// One JSON object per line instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Republish parked messages to their original exchange and routing key (with a confirm),
    /// then remove them from the parking queue.
    Replay {
        #[command(flatten)]
        selection: SelectionArgs,
    },
    /// Delete parked messages.
    Purge {
        #[command(flatten)]
        selection: SelectionArgs,
    },
}

/// Which parked messages a command applies to.
#[derive(Debug, clap::Args)]
pub struct SelectionArgs {
    /// Apply to every parked message (required unless --message-id or --reason is given).
    #[arg(long)]
    all: bool,
    /// Only this message id (repeatable).
    #[arg(long = "message-id", value_name = "UUID")]
    message_ids: Vec<String>,
    /// Only messages parked with this reason code, e.g. invalid_field.
    #[arg(long)]
    reason: Option<String>,
    /// At most this many messages.
    #[arg(long)]
    limit: Option<usize>,
}

impl ParkedCommand {
    /// The action, which messages it applies to, and whether to print JSON.
    fn into_request(self) -> anyhow::Result<(Action, Selection, bool)> {
        Ok(match self {
            Self::List { selection, json } => (Action::List, selection.into_selection(true)?, json),
            Self::Replay { selection } => (Action::Replay, selection.into_selection(false)?, false),
            Self::Purge { selection } => (Action::Purge, selection.into_selection(false)?, false),
        })
    }
}

impl SelectionArgs {
    fn into_selection(self, listing: bool) -> anyhow::Result<Selection> {
        anyhow::ensure!(
            listing || self.all || !self.message_ids.is_empty() || self.reason.is_some(),
            "say which messages: --all, --message-id or --reason"
        );
        if let Some(reason) = &self.reason {
            let known =
                crate::messages::ReasonCode::parse(reason).is_some() || reason == "delivery_limit";
            anyhow::ensure!(known, "unknown reason code {reason:?}");
        }
        Ok(Selection {
            message_ids: self.message_ids,
            reason: self.reason,
            limit: self.limit,
        })
    }
}

/// `outbox` subcommands.
#[derive(Debug, Subcommand)]
pub enum OutboxCommand {
    /// Backlog, age of the oldest unpublished outcome, and when one was last published.
    Status,
}

fn parse_now(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text, &Rfc3339).map_err(|e| format!("not an RFC 3339 timestamp: {e}"))
}

fn parse_origin(text: &str) -> Result<Origin, String> {
    Origin::parse(text).ok_or_else(|| "must be live or migration".to_owned())
}

/// The number of lines of a file, for a progress bar; `None` for standard input.
fn count_lines(file: Option<&PathBuf>) -> anyhow::Result<Option<u64>> {
    let Some(path) = file.filter(|p| p.as_os_str() != "-") else {
        return Ok(None);
    };
    let mut reader = BufReader::new(
        File::open(path).with_context(|| format!("cannot open {}", path.display()))?,
    );
    let mut lines = 0u64;
    loop {
        let buffer = reader.fill_buf()?;
        if buffer.is_empty() {
            break;
        }
        lines += buffer.iter().filter(|&&b| b == b'\n').count() as u64;
        let used = buffer.len();
        reader.consume(used);
    }
    Ok(Some(lines))
}

fn open_input(file: Option<PathBuf>) -> anyhow::Result<Box<dyn BufRead>> {
    Ok(match file {
        Some(path) if path.as_os_str() != "-" => Box::new(BufReader::new(
            File::open(&path).with_context(|| format!("cannot open {}", path.display()))?,
        )),
        _ => Box::new(io::stdin().lock()),
    })
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    if let Command::Simulate { file, now } = cli.command {
        simulate(open_input(file)?, io::stdout().lock(), now)
            .context("simulate failed to read its input or write its output")?;
        return Ok(());
    }
    // Before any thread starts: a thread takes its arena at its first allocation.
    let arenas = cap_malloc_arenas();
    let settings = Settings::load(cli.config.as_deref())?;
    let _telemetry = crate::telemetry::init(&settings.log, &settings.telemetry)?;
    crate::telemetry::install_crypto_provider();
    match arenas {
        Arenas::Capped(cap) => tracing::info!(
            arenas = cap,
            "malloc arenas capped (set MALLOC_ARENA_MAX to choose another number)"
        ),
        Arenas::Operator => {
            tracing::info!("malloc arenas as MALLOC_ARENA_MAX or GLIBC_TUNABLES say")
        }
        Arenas::Untouched => {}
    }
    // At least three runtime threads, whatever the cores. lapin's I/O thread reads its socket
    // through this runtime's I/O driver, and tasks here read lapin's statuses under locks that
    // thread also takes; with one runtime thread per core on a two-core host, two such tasks
    // blocked at once may leave nothing to drive it. A hang of that shape (every task silent,
    // lapin's heartbeat lost 20 s later) was seen once in the reliability suite. Four threads
    // cost 5 ms of median latency at 1,000 msg/s on two cores; three cost none measurable
    // (docs/RELIABILITY.md, docs/PERFORMANCE.md).
    let threads = std::thread::available_parallelism().map_or(3, |n| n.get().max(3));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(threads)
        .enable_all()
        .build()
        .context("cannot start the async runtime")?;
    let result = runtime.block_on(dispatch(cli.command, settings));
    // Tasks still running (a connection being retired, a blocking DNS lookup) must not hold the
    // process past its shutdown bound.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    result
}

/// How many malloc arenas glibc may make, unless the operator says otherwise. glibc's default
/// is eight a core, one for each thread that allocates: memory a drain frees in one thread's
/// arena is not reused by another's, so the worker's peak moved by tens of MiB from run to run
/// (ARCHITECTURE decision 42, docs/RELIABILITY.md).
const MALLOC_ARENAS: i32 = 2;

/// What start-up did about glibc's malloc arenas.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Arenas {
    /// Capped at this many.
    Capped(i32),
    /// Left to the operator's `MALLOC_ARENA_MAX` or `GLIBC_TUNABLES`.
    Operator,
    /// Not glibc, or glibc refused the setting.
    Untouched,
}

/// The cap to set, given the environment: none when the operator chose one (glibc reads
/// `MALLOC_ARENA_MAX`, and `glibc.malloc.arena_max` in `GLIBC_TUNABLES`, itself).
fn arena_cap(
    arena_max: Option<&std::ffi::OsStr>,
    tunables: Option<&std::ffi::OsStr>,
) -> Option<i32> {
    let tuned = tunables.is_some_and(|t| t.to_string_lossy().contains("glibc.malloc.arena_max"));
    (arena_max.is_none() && !tuned).then_some(MALLOC_ARENAS)
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn cap_malloc_arenas() -> Arenas {
    let Some(cap) = arena_cap(
        std::env::var_os("MALLOC_ARENA_MAX").as_deref(),
        std::env::var_os("GLIBC_TUNABLES").as_deref(),
    ) else {
        return Arenas::Operator;
    };
    // SAFETY: mallopt sets one of the allocator's parameters, under the allocator's own lock;
    // it touches no memory of ours.
    if unsafe { libc::mallopt(libc::M_ARENA_MAX, cap) } == 1 {
        Arenas::Capped(cap)
    } else {
        Arenas::Untouched
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn cap_malloc_arenas() -> Arenas {
    Arenas::Untouched
}

/// Runs every command but `simulate` (which needs no runtime, settings or telemetry).
async fn dispatch(command: Command, mut settings: Settings) -> anyhow::Result<()> {
    match command {
        Command::Run {
            no_migrate,
            no_declare,
        } => {
            settings.database.migrate_on_start &= !no_migrate;
            settings.amqp.declare_topology &= !no_declare;
            crate::app::worker::run(settings, shutdown_signal()).await
        }
        Command::Migrate => crate::app::ops::migrate(&settings).await,
        Command::Publish { file, origin } => {
            let total = count_lines(file.as_ref())?;
            crate::app::ops::publish(&settings, open_input(file)?, origin, total).await
        }
        Command::Resync {
            queue,
            trns,
            statuses,
        } => {
            let filter = crate::app::resync::filter(trns, statuses)?;
            let sent = crate::app::resync::resync(&settings, &queue, &filter).await?;
            println!("resent {sent} outcomes to the queue {queue}");
            Ok(())
        }
        Command::Verify { differences, emit } => {
            let found = crate::app::audit::verify(&settings, &differences, emit).await?;
            println!(
                "checked {} teachers: {} differ{}",
                found.checked,
                found.differing,
                if emit {
                    format!(", {} corrected outcomes written", found.emitted)
                } else {
                    String::new()
                }
            );
            if found.differing > 0 {
                println!("the differing TRNs are in {}", differences.display());
                if !emit {
                    return Err(VerifyFailed(found.differing).into());
                }
            }
            Ok(())
        }
        Command::Explain { trn, json } => crate::app::ops::explain(&settings, &trn, json).await,
        Command::Parked { action } => {
            let (action, selection, json) = action.into_request()?;
            crate::app::ops::parked(&settings, action, &selection, json).await
        }
        Command::Outbox {
            action: OutboxCommand::Status,
        } => crate::app::ops::outbox_status(&settings).await,
        Command::CheckConfig => {
            settings.amqp_tls_ca()?;
            settings.amqp_tls_identity()?;
            print!("{}", settings.redacted());
            for warning in settings.warnings() {
                eprintln!("warning: {warning}");
            }
            Ok(())
        }
        Command::Watch { count, status } => {
            let status = status.as_deref();
            crate::app::ops::watch(&settings, count, status, shutdown_signal()).await
        }
        Command::Simulate { .. } => unreachable!("handled without a runtime"),
    }
}

/// Resolves on SIGTERM or SIGINT.
async fn shutdown_signal() {
    let interrupt = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        let mut terminate =
            tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
                .expect("cannot install the SIGTERM handler");
        tokio::select! {
            _ = interrupt => {}
            _ = terminate.recv() => {}
        }
    }
    #[cfg(not(unix))]
    {
        let _ = interrupt.await;
    }
}

#[cfg(test)]
mod tests {
    use std::ffi::OsStr;

    use super::{MALLOC_ARENAS, arena_cap};

    #[test]
    fn the_arenas_are_capped_unless_the_operator_chose() {
        assert_eq!(arena_cap(None, None), Some(MALLOC_ARENAS));
        assert_eq!(
            arena_cap(None, Some(OsStr::new("glibc.malloc.tcache_count=0"))),
            Some(MALLOC_ARENAS),
            "other tunables leave the cap"
        );
        assert_eq!(arena_cap(Some(OsStr::new("8")), None), None);
        assert_eq!(
            arena_cap(
                None,
                Some(OsStr::new(
                    "glibc.malloc.tcache_count=0:glibc.malloc.arena_max=4"
                ))
            ),
            None
        );
    }
}
