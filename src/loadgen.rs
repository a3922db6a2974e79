//! The load generator behind `user-rpc bench` and `user-rpc demo`: N concurrent callers send
//! BatchGetUsers of B random ids for a duration (or a number of requests), one strategy after
//! another, and each strategy gets requests/s, users/s, latency percentiles (HdrHistogram) and
//! errors by status code.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;
use indicatif::{ProgressBar, ProgressStyle};
use rand::Rng as _;
use serde::Serialize;
use tonic::transport::Channel;

use crate::pb::{self, Strategy};

/// The answer of BatchGetUsers as the load generator reads it: how many users came back, each
/// one skipped rather than decoded. pgbench does not build objects from its rows either; the
/// generator shares the machine with the server under test, and decoding 100 users per answer
/// was its main cost (BENCHMARKS.md).
#[derive(Clone, PartialEq, prost::Message)]
struct CountedUsers {
    #[prost(message, repeated, tag = "1")]
    users: Vec<Skipped>,
}

/// A `User` whose fields are skipped.
#[derive(Clone, Copy, PartialEq, prost::Message)]
struct Skipped {}

const BATCH_GET_USERS: &str = "/user.v1.UserService/BatchGetUsers";

/// Calls BatchGetUsers and returns how many users came back.
async fn batch_get_users(
    grpc: &mut tonic::client::Grpc<Channel>,
    request: tonic::Request<pb::BatchGetUsersRequest>,
) -> Result<usize, tonic::Status> {
    grpc.ready()
        .await
        .map_err(|err| tonic::Status::unavailable(format!("connection not ready: {err}")))?;
    let codec = tonic_prost::ProstCodec::<pb::BatchGetUsersRequest, CountedUsers>::default();
    let path = http::uri::PathAndQuery::from_static(BATCH_GET_USERS);
    let answer = grpc.unary(request, path, codec).await?;
    Ok(answer.into_inner().users.len())
}

/// Callers that share one HTTP/2 connection; more callers open more connections, as a fleet
/// of clients would.
const CALLERS_PER_CONNECTION: usize = 8;

/// What to run.
#[derive(Debug, Clone)]
pub struct LoadOptions {
    /// `http://host:port` of the server, or `https://` with `ca_cert`.
    pub addr: String,
    /// The CA that signed the server's certificate, for an `https://` address.
    pub ca_cert: Option<std::path::PathBuf>,
    pub concurrency: usize,
    /// Stop after this long...
    pub duration: Duration,
    /// ...or after this many requests per strategy, whichever comes first.
    pub requests: Option<u64>,
    pub batch: usize,
    /// Ids are drawn from `1..=max_id`.
    pub max_id: i64,
    /// Share of ids replaced by ids that do not exist (0.0 to 1.0).
    pub missing_ratio: f64,
    pub strategies: Vec<Strategy>,
    /// Per-call deadline.
    pub timeout: Duration,
    /// Show a progress bar.
    pub progress: bool,
}

/// The outcome for one strategy.
#[derive(Debug, Clone, Serialize)]
pub struct StrategyReport {
    pub strategy: String,
    pub requests: u64,
    pub users: u64,
    pub seconds: f64,
    pub requests_per_second: f64,
    pub users_per_second: f64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    /// Failed calls by gRPC code name.
    pub errors: BTreeMap<String, u64>,
}

/// One caller's tally.
struct Tally {
    latency_us: Histogram<u64>,
    requests: u64,
    users: u64,
    errors: BTreeMap<String, u64>,
}

impl Tally {
    fn new() -> anyhow::Result<Self> {
        Ok(Self {
            // 1 us to 60 s at 3 significant digits.
            latency_us: Histogram::new_with_bounds(1, 60_000_000, 3)?,
            requests: 0,
            users: 0,
            errors: BTreeMap::new(),
        })
    }

    fn merge(&mut self, other: &Self) -> anyhow::Result<()> {
        self.latency_us.add(&other.latency_us)?;
        self.requests += other.requests;
        self.users += other.users;
        for (code, n) in &other.errors {
            *self.errors.entry(code.clone()).or_default() += n;
        }
        Ok(())
    }
}

/// Runs every strategy of `options` in turn against the server and reports each.
///
/// # Errors
/// If the server cannot be reached or the options are unusable.
pub async fn run(options: &LoadOptions) -> anyhow::Result<Vec<StrategyReport>> {
    anyhow::ensure!(options.concurrency > 0, "concurrency must be at least 1");
    anyhow::ensure!(options.batch > 0, "batch must be at least 1");
    anyhow::ensure!(
        options.max_id > 0,
        "max-id must be at least 1 (seed the database first)"
    );
    let connections = options.concurrency.div_ceil(CALLERS_PER_CONNECTION);
    let mut channels = Vec::with_capacity(connections);
    for _ in 0..connections {
        channels.push(connect(&options.addr, options.ca_cert.as_deref()).await?);
    }
    let mut reports = Vec::with_capacity(options.strategies.len());
    for &strategy in &options.strategies {
        reports.push(run_strategy(options, strategy, &channels).await?);
    }
    Ok(reports)
}

async fn connect(addr: &str, ca_cert: Option<&std::path::Path>) -> anyhow::Result<Channel> {
    use anyhow::Context as _;
    crate::client::endpoint(addr, ca_cert)?
        .tcp_nodelay(true)
        .connect()
        .await
        .with_context(|| format!("cannot connect to {addr}"))
}

async fn run_strategy(
    options: &LoadOptions,
    strategy: Strategy,
    channels: &[Channel],
) -> anyhow::Result<StrategyReport> {
    let bar = if options.progress {
        let bar = ProgressBar::new(options.duration.as_millis() as u64).with_style(
            ProgressStyle::with_template("{prefix:>22} {bar:30} {elapsed}/{msg}")
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
        );
        bar.set_prefix(strategy.as_str_name());
        bar.set_message(format!("{:?}", options.duration));
        bar
    } else {
        ProgressBar::hidden()
    };
    let started = Instant::now();
    let stop_at = started + options.duration;
    let mut callers = tokio::task::JoinSet::new();
    for caller in 0..options.concurrency {
        // Exactly `requests` in all: the first `n % concurrency` callers make one more.
        let share = options.requests.map(|n| {
            let callers = options.concurrency as u64;
            n / callers + u64::from((caller as u64) < n % callers)
        });
        let client = tonic::client::Grpc::new(channels[caller % channels.len()].clone());
        let options = options.clone();
        callers.spawn(call_repeatedly(client, options, strategy, stop_at, share));
    }
    let ticker = {
        let bar = bar.clone();
        tokio::spawn(async move {
            loop {
                bar.set_position(started.elapsed().as_millis() as u64);
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        })
    };
    let mut total = Tally::new()?;
    while let Some(joined) = callers.join_next().await {
        total.merge(&joined??)?;
    }
    ticker.abort();
    bar.finish_and_clear();
    let seconds = started.elapsed().as_secs_f64();
    let ms = |us: u64| us as f64 / 1000.0;
    Ok(StrategyReport {
        strategy: strategy.as_str_name().to_owned(),
        requests: total.requests,
        users: total.users,
        seconds,
        requests_per_second: total.requests as f64 / seconds,
        users_per_second: total.users as f64 / seconds,
        p50_ms: ms(total.latency_us.value_at_quantile(0.50)),
        p90_ms: ms(total.latency_us.value_at_quantile(0.90)),
        p99_ms: ms(total.latency_us.value_at_quantile(0.99)),
        max_ms: ms(total.latency_us.max()),
        errors: total.errors,
    })
}

async fn call_repeatedly(
    mut client: tonic::client::Grpc<Channel>,
    options: LoadOptions,
    strategy: Strategy,
    stop_at: Instant,
    requests: Option<u64>,
) -> anyhow::Result<Tally> {
    let mut tally = Tally::new()?;
    let missing_base = options.max_id.saturating_add(1);
    while Instant::now() < stop_at && requests.is_none_or(|n| tally.requests < n) {
        let ids: Vec<i64> = {
            let mut rng = rand::rng();
            (0..options.batch)
                .map(|_| {
                    if options.missing_ratio > 0.0 && rng.random_bool(options.missing_ratio) {
                        missing_base.saturating_add(rng.random_range(0..1_000_000))
                    } else {
                        rng.random_range(1..=options.max_id)
                    }
                })
                .collect()
        };
        let mut request = tonic::Request::new(pb::BatchGetUsersRequest {
            ids,
            strategy: strategy.into(),
            allow_missing: true,
        });
        request.set_timeout(options.timeout);
        let sent = Instant::now();
        let answer = batch_get_users(&mut client, request).await;
        let latency = sent.elapsed().as_micros() as u64;
        tally.latency_us.saturating_record(latency.max(1));
        tally.requests += 1;
        match answer {
            Ok(users) => tally.users += users as u64,
            Err(status) => {
                *tally
                    .errors
                    .entry(format!("{:?}", status.code()))
                    .or_default() += 1;
            }
        }
    }
    Ok(tally)
}

/// The reports as a table for people, best users/s first being easy to spot.
pub fn table(reports: &[StrategyReport]) -> String {
    let mut out = format!(
        "{:<22} {:>9} {:>11} {:>8} {:>8} {:>8} {:>8}  errors\n",
        "strategy", "req/s", "users/s", "p50 ms", "p90 ms", "p99 ms", "max ms"
    );
    for r in reports {
        let errors = if r.errors.is_empty() {
            "-".to_owned()
        } else {
            r.errors
                .iter()
                .map(|(code, n)| format!("{code}={n}"))
                .collect::<Vec<_>>()
                .join(" ")
        };
        out.push_str(&format!(
            "{:<22} {:>9.0} {:>11.0} {:>8.2} {:>8.2} {:>8.2} {:>8.2}  {errors}\n",
            r.strategy,
            r.requests_per_second,
            r.users_per_second,
            r.p50_ms,
            r.p90_ms,
            r.p99_ms,
            r.max_ms
        ));
    }
    out
}
