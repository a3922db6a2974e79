//! Logging: `tracing` to stderr, human-readable by default or JSON, filtered by `RUST_LOG`
//! (default `info`, with sqlx's per-query logs at `warn`). Colours only on a terminal.
//! Optionally, the same spans are exported over OTLP/gRPC (off unless an endpoint is given).

use std::io::IsTerminal as _;

use opentelemetry::trace::TracerProvider as _;
use opentelemetry_otlp::WithExportConfig as _;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::{EnvFilter, Layer as _};

/// How log lines look.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    #[default]
    Human,
    Json,
}

/// Keeps the OTLP exporter alive; dropping it flushes the spans not yet sent.
#[derive(Debug, Default)]
pub struct Telemetry {
    otlp: Option<SdkTracerProvider>,
}

impl Drop for Telemetry {
    fn drop(&mut self) {
        if let Some(provider) = self.otlp.take()
            && let Err(err) = provider.shutdown()
        {
            eprintln!("warning: could not flush OTLP spans: {err}");
        }
    }
}

/// Installs the global subscriber (a second call, as in tests, keeps the first one); with
/// `otlp_endpoint` (e.g. `http://127.0.0.1:4317`), spans are also exported there over OTLP/gRPC.
/// Must run inside a tokio runtime when an endpoint is given.
///
/// # Errors
/// If the OTLP exporter cannot be built from the endpoint.
pub fn init(format: LogFormat, otlp_endpoint: Option<&str>) -> anyhow::Result<Telemetry> {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info,sqlx=warn"));
    let fmt = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Human => fmt.boxed(),
        LogFormat::Json => fmt.json().boxed(),
    };
    let provider = otlp_endpoint.map(otlp_provider).transpose()?;
    let otel = provider
        .as_ref()
        .map(|p| tracing_opentelemetry::layer().with_tracer(p.tracer("user-rpc")));
    let _already_set = tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init();
    Ok(Telemetry { otlp: provider })
}

fn otlp_provider(endpoint: &str) -> anyhow::Result<SdkTracerProvider> {
    let exporter = opentelemetry_otlp::SpanExporter::builder()
        .with_tonic()
        .with_endpoint(endpoint)
        .build()?;
    let resource = opentelemetry_sdk::Resource::builder()
        .with_service_name("user-rpc")
        .build();
    Ok(SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource)
        .build())
}

/// Prometheus metrics through the `metrics` facade. Names and buckets mirror go-zero's server
/// metrics; the rest are user-rpc's own.
pub mod metric {
    use std::sync::OnceLock;
    use std::time::Duration;

    use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
    use tonic::Code;

    use crate::server::call::CallInfo;

    /// Request duration histogram, milliseconds (go-zero's `rpc_server_requests_duration_ms`).
    pub const REQUEST_DURATION: &str = "rpc_server_requests_duration_ms";
    /// Calls by numeric gRPC code (go-zero's `rpc_server_requests_code_total`).
    pub const REQUEST_CODES: &str = "rpc_server_requests_code_total";
    /// Users returned by BatchGetUsers.
    pub const IDS_FETCHED: &str = "user_rpc_ids_fetched_total";
    /// Requested ids that had no user.
    pub const MISSING_IDS: &str = "user_rpc_missing_ids_total";
    /// Open pooled database connections.
    pub const POOL_CONNECTIONS: &str = "user_rpc_db_pool_connections";
    /// Idle pooled database connections.
    pub const POOL_IDLE: &str = "user_rpc_db_pool_idle_connections";
    /// Connections idle in the model's stash (the pool counts them as in use).
    pub const STASH_IDLE: &str = "user_rpc_db_stash_idle_connections";
    /// Lookups waiting for a database connection.
    pub const WAITING: &str = "user_rpc_db_waiting_lookups";
    /// The pool's configured maximum.
    pub const POOL_MAX: &str = "user_rpc_db_pool_max_connections";

    /// go-zero's buckets for the request duration, in milliseconds.
    pub const DURATION_BUCKETS_MS: [f64; 12] = [
        1.0, 2.0, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 500.0, 1000.0, 2000.0, 5000.0,
    ];

    /// How often histogram samples are folded into their buckets (the exporter's own default).
    pub const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

    /// The process-wide Prometheus recorder, installed on first use.
    pub fn prometheus() -> &'static PrometheusHandle {
        install_prometheus(UPKEEP_INTERVAL)
    }

    /// [`prometheus`], folding histogram samples every `upkeep` if this call installs it.
    ///
    /// A recorder built with `build_recorder` keeps every histogram sample in memory until the
    /// next render: without a scraper the service grew by about 3 MiB a minute under load
    /// (`scripts/soak.py`, BENCHMARKS.md). A thread of its own runs the upkeep, as the exporter's
    /// `install` would, so the bound holds whether or not anyone scrapes `/metrics`.
    pub fn install_prometheus(upkeep: Duration) -> &'static PrometheusHandle {
        HANDLE.get_or_init(|| {
            let builder = PrometheusBuilder::new();
            let builder = builder
                .set_buckets_for_metric(
                    Matcher::Full(REQUEST_DURATION.to_owned()),
                    &DURATION_BUCKETS_MS,
                )
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            if metrics::set_global_recorder(recorder).is_err() {
                tracing::warn!("a metrics recorder was already installed; /metrics stays empty");
            }
            let kept = handle.clone();
            let spawned = std::thread::Builder::new()
                .name("metrics-upkeep".into())
                .spawn(move || {
                    loop {
                        std::thread::sleep(upkeep);
                        kept.run_upkeep();
                    }
                });
            if let Err(err) = spawned {
                tracing::warn!(error = %err, "no metrics upkeep thread: histograms grow until scraped");
            }
            handle
        })
    }

    /// Records one finished call.
    pub fn record_call(info: CallInfo, code: Code, elapsed: Duration) {
        let labels = [("method", info.method), ("strategy", info.strategy)];
        metrics::histogram!(REQUEST_DURATION, &labels).record(elapsed.as_secs_f64() * 1000.0);
        metrics::counter!(
            REQUEST_CODES,
            "method" => info.method,
            "strategy" => info.strategy,
            "code" => (code as i32).to_string()
        )
        .increment(1);
    }

    /// Records what one successful batch returned.
    pub fn record_batch(strategy: &'static str, fetched: usize, missing: usize) {
        metrics::counter!(IDS_FETCHED, "strategy" => strategy).increment(fetched as u64);
        metrics::counter!(MISSING_IDS, "strategy" => strategy).increment(missing as u64);
    }

    /// Publishes the pool's state (called on every scrape).
    pub fn record_pool(pool: &sqlx::PgPool, stashed: usize, waiting: usize) {
        metrics::gauge!(STASH_IDLE).set(stashed as f64);
        metrics::gauge!(WAITING).set(waiting as f64);
        metrics::gauge!(POOL_CONNECTIONS).set(f64::from(pool.size()));
        metrics::gauge!(POOL_IDLE).set(pool.num_idle() as f64);
        metrics::gauge!(POOL_MAX).set(f64::from(pool.options().get_max_connections()));
    }
}
