//! Every public route, called on another tenant's data: with a login session of a person outside
//! the project, with an API key (every scope) of another project, and with no credential. Every
//! call is refused (401, 403 or 404; never a success, never a server error), and afterwards the
//! victim's data is exactly as before. The route list is checked against `/openapi.json`, so a
//! route added without a line here fails this test.

use std::collections::BTreeSet;

use http::{Method, StatusCode};
use serde_json::{Value, json};

use aimesh_kit::auth::SCOPES;
use aimesh_tests::Mesh;
use aimesh_tests::rest::{Reply, Rest};

/// Who a route acts on, which decides what every stranger must get.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Target {
    /// Data of a project (named in the path, the query or the body): strangers get 403 or 404.
    Tenant,
    /// A person's own account, login sessions or profile, named by id: strangers get 403 or 404.
    Person,
    /// The deployment's catalog and settings: only a system admin changes them.
    Operator,
    /// The caller's own things (its projects, its sessions): refused only without a credential.
    Own,
    /// Open to anyone by design (sign-up, login, refresh, signed links, public reads).
    Open,
}

/// A valid analytics range.
const RANGE: &str = "startTime=2026-01-01T00:00:00Z&endTime=2026-01-02T00:00:00Z";

/// The victim's things the routes name.
struct Victim {
    project: String,
    session: String,
    message: String,
    file: String,
    api_key: String,
    user: String,
    login_session: String,
    model: String,
}

/// One route, filled in with the victim's ids.
struct Case {
    method: Method,
    /// The path template as `/openapi.json` spells it.
    template: &'static str,
    target: Target,
    path: String,
    body: Option<Value>,
}

fn cases(v: &Victim) -> Vec<Case> {
    use Target::*;
    let p = &v.project;
    let rows: Vec<(Method, &'static str, Target, String, Option<Value>)> = vec![
        // identity: users and login sessions
        (Method::POST, "/v1/users", Open, "/v1/users".into(), None),
        (Method::GET, "/v1/users/{user_id}", Person, format!("/v1/users/{}", v.user), None),
        (
            Method::PATCH,
            "/v1/users/{user_id}",
            Person,
            format!("/v1/users/{}", v.user),
            Some(json!({ "firstName": "owned" })),
        ),
        (Method::DELETE, "/v1/users/{user_id}", Person, format!("/v1/users/{}", v.user), None),
        (
            Method::POST,
            "/v1/users/{user_id}:changePassword",
            Person,
            format!("/v1/users/{}:changePassword", v.user),
            Some(json!({ "currentPassword": "guess-password-123", "newPassword": "owned-password-123" })),
        ),
        (Method::POST, "/v1/auth/login", Open, "/v1/auth/login".into(), None),
        (Method::POST, "/v1/auth/refresh", Open, "/v1/auth/refresh".into(), None),
        (Method::POST, "/v1/auth/logout", Own, "/v1/auth/logout".into(), Some(json!({}))),
        (Method::GET, "/v1/auth/sessions", Own, "/v1/auth/sessions".into(), None),
        (
            Method::DELETE,
            "/v1/auth/sessions/{session_id}",
            Person,
            format!("/v1/auth/sessions/{}", v.login_session),
            None,
        ),
        // identity: projects, members, keys
        (Method::POST, "/v1/projects", Own, "/v1/projects".into(), Some(json!({ "name": "mine" }))),
        (Method::GET, "/v1/projects", Own, "/v1/projects".into(), None),
        (Method::GET, "/v1/projects/{project_id}", Tenant, format!("/v1/projects/{p}"), None),
        (
            Method::PATCH,
            "/v1/projects/{project_id}",
            Tenant,
            format!("/v1/projects/{p}"),
            Some(json!({ "name": "owned" })),
        ),
        (Method::DELETE, "/v1/projects/{project_id}", Tenant, format!("/v1/projects/{p}"), None),
        (Method::GET, "/v1/projects/{project_id}/members", Tenant, format!("/v1/projects/{p}/members"), None),
        (
            Method::POST,
            "/v1/projects/{project_id}/members",
            Tenant,
            format!("/v1/projects/{p}/members"),
            Some(json!({ "email": "mallory@example.org", "role": "PROJECT_ROLE_OWNER" })),
        ),
        (
            Method::PATCH,
            "/v1/projects/{project_id}/members/{user_id}",
            Tenant,
            format!("/v1/projects/{p}/members/{}", v.user),
            Some(json!({ "role": "PROJECT_ROLE_VIEWER" })),
        ),
        (
            Method::DELETE,
            "/v1/projects/{project_id}/members/{user_id}",
            Tenant,
            format!("/v1/projects/{p}/members/{}", v.user),
            None,
        ),
        (Method::GET, "/v1/projects/{project_id}/apiKeys", Tenant, format!("/v1/projects/{p}/apiKeys"), None),
        (
            Method::POST,
            "/v1/projects/{project_id}/apiKeys",
            Tenant,
            format!("/v1/projects/{p}/apiKeys"),
            Some(json!({ "name": "stolen", "scopes": ["chat:read"] })),
        ),
        (
            Method::GET,
            "/v1/projects/{project_id}/apiKeys/{api_key_id}",
            Tenant,
            format!("/v1/projects/{p}/apiKeys/{}", v.api_key),
            None,
        ),
        (
            Method::PATCH,
            "/v1/projects/{project_id}/apiKeys/{api_key_id}",
            Tenant,
            format!("/v1/projects/{p}/apiKeys/{}", v.api_key),
            Some(json!({ "name": "owned" })),
        ),
        (
            Method::POST,
            "/v1/projects/{project_id}/apiKeys/{api_key_id}:revoke",
            Tenant,
            format!("/v1/projects/{p}/apiKeys/{}:revoke", v.api_key),
            Some(json!({})),
        ),
        // identity: system settings
        (Method::GET, "/v1/settings", Open, "/v1/settings".into(), None),
        (Method::GET, "/v1/settings/{key}", Open, "/v1/settings/site.name".into(), None),
        (
            Method::PUT,
            "/v1/settings/{setting_key}",
            Operator,
            "/v1/settings/site.name".into(),
            Some(json!({ "value": "owned", "public": true })),
        ),
        (Method::DELETE, "/v1/settings/{key}", Operator, "/v1/settings/site.name".into(), None),
        // chat
        (
            Method::POST,
            "/v1/chat/sessions",
            Tenant,
            "/v1/chat/sessions".into(),
            Some(json!({ "projectId": p, "model": "m", "title": "planted" })),
        ),
        (Method::GET, "/v1/chat/sessions", Tenant, format!("/v1/chat/sessions?projectId={p}"), None),
        (Method::GET, "/v1/chat/sessions/{session_id}", Tenant, format!("/v1/chat/sessions/{}", v.session), None),
        (
            Method::PATCH,
            "/v1/chat/sessions/{session_id}",
            Tenant,
            format!("/v1/chat/sessions/{}", v.session),
            Some(json!({ "title": "owned" })),
        ),
        (Method::DELETE, "/v1/chat/sessions/{session_id}", Tenant, format!("/v1/chat/sessions/{}", v.session), None),
        (
            Method::POST,
            "/v1/chat/sessions/{session_id}:restore",
            Tenant,
            format!("/v1/chat/sessions/{}:restore", v.session),
            Some(json!({})),
        ),
        (
            Method::POST,
            "/v1/chat/sessions/{session_id}:purge",
            Tenant,
            format!("/v1/chat/sessions/{}:purge", v.session),
            Some(json!({})),
        ),
        (
            Method::GET,
            "/v1/chat/sessions/{session_id}/messages",
            Tenant,
            format!("/v1/chat/sessions/{}/messages", v.session),
            None,
        ),
        (
            Method::POST,
            "/v1/chat/sessions/{session_id}/messages",
            Tenant,
            format!("/v1/chat/sessions/{}/messages", v.session),
            Some(json!({ "role": "MESSAGE_ROLE_USER", "content": "planted" })),
        ),
        (
            Method::GET,
            "/v1/chat/sessions/{session_id}/messages/{message_id}",
            Tenant,
            format!("/v1/chat/sessions/{}/messages/{}", v.session, v.message),
            None,
        ),
        (
            Method::GET,
            "/v1/chat/sessions/{session_id}/messages/{message_id}/branch",
            Tenant,
            format!("/v1/chat/sessions/{}/messages/{}/branch", v.session, v.message),
            None,
        ),
        (
            Method::POST,
            "/v1/chat/sessions/{session_id}/messages/{message_id}:edit",
            Tenant,
            format!("/v1/chat/sessions/{}/messages/{}:edit", v.session, v.message),
            Some(json!({ "content": "owned" })),
        ),
        (
            Method::GET,
            "/v1/chat/sessions/{session_id}:export",
            Tenant,
            format!("/v1/chat/sessions/{}:export?format=EXPORT_FORMAT_JSON", v.session),
            None,
        ),
        (
            Method::GET,
            "/v1/chat/sessions/{session_id}:watch",
            Tenant,
            format!("/v1/chat/sessions/{}:watch", v.session),
            None,
        ),
        (Method::GET, "/v1/projects/{project_id}/chat:export", Tenant, format!("/v1/projects/{p}/chat:export"), None),
        (
            Method::GET,
            "/v1/projects/{project_id}/chat/messages:search",
            Tenant,
            format!("/v1/projects/{p}/chat/messages:search?query=hello"),
            None,
        ),
        // files
        (
            Method::POST,
            "/v1/projects/{metadata_project_id}/files",
            Tenant,
            format!("/v1/projects/{p}/files?metadata.name=planted.txt&metadata.mimeType=text/plain"),
            None,
        ),
        (Method::GET, "/v1/projects/{project_id}/files", Tenant, format!("/v1/projects/{p}/files"), None),
        (Method::GET, "/v1/projects/{project_id}/storage", Tenant, format!("/v1/projects/{p}/storage"), None),
        (Method::GET, "/v1/files/{file_id}", Tenant, format!("/v1/files/{}", v.file), None),
        (
            Method::PATCH,
            "/v1/files/{file_id}",
            Tenant,
            format!("/v1/files/{}", v.file),
            Some(json!({ "displayName": "owned.txt" })),
        ),
        (Method::DELETE, "/v1/files/{file_id}", Tenant, format!("/v1/files/{}", v.file), None),
        (Method::GET, "/v1/files/{file_id}:download", Tenant, format!("/v1/files/{}:download", v.file), None),
        (
            Method::POST,
            "/v1/files/{file_id}:createDownloadUrl",
            Tenant,
            format!("/v1/files/{}:createDownloadUrl", v.file),
            Some(json!({ "expiresInSeconds": 60 })),
        ),
        (Method::GET, "/v1/files/signed/{token}", Open, "/v1/files/signed/forged".into(), None),
        // usage: catalog, quotas, records
        (Method::GET, "/v1/models", Own, "/v1/models".into(), None),
        (Method::GET, "/v1/models/{model_id}", Own, format!("/v1/models/{}", v.model), None),
        (Method::GET, "/v1/models/{model_id}/prices", Own, format!("/v1/models/{}/prices", v.model), None),
        (
            Method::POST,
            "/v1/models",
            Operator,
            "/v1/models".into(),
            Some(json!({ "name": "planted", "provider": "p", "type": "MODEL_TYPE_CHAT" })),
        ),
        (
            Method::PATCH,
            "/v1/models/{model_id}",
            Operator,
            format!("/v1/models/{}", v.model),
            Some(json!({ "displayName": "owned" })),
        ),
        (
            Method::POST,
            "/v1/models/{model_id}:retire",
            Operator,
            format!("/v1/models/{}:retire", v.model),
            Some(json!({})),
        ),
        (
            Method::POST,
            "/v1/models/{model_id}/prices",
            Operator,
            format!("/v1/models/{}/prices", v.model),
            Some(json!({ "inputPerMillion": "0", "outputPerMillion": "0", "effectiveTime": "2030-01-01T00:00:00Z" })),
        ),
        (Method::GET, "/v1/projects/{project_id}/quotas", Tenant, format!("/v1/projects/{p}/quotas"), None),
        (
            Method::PUT,
            "/v1/projects/{quota_project_id}/quotas",
            Tenant,
            format!("/v1/projects/{p}/quotas"),
            Some(json!({ "scope": "QUOTA_SCOPE_PROJECT", "tokensPerDay": "1" })),
        ),
        (
            Method::DELETE,
            "/v1/projects/{project_id}/quotas",
            Tenant,
            format!("/v1/projects/{p}/quotas?scope=QUOTA_SCOPE_PROJECT"),
            None,
        ),
        (Method::GET, "/v1/projects/{project_id}/usage", Tenant, format!("/v1/projects/{p}/usage"), None),
        (Method::GET, "/v1/projects/{project_id}/usage:stats", Tenant, format!("/v1/projects/{p}/usage:stats"), None),
        // analytics
        (
            Method::GET,
            "/v1/projects/{project_id}/analytics/usage:timeSeries",
            Tenant,
            format!("/v1/projects/{p}/analytics/usage:timeSeries?{RANGE}&bucket=day"),
            None,
        ),
        (
            Method::GET,
            "/v1/projects/{project_id}/analytics/usage:breakdown",
            Tenant,
            format!("/v1/projects/{p}/analytics/usage:breakdown?{RANGE}&dimension=model"),
            None,
        ),
        (
            Method::GET,
            "/v1/projects/{project_id}/analytics/audit",
            Tenant,
            format!("/v1/projects/{p}/analytics/audit"),
            None,
        ),
        (
            Method::GET,
            "/v1/projects/{project_id}/analytics/retention",
            Tenant,
            format!("/v1/projects/{p}/analytics/retention"),
            None,
        ),
        (
            Method::PUT,
            "/v1/projects/{project_id}/analytics/retention",
            Tenant,
            format!("/v1/projects/{p}/analytics/retention"),
            Some(json!({ "days": 1 })),
        ),
        (
            Method::POST,
            "/v1/projects/{project_id}/analytics/retention:setLegalHold",
            Tenant,
            format!("/v1/projects/{p}/analytics/retention:setLegalHold"),
            Some(json!({ "legalHold": true, "reason": "planted" })),
        ),
    ];
    rows.into_iter()
        .map(|(method, template, target, path, body)| Case { method, template, target, path, body })
        .collect()
}

/// Sends `case` with `credential` (none for `None`).
async fn send(rest: &Rest, case: &Case, credential: Option<&str>) -> Reply {
    let mut call = rest.call(case.method.clone(), &case.path);
    if let Some(body) = &case.body {
        call = call.json(body.clone());
    } else if case.template.ends_with("/files") && case.method == Method::POST {
        call = call.raw("application/octet-stream", "planted bytes");
    }
    if let Some(credential) = credential {
        call = call.bearer(credential);
    }
    call.send().await
}

fn refused_as_stranger(status: StatusCode) -> bool {
    matches!(status, StatusCode::FORBIDDEN | StatusCode::NOT_FOUND)
}

/// Everything the victim can see of its own data, to compare before and after the matrix.
async fn victim_view(rest: &Rest, owner: &str, v: &Victim) -> Vec<(String, StatusCode, Value)> {
    let p = &v.project;
    let paths = [
        format!("/v1/projects/{p}"),
        format!("/v1/projects/{p}/members"),
        format!("/v1/projects/{p}/apiKeys/{}", v.api_key),
        format!("/v1/chat/sessions/{}", v.session),
        format!("/v1/chat/sessions/{}/messages", v.session),
        format!("/v1/files/{}", v.file),
        format!("/v1/projects/{p}/quotas"),
        format!("/v1/projects/{p}/analytics/retention"),
        format!("/v1/users/{}", v.user),
        format!("/v1/models/{}", v.model),
        "/v1/settings/site.name".to_owned(),
    ];
    let mut view = Vec::new();
    for path in paths {
        let reply = rest.get(&path).bearer(owner).send().await;
        let mut body = if reply.body.is_empty() { Value::Null } else { reply.json() };
        // Reading updates last-use times; those are not the victim's data.
        strip(&mut body, &["lastUsedTime", "updateTime"]);
        view.push((path, reply.status, body));
    }
    view
}

fn strip(value: &mut Value, keys: &[&str]) {
    match value {
        Value::Object(map) => {
            for key in keys {
                map.remove(*key);
            }
            map.values_mut().for_each(|v| strip(v, keys));
        }
        Value::Array(items) => items.iter_mut().for_each(|v| strip(v, keys)),
        _ => {}
    }
}

#[tokio::test]
async fn every_public_route_refuses_strangers_and_the_anonymous_and_changes_nothing() {
    let mesh = Mesh::start().await;
    let rest = mesh.rest();

    // The victim: an owner with a project holding a chat session, a message, a file, a key and a
    // quota; a catalog model and a setting made by a system admin.
    let operator = mesh.make_admin(&mesh.signup("operator").await).await;
    let owner = mesh.signup("victim").await;
    let project = rest.post("/v1/projects", json!({ "name": "victim" })).bearer(&owner.token).send().await;
    let project = project.expect(StatusCode::OK).json()["id"].as_str().expect("project id").to_owned();
    let session = rest
        .post("/v1/chat/sessions", json!({ "projectId": project, "model": "m", "title": "secret" }))
        .bearer(&owner.token)
        .send()
        .await
        .expect(StatusCode::OK)
        .json()["id"]
        .as_str()
        .expect("session id")
        .to_owned();
    let message = rest
        .post(
            &format!("/v1/chat/sessions/{session}/messages"),
            json!({ "role": "MESSAGE_ROLE_USER", "content": "hello" }),
        )
        .bearer(&owner.token)
        .send()
        .await
        .expect(StatusCode::OK)
        .json()["id"]
        .as_str()
        .expect("message id")
        .to_owned();
    let file = rest
        .call(
            Method::POST,
            &format!("/v1/projects/{project}/files?metadata.name=secret.txt&metadata.mimeType=text/plain"),
        )
        .raw("application/octet-stream", "secret bytes")
        .bearer(&owner.token)
        .send()
        .await
        .expect(StatusCode::OK)
        .json()["id"]
        .as_str()
        .expect("file id")
        .to_owned();
    let api_key = rest
        .post(&format!("/v1/projects/{project}/apiKeys"), json!({ "name": "victim key", "scopes": ["chat:read"] }))
        .bearer(&owner.token)
        .send()
        .await
        .expect(StatusCode::OK)
        .json()["apiKey"]["id"]
        .as_str()
        .expect("api key id")
        .to_owned();
    rest.call(Method::PUT, &format!("/v1/projects/{project}/quotas"))
        .json(json!({ "scope": "QUOTA_SCOPE_PROJECT", "tokensPerDay": "1000" }))
        .bearer(&owner.token)
        .send()
        .await
        .expect(StatusCode::OK);
    let sessions = rest.get("/v1/auth/sessions").bearer(&owner.token).send().await.expect(StatusCode::OK).json();
    let login_session = sessions["sessions"][0]["id"].as_str().expect("the victim's login session").to_owned();
    let model = rest
        .post("/v1/models", json!({ "name": "victim-model", "provider": "p", "type": "MODEL_TYPE_CHAT" }))
        .bearer(&operator.token)
        .send()
        .await
        .expect(StatusCode::OK)
        .json()["id"]
        .as_str()
        .expect("model id")
        .to_owned();
    rest.call(Method::PUT, "/v1/settings/site.name")
        .json(json!({ "value": "victim site", "public": true }))
        .bearer(&operator.token)
        .send()
        .await
        .expect(StatusCode::OK);
    let victim = Victim { project, session, message, file, api_key, user: owner.user_id.clone(), login_session, model };

    // The strangers: a person with a project of their own, and that project's key with every scope.
    let mallory = mesh.signup("mallory").await;
    let (_, mallory_key) = aimesh_tests::project_with_key(&mesh, &mallory, SCOPES).await;

    let cases = cases(&victim);
    let document = rest.get("/openapi.json").send().await.expect(StatusCode::OK).json();
    let documented: BTreeSet<(String, String)> = document["paths"]
        .as_object()
        .expect("paths")
        .iter()
        .flat_map(|(path, item)| {
            item.as_object().into_iter().flatten().map(move |(method, _)| (method.to_uppercase(), path.clone()))
        })
        .collect();
    let covered: BTreeSet<(String, String)> =
        cases.iter().map(|c| (c.method.as_str().to_owned(), c.template.to_owned())).collect();
    assert_eq!(documented, covered, "every documented route has a line in this matrix, and only those");

    let before = victim_view(&rest, &owner.token, &victim).await;
    let mut failures = Vec::new();
    for case in &cases {
        let label = format!("{} {}", case.method, case.path);
        let anonymous = send(&rest, case, None).await;
        if case.target != Target::Open && anonymous.status != StatusCode::UNAUTHORIZED {
            failures.push(format!("{label} without a credential: {} {:?}", anonymous.status, anonymous.body));
        }
        if anonymous.status.is_server_error() {
            failures.push(format!("{label} without a credential: server error {}", anonymous.status));
        }
        if !matches!(case.target, Target::Tenant | Target::Person | Target::Operator) {
            continue;
        }
        for (who, credential) in [("another person's session", &mallory.token), ("another project's key", &mallory_key)]
        {
            let reply = send(&rest, case, Some(credential)).await;
            if !refused_as_stranger(reply.status) {
                failures.push(format!("{label} with {who}: {} {}", reply.status, String::from_utf8_lossy(&reply.body)));
            }
        }
    }
    assert!(failures.is_empty(), "{} calls were not refused:\n{}", failures.len(), failures.join("\n"));

    let after = victim_view(&rest, &owner.token, &victim).await;
    for (was, is) in before.iter().zip(&after) {
        assert_eq!(was, is, "the victim's {} changed", was.0);
    }
    assert!(before.iter().all(|(_, status, _)| *status == StatusCode::OK), "the victim read all of it: {before:?}");
}
