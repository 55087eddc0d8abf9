//! `integration-operator`: subcommand dispatch only.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use integration_operator::{
    agent, api, controller, database, kube_client, listeners, metrics, render, telemetry,
};

/// Kubernetes operator for clustered integration servers.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

// Parsed once at start; the size of the largest variant does not matter.
#[allow(clippy::large_enum_variant)]
#[derive(Subcommand)]
enum Command {
    /// Run the controller: watch IntegrationClusters and reconcile them.
    ///
    /// Uses KUBECONFIG (or ~/.kube/config) outside a cluster and the pod's
    /// service account inside one.
    Run {
        /// Watch only this namespace instead of all namespaces.
        #[arg(long, env = "WATCH_NAMESPACE")]
        namespace: Option<String>,
        /// Log format.
        #[arg(long, value_enum, default_value_t, env = "LOG_FORMAT")]
        log_format: telemetry::LogFormat,
        #[command(flatten)]
        leader: LeaderArgs,
        /// Serve /metrics, /healthz and /readyz on this address.
        #[arg(long, env = "METRICS_ADDRESS")]
        metrics_address: Option<std::net::SocketAddr>,
        /// Image of the agent (init container and sidecar) for clusters
        /// whose spec names none; the chart passes the operator's own.
        #[arg(long, env = "AGENT_IMAGE", default_value = integration_operator::workload::AGENT_IMAGE)]
        agent_image: String,
        /// Clusters reconciled at once, at most.
        #[arg(long, env = "MAX_CONCURRENT_RECONCILES", default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
        max_concurrent_reconciles: u16,
    },
    /// The in-pod agent (runs in every server pod).
    #[command(subcommand)]
    Agent(AgentCommand),
    /// Print the IntegrationCluster CRD as YAML (what crds/ holds).
    ///
    /// Install it with: integration-operator crd | kubectl apply --server-side -f -
    Crd,
}

#[derive(Subcommand)]
enum AgentCommand {
    /// Init container: verify every package of the spec against its sha256
    /// and install the set into the server's package directory, all or
    /// nothing. A failure is written to the termination log and published
    /// as an Event on the pod, and the server never starts.
    Init {
        #[command(flatten)]
        packages: PackageList,
        /// Where ConfigMap package sources are mounted (<dir>/<configmap>/<key>).
        #[arg(
            long,
            env = "PACKAGE_CONFIGMAPS_DIR",
            default_value = agent::init::CONFIG_MAP_SOURCES
        )]
        config_maps_dir: std::path::PathBuf,
        /// Where image package sources are mounted (<dir>/<path>).
        #[arg(
            long,
            env = "PACKAGE_IMAGES_DIR",
            default_value = agent::init::IMAGE_SOURCES
        )]
        images_dir: std::path::PathBuf,
        /// The server's package directory.
        #[arg(long, env = "PACKAGE_DIR")]
        target: std::path::PathBuf,
        /// Where Kubernetes reads the container's termination message.
        #[arg(long, default_value = "/dev/termination-log")]
        termination_log: std::path::PathBuf,
        /// This pod's name, for the Event on failure.
        #[arg(long, env = "POD_NAME")]
        pod_name: Option<String>,
        /// This pod's namespace, for the Event on failure.
        #[arg(long, env = "POD_NAMESPACE")]
        pod_namespace: Option<String>,
    },
    /// Sidecar: quiesce or resume the local server as the operator asks and
    /// report its state, in-flight work and health on the pod.
    Watch {
        /// This pod's name (downward API).
        #[arg(long, env = "POD_NAME")]
        pod_name: String,
        /// This pod's namespace (downward API).
        #[arg(long, env = "POD_NAMESPACE")]
        pod_namespace: String,
        /// host:port of the server's admin port on loopback.
        #[arg(long, env = "SERVER_ADMIN_ADDRESS", default_value = "127.0.0.1:9999")]
        server: String,
        /// Hook that quiesces the server (POST); without it, offline only
        /// stops client traffic.
        #[arg(long, env = "QUIESCE_PATH")]
        quiesce_path: Option<String>,
        /// Hook that resumes the server (POST).
        #[arg(long, env = "RESUME_PATH")]
        resume_path: Option<String>,
        /// Hook that answers the number of requests in flight (GET).
        #[arg(long, env = "IN_FLIGHT_PATH")]
        in_flight_path: Option<String>,
        /// Health endpoint (GET); without it a TCP connect counts.
        #[arg(long, env = "HEALTH_PATH")]
        health_path: Option<String>,
        #[command(flatten)]
        packages: PackageList,
        /// Administrator user for the admin hooks.
        #[arg(long, env = "SERVER_USERNAME")]
        username: Option<String>,
        /// Administrator password for the admin hooks (prefer the
        /// environment: arguments are visible in the process list).
        #[arg(long, env = "SERVER_PASSWORD", hide_env_values = true)]
        password: Option<String>,
        /// Where agent init staged the packages.
        #[arg(long, env = "PACKAGE_DIR", default_value = agent::init::STAGING_DIR)]
        installed_dir: std::path::PathBuf,
        /// The mounted configuration (the operator's ConfigMap).
        #[arg(long, env = "CONFIG_DIR", default_value = render::CONFIG_DIR)]
        config_dir: std::path::PathBuf,
        /// How often to read the server's in-flight work and health, in
        /// milliseconds (changes of the pod are acted on as they come).
        #[arg(long, default_value_t = 1000)]
        interval_ms: u64,
        #[command(flatten)]
        listeners: Box<ListenerArgs>,
    },
}

/// Leader election among operator replicas.
#[derive(clap::Args)]
struct LeaderArgs {
    /// Reconcile only while holding a Lease, so that several replicas can
    /// run with one active (needed when the Deployment has more than one).
    #[arg(long, env = "LEADER_ELECT")]
    leader_elect: bool,
    /// Namespace of the leader Lease (the operator's own).
    #[arg(long, env = "POD_NAMESPACE", default_value = "integration-operator")]
    leader_election_namespace: String,
    /// Name of the leader Lease.
    #[arg(long, default_value = "integration-operator")]
    leader_election_id: String,
    /// This replica's identity (the pod name in a cluster).
    #[arg(long, env = "POD_NAME")]
    leader_election_identity: Option<String>,
    /// Lease duration, renew deadline and retry period in seconds.
    #[arg(long, default_value_t = 15)]
    leader_election_lease_seconds: i32,
    #[arg(long, default_value_t = 10)]
    leader_election_renew_deadline_seconds: i32,
    #[arg(long, default_value_t = 2)]
    leader_election_retry_seconds: i32,
}

/// The cluster's listeners and how the agent drives them.
#[derive(clap::Args)]
struct ListenerArgs {
    /// The cluster's spec.listeners as JSON (the operator sets it).
    #[arg(long, env = "LISTENERS")]
    listeners: Option<String>,
    /// Hook that enables a listener (POST; `{listener}` is replaced by its
    /// target, `epoch` and `until` are added).
    #[arg(long, env = "LISTENER_ENABLE_PATH")]
    listener_enable_path: Option<String>,
    /// Hook that disables a listener (POST).
    #[arg(long, env = "LISTENER_DISABLE_PATH")]
    listener_disable_path: Option<String>,
    /// Hook told of every renewal with the new `until` (POST), for servers
    /// that stop listening on their own when renewals stop.
    #[arg(long, env = "LISTENER_RENEW_PATH")]
    listener_renew_path: Option<String>,
    /// Loopback address of the multi-node claim endpoint.
    #[arg(long, env = "CLAIM_ADDRESS", default_value = "127.0.0.1:9097")]
    claim_address: std::net::SocketAddr,
    /// The cluster database, for multi-node claims (from the cluster's
    /// credentials Secret).
    #[arg(long, env = "DB_HOST")]
    database_host: Option<String>,
    #[arg(long, env = "DB_PORT", default_value_t = 5432)]
    database_port: u16,
    #[arg(long, env = "DB_NAME")]
    database_name: Option<String>,
    #[arg(long, env = "DB_USERNAME")]
    database_username: Option<String>,
    #[arg(long, env = "DB_PASSWORD", hide_env_values = true)]
    database_password: Option<String>,
}

impl ListenerArgs {
    fn setup(self) -> anyhow::Result<agent::ListenerSetup> {
        let specs: Vec<api::ListenerSpec> = match &self.listeners {
            Some(json) if !json.trim().is_empty() => serde_json::from_str(json)
                .context("--listeners is not the JSON of spec.listeners")?,
            _ => Vec::new(),
        };
        let multi = specs.iter().any(|l| l.mode == api::ListenerMode::MultiNode);
        let claims = match (multi, self.database_host, self.database_name) {
            (true, Some(host), Some(name)) => {
                let endpoint = database::Endpoint {
                    host,
                    port: self.database_port,
                    database: name,
                };
                let login = database::Login {
                    username: self.database_username.unwrap_or_default(),
                    password: self.database_password.unwrap_or_default(),
                };
                Some((
                    self.claim_address,
                    database::role_options(&endpoint, &login),
                ))
            }
            _ => None,
        };
        Ok(agent::ListenerSetup {
            specs,
            paths: listeners::ListenerHooks {
                enable: self.listener_enable_path,
                disable: self.listener_disable_path,
                renew: self.listener_renew_path,
            },
            claims,
        })
    }
}

/// The package list the operator renders into the ConfigMap; init installs
/// it, watch checks what is installed against it.
#[derive(clap::Args)]
struct PackageList {
    /// The package list the operator rendered.
    #[arg(long, env = "PACKAGES_FILE", default_value_os_t = render::packages_path())]
    packages_file: std::path::PathBuf,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            namespace,
            log_format,
            leader,
            metrics_address,
            agent_image,
            max_concurrent_reconciles,
        } => {
            let settings = |scope| controller::Settings {
                scope,
                agent_image,
                concurrency: max_concurrent_reconciles,
            };
            run(namespace, log_format, leader, metrics_address, settings).await
        }
        Command::Crd => print_crd(),
        Command::Agent(AgentCommand::Init {
            packages,
            config_maps_dir,
            images_dir,
            target,
            termination_log,
            pod_name,
            pod_namespace,
        }) => {
            let sources = agent::init::Sources {
                config_maps: config_maps_dir,
                images: images_dir,
            };
            let pod = pod_name.zip(pod_namespace);
            agent_init(
                &packages.packages_file,
                &sources,
                &target,
                &termination_log,
                pod,
            )
            .await
        }
        Command::Agent(AgentCommand::Watch {
            pod_name,
            pod_namespace,
            server,
            quiesce_path,
            resume_path,
            in_flight_path,
            health_path,
            packages: package_list,
            username,
            password,
            installed_dir,
            config_dir,
            interval_ms,
            listeners,
        }) => {
            let packages = agent::Packages {
                list: package_list.packages_file,
                installed: installed_dir,
                config_dir,
            };
            let hooks = agent::hooks::Hooks {
                address: server,
                quiesce: quiesce_path,
                resume: resume_path,
                in_flight: in_flight_path,
                health: health_path,
                authorization: username
                    .zip(password)
                    .map(|(u, p)| agent::hooks::basic_auth(&u, &p)),
            };
            match listeners.setup() {
                Ok(setup) => {
                    agent_watch(pod_name, pod_namespace, hooks, packages, interval_ms, setup).await
                }
                Err(e) => Err(e),
            }
        }
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error chain on one line. Many errors (kube's among them) already
/// print their source, so a cause already contained in the text before it
/// is left out instead of repeated.
fn one_line(error: &anyhow::Error) -> String {
    let mut line = String::new();
    for cause in error.chain().map(ToString::to_string) {
        if line.contains(&cause) {
            continue;
        }
        if !line.is_empty() {
            line.push_str(": ");
        }
        line.push_str(&cause);
    }
    line
}

fn print_crd() -> anyhow::Result<()> {
    print!("{}", api::crd_yaml().context("serialising the CRD")?);
    Ok(())
}

async fn agent_init(
    packages_file: &std::path::Path,
    sources: &agent::init::Sources,
    target: &std::path::Path,
    termination_log: &std::path::Path,
    pod: Option<(String, String)>,
) -> anyhow::Result<()> {
    let result = match agent::init::read_list(packages_file) {
        Ok(packages) => match agent::init::fetch(&packages, sources, &agent::init::LIMITS).await {
            Ok(archives) => agent::init::install(&packages, archives, target, &agent::init::LIMITS),
            Err(e) => Err(e),
        },
        Err(e) => Err(e),
    };
    match result {
        Ok(installed) => {
            println!(
                "installed {} package(s): {}",
                installed.len(),
                installed.join(", ")
            );
            Ok(())
        }
        Err(e) => {
            let message = e.to_string();
            // What `kubectl describe pod` shows as the init container's reason.
            let _ = std::fs::write(termination_log, &message);
            if let Some((name, namespace)) = pod {
                agent::publish_pod_event(&name, &namespace, "PackageInstallFailed", &message).await;
            }
            Err(e.into())
        }
    }
}

async fn agent_watch(
    pod: String,
    namespace: String,
    hooks: agent::hooks::Hooks,
    packages: agent::Packages,
    interval_ms: u64,
    setup: agent::ListenerSetup,
) -> anyhow::Result<()> {
    telemetry::init(telemetry::LogFormat::Text);
    let requests = kube_client::for_requests_inferred()
        .await
        .context("the agent's Kubernetes client")?;
    let watches = kube_client::for_watches_inferred()
        .await
        .context("the agent's Kubernetes client for watches")?;
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    // A signal asks the agent to stop; it disables and releases the
    // listeners before it returns.
    let (stop, shutdown) = tokio::sync::watch::channel(false);
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        let _ = stop.send(true);
    });
    let agent = agent::Agent {
        requests,
        watches,
        namespace,
        pod,
        hooks,
        packages,
        interval: std::time::Duration::from_millis(interval_ms),
        listeners: setup,
    };
    agent.run(shutdown).await?;
    Ok(())
}

/// Serves /metrics, /healthz and /readyz on `address`.
async fn serve_metrics(
    address: std::net::SocketAddr,
    metrics: std::sync::Arc<metrics::Metrics>,
) -> anyhow::Result<()> {
    let listener = tokio::net::TcpListener::bind(address)
        .await
        .with_context(|| format!("binding the metrics address {address}"))?;
    tokio::spawn(async move {
        if let Err(e) = metrics::serve(listener, metrics).await {
            tracing::warn!(%address, error = %e, "the metrics endpoint stopped");
        }
    });
    Ok(())
}

/// A signal stops the controller gracefully: running reconciles finish
/// (the leader keeps renewing meanwhile), then the Lease is released.
fn stop_on_signal() -> anyhow::Result<tokio::sync::watch::Receiver<bool>> {
    let (stop, stopped) = tokio::sync::watch::channel(false);
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .context("installing the SIGTERM handler")?;
    tokio::spawn(async move {
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = terminate.recv() => {}
        }
        let _ = stop.send(true);
    });
    Ok(stopped)
}

/// The leader election the command line asks for.
fn election(client: &kube::Client, leader: &LeaderArgs) -> controller::leader::LeaderElection {
    let identity = leader.leader_election_identity.clone().unwrap_or_else(|| {
        format!(
            "{}-{}",
            std::env::var("HOSTNAME").unwrap_or_else(|_| "operator".to_owned()),
            std::process::id()
        )
    });
    controller::leader::LeaderElection::new(
        client.clone(),
        &leader.leader_election_namespace,
        &leader.leader_election_id,
        &identity,
        listeners::election::Timings::from_seconds(
            leader.leader_election_lease_seconds,
            leader.leader_election_renew_deadline_seconds,
            leader.leader_election_retry_seconds,
        ),
    )
}

async fn run(
    namespace: Option<String>,
    log_format: telemetry::LogFormat,
    leader: LeaderArgs,
    metrics_address: Option<std::net::SocketAddr>,
    settings: impl FnOnce(controller::Scope) -> controller::Settings,
) -> anyhow::Result<()> {
    telemetry::init(log_format);
    let metrics = std::sync::Arc::new(metrics::Metrics::default());
    if let Some(address) = metrics_address {
        serve_metrics(address, metrics.clone()).await?;
    }
    let config = kube::Config::infer().await.context(
        "no Kubernetes configuration found: set KUBECONFIG to a kubeconfig file, or run the operator inside a cluster",
    )?;
    let client = kube::Client::try_from(kube_client::for_requests(config.clone()))
        .context("building the Kubernetes client")?;
    let watches = kube::Client::try_from(kube_client::for_watches(config))
        .context("building the Kubernetes client")?;
    let scope = match namespace {
        Some(ns) => controller::Scope::Namespace(ns),
        None => controller::Scope::AllNamespaces,
    };
    controller::preflight(&client, &scope).await?;
    // A standby is ready too: it is doing what it should.
    metrics
        .ready
        .store(true, std::sync::atomic::Ordering::Relaxed);

    let stopped = stop_on_signal()?;

    let election = leader
        .leader_elect
        .then(|| std::sync::Arc::new(election(&client, &leader)));
    // A lost Lease, by contrast, stops everything at once: another replica
    // may already lead, so not one more write may go out from this one.
    let (lost_tx, mut lost) = tokio::sync::watch::channel(false);
    let (drained_tx, drained) = tokio::sync::watch::channel(false);
    let mut term = None;
    if let Some(election) = &election {
        let mut until_stop = stopped.clone();
        let Some(since) = election.acquire(&mut until_stop).await else {
            return Ok(());
        };
        metrics.set_leader(true);
        let election = election.clone();
        term = Some(tokio::spawn(async move {
            let end = election.keep(since, drained).await;
            if end == controller::leader::TermEnd::Lost {
                let _ = lost_tx.send(true);
            }
            end
        }));
    }

    if election.is_none() {
        metrics.set_leader(true);
    }
    let mut until_stop = stopped.clone();
    let controller = controller::run(
        client,
        watches,
        settings(scope),
        metrics.clone(),
        async move {
            let _ = until_stop.wait_for(|s| *s).await;
        },
    );
    tokio::select! {
        () = controller => {}
        // Dropping the controller aborts its running reconciles, and the
        // process exits before anything else runs; the Deployment
        // restarts it as a standby.
        Ok(_) = lost.wait_for(|l| *l) => {
            anyhow::bail!("lost the leader lease; stopped at once, exiting so that a restart contends again");
        }
    }

    if let (Some(election), Some(term)) = (election, term) {
        let _ = drained_tx.send(true);
        if term.await.ok() == Some(controller::leader::TermEnd::Lost) {
            anyhow::bail!("lost the leader lease; exiting so that a restart contends again");
        }
        election.release().await;
    }
    Ok(())
}
