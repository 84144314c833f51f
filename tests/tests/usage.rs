//! The usage service end to end, with identity beside it: the catalog is an admin's, usage is
//! recorded and priced once per request id, quotas hold, and nobody reaches another project.

use aimesh_proto::identity::v1 as pb;
use aimesh_proto::usage::v1 as usage_pb;
use aimesh_tests::{
    Mesh, authed, catalog, expect_code, normalized, project_with_key, reason_and_field, record, reserve_tokens,
    set_daily_token_budget,
};
use tonic::Code;

#[tokio::test]
async fn the_catalog_is_changed_by_system_admins_and_read_by_anyone_authenticated() {
    let mesh = Mesh::start().await;
    let (_admin, model) = catalog(&mesh).await;
    let ann = mesh.signup("ann").await;

    let attempt =
        usage_pb::Model { provider: "acme".into(), name: "rocket".into(), version: "1".into(), ..model.clone() };
    let refused =
        mesh.models().create_model(authed(usage_pb::CreateModelRequest { model: Some(attempt) }, &ann.token)).await;
    expect_code("a user creating a model", Code::PermissionDenied, refused);
    let anonymous = mesh.models().get_model(usage_pb::GetModelRequest { model_id: model.id.clone() }).await;
    expect_code("reading without a credential", Code::Unauthenticated, anonymous);

    let read = mesh
        .models()
        .get_model(authed(usage_pb::GetModelRequest { model_id: model.id.clone() }, &ann.token))
        .await
        .expect("read the model")
        .into_inner();
    let price = read.current_price.expect("a price in force");
    assert_eq!(normalized(&price.input_per_million), "2.5");
    let listed = mesh
        .models()
        .list_models(authed(
            usage_pb::ListModelsRequest { provider: "openai".into(), ..Default::default() },
            &ann.token,
        ))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.models.iter().map(|m| m.name.as_str()).collect::<Vec<_>>(), ["gpt-4o"]);
}

#[tokio::test]
async fn usage_is_priced_from_the_catalog_counted_once_and_listed() {
    let mesh = Mesh::start().await;
    let (_admin, model) = catalog(&mesh).await;
    let ann = mesh.signup("ann").await;
    let (project, secret) = project_with_key(&mesh, &ann, &["usage:write", "usage:read"]).await;

    let first = mesh
        .usage()
        .record_usage(mesh.on_behalf(record(&project, "req-1"), &secret))
        .await
        .expect("record")
        .into_inner();
    // 600,000 x 2.50 + 400,000 x 1.25 + 10,000 x 10.00, per million.
    assert_eq!(normalized(&first.cost), "2.1");
    assert_eq!((first.model_id.as_str(), first.total_tokens), (model.id.as_str(), 1_010_000));
    assert!(!first.api_key_id.is_empty(), "the key that recorded it");
    assert_eq!(first.user_id, ann.user_id, "a key acts for the person who made it");

    // A retry is the same record and counts nothing again.
    let retry = mesh
        .usage()
        .record_usage(mesh.on_behalf(record(&project, "req-1"), &secret))
        .await
        .expect("retry")
        .into_inner();
    assert_eq!(retry.id, first.id);
    let listed = mesh
        .usage()
        .list_usage(authed(usage_pb::ListUsageRequest { project_id: project.clone(), ..Default::default() }, &secret))
        .await
        .expect("list")
        .into_inner();
    assert_eq!(listed.records.len(), 1);
    let stats = mesh
        .usage()
        .get_usage_stats(authed(usage_pb::GetUsageStatsRequest { project_id: project.clone() }, &ann.token))
        .await
        .expect("stats")
        .into_inner();
    let totals = stats.project.expect("project totals");
    assert_eq!((totals.requests, totals.input_tokens, totals.output_tokens), (1, 1_000_000, 10_000));
    assert_eq!(normalized(&totals.cost), "2.1");
    assert_eq!(stats.by_model.get(&model.id).map(|t| t.requests), Some(1));

    // Bad input names the field and writes nothing.
    let cases = [
        (
            usage_pb::RecordUsageRequest { input_tokens: -1, ..record(&project, "bad-1") },
            Code::InvalidArgument,
            "input_tokens",
        ),
        (
            usage_pb::RecordUsageRequest { cached_input_tokens: 2_000_000, ..record(&project, "bad-2") },
            Code::InvalidArgument,
            "cached_input_tokens",
        ),
        (
            usage_pb::RecordUsageRequest { model: "no-such-model".into(), ..record(&project, "bad-3") },
            Code::NotFound,
            "model",
        ),
        (
            usage_pb::RecordUsageRequest { request_id: String::new(), ..record(&project, "") },
            Code::InvalidArgument,
            "request_id",
        ),
    ];
    for (request, code, field) in cases {
        let status = expect_code(field, code, mesh.usage().record_usage(mesh.on_behalf(request, &secret)).await);
        assert_eq!(reason_and_field(&status).1.as_deref(), Some(field), "{status:?}");
    }
    let pool = mesh.usage_db().await;
    let rows: i64 = sqlx::query_scalar("SELECT count(*) FROM model_usage_logs").fetch_one(&pool).await.expect("count");
    assert_eq!(rows, 1);
}

#[tokio::test]
async fn a_stranger_reaches_nothing_of_another_project() {
    let mesh = Mesh::start().await;
    catalog(&mesh).await;
    let (ann, bob) = (mesh.signup("ann").await, mesh.signup("bob").await);
    let (project, _secret) = project_with_key(&mesh, &ann, &["usage:write"]).await;
    let (_bobs_project, bobs_key) = project_with_key(&mesh, &bob, &["usage:write", "usage:read"]).await;

    for credential in [bob.token.as_str(), bobs_key.as_str()] {
        let recorded = mesh.usage().record_usage(mesh.on_behalf(record(&project, "x"), credential)).await;
        expect_code("record", Code::PermissionDenied, recorded);
        let listed = mesh
            .usage()
            .list_usage(authed(
                usage_pb::ListUsageRequest { project_id: project.clone(), ..Default::default() },
                credential,
            ))
            .await;
        expect_code("list", Code::PermissionDenied, listed);
        let stats = mesh
            .usage()
            .get_usage_stats(authed(usage_pb::GetUsageStatsRequest { project_id: project.clone() }, credential))
            .await;
        expect_code("stats", Code::PermissionDenied, stats);
        let reserve = usage_pb::ReserveRequest {
            project_id: project.clone(),
            model: "gpt-4o".into(),
            estimated_input_tokens: 10,
            estimated_output_tokens: 10,
            ..Default::default()
        };
        expect_code(
            "reserve",
            Code::PermissionDenied,
            mesh.quotas().reserve(mesh.on_behalf(reserve, credential)).await,
        );
        let quota = usage_pb::Quota {
            project_id: project.clone(),
            scope: usage_pb::QuotaScope::Project.into(),
            tokens_per_day: 1,
            ..Default::default()
        };
        let set = mesh.quotas().set_quota(authed(usage_pb::SetQuotaRequest { quota: Some(quota) }, credential)).await;
        expect_code("set quota", Code::PermissionDenied, set);
    }
    let listed = mesh
        .usage()
        .list_usage(authed(
            usage_pb::ListUsageRequest { project_id: project.clone(), ..Default::default() },
            &ann.token,
        ))
        .await
        .expect("list")
        .into_inner();
    assert!(listed.records.is_empty());
    let quotas = mesh
        .quotas()
        .list_quotas(authed(usage_pb::ListQuotasRequest { project_id: project }, &ann.token))
        .await
        .expect("quotas")
        .into_inner();
    assert!(quotas.quotas.is_empty());
}

#[tokio::test]
async fn a_daily_token_budget_is_reserved_settled_and_released() {
    let mesh = Mesh::start().await;
    catalog(&mesh).await;
    let ann = mesh.signup("ann").await;
    let (project, secret) = project_with_key(&mesh, &ann, &["usage:write", "usage:read"]).await;
    set_daily_token_budget(&mesh, &ann.token, &project, 1000).await;

    let reserve = |tokens: i64| reserve_tokens(&project, tokens);
    let first = mesh.quotas().reserve(mesh.on_behalf(reserve(600), &secret)).await.expect("room for 600").into_inner();
    expect_code(
        "over the budget",
        Code::ResourceExhausted,
        mesh.quotas().reserve(mesh.on_behalf(reserve(600), &secret)).await,
    );

    // Giving the first back makes room again.
    let release = usage_pb::ReleaseReservationRequest { project_id: project.clone(), reservation_id: first.id.clone() };
    mesh.quotas().release_reservation(mesh.on_behalf(release.clone(), &secret)).await.expect("release");
    expect_code(
        "released twice",
        Code::NotFound,
        mesh.quotas().release_reservation(mesh.on_behalf(release, &secret)).await,
    );
    let second = mesh.quotas().reserve(mesh.on_behalf(reserve(600), &secret)).await.expect("room again").into_inner();

    // Settling with the actual usage (100 tokens) frees the rest of the estimate.
    let settle = usage_pb::RecordUsageRequest {
        input_tokens: 60,
        cached_input_tokens: 0,
        output_tokens: 40,
        reservation_id: second.id.clone(),
        ..record(&project, "settled")
    };
    mesh.usage().record_usage(mesh.on_behalf(settle, &secret)).await.expect("settle");
    mesh.quotas().reserve(mesh.on_behalf(reserve(800), &secret)).await.expect("100 used, 800 fit");
    expect_code(
        "100 + 800 + 200 > 1000",
        Code::ResourceExhausted,
        mesh.quotas().reserve(mesh.on_behalf(reserve(200), &secret)).await,
    );
}

#[tokio::test]
async fn a_person_counts_usage_only_for_themselves_while_a_key_may_attribute_it() {
    let mesh = Mesh::start().await;
    catalog(&mesh).await;
    let (ann, bob) = (mesh.signup("ann").await, mesh.signup("bob").await);
    let (project, secret) = project_with_key(&mesh, &ann, &["usage:write", "usage:read"]).await;
    let add = pb::AddMemberRequest {
        project_id: project.clone(),
        email: bob.email.clone(),
        role: pb::ProjectRole::Member.into(),
    };
    mesh.projects().add_member(authed(add, &ann.token)).await.expect("bob joins");

    let for_ann = usage_pb::RecordUsageRequest { user_id: ann.user_id.clone(), ..record(&project, "bob-for-ann") };
    expect_code(
        "bob recording for ann",
        Code::PermissionDenied,
        mesh.usage().record_usage(mesh.on_behalf(for_ann, &bob.token)).await,
    );
    let own = mesh
        .usage()
        .record_usage(mesh.on_behalf(record(&project, "bob-own"), &bob.token))
        .await
        .expect("bob's own")
        .into_inner();
    assert_eq!(own.user_id, bob.user_id);
    // The backend, holding a key, attributes usage to whoever it served.
    let for_bob = usage_pb::RecordUsageRequest { user_id: bob.user_id.clone(), ..record(&project, "backend-for-bob") };
    let recorded =
        mesh.usage().record_usage(mesh.on_behalf(for_bob, &secret)).await.expect("key attributes").into_inner();
    assert_eq!(recorded.user_id, bob.user_id);
}
