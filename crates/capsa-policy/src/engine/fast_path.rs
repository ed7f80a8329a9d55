//! A native check that allows an honest `create_container` without
//! evaluating the rules, for a document of exactly this version's
//! [`RULES`](super::RULES) and its data.
//!
//! Why it exists: regorus' compiled form costs about 0.1 µs a statement and
//! 0.4 µs a call, and the rules run some 900 of them to allow a container
//! with 15 variables and 8 mounts, so creating a container took 100 to
//! 200 µs to decide on this machine (depending on the day), most of it in
//! the VM's per-step overhead. This module
//! is the same conjunction, `create_container_ok` in `rules.rego`, written
//! out once in Rust over the request's JSON; each function names the rule
//! it transcribes.
//!
//! It can only ever say "allowed" or "ask the rules", never "denied", and
//! it is written to be at least as strict as the rules: anything it does
//! not accept exactly as the rules would (a value of an unexpected type, a
//! number written `1000.0`, a field it does not know) goes to the compiled
//! rules, which decide and explain. So a gap here costs time, never
//! safety; only a check looser than its rule would be a bug, and that is
//! what the tests look for: the decision tests require the interpreter to
//! allow every request this module allows (every case and tens of
//! thousands of mutations of them), and require it to allow every allowed
//! `create_container` case; the fuzz target `policy_fast_path` does the
//! same on arbitrary mutations.

use serde_json::Value;

use crate::model::{ContainerPolicy, MountPolicy, SourceMatch};

use super::{ContainerMatchers, text};

/// Whether `request`, a `create_container` for `container`, passes every
/// check of `create_container_ok`. `matchers` are the engine's compiled
/// patterns of the same container.
pub(super) fn allows(container: &ContainerPolicy, matchers: &ContainerMatchers, request: &Value) -> bool {
    // `image_ok`, `working_dir_ok`: equal strings.
    text(request, "image") == Some(container.image_digest.as_str())
        && text(request, "working_dir") == Some(container.working_dir.as_str())
        // `layers_ok`, `args_ok`: equal arrays, same order.
        && strings_equal(request.get("layers"), &container.layers)
        && strings_equal(request.get("args"), &container.args)
        && env_ok(container, matchers, request.get("env"))
        && user_ok(container, request.get("user"))
        && capabilities_ok(container, request.get("capabilities"))
        && booleans_ok(container, request)
        && seccomp_ok(container, request.get("seccomp_profile_sha256"))
        && mounts_ok(container, matchers, request.get("mounts"))
        && sysctls_ok(container, request.get("sysctls"))
}

fn strings_equal(requested: Option<&Value>, policy: &[String]) -> bool {
    match requested {
        Some(Value::Array(items)) => {
            items.len() == policy.len() && items.iter().zip(policy).all(|(item, want)| item.as_str() == Some(want))
        }
        _ => false,
    }
}

/// `env_ok` and `env_required_ok`: every entry a string listed exactly or
/// matched whole by one of the container's patterns (the same anchored set
/// the engine computes `capsa_matches.env` with), and every required name
/// set, as `NAME=...` or as the bare entry `NAME`.
fn env_ok(container: &ContainerPolicy, matchers: &ContainerMatchers, requested: Option<&Value>) -> bool {
    let Some(Value::Array(entries)) = requested else {
        return false;
    };
    let allowed = entries
        .iter()
        .all(|entry| entry.as_str().is_some_and(|e| matchers.env_exact.contains(e) || matchers.env.is_match(e)));
    allowed
        && container.env.required.iter().all(|name| {
            !name.contains('=')
                && entries
                    .iter()
                    .filter_map(Value::as_str)
                    .any(|e| e.strip_prefix(name.as_str()).is_some_and(|rest| rest.is_empty() || rest.starts_with('=')))
        })
}

/// `user_ok` and `groups_ok`: uid and gid equal; supplementary groups, if
/// given, each among the policy's.
fn user_ok(container: &ContainerPolicy, requested: Option<&Value>) -> bool {
    let Some(Value::Object(user)) = requested else {
        return false;
    };
    let id = |key: &str| user.get(key).and_then(Value::as_u64);
    if id("uid") != Some(u64::from(container.user.uid)) || id("gid") != Some(u64::from(container.user.gid)) {
        return false;
    }
    match user.get("groups") {
        None => true,
        Some(Value::Array(groups)) => groups
            .iter()
            .all(|g| g.as_u64().is_some_and(|g| container.user.groups.iter().any(|allowed| u64::from(*allowed) == g))),
        Some(_) => false,
    }
}

/// `capabilities_ok`: each requested capability among the policy's.
fn capabilities_ok(container: &ContainerPolicy, requested: Option<&Value>) -> bool {
    let Some(Value::Array(capabilities)) = requested else {
        return false;
    };
    capabilities.iter().all(|c| c.as_str().is_some_and(|c| container.capabilities.iter().any(|allowed| allowed == c)))
}

/// `privileged_ok`, `no_new_privileges_ok`, `read_only_rootfs_ok`: the safe
/// value, or the other one where the policy has it too; never a
/// non-boolean.
fn booleans_ok(container: &ContainerPolicy, request: &Value) -> bool {
    let flag = |key: &str| request.get(key).and_then(Value::as_bool);
    let privileged = match flag("privileged") {
        Some(false) => true,
        Some(true) => container.privileged,
        None => false,
    };
    let no_new_privileges = match flag("no_new_privileges") {
        Some(true) => true,
        Some(false) => !container.no_new_privileges,
        None => false,
    };
    let read_only_rootfs = match flag("read_only_rootfs") {
        Some(true) => true,
        Some(false) => !container.read_only_rootfs,
        None => false,
    };
    privileged && no_new_privileges && read_only_rootfs
}

/// `seccomp_ok`: the pinned profile when the policy pins one; otherwise
/// none or any (a profile only restricts).
fn seccomp_ok(container: &ContainerPolicy, requested: Option<&Value>) -> bool {
    match (&container.seccomp_profile_sha256, requested) {
        (None, None | Some(Value::Null | Value::String(_))) => true,
        (Some(pinned), Some(Value::String(requested))) => pinned == requested,
        _ => false,
    }
}

/// `mounts_ok`: every requested mount matches the policy mount at its
/// destination in type, source and options.
fn mounts_ok(container: &ContainerPolicy, matchers: &ContainerMatchers, requested: Option<&Value>) -> bool {
    let Some(Value::Array(mounts)) = requested else {
        return false;
    };
    mounts.iter().all(|mount| {
        // A destination implies the mount is an object.
        let Some(destination) = text(mount, "destination") else {
            return false;
        };
        let Some(policy) = container.mounts.iter().find(|p| p.destination == destination) else {
            return false;
        };
        text(mount, "type") == Some(policy.fs_type.as_str())
            && source_ok(policy, matchers, mount.get("source"))
            && options_ok(policy, mount.get("options"))
    })
}

/// `source_matches`: equal to an exact source, or a clean absolute path
/// that the policy's pattern matches whole.
fn source_ok(policy: &MountPolicy, matchers: &ContainerMatchers, requested: Option<&Value>) -> bool {
    let Some(source) = requested.and_then(Value::as_str) else {
        return false;
    };
    match &policy.source {
        SourceMatch::Exact(exact) => source == exact,
        SourceMatch::Pattern(_) => {
            clean_path(source)
                && matchers.mount_sources.get(&policy.destination).is_some_and(|pattern| pattern.is_match(source))
        }
    }
}

/// The options check of `mounts_allowed`: every option the policy names is
/// present, and no `rw` stands beside a policy `ro`.
fn options_ok(policy: &MountPolicy, requested: Option<&Value>) -> bool {
    let Some(Value::Array(options)) = requested else {
        return false;
    };
    let has = |option: &str| options.iter().any(|o| o.as_str() == Some(option));
    policy.options.iter().all(|o| has(o)) && !(policy.options.iter().any(|o| o == "ro") && has("rw"))
}

/// `clean_path`: absolute, with no `.` or `..` component.
fn clean_path(path: &str) -> bool {
    path.starts_with('/')
        && !path.contains("/./")
        && !path.contains("/../")
        && !path.ends_with("/.")
        && !path.ends_with("/..")
}

/// `sysctls_ok`: absent, or an object whose every entry the policy has with
/// that value.
fn sysctls_ok(container: &ContainerPolicy, requested: Option<&Value>) -> bool {
    match requested {
        None => true,
        Some(Value::Object(sysctls)) => sysctls
            .iter()
            .all(|(name, value)| value.as_str().is_some_and(|v| container.sysctls.get(name).is_some_and(|p| p == v))),
        Some(_) => false,
    }
}
