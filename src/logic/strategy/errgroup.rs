//! ERRGROUP: Go's `errgroup.Group` + `sync.Mutex` idiom. One task per id, at most `workers` at
//! once, each one primary-key lookup pushing into a mutex-guarded vector; the first database
//! error cancels the group's token, which stops dispatch and drops the lookups still running.

use std::sync::{Arc, Mutex, PoisonError};

use crate::concurrency::errgroup::Group;
use crate::error::Error;
use crate::logic::RequestContext;
use crate::model::User;
use crate::svc::ServiceContext;

/// # Errors
/// The first database error of the batch.
pub async fn fetch(
    ctx: &RequestContext,
    svc: &ServiceContext,
    ids: &[i64],
) -> Result<Vec<User>, Error> {
    let (mut group, token) = Group::<sqlx::Error>::with_token(&ctx.token);
    group
        .set_limit(Some(svc.config.workers))
        .map_err(anyhow::Error::from)?;
    let found = Arc::new(Mutex::new(Vec::with_capacity(ids.len())));
    for &id in ids {
        // Go's loop would go on spawning goroutines that each notice the cancelled context;
        // not starting them at all is the same outcome, cheaper.
        if token.is_cancelled() {
            break;
        }
        let users = svc.users.clone();
        let found = Arc::clone(&found);
        let token = token.clone();
        group
            .spawn(async move {
                let user = tokio::select! {
                    biased;
                    () = token.cancelled() => return Ok(()),
                    user = users.find_one(id) => user?,
                };
                if let Some(user) = user {
                    found
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .push(user);
                }
                Ok(())
            })
            .await
            .map_err(anyhow::Error::from)?;
    }
    group.wait().await?;
    let mut found = found.lock().unwrap_or_else(PoisonError::into_inner);
    Ok(std::mem::take(&mut *found))
}
