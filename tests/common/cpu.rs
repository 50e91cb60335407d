//! CPU time by process over a span, read from Linux's `/proc`: PostgreSQL's processes, RabbitMQ's
//! Erlang VM, the worker, this process, and what the machine left idle. The benchmark prints it,
//! so that a run says whether the host was short of CPU and who used it, without a profiler.
//!
//! A process's time is its `utime + stime` plus what it reaped from children (`cutime +
//! cstime`), so that a PostgreSQL backend or autovacuum worker that ends within the span is still
//! counted: the postmaster reaps it. Times are in clock ticks, which Linux reports at `USER_HZ`,
//! 100 a second on every architecture it runs this on: figures are good to about 10 ms a process.

/// Linux's `USER_HZ`: clock ticks a second in `/proc/*/stat` and `/proc/stat`.
const TICKS_PER_SECOND: f64 = 100.0;

/// Who a process counts as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Postgres,
    RabbitMq,
    Worker,
    Bench,
}

/// CPU ticks used so far by each kind of process, and by the machine busy and idle.
#[derive(Debug, Clone, Default)]
pub struct Snapshot {
    postgres: u64,
    rabbitmq: u64,
    worker: u64,
    bench: u64,
    machine_busy: u64,
    machine_idle: u64,
}

/// CPU seconds each used between two snapshots, and the machine's idle share of its CPU.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct CpuSplit {
    /// Every process named `postgres`: the postmaster, its backends and background workers.
    pub postgres_seconds: f64,
    /// RabbitMQ's Erlang VM (`beam.smp`) and its helpers (`erl_child_setup`, `epmd`).
    pub rabbitmq_seconds: f64,
    /// The worker process.
    pub worker_seconds: f64,
    /// The process taking the snapshots (the benchmark, or a test).
    pub bench_seconds: f64,
    /// Idle (and waiting for I/O) as a share of all the machine's CPU over the span, 0 to 1.
    pub machine_idle_share: f64,
}

impl Snapshot {
    /// Reads every process's times, counting `workers` (process ids) together as the worker
    /// and this process as the bench. `None` where `/proc` cannot be read (not Linux).
    pub fn take(workers: &[u32]) -> Option<Self> {
        let mut snapshot = Self::default();
        let bench = std::process::id();
        for entry in std::fs::read_dir("/proc").ok()? {
            let Some(pid) = entry
                .ok()
                .and_then(|e| e.file_name().to_str()?.parse::<u32>().ok())
            else {
                continue;
            };
            // A process may end between the listing and the read: it is then not counted here,
            // but in its parent's reaped time, if that is counted.
            let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
                continue;
            };
            let Some((comm, ticks)) = parse_stat(&stat) else {
                continue;
            };
            let kind = match comm {
                _ if workers.contains(&pid) => Kind::Worker,
                _ if pid == bench => Kind::Bench,
                "postgres" => Kind::Postgres,
                "beam.smp" | "erl_child_setup" | "epmd" => Kind::RabbitMq,
                _ => continue,
            };
            *snapshot.slot(kind) += ticks;
        }
        let machine = std::fs::read_to_string("/proc/stat").ok()?;
        (snapshot.machine_busy, snapshot.machine_idle) = parse_machine(&machine)?;
        Some(snapshot)
    }

    fn slot(&mut self, kind: Kind) -> &mut u64 {
        match kind {
            Kind::Postgres => &mut self.postgres,
            Kind::RabbitMq => &mut self.rabbitmq,
            Kind::Worker => &mut self.worker,
            Kind::Bench => &mut self.bench,
        }
    }

    /// What each used from this snapshot to `later`.
    pub fn until(&self, later: &Snapshot) -> CpuSplit {
        let seconds = |from: u64, to: u64| to.saturating_sub(from) as f64 / TICKS_PER_SECOND;
        let busy = later.machine_busy.saturating_sub(self.machine_busy);
        let idle = later.machine_idle.saturating_sub(self.machine_idle);
        CpuSplit {
            postgres_seconds: seconds(self.postgres, later.postgres),
            rabbitmq_seconds: seconds(self.rabbitmq, later.rabbitmq),
            worker_seconds: seconds(self.worker, later.worker),
            bench_seconds: seconds(self.bench, later.bench),
            machine_idle_share: idle as f64 / (busy + idle).max(1) as f64,
        }
    }
}

/// A process's command name and its own and reaped children's CPU ticks, from its
/// `/proc/<pid>/stat` line. The name is in parentheses and may itself hold spaces and
/// parentheses, so the fields are counted from the last `)`.
fn parse_stat(stat: &str) -> Option<(&str, u64)> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?;
    // After the name: state (field 3), ..., utime (14), stime (15), cutime (16), cstime (17).
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    let field = |n: usize| fields.get(n - 3)?.parse::<u64>().ok();
    Some((comm, field(14)? + field(15)? + field(16)? + field(17)?))
}

/// The machine's busy and idle ticks, all CPUs, from the first line of `/proc/stat`: `cpu user
/// nice system idle iowait irq softirq steal ...`. Waiting for I/O counts as idle; time stolen
/// by the hypervisor as busy (the machine could not use it).
fn parse_machine(stat: &str) -> Option<(u64, u64)> {
    let line = stat.lines().next()?;
    let mut fields = line.split_whitespace();
    (fields.next()? == "cpu").then_some(())?;
    let values: Vec<u64> = fields
        .take(8)
        .map(|v| v.parse().ok())
        .collect::<Option<_>>()?;
    let [user, nice, system, idle, iowait, irq, softirq, steal] = values.try_into().ok()?;
    Some((user + nice + system + irq + softirq + steal, idle + iowait))
}
