//! Whether the declared proxy resources fit each namespace's LimitRanges and ResourceQuotas.

use super::*;

/// Why the declared values cannot be used in a namespace (empty: they fit).
///
/// LimitRange (type `Container`): each declared request must be at least `min`, each limit at
/// most `max`, and limit/request at most `maxLimitRequestRatio`. ResourceQuota: for every key
/// the quota limits (`requests.cpu`/`cpu`, `requests.memory`/`memory`, `limits.cpu`,
/// `limits.memory`), `used + added + surge` must not exceed `hard`, where `added` sums
/// `replicas x (declared - current)` over the workloads to change (current from their
/// annotations, 0 when unset) and `surge` is one whole extra pod of the largest Deployment to
/// change (the surge pod of its rolling update).
pub fn namespace_fit(
    desired: &Desired,
    changes: &[&Workload],
    limit_ranges: &[LimitRange],
    quotas: &[ResourceQuota],
) -> Vec<String> {
    let mut problems = Vec::new();
    for lr in limit_ranges {
        for item in lr.spec.iter().flat_map(|s| s.limits.iter()) {
            if item.type_ != "Container" {
                continue;
            }
            for res in ["cpu", "memory"] {
                let req = desired.amount(&format!("requests.{res}"));
                let lim = desired.amount(&format!("limits.{res}"));
                let get = |m: &Option<
                    BTreeMap<String, k8s_openapi::apimachinery::pkg::api::resource::Quantity>,
                >| {
                    m.as_ref()
                        .and_then(|m| m.get(res))
                        .and_then(|q| quantity::millis(&q.0))
                };
                if let Some(max) = get(&item.max)
                    && lim > max
                {
                    problems.push(format!(
                        "LimitRange {} allows at most {} {res} per container, declared limit {}",
                        lr.name_any(),
                        show(res, max),
                        show(res, lim)
                    ));
                }
                if let Some(min) = get(&item.min)
                    && req < min
                {
                    problems.push(format!(
                        "LimitRange {} requires at least {} {res} per container, declared request {}",
                        lr.name_any(),
                        show(res, min),
                        show(res, req)
                    ));
                }
                if let Some(ratio) = get(&item.max_limit_request_ratio)
                    && req > 0
                    && lim * 1000 > ratio * req
                {
                    problems.push(format!(
                        "LimitRange {} allows a {res} limit/request ratio of at most {}, declared {}/{}",
                        lr.name_any(),
                        ratio as f64 / 1000.0,
                        show(res, lim),
                        show(res, req)
                    ));
                }
            }
        }
    }
    if changes.is_empty() {
        return problems;
    }
    for q in quotas {
        let hard = q
            .spec
            .as_ref()
            .and_then(|s| s.hard.clone())
            .unwrap_or_default();
        let used = q
            .status
            .as_ref()
            .and_then(|s| s.used.clone())
            .unwrap_or_default();
        for key in KEYS {
            let alias = key.strip_prefix("requests.").unwrap_or(key);
            let name = if hard.contains_key(key) { key } else { alias };
            let Some(h) = hard.get(name).and_then(|q| quantity::millis(&q.0)) else {
                continue;
            };
            let u = used
                .get(name)
                .and_then(|q| quantity::millis(&q.0))
                .unwrap_or(0);
            let want = desired.amount(key);
            let added: i128 = changes
                .iter()
                .map(|w| i128::from(w.replicas.max(0)) * (want - w.current(key)).max(0))
                .sum();
            let surge: i128 = changes
                .iter()
                .filter(|w| w.kind == Kind::Deployment)
                .map(|w| w.other_containers.get(key).copied().unwrap_or(0) + want)
                .max()
                .unwrap_or(0);
            if u + added + surge > h {
                problems.push(format!(
                    "ResourceQuota {} {name}: {} used of {}, the declared sidecars add {} plus {} for a surge pod",
                    q.name_any(),
                    show(key, u),
                    show(key, h),
                    show(key, added),
                    show(key, surge)
                ));
            }
        }
    }
    problems
}
