//! `ModelService`: the model catalog and its prices. Anyone authenticated reads it; only a
//! system admin with a login session changes it.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use tonic::{Request, Response, Status};
use uuid::Uuid;

use aimesh_kit::ServiceError;
use aimesh_kit::auth::Caller;
use aimesh_kit::data::audit::Actor;
use aimesh_kit::wire::error::respond;
use aimesh_kit::wire::fields;
use aimesh_kit::wire::pagination::{self, Page, PageKey};
use aimesh_kit::wire::proto_json;
use aimesh_proto::usage::v1 as pb;

use super::{Usage, time_field};
use crate::catalog::CatalogModel;
use crate::domain::{
    MAX_PRICE_BACKDATE, MAX_PRICE_PER_MILLION, MatchPattern, ModelStatus, ModelType, PRICE_SCALE, Price, parse_decimal,
    validate_capabilities, validate_model_limit, validate_model_token, validate_provider,
};
use crate::error::{Result, UsageError};
use crate::store::{ModelPatch, NewModel, PriceRow};

const MAX_DISPLAY_NAME: usize = 200;
const MAX_DESCRIPTION: usize = 2000;
const UPDATE_PATHS: &[&str] =
    &["display_name", "description", "context_window", "max_output_tokens", "capabilities", "match_pattern", "status"];

pub(super) struct ModelApi(pub(super) Arc<Usage>);

fn price_to_proto(row: &PriceRow) -> pb::ModelPrice {
    pb::ModelPrice {
        model_id: row.model_id.to_string(),
        input_per_million: row.input_per_million.normalize().to_string(),
        output_per_million: row.output_per_million.normalize().to_string(),
        cached_input_per_million: row.cached_input_per_million.normalize().to_string(),
        effective_time: Some(proto_json::timestamp(row.effective_at)),
        create_time: Some(proto_json::timestamp(row.created_at)),
    }
}

fn model_to_proto(model: &CatalogModel, now: DateTime<Utc>) -> Result<pb::Model> {
    let row = &model.model;
    Ok(pb::Model {
        id: row.id.to_string(),
        provider: row.provider.clone(),
        name: row.name.clone(),
        version: row.version.clone(),
        r#type: ModelType::parse_db(&row.model_type)?.to_proto().into(),
        display_name: row.display_name.clone(),
        description: row.description.clone(),
        context_window: row.context_window,
        max_output_tokens: row.max_tokens,
        capabilities: row.capabilities.clone(),
        status: ModelStatus::parse_db(&row.status)?.to_proto().into(),
        match_pattern: row.match_pattern.clone(),
        current_price: model.price_at(now).map(price_to_proto),
        create_time: Some(proto_json::timestamp(row.created_at)),
        update_time: Some(proto_json::timestamp(row.updated_at)),
    })
}

/// Catalog changes need a system admin's login session.
fn require_system_admin(caller: &Caller) -> Result<()> {
    caller.principal.require_session()?;
    if !caller.principal.system_admin {
        return Err(UsageError::forbidden("changing the model catalog needs a system admin"));
    }
    Ok(())
}

/// A price of a request (fields under `field`): input and output required, the cached-input
/// price defaulting to the input price (no discount); the effective time required and not
/// more than a minute in the past, so costs already recorded keep their price.
fn decode_price(
    field: &'static str,
    price: Option<&pb::ModelPrice>,
    now: DateTime<Utc>,
) -> Result<(Price, DateTime<Utc>)> {
    let names: [&'static str; 4] = match field {
        "price" => [
            "price.input_per_million",
            "price.output_per_million",
            "price.cached_input_per_million",
            "price.effective_time",
        ],
        _ => [
            "model.current_price.input_per_million",
            "model.current_price.output_per_million",
            "model.current_price.cached_input_per_million",
            "model.current_price.effective_time",
        ],
    };
    let price = price.ok_or_else(|| UsageError::invalid(field, "is required"))?;
    let decimal = |name, value: &str| parse_decimal(name, value, PRICE_SCALE, MAX_PRICE_PER_MILLION);
    let input = decimal(names[0], &price.input_per_million)?;
    let output = decimal(names[1], &price.output_per_million)?;
    let cached = if price.cached_input_per_million.trim().is_empty() {
        input
    } else {
        decimal(names[2], &price.cached_input_per_million)?
    };
    let effective_at = time_field(names[3], price.effective_time.as_ref())?
        .ok_or_else(|| UsageError::invalid(names[3], "is required"))?;
    if effective_at < now - MAX_PRICE_BACKDATE {
        return Err(UsageError::invalid(names[3], "must not be more than a minute in the past"));
    }
    Ok((Price { input_per_million: input, output_per_million: output, cached_input_per_million: cached }, effective_at))
}

/// Where the next page of models (ordered by provider, name, version, id) starts.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
struct ModelCursor {
    p: String,
    n: String,
    v: String,
    i: Uuid,
}

impl ModelCursor {
    fn of(model: &CatalogModel) -> Self {
        let m = &model.model;
        Self { p: m.provider.clone(), n: m.name.clone(), v: m.version.clone(), i: m.id }
    }

    fn key(&self) -> (&str, &str, &str, Uuid) {
        (&self.p, &self.n, &self.v, self.i)
    }
}

impl PageKey for ModelCursor {
    fn encode(&self) -> String {
        pagination::encode_json(self)
    }

    fn decode(token: &str) -> Result<Option<Self>, ServiceError> {
        pagination::decode_json(token)
    }
}

impl Usage {
    async fn create_model(&self, caller: &Caller, actor: &Actor, request: pb::CreateModelRequest) -> Result<pb::Model> {
        let now = Utc::now();
        let model = request.model.ok_or_else(|| UsageError::invalid("model", "is required"))?;
        let status = match model.status {
            0 => ModelStatus::Active,
            value => ModelStatus::require_proto(value, "model.status")?,
        };
        let new = NewModel {
            provider: validate_provider("model.provider", &model.provider)?,
            name: validate_model_token("model.name", &model.name, 128, true)?,
            version: validate_model_token("model.version", &model.version, 64, false)?,
            model_type: ModelType::require_proto(model.r#type, "model.type")?.as_str(),
            display_name: fields::text("model.display_name", &model.display_name, MAX_DISPLAY_NAME, false)?,
            description: fields::text("model.description", &model.description, MAX_DESCRIPTION, false)?,
            capabilities: validate_capabilities("model.capabilities", &model.capabilities)?,
            status,
            max_tokens: validate_model_limit("model.max_output_tokens", model.max_output_tokens)?,
            context_window: validate_model_limit("model.context_window", model.context_window)?,
            match_pattern: checked_pattern("model.match_pattern", &model.match_pattern)?,
        };
        let price =
            model.current_price.as_ref().map(|p| decode_price("model.current_price", Some(p), now)).transpose()?;
        require_system_admin(caller)?;
        let created = self.ledger.catalog().create_model(&new, price, actor).await?;
        model_to_proto(&created, Utc::now())
    }

    async fn get_model(&self, request: pb::GetModelRequest) -> Result<pb::Model> {
        let id = fields::id("model_id", &request.model_id)?;
        model_to_proto(&self.ledger.catalog().model(id).await?, Utc::now())
    }

    async fn list_models(&self, request: pb::ListModelsRequest) -> Result<pb::ListModelsResponse> {
        let provider =
            if request.provider.is_empty() { None } else { Some(validate_provider("provider", &request.provider)?) };
        let model_type = match request.r#type {
            0 => None,
            value => Some(ModelType::require_proto(value, "type")?.as_str()),
        };
        let page = Page::<ModelCursor>::new(&request.page_token, request.page_size)?;
        let catalog = self.ledger.catalog().snapshot().await?;
        let mut models: Vec<&CatalogModel> = catalog
            .models
            .iter()
            .filter(|m| provider.as_deref().is_none_or(|p| m.model.provider == p))
            .filter(|m| model_type.is_none_or(|t| m.model.model_type == t))
            .filter(|m| request.include_retired || !m.is_retired())
            .collect();
        models.sort_by_cached_key(|m| {
            let c = ModelCursor::of(m);
            (c.p, c.n, c.v, c.i)
        });
        let start =
            page.after().map_or(0, |cursor| models.partition_point(|m| ModelCursor::of(m).key() <= cursor.key()));
        let fetch = usize::try_from(page.fetch_limit()).unwrap_or(usize::MAX);
        let fetched: Vec<&CatalogModel> = models.into_iter().skip(start).take(fetch).collect();
        let (listed, next_page_token) = page.finish(fetched, |last| ModelCursor::of(last));
        let now = Utc::now();
        let models = listed.into_iter().map(|m| model_to_proto(m, now)).collect::<Result<_>>()?;
        Ok(pb::ListModelsResponse { models, next_page_token })
    }

    async fn update_model(&self, caller: &Caller, actor: &Actor, request: pb::UpdateModelRequest) -> Result<pb::Model> {
        let id = fields::id("model_id", &request.model_id)?;
        let paths = fields::mask_paths(request.update_mask.as_ref(), UPDATE_PATHS)?;
        let model = request.model.unwrap_or_default();
        let mut patch = ModelPatch::default();
        for path in &paths {
            match path.as_str() {
                "display_name" => {
                    patch.display_name =
                        Some(fields::text("model.display_name", &model.display_name, MAX_DISPLAY_NAME, false)?);
                }
                "description" => {
                    patch.description =
                        Some(fields::text("model.description", &model.description, MAX_DESCRIPTION, false)?);
                }
                "context_window" => {
                    patch.context_window = Some(validate_model_limit("model.context_window", model.context_window)?);
                }
                "max_output_tokens" => {
                    patch.max_tokens = Some(validate_model_limit("model.max_output_tokens", model.max_output_tokens)?);
                }
                "capabilities" => {
                    patch.capabilities = Some(validate_capabilities("model.capabilities", &model.capabilities)?);
                }
                "match_pattern" => {
                    patch.match_pattern = Some(checked_pattern("model.match_pattern", &model.match_pattern)?)
                }
                "status" => patch.status = Some(ModelStatus::require_proto(model.status, "model.status")?),
                _ => {}
            }
        }
        require_system_admin(caller)?;
        let updated = self.ledger.catalog().update_model(id, &patch, actor, "model.updated").await?;
        model_to_proto(&updated, Utc::now())
    }

    async fn retire_model(&self, caller: &Caller, actor: &Actor, request: pb::RetireModelRequest) -> Result<pb::Model> {
        let id = fields::id("model_id", &request.model_id)?;
        require_system_admin(caller)?;
        let patch = ModelPatch { status: Some(ModelStatus::Retired), ..ModelPatch::default() };
        let retired = self.ledger.catalog().update_model(id, &patch, actor, "model.retired").await?;
        model_to_proto(&retired, Utc::now())
    }

    async fn set_model_price(
        &self,
        caller: &Caller,
        actor: &Actor,
        request: pb::SetModelPriceRequest,
    ) -> Result<pb::ModelPrice> {
        let model_id = fields::id("model_id", &request.model_id)?;
        let (price, effective_at) = decode_price("price", request.price.as_ref(), Utc::now())?;
        require_system_admin(caller)?;
        let row = self.ledger.catalog().set_price(model_id, &price, effective_at, actor).await?;
        Ok(price_to_proto(&row))
    }

    async fn list_model_prices(&self, request: pb::ListModelPricesRequest) -> Result<pb::ListModelPricesResponse> {
        let id = fields::id("model_id", &request.model_id)?;
        let model = self.ledger.catalog().model(id).await?;
        Ok(pb::ListModelPricesResponse { prices: model.prices.iter().map(price_to_proto).collect() })
    }
}

/// A match pattern as stored: checked to compile within the bounds, or empty for none.
fn checked_pattern(field: &'static str, pattern: &str) -> Result<String> {
    Ok(MatchPattern::compile(field, pattern)?.map(|p| p.as_str().to_owned()).unwrap_or_default())
}

#[tonic::async_trait]
impl pb::model_service_server::ModelService for ModelApi {
    async fn create_model(&self, request: Request<pb::CreateModelRequest>) -> Result<Response<pb::Model>, Status> {
        let caller = Caller::of(&request)?;
        let actor = Actor::of(&request, Some(caller.principal.user_id));
        respond(self.0.create_model(&caller, &actor, request.into_inner()).await)
    }

    async fn get_model(&self, request: Request<pb::GetModelRequest>) -> Result<Response<pb::Model>, Status> {
        Caller::of(&request)?;
        respond(self.0.get_model(request.into_inner()).await)
    }

    async fn list_models(
        &self,
        request: Request<pb::ListModelsRequest>,
    ) -> Result<Response<pb::ListModelsResponse>, Status> {
        Caller::of(&request)?;
        respond(self.0.list_models(request.into_inner()).await)
    }

    async fn update_model(&self, request: Request<pb::UpdateModelRequest>) -> Result<Response<pb::Model>, Status> {
        let caller = Caller::of(&request)?;
        let actor = Actor::of(&request, Some(caller.principal.user_id));
        respond(self.0.update_model(&caller, &actor, request.into_inner()).await)
    }

    async fn retire_model(&self, request: Request<pb::RetireModelRequest>) -> Result<Response<pb::Model>, Status> {
        let caller = Caller::of(&request)?;
        let actor = Actor::of(&request, Some(caller.principal.user_id));
        respond(self.0.retire_model(&caller, &actor, request.into_inner()).await)
    }

    async fn set_model_price(
        &self,
        request: Request<pb::SetModelPriceRequest>,
    ) -> Result<Response<pb::ModelPrice>, Status> {
        let caller = Caller::of(&request)?;
        let actor = Actor::of(&request, Some(caller.principal.user_id));
        respond(self.0.set_model_price(&caller, &actor, request.into_inner()).await)
    }

    async fn list_model_prices(
        &self,
        request: Request<pb::ListModelPricesRequest>,
    ) -> Result<Response<pb::ListModelPricesResponse>, Status> {
        Caller::of(&request)?;
        respond(self.0.list_model_prices(request.into_inner()).await)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_need_an_effective_time_not_in_the_past() {
        let now = Utc::now();
        let mut price = pb::ModelPrice {
            input_per_million: "2.50".into(),
            output_per_million: "10".into(),
            effective_time: Some(proto_json::timestamp(now)),
            ..Default::default()
        };
        let (decoded, _) = decode_price("price", Some(&price), now).expect("valid");
        assert_eq!(decoded.cached_input_per_million, decoded.input_per_million);
        let field = |p: &pb::ModelPrice| match decode_price("price", Some(p), now) {
            Err(UsageError::Invalid { field, .. }) => field,
            other => panic!("expected an invalid field, got {other:?}"),
        };
        price.effective_time = None;
        assert_eq!(field(&price), "price.effective_time");
        price.effective_time = Some(proto_json::timestamp(now - chrono::Duration::minutes(2)));
        assert_eq!(field(&price), "price.effective_time");
        price.effective_time = Some(proto_json::timestamp(now));
        price.output_per_million = "-1".into();
        assert_eq!(field(&price), "price.output_per_million");
        assert!(matches!(decode_price("price", None, now), Err(UsageError::Invalid { field: "price", .. })));
    }

    #[test]
    fn model_cursor_round_trip() {
        let cursor = ModelCursor { p: "openai".into(), n: "gpt-4o".into(), v: String::new(), i: Uuid::new_v4() };
        assert_eq!(ModelCursor::decode(&cursor.encode()).ok().flatten(), Some(cursor));
        assert!(ModelCursor::decode("garbage!").is_err());
    }
}
