//! The registry's one error type; `api` maps it to an HTTP status in one place.

use crate::model::Invalid;

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("{0}")]
    Invalid(#[from] Invalid),
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Forbidden(String),
    #[error("resource version does not match If-Match")]
    PreconditionFailed,
    #[error("database error")]
    Database(#[from] tokio_postgres::Error),
    #[error("no database connection")]
    Pool(#[from] deadpool_postgres::PoolError),
    #[error("internal error: {0}")]
    Internal(String),
}

impl RegistryError {
    /// A stable label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            RegistryError::Invalid(_) => "invalid",
            RegistryError::NotFound(_) => "not-found",
            RegistryError::Conflict(_) => "conflict",
            RegistryError::Forbidden(_) => "forbidden",
            RegistryError::PreconditionFailed => "precondition-failed",
            RegistryError::Database(_) | RegistryError::Pool(_) => "unavailable",
            RegistryError::Internal(_) => "internal",
        }
    }
}

pub type Result<T, E = RegistryError> = std::result::Result<T, E>;
