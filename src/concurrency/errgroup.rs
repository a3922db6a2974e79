//! A port of Go's `golang.org/x/sync/errgroup` to tokio.
//!
//! A [`Group`] runs tasks (spawned tokio tasks, so they run in parallel like goroutines), remembers
//! the **first error to happen** and, when built with [`Group::with_token`] (Go's `WithContext`),
//! cancels a [`CancellationToken`] on that first error so the other tasks can stop early.
//! [`Group::wait`] waits for **all** tasks and returns that first error.
//!
//! | Go                              | here                                                        |
//! |---------------------------------|-------------------------------------------------------------|
//! | `var g errgroup.Group`          | [`Group::new`]                                              |
//! | `g, ctx := WithContext(parent)` | [`Group::with_token`]`(parent)` → `(group, token)`          |
//! | `g.Go(f)` (blocks at the limit) | [`Group::spawn`]`(fut).await` (waits for a free slot)       |
//! | `g.TryGo(f) bool`               | [`Group::try_spawn`]`(fut) -> bool`                         |
//! | `g.SetLimit(n)`, `n < 0` = none | [`Group::set_limit`]`(Some(n))`, `None` = no limit          |
//! | `g.Wait() error`                | [`Group::wait`]`().await -> Result<(), E>`                  |
//!
//! Rules, and where they deliberately differ from Go:
//! - **Limit.** `spawn` waits for a free slot; `try_spawn` returns `false` instead. Changing the
//!   limit while tasks run returns [`LimitError::TasksRunning`] (Go panics). A limit of 0 means
//!   nothing can start: `try_spawn` returns `false` and `spawn` returns [`SpawnError::ZeroLimit`]
//!   at once, where Go's `Go` would block forever.
//! - **Cancellation.** The token is cancelled by the first failure (error or panic) and when `wait`
//!   returns, as Go cancels its context. Tasks are *not* aborted by an error: like goroutines they
//!   are expected to watch the token. `spawn` after a failure still starts the task (Go does too);
//!   callers that dispatch in a loop check [`CancellationToken::is_cancelled`] first.
//! - **Panics.** A panicking task is a bug, not an error value: the panic is caught, counts as the
//!   group's first failure (the token is cancelled so siblings stop), and `wait` re-raises it with
//!   [`std::panic::resume_unwind`] once every task has finished. A panic wins over an error.
//!   (In Go a panicking goroutine takes the whole process down.)
//! - **No leaks.** Tasks live in a [`JoinSet`]: dropping the group (or the future of `wait`)
//!   aborts every task still running. Nothing outlives the group.
//! - Tasks cannot spawn into their own group (Go allows `g.Go` from inside a goroutine); the group
//!   is owned by the dispatching code, which is how Rust keeps the ownership of tasks clear.

use std::any::Any;
use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use futures_util::FutureExt as _;
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Why [`Group::spawn`] could not start a task.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum SpawnError {
    /// The group's limit is 0, so no task can ever start (Go's `Go` would block forever).
    #[error("errgroup limit is 0: no task can start")]
    ZeroLimit,
}

/// Why [`Group::set_limit`] refused to change the limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LimitError {
    /// The limit can only change while no task is running (Go panics here).
    #[error("errgroup limit cannot change while {0} task(s) are running")]
    TasksRunning(usize),
}

/// The first failure of the group: an error value or a caught panic.
enum Failure<E> {
    Error(E),
    Panic(Box<dyn Any + Send>),
}

/// State shared between the group and its tasks.
struct Shared<E> {
    first_failure: Mutex<Option<Failure<E>>>,
    token: Option<CancellationToken>,
    /// Tasks started and not yet finished (or aborted).
    running: AtomicUsize,
}

/// Decrements [`Shared::running`] when a task ends, however it ends (also when aborted).
struct RunningGuard<E>(Arc<Shared<E>>);

impl<E> Drop for RunningGuard<E> {
    fn drop(&mut self) {
        self.0.running.fetch_sub(1, Ordering::AcqRel);
    }
}

impl<E> Shared<E> {
    fn fail(&self, failure: Failure<E>) {
        let mut first = self
            .first_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner);
        match (&*first, failure) {
            (None, failure) => *first = Some(failure),
            // A panic is a bug; never let an earlier ordinary error hide it.
            (Some(Failure::Error(_)), Failure::Panic(payload)) => {
                *first = Some(Failure::Panic(payload))
            }
            _ => {}
        }
        drop(first);
        if let Some(token) = &self.token {
            token.cancel();
        }
    }
}

/// A collection of tasks working on subtasks of one job; see the [module docs](self).
pub struct Group<E> {
    tasks: JoinSet<()>,
    shared: Arc<Shared<E>>,
    /// `None`: no limit. The semaphore holds `limit` permits; each running task holds one.
    limit: Option<(usize, Arc<Semaphore>)>,
}

impl<E: Send + 'static> Default for Group<E> {
    fn default() -> Self {
        Self::new()
    }
}

impl<E: Send + 'static> Group<E> {
    /// A group with no limit and no cancellation token (Go's zero `errgroup.Group`).
    pub fn new() -> Self {
        Self::build(None)
    }

    /// A group whose token is a child of `parent`: it is cancelled by the first failure, when
    /// [`wait`](Self::wait) returns, or when `parent` is cancelled (Go's `WithContext`).
    pub fn with_token(parent: &CancellationToken) -> (Self, CancellationToken) {
        let token = parent.child_token();
        (Self::build(Some(token.clone())), token)
    }

    fn build(token: Option<CancellationToken>) -> Self {
        Self {
            tasks: JoinSet::new(),
            shared: Arc::new(Shared {
                first_failure: Mutex::new(None),
                token,
                running: AtomicUsize::new(0),
            }),
            limit: None,
        }
    }

    /// Limits how many tasks run at once; `None` removes the limit.
    ///
    /// # Errors
    /// [`LimitError::TasksRunning`] if any task is still running (finished tasks do not count).
    pub fn set_limit(&mut self, limit: Option<usize>) -> Result<(), LimitError> {
        let running = self.running();
        if running > 0 {
            return Err(LimitError::TasksRunning(running));
        }
        self.limit = limit.map(|n| (n, Arc::new(Semaphore::new(n))));
        Ok(())
    }

    /// Tasks started and not yet finished.
    pub fn running(&self) -> usize {
        self.shared.running.load(Ordering::Acquire)
    }

    /// Starts `task`, first waiting for a free slot if a limit is set (Go's `Go`).
    ///
    /// # Errors
    /// [`SpawnError::ZeroLimit`] if the limit is 0: no slot will ever free up.
    pub async fn spawn<F>(&mut self, task: F) -> Result<(), SpawnError>
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
    {
        let permit = match &self.limit {
            None => None,
            Some((0, _)) => return Err(SpawnError::ZeroLimit),
            Some((_, semaphore)) => match Arc::clone(semaphore).acquire_owned().await {
                Ok(permit) => Some(permit),
                // The semaphore is owned by the group and never closed.
                Err(_closed) => return Err(SpawnError::ZeroLimit),
            },
        };
        self.start(task, permit);
        Ok(())
    }

    /// Starts `task` only if a slot is free right now; returns whether it started (Go's `TryGo`).
    pub fn try_spawn<F>(&mut self, task: F) -> bool
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
    {
        let permit = match &self.limit {
            None => None,
            Some((_, semaphore)) => match Arc::clone(semaphore).try_acquire_owned() {
                Ok(permit) => Some(permit),
                Err(_) => return false,
            },
        };
        self.start(task, permit);
        true
    }

    fn start<F>(&mut self, task: F, permit: Option<OwnedSemaphorePermit>)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
    {
        let shared = Arc::clone(&self.shared);
        shared.running.fetch_add(1, Ordering::AcqRel);
        let guard = RunningGuard(Arc::clone(&shared));
        self.tasks.spawn(async move {
            let _running = guard;
            let outcome = AssertUnwindSafe(task).catch_unwind().await;
            // Free the slot before recording the outcome, as Go's `done` does.
            drop(permit);
            match outcome {
                Ok(Ok(())) => {}
                Ok(Err(err)) => shared.fail(Failure::Error(err)),
                Err(payload) => shared.fail(Failure::Panic(payload)),
            }
        });
    }

    /// The group's cancellation token, if it was built with [`with_token`](Self::with_token).
    pub fn token(&self) -> Option<&CancellationToken> {
        self.shared.token.as_ref()
    }

    /// Waits for every task to finish, cancels the token, and returns the first error.
    ///
    /// # Panics
    /// Re-raises the first panic of any task, after all tasks have finished.
    pub async fn wait(mut self) -> Result<(), E> {
        while let Some(joined) = self.tasks.join_next().await {
            // Tasks catch their own panics and are only aborted when the group is dropped,
            // so a join error here is impossible; record it rather than lose it.
            if let Err(err) = joined
                && let Ok(payload) = err.try_into_panic()
            {
                self.shared.fail(Failure::Panic(payload));
            }
        }
        if let Some(token) = &self.shared.token {
            token.cancel();
        }
        let first = self
            .shared
            .first_failure
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        match first {
            None => Ok(()),
            Some(Failure::Error(err)) => Err(err),
            Some(Failure::Panic(payload)) => std::panic::resume_unwind(payload),
        }
    }
}

impl<E> std::fmt::Debug for Group<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Group")
            .field("tasks", &self.tasks.len())
            .field("limit", &self.limit.as_ref().map(|(n, _)| *n))
            .field("has_token", &self.shared.token.is_some())
            .finish()
    }
}
