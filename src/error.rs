//! The service's one error type, and the single place where errors become a [`tonic::Status`].
//!
//! Clients get a code and a message they can act on; the cause (SQL errors, driver text) is
//! logged here, server-side, and never sent.

use tonic::{Code, Status};
use tonic_types::{ErrorDetails, FieldViolation, StatusExt as _};

/// How many ids a NOT_FOUND message lists before summarising the rest.
const LISTED_IDS: usize = 20;

/// Everything a logic can fail with.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request is malformed; each violation names the field (e.g. `ids[3]`).
    #[error("invalid request: {}", describe(.0))]
    InvalidArgument(Vec<FieldViolation>),

    /// Some requested users do not exist.
    #[error("{}", not_found_message(.0))]
    NotFound(Vec<i64>),

    /// The call's deadline passed before the work finished.
    #[error("deadline exceeded")]
    DeadlineExceeded,

    /// The caller went away; nobody will read the answer.
    #[error("cancelled")]
    Cancelled,

    /// The database failed.
    #[error("database: {0}")]
    Database(#[from] sqlx::Error),

    /// A bug or an impossible state; details are logged only.
    #[error(transparent)]
    Internal(#[from] anyhow::Error),
}

impl Error {
    /// One field violation.
    pub fn invalid(field: impl Into<String>, description: impl Into<String>) -> Self {
        Self::InvalidArgument(vec![FieldViolation::new(field, description)])
    }

    /// The gRPC code this error is reported with.
    pub fn code(&self) -> Code {
        match self {
            Self::InvalidArgument(_) => Code::InvalidArgument,
            Self::NotFound(_) => Code::NotFound,
            Self::DeadlineExceeded => Code::DeadlineExceeded,
            Self::Cancelled => Code::Cancelled,
            Self::Database(err) if is_unavailable(err) => Code::Unavailable,
            Self::Database(err) if is_query_cancelled(err) => Code::DeadlineExceeded,
            Self::Database(_) | Self::Internal(_) => Code::Internal,
        }
    }
}

/// Connection-level failures and pool exhaustion: the database is (for now) out of reach, and
/// the same call may succeed later.
fn is_unavailable(err: &sqlx::Error) -> bool {
    matches!(
        err,
        sqlx::Error::PoolTimedOut | sqlx::Error::PoolClosed | sqlx::Error::WorkerCrashed
    ) || crate::model::is_connection_failure(err)
        // 53300: too many connections.
        || matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("53300"))
}

/// 57014 query_canceled: a statement timeout or a cancel request stopped the query.
fn is_query_cancelled(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.code().as_deref() == Some("57014"))
}

impl From<Error> for Status {
    fn from(err: Error) -> Self {
        let code = err.code();
        match err {
            Error::InvalidArgument(violations) => {
                let message = format!("invalid request: {}", describe(&violations));
                Status::with_error_details(
                    code,
                    message,
                    ErrorDetails::with_bad_request(violations),
                )
            }
            Error::NotFound(_) | Error::DeadlineExceeded | Error::Cancelled => {
                Status::new(code, err.to_string())
            }
            Error::Database(cause) => {
                tracing::error!(error = %cause, ?code, "database error");
                let message = if code == Code::Unavailable {
                    "the database is unavailable; retry with backoff"
                } else if code == Code::DeadlineExceeded {
                    "the database query was cancelled before it finished"
                } else {
                    "internal error"
                };
                Status::new(code, message)
            }
            Error::Internal(cause) => {
                tracing::error!(error = ?cause, "internal error");
                Status::new(code, "internal error")
            }
        }
    }
}

fn describe(violations: &[FieldViolation]) -> String {
    violations
        .iter()
        .map(|v| format!("{}: {}", v.field, v.description))
        .collect::<Vec<_>>()
        .join("; ")
}

fn not_found_message(ids: &[i64]) -> String {
    let listed: Vec<String> = ids.iter().take(LISTED_IDS).map(i64::to_string).collect();
    let more = ids.len().saturating_sub(LISTED_IDS);
    let noun = if ids.len() == 1 { "user" } else { "users" };
    let mut message = format!("{noun} not found: ids {}", listed.join(", "));
    if more > 0 {
        message.push_str(&format!(" and {more} more"));
    }
    message
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn not_found_lists_ids_and_summarises_long_lists() {
        assert_eq!(
            Error::NotFound(vec![7]).to_string(),
            "user not found: ids 7"
        );
        let many: Vec<i64> = (1..=25).collect();
        let text = Error::NotFound(many).to_string();
        assert!(text.starts_with("users not found: ids 1, 2, 3"), "{text}");
        assert!(text.ends_with("20 and 5 more"), "{text}");
    }

    #[test]
    fn pool_timeouts_are_unavailable_and_other_database_errors_internal() {
        assert_eq!(
            Error::from(sqlx::Error::PoolTimedOut).code(),
            Code::Unavailable
        );
        assert_eq!(Error::from(sqlx::Error::RowNotFound).code(), Code::Internal);
    }

    #[test]
    fn database_errors_never_reach_the_client_as_text() {
        let status = Status::from(Error::from(sqlx::Error::ColumnNotFound(
            "secret_column".into(),
        )));
        assert_eq!(status.code(), Code::Internal);
        assert_eq!(status.message(), "internal error");
    }

    #[test]
    fn invalid_argument_carries_a_bad_request_field_violation() {
        let status = Status::from(Error::invalid("ids[3]", "must be > 0, got -1"));
        assert_eq!(status.code(), Code::InvalidArgument);
        assert_eq!(
            status.message(),
            "invalid request: ids[3]: must be > 0, got -1"
        );
        let details = status.get_error_details();
        let bad = details.bad_request().expect("a BadRequest detail");
        assert_eq!(bad.field_violations[0].field, "ids[3]");
    }
}
