//! Domain types and rules of usage: what a model, a price, a usage record, a reservation and a
//! quota may hold, exact cost arithmetic, and the UTC windows quotas are counted in.

use aimesh_kit::wire::fields;
use std::str::FromStr;

use chrono::{DateTime, Datelike, Duration, NaiveDate, SubsecRound, TimeZone, Utc};
use rust_decimal::prelude::ToPrimitive;
use rust_decimal::{Decimal, RoundingStrategy};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use aimesh_proto::usage::v1 as pb;

use crate::error::{Result, UsageError};

/// Most tokens of one kind in one model call; more is a client bug, not usage.
pub const MAX_TOKENS: i64 = 10_000_000;
/// Longest model call recorded.
pub const MAX_DURATION_MS: i64 = 24 * 60 * 60 * 1000;
/// How far in the future a request time may be (clock skew between callers and us).
pub const MAX_REQUEST_TIME_AHEAD: Duration = Duration::minutes(5);
/// How old a request time may be: a late record still lands in a live monthly partition and
/// the previous month's budget is still known.
pub const MAX_REQUEST_TIME_AGE: Duration = Duration::days(35);
/// How far in the past a new price may take effect: enough for a request's travel time, not
/// enough to change costs already recorded in earnest.
pub const MAX_PRICE_BACKDATE: Duration = Duration::minutes(1);
/// Fractional digits of costs.
pub const COST_SCALE: u32 = 10;
/// Fractional digits of prices.
pub const PRICE_SCALE: u32 = 10;
/// Fractional digits of cost limits: the counters count in units of 1e-9 USD.
pub const LIMIT_SCALE: u32 = 9;
/// Highest price per million tokens accepted. With [`MAX_TOKENS`] it bounds one record's cost
/// at 3e6 USD, i.e. 3e15 units of 1e-9 USD: the counters stay exact even as Lua doubles (2^53).
pub const MAX_PRICE_PER_MILLION: i64 = 100_000;
/// Highest monthly cost limit in USD (1e15 counter units, exact as a Lua double).
pub const MAX_COST_LIMIT: i64 = 1_000_000;
/// Highest token or request limit.
pub const MAX_COUNT_LIMIT: i64 = 1_000_000_000_000_000;
/// Longest match pattern; the compiled automaton is bounded too (see [`MatchPattern::compile`]).
pub const MAX_PATTERN_LEN: usize = 256;
/// Reservation lifetime when the request names none, and the longest allowed.
pub const DEFAULT_RESERVATION_TTL_SECS: i32 = 60;
pub const MAX_RESERVATION_TTL_SECS: i32 = 3600;
/// Longest error message kept from a model call; longer ones are cut, not refused, since the
/// record of a call that happened matters more than its whole error text.
const MAX_ERROR_MESSAGE: usize = 2000;

aimesh_kit::spelled_enum!(
    /// What kind of model a catalog entry is.
    ModelType, pb::ModelType, { Chat = "chat", Completion = "completion", Embedding = "embedding", Image = "image", Audio = "audio" }
);

aimesh_kit::spelled_enum!(
    /// Whether usage may be recorded against a model.
    ModelStatus, pb::ModelStatus, { Active = "active", Deprecated = "deprecated", Retired = "retired" }
);

aimesh_kit::spelled_enum!(
    /// How a model call ended.
    UsageStatus, pb::UsageStatus, { Success = "success", Error = "error", Timeout = "timeout", Cancelled = "cancelled" }
);

aimesh_kit::spelled_enum!(
    /// Whose use a quota limits.
    QuotaScope, pb::QuotaScope, { Project = "project", User = "user", ApiKey = "api_key" }
);

/// The kind of model call a usage record is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RequestType {
    Chat,
    Completion,
    Embedding,
    Image,
    Audio,
    Other,
}

impl RequestType {
    const ALL: [Self; 6] = [Self::Chat, Self::Completion, Self::Embedding, Self::Image, Self::Audio, Self::Other];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Chat => "chat",
            Self::Completion => "completion",
            Self::Embedding => "embedding",
            Self::Image => "image",
            Self::Audio => "audio",
            Self::Other => "other",
        }
    }

    /// A request's `request_type`, case-insensitively.
    pub fn parse(field: &'static str, value: &str) -> Result<Self> {
        let value = value.trim();
        if value.is_empty() {
            return Err(UsageError::invalid(field, "is required"));
        }
        Self::ALL.into_iter().find(|t| t.as_str().eq_ignore_ascii_case(value)).ok_or_else(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|t| t.as_str()).collect();
            UsageError::invalid(field, format!("must be one of: {}", known.join(", ")))
        })
    }

    pub fn parse_db(value: &str) -> Result<Self> {
        Self::parse("request_type", value).map_err(|_| {
            aimesh_kit::ServiceError::internal(format!("unknown request type {value:?} in the database")).into()
        })
    }
}

/// A provider: 1 to 64 of `a-z 0-9 . _ -`, lowercased.
pub fn validate_provider(field: &'static str, value: &str) -> Result<String> {
    let provider = value.trim().to_ascii_lowercase();
    if provider.is_empty() {
        return Err(UsageError::invalid(field, "is required"));
    }
    let ok = provider.len() <= 64
        && provider.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '_' | '-'));
    if !ok {
        return Err(UsageError::invalid(field, "must be 1 to 64 of a-z, 0-9, '.', '_' and '-'"));
    }
    Ok(provider)
}

/// A model name or version as providers spell them ("gpt-4o-2024-08-06",
/// "meta-llama/Llama-3-70b", "claude-3-5-sonnet@20240620"): letters, digits and `. _ - : / @ +`,
/// at most `max` characters.
pub fn validate_model_token(field: &'static str, value: &str, max: usize, required: bool) -> Result<String> {
    let token = value.trim();
    if token.is_empty() {
        return if required { Err(UsageError::invalid(field, "is required")) } else { Ok(String::new()) };
    }
    let ok = token.len() <= max
        && token.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-' | ':' | '/' | '@' | '+'));
    if !ok {
        return Err(UsageError::invalid(
            field,
            format!("must be at most {max} of letters, digits, '.', '_', '-', ':', '/', '@' and '+'"),
        ));
    }
    Ok(token.to_owned())
}

/// Capabilities such as "vision": each 1 to 64 of `a-z 0-9 _ -`, at most 32, duplicates dropped.
pub fn validate_capabilities(field: &'static str, values: &[String]) -> Result<Vec<String>> {
    if values.len() > 32 {
        return Err(UsageError::invalid(field, "at most 32 capabilities"));
    }
    let mut out: Vec<String> = Vec::with_capacity(values.len());
    for value in values {
        let capability = value.trim().to_ascii_lowercase();
        let ok = !capability.is_empty()
            && capability.len() <= 64
            && capability.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '_' | '-'));
        if !ok {
            return Err(UsageError::invalid(field, format!("{value:?} is not 1 to 64 of a-z, 0-9, '_' and '-'")));
        }
        if !out.contains(&capability) {
            out.push(capability);
        }
    }
    Ok(out)
}

/// A token count of a model (context window, max output tokens): 0 (unknown) to [`MAX_TOKENS`].
pub fn validate_model_limit(field: &'static str, value: i32) -> Result<i32> {
    if value < 0 || i64::from(value) > MAX_TOKENS {
        return Err(UsageError::invalid(field, format!("must be between 0 and {MAX_TOKENS}")));
    }
    Ok(value)
}

/// A compiled `match_pattern`. Rust's regex engine runs in linear time, so a hostile pattern
/// cannot stall matching; the length and compiled-size limits bound memory.
#[derive(Debug, Clone)]
pub struct MatchPattern(regex::Regex);

impl MatchPattern {
    /// Compiles a pattern of at most [`MAX_PATTERN_LEN`] characters; empty is `None`.
    pub fn compile(field: &'static str, pattern: &str) -> Result<Option<Self>> {
        if pattern.is_empty() {
            return Ok(None);
        }
        if pattern.chars().count() > MAX_PATTERN_LEN {
            return Err(UsageError::invalid(field, format!("must be at most {MAX_PATTERN_LEN} characters long")));
        }
        regex::RegexBuilder::new(pattern)
            .size_limit(256 * 1024)
            .dfa_size_limit(256 * 1024)
            .build()
            .map(|regex| Some(Self(regex)))
            .map_err(|e| UsageError::invalid(field, format!("is not a valid regular expression: {e}")))
    }

    pub fn is_match(&self, text: &str) -> bool {
        self.0.is_match(text)
    }

    pub fn as_str(&self) -> &str {
        self.0.as_str()
    }
}

impl Serialize for MatchPattern {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> std::result::Result<S::Ok, S::Error> {
        serializer.serialize_str(self.0.as_str())
    }
}

impl<'de> Deserialize<'de> for MatchPattern {
    /// Compiles on the way in, so a cached catalog read from Redis is ready to match.
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> std::result::Result<Self, D::Error> {
        let text = String::deserialize(deserializer)?;
        regex::Regex::new(&text).map(Self).map_err(serde::de::Error::custom)
    }
}

/// Parses a non-negative decimal of plain digits (no sign, no exponent) with at most `scale`
/// fractional digits and at most `max` in value.
pub fn parse_decimal(field: &'static str, value: &str, scale: u32, max: i64) -> Result<Decimal> {
    let text = value.trim();
    if text.is_empty() {
        return Err(UsageError::invalid(field, "is required"));
    }
    let shape = format!("must be a non-negative decimal such as \"2.50\" with at most {scale} fractional digits");
    let (whole, fraction) = text.split_once('.').unwrap_or((text, ""));
    let digits = |s: &str| s.chars().all(|c| c.is_ascii_digit());
    if whole.is_empty() || whole.len() > 18 || !digits(whole) || !digits(fraction) || text.ends_with('.') {
        return Err(UsageError::invalid(field, shape));
    }
    if fraction.len() > scale as usize {
        return Err(UsageError::invalid(field, shape));
    }
    let number = Decimal::from_str(text).map_err(|_| UsageError::invalid(field, shape))?;
    if number > Decimal::from(max) {
        return Err(UsageError::invalid(field, format!("must be at most {max}")));
    }
    Ok(number)
}

/// Prices of one model in US dollars per million tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Price {
    pub input_per_million: Decimal,
    pub output_per_million: Decimal,
    pub cached_input_per_million: Decimal,
}

impl Price {
    /// The exact cost of a call, rounded half away from zero to [`COST_SCALE`] digits. Input
    /// tokens include the cached ones, which are charged at the cached price instead.
    pub fn cost(&self, tokens: &TokenCounts) -> Decimal {
        // No overflow: tokens <= 1e7 and stored prices < 1e10 with 10 fractional digits keep
        // every product below 1e27, inside Decimal's 96-bit mantissa.
        let uncached = Decimal::from(tokens.input - tokens.cached_input);
        let sum = uncached * self.input_per_million
            + Decimal::from(tokens.cached_input) * self.cached_input_per_million
            + Decimal::from(tokens.output) * self.output_per_million;
        let mut cost =
            (sum / Decimal::from(1_000_000)).round_dp_with_strategy(COST_SCALE, RoundingStrategy::MidpointAwayFromZero);
        cost.rescale(COST_SCALE);
        cost
    }

    /// What a reservation holds for a call not made yet: no input assumed cached, so the
    /// estimate is an upper bound of the cost of those token counts.
    pub fn estimate(&self, input: i64, output: i64) -> Decimal {
        self.cost(&TokenCounts { input, output, cached_input: 0 })
    }
}

/// A cost in the counters' unit, 1e-9 USD, rounded up so the counters never undercount.
pub fn cost_nanos(cost: Decimal) -> i64 {
    (cost * Decimal::from(1_000_000_000)).ceil().to_i64().unwrap_or(i64::MAX)
}

/// Counter units back to US dollars.
pub fn nanos_to_usd(nanos: i64) -> Decimal {
    Decimal::new(nanos, LIMIT_SCALE)
}

/// Token counts of one call: each 0 to [`MAX_TOKENS`], cached ones part of the input.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenCounts {
    pub input: i64,
    pub output: i64,
    pub cached_input: i64,
}

impl TokenCounts {
    pub fn new(input: i64, output: i64, cached_input: i64) -> Result<Self> {
        for (field, value) in
            [("input_tokens", input), ("output_tokens", output), ("cached_input_tokens", cached_input)]
        {
            if value < 0 {
                return Err(UsageError::invalid(field, "must not be negative"));
            }
            if value > MAX_TOKENS {
                return Err(UsageError::invalid(field, format!("must be at most {MAX_TOKENS}")));
            }
        }
        if cached_input > input {
            return Err(UsageError::invalid("cached_input_tokens", "must not exceed input_tokens"));
        }
        Ok(Self { input, output, cached_input })
    }

    pub fn total(&self) -> i64 {
        self.input + self.output
    }
}

/// A RecordUsage request as received, before validation. `default_user` is the caller, used
/// when `user_id` is empty; `api_key_id` is the caller's key, if it used one.
#[derive(Debug, Clone, Default)]
pub struct UsageDraft<'a> {
    pub request_id: &'a str,
    pub project_id: &'a str,
    pub user_id: &'a str,
    pub default_user: Uuid,
    pub api_key_id: Option<Uuid>,
    pub model: &'a str,
    pub chat_session_id: &'a str,
    pub request_type: &'a str,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub cached_input_tokens: i64,
    pub duration_ms: i64,
    pub status: Option<UsageStatus>,
    pub error_message: &'a str,
    pub request_time: Option<DateTime<Utc>>,
    pub reservation_id: &'a str,
}

/// A validated usage record to store; built by [`NewUsage::validate`].
#[derive(Debug, Clone)]
pub struct NewUsage {
    pub request_id: String,
    pub project_id: Uuid,
    pub user_id: Uuid,
    pub api_key_id: Option<Uuid>,
    pub model: String,
    pub chat_session_id: Option<Uuid>,
    pub request_type: RequestType,
    pub tokens: TokenCounts,
    pub duration_ms: i64,
    pub status: UsageStatus,
    pub error_message: String,
    pub request_time: DateTime<Utc>,
    pub reservation_id: Option<Uuid>,
    /// Who settles `reservation_id`: the caller, taken as no project admin until the handler
    /// says otherwise.
    pub settled_by: ReservationActor,
}

impl NewUsage {
    /// Checks every field of `draft` against the rules, naming the first field that breaks one.
    /// An unspecified status means success; a missing request time means `now`.
    pub fn validate(draft: &UsageDraft<'_>, now: DateTime<Utc>) -> Result<Self> {
        let request_id = draft.request_id.trim();
        if request_id.is_empty() {
            return Err(UsageError::invalid("request_id", "is required"));
        }
        if request_id.len() > 128 || request_id.chars().any(char::is_control) {
            return Err(UsageError::invalid("request_id", "must be at most 128 bytes without control characters"));
        }
        let project_id = fields::id("project_id", draft.project_id)?;
        let user_id = fields::optional_id("user_id", draft.user_id)?.unwrap_or(draft.default_user);
        let model = validate_model_reference(draft.model)?;
        let chat_session_id = fields::optional_id("chat_session_id", draft.chat_session_id)?;
        let request_type = RequestType::parse("request_type", draft.request_type)?;
        let tokens = TokenCounts::new(draft.input_tokens, draft.output_tokens, draft.cached_input_tokens)?;
        if !(0..=MAX_DURATION_MS).contains(&draft.duration_ms) {
            return Err(UsageError::invalid("duration_ms", format!("must be between 0 and {MAX_DURATION_MS} (a day)")));
        }
        let request_time = validate_request_time(draft.request_time, now)?;
        let reservation_id = fields::optional_id("reservation_id", draft.reservation_id)?;
        Ok(Self {
            request_id: request_id.to_owned(),
            project_id,
            user_id,
            api_key_id: draft.api_key_id,
            model,
            chat_session_id,
            request_type,
            tokens,
            duration_ms: draft.duration_ms,
            status: draft.status.unwrap_or(UsageStatus::Success),
            error_message: draft.error_message.chars().take(MAX_ERROR_MESSAGE).collect(),
            request_time,
            reservation_id,
            settled_by: ReservationActor {
                user_id: draft.default_user,
                api_key_id: draft.api_key_id,
                project_admin: false,
            },
        })
    }
}

/// Who releases or settles a reservation. A reservation is closed only by the principal that
/// made it (the same API key; for one made with a login session, the same person with a login
/// session) or by an owner or admin of its project, so one member cannot give back or spend
/// another's reserved room.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReservationActor {
    /// The person calling (for an API key, the person the key acts for).
    pub user_id: Uuid,
    /// The API key calling, if the caller used one.
    pub api_key_id: Option<Uuid>,
    /// An owner or admin of the project (through a login session): may close anyone's.
    pub project_admin: bool,
}

impl ReservationActor {
    /// Whether this actor may close a reservation made with `maker_api_key_id` (if a key made
    /// it) by `maker_user_id`.
    pub fn may_close(&self, maker_user_id: Uuid, maker_api_key_id: Option<Uuid>) -> bool {
        if self.project_admin {
            return true;
        }
        match maker_api_key_id {
            Some(key) => self.api_key_id == Some(key),
            None => self.api_key_id.is_none() && self.user_id == maker_user_id,
        }
    }
}

/// The `model` of a request: a catalog id or a provider's model string, 1 to 256 characters.
pub fn validate_model_reference(value: &str) -> Result<String> {
    let model = value.trim();
    if model.is_empty() {
        return Err(UsageError::invalid("model", "is required"));
    }
    if model.chars().count() > 256 || model.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(UsageError::invalid("model", "must be at most 256 characters without spaces"));
    }
    Ok(model.to_owned())
}

/// A request time: `now` when absent, at most 5 minutes ahead and 35 days old.
pub fn validate_request_time(value: Option<DateTime<Utc>>, now: DateTime<Utc>) -> Result<DateTime<Utc>> {
    // PostgreSQL keeps microseconds: a retry must get back exactly the time it sent.
    let Some(time) = value.map(|t| t.trunc_subsecs(6)) else { return Ok(now.trunc_subsecs(6)) };
    if time > now + MAX_REQUEST_TIME_AHEAD {
        return Err(UsageError::invalid("request_time", "must not be more than 5 minutes in the future"));
    }
    if time < now - MAX_REQUEST_TIME_AGE {
        return Err(UsageError::invalid("request_time", "must not be more than 35 days old"));
    }
    Ok(time)
}

/// A Reserve request as received.
#[derive(Debug, Clone, Default)]
pub struct ReservationDraft<'a> {
    pub project_id: &'a str,
    pub user_id: &'a str,
    pub default_user: Uuid,
    pub api_key_id: Option<Uuid>,
    pub model: &'a str,
    pub estimated_input_tokens: i64,
    pub estimated_output_tokens: i64,
    pub ttl_seconds: i32,
}

/// A validated reservation request; built by [`NewReservation::validate`].
#[derive(Debug, Clone)]
pub struct NewReservation {
    pub project_id: Uuid,
    pub user_id: Uuid,
    pub api_key_id: Option<Uuid>,
    /// The person who asked for it (the caller; for a key, the person it acts for), which may
    /// differ from `user_id` when a key attributes usage to someone else.
    pub maker_user_id: Uuid,
    pub model: String,
    pub input_tokens: i64,
    pub output_tokens: i64,
    pub ttl: Duration,
}

impl NewReservation {
    pub fn validate(draft: &ReservationDraft<'_>) -> Result<Self> {
        let project_id = fields::id("project_id", draft.project_id)?;
        let user_id = fields::optional_id("user_id", draft.user_id)?.unwrap_or(draft.default_user);
        let model = validate_model_reference(draft.model)?;
        for (field, value) in [
            ("estimated_input_tokens", draft.estimated_input_tokens),
            ("estimated_output_tokens", draft.estimated_output_tokens),
        ] {
            if !(0..=MAX_TOKENS).contains(&value) {
                return Err(UsageError::invalid(field, format!("must be between 0 and {MAX_TOKENS}")));
            }
        }
        let ttl = match draft.ttl_seconds {
            0 => DEFAULT_RESERVATION_TTL_SECS,
            n if (1..=MAX_RESERVATION_TTL_SECS).contains(&n) => n,
            _ => {
                return Err(UsageError::invalid(
                    "ttl_seconds",
                    format!("must be between 1 and {MAX_RESERVATION_TTL_SECS}"),
                ));
            }
        };
        Ok(Self {
            project_id,
            user_id,
            api_key_id: draft.api_key_id,
            maker_user_id: draft.default_user,
            model,
            input_tokens: draft.estimated_input_tokens,
            output_tokens: draft.estimated_output_tokens,
            ttl: Duration::seconds(i64::from(ttl)),
        })
    }
}

/// The subject a quota limits within its project.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum QuotaSubject {
    Project,
    User(Uuid),
    ApiKey(Uuid),
}

impl QuotaSubject {
    /// From a request's scope and subject id: empty for the project, a UUID otherwise.
    pub fn parse(field: &'static str, scope: QuotaScope, subject_id: &str) -> Result<Self> {
        match scope {
            QuotaScope::Project if subject_id.is_empty() => Ok(Self::Project),
            QuotaScope::Project => Err(UsageError::invalid(field, "must be empty for the project scope")),
            QuotaScope::User => Ok(Self::User(fields::id(field, subject_id)?)),
            QuotaScope::ApiKey => Ok(Self::ApiKey(fields::id(field, subject_id)?)),
        }
    }

    /// From the stored scope and subject id (the nil UUID for the project).
    pub fn from_db(scope: &str, subject_id: Uuid) -> Result<Self> {
        Ok(match QuotaScope::parse_db(scope)? {
            QuotaScope::Project => Self::Project,
            QuotaScope::User => Self::User(subject_id),
            QuotaScope::ApiKey => Self::ApiKey(subject_id),
        })
    }

    pub fn scope(self) -> QuotaScope {
        match self {
            Self::Project => QuotaScope::Project,
            Self::User(_) => QuotaScope::User,
            Self::ApiKey(_) => QuotaScope::ApiKey,
        }
    }

    /// The stored subject id: the nil UUID for the project.
    pub fn id(self) -> Uuid {
        match self {
            Self::Project => Uuid::nil(),
            Self::User(id) | Self::ApiKey(id) => id,
        }
    }

    /// The subject's field suffix in the counters: `p`, `u:<id>`, `k:<id>`.
    pub fn counter_field(self) -> String {
        match self {
            Self::Project => "p".to_owned(),
            Self::User(id) => format!("u:{id}"),
            Self::ApiKey(id) => format!("k:{id}"),
        }
    }

    /// How a warning or refusal names the subject.
    pub fn label(self) -> String {
        match self {
            Self::Project => "project".to_owned(),
            Self::User(id) => format!("user {id}"),
            Self::ApiKey(id) => format!("api key {id}"),
        }
    }
}

/// The limits of one subject; 0 means no limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QuotaLimits {
    pub tokens_per_day: i64,
    pub cost_per_month: Decimal,
    pub requests_per_minute: i64,
    pub tokens_per_minute: i64,
    pub soft_limit_percent: i32,
}

impl QuotaLimits {
    /// Validates the limits of a SetQuota request (fields under `quota.`).
    pub fn validate(
        tokens_per_day: i64,
        cost_per_month: &str,
        requests_per_minute: i64,
        tokens_per_minute: i64,
        soft_limit_percent: i32,
    ) -> Result<Self> {
        for (field, value) in [
            ("quota.tokens_per_day", tokens_per_day),
            ("quota.requests_per_minute", requests_per_minute),
            ("quota.tokens_per_minute", tokens_per_minute),
        ] {
            if !(0..=MAX_COUNT_LIMIT).contains(&value) {
                return Err(UsageError::invalid(field, format!("must be between 0 (no limit) and {MAX_COUNT_LIMIT}")));
            }
        }
        let cost_per_month = if cost_per_month.trim().is_empty() {
            Decimal::ZERO
        } else {
            parse_decimal("quota.cost_per_month", cost_per_month, LIMIT_SCALE, MAX_COST_LIMIT)?
        };
        if !(0..=100).contains(&soft_limit_percent) {
            return Err(UsageError::invalid("quota.soft_limit_percent", "must be between 0 (none) and 100"));
        }
        Ok(Self { tokens_per_day, cost_per_month, requests_per_minute, tokens_per_minute, soft_limit_percent })
    }

    /// The monthly cost limit in counter units (exact: at most 9 fractional digits).
    pub fn cost_per_month_nanos(&self) -> i64 {
        cost_nanos(self.cost_per_month)
    }
}

/// The UTC windows quotas count in at one instant: its day, month and minute, with the ids
/// the counters are keyed by and when their Redis keys may go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Windows {
    /// `20261125`
    pub day: String,
    /// `202611`
    pub month: String,
    /// Minutes since the Unix epoch.
    pub minute: String,
    pub day_start: DateTime<Utc>,
    pub month_start: DateTime<Utc>,
    pub minute_start: DateTime<Utc>,
    /// When each window's counters may expire (milliseconds since the epoch): a day after a day
    /// ends, a day after a month ends, a minute after a minute ends, so a window's counters
    /// live while it is current and a little longer for settling late reservations.
    pub day_expire_ms: i64,
    pub month_expire_ms: i64,
    pub minute_expire_ms: i64,
}

impl Windows {
    pub fn at(now: DateTime<Utc>) -> Self {
        let date = now.date_naive();
        let day_start = midnight(date);
        let month_first = NaiveDate::from_ymd_opt(date.year(), date.month(), 1).unwrap_or(date);
        let month_start = midnight(month_first);
        let next_month = month_first.checked_add_months(chrono::Months::new(1)).unwrap_or(month_first);
        let minute = now.timestamp().div_euclid(60);
        let minute_start = Utc.timestamp_opt(minute * 60, 0).single().unwrap_or(now);
        Self {
            day: date.format("%Y%m%d").to_string(),
            month: date.format("%Y%m").to_string(),
            minute: minute.to_string(),
            day_start,
            month_start,
            minute_start,
            day_expire_ms: (day_start + Duration::days(2)).timestamp_millis(),
            month_expire_ms: (midnight(next_month) + Duration::days(1)).timestamp_millis(),
            minute_expire_ms: (minute_start + Duration::minutes(2)).timestamp_millis(),
        }
    }
}

fn midnight(date: NaiveDate) -> DateTime<Utc> {
    Utc.from_utc_datetime(&date.and_time(chrono::NaiveTime::MIN))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn price(input: &str, output: &str, cached: &str) -> Price {
        let d = |s: &str| parse_decimal("p", s, PRICE_SCALE, MAX_PRICE_PER_MILLION).expect("price");
        Price { input_per_million: d(input), output_per_million: d(output), cached_input_per_million: d(cached) }
    }

    #[test]
    fn cost_with_cached_tokens_is_exact() {
        let tokens = TokenCounts::new(1_000_000, 10_000, 400_000).expect("tokens");
        let cost = price("2.50", "10.00", "1.25").cost(&tokens);
        assert_eq!(cost.to_string(), "2.1000000000");
        // A third of a millionth of a dollar per token rounds at the 10th digit, half away from zero.
        let cost = price("0.0000000001", "0", "0").cost(&TokenCounts::new(5, 0, 0).expect("tokens"));
        assert_eq!(cost.to_string(), "0.0000000000");
        let cost = price("0.3333333333", "0", "0").cost(&TokenCounts::new(3, 0, 0).expect("tokens"));
        assert_eq!(cost.to_string(), "0.0000010000");
        let cost = price("0.15", "0.60", "0.075").cost(&TokenCounts::new(1234, 567, 1000).expect("tokens"));
        // (234 * 0.15 + 1000 * 0.075 + 567 * 0.60) / 1e6 = (35.1 + 75 + 340.2) / 1e6
        assert_eq!(cost.to_string(), "0.0004503000");
    }

    #[test]
    fn nanos_round_up() {
        assert_eq!(cost_nanos(Decimal::from_str("2.1000000000").expect("d")), 2_100_000_000);
        assert_eq!(cost_nanos(Decimal::from_str("0.0000000001").expect("d")), 1);
        assert_eq!(cost_nanos(Decimal::ZERO), 0);
        assert_eq!(nanos_to_usd(2_100_000_001).to_string(), "2.100000001");
    }

    #[test]
    fn decimals() {
        assert!(parse_decimal("p", "2.50", 10, 100).is_ok());
        assert!(parse_decimal("p", "0", 10, 100).is_ok());
        for bad in ["", "-1", "1e3", "1.", ".5", "1.12345678901", "abc", "1,5", "101", " 1 2"] {
            assert!(parse_decimal("p", bad, 10, 100).is_err(), "{bad:?} passed");
        }
    }

    #[test]
    fn token_counts() {
        assert!(TokenCounts::new(10, 0, 10).is_ok());
        assert!(TokenCounts::new(-1, 0, 0).is_err());
        assert!(TokenCounts::new(MAX_TOKENS + 1, 0, 0).is_err());
        let error = TokenCounts::new(10, 0, 11).err();
        assert!(matches!(error, Some(UsageError::Invalid { field: "cached_input_tokens", .. })));
    }

    #[test]
    fn usage_validation_names_fields() {
        let now = Utc::now();
        let project = Uuid::new_v4().to_string();
        let good = UsageDraft {
            request_id: "r1",
            project_id: &project,
            default_user: Uuid::new_v4(),
            model: "gpt-4o",
            request_type: "chat",
            input_tokens: 10,
            ..UsageDraft::default()
        };
        let usage = NewUsage::validate(&good, now).expect("valid");
        assert_eq!(usage.request_time, now.trunc_subsecs(6));
        assert_eq!(usage.status, UsageStatus::Success);
        let field =
            |draft: UsageDraft<'_>| match NewUsage::validate(&draft, now).map_err(aimesh_kit::ServiceError::from) {
                Err(error) if error.code == aimesh_kit::ErrorCode::InvalidArgument => error.field.unwrap_or_default(),
                other => panic!("expected an invalid field, got {other:?}"),
            };
        assert_eq!(field(UsageDraft { request_id: "", ..good.clone() }), "request_id");
        assert_eq!(field(UsageDraft { request_type: "poetry", ..good.clone() }), "request_type");
        assert_eq!(field(UsageDraft { duration_ms: MAX_DURATION_MS + 1, ..good.clone() }), "duration_ms");
        assert_eq!(field(UsageDraft { output_tokens: -5, ..good.clone() }), "output_tokens");
        assert_eq!(field(UsageDraft { model: "", ..good.clone() }), "model");
        assert_eq!(field(UsageDraft { user_id: "nope", ..good.clone() }), "user_id");
        let future = now + Duration::minutes(6);
        assert_eq!(field(UsageDraft { request_time: Some(future), ..good.clone() }), "request_time");
        let old = now - Duration::days(36);
        assert_eq!(field(UsageDraft { request_time: Some(old), ..good.clone() }), "request_time");
        let fine = now - Duration::days(34);
        assert!(NewUsage::validate(&UsageDraft { request_time: Some(fine), ..good }, now).is_ok());
    }

    #[test]
    fn a_reservation_is_closed_by_its_maker_or_a_project_admin() {
        let (ann, bob, key, other_key) = (Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4(), Uuid::new_v4());
        let session = |user_id| ReservationActor { user_id, api_key_id: None, project_admin: false };
        let with_key =
            |api_key_id| ReservationActor { user_id: ann, api_key_id: Some(api_key_id), project_admin: false };
        // Made with ann's login session.
        assert!(session(ann).may_close(ann, None));
        assert!(!session(bob).may_close(ann, None));
        assert!(!with_key(key).may_close(ann, None), "a key does not close its person's session reservations");
        // Made with a key: that key only, not its person's session nor another key.
        assert!(with_key(key).may_close(ann, Some(key)));
        assert!(!with_key(other_key).may_close(ann, Some(key)));
        assert!(!session(ann).may_close(ann, Some(key)));
        // A project admin closes any.
        let admin = ReservationActor { project_admin: true, ..session(bob) };
        assert!(admin.may_close(ann, None) && admin.may_close(ann, Some(key)));
    }

    #[test]
    fn reservation_ttl() {
        let project = Uuid::new_v4().to_string();
        let draft = ReservationDraft { project_id: &project, model: "m", ..ReservationDraft::default() };
        assert_eq!(NewReservation::validate(&draft).expect("valid").ttl, Duration::seconds(60));
        assert!(NewReservation::validate(&ReservationDraft { ttl_seconds: 3601, ..draft.clone() }).is_err());
        assert!(NewReservation::validate(&ReservationDraft { ttl_seconds: -1, ..draft.clone() }).is_err());
        assert!(NewReservation::validate(&ReservationDraft { estimated_input_tokens: -1, ..draft }).is_err());
    }

    #[test]
    fn model_fields() {
        assert_eq!(validate_provider("provider", " OpenAI ").ok().as_deref(), Some("openai"));
        assert!(validate_provider("provider", "open ai").is_err());
        assert!(validate_model_token("name", "meta-llama/Llama-3-70b", 128, true).is_ok());
        assert!(validate_model_token("name", "gpt 4", 128, true).is_err());
        assert!(MatchPattern::compile("p", r"^gpt-4o(-\d{4}-\d{2}-\d{2})?$").expect("compiles").is_some());
        assert!(MatchPattern::compile("p", "(unclosed").is_err());
        assert!(MatchPattern::compile("p", &"a".repeat(MAX_PATTERN_LEN + 1)).is_err());
        // Counted repetition blows up the compiled size, which is bounded.
        assert!(MatchPattern::compile("p", r"(\w{100}){100}").is_err());
        assert_eq!(validate_capabilities("c", &["Vision".into(), "vision".into()]).expect("ok"), vec!["vision"]);
    }

    #[test]
    fn windows_are_utc() {
        let at = Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 30).single().expect("time");
        let w = Windows::at(at);
        assert_eq!((w.day.as_str(), w.month.as_str()), ("20261231", "202612"));
        assert_eq!(w.minute, (at.timestamp() / 60).to_string());
        assert_eq!(w.month_start, Utc.with_ymd_and_hms(2026, 12, 1, 0, 0, 0).single().expect("time"));
        assert_eq!(w.minute_start, Utc.with_ymd_and_hms(2026, 12, 31, 23, 59, 0).single().expect("time"));
        let month_end = Utc.with_ymd_and_hms(2027, 1, 2, 0, 0, 0).single().expect("time");
        assert_eq!(w.month_expire_ms, month_end.timestamp_millis());
        let next = Windows::at(at + Duration::seconds(31));
        assert_eq!((next.day.as_str(), next.month.as_str()), ("20270101", "202701"));
    }

    #[test]
    fn quota_limits() {
        assert!(QuotaLimits::validate(0, "", 0, 0, 0).is_ok());
        assert_eq!(QuotaLimits::validate(0, "10.5", 0, 0, 80).expect("ok").cost_per_month_nanos(), 10_500_000_000);
        assert!(QuotaLimits::validate(-1, "", 0, 0, 0).is_err());
        assert!(QuotaLimits::validate(0, "0.0000000001", 0, 0, 0).is_err());
        assert!(QuotaLimits::validate(0, "", 0, 0, 101).is_err());
        assert!(QuotaSubject::parse("subject_id", QuotaScope::Project, "x").is_err());
        assert!(QuotaSubject::parse("subject_id", QuotaScope::User, "").is_err());
    }
}
