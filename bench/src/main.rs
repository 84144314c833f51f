//! `bench`: drives the mesh, started in this process against the dev servers, and prints each
//! scenario's figures beside a baseline measured in the same run on the same machine: the ratio
//! is the headline, because absolute numbers on a shared 2-core machine drift.
//!
//! `make bench` (or `cargo run --release -p aimesh-bench -- --help` with `.dev/env` loaded).
//! Writes `target/bench/report.json`, `target/bench/report.md` and a latency chart per scenario
//! (`target/bench/<scenario>.png`).

mod analytics;
mod chart;
mod chat;
mod direct;
mod echo;
mod files;
mod floors;
mod gateway;
mod logins;
mod processes;
mod ratelimit;
mod replicas;
mod report;
mod scenarios;
mod work;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Benchmarks of the mesh against the dev servers, each beside a baseline in the same mode.
#[derive(Debug, Parser)]
struct Cli {
    /// Seconds each scenario and each baseline runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// closed: `--concurrency` callers, each sending its next request when the last answers
    /// (throughput at saturation). open: requests start at `--rate` per second whatever the
    /// answers, latency counted from the scheduled start (latency at a given load).
    #[arg(long, value_enum, default_value_t = report::Mode::Closed)]
    mode: report::Mode,
    /// Requests started per second in the open loop.
    #[arg(long, required_if_eq("mode", "open"), value_parser = positive_rate)]
    rate: Option<f64>,
    /// Closed loop: requests in flight. Open loop: the most in flight; a request due beyond it
    /// is dropped and counted.
    #[arg(long, default_value_t = 32, value_parser = clap::value_parser!(u64).range(1..))]
    concurrency: u64,
    /// Scenarios to run (all when none is named).
    #[arg(long, value_enum)]
    scenario: Vec<scenarios::Scenario>,
    /// Where the JSON and Markdown reports go.
    #[arg(long, default_value = "target/bench")]
    out: PathBuf,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // As `aimesh` installs it: production pays for its logging and its database metrics (sqlx's
    // own events, which also count the statements per request; see `work`).
    let log = aimesh_kit::config::LogConfig { filter: "warn".into(), ..Default::default() };
    let _telemetry = aimesh_kit::telemetry::Telemetry::init("bench", &log, &Default::default())?;
    let chosen = if cli.scenario.is_empty() { scenarios::Scenario::ALL.to_vec() } else { cli.scenario.clone() };
    let load = report::Load {
        mode: cli.mode,
        concurrency: usize::try_from(cli.concurrency)?,
        rate: cli.rate.unwrap_or(0.0),
        duration: Duration::from_secs(cli.seconds),
        max_requests: None,
    };
    let mut results = Vec::new();
    for scenario in chosen {
        eprintln!("bench: {scenario:?} ({} s each, {})", cli.seconds, load.describe());
        for pair in scenarios::run(scenario, load).await? {
            println!("{}", pair.render_text());
            results.push(pair);
        }
    }
    let written = report::write(&cli.out, load, &results)?;
    eprintln!("bench: wrote {}", written.display());
    Ok(())
}

fn positive_rate(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(rate) if rate.is_finite() && rate > 0.0 => Ok(rate),
        _ => Err(format!("rate must be a positive number of requests per second, got {text:?}")),
    }
}
