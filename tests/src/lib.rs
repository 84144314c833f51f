//! The end-to-end harness: [`Mesh`] starts the services in-process, through the same code as
//! `aimesh all`, on 127.0.0.1:0 listeners, against the real PostgreSQL and Redis Cluster of the
//! test run, with databases and a Redis key prefix of their own.

use std::net::SocketAddr;
use std::time::Duration;

use base64::Engine;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use aimesh::{MeshConfig, ServiceName};
use aimesh_kit::testing::{self, ScratchDatabase};
use aimesh_proto::analytics::v1 as analytics_pb;
use aimesh_proto::chat::v1 as chat_pb;
use aimesh_proto::files::v1 as files_pb;
use aimesh_proto::identity::v1 as pb;
use aimesh_proto::usage::v1 as usage_pb;

pub mod rest;
pub mod totals;

/// A running mesh; stops (and drops its databases) when dropped or [`Mesh::stop`]ped.
pub struct Mesh {
    pub config: MeshConfig,
    pub identity: SocketAddr,
    pub chat: SocketAddr,
    pub usage: SocketAddr,
    /// The REST gateway (HTTP).
    pub gateway: SocketAddr,
    pub files: SocketAddr,
    pub analytics: SocketAddr,
    shutdown: CancellationToken,
    task: Option<JoinHandle<anyhow::Result<()>>>,
    databases: Vec<ScratchDatabase>,
}

impl std::fmt::Debug for Mesh {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Mesh").field("identity", &self.identity).finish_non_exhaustive()
    }
}

/// The configuration of a fresh mesh: test servers, fresh names, short flush intervals.
pub fn test_config() -> (MeshConfig, Vec<ScratchDatabase>) {
    let identity_db = ScratchDatabase::new();
    let usage_db = ScratchDatabase::new();
    let chat_db = ScratchDatabase::new();
    let files_db = ScratchDatabase::new();
    let mut config = MeshConfig::default();
    config.common.postgres_url = testing::postgres_url();
    config.common.redis_urls = testing::redis_urls();
    config.common.redis.key_prefix = format!("test-{}", uuid::Uuid::new_v4().simple());
    config.common.metrics.listen = None;
    config.common.database.max_connections = 5;
    config.common.database.min_connections = 0;
    config.common.server.shutdown_grace_secs = 5;
    config.identity.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.identity.database.url = Some(identity_db.url.clone());
    config.identity.last_use_flush_secs = 1;
    config.identity.settings_key = Some(base64::engine::general_purpose::STANDARD.encode([42u8; 32]));
    config.usage.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.usage.database.url = Some(usage_db.url.clone());
    config.chat.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.chat.database.url = Some(chat_db.url.clone());
    config.gateway.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.files.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.files.database.url = Some(files_db.url.clone());
    // Removed with the mesh (see Drop).
    config.files.fs_root = std::env::temp_dir().join(format!("{SCRATCH_DIR_PREFIX}{}", uuid::Uuid::new_v4().simple()));
    config.analytics.listen = SocketAddr::from(([127, 0, 0, 1], 0));
    config.analytics.clickhouse_url = clickhouse_url();
    config.analytics.clickhouse_database = format!("aimesh_test_{}", uuid::Uuid::new_v4().simple());
    config.common.outbox.poll_interval_ms = 50;
    config.common.outbox.initial_backoff_ms = 200;
    config.common.outbox.max_backoff_secs = 1;
    // Known to the test (not made up inside the mesh), so another gateway can join it.
    config.common.auth.service_token = Some(aimesh_kit::auth::ServiceToken::generate());
    (config, vec![identity_db, usage_db, chat_db, files_db])
}

/// Names of the fs backend's directories the tests make (and remove).
const SCRATCH_DIR_PREFIX: &str = "aimesh-test-files-";

/// Puts every service's database on the PostgreSQL server `primary` (`postgres://...` without a
/// database: a server of the test's own), with a read replica of each on `replica` if given.
pub fn use_postgres_server(config: &mut MeshConfig, primary: &str, replica: Option<&str>) {
    config.common.postgres_url = primary.to_owned();
    for (database, name) in [
        (&mut config.identity.database, "identity"),
        (&mut config.chat.database, "chat"),
        (&mut config.usage.database, "usage"),
        (&mut config.files.database, "files"),
    ] {
        database.url = Some(format!("{primary}/{name}"));
        database.replica_urls = replica.map(|replica| vec![format!("{replica}/{name}")]).unwrap_or_default();
    }
}

/// Switches `config` to the S3 server of the test run (`AIMESH_S3_*`, written by deps.sh).
pub fn use_s3(config: &mut MeshConfig) {
    let var = |name: &str| {
        std::env::var(name)
            .unwrap_or_else(|_| panic!("{name} is not set: run `make test`, which starts S3 and sets it"))
    };
    config.files.backend = aimesh_files::config::Backend::S3;
    config.files.s3 = aimesh_files::config::S3Config {
        endpoint: Some(var("AIMESH_S3_ENDPOINT")),
        bucket: var("AIMESH_S3_BUCKET"),
        region: var("AIMESH_S3_REGION"),
        access_key_id: Some(var("AIMESH_S3_ACCESS_KEY")),
        secret_access_key: Some(var("AIMESH_S3_SECRET_KEY")),
    };
}

impl Mesh {
    /// A mesh on fresh databases and a fresh Redis prefix.
    pub async fn start() -> Self {
        let (config, databases) = test_config();
        Self::start_with(config, databases).await
    }

    /// The token with which the mesh's services call each other's internal RPCs (`Ingest`).
    pub fn service_token(&self) -> aimesh_kit::auth::ServiceToken {
        self.config.common.auth.service_token.clone().expect("test_config gives the mesh a service token")
    }

    /// `message` as another service of this mesh sends it to an internal RPC on behalf of the
    /// holder of `credential` (see [`on_behalf`]).
    pub fn on_behalf<T>(&self, message: T, credential: &str) -> tonic::Request<T> {
        on_behalf(message, &self.service_token(), credential)
    }

    /// A mesh with `config`, owning `databases` (dropped with it). Two meshes given the same
    /// databases and key prefix are two replicas of one deployment.
    pub async fn start_with(config: MeshConfig, databases: Vec<ScratchDatabase>) -> Self {
        let listeners = aimesh::bind(&ServiceName::ALL, &config).await.expect("bind the services");
        let config = config.in_one_process(&listeners).expect("the listeners' addresses");
        let addresses = aimesh::local_addresses(&listeners).expect("the listeners' addresses");
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(aimesh::run(listeners, config.clone(), shutdown.clone()));
        Self::once_serving(config, &addresses, shutdown, Some(task), databases).await
    }

    /// The mesh whose services run elsewhere (processes of their own) at `addresses`, with
    /// `config`; owns `databases` like a started mesh. Returns once every service serves.
    pub async fn attach(
        config: MeshConfig,
        addresses: &[(ServiceName, SocketAddr)],
        databases: Vec<ScratchDatabase>,
    ) -> Self {
        Self::once_serving(config, addresses, CancellationToken::new(), None, databases).await
    }

    async fn once_serving(
        config: MeshConfig,
        addresses: &[(ServiceName, SocketAddr)],
        shutdown: CancellationToken,
        task: Option<JoinHandle<anyhow::Result<()>>>,
        databases: Vec<ScratchDatabase>,
    ) -> Self {
        let address = |wanted: ServiceName| {
            addresses
                .iter()
                .find_map(|&(service, address)| (service == wanted).then_some(address))
                .unwrap_or_else(|| panic!("no address for {}", wanted.as_str()))
        };
        let mesh = Self {
            config,
            identity: address(ServiceName::Identity),
            chat: address(ServiceName::Chat),
            usage: address(ServiceName::Usage),
            gateway: address(ServiceName::Gateway),
            files: address(ServiceName::Files),
            analytics: address(ServiceName::Analytics),
            shutdown,
            task,
            databases,
        };
        for address in [mesh.identity, mesh.chat, mesh.usage, mesh.files, mesh.analytics] {
            wait_until_serving(address).await;
        }
        mesh.rest().wait_until_ready().await;
        mesh
    }

    /// Starts another gateway on its own listener, in front of this mesh's services and with its
    /// settings but `gateway` (the listen address is set here); stops with the mesh.
    pub async fn start_gateway(&self, gateway: aimesh_gateway::GatewayConfig) -> rest::Rest {
        let rest = self.start_gateway_calling(self.config.common.services.clone(), gateway).await;
        rest.wait_until_ready().await;
        rest
    }

    /// Starts another gateway on its own listener with this mesh's settings but `gateway`,
    /// calling the services at `services`; returns once it is live (`/healthz`), ready or not;
    /// stops with the mesh.
    pub async fn start_gateway_calling(
        &self,
        services: aimesh_kit::config::ServiceUrls,
        gateway: aimesh_gateway::GatewayConfig,
    ) -> rest::Rest {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind a gateway");
        let address = listener.local_addr().expect("gateway address");
        let common = aimesh_kit::config::CommonConfig { services, ..self.config.common.clone() };
        let shutdown = self.shutdown.clone();
        tokio::spawn(async move {
            if let Err(error) = aimesh_gateway::run(listener, common, gateway, shutdown).await {
                eprintln!("an extra gateway failed: {error:#}");
            }
        });
        let rest = rest::Rest::new(address);
        rest.wait_until_live().await;
        rest
    }

    /// A REST client of the gateway.
    pub fn rest(&self) -> rest::Rest {
        rest::Rest::new(self.gateway)
    }

    /// A channel to identity.
    pub fn channel(&self) -> Channel {
        channel(self.identity)
    }

    /// A channel to chat.
    pub fn chat_channel(&self) -> Channel {
        channel(self.chat)
    }

    pub fn chat(&self) -> chat_pb::chat_service_client::ChatServiceClient<Channel> {
        chat_pb::chat_service_client::ChatServiceClient::new(self.chat_channel())
    }

    /// A pool on chat's database, for tests that check what was (not) written.
    pub async fn chat_db(&self) -> sqlx::PgPool {
        pool_on(&self.config.chat.database, "chat").await
    }

    /// A channel to usage.
    pub fn usage_channel(&self) -> Channel {
        channel(self.usage)
    }

    pub fn users(&self) -> pb::user_service_client::UserServiceClient<Channel> {
        pb::user_service_client::UserServiceClient::new(self.channel())
    }

    pub fn sessions(&self) -> pb::session_service_client::SessionServiceClient<Channel> {
        pb::session_service_client::SessionServiceClient::new(self.channel())
    }

    pub fn projects(&self) -> pb::project_service_client::ProjectServiceClient<Channel> {
        pb::project_service_client::ProjectServiceClient::new(self.channel())
    }

    pub fn api_keys(&self) -> pb::api_key_service_client::ApiKeyServiceClient<Channel> {
        pb::api_key_service_client::ApiKeyServiceClient::new(self.channel())
    }

    pub fn settings(&self) -> pb::settings_service_client::SettingsServiceClient<Channel> {
        pb::settings_service_client::SettingsServiceClient::new(self.channel())
    }

    pub fn auth(&self) -> pb::auth_service_client::AuthServiceClient<Channel> {
        pb::auth_service_client::AuthServiceClient::new(self.channel())
    }

    pub fn models(&self) -> usage_pb::model_service_client::ModelServiceClient<Channel> {
        usage_pb::model_service_client::ModelServiceClient::new(self.usage_channel())
    }

    pub fn usage(&self) -> usage_pb::usage_service_client::UsageServiceClient<Channel> {
        usage_pb::usage_service_client::UsageServiceClient::new(self.usage_channel())
    }

    pub fn quotas(&self) -> usage_pb::quota_service_client::QuotaServiceClient<Channel> {
        usage_pb::quota_service_client::QuotaServiceClient::new(self.usage_channel())
    }

    pub fn analytics(&self) -> analytics_pb::analytics_service_client::AnalyticsServiceClient<Channel> {
        analytics_pb::analytics_service_client::AnalyticsServiceClient::new(channel(self.analytics))
    }

    pub fn ingest(&self) -> analytics_pb::ingest_service_client::IngestServiceClient<Channel> {
        analytics_pb::ingest_service_client::IngestServiceClient::new(channel(self.analytics))
    }

    /// A pool on usage's database, for tests that check what was (not) written.
    pub async fn usage_db(&self) -> sqlx::PgPool {
        pool_on(&self.config.usage.database, "usage").await
    }

    /// A channel to files.
    pub fn files_channel(&self) -> Channel {
        channel(self.files)
    }

    pub fn files(&self) -> files_pb::file_service_client::FileServiceClient<Channel> {
        files_pb::file_service_client::FileServiceClient::new(self.files_channel())
    }

    /// The internal attachment RPCs of files (they need the service token).
    pub fn attachments(&self) -> files_pb::attachment_service_client::AttachmentServiceClient<Channel> {
        files_pb::attachment_service_client::AttachmentServiceClient::new(self.files_channel())
    }

    /// A pool on files' database, for tests that check what was (not) written.
    pub async fn files_db(&self) -> sqlx::PgPool {
        pool_on(&self.config.files.database, "files").await
    }

    /// A pool on identity's database, for tests that check what was (not) written.
    pub async fn identity_db(&self) -> sqlx::PgPool {
        pool_on(&self.config.identity.database, "identity").await
    }

    /// Registers an account and logs it in; returns its id and access token.
    pub async fn signup(&self, name: &str) -> Account {
        let email = format!("{name}@example.org");
        let password = format!("{name}-password-123");
        let user = self
            .users()
            .register_user(pb::RegisterUserRequest {
                email: email.clone(),
                username: name.to_owned(),
                password: password.clone(),
                ..Default::default()
            })
            .await
            .expect("register")
            .into_inner();
        let login = self
            .sessions()
            .login(pb::LoginRequest { login: email.clone(), password: password.clone(), device_name: "test".into() })
            .await
            .expect("login")
            .into_inner();
        Account { user_id: user.id, email, password, token: login.access_token, refresh_token: login.refresh_token }
    }

    /// A new project of `owner` named `name`; its id.
    pub async fn create_project(&self, owner: &Account, name: &str) -> String {
        let request = pb::CreateProjectRequest { name: name.into(), description: String::new() };
        self.projects().create_project(authed(request, &owner.token)).await.expect("create project").into_inner().id
    }

    /// Adds `member` to `project_id` with `role`, as `owner` (who must be allowed to).
    pub async fn add_member(&self, owner: &Account, project_id: &str, member: &Account, role: pb::ProjectRole) {
        let request =
            pb::AddMemberRequest { project_id: project_id.into(), email: member.email.clone(), role: role.into() };
        self.projects().add_member(authed(request, &owner.token)).await.expect("add member");
    }

    /// Uploads `content` as the text file `name` of `project`, as the holder of `credential`,
    /// in one chunk.
    pub async fn upload_text(&self, credential: &str, project: &str, name: &str, content: &[u8]) -> files_pb::File {
        let metadata = files_pb::UploadMetadata {
            project_id: project.into(),
            name: name.into(),
            mime_type: "text/plain".into(),
            ..Default::default()
        };
        let messages = [
            files_pb::UploadRequest { part: Some(files_pb::upload_request::Part::Metadata(metadata)), finish: false },
            files_pb::UploadRequest {
                part: Some(files_pb::upload_request::Part::Chunk(content.to_vec().into())),
                finish: false,
            },
            files_pb::UploadRequest { part: None, finish: true },
        ];
        let stream = futures::stream::iter(messages);
        self.files().upload(authed(stream, credential)).await.expect("upload").into_inner()
    }

    /// Makes an account a system admin, as `aimesh grant-admin` does, and logs it in again so
    /// its token carries the role.
    pub async fn make_admin(&self, account: &Account) -> Account {
        let pool = self.identity_db().await;
        aimesh_identity::grant_admin(&pool, &account.email).await.expect("grant admin");
        pool.close().await;
        let login = self
            .sessions()
            .login(pb::LoginRequest {
                login: account.email.clone(),
                password: account.password.clone(),
                device_name: "admin".into(),
            })
            .await
            .expect("login")
            .into_inner();
        Account { token: login.access_token, refresh_token: login.refresh_token, ..account.clone() }
    }

    /// Stops the mesh gracefully and returns how it ended.
    pub async fn stop(mut self) -> anyhow::Result<()> {
        self.shutdown.cancel();
        match self.task.take() {
            Some(task) => task.await?,
            None => Ok(()),
        }
    }

    /// The databases, to hand to a second replica.
    pub fn share_databases(&mut self) -> Vec<ScratchDatabase> {
        std::mem::take(&mut self.databases)
    }
}

impl Drop for Mesh {
    fn drop(&mut self) {
        self.shutdown.cancel();
        // This runtime is blocked here from now on: its pools can no longer read what a
        // backend is writing to them, so end their connections before any database is dropped.
        ScratchDatabase::disconnect_all(&self.databases);
        let root = &self.config.files.fs_root;
        // Only a directory test_config made; a replica sharing it has taken the databases.
        if !self.databases.is_empty()
            && root.file_name().is_some_and(|name| name.to_string_lossy().starts_with(SCRATCH_DIR_PREFIX))
        {
            let _ = std::fs::remove_dir_all(root);
        }
        // Analytics' ClickHouse database goes with the PostgreSQL ones (the mesh holding them).
        let database = self.config.analytics.clickhouse_database.clone();
        if !self.databases.is_empty() && database.starts_with("aimesh_test_") {
            // The test run's server itself: a test may have put a proxy of its own in between.
            let url = clickhouse_url();
            let dropper = std::thread::spawn(move || {
                let Ok(runtime) = tokio::runtime::Builder::new_current_thread().enable_all().build() else { return };
                runtime.block_on(async move {
                    let client = aimesh_analytics::store::client_of(&url);
                    let _ = client.query(&format!("DROP DATABASE IF EXISTS {database}")).execute().await;
                });
            });
            let _ = dropper.join();
        }
    }
}

/// A registered, logged-in account.
#[derive(Debug, Clone)]
pub struct Account {
    pub user_id: String,
    pub email: String,
    pub password: String,
    pub token: String,
    pub refresh_token: String,
}

/// The ClickHouse server of the test run (`AIMESH_CLICKHOUSE_URL`).
pub fn clickhouse_url() -> String {
    std::env::var("AIMESH_CLICKHOUSE_URL").unwrap_or_else(|_| aimesh::MeshConfig::default().analytics.clickhouse_url)
}

/// A lazily connecting channel to a service of the mesh.
pub fn channel(address: SocketAddr) -> Channel {
    Channel::from_shared(format!("http://{address}")).expect("service url").connect_lazy()
}

/// Waits until the gRPC service at `address` reports serving (grpc.health.v1), at most 30 s.
pub async fn wait_until_serving(address: SocketAddr) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while !serving(address).await {
        assert!(tokio::time::Instant::now() < deadline, "{address} did not become healthy within 30 s");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Whether the gRPC service at `address` reports serving now (grpc.health.v1).
pub async fn serving(address: SocketAddr) -> bool {
    let mut health = tonic_health::pb::health_client::HealthClient::new(channel(address));
    let request = tonic_health::pb::HealthCheckRequest { service: String::new() };
    health.check(request).await.is_ok_and(|response| {
        response.into_inner().status == tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    })
}

/// Asserts that the outbox of the service database `pool` (`name`) holds events, and waits
/// until every one of them is delivered to analytics.
pub async fn outbox_drains(pool: &sqlx::PgPool, name: &str) {
    // (written, still undelivered)
    let outbox = || async {
        sqlx::query_as::<_, (i64, i64)>(
            "SELECT count(*), count(*) FILTER (WHERE delivered_at IS NULL) FROM outbox_events",
        )
        .fetch_one(pool)
        .await
        .expect("read the outbox")
    };
    assert!(outbox().await.0 > 0, "the traffic wrote no event to the outbox of {name}");
    eventually(&format!("the outbox of {name} is delivered"), || async { outbox().await.1 == 0 }).await;
}

/// A small pool on the database of `urls` (as the services connect: through PgBouncer too).
async fn pool_on(urls: &aimesh_kit::config::DatabaseUrls, service: &str) -> sqlx::PgPool {
    let url = urls.url.as_deref().unwrap_or_else(|| panic!("{service} has a database url"));
    let settings = aimesh_kit::config::DatabaseConfig { max_connections: 5, min_connections: 0, ..Default::default() };
    aimesh_kit::data::db::connect(url, &settings)
        .await
        .unwrap_or_else(|e| panic!("connect to the {service} database: {e}"))
}

/// The sum of this process's samples of the Prometheus metric `name` whose labels contain
/// every one of `labels` (`database="chat"`); 0 when there are none. Every service of a mesh
/// started in this process records into the one recorder.
pub fn metric(name: &str, labels: &[&str]) -> f64 {
    let Ok(handle) = aimesh_kit::telemetry::metrics_handle() else { return 0.0 };
    metric_in(&handle.render(), name, labels)
}

/// The sum of the samples of `name` with every one of `labels` in `exposition`, a Prometheus
/// text exposition (this process's, or another's `/metrics`); 0 when there are none.
pub fn metric_in(exposition: &str, name: &str, labels: &[&str]) -> f64 {
    let series = format!("{name}{{");
    exposition
        .lines()
        .filter(|line| line.starts_with(&series) && labels.iter().all(|label| line.contains(label)))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// `message` with `authorization: Bearer <credential>`.
pub fn authed<T>(message: T, credential: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {credential}").parse().expect("credential is a valid header value");
    request.metadata_mut().insert("authorization", value);
    request
}

/// `message` as a service of the mesh sends it to an internal RPC on behalf of the holder of
/// `credential`: `token` as `authorization`, the credential in `x-aimesh-on-behalf-of`.
pub fn on_behalf<T>(message: T, token: &aimesh_kit::auth::ServiceToken, credential: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    token.authorize_on_behalf(&mut request, credential).expect("the token and credential are valid header values");
    request
}

/// The reason and field an error carries, for asserting both.
pub fn reason_and_field(status: &tonic::Status) -> (String, Option<String>) {
    let error = aimesh_kit::ServiceError::from_status(status);
    (error.reason.into_owned(), error.field)
}

/// The status a call must have failed with; `call` names it in the failure message.
#[track_caller]
pub fn expect_code<T: std::fmt::Debug>(
    call: &str,
    code: tonic::Code,
    result: Result<T, tonic::Status>,
) -> tonic::Status {
    match result {
        Ok(answer) => panic!("{call}: expected {code:?}, got {answer:?}"),
        Err(status) => {
            assert_eq!(status.code(), code, "{call}: {status:?}");
            status
        }
    }
}

// Fixtures of the usage service, shared by the usage and analytics tests.

/// A decimal string without trailing zeros, so "2.1000000000" and "2.1" compare equal.
pub fn normalized(decimal: &str) -> String {
    if decimal.contains('.') {
        decimal.trim_end_matches('0').trim_end_matches('.').to_owned()
    } else {
        decimal.to_owned()
    }
}

pub fn future(seconds_from_now: i64) -> prost_types::Timestamp {
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).expect("clock");
    prost_types::Timestamp { seconds: now.as_secs() as i64 + seconds_from_now, nanos: 0 }
}

/// An admin, a catalog model "gpt-4o" of provider openai priced 2.50 / 10.00 / 1.25 per million.
pub async fn catalog(mesh: &Mesh) -> (Account, usage_pb::Model) {
    let admin = mesh.signup("root").await;
    let admin = mesh.make_admin(&admin).await;
    let model = usage_pb::Model {
        provider: "openai".into(),
        name: "gpt-4o".into(),
        version: "2024-08-06".into(),
        r#type: usage_pb::ModelType::Chat.into(),
        display_name: "GPT-4o".into(),
        context_window: 128_000,
        max_output_tokens: 16_384,
        match_pattern: r"^gpt-4o(-\d{4}-\d{2}-\d{2})?$".into(),
        ..Default::default()
    };
    let model = mesh
        .models()
        .create_model(authed(usage_pb::CreateModelRequest { model: Some(model) }, &admin.token))
        .await
        .expect("create model")
        .into_inner();
    let price = usage_pb::ModelPrice {
        input_per_million: "2.50".into(),
        output_per_million: "10.00".into(),
        cached_input_per_million: "1.25".into(),
        effective_time: Some(future(0)),
        ..Default::default()
    };
    mesh.models()
        .set_model_price(authed(
            usage_pb::SetModelPriceRequest { model_id: model.id.clone(), price: Some(price) },
            &admin.token,
        ))
        .await
        .expect("set price");
    (admin, model)
}

/// A reservation of `tokens` (half input, half output) of gpt-4o in `project`, held ten minutes.
pub fn reserve_tokens(project: &str, tokens: i64) -> usage_pb::ReserveRequest {
    usage_pb::ReserveRequest {
        project_id: project.to_owned(),
        model: "gpt-4o".into(),
        estimated_input_tokens: tokens / 2,
        estimated_output_tokens: tokens - tokens / 2,
        ttl_seconds: 600,
        ..Default::default()
    }
}

/// Sets the project-wide quota of `project` to `tokens` per day, as its owner `token`.
pub async fn set_daily_token_budget(mesh: &Mesh, token: &str, project: &str, tokens: i64) {
    let quota = usage_pb::Quota {
        project_id: project.to_owned(),
        scope: usage_pb::QuotaScope::Project.into(),
        tokens_per_day: tokens,
        ..Default::default()
    };
    mesh.quotas().set_quota(authed(usage_pb::SetQuotaRequest { quota: Some(quota) }, token)).await.expect("set quota");
}

/// A project of `owner` and a key in it with the given scopes; returns (project id, secret).
pub async fn project_with_key(mesh: &Mesh, owner: &Account, scopes: &[&str]) -> (String, String) {
    let project_id = mesh.create_project(owner, "Apps").await;
    let key = pb::CreateApiKeyRequest {
        project_id: project_id.clone(),
        name: "backend".into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        expire_time: None,
        requests_per_minute: 0,
        project_owned: false,
    };
    let secret =
        mesh.api_keys().create_api_key(authed(key, &owner.token)).await.expect("create key").into_inner().secret;
    (project_id, secret)
}

pub fn record(project_id: &str, request_id: &str) -> usage_pb::RecordUsageRequest {
    usage_pb::RecordUsageRequest {
        request_id: request_id.into(),
        project_id: project_id.into(),
        model: "gpt-4o-2024-08-06".into(),
        request_type: "chat".into(),
        input_tokens: 1_000_000,
        cached_input_tokens: 400_000,
        output_tokens: 10_000,
        duration_ms: 1200,
        status: usage_pb::UsageStatus::Success.into(),
        ..Default::default()
    }
}

/// Waits until `check` holds, for at most 20 s (what a test waits for happens in the background).
pub async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    while !check().await {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}
