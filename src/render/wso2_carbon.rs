//! WSO2 Carbon: `deployment.toml` with Kubernetes membership. Carbon finds
//! its peers through the endpoints of the cluster's headless admin Service
//! (KUBERNETES_SERVICES); each node advertises its pod IP (NODE_IP).

use std::collections::BTreeMap;

use super::{DB_PASSWORD_ENV, DB_USERNAME_ENV, header};
use crate::api::IntegrationCluster;
use crate::database::Endpoint;
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

/// The datasource table of a component: SharedDB → shared_db (Carbon's
/// `[database.shared_db]`), IdentityDB → identity_db, other names lower case.
pub fn datasource(component: &str) -> String {
    let lower = component.to_ascii_lowercase();
    match lower.strip_suffix("db") {
        Some(stem) if !stem.is_empty() => format!("{}_db", stem.trim_end_matches('_')),
        _ => lower,
    }
}

pub fn render(
    ic: &IntegrationCluster,
    cluster: &ValidatedCluster,
    database: Option<&Endpoint>,
) -> BTreeMap<String, String> {
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
    if let (Some(db), Some(endpoint)) = (&ic.spec.database, database) {
        for component in &db.components {
            let table = format!("database.{}", datasource(component));
            let url = format!(
                "jdbc:postgresql://{}:{}/{}?currentSchema={}",
                endpoint.host,
                endpoint.port,
                endpoint.database,
                naming::component_schema(component)
            );
            set(&table, "type", value("postgre"));
            set(&table, "url", value(&url));
            set(
                &table,
                "username",
                value(&format!("$env{{{DB_USERNAME_ENV}}}")),
            );
            set(
                &table,
                "password",
                value(&format!("$env{{{DB_PASSWORD_ENV}}}")),
            );
            set(&table, "driver", value("org.postgresql.Driver"));
            set(
                &format!("{table}.pool_options"),
                "maxActive",
                value(&db.max_connections.to_string()),
            );
        }
    }
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
