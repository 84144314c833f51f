//! The model catalog as every request sees it: all models with all their prices, cached as one
//! entry in the kit's two-level cache and invalidated after every change.
//!
//! Staleness: a change is visible at once on the replica that made it and in Redis; other
//! replicas drop their in-process copy when the invalidation broadcast arrives (milliseconds),
//! or after [`LOCAL_TTL`] (10 s) if they miss it. If Redis was unreachable when the change was
//! made, an old copy may live in Redis for up to 1.1 × [`SHARED_TTL`] + [`LOCAL_TTL`] (340 s).
//! What this bound touches: catalog reads, model resolution and the estimate of a reservation.
//! Never the cost of a usage record: RecordUsage reads the price in force at the request time
//! from PostgreSQL inside its own transaction.

use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use aimesh_kit::ServiceError;
use aimesh_kit::data::audit::Actor;
use aimesh_kit::data::cache::{CacheSettings, InvalidationBus, TwoLevelCache};
use aimesh_kit::data::redis::Redis;

use crate::domain::{MatchPattern, ModelStatus, Price};
use crate::error::{Result, UsageError};
use crate::store::{ModelPatch, ModelRow, NewModel, PriceRow, Store};

/// In-process lifetime of the catalog: the bound when an invalidation broadcast is missed.
pub const LOCAL_TTL: Duration = Duration::from_secs(10);
/// Lifetime of the catalog in Redis.
pub const SHARED_TTL: Duration = Duration::from_secs(300);
/// The catalog is one cache entry.
const CATALOG_KEY: &str = "all";

/// One model with its prices, newest effective first, and its compiled match pattern.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CatalogModel {
    pub model: ModelRow,
    pub prices: Vec<PriceRow>,
    pub pattern: Option<MatchPattern>,
}

impl CatalogModel {
    pub fn is_retired(&self) -> bool {
        self.model.status == ModelStatus::Retired.as_str()
    }

    /// The price in force at `at`: the latest that took effect at or before it.
    pub fn price_at(&self, at: DateTime<Utc>) -> Option<&PriceRow> {
        self.prices.iter().find(|price| price.effective_at <= at)
    }
}

/// Every model, oldest first.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CatalogSnapshot {
    pub models: Vec<CatalogModel>,
}

impl CatalogSnapshot {
    fn build(models: Vec<ModelRow>, prices: Vec<PriceRow>) -> Self {
        let models = models
            .into_iter()
            .map(|model| {
                // Patterns were validated on the way in; one that no longer compiles (a newer
                // regex crate being stricter) just matches nothing.
                let pattern = MatchPattern::compile("match_pattern", &model.match_pattern).ok().flatten();
                let prices = prices.iter().filter(|p| p.model_id == model.id).cloned().collect();
                CatalogModel { model, prices, pattern }
            })
            .collect();
        Self { models }
    }

    pub fn get(&self, id: Uuid) -> Option<&CatalogModel> {
        self.models.iter().find(|m| m.model.id == id)
    }

    /// The model a usage report names: a catalog id; else a model whose name (or
    /// `provider/name`) equals the string, case-insensitively; else the first model whose match
    /// pattern matches it. Among several candidates a live model wins over a retired one, then
    /// the oldest. Unknown: NOT_FOUND; retired: FAILED_PRECONDITION.
    pub fn resolve(&self, reference: &str) -> Result<&CatalogModel> {
        let by_id = Uuid::parse_str(reference).ok().and_then(|id| self.get(id));
        let found = by_id
            .or_else(|| {
                pick(self.models.iter().filter(|m| {
                    m.model.name.eq_ignore_ascii_case(reference)
                        || reference.split_once('/').is_some_and(|(p, n)| {
                            p.eq_ignore_ascii_case(&m.model.provider) && n.eq_ignore_ascii_case(&m.model.name)
                        })
                }))
            })
            .or_else(|| pick(self.models.iter().filter(|m| m.pattern.as_ref().is_some_and(|p| p.is_match(reference)))));
        match found {
            None => Err(UsageError::ModelNotFound { field: "model", model: reference.to_owned() }),
            Some(model) if model.is_retired() => Err(UsageError::ModelRetired(model.model.id.to_string())),
            Some(model) => Ok(model),
        }
    }
}

fn pick<'a>(candidates: impl Iterator<Item = &'a CatalogModel> + Clone) -> Option<&'a CatalogModel> {
    candidates.clone().find(|m| !m.is_retired()).or_else(|| candidates.into_iter().next())
}

/// The catalog: cached reads, and writes that invalidate the cache.
#[derive(Debug, Clone)]
pub struct Catalog {
    store: Store,
    cache: TwoLevelCache<CatalogSnapshot>,
}

impl Catalog {
    pub fn new(store: Store, redis: Redis, bus: &InvalidationBus) -> Self {
        let settings = CacheSettings {
            local_ttl: LOCAL_TTL,
            shared_ttl: SHARED_TTL,
            negative_ttl: Duration::from_secs(5),
            local_capacity: 4,
        };
        Self { store, cache: TwoLevelCache::new("model_catalog", "usage", redis, bus, settings) }
    }

    /// The whole catalog, from the cache.
    pub async fn snapshot(&self) -> Result<Arc<CatalogSnapshot>> {
        let store = self.store.clone();
        let loaded = self
            .cache
            .get_or_load(CATALOG_KEY, || async move {
                let (models, prices) = store.catalog().await.map_err(ServiceError::from)?;
                Ok::<_, ServiceError>(Some(CatalogSnapshot::build(models, prices)))
            })
            .await?;
        Ok(loaded.unwrap_or_default())
    }

    /// One model with its prices; NOT_FOUND naming `model_id`.
    pub async fn model(&self, id: Uuid) -> Result<CatalogModel> {
        self.snapshot().await?.get(id).cloned().ok_or(UsageError::NotFound { what: "model", field: "model_id" })
    }

    /// See [`CatalogSnapshot::resolve`].
    pub async fn resolve(&self, reference: &str) -> Result<CatalogModel> {
        self.snapshot().await?.resolve(reference).cloned()
    }

    /// Adds a model (and its first price), audited as done by `actor`.
    pub async fn create_model(
        &self,
        model: &NewModel,
        price: Option<(Price, DateTime<Utc>)>,
        actor: &Actor,
    ) -> Result<CatalogModel> {
        let row = self.store.insert_model(model, price, actor).await?;
        self.changed().await;
        self.model(row.id).await
    }

    /// Changes a model, audited as `action` done by `actor`.
    pub async fn update_model(
        &self,
        id: Uuid,
        patch: &ModelPatch,
        actor: &Actor,
        action: &'static str,
    ) -> Result<CatalogModel> {
        let row = self.store.update_model(id, patch, actor, action).await?;
        self.changed().await;
        self.model(row.id).await
    }

    /// Adds a price of a model, audited as done by `actor`.
    pub async fn set_price(
        &self,
        model_id: Uuid,
        price: &Price,
        effective_at: DateTime<Utc>,
        actor: &Actor,
    ) -> Result<PriceRow> {
        let row = self.store.insert_model_price(model_id, price, effective_at, actor).await?;
        self.changed().await;
        Ok(row)
    }

    /// Drops the cached catalog everywhere; a failure only lengthens staleness to the bound in
    /// the module docs, so it is logged, not returned: the change itself is committed.
    async fn changed(&self) {
        self.cache.invalidate_or_log(CATALOG_KEY).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn model(name: &str, provider: &str, status: ModelStatus, pattern: &str) -> CatalogModel {
        let now = Utc::now();
        CatalogModel {
            model: ModelRow {
                id: Uuid::now_v7(),
                provider: provider.into(),
                name: name.into(),
                version: String::new(),
                model_type: "chat".into(),
                display_name: String::new(),
                description: String::new(),
                capabilities: vec![],
                status: status.as_str().into(),
                max_tokens: 0,
                context_window: 0,
                match_pattern: pattern.into(),
                created_at: now,
                updated_at: now,
            },
            prices: vec![],
            pattern: MatchPattern::compile("p", pattern).ok().flatten(),
        }
    }

    #[test]
    fn resolution_order() {
        let gpt = model("gpt-4o", "openai", ModelStatus::Active, r"^gpt-4o(-\d{4}-\d{2}-\d{2})?$");
        let old = model("gpt-3", "openai", ModelStatus::Retired, "");
        let claude = model("claude-3", "anthropic", ModelStatus::Deprecated, "^claude-3");
        let catalog = CatalogSnapshot { models: vec![gpt.clone(), old.clone(), claude.clone()] };
        let id = |r: &str| catalog.resolve(r).map(|m| m.model.id).ok();
        assert_eq!(id(&gpt.model.id.to_string()), Some(gpt.model.id));
        assert_eq!(id("GPT-4o"), Some(gpt.model.id));
        assert_eq!(id("openai/gpt-4o"), Some(gpt.model.id));
        assert_eq!(id("gpt-4o-2024-08-06"), Some(gpt.model.id));
        assert_eq!(id("claude-3-opus"), Some(claude.model.id));
        assert!(matches!(catalog.resolve("gpt-3"), Err(UsageError::ModelRetired(_))));
        assert!(matches!(catalog.resolve("llama"), Err(UsageError::ModelNotFound { field: "model", .. })));
        assert!(matches!(catalog.resolve(&Uuid::new_v4().to_string()), Err(UsageError::ModelNotFound { .. })));
    }

    #[test]
    fn snapshot_survives_json_with_patterns() {
        let catalog = CatalogSnapshot { models: vec![model("gpt-4o", "openai", ModelStatus::Active, "^gpt-4o")] };
        let text = serde_json::to_string(&catalog).expect("serialize");
        let back: CatalogSnapshot = serde_json::from_str(&text).expect("deserialize");
        assert!(back.resolve("gpt-4o-mini").is_ok());
    }
}
