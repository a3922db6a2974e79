//! Business rules, one *logic* per RPC (go-zero's `internal/logic`): each is built from the
//! request's [`RequestContext`] and the shared [`ServiceContext`](crate::svc::ServiceContext),
//! takes the protobuf request and returns the protobuf response or an [`Error`].
//! Logics never touch transport concerns (metadata, status codes): that is the server's job.

pub mod batch_get_users;
pub mod get_user;
pub mod strategy;

use std::future::Future;
use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::{CancellationToken, DropGuard};

pub use batch_get_users::BatchGetUsersLogic;
pub use get_user::GetUserLogic;

use crate::error::Error;
use crate::model;
use crate::pb;

/// What a logic knows of its call (go-zero's `ctx`): when it must be done by, and a token that is
/// cancelled when the call is abandoned (its future dropped), so work handed elsewhere stops too.
#[derive(Debug)]
pub struct RequestContext {
    pub deadline: Instant,
    pub token: CancellationToken,
    _cancel_on_drop: DropGuard,
}

impl RequestContext {
    /// A context that must finish within `timeout` from now.
    pub fn with_timeout(timeout: Duration) -> Self {
        Self::with_deadline(Instant::now() + timeout)
    }

    /// A context that must finish by `deadline`.
    pub fn with_deadline(deadline: Instant) -> Self {
        let token = CancellationToken::new();
        Self {
            deadline,
            _cancel_on_drop: token.clone().drop_guard(),
            token,
        }
    }

    /// Runs `work`, failing with [`Error::DeadlineExceeded`] at the deadline (which drops `work`
    /// and, with it, every query it started).
    ///
    /// # Errors
    /// The work's own error, or [`Error::DeadlineExceeded`].
    pub async fn run<T>(&self, work: impl Future<Output = Result<T, Error>>) -> Result<T, Error> {
        tokio::time::timeout_at(self.deadline, work)
            .await
            .unwrap_or(Err(Error::DeadlineExceeded))
    }
}

impl From<model::User> for pb::User {
    fn from(user: model::User) -> Self {
        Self {
            id: user.id,
            name: user.name,
            email: user.email,
            create_time: Some(prost_types::Timestamp {
                seconds: user.created_at.timestamp(),
                nanos: user.created_at.timestamp_subsec_nanos() as i32,
            }),
        }
    }
}
