//! "Last used" times of sessions and API keys, kept without a database write per request.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use chrono::Utc;
use uuid::Uuid;

use super::credentials::{CredentialRef, Principal};
use crate::data::redis::{Redis, timed};

/// Keeps "last used" times of sessions and API keys without a database write per request:
/// each process collects them in memory and flushes them every few seconds to two Redis sorted
/// sets (score = unix seconds, `ZADD GT` keeps the latest); identity drains those into PostgreSQL.
#[derive(Clone)]
pub struct LastUseRecorder {
    redis: Redis,
    pending: Arc<Mutex<HashMap<(LastUseKind, Uuid), i64>>>,
}

/// Which sorted set a last-use time goes to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LastUseKind {
    Session,
    ApiKey,
}

impl LastUseKind {
    /// The Redis key (identity's namespace) of the sorted set.
    pub fn redis_key(self, redis: &Redis) -> String {
        match self {
            Self::Session => redis.key("identity", "last_used:sessions"),
            Self::ApiKey => redis.key("identity", "last_used:api_keys"),
        }
    }
}

impl LastUseRecorder {
    pub(super) fn new(redis: Redis) -> Self {
        Self { redis, pending: Arc::default() }
    }

    pub(super) fn record(&self, principal: &Principal) {
        let entry = match &principal.credential {
            CredentialRef::Session { session_id } => (LastUseKind::Session, *session_id),
            CredentialRef::ApiKey { api_key_id, .. } => (LastUseKind::ApiKey, *api_key_id),
            CredentialRef::Service => return,
        };
        if let Ok(mut pending) = self.pending.lock() {
            pending.insert(entry, Utc::now().timestamp());
        }
    }

    /// Writes what was collected to Redis; on failure keeps it for the next try.
    pub async fn flush(&self) {
        use fred::interfaces::SortedSetsInterface;
        use fred::types::sorted_sets::Ordering;
        let batch: Vec<((LastUseKind, Uuid), i64)> = match self.pending.lock() {
            Ok(mut pending) => pending.drain().collect(),
            Err(_) => return,
        };
        for kind in [LastUseKind::Session, LastUseKind::ApiKey] {
            let members: Vec<(f64, String)> = batch
                .iter()
                .filter(|((k, _), _)| *k == kind)
                .map(|((_, id), at)| (*at as f64, id.to_string()))
                .collect();
            if members.is_empty() {
                continue;
            }
            let key = kind.redis_key(&self.redis);
            let written: Result<i64, _> = timed(
                "last_use",
                self.redis.pool().zadd(&key, None, Some(Ordering::GreaterThan), false, false, members),
            )
            .await;
            if let Err(error) = written {
                tracing::warn!(%error, "could not record last-use times; retrying later");
                if let Ok(mut pending) = self.pending.lock() {
                    for (entry, at) in batch.iter().filter(|((k, _), _)| *k == kind) {
                        pending.entry(*entry).and_modify(|t| *t = (*t).max(*at)).or_insert(*at);
                    }
                }
            }
        }
    }
}
