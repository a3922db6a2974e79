//! Behaviour of `concurrency::mr`, one test per rule of its module docs.

use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures_util::FutureExt as _;
use proptest::prelude::*;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use user_rpc::concurrency::mr::{
    Canceller, MrError, Options, Pipe, Source, Writer, finish, finish_void, for_each, map_reduce,
    map_reduce_chan, map_reduce_void,
};

use crate::live::Live;

const BOUND: Duration = Duration::from_secs(5);

async fn numbers(source: Source<u64>, n: u64) {
    for i in 0..n {
        if source.send(i).await.is_err() {
            return;
        }
    }
}

async fn collect<U>(mut pipe: Pipe<U>) -> Vec<U> {
    let mut all = Vec::new();
    while let Some(value) = pipe.recv().await {
        all.push(value);
    }
    all
}

/// Runs `future` bounded by [`BOUND`] and catches a panic, so a failing test reports instead of
/// hanging the suite.
async fn bounded<F: Future>(future: F) -> std::thread::Result<F::Output> {
    tokio::time::timeout(BOUND, AssertUnwindSafe(future).catch_unwind())
        .await
        .expect("map-reduce call hung")
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    payload
        .downcast_ref::<&str>()
        .map(ToString::to_string)
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_default()
}

#[tokio::test]
async fn go_zeros_example_squares_then_sums() {
    let sum = map_reduce(
        |source| numbers(source, 3),
        |i, writer, _cancel: Canceller<()>| async move { writer.write(i * i) },
        |pipe, writer, _cancel| async move { writer.write(collect(pipe).await.iter().sum::<u64>()) },
        Options::new(),
    )
    .await;
    assert_eq!(sum, Ok(5));
}

#[tokio::test(start_paused = true)]
async fn results_reach_the_reducer_in_completion_order() {
    let order = map_reduce(
        |source| numbers(source, 5),
        // Item 0 finishes last, item 4 first.
        |i, writer, _cancel: Canceller<()>| async move {
            tokio::time::sleep(Duration::from_millis(10 * (5 - i))).await;
            writer.write(i);
        },
        |pipe, writer, _cancel| async move { writer.write(collect(pipe).await) },
        Options::new(),
    )
    .await;
    assert_eq!(order, Ok(vec![4, 3, 2, 1, 0]));
}

#[tokio::test(start_paused = true)]
async fn at_most_workers_mappers_run_at_once() {
    for (workers, expected_peak) in [(1, 1), (4, 4), (16, 16), (0, 1)] {
        let live = Live::new();
        let result = map_reduce_void(
            |source| numbers(source, 100),
            |_, _writer: Writer<()>, _cancel: Canceller<()>| {
                let guard = live.guard();
                async move {
                    let _guard = guard;
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
            },
            |pipe, _cancel| async move {
                collect(pipe).await;
            },
            Options::new().workers(workers),
        )
        .await;
        assert_eq!(result, Ok(()));
        assert_eq!(live.peak(), expected_peak, "workers({workers})");
        assert_eq!(live.started(), 100);
    }
}

#[tokio::test(start_paused = true)]
async fn the_first_cancel_wins_and_later_ones_are_ignored() {
    let result = map_reduce(
        |source| numbers(source, 3),
        |i, _writer: Writer<()>, cancel| async move {
            tokio::time::sleep(Duration::from_millis(10 * (i + 1))).await;
            cancel.cancel(format!("mapper {i}"));
            cancel.cancel(format!("mapper {i} again"));
        },
        |pipe, writer, _cancel| async move { writer.write(collect(pipe).await) },
        Options::new(),
    )
    .await;
    assert_eq!(result, Err(MrError::Failed("mapper 0".to_string())));
}

#[tokio::test]
async fn after_cancel_no_new_item_is_dispatched_and_the_generator_stops() {
    let mappers = Live::new();
    let generator = Live::new();
    let generated = Arc::new(Mutex::new(0_u64));
    let counter = Arc::clone(&generated);
    let gen_guard = generator.guard();
    let result = bounded(map_reduce(
        move |source| async move {
            let _guard = gen_guard;
            for i in 0..1_000_000_u64 {
                if source.send(i).await.is_err() {
                    return;
                }
                *counter.lock().unwrap() += 1;
            }
        },
        |i, _writer: Writer<()>, cancel| {
            let guard = mappers.guard();
            async move {
                let _guard = guard;
                tokio::task::yield_now().await;
                if i == 10 {
                    cancel.cancel("enough");
                }
            }
        },
        |pipe, writer, _cancel| async move { writer.write(collect(pipe).await) },
        Options::new().workers(4),
    ))
    .await
    .unwrap();
    assert_eq!(result, Err(MrError::Failed("enough")));
    // Item 10 is dispatched with at most 3 others still running; nothing after the cancel.
    assert!(
        mappers.started() <= 14,
        "{} mappers started after a cancel at item 10",
        mappers.started()
    );
    assert!(
        *generated.lock().unwrap() < 200,
        "generator ran on: {}",
        generated.lock().unwrap()
    );
    assert_eq!(generator.alive(), 0, "the generator outlived the call");
    assert_eq!(mappers.alive(), 0, "a mapper outlived the call");
}

#[tokio::test]
async fn cancel_with_no_error_yields_a_distinct_error() {
    let result = map_reduce(
        |source| numbers(source, 10),
        |_, _writer: Writer<()>, cancel: Canceller<()>| async move { cancel.cancel_with_no_error() },
        |pipe, writer, _cancel| async move { writer.write(collect(pipe).await) },
        Options::new(),
    )
    .await;
    assert_eq!(result, Err(MrError::CancelledWithNoError));
}

#[tokio::test]
async fn the_reducer_can_cancel_too() {
    let result: Result<(), _> = map_reduce(
        |source| numbers(source, 10),
        |i, writer, _cancel| async move { writer.write(i) },
        |mut pipe, _writer, cancel| async move {
            if pipe.recv().await.is_some() {
                cancel.cancel("reducer says no");
            }
        },
        Options::new(),
    )
    .await;
    assert_eq!(result, Err(MrError::Failed("reducer says no")));
}

#[tokio::test]
async fn the_caller_gets_the_error_never_a_partial_value() {
    // The reducer writes what it has after the cancel: that partial value must not come back.
    let result = map_reduce(
        |source| numbers(source, 10),
        |i, writer, cancel| async move {
            writer.write(i);
            if i == 5 {
                cancel.cancel("mapper failed");
            }
        },
        |mut pipe, writer, cancel| async move {
            let mut seen = Vec::new();
            while let Some(i) = pipe.recv().await {
                seen.push(i);
                if cancel.is_cancelled() {
                    break;
                }
            }
            writer.write(seen);
        },
        Options::new().workers(1),
    )
    .await;
    assert_eq!(result, Err(MrError::Failed("mapper failed")));
}

#[tokio::test]
async fn writes_after_cancel_are_dropped() {
    // A mapper leaves its writer behind; the reducer cancels, writes through that writer, and
    // looks at the pipe at once: the write must not arrive.
    let stash: Arc<Mutex<Option<Writer<u64>>>> = Arc::default();
    let mapper_stash = Arc::clone(&stash);
    let seen_after_cancel = Arc::new(Mutex::new(None));
    let seen = Arc::clone(&seen_after_cancel);
    let result: Result<(), _> = bounded(map_reduce(
        |source| numbers(source, 2),
        // Item 1 never finishes, so the pipe stays open: only the cancel can drop the write.
        move |i, writer, _cancel: Canceller<&str>| {
            if i == 0 {
                *mapper_stash.lock().unwrap() = Some(writer);
            }
            async move {
                if i == 1 {
                    std::future::pending::<()>().await;
                }
            }
        },
        |mut pipe, _writer, cancel| async move {
            let writer = loop {
                if let Some(writer) = stash.lock().unwrap().take() {
                    break writer;
                }
                tokio::task::yield_now().await;
            };
            cancel.cancel("stop");
            writer.write(99);
            *seen.lock().unwrap() = pipe.recv().now_or_never();
        },
        Options::new(),
    ))
    .await
    .unwrap();
    assert_eq!(result, Err(MrError::Failed("stop")));
    assert_eq!(
        *seen_after_cancel.lock().unwrap(),
        None,
        "a write after cancel reached the reducer"
    );
}

#[tokio::test]
async fn a_reducer_that_writes_nothing_is_an_error_but_void_is_fine() {
    let result: Result<u64, _> = map_reduce(
        |source| numbers(source, 3),
        |i, writer, _cancel: Canceller<()>| async move { writer.write(i) },
        |pipe, _writer, _cancel| async move {
            collect(pipe).await;
        },
        Options::new(),
    )
    .await;
    assert_eq!(result, Err(MrError::ReducerWroteNothing));

    let void = map_reduce_void(
        |source| numbers(source, 3),
        |i, writer, _cancel: Canceller<()>| async move { writer.write(i) },
        |pipe, _cancel| async move {
            collect(pipe).await;
        },
        Options::new(),
    )
    .await;
    assert_eq!(void, Ok(()));
}

#[tokio::test]
async fn a_reducer_that_writes_twice_panics_loudly() {
    let outcome = bounded(map_reduce(
        |source| numbers(source, 3),
        |i, writer, _cancel: Canceller<()>| async move { writer.write(i) },
        |pipe, writer, _cancel| async move {
            let all = collect(pipe).await;
            writer.write(all.clone());
            writer.write(all);
        },
        Options::new(),
    ))
    .await;
    let payload = outcome.expect_err("a second write went unnoticed");
    assert!(
        panic_text(&*payload).contains("more than one value"),
        "{}",
        panic_text(&*payload)
    );
}

#[tokio::test]
async fn a_panic_in_the_generator_reaches_the_caller() {
    let outcome = bounded(map_reduce(
        |source: Source<u64>| async move {
            let _ = source.send(1).await;
            panic!("generator exploded");
        },
        |i, writer, _cancel: Canceller<()>| async move { writer.write(i) },
        |pipe, writer, _cancel| async move { writer.write(collect(pipe).await) },
        Options::new(),
    ))
    .await;
    assert_eq!(panic_text(&*outcome.unwrap_err()), "generator exploded");
}

#[tokio::test]
async fn a_panic_in_the_reducer_reaches_the_caller() {
    let outcome = bounded(map_reduce(
        |source| numbers(source, 3),
        |i, writer, _cancel: Canceller<()>| async move { writer.write(i) },
        |mut pipe, writer: user_rpc::concurrency::mr::OutputWriter<()>, _cancel| async move {
            let _ = pipe.recv().await;
            let _ = writer;
            panic!("reducer exploded");
        },
        Options::new(),
    ))
    .await;
    assert_eq!(panic_text(&*outcome.unwrap_err()), "reducer exploded");
}

#[tokio::test]
async fn panics_in_many_mappers_reach_the_caller_once_and_stop_dispatch() {
    let mappers = Live::new();
    let outcome = bounded(map_reduce(
        |source| numbers(source, 10_000),
        |i, writer, _cancel: Canceller<()>| {
            let guard = mappers.guard();
            async move {
                let _guard = guard;
                tokio::task::yield_now().await;
                // Every mapper from item 100 on panics: several are ready to panic together.
                assert!(i < 100, "mapper {i} exploded");
                writer.write(i);
            }
        },
        |pipe, writer, _cancel| async move { writer.write(collect(pipe).await) },
        Options::new().workers(16),
    ))
    .await;
    let payload = outcome.expect_err("the panic was lost");
    assert!(panic_text(&*payload).contains("exploded"));
    assert!(
        mappers.started() < 100 + 16 + 1,
        "dispatch went on after a panic: {}",
        mappers.started()
    );
    assert_eq!(mappers.alive(), 0, "a mapper outlived the panic");
}

#[tokio::test]
async fn a_cancelled_token_stops_the_call_promptly() {
    let token = CancellationToken::new();
    let trigger = token.clone();
    tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(50)).await;
        trigger.cancel();
    });
    let started = Instant::now();
    let result = bounded(map_reduce(
        |source| numbers(source, u64::MAX),
        |_, _writer: Writer<()>, _cancel: Canceller<()>| std::future::pending::<()>(),
        |pipe, writer, _cancel| async move { writer.write(collect(pipe).await) },
        Options::new().token(token),
    ))
    .await
    .unwrap();
    assert_eq!(result, Err(MrError::Cancelled));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_deadline_stops_the_call_with_deadline_exceeded() {
    let started = Instant::now();
    let result = bounded(map_reduce(
        |source| numbers(source, u64::MAX),
        |_, _writer: Writer<()>, _cancel: Canceller<()>| std::future::pending::<()>(),
        |pipe, writer, _cancel| async move { writer.write(collect(pipe).await) },
        Options::new().deadline(Instant::now() + Duration::from_millis(50)),
    ))
    .await
    .unwrap();
    assert_eq!(result, Err(MrError::DeadlineExceeded));
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(50) && took < Duration::from_secs(1),
        "took {took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn map_reduce_chan_reads_a_caller_owned_receiver_and_releases_it_on_cancel() {
    let (tx, rx) = mpsc::channel(1);
    let producer = tokio::spawn(async move {
        let mut sent = 0_u64;
        // Without the release this loop would block forever on a full channel.
        while tx.send(sent).await.is_ok() {
            sent += 1;
        }
        sent
    });
    let result: Result<Vec<u64>, _> = map_reduce_chan(
        rx,
        |i, writer, cancel| async move {
            if i == 20 {
                cancel.cancel("stop at 20");
            } else {
                writer.write(i);
            }
        },
        |pipe, writer, _cancel| async move { writer.write(collect(pipe).await) },
        Options::new().workers(2),
    )
    .await;
    assert_eq!(result, Err(MrError::Failed("stop at 20")));
    let sent = tokio::time::timeout(BOUND, producer)
        .await
        .expect("the caller's sender was left blocked")
        .unwrap();
    assert!(sent < 100, "the producer sent {sent} items");
}

#[tokio::test]
async fn map_reduce_chan_collects_everything_when_the_sender_closes() {
    let (tx, rx) = mpsc::channel(8);
    tokio::spawn(async move {
        for i in 1..=100_u64 {
            tx.send(i).await.unwrap();
        }
    });
    let sum = map_reduce_chan(
        rx,
        |i, writer, _cancel: Canceller<()>| async move { writer.write(i) },
        |pipe, writer, _cancel| async move { writer.write(collect(pipe).await.iter().sum::<u64>()) },
        Options::new(),
    )
    .await;
    assert_eq!(sum, Ok(5050));
}

#[tokio::test]
async fn for_each_runs_every_item() {
    let seen = Mutex::new(Vec::new());
    let result = for_each(
        |source| numbers(source, 100),
        |i| {
            let seen = &seen;
            async move { seen.lock().unwrap().push(i) }
        },
        Options::new(),
    )
    .await;
    assert_eq!(result, Ok(()));
    let mut seen = seen.into_inner().unwrap();
    seen.sort_unstable();
    assert_eq!(seen, (0..100).collect::<Vec<_>>());
}

#[tokio::test(start_paused = true)]
async fn finish_returns_the_first_error_and_stops_the_rest() {
    let live = Live::new();
    let completed = Arc::new(Mutex::new(Vec::new()));
    let futures = (0..5_u64).map(|i| {
        let guard = live.guard();
        let completed = Arc::clone(&completed);
        async move {
            let _guard = guard;
            tokio::time::sleep(Duration::from_millis(10 * (i + 1))).await;
            completed.lock().unwrap().push(i);
            if i == 1 {
                Err(format!("job {i}"))
            } else {
                Ok(())
            }
        }
    });
    let result = finish(futures.collect::<Vec<_>>()).await;
    assert_eq!(result, Err(MrError::Failed("job 1".to_string())));
    assert_eq!(live.alive(), 0, "a job outlived finish");
    // Jobs 2..5 were still sleeping when job 1 failed: they were dropped, not run to the end.
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(*completed.lock().unwrap(), vec![0, 1]);
}

#[tokio::test(start_paused = true)]
async fn finish_runs_all_at_once_and_finish_void_waits_for_all() {
    let started = Instant::now();
    let ok = finish((0..10).map(|_| async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Ok::<(), ()>(())
    }))
    .await;
    assert_eq!(ok, Ok(()));
    // Ten 100 ms jobs in about 100 ms: they ran concurrently.
    assert!(
        started.elapsed() < Duration::from_millis(150),
        "{:?}",
        started.elapsed()
    );

    let done = Mutex::new(0);
    finish_void((0..10).map(|_| async {
        tokio::time::sleep(Duration::from_millis(10)).await;
        *done.lock().unwrap() += 1;
    }))
    .await;
    assert_eq!(done.into_inner().unwrap(), 10);
}

#[derive(Debug, Clone, Copy)]
enum PanicAt {
    Nowhere,
    Generator(u64),
    Mapper(u64),
    Reducer(u64),
}

fn panic_at() -> impl Strategy<Value = PanicAt> {
    prop_oneof![
        Just(PanicAt::Nowhere),
        (0u64..3000).prop_map(PanicAt::Generator),
        (0u64..3000).prop_map(PanicAt::Mapper),
        (0u64..3000).prop_map(PanicAt::Reducer),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

    /// Thousands of items, random worker counts, random panics in the generator, a mapper or the
    /// reducer: either the panic reaches the caller or the exact sum comes back; never a hang,
    /// never a leaked mapper or generator.
    #[test]
    fn random_calls_return_the_exact_result_or_the_panic_never_hang_or_leak(
        items in 0u64..3000,
        workers in 0usize..40,
        at in panic_at(),
        multi_thread in any::<bool>(),
    ) {
        let runtime = if multi_thread {
            tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()
        } else {
            tokio::runtime::Builder::new_current_thread().enable_all().build()
        }
        .unwrap();
        let live = Live::new();
        let outcome = runtime.block_on(bounded(async {
            let gen_guard = live.guard();
            map_reduce(
                move |source: Source<u64>| async move {
                    let _guard = gen_guard;
                    for i in 0..items {
                        if matches!(at, PanicAt::Generator(p) if p == i) { panic!("generator") }
                        if source.send(i).await.is_err() { return }
                    }
                },
                |i, writer, _cancel: Canceller<()>| {
                    let guard = live.guard();
                    async move {
                        let _guard = guard;
                        if i % 7 == 0 { tokio::task::yield_now().await }
                        if matches!(at, PanicAt::Mapper(p) if p == i) { panic!("mapper") }
                        writer.write(i);
                    }
                },
                |mut pipe, writer, _cancel| async move {
                    let (mut sum, mut n) = (0u64, 0u64);
                    while let Some(i) = pipe.recv().await {
                        if matches!(at, PanicAt::Reducer(p) if p == n) { panic!("reducer") }
                        sum += i;
                        n += 1;
                    }
                    writer.write(sum);
                },
                Options::new().workers(workers),
            )
            .await
        }));
        let panics = match at {
            PanicAt::Nowhere => false,
            PanicAt::Generator(p) | PanicAt::Mapper(p) | PanicAt::Reducer(p) => p < items,
        };
        match outcome {
            Ok(sum) => {
                prop_assert!(!panics, "an injected panic was lost");
                prop_assert_eq!(sum, Ok(items * items.saturating_sub(1) / 2));
            }
            Err(_) => prop_assert!(panics, "a panic nobody injected"),
        }
        prop_assert_eq!(live.alive(), 0, "leaked futures");
    }
}
