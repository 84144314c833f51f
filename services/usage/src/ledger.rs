//! The ledger: records usage and holds reservations against quotas, keeping PostgreSQL (the
//! truth) and the Redis counters (the fast copy) in step.
//!
//! Protocol. A record or a reservation runs in one PostgreSQL transaction that holds the
//! project's counters lock in shared mode (`pg_advisory_xact_lock_shared`), writes its rows,
//! runs its counters script, and commits only after Redis changed. A rebuild of the counters
//! takes the same lock exclusively, so it waits for every record and reservation in flight
//! and none starts until it is done: whatever it sums from PostgreSQL is exactly what the
//! counters it writes must hold, with no record committing between the sums and the rewrite.
//! A script that finds the counters incomplete (see [`crate::counters`]) answers "rebuild";
//! the transaction rolls back (freeing its shared lock), the rebuild runs, and the whole
//! operation is tried again.
//!
//! Which way errors lean: counting too much. Redis changes before PostgreSQL commits, so a
//! commit that fails after the script ran leaves counters that include a record or reservation
//! PostgreSQL does not have: a reservation's room comes back when it expires (at most an hour),
//! a record's stays counted until its window ends or a rebuild. A script that times out on the
//! client may still have run, with the same effect. A release commits first and gives the room
//! back afterwards, so a failure between the two keeps the room reserved until expiry. Nothing
//! in this module resets a budget: lost counters are rebuilt from PostgreSQL before any decision.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, SubsecRound, Utc};
use rust_decimal::Decimal;
use serde::{Deserialize, Serialize};
use tokio::sync::oneshot;
use uuid::Uuid;

use aimesh_kit::ServiceError;
use aimesh_kit::data::audit::Actor;
use aimesh_kit::data::cache::{CacheSettings, InvalidationBus, TwoLevelCache};
use aimesh_kit::data::outbox::OutboxEvent;
use aimesh_kit::data::redis::Redis;

use crate::catalog::Catalog;
use crate::counters::{CounterSnapshot, Counters, Decision, LimitedSubject, Outcome, ReservationEntry};
use crate::domain::{
    NewReservation, NewUsage, QuotaLimits, QuotaSubject, ReservationActor, Windows, cost_nanos, nanos_to_usd,
};
use crate::error::{Result, UsageError};
use crate::group_commit::{Pending, RecordQueues};
use crate::store::{self, QuotaRow, ReservationRow, Store, UsageRow};

/// How often one operation rebuilds the counters and tries again before giving up.
const MAX_REBUILDS: usize = 3;

/// The quotas of one project, as cached. Staleness after SetQuota/DeleteQuota: none on the
/// replica that made the change, milliseconds elsewhere (the invalidation broadcast), at most
/// 10 s if a replica misses the broadcast, at most 340 s if Redis was unreachable at the change.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProjectQuotas {
    pub quotas: Vec<QuotaRow>,
}

impl ProjectQuotas {
    fn limits_of(&self, subject: QuotaSubject) -> Option<QuotaLimits> {
        self.quotas.iter().find(|q| q.subject().ok() == Some(subject)).map(QuotaRow::limits)
    }
}

/// A reservation the counters accepted.
#[derive(Debug, Clone)]
pub struct GrantedReservation {
    pub reservation: ReservationRow,
    /// Soft limits passed, such as "project tokens_per_day at 85%".
    pub warnings: Vec<String>,
}

/// One line of today's stats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Totals {
    pub requests: i64,
    pub input_tokens: i64,
    pub output_tokens: i64,
    /// 1e-9 USD, each record's cost rounded up.
    pub cost_nanos: i64,
}

impl Totals {
    pub fn cost(&self) -> Decimal {
        nanos_to_usd(self.cost_nanos)
    }
}

/// Today's (UTC) totals of a project.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DayStats {
    /// `2026-11-25`
    pub day: String,
    pub project: Totals,
    pub by_user: BTreeMap<String, Totals>,
    pub by_model: BTreeMap<String, Totals>,
}

/// What became of one record of a batch.
enum BatchOutcome {
    Recorded(Box<UsageRow>),
    /// Its request id was recorded before: the record stored then is the answer.
    Duplicate,
    /// Refused alone (no price, a reservation that is not open); the rest of the batch went on.
    Refused(UsageError),
}

/// The result of one try of an operation.
enum Attempt<T> {
    Done(T),
    Rebuild,
}

/// Records usage, reserves and releases room, reads stats; see the module docs. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Ledger {
    store: Store,
    catalog: Catalog,
    quotas: TwoLevelCache<ProjectQuotas>,
    counters: Counters,
    queues: Arc<RecordQueues>,
}

/// PostgreSQL keeps microseconds: times written are truncated first, so what a call returns is
/// what a later read returns.
fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// Whose quotas a call counts against: the project, the user, and the API key if one was used.
fn subjects(user_id: Uuid, api_key_id: Option<Uuid>) -> Vec<QuotaSubject> {
    let mut subjects = vec![QuotaSubject::Project, QuotaSubject::User(user_id)];
    subjects.extend(api_key_id.map(QuotaSubject::ApiKey));
    subjects
}

fn gave_up() -> UsageError {
    ServiceError::unavailable("the usage counters of the project keep disappearing from redis").into()
}

impl Ledger {
    /// A ledger over the usage database and the shared Redis; `bus` carries cache invalidations.
    /// Tests build several over one database to act as replicas.
    pub fn new(database: impl Into<aimesh_kit::data::replicas::Database>, redis: Redis, bus: &InvalidationBus) -> Self {
        let store = Store::new(database);
        let settings = CacheSettings {
            local_ttl: Duration::from_secs(10),
            shared_ttl: Duration::from_secs(300),
            negative_ttl: Duration::from_secs(5),
            local_capacity: 10_000,
        };
        Self {
            catalog: Catalog::new(store.clone(), redis.clone(), bus),
            quotas: TwoLevelCache::new("quotas", "usage", redis.clone(), bus, settings),
            counters: Counters::new(redis),
            queues: Arc::default(),
            store,
        }
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    pub fn catalog(&self) -> &Catalog {
        &self.catalog
    }

    pub fn counters(&self) -> &Counters {
        &self.counters
    }

    // ---- usage records ----

    /// Stores a usage record and counts it, or returns the record stored first for the same
    /// (project, request id) without counting anything again. Concurrent records of a project
    /// share transactions (see [`crate::group_commit`]); each still gets its own answer.
    pub async fn record(&self, usage: NewUsage) -> Result<UsageRow> {
        // Duplicates are found by the claim inside the transaction, so a first record costs no
        // extra query; only when the model cannot be resolved (retired or renamed since the
        // first try) is a stored record looked for first.
        let model = match self.catalog.resolve(&usage.model).await {
            Ok(model) => model,
            Err(error) => {
                return match self.store.claimed_usage(usage.project_id, &usage.request_id).await? {
                    Some(row) => Ok(row),
                    None => Err(error),
                };
            }
        };
        let project_id = usage.project_id;
        let (answer, answered) = oneshot::channel();
        if self.queues.push(Pending { usage, model_id: model.model.id, answer }) {
            // A task of its own: the batch answers other callers too, so it must not stop when
            // this caller goes away.
            let ledger = self.clone();
            tokio::spawn(async move {
                while let Some(batch) = ledger.queues.next_batch(project_id) {
                    ledger.record_batch(project_id, batch).await;
                }
            });
        }
        answered.await.map_err(|_| ServiceError::internal("the usage record was dropped unanswered"))?
    }

    /// Writes a batch of records of one project and answers each. A request id already in the
    /// batch goes back to the queue for the next batch, where the first one's record is its
    /// answer (or, if that was refused, its own try).
    async fn record_batch(&self, project_id: Uuid, batch: Vec<Pending>) {
        let mut seen = HashSet::with_capacity(batch.len());
        let (firsts, repeats): (Vec<Pending>, Vec<Pending>) =
            batch.into_iter().partition(|pending| seen.insert(pending.usage.request_id.clone()));
        let answers = self.write_batch(project_id, &firsts).await;
        for (first, answer) in firsts.into_iter().zip(answers) {
            // A caller that went away needs no answer.
            let _ = first.answer.send(answer);
        }
        self.queues.requeue(project_id, repeats);
    }

    /// One answer per record, in order; a failure of the whole batch (database, Redis) is every
    /// record's answer.
    async fn write_batch(&self, project_id: Uuid, batch: &[Pending]) -> Vec<Result<UsageRow>> {
        let attempt = async {
            for _ in 0..MAX_REBUILDS {
                match self.try_batch(project_id, batch).await? {
                    Attempt::Done(outcomes) => return Ok(outcomes),
                    Attempt::Rebuild => self.rebuild(project_id).await?,
                }
            }
            Err(gave_up())
        };
        let outcomes = match attempt.await {
            Ok(outcomes) => outcomes,
            Err(error) => {
                let error = ServiceError::from(error);
                return batch.iter().map(|_| Err(error.clone().into())).collect();
            }
        };
        let mut answers = Vec::with_capacity(outcomes.len());
        for (pending, outcome) in batch.iter().zip(outcomes) {
            answers.push(match outcome {
                BatchOutcome::Recorded(row) => Ok(*row),
                BatchOutcome::Refused(error) => Err(error),
                // A concurrent duplicate committed first (the claim waited for it): its record stands.
                BatchOutcome::Duplicate => {
                    match self.store.claimed_usage(project_id, &pending.usage.request_id).await {
                        Ok(Some(row)) => Ok(row),
                        Ok(None) => Err(ServiceError::internal("a usage claim without its record").into()),
                        Err(error) => Err(error),
                    }
                }
            });
        }
        answers
    }

    async fn try_batch(&self, project_id: Uuid, batch: &[Pending]) -> Result<Attempt<Vec<BatchOutcome>>> {
        let now = now();
        let ids: Vec<Uuid> = batch.iter().map(|_| Uuid::now_v7()).collect();
        let claims: Vec<store::ClaimRequest<'_>> = batch
            .iter()
            .zip(&ids)
            .map(|(p, &usage_id)| store::ClaimRequest {
                request_id: &p.usage.request_id,
                usage_id,
                request_time: p.usage.request_time,
                model_id: p.model_id,
            })
            .collect();
        let mut tx = self.store.pool().begin().await?;
        let claims = store::claim_records(&mut tx, project_id, &claims).await?;
        let mut outcomes = Vec::with_capacity(batch.len());
        let (mut rows, mut unclaimed, mut settles) = (Vec::new(), Vec::new(), Vec::new());
        for ((pending, id), claim) in batch.iter().zip(ids).zip(claims) {
            let usage = &pending.usage;
            let price = match claim {
                store::RecordClaim::Duplicate => {
                    outcomes.push(BatchOutcome::Duplicate);
                    continue;
                }
                store::RecordClaim::Claimed(price) => price,
            };
            let accepted = match (price, usage.reservation_id) {
                (None, _) => Err(UsageError::NoPrice(usage.request_time)),
                (Some(price), None) => Ok(price),
                (Some(price), Some(reservation_id)) => {
                    let reservation = store::reservation_for_update(&mut tx, reservation_id).await?;
                    match open_reservation(reservation, project_id, &usage.settled_by, now) {
                        Ok(_) => {
                            store::close_reservation(&mut tx, reservation_id, "settled", Some(id), now).await?;
                            settles.push(reservation_id);
                            Ok(price)
                        }
                        Err(error) => Err(error),
                    }
                }
            };
            match accepted {
                Ok(price) => {
                    let row = usage_row(id, usage, pending.model_id, price.price().cost(&usage.tokens), now);
                    outcomes.push(BatchOutcome::Recorded(Box::new(row.clone())));
                    rows.push(row);
                }
                Err(error) => {
                    unclaimed.push(usage.request_id.clone());
                    outcomes.push(BatchOutcome::Refused(error));
                }
            }
        }
        if !unclaimed.is_empty() {
            store::unclaim(&mut tx, project_id, &unclaimed).await?;
        }
        if !rows.is_empty() {
            let events: Vec<OutboxEvent> = rows.iter().map(usage_event).collect();
            store::insert_usage(&mut tx, &rows, &events).await?;
            let counted = counted_usage(&rows);
            if self.counters.record(project_id, now, &settles, &counted).await? == Outcome::Rebuild {
                // Rolled back explicitly, not on drop: the rebuild next needs this shared lock gone.
                tx.rollback().await?;
                return Ok(Attempt::Rebuild);
            }
        }
        tx.commit().await?;
        Ok(Attempt::Done(outcomes))
    }

    // ---- reservations ----

    /// Reserves the estimate against every quota that applies, or refuses naming the first
    /// limit it would exceed (nothing reserved then).
    pub async fn reserve(&self, request: &NewReservation) -> Result<GrantedReservation> {
        let model = self.catalog.resolve(&request.model).await?;
        let at = now();
        let price = model.price_at(at).ok_or(UsageError::NoPrice(at))?.price();
        let cost = price.estimate(request.input_tokens, request.output_tokens);
        let quotas = self.project_quotas(request.project_id).await?;
        let limited: Vec<LimitedSubject> = subjects(request.user_id, request.api_key_id)
            .into_iter()
            .map(|subject| LimitedSubject { subject, limits: quotas.limits_of(subject) })
            .collect();
        for _ in 0..MAX_REBUILDS {
            let now = now();
            let reservation = ReservationRow {
                id: Uuid::now_v7(),
                project_id: request.project_id,
                user_id: request.user_id,
                api_key_id: request.api_key_id,
                maker_user_id: request.maker_user_id,
                model_id: model.model.id,
                tokens: request.input_tokens + request.output_tokens,
                cost,
                cost_nanos: cost_nanos(cost),
                state: "open".to_owned(),
                created_at: now,
                expires_at: now + request.ttl,
            };
            match self.try_reserve(&reservation, &limited).await? {
                Attempt::Done(warnings) => return Ok(GrantedReservation { reservation, warnings }),
                Attempt::Rebuild => self.rebuild(request.project_id).await?,
            }
        }
        Err(gave_up())
    }

    async fn try_reserve(
        &self,
        reservation: &ReservationRow,
        subjects: &[LimitedSubject],
    ) -> Result<Attempt<Vec<String>>> {
        let mut tx = self.store.pool().begin().await?;
        store::lock_counters_shared(&mut tx, reservation.project_id).await?;
        store::insert_reservation(&mut tx, reservation).await?;
        let decision = self
            .counters
            .reserve(
                reservation.project_id,
                reservation.created_at,
                reservation.id,
                reservation.expires_at,
                reservation.tokens,
                reservation.cost_nanos,
                subjects,
            )
            .await?;
        match decision {
            Decision::Granted { warnings } => {
                tx.commit().await?;
                Ok(Attempt::Done(warnings))
            }
            Decision::Refused { limit, used, allowed } => {
                tx.rollback().await?;
                let show = |n: i64| {
                    if limit.ends_with("cost_per_month") {
                        nanos_to_usd(n).normalize().to_string()
                    } else {
                        n.to_string()
                    }
                };
                Err(UsageError::QuotaExceeded { used: show(used), allowed: show(allowed), limit })
            }
            Decision::Rebuild => {
                tx.rollback().await?;
                Ok(Attempt::Rebuild)
            }
        }
    }

    /// Gives an open reservation back, for its maker or a project admin (see
    /// [`ReservationActor`]). Unknown, of another project, expired, settled or released:
    /// NOT_FOUND; someone else's in the project: PERMISSION_DENIED. Nothing changes on either.
    pub async fn release(&self, project_id: Uuid, reservation_id: Uuid, actor: &ReservationActor) -> Result<()> {
        let now = now();
        let mut tx = self.store.pool().begin().await?;
        let reservation = store::reservation_for_update(&mut tx, reservation_id).await?;
        open_reservation(reservation, project_id, actor, now)?;
        store::close_reservation(&mut tx, reservation_id, "released", None, now).await?;
        tx.commit().await?;
        // After the commit (see the module docs): if this fails the room comes back at expiry.
        if let Err(error) = self.counters.release(project_id, now, reservation_id).await {
            tracing::warn!(%error, %reservation_id, "released reservation stays counted until it expires");
        }
        Ok(())
    }

    // ---- quotas ----

    /// The quotas of a project, from the cache.
    pub async fn project_quotas(&self, project_id: Uuid) -> Result<Arc<ProjectQuotas>> {
        let store = self.store.clone();
        let loaded = self
            .quotas
            .get_or_load(&project_id.to_string(), || async move {
                let quotas = store.quotas(project_id).await.map_err(ServiceError::from)?;
                Ok::<_, ServiceError>(Some(ProjectQuotas { quotas }))
            })
            .await?;
        Ok(loaded.unwrap_or_default())
    }

    /// Creates or replaces a subject's quota. Usage so far counts against it at once: the
    /// counters count every subject whether it has a quota or not.
    /// The change is audited as done by `actor`.
    pub async fn set_quota(
        &self,
        project_id: Uuid,
        subject: QuotaSubject,
        limits: &QuotaLimits,
        actor: &Actor,
    ) -> Result<QuotaRow> {
        let row = self.store.upsert_quota(project_id, subject, limits, actor).await?;
        self.quotas_changed(project_id).await;
        Ok(row)
    }

    /// Deletes a subject's quota, audited as done by `actor`.
    pub async fn delete_quota(&self, project_id: Uuid, subject: QuotaSubject, actor: &Actor) -> Result<()> {
        self.store.delete_quota(project_id, subject, actor).await?;
        self.quotas_changed(project_id).await;
        Ok(())
    }

    async fn quotas_changed(&self, project_id: Uuid) {
        self.quotas.invalidate_or_log(&project_id.to_string()).await;
    }

    // ---- stats and counters ----

    /// Today's totals of a project from the live counters (rebuilt first if Redis lost them).
    pub async fn stats(&self, project_id: Uuid) -> Result<DayStats> {
        let now = self.ensure_counters(project_id).await?;
        let snapshot = self.counters.read(project_id, now).await?;
        let mut stats = DayStats { day: now.date_naive().format("%Y-%m-%d").to_string(), ..DayStats::default() };
        for (field, value) in &snapshot.day {
            let Some((kind, subject)) = field.strip_prefix("s:").and_then(|rest| rest.split_once(':')) else {
                continue;
            };
            let totals = match subject.split_once(':') {
                None if subject == "p" => &mut stats.project,
                Some(("u", user)) => stats.by_user.entry(user.to_owned()).or_default(),
                Some(("m", model)) => stats.by_model.entry(model.to_owned()).or_default(),
                _ => continue,
            };
            match kind {
                "r" => totals.requests = *value,
                "i" => totals.input_tokens = *value,
                "o" => totals.output_tokens = *value,
                "c" => totals.cost_nanos = *value,
                _ => {}
            }
        }
        Ok(stats)
    }

    /// Makes sure the project's counters are complete; returns the time they were checked at.
    pub async fn ensure_counters(&self, project_id: Uuid) -> Result<DateTime<Utc>> {
        for _ in 0..MAX_REBUILDS {
            let now = now();
            match self.counters.check(project_id, now).await? {
                Outcome::Done => return Ok(now),
                Outcome::Rebuild => self.rebuild(project_id).await?,
            }
        }
        Err(gave_up())
    }

    /// The project's counters at `now` as PostgreSQL says they should be.
    pub async fn expected_counters(&self, project_id: Uuid, now: DateTime<Utc>) -> Result<CounterSnapshot> {
        let mut conn = self.store.pool().acquire().await?;
        let windows = Windows::at(now);
        let groups = store::usage_groups(&mut conn, project_id, &windows).await?;
        let reservations = store::open_reservations(&mut conn, project_id, now).await?;
        Ok(snapshot_of(&windows, &groups, &reservations))
    }

    /// Rewrites the project's counters from PostgreSQL, holding the counters lock exclusively
    /// so no record or reservation commits between the sums and the rewrite.
    pub async fn rebuild(&self, project_id: Uuid) -> Result<()> {
        let mut tx = self.store.pool().begin().await?;
        store::lock_counters_exclusive(&mut tx, project_id).await?;
        let now = now();
        // Another request may have rebuilt them while this one waited for the lock.
        if self.counters.check(project_id, now).await? == Outcome::Done {
            return Ok(());
        }
        let windows = Windows::at(now);
        let groups = store::usage_groups(&mut tx, project_id, &windows).await?;
        let reservations = store::open_reservations(&mut tx, project_id, now).await?;
        let snapshot = snapshot_of(&windows, &groups, &reservations);
        self.counters.replace(project_id, now, &snapshot).await?;
        tx.commit().await?;
        tracing::info!(%project_id, reservations = reservations.len(), "rebuilt usage counters from postgres");
        Ok(())
    }
}

/// Checks that a reservation exists, belongs to `project_id`, may be closed by `actor` and
/// still holds room at `now`. Another project's is NOT_FOUND, like an unknown id, so ids of
/// other projects cannot be probed; a member learns only that a reservation of their own project
/// is someone else's (PERMISSION_DENIED), not whether it is still open.
fn open_reservation(
    reservation: Option<ReservationRow>,
    project_id: Uuid,
    actor: &ReservationActor,
    now: DateTime<Utc>,
) -> Result<ReservationRow> {
    let not_found = || UsageError::NotFound { what: "reservation", field: "reservation_id" };
    let reservation = reservation.filter(|r| r.project_id == project_id).ok_or_else(not_found)?;
    if !actor.may_close(reservation.maker_user_id, reservation.api_key_id) {
        return Err(UsageError::forbidden(
            "only whoever made the reservation, or a project admin, may release or settle it",
        ));
    }
    if reservation.state != "open" || reservation.expires_at <= now {
        return Err(not_found());
    }
    Ok(reservation)
}

/// The counters `windows` must hold for these records and open reservations; the same sums the
/// scripts add up one call at a time.
fn snapshot_of(windows: &Windows, groups: &[store::UsageGroup], reservations: &[ReservationRow]) -> CounterSnapshot {
    let mut s = CounterSnapshot::default();
    for g in groups {
        count_usage(&mut s, g);
    }
    for r in reservations {
        let held = Windows::at(r.created_at);
        let subjects = subjects(r.user_id, r.api_key_id);
        for subject in &subjects {
            let f = subject.counter_field();
            if held.day == windows.day {
                CounterSnapshot::add(&mut s.day, format!("t:{f}"), r.tokens);
            }
            if held.month == windows.month {
                CounterSnapshot::add(&mut s.month, format!("c:{f}"), r.cost_nanos);
            }
            if held.minute == windows.minute {
                CounterSnapshot::add(&mut s.minute, format!("r:{f}"), 1);
                CounterSnapshot::add(&mut s.minute, format!("t:{f}"), r.tokens);
            }
        }
        s.reservations.push((
            r.id,
            ReservationEntry::new(r.tokens, r.cost_nanos, r.created_at, &subjects),
            r.expires_at,
        ));
    }
    s
}

/// What records accepted now add to the counters (public for the bench's floor, which runs the
/// counters script the way a record does).
pub fn counted_usage(rows: &[UsageRow]) -> CounterSnapshot {
    let mut counted = CounterSnapshot::default();
    for row in rows {
        let group = store::UsageGroup {
            user_id: row.user_id,
            api_key_id: row.api_key_id,
            model_id: row.model_id,
            in_day: true,
            in_minute: true,
            requests: 1,
            input_tokens: row.input_tokens,
            output_tokens: row.output_tokens,
            total_tokens: row.total_tokens,
            cost_nanos: cost_nanos(row.cost),
        };
        count_usage(&mut counted, &group);
    }
    counted
}

/// Adds a group of records to the counters as they are held: quota counters per subject, stats
/// per project, user and model. Records count in the month they were accepted in, and in the
/// day and minute when `g` says so.
fn count_usage(s: &mut CounterSnapshot, g: &store::UsageGroup) {
    for subject in subjects(g.user_id, g.api_key_id) {
        let f = subject.counter_field();
        CounterSnapshot::add(&mut s.month, format!("c:{f}"), g.cost_nanos);
        if g.in_day {
            CounterSnapshot::add(&mut s.day, format!("t:{f}"), g.total_tokens);
        }
        if g.in_minute {
            CounterSnapshot::add(&mut s.minute, format!("r:{f}"), g.requests);
            CounterSnapshot::add(&mut s.minute, format!("t:{f}"), g.total_tokens);
        }
    }
    if g.in_day {
        for f in ["p".to_owned(), format!("u:{}", g.user_id), format!("m:{}", g.model_id)] {
            CounterSnapshot::add(&mut s.day, format!("s:r:{f}"), g.requests);
            CounterSnapshot::add(&mut s.day, format!("s:i:{f}"), g.input_tokens);
            CounterSnapshot::add(&mut s.day, format!("s:o:{f}"), g.output_tokens);
            CounterSnapshot::add(&mut s.day, format!("s:c:{f}"), g.cost_nanos);
        }
    }
}

/// A record accepted at `now` with the id its claim won.
fn usage_row(id: Uuid, usage: &NewUsage, model_id: Uuid, cost: Decimal, now: DateTime<Utc>) -> UsageRow {
    UsageRow {
        id,
        request_id: usage.request_id.clone(),
        project_id: usage.project_id,
        user_id: usage.user_id,
        api_key_id: usage.api_key_id,
        model_id,
        chat_session_id: usage.chat_session_id,
        reservation_id: usage.reservation_id,
        request_type: usage.request_type.as_str().to_owned(),
        input_tokens: usage.tokens.input,
        output_tokens: usage.tokens.output,
        cached_input_tokens: usage.tokens.cached_input,
        total_tokens: usage.tokens.total(),
        cost,
        duration_ms: usage.duration_ms,
        status: usage.status.as_str().to_owned(),
        error_message: usage.error_message.clone(),
        request_time: usage.request_time,
        created_at: now,
    }
}

/// The outbox event of a record: every field, the cost as a decimal string.
pub fn usage_event(row: &UsageRow) -> OutboxEvent {
    let payload = serde_json::json!({
        "id": row.id,
        "request_id": row.request_id,
        "project_id": row.project_id,
        "user_id": row.user_id,
        "api_key_id": row.api_key_id,
        "model_id": row.model_id,
        "chat_session_id": row.chat_session_id,
        "reservation_id": row.reservation_id,
        "request_type": row.request_type,
        "input_tokens": row.input_tokens,
        "output_tokens": row.output_tokens,
        "cached_input_tokens": row.cached_input_tokens,
        "total_tokens": row.total_tokens,
        "cost": row.cost.to_string(),
        "duration_ms": row.duration_ms,
        "status": row.status,
        "error_message": row.error_message,
        "request_time": row.request_time,
        "create_time": row.created_at,
    });
    OutboxEvent::new("usage", "usage.recorded", Some(row.project_id), payload)
}
