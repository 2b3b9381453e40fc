//! `meshwarden-bench`: benchmarks of meshwarden against a real kube-apiserver, each with a
//! baseline measured in the same run. See docs/benchmarks.md.
mod common;
mod drift;
mod evaluate;
mod faults;
mod leak;
mod mtls;
mod scale;
mod settle;
mod sidecars;

#[tokio::main]
async fn main() {
    if std::env::var_os("RUST_LOG").is_some() {
        tracing_subscriber::fmt()
            .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
            .with_writer(std::io::stderr)
            .init();
    }
    let args: Vec<String> = std::env::args().skip(1).collect();
    let n = |i: usize, default: usize| args.get(i).and_then(|n| n.parse().ok()).unwrap_or(default);
    match args.first().map(String::as_str) {
        Some("drift") => drift::run(n(1, 50)).await,
        Some("mtls") => mtls::run(n(1, 1000)).await,
        Some("leak") => leak::run(n(1, 10000)).await,
        Some("faults") => {
            let cluster = args.iter().any(|a| a == "--cluster");
            let rest: Vec<&String> = args.iter().skip(1).filter(|a| *a != "--cluster").collect();
            let n = |i: usize, default: usize| {
                rest.get(i).and_then(|n| n.parse().ok()).unwrap_or(default)
            };
            let fleet = n(1, if cluster { 20 } else { 200 });
            faults::run(n(0, 10) as u64, fleet, cluster).await
        }
        Some("scale") => {
            let rate = args.get(4).and_then(|r| r.parse().ok()).unwrap_or(100.0);
            scale::run(n(1, 5000), n(2, 10000), n(3, 50000), rate, n(5, 60) as u64).await
        }
        Some("evaluate") => evaluate::run(n(1, 5000), n(2, 10000), n(3, 50000), n(4, 20)),
        Some("sidecars") => sidecars::run(n(1, 200), n(2, 5000), n(3, 10000)).await,
        _ => {
            eprintln!(
                "usage: meshwarden-bench drift [N] | mtls [N] | leak [PODS] (default 10000) | faults [--cluster] [OUTAGE_SECS FLEET] (defaults 10 200; 10 20 with --cluster) | sidecars [NAMESPACES DEPLOYMENTS PODS] (defaults 200 5000 10000) | evaluate [NAMESPACES DEPLOYMENTS PODS EVALUATIONS] (defaults 5000 10000 50000 20) | scale [NAMESPACES DEPLOYMENTS PODS EVENTS_PER_S SECONDS] (defaults 5000 10000 50000 100 60)"
            );
            std::process::exit(2);
        }
    }
}
