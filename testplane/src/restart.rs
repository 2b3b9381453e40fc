//! Fault injection on a plane a test owns: kill kube-apiserver or etcd (as `kill -9` would)
//! and start it again with the same arguments and data; compact etcd (so that watches from
//! before the compaction expire). [`Outage`] runs one of the three outages the fault tests and
//! `meshwarden-bench faults` inject.

use std::fs;
use std::io::{Read, Write};
use std::path::PathBuf;
use std::time::Duration;

use crate::{Error, Lifetime, Plane, Result, io, spawn};

const APISERVER: &str = "kube-apiserver";
const ETCD: &str = "etcd";

impl Plane {
    /// Kills kube-apiserver with SIGKILL and waits for it to exit. etcd keeps running.
    pub fn kill_apiserver(&mut self) -> Result<()> {
        self.kill_component(APISERVER)
    }

    /// Starts kube-apiserver again with the arguments it had when [`Plane::kill_apiserver`]
    /// stopped it, and waits until it is ready (its log goes to `kube-apiserver.restarted.log`).
    pub async fn restart_apiserver(&mut self) -> Result<()> {
        self.restart_component(APISERVER)?;
        self.wait_ready().await
    }

    /// Kills etcd with SIGKILL and waits for it to exit. kube-apiserver keeps running (and
    /// fails its readiness until etcd is back).
    pub fn kill_etcd(&mut self) -> Result<()> {
        self.kill_component(ETCD)
    }

    /// Starts etcd again on its data and waits until kube-apiserver is ready again.
    pub async fn restart_etcd(&mut self) -> Result<()> {
        self.restart_component(ETCD)?;
        self.wait_ready().await
    }

    /// Writes a key outside the API server's prefix (so etcd's revision moves on) and compacts
    /// etcd at its current revision, through etcd's JSON gateway. A watch from an earlier
    /// resourceVersion then ends with `410 Expired`. Returns the compacted revision.
    pub fn compact_etcd(&self) -> Result<i64> {
        let url = self.etcd_url()?;
        let put = etcd_post(
            &url,
            "/v3/kv/put",
            r#"{"key":"dGVzdHBsYW5lL2NvbXBhY3Q=","value":"eA=="}"#,
        )?;
        let revision = put["header"]["revision"]
            .as_str()
            .and_then(|r| r.parse::<i64>().ok())
            .or_else(|| put["header"]["revision"].as_i64())
            .ok_or_else(|| Error::Manifest(format!("etcd put answered {put}")))?;
        etcd_post(
            &url,
            "/v3/kv/compaction",
            &format!(r#"{{"revision":"{revision}","physical":true}}"#),
        )?;
        Ok(revision)
    }

    /// etcd's client URL, from the running (or last killed) etcd's command line.
    fn etcd_url(&self) -> Result<String> {
        let args = match self.component_index(ETCD) {
            Ok(i) => io(
                &self.dir,
                fs::read(format!("/proc/{}/cmdline", self.children[i].id())),
            )?,
            Err(_) => {
                let saved = self.saved(ETCD);
                io(&saved, fs::read(&saved))?
            }
        };
        args.split(|b| *b == 0)
            .filter_map(|a| std::str::from_utf8(a).ok())
            .find_map(|a| a.strip_prefix("--listen-client-urls="))
            .map(str::to_string)
            .ok_or_else(|| Error::Manifest("etcd has no --listen-client-urls".into()))
    }

    /// On a cluster, stops kube-controller-manager and kube-scheduler and starts them again
    /// with the same arguments (logs in `<name>.restarted.log`); nothing on a bare plane.
    ///
    /// A real control plane's controller manager and scheduler run with leader election and
    /// exit when they cannot renew their lease for `--leader-elect-renew-deadline` (10 s), so
    /// after an outage of the API server or etcd they start afresh with new informers. Here
    /// they run without it (one instance each) and live through the outage; after a watch
    /// expiry (etcd compacted while kube-apiserver was down) the controller manager's
    /// informers were found stale: the Deployment controller ignored a Deployment's new
    /// generation for over a minute, then retried a ReplicaSet update from its stale cache
    /// with `409 Conflict` every few seconds. Restarting them is what a real cluster does.
    ///
    /// Returns once the new controller manager has started its controllers: until then it
    /// waits for the API server's `/healthz` and exits when that takes too long, as it would
    /// if the next outage came at once.
    pub async fn restart_controllers(&mut self) -> Result<()> {
        if self.flavor != crate::Flavor::Cluster {
            return Ok(());
        }
        for name in ["kube-controller-manager", "kube-scheduler"] {
            self.kill_component(name)?;
            self.restart_component(name)?;
        }
        let log = self.dir.join("kube-controller-manager.restarted.log");
        let started = std::time::Instant::now();
        while !fs::read_to_string(&log)
            .is_ok_and(|l| l.contains(r#""Starting controller" controller="deployment""#))
        {
            if started.elapsed() > Duration::from_secs(60) {
                return Err(Error::NotReady {
                    what: "kube-controller-manager",
                    secs: started.elapsed().as_secs(),
                    log: crate::tail(&log, 20),
                });
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }

    /// Names of the plane's processes that have exited (a controller, the scheduler, kwok or
    /// istiod that did not survive a fault), with their exit status.
    pub fn exited(&mut self) -> Vec<String> {
        self.children
            .iter_mut()
            .filter_map(|c| {
                let status = c.try_wait().ok()??;
                Some(format!("process {} ({status})", c.id()))
            })
            .collect()
    }

    fn saved(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.cmdline"))
    }

    fn kill_component(&mut self, name: &str) -> Result<()> {
        let i = self.component_index(name)?;
        let cmdline = PathBuf::from(format!("/proc/{}/cmdline", self.children[i].id()));
        let args = io(&cmdline, fs::read(&cmdline))?;
        let saved = self.saved(name);
        io(&saved, fs::write(&saved, args))?;
        let mut child = self.children.remove(i);
        let _ = child.kill();
        let _ = child.wait();
        Ok(())
    }

    fn restart_component(&mut self, name: &str) -> Result<()> {
        let saved = self.saved(name);
        let raw = io(&saved, fs::read(&saved))?;
        let mut argv = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned());
        let bin = argv
            .next()
            .map(PathBuf::from)
            .ok_or_else(|| Error::Manifest(format!("{} holds no command line", saved.display())))?;
        let args: Vec<String> = argv.collect();
        let log = self.dir.join(format!("{name}.restarted.log"));
        let child = spawn(&bin, &args, &log, Lifetime::Attached)?;
        self.children.insert(0, child);
        Ok(())
    }

    fn component_index(&self, name: &str) -> Result<usize> {
        self.children
            .iter()
            .position(|c| {
                fs::read(format!("/proc/{}/cmdline", c.id())).is_ok_and(|cmd| {
                    cmd.split(|b| *b == 0).next().is_some_and(|argv0| {
                        argv0.ends_with(format!("/{name}").as_bytes()) || argv0 == name.as_bytes()
                    })
                })
            })
            .ok_or_else(|| Error::Manifest(format!("no running {name} in this plane")))
    }
}

/// An outage of the plane, ended when kube-apiserver is ready again.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outage {
    /// kube-apiserver killed with SIGKILL, started again after the outage.
    Apiserver,
    /// etcd killed with SIGKILL (kube-apiserver keeps running), started again after it.
    Etcd,
    /// A watch expiry: kube-apiserver killed, etcd compacted halfway through the outage, so a
    /// watch resumed from its last resourceVersion ends with `410 Expired`.
    Expiry,
}

impl Outage {
    /// The outage in words, for logs and tables.
    pub fn describe(self, secs: u64) -> String {
        match self {
            Outage::Apiserver => format!("kill -9 kube-apiserver, restarted after {secs} s"),
            Outage::Etcd => format!("kill -9 etcd, restarted after {secs} s"),
            Outage::Expiry => {
                format!("watch expiry: etcd compacted during a {secs} s API server outage")
            }
        }
    }

    /// Injects the outage, lasting `outage`, and returns once kube-apiserver is ready again
    /// (on a cluster, with the controller manager and scheduler started again, as
    /// [`Plane::restart_controllers`] explains).
    pub async fn inject(self, plane: &mut Plane, outage: Duration) -> Result<()> {
        self.inject_only(plane, outage).await?;
        plane.restart_controllers().await
    }

    async fn inject_only(self, plane: &mut Plane, outage: Duration) -> Result<()> {
        match self {
            Outage::Apiserver => {
                plane.kill_apiserver()?;
                tokio::time::sleep(outage).await;
                plane.restart_apiserver().await
            }
            Outage::Etcd => {
                plane.kill_etcd()?;
                tokio::time::sleep(outage).await;
                plane.restart_etcd().await
            }
            Outage::Expiry => {
                plane.kill_apiserver()?;
                tokio::time::sleep(outage / 2).await;
                plane.compact_etcd()?;
                tokio::time::sleep(outage / 2).await;
                plane.restart_apiserver().await
            }
        }
    }
}

/// A JSON POST to etcd's gateway on loopback (plain HTTP/1.0, one request per connection).
fn etcd_post(url: &str, path: &str, body: &str) -> Result<serde_json::Value> {
    let addr = url.trim_start_matches("http://");
    let err = |e: std::io::Error| Error::Manifest(format!("etcd {addr}{path}: {e}"));
    let mut s = std::net::TcpStream::connect(addr).map_err(err)?;
    write!(
        s,
        "POST {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .map_err(err)?;
    let mut answer = String::new();
    s.read_to_string(&mut answer).map_err(err)?;
    let (head, json) = answer.split_once("\r\n\r\n").unwrap_or((&answer, ""));
    if head.split(' ').nth(1) != Some("200") {
        return Err(Error::Manifest(format!(
            "etcd {path} answered {head}: {json}"
        )));
    }
    serde_json::from_str(json).map_err(|e| Error::Manifest(format!("etcd {path}: {e}")))
}
