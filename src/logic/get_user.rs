//! GetUser: one user by id.

use crate::error::Error;
use crate::logic::RequestContext;
use crate::pb;
use crate::svc::ServiceContext;

pub struct GetUserLogic<'a> {
    ctx: RequestContext,
    svc: &'a ServiceContext,
}

impl<'a> GetUserLogic<'a> {
    pub fn new(ctx: RequestContext, svc: &'a ServiceContext) -> Self {
        Self { ctx, svc }
    }

    /// # Errors
    /// INVALID_ARGUMENT for an id <= 0, NOT_FOUND for an unknown id, database errors.
    pub async fn get_user(&self, req: pb::GetUserRequest) -> Result<pb::User, Error> {
        if req.id <= 0 {
            return Err(Error::invalid("id", format!("must be > 0, got {}", req.id)));
        }
        let user = self
            .ctx
            .run(async { Ok(self.svc.users.find_one(req.id).await?) })
            .await?;
        user.map(pb::User::from)
            .ok_or(Error::NotFound(vec![req.id]))
    }
}
