//! Generic servers: the spec's properties as `server.properties`, one file
//! per node with its name and logical host name, and the spec's own files;
//! with a database, where it is (credentials come from the environment).

use std::collections::BTreeMap;

use super::{header, node_file, property};
use crate::api::IntegrationCluster;
use crate::database::Endpoint;
use crate::naming;
use crate::validation::ValidatedCluster;

pub const SERVER_PROPERTIES: &str = "server.properties";

pub fn render(
    ic: &IntegrationCluster,
    cluster: &ValidatedCluster,
    database: Option<&Endpoint>,
) -> BTreeMap<String, String> {
    let mut server = header(ic, "#");
    server += &property("cluster.name", &cluster.cluster_name);
    if let (Some(db), Some(endpoint)) = (&ic.spec.database, database) {
        // Credentials: the DB_USERNAME and DB_PASSWORD environment variables.
        server += &property("database.host", &endpoint.host);
        server += &property("database.port", &endpoint.port.to_string());
        server += &property("database.name", &endpoint.database);
        let schemas: Vec<String> = db
            .components
            .iter()
            .map(|c| naming::component_schema(c))
            .collect();
        server += &property("database.schemas", &schemas.join(","));
    }
    for (key, value) in &ic.spec.server.properties {
        server += &property(key, value);
    }
    let mut files = BTreeMap::from([(SERVER_PROPERTIES.to_owned(), server)]);
    for member in &cluster.members {
        let mut node = header(ic, "#");
        node += &property("node.name", &member.name);
        node += &property("node.logicalHostname", &member.logical_hostname);
        files.insert(node_file(&member.name), node);
    }
    files
}
