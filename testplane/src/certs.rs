//! Certificates for tests of what meshwarden reads from certificates (root expiry).

/// A self-signed CA certificate named `common_name` (plus `organization`, when given), valid
/// from `not_before` to `not_after` (seconds since the Unix epoch), in PEM.
pub fn root_certificate(
    common_name: &str,
    organization: Option<&str>,
    not_before: i64,
    not_after: i64,
) -> Result<String, crate::Error> {
    use rcgen::{BasicConstraints, CertificateParams, DistinguishedName, DnType, IsCa, KeyPair};
    let time = |s: i64| {
        time::OffsetDateTime::from_unix_timestamp(s)
            .map_err(|e| crate::Error::Manifest(format!("certificate time {s}: {e}")))
    };
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = DistinguishedName::new();
    params
        .distinguished_name
        .push(DnType::CommonName, common_name);
    if let Some(o) = organization {
        params.distinguished_name.push(DnType::OrganizationName, o);
    }
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.not_before = time(not_before)?;
    params.not_after = time(not_after)?;
    Ok(params.self_signed(&KeyPair::generate()?)?.pem())
}

/// Seconds since the Unix epoch now (certificate validity is counted from it).
pub fn unix_now() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}
