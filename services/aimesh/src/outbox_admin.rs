//! `aimesh outbox`: the operator's hands on the outbox dead letters of the services' databases
//! (events analytics refused for good, see [`aimesh_kit::data::outbox`]): list them, and once
//! their cause is fixed, replay them into the outbox, whose relay then delivers them. Each
//! service's database is found, and connected, as `aimesh migrate` does. What is printed goes
//! to standard output, one JSON object per line, and nothing else does: the commands run
//! before logging starts.

use std::io::Write;

use anyhow::Context;
use clap::Subcommand;
use serde_json::json;
use uuid::Uuid;

use aimesh_kit::data::outbox::{self, Replay};

use crate::{MeshConfig, SERVICES_WITH_DATABASE, ServiceName, connect_service_database};

/// What `aimesh outbox` does.
#[derive(Debug, Clone, Subcommand)]
pub enum OutboxCommand {
    /// Prints dead letters, oldest first, one JSON object per line (with its `service` and its
    /// `id`, after which a next page starts).
    DeadLetters {
        /// Only this service's (identity, chat, usage, files); default: every one.
        #[arg(long, value_parser = parse_service)]
        service: Option<ServiceName>,
        /// The most printed per service, 1 to 1000 (default 100).
        #[arg(long)]
        limit: Option<i64>,
        /// Start after this `id` (the last one printed); needs --service.
        #[arg(long, requires = "service")]
        after: Option<i64>,
    },
    /// Moves dead letters back into the service's outbox as pending, with no attempts: the
    /// running relay delivers them. Replaying again changes nothing.
    Replay {
        /// The service whose dead letters to replay (identity, chat, usage, files).
        #[arg(long, value_parser = parse_service)]
        service: ServiceName,
        /// An event to replay (repeat for several, at most 10,000).
        #[arg(long = "event-id", required_unless_present = "all", conflicts_with = "all")]
        event_ids: Vec<Uuid>,
        /// Replay every dead letter of the service.
        #[arg(long)]
        all: bool,
    },
}

/// Reads `--service`: a service with a database of its own.
pub fn parse_service(name: &str) -> Result<ServiceName, String> {
    SERVICES_WITH_DATABASE.into_iter().find(|service| service.as_str() == name).ok_or_else(|| {
        let names: Vec<&str> = SERVICES_WITH_DATABASE.iter().map(|service| service.as_str()).collect();
        format!("{name:?} has no outbox; one of {}", names.join(", "))
    })
}

/// Runs `command`, printing to standard output.
pub async fn run(command: &OutboxCommand, config: &MeshConfig) -> anyhow::Result<()> {
    let mut out = std::io::stdout().lock();
    match command {
        OutboxCommand::DeadLetters { service, limit, after } => {
            let services = service.map_or(SERVICES_WITH_DATABASE.to_vec(), |service| vec![service]);
            for (service, after) in list_dead_letters(config, &services, *after, *limit, &mut out).await? {
                // stderr, so that standard output stays JSON lines.
                eprintln!(
                    "{0}: more dead letters; next page: aimesh outbox dead-letters --service {0} --after {after}",
                    service.as_str()
                );
            }
        }
        OutboxCommand::Replay { service, event_ids, all } => {
            let selection = if *all { Replay::All } else { Replay::Events(event_ids.clone()) };
            replay(config, *service, &selection, &mut out).await?;
        }
    }
    out.flush()?;
    Ok(())
}

/// Writes the dead letters of each of `services` to `out`, oldest first, one JSON object per
/// line (the dead letter and its `service`), at most `limit` per service after id `after`;
/// returns, for each service that has more, the id its next page starts after.
pub async fn list_dead_letters(
    config: &MeshConfig,
    services: &[ServiceName],
    after: Option<i64>,
    limit: Option<i64>,
    out: &mut dyn Write,
) -> anyhow::Result<Vec<(ServiceName, i64)>> {
    let page = outbox::dead_letter_page(after, limit).map_err(as_flag)?;
    let mut more = Vec::new();
    for &service in services {
        let pool = database(config, service).await?;
        let listed = outbox::list_dead_letters(&pool, &page).await;
        pool.close().await;
        let (dead_letters, next) =
            listed.with_context(|| format!("listing the dead letters of {}", service.as_str()))?;
        for dead_letter in &dead_letters {
            let mut line = serde_json::to_value(dead_letter)?;
            if let Some(object) = line.as_object_mut() {
                object.insert("service".into(), service.as_str().into());
            }
            writeln!(out, "{line}")?;
        }
        if let Some(after) = next.as_ref().and_then(|next| next.after()) {
            more.push((service, *after));
        }
    }
    Ok(more)
}

/// Replays `selection` of `service`'s dead letters (see [`outbox::replay_dead_letters`]) and
/// writes one JSON line to `out`: the `service`, the event ids `replayed`, and the ids asked for
/// that were no dead letter (`not_found`: never one, or replayed already); returns the replayed.
pub async fn replay(
    config: &MeshConfig,
    service: ServiceName,
    selection: &Replay,
    out: &mut dyn Write,
) -> anyhow::Result<Vec<Uuid>> {
    selection.validate().map_err(as_flag)?;
    let pool = database(config, service).await?;
    let replayed = outbox::replay_dead_letters(&pool, selection).await;
    pool.close().await;
    let replayed = replayed.with_context(|| format!("replaying the dead letters of {}", service.as_str()))?;
    let not_found: Vec<Uuid> = match selection {
        Replay::Events(ids) => ids.iter().filter(|id| !replayed.contains(id)).copied().collect(),
        Replay::All => Vec::new(),
    };
    writeln!(out, "{}", json!({ "service": service.as_str(), "replayed": replayed, "not_found": not_found }))?;
    Ok(replayed)
}

/// A refused selection as the command line spells it: `--event-id: ...`.
fn as_flag(error: aimesh_kit::ServiceError) -> anyhow::Error {
    let field = error.field.unwrap_or_default();
    let why = error.message.strip_prefix(&format!("{field}: ")).unwrap_or(&error.message).to_owned();
    anyhow::anyhow!("--{}: {why}", field.replace('_', "-"))
}

async fn database(config: &MeshConfig, service: ServiceName) -> anyhow::Result<sqlx::PgPool> {
    connect_service_database(service, config).await?.with_context(|| format!("{} has no database", service.as_str()))
}
