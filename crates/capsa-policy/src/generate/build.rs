//! Builds policy data from a workload, its images and the platform
//! settings: the merge rules that decide exactly what the runtime will send.
//!
//! The aim is that a generated policy allows what the runtime will really
//! request for this workload and nothing more; where it differs, the agent
//! denies a legitimate workload, and `capsa policy check` on the runtime's
//! request shows which field.

use std::collections::BTreeSet;

use super::settings::{Settings, regex_check};
use super::spec::{ContainerSpec, EnvSpec, Platform, VolumeSource, Workload};
use super::{GenerateError, ImageFacts, ImageResolver};
use crate::document::EncfsVolume;
use crate::model::{
    ContainerPolicy, EnvPolicy, MountPolicy, PolicyData, SCHEMA_VERSION, SandboxPolicy, SourceMatch, UserPolicy,
};

/// Every capability, for privileged containers.
const ALL_CAPABILITIES: &[&str] = &[
    "CAP_AUDIT_CONTROL",
    "CAP_AUDIT_READ",
    "CAP_AUDIT_WRITE",
    "CAP_BLOCK_SUSPEND",
    "CAP_BPF",
    "CAP_CHECKPOINT_RESTORE",
    "CAP_CHOWN",
    "CAP_DAC_OVERRIDE",
    "CAP_DAC_READ_SEARCH",
    "CAP_FOWNER",
    "CAP_FSETID",
    "CAP_IPC_LOCK",
    "CAP_IPC_OWNER",
    "CAP_KILL",
    "CAP_LEASE",
    "CAP_LINUX_IMMUTABLE",
    "CAP_MAC_ADMIN",
    "CAP_MAC_OVERRIDE",
    "CAP_MKNOD",
    "CAP_NET_ADMIN",
    "CAP_NET_BIND_SERVICE",
    "CAP_NET_BROADCAST",
    "CAP_NET_RAW",
    "CAP_PERFMON",
    "CAP_SETFCAP",
    "CAP_SETGID",
    "CAP_SETPCAP",
    "CAP_SETUID",
    "CAP_SYSLOG",
    "CAP_SYS_ADMIN",
    "CAP_SYS_BOOT",
    "CAP_SYS_CHROOT",
    "CAP_SYS_MODULE",
    "CAP_SYS_NICE",
    "CAP_SYS_PACCT",
    "CAP_SYS_PTRACE",
    "CAP_SYS_RAWIO",
    "CAP_SYS_RESOURCE",
    "CAP_SYS_TIME",
    "CAP_SYS_TTY_CONFIG",
    "CAP_WAKE_ALARM",
];

/// Where the runtime keeps a sandbox's volumes: per-sandbox, so a pattern.
fn sandbox_volume_pattern(volume: &str) -> String {
    format!("/run/capsa/sandboxes/[a-z0-9-]+/volumes/{}", regex_escape(volume))
}

/// Builds the policy data for a workload.
pub fn build(
    workload: &Workload,
    resolver: &mut dyn ImageResolver,
    settings: &Settings,
) -> Result<PolicyData, GenerateError> {
    let mut seen = BTreeSet::new();
    let mut containers = Vec::with_capacity(workload.containers.len());
    for spec in &workload.containers {
        if !seen.insert(spec.name.as_str()) {
            return Err(GenerateError::Invalid {
                path: format!("{}/{}", workload.name, spec.name),
                reason: "two containers have this name".into(),
            });
        }
        let image = resolver
            .resolve(&spec.image)
            .map_err(|reason| GenerateError::Image { image: spec.image.clone(), reason })?;
        containers.push(container(workload.platform, spec, &image, settings, &workload.encfs)?);
    }
    let mut sandbox = SandboxPolicy::default();
    if let Some(endpoints) = &workload.workload_api {
        sandbox.workload_api.clone_from(endpoints);
    }
    Ok(PolicyData { version: SCHEMA_VERSION, containers, sandbox })
}

fn container(
    platform: Platform,
    spec: &ContainerSpec,
    image: &ImageFacts,
    settings: &Settings,
    encfs: &[EncfsVolume],
) -> Result<ContainerPolicy, GenerateError> {
    let path = |field: &str| format!("{}.{field}", spec.name);
    // Kubernetes' rules for command/args against entrypoint/cmd.
    let args = match (&spec.command, &spec.args) {
        (Some(command), Some(args)) => [command.as_slice(), args].concat(),
        (Some(command), None) => command.clone(),
        (None, Some(args)) => [image.entrypoint.as_slice(), args].concat(),
        (None, None) => [image.entrypoint.as_slice(), &image.cmd].concat(),
    };
    if args.is_empty() {
        return Err(GenerateError::Invalid {
            path: path("command"),
            reason: format!("image {} has no entrypoint or cmd and the spec gives no command", spec.image),
        });
    }

    let mut env = EnvPolicy {
        exact: image.env.clone(),
        patterns: settings.env_patterns.clone(),
        required: settings.env_required.clone(),
    };
    env.exact.extend(settings.env_exact.iter().cloned());
    if spec.tty {
        env.exact.push("TERM=xterm".into());
    }
    for entry in &spec.env {
        match entry {
            EnvSpec::Literal { name, value } => {
                // A spec variable replaces the image's value of the same name.
                env.exact.retain(|e| e.split_once('=').map(|(n, _)| n) != Some(name));
                env.exact.push(format!("{name}={value}"));
            }
            EnvSpec::RuntimeValue { name, value_pattern } => {
                env.exact.retain(|e| e.split_once('=').map(|(n, _)| n) != Some(name));
                let pattern = format!("{}={value_pattern}", regex_escape(name));
                regex_check(&pattern).map_err(|reason| GenerateError::Invalid { path: path("env"), reason })?;
                env.patterns.push(pattern);
            }
        }
    }

    let (uid, gid) = user(spec, image)?;
    let mut groups = spec.supplemental_groups.clone();
    groups.sort_unstable();
    groups.dedup();

    let capabilities = if spec.privileged {
        ALL_CAPABILITIES.iter().map(|c| (*c).to_owned()).collect()
    } else {
        capabilities(&settings.default_capabilities, &spec.cap_add, &spec.cap_drop)
    };

    let mut mounts = settings.mounts.clone();
    if platform == Platform::Kubernetes {
        mounts.extend(settings.kubernetes_mounts.iter().cloned());
    }
    for m in &spec.mounts {
        let mut read_only = m.read_only;
        let (fs_type, source) = match &m.source {
            VolumeSource::HostPath(p) => ("bind", SourceMatch::Exact(p.clone())),
            VolumeSource::Sandbox(name) => ("bind", SourceMatch::Pattern(sandbox_volume_pattern(name))),
            VolumeSource::Tmpfs => ("tmpfs", SourceMatch::Exact("tmpfs".into())),
            VolumeSource::Encfs(name) => {
                let volume = encfs.iter().find(|v| v.name == *name).ok_or_else(|| GenerateError::Invalid {
                    path: path("mounts"),
                    reason: format!(
                        "{} mounts encrypted filesystem {name:?}, which the workload does not declare",
                        m.destination
                    ),
                })?;
                // A read-only volume is read-only in every container that
                // mounts it, whatever the container's mount says: the
                // policy pins `ro`, which the host can never drop.
                read_only |= volume.read_only;
                // The agent mounts it there before any container starts, so
                // the path is fixed: an exact source, not a pattern.
                ("bind", SourceMatch::Exact(volume.mount_point()))
            }
        };
        let options = vec![if read_only { "ro" } else { "rw" }.to_owned()];
        mounts.push(MountPolicy { destination: m.destination.clone(), fs_type: fs_type.into(), source, options });
    }

    let mut exec = spec.exec.clone();
    exec.sort();
    exec.dedup();

    Ok(ContainerPolicy {
        name: spec.name.clone(),
        image: spec.image.clone(),
        image_digest: image.manifest_digest.clone(),
        layers: image.diff_ids.clone(),
        args,
        env,
        working_dir: spec
            .working_dir
            .clone()
            .or_else(|| Some(image.working_dir.clone()).filter(|w| !w.is_empty()))
            .unwrap_or_else(|| "/".into()),
        user: UserPolicy { uid, gid, groups },
        capabilities,
        privileged: spec.privileged,
        no_new_privileges: spec.allow_privilege_escalation == Some(false),
        seccomp_profile_sha256: spec.seccomp_profile_sha256.clone(),
        mounts,
        read_only_rootfs: spec.read_only_rootfs,
        sysctls: spec.sysctls.clone(),
        exec,
        signals: settings.signals.clone(),
        read_stdio: true,
        write_stdin: spec.stdin,
    })
}

/// The process user: the spec's, else the image's `User` when numeric.
/// A user name would need the image's /etc/passwd, which the policy must
/// not guess: the spec has to say.
fn user(spec: &ContainerSpec, image: &ImageFacts) -> Result<(u32, u32), GenerateError> {
    let (image_uid, image_gid) = match image.user.split_once(':') {
        _ if image.user.is_empty() => (Some(0), Some(0)),
        Some((u, g)) => (u.parse().ok(), g.parse().ok()),
        None => (image.user.parse().ok(), image.user.parse::<u32>().ok().map(|_| 0)),
    };
    let uid = spec.run_as_user.or(image_uid).ok_or_else(|| GenerateError::Invalid {
        path: format!("{}.securityContext.runAsUser", spec.name),
        reason: format!(
            "image {} runs as user \"{}\", a name capsa cannot resolve without the image's /etc/passwd: set runAsUser (and runAsGroup)",
            spec.image, image.user
        ),
    })?;
    let gid = spec.run_as_group.or(image_gid).ok_or_else(|| GenerateError::Invalid {
        path: format!("{}.securityContext.runAsGroup", spec.name),
        reason: format!("image {} names group \"{}\": set runAsGroup", spec.image, image.user),
    })?;
    Ok((uid, gid))
}

fn capabilities(defaults: &[String], add: &[String], drop: &[String]) -> Vec<String> {
    let norm = |c: &String| {
        let upper = c.to_ascii_uppercase();
        if upper.starts_with("CAP_") || upper == "ALL" { upper } else { format!("CAP_{upper}") }
    };
    let drop: BTreeSet<String> = drop.iter().map(norm).collect();
    let mut caps: BTreeSet<String> = if drop.contains("ALL") {
        BTreeSet::new()
    } else {
        defaults.iter().map(norm).filter(|c| !drop.contains(c)).collect()
    };
    for c in add.iter().map(norm) {
        if c == "CAP_ALL" || c == "ALL" {
            caps.extend(ALL_CAPABILITIES.iter().map(|c| (*c).to_owned()));
        } else {
            caps.insert(c);
        }
    }
    caps.into_iter().collect()
}

/// Escapes a literal for use inside a regular expression.
pub(crate) fn regex_escape(literal: &str) -> String {
    regex::escape(literal)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_follow_add_and_drop() {
        let defaults = vec!["CAP_CHOWN".to_owned(), "CAP_KILL".to_owned()];
        assert_eq!(capabilities(&defaults, &[], &[]), defaults);
        assert_eq!(
            capabilities(&defaults, &["NET_ADMIN".into()], &["kill".into()]),
            vec!["CAP_CHOWN", "CAP_NET_ADMIN"]
        );
        assert_eq!(capabilities(&defaults, &["SYS_TIME".into()], &["ALL".into()]), vec!["CAP_SYS_TIME"]);
    }

    #[test]
    fn user_comes_from_spec_or_numeric_image_user() {
        let image = |user: &str| ImageFacts { user: user.into(), ..ImageFacts::default() };
        let spec = ContainerSpec::default();
        assert_eq!(user(&spec, &image("")).unwrap(), (0, 0));
        assert_eq!(user(&spec, &image("1000")).unwrap(), (1000, 0));
        assert_eq!(user(&spec, &image("1000:2000")).unwrap(), (1000, 2000));
        assert!(user(&spec, &image("nginx")).unwrap_err().to_string().contains("runAsUser"));
        let spec = ContainerSpec { run_as_user: Some(7), run_as_group: Some(8), ..ContainerSpec::default() };
        assert_eq!(user(&spec, &image("nginx")).unwrap(), (7, 8));
    }
}
