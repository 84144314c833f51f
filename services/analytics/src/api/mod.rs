//! The gRPC edge of analytics: `IngestService` (internal, the service token only) and
//! `AnalyticsService` (project-scoped questions). A handler decodes and validates, authorizes,
//! calls the store, and encodes.

mod ingest;
mod queries;

use std::sync::Arc;

use chrono::{DateTime, Utc};
use uuid::Uuid;

use aimesh_kit::auth::{Caller, ProjectAccess, ProjectRole};
use aimesh_kit::wire::proto_json;
use aimesh_proto::analytics::v1 as pb;

use crate::config::AnalyticsConfig;
use crate::error::{AnalyticsError, Result};
use crate::store::Store;

/// The scope an API key needs to ask analytics about its project.
const ANALYTICS_READ: &str = "analytics:read";

/// What every handler of analytics works with.
#[derive(Debug)]
pub struct Analytics {
    store: Store,
    access: ProjectAccess,
    config: AnalyticsConfig,
}

impl Analytics {
    pub fn new(store: Store, access: ProjectAccess, config: AnalyticsConfig) -> Arc<Self> {
        Arc::new(Self { store, access, config })
    }

    /// Every gRPC service of analytics, ready for the server.
    pub fn routes(self: &Arc<Self>) -> tonic::service::Routes {
        let ingest = pb::ingest_service_server::IngestServiceServer::new(ingest::IngestApi(Arc::clone(self)))
            .max_decoding_message_size(aimesh_kit::data::outbox::MAX_INGEST_MESSAGE_BYTES);
        tonic::service::Routes::new(ingest)
            .add_service(pb::analytics_service_server::AnalyticsServiceServer::new(queries::QueryApi(Arc::clone(self))))
    }

    /// The fully qualified names of those services, for grpc.health.v1.
    pub const GRPC_SERVICES: [&'static str; 2] =
        ["aimesh.analytics.v1.IngestService", "aimesh.analytics.v1.AnalyticsService"];

    /// Refuses a caller without `needed` in the project (or an API key of it without
    /// analytics:read).
    async fn require(&self, caller: &Caller, project_id: Uuid, needed: ProjectRole) -> Result<()> {
        self.access.require(caller, project_id, needed, ANALYTICS_READ).await?;
        Ok(())
    }
}

/// An optional timestamp field; out of range is an error naming it.
fn time_field(field: &'static str, value: Option<&prost_types::Timestamp>) -> Result<Option<DateTime<Utc>>> {
    value
        .map(|ts| proto_json::from_timestamp(ts).ok_or_else(|| AnalyticsError::invalid(field, "is out of range")))
        .transpose()
}
