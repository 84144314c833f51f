//! `SessionService`: logging in and out, refreshing, listing and ending login sessions.

use std::net::IpAddr;
use std::sync::Arc;

use chrono::{Duration, Utc};
use tonic::{Request, Response, Status};

use aimesh_kit::auth::Caller;
use aimesh_kit::auth::{Principal, REFRESH_TOKEN_PREFIX, check_credential_shape, credential_hash};
use aimesh_kit::wire::fields;
use aimesh_kit::wire::pagination::{Cursor, Page};
use aimesh_kit::wire::proto_json;
use aimesh_proto::identity::v1 as pb;

use super::{Identity, actor, client_address, respond};
use crate::domain::SessionTokens;
use crate::error::{IdentityError, Result};
use crate::login_throttle::account_key;
use crate::store::{Actor, NewSession, SessionRow};

/// Longest login (email or username) looked up.
const MAX_LOGIN: usize = 254;

pub(super) struct SessionApi(pub(super) Arc<Identity>);

fn session_to_proto(row: SessionRow, current: Option<uuid::Uuid>) -> pb::Session {
    pb::Session {
        current: current == Some(row.id),
        id: row.id.to_string(),
        user_id: row.user_id.to_string(),
        device_name: row.device_name,
        ip_address: row.ip_address,
        user_agent: row.user_agent,
        create_time: Some(proto_json::timestamp(row.created_at)),
        expire_time: Some(proto_json::timestamp(row.expires_at)),
        last_use_time: Some(proto_json::timestamp(row.last_used_at)),
    }
}

impl Identity {
    fn token_lifetimes(&self) -> (chrono::DateTime<Utc>, chrono::DateTime<Utc>) {
        let now = Utc::now();
        (
            now + Duration::seconds(self.config.access_token_ttl_secs),
            now + Duration::seconds(self.config.refresh_token_ttl_secs),
        )
    }

    async fn login(&self, request: pb::LoginRequest, actor: Actor) -> Result<pb::LoginResponse> {
        let login = request.login.trim();
        if login.is_empty() {
            return Err(IdentityError::invalid("login", "is required"));
        }
        if login.chars().count() > MAX_LOGIN {
            return Err(IdentityError::invalid("login", format!("must be at most {MAX_LOGIN} characters long")));
        }
        if request.password.is_empty() {
            return Err(IdentityError::invalid("password", "is required"));
        }
        let device_name = fields::text("device_name", &request.device_name, 100, false)?;
        let user = self.store.user_by_login(login).await?;
        let hash = user.as_ref().map(|u| u.password_hash.clone());
        let user_id = user.as_ref().map(|u| u.id);
        // A locked login is refused before any hashing, the right password included.
        let (account, address) = (account_key(user_id, login), client_address(&actor));
        self.throttle.check_login(&account, address).await?;
        let matches = self.verify_password_bounded(request.password, hash).await?;
        let Some(user) = user.filter(|_| matches) else {
            self.store.record_failed_login(login, user_id, &Actor { user_id, ..actor }).await?;
            self.throttle.login_failed(&account, address).await?;
            return Err(IdentityError::BadCredentials);
        };
        self.throttle.login_succeeded(&account, address).await;
        if user.status != "active" {
            return Err(IdentityError::AccountDisabled);
        }
        let tokens = SessionTokens::generate();
        let (expires_at, refresh_expires_at) = self.token_lifetimes();
        let new = NewSession {
            user_id: user.id,
            access_hash: &tokens.access_hash,
            refresh_hash: &tokens.refresh_hash,
            device_name: &device_name,
            expires_at,
            refresh_expires_at,
        };
        let session = self.store.create_session(new, &Actor { user_id: Some(user.id), ..actor }).await?;
        self.wrote(user.id).await;
        Ok(pb::LoginResponse {
            session: Some(session_to_proto(session, None)),
            access_token: tokens.access_token,
            refresh_token: tokens.refresh_token,
        })
    }

    async fn refresh_session(
        &self,
        request: pb::RefreshSessionRequest,
        address: Option<IpAddr>,
    ) -> Result<pb::LoginResponse> {
        if request.refresh_token.is_empty() {
            return Err(IdentityError::invalid("refresh_token", "is required"));
        }
        // Guessing refresh tokens counts against the address like guessing passwords.
        self.throttle.check_address(address).await?;
        if check_credential_shape(&request.refresh_token, &[REFRESH_TOKEN_PREFIX]).is_err() {
            self.throttle.address_failed(address).await?;
            return Err(IdentityError::BadRefreshToken);
        }
        let tokens = SessionTokens::generate();
        let (expires_at, refresh_expires_at) = self.token_lifetimes();
        let refreshed = self
            .store
            .refresh_session(
                &credential_hash(&request.refresh_token),
                &tokens.access_hash,
                &tokens.refresh_hash,
                expires_at,
                refresh_expires_at,
            )
            .await?;
        let Some((session, old_access_hash)) = refreshed else {
            self.throttle.address_failed(address).await?;
            return Err(IdentityError::BadRefreshToken);
        };
        self.forget_credentials(&[old_access_hash]).await;
        self.wrote(session.user_id).await;
        Ok(pb::LoginResponse {
            session: Some(session_to_proto(session, None)),
            access_token: tokens.access_token,
            refresh_token: tokens.refresh_token,
        })
    }

    async fn end_session(&self, principal: &Principal, session_id: uuid::Uuid, actor: Actor) -> Result<()> {
        let hash = self.store.revoke_session(principal.user_id, session_id, &actor).await?;
        let hash = hash.ok_or(IdentityError::NotFound("session"))?;
        self.forget_credentials(&[hash]).await;
        Ok(())
    }

    async fn list_sessions(
        &self,
        principal: &Principal,
        request: pb::ListSessionsRequest,
    ) -> Result<pb::ListSessionsResponse> {
        // Login sessions are a person's, not their keys'.
        principal.require_session()?;
        let page = Page::new(&request.page_token, request.page_size)?;
        let rows = self.reader(principal.user_id).await.list_sessions(principal.user_id, &page).await?;
        let (rows, next_page_token) = page.finish(rows, |r| Cursor { time: r.created_at, id: r.id });
        let current = principal.session_id();
        Ok(pb::ListSessionsResponse {
            sessions: rows.into_iter().map(|row| session_to_proto(row, current)).collect(),
            next_page_token,
        })
    }
}

#[tonic::async_trait]
impl pb::session_service_server::SessionService for SessionApi {
    async fn login(&self, request: Request<pb::LoginRequest>) -> Result<Response<pb::LoginResponse>, Status> {
        let actor = actor(&request, None);
        respond(self.0.login(request.into_inner(), actor).await)
    }

    async fn refresh_session(
        &self,
        request: Request<pb::RefreshSessionRequest>,
    ) -> Result<Response<pb::LoginResponse>, Status> {
        let address = client_address(&actor(&request, None));
        respond(self.0.refresh_session(request.into_inner(), address).await)
    }

    async fn logout(&self, request: Request<pb::LogoutRequest>) -> Result<Response<pb::LogoutResponse>, Status> {
        let principal = Caller::of(&request)?.principal;
        let actor = actor(&request, Some(principal.user_id));
        let result = async {
            let session_id = principal.require_session()?;
            self.0.end_session(&principal, session_id, actor).await
        };
        respond(result.await.map(|()| pb::LogoutResponse {}))
    }

    async fn list_sessions(
        &self,
        request: Request<pb::ListSessionsRequest>,
    ) -> Result<Response<pb::ListSessionsResponse>, Status> {
        let principal = Caller::of(&request)?.principal;
        respond(self.0.list_sessions(&principal, request.into_inner()).await)
    }

    async fn revoke_session(
        &self,
        request: Request<pb::RevokeSessionRequest>,
    ) -> Result<Response<pb::RevokeSessionResponse>, Status> {
        let principal = Caller::of(&request)?.principal;
        let actor = actor(&request, Some(principal.user_id));
        let result = async {
            principal.require_session()?;
            let session_id = fields::id("session_id", &request.get_ref().session_id)?;
            self.0.end_session(&principal, session_id, actor).await
        };
        respond(result.await.map(|()| pb::RevokeSessionResponse {}))
    }
}
