//! Driving a measured loop, closed or open, and reporting it: throughput, latency quantiles,
//! errors, the machine it ran on; `report.json`, `report.md` and a latency chart per scenario.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use serde::{Serialize, Serializer};

use crate::work::{WorkCounters, WorkPerRequest};
use tokio::sync::Semaphore;
use tokio::task::{JoinError, JoinSet};

/// How requests are started.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// `concurrency` callers, each starting its next request as soon as the last answered: the
    /// throughput at saturation.
    Closed,
    /// Requests started on a fixed schedule at `rate` per second whatever the answers, latency
    /// counted from the scheduled start (so a stall is not hidden); at most `concurrency` in
    /// flight, a request due beyond that is dropped and counted: latency at a given load.
    Open,
    /// One pass of a fixed amount of work (a batch moved end to end), whatever the options.
    #[value(skip)]
    Batch,
}

/// How hard a scenario is driven.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Load {
    pub mode: Mode,
    /// Closed: requests in flight. Open: the most in flight before requests are dropped.
    pub concurrency: usize,
    /// Open: requests started per second.
    pub rate: f64,
    #[serde(rename = "seconds", serialize_with = "as_seconds")]
    pub duration: Duration,
    /// Stop after this many requests even if time is left (for passes over a fixed set).
    pub max_requests: Option<u64>,
}

fn as_seconds<S: Serializer>(duration: &Duration, serializer: S) -> Result<S::Ok, S::Error> {
    serializer.serialize_f64(duration.as_secs_f64())
}

impl Load {
    /// One request at a time, `count` of them, in closed loop whatever the run's mode: for
    /// scenarios where each request is a whole query over a large data set.
    pub fn one_at_a_time(count: u64) -> Self {
        Load {
            mode: Mode::Closed,
            concurrency: 1,
            rate: 0.0,
            duration: Duration::from_secs(600),
            max_requests: Some(count),
        }
    }

    /// The same load with at most `most` in flight.
    pub fn at_most_in_flight(self, most: usize) -> Self {
        Load { concurrency: self.concurrency.min(most), ..self }
    }

    /// `factor` times this load: as many times the requests in flight and the rate.
    pub fn times(self, factor: usize) -> Self {
        Load { concurrency: self.concurrency * factor, rate: self.rate * factor as f64, ..self }
    }

    /// The load in words, as the report shows it.
    pub fn describe(&self) -> String {
        match self.mode {
            Mode::Closed => format!("closed loop, {} in flight", self.concurrency),
            Mode::Open => format!("open loop at {} requests/s, at most {} in flight", self.rate, self.concurrency),
            Mode::Batch => "one batch".to_owned(),
        }
    }
}

/// The figures of one measured loop.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub name: String,
    /// The load it was measured under.
    pub load: Load,
    pub requests: u64,
    pub errors: u64,
    /// Open loop: requests due while `concurrency` were in flight, never started.
    pub dropped: u64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// The first error seen, to tell what failed.
    pub first_error: Option<String>,
    /// For scenarios that move bytes: throughput in MiB/s.
    pub mib_per_second: Option<f64>,
    /// Round trips and CPU per request (see [`crate::work`]), for loops the bench drove.
    pub work: Option<WorkPerRequest>,
}

impl Figures {
    /// Figures from latencies in milliseconds (sorted here) over `elapsed`, `succeeded` of them
    /// without error.
    pub fn from_latencies_ms(
        name: &str,
        load: Load,
        latencies_ms: &mut [f64],
        succeeded: u64,
        elapsed: Duration,
    ) -> Self {
        latencies_ms.sort_by(f64::total_cmp);
        let quantile = |q: f64| {
            if latencies_ms.is_empty() {
                return 0.0;
            }
            let index = ((latencies_ms.len() - 1) as f64 * q).round() as usize;
            latencies_ms[index.min(latencies_ms.len() - 1)]
        };
        Figures {
            name: name.to_owned(),
            load,
            requests: latencies_ms.len() as u64,
            errors: latencies_ms.len() as u64 - succeeded.min(latencies_ms.len() as u64),
            dropped: 0,
            per_second: succeeded as f64 / elapsed.as_secs_f64().max(f64::MIN_POSITIVE),
            p50_ms: quantile(0.50),
            p90_ms: quantile(0.90),
            p99_ms: quantile(0.99),
            p999_ms: quantile(0.999),
            first_error: None,
            mib_per_second: None,
            work: None,
        }
    }
}

/// Another row measured in the same run, for a wider comparison than scenario and baseline.
#[derive(Debug, Clone, Serialize)]
pub struct Reference {
    pub figures: Figures,
    /// What it is, in words.
    pub is: &'static str,
}

/// A scenario and its baseline, measured in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub scenario: Figures,
    pub baseline: Figures,
    /// What the baseline is, in words.
    pub baseline_is: &'static str,
    /// Further rows (such as the bare tonic echo below a direct gRPC call).
    pub references: Vec<Reference>,
    /// A further figure of the scenario, in words (such as peak memory).
    pub note: Option<String>,
}

impl Pair {
    pub fn new(scenario: Figures, baseline: Figures, baseline_is: &'static str) -> Self {
        Pair { scenario, baseline, baseline_is, references: Vec::new(), note: None }
    }

    pub fn with_note(self, note: impl Into<String>) -> Self {
        Pair { note: Some(note.into()), ..self }
    }

    pub fn with_reference(mut self, figures: Figures, is: &'static str) -> Self {
        self.references.push(Reference { figures, is });
        self
    }

    /// Throughput of the scenario as a share of the baseline's.
    pub fn throughput_ratio(&self) -> f64 {
        ratio(self.scenario.per_second, self.baseline.per_second)
    }

    /// The headline: throughput and latency of the scenario relative to its baseline (in open
    /// loop both usually keep up with the rate, so latency tells them apart).
    pub fn headline(&self) -> String {
        let throughput = format!("throughput {:.0}% of the baseline", self.throughput_ratio() * 100.0);
        // A batch moved end to end has no per-request latency to compare.
        if self.scenario.p50_ms > 0.0 && self.baseline.p50_ms > 0.0 {
            format!(
                "{throughput}; p50 {:.2}x, p99 {:.2}x the baseline's",
                ratio(self.scenario.p50_ms, self.baseline.p50_ms),
                ratio(self.scenario.p99_ms, self.baseline.p99_ms)
            )
        } else {
            throughput
        }
    }

    /// Every row: scenario, baseline, references.
    pub fn rows(&self) -> Vec<(&Figures, String)> {
        let mut rows =
            vec![(&self.scenario, "scenario".to_owned()), (&self.baseline, format!("baseline: {}", self.baseline_is))];
        rows.extend(self.references.iter().map(|r| (&r.figures, format!("reference: {}", r.is))));
        rows
    }

    /// A name for files of this pair, from the scenario's name.
    pub fn slug(&self) -> String {
        let slug: String = self
            .scenario
            .name
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c.to_ascii_lowercase() } else { '-' })
            .collect();
        slug.split('-').filter(|part| !part.is_empty()).collect::<Vec<_>>().join("-")
    }

    pub fn render_text(&self) -> String {
        let row = |f: &Figures| {
            format!(
                "  {:<26} {:>10.0}/s{}  p50 {:>8.2} ms  p90 {:>8.2} ms  p99 {:>8.2} ms  p99.9 {:>8.2} ms  errors {}  dropped {}{}",
                f.name,
                f.per_second,
                f.mib_per_second.map(|mib| format!(" ({mib:.0} MiB/s)")).unwrap_or_default(),
                f.p50_ms,
                f.p90_ms,
                f.p99_ms,
                f.p999_ms,
                f.errors,
                f.dropped,
                f.work.map(|work| format!("  per request: {}", work.describe())).unwrap_or_default()
            )
        };
        let mut text = format!(
            "{}   ({})\n{}   (baseline: {})",
            row(&self.scenario),
            self.scenario.load.describe(),
            row(&self.baseline),
            self.baseline_is
        );
        for reference in &self.references {
            text.push_str(&format!("\n{}   (reference: {})", row(&reference.figures), reference.is));
        }
        text.push_str(&format!("\n  {}", self.headline()));
        if let Some(note) = &self.note {
            text.push_str(&format!("\n  {note}"));
        }
        text
    }
}

fn ratio(numerator: f64, denominator: f64) -> f64 {
    if denominator > 0.0 { numerator / denominator } else { 0.0 }
}

/// Latencies and errors as requests answer.
#[derive(Default)]
struct Tally {
    latencies_ms: Vec<f64>,
    errors: u64,
    first_error: Option<String>,
}

impl Tally {
    fn record(&mut self, latency: Duration, outcome: Result<(), String>) {
        self.latencies_ms.push(latency.as_secs_f64() * 1000.0);
        if let Err(error) = outcome {
            self.errors += 1;
            self.first_error.get_or_insert(error);
        }
    }

    fn record_joined(&mut self, joined: Result<(Duration, Result<(), String>), JoinError>) {
        match joined {
            Ok((latency, outcome)) => self.record(latency, outcome),
            Err(error) => {
                self.errors += 1;
                self.first_error.get_or_insert(format!("request task failed: {error}"));
            }
        }
    }

    fn merge(&mut self, other: Tally) {
        self.latencies_ms.extend(other.latencies_ms);
        self.errors += other.errors;
        if self.first_error.is_none() {
            self.first_error = other.first_error;
        }
    }

    fn into_figures(mut self, name: &str, load: Load, dropped: u64, elapsed: Duration) -> Figures {
        let succeeded = self.latencies_ms.len() as u64 - self.errors;
        let mut figures = Figures::from_latencies_ms(name, load, &mut self.latencies_ms, succeeded, elapsed);
        figures.errors = self.errors;
        figures.dropped = dropped;
        figures.first_error = self.first_error;
        figures
    }
}

/// Drives `op` under `load` in its mode (closed or open loop). `op` gets a number unique across
/// the run (for unique ids).
pub async fn measure<F, Fut>(name: &str, load: Load, op: F) -> Figures
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    drive(load, &Arc::new(op), &Arc::new(AtomicU64::new(0))).await.into_figures(name, load)
}

/// Measures `a` and `b` under the same load in alternating slices of its duration (a b, b a,
/// a b, ...), so that drift of a shared machine (a neighbour's burst, a background merge) falls
/// on both alike instead of on whichever ran second, and their ratio holds from run to run. Each
/// op's numbers stay unique across its slices.
pub async fn measure_alternating<A, FutA, B, FutB>(
    load: Load,
    slices: u32,
    (name_a, op_a): (&str, A),
    (name_b, op_b): (&str, B),
) -> (Figures, Figures)
where
    A: Fn(u64) -> FutA + Send + Sync + 'static,
    FutA: Future<Output = Result<(), String>> + Send + 'static,
    B: Fn(u64) -> FutB + Send + Sync + 'static,
    FutB: Future<Output = Result<(), String>> + Send + 'static,
{
    let slice = Load { duration: load.duration / slices.max(1), ..load };
    let (op_a, numbers_a, mut run_a) = (Arc::new(op_a), Arc::new(AtomicU64::new(0)), Run::default());
    let (op_b, numbers_b, mut run_b) = (Arc::new(op_b), Arc::new(AtomicU64::new(0)), Run::default());
    for round in 0..slices.max(1) {
        if round % 2 == 0 {
            run_a.merge(drive(slice, &op_a, &numbers_a).await);
            run_b.merge(drive(slice, &op_b, &numbers_b).await);
        } else {
            run_b.merge(drive(slice, &op_b, &numbers_b).await);
            run_a.merge(drive(slice, &op_a, &numbers_a).await);
        }
    }
    (run_a.into_figures(name_a, load), run_b.into_figures(name_b, load))
}

/// Measurements taken in slices and summed per name, for a scenario that changes what it
/// measures between slices (the scaling curve starts and stops processes): visiting each
/// configuration on the way up and again on the way down makes drift of the machine fall on
/// every row alike. A slice's op numbers start at 0: an op that needs unique ids makes its own.
#[derive(Default)]
pub struct Slices {
    rows: Vec<(String, Load, Run)>,
}

impl Slices {
    /// Drives `op` under `load` for `load.duration`, adding to the row `name`.
    pub async fn measure<F, Fut>(&mut self, name: &str, load: Load, op: F)
    where
        F: Fn(u64) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), String>> + Send + 'static,
    {
        let run = drive(load, &Arc::new(op), &Arc::new(AtomicU64::new(0))).await;
        match self.rows.iter_mut().find(|(row, _, _)| row == name) {
            Some((_, total, sum)) => {
                total.duration += load.duration;
                sum.merge(run);
            }
            None => self.rows.push((name.to_owned(), load, run)),
        }
    }

    /// The rows, in the order first measured, each over all of its slices.
    pub fn figures(self) -> Vec<Figures> {
        self.rows.into_iter().map(|(name, load, run)| run.into_figures(&name, load)).collect()
    }
}

/// What a stretch of load produced, before it is summed up as figures.
#[derive(Default)]
struct Run {
    tally: Tally,
    dropped: u64,
    elapsed: Duration,
    work: WorkCounters,
}

impl Run {
    fn merge(&mut self, other: Run) {
        self.tally.merge(other.tally);
        self.dropped += other.dropped;
        self.elapsed += other.elapsed;
        self.work.add(other.work);
    }

    fn into_figures(self, name: &str, load: Load) -> Figures {
        let requests = self.tally.latencies_ms.len() as u64;
        let mut figures = self.tally.into_figures(name, load, self.dropped, self.elapsed);
        figures.work = self.work.per_request(requests);
        figures
    }
}

/// Drives `op` under `load` in its mode, numbering requests from `numbers`.
async fn drive<F, Fut>(load: Load, op: &Arc<F>, numbers: &Arc<AtomicU64>) -> Run
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let before = WorkCounters::now();
    let run = match load.mode {
        Mode::Open => open_loop(load, op, numbers).await,
        Mode::Closed | Mode::Batch => closed_loop(load, op, numbers).await,
    };
    Run { work: WorkCounters::now().since(before), ..run }
}

/// `load.concurrency` tasks, each starting its next request as soon as the last answered.
async fn closed_loop<F, Fut>(load: Load, op: &Arc<F>, numbers: &Arc<AtomicU64>) -> Run
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let started = Instant::now();
    let deadline = started + load.duration;
    let workers: Vec<_> = (0..load.concurrency.max(1))
        .map(|_| {
            let (op, numbers) = (Arc::clone(op), Arc::clone(numbers));
            tokio::spawn(async move {
                let mut tally = Tally::default();
                while Instant::now() < deadline {
                    let n = numbers.fetch_add(1, Ordering::Relaxed);
                    if load.max_requests.is_some_and(|max| n >= max) {
                        break;
                    }
                    let begun = Instant::now();
                    let outcome = op(n).await;
                    tally.record(begun.elapsed(), outcome);
                }
                tally
            })
        })
        .collect();
    let mut tally = Tally::default();
    for worker in workers {
        match worker.await {
            Ok(mine) => tally.merge(mine),
            Err(error) => tally.record_joined(Err(error)),
        }
    }
    Run { tally, dropped: 0, elapsed: started.elapsed(), work: WorkCounters::default() }
}

/// Request `i` starts at `i / load.rate` seconds whatever earlier requests do; its latency runs
/// from that scheduled instant, so time spent waiting behind a stall counts. A request due while
/// `load.concurrency` are in flight is dropped rather than queued.
async fn open_loop<F, Fut>(load: Load, op: &Arc<F>, numbers: &Arc<AtomicU64>) -> Run
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send + 'static,
{
    let in_flight = Arc::new(Semaphore::new(load.concurrency.max(1)));
    let mut running = JoinSet::new();
    let (mut tally, mut dropped) = (Tally::default(), 0);
    let rate = load.rate.max(f64::MIN_POSITIVE);
    let started = Instant::now();
    for i in 0u64.. {
        let scheduled = started + Duration::from_secs_f64(i as f64 / rate);
        if scheduled >= started + load.duration {
            break;
        }
        let n = numbers.fetch_add(1, Ordering::Relaxed);
        if load.max_requests.is_some_and(|max| n >= max) {
            break;
        }
        tokio::time::sleep_until(scheduled.into()).await;
        while let Some(joined) = running.try_join_next() {
            tally.record_joined(joined);
        }
        let Ok(permit) = Arc::clone(&in_flight).try_acquire_owned() else {
            dropped += 1;
            continue;
        };
        let op = Arc::clone(op);
        running.spawn(async move {
            let outcome = op(n).await;
            drop(permit);
            (scheduled.elapsed(), outcome)
        });
    }
    while let Some(joined) = running.join_next().await {
        tally.record_joined(joined);
    }
    Run { tally, dropped, elapsed: started.elapsed(), work: WorkCounters::default() }
}

/// What the figures were measured on.
#[derive(Debug, Serialize)]
pub struct Machine {
    pub cores: usize,
    pub cpu: String,
    pub memory_gib: f64,
    pub kernel: String,
    pub rustc: String,
    pub git_commit: String,
    pub date: String,
}

impl Machine {
    pub fn here() -> Self {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let cpu = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split(':').nth(1))
            .map_or_else(|| "unknown CPU".to_owned(), |m| m.trim().to_owned());
        let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
        let memory_kib = meminfo
            .lines()
            .find(|l| l.starts_with("MemTotal:"))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|kib| kib.parse::<f64>().ok())
            .unwrap_or(0.0);
        let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")
            .map_or_else(|_| "unknown".into(), |k| k.trim().to_owned());
        let commit = command_line("git", &["rev-parse", "--short=12", "HEAD"]);
        let dirty = !command_line("git", &["status", "--porcelain", "--untracked-files=no"]).is_empty();
        Machine {
            cores: std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
            cpu,
            memory_gib: (memory_kib / (1024.0 * 1024.0) * 10.0).round() / 10.0,
            kernel,
            rustc: command_line("rustc", &["--version"]),
            git_commit: if dirty { format!("{commit} (with uncommitted changes)") } else { commit },
            date: chrono::Utc::now().format("%Y-%m-%d %H:%M UTC").to_string(),
        }
    }

    fn describe(&self) -> String {
        format!(
            "{} cores ({}), {} GiB memory, Linux {}, {}, commit {}, {}",
            self.cores, self.cpu, self.memory_gib, self.kernel, self.rustc, self.git_commit, self.date
        )
    }
}

/// The first line a command prints, or "unknown" when it cannot run.
fn command_line(program: &str, args: &[&str]) -> String {
    std::process::Command::new(program)
        .args(args)
        .output()
        .ok()
        .filter(|output| output.status.success())
        .map(|output| String::from_utf8_lossy(&output.stdout).lines().next().unwrap_or_default().trim().to_owned())
        .unwrap_or_else(|| "unknown".to_owned())
}

#[derive(Serialize)]
struct Report<'a> {
    machine: &'a Machine,
    load: Load,
    results: Vec<PairReport<'a>>,
}

#[derive(Serialize)]
struct PairReport<'a> {
    #[serde(flatten)]
    pair: &'a Pair,
    headline: String,
    /// The latency chart, beside the report.
    chart: String,
}

/// Writes `report.json`, `report.md` and one `<scenario>.png` latency chart per pair under
/// `dir`; returns the Markdown's path.
pub fn write(dir: &Path, load: Load, results: &[Pair]) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let machine = Machine::here();
    let mut md = format!(
        "# aimesh bench\n\nMachine: {}.\n\nLoad: {}, {} s per measurement (each figure's own load is in its row).\n",
        machine.describe(),
        load.describe(),
        load.duration.as_secs()
    );
    let mut pairs = Vec::with_capacity(results.len());
    for pair in results {
        let chart = format!("{}.png", pair.slug());
        crate::chart::latency_chart(pair, &dir.join(&chart))?;
        md.push_str(&format!(
            "\n## {}\n\n**{}**\n\n\
             | | requests/s | MiB/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | dropped | PostgreSQL per request | Redis per request | CPU µs per request | load |\n\
             |---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|\n",
            pair.scenario.name,
            pair.headline()
        ));
        for (figures, role) in pair.rows() {
            md.push_str(&format!(
                "| {} ({role}) | {:.0} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} | {} | {} | {} | {} |\n",
                figures.name,
                figures.per_second,
                figures.mib_per_second.map(|mib| format!("{mib:.0}")).unwrap_or_default(),
                figures.p50_ms,
                figures.p90_ms,
                figures.p99_ms,
                figures.p999_ms,
                figures.errors,
                figures.dropped,
                figures.work.map(|w| format!("{:.2}", w.postgres)).unwrap_or_default(),
                figures.work.map(|w| format!("{:.2}", w.redis)).unwrap_or_default(),
                figures.work.map(|w| format!("{:.0}", w.cpu_us)).unwrap_or_default(),
                figures.load.describe()
            ));
        }
        if let Some(note) = &pair.note {
            md.push_str(&format!("\n{note}\n"));
        }
        for (figures, _) in pair.rows() {
            if let Some(error) = &figures.first_error {
                md.push_str(&format!("\nfirst error of {}: `{error}`\n", figures.name));
            }
        }
        md.push_str(&format!("\n![latency of {}]({chart})\n", pair.scenario.name));
        pairs.push(PairReport { pair, headline: pair.headline(), chart });
    }
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_vec_pretty(&Report { machine: &machine, load, results: pairs })?,
    )?;
    let path = dir.join("report.md");
    std::fs::write(&path, md)?;
    Ok(path)
}
