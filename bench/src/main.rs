//! `bench`: drives the mesh, started in this process against the dev servers, and prints each
//! scenario's figures beside a baseline measured in the same run on the same machine: the ratio
//! is the headline, because absolute numbers on a shared 2-core machine drift.
//!
//! `make bench` (or `cargo run --release -p aimesh-bench -- --help` with `.dev/env` loaded).
//! Writes `target/bench/report.json` and `target/bench/report.md`.

mod analytics;
mod chat;
mod files;
mod gateway;
mod ratelimit;
mod report;
mod scenarios;

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

/// Closed-loop benchmarks of the mesh against the dev servers.
#[derive(Debug, Parser)]
struct Cli {
    /// Seconds each scenario and each baseline runs.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Requests in flight at once (one task each, a new request as soon as one answers).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
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
    let chosen = if cli.scenario.is_empty() { scenarios::Scenario::ALL.to_vec() } else { cli.scenario.clone() };
    let load =
        report::Load { concurrency: cli.concurrency, duration: Duration::from_secs(cli.seconds), max_requests: None };
    let mut results = Vec::new();
    for scenario in chosen {
        eprintln!("bench: {scenario:?} ({} s each, {} in flight)", cli.seconds, cli.concurrency);
        let pair = scenarios::run(scenario, load).await?;
        println!("{}", pair.render_text());
        results.push(pair);
    }
    let written = report::write(&cli.out, load, &results)?;
    eprintln!("bench: wrote {}", written.display());
    Ok(())
}
