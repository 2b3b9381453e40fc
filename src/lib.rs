//! meshwarden: a Kubernetes operator that keeps an Istio mesh in production posture.
//!
//! `api` declares the MeshPolicy resource; `controller` runs the reconcile loop; each module
//! under `rules` holds one rule section; `write` is the only write path.
pub mod api;
pub mod compact;
pub mod context;
pub mod controller;
pub mod error;
pub mod hash;
pub mod istio;
pub mod plan;
pub mod policy;
pub mod presence;
pub mod quantity;
pub mod rules;
pub mod selector;
pub mod status;
pub mod telemetry;
pub mod watch;
pub mod write;
pub mod yaml;
