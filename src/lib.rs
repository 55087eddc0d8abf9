//! integration-operator: runs clustered integration servers from one
//! `IntegrationCluster` resource.
//!
//! - [`api`]: the custom resource, its schema and CEL rules.
//! - [`naming`]: cluster, node and logical host names.
//! - [`validation`]: the checks the API server cannot make.
//! - [`controller`]: the reconcile pipeline.
//! - [`listeners`]: single-node listener leases and multi-node claims (in the agent).
//! - [`database`]: the cluster database (provisioning, migrations, guaranteed delivery).
//! - [`render`], [`workload`]: configuration and the objects built from it.
//! - [`plugin`]: the pure parts of `kubectl integration`.
//! - [`telemetry`]: logging setup; [`metrics`]: Prometheus metrics and health endpoints.

pub mod agent;
pub mod api;
pub mod cache;
pub mod controller;
pub mod database;
pub mod kube_client;
pub mod lease;
pub mod listeners;
pub mod metrics;
pub mod naming;
pub mod plugin;
pub mod protocol;
pub mod render;
pub mod telemetry;
pub mod validation;
pub mod workflows;
pub mod workload;
