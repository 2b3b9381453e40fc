//! Integration tests against a real kube-apiserver and etcd (see testplane). One API server
//! serves the whole binary; every test has its own namespaces and policy label.
mod budgets;
mod certificates;
mod common;
mod crd;
mod ha;
mod installers;
mod lifecycle;
mod mtls;
mod plan;
mod report_triggers;
mod resilience;
mod rollout_in_progress;
mod security;
mod sidecars;
mod status;
mod validation;
