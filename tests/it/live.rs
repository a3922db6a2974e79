//! Counting live futures and tasks with drop guards, to prove that nothing leaks.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

/// Counts the guards alive: one per future or task under watch.
#[derive(Clone, Default)]
pub struct Live {
    alive: Arc<AtomicUsize>,
    started: Arc<AtomicUsize>,
    peak: Arc<AtomicUsize>,
}

pub struct Guard(Live);

impl Live {
    pub fn new() -> Self {
        Self::default()
    }

    /// A guard to move into the watched future; counts as running until dropped.
    pub fn guard(&self) -> Guard {
        self.started.fetch_add(1, Ordering::SeqCst);
        let now = self.alive.fetch_add(1, Ordering::SeqCst) + 1;
        self.peak.fetch_max(now, Ordering::SeqCst);
        Guard(self.clone())
    }

    pub fn alive(&self) -> usize {
        self.alive.load(Ordering::SeqCst)
    }

    pub fn started(&self) -> usize {
        self.started.load(Ordering::SeqCst)
    }

    /// The most guards alive at once.
    pub fn peak(&self) -> usize {
        self.peak.load(Ordering::SeqCst)
    }

    /// Waits (up to 2 s) for every guard to drop: aborted tasks stop at their next poll.
    pub async fn settle(&self) -> usize {
        let until = tokio::time::Instant::now() + Duration::from_secs(2);
        while self.alive() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        self.alive()
    }
}

impl Drop for Guard {
    fn drop(&mut self) {
        self.0.alive.fetch_sub(1, Ordering::SeqCst);
    }
}
