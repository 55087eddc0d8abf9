//! The cleanup finalizer. kube-runtime's `finalizer` helper writes it with
//! no field manager (the API server records "unknown"); these writes name
//! the operator, like every other write it makes. A merge patch carrying
//! the resourceVersion replaces the list only if nobody changed the object
//! since it was read, so another controller's finalizer is never lost.

use kube::api::{Api, Patch};
use kube::{Resource, ResourceExt};

use super::{FINALIZER, Failure};
use crate::api::IntegrationCluster;

/// Where a cluster is in its life, as far as the finalizer is concerned.
#[derive(Debug, PartialEq, Eq)]
pub enum Stage {
    /// Not being deleted and the finalizer is missing: add it first.
    Unprotected,
    /// Not being deleted: reconcile.
    Live,
    /// Being deleted and the finalizer is there: clean up, then remove it.
    Deleting,
    /// Being deleted, finalizer already removed: nothing left to do.
    Released,
}

pub fn stage(ic: &IntegrationCluster) -> Stage {
    let ours = ic.finalizers().iter().any(|f| f == FINALIZER);
    match (ic.meta().deletion_timestamp.is_some(), ours) {
        (false, false) => Stage::Unprotected,
        (false, true) => Stage::Live,
        (true, true) => Stage::Deleting,
        (true, false) => Stage::Released,
    }
}

/// Returns the cluster as the API server now holds it, so the reconcile
/// carries on with it instead of waiting for the watch to bring it back.
pub async fn add(
    api: &Api<IntegrationCluster>,
    ic: &IntegrationCluster,
) -> Result<IntegrationCluster, Failure> {
    let mut finalizers = ic.finalizers().to_vec();
    finalizers.push(FINALIZER.to_owned());
    write(api, ic, finalizers, "add the finalizer").await
}

pub async fn remove(api: &Api<IntegrationCluster>, ic: &IntegrationCluster) -> Result<(), Failure> {
    let finalizers = ic
        .finalizers()
        .iter()
        .filter(|f| *f != FINALIZER)
        .cloned()
        .collect();
    match write(api, ic, finalizers, "remove the finalizer").await {
        // Gone already (another finalizer was the last): nothing to release.
        Err(Failure::Write {
            source: kube::Error::Api(e),
            ..
        }) if e.code == 404 => Ok(()),
        other => other.map(|_| ()),
    }
}

async fn write(
    api: &Api<IntegrationCluster>,
    ic: &IntegrationCluster,
    finalizers: Vec<String>,
    what: &str,
) -> Result<IntegrationCluster, Failure> {
    let patch = serde_json::json!({
        "metadata": {
            "resourceVersion": ic.resource_version(),
            "finalizers": finalizers,
        }
    });
    api.patch(
        &ic.name_any(),
        &super::merge_params(),
        &Patch::Merge(&patch),
    )
    .await
    .map_err(|source| Failure::Write {
        kind: "IntegrationCluster".into(),
        what: what.to_owned(),
        source,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cluster(finalizers: &[&str], deleting: bool) -> IntegrationCluster {
        let mut ic: IntegrationCluster = serde_json::from_value(serde_json::json!({
            "apiVersion": "integration.dev/v1alpha1",
            "kind": "IntegrationCluster",
            "metadata": {"name": "c"},
            "spec": {"profile": "generic", "image": "srv:1"},
        }))
        .expect("a cluster");
        ic.metadata.finalizers = Some(finalizers.iter().map(|f| (*f).to_owned()).collect());
        if deleting {
            ic.metadata.deletion_timestamp =
                Some(k8s_openapi::apimachinery::pkg::apis::meta::v1::Time(
                    k8s_openapi::jiff::Timestamp::UNIX_EPOCH,
                ));
        }
        ic
    }

    #[test]
    fn stages() {
        assert_eq!(stage(&cluster(&[], false)), Stage::Unprotected);
        assert_eq!(stage(&cluster(&["other"], false)), Stage::Unprotected);
        assert_eq!(stage(&cluster(&["other", FINALIZER], false)), Stage::Live);
        assert_eq!(stage(&cluster(&[FINALIZER], true)), Stage::Deleting);
        assert_eq!(stage(&cluster(&["other"], true)), Stage::Released);
    }
}
