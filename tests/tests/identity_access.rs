//! Every RPC of identity checks the caller's role in the project (or the account) it names: a
//! stranger, or an API key of another project, is refused and changes nothing; inside one project
//! the roles viewer < member < admin < owner hold, and a project always keeps an owner.

use std::fmt::Debug;

use tonic::{Code, Response, Status};
use uuid::Uuid;

use aimesh_proto::identity::v1 as pb;
use aimesh_tests::{Account, Mesh, authed, expect_code, reason_and_field};

fn denied<T: Debug>(call: &str, result: Result<Response<T>, Status>) {
    expect_code(call, Code::PermissionDenied, result);
}

async fn create_project(mesh: &Mesh, owner: &Account, name: &str) -> pb::Project {
    let request = pb::CreateProjectRequest { name: name.into(), description: format!("{name} project") };
    mesh.projects().create_project(authed(request, &owner.token)).await.expect("create project").into_inner()
}

async fn add_member(
    mesh: &Mesh,
    token: &str,
    project_id: &str,
    member: &Account,
    role: pb::ProjectRole,
) -> Result<Response<pb::Membership>, Status> {
    let request =
        pb::AddMemberRequest { project_id: project_id.into(), email: member.email.clone(), role: role.into() };
    mesh.projects().add_member(authed(request, token)).await
}

async fn update_role(
    mesh: &Mesh,
    token: &str,
    project_id: &str,
    user_id: &str,
    role: pb::ProjectRole,
) -> Result<Response<pb::Membership>, Status> {
    let request =
        pb::UpdateMemberRoleRequest { project_id: project_id.into(), user_id: user_id.into(), role: role.into() };
    mesh.projects().update_member_role(authed(request, token)).await
}

async fn remove_member(
    mesh: &Mesh,
    token: &str,
    project_id: &str,
    user_id: &str,
) -> Result<Response<pb::RemoveMemberResponse>, Status> {
    let request = pb::RemoveMemberRequest { project_id: project_id.into(), user_id: user_id.into() };
    mesh.projects().remove_member(authed(request, token)).await
}

async fn get_project(mesh: &Mesh, credential: &str, project_id: &str) -> Result<Response<pb::Project>, Status> {
    mesh.projects().get_project(authed(pb::GetProjectRequest { project_id: project_id.into() }, credential)).await
}

async fn list_members(
    mesh: &Mesh,
    credential: &str,
    project_id: &str,
) -> Result<Response<pb::ListMembersResponse>, Status> {
    let request = pb::ListMembersRequest { project_id: project_id.into(), ..Default::default() };
    mesh.projects().list_members(authed(request, credential)).await
}

async fn create_api_key(
    mesh: &Mesh,
    token: &str,
    project_id: &str,
    scopes: &[&str],
) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
    let request = pb::CreateApiKeyRequest {
        project_id: project_id.into(),
        name: "ci".into(),
        scopes: scopes.iter().map(|s| (*s).to_owned()).collect(),
        expire_time: None,
        requests_per_minute: 0,
        project_owned: false,
    };
    mesh.api_keys().create_api_key(authed(request, token)).await
}

/// The members of a project as (user id, role), sorted, as `token` sees them.
async fn roles(mesh: &Mesh, token: &str, project_id: &str) -> Vec<(String, pb::ProjectRole)> {
    let members = list_members(mesh, token, project_id).await.expect("list members").into_inner().members;
    let mut roles: Vec<_> = members.into_iter().map(|m| (m.user_id.clone(), m.role())).collect();
    roles.sort();
    roles
}

/// Everything of A's that B's calls could have touched, as A sees it.
#[derive(Debug, PartialEq)]
struct Snapshot {
    project: pb::Project,
    members: Vec<(String, pb::ProjectRole)>,
    api_key: pb::ApiKey,
    user: pb::User,
    session_ids: Vec<String>,
}

impl Snapshot {
    /// Taken with A's token, so taking it again afterwards also proves that token still works.
    async fn take(mesh: &Mesh, a: &Account, project_id: &str, api_key_id: &str) -> Self {
        let project = get_project(mesh, &a.token, project_id).await.expect("A gets pa").into_inner();
        let members = roles(mesh, &a.token, project_id).await;
        let key_request = pb::GetApiKeyRequest { project_id: project_id.into(), api_key_id: api_key_id.into() };
        let api_key = mesh.api_keys().get_api_key(authed(key_request, &a.token)).await.expect("A gets the key");
        let user_request = pb::GetUserRequest { user_id: "me".into() };
        let user = mesh.users().get_user(authed(user_request, &a.token)).await.expect("A gets itself").into_inner();
        Self { project, members, api_key: api_key.into_inner(), user, session_ids: session_ids(mesh, a).await }
    }
}

/// Ids only: last-use times move whenever A's token is used.
async fn session_ids(mesh: &Mesh, account: &Account) -> Vec<String> {
    let request = authed(pb::ListSessionsRequest::default(), &account.token);
    let sessions = mesh.sessions().list_sessions(request).await.expect("list sessions").into_inner().sessions;
    sessions.into_iter().map(|s| s.id).collect()
}

/// The audit events `user_id` is the actor of, as (action, project), in write order.
async fn audit_trail(mesh: &Mesh, user_id: &str) -> Vec<(String, Option<Uuid>)> {
    let pool = mesh.identity_db().await;
    let rows = sqlx::query_as(
        "SELECT payload->>'action', project_id FROM outbox_events \
         WHERE topic = 'audit' AND payload->>'actor_user_id' = $1 ORDER BY id",
    )
    .bind(user_id)
    .fetch_all(&pool)
    .await
    .expect("read the outbox");
    pool.close().await;
    rows
}

#[tokio::test]
async fn a_stranger_is_refused_every_rpc_naming_another_users_project_or_account_and_changes_nothing() {
    let mesh = Mesh::start().await;
    let a = mesh.signup("alice").await;
    let b = mesh.signup("bob").await;
    let c = mesh.signup("carol").await;
    let d = mesh.signup("dave").await;
    let pa = create_project(&mesh, &a, "alpha").await.id;
    let pb_id = create_project(&mesh, &b, "beta").await.id;
    add_member(&mesh, &a.token, &pa, &c, pb::ProjectRole::Member).await.expect("A adds C");
    let a_key = create_api_key(&mesh, &a.token, &pa, &["identity:read"]).await.expect("A's key").into_inner();
    let a_key_id = a_key.api_key.expect("the key").id;
    let a_session_id = session_ids(&mesh, &a).await.into_iter().next().expect("A's session");
    let before = Snapshot::take(&mesh, &a, &pa, &a_key_id).await;

    // B owns a project of its own, so these fail on the role in pa, not on being nobody.
    let mut projects = mesh.projects();
    let mut keys = mesh.api_keys();
    let t = b.token.as_str();
    denied("GetProject", get_project(&mesh, t, &pa).await);
    let renamed = pb::Project { name: "taken".into(), ..Default::default() };
    let mask = prost_types::FieldMask { paths: vec!["name".into()] };
    let update = pb::UpdateProjectRequest { project_id: pa.clone(), project: Some(renamed), update_mask: Some(mask) };
    denied("UpdateProject", projects.update_project(authed(update, t)).await);
    let delete = pb::DeleteProjectRequest { project_id: pa.clone() };
    denied("DeleteProject", projects.delete_project(authed(delete, t)).await);
    denied("AddMember", add_member(&mesh, t, &pa, &d, pb::ProjectRole::Member).await);
    denied("ListMembers", list_members(&mesh, t, &pa).await);
    denied("UpdateMemberRole", update_role(&mesh, t, &pa, &c.user_id, pb::ProjectRole::Admin).await);
    denied("RemoveMember", remove_member(&mesh, t, &pa, &c.user_id).await);
    denied("CreateApiKey", create_api_key(&mesh, t, &pa, &["identity:read"]).await);
    let list_keys = pb::ListApiKeysRequest { project_id: pa.clone(), include_revoked: true, ..Default::default() };
    denied("ListApiKeys", keys.list_api_keys(authed(list_keys, t)).await);
    let get_key = pb::GetApiKeyRequest { project_id: pa.clone(), api_key_id: a_key_id.clone() };
    denied("GetApiKey", keys.get_api_key(authed(get_key, t)).await);
    let revoke = pb::RevokeApiKeyRequest { project_id: pa.clone(), api_key_id: a_key_id.clone() };
    denied("RevokeApiKey", keys.revoke_api_key(authed(revoke, t)).await);

    // Naming B's own project with A's key id must not reach A's key either.
    let get_key = pb::GetApiKeyRequest { project_id: pb_id.clone(), api_key_id: a_key_id.clone() };
    expect_code("GetApiKey via pb", Code::NotFound, keys.get_api_key(authed(get_key, t)).await);
    let revoke = pb::RevokeApiKeyRequest { project_id: pb_id.clone(), api_key_id: a_key_id.clone() };
    expect_code("RevokeApiKey via pb", Code::NotFound, keys.revoke_api_key(authed(revoke, t)).await);

    // A's account: B even knows A's password, which must not matter.
    let mut users = mesh.users();
    denied("GetUser", users.get_user(authed(pb::GetUserRequest { user_id: a.user_id.clone() }, t)).await);
    let user = pb::User { first_name: "Mallory".into(), ..Default::default() };
    let mask = prost_types::FieldMask { paths: vec!["first_name".into()] };
    let update = pb::UpdateUserRequest { user_id: a.user_id.clone(), user: Some(user), update_mask: Some(mask) };
    denied("UpdateUser", users.update_user(authed(update, t)).await);
    let delete = pb::DeleteUserRequest { user_id: a.user_id.clone() };
    denied("DeleteUser", users.delete_user(authed(delete, t)).await);
    let change = pb::ChangePasswordRequest {
        user_id: a.user_id.clone(),
        current_password: a.password.clone(),
        new_password: "mallory-password-123".into(),
    };
    denied("ChangePassword", users.change_password(authed(change, t)).await);
    // Sessions are looked up among the caller's own, so another's is simply not there.
    let revoke = pb::RevokeSessionRequest { session_id: a_session_id };
    expect_code("RevokeSession", Code::NotFound, mesh.sessions().revoke_session(authed(revoke, t)).await);

    // B's API keys: one of pb never reaches pa, and one without identity:read not even pb.
    let b_key = create_api_key(&mesh, t, &pb_id, &["identity:read"]).await.expect("B's key").into_inner().secret;
    get_project(&mesh, &b_key, &pb_id).await.expect("B's key reads pb");
    denied("GetProject with pb's key", get_project(&mesh, &b_key, &pa).await);
    denied("ListMembers with pb's key", list_members(&mesh, &b_key, &pa).await);
    let chat_key = create_api_key(&mesh, t, &pb_id, &["chat:read"]).await.expect("B's chat key").into_inner().secret;
    denied("GetProject without identity:read", get_project(&mesh, &chat_key, &pb_id).await);

    let after = Snapshot::take(&mesh, &a, &pa, &a_key_id).await;
    assert_eq!(after, before, "B's calls changed what A sees");
    assert_eq!(after.api_key.revoke_time, None);
    let login = pb::LoginRequest { login: a.email.clone(), password: a.password.clone(), device_name: "check".into() };
    mesh.sessions().login(login).await.expect("A's password is unchanged");

    // The outbox is the audit log: B's only events are its own, none of them in pa.
    let pb_uuid = Some(Uuid::parse_str(&pb_id).expect("pb's id"));
    let expected = vec![
        ("user.registered".to_owned(), None),
        ("session.login".to_owned(), None),
        ("project.created".to_owned(), pb_uuid),
        ("api_key.created".to_owned(), pb_uuid),
        ("api_key.created".to_owned(), pb_uuid),
    ];
    assert_eq!(audit_trail(&mesh, &b.user_id).await, expected);
}

#[tokio::test]
async fn a_viewer_may_read_the_project_but_not_update_it_or_add_members() {
    let mesh = Mesh::start().await;
    let owner = mesh.signup("owner").await;
    let viewer = mesh.signup("viewer").await;
    let other = mesh.signup("other").await;
    let project = create_project(&mesh, &owner, "alpha").await.id;
    add_member(&mesh, &owner.token, &project, &viewer, pb::ProjectRole::Viewer).await.expect("add viewer");

    let seen = get_project(&mesh, &viewer.token, &project).await.expect("a viewer reads").into_inner();
    assert_eq!(seen.caller_role(), pb::ProjectRole::Viewer);
    let renamed = pb::Project { name: "renamed".into(), ..Default::default() };
    let mask = prost_types::FieldMask { paths: vec!["name".into()] };
    let update =
        pb::UpdateProjectRequest { project_id: project.clone(), project: Some(renamed), update_mask: Some(mask) };
    denied("UpdateProject", mesh.projects().update_project(authed(update, &viewer.token)).await);
    denied("AddMember", add_member(&mesh, &viewer.token, &project, &other, pb::ProjectRole::Viewer).await);

    let name = get_project(&mesh, &owner.token, &project).await.expect("get project").into_inner().name;
    assert_eq!(name, "alpha");
    assert_eq!(roles(&mesh, &owner.token, &project).await.len(), 2, "nobody was added");
}

/// A project of a fresh owner with a second account as admin: (owner, admin, project id).
async fn project_with_admin(mesh: &Mesh) -> (Account, Account, String) {
    let owner = mesh.signup("owner").await;
    let admin = mesh.signup("admin").await;
    let project = create_project(mesh, &owner, "alpha").await.id;
    add_member(mesh, &owner.token, &project, &admin, pb::ProjectRole::Admin).await.expect("add admin");
    (owner, admin, project)
}

#[tokio::test]
async fn an_admin_cannot_grant_the_owner_role() {
    let mesh = Mesh::start().await;
    let (owner, admin, project) = project_with_admin(&mesh).await;
    let newcomer = mesh.signup("newcomer").await;

    let t = admin.token.as_str();
    denied("AddMember as owner", add_member(&mesh, t, &project, &newcomer, pb::ProjectRole::Owner).await);
    add_member(&mesh, t, &project, &newcomer, pb::ProjectRole::Member).await.expect("an admin adds a member");
    denied("promote to owner", update_role(&mesh, t, &project, &newcomer.user_id, pb::ProjectRole::Owner).await);
    denied("promote self to owner", update_role(&mesh, t, &project, &admin.user_id, pb::ProjectRole::Owner).await);

    let mut expected = vec![
        (owner.user_id.clone(), pb::ProjectRole::Owner),
        (admin.user_id.clone(), pb::ProjectRole::Admin),
        (newcomer.user_id.clone(), pb::ProjectRole::Member),
    ];
    expected.sort();
    assert_eq!(roles(&mesh, &owner.token, &project).await, expected);
}

#[tokio::test]
async fn an_admin_is_refused_demoting_or_removing_an_owner_even_the_last_one() {
    let mesh = Mesh::start().await;
    let (owner, admin, project) = project_with_admin(&mesh).await;

    // Permission comes before the last-owner rule: an admin may not touch an owner at all, so
    // it must be told so, not that the owner happens to be the last one.
    let t = admin.token.as_str();
    denied("demote the owner", update_role(&mesh, t, &project, &owner.user_id, pb::ProjectRole::Member).await);
    denied("remove the owner", remove_member(&mesh, t, &project, &owner.user_id).await);

    let mut expected =
        vec![(owner.user_id.clone(), pb::ProjectRole::Owner), (admin.user_id.clone(), pb::ProjectRole::Admin)];
    expected.sort();
    assert_eq!(roles(&mesh, &owner.token, &project).await, expected);
}

#[tokio::test]
async fn the_last_owner_can_neither_leave_nor_be_demoted() {
    let mesh = Mesh::start().await;
    let owner = mesh.signup("owner").await;
    let second = mesh.signup("second").await;
    let project = create_project(&mesh, &owner, "alpha").await.id;
    let t = owner.token.as_str();

    let status =
        expect_code("leave", Code::FailedPrecondition, remove_member(&mesh, t, &project, &owner.user_id).await);
    assert_eq!(reason_and_field(&status).0, "LAST_OWNER");
    let demote = update_role(&mesh, t, &project, &owner.user_id, pb::ProjectRole::Admin).await;
    let status = expect_code("demote", Code::FailedPrecondition, demote);
    assert_eq!(reason_and_field(&status).0, "LAST_OWNER");
    assert_eq!(roles(&mesh, t, &project).await, vec![(owner.user_id.clone(), pb::ProjectRole::Owner)]);

    // The rule is about the last owner: with a second one, the first may step down.
    add_member(&mesh, t, &project, &second, pb::ProjectRole::Owner).await.expect("add a second owner");
    update_role(&mesh, t, &project, &owner.user_id, pb::ProjectRole::Admin).await.expect("step down");
}

#[tokio::test]
async fn a_member_can_leave_a_project() {
    let mesh = Mesh::start().await;
    let owner = mesh.signup("owner").await;
    let member = mesh.signup("member").await;
    let project = create_project(&mesh, &owner, "alpha").await.id;
    add_member(&mesh, &owner.token, &project, &member, pb::ProjectRole::Member).await.expect("add member");

    remove_member(&mesh, &member.token, &project, &member.user_id).await.expect("a member leaves");

    denied("GetProject after leaving", get_project(&mesh, &member.token, &project).await);
    assert_eq!(roles(&mesh, &owner.token, &project).await, vec![(owner.user_id.clone(), pb::ProjectRole::Owner)]);
}

#[tokio::test]
async fn a_call_without_a_valid_credential_is_unauthenticated() {
    let mesh = Mesh::start().await;
    let owner = mesh.signup("owner").await;
    let project = create_project(&mesh, &owner, "alpha").await.id;

    let anonymous = mesh.projects().get_project(pb::GetProjectRequest { project_id: project.clone() }).await;
    expect_code("no credential", Code::Unauthenticated, anonymous);
    // Well-formed but never issued: refused by the auth layer before any handler runs.
    expect_code("unknown token", Code::Unauthenticated, get_project(&mesh, "ams_nope", &project).await);
}

#[tokio::test]
async fn a_malformed_project_id_is_an_invalid_argument_naming_the_field() {
    let mesh = Mesh::start().await;
    let owner = mesh.signup("owner").await;

    let status = expect_code("GetProject", Code::InvalidArgument, get_project(&mesh, &owner.token, "not-a-uuid").await);
    assert_eq!(reason_and_field(&status).1.as_deref(), Some("project_id"));
}
