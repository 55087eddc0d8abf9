//! The controller's view of the distributed cache: a managed Terracotta
//! Server Array is ready when its StatefulSet reports ready servers; an
//! external cache is taken as configured (the operator does not probe it:
//! it may not be reachable from where the operator runs).

use k8s_openapi::api::apps::v1::StatefulSet;
use kube::ResourceExt;
use kube::runtime::reflector::{ObjectRef, Store};

use crate::api::{CacheMode, CacheStatus, IntegrationCluster, Mode};
use crate::{naming, render};

/// What the reconcile needs to know about the cache.
pub struct View {
    pub status: CacheStatus,
    /// A Degraded reason and message.
    pub problem: Option<(&'static str, String)>,
    /// Why new servers must not start yet: a server that cannot reach the
    /// cache at start terminates (seed 003).
    pub blocks_start: Option<String>,
}

/// Looks at the cache; `servers_exist` says whether the cluster already
/// runs servers (then a missing cache is an outage, not a first start).
/// `sets` are the StatefulSets the operator owns, as its watch sees them.
pub fn observe(
    sets: &Store<StatefulSet>,
    ic: &IntegrationCluster,
    servers_exist: bool,
) -> Option<View> {
    let Some(cache) = &ic.spec.cache else {
        return None;
    };
    if ic.spec.mode != Mode::Stateful || cache.mode == CacheMode::None {
        return None;
    }
    let urls = render::cache_urls(ic);
    if cache.mode == CacheMode::External {
        return Some(View {
            status: CacheStatus {
                ready: true,
                urls,
                ready_servers: None,
            },
            problem: None,
            blocks_start: None,
        });
    }
    let name = naming::cache_service(&ic.name_any());
    let set = sets.get(&ObjectRef::new(&name).within(&ic.namespace().unwrap_or_default()));
    let wanted = cache.managed.as_ref().map_or(1, |m| m.replicas);
    let ready = set
        .as_ref()
        .and_then(|s| s.status.as_ref())
        .and_then(|s| s.ready_replicas)
        .unwrap_or(0);
    Some(verdict(&name, urls, ready, wanted, servers_exist))
}

fn verdict(name: &str, urls: Vec<String>, ready: i32, wanted: i32, servers_exist: bool) -> View {
    let counts = format!("{ready}/{wanted} Terracotta servers of {name} ready");
    let (problem, blocks_start) = if ready == 0 {
        let problem = servers_exist.then(|| {
            (
                "CacheUnavailable",
                format!("{counts}; the servers keep running and rejoin the cache when it returns"),
            )
        });
        (problem, Some(format!("waiting for the cache: {counts}")))
    } else if ready < wanted {
        (
            Some((
                "CacheDegraded",
                format!("{counts}: the mirror group runs without its standby"),
            )),
            None,
        )
    } else {
        (None, None)
    };
    View {
        status: CacheStatus {
            ready: ready > 0,
            urls,
            ready_servers: Some(ready),
        },
        problem,
        blocks_start,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cache_with_no_ready_server_blocks_starts_and_is_an_outage_only_for_running_servers() {
        let first = verdict("o-cache", vec![], 0, 2, false);
        assert!(first.blocks_start.is_some() && first.problem.is_none());
        assert!(!first.status.ready);
        let outage = verdict("o-cache", vec![], 0, 2, true);
        assert_eq!(outage.problem.map(|p| p.0), Some("CacheUnavailable"));
        let half = verdict("o-cache", vec![], 1, 2, true);
        assert!(half.blocks_start.is_none() && half.status.ready);
        assert_eq!(half.problem.map(|p| p.0), Some("CacheDegraded"));
        let full = verdict("o-cache", vec![], 2, 2, true);
        assert!(full.problem.is_none() && full.blocks_start.is_none());
    }
}
