//! MAPREDUCE: go-zero's `mr.MapReduce` idiom. The generator feeds the ids, `workers` mappers do
//! one primary-key lookup each and write the user (or cancel the call with the database error),
//! one reducer collects them.

use crate::concurrency::mr::{MrError, Options, map_reduce};
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
    let users = &svc.users;
    let collected = map_reduce(
        |source| async move {
            for &id in ids {
                if source.send(id).await.is_err() {
                    return;
                }
            }
        },
        |id, writer, cancel| async move {
            match users.find_one(id).await {
                Ok(Some(user)) => writer.write(user),
                Ok(None) => {}
                Err(err) => cancel.cancel(err),
            }
        },
        |mut pipe, writer, _cancel| async move {
            let mut all = Vec::with_capacity(ids.len());
            while let Some(user) = pipe.recv().await {
                all.push(user);
            }
            writer.write(all);
        },
        Options::new()
            .workers(svc.config.workers)
            .token(ctx.token.clone())
            .deadline(ctx.deadline),
    )
    .await;
    collected.map_err(|err| match err {
        MrError::Failed(db) => Error::Database(db),
        MrError::DeadlineExceeded => Error::DeadlineExceeded,
        MrError::Cancelled => Error::Cancelled,
        // Nothing here cancels without an error, and the reducer always writes.
        other @ (MrError::CancelledWithNoError | MrError::ReducerWroteNothing) => {
            Error::Internal(anyhow::anyhow!("map-reduce: {other}"))
        }
    })
}
