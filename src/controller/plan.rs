//! What to do next, as a pure function of the validated cluster, its
//! rendered configuration and the pods and claims that exist.
//!
//! A plan is one step, not a script: every reconcile plans again from what
//! it observes, so an operator restarted at any point continues where the
//! objects say it was. The safety rules live here:
//! - a node is replaced only when it is drifted, one budget slot at a time
//!   (`rollout.maxUnavailable`), and never while another node is not Ready;
//! - a node is taken offline (gate False) before its pod is deleted;
//! - a node that does not become Ready within the progress deadline stalls
//!   the rollout instead of being rolled through;
//! - a paused cluster gets no workload actions at all.

use std::collections::{BTreeMap, BTreeSet};

use k8s_openapi::api::core::v1::{PersistentVolumeClaim, Pod};
use k8s_openapi::jiff::Timestamp;

use crate::agent::Report;
use crate::api::{DeletionPolicy, IntegrationCluster, NodeState, NodeStatus};
use crate::naming::annotations;
use crate::workflows::{self, AgentFacts, Facts, GdWork, Intent, PodFacts, Step};
use kube::ResourceExt;

/// Nodes (comma-separated) whose workflow may pass its safety stops: the
/// drain timeout of a removal, or taking the last online node offline.
pub const FORCE_ANNOTATION: &str = "integration.dev/force";
use crate::naming;
use crate::render::Rendered;
use crate::validation::ValidatedCluster;
use crate::workload;

/// What exists now.
pub struct Observed<'a> {
    pub pods: &'a [Pod],
    pub claims: &'a [PersistentVolumeClaim],
    /// Unfinished guaranteed-delivery work per node; None when the cluster
    /// has no database, Some(Err) when the database did not answer.
    pub gd: Option<Result<&'a BTreeMap<String, u64>, ()>>,
    /// Why new servers cannot start yet, if they cannot.
    pub start_blocked: Option<&'a str>,
    /// Nodes holding a single-node listener's Lease now.
    pub listener_holders: &'a [String],
    /// The agent image for pods whose spec names none (`--agent-image`).
    pub agent_image: &'a str,
    pub now: Timestamp,
}

/// One change to the world.
#[derive(Clone, Debug, PartialEq)]
pub enum Action {
    CreateClaim(Box<PersistentVolumeClaim>),
    CreatePod(Box<Pod>),
    /// Set the node's readiness gate: False stops client traffic first.
    SetOnline {
        node: String,
        online: bool,
    },
    /// Ask the node's agent to quiesce (offline) or resume the server.
    AskOffline {
        node: String,
        offline: bool,
    },
    DeletePod {
        node: String,
        reason: String,
    },
    DeleteClaim {
        name: String,
    },
}

/// How one node looks to the plan, for status.
#[derive(Clone, Debug, PartialEq)]
pub struct NodeView {
    pub name: String,
    pub state: NodeState,
    pub ready: bool,
    pub config_digest: Option<String>,
    pub packages_digest: Option<String>,
    pub logical_hostname: Option<String>,
    pub message: Option<String>,
}

/// The decisions of one reconcile.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Plan {
    pub actions: Vec<Action>,
    /// Drifted nodes and why.
    pub drifted: BTreeMap<String, String>,
    /// Why the rollout cannot go on, if it cannot.
    pub stalled: Option<String>,
    pub nodes: Vec<NodeView>,
    pub ready: i32,
    pub online: i32,
    /// Nodes the spec wants online (members not offline or removed).
    pub expected: i32,
    /// Nodes whose drain timeout was overridden by the force annotation.
    pub forced: Vec<String>,
    /// Member pods that are not Ready yet but still within the deadline.
    pub starting: i32,
    /// Why servers are neither started nor replaced now (the cache or the
    /// database they need is not there yet).
    pub waiting: Option<String>,
}

/// Why `pod` differs from what `member` should run, if it does.
pub fn drift(pod: &Pod, rendered: &Rendered, image: &str) -> Option<String> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let (config, packages, running_image) = workload::digests_of(pod);
    if config != rendered.node_digests.get(name).map(String::as_str) {
        return Some("configuration changed".into());
    }
    if packages != Some(rendered.packages_digest.as_str()) {
        return Some("package set changed".into());
    }
    if let Some(files) = pod.annotations().get(annotations::CONFIG_FILES)
        && *files != rendered.files_digest(name)
    {
        return Some(format!(
            "configuration files in the pod differ from the ConfigMap (the agent reports {files})"
        ));
    }
    if let Some(installed) = pod.annotations().get(annotations::INSTALLED_PACKAGES)
        && installed != &rendered.packages_digest
    {
        return Some(format!(
            "installed packages differ from the spec (the agent reports {installed})"
        ));
    }
    if running_image != Some(image) {
        return Some(format!(
            "server image is {} instead of {image}",
            running_image.unwrap_or("missing")
        ));
    }
    None
}

fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Seconds the pod has not been Ready: since its Ready condition last
/// turned False, or since it was created if it never was Ready. A node that
/// was Ready for days and fails one probe is not stalled at once.
fn unready_seconds(pod: &Pod, now: Timestamp) -> i64 {
    let ready_since = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready" && c.status != "True"))
        .and_then(|c| c.last_transition_time.as_ref());
    ready_since
        .or(pod.metadata.creation_timestamp.as_ref())
        .map_or(0, |t| now.as_second() - t.0.as_second())
}

/// Clients may still be sent to the pod: it is Ready, or it stopped being
/// Ready less than [`workflows::ENDPOINT_SETTLE_SECONDS`] ago.
fn serving(pod: &Pod, now: Timestamp) -> bool {
    workload::is_ready(pod) || unready_seconds(pod, now) < workflows::ENDPOINT_SETTLE_SECONDS
}

/// Replacement order: listener-lease holders last, so a listener moves at
/// most once per rollout; otherwise by ordinal.
pub fn rollout_order(nodes: &mut [(u32, String)], holders: &BTreeSet<String>) {
    nodes.sort_by_key(|(ordinal, name)| (holders.contains(name), *ordinal));
}

pub fn plan(
    ic: &IntegrationCluster,
    cluster: &ValidatedCluster,
    rendered: &Rendered,
    observed: &Observed,
) -> Plan {
    let spec = &ic.spec;
    let name = ic.metadata.name.as_deref().unwrap_or_default();
    let deadline = i64::from(spec.rollout.progress_deadline_seconds);
    let pods: BTreeMap<&str, &Pod> = observed
        .pods
        .iter()
        .filter_map(|p| Some((p.metadata.name.as_deref()?, p)))
        .collect();
    let claims: BTreeSet<&str> = observed
        .claims
        .iter()
        .filter_map(|c| c.metadata.name.as_deref())
        .collect();
    let members: BTreeSet<&str> = cluster.members.iter().map(|m| m.name.as_str()).collect();
    let mut plan = Plan::default();

    // Scale down: nodes that are no longer members leave, highest first,
    // offline before deleted.
    let mut leaving: Vec<(u32, &Pod)> = pods
        .iter()
        .filter(|(n, _)| !members.contains(*n))
        .filter_map(|(n, p)| Some((naming::node_ordinal(name, n)?, *p)))
        .collect();
    leaving.sort_by_key(|(ordinal, _)| std::cmp::Reverse(*ordinal));
    for (_, pod) in &leaving {
        let node = pod.metadata.name.clone().unwrap_or_default();
        let message = if terminating(pod) {
            "scaling down: pod terminating"
        } else if workload::is_online(pod) {
            plan.actions.push(Action::SetOnline {
                node: node.clone(),
                online: false,
            });
            "scaling down: taking the node offline"
        } else if serving(pod, observed.now) {
            "scaling down: waiting for client traffic to stop"
        } else {
            plan.actions.push(Action::DeletePod {
                node: node.clone(),
                reason: "scale down".into(),
            });
            "scaling down: deleting the pod"
        };
        let (config, packages, _) = workload::digests_of(pod);
        plan.nodes.push(NodeView {
            name: node,
            state: NodeState::Removing,
            ready: workload::is_ready(pod),
            config_digest: config.map(str::to_owned),
            packages_digest: packages.map(str::to_owned),
            logical_hostname: None,
            message: Some(message.into()),
        });
    }
    // Claims of nodes that are gone: deleted only when the policy says so,
    // and only those this cluster owns (a retained claim of an earlier
    // cluster of the same name is nobody's to delete).
    if spec.deletion_policy == DeletionPolicy::Delete {
        let owned = observed
            .claims
            .iter()
            .filter(|c| workload::is_owned_by(&c.metadata, ic))
            .filter_map(|c| c.metadata.name.as_deref());
        for claim in owned {
            let node = claim.strip_prefix("data-").unwrap_or_default();
            if !members.contains(node) && !pods.contains_key(node) {
                plan.actions.push(Action::DeleteClaim {
                    name: (*claim).to_owned(),
                });
            }
        }
    }

    // Members: each node's workflow (create, online, offline, remove, add
    // back) decides its next step; drift and readiness feed the rollout.
    let nodes_spec = spec.nodes.clone().unwrap_or_default();
    let intent_of = |node: &str| {
        if nodes_spec.remove.iter().any(|n| n == node) {
            Intent::Remove
        } else if nodes_spec.offline.iter().any(|n| n == node) {
            Intent::Offline
        } else {
            Intent::Online
        }
    };
    let previous: BTreeMap<&str, &NodeStatus> = ic
        .status
        .iter()
        .flat_map(|s| s.nodes.iter())
        .map(|n| (n.name.as_str(), n))
        .collect();
    let forced: BTreeSet<&str> = ic
        .annotations()
        .get(FORCE_ANNOTATION)
        .map(|v| v.split(',').map(str::trim).collect())
        .unwrap_or_default();
    let mut slots_used = cluster
        .members
        .iter()
        .filter(|m| {
            previous
                .get(m.name.as_str())
                .is_some_and(|n| workflows::holds_slot(n.state))
        })
        .count();
    let mut online_now: BTreeSet<&str> = cluster
        .members
        .iter()
        .filter(|m| {
            pods.get(m.name.as_str())
                .is_some_and(|p| workload::is_online(p))
        })
        .map(|m| m.name.as_str())
        .collect();

    let mut unavailable = 0;
    let mut candidates: Vec<(u32, String)> = Vec::new();
    let mut broken_drifted: Vec<String> = Vec::new();
    for member in &cluster.members {
        let intent = intent_of(&member.name);
        let before = previous.get(member.name.as_str());
        let pod = pods.get(member.name.as_str()).copied();
        let pod_facts = match pod {
            None => PodFacts::Absent,
            Some(p) if terminating(p) => PodFacts::Terminating,
            Some(p) => PodFacts::Present {
                containers_ready: workload::containers_ready(p),
                online: workload::is_online(p),
                ready: workload::is_ready(p),
                serving: serving(p, observed.now),
                asked_offline: p
                    .annotations()
                    .get(annotations::DESIRED_STATE)
                    .is_some_and(|s| s == "offline"),
                agent: Report::of(p).map(|r| AgentFacts {
                    quiesced: r.quiesced,
                    in_flight: r.in_flight,
                    healthy: r.healthy,
                }),
            },
        };
        let holds = before.is_some_and(|n| workflows::holds_slot(n.state));
        let facts = Facts {
            pod: pod_facts,
            in_state_seconds: before
                .and_then(|n| n.since.as_ref())
                .map_or(0, |t| observed.now.as_second() - t.0.as_second()),
            drain_timeout_seconds: i64::from(nodes_spec.drain_timeout_seconds),
            force: forced.contains(member.name.as_str()),
            slot_free: holds
                || slots_used < usize::try_from(spec.rollout.max_unavailable).unwrap_or(1),
            last_online: online_now.len() == 1 && online_now.contains(member.name.as_str()),
            holds_listener: observed.listener_holders.contains(&member.name),
            gd: match observed.gd {
                None => GdWork::NotTracked,
                Some(Err(())) => GdWork::Unknown,
                Some(Ok(counts)) => {
                    GdWork::Unfinished(counts.get(&member.name).copied().unwrap_or(0))
                }
            },
        };
        let mut decision = workflows::decide(&member.name, before.map(|n| n.state), intent, &facts);
        let drifted = pod.and_then(|p| drift(p, rendered, &spec.image));
        if drifted.is_some() {
            // A drifted node is about to be replaced: never back online.
            decision.steps.retain(|s| *s != Step::SetOnline(true));
        }
        if !holds && workflows::holds_slot(decision.state) {
            slots_used += 1;
        }
        if decision.steps.contains(&Step::SetOnline(false)) {
            online_now.remove(member.name.as_str());
        }
        if let Some(why) = &decision.stalled {
            plan.stalled.get_or_insert(why.clone());
        }
        if decision.forced {
            plan.forced.push(member.name.clone());
        }
        for step in &decision.steps {
            match step {
                Step::CreatePod => {
                    if let Some(storage) = &spec.storage {
                        let claim = naming::data_claim(&member.name);
                        if !claims.contains(claim.as_str()) {
                            plan.actions
                                .push(Action::CreateClaim(Box::new(workload::data_claim(
                                    ic,
                                    &member.name,
                                    storage,
                                ))));
                        }
                    }
                    plan.actions.push(Action::CreatePod(Box::new(workload::pod(
                        ic,
                        rendered,
                        member,
                        observed.agent_image,
                    ))));
                }
                Step::SetOnline(online) => plan.actions.push(Action::SetOnline {
                    node: member.name.clone(),
                    online: *online,
                }),
                Step::AskOffline(offline) => plan.actions.push(Action::AskOffline {
                    node: member.name.clone(),
                    offline: *offline,
                }),
                Step::DeletePod => {
                    plan.actions.push(Action::DeletePod {
                        node: member.name.clone(),
                        reason: "removed".into(),
                    });
                    let claim = naming::data_claim(&member.name);
                    if spec.deletion_policy == DeletionPolicy::Delete
                        && claims.contains(claim.as_str())
                    {
                        plan.actions.push(Action::DeleteClaim { name: claim });
                    }
                }
            }
        }
        let mut view = NodeView {
            name: member.name.clone(),
            state: decision.state,
            ready: false,
            config_digest: None,
            packages_digest: None,
            logical_hostname: Some(member.logical_hostname.clone()),
            message: Some(decision.message.clone()).filter(|m| !m.is_empty()),
        };
        if intent == Intent::Online {
            plan.expected += 1;
        }
        let Some(pod) = pod else {
            if intent == Intent::Online {
                unavailable += 1;
            }
            plan.nodes.push(view);
            continue;
        };
        let (config, packages, _) = workload::digests_of(pod);
        view.config_digest = config.map(str::to_owned);
        view.packages_digest = packages.map(str::to_owned);
        view.ready = workload::is_ready(pod);
        if view.ready {
            plan.ready += 1;
            if workload::is_online(pod) {
                plan.online += 1;
            }
        }
        if let Some(reason) = &drifted {
            plan.drifted.insert(member.name.clone(), reason.clone());
            view.message = Some(format!("drifted: {reason}"));
        }
        // Only nodes meant to serve take part in the rollout; an offline
        // or leaving node is replaced, if drifted, when it is not Ready.
        let serving = intent == Intent::Online && !workflows::holds_slot(decision.state);
        if terminating(pod) {
            unavailable += usize::from(serving);
        } else if view.ready {
            if drifted.is_some() && serving {
                candidates.push((member.ordinal, member.name.clone()));
            }
        } else {
            unavailable += usize::from(serving);
            if drifted.is_some() && intent != Intent::Remove {
                broken_drifted.push(member.name.clone());
            } else if serving && decision.steps.is_empty() {
                let unready = unready_seconds(pod, observed.now);
                if unready > deadline {
                    let why = format!(
                        "{} is not Ready for {unready}s (rollout.progressDeadlineSeconds is {deadline})",
                        member.name
                    );
                    plan.stalled.get_or_insert(why.clone());
                    view.message = Some(why);
                } else {
                    plan.starting += 1;
                }
            }
        }
        plan.nodes.push(view);
    }
    let unavailable = i32::try_from(unavailable + slots_used).unwrap_or(i32::MAX);

    // Rolling replacement. A drifted node that is not Ready anyway is
    // replaced at once: that costs no availability. A Ready one needs a
    // budget slot, and none is spent while the rollout is stalled. Nothing
    // is replaced while new servers could not start.
    if observed.start_blocked.is_some() {
        broken_drifted.clear();
        candidates.clear();
    }
    for node in &broken_drifted {
        replace(&mut plan, pods[node.as_str()], node, observed.now);
    }
    // The Leases as observed now, the same fact the offline workflow uses
    // (status may lag behind a hand-over).
    let holders: BTreeSet<String> = observed.listener_holders.iter().cloned().collect();
    rollout_order(&mut candidates, &holders);
    let mut budget = spec.rollout.max_unavailable - unavailable;
    if plan.stalled.is_none() {
        for (_, node) in candidates {
            if budget <= 0 {
                break;
            }
            budget -= 1;
            replace(&mut plan, pods[node.as_str()], &node, observed.now);
        }
    }

    if let Some(why) = observed.start_blocked {
        let before = plan.actions.len();
        plan.actions
            .retain(|a| !matches!(a, Action::CreatePod(_) | Action::CreateClaim(_)));
        if plan.actions.len() < before || !plan.drifted.is_empty() {
            plan.waiting = Some(why.to_owned());
        }
    }
    if spec.paused {
        plan.actions.clear();
    }
    plan
}

/// Takes a drifted node offline, then deletes its pod; the next reconcile
/// creates it anew from the current spec.
fn replace(plan: &mut Plan, pod: &Pod, node: &str, now: Timestamp) {
    let reason = plan.drifted.get(node).cloned().unwrap_or_default();
    if workload::is_online(pod) {
        plan.actions.push(Action::SetOnline {
            node: node.to_owned(),
            online: false,
        });
    } else if serving(pod, now) {
        // Offline, but client traffic has not stopped yet: wait for it.
    } else {
        plan.actions.push(Action::DeletePod {
            node: node.to_owned(),
            reason,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::naming::ONLINE_CONDITION;
    use crate::render;
    use crate::validation;
    use k8s_openapi::api::core::v1::{PodCondition, PodStatus};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;

    const SPEC: &str = "profile: generic\nmode: stateless\nimage: srv:1\nreplicas: 3\n\
        storage: {size: 1Gi}\nrollout: {progressDeadlineSeconds: 60}\n";

    fn cluster(extra: &str) -> IntegrationCluster {
        let spec = serde_saphyr::from_str(&format!("{SPEC}{extra}")).expect("spec");
        scaled(spec, None)
    }

    fn cluster_of(replicas: i32, extra: &str) -> IntegrationCluster {
        let spec = serde_saphyr::from_str(&format!("{SPEC}{extra}")).expect("spec");
        scaled(spec, Some(replicas))
    }

    fn scaled(
        mut spec: crate::api::IntegrationClusterSpec,
        replicas: Option<i32>,
    ) -> IntegrationCluster {
        if let Some(r) = replicas {
            spec.replicas = r;
        }
        let mut ic = IntegrationCluster::new("c", spec);
        ic.metadata.namespace = Some("ns".into());
        ic.metadata.uid = Some("uid".into());
        ic
    }

    fn at(second: i64) -> Timestamp {
        Timestamp::from_second(second).expect("timestamp")
    }

    /// The pods `ic` wants, created at second 0, in the given state.
    fn pods(ic: &IntegrationCluster, containers_ready: bool, online: bool) -> Vec<Pod> {
        let v = validation::validate(ic, &[]).expect("valid");
        let rendered = render::render(ic, &v, &Default::default());
        v.members
            .iter()
            .map(|m| {
                let mut pod = workload::pod(ic, &rendered, m, workload::AGENT_IMAGE);
                pod.metadata.creation_timestamp = Some(Time(at(0)));
                set(&mut pod, containers_ready, online);
                pod
            })
            .collect()
    }

    /// Pod conditions as kwok's stages make them: Ready = containers ready
    /// and the online gate True.
    fn set(pod: &mut Pod, containers_ready: bool, online: bool) {
        let c = |t: &str, v: bool| PodCondition {
            type_: t.into(),
            status: if v { "True" } else { "False" }.into(),
            ..PodCondition::default()
        };
        pod.status = Some(PodStatus {
            conditions: Some(vec![
                c("ContainersReady", containers_ready),
                c(ONLINE_CONDITION, online),
                c("Ready", containers_ready && online),
            ]),
            ..PodStatus::default()
        });
    }

    fn claims(ic: &IntegrationCluster, nodes: &[&str]) -> Vec<PersistentVolumeClaim> {
        let storage = ic.spec.storage.clone().expect("storage");
        nodes
            .iter()
            .map(|n| workload::data_claim(ic, n, &storage))
            .collect()
    }

    fn run(
        ic: &IntegrationCluster,
        pods: &[Pod],
        claims: &[PersistentVolumeClaim],
        now: i64,
    ) -> Plan {
        let v = validation::validate(ic, &[]).expect("valid");
        let rendered = render::render(ic, &v, &Default::default());
        plan(
            ic,
            &v,
            &rendered,
            &Observed {
                pods,
                claims,
                gd: None,
                start_blocked: None,
                listener_holders: &[],
                agent_image: workload::AGENT_IMAGE,
                now: at(now),
            },
        )
    }

    fn kinds(plan: &Plan) -> Vec<String> {
        plan.actions
            .iter()
            .map(|a| match a {
                Action::CreateClaim(c) => {
                    format!("claim {}", c.metadata.name.as_deref().unwrap_or_default())
                }
                Action::CreatePod(p) => {
                    format!("create {}", p.metadata.name.as_deref().unwrap_or_default())
                }
                Action::SetOnline { node, online } => format!("online {node} {online}"),
                Action::AskOffline { node, offline } => format!("ask {node} offline={offline}"),
                Action::DeletePod { node, .. } => format!("delete {node}"),
                Action::DeleteClaim { name } => format!("delete claim {name}"),
            })
            .collect()
    }

    #[test]
    fn a_new_cluster_creates_claims_and_pods() {
        let ic = cluster("");
        let plan = run(&ic, &[], &[], 1);
        assert_eq!(
            kinds(&plan),
            [
                "claim data-c-0",
                "create c-0",
                "claim data-c-1",
                "create c-1",
                "claim data-c-2",
                "create c-2"
            ]
        );
    }

    #[test]
    fn a_settled_cluster_needs_nothing() {
        let ic = cluster("");
        let plan = run(
            &ic,
            &pods(&ic, true, true),
            &claims(&ic, &["c-0", "c-1", "c-2"]),
            10,
        );
        assert!(plan.actions.is_empty(), "{:?}", kinds(&plan));
        assert_eq!((plan.ready, plan.online), (3, 3));
        assert!(plan.drifted.is_empty());
    }

    #[test]
    fn ready_servers_are_brought_online() {
        let ic = cluster("");
        let plan = run(
            &ic,
            &pods(&ic, true, false),
            &claims(&ic, &["c-0", "c-1", "c-2"]),
            10,
        );
        assert_eq!(
            kinds(&plan),
            ["online c-0 true", "online c-1 true", "online c-2 true"]
        );
    }

    #[test]
    fn a_config_change_takes_exactly_one_node_offline_first() {
        let old = cluster("");
        let new = cluster("server: {properties: {threads: '64'}}\n");
        let plan = run(
            &new,
            &pods(&old, true, true),
            &claims(&new, &["c-0", "c-1", "c-2"]),
            10,
        );
        assert_eq!(plan.drifted.len(), 3);
        assert_eq!(kinds(&plan), ["online c-0 false"]);
    }

    #[test]
    fn the_offline_node_is_deleted_once_traffic_stopped_and_nothing_else_moves() {
        let old = cluster("");
        let new = cluster("server: {properties: {threads: '64'}}\n");
        let mut observed = pods(&old, true, true);
        // Gate False, but Ready still True: wait.
        set(&mut observed[0], true, false);
        if let Some(c) = observed[0]
            .status
            .as_mut()
            .and_then(|s| s.conditions.as_mut())
        {
            c[2].status = "True".into();
        }
        let claims = claims(&new, &["c-0", "c-1", "c-2"]);
        assert!(run(&new, &observed, &claims, 10).actions.is_empty());
        // Ready False since second 8: proxies may still send it requests.
        set(&mut observed[0], true, false);
        if let Some(c) = observed[0]
            .status
            .as_mut()
            .and_then(|s| s.conditions.as_mut())
        {
            c[2].last_transition_time = Some(Time(at(8)));
        }
        assert!(run(&new, &observed, &claims, 10).actions.is_empty());
        // Once the endpoint change had time to spread: delete it, and only it.
        let settled = 8 + workflows::ENDPOINT_SETTLE_SECONDS;
        assert_eq!(
            kinds(&run(&new, &observed, &claims, settled)),
            ["delete c-0"]
        );
    }

    #[test]
    fn a_replaced_node_that_never_gets_ready_stalls_the_rollout() {
        let old = cluster("");
        let new = cluster("server: {properties: {threads: '64'}}\n");
        let mut observed = pods(&old, true, true);
        let fresh = pods(&new, false, false);
        observed[0] = fresh[0].clone();
        let claims = claims(&new, &["c-0", "c-1", "c-2"]);
        let early = run(&new, &observed, &claims, 30);
        assert!(early.stalled.is_none());
        assert!(
            early.actions.is_empty(),
            "no budget while c-0 starts: {:?}",
            kinds(&early)
        );
        let late = run(&new, &observed, &claims, 61);
        assert!(
            late.stalled
                .as_deref()
                .is_some_and(|s| s.starts_with("c-0 is not Ready"))
        );
        assert!(
            late.actions.is_empty(),
            "never roll through a broken node: {:?}",
            kinds(&late)
        );
    }

    #[test]
    fn a_long_lived_node_that_just_failed_a_probe_is_not_stalled() {
        let ic = cluster("");
        let mut observed = pods(&ic, true, true);
        if let Some(ready) = observed[1]
            .status
            .as_mut()
            .and_then(|s| s.conditions.as_mut())
            .and_then(|cs| cs.iter_mut().find(|c| c.type_ == "Ready"))
        {
            ready.status = "False".into();
            ready.last_transition_time = Some(Time(at(1000)));
        }
        let claims = claims(&ic, &["c-0", "c-1", "c-2"]);
        assert!(run(&ic, &observed, &claims, 1010).stalled.is_none());
        let stalled = run(&ic, &observed, &claims, 1061).stalled;
        assert_eq!(
            stalled.as_deref(),
            Some("c-1 is not Ready for 61s (rollout.progressDeadlineSeconds is 60)")
        );
    }

    #[test]
    fn a_broken_drifted_node_is_replaced_at_once() {
        let old = cluster("");
        let new = cluster("server: {properties: {threads: '64'}}\n");
        let mut observed = pods(&new, true, true);
        observed[1] = pods(&old, false, false)[1].clone();
        let plan = run(&new, &observed, &claims(&new, &["c-0", "c-1", "c-2"]), 500);
        assert_eq!(kinds(&plan), ["delete c-1"]);
    }

    #[test]
    fn a_hand_edited_image_is_drift() {
        let ic = cluster("");
        let mut observed = pods(&ic, true, true);
        if let Some(spec) = observed[2].spec.as_mut() {
            spec.containers[0].image = Some("srv:hacked".into());
        }
        let plan = run(&ic, &observed, &claims(&ic, &["c-0", "c-1", "c-2"]), 10);
        assert_eq!(
            plan.drifted.get("c-2").map(String::as_str),
            Some("server image is srv:hacked instead of srv:1")
        );
        assert_eq!(kinds(&plan), ["online c-2 false"]);
    }

    #[test]
    fn pause_holds_every_workload_change() {
        let old = cluster("");
        let new = cluster("paused: true\nserver: {properties: {threads: '64'}}\n");
        let plan = run(&new, &pods(&old, true, true), &[], 10);
        assert!(plan.actions.is_empty());
        assert_eq!(plan.drifted.len(), 3, "drift is still reported");
    }

    #[test]
    fn scale_down_takes_the_highest_nodes_offline_then_deletes_them() {
        let three = cluster("deletionPolicy: Delete\n");
        let one = cluster_of(1, "deletionPolicy: Delete\n");
        let mut observed = pods(&three, true, true);
        let all_claims = claims(&one, &["c-0", "c-1", "c-2"]);
        assert_eq!(
            kinds(&run(&one, &observed, &all_claims, 10)),
            ["online c-2 false", "online c-1 false"]
        );
        set(&mut observed[1], true, false);
        set(&mut observed[2], true, false);
        assert_eq!(
            kinds(&run(&one, &observed, &all_claims, 10)),
            ["delete c-2", "delete c-1"]
        );
        observed.truncate(1);
        assert_eq!(
            kinds(&run(&one, &observed, &all_claims, 10)),
            ["delete claim data-c-1", "delete claim data-c-2"]
        );
    }

    #[test]
    fn retained_claims_survive_scale_down() {
        let one = cluster_of(1, "");
        let observed = pods(&one, true, true);
        let plan = run(&one, &observed, &claims(&one, &["c-0", "c-1"]), 10);
        assert!(plan.actions.is_empty(), "{:?}", kinds(&plan));
    }

    #[test]
    fn removals_beyond_max_unavailable_queue() {
        let ic = cluster("deletionPolicy: Delete\nnodes: {remove: [c-1, c-2]}\n");
        let plan = run(
            &ic,
            &pods(&ic, true, true),
            &claims(&ic, &["c-0", "c-1", "c-2"]),
            10,
        );
        assert_eq!(kinds(&plan), ["online c-1 false"]);
        let queued = plan.nodes.iter().find(|n| n.name == "c-2").expect("c-2");
        assert!(
            queued
                .message
                .as_deref()
                .is_some_and(|m| m.starts_with("queued"))
        );
    }

    #[test]
    fn a_drained_node_is_deleted_with_its_claim_under_delete() {
        let ic = cluster("deletionPolicy: Delete\nnodes: {remove: [c-1]}\n");
        let mut observed = pods(&ic, true, true);
        set(&mut observed[1], true, false);
        let plan = run(&ic, &observed, &claims(&ic, &["c-0", "c-1", "c-2"]), 10);
        assert_eq!(kinds(&plan), ["delete c-1", "delete claim data-c-1"]);
        let removed = run(&ic, &observed[..1], &claims(&ic, &["c-0"]), 10);
        assert!(
            !kinds(&removed).iter().any(|k| k.contains("c-1")),
            "{:?}",
            kinds(&removed)
        );
    }

    #[test]
    fn listener_holders_roll_last() {
        let mut nodes = vec![
            (0, "c-0".to_owned()),
            (1, "c-1".to_owned()),
            (2, "c-2".to_owned()),
        ];
        rollout_order(&mut nodes, &BTreeSet::from(["c-0".to_owned()]));
        let order: Vec<_> = nodes.iter().map(|(_, n)| n.as_str()).collect();
        assert_eq!(order, ["c-1", "c-2", "c-0"]);
    }
}
