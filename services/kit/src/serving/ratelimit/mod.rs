//! Distributed rate limiting over the shared Redis Cluster: GCRA in a server-side Lua script,
//! one key per limit, each key its own hash tag (`{<prefix>:rl:<dimension>:<id>}`), so a limit
//! costs one round trip and the limits of one request are decided concurrently across slots.
//!
//! A request names its limits ([`LimitRequest`]: per IP, user, API key, project) and their cost;
//! [`RateLimiter::decide`] answers with a [`Decision`] for the tightest of them. Limits are
//! decided independently, so a request denied by one limit may still have consumed another.
//!
//! A limit one process decides often is leased: a few of its tokens are taken from Redis in
//! advance, in the same script call as a request, and spent without a round trip; nothing is let
//! through that Redis did not count, and near the limit every request is decided in Redis
//! ([`lease`] has the exact terms). Metric: `rate_limit_leased_total{dimension}`, decisions
//! served from a lease.
//!
//! Redis failures (unreachable, or slower than `redis.command_timeout_ms`) trip a breaker that
//! skips Redis for [`REDIS_RETRY_AFTER`]; meanwhile `rate_limit.on_redis_failure = "open"`
//! decides with an in-process GCRA of the same limits (approximate: per process) and `"closed"`
//! refuses with UNAVAILABLE. The next decision after the pause tries Redis again, so the
//! limiter recovers by itself.
//!
//! Metric: `rate_limit_decisions_total{dimension, outcome, source}`, one per limit decided;
//! `outcome` is `allowed`, `denied` or `shadow_denied` (a denial shadow mode let through),
//! `source` is `redis` or `local`.
//!
//! [`RateLimitLayer`] applies it to gRPC services; the gateway calls [`RateLimiter::decide`] and
//! [`Decision::headers`] itself for callers without a credential, and vouches for their address
//! to the services so they do not count it twice ([`client`]).
//!
//! Failed authentication has a limit of its own per client address
//! (`rate_limit.per_ip_failed_auth`, [`Dimension::FailedAuth`]), like fail2ban: before a
//! credential is looked up, [`RateLimiter::admit_credential`] looks (consuming nothing) whether
//! the address has failures left (an address far from its limit is remembered as admitted for a
//! second, [`admissions`]), and a credential that did not verify costs one
//! ([`RateLimiter::charge_failed_auth`]). A flood of made-up credentials thus costs identity and
//! its database a bounded rate per address. The services' auth layer and the gateway both apply
//! it; the services leave an address the gateway vouched for to the gateway.

pub mod admissions;
pub mod client;
mod layer;
mod lease;
mod local;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Duration;

use fred::types::scripts::Script;
use tonic_types::{ErrorDetails, StatusExt};

use crate::auth::{CredentialRef, DeploymentSecret, Principal};
use crate::config::{RateLimitConfig, RateLimitMode, RedisFailureMode};
use crate::data::redis::{Redis, RedisBreaker, timed};
use crate::wire::error::{ERROR_DOMAIN, ServiceError};

use admissions::Admissions;
pub use client::ClientAddress;
pub use layer::RateLimitLayer;
use lease::{Ask, Leases};
use local::LocalLimiter;

/// How long Redis is skipped after it failed to decide.
pub const REDIS_RETRY_AFTER: Duration = Duration::from_secs(1);

/// The reason in the `ErrorInfo` of a denial.
pub const RATE_LIMITED: &str = "RATE_LIMITED";

/// Header: the tightest limit's request count per period.
pub const HEADER_LIMIT: &str = "ratelimit-limit";
/// Header: what is left of it now.
pub const HEADER_REMAINING: &str = "ratelimit-remaining";
/// Header: seconds until it is full again.
pub const HEADER_RESET: &str = "ratelimit-reset";
/// Header of a denial: seconds until the request may succeed.
pub const HEADER_RETRY_AFTER: &str = "retry-after";

/// Gives up on a method's limits: internal RPCs (their caller was limited already) and the
/// server's own health and reflection services.
const EXEMPT_PREFIXES: &[&str] = &["/aimesh.identity.v1.AuthService/", "/grpc.health.v1.", "/grpc.reflection."];

/// The GCRA script every decision runs (`EVALSHA`), for benchmarks to run it raw.
pub const GCRA_SCRIPT: &str = include_str!("gcra.lua");

/// Whose budget a limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dimension {
    Ip,
    User,
    ApiKey,
    Project,
    /// Failed authentications of a client address.
    FailedAuth,
}

impl Dimension {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Ip => "ip",
            Self::User => "user",
            Self::ApiKey => "api_key",
            Self::Project => "project",
            Self::FailedAuth => "failed_auth",
        }
    }
}

/// `count` requests (of cost 1) per `period`, as a burst or spread out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limit {
    pub count: u32,
    pub period: Duration,
}

impl Limit {
    /// `count` requests per minute.
    pub fn per_minute(count: u32) -> Self {
        Self { count, period: Duration::from_secs(60) }
    }
}

/// One limit a request is subject to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LimitRequest {
    pub dimension: Dimension,
    /// Whose limit within the dimension: an address, a user, key or project id.
    pub id: String,
    pub limit: Limit,
    /// How much of the limit this request takes (a method's weight; usually 1).
    pub cost: u32,
}

/// Where a decision came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecisionSource {
    /// No limit applied.
    None,
    Redis,
    /// The in-process fallback, while Redis cannot answer.
    Local,
    /// An admission this process remembered ([`admissions`]): allowed, with no figures.
    Remembered,
}

impl DecisionSource {
    fn as_str(self) -> &'static str {
        match self {
            Self::None => "none",
            Self::Redis => "redis",
            Self::Local => "local",
            Self::Remembered => "remembered",
        }
    }
}

/// The answer for a request, described by its tightest limit: the one that denied it (the
/// longest wait if several did) or, when allowed, the one with the least left.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The tightest limit's dimension; none when no limit applied.
    pub dimension: Option<Dimension>,
    pub limit: u32,
    pub remaining: u32,
    /// Until the tightest limit is full again.
    pub reset: Duration,
    /// When denied: until the request may succeed.
    pub retry_after: Option<Duration>,
    pub source: DecisionSource,
    /// A limit denied it but shadow mode let it through.
    pub shadow: bool,
}

impl Decision {
    /// The answer when no limit applies.
    pub fn unlimited() -> Self {
        Self {
            allowed: true,
            dimension: None,
            limit: 0,
            remaining: 0,
            reset: Duration::ZERO,
            retry_after: None,
            source: DecisionSource::None,
            shadow: false,
        }
    }

    /// `ratelimit-limit`, `ratelimit-remaining`, `ratelimit-reset` (whole seconds, rounded
    /// up) and, when denied, `retry-after`; nothing when no limit applied. The same for gRPC
    /// metadata and REST headers.
    pub fn headers(&self) -> Vec<(&'static str, String)> {
        if self.dimension.is_none() {
            return Vec::new();
        }
        let mut headers = vec![
            (HEADER_LIMIT, self.limit.to_string()),
            (HEADER_REMAINING, self.remaining.to_string()),
            (HEADER_RESET, whole_seconds(self.reset).to_string()),
        ];
        if let Some(retry_after) = self.retry_after.filter(|_| !self.allowed) {
            headers.push((HEADER_RETRY_AFTER, whole_seconds(retry_after).max(1).to_string()));
        }
        headers
    }

    /// Adds [`Decision::headers`] to `headers`.
    pub fn write_headers(&self, headers: &mut http::HeaderMap) {
        for (name, value) in self.headers() {
            if let Ok(value) = http::HeaderValue::from_str(&value) {
                headers.insert(name, value);
            }
        }
    }

    /// The error of a denial: RESOURCE_EXHAUSTED (HTTP 429), reason `RATE_LIMITED`.
    pub fn error(&self) -> ServiceError {
        let dimension = self.dimension.map_or("request", Dimension::as_str);
        let wait = whole_seconds(self.retry_after.unwrap_or(self.reset)).max(1);
        ServiceError::new(
            crate::ErrorCode::ResourceExhausted,
            RATE_LIMITED,
            format!("{dimension} rate limit of {} exceeded; retry in {wait} s", self.limit),
        )
    }

    /// The gRPC status of a denial: [`Decision::error`] with a `google.rpc.RetryInfo` detail
    /// and the rate-limit headers as metadata.
    pub fn status(&self) -> tonic::Status {
        let error = self.error();
        let metadata = [("dimension".to_owned(), self.dimension.map_or("", Dimension::as_str).to_owned())];
        let mut details = ErrorDetails::with_error_info(error.reason.clone(), ERROR_DOMAIN, metadata);
        details.set_retry_info(Some(self.retry_after.unwrap_or(self.reset)));
        let mut status = tonic::Status::with_error_details(error.code.grpc(), error.message, details);
        let mut headers = http::HeaderMap::new();
        self.write_headers(&mut headers);
        status.metadata_mut().as_mut().extend(headers);
        status
    }
}

fn whole_seconds(duration: Duration) -> u64 {
    duration.as_micros().div_ceil(1_000_000) as u64
}

/// How a decision takes from the limits.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Consume {
    /// Only looks whether the cost would fit.
    No,
    /// Takes the cost in Redis every time (failed authentications).
    Exactly,
    /// Takes the cost, from this process's lease when the limit is hot (see [`lease`]).
    Leasing,
}

/// What one limit's GCRA step said, in microseconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Outcome {
    allowed: bool,
    remaining: u64,
    reset_us: u64,
    retry_after_us: u64,
}

/// Decides rate limits; clones share the Redis connection, the fallback and the breaker.
#[derive(Clone)]
pub struct RateLimiter {
    inner: Arc<Inner>,
    /// Whose vouched client addresses to believe (see [`client`]); none believes nobody.
    gateway_token: Option<Arc<DeploymentSecret>>,
}

struct Inner {
    redis: Redis,
    script: Script,
    settings: RateLimitConfig,
    local: LocalLimiter,
    leases: Leases,
    admissions: Admissions,
    breaker: RedisBreaker,
}

impl std::fmt::Debug for RateLimiter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RateLimiter").field("settings", &self.inner.settings).finish_non_exhaustive()
    }
}

impl RateLimiter {
    /// A limiter over `redis` with `settings` (`rate_limit` of the common configuration).
    pub fn new(redis: Redis, settings: &RateLimitConfig) -> Self {
        Self {
            inner: Arc::new(Inner {
                redis,
                script: Script::from_lua(GCRA_SCRIPT),
                settings: settings.clone(),
                local: LocalLimiter::new(),
                leases: Leases::new(settings.lease_max_tokens),
                admissions: Admissions::default(),
                breaker: RedisBreaker::new("ratelimit", REDIS_RETRY_AFTER),
            }),
            gateway_token: None,
        }
    }

    /// Believes the client addresses the gateway vouches for with `token`
    /// (`auth.gateway_token`) and leaves their per-IP limits to the gateway; see [`client`].
    pub fn trusting_gateway(self, token: Option<DeploymentSecret>) -> Self {
        Self { gateway_token: token.map(Arc::new), ..self }
    }

    /// The client of `request`: the address the gateway vouched for, else the socket peer.
    pub fn client_of<B>(&self, request: &http::Request<B>) -> Option<ClientAddress> {
        ClientAddress::from_request(request, self.gateway_token.as_deref())
    }

    /// The failed-authentication limit of `ip`; none when it is off.
    fn failed_auth_limit(&self, ip: IpAddr) -> Option<LimitRequest> {
        let settings = &self.inner.settings;
        (settings.enabled && settings.per_ip_failed_auth > 0).then(|| LimitRequest {
            dimension: Dimension::FailedAuth,
            id: ip.to_string(),
            limit: Limit::per_minute(settings.per_ip_failed_auth),
            cost: 1,
        })
    }

    /// Whether `ip` may still present a credential: its failed authentications are looked at,
    /// not counted. A denial is refused before the credential is looked up. An address far from
    /// its limit is remembered as admitted for a moment ([`admissions`] has the exact terms).
    /// Fails only as [`RateLimiter::decide`] does.
    pub async fn admit_credential(&self, ip: IpAddr) -> Result<Decision, ServiceError> {
        // Asked first, before the limit's id is written out: only an address admitted while the
        // limit was on is remembered.
        let admissions = &self.inner.admissions;
        if admissions.remembers(ip) {
            return Ok(Decision { source: DecisionSource::Remembered, ..Decision::unlimited() });
        }
        let Some(limit) = self.failed_auth_limit(ip) else { return Ok(Decision::unlimited()) };
        let decision = self.decide_consuming(&[limit], Consume::No).await?;
        if decision.allowed && !decision.shadow && decision.source == DecisionSource::Redis {
            admissions.admitted(ip, decision.remaining);
        }
        Ok(decision)
    }

    /// Counts a failed authentication (a credential unknown, malformed, expired or revoked)
    /// against `ip`. A Redis failure is logged, not returned: the caller is being refused anyway.
    pub async fn charge_failed_auth(&self, ip: IpAddr) {
        let Some(limit) = self.failed_auth_limit(ip) else { return };
        self.inner.admissions.forget(ip);
        if let Err(error) = self.decide_consuming(&[limit], Consume::Exactly).await {
            tracing::debug!(%error, "could not count a failed authentication");
        }
    }

    /// The settings it decides with.
    pub fn settings(&self) -> &RateLimitConfig {
        &self.inner.settings
    }

    /// The weight of a call to `method` (a full gRPC path); 0 when it is not limited at all.
    pub fn cost(&self, method: &str) -> u32 {
        if !self.inner.settings.enabled || EXEMPT_PREFIXES.iter().any(|prefix| method.starts_with(prefix)) {
            return 0;
        }
        self.inner.settings.costs.get(method).copied().unwrap_or(1)
    }

    /// The limits a call to `method` is subject to: API keys per key and per the key's project
    /// (their own limits, else the defaults), login sessions per user, the service token not at
    /// all, callers without a credential per peer address.
    pub fn limits_for(&self, principal: Option<&Principal>, peer: Option<IpAddr>, method: &str) -> Vec<LimitRequest> {
        let cost = self.cost(method);
        if cost == 0 {
            return Vec::new();
        }
        let settings = &self.inner.settings;
        let limit = |dimension, id: String, per_minute: u32| {
            (per_minute > 0).then(|| LimitRequest { dimension, id, limit: Limit::per_minute(per_minute), cost })
        };
        match principal.map(|p| (&p.credential, p.user_id)) {
            None => peer.and_then(|ip| limit(Dimension::Ip, ip.to_string(), settings.per_ip)).into_iter().collect(),
            Some((CredentialRef::Session { .. }, user_id)) => {
                limit(Dimension::User, user_id.to_string(), settings.per_user).into_iter().collect()
            }
            Some((CredentialRef::ApiKey { api_key_id, project_id, rate_limits, .. }, _)) => [
                limit(
                    Dimension::ApiKey,
                    api_key_id.to_string(),
                    rate_limits.key_requests_per_minute.unwrap_or(settings.per_api_key),
                ),
                limit(
                    Dimension::Project,
                    project_id.to_string(),
                    rate_limits.project_requests_per_minute.unwrap_or(settings.per_project),
                ),
            ]
            .into_iter()
            .flatten()
            .collect(),
            Some((CredentialRef::Service, _)) => Vec::new(),
        }
    }

    /// Decides `requests` (each consuming its cost where it fits) and answers for the tightest.
    /// Fails only with `on_redis_failure = "closed"` while Redis cannot answer (UNAVAILABLE).
    /// A limit this process decides often is leased (see [`lease`]).
    pub async fn decide(&self, requests: &[LimitRequest]) -> Result<Decision, ServiceError> {
        self.decide_consuming(requests, Consume::Leasing).await
    }

    /// [`RateLimiter::decide`], or only whether the requests would fit.
    async fn decide_consuming(&self, requests: &[LimitRequest], consume: Consume) -> Result<Decision, ServiceError> {
        let requests: Vec<&LimitRequest> = requests.iter().filter(|r| r.limit.count > 0 && r.cost > 0).collect();
        if requests.is_empty() {
            return Ok(Decision::unlimited());
        }
        let (outcomes, source) = match self.decide_in_redis(&requests, consume).await {
            Some(outcomes) => (outcomes, DecisionSource::Redis),
            None => match self.inner.settings.on_redis_failure {
                RedisFailureMode::Closed => {
                    return Err(ServiceError::unavailable("the rate limiter cannot reach redis"));
                }
                RedisFailureMode::Open => {
                    let outcomes = requests
                        .iter()
                        .map(|r| self.inner.local.decide(&self.redis_key(r), r.limit, r.cost, consume != Consume::No))
                        .collect::<Vec<_>>();
                    (outcomes, DecisionSource::Local)
                }
            },
        };
        Ok(self.combine(&requests, &outcomes, source))
    }

    /// Every limit in Redis at once (or from this process's leases), or none when Redis failed
    /// or is being skipped.
    async fn decide_in_redis(&self, requests: &[&LimitRequest], consume: Consume) -> Option<Vec<Outcome>> {
        let inner = &self.inner;
        if inner.breaker.is_open() {
            return None;
        }
        // The leases first, without a future per limit: a hot caller's every limit is usually
        // leased, and then the request is decided here at no further cost. Each limit is taken
        // from its lease or asked of Redis on its own, as before, whatever the others do.
        let mut answers: Vec<Result<Outcome, (String, Ask)>> = Vec::with_capacity(requests.len());
        for request in requests {
            let key = self.redis_key(request);
            answers.push(match consume {
                Consume::Leasing => match inner.leases.take(&key, request.limit, request.cost) {
                    Ok(outcome) => {
                        metrics::counter!("rate_limit_leased_total", "dimension" => request.dimension.as_str())
                            .increment(1);
                        Ok(outcome)
                    }
                    Err(ask) => Err((key, ask)),
                },
                Consume::Exactly | Consume::No => Err((key, Ask::default())),
            });
        }
        if answers.iter().all(Result::is_ok) {
            return Some(answers.into_iter().filter_map(Result::ok).collect());
        }
        let calls = requests.iter().zip(&answers).filter_map(|(request, answer)| match answer {
            Ok(_) => None,
            Err((key, ask)) => Some(self.ask_redis(request, key, *ask, consume)),
        });
        match futures::future::try_join_all(calls).await {
            Ok(asked) => {
                // Each limit's answer in order: its lease's, or the next one Redis gave.
                let mut asked = asked.into_iter();
                answers.into_iter().map(|answer| answer.ok().or_else(|| asked.next())).collect()
            }
            Err(error) => {
                inner.breaker.trip();
                tracing::warn!(%error, retry_after = ?REDIS_RETRY_AFTER, "rate limiter: redis failed; deciding without it for a while");
                None
            }
        }
    }

    /// One limit decided by the script in Redis, asking for `ask` (a lease to take or return).
    async fn ask_redis(
        &self,
        request: &LimitRequest,
        key: &str,
        ask: Ask,
        consume: Consume,
    ) -> Result<Outcome, fred::error::Error> {
        let inner = &self.inner;
        let args = vec![
            request.limit.count.to_string(),
            request.limit.period.as_micros().to_string(),
            request.cost.to_string(),
            if consume == Consume::No { "1" } else { "0" }.to_owned(),
            ask.lease.to_string(),
            ask.refund.to_string(),
        ];
        let call = inner.script.evalsha_with_reload(inner.redis.pool().next(), key, args);
        let answer: Result<Vec<i64>, fred::error::Error> = timed("ratelimit", call).await;
        let (outcome, leased) = match answer.as_deref() {
            Ok(&[allowed, remaining, reset_us, retry_after_us, leased]) => (
                Outcome {
                    allowed: allowed == 1,
                    remaining: u64::try_from(remaining).unwrap_or(0),
                    reset_us: u64::try_from(reset_us).unwrap_or(0),
                    retry_after_us: u64::try_from(retry_after_us).unwrap_or(0),
                },
                u32::try_from(leased).unwrap_or(0),
            ),
            other => {
                inner.leases.failed(key, ask);
                return Err(match other {
                    Err(error) => error.clone(),
                    Ok(answer) => fred::error::Error::new(
                        fred::error::ErrorKind::Parse,
                        format!("the rate-limit script answered {answer:?}"),
                    ),
                });
            }
        };
        inner.leases.granted(key, ask, leased, &outcome);
        // What is left for this process includes the lease it just took.
        Ok(Outcome { remaining: outcome.remaining + u64::from(leased), ..outcome })
    }

    /// The Redis key of a limit, `{<prefix>:rl:<dimension>:<id>}`: the whole key is its hash
    /// tag, so limits spread over the cluster's slots.
    pub fn redis_key(&self, request: &LimitRequest) -> String {
        format!("{{{}}}", self.inner.redis.key("rl", &format!("{}:{}", request.dimension.as_str(), request.id)))
    }

    fn combine(&self, requests: &[&LimitRequest], outcomes: &[Outcome], source: DecisionSource) -> Decision {
        let shadow_mode = self.inner.settings.mode == RateLimitMode::Shadow;
        for (request, outcome) in requests.iter().zip(outcomes) {
            let outcome_label = match (outcome.allowed, shadow_mode) {
                (true, _) => "allowed",
                (false, false) => "denied",
                (false, true) => "shadow_denied",
            };
            metrics::counter!(
                "rate_limit_decisions_total",
                "dimension" => request.dimension.as_str(),
                "outcome" => outcome_label,
                "source" => source.as_str(),
            )
            .increment(1);
        }
        let denied = requests.iter().zip(outcomes).filter(|(_, o)| !o.allowed).max_by_key(|(_, o)| o.retry_after_us);
        let (request, outcome) = denied
            .or_else(|| requests.iter().zip(outcomes).min_by_key(|(_, o)| o.remaining))
            .map(|(r, o)| (*r, *o))
            .unwrap_or((requests[0], outcomes[0]));
        let mut decision = Decision {
            allowed: outcome.allowed,
            dimension: Some(request.dimension),
            limit: request.limit.count,
            remaining: u32::try_from(outcome.remaining).unwrap_or(u32::MAX),
            reset: Duration::from_micros(outcome.reset_us),
            retry_after: (!outcome.allowed).then(|| Duration::from_micros(outcome.retry_after_us)),
            source,
            shadow: false,
        };
        if !decision.allowed && shadow_mode {
            tracing::debug!(
                dimension = request.dimension.as_str(),
                id = %request.id,
                limit = request.limit.count,
                "rate limit would deny this request (shadow mode)"
            );
            decision.allowed = true;
            decision.shadow = true;
        }
        decision
    }
}

#[cfg(test)]
mod tests {
    use uuid::Uuid;

    use super::*;
    use crate::auth::KeyRateLimits;

    fn denied() -> Decision {
        Decision {
            allowed: false,
            dimension: Some(Dimension::ApiKey),
            limit: 5,
            remaining: 0,
            reset: Duration::from_millis(59_500),
            retry_after: Some(Duration::from_millis(11_200)),
            source: DecisionSource::Redis,
            shadow: false,
        }
    }

    #[test]
    fn a_denial_carries_retry_info_reason_and_headers() {
        let status = denied().status();
        assert_eq!(status.code(), tonic::Code::ResourceExhausted);
        let details = status.get_error_details();
        assert_eq!(details.error_info().map(|i| i.reason.as_str()), Some(RATE_LIMITED));
        let retry = details.retry_info().and_then(|r| r.retry_delay).expect("retry info");
        assert_eq!(retry, Duration::from_millis(11_200));
        let header = |name| status.metadata().get(name).and_then(|v| v.to_str().ok()).map(str::to_owned);
        assert_eq!(header(HEADER_LIMIT).as_deref(), Some("5"));
        assert_eq!(header(HEADER_REMAINING).as_deref(), Some("0"));
        assert_eq!(header(HEADER_RESET).as_deref(), Some("60"), "seconds round up");
        assert_eq!(header(HEADER_RETRY_AFTER).as_deref(), Some("12"));
        assert_eq!(ServiceError::from_status(&status).reason, RATE_LIMITED);
        assert_eq!(denied().error().code.http_status(), 429);
    }

    #[test]
    fn allowed_answers_have_no_retry_after_and_unlimited_ones_no_headers() {
        let allowed = Decision { allowed: true, remaining: 3, retry_after: None, ..denied() };
        let names: Vec<&str> = allowed.headers().into_iter().map(|(name, _)| name).collect();
        assert_eq!(names, [HEADER_LIMIT, HEADER_REMAINING, HEADER_RESET]);
        assert!(Decision::unlimited().headers().is_empty());
    }

    #[tokio::test]
    async fn looking_at_the_failure_budget_consumes_nothing_and_each_failure_costs_one() {
        let settings = RateLimitConfig { per_ip_failed_auth: 3, ..RateLimitConfig::default() };
        // A key prefix of its own, so the address's budget is this test's alone.
        let limiter = RateLimiter::new(crate::testing::redis().await, &settings);
        let ip: IpAddr = "192.0.2.77".parse().expect("ip");
        for _ in 0..10 {
            assert!(limiter.admit_credential(ip).await.expect("decide").allowed, "looking is free");
        }
        for _ in 0..3 {
            limiter.charge_failed_auth(ip).await;
        }
        let refused = limiter.admit_credential(ip).await.expect("decide");
        assert!(!refused.allowed);
        assert_eq!(refused.dimension, Some(Dimension::FailedAuth));
        assert!(refused.retry_after.is_some_and(|wait| wait > Duration::ZERO));
        assert!(limiter.admit_credential("192.0.2.78".parse().expect("ip")).await.expect("decide").allowed);

        let off = limiter_with(RateLimitConfig { per_ip_failed_auth: 0, ..RateLimitConfig::default() }).await;
        off.charge_failed_auth(ip).await;
        assert_eq!(off.admit_credential(ip).await.expect("decide"), Decision::unlimited());
    }

    /// Building a limiter needs a Redis handle; choosing limits never talks to it.
    async fn limiter_with(settings: RateLimitConfig) -> RateLimiter {
        RateLimiter::new(crate::testing::redis().await, &settings)
    }

    #[tokio::test]
    async fn limits_follow_the_credential() {
        let limiter = limiter_with(RateLimitConfig::default()).await;
        let ip: IpAddr = "192.0.2.1".parse().expect("ip");
        let method = "/aimesh.chat.v1.ChatService/GetSession";
        let anonymous = limiter.limits_for(None, Some(ip), method);
        assert_eq!(anonymous.iter().map(|l| (l.dimension, l.limit.count)).collect::<Vec<_>>(), [(Dimension::Ip, 1200)]);

        let user = Uuid::new_v4();
        let session = Principal {
            user_id: user,
            credential: CredentialRef::Session { session_id: Uuid::new_v4() },
            system_admin: false,
            expires_at: None,
        };
        let limits = limiter.limits_for(Some(&session), Some(ip), method);
        assert_eq!(limits.len(), 1);
        assert_eq!((limits[0].dimension, limits[0].id.as_str()), (Dimension::User, user.to_string().as_str()));

        let (key, project) = (Uuid::new_v4(), Uuid::new_v4());
        let api_key = Principal {
            credential: CredentialRef::ApiKey {
                api_key_id: key,
                project_id: project,
                scopes: Vec::new(),
                rate_limits: KeyRateLimits { key_requests_per_minute: Some(7), project_requests_per_minute: None },
            },
            ..session.clone()
        };
        let limits = limiter.limits_for(Some(&api_key), Some(ip), "/aimesh.chat.v1.ChatService/ExportProject");
        let shape: Vec<_> = limits.iter().map(|l| (l.dimension, l.limit.count, l.cost)).collect();
        assert_eq!(shape, [(Dimension::ApiKey, 7, 20), (Dimension::Project, 3000, 20)], "own limit, default, cost");

        assert!(limiter.limits_for(Some(&Principal::service()), Some(ip), method).is_empty());
        assert!(limiter.limits_for(None, Some(ip), "/aimesh.identity.v1.AuthService/Authenticate").is_empty());
        assert!(limiter.limits_for(None, Some(ip), "/grpc.health.v1.Health/Check").is_empty());
        let off = limiter_with(RateLimitConfig { enabled: false, ..RateLimitConfig::default() }).await;
        assert!(off.limits_for(Some(&session), Some(ip), method).is_empty());
    }
}
