//! The IntegrationCluster API as the API server serves it: the committed
//! CRD installs, documents its fields, accepts the samples and refuses
//! invalid specs with a message naming the field.

mod support;

use std::collections::BTreeMap;

use integration_operator::api;
use kube::api::{Patch, PatchParams};
use kube::core::Status;
use support::*;

#[test]
fn committed_crd_matches_the_rust_types() {
    let generated = api::crd_yaml().expect("CRD serialises");
    for file in [
        "crds/integrationcluster.yaml",
        "charts/integration-operator/crds/integrationcluster.yaml",
    ] {
        let committed = std::fs::read_to_string(format!("{}/{file}", env!("CARGO_MANIFEST_DIR")))
            .unwrap_or_else(|e| panic!("read {file}: {e}"));
        assert!(
            generated == committed,
            "{file} is out of date: run `make crds`"
        );
    }
}

#[tokio::test]
async fn crd_installs_and_kubectl_explain_shows_field_docs() {
    let _client = admin().await;
    let cache = kubectl_eventually(&["explain", "ic.spec.cache"]).await;
    assert!(
        cache.contains("The distributed cache of a stateful cluster"),
        "{cache}"
    );
    assert!(cache.contains("connectTimeoutSeconds"), "{cache}");
    let lease = kubectl_eventually(&["explain", "ic.spec.listeners.leaseDurationSeconds"]).await;
    assert!(
        lease.contains("Seconds a Lease is valid without renewal"),
        "{lease}"
    );
    let mode = kubectl_eventually(&["explain", "integrationcluster.spec.mode"]).await;
    assert!(
        mode.contains("stateful") && mode.contains("stateless"),
        "{mode}"
    );
}

#[tokio::test]
async fn printer_columns_show_profile_mode_and_phase() {
    let client = admin().await;
    let ns = namespace(&client, "columns").await;
    create_yaml(&client, &ns, &cluster("orders", VALID))
        .await
        .expect("valid cluster");
    let table = kubectl_eventually(&["get", "ic", "-n", &ns]).await;
    let header: Vec<&str> = table
        .lines()
        .next()
        .unwrap_or_default()
        .split_whitespace()
        .collect();
    assert_eq!(
        header,
        [
            "NAME", "PROFILE", "MODE", "REPLICAS", "ONLINE", "READY", "PHASE", "AGE"
        ]
    );
    assert!(
        table.contains("webmethods-is") && table.contains("stateful"),
        "{table}"
    );
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn the_samples_are_accepted() {
    let client = admin().await;
    let ns = namespace(&client, "samples").await;
    for sample in [
        "webmethods-is-stateful",
        "webmethods-is-stateless",
        "wso2-carbon",
    ] {
        let path = format!(
            "{}/manifests/samples/{sample}.yaml",
            env!("CARGO_MANIFEST_DIR")
        );
        let yaml = std::fs::read_to_string(&path).expect("read sample");
        if let Err(e) = create_yaml(&client, &ns, &yaml).await {
            panic!("{sample} refused: {e}");
        }
    }
    delete_namespace(&client, &ns).await;
}

const VALID: &str = "
profile: webmethods-is
mode: stateful
replicas: 3
image: msr:10.15
cache: {mode: external, external: {urls: ['tsa-0.tsa:9510']}}
";

fn cluster(name: &str, spec: &str) -> String {
    let spec = spec.trim().replace('\n', "\n  ");
    format!(
        "apiVersion: integration.dev/v1alpha1\nkind: IntegrationCluster\nmetadata:\n  name: {name}\nspec:\n  {spec}\n"
    )
}

/// (what is wrong, spec, the field the refusal names, why)
const INVALID: &[(&str, &str, &str, &str)] = &[
    (
        "managed cache without a licence",
        "profile: webmethods-is\nimage: is\ncache: {mode: managed, managed: {image: tsa}}",
        "spec.cache.managed",
        "a managed cache needs managed.image and managed.licenseSecretRef",
    ),
    (
        "lock break of zero seconds",
        "profile: generic\nmode: stateless\nimage: is\ndatabase: {mode: managed, lockBreakSeconds: 0}",
        "spec.database.lockBreakSeconds",
        "should be greater than or equal to 1",
    ),
    (
        "stateless cluster with a cache",
        "profile: webmethods-is\nmode: stateless\nimage: is\ncache: {mode: managed}",
        "spec.cache",
        "a stateless cluster has no distributed cache",
    ),
    (
        "stateless cluster with session failover",
        "profile: webmethods-is\nmode: stateless\nimage: is\nserver: {sessionFailover: true}",
        "spec.server.sessionFailover",
        "session failover needs the distributed cache of a stateful cluster",
    ),
    (
        "stateless multiNode listener without a database",
        "profile: webmethods-is\nmode: stateless\nimage: is\nlisteners: [{name: in, mode: multiNode}]",
        "spec.listeners",
        "a multiNode listener in a stateless cluster needs spec.database",
    ),
    (
        "stateful cluster without a cache",
        "profile: webmethods-is\nmode: stateful\nimage: is",
        "spec.cache",
        "a stateful cluster needs a distributed cache",
    ),
    (
        "wso2-carbon with a Terracotta cache",
        "profile: wso2-carbon\nimage: wso2is\ncache: {mode: managed}",
        "spec.cache",
        "wso2-carbon clusters share state through Carbon's own Hazelcast membership",
    ),
    (
        "duplicate listener names",
        "profile: generic\nmode: stateless\nimage: s\nlisteners: [{name: in, mode: singleNode}, {name: in, mode: singleNode}]",
        "spec.listeners[1]",
        "Duplicate value",
    ),
    (
        "lease not longer than renew deadline",
        "profile: generic\nmode: stateless\nimage: s\nlisteners: [{name: in, mode: singleNode, leaseDurationSeconds: 10, renewDeadlineSeconds: 10}]",
        "spec.listeners[0]",
        "leaseDurationSeconds must be greater than renewDeadlineSeconds",
    ),
    (
        "renew deadline not longer than retry period",
        "profile: generic\nmode: stateless\nimage: s\nlisteners: [{name: in, mode: singleNode, renewDeadlineSeconds: 2, retryPeriodSeconds: 2}]",
        "spec.listeners[0]",
        "renewDeadlineSeconds, which must be greater than retryPeriodSeconds",
    ),
    (
        "a node offline twice",
        "profile: generic\nmode: stateless\nimage: s\nnodes: {offline: [NAME-1, NAME-1]}",
        "spec.nodes.offline[1]",
        "Duplicate value",
    ),
    (
        "offline names another cluster's node",
        "profile: generic\nmode: stateless\nimage: s\nnodes: {offline: [billing-1]}",
        "spec.nodes.offline",
        "every entry must name a node of this cluster",
    ),
    (
        "remove names no node at all",
        "profile: generic\nmode: stateless\nimage: s\nnodes: {remove: [NAME-x]}",
        "spec.nodes.remove[0]",
        "should match",
    ),
    (
        "external cache URL without a port",
        "profile: webmethods-is\nimage: is\ncache: {mode: external, external: {urls: ['tsa-0']}}",
        "spec.cache.external.urls[0]",
        "should match",
    ),
    (
        "external cache URL with a port out of range",
        "profile: webmethods-is\nimage: is\ncache: {mode: external, external: {urls: ['tsa-0:70000']}}",
        "spec.cache.external.urls[0]",
        "should match",
    ),
    (
        "external cache without URLs",
        "profile: webmethods-is\nimage: is\ncache: {mode: external}",
        "spec.cache.external",
        "required when cache.mode is external",
    ),
    (
        "no replicas",
        "profile: generic\nmode: stateless\nimage: s\nreplicas: 0",
        "spec.replicas",
        "should be greater than or equal to 1",
    ),
    (
        "too many replicas",
        "profile: generic\nmode: stateless\nimage: s\nreplicas: 1000",
        "spec.replicas",
        "should be less than or equal to 64",
    ),
    (
        "unknown profile",
        "profile: tibco-bw\nmode: stateless\nimage: s",
        "spec.profile",
        "Unsupported value",
    ),
    (
        "missing image",
        "profile: generic\nmode: stateless",
        "spec.image",
        "Required value",
    ),
    (
        "package digest not sha256 hex",
        "profile: generic\nmode: stateless\nimage: s\npackages: [{name: WmKafkaAdapter, version: '9.6', source: {url: 'https://x/p.zip'}, sha256: abc}]",
        "spec.packages[0].sha256",
        "should match",
    ),
    (
        "package with two sources",
        "profile: generic\nmode: stateless\nimage: s\npackages: [{name: P, version: '1', source: {url: 'https://x/p.zip', image: 'img//p'}, sha256: 'PKGSHA'}]",
        "spec.packages[0].source",
        "set exactly one of image, url or configMap",
    ),
    (
        "primary port out of range",
        "profile: generic\nmode: stateless\nimage: s\nserver: {ports: {primary: 70000}}",
        "spec.server.ports.primary",
        "should be less than or equal to 65535",
    ),
    (
        "primary and diagnostic ports equal",
        "profile: generic\nmode: stateless\nimage: s\nserver: {ports: {primary: 5555, diagnostic: 5555}}",
        "spec.server.ports",
        "primary and diagnostic ports must differ",
    ),
    (
        "logical host name with a semicolon",
        "profile: generic\nmode: stateless\nimage: s\nserver: {logicalHostnames: {NAME-0: 'a;b'}}",
        "spec.server.logicalHostnames",
        "cannot contain ';'",
    ),
    (
        "maxUnavailable above replicas",
        "profile: generic\nmode: stateless\nimage: s\nreplicas: 2\nrollout: {maxUnavailable: 3}",
        "spec.rollout.maxUnavailable",
        "cannot exceed spec.replicas",
    ),
    (
        "unknown webMethods database component",
        "profile: webmethods-is\nmode: stateless\nimage: is\ndatabase: {mode: managed, components: [ISInternal, Billing]}",
        "spec.database.components",
        "webmethods-is components are ISInternal",
    ),
    (
        "external database without its secret",
        "profile: webmethods-is\nmode: stateless\nimage: is\ndatabase: {mode: external}",
        "spec.database.external",
        "required when database.mode is external",
    ),
    (
        "cluster name with a space",
        "profile: webmethods-is\nimage: is\nclusterName: 'orders prod'\ncache: {mode: managed}",
        "spec.clusterName",
        "should match",
    ),
];

#[tokio::test]
async fn invalid_specs_are_refused_with_the_field_named() {
    let client = admin().await;
    let ns = namespace(&client, "invalid").await;
    let mut wrong = BTreeMap::new();
    for (n, (what, spec, field, why)) in INVALID.iter().enumerate() {
        let name = format!("case-{n}");
        let spec = spec
            .replace("NAME", &name)
            .replace("PKGSHA", &"0".repeat(64));
        match create_yaml(&client, &ns, &cluster(&name, &spec)).await {
            Ok(_) => {
                wrong.insert(*what, "accepted".to_owned());
            }
            Err(kube::Error::Api(e))
                if e.code == 422 && names_field(&e, field) && e.message.contains(why) => {}
            Err(e) => {
                wrong.insert(
                    *what,
                    format!("refused without naming {field} or saying {why:?}: {e}"),
                );
            }
        }
    }
    assert!(INVALID.len() >= 15);
    assert!(wrong.is_empty(), "{wrong:#?}");
    delete_namespace(&client, &ns).await;
}

/// The refusal's first cause is reported at `field`, as kubectl shows it
/// ("spec.cache: Invalid value: ...").
fn names_field(e: &Status, field: &str) -> bool {
    e.message.contains(&format!("{field}: "))
        && e.details
            .as_ref()
            .is_some_and(|d| d.causes.iter().any(|c| c.field == field))
}

#[tokio::test]
async fn names_that_would_collide_with_derived_names_are_refused() {
    let client = admin().await;
    let ns = namespace(&client, "longname").await;
    let name = "a".repeat(41);
    let err = create_yaml(&client, &ns, &cluster(&name, VALID))
        .await
        .expect_err("refused");
    assert!(
        err.to_string()
            .contains("metadata.name must be at most 40 characters"),
        "{err}"
    );
    // Names another cluster's objects use are refused too.
    for name in ["orders-cache", "orders-database", "orders-admin"] {
        let err = create_yaml(&client, &ns, &cluster(name, VALID))
            .await
            .expect_err("refused");
        assert!(
            err.to_string()
                .contains("must not end in -admin, -cache or -database"),
            "{err}"
        );
    }
    delete_namespace(&client, &ns).await;
}

#[tokio::test]
async fn profile_mode_and_cluster_name_are_immutable() {
    let client = admin().await;
    let ns = namespace(&client, "immutable").await;
    create_yaml(
        &client,
        &ns,
        &cluster("orders", &format!("{VALID}clusterName: orders\n")),
    )
    .await
    .expect("valid cluster");
    let api = dynamic_api(&client, &ns);
    for (change, expected) in [
        (
            serde_json::json!({"spec": {"profile": "generic"}}),
            "spec.profile: Invalid value: \"generic\": the profile cannot change after creation",
        ),
        (
            serde_json::json!({"spec": {"mode": "stateless", "cache": null}}),
            "spec.mode: Invalid value: \"stateless\": the mode cannot change after creation",
        ),
        (
            serde_json::json!({"spec": {"clusterName": "other"}}),
            "spec.clusterName: Invalid value: \"other\": the cluster name cannot change after creation",
        ),
    ] {
        let err = api
            .patch("orders", &PatchParams::default(), &Patch::Merge(&change))
            .await
            .expect_err("change refused");
        assert!(err.to_string().contains(expected), "{change}: {err}");
    }
    // Everything else may change.
    api.patch(
        "orders",
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"spec": {"replicas": 5}})),
    )
    .await
    .expect("replicas can change");
    delete_namespace(&client, &ns).await;
}
