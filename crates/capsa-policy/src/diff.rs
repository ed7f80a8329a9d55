//! `capsa policy diff`: what changed between two policies, container by
//! container, in terms a reviewer checks (an image digest, an env entry, a
//! mount), so a policy update can be approved without reading Rego.

use std::collections::BTreeSet;
use std::fmt;

use serde_json::Value;

use crate::model::PolicyData;

/// One difference between two policies.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// A container exists only in the new policy.
    ContainerAdded(String),
    /// A container exists only in the old policy.
    ContainerRemoved(String),
    /// A field of a container, or of the sandbox, differs.
    Field {
        /// Container name, or `sandbox`.
        scope: String,
        /// Field name.
        field: String,
        /// Entries only in the old policy (or the old value).
        removed: Vec<String>,
        /// Entries only in the new policy (or the new value).
        added: Vec<String>,
    },
}

impl fmt::Display for Change {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::ContainerAdded(name) => write!(f, "+ container {name}"),
            Self::ContainerRemoved(name) => write!(f, "- container {name}"),
            Self::Field { scope, field, removed, added } => {
                writeln!(f, "~ {scope}.{field}")?;
                for r in removed {
                    writeln!(f, "    - {r}")?;
                }
                for a in added {
                    writeln!(f, "    + {a}")?;
                }
                Ok(())
            }
        }
    }
}

/// The changes from `old` to `new`; empty when they are the same.
pub fn diff(old: &PolicyData, new: &PolicyData) -> Vec<Change> {
    let mut changes = Vec::new();
    let names = |d: &PolicyData| d.containers.iter().map(|c| c.name.clone()).collect::<BTreeSet<_>>();
    let (old_names, new_names) = (names(old), names(new));
    for name in old_names.difference(&new_names) {
        changes.push(Change::ContainerRemoved(name.clone()));
    }
    for name in new_names.difference(&old_names) {
        changes.push(Change::ContainerAdded(name.clone()));
    }
    for name in old_names.intersection(&new_names) {
        let find =
            |d: &PolicyData| d.containers.iter().find(|c| &c.name == name).and_then(|c| serde_json::to_value(c).ok());
        if let (Some(a), Some(b)) = (find(old), find(new)) {
            fields(name, &a, &b, &mut changes);
        }
    }
    if let (Ok(a), Ok(b)) = (serde_json::to_value(&old.sandbox), serde_json::to_value(&new.sandbox)) {
        fields("sandbox", &a, &b, &mut changes);
    }
    changes
}

/// Compares two objects field by field; lists are compared as sets, except
/// where order is meaning (layers, args), where the whole list is shown.
fn fields(scope: &str, a: &Value, b: &Value, changes: &mut Vec<Change>) {
    let (Some(a), Some(b)) = (a.as_object(), b.as_object()) else { return };
    let keys: BTreeSet<&String> = a.keys().chain(b.keys()).collect();
    for key in keys {
        let (x, y) = (a.get(key).unwrap_or(&Value::Null), b.get(key).unwrap_or(&Value::Null));
        if x == y {
            continue;
        }
        match (x, y) {
            (Value::Object(_), Value::Object(_)) if key == "env" || key == "user" => {
                fields(&format!("{scope}.{key}"), x, y, changes);
            }
            (Value::Array(p), Value::Array(q)) if key != "layers" && key != "args" => {
                let set = |v: &Vec<Value>| v.iter().map(render).collect::<BTreeSet<_>>();
                let (p, q) = (set(p), set(q));
                changes.push(Change::Field {
                    scope: scope.to_owned(),
                    field: key.clone(),
                    removed: p.difference(&q).cloned().collect(),
                    added: q.difference(&p).cloned().collect(),
                });
            }
            _ => changes.push(Change::Field {
                scope: scope.to_owned(),
                field: key.clone(),
                removed: vec![render(x)],
                added: vec![render(y)],
            }),
        }
    }
}

fn render(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{ContainerPolicy, EnvPolicy, SCHEMA_VERSION, SandboxPolicy, UserPolicy};

    fn container(name: &str) -> ContainerPolicy {
        ContainerPolicy {
            name: name.into(),
            image: "busybox".into(),
            image_digest: "sha256:aa".into(),
            layers: vec!["sha256:01".into()],
            args: vec!["sh".into()],
            env: EnvPolicy { exact: vec!["PATH=/bin".into()], ..EnvPolicy::default() },
            working_dir: "/".into(),
            user: UserPolicy::default(),
            capabilities: vec![],
            privileged: false,
            no_new_privileges: false,
            seccomp_profile_sha256: None,
            mounts: vec![],
            read_only_rootfs: false,
            sysctls: Default::default(),
            exec: vec![],
            signals: vec![15],
            read_stdio: true,
            write_stdin: false,
        }
    }

    fn data(containers: Vec<ContainerPolicy>) -> PolicyData {
        PolicyData { version: SCHEMA_VERSION, containers, sandbox: SandboxPolicy::default() }
    }

    #[test]
    fn same_policy_has_no_changes() {
        assert!(diff(&data(vec![container("a")]), &data(vec![container("a")])).is_empty());
    }

    #[test]
    fn container_and_field_changes_are_named() {
        let mut changed = container("a");
        changed.image_digest = "sha256:bb".into();
        changed.env.exact.push("DEBUG=1".into());
        changed.privileged = true;
        let changes = diff(&data(vec![container("a"), container("gone")]), &data(vec![changed, container("new")]));
        let text: Vec<String> = changes.iter().map(ToString::to_string).collect();
        assert!(text.contains(&"- container gone".to_owned()), "{text:?}");
        assert!(text.contains(&"+ container new".to_owned()), "{text:?}");
        assert!(text.iter().any(|t| t.starts_with("~ a.image_digest") && t.contains("+ sha256:bb")), "{text:?}");
        assert!(text.iter().any(|t| t.starts_with("~ a.env.exact") && t.contains("+ DEBUG=1")), "{text:?}");
        assert!(text.iter().any(|t| t.starts_with("~ a.privileged") && t.contains("+ true")), "{text:?}");
    }
}
