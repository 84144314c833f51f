//! Measuring a closed loop and reporting it: throughput, latency quantiles, errors.

use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use serde::Serialize;

/// How hard a scenario is driven.
#[derive(Debug, Clone, Copy, Serialize)]
pub struct Load {
    pub concurrency: usize,
    pub duration: Duration,
    /// Stop after this many requests even if time is left (for passes over a fixed set).
    pub max_requests: Option<u64>,
}

/// The figures of one measured loop.
#[derive(Debug, Clone, Serialize)]
pub struct Figures {
    pub name: String,
    pub requests: u64,
    pub errors: u64,
    pub per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub p999_ms: f64,
    /// The first error seen, to tell what failed.
    pub first_error: Option<String>,
    /// For scenarios that move bytes: throughput in MiB/s.
    pub mib_per_second: Option<f64>,
}

/// A scenario and its baseline, measured in the same run.
#[derive(Debug, Clone, Serialize)]
pub struct Pair {
    pub scenario: Figures,
    pub baseline: Figures,
    /// What the baseline is, in words.
    pub baseline_is: &'static str,
    /// A further figure of the scenario, in words (such as peak memory).
    pub note: Option<String>,
}

impl Pair {
    /// Throughput of the scenario as a share of the baseline's.
    pub fn throughput_ratio(&self) -> f64 {
        if self.baseline.per_second > 0.0 { self.scenario.per_second / self.baseline.per_second } else { 0.0 }
    }

    pub fn render_text(&self) -> String {
        let row = |f: &Figures| {
            format!(
                "  {:<22} {:>10.0}/s{}  p50 {:>7.2} ms  p90 {:>7.2} ms  p99 {:>7.2} ms  p99.9 {:>7.2} ms  errors {}",
                f.name,
                f.per_second,
                f.mib_per_second.map(|mib| format!(" ({mib:.0} MiB/s)")).unwrap_or_default(),
                f.p50_ms,
                f.p90_ms,
                f.p99_ms,
                f.p999_ms,
                f.errors
            )
        };
        let note = self.note.as_ref().map(|note| format!("\n  {note}")).unwrap_or_default();
        format!(
            "{}\n{}   (baseline: {})\n  throughput {:.0}% of the baseline{note}",
            row(&self.scenario),
            row(&self.baseline),
            self.baseline_is,
            self.throughput_ratio() * 100.0
        )
    }
}

/// Runs `op` from `load.concurrency` tasks, each starting its next request as soon as the last
/// answered, for `load.duration`. `op` gets a number unique across the run (for unique ids).
pub async fn closed_loop<F, Fut>(name: &str, load: Load, op: F) -> Figures
where
    F: Fn(u64) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = Result<(), String>> + Send,
{
    let op = Arc::new(op);
    let counter = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + load.duration;
    let workers: Vec<_> = (0..load.concurrency)
        .map(|_| {
            let op = Arc::clone(&op);
            let counter = Arc::clone(&counter);
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                let (mut errors, mut first_error) = (0u64, None);
                while Instant::now() < deadline {
                    let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                    if load.max_requests.is_some_and(|max| n >= max) {
                        break;
                    }
                    let begun = Instant::now();
                    let outcome = op(n).await;
                    latencies.push(begun.elapsed());
                    if let Err(error) = outcome {
                        errors += 1;
                        first_error.get_or_insert(error);
                    }
                }
                (latencies, errors, first_error)
            })
        })
        .collect();
    let mut latencies = Vec::new();
    let (mut errors, mut first_error) = (0, None);
    for worker in workers {
        if let Ok((mine, my_errors, my_first)) = worker.await {
            latencies.extend(mine);
            errors += my_errors;
            if first_error.is_none() {
                first_error = my_first;
            }
        }
    }
    let elapsed = started.elapsed().as_secs_f64();
    latencies.sort_unstable();
    let quantile = |q: f64| -> f64 {
        if latencies.is_empty() {
            return 0.0;
        }
        let index = ((latencies.len() as f64 - 1.0) * q).round() as usize;
        latencies[index.min(latencies.len() - 1)].as_secs_f64() * 1000.0
    };
    Figures {
        name: name.to_owned(),
        requests: latencies.len() as u64,
        errors,
        per_second: (latencies.len() as u64 - errors) as f64 / elapsed,
        p50_ms: quantile(0.50),
        p90_ms: quantile(0.90),
        p99_ms: quantile(0.99),
        p999_ms: quantile(0.999),
        first_error,
        mib_per_second: None,
    }
}

#[derive(Serialize)]
struct Report<'a> {
    machine: String,
    load: Load,
    results: &'a [Pair],
}

/// Writes `report.json` and `report.md` under `dir`; returns the Markdown's path.
pub fn write(dir: &Path, load: Load, results: &[Pair]) -> anyhow::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let machine = machine();
    std::fs::write(
        dir.join("report.json"),
        serde_json::to_vec_pretty(&Report { machine: machine.clone(), load, results })?,
    )?;
    let mut md = format!(
        "# aimesh bench\n\nMachine: {machine}. Closed loop, {} requests in flight, {} s per measurement.\n\n\
         | scenario | requests/s | MiB/s | p50 ms | p90 ms | p99 ms | p99.9 ms | errors | vs baseline |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
        load.concurrency,
        load.duration.as_secs()
    );
    for pair in results {
        for (figures, ratio) in [
            (&pair.scenario, format!("{:.0}%", pair.throughput_ratio() * 100.0)),
            (&pair.baseline, format!("baseline: {}", pair.baseline_is)),
        ] {
            md.push_str(&format!(
                "| {} | {:.0} | {} | {:.2} | {:.2} | {:.2} | {:.2} | {} | {} |\n",
                figures.name,
                figures.per_second,
                figures.mib_per_second.map(|mib| format!("{mib:.0}")).unwrap_or_default(),
                figures.p50_ms,
                figures.p90_ms,
                figures.p99_ms,
                figures.p999_ms,
                figures.errors,
                ratio
            ));
        }
    }
    for note in results.iter().filter_map(|pair| pair.note.as_ref()) {
        md.push_str(&format!("\n{note}\n"));
    }
    let path = dir.join("report.md");
    std::fs::write(&path, md)?;
    Ok(path)
}

fn machine() -> String {
    let cores = std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0);
    let cpu = std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|info| {
            info.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_owned())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{cores} cores, {cpu}")
}
