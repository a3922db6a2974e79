//! The `user.v1.UserService` handlers: one line of transport glue per RPC around its logic
//! (go-zero's `internal/server`).

use std::sync::Arc;
use std::time::Duration;

use tonic::{Request, Response, Status};

use crate::logic::{BatchGetUsersLogic, GetUserLogic, RequestContext};
use crate::pb;
use crate::svc::ServiceContext;

/// Implements the generated `UserService` trait on top of the logics.
#[derive(Debug, Clone)]
pub struct UserServer {
    svc: Arc<ServiceContext>,
}

impl UserServer {
    pub fn new(svc: Arc<ServiceContext>) -> Self {
        Self { svc }
    }

    /// The call's context: the client's `grpc-timeout` if it sent one, else the server default.
    fn context<T>(&self, request: &Request<T>) -> RequestContext {
        let timeout = client_timeout(request).unwrap_or(self.svc.config.timeout);
        RequestContext::with_timeout(timeout)
    }
}

#[tonic::async_trait]
impl pb::user_service_server::UserService for UserServer {
    #[tracing::instrument(name = "GetUser", skip_all, fields(id = request.get_ref().id))]
    async fn get_user(
        &self,
        request: Request<pb::GetUserRequest>,
    ) -> Result<Response<pb::User>, Status> {
        let ctx = self.context(&request);
        let user = GetUserLogic::new(ctx, &self.svc)
            .get_user(request.into_inner())
            .await?;
        Ok(Response::new(user))
    }

    #[tracing::instrument(
        name = "BatchGetUsers",
        skip_all,
        fields(batch_size = request.get_ref().ids.len(), strategy = request.get_ref().strategy)
    )]
    async fn batch_get_users(
        &self,
        request: Request<pb::BatchGetUsersRequest>,
    ) -> Result<Response<pb::BatchGetUsersResponse>, Status> {
        let ctx = self.context(&request);
        let response = BatchGetUsersLogic::new(ctx, &self.svc)
            .batch_get_users(request.into_inner())
            .await?;
        Ok(Response::new(response))
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
