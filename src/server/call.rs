//! What every RPC gets from the server, on by default (go-zero's server interceptors):
//! - a **deadline**: the client's `grpc-timeout` if it sent one, else the configured default,
//!   counted from when the request reached the service ([`CallStartLayer`]), so that it fires no
//!   later than tonic's own timer and the client gets DEADLINE_EXCEEDED, not tonic's CANCELLED;
//! - **load shedding**: at most `max_concurrent_calls` at once; one more is refused at once with
//!   RESOURCE_EXHAUSTED instead of queueing without bound;
//! - **panic recovery**: a panicking handler becomes INTERNAL "internal error" (the panic message
//!   goes to the log only) and the server keeps serving;
//! - a **slow-call log** (WARN, with method, strategy, batch size and duration);
//! - **metrics**: `rpc_server_requests_duration_ms` and `rpc_server_requests_code_total`, labelled
//!   like go-zero's (full method, numeric code) plus the strategy.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use futures_util::FutureExt as _;
use tokio::sync::Semaphore;
use tokio::time::Instant;
use tonic::{Code, Status};

use crate::config::Config;
use crate::error::Error;
use crate::telemetry::metric;

/// When the request reached the service, stored in its extensions by [`CallStartLayer`].
#[derive(Debug, Clone, Copy)]
pub struct CallStart(pub Instant);

/// Records [`CallStart`] on every request. Installed inside tonic's own `grpc-timeout` handling,
/// which calls this layer before it starts its timer: a deadline counted from here can only be
/// earlier than tonic's, and tonic polls the handler before its timer, so ours wins.
#[derive(Debug, Clone, Copy, Default)]
pub struct CallStartLayer;

impl<S> tower::Layer<S> for CallStartLayer {
    type Service = CallStartService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        CallStartService { inner }
    }
}

/// See [`CallStartLayer`].
#[derive(Debug, Clone)]
pub struct CallStartService<S> {
    inner: S,
}

impl<S, B> tower::Service<http::Request<B>> for CallStartService<S>
where
    S: tower::Service<http::Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        request.extensions_mut().insert(CallStart(Instant::now()));
        self.inner.call(request)
    }
}

/// What a call is, for logs and metric labels.
#[derive(Debug, Clone, Copy)]
pub struct CallInfo {
    /// The full gRPC method, e.g. `/user.v1.UserService/BatchGetUsers` (go-zero's label).
    pub method: &'static str,
    /// The strategy that runs (`STRATEGY_*`), `none` for GetUser, `invalid` for an unknown one.
    pub strategy: &'static str,
    pub batch_size: usize,
}

/// The per-call safety nets; one per server, shared by every handler.
#[derive(Debug, Clone)]
pub struct CallGuard {
    in_flight: Arc<Semaphore>,
    max_concurrent_calls: usize,
    default_timeout: Duration,
    slow_call: Duration,
}

impl CallGuard {
    pub fn new(config: &Config) -> Self {
        Self {
            in_flight: Arc::new(Semaphore::new(config.max_concurrent_calls)),
            max_concurrent_calls: config.max_concurrent_calls,
            default_timeout: config.timeout,
            slow_call: config.slow_call,
        }
    }

    /// The call's deadline: `start` plus the client's timeout, or the server default.
    pub fn deadline(&self, start: Instant, client_timeout: Option<Duration>) -> Instant {
        start + client_timeout.unwrap_or(self.default_timeout)
    }

    /// Runs one call's handler under every safety net and maps its outcome to a gRPC answer.
    ///
    /// # Errors
    /// The handler's error as a [`Status`]; RESOURCE_EXHAUSTED when too many calls are in flight;
    /// INTERNAL if the handler panicked.
    pub async fn run<T>(
        &self,
        info: CallInfo,
        start: Instant,
        handler: impl Future<Output = Result<T, Error>>,
    ) -> Result<T, Status> {
        let result = match self.in_flight.try_acquire() {
            Ok(_permit) => match AssertUnwindSafe(handler).catch_unwind().await {
                Ok(result) => result.map_err(Status::from),
                Err(panic) => {
                    let message = panic
                        .downcast_ref::<&str>()
                        .map(ToString::to_string)
                        .or_else(|| panic.downcast_ref::<String>().cloned())
                        .unwrap_or_else(|| "non-string panic payload".into());
                    tracing::error!(method = info.method, panic = %message, "handler panicked");
                    Err(Status::internal("internal error"))
                }
            },
            Err(_) => Err(Status::resource_exhausted(format!(
                "server overloaded: {} calls already in flight; retry with backoff",
                self.max_concurrent_calls
            ))),
        };
        let elapsed = start.elapsed();
        let code = result.as_ref().map_or_else(Status::code, |_| Code::Ok);
        metric::record_call(info, code, elapsed);
        tracing::Span::current().record("code", tracing::field::debug(code));
        if elapsed >= self.slow_call {
            tracing::warn!(
                method = info.method,
                strategy = info.strategy,
                batch_size = info.batch_size,
                duration_ms = elapsed.as_millis() as u64,
                code = ?code,
                "slow call"
            );
        }
        result
    }
}
