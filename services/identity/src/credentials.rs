//! Identity's side of authentication: verifying a credential from its own store (the source
//! behind the kit's credential cache here, and so behind the `Authenticate` RPC), and moving the
//! last-use times that every service collects in Redis into PostgreSQL; and answering project
//! roles from its own store.

use chrono::{DateTime, Utc};
use fred::interfaces::SortedSetsInterface;
use fred::types::Value;
use futures::future::BoxFuture;
use uuid::Uuid;

use aimesh_kit::ServiceError;
use aimesh_kit::auth::{
    ACCESS_TOKEN_PREFIX, API_KEY_PREFIX, CredentialRef, CredentialSource, KeyRateLimits, LastUseKind, Principal,
    credential_hash,
};
use aimesh_kit::auth::{Caller, ProjectRole, RoleSource};
use aimesh_kit::data::redis::{Redis, timed};

use crate::store::Store;

/// Verifies credentials against identity's database.
#[derive(Debug, Clone)]
pub struct StoreCredentialSource {
    store: Store,
}

impl StoreCredentialSource {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

impl CredentialSource for StoreCredentialSource {
    fn authenticate<'a>(&'a self, credential: &'a str) -> BoxFuture<'a, Result<Option<Principal>, ServiceError>> {
        Box::pin(async move {
            let hash = credential_hash(credential);
            if credential.starts_with(ACCESS_TOKEN_PREFIX) {
                let session = self.store.session_credential(&hash).await.map_err(ServiceError::from)?;
                Ok(session.map(|s| Principal {
                    user_id: s.user_id,
                    credential: CredentialRef::Session { session_id: s.session_id },
                    system_admin: s.role == "admin",
                    expires_at: Some(s.expires_at),
                }))
            } else if credential.starts_with(API_KEY_PREFIX) {
                let key = self.store.api_key_credential(&hash).await.map_err(ServiceError::from)?;
                Ok(key.map(|k| Principal {
                    user_id: k.created_by,
                    credential: CredentialRef::ApiKey {
                        api_key_id: k.api_key_id,
                        project_id: k.project_id,
                        scopes: k.scopes,
                        rate_limits: KeyRateLimits {
                            key_requests_per_minute: k.requests_per_minute.and_then(|n| u32::try_from(n).ok()),
                            project_requests_per_minute: k
                                .project_requests_per_minute
                                .and_then(|n| u32::try_from(n).ok()),
                        },
                    },
                    system_admin: false,
                    expires_at: k.expires_at,
                }))
            } else {
                Ok(None)
            }
        })
    }
}

/// Answers project roles from identity's database: the source behind identity's own role cache,
/// and so behind the `GetProjectRole` RPC the other services ask.
#[derive(Debug, Clone)]
pub struct StoreRoleSource {
    store: Store,
}

impl StoreRoleSource {
    pub fn new(store: Store) -> Self {
        Self { store }
    }
}

impl RoleSource for StoreRoleSource {
    fn role<'a>(
        &'a self,
        caller: &'a Caller,
        project_id: Uuid,
    ) -> BoxFuture<'a, Result<Option<ProjectRole>, ServiceError>> {
        Box::pin(async move {
            // A system admin is an owner of every live project. The cache is keyed by project and
            // user, so a change of a person's admin role shows after `auth.local_ttl_secs`.
            if caller.principal.system_admin {
                let project = self.store.project(project_id).await.map_err(ServiceError::from)?;
                return Ok(project.map(|_| ProjectRole::Owner));
            }
            self.store.member_role(project_id, caller.principal.user_id).await.map_err(ServiceError::from)
        })
    }
}

/// Most members moved per Redis round trip.
const DRAIN_BATCH: usize = 500;

/// Moves the last-use times collected in Redis (see [`aimesh_kit::auth::LastUseRecorder`]) into
/// PostgreSQL. Members are popped atomically (`ZPOPMIN`), so two identity replicas never apply
/// the same time twice; a failed database write puts them back (`ZADD GT` keeps a newer time
/// written meanwhile). Returns how many times were applied.
pub async fn drain_last_use(store: &Store, redis: &Redis) -> Result<usize, ServiceError> {
    let mut applied = 0;
    for kind in [LastUseKind::Session, LastUseKind::ApiKey] {
        let key = kind.redis_key(redis);
        loop {
            let popped: Value = timed("last_use_drain", redis.pool().zpopmin(&key, Some(DRAIN_BATCH)))
                .await
                .map_err(ServiceError::unavailable)?;
            let entries = scored_members(popped);
            if entries.is_empty() {
                break;
            }
            let (ids, times): (Vec<Uuid>, Vec<DateTime<Utc>>) = entries
                .iter()
                .filter_map(|(member, score)| {
                    let id = Uuid::parse_str(member).ok()?;
                    // Scores are whole unix seconds written by the recorder.
                    let time = DateTime::from_timestamp(*score as i64, 0)?;
                    Some((id, time))
                })
                .unzip();
            if let Err(error) = store.apply_last_use(kind == LastUseKind::Session, &ids, &times).await {
                let members: Vec<(f64, String)> = entries.into_iter().map(|(m, s)| (s, m)).collect();
                let ordering = Some(fred::types::sorted_sets::Ordering::GreaterThan);
                let restored: Result<i64, _> =
                    timed("last_use_restore", redis.pool().zadd(&key, None, ordering, false, false, members)).await;
                if let Err(redis_error) = restored {
                    tracing::warn!(%redis_error, "could not put back last-use times; they are lost");
                }
                return Err(ServiceError::from(error));
            }
            applied += ids.len();
            if entries.len() < DRAIN_BATCH {
                break;
            }
        }
    }
    Ok(applied)
}

/// Reads a `ZPOPMIN` reply: a flat `[member, score, ...]` (RESP2) or `[[member, score], ...]` (RESP3).
fn scored_members(reply: Value) -> Vec<(String, f64)> {
    fn flatten(value: Value, out: &mut Vec<Value>) {
        match value {
            Value::Array(items) => items.into_iter().for_each(|item| flatten(item, out)),
            Value::Null => {}
            other => out.push(other),
        }
    }
    let mut flat = Vec::new();
    flatten(reply, &mut flat);
    flat.chunks_exact(2).filter_map(|pair| Some((pair[0].as_string()?, pair[1].as_f64()?))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zpopmin_replies_of_both_protocols() {
        let resp2 = Value::Array(vec!["a".into(), "10".into(), "b".into(), "11".into()]);
        assert_eq!(scored_members(resp2), vec![("a".into(), 10.0), ("b".into(), 11.0)]);
        let resp3 = Value::Array(vec![Value::Array(vec!["a".into(), Value::Double(10.0)])]);
        assert_eq!(scored_members(resp3), vec![("a".into(), 10.0)]);
        assert!(scored_members(Value::Null).is_empty());
    }
}
