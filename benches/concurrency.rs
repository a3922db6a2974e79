//! Cost of the concurrency primitives per call and per item, side by side with the plain tokio
//! baselines they should stay close to.
//!
//! The workload is go-zero's own `BenchmarkMapReduce`: square every item in a mapper, sum in the
//! reducer, 16 workers. `cargo bench --bench concurrency` (see BENCHMARKS.md for the figures).

use std::hint::black_box;
use std::sync::{Arc, Mutex};

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use futures_util::StreamExt as _;
use tokio::task::JoinSet;
use user_rpc::concurrency::errgroup::Group;
use user_rpc::concurrency::mr::{Canceller, Options, map_reduce};

const WORKERS: usize = 16;

async fn mr_square_sum(n: i64) -> i64 {
    map_reduce(
        |source| async move {
            for i in 0..n {
                if source.send(i).await.is_err() {
                    return;
                }
            }
        },
        |v, writer, _cancel: Canceller<()>| async move { writer.write(v * v) },
        |mut pipe, writer, _cancel| async move {
            let mut sum = 0;
            while let Some(v) = pipe.recv().await {
                sum += v;
            }
            writer.write(sum);
        },
        Options::new().workers(WORKERS),
    )
    .await
    .unwrap_or_default()
}

async fn errgroup_square_sum(n: i64) -> i64 {
    let sum = Arc::new(Mutex::new(0_i64));
    let mut g = Group::<()>::new();
    let _ = g.set_limit(Some(WORKERS));
    for v in 0..n {
        let sum = Arc::clone(&sum);
        let _ = g
            .spawn(async move {
                *sum.lock().unwrap_or_else(|e| e.into_inner()) += v * v;
                Ok(())
            })
            .await;
    }
    let _ = g.wait().await;
    *sum.lock().unwrap_or_else(|e| e.into_inner())
}

async fn joinset_square_sum(n: i64) -> i64 {
    let mut set = JoinSet::new();
    for v in 0..n {
        set.spawn(async move { v * v });
    }
    let mut sum = 0;
    while let Some(Ok(v)) = set.join_next().await {
        sum += v;
    }
    sum
}

async fn buffer_unordered_square_sum(n: i64) -> i64 {
    futures_util::stream::iter(0..n)
        .map(|v| async move { v * v })
        .buffer_unordered(WORKERS)
        .fold(0, |sum, v| async move { sum + v })
        .await
}

fn bench(c: &mut Criterion) {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap_or_else(|e| panic!("tokio runtime: {e}"));
    let mut group = c.benchmark_group("square_sum");
    // Each sample runs its iterations inside one task on a runtime worker: timing `block_on` per
    // iteration would measure the bench thread's park/unpark (~40 us here), not the primitive.
    macro_rules! bench_fn {
        ($name:expr, $n:expr, $f:ident) => {
            group.bench_with_input(BenchmarkId::new($name, $n), &$n, |b, &n| {
                b.iter_custom(|iters| {
                    runtime.block_on(async move {
                        tokio::spawn(async move {
                            let start = std::time::Instant::now();
                            for _ in 0..iters {
                                black_box($f(black_box(n)).await);
                            }
                            start.elapsed()
                        })
                        .await
                        .unwrap_or_default()
                    })
                })
            });
        };
    }
    for n in [2_i64, 100, 1000] {
        group.throughput(Throughput::Elements(n as u64));
        bench_fn!("mr::map_reduce", n, mr_square_sum);
        bench_fn!("errgroup::Group", n, errgroup_square_sum);
        bench_fn!("baseline/JoinSet", n, joinset_square_sum);
        bench_fn!("baseline/buffer_unordered", n, buffer_unordered_square_sum);
    }
    group.finish();
}

criterion_group!(benches, bench);
criterion_main!(benches);
