//! The one way to do something every so often in the background (purges, garbage collection,
//! flushes, probes), so every loop stops the same way: at its next tick after `stop`, never in
//! the middle of a run.

use std::time::Duration;

use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

/// Runs `task` at once and then every `interval` until `stop` is cancelled; a run in progress
/// finishes first. A run slower than `interval` delays the next one instead of bunching the
/// missed ones together.
pub async fn every<F, Fut>(interval: Duration, stop: &CancellationToken, mut task: F)
where
    F: FnMut() -> Fut,
    Fut: Future<Output = ()>,
{
    let mut tick = tokio::time::interval(interval.max(Duration::from_millis(1)));
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            biased;
            () = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        task().await;
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};

    use super::*;

    /// With the clock paused, time moves only when every task waits: the count is exact.
    #[tokio::test(start_paused = true)]
    async fn runs_at_once_then_every_interval_until_stopped() {
        let runs = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (runs, stop) = (Arc::clone(&runs), stop.clone());
            async move {
                every(Duration::from_secs(10), &stop, || {
                    runs.fetch_add(1, Ordering::SeqCst);
                    async {}
                })
                .await;
            }
        });
        tokio::time::sleep(Duration::from_secs(35)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 4, "at 0, 10, 20 and 30 s");
        stop.cancel();
        task.await.expect("the loop ends when stopped");
        tokio::time::sleep(Duration::from_secs(60)).await;
        assert_eq!(runs.load(Ordering::SeqCst), 4, "no run after the stop");
    }

    #[tokio::test(start_paused = true)]
    async fn a_run_in_progress_finishes_before_the_loop_stops() {
        let finished = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let task = tokio::spawn({
            let (finished, stop) = (Arc::clone(&finished), stop.clone());
            async move {
                every(Duration::from_secs(1), &stop, || {
                    let finished = Arc::clone(&finished);
                    async move {
                        tokio::time::sleep(Duration::from_secs(5)).await;
                        finished.fetch_add(1, Ordering::SeqCst);
                    }
                })
                .await;
            }
        });
        tokio::time::sleep(Duration::from_secs(2)).await;
        stop.cancel();
        task.await.expect("the loop ends when stopped");
        assert_eq!(finished.load(Ordering::SeqCst), 1);
    }
}
