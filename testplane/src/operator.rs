//! The operator binary as a child process of a test or benchmark: started with a kubeconfig,
//! its `/livez`, `/readyz` and `/metrics` on a free loopback port, its log in the plane dir.
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

/// A free loopback port for the operator's endpoints (see [`crate::ports`]).
pub fn free_port() -> std::io::Result<u16> {
    crate::ports::free_port()
}

/// `meshwarden run` as a child process; killed when dropped.
pub struct Operator {
    pub child: Child,
    pub port: u16,
    pub log: PathBuf,
}

impl Operator {
    /// `bin run args…` as `name` (its Lease identity, `POD_NAME`) in namespace `meshwarden`,
    /// logging to `dir/name.log` (appended, so a restarted instance keeps the earlier log).
    pub fn start(
        bin: &Path,
        kubeconfig: &Path,
        name: &str,
        dir: &Path,
        args: &[&str],
    ) -> std::io::Result<Operator> {
        let port = free_port()?;
        let log = dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)?;
        let child = Command::new(bin)
            .arg("run")
            .args(args)
            .arg(format!("--metrics-addr=127.0.0.1:{port}"))
            .env("KUBECONFIG", kubeconfig)
            .env("POD_NAME", name)
            .env("POD_NAMESPACE", "meshwarden")
            .env(
                "RUST_LOG",
                std::env::var("TEST_OPERATOR_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdout(Stdio::null())
            .stderr(file)
            .spawn()?;
        Ok(Operator { child, port, log })
    }

    /// The value of an unlabelled metric, if served.
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

    /// SIGTERM, as Kubernetes stops a pod.
    pub fn terminate(&self) -> std::io::Result<()> {
        let pid = libc::pid_t::try_from(self.child.id()).map_err(std::io::Error::other)?;
        // SAFETY: kill(2) on the pid of our own child, which has not been waited for.
        if unsafe { libc::kill(pid, libc::SIGTERM) } == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A bare HTTP/1.0 GET on loopback: the body of a 200 answer.
pub async fn http_get(port: u16, path: &str) -> Option<String> {
    let (status, body) = http_answer(port, path).await?;
    (status == 200).then_some(body)
}

/// A bare HTTP/1.0 GET on loopback: the answer's status code and body, whatever the status.
pub async fn http_answer(port: u16, path: &str) -> Option<(u16, String)> {
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
    let status = head.split(' ').nth(1)?.parse().ok()?;
    Some((status, body.to_string()))
}
