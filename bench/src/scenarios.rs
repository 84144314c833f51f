//! The scenarios and their baselines.

use std::sync::Arc;

use fred::interfaces::LuaInterface;
use tonic::transport::Channel;

use aimesh_kit::testing::ScratchDatabase;
use aimesh_proto::identity::v1 as pb;
use aimesh_proto::usage::v1 as usage_pb;
use aimesh_tests::{Mesh, authed, on_behalf, test_config};

use crate::report::{Load, Pair, measure};

/// What can be measured.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Scenario {
    /// RecordUsage through gRPC, against a raw PostgreSQL INSERT of a usage-sized row.
    UsageRecord,
    /// Reserve through gRPC (one quota decision each), against a raw Redis EVALSHA.
    UsageReserve,
    /// AppendMessage through gRPC, each writer on a session of its own, against a raw
    /// PostgreSQL INSERT.
    ChatAppend,
    /// ListMessages of 50 messages through gRPC: sessions read for the first time (cold
    /// caches) against the same sessions read again (warm).
    ChatList,
    /// Uploads of 16 MiB through the files service (S3 backend) against raw S3 multipart puts
    /// of the same bytes; first, the peak memory of a 1 GiB upload.
    FilesUpload,
    /// Downloads of a 16 MiB file through the files service against raw S3 gets.
    FilesDownload,
    /// GetSession through the REST gateway, against the same call over gRPC directly, and the
    /// bare tonic echo below both.
    Gateway,
    /// One cheap read of each service over gRPC straight to it (identity GetProject, chat
    /// GetSession, usage GetModel, files GetFile, analytics GetRetention), each against the bare
    /// tonic echo (an in-process tonic server with no layers answering grpc.health.v1 Check).
    GrpcDirect,
    /// Usage events from usage's outbox to queryable in analytics (relay, Ingest, ClickHouse),
    /// against a raw ClickHouse INSERT of the same rows in batches as large as the pipeline's own INSERTs were in the same run.
    AnalyticsPipeline,
    /// GetUsageTimeSeries daily cost by model over 10 million events (30 days), against the
    /// same question asked of PostgreSQL (an indexed table of the same rows).
    AnalyticsDailyCost,
    /// RateLimiter::decide of one limit, against redis-benchmark EVALSHA of the same script.
    Ratelimit,
    /// Logins through the gateway, each user from an address of its own, while a flood of
    /// wrong-password logins for other accounts comes from 200 other addresses; against the
    /// same logins with no flood. Prints the success rate, p99 and peak memory.
    LoginFlood,
    /// ListMessages and ListProjects by viewers, on a PostgreSQL server with a streaming
    /// replica: reads routed to primary and replica, against every read on the primary.
    ReadReplicas,
    /// The scaling curve: the mesh as separate processes (one per service, as on Kubernetes)
    /// and RecordUsage across 2 and 4 replicas of usage, each against 1 replica.
    UsageScaling,
}

impl Scenario {
    pub const ALL: [Scenario; 14] = [
        Scenario::UsageRecord,
        Scenario::UsageReserve,
        Scenario::ChatAppend,
        Scenario::ChatList,
        Scenario::FilesUpload,
        Scenario::FilesDownload,
        Scenario::GrpcDirect,
        Scenario::Gateway,
        Scenario::AnalyticsPipeline,
        Scenario::AnalyticsDailyCost,
        Scenario::Ratelimit,
        Scenario::LoginFlood,
        Scenario::ReadReplicas,
        Scenario::UsageScaling,
    ];
}

/// Measures `scenario` and its baseline under `load`: one pair, or one per service for
/// `grpc-direct`.
pub async fn run(scenario: Scenario, load: Load) -> anyhow::Result<Vec<Pair>> {
    match scenario {
        // The files scenarios start a mesh of their own, on the S3 backend.
        Scenario::FilesUpload => Ok(vec![crate::files::upload_scenario(load).await?]),
        Scenario::FilesDownload => Ok(vec![crate::files::download_scenario(load).await?]),
        // Only Redis: no mesh to start.
        Scenario::Ratelimit => Ok(vec![crate::ratelimit::run(load).await?]),
        Scenario::LoginFlood => Ok(vec![crate::logins::under_flood(load).await?]),
        // A PostgreSQL server and replica of its own.
        Scenario::ReadReplicas => Ok(vec![crate::replicas::read_heavy(load).await?]),
        // The mesh as processes of its own.
        Scenario::UsageScaling => usage_scaling(load).await,
        Scenario::UsageRecord
        | Scenario::UsageReserve
        | Scenario::ChatAppend
        | Scenario::ChatList
        | Scenario::Gateway
        | Scenario::GrpcDirect
        | Scenario::AnalyticsPipeline
        | Scenario::AnalyticsDailyCost => run_with_setup(scenario, load).await,
    }
}

async fn run_with_setup(scenario: Scenario, load: Load) -> anyhow::Result<Vec<Pair>> {
    let setup = Setup::start().await?;
    let pair = match scenario {
        Scenario::UsageRecord => {
            let scenario = setup.record_usage(load).await;
            let floor = crate::floors::record_usage(&setup.mesh, setup.writer, setup.pool_size, load).await?;
            let raw = postgres_insert(load, setup.pool_size).await?;
            Pair::new(scenario, floor, FLOOR_IS).with_reference(raw, RAW_INSERT_IS)
        }
        Scenario::UsageReserve => {
            let scenario = setup.reserve(load).await;
            let floor =
                crate::floors::reserve(&setup.mesh, setup.writer, Setup::project_limits()?, setup.pool_size, load)
                    .await?;
            let raw = redis_evalsha(&setup.mesh, load).await?;
            Pair::new(scenario, floor, FLOOR_IS)
                .with_reference(raw, "EVALSHA of a one-INCRBY script on the Redis Cluster")
        }
        Scenario::ChatAppend => {
            let ids = crate::chat::sessions(&setup.mesh, &setup.owner_token, &setup.project, load.concurrency).await?;
            let uuids = ids.iter().map(|id| uuid::Uuid::parse_str(id)).collect::<Result<Vec<_>, _>>()?;
            let scenario = crate::chat::append(&setup.mesh, &setup.owner_token, ids, load).await?;
            let floor = crate::floors::append_message(&setup.mesh, setup.writer, uuids, setup.pool_size, load).await?;
            let raw = postgres_insert(load, setup.pool_size).await?;
            Pair::new(scenario, floor, FLOOR_IS).with_reference(raw, RAW_INSERT_IS)
        }
        Scenario::ChatList => {
            let (cold, warm) = crate::chat::list(&setup.mesh, &setup.owner_token, &setup.project, load).await?;
            Pair::new(cold, warm, "the same sessions listed again, caches warm")
        }
        Scenario::Gateway => {
            let (rest, grpc) =
                crate::gateway::get_session(&setup.mesh, &setup.owner_token, &setup.project, load).await?;
            let echo = crate::echo::measure_once(load).await?;
            let note = format!(
                "gateway adds {:.2} ms at p50 and {:.2} ms at p99 (target at 32 in flight: at least 85% of direct throughput; at 1 in flight: under 0.3 ms at p50)",
                rest.p50_ms - grpc.p50_ms,
                rest.p99_ms - grpc.p99_ms
            );
            Pair::new(rest, grpc, "the same GetSession over gRPC, straight to chat")
                .with_reference(echo, crate::echo::ECHO_IS)
                .with_note(note)
        }
        Scenario::AnalyticsPipeline => {
            let scenario = crate::analytics::pipeline(&setup.mesh).await?;
            let baseline = crate::analytics::raw_insert(&setup.mesh).await?;
            Pair::new(
                scenario,
                baseline,
                "RowBinary INSERT of the same rows, batches the size of the pipeline's INSERTs",
            )
        }
        Scenario::AnalyticsDailyCost => {
            let runs = 10;
            let scenario =
                crate::analytics::daily_cost_clickhouse(&setup.mesh, &setup.owner_token, &setup.project, runs).await?;
            let raw = crate::analytics::daily_cost_raw_clickhouse(&setup.mesh, &setup.project, runs).await?;
            let baseline = crate::analytics::daily_cost_postgres(runs).await?;
            Pair::new(scenario, baseline, "the same question of PostgreSQL, 10M rows indexed by project and time")
                .with_reference(raw, "the same question as SQL over ClickHouse's raw rows, no service, no rollup")
                .with_note("compare the p50s: each figure is one query over the whole data set, one at a time (closed loop whatever the mode)")
        }
        Scenario::GrpcDirect => {
            let subjects = crate::direct::Subjects {
                mesh: &setup.mesh,
                token: &setup.owner_token,
                project: &setup.project,
                model: &setup.model,
            };
            let pairs = crate::direct::reads(&subjects, load).await?;
            setup.mesh.stop().await?;
            return Ok(pairs);
        }
        Scenario::FilesUpload
        | Scenario::FilesDownload
        | Scenario::Ratelimit
        | Scenario::LoginFlood
        | Scenario::ReadReplicas
        | Scenario::UsageScaling => {
            anyhow::bail!("this scenario sets up what it needs itself")
        }
    };
    setup.mesh.stop().await?;
    Ok(vec![pair])
}

/// Replicas of usage on the scaling curve, reached by adding processes as a scale-up does, then
/// again in reverse by stopping them as a scale-down does.
const USAGE_REPLICAS: [usize; 3] = [1, 2, 4];

/// Usage is the busiest service (every model call reserves and records), so the curve is of its
/// replicas: the whole mesh runs as processes, the setup is done through them, then RecordUsage
/// is measured with 1, 2 and 4 usage processes, the client balancing round robin over them and
/// the load growing with them (`load` per replica: as many in flight, or as high a rate, times
/// the replicas), as the traffic that makes an autoscaler add replicas does. Each count is
/// measured for half the duration on the way up (1, 2, 4) and half on the way down (4, 2, 1,
/// replicas stopped with SIGTERM), so drift of the machine falls on every row alike. Each
/// replica has its own pools (as many PostgreSQL connections as the other scenarios' mesh) and
/// its own outbox relay. Every process shares this machine's cores with the stores and the load
/// generator: the curve shows what a replica costs (CPU per request of every process, memory),
/// not the capacity another machine would add.
async fn usage_scaling(load: Load) -> anyhow::Result<Vec<Pair>> {
    let (config, databases) = Setup::config();
    let listeners = aimesh::bind(&aimesh::ServiceName::ALL, &config).await?;
    let config = config.in_one_process(&listeners)?;
    let addresses = aimesh::local_addresses(&listeners)?;
    drop(listeners);
    let mut processes = crate::processes::MeshProcesses::new(&config)?;
    for &(service, address) in &addresses {
        processes.start(service, address).await?;
    }
    let setup = Setup::on(Mesh::attach(config, &addresses, databases).await).await?;

    let name = |replicas: usize| format!("usage.RecordUsage, usage x{replicas}");
    let slice = Load { duration: load.duration / 2, ..load };
    let mut slices = crate::report::Slices::default();
    // Per replica count: the work of each process over its slices, and the replicas' memory.
    let mut work: Vec<(usize, WorkByProcess, Vec<f64>)> = Vec::new();
    let mut replicas = vec![setup.mesh.usage];
    for wanted in USAGE_REPLICAS.into_iter().chain(USAGE_REPLICAS.into_iter().rev()) {
        while replicas.len() < wanted {
            let address = crate::processes::free_address()?;
            processes.start(aimesh::ServiceName::Usage, address).await?;
            replicas.push(address);
        }
        while replicas.len() > wanted {
            processes.stop_last(aimesh::ServiceName::Usage).await?;
            replicas.pop();
        }
        let clients = replicas
            .iter()
            .map(|&address| usage_pb::usage_service_client::UsageServiceClient::new(aimesh_tests::channel(address)))
            .collect();
        let (before, client_before) = (processes.work_by_service().await?, crate::work::WorkCounters::now());
        slices.measure(&name(wanted), slice.times(wanted), setup.record_usage_on(clients)).await;
        let (after, client_after) = (processes.work_by_service().await?, crate::work::WorkCounters::now());
        let mut spent = vec![("client".to_owned(), client_after.since(client_before))];
        for (service, total) in after {
            let earlier = before.iter().find(|(s, _)| *s == service).map(|(_, w)| *w).unwrap_or_default();
            spent.push((service.as_str().to_owned(), total.since(earlier)));
        }
        let resident = processes.resident_mib(aimesh::ServiceName::Usage);
        match work.iter_mut().find(|(count, _, _)| *count == wanted) {
            Some((_, sum, _)) => add_by_name(sum, spent),
            None => work.push((wanted, spent, resident)),
        }
    }
    processes.stop().await?;
    setup.mesh.stop().await?;

    let mut curve = Vec::with_capacity(USAGE_REPLICAS.len());
    for (mut figures, (wanted, spent, resident)) in slices.figures().into_iter().zip(work) {
        let requests = figures.requests;
        let mut total = crate::work::WorkCounters::default();
        spent.iter().for_each(|(_, work)| total.add(*work));
        figures.work = total.per_request(requests);
        let cpu: Vec<String> = spent
            .iter()
            .filter_map(|(process, work)| Some(format!("{process} {:.0}", work.per_request(requests)?.cpu_us)))
            .collect();
        let resident: Vec<String> = resident.iter().map(|mib| format!("{mib:.0}")).collect();
        let note = format!(
            "usage x{wanted}: CPU us per request by process: {}; usage replicas resident {} MiB (on the way up)",
            cpu.join(", "),
            resident.join(", ")
        );
        curve.push((figures, note));
    }
    let mut curve = curve.into_iter();
    let (one, one_note) = curve.next().ok_or_else(|| anyhow::anyhow!("the curve starts at one replica"))?;
    Ok(curve
        .map(|(more, note)| {
            Pair::new(more, one.clone(), "the same calls to one usage process (all processes as above)")
                .with_note(format!("{note}\n  {one_note}"))
        })
        .collect())
}

/// The work of each process of the mesh (by service; the load generator as "client").
type WorkByProcess = Vec<(String, crate::work::WorkCounters)>;

/// Adds each process's work in `more` to the same process's in `sum`.
fn add_by_name(sum: &mut WorkByProcess, more: WorkByProcess) {
    for (process, work) in more {
        if let Some((_, total)) = sum.iter_mut().find(|(name, _)| *name == process) {
            total.add(work);
        }
    }
}

/// The baseline of the write scenarios (see `floors`).
const FLOOR_IS: &str = "floor: the store operations the RPC's promise needs, raw, same pool size";
const RAW_INSERT_IS: &str = "INSERT of a usage row with sqlx, same pool size";

/// A mesh with a priced model, a project with a generous quota, and a key that records usage.
struct Setup {
    mesh: Mesh,
    project: String,
    secret: String,
    owner_token: String,
    /// The priced model's id.
    model: String,
    pool_size: u32,
    /// The ids of the owner, the project, the key and the model, for the floors.
    writer: crate::floors::Writer,
}

impl Setup {
    async fn start() -> anyhow::Result<Self> {
        let (config, databases) = Self::config();
        Self::on(Mesh::start_with(config, databases).await).await
    }

    /// The mesh's configuration for the scenarios, and its fresh databases.
    fn config() -> (aimesh::MeshConfig, Vec<ScratchDatabase>) {
        let (mut config, databases) = test_config();
        config.common.database.max_connections = 20;
        config.common.log.filter = "warn".into();
        // Large deliveries keep the pipeline's cost per event low; the relay polls at the
        // production default (an idle relay polling every 20 ms made ClickHouse, on these same
        // two cores, take most of a core from every other scenario).
        config.common.outbox.batch_size = 2000;
        config.common.outbox.poll_interval_ms = aimesh_kit::config::OutboxConfig::default().poll_interval_ms;
        // Rate limiting stays on, as in production, but one caller's load must never reach it.
        let unreachable = 1_000_000_000;
        (config.common.rate_limit.per_user, config.common.rate_limit.per_api_key) = (unreachable, unreachable);
        (config.common.rate_limit.per_project, config.common.rate_limit.per_ip) = (unreachable, unreachable);
        (config, databases)
    }

    /// Creates on `mesh` what the scenarios use.
    async fn on(mesh: Mesh) -> anyhow::Result<Self> {
        let pool_size = mesh.config.common.database.max_connections;
        let admin = mesh.signup("root").await;
        let admin = mesh.make_admin(&admin).await;
        let model = usage_pb::Model {
            provider: "openai".into(),
            name: "gpt-4o".into(),
            version: "1".into(),
            r#type: usage_pb::ModelType::Chat.into(),
            ..Default::default()
        };
        let model = mesh
            .models()
            .create_model(authed(usage_pb::CreateModelRequest { model: Some(model) }, &admin.token))
            .await?;
        let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH)?;
        let price = usage_pb::ModelPrice {
            input_per_million: "2.50".into(),
            output_per_million: "10".into(),
            cached_input_per_million: "1.25".into(),
            effective_time: Some(prost_timestamp(now.as_secs())),
            ..Default::default()
        };
        let model = model.into_inner().id;
        let set = usage_pb::SetModelPriceRequest { model_id: model.clone(), price: Some(price) };
        mesh.models().set_model_price(authed(set, &admin.token)).await?;

        let owner = mesh.signup("owner").await;
        let project = mesh
            .projects()
            .create_project(authed(
                pb::CreateProjectRequest { name: "Bench".into(), description: String::new() },
                &owner.token,
            ))
            .await?
            .into_inner()
            .id;
        let limits = Self::project_limits()?;
        let quota = usage_pb::Quota {
            project_id: project.clone(),
            scope: usage_pb::QuotaScope::Project.into(),
            tokens_per_day: limits.tokens_per_day,
            requests_per_minute: limits.requests_per_minute,
            ..Default::default()
        };
        mesh.quotas().set_quota(authed(usage_pb::SetQuotaRequest { quota: Some(quota) }, &owner.token)).await?;
        let key = pb::CreateApiKeyRequest {
            project_id: project.clone(),
            name: "bench".into(),
            scopes: vec!["usage:write".into(), "usage:read".into()],
            expire_time: None,
            requests_per_minute: 0,
            project_owned: false,
        };
        let created = mesh.api_keys().create_api_key(authed(key, &owner.token)).await?.into_inner();
        let writer = crate::floors::Writer {
            project: project.parse()?,
            user: owner.user_id.parse()?,
            api_key: created.api_key.map(|key| key.id).unwrap_or_default().parse()?,
            model: model.parse()?,
        };
        Ok(Self { mesh, project, secret: created.secret, owner_token: owner.token, model, pool_size, writer })
    }

    /// The project's quota: far above what any run reaches.
    fn project_limits() -> anyhow::Result<aimesh_usage::domain::QuotaLimits> {
        Ok(aimesh_usage::domain::QuotaLimits::validate(1_000_000_000_000, "", 1_000_000_000, 0, 0)?)
    }

    async fn record_usage(&self, load: Load) -> crate::report::Figures {
        measure("usage.RecordUsage", load, self.record_usage_on(vec![self.mesh.usage()])).await
    }

    /// A RecordUsage call per op, each with a request id of its own, op n to
    /// `replicas[n % replicas.len()]` (round robin, as a client balancing over a headless
    /// Service does).
    fn record_usage_on(
        &self,
        replicas: Vec<usage_pb::usage_service_client::UsageServiceClient<Channel>>,
    ) -> impl Fn(u64) -> futures::future::BoxFuture<'static, Result<(), String>> + Send + Sync + 'static {
        let (project, secret) = (self.project.clone(), self.secret.clone());
        // An internal RPC: called as chat would, on behalf of the key.
        let token = self.mesh.service_token();
        let run = uuid::Uuid::new_v4().simple().to_string();
        move |n| {
            let mut client = replicas[n as usize % replicas.len()].clone();
            let request = usage_pb::RecordUsageRequest {
                request_id: format!("{run}-{n}"),
                project_id: project.clone(),
                model: "gpt-4o".into(),
                request_type: "chat".into(),
                input_tokens: 1200,
                cached_input_tokens: 200,
                output_tokens: 300,
                duration_ms: 900,
                status: usage_pb::UsageStatus::Success.into(),
                ..Default::default()
            };
            let request = on_behalf(request, &token, &secret);
            Box::pin(async move { client.record_usage(request).await.map(drop).map_err(|s| s.to_string()) })
        }
    }

    async fn reserve(&self, load: Load) -> crate::report::Figures {
        let client = self.mesh.quotas();
        let (project, secret) = (self.project.clone(), self.secret.clone());
        let token = self.mesh.service_token();
        measure("usage.Reserve", load, move |_| {
            let mut client = client.clone();
            let request = usage_pb::ReserveRequest {
                project_id: project.clone(),
                model: "gpt-4o".into(),
                estimated_input_tokens: 1000,
                estimated_output_tokens: 500,
                ttl_seconds: 5,
                ..Default::default()
            };
            let request = on_behalf(request, &token, &secret);
            async move { client.reserve(request).await.map(drop).map_err(|s| s.to_string()) }
        })
        .await
    }
}

fn prost_timestamp(seconds: u64) -> prost_types::Timestamp {
    prost_types::Timestamp { seconds: i64::try_from(seconds).unwrap_or(i64::MAX), nanos: 0 }
}

/// The raw cost of writing a usage-sized row: a pool as large as the service's, one INSERT
/// per request, into a scratch database.
async fn postgres_insert(load: Load, pool_size: u32) -> anyhow::Result<crate::report::Figures> {
    let scratch = ScratchDatabase::new();
    aimesh_kit::data::db::ensure_database(&scratch.url).await?;
    let settings = aimesh_kit::config::DatabaseConfig { max_connections: pool_size, ..Default::default() };
    let pool = aimesh_kit::data::db::connect(&scratch.url, &settings).await?;
    sqlx::query(
        "CREATE TABLE rows (id UUID PRIMARY KEY, project_id UUID NOT NULL, user_id UUID NOT NULL, model_id UUID NOT NULL, \
         request_type TEXT NOT NULL, input_tokens BIGINT NOT NULL, output_tokens BIGINT NOT NULL, \
         cost NUMERIC(20, 10) NOT NULL, duration_ms BIGINT NOT NULL, status TEXT NOT NULL, created_at TIMESTAMPTZ NOT NULL DEFAULT now())",
    )
    .execute(&pool)
    .await?;
    let pool = Arc::new(pool);
    let (project, user, model) = (uuid::Uuid::new_v4(), uuid::Uuid::new_v4(), uuid::Uuid::new_v4());
    let figures = measure("postgres INSERT", load, move |_| {
        let pool = Arc::clone(&pool);
        async move {
            sqlx::query(
                "INSERT INTO rows (id, project_id, user_id, model_id, request_type, input_tokens, output_tokens, cost, duration_ms, status) \
                 VALUES ($1, $2, $3, $4, 'chat', 1200, 300, 0.0050000000, 900, 'success')",
            )
            .bind(uuid::Uuid::now_v7())
            .bind(project)
            .bind(user)
            .bind(model)
            .execute(pool.as_ref())
            .await
            .map(drop)
            .map_err(|e| e.to_string())
        }
    })
    .await;
    Ok(figures)
}

/// The raw cost of one Lua decision on the cluster: EVALSHA of a one-INCRBY script on one key.
async fn redis_evalsha(mesh: &Mesh, load: Load) -> anyhow::Result<crate::report::Figures> {
    let common = &mesh.config.common;
    let redis = aimesh_kit::data::redis::Redis::connect(&common.redis_urls, &common.redis).await?;
    let key = redis.key("bench", "{evalsha}:counter");
    let script = "return redis.call('INCRBY', KEYS[1], ARGV[1])";
    let sha: String = redis.pool().script_load_cluster(script).await?;
    let redis = Arc::new(redis);
    Ok(measure("redis EVALSHA", load, move |_| {
        let (redis, key, sha) = (Arc::clone(&redis), key.clone(), sha.clone());
        async move {
            let call = redis.pool().evalsha::<i64, _, _, _>(sha, key, 1);
            aimesh_kit::data::redis::timed("bench", call).await.map(drop).map_err(|e| e.to_string())
        }
    })
    .await)
}
