//! The projects' retention as the services that keep a project's data (usage, chat, files)
//! apply it: analytics owns the policies (days per project, legal holds); each service reads
//! them through analytics' internal `ListRetentionPolicies` at the start of a retention round
//! and deletes what is past each project's cutoff. A round that cannot read them deletes
//! nothing (never with an unknown policy) and the next round tries again. See docs/retention.md.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::{DateTime, Utc};
use uuid::Uuid;

use aimesh_proto::analytics::v1 as analytics_pb;

use crate::ServiceError;
use crate::auth::ServiceToken;
use crate::config::CommonConfig;

/// Longest retention a store's default may be, in days (ten years, as a project's own).
pub const MAX_RETENTION_DAYS: u32 = 3650;
/// Longest time between two retention rounds a service may be configured with (a day).
pub const MAX_RETENTION_INTERVAL_SECS: u64 = 86_400;
/// Policies asked for per page.
const PAGE_SIZE: i32 = 1000;
/// How long fetched policies serve further rounds (of this process's stores) before they are
/// read again: short, so a hold set now is seen by every round that starts a moment later.
const POLICY_MAX_AGE: Duration = Duration::from_secs(10);
/// Waits before reading the policies again within a round when analytics did not answer: a
/// round at start-up may run before analytics listens (`aimesh all` starts them together).
const FETCH_RETRY_DELAYS: [Duration; 4] =
    [Duration::from_secs(1), Duration::from_secs(2), Duration::from_secs(4), Duration::from_secs(8)];

/// When a service runs its retention rounds and what it keeps by default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetentionSchedule {
    /// Days a project without a policy of its own keeps its data; None keeps it forever.
    pub default_days: Option<u32>,
    /// Time between two rounds.
    pub interval: Duration,
}

impl RetentionSchedule {
    /// The schedule of `<section>.default_retention_days` (0 = forever, at most
    /// [`MAX_RETENTION_DAYS`]) and `<section>.retention_interval_secs` (1 to a day); a value out
    /// of bounds is an error naming its setting.
    pub fn new(section: &str, default_days: u32, interval_secs: u64) -> Result<Self, ServiceError> {
        if default_days > MAX_RETENTION_DAYS {
            return Err(ServiceError::invalid_field(
                format!("{section}.default_retention_days"),
                format!("must be 0 (keep forever) to {MAX_RETENTION_DAYS}"),
            ));
        }
        if !(1..=MAX_RETENTION_INTERVAL_SECS).contains(&interval_secs) {
            return Err(ServiceError::invalid_field(
                format!("{section}.retention_interval_secs"),
                format!("must be 1 to {MAX_RETENTION_INTERVAL_SECS}"),
            ));
        }
        Ok(Self {
            default_days: (default_days > 0).then_some(default_days),
            interval: Duration::from_secs(interval_secs),
        })
    }
}

/// One project's policy besides the default.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProjectPolicy {
    /// Days the project set; None when it uses the store's default.
    pub days: Option<u32>,
    pub legal_hold: bool,
}

/// Every project's retention in one store, as read at one instant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policies {
    /// The store's default (None: keep forever).
    pub default_days: Option<u32>,
    /// Projects with days of their own or a legal hold.
    pub projects: HashMap<Uuid, ProjectPolicy>,
    /// When they were read: cutoffs are counted back from it.
    pub read_at: DateTime<Utc>,
}

impl Policies {
    /// How many days the project's data is kept; None keeps it (a hold, or no finite policy).
    pub fn keep_days(&self, project_id: Uuid) -> Option<u32> {
        match self.projects.get(&project_id) {
            Some(policy) if policy.legal_hold => None,
            Some(ProjectPolicy { days: Some(days), .. }) => Some(*days),
            _ => self.default_days,
        }
    }

    /// The project's data older than this goes; None keeps everything.
    pub fn cutoff(&self, project_id: Uuid) -> Option<DateTime<Utc>> {
        self.keep_days(project_id).map(|days| self.read_at - chrono::Duration::days(i64::from(days)))
    }

    /// The projects with a policy of their own and the days each keeps, 0 for forever (a hold):
    /// two arrays for SQL (`unnest($1::uuid[], $2::int[])`), beside [`Policies::default_sql_days`]
    /// for every other project.
    pub fn sql_overrides(&self) -> (Vec<Uuid>, Vec<i32>) {
        self.projects
            .keys()
            .map(|id| (*id, self.keep_days(*id).map_or(0, |days| i32::try_from(days).unwrap_or(i32::MAX))))
            .unzip()
    }

    /// The default in days for SQL, 0 for forever.
    pub fn default_sql_days(&self) -> i32 {
        self.default_days.map_or(0, |days| i32::try_from(days).unwrap_or(i32::MAX))
    }

    /// Whether nothing can be deleted at all: no finite default and no project with finite days.
    pub fn keeps_everything(&self) -> bool {
        self.default_days.is_none() && self.projects.keys().all(|id| self.keep_days(*id).is_none())
    }
}

/// Policies and when they were fetched.
type Fetched = (Instant, Arc<Policies>);

/// Reads the policies from analytics (`services.analytics`, with the service token), every page,
/// and keeps them for [`POLICY_MAX_AGE`] (at most half the round interval).
#[derive(Debug, Clone)]
pub struct RetentionPolicies {
    /// The store's name in metrics and logs (`usage`, `chat`, `files`).
    store: &'static str,
    client: analytics_pb::ingest_service_client::IngestServiceClient<tonic::transport::Channel>,
    token: Option<ServiceToken>,
    schedule: RetentionSchedule,
    cached: Arc<Mutex<Option<Fetched>>>,
    retry_delays: Vec<Duration>,
}

impl RetentionPolicies {
    /// A lazily connecting reader of analytics' policies for `store`, run on `schedule`, which
    /// deletes rows of `kinds` (their `retention_rows_deleted_total` series exist from now on).
    pub fn new(
        common: &CommonConfig,
        store: &'static str,
        kinds: &[&'static str],
        schedule: RetentionSchedule,
    ) -> Result<Self, ServiceError> {
        for kind in kinds {
            metrics::counter!("retention_rows_deleted_total", "store" => store, "kind" => *kind).increment(0);
        }
        let channel = tonic::transport::Endpoint::from_shared(common.services.analytics.clone())
            .map_err(|e| ServiceError::invalid_field("services.analytics", e.to_string()))?
            .connect_timeout(Duration::from_secs(2))
            .timeout(Duration::from_secs(30))
            .connect_lazy();
        let client = analytics_pb::ingest_service_client::IngestServiceClient::new(channel);
        Ok(Self {
            store,
            client,
            token: common.auth.service_token.clone(),
            schedule,
            cached: Arc::default(),
            retry_delays: FETCH_RETRY_DELAYS.to_vec(),
        })
    }

    /// The store's schedule.
    pub fn schedule(&self) -> RetentionSchedule {
        self.schedule
    }

    /// Every project's policy: the copy read less than [`POLICY_MAX_AGE`] (or half an interval)
    /// ago, or a fresh one.
    /// An error when analytics cannot answer: the caller then deletes nothing.
    pub async fn current(&self) -> Result<Arc<Policies>, ServiceError> {
        // Never older than half a round apart, so each round sees changes made before the last.
        let max_age = POLICY_MAX_AGE.min(self.schedule.interval / 2);
        if let Some((at, policies)) = self.cached.lock().ok().and_then(|c| c.clone())
            && at.elapsed() < max_age
        {
            return Ok(policies);
        }
        let policies = Arc::new(self.fetch().await?);
        if let Ok(mut cached) = self.cached.lock() {
            *cached = Some((Instant::now(), Arc::clone(&policies)));
        }
        Ok(policies)
    }

    async fn fetch(&self) -> Result<Policies, ServiceError> {
        let token = self.token.as_ref().ok_or_else(|| ServiceError::unavailable("auth.service_token is not set"))?;
        let read_at = Utc::now();
        let mut projects = HashMap::new();
        let mut page_token = String::new();
        loop {
            let mut request = tonic::Request::new(analytics_pb::ListRetentionPoliciesRequest {
                page_size: PAGE_SIZE,
                page_token: page_token.clone(),
            });
            token.authorize(&mut request)?;
            let page = self
                .client
                .clone()
                .list_retention_policies(request)
                .await
                .map_err(|status| {
                    ServiceError::unavailable(format!("analytics: {:?}: {}", status.code(), status.message()))
                })?
                .into_inner();
            for policy in page.policies {
                let id = Uuid::parse_str(&policy.project_id)
                    .map_err(|_| ServiceError::internal("analytics answered a policy with a malformed project id"))?;
                let days = u32::try_from(policy.days).ok().filter(|days| *days > 0);
                projects.insert(id, ProjectPolicy { days, legal_hold: policy.legal_hold });
            }
            if page.next_page_token.is_empty() || page.next_page_token == page_token {
                break;
            }
            page_token = page.next_page_token;
        }
        Ok(Policies { default_days: self.schedule.default_days, projects, read_at })
    }
}

/// What one kind of row a round deleted, for `retention_rows_deleted_total{store,kind}`.
pub type Deleted = Vec<(&'static str, u64)>;

/// One retention round of the policies' store: reads the policies (trying again a few times,
/// [`FETCH_RETRY_DELAYS`]), runs `apply` with them, and records what it deleted and (on
/// success) `retention_last_run_timestamp_seconds{store}`. Without policies (analytics
/// unreachable) nothing is deleted and the next round tries again.
pub async fn round<F, Fut, E>(policies: &RetentionPolicies, apply: F)
where
    F: FnOnce(Arc<Policies>) -> Fut,
    Fut: Future<Output = Result<Deleted, E>>,
    E: std::fmt::Display,
{
    let store = policies.store;
    let mut delays = policies.retry_delays.iter();
    let current = loop {
        match policies.current().await {
            Ok(current) => break current,
            Err(error) => match delays.next() {
                Some(delay) => tokio::time::sleep(*delay).await,
                None => {
                    tracing::warn!(store, %error, "cannot read retention policies; deleting nothing this round");
                    return;
                }
            },
        }
    };
    match apply(current).await {
        Ok(deleted) => record_round(store, &deleted),
        Err(error) => tracing::warn!(store, %error, "retention round failed; will retry"),
    }
}

/// Records a successful round of `store`'s retention (or of any job that deletes data past its
/// time, such as identity's purge of ended login sessions): `retention_rows_deleted_total
/// {store,kind}` and `retention_last_run_timestamp_seconds{store}`.
pub fn record_round(store: &'static str, deleted: &Deleted) {
    for (kind, rows) in deleted {
        metrics::counter!("retention_rows_deleted_total", "store" => store, "kind" => *kind).increment(*rows);
    }
    if deleted.iter().any(|(_, rows)| *rows > 0) {
        tracing::info!(store, ?deleted, "retention round deleted data past its time");
    }
    metrics::gauge!("retention_last_run_timestamp_seconds", "store" => store).set(Utc::now().timestamp() as f64);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policies(default_days: Option<u32>, projects: &[(Uuid, Option<u32>, bool)]) -> Policies {
        Policies {
            default_days,
            projects: projects
                .iter()
                .map(|(id, days, legal_hold)| (*id, ProjectPolicy { days: *days, legal_hold: *legal_hold }))
                .collect(),
            read_at: Utc::now(),
        }
    }

    #[test]
    fn a_hold_keeps_everything_and_a_project_without_days_uses_the_default() {
        let (short, held, held_short, other) = (Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7(), Uuid::now_v7());
        let p = policies(Some(30), &[(short, Some(1), false), (held, None, true), (held_short, Some(1), true)]);
        assert_eq!(p.keep_days(short), Some(1));
        assert_eq!(p.keep_days(held), None);
        assert_eq!(p.keep_days(held_short), None);
        assert_eq!(p.keep_days(other), Some(30));
        let (ids, days) = p.sql_overrides();
        let by_id: HashMap<Uuid, i32> = ids.into_iter().zip(days).collect();
        assert_eq!(by_id[&short], 1);
        assert_eq!(by_id[&held], 0);
        assert_eq!(p.default_sql_days(), 30);
        assert!(!p.keeps_everything());
        assert!(policies(None, &[(held, None, true)]).keeps_everything());
        assert_eq!(policies(None, &[]).cutoff(other), None);
    }

    /// Never delete with an unknown policy: a round whose policies cannot be read does nothing.
    #[tokio::test]
    async fn a_round_without_policies_deletes_nothing() {
        let mut common = CommonConfig::default();
        // A port nothing listens on: analytics is down.
        let closed = std::net::TcpListener::bind("127.0.0.1:0").expect("a free port");
        common.services.analytics = format!("http://{}", closed.local_addr().expect("address"));
        drop(closed);
        common.auth.service_token = Some(ServiceToken::generate());
        let schedule = RetentionSchedule::new("chat", 1, 60).expect("a schedule");
        let mut policies = RetentionPolicies::new(&common, "chat", &["sessions"], schedule).expect("a reader");
        policies.retry_delays = vec![Duration::from_millis(10)];
        assert!(policies.current().await.is_err(), "no policies without analytics");
        let ran = std::sync::atomic::AtomicBool::new(false);
        round(&policies, |_| async {
            ran.store(true, std::sync::atomic::Ordering::SeqCst);
            Ok::<Deleted, ServiceError>(Vec::new())
        })
        .await;
        assert!(!ran.load(std::sync::atomic::Ordering::SeqCst), "the round deleted with an unknown policy");
    }

    #[test]
    fn settings_out_of_bounds_are_named() {
        assert!(RetentionSchedule::new("chat", 0, 3600).expect("defaults").default_days.is_none());
        let error = RetentionSchedule::new("chat", 3651, 3600).expect_err("too long").to_string();
        assert!(error.contains("chat.default_retention_days"), "{error}");
        let error = RetentionSchedule::new("files", 1, 0).expect_err("no interval").to_string();
        assert!(error.contains("files.retention_interval_secs"), "{error}");
    }
}
