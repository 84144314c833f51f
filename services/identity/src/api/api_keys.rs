//! `ApiKeyService`: project-scoped keys for programs.

use std::sync::Arc;

use chrono::Utc;
use tonic::{Request, Response, Status};

use aimesh_kit::auth::{Caller, ProjectRole};
use aimesh_kit::wire::fields;
use aimesh_kit::wire::pagination::{Cursor, Page};
use aimesh_kit::wire::proto_json;
use aimesh_proto::identity::v1 as pb;

use super::{Identity, actor, respond};
use crate::domain::{ApiKeySecret, requests_per_minute_to_proto, validate_requests_per_minute, validate_scopes};
use crate::error::{IdentityError, Result};
use crate::store::{Actor, ApiKeyPatch, ApiKeyRow, NewApiKey};

const MAX_KEY_NAME: usize = 100;

pub(super) struct ApiKeyApi(pub(super) Arc<Identity>);

impl From<ApiKeyRow> for pb::ApiKey {
    fn from(row: ApiKeyRow) -> Self {
        pb::ApiKey {
            id: row.id.to_string(),
            project_id: row.project_id.to_string(),
            name: row.name,
            display_prefix: row.display_prefix,
            scopes: row.scopes,
            created_by: row.created_by.to_string(),
            create_time: Some(proto_json::timestamp(row.created_at)),
            expire_time: proto_json::opt_timestamp(row.expires_at),
            last_use_time: proto_json::opt_timestamp(row.last_used_at),
            revoke_time: proto_json::opt_timestamp(row.revoked_at),
            requests_per_minute: requests_per_minute_to_proto(row.requests_per_minute),
            project_owned: row.project_owned,
        }
    }
}

impl Identity {
    async fn create_api_key(
        &self,
        caller: &Caller,
        request: pb::CreateApiKeyRequest,
        actor: Actor,
    ) -> Result<pb::CreateApiKeyResponse> {
        let principal = &caller.principal;
        let project_id = fields::id("project_id", &request.project_id)?;
        let name = fields::text("name", &request.name, MAX_KEY_NAME, true)?;
        let scopes = validate_scopes(&request.scopes)?;
        let requests_per_minute = validate_requests_per_minute("requests_per_minute", request.requests_per_minute)?;
        let expires_at = match &request.expire_time {
            None => None,
            Some(ts) => {
                let at = proto_json::from_timestamp(ts)
                    .ok_or_else(|| IdentityError::invalid("expire_time", "is out of range"))?;
                if at <= Utc::now() {
                    return Err(IdentityError::invalid("expire_time", "must be in the future"));
                }
                Some(at)
            }
        };
        principal.require_session()?;
        Self::check_limit_maximum(
            principal,
            "requests_per_minute",
            requests_per_minute,
            self.limit_maxima.api_key,
            "rate_limit.max_api_key_requests_per_minute",
        )?;
        // A key that outlives its creator's access is the project's decision: an owner's.
        let needed = if request.project_owned { ProjectRole::Owner } else { ProjectRole::Admin };
        self.require_role(caller, project_id, needed).await?;
        let secret = ApiKeySecret::generate();
        let new = NewApiKey {
            project_id,
            name: &name,
            display_prefix: &secret.display_prefix,
            hash: &secret.hash,
            scopes: &scopes,
            created_by: principal.user_id,
            expires_at,
            requests_per_minute,
            project_owned: request.project_owned,
        };
        let row = self.store.create_api_key(new, &actor).await?;
        Ok(pb::CreateApiKeyResponse { api_key: Some(row.into()), secret: secret.secret })
    }

    async fn list_api_keys(&self, caller: &Caller, request: pb::ListApiKeysRequest) -> Result<pb::ListApiKeysResponse> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let page = Page::new(&request.page_token, request.page_size)?;
        self.require_role(caller, project_id, ProjectRole::Viewer).await?;
        let reader = self.reader(caller.principal.user_id).await;
        let rows = reader.list_api_keys(project_id, request.include_revoked, &page).await?;
        let (rows, next_page_token) = page.finish(rows, |k| Cursor { time: k.created_at, id: k.id });
        Ok(pb::ListApiKeysResponse { api_keys: rows.into_iter().map(Into::into).collect(), next_page_token })
    }

    async fn get_api_key(&self, caller: &Caller, request: pb::GetApiKeyRequest) -> Result<pb::ApiKey> {
        let project_id = fields::id("project_id", &request.project_id)?;
        let id = fields::id("api_key_id", &request.api_key_id)?;
        self.require_role(caller, project_id, ProjectRole::Viewer).await?;
        let key = self.reader(caller.principal.user_id).await.api_key(project_id, id).await?;
        Ok(key.ok_or(IdentityError::NotFound("api key"))?.into())
    }

    async fn revoke_api_key(
        &self,
        caller: &Caller,
        request: pb::RevokeApiKeyRequest,
        actor: Actor,
    ) -> Result<pb::ApiKey> {
        let principal = &caller.principal;
        let project_id = fields::id("project_id", &request.project_id)?;
        let id = fields::id("api_key_id", &request.api_key_id)?;
        principal.require_session()?;
        self.require_role(caller, project_id, ProjectRole::Admin).await?;
        let (row, hash) = self.store.revoke_api_key(project_id, id, &actor).await?;
        self.forget_credentials(&[hash]).await;
        Ok(row.into())
    }

    async fn update_api_key(
        &self,
        caller: &Caller,
        request: pb::UpdateApiKeyRequest,
        actor: Actor,
    ) -> Result<pb::ApiKey> {
        let principal = &caller.principal;
        let project_id = fields::id("project_id", &request.project_id)?;
        let id = fields::id("api_key_id", &request.api_key_id)?;
        let paths = fields::mask_paths(request.update_mask.as_ref(), &["name", "requests_per_minute"])?;
        let key = request.api_key.unwrap_or_default();
        let mut name = None;
        let mut patch = ApiKeyPatch::default();
        for path in &paths {
            match path.as_str() {
                "name" => name = Some(fields::text("api_key.name", &key.name, MAX_KEY_NAME, true)?),
                "requests_per_minute" => {
                    patch.requests_per_minute =
                        Some(validate_requests_per_minute("api_key.requests_per_minute", key.requests_per_minute)?);
                }
                _ => {}
            }
        }
        principal.require_session()?;
        if let Some(limit) = patch.requests_per_minute {
            Self::check_limit_maximum(
                principal,
                "api_key.requests_per_minute",
                limit,
                self.limit_maxima.api_key,
                "rate_limit.max_api_key_requests_per_minute",
            )?;
        }
        self.require_role(caller, project_id, ProjectRole::Admin).await?;
        patch.name = name.as_deref();
        let (row, hash) = self.store.update_api_key(project_id, id, &patch, &actor).await?;
        // The cached verification carries the old limit; drop it like a revocation.
        self.forget_credentials(&[hash]).await;
        Ok(row.into())
    }
}

#[tonic::async_trait]
impl pb::api_key_service_server::ApiKeyService for ApiKeyApi {
    async fn create_api_key(
        &self,
        request: Request<pb::CreateApiKeyRequest>,
    ) -> Result<Response<pb::CreateApiKeyResponse>, Status> {
        let caller = Caller::of(&request)?;
        let actor = actor(&request, Some(caller.principal.user_id));
        respond(self.0.create_api_key(&caller, request.into_inner(), actor).await)
    }

    async fn list_api_keys(
        &self,
        request: Request<pb::ListApiKeysRequest>,
    ) -> Result<Response<pb::ListApiKeysResponse>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.list_api_keys(&caller, request.into_inner()).await)
    }

    async fn get_api_key(&self, request: Request<pb::GetApiKeyRequest>) -> Result<Response<pb::ApiKey>, Status> {
        let caller = Caller::of(&request)?;
        respond(self.0.get_api_key(&caller, request.into_inner()).await)
    }

    async fn revoke_api_key(&self, request: Request<pb::RevokeApiKeyRequest>) -> Result<Response<pb::ApiKey>, Status> {
        let caller = Caller::of(&request)?;
        let actor = actor(&request, Some(caller.principal.user_id));
        respond(self.0.revoke_api_key(&caller, request.into_inner(), actor).await)
    }

    async fn update_api_key(&self, request: Request<pb::UpdateApiKeyRequest>) -> Result<Response<pb::ApiKey>, Status> {
        let caller = Caller::of(&request)?;
        let actor = actor(&request, Some(caller.principal.user_id));
        respond(self.0.update_api_key(&caller, request.into_inner(), actor).await)
    }
}
