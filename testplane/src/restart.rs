//! Fault injection on a plane a test owns: kill kube-apiserver (as `kill -9` would) and start
//! it again with the same arguments, etcd and data untouched.

use std::fs;
use std::path::PathBuf;

use crate::{Error, Lifetime, Plane, Result, io, spawn};

const APISERVER: &str = "kube-apiserver";

impl Plane {
    /// Kills kube-apiserver with SIGKILL and waits for it to exit. etcd keeps running.
    pub fn kill_apiserver(&mut self) -> Result<()> {
        let i = self.apiserver_index()?;
        let cmdline = PathBuf::from(format!("/proc/{}/cmdline", self.children[i].id()));
        let args = io(&cmdline, fs::read(&cmdline))?;
        let saved = self.dir.join("kube-apiserver.cmdline");
        io(&saved, fs::write(&saved, args))?;
        let mut child = self.children.remove(i);
        let _ = child.kill();
        let _ = child.wait();
        Ok(())
    }

    /// Starts kube-apiserver again with the arguments it had when [`Plane::kill_apiserver`]
    /// stopped it, and waits until it is ready (its log goes to `kube-apiserver.restarted.log`).
    pub async fn restart_apiserver(&mut self) -> Result<()> {
        let saved = self.dir.join("kube-apiserver.cmdline");
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
        let log = self.dir.join("kube-apiserver.restarted.log");
        let child = spawn(&bin, &args, &log, Lifetime::Attached)?;
        self.children.insert(0, child);
        self.wait_ready().await
    }

    fn apiserver_index(&self) -> Result<usize> {
        self.children
            .iter()
            .position(|c| {
                fs::read(format!("/proc/{}/cmdline", c.id())).is_ok_and(|cmd| {
                    cmd.split(|b| *b == 0)
                        .next()
                        .is_some_and(|argv0| argv0.ends_with(APISERVER.as_bytes()))
                })
            })
            .ok_or_else(|| Error::Manifest(format!("no running {APISERVER} in this plane")))
    }
}
