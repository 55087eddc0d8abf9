//! What the agent does at each look at its pod and server: bring the
//! server to the state the operator asks for, then report what the server
//! does on the pod.

use k8s_openapi::api::core::v1::Pod;
use kube::api::{Api, Patch};
use tracing::{info, warn};

use super::hooks::Hooks;
use super::{PACKAGE_CHECK, Packages, config_files, init, patch_params};
use crate::protocol::{Desired, Report};

/// The agent's view of its node between looks.
pub struct Node {
    pods: Api<Pod>,
    name: String,
    hooks: Hooks,
    packages: Packages,
    /// Whether this agent quiesced the server (from the pod's report when
    /// the agent started).
    quiesced: bool,
    /// The UID of the pod this agent started in: a pod of the same name
    /// with another UID is a successor, and this agent no longer contends
    /// for listeners.
    pub uid: Option<String>,
    digests: Digests,
    /// The last report written, and the resourceVersion of the pod it was
    /// compared with: until the watch brings a newer pod, the pod still
    /// shows the report before it, and writing again would repeat it.
    written: Option<(Report, Option<String>)>,
}

/// What is installed and mounted, checksummed every [`PACKAGE_CHECK`].
#[derive(Default)]
struct Digests {
    installed: Option<String>,
    files: Option<String>,
    checked: Option<tokio::time::Instant>,
}

impl Node {
    /// The node as its pod shows it when the agent starts.
    pub fn new(
        pods: Api<Pod>,
        name: String,
        first: &Pod,
        hooks: Hooks,
        packages: Packages,
    ) -> Self {
        Node {
            pods,
            name,
            hooks,
            packages,
            quiesced: Report::of(first).is_some_and(|r| r.quiesced),
            uid: first.metadata.uid.clone(),
            digests: Digests::default(),
            written: None,
        }
    }

    /// Quiesces or resumes the server as the pod asks. A node going
    /// offline hands its listeners over first (`handing_over`: it still
    /// holds one).
    pub async fn follow(&mut self, pod: &Pod, handing_over: bool) {
        let pod_name = self.name.as_str();
        let want_offline = Desired::of(pod) == Desired::Offline;
        if want_offline && !self.quiesced && handing_over {
            info!(pod = pod_name, "handing listeners over before quiescing");
        } else if want_offline && !self.quiesced {
            match self.hooks.quiesce().await {
                Ok(()) => {
                    self.quiesced = true;
                    info!(pod = pod_name, "server quiesced");
                }
                Err(e) => warn!(pod = pod_name, error = %e, "quiesce failed"),
            }
        } else if !want_offline && self.quiesced {
            match self.hooks.resume().await {
                Ok(()) => {
                    self.quiesced = false;
                    info!(pod = pod_name, "server resumed");
                }
                Err(e) => warn!(pod = pod_name, error = %e, "resume failed"),
            }
        }
    }

    /// Writes the server's state on the pod when it differs from what the
    /// pod shows.
    pub async fn report(&mut self, pod: &Pod) {
        let in_flight = match self.hooks.in_flight().await {
            Ok(n) => Some(n),
            Err(e) => {
                warn!(pod = %self.name, error = %e, "reading in-flight work failed");
                None
            }
        };
        self.check_digests();
        let report = Report {
            quiesced: self.quiesced,
            in_flight,
            healthy: self.hooks.healthy().await,
            installed_packages: self.digests.installed.clone(),
            config_files: self.digests.files.clone(),
        };
        let version = pod.metadata.resource_version.clone();
        let pending = Some((report.clone(), version.clone()));
        if Report::of(pod).as_ref() == Some(&report) || self.written == pending {
            return;
        }
        let patch = serde_json::json!({"metadata": {"annotations": report.annotations()}});
        match self
            .pods
            .patch(&self.name, &patch_params(), &Patch::Merge(&patch))
            .await
        {
            Ok(_) => self.written = pending,
            Err(e) => warn!(pod = %self.name, error = %e, "reporting failed"),
        }
    }

    fn check_digests(&mut self) {
        if self
            .digests
            .checked
            .is_some_and(|t| t.elapsed() <= PACKAGE_CHECK)
        {
            return;
        }
        let packages = &self.packages;
        self.digests.installed = init::read_list(&packages.list).ok().map(|list| {
            init::installed_digest(&list, &packages.installed)
                .unwrap_or_else(|| "incomplete".to_owned())
        });
        self.digests.files = config_files(&packages.config_dir)
            .map(|data| crate::render::files_digest(&data, &self.name));
        self.digests.checked = Some(tokio::time::Instant::now());
    }
}
