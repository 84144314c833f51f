//! Ended login sessions are purged once `identity.session_purge_after_hours` has passed since
//! they ended, and only those: against the real PostgreSQL, with sessions made by logging in
//! and their ends moved into the past by SQL.

use std::time::Duration;

use aimesh_identity::store::Store;
use aimesh_proto::identity::v1 as pb;
use aimesh_tests::{Mesh, authed, metric};

#[tokio::test]
async fn only_sessions_that_ended_longer_ago_than_the_purge_delay_are_purged() {
    let mesh = Mesh::start().await;
    let ann = mesh.signup("ann").await;
    let login = |device: &str| pb::LoginRequest {
        login: ann.email.clone(),
        password: ann.password.clone(),
        device_name: device.into(),
    };
    let (mut sessions, mut refresh_tokens) = (Vec::new(), Vec::new());
    for device in ["expired long ago", "revoked long ago", "revoked lately", "expired lately", "renewable"] {
        let login = mesh.sessions().login(login(device)).await.expect("login").into_inner();
        sessions.push(login.session.expect("a session").id);
        refresh_tokens.push(login.refresh_token);
    }
    let db = mesh.identity_db().await;
    let ended_hours_ago = |id: &str, change: &str, hours: i64| {
        let statement = format!("UPDATE user_sessions SET {change} WHERE id = $1::uuid");
        let (db, id) = (db.clone(), id.to_owned());
        async move {
            sqlx::query(sqlx::AssertSqlSafe(statement))
                .bind(id)
                .bind(hours)
                .execute(&db)
                .await
                .expect("move a session's end into the past");
        }
    };
    let expired = "expires_at = now() - make_interval(hours => $2::int), refresh_expires_at = now() - make_interval(hours => $2::int)";
    let revoked = "revoked_at = now() - make_interval(hours => $2::int)";
    // The default delay is a week (168 hours).
    ended_hours_ago(&sessions[0], expired, 169).await;
    ended_hours_ago(&sessions[1], revoked, 169).await;
    ended_hours_ago(&sessions[2], revoked, 167).await;
    ended_hours_ago(&sessions[3], expired, 167).await;
    // Its access token expired long ago, but its refresh token is live: not ended.
    ended_hours_ago(&sessions[4], "expires_at = now() - make_interval(hours => $2::int)", 1000).await;

    let deleted_before = metric("retention_rows_deleted_total", &["store=\"identity\"", "kind=\"login_sessions\""]);
    let purge_after = Duration::from_secs(mesh.config.identity.session_purge_after_hours * 3600);
    assert_eq!(purge_after, Duration::from_secs(168 * 3600), "the default");
    let store = Store::new(db.clone());
    assert_eq!(aimesh_identity::purge_ended_sessions(&store, purge_after).await.expect("purge"), 2);
    assert_eq!(aimesh_identity::purge_ended_sessions(&store, purge_after).await.expect("purge again"), 0);

    let left: Vec<String> = sqlx::query_scalar("SELECT device_name FROM user_sessions ORDER BY created_at, id")
        .fetch_all(&db)
        .await
        .expect("the sessions left");
    assert_eq!(left, ["test", "revoked lately", "expired lately", "renewable"]);
    let deleted = metric("retention_rows_deleted_total", &["store=\"identity\"", "kind=\"login_sessions\""]);
    assert_eq!(deleted - deleted_before, 2.0);
    assert!(metric("retention_last_run_timestamp_seconds", &["store=\"identity\""]) > 0.0);

    // Live sessions go on working: the first one's access token, the last one's refresh token.
    let listed = mesh
        .sessions()
        .list_sessions(authed(pb::ListSessionsRequest::default(), &ann.token))
        .await
        .expect("a live session works")
        .into_inner();
    assert_eq!(listed.sessions.len(), 1, "the other sessions are ended or wait for a refresh");
    mesh.sessions()
        .refresh_session(pb::RefreshSessionRequest { refresh_token: refresh_tokens[4].clone() })
        .await
        .expect("a session with a live refresh token renews");

    // Bounded batches: many ended sessions go in several statements, all of them.
    sqlx::query(
        "INSERT INTO user_sessions (id, user_id, token_hash, refresh_token_hash, expires_at, refresh_expires_at, revoked_at) \
         SELECT gen_random_uuid(), $1::uuid, 'a' || n, 'r' || n, now(), now(), now() - interval '200 hours' \
         FROM generate_series(1, 2500) AS n",
    )
    .bind(&ann.user_id)
    .execute(&db)
    .await
    .expect("write many ended sessions");
    assert_eq!(aimesh_identity::purge_ended_sessions(&store, purge_after).await.expect("purge"), 2500);
    mesh.stop().await.expect("stop");
}
