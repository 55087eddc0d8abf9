//! WSO2 Carbon: `deployment.toml` with Kubernetes membership. Carbon finds
//! its peers through the endpoints of the cluster's headless admin Service
//! (KUBERNETES_SERVICES); each node advertises its pod IP (NODE_IP).

use std::collections::BTreeMap;

use super::header;
use crate::api::IntegrationCluster;
use crate::naming;
use crate::validation::ValidatedCluster;

pub const DEPLOYMENT_TOML: &str = "deployment.toml";
/// Hazelcast member port of Carbon's Kubernetes membership.
pub const MEMBER_PORT: i32 = 4000;

/// A TOML value: booleans and integers stay bare, everything else is a
/// basic string.
fn value(v: &str) -> String {
    if v == "true" || v == "false" || v.parse::<i64>().is_ok() {
        return v.to_owned();
    }
    let mut out = String::from("\"");
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            '\n' => out.push_str("\\n"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", c as u32)),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}

pub fn render(ic: &IntegrationCluster, cluster: &ValidatedCluster) -> BTreeMap<String, String> {
    let name = ic.metadata.name.as_deref().unwrap_or_default();
    let ns = ic.metadata.namespace.as_deref().unwrap_or_default();
    // table → key → rendered value; "" is the root table.
    let mut tables: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
    let mut set = |table: &str, key: &str, v: String| {
        tables
            .entry(table.to_owned())
            .or_default()
            .insert(key.to_owned(), v);
    };
    for (key, v) in &ic.spec.server.properties {
        match key.rsplit_once('.') {
            Some((table, key)) => set(table, key, value(v)),
            None => set("", key, value(v)),
        }
    }
    // The operator's own keys are set last: they win over the spec.
    set("server", "node_ip", value("$env{NODE_IP}"));
    set("clustering", "membership_scheme", value("kubernetes"));
    set("clustering", "domain", value(&cluster.cluster_name));
    set(
        "clustering",
        "local_member_port",
        value(&MEMBER_PORT.to_string()),
    );
    set(
        "clustering.properties",
        "membershipSchemeClassName",
        value("org.wso2.carbon.membership.scheme.kubernetes.KubernetesMembershipScheme"),
    );
    set("clustering.properties", "KUBERNETES_NAMESPACE", value(ns));
    set(
        "clustering.properties",
        "KUBERNETES_SERVICES",
        value(&naming::admin_service(name)),
    );

    let mut toml = header(ic, "#");
    for (table, entries) in &tables {
        if !table.is_empty() {
            toml += &format!("\n[{table}]\n");
        }
        for (key, v) in entries {
            toml += &format!("{key} = {v}\n");
        }
    }
    BTreeMap::from([(DEPLOYMENT_TOML.to_owned(), toml)])
}
