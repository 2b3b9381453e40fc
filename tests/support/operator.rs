//! The operator binary as a child process, and waiting on it.
#![allow(dead_code)]
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The operator binary running as a child process.
pub struct Replica {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Replica {
    /// `meshwarden run args…` as `name` (its Lease identity), logging to `dir/name.log`.
    pub fn start(kubeconfig: &Path, name: &str, dir: &Path, args: &[&str]) -> Replica {
        let port = free_port();
        let log = dir.join(format!("{name}.log"));
        let child = Command::new(env!("CARGO_BIN_EXE_meshwarden"))
            .arg("run")
            .args(args)
            .arg(format!("--metrics-addr=127.0.0.1:{port}"))
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", name)
            .env("POD_NAMESPACE", "meshwarden")
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start meshwarden");
        Replica { child, port, log }
    }

    pub async fn metric(&self, name: &str) -> Option<f64> {
        let text = http_get(self.port, "/metrics").await?;
        text.lines()
            .find(|l| l.starts_with(name) && l[name.len()..].starts_with(' '))
            .and_then(|l| l.rsplit(' ').next())
            .and_then(|v| v.parse().ok())
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bare HTTP/1.0 GET on loopback (the endpoints need nothing more).
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port))
        .await
        .ok()?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut buf = String::new();
    s.read_to_string(&mut buf).await.ok()?;
    let (head, body) = buf.split_once("\r\n\r\n")?;
    (head.split(' ').nth(1) == Some("200")).then(|| body.to_string())
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

/// A kubeconfig at `out` that authenticates as the ServiceAccount `namespace/name` (a token
/// from a TokenRequest, valid an hour), for the API server of `admin_kubeconfig`: real
/// authentication, real RBAC.
pub async fn service_account_kubeconfig(
    admin: &kube::Client,
    admin_kubeconfig: &Path,
    (namespace, name): (&str, &str),
    out: &Path,
) -> PathBuf {
    use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
    use k8s_openapi::api::core::v1::ServiceAccount;
    let sas: kube::Api<ServiceAccount> = kube::Api::namespaced(admin.clone(), namespace);
    let tr = sas
        .create_token_request(
            name,
            &kube::api::PostParams::default(),
            &TokenRequest {
                spec: TokenRequestSpec {
                    audiences: vec![],
                    expiration_seconds: Some(3600),
                    ..Default::default()
                },
                ..Default::default()
            },
        )
        .await
        .expect("TokenRequest for the ServiceAccount");
    let token = tr.status.unwrap().token;
    let admin_kc: serde_yaml::Value =
        serde_yaml::from_str(&std::fs::read_to_string(admin_kubeconfig).unwrap()).unwrap();
    let cluster = &admin_kc["clusters"][0]["cluster"];
    let server = cluster["server"].as_str().unwrap();
    let ca = cluster["certificate-authority"].as_str().unwrap();
    std::fs::write(out, format!(
        "apiVersion: v1\nkind: Config\nclusters: [{{name: t, cluster: {{server: '{server}', certificate-authority: '{ca}'}}}}]\nusers: [{{name: sa, user: {{token: '{token}'}}}}]\ncontexts: [{{name: t, context: {{cluster: t, user: sa}}}}]\ncurrent-context: t\n"
    )).unwrap();
    out.to_path_buf()
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
