//! Group commit of usage records: records of one project that arrive while others are being
//! written wait in a queue and go together in the next transaction (one claim statement, one
//! insert, one counters script, one commit). Under load a record costs a share of a
//! transaction instead of a whole one; alone, it goes at once in a batch of one.
//!
//! Per project and replica at most [`MAX_WRITERS`] batches are in flight, each of at most
//! [`MAX_BATCH`] records: the first record that finds fewer writers than that starts one, and a
//! writer takes batches until the queue is empty. What a batch does is the ledger's
//! ([`crate::ledger::Ledger::record`]); this module only queues and hands out.

use std::collections::HashMap;
use std::sync::Mutex;

use tokio::sync::oneshot;
use uuid::Uuid;

use crate::domain::NewUsage;
use crate::error::Result;
use crate::store::UsageRow;

/// Batches of one project written at the same time by one replica.
pub const MAX_WRITERS: usize = 4;
/// Records in one batch: bounded so that one transaction stays short.
pub const MAX_BATCH: usize = 256;

/// A record waiting for its batch, with where its answer goes.
#[derive(Debug)]
pub struct Pending {
    pub usage: NewUsage,
    pub model_id: Uuid,
    pub answer: oneshot::Sender<Result<UsageRow>>,
}

#[derive(Debug, Default)]
struct Queue {
    waiting: Vec<Pending>,
    writers: usize,
}

/// The waiting records of every project of this replica.
#[derive(Debug, Default)]
pub struct RecordQueues {
    projects: Mutex<HashMap<Uuid, Queue>>,
}

impl RecordQueues {
    /// Queues a record. True when the caller must start a writer for its project (which then
    /// calls [`RecordQueues::next_batch`] until it answers `None`).
    pub fn push(&self, pending: Pending) -> bool {
        let mut projects = self.projects.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let queue = projects.entry(pending.usage.project_id).or_default();
        queue.waiting.push(pending);
        let start = queue.writers < MAX_WRITERS;
        if start {
            queue.writers += 1;
        }
        start
    }

    /// Puts records back at the head of the queue, for the next batch of a writer that is
    /// still running (the caller is one).
    pub fn requeue(&self, project_id: Uuid, records: Vec<Pending>) {
        if records.is_empty() {
            return;
        }
        let mut projects = self.projects.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let queue = projects.entry(project_id).or_default();
        queue.waiting.splice(0..0, records);
    }

    /// The next batch for a writer of `project_id`; `None` when nothing waits, and the writer
    /// is then done.
    pub fn next_batch(&self, project_id: Uuid) -> Option<Vec<Pending>> {
        let mut projects = self.projects.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let queue = projects.get_mut(&project_id)?;
        if queue.waiting.is_empty() {
            queue.writers -= 1;
            if queue.writers == 0 {
                projects.remove(&project_id);
            }
            return None;
        }
        let take = queue.waiting.len().min(MAX_BATCH);
        Some(queue.waiting.drain(..take).collect())
    }
}
