//! What a usage question asks, checked: the range, the bucket, the metrics, the dimension and
//! the filter. Names are strings on the wire (REST-friendly); unknown ones are refused naming
//! the field.

use chrono::{DateTime, Duration, Utc};
use uuid::Uuid;

use crate::error::{AnalyticsError, Result};

/// The width of a time-series bucket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Bucket {
    Minute,
    Hour,
    Day,
    Week,
    Month,
}

impl Bucket {
    pub fn parse(value: &str) -> Result<Self> {
        match value {
            "minute" => Ok(Self::Minute),
            "hour" => Ok(Self::Hour),
            "day" => Ok(Self::Day),
            "week" => Ok(Self::Week),
            "month" => Ok(Self::Month),
            "" => Err(AnalyticsError::invalid("bucket", "is required")),
            other => Err(AnalyticsError::invalid(
                "bucket",
                format!("{other:?} is not one of minute, hour, day, week, month"),
            )),
        }
    }

    /// A lower bound of its length, to bound the number of buckets a range makes.
    pub fn min_length(self) -> Duration {
        match self {
            Self::Minute => Duration::minutes(1),
            Self::Hour => Duration::hours(1),
            Self::Day => Duration::hours(23),
            Self::Week => Duration::days(7),
            Self::Month => Duration::days(28),
        }
    }

    /// The ClickHouse expression of the bucket start of `column` in the zone `{tz:String}`, as
    /// unix seconds.
    pub fn sql(self, column: &str) -> String {
        match self {
            Self::Minute => format!("toUnixTimestamp(toStartOfMinute({column}, {{tz:String}}))"),
            Self::Hour => format!("toUnixTimestamp(toStartOfHour({column}, {{tz:String}}))"),
            Self::Day => format!("toUnixTimestamp(toStartOfDay({column}, {{tz:String}}))"),
            Self::Week => format!("toUnixTimestamp(toDateTime(toMonday({column}, {{tz:String}}), {{tz:String}}))"),
            Self::Month => {
                format!("toUnixTimestamp(toDateTime(toStartOfMonth({column}, {{tz:String}}), {{tz:String}}))")
            }
        }
    }
}

/// What a query may split usage by.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dimension {
    Model,
    User,
    ApiKey,
    Status,
    RequestType,
}

impl Dimension {
    pub fn parse(field: &'static str, value: &str) -> Result<Self> {
        match value {
            "model" => Ok(Self::Model),
            "user" => Ok(Self::User),
            "api_key" => Ok(Self::ApiKey),
            "status" => Ok(Self::Status),
            "request_type" => Ok(Self::RequestType),
            "" => Err(AnalyticsError::invalid(field, "is required")),
            other => Err(AnalyticsError::invalid(
                field,
                format!("{other:?} is not one of model, user, api_key, status, request_type"),
            )),
        }
    }

    /// The column, the same in the events and in the rollup, as text.
    pub fn sql(self) -> &'static str {
        match self {
            Self::Model => "toString(model_id)",
            Self::User => "toString(user_id)",
            Self::ApiKey => "toString(api_key_id)",
            Self::Status => "toString(status)",
            Self::RequestType => "toString(request_type)",
        }
    }
}

/// A number a query can answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Metric {
    Requests,
    InputTokens,
    OutputTokens,
    CachedInputTokens,
    TotalTokens,
    Cost,
    Errors,
    ErrorRate,
    LatencyP50,
    LatencyP95,
    LatencyP99,
}

impl Metric {
    pub const ALL: [Metric; 11] = [
        Self::Requests,
        Self::InputTokens,
        Self::OutputTokens,
        Self::CachedInputTokens,
        Self::TotalTokens,
        Self::Cost,
        Self::Errors,
        Self::ErrorRate,
        Self::LatencyP50,
        Self::LatencyP95,
        Self::LatencyP99,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Requests => "requests",
            Self::InputTokens => "input_tokens",
            Self::OutputTokens => "output_tokens",
            Self::CachedInputTokens => "cached_input_tokens",
            Self::TotalTokens => "total_tokens",
            Self::Cost => "cost",
            Self::Errors => "errors",
            Self::ErrorRate => "error_rate",
            Self::LatencyP50 => "latency_p50",
            Self::LatencyP95 => "latency_p95",
            Self::LatencyP99 => "latency_p99",
        }
    }

    /// Whether it is a latency quantile.
    pub fn is_latency(self) -> bool {
        matches!(self, Self::LatencyP50 | Self::LatencyP95 | Self::LatencyP99)
    }

    pub fn parse(field: &'static str, value: &str) -> Result<Self> {
        Self::ALL.into_iter().find(|m| m.as_str() == value).ok_or_else(|| {
            let known: Vec<&str> = Self::ALL.iter().map(|m| m.as_str()).collect();
            AnalyticsError::invalid(field, format!("{value:?} is not one of {}", known.join(", ")))
        })
    }

    /// The requested metrics, requests, total_tokens and cost when none; no repeats.
    pub fn parse_list(field: &'static str, values: &[String]) -> Result<Vec<Self>> {
        if values.is_empty() {
            return Ok(vec![Self::Requests, Self::TotalTokens, Self::Cost]);
        }
        let mut metrics = Vec::with_capacity(values.len());
        for value in values {
            let metric = Self::parse(field, value)?;
            if !metrics.contains(&metric) {
                metrics.push(metric);
            }
        }
        Ok(metrics)
    }
}

/// A half-open time range `[start, end)`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TimeRange {
    pub start: DateTime<Utc>,
    pub end: DateTime<Utc>,
}

impl TimeRange {
    /// Both ends required, the end after the start, at most `max_days` long.
    pub fn new(start: Option<DateTime<Utc>>, end: Option<DateTime<Utc>>, max_days: u32) -> Result<Self> {
        let start = start.ok_or_else(|| AnalyticsError::invalid("start_time", "is required"))?;
        let end = end.ok_or_else(|| AnalyticsError::invalid("end_time", "is required"))?;
        if end <= start {
            return Err(AnalyticsError::invalid("end_time", "must be after start_time"));
        }
        if end - start > Duration::days(i64::from(max_days)) {
            return Err(AnalyticsError::invalid("end_time", format!("the range may span at most {max_days} days")));
        }
        Ok(Self { start, end })
    }

    /// The range of the same length just before this one.
    pub fn previous(self) -> Self {
        Self { start: self.start - (self.end - self.start), end: self.start }
    }

    /// Whether both ends fall on whole UTC hours, so the hourly rollup covers it exactly.
    pub fn is_hour_aligned(self) -> bool {
        self.whole_hours() == Some(self)
    }

    /// The whole UTC hours inside the range, `[ceil_hour(start), floor_hour(end))`: what the
    /// hourly rollup can answer; None when the range holds no whole hour.
    pub fn whole_hours(self) -> Option<Self> {
        let hour = Duration::hours(1).num_seconds();
        let first = self.start.timestamp().div_euclid(hour) * hour;
        let first = if first == self.start.timestamp() && self.start.timestamp_subsec_nanos() == 0 {
            first
        } else {
            first + hour
        };
        let last = self.end.timestamp().div_euclid(hour) * hour;
        let start = DateTime::from_timestamp(first, 0)?;
        let end = DateTime::from_timestamp(last, 0)?;
        (start < end).then_some(Self { start, end })
    }
}

/// Which usage records a question counts.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct UsageFilter {
    pub model_id: Option<Uuid>,
    pub user_id: Option<Uuid>,
    pub api_key_id: Option<Uuid>,
    pub status: Option<String>,
    pub request_type: Option<String>,
}

/// A usage question: which project, when, which records, optionally bucketed and split.
#[derive(Debug, Clone)]
pub struct UsageQuery {
    pub project_id: Uuid,
    pub range: TimeRange,
    pub filter: UsageFilter,
    /// With the time zone its buckets start in.
    pub bucket: Option<(Bucket, String)>,
    pub group_by: Option<Dimension>,
    /// Whether the answer needs the latency quantiles (else they are left empty: they cost most
    /// of a long range's read).
    pub with_latency: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(error: AnalyticsError) -> &'static str {
        match error {
            AnalyticsError::Invalid { field, .. } => field,
            other => panic!("not a field error: {other}"),
        }
    }

    #[test]
    fn names_are_checked() {
        assert_eq!(Bucket::parse("day").ok(), Some(Bucket::Day));
        assert_eq!(Bucket::parse("fortnight").err().map(field), Some("bucket"));
        assert_eq!(Metric::parse_list("metrics", &["cost".into(), "cost".into()]).ok(), Some(vec![Metric::Cost]));
        assert_eq!(Metric::parse_list("metrics", &["joy".into()]).err().map(field), Some("metrics"));
        assert_eq!(Dimension::parse("dimension", "colour").err().map(field), Some("dimension"));
    }

    #[test]
    fn ranges() {
        let now = Utc::now();
        assert_eq!(TimeRange::new(Some(now), Some(now), 10).err().map(field), Some("end_time"));
        assert_eq!(TimeRange::new(Some(now), None, 10).err().map(field), Some("end_time"));
        assert_eq!(TimeRange::new(Some(now - Duration::days(11)), Some(now), 10).err().map(field), Some("end_time"));
        let range = TimeRange::new(Some(now - Duration::days(2)), Some(now), 10).ok();
        assert_eq!(range.map(|r| r.previous().end), Some(now - Duration::days(2)));
    }

    #[test]
    fn whole_hours_inside_a_range() {
        let at = |text: &str| DateTime::parse_from_rfc3339(text).map(|t| t.with_timezone(&Utc)).ok();
        let whole = |start: &str, end: &str| {
            TimeRange::new(at(start), at(end), 10).ok().and_then(TimeRange::whole_hours).map(|r| (r.start, r.end))
        };
        let (ten, eleven, noon) = (at("2025-03-01T10:00:00Z"), at("2025-03-01T11:00:00Z"), at("2025-03-01T12:00:00Z"));
        assert_eq!(whole("2025-03-01T10:00:00Z", "2025-03-01T12:00:00Z"), ten.zip(noon));
        assert_eq!(whole("2025-03-01T09:59:59.5Z", "2025-03-01T12:00:00.000001Z"), ten.zip(noon));
        assert_eq!(whole("2025-03-01T10:00:00.000001Z", "2025-03-01T12:59:59Z"), eleven.zip(noon));
        assert_eq!(whole("2025-03-01T10:00:01Z", "2025-03-01T11:00:00Z"), None, "no whole hour");
        assert_eq!(whole("2025-03-01T10:10:00Z", "2025-03-01T10:50:00Z"), None, "inside one hour");
        let aligned = TimeRange::new(ten, noon, 10).ok();
        assert_eq!(aligned.map(TimeRange::is_hour_aligned), Some(true));
        let ragged = TimeRange::new(ten, at("2025-03-01T12:00:00.5Z"), 10).ok();
        assert_eq!(ragged.map(TimeRange::is_hour_aligned), Some(false));
    }
}
