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

use crate::api::{DeletionPolicy, IntegrationCluster, NodeState, NodeStatus, annotations};
use crate::protocol::keys;
use crate::protocol::{Desired, Report};
use crate::workflows::{self, AgentFacts, Facts, GdWork, Intent, PodFacts, Step};
use kube::ResourceExt;

use crate::naming;
use crate::render::Rendered;
use crate::validation::{Member, ValidatedCluster};
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
    /// Kubernetes nodes marked unschedulable (`kubectl cordon`, the first
    /// step of `kubectl drain`): their server pods are moved elsewhere.
    pub cordoned: &'a BTreeSet<String>,
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
        departure: Departure,
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
    /// When the plan changes by the clock alone (a relocated node's gap
    /// ends), sooner than the usual retry.
    pub recheck_in: Option<std::time::Duration>,
}

/// Why `pod` differs from what `member` should run, if it does.
pub fn drift(pod: &Pod, rendered: &Rendered, image: &str, agent_image: &str) -> Option<String> {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let (config, packages, running_image) = workload::digests_of(pod);
    if config != rendered.node_digests.get(name).map(String::as_str) {
        return Some("configuration changed".into());
    }
    if packages != Some(rendered.packages_digest.as_str()) {
        return Some("package set changed".into());
    }
    if let Some(files) = pod.annotations().get(keys::CONFIG_FILES)
        && *files != rendered.files_digest(name)
    {
        return Some(format!(
            "configuration files in the pod differ from the ConfigMap (the agent reports {files})"
        ));
    }
    if let Some(installed) = pod.annotations().get(keys::INSTALLED_PACKAGES)
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
    // An agent of another version may speak another protocol (Lease
    // names, annotations): its pod is replaced like any other drift.
    let running_agent = container_image(pod, "agent");
    if running_agent != Some(agent_image) {
        return Some(format!(
            "agent image is {} instead of {agent_image}",
            running_agent.unwrap_or("missing")
        ));
    }
    None
}

fn container_image<'a>(pod: &'a Pod, name: &str) -> Option<&'a str> {
    pod.spec
        .as_ref()?
        .containers
        .iter()
        .find(|c| c.name == name)?
        .image
        .as_deref()
}

fn terminating(pod: &Pod) -> bool {
    pod.metadata.deletion_timestamp.is_some()
}

/// Since when the pod has not been Ready: since its Ready condition last
/// turned False, or since it was created if it never was Ready. A node that
/// was Ready for days and fails one probe is not stalled at once.
fn unready_since(pod: &Pod) -> Option<Timestamp> {
    let turned_unready = pod
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.type_ == "Ready" && c.status != "True"))
        .and_then(|c| c.last_transition_time.as_ref());
    turned_unready
        .or(pod.metadata.creation_timestamp.as_ref())
        .map(|t| t.0)
}

fn unready_seconds(pod: &Pod, now: Timestamp) -> i64 {
    unready_since(pod).map_or(0, |since| now.as_second() - since.as_second())
}

/// Clients may still be sent to the pod: it is Ready, or it stopped being
/// Ready less than [`workflows::ENDPOINT_SETTLE_SECONDS`] ago.
fn serving(pod: &Pod, now: Timestamp) -> bool {
    workload::is_ready(pod) || unready_seconds(pod, now) < workflows::ENDPOINT_SETTLE_SECONDS
}

/// Replacement order: nodes already on their way first, then by ordinal
/// with listener-lease holders last, so a listener moves at most once per
/// rollout.
fn rollout_order(nodes: &mut [Candidate<'_>], holders: &BTreeSet<String>) {
    nodes.sort_by_key(|c| {
        (
            !c.holds_slot,
            holders.contains(c.member.name.as_str()),
            c.member.ordinal,
        )
    });
}

/// Why a node's pod is deleted.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Departure {
    /// `spec.nodes.remove`.
    Removed,
    ScaledDown,
    /// Drift or a cordoned Kubernetes node; created again at once.
    Replaced(String),
}

impl Departure {
    pub fn event_reason(&self) -> &'static str {
        match self {
            Departure::Removed => "Removed",
            Departure::ScaledDown => "ScaledDown",
            Departure::Replaced(_) => "Replacing",
        }
    }

    pub fn note(&self, node: &str) -> String {
        match self {
            Departure::Removed => format!("Removed {node}: spec.nodes.remove"),
            Departure::ScaledDown => format!("Removed {node}: scale down"),
            Departure::Replaced(why) => format!("Replacing {node}: {why}"),
        }
    }
}

/// What the reconcile knows that every node's decision draws on.
struct Context<'a> {
    ic: &'a IntegrationCluster,
    rendered: &'a Rendered,
    observed: &'a Observed<'a>,
    pods: BTreeMap<&'a str, &'a Pod>,
    claims: BTreeSet<&'a str>,
    previous: BTreeMap<&'a str, &'a NodeStatus>,
    forced: BTreeSet<String>,
    max_unavailable: usize,
}

/// The rollout budget as the decisions spend it.
struct Budget {
    /// Nodes in a leaving workflow (each holds a slot).
    slots_used: usize,
    /// Member nodes meant to serve that are not Ready, outside workflows.
    unavailable: usize,
    /// Nodes whose online gate is True after the decisions so far.
    online: BTreeSet<String>,
}

/// A node to replace (drift, cordoned Kubernetes node), decided after
/// the others so it gets only the budget they leave.
struct Candidate<'a> {
    member: &'a Member,
    why: String,
    /// Drift, rather than a cordoned Kubernetes node.
    drifted: bool,
    holds_slot: bool,
}

pub fn plan(
    ic: &IntegrationCluster,
    cluster: &ValidatedCluster,
    rendered: &Rendered,
    observed: &Observed,
) -> Plan {
    let ctx = Context::new(ic, rendered, observed);
    let mut plan = Plan::default();
    let mut budget = ctx.budget(cluster);
    scale_down(&ctx, cluster, &mut plan, &mut budget);
    delete_orphan_claims(&ctx, cluster, &mut plan);
    let mut candidates = Vec::new();
    for member in &cluster.members {
        let intent = ctx.intent(member);
        let pod = ctx.pods.get(member.name.as_str()).copied();
        let why = pod.and_then(|p| ctx.replacement(p));
        match (intent, why) {
            (Intent::Online | Intent::Offline, Some((why, drifted))) => {
                candidates.push(Candidate {
                    member,
                    why,
                    drifted,
                    holds_slot: ctx.holds_slot(&member.name),
                })
            }
            _ => member_step(&ctx, member, intent, &mut plan, &mut budget),
        }
    }
    let holders: BTreeSet<String> = observed.listener_holders.iter().cloned().collect();
    rollout_order(&mut candidates, &holders);
    for candidate in &candidates {
        replacement_step(&ctx, candidate, &mut plan, &mut budget);
    }
    plan.nodes
        .sort_by_key(|n| naming::node_ordinal(ctx.name(), &n.name));

    if let Some(why) = observed.start_blocked {
        let before = plan.actions.len();
        plan.actions
            .retain(|a| !matches!(a, Action::CreatePod(_) | Action::CreateClaim(_)));
        if plan.actions.len() < before || !plan.drifted.is_empty() {
            plan.waiting = Some(why.to_owned());
        }
    }
    if ic.spec.paused {
        plan.actions.clear();
    }
    plan
}

impl<'a> Context<'a> {
    fn new(ic: &'a IntegrationCluster, rendered: &'a Rendered, observed: &'a Observed<'a>) -> Self {
        Context {
            ic,
            rendered,
            observed,
            pods: observed
                .pods
                .iter()
                .filter_map(|p| Some((p.metadata.name.as_deref()?, p)))
                .collect(),
            claims: observed
                .claims
                .iter()
                .filter_map(|c| c.metadata.name.as_deref())
                .collect(),
            previous: ic
                .status
                .iter()
                .flat_map(|s| s.nodes.iter())
                .map(|n| (n.name.as_str(), n))
                .collect(),
            forced: annotations::forced(ic),
            max_unavailable: usize::try_from(ic.spec.rollout.max_unavailable).unwrap_or(1),
        }
    }

    fn name(&self) -> &str {
        self.ic.metadata.name.as_deref().unwrap_or_default()
    }

    fn intent(&self, member: &Member) -> Intent {
        let nodes = self.ic.spec.nodes.as_ref();
        let listed = |list: Option<&Vec<String>>| list.is_some_and(|l| l.contains(&member.name));
        if listed(nodes.map(|n| &n.remove)) {
            Intent::Remove
        } else if listed(nodes.map(|n| &n.offline)) {
            Intent::Offline
        } else {
            Intent::Online
        }
    }

    fn holds_slot(&self, node: &str) -> bool {
        self.previous
            .get(node)
            .is_some_and(|n| workflows::holds_slot(n.state))
    }

    /// Why the node's pod must be replaced, if it must, and whether that
    /// is drift (reported as such in status).
    fn replacement(&self, pod: &Pod) -> Option<(String, bool)> {
        let agent_image = workload::agent_image(self.ic, self.observed.agent_image);
        if let Some(why) = drift(pod, self.rendered, &self.ic.spec.image, agent_image) {
            return Some((why, true));
        }
        let host = pod.spec.as_ref()?.node_name.as_ref()?;
        self.observed
            .cordoned
            .contains(host)
            .then(|| (format!("its Kubernetes node {host} is cordoned"), false))
    }

    fn budget(&self, cluster: &ValidatedCluster) -> Budget {
        let leaving = self
            .pods
            .keys()
            .filter(|n| !cluster.members.iter().any(|m| m.name == **n))
            .copied();
        let slots_used = cluster
            .members
            .iter()
            .map(|m| m.name.as_str())
            .chain(leaving)
            .filter(|n| self.holds_slot(n))
            .count();
        Budget {
            slots_used,
            unavailable: 0,
            online: self
                .pods
                .iter()
                .filter(|(n, p)| {
                    cluster.members.iter().any(|m| m.name == **n) && workload::is_online(p)
                })
                .map(|(n, _)| (*n).to_owned())
                .collect(),
        }
    }

    /// Seconds since the node entered the state status records for it.
    fn seconds_in_state(&self, node: &str) -> i64 {
        self.previous
            .get(node)
            .and_then(|n| n.since.as_ref())
            .map_or(0, |t| self.observed.now.as_second() - t.0.as_second())
    }

    fn facts(&self, node: &str, pod: Option<&Pod>, slot_free: bool, budget: &Budget) -> Facts {
        let now = self.observed.now;
        Facts {
            pod: pod_facts(pod, now),
            in_state_seconds: self.seconds_in_state(node),
            drain_timeout_seconds: i64::from(
                self.ic
                    .spec
                    .nodes
                    .clone()
                    .unwrap_or_default()
                    .drain_timeout_seconds,
            ),
            force: self.forced.contains(node),
            slot_free,
            last_online: budget.online.len() == 1 && budget.online.contains(node),
            holds_listener: self.observed.listener_holders.iter().any(|h| h == node),
            on_cordoned_node: pod
                .and_then(|p| p.spec.as_ref()?.node_name.as_ref())
                .is_some_and(|host| self.observed.cordoned.contains(host)),
            gd: match self.observed.gd {
                None => GdWork::NotTracked,
                Some(Err(())) => GdWork::Unknown,
                Some(Ok(counts)) => GdWork::Unfinished(counts.get(node).copied().unwrap_or(0)),
            },
        }
    }

    /// Decides one node's next step and spends the budget it takes.
    fn decide(
        &self,
        node: &str,
        intent: Intent,
        slot_free: bool,
        plan: &mut Plan,
        budget: &mut Budget,
    ) -> workflows::Decision {
        let pod = self.pods.get(node).copied();
        let facts = self.facts(node, pod, slot_free, budget);
        let previous = self.previous.get(node).map(|n| n.state);
        let decision = workflows::decide(node, previous, intent, &facts);
        if !self.holds_slot(node) && workflows::holds_slot(decision.state) {
            budget.slots_used += 1;
        }
        if decision.steps.contains(&Step::SetOnline(false)) {
            budget.online.remove(node);
        }
        if let Some(why) = &decision.stalled {
            plan.stalled.get_or_insert(why.clone());
        }
        if decision.forced {
            plan.forced.push(node.to_owned());
        }
        decision
    }

    /// The actions of a decision's steps.
    fn actions(
        &self,
        member: Option<&Member>,
        node: &str,
        steps: &[Step],
        departure: Departure,
    ) -> Vec<Action> {
        let spec = &self.ic.spec;
        let mut actions = Vec::new();
        for step in steps {
            match (step, member) {
                (Step::CreatePod, Some(member)) => {
                    let claim = naming::data_claim(node);
                    if let Some(storage) = &spec.storage
                        && !self.claims.contains(claim.as_str())
                    {
                        actions.push(Action::CreateClaim(Box::new(workload::data_claim(
                            self.ic, node, storage,
                        ))));
                    }
                    actions.push(Action::CreatePod(Box::new(workload::pod(
                        self.ic,
                        self.rendered,
                        member,
                        self.observed.agent_image,
                    ))));
                }
                (Step::CreatePod, None) => {}
                (Step::SetOnline(online), _) => actions.push(Action::SetOnline {
                    node: node.to_owned(),
                    online: *online,
                }),
                (Step::AskOffline(offline), _) => actions.push(Action::AskOffline {
                    node: node.to_owned(),
                    offline: *offline,
                }),
                (Step::DeletePod, _) => {
                    let leaves_for_good = !matches!(departure, Departure::Replaced(_));
                    actions.push(Action::DeletePod {
                        node: node.to_owned(),
                        departure: departure.clone(),
                    });
                    let claim = naming::data_claim(node);
                    if leaves_for_good && self.owns_claim(&claim) {
                        actions.push(Action::DeleteClaim { name: claim });
                    }
                }
            }
        }
        actions
    }

    /// Only claims the cluster owns are ever deleted, and only under
    /// deletionPolicy Delete (a retained claim is owned by nobody).
    fn owns_claim(&self, name: &str) -> bool {
        self.ic.spec.deletion_policy == DeletionPolicy::Delete
            && self.observed.claims.iter().any(|c| {
                c.metadata.name.as_deref() == Some(name)
                    && workload::is_owned_by(&c.metadata, self.ic)
            })
    }
}

fn pod_facts(pod: Option<&Pod>, now: Timestamp) -> PodFacts {
    match pod {
        None => PodFacts::Absent,
        Some(p) if terminating(p) => PodFacts::Terminating,
        Some(p) => PodFacts::Present {
            containers_ready: workload::containers_ready(p),
            online: workload::is_online(p),
            ready: workload::is_ready(p),
            serving: serving(p, now),
            asked_offline: Desired::of(p) == Desired::Offline,
            agent: Report::of(p).map(|r| AgentFacts {
                quiesced: r.quiesced,
                in_flight: r.in_flight,
                healthy: r.healthy,
            }),
        },
    }
}

/// Pods of nodes that are no longer members leave for good, highest
/// first, through the same workflow as a removal (guaranteed-delivery
/// work included).
fn scale_down(ctx: &Context, cluster: &ValidatedCluster, plan: &mut Plan, budget: &mut Budget) {
    let mut leaving: Vec<(u32, &str)> = ctx
        .pods
        .keys()
        .filter(|n| !cluster.members.iter().any(|m| m.name == **n))
        .filter_map(|n| Some((naming::node_ordinal(ctx.name(), n)?, *n)))
        .collect();
    leaving.sort_by_key(|(ordinal, _)| std::cmp::Reverse(*ordinal));
    // No budget: the nodes leaving are no longer meant to serve, so
    // draining them all at once costs no availability the spec asks for.
    for (_, node) in leaving {
        let decision = ctx.decide(node, Intent::Remove, true, plan, budget);
        plan.actions
            .extend(ctx.actions(None, node, &decision.steps, Departure::ScaledDown));
        let pod = ctx.pods.get(node).copied();
        plan.nodes.push(node_view(node, None, pod, &decision));
    }
}

/// Claims of nodes that are gone, when the policy says they go.
fn delete_orphan_claims(ctx: &Context, cluster: &ValidatedCluster, plan: &mut Plan) {
    for claim in &ctx.claims {
        let node = claim.strip_prefix("data-").unwrap_or_default();
        let gone = !cluster.members.iter().any(|m| m.name == node) && !ctx.pods.contains_key(node);
        if gone && ctx.owns_claim(claim) {
            plan.actions.push(Action::DeleteClaim {
                name: (*claim).to_owned(),
            });
        }
    }
}

/// A member that is not being replaced: its spec intent's workflow, and
/// what it adds to the counts and the rollout's stall.
fn member_step(
    ctx: &Context,
    member: &Member,
    intent: Intent,
    plan: &mut Plan,
    budget: &mut Budget,
) {
    let slot_free = ctx.holds_slot(&member.name) || budget.slots_used < ctx.max_unavailable;
    let decision = ctx.decide(&member.name, intent, slot_free, plan, budget);
    if decision.state == NodeState::Relocating && decision.steps.is_empty() {
        let left = workflows::RELOCATE_GAP_SECONDS - ctx.seconds_in_state(&member.name);
        let due = std::time::Duration::from_secs(u64::try_from(left).unwrap_or(0).max(1));
        plan.recheck_in = Some(plan.recheck_in.map_or(due, |d| d.min(due)));
    }
    let departure = Departure::Removed;
    plan.actions
        .extend(ctx.actions(Some(member), &member.name, &decision.steps, departure));
    let pod = ctx.pods.get(member.name.as_str()).copied();
    let mut view = node_view(&member.name, Some(member), pod, &decision);
    count(plan, pod, intent);
    // Only nodes meant to serve take part in the rollout.
    let serving = intent == Intent::Online && !workflows::holds_slot(decision.state);
    match pod {
        Some(p) if serving && !workload::is_ready(p) => {
            budget.unavailable += 1;
            let unready = unready_seconds(p, ctx.observed.now);
            let deadline = i64::from(ctx.ic.spec.rollout.progress_deadline_seconds);
            let waiting = !terminating(p) && decision.steps.is_empty();
            if waiting && unready > deadline {
                // A moment, not a count of seconds: the status says the
                // same until something changes, and is not rewritten.
                let since =
                    unready_since(p).and_then(|t| t.round(k8s_openapi::jiff::Unit::Second).ok());
                let why = format!(
                    "{} has not been Ready since {}, longer than rollout.progressDeadlineSeconds ({deadline})",
                    member.name,
                    since.map_or_else(|| "its start".to_owned(), |t| t.to_string())
                );
                plan.stalled.get_or_insert(why.clone());
                view.message = Some(why);
            } else if waiting {
                plan.starting += 1;
            }
        }
        None if serving => budget.unavailable += 1,
        _ => {}
    }
    plan.nodes.push(view);
}

/// A member to replace: the same workflow, within what the budget leaves.
/// A node that is not Ready costs no availability and goes at once;
/// nothing new starts while the rollout is stalled or servers cannot
/// start.
fn replacement_step(ctx: &Context, candidate: &Candidate, plan: &mut Plan, budget: &mut Budget) {
    let member = candidate.member;
    let pod = ctx.pods.get(member.name.as_str()).copied();
    if candidate.drifted {
        plan.drifted
            .insert(member.name.clone(), candidate.why.clone());
    }
    let broken = pod.is_some_and(|p| !workload::is_ready(p));
    let may_start = plan.stalled.is_none()
        && ctx.observed.start_blocked.is_none()
        && budget.slots_used + budget.unavailable < ctx.max_unavailable;
    let slot_free =
        candidate.holds_slot || (broken && ctx.observed.start_blocked.is_none()) || may_start;
    let decision = ctx.decide(&member.name, Intent::Replace, slot_free, plan, budget);
    let departure = Departure::Replaced(candidate.why.clone());
    plan.actions
        .extend(ctx.actions(Some(member), &member.name, &decision.steps, departure));
    let mut view = node_view(&member.name, Some(member), pod, &decision);
    view.message = Some(format!("{} ({})", decision.message, candidate.why));
    count(plan, pod, ctx.intent(member));
    plan.nodes.push(view);
}

/// Ready, online and expected counts for status.
fn count(plan: &mut Plan, pod: Option<&Pod>, intent: Intent) {
    if intent == Intent::Online {
        plan.expected += 1;
    }
    if let Some(p) = pod
        && workload::is_ready(p)
    {
        plan.ready += 1;
        if workload::is_online(p) {
            plan.online += 1;
        }
    }
}

fn node_view(
    node: &str,
    member: Option<&Member>,
    pod: Option<&Pod>,
    decision: &workflows::Decision,
) -> NodeView {
    let (config, packages) = pod.map_or((None, None), |p| {
        let (config, packages, _) = workload::digests_of(p);
        (config.map(str::to_owned), packages.map(str::to_owned))
    });
    NodeView {
        name: node.to_owned(),
        state: decision.state,
        ready: pod.is_some_and(workload::is_ready),
        config_digest: config,
        packages_digest: packages,
        logical_hostname: member.map(|m| m.logical_hostname.clone()),
        message: Some(decision.message.clone()).filter(|m| !m.is_empty()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::ONLINE_CONDITION;
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
                cordoned: &BTreeSet::new(),
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

    /// What the agent of `pod` reports, and what the operator asked it.
    fn agent_reports(pod: &mut Pod, asked_offline: bool, quiesced: bool, in_flight: u64) {
        let report = Report {
            quiesced,
            in_flight: Some(in_flight),
            healthy: true,
            ..Report::default()
        };
        let annotations = pod
            .metadata
            .annotations
            .get_or_insert_with(Default::default);
        annotations.extend(report.annotations());
        if asked_offline {
            let patch = Desired::Offline.patch();
            let asked: BTreeMap<String, String> =
                serde_json::from_value(patch["metadata"]["annotations"].clone()).expect("map");
            annotations.extend(asked);
        }
    }

    #[test]
    fn a_rolling_replacement_quiesces_and_drains_before_it_deletes() {
        let old = cluster("");
        let new = cluster("server: {properties: {threads: '64'}}\n");
        let claims = claims(&new, &["c-0", "c-1", "c-2"]);
        let mut observed = pods(&old, true, true);
        for pod in &mut observed {
            agent_reports(pod, false, false, 2);
        }
        assert_eq!(
            kinds(&run(&new, &observed, &claims, 10)),
            ["online c-0 false"]
        );
        // Out of the Service since second 0; the endpoint change has spread.
        set(&mut observed[0], true, false);
        let settled = workflows::ENDPOINT_SETTLE_SECONDS + 1;
        assert_eq!(
            kinds(&run(&new, &observed, &claims, settled)),
            ["ask c-0 offline=true"]
        );
        agent_reports(&mut observed[0], true, true, 2);
        let busy = run(&new, &observed, &claims, settled);
        assert!(busy.actions.is_empty(), "{:?}", kinds(&busy));
        let c0 = busy.nodes.iter().find(|n| n.name == "c-0").expect("c-0");
        assert!(
            c0.message
                .as_deref()
                .is_some_and(|m| m.contains("2 requests in flight")),
            "{c0:?}"
        );
        agent_reports(&mut observed[0], true, true, 0);
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
                .is_some_and(|s| s.starts_with("c-0 has not been Ready since"))
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
            Some(
                "c-1 has not been Ready since 1970-01-01T00:16:40Z, longer than \
                 rollout.progressDeadlineSeconds (60)"
            )
        );
        // The same words later: a stalled cluster's status is not rewritten
        // every time it is looked at.
        assert_eq!(run(&ic, &observed, &claims, 1900).stalled, stalled);
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
    fn an_agent_of_another_version_is_drift_and_rolls() {
        // Pods from an operator upgrade's predecessor run its agent image.
        let ic = cluster("");
        let mut observed = pods(&ic, true, true);
        for pod in &mut observed {
            if let Some(agent) = pod
                .spec
                .as_mut()
                .and_then(|s| s.containers.iter_mut().find(|c| c.name == "agent"))
            {
                agent.image = Some("integration-operator:previous".into());
            }
        }
        let plan = run(&ic, &observed, &claims(&ic, &["c-0", "c-1", "c-2"]), 10);
        let expected = format!(
            "agent image is integration-operator:previous instead of {}",
            workload::AGENT_IMAGE
        );
        assert_eq!(plan.drifted.get("c-0"), Some(&expected));
        assert_eq!(plan.drifted.len(), 3);
        // One at a time, through the lifecycle.
        assert_eq!(kinds(&plan), ["online c-0 false"]);
        // A spec that names the agent image is what the pods must run,
        // whatever the operator's default.
        let pinned = cluster("agent: {image: 'integration-operator:previous'}\n");
        let observed = pods(&pinned, true, true);
        let plan = run(&pinned, &observed, &claims(&ic, &["c-0", "c-1", "c-2"]), 10);
        assert!(plan.drifted.is_empty(), "{:?}", plan.drifted);
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
            [
                "delete c-2",
                "delete claim data-c-2",
                "delete c-1",
                "delete claim data-c-1"
            ]
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
    fn listener_holders_roll_last_and_nodes_on_their_way_first() {
        let members: Vec<Member> = (0..4)
            .map(|ordinal| Member {
                name: format!("c-{ordinal}"),
                ordinal,
                logical_hostname: String::new(),
            })
            .collect();
        let mut nodes: Vec<Candidate> = members
            .iter()
            .map(|member| Candidate {
                member,
                why: String::new(),
                drifted: true,
                holds_slot: member.name == "c-3",
            })
            .collect();
        rollout_order(&mut nodes, &BTreeSet::from(["c-0".to_owned()]));
        let order: Vec<_> = nodes.iter().map(|c| c.member.name.as_str()).collect();
        assert_eq!(order, ["c-3", "c-1", "c-2", "c-0"]);
    }
}
