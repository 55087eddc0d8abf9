//! The pure parts of the `kubectl integration` plugin: the status table,
//! how a node command changes `spec.nodes`, and whether an object looks
//! managed by a GitOps tool. The binary (`src/bin/kubectl-integration.rs`)
//! only reads, applies and prints.

use std::collections::BTreeSet;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

use crate::api::IntegrationCluster;

/// Field manager of the plugin's server-side applies: the nodes it put in a
/// list are its own, and a GitOps tool's entries are never taken over.
pub const FIELD_MANAGER: &str = "kubectl-integration";

/// Which list of `spec.nodes` a command edits.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum List {
    Offline,
    Remove,
}

impl List {
    pub fn field(self) -> &'static str {
        match self {
            List::Offline => "offline",
            List::Remove => "remove",
        }
    }

    fn entries(self, ic: &IntegrationCluster) -> Vec<String> {
        let nodes = ic.spec.nodes.clone().unwrap_or_default();
        match self {
            List::Offline => nodes.offline,
            List::Remove => nodes.remove,
        }
    }
}

/// A node command: add the node to a list, or take it out.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Edit {
    pub list: List,
    pub add: bool,
}

/// What to apply for `edit`, or why it cannot be done.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Change {
    /// Apply this list (the plugin's own entries after the edit).
    Apply(Vec<String>),
    /// Nothing to do; the message says why.
    Unchanged(String),
}

/// Errors a person can act on.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum EditError {
    #[error(
        "{node} is in spec.nodes.{list} because {managers} put it there; change it where it was set (with a GitOps tool: in Git)"
    )]
    OwnedByOthers {
        node: String,
        list: &'static str,
        managers: String,
    },
}

/// The elements of a set-typed list under `spec.nodes.<list>` that a field
/// manager owns, read from managedFields (`f:spec` → `f:nodes` → `f:<list>`
/// → `v:"<node>"`).
pub fn owned_entries(meta: &ObjectMeta, manager: &str, list: List) -> BTreeSet<String> {
    meta.managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() == Some(manager))
        .filter_map(|m| m.fields_v1.as_ref())
        .filter_map(|f| f.0.pointer(&format!("/f:spec/f:nodes/f:{}", list.field())))
        .filter_map(|v| v.as_object())
        .flat_map(|o| o.keys())
        .filter_map(|k| k.strip_prefix("v:"))
        .filter_map(|v| serde_json::from_str::<String>(v).ok())
        .collect()
}

fn other_owners(meta: &ObjectMeta, list: List, node: &str) -> Vec<String> {
    meta.managed_fields
        .iter()
        .flatten()
        .filter(|m| m.manager.as_deref() != Some(FIELD_MANAGER))
        .filter(|m| {
            let one = ObjectMeta {
                managed_fields: Some(vec![(*m).clone()]),
                ..ObjectMeta::default()
            };
            owned_entries(&one, m.manager.as_deref().unwrap_or_default(), list).contains(node)
        })
        .filter_map(|m| m.manager.clone())
        .collect()
}

/// How `edit` of `node` changes the plugin's entries of the list.
pub fn plan_edit(ic: &IntegrationCluster, node: &str, edit: Edit) -> Result<Change, EditError> {
    let present = edit.list.entries(ic).iter().any(|n| n == node);
    let mut own = owned_entries(&ic.metadata, FIELD_MANAGER, edit.list);
    let field = edit.list.field();
    if edit.add {
        if present {
            return Ok(Change::Unchanged(format!(
                "{node} is already in spec.nodes.{field}"
            )));
        }
        own.insert(node.to_owned());
        return Ok(Change::Apply(own.into_iter().collect()));
    }
    if !present {
        return Ok(Change::Unchanged(format!(
            "{node} is not in spec.nodes.{field}"
        )));
    }
    if !own.remove(node) {
        return Err(EditError::OwnedByOthers {
            node: node.to_owned(),
            list: field,
            managers: other_owners(&ic.metadata, edit.list, node).join(", "),
        });
    }
    Ok(Change::Apply(own.into_iter().collect()))
}

/// The GitOps tool that seems to manage the object, if any: a change made
/// here would be reverted at its next sync unless it is also made in Git.
pub fn gitops_manager(meta: &ObjectMeta) -> Option<&'static str> {
    let keys = meta
        .annotations
        .iter()
        .flatten()
        .chain(meta.labels.iter().flatten())
        .map(|(k, v)| (k.as_str(), v.as_str()));
    for (key, value) in keys {
        if key.starts_with("argocd.argoproj.io/") {
            return Some("Argo CD");
        }
        if key.starts_with("kustomize.toolkit.fluxcd.io/")
            || key.starts_with("helm.toolkit.fluxcd.io/")
        {
            return Some("Flux");
        }
        if key == "app.kubernetes.io/managed-by" && value == "Helm" {
            return Some("Helm");
        }
    }
    let managers = meta
        .managed_fields
        .iter()
        .flatten()
        .filter_map(|m| m.manager.as_deref());
    for manager in managers {
        if manager.starts_with("argocd") {
            return Some("Argo CD");
        }
        if manager.contains("kustomize-controller") || manager.contains("helm-controller") {
            return Some("Flux");
        }
    }
    None
}

/// The status table: one row per node.
pub fn status_table(ic: &IntegrationCluster) -> String {
    let status = ic.status.clone().unwrap_or_default();
    let holders = |node: &str| {
        let held: Vec<&str> = status
            .listeners
            .iter()
            .filter(|l| l.holder.as_deref() == Some(node))
            .map(|l| l.name.as_str())
            .collect();
        if held.is_empty() {
            "-".to_owned()
        } else {
            held.join(",")
        }
    };
    let mut rows = vec![vec![
        "NODE".to_owned(),
        "STATE".to_owned(),
        "READY".to_owned(),
        "IN SYNC".to_owned(),
        "LISTENERS".to_owned(),
        "MESSAGE".to_owned(),
    ]];
    for node in &status.nodes {
        let in_sync = node.packages_digest.as_ref() == status.packages_digest.as_ref()
            && node.config_digest.is_some();
        rows.push(vec![
            node.name.clone(),
            format!("{:?}", node.state),
            node.ready.to_string(),
            match (node.state, in_sync) {
                (crate::api::NodeState::Removed, _) => "-",
                (_, true) => "yes",
                (_, false) => "no",
            }
            .to_owned(),
            holders(&node.name),
            node.message.clone().unwrap_or_default(),
        ]);
    }
    let phase = status
        .phase
        .map_or("Unknown".to_owned(), |p| format!("{p:?}"));
    let mut out = format!(
        "{}/{}: {phase}, {}/{} nodes online, {} ready\n",
        ic.metadata.namespace.as_deref().unwrap_or_default(),
        ic.metadata.name.as_deref().unwrap_or_default(),
        status.online_replicas.unwrap_or(0),
        ic.spec.replicas,
        status.ready_replicas.unwrap_or(0),
    );
    for c in status
        .conditions
        .iter()
        .filter(|c| c.status == "True" && c.type_ != "Validated" && c.type_ != "Ready")
    {
        out += &format!("  {}: {} ({})\n", c.type_, c.message, c.reason);
    }
    if let Some(c) = status
        .conditions
        .iter()
        .find(|c| c.type_ == "Validated" && c.status == "False")
    {
        out += &format!("  Invalid: {}\n", c.message);
    }
    out += &table(&rows);
    if !status.listeners.is_empty() {
        let mut listeners = vec![vec![
            "LISTENER".to_owned(),
            "HOLDER".to_owned(),
            "EPOCH".to_owned(),
            "RENEWED".to_owned(),
        ]];
        for l in &status.listeners {
            listeners.push(vec![
                l.name.clone(),
                l.holder.clone().unwrap_or_else(|| "-".to_owned()),
                l.transitions.map_or("-".to_owned(), |t| t.to_string()),
                l.renew_time
                    .as_ref()
                    .map_or("-".to_owned(), |t| t.0.to_string()),
            ]);
        }
        out += "\n";
        out += &table(&listeners);
    }
    out
}

fn table(rows: &[Vec<String>]) -> String {
    let columns = rows.first().map_or(0, Vec::len);
    let widths: Vec<usize> = (0..columns)
        .map(|i| rows.iter().map(|r| r[i].chars().count()).max().unwrap_or(0))
        .collect();
    rows.iter()
        .map(|row| {
            let cells: Vec<String> = row
                .iter()
                .zip(&widths)
                .map(|(cell, width)| format!("{cell:<width$}"))
                .collect();
            cells.join("   ").trim_end().to_owned() + "\n"
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::{FieldsV1, ManagedFieldsEntry};
    use serde_json::json;

    fn cluster(offline: &[&str], managed: Vec<(&str, &[&str])>) -> IntegrationCluster {
        let spec = serde_saphyr::from_str(&format!(
            "profile: generic\nmode: stateless\nimage: s\nnodes: {{offline: [{}]}}\n",
            offline.join(", ")
        ))
        .expect("spec");
        let mut ic = IntegrationCluster::new("c", spec);
        ic.metadata.managed_fields = Some(
            managed
                .into_iter()
                .map(|(manager, nodes)| {
                    let entries: serde_json::Map<String, serde_json::Value> = nodes
                        .iter()
                        .map(|n| (format!("v:\"{n}\""), json!({})))
                        .collect();
                    ManagedFieldsEntry {
                        manager: Some(manager.into()),
                        operation: Some("Apply".into()),
                        fields_v1: Some(FieldsV1(
                            json!({"f:spec": {"f:nodes": {"f:offline": entries}}}),
                        )),
                        ..ManagedFieldsEntry::default()
                    }
                })
                .collect(),
        );
        ic
    }

    const OFFLINE: Edit = Edit {
        list: List::Offline,
        add: true,
    };
    const ONLINE: Edit = Edit {
        list: List::Offline,
        add: false,
    };

    #[test]
    fn offline_adds_to_the_plugins_own_entries() {
        let ic = cluster(
            &["c-0", "c-2"],
            vec![
                ("kubectl-integration", &["c-0"]),
                ("argocd-controller", &["c-2"]),
            ],
        );
        assert_eq!(
            plan_edit(&ic, "c-1", OFFLINE),
            Ok(Change::Apply(vec!["c-0".into(), "c-1".into()]))
        );
    }

    #[test]
    fn online_drops_an_entry_the_plugin_owns() {
        let ic = cluster(&["c-0"], vec![("kubectl-integration", &["c-0"])]);
        assert_eq!(plan_edit(&ic, "c-0", ONLINE), Ok(Change::Apply(vec![])));
    }

    #[test]
    fn an_entry_set_by_someone_else_is_not_taken_over() {
        let ic = cluster(&["c-2"], vec![("argocd-controller", &["c-2"])]);
        let err = plan_edit(&ic, "c-2", ONLINE).expect_err("owned by argocd");
        assert!(err.to_string().contains("argocd-controller"), "{err}");
    }

    #[test]
    fn repeated_commands_change_nothing() {
        let ic = cluster(&["c-0"], vec![("kubectl-integration", &["c-0"])]);
        assert!(matches!(
            plan_edit(&ic, "c-0", OFFLINE),
            Ok(Change::Unchanged(_))
        ));
        assert!(matches!(
            plan_edit(&ic, "c-1", ONLINE),
            Ok(Change::Unchanged(_))
        ));
    }

    #[test]
    fn gitops_tools_are_recognised() {
        let mut ic = cluster(&[], vec![]);
        assert_eq!(gitops_manager(&ic.metadata), None);
        ic.metadata.annotations =
            Some([("argocd.argoproj.io/tracking-id".to_owned(), "x".to_owned())].into());
        assert_eq!(gitops_manager(&ic.metadata), Some("Argo CD"));
        let flux = cluster(&[], vec![("kustomize-controller", &[])]);
        assert_eq!(gitops_manager(&flux.metadata), Some("Flux"));
    }

    #[test]
    fn the_status_shows_listener_holders_and_epochs() {
        let mut ic = cluster(&[], vec![]);
        ic.status = Some(crate::api::IntegrationClusterStatus {
            listeners: vec![crate::api::ListenerStatus {
                name: "orders-in".into(),
                holder: Some("c-2".into()),
                transitions: Some(4),
                renew_time: None,
            }],
            ..Default::default()
        });
        let out = status_table(&ic);
        assert!(
            out.contains("LISTENER    HOLDER   EPOCH   RENEWED"),
            "{out}"
        );
        assert!(out.contains("orders-in   c-2      4       -"), "{out}");
    }

    #[test]
    fn the_table_aligns_columns() {
        let rows = vec![
            vec!["NODE".to_owned(), "STATE".to_owned()],
            vec!["orders-10".to_owned(), "Online".to_owned()],
        ];
        assert_eq!(table(&rows), "NODE        STATE\norders-10   Online\n");
    }
}
