//! The `user.v1.UserService` handlers: transport glue around each RPC's logic (go-zero's
//! `internal/server`) under the [`CallGuard`]'s safety nets.

use std::sync::Arc;
use std::time::Duration;

use tokio::time::Instant;
use tonic::{Request, Response, Status};

use crate::logic::{BatchGetUsersLogic, GetUserLogic, RequestContext};
use crate::pb::{self, Strategy};
use crate::server::call::{CallGuard, CallInfo, CallStart};
use crate::svc::ServiceContext;
use crate::telemetry::metric;

const GET_USER: &str = "/user.v1.UserService/GetUser";
const BATCH_GET_USERS: &str = "/user.v1.UserService/BatchGetUsers";

/// Implements the generated `UserService` trait on top of the logics.
#[derive(Debug, Clone)]
pub struct UserServer {
    svc: Arc<ServiceContext>,
    guard: CallGuard,
}

impl UserServer {
    pub fn new(svc: Arc<ServiceContext>, guard: CallGuard) -> Self {
        Self { svc, guard }
    }

    /// When the call arrived (see [`CallStart`]) and its logic context.
    fn context<T>(&self, request: &Request<T>) -> (Instant, RequestContext) {
        let start = request
            .extensions()
            .get::<CallStart>()
            .map_or_else(Instant::now, |s| s.0);
        let deadline = self.guard.deadline(start, client_timeout(request));
        (start, RequestContext::with_deadline(deadline))
    }

    /// The strategy label of a request: what will run, as the response will report it.
    fn strategy_label(&self, requested: i32) -> &'static str {
        match Strategy::try_from(requested) {
            Ok(Strategy::Unspecified) => self.svc.config.default_strategy.as_str_name(),
            Ok(strategy) => strategy.as_str_name(),
            Err(_) => "invalid",
        }
    }
}

#[tonic::async_trait]
impl pb::user_service_server::UserService for UserServer {
    #[tracing::instrument(name = "GetUser", skip_all, fields(id = request.get_ref().id, code = tracing::field::Empty))]
    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let (start, ctx) = self.context(&request);
        let info = CallInfo {
            method: GET_USER,
            strategy: "none",
            batch_size: 1,
        };
        self.guard
            .run(info, start, async {
                let user = GetUserLogic::new(ctx, &self.svc)
                    .get_user(request.into_inner())
                    .await?;
                Ok(Response::new(user))
            })
            .await
    }

    #[tracing::instrument(
        name = "BatchGetUsers",
        skip_all,
        fields(
            strategy = self.strategy_label(request.get_ref().strategy),
            batch_size = request.get_ref().ids.len(),
            code = tracing::field::Empty,
        )
    )]
    async fn batch_get_users(
        &self,
        request: Request<pb::BatchGetUsersRequest>,
    ) -> Result<Response<pb::BatchGetUsersResponse>, Status> {
        let (start, ctx) = self.context(&request);
        let info = CallInfo {
            method: BATCH_GET_USERS,
            strategy: self.strategy_label(request.get_ref().strategy),
            batch_size: request.get_ref().ids.len(),
        };
        self.guard
            .run(info, start, async {
                let response = BatchGetUsersLogic::new(ctx, &self.svc)
                    .batch_get_users(request.into_inner())
                    .await?;
                metric::record_batch(
                    info.strategy,
                    response.users.len(),
                    response.missing_ids.len(),
                );
                Ok(Response::new(response))
            })
            .await
    }
}

/// Parses the `grpc-timeout` header (`<digits><unit>`, unit one of H M S m u n).
fn client_timeout<T>(request: &Request<T>) -> Option<Duration> {
    let value = request.metadata().get("grpc-timeout")?.to_str().ok()?;
    let (digits, unit) = value.split_at(value.len().checked_sub(1)?);
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount.saturating_mul(3600)),
        "M" => Duration::from_secs(amount.saturating_mul(60)),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}
