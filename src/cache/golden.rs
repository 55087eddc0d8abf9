//! Golden files: tc-config.xml of a managed cache renders to exactly the
//! committed text. `UPDATE_GOLDEN=1 cargo test --lib cache::golden`
//! rewrites them after a deliberate change; review the diff like code.

use super::tc_config;
use super::tests::sample;
use crate::render::golden::assert_golden;

fn check(replicas: i32, golden: &str) {
    let mut ic = sample();
    if let Some(managed) = ic.spec.cache.as_mut().and_then(|c| c.managed.as_mut()) {
        managed.replicas = replicas;
    }
    let text = tc_config(&ic).expect("managed cache");
    assert_golden("src/cache/testdata", golden, &text);
}

#[test]
fn one_server() {
    check(1, "tc-config-1.xml");
}

#[test]
fn three_servers() {
    check(3, "tc-config-3.xml");
}
