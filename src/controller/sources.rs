//! The contents of the ConfigMaps and Secrets a cluster names in
//! `server.configFrom`, as one digest. It joins the configuration digest,
//! so a changed source (a rotated Secret) is drift and rolls the servers
//! one at a time like any other change. Only the digest leaves this
//! module; the contents are never logged or stored.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{ConfigMap, Secret};
use kube::api::Api;
use kube::{Client, ResourceExt};
use sha2::{Digest, Sha256};

use super::Failure;
use crate::api::IntegrationCluster;

/// None when the cluster names no sources. A missing source counts as
/// "missing", so its appearance is a change too (the pods could not start
/// without it anyway).
pub async fn digest(client: &Client, ic: &IntegrationCluster) -> Result<Option<String>, Failure> {
    let sources = &ic.spec.server.config_from;
    if sources.is_empty() {
        return Ok(None);
    }
    let namespace = ic.namespace().unwrap_or_default();
    let config_maps: Api<ConfigMap> = Api::namespaced(client.clone(), &namespace);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), &namespace);
    let read = |kind: &str, what: String| {
        let kind = kind.to_owned();
        move |source| Failure::Read { kind, what, source }
    };
    let mut hasher = Sha256::new();
    for source in sources {
        if let Some(r) = &source.config_map_ref {
            let found = config_maps
                .get_opt(&r.name)
                .await
                .map_err(read("ConfigMap", format!("ConfigMap {}", r.name)))?;
            hasher.update(format!("configmap/{}\n", r.name));
            match found {
                Some(cm) => {
                    feed(
                        &mut hasher,
                        cm.data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.into_bytes())),
                    );
                    feed(
                        &mut hasher,
                        cm.binary_data
                            .unwrap_or_default()
                            .into_iter()
                            .map(|(k, v)| (k, v.0)),
                    );
                }
                None => hasher.update(b"missing\n"),
            }
        }
        if let Some(r) = &source.secret_ref {
            let found = secrets
                .get_opt(&r.name)
                .await
                .map_err(read("Secret", format!("Secret {}", r.name)))?;
            hasher.update(format!("secret/{}\n", r.name));
            match found {
                Some(secret) => feed(
                    &mut hasher,
                    secret
                        .data
                        .unwrap_or_default()
                        .into_iter()
                        .map(|(k, v)| (k, v.0)),
                ),
                None => hasher.update(b"missing\n"),
            }
        }
    }
    let hex: String = hasher
        .finalize()
        .iter()
        .take(8)
        .map(|b| format!("{b:02x}"))
        .collect();
    Ok(Some(hex))
}

/// Keys in order, each with its length so no two layouts hash alike.
fn feed(hasher: &mut Sha256, entries: impl Iterator<Item = (String, Vec<u8>)>) {
    let sorted: BTreeMap<String, Vec<u8>> = entries.collect();
    for (key, value) in sorted {
        hasher.update(format!("{}:{key}:{}\n", key.len(), value.len()));
        hasher.update(&value);
    }
}
