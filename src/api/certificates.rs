//! The `certificates` section of a MeshPolicy: its spec and what it reports in status.

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

/// Go duration syntax (`1440h`, `720h30m`, `90m`): a sequence of numbers with a unit each.
pub const GO_DURATION_PATTERN: &str = r"^([0-9]+(\.[0-9]+)?(ns|us|µs|ms|s|m|h))+$";

/// The `certificates` section: how long before a root certificate expires it is reported.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificatesSpec {
    /// How long before a root certificate's `notAfter` the section turns False
    /// (`RootCertificateExpiring`), as a Go duration such as `1440h` (60 days, the default)
    /// or `720h30m`. Units: h, m, s, ms, us, ns (no days: write 24h per day).
    #[serde(default = "default_warn_before")]
    #[schemars(schema_with = "go_duration")]
    pub warn_before: String,

    /// Secrets holding CA certificates to check as well, such as a plugged-in `cacerts` in
    /// istiod's namespace (keys `root-cert.pem` and `ca-cert.pem`). meshwarden reads a Secret
    /// only when its ServiceAccount may `get` it: grant that with the chart value
    /// `certificates.readSecrets`; the default install reads no Secret. Empty by default.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 8))]
    pub secrets: Vec<SecretRef>,
}

impl Default for CertificatesSpec {
    fn default() -> Self {
        CertificatesSpec {
            warn_before: default_warn_before(),
            secrets: Vec::new(),
        }
    }
}

/// A Secret by namespace and name.
#[derive(Deserialize, Serialize, Clone, Debug, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct SecretRef {
    /// Namespace of the Secret.
    #[serde(default = "default_istio_system")]
    #[schemars(length(min = 1, max = 63))]
    pub namespace: String,
    /// Name of the Secret.
    #[schemars(length(min = 1, max = 253))]
    pub name: String,
}

/// What the `certificates` section found: one entry per distinct root certificate.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct CertificatesStatus {
    /// Distinct roots (by SHA-256 fingerprint), the soonest to expire first (at most 20).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(length(max = 20))]
    pub roots: Vec<RootCertificateStatus>,
}

/// One root certificate of the mesh.
#[derive(Deserialize, Serialize, Clone, Debug, Default, PartialEq, Eq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct RootCertificateStatus {
    /// The certificate's subject, such as `CN=Root CA, O=cluster.local`.
    pub subject: String,
    /// SHA-256 fingerprint of the DER encoding, lowercase hex.
    pub fingerprint: String,
    /// End of validity (RFC 3339, UTC).
    pub not_after: String,
    /// Whole days left until `notAfter` (negative once expired).
    pub days_left: i64,
    /// Namespaces whose `istio-ca-root-cert` holds this root.
    pub namespaces: i32,
    /// Secrets (`namespace/name`, from `certificates.secrets`) holding this certificate.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub secrets: Vec<String>,
}

fn default_istio_system() -> String {
    "istio-system".to_string()
}

fn default_warn_before() -> String {
    "1440h".to_string()
}

fn go_duration(_: &mut schemars::SchemaGenerator) -> schemars::Schema {
    schemars::json_schema!({
        "type": "string",
        "default": "1440h",
        "maxLength": 32,
        "pattern": GO_DURATION_PATTERN,
        "description": "A Go duration such as 1440h (60 days) or 720h30m: numbers with a unit each (h, m, s, ms, us, ns)."
    })
}
