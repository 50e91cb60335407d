//! The command line: one binary, one subcommand per job.

use std::fs::File;
use std::io::{self, BufReader};
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use time::OffsetDateTime;
use time::format_description::well_known::Rfc3339;

use crate::app::simulate::simulate;

/// Reconciles ECT induction reports from schools and appropriate bodies.
#[derive(Debug, Parser)]
#[command(name = "induction-reconciler", version, about)]
pub struct Cli {
    /// What to do.
    #[command(subcommand)]
    pub command: Command,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
pub enum Command {
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

fn parse_now(text: &str) -> Result<OffsetDateTime, String> {
    OffsetDateTime::parse(text, &Rfc3339).map_err(|e| format!("not an RFC 3339 timestamp: {e}"))
}

/// Runs the parsed command line.
pub fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Simulate { file, now } => {
            let stdout = io::stdout().lock();
            match file {
                Some(path) if path.as_os_str() != "-" => {
                    let file = File::open(&path)
                        .with_context(|| format!("cannot open {}", path.display()))?;
                    simulate(BufReader::new(file), stdout, now)
                }
                _ => simulate(io::stdin().lock(), stdout, now),
            }
            .context("simulate failed to read its input or write its output")?;
            Ok(())
        }
    }
}
