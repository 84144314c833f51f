//! The restore drill: data made through the gateway in every service, a backup of a running
//! mesh, every store wiped (fresh PostgreSQL and ClickHouse servers, an empty object store, an
//! empty Redis keyspace), a restore, and a new mesh on the restored stores that answers as the
//! first did: same counts, same records, credentials that still work, analytics totals equal
//! to usage's, budgets intact. Prints the backup's and the restore's timings (docs/backup.md).

use futures::StreamExt;
use http::{Method, StatusCode};
use object_store::ObjectStoreExt;
use serde_json::json;
use tonic::Code;

use aimesh::MeshConfig;
use aimesh::backup::{BackupOptions, RestoreOptions};
use aimesh_kit::testing::{ScratchClickHouse, ScratchPostgres};
use aimesh_proto::usage::v1 as usage_pb;
use aimesh_tests::rest::Rest;
use aimesh_tests::totals::{Totals, analytics_totals};
use aimesh_tests::{Mesh, catalog, eventually, expect_code, record, reserve_tokens, test_config, use_postgres_server};

/// What the drill compares before and after: rows per table of each service database, and
/// what analytics holds.
async fn counts(mesh: &Mesh) -> Vec<(String, i64)> {
    let tables: [(&str, &[&str]); 4] = [
        ("identity", &["users", "user_sessions", "projects", "project_members", "api_keys"]),
        ("chat", &["chat_sessions", "chat_messages"]),
        ("usage", &["model_usage_logs", "quotas", "ai_models"]),
        ("files", &["files", "blobs"]),
    ];
    let mut counts = Vec::new();
    for (service, tables) in tables {
        let pool = match service {
            "identity" => mesh.identity_db().await,
            "chat" => mesh.chat_db().await,
            "usage" => mesh.usage_db().await,
            _ => mesh.files_db().await,
        };
        for table in tables {
            let statement = format!("SELECT count(*) FROM {table}");
            let count: i64 = sqlx::query_scalar(sqlx::AssertSqlSafe(statement)).fetch_one(&pool).await.expect("count");
            counts.push((format!("{service}.{table}"), count));
        }
        pool.close().await;
    }
    let clickhouse = aimesh_analytics::store::client_of(&mesh.config.analytics.clickhouse_url);
    let database = &mesh.config.analytics.clickhouse_database;
    for table in ["usage_events", "audit_events", "project_retention"] {
        let count: u64 = clickhouse
            .query(&format!("SELECT count() FROM {database}.{table} FINAL"))
            .fetch_one()
            .await
            .expect("count in clickhouse");
        counts.push((format!("analytics.{table}"), count as i64));
    }
    counts
}

/// Waits until no service's outbox holds an undelivered event.
async fn outboxes_drained(mesh: &Mesh) {
    for (name, pool) in [
        ("identity", mesh.identity_db().await),
        ("chat", mesh.chat_db().await),
        ("usage", mesh.usage_db().await),
        ("files", mesh.files_db().await),
    ] {
        let undelivered = || async {
            let statement = "SELECT count(*) FROM outbox_events WHERE delivered_at IS NULL";
            sqlx::query_scalar::<_, i64>(statement).fetch_one(&pool).await.expect("read the outbox")
        };
        eventually(&format!("the outbox of {name} is delivered"), || async { undelivered().await == 0 }).await;
        pool.close().await;
    }
}

async fn login(rest: &Rest, email: &str, password: &str) -> String {
    let reply = rest.post("/v1/auth/login", json!({ "login": email, "password": password })).send().await;
    reply.expect(StatusCode::OK).json()["accessToken"].as_str().expect("an access token").to_owned()
}

/// A mesh's configuration on the PostgreSQL server `postgres` and the ClickHouse node
/// `clickhouse`, with fresh files directory and Redis keyspace.
fn on_servers(postgres: &ScratchPostgres, clickhouse: &ScratchClickHouse) -> MeshConfig {
    // The scratch databases test_config names on the shared server are not used (nor created).
    let (mut config, _unused) = test_config();
    use_postgres_server(&mut config, &postgres.url(), None);
    config.analytics.clickhouse_url = clickhouse.urls()[0].clone();
    config.analytics.clickhouse_database = "aimesh_analytics".into();
    config
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_in_a_directory_restores_every_store_into_fresh_servers() {
    let dir = std::env::temp_dir().join(format!("aimesh-backup-{}", uuid::Uuid::new_v4().simple()));
    drill(&dir.display().to_string(), &aimesh_files::config::S3Config::default()).await;
    let _ = std::fs::remove_dir_all(&dir);
}

/// The same through S3 (the test run's server): the dumps and objects by object_store,
/// ClickHouse's part by its own BACKUP ... TO S3.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_backup_in_s3_restores_every_store_into_fresh_servers() {
    let mut config = MeshConfig::default();
    aimesh_tests::use_s3(&mut config);
    let s3 = config.files.s3;
    let to = format!("s3://{}/aimesh-test-backups/{}", s3.bucket, uuid::Uuid::new_v4().simple());
    drill(&to, &s3).await;
    // The backup's objects go with the test.
    let destination = aimesh::backup::destination::Destination::open(&to, &s3, false).expect("open the backup");
    let store = destination.store();
    let listed: Vec<_> = store.list(None).collect().await;
    for meta in listed {
        let _ = store.delete(&meta.expect("a listed object").location).await;
    }
}

/// The drill, backing up to `to` (S3 credentials, when `to` is in S3, from `s3`).
async fn drill(to: &str, s3: &aimesh_files::config::S3Config) {
    let (old_postgres, old_clickhouse) = (ScratchPostgres::start(), ScratchClickHouse::start(1, 1).await);
    let mut config = on_servers(&old_postgres, &old_clickhouse);
    // The files store stays a directory; these only name the backup's bucket.
    config.files.s3 = s3.clone();
    let old_files = config.files.fs_root.clone();
    let mesh = Mesh::start_with(config.clone(), Vec::new()).await;
    let rest = mesh.rest();

    // Data in every service, through the gateway where it has a route.
    let (_admin, _model) = catalog(&mesh).await;
    let (email, password) = ("ann@example.org", "ann-password-123");
    rest.post("/v1/users", json!({ "email": email, "username": "ann", "password": password }))
        .send()
        .await
        .expect(StatusCode::OK);
    let token = login(&rest, email, password).await;
    rest.post("/v1/users", json!({ "email": "bob@example.org", "username": "bob", "password": "bob-password-123" }))
        .send()
        .await
        .expect(StatusCode::OK);
    let project = rest.post("/v1/projects", json!({ "name": "Drill" })).bearer(&token).send().await;
    let project = project.expect(StatusCode::OK).json()["id"].as_str().expect("project id").to_owned();
    rest.post(
        &format!("/v1/projects/{project}/members"),
        json!({ "email": "bob@example.org", "role": "PROJECT_ROLE_MEMBER" }),
    )
    .bearer(&token)
    .send()
    .await
    .expect(StatusCode::OK);
    let key = rest
        .post(
            &format!("/v1/projects/{project}/apiKeys"),
            json!({ "name": "backend", "scopes": ["usage:write", "usage:read", "chat:read"] }),
        )
        .bearer(&token)
        .send()
        .await
        .expect(StatusCode::OK);
    let secret = key.json()["secret"].as_str().expect("key secret").to_owned();
    let session = rest
        .post("/v1/chat/sessions", json!({ "projectId": project, "title": "Drill", "model": "gpt-4o" }))
        .bearer(&token);
    let session = session.send().await.expect(StatusCode::OK).json()["id"].as_str().expect("session id").to_owned();
    let messages = format!("/v1/chat/sessions/{session}/messages");
    for (role, content) in [("MESSAGE_ROLE_USER", "what is a restore drill?"), ("MESSAGE_ROLE_ASSISTANT", "this")] {
        rest.post(&messages, json!({ "role": role, "content": content }))
            .bearer(&token)
            .send()
            .await
            .expect(StatusCode::OK);
    }
    let content: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
    let uploaded = rest
        .call(
            Method::POST,
            &format!("/v1/projects/{project}/files?metadata.name=drill.bin&metadata.mimeType=application/octet-stream"),
        )
        .raw("application/octet-stream", content.clone())
        .bearer(&token)
        .send()
        .await
        .expect(StatusCode::OK);
    let file_id = uploaded.json()["id"].as_str().expect("file id").to_owned();
    rest.call(Method::PUT, &format!("/v1/projects/{project}/quotas"))
        .json(json!({ "scope": "QUOTA_SCOPE_PROJECT", "tokensPerDay": "1000" }))
        .bearer(&token)
        .send()
        .await
        .expect(StatusCode::OK);
    rest.call(Method::PUT, &format!("/v1/projects/{project}/analytics/retention"))
        .json(json!({ "days": 90 }))
        .bearer(&token)
        .send()
        .await
        .expect(StatusCode::OK);
    // Usage through the internal RPC: a reservation settled at 100 of the 1000 tokens a day.
    let mut totals = Totals::default();
    let reservation = mesh
        .quotas()
        .reserve(mesh.on_behalf(reserve_tokens(&project, 600), &secret))
        .await
        .expect("reserve")
        .into_inner();
    let settle = usage_pb::RecordUsageRequest {
        input_tokens: 60,
        cached_input_tokens: 0,
        output_tokens: 40,
        reservation_id: reservation.id,
        ..record(&project, "drill-settled")
    };
    let recorded = mesh.usage().record_usage(mesh.on_behalf(settle, &secret)).await.expect("settle").into_inner();
    totals.add(&recorded);
    outboxes_drained(&mesh).await;
    eventually("analytics counts what usage recorded", || async {
        analytics_totals(&mesh, &project, &token).await == totals
    })
    .await;
    let before = counts(&mesh).await;
    assert!(before.iter().all(|(_, count)| *count > 0), "every table compared holds rows: {before:?}");

    // A backup of the running mesh.
    let pg_bin = std::env::var_os("AIMESH_PG_BIN").map(Into::into);
    let options = BackupOptions { to: to.to_owned(), pg_bin: pg_bin.clone() };
    let (manifest, backup_report) = aimesh::backup::backup(&config, &options).await.expect("backup");
    println!(
        "backup ({} objects, {} ClickHouse rows):\n{backup_report}",
        manifest.objects.count,
        manifest.clickhouse.rows.values().sum::<u64>()
    );
    assert_eq!(manifest.postgres.len(), 4);
    assert!(manifest.postgres.iter().all(|dump| dump.lsn.contains('/')), "{:?}", manifest.postgres);
    assert_eq!(manifest.objects.count, 1);
    mesh.stop().await.expect("the first mesh stops");

    // A second backup to the same place is refused.
    let again = aimesh::backup::backup(&config, &options).await.expect_err("the destination holds a backup");
    assert!(again.to_string().contains("is not empty"), "{again:#}");

    // Every store wiped: the old servers are gone, the new ones are empty.
    drop(old_postgres);
    drop(old_clickhouse);
    let _ = std::fs::remove_dir_all(&old_files);
    let (new_postgres, new_clickhouse) = (ScratchPostgres::start(), ScratchClickHouse::start(1, 1).await);
    let mut restored_config = on_servers(&new_postgres, &new_clickhouse);
    restored_config.files.s3 = s3.clone();
    let options = RestoreOptions { from: to.to_owned(), force: false, pg_bin };
    let (_, restore_report) = aimesh::backup::restore(&restored_config, &options).await.expect("restore");
    println!("restore:\n{restore_report}");
    // A second restore into the same stores is refused, naming what is in the way.
    let again = aimesh::backup::restore(&restored_config, &options).await.expect_err("the stores are not empty");
    assert!(again.to_string().contains("the identity database"), "{again:#}");

    let mesh = Mesh::start_with(restored_config.clone(), Vec::new()).await;
    let rest = mesh.rest();
    assert_eq!(counts(&mesh).await, before);
    // Records and credentials as they were.
    let token = login(&rest, email, password).await;
    let listed = rest.get(&format!("{messages}?pageSize=10")).bearer(&token).send().await.expect(StatusCode::OK);
    assert_eq!(listed.json()["messages"][0]["content"], "what is a restore drill?");
    let download = rest.get(&format!("/v1/files/{file_id}:download")).bearer(&token).send().await;
    assert_eq!(download.expect(StatusCode::OK).body.as_ref(), content.as_slice());
    let by_key = rest.get(&format!("/v1/projects/{project}/usage")).bearer(&secret).send().await;
    assert_eq!(by_key.expect(StatusCode::OK).json()["records"].as_array().map(Vec::len), Some(1));
    // Analytics counts what usage recorded, and the budget still holds the 100 tokens used:
    // Redis starts empty, so usage rebuilds its counters from PostgreSQL.
    assert_eq!(analytics_totals(&mesh, &project, &token).await, totals);
    mesh.quotas().reserve(mesh.on_behalf(reserve_tokens(&project, 800), &secret)).await.expect("100 used, 800 fit");
    expect_code(
        "100 + 800 + 200 > 1000",
        Code::ResourceExhausted,
        mesh.quotas().reserve(mesh.on_behalf(reserve_tokens(&project, 200), &secret)).await,
    );
    mesh.stop().await.expect("the restored mesh stops");
    let _ = std::fs::remove_dir_all(&restored_config.files.fs_root);
}

/// Copies the directory `from` to `to` (which must not exist), files and subdirectories.
fn copy_dir(from: &std::path::Path, to: &std::path::Path) {
    std::fs::create_dir_all(to).expect("create the copy");
    for entry in std::fs::read_dir(from).expect("read the directory") {
        let entry = entry.expect("a directory entry");
        let target = to.join(entry.file_name());
        if entry.file_type().expect("a file type").is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).expect("copy a file");
        }
    }
}

/// Events delivered to analytics after ClickHouse's BACKUP began are not in it but are in the
/// PostgreSQL dumps taken after: restore sends them again, and analytics counts each event once.
/// Made deterministic by splicing two backups: the ClickHouse part of one taken before the
/// second usage record, the PostgreSQL part of one taken after it.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn events_delivered_after_the_clickhouse_backup_began_reach_analytics_once_after_a_restore() {
    let (old_postgres, old_clickhouse) = (ScratchPostgres::start(), ScratchClickHouse::start(1, 1).await);
    let config = on_servers(&old_postgres, &old_clickhouse);
    let mesh = Mesh::start_with(config.clone(), Vec::new()).await;
    catalog(&mesh).await;
    let ann = mesh.signup("ann").await;
    let (project, secret) = aimesh_tests::project_with_key(&mesh, &ann, &["usage:write", "usage:read"]).await;
    let mut totals = Totals::default();
    let record_one = |request_id: &'static str| {
        let (mesh, project, secret) = (&mesh, project.clone(), secret.clone());
        async move {
            let request = mesh.on_behalf(record(&project, request_id), &secret);
            mesh.usage().record_usage(request).await.expect("record usage").into_inner()
        }
    };
    totals.add(&record_one("before").await);
    outboxes_drained(&mesh).await;

    let root = std::env::temp_dir().join(format!("aimesh-backup-{}", uuid::Uuid::new_v4().simple()));
    let pg_bin: Option<std::path::PathBuf> = std::env::var_os("AIMESH_PG_BIN").map(Into::into);
    let backup = |name: &str| BackupOptions { to: root.join(name).display().to_string(), pg_bin: pg_bin.clone() };
    let (early, _) = aimesh::backup::backup(&config, &backup("early")).await.expect("the early backup");
    totals.add(&record_one("between").await);
    outboxes_drained(&mesh).await;
    let (late, _) = aimesh::backup::backup(&config, &backup("late")).await.expect("the late backup");
    mesh.stop().await.expect("the first mesh stops");

    // The late backup with the early one's ClickHouse part. Its redeliver_from is moved back an
    // hour, so that events analytics does hold are sent again too: they must count once.
    let spliced = root.join("spliced");
    copy_dir(&root.join("late"), &spliced);
    std::fs::remove_dir_all(spliced.join("clickhouse")).expect("remove the late ClickHouse backup");
    copy_dir(&root.join("early").join("clickhouse"), &spliced.join("clickhouse"));
    std::fs::copy(root.join("early").join("clickhouse.index.jsonl"), spliced.join("clickhouse.index.jsonl"))
        .expect("copy the early index");
    let mut manifest = late.clone();
    manifest.clickhouse = early.clickhouse.clone();
    for dump in &mut manifest.postgres {
        dump.redeliver_from = early.clickhouse.started_at - chrono::Duration::hours(1);
    }
    std::fs::write(spliced.join("manifest.json"), serde_json::to_vec_pretty(&manifest).expect("manifest json"))
        .expect("write the spliced manifest");
    drop(old_postgres);
    drop(old_clickhouse);
    let _ = std::fs::remove_dir_all(&config.files.fs_root);

    let (new_postgres, new_clickhouse) = (ScratchPostgres::start(), ScratchClickHouse::start(1, 1).await);
    let restored_config = on_servers(&new_postgres, &new_clickhouse);
    let options = RestoreOptions { from: spliced.display().to_string(), force: false, pg_bin };
    aimesh::backup::restore(&restored_config, &options).await.expect("restore");
    // Analytics holds the first usage event only; both wait in usage's outbox to be sent again.
    let usage_events: u64 = aimesh_analytics::store::client_of(&restored_config.analytics.clickhouse_url)
        .query("SELECT count() FROM aimesh_analytics.usage_events FINAL")
        .fetch_one()
        .await
        .expect("count usage events");
    assert_eq!(usage_events, 1);
    let usage_db = sqlx::PgPool::connect(&format!("{}/usage", new_postgres.url())).await.expect("the usage database");
    let rearmed: i64 =
        sqlx::query_scalar("SELECT count(*) FROM outbox_events WHERE topic = 'usage' AND delivered_at IS NULL")
            .fetch_one(&usage_db)
            .await
            .expect("count the re-armed events");
    usage_db.close().await;
    assert_eq!(rearmed, 2);
    let mesh = Mesh::start_with(restored_config.clone(), Vec::new()).await;
    outboxes_drained(&mesh).await;
    eventually("analytics counts each usage record once", || async {
        analytics_totals(&mesh, &project, &ann.token).await == totals
    })
    .await;
    assert_eq!(analytics_totals(&mesh, &project, &ann.token).await, totals);
    mesh.stop().await.expect("the restored mesh stops");
    let _ = std::fs::remove_dir_all(&restored_config.files.fs_root);
    let _ = std::fs::remove_dir_all(&root);
}
