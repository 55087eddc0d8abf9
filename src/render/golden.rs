//! Golden files: each sample renders to exactly the committed text.
//! `UPDATE_GOLDEN=1 cargo test --lib golden` rewrites them after a
//! deliberate change; review the diff like code.

use std::path::PathBuf;

use super::render;
use crate::api::IntegrationCluster;
use crate::validation;

fn sample(file: &str) -> IntegrationCluster {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("manifests/samples")
        .join(file);
    let text = std::fs::read_to_string(&path).expect("read sample");
    let mut ic: IntegrationCluster = serde_saphyr::from_str(&text).expect("sample parses");
    ic.metadata.namespace = Some("prod".into());
    ic
}

fn check(sample_file: &str, golden: &str) {
    let ic = sample(sample_file);
    let cluster = validation::validate(&ic, &[]).expect("sample is valid");
    // Where the database would be once its admin Secret is read.
    let database = ic
        .spec
        .database
        .as_ref()
        .map(|_| crate::database::Endpoint {
            host: "db.example.com".into(),
            port: 5432,
            database: crate::naming::database_role(
                "prod",
                ic.metadata.name.as_deref().unwrap_or_default(),
            ),
        });
    let rendered = render(
        &ic,
        &cluster,
        &super::Inputs {
            database: database.as_ref(),
            config_sources: None,
        },
    );
    let mut text = format!(
        "# configDigest {}\n# packagesDigest {}\n",
        rendered.config_digest, rendered.packages_digest
    );
    for (node, digest) in &rendered.node_digests {
        text += &format!("# {node} {digest}\n");
    }
    for (name, content) in &rendered.data {
        text += &format!("==> {name} <==\n{content}");
    }
    assert_golden("src/render/testdata", golden, &text);
}

/// Asserts that `text` is the committed file `dir/golden`; with
/// `UPDATE_GOLDEN` set it rewrites the file first.
pub(crate) fn assert_golden(dir: &str, golden: &str, text: &str) {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join(dir)
        .join(golden);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, text).expect("write golden file");
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        text == expected,
        "{golden} differs (UPDATE_GOLDEN=1 rewrites it):\n--- expected\n{expected}\n--- rendered\n{text}"
    );
}

#[test]
fn scaling_changes_no_running_node_digest() {
    let mut ic = sample("webmethods-is-stateful.yaml");
    let before = render(
        &ic,
        &validation::validate(&ic, &[]).expect("valid"),
        &Default::default(),
    );
    ic.spec.replicas = 5;
    let after = render(
        &ic,
        &validation::validate(&ic, &[]).expect("valid"),
        &Default::default(),
    );
    assert_eq!(before.config_digest, after.config_digest);
    for (node, digest) in &before.node_digests {
        assert_eq!(after.node_digests.get(node), Some(digest), "{node}");
    }
    assert_eq!(after.node_digests.len(), 5);
}

#[test]
fn a_nodes_files_digest_ignores_other_nodes_files() {
    let mut ic = sample("webmethods-is-stateful.yaml");
    let before = render(
        &ic,
        &validation::validate(&ic, &[]).expect("valid"),
        &Default::default(),
    );
    ic.spec.replicas = 5;
    let after = render(
        &ic,
        &validation::validate(&ic, &[]).expect("valid"),
        &Default::default(),
    );
    assert_eq!(
        before.files_digest("orders-0"),
        after.files_digest("orders-0")
    );
    assert_ne!(
        after.files_digest("orders-0"),
        after.files_digest("orders-1")
    );
}

#[test]
fn a_property_change_changes_every_node_digest() {
    let mut ic = sample("webmethods-is-stateful.yaml");
    let before = render(
        &ic,
        &validation::validate(&ic, &[]).expect("valid"),
        &Default::default(),
    );
    ic.spec
        .server
        .properties
        .insert("watt.server.threadPool".into(), "80".into());
    let after = render(
        &ic,
        &validation::validate(&ic, &[]).expect("valid"),
        &Default::default(),
    );
    assert_ne!(before.config_digest, after.config_digest);
    for (node, digest) in &before.node_digests {
        assert_ne!(after.node_digests.get(node), Some(digest), "{node}");
    }
}

#[test]
fn webmethods_is_stateful() {
    check("webmethods-is-stateful.yaml", "webmethods-is-stateful.txt");
}

#[test]
fn webmethods_is_stateless() {
    check(
        "webmethods-is-stateless.yaml",
        "webmethods-is-stateless.txt",
    );
}

#[test]
fn wso2_carbon() {
    check("wso2-carbon.yaml", "wso2-carbon.txt");
}

#[test]
fn generic() {
    check("generic.yaml", "generic.txt");
}
