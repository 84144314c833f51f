//! One service's life, the same for every service: connect the shared stores, take the service's
//! own database (pool metrics, health, and the relay of its outbox to analytics), run its
//! periodic tasks, serve, and stop in the order that loses nothing. A service's startup is its
//! own parts and a [`ServiceRuntime`]; nothing of this sequence is written twice, so no service
//! can forget a part of it.
//!
//! The stop, after `shutdown`: the server drains (see [`crate::serving::server::serve`]), then the periodic
//! tasks end (those made with [`ServiceRuntime::every_and_at_stop`] run once more, for what the
//! last requests left), then the outbox relay delivers what is due one last time (events the
//! tasks wrote included), then Redis and the database close.

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::auth::CredentialVerifier;
use crate::auth::ProjectAccess;
use crate::config::{CommonConfig, DatabaseUrls};
use crate::data::cache::InvalidationBus;
use crate::data::outbox::RelayTask;
use crate::data::redis::Redis;
use crate::data::replicas::Database;
use crate::serving::ratelimit::RateLimiter;
use crate::serving::server::{Dependency, Probe, ServiceSpec};

/// How often pool gauges are published.
const POOL_METRICS_INTERVAL: Duration = Duration::from_secs(5);

/// A service being started: its shared stores, its database, its background work. Built with
/// [`ServiceRuntime::start`], then [`ServiceRuntime::with_database`] and
/// [`ServiceRuntime::every`] as the service needs, and run with [`ServiceRuntime::serve`].
pub struct ServiceRuntime {
    name: &'static str,
    common: CommonConfig,
    redis: Redis,
    bus: InvalidationBus,
    database: Option<(Database, RelayTask)>,
    dependencies: Vec<Dependency>,
    stop_tasks: CancellationToken,
    tasks: JoinSet<()>,
}

impl std::fmt::Debug for ServiceRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceRuntime").field("name", &self.name).finish_non_exhaustive()
    }
}

impl ServiceRuntime {
    /// Connects the shared Redis and subscribes to cache invalidations.
    pub async fn start(name: &'static str, common: CommonConfig) -> anyhow::Result<Self> {
        let redis = Redis::connect(&common.redis_urls, &common.redis).await.context("connecting to redis")?;
        redis.log_errors();
        let bus = InvalidationBus::start(&redis).await.context("subscribing to cache invalidations")?;
        Ok(Self {
            name,
            common,
            dependencies: vec![Dependency::Redis(redis.clone())],
            redis,
            bus,
            database: None,
            stop_tasks: CancellationToken::new(),
            tasks: JoinSet::new(),
        })
    }

    /// Takes the service's own database, `primary` (migrated, so with an outbox table: see
    /// [`crate::data::db::service_database`]) and the read replicas of `urls`: health follows
    /// the primary, every pool is measured, the replicas are checked, and the outbox is relayed
    /// to analytics until the service stops. The database is then [`ServiceRuntime::database`].
    pub fn with_database(mut self, primary: PgPool, urls: &DatabaseUrls) -> anyhow::Result<Self> {
        let replicas = crate::data::db::replica_pools(urls, &self.common.database)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("database_replica_urls")?;
        let database = Database::new(self.name, primary.clone(), replicas, self.redis.clone(), &self.common.database);
        // The relay's task follows the current span: its statements are the service's.
        let relay = crate::telemetry::service_span(self.name)
            .in_scope(|| crate::data::outbox::spawn_relay(primary.clone(), &self.common))
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("starting the outbox relay")?;
        let (measured, name) = (database.clone(), self.name);
        self.every(POOL_METRICS_INTERVAL, move || {
            crate::data::db::publish_pool_metrics(&measured, name);
            async {}
        });
        if let Some(interval) = database.replica_check_interval() {
            let checked = database.clone();
            self.every(interval, move || {
                let checked = checked.clone();
                async move { checked.check_replicas().await }
            });
        }
        self.dependencies.push(Dependency::Postgres(primary));
        self.database = Some((database, relay));
        Ok(self)
    }

    /// The service's database (see [`ServiceRuntime::with_database`]); without one, an error.
    pub fn database(&self) -> anyhow::Result<Database> {
        self.database.as_ref().map(|(database, _)| database.clone()).context("the service has no database")
    }

    /// Makes health follow another store of the service's own (ClickHouse).
    pub fn depending_on(mut self, probe: Arc<dyn Probe>) -> Self {
        self.dependencies.push(Dependency::Other(probe));
        self
    }

    /// Runs `task` at once and then every `interval` until the server has stopped.
    pub fn every<F, Fut>(&mut self, interval: Duration, task: F) -> &mut Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop_tasks.clone();
        let task = async move { crate::serving::periodic::every(interval, &stop, task).await };
        self.tasks.spawn(task.instrument(crate::telemetry::service_span(self.name)));
        self
    }

    /// Like [`ServiceRuntime::every`], and once more after the server has stopped, for work the
    /// last requests left behind.
    pub fn every_and_at_stop<F, Fut>(&mut self, interval: Duration, mut task: F) -> &mut Self
    where
        F: FnMut() -> Fut + Send + 'static,
        Fut: Future<Output = ()> + Send + 'static,
    {
        let stop = self.stop_tasks.clone();
        let task = async move {
            crate::serving::periodic::every(interval, &stop, &mut task).await;
            task().await;
        };
        self.tasks.spawn(task.instrument(crate::telemetry::service_span(self.name)));
        self
    }

    pub fn common(&self) -> &CommonConfig {
        &self.common
    }

    pub fn redis(&self) -> &Redis {
        &self.redis
    }

    pub fn bus(&self) -> &InvalidationBus {
        &self.bus
    }

    /// The credential verifier and project access of a service that asks identity
    /// (`services.identity`), cached in Redis and kept fresh by the invalidation bus.
    pub fn identity_access(&self) -> anyhow::Result<(CredentialVerifier, ProjectAccess)> {
        crate::auth::remote(&self.redis, &self.bus, &self.common.auth, &self.common.services.identity)
            .map_err(|e| anyhow::anyhow!("{e}"))
            .context("services.identity")
    }

    /// Serves `routes` on `listener`, authenticating with `verifier` and rate limiting in the
    /// shared Redis, until `shutdown`; then stops everything in order (see the module's doc).
    pub async fn serve(
        mut self,
        listener: TcpListener,
        routes: tonic::service::Routes,
        grpc_services: &[&'static str],
        verifier: CredentialVerifier,
        shutdown: CancellationToken,
    ) -> anyhow::Result<()> {
        let limiter = RateLimiter::new(self.redis.clone(), &self.common.rate_limit);
        let spec = ServiceSpec {
            name: self.name,
            database: self.database.as_ref().map(|(database, _)| database.clone()),
            routes,
            grpc_services: grpc_services.to_vec(),
            dependencies: std::mem::take(&mut self.dependencies),
        };
        let gateway_token = self.common.auth.gateway_token.clone();
        let settings = self.common.server.clone();
        let served =
            crate::serving::server::serve(listener, spec, verifier, limiter, gateway_token, settings, shutdown).await;
        self.stop_tasks.cancel();
        while let Some(ended) = self.tasks.join_next().await {
            if let Err(error) = ended {
                tracing::error!(service = self.name, %error, "a periodic task panicked");
            }
        }
        if let Some((database, relay)) = self.database.take() {
            relay.stop().await;
            self.redis.quit().await;
            database.close().await;
        } else {
            self.redis.quit().await;
        }
        served
    }
}
