//! `kubectl integration`: status and node workflows of IntegrationClusters
//! for people. Install with `cargo install --path .`; kubectl finds the
//! `kubectl-integration` binary on PATH.

use std::process::ExitCode;

use anyhow::{Context as _, bail};
use clap::{Parser, Subcommand, ValueEnum};
use integration_operator::api::IntegrationCluster;
use integration_operator::plugin::{self, Change, Edit, FIELD_MANAGER, List};
use kube::api::{Api, Patch, PatchParams};
use kube::{Client, Resource};

const EXAMPLES: &str = "\
Examples:
  kubectl integration status orders -n prod
  kubectl integration status orders -o yaml
  kubectl integration offline orders orders-1     # stop client traffic, quiesce
  kubectl integration online orders orders-1
  kubectl integration remove orders orders-2      # drain, then delete the node
  kubectl integration add-back orders orders-2    # returns offline; then `online`";

/// Status and node workflows of IntegrationClusters.
#[derive(Parser)]
#[command(name = "kubectl integration", version, about, after_help = EXAMPLES)]
struct Cli {
    /// Namespace of the IntegrationCluster (default: the kubeconfig context's).
    #[arg(short, long, global = true)]
    namespace: Option<String>,
    /// Output format.
    #[arg(short, long, global = true, value_enum, default_value_t = Output::Table)]
    output: Output,
    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, ValueEnum)]
enum Output {
    Table,
    Json,
    Yaml,
}

#[derive(Subcommand)]
enum Command {
    /// Nodes with state, readiness, digests in sync, listener holders and messages.
    Status { cluster: String },
    /// Take a node offline: no client traffic, reachable on the admin Service.
    Offline { cluster: String, node: String },
    /// Bring an offline node back online.
    Online { cluster: String, node: String },
    /// Remove a node once its in-flight and guaranteed-delivery work drained.
    Remove { cluster: String, node: String },
    /// Add a removed node back; it returns offline (bring it online after).
    AddBack { cluster: String, node: String },
}

#[tokio::main]
async fn main() -> ExitCode {
    match run(Cli::parse()).await {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let config = kube::Config::infer()
        .await
        .context("no Kubernetes configuration found: set KUBECONFIG")?;
    let namespace = cli
        .namespace
        .unwrap_or_else(|| config.default_namespace.clone());
    let client = Client::try_from(config).context("building the Kubernetes client")?;
    let api: Api<IntegrationCluster> = Api::namespaced(client, &namespace);
    match cli.command {
        Command::Status { cluster } => {
            let ic = get(&api, &cluster).await?;
            print!("{}", render(&ic, cli.output)?);
        }
        Command::Offline { cluster, node } => {
            edit(&api, &cluster, &node, &[(List::Offline, true)], cli.output).await?;
        }
        Command::Online { cluster, node } => {
            edit(&api, &cluster, &node, &[(List::Offline, false)], cli.output).await?;
        }
        Command::Remove { cluster, node } => {
            edit(&api, &cluster, &node, &[(List::Remove, true)], cli.output).await?;
        }
        Command::AddBack { cluster, node } => {
            // Seed 003: a server added back may be offline; it comes back
            // offline and goes online on request.
            let edits = [(List::Offline, true), (List::Remove, false)];
            edit(&api, &cluster, &node, &edits, cli.output).await?;
        }
    }
    Ok(())
}

async fn get(api: &Api<IntegrationCluster>, name: &str) -> anyhow::Result<IntegrationCluster> {
    match api.get_opt(name).await {
        Ok(Some(ic)) => Ok(ic),
        Ok(None) => bail!("IntegrationCluster {name} not found (use -n to pick the namespace)"),
        Err(kube::Error::Api(e)) if e.code == 404 => {
            bail!("the IntegrationCluster CRD is not installed in this cluster")
        }
        Err(e) => Err(e).context(format!("reading IntegrationCluster {name}")),
    }
}

fn render(ic: &IntegrationCluster, output: Output) -> anyhow::Result<String> {
    Ok(match output {
        Output::Table => plugin::status_table(ic),
        Output::Json => serde_json::to_string_pretty(ic)? + "\n",
        Output::Yaml => serde_saphyr::to_string(ic)?,
    })
}

async fn edit(
    api: &Api<IntegrationCluster>,
    cluster: &str,
    node: &str,
    edits: &[(List, bool)],
    output: Output,
) -> anyhow::Result<()> {
    let ic = get(api, cluster).await?;
    if let Some(tool) = plugin::gitops_manager(&ic.metadata) {
        eprintln!(
            "warning: {cluster} looks managed by {tool}; its next sync may revert this change unless it is also made in Git"
        );
    }
    // An apply states everything this field manager wants: entries it
    // owns in either list and leaves out would be removed.
    let mut nodes = serde_json::Map::new();
    for list in [List::Offline, List::Remove] {
        let own = plugin::owned_entries(&ic.metadata, FIELD_MANAGER, list);
        nodes.insert(
            list.field().into(),
            own.into_iter().collect::<Vec<_>>().into(),
        );
    }
    let mut changed = false;
    for &(list, add) in edits {
        match plugin::plan_edit(&ic, node, Edit { list, add })? {
            Change::Apply(entries) => {
                nodes.insert(list.field().into(), entries.into());
                changed = true;
            }
            Change::Unchanged(why) => eprintln!("{why}"),
        }
    }
    if !changed {
        return Ok(());
    }
    let patch = serde_json::json!({
        "apiVersion": IntegrationCluster::api_version(&()),
        "kind": IntegrationCluster::kind(&()),
        "metadata": {"name": cluster},
        "spec": {"nodes": nodes},
    });
    let updated = api
        .patch(
            cluster,
            &PatchParams::apply(FIELD_MANAGER),
            &Patch::Apply(&patch),
        )
        .await
        .context(format!("updating spec.nodes of {cluster}"))?;
    match output {
        Output::Table => {
            let nodes = updated.spec.nodes.unwrap_or_default();
            println!(
                "{cluster}: spec.nodes.offline = [{}], spec.nodes.remove = [{}]",
                nodes.offline.join(", "),
                nodes.remove.join(", ")
            );
        }
        other => print!("{}", render(&updated, other)?),
    }
    Ok(())
}
