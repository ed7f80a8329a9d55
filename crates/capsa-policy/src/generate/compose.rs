//! Compose files: one sandbox for the project, one container per service.
//! The policy goes back as the `x-capsa` extension at the top level:
//! `initdata` (base64) and `host_data`.

use std::collections::BTreeMap;

use serde_json::Value;

use super::settings::Settings;
use super::spec::{ContainerSpec, EnvSpec, MountSpec, Platform, VolumeSource, Workload};
use super::{FieldCheck, GenerateError, Generated, GeneratedWorkload, ImageResolver, Options, base64};

const TOP_KEYS: &[&str] = &["services", "name", "version", "volumes", "networks", "x-capsa"];
const SERVICE_KEYS: &[&str] = &[
    "image",
    "command",
    "entrypoint",
    "environment",
    "working_dir",
    "user",
    "privileged",
    "cap_add",
    "cap_drop",
    "read_only",
    "volumes",
    "tmpfs",
    "sysctls",
    "security_opt",
    "stdin_open",
    "tty",
    "healthcheck",
    "ports",
    "expose",
    "depends_on",
    "restart",
    "networks",
    "container_name",
    "deploy",
    "labels",
    "logging",
    "hostname",
    "mem_limit",
    "cpus",
    "platform",
    "pull_policy",
    "stop_signal",
    "stop_grace_period",
];

/// Generates the policy for a compose project.
pub fn generate(
    origin: &str,
    text: &str,
    resolver: &mut dyn ImageResolver,
    settings: &Settings,
    options: &Options,
) -> Result<Generated, GenerateError> {
    let mut doc: Value = serde_norway::from_str(text)
        .map_err(|e| GenerateError::Parse { origin: origin.to_owned(), reason: e.to_string() })?;
    let mut check = FieldCheck::new();
    check.keys(&doc, "", TOP_KEYS);
    let services =
        doc.get("services").and_then(Value::as_object).ok_or_else(|| GenerateError::NoWorkload(origin.to_owned()))?;
    let mut containers = Vec::new();
    for (name, service) in services {
        containers.push(service_spec(&format!("services.{name}"), name, service, &mut check)?);
    }
    check.finish(options)?;
    let project = doc.get("name").and_then(Value::as_str).unwrap_or(origin).to_owned();
    let workload = Workload {
        platform: Platform::Compose,
        name: project.clone(),
        containers,
        workload_api: None,
        encfs: Vec::new(),
    };
    let data = super::build::build(&workload, resolver, settings)?;
    let generated = GeneratedWorkload::new(project, data, &workload, &options.sandbox_settings)?;
    if let Some(obj) = doc.as_object_mut() {
        obj.insert(
            "x-capsa".into(),
            serde_json::json!({
                "initdata": base64(generated.initdata.toml().as_bytes()),
                "host_data": hex::encode(generated.host_data),
            }),
        );
    }
    let annotated = serde_norway::to_string(&doc).map_err(|e| GenerateError::Parse {
        origin: origin.to_owned(),
        reason: format!("cannot write YAML back: {e}"),
    })?;
    Ok(Generated { workloads: vec![generated], annotated })
}

fn service_spec(path: &str, name: &str, s: &Value, check: &mut FieldCheck) -> Result<ContainerSpec, GenerateError> {
    check.keys(s, path, SERVICE_KEYS);
    let image = s.get("image").and_then(Value::as_str).ok_or_else(|| GenerateError::Invalid {
        path: format!("{path}.image"),
        reason: "missing: capsa pins images, so every service needs one (build: is not supported)".into(),
    })?;
    let words = |key: &str| -> Result<Option<Vec<String>>, GenerateError> {
        match s.get(key) {
            None | Some(Value::Null) => Ok(None),
            Some(Value::String(line)) => split_words(line).map(Some).ok_or_else(|| GenerateError::Invalid {
                path: format!("{path}.{key}"),
                reason: "unbalanced quotes".into(),
            }),
            Some(other) => super::string_list(Some(other), &format!("{path}.{key}")),
        }
    };
    let (run_as_user, run_as_group) = match s.get("user").and_then(Value::as_str) {
        None => (None, None),
        Some(u) => {
            let (uid, gid) = u.split_once(':').map_or((u, None), |(a, b)| (a, Some(b)));
            let num = |v: &str, what: &str| {
                v.parse::<u32>().map_err(|_| GenerateError::Invalid {
                    path: format!("{path}.user"),
                    reason: format!("{what} \"{v}\" is a name; capsa needs numeric IDs (uid:gid)"),
                })
            };
            (Some(num(uid, "user")?), gid.map(|g| num(g, "group")).transpose()?)
        }
    };

    let mut env = Vec::new();
    match s.get("environment") {
        Some(Value::Array(list)) => {
            for (i, e) in list.iter().enumerate() {
                let entry = e.as_str().ok_or_else(|| GenerateError::Invalid {
                    path: format!("{path}.environment[{i}]"),
                    reason: "expected NAME=value".into(),
                })?;
                env.push(match entry.split_once('=') {
                    Some((n, v)) => EnvSpec::Literal { name: n.into(), value: v.into() },
                    // A bare name takes the value from the host at run time.
                    None => EnvSpec::RuntimeValue { name: entry.into(), value_pattern: ".*".into() },
                });
            }
        }
        Some(Value::Object(map)) => {
            for (n, v) in map {
                env.push(match v {
                    Value::Null => EnvSpec::RuntimeValue { name: n.clone(), value_pattern: ".*".into() },
                    Value::String(v) => EnvSpec::Literal { name: n.clone(), value: v.clone() },
                    other => EnvSpec::Literal { name: n.clone(), value: other.to_string() },
                });
            }
        }
        _ => {}
    }

    let mut mounts = Vec::new();
    if let Some(list) = s.get("volumes").and_then(Value::as_array) {
        for (i, v) in list.iter().enumerate() {
            let vpath = format!("{path}.volumes[{i}]");
            mounts.push(volume(&vpath, v)?);
        }
    }
    if let Some(list) = super::string_list(s.get("tmpfs"), &format!("{path}.tmpfs"))? {
        for dest in list {
            mounts.push(MountSpec { destination: dest, source: VolumeSource::Tmpfs, read_only: false });
        }
    }
    let mut sysctls = BTreeMap::new();
    match s.get("sysctls") {
        Some(Value::Object(map)) => {
            for (k, v) in map {
                sysctls.insert(k.clone(), v.as_str().map_or_else(|| v.to_string(), str::to_owned));
            }
        }
        Some(Value::Array(list)) => {
            for item in list.iter().filter_map(Value::as_str) {
                if let Some((k, v)) = item.split_once('=') {
                    sysctls.insert(k.to_owned(), v.to_owned());
                }
            }
        }
        _ => {}
    }
    let security_opt = super::string_list(s.get("security_opt"), &format!("{path}.security_opt"))?.unwrap_or_default();
    let mut allow_privilege_escalation = None;
    for opt in &security_opt {
        match opt.as_str() {
            "no-new-privileges" | "no-new-privileges:true" => allow_privilege_escalation = Some(false),
            "no-new-privileges:false" => allow_privilege_escalation = Some(true),
            other => check.unsupported(format!("{path}.security_opt \"{other}\"")),
        }
    }
    let mut exec = Vec::new();
    if let Some(test) = super::string_list(s.pointer("/healthcheck/test"), &format!("{path}.healthcheck.test"))? {
        match test.split_first() {
            Some((kind, rest)) if kind == "CMD" => exec.push(rest.to_vec()),
            Some((kind, rest)) if kind == "CMD-SHELL" => {
                exec.push(vec!["/bin/sh".into(), "-c".into(), rest.join(" ")]);
            }
            _ => {}
        }
    }
    let bool_of = |key: &str| s.get(key).and_then(Value::as_bool).unwrap_or(false);
    Ok(ContainerSpec {
        name: name.to_owned(),
        image: image.to_owned(),
        command: words("entrypoint")?,
        args: words("command")?,
        env,
        working_dir: s.get("working_dir").and_then(Value::as_str).map(str::to_owned),
        run_as_user,
        run_as_group,
        supplemental_groups: Vec::new(),
        privileged: bool_of("privileged"),
        allow_privilege_escalation,
        read_only_rootfs: bool_of("read_only"),
        cap_add: super::string_list(s.get("cap_add"), &format!("{path}.cap_add"))?.unwrap_or_default(),
        cap_drop: super::string_list(s.get("cap_drop"), &format!("{path}.cap_drop"))?.unwrap_or_default(),
        mounts,
        sysctls,
        seccomp_profile_sha256: None,
        exec,
        stdin: bool_of("stdin_open"),
        tty: bool_of("tty"),
    })
}

fn volume(path: &str, v: &Value) -> Result<MountSpec, GenerateError> {
    let invalid = |reason: &str| GenerateError::Invalid { path: path.to_owned(), reason: reason.to_owned() };
    match v {
        Value::String(short) => {
            let parts: Vec<&str> = short.split(':').collect();
            let (source, target, mode) = match parts.as_slice() {
                [target] => (None, *target, None),
                [source, target] => (Some(*source), *target, None),
                [source, target, mode] => (Some(*source), *target, Some(*mode)),
                _ => return Err(invalid("expected SOURCE:TARGET[:MODE]")),
            };
            let source = match source {
                None => VolumeSource::Sandbox(target.to_owned()),
                Some(s) if s.starts_with('/') || s.starts_with('.') => VolumeSource::HostPath(s.to_owned()),
                Some(named) => VolumeSource::Sandbox(named.to_owned()),
            };
            let read_only = mode.is_some_and(|m| m.split(',').any(|o| o == "ro"));
            Ok(MountSpec { destination: target.to_owned(), source, read_only })
        }
        Value::Object(long) => {
            let target = long.get("target").and_then(Value::as_str).ok_or_else(|| invalid("missing target"))?;
            let source = long.get("source").and_then(Value::as_str).unwrap_or(target);
            let source = match long.get("type").and_then(Value::as_str).unwrap_or("volume") {
                "bind" => VolumeSource::HostPath(source.to_owned()),
                "volume" => VolumeSource::Sandbox(source.to_owned()),
                "tmpfs" => VolumeSource::Tmpfs,
                other => return Err(invalid(&format!("volume type \"{other}\" is not supported"))),
            };
            let read_only = long.get("read_only").and_then(Value::as_bool).unwrap_or(false);
            Ok(MountSpec { destination: target.to_owned(), source, read_only })
        }
        _ => Err(invalid("expected a string or a mapping")),
    }
}

/// Splits a command line as compose does for string commands: whitespace
/// separates words, single and double quotes group them.
fn split_words(line: &str) -> Option<Vec<String>> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut in_word = false;
    let mut quote: Option<char> = None;
    for c in line.chars() {
        match (quote, c) {
            (Some(q), c) if c == q => quote = None,
            (Some(_), c) => word.push(c),
            (None, '\'' | '"') => {
                quote = Some(c);
                in_word = true;
            }
            (None, c) if c.is_whitespace() => {
                if in_word {
                    words.push(std::mem::take(&mut word));
                    in_word = false;
                }
            }
            (None, c) => {
                word.push(c);
                in_word = true;
            }
        }
    }
    if quote.is_some() {
        return None;
    }
    if in_word {
        words.push(word);
    }
    Some(words)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn words_split_like_a_shell() {
        assert_eq!(split_words("sh -c 'echo hi there'").unwrap(), vec!["sh", "-c", "echo hi there"]);
        assert_eq!(split_words(r#"a "" b"#).unwrap(), vec!["a", "", "b"]);
        assert!(split_words("a 'b").is_none());
    }

    #[test]
    fn short_volume_syntax() {
        let m = volume("v", &Value::String("/data:/data:ro".into())).unwrap();
        assert_eq!(m.source, VolumeSource::HostPath("/data".into()));
        assert!(m.read_only);
        let m = volume("v", &Value::String("cache:/cache".into())).unwrap();
        assert_eq!(m.source, VolumeSource::Sandbox("cache".into()));
    }
}
