//! Generic servers: the spec's properties as `server.properties`, one file
//! per node with its name and logical host name, and the spec's own files.

use std::collections::BTreeMap;

use super::{header, node_file, property};
use crate::api::IntegrationCluster;
use crate::validation::ValidatedCluster;

pub const SERVER_PROPERTIES: &str = "server.properties";

pub fn render(ic: &IntegrationCluster, cluster: &ValidatedCluster) -> BTreeMap<String, String> {
    let mut server = header(ic, "#");
    server += &property("cluster.name", &cluster.cluster_name);
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
