//! The cache of live files behind GetFile, against the real PostgreSQL and Redis Cluster, with
//! two replicas of the service sharing one database, one object directory and one key prefix:
//! every change through the service (rename, delete, retention, attachments) is visible at once
//! on the replica that made it and within moments on the other; a change behind the service's
//! back is not, which shows the reads are cached.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use chrono::Utc;
use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::Code;
use tonic::transport::Channel;
use uuid::Uuid;

use aimesh_files::api::Files;
use aimesh_files::config::{Backend, FilesConfig};
use aimesh_files::library::Library;
use aimesh_kit::ServiceError;
use aimesh_kit::auth::{BearerCredential, Caller, CredentialRef, Principal, ProjectAccess, ProjectRole, RoleSource};
use aimesh_kit::config::{AuthConfig, CommonConfig, DatabaseConfig, RedisConfig};
use aimesh_kit::data::cache::InvalidationBus;
use aimesh_kit::data::redis::Redis;
use aimesh_kit::data::retention::Policies;
use aimesh_kit::testing::{self, TestDatabase};
use aimesh_proto::files::v1 as pb;
use pb::file_service_client::FileServiceClient;

/// How long a change may take to reach the other replica: the invalidation broadcast takes
/// milliseconds; the in-process lifetime it must beat is 10 s.
const OTHER_REPLICA_WITHIN: Duration = Duration::from_secs(2);

/// Callers here are API keys, which need no role from identity; nobody else gets one.
struct NoRoles;

impl RoleSource for NoRoles {
    fn role<'a>(
        &'a self,
        _caller: &'a Caller,
        _project_id: Uuid,
    ) -> futures::future::BoxFuture<'a, Result<Option<ProjectRole>, ServiceError>> {
        Box::pin(async { Ok(None) })
    }
}

/// An API key of `project_id` that may read and write its files, as the auth layer would find it.
fn api_key_of(project_id: Uuid) -> Principal {
    Principal {
        user_id: Uuid::new_v4(),
        credential: CredentialRef::ApiKey {
            api_key_id: Uuid::new_v4(),
            project_id,
            scopes: vec!["files:read".into(), "files:write".into()],
            rate_limits: Default::default(),
        },
        system_admin: false,
        expires_at: None,
    }
}

/// One replica of files: its own pool, Redis connections, invalidation bus and gRPC server, on
/// which every call is made by an API key of the test's project.
struct Replica {
    client: FileServiceClient<Channel>,
    library: Library,
    server: JoinHandle<()>,
    _bus: InvalidationBus,
}

impl Drop for Replica {
    fn drop(&mut self) {
        self.server.abort();
    }
}

impl Replica {
    async fn start(database_url: &str, prefix: &str, objects: &Path, project_id: Uuid) -> Self {
        let database = DatabaseConfig { max_connections: 10, min_connections: 0, ..DatabaseConfig::default() };
        let pool = aimesh_kit::data::db::connect(database_url, &database).await.expect("connect to the test database");
        let redis = Redis::connect_with_prefix(&testing::redis_urls(), &RedisConfig::default(), prefix)
            .await
            .expect("connect to the redis cluster");
        let bus = InvalidationBus::start(&redis).await.expect("subscribe to invalidations");
        let config = FilesConfig {
            backend: Backend::Fs,
            fs_root: objects.to_owned(),
            url_signing_key: Some("YSB0ZXN0IGtleSBmb3IgZmlsZXMgZG93bmxvYWQgbGlua3Mh".into()),
            ..FilesConfig::default()
        };
        let library = aimesh_files::library(&CommonConfig::default(), &config, pool, redis.clone(), &bus)
            .expect("build the files library");
        let access = ProjectAccess::new(redis, &bus, &AuthConfig::default(), std::sync::Arc::new(NoRoles));
        let files = Files::new(library.clone(), access);

        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind a port");
        let address = listener.local_addr().expect("the bound address");
        let principal = api_key_of(project_id);
        let authenticate = move |mut request: tonic::Request<()>| {
            request.extensions_mut().insert(principal.clone());
            request.extensions_mut().insert(BearerCredential("test-key".into()));
            Ok(request)
        };
        let serving = tonic::transport::Server::builder()
            .layer(tonic::service::InterceptorLayer::new(authenticate))
            .add_routes(files.routes())
            .serve_with_incoming(TcpListenerStream::new(listener));
        let server = tokio::spawn(async move {
            if let Err(error) = serving.await {
                panic!("the files test server failed: {error}");
            }
        });
        let client = FileServiceClient::connect(format!("http://{address}")).await.expect("connect to the replica");
        Self { client, library, server, _bus: bus }
    }

    async fn get_file(&self, id: &str) -> Result<pb::File, tonic::Status> {
        let request = pb::GetFileRequest { file_id: id.into() };
        self.client.clone().get_file(request).await.map(tonic::Response::into_inner)
    }

    async fn name_of(&self, id: &str) -> String {
        self.get_file(id).await.expect("get the file").display_name
    }

    async fn rename(&self, id: &str, name: &str) -> pb::File {
        let request = pb::UpdateFileRequest {
            file_id: id.into(),
            file: Some(pb::File { display_name: name.into(), ..Default::default() }),
            update_mask: Some(prost_types::FieldMask { paths: vec!["display_name".into()] }),
        };
        self.client.clone().update_file(request).await.expect("rename the file").into_inner()
    }

    async fn delete(&self, id: &str) {
        let request = pb::DeleteFileRequest { file_id: id.into() };
        self.client.clone().delete_file(request).await.expect("delete the file");
    }

    async fn upload(&self, project_id: Uuid, name: &str, content: &[u8]) -> pb::File {
        let metadata = pb::UploadMetadata {
            project_id: project_id.to_string(),
            name: name.into(),
            mime_type: "text/plain".into(),
            ..Default::default()
        };
        let messages = vec![
            pb::UploadRequest { part: Some(pb::upload_request::Part::Metadata(metadata)), finish: false },
            pb::UploadRequest {
                part: Some(pb::upload_request::Part::Chunk(bytes::Bytes::copy_from_slice(content))),
                finish: true,
            },
        ];
        self.client.clone().upload(futures::stream::iter(messages)).await.expect("upload a file").into_inner()
    }
}

/// A migrated database, a directory of objects, and two replicas on them with a fresh key prefix.
struct Setup {
    project_id: Uuid,
    a: Replica,
    b: Replica,
    db: TestDatabase,
    objects: PathBuf,
}

impl Drop for Setup {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.objects);
    }
}

async fn setup() -> Setup {
    let db = TestDatabase::new(&aimesh_files::MIGRATOR).await;
    aimesh_kit::data::outbox::migrate(&db.pool).await.expect("migrate the outbox");
    let objects = std::env::temp_dir().join(format!("aimesh-files-cache-{}", Uuid::new_v4().simple()));
    let prefix = format!("test-{}", Uuid::new_v4().simple());
    let project_id = Uuid::new_v4();
    let a = Replica::start(&db.url, &prefix, &objects, project_id).await;
    let b = Replica::start(&db.url, &prefix, &objects, project_id).await;
    Setup { project_id, a, b, db, objects }
}

/// Asks `replica` for the file until `done` holds for the answer; panics after
/// [`OTHER_REPLICA_WITHIN`].
async fn eventually(what: &str, replica: &Replica, id: &str, done: impl Fn(&Result<pb::File, tonic::Status>) -> bool) {
    let deadline = tokio::time::Instant::now() + OTHER_REPLICA_WITHIN;
    loop {
        let answer = replica.get_file(id).await;
        if done(&answer) {
            return;
        }
        assert!(tokio::time::Instant::now() < deadline, "{what}: still {answer:?} after {OTHER_REPLICA_WITHIN:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn is_not_found(answer: &Result<pb::File, tonic::Status>) -> bool {
    matches!(answer, Err(status) if status.code() == Code::NotFound)
}

fn assert_not_found(what: &str, answer: Result<pb::File, tonic::Status>) {
    assert!(is_not_found(&answer), "{what}: expected NOT_FOUND, got {answer:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rename_shows_at_once_where_it_was_made_and_soon_on_the_other_replica() {
    let Setup { project_id, a, b, .. } = &setup().await;
    let file = a.upload(*project_id, "draft.txt", b"first words").await;
    // Both replicas hold the old row before the change.
    assert_eq!(a.name_of(&file.id).await, "draft.txt");
    assert_eq!(b.name_of(&file.id).await, "draft.txt");

    assert_eq!(a.rename(&file.id, "final.txt").await.display_name, "final.txt");
    assert_eq!(a.name_of(&file.id).await, "final.txt");
    eventually("b sees the rename", b, &file.id, |answer| {
        answer.as_ref().is_ok_and(|file| file.display_name == "final.txt")
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_file_is_not_found_at_once_where_it_was_deleted_and_soon_on_the_other_replica() {
    let Setup { project_id, a, b, .. } = &setup().await;
    let file = a.upload(*project_id, "gone.txt", b"short-lived").await;
    assert_eq!(a.name_of(&file.id).await, "gone.txt");
    assert_eq!(b.name_of(&file.id).await, "gone.txt");

    a.delete(&file.id).await;
    assert_not_found("a reads its own deletion", a.get_file(&file.id).await);
    eventually("b sees the deletion", b, &file.id, is_not_found).await;
    // Deleting it again on b finds nothing either: writes read the primary.
    let again = b.client.clone().delete_file(pb::DeleteFileRequest { file_id: file.id.clone() }).await;
    assert_eq!(again.map(drop).map_err(|status| status.code()), Err(Code::NotFound));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retention_deletion_makes_the_file_not_found_on_both_replicas() {
    let Setup { project_id, a, b, db, .. } = &setup().await;
    let old = a.upload(*project_id, "old.txt", b"from long ago").await;
    let recent = a.upload(*project_id, "recent.txt", b"from today").await;
    for replica in [a, b] {
        assert_eq!(replica.name_of(&old.id).await, "old.txt");
    }
    sqlx::query("UPDATE files SET created_at = created_at - interval '40 days' WHERE id = $1")
        .bind(Uuid::parse_str(&old.id).expect("a file id"))
        .execute(&db.pool)
        .await
        .expect("backdate the file");

    let policies = Policies { default_days: Some(30), projects: HashMap::new(), read_at: Utc::now() };
    let deleted = a.library.delete_past_retention(&policies, || false).await.expect("a retention round");
    assert_eq!(deleted, 1);
    assert_not_found("a after retention", a.get_file(&old.id).await);
    eventually("b after retention", b, &old.id, is_not_found).await;
    assert_eq!(b.name_of(&recent.id).await, "recent.txt");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn attaching_and_releasing_a_session_show_on_both_replicas() {
    let Setup { project_id, a, b, .. } = &setup().await;
    let file = a.upload(*project_id, "pasted.txt", b"in a chat").await;
    let id = Uuid::parse_str(&file.id).expect("a file id");
    for replica in [a, b] {
        assert!(replica.get_file(&file.id).await.expect("get the file").session_ids.is_empty());
    }
    let session = Uuid::new_v4();

    a.library.attach(*project_id, session, &[id]).await.expect("attach the file");
    let linked = vec![session.to_string()];
    assert_eq!(a.get_file(&file.id).await.expect("get the file").session_ids, linked);
    eventually("b sees the link", b, &file.id, |answer| answer.as_ref().is_ok_and(|f| f.session_ids == linked)).await;

    // A library file outlives its session; only the link goes.
    assert_eq!(a.library.release_session(*project_id, session).await.expect("release the session"), 0);
    assert!(a.get_file(&file.id).await.expect("get the file").session_ids.is_empty());
    eventually("b sees the link go", b, &file.id, |answer| answer.as_ref().is_ok_and(|f| f.session_ids.is_empty()))
        .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_cached_so_a_change_behind_the_services_back_stays_unseen_until_the_next_write() {
    let Setup { project_id, a, db, .. } = &setup().await;
    let file = a.upload(*project_id, "notes.txt", b"cached").await;
    assert_eq!(a.name_of(&file.id).await, "notes.txt");

    // Documented: writes go through the service; this one does not, so the cache keeps the row.
    sqlx::query("UPDATE files SET display_name = 'changed behind its back' WHERE id = $1")
        .bind(Uuid::parse_str(&file.id).expect("a file id"))
        .execute(&db.pool)
        .await
        .expect("change the row directly");
    assert_eq!(a.name_of(&file.id).await, "notes.txt");

    a.rename(&file.id, "renamed.txt").await;
    assert_eq!(a.name_of(&file.id).await, "renamed.txt");
}
