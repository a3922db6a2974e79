//! A port of go-zero's `core/mr` (MapReduce) to async Rust.
//!
//! A *generator* feeds items into a [`Source`]; up to `workers` *mappers* run at once, each
//! getting one item, a [`Writer`] and a [`Canceller`]; one *reducer* reads the mappers' outputs
//! from a [`Pipe`] (in completion order) and writes the single final value with an
//! [`OutputWriter`]. The first [`Canceller::cancel`] wins and becomes the call's error.
//!
//! | go-zero                                   | here                                               |
//! |-------------------------------------------|----------------------------------------------------|
//! | `MapReduce(generate, mapper, reducer)`    | [`map_reduce`]                                     |
//! | `MapReduceChan(source, mapper, reducer)`  | [`map_reduce_chan`] (a caller-owned `Receiver`)    |
//! | `MapReduceVoid(generate, mapper, reducer)`| [`map_reduce_void`]                                |
//! | `ForEach(generate, mapper)`               | [`for_each`]                                       |
//! | `Finish(fns...)`, `FinishVoid(fns...)`    | [`finish`], [`finish_void`]                        |
//! | `WithWorkers(n)`, `WithContext(ctx)`      | [`Options::workers`], [`Options::token`], [`Options::deadline`] |
//! | `ErrCancelWithNil`, `ErrReduceNoOutput`   | [`MrError::CancelledWithNoError`], [`MrError::ReducerWroteNothing`] |
//!
//! # Rules
//! - **Workers.** At most `workers` mappers run at once (default 16; 0 becomes 1).
//! - **Cancel.** The first cancel wins; later ones are ignored. `cancel_with_no_error` yields
//!   [`MrError::CancelledWithNoError`]. After a cancel no further item is dispatched, writes are
//!   dropped, the caller gets the error (never a partial value), and the generator, the running
//!   mappers and the reducer are dropped — which stops them.
//! - **Output.** A reducer that writes nothing yields [`MrError::ReducerWroteNothing`]
//!   ([`map_reduce_void`] treats that as success). A reducer that writes twice is a bug and
//!   panics, as in go-zero.
//! - **Panics** in the generator, a mapper or the reducer unwind to the caller of `map_reduce`,
//!   exactly once, and everything else of the call is dropped on the way: no hang, no deadlock,
//!   and nothing more is dispatched.
//! - **Options.** A [`CancellationToken`] or a deadline stops the call promptly with
//!   [`MrError::Cancelled`] or [`MrError::DeadlineExceeded`].
//! - **No leaks.** When a call returns — value, error, cancel or panic — nothing of it is still
//!   running: there is nothing to leak, because nothing was spawned.
//!
//! # Where this deliberately differs from go-zero
//! - **Concurrency without spawning.** go-zero starts a goroutine per item. Here the generator,
//!   mappers and reducer are futures driven together by the caller's task (like
//!   `buffer_unordered`), so they overlap their waiting (I/O) but do not occupy several CPU cores
//!   at once. That is what makes the no-leak and exactly-once-panic rules hold by construction, lets
//!   mappers borrow from the caller, and costs far less per item (see `BENCHMARKS.md`). A mapper
//!   that must burn CPU should hand that part to `tokio::task::spawn_blocking`.
//! - **Distinct errors.** go-zero reports `context.DeadlineExceeded` even for a plain context
//!   cancel; here a cancelled token is [`MrError::Cancelled`] and only a deadline is
//!   [`MrError::DeadlineExceeded`].
//! - **Early return stops everything.** go-zero's `MapReduce` returns as soon as the reducer writes
//!   and leaves mappers draining in the background; `Finish` may return while other functions still
//!   run. Here the call returns when the reducer finishes, and anything left is dropped.
//! - A mapper's [`Writer::write`] never blocks (the pipe is unbounded: at most one value per item in
//!   practice), where go-zero's blocks once `workers` outputs are buffered.

use std::convert::Infallible;
use std::future::{Future, poll_fn};
use std::pin::{Pin, pin};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll};

use futures_util::FutureExt as _;
use futures_util::future::FusedFuture as _;
use futures_util::stream::{FuturesUnordered, Stream, StreamExt as _};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

/// go-zero's default number of concurrent mappers.
pub const DEFAULT_WORKERS: usize = 16;

/// How many generated items may wait in the [`Source`] before the generator waits.
const SOURCE_CAPACITY: usize = 64;

/// How a map-reduce call failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MrError<E> {
    /// A mapper or the reducer called [`Canceller::cancel`] with this error (first call wins).
    #[error("{0}")]
    Failed(E),
    /// [`Canceller::cancel_with_no_error`] was called (go-zero's `ErrCancelWithNil`).
    #[error("map-reduce cancelled with no error")]
    CancelledWithNoError,
    /// The reducer finished without writing a value (go-zero's `ErrReduceNoOutput`).
    #[error("map-reduce reducer wrote no output")]
    ReducerWroteNothing,
    /// The [`Options::token`] was cancelled.
    #[error("map-reduce cancelled")]
    Cancelled,
    /// The [`Options::deadline`] passed.
    #[error("map-reduce deadline exceeded")]
    DeadlineExceeded,
}

impl<E> MrError<E> {
    /// The error a mapper or reducer cancelled with, if that is why the call failed.
    pub fn into_failure(self) -> Option<E> {
        match self {
            Self::Failed(err) => Some(err),
            _ => None,
        }
    }
}

/// Options of a map-reduce call (go-zero's `Option`s).
#[derive(Debug, Clone)]
pub struct Options {
    workers: usize,
    token: Option<CancellationToken>,
    deadline: Option<Instant>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            workers: DEFAULT_WORKERS,
            token: None,
            deadline: None,
        }
    }
}

impl Options {
    /// 16 workers, no token, no deadline.
    pub fn new() -> Self {
        Self::default()
    }

    /// At most `workers` mappers at once; 0 becomes 1 (go-zero's `WithWorkers`).
    pub fn workers(mut self, workers: usize) -> Self {
        self.workers = workers.max(1);
        self
    }

    /// Stop with [`MrError::Cancelled`] when `token` is cancelled (go-zero's `WithContext`).
    pub fn token(mut self, token: CancellationToken) -> Self {
        self.token = Some(token);
        self
    }

    /// Stop with [`MrError::DeadlineExceeded`] at `deadline`.
    pub fn deadline(mut self, deadline: Instant) -> Self {
        self.deadline = Some(deadline);
        self
    }
}

/// Where the generator sends items (go-zero's `source chan<- T`).
#[derive(Debug)]
pub struct Source<T> {
    tx: mpsc::Sender<T>,
}

/// The call has ended (cancelled, failed or finished): the item was not taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("map-reduce source closed: the call has ended")]
pub struct SourceClosed<T>(pub T);

impl<T> Source<T> {
    /// Sends one item, waiting while the source is full.
    ///
    /// # Errors
    /// [`SourceClosed`] with the item once the call has ended; the generator should stop.
    pub async fn send(&self, item: T) -> Result<(), SourceClosed<T>> {
        self.tx.send(item).await.map_err(|e| SourceClosed(e.0))
    }
}

/// Why the call was cancelled, first cause wins.
enum Cause<E> {
    Failed(E),
    NoError,
    Deadline,
}

/// Cancellation state shared by the driver, the cancellers and the writers.
struct Control<E> {
    /// Read on every write and dispatch: set once a cause is recorded or the token fires.
    cancelled: Arc<AtomicBool>,
    cause: Mutex<Option<Cause<E>>>,
    /// Wakes the driver; a child of [`Options::token`] when one was given.
    token: CancellationToken,
}

impl<E> Control<E> {
    fn cancel(&self, cause: Cause<E>) {
        let mut first = self.cause.lock().unwrap_or_else(PoisonError::into_inner);
        if first.is_none() {
            *first = Some(cause);
        }
        drop(first);
        self.cancelled.store(true, Ordering::Release);
        self.token.cancel();
    }

    fn error(&self) -> MrError<E> {
        self.cancelled.store(true, Ordering::Release);
        match self
            .cause
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            Some(Cause::Failed(err)) => MrError::Failed(err),
            Some(Cause::NoError) => MrError::CancelledWithNoError,
            Some(Cause::Deadline) => MrError::DeadlineExceeded,
            // Nobody recorded a cause: the caller's token fired.
            None => MrError::Cancelled,
        }
    }
}

/// Cancels the whole call (go-zero's `cancel func(error)`). Cheap to clone; may be moved to other
/// tasks.
pub struct Canceller<E> {
    control: Arc<Control<E>>,
}

impl<E> Clone for Canceller<E> {
    fn clone(&self) -> Self {
        Self {
            control: Arc::clone(&self.control),
        }
    }
}

impl<E> Canceller<E> {
    /// Cancels the call with `err`; only the first cancel of a call counts.
    pub fn cancel(&self, err: E) {
        self.control.cancel(Cause::Failed(err));
    }

    /// Cancels the call without an error: it fails with [`MrError::CancelledWithNoError`].
    pub fn cancel_with_no_error(&self) {
        self.control.cancel(Cause::NoError);
    }

    /// Whether the call has been cancelled (by anyone, or by its token or deadline).
    pub fn is_cancelled(&self) -> bool {
        self.control.cancelled.load(Ordering::Acquire)
    }

    /// A token cancelled with the call, for mappers that wait on something else meanwhile.
    pub fn token(&self) -> &CancellationToken {
        &self.control.token
    }
}

impl<E> std::fmt::Debug for Canceller<E> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Canceller")
            .field("cancelled", &self.is_cancelled())
            .finish()
    }
}

/// A mapper's output channel to the reducer (go-zero's mapper `Writer`).
#[derive(Debug)]
pub struct Writer<U> {
    /// Weak, so that the pipe ends when the driver says every mapper is done, whatever writers
    /// a mapper kept.
    tx: mpsc::WeakUnboundedSender<U>,
    cancelled: Arc<AtomicBool>,
}

impl<U> Clone for Writer<U> {
    fn clone(&self) -> Self {
        Self {
            tx: self.tx.clone(),
            cancelled: Arc::clone(&self.cancelled),
        }
    }
}

impl<U> Writer<U> {
    /// Hands `value` to the reducer; dropped if the call was cancelled or has ended.
    pub fn write(&self, value: U) {
        if !self.cancelled.load(Ordering::Acquire)
            && let Some(tx) = self.tx.upgrade()
        {
            // Fails only when the call has ended and the pipe is gone: the value is dropped.
            let _ = tx.send(value);
        }
    }
}

/// The stream of mapper outputs the reducer reads, in completion order. It ends once the source
/// is exhausted and every mapper has finished.
#[derive(Debug)]
pub struct Pipe<U> {
    rx: mpsc::UnboundedReceiver<U>,
}

impl<U> Pipe<U> {
    /// The next mapper output, or `None` once all are in.
    pub async fn recv(&mut self) -> Option<U> {
        self.rx.recv().await
    }
}

impl<U> Stream for Pipe<U> {
    type Item = U;

    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<U>> {
        self.rx.poll_recv(cx)
    }
}

struct OutputSlot<V> {
    value: Mutex<Option<V>>,
    written: AtomicBool,
    cancelled: Arc<AtomicBool>,
}

/// The reducer's writer for the single final value (go-zero's reducer `Writer`).
pub struct OutputWriter<V> {
    slot: Arc<OutputSlot<V>>,
}

impl<V> OutputWriter<V> {
    /// Sets the call's result; dropped if the call was cancelled.
    ///
    /// # Panics
    /// If the reducer writes more than once: that is a bug in the reducer (go-zero panics too).
    pub fn write(&self, value: V) {
        if self.slot.written.swap(true, Ordering::AcqRel) {
            panic!("mr: the reducer wrote more than one value");
        }
        if !self.slot.cancelled.load(Ordering::Acquire) {
            *self
                .slot
                .value
                .lock()
                .unwrap_or_else(PoisonError::into_inner) = Some(value);
        }
    }
}

impl<V> std::fmt::Debug for OutputWriter<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("OutputWriter")
            .field("written", &self.slot.written.load(Ordering::Acquire))
            .finish()
    }
}

/// Runs `generate`, `mapper` and `reducer` concurrently and returns what the reducer wrote.
///
/// ```
/// # tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap().block_on(async {
/// use user_rpc::concurrency::mr::{map_reduce, Options};
/// let sum = map_reduce(
///     |source| async move {
///         for i in 1..=3_i64 {
///             if source.send(i).await.is_err() { return; }
///         }
///     },
///     |i, writer, _cancel: user_rpc::concurrency::mr::Canceller<()>| async move { writer.write(i * i) },
///     |mut pipe, writer, _cancel| async move {
///         let mut sum = 0;
///         while let Some(square) = pipe.recv().await { sum += square; }
///         writer.write(sum);
///     },
///     Options::new(),
/// ).await;
/// assert_eq!(sum, Ok(14));
/// # });
/// ```
///
/// # Errors
/// See [`MrError`]: a cancel, the token, the deadline, or a reducer that wrote nothing.
pub async fn map_reduce<T, U, V, E, G, GF, M, MF, R, RF>(
    generate: G,
    mapper: M,
    reducer: R,
    options: Options,
) -> Result<V, MrError<E>>
where
    G: FnOnce(Source<T>) -> GF,
    GF: Future<Output = ()>,
    M: FnMut(T, Writer<U>, Canceller<E>) -> MF,
    MF: Future<Output = ()>,
    R: FnOnce(Pipe<U>, OutputWriter<V>, Canceller<E>) -> RF,
    RF: Future<Output = ()>,
{
    let (tx, rx) = mpsc::channel(SOURCE_CAPACITY);
    let generator = generate(Source { tx });
    drive(rx, generator, mapper, reducer, options).await
}

/// [`map_reduce`] over a caller-owned receiver instead of a generator (go-zero's `MapReduceChan`).
/// The receiver is dropped when the call ends, so the caller's senders then fail instead of
/// blocking forever.
///
/// # Errors
/// As [`map_reduce`].
pub async fn map_reduce_chan<T, U, V, E, M, MF, R, RF>(
    source: mpsc::Receiver<T>,
    mapper: M,
    reducer: R,
    options: Options,
) -> Result<V, MrError<E>>
where
    M: FnMut(T, Writer<U>, Canceller<E>) -> MF,
    MF: Future<Output = ()>,
    R: FnOnce(Pipe<U>, OutputWriter<V>, Canceller<E>) -> RF,
    RF: Future<Output = ()>,
{
    drive(source, std::future::ready(()), mapper, reducer, options).await
}

/// [`map_reduce`] whose reducer produces no value (go-zero's `MapReduceVoid`).
///
/// # Errors
/// As [`map_reduce`], except that writing nothing is success.
pub async fn map_reduce_void<T, U, E, G, GF, M, MF, R, RF>(
    generate: G,
    mapper: M,
    reducer: R,
    options: Options,
) -> Result<(), MrError<E>>
where
    G: FnOnce(Source<T>) -> GF,
    GF: Future<Output = ()>,
    M: FnMut(T, Writer<U>, Canceller<E>) -> MF,
    MF: Future<Output = ()>,
    R: FnOnce(Pipe<U>, Canceller<E>) -> RF,
    RF: Future<Output = ()>,
{
    let result = map_reduce(
        generate,
        mapper,
        |pipe, _writer: OutputWriter<()>, cancel| reducer(pipe, cancel),
        options,
    )
    .await;
    match result {
        Err(MrError::ReducerWroteNothing) => Ok(()),
        other => other,
    }
}

/// Runs `mapper` on every generated item, at most `workers` at once (go-zero's `ForEach`).
///
/// # Errors
/// Only [`MrError::Cancelled`] or [`MrError::DeadlineExceeded`], from the options.
pub async fn for_each<T, G, GF, M, MF>(
    generate: G,
    mut mapper: M,
    options: Options,
) -> Result<(), MrError<Infallible>>
where
    G: FnOnce(Source<T>) -> GF,
    GF: Future<Output = ()>,
    M: FnMut(T) -> MF,
    MF: Future<Output = ()>,
{
    map_reduce_void(
        generate,
        |item, _writer: Writer<()>, _cancel| mapper(item),
        |pipe, _cancel| drain(pipe),
        options,
    )
    .await
}

/// Runs every future at once and returns the first error, dropping the others (go-zero's
/// `Finish`, which instead leaves them running).
///
/// # Errors
/// [`MrError::Failed`] with the first error.
pub async fn finish<E, F, I>(futures: I) -> Result<(), MrError<E>>
where
    I: IntoIterator<Item = F>,
    F: Future<Output = Result<(), E>>,
{
    let futures: Vec<F> = futures.into_iter().collect();
    let workers = futures.len();
    map_reduce_void(
        |source| feed(source, futures),
        |future: F, _writer: Writer<()>, cancel| async move {
            if let Err(err) = future.await {
                cancel.cancel(err);
            }
        },
        |pipe, _cancel| drain(pipe),
        Options::new().workers(workers),
    )
    .await
}

/// Runs every future at once and waits for all of them (go-zero's `FinishVoid`).
pub async fn finish_void<F, I>(futures: I)
where
    I: IntoIterator<Item = F>,
    F: Future<Output = ()>,
{
    let futures: Vec<F> = futures.into_iter().collect();
    let workers = futures.len();
    // No token and no deadline: the only possible error cannot happen.
    let _ = for_each(
        |source| feed(source, futures),
        |future| future,
        Options::new().workers(workers),
    )
    .await;
}

async fn feed<T>(source: Source<T>, items: Vec<T>) {
    for item in items {
        if source.send(item).await.is_err() {
            return;
        }
    }
}

async fn drain<U>(mut pipe: Pipe<U>) {
    while pipe.recv().await.is_some() {}
}

/// The engine behind every entry point: one future that polls the generator, dispatches items to
/// at most `workers` mapper futures, polls them, and polls the reducer, until the reducer finishes
/// or the call is cancelled.
async fn drive<T, U, V, E, GF, M, MF, R, RF>(
    mut source: mpsc::Receiver<T>,
    generator: GF,
    mut mapper: M,
    reducer: R,
    options: Options,
) -> Result<V, MrError<E>>
where
    GF: Future<Output = ()>,
    M: FnMut(T, Writer<U>, Canceller<E>) -> MF,
    MF: Future<Output = ()>,
    R: FnOnce(Pipe<U>, OutputWriter<V>, Canceller<E>) -> RF,
    RF: Future<Output = ()>,
{
    let workers = options.workers;
    let token = options
        .token
        .as_ref()
        .map_or_else(CancellationToken::new, CancellationToken::child_token);
    let cancelled = Arc::new(AtomicBool::new(false));
    let control = Arc::new(Control {
        cancelled: Arc::clone(&cancelled),
        cause: Mutex::new(None),
        token: token.clone(),
    });
    let canceller = Canceller {
        control: Arc::clone(&control),
    };
    let (pipe_tx, pipe_rx) = mpsc::unbounded_channel();
    let writer = Writer {
        tx: pipe_tx.downgrade(),
        cancelled: Arc::clone(&cancelled),
    };
    // The only strong sender: dropped once the source is exhausted and no mapper runs, which ends
    // the reducer's pipe (go-zero closes its collector after all mappers return).
    let mut pipe_tx = Some(pipe_tx);
    let mut source_done = false;
    let slot = Arc::new(OutputSlot {
        value: Mutex::new(None),
        written: AtomicBool::new(false),
        cancelled: Arc::clone(&cancelled),
    });
    let reducer = reducer(
        Pipe { rx: pipe_rx },
        OutputWriter {
            slot: Arc::clone(&slot),
        },
        canceller.clone(),
    );

    let mut generator = pin!(generator.fuse());
    let mut reducer = pin!(reducer);
    let mut on_cancel = pin!(token.cancelled());
    let mut deadline = options
        .deadline
        .map(|at| Box::pin(tokio::time::sleep_until(at)));
    let mut mappers = FuturesUnordered::new();

    poll_fn(|cx| {
        loop {
            if let Some(sleep) = deadline.as_mut()
                && sleep.as_mut().poll(cx).is_ready()
            {
                control.cancel(Cause::Deadline);
                return Poll::Ready(Err(control.error()));
            }
            if on_cancel.as_mut().poll(cx).is_ready() {
                return Poll::Ready(Err(control.error()));
            }
            if !generator.is_terminated() {
                let _ = generator.as_mut().poll(cx);
            }

            let mut progressed = false;
            while !source_done && mappers.len() < workers {
                match source.poll_recv(cx) {
                    Poll::Ready(Some(item)) => {
                        if cancelled.load(Ordering::Acquire) {
                            return Poll::Ready(Err(control.error()));
                        }
                        mappers.push(mapper(item, writer.clone(), canceller.clone()));
                        progressed = true;
                    }
                    Poll::Ready(None) => source_done = true,
                    Poll::Pending => break,
                }
            }
            while let Poll::Ready(Some(())) = mappers.poll_next_unpin(cx) {
                progressed = true;
            }
            if source_done && mappers.is_empty() {
                pipe_tx = None;
            }
            if cancelled.load(Ordering::Acquire) {
                return Poll::Ready(Err(control.error()));
            }

            if reducer.as_mut().poll(cx).is_ready() {
                if cancelled.load(Ordering::Acquire) {
                    return Poll::Ready(Err(control.error()));
                }
                let value = slot
                    .value
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .take();
                return Poll::Ready(value.ok_or(MrError::ReducerWroteNothing));
            }
            // A finished mapper frees a slot (and the generator may have room again): go round
            // once more rather than wait for a wake-up that has already been consumed.
            if !progressed {
                return Poll::Pending;
            }
        }
    })
    .await
}
