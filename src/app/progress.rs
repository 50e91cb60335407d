//! Progress of a long operator command (`publish`, `resync`, `verify`): a bar with the rate and
//! the time left on a terminal; when standard error is not a terminal, either nothing
//! (`publish` piped into a script) or a log line every [`LOG_EVERY`] (a Kubernetes Job's log).

use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// How often a progress line is logged when there is no terminal.
pub const LOG_EVERY: Duration = Duration::from_secs(10);

/// What to do when standard error is not a terminal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhenPiped {
    /// Show nothing.
    Quiet,
    /// Log a progress line every [`LOG_EVERY`].
    Log,
}

/// The progress of one command, counted in `unit`s (messages, teachers).
pub struct Progress {
    bar: ProgressBar,
    what: &'static str,
    total: Option<u64>,
    done: u64,
    started: Instant,
    last_line: Instant,
    when_piped: WhenPiped,
}

impl Progress {
    /// Starts counting; `total` when it is known (then the bar shows the time left).
    pub fn new(what: &'static str, total: Option<u64>, when_piped: WhenPiped) -> Self {
        let bar = match total {
            Some(total) => ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr()),
            None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()),
        };
        let template = match total {
            Some(_) => "{msg} {wide_bar} {human_pos}/{human_len} ({per_sec}, {eta} left)",
            None => "{msg} {spinner} {human_pos} ({per_sec})",
        };
        if let Ok(style) = ProgressStyle::with_template(template) {
            bar.set_style(style);
        }
        bar.set_message(what);
        if !bar.is_hidden() {
            bar.enable_steady_tick(Duration::from_millis(250));
        }
        let now = Instant::now();
        Self {
            bar,
            what,
            total,
            done: 0,
            started: now,
            last_line: now,
            when_piped,
        }
    }

    /// Counts `n` more done.
    pub fn advance(&mut self, n: u64) {
        self.done += n;
        self.bar.inc(n);
        if self.bar.is_hidden()
            && self.when_piped == WhenPiped::Log
            && self.last_line.elapsed() >= LOG_EVERY
        {
            self.last_line = Instant::now();
            self.log_line();
        }
    }

    /// How many are done.
    pub fn done(&self) -> u64 {
        self.done
    }

    /// Units per second since the start.
    pub fn rate(&self) -> f64 {
        self.done as f64 / self.started.elapsed().as_secs_f64().max(1e-9)
    }

    /// Seconds since the start.
    pub fn elapsed(&self) -> Duration {
        self.started.elapsed()
    }

    /// Stops drawing (the caller prints its own summary).
    pub fn finish(&self) {
        self.bar.finish_and_clear();
    }

    fn log_line(&self) {
        let rate = self.rate();
        match self.total {
            Some(total) => {
                let left = total.saturating_sub(self.done) as f64 / rate.max(1e-9);
                tracing::info!(
                    what = self.what,
                    done = self.done,
                    total,
                    per_second = format!("{rate:.0}"),
                    seconds_left = format!("{left:.0}"),
                    "progress"
                );
            }
            None => tracing::info!(
                what = self.what,
                done = self.done,
                per_second = format!("{rate:.0}"),
                "progress"
            ),
        }
    }
}
