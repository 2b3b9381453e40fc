//! An HTTP proxy a test puts between a client (the operator) and the API server, to take the
//! client's connections down and bring them back at chosen moments, and to hold chosen
//! requests, without touching the API server.
//!
//! The client speaks plain HTTP to the proxy ([`Proxy::kubeconfig`]); the proxy sends each
//! request on to the API server as the plane's user of its choice (a `kube::Client` of that
//! user's kubeconfig), streaming the answer back, so watches pass through as they are.
//! - [`Proxy::cut`]: every open connection is closed and every new one is closed as soon as it
//!   is accepted, so each of the client's watches fails and retries; [`Proxy::restore`] lets
//!   them through again, and they list afresh.
//! - [`Proxy::hold`]: requests matching a rule wait (as requests to a restarting API server
//!   can, say for a custom resource it does not serve yet) until [`Proxy::release`];
//!   [`Proxy::stop_holding`] lets new ones through while those already held keep waiting;
//!   [`Proxy::hold_answers`] sends the held requests on but holds their answers (a LIST
//!   answered now and delivered late).
use std::convert::Infallible;
use std::path::Path;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};

use http_body_util::{BodyExt, Full, combinators::UnsyncBoxBody};
use hyper::body::{Bytes, Incoming};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::{Error, Result, io};

type BoxError = Box<dyn std::error::Error + Send + Sync>;
type Body = UnsyncBoxBody<Bytes, BoxError>;

/// Which requests a hold rule takes: method and path with query.
pub type Matcher = Box<dyn Fn(&Method, &str) -> bool + Send + Sync>;

struct Rule {
    name: String,
    matches: Matcher,
    /// New matching requests are held.
    holding: bool,
    /// Held requests wait until this is true.
    open: watch::Sender<bool>,
    /// Their answers wait until this is true.
    answers: watch::Sender<bool>,
    held: Arc<AtomicUsize>,
    held_answers: Arc<AtomicUsize>,
}

struct Shared {
    cut: watch::Sender<bool>,
    rules: Mutex<Vec<Rule>>,
    upstream: kube::Client,
}

pub struct Proxy {
    /// The port the proxy listens on (127.0.0.1, plain HTTP).
    pub port: u16,
    shared: Arc<Shared>,
    task: tokio::task::JoinHandle<()>,
}

impl Proxy {
    /// Listens on a free loopback port and sends every request on to the API server of
    /// `kubeconfig`, as its user.
    pub async fn start(kubeconfig: &Path) -> Result<Proxy> {
        let upstream = crate::client_from(kubeconfig).await?;
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .map_err(|e| Error::Manifest(format!("proxy listen: {e}")))?;
        let port = listener
            .local_addr()
            .map_err(|e| Error::Manifest(format!("proxy listen: {e}")))?
            .port();
        let shared = Arc::new(Shared {
            cut: watch::Sender::new(false),
            rules: Mutex::new(Vec::new()),
            upstream,
        });
        let s = shared.clone();
        let task = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let mut cut = s.cut.subscribe();
                if *cut.borrow_and_update() {
                    drop(tcp);
                    continue;
                }
                let s = s.clone();
                tokio::spawn(async move {
                    let service = hyper::service::service_fn(move |req| forward(s.clone(), req));
                    let conn = hyper::server::conn::http1::Builder::new()
                        .serve_connection(TokioIo::new(tcp), service);
                    tokio::select! {
                        _ = conn => {}
                        _ = cut.wait_for(|cut| *cut) => {}
                    }
                });
            }
        });
        Ok(Proxy { port, shared, task })
    }

    /// Closes every open connection and every new one from now on.
    pub fn cut(&self) {
        self.shared.cut.send_replace(true);
    }

    /// Serves new connections again.
    pub fn restore(&self) {
        self.shared.cut.send_replace(false);
    }

    /// Holds every new request that `matches` (and no earlier rule holds) under `name`.
    pub fn hold(&self, name: &str, matches: Matcher) {
        if let Ok(mut rules) = self.shared.rules.lock() {
            rules.push(Rule {
                name: name.to_string(),
                matches,
                holding: true,
                open: watch::Sender::new(false),
                answers: watch::Sender::new(false),
                held: Arc::default(),
                held_answers: Arc::default(),
            });
        }
    }

    /// How many requests `name` holds now.
    pub fn held(&self, name: &str) -> usize {
        self.with_rule(name, |r| r.held.load(Ordering::SeqCst))
            .unwrap_or(0)
    }

    /// How many answers `name` holds now.
    pub fn held_answers(&self, name: &str) -> usize {
        self.with_rule(name, |r| r.held_answers.load(Ordering::SeqCst))
            .unwrap_or(0)
    }

    /// Sends the requests `name` holds, and those it takes from now on, to the API server,
    /// and holds their answers until [`Proxy::release`].
    pub fn hold_answers(&self, name: &str) {
        self.with_rule(name, |r| {
            r.open.send_replace(true);
        });
    }

    /// Holds no new request under `name`; those it holds keep waiting.
    pub fn stop_holding(&self, name: &str) {
        self.with_rule(name, |r| r.holding = false);
    }

    /// Holds no new request under `name` and lets those it holds through.
    pub fn release(&self, name: &str) {
        self.with_rule(name, |r| {
            r.holding = false;
            r.open.send_replace(true);
            r.answers.send_replace(true);
        });
    }

    fn with_rule<T>(&self, name: &str, f: impl FnOnce(&mut Rule) -> T) -> Option<T> {
        let mut rules = self.shared.rules.lock().ok()?;
        rules.iter_mut().find(|r| r.name == name).map(f)
    }

    /// Writes a kubeconfig for a client of this proxy to `path` (plain HTTP, no credentials:
    /// the proxy authenticates to the API server).
    pub fn kubeconfig(&self, path: &Path) -> Result<()> {
        let yaml = format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: proxy, cluster: {{server: 'http://127.0.0.1:{}'}}}}]\n\
             users: [{{name: proxy, user: {{}}}}]\ncontexts: [{{name: proxy, context: {{cluster: proxy, user: proxy}}}}]\n\
             current-context: proxy\n",
            self.port
        );
        io(path, std::fs::write(path, yaml))
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.cut();
        if let Ok(rules) = self.shared.rules.lock() {
            for r in rules.iter() {
                r.open.send_replace(true);
                r.answers.send_replace(true);
            }
        }
        self.task.abort();
    }
}

fn answer(status: StatusCode, text: String) -> Response<Body> {
    let mut r = Response::new(
        Full::new(Bytes::from(text))
            .map_err(|e| match e {})
            .boxed_unsync(),
    );
    *r.status_mut() = status;
    r
}

/// One request: held while a rule says so, then sent on; the answer streams back.
async fn forward(
    shared: Arc<Shared>,
    req: Request<Incoming>,
) -> Result<Response<Body>, Infallible> {
    let path = req
        .uri()
        .path_and_query()
        .map_or("/".to_string(), |p| p.as_str().to_string());
    let gate = shared.rules.lock().ok().and_then(|rules| {
        rules
            .iter()
            .find(|r| r.holding && (r.matches)(req.method(), &path))
            .map(|r| {
                (
                    (r.open.subscribe(), r.held.clone()),
                    (r.answers.subscribe(), r.held_answers.clone()),
                )
            })
    });
    let (before, after) = gate.unzip();
    if let Some((mut open, held)) = before {
        held.fetch_add(1, Ordering::SeqCst);
        let _ = open.wait_for(|open| *open).await;
        held.fetch_sub(1, Ordering::SeqCst);
    }
    let (parts, body) = req.into_parts();
    let bytes = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(e) => return Ok(answer(StatusCode::BAD_REQUEST, e.to_string())),
    };
    let mut out = Request::builder().method(parts.method).uri(path);
    for (k, v) in &parts.headers {
        use hyper::header::{CONNECTION, CONTENT_LENGTH, HOST, TRANSFER_ENCODING};
        if ![HOST, CONNECTION, CONTENT_LENGTH, TRANSFER_ENCODING].contains(k) {
            out = out.header(k, v);
        }
    }
    let out = match out.body(kube::client::Body::from(bytes.to_vec())) {
        Ok(r) => r,
        Err(e) => return Ok(answer(StatusCode::BAD_REQUEST, e.to_string())),
    };
    let answer = match shared.upstream.send(out).await {
        Ok(resp) => resp.map(|b| b.map_err(|e| Box::new(e) as BoxError).boxed_unsync()),
        Err(e) => answer(StatusCode::BAD_GATEWAY, e.to_string()),
    };
    if let Some((mut answers, held)) = after {
        held.fetch_add(1, Ordering::SeqCst);
        let _ = answers.wait_for(|open| *open).await;
        held.fetch_sub(1, Ordering::SeqCst);
    }
    Ok(answer)
}
