//! Integration tests against a real kube-apiserver and etcd (see testplane). One API server
//! serves the whole binary; every test has its own namespaces and policy label.
mod budgets;
mod certificates;
mod common;
mod crd;
mod ha;
mod ha_rollout;
mod installers;
mod lifecycle;
mod mtls;
mod plan;
mod resilience;
mod security;
mod sidecars;
mod status;
mod validation;
