//! The operator binary as a child process (`testplane::operator`), and waiting on it.
#![allow(dead_code)]
use std::path::Path;
use std::time::{Duration, Instant};

use testplane::operator::Operator;
pub use testplane::operator::http_get;

/// This package's operator binary as a child process.
pub struct Replica(Operator);

impl Replica {
    /// `meshwarden run args…` as `name` (its Lease identity), logging to `dir/name.log`. The
    /// binary is this package's, or `MESHWARDEN_BIN` (a copy taken right after a build, when
    /// the target directory is shared with other checkouts that may rebuild it meanwhile).
    pub fn start(kubeconfig: &Path, name: &str, dir: &Path, args: &[&str]) -> Replica {
        let bin = std::env::var_os("MESHWARDEN_BIN")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| env!("CARGO_BIN_EXE_meshwarden").into());
        Replica(Operator::start(&bin, kubeconfig, name, dir, args).expect("start meshwarden"))
    }
}

impl std::ops::Deref for Replica {
    type Target = Operator;
    fn deref(&self) -> &Operator {
        &self.0
    }
}

impl std::ops::DerefMut for Replica {
    fn deref_mut(&mut self) -> &mut Operator {
        &mut self.0
    }
}

pub async fn eventually<T, F, Fut>(secs: u64, what: &str, f: F) -> T
where
    F: Fn() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = f().await {
            return v;
        }
        assert!(
            start.elapsed() < Duration::from_secs(secs),
            "timed out after {secs}s waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Creates a MeshPolicy from a whole YAML object; returns the API to read it back.
pub async fn create_policy(
    client: &kube::Client,
    yaml: &str,
) -> kube::Api<meshwarden::api::MeshPolicy> {
    let api: kube::Api<meshwarden::api::MeshPolicy> = kube::Api::all(client.clone());
    let policy: meshwarden::api::MeshPolicy = serde_yaml::from_str(yaml).unwrap();
    api.create(&kube::api::PostParams::default(), &policy)
        .await
        .unwrap();
    api
}
