//! Errors of a reconcile, typed so that the controller can decide how to retry.
use std::time::Duration;

/// Everything that can go wrong while reconciling a MeshPolicy.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A call to the API server failed.
    #[error("{action}: {source}")]
    Kube {
        action: String,
        #[source]
        source: kube::Error,
    },
    /// The policy cannot be acted on as written; waits for the user to change it.
    #[error("invalid policy: {0}")]
    InvalidSpec(String),
    /// An object the API server returned lacks a field it always sets.
    #[error("object {0} has no {1}")]
    MissingField(String, &'static str),
    /// Serialising a patch failed (a bug, not a cluster condition).
    #[error("cannot build patch: {0}")]
    Serialize(#[from] serde_json::Error),
}

impl Error {
    /// Wraps a kube error with what was being done.
    pub fn kube(action: impl Into<String>, source: kube::Error) -> Self {
        Error::Kube {
            action: action.into(),
            source,
        }
    }

    /// HTTP status of an API error, if any.
    pub fn status_code(&self) -> Option<u16> {
        match self {
            Error::Kube {
                source: kube::Error::Api(s),
                ..
            } => Some(s.code),
            _ => None,
        }
    }

    /// A bounded CamelCase word for conditions, events and metric labels.
    pub fn reason(&self) -> &'static str {
        match self {
            Error::Kube { .. } => match self.status_code() {
                Some(403) => "Forbidden",
                Some(409) => "Conflict",
                Some(404) => "NotFound",
                Some(422) => "Rejected",
                Some(_) => "ApiError",
                None => "ApiUnreachable",
            },
            Error::InvalidSpec(_) => "InvalidSpec",
            Error::MissingField(..) => "UnexpectedObject",
            Error::Serialize(_) => "InternalError",
        }
    }

    /// Whether retrying without any change can succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Kube { .. } => !matches!(self.status_code(), Some(400 | 403 | 422)),
            Error::InvalidSpec(_) | Error::Serialize(_) => false,
            Error::MissingField(..) => true,
        }
    }

    /// How long to wait before the next try, given how many tries failed in a row.
    pub fn backoff(&self, failures: u32) -> Duration {
        if !self.is_transient() {
            // Permission or validation problems need a person; retry slowly in case RBAC is fixed.
            return Duration::from_secs(300);
        }
        let secs = 1u64 << failures.min(8);
        Duration::from_secs(secs.min(300))
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16) -> Error {
        Error::kube(
            "patch",
            kube::Error::Api(
                kube::core::Status::failure("boom", "Reason")
                    .with_code(code)
                    .boxed(),
            ),
        )
    }

    #[test]
    fn forbidden_is_permanent_with_slow_retry() {
        let e = api(403);
        assert_eq!(e.reason(), "Forbidden");
        assert!(!e.is_transient());
        assert_eq!(e.backoff(0), Duration::from_secs(300));
    }

    #[test]
    fn transient_errors_back_off_exponentially_with_a_cap() {
        let e = api(500);
        assert!(e.is_transient());
        assert_eq!(e.backoff(0), Duration::from_secs(1));
        assert_eq!(e.backoff(3), Duration::from_secs(8));
        assert_eq!(e.backoff(30), Duration::from_secs(256));
    }

    #[test]
    fn invalid_spec_waits() {
        let e = Error::InvalidSpec("x".into());
        assert_eq!(e.reason(), "InvalidSpec");
        assert!(!e.is_transient());
    }
}
