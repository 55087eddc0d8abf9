//! integration-operator: runs clustered integration servers from one
//! `IntegrationCluster` resource.
//!
//! - [`api`]: the custom resource, its schema and CEL rules.
//! - [`naming`]: cluster, node and logical host names.
//! - [`validation`]: the checks the API server cannot make.
//! - [`controller`]: the reconcile pipeline.
//! - [`telemetry`]: logging setup.

pub mod api;
pub mod controller;
pub mod naming;
pub mod render;
pub mod telemetry;
pub mod validation;
pub mod workload;
