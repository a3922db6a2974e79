//! Behaviour of `concurrency::errgroup`, one test per rule of its module docs.

use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use futures_util::FutureExt as _;
use proptest::prelude::*;
use tokio::sync::oneshot;
use tokio_util::sync::CancellationToken;
use user_rpc::concurrency::errgroup::{Group, LimitError, SpawnError};

use crate::live::Live;

const BOUND: Duration = Duration::from_secs(5);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_the_first_error_to_happen_not_the_first_spawned() {
    let mut g = Group::<&'static str>::new();
    g.spawn(async {
        tokio::time::sleep(Duration::from_millis(100)).await;
        Err("slow, spawned first")
    })
    .await
    .unwrap();
    g.spawn(async { Err("fast, spawned second") })
        .await
        .unwrap();
    assert_eq!(g.wait().await, Err("fast, spawned second"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_waits_for_all_tasks_even_after_an_error() {
    let done = Arc::new(AtomicBool::new(false));
    let mut g = Group::<&'static str>::new();
    g.spawn(async { Err("early") }).await.unwrap();
    let flag = Arc::clone(&done);
    g.spawn(async move {
        tokio::time::sleep(Duration::from_millis(100)).await;
        flag.store(true, Ordering::SeqCst);
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(g.wait().await, Err("early"));
    assert!(
        done.load(Ordering::SeqCst),
        "wait returned before the slow task finished"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wait_returns_ok_when_every_task_succeeds() {
    let mut g = Group::<()>::new();
    for _ in 0..10 {
        g.spawn(async { Ok(()) }).await.unwrap();
    }
    assert_eq!(g.wait().await, Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn first_error_cancels_the_token_so_siblings_stop_early() {
    let (mut g, token) = Group::<&'static str>::with_token(&CancellationToken::new());
    let sibling_saw_cancel = Arc::new(AtomicBool::new(false));
    let saw = Arc::clone(&sibling_saw_cancel);
    let t = token.clone();
    g.spawn(async move {
        tokio::select! {
            () = t.cancelled() => saw.store(true, Ordering::SeqCst),
            () = tokio::time::sleep(BOUND) => {}
        }
        Ok(())
    })
    .await
    .unwrap();
    g.spawn(async { Err("boom") }).await.unwrap();
    let started = tokio::time::Instant::now();
    assert_eq!(g.wait().await, Err("boom"));
    assert!(sibling_saw_cancel.load(Ordering::SeqCst));
    assert!(
        started.elapsed() < Duration::from_secs(1),
        "sibling did not stop early: {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn token_is_cancelled_when_wait_returns_even_without_error() {
    let (mut g, token) = Group::<()>::with_token(&CancellationToken::new());
    g.spawn(async { Ok(()) }).await.unwrap();
    assert!(!token.is_cancelled());
    g.wait().await.unwrap();
    assert!(token.is_cancelled());
}

#[tokio::test]
async fn parent_cancellation_reaches_the_group_token() {
    let parent = CancellationToken::new();
    let (g, token) = Group::<()>::with_token(&parent);
    parent.cancel();
    assert!(token.is_cancelled());
    assert!(g.token().is_some_and(CancellationToken::is_cancelled));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn limit_bounds_the_tasks_running_at_once() {
    let live = Live::new();
    let mut g = Group::<()>::new();
    g.set_limit(Some(3)).unwrap();
    for _ in 0..30 {
        let live = live.clone();
        g.spawn(async move {
            let _guard = live.guard();
            tokio::time::sleep(Duration::from_millis(5)).await;
            Ok(())
        })
        .await
        .unwrap();
    }
    g.wait().await.unwrap();
    assert_eq!(live.peak(), 3, "peak concurrency {}", live.peak());
    assert_eq!(live.started(), 30);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn spawn_waits_for_a_free_slot_at_the_limit() {
    let mut g = Group::<()>::new();
    g.set_limit(Some(1)).unwrap();
    let (release, released) = oneshot::channel::<()>();
    g.spawn(async move {
        let _ = released.await;
        Ok(())
    })
    .await
    .unwrap();
    // The second spawn cannot complete while the first task holds the only slot.
    let blocked = tokio::time::timeout(Duration::from_millis(100), g.spawn(async { Ok(()) })).await;
    assert!(blocked.is_err(), "spawn returned although no slot was free");
    release.send(()).unwrap();
    tokio::time::timeout(BOUND, g.spawn(async { Ok(()) }))
        .await
        .expect("spawn did not get the freed slot")
        .unwrap();
    g.wait().await.unwrap();
}

#[tokio::test]
async fn try_spawn_returns_false_at_the_limit_and_true_below_it() {
    let mut g = Group::<()>::new();
    g.set_limit(Some(1)).unwrap();
    let (release, released) = oneshot::channel::<()>();
    assert!(g.try_spawn(async move {
        let _ = released.await;
        Ok(())
    }));
    let ran = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&ran);
    assert!(!g.try_spawn(async move {
        flag.store(true, Ordering::SeqCst);
        Ok(())
    }));
    release.send(()).unwrap();
    g.wait().await.unwrap();
    assert!(!ran.load(Ordering::SeqCst), "a refused task must not run");
}

#[tokio::test]
async fn changing_the_limit_while_tasks_run_is_an_error() {
    let mut g = Group::<()>::new();
    let (release, released) = oneshot::channel::<()>();
    g.spawn(async move {
        let _ = released.await;
        Ok(())
    })
    .await
    .unwrap();
    assert_eq!(g.set_limit(Some(4)), Err(LimitError::TasksRunning(1)));
    release.send(()).unwrap();
    g.wait().await.unwrap();
}

#[tokio::test]
async fn changing_the_limit_after_tasks_finish_is_allowed() {
    let mut g = Group::<()>::new();
    g.set_limit(Some(2)).unwrap();
    g.spawn(async { Ok(()) }).await.unwrap();
    let until = tokio::time::Instant::now() + BOUND;
    while g.running() > 0 && tokio::time::Instant::now() < until {
        tokio::task::yield_now().await;
    }
    assert_eq!(g.set_limit(None), Ok(()));
}

#[tokio::test]
async fn a_zero_limit_refuses_every_task_instead_of_blocking_forever() {
    let mut g = Group::<()>::new();
    g.set_limit(Some(0)).unwrap();
    assert!(!g.try_spawn(async { Ok(()) }));
    let spawned = tokio::time::timeout(BOUND, g.spawn(async { Ok(()) }))
        .await
        .expect("spawn with limit 0 must not block");
    assert_eq!(spawned, Err(SpawnError::ZeroLimit));
    assert_eq!(g.wait().await, Ok(()));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_is_re_raised_by_wait_after_all_tasks_finish() {
    let sibling_done = Arc::new(AtomicBool::new(false));
    let flag = Arc::clone(&sibling_done);
    let waited = tokio::spawn(async move {
        let mut g = Group::<&'static str>::new();
        g.spawn(async { panic!("task exploded") }).await.unwrap();
        g.spawn(async { Err("plain error") }).await.unwrap();
        g.spawn(async move {
            tokio::time::sleep(Duration::from_millis(100)).await;
            flag.store(true, Ordering::SeqCst);
            Ok(())
        })
        .await
        .unwrap();
        g.wait().await
    });
    let joined = tokio::time::timeout(BOUND, waited)
        .await
        .expect("wait hung after a panic");
    let panic = joined.expect_err("the panic was lost").into_panic();
    assert_eq!(panic.downcast_ref::<&str>(), Some(&"task exploded"));
    assert!(
        sibling_done.load(Ordering::SeqCst),
        "wait re-raised before the other tasks finished"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_panic_cancels_the_token() {
    let (mut g, token) = Group::<()>::with_token(&CancellationToken::new());
    g.spawn(async { panic!("bug") }).await.unwrap();
    tokio::time::timeout(BOUND, token.cancelled())
        .await
        .expect("a panicking task did not cancel the group token");
    let waited = AssertUnwindSafe(g.wait()).catch_unwind().await;
    assert!(waited.is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_group_aborts_every_task() {
    let live = Live::new();
    let mut g = Group::<()>::new();
    for _ in 0..50 {
        let guard = live.guard();
        g.spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
            Ok(())
        })
        .await
        .unwrap();
    }
    assert_eq!(live.alive(), 50);
    drop(g);
    assert_eq!(live.settle().await, 0, "tasks outlived their group");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dropping_the_wait_future_aborts_every_task() {
    let live = Live::new();
    let mut g = Group::<()>::new();
    for _ in 0..10 {
        let guard = live.guard();
        g.spawn(async move {
            let _guard = guard;
            std::future::pending::<()>().await;
            Ok(())
        })
        .await
        .unwrap();
    }
    let timed_out = tokio::time::timeout(Duration::from_millis(50), g.wait()).await;
    assert!(timed_out.is_err());
    assert_eq!(live.settle().await, 0, "tasks outlived a dropped wait");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

    /// Random task counts, limits, errors and panics: `wait` either re-raises a panic, returns
    /// one of the injected errors, or succeeds exactly when nothing failed; never hangs; leaks
    /// nothing.
    #[test]
    fn random_groups_never_hang_leak_or_lose_a_failure(
        tasks in 0usize..300,
        limit in proptest::option::of(1usize..20),
        fail_at in proptest::option::of(0usize..300),
        panic_at in proptest::option::of(0usize..300),
    ) {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let live = Live::new();
        let watched = live.clone();
        let outcome = runtime.block_on(async move {
            let run = tokio::spawn(async move {
                let mut g = Group::<usize>::new();
                g.set_limit(limit).unwrap();
                for i in 0..tasks {
                    let guard = watched.guard();
                    g.spawn(async move {
                        let _guard = guard;
                        tokio::task::yield_now().await;
                        if panic_at == Some(i) { panic!("injected") }
                        if fail_at == Some(i) { return Err(i) }
                        Ok(())
                    }).await.unwrap();
                }
                g.wait().await
            });
            tokio::time::timeout(BOUND, run).await
        });
        let joined = outcome.expect("group hung");
        let panicked = panic_at.is_some_and(|p| p < tasks);
        let failed = fail_at.is_some_and(|f| f < tasks);
        match joined {
            Err(join) => prop_assert!(join.is_panic() && panicked),
            Ok(Err(i)) => prop_assert!(!panicked && failed && Some(i) == fail_at),
            Ok(Ok(())) => prop_assert!(!panicked && !failed),
        }
        prop_assert_eq!(live.alive(), 0);
    }
}
