//! A service's database with read replicas: where a read may go, and read-your-writes.
//!
//! Each process checks its replicas every `database.replica_check_interval_ms`: it samples the
//! primary's WAL position, then each replica's replay position. A replica's lag is how long ago
//! the primary was last seen at a position the replica has replayed (from the samples of the
//! last `replica_max_lag`), so an idle primary does not make a caught-up replica look old, and
//! a paused, cut off or slow replica ages from the moment the primary moved past it. A replica
//! that did not answer, or lags more than `database.replica_max_lag_ms`, takes no reads.
//!
//! Read-your-writes: after each write RPC (see [`crate::serving::server`]) the primary's WAL
//! position is kept in Redis under the caller's user, for as long as a usable replica could
//! still miss it. A read by that user goes to a replica that had replayed it at its last check,
//! or else to the primary: a caller never reads older than its own last write, and another
//! caller reads at most `replica_max_lag` old.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use fred::interfaces::KeysInterface;
use fred::types::scripts::Script;
use sqlx::PgPool;
use uuid::Uuid;

use crate::config::DatabaseConfig;
use crate::data::redis::{Redis, timed};

/// A position in the primary's write-ahead log, as bytes from its start.
type WalPosition = u64;

/// The primary's WAL position now; on a replica, an error (no WAL is written there).
const PRIMARY_POSITION: &str = "SELECT (pg_current_wal_lsn() - '0/0'::pg_lsn)::bigint";
/// How far a replica has replayed the primary's WAL; NULL on a server that is not a replica.
const REPLAYED_POSITION: &str = "SELECT (pg_last_wal_replay_lsn() - '0/0'::pg_lsn)::bigint";

/// How many times `replica_max_lag` of the primary's positions are kept: lag is measured exactly
/// up to that (the gauge's range); a replica further behind shows the oldest sample's age.
const LAG_HISTORY: u32 = 10;

/// Raises the kept position of a user's last write, never lowers it (two writes of one user
/// may finish in either order on two processes), and renews its lifetime.
const RECORD_WRITE_SCRIPT: &str = r"
local kept = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > kept then
  redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
else
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 1
";

/// A service's database: the primary, which takes every write and every read inside one, and
/// its read replicas, if any, for read-only RPCs. Cheap to clone.
#[derive(Clone, Debug)]
pub struct Database {
    primary: PgPool,
    replicas: Option<Arc<ReadReplicas>>,
}

impl From<PgPool> for Database {
    /// A database without replicas: every read goes to `primary`.
    fn from(primary: PgPool) -> Self {
        Self { primary, replicas: None }
    }
}

impl Database {
    /// `primary` with `replicas` (none: a database without replicas), for `service`'s metrics
    /// and read-your-writes keys.
    pub fn new(
        service: &'static str,
        primary: PgPool,
        replicas: Vec<(String, PgPool)>,
        redis: Redis,
        settings: &DatabaseConfig,
    ) -> Self {
        if replicas.is_empty() {
            return primary.into();
        }
        let replicas = replicas
            .into_iter()
            .map(|(name, pool)| Replica { name, pool, usable: AtomicBool::new(false), replayed: AtomicU64::new(0) })
            .collect();
        let reads = ReadReplicas {
            service,
            primary: primary.clone(),
            replicas,
            redis,
            record_write: Script::from_lua(RECORD_WRITE_SCRIPT),
            max_lag: settings.replica_max_lag(),
            check_interval: settings.replica_check_interval(),
            primary_samples: std::sync::Mutex::new(VecDeque::new()),
            next: AtomicUsize::new(0),
        };
        Self { primary, replicas: Some(Arc::new(reads)) }
    }

    /// The primary's pool: for writes and for reads that must see the latest state.
    pub fn primary(&self) -> &PgPool {
        &self.primary
    }

    /// Whether reads may go elsewhere than the primary.
    pub fn has_replicas(&self) -> bool {
        self.replicas.is_some()
    }

    /// The pool a read-only request of `user` should use: a usable replica that has replayed
    /// that user's last write, else the primary.
    pub async fn reader(&self, user: Uuid) -> PgPool {
        match &self.replicas {
            Some(replicas) => replicas.reader(user).await,
            None => self.primary.clone(),
        }
    }

    /// Notes that `user` has just written, so that their next reads see it (see the module's
    /// doc). Call it after the write committed and before answering.
    pub async fn wrote(&self, user: Uuid) {
        if let Some(replicas) = &self.replicas {
            replicas.wrote(user).await;
        }
    }

    /// Measures every replica once (the service runtime does so every
    /// `replica_check_interval`).
    pub async fn check_replicas(&self) {
        if let Some(replicas) = &self.replicas {
            replicas.check().await;
        }
    }

    /// How often [`Database::check_replicas`] should run; `None` without replicas.
    pub fn replica_check_interval(&self) -> Option<Duration> {
        self.replicas.as_ref().map(|replicas| replicas.check_interval)
    }

    /// Every pool, named for metrics: the primary's, then each replica's.
    pub fn pools(&self) -> Vec<(String, PgPool)> {
        let mut pools = vec![("primary".to_owned(), self.primary.clone())];
        if let Some(replicas) = &self.replicas {
            pools.extend(replicas.replicas.iter().map(|r| (r.name.clone(), r.pool.clone())));
        }
        pools
    }

    /// Closes every pool.
    pub async fn close(&self) {
        for (_, pool) in self.pools() {
            pool.close().await;
        }
    }
}

/// The replicas and what the last check learned of them.
struct ReadReplicas {
    service: &'static str,
    primary: PgPool,
    replicas: Vec<Replica>,
    redis: Redis,
    record_write: Script,
    max_lag: Duration,
    check_interval: Duration,
    /// The primary's WAL position at each check of the last `LAG_HISTORY` x `max_lag`, oldest
    /// first.
    primary_samples: std::sync::Mutex<VecDeque<(Instant, WalPosition)>>,
    /// Round robin over the usable replicas.
    next: AtomicUsize,
}

impl std::fmt::Debug for ReadReplicas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let names: Vec<&str> = self.replicas.iter().map(|r| r.name.as_str()).collect();
        f.debug_struct("ReadReplicas").field("service", &self.service).field("replicas", &names).finish()
    }
}

struct Replica {
    /// `host:port` for metrics and logs (never credentials).
    name: String,
    pool: PgPool,
    /// Answered the last check and lagged at most `max_lag`.
    usable: AtomicBool,
    /// Its replay position at the last check.
    replayed: AtomicU64,
}

impl ReadReplicas {
    async fn reader(&self, user: Uuid) -> PgPool {
        let usable = |replica: &&Replica| replica.usable.load(Ordering::Relaxed);
        if !self.replicas.iter().any(|replica| usable(&replica)) {
            return self.count_read("primary", "no_usable_replica");
        }
        let last_write = match self.last_write(user).await {
            Ok(position) => position,
            // Without the user's last write position, only the primary is sure to hold it.
            Err(error) => {
                tracing::warn!(service = self.service, %error, "cannot read a user's last write position; reading the primary");
                return self.count_read("primary", "redis_unavailable");
            }
        };
        let fresh: Vec<&Replica> =
            self.replicas.iter().filter(usable).filter(|r| r.replayed.load(Ordering::Relaxed) >= last_write).collect();
        if fresh.is_empty() {
            return self.count_read("primary", "own_write_not_replayed");
        }
        let replica = fresh[self.next.fetch_add(1, Ordering::Relaxed) % fresh.len()];
        metrics::counter!("db_reads_total", "database" => self.service, "target" => "replica", "reason" => "usable")
            .increment(1);
        replica.pool.clone()
    }

    fn count_read(&self, target: &'static str, reason: &'static str) -> PgPool {
        metrics::counter!("db_reads_total", "database" => self.service, "target" => target, "reason" => reason)
            .increment(1);
        self.primary.clone()
    }

    fn write_key(&self, user: Uuid) -> String {
        self.redis.key(self.service, &format!("last-write:{user}"))
    }

    async fn last_write(&self, user: Uuid) -> Result<WalPosition, crate::data::redis::RedisError> {
        let kept: Option<u64> = timed("write_position_get", self.redis.pool().get(self.write_key(user))).await?;
        Ok(kept.unwrap_or(0))
    }

    /// How long a write position must be kept: until every replica that may take reads has
    /// replayed it, which is at most `max_lag` plus the staleness of two checks.
    fn write_lifetime(&self) -> Duration {
        self.max_lag + 2 * self.check_interval + Duration::from_secs(1)
    }

    async fn wrote(&self, user: Uuid) {
        let recorded = async {
            let position: i64 = sqlx::query_scalar(PRIMARY_POSITION).fetch_one(&self.primary).await?;
            let lifetime = self.write_lifetime().as_millis().to_string();
            let record = self.record_write.evalsha_with_reload(
                self.redis.pool().next(),
                self.write_key(user),
                vec![position.to_string(), lifetime],
            );
            let _: i64 = timed("write_position_set", record).await?;
            anyhow::Ok(())
        };
        // The write itself succeeded; what is lost is only read-your-writes for this user, and
        // only while a replica is behind, so the caller still gets their answer.
        if let Err(error) = recorded.await {
            metrics::counter!("db_write_positions_lost_total", "database" => self.service).increment(1);
            tracing::warn!(service = self.service, %user, %error, "cannot record a write position; the user's next reads may be older than the write");
        }
    }

    async fn check(&self) {
        let timeout = self.check_interval.max(Duration::from_secs(1));
        let now = Instant::now();
        match tokio::time::timeout(timeout, sqlx::query_scalar::<_, i64>(PRIMARY_POSITION).fetch_one(&self.primary))
            .await
        {
            Ok(Ok(position)) => {
                let mut samples = self.primary_samples.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                samples.push_back((now, position as WalPosition));
                let kept = self.max_lag * LAG_HISTORY;
                while samples.len() > 1 && samples.front().is_some_and(|(at, _)| now.duration_since(*at) > kept) {
                    samples.pop_front();
                }
            }
            Ok(Err(error)) => tracing::debug!(service = self.service, %error, "cannot read the primary's WAL position"),
            Err(_) => tracing::debug!(service = self.service, "reading the primary's WAL position timed out"),
        }
        futures::future::join_all(self.replicas.iter().map(|replica| self.check_replica(replica, timeout))).await;
    }

    async fn check_replica(&self, replica: &Replica, timeout: Duration) {
        let answer = tokio::time::timeout(
            timeout,
            sqlx::query_scalar::<_, Option<i64>>(REPLAYED_POSITION).fetch_one(&replica.pool),
        )
        .await;
        let replayed = match answer {
            Ok(Ok(Some(position))) => position as WalPosition,
            Ok(Ok(None)) => return self.mark_unusable(replica, "the server is not a replica (promoted?)"),
            Ok(Err(error)) => return self.mark_unusable(replica, &error.to_string()),
            Err(_) => return self.mark_unusable(replica, "no answer within the check's timeout"),
        };
        replica.replayed.store(replayed, Ordering::Relaxed);
        let lag = self.lag_of(replayed);
        if let Some(lag) = lag {
            metrics::gauge!("db_replica_lag_seconds", "database" => self.service, "replica" => replica.name.clone())
                .set(lag.as_secs_f64());
        }
        self.set_usable(replica, lag.is_some_and(|lag| lag <= self.max_lag));
    }

    /// How long ago the primary was last seen at a position `replayed` has reached; when no
    /// kept sample is that old, the oldest sample's age, and past the bound whatever that age
    /// (the replica lags at least that much); `None` before the primary answered a check.
    fn lag_of(&self, replayed: WalPosition) -> Option<Duration> {
        let samples = self.primary_samples.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let (oldest, _) = samples.front()?;
        Some(match samples.iter().rev().find(|(_, position)| *position <= replayed) {
            Some((at, _)) => at.elapsed(),
            None => oldest.elapsed().max(self.max_lag + Duration::from_millis(1)),
        })
    }

    fn mark_unusable(&self, replica: &Replica, why: &str) {
        if replica.usable.load(Ordering::Relaxed) {
            tracing::warn!(service = self.service, replica = %replica.name, why, "read replica unusable; its reads go elsewhere");
        }
        self.set_usable(replica, false);
    }

    fn set_usable(&self, replica: &Replica, usable: bool) {
        let was = replica.usable.swap(usable, Ordering::Relaxed);
        if usable && !was {
            tracing::info!(service = self.service, replica = %replica.name, "read replica usable");
        }
        metrics::gauge!("db_replica_usable", "database" => self.service, "replica" => replica.name.clone())
            .set(if usable { 1.0 } else { 0.0 });
    }
}

/// `host:port` of a PostgreSQL URL, for naming a replica without its credentials.
pub fn server_name(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, rest)| rest);
    let rest = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
    rest.split(['/', '?']).next().unwrap_or_default().to_owned()
}

#[cfg(test)]
mod tests {
    use super::server_name;

    #[test]
    fn server_names_carry_no_credentials() {
        assert_eq!(server_name("postgres://user:pw@db-ro:5432/aimesh_chat?sslmode=require"), "db-ro:5432");
        assert_eq!(server_name("postgres://127.0.0.1:55433/x"), "127.0.0.1:55433");
        assert_eq!(server_name("postgresql://a:b@c@h:1"), "h:1");
    }
}
