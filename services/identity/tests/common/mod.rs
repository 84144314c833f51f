//! Identity alone, served in-process through the same `run` as `aimesh identity`, on the real
//! PostgreSQL and Redis Cluster of the test run: a [`Deployment`] is one scratch database and one
//! Redis key prefix, with as many replicas on them as a test starts.

#![allow(dead_code)] // each test binary uses its own part

use std::net::SocketAddr;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tonic::transport::Channel;

use aimesh_identity::IdentityConfig;
use aimesh_kit::config::{CommonConfig, DatabaseConfig, DatabaseUrls};
use aimesh_kit::testing::{self, ScratchDatabase};
use aimesh_proto::identity::v1 as pb;

/// Replicas of identity sharing one database and key prefix; stops them and drops the database
/// when dropped.
pub struct Deployment {
    pub common: CommonConfig,
    pub config: IdentityConfig,
    shutdown: CancellationToken,
    database: ScratchDatabase,
}

impl Deployment {
    /// A deployment on a fresh database and key prefix, with no replica yet. Role and credential
    /// caches live five minutes, so that within a test only invalidations change what they hold.
    pub fn new() -> Self {
        let database = ScratchDatabase::new();
        let mut common = CommonConfig {
            postgres_url: testing::postgres_url(),
            redis_urls: testing::redis_urls(),
            ..CommonConfig::default()
        };
        common.redis.key_prefix = format!("test-{}", uuid::Uuid::new_v4().simple());
        common.metrics.listen = None;
        common.database.max_connections = 5;
        common.database.min_connections = 0;
        common.server.shutdown_grace_secs = 5;
        common.auth.local_ttl_secs = 300;
        common.auth.shared_ttl_secs = 300;
        let config = IdentityConfig {
            database: DatabaseUrls { url: Some(database.url.clone()), ..DatabaseUrls::default() },
            ..IdentityConfig::default()
        };
        Self { common, config, shutdown: CancellationToken::new(), database }
    }

    /// Starts one more replica and returns once it answers.
    pub async fn start_replica(&self) -> Replica {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind identity");
        let address = listener.local_addr().expect("identity address");
        let served = aimesh_identity::run(listener, self.common.clone(), self.config.clone(), self.shutdown.clone());
        let replica = Replica { address, task: tokio::spawn(served) };
        replica.wait_until_serving().await;
        replica
    }

    /// A small pool on the deployment's database, for changes behind the service's back.
    pub async fn database(&self) -> sqlx::PgPool {
        let settings = DatabaseConfig { max_connections: 2, min_connections: 0, ..DatabaseConfig::default() };
        aimesh_kit::data::db::connect(&self.database.url, &settings).await.expect("connect to identity's database")
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        self.shutdown.cancel();
        // The replicas' pools run on the runtime now blocked in this drop: end their connections
        // before the database goes, or DROP DATABASE waits for them forever.
        ScratchDatabase::disconnect_all(std::slice::from_ref(&self.database));
    }
}

/// One running identity server.
pub struct Replica {
    pub address: SocketAddr,
    task: JoinHandle<anyhow::Result<()>>,
}

impl Replica {
    /// Any answer at all (unauthenticated, here) means the server is up.
    async fn wait_until_serving(&self) {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            assert!(!self.task.is_finished(), "identity at {} stopped while starting", self.address);
            let mut projects = self.projects();
            let probe = projects.get_project(pb::GetProjectRequest::default());
            match tokio::time::timeout(Duration::from_secs(1), probe).await {
                Ok(Ok(_)) => break,
                Ok(Err(status)) if status.code() != tonic::Code::Unavailable => break,
                _ => {}
            }
            assert!(tokio::time::Instant::now() < deadline, "identity at {} did not serve within 30 s", self.address);
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn channel(&self) -> Channel {
        Channel::from_shared(format!("http://{}", self.address)).expect("identity url").connect_lazy()
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

    /// Registers an account named `name` and logs it in.
    pub async fn signup(&self, name: &str) -> Account {
        let email = format!("{name}@example.org");
        let password = format!("{name}-password-123");
        let register = pb::RegisterUserRequest {
            email: email.clone(),
            username: name.to_owned(),
            password: password.clone(),
            ..Default::default()
        };
        self.users().register_user(register).await.expect("register");
        let account = Account { email, password, token: String::new() };
        self.login(account).await
    }

    /// `account` with the access token of a new login session.
    pub async fn login(&self, account: Account) -> Account {
        let login = pb::LoginRequest {
            login: account.email.clone(),
            password: account.password.clone(),
            device_name: "test".into(),
        };
        let token = self.sessions().login(login).await.expect("login").into_inner().access_token;
        Account { token, ..account }
    }

    /// A new project of `owner` named `name`.
    pub async fn create_project(&self, owner: &Account, name: &str) -> pb::Project {
        let request = pb::CreateProjectRequest { name: name.into(), description: String::new() };
        self.projects().create_project(authed(request, &owner.token)).await.expect("create project").into_inner()
    }

    /// `GetProject` of `project_id` as `account`.
    pub async fn get_project(&self, account: &Account, project_id: &str) -> Result<pb::Project, tonic::Status> {
        let request = pb::GetProjectRequest { project_id: project_id.into() };
        self.projects().get_project(authed(request, &account.token)).await.map(tonic::Response::into_inner)
    }
}

/// A registered account and the access token of its login session.
#[derive(Debug, Clone)]
pub struct Account {
    pub email: String,
    pub password: String,
    pub token: String,
}

/// `message` with `authorization: Bearer <credential>`.
pub fn authed<T>(message: T, credential: &str) -> tonic::Request<T> {
    let mut request = tonic::Request::new(message);
    let value = format!("Bearer {credential}").parse().expect("credential is a valid header value");
    request.metadata_mut().insert("authorization", value);
    request
}
