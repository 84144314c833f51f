//! `UserService`: accounts.

use std::sync::Arc;

use tonic::{Request, Response, Status};
use uuid::Uuid;

use aimesh_kit::auth::Caller;
use aimesh_kit::auth::Principal;
use aimesh_kit::wire::fields;
use aimesh_kit::wire::proto_json;
use aimesh_proto::identity::v1 as pb;

use super::{Identity, actor, client_address, respond, target_user};
use crate::domain::{self, hash_password, validate_email, validate_password, validate_url};
use crate::error::{IdentityError, Result};
use crate::store::{Actor, NewUser, Store, UserPatch, UserRow};

/// Longest first or last name.
const MAX_NAME: usize = 100;
/// Largest `settings` object, serialized.
const MAX_SETTINGS_BYTES: usize = 16 * 1024;

pub(super) struct UserApi(pub(super) Arc<Identity>);

impl From<UserRow> for pb::User {
    fn from(row: UserRow) -> Self {
        let settings = proto_json::json_to_struct(&row.settings);
        pb::User {
            id: row.id.to_string(),
            email: row.email,
            username: row.username,
            first_name: row.first_name,
            last_name: row.last_name,
            avatar_url: row.avatar_url,
            role: if row.role == "admin" { pb::UserRole::Admin } else { pb::UserRole::User }.into(),
            status: if row.status == "active" { pb::UserStatus::Active } else { pb::UserStatus::Disabled }.into(),
            settings,
            last_login_time: proto_json::opt_timestamp(row.last_login_at),
            create_time: Some(proto_json::timestamp(row.created_at)),
            update_time: Some(proto_json::timestamp(row.updated_at)),
        }
    }
}

impl Identity {
    /// Hashes a password in a hashing slot (see [`Identity::in_hashing_slot`]): deliberately slow (tens
    /// of milliseconds, 19 MiB), so off the async threads and bounded in number.
    pub(super) async fn hash_password_bounded(&self, password: String) -> Result<String> {
        self.in_hashing_slot(move || hash_password(&password)).await?
    }

    /// Checks a password against `hash` in a hashing slot; without a hash (no such account) it
    /// spends the same time and answers no.
    pub(super) async fn verify_password_bounded(&self, password: String, hash: Option<String>) -> Result<bool> {
        self.in_hashing_slot(move || match hash {
            Some(hash) => domain::verify_password(&password, &hash),
            None => {
                domain::burn_password_check(&password);
                false
            }
        })
        .await
    }
}

/// The account `id` in `store` if `principal` may see it: their own, or any for a system admin.
async fn readable_in(store: &Store, principal: &Principal, id: Uuid) -> Result<UserRow> {
    if id != principal.user_id && !principal.system_admin {
        return Err(IdentityError::forbidden("you may only see your own account"));
    }
    store.user(id).await?.ok_or(IdentityError::NotFound("user"))
}

impl Identity {
    async fn register_user(&self, request: pb::RegisterUserRequest, actor: Actor) -> Result<pb::User> {
        let email = validate_email(&request.email)?;
        let username = domain::validate_username(&request.username)?;
        validate_password("password", &request.password)?;
        let first_name = fields::text("first_name", &request.first_name, MAX_NAME, false)?;
        let last_name = fields::text("last_name", &request.last_name, MAX_NAME, false)?;
        // "This email is taken" tells whether someone has an account: an address that keeps
        // probing is locked like one guessing passwords.
        let address = client_address(&actor);
        self.throttle.check_address(address).await?;
        let password_hash = self.hash_password_bounded(request.password).await?;
        let user = NewUser { email, username, password_hash, first_name, last_name };
        match self.store.insert_user(user, &actor).await {
            Err(IdentityError::EmailTaken) => {
                self.throttle.address_failed(address).await?;
                Err(IdentityError::EmailTaken)
            }
            inserted => {
                let user = inserted?;
                self.wrote(user.id).await;
                Ok(user.into())
            }
        }
    }

    /// The caller's own account, or any for a system admin; others are not found.
    async fn readable_user(&self, principal: &Principal, id: Uuid) -> Result<UserRow> {
        readable_in(&self.store, principal, id).await
    }

    async fn get_user(&self, principal: &Principal, request: pb::GetUserRequest) -> Result<pb::User> {
        // A key acts for its project, not as the person who made it: a profile is not its to read.
        principal.require_session()?;
        let id = target_user(principal, "user_id", &request.user_id)?;
        Ok(readable_in(&self.reader(principal.user_id).await, principal, id).await?.into())
    }

    async fn update_user(
        &self,
        principal: &Principal,
        request: pb::UpdateUserRequest,
        actor: Actor,
    ) -> Result<pb::User> {
        principal.require_session()?;
        let id = target_user(principal, "user_id", &request.user_id)?;
        let paths = fields::mask_paths(
            request.update_mask.as_ref(),
            &["username", "first_name", "last_name", "avatar_url", "settings", "role", "status"],
        )?;
        let user = request.user.unwrap_or_default();
        let mut patch = UserPatch::default();
        for path in &paths {
            match path.as_str() {
                "username" => patch.username = Some(domain::validate_username(&user.username)?),
                "first_name" => {
                    patch.first_name = Some(fields::text("user.first_name", &user.first_name, MAX_NAME, false)?)
                }
                "last_name" => {
                    patch.last_name = Some(fields::text("user.last_name", &user.last_name, MAX_NAME, false)?)
                }
                "avatar_url" => patch.avatar_url = Some(validate_url("user.avatar_url", &user.avatar_url)?),
                "settings" => {
                    let settings = user.settings.as_ref().map(proto_json::struct_to_json).unwrap_or_default();
                    if settings.to_string().len() > MAX_SETTINGS_BYTES {
                        return Err(IdentityError::invalid(
                            "user.settings",
                            format!("must be at most {MAX_SETTINGS_BYTES} bytes"),
                        ));
                    }
                    patch.settings = Some(if settings.is_null() { serde_json::json!({}) } else { settings });
                }
                "role" => {
                    patch.role = Some(match pb::UserRole::try_from(user.role) {
                        Ok(pb::UserRole::User) => "user",
                        Ok(pb::UserRole::Admin) => "admin",
                        _ => return Err(IdentityError::invalid("user.role", "must be user or admin")),
                    });
                }
                "status" => {
                    patch.status = Some(match pb::UserStatus::try_from(user.status) {
                        Ok(pb::UserStatus::Active) => "active",
                        Ok(pb::UserStatus::Disabled) => "disabled",
                        _ => return Err(IdentityError::invalid("user.status", "must be active or disabled")),
                    });
                }
                _ => {}
            }
        }
        if (patch.role.is_some() || patch.status.is_some()) && !principal.system_admin {
            return Err(IdentityError::forbidden("only a system admin may change role or status"));
        }
        self.readable_user(principal, id).await?;
        let access_changed = patch.role.is_some() || patch.status.is_some();
        let (row, revoked) = self.store.update_user(id, patch, &actor).await?;
        self.forget_credentials(&revoked).await;
        if access_changed {
            // Cached verifications carry the old role; make every live session verify again, and
            // the account's keys, which act only while it is active (or, without a membership,
            // a system admin).
            let live = self.store.live_session_hashes(id).await?;
            self.forget_credentials(&live).await;
            self.forget_creator_keys(id, None).await;
        }
        Ok(row.into())
    }

    async fn change_password(
        &self,
        principal: &Principal,
        request: pb::ChangePasswordRequest,
        actor: Actor,
    ) -> Result<pb::ChangePasswordResponse> {
        let session_id = principal.require_session()?;
        let id = target_user(principal, "user_id", &request.user_id)?;
        if id != principal.user_id {
            return Err(IdentityError::forbidden("you may only change your own password"));
        }
        if request.current_password.is_empty() {
            return Err(IdentityError::invalid("current_password", "is required"));
        }
        validate_password("new_password", &request.new_password)?;
        let user = self.store.user(id).await?.ok_or(IdentityError::NotFound("user"))?;
        if !self.verify_password_bounded(request.current_password, Some(user.password_hash)).await? {
            return Err(IdentityError::invalid("current_password", "is wrong"));
        }
        let hash = self.hash_password_bounded(request.new_password).await?;
        let revoked = self.store.set_password(id, &hash, Some(session_id), &actor).await?;
        self.forget_credentials(&revoked).await;
        Ok(pb::ChangePasswordResponse { revoked_sessions: i32::try_from(revoked.len()).unwrap_or(i32::MAX) })
    }

    async fn delete_user(
        &self,
        principal: &Principal,
        request: pb::DeleteUserRequest,
        actor: Actor,
    ) -> Result<pb::DeleteUserResponse> {
        principal.require_session()?;
        let id = target_user(principal, "user_id", &request.user_id)?;
        self.readable_user(principal, id).await?;
        let (revoked, projects) = self.store.delete_user(id, &actor).await?;
        self.forget_credentials(&revoked).await;
        self.forget_creator_keys(id, None).await;
        for project_id in projects {
            self.forget_roles(project_id, &[id]).await;
        }
        Ok(pb::DeleteUserResponse {})
    }
}

#[tonic::async_trait]
impl pb::user_service_server::UserService for UserApi {
    async fn register_user(&self, request: Request<pb::RegisterUserRequest>) -> Result<Response<pb::User>, Status> {
        let actor = actor(&request, None);
        respond(self.0.register_user(request.into_inner(), actor).await)
    }

    async fn get_user(&self, request: Request<pb::GetUserRequest>) -> Result<Response<pb::User>, Status> {
        let principal = Caller::of(&request)?.principal;
        respond(self.0.get_user(&principal, request.into_inner()).await)
    }

    async fn update_user(&self, request: Request<pb::UpdateUserRequest>) -> Result<Response<pb::User>, Status> {
        let principal = Caller::of(&request)?.principal;
        let actor = actor(&request, Some(principal.user_id));
        respond(self.0.update_user(&principal, request.into_inner(), actor).await)
    }

    async fn change_password(
        &self,
        request: Request<pb::ChangePasswordRequest>,
    ) -> Result<Response<pb::ChangePasswordResponse>, Status> {
        let principal = Caller::of(&request)?.principal;
        let actor = actor(&request, Some(principal.user_id));
        respond(self.0.change_password(&principal, request.into_inner(), actor).await)
    }

    async fn delete_user(
        &self,
        request: Request<pb::DeleteUserRequest>,
    ) -> Result<Response<pb::DeleteUserResponse>, Status> {
        let principal = Caller::of(&request)?.principal;
        let actor = actor(&request, Some(principal.user_id));
        respond(self.0.delete_user(&principal, request.into_inner(), actor).await)
    }
}
