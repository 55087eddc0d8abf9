//! webMethods Integration Server / Microservices Runtime: an
//! `application.properties` configuration-variables template (read through
//! SAG_IS_CONFIG_PROPERTIES) with the cluster settings of the clustering
//! guide, plus one file per node with its scheduler logical host name.

use std::collections::BTreeMap;

use super::{DB_PASSWORD_ENV, DB_USERNAME_ENV, cache_urls, header, node_file, property};
use crate::api::{DatabaseSpec, IntegrationCluster, Mode};
use crate::database::Endpoint;
use crate::naming;
use crate::validation::ValidatedCluster;

/// The cluster-wide template file.
pub const APPLICATION_PROPERTIES: &str = "application.properties";

/// Template prefixes MSR understands; other keys are extended settings.
const TEMPLATE_PREFIXES: &[&str] = &[
    "settings.",
    "jdbc.",
    "jdbcfunc.",
    "globalvariable.",
    "user.",
    "messaging.",
    "jms.",
    "jndi.",
    "artConnection.",
    "cachemanager.",
];

/// Settings the operator owns: the same on every node by construction, so
/// the spec may not set them through `server.properties`.
pub const RESERVED: &[&str] = &[
    "watt.server.cluster.aware",
    "watt.server.cluster.name",
    "watt.server.cluster.tsaURLs",
    "watt.server.cluster.SessTimeout",
    "watt.server.cachemanager.connectTimeout",
    "watt.server.scheduler.logical.hostname",
    "watt.server.tx.cluster.lockBreakSecs",
];

/// The template key of a spec property: extended settings get `settings.`.
pub fn template_key(key: &str) -> String {
    if TEMPLATE_PREFIXES.iter().any(|p| key.starts_with(p)) {
        key.to_owned()
    } else {
        format!("settings.{key}")
    }
}

/// The JDBC driver alias MSR ships for PostgreSQL.
const POSTGRES_DRIVER_ALIAS: &str = "DataDirect Connect JDBC PostgreSQL Driver";

/// One JDBC pool per component, each confined to the component's schema,
/// and the component's function bound to it; credentials come from the
/// environment.
fn jdbc(database: &DatabaseSpec, endpoint: &Endpoint) -> String {
    let mut out = String::new();
    for component in &database.components {
        let pool = naming::component_schema(component);
        let url = format!(
            "jdbc:wm:postgresql://{}:{};databaseName={};InitializationString=(SET search_path TO {pool})",
            endpoint.host, endpoint.port, endpoint.database
        );
        out += &property(&format!("jdbc.{pool}.dbURL"), &url);
        out += &property(
            &format!("jdbc.{pool}.userid"),
            &format!("$env{{{DB_USERNAME_ENV}}}"),
        );
        out += &property(
            &format!("jdbc.{pool}.password"),
            &format!("$env{{{DB_PASSWORD_ENV}}}"),
        );
        out += &property(&format!("jdbc.{pool}.driverAlias"), POSTGRES_DRIVER_ALIAS);
        out += &property(
            &format!("jdbc.{pool}.maxConns"),
            &database.max_connections.to_string(),
        );
        out += &property(&format!("jdbcfunc.{component}.connPoolAlias"), &pool);
    }
    out
}

pub fn render(
    ic: &IntegrationCluster,
    cluster: &ValidatedCluster,
    database: Option<&Endpoint>,
) -> BTreeMap<String, String> {
    let spec = &ic.spec;
    let mut app = header(ic, "#");
    let stateful = spec.mode == Mode::Stateful;
    app += &property("settings.watt.server.cluster.aware", &stateful.to_string());
    app += &property("settings.watt.server.cluster.name", &cluster.cluster_name);
    if stateful {
        app += &property(
            "settings.watt.server.cluster.tsaURLs",
            &cache_urls(ic).join(","),
        );
        if let Some(cache) = &spec.cache {
            app += &property(
                "settings.watt.server.cachemanager.connectTimeout",
                &cache.connect_timeout_seconds.to_string(),
            );
        }
        app += &property(
            "settings.watt.server.cluster.SessTimeout",
            &spec.server.session_timeout_minutes.to_string(),
        );
    }
    if let Some(db) = &spec.database {
        app += &property(
            "settings.watt.server.tx.cluster.lockBreakSecs",
            &db.lock_break_seconds.to_string(),
        );
        if let Some(endpoint) = database {
            app += &jdbc(db, endpoint);
        }
    }
    for (key, value) in &spec.server.properties {
        app += &property(&template_key(key), value);
    }

    let mut files = BTreeMap::from([(APPLICATION_PROPERTIES.to_owned(), app)]);
    for member in &cluster.members {
        let mut node = header(ic, "#");
        node += &property(
            "settings.watt.server.scheduler.logical.hostname",
            &member.logical_hostname,
        );
        files.insert(node_file(&member.name), node);
    }
    files
}
