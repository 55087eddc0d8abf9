//! The control plane as the benchmarks use it (`#[path]`-included by each
//! bench example): where it keeps its state, an admin client, the CRD and
//! the operator's RBAC, and polling.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, Result, anyhow, bail};
use integration_operator::api::IntegrationCluster;
use k8s_openapi::api::core::v1::Namespace;
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Client, Config};

const CRD_NAME: &str = "integrationclusters.integration.dev";
pub const SETUP_TIMEOUT: Duration = Duration::from_secs(90);

pub fn state_dir() -> Result<PathBuf> {
    if let Some(dir) = std::env::var_os("CONTROL_PLANE_DIR") {
        return Ok(dir.into());
    }
    let uid = Command::new("id").arg("-u").output().context("run id -u")?;
    let uid = String::from_utf8_lossy(&uid.stdout).trim().to_owned();
    Ok(std::env::temp_dir().join(format!("integration-operator-{uid}")))
}

/// The admin kubeconfig of a running control plane in `state`.
pub fn admin_kubeconfig(state: &Path) -> Result<PathBuf> {
    let kubeconfig = state.join("kubeconfig");
    if !kubeconfig.exists() {
        bail!(
            "no control plane: {} is missing; start it with hack/control-plane/up (hack/bench does)",
            kubeconfig.display()
        );
    }
    Ok(kubeconfig)
}

/// The operator binary built beside this bench example (same profile).
pub fn operator_binary(example: &str) -> Result<PathBuf> {
    let exe = std::env::current_exe().context("find the bench's own executable")?;
    let operator_bin = exe
        .parent()
        .and_then(Path::parent)
        .map(|dir| dir.join("integration-operator"))
        .ok_or_else(|| anyhow!("{} has no grandparent directory", exe.display()))?;
    if !operator_bin.exists() {
        bail!(
            "{} is missing: build it with this example's profile, \
             e.g. cargo build --release --bin integration-operator --example {example}",
            operator_bin.display()
        );
    }
    Ok(operator_bin)
}

pub fn repo_path(relative: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(relative)
}

pub async fn client_for(kubeconfig: &Path) -> Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("read {}", kubeconfig.display()))?;
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    Ok(Client::try_from(config)?)
}

/// Polls `probe` until it returns `Some`, or fails naming `what`.
pub async fn wait_for<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> Result<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return Ok(value);
        }
        if Instant::now() >= deadline {
            bail!("timed out after {timeout:?} waiting for {what}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The control plane's kubectl as admin, run from the repository.
pub fn kubectl(state: &Path, args: &[&str]) -> Result<()> {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    let output = Command::new(&kubectl)
        .args(args)
        .env("KUBECONFIG", state.join("kubeconfig"))
        .env("KUBECACHEDIR", state.join("kubectl-cache"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .with_context(|| format!("run {kubectl}; hack/env.sh puts the control plane's on PATH"))?;
    if !output.status.success() {
        bail!(
            "kubectl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// Applies the committed CRD and the operator's RBAC (as the tests do) and
/// waits until IntegrationClusters are served.
pub async fn install_crd(client: &Client, state: &Path) -> Result<()> {
    let path = repo_path("crds/integrationcluster.yaml");
    let text =
        std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    let crd: CustomResourceDefinition =
        serde_saphyr::from_str(&text).with_context(|| format!("parse {}", path.display()))?;
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        CRD_NAME,
        &PatchParams::apply("integration-operator-bench").force(),
        &Patch::Apply(&crd),
    )
    .await
    .context("apply the CRD")?;
    kubectl(
        state,
        &[
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            "manifests/rbac.yaml",
        ],
    )?;
    kubectl(
        state,
        &[
            "apply",
            "--server-side",
            "-f",
            "hack/control-plane/operator-user-binding.yaml",
        ],
    )?;
    wait_for(SETUP_TIMEOUT, "the CRD to be established", || async {
        let crd = crds.get(CRD_NAME).await.ok()?;
        crd.status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True")
            .then_some(())
    })
    .await?;
    let api: Api<IntegrationCluster> = Api::all(client.clone());
    wait_for(
        SETUP_TIMEOUT,
        "IntegrationClusters to be served",
        || async { api.list(&Default::default()).await.ok().map(|_| ()) },
    )
    .await
}

/// A fresh namespace named `<prefix>-<5 hex digits>`.
pub async fn create_namespace(client: &Client, prefix: &str) -> Result<String> {
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    let name = format!("{prefix}-{:05x}", nanos % 0xfffff);
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": name}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await
        .with_context(|| format!("create namespace {name}"))?;
    Ok(name)
}
