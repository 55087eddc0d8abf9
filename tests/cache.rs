//! The managed cache as the servers depend on it: a cache that goes away
//! makes the cluster Degraded without restarting its servers, holds back new
//! servers (they would terminate at start, seed 003), and the cluster heals
//! when the cache returns.

mod support;

use std::collections::BTreeMap;
use std::time::Duration;

use integration_operator::api::{IntegrationCluster, IntegrationClusterStatus};
use k8s_openapi::api::core::v1::Pod;
use kube::Client;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use serde_json::json;
use support::*;

fn degraded_reason(status: &IntegrationClusterStatus) -> Option<&str> {
    status
        .conditions
        .iter()
        .find(|c| c.type_ == "Degraded" && c.status == "True")
        .map(|c| c.reason.as_str())
}

async fn pods(client: &Client, ns: &str, component: &str) -> BTreeMap<String, Pod> {
    live_pods(client, ns, "tsa", component).await
}

#[tokio::test]
async fn a_lost_cache_degrades_the_cluster_holds_new_servers_and_heals_without_restarts() {
    let client = admin().await;
    let ns = namespace(&client, "cache").await;
    let _operator = Operator::start(&ns);
    let yaml = "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata: {name: tsa}\n\
                spec:\n  profile: webmethods-is\n  mode: stateful\n  image: registry.example.com/msr:10.15\n  replicas: 2\n  \
                cache:\n    mode: managed\n    managed:\n      replicas: 2\n      \
                image: registry.example.com/bigmemorymax-server:4.5.0\n      \
                licenseSecretRef: {name: tc-license, key: license.key}\n";
    create_yaml(&client, &ns, yaml).await.expect("create");
    let api: Api<IntegrationCluster> = Api::namespaced(client.clone(), &ns);
    status_when(&api, "tsa", "Ready", |s| {
        s.phase == Some(integration_operator::api::Phase::Ready)
    })
    .await;
    let servers = uids(&pods(&client, &ns, "server").await);
    assert_eq!(servers.len(), 2);

    // Both cache servers stop being ready (kwok's "broken" stage).
    for pod in pods(&client, &ns, "cache").await.keys() {
        kubectl(&["label", "pod", "-n", &ns, pod, "integration.dev/sim=broken"]);
    }
    let status = status_when(&api, "tsa", "Degraded CacheUnavailable", |s| {
        degraded_reason(s) == Some("CacheUnavailable")
    })
    .await;
    assert_eq!(status.cache.as_ref().and_then(|c| c.ready_servers), Some(0));
    assert!(!status.cache.as_ref().is_some_and(|c| c.ready));

    // A new node would terminate without its cache: it is not started.
    api.patch(
        "tsa",
        &PatchParams::default(),
        &Patch::Merge(json!({"spec": {"replicas": 3}})),
    )
    .await
    .expect("scale up");
    let waiting = status_when(&api, "tsa", "waiting for the cache", |s| {
        s.conditions
            .iter()
            .any(|c| c.type_ == "Progressing" && c.reason == "WaitingForDependencies")
    })
    .await;
    assert_eq!(degraded_reason(&waiting), Some("CacheUnavailable"));
    tokio::time::sleep(Duration::from_secs(2)).await;
    let during = pods(&client, &ns, "server").await;
    assert!(
        !during.contains_key("tsa-2"),
        "no server starts without its cache"
    );
    assert_eq!(uids(&during), servers, "running servers are not restarted");

    // The cache returns (its pods are recreated): the new node starts, the
    // old ones were never replaced.
    let cache_pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
    for pod in pods(&client, &ns, "cache").await.keys() {
        cache_pods
            .delete(pod, &DeleteParams::default())
            .await
            .expect("delete cache pod");
    }
    let healed = status_when(&api, "tsa", "Ready again with 3 nodes", |s| {
        s.phase == Some(integration_operator::api::Phase::Ready) && s.ready_replicas == Some(3)
    })
    .await;
    assert_eq!(healed.cache.and_then(|c| c.ready_servers), Some(2));
    let after = uids(&pods(&client, &ns, "server").await);
    for (name, uid) in &servers {
        assert_eq!(after.get(name), Some(uid), "{name} was restarted");
    }
    delete_namespace(&client, &ns).await;
}
