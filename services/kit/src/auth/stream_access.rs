//! Long streams (watches, exports, downloads) outlive the access check made when they opened,
//! so [`StreamAccess`] keeps checking while they run, and bounds them.
//!
//! - Re-checks: every `recheck_every` the credential is verified again through the
//!   [`CredentialVerifier`] and the service's own rule is asked again (its role check through
//!   [`super::ProjectAccess`]). Both go through the two-level caches identity invalidates on
//!   revocation and membership change, so a re-check costs no round trip while nothing changed,
//!   and a logout, a revoked key or a removed member ends the stream within one interval. A
//!   failure that says nothing about access (a dependency unavailable) is tolerated for a few
//!   intervals before it ends the stream too, so a blip does not cut every stream.
//! - Lifetime: a stream ends after `max_lifetime` (UNAVAILABLE, reason
//!   `STREAM_LIFETIME_REACHED`); the client reconnects, and a watch resumes where it stopped.
//! - Count: a principal (a person for login sessions, a key for API keys) holds at most
//!   `max_per_principal` streams of a service at once, counted in Redis so the bound holds
//!   across replicas. Each open stream is a member of a sorted set scored by the end of its
//!   lease, renewed while it runs and removed when its [`StreamGuard`] is dropped (whatever
//!   ended the stream); a replica that crashes leaves members whose leases run out within
//!   [`SLOT_LEASE`], so slots never leak for good. While Redis cannot answer, each process
//!   counts its own streams (up to N times the bound with N replicas, as the rate limiter).

use std::collections::HashMap;
use std::future::Future;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use fred::interfaces::LuaInterface;
use tokio::time::Instant;
use uuid::Uuid;

use super::access::Caller;
use super::credentials::CredentialRef;
use super::verifier::CredentialVerifier;
use crate::data::redis::{Redis, RedisBreaker, RedisError, timed};
use crate::wire::error::{ErrorCode, ServiceError};

/// How long a counted stream holds its slot without a renewal: a crashed replica's slots are
/// free again after this long.
pub const SLOT_LEASE: Duration = Duration::from_secs(60);
/// How often an open stream renews its lease.
const SLOT_RENEW_EVERY: Duration = Duration::from_secs(20);
/// How long Redis is skipped after it failed.
const REDIS_RETRY_AFTER: Duration = Duration::from_secs(5);
/// Re-checks that may fail for reasons other than access before the stream ends anyway.
const INCONCLUSIVE_CHECKS_TOLERATED: u32 = 3;

/// Takes a slot: drops expired leases, refuses when the set is full, adds the stream.
/// KEYS[1]: the principal's open streams; ARGV: stream id, most streams, lease in milliseconds.
/// Returns 1 when the stream got a slot, 0 when all are taken.
const ACQUIRE_SCRIPT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[3]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
return 1
";

/// Extends a stream's lease (adding it back if it ran out meanwhile: the stream is open).
/// KEYS[1]: the principal's open streams; ARGV: stream id, lease in milliseconds.
const RENEW_SCRIPT: &str = r"
local time = redis.call('TIME')
local now = tonumber(time[1]) * 1000 + math.floor(tonumber(time[2]) / 1000)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], ARGV[2])
return 1
";

/// Frees a stream's slot. KEYS[1]: the principal's open streams; ARGV[1]: stream id.
const RELEASE_SCRIPT: &str = r"
return redis.call('ZREM', KEYS[1], ARGV[1])
";

/// The bounds of a service's streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StreamPolicy {
    /// How often an open stream re-checks its caller's access.
    pub recheck_every: Duration,
    /// How long a stream may stay open.
    pub max_lifetime: Duration,
    /// Streams one principal may hold open at once.
    pub max_per_principal: u32,
}

/// Why an open stream must end.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StreamEnd {
    /// The caller no longer has access (or it could not be confirmed for too long): this error
    /// is the stream's last item.
    AccessEnded(ServiceError),
    /// The stream has been open for `max_lifetime`.
    LifetimeReached(Duration),
}

impl StreamEnd {
    /// The error that ends the stream. A lifetime end is UNAVAILABLE (reason
    /// `STREAM_LIFETIME_REACHED`), which clients already treat as "reconnect".
    pub fn into_error(self) -> ServiceError {
        match self {
            Self::AccessEnded(error) => error,
            Self::LifetimeReached(lifetime) => ServiceError::new(
                ErrorCode::Unavailable,
                "STREAM_LIFETIME_REACHED",
                format!(
                    "the stream reached its maximum lifetime of {} s; reconnect (a watch resumes with after_sequence \
                     set to the last sequence received)",
                    lifetime.as_secs()
                ),
            ),
        }
    }
}

/// Opens a service's streams within its [`StreamPolicy`]; see the module docs. Cheap to clone.
#[derive(Clone)]
pub struct StreamAccess {
    inner: Arc<Inner>,
}

struct Inner {
    service: &'static str,
    redis: Redis,
    verifier: CredentialVerifier,
    policy: StreamPolicy,
    breaker: RedisBreaker,
    /// Open streams per principal key, counted here while Redis cannot answer.
    local: Mutex<HashMap<String, u32>>,
}

impl std::fmt::Debug for StreamAccess {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamAccess")
            .field("service", &self.inner.service)
            .field("policy", &self.inner.policy)
            .finish_non_exhaustive()
    }
}

impl StreamAccess {
    /// The streams of `service` (its Redis namespace), re-verifying credentials with `verifier`.
    pub fn new(service: &'static str, redis: Redis, verifier: CredentialVerifier, policy: StreamPolicy) -> Self {
        Self {
            inner: Arc::new(Inner {
                service,
                redis,
                verifier,
                policy,
                breaker: RedisBreaker::new("stream_access", REDIS_RETRY_AFTER),
                local: Mutex::default(),
            }),
        }
    }

    /// The bounds it applies.
    pub fn policy(&self) -> StreamPolicy {
        self.inner.policy
    }

    /// Takes one of the caller's stream slots for a stream about to open; RESOURCE_EXHAUSTED when
    /// the caller already holds `max_per_principal`. Call after the first access check, so a
    /// caller without access never takes a slot. The guard frees the slot when dropped.
    pub async fn open(&self, caller: &Caller) -> Result<StreamGuard, ServiceError> {
        let key = self.principal_key(caller);
        let stream_id = Uuid::new_v4().to_string();
        let slot = match self.acquire_shared(&key, &stream_id).await {
            Some(true) => Slot::Shared { key, stream_id },
            Some(false) => return Err(self.exhausted()),
            None if self.acquire_local(&key) => Slot::Local { key },
            None => return Err(self.exhausted()),
        };
        let now = Instant::now();
        Ok(StreamGuard { access: self.clone(), caller: caller.clone(), slot: Some(slot), opened: now, renewed: now })
    }

    fn exhausted(&self) -> ServiceError {
        ServiceError::new(
            ErrorCode::ResourceExhausted,
            "TOO_MANY_STREAMS",
            format!(
                "you already have {} streams open, the most allowed; close one first",
                self.inner.policy.max_per_principal
            ),
        )
    }

    /// The Redis key counting the streams of the caller's principal: a person for login
    /// sessions (all their sessions together), a key for API keys.
    fn principal_key(&self, caller: &Caller) -> String {
        let principal = match &caller.principal.credential {
            CredentialRef::ApiKey { api_key_id, .. } => format!("key:{api_key_id}"),
            CredentialRef::Session { .. } | CredentialRef::Service => format!("user:{}", caller.principal.user_id),
        };
        // The whole key is its hash tag, so principals spread over the cluster's slots.
        format!("{{{}}}", self.inner.redis.key(self.inner.service, &format!("streams:{principal}")))
    }

    fn lease_millis() -> String {
        SLOT_LEASE.as_millis().to_string()
    }

    /// `Some(taken)` from Redis, `None` when Redis failed or is being skipped.
    async fn acquire_shared(&self, key: &str, stream_id: &str) -> Option<bool> {
        if self.inner.breaker.is_open() {
            return None;
        }
        let max = self.inner.policy.max_per_principal.to_string();
        let args = vec![stream_id.to_owned(), max, Self::lease_millis()];
        let taken: Result<i64, RedisError> =
            timed("stream_acquire", self.inner.redis.pool().eval(ACQUIRE_SCRIPT, key, args)).await;
        match taken {
            Ok(taken) => Some(taken == 1),
            Err(error) => {
                self.redis_failed("acquire", &error);
                None
            }
        }
    }

    fn acquire_local(&self, key: &str) -> bool {
        let mut local = self.inner.local.lock().unwrap_or_else(PoisonError::into_inner);
        let open = local.entry(key.to_owned()).or_default();
        if *open >= self.inner.policy.max_per_principal {
            return false;
        }
        *open += 1;
        true
    }

    async fn renew(&self, slot: &Slot) {
        let Slot::Shared { key, stream_id } = slot else { return };
        let args = vec![stream_id.clone(), Self::lease_millis()];
        let renewed: Result<i64, RedisError> =
            timed("stream_renew", self.inner.redis.pool().eval(RENEW_SCRIPT, key.as_str(), args)).await;
        if let Err(error) = renewed {
            // The lease may run out; the stream then counts less until Redis is back.
            self.redis_failed("renew", &error);
        }
    }

    fn release(&self, slot: Slot) {
        match slot {
            Slot::Local { key } => {
                let mut local = self.inner.local.lock().unwrap_or_else(PoisonError::into_inner);
                if let Some(open) = local.get_mut(&key) {
                    *open = open.saturating_sub(1);
                    if *open == 0 {
                        local.remove(&key);
                    }
                }
            }
            Slot::Shared { key, stream_id } => {
                // Dropped outside a runtime (at exit): the lease frees the slot.
                let Ok(runtime) = tokio::runtime::Handle::try_current() else { return };
                let access = self.clone();
                runtime.spawn(async move {
                    let released: Result<i64, RedisError> = timed(
                        "stream_release",
                        access.inner.redis.pool().eval(RELEASE_SCRIPT, key.as_str(), stream_id),
                    )
                    .await;
                    if let Err(error) = released {
                        access.redis_failed("release", &error);
                    }
                });
            }
        }
    }

    fn redis_failed(&self, operation: &'static str, error: &RedisError) {
        self.inner.breaker.trip();
        tracing::warn!(
            service = self.inner.service,
            operation,
            %error,
            "stream slots: redis failed; counting in this process for a while"
        );
    }
}

/// Where a stream's slot is counted.
#[derive(Debug)]
enum Slot {
    Shared { key: String, stream_id: String },
    Local { key: String },
}

/// One open stream's slot and the means to re-check its caller; dropping it frees the slot.
pub struct StreamGuard {
    access: StreamAccess,
    caller: Caller,
    slot: Option<Slot>,
    opened: Instant,
    renewed: Instant,
}

impl std::fmt::Debug for StreamGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StreamGuard").field("slot", &self.slot).field("opened", &self.opened).finish_non_exhaustive()
    }
}

impl StreamGuard {
    /// Resolves when the stream must end: the caller's credential no longer verifies,
    /// `still_allowed` (given the caller as verified now) refuses, or the lifetime is over.
    /// Checks every `recheck_every`, renewing the slot's lease as it goes; keep it polled for
    /// as long as the stream is open (it holds the slot until dropped).
    pub async fn ended<F, Fut>(mut self, mut still_allowed: F) -> StreamEnd
    where
        F: FnMut(Caller) -> Fut,
        Fut: Future<Output = Result<(), ServiceError>>,
    {
        let policy = self.access.inner.policy;
        let deadline = self.opened + policy.max_lifetime;
        let mut inconclusive = 0;
        loop {
            let next_check = Instant::now() + policy.recheck_every;
            if next_check >= deadline {
                tokio::time::sleep_until(deadline).await;
                return StreamEnd::LifetimeReached(policy.max_lifetime);
            }
            tokio::time::sleep_until(next_check).await;
            match self.recheck(&mut still_allowed).await {
                Ok(()) => inconclusive = 0,
                Err(error) if is_about_access(&error) => return StreamEnd::AccessEnded(error),
                Err(error) => {
                    inconclusive += 1;
                    tracing::warn!(%error, inconclusive, "cannot re-check a stream's access");
                    if inconclusive >= INCONCLUSIVE_CHECKS_TOLERATED {
                        return StreamEnd::AccessEnded(error);
                    }
                }
            }
            if self.renewed.elapsed() >= SLOT_RENEW_EVERY
                && let Some(slot) = &self.slot
            {
                self.access.renew(slot).await;
                self.renewed = Instant::now();
            }
        }
    }

    async fn recheck<F, Fut>(&self, still_allowed: &mut F) -> Result<(), ServiceError>
    where
        F: FnMut(Caller) -> Fut,
        Fut: Future<Output = Result<(), ServiceError>>,
    {
        let principal = self.access.inner.verifier.verify(&self.caller.credential.0).await?;
        if principal.user_id != self.caller.principal.user_id {
            return Err(ServiceError::unauthenticated("the credential now stands for someone else"));
        }
        still_allowed(Caller { principal, credential: self.caller.credential.clone() }).await
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        if let Some(slot) = self.slot.take() {
            self.access.release(slot);
        }
    }
}

/// Whether a failed re-check says the access is gone, rather than that it could not be checked.
fn is_about_access(error: &ServiceError) -> bool {
    !matches!(error.code, ErrorCode::Unavailable | ErrorCode::Internal | ErrorCode::DeadlineExceeded)
}
