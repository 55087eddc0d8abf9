//! Golden files: tc-config.xml of a managed cache renders to exactly the
//! committed text. `UPDATE_GOLDEN=1 cargo test --lib cache::golden`
//! rewrites them after a deliberate change; review the diff like code.

use std::path::PathBuf;

use super::tc_config;
use super::tests::sample;

fn check(replicas: i32, golden: &str) {
    let mut ic = sample();
    if let Some(managed) = ic.spec.cache.as_mut().and_then(|c| c.managed.as_mut()) {
        managed.replicas = replicas;
    }
    let text = tc_config(&ic).expect("managed cache");
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("src/cache/testdata")
        .join(golden);
    if std::env::var_os("UPDATE_GOLDEN").is_some() {
        std::fs::write(&path, &text).expect("write golden file");
    }
    let expected = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        text == expected,
        "{golden} differs (UPDATE_GOLDEN=1 rewrites it):\n--- expected\n{expected}\n--- rendered\n{text}"
    );
}

#[test]
fn one_server() {
    check(1, "tc-config-1.xml");
}

#[test]
fn three_servers() {
    check(3, "tc-config-3.xml");
}
