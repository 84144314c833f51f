//! `GetProject` served from identity's project cache, with two replicas sharing one database and
//! Redis key prefix: a change made through the service shows at once on the replica that made it
//! and, through the invalidation broadcast, soon on the other (the in-process cache would keep
//! the old row for 10 s without it); a change behind the service's back does not show, which is
//! what proves the reads cached.

use std::time::{Duration, Instant};

use prost_types::FieldMask;
use tonic::Code;

use aimesh_proto::identity::v1 as pb;
use aimesh_tests::{Account, Mesh, authed, test_config};

/// How long the other replica may take to drop its cached row after a change: the broadcast
/// takes milliseconds, the in-process lifetime it must beat is 10 s.
const BROADCAST_WAIT: Duration = Duration::from_secs(2);

/// Two replicas of one deployment (one database, one Redis key prefix). Role and credential
/// caches live five minutes, so that within a test only invalidations change what they hold.
async fn two_replicas() -> (Mesh, Mesh) {
    let (mut config, databases) = test_config();
    config.common.auth.local_ttl_secs = 300;
    config.common.auth.shared_ttl_secs = 300;
    let first = Mesh::start_with(config.clone(), databases).await;
    let second = Mesh::start_with(config, Vec::new()).await;
    (first, second)
}

/// `GetProject` of `project_id` through `replica`, as `account`.
async fn get_project(replica: &Mesh, account: &Account, project_id: &str) -> Result<pb::Project, tonic::Status> {
    let request = pb::GetProjectRequest { project_id: project_id.into() };
    replica.projects().get_project(authed(request, &account.token)).await.map(tonic::Response::into_inner)
}

/// Renames `project_id` through `replica`, as `owner`.
async fn rename(replica: &Mesh, owner: &Account, project_id: &str, name: &str) {
    let request = pb::UpdateProjectRequest {
        project: Some(pb::Project { id: project_id.into(), name: name.into(), ..Default::default() }),
        update_mask: Some(FieldMask { paths: vec!["name".into()] }),
        project_id: project_id.into(),
    };
    let updated = replica.projects().update_project(authed(request, &owner.token)).await.expect("update project");
    assert_eq!(updated.into_inner().name, name, "UpdateProject answers the new row");
}

/// Polls `GetProject` on `replica` for at most [`BROADCAST_WAIT`] until `done` accepts its
/// answer; returns the last answer if it never does.
async fn get_until(
    replica: &Mesh,
    account: &Account,
    project_id: &str,
    done: impl Fn(&Result<pb::Project, tonic::Status>) -> bool,
) -> Result<pb::Project, tonic::Status> {
    let started = Instant::now();
    loop {
        let answer = get_project(replica, account, project_id).await;
        if done(&answer) || started.elapsed() > BROADCAST_WAIT {
            return answer;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn name_of(answer: &Result<pb::Project, tonic::Status>) -> Option<&str> {
    answer.as_ref().ok().map(|project| project.name.as_str())
}

fn code_of(answer: &Result<pb::Project, tonic::Status>) -> Option<Code> {
    answer.as_ref().err().map(tonic::Status::code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_shows_at_once_on_its_replica_and_soon_on_the_other() {
    let (first, second) = two_replicas().await;
    let owner = first.signup("ann").await;
    let project = first.create_project(&owner, "before").await;
    // Both replicas cache the row.
    for replica in [&first, &second] {
        for _ in 0..2 {
            assert_eq!(get_project(replica, &owner, &project).await.expect("get").name, "before");
        }
    }

    rename(&first, &owner, &project, "after").await;
    let here = get_project(&first, &owner, &project).await;
    assert_eq!(name_of(&here), Some("after"), "the replica that updated answers the new name at once: {here:?}");
    let there = get_until(&second, &owner, &project, |answer| name_of(answer) == Some("after")).await;
    assert_eq!(name_of(&there), Some("after"), "the other replica still answers the old row: {there:?}");

    // And the other way round.
    rename(&second, &owner, &project, "again").await;
    assert_eq!(name_of(&get_project(&second, &owner, &project).await), Some("again"));
    let there = get_until(&first, &owner, &project, |answer| name_of(answer) == Some("again")).await;
    assert_eq!(name_of(&there), Some("again"), "{there:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_deleted_project_is_not_found_on_both_replicas() {
    let (first, second) = two_replicas().await;
    let owner = first.signup("ann").await;
    let admin = first.signup("root").await;
    let admin = first.make_admin(&admin).await;
    let project = first.create_project(&owner, "doomed").await;
    // Both replicas cache the row, and both callers' roles (a system admin is an owner of every
    // live project without being a member).
    for replica in [&first, &second] {
        for account in [&owner, &admin] {
            assert_eq!(get_project(replica, account, &project).await.expect("get").name, "doomed");
        }
    }

    let delete = pb::DeleteProjectRequest { project_id: project.clone() };
    first.projects().delete_project(authed(delete, &owner.token)).await.expect("delete project");

    // Nothing about the admin's role changed, so their cached role still lets them through and
    // the project's row alone decides: NOT_FOUND at once here, and on the other replica as soon
    // as the broadcast arrives.
    let here = get_project(&first, &admin, &project).await;
    assert_eq!(code_of(&here), Some(Code::NotFound), "the deleting replica still serves the project: {here:?}");
    let there = get_until(&second, &admin, &project, |answer| code_of(answer) == Some(Code::NotFound)).await;
    assert_eq!(code_of(&there), Some(Code::NotFound), "the other replica still serves the project: {there:?}");
    // The owner's role went with the project, and by design a caller without a role is refused
    // whether the project exists or not. On the other replica the role's broadcast may come a
    // moment after the row's: meanwhile the owner gets NOT_FOUND, never the project.
    let here = get_project(&first, &owner, &project).await;
    assert_eq!(code_of(&here), Some(Code::PermissionDenied), "{here:?}");
    let there = get_until(&second, &owner, &project, |answer| code_of(answer) == Some(Code::PermissionDenied)).await;
    assert_eq!(code_of(&there), Some(Code::PermissionDenied), "{there:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_project_created_after_others_were_read_is_found_at_once_everywhere() {
    let (first, second) = two_replicas().await;
    let owner = first.signup("ann").await;
    let older = first.create_project(&owner, "older").await;
    for replica in [&first, &second] {
        assert_eq!(get_project(replica, &owner, &older).await.expect("get").name, "older");
    }
    // Project ids are made by the server, so nothing was ever cached for the new one: both
    // replicas find it at once, without waiting for any cache to expire.
    let newer = second.create_project(&owner, "newer").await;
    for replica in [&first, &second] {
        assert_eq!(get_project(replica, &owner, &newer).await.expect("get the new project").name, "newer");
        assert_eq!(get_project(replica, &owner, &older).await.expect("get").name, "older");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_come_from_the_cache_until_the_service_changes_the_project() {
    let (first, second) = two_replicas().await;
    let owner = first.signup("ann").await;
    let project = first.create_project(&owner, "cached").await;
    assert_eq!(get_project(&first, &owner, &project).await.expect("get").name, "cached");

    // A change behind the service's back (the cache's contract: writes go through the service).
    let pool = first.identity_db().await;
    let id: uuid::Uuid = project.parse().expect("project id");
    sqlx::query("UPDATE projects SET name = 'behind the service' WHERE id = $1")
        .bind(id)
        .execute(&pool)
        .await
        .expect("rename in the database");

    // The first replica answers from its own memory; the second, which never read the project,
    // from Redis, where the first left it.
    for replica in [&first, &second] {
        assert_eq!(get_project(replica, &owner, &project).await.expect("get").name, "cached");
    }

    // A change through the service shows everywhere.
    rename(&second, &owner, &project, "through the service").await;
    assert_eq!(name_of(&get_project(&second, &owner, &project).await), Some("through the service"));
    let there = get_until(&first, &owner, &project, |answer| name_of(answer) == Some("through the service")).await;
    assert_eq!(name_of(&there), Some("through the service"), "{there:?}");
}
