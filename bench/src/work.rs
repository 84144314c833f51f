//! The work behind a request, counted rather than guessed: round trips to PostgreSQL and Redis,
//! from the mesh's own metrics (`db_statement_duration_seconds`, one sample per statement sqlx
//! runs, `BEGIN` and `COMMIT` included; `redis_command_duration_seconds`, one per Redis command
//! or script), and the process's CPU time. The mesh and the load generator share this process,
//! so the CPU time includes the client's share of each request; a baseline pays its own client
//! too, which keeps the two comparable. Background work (the outbox relay, health checks) falls
//! into whatever runs at the time, a small share over thousands of requests.

use std::time::Duration;

use serde::Serialize;

/// Linux reports process times in `/proc` in ticks of `USER_HZ`, 100 per second on every
/// architecture it runs on.
const TICKS_PER_SECOND: f64 = 100.0;

/// The mesh's metrics with a sample per PostgreSQL statement and per Redis command.
const STATEMENTS: &str = "db_statement_duration_seconds_count";
const REDIS_COMMANDS: &str = "redis_command_duration_seconds_count";

/// Totals of the process so far; the difference of two is the work between them.
#[derive(Debug, Clone, Copy, Default)]
pub struct WorkCounters {
    statements: f64,
    redis_commands: f64,
    cpu: Duration,
}

impl WorkCounters {
    pub fn now() -> Self {
        WorkCounters {
            statements: aimesh_tests::metric(STATEMENTS, &[]),
            redis_commands: aimesh_tests::metric(REDIS_COMMANDS, &[]),
            cpu: process_cpu_time("self"),
        }
    }

    /// Totals of another process of the mesh: `pid`, whose metrics are `exposition` (its
    /// `/metrics`).
    pub fn of_process(pid: u32, exposition: &str) -> Self {
        WorkCounters {
            statements: aimesh_tests::metric_in(exposition, STATEMENTS, &[]),
            redis_commands: aimesh_tests::metric_in(exposition, REDIS_COMMANDS, &[]),
            cpu: process_cpu_time(&pid.to_string()),
        }
    }

    /// The work from `earlier` to `self`.
    pub fn since(self, earlier: WorkCounters) -> WorkCounters {
        WorkCounters {
            statements: self.statements - earlier.statements,
            redis_commands: self.redis_commands - earlier.redis_commands,
            cpu: self.cpu.saturating_sub(earlier.cpu),
        }
    }

    /// Adds the work of another stretch (slices of an alternating measurement).
    pub fn add(&mut self, other: WorkCounters) {
        self.statements += other.statements;
        self.redis_commands += other.redis_commands;
        self.cpu += other.cpu;
    }

    /// Per request, over `requests` of them; none when there were none.
    pub fn per_request(self, requests: u64) -> Option<WorkPerRequest> {
        let n = requests as f64;
        (requests > 0).then(|| WorkPerRequest {
            postgres: self.statements / n,
            redis: self.redis_commands / n,
            cpu_us: self.cpu.as_secs_f64() * 1e6 / n,
        })
    }
}

/// Round trips and CPU per request, as the report prints them.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct WorkPerRequest {
    /// PostgreSQL statements (each a round trip).
    pub postgres: f64,
    /// Redis commands and scripts (each a round trip).
    pub redis: f64,
    /// Process CPU time, user and system, in microseconds.
    pub cpu_us: f64,
}

impl WorkPerRequest {
    pub fn describe(&self) -> String {
        format!("pg {:.2}  redis {:.2}  cpu {:.0} us", self.postgres, self.redis, self.cpu_us)
    }
}

/// User and system CPU time so far of the process `pid` ("self" for this one), from
/// `/proc/<pid>/stat`, fields 14 and 15; zero where there is no `/proc`.
fn process_cpu_time(pid: &str) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else { return Duration::ZERO };
    // The command name, field 2, is in parentheses and may hold spaces: count from after it.
    let Some((_, after_name)) = stat.rsplit_once(')') else { return Duration::ZERO };
    let fields: Vec<&str> = after_name.split_whitespace().collect();
    let ticks = |index: usize| fields.get(index).and_then(|f| f.parse::<u64>().ok()).unwrap_or(0);
    // Field 3 (the state) is at index 0 here, so fields 14 and 15 are at 11 and 12.
    Duration::from_secs_f64((ticks(11) + ticks(12)) as f64 / TICKS_PER_SECOND)
}

/// A memory figure of the process `pid` ("self" for this one) from `/proc/<pid>/status`
/// (`VmRSS`, resident now; `VmHWM`, the peak), in MiB; zero where there is none.
pub fn memory_mib(pid: &str, field: &str) -> f64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            let line =
                status.lines().find(|line| line.strip_prefix(field).is_some_and(|rest| rest.starts_with(':')))?;
            line.split_whitespace().nth(1)?.parse::<f64>().ok()
        })
        .map_or(0.0, |kib| kib / 1024.0)
}
