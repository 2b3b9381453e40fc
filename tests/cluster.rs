//! meshwarden on the full test cluster (controllers, scheduler, kwok nodes in zones, Istio
//! installed by Helm, a real istiod injecting sidecars): one file per scenario under
//! `tests/cluster/`, sharing one cluster per run (`common::cluster_env`) and the helpers of
//! `cluster/support.rs`. `behaviour.rs` checks first what the other scenarios stand on: that
//! the cluster does what a cluster does.

#[allow(dead_code)]
#[path = "integration/common.rs"]
mod common;

#[path = "cluster/ambient.rs"]
mod ambient;
#[path = "cluster/behaviour.rs"]
mod behaviour;
#[path = "cluster/certificates.rs"]
mod certificates;
#[path = "cluster/gateway_api.rs"]
mod gateway_api;
#[path = "cluster/gateway_api_by_name.rs"]
mod gateway_api_by_name;
#[path = "cluster/helm_lifecycle.rs"]
mod helm_lifecycle;
#[path = "cluster/plan.rs"]
mod plan;
#[path = "cluster/posture.rs"]
mod posture;
#[path = "cluster/report.rs"]
mod report;
#[path = "cluster/rollout_gate.rs"]
mod rollout_gate;
#[path = "cluster/sidecars.rs"]
mod sidecars;
#[allow(dead_code)]
#[path = "cluster/support.rs"]
mod support;
#[path = "cluster/upgrades.rs"]
mod upgrades;
#[path = "cluster/upgrades_injection.rs"]
mod upgrades_injection;

use std::collections::BTreeSet;
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::AtomicI32;
use std::sync::atomic::Ordering::SeqCst;
use std::time::{Duration, Instant};
use testplane::cluster::rolling;

use k8s_openapi::api::apps::v1::Deployment;
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Node, Pod};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{Api, DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Client, ResourceExt};
use meshwarden::api::MeshPolicy;
use serde_json::json;
use support::*;
