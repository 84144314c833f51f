//! `SettingsService`: system-wide settings (seed table system_configs). Public settings are
//! readable by anyone, even without a credential; the rest only by system admins, who alone
//! change them. Encrypted values are stored as AES-256-GCM ciphertext and never public.

use std::sync::Arc;

use tonic::{Request, Response, Status};

use aimesh_kit::auth::Caller;
use aimesh_kit::auth::Principal;
use aimesh_kit::wire::fields;
use aimesh_kit::wire::pagination::Page;
use aimesh_kit::wire::proto_json;
use aimesh_proto::identity::v1 as pb;

use super::{Identity, actor, respond};
use crate::domain::validate_setting_key;
use crate::error::{IdentityError, Result};
use crate::store::{Actor, SettingRow};

/// Largest value, serialized as JSON.
const MAX_VALUE_BYTES: usize = 64 * 1024;

pub(super) struct SettingsApi(pub(super) Arc<Identity>);

fn is_admin(principal: Option<&Principal>) -> bool {
    principal.is_some_and(|p| p.system_admin)
}

fn require_admin(principal: Option<&Principal>) -> Result<&Principal> {
    let principal =
        principal.ok_or_else(|| aimesh_kit::ServiceError::unauthenticated("this call needs a credential"))?;
    principal.require_session()?;
    if !principal.system_admin {
        return Err(IdentityError::forbidden("only a system admin may do this"));
    }
    Ok(principal)
}

impl Identity {
    fn setting_to_proto(&self, row: SettingRow) -> Result<pb::Setting> {
        let value = match (&row.value, &row.value_ciphertext, &self.cipher) {
            (Some(json), _, _) => Some(proto_json::json_to_value(json)),
            (None, Some(stored), Some(cipher)) => {
                let plain = cipher.decrypt(stored)?;
                let json: serde_json::Value =
                    serde_json::from_slice(&plain).map_err(aimesh_kit::ServiceError::internal)?;
                Some(proto_json::json_to_value(&json))
            }
            (None, Some(_), None) => return Err(IdentityError::NoSettingsKey),
            (None, None, _) => None,
        };
        Ok(pb::Setting {
            key: row.key,
            value,
            description: row.description,
            category: row.category,
            public: row.is_public,
            encrypted: row.is_encrypted,
            create_time: Some(proto_json::timestamp(row.created_at)),
            update_time: Some(proto_json::timestamp(row.updated_at)),
        })
    }

    async fn get_setting(&self, principal: Option<&Principal>, request: pb::GetSettingRequest) -> Result<pb::Setting> {
        let key = validate_setting_key(&request.key)?;
        // A private setting is as absent as a missing one to whoever may not read it.
        let row = self.store.setting(&key).await?.filter(|row| row.is_public || is_admin(principal));
        self.setting_to_proto(row.ok_or(IdentityError::NotFound("setting"))?)
    }

    async fn list_settings(
        &self,
        principal: Option<&Principal>,
        request: pb::ListSettingsRequest,
    ) -> Result<pb::ListSettingsResponse> {
        // The settings list is ordered by key; its page token is the last key returned.
        let page = Page::<String>::new(&request.page_token, request.page_size)?;
        let category = (!request.category.is_empty()).then_some(request.category.as_str());
        let rows = self.store.list_settings(category, is_admin(principal), &page).await?;
        let (rows, next_page_token) = page.finish(rows, |last| last.key.clone());
        let settings = rows.into_iter().map(|row| self.setting_to_proto(row)).collect::<Result<_>>()?;
        Ok(pb::ListSettingsResponse { settings, next_page_token })
    }

    async fn set_setting(
        &self,
        principal: Option<&Principal>,
        request: pb::SetSettingRequest,
        actor: Actor,
    ) -> Result<pb::Setting> {
        let setting = request.setting.ok_or_else(|| IdentityError::invalid("setting", "is required"))?;
        let key = validate_setting_key(&setting.key).map_err(|_| {
            IdentityError::invalid("setting.key", "must be lowercase words of a-z, 0-9 and '_' separated by dots")
        })?;
        let value = setting.value.as_ref().ok_or_else(|| IdentityError::invalid("setting.value", "is required"))?;
        let json = proto_json::value_to_json(value);
        let text = json.to_string();
        if text.len() > MAX_VALUE_BYTES {
            return Err(IdentityError::invalid(
                "setting.value",
                format!("must be at most {MAX_VALUE_BYTES} bytes as JSON"),
            ));
        }
        let description = fields::text("setting.description", &setting.description, 500, false)?;
        let category = fields::text("setting.category", &setting.category, 64, false)?;
        if setting.public && setting.encrypted {
            return Err(IdentityError::invalid("setting.encrypted", "a public setting cannot be encrypted"));
        }
        require_admin(principal)?;
        let (value, value_ciphertext) = if setting.encrypted {
            let cipher = self.cipher.as_ref().ok_or(IdentityError::NoSettingsKey)?;
            (None, Some(cipher.encrypt(text.as_bytes())?))
        } else {
            (Some(json), None)
        };
        let now = chrono::Utc::now();
        let row = SettingRow {
            key,
            value,
            value_ciphertext,
            description,
            category,
            is_public: setting.public,
            is_encrypted: setting.encrypted,
            created_at: now,
            updated_at: now,
        };
        let stored = self.store.put_setting(&row, &actor).await?;
        self.setting_to_proto(stored)
    }

    async fn delete_setting(
        &self,
        principal: Option<&Principal>,
        request: pb::DeleteSettingRequest,
        actor: Actor,
    ) -> Result<()> {
        let key = validate_setting_key(&request.key)?;
        require_admin(principal)?;
        if !self.store.delete_setting(&key, &actor).await? {
            return Err(IdentityError::NotFound("setting"));
        }
        Ok(())
    }
}

#[tonic::async_trait]
impl pb::settings_service_server::SettingsService for SettingsApi {
    async fn get_setting(&self, request: Request<pb::GetSettingRequest>) -> Result<Response<pb::Setting>, Status> {
        let principal = Caller::of(&request).ok().map(|caller| caller.principal);
        respond(self.0.get_setting(principal.as_ref(), request.into_inner()).await)
    }

    async fn list_settings(
        &self,
        request: Request<pb::ListSettingsRequest>,
    ) -> Result<Response<pb::ListSettingsResponse>, Status> {
        let principal = Caller::of(&request).ok().map(|caller| caller.principal);
        respond(self.0.list_settings(principal.as_ref(), request.into_inner()).await)
    }

    async fn set_setting(&self, request: Request<pb::SetSettingRequest>) -> Result<Response<pb::Setting>, Status> {
        let principal = Caller::of(&request).ok().map(|caller| caller.principal);
        let actor = actor(&request, principal.as_ref().map(|p| p.user_id));
        respond(self.0.set_setting(principal.as_ref(), request.into_inner(), actor).await)
    }

    async fn delete_setting(
        &self,
        request: Request<pb::DeleteSettingRequest>,
    ) -> Result<Response<pb::DeleteSettingResponse>, Status> {
        let principal = Caller::of(&request).ok().map(|caller| caller.principal);
        let actor = actor(&request, principal.as_ref().map(|p| p.user_id));
        respond(
            self.0
                .delete_setting(principal.as_ref(), request.into_inner(), actor)
                .await
                .map(|()| pb::DeleteSettingResponse {}),
        )
    }
}
