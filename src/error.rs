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
    /// A watched cache the section reads cannot be read now (its watch is refused, or has not
    /// listed since it started or failed).
    #[error("{}", .0.message)]
    Cache(crate::watch::NotReadable),
    /// Istio's mesh configs cannot tell the root namespace (they disagree, or one is not
    /// YAML); waits for them or the policy to change.
    #[error("{0}")]
    MeshConfig(String),
    /// Istio's root namespace cannot be read from meshConfig (a mesh config is gone or not
    /// YAML): the writes that depend on it are held, nothing is moved or deleted; waits for
    /// the mesh config (its watch triggers the policy) or the policy to change.
    #[error("{0}")]
    RootNamespaceUnknown(String),
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
            Error::Cache(c) if c.cause == Some(crate::watch::Cause::Forbidden) => Some(403),
            Error::Kube {
                source: kube::Error::Api(s),
                ..
            } => Some(s.code),
            _ => None,
        }
    }

    /// Whether retrying without any change can succeed.
    pub fn is_transient(&self) -> bool {
        match self {
            Error::Kube { .. } => !matches!(self.status_code(), Some(400 | 403 | 422)),
            Error::Cache(c) => c.cause.is_none_or(crate::watch::Cause::stale),
            Error::InvalidSpec(_)
            | Error::MeshConfig(_)
            | Error::RootNamespaceUnknown(_)
            | Error::Serialize(_) => false,
            Error::MissingField(..) => true,
        }
    }

    /// How long to wait before the next try, given how many tries failed in a row.
    pub fn backoff(&self, failures: u32) -> Duration {
        backoff(self.retry(), failures)
    }

    /// How this error is retried.
    pub fn retry(&self) -> Retry {
        if self.status_code() == Some(403) {
            Retry::Permission
        } else if self.is_transient() {
            Retry::Transient
        } else {
            Retry::NeedsChange
        }
    }
}

/// How a failed reconcile, or a section that failed within one, is retried.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Retry {
    /// May succeed as is: exponential backoff from 1 s, capped at 5 minutes.
    Transient,
    /// meshwarden lacks a permission. RBAC changes cannot be watched, so look again every
    /// half minute.
    Permission,
    /// The policy or the object must change first; retried slowly in case it did.
    NeedsChange,
}

/// The one backoff of the controller: how long to wait after `failures` failures in a row.
pub fn backoff(retry: Retry, failures: u32) -> Duration {
    match retry {
        Retry::Transient => Duration::from_secs((1u64 << failures.min(8)).min(300)),
        Retry::Permission => Duration::from_secs(30),
        Retry::NeedsChange => Duration::from_secs(300),
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
    fn forbidden_is_retried_every_half_minute() {
        let e = api(403);
        assert!(!e.is_transient());
        assert_eq!(e.backoff(0), Duration::from_secs(30));
        assert_eq!(e.backoff(9), Duration::from_secs(30));
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
        assert!(!e.is_transient());
        assert_eq!(e.backoff(0), Duration::from_secs(300));
    }
}
