//! What the section keeps of a root certificate bundle: per certificate its SHA-256
//! fingerprint, subject and `notAfter`, never the PEM text. And `warnBefore`, a Go duration.

use std::sync::Arc;
use std::time::Duration;

use x509_parser::pem::Pem;

/// One root certificate, as the section reads it.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RootFact {
    /// SHA-256 of the DER encoding, lowercase hex.
    pub fingerprint: String,
    /// The subject, RFC 4514 style (`CN=...,O=...`).
    pub subject: String,
    /// End of validity, seconds since the Unix epoch.
    pub not_after: i64,
}

/// What one source (a namespace's `istio-ca-root-cert`, a Secret) holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Bundle {
    /// The certificates of the bundle (at least one).
    Roots(Arc<[RootFact]>),
    /// No certificate could be read: why.
    Unreadable(String),
}

/// Reads every `CERTIFICATE` block of a PEM bundle (Istio's `root-cert.pem` may hold several
/// roots while one is being rotated). Other blocks are skipped; a bundle with no readable
/// certificate, or with a block that is not a valid certificate, is unreadable.
pub fn parse_bundle(pem: &str) -> Bundle {
    let mut roots = Vec::new();
    for (i, block) in Pem::iter_from_buffer(pem.as_bytes()).enumerate() {
        let block = match block {
            Ok(b) => b,
            // The iterator ends with an error when no further block is found.
            Err(x509_parser::error::PEMError::MissingHeader) if i > 0 => break,
            Err(e) => return Bundle::Unreadable(format!("PEM block {} is not valid: {e}", i + 1)),
        };
        if block.label != "CERTIFICATE" {
            continue;
        }
        let cert = match block.parse_x509() {
            Ok(c) => c,
            Err(e) => {
                return Bundle::Unreadable(format!(
                    "PEM block {} is not an X.509 certificate: {e}",
                    i + 1
                ));
            }
        };
        roots.push(RootFact {
            fingerprint: hex(ring::digest::digest(&ring::digest::SHA256, &block.contents).as_ref()),
            subject: cert.subject().to_string(),
            not_after: cert.validity().not_after.timestamp(),
        });
    }
    if roots.is_empty() {
        return Bundle::Unreadable("holds no PEM certificate".to_string());
    }
    roots.sort();
    roots.dedup();
    Bundle::Roots(roots.into())
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Parses a Go duration (`1440h`, `720h30m`, `1.5h`, `90s`): numbers, each with a unit
/// among `h`, `m`, `s`, `ms`, `us` (or `µs`), `ns`. `field` names the field in the error.
pub fn parse_go_duration(field: &str, text: &str) -> Result<Duration, String> {
    let bad = |why: &str| {
        format!(
            "{field}: {text:?} is not a Go duration ({why}); write hours, minutes and seconds such as 1440h (60 days) or 720h30m"
        )
    };
    if text.is_empty() {
        return Err(bad("empty"));
    }
    let mut rest = text;
    let mut total = 0f64;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(rest.len());
        let (number, after) = rest.split_at(digits);
        if number.is_empty() || number.starts_with('.') || number.ends_with('.') {
            return Err(bad("every unit needs a number before it"));
        }
        let value: f64 = number.parse().map_err(|_| bad("a number is not valid"))?;
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let seconds = match unit {
            "h" => 3600.0,
            "m" => 60.0,
            "s" => 1.0,
            "ms" => 1e-3,
            "us" | "µs" => 1e-6,
            "ns" => 1e-9,
            "" => return Err(bad("a number has no unit")),
            "d" | "w" | "y" => return Err(bad(&format!("the unit {unit} is not Go's: use h"))),
            other => return Err(bad(&format!("unknown unit {other:?}"))),
        };
        total += value * seconds;
        rest = next;
    }
    Duration::try_from_secs_f64(total).map_err(|_| bad("too long"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn go_durations() {
        let d = |t: &str| parse_go_duration("certificates.warnBefore", t);
        assert_eq!(d("1440h"), Ok(Duration::from_secs(1440 * 3600)));
        assert_eq!(d("720h30m"), Ok(Duration::from_secs(720 * 3600 + 1800)));
        assert_eq!(d("1.5h"), Ok(Duration::from_secs(5400)));
        assert_eq!(d("90s"), Ok(Duration::from_secs(90)));
        assert_eq!(d("1h1m1s"), Ok(Duration::from_secs(3661)));
        assert_eq!(d("500ms"), Ok(Duration::from_millis(500)));
        for bad in [
            "", "60d", "1440", "h", "1x", "1..5h", ".5h", "-1h", "1h 30m",
        ] {
            let e = d(bad).unwrap_err();
            assert!(e.starts_with("certificates.warnBefore: "), "{bad}: {e}");
            assert!(e.contains("1440h"), "{bad}: the fix is named: {e}");
        }
        assert!(d("60d").unwrap_err().contains("the unit d is not Go's"));
    }

    #[test]
    fn the_crd_pattern_and_the_parser_agree() {
        // The CRD's pattern (checked by the API server) accepts exactly what parses here,
        // for these samples: a policy the server took never fails in the section.
        let pattern = crate::api::GO_DURATION_PATTERN;
        assert!(pattern.starts_with("^(") && pattern.ends_with(")+$"));
        for ok in ["1440h", "720h30m", "1.5h", "90s", "1µs", "3ns", "2us"] {
            assert!(parse_go_duration("f", ok).is_ok(), "{ok}");
        }
    }

    #[test]
    fn unreadable_bundles() {
        assert!(matches!(parse_bundle(""), Bundle::Unreadable(_)));
        assert!(matches!(parse_bundle("not a pem"), Bundle::Unreadable(_)));
        let junk = "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n";
        match parse_bundle(junk) {
            Bundle::Unreadable(why) => assert!(why.contains("not an X.509 certificate"), "{why}"),
            other => panic!("{other:?}"),
        }
    }
}
