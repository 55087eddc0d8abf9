//! Node workflows as a pure state machine: from the state status recorded,
//! what the user asks for the node and what its pod shows, the next state
//! and the steps that lead there. The state lives in `status.nodes[]`, so an
//! operator restarted at any step decides the same thing again.
//!
//! - offline: gate False (client traffic stops) → the node is not Ready →
//!   `Offline`;
//! - online: gate True once the server is ready → `Online`;
//! - remove (also scale-down): offline first, then the pod is deleted once
//!   drained → `Removed`; past `nodes.drainTimeoutSeconds` it stalls unless
//!   forced;
//! - replace (drift, a cordoned Kubernetes node): offline and drained the
//!   same way, then `Replacing` while the pod is deleted and created again
//!   from the current spec; off a cordoned node, `Relocating`, and created
//!   again only once the name has been free for [`RELOCATE_GAP_SECONDS`];
//! - add back: a removed node returns `Offline` (seed 003), then goes online
//!   when the spec no longer keeps it offline.
//!
//! Where the pod runs the in-pod agent, going offline also asks it to
//! quiesce the server, and "drained" means quiesced with no work in flight;
//! coming online asks it to resume and waits until the server is healthy.
//! Without an agent, "drained" means the node gets no client traffic.
//! Removal also waits until the node owns no unfinished guaranteed-delivery
//! work in the cluster database; a replaced node comes back under its name
//! and finds its work again. Every way a node leaves goes through
//! [`leave`]: there is no other path to a deleted serving pod.

use crate::api::NodeState;

/// Seconds a node keeps counting as serving after it stopped being Ready:
/// the endpoint change still has to reach every proxy (kube-proxy syncs at
/// most once a second) and load balancer, which keep sending it requests
/// meanwhile. Measured on a real node: deleting the pod at once failed 8 of
/// 3,544 client requests of a rolling change; with this wait, none.
/// `nodes.drainTimeoutSeconds` starts after it.
pub const ENDPOINT_SETTLE_SECONDS: i64 = 5;

/// Seconds a pod moved off a cordoned Kubernetes node stays absent before
/// it is created again. `kubectl drain` retries a refused eviction every
/// 5 s and follows the pod by name, not by uid: if the name is taken again
/// before its next try, it goes on evicting the successor, which the
/// disruption budget refuses until the drain times out. Absent (404) or
/// terminating on that try, the drain is done with the pod.
pub const RELOCATE_GAP_SECONDS: i64 = 7;

/// What is asked of a node: by the spec (online, offline, remove), by a
/// scale-down (remove), or by the operator (replace).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Intent {
    Online,
    Offline,
    /// Leave for good: its guaranteed-delivery work must be finished.
    Remove,
    /// Leave and come back from the current spec, under the same name:
    /// drift, or its Kubernetes node is cordoned.
    Replace,
}

/// What the node's pod shows.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PodFacts {
    Absent,
    Terminating,
    Present {
        /// The server's containers pass readiness.
        containers_ready: bool,
        /// The operator's online gate is True.
        online: bool,
        /// The pod is Ready (gets client traffic).
        ready: bool,
        /// Clients may still reach it: it is Ready, or stopped being Ready
        /// so recently that proxies and load balancers may not know yet.
        serving: bool,
        /// The operator's desired-state annotation asks for offline.
        asked_offline: bool,
        /// What the agent reports, if the pod runs one.
        agent: Option<AgentFacts>,
    },
}

/// What an agent reports about its server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AgentFacts {
    pub quiesced: bool,
    /// None when the agent could not read it: not drained.
    pub in_flight: Option<u64>,
    pub healthy: bool,
}

/// Everything a decision depends on.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Facts {
    pub pod: PodFacts,
    /// Seconds since the node entered its recorded state.
    pub in_state_seconds: i64,
    pub drain_timeout_seconds: i64,
    /// An explicit force annotation names this node.
    pub force: bool,
    /// Another workflow slot is free (`rollout.maxUnavailable`), or this
    /// node already holds one.
    pub slot_free: bool,
    /// Taking this node offline would leave no node online.
    pub last_online: bool,
    /// Guaranteed-delivery work the node owns in the cluster database.
    pub gd: GdWork,
    /// The node holds a single-node listener's Lease.
    pub holds_listener: bool,
    /// The pod runs on a cordoned Kubernetes node.
    pub on_cordoned_node: bool,
}

/// Unfinished guaranteed-delivery work of a node.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GdWork {
    /// The cluster has no database: nothing to wait for.
    NotTracked,
    /// The database did not answer: not drained.
    Unknown,
    Unfinished(u64),
}

/// One change to the world.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Step {
    SetOnline(bool),
    /// Ask the agent to quiesce (true) or resume (false) the server.
    AskOffline(bool),
    CreatePod,
    DeletePod,
}

/// The next state, the steps to take now, and what status should say.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Decision {
    pub state: NodeState,
    pub steps: Vec<Step>,
    pub message: String,
    /// Why the workflow cannot go on without help.
    pub stalled: Option<String>,
    /// The node spent its stall allowance and was forced on.
    pub forced: bool,
}

fn decision(state: NodeState, steps: Vec<Step>, message: impl Into<String>) -> Decision {
    Decision {
        state,
        steps,
        message: message.into(),
        stalled: None,
        forced: false,
    }
}

/// Whether a node in `state` holds a workflow slot.
pub fn holds_slot(state: NodeState) -> bool {
    matches!(
        state,
        NodeState::Draining | NodeState::Removing | NodeState::Replacing | NodeState::Relocating
    )
}

/// Decides the next step of `node` from its recorded `previous` state.
pub fn decide(node: &str, previous: Option<NodeState>, intent: Intent, facts: &Facts) -> Decision {
    use NodeState::*;
    let was_removed = matches!(previous, Some(Removed | Removing));
    match (intent, facts.pod) {
        // Removal finished, or nothing to remove.
        (Intent::Remove, PodFacts::Absent) => decision(Removed, vec![], "removed"),
        (Intent::Remove, PodFacts::Terminating) => decision(Removing, vec![], "deleting the pod"),
        (_, PodFacts::Terminating) => {
            decision(previous.unwrap_or(Pending), vec![], "pod terminating")
        }

        (_, PodFacts::Absent)
            if previous == Some(Relocating) && facts.in_state_seconds < RELOCATE_GAP_SECONDS =>
        {
            decision(
                Relocating,
                vec![],
                format!(
                    "moved off its cordoned Kubernetes node: created again {RELOCATE_GAP_SECONDS}s after the pod was deleted, so a kubectl drain sees it gone"
                ),
            )
        }
        // A removed node added back returns offline (seed 003).
        (_, PodFacts::Absent) if was_removed => decision(
            Offline,
            vec![Step::CreatePod],
            "added back: returns offline",
        ),
        (_, PodFacts::Absent) => decision(Pending, vec![Step::CreatePod], "creating the pod"),

        (
            Intent::Online,
            PodFacts::Present {
                containers_ready,
                online,
                ready,
                asked_offline,
                agent,
                ..
            },
        ) => come_online(
            previous,
            Arriving {
                containers_ready,
                online,
                ready,
                asked_offline,
                agent,
            },
        ),

        (
            Intent::Offline | Intent::Remove | Intent::Replace,
            PodFacts::Present {
                containers_ready,
                online,
                serving,
                asked_offline,
                agent,
                ..
            },
        ) => leave(
            node,
            previous,
            intent,
            facts,
            Leaving {
                containers_ready,
                online,
                serving,
                asked_offline,
                agent,
            },
        ),
    }
}

/// What a node coming online shows.
struct Arriving {
    containers_ready: bool,
    online: bool,
    ready: bool,
    asked_offline: bool,
    agent: Option<AgentFacts>,
}

/// A node meant to serve: resumed through its agent, then put back in the
/// client Service once its server is ready and healthy.
fn come_online(previous: Option<NodeState>, pod: Arriving) -> Decision {
    use NodeState::*;
    let Arriving {
        containers_ready,
        online,
        ready,
        asked_offline,
        agent,
    } = pod;
    let waiting = previous.filter(|s| *s == Offline).unwrap_or(Pending);
    if online {
        let state = if ready { Online } else { Pending };
        let message = if ready {
            ""
        } else {
            "waiting for the server to become ready"
        };
        return decision(state, vec![], message);
    }
    if asked_offline {
        return decision(
            waiting,
            vec![Step::AskOffline(false)],
            "asking the agent to resume the server",
        );
    }
    match agent {
        Some(a) if a.quiesced => decision(
            waiting,
            vec![],
            "waiting for the agent to resume the server",
        ),
        Some(a) if !a.healthy => {
            decision(waiting, vec![], "waiting for the server to report healthy")
        }
        _ if containers_ready => decision(
            waiting,
            vec![Step::SetOnline(true)],
            "server ready: bringing the node online",
        ),
        _ => decision(waiting, vec![], "waiting for the server to become ready"),
    }
}

/// What a leaving node's pod shows.
struct Leaving {
    containers_ready: bool,
    online: bool,
    serving: bool,
    asked_offline: bool,
    agent: Option<AgentFacts>,
}

/// The one way a node leaves, whatever the reason (offline, remove,
/// scale-down, replacement): out of the client Service, then quiesced,
/// then in-flight work and listener hand-over awaited, then (for a node
/// leaving for good) guaranteed-delivery work checked; only then deleted.
fn leave(
    node: &str,
    previous: Option<NodeState>,
    intent: Intent,
    facts: &Facts,
    pod: Leaving,
) -> Decision {
    use NodeState::*;
    let verb = match intent {
        Intent::Remove => "removing",
        Intent::Replace => "replacing",
        _ => "going offline",
    };
    if pod.online {
        // A replacement of the last node is the rollout's business (its
        // budget allows it); taking it away for good needs a person.
        if facts.last_online && !facts.force && intent != Intent::Replace {
            let why = format!(
                "{node} is the last online node; taking it offline needs the annotation integration.dev/force={node}"
            );
            return Decision {
                stalled: Some(why.clone()),
                ..decision(previous.unwrap_or(Online), vec![], why)
            };
        }
        if !facts.slot_free {
            return decision(
                previous.unwrap_or(Online),
                vec![],
                format!("queued for {verb}: rollout.maxUnavailable nodes are already leaving"),
            );
        }
        return decision(
            Draining,
            vec![Step::SetOnline(false)],
            format!("{verb}: taking the node out of the client Service"),
        );
    }
    if pod.serving {
        return decision(
            Draining,
            vec![],
            format!("{verb}: waiting for client traffic to stop"),
        );
    }
    // A server that is not running has no work to quiesce; a broken
    // replacement must not wait for a quiesce that cannot happen.
    let running = pod.containers_ready || intent != Intent::Replace;
    if running && !pod.asked_offline && pod.agent.is_some() {
        return decision(
            Draining,
            vec![Step::AskOffline(true)],
            format!("{verb}: asking the agent to quiesce the server"),
        );
    }
    let waiting_for = match (running, intent, waiting_for(facts, pod.agent)) {
        (false, _, _) => None,
        (true, Intent::Remove, None) => unfinished_work(facts.gd),
        (true, _, waiting) => waiting,
    };
    let Some(waiting_for) = waiting_for else {
        return drained(intent, facts);
    };
    if intent == Intent::Offline {
        return decision(
            Draining,
            vec![],
            format!("{verb}: waiting for {waiting_for}"),
        );
    }
    overdue(node, previous, intent, facts, verb, &waiting_for)
}

/// What a node out of the client Service still waits for before it counts
/// as drained, if anything: its server's quiesce and in-flight work, and
/// the hand-over of its single-node listeners.
fn waiting_for(facts: &Facts, agent: Option<AgentFacts>) -> Option<String> {
    match agent {
        None => None,
        Some(a) if !a.quiesced => Some("the server to quiesce".to_owned()),
        Some(AgentFacts {
            in_flight: Some(0), ..
        }) => None,
        Some(AgentFacts {
            in_flight: Some(n), ..
        }) => Some(format!("{n} requests in flight")),
        Some(_) => Some("the agent to report in-flight work".to_owned()),
    }
    .or_else(|| {
        facts
            .holds_listener
            .then(|| "the node to hand its listeners over".to_owned())
    })
}

/// A node leaving for good must not take unfinished guaranteed-delivery
/// work with it (seed 003). A replaced node comes back under its name and
/// finds its work again.
fn unfinished_work(gd: GdWork) -> Option<String> {
    match gd {
        GdWork::Unfinished(n) if n > 0 => {
            Some(format!("{n} unfinished guaranteed-delivery transactions"))
        }
        GdWork::Unknown => {
            Some("the cluster database to report guaranteed-delivery work".to_owned())
        }
        _ => None,
    }
}

/// A node out of the client Service with nothing left to wait for.
fn drained(intent: Intent, facts: &Facts) -> Decision {
    match intent {
        Intent::Remove => decision(
            NodeState::Removing,
            vec![Step::DeletePod],
            "drained: deleting the pod",
        ),
        Intent::Replace => decision(
            replaced(facts),
            vec![Step::DeletePod],
            "drained: deleting the pod, to be created again from the current spec",
        ),
        _ => decision(
            NodeState::Offline,
            vec![],
            "offline: no client traffic, reachable on the admin Service",
        ),
    }
}

/// The state of a node whose pod is deleted to be created again.
fn replaced(facts: &Facts) -> NodeState {
    if facts.on_cordoned_node {
        NodeState::Relocating
    } else {
        NodeState::Replacing
    }
}

/// A leaving node that has not drained: wait, stall past the drain
/// timeout, or go on when forced.
fn overdue(
    node: &str,
    previous: Option<NodeState>,
    intent: Intent,
    facts: &Facts,
    verb: &str,
    waiting_for: &str,
) -> Decision {
    use NodeState::*;
    let draining = matches!(previous, Some(Draining | Removing | Replacing | Relocating));
    // The drain allowance starts once clients are no longer sent to the
    // node: the settle time is not the server's to use up.
    let allowance = facts.drain_timeout_seconds + ENDPOINT_SETTLE_SECONDS;
    if !(draining && facts.in_state_seconds > allowance) {
        return decision(
            Draining,
            vec![],
            format!("{verb}: waiting for {waiting_for}"),
        );
    }
    if facts.force {
        let state = if intent == Intent::Replace {
            replaced(facts)
        } else {
            Removing
        };
        return Decision {
            forced: true,
            ..decision(
                state,
                vec![Step::DeletePod],
                "drain timeout forced: deleting the pod",
            )
        };
    }
    let why = format!(
        "{node} has not drained within nodes.drainTimeoutSeconds ({}s), still waiting for {waiting_for}; annotate the cluster with integration.dev/force={node} to go on anyway",
        facts.drain_timeout_seconds
    );
    Decision {
        stalled: Some(why.clone()),
        ..decision(Draining, vec![], why)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use NodeState::*;

    fn facts(pod: PodFacts) -> Facts {
        Facts {
            pod,
            in_state_seconds: 0,
            drain_timeout_seconds: 600,
            force: false,
            slot_free: true,
            gd: GdWork::NotTracked,
            holds_listener: false,
            on_cordoned_node: false,
            last_online: false,
        }
    }

    const fn pod(containers_ready: bool, online: bool, ready: bool) -> PodFacts {
        PodFacts::Present {
            containers_ready,
            online,
            ready,
            serving: ready,
            asked_offline: false,
            agent: None,
        }
    }
    const SERVING: PodFacts = pod(true, true, true);
    const GATED_BUT_READY: PodFacts = pod(true, false, true);
    const OFF: PodFacts = pod(true, false, false);
    const STARTING: PodFacts = pod(false, false, false);

    /// A gated, not Ready pod whose agent reports.
    fn with_agent(asked_offline: bool, quiesced: bool, in_flight: Option<u64>) -> PodFacts {
        PodFacts::Present {
            containers_ready: true,
            online: false,
            ready: false,
            serving: false,
            asked_offline,
            agent: Some(AgentFacts {
                quiesced,
                in_flight,
                healthy: true,
            }),
        }
    }

    fn run(previous: Option<NodeState>, intent: Intent, f: Facts) -> (NodeState, Vec<Step>) {
        let d = decide("n-1", previous, intent, &f);
        (d.state, d.steps)
    }

    #[test]
    fn online_brings_a_ready_server_online() {
        assert_eq!(
            run(None, Intent::Online, facts(PodFacts::Absent)),
            (Pending, vec![Step::CreatePod])
        );
        assert_eq!(
            run(Some(Pending), Intent::Online, facts(STARTING)),
            (Pending, vec![])
        );
        assert_eq!(
            run(Some(Pending), Intent::Online, facts(OFF)),
            (Pending, vec![Step::SetOnline(true)])
        );
        assert_eq!(
            run(Some(Pending), Intent::Online, facts(SERVING)),
            (Online, vec![])
        );
        assert_eq!(
            run(Some(Offline), Intent::Online, facts(OFF)),
            (Offline, vec![Step::SetOnline(true)])
        );
    }

    #[test]
    fn offline_gates_first_then_waits_for_traffic_to_stop() {
        assert_eq!(
            run(Some(Online), Intent::Offline, facts(SERVING)),
            (Draining, vec![Step::SetOnline(false)])
        );
        assert_eq!(
            run(Some(Draining), Intent::Offline, facts(GATED_BUT_READY)),
            (Draining, vec![])
        );
        assert_eq!(
            run(Some(Draining), Intent::Offline, facts(OFF)),
            (Offline, vec![])
        );
        assert_eq!(
            run(Some(Offline), Intent::Offline, facts(OFF)),
            (Offline, vec![])
        );
    }

    #[test]
    fn remove_goes_offline_first_then_deletes_then_is_removed() {
        assert_eq!(
            run(Some(Online), Intent::Remove, facts(SERVING)),
            (Draining, vec![Step::SetOnline(false)])
        );
        assert_eq!(
            run(Some(Draining), Intent::Remove, facts(GATED_BUT_READY)),
            (Draining, vec![])
        );
        assert_eq!(
            run(Some(Draining), Intent::Remove, facts(OFF)),
            (Removing, vec![Step::DeletePod])
        );
        assert_eq!(
            run(Some(Removing), Intent::Remove, facts(PodFacts::Terminating)),
            (Removing, vec![])
        );
        assert_eq!(
            run(Some(Removing), Intent::Remove, facts(PodFacts::Absent)),
            (Removed, vec![])
        );
        assert_eq!(
            run(Some(Removed), Intent::Remove, facts(PodFacts::Absent)),
            (Removed, vec![])
        );
    }

    #[test]
    fn removal_waits_for_guaranteed_delivery_work_and_offline_does_not() {
        let owning = |gd| Facts { gd, ..facts(OFF) };
        let d = decide(
            "n-1",
            Some(Draining),
            Intent::Remove,
            &owning(GdWork::Unfinished(3)),
        );
        assert_eq!((d.state, d.steps.clone()), (Draining, vec![]));
        assert!(
            d.message.contains("3 unfinished guaranteed-delivery"),
            "{}",
            d.message
        );
        let d = decide(
            "n-1",
            Some(Draining),
            Intent::Remove,
            &owning(GdWork::Unknown),
        );
        assert_eq!((d.state, d.steps.clone()), (Draining, vec![]));
        assert!(d.message.contains("cluster database"), "{}", d.message);
        assert_eq!(
            run(
                Some(Draining),
                Intent::Remove,
                owning(GdWork::Unfinished(0))
            ),
            (Removing, vec![Step::DeletePod])
        );
        assert_eq!(
            run(
                Some(Draining),
                Intent::Offline,
                owning(GdWork::Unfinished(3))
            ),
            (Offline, vec![])
        );
        let late = Facts {
            in_state_seconds: 600 + ENDPOINT_SETTLE_SECONDS + 1,
            ..owning(GdWork::Unfinished(3))
        };
        let d = decide("n-1", Some(Draining), Intent::Remove, &late);
        assert!(d.stalled.is_some_and(|s| s.contains("guaranteed-delivery")));
        let forced = decide(
            "n-1",
            Some(Draining),
            Intent::Remove,
            &Facts {
                force: true,
                ..late
            },
        );
        assert!(forced.forced);
        assert_eq!(forced.steps, vec![Step::DeletePod]);
    }

    #[test]
    fn a_listener_holder_is_not_offline_until_it_handed_over() {
        let holding = Facts {
            holds_listener: true,
            ..facts(OFF)
        };
        let d = decide("n-1", Some(Draining), Intent::Offline, &holding);
        assert_eq!(d.state, Draining);
        assert!(
            d.message.contains("hand its listeners over"),
            "{}",
            d.message
        );
        assert_eq!(
            run(Some(Draining), Intent::Offline, facts(OFF)),
            (Offline, vec![])
        );
    }

    #[test]
    fn an_offline_node_is_removed_without_going_online() {
        assert_eq!(
            run(Some(Offline), Intent::Remove, facts(OFF)),
            (Removing, vec![Step::DeletePod])
        );
    }

    #[test]
    fn with_an_agent_offline_waits_for_quiesce_and_in_flight_work() {
        let ask = run(
            Some(Draining),
            Intent::Offline,
            facts(with_agent(false, false, Some(3))),
        );
        assert_eq!(ask, (Draining, vec![Step::AskOffline(true)]));
        let quiescing = run(
            Some(Draining),
            Intent::Offline,
            facts(with_agent(true, false, Some(3))),
        );
        assert_eq!(quiescing, (Draining, vec![]));
        let quiesced = run(
            Some(Draining),
            Intent::Offline,
            facts(with_agent(true, true, Some(0))),
        );
        assert_eq!(quiesced, (Offline, vec![]));
        let busy = decide(
            "n-1",
            Some(Draining),
            Intent::Remove,
            &facts(with_agent(true, true, Some(2))),
        );
        assert_eq!((busy.state, busy.steps.clone()), (Draining, vec![]));
        assert_eq!(busy.message, "removing: waiting for 2 requests in flight");
        let done = run(
            Some(Draining),
            Intent::Remove,
            facts(with_agent(true, true, Some(0))),
        );
        assert_eq!(done, (Removing, vec![Step::DeletePod]));
        let unknown = run(
            Some(Draining),
            Intent::Offline,
            facts(with_agent(true, true, None)),
        );
        assert_eq!(unknown, (Draining, vec![]));
    }

    #[test]
    fn with_an_agent_online_resumes_then_waits_for_health() {
        let resume = run(
            Some(Offline),
            Intent::Online,
            facts(with_agent(true, true, Some(0))),
        );
        assert_eq!(resume, (Offline, vec![Step::AskOffline(false)]));
        let resuming = run(
            Some(Offline),
            Intent::Online,
            facts(with_agent(false, true, Some(0))),
        );
        assert_eq!(resuming, (Offline, vec![]));
        let resumed = run(
            Some(Offline),
            Intent::Online,
            facts(with_agent(false, false, Some(0))),
        );
        assert_eq!(resumed, (Offline, vec![Step::SetOnline(true)]));
    }

    #[test]
    fn a_drain_past_the_timeout_stalls_unless_forced() {
        // The allowance starts once the endpoint change had time to spread.
        let settling = Facts {
            in_state_seconds: 601,
            ..facts(with_agent(true, true, Some(1)))
        };
        let d = decide("n-1", Some(Draining), Intent::Remove, &settling);
        assert!(d.stalled.is_none(), "{d:?}");
        let late = Facts {
            in_state_seconds: 600 + ENDPOINT_SETTLE_SECONDS + 1,
            ..facts(with_agent(true, true, Some(1)))
        };
        let d = decide("n-1", Some(Draining), Intent::Remove, &late);
        assert_eq!(d.steps, vec![]);
        assert!(
            d.stalled
                .as_deref()
                .is_some_and(|s| s.contains("drainTimeoutSeconds (600s)"))
        );
        let forced = decide(
            "n-1",
            Some(Draining),
            Intent::Remove,
            &Facts {
                force: true,
                ..late
            },
        );
        assert_eq!(forced.steps, vec![Step::DeletePod]);
        assert!(forced.forced && forced.stalled.is_none());
    }

    #[test]
    fn a_removed_node_added_back_returns_offline_then_online() {
        assert_eq!(
            run(Some(Removed), Intent::Offline, facts(PodFacts::Absent)),
            (Offline, vec![Step::CreatePod])
        );
        assert_eq!(
            run(Some(Removed), Intent::Online, facts(PodFacts::Absent)),
            (Offline, vec![Step::CreatePod])
        );
        assert_eq!(
            run(Some(Offline), Intent::Offline, facts(OFF)),
            (Offline, vec![])
        );
        assert_eq!(
            run(Some(Offline), Intent::Online, facts(OFF)),
            (Offline, vec![Step::SetOnline(true)])
        );
    }

    #[test]
    fn the_last_online_node_stays_online_without_force() {
        let last = Facts {
            last_online: true,
            ..facts(SERVING)
        };
        let d = decide("n-1", Some(Online), Intent::Offline, &last);
        assert_eq!((d.state, d.steps.clone()), (Online, vec![]));
        assert!(d.stalled.is_some_and(|s| s.contains("last online node")));
        let forced = decide(
            "n-1",
            Some(Online),
            Intent::Offline,
            &Facts {
                force: true,
                ..last
            },
        );
        assert_eq!(forced.steps, vec![Step::SetOnline(false)]);
    }

    #[test]
    fn workflows_beyond_the_budget_queue() {
        let busy = Facts {
            slot_free: false,
            ..facts(SERVING)
        };
        let d = decide("n-1", Some(Online), Intent::Remove, &busy);
        assert_eq!((d.state, d.steps.clone()), (Online, vec![]));
        assert!(d.message.starts_with("queued"));
    }

    #[test]
    fn a_removal_cancelled_midway_brings_the_node_back_online() {
        // The spec dropped the node from nodes.remove while it was draining.
        let resume = run(
            Some(Draining),
            Intent::Online,
            facts(with_agent(true, true, Some(4))),
        );
        assert_eq!(resume, (Pending, vec![Step::AskOffline(false)]));
        let back = run(Some(Draining), Intent::Online, facts(OFF));
        assert_eq!(back, (Pending, vec![Step::SetOnline(true)]));
        // Too late once the pod is being deleted: it comes back offline.
        let deleted = run(Some(Removing), Intent::Online, facts(PodFacts::Absent));
        assert_eq!(deleted, (Offline, vec![Step::CreatePod]));
    }

    #[test]
    fn a_pod_moved_off_a_cordoned_node_keeps_its_name_free_for_the_gap() {
        let cordoned = |pod, in_state_seconds| Facts {
            on_cordoned_node: true,
            in_state_seconds,
            ..facts(pod)
        };
        assert_eq!(
            run(
                Some(Draining),
                Intent::Replace,
                cordoned(with_agent(true, true, Some(0)), 0)
            ),
            (Relocating, vec![Step::DeletePod])
        );
        assert_eq!(
            run(
                Some(Relocating),
                Intent::Replace,
                cordoned(PodFacts::Terminating, 1)
            ),
            (Relocating, vec![])
        );
        // Gone, on another node's terms from now: created again only after
        // the gap, counted from the deletion.
        let gone = |in_state_seconds| Facts {
            in_state_seconds,
            ..facts(PodFacts::Absent)
        };
        let early = decide(
            "n-1",
            Some(Relocating),
            Intent::Online,
            &gone(RELOCATE_GAP_SECONDS - 1),
        );
        assert_eq!((early.state, early.steps.clone()), (Relocating, vec![]));
        assert!(early.message.contains("kubectl drain"), "{early:?}");
        assert_eq!(
            run(Some(Relocating), Intent::Online, gone(RELOCATE_GAP_SECONDS)),
            (Pending, vec![Step::CreatePod])
        );
        // A drift replacement is created again at once.
        assert_eq!(
            run(Some(Replacing), Intent::Online, gone(0)),
            (Pending, vec![Step::CreatePod])
        );
    }

    #[test]
    fn replace_drains_like_a_removal_then_recreates_the_pod() {
        let agent = |asked, quiesced, in_flight| facts(with_agent(asked, quiesced, in_flight));
        assert_eq!(
            run(Some(Online), Intent::Replace, facts(SERVING)),
            (Draining, vec![Step::SetOnline(false)])
        );
        assert_eq!(
            run(Some(Draining), Intent::Replace, facts(GATED_BUT_READY)),
            (Draining, vec![])
        );
        assert_eq!(
            run(
                Some(Draining),
                Intent::Replace,
                agent(false, false, Some(2))
            ),
            (Draining, vec![Step::AskOffline(true)])
        );
        assert_eq!(
            run(Some(Draining), Intent::Replace, agent(true, true, Some(2))),
            (Draining, vec![])
        );
        assert_eq!(
            run(Some(Draining), Intent::Replace, agent(true, true, Some(0))),
            (Replacing, vec![Step::DeletePod])
        );
        assert_eq!(
            run(
                Some(Replacing),
                Intent::Online,
                facts(PodFacts::Terminating)
            ),
            (Replacing, vec![])
        );
        // Back under its name, from the current spec, and online again.
        assert_eq!(
            run(Some(Replacing), Intent::Online, facts(PodFacts::Absent)),
            (Pending, vec![Step::CreatePod])
        );
        assert_eq!(
            run(Some(Pending), Intent::Online, facts(OFF)),
            (Pending, vec![Step::SetOnline(true)])
        );
    }

    #[test]
    fn a_replaced_node_keeps_its_guaranteed_delivery_work_and_its_listeners_move_first() {
        let owning = Facts {
            gd: GdWork::Unfinished(3),
            ..facts(OFF)
        };
        assert_eq!(
            run(Some(Draining), Intent::Replace, owning),
            (Replacing, vec![Step::DeletePod])
        );
        let holding = Facts {
            holds_listener: true,
            ..facts(OFF)
        };
        let d = decide("n-1", Some(Draining), Intent::Replace, &holding);
        assert_eq!((d.state, d.steps.clone()), (Draining, vec![]));
        assert!(
            d.message.contains("hand its listeners over"),
            "{}",
            d.message
        );
    }

    #[test]
    fn a_broken_server_is_replaced_without_a_quiesce_that_cannot_happen() {
        let broken = PodFacts::Present {
            containers_ready: false,
            online: false,
            ready: false,
            serving: false,
            asked_offline: false,
            agent: Some(AgentFacts {
                quiesced: false,
                in_flight: None,
                healthy: false,
            }),
        };
        assert_eq!(
            run(Some(Pending), Intent::Replace, facts(broken)),
            (Replacing, vec![Step::DeletePod])
        );
        // Removal of the same node still waits: it leaves for good.
        assert_eq!(
            run(Some(Pending), Intent::Remove, facts(broken)),
            (Draining, vec![Step::AskOffline(true)])
        );
    }

    #[test]
    fn replacing_the_only_node_needs_no_force_but_a_slot() {
        let last = Facts {
            last_online: true,
            ..facts(SERVING)
        };
        assert_eq!(
            run(Some(Online), Intent::Replace, last),
            (Draining, vec![Step::SetOnline(false)])
        );
        let busy = Facts {
            slot_free: false,
            ..facts(SERVING)
        };
        let d = decide("n-1", Some(Online), Intent::Replace, &busy);
        assert_eq!((d.state, d.steps.clone()), (Online, vec![]));
        assert!(
            d.message.starts_with("queued for replacing"),
            "{}",
            d.message
        );
    }

    #[test]
    fn a_terminating_pod_keeps_its_state() {
        assert_eq!(
            run(Some(Online), Intent::Online, facts(PodFacts::Terminating)),
            (Online, vec![])
        );
    }
}
