//! What a person sees when the operator cannot start: one line that says
//! what to do, a non-zero exit, and no panic.

mod support;

use std::process::{Command, Output};
use std::time::Duration;

use integration_operator::api::IntegrationCluster;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::ResourceExt;
use kube::api::{Api, DeleteParams, Patch, PatchParams};
use support::*;

fn operator(kubeconfig: &str) -> Output {
    Command::new(env!("CARGO_BIN_EXE_integration-operator"))
        .args(["run"])
        .env("KUBECONFIG", kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", std::env::temp_dir())
        .output()
        .expect("run operator")
}

fn assert_one_clear_line(output: &Output, expected: &str) {
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "must fail: {stderr}");
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains(expected), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn a_missing_kubeconfig_says_how_to_configure() {
    let output = operator("/nonexistent/kubeconfig");
    assert_one_clear_line(&output, "no Kubernetes configuration found: set KUBECONFIG");
}

#[test]
fn an_unreachable_api_server_is_named() {
    let dir = std::env::temp_dir().join(unique("unreachable"));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:1'}}]\n\
         users: [{name: u, user: {token: t}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n",
    )
    .expect("write kubeconfig");
    let output = operator(&kubeconfig.to_string_lossy());
    assert_one_clear_line(&output, "cannot reach the Kubernetes API server");
}

#[tokio::test]
async fn an_api_server_that_never_answers_is_given_up_on() {
    // Accepts connections and reads requests, but never answers.
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let address = listener.local_addr().expect("address");
    tokio::spawn(async move {
        while let Ok((mut stream, _)) = listener.accept().await {
            tokio::spawn(async move {
                use tokio::io::AsyncReadExt;
                let mut sink = Vec::new();
                let _ = stream.read_to_end(&mut sink).await;
            });
        }
    });
    let dir = std::env::temp_dir().join(unique("silent"));
    std::fs::create_dir_all(&dir).expect("dir");
    let kubeconfig = dir.join("kubeconfig");
    std::fs::write(
        &kubeconfig,
        format!(
            "apiVersion: v1\nkind: Config\nclusters: [{{name: c, cluster: {{server: 'http://{address}'}}}}]\n\
             users: [{{name: u, user: {{token: t}}}}]\ncontexts: [{{name: x, context: {{cluster: c, user: u}}}}]\ncurrent-context: x\n"
        ),
    )
    .expect("write kubeconfig");
    let started = std::time::Instant::now();
    let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_integration-operator"))
        .args(["run"])
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("KUBERNETES_SERVICE_HOST")
        .env("HOME", std::env::temp_dir())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .expect("run operator");
    let output = tokio::time::timeout(Duration::from_secs(60), child.wait_with_output())
        .await
        .expect("the operator still waits for an answer after 60 s")
        .expect("operator output");
    assert!(
        started.elapsed() < Duration::from_secs(45),
        "took {:?}",
        started.elapsed()
    );
    assert_one_clear_line(&output, "cannot reach the Kubernetes API server");
}

#[tokio::test]
async fn a_missing_crd_says_how_to_install_it() {
    let client = admin().await;
    // Earlier tests' clusters carry the operator's finalizer and no operator
    // runs for them any more; without it they would hold the CRD deletion.
    let all: Api<IntegrationCluster> = Api::all(client.clone());
    for ic in all.list(&Default::default()).await.expect("list clusters") {
        let api: Api<IntegrationCluster> =
            Api::namespaced(client.clone(), &ic.namespace().unwrap_or_default());
        let unfinalize = serde_json::json!({"metadata": {"finalizers": null}});
        let _ = api
            .patch(
                &ic.name_any(),
                &PatchParams::default(),
                &Patch::Merge(&unfinalize),
            )
            .await;
    }
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.delete(CRD_NAME, &DeleteParams::default())
        .await
        .expect("delete CRD");
    wait_until(Duration::from_secs(60), "CRD gone", || async {
        crds.get_opt(CRD_NAME).await.ok()?.is_none().then_some(())
    })
    .await;
    // The API server serves the resource a moment longer than the CRD
    // object exists; an operator started then passes its preflight and runs.
    wait_until(
        Duration::from_secs(60),
        "the resource no longer served",
        || async {
            match all.list(&Default::default()).await {
                Err(kube::Error::Api(e)) if e.code == 404 => Some(()),
                _ => None,
            }
        },
    )
    .await;

    let output = operator(&operator_kubeconfig().to_string_lossy());
    install_crd(&client).await; // before asserting, so later tests find it
    assert_one_clear_line(
        &output,
        "the IntegrationCluster CRD is not installed: run `integration-operator crd",
    );
}
