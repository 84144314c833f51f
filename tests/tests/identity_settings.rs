//! SettingsService: only a system admin changes settings; public ones are readable by anyone,
//! even without a credential, private ones only by an admin; encrypted ones are ciphertext at rest.

use prost_types::value::Kind;
use tonic::{Code, Response, Status};

use aimesh_proto::identity::v1 as pb;
use aimesh_tests::{Mesh, authed, expect_code, reason_and_field};

/// `message`, with the bearer credential if there is one.
fn request<T>(message: T, credential: Option<&str>) -> tonic::Request<T> {
    match credential {
        Some(credential) => authed(message, credential),
        None => tonic::Request::new(message),
    }
}

fn string(text: &str) -> prost_types::Value {
    prost_types::Value { kind: Some(Kind::StringValue(text.into())) }
}

fn number(n: f64) -> prost_types::Value {
    prost_types::Value { kind: Some(Kind::NumberValue(n)) }
}

/// A plain, private setting; tests flip `public` or `encrypted` as they need.
fn setting(key: &str, value: prost_types::Value) -> pb::Setting {
    pb::Setting { key: key.into(), value: Some(value), category: "test".into(), ..Default::default() }
}

async fn set(mesh: &Mesh, credential: Option<&str>, setting: pb::Setting) -> Result<Response<pb::Setting>, Status> {
    mesh.settings().set_setting(request(pb::SetSettingRequest { setting: Some(setting) }, credential)).await
}

async fn get(mesh: &Mesh, credential: Option<&str>, key: &str) -> Result<Response<pb::Setting>, Status> {
    mesh.settings().get_setting(request(pb::GetSettingRequest { key: key.into() }, credential)).await
}

async fn delete(
    mesh: &Mesh,
    credential: Option<&str>,
    key: &str,
) -> Result<Response<pb::DeleteSettingResponse>, Status> {
    mesh.settings().delete_setting(request(pb::DeleteSettingRequest { key: key.into() }, credential)).await
}

/// The value `credential` reads for `key`.
async fn value(mesh: &Mesh, credential: Option<&str>, key: &str) -> Option<prost_types::Value> {
    get(mesh, credential, key).await.expect("get setting").into_inner().value
}

/// Every page of ListSettings at `page_size`: the keys in the order given, and how many pages.
async fn list_all(mesh: &Mesh, credential: Option<&str>, page_size: i32) -> (Vec<String>, usize) {
    let mut keys = Vec::new();
    let mut pages = 0;
    let mut page_token = String::new();
    loop {
        let list = pb::ListSettingsRequest { category: String::new(), page_size, page_token };
        let page = mesh.settings().list_settings(request(list, credential)).await.expect("list settings").into_inner();
        pages += 1;
        keys.extend(page.settings.into_iter().map(|s| s.key));
        if page.next_page_token.is_empty() {
            return (keys, pages);
        }
        assert!(pages < 10, "the list does not end");
        page_token = page.next_page_token;
    }
}

#[tokio::test]
async fn only_a_system_admin_may_set_or_delete_a_setting() {
    let mesh = Mesh::start().await;
    let user = mesh.signup("user").await;
    let admin = mesh.make_admin(&mesh.signup("root").await).await;
    let (user, admin) = (Some(user.token.as_str()), Some(admin.token.as_str()));
    let key = "chat.max_message_bytes";

    expect_code("set by a user", Code::PermissionDenied, set(&mesh, user, setting(key, number(10.0))).await);
    expect_code("set anonymously", Code::Unauthenticated, set(&mesh, None, setting(key, number(10.0))).await);
    expect_code("nothing was written", Code::NotFound, get(&mesh, admin, key).await);

    set(&mesh, admin, setting(key, number(4096.0))).await.expect("set by the admin");
    expect_code("delete by a user", Code::PermissionDenied, delete(&mesh, user, key).await);
    expect_code("delete anonymously", Code::Unauthenticated, delete(&mesh, None, key).await);
    assert_eq!(value(&mesh, admin, key).await, Some(number(4096.0)), "nothing was deleted");

    delete(&mesh, admin, key).await.expect("delete by the admin");
    expect_code("get after delete", Code::NotFound, get(&mesh, admin, key).await);
    expect_code("delete a missing key", Code::NotFound, delete(&mesh, admin, key).await);
}

#[tokio::test]
async fn a_public_setting_is_readable_without_a_credential_and_a_private_one_only_by_an_admin() {
    let mesh = Mesh::start().await;
    let user = mesh.signup("user").await;
    let admin = mesh.make_admin(&mesh.signup("root").await).await;
    let (user, admin) = (Some(user.token.as_str()), Some(admin.token.as_str()));
    set(&mesh, admin, pb::Setting { public: true, ..setting("ui.theme", string("dark")) }).await.expect("set public");
    set(&mesh, admin, setting("billing.plan_limit", number(3.0))).await.expect("set private");

    assert_eq!(value(&mesh, None, "ui.theme").await, Some(string("dark")));
    assert_eq!(value(&mesh, user, "ui.theme").await, Some(string("dark")));
    // Absent rather than forbidden, so private keys cannot be discovered by probing.
    expect_code("private, anonymously", Code::NotFound, get(&mesh, None, "billing.plan_limit").await);
    expect_code("private, by a user", Code::NotFound, get(&mesh, user, "billing.plan_limit").await);
    assert_eq!(value(&mesh, admin, "billing.plan_limit").await, Some(number(3.0)));
}

#[tokio::test]
async fn an_encrypted_setting_round_trips_for_the_admin_and_is_stored_only_as_ciphertext() {
    let mesh = Mesh::start().await;
    let user = mesh.signup("user").await;
    let admin = mesh.make_admin(&mesh.signup("root").await).await;
    let (user, admin) = (Some(user.token.as_str()), Some(admin.token.as_str()));
    let plaintext = "smtp-s3cret-passw0rd";
    let key = "mail.smtp_password";

    let stored = set(&mesh, admin, pb::Setting { encrypted: true, ..setting(key, string(plaintext)) })
        .await
        .expect("set encrypted")
        .into_inner();
    assert!(stored.encrypted);
    assert_eq!(stored.value, Some(string(plaintext)));
    assert_eq!(value(&mesh, admin, key).await, Some(string(plaintext)));
    expect_code("encrypted, by a user", Code::NotFound, get(&mesh, user, key).await);

    let pool = mesh.identity_db().await;
    let (value_is_null, ciphertext): (bool, Vec<u8>) =
        sqlx::query_as("SELECT value IS NULL, value_ciphertext FROM system_configs WHERE key = $1")
            .bind(key)
            .fetch_one(&pool)
            .await
            .expect("read the row");
    assert!(value_is_null, "the plain value column must stay empty");
    assert!(!ciphertext.windows(plaintext.len()).any(|w| w == plaintext.as_bytes()), "the plaintext is in the row");
    // The audit event of the change must not carry the value either.
    let leaks: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox_events WHERE strpos(payload::text, $1) > 0")
        .bind(plaintext)
        .fetch_one(&pool)
        .await
        .expect("read the outbox");
    assert_eq!(leaks, 0, "the plaintext is in the outbox");
    pool.close().await;
}

#[tokio::test]
async fn an_invalid_setting_is_refused_naming_the_field() {
    let mesh = Mesh::start().await;
    let admin = mesh.make_admin(&mesh.signup("root").await).await;
    let cases = [
        (pb::Setting { public: true, encrypted: true, ..setting("mail.password", string("x")) }, "setting.encrypted"),
        (setting("Bad..Key", string("x")), "setting.key"),
        (pb::Setting { value: None, ..setting("mail.sender", string("x")) }, "setting.value"),
    ];
    for (invalid, field) in cases {
        let key = invalid.key.clone();
        let status = expect_code(&key, Code::InvalidArgument, set(&mesh, Some(&admin.token), invalid).await);
        assert_eq!(reason_and_field(&status).1.as_deref(), Some(field), "{key}");
    }
    let (keys, _) = list_all(&mesh, Some(&admin.token), 0).await;
    assert_eq!(keys, Vec::<String>::new(), "nothing was written");
}

#[tokio::test]
async fn list_settings_pages_through_every_setting_in_key_order_and_shows_non_admins_only_public_ones() {
    let mesh = Mesh::start().await;
    let user = mesh.signup("user").await;
    let admin = mesh.make_admin(&mesh.signup("root").await).await;
    let (user, admin) = (Some(user.token.as_str()), Some(admin.token.as_str()));
    // Set out of order, so the list's order is its own; every other one public.
    let keys = ["list.c", "list.a", "list.e", "list.b", "list.d"];
    for key in keys {
        let public = matches!(key, "list.a" | "list.c" | "list.e");
        set(&mesh, admin, pb::Setting { public, ..setting(key, string(key)) }).await.expect("set");
    }

    let (listed, pages) = list_all(&mesh, admin, 2).await;
    assert_eq!(listed, ["list.a", "list.b", "list.c", "list.d", "list.e"]);
    assert_eq!(pages, 3);
    for credential in [user, None] {
        let (listed, _) = list_all(&mesh, credential, 2).await;
        assert_eq!(listed, ["list.a", "list.c", "list.e"], "credential {credential:?}");
    }
}
