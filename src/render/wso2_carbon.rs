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

/// `deployment.toml`: the spec's properties, then the operator's keys
/// (Kubernetes membership and the datasources), which win over the spec.
pub fn render(
    ic: &IntegrationCluster,
    cluster: &ValidatedCluster,
    database: Option<&Endpoint>,
) -> BTreeMap<String, String> {
    let mut tables = Tables::default();
    for (key, v) in &ic.spec.server.properties {
        match key.rsplit_once('.') {
            Some((table, key)) => tables.set(table, key, value(v)),
            None => tables.set("", key, value(v)),
        }
    }
    // The operator's own keys are set last: they win over the spec.
    set_membership(&mut tables, ic, cluster);
    if let (Some(db), Some(endpoint)) = (&ic.spec.database, database) {
        for component in &db.components {
            set_datasource(&mut tables, component, endpoint, db.max_connections);
        }
    }
    BTreeMap::from([(DEPLOYMENT_TOML.to_owned(), tables.to_toml(header(ic, "#")))])
}

/// TOML tables: table → key → rendered value; "" is the root table.
#[derive(Default)]
struct Tables(BTreeMap<String, BTreeMap<String, String>>);

impl Tables {
    fn set(&mut self, table: &str, key: &str, v: String) {
        self.0
            .entry(table.to_owned())
            .or_default()
            .insert(key.to_owned(), v);
    }

    fn to_toml(&self, mut toml: String) -> String {
        for (table, entries) in &self.0 {
            if !table.is_empty() {
                toml += &format!("\n[{table}]\n");
            }
            for (key, v) in entries {
                toml += &format!("{key} = {v}\n");
            }
        }
        toml
    }
}

/// Carbon's Kubernetes membership: the node advertises its pod IP and finds
/// its peers through the endpoints of the cluster's admin Service.
fn set_membership(tables: &mut Tables, ic: &IntegrationCluster, cluster: &ValidatedCluster) {
    let name = ic.metadata.name.as_deref().unwrap_or_default();
    let ns = ic.metadata.namespace.as_deref().unwrap_or_default();
    tables.set("server", "node_ip", value("$env{NODE_IP}"));
    tables.set("clustering", "membership_scheme", value("kubernetes"));
    tables.set("clustering", "domain", value(&cluster.cluster_name));
    tables.set(
        "clustering",
        "local_member_port",
        value(&MEMBER_PORT.to_string()),
    );
    let properties = "clustering.properties";
    tables.set(
        properties,
        "membershipSchemeClassName",
        value("org.wso2.carbon.membership.scheme.kubernetes.KubernetesMembershipScheme"),
    );
    tables.set(properties, "KUBERNETES_NAMESPACE", value(ns));
    tables.set(
        properties,
        "KUBERNETES_SERVICES",
        value(&naming::admin_service(name)),
    );
}

/// The datasource of one component: its schema in the cluster database, with
/// the role's credentials from the environment.
fn set_datasource(tables: &mut Tables, component: &str, endpoint: &Endpoint, max_active: i32) {
    let table = format!("database.{}", datasource(component));
    let url = format!(
        "jdbc:postgresql://{}:{}/{}?currentSchema={}",
        endpoint.host,
        endpoint.port,
        endpoint.database,
        naming::component_schema(component)
    );
    tables.set(&table, "type", value("postgre"));
    tables.set(&table, "url", value(&url));
    tables.set(
        &table,
        "username",
        value(&format!("$env{{{DB_USERNAME_ENV}}}")),
    );
    tables.set(
        &table,
        "password",
        value(&format!("$env{{{DB_PASSWORD_ENV}}}")),
    );
    tables.set(&table, "driver", value("org.postgresql.Driver"));
    tables.set(
        &format!("{table}.pool_options"),
        "maxActive",
        value(&max_active.to_string()),
    );
}
