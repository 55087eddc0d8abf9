//! `integration-operator`: subcommand dispatch only.

use std::process::ExitCode;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use integration_operator::{api, controller, telemetry};

/// Kubernetes operator for clustered integration servers.
#[derive(Parser)]
#[command(version, about, long_about = None)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

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
    },
    /// Print the IntegrationCluster CRD as YAML (what crds/ holds).
    ///
    /// Install it with: integration-operator crd | kubectl apply --server-side -f -
    Crd,
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Run {
            namespace,
            log_format,
        } => run(namespace, log_format).await,
        Command::Crd => print_crd(),
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

async fn run(namespace: Option<String>, log_format: telemetry::LogFormat) -> anyhow::Result<()> {
    telemetry::init(log_format);
    let config = kube::Config::infer().await.context(
        "no Kubernetes configuration found: set KUBECONFIG to a kubeconfig file, or run the operator inside a cluster",
    )?;
    let client = kube::Client::try_from(config).context("building the Kubernetes client")?;
    let scope = match namespace {
        Some(ns) => controller::Scope::Namespace(ns),
        None => controller::Scope::AllNamespaces,
    };
    controller::preflight(&client, &scope).await?;
    controller::run(client, scope).await;
    Ok(())
}
