//! BATCH_QUERY: what a database engineer would write — one `WHERE id = ANY($1)` query per chunk
//! of `batch_query_chunk` ids, run one after another.

use crate::error::Error;
use crate::model::User;
use crate::svc::ServiceContext;

/// # Errors
/// The database error of the failing chunk; later chunks are not run.
pub async fn fetch(svc: &ServiceContext, ids: &[i64]) -> Result<Vec<User>, Error> {
    let mut found = Vec::with_capacity(ids.len());
    for chunk in ids.chunks(svc.config.batch_query_chunk) {
        found.extend(svc.users.find_many(chunk).await?);
    }
    Ok(found)
}
