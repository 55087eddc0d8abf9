//! Shared helpers for the integration tests. They run against the control
//! plane that `hack/control-plane/up` starts (`make test` does it); nothing
//! here is mocked.

#![allow(dead_code)] // each test binary uses a different subset

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use integration_operator::api::{IntegrationCluster, IntegrationClusterStatus};
use k8s_openapi::api::core::v1::{Namespace, Pod, Secret};
use k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition;
use kube::api::{Api, DeleteParams, DynamicObject, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::core::{ApiResource, GroupVersionKind};
use kube::{Client, Config, Resource};
use serde_json::Value;

pub const CRD_NAME: &str = "integrationclusters.integration.dev";

/// A port for a process the test starts, that nothing else takes before
/// it binds. Ports from `bind(":0")` come from the kernel's ephemeral range
/// (32768–60999), so a port picked that way and closed again can be handed
/// to the next `bind(":0")` in a parallel test (it once was: a stand-in
/// server got an agent's claim port). These come from below that range, one
/// counter per test binary, and are checked free.
pub fn free_port() -> u16 {
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const COUNT: u32 = 12_000; // 20000–31999: above the planes' own ports
    let start = std::process::id().wrapping_mul(7919) % COUNT;
    for _ in 0..COUNT {
        let offset = NEXT.fetch_add(1, Ordering::SeqCst);
        let port = (FIRST + (start + offset) % COUNT) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..{}", FIRST + COUNT);
}

/// The stand-in server's hooks, as an agent is told them.
pub const STANDIN_HOOKS: [&str; 8] = [
    "--quiesce-path",
    "/quiesce",
    "--resume-path",
    "/resume",
    "--in-flight-path",
    "/inflight",
    "--health-path",
    "/health",
];

/// Where `hack/control-plane/up` keeps its state.
pub fn state_dir() -> PathBuf {
    if let Ok(dir) = std::env::var("CONTROL_PLANE_DIR") {
        return dir.into();
    }
    let uid = Command::new("id").arg("-u").output().expect("run id -u");
    let uid = String::from_utf8_lossy(&uid.stdout).trim().to_owned();
    std::env::temp_dir().join(format!("integration-operator-{uid}"))
}

pub fn admin_kubeconfig() -> PathBuf {
    let path = state_dir().join("kubeconfig");
    assert!(
        path.exists(),
        "no control plane: {} is missing; start it with hack/control-plane/up (make test does)",
        path.display()
    );
    path
}

pub fn operator_kubeconfig() -> PathBuf {
    admin_kubeconfig().with_file_name("operator.kubeconfig")
}

pub async fn client_for(kubeconfig: &PathBuf) -> Client {
    let kc = Kubeconfig::read_from(kubeconfig).expect("read kubeconfig");
    let config = Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default())
        .await
        .expect("kubeconfig is usable");
    Client::try_from(config).expect("client")
}

/// An admin client, with the CRD and the operator's RBAC installed.
pub async fn admin() -> Client {
    let client = client_for(&admin_kubeconfig()).await;
    install_crd(&client).await;
    client
}

fn repo_path(relative: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(relative)
}

/// Applies crds/integrationcluster.yaml (the committed file, as a user
/// would) and the operator's ClusterRole, bound to the test bed's operator
/// user, then waits until the CRD is served.
pub async fn install_crd(client: &Client) {
    let text =
        std::fs::read_to_string(repo_path("crds/integrationcluster.yaml")).expect("read CRD file");
    let crd: CustomResourceDefinition = serde_saphyr::from_str(&text).expect("CRD file parses");
    let crds: Api<CustomResourceDefinition> = Api::all(client.clone());
    crds.patch(
        CRD_NAME,
        &PatchParams::apply("integration-operator-tests").force(),
        &Patch::Apply(&crd),
    )
    .await
    .expect("apply CRD");
    kubectl(&[
        "apply",
        "--server-side",
        "--force-conflicts",
        "-f",
        "manifests/rbac.yaml",
    ]);
    kubectl(&[
        "apply",
        "--server-side",
        "-f",
        "hack/control-plane/operator-user-binding.yaml",
    ]);
    wait_until(Duration::from_secs(30), "CRD established", || async {
        let crd = crds.get(CRD_NAME).await.ok()?;
        let established = crd
            .status?
            .conditions?
            .iter()
            .any(|c| c.type_ == "Established" && c.status == "True");
        established.then_some(())
    })
    .await;
    // Established can precede the endpoint being served for a moment.
    let api: Api<IntegrationCluster> = Api::all(client.clone());
    wait_until(
        Duration::from_secs(30),
        "IntegrationCluster endpoint served",
        || async { api.list(&Default::default()).await.ok().map(|_| ()) },
    )
    .await;
}

/// Runs the control plane's kubectl with the admin kubeconfig; panics with
/// its output when it fails.
pub fn kubectl(args: &[&str]) -> String {
    let output = kubectl_output(args);
    assert!(
        output.status.success(),
        "kubectl {} failed: {}",
        args.join(" "),
        String::from_utf8_lossy(&output.stderr)
    );
    String::from_utf8_lossy(&output.stdout).into_owned()
}

pub fn kubectl_output(args: &[&str]) -> std::process::Output {
    let kubectl = std::env::var("KUBECTL").unwrap_or_else(|_| "kubectl".into());
    Command::new(&kubectl)
        .args(args)
        .env("KUBECONFIG", admin_kubeconfig())
        // Discovery and OpenAPI caches belong to this control plane, not ~/.kube.
        .env("KUBECACHEDIR", state_dir().join("kubectl-cache"))
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap_or_else(|e| {
            panic!("run {kubectl}: {e}; make test puts the control plane's kubectl on PATH")
        })
}

/// The pinned Helm, built by `hack/install-helm` on first use.
pub fn helm_binary() -> PathBuf {
    let out = Command::new(concat!(env!("CARGO_MANIFEST_DIR"), "/hack/install-helm"))
        .output()
        .expect("run hack/install-helm");
    assert!(
        out.status.success(),
        "hack/install-helm failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
}

/// Runs helm with the admin kubeconfig; panics with its output when it fails.
pub fn helm(args: &[&str]) -> String {
    let out = Command::new(helm_binary())
        .args(args)
        .env("KUBECONFIG", admin_kubeconfig())
        .output()
        .expect("run helm");
    assert!(
        out.status.success(),
        "helm {} failed: {}{}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Runs kubectl until it succeeds: what the API server publishes about a
/// new CRD (discovery, OpenAPI) follows its Established condition a little
/// later.
pub async fn kubectl_eventually(args: &[&str]) -> String {
    let what = format!("kubectl {}", args.join(" "));
    wait_until(Duration::from_secs(30), &what, || async {
        let output = kubectl_output(args);
        output
            .status
            .success()
            .then(|| String::from_utf8_lossy(&output.stdout).into_owned())
    })
    .await
}

/// A kubeconfig that authenticates as ServiceAccount `account` of
/// `namespace`, with a token the API server issues for it now.
pub fn service_account_kubeconfig(namespace: &str, account: &str) -> PathBuf {
    let token = kubectl(&["create", "token", account, "-n", namespace, "--duration=1h"]);
    let path = state_dir().join(format!("{}.kubeconfig", unique(account)));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\n\
             clusters: [{{name: local, cluster: {{server: 'https://{}', certificate-authority: '{}'}}}}]\n\
             users: [{{name: sa, user: {{token: '{}'}}}}]\n\
             contexts: [{{name: local, context: {{cluster: local, user: sa}}}}]\n\
             current-context: local\n",
            api_server_address(),
            state_dir().join("pki").join("ca.crt").display(),
            token.trim()
        ),
    )
    .expect("write kubeconfig");
    path
}

/// The test bed PostgreSQL's superuser URL (from `postgres.env`).
pub fn postgres_admin_url() -> String {
    let env = std::fs::read_to_string(state_dir().join("postgres.env"))
        .expect("postgres.env: start the test bed with hack/control-plane/up");
    env.lines()
        .find_map(|l| l.strip_prefix("DATABASE_URL="))
        .expect("DATABASE_URL in postgres.env")
        .to_owned()
}

/// host:port of the test bed PostgreSQL (each plane has its own port).
pub fn postgres_address() -> String {
    let url = postgres_admin_url();
    let after_at = url.rsplit_once('@').map_or(url.as_str(), |(_, h)| h);
    after_at
        .split_once('/')
        .map_or(after_at, |(h, _)| h)
        .to_owned()
}

/// host:port of the API server in the admin kubeconfig.
pub fn api_server_address() -> String {
    let text = std::fs::read_to_string(admin_kubeconfig()).expect("kubeconfig");
    text.lines()
        .find_map(|l| l.trim().strip_prefix("server: https://"))
        .expect("server in kubeconfig")
        .trim()
        .to_owned()
}

/// A Secret `name` in `namespace` with an admin URL under key `url`, as a
/// user creates it for `database.mode: external`.
pub async fn database_admin_secret(client: &Client, namespace: &str, name: &str, url: &str) {
    let api: Api<Secret> = Api::namespaced(client.clone(), namespace);
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "stringData": {"url": url},
    }))
    .expect("secret");
    api.create(&PostParams::default(), &secret)
        .await
        .expect("create admin secret");
}

/// The pods of one component of a cluster that are not being deleted, by
/// name.
pub async fn live_pods(
    client: &Client,
    namespace: &str,
    cluster: &str,
    component: &str,
) -> std::collections::BTreeMap<String, Pod> {
    let api: Api<Pod> = Api::namespaced(client.clone(), namespace);
    let selector =
        format!("integration.dev/cluster={cluster},app.kubernetes.io/component={component}");
    api.list(&kube::api::ListParams::default().labels(&selector))
        .await
        .expect("list pods")
        .items
        .into_iter()
        .filter(|p| p.metadata.deletion_timestamp.is_none())
        .map(|p| (kube::ResourceExt::name_any(&p), p))
        .collect()
}

/// Pod name → uid, to tell a replaced pod from the one before.
pub fn uids(
    pods: &std::collections::BTreeMap<String, Pod>,
) -> std::collections::BTreeMap<String, String> {
    pods.iter()
        .map(|(n, p)| (n.clone(), p.metadata.uid.clone().unwrap_or_default()))
        .collect()
}

/// A unique name: tests share one control plane and run in parallel.
pub fn unique(prefix: &str) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{prefix}-{:x}{}",
        nanos % 0xfffff,
        COUNTER.fetch_add(1, Ordering::Relaxed)
    )
}

/// Where the API server's audit log (every write, see
/// hack/control-plane/audit-policy.yaml) ends now: a test that reads only
/// what follows need not parse what every other test wrote.
pub fn audit_end() -> u64 {
    std::fs::metadata(state_dir().join("audit.log")).map_or(0, |m| m.len())
}

/// The completed requests on objects of `ns` logged since `from`.
pub fn audit_entries(ns: &str, from: u64) -> Vec<Value> {
    use std::io::{Read, Seek};
    let mut file = std::fs::File::open(state_dir().join("audit.log")).expect("open audit log");
    file.seek(std::io::SeekFrom::Start(from))
        .expect("seek audit log");
    let mut text = String::new();
    file.read_to_string(&mut text).expect("read audit log");
    // The log is shared by every test, and large: parse only lines that
    // can be about `ns`.
    let marker = format!("\"namespace\":\"{ns}\"");
    text.lines()
        .filter(|line| line.contains(&marker))
        .filter_map(|line| serde_json::from_str::<Value>(line).ok())
        .filter(|e| e["stage"] == "ResponseComplete" && e["objectRef"]["namespace"] == ns)
        .collect()
}

/// An audit entry as "verb resource/subresource name".
pub fn audit_request(entry: &Value) -> String {
    format!(
        "{} {}/{} {}",
        entry["verb"].as_str().unwrap_or_default(),
        entry["objectRef"]["resource"].as_str().unwrap_or_default(),
        entry["objectRef"]["subresource"]
            .as_str()
            .unwrap_or_default(),
        entry["objectRef"]["name"].as_str().unwrap_or_default()
    )
}

/// Write requests the operator's user made in `ns`, as [`audit_request`].
pub fn operator_writes(ns: &str) -> Vec<String> {
    audit_entries(ns, 0)
        .iter()
        .filter(|e| e["user"]["username"] == "integration-operator")
        .map(audit_request)
        .collect()
}

/// A namespace of its own for one test.
pub async fn namespace(client: &Client, prefix: &str) -> String {
    let name = unique(prefix);
    let api: Api<Namespace> = Api::all(client.clone());
    let ns: Namespace =
        serde_json::from_value(serde_json::json!({"metadata": {"name": name}})).expect("namespace");
    api.create(&PostParams::default(), &ns)
        .await
        .expect("create namespace");
    name
}

pub async fn delete_namespace(client: &Client, name: &str) {
    let api: Api<Namespace> = Api::all(client.clone());
    let _ = api.delete(name, &DeleteParams::background()).await;
}

/// The IntegrationCluster resource for untyped requests: invalid specs
/// cannot be built from the Rust types, but a user can still send them.
pub fn ic_resource() -> ApiResource {
    ApiResource::from_gvk(&GroupVersionKind::gvk(
        &IntegrationCluster::group(&()),
        &IntegrationCluster::version(&()),
        &IntegrationCluster::kind(&()),
    ))
}

pub fn dynamic_api(client: &Client, namespace: &str) -> Api<DynamicObject> {
    Api::namespaced_with(client.clone(), namespace, &ic_resource())
}

/// Creates an IntegrationCluster from YAML as a user would send it.
pub async fn create_yaml(
    client: &Client,
    namespace: &str,
    yaml: &str,
) -> Result<DynamicObject, kube::Error> {
    let value: Value = serde_saphyr::from_str(yaml).expect("test YAML parses");
    let obj: DynamicObject = serde_json::from_value(value).expect("object");
    dynamic_api(client, namespace)
        .create(&PostParams::default(), &obj)
        .await
}

/// Waits until the operator has seen the cluster's current generation and
/// its status satisfies `accept`.
pub async fn status_when(
    api: &Api<IntegrationCluster>,
    name: &str,
    what: &str,
    accept: impl Fn(&IntegrationClusterStatus) -> bool,
) -> IntegrationClusterStatus {
    wait_until(
        Duration::from_secs(60),
        &format!("{name}: {what}"),
        || async {
            let ic = api.get(name).await.ok()?;
            let status = ic.status?;
            (status.observed_generation == ic.metadata.generation && accept(&status))
                .then_some(status)
        },
    )
    .await
}

/// Polls `probe` until it returns `Some`, or panics after `timeout`.
pub async fn wait_until<T, F, Fut>(timeout: Duration, what: &str, mut probe: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(value) = probe().await {
            return value;
        }
        assert!(
            Instant::now() < deadline,
            "timed out after {timeout:?} waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A process of the operator binary, killed when dropped; its log goes to
/// the control plane's log directory.
pub struct Operator {
    child: Child,
}

impl Operator {
    /// The controller, as the test bed's RBAC-limited operator user,
    /// watching one namespace.
    pub fn start(namespace: &str) -> Self {
        Self::spawn(
            &format!("operator-{namespace}"),
            &["run", "--namespace", namespace],
            &operator_kubeconfig(),
        )
    }

    /// The controller with extra arguments (leader election, say); `name`
    /// tells its log apart.
    pub fn start_with(namespace: &str, name: &str, extra: &[&str]) -> Self {
        let mut args = vec!["run", "--namespace", namespace];
        args.extend_from_slice(extra);
        Self::spawn(
            &format!("operator-{namespace}-{name}"),
            &args,
            &operator_kubeconfig(),
        )
    }

    /// The controller with extra arguments, talking to the API server
    /// through `kubeconfig` (a ServiceAccount's, say).
    pub fn start_via(namespace: &str, name: &str, extra: &[&str], kubeconfig: &PathBuf) -> Self {
        let mut args = vec!["run", "--namespace", namespace];
        args.extend_from_slice(extra);
        Self::spawn(&format!("operator-{namespace}-{name}"), &args, kubeconfig)
    }

    /// An agent impersonating `pod` (as kwok pods run no containers), with
    /// its server's hooks on `server` (host:port).
    pub fn agent(namespace: &str, pod: &str, server: &str) -> Self {
        Self::agent_with(namespace, pod, server, &[])
    }

    /// An agent with extra arguments (package list, installed directory),
    /// driving the stand-in's quiesce, resume, in-flight and health hooks.
    pub fn agent_with(namespace: &str, pod: &str, server: &str, extra: &[&str]) -> Self {
        let mut args = STANDIN_HOOKS.to_vec();
        args.extend_from_slice(extra);
        Self::agent_via(namespace, pod, server, &args, &admin_kubeconfig())
    }

    /// An agent talking to the API server through `kubeconfig` (a test's
    /// proxy, say).
    pub fn agent_via(
        namespace: &str,
        pod: &str,
        server: &str,
        extra: &[&str],
        kubeconfig: &PathBuf,
    ) -> Self {
        Self::agent_every(namespace, pod, server, "200", extra, kubeconfig)
    }

    /// An agent that looks at its server every `interval_ms` (the
    /// others: every 200 ms, to keep the tests quick).
    pub fn agent_every(
        namespace: &str,
        pod: &str,
        server: &str,
        interval_ms: &str,
        extra: &[&str],
        kubeconfig: &PathBuf,
    ) -> Self {
        let mut args = vec![
            "agent",
            "watch",
            "--pod-name",
            pod,
            "--pod-namespace",
            namespace,
            "--server",
            server,
            "--interval-ms",
            interval_ms,
        ];
        args.extend_from_slice(extra);
        Self::spawn(&format!("agent-{namespace}-{pod}"), &args, kubeconfig)
    }

    /// Sends `signal` (TERM, STOP, CONT, KILL) to the process.
    pub fn signal(&self, signal: &str) {
        let status = Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Waits until the process exited (after a signal), up to `timeout`;
    /// async, so servers on the test's runtime keep answering meanwhile.
    pub async fn wait_exit(&mut self, timeout: Duration) -> bool {
        let deadline = Instant::now() + timeout;
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        false
    }

    /// Where the log of the agent of `pod` in `namespace` goes.
    pub fn agent_log(namespace: &str, pod: &str) -> PathBuf {
        state_dir()
            .join("logs")
            .join(format!("agent-{namespace}-{pod}.log"))
    }

    fn spawn(log_name: &str, args: &[&str], kubeconfig: &PathBuf) -> Self {
        let log = std::fs::File::create(state_dir().join("logs").join(format!("{log_name}.log")))
            .expect("create log");
        let child = Command::new(env!("CARGO_BIN_EXE_integration-operator"))
            .args(args)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start integration-operator");
        Self { child }
    }

    /// The exit code, once the process has exited (None while it runs or
    /// when a signal ended it).
    pub fn exit_code(&mut self) -> Option<i32> {
        self.child.try_wait().ok().flatten().and_then(|s| s.code())
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for Operator {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Waits until `name` no longer exists in `api`, finalizers and all;
/// panics after `within`. Returns how long it took, which tests of
/// deletion bound.
pub async fn gone<K>(api: &Api<K>, name: &str, within: Duration) -> Duration
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    let started = Instant::now();
    while api
        .get_opt(name)
        .await
        .unwrap_or_else(|e| panic!("read {} {name}: {e}", K::kind(&())))
        .is_some()
    {
        assert!(
            started.elapsed() < within,
            "{} {name} still exists after {within:?}",
            K::kind(&())
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    started.elapsed()
}

/// Deletes `name` with `params` and waits until it is [`gone`].
pub async fn delete_until_gone<K>(
    api: &Api<K>,
    name: &str,
    params: &DeleteParams,
    within: Duration,
) -> Duration
where
    K: Resource<DynamicType = ()> + Clone + serde::de::DeserializeOwned + std::fmt::Debug,
{
    api.delete(name, params)
        .await
        .unwrap_or_else(|e| panic!("delete {} {name}: {e}", K::kind(&())));
    gone(api, name, within).await
}
