//! The section's whole decision, pure: from the bundles found (per source) and the time now,
//! the distinct roots with the time they have left, the condition, the violations, and when
//! to look again (the next threshold a root crosses as time passes).

use std::collections::BTreeMap;
use std::time::Duration;

use super::facts::{Bundle, RootFact};
use crate::api::{CertificatesStatus, RootCertificateStatus, Violation};
use crate::status::RuleReport;
use crate::status::conditions::{Observed, Status, types};
use crate::status::reasons::{self, ViolationAction};

/// Most roots listed in status (a mesh has one or two; a few while rotating).
pub const MAX_ROOTS: usize = 20;

/// How soon a named Secret that could not be read is read again.
pub const SECRET_RETRY: Duration = Duration::from_secs(30);

/// How a root stands against `warnBefore`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Standing {
    Valid,
    Expiring,
    Expired,
}

/// One distinct root and where it was found.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Root {
    pub fact: RootFact,
    /// Sources that hold it: `ConfigMap/<namespace>/istio-ca-root-cert` or `Secret/<ns>/<name>`.
    pub sources: Vec<String>,
    /// Seconds until `notAfter` (negative once expired).
    pub seconds_left: i64,
    pub standing: Standing,
}

/// The roots, soonest to expire first, the unreadable sources, and when to look again.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Plan {
    pub roots: Vec<Root>,
    /// Source and why it could not be read.
    pub unreadable: Vec<(String, String)>,
    /// Time until the next root crosses `warnBefore` or expires.
    pub recheck_in: Option<Duration>,
}

/// Groups the roots of every source by fingerprint and weighs each against `warn_before` at
/// `now` (seconds since the Unix epoch).
pub fn plan(sources: &BTreeMap<String, Bundle>, now: i64, warn_before: Duration) -> Plan {
    let warn = i64::try_from(warn_before.as_secs()).unwrap_or(i64::MAX);
    let mut by_fingerprint: BTreeMap<&str, (&RootFact, Vec<String>)> = BTreeMap::new();
    let mut unreadable = Vec::new();
    for (source, bundle) in sources {
        match bundle {
            Bundle::Roots(roots) => {
                for r in roots.iter() {
                    by_fingerprint
                        .entry(&r.fingerprint)
                        .or_insert((r, Vec::new()))
                        .1
                        .push(source.clone());
                }
            }
            Bundle::Unreadable(why) => unreadable.push((source.clone(), why.clone())),
        }
    }
    let mut roots: Vec<Root> = by_fingerprint
        .into_values()
        .map(|(fact, sources)| {
            let seconds_left = fact.not_after.saturating_sub(now);
            let standing = if seconds_left <= 0 {
                Standing::Expired
            } else if seconds_left <= warn {
                Standing::Expiring
            } else {
                Standing::Valid
            };
            Root {
                fact: fact.clone(),
                sources,
                seconds_left,
                standing,
            }
        })
        .collect();
    roots.sort_by(|a, b| {
        (a.fact.not_after, &a.fact.fingerprint).cmp(&(b.fact.not_after, &b.fact.fingerprint))
    });
    // The next crossing: a valid root entering the warning window, or any root expiring.
    // One second late, so that the evaluation then sees the crossing made.
    let recheck_in = roots
        .iter()
        .flat_map(|r| [r.seconds_left - warn, r.seconds_left])
        .filter(|s| *s >= 0)
        .min()
        .map(|s| Duration::from_secs(s.unsigned_abs() + 1));
    // A Secret that cannot be read (not granted yet) is tried again like a permission error:
    // Secrets are read, not watched, so nothing else tells when access is granted.
    let recheck_in = if unreadable.iter().any(|(s, _)| s.starts_with("Secret/")) {
        Some(recheck_in.map_or(SECRET_RETRY, |d| d.min(SECRET_RETRY)))
    } else {
        recheck_in
    };
    Plan {
        roots,
        unreadable,
        recheck_in,
    }
}

/// Whole days in `seconds`, rounded towards minus infinity (an hour past expiry is day -1).
pub fn days(seconds: i64) -> i64 {
    seconds.div_euclid(86_400)
}

fn rfc3339(seconds: i64) -> String {
    jiff::Timestamp::from_second(seconds)
        .map(|t| t.to_string())
        .unwrap_or_else(|_| seconds.to_string())
}

fn describe(r: &Root) -> String {
    let fp = r.fact.fingerprint.get(..16).unwrap_or(&r.fact.fingerprint);
    format!("root certificate {:?} (SHA-256 {fp}…)", r.fact.subject)
}

fn used_by(r: &Root) -> String {
    match r.sources.len() {
        1 => format!("found in {}", r.sources[0]),
        n => format!("found in {n} places, {} first", r.sources[0]),
    }
}

/// The section's report: `warn_text` is `warnBefore` as the user wrote it.
pub fn report(plan: &Plan, warn_text: &str) -> RuleReport {
    let ctype = types::CERTIFICATES;
    let mut violations = Vec::new();
    for r in plan.roots.iter().filter(|r| r.standing != Standing::Valid) {
        let when = match r.standing {
            Standing::Expired => format!(
                "expired at {} ({} days ago): workloads that trust only this root fail mutual TLS; rotate the root now",
                rfc3339(r.fact.not_after),
                -days(r.seconds_left)
            ),
            _ => format!(
                "expires at {}, in {} days, within certificates.warnBefore {warn_text}: plan the root rotation",
                rfc3339(r.fact.not_after),
                days(r.seconds_left)
            ),
        };
        violations.push(Violation {
            rule: ctype.to_string(),
            object: describe(r),
            message: format!("{when}; {}", used_by(r)),
            action: ViolationAction::Reported,
        });
    }
    for (source, why) in &plan.unreadable {
        violations.push(Violation {
            rule: ctype.to_string(),
            object: source.clone(),
            message: format!("{why}; meshwarden cannot tell when its root expires"),
            action: ViolationAction::Reported,
        });
    }
    let worst = plan.roots.iter().map(|r| r.standing).max();
    let soonest = plan.roots.first();
    let condition = match (worst, soonest) {
        (Some(Standing::Expired), _) => {
            let expired: Vec<String> = plan
                .roots
                .iter()
                .filter(|r| r.standing == Standing::Expired)
                .map(describe)
                .collect();
            Observed::new(
                ctype,
                Status::False,
                reasons::ROOT_CERTIFICATE_EXPIRED,
                format!(
                    "{} expired: rotate the mesh's root certificate now (see status.certificates)",
                    expired.join(", ")
                ),
            )
        }
        (Some(Standing::Expiring), Some(r)) => Observed::new(
            ctype,
            Status::False,
            reasons::ROOT_CERTIFICATE_EXPIRING,
            format!(
                "{} expires in {} days ({}), within certificates.warnBefore {warn_text}: plan the root rotation",
                describe(r),
                days(r.seconds_left),
                rfc3339(r.fact.not_after)
            ),
        ),
        _ if !plan.unreadable.is_empty() => Observed::new(
            ctype,
            Status::False,
            reasons::CERTIFICATE_UNREADABLE,
            format!(
                "{} root certificate bundle(s) cannot be read, {} first: see the violations",
                plan.unreadable.len(),
                plan.unreadable[0].0
            ),
        ),
        (_, Some(r)) => Observed::new(
            ctype,
            Status::True,
            reasons::COMPLIANT,
            format!(
                "{} root certificate(s); the soonest to expire, {}, has {} days left ({}), more than certificates.warnBefore {warn_text}",
                plan.roots.len(),
                describe(r),
                days(r.seconds_left),
                rfc3339(r.fact.not_after)
            ),
        ),
        (_, None) => Observed::new(
            ctype,
            Status::False,
            reasons::NO_TARGETS,
            "no namespace holds an istio-ca-root-cert ConfigMap (istiod writes one into every namespace it serves): nothing to watch yet",
        ),
    };
    let targets = i32::try_from(plan.roots.len() + plan.unreadable.len()).unwrap_or(i32::MAX);
    let compliant = plan
        .roots
        .iter()
        .filter(|r| r.standing == Standing::Valid)
        .count();
    RuleReport {
        violations,
        targets,
        compliant: i32::try_from(compliant).unwrap_or(i32::MAX),
        recheck_in: plan.recheck_in,
        certificates: Some(CertificatesStatus {
            roots: plan
                .roots
                .iter()
                .take(MAX_ROOTS)
                .map(|r| RootCertificateStatus {
                    subject: r.fact.subject.clone(),
                    fingerprint: r.fact.fingerprint.clone(),
                    not_after: rfc3339(r.fact.not_after),
                    days_left: days(r.seconds_left),
                    namespaces: i32::try_from(
                        r.sources
                            .iter()
                            .filter(|s| s.starts_with("ConfigMap/"))
                            .count(),
                    )
                    .unwrap_or(i32::MAX),
                    secrets: r
                        .sources
                        .iter()
                        .filter_map(|s| s.strip_prefix("Secret/"))
                        .map(str::to_string)
                        .collect(),
                })
                .collect(),
        }),
        ..RuleReport::new(condition)
    }
}
