//! Read-heavy traffic with and without a read replica: chat ListMessages and identity
//! ListProjects by viewers who write nothing, against one PostgreSQL server of the bench's own
//! with a streaming replica beside it. Two meshes share the same databases and Redis prefix
//! (two deployments of one data set): one reads only the primary, the other reads the replica
//! too. They are measured in alternating slices, so drift falls on both alike. On one machine
//! the replica competes with the primary for the same cores: the figures show what the routing
//! costs and how the load splits, not what a second machine would add.

use std::sync::Arc;
use std::time::Duration;

use aimesh_kit::testing::ScratchPostgres;
use aimesh_proto::chat::v1 as chat_pb;
use aimesh_proto::identity::v1 as pb;
use aimesh_tests::{Mesh, authed, metric, test_config, use_postgres_server};

use crate::report::{Load, Pair, measure_alternating};

/// Sessions read, each with one page of messages.
const SESSIONS: usize = 100;
const MESSAGES_PER_SESSION: u64 = 50;
/// Viewers reading in turn.
const READERS: usize = 8;

/// The scenario: primary plus replica, against the primary alone.
pub async fn read_heavy(load: Load) -> anyhow::Result<Pair> {
    let primary = ScratchPostgres::start();
    let replica = primary.start_replica();
    let (mut config, _shared_server_databases) = test_config();
    config.common.log.filter = "warn".into();
    config.common.database.max_connections = 20;
    config.common.rate_limit.enabled = false;
    use_postgres_server(&mut config, &primary.url(), None);
    let primary_only = Mesh::start_with(config.clone(), Vec::new()).await;
    use_postgres_server(&mut config, &primary.url(), Some(&replica.url()));
    let with_replica = Mesh::start_with(config, Vec::new()).await;

    let owner = primary_only.signup("owner").await;
    let project = primary_only.create_project(&owner, "read heavy").await;
    let sessions = crate::chat::sessions(&primary_only, &owner.token, &project, SESSIONS).await?;
    let mut chat = primary_only.chat();
    for session in &sessions {
        for n in 0..MESSAGES_PER_SESSION {
            chat.append_message(authed(crate::chat::message(session, n), &owner.token)).await?;
        }
    }
    let mut readers = Vec::with_capacity(READERS);
    for n in 0..READERS {
        let reader = primary_only.signup(&format!("reader{n}")).await;
        primary_only.add_member(&owner, &project, &reader, pb::ProjectRole::Viewer).await;
        readers.push(reader.token);
    }
    wait_until_replica_usable().await?;

    let (sessions, readers) = (Arc::new(sessions), Arc::new(readers));
    let (with, without) = measure_alternating(
        load,
        6,
        ("ListMessages and ListProjects, primary + replica", reads(&with_replica, &sessions, &readers)),
        ("ListMessages and ListProjects, primary only", reads(&primary_only, &sessions, &readers)),
    )
    .await;
    let replica_share = replica_share();
    with_replica.stop().await?;
    primary_only.stop().await?;
    let note = format!(
        "{replica_share:.0}% of the replica mesh's routed reads went to the replica; primary and replica share this \
         machine's 2 cores, so the ratio shows the routing's own cost, not a second machine's capacity"
    );
    Ok(Pair::new(with, without, "the same reads with every read on the primary").with_note(note))
}

/// Three reads in four are a page of 50 messages, one in four the reader's project list.
fn reads(
    mesh: &Mesh,
    sessions: &Arc<Vec<String>>,
    readers: &Arc<Vec<String>>,
) -> impl Fn(u64) -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync + 'static {
    let (chat, projects) = (mesh.chat(), mesh.projects());
    let (sessions, readers) = (Arc::clone(sessions), Arc::clone(readers));
    move |n| {
        let token = &readers[n as usize % readers.len()];
        if n % 4 == 3 {
            let mut projects = projects.clone();
            let request = authed(pb::ListProjectsRequest::default(), token);
            return Box::pin(async move {
                let listed = projects.list_projects(request).await.map_err(|s| s.to_string())?.into_inner();
                if listed.projects.len() == 1 { Ok(()) } else { Err(format!("{} projects", listed.projects.len())) }
            });
        }
        let mut chat = chat.clone();
        let session = sessions[n as usize % sessions.len()].clone();
        let request = chat_pb::ListMessagesRequest { session_id: session, page_size: 50, ..Default::default() };
        let request = authed(request, token);
        Box::pin(async move {
            let page = chat.list_messages(request).await.map_err(|s| s.to_string())?.into_inner();
            if page.messages.len() as u64 == MESSAGES_PER_SESSION {
                Ok(())
            } else {
                Err(format!("{} messages", page.messages.len()))
            }
        })
    }
}

async fn wait_until_replica_usable() -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while metric("db_replica_usable", &["database=\"chat\""]) < 1.0
        || metric("db_replica_usable", &["database=\"identity\""]) < 1.0
    {
        anyhow::ensure!(tokio::time::Instant::now() < deadline, "the replica did not become usable within 60 s");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok(())
}

/// The share of routed reads (those of the mesh with a replica) that went to the replica.
fn replica_share() -> f64 {
    let replica = metric("db_reads_total", &["target=\"replica\""]);
    let primary = metric("db_reads_total", &["target=\"primary\""]);
    100.0 * replica / (replica + primary).max(1.0)
}
